//! Lock probes from outside tether: who holds or waits on a lockfile, and holding one ourselves.
//!
//! Two ways to look, with different costs:
//! - [`lock_is_free`] try-locks the file (as the janitor does). It briefly *takes* the lock when
//!   free, so never race it against a tether that try-locks the same file at that moment;
//! - [`flock_holders`] / [`flock_waiters`] read the kernel's lock table (`/proc/locks`, matched
//!   by device and inode) and touch nothing. The pid there is the process that took the lock;
//!   an fd inherited across fork still shows the original locker's pid.
//!
//! flock locks belong to an open file description, so a second `open` in this same process
//! conflicts with a lock held through [`hold_lock`]: the test can hold a lock and probe it.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use crate::wait::poll_until;

/// Whether nobody holds a flock on `path` (a missing file is free, and is not created).
/// Opens the file read-only with `O_NOFOLLOW` and try-locks it exclusively.
pub fn lock_is_free(path: impl AsRef<Path>) -> bool {
    let path = path.as_ref();
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return true,
        Err(e) => panic!("opening {} to probe its lock: {e}", path.display()),
    };
    match file.try_lock() {
        Ok(()) => true, // released when `file` drops
        Err(std::fs::TryLockError::WouldBlock) => false,
        Err(std::fs::TryLockError::Error(e)) => panic!("flock probe of {}: {e}", path.display()),
    }
}

/// Polls until the lock on `path` is free; returns whether it happened in time.
pub fn poll_lock_free(path: impl AsRef<Path>, timeout: Duration) -> bool {
    let path = path.as_ref();
    poll_until(timeout, || lock_is_free(path))
}

/// Waits until the lock on `path` is free; panics naming the holders otherwise.
pub fn wait_lock_free(path: impl AsRef<Path>, timeout: Duration) {
    let path = path.as_ref();
    if !poll_lock_free(path, timeout) {
        panic!(
            "timed out after {timeout:?} waiting for the lock {} to be free; holders: {:?}",
            path.display(),
            flock_holders(path)
        );
    }
}

/// Opens `path` the way a holder of it does (the test itself, or the `lock-holder` helper):
/// read-write, created 0644 if missing, never truncated, `O_NOFOLLOW`; close-on-exec.
pub fn open_lock_file(path: impl AsRef<Path>) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

fn open_for_lock(path: &Path) -> File {
    open_lock_file(path).unwrap_or_else(|e| panic!("opening {} to lock it: {e}", path.display()))
}

/// Takes an exclusive flock on `path` for the test process itself (creating the file 0644 if
/// missing, never truncating it); held until the returned `File` is dropped. Panics, naming
/// the holders, if someone else holds it. The fd is close-on-exec: children never inherit it.
pub fn hold_lock(path: impl AsRef<Path>) -> File {
    let path = path.as_ref();
    let file = open_for_lock(path);
    match file.try_lock() {
        Ok(()) => file,
        Err(e) => panic!(
            "hold_lock {}: {e} (holders: {:?})",
            path.display(),
            flock_holders(path)
        ),
    }
}

/// Like [`hold_lock`], but waits (polling) up to `timeout` for the lock to become free.
pub fn wait_hold_lock(path: impl AsRef<Path>, timeout: Duration) -> File {
    let path = path.as_ref();
    let file = open_for_lock(path);
    if poll_until(timeout, || file.try_lock().is_ok()) {
        return file;
    }
    panic!(
        "timed out after {timeout:?} waiting to lock {} (holders: {:?})",
        path.display(),
        flock_holders(path)
    );
}

/// The FLOCK entries of `/proc/locks` on the file at `path`: (pid, is_waiter), sorted and
/// deduplicated. The table is not a snapshot: past a page it comes in several `read()`s, and
/// other tests' locks added or removed in between make one read repeat or skip lines (a holder
/// was once listed twice). So it is read until two consecutive reads agree (a few tries).
fn flock_entries(path: &Path) -> Vec<(i32, bool)> {
    let mut last = flock_entries_once(path);
    for _ in 0..5 {
        let next = flock_entries_once(path);
        if next == last {
            break;
        }
        last = next;
    }
    last
}

/// One read of `/proc/locks`, filtered to the file at `path`, sorted and deduplicated.
fn flock_entries_once(path: &Path) -> Vec<(i32, bool)> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Vec::new();
    };
    let dev = meta.dev();
    // glibc's userspace dev_t encoding.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let ino = meta.ino();
    let table = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let mut entries = Vec::new();
    for line in table.lines() {
        // "1: FLOCK  ADVISORY  WRITE 3182 fe:00:10010765 0 EOF"
        // "1: -> FLOCK  ADVISORY  WRITE 3190 fe:00:10010765 0 EOF" (blocked waiter)
        let mut fields: Vec<&str> = line.split_whitespace().skip(1).collect();
        let waiter = fields.first() == Some(&"->");
        if waiter {
            fields.remove(0);
        }
        if fields.first() != Some(&"FLOCK") || fields.len() < 5 {
            continue;
        }
        let Ok(pid) = fields[3].parse::<i32>() else {
            continue;
        };
        let mut id = fields[4].split(':');
        let parsed = (
            id.next().and_then(|m| u64::from_str_radix(m, 16).ok()),
            id.next().and_then(|m| u64::from_str_radix(m, 16).ok()),
            id.next().and_then(|i| i.parse::<u64>().ok()),
        );
        if parsed == (Some(major), Some(minor), Some(ino)) {
            entries.push((pid, waiter));
        }
    }
    entries.sort_unstable();
    entries.dedup();
    entries
}

/// Pids holding a flock on `path`, from the kernel's lock table (touches nothing).
pub fn flock_holders(path: impl AsRef<Path>) -> Vec<i32> {
    flock_entries(path.as_ref())
        .into_iter()
        .filter(|&(_, waiter)| !waiter)
        .map(|(pid, _)| pid)
        .collect()
}

/// The live tickets of `domain`'s queue in `lock_dir` (PROTOCOL §15), in queue order: each
/// ticket's name and the pid holding its flock (the waiting run's core). Touches nothing.
pub fn queue_tickets(lock_dir: impl AsRef<Path>, domain: &str) -> Vec<(String, i32)> {
    let dir = lock_dir.as_ref().join(format!("queue-{domain}"));
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.len() >= 20 && n.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
        .into_iter()
        .filter_map(|n| {
            let pid = *flock_holders(dir.join(&n)).first()?;
            Some((n, pid))
        })
        .collect()
}

/// Waits until `domain`'s queue holds at least `n` live tickets; returns them in queue order.
pub fn wait_queued(
    lock_dir: impl AsRef<Path>,
    domain: &str,
    n: usize,
    timeout: Duration,
) -> Vec<(String, i32)> {
    let lock_dir = lock_dir.as_ref();
    let mut tickets = Vec::new();
    if poll_until(timeout, || {
        tickets = queue_tickets(lock_dir, domain);
        tickets.len() >= n
    }) {
        return tickets;
    }
    panic!(
        "timed out after {timeout:?} waiting for {n} queued runs of {domain} (have {tickets:?})"
    );
}

/// Pids blocked in `flock` on `path`, from the kernel's lock table (touches nothing).
pub fn flock_waiters(path: impl AsRef<Path>) -> Vec<i32> {
    flock_entries(path.as_ref())
        .into_iter()
        .filter(|&(_, waiter)| waiter)
        .map(|(pid, _)| pid)
        .collect()
}

/// Waits until at least `n` processes are blocked in `flock` on `path` — i.e. a tether is
/// really queued in the kernel, not just about to be. Returns the waiters' pids.
pub fn wait_flock_waiters(path: impl AsRef<Path>, n: usize, timeout: Duration) -> Vec<i32> {
    let path = path.as_ref();
    let mut waiters = Vec::new();
    if poll_until(timeout, || {
        waiters = flock_waiters(path);
        waiters.len() >= n
    }) {
        return waiters;
    }
    panic!(
        "timed out after {timeout:?} waiting for {n} flock waiters on {} (have {waiters:?}; \
         holders {:?})",
        path.display(),
        flock_holders(path)
    );
}
