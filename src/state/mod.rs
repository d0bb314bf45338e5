//! tether's state on disk: where it lives and who may own it, app and run locks, run dirs, records, slots.

pub mod applock;
pub mod dirs;
pub mod lock;
pub mod record;
pub mod rundir;
pub mod slots;
