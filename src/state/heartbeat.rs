//! The cluster lock's heartbeat (issue 16 §4, PROTOCOL §16, DECISIONS D56): once a run holds
//! its cluster lock, the lock's session moves to a helper thread, `cluster-heartbeat`, that
//! every `heartbeat` runs one bounded statement on it and reports each answer (with the time the
//! statement was *sent*) or the failure on a pipe the supervisor watches as a lease
//! (`sys::lease`). The race it closes: a holder cut off from its database would otherwise keep
//! deploying while the server hands the lock to another host. Each beat also reads back the
//! row's `superseded_by` (issue 17 across hosts, PROTOCOL §18): a newer run of the group on any
//! host marked it, and the core hears it on the same pipe and tears down as for a SIGTERM.
//!
//! The thread only talks to PostgreSQL and writes its pipe: it never forks, never touches the
//! run's state, and is stopped and joined at release — the session handed back and closed on
//! the core's thread, which releases the lock exactly as without a heartbeat. A thread stuck
//! in a statement on a silent server is not waited for longer than one beat: it is left
//! behind, and its session closes when the core exits a moment later (the lock with it).

use crate::cluster::session::Session;
use crate::config::cluster::FenceTiming;
use crate::sys::lease::{self, mono_now};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::thread::JoinHandle;
use std::time::Duration;

/// A running heartbeat.
pub(crate) struct Heartbeat {
    /// Closed to stop the thread (its poll sees the end of the pipe).
    stop_tx: Option<OwnedFd>,
    /// Ends when the thread does (it holds the write end): a bounded join.
    done_rx: OwnedFd,
    /// The read end of the reports, for the supervisor (a dup is handed out).
    report_rx: OwnedFd,
    handle: Option<JoinHandle<Session>>,
    timing: FenceTiming,
    /// When the statement that opened the heartbeat was sent: the lease's first renewal.
    first_sent: Duration,
}

/// The statement of one beat: it touches the run's row (0 rows until the `runs` table has it)
/// and reads back whether a newer run of the group marked it superseded (PROTOCOL §18) — the
/// same round trip, so a holder learns it within one beat at no extra cost.
fn beat_sql(run_id: &str) -> String {
    format!(
        "UPDATE tether.runs SET heartbeat = now() WHERE run_id = {} RETURNING superseded_by",
        quote_literal(run_id)
    )
}

/// One beat: `Ok(Some(by))` when the row names the run that superseded this one. A failure
/// as one line without the server (the lease's log line names it).
fn beat(session: &mut Session, sql: &str) -> Result<Option<String>, String> {
    let prefix = format!("cluster {}: query failed: ", session.server);
    let rows = session.rows(sql).map_err(|e| {
        e.message
            .strip_prefix(&prefix)
            .unwrap_or(&e.message)
            .to_string()
    })?;
    Ok(rows
        .into_iter()
        .next()
        .and_then(|r| r.into_iter().next().flatten()))
}

/// A SQL string literal (standard_conforming_strings is on since PostgreSQL 9.1; a run id
/// never holds a backslash anyway).
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

impl Heartbeat {
    /// Start beating on `session` (a held cluster lock's). On the calling thread first: bound
    /// every statement of the session by `self_fence` on the server, which also proves the
    /// session alive — its send time is the lease's start. `bounded_at`: the acquisition
    /// already did that in its own round trip, sent then (DECISIONS D80). On an error the
    /// session is closed (the cluster lock with it): the caller must not start the command.
    pub(crate) fn start(
        mut session: Session,
        run_id: &str,
        timing: FenceTiming,
        bounded_at: Option<Duration>,
    ) -> io::Result<Heartbeat> {
        let first_sent = match bounded_at {
            Some(sent) => sent,
            None => {
                let sent = mono_now();
                let bound = format!(
                    "SET statement_timeout = {}",
                    timing.self_fence.as_millis().max(1)
                );
                session.execute_quiet(&bound).map_err(|why| {
                    io::Error::other(format!("cluster {}: {why}", session.server))
                })?;
                sent
            }
        };
        let (report_rx, report_tx) = lease::pipe()?;
        let (stop_rx, stop_tx) = lease::pipe()?;
        let (done_rx, done_tx) = lease::pipe()?;
        let sql = beat_sql(run_id);
        let interval = timing.heartbeat;
        // The session moves in and comes back through `join`; if spawning fails it is dropped
        // with the closure, which closes it.
        let handle = std::thread::Builder::new()
            .name("cluster-heartbeat".into())
            .spawn(move || {
                let _done = done_tx; // closed when this thread ends
                let mut next = first_sent + interval;
                let mut told = false;
                loop {
                    if stop_requested(&stop_rx, next.saturating_sub(mono_now())) {
                        break;
                    }
                    let sent = mono_now();
                    match beat(&mut session, &sql) {
                        Ok(by) => {
                            lease::report_ok(report_tx.as_fd(), sent);
                            // Said once; the beats go on (the lock is held through the
                            // teardown the core now runs).
                            if let (Some(by), false) = (by, told) {
                                lease::report_superseded(report_tx.as_fd(), &by);
                                told = true;
                            }
                        }
                        Err(why) => {
                            lease::report_failed(report_tx.as_fd(), &why);
                            break;
                        }
                    }
                    next = sent + interval;
                }
                session
            })
            .map_err(|e| io::Error::other(format!("cannot start the heartbeat thread: {e}")))?;
        Ok(Heartbeat {
            stop_tx: Some(stop_tx),
            done_rx,
            report_rx,
            handle: Some(handle),
            timing,
            first_sent,
        })
    }

    /// What the supervisor watches: a dup of the reports' read end, the window and the
    /// first renewal's send time.
    pub(crate) fn lease(&self, label: String) -> io::Result<lease::Lease> {
        Ok(lease::Lease {
            fd: self.report_rx.try_clone()?,
            window: self.timing.self_fence,
            last_ok: self.first_sent,
            label,
        })
    }

    /// Stop the thread and take the session back. A thread still in a statement after one
    /// beat's time is left behind (`None`): its session closes when the process exits.
    pub(crate) fn stop(mut self) -> Option<Session> {
        drop(self.stop_tx.take());
        let patience = self.timing.heartbeat.max(Duration::from_millis(100));
        if !readable(&self.done_rx, patience) {
            crate::output::debug(
                "heartbeat",
                "the heartbeat thread is still in a statement; its session closes when tether \
                 exits",
            );
            drop(self.handle.take());
            return None;
        }
        self.handle.take().and_then(|h| h.join().ok())
    }
}

impl Drop for Heartbeat {
    /// The last line of defence: a heartbeat never stopped is stopped here.
    fn drop(&mut self) {
        drop(self.stop_tx.take());
    }
}

/// Wait up to `timeout` for `stop_rx` to be closed; true when it was.
fn stop_requested(stop_rx: &OwnedFd, timeout: Duration) -> bool {
    readable(stop_rx, timeout)
}

/// Whether `fd` becomes readable (data or its end) within `timeout`.
fn readable(fd: &OwnedFd, timeout: Duration) -> bool {
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    let mut fds = [nix::poll::PollFd::new(
        fd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let timeout = nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX);
    matches!(nix::poll::poll(&mut fds, timeout), Ok(n) if n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_beat_quotes_the_run_id() {
        assert_eq!(
            beat_sql("r-1"),
            "UPDATE tether.runs SET heartbeat = now() WHERE run_id = 'r-1' RETURNING superseded_by"
        );
        assert_eq!(quote_literal("a'b"), "'a''b'");
    }
}
