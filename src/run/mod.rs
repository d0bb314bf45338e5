//! `tether run`: the life of one run, top to bottom (SPEC §3.1).
//!
//! guards → validate → claim run dir → app lock → reconcile → running → setup/command →
//! event loop → teardown (exactly once) → summary → exit.
//!
//! Up to the moment the app is touched (lock metadata written, setup or command started) any
//! failure exits fast with a typed error and leaves nothing behind. After it, tether "must
//! finish": it never bails out, it logs, tears down, and reports.

pub mod args;
pub mod decide;

use crate::config::duration::{self, human};
use crate::config::env::{self as environment, EnvPolicy, RunVars};
use crate::config::settings::Settings;
use crate::config::Config;
use crate::config::OnBusy;
use crate::error::{Error, Failure, Result};
use crate::ident::ci_env::{self, CiInfo};
use crate::ident::names::{Domain, RunId};
use crate::out::summary::Summary;
use crate::output;
use crate::reap::reaper::{DeadRun, ReapFailed, Reaper};
use crate::run::decide::{decide_batch, Action, Cause, Phase};
use crate::state::dirs;
use crate::state::lock::{self, app_lock_name, HeldLock, TryLock, Waiter};
use crate::state::record::{self, LockMeta, RunRecord, State};
use crate::state::rundir::{self, RunDir};
use crate::sys::cgroup::RunCgroup;
use crate::sys::lifetime::{self, Event, Funnel};
use crate::sys::safe_fs::Dir;
use crate::sys::shell;
use crate::sys::spawn::{self, Resolved, SpawnSpec};
use crate::sys::tree::{self, Members};
pub use args::RunArgs;
use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often `--on-busy cancel-older` looks at who holds the lock while waiting.
const CANCEL_RECHECK: Duration = Duration::from_millis(200);

/// How often a run waiting for a host slot looks again.
const SLOT_POLL: Duration = Duration::from_millis(20);

/// Everything resolved and validated before anything is created.
struct Plan {
    app: Domain,
    run_id: RunId,
    lock_dir: Dir,
    runs_dir: Dir,
    deadline: Duration,
    grace: Duration,
    lock_timeout: Option<Duration>,
    on_busy: OnBusy,
    group: Option<String>,
    setup: Option<String>,
    teardown: Option<String>,
    teardown_timeout: Duration,
    keep_run_dir: bool,
    slots: Option<u32>,
    env_policy: EnvPolicy,
    run_as: Option<crate::ident::identity::Identity>,
    limits: crate::config::Limits,
    report: Option<crate::config::Report>,
    summary_json: Option<PathBuf>,
    program: PathBuf,
    command: Vec<OsString>,
    ci: Option<CiInfo>,
    wait_progress: Duration,
    cwd: Option<PathBuf>,
}

impl Plan {
    fn resolve(args: RunArgs, cfg: &Config) -> Result<Plan> {
        let settings = Settings::new(cfg);
        if args.slots == Some(0) {
            return Err(Error::tether("--slots must be at least 1"));
        }
        let app = Domain::parse(&args.app).map_err(Error::tether)?;
        let ci = CiInfo::from_process_env();
        let run_id_text = match (&args.run_id, &ci) {
            (Some(id), _) => id.clone(),
            (None, Some(ci)) => ci.default_run_id(),
            (None, None) => ci_env::local_run_id(record::unix_now(), std::process::id()),
        };
        let run_id = RunId::parse(&run_id_text).map_err(Error::tether)?;
        let lock_place = settings.lock_dir(args.places.lock_dir);
        let runs_place = settings.runs_dir(args.places.runs_dir);
        let run_as = match &cfg.run_as {
            Some(ra) => Some(crate::ident::identity::resolve(ra)?),
            None => None,
        };
        let Some((program, rest)) = args.command.split_first() else {
            return Err(Error::tether("missing command after `--`"));
        };
        let path_var = std::env::var_os("PATH");
        let program = match spawn::resolve(program, path_var.as_ref()) {
            Resolved::Found(p) => p,
            Resolved::NotFound(m) => return Err(Error::new(Failure::NotFound, m)),
            Resolved::NotExecutable(m) => return Err(Error::new(Failure::NotExecutable, m)),
        };
        if let Some(path) = &args.summary_json {
            crate::out::summary::check_json_path(path)?;
        }
        // Directories: check both before creating either, so a bad one leaves nothing.
        // With run_as the command must traverse the runs dir to its tmp/ (never list it).
        let runs_mode = if run_as.is_some() { 0o711 } else { 0o700 };
        let lock_choice = dirs::choose("lock dir", &lock_place, 0o755)?;
        let runs_choice = dirs::choose("runs dir", &runs_place, runs_mode)?;
        if let Some(existing) = lock_choice.existing_dir() {
            check_lockfile_place(existing, &app_lock_name(&app))?;
        }
        let lock = lock_choice.open()?;
        let runs = runs_choice.open()?;
        if let Some(id) = &run_as {
            runs.check_reachable_by(&id.user, id.uid, &id.groups)?;
            runs.dir
                .chmod(runs_mode)
                .map_err(|e| Error::path("cannot chmod runs dir", runs.dir.path(), e))?;
        }
        dirs::check_writable("lock dir", &lock.dir)?;
        dirs::check_writable("runs dir", &runs.dir)?;
        let (lock_dir, runs_dir) = (lock.dir, runs.dir);
        let group = args
            .group
            .or_else(|| ci.as_ref().and_then(CiInfo::default_group));
        Ok(Plan {
            app,
            run_id,
            lock_dir,
            runs_dir,
            deadline: settings.deadline(args.deadline),
            grace: settings.grace(args.grace),
            lock_timeout: args.lock_timeout,
            on_busy: settings.on_busy(args.on_busy),
            group,
            setup: args.setup.or(cfg.setup.clone()),
            teardown: args.teardown.or(cfg.teardown.clone()),
            teardown_timeout: settings.teardown_timeout(args.teardown_timeout),
            keep_run_dir: args.keep_run_dir,
            slots: args.slots.or(cfg.slots),
            env_policy: EnvPolicy::from_config(cfg),
            run_as,
            limits: cfg.limits.clone(),
            report: cfg.report.clone(),
            summary_json: args.summary_json,
            program,
            command: rest.to_vec(),
            ci,
            wait_progress: args.wait_progress_interval.max(Duration::from_millis(100)),
            cwd: std::env::current_dir().ok(),
        })
    }
}

/// Refuse a symlink, directory or other non-file where the app lockfile goes (before anything
/// is created: the open would refuse it too, but later).
fn check_lockfile_place(lock_dir: &Dir, name: &str) -> Result<()> {
    let Ok(st) = lock_dir.stat_at(name) else {
        return Ok(());
    };
    let what = match crate::sys::safe_fs::kind(&st) {
        crate::sys::safe_fs::Kind::File => return Ok(()),
        crate::sys::safe_fs::Kind::Symlink => "a symlink",
        crate::sys::safe_fs::Kind::Dir => "a directory",
        crate::sys::safe_fs::Kind::Other => "not a regular file",
    };
    Err(Error::tether(format!(
        "lockfile {} is {what}; refusing to use it",
        lock_dir.join(name).display()
    )))
}

/// `tether run`. Returns the exit code.
pub fn run(args: RunArgs) -> i32 {
    args.output.init();
    let app_text = args.app.clone();
    let summary_json = args.summary_json.clone();

    // 1. Lifetime guards, before anything else is done.
    let mut funnel = match lifetime::split(args.agent_watch_flag() != Some(false)) {
        Ok(f) => f,
        Err(e) => {
            output::error(&format!("cannot install lifetime guards: {e}"));
            return crate::exit::TETHER_FAILURE;
        }
    };

    // 2. Resolve and validate: any error exits 125 (126/127) with nothing created.
    let resolved = crate::config::load(args.places.config.as_deref()).and_then(|cfg| {
        args.output.adopt_config(&cfg);
        let settings = Settings::new(&cfg);
        funnel.arm_deadline(settings.deadline(args.deadline));
        funnel.set_agent_watch(settings.agent_watch(args.agent_watch_flag()));
        Plan::resolve(args, &cfg)
    });
    let plan = match resolved {
        Ok(p) => p,
        Err(e) => {
            output::error(&e.message);
            let s = Summary {
                run_id: "-".into(),
                app: app_text,
                result: "failed".into(),
                exit: e.exit_code(),
                lock_wait_ms: 0,
                runtime_ms: 0,
                teardown: "none".into(),
                reason: "error".into(),
                ci: None,
            };
            if let Some(path) = summary_json {
                let _ = s.write_json(&path);
            }
            return e.exit_code();
        }
    };
    Run::new(plan, funnel).execute()
}

/// How a phase before the command ended early.
enum Stop {
    /// A funnel event: tear down (nothing of the app touched yet unless `touched`).
    Event(Cause),
    /// The app was busy under `--on-busy fail` / `--lock-timeout`.
    Busy(String),
    /// tether's own failure.
    Fail(Error),
}

struct Run {
    plan: Plan,
    funnel: Funnel,
    phase: Phase,
    dir: Option<RunDir>,
    /// A dead run's unclean record found in our run dir (same run id reused).
    own_dead: Option<RunRecord>,
    app_lock: Option<HeldLock>,
    slot: Option<crate::state::slots::Slot>,
    /// Run ids this run has already asked to cancel (signal each once).
    cancelled: HashSet<String>,
    record: RunRecord,
    lock_wait: Duration,
    /// Set while waiting for the app lock (so a wait that is given up is still reported).
    lock_wait_since: Option<Instant>,
    command_started: Option<Instant>,
    command_ended: Option<Instant>,
    cgroup: Option<RunCgroup>,
    /// Set once lock metadata is written: from here on, teardown is owed to the app.
    touched: bool,
    /// The `queued` record has been written (only runs that wait write it).
    queued_noted: bool,
    child_pid: Option<i32>,
}

impl Run {
    fn new(plan: Plan, funnel: Funnel) -> Run {
        let pid = std::process::id() as i32;
        let pid_start = crate::sys::procfs::start_time(pid).unwrap_or(0);
        let run_dir = rundir::path_of(&plan.runs_dir, &plan.run_id);
        let record = RunRecord {
            meta: LockMeta {
                version: record::VERSION,
                app: plan.app.to_string(),
                run_id: plan.run_id.to_string(),
                pid,
                pid_start,
                host: crate::sys::procfs::hostname(),
                started_at: record::unix_now(),
                state: State::Queued,
                run_dir: run_dir.display().to_string(),
                cgroup: None,
                ci: plan.ci.clone(),
                token: Some(format!("{}.{pid}.{pid_start}", plan.run_id)),
            },
            command: std::iter::once(plan.program.as_os_str())
                .chain(plan.command.iter().map(OsString::as_os_str))
                .map(|s| s.to_string_lossy().into_owned())
                .collect(),
            setup: plan.setup.clone(),
            teardown: plan.teardown.clone(),
            cwd: plan.cwd.as_ref().map(|p| p.display().to_string()),
            group: plan.group.clone(),
            deadline_ms: plan.deadline.as_millis() as u64,
            grace_ms: plan.grace.as_millis() as u64,
            teardown_timeout_ms: plan.teardown_timeout.as_millis() as u64,
            exit_code: None,
            reason: None,
            lock_wait_ms: None,
            runtime_ms: None,
            reap_failures: 0,
            keep: plan.keep_run_dir,
        };
        Run {
            plan,
            funnel,
            phase: Phase::Preparing,
            dir: None,
            own_dead: None,
            app_lock: None,
            slot: None,
            cancelled: HashSet::new(),
            record,
            lock_wait: Duration::ZERO,
            lock_wait_since: None,
            command_started: None,
            command_ended: None,
            cgroup: None,
            touched: false,
            queued_noted: false,
            child_pid: None,
        }
    }

    fn execute(mut self) -> i32 {
        match self.prepare() {
            Ok(()) => {}
            Err(Stop::Event(cause)) => return self.end_before_start(cause),
            Err(Stop::Busy(msg)) => {
                output::emit(output::Level::Warn, "busy", &msg, &[]);
                return self.give_up(crate::exit::BUSY, "cancelled", "busy");
            }
            Err(Stop::Fail(e)) => {
                output::error(&e.message);
                return self.give_up(e.exit_code(), "failed", "error");
            }
        }
        // From here on the app is touched: must finish.
        self.phase = Phase::Running;
        let cause = self.supervise();
        self.command_ended = Some(Instant::now());
        let teardown_ok = self.teardown(cause);
        self.finish(cause, teardown_ok, true)
    }

    /// Steps 3–7: claim, lock, reconcile, write `running`.
    fn prepare(&mut self) -> Result<(), Stop> {
        self.check_funnel()?;
        // 3. Claim the run dir.
        let claim = rundir::claim(&self.plan.runs_dir, &self.plan.run_id).map_err(Stop::Fail)?;
        self.dir = Some(claim.dir);
        lifetime::fault_pause("TETHER_FAULT_PAUSE_AFTER_CLAIM");
        if let Some(dead) = claim.dead {
            if dead.meta.app == self.plan.app.as_str() {
                // Reaped under our own app lock in step 5.
                self.own_dead = Some(dead);
            } else {
                self.reap_own_dead_of_other_app(dead)?;
            }
        }
        // The run's cgroup is made while still queued: off the app lock's critical path.
        let cgroup = if std::env::var_os("TETHER_NO_CGROUP").is_some_and(|v| v == "1") {
            Err("TETHER_NO_CGROUP=1".to_string())
        } else {
            let name = self.record.meta.token.clone().unwrap_or_default();
            RunCgroup::create(&name)
        };
        match cgroup {
            Ok(cg) => {
                output::debug("cgroup", &format!("run cgroup {}", cg.path().display()));
                self.record.meta.cgroup = Some(cg.path().display().to_string());
                self.cgroup = Some(cg);
            }
            Err(why) => output::debug(
                "cgroup",
                &format!("no cgroup for this run ({why}); using process group + descendants"),
            ),
        }

        if self.own_dead.is_none() {
            self.prepare_dir(!claim.existed)?;
        }
        self.check_funnel()?;
        // 4. The app lock.
        let t0 = Instant::now();
        self.lock_wait_since = Some(t0);
        let app = self.plan.app.clone();
        let held = self.acquire(&app, true)?;
        self.lock_wait = t0.elapsed();
        self.lock_wait_since = None;
        self.app_lock = Some(held);

        // 5. Reconcile.
        self.reconcile()?;
        if self.own_dead.take().is_some() {
            self.prepare_dir(false)?;
        }
        self.check_funnel()?;

        // 6. A host slot, if slots are configured.
        if let Some(count) = self.plan.slots {
            self.take_slot(count)?;
        }

        // 7. Running: the app is ours.
        self.apply_limits();
        self.prepare_run_as_dirs()?;
        self.record.lock_wait_ms = Some(self.lock_wait.as_millis() as u64);
        self.set_state(State::Running);
        self.touched = true;
        Ok(())
    }

    /// `limits` (SPEC §10, issue 5): cgroup controllers where available, rlimits for nofile and
    /// nproc (set in the child). Each limit that cannot be applied gets one warning.
    fn apply_limits(&self) {
        let l = &self.plan.limits;
        let wants_cgroup = l.memory.is_some() || l.pids.is_some() || l.cpu.is_some();
        if !wants_cgroup {
            return;
        }
        let warnings = match &self.cgroup {
            Some(cg) => cg.apply_limits(l),
            None => [
                ("memory", l.memory.is_some()),
                ("pids", l.pids.is_some()),
                ("cpu", l.cpu.is_some()),
            ]
            .iter()
            .filter(|(_, set)| *set)
            .map(|(name, _)| format!("limits.{name} not applied: this run has no cgroup"))
            .collect(),
        };
        for w in warnings {
            output::warn("limits", &w);
        }
    }

    /// `run_env` dirs under the run dir are created (and, with `run_as`, owned by that user,
    /// like `tmp/`); the run dir becomes traversable (0711) so the user can reach them, while
    /// `run.json` stays owner-only. Setup and teardown get a `tether-tmp/` of their own. All
    /// through the run dir's fd: nothing here follows a symlink.
    fn prepare_run_as_dirs(&self) -> Result<(), Stop> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let base = dir.path();
        let run_dir = dir.dir();
        let fail = |what: &str, p: &Path, e: std::io::Error| Stop::Fail(Error::path(what, p, e));
        let slot = self.slot.as_ref().map(|s| s.label()).unwrap_or_default();
        let base_text = base.display().to_string();
        let vars = RunVars {
            run_dir: &base_text,
            run_id: self.plan.run_id.as_str(),
            app: self.plan.app.as_str(),
            slot: &slot,
        };
        let tmp = run_dir
            .open_dir(rundir::TMP_DIR)
            .map_err(|e| fail("cannot open", &dir.tmp_path(), e))?;
        let mut for_user = vec![tmp];
        for (_, value) in self.plan.env_policy.expanded_run_env(&vars) {
            let p = PathBuf::from(&value);
            let Ok(rel) = p.strip_prefix(&base) else {
                continue;
            };
            if rel.as_os_str().is_empty() {
                continue;
            }
            let mut cur = run_dir.clone();
            for comp in rel.components() {
                let std::path::Component::Normal(name) = comp else {
                    return Err(Stop::Fail(Error::tether(format!(
                        "run_env dir {} is not a plain path below the run dir",
                        p.display()
                    ))));
                };
                match cur.create_dir(name, 0o755) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(fail("cannot create run_env dir", &p, e)),
                }
                cur = cur
                    .open_dir(name)
                    .map_err(|e| fail("cannot open run_env dir", &p, e))?;
            }
            for_user.push(cur);
        }
        if let Some(id) = &self.plan.run_as {
            run_dir
                .chmod(0o711)
                .map_err(|e| fail("cannot chmod run dir", &base, e))?;
            for d in for_user {
                d.chown(id.uid, id.gid).map_err(|e| {
                    Stop::Fail(Error::tether(format!(
                        "cannot chown {} to {}: {e}",
                        d.path().display(),
                        id.user
                    )))
                })?;
            }
            match run_dir.create_dir(rundir::OWN_TMP_DIR, 0o700) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(fail("cannot create", &base.join(rundir::OWN_TMP_DIR), e)),
            }
        }
        Ok(())
    }

    /// Empty a reused dir and create `tmp/`. The `queued` record is written only if the run
    /// has to wait (`note_queued`): an uncontended run goes straight to `running`. A run dir
    /// without a record is safe from janitors while its `run.lock` is held.
    fn prepare_dir(&mut self, fresh: bool) -> Result<(), Stop> {
        let spares = rundir::spares_needed(self.plan.teardown.is_some());
        let Some(dir) = &mut self.dir else {
            return Ok(());
        };
        dir.prepare(fresh)
            .and_then(|()| dir.prepare_spares(spares))
            .map_err(|e| Stop::Fail(Error::path("cannot prepare run dir", &dir.path(), e)))
    }

    /// Make a waiting run visible (`status`, a reaper after a crash) as `queued`, once.
    fn note_queued(&mut self) {
        // A reused dead run's record stays until it is reaped: the reaper takes its teardown
        // command from there.
        if self.queued_noted || self.touched || self.own_dead.is_some() {
            return;
        }
        self.queued_noted = true;
        let spares = rundir::spares_needed(self.plan.teardown.is_some());
        if let Some(dir) = &mut self.dir {
            if let Err(e) = dir.write_record(&self.record) {
                output::warn(
                    "record",
                    &format!("cannot write {}: {e}", dir.record_path().display()),
                );
            }
            // That write used a spare; make it good while we wait.
            let _ = dir.prepare_spares(spares);
        }
    }

    /// Act on funnel events that arrived while we were busy.
    fn check_funnel(&mut self) -> Result<(), Stop> {
        let events = self.funnel.poll_now();
        self.act_on(events)
    }

    fn act_on(&mut self, events: Vec<Event>) -> Result<(), Stop> {
        match decide_batch(self.phase, &events) {
            (Action::TearDown(cause), losers) => {
                announce(cause, self.plan.deadline);
                self.log_ignored(&losers);
                Err(Stop::Event(cause))
            }
            _ => Ok(()),
        }
    }

    /// Take the lock of `app`, waiting visibly (and interruptibly) while it is busy.
    fn acquire(&mut self, app: &Domain, is_our_app: bool) -> Result<HeldLock, Stop> {
        let app = app.clone();
        let lock_dir = self.plan.lock_dir.clone();
        let name = app_lock_name(&app);
        let started = Instant::now();
        let mut announced = false;
        loop {
            let file = match lock::try_acquire(&lock_dir, &name) {
                Ok(TryLock::Held(h)) => {
                    if announced {
                        announce_acquired(&app, started);
                    }
                    return Ok(h);
                }
                Ok(TryLock::Busy(file)) => file,
                Err(e) => return Err(Stop::Fail(Error::tether(format!("app lock: {e}")))),
            };
            let holder = describe_holder(&file);
            if is_our_app && self.plan.on_busy == OnBusy::Fail {
                return Err(Stop::Busy(format!(
                    "app lock {app}: held by {holder} — --on-busy fail, giving up"
                )));
            }
            let cancel_older = is_our_app && self.plan.on_busy == OnBusy::CancelOlder;
            if is_our_app {
                self.note_queued();
            }
            announce_waiting(&app, &holder);
            announced = true;
            if cancel_older {
                self.cancel_holder_if_same_group(&file);
            }
            let reader = file.try_clone().ok();
            let waiter = Waiter::start(file)
                .map_err(|e| Stop::Fail(Error::tether(format!("cannot wait for lock: {e}"))))?;
            let mut next_progress = Instant::now() + self.plan.wait_progress;
            let give_up = self.plan.lock_timeout.map(|t| started + t);
            loop {
                let mut timeout = lifetime::until(next_progress);
                if let Some(g) = give_up {
                    timeout = timeout.min(lifetime::until(g));
                }
                if cancel_older {
                    // The holder may change while we wait (another queued run of the group).
                    timeout = timeout.min(CANCEL_RECHECK);
                    if let Some(r) = &reader {
                        self.cancel_holder_if_same_group(r);
                    }
                }
                let events = self.funnel.wait(Some(timeout), Some(waiter.raw_fd()));
                if events.contains(&Event::Ready) {
                    break;
                }
                self.act_on(events)?;
                if give_up.is_some_and(|g| Instant::now() >= g) {
                    return Err(Stop::Busy(format!(
                        "app lock {app}: still held after --lock-timeout {} — giving up",
                        duration::canonical(self.plan.lock_timeout.unwrap_or_default())
                    )));
                }
                if Instant::now() >= next_progress {
                    if let Some(r) = &reader {
                        announce_waiting(&app, &describe_holder(r));
                    }
                    next_progress = Instant::now() + self.plan.wait_progress;
                }
            }
            let file = waiter
                .finish()
                .map_err(|e| Stop::Fail(Error::tether(format!("app lock: {e}"))))?;
            if let Some(held) = lock::confirm(file, &lock_dir, &name) {
                announce_acquired(&app, started);
                return Ok(held);
            }
            // The janitor unlinked the file we waited on: start over on the new inode.
            output::debug("lock", "lockfile was replaced while waiting; retrying");
        }
    }

    /// Step 6: the lowest free slot below `count`, waiting (visibly, interruptibly) while all
    /// are busy. Free slots are found by polling: a flock cannot wait for "any of N".
    fn take_slot(&mut self, count: u32) -> Result<(), Stop> {
        let mut next_progress = Instant::now();
        loop {
            match crate::state::slots::try_take(&self.plan.lock_dir, count) {
                Ok(Some(slot)) => {
                    output::debug("slot", &format!("took slot {}", slot.label()));
                    let meta = &self.record.meta;
                    let _ = record::write_meta(slot.lock.file(), meta);
                    self.slot = Some(slot);
                    return Ok(());
                }
                Ok(None) => {}
                Err(e) => return Err(Stop::Fail(Error::tether(format!("slot lock: {e}")))),
            }
            self.note_queued();
            if Instant::now() >= next_progress {
                output::emit(
                    output::Level::Info,
                    "slots-busy",
                    &format!("all {count} slots busy — waiting"),
                    &[("slots", count.into())],
                );
                next_progress = Instant::now() + self.plan.wait_progress;
            }
            let events = self.funnel.wait(Some(SLOT_POLL), None);
            self.act_on(events)?;
        }
    }

    /// `--on-busy cancel-older` (SPEC §3.6): SIGTERM the holder when its record has our group
    /// key and its pid still is the process that wrote the record (start time matches). A
    /// holder of another group, or one we cannot identify, is never signalled.
    fn cancel_holder_if_same_group(&mut self, file: &std::fs::File) {
        let Some(group) = self.plan.group.clone() else {
            return;
        };
        let Some(meta) = record::read_meta(file) else {
            return;
        };
        if meta.run_id == self.plan.run_id.as_str()
            || self.cancelled.contains(&meta.run_id)
            || meta.started_at > self.record.meta.started_at
        {
            return;
        }
        // Only a run of our runs dir, whose own record (not the world-readable lockfile) says
        // it is of our group, and whose pid is the lock's holder in the kernel's lock table
        // and still the process that wrote the record (start time).
        let Ok(id) = RunId::parse(&meta.run_id) else {
            return;
        };
        if Path::new(&meta.run_dir) != rundir::path_of(&self.plan.runs_dir, &id) {
            return;
        }
        let Some(rec) = rundir::open_trusted(&self.plan.runs_dir, id.as_str())
            .ok()
            .and_then(|d| record::read_record(&d).ok())
        else {
            return;
        };
        if rec.meta.run_id != meta.run_id || rec.group.as_deref() != Some(group.as_str()) {
            return;
        }
        if crate::sys::proc_locks::holder_of(file) != Some(meta.pid)
            || crate::sys::procfs::start_time(meta.pid) != Some(meta.pid_start)
        {
            return;
        }
        output::emit(
            output::Level::Info,
            "cancelling",
            &format!("cancelling older run {} of group {group}", meta.run_id),
            &[
                ("run_id", meta.run_id.clone().into()),
                ("group", group.clone().into()),
            ],
        );
        if let Err(e) = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(meta.pid),
            nix::sys::signal::Signal::SIGTERM,
        ) {
            output::warn(
                "cancelling",
                &format!("cannot signal run {} (pid {}): {e}", meta.run_id, meta.pid),
            );
        }
        self.cancelled.insert(meta.run_id);
    }

    fn reaper(&mut self) -> Reaper<'_> {
        Reaper {
            funnel: &mut self.funnel,
            runs: Some(self.plan.runs_dir.clone()),
            cgroup: self.cgroup.clone(),
            fallback_teardown: self.plan.teardown.clone(),
            teardown_timeout: self.plan.teardown_timeout,
            grace: self.plan.grace,
            deferred: Vec::new(),
            reaped: HashSet::new(),
            index: None,
        }
    }

    /// Step 5: reap dead unclean runs of our app (ours first, when we reuse a dead run's id).
    fn reconcile(&mut self) -> Result<(), Stop> {
        let Some(app_lock) = self.app_lock.take() else {
            return Ok(());
        };
        let own_dir = self.dir.as_ref().map(|d| d.dir().clone());
        // Re-read under the app lock: another reaper may have settled it since our claim.
        let own_dead = match (&self.own_dead, &self.dir) {
            (Some(d), Some(dir)) => dir
                .read_record()
                .ok()
                .filter(|r| r.meta.state != State::Clean && r.meta.run_id == d.meta.run_id),
            _ => None,
        };
        let app = self.plan.app.clone();
        let own_id = self.plan.run_id.to_string();
        let mut reaper = self.reaper();
        let mut result = Ok(());
        if let Some(dead) = own_dead {
            result = reaper.reap(DeadRun {
                meta: dead.meta.clone(),
                record: Some(dead),
                dir: None,
                record_dir: own_dir,
                remove_dir: false,
            });
        }
        if result.is_ok() {
            result = reaper.reconcile(&app, &app_lock, Some(&own_id)).map(|_| ());
        }
        let deferred = std::mem::take(&mut reaper.deferred);
        drop(reaper);
        self.app_lock = Some(app_lock);
        if let Err(e) = result {
            return Err(Stop::Fail(self.reap_failed(e)));
        }
        self.act_on(deferred)
    }

    /// §3.4: our run id belonged to a dead run of another app. Reap it under that app's lock.
    fn reap_own_dead_of_other_app(&mut self, dead: RunRecord) -> Result<(), Stop> {
        let other = Domain::parse(&dead.meta.app)
            .map_err(|e| Stop::Fail(Error::tether(format!("dead run record: {e}"))))?;
        let held = self.acquire(&other, false)?;
        let own_dir = self.dir.as_ref().map(|d| d.dir().clone());
        let mut reaper = self.reaper();
        let mut result = reaper.reap(DeadRun {
            meta: dead.meta.clone(),
            record: Some(dead),
            dir: None,
            record_dir: own_dir,
            remove_dir: false,
        });
        if result.is_ok() {
            result = reaper.reconcile(&other, &held, None).map(|_| ());
        }
        let deferred = std::mem::take(&mut reaper.deferred);
        drop(reaper);
        held.release();
        if let Err(e) = result {
            return Err(Stop::Fail(self.reap_failed(e)));
        }
        self.prepare_dir(false)?;
        self.act_on(deferred)
    }

    /// A dead run could not be reaped: the run refuses to start (D7), and says how to give up
    /// on the dead run if its teardown can never succeed.
    fn reap_failed(&self, e: ReapFailed) -> Error {
        let hint = e
            .run_id
            .as_deref()
            .map(|id| {
                format!(
                    "; if its teardown can never succeed, give up on it with: {}",
                    crate::reap::forget::hint(
                        Some(self.plan.lock_dir.path()),
                        Some(self.plan.runs_dir.path()),
                        id
                    )
                )
            })
            .unwrap_or_default();
        Error::tether(format!("cannot start: {}{hint}", e.message))
    }

    /// Lock metadata only (the record is about to be deleted with its dir).
    fn set_meta_state(&mut self, state: State) {
        self.record.meta.state = state;
        if let Some(lock) = &self.app_lock {
            if let Err(e) = record::write_meta(lock.file(), &self.record.meta) {
                output::warn(
                    "record",
                    &format!("cannot write lock metadata {}: {e}", lock.path().display()),
                );
            }
        }
    }

    fn set_state(&mut self, state: State) {
        self.record.meta.state = state;
        write_state(&mut self.dir, self.app_lock.as_ref(), &self.record);
    }

    /// The run's environment (SPEC §6.1). `for_command` applies `env.allow` and, under
    /// `run_as`, the target user's HOME/USER/LOGNAME; setup and teardown get tether's side.
    fn run_env(&self, for_command: bool) -> Vec<(OsString, OsString)> {
        let dir = rundir::path_of(&self.plan.runs_dir, &self.plan.run_id);
        let dir_text = dir.display().to_string();
        let slot = self.slot.as_ref().map(|s| s.label()).unwrap_or_default();
        let vars = RunVars {
            run_dir: &dir_text,
            run_id: self.plan.run_id.as_str(),
            app: self.plan.app.as_str(),
            slot: &slot,
        };
        let mut env = self.plan.env_policy.build(for_command, &vars);
        environment::set(&mut env, "TETHER_APP", self.plan.app.as_str().into());
        environment::set(&mut env, "TETHER_RUN_ID", self.plan.run_id.as_str().into());
        environment::set(&mut env, "TETHER_RUN_DIR", dir.clone().into_os_string());
        // Under run_as the command's tmp/ is the run_as user's: setup and teardown (tether's
        // side, root) get one the command cannot plant symlinks in.
        let tmp = if !for_command && self.plan.run_as.is_some() {
            rundir::OWN_TMP_DIR
        } else {
            rundir::TMP_DIR
        };
        environment::set(&mut env, "TMPDIR", dir.join(tmp).into_os_string());
        if self.slot.is_some() {
            environment::set(&mut env, "TETHER_SLOT", slot.clone().into());
        }
        if let (true, Some(id)) = (for_command, &self.plan.run_as) {
            environment::set(&mut env, "HOME", id.home.clone().into_os_string());
            environment::set(&mut env, "USER", id.user.clone().into());
            environment::set(&mut env, "LOGNAME", id.user.clone().into());
        }
        env
    }

    /// Steps 8–9: setup, then the command; wait for it or for the funnel.
    fn supervise(&mut self) -> Cause {
        self.command_started = Some(Instant::now());
        let token = self.record.meta.token.clone().unwrap_or_default();
        if let Some(setup) = self.plan.setup.clone() {
            // Setup is tether's side: the invoking user, the full environment.
            let mut env = self.run_env(false);
            environment::set(&mut env, "TETHER_RUN_TOKEN", token.clone().into());
            let sh = PathBuf::from("/bin/sh");
            let args = [OsString::from("-c"), OsString::from(setup)];
            match self.supervise_one(&sh, &args, &env, false) {
                Cause::Exited(0) => {}
                Cause::Exited(code) => {
                    output::warn(
                        "setup",
                        &format!(
                            "setup command failed with status {code}; not running the command"
                        ),
                    );
                    return Cause::Exited(code);
                }
                other => return other,
            }
        }
        let mut env = self.run_env(true);
        environment::set(&mut env, "TETHER_RUN_TOKEN", token.into());
        let program = self.plan.program.clone();
        let args = self.plan.command.clone();
        self.supervise_one(&program, &args, &env, true)
    }

    fn supervise_one(
        &mut self,
        program: &Path,
        args: &[OsString],
        env: &[(OsString, OsString)],
        is_command: bool,
    ) -> Cause {
        let cgroup_dir = self.cgroup.as_ref().and_then(|c| c.dir_fd().ok());
        let rlimits = if is_command {
            rlimits_of(&self.plan.limits)
        } else {
            Vec::new()
        };
        let identity = if is_command {
            self.plan.run_as.as_ref()
        } else {
            None
        };
        let spec = SpawnSpec {
            program,
            args,
            env,
            cwd: None,
            cgroup_dir: cgroup_dir.as_ref().map(std::os::fd::AsRawFd::as_raw_fd),
            core_pid: std::process::id() as i32,
            identity,
            rlimits: &rlimits,
        };
        let mut spawned = spawn::spawn(&spec);
        if matches!(spawned, Err(spawn::SpawnError::Start(_))) && spec.cgroup_dir.is_some() {
            // Joining the cgroup failed: run without it; teardown falls back to the process
            // group and the core's descendants.
            output::debug("cgroup", "cannot join the run's cgroup; running without it");
            if let Some(cg) = self.cgroup.take() {
                let _ = cg.remove();
            }
            self.record.meta.cgroup = None;
            let spec = SpawnSpec {
                cgroup_dir: None,
                ..spec
            };
            spawned = spawn::spawn(&spec);
        }
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let code = match &e {
                    spawn::SpawnError::Exec(err) if err.kind() == std::io::ErrorKind::NotFound => {
                        crate::exit::NOT_FOUND
                    }
                    spawn::SpawnError::Exec(_) => crate::exit::NOT_EXECUTABLE,
                    spawn::SpawnError::Start(_) => crate::exit::TETHER_FAILURE,
                };
                output::error(&format!("cannot start {}: {e}", program.display()));
                return Cause::Exited(code);
            }
        };
        drop(cgroup_dir);
        let pid = child.pid;
        self.child_pid = Some(pid);
        output::debug(
            "spawn",
            &format!("started {} as pid {pid}", program.display()),
        );
        loop {
            for (p, code) in lifetime::reap_children() {
                if p == pid {
                    return Cause::Exited(code);
                }
            }
            let events = self.funnel.wait(None, None);
            if let (Action::TearDown(cause), losers) = decide_batch(self.phase, &events) {
                announce(cause, self.plan.deadline);
                self.log_ignored(&losers);
                return cause;
            }
        }
    }

    /// Step 10 / SPEC §5: the one teardown. Returns whether the teardown command succeeded.
    fn teardown(&mut self, cause: Cause) -> bool {
        self.phase = Phase::TearingDown;
        self.record.exit_code = Some(cause.exit_code());
        self.record.reason = Some(cause.reason().into());
        self.set_state(State::TearingDown);

        // Kill the whole tree before anything else (nothing may sit in the run dir).
        // With a cgroup every process of the run is in it (joining is mandatory), so no scan
        // of /proc is needed; without one, the core's descendants are the run.
        let members = Members {
            pgid: self.child_pid,
            descendants_of: match self.cgroup {
                Some(_) => None,
                None => Some(std::process::id() as i32),
            },
            cgroup: self.cgroup.clone(),
            ..Members::default()
        };
        let killed = tree::terminate(&members, self.plan.grace, &mut self.funnel);
        self.log_ignored(&killed.events);
        if killed.killed_after_grace > 0 {
            output::debug(
                "killed",
                &format!("still alive after grace: {:?}", killed.late),
            );
            output::info(
                "killed",
                &format!(
                    "{} process(es) still alive after {} grace — killed",
                    killed.killed_after_grace,
                    duration::canonical(self.plan.grace)
                ),
            );
        }
        if !killed.survivors.is_empty() {
            output::warn(
                "killed",
                &format!("processes survived SIGKILL: {:?}", killed.survivors),
            );
        }

        self.record.runtime_ms = Some(self.runtime().as_millis() as u64);
        let outcome = self.plan.teardown.clone().map(|script| {
            let mut env = self.run_env(false);
            env.push(("TETHER_REASON".into(), cause.reason().into()));
            env.push((
                "TETHER_EXIT_CODE".into(),
                cause.exit_code().to_string().into(),
            ));
            // Carried by what the teardown starts, so a reaper finds its leftovers by token
            // even without a cgroup.
            if let Some(token) = &self.record.meta.token {
                env.push(("TETHER_RUN_TOKEN".into(), token.clone().into()));
            }
            let mut events = Vec::new();
            let (dir, app_lock, record) = (&mut self.dir, self.app_lock.as_ref(), &mut self.record);
            // "Teardown done" is recorded the moment the command exits 0, before its leftovers
            // are killed: a core killed after this point leaves a `clean` record, which no
            // reaper runs the teardown for again (DECISIONS D25).
            let mut on_exit = |o: &shell::Outcome| {
                if o.ok() {
                    record.meta.state = State::Clean;
                    write_state(dir, app_lock, record);
                }
            };
            let o = shell::run_shell(
                &script,
                &env,
                self.plan.cwd.as_deref().filter(|p| p.is_dir()),
                self.cgroup.as_ref(),
                self.plan.teardown_timeout,
                &mut self.funnel,
                &mut events,
                &mut on_exit,
            );
            self.log_ignored(&events);
            o
        });
        lifetime::fault_pause("TETHER_FAULT_PAUSE_AFTER_TEARDOWN");
        let teardown_ok = outcome.as_ref().is_none_or(shell::Outcome::ok);
        if let Some(o) = outcome.as_ref().filter(|o| !o.ok()) {
            output::error(&format!(
                "teardown command {}; run dir and lock state kept for the janitor",
                o.describe()
            ));
        }
        let mut retired = None;
        if teardown_ok {
            if outcome.is_none() {
                if self.plan.keep_run_dir {
                    self.set_state(State::Clean);
                } else {
                    // No teardown command, so nothing that could run twice: the record goes
                    // with its dir, and only the lock metadata needs the verdict.
                    self.set_meta_state(State::Clean);
                }
            }
            if let Some(dir) = self.dir.take() {
                if self.plan.keep_run_dir {
                    output::info("kept", &format!("run dir kept: {}", dir.path().display()));
                    dir.release();
                } else {
                    let path = dir.path();
                    match dir.retire() {
                        Ok(r) => retired = Some(r),
                        Err(e) => output::warn(
                            "cleanup",
                            &format!("cannot remove run dir {}: {e}", path.display()),
                        ),
                    }
                }
            }
        } else {
            // Record the verdict but stay `tearing-down`: the next holder or janitor reaps.
            self.set_state(State::TearingDown);
            if let Some(dir) = self.dir.take() {
                dir.release();
            }
        }
        if let Some(slot) = self.slot.take() {
            slot.lock.release();
        }
        if let Some(lock) = self.app_lock.take() {
            lock.release();
        }
        // Housekeeping after the release, so the next run of the app is not kept waiting:
        // the retired run dir's contents and the (empty) cgroup.
        if let Some(retired) = retired {
            let path = retired.path();
            if let Err(e) = retired.remove() {
                output::warn("cleanup", &format!("cannot remove {}: {e}", path.display()));
            }
        }
        if let Some(cg) = &self.cgroup {
            if let Err(e) = cg.remove() {
                output::debug(
                    "cgroup",
                    &format!("cannot remove {}: {e}", cg.path().display()),
                );
            }
        }
        teardown_ok
    }

    fn log_ignored(&self, events: &[Event]) {
        for ev in events {
            let what = match ev {
                Event::Signal(s) => format!("received {} during teardown — ignored", s.name()),
                Event::Deadline => "deadline reached during teardown — ignored".into(),
                Event::ParentDied => "parent died during teardown — ignored".into(),
                Event::AgentGone => "agent gone during teardown — ignored".into(),
                _ => continue,
            };
            output::info("ignored", &what);
        }
    }

    fn runtime(&self) -> Duration {
        match (self.command_started, self.command_ended) {
            (Some(a), Some(b)) => b.duration_since(a),
            (Some(a), None) => a.elapsed(),
            _ => Duration::ZERO,
        }
    }

    /// Time spent waiting for the app lock, including a wait that was given up.
    fn lock_wait(&self) -> Duration {
        match self.lock_wait_since {
            Some(t) => t.elapsed(),
            None => self.lock_wait,
        }
    }

    /// `teardown_ran`: the teardown step ran (false when the app was never touched).
    fn finish(&self, cause: Cause, teardown_ok: bool, teardown_ran: bool) -> i32 {
        let exit = cause.final_exit_code(teardown_ok);
        let summary = Summary {
            run_id: self.plan.run_id.to_string(),
            app: self.plan.app.to_string(),
            result: cause.result(teardown_ok).into(),
            exit,
            lock_wait_ms: self.lock_wait().as_millis() as u64,
            runtime_ms: self.runtime().as_millis() as u64,
            teardown: match (&self.plan.teardown, teardown_ran, teardown_ok) {
                (None, _, _) | (_, false, _) => "none",
                (Some(_), true, true) => "ok",
                (Some(_), true, false) => "failed",
            }
            .into(),
            reason: cause.reason().into(),
            ci: self.plan.ci.clone(),
        };
        summary.publish(self.plan.summary_json.as_deref());
        // After teardown and after the exit code is fixed: reporting cannot change either.
        if let Some(r) = &self.plan.report {
            crate::out::report::publish(r, &summary);
        }
        exit
    }

    /// A funnel event before the app was touched: nothing to tear down but our own claim.
    fn end_before_start(mut self, cause: Cause) -> i32 {
        self.phase = Phase::TearingDown;
        self.release_claim();
        self.finish(cause, true, false)
    }

    /// Busy or failed before the app was touched: leave nothing behind.
    fn give_up(mut self, code: i32, result: &str, reason: &str) -> i32 {
        self.release_claim();
        let summary = Summary {
            run_id: self.plan.run_id.to_string(),
            app: self.plan.app.to_string(),
            result: result.into(),
            exit: code,
            lock_wait_ms: self.lock_wait().as_millis() as u64,
            runtime_ms: 0,
            teardown: "none".into(),
            reason: reason.into(),
            ci: self.plan.ci.clone(),
        };
        summary.publish(self.plan.summary_json.as_deref());
        code
    }

    fn release_claim(&mut self) {
        if let Some(cg) = self.cgroup.take() {
            let _ = cg.remove();
        }
        if let Some(slot) = self.slot.take() {
            slot.lock.release();
        }
        if let Some(lock) = self.app_lock.take() {
            lock.release();
        }
        if let Some(dir) = self.dir.take() {
            if self.own_dead.is_some() {
                // The dead run's record must survive for the next reaper.
                dir.release();
            } else if let Err(e) = dir.remove() {
                output::warn("cleanup", &format!("cannot remove run dir: {e}"));
            }
        }
    }
}

/// Write the record (into the run dir) and the lock metadata (into the app lockfile).
fn write_state(dir: &mut Option<RunDir>, app_lock: Option<&HeldLock>, record: &RunRecord) {
    if let Some(dir) = dir {
        if let Err(e) = dir.write_record(record) {
            output::warn(
                "record",
                &format!("cannot write {}: {e}", dir.record_path().display()),
            );
        }
    }
    if let Some(lock) = app_lock {
        if let Err(e) = record::write_meta(lock.file(), &record.meta) {
            output::warn(
                "record",
                &format!("cannot write lock metadata {}: {e}", lock.path().display()),
            );
        }
    }
}

/// `limits.nofile` / `limits.nproc` as setrlimit pairs for the command.
fn rlimits_of(limits: &crate::config::Limits) -> Vec<(libc::__rlimit_resource_t, u64)> {
    let mut out = Vec::new();
    if let Some(n) = limits.nofile {
        out.push((libc::RLIMIT_NOFILE, n));
    }
    if let Some(n) = limits.nproc {
        out.push((libc::RLIMIT_NPROC, n));
    }
    out
}

/// The funnel's line for the cause (SPEC §7).
fn announce(cause: Cause, deadline: Duration) {
    let (event, msg) = match cause {
        Cause::Signal(s) => ("received", format!("received {} — tearing down", s.name())),
        Cause::Deadline => (
            "deadline",
            format!(
                "deadline {} reached — tearing down",
                lifetime::deadline_text(deadline)
            ),
        ),
        Cause::ParentDied => ("parent-died", "parent died — tearing down".to_string()),
        Cause::AgentGone => (
            "agent-gone",
            "agent gone (stdout/stderr has no reader) — tearing down".to_string(),
        ),
        Cause::Exited(_) => return,
    };
    output::info(event, &msg);
}

fn describe_holder(file: &std::fs::File) -> String {
    match record::read_meta(file) {
        Some(m) => {
            let age = Duration::from_secs(record::unix_now().saturating_sub(m.started_at));
            format!("run {} (pid {}, {})", m.run_id, m.pid, human(age))
        }
        None => match crate::sys::proc_locks::holder_of(file) {
            Some(pid) => format!("an unknown run (pid {pid}, age unknown)"),
            None => "an unknown run (pid unknown, age unknown)".into(),
        },
    }
}

fn announce_acquired(app: &Domain, since: Instant) {
    output::emit(
        output::Level::Info,
        "acquired",
        &format!("app lock {app}: acquired after {}", human(since.elapsed())),
        &[("app", app.as_str().into())],
    );
}

fn announce_waiting(app: &Domain, holder: &str) {
    output::emit(
        output::Level::Info,
        "waiting",
        &format!("app lock {app}: held by {holder} — waiting"),
        &[("app", app.as_str().into())],
    );
}
