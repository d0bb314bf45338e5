//! Step 2 of a run (CLI-CONTRACT §5): resolve and validate everything — config, domain, run id,
//! command, dirs — without creating anything (ripgrep's `hiargs` idea: one pure value the rest
//! of the run reads). Any error here is exit 125 (126/127 for the command), nothing created,
//! locked or started.

use super::RunArgs;
use crate::config::env::EnvPolicy;
use crate::config::settings::Settings;
use crate::config::{Config, Limits, OnBusy, QueueOrder, Report};
use crate::error::{Error, Failure, Result};
use crate::ident::ci_env::{self, CiInfo};
use crate::ident::identity::Identity;
use crate::ident::names::{Domain, RunId};
use crate::state::dirs::{self, Chosen};
use crate::state::lock::app_lock_name;
use crate::state::record;
use crate::sys::resolve::{self, Resolved};
use crate::sys::safe_fs::{kind, Dir, Kind};
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// What the run will do, resolved and validated. Nothing exists yet.
pub(crate) struct Spec {
    pub(crate) app: Domain,
    pub(crate) run_id: RunId,
    pub(crate) deadline: Duration,
    pub(crate) grace: Duration,
    pub(crate) lock_timeout: Option<Duration>,
    pub(crate) on_busy: OnBusy,
    pub(crate) queue_order: QueueOrder,
    pub(crate) max_queue: Option<u32>,
    pub(crate) group: Option<String>,
    pub(crate) setup: Option<String>,
    pub(crate) teardown: Option<String>,
    pub(crate) teardown_timeout: Duration,
    pub(crate) keep_run_dir: bool,
    pub(crate) slots: Option<u32>,
    pub(crate) env_policy: EnvPolicy,
    pub(crate) run_as: Option<Identity>,
    pub(crate) limits: Limits,
    pub(crate) report: Option<Report>,
    pub(crate) summary_json: Option<PathBuf>,
    /// The command's executable, resolved in `PATH` (what is exec'd).
    pub(crate) program: PathBuf,
    /// The command as typed (`argv`, from `argv[0]` on): what the command sees and `ps` shows.
    pub(crate) argv: Vec<OsString>,
    pub(crate) ci: Option<CiInfo>,
    pub(crate) wait_progress: Duration,
    pub(crate) cwd: Option<PathBuf>,
    /// The cluster whose lock the run also takes (issue 16); `None`: this host only.
    pub(crate) cluster: Option<crate::config::cluster::ClusterTarget>,
}

/// The spec and the state dirs it will use: checked, not yet created.
pub(crate) struct Plan {
    pub(crate) spec: Spec,
    dirs: PlannedDirs,
}

struct PlannedDirs {
    lock: Chosen,
    runs: Chosen,
    runs_mode: u32,
}

/// The state dirs, open (and created if they were missing).
pub(crate) struct OpenDirs {
    pub(crate) lock: Dir,
    pub(crate) runs: Dir,
}

impl Plan {
    pub(crate) fn resolve(args: RunArgs, cfg: &Config) -> Result<Plan> {
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
        let run_id = RunId::parse(&run_id_text).map_err(|e| match args.run_id_from_env {
            true => Error::tether(format!("TETHER_RUN_ID: {e}")),
            false => Error::tether(e),
        })?;
        let lock_place = settings.lock_dir(args.places.lock_dir);
        let runs_place = settings.runs_dir(args.places.runs_dir);
        let run_as = match &cfg.run_as {
            Some(ra) => Some(crate::ident::identity::resolve(ra)?),
            None => None,
        };
        let Some(typed) = args.command.first() else {
            return Err(Error::tether("missing command after `--`"));
        };
        let path_var = std::env::var_os("PATH");
        let program = match resolve::resolve(typed, path_var.as_ref()) {
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
        let lock = dirs::choose("lock dir", &lock_place, 0o755)?;
        let runs = dirs::choose("runs dir", &runs_place, runs_mode)?;
        if let Some(existing) = lock.existing_dir() {
            check_lockfile_place(existing, &app_lock_name(&app))?;
        }
        let cluster = args
            .cluster
            .target(cfg)?
            .map(|t| bound_connect(t, args.lock_timeout));
        let queue_order = settings.queue_order(args.queue_order);
        let group = args
            .group
            .or_else(|| ci.as_ref().and_then(CiInfo::default_group));
        let spec = Spec {
            app,
            run_id,
            deadline: settings.deadline(args.deadline),
            grace: settings.grace(args.grace),
            lock_timeout: args.lock_timeout,
            on_busy: settings.on_busy(args.on_busy),
            queue_order,
            max_queue: settings.max_queue(args.max_queue),
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
            argv: args.command,
            ci,
            wait_progress: args.wait_progress_interval.max(Duration::from_millis(100)),
            cwd: std::env::current_dir().ok(),
            cluster,
        };
        Ok(Plan {
            spec,
            dirs: PlannedDirs {
                lock,
                runs,
                runs_mode,
            },
        })
    }

    /// Split into the spec and the state dirs, created if they were missing and opened.
    pub(crate) fn open(self) -> (Spec, Result<OpenDirs>) {
        let Plan { spec, dirs } = self;
        let opened = dirs.open(spec.run_as.as_ref());
        (spec, opened)
    }
}

impl PlannedDirs {
    fn open(self, run_as: Option<&Identity>) -> Result<OpenDirs> {
        let lock = self.lock.open()?;
        let runs = self.runs.open()?;
        if let Some(id) = run_as {
            runs.check_reachable_by(&id.user, id.uid, &id.groups)?;
            runs.dir
                .chmod(self.runs_mode)
                .map_err(|e| Error::path("cannot chmod runs dir", runs.dir.path(), e))?;
        }
        dirs::check_writable("lock dir", &lock.dir)?;
        dirs::check_writable("runs dir", &runs.dir)?;
        Ok(OpenDirs {
            lock: lock.dir,
            runs: runs.dir,
        })
    }
}

/// Refuse a symlink, directory or other non-file where the app lockfile goes (before anything
/// is created: the open would refuse it too, but later).
fn check_lockfile_place(lock_dir: &Dir, name: &str) -> Result<()> {
    let Ok(st) = lock_dir.stat_at(name) else {
        return Ok(());
    };
    let what = match kind(&st) {
        Kind::File => return Ok(()),
        Kind::Symlink => "a symlink",
        Kind::Dir => "a directory",
        Kind::Other => "not a regular file",
    };
    Err(Error::tether(format!(
        "lockfile {} is {what}; refusing to use it",
        lock_dir.join(name).display()
    )))
}

/// The shortest connect timeout tether gives the cluster's server: a connection that works
/// takes milliseconds, and `--lock-timeout 0` means "do not wait for a holder", not "the
/// server must answer at once".
const CLUSTER_CONNECT_FLOOR: Duration = Duration::from_secs(1);

/// Issue 16 §6: with `--lock-timeout`, an unreachable server is given up within it (not the
/// config's longer `connect_timeout`), but never under [`CLUSTER_CONNECT_FLOOR`].
fn bound_connect(
    mut target: crate::config::cluster::ClusterTarget,
    lock_timeout: Option<Duration>,
) -> crate::config::cluster::ClusterTarget {
    if let Some(limit) = lock_timeout {
        let configured = target
            .connect_timeout
            .unwrap_or(crate::config::settings::CLUSTER_CONNECT_TIMEOUT);
        target.connect_timeout = Some(configured.min(limit.max(CLUSTER_CONNECT_FLOOR)));
    }
    target
}
