//! tether — a CI harness runner. Folders are layers and imports only point down
//! (machine-docs/ARCHITECTURE.md): `config` and `ident` (pure inputs) < `sys` (the kernel:
//! processes, signals, cgroups, file descriptors) < `state` (locks, run dirs, records) <
//! `reap` (dead runs) < `out` (what tether reports) < `run` (the life of one run) < `cli`.
//! `error`, `exit` and `output` are leaves every layer may use.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod cli;
pub mod config;
pub mod error;
pub mod exit;
pub mod ident;
pub mod out;
pub mod output;
pub mod reap;
pub mod run;
pub mod state;
pub mod sys;
