//! Dead runs: the reaper (reconcile), the janitor, and `forget`.

pub mod cmd;
pub mod forget;
pub mod janitor;
pub mod reaper;
