//! The waiting line of a queued run (CLI-CONTRACT §13, PROTOCOL §15): its position, the
//! holder and who is ahead, said when the position changes and every interval; and the
//! stopped waiters ahead, skipped after the interval and counted again once they run.

use super::finish::describe_holder;
use crate::config::duration::{self, human_secs};
use crate::ident::names::Domain;
use crate::output;
use crate::state::queue::Entry;
use crate::state::record::{self, State};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The waiting line and what it remembers: the position last said, when to repeat it, and
/// which waiters ahead were seen stopped since when.
pub(super) struct Line {
    app: Domain,
    interval: Duration,
    pub(super) next_progress: Instant,
    said: Option<usize>,
    stopped: HashMap<String, (Instant, bool)>,
}

impl Line {
    pub(super) fn new(app: Domain, interval: Duration) -> Line {
        Line {
            app,
            interval,
            next_progress: Instant::now(),
            said: None,
            stopped: HashMap::new(),
        }
    }

    /// The entries ahead, without the waiters skipped because they have been stopped for the
    /// wait-progress interval (said once per stop). A waiter that runs again counts again.
    pub(super) fn not_skipped<'e>(&self, ahead: &'e [Entry]) -> Vec<&'e Entry> {
        ahead
            .iter()
            .filter(|e| {
                let skipped = self.stopped.get(&e.name).is_some_and(|(_, s)| *s);
                // Looked at again now: a waiter continued since counts at once.
                !(skipped && e.pid.is_some_and(crate::sys::procfs::is_stopped))
            })
            .collect()
    }

    /// Whether the line is due: a new position, or the interval passed.
    pub(super) fn wants_to_say(&self, position: usize) -> bool {
        self.said != Some(position) || Instant::now() >= self.next_progress
    }

    /// Whether a waiter ahead is being skipped (its stop must be looked at again).
    pub(super) fn skips_any(&self) -> bool {
        self.stopped.values().any(|(_, skipped)| *skipped)
    }

    /// Note which waiters ahead (described) are stopped, since when; skip, with a line, those
    /// stopped for the interval.
    pub(super) fn track_stopped(&mut self, ahead: &[Entry]) {
        self.stopped
            .retain(|name, _| ahead.iter().any(|e| &e.name == name));
        for e in ahead {
            let stopped = e.pid.is_some_and(crate::sys::procfs::is_stopped);
            if !stopped {
                self.stopped.remove(&e.name);
                continue;
            }
            let (since, skipped) = self
                .stopped
                .entry(e.name.clone())
                .or_insert((Instant::now(), false));
            if !*skipped && since.elapsed() >= self.interval {
                *skipped = true;
                let who = run_of(e);
                output::emit(
                    output::Level::Warn,
                    "queue-skip",
                    &format!(
                        "app lock {}: {who} ahead in the queue is stopped (state T) for {} — \
                         skipping it",
                        self.app,
                        duration::human(since.elapsed())
                    ),
                    &[("app", self.app.as_str().into())],
                );
            }
        }
    }

    /// The waiting line (entries described).
    pub(super) fn say(
        &mut self,
        locks: &crate::state::applock::AppLocks,
        position: usize,
        total: usize,
        ahead: &[Entry],
    ) {
        self.said = Some(position);
        self.next_progress = Instant::now() + self.interval;
        // From the lock's metadata only (no /proc/locks read: see `queue::describe`): a
        // holder's metadata says `clean` once it released the lock.
        let holder = match locks.holder_meta(&self.app) {
            Some(m) if m.state != State::Clean => {
                let pid = Some(m.pid);
                format!("held by {}", describe_holder(Some(m), pid))
            }
            _ => "free, being handed over".into(),
        };
        let text = format!(
            "app lock {}: position {position} of {total} — {holder}",
            self.app
        );
        let now = record::unix_now();
        let names: Vec<String> = ahead
            .iter()
            .take(AHEAD_SHOWN)
            .map(|e| {
                let waited = e
                    .info
                    .as_ref()
                    .map(|i| human_secs(now.saturating_sub(i.since)))
                    .unwrap_or_else(|| "?".into());
                let skipped = self.stopped.get(&e.name).is_some_and(|s| s.1);
                waiting_for(&run_of(e), &waited, skipped)
            })
            .collect();
        say_line(&self.app, text, (&names, ahead.len()), (position, total));
    }
}

/// Runs named after `ahead:` in a waiting line; more are counted.
pub(super) const AHEAD_SHOWN: usize = 3;

/// One run ahead in a waiting line: `run <id> (waiting <t>[, stopped, skipped])`.
pub(super) fn waiting_for(run: &str, waited: &str, skipped: bool) -> String {
    let skipped = if skipped { ", stopped, skipped" } else { "" };
    format!("{run} (waiting {waited}{skipped})")
}

/// Say a waiting line (CLI-CONTRACT §13): `text` (its beginning, up to the holder), the first
/// [`AHEAD_SHOWN`] runs ahead named (`names`, of `ahead` in all), `— waiting`.
pub(super) fn say_line(
    app: &Domain,
    mut text: String,
    (names, ahead): (&[String], usize),
    (position, total): (usize, usize),
) {
    if ahead > 0 {
        let mut names = names.to_vec();
        if ahead > AHEAD_SHOWN {
            names.push(format!("and {} more", ahead - AHEAD_SHOWN));
        }
        text.push_str(&format!("; ahead: {}", names.join(", ")));
    }
    text.push_str(" — waiting");
    output::emit(
        output::Level::Info,
        "waiting",
        &text,
        &[
            ("app", app.as_str().into()),
            ("position", position.into()),
            ("queued", total.into()),
        ],
    );
}

/// `run <id>`, or what is known of a ticket that is not tether's.
fn run_of(e: &Entry) -> String {
    match (&e.info, e.pid) {
        (Some(i), _) => format!("run {}", i.run_id),
        (None, Some(pid)) => format!("an unknown run (pid {pid})"),
        (None, None) => "an unknown run".into(),
    }
}
