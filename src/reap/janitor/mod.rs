//! `tether janitor` (CLI-CONTRACT §15): sweep the lock dir, the runs dir and tether's cgroups, reap what
//! dead runs left, and never touch a live run.
//!
//! A sweep is a plan, then its application (issues 15, 18). The plan (plan.rs) is made from
//! what can be read without taking a lock — the kernel's lock table, the records, the cgroups —
//! and decides every action (keeping a `--keep-run-dir` dir included); `--dry-run` prints
//! exactly that, each verb as `would-…`. The real sweep applies the same plan step by step
//! (apply.rs); each step takes its lock first and re-decides what it re-reads with the plan's
//! own rules (decide.rs): the lock decides whether, the plan's rules decide what.
//!
//! Life and death come from lock probes only. A held app lock is a live run: it is reported
//! (with a warning when it has been held longer than its own bounds allow) and left alone. An
//! unheld one is taken, identity-checked, reconciled (PROTOCOL §6) and then unlinked *while still
//! held*, so a waiter blocked on it wakes up on an orphaned inode, fails its identity check
//! and re-opens the path (PROTOCOL.md). Run dirs whose `run.lock` is free are reaped under
//! their app's lock; this is what finds dead runs after a reboot wiped `/run/lock`.
//! Two janitors at once are safe: the lock decides which one reaps.

mod apply;
mod cluster;
mod decide;
mod plan;
mod report;

pub(crate) use report::Report;

use crate::config::places::Place;
use crate::error::{Error, Result};
use crate::ident::names::Domain;
use crate::output;
use crate::reap::reaper::{ReapPolicy, Reaper};
use crate::state::dirs;
use crate::state::record;
use crate::state::rundir;
use crate::sys::safe_fs::Dir;
use crate::sys::supervisor::Supervisor;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

pub(crate) struct Options {
    pub(crate) lock_dir: Place,
    pub(crate) runs_dir: Place,
    pub(crate) teardown: Option<String>,
    pub(crate) teardown_timeout: Duration,
    pub(crate) grace: Duration,
    pub(crate) app: Option<Domain>,
    pub(crate) dry_run: bool,
    pub(crate) retain: Duration,
    /// Orphan run cgroups younger than this are left alone (`--orphan-age`).
    pub(crate) orphan_age: Duration,
    /// The cluster, when one is configured (issue 16): dead runs are reaped under each app's
    /// cluster lock too, and the cluster's dead runs are swept and reported (PROTOCOL §17).
    pub(crate) cluster: Option<crate::config::cluster::ClusterTarget>,
}

/// Sweep both dirs, then tether's cgroups. `Err` only for unsafe dirs or a supervisor that
/// cannot be set up.
pub(crate) fn sweep(opts: &Options) -> Result<Report> {
    let lock = dirs::choose("lock dir", &opts.lock_dir, 0o755)?
        .existing()
        .map(|s| s.dir);
    let runs = dirs::choose("runs dir", &opts.runs_dir, 0o700)?
        .existing()
        .map(|s| s.dir);
    let steps = plan::plan(opts, lock.as_ref(), runs.as_ref());
    let mut report = Report {
        dry_run: opts.dry_run,
        ..Report::default()
    };
    let mut session = match &opts.cluster {
        Some(target) => cluster::connect(target)?,
        None => None,
    };
    if opts.dry_run {
        if let Some(s) = session.as_mut() {
            cluster::sweep(s, None, opts.app.as_ref(), &mut report)?;
        }
        for step in &steps {
            report.push(step.entry().would());
        }
        return Ok(report);
    }
    let mut sup = Supervisor::standalone()
        .map_err(|e| Error::tether(format!("cannot set up signal handling: {e}")))?;
    let mut sweep = Sweep {
        opts,
        runs_path: runs.as_ref().map(|d| d.path().to_owned()),
        lock,
        reaper: Reaper::new(
            &mut sup,
            runs,
            ReapPolicy {
                fallback_teardown: opts.teardown.clone(),
                teardown_timeout: opts.teardown_timeout,
                grace: opts.grace,
            },
            None,
        ),
        report: &mut report,
        pending: HashMap::new(),
    };
    if let Some(s) = session.as_mut() {
        cluster::sweep(s, Some(&mut sweep.reaper), opts.app.as_ref(), sweep.report)?;
    }
    for step in steps {
        if sweep.reaper.supervisor().stop_requested() {
            break;
        }
        sweep.apply(step);
    }
    sweep.report_pending();
    sweep.tidy_queues();
    if sweep.reaper.supervisor().stop_requested() {
        output::warn(
            "janitor",
            "signal received — stopped after the current reap",
        );
    }
    Ok(report)
}

/// One sweep's state: the dirs, the reaper, the report.
struct Sweep<'o, 'f> {
    opts: &'o Options,
    lock: Option<Dir>,
    runs_path: Option<PathBuf>,
    reaper: Reaper<'f>,
    report: &'o mut Report,
    /// Runs reaped with an app's lock whose entries are still to come (run id → app).
    pending: HashMap<String, String>,
}

impl Sweep<'_, '_> {
    /// Remove the queue dirs nobody stands in (PROTOCOL §15; silent: a queue is tether's
    /// bookkeeping, not a run). Dead tickets are unlinked on the way.
    fn tidy_queues(&self) {
        let Some(lock) = &self.lock else { return };
        for (name, _) in lock.entries().unwrap_or_default() {
            let Some(domain) = name
                .to_str()
                .and_then(|n| n.strip_prefix(crate::state::queue::DIR_PREFIX))
                .and_then(|d| crate::ident::names::Domain::parse(d).ok())
            else {
                continue;
            };
            if self.opts.app.as_ref().is_none_or(|a| *a == domain) {
                let _ = crate::state::queue::Queue::remove_if_empty(lock, &domain);
            }
        }
    }

    /// The app locks the sweep reaps under: with a cluster, each app's flock and then its
    /// cluster lock (tried, never waited for; the janitor writes no row).
    fn app_locks(&self, lock: Dir) -> crate::state::applock::AppLocks {
        match &self.opts.cluster {
            Some(target) => crate::state::applock::AppLocks::cluster(
                lock,
                target.clone(),
                format!("tether-janitor-{}", std::process::id()),
                None,
            ),
            None => crate::state::applock::AppLocks::flock(lock),
        }
    }

    /// Before a reconcile under `held`: the app's rows (a dead run reaped on another host gets
    /// no second teardown).
    fn rows_before(&mut self, held: &mut crate::state::applock::AppLock, app: &Domain) {
        if let Some(s) = held.cluster_session() {
            if let Ok(rows) = crate::cluster::runs::of_app(s, app.as_str()) {
                self.reaper.set_cluster_rows(rows);
            }
        }
    }

    /// After it, before the lock goes: the rows of this host's runs it reaped go (PROTOCOL §17).
    fn rows_after(&mut self, held: &mut crate::state::applock::AppLock, mark: usize) {
        if let Some(s) = held.cluster_session() {
            let here = crate::reap::reaper::cluster::Here::now();
            for id in &self.reaper.reaped_log()[mark..] {
                let _ = crate::cluster::runs::remove_of(s, id, &here.host, &here.boot_id);
            }
        }
    }

    /// `tether forget …` for a run whose reap keeps failing (the exact command, dirs included
    /// when they are not the defaults).
    fn forget_hint(&self, run_id: &str) -> String {
        crate::reap::forget::hint(
            self.lock.as_ref().map(|d| d.path()),
            self.runs_path.as_deref(),
            run_id,
        )
    }

    /// Count failed reaps in the kept record, so operators see a run that keeps failing.
    fn record_failure(&self, run_id: &str) {
        let Some(runs) = self.reaper.runs() else {
            return;
        };
        let Ok(dir) = rundir::open_trusted(runs, run_id) else {
            return;
        };
        if let Ok(mut r) = record::read_record(&dir) {
            r.reap_failures += 1;
            let _ = record::write_record(&dir, &r);
        }
    }
}
