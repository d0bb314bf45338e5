//! What tether reports: the summary, PR comments and webhooks, `status`.

pub mod report;
pub mod status;
pub mod summary;
