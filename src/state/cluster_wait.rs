//! The waits for an app's cluster lock (issue 16, issue 17 under a cluster), each on a helper
//! thread that only talks to the server (and, for the app, then takes the host's flock) and
//! says it is done on a pipe the core's supervisor watches (DECISIONS D4, D43): the plain wait
//! for a lock (a run reaping a dead run of another app), the queue head's wait one slice at a
//! time, and a queued run's wait for the place ahead of it (PROTOCOL §15 "Under a cluster").
//! Each thread is joined before the lock is handed out, so the command is still forked from a
//! single-threaded core.

use super::applock::AppLock;
use super::cluster_lock::{fence, io_err, key, ClusterHold, Fenced, Spot};
use crate::cluster::queue;
use crate::cluster::runs::{self, NewRow};
use crate::cluster::session::Session;
use crate::config::cluster::FenceTiming;
use crate::ident::names::Domain;
use crate::state::lock::{self, HeldLock};
use crate::sys::safe_fs::Dir;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::thread::JoinHandle;

/// A wait for the cluster lock (unless this run holds it already) and then the host's flock of
/// the app, on a helper thread that does nothing else and says it is done on a pipe. A queued
/// run's head waits one slice at a time ([`queue::wait_slice`]) and looks at the queue between
/// two slices.
pub(crate) struct ClusterWait {
    /// Boxed: a wait is moved around while it lasts.
    row: Option<Box<NewRow>>,
    /// The run's fence timing, with `row` (the acquisition's round trip bounds the session).
    timing: Option<FenceTiming>,
    /// The run's place in the app's queue: the wait is one slice, and the grant checks that
    /// the run is still the head.
    spot: Option<Spot>,
    done_rx: OwnedFd,
    /// The session back, and the flock — `None` when the slice ended without the lock.
    handle: Option<JoinHandle<WaitEnd>>,
    /// The cluster lock when it was ours before the wait began (only the flock is waited for).
    hold: Option<ClusterHold>,
}

/// What a wait's thread gives back: the session, and the flock — `None` when the slice ended
/// without the lock.
type WaitEnd = (Option<Session>, io::Result<Option<HeldLock>>);

/// How a queued head's wait ended (see [`ClusterWait::finish_queued`]).
pub(crate) enum HeadWaited {
    /// The app is ours: the flock and the cluster hold (boxed: large next to a session).
    Held(Box<(HeldLock, ClusterHold)>),
    /// Not this time (the slice ended, or someone stands ahead now): the session, still
    /// holding the run's place.
    Again(Session),
}

impl ClusterWait {
    /// Wait in PostgreSQL's queue for `app` on `session` (`pg_advisory_lock`), then for the
    /// flock `name` in `dir`.
    pub(crate) fn start(
        session: Session,
        app: &Domain,
        dir: Dir,
        name: String,
        row: Option<(NewRow, FenceTiming)>,
    ) -> io::Result<Self> {
        Self::spawn(Some(session), Some(app), dir, name, None, row, None)
    }

    /// The head of the app's queue waits one slice for `app`, then for the flock (PROTOCOL
    /// §15 "Under a cluster").
    pub(crate) fn start_head(
        session: Session,
        app: &Domain,
        (dir, name): (Dir, String),
        row: (NewRow, FenceTiming),
        spot: Spot,
    ) -> io::Result<Self> {
        Self::spawn(
            Some(session),
            Some(app),
            dir,
            name,
            None,
            Some(row),
            Some(spot),
        )
    }

    /// The cluster lock is ours (`hold`); wait for the host's flock only (a janitor's probe or a
    /// tether without a cluster has it: both let go without waiting for anything).
    pub(crate) fn flock_after(hold: ClusterHold, dir: Dir, name: String) -> io::Result<Self> {
        Self::spawn(None, None, dir, name, Some(hold), None, None)
    }

    fn spawn(
        session: Option<Session>,
        app: Option<&Domain>,
        dir: Dir,
        name: String,
        hold: Option<ClusterHold>,
        row: Option<(NewRow, FenceTiming)>,
        spot: Option<Spot>,
    ) -> io::Result<Self> {
        let (rx, tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let slice = spot.as_ref().map(|s| queue::wait_slice(s.skip_after));
        let app_key = app.map(key);
        let sql = app.map(|a| {
            if let Some(slice) = slice {
                queue::wait_app_sql(key(a), slice)
            } else {
                format!("SELECT pg_advisory_lock({})", key(a))
            }
        });
        let handle = std::thread::Builder::new()
            .name("cluster-wait".into())
            .spawn(move || {
                let mut session = session;
                let granted = match (&mut session, &sql, app_key) {
                    (Some(s), Some(sql), Some(k)) => match s.execute_bounded(sql) {
                        // The slice ended: the lock may have been granted all the same (D85).
                        Ok(false) => queue::granted_anyway(s, k),
                        other => other,
                    }
                    .map_err(io_err),
                    _ => Ok(true),
                };
                // The flock only once the cluster lock is ours: never the other way round.
                let result = match granted {
                    Ok(true) => lock::lock_blocking(&dir, &name).map(Some),
                    Ok(false) => Ok(None),
                    Err(e) => Err(e),
                };
                let _ = nix::unistd::write(&tx, b"x");
                (session, result)
            })?;
        let (row, timing) = row.map_or((None, None), |(r, t)| (Some(Box::new(r)), Some(t)));
        Ok(ClusterWait {
            row,
            timing,
            spot,
            done_rx: rx,
            handle: Some(handle),
            hold,
        })
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.done_rx.as_raw_fd()
    }

    /// Join the thread (finished once `raw_fd` is readable): the session and the flock. A
    /// failed wait (a cancel) is a supersede only if the row says so (PROTOCOL §18): asked on
    /// the run's own session before it closes — a row without a session may be deleted by the
    /// next holder at once.
    fn join(&mut self) -> io::Result<WaitEnd> {
        let (mut session, result) = self
            .handle
            .take()
            .ok_or_else(|| io::Error::other("cluster lock wait joined twice"))?
            .join()
            .map_err(|_| io::Error::other("cluster lock wait thread panicked"))?;
        if let (Err(_), Some(s), Some(row)) = (&result, session.as_mut(), self.row.as_deref()) {
            if let Ok(Some(by)) = runs::superseded_by(s, &row.run_id) {
                return Err(io_err(runs::superseded_error(s, &row.run_id, &by)));
            }
        }
        Ok((session, result))
    }

    /// Join the thread (finished once `raw_fd` is readable): the flock, and the cluster hold
    /// with its fence (drawn now, on the core, for a lock the thread waited for).
    pub(crate) fn finish(mut self) -> io::Result<(HeldLock, ClusterHold)> {
        let (session, result) = self.join()?;
        let held =
            result?.ok_or_else(|| io::Error::other("cluster lock wait ended without the lock"))?;
        let hold = match (self.hold.take(), session) {
            (Some(hold), _) => hold,
            (None, Some(session)) => {
                match fence(session, self.row.as_deref().zip(self.timing), None)? {
                    Fenced::Held(hold) => hold,
                    Fenced::NotHead(_) => {
                        return Err(io::Error::other("cluster lock wait: not queued"))
                    }
                }
            }
            (None, None) => return Err(io::Error::other("cluster lock wait without a session")),
        };
        Ok((held, hold))
    }

    /// [`finish`](Self::finish) for the head of the app's queue: the lock when the slice got it
    /// and the run is still the head; else the session, to look at the queue again.
    pub(crate) fn finish_queued(mut self) -> io::Result<HeadWaited> {
        let (session, result) = self.join()?;
        let session =
            session.ok_or_else(|| io::Error::other("cluster lock wait without a session"))?;
        let Some(held) = result? else {
            return Ok(HeadWaited::Again(session));
        };
        match fence(
            session,
            self.row.as_deref().zip(self.timing),
            self.spot.as_ref(),
        )? {
            Fenced::Held(hold) => Ok(HeadWaited::Held(Box::new((held, hold)))),
            Fenced::NotHead(session) => {
                held.release();
                Ok(HeadWaited::Again(session))
            }
        }
    }
}

/// A queued run's wait, one slice long, for the run ahead of it to leave its place (PROTOCOL
/// §15 "Under a cluster"), on a helper thread that only talks to the server and writes a pipe.
pub(crate) struct TicketWait {
    done_rx: OwnedFd,
    handle: JoinHandle<(Session, io::Result<bool>)>,
}

impl TicketWait {
    /// Wait on the ticket lock `key` of the run ahead (one slice, from our `spot`'s skip bound).
    pub(crate) fn start(mut session: Session, key: i32, spot: &Spot) -> io::Result<Self> {
        let (rx, tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let sql = queue::wait_ticket_sql(key, queue::wait_slice(spot.skip_after));
        let handle = std::thread::Builder::new()
            .name("cluster-queue".into())
            .spawn(move || {
                let left = match session.execute_bounded(&sql) {
                    // The slice ended: the place ahead may have been let go all the same (D85).
                    Ok(false) => queue::left_anyway(&mut session, key),
                    other => other,
                }
                .map_err(io_err);
                let _ = nix::unistd::write(&tx, b"x");
                (session, left)
            })?;
        Ok(TicketWait {
            done_rx: rx,
            handle,
        })
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.done_rx.as_raw_fd()
    }

    /// The session back (once `raw_fd` is readable), and whether the run ahead left (`false`:
    /// the slice ended first). A failed wait keeps its session, for the supersede question.
    pub(crate) fn finish(self) -> io::Result<(Session, io::Result<bool>)> {
        self.handle
            .join()
            .map_err(|_| io::Error::other("cluster queue wait thread panicked"))
    }
}

/// The head of the app's queue on the cluster, waiting one slice for the app (PROTOCOL §15
/// "Under a cluster").
pub(crate) struct HeadWait(ClusterWait);

/// How a [`HeadWait`] ended.
pub(crate) enum Head {
    /// The app is ours, and the run was still the head.
    Held(Box<AppLock>),
    /// Look at the queue again: the session, still holding the run's place.
    Again(Session),
}

impl HeadWait {
    pub(super) fn of(wait: ClusterWait) -> HeadWait {
        HeadWait(wait)
    }

    /// Readable once the slice is over.
    pub(crate) fn ready_fd(&self) -> RawFd {
        self.0.raw_fd()
    }

    pub(crate) fn finish(self) -> io::Result<Head> {
        Ok(match self.0.finish_queued()? {
            HeadWaited::Held(both) => {
                let (held, hold) = *both;
                Head::Held(Box::new(AppLock::of_cluster(held, hold)))
            }
            HeadWaited::Again(session) => Head::Again(session),
        })
    }
}
