//! Step 4 for the run's own app (PROTOCOL §15): waiting in the app's queue — a ticket taken
//! in arrival order (or its reverse under `--queue-order newest-first`), the wait on the
//! nearest live ticket ahead, the head's wait on the app lock and its "still the head?" check,
//! `--max-queue`, the stopped-waiter skip, and the waiting line with the position.

use super::claim::Claimed;
use super::finish::{announce_acquired, describe_holder};
use super::waitline_say::Line;
use super::{Ctx, Stop};
use crate::config::duration;
use crate::config::OnBusy;
use crate::error::Error;
use crate::ident::names::{Domain, RunId};
use crate::output;
use crate::state::applock::{AppLock, Attempt, WaitingLock};
use crate::state::queue::{
    describe, describe_in_kernel, Entry, Placement, Queue, Ticket, TicketInfo, TicketWait,
};
use crate::state::record::LockMeta;
use crate::state::{lock, record, rundir};
use crate::sys::safe_fs::Dir;
use crate::sys::signals::{until, Event, Sig};
use crate::sys::supervisor::Supervisor;
use std::time::{Duration, Instant};

/// How often a waiter looks at the queue again (positions, stopped waiters, cancel-older).
const LOOK_AGAIN: Duration = Duration::from_millis(200);
/// How soon a waiter tries again when a try found nothing to block on: the counter's flock
/// held by another arrival, or a ticket ahead that left as we looked.
const RETRY: Duration = Duration::from_millis(1);

/// Where a superseding run's ticket goes, the holder it replaces, the queued runs it replaces.
type Supersede = (Placement, Option<LockMeta>, Vec<(Entry, Dir)>);

/// What the waiter is blocked on right now.
enum Blocked {
    Nothing,
    /// The head's wait for the app lock (never abandoned: a granted lock must be looked at).
    App(WaitingLock),
    /// The wait for the ticket `name` ahead of us.
    Ticket(String, TicketWait),
    /// The lock is ours and we are the head.
    Done(AppLock),
}

fn fail(what: &str, e: impl std::fmt::Display) -> Stop {
    Stop::Fail(Error::tether(format!("{what}: {e}")))
}

/// A failure of the lock backend itself: its own exit code survives (the cluster's database
/// unreachable is 75, not tether's 125).
fn lock_failed(what: &str, e: std::io::Error) -> Stop {
    Stop::Fail(crate::state::cluster_lock::into_error(e, what))
}

impl Claimed {
    /// Take the lock of the run's own app, in queue order (PROTOCOL §15).
    pub(super) fn acquire_queued(
        &mut self,
        app: &Domain,
        sup: &mut Supervisor,
    ) -> Result<AppLock, Stop> {
        let locks = self.ctx.app_locks.clone();
        if locks.is_cluster() {
            // The order is PostgreSQL's queue across all hosts (waitline_cluster.rs).
            return self.acquire_in_cluster(app, sup);
        }
        let started = Instant::now();
        let (queue, ticket) = match self.early.take() {
            // In the queue since the run began (`arrival_ticket`): now visible as `queued`.
            Some(taken) => {
                self.note_queued();
                taken
            }
            None => {
                if let Some(held) = self.try_uncontended(&locks, app)? {
                    return Ok(held);
                }
                // The record first: a newer run of our group verifies us by it (PROTOCOL §15).
                self.note_queued();
                self.take_ticket(app, sup)?
            }
        };
        let mut line = Line::new(app.clone(), self.ctx.spec.wait_progress);
        let mut blocked = Blocked::Nothing;
        // Waits abandoned for a skipped (stopped) waiter ahead: kept so their pipes stay open.
        let mut parked: Vec<TicketWait> = Vec::new();
        let give_up = self.ctx.spec.lock_timeout.map(|t| started + t);
        let cancel_older = self.ctx.spec.on_busy == OnBusy::CancelOlder;
        if cancel_older {
            self.warn_if_no_group();
        }
        let mut next_look = Instant::now();
        loop {
            let mut entries = queue.live().map_err(|e| fail("app queue", e))?;
            let Some(me) = entries.iter().position(|e| e.name == ticket.name()) else {
                return Err(fail("app queue", "our ticket was removed"));
            };
            // Who holds what, and whether they are stopped, is looked at every LOOK_AGAIN and
            // when there is something to say; a wake-up in between needs only the names.
            let look = Instant::now() >= next_look;
            if look || line.wants_to_say(me + 1) || line.skips_any() {
                describe(&mut entries);
            }
            if look {
                next_look = Instant::now() + LOOK_AGAIN;
                line.track_stopped(&entries[..me]);
                if cancel_older {
                    let (meta, pid) = locks.holder_now(app);
                    self.cancel_holder_if_same_group(meta, pid);
                }
            }
            if line.wants_to_say(me + 1) {
                line.say(&locks, me + 1, entries.len(), &entries[..me]);
            }
            let ahead = line.not_skipped(&entries[..me]);
            blocked = match (blocked, ahead.last()) {
                // The head: wait on the app lock itself.
                (Blocked::Ticket(_, w), None) => {
                    parked.push(w);
                    self.head(&locks, app, &queue, &ticket, &line, started)?
                }
                (Blocked::Nothing, None) => {
                    self.head(&locks, app, &queue, &ticket, &line, started)?
                }
                // Someone ahead: wait on the nearest, unless still waiting on one ahead.
                (Blocked::Ticket(name, w), Some(_)) if ahead.iter().any(|e| e.name == name) => {
                    Blocked::Ticket(name, w)
                }
                (Blocked::Ticket(_, w), Some(pred)) => {
                    parked.push(w);
                    wait_on(&queue, pred)?
                }
                (Blocked::Nothing, Some(pred)) => wait_on(&queue, pred)?,
                (b @ (Blocked::App(_) | Blocked::Done(_)), _) => b,
            };
            if let Blocked::Done(held) = blocked {
                return Ok(held);
            }
            let (fd, mut timeout) = match &blocked {
                Blocked::App(w) => (Some(w.ready_fd()), until(next_look)),
                Blocked::Ticket(_, w) => (Some(w.raw_fd()), until(next_look)),
                // Nothing to block on (the ticket ahead left before we opened it, or the lock
                // went back to the head): look again almost at once, not at the next tick.
                Blocked::Nothing | Blocked::Done(_) => (None, RETRY),
            };
            timeout = timeout.min(until(line.next_progress));
            if let Some(g) = give_up {
                timeout = timeout.min(until(g));
            }
            let events = sup.wait(Some(timeout), fd);
            let ready = events.contains(&Event::Ready);
            if events.contains(&Event::Signal(Sig::Term)) {
                if let Some(by) = rundir::superseded_by(self.dir.dir()) {
                    return Err(Stop::Superseded(by));
                }
            }
            super::act_on(events, &self.ctx)?;
            if ready {
                blocked = match blocked {
                    Blocked::App(w) => match w.finish().map_err(|e| lock_failed("app lock", e))? {
                        Some(held) if is_head(&queue, &ticket, &line)? => {
                            announce_acquired(app, started);
                            return Ok(held);
                        }
                        // Someone came ahead (newest-first, a waiter continued): theirs.
                        Some(held) => {
                            held.release();
                            Blocked::Nothing
                        }
                        None => Blocked::Nothing,
                    },
                    _ => Blocked::Nothing,
                };
            }
            if give_up.is_some_and(|g| Instant::now() >= g) {
                return Err(Stop::Busy(format!(
                    "app lock {app}: still held after --lock-timeout {} — giving up",
                    duration::canonical(self.ctx.spec.lock_timeout.unwrap_or_default())
                )));
            }
        }
    }

    /// Uncontended: a free lock and nobody queued. A free lock with a queue is the queue's.
    /// `Ok(None)`: the run queues (unless `--on-busy fail` gave up).
    fn try_uncontended(
        &self,
        locks: &crate::state::applock::AppLocks,
        app: &Domain,
    ) -> Result<Option<AppLock>, Stop> {
        match locks
            .try_acquire(app)
            .map_err(|e| lock_failed("app lock", e))?
        {
            Attempt::Held(l) => {
                let queue = locks.queue(app, false).map_err(|e| fail("app queue", e))?;
                let waiting = match &queue {
                    Some(q) => q.live().map_err(|e| fail("app queue", e))?.len(),
                    None => 0,
                };
                if waiting == 0 {
                    return Ok(Some(l));
                }
                l.release();
                self.refuse_if_fail(app, &format!("{waiting} runs waiting"))?;
            }
            // The holder is described (a read of /proc/locks) only for the refusal.
            Attempt::Busy(b) if self.ctx.spec.on_busy == OnBusy::Fail => {
                let holder = describe_holder(b.holder(), b.holder_pid());
                self.refuse_if_fail(app, &format!("held by {holder}"))?;
            }
            Attempt::Busy(_) => {}
        }
        Ok(None)
    }

    /// `--on-busy fail`: give up instead of queueing.
    fn refuse_if_fail(&self, app: &Domain, why: &str) -> Result<(), Stop> {
        if self.ctx.spec.on_busy == OnBusy::Fail {
            return Err(Stop::Busy(format!(
                "app lock {app}: {why} — --on-busy fail, giving up"
            )));
        }
        Ok(())
    }

    /// Count the queue and take a ticket under the counter's flock (`--max-queue`), replacing
    /// the older runs of our group under `--on-busy cancel-older`.
    fn take_ticket(&mut self, app: &Domain, sup: &mut Supervisor) -> Result<(Queue, Ticket), Stop> {
        let cancel_older = self.ctx.spec.on_busy == OnBusy::CancelOlder;
        let count =
            self.ctx.spec.max_queue.is_some() || (cancel_older && self.ctx.spec.group.is_some());
        let (queue, ticket, (holder, victims)) = numbered(&self.ctx, app, sup, count, |entries| {
            if cancel_older {
                describe_in_kernel(entries);
            }
            let (at, holder, victims) = self.supersede_plan(app, entries);
            (at, victims.len(), (holder, victims))
        })?;
        // Signalled only now: a victim that leaves at once cannot let anyone in before our
        // ticket stands in its place.
        if let Some(meta) = holder {
            self.cancel_holder(meta);
        }
        for (victim, dir) in victims {
            self.supersede(&victim, &dir);
        }
        Ok((queue, ticket))
    }

    /// `--on-busy cancel-older` on arrival (PROTOCOL §15): the older runs of our group we
    /// replace — the holder and the queued ones, verified, to be signalled once our ticket is
    /// placed — and where our ticket goes: the head if we replace the holder, else right
    /// behind the foremost queued one.
    fn supersede_plan(&self, app: &Domain, entries: &[Entry]) -> Supersede {
        if self.ctx.spec.on_busy != OnBusy::CancelOlder || self.ctx.spec.group.is_none() {
            return (Placement::Arrival, None, Vec::new());
        }
        let (meta, pid) = self.ctx.app_locks.holder_now(app);
        let holder = self.older_holder_of_our_group(meta, pid);
        let victims: Vec<(Entry, Dir)> = entries
            .iter()
            .filter_map(|e| Some((e.clone(), self.queued_of_our_group(e)?)))
            .collect();
        let at = match victims.first() {
            _ if holder.is_some() => Placement::Head,
            Some((first, _)) => Placement::After(first.name.clone()),
            None => Placement::Arrival,
        };
        (at, holder, victims)
    }

    /// The run dir of a queued run we may supersede, verified as the holder is for
    /// cancel-older: its pid holds its ticket in the kernel's lock table and started when the
    /// ticket says, and its own record (owner-checked) names the same run, pid and our group.
    fn queued_of_our_group(&self, e: &Entry) -> Option<Dir> {
        let group = self.ctx.spec.group.as_deref()?;
        let info = e.info.as_ref()?;
        if info.run_id == self.ctx.spec.run_id.as_str()
            || info.group.as_deref() != Some(group)
            || e.pid != Some(info.pid)
            || crate::sys::procfs::start_time(info.pid) != Some(info.pid_start)
        {
            return None;
        }
        let id = RunId::parse(&info.run_id).ok()?;
        let dir = rundir::open_trusted(&self.ctx.runs_dir, id.as_str()).ok()?;
        let rec = record::read_record(&dir).ok()?;
        (rec.meta.run_id == info.run_id
            && rec.group.as_deref() == Some(group)
            && rec.meta.pid == info.pid
            && rec.meta.pid_start == info.pid_start)
            .then_some(dir)
    }

    /// Tell a queued run of our group it was superseded (a marker in its run dir), then
    /// SIGTERM its core: it leaves the queue with result `superseded`, having run nothing.
    fn supersede(&mut self, victim: &Entry, dir: &Dir) {
        let Some(info) = &victim.info else { return };
        let me = self.ctx.spec.run_id.to_string();
        let group = self.ctx.spec.group.clone().unwrap_or_default();
        if let Err(e) = rundir::mark_superseded(dir, &me) {
            output::warn(
                "cancelling",
                &format!("cannot mark run {} superseded: {e}", info.run_id),
            );
            return;
        }
        output::emit(
            output::Level::Info,
            "cancelling",
            &format!(
                "cancelling older queued run {} of group {group} — taking its place",
                info.run_id
            ),
            &[
                ("run_id", info.run_id.clone().into()),
                ("group", group.into()),
            ],
        );
        super::queue::terminate(&info.run_id, info.pid);
        self.cancelled.insert(info.run_id.clone());
    }

    /// We are the head: take the app lock if it is free (and we are still the head once we
    /// hold it), else wait for it.
    fn head(
        &mut self,
        locks: &crate::state::applock::AppLocks,
        app: &Domain,
        queue: &Queue,
        ticket: &Ticket,
        line: &Line,
        started: Instant,
    ) -> Result<Blocked, Stop> {
        match locks
            .try_acquire(app)
            .map_err(|e| lock_failed("app lock", e))?
        {
            Attempt::Held(held) => {
                if is_head(queue, ticket, line)? {
                    announce_acquired(app, started);
                    return Ok(Blocked::Done(held));
                }
                held.release();
                Ok(Blocked::Nothing)
            }
            Attempt::Busy(b) => {
                if self.ctx.spec.on_busy == OnBusy::CancelOlder {
                    self.cancel_holder_if_same_group(b.holder(), b.holder_pid());
                }
                let w = b
                    .wait()
                    .map_err(|e| lock_failed("cannot wait for lock", e))?;
                Ok(Blocked::App(w))
            }
        }
    }
}

/// The ticket of a run that arrives at a busy app (PROTOCOL §15, "Arrival"), taken right
/// after the plan — before the run dir is claimed, the cgroup made and the spares created — so
/// that the queue's order is close to the order in which the runs were started, as a plain
/// `flock` would have them, and not the order in which their start-up happened to finish.
///
/// Only for a run that can neither supersede nor be superseded (no group: a superseding run
/// verifies a queued victim by its record, which exists only once the run dir is claimed), that
/// would queue anyway (`--on-busy wait` or `cancel-older`, a queue allowed), on this host's
/// queue (no cluster). `None`: not such a run, or the app is free with nobody queued — the run
/// then tries the lock once claimed, as before. A run whose claim turns up a dead run of
/// another app leaves the queue before it waits for that app's lock (`Claimed::settle_claim`).
pub(super) fn arrival_ticket(
    ctx: &Ctx,
    sup: &mut Supervisor,
) -> Result<Option<(Queue, Ticket)>, Stop> {
    let spec = &ctx.spec;
    if ctx.app_locks.is_cluster()
        || spec.group.is_some()
        || spec.on_busy == OnBusy::Fail
        || spec.max_queue == Some(0)
    {
        return Ok(None);
    }
    let app = &spec.app;
    // A probe, not a take: a free lock is let go at once (the run takes it once claimed).
    let busy = match lock::open_existing(&ctx.lock_dir, lock::app_lock_name(app)) {
        Ok(file) => matches!(file.try_lock(), Err(std::fs::TryLockError::WouldBlock)),
        // Never made (or tidied away): free.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(fail("app lock", e)),
    };
    if !busy {
        let queued = match ctx.app_locks.queue(app, false) {
            Ok(Some(q)) => !q.live().map_err(|e| fail("app queue", e))?.is_empty(),
            Ok(None) => false,
            Err(e) => return Err(fail("app queue", e)),
        };
        if !queued {
            return Ok(None);
        }
    }
    let count = spec.max_queue.is_some();
    let (queue, ticket, ()) = numbered(ctx, app, sup, count, |_| (Placement::Arrival, 0, ()))?;
    Ok(Some((queue, ticket)))
}

/// Count the queue and take a ticket under the counter's flock (PROTOCOL §15), retrying the
/// counter every [`RETRY`] while answering the funnel. `plan` sees the live tickets and says
/// where ours goes and how many of them are leaving (superseded: not counted for
/// `--max-queue`), plus what the caller acts on once the ticket stands. `count`: the live
/// tickets are needed (`--max-queue`, a supersede); otherwise `plan` sees none and the counter
/// is held only to number the ticket and place it — a handful of calls instead of one open
/// and try-lock per waiting run, so arrivals seldom find it taken (D83).
fn numbered<T>(
    ctx: &Ctx,
    app: &Domain,
    sup: &mut Supervisor,
    count: bool,
    mut plan: impl FnMut(&mut [Entry]) -> (Placement, usize, T),
) -> Result<(Queue, Ticket, T), Stop> {
    let meta = &ctx.record.meta;
    let info = TicketInfo {
        run_id: meta.run_id.clone(),
        pid: meta.pid,
        pid_start: meta.pid_start,
        group: ctx.spec.group.clone(),
        since: record::unix_now(),
    };
    if ctx.spec.max_queue == Some(0) {
        // Checked before the queue is made: a refused run leaves nothing behind.
        return Err(Stop::Busy(format!(
            "app lock {app}: busy and --max-queue 0 — giving up"
        )));
    }
    let open = || {
        let q = ctx.app_locks.queue(app, true);
        q.map_err(|e| fail("app queue", e))?
            .ok_or_else(|| fail("app queue", "vanished"))
    };
    let mut queue = open()?;
    loop {
        let counter = match queue.try_counter() {
            Ok(c) => c,
            // The janitor removed the empty queue meanwhile: make it again.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                queue = open()?;
                continue;
            }
            Err(e) => return Err(fail("app queue", e)),
        };
        if let Some(counter) = counter {
            let mut entries = match count {
                true => queue.live().map_err(|e| fail("app queue", e))?,
                false => Vec::new(),
            };
            let (at, leaving, then) = plan(&mut entries);
            // The runs we replace are leaving: they do not count.
            let waiting = entries.len() - leaving;
            if let Some(max) = ctx.spec.max_queue {
                if waiting >= max as usize {
                    let runs = if waiting == 1 { "run" } else { "runs" };
                    return Err(Stop::Busy(format!(
                        "app lock {app}: {waiting} {runs} already waiting (--max-queue \
                         {max}) — giving up"
                    )));
                }
            }
            let ticket = counter
                .take(&queue, &info, ctx.spec.queue_order, at)
                .map_err(|e| fail("app queue", e))?;
            return Ok((queue, ticket, then));
        }
        let events = sup.wait(Some(RETRY), None);
        super::act_on(events, ctx)?;
    }
}

/// Still the head: no live, unskipped ticket ahead of ours. Only the tickets ahead are looked
/// at: this runs on the handoff's path, between the grant and the command.
fn is_head(queue: &Queue, ticket: &Ticket, line: &Line) -> Result<bool, Stop> {
    let mut ahead = queue
        .live_before(ticket.name())
        .map_err(|e| fail("app queue", e))?;
    if line.skips_any() {
        describe(&mut ahead);
    }
    // A ticket that no longer stands is in nobody's order: not the head (the wait then fails
    // on it, as it does when the queue is read without it).
    Ok(ticket.in_place() && line.not_skipped(&ahead).is_empty())
}

fn wait_on(queue: &Queue, pred: &Entry) -> Result<Blocked, Stop> {
    Ok(
        match queue
            .wait_for(&pred.name)
            .map_err(|e| fail("app queue", e))?
        {
            Some(w) => Blocked::Ticket(pred.name.clone(), w),
            None => Blocked::Nothing,
        },
    )
}

impl Claimed {
    /// `--on-busy cancel-older` without a group, once, as the wait begins (both waits: the
    /// host's queue and the cluster's): otherwise the policy waits silently, and the operator
    /// wonders why.
    pub(super) fn warn_if_no_group(&self) {
        if self.ctx.spec.group.is_none() {
            output::warn(
                "cancel-older",
                "--on-busy cancel-older: this run has no group (no --group, no CI run \
                 detected) — nothing to cancel, waiting",
            );
        }
    }
}
