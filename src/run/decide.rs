//! The funnel's decisions, separated from the waiting: a pure function from (phase, event) to
//! action, so every escalation (first signal tears down, a second one never starts another
//! teardown) is unit-tested without a kernel; the real-kernel suite proves the wiring.

use crate::exit;
use crate::sys::signals::{Event, Sig};

/// Where the run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before the command started (claiming, waiting for the lock, reconciling, setup).
    Preparing,
    /// The command (or setup) runs.
    Running,
    /// Teardown has begun: nothing may start it again.
    TearingDown,
}

/// Why the run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The command exited by itself with this status (128+N when killed by a signal N).
    Exited(i32),
    Signal(Sig),
    Deadline,
    ParentDied,
    /// The reader of tether's stdout/stderr went away: the CI agent died (D32).
    AgentGone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing to decide (a child changed state, a fd became readable).
    Continue,
    /// Begin the one teardown.
    TearDown(Cause),
    /// A funnel event during teardown: log it, change nothing.
    LogIgnored,
}

pub fn next_action(phase: Phase, event: Event) -> Action {
    let cause = match event {
        Event::Signal(s) => Cause::Signal(s),
        Event::Deadline => Cause::Deadline,
        Event::ParentDied => Cause::ParentDied,
        Event::AgentGone => Cause::AgentGone,
        Event::Child | Event::Ready => return Action::Continue,
    };
    match phase {
        Phase::Preparing | Phase::Running => Action::TearDown(cause),
        Phase::TearingDown => Action::LogIgnored,
    }
}

/// Rank of a teardown cause when several arrive in one batch. The kernel keeps no order
/// between signals pending at the same time (it hands out the lowest number first: SIGINT
/// before SIGTERM), so "the first signal decides" is defined as: SIGTERM, SIGINT, SIGHUP,
/// then parent death, then the agent gone, then the deadline. A signal tether received wins
/// over its parent's death: an agent that signals the step's process group kills the step
/// shell with the same signal, and `TETHER_REASON` must not depend on which died first (D14).
fn precedence(cause: Cause) -> u8 {
    match cause {
        Cause::Signal(Sig::Term) => 0,
        Cause::Signal(Sig::Int) => 1,
        Cause::Signal(Sig::Hup) => 2,
        Cause::ParentDied => 3,
        Cause::AgentGone => 4,
        Cause::Deadline => 5,
        Cause::Exited(_) => 6,
    }
}

/// Decide on a whole batch of events that arrived together: the winning action and the funnel
/// events that lost (to be logged as ignored).
pub fn decide_batch(phase: Phase, events: &[Event]) -> (Action, Vec<Event>) {
    let mut best: Option<(Cause, Event)> = None;
    let mut losers = Vec::new();
    for &ev in events {
        match next_action(phase, ev) {
            Action::TearDown(cause) => match best {
                Some((b, _)) if precedence(b) <= precedence(cause) => losers.push(ev),
                Some((_, bev)) => {
                    losers.push(bev);
                    best = Some((cause, ev));
                }
                None => best = Some((cause, ev)),
            },
            Action::LogIgnored => losers.push(ev),
            Action::Continue => {}
        }
    }
    match best {
        Some((cause, _)) => (Action::TearDown(cause), losers),
        None if !losers.is_empty() => (Action::LogIgnored, losers),
        None => (Action::Continue, losers),
    }
}

impl Cause {
    /// `TETHER_REASON` for the teardown command.
    pub fn reason(self) -> &'static str {
        match self {
            Cause::Exited(_) => "exited",
            Cause::Signal(_) => "signal",
            Cause::Deadline => "deadline",
            Cause::ParentDied => "parent-died",
            Cause::AgentGone => "agent-gone",
        }
    }

    /// The exit code before teardown's verdict.
    pub fn exit_code(self) -> i32 {
        match self {
            Cause::Exited(code) => code,
            Cause::Signal(Sig::Term) | Cause::ParentDied | Cause::AgentGone => exit::TERMINATED,
            Cause::Signal(Sig::Int) => exit::INTERRUPTED,
            Cause::Signal(Sig::Hup) => exit::HUNG_UP,
            Cause::Deadline => exit::DEADLINE,
        }
    }

    /// The final exit code: a teardown failure after a passing command must not look green.
    pub fn final_exit_code(self, teardown_ok: bool) -> i32 {
        match self {
            Cause::Exited(0) if !teardown_ok => exit::TETHER_FAILURE,
            other => other.exit_code(),
        }
    }

    /// The summary's `result=`.
    pub fn result(self, teardown_ok: bool) -> &'static str {
        match self {
            Cause::Exited(0) if teardown_ok => "passed",
            Cause::Exited(_) => "failed",
            Cause::Signal(_) | Cause::ParentDied | Cause::AgentGone => "cancelled",
            Cause::Deadline => "deadline",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_signal_tears_down_second_is_only_logged() {
        let first = next_action(Phase::Running, Event::Signal(Sig::Term));
        assert_eq!(first, Action::TearDown(Cause::Signal(Sig::Term)));
        for ev in [
            Event::Signal(Sig::Term),
            Event::Signal(Sig::Int),
            Event::Signal(Sig::Hup),
            Event::Deadline,
            Event::ParentDied,
            Event::AgentGone,
        ] {
            assert_eq!(next_action(Phase::TearingDown, ev), Action::LogIgnored);
        }
    }

    #[test]
    fn every_funnel_source_tears_down_while_preparing() {
        assert_eq!(
            next_action(Phase::Preparing, Event::Deadline),
            Action::TearDown(Cause::Deadline)
        );
        assert_eq!(
            next_action(Phase::Preparing, Event::ParentDied),
            Action::TearDown(Cause::ParentDied)
        );
        assert_eq!(next_action(Phase::Running, Event::Child), Action::Continue);
        assert_eq!(
            next_action(Phase::TearingDown, Event::Ready),
            Action::Continue
        );
    }

    #[test]
    fn signals_arriving_together_follow_the_precedence() {
        let batch = [
            Event::Signal(Sig::Int),
            Event::Child,
            Event::Signal(Sig::Term),
        ];
        let (action, losers) = decide_batch(Phase::Running, &batch);
        assert_eq!(action, Action::TearDown(Cause::Signal(Sig::Term)));
        assert_eq!(losers, vec![Event::Signal(Sig::Int)]);
        let (action, _) = decide_batch(Phase::Preparing, &[Event::Deadline, Event::ParentDied]);
        assert_eq!(action, Action::TearDown(Cause::ParentDied));
        // A received signal wins over parent death (the agent's group TERM also kills the
        // step shell), parent death over the agent's death, and that over the deadline.
        let (action, losers) = decide_batch(
            Phase::Running,
            &[
                Event::ParentDied,
                Event::Signal(Sig::Term),
                Event::AgentGone,
            ],
        );
        assert_eq!(action, Action::TearDown(Cause::Signal(Sig::Term)));
        assert_eq!(losers, vec![Event::ParentDied, Event::AgentGone]);
        let (action, _) = decide_batch(
            Phase::Running,
            &[Event::Signal(Sig::Hup), Event::ParentDied],
        );
        assert_eq!(action, Action::TearDown(Cause::Signal(Sig::Hup)));
        let (action, _) = decide_batch(
            Phase::Running,
            &[Event::Deadline, Event::AgentGone, Event::ParentDied],
        );
        assert_eq!(action, Action::TearDown(Cause::ParentDied));
        let (action, _) = decide_batch(Phase::Running, &[Event::Deadline, Event::AgentGone]);
        assert_eq!(action, Action::TearDown(Cause::AgentGone));
        let (action, losers) = decide_batch(Phase::TearingDown, &[Event::Signal(Sig::Hup)]);
        assert_eq!(action, Action::LogIgnored);
        assert_eq!(losers.len(), 1);
        assert_eq!(
            decide_batch(Phase::Running, &[Event::Child]).0,
            Action::Continue
        );
    }

    #[test]
    fn exit_codes_follow_the_spec_table() {
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
    }
}
