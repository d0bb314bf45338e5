//! Step 4 for the run's own app with a cluster configured (issue 16 §2, PROTOCOL §15 "Under a
//! cluster"): the run waits in PostgreSQL's lock queue for the app — one queue for the runs of
//! every host, granted in arrival order — and not in this host's tickets, which would let only
//! one run per host into that queue at a time (and so interleave the hosts, D69).
//!
//! What the host queue's options mean here (D71): `--max-queue N` counts the sessions waiting
//! in `pg_locks` for the app's key; `--queue-order newest-first` is refused when the run is
//! planned. `--on-busy cancel-older` supersedes every older run of the group on every host
//! (PROTOCOL §18, D81–D82): on arrival the run marks their rows (`superseded_by`) and cancels
//! the lock waits of the marked waiters; a marked waiter leaves as `superseded` (143, nothing
//! run), a marked holder hears it from its heartbeat and tears down as for SIGTERM. The new
//! run keeps its own arrival place in the server's queue (D82: PostgreSQL cannot hand a place
//! to another session). The race it closes: a failed wait is taken for a supersede only when
//! the run's own row carries the mark — a statement timeout or an operator's cancel is not.

use super::claim::Claimed;
use super::finish::{announce_acquired, describe_holder};
use super::Stop;
use crate::config::OnBusy;
use crate::ident::names::Domain;
use crate::output;
use crate::state::applock::{AppLock, Attempt};
use crate::state::cluster_lock::into_error;
use crate::sys::supervisor::Supervisor;
use std::time::Instant;

fn lock_failed(what: &str, e: std::io::Error) -> Stop {
    Stop::Fail(into_error(e, what))
}

impl Claimed {
    /// Take the lock of the run's own app in PostgreSQL's queue, then the host's flock. A
    /// failure of the wait or of the grant's statements is a supersede when, and only when,
    /// the run's row names the run that superseded it (PROTOCOL §18).
    pub(super) fn acquire_in_cluster(
        &mut self,
        app: &Domain,
        sup: &mut Supervisor,
    ) -> Result<AppLock, Stop> {
        match self.acquire_in_cluster_queue(app, sup) {
            // An unreachable server is not asked again (it would only add a connect timeout).
            Err(Stop::Fail(e)) if e.failure != crate::error::Failure::Unavailable => {
                // Read on the run's own session when it could be (the wait, the grant), else
                // on a short one (the row may be gone by then: then it is no supersede).
                let by = crate::cluster::runs::superseded_in(&e.message)
                    .or_else(|| self.ctx.app_locks.superseded_in_cluster());
                match by {
                    Some(by) => Err(Stop::Superseded(by)),
                    None => Err(Stop::Fail(e)),
                }
            }
            other => other,
        }
    }

    fn acquire_in_cluster_queue(
        &mut self,
        app: &Domain,
        sup: &mut Supervisor,
    ) -> Result<AppLock, Stop> {
        let locks = self.ctx.app_locks.clone();
        let started = Instant::now();
        let cancel_older = self.ctx.spec.on_busy == OnBusy::CancelOlder;
        let mut first = true;
        loop {
            let mut busy = match locks
                .try_acquire(app)
                .map_err(|e| lock_failed("app lock", e))?
            {
                Attempt::Held(l) => {
                    if !first {
                        announce_acquired(app, started);
                    }
                    return Ok(l);
                }
                Attempt::Busy(b) => b,
            };
            if first {
                if self.ctx.spec.on_busy == OnBusy::Fail {
                    let holder = describe_holder(busy.holder(), busy.holder_pid());
                    return Err(Stop::Busy(format!(
                        "app lock {app}: held by {holder} — --on-busy fail, giving up"
                    )));
                }
                self.refuse_over_max_queue(app, &mut busy)?;
                self.note_queued();
                if cancel_older {
                    self.warn_if_no_group();
                    self.supersede_older_in_cluster(&mut busy)?;
                }
            }
            first = false;
            // The plain wait: its waiter thread waits in PostgreSQL's queue, then for the flock.
            if let Some(held) = self.wait_busy(app, busy, started, cancel_older, sup)? {
                return Ok(held);
            }
        }
    }
    /// `--on-busy cancel-older` across hosts, on arrival (PROTOCOL §18): every live older run
    /// of our group, on any host, marked and — if queued — its wait cancelled; each said in a
    /// `cancelling` line, and remembered so that the holder check of this host does not
    /// signal a marked holder a second time (its heartbeat tells it).
    fn supersede_older_in_cluster(
        &mut self,
        busy: &mut crate::state::applock::BusyLock,
    ) -> Result<(), Stop> {
        let Some(group) = self.ctx.spec.group.clone() else {
            return Ok(());
        };
        let victims = busy
            .supersede_in_cluster(&group)
            .map_err(|e| lock_failed("cancel-older", e))?
            .unwrap_or_default();
        for v in victims {
            let queued = if v.state == crate::cluster::runs::WAITING {
                " queued"
            } else {
                ""
            };
            output::emit(
                output::Level::Info,
                "cancelling",
                &format!(
                    "cancelling older{queued} run {} of group {group} on host {}",
                    v.run_id, v.host
                ),
                &[
                    ("run_id", v.run_id.clone().into()),
                    ("group", group.clone().into()),
                    ("host", v.host.clone().into()),
                ],
            );
            self.cancelled.insert(v.run_id);
        }
        Ok(())
    }

    /// `--max-queue N` under a cluster: the runs already waiting in PostgreSQL's queue for the
    /// app, counted in `pg_locks` (D71: two runs arriving at once may both pass the count).
    fn refuse_over_max_queue(
        &self,
        app: &Domain,
        busy: &mut crate::state::applock::BusyLock,
    ) -> Result<(), Stop> {
        let Some(max) = self.ctx.spec.max_queue else {
            return Ok(());
        };
        if max == 0 {
            return Err(Stop::Busy(format!(
                "app lock {app}: busy and --max-queue 0 — giving up"
            )));
        }
        let waiting = busy
            .cluster_waiters()
            .map_err(|e| lock_failed("app lock", e))?
            .unwrap_or(0);
        if waiting >= max as usize {
            let runs = if waiting == 1 { "run" } else { "runs" };
            return Err(Stop::Busy(format!(
                "app lock {app}: {waiting} {runs} already waiting (--max-queue {max}) — giving up"
            )));
        }
        Ok(())
    }
}
