//! The kernel, wrapped: the signal funnel and the front/core split, spawning, process trees, cgroups, `/proc`, and file system work relative to directory fds.

pub mod cgroup;
pub mod lifetime;
pub mod proc_locks;
pub mod procfs;
pub mod safe_fs;
pub mod shell;
pub mod spawn;
pub mod tree;
