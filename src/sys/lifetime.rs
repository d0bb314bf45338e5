//! Lifetime guards (SPEC §3.1 step 1): the front/core split, PDEATHSIG with the `getppid()`
//! re-check, the deadline alarm, and the signal funnel.
//!
//! CI agents end a step in different ways: SIGKILL to the step shell only (Drone exec), SIGKILL
//! to the step's whole process group (Woodpecker local), TERM-then-KILL to the group (GitLab
//! shell), INT/TERM/KILL to the top process only (GitHub). With two processes every one of
//! them reaches the core's teardown:
//! - the **front** stays in the agent's process group; PDEATHSIG=SIGTERM towards the step
//!   shell; it forwards TERM/INT/HUP to the core, tells it when its parent died or when the
//!   reader of its stdout/stderr went away (the agent died, D32), and exits with the core's
//!   code;
//! - the **core** runs in its own session (a group kill cannot reach it), with
//!   PDEATHSIG=SIGTERM towards the front, so the front's death (even by SIGKILL) reaches it.
//!
//! All asynchronous signals are blocked and read from one `signalfd` in each process, so they
//! become [`Event`]s in exactly one place ([`Funnel::wait`]) and no handler ever runs
//! concurrently with teardown. The split happens before any thread or runtime exists, and the
//! front stays single-threaded (PDEATHSIG fires when the *thread* that forked exits).
//!
//! The front tells the core *why* with `sigqueue` tokens, because the siginfo is the only
//! thing that survives the kernel merging signals: a TERM the front received from anyone but
//! a dying parent goes on as a forwarded signal, its parent's death as parent death, and the
//! core recognises the front's own death by its PDEATHSIG naming the front as sender without
//! a token (D14).

use crate::config::duration;
use nix::sys::signal::{self, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, getpid, getppid, setsid, ForkResult, Pid};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

/// Markers the front puts in `sigqueue` data. The front never signals the core without one,
/// so a TERM from the front *without* a token is the front's PDEATHSIG: the front died.
const PARENT_DIED_TOKEN: u64 = 0x7e7e_0001;
/// A TERM/INT/HUP the front received (from anyone but its dying parent), passed on.
const FORWARD_TOKEN: u64 = 0x7e7e_0002;
/// The reader of the front's stdout/stderr went away.
const AGENT_GONE_TOKEN: u64 = 0x7e7e_0003;

/// Agent-gone travels on a signal of its own, never merged with a TERM: when the config turns
/// the watch off the core drops it, and a real SIGTERM merged into it would be lost with it.
const AGENT_GONE_SIGNAL: Signal = Signal::SIGUSR1;

/// Every signal the funnel takes over (blocked from the start, read from a signalfd).
const FUNNEL_SIGNALS: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGALRM,
    Signal::SIGCHLD,
    AGENT_GONE_SIGNAL,
];

/// The three external signals tether funnels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    Term,
    Int,
    Hup,
}

impl Sig {
    pub fn name(self) -> &'static str {
        match self {
            Sig::Term => "SIGTERM",
            Sig::Int => "SIGINT",
            Sig::Hup => "SIGHUP",
        }
    }
}

/// Everything that can wake the core. Raw signal numbers never leave this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// TERM/INT/HUP from the outside (forwarded by the front or sent to the core directly).
    Signal(Sig),
    /// The deadline alarm fired.
    Deadline,
    /// The front (or the front's parent) died.
    ParentDied,
    /// The reader of the front's stdout/stderr (the CI agent) went away.
    AgentGone,
    /// Some child changed state: the caller reaps.
    Child,
    /// The extra fd passed to [`Funnel::wait`] became readable.
    Ready,
}

/// The core's signal funnel.
pub struct Funnel {
    sfd: SignalFd,
    front: Pid,
    /// A core under a front (`split`), not the janitor's standalone funnel: only then does a
    /// token-less TERM from `front` mean the front died.
    has_front: bool,
    /// Whether an agent-gone notice tears down (`--no-agent-watch`, `agent_watch: false`).
    agent_watch: bool,
    /// Events noticed outside `wait` (a parent already dead at start-up).
    pending: Vec<Event>,
}

fn funnel_set() -> SigSet {
    let mut set = SigSet::empty();
    for s in FUNNEL_SIGNALS {
        set.add(s);
    }
    set
}

/// Undo an agent's `SIG_IGN` (an ignored signal is discarded even while blocked, so the
/// funnel would never see it), then block the set so only the signalfd receives them.
fn take_over_signals() -> nix::Result<()> {
    for s in FUNNEL_SIGNALS {
        // SAFETY: installing SIG_DFL is always sound; no handler code runs.
        unsafe { signal::signal(s, SigHandler::SigDfl)? };
    }
    signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&funnel_set()), None)
}

fn set_pdeathsig(sig: Signal) -> nix::Result<()> {
    nix::sys::prctl::set_pdeathsig(Some(sig))
}

/// Test-only pause points (cargo feature `fault-injection`): create `<path>.waiting`, then
/// poll until `<path>` exists. Compiled out of release builds.
#[cfg(feature = "fault-injection")]
pub fn fault_pause(var: &str) {
    let Some(path) = std::env::var_os(var) else {
        return;
    };
    let path = std::path::PathBuf::from(path);
    let mut waiting = path.clone().into_os_string();
    waiting.push(".waiting");
    // path-ok: test-only fault injection marker (feature fault-injection)
    let _ = std::fs::write(&waiting, std::process::id().to_string());
    let until = Instant::now() + Duration::from_secs(60);
    while !path.exists() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(2)); // polling a marker file, bounded
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn fault_pause(_var: &str) {}

/// Split into front and core. Returns only in the core; the front forwards signals and
/// exits with the core's status. `watch_agent`: whether the front watches its stdout/stderr
/// (false only for `--no-agent-watch`; the config file's `agent_watch` is read later, by the
/// core, see [`Funnel::set_agent_watch`]).
pub fn split(watch_agent: bool) -> nix::Result<Funnel> {
    take_over_signals()?;
    let original_parent = getppid();
    fault_pause("TETHER_FAULT_PAUSE_BEFORE_GUARD");
    set_pdeathsig(Signal::SIGTERM)?;
    // The parent may have died before PDEATHSIG was armed: then no signal will ever come.
    let parent_already_gone = getppid() != original_parent;
    let front = getpid();
    // Made before the fork, so that failing to make it fails like any other guard: before
    // anything exists.
    let front_sfd = SignalFd::with_flags(
        &funnel_set(),
        SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK,
    )?;
    let watched = if watch_agent { agent_fds() } else { Vec::new() };

    // SAFETY: single-threaded at this point (nothing has spawned a thread yet), so the child
    // may keep running ordinary Rust code.
    match unsafe { fork() }? {
        ForkResult::Child => {
            drop(front_sfd);
            core_guards(front, watch_agent)
        }
        ForkResult::Parent { child } => Front {
            core: child,
            original_parent,
            sfd: front_sfd,
            watched,
        }
        .run(parent_already_gone),
    }
}

/// fds 1 and 2 when they are pipes or sockets: whoever reads them is the CI agent collecting
/// the step's output. A file or a terminal has no reader to lose.
fn agent_fds() -> Vec<RawFd> {
    use std::os::fd::AsFd;
    let is_pipe_or_socket = |fd: std::os::fd::BorrowedFd<'_>| {
        // A closed fd (EBADF) is not watched.
        nix::sys::stat::fstat(fd)
            .is_ok_and(|st| matches!(st.st_mode & libc::S_IFMT, libc::S_IFIFO | libc::S_IFSOCK))
    };
    let mut fds = Vec::new();
    if is_pipe_or_socket(std::io::stdout().as_fd()) {
        fds.push(libc::STDOUT_FILENO);
    }
    if is_pipe_or_socket(std::io::stderr().as_fd()) {
        fds.push(libc::STDERR_FILENO);
    }
    fds
}

/// A funnel without the front/core split, for `tether janitor` (run from cron or a timer, it
/// has no CI agent to outlive). It is still a child subreaper, so whatever a reaped run's
/// teardown command leaves behind is re-parented to it and killed.
pub fn standalone() -> nix::Result<Funnel> {
    take_over_signals()?;
    nix::sys::prctl::set_child_subreaper(true)?;
    let sfd = SignalFd::with_flags(
        &funnel_set(),
        SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK,
    )?;
    Ok(Funnel {
        sfd,
        front: getppid(),
        has_front: false,
        agent_watch: false,
        pending: Vec::new(),
    })
}

fn core_guards(front: Pid, agent_watch: bool) -> nix::Result<Funnel> {
    setsid()?;
    set_pdeathsig(Signal::SIGTERM)?;
    let mut pending = Vec::new();
    if getppid() != front {
        pending.push(Event::ParentDied);
    }
    // Orphaned descendants (setsid, double fork) are re-parented to us, not to init.
    nix::sys::prctl::set_child_subreaper(true)?;
    let sfd = SignalFd::with_flags(
        &funnel_set(),
        SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK,
    )?;
    Ok(Funnel {
        sfd,
        front,
        has_front: true,
        agent_watch,
        pending,
    })
}

/// One signal as the front read it: who sent it matters (D14).
struct Arrival {
    signo: i32,
    pid: i32,
}

/// The front: watch, forward, mirror the core's status.
struct Front {
    core: Pid,
    original_parent: Pid,
    sfd: SignalFd,
    /// fds 1/2 while they are watched. Emptied after the first hang-up: POLLERR on a pipe whose
    /// reader is gone stays raised, and the core needs to hear it once.
    watched: Vec<RawFd>,
}

impl Front {
    /// Never returns: the front exits with the core's status.
    fn run(mut self, parent_already_gone: bool) -> ! {
        if parent_already_gone {
            self.notify(Signal::SIGTERM, PARENT_DIED_TOKEN);
        }
        loop {
            let agent_gone = self.wait();
            let arrivals = self.drain();
            if arrivals.iter().any(|a| a.signo == libc::SIGCHLD) {
                self.mirror_core_if_done();
            }
            // Tell the core in its precedence order (D14): received signals (TERM first, the
            // kernel hands out INT before it), then parent death, then the agent.
            let mut forward: Vec<Signal> = Vec::new();
            let mut parent_died = false;
            for a in &arrivals {
                match a.signo {
                    libc::SIGTERM if self.sent_by_dying_parent(a) => parent_died = true,
                    libc::SIGTERM => forward.push(Signal::SIGTERM),
                    libc::SIGINT => forward.push(Signal::SIGINT),
                    libc::SIGHUP => forward.push(Signal::SIGHUP),
                    _ => {}
                }
            }
            forward.sort_by_key(|s| match s {
                Signal::SIGTERM => 0,
                Signal::SIGINT => 1,
                _ => 2,
            });
            for sig in forward {
                self.notify(sig, FORWARD_TOKEN);
            }
            if parent_died {
                self.notify(Signal::SIGTERM, PARENT_DIED_TOKEN);
            }
            if agent_gone {
                self.notify(AGENT_GONE_SIGNAL, AGENT_GONE_TOKEN);
            }
        }
    }

    /// A TERM is our parent's death only if the parent sent it (PDEATHSIG names the dying
    /// parent as sender) and is gone now. Anything else is a signal someone sent us: the agent
    /// signalling the step's process group marks TERM pending here before the shell can die,
    /// and the shell's PDEATHSIG then merges into it, so the siginfo is the agent's.
    fn sent_by_dying_parent(&self, a: &Arrival) -> bool {
        a.pid == self.original_parent.as_raw() && getppid() != self.original_parent
    }

    fn notify(&self, sig: Signal, token: u64) {
        let value = libc::sigval {
            sival_ptr: token as usize as *mut libc::c_void,
        };
        // SAFETY: sigqueue(2) to our own child with a plain value (never dereferenced).
        unsafe { libc::sigqueue(self.core.as_raw(), sig as libc::c_int, value) };
    }

    /// Block until a signal is pending or a watched fd reports that its reader is gone.
    /// Returns true the one time a hang-up is seen.
    fn wait(&mut self) -> bool {
        let mut fds = vec![libc::pollfd {
            fd: self.sfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // No events asked: POLLERR (a pipe's reader is gone) and POLLHUP (a socket's peer
        // closed) are always reported.
        fds.extend(self.watched.iter().map(|&fd| libc::pollfd {
            fd,
            events: 0,
            revents: 0,
        }));
        // SAFETY: poll(2) on a valid array of pollfds we own.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if nix::errno::Errno::last() != nix::errno::Errno::EINTR {
                // poll itself failing (ENOMEM) must not cost us the signals: stop watching,
                // and pace the retries; the signalfd is still drained on every turn.
                self.watched.clear();
                std::thread::sleep(Duration::from_millis(10));
            }
            return false;
        }
        let watched = &fds[1..];
        if watched
            .iter()
            .any(|p| p.revents & (libc::POLLERR | libc::POLLHUP) != 0)
        {
            self.watched.clear();
            return true;
        }
        // POLLNVAL: the fd is not open; nothing to watch there.
        let invalid: Vec<RawFd> = watched
            .iter()
            .filter(|p| p.revents & libc::POLLNVAL != 0)
            .map(|p| p.fd)
            .collect();
        self.watched.retain(|fd| !invalid.contains(fd));
        false
    }

    /// Every signal already pending, with its sender.
    fn drain(&self) -> Vec<Arrival> {
        let mut out = Vec::new();
        while let Ok(Some(info)) = self.sfd.read_signal() {
            out.push(Arrival {
                signo: info.ssi_signo as i32,
                pid: info.ssi_pid as i32,
            });
        }
        out
    }

    fn mirror_core_if_done(&self) {
        loop {
            match waitpid(self.core, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => std::process::exit(code),
                Ok(WaitStatus::Signaled(_, s, _)) => {
                    std::process::exit(crate::exit::from_signal(s as i32))
                }
                Ok(WaitStatus::StillAlive) => return,
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => std::process::exit(crate::exit::TETHER_FAILURE),
            }
        }
    }
}

impl Funnel {
    /// Arm the deadline (SIGALRM through the funnel). Zero disables it.
    pub fn arm_deadline(&self, deadline: Duration) {
        if deadline.is_zero() {
            return;
        }
        let tv = libc::timeval {
            tv_sec: deadline.as_secs() as libc::time_t,
            tv_usec: deadline.subsec_micros() as libc::suseconds_t,
        };
        let it = libc::itimerval {
            it_interval: libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
            it_value: tv,
        };
        // SAFETY: setitimer with a valid struct; ITIMER_REAL is not inherited across fork.
        unsafe { libc::setitimer(libc::ITIMER_REAL, &it, std::ptr::null_mut()) };
    }

    pub fn front_pid(&self) -> Pid {
        self.front
    }

    /// The effective agent watch, once the config file is read (flag > file > on). Off, an
    /// agent-gone notice from the front is dropped (logged at debug level).
    pub fn set_agent_watch(&mut self, on: bool) {
        self.agent_watch = on;
    }

    /// Wait up to `timeout` (None = forever) for signals or for `extra` to become readable.
    /// Returns every event that is ready (possibly none, on timeout).
    pub fn wait(&mut self, timeout: Option<Duration>, extra: Option<RawFd>) -> Vec<Event> {
        let mut events = std::mem::take(&mut self.pending);
        if !events.is_empty() {
            self.drain(&mut events);
            return events;
        }
        let mut fds = vec![libc::pollfd {
            fd: self.sfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(fd) = extra {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let ms: libc::c_int = match timeout {
            None => -1,
            Some(d) => d.as_millis().min(i32::MAX as u128) as libc::c_int,
        };
        // SAFETY: poll(2) on a valid array of pollfds we own.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n > 0 {
            if fds.len() > 1 && fds[1].revents != 0 {
                events.push(Event::Ready);
            }
            self.drain(&mut events);
        }
        events
    }

    /// Non-blocking check for anything already pending.
    pub fn poll_now(&mut self) -> Vec<Event> {
        self.wait(Some(Duration::ZERO), None)
    }

    fn drain(&mut self, events: &mut Vec<Event>) {
        while let Ok(Some(info)) = self.sfd.read_signal() {
            let Some(ev) = self.classify(&info) else {
                continue;
            };
            // SIGCHLDs merge anyway; keep one.
            if ev == Event::Child && events.contains(&Event::Child) {
                continue;
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
                // standalone funnel keeps the old rule: a TERM after its parent is gone.
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

/// Human text for the deadline line.
pub fn deadline_text(d: Duration) -> String {
    duration::canonical(d)
}

/// Reap every child that has exited, without blocking. Returns (pid, exit code as the shell
/// reports it) pairs. Treats a timeout or spurious wake-up like any other: just look again.
pub fn reap_children() -> Vec<(i32, i32)> {
    let mut out = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => out.push((pid.as_raw(), code)),
            Ok(WaitStatus::Signaled(pid, s, _)) => {
                out.push((pid.as_raw(), crate::exit::from_signal(s as i32)))
            }
            Ok(WaitStatus::StillAlive) => break,
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break, // ECHILD: nothing left
        }
    }
    out
}

/// How long until `deadline`, for poll timeouts.
pub fn until(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}
