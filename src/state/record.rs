//! The two records a run leaves: lock metadata (in the app lockfile, CLI-CONTRACT §12) and the run
//! record `run.json` (in the run dir, CLI-CONTRACT §12).
//!
//! Readers must survive a torn or corrupt file (a holder killed mid-write): they parse the
//! first JSON value and ignore trailing bytes, and treat anything unparsable as "unknown".
//! Nothing in either record is ever executed by a reader except the teardown command taken
//! from `run.json`, and only from a record that is a regular file owned by tether's uid (or
//! root) in a run dir that passed the trust checks (PROTOCOL.md, "Trust model").

use crate::ident::ci_env::CiInfo;
use crate::sys::safe_fs::{Dir, ReadError};
use nix::fcntl::OFlag;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

/// The run record's name in its run dir.
pub(crate) const RECORD_FILE: &str = "run.json";

pub(crate) const VERSION: u32 = 1;

/// Now, in the records' unit (Unix seconds).
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum State {
    /// Claimed its run dir, not yet holding the app lock: it never touched its app.
    Queued,
    Running,
    TearingDown,
    Clean,
}

impl State {
    pub(crate) fn as_str(self) -> &'static str {
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
pub(crate) struct LockMeta {
    pub(crate) version: u32,
    pub(crate) app: String,
    pub(crate) run_id: String,
    pub(crate) pid: i32,
    /// Start time of `pid` in clock ticks since boot (`/proc/<pid>/stat` field 22): tells a
    /// recycled pid from the holder.
    pub(crate) pid_start: u64,
    pub(crate) host: String,
    /// Unix seconds.
    pub(crate) started_at: u64,
    pub(crate) state: State,
    pub(crate) run_dir: String,
    pub(crate) cgroup: Option<String>,
    pub(crate) ci: Option<CiInfo>,
    /// The run's process marker (`TETHER_RUN_TOKEN`), for finding leftovers without a cgroup.
    #[serde(default)]
    pub(crate) token: Option<String>,
}

impl LockMeta {
    /// The token this run's processes carry (`TETHER_RUN_TOKEN`) and its cgroup is named
    /// after, derived from the recorded identity (never taken from the `token` field alone).
    pub(crate) fn expected_token(&self) -> String {
        format!("{}.{}.{}", self.run_id, self.pid, self.pid_start)
    }

    /// The recorded cgroup, if it passes containment (`RunCgroup::recorded`).
    pub(crate) fn run_cgroup(&self) -> Result<crate::sys::cgroup::RunCgroup, String> {
        crate::sys::cgroup::RunCgroup::recorded(self.cgroup.as_deref(), &self.expected_token())
    }
}

/// The run record: the metadata plus what a reaper needs to finish a dead run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RunRecord {
    #[serde(flatten)]
    pub(crate) meta: LockMeta,
    #[serde(default)]
    pub(crate) command: Vec<String>,
    #[serde(default)]
    pub(crate) setup: Option<String>,
    #[serde(default)]
    pub(crate) teardown: Option<String>,
    #[serde(default)]
    pub(crate) cwd: Option<String>,
    #[serde(default)]
    pub(crate) group: Option<String>,
    #[serde(default)]
    pub(crate) deadline_ms: u64,
    #[serde(default)]
    pub(crate) grace_ms: u64,
    #[serde(default)]
    pub(crate) teardown_timeout_ms: u64,
    #[serde(default)]
    pub(crate) exit_code: Option<i32>,
    #[serde(default)]
    pub(crate) reason: Option<String>,
    #[serde(default)]
    pub(crate) lock_wait_ms: Option<u64>,
    #[serde(default)]
    pub(crate) runtime_ms: Option<u64>,
    /// How many janitor sweeps failed to reap this run (its teardown failed).
    #[serde(default)]
    pub(crate) reap_failures: u32,
    /// `--keep-run-dir`: a clean record in a dir that is still there is kept on purpose (until
    /// the janitor's retention passes), not left by a run that died after its teardown.
    #[serde(default)]
    pub(crate) keep: bool,
    /// The fencing token of the cluster lock (issue 16); absent without a cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) fence: Option<i64>,
}

/// Parse the first JSON value of `bytes`; trailing bytes (a torn rewrite) are ignored.
pub(crate) fn parse_first<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Option<T> {
    serde_json::Deserializer::from_slice(bytes)
        .into_iter::<T>()
        .next()
        .and_then(Result::ok)
}

/// The most a record or lock metadata may weigh. A real one is a few KiB (the command line is
/// the big part); anything larger is not tether's and is not read.
pub(crate) const MAX_RECORD_BYTES: u64 = 4 << 20;

/// Read lock metadata through an open lockfile (never by path: the path may name another
/// inode). `None` when torn or corrupt, and when the file is not one tether may trust: not a
/// regular file, owned by someone other than tether's uid or root, or oversized.
pub(crate) fn read_meta(file: &File) -> Option<LockMeta> {
    let st = nix::sys::stat::fstat(file.as_fd()).ok()?;
    let me = nix::unistd::geteuid().as_raw();
    if crate::sys::safe_fs::kind(&st) != crate::sys::safe_fs::Kind::File
        || (st.st_uid != me && st.st_uid != 0)
        || st.st_size as u64 > MAX_RECORD_BYTES
    {
        return None;
    }
    let mut buf = Vec::with_capacity(st.st_size as usize);
    let mut chunk = [0u8; 4096];
    let mut off = 0u64;
    // Read from offset 0 without disturbing anyone: each open has its own offset.
    loop {
        match file.read_at(&mut chunk, off) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                off += n as u64;
                if off > MAX_RECORD_BYTES {
                    return None;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
    }
    parse_first(&buf)
}

/// Rewrite lock metadata in place (no `O_TRUNC` at open: waiters read it while we hold it).
pub(crate) fn write_meta(file: &File, meta: &LockMeta) -> io::Result<()> {
    let mut text = serde_json::to_vec(meta).map_err(io::Error::other)?;
    text.push(b'\n');
    file.write_all_at(&text, 0)?;
    file.set_len(text.len() as u64)
}

/// Read `run.json` of the run dir `dir`. `Missing` when there is none; `Refused` (with the
/// reason) when it is not a regular file owned by tether's uid (or root), is oversized, or
/// is not a whole record (corrupt, empty after a power loss).
pub(crate) fn read_record(dir: &Dir) -> Result<RunRecord, ReadError> {
    let bytes = dir.read_owned(RECORD_FILE, MAX_RECORD_BYTES)?;
    parse_first(&bytes).ok_or_else(|| {
        ReadError::Refused(format!(
            "{} is not a whole run record ({} bytes)",
            dir.join(RECORD_FILE).display(),
            bytes.len()
        ))
    })
}

/// Replace `run.json` atomically, so a reader sees the old or the new record, never half of
/// one: write a sibling, swap it in (`swap_in`), unlink what the sibling name holds then.
/// For writers other than the run itself (a reaper settling a dead run's record).
pub(crate) fn write_record(dir: &Dir, record: &RunRecord) -> io::Result<()> {
    // Per writer: a reaper may settle a record while a run reusing the id holds the dir.
    let tmp = format!("{RECORD_FILE}.tmp-{}", std::process::id());
    let file = dir.open_file(
        &tmp,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC,
        0o600,
    )?;
    // Owner-only: the teardown command in it is what a root reaper executes.
    file.write_all_at(&render(record)?, 0)?;
    drop(file);
    let swapped = swap_in(dir, &tmp);
    if !matches!(swapped, Ok(Swap::Renamed)) {
        let _ = dir.unlink(&tmp);
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
/// record is handled as an unknown dead run (killed by its marks, the reaper's own teardown).
pub(crate) fn write_record_into_spare(
    dir: &Dir,
    spare: &str,
    record: &RunRecord,
) -> io::Result<()> {
    let file = dir.open_file(spare, OFlag::O_WRONLY, 0)?;
    let text = render(record)?;
    file.write_all_at(&text, 0)?;
    // A spare from the pool (D88) may hold a longer record of an ended run: cut it off.
    file.set_len(text.len() as u64)?;
    drop(file);
    swap_in(dir, spare).map(|_| ())
}

/// Make `spare` a fresh, empty, owner-only inode that no reader has ever opened (whatever the
/// name held before is unlinked).
pub(crate) fn create_spare(dir: &Dir, spare: &str) -> io::Result<()> {
    match dir.unlink(spare) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    dir.open_file(
        spare,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
        0o600,
    )
    .map(drop)
}

fn render(record: &RunRecord) -> io::Result<Vec<u8>> {
    let mut text = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
    text.push(b'\n');
    Ok(text)
}

enum Swap {
    /// `run.json` now has the new content; `tmp` names the old one.
    Exchanged,
    /// There was nothing to exchange with (or no `RENAME_EXCHANGE` here): `tmp` is gone.
    Renamed,
}

/// Put `tmp` in `run.json`'s place: `renameat2(RENAME_EXCHANGE)`, or a plain rename when
/// there is nothing to exchange with (or the file system cannot exchange).
fn swap_in(dir: &Dir, tmp: &str) -> io::Result<Swap> {
    match dir.exchange(tmp, RECORD_FILE) {
        Ok(()) => Ok(Swap::Exchanged),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::EINVAL | libc::ENOSYS)
            ) =>
        {
            dir.rename(tmp, dir, RECORD_FILE).map(|()| Swap::Renamed)
        }
        Err(e) => Err(e),
    }
}

/// Records for the unit tests of the layers above (the reaper's and the janitor's plans).
#[cfg(test)]
pub(crate) mod samples {
    use super::{LockMeta, RunRecord, State, VERSION};

    /// Lock metadata of run `id` of `app` whose core (pid 999999) is long gone.
    pub(crate) fn meta(app: &str, id: &str, state: State) -> LockMeta {
        LockMeta {
            version: VERSION,
            app: app.into(),
            run_id: id.into(),
            pid: 999_999,
            pid_start: 1,
            host: "h".into(),
            started_at: 1,
            state,
            run_dir: format!("/runs/{id}"),
            cgroup: None,
            ci: None,
            token: None,
        }
    }

    /// The record of a run of `true` with no setup or teardown.
    pub(crate) fn record(meta: LockMeta) -> RunRecord {
        RunRecord {
            meta,
            command: vec!["true".into()],
            setup: None,
            teardown: None,
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
            keep: false,
            fence: None,
        }
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
    fn states_use_the_contract_names() {
        assert_eq!(
            serde_json::to_string(&State::TearingDown).unwrap(),
            "\"tearing-down\""
        );
        assert_eq!(State::Queued.as_str(), "queued");
    }

    fn record(state: State, command: &str) -> RunRecord {
        RunRecord {
            command: vec![command.into()],
            teardown: Some("echo bye".into()),
            ..samples::record(LockMeta { state, ..meta() })
        }
    }

    fn names(dir: &std::path::Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_runs_writer_writes_into_a_fresh_spare_and_swaps_it_in() {
        use std::io::Read;
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let d = Dir::open_unchecked(dir.path()).unwrap();
        let path = dir.path().join("run.json");
        let spare = |n: u32| format!("run.json.spare-{n}");
        for n in 0..3 {
            create_spare(&d, &spare(n)).unwrap();
        }
        // First write: nothing to exchange with, so the spare becomes run.json.
        write_record_into_spare(&d, &spare(0), &record(State::Queued, "q")).unwrap();
        assert_eq!(
            names(dir.path()),
            ["run.json", "run.json.spare-1", "run.json.spare-2"]
        );
        assert_eq!(read_record(&d).ok(), Some(record(State::Queued, "q")));

        // A reader that opened the queued record before the next writes.
        let mut reader = File::open(&path).unwrap();
        let fresh = std::fs::metadata(dir.path().join(spare(1))).unwrap().ino();
        write_record_into_spare(&d, &spare(1), &record(State::Running, "r")).unwrap();
        assert_eq!(read_record(&d).ok(), Some(record(State::Running, "r")));
        assert_eq!(
            std::fs::metadata(&path).unwrap().ino(),
            fresh,
            "the prepared inode"
        );
        // The previous record stays whole under the spare's name.
        let old = std::fs::read(dir.path().join(spare(1))).unwrap();
        assert_eq!(parse_first(&old), Some(record(State::Queued, "q")));
        write_record_into_spare(&d, &spare(2), &record(State::TearingDown, "t")).unwrap();
        assert_eq!(read_record(&d).ok(), Some(record(State::TearingDown, "t")));

        // No write ever went into an inode a reader had seen as run.json.
        let mut seen = Vec::new();
        reader.read_to_end(&mut seen).unwrap();
        assert_eq!(parse_first(&seen), Some(record(State::Queued, "q")));
        for p in [
            path.clone(),
            dir.path().join(spare(1)),
            dir.path().join(spare(2)),
        ] {
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
        let d = Dir::open_unchecked(dir.path()).unwrap();
        write_record(&d, &record(State::Running, "x")).unwrap();
        write_record(&d, &record(State::Clean, "x")).unwrap();
        assert_eq!(read_record(&d).ok(), Some(record(State::Clean, "x")));
        assert_eq!(names(dir.path()), ["run.json"]);
    }

    /// The property the exchange must keep from `rename`: a reader never finds `run.json`
    /// missing, empty or half-written while the run rewrites it (real files, real kernel).
    #[test]
    fn a_reader_always_finds_a_whole_record_while_it_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let d = Dir::open_unchecked(dir.path()).unwrap();
        let spare = "run.json.spare";
        let long = "x".repeat(3000);
        write_record(&d, &record(State::Queued, &long)).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (reads, bad) = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let (mut reads, mut bad) = (0u32, 0u32);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match read_record(&d).ok() {
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
                    create_spare(&d, spare).unwrap();
                    write_record_into_spare(&d, spare, &record(State::Running, command))
                } else {
                    write_record(&d, &record(State::Running, command))
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
