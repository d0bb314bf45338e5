//! Running a teardown (or setup) shell command under a bound (CLI-CONTRACT §6 step 3, PROTOCOL §6).
//!
//! The command runs by `sh -c` in its own process group, with PDEATHSIG=SIGKILL towards the
//! core, in the run's cgroup when there is one (emptied of the command's processes first). It
//! gets `--teardown-timeout` (`0`: no bound); when that passes, its whole tree is killed
//! (TERM, a short grace, KILL). Funnel events that arrive meanwhile stay queued in the
//! supervisor; the caller logs them (live teardown) or acts on them afterwards (reconcile): a
//! teardown is never interrupted half-way by a second signal.

use crate::sys::cgroup::RunCgroup;
use crate::sys::signals::until;
use crate::sys::spawn::{self, SpawnSpec};
use crate::sys::supervisor::Supervisor;
use crate::sys::tree::{self, Members};
use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

/// Grace given to a teardown command's tree after its timeout, before KILL.
const TIMEOUT_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Exited(i32),
    TimedOut,
    SpawnFailed(String),
}

impl Outcome {
    pub(crate) fn ok(&self) -> bool {
        *self == Outcome::Exited(0)
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Outcome::Exited(code) => format!("exited with status {code}"),
            Outcome::TimedOut => "timed out and was killed".into(),
            Outcome::SpawnFailed(e) => format!("could not start: {e}"),
        }
    }
}

/// Run `sh -c <script>` with exactly `env`, bounded by `timeout` (zero: no bound), in
/// `cgroup` when given (the run's own: whoever reaps a run that dies meanwhile kills what its
/// teardown left there too).
///
/// `on_exit` is called the moment the command's status is known — before its leftovers are
/// killed (which can take the whole grace period) — so the caller can record "teardown done"
/// while nothing can cut it short yet: a reaper that finds the record afterwards must not run
/// the teardown a second time (exactly once, PROTOCOL.md).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_shell(
    script: &str,
    env: &[(OsString, OsString)],
    cwd: Option<&Path>,
    cgroup: Option<&RunCgroup>,
    timeout: Duration,
    sup: &mut Supervisor,
    on_exit: &mut dyn FnMut(&Outcome),
) -> Outcome {
    let sh = Path::new("/bin/sh");
    let args = [OsString::from("-c"), OsString::from(script)];
    let cgroup_fd = cgroup.and_then(|c| c.dir_fd().ok());
    let spec = SpawnSpec {
        program: sh,
        argv0: None,
        args: &args,
        env,
        cwd,
        cgroup_dir: cgroup_fd.as_ref().map(std::os::fd::AsRawFd::as_raw_fd),
        core_pid: std::process::id() as i32,
        identity: None,
        rlimits: &[],
    };
    let mut spawned = sup.spawn(&spec);
    if matches!(spawned, Err(spawn::SpawnError::Start(_))) && spec.cgroup_dir.is_some() {
        // The cgroup cannot be joined (gone, or refused): run outside it.
        spawned = sup.spawn(&SpawnSpec {
            cgroup_dir: None,
            ..spec
        });
    }
    drop(cgroup_fd);
    let child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let o = Outcome::SpawnFailed(e.to_string());
            on_exit(&o);
            return o;
        }
    };
    let end = (!timeout.is_zero()).then(|| Instant::now() + timeout);
    let status = loop {
        if let Some(code) = sup.exit_status(child) {
            break Some(code);
        }
        if end.is_some_and(|e| Instant::now() >= e) {
            break None;
        }
        // Funnel events stay queued: a teardown is never cut short by a second signal.
        sup.pause_for(end.map(until));
    };
    let outcome = match status {
        Some(code) => Outcome::Exited(code),
        None => Outcome::TimedOut,
    };
    on_exit(&outcome);
    // Whatever the teardown left behind (a daemon it started, or all of it on timeout) goes.
    let members = Members {
        pgid: Some(child.pgid()),
        descendants_of: Some(std::process::id() as i32),
        cgroup: cgroup.cloned(),
        ..Members::default()
    };
    tree::terminate(&members, TIMEOUT_GRACE, sup);
    outcome
}
