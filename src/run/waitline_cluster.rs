//! Step 4 for the run's own app with a cluster configured (issue 16 §2, PROTOCOL §15 "Under a
//! cluster"): the run waits in PostgreSQL's lock queue for the app — one queue for the runs of
//! every host, granted in arrival order — and not in this host's tickets, which would let only
//! one run per host into that queue at a time (and so interleave the hosts, D69).
//!
//! What the host queue's options mean here, for now (D71): `--max-queue N` counts the sessions
//! waiting in `pg_locks` for the app's key; `--queue-order newest-first` is refused when the
//! run is planned; `--on-busy cancel-older` cancels a holder of the group on this host, as
//! before the queue existed (queued runs, and holders on other hosts, are not superseded).

use super::claim::Claimed;
use super::finish::{announce_acquired, announce_waiting, describe_holder};
use super::Stop;
use crate::config::{duration, OnBusy};
use crate::ident::names::Domain;
use crate::output;
use crate::state::applock::{AppLock, Attempt};
use crate::state::cluster_lock::into_error;
use crate::sys::signals::{until, Event};
use crate::sys::supervisor::Supervisor;
use std::time::{Duration, Instant};

/// How often a waiter looks for a holder of its group to cancel (`cancel-older`).
const LOOK_AGAIN: Duration = Duration::from_millis(200);

fn lock_failed(what: &str, e: std::io::Error) -> Stop {
    Stop::Fail(into_error(e, what))
}

impl Claimed {
    /// Take the lock of the run's own app in PostgreSQL's queue, then the host's flock.
    pub(super) fn acquire_in_cluster(
        &mut self,
        app: &Domain,
        sup: &mut Supervisor,
    ) -> Result<AppLock, Stop> {
        let locks = self.ctx.app_locks.clone();
        let started = Instant::now();
        let give_up = self.ctx.spec.lock_timeout.map(|t| started + t);
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
            let holder = describe_holder(busy.holder(), busy.holder_pid());
            if first {
                if self.ctx.spec.on_busy == OnBusy::Fail {
                    return Err(Stop::Busy(format!(
                        "app lock {app}: held by {holder} — --on-busy fail, giving up"
                    )));
                }
                self.refuse_over_max_queue(app, &mut busy)?;
                self.note_queued();
            }
            first = false;
            announce_waiting(app, &holder);
            let waiting = busy
                .wait()
                .map_err(|e| lock_failed("cannot wait for lock", e))?;
            let mut next_progress = Instant::now() + self.ctx.spec.wait_progress;
            let mut next_look = Instant::now();
            loop {
                if cancel_older && Instant::now() >= next_look {
                    // A holder of our group on this host (the only one we can verify).
                    let (meta, pid) = locks.holder_now(app);
                    self.cancel_holder_if_same_group(meta, pid);
                    next_look = Instant::now() + LOOK_AGAIN;
                }
                let mut timeout = until(next_progress);
                if cancel_older {
                    timeout = timeout.min(until(next_look));
                }
                if let Some(g) = give_up {
                    timeout = timeout.min(until(g));
                }
                let events = sup.wait(Some(timeout), Some(waiting.ready_fd()));
                if events.contains(&Event::Ready) {
                    break;
                }
                super::act_on(events, &self.ctx)?;
                if give_up.is_some_and(|g| Instant::now() >= g) {
                    return Err(Stop::Busy(format!(
                        "app lock {app}: still held after --lock-timeout {} — giving up",
                        duration::canonical(self.ctx.spec.lock_timeout.unwrap_or_default())
                    )));
                }
                if Instant::now() >= next_progress {
                    announce_waiting(
                        app,
                        &describe_holder(waiting.holder(), waiting.holder_pid()),
                    );
                    next_progress = Instant::now() + self.ctx.spec.wait_progress;
                }
            }
            match waiting.finish().map_err(|e| lock_failed("app lock", e))? {
                Some(held) => {
                    announce_acquired(app, started);
                    return Ok(held);
                }
                // Not for a cluster wait (it re-opens the flock itself); kept for the seam.
                None => output::debug("lock", "lockfile was replaced while waiting; retrying"),
            }
        }
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
