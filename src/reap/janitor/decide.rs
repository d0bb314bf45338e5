//! The janitor's decisions, pure: what to do about a run dir given its record, and what to say
//! about a live lock. The plan (plan.rs) makes them from what it reads without a lock; the real
//! sweep (apply.rs) makes the same ones again from what it re-reads under the run's lock. One
//! function each, so a dry run and a sweep can only differ where the state changed between them.

use super::report::{entry, Entry};
use crate::config::duration;
use crate::ident::names::{Domain, RunId};
use crate::reap::reaper::OwnDead;
use crate::state::record::{LockMeta, RunRecord, State};
use crate::sys::safe_fs::ReadError;
use std::time::Duration;

/// What becomes of a run dir whose `run.lock` is free.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum RunDirAction {
    /// Left alone, with the reason.
    Skip(String),
    /// No record: it never reached its app.
    RemoveUnrecorded,
    /// Clean, kept with `--keep-run-dir`, within its retention: this much of it is left.
    Keep { left: Duration },
    /// Clean and done with.
    Remove(Gone),
    /// An unreadable record (the reason) in a dir named like a run id: an unknown dead run.
    ReapUnreadable { id: RunId, why: String },
    /// A dead unclean run: reaped under its app's lock.
    ReapUnclean { app: Domain },
}

/// Why a clean run dir goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Gone {
    /// A reaper settled it: no retention.
    Reaped,
    /// Kept with `--keep-run-dir`, and its retention has passed.
    PastRetention,
    /// Its run died after its teardown: what the teardown left running goes with it.
    DiedAfterTeardown,
}

impl RunDirAction {
    /// Decide from the record of run dir `name` and the age of that record.
    pub(super) fn of(
        name: &str,
        record: &Result<RunRecord, ReadError>,
        record_age: Duration,
        retain: Duration,
    ) -> RunDirAction {
        match record {
            Err(ReadError::Missing) => RunDirAction::RemoveUnrecorded,
            Err(ReadError::Refused(why)) => match RunId::parse(name) {
                Ok(id) => RunDirAction::ReapUnreadable {
                    id,
                    why: why.clone(),
                },
                Err(_) => RunDirAction::Skip(format!("{why}; and its name is not a run id")),
            },
            Ok(r) if r.meta.state == State::Clean => {
                if r.reason.as_deref() == Some(crate::reap::reaper::REAPED) {
                    RunDirAction::Remove(Gone::Reaped)
                } else if !r.keep {
                    RunDirAction::Remove(Gone::DiedAfterTeardown)
                } else if record_age >= retain {
                    RunDirAction::Remove(Gone::PastRetention)
                } else {
                    RunDirAction::Keep {
                        left: retain - record_age,
                    }
                }
            }
            // The reaper only reaps a run dir named after its record's run.
            Ok(r) if r.meta.run_id != name => RunDirAction::Skip(format!(
                "its record names run {:?}, not {name:?}; not touched",
                r.meta.run_id
            )),
            Ok(r) => match Domain::parse(&r.meta.app) {
                Ok(app) => RunDirAction::ReapUnclean { app },
                Err(_) => {
                    RunDirAction::Skip(format!("record names an invalid app {:?}", r.meta.app))
                }
            },
        }
    }

    /// The run whose processes and cgroups this action kills, if any.
    pub(super) fn kills(&self, name: &str) -> Option<String> {
        match self {
            RunDirAction::ReapUnreadable { id, .. } => Some(id.to_string()),
            RunDirAction::ReapUnclean { .. } | RunDirAction::Remove(Gone::DiedAfterTeardown) => {
                Some(name.to_owned())
            }
            _ => None,
        }
    }

    /// The entry a sweep reports once it has done this (a dry run says `would-…`).
    pub(super) fn entry(&self, name: &str, record: Option<&RunRecord>) -> Entry {
        let (action, detail) = match self {
            RunDirAction::Skip(why) => ("skipped", why.clone()),
            RunDirAction::RemoveUnrecorded => (
                "removed",
                "no run record (it never reached its app)".to_owned(),
            ),
            RunDirAction::Keep { left } => (
                "kept",
                format!(
                    "kept with --keep-run-dir: removed when its retention (--retain-failed) \
                     passes, in {}",
                    duration::human_secs(left.as_secs())
                ),
            ),
            RunDirAction::Remove(Gone::Reaped) => ("removed", "run dir of a reaped run".into()),
            RunDirAction::Remove(Gone::PastRetention) => (
                "removed",
                "kept with --keep-run-dir, past its retention".into(),
            ),
            RunDirAction::Remove(Gone::DiedAfterTeardown) => (
                "removed",
                "run dir of a run that died after its teardown (what that teardown left \
                 running is killed)"
                    .into(),
            ),
            RunDirAction::ReapUnreadable { why, .. } => (
                "reaped",
                format!(
                    "unknown dead run ({why}): what carries its id is killed, then the \
                     fallback teardown (--teardown) runs"
                ),
            ),
            RunDirAction::ReapUnclean { .. } => (
                "reaped",
                "dead unclean run, reaped under its app's lock".into(),
            ),
        };
        let mut e = entry("run-dir", name, action);
        e.detail = Some(detail);
        if let RunDirAction::ReapUnreadable { id, .. } = self {
            e.run_id = Some(id.to_string());
        }
        if let Some(r) = record {
            e.app = Some(r.meta.app.clone());
            e.run_id = Some(r.meta.run_id.clone());
        }
        e
    }
}

/// The entry of an unheld app lock: its own dead run (if any) is reaped under it, then it is
/// unlinked while still held.
pub(super) fn unheld_lock(
    name: &str,
    app: &Domain,
    meta: Option<&LockMeta>,
    own: Option<&OwnDead>,
) -> Entry {
    let (action, detail) = match own {
        Some(OwnDead::Run(m)) => (
            "reaped",
            format!("dead run {}, then its lockfile", m.run_id),
        ),
        Some(OwnDead::Unknown(why)) => (
            "reaped",
            format!(
                "unknown dead run ({why}) with the fallback teardown (--teardown), then its \
                 lockfile"
            ),
        ),
        None => ("removed", "unheld lockfile of a clean run".to_owned()),
    };
    let mut e = entry("lockfile", name, action);
    e.app = Some(app.to_string());
    // Unknown: the metadata (if any) is not this dead run's.
    if !matches!(own, Some(OwnDead::Unknown(_))) {
        e.run_id = meta.map(|m| m.run_id.clone());
    }
    e.detail = Some(detail);
    e
}

/// The entry of a held app lock: a live run, left alone. `record` is the holder's run record
/// (for its bounds); the kernel's `holder` is the truth, so a mismatch with the metadata is
/// said, and so is a holder held longer than its own bounds allow (a possible leak).
pub(super) fn live(
    name: &str,
    app: &Domain,
    meta: Option<&LockMeta>,
    holder: Option<i32>,
    record: Option<&RunRecord>,
    now: u64,
) -> Entry {
    let mut e = entry("lockfile", name, "live");
    e.app = Some(app.to_string());
    e.run_id = meta.map(|m| m.run_id.clone());
    e.pid = meta.map(|m| m.pid).or(holder);
    let mut notes = Vec::new();
    if let Some(m) = meta {
        let (deadline, grace, td) = record
            .map(|r| (r.deadline_ms, r.grace_ms, r.teardown_timeout_ms))
            .unwrap_or((3_600_000, 10_000, 300_000));
        let bound = Duration::from_millis(2 * (deadline + grace + td));
        let held_for = now.saturating_sub(m.started_at);
        if deadline > 0 && Duration::from_secs(held_for) > bound {
            notes.push(format!(
                "possible leaked run: held for {} (> 2 × (deadline + grace + teardown timeout) = {})",
                duration::human_secs(held_for),
                duration::human(bound)
            ));
        }
    }
    // A janitor mid-reap holds the lock under the dead run's metadata.
    if let (Some(m), Some(h)) = (meta, holder) {
        if h != m.pid {
            notes.push(format!(
                "the lock is held by pid {h}, not by the recorded pid {}",
                m.pid
            ));
        }
    }
    if !notes.is_empty() {
        e.detail = Some(notes.join("; "));
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::record::samples;

    const DAY: Duration = Duration::from_secs(86_400);

    fn rec(id: &str, state: State, keep: bool, reason: Option<&str>) -> RunRecord {
        RunRecord {
            keep,
            reason: reason.map(str::to_owned),
            ..samples::record(samples::meta("a.example.org", id, state))
        }
    }

    fn of(name: &str, r: Result<RunRecord, ReadError>, age_s: u64) -> RunDirAction {
        RunDirAction::of(name, &r, Duration::from_secs(age_s), DAY)
    }

    #[test]
    fn a_kept_run_dir_waits_for_its_retention_and_says_how_long() {
        let kept = rec("k", State::Clean, true, None);
        let a = of("k", Ok(kept.clone()), 3_600);
        assert_eq!(
            a,
            RunDirAction::Keep {
                left: Duration::from_secs(82_800)
            }
        );
        let e = a.entry("k", Some(&kept));
        assert_eq!(e.action, "kept");
        assert!(e.detail.unwrap_or_default().contains("in 23h00m"));
        assert_eq!(
            of("k", Ok(kept.clone()), 86_400),
            RunDirAction::Remove(Gone::PastRetention)
        );
        // Reaped, or died after its teardown: no retention, whatever its age.
        assert_eq!(
            of("k", Ok(rec("k", State::Clean, true, Some("reaped"))), 0),
            RunDirAction::Remove(Gone::Reaped)
        );
        assert_eq!(
            of("k", Ok(rec("k", State::Clean, false, None)), 0),
            RunDirAction::Remove(Gone::DiedAfterTeardown)
        );
    }

    #[test]
    fn an_unclean_run_dir_is_reaped_only_when_its_record_can_name_its_run_and_app() {
        assert!(matches!(
            of("u", Ok(rec("u", State::Running, false, None)), 0),
            RunDirAction::ReapUnclean { .. }
        ));
        assert!(matches!(
            of("u", Ok(rec("other", State::Running, false, None)), 0),
            RunDirAction::Skip(_)
        ));
        let mut bad = rec("u", State::TearingDown, false, None);
        bad.meta.app = "../etc".into();
        assert!(matches!(of("u", Ok(bad), 0), RunDirAction::Skip(_)));
        assert_eq!(
            of("u", Err(ReadError::Missing), 0),
            RunDirAction::RemoveUnrecorded
        );
        assert!(matches!(
            of("u", Err(ReadError::Refused("torn".into())), 0),
            RunDirAction::ReapUnreadable { .. }
        ));
        assert!(matches!(
            of("not a run id!", Err(ReadError::Refused("torn".into())), 0),
            RunDirAction::Skip(_)
        ));
    }

    #[test]
    fn a_live_lock_held_past_its_bounds_is_a_possible_leak() {
        let app = Domain::parse("a.example.org").unwrap();
        let meta = samples::meta("a.example.org", "r", State::Running);
        let mut r = rec("r", State::Running, false, None);
        (r.deadline_ms, r.grace_ms, r.teardown_timeout_ms) = (1_000, 0, 0);
        // Started at 1: held 2 s is within 2 × 1 s; 3 s is past it.
        let at = |now| {
            live(
                "app-a.lock",
                &app,
                Some(&meta),
                Some(meta.pid),
                Some(&r),
                now,
            )
        };
        assert_eq!(at(3).detail, None);
        let leak = at(4).detail.unwrap_or_default();
        assert!(
            leak.starts_with("possible leaked run: held for 3s"),
            "{leak}"
        );
        let other = live("app-a.lock", &app, Some(&meta), Some(7), Some(&r), 2);
        assert_eq!(
            other.detail.as_deref(),
            Some("the lock is held by pid 7, not by the recorded pid 999999")
        );
        assert_eq!(other.pid, Some(meta.pid));
    }
}
