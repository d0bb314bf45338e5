//! The kernel's lock table, `/proc/locks`: who holds a flock and how many wait for it.
//!
//! This is the truth `status` shows and the fallback when a lockfile's metadata is torn: a
//! pid read from a file can be stale, the lock table cannot.

use std::fs::File;
use std::os::unix::fs::MetadataExt;

/// One FLOCK entry: holder (or waiter, when `waiting`) pid on (dev, inode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LockEntry {
    pub(crate) pid: i32,
    pub(crate) major: u32,
    pub(crate) minor: u32,
    pub(crate) inode: u64,
    pub(crate) waiting: bool,
}

/// Parse `/proc/locks` text; lines that are not FLOCK entries are skipped.
pub(crate) fn parse(text: &str) -> Vec<LockEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<LockEntry> {
    let mut fields = line.split_whitespace().peekable();
    fields.next()?; // "1:"
    let waiting = fields.peek() == Some(&"->");
    if waiting {
        fields.next();
    }
    if fields.next()? != "FLOCK" {
        return None;
    }
    fields.next()?; // ADVISORY
    fields.next()?; // WRITE / READ
    let pid: i32 = fields.next()?.parse().ok()?;
    let mut id = fields.next()?.split(':');
    let major = u32::from_str_radix(id.next()?, 16).ok()?;
    let minor = u32::from_str_radix(id.next()?, 16).ok()?;
    let inode: u64 = id.next()?.parse().ok()?;
    Some(LockEntry {
        pid,
        major,
        minor,
        inode,
        waiting,
    })
}

/// Read and parse the live table (empty when unreadable). The kernel produces the file a
/// page at a time, so under lock churn one read can repeat or skip entries: read until two
/// consecutive reads agree (a few tries at most).
pub(crate) fn read() -> Vec<LockEntry> {
    let once = || {
        std::fs::read_to_string("/proc/locks")
            .map(|t| parse(&t))
            .unwrap_or_default()
    };
    let mut last = once();
    for _ in 0..5 {
        let next = once();
        if next == last {
            break;
        }
        last = next;
    }
    last
}

/// Entries for the file with this `st_dev`/`st_ino`.
pub(crate) fn entries_for(entries: &[LockEntry], dev: u64, ino: u64) -> Vec<LockEntry> {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    entries
        .iter()
        .filter(|e| e.inode == ino && e.major == major && e.minor == minor)
        .cloned()
        .collect()
}

/// The pid holding a flock on this open file, if the table shows one.
pub(crate) fn holder_of(file: &File) -> Option<i32> {
    let md = file.metadata().ok()?;
    entries_for(&read(), md.dev(), md.ino())
        .into_iter()
        .find(|e| !e.waiting)
        .map(|e| e.pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_holders_and_waiters() {
        let text = "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 99 00:2a:5678 0 EOF\n\
                    2: POSIX  ADVISORY  WRITE 77 fd:01:1 0 EOF\n\
                    3: OFDLCK ADVISORY  READ  -1 00:05:9 0 EOF\n";
        let e = parse(text);
        assert_eq!(e.len(), 2);
        assert_eq!(
            e[0],
            LockEntry {
                pid: 1234,
                major: 0,
                minor: 0x2a,
                inode: 5678,
                waiting: false
            }
        );
        assert!(e[1].waiting);
        assert_eq!(e[1].pid, 99);
    }
}
