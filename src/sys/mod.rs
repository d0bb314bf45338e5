//! The kernel, wrapped: the front/core split and the supervisor (signals, deadline, children),
//! spawning, process trees, cgroups, `/proc`, and file system work relative to directory fds.

pub(crate) mod cgroup;
pub(crate) mod fault;
pub(crate) mod front;
pub(crate) mod lease;
pub(crate) mod proc_locks;
pub(crate) mod procfs;
pub(crate) mod resolve;
pub(crate) mod safe_fs;
pub(crate) mod shell;
pub(crate) mod signals;
pub(crate) mod spawn;
pub(crate) mod supervisor;
pub(crate) mod tree;
