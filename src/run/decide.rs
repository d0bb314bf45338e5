//! The funnel's decisions, separated from the waiting: a pure function from a batch of events
//! to the cause the run ends with (and the events that lost, to be logged as ignored), unit-
//! tested without a kernel. That a later event never starts a second teardown is not decided
//! here but held by the run's shape: `Ended::teardown` consumes the run, and events that arrive
//! meanwhile are queued by the supervisor and only logged (run/teardown.rs); the real-kernel
//! suite proves the wiring.

use crate::exit;
use crate::sys::signals::{Event, Sig};

/// Why the run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// The command exited by itself with this status (128+N when killed by a signal N).
    Exited(i32),
    Signal(Sig),
    Deadline,
    ParentDied,
    /// The reader of tether's stdout/stderr went away: the CI agent died (D32).
    AgentGone,
    /// The cluster lock's session is lost (its heartbeat failed or went unanswered past
    /// `self_fence`): another host may get the lock, so the command dies at once (D57).
    LockLost,
}

/// The cause a funnel event ends the run with; `None` for events that only wake the wait (a
/// child changed state, a fd became readable).
pub(crate) fn cause_of(event: Event) -> Option<Cause> {
    match event {
        Event::Signal(s) => Some(Cause::Signal(s)),
        Event::Deadline => Some(Cause::Deadline),
        Event::ParentDied => Some(Cause::ParentDied),
        Event::AgentGone => Some(Cause::AgentGone),
        Event::LockLost => Some(Cause::LockLost),
        Event::Child | Event::Ready => None,
    }
}

/// Rank of a teardown cause when several arrive in one batch. The kernel keeps no order
/// between signals pending at the same time (it hands out the lowest number first: SIGINT
/// before SIGTERM), so "the first signal decides" is defined as: SIGTERM, SIGINT, SIGHUP,
/// then parent death, then the agent gone, then the deadline. A signal tether received wins
/// over its parent's death: an agent that signals the step's process group kills the step
/// shell with the same signal, and `TETHER_REASON` must not depend on which died first (D14).
/// A lost lock beats them all (D57): every other cause grants the command a grace period and
/// a signal's exit code, but once the lock may be another host's the command must die at
/// once, and the exit (75, retry later) and `TETHER_REASON=lock-lost` must say so — a
/// teardown told `signal` would not know its deploy may now overlap another host's.
fn precedence(cause: Cause) -> u8 {
    match cause {
        Cause::LockLost => 0,
        Cause::Signal(Sig::Term) => 1,
        Cause::Signal(Sig::Int) => 2,
        Cause::Signal(Sig::Hup) => 3,
        Cause::ParentDied => 4,
        Cause::AgentGone => 5,
        Cause::Deadline => 6,
        Cause::Exited(_) => 7,
    }
}

/// Decide on a whole batch of events that arrived together: the cause that ends the run, if
/// any, and the funnel events that lost (to be logged as ignored).
pub(crate) fn decide_batch(events: &[Event]) -> (Option<Cause>, Vec<Event>) {
    let mut best: Option<(Cause, Event)> = None;
    let mut losers = Vec::new();
    for &ev in events {
        let Some(cause) = cause_of(ev) else {
            continue;
        };
        match best {
            Some((b, _)) if precedence(b) <= precedence(cause) => losers.push(ev),
            Some((_, bev)) => {
                losers.push(bev);
                best = Some((cause, ev));
            }
            None => best = Some((cause, ev)),
        }
    }
    (best.map(|(cause, _)| cause), losers)
}

impl Cause {
    /// `TETHER_REASON` for the teardown command.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Cause::Exited(_) => "exited",
            Cause::Signal(_) => "signal",
            Cause::Deadline => "deadline",
            Cause::ParentDied => "parent-died",
            Cause::AgentGone => "agent-gone",
            Cause::LockLost => "lock-lost",
        }
    }

    /// The exit code before teardown's verdict.
    pub(crate) fn exit_code(self) -> i32 {
        match self {
            Cause::Exited(code) => code,
            Cause::Signal(Sig::Term) | Cause::ParentDied | Cause::AgentGone => exit::TERMINATED,
            Cause::Signal(Sig::Int) => exit::INTERRUPTED,
            Cause::Signal(Sig::Hup) => exit::HUNG_UP,
            Cause::Deadline => exit::DEADLINE,
            Cause::LockLost => exit::UNAVAILABLE,
        }
    }

    /// The final exit code: a teardown failure after a passing command must not look green.
    pub(crate) fn final_exit_code(self, teardown_ok: bool) -> i32 {
        match self {
            Cause::Exited(0) if !teardown_ok => exit::TETHER_FAILURE,
            other => other.exit_code(),
        }
    }

    /// The summary's `result=`.
    pub(crate) fn result(self, teardown_ok: bool) -> &'static str {
        match self {
            Cause::Exited(0) if teardown_ok => "passed",
            Cause::Exited(_) => "failed",
            Cause::Signal(_) | Cause::ParentDied | Cause::AgentGone => "cancelled",
            Cause::Deadline => "deadline",
            Cause::LockLost => "lock-lost",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_cause_wins_a_batch_and_every_other_funnel_event_is_only_logged() {
        let storm = [
            Event::Signal(Sig::Term),
            Event::Signal(Sig::Int),
            Event::Child,
            Event::Signal(Sig::Hup),
            Event::Deadline,
            Event::ParentDied,
            Event::Ready,
            Event::AgentGone,
        ];
        let (cause, losers) = decide_batch(&storm);
        assert_eq!(cause, Some(Cause::Signal(Sig::Term)));
        // A lost lock wins over every signal that arrived with it (D57).
        let mut with_loss = storm.to_vec();
        with_loss.push(Event::LockLost);
        let (cause, losers_then) = decide_batch(&with_loss);
        assert_eq!(cause, Some(Cause::LockLost));
        assert!(losers_then.contains(&Event::Signal(Sig::Term)));
        // Everything but the winner and the two wake-ups is logged as ignored.
        assert_eq!(losers.len(), storm.len() - 3);
        assert!(!losers.contains(&Event::Child) && !losers.contains(&Event::Ready));
    }

    #[test]
    fn every_funnel_source_ends_the_run_and_wakeups_do_not() {
        assert_eq!(cause_of(Event::Deadline), Some(Cause::Deadline));
        assert_eq!(cause_of(Event::ParentDied), Some(Cause::ParentDied));
        assert_eq!(cause_of(Event::AgentGone), Some(Cause::AgentGone));
        assert_eq!(
            cause_of(Event::Signal(Sig::Hup)),
            Some(Cause::Signal(Sig::Hup))
        );
        assert_eq!(cause_of(Event::Child), None);
        assert_eq!(cause_of(Event::Ready), None);
        assert_eq!(decide_batch(&[Event::Child, Event::Ready]), (None, vec![]));
    }

    #[test]
    fn signals_arriving_together_follow_the_precedence() {
        let batch = [
            Event::Signal(Sig::Int),
            Event::Child,
            Event::Signal(Sig::Term),
        ];
        let (cause, losers) = decide_batch(&batch);
        assert_eq!(cause, Some(Cause::Signal(Sig::Term)));
        assert_eq!(losers, vec![Event::Signal(Sig::Int)]);
        let (cause, _) = decide_batch(&[Event::Deadline, Event::ParentDied]);
        assert_eq!(cause, Some(Cause::ParentDied));
        // A received signal wins over parent death (the agent's group TERM also kills the
        // step shell), parent death over the agent's death, and that over the deadline.
        let (cause, losers) = decide_batch(&[
            Event::ParentDied,
            Event::Signal(Sig::Term),
            Event::AgentGone,
        ]);
        assert_eq!(cause, Some(Cause::Signal(Sig::Term)));
        assert_eq!(losers, vec![Event::ParentDied, Event::AgentGone]);
        let (cause, _) = decide_batch(&[Event::Signal(Sig::Hup), Event::ParentDied]);
        assert_eq!(cause, Some(Cause::Signal(Sig::Hup)));
        let (cause, _) = decide_batch(&[Event::Deadline, Event::AgentGone, Event::ParentDied]);
        assert_eq!(cause, Some(Cause::ParentDied));
        let (cause, _) = decide_batch(&[Event::Deadline, Event::AgentGone]);
        assert_eq!(cause, Some(Cause::AgentGone));
    }

    #[test]
    fn exit_codes_follow_the_contract_table() {
        assert_eq!(Cause::Signal(Sig::Term).exit_code(), 143);
        assert_eq!(Cause::Signal(Sig::Int).exit_code(), 130);
        assert_eq!(Cause::Signal(Sig::Hup).exit_code(), 129);
        assert_eq!(Cause::ParentDied.exit_code(), 143);
        assert_eq!(Cause::Deadline.exit_code(), 142);
        assert_eq!(Cause::Exited(7).exit_code(), 7);
        assert_eq!(Cause::Exited(0).final_exit_code(false), 125);
        assert_eq!(Cause::Exited(3).final_exit_code(false), 3);
        assert_eq!(Cause::Exited(0).result(false), "failed");
        assert_eq!(Cause::Exited(0).result(true), "passed");
        assert_eq!(Cause::ParentDied.reason(), "parent-died");
        assert_eq!(Cause::AgentGone.reason(), "agent-gone");
        assert_eq!(Cause::AgentGone.exit_code(), 143);
        assert_eq!(Cause::AgentGone.result(true), "cancelled");
        assert_eq!(Cause::LockLost.exit_code(), 75);
        assert_eq!(Cause::LockLost.final_exit_code(false), 75);
        assert_eq!(Cause::LockLost.reason(), "lock-lost");
        assert_eq!(Cause::LockLost.result(true), "lock-lost");
        assert_eq!(cause_of(Event::LockLost), Some(Cause::LockLost));
    }
}
