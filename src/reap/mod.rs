//! Dead runs: the reaper (reconcile), the janitor, and `forget`.

pub(crate) mod cmd;
pub(crate) mod forget;
pub(crate) mod janitor;
pub(crate) mod reaper;
