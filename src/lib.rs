//! tether — a CI harness runner. Folders are layers and imports only point down
//! (machine-docs/ARCHITECTURE.md): `config` and `ident` (pure inputs) < `sys` (the kernel:
//! processes, signals, cgroups, file descriptors) < `cluster` (the PostgreSQL session of the
//! cluster-wide locks) < `state` (locks, run dirs, records) <
//! `reap` (dead runs) < `out` (what tether reports) < `run` (the life of one run) < `cli`.
//! `error`, `exit` and `output` are leaves every layer may use.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod cli;
pub(crate) mod cluster;
pub(crate) mod config;
pub(crate) mod error;
pub(crate) mod exit;
pub(crate) mod ident;
pub(crate) mod out;
pub(crate) mod output;
pub(crate) mod reap;
pub(crate) mod run;
pub(crate) mod state;
pub(crate) mod sys;
