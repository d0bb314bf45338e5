//! Running a teardown (or setup) shell command under a bound (SPEC §5 step 3, §4.4).
//!
//! The command runs by `sh -c` in its own process group, with PDEATHSIG=SIGKILL towards the
//! core, outside the run's cgroup. It gets `--teardown-timeout`; when that passes, its whole
//! tree is killed (TERM, a short grace, KILL). Funnel events that arrive meanwhile are handed
//! back to the caller, which logs them (live teardown) or acts on them afterwards (reconcile):
//! a teardown is never interrupted half-way by a second signal.

use crate::lifetime::{self, Event, Funnel};
use crate::spawn::{self, SpawnSpec};
use crate::tree::{self, Members};
use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

/// Grace given to a teardown command's tree after its timeout, before KILL.
const TIMEOUT_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Exited(i32),
    TimedOut,
    SpawnFailed(String),
}

impl Outcome {
    pub fn ok(&self) -> bool {
        *self == Outcome::Exited(0)
    }

    pub fn describe(&self) -> String {
        match self {
            Outcome::Exited(code) => format!("exited with status {code}"),
            Outcome::TimedOut => "timed out and was killed".into(),
            Outcome::SpawnFailed(e) => format!("could not start: {e}"),
        }
    }
}

/// Run `sh -c <script>` with exactly `env`, bounded by `timeout`.
pub fn run_shell(
    script: &str,
    env: &[(OsString, OsString)],
    cwd: Option<&Path>,
    timeout: Duration,
    funnel: &mut Funnel,
    events: &mut Vec<Event>,
) -> Outcome {
    let sh = Path::new("/bin/sh");
    let args = [OsString::from("-c"), OsString::from(script)];
    let spec = SpawnSpec {
        program: sh,
        args: &args,
        env,
        cwd,
        cgroup_dir: None,
        core_pid: std::process::id() as i32,
        identity: None,
        rlimits: &[],
    };
    let child = match spawn::spawn(&spec) {
        Ok(c) => c,
        Err(e) => return Outcome::SpawnFailed(e.to_string()),
    };
    let pid = child.pid;
    let end = Instant::now() + timeout;
    let mut status = None;
    loop {
        for (p, code) in lifetime::reap_children() {
            if p == pid {
                status = Some(code);
            }
        }
        if status.is_some() || Instant::now() >= end {
            break;
        }
        events.extend(
            funnel
                .wait(Some(lifetime::until(end)), None)
                .into_iter()
                .filter(|e| *e != Event::Child),
        );
    }
    // Whatever the teardown left behind (a daemon it started, or all of it on timeout) goes.
    let members = Members {
        pgid: Some(pid),
        descendants_of: Some(std::process::id() as i32),
        ..Members::default()
    };
    let killed = tree::terminate(&members, TIMEOUT_GRACE, funnel);
    events.extend(killed.events);
    match status {
        Some(code) => Outcome::Exited(code),
        None => Outcome::TimedOut,
    }
}
