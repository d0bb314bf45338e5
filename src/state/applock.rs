//! The app lock, behind one seam (issue 15): acquiring, waiting for, probing, reading the
//! holder of, and releasing the lock of an app go through [`AppLocks`]. Its members: a kernel
//! `flock` on `<lock dir>/app-<domain>.lock` (PROTOCOL.md), and — with a cluster
//! configured (issue 16) — that flock *and then* a session advisory lock on PostgreSQL
//! (`cluster_lock`), with a fence. The run's life cycle does not know which one it holds.

use super::cluster_lock::{ClusterHold, ClusterLocks, ClusterWait};
use super::lock::{self, app_lock_name, HeldLock, TryLock, Waiter};
use super::queue::Queue;
use super::record::{self, LockMeta};
use crate::cluster::session::Session;
use crate::config::cluster::ClusterTarget;
use crate::ident::names::Domain;
use crate::sys::safe_fs::Dir;
use std::fs::File;
use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;

/// The app locks of this tether (today: the lock dir's flocks).
#[derive(Debug, Clone)]
pub(crate) struct AppLocks {
    backend: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    /// `flock(2)` on `app-<domain>.lock` in the lock dir.
    Flock { dir: Dir },
    /// The same flock, then the app's advisory lock on the cluster's PostgreSQL server.
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

/// A held app lock, identity-checked (PROTOCOL.md). Dropping it releases it: the cluster lock
/// first (declared first, dropped first: its connection closes), then the flock.
#[derive(Debug)]
pub(crate) struct AppLock {
    cluster: Option<ClusterHold>,
    held: HeldLock,
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
    /// This run holds the flock; a run on another host holds the cluster lock.
    Remote { held: HeldLock, session: Session },
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
    /// The flock (unless `held`), then the cluster lock.
    Cluster {
        wait: ClusterWait,
        held: Option<HeldLock>,
    },
}

impl AppLocks {
    /// The locks in `dir`, a lock dir that passed the trust checks (`state::dirs`).
    pub(crate) fn flock(dir: Dir) -> AppLocks {
        AppLocks {
            backend: Backend::Flock { dir },
        }
    }

    /// The locks in `dir` and, for each app, on the cluster's server (issue 16); `run_id`
    /// names the sessions (`application_name`).
    pub(crate) fn cluster(dir: Dir, target: ClusterTarget, run_id: String) -> AppLocks {
        AppLocks {
            backend: Backend::Cluster {
                dir,
                cluster: Box::new(ClusterLocks { target, run_id }),
            },
        }
    }

    /// Try once to take the lock of `app` (created if missing). With a cluster: the flock, then
    /// the cluster lock; an unreachable server is an error (class kept: see
    /// [`cluster_lock::into_error`](super::cluster_lock::into_error)).
    pub(crate) fn try_acquire(&self, app: &Domain) -> io::Result<Attempt> {
        let busy = |busy| {
            Attempt::Busy(BusyLock {
                busy,
                backend: self.backend.clone(),
                app: app.clone(),
            })
        };
        let held = match lock::try_acquire(self.backend.dir(), app_lock_name(app))? {
            TryLock::Held(held) => held,
            TryLock::Busy(file) => return Ok(busy(Busy::Local(file))),
        };
        match &self.backend {
            Backend::Flock { .. } => Ok(Attempt::Held(AppLock {
                cluster: None,
                held,
            })),
            Backend::Cluster { cluster, .. } => {
                let session = cluster.connect()?;
                Ok(match cluster.try_lock(session, app)? {
                    Ok(hold) => Attempt::Held(AppLock {
                        cluster: Some(hold),
                        held,
                    }),
                    Err(session) => busy(Busy::Remote { held, session }),
                })
            }
        }
    }

    /// Take the lock of `app` only if it exists and is free (a janitor never creates one just
    /// to look). `None`: busy or missing. The host's flock only, cluster or not (cross-host
    /// reaping is a later part of issue 16).
    pub(crate) fn try_acquire_existing(&self, app: &Domain) -> io::Result<Option<AppLock>> {
        Ok(
            lock::try_acquire_existing(self.backend.dir(), app_lock_name(app))?.map(|held| {
                AppLock {
                    cluster: None,
                    held,
                }
            }),
        )
    }

    /// The queue of runs waiting for `app` on this host (PROTOCOL §15), created when `create`.
    /// `Ok(None)`: nobody queued for it yet. (With a cluster, the host's queue orders this
    /// host's runs before the cluster lock; order across hosts is a later part of issue 16.)
    pub(crate) fn queue(&self, app: &Domain, create: bool) -> io::Result<Option<Queue>> {
        Queue::open(self.backend.dir(), app, create)
    }

    /// The holder of `app`'s lock on this host right now: its metadata and its pid in the
    /// kernel's lock table (`None`, `None`: free or missing).
    pub(crate) fn holder_now(&self, app: &Domain) -> (Option<LockMeta>, Option<i32>) {
        match lock::open_existing(self.backend.dir(), app_lock_name(app)) {
            Ok(f) => (record::read_meta(&f), crate::sys::proc_locks::holder_of(&f)),
            Err(_) => (None, None),
        }
    }

    /// The last metadata written for `app`'s lock on this host, read without taking the lock.
    pub(crate) fn holder_meta(&self, app: &Domain) -> Option<LockMeta> {
        lock::open_existing(self.backend.dir(), app_lock_name(app))
            .ok()
            .and_then(|f| record::read_meta(&f))
    }
}

impl AppLock {
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

    /// Release (close; never unlink: a waiter may be blocked on it): the cluster lock's
    /// connection first, then the flock.
    pub(crate) fn release(self) {
        let AppLock { cluster, held } = self;
        drop(cluster);
        held.release();
    }
}

impl BusyLock {
    /// The holder's metadata, for the waiting line and `cancel-older` (a holder on this host;
    /// `None` for one on another host: not shown yet).
    pub(crate) fn holder(&self) -> Option<LockMeta> {
        match &self.busy {
            Busy::Local(file) => record::read_meta(file),
            Busy::Remote { .. } => None,
        }
    }

    /// The holder's pid as the kernel's lock table has it (never a pid from a file).
    pub(crate) fn holder_pid(&self) -> Option<i32> {
        match &self.busy {
            Busy::Local(file) => crate::sys::proc_locks::holder_of(file),
            Busy::Remote { .. } => None,
        }
    }

    /// Block for the lock on a helper thread whose only job is that (DECISIONS D4); the
    /// caller keeps waiting on its funnel and `ready_fd`.
    pub(crate) fn wait(self) -> io::Result<WaitingLock> {
        let (wait, reader) = match (self.busy, &self.backend) {
            (Busy::Local(file), Backend::Flock { .. }) => {
                let reader = file.try_clone().ok();
                (Wait::Flock(Waiter::start(file)?), reader)
            }
            (Busy::Local(file), Backend::Cluster { cluster, .. }) => {
                let reader = file.try_clone().ok();
                let session = cluster.connect()?;
                let wait = ClusterWait::start(Some(file), session, &self.app)?;
                (Wait::Cluster { wait, held: None }, reader)
            }
            (Busy::Remote { held, session }, _) => {
                let wait = ClusterWait::start(None, session, &self.app)?;
                (
                    Wait::Cluster {
                        wait,
                        held: Some(held),
                    },
                    None,
                )
            }
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
            Wait::Cluster { wait, .. } => wait.raw_fd(),
        }
    }

    /// The current holder's metadata (it may change while we wait).
    pub(crate) fn holder(&self) -> Option<LockMeta> {
        self.reader.as_ref().and_then(record::read_meta)
    }

    pub(crate) fn holder_pid(&self) -> Option<i32> {
        self.reader
            .as_ref()
            .and_then(crate::sys::proc_locks::holder_of)
    }

    /// The lock, once `ready_fd` was readable. `Ok(None)`: the lock we waited on was removed
    /// meanwhile (a janitor's tidy-up): try again (a cluster lock taken meanwhile is released).
    pub(crate) fn finish(self) -> io::Result<Option<AppLock>> {
        let dir = self.backend.dir();
        let name = app_lock_name(&self.app);
        match self.wait {
            Wait::Flock(w) => Ok(lock::confirm(w.finish()?, dir, name).map(|held| AppLock {
                cluster: None,
                held,
            })),
            Wait::Cluster { wait, held } => {
                let (file, hold) = wait.finish()?;
                let held = match (held, file) {
                    (Some(held), _) => Some(held),
                    (None, Some(file)) => lock::confirm(file, dir, name),
                    (None, None) => None,
                };
                Ok(held.map(|held| AppLock {
                    cluster: Some(hold),
                    held,
                }))
            }
        }
    }
}
