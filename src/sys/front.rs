//! Lifetime guards (CLI-CONTRACT §5 step 1): the front/core split and PDEATHSIG with the
//! `getppid()` re-check. The core goes on as a [`Supervisor`].
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

use super::fault::fault_pause;
use super::signals::{
    funnel_set, set_pdeathsig, take_over_signals, Event, AGENT_GONE_SIGNAL, AGENT_GONE_TOKEN,
    FORWARD_TOKEN, PARENT_DIED_TOKEN,
};
use super::supervisor::Supervisor;
use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, getpid, getppid, setsid, ForkResult, Pid};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// What the front does when its core was killed by a signal (a SIGKILL: the core catches every
/// other way to end): called with the core's pid and the core's last will — what the core wrote
/// with [`Supervisor::leave_will`], the last complete line of it, or nothing. Supplied by the
/// layer that knows what a run is (this one does not).
pub(crate) type Aftercare = fn(core: Pid, will: &[u8]);

/// Split into front and core. Returns only in the core; the front forwards signals and
/// exits with the core's status. `watch_agent`: whether the front watches its stdout/stderr
/// (false only for `--no-agent-watch`; the config file's `agent_watch` is read later, by the
/// core, see [`Supervisor::set_agent_watch`]). `aftercare`: run in the front after a core that
/// died by a signal, before the front exits (D77).
pub(crate) fn split(watch_agent: bool, aftercare: Aftercare) -> nix::Result<Supervisor> {
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
    // The core's last will: it writes, the front reads only once the core is dead (a pipe
    // keeps what was written after its writer is gone). Close-on-exec: no command inherits it.
    let (will_rx, will_tx) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;

    // SAFETY: single-threaded at this point (nothing has spawned a thread yet), so the child
    // may keep running ordinary Rust code.
    match unsafe { fork() }? {
        ForkResult::Child => {
            drop(front_sfd);
            drop(will_rx);
            let mut sup = core_guards(front, watch_agent)?;
            sup.set_will(will_tx);
            Ok(sup)
        }
        ForkResult::Parent { child } => {
            drop(will_tx);
            Front {
                core: child,
                original_parent,
                sfd: front_sfd,
                watched,
                will: will_rx,
                aftercare,
            }
            .run(parent_already_gone)
        }
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

fn core_guards(front: Pid, agent_watch: bool) -> nix::Result<Supervisor> {
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
    Ok(Supervisor::new(sfd, front, true, agent_watch, pending))
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
    /// The read end of the core's last will (non-blocking).
    will: OwnedFd,
    aftercare: Aftercare,
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
        let rc = unsafe { libc::sigqueue(self.core.as_raw(), sig as libc::c_int, value) };
        if rc != 0 {
            // ESRCH: the core is gone (its status is on its way). Anything else is worth a line:
            // the core will not hear of this cause.
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                crate::output::warn("front", &format!("cannot tell the core about {sig}: {e}"));
            }
        }
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

    /// The last complete line the core wrote to its will (empty when it wrote none). The core
    /// is dead and the front holds no write end, so the reads end at EOF and never block.
    fn last_will(&self) -> Vec<u8> {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = nix::unistd::read(&self.will, &mut buf) {
            all.extend_from_slice(&buf[..n]);
        }
        let complete = match all.iter().rposition(|&b| b == b'\n') {
            Some(end) => &all[..end],
            None => return Vec::new(),
        };
        let start = complete
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        complete[start..].to_vec()
    }

    fn mirror_core_if_done(&self) {
        loop {
            match waitpid(self.core, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => std::process::exit(code),
                Ok(WaitStatus::Signaled(_, s, _)) => {
                    // Reaped first: the core's pid no longer names a live process, which is
                    // what the aftercare checks before it kills anything of the run's.
                    (self.aftercare)(self.core, &self.last_will());
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
