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
use std::os::unix::fs::FileExt;
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

/// Replace `run.json` atomically (write a sibling, rename over), so a reader sees the old or
/// the new record, never half of one.
pub fn write_record(path: &Path, record: &RunRecord) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("json.tmp");
    let mut text = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
    text.push(b'\n');
    // Owner-only: the teardown command in it is what a root reaper executes.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(&text)?;
    drop(f);
    std::fs::rename(&tmp, path)
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
}
