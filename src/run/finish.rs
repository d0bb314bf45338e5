//! How a run ends: the summary (CLI-CONTRACT §13), made in one place for every way a run can end, the
//! report after it (CLI-CONTRACT §14), and the exit code (CLI-CONTRACT §7). Also the run's fixed lines (the funnel's
//! cause, ignored events, the waiting/acquired lines).

use super::decide::Cause;
use super::plan::Spec;
use super::{Ctx, Stop};
use crate::config::duration::{self, human, human_secs};
use crate::error::Error;
use crate::ident::ci_env::CiInfo;
use crate::ident::names::Domain;
use crate::out::history;
use crate::out::summary::Summary;
use crate::output;
use crate::state::record::{self, LockMeta};
use crate::sys::safe_fs::Dir;
use crate::sys::signals::Event;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What the summary of any run is made from.
pub(super) struct Facts {
    run_id: String,
    app: String,
    ci: Option<CiInfo>,
    lock_wait: Duration,
    slot_wait: Option<Duration>,
    runtime: Duration,
    result: &'static str,
    exit: i32,
    teardown: &'static str,
    reason: &'static str,
}

impl Facts {
    /// A run that failed before its command: nothing waited, nothing ran, no teardown.
    fn error(run_id: String, app: String, ci: Option<CiInfo>, e: &Error) -> Facts {
        Facts {
            run_id,
            app,
            ci,
            lock_wait: Duration::ZERO,
            slot_wait: None,
            runtime: Duration::ZERO,
            result: "failed",
            exit: e.exit_code(),
            teardown: "none",
            reason: "error",
        }
    }

    /// The one place a summary is made.
    fn summary(self) -> Summary {
        Summary {
            run_id: self.run_id,
            app: self.app,
            result: self.result.into(),
            exit: self.exit,
            lock_wait_ms: self.lock_wait.as_millis() as u64,
            slot_wait_ms: self.slot_wait.map(|d| d.as_millis() as u64),
            runtime_ms: self.runtime.as_millis() as u64,
            teardown: self.teardown.into(),
            reason: self.reason.into(),
            ci: self.ci,
        }
    }
}

/// The run's line in the journal (`out::history`), for a run that had a runs dir: what the
/// summary does not say — its group, host, how long it held the app, what it reaped.
struct Journal {
    runs: Dir,
    group: Option<String>,
    host: String,
    hold: Duration,
    reaps: usize,
}

impl Journal {
    fn of(ctx: &Ctx) -> Journal {
        Journal {
            runs: ctx.runs_dir.clone(),
            group: ctx.spec.group.clone(),
            host: ctx.record.meta.host.clone(),
            hold: ctx.held_since.map_or(Duration::ZERO, |t| t.elapsed()),
            reaps: ctx.reaps,
        }
    }

    fn append(self, s: &Summary) {
        let entry = history::Entry {
            at: record::unix_now(),
            run_id: s.run_id.clone(),
            app: s.app.clone(),
            group: self.group,
            host: self.host,
            result: s.result.clone(),
            exit: s.exit,
            reason: s.reason.clone(),
            lock_wait_ms: s.lock_wait_ms,
            slot_wait_ms: s.slot_wait_ms,
            runtime_ms: s.runtime_ms,
            hold_ms: self.hold.as_millis() as u64,
            teardown: s.teardown.clone(),
            reaps: self.reaps,
        };
        history::append(&self.runs, &entry);
    }
}

/// A run that tore down (or, for a funnel event before it touched its app, gave up).
pub(super) struct Finished {
    facts: Facts,
    journal: Journal,
    summary_json: Option<PathBuf>,
    report: Option<crate::config::Report>,
}

impl Finished {
    pub(super) fn new(ctx: Ctx, cause: Cause, teardown_ok: bool, runtime: Duration) -> Finished {
        let teardown = match (&ctx.spec.teardown, teardown_ok) {
            (None, _) => "none",
            (Some(_), true) => "ok",
            (Some(_), false) => "failed",
        };
        Finished::of(&ctx, cause, teardown_ok, teardown, runtime)
    }

    fn of(
        ctx: &Ctx,
        cause: Cause,
        teardown_ok: bool,
        teardown: &'static str,
        runtime: Duration,
    ) -> Finished {
        Finished {
            facts: Facts {
                run_id: ctx.spec.run_id.to_string(),
                app: ctx.spec.app.to_string(),
                ci: ctx.ci(),
                lock_wait: ctx.admission_wait(),
                slot_wait: ctx.slot_wait(),
                runtime,
                result: cause.result(teardown_ok),
                exit: cause.final_exit_code(teardown_ok),
                teardown,
                reason: cause.reason(),
            },
            journal: Journal::of(ctx),
            summary_json: ctx.spec.summary_json.clone(),
            report: ctx.spec.report.clone(),
        }
    }

    /// Print the summary (last line), write its JSON, post the report; the exit code.
    pub(super) fn exit(self) -> i32 {
        let exit = self.facts.exit;
        let summary = self.facts.summary();
        summary.publish(self.summary_json.as_deref());
        self.journal.append(&summary);
        // After teardown and after the exit code is fixed: reporting cannot change either.
        if let Some(r) = &self.report {
            crate::out::report::publish(r, &summary);
        }
        exit
    }
}

/// A run that gave up before it touched its app. Nothing is left behind.
pub(super) struct Aborted(Box<Ending>);

enum Ending {
    /// A funnel event: the run ends as it would have, minus the teardown it did not owe.
    Event(Finished),
    /// Busy, or tether's own failure.
    GaveUp {
        facts: Facts,
        /// None when the run never had a runs dir to write it in.
        journal: Option<Journal>,
        summary_json: Option<PathBuf>,
    },
}

impl Aborted {
    /// The plan could not be made (bad arguments, config, dirs, command): exit 125/126/127.
    /// The summary line is still printed — a CI log scraper finds every run's last word —
    /// with `-` for the run id (there is none yet).
    pub(super) fn unplanned(app: String, summary_json: Option<PathBuf>, e: Error) -> Aborted {
        output::error(&e.message);
        Aborted(Box::new(Ending::GaveUp {
            facts: Facts::error("-".into(), app, None, &e),
            journal: None,
            summary_json,
        }))
    }

    /// The state dirs could not be made.
    pub(super) fn before_claim(spec: Spec, e: Error) -> Aborted {
        output::error(&e.message);
        Aborted(Box::new(Ending::GaveUp {
            facts: Facts::error(
                spec.run_id.to_string(),
                spec.app.to_string(),
                spec.ci.clone(),
                &e,
            ),
            journal: None,
            summary_json: spec.summary_json,
        }))
    }

    /// Given up with the claim already released.
    pub(super) fn from_ctx(ctx: Ctx, stop: Stop) -> Aborted {
        let (result, exit, reason) = match stop {
            // A funnel event: the cause's own result and code, no teardown was owed.
            Stop::Event(cause) => {
                return Aborted(Box::new(Ending::Event(Finished::of(
                    &ctx,
                    cause,
                    true,
                    "none",
                    Duration::ZERO,
                ))))
            }
            Stop::Busy(msg) => {
                output::emit(output::Level::Warn, "busy", &msg, &[]);
                ("cancelled", crate::exit::BUSY, "busy")
            }
            Stop::Fail(e) => {
                output::error(&e.message);
                ("failed", e.exit_code(), "error")
            }
            Stop::Superseded(by) => {
                output::emit(
                    output::Level::Warn,
                    "superseded",
                    &format!(
                        "superseded by run {by} of this run's group while queued — leaving \
                         the queue, nothing ran"
                    ),
                    &[("by", by.into())],
                );
                ("superseded", crate::exit::TERMINATED, "superseded")
            }
        };
        Aborted(Box::new(Ending::GaveUp {
            facts: Facts {
                run_id: ctx.spec.run_id.to_string(),
                app: ctx.spec.app.to_string(),
                ci: ctx.ci(),
                lock_wait: ctx.admission_wait(),
                slot_wait: ctx.slot_wait(),
                runtime: Duration::ZERO,
                result,
                exit,
                teardown: "none",
                reason,
            },
            journal: Some(Journal::of(&ctx)),
            summary_json: ctx.spec.summary_json,
        }))
    }

    pub(super) fn exit(self) -> i32 {
        match *self.0 {
            Ending::Event(finished) => finished.exit(),
            Ending::GaveUp {
                facts,
                journal,
                summary_json,
            } => {
                let exit = facts.exit;
                let summary = facts.summary();
                summary.publish(summary_json.as_deref());
                if let Some(j) = journal {
                    j.append(&summary);
                }
                exit
            }
        }
    }
}

/// The funnel's line for the cause (CLI-CONTRACT §13).
pub(super) fn announce(cause: Cause, deadline: Duration) {
    let (event, msg) = match cause {
        Cause::Signal(s) => ("received", format!("received {} — tearing down", s.name())),
        Cause::Deadline => (
            "deadline",
            format!(
                "deadline {} reached — tearing down",
                duration::canonical(deadline)
            ),
        ),
        Cause::ParentDied => ("parent-died", "parent died — tearing down".to_string()),
        Cause::AgentGone => (
            "agent-gone",
            "agent gone (stdout/stderr has no reader) — tearing down".to_string(),
        ),
        // The supervisor said it in its one `lock-lost` line when it noticed (PROTOCOL §16).
        Cause::Exited(_) | Cause::LockLost => return,
    };
    output::info(event, &msg);
}

/// Funnel events that lost to the first one, or arrived during teardown: logged, ignored.
pub(super) fn log_ignored(events: &[Event]) {
    for ev in events {
        let what = match ev {
            Event::Signal(s) => format!("received {} during teardown — ignored", s.name()),
            Event::Deadline => "deadline reached during teardown — ignored".into(),
            Event::ParentDied => "parent died during teardown — ignored".into(),
            Event::AgentGone => "agent gone during teardown — ignored".into(),
            Event::LockLost => "lock lost during teardown — ignored".into(),
            _ => continue,
        };
        output::info("ignored", &what);
    }
}

/// `run <id> (pid <pid>, <age>)` from the holder's metadata, else what the kernel says.
pub(super) fn describe_holder(meta: Option<LockMeta>, pid: Option<i32>) -> String {
    match meta {
        Some(m) => {
            // `started_at` is whole seconds: so is the age (`0s`, never `0ms`).
            let age = record::unix_now().saturating_sub(m.started_at);
            format!("run {} (pid {}, {})", m.run_id, m.pid, human_secs(age))
        }
        None => match pid {
            Some(pid) => format!("an unknown run (pid {pid}, age unknown)"),
            None => "an unknown run (pid unknown, age unknown)".into(),
        },
    }
}

pub(super) fn announce_acquired(app: &Domain, since: Instant) {
    output::emit(
        output::Level::Info,
        "acquired",
        &format!("app lock {app}: acquired after {}", human(since.elapsed())),
        &[("app", app.as_str().into())],
    );
}

pub(super) fn announce_waiting(app: &Domain, holder: &str) {
    output::emit(
        output::Level::Info,
        "waiting",
        &format!("app lock {app}: held by {holder} — waiting"),
        &[("app", app.as_str().into())],
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::record::{samples, State};

    #[test]
    fn a_holder_age_is_said_in_whole_seconds() {
        let mut m = samples::meta("a.example.org", "r", State::Running);
        m.started_at = record::unix_now();
        let text = describe_holder(Some(m.clone()), None);
        // Just started: 0 s (or 1 s if the clock ticked), never `0ms`.
        assert!(
            text == "run r (pid 999999, 0s)" || text == "run r (pid 999999, 1s)",
            "{text}"
        );
        m.started_at = record::unix_now().saturating_sub(192);
        let text = describe_holder(Some(m), None);
        assert!(
            text.ends_with(", 3m12s)") || text.ends_with(", 3m13s)"),
            "{text}"
        );
    }
}
