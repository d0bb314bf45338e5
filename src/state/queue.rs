//! The queue of runs waiting for one app (PROTOCOL §15), built from kernel-released locks.
//!
//! `<lock dir>/queue-<domain>/` holds a `counter` (a flock taken without blocking while a
//! ticket is numbered, and the last number) and one ticket per waiter: a file whose name (20
//! digits) orders the queue, holding the waiter's [`TicketInfo`]. A waiter holds `LOCK_EX` on
//! its ticket while queued; a ticket whose flock can be taken is a dead waiter's, and whoever
//! finds it so unlinks it while holding it. No sweeper: the kernel releases a dead waiter's
//! flock.
//!
//! Races closed here:
//! - a ticket seen unlocked while it is being made (a prober would take it for dead): it is
//!   made under a `tmp-` name, locked, filled, and only then renamed into place;
//! - two arrivals counting the same queue for `--max-queue`, or numbered alike: counting and
//!   numbering happen under the counter's flock;
//! - a prober unlinking a ticket that was replaced meanwhile: names are never reused, and the
//!   unlink follows an identity check of the locked fd against the name.

use super::lock::{self, identity_matches};
use crate::config::QueueOrder;
use crate::ident::names::Domain;
use crate::sys::proc_locks::{self, LockEntry};
use crate::sys::safe_fs::{kind, Dir, Kind};
use nix::fcntl::OFlag;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::Arc;

/// The queue dir's name in the lock dir is this plus the app's domain.
pub(crate) const DIR_PREFIX: &str = "queue-";
const COUNTER: &str = "counter";
const TMP_PREFIX: &str = "tmp-";
/// Tickets of `oldest-first` arrivals count up from here, `newest-first` ones down: one total
/// order for every reader, so waiters of mixed orders never wait on each other in a circle.
const MIDDLE: u64 = 5_000_000_000_000_000_000;
/// A ticket holds a little JSON; anything bigger is not tether's.
const MAX_TICKET_BYTES: u64 = 4096;

/// Where a new ticket goes.
pub(crate) enum Placement {
    /// By arrival, as the queue order says.
    Arrival,
    /// Right behind the ticket `name` (the foremost run a supersede replaced).
    After(String),
    /// At the head (the run a supersede replaced held the app).
    Head,
}

/// Who waits, as its ticket says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct TicketInfo {
    pub(crate) run_id: String,
    pub(crate) pid: i32,
    pub(crate) pid_start: u64,
    pub(crate) group: Option<String>,
    /// Unix seconds the run started waiting.
    pub(crate) since: u64,
}

/// One live ticket of the queue, in queue order. `info` and `pid` are read by
/// [`describe`] (a waiter only needs names to know its place, and looks every wake-up).
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) name: String,
    /// `None` when the content is not a ticket tether wrote (or not described yet).
    pub(crate) info: Option<TicketInfo>,
    /// The waiting run's pid: the ticket's own ([`describe`]) or its holder in the kernel's
    /// lock table ([`describe_in_kernel`]); `None` until described.
    pub(crate) pid: Option<i32>,
    /// The open ticket, kept to describe it.
    file: Option<Arc<File>>,
}

/// An app's queue dir, open.
#[derive(Debug, Clone)]
pub(crate) struct Queue {
    dir: Dir,
}

/// The counter's flock, held while an arrival counts the queue and takes its number.
pub(crate) struct Counter {
    file: File,
}

/// Our place in the queue: the ticket's flock. Dropping it leaves the queue (unlinks it).
#[derive(Debug)]
pub(crate) struct Ticket {
    file: File,
    dir: Dir,
    name: String,
}

/// A blocking wait for a ticket ahead of us, on a helper thread that only takes the flock,
/// unlinks the ticket if it is still in place (its waiter died), closes it and says so on a
/// pipe. It never forks; if the caller stops caring (a stopped waiter skipped) it stays parked
/// in the kernel until that ticket is released.
pub(crate) struct TicketWait {
    done_rx: OwnedFd,
    _handle: std::thread::JoinHandle<()>,
}

pub(crate) fn dir_name(app: &Domain) -> String {
    format!("{DIR_PREFIX}{app}")
}

fn is_ticket_name(name: &str) -> bool {
    name.len() >= 20 && name.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

impl Queue {
    /// Open the queue of `app` in `lock_dir`; create it when `create`. `Ok(None)`: none yet.
    /// The dir must be a real directory owned by our uid or root and writable by nobody else.
    pub(crate) fn open(lock_dir: &Dir, app: &Domain, create: bool) -> io::Result<Option<Queue>> {
        let name = dir_name(app);
        // A janitor removes a queue dir nobody stands in; it may do so between our mkdir and
        // our open. Make it again then (bounded: each round means a janitor made progress).
        let mut rounds = 0;
        let dir = loop {
            if create {
                match lock_dir.create_dir(&name, 0o755) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
            }
            match lock_dir.open_dir(&name) {
                Ok(d) => break d,
                Err(e) if e.kind() == io::ErrorKind::NotFound && !create => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::NotFound && rounds < 100 => rounds += 1,
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("queue dir {}: {e}", lock_dir.join(&name).display()),
                    ))
                }
            }
        };
        let st = dir.stat()?;
        let me = nix::unistd::geteuid().as_raw();
        if (st.st_uid != me && st.st_uid != 0) || st.st_mode & 0o022 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "queue dir {} is owned by uid {} with mode {:o}: not trusted (it must be \
                     owned by uid {me} or root and writable by nobody else)",
                    dir.path().display(),
                    st.st_uid,
                    st.st_mode & 0o7777
                ),
            ));
        }
        Ok(Some(Queue { dir }))
    }

    /// The counter's flock, without blocking. `None`: another arrival holds it right now, or
    /// the janitor removed the counter meanwhile (try again). `NotFound`: the janitor removed
    /// the whole (empty) queue dir: open it again.
    pub(crate) fn try_counter(&self) -> io::Result<Option<Counter>> {
        let file = lock::open_lockfile(&self.dir, COUNTER)?;
        match file.try_lock() {
            // Locked, but maybe an inode the janitor unlinked while we opened it.
            Ok(()) if identity_matches(&file, &self.dir, COUNTER) => Ok(Some(Counter { file })),
            Ok(()) => Ok(None),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }

    /// The janitor's tidy-up of an app's queue nobody stands in: under the counter's flock,
    /// with no live ticket and nothing else in the dir, unlink the counter while holding it,
    /// then the dir. An arrival racing it makes a new counter (the `rmdir` then fails, and the
    /// queue stays) or finds the dir gone and makes it again. True: removed.
    pub(crate) fn remove_if_empty(lock_dir: &Dir, app: &Domain) -> io::Result<bool> {
        let Some(queue) = Queue::open(lock_dir, app, false)? else {
            return Ok(false);
        };
        let Some(counter) = queue.try_counter()? else {
            return Ok(false);
        };
        if !queue.live()?.is_empty()
            || queue
                .dir
                .entries()?
                .iter()
                .any(|(n, _)| n.as_os_str() != COUNTER)
        {
            return Ok(false);
        }
        queue.dir.unlink(COUNTER)?;
        drop(counter);
        match lock_dir.remove_dir(dir_name(app)) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The live tickets in queue order. A ticket whose flock we can take is a dead waiter's:
    /// it is unlinked on the way (identity-checked, while we hold it).
    pub(crate) fn live(&self) -> io::Result<Vec<Entry>> {
        self.live_where(|_| true)
    }

    /// The live tickets ahead of the ticket `name` (sorting before it), in queue order: all the
    /// head check needs, right after the app lock was granted — one open and try-lock per run
    /// ahead, none for the runs behind (D83).
    pub(crate) fn live_before(&self, name: &str) -> io::Result<Vec<Entry>> {
        self.live_where(|n| n < name)
    }

    fn live_where(&self, wanted: impl Fn(&str) -> bool) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        for name in self.ticket_names()?.into_iter().filter(|n| wanted(n)) {
            let file = match lock::open_existing(&self.dir, &name) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            match file.try_lock() {
                Ok(()) => {
                    if identity_matches(&file, &self.dir, &name) {
                        let _ = self.dir.unlink(&name);
                    }
                    continue;
                }
                Err(std::fs::TryLockError::WouldBlock) => {}
                Err(std::fs::TryLockError::Error(e)) => return Err(e),
            }
            out.push(Entry {
                name,
                info: None,
                pid: None,
                file: Some(Arc::new(file)),
            });
        }
        Ok(out)
    }

    /// The live tickets as the kernel's lock table `table` shows them, without taking a lock
    /// or changing anything (`tether status`).
    pub(crate) fn observed(&self, table: &[LockEntry]) -> Vec<Entry> {
        let mut out = Vec::new();
        for name in self.ticket_names().unwrap_or_default() {
            let Ok(file) = self.dir.open_file(&name, OFlag::O_RDONLY, 0) else {
                continue;
            };
            let entry = entry_of(name, &file, table);
            if entry.pid.is_some() {
                out.push(entry);
            }
        }
        out
    }

    /// Ticket names, sorted (queue order).
    fn ticket_names(&self) -> io::Result<Vec<String>> {
        Ok(self
            .dir
            .entries()?
            .into_iter()
            .filter(|(_, k)| matches!(k, None | Some(Kind::File)))
            .filter_map(|(n, _)| n.into_string().ok())
            .filter(|n| is_ticket_name(n))
            .collect())
    }

    /// Start a blocking wait for the ticket `name` (see [`TicketWait`]). `Ok(None)`: it is
    /// gone already.
    pub(crate) fn wait_for(&self, name: &str) -> io::Result<Option<TicketWait>> {
        let file = match lock::open_existing(&self.dir, name) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let (rx, tx) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let dir = self.dir.clone();
        let name = name.to_owned();
        let handle = std::thread::Builder::new()
            .name("ticket-wait".into())
            .spawn(move || {
                if file.lock().is_ok() && identity_matches(&file, &dir, &name) {
                    let _ = dir.unlink(&name);
                }
                drop(file);
                let _ = nix::unistd::write(&tx, b"x");
            })?;
        Ok(Some(TicketWait {
            done_rx: rx,
            _handle: handle,
        }))
    }
}

/// Fill in what each live entry's ticket says; its `pid` is the ticket's own (the ticket is
/// live: locked, by the process that wrote it — lock fds are never inherited). No read of
/// `/proc/locks`: reading it takes the kernel's global file-lock rwsem for writing and stalls
/// every `flock` on the host, so waiters that look every wake-up must not (see
/// [`describe_in_kernel`] for a verified pid).
pub(crate) fn describe(entries: &mut [Entry]) {
    for e in entries.iter_mut() {
        if let Some(file) = e.file.take() {
            e.info = read_info(&file);
            e.pid = e.info.as_ref().map(|i| i.pid);
        }
    }
}

/// As [`describe`], with each `pid` from the kernel's lock table (one read): for verifying a
/// run before signalling it.
pub(crate) fn describe_in_kernel(entries: &mut [Entry]) {
    if entries.iter().all(|e| e.file.is_none()) {
        return;
    }
    let table = proc_locks::read();
    for e in entries.iter_mut() {
        if let Some(file) = e.file.take() {
            let described = entry_of(std::mem::take(&mut e.name), &file, &table);
            *e = described;
        }
    }
}

fn entry_of(name: String, file: &File, table: &[LockEntry]) -> Entry {
    let pid = file.metadata().ok().and_then(|md| {
        proc_locks::entries_for(table, md.dev(), md.ino())
            .into_iter()
            .find(|e| !e.waiting)
            .map(|e| e.pid)
    });
    Entry {
        name,
        info: read_info(file),
        pid,
        file: None,
    }
}

fn read_info(file: &File) -> Option<TicketInfo> {
    let st = nix::sys::stat::fstat(file.as_fd()).ok()?;
    let me = nix::unistd::geteuid().as_raw();
    if kind(&st) != Kind::File
        || (st.st_uid != me && st.st_uid != 0)
        || st.st_size as u64 > MAX_TICKET_BYTES
    {
        return None;
    }
    let mut buf = vec![0u8; st.st_size as usize];
    let n = file.read_at(&mut buf, 0).ok()?;
    serde_json::from_slice(&buf[..n]).ok()
}

impl Counter {
    /// Number and place our ticket (still holding the counter, so counts stay exact).
    pub(crate) fn take(
        self,
        queue: &Queue,
        info: &TicketInfo,
        order: QueueOrder,
        at: Placement,
    ) -> io::Result<Ticket> {
        let mut buf = [0u8; 32];
        let n = self.file.read_at(&mut buf, 0)?;
        let last: u64 = std::str::from_utf8(&buf[..n])
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        let next = last.saturating_add(1).min(MIDDLE - 1);
        let text = format!("{next}\n");
        self.file.write_all_at(text.as_bytes(), 0)?;
        self.file.set_len(text.len() as u64)?;
        let key = match order {
            QueueOrder::OldestFirst => MIDDLE + next,
            QueueOrder::NewestFirst => MIDDLE - next,
        };
        // `<name>.1` sorts right after `<name>` and before the next number ('.' < '0'); every
        // ticket is placed under the counter, so "not there yet" stays true until the rename.
        let mut name = match at {
            Placement::Arrival => format!("{key:020}"),
            Placement::After(victim) => format!("{victim}.1"),
            Placement::Head => format!("{:020}.{next:020}", 0),
        };
        while queue.dir.stat_at(&name).is_ok() {
            name.push_str(".1");
        }
        queue.place(&name, info)
    }
}

impl Queue {
    /// Make a ticket under a temporary name, lock it, fill it, then rename it to `name`: a
    /// ticket is never visible unlocked.
    fn place(&self, name: &str, info: &TicketInfo) -> io::Result<Ticket> {
        let tmp = format!("{TMP_PREFIX}{}-{name}", std::process::id());
        let file =
            self.dir
                .open_file(&tmp, OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL, 0o644)?;
        let filled = (|| {
            file.try_lock().map_err(|e| match e {
                std::fs::TryLockError::WouldBlock => io::Error::other("new ticket is locked"),
                std::fs::TryLockError::Error(e) => e,
            })?;
            let text = serde_json::to_vec(info).map_err(io::Error::other)?;
            file.write_all_at(&text, 0)?;
            self.dir.rename(&tmp, &self.dir, name)
        })();
        if let Err(e) = filled {
            let _ = self.dir.unlink(&tmp);
            return Err(e);
        }
        Ok(Ticket {
            file,
            dir: self.dir.clone(),
            name: name.to_owned(),
        })
    }
}

impl Ticket {
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Our ticket still stands under its name (nobody removed or replaced it).
    pub(crate) fn in_place(&self) -> bool {
        identity_matches(&self.file, &self.dir, &self.name)
    }
}

impl Drop for Ticket {
    /// Leave the queue: unlink the ticket (if it is still ours) while holding it, then close.
    fn drop(&mut self) {
        if identity_matches(&self.file, &self.dir, &self.name) {
            let _ = self.dir.unlink(&self.name);
        }
    }
}

impl TicketWait {
    /// Readable once the ticket waited for was released.
    pub(crate) fn raw_fd(&self) -> i32 {
        self.done_rx.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str) -> TicketInfo {
        TicketInfo {
            run_id: id.into(),
            pid: std::process::id() as i32,
            pid_start: 1,
            group: None,
            since: 0,
        }
    }

    fn queue() -> (tempfile::TempDir, Queue) {
        let t = tempfile::tempdir().unwrap();
        let lock_dir = Dir::open_unchecked(t.path()).unwrap();
        let app = Domain::parse("a.example.org").unwrap();
        assert!(Queue::open(&lock_dir, &app, false).unwrap().is_none());
        let q = Queue::open(&lock_dir, &app, true).unwrap().unwrap();
        (t, q)
    }

    #[test]
    fn tickets_order_by_arrival_or_reverse_and_leave_when_dropped() {
        let (_t, q) = queue();
        let take = |id: &str, order, at| {
            let counter = q.try_counter().unwrap().unwrap();
            counter.take(&q, &info(id), order, at).unwrap()
        };
        let a = take("a", QueueOrder::OldestFirst, Placement::Arrival);
        let b = take("b", QueueOrder::OldestFirst, Placement::Arrival);
        let c = take("c", QueueOrder::NewestFirst, Placement::Arrival);
        let ids = |q: &Queue| -> Vec<String> {
            let mut entries = q.live().unwrap();
            describe(&mut entries);
            entries
                .into_iter()
                .map(|e| e.info.unwrap().run_id)
                .collect()
        };
        assert_eq!(ids(&q), ["c", "a", "b"]);
        assert!(a.name() < b.name() && c.name() < a.name());
        // Supersede in place: right behind a, twice over; at the head.
        let a2 = take(
            "a2",
            QueueOrder::OldestFirst,
            Placement::After(a.name().into()),
        );
        let a3 = take(
            "a3",
            QueueOrder::OldestFirst,
            Placement::After(a.name().into()),
        );
        let h = take("h", QueueOrder::OldestFirst, Placement::Head);
        assert_eq!(ids(&q), ["h", "c", "a", "a2", "a3", "b"]);
        drop((a2, a3, h));
        drop(a);
        assert_eq!(ids(&q), ["c", "b"]);
        drop((b, c));
        assert!(ids(&q).is_empty());
        let left: Vec<_> = q
            .dir
            .entries()
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            left,
            [std::ffi::OsString::from(COUNTER)],
            "no ticket, no tmp file"
        );
    }

    #[test]
    fn the_tickets_ahead_are_those_that_sort_before_ours() {
        let (_t, q) = queue();
        let take = |id: &str, order, at| {
            let counter = q.try_counter().unwrap().unwrap();
            counter.take(&q, &info(id), order, at).unwrap()
        };
        let a = take("a", QueueOrder::OldestFirst, Placement::Arrival);
        let b = take("b", QueueOrder::OldestFirst, Placement::Arrival);
        let c = take("c", QueueOrder::OldestFirst, Placement::Arrival);
        let names = |v: Vec<Entry>| v.into_iter().map(|e| e.name).collect::<Vec<_>>();
        assert!(q.live_before(a.name()).unwrap().is_empty());
        assert_eq!(
            names(q.live_before(c.name()).unwrap()),
            [a.name(), b.name()]
        );
        let h = take("h", QueueOrder::OldestFirst, Placement::Head);
        let b2 = take(
            "b2",
            QueueOrder::OldestFirst,
            Placement::After(b.name().into()),
        );
        assert_eq!(names(q.live_before(a.name()).unwrap()), [h.name()]);
        assert_eq!(
            names(q.live_before(c.name()).unwrap()),
            [h.name(), a.name(), b.name(), b2.name()]
        );
        drop(b);
        assert_eq!(
            names(q.live_before(c.name()).unwrap()),
            [h.name(), a.name(), b2.name()]
        );
    }

    #[test]
    fn an_unlocked_ticket_is_dead_and_unlinked_by_whoever_looks() {
        let (_t, q) = queue();
        let name = format!("{:020}", MIDDLE + 7);
        q.dir.write_new(&name, b"{}", 0o644).unwrap();
        assert!(q.live().unwrap().is_empty());
        assert!(q.dir.stat_at(&name).is_err(), "dead ticket unlinked");
    }

    #[test]
    fn an_empty_queue_is_removed_and_one_in_use_is_kept() {
        let t = tempfile::tempdir().unwrap();
        let lock_dir = Dir::open_unchecked(t.path()).unwrap();
        let app = Domain::parse("a.example.org").unwrap();
        let q = Queue::open(&lock_dir, &app, true).unwrap().unwrap();
        let counter = q.try_counter().unwrap().unwrap();
        let ticket = counter
            .take(&q, &info("a"), QueueOrder::OldestFirst, Placement::Arrival)
            .unwrap();
        assert!(
            !Queue::remove_if_empty(&lock_dir, &app).unwrap(),
            "a live ticket"
        );
        let held = q.try_counter().unwrap().unwrap();
        drop(ticket);
        assert!(
            !Queue::remove_if_empty(&lock_dir, &app).unwrap(),
            "counter held"
        );
        drop(held);
        assert!(Queue::remove_if_empty(&lock_dir, &app).unwrap());
        assert!(Queue::open(&lock_dir, &app, false).unwrap().is_none());
        // An arrival that still had the removed dir open is told so, and opens a new one.
        let err = q.try_counter().err().map(|e| e.kind());
        assert_eq!(err, Some(io::ErrorKind::NotFound));
    }

    #[test]
    fn the_counter_is_exclusive() {
        let (_t, q) = queue();
        let held = q.try_counter().unwrap().unwrap();
        // flock is per open file description: a second open of the same file is refused.
        assert!(q.try_counter().unwrap().is_none());
        drop(held);
        assert!(q.try_counter().unwrap().is_some());
    }
}
