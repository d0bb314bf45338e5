//! Reconcile (SPEC §4.4): whoever holds an app lock first reaps every dead, unclean run of
//! that app — the one the lockfile's metadata names, and every run dir whose record names
//! the app, whose `run.lock` nobody holds, and whose state is not `clean`.
//!
//! Life and death are decided by the kernel only: a run is dead when its lock can be taken.
//! Never by pid files, heartbeats or ages, so a live run is never reaped. A dead run is
//! reaped at most once: the reaper holds the app lock (and the dead run's `run.lock`) for the
//! whole reap, and marks the run `clean` (or removes it) before letting go.

use crate::cgroup::RunCgroup;
use crate::lifetime::{Event, Funnel};
use crate::lock::{self, HeldLock};
use crate::names::Domain;
use crate::output;
use crate::record::{self, LockMeta, RunRecord, State};
use crate::rundir::{self, RunDir};
use crate::teardown;
use crate::tree::{self, Members};
use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `reason` of a record a reaper settled: its run dir can go at once (no retention).
pub const REAPED: &str = "reaped";

/// What a reaper brings: its own bounds and fallback teardown, and the funnel to wait on.
pub struct Reaper<'a> {
    pub funnel: &'a mut Funnel,
    /// Used when a dead run has no readable record (and says so).
    pub fallback_teardown: Option<String>,
    pub teardown_timeout: Duration,
    pub grace: Duration,
    /// Funnel events that arrived while reaping; the caller acts on them afterwards.
    pub deferred: Vec<Event>,
    /// Run ids reaped so far (never twice in one pass).
    pub reaped: HashSet<String>,
    /// Unclean run records by app, read once per pass (a janitor reconciles thousands of
    /// apps; re-reading the runs dir for each would be quadratic). Every candidate is
    /// re-checked under its `run.lock` before anything is done to it, so staleness is safe.
    pub index: Option<std::collections::HashMap<String, Vec<(PathBuf, RunRecord)>>>,
}

/// A dead run found by a lock probe.
pub struct DeadRun {
    pub meta: LockMeta,
    pub record: Option<RunRecord>,
    /// Its run dir, when we hold its `run.lock` (then we may remove it).
    pub dir: Option<RunDir>,
    /// Remove the run dir after a successful reap (false when the caller reuses it).
    pub remove_dir: bool,
}

/// Failure to reap: the dead run stays for the next holder or the janitor.
#[derive(Debug)]
pub struct ReapFailed(pub String);

impl Reaper<'_> {
    /// Reconcile `app`, whose lock the caller holds. `own` is the run id of the caller (a run
    /// reusing a dead run's id reaps that one itself, through `reap`).
    pub fn reconcile(
        &mut self,
        app: &Domain,
        app_lock: &HeldLock,
        runs_dir: &Path,
        own: Option<&str>,
    ) -> Result<usize, ReapFailed> {
        let mut count = 0;
        let file = app_lock.file();
        let raw_len = file.metadata().map(|m| m.len()).unwrap_or(0);
        match record::read_meta(file) {
            Some(meta) if meta.state != State::Clean && Some(meta.run_id.as_str()) != own => {
                // Already reaped in this pass (e.g. through its run dir when its id was reused):
                // only the stale metadata is left to mark.
                if !self.reaped.contains(&meta.run_id) {
                    let dead = self.dead_from_meta(meta, runs_dir);
                    self.reap(dead)?;
                    count += 1;
                }
                mark_meta_clean(app_lock);
            }
            Some(_) => {}
            None if raw_len > 0 => {
                // Garbage in the lockfile: an unknown dead run of this domain.
                self.reap_unknown(app)?;
                count += 1;
                mark_meta_clean(app_lock);
            }
            None => {}
        }
        for (path, rec) in self.unclean_records(runs_dir, app, own) {
            if Some(rec.meta.run_id.as_str()) == own || self.reaped.contains(&rec.meta.run_id) {
                continue;
            }
            let Ok(Some(held)) = lock::try_acquire_existing(&path.join(rundir::LOCK_FILE)) else {
                continue; // alive (or gone): not ours to reap
            };
            // Re-read under the lock: it may have finished cleanly meanwhile.
            let Some(rec) = record::read_record(&path.join(rundir::RECORD_FILE)) else {
                continue;
            };
            if rec.meta.state == State::Clean {
                continue;
            }
            self.reap(DeadRun {
                meta: rec.meta.clone(),
                record: Some(rec),
                dir: Some(RunDir::adopt(path, held)),
                remove_dir: true,
            })?;
            count += 1;
        }
        Ok(count)
    }

    fn dead_from_meta(&mut self, meta: LockMeta, runs_dir: &Path) -> DeadRun {
        let dir_path = PathBuf::from(&meta.run_dir);
        // Only trust a run dir inside our runs dir: the lockfile is world-readable metadata.
        let inside = dir_path.parent() == Some(runs_dir);
        let held = if inside {
            lock::try_acquire_existing(&dir_path.join(rundir::LOCK_FILE))
                .ok()
                .flatten()
        } else {
            None
        };
        let record = if inside {
            record::read_record(&dir_path.join(rundir::RECORD_FILE))
                .filter(|r| r.meta.run_id == meta.run_id)
        } else {
            None
        };
        DeadRun {
            meta,
            record,
            dir: held.map(|h| RunDir::adopt(dir_path, h)),
            remove_dir: true,
        }
    }

    /// Reap one dead run: kill its leftovers, run its teardown, remove its run dir.
    pub fn reap(&mut self, dead: DeadRun) -> Result<(), ReapFailed> {
        let id = dead.meta.run_id.clone();
        let app = dead.meta.app.clone();
        self.reaped.insert(id.clone());
        let state = dead
            .record
            .as_ref()
            .map(|r| r.meta.state)
            .unwrap_or(dead.meta.state);
        if state == State::Clean {
            finish_dir(dead.dir, dead.remove_dir);
            return Ok(());
        }
        output::emit(
            output::Level::Info,
            "reaping",
            &format!("reaping dead run {id} of {app}"),
            &[
                ("run_id", id.clone().into()),
                ("app", app.clone().into()),
                ("state", state.as_str().into()),
            ],
        );
        if state == State::Queued {
            // It never held the app lock, so it never touched the app: only its (empty)
            // cgroup and its run dir are left.
            if let Some(cg) = &dead.meta.cgroup {
                let _ = RunCgroup::at(cg).remove();
            }
            finish_dir(dead.dir, dead.remove_dir);
            return Ok(());
        }
        self.kill_leftovers(&dead.meta);

        let (script, source) = match &dead.record {
            Some(rec) => (rec.teardown.clone(), "its run record"),
            None => (self.fallback_teardown.clone(), "the configured teardown"),
        };
        if dead.record.is_none() {
            output::warn(
                "reaping",
                &format!("no readable run record for dead run {id}: using {source}"),
            );
        }
        let outcome = match script {
            Some(script) => {
                let env = reap_env(&dead);
                let cwd = dead
                    .record
                    .as_ref()
                    .and_then(|r| r.cwd.as_ref())
                    .map(PathBuf::from)
                    .filter(|p| p.is_dir())
                    .unwrap_or_else(|| PathBuf::from("/"));
                let mut events = Vec::new();
                let outcome = teardown::run_shell(
                    &script,
                    &env,
                    Some(&cwd),
                    self.teardown_timeout,
                    self.funnel,
                    &mut events,
                );
                self.deferred.extend(events);
                Some(outcome)
            }
            None => None,
        };
        match outcome {
            Some(o) if !o.ok() => {
                if let Some(d) = dead.dir {
                    d.release();
                }
                Err(ReapFailed(format!(
                    "teardown of dead run {id} of {app} {}; its run dir is kept for the next reap",
                    o.describe()
                )))
            }
            _ => {
                // Settle the record before the app lock that guards this reap is released,
                // even when someone else holds its run dir for the moment (a run reusing its
                // id, a probing janitor): they must find it clean, not reap it again.
                if let Some(mut rec) = dead.record.clone() {
                    rec.meta.state = State::Clean;
                    rec.reason = Some(REAPED.into());
                    let path = PathBuf::from(&rec.meta.run_dir).join(rundir::RECORD_FILE);
                    if path.exists() {
                        let _ = record::write_record(&path, &rec);
                    }
                }
                finish_dir(dead.dir, dead.remove_dir);
                Ok(())
            }
        }
    }

    fn reap_unknown(&mut self, app: &Domain) -> Result<(), ReapFailed> {
        output::info(
            "reaping",
            &format!("reaping dead run unknown of {app} (unreadable lock metadata)"),
        );
        let Some(script) = self.fallback_teardown.clone() else {
            output::warn(
                "reaping",
                &format!("no teardown configured for the unknown dead run of {app}"),
            );
            return Ok(());
        };
        let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(k, _)| !k.to_string_lossy().starts_with("TETHER_"))
            .collect();
        env.push(("TETHER_REASON".into(), "reaped".into()));
        env.push(("TETHER_APP".into(), app.as_str().into()));
        let mut events = Vec::new();
        let o = teardown::run_shell(
            &script,
            &env,
            Some(Path::new("/")),
            self.teardown_timeout,
            self.funnel,
            &mut events,
        );
        self.deferred.extend(events);
        if o.ok() {
            Ok(())
        } else {
            Err(ReapFailed(format!(
                "teardown of the unknown dead run of {app} {}",
                o.describe()
            )))
        }
    }

    fn kill_leftovers(&mut self, meta: &LockMeta) {
        let mut members = Members::default();
        if let Some(cg) = &meta.cgroup {
            members.cgroup = Some(RunCgroup::at(cg));
        }
        if let Some(token) = &meta.token {
            members.env_markers = vec![
                format!("TETHER_RUN_ID={}", meta.run_id),
                format!("TETHER_RUN_TOKEN={token}"),
            ];
        }
        let done = tree::terminate(&members, self.grace, self.funnel);
        self.deferred.extend(done.events);
        if !done.survivors.is_empty() {
            output::warn(
                "reaping",
                &format!(
                    "processes of dead run {} survived SIGKILL: {:?}",
                    meta.run_id, done.survivors
                ),
            );
        }
        if let Some(cg) = &members.cgroup {
            let _ = cg.remove();
        }
    }
}

fn finish_dir(dir: Option<RunDir>, remove: bool) {
    if let Some(d) = dir {
        if remove {
            let path = d.path().to_owned();
            if let Err(e) = d.remove() {
                output::warn(
                    "reaping",
                    &format!("cannot remove run dir {}: {e}", path.display()),
                );
            }
        } else {
            d.release();
        }
    }
}

fn mark_meta_clean(app_lock: &HeldLock) {
    if let Some(mut meta) = record::read_meta(app_lock.file()) {
        meta.state = State::Clean;
        let _ = record::write_meta(app_lock.file(), &meta);
    } else {
        let _ = app_lock.file().set_len(0);
    }
}

/// The dead run's environment for its teardown: ours, with its identity and `reaped`.
fn reap_env(dead: &DeadRun) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !k.to_string_lossy().starts_with("TETHER_"))
        .collect();
    env.push(("TETHER_REASON".into(), "reaped".into()));
    env.push(("TETHER_APP".into(), dead.meta.app.clone().into()));
    env.push(("TETHER_RUN_ID".into(), dead.meta.run_id.clone().into()));
    env.push(("TETHER_RUN_DIR".into(), dead.meta.run_dir.clone().into()));
    if let Some(code) = dead.record.as_ref().and_then(|r| r.exit_code) {
        env.push(("TETHER_EXIT_CODE".into(), code.to_string().into()));
    }
    env
}

impl Reaper<'_> {
    fn unclean_records(
        &mut self,
        runs_dir: &Path,
        app: &Domain,
        own: Option<&str>,
    ) -> Vec<(PathBuf, RunRecord)> {
        let index = self
            .index
            .get_or_insert_with(|| index_unclean(runs_dir, own));
        index.get(app.as_str()).cloned().unwrap_or_default()
    }
}

/// Every run dir with an unclean record, by app. Odd entries are skipped, and so is the
/// caller's own run dir (`own`: its run id is its name): a run never reaps itself, and reading
/// its record would only lengthen the handoff (B2).
pub fn index_unclean(
    runs_dir: &Path,
    own: Option<&str>,
) -> std::collections::HashMap<String, Vec<(PathBuf, RunRecord)>> {
    let mut out: std::collections::HashMap<String, Vec<(PathBuf, RunRecord)>> =
        std::collections::HashMap::new();
    let Ok(entries) = std::fs::read_dir(runs_dir) else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !ft.is_dir() || name.starts_with('.') || Some(name.as_ref()) == own {
            continue;
        }
        let path = e.path();
        if let Some(rec) = record::read_record(&path.join(rundir::RECORD_FILE)) {
            if rec.meta.state != State::Clean {
                out.entry(rec.meta.app.clone())
                    .or_default()
                    .push((path, rec));
            }
        }
    }
    out
}
