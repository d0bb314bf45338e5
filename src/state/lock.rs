//! Kernel `flock` locks on files in the lock dir (PROTOCOL §3): the app lock, and the same
//! mechanism for `run.lock` and slots.
//!
//! Races closed here:
//! - a waiter wiping the holder's metadata: lockfiles are opened without `O_TRUNC`;
//! - a symlink or FIFO planted in a lockfile's place: `O_NOFOLLOW`, `O_NONBLOCK`, and a
//!   regular-file check on the opened fd; every open is relative to the lock dir's fd;
//! - the lock leaking into the command or a daemon it starts: `O_CLOEXEC`;
//! - two holders across unlink/recreate (a janitor unlinks a lockfile while a waiter is
//!   blocked on the old inode): after every acquisition the fd's (dev, inode) must still be
//!   what the path names, else the lock is dropped and the acquisition starts over.
//!
//! Blocking waits run on a short-lived thread that does nothing but `flock(LOCK_EX)` and
//! report on a pipe, so the single-threaded core keeps waiting on its signal funnel at the
//! same time. That thread never forks and has ended before any process is spawned.

use crate::sys::safe_fs::{same_file, Dir};
use nix::fcntl::OFlag;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::thread::JoinHandle;

/// The app lockfile's name in the lock dir (`app-<domain>.lock`).
pub(crate) fn app_lock_name(app: &crate::ident::names::Domain) -> String {
    format!("app-{app}.lock")
}

/// Open (creating if needed) the lockfile `name` in `dir`. Never truncates, never follows a
/// symlink, never blocks on a FIFO, and refuses anything but a regular file.
pub(crate) fn open_lockfile(dir: &Dir, name: impl AsRef<OsStr>) -> io::Result<File> {
    dir.open_file(name, OFlag::O_RDWR | OFlag::O_CREAT, 0o644)
}

/// Open an existing lockfile without creating one (probes and janitors).
pub(crate) fn open_existing(dir: &Dir, name: impl AsRef<OsStr>) -> io::Result<File> {
    dir.open_file(name, OFlag::O_RDWR, 0)
}

/// Does the open file still sit at `name` in `dir`? (Same device and inode, via `fstatat`
/// without following a symlink.)
pub(crate) fn identity_matches(file: &File, dir: &Dir, name: impl AsRef<OsStr>) -> bool {
    let (Ok(a), Ok(b)) = (nix::sys::stat::fstat(file.as_fd()), dir.stat_at(name)) else {
        return false;
    };
    same_file(&a, &b)
}

/// A held, identity-checked lock. Dropping it (closing the fd) releases it.
#[derive(Debug)]
pub(crate) struct HeldLock {
    file: File,
    dir: Dir,
    name: OsString,
}

impl HeldLock {
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// The lockfile's path, for messages.
    pub(crate) fn path(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    /// Unlink the lockfile while still holding it (the janitor's tidy-up, PROTOCOL.md): waiters
    /// blocked on this inode wake up, fail their identity check, and re-open the path.
    pub(crate) fn unlink(&self) -> io::Result<()> {
        self.dir.unlink(&self.name)
    }

    /// Release by closing; never unlinks (a waiter may be blocked on this inode).
    pub(crate) fn release(self) {
        drop(self.file);
    }
}

pub(crate) enum TryLock {
    Held(HeldLock),
    /// Someone else holds it; the file stays open so the caller can read the holder's
    /// metadata and then wait on the same open file.
    Busy(File),
}

/// Try once to take the lock `name` in `dir`, repeating only across unlink/recreate races.
pub(crate) fn try_acquire(dir: &Dir, name: impl AsRef<OsStr>) -> io::Result<TryLock> {
    let name = name.as_ref();
    loop {
        let file = open_lockfile(dir, name)?;
        match file.try_lock() {
            Ok(()) => {
                if let Some(held) = confirm(file, dir, name) {
                    return Ok(TryLock::Held(held));
                }
            }
            Err(std::fs::TryLockError::WouldBlock) => return Ok(TryLock::Busy(file)),
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
}

/// Try to lock an existing file without creating it. `Ok(None)` = busy or vanished.
pub(crate) fn try_acquire_existing(
    dir: &Dir,
    name: impl AsRef<OsStr>,
) -> io::Result<Option<HeldLock>> {
    let name = name.as_ref();
    let file = match open_existing(dir, name) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match file.try_lock() {
        Ok(()) => Ok(confirm(file, dir, name)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// The identity check that makes a lock "held": the locked inode is still `name` in `dir`.
pub(crate) fn confirm(file: File, dir: &Dir, name: impl AsRef<OsStr>) -> Option<HeldLock> {
    let name = name.as_ref();
    if identity_matches(&file, dir, name) {
        Some(HeldLock {
            file,
            dir: dir.clone(),
            name: name.to_owned(),
        })
    } else {
        None
    }
}

/// Block until the lock `name` in `dir` is ours, identity-checked (re-opening the path when a
/// janitor replaced the file meanwhile). Only for a helper thread: it never returns early.
pub(crate) fn lock_blocking(dir: &Dir, name: impl AsRef<OsStr>) -> io::Result<HeldLock> {
    let name = name.as_ref();
    loop {
        let file = open_lockfile(dir, name)?;
        file.lock()?;
        if let Some(held) = confirm(file, dir, name) {
            return Ok(held);
        }
    }
}

/// A blocking `flock` running on a helper thread; readable `fd()` means it finished.
pub(crate) struct Waiter {
    done_rx: OwnedFd,
    handle: JoinHandle<(File, io::Result<()>)>,
}

impl Waiter {
    pub(crate) fn start(file: File) -> io::Result<Waiter> {
        let (rx, tx) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let handle = std::thread::Builder::new()
            .name("flock-wait".into())
            .spawn(move || {
                let result = file.lock();
                let _ = nix::unistd::write(&tx, b"x");
                (file, result)
            })?;
        Ok(Waiter {
            done_rx: rx,
            handle,
        })
    }

    pub(crate) fn raw_fd(&self) -> i32 {
        self.done_rx.as_raw_fd()
    }

    /// Join the thread (it has finished once `fd()` is readable) and get the locked file.
    pub(crate) fn finish(self) -> io::Result<File> {
        let (file, result) = self
            .handle
            .join()
            .map_err(|_| io::Error::other("lock wait thread panicked"))?;
        result.map(|()| file)
    }
}
