//! The kernel, wrapped: the front/core split and the supervisor (signals, deadline, children),
//! spawning, process trees, cgroups, `/proc`, and file system work relative to directory fds.

pub mod cgroup;
pub mod fault;
pub mod front;
pub mod proc_locks;
pub mod procfs;
pub mod resolve;
pub mod safe_fs;
pub mod shell;
pub mod signals;
pub mod spawn;
pub mod supervisor;
pub mod tree;
