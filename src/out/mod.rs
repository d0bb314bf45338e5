//! What tether reports: the summary, PR comments and webhooks, the run journal (`history`),
//! `status` and its Prometheus form (`metrics`).

pub(crate) mod cluster_status;
pub(crate) mod history;
pub(crate) mod metrics;
pub(crate) mod report;
pub(crate) mod status;
pub(crate) mod summary;
