//! Steps 8–9 (CLI-CONTRACT §5): setup, then the command — in their own process group, in the run's
//! cgroup, PDEATHSIG towards the core — and the wait for the command or the funnel.

use super::decide::{decide_batch, Cause};
use super::env::{run_env, Side};
use super::finish::{announce, log_ignored};
use super::hold::Held;
use crate::output;
use crate::sys::spawn::{SpawnError, SpawnSpec};
use crate::sys::supervisor::{Child, Supervisor, Waits};
use std::ffi::OsString;
use std::path::Path;
use std::time::Instant;

/// The setup ran (and passed) and the command was started — or the run already has its cause
/// (the setup failed or was interrupted, the command could not start).
pub(super) struct Running {
    held: Held,
    started: Instant,
    /// The last child started (the command, or the setup that ended the run early): its
    /// process group is the first thing teardown signals.
    child: Option<Child>,
    ended_early: Option<Cause>,
}

/// The run has its cause: time to tear down.
pub(super) struct Ended {
    pub(super) held: Held,
    pub(super) cause: Cause,
    pub(super) child: Option<Child>,
    pub(super) started: Instant,
    pub(super) ended: Instant,
}

impl Held {
    /// Run the setup (if any; a failure or a funnel event ends the run before the command),
    /// then start the command.
    pub(super) fn start(mut self, sup: &mut Supervisor) -> Running {
        let started = Instant::now();
        if let Some(setup) = self.ctx.spec.setup.clone() {
            // Setup is tether's side: the invoking user, the full environment.
            let env = run_env(&self.ctx, self.slot_label(), Side::Tether);
            let sh = Path::new("/bin/sh");
            let args = [OsString::from("-c"), OsString::from(setup)];
            let (child, cause) = match self.spawn(sh, None, &args, &env, false, sup) {
                Ok(child) => (Some(child), wait_for(child, self.ctx.spec.deadline, sup)),
                Err(cause) => (None, cause),
            };
            match cause {
                Cause::Exited(0) => {}
                Cause::Exited(code) => {
                    output::warn(
                        "setup",
                        &format!(
                            "setup command failed with status {code}; not running the command"
                        ),
                    );
                    return self.ended_early(started, child, Cause::Exited(code));
                }
                other => return self.ended_early(started, child, other),
            }
        }
        let env = run_env(&self.ctx, self.slot_label(), Side::Command);
        let program = self.ctx.spec.program.clone();
        let argv = self.ctx.spec.argv.clone();
        let (argv0, args) = argv
            .split_first()
            .map_or((None, &argv[..]), |(a, r)| (Some(a), r));
        match self.spawn(&program, argv0, args, &env, true, sup) {
            Ok(child) => Running {
                held: self,
                started,
                child: Some(child),
                ended_early: None,
            },
            Err(cause) => self.ended_early(started, None, cause),
        }
    }

    fn ended_early(self, started: Instant, child: Option<Child>, cause: Cause) -> Running {
        Running {
            held: self,
            started,
            child,
            ended_early: Some(cause),
        }
    }

    pub(super) fn slot_label(&self) -> Option<String> {
        self.slot.as_ref().map(|s| s.label())
    }

    /// Start a child of the run in its cgroup; `is_command` adds `run_as` and the rlimits. A
    /// child that cannot start ends the run as the shell would report it (127, 126; 125 for
    /// tether's own failure).
    fn spawn(
        &mut self,
        program: &Path,
        argv0: Option<&OsString>,
        args: &[OsString],
        env: &[(OsString, OsString)],
        is_command: bool,
        sup: &mut Supervisor,
    ) -> Result<Child, Cause> {
        let cgroup_dir = self.ctx.cgroup.as_ref().and_then(|c| c.dir_fd().ok());
        let rlimits = if is_command {
            rlimits_of(&self.ctx.spec.limits)
        } else {
            Vec::new()
        };
        let spec = SpawnSpec {
            program,
            argv0: argv0.map(OsString::as_os_str),
            args,
            env,
            cwd: None,
            cgroup_dir: cgroup_dir.as_ref().map(std::os::fd::AsRawFd::as_raw_fd),
            core_pid: std::process::id() as i32,
            identity: self.ctx.spec.run_as.as_ref().filter(|_| is_command),
            rlimits: &rlimits,
        };
        let mut spawned = sup.spawn(&spec);
        if matches!(spawned, Err(SpawnError::Start(_))) && spec.cgroup_dir.is_some() {
            // Joining the cgroup failed: run without it; teardown falls back to the process
            // group and the core's descendants.
            output::debug("cgroup", "cannot join the run's cgroup; running without it");
            if let Some(cg) = self.ctx.cgroup.take() {
                let _ = cg.remove();
            }
            self.ctx.record.meta.cgroup = None;
            spawned = sup.spawn(&SpawnSpec {
                cgroup_dir: None,
                ..spec
            });
        }
        drop(cgroup_dir);
        match spawned {
            Ok(child) => {
                output::debug(
                    "spawn",
                    &format!("started {} as pid {}", program.display(), child.pid),
                );
                Ok(child)
            }
            Err(e) => {
                let code = match &e {
                    SpawnError::Exec(err) if err.kind() == std::io::ErrorKind::NotFound => {
                        crate::exit::NOT_FOUND
                    }
                    SpawnError::Exec(_) => crate::exit::NOT_EXECUTABLE,
                    SpawnError::Start(_) => crate::exit::TETHER_FAILURE,
                };
                output::error(&format!("cannot start {}: {e}", program.display()));
                Err(Cause::Exited(code))
            }
        }
    }
}

impl Running {
    /// Step 9: wait for the command, or for the funnel (the first event decides).
    pub(super) fn wait(self, sup: &mut Supervisor) -> Ended {
        let cause = match (self.ended_early, self.child) {
            (Some(cause), _) => cause,
            (None, Some(child)) => wait_for(child, self.held.ctx.spec.deadline, sup),
            (None, None) => Cause::Exited(crate::exit::TETHER_FAILURE),
        };
        Ended {
            held: self.held,
            cause,
            child: self.child,
            started: self.started,
            ended: Instant::now(),
        }
    }
}

/// Wait for `child` to exit, or for a funnel event that ends the run (the first batch that
/// asks for teardown decides; the events that lost are logged).
fn wait_for(child: Child, deadline: std::time::Duration, sup: &mut impl Waits) -> Cause {
    loop {
        if let Some(code) = sup.exit_status(child) {
            return Cause::Exited(code);
        }
        let events = sup.wait(None, None);
        if let (Some(cause), losers) = decide_batch(&events) {
            announce(cause, deadline);
            log_ignored(&losers);
            return cause;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::signals::{Event, Sig};
    use std::collections::VecDeque;
    use std::os::fd::RawFd;
    use std::time::Duration;

    /// A supervisor without a kernel: each `wait` hands out the next scripted batch; the
    /// child exits when the script says so.
    struct Fake {
        batches: VecDeque<Vec<Event>>,
        /// The child's status becomes available after this many waits.
        exits_after: Option<(usize, i32)>,
        waits: usize,
    }

    impl Waits for Fake {
        fn exit_status(&mut self, _child: Child) -> Option<i32> {
            match self.exits_after {
                Some((n, code)) if self.waits >= n => Some(code),
                _ => None,
            }
        }

        fn wait(&mut self, _timeout: Option<Duration>, _extra: Option<RawFd>) -> Vec<Event> {
            self.waits += 1;
            self.batches
                .pop_front()
                .unwrap_or_else(|| panic!("waited more often than scripted ({})", self.waits))
        }
    }

    fn run(batches: Vec<Vec<Event>>, exits_after: Option<(usize, i32)>) -> (Cause, usize) {
        let mut fake = Fake {
            batches: batches.into(),
            exits_after,
            waits: 0,
        };
        let cause = wait_for(Child { pid: 1 }, Duration::from_secs(60), &mut fake);
        (cause, fake.waits)
    }

    #[test]
    fn the_command_exiting_ends_the_wait_with_its_status() {
        assert_eq!(
            run(vec![vec![Event::Child]], Some((1, 7))),
            (Cause::Exited(7), 1)
        );
        // Already exited before the first wait.
        assert_eq!(run(vec![], Some((0, 0))), (Cause::Exited(0), 0));
    }

    #[test]
    fn the_first_funnel_batch_decides_by_precedence() {
        let both = vec![Event::Signal(Sig::Int), Event::Signal(Sig::Term)];
        assert_eq!(run(vec![both], None), (Cause::Signal(Sig::Term), 1));
        let deadline_and_parent = vec![Event::Deadline, Event::ParentDied];
        assert_eq!(run(vec![deadline_and_parent], None), (Cause::ParentDied, 1));
    }

    #[test]
    fn spurious_wakeups_and_ready_fds_do_not_end_the_run() {
        let (cause, waits) = run(
            vec![
                vec![],
                vec![Event::Child],
                vec![Event::Ready],
                vec![Event::AgentGone],
            ],
            None,
        );
        assert_eq!((cause, waits), (Cause::AgentGone, 4));
    }
}
