//! The two records a run leaves: lock metadata (in the app lockfile, SPEC §4.2) and the run
//! record `run.json` (in the run dir, SPEC §4.3).
//!
//! Readers must survive a torn or corrupt file (a holder killed mid-write): they parse the
//! first JSON value and ignore trailing bytes, and treat anything unparsable as "unknown".
//! Nothing in either record is ever executed by a reader except the teardown command taken
//! from `run.json`, which lives in an owner-only (0700) directory.

use crate::ci_env::CiInfo;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

pub const VERSION: u32 = 1;

/// Now, in the records' unit (Unix seconds).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Claimed its run dir, not yet holding the app lock: it never touched its app.
    Queued,
    Running,
    TearingDown,
    Clean,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::TearingDown => "tearing-down",
            State::Clean => "clean",
        }
    }
}

/// Lock metadata: who holds (or last held) an app lock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockMeta {
    pub version: u32,
    pub app: String,
    pub run_id: String,
    pub pid: i32,
    /// Start time of `pid` in clock ticks since boot (`/proc/<pid>/stat` field 22): tells a
    /// recycled pid from the holder.
    pub pid_start: u64,
    pub host: String,
    /// Unix seconds.
    pub started_at: u64,
    pub state: State,
    pub run_dir: String,
    pub cgroup: Option<String>,
    pub ci: Option<CiInfo>,
    /// The run's process marker (`TETHER_RUN_TOKEN`), for finding leftovers without a cgroup.
    #[serde(default)]
    pub token: Option<String>,
}

/// The run record: the metadata plus what a reaper needs to finish a dead run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    #[serde(flatten)]
    pub meta: LockMeta,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub setup: Option<String>,
    #[serde(default)]
    pub teardown: Option<String>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub deadline_ms: u64,
    #[serde(default)]
    pub grace_ms: u64,
    #[serde(default)]
    pub teardown_timeout_ms: u64,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub lock_wait_ms: Option<u64>,
    #[serde(default)]
    pub runtime_ms: Option<u64>,
    /// How many janitor sweeps failed to reap this run (its teardown failed).
    #[serde(default)]
    pub reap_failures: u32,
}

/// Parse the first JSON value of `bytes`; trailing bytes (a torn rewrite) are ignored.
pub fn parse_first<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Option<T> {
    serde_json::Deserializer::from_slice(bytes)
        .into_iter::<T>()
        .next()
        .and_then(Result::ok)
}

/// Read lock metadata through an open lockfile (never by path: the path may name another inode).
pub fn read_meta(file: &File) -> Option<LockMeta> {
    let mut buf = Vec::with_capacity(1024);
    let mut f = file;
    // Read from offset 0 without disturbing anyone: each open has its own offset.
    let mut chunk = [0u8; 4096];
    let mut off = 0u64;
    loop {
        match f.read_at(&mut chunk, off) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                off += n as u64;
                if buf.len() > 1 << 20 {
                    return None;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
    }
    let _ = &mut f;
    parse_first(&buf)
}

/// Rewrite lock metadata in place (no `O_TRUNC` at open: waiters read it while we hold it).
pub fn write_meta(file: &File, meta: &LockMeta) -> io::Result<()> {
    let mut text = serde_json::to_vec(meta).map_err(io::Error::other)?;
    text.push(b'\n');
    file.write_all_at(&text, 0)?;
    file.set_len(text.len() as u64)
}

/// Read `run.json`; `None` when missing, unreadable or corrupt.
pub fn read_record(path: &Path) -> Option<RunRecord> {
    let mut buf = Vec::new();
    File::open(path).ok()?.read_to_end(&mut buf).ok()?;
    parse_first(&buf)
}

/// Replace `run.json` atomically, so a reader sees the old or the new record, never half of
/// one: write a sibling, swap it in (`swap_in`), unlink what the sibling name holds then.
/// For writers other than the run itself (a reaper settling a dead run's record).
pub fn write_record(path: &Path, record: &RunRecord) -> io::Result<()> {
    // Per writer: a reaper may settle a record while a run reusing the id holds the dir.
    let tmp = path.with_extension(format!("json.tmp-{}", std::process::id()));
    write_sibling(&tmp, &render(record)?)?;
    let swapped = swap_in(&tmp, path);
    if !matches!(swapped, Ok(Swap::Renamed)) {
        let _ = std::fs::remove_file(&tmp);
    }
    swapped.map(|_| ())
}

/// The run's own writer, when a fresh spare is ready (`create_spare`): the record is written
/// into the spare in place (no new inode: it was made off the critical path) and exchanged
/// with `run.json`. Afterwards the spare name holds the previous record, which a reader may
/// still have open: it is never written again, only unlinked by the next `create_spare` or
/// with the run dir.
///
/// Why all this (DECISIONS D21, BENCHMARKS B2): a record is written twice on the handoff path
/// between two runs of an app (the holder's `tearing-down`, the waiter's `running`). On ext4,
/// the usual home of runs dirs, `rename` over an existing file triggers `auto_da_alloc` (the
/// new file's blocks are allocated and written inside the call, ~0.2 ms), and creating and
/// unlinking an inode costs ~0.1 ms more. An exchange is not a "replace", and writing into an
/// existing empty inode allocates none. tether never fsyncs records (no step of a run could
/// survive a power loss anyway); after one, a record may read old or empty, and an empty
/// record is handled like a missing one (§4.3: the reaper's own teardown).
pub fn write_record_into_spare(spare: &Path, path: &Path, record: &RunRecord) -> io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(spare)?;
    file.write_all_at(&render(record)?, 0)?;
    drop(file);
    swap_in(spare, path).map(|_| ())
}

/// Make `spare` a fresh, empty, owner-only inode that no reader has ever opened (whatever the
/// name held before is unlinked).
pub fn create_spare(spare: &Path) -> io::Result<()> {
    match std::fs::remove_file(spare) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(spare)
        .map(drop)
}

fn render(record: &RunRecord) -> io::Result<Vec<u8>> {
    let mut text = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
    text.push(b'\n');
    Ok(text)
}

fn write_sibling(path: &Path, text: &[u8]) -> io::Result<()> {
    // Owner-only: the teardown command in it is what a root reaper executes.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    file.write_all_at(text, 0)
}

enum Swap {
    /// `path` now has the new content; `tmp` names the old one.
    Exchanged,
    /// There was nothing to exchange with (or no `RENAME_EXCHANGE` here): `tmp` is gone.
    Renamed,
}

fn swap_in(tmp: &Path, path: &Path) -> io::Result<Swap> {
    match exchange(tmp, path) {
        Ok(()) => Ok(Swap::Exchanged),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::EINVAL | libc::ENOSYS)
            ) =>
        {
            std::fs::rename(tmp, path).map(|()| Swap::Renamed)
        }
        Err(e) => Err(e),
    }
}

/// `renameat2(a, b, RENAME_EXCHANGE)`: swap two existing names atomically.
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let a = std::ffi::CString::new(a.as_os_str().as_bytes())?;
    let b = std::ffi::CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: two valid NUL-terminated paths; renameat2 does not keep the pointers.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> LockMeta {
        LockMeta {
            version: VERSION,
            app: "a.example.org".into(),
            run_id: "r1".into(),
            pid: 42,
            pid_start: 7,
            host: "h".into(),
            started_at: 1,
            state: State::Running,
            run_dir: "/x/r1".into(),
            cgroup: None,
            ci: None,
            token: Some("r1.42.7".into()),
        }
    }

    #[test]
    fn torn_rewrite_still_parses_the_first_value() {
        let mut bytes = serde_json::to_vec(&meta()).unwrap();
        bytes.extend_from_slice(b"\"pid\":99,garbage}");
        assert_eq!(parse_first::<LockMeta>(&bytes), Some(meta()));
        assert_eq!(parse_first::<LockMeta>(b"{\"version\":1,\"app"), None);
        assert_eq!(parse_first::<LockMeta>(b""), None);
    }

    #[test]
    fn states_use_the_spec_names() {
        assert_eq!(
            serde_json::to_string(&State::TearingDown).unwrap(),
            "\"tearing-down\""
        );
        assert_eq!(State::Queued.as_str(), "queued");
    }

    fn record(state: State, command: &str) -> RunRecord {
        RunRecord {
            meta: LockMeta { state, ..meta() },
            command: vec![command.into()],
            setup: None,
            teardown: Some("echo bye".into()),
            cwd: None,
            group: None,
            deadline_ms: 0,
            grace_ms: 0,
            teardown_timeout_ms: 0,
            exit_code: None,
            reason: None,
            lock_wait_ms: None,
            runtime_ms: None,
            reap_failures: 0,
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_runs_writer_writes_into_a_fresh_spare_and_swaps_it_in() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.json");
        let spare = |n: u32| dir.path().join(format!("run.json.spare-{n}"));
        for n in 0..3 {
            create_spare(&spare(n)).unwrap();
        }
        // First write: nothing to exchange with, so the spare becomes run.json.
        write_record_into_spare(&spare(0), &path, &record(State::Queued, "q")).unwrap();
        assert_eq!(
            names(dir.path()),
            ["run.json", "run.json.spare-1", "run.json.spare-2"]
        );
        assert_eq!(read_record(&path), Some(record(State::Queued, "q")));

        // A reader that opened the queued record before the next writes.
        let mut reader = File::open(&path).unwrap();
        let fresh = std::fs::metadata(spare(1)).unwrap().ino();
        write_record_into_spare(&spare(1), &path, &record(State::Running, "r")).unwrap();
        assert_eq!(read_record(&path), Some(record(State::Running, "r")));
        assert_eq!(
            std::fs::metadata(&path).unwrap().ino(),
            fresh,
            "the prepared inode"
        );
        // The previous record stays whole under the spare's name.
        assert_eq!(read_record(&spare(1)), Some(record(State::Queued, "q")));
        write_record_into_spare(&spare(2), &path, &record(State::TearingDown, "t")).unwrap();
        assert_eq!(read_record(&path), Some(record(State::TearingDown, "t")));

        // No write ever went into an inode a reader had seen as run.json.
        let mut seen = Vec::new();
        reader.read_to_end(&mut seen).unwrap();
        assert_eq!(parse_first(&seen), Some(record(State::Queued, "q")));
        for p in [path.clone(), spare(1), spare(2)] {
            assert_eq!(
                std::fs::metadata(&p).unwrap().mode() & 0o777,
                0o600,
                "{p:?}"
            );
        }
    }

    #[test]
    fn another_writer_leaves_no_sibling_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.json");
        write_record(&path, &record(State::Running, "x")).unwrap();
        write_record(&path, &record(State::Clean, "x")).unwrap();
        assert_eq!(read_record(&path), Some(record(State::Clean, "x")));
        assert_eq!(names(dir.path()), ["run.json"]);
    }

    /// The property the exchange must keep from `rename`: a reader never finds `run.json`
    /// missing, empty or half-written while the run rewrites it (real files, real kernel).
    #[test]
    fn a_reader_always_finds_a_whole_record_while_it_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let (path, spare) = (
            dir.path().join("run.json"),
            dir.path().join("run.json.spare"),
        );
        let long = "x".repeat(3000);
        write_record(&path, &record(State::Queued, &long)).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (reads, bad) = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let (mut reads, mut bad) = (0u32, 0u32);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match read_record(&path) {
                        Some(r) if r.command == [long.clone()] || r.command == ["short"] => {}
                        _ => bad += 1,
                    }
                    reads += 1;
                }
                (reads, bad)
            });
            for i in 0..2000 {
                let command = if i % 2 == 0 { "short" } else { long.as_str() };
                if i % 4 < 2 {
                    create_spare(&spare).unwrap();
                    write_record_into_spare(&spare, &path, &record(State::Running, command))
                } else {
                    write_record(&path, &record(State::Running, command))
                }
                .unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            reader.join().unwrap()
        });
        assert!(reads > 0);
        assert_eq!(bad, 0, "{bad} of {reads} reads found no whole record");
    }
}
