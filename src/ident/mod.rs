//! Who and what a run is: app domains and run ids, the CI system it runs in, the `run_as` identity.

pub mod ci_env;
pub mod identity;
pub mod names;
