//! `tether run`: the life of one run (CLI-CONTRACT §5), as a chain of states, each consuming the one
//! before, so that the compiler holds the two promises that matter most:
//!
//! ```text
//! Plan ──claim──▶ Claimed ──hold──▶ Held ──start──▶ Running ──wait──▶ Ended ──teardown──▶ Finished
//!  │                │                                                                    │
//!  └── Aborted ◀────┘  (only before the app is touched; leaves nothing behind)          exit code
//! ```
//!
//! - `Plan` (plan.rs): everything resolved and validated, nothing created (step 2).
//! - `Claimed` (claim.rs): the run dir is ours (`run.lock`), the cgroup made (step 3).
//! - `Held` (hold.rs, queue.rs): the app lock is ours, dead runs reaped, a slot taken, the
//!   `running` record written (steps 4–7). From here on the app is touched: no step returns an
//!   error any more, every path ends in the one teardown.
//! - `Running` / `Ended` (supervise.rs): setup and the command; the cause it ended with.
//! - `Finished` (teardown.rs): the teardown ran — `teardown` consumes `Ended`, so it can run
//!   once only (step 10).
//! - The summary and the exit code are made in one place (finish.rs).

mod aftercare;
pub(crate) mod args;
mod claim;
pub(crate) mod decide;
mod env;
mod finish;
mod hold;
mod plan;
mod queue;
mod supervise;
mod teardown;
mod waitline;
mod waitline_cluster;
mod waitline_cluster_say;
mod waitline_say;

pub(crate) use args::RunArgs;

use crate::config::settings::Settings;
use crate::ident::ci_env::CiInfo;
use crate::output;
use crate::state::applock::{AppLock, AppLocks};
use crate::state::record::{self, LockMeta, RunRecord, State};
use crate::state::rundir::{self, RunDir};
use crate::sys::cgroup::RunCgroup;
use crate::sys::front;
use crate::sys::safe_fs::Dir;
use crate::sys::supervisor::Supervisor;
use decide::Cause;
use finish::Aborted;
use plan::{Plan, Spec};
use std::time::{Duration, Instant};

/// `tether run`. Returns the exit code.
pub(crate) fn run(args: RunArgs) -> i32 {
    args.output.init();
    // 1. Lifetime guards, before anything else is done.
    let mut sup = match front::split(
        args.agent_watch_flag() != Some(false),
        aftercare::after_core_killed,
    ) {
        Ok(s) => s,
        Err(e) => {
            output::error(&format!("cannot install lifetime guards: {e}"));
            return crate::exit::TETHER_FAILURE;
        }
    };
    let app_text = args.app.clone();
    let summary_json = args.summary_json.clone();
    // 2. Resolve and validate: any error exits 125 (126/127) with nothing created.
    let plan = crate::config::load(args.places.config.as_deref()).and_then(|cfg| {
        args.output.adopt_config(&cfg);
        let settings = Settings::new(&cfg);
        sup.arm_deadline(settings.deadline(args.deadline))
            .map_err(|e| crate::error::Error::tether(format!("cannot arm the deadline: {e}")))?;
        sup.set_agent_watch(settings.agent_watch(args.agent_watch_flag()));
        Plan::resolve(args, &cfg)
    });
    let plan = match plan {
        Ok(p) => p,
        Err(e) => return Aborted::unplanned(app_text, summary_json, e).exit(),
    };
    let claimed = match plan.claim(&mut sup) {
        Ok(c) => c,
        Err(a) => return a.exit(),
    };
    let held = match claimed.hold(&mut sup) {
        Ok(h) => h,
        Err(a) => return a.exit(),
    };
    // From here on the app is touched: every path ends in the one teardown.
    held.start(&mut sup)
        .wait(&mut sup)
        .teardown(&mut sup)
        .exit()
}

/// What every state of a run carries: the spec, the open state dirs, the record it keeps
/// writing, its cgroup, and the clock readings the summary reports.
struct Ctx {
    spec: Spec,
    /// The lock dir (slots live there; with the flock backend, the app locks too).
    lock_dir: Dir,
    runs_dir: Dir,
    app_locks: AppLocks,
    record: RunRecord,
    cgroup: Option<RunCgroup>,
    /// Waiting for the app lock.
    lock_wait: Stopwatch,
    /// Waiting for a host slot (`--slots`), after the app lock.
    slot_wait: Stopwatch,
    /// When the app lock was taken (the journal's hold time).
    held_since: Option<Instant>,
    /// Dead runs this run reaped before its command.
    reaps: usize,
}

/// Time spent in a wait, including one that was given up (still running when read).
#[derive(Default)]
struct Stopwatch {
    since: Option<Instant>,
    total: Duration,
}

impl Stopwatch {
    fn start(&mut self) {
        self.since = Some(Instant::now());
    }

    fn stop(&mut self) {
        if let Some(t) = self.since.take() {
            self.total += t.elapsed();
        }
    }

    fn so_far(&self) -> Duration {
        self.total + self.since.map_or(Duration::ZERO, |t| t.elapsed())
    }
}

impl Ctx {
    /// The summary's `lock_wait`: everything spent waiting to be let in — the app lock and,
    /// with `--slots`, the host slot (a run that waited 1.5 s for a slot did not start at once).
    fn admission_wait(&self) -> Duration {
        self.lock_wait.so_far() + self.slot_wait.so_far()
    }

    /// The summary's `slot_wait`: only with `--slots`.
    fn slot_wait(&self) -> Option<Duration> {
        self.spec.slots.map(|_| self.slot_wait.so_far())
    }
}

impl Ctx {
    fn new(spec: Spec, lock_dir: Dir, runs_dir: Dir) -> Ctx {
        let pid = std::process::id() as i32;
        let pid_start = crate::sys::procfs::start_time(pid).unwrap_or(0);
        let run_dir = rundir::path_of(&runs_dir, &spec.run_id);
        let record = RunRecord {
            meta: LockMeta {
                version: record::VERSION,
                app: spec.app.to_string(),
                run_id: spec.run_id.to_string(),
                pid,
                pid_start,
                host: crate::sys::procfs::hostname(),
                started_at: record::unix_now(),
                state: State::Queued,
                run_dir: run_dir.display().to_string(),
                cgroup: None,
                ci: spec.ci.clone(),
                token: Some(format!("{}.{pid}.{pid_start}", spec.run_id)),
            },
            command: spec
                .argv
                .iter()
                .map(|s| s.to_string_lossy().into_owned())
                .collect(),
            setup: spec.setup.clone(),
            teardown: spec.teardown.clone(),
            cwd: spec.cwd.as_ref().map(|p| p.display().to_string()),
            group: spec.group.clone(),
            deadline_ms: spec.deadline.as_millis() as u64,
            grace_ms: spec.grace.as_millis() as u64,
            teardown_timeout_ms: spec.teardown_timeout.as_millis() as u64,
            exit_code: None,
            reason: None,
            lock_wait_ms: None,
            runtime_ms: None,
            reap_failures: 0,
            keep: spec.keep_run_dir,
            fence: None,
        };
        let app_locks = match &spec.cluster {
            Some(target) => AppLocks::cluster(
                lock_dir.clone(),
                target.clone(),
                spec.run_id.to_string(),
                Some(crate::cluster::runs::NewRow {
                    run_id: spec.run_id.to_string(),
                    app: spec.app.to_string(),
                    host: record.meta.host.clone(),
                    boot_id: crate::sys::procfs::boot_id(),
                    pid,
                    pid_start,
                    group: spec.group.clone(),
                    ci_link: spec.ci.as_ref().and_then(|c| c.link.clone()),
                    teardown: spec.teardown.clone(),
                }),
            ),
            None => AppLocks::flock(lock_dir.clone()),
        };
        Ctx {
            spec,
            app_locks,
            lock_dir,
            runs_dir,
            record,
            cgroup: None,
            lock_wait: Stopwatch::default(),
            slot_wait: Stopwatch::default(),
            held_since: None,
            reaps: 0,
        }
    }

    fn ci(&self) -> Option<CiInfo> {
        self.spec.ci.clone()
    }
}

/// Write the record (into the run dir) and, when the app is held, the lock metadata.
fn write_state(dir: &mut RunDir, app_lock: Option<&AppLock>, record: &RunRecord) {
    if let Err(e) = dir.write_record(record) {
        output::warn(
            "record",
            &format!("cannot write {}: {e}", dir.record_path().display()),
        );
    }
    if record.meta.state == State::Clean {
        // The record says `clean`, the lock metadata not yet (the suite dies here, D91).
        crate::sys::fault::fault_pause("TETHER_FAULT_PAUSE_CLEAN_RECORD_BEFORE_META");
    }
    if let Some(lock) = app_lock {
        write_meta(lock, &record.meta);
    }
}

/// Write the lock metadata only.
fn write_meta(lock: &AppLock, meta: &LockMeta) {
    if let Err(e) = lock.write_meta(meta) {
        output::warn(
            "record",
            &format!("cannot write lock metadata {}: {e}", lock.path().display()),
        );
    }
}

/// Why a run stops before it touched its app.
enum Stop {
    /// A funnel event: nothing to tear down but the claim.
    Event(Cause),
    /// The app was busy under `--on-busy fail` / `--lock-timeout`.
    Busy(String),
    /// tether's own failure.
    Fail(crate::error::Error),
    /// A newer run of our group took our place in the queue (PROTOCOL §15); its id.
    Superseded(String),
}

/// Act on funnel events that arrived while the run was busy (or are pending now).
fn check_funnel(sup: &mut Supervisor, ctx: &Ctx) -> Result<(), Stop> {
    act_on(sup.poll_now(), ctx)
}

/// Before the app is touched, the first funnel event stops the run.
fn act_on(events: Vec<crate::sys::signals::Event>, ctx: &Ctx) -> Result<(), Stop> {
    match decide::decide_batch(&events) {
        (Some(cause), losers) => {
            finish::announce(cause, ctx.spec.deadline);
            finish::log_ignored(&losers);
            Err(Stop::Event(cause))
        }
        _ => Ok(()),
    }
}
