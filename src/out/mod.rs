//! What tether reports: the summary, PR comments and webhooks, `status`.

pub(crate) mod report;
pub(crate) mod status;
pub(crate) mod summary;
