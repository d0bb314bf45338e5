//! The run dir: `<runs dir>/<run-id>/` (0700) with `run.lock`, `run.json` and `tmp/` (CLI-CONTRACT §3,
//! CLI-CONTRACT §5 step 3, CLI-CONTRACT §12).
//!
//! All of a run's state is keyed by run id, never by app: two runs of one app (one waiting,
//! one running) never share a file. `run.lock` is held for the run's whole life, so "is this
//! run alive?" is answered by the kernel (try-lock), never by a pid file or an age. Everything
//! here happens relative to the runs dir's and the run dir's fds (`safe_fs`).

use crate::error::{Error, Result};
use crate::ident::names::RunId;
use crate::state::lock::{self, HeldLock, TryLock};
use crate::state::record::{self, RunRecord};
use crate::state::spares::Pool;
use crate::sys::safe_fs::{same_file, Dir, ReadError};
use std::io;
use std::path::PathBuf;

pub(crate) const LOCK_FILE: &str = "run.lock";
pub(crate) use crate::state::record::RECORD_FILE;
/// Prefix of the fresh inodes a run prepares for its record writes before it takes the app
/// lock (`run.json.spare-0`, `-1`): each is written once and swapped in
/// (`record::write_record_into_spare`), then holds the record it replaced.
pub(crate) const SPARE_PREFIX: &str = "run.json.spare-";
/// The record writes a run makes once it holds the app lock: `running`, `tearing-down`, and,
/// when it has a teardown command, `clean` the moment that command exits (so a crash after it
/// cannot repeat it, D25).
pub(crate) fn spares_needed(has_teardown: bool) -> usize {
    2 + usize::from(has_teardown)
}
/// The command's `TMPDIR`.
pub(crate) const TMP_DIR: &str = "tmp";
/// Setup's and teardown's `TMPDIR` under `run_as`: owned by tether's uid, so nothing the
/// command plants can redirect a root `echo … > $TMPDIR/x` (PROTOCOL.md, "Trust model").
pub(crate) const OWN_TMP_DIR: &str = "tether-tmp";
/// How long a claim waits out a `run.lock` that is busy although the dir has no record yet.
const CLAIM_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// Prefix of a run dir taken out of sight at teardown, deleted right after.
pub(crate) const RETIRED_PREFIX: &str = ".retired-";

/// A claimed run dir: we hold its `run.lock`.
#[derive(Debug)]
pub(crate) struct RunDir {
    runs: Dir,
    name: String,
    dir: Dir,
    lock: Option<HeldLock>,
    /// Fresh spare inodes, in the order the next record writes use them.
    spares: std::collections::VecDeque<String>,
    /// How many spares were ever made (the next one's number).
    spares_made: usize,
    /// The runs dir's pool of record inodes (D88): opened by the first `prepare_spares`;
    /// `None` before, for adopted dirs, and when the pool cannot be used.
    pool: Option<Pool>,
}

/// What claiming found.
pub(crate) struct Claim {
    pub(crate) dir: RunDir,
    /// The dir existed with the unclean record of a dead run of the same id (CLI-CONTRACT §5 step 3): the claimer
    /// now holds its `run.lock` and must reap it before reusing the dir.
    pub(crate) dead: Option<RunRecord>,
    /// The dir existed already (a dead run's, or a kept one).
    pub(crate) existed: bool,
}

/// The marker another run leaves in a queued run's dir when it supersedes it (PROTOCOL §15):
/// the superseding run's id.
const SUPERSEDED_FILE: &str = "superseded";

/// Tell the run of `dir` (opened with [`open_trusted`]) that run `by` superseded it.
pub(crate) fn mark_superseded(dir: &Dir, by: &str) -> io::Result<()> {
    match dir.write_new(SUPERSEDED_FILE, format!("{by}\n").as_bytes(), 0o600) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// The run that superseded the run of `dir`, if one did.
pub(crate) fn superseded_by(dir: &Dir) -> Option<String> {
    let bytes = dir.read_owned(SUPERSEDED_FILE, 256).ok()?;
    Some(String::from_utf8_lossy(&bytes).trim().to_owned())
}

pub(crate) fn path_of(runs: &Dir, id: &RunId) -> PathBuf {
    runs.join(id.as_str())
}

/// Open an existing run dir of the runs dir for inspection: a real directory (no symlink),
/// owned by tether's uid, writable by nobody else. `Err` says why it is not one.
pub(crate) fn open_trusted(runs: &Dir, name: &str) -> io::Result<Dir> {
    let dir = runs.open_dir(name).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTDIR | libc::ELOOP) => io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a directory", runs.join(name).display()),
        ),
        _ => e,
    })?;
    let st = dir.stat()?;
    let me = nix::unistd::geteuid().as_raw();
    if st.st_uid != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is owned by uid {}, not by tether's uid {me}",
                dir.path().display(),
                st.st_uid
            ),
        ));
    }
    if st.st_mode & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is group/world writable (mode {:o})",
                dir.path().display(),
                st.st_mode & 0o7777
            ),
        ));
    }
    Ok(dir)
}

/// Claim `<runs dir>/<id>`: create it (or adopt a dead run's) and take its `run.lock`.
pub(crate) fn claim(runs: &Dir, id: &RunId) -> Result<Claim> {
    // Run dirs land in block groups spread over the filesystem, each with few recent
    // deletions for the next allocation to scan past (ext4 without a journal, D90).
    runs.spread_subdirs();
    let name = id.as_str();
    let path = path_of(runs, id);
    let patience = std::time::Instant::now() + CLAIM_PATIENCE;
    loop {
        let created = match runs.create_dir(name, 0o700) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(Error::path("cannot create run dir", &path, e)),
        };
        let dir = match open_trusted(runs, name) {
            Ok(d) => d,
            // Removed by a reaper between our mkdir and open: start over.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::tether(format!("run dir: {e}"))),
        };
        let held = match lock::try_acquire(&dir, LOCK_FILE) {
            Ok(TryLock::Held(h)) => h,
            Ok(TryLock::Busy(_))
                if matches!(dir.stat_at(RECORD_FILE), Err(ref e) if e.kind() == io::ErrorKind::NotFound)
                    && std::time::Instant::now() < patience =>
            {
                // Busy without a record: another claimer between its mkdir and its first
                // record, or a janitor probing the dir. Neither is a live run: look again.
                std::thread::sleep(std::time::Duration::from_millis(5)); // bounded by CLAIM_PATIENCE
                continue;
            }
            Ok(TryLock::Busy(file)) => {
                let pid = record::read_record(&dir)
                    .map(|r| r.meta.pid.to_string())
                    .ok()
                    .or_else(|| crate::sys::proc_locks::holder_of(&file).map(|p| p.to_string()))
                    .unwrap_or_else(|| "unknown".into());
                return Err(Error::tether(format!("run id {id} is in use by pid {pid}")));
            }
            // The dir vanished under us (a reaper removed it between mkdir and open): retry.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                if created {
                    let _ = runs.remove_tree(name);
                }
                return Err(Error::tether(format!("run dir {}: {e}", path.display())));
            }
        };
        // The dir we locked must still be the one the runs dir names: a finished run renames
        // its dir away (retire) while holding its run.lock, and a claimer that opened the old
        // dir meanwhile must not keep it (DECISIONS D23).
        let still_there = match (dir.stat(), runs.stat_at(name)) {
            (Ok(a), Ok(b)) => same_file(&a, &b),
            _ => false,
        };
        if !still_there {
            held.release();
            continue;
        }
        let dead = if created {
            None
        } else {
            record::read_record(&dir)
                .ok()
                .filter(|r| r.meta.state != record::State::Clean)
        };
        return Ok(Claim {
            dir: RunDir::adopt(runs.clone(), name.to_owned(), dir, held),
            dead,
            existed: !created,
        });
    }
}

impl RunDir {
    /// Adopt a run dir whose `run.lock` the caller already holds (reconcile, janitor).
    pub(crate) fn adopt(runs: Dir, name: String, dir: Dir, lock: HeldLock) -> RunDir {
        RunDir {
            runs,
            name,
            dir,
            lock: Some(lock),
            spares: Default::default(),
            spares_made: 0,
            pool: None,
        }
    }

    /// The run dir's path (for messages and the command's environment).
    pub(crate) fn path(&self) -> PathBuf {
        self.runs.join(&self.name)
    }

    /// The run dir, open.
    pub(crate) fn dir(&self) -> &Dir {
        &self.dir
    }

    pub(crate) fn record_path(&self) -> PathBuf {
        self.path().join(RECORD_FILE)
    }

    pub(crate) fn tmp_path(&self) -> PathBuf {
        self.path().join(TMP_DIR)
    }

    pub(crate) fn read_record(&self) -> std::result::Result<RunRecord, ReadError> {
        record::read_record(&self.dir)
    }

    /// Replace `run.json` atomically; into a spare made beforehand when there is one (no new
    /// inode on the way), else through a new sibling.
    pub(crate) fn write_record(&mut self, rec: &RunRecord) -> io::Result<()> {
        match self.spares.pop_front() {
            Some(spare) => record::write_record_into_spare(&self.dir, &spare, rec),
            None => record::write_record(&self.dir, rec),
        }
    }

    /// Make the spares for the record writes under the app lock, so that no file is created in
    /// the run dir once the run holds the app: inode creation is the slow part of a record
    /// write (DECISIONS D21), and the handoff between two runs of an app waits for two writes.
    /// A spare comes from the runs dir's pool when it has one (D88: no inode created).
    pub(crate) fn prepare_spares(&mut self, count: usize) -> io::Result<()> {
        if self.pool.is_none() && self.spares.len() < count {
            self.pool = Pool::open(&self.runs);
        }
        while self.spares.len() < count {
            let spare = format!("{SPARE_PREFIX}{}", self.spares_made);
            self.spares_made += 1;
            let pooled = self
                .pool
                .as_ref()
                .is_some_and(|p| p.take(&self.dir, &spare));
            if !pooled {
                record::create_spare(&self.dir, &spare)?;
            }
            self.spares.push_back(spare);
        }
        Ok(())
    }

    /// Empty a reused dir (a reaped dead run's leftovers) and create `tmp/`.
    pub(crate) fn prepare(&self, fresh: bool) -> io::Result<()> {
        if !fresh {
            for (name, _) in self.dir.entries()? {
                if name == LOCK_FILE {
                    continue;
                }
                self.dir.remove_tree(&name)?;
            }
        }
        self.dir.create_dir(TMP_DIR, 0o700)
    }

    /// Remove the whole dir: out of sight first (`retire`, while `run.lock` is held), then
    /// delete. Deleting in place raced a claimer of the same id: between the unlink of
    /// `run.lock` and the final `rmdir`, the claimer could create and lock a new `run.lock`
    /// (its identity check passes), and the deletion then took that and the claimer's `tmp/`
    /// with it (`janitor::sweeping_janitors_never_fail_starting_runs`, ~1 in 6 runs). A claimer
    /// that opened the old `run.lock` fails its identity check after the rename and starts over.
    pub(crate) fn remove(self) -> io::Result<()> {
        match self.retire() {
            Ok(retired) => retired.remove(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Take the dir out of sight in one step (rename to `.retired-<id>-<pid>` while still
    /// holding `run.lock`), then release. The caller deletes it afterwards (`Retired::remove`),
    /// off the lock's critical path. Run ids never start with `.`, so the name cannot collide
    /// with a run; a leftover (crash in between) is removed by the janitor.
    pub(crate) fn retire(mut self) -> io::Result<Retired> {
        let retired = format!("{RETIRED_PREFIX}{}-{}", self.name, std::process::id());
        let result = self.runs.rename(&self.name, &self.runs, &retired);
        if let Some(l) = self.lock.take() {
            l.release();
        }
        // The record files go back to the pool on removal (D88): `run.json` and every spare.
        let records = std::iter::once(record::RECORD_FILE.to_owned())
            .chain((0..self.spares_made).map(|n| format!("{SPARE_PREFIX}{n}")))
            .collect();
        result.map(|()| Retired {
            runs: self.runs.clone(),
            name: retired,
            records,
            pool: self.pool.take(),
        })
    }

    /// Release `run.lock` and leave the dir in place (kept runs, failed teardowns), without
    /// the spares (older copies of the record would only confuse whoever inspects the dir).
    pub(crate) fn release(mut self) {
        for n in 0..self.spares_made {
            let _ = self.dir.unlink(format!("{SPARE_PREFIX}{n}"));
        }
        if let Some(l) = self.lock.take() {
            l.release();
        }
    }
}

/// A run dir renamed out of sight, to be deleted.
pub(crate) struct Retired {
    runs: Dir,
    name: String,
    /// Its record files, for the pool (empty for a dir the run did not prepare itself).
    records: Vec<String>,
    pool: Option<Pool>,
}

impl Retired {
    pub(crate) fn path(&self) -> PathBuf {
        self.runs.join(&self.name)
    }

    /// Delete it; its record files go to the pool first, while it has room (D88).
    pub(crate) fn remove(self) -> io::Result<()> {
        if let Some(pool) = &self.pool {
            if let Ok(dir) = self.runs.open_dir(&self.name) {
                for name in &self.records {
                    if dir.stat_at(name).is_ok() && !pool.put(&dir, name) {
                        break;
                    }
                }
            }
        }
        self.runs.remove_tree(&self.name)
    }
}
