//! Step 4 for the run's own app with a cluster configured (issue 17 under a cluster, PROTOCOL
//! §15 "Under a cluster", DECISIONS D84): the host queue's semantics on the cluster's server,
//! for the runs of every host at once — a place (`ticket`) taken under the app's counter lock
//! in arrival order (or its reverse, `--queue-order newest-first`), the wait on the nearest
//! live place ahead, the head's wait on the app lock and its "still the head?" check at the
//! grant, `--max-queue` counted under the counter lock, supersede in place, the stopped-waiter
//! skip, and the waiting line with the position.
//!
//! Every wait is one slice long ([`queue::wait_slice`], `lock_timeout` on the server): between
//! two slices the waiter looks at the queue on its own session — it is seen (`looked`: a
//! stopped waiter's grows old and the runs behind skip it), learns whether it was superseded,
//! and says its position. The blocking statements run on a helper thread that only talks to
//! the server and writes a pipe (D4/D43); the core keeps answering its funnel.

use super::claim::Claimed;
use super::finish::{announce_acquired, describe_holder};
use super::waitline_cluster_say::Line;
use super::Stop;
use crate::cluster::queue::{self, Entry};
use crate::cluster::session::Session;
use crate::config::duration;
use crate::config::{OnBusy, QueueOrder};
use crate::ident::names::Domain;
use crate::output;
use crate::state::applock::{AppLock, Attempt};
use crate::state::cluster_lock::{into_error, key, Spot};
use crate::state::cluster_wait::{Head, HeadWait, TicketWait};
use crate::sys::signals::{until, Event};
use crate::sys::supervisor::Supervisor;
use std::time::{Duration, Instant};

/// How soon an arrival tries the app's counter lock again when another arrival has it.
const RETRY: Duration = Duration::from_millis(2);

fn lock_failed(what: &str, e: std::io::Error) -> Stop {
    Stop::Fail(into_error(e, what))
}

fn queue_failed(e: crate::error::Error) -> Stop {
    Stop::Fail(e)
}

/// What a queued run is blocked on, one slice at a time.
enum Blocked {
    /// The place ahead of ours.
    Ticket(TicketWait),
    /// The app itself: we are the head.
    Head(Box<HeadWait>),
}

impl Blocked {
    fn fd(&self) -> std::os::fd::RawFd {
        match self {
            Blocked::Ticket(w) => w.raw_fd(),
            Blocked::Head(w) => w.ready_fd(),
        }
    }
}

impl Claimed {
    /// Take the lock of the run's own app in the cluster's queue, then the host's flock. A
    /// failure of a wait or of the grant's statements is a supersede when, and only when, the
    /// run's row names the run that superseded it (PROTOCOL §18).
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
        let session = loop {
            let busy = match locks
                .try_acquire(app)
                .map_err(|e| lock_failed("app lock", e))?
            {
                Attempt::Held(l) => return Ok(l),
                Attempt::Busy(b) => b,
            };
            if self.ctx.spec.on_busy == OnBusy::Fail {
                let holder = describe_holder(busy.holder(), busy.holder_pid());
                return Err(Stop::Busy(format!(
                    "app lock {app}: held by {holder} — --on-busy fail, giving up"
                )));
            }
            if self.ctx.spec.max_queue == Some(0) {
                return Err(Stop::Busy(format!(
                    "app lock {app}: busy and --max-queue 0 — giving up"
                )));
            }
            match busy.into_cluster_session() {
                Ok(session) => break session,
                // The cluster lock is ours, this host's flock is busy (a janitor's probe, a
                // tether without a cluster): wait for the flock alone.
                Err(busy) => {
                    if let Some(held) = self.wait_busy(app, *busy, started, false, sup)? {
                        return Ok(held);
                    }
                }
            }
        };
        self.note_queued();
        if self.ctx.spec.on_busy == OnBusy::CancelOlder {
            self.warn_if_no_group();
        }
        let (session, spot) = self.take_place(app, session, sup)?;
        self.wait_in_place(app, session, spot, started, sup)
    }

    /// Register in the app's queue under its counter lock (PROTOCOL §15 "Under a cluster"):
    /// `--max-queue`, the runs of our group we supersede, and our place.
    fn take_place(
        &mut self,
        app: &Domain,
        mut session: Session,
        sup: &mut Supervisor,
    ) -> Result<(Session, Spot), Stop> {
        let me = self.ctx.spec.run_id.to_string();
        let reg = loop {
            match queue::register_read(&mut session, app.as_str(), key(app)) {
                Ok(Some(reg)) => break reg,
                Ok(None) => {
                    let events = sup.wait(Some(RETRY), None);
                    super::act_on(events, &self.ctx)?;
                }
                Err(e) => return Err(queue_failed(e)),
            }
        };
        let group = match self.ctx.spec.on_busy {
            OnBusy::CancelOlder => self.ctx.spec.group.clone(),
            _ => None,
        };
        let of_group = |g: &Option<String>, id: &str| {
            group.is_some() && g.as_deref() == group.as_deref() && id != me
        };
        let queued: Vec<&Entry> = reg
            .entries
            .iter()
            .filter(|e| of_group(&e.group, &e.run_id))
            .collect();
        let holder = reg
            .holder
            .as_ref()
            .filter(|h| of_group(&h.group, &h.run_id));
        // The runs we replace are leaving: they do not count.
        let waiting = reg.entries.len() - queued.len();
        if let Some(max) = self.ctx.spec.max_queue {
            if waiting >= max as usize {
                let _ = queue::register_abandon(&mut session);
                let runs = if waiting == 1 { "run" } else { "runs" };
                return Err(Stop::Busy(format!(
                    "app lock {app}: {waiting} {runs} already waiting (--max-queue {max}) — \
                     giving up"
                )));
            }
        }
        let taken: Vec<String> = reg.entries.iter().map(|e| e.ticket.clone()).collect();
        let ticket = queue::place(
            reg.n,
            self.ctx.spec.queue_order == QueueOrder::NewestFirst,
            holder.is_some(),
            queued.first().map(|e| e.ticket.as_str()),
            &taken,
        );
        let spot = Spot {
            ticket,
            key: queue::ticket_key(reg.n),
            skip_after: self.ctx.spec.wait_progress,
        };
        let victims: Vec<String> = holder
            .map(|h| h.run_id.clone())
            .into_iter()
            .chain(queued.iter().map(|e| e.run_id.clone()))
            .collect();
        let mut marked =
            queue::register_write(&mut session, &me, (&spot.ticket, spot.key), &victims)
                .map_err(queue_failed)?;
        // Said in the order they stood: the holder, then the queue.
        marked.sort_by_key(|v| victims.iter().position(|id| id == &v.run_id));
        // Cancelled only now: a victim that leaves at once cannot let anyone in before our
        // place stands in its place.
        let waiters: Vec<String> = marked
            .iter()
            .filter(|v| v.state == crate::cluster::runs::WAITING)
            .map(|v| v.run_id.clone())
            .collect();
        if let Err(e) = queue::cancel_waits(&mut session, &waiters) {
            output::warn(
                "cancelling",
                &format!(
                    "cannot cancel the waits of the runs superseded: {}",
                    e.message
                ),
            );
        }
        let group = group.unwrap_or_default();
        for v in marked {
            let (queued, place) = if v.state == crate::cluster::runs::WAITING {
                (" queued", " — taking its place")
            } else {
                ("", "")
            };
            output::emit(
                output::Level::Info,
                "cancelling",
                &format!(
                    "cancelling older{queued} run {} of group {group} on host {}{place}",
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
        Ok((session, spot))
    }

    /// Wait in our place until we are the head and the app is ours (PROTOCOL §15 "Under a
    /// cluster"), within `--lock-timeout` counted from `started`.
    fn wait_in_place(
        &mut self,
        app: &Domain,
        mut session: Session,
        spot: Spot,
        started: Instant,
        sup: &mut Supervisor,
    ) -> Result<AppLock, Stop> {
        let locks = self.ctx.app_locks.clone();
        let me = self.ctx.spec.run_id.to_string();
        let mut line = Line::new(app.clone(), self.ctx.spec.wait_progress);
        let give_up = self.ctx.spec.lock_timeout.map(|t| started + t);
        let cancel_older = self.ctx.spec.on_busy == OnBusy::CancelOlder;
        loop {
            let look = queue::look(&mut session, &me, app.as_str()).map_err(queue_failed)?;
            if let Some(by) = look.superseded_by {
                return Err(Stop::Superseded(by));
            }
            let Some(mine) = look.entries.iter().position(|e| e.ticket == spot.ticket) else {
                return Err(Stop::Fail(crate::error::Error::tether(format!(
                    "app lock {app}: our place in the cluster's queue is gone"
                ))));
            };
            let ahead = &look.entries[..mine];
            line.track_stopped(ahead);
            if line.wants_to_say(mine + 1) {
                line.say(mine + 1, look.entries.len(), look.holder.as_ref(), ahead);
            }
            if cancel_older {
                // A holder of our group on this host whose row was not marked (PROTOCOL §18).
                let (meta, pid) = locks.holder_now(app);
                self.cancel_holder_if_same_group(meta, pid);
            }
            let blocked = match line.not_skipped(ahead).last() {
                Some(pred) => Blocked::Ticket(
                    TicketWait::start(session, pred.ticket_key, &spot)
                        .map_err(|e| lock_failed("app queue", e))?,
                ),
                None => Blocked::Head(Box::new(
                    locks
                        .head_wait(session, app, spot.clone())
                        .map_err(|e| lock_failed("app lock", e))?,
                )),
            };
            // The slice ends by itself; meanwhile the funnel is answered.
            loop {
                let timeout = give_up.map(until);
                let events = sup.wait(timeout, Some(blocked.fd()));
                let ready = events.contains(&Event::Ready);
                super::act_on(events, &self.ctx)?;
                if give_up.is_some_and(|g| Instant::now() >= g) {
                    return Err(Stop::Busy(format!(
                        "app lock {app}: still held after --lock-timeout {} — giving up",
                        duration::canonical(self.ctx.spec.lock_timeout.unwrap_or_default())
                    )));
                }
                if ready {
                    break;
                }
            }
            session = match blocked {
                Blocked::Ticket(w) => {
                    let (mut s, left) = w.finish().map_err(|e| lock_failed("app queue", e))?;
                    if let Err(e) = left {
                        // A cancel: a supersede if our row says so, asked on our own session.
                        if let Ok(Some(by)) = crate::cluster::runs::superseded_by(&mut s, &me) {
                            return Err(Stop::Superseded(by));
                        }
                        return Err(lock_failed("app queue", e));
                    }
                    s
                }
                Blocked::Head(w) => match w.finish().map_err(|e| lock_failed("app lock", e))? {
                    Head::Held(held) => {
                        announce_acquired(app, started);
                        return Ok(*held);
                    }
                    Head::Again(s) => s,
                },
            };
        }
    }
}
