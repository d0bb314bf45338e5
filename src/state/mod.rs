//! tether's state on disk: where it lives and who may own it, app and run locks, run dirs, records, slots.

pub(crate) mod applock;
pub(crate) mod cluster_lock;
pub(crate) mod cluster_wait;
pub(crate) mod dirs;
pub(crate) mod heartbeat;
pub(crate) mod lock;
pub(crate) mod queue;
pub(crate) mod record;
pub(crate) mod rundir;
pub(crate) mod slots;
pub(crate) mod spares;
