//! Effective settings: flag > environment > config file > built-in default (CLI-CONTRACT §3).
//!
//! clap already folds the environment into the flag value (`--lock-dir` / `TETHER_LOCK_DIR`),
//! so the order here is "what clap gave" > file > default. The built-in defaults live here and
//! nowhere else.

use super::places::Place;
use super::{OnBusy, QueueOrder};
use crate::config::Config;
use crate::output::LogFormat;
use std::path::PathBuf;
use std::time::Duration;

pub(crate) const DEADLINE: Duration = Duration::from_secs(60 * 60);
pub(crate) const GRACE: Duration = Duration::from_secs(10);
pub(crate) const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(5 * 60);
pub(crate) const RETAIN_FAILED: Duration = Duration::from_secs(24 * 60 * 60);
/// The report's overall time budget and retry cap (`report.timeout`, `report.retries`).
pub(crate) const REPORT_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const REPORT_RETRIES: u32 = 3;
/// Bound on connecting to the cluster's server (`cluster.connect_timeout`).
pub(crate) const CLUSTER_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a run that reaped a dead run of another host waits for that host to confirm the
/// dead run's leftovers killed before it starts its command (PROTOCOL §17, DECISIONS D62).
pub(crate) const CLUSTER_LEFTOVERS_WAIT: Duration = Duration::from_secs(10);

pub(crate) struct Settings<'a> {
    cfg: &'a Config,
}

impl<'a> Settings<'a> {
    pub(crate) fn new(cfg: &'a Config) -> Self {
        Settings { cfg }
    }

    pub(crate) fn lock_dir(&self, flag: Option<PathBuf>) -> Place {
        flag.or(self.cfg.lock_dir.clone())
            .map(Place::given)
            .unwrap_or_else(Place::default_lock_dir)
    }

    pub(crate) fn runs_dir(&self, flag: Option<PathBuf>) -> Place {
        flag.or(self.cfg.runs_dir.clone())
            .map(Place::given)
            .unwrap_or_else(Place::default_runs_dir)
    }

    pub(crate) fn deadline(&self, flag: Option<Duration>) -> Duration {
        flag.or(self.cfg.deadline).unwrap_or(DEADLINE)
    }

    pub(crate) fn grace(&self, flag: Option<Duration>) -> Duration {
        flag.or(self.cfg.grace).unwrap_or(GRACE)
    }

    pub(crate) fn teardown_timeout(&self, flag: Option<Duration>) -> Duration {
        flag.or(self.cfg.teardown_timeout)
            .unwrap_or(TEARDOWN_TIMEOUT)
    }

    pub(crate) fn retain_failed(&self, flag: Option<Duration>) -> Duration {
        flag.or(self.cfg.retain_failed).unwrap_or(RETAIN_FAILED)
    }

    pub(crate) fn on_busy(&self, flag: Option<OnBusy>) -> OnBusy {
        flag.or(self.cfg.on_busy).unwrap_or(OnBusy::Wait)
    }

    pub(crate) fn queue_order(&self, flag: Option<QueueOrder>) -> QueueOrder {
        flag.or(self.cfg.queue_order).unwrap_or_default()
    }

    /// No bound unless one is given.
    pub(crate) fn max_queue(&self, flag: Option<u32>) -> Option<u32> {
        flag.or(self.cfg.max_queue)
    }

    /// Watch stdout/stderr for the CI agent's death (D32): on unless turned off.
    pub(crate) fn agent_watch(&self, flag: Option<bool>) -> bool {
        flag.or(self.cfg.agent_watch).unwrap_or(true)
    }

    pub(crate) fn log_format(&self, flag: Option<LogFormat>) -> LogFormat {
        flag.or(self.cfg.log_format).unwrap_or_default()
    }
}
