//! The app lock, behind one seam (issue 15): acquiring, waiting for, probing, reading the
//! holder of, and releasing the lock of an app go through [`AppLocks`], whose only member today
//! is a kernel `flock` on `<lock dir>/app-<domain>.lock` (PROTOCOL §3, PROTOCOL.md). A second
//! member (a cluster-wide lock on PostgreSQL) is a change to this module and its tests; the
//! run's life cycle does not know which one it holds.

use super::lock::{self, app_lock_name, HeldLock, TryLock, Waiter};
use super::queue::Queue;
use super::record::{self, LockMeta};
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
}

/// What a try found.
pub(crate) enum Attempt {
    Held(AppLock),
    /// Someone else holds it; wait with [`BusyLock::wait`].
    Busy(BusyLock),
}

/// A held app lock, identity-checked (PROTOCOL.md). Dropping it releases it.
#[derive(Debug)]
pub(crate) struct AppLock {
    held: HeldLock,
}

/// An app lock someone else holds.
pub(crate) struct BusyLock {
    file: File,
    backend: Backend,
    app: Domain,
}

/// A wait for an app lock, readable on [`WaitingLock::ready_fd`] when it is over.
pub(crate) struct WaitingLock {
    waiter: Waiter,
    /// The same lockfile, to read the holder's metadata for the progress lines.
    reader: Option<File>,
    backend: Backend,
    app: Domain,
}

impl AppLocks {
    /// The locks in `dir`, a lock dir that passed the trust checks (`state::dirs`).
    pub(crate) fn flock(dir: Dir) -> AppLocks {
        AppLocks {
            backend: Backend::Flock { dir },
        }
    }

    /// Try once to take the lock of `app` (created if missing).
    pub(crate) fn try_acquire(&self, app: &Domain) -> io::Result<Attempt> {
        match &self.backend {
            Backend::Flock { dir } => Ok(match lock::try_acquire(dir, app_lock_name(app))? {
                TryLock::Held(held) => Attempt::Held(AppLock { held }),
                TryLock::Busy(file) => Attempt::Busy(BusyLock {
                    file,
                    backend: self.backend.clone(),
                    app: app.clone(),
                }),
            }),
        }
    }

    /// Take the lock of `app` only if it exists and is free (a janitor never creates one just
    /// to look). `None`: busy or missing.
    pub(crate) fn try_acquire_existing(&self, app: &Domain) -> io::Result<Option<AppLock>> {
        match &self.backend {
            Backend::Flock { dir } => {
                Ok(lock::try_acquire_existing(dir, app_lock_name(app))?
                    .map(|held| AppLock { held }))
            }
        }
    }

    /// The queue of runs waiting for `app` (PROTOCOL §14), created when `create`. `Ok(None)`:
    /// nobody queued for it yet.
    pub(crate) fn queue(&self, app: &Domain, create: bool) -> io::Result<Option<Queue>> {
        match &self.backend {
            Backend::Flock { dir } => Queue::open(dir, app, create),
        }
    }

    /// The holder of `app`'s lock right now: its metadata and its pid in the kernel's lock
    /// table (`None`, `None`: free or missing).
    pub(crate) fn holder_now(&self, app: &Domain) -> (Option<LockMeta>, Option<i32>) {
        match &self.backend {
            Backend::Flock { dir } => match lock::open_existing(dir, app_lock_name(app)) {
                Ok(f) => (record::read_meta(&f), crate::sys::proc_locks::holder_of(&f)),
                Err(_) => (None, None),
            },
        }
    }

    /// The last metadata written for `app`'s lock, read without taking the lock.
    pub(crate) fn holder_meta(&self, app: &Domain) -> Option<LockMeta> {
        match &self.backend {
            Backend::Flock { dir } => lock::open_existing(dir, app_lock_name(app))
                .ok()
                .and_then(|f| record::read_meta(&f)),
        }
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

    /// Release (close; never unlink: a waiter may be blocked on it).
    pub(crate) fn release(self) {
        self.held.release();
    }
}

impl BusyLock {
    /// The holder's metadata, for the waiting line and `cancel-older`.
    pub(crate) fn holder(&self) -> Option<LockMeta> {
        record::read_meta(&self.file)
    }

    /// The holder's pid as the kernel's lock table has it (never a pid from a file).
    pub(crate) fn holder_pid(&self) -> Option<i32> {
        crate::sys::proc_locks::holder_of(&self.file)
    }

    /// Block for the lock on a helper thread whose only job is that (DECISIONS D4); the
    /// caller keeps waiting on its funnel and `ready_fd`.
    pub(crate) fn wait(self) -> io::Result<WaitingLock> {
        let reader = self.file.try_clone().ok();
        Ok(WaitingLock {
            waiter: Waiter::start(self.file)?,
            reader,
            backend: self.backend,
            app: self.app,
        })
    }
}

impl WaitingLock {
    /// Readable once the wait is over.
    pub(crate) fn ready_fd(&self) -> RawFd {
        self.waiter.raw_fd()
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
    /// meanwhile (a janitor's tidy-up): try again.
    pub(crate) fn finish(self) -> io::Result<Option<AppLock>> {
        let file = self.waiter.finish()?;
        match &self.backend {
            Backend::Flock { dir } => {
                Ok(lock::confirm(file, dir, app_lock_name(&self.app)).map(|held| AppLock { held }))
            }
        }
    }
}
