//! The waiting line of a run queued on the cluster (CLI-CONTRACT §13, PROTOCOL §15 "Under a
//! cluster"): the host queue's line, with the hosts named — its position, the holder and who
//! is ahead, said when the position changes and every interval; and the waiters ahead that have
//! not looked at the queue for the interval (stopped), skipped until they look again.

use super::waitline_say::{say_line, waiting_for, AHEAD_SHOWN};
use crate::cluster::queue::{Entry, Holder};
use crate::config::duration::{self, human_secs};
use crate::ident::names::Domain;
use crate::output;
use std::collections::HashSet;
use std::time::{Duration, Instant};

pub(super) struct Line {
    app: Domain,
    interval: Duration,
    next_progress: Instant,
    said: Option<usize>,
    /// The waiters ahead being skipped (said once per stop).
    skipped: HashSet<String>,
}

impl Line {
    pub(super) fn new(app: Domain, interval: Duration) -> Line {
        Line {
            app,
            interval,
            next_progress: Instant::now(),
            said: None,
            skipped: HashSet::new(),
        }
    }

    fn stopped(&self, e: &Entry) -> bool {
        e.unseen >= self.interval.as_secs_f64()
    }

    /// The entries ahead without the waiters that have not looked at the queue for the
    /// interval: the server sees a session, not a process, and a waiter that stops looking is
    /// stopped (or hung). One that looks again counts again at once.
    pub(super) fn not_skipped<'e>(&self, ahead: &'e [Entry]) -> Vec<&'e Entry> {
        ahead.iter().filter(|e| !self.stopped(e)).collect()
    }

    pub(super) fn wants_to_say(&self, position: usize) -> bool {
        self.said != Some(position) || Instant::now() >= self.next_progress
    }

    /// Say `queue-skip` once for each waiter ahead that has just become skipped; forget the
    /// ones that look again.
    pub(super) fn track_stopped(&mut self, ahead: &[Entry]) {
        let stopped: Vec<&Entry> = ahead.iter().filter(|e| self.stopped(e)).collect();
        self.skipped
            .retain(|id| stopped.iter().any(|e| &e.run_id == id));
        for e in stopped {
            if self.skipped.insert(e.run_id.clone()) {
                output::emit(
                    output::Level::Warn,
                    "queue-skip",
                    &format!(
                        "app lock {}: {} ahead in the queue is stopped — it has not looked at \
                         the queue for {} — skipping it",
                        self.app,
                        run_of(e),
                        duration::human(Duration::from_secs_f64(e.unseen.max(0.0)))
                    ),
                    &[("app", self.app.as_str().into())],
                );
            }
        }
    }

    pub(super) fn say(
        &mut self,
        position: usize,
        total: usize,
        holder: Option<&Holder>,
        ahead: &[Entry],
    ) {
        self.said = Some(position);
        self.next_progress = Instant::now() + self.interval;
        let holder = match holder {
            Some(h) => format!(
                "held by run {}{} (pid {}, {})",
                h.run_id,
                on_host(&h.host),
                h.pid,
                human_secs(h.held.max(0.0) as u64)
            ),
            None => "free, being handed over".into(),
        };
        let text = format!(
            "app lock {}: position {position} of {total} — {holder}",
            self.app
        );
        let names: Vec<String> = ahead
            .iter()
            .take(AHEAD_SHOWN)
            .map(|e| {
                let waited = human_secs(e.waited.max(0.0) as u64);
                waiting_for(&run_of(e), &waited, self.stopped(e))
            })
            .collect();
        say_line(&self.app, text, (&names, ahead.len()), (position, total));
    }
}

/// ` on host <h>` for a run on another host; nothing for this one.
fn on_host(host: &str) -> String {
    if host.is_empty() || host == crate::sys::procfs::hostname() {
        String::new()
    } else {
        format!(" on host {host}")
    }
}

fn run_of(e: &Entry) -> String {
    format!("run {}{}", e.run_id, on_host(&e.host))
}
