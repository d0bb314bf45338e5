//! What tether reports: the summary, PR comments and webhooks, the run journal (`history`),
//! `status`.

pub(crate) mod history;
pub(crate) mod report;
pub(crate) mod status;
pub(crate) mod summary;
