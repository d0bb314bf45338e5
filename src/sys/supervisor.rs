//! The supervisor: everything the core waits on, in one place (issue 15). It owns the signal
//! funnel (a `signalfd` for TERM/INT/HUP, the deadline's ALRM, CHLD and the front's notices),
//! the deadline, and the table of exited children. One place reaps (`waitpid`), one place
//! queues events, and every other module asks it:
//!
//! - a step that must not be interrupted (killing a tree, a teardown command, a reap) waits
//!   through [`Supervisor::pause`]: funnel events that arrive meanwhile are *queued*, and the
//!   run decides on them afterwards (the next [`Supervisor::wait`] hands them out first, or
//!   [`Supervisor::take_queued`] takes them to log as ignored);
//! - a child's exit status is asked for by pid ([`Supervisor::exit_status`]), whoever reaped it.
//!
//! - a lease (issue 16 §4: the cluster lock's heartbeat, [`super::lease`]) is watched in every
//!   wait once the run hands it over ([`Supervisor::watch_lease`]): a failure it reports, or
//!   its window passing without an answered renewal, becomes one [`Event::LockLost`].
//!
//! All asynchronous signals are blocked and read from the signalfd, so they become [`Event`]s
//! in exactly one place and no handler ever runs concurrently with teardown.

use super::lease::{self, Lease, Watched};
use super::signals::{
    funnel_set, take_over_signals, Event, Sig, AGENT_GONE_SIGNAL, AGENT_GONE_TOKEN,
    PARENT_DIED_TOKEN,
};
use super::spawn::{self, SpawnError, SpawnSpec};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{getppid, Pid};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// A started child. Its process group is its own (its pid); nothing else owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Child {
    pub(crate) pid: i32,
}

impl Child {
    /// Its process group id (every child tether starts leads its own group).
    pub(crate) fn pgid(&self) -> i32 {
        self.pid
    }
}

/// What a loop that waits for a child or the funnel needs of a supervisor: the small interface
/// the run's and the reaper's decisions are unit-tested against, with a fake in place of the
/// kernel (the real-kernel suite proves the real one).
pub(crate) trait Waits {
    /// The exit status of `child`, if it has exited (taken).
    fn exit_status(&mut self, child: Child) -> Option<i32>;
    /// The next funnel events (see [`Supervisor::wait`]).
    fn wait(&mut self, timeout: Option<Duration>, extra: Option<RawFd>) -> Vec<Event>;
}

impl Waits for Supervisor {
    fn exit_status(&mut self, child: Child) -> Option<i32> {
        Supervisor::exit_status(self, child)
    }

    fn wait(&mut self, timeout: Option<Duration>, extra: Option<RawFd>) -> Vec<Event> {
        Supervisor::wait(self, timeout, extra)
    }
}

/// The core's supervisor (see the module doc).
pub(crate) struct Supervisor {
    sfd: SignalFd,
    front: Pid,
    /// A core under a front (`split`), not the janitor's standalone supervisor: only then does
    /// a token-less TERM from `front` mean the front died.
    has_front: bool,
    /// Whether an agent-gone notice tears down (`--no-agent-watch`, `agent_watch: false`).
    agent_watch: bool,
    /// Funnel events not handed out yet: noticed at start-up (a parent already dead), or
    /// while a step paused for something else.
    queued: Vec<Event>,
    /// Children that have exited: pid → status as a shell reports it (128+N for a signal).
    exited: HashMap<i32, i32>,
    /// The lease watched in every wait, until it is lost (one `LockLost`) or ended.
    lease: Option<Watched>,
    /// The write end of the last-will pipe to the front (a core under a front only).
    will: Option<OwnedFd>,
}

impl Supervisor {
    pub(crate) fn new(
        sfd: SignalFd,
        front: Pid,
        has_front: bool,
        agent_watch: bool,
        queued: Vec<Event>,
    ) -> Supervisor {
        Supervisor {
            sfd,
            front,
            has_front,
            agent_watch,
            queued,
            exited: HashMap::new(),
            lease: None,
            will: None,
        }
    }

    /// The pipe [`Supervisor::leave_will`] writes to (set by the front/core split).
    pub(crate) fn set_will(&mut self, tx: OwnedFd) {
        self.will = Some(tx);
    }

    /// Tell the front what to do should this core be killed (a SIGKILL cannot be caught: the
    /// front, its parent, is the one left to act). One line, written whole (well under
    /// `PIPE_BUF`); a later will replaces an earlier one. Without a front, nothing.
    pub(crate) fn leave_will(&mut self, line: &str) {
        let Some(tx) = &self.will else { return };
        let mut bytes = line.replace('\n', " ").into_bytes();
        bytes.push(b'\n');
        if let Err(e) = nix::unistd::write(tx, &bytes) {
            crate::output::debug("front", &format!("cannot leave the core's will: {e}"));
        }
    }

    /// A supervisor without the front/core split, for `tether janitor` (run from cron or a
    /// timer, it has no CI agent to outlive). It is still a child subreaper, so whatever a
    /// reaped run's teardown command leaves behind is re-parented to it and killed.
    pub(crate) fn standalone() -> nix::Result<Supervisor> {
        take_over_signals()?;
        nix::sys::prctl::set_child_subreaper(true)?;
        let sfd = SignalFd::with_flags(
            &funnel_set(),
            SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK,
        )?;
        Ok(Supervisor::new(sfd, getppid(), false, false, Vec::new()))
    }

    /// Arm the deadline (SIGALRM through the funnel). Zero disables it.
    pub(crate) fn arm_deadline(&self, deadline: Duration) -> io::Result<()> {
        if deadline.is_zero() {
            return Ok(());
        }
        let it = libc::itimerval {
            it_interval: libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
            it_value: libc::timeval {
                tv_sec: deadline.as_secs() as libc::time_t,
                tv_usec: deadline.subsec_micros() as libc::suseconds_t,
            },
        };
        // SAFETY: setitimer with a valid struct and no old-value pointer; ITIMER_REAL is not
        // inherited across fork.
        let rc = unsafe { libc::setitimer(libc::ITIMER_REAL, &it, std::ptr::null_mut()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// The effective agent watch, once the config file is read (flag > file > on). Off, an
    /// agent-gone notice from the front is dropped (logged at debug level).
    pub(crate) fn set_agent_watch(&mut self, on: bool) {
        self.agent_watch = on;
    }

    /// Start a child (CLI-CONTRACT §5 step 8). Its exit status is then asked for with
    /// [`Supervisor::exit_status`].
    pub(crate) fn spawn(&mut self, spec: &SpawnSpec<'_>) -> Result<Child, SpawnError> {
        let spawned = spawn::spawn(spec)?;
        // A status the table still holds for this pid is an older child's (pid reuse).
        self.exited.remove(&spawned.pid);
        Ok(Child { pid: spawned.pid })
    }

    /// Wait up to `timeout` (None = forever) for funnel events or for `extra` to become
    /// readable. Returns every event that is ready (possibly none, on timeout), queued ones
    /// first. Children that exited meanwhile are reaped into the table (`Event::Child` says
    /// so, for a caller waiting for one).
    pub(crate) fn wait(&mut self, timeout: Option<Duration>, extra: Option<RawFd>) -> Vec<Event> {
        let mut events = std::mem::take(&mut self.queued);
        if !events.is_empty() {
            self.drain(&mut events);
            return events;
        }
        let mut fds = vec![libc::pollfd {
            fd: self.sfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let extra_at = extra.map(|fd| {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
            fds.len() - 1
        });
        let mut timeout = timeout;
        let lease_at = self.lease.as_ref().map(|w| {
            // Wake up when the lease would expire, whatever the caller's timeout.
            let left = w.remaining(lease::mono_now());
            timeout = Some(timeout.map_or(left, |t| t.min(left)));
            fds.push(libc::pollfd {
                fd: w.raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            fds.len() - 1
        });
        let ms: libc::c_int = match timeout {
            None => -1,
            Some(d) => d.as_millis().min(i32::MAX as u128) as libc::c_int,
        };
        // SAFETY: poll(2) on a valid array of pollfds we own. EINTR cannot happen (every
        // signal we expect is blocked); any failure reads as "nothing yet".
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n > 0 {
            if extra_at.is_some_and(|i| fds[i].revents != 0) {
                events.push(Event::Ready);
            }
            self.drain(&mut events);
        }
        let lease_readable = lease_at.is_some_and(|i| n > 0 && fds[i].revents != 0);
        self.check_lease(lease_readable, &mut events);
        events
    }

    /// Watch `lease` in every wait from now on (PROTOCOL §16). When it is lost the supervisor
    /// says so in one `lock-lost` line, hands out [`Event::LockLost`] once and stops watching.
    pub(crate) fn watch_lease(&mut self, lease: Lease) {
        self.lease = Some(Watched::new(lease));
    }

    /// Stop watching the lease (before the lock it belongs to is released on purpose).
    pub(crate) fn end_lease(&mut self) {
        self.lease = None;
    }

    /// Read the lease's reports and, when it is lost, say so and queue the event.
    fn check_lease(&mut self, readable: bool, events: &mut Vec<Event>) {
        let Some(watched) = self.lease.as_mut() else {
            return;
        };
        if readable {
            watched.take_reports();
        }
        // A newer run of the holder's group (on any host) superseded it (PROTOCOL §18): the
        // same end as a local cancel-older's SIGTERM, through the funnel, once. The lease is
        // still watched: the lock is held through the teardown.
        if let Some(by) = watched.take_superseded() {
            crate::output::emit(
                crate::output::Level::Info,
                "superseded",
                &format!(
                    "superseded by run {by} of this run's group (cancel-older in the cluster) — \
                     tearing down as for SIGTERM"
                ),
                &[("by", by.into())],
            );
            events.push(Event::Signal(Sig::Term));
        }
        if let Some(text) = watched.lost(lease::mono_now()) {
            crate::output::emit(
                crate::output::Level::Error,
                "lock-lost",
                &format!("lock-lost: {text}"),
                &[],
            );
            self.lease = None;
            events.push(Event::LockLost);
        }
    }

    /// Non-blocking: whatever is queued or already pending.
    pub(crate) fn poll_now(&mut self) -> Vec<Event> {
        self.wait(Some(Duration::ZERO), None)
    }

    /// Wait up to `timeout` while busy with something that must not be interrupted (killing
    /// a tree, a teardown): children are reaped, funnel events are queued for later.
    pub(crate) fn pause(&mut self, timeout: Duration) {
        self.pause_for(Some(timeout));
    }

    /// [`pause`](Self::pause) up to `timeout` (`None`: until a signal or a child's exit).
    /// The events already queued are set aside while it blocks: `wait` hands queued events
    /// back at once, so without that a pause with anything queued (a second SIGTERM during
    /// a teardown) would return at once and its caller would spin.
    pub(crate) fn pause_for(&mut self, timeout: Option<Duration>) {
        let earlier = std::mem::take(&mut self.queued);
        let events = self.wait(timeout, None);
        self.queued = earlier;
        self.queue(events);
    }

    /// Put events back for the next `wait` (or `take_queued`).
    pub(crate) fn queue(&mut self, events: impl IntoIterator<Item = Event>) {
        self.queued
            .extend(events.into_iter().filter(|e| *e != Event::Child));
    }

    /// Take the queued funnel events (to log them as ignored during teardown).
    pub(crate) fn take_queued(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.queued)
    }

    /// Whether a queued event asks to stop (a signal, the deadline, a parent's or agent's
    /// death): the janitor stops after the current reap.
    pub(crate) fn stop_requested(&self) -> bool {
        self.queued.iter().any(|e| {
            matches!(
                e,
                Event::Signal(_)
                    | Event::ParentDied
                    | Event::Deadline
                    | Event::AgentGone
                    | Event::LockLost
            )
        })
    }

    /// Reap every child that has exited, without blocking, into the table.
    pub(crate) fn reap(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    self.exited.insert(pid.as_raw(), code);
                }
                Ok(WaitStatus::Signaled(pid, s, _)) => {
                    self.exited
                        .insert(pid.as_raw(), crate::exit::from_signal(s as i32));
                }
                Ok(WaitStatus::StillAlive) => break,
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break, // ECHILD: nothing left
            }
        }
    }

    /// The exit status of our child `child`, if it has exited (reaping first). Taken: asking
    /// twice gives `None` the second time.
    pub(crate) fn exit_status(&mut self, child: Child) -> Option<i32> {
        self.reap();
        self.exited.remove(&child.pid)
    }

    fn drain(&mut self, events: &mut Vec<Event>) {
        while let Ok(Some(info)) = self.sfd.read_signal() {
            let Some(ev) = self.classify(&info) else {
                continue;
            };
            if ev == Event::Child {
                self.reap();
                // SIGCHLDs merge anyway; keep one.
                if events.contains(&Event::Child) {
                    continue;
                }
            }
            events.push(ev);
        }
    }

    fn classify(&self, info: &libc::signalfd_siginfo) -> Option<Event> {
        let from_front = self.has_front && info.ssi_pid as i32 == self.front.as_raw();
        let token = (from_front && info.ssi_code == libc::SI_QUEUE).then_some(info.ssi_ptr);
        let ev = match info.ssi_signo as i32 {
            libc::SIGCHLD => Event::Child,
            libc::SIGALRM => Event::Deadline,
            libc::SIGINT => Event::Signal(Sig::Int),
            libc::SIGHUP => Event::Signal(Sig::Hup),
            libc::SIGTERM => match token {
                Some(PARENT_DIED_TOKEN) => Event::ParentDied,
                // Forwarded by the front (or sent by it some other way): a received signal.
                Some(_) => Event::Signal(Sig::Term),
                // The front never signals us without a token: this is its PDEATHSIG.
                None if from_front => Event::ParentDied,
                // Someone else (an operator, `--on-busy cancel-older`). The janitor's
                // standalone supervisor keeps the old rule: a TERM after its parent is gone.
                None if !self.has_front && getppid() != self.front => Event::ParentDied,
                None => Event::Signal(Sig::Term),
            },
            n if n == AGENT_GONE_SIGNAL as i32 => {
                if token != Some(AGENT_GONE_TOKEN) {
                    return None;
                }
                if !self.agent_watch {
                    crate::output::debug(
                        "agent-gone",
                        "the reader of stdout/stderr is gone; agent watch is off — carrying on",
                    );
                    return None;
                }
                Event::AgentGone
            }
            _ => return None,
        };
        Some(ev)
    }
}
