//! tether — a CI harness runner. One module per mechanism; `run` reads the life cycle of a
//! run top to bottom; `cli` is thin glue on top.

pub mod cgroup;
pub mod ci_env;
pub mod cli;
pub mod config;
pub mod decide;
pub mod dirs;
pub mod duration;
pub mod environment;
pub mod error;
pub mod exit;
pub mod forget;
pub mod identity;
pub mod janitor;
pub mod lifetime;
pub mod lock;
pub mod names;
pub mod output;
pub mod proc_locks;
pub mod procfs;
pub mod reconcile;
pub mod record;
pub mod report;
pub mod run;
pub mod rundir;
pub mod safe_fs;
pub mod settings;
pub mod slots;
pub mod spawn;
pub mod status;
pub mod summary;
pub mod teardown;
pub mod tree;
pub mod yaml;
