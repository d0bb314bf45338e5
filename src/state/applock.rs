//! The app lock, behind one seam (issue 15): acquiring, waiting for, probing, reading the
//! holder of, and releasing the lock of an app go through [`AppLocks`]. Its members: a kernel
//! `flock` on `<lock dir>/app-<domain>.lock` (PROTOCOL.md), and — with a cluster
//! configured (issue 16) — a session advisory lock on PostgreSQL (`cluster_lock`), with a
//! fence, *and then* that flock (the order and why it cannot deadlock: PROTOCOL §14, D69–D70).
//! The run's life cycle does not know which one it holds.

use super::cluster_lock::{cluster_holder, remote_holder, ClusterHold, ClusterLocks, Spot};
use super::cluster_wait::{ClusterWait, HeadWait};
use super::lock::{self, app_lock_name, HeldLock, TryLock, Waiter};
use super::queue::Queue;
use super::record::{self, LockMeta};
use crate::cluster::runs::{self, NewRow};
use crate::cluster::session::Session;
use crate::config::cluster::ClusterTarget;
use crate::ident::names::Domain;
use crate::sys::safe_fs::Dir;
use std::fs::File;
use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

/// The app locks of this tether (today: the lock dir's flocks).
#[derive(Debug, Clone)]
pub(crate) struct AppLocks {
    backend: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    /// `flock(2)` on `app-<domain>.lock` in the lock dir.
    Flock { dir: Dir },
    /// The app's advisory lock on the cluster's PostgreSQL server, then the same flock.
    /// (Boxed: it is large next to the flock's dir.)
    Cluster {
        dir: Dir,
        cluster: Box<ClusterLocks>,
    },
}

impl Backend {
    fn dir(&self) -> &Dir {
        match self {
            Backend::Flock { dir } | Backend::Cluster { dir, .. } => dir,
        }
    }
}

/// What a try found.
pub(crate) enum Attempt {
    Held(AppLock),
    /// Someone else holds it; wait with [`BusyLock::wait`].
    Busy(BusyLock),
}

/// A held app lock, identity-checked (PROTOCOL.md). Dropping it releases it in the reverse of
/// the order it was taken: the flock first (declared first, dropped first), then the cluster
/// lock (its connection closes).
#[derive(Debug)]
pub(crate) struct AppLock {
    held: HeldLock,
    cluster: Option<ClusterHold>,
}

/// An app lock someone else holds.
pub(crate) struct BusyLock {
    busy: Busy,
    backend: Backend,
    app: Domain,
}

enum Busy {
    /// Another run on this host holds the flock (the lockfile, to wait on and read).
    Local(File),
    /// Another run (on any host) holds the cluster lock, or runs wait for it ahead of us; this
    /// run holds nothing of the app, and waits in PostgreSQL's queue on `session` (`holder`:
    /// the cluster's holder as its row and `pg_locks` describe it when the try failed).
    Remote {
        session: Session,
        holder: Option<Box<LockMeta>>,
    },
    /// This run holds the cluster lock; something else on this host holds the flock (a
    /// janitor's probe, a tether without a cluster): the lockfile, to read.
    LocalAfterCluster { hold: ClusterHold, file: File },
}

/// A wait for an app lock, readable on [`WaitingLock::ready_fd`] when it is over.
pub(crate) struct WaitingLock {
    wait: Wait,
    /// The same lockfile, to read the holder's metadata for the progress lines.
    reader: Option<File>,
    backend: Backend,
    app: Domain,
}

enum Wait {
    Flock(Waiter),
    /// The cluster lock (unless ours already), then the flock.
    /// (Boxed: it is large next to the flock's waiter.)
    Cluster(Box<ClusterWait>),
}

impl AppLocks {
    /// The locks in `dir`, a lock dir that passed the trust checks (`state::dirs`).
    pub(crate) fn flock(dir: Dir) -> AppLocks {
        AppLocks {
            backend: Backend::Flock { dir },
        }
    }

    /// The locks in `dir` and, for each app, on the cluster's server (issue 16); `run_id`
    /// names the sessions (`application_name`); `row`, the run's row in `tether.runs`
    /// (PROTOCOL §17; `None`: a janitor, which writes none).
    pub(crate) fn cluster(
        dir: Dir,
        target: ClusterTarget,
        run_id: String,
        row: Option<NewRow>,
    ) -> AppLocks {
        AppLocks {
            backend: Backend::Cluster {
                dir,
                cluster: Box::new(ClusterLocks {
                    target,
                    run_id,
                    row,
                    row_written: Default::default(),
                }),
            },
        }
    }

    /// A run that gives up waiting removes its `waiting` row (PROTOCOL §17; no-op without a
    /// cluster, or when it wrote none).
    pub(crate) fn forget_waiting_row(&self) {
        if let Backend::Cluster { cluster, .. } = &self.backend {
            cluster.forget_waiting_row();
        }
    }

    /// The run that superseded this run in the cluster (its row's mark, PROTOCOL §18), read on
    /// a short session of its own; `None` without a cluster, a written row, a mark, or on a
    /// failure (said in one warning).
    pub(crate) fn superseded_in_cluster(&self) -> Option<String> {
        match &self.backend {
            Backend::Cluster { cluster, .. } if cluster.row_written.load(Ordering::Relaxed) => {
                runs::superseded_looked_up(&cluster.target, &cluster.run_id)
            }
            _ => None,
        }
    }

    /// Try once to take the lock of `app` (created if missing). With a cluster: the cluster
    /// lock, then the flock; an unreachable server is an error (class kept: see
    /// [`cluster_lock::into_error`](super::cluster_lock::into_error)). A cluster lock with
    /// a live place in the app's queue is busy even between two holders: the free lock is the
    /// queue's head's (D84), and PostgreSQL does not let a try pass a waiting head.
    pub(crate) fn try_acquire(&self, app: &Domain) -> io::Result<Attempt> {
        let busy = |busy| {
            Attempt::Busy(BusyLock {
                busy,
                backend: self.backend.clone(),
                app: app.clone(),
            })
        };
        let hold = match &self.backend {
            Backend::Flock { .. } => None,
            Backend::Cluster { cluster, .. } => {
                let session = cluster.connect(app)?;
                match cluster.try_lock(session, app)? {
                    Ok(hold) => Some(hold),
                    Err(mut session) => {
                        let holder = remote_holder(&mut session, app).map(Box::new);
                        return Ok(busy(Busy::Remote { session, holder }));
                    }
                }
            }
        };
        Ok(
            match (
                lock::try_acquire(self.backend.dir(), app_lock_name(app))?,
                hold,
            ) {
                (TryLock::Held(held), cluster) => Attempt::Held(AppLock { held, cluster }),
                (TryLock::Busy(file), None) => busy(Busy::Local(file)),
                (TryLock::Busy(file), Some(hold)) => busy(Busy::LocalAfterCluster { hold, file }),
            },
        )
    }

    /// Take the lock of `app` only if it exists and is free (a janitor never creates one just
    /// to look). `None`: busy or missing. With a cluster, the cluster lock too (tried, never
    /// waited for): a dead run of a cluster app is reaped only under both (PROTOCOL §17).
    pub(crate) fn try_acquire_existing(&self, app: &Domain) -> io::Result<Option<AppLock>> {
        let Some(held) = lock::try_acquire_existing(self.backend.dir(), app_lock_name(app))? else {
            return Ok(None);
        };
        match &self.backend {
            Backend::Flock { .. } => Ok(Some(AppLock {
                held,
                cluster: None,
            })),
            // Both tried, neither waited for: no order between them can deadlock (D70).
            Backend::Cluster { cluster, .. } => {
                let session = cluster.connect(app)?;
                Ok(cluster.try_lock(session, app)?.ok().map(|hold| AppLock {
                    held,
                    cluster: Some(hold),
                }))
            }
        }
    }

    /// The queue of runs waiting for `app` on this host (PROTOCOL §15), created when `create`.
    /// `Ok(None)`: nobody queued for it yet. (With a cluster the runs do not use it: their
    /// queue is PostgreSQL's, see [`AppLocks::is_cluster`].)
    pub(crate) fn queue(&self, app: &Domain, create: bool) -> io::Result<Option<Queue>> {
        Queue::open(self.backend.dir(), app, create)
    }

    /// Whether the app locks live on a cluster (issue 16): then the order of the waiters is
    /// PostgreSQL's lock queue across all hosts, not this host's tickets (PROTOCOL §15).
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.backend, Backend::Cluster { .. })
    }

    /// The holder of `app`'s lock on this host right now: its metadata and its pid in the
    /// kernel's lock table (`None`, `None`: free or missing).
    pub(crate) fn holder_now(&self, app: &Domain) -> (Option<LockMeta>, Option<i32>) {
        match lock::open_existing(self.backend.dir(), app_lock_name(app)) {
            Ok(f) => (record::read_meta(&f), crate::sys::proc_locks::holder_of(&f)),
            Err(_) => (None, None),
        }
    }

    /// The last metadata written for `app`'s lock on this host, read without taking the lock;
    /// with a cluster, when no run of this host holds it, the cluster's holder (from its row,
    /// on a short session of its own: the waiting line names a holder on another host).
    pub(crate) fn holder_meta(&self, app: &Domain) -> Option<LockMeta> {
        let local = lock::open_existing(self.backend.dir(), app_lock_name(app))
            .ok()
            .and_then(|f| record::read_meta(&f));
        match (&self.backend, &local) {
            (Backend::Cluster { cluster, .. }, None) => cluster_holder(cluster, app),
            (Backend::Cluster { cluster, .. }, Some(m)) if m.state == record::State::Clean => {
                cluster_holder(cluster, app).or(local)
            }
            _ => local,
        }
    }
}

impl AppLock {
    /// The lock a cluster wait got: this host's flock and the cluster hold.
    pub(super) fn of_cluster(held: HeldLock, hold: ClusterHold) -> AppLock {
        AppLock {
            held,
            cluster: Some(hold),
        }
    }

    /// Where the lock lives, for messages.
    pub(crate) fn path(&self) -> PathBuf {
        self.held.path()
    }

    /// The metadata in the lock (`None` when torn, empty or not tether's).
    pub(crate) fn meta(&self) -> Option<LockMeta> {
        record::read_meta(self.held.file())
    }

    /// Whether the lock carries any metadata at all (garbage counts: an unknown dead run).
    pub(crate) fn has_content(&self) -> bool {
        self.held.file().metadata().map(|m| m.len()).unwrap_or(0) > 0
    }

    /// Rewrite the metadata in place (waiters read it while we hold the lock).
    pub(crate) fn write_meta(&self, meta: &LockMeta) -> io::Result<()> {
        record::write_meta(self.held.file(), meta)
    }

    /// Empty the metadata (garbage that names nobody).
    pub(crate) fn clear_meta(&self) -> io::Result<()> {
        self.held.file().set_len(0)
    }

    /// Remove the lock while holding it (the janitor's tidy-up): waiters re-open the path.
    pub(crate) fn unlink(&self) -> io::Result<()> {
        self.held.unlink()
    }

    /// Start the cluster lock's heartbeat (cluster only: `None` for a flock): the lease the
    /// supervisor watches from now on (PROTOCOL §16). An error: the cluster session is gone.
    pub(crate) fn start_heartbeat(
        &mut self,
        app: &Domain,
        run_id: &str,
        timing: crate::config::cluster::FenceTiming,
    ) -> Option<io::Result<crate::sys::lease::Lease>> {
        self.cluster
            .as_mut()
            .map(|c| c.start_heartbeat(app, run_id, timing))
    }

    /// The fencing token of this acquisition (cluster only).
    pub(crate) fn fence(&self) -> Option<i64> {
        self.cluster.as_ref().map(|c| c.fence)
    }

    /// The app's cluster rows as read when this run took the lock (DECISIONS D80): once.
    pub(crate) fn take_cluster_rows(&mut self) -> Option<Vec<crate::cluster::runs::Row>> {
        self.cluster.as_mut().and_then(ClusterHold::take_rows)
    }

    /// The run's teardown failed: its cluster row stays `running` at release, for the next
    /// holder to reap (PROTOCOL §17).
    pub(crate) fn keep_row(&mut self) {
        if let Some(c) = self.cluster.as_mut() {
            c.keep_row();
        }
    }

    /// The cluster lock's session while no heartbeat renews it (a janitor's probe): statements
    /// made under the lock. A run's holder uses a session of its own (PROTOCOL §17).
    pub(crate) fn cluster_session(&mut self) -> Option<&mut Session> {
        self.cluster.as_mut().and_then(ClusterHold::session)
    }

    /// Remove the run's own row (its teardown is over), on the lock's session before it
    /// closes (PROTOCOL §17). An error: the lock's session is gone (the lock lost) or failed;
    /// the caller tries on a session of its own (D78).
    pub(crate) fn remove_row(&mut self, run_id: &str) -> crate::error::Result<()> {
        match self.cluster.as_mut() {
            Some(c) => c.remove_row(run_id),
            None => Ok(()),
        }
    }

    /// Release (close; never unlink: a waiter may be blocked on it) in the reverse of the
    /// order taken: the flock first, then the cluster lock's connection (its row settled
    /// first, PROTOCOL §17).
    pub(crate) fn release(self) {
        let AppLock { held, cluster } = self;
        held.release();
        if let Some(mut c) = cluster {
            c.release_row();
            drop(c);
        }
    }
}

impl AppLocks {
    /// The head of `app`'s cluster queue (`spot`: its place) waits one slice for the app on
    /// `session`, then for this host's flock. Only for the run's own app on a cluster.
    pub(crate) fn head_wait(
        &self,
        session: Session,
        app: &Domain,
        spot: Spot,
    ) -> io::Result<HeadWait> {
        let Backend::Cluster { cluster, dir } = &self.backend else {
            return Err(io::Error::other(
                "internal: a cluster queue without a cluster",
            ));
        };
        let row = cluster
            .row_for(app)
            .ok_or_else(|| io::Error::other("internal: a cluster queue for another app"))?;
        let wait = ClusterWait::start_head(
            session,
            app,
            (dir.clone(), app_lock_name(app)),
            (row.clone(), cluster.target.timing),
            spot,
        )?;
        Ok(HeadWait::of(wait))
    }
}

impl BusyLock {
    /// The run's own session when the app is held or queued for on the cluster: the session
    /// the run stands in the app's queue with (PROTOCOL §15 "Under a cluster"). Otherwise (the
    /// cluster lock is ours, this host's flock is busy; or no cluster) the busy lock back.
    pub(crate) fn into_cluster_session(self) -> Result<Session, Box<BusyLock>> {
        match self.busy {
            Busy::Remote { session, .. } => Ok(session),
            busy => Err(Box::new(BusyLock { busy, ..self })),
        }
    }

    /// The holder's metadata, for the waiting line and `cancel-older`: a holder on this host
    /// from its lockfile; one on another host from its row (host, run id, pid, when it took
    /// the lock — nothing else of it is known here, and nothing of it is acted on).
    pub(crate) fn holder(&self) -> Option<LockMeta> {
        match &self.busy {
            Busy::Local(file) | Busy::LocalAfterCluster { file, .. } => record::read_meta(file),
            Busy::Remote { holder, .. } => holder.as_deref().cloned(),
        }
    }

    /// The holder's pid as the kernel's lock table has it (never a pid from a file).
    pub(crate) fn holder_pid(&self) -> Option<i32> {
        match &self.busy {
            Busy::Local(file) | Busy::LocalAfterCluster { file, .. } => {
                crate::sys::proc_locks::holder_of(file)
            }
            Busy::Remote { .. } => None,
        }
    }

    /// Block for the lock on a helper thread whose only job is that (DECISIONS D4); the
    /// caller keeps waiting on its funnel and `ready_fd`.
    pub(crate) fn wait(self) -> io::Result<WaitingLock> {
        let dir = self.backend.dir().clone();
        let name = app_lock_name(&self.app);
        let (wait, reader) = match self.busy {
            Busy::Local(file) => {
                let reader = file.try_clone().ok();
                (Wait::Flock(Waiter::start(file)?), reader)
            }
            Busy::Remote { session, .. } => {
                let row = match &self.backend {
                    Backend::Cluster { cluster, .. } => cluster
                        .row_for(&self.app)
                        .map(|r| (r.clone(), cluster.target.timing)),
                    Backend::Flock { .. } => None,
                };
                (
                    Wait::Cluster(Box::new(ClusterWait::start(
                        session, &self.app, dir, name, row,
                    )?)),
                    None,
                )
            }
            Busy::LocalAfterCluster { hold, file } => (
                Wait::Cluster(Box::new(ClusterWait::flock_after(hold, dir, name)?)),
                Some(file),
            ),
        };
        Ok(WaitingLock {
            wait,
            reader,
            backend: self.backend,
            app: self.app,
        })
    }
}

impl WaitingLock {
    /// Readable once the wait is over.
    pub(crate) fn ready_fd(&self) -> RawFd {
        match &self.wait {
            Wait::Flock(w) => w.raw_fd(),
            Wait::Cluster(wait) => wait.raw_fd(),
        }
    }

    /// The current holder's metadata (it may change while we wait). A wait in PostgreSQL's
    /// queue has no lockfile to read: the cluster's holder is looked up from its row (on a
    /// short session of its own), as the first waiting line did.
    pub(crate) fn holder(&self) -> Option<LockMeta> {
        match (&self.reader, &self.backend) {
            (Some(file), _) => record::read_meta(file),
            (None, Backend::Cluster { cluster, .. }) => cluster_holder(cluster, &self.app),
            (None, Backend::Flock { .. }) => None,
        }
    }

    pub(crate) fn holder_pid(&self) -> Option<i32> {
        self.reader
            .as_ref()
            .and_then(crate::sys::proc_locks::holder_of)
    }

    /// The lock, once `ready_fd` was readable. `Ok(None)`: the lock we waited on was removed
    /// meanwhile (a janitor's tidy-up): try again. (A cluster wait re-opens the flock itself,
    /// so it never gives back a cluster lock it waited for in PostgreSQL's queue.)
    pub(crate) fn finish(self) -> io::Result<Option<AppLock>> {
        let dir = self.backend.dir();
        let name = app_lock_name(&self.app);
        match self.wait {
            Wait::Flock(w) => Ok(lock::confirm(w.finish()?, dir, name).map(|held| AppLock {
                held,
                cluster: None,
            })),
            Wait::Cluster(wait) => {
                let (held, hold) = wait.finish()?;
                Ok(Some(AppLock {
                    held,
                    cluster: Some(hold),
                }))
            }
        }
    }
}
