//! The run dir: `<runs dir>/<run-id>/` (0700) with `run.lock`, `run.json` and `tmp/` (SPEC §2,
//! §3.1 step 3, §4.3).
//!
//! All of a run's state is keyed by run id, never by app: two runs of one app (one waiting,
//! one running) never share a file. `run.lock` is held for the run's whole life, so "is this
//! run alive?" is answered by the kernel (try-lock), never by a pid file or an age.

use crate::error::{Error, Result};
use crate::lock::{self, HeldLock, TryLock};
use crate::names::RunId;
use crate::record::{self, RunRecord};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = "run.lock";
pub const RECORD_FILE: &str = "run.json";
/// Prefix of the fresh inodes a run prepares for its record writes before it takes the app
/// lock (`run.json.spare-0`, `-1`): each is written once and swapped in
/// (`record::write_record_into_spare`), then holds the record it replaced.
pub const SPARE_PREFIX: &str = "run.json.spare-";
/// The record writes a run makes once it holds the app lock: `running`, `tearing-down`.
pub const SPARES_PER_RUN: usize = 2;
pub const TMP_DIR: &str = "tmp";
/// How long a claim waits out a `run.lock` that is busy although the dir has no record yet.
const CLAIM_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// Prefix of a run dir taken out of sight at teardown, deleted right after.
pub const RETIRED_PREFIX: &str = ".retired-";

/// A claimed run dir: we hold its `run.lock`.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    lock: Option<HeldLock>,
    /// Fresh spare inodes, in the order the next record writes use them.
    spares: std::collections::VecDeque<PathBuf>,
    /// How many spares were ever made (the next one's number).
    spares_made: usize,
}

/// What claiming found.
pub struct Claim {
    pub dir: RunDir,
    /// The dir existed with the unclean record of a dead run of the same id (§3.4): the claimer
    /// now holds its `run.lock` and must reap it before reusing the dir.
    pub dead: Option<RunRecord>,
    /// The dir existed already (a dead run's, or a kept one).
    pub existed: bool,
}

pub fn path_of(runs_dir: &Path, id: &RunId) -> PathBuf {
    runs_dir.join(id.as_str())
}

/// Claim `<runs dir>/<id>`: create it (or adopt a dead run's) and take its `run.lock`.
pub fn claim(runs_dir: &Path, id: &RunId) -> Result<Claim> {
    let path = path_of(runs_dir, id);
    let patience = std::time::Instant::now() + CLAIM_PATIENCE;
    loop {
        let created = match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(Error::path("cannot create run dir", &path, e)),
        };
        if !created {
            check_existing(&path)?;
        }
        let lock_path = path.join(LOCK_FILE);
        let held = match lock::try_acquire(&lock_path) {
            Ok(TryLock::Held(h)) => h,
            Ok(TryLock::Busy(_))
                if !path.join(RECORD_FILE).exists() && std::time::Instant::now() < patience =>
            {
                // Busy without a record: another claimer between its mkdir and its first
                // record, or a janitor probing the dir. Neither is a live run: look again.
                std::thread::sleep(std::time::Duration::from_millis(5)); // bounded by CLAIM_PATIENCE
                continue;
            }
            Ok(TryLock::Busy(file)) => {
                let pid = record::read_record(&path.join(RECORD_FILE))
                    .map(|r| r.meta.pid.to_string())
                    .or_else(|| crate::proc_locks::holder_of(&file).map(|p| p.to_string()))
                    .unwrap_or_else(|| "unknown".into());
                return Err(Error::tether(format!("run id {id} is in use by pid {pid}")));
            }
            // The dir vanished under us (a reaper removed it between mkdir and open): retry.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                if created {
                    let _ = std::fs::remove_dir_all(&path);
                }
                return Err(Error::tether(format!("run dir {}: {e}", path.display())));
            }
        };
        let dead = if created {
            None
        } else {
            record::read_record(&path.join(RECORD_FILE))
                .filter(|r| r.meta.state != record::State::Clean)
        };
        return Ok(Claim {
            dir: RunDir::adopt(path, held),
            dead,
            existed: !created,
        });
    }
}

fn check_existing(path: &Path) -> Result<()> {
    let md = std::fs::symlink_metadata(path).map_err(|e| Error::path("run dir", path, e))?;
    if !md.file_type().is_dir() {
        return Err(Error::tether(format!(
            "run dir {} exists and is not a directory",
            path.display()
        )));
    }
    let me = nix::unistd::geteuid().as_raw();
    if md.uid() != me {
        return Err(Error::tether(format!(
            "run dir {} is owned by uid {}, not by uid {me}",
            path.display(),
            md.uid()
        )));
    }
    Ok(())
}

impl RunDir {
    /// Adopt a run dir whose `run.lock` the caller already holds (reconcile, janitor).
    pub fn adopt(path: PathBuf, lock: HeldLock) -> RunDir {
        RunDir {
            path,
            lock: Some(lock),
            spares: Default::default(),
            spares_made: 0,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn record_path(&self) -> PathBuf {
        self.path.join(RECORD_FILE)
    }

    pub fn tmp_path(&self) -> PathBuf {
        self.path.join(TMP_DIR)
    }

    /// Replace `run.json` atomically; into a spare made beforehand when there is one (no new
    /// inode on the way), else through a new sibling.
    pub fn write_record(&mut self, rec: &RunRecord) -> io::Result<()> {
        match self.spares.pop_front() {
            Some(spare) => record::write_record_into_spare(&spare, &self.record_path(), rec),
            None => record::write_record(&self.record_path(), rec),
        }
    }

    /// Make the spares for the record writes under the app lock, so that no file is created in
    /// the run dir once the run holds the app: inode creation is the slow part of a record
    /// write (DECISIONS D21), and the handoff between two runs of an app waits for two writes.
    pub fn prepare_spares(&mut self) -> io::Result<()> {
        while self.spares.len() < SPARES_PER_RUN {
            let spare = self
                .path
                .join(format!("{SPARE_PREFIX}{}", self.spares_made));
            self.spares_made += 1;
            record::create_spare(&spare)?;
            self.spares.push_back(spare);
        }
        Ok(())
    }

    /// Empty a reused dir (a reaped dead run's leftovers) and create `tmp/`.
    pub fn prepare(&self, fresh: bool) -> io::Result<()> {
        if !fresh {
            for entry in std::fs::read_dir(&self.path)? {
                let entry = entry?;
                if entry.file_name() == LOCK_FILE {
                    continue;
                }
                remove_any(&entry.path())?;
            }
        }
        let tmp = self.tmp_path();
        std::fs::DirBuilder::new().mode(0o700).create(&tmp)?;
        Ok(())
    }

    /// Remove the whole dir: out of sight first (`retire`, while `run.lock` is held), then
    /// delete. Deleting in place raced a claimer of the same id: between the unlink of
    /// `run.lock` and the final `rmdir`, the claimer could create and lock a new `run.lock`
    /// (its identity check passes), and the deletion then took that and the claimer's `tmp/`
    /// with it (`janitor::sweeping_janitors_never_fail_starting_runs`, ~1 in 6 runs). A claimer
    /// that opened the old `run.lock` fails its identity check after the rename and starts over.
    pub fn remove(self) -> io::Result<()> {
        match self.retire() {
            Ok(retired) => remove_tree(&retired),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Take the dir out of sight in one step (rename to `.retired-<id>-<pid>` while still
    /// holding `run.lock`), then release. The caller deletes the returned path afterwards,
    /// off the lock's critical path. Run ids never start with `.`, so the name cannot collide
    /// with a run; a leftover (crash in between) is removed by the janitor.
    pub fn retire(mut self) -> io::Result<PathBuf> {
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let retired = self
            .path
            .with_file_name(format!("{RETIRED_PREFIX}{name}-{}", std::process::id()));
        let result = std::fs::rename(&self.path, &retired);
        if let Some(l) = self.lock.take() {
            l.release();
        }
        result.map(|()| retired)
    }

    /// Release `run.lock` and leave the dir in place (kept runs, failed teardowns), without
    /// the spares (older copies of the record would only confuse whoever inspects the dir).
    pub fn release(mut self) {
        for n in 0..self.spares_made {
            let _ = std::fs::remove_file(self.path.join(format!("{SPARE_PREFIX}{n}")));
        }
        if let Some(l) = self.lock.take() {
            l.release();
        }
    }
}

fn remove_any(path: &Path) -> io::Result<()> {
    let md = std::fs::symlink_metadata(path)?;
    if md.file_type().is_dir() {
        remove_tree(path)
    } else {
        std::fs::remove_file(path)
    }
}

/// `remove_dir_all` (which never follows symlinks), retried once after making every
/// directory below writable again: a test that `chmod 000`s a dir must not leave it behind.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            make_writable(path);
            match std::fs::remove_dir_all(path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other,
            }
        }
    }
}

fn make_writable(dir: &Path) {
    let Ok(md) = std::fs::symlink_metadata(dir) else {
        return;
    };
    if !md.file_type().is_dir() {
        return;
    }
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            make_writable(&e.path());
        }
    }
}
