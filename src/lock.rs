//! Kernel `flock` locks on files in the lock dir (SPEC §4.1): the app lock, and the same
//! mechanism for `run.lock` and slots.
//!
//! Races closed here:
//! - a waiter wiping the holder's metadata: lockfiles are opened without `O_TRUNC`;
//! - a symlink or FIFO planted in a lockfile's place: `O_NOFOLLOW`, `O_NONBLOCK`, and a
//!   regular-file check on the opened fd;
//! - the lock leaking into the command or a daemon it starts: `O_CLOEXEC`;
//! - two holders across unlink/recreate (a janitor unlinks a lockfile while a waiter is
//!   blocked on the old inode): after every acquisition the fd's (dev, inode) must still be
//!   what the path names, else the lock is dropped and the acquisition starts over.
//!
//! Blocking waits run on a short-lived thread that does nothing but `flock(LOCK_EX)` and
//! report on a pipe, so the single-threaded core keeps waiting on its signal funnel at the
//! same time. That thread never forks and has ended before any process is spawned.

use nix::fcntl::OFlag;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

/// Open (creating if needed) a lockfile the safe way. Never truncates, never follows a symlink.
pub fn open_lockfile(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o644)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).bits())
        .open(path)
        .map_err(|e| explain_open_error(path, e))?;
    let md = file.metadata()?;
    if !md.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(file)
}

/// Open an existing lockfile without creating one (probes and janitors).
pub fn open_existing(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).bits())
        .open(path)
        .map_err(|e| explain_open_error(path, e))?;
    if !file.metadata()?.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(file)
}

fn explain_open_error(path: &Path, e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(libc::ELOOP) => io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is a symlink; refusing to follow it", path.display()),
        ),
        Some(libc::EISDIR) => io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is a directory, not a lockfile", path.display()),
        ),
        _ => io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display())),
    }
}

/// Does the open file still sit at `path`? (Same device and inode, via `lstat`.)
pub fn identity_matches(file: &File, path: &Path) -> bool {
    let (Ok(a), Ok(b)) = (file.metadata(), std::fs::symlink_metadata(path)) else {
        return false;
    };
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// A held, identity-checked lock. Dropping it (closing the fd) releases it.
#[derive(Debug)]
pub struct HeldLock {
    file: File,
    path: PathBuf,
}

impl HeldLock {
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Release by closing; never unlinks (a waiter may be blocked on this inode).
    pub fn release(self) {
        drop(self.file);
    }
}

pub enum TryLock {
    Held(HeldLock),
    /// Someone else holds it; the file stays open so the caller can read the holder's
    /// metadata and then wait on the same open file.
    Busy(File),
}

/// Try once to take the lock at `path`, repeating only across unlink/recreate races.
pub fn try_acquire(path: &Path) -> io::Result<TryLock> {
    loop {
        let file = open_lockfile(path)?;
        match file.try_lock() {
            Ok(()) => {
                if let Some(held) = confirm(file, path) {
                    return Ok(TryLock::Held(held));
                }
            }
            Err(std::fs::TryLockError::WouldBlock) => return Ok(TryLock::Busy(file)),
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
}

/// Try to lock an existing file without creating it. `Ok(None)` = busy or vanished.
pub fn try_acquire_existing(path: &Path) -> io::Result<Option<HeldLock>> {
    let file = match open_existing(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match file.try_lock() {
        Ok(()) => Ok(confirm(file, path)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// The identity check that makes a lock "held": the locked inode is still the one at `path`.
pub fn confirm(file: File, path: &Path) -> Option<HeldLock> {
    if identity_matches(&file, path) {
        Some(HeldLock {
            file,
            path: path.to_owned(),
        })
    } else {
        None
    }
}

/// A blocking `flock` running on a helper thread; readable `fd()` means it finished.
pub struct Waiter {
    done_rx: OwnedFd,
    handle: JoinHandle<(File, io::Result<()>)>,
}

impl Waiter {
    pub fn start(file: File) -> io::Result<Waiter> {
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

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.done_rx.as_fd()
    }

    pub fn raw_fd(&self) -> i32 {
        self.done_rx.as_raw_fd()
    }

    /// Join the thread (it has finished once `fd()` is readable) and get the locked file.
    pub fn finish(self) -> io::Result<File> {
        let (file, result) = self
            .handle
            .join()
            .map_err(|_| io::Error::other("lock wait thread panicked"))?;
        result.map(|()| file)
    }
}
