//! The signals tether funnels, and what they become: [`Event`]s. Shared by the front (which
//! forwards) and the supervisor (which decides nothing, but hands events to the run).
//!
//! The front tells the core *why* with `sigqueue` tokens, because the siginfo is the only
//! thing that survives the kernel merging signals: a TERM the front received from anyone but
//! a dying parent goes on as a forwarded signal, its parent's death as parent death, and the
//! core recognises the front's own death by its PDEATHSIG naming the front as sender without
//! a token (D14).

use nix::sys::signal::{self, SigHandler, SigSet, SigmaskHow, Signal};
use std::time::{Duration, Instant};

/// Markers the front puts in `sigqueue` data. The front never signals the core without one,
/// so a TERM from the front *without* a token is the front's PDEATHSIG: the front died.
pub(crate) const PARENT_DIED_TOKEN: u64 = 0x7e7e_0001;
/// A TERM/INT/HUP the front received (from anyone but its dying parent), passed on.
pub(crate) const FORWARD_TOKEN: u64 = 0x7e7e_0002;
/// The reader of the front's stdout/stderr went away.
pub(crate) const AGENT_GONE_TOKEN: u64 = 0x7e7e_0003;

/// Agent-gone travels on a signal of its own, never merged with a TERM: when the config turns
/// the watch off the core drops it, and a real SIGTERM merged into it would be lost with it.
pub(crate) const AGENT_GONE_SIGNAL: Signal = Signal::SIGUSR1;

/// Every signal the funnel takes over (blocked from the start, read from a signalfd).
pub(crate) const FUNNEL_SIGNALS: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGALRM,
    Signal::SIGCHLD,
    AGENT_GONE_SIGNAL,
];

/// The three external signals tether funnels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sig {
    Term,
    Int,
    Hup,
}

impl Sig {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Sig::Term => "SIGTERM",
            Sig::Int => "SIGINT",
            Sig::Hup => "SIGHUP",
        }
    }
}

/// Everything that can wake the core. Raw signal numbers never leave this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// TERM/INT/HUP from the outside (forwarded by the front or sent to the core directly).
    Signal(Sig),
    /// The deadline alarm fired.
    Deadline,
    /// The front (or the front's parent) died.
    ParentDied,
    /// The reader of the front's stdout/stderr (the CI agent) went away.
    AgentGone,
    /// The watched lease (the cluster lock's heartbeat) is lost: another host may get the
    /// lock (issue 16 §4; not a signal, but it ends the run the same way).
    LockLost,
    /// Some child changed state: the caller reaps.
    Child,
    /// The extra fd passed to [`Funnel::wait`] became readable.
    Ready,
}

pub(crate) fn funnel_set() -> SigSet {
    let mut set = SigSet::empty();
    for s in FUNNEL_SIGNALS {
        set.add(s);
    }
    set
}

/// Undo an agent's `SIG_IGN` (an ignored signal is discarded even while blocked, so the
/// funnel would never see it), then block the set so only the signalfd receives them.
pub(crate) fn take_over_signals() -> nix::Result<()> {
    for s in FUNNEL_SIGNALS {
        // SAFETY: installing SIG_DFL is always sound; no handler code runs.
        unsafe { signal::signal(s, SigHandler::SigDfl)? };
    }
    signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&funnel_set()), None)
}

pub(crate) fn set_pdeathsig(sig: Signal) -> nix::Result<()> {
    nix::sys::prctl::set_pdeathsig(Some(sig))
}

/// How long until `deadline`, for poll timeouts.
pub(crate) fn until(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}
