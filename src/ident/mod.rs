//! Who and what a run is: app domains and run ids, the CI system it runs in, the `run_as` identity.

pub(crate) mod ci_env;
pub(crate) mod identity;
pub(crate) mod names;
