//! Reconcile (SPEC §4.4): whoever holds an app lock first reaps every dead, unclean run of
//! that app — the one the lockfile's metadata names, and every run dir whose record names
//! the app, whose `run.lock` nobody holds, and whose state is not `clean`.
//!
//! Life and death are decided by the kernel only: a run is dead when its lock can be taken.
//! Never by pid files, heartbeats or ages, so a live run is never reaped. A dead run is
//! reaped at most once: the reaper holds the app lock (and the dead run's `run.lock`) for the
//! whole reap, and marks the run `clean` the moment its teardown command has exited, before
//! anything else (killing the teardown's leftovers, removing the dir) can be cut short.
//!
//! Nothing read from a record or lock metadata is acted on without containment (PROTOCOL.md,
//! "Trust model"): a run dir is the entry of *our* runs dir named by the (validated) run id,
//! a cgroup must be a tether cgroup named after that very run and owned by tether's uid, a
//! process marker must be that run's token, and nothing is killed while the recorded core is
//! alive.

use crate::cgroup::RunCgroup;
use crate::lifetime::{Event, Funnel};
use crate::lock::{self, HeldLock};
use crate::names::{Domain, RunId};
use crate::output;
use crate::record::{self, LockMeta, RunRecord, State};
use crate::rundir::{self, RunDir};
use crate::safe_fs::{Dir, ReadError};
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
    /// The runs dir (open): the only place dead runs' dirs and records are looked for.
    pub runs: Option<Dir>,
    /// Used when a dead run has no readable record (and says so).
    pub fallback_teardown: Option<String>,
    pub teardown_timeout: Duration,
    pub grace: Duration,
    /// Where a reap's teardown command runs: the reaping run's own cgroup, so that if the
    /// reaper dies mid-reap, whoever reaps *it* kills what that teardown left.
    pub cgroup: Option<RunCgroup>,
    /// Funnel events that arrived while reaping; the caller acts on them afterwards.
    pub deferred: Vec<Event>,
    /// Run ids reaped so far (never twice in one pass).
    pub reaped: HashSet<String>,
    /// Unclean run records by app, read once per pass (a janitor reconciles thousands of
    /// apps; re-reading the runs dir for each would be quadratic). Every candidate is
    /// re-checked under its `run.lock` before anything is done to it, so staleness is safe.
    pub index: Option<std::collections::HashMap<String, Vec<(String, RunRecord)>>>,
}

/// A dead run found by a lock probe.
pub struct DeadRun {
    pub meta: LockMeta,
    pub record: Option<RunRecord>,
    /// Its run dir, when we hold its `run.lock` (then we may remove it).
    pub dir: Option<RunDir>,
    /// Where its record is settled once reaped (its run dir, held by us or not).
    pub record_dir: Option<Dir>,
    /// Remove the run dir after a successful reap (false when the caller reuses it).
    pub remove_dir: bool,
}

/// Failure to reap: the dead run stays for the next holder or the janitor.
#[derive(Debug)]
pub struct ReapFailed {
    pub message: String,
    /// The dead run's id, when known (for the `tether forget` hint).
    pub run_id: Option<String>,
}

impl ReapFailed {
    fn new(message: String, run_id: Option<&str>) -> ReapFailed {
        ReapFailed {
            message,
            run_id: run_id.map(str::to_owned),
        }
    }
}

impl Reaper<'_> {
    /// Reconcile `app`, whose lock the caller holds. `own` is the run id of the caller (a run
    /// reusing a dead run's id reaps that one itself, through `reap`).
    pub fn reconcile(
        &mut self,
        app: &Domain,
        app_lock: &HeldLock,
        own: Option<&str>,
    ) -> Result<usize, ReapFailed> {
        let mut count = 0;
        let file = app_lock.file();
        let raw_len = file.metadata().map(|m| m.len()).unwrap_or(0);
        match record::read_meta(file) {
            // Metadata of another app in this app's lockfile is not a record tether wrote.
            Some(meta) if meta.app != app.as_str() => {
                self.reap_unknown(app, "its lock metadata names another app")?;
                count += 1;
                mark_meta_clean(app_lock);
            }
            Some(meta) if meta.state != State::Clean && Some(meta.run_id.as_str()) != own => {
                // Already reaped in this pass (e.g. through its run dir when its id was reused):
                // only the stale metadata is left to mark.
                if !self.reaped.contains(&meta.run_id) {
                    let dead = self.dead_from_meta(meta);
                    self.reap(dead)?;
                    count += 1;
                }
                mark_meta_clean(app_lock);
            }
            Some(_) => {}
            None if raw_len > 0 => {
                self.reap_unknown(app, "its lock metadata is unreadable")?;
                count += 1;
                mark_meta_clean(app_lock);
            }
            None => {}
        }
        let Some(runs) = self.runs.clone() else {
            return Ok(count);
        };
        for (name, rec) in self.unclean_records(app, own) {
            if Some(rec.meta.run_id.as_str()) == own || self.reaped.contains(&rec.meta.run_id) {
                continue;
            }
            let Ok(dir) = rundir::open_trusted(&runs, &name) else {
                continue;
            };
            let Ok(Some(held)) = lock::try_acquire_existing(&dir, rundir::LOCK_FILE) else {
                continue; // alive (or gone): not ours to reap
            };
            // Re-read under the lock: it may have finished cleanly meanwhile.
            let Ok(rec) = record::read_record(&dir) else {
                continue;
            };
            if rec.meta.state == State::Clean || rec.meta.run_id != name {
                continue;
            }
            self.reap(DeadRun {
                meta: rec.meta.clone(),
                record: Some(rec),
                dir: Some(RunDir::adopt(runs.clone(), name, dir.clone(), held)),
                record_dir: Some(dir),
                remove_dir: true,
            })?;
            count += 1;
        }
        Ok(count)
    }

    /// The dead run lock metadata names. Its run dir is looked for only as the entry of our
    /// runs dir named by its run id, and only when the metadata says it lived there.
    fn dead_from_meta(&mut self, meta: LockMeta) -> DeadRun {
        let mut dead = DeadRun {
            meta,
            record: None,
            dir: None,
            record_dir: None,
            remove_dir: true,
        };
        let Ok(id) = RunId::parse(&dead.meta.run_id) else {
            return dead;
        };
        let Some(runs) = self.runs.clone() else {
            return dead;
        };
        if Path::new(&dead.meta.run_dir) != rundir::path_of(&runs, &id) {
            return dead;
        }
        let Ok(dir) = rundir::open_trusted(&runs, id.as_str()) else {
            return dead;
        };
        let held = lock::try_acquire_existing(&dir, rundir::LOCK_FILE)
            .ok()
            .flatten();
        dead.record = record::read_record(&dir)
            .ok()
            .filter(|r| r.meta.run_id == dead.meta.run_id);
        dead.dir = held.map(|h| RunDir::adopt(runs, id.to_string(), dir.clone(), h));
        dead.record_dir = Some(dir);
        dead
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
            if let Ok(cg) = RunCgroup::recorded(&dead.meta) {
                let _ = cg.remove();
            }
            finish_dir(dead.dir, dead.remove_dir);
            return Ok(());
        }
        self.kill_leftovers(&dead.meta);

        let script = match &dead.record {
            Some(rec) => rec.teardown.clone(),
            None => {
                self.say_no_record(&format!("dead run {id}"));
                self.fallback_teardown.clone()
            }
        };
        let settle = |dir: &Option<Dir>| {
            // Settle the record before anything else can be cut short, and before the app lock
            // that guards this reap is released, even when someone else holds its run dir for
            // the moment (a run reusing its id, a probing janitor): they must find it clean,
            // not reap it again.
            if let (Some(dir), Some(rec)) = (dir, &dead.record) {
                let mut rec = rec.clone();
                rec.meta.state = State::Clean;
                rec.reason = Some(REAPED.into());
                let _ = record::write_record(dir, &rec);
            }
        };
        let outcome = script.map(|script| {
            let env = reap_env(&dead);
            let cwd = dead
                .record
                .as_ref()
                .and_then(|r| r.cwd.as_ref())
                .map(PathBuf::from)
                .filter(|p| p.is_dir())
                .unwrap_or_else(|| PathBuf::from("/"));
            self.run_teardown(&script, &env, &cwd, &mut |o| {
                if o.ok() {
                    settle(&dead.record_dir);
                }
            })
        });
        match outcome {
            Some(o) if !o.ok() => {
                if let Some(d) = dead.dir {
                    d.release();
                }
                Err(ReapFailed::new(
                    format!(
                        "teardown of dead run {id} of {app} {}; its run dir is kept for the next reap",
                        o.describe()
                    ),
                    Some(&id),
                ))
            }
            Some(_) => {
                finish_dir(dead.dir, dead.remove_dir);
                Ok(())
            }
            None => {
                settle(&dead.record_dir);
                finish_dir(dead.dir, dead.remove_dir);
                Ok(())
            }
        }
    }

    /// A run dir whose `run.lock` we hold but whose record cannot be read (empty after a power
    /// loss, corrupt, not tether's): an unknown dead run. Its app is unknown, so only what is
    /// named after its run id can be found: processes carrying its id and a token of a dead
    /// core, and cgroups named after it with a dead core. Then the fallback teardown (with
    /// `TETHER_RUN_ID`, no `TETHER_APP`), then the dir goes.
    pub fn reap_unreadable(
        &mut self,
        dir: RunDir,
        id: &RunId,
        why: &str,
    ) -> Result<(), ReapFailed> {
        self.reaped.insert(id.to_string());
        output::emit(
            output::Level::Info,
            "reaping",
            &format!("reaping dead run {id} of an unknown app ({why})"),
            &[("run_id", id.as_str().into())],
        );
        let mut members = Members {
            dead_run: Some(id.to_string()),
            ..Members::default()
        };
        let cgroups = crate::cgroup::orphans_of_run(id.as_str());
        let killed = self.terminate_all(&mut members, &cgroups);
        if killed > 0 {
            output::info(
                "reaping",
                &format!("killed {killed} leftover process(es) of dead run {id}"),
            );
        }
        self.say_no_record(&format!("dead run {id}"));
        if let Some(script) = self.fallback_teardown.clone() {
            let mut env = base_env();
            env.push(("TETHER_RUN_ID".into(), id.as_str().into()));
            env.push(("TETHER_RUN_DIR".into(), dir.path().into_os_string()));
            let o = self.run_teardown(&script, &env, Path::new("/"), &mut |_| {});
            if !o.ok() {
                dir.release();
                return Err(ReapFailed::new(
                    format!(
                        "teardown of dead run {id} {}; its run dir is kept for the next reap",
                        o.describe()
                    ),
                    Some(id.as_str()),
                ));
            }
        }
        finish_dir(Some(dir), true);
        Ok(())
    }

    fn say_no_record(&self, whom: &str) {
        let msg = match &self.fallback_teardown {
            Some(_) => format!("no readable run record for {whom}: using the configured teardown"),
            None => format!(
                "no readable run record for {whom} and no teardown configured \
                 (--teardown): no teardown ran"
            ),
        };
        output::warn("reaping", &msg);
    }

    fn reap_unknown(&mut self, app: &Domain, why: &str) -> Result<(), ReapFailed> {
        output::info(
            "reaping",
            &format!("reaping dead run unknown of {app} ({why})"),
        );
        let Some(script) = self.fallback_teardown.clone() else {
            output::warn(
                "reaping",
                &format!(
                    "no teardown configured for the unknown dead run of {app}: no teardown ran"
                ),
            );
            return Ok(());
        };
        let mut env = base_env();
        env.push(("TETHER_APP".into(), app.as_str().into()));
        let o = self.run_teardown(&script, &env, Path::new("/"), &mut |_| {});
        if o.ok() {
            Ok(())
        } else {
            Err(ReapFailed::new(
                format!("teardown of the unknown dead run of {app} {}", o.describe()),
                None,
            ))
        }
    }

    fn run_teardown(
        &mut self,
        script: &str,
        env: &[(OsString, OsString)],
        cwd: &Path,
        on_exit: &mut dyn FnMut(&teardown::Outcome),
    ) -> teardown::Outcome {
        let mut events = Vec::new();
        let o = teardown::run_shell(
            script,
            env,
            Some(cwd),
            self.cgroup.as_ref(),
            self.teardown_timeout,
            self.funnel,
            &mut events,
            on_exit,
        );
        self.deferred.extend(events);
        o
    }

    /// Kill what a dead run left: its cgroup and the processes carrying its token — only
    /// when they are provably its own (containment), and never while its core is alive.
    pub fn kill_leftovers(&mut self, meta: &LockMeta) {
        if crate::procfs::core_alive(meta.pid, meta.pid_start) {
            output::warn(
                "reaping",
                &format!(
                    "the core of dead run {} (pid {}) is still alive: leaving its processes alone",
                    meta.run_id, meta.pid
                ),
            );
            return;
        }
        let mut members = Members::default();
        let cgroup = match (&meta.cgroup, RunCgroup::recorded(meta)) {
            (None, _) => None,
            (Some(_), Ok(cg)) => Some(cg),
            (Some(path), Err(why)) => {
                output::warn(
                    "reaping",
                    &format!(
                        "ignoring the cgroup {path} recorded for dead run {}: {why}",
                        meta.run_id
                    ),
                );
                None
            }
        };
        let token = format!("{}.{}.{}", meta.run_id, meta.pid, meta.pid_start);
        if meta.token.as_deref() == Some(token.as_str()) {
            members.env_markers = vec![
                format!("TETHER_RUN_ID={}", meta.run_id),
                format!("TETHER_RUN_TOKEN={token}"),
            ];
        }
        let cgroups: Vec<RunCgroup> = cgroup.into_iter().collect();
        self.terminate_all(&mut members, &cgroups);
    }

    /// Terminate `members` plus every process of `cgroups` (grace, then KILL), remove the
    /// cgroups, and return how many processes there were.
    fn terminate_all(&mut self, members: &mut Members, cgroups: &[RunCgroup]) -> usize {
        let mut killed = 0;
        let mut pass = |members: &Members, this: &mut Self| {
            killed += members.list().len();
            let done = tree::terminate(members, this.grace, this.funnel);
            this.deferred.extend(done.events);
            if !done.survivors.is_empty() {
                output::warn(
                    "reaping",
                    &format!(
                        "processes of a dead run survived SIGKILL: {:?}",
                        done.survivors
                    ),
                );
            }
        };
        if cgroups.is_empty() {
            pass(members, self);
        }
        for cg in cgroups {
            members.cgroup = Some(cg.clone());
            pass(members, self);
            members.dead_run = None;
            members.env_markers.clear();
            if let Err(e) = cg.remove() {
                output::debug(
                    "reaping",
                    &format!("cannot remove {}: {e}", cg.path().display()),
                );
            }
        }
        killed
    }
}

fn finish_dir(dir: Option<RunDir>, remove: bool) {
    if let Some(d) = dir {
        if remove {
            let path = d.path();
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

/// The reaper's own environment without any `TETHER_*`, plus `TETHER_REASON=reaped`.
fn base_env() -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !k.to_string_lossy().starts_with("TETHER_"))
        .collect();
    env.push(("TETHER_REASON".into(), REAPED.into()));
    env
}

/// The dead run's environment for its teardown: ours, with its identity and `reaped`.
fn reap_env(dead: &DeadRun) -> Vec<(OsString, OsString)> {
    let mut env = base_env();
    env.push(("TETHER_APP".into(), dead.meta.app.clone().into()));
    env.push(("TETHER_RUN_ID".into(), dead.meta.run_id.clone().into()));
    env.push(("TETHER_RUN_DIR".into(), dead.meta.run_dir.clone().into()));
    if let Some(code) = dead.record.as_ref().and_then(|r| r.exit_code) {
        env.push(("TETHER_EXIT_CODE".into(), code.to_string().into()));
    }
    env
}

impl Reaper<'_> {
    fn unclean_records(&mut self, app: &Domain, own: Option<&str>) -> Vec<(String, RunRecord)> {
        let Some(runs) = self.runs.clone() else {
            return Vec::new();
        };
        let index = self.index.get_or_insert_with(|| index_unclean(&runs, own));
        index.get(app.as_str()).cloned().unwrap_or_default()
    }
}

/// Every run dir with an unclean record, by app. Odd entries are skipped (not a directory,
/// not tether's, no readable record), and so is the caller's own run dir (`own`: its run id
/// is its name): a run never reaps itself, and reading its record would only lengthen the
/// handoff (B2).
pub fn index_unclean(
    runs: &Dir,
    own: Option<&str>,
) -> std::collections::HashMap<String, Vec<(String, RunRecord)>> {
    let mut out: std::collections::HashMap<String, Vec<(String, RunRecord)>> =
        std::collections::HashMap::new();
    let Ok(entries) = runs.entries() else {
        return out;
    };
    for (name, _) in entries {
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') || Some(name) == own {
            continue;
        }
        let Ok(dir) = rundir::open_trusted(runs, name) else {
            continue;
        };
        match record::read_record(&dir) {
            Ok(rec) if rec.meta.state != State::Clean && rec.meta.run_id == name => {
                out.entry(rec.meta.app.clone())
                    .or_default()
                    .push((name.to_owned(), rec));
            }
            Ok(_) | Err(ReadError::Missing) | Err(ReadError::Refused(_)) => {}
        }
    }
    out
}
