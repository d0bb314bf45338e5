//! Reconcile (PROTOCOL §6): whoever holds an app lock first reaps every dead, unclean run of
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

pub(crate) mod cluster;
mod leftovers;

use crate::ident::names::{Domain, RunId};
use crate::output;
use crate::state::applock::AppLock;
use crate::state::lock;
use crate::state::record::{self, LockMeta, RunRecord, State};
use crate::state::rundir::{self, RunDir};
use crate::sys::cgroup::RunCgroup;
use crate::sys::safe_fs::{Dir, ReadError};
use crate::sys::supervisor::Supervisor;

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `reason` of a record a reaper settled: its run dir can go at once (no retention).
pub(crate) const REAPED: &str = "reaped";

/// A reaper's bounds and fallback.
#[derive(Debug, Clone)]
pub(crate) struct ReapPolicy {
    /// Used when a dead run has no readable record (and says so).
    pub(crate) fallback_teardown: Option<String>,
    pub(crate) teardown_timeout: Duration,
    /// SIGTERM→SIGKILL grace for a dead run's leftovers.
    pub(crate) grace: Duration,
}

/// Reaps dead runs for whoever holds their app lock (a run at step 5, the janitor). Funnel
/// events that arrive while it works stay queued in the supervisor; the caller acts on them
/// afterwards.
pub(crate) struct Reaper<'a> {
    sup: &'a mut Supervisor,
    /// The runs dir (open): the only place dead runs' dirs and records are looked for.
    runs: Option<Dir>,
    policy: ReapPolicy,
    /// Where a reap's teardown command runs: the reaping run's own cgroup, so that if the
    /// reaper dies mid-reap, whoever reaps *it* kills what that teardown left.
    cgroup: Option<RunCgroup>,
    /// Run ids reaped so far (never twice in one pass).
    reaped: HashSet<String>,
    /// The same ids in the order they were reaped (the janitor reports each once).
    reaped_log: Vec<String>,
    /// Unclean run records by app, read once per pass (a janitor reconciles thousands of
    /// apps; re-reading the runs dir for each would be quadratic). Every candidate is
    /// re-checked under its `run.lock` before anything is done to it, so staleness is safe.
    index: Option<std::collections::HashMap<String, Vec<(String, RunRecord)>>>,
    /// With a cluster: the app's rows in `tether.runs`, read under its cluster lock before the
    /// local reconcile (`cluster`): a run whose row says its teardown ran elsewhere gets none.
    rows: Option<Vec<crate::cluster::runs::Row>>,
}

/// A dead run found by a lock probe.
pub(crate) struct DeadRun {
    pub(crate) meta: LockMeta,
    pub(crate) record: Option<RunRecord>,
    /// Its run dir, when we hold its `run.lock` (then we may remove it).
    pub(crate) dir: Option<RunDir>,
    /// Where its record is settled once reaped (its run dir, held by us or not).
    pub(crate) record_dir: Option<Dir>,
    /// Remove the run dir after a successful reap (false when the caller reuses it).
    pub(crate) remove_dir: bool,
}

/// What reaping a dead run takes, decided from what is known of it (pure, unit-tested).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ReapPlan {
    /// The state it died in (the record's when there is one: it is written first).
    state: State,
    what: Reap,
    /// The teardown to run: the record's own, else (no readable record) the reaper's
    /// fallback; `None` runs none.
    teardown: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reap {
    /// Already clean: only its dir may be left to remove.
    Nothing,
    /// It never held its app (`queued`): its (empty) cgroup and its dir.
    DirOnly,
    /// Kill what it left, run its teardown, settle and remove it.
    Full,
}

impl ReapPlan {
    fn of(meta: &LockMeta, record: Option<&RunRecord>, fallback: Option<&str>) -> ReapPlan {
        let state = record.map(|r| r.meta.state).unwrap_or(meta.state);
        let what = match state {
            State::Clean => Reap::Nothing,
            State::Queued => Reap::DirOnly,
            State::Running | State::TearingDown => Reap::Full,
        };
        let teardown = match record {
            Some(r) => r.teardown.clone(),
            None => fallback.map(str::to_owned),
        };
        ReapPlan {
            state,
            what,
            teardown,
        }
    }
}

/// Failure to reap: the dead run stays for the next holder or the janitor.
#[derive(Debug)]
pub(crate) struct ReapFailed {
    pub(crate) message: String,
    /// The dead run's id, when known (for the `tether forget` hint).
    pub(crate) run_id: Option<String>,
}

impl ReapFailed {
    fn new(message: String, run_id: Option<&str>) -> ReapFailed {
        ReapFailed {
            message,
            run_id: run_id.map(str::to_owned),
        }
    }
}

impl<'a> Reaper<'a> {
    pub(crate) fn new(
        sup: &'a mut Supervisor,
        runs: Option<Dir>,
        policy: ReapPolicy,
        cgroup: Option<RunCgroup>,
    ) -> Reaper<'a> {
        Reaper {
            sup,
            runs,
            policy,
            cgroup,
            reaped: HashSet::new(),
            reaped_log: Vec::new(),
            index: None,
            rows: None,
        }
    }

    /// The supervisor the reaper waits with (the janitor asks whether to stop, and kills
    /// orphan cgroups with it).
    pub(crate) fn supervisor(&mut self) -> &mut Supervisor {
        self.sup
    }

    /// The runs dir it reaps in.
    pub(crate) fn runs(&self) -> Option<&Dir> {
        self.runs.as_ref()
    }

    /// Whether run `id` was reaped (or tried) in this pass.
    pub(crate) fn has_reaped(&self, id: &str) -> bool {
        self.reaped.contains(id)
    }

    /// The ids reaped (or tried) in this pass, in order; `reaped_log()[n..]` are those since
    /// the log was `n` long.
    pub(crate) fn reaped_log(&self) -> &[String] {
        &self.reaped_log
    }

    fn mark_reaped(&mut self, id: &str) {
        if self.reaped.insert(id.to_owned()) {
            self.reaped_log.push(id.to_owned());
        }
    }
}

/// The dead run an unheld app lock itself stands for, before any run dir is looked at.
#[derive(Debug, Clone)]
pub(crate) enum OwnDead {
    /// The run its metadata names (not clean, not the caller's own).
    Run(Box<LockMeta>),
    /// Unknown: its metadata is unreadable or not this app's (the reason).
    Unknown(&'static str),
}

impl OwnDead {
    /// Decided from the lockfile alone (pure: the janitor's plan asks it without the lock,
    /// `reconcile` under it). `own` is the caller's run id, never its own dead run.
    pub(crate) fn of(
        app: &Domain,
        meta: Option<LockMeta>,
        has_content: bool,
        own: Option<&str>,
    ) -> Option<OwnDead> {
        match meta {
            // Metadata of another app in this app's lockfile is not a record tether wrote.
            Some(m) if m.app != app.as_str() => {
                Some(OwnDead::Unknown("its lock metadata names another app"))
            }
            Some(m) if m.state != State::Clean && Some(m.run_id.as_str()) != own => {
                Some(OwnDead::Run(Box::new(m)))
            }
            Some(_) => None,
            None if has_content => Some(OwnDead::Unknown("its lock metadata is unreadable")),
            None => None,
        }
    }
}

impl Reaper<'_> {
    /// Reconcile `app`, whose lock the caller holds. `own` is the run id of the caller (a run
    /// reusing a dead run's id reaps that one itself, through `reap`).
    pub(crate) fn reconcile(
        &mut self,
        app: &Domain,
        app_lock: &AppLock,
        own: Option<&str>,
    ) -> Result<usize, ReapFailed> {
        let mut count = 0;
        match OwnDead::of(app, app_lock.meta(), app_lock.has_content(), own) {
            Some(OwnDead::Unknown(why)) => {
                self.reap_unknown(app, why)?;
                count += 1;
                mark_meta_clean(app_lock);
            }
            Some(OwnDead::Run(meta)) => {
                // Already reaped in this pass (e.g. through its run dir when its id was reused):
                // only the stale metadata is left to mark.
                if !self.reaped.contains(&meta.run_id) {
                    let dead = self.dead_from_meta(*meta);
                    self.reap(dead)?;
                    count += 1;
                }
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
    pub(crate) fn reap(&mut self, dead: DeadRun) -> Result<(), ReapFailed> {
        let id = dead.meta.run_id.clone();
        let app = dead.meta.app.clone();
        self.mark_reaped(&id);
        let plan = ReapPlan::of(
            &dead.meta,
            dead.record.as_ref(),
            self.policy.fallback_teardown.as_deref(),
        );
        let state = plan.state;
        if plan.what == Reap::Nothing {
            // Its record says `clean` but it is dead and named by the lock metadata: it died
            // after its teardown command, while killing what that left running (or before the
            // metadata said so). No teardown again, but what carries its marks is killed before
            // its dir goes, as the janitor does for such a run dir (D91): once the dir is gone
            // nothing could find them any more.
            self.kill_leftovers(&dead.meta);
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
        if plan.what == Reap::DirOnly {
            // It never held the app lock, so it never touched the app: only its (empty)
            // cgroup and its run dir are left.
            if let Ok(cg) = dead.meta.run_cgroup() {
                let _ = cg.remove();
            }
            finish_dir(dead.dir, dead.remove_dir);
            return Ok(());
        }
        self.kill_leftovers(&dead.meta);
        // Its teardown already ran on another host (its cluster row `reaped`, or `cleaned`
        // once its leftovers were killed here): none here (PROTOCOL §17).
        let elsewhere = matches!(
            self.row_state(&id),
            Some(crate::cluster::runs::REAPED | crate::cluster::runs::CLEANED)
        );
        if elsewhere {
            output::info(
                "reaping",
                &format!("dead run {id} was reaped on another host: no teardown here"),
            );
        }
        if dead.record.is_none() && !elsewhere {
            self.say_no_record(&format!("dead run {id}"));
        }
        let script = plan.teardown.filter(|_| !elsewhere);
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

fn mark_meta_clean(app_lock: &AppLock) {
    if let Some(mut meta) = app_lock.meta() {
        meta.state = State::Clean;
        let _ = app_lock.write_meta(&meta);
    } else {
        let _ = app_lock.clear_meta();
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
    if let Some(fence) = dead.record.as_ref().and_then(|r| r.fence) {
        env.push(("TETHER_FENCE".into(), fence.to_string().into()));
    }
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
pub(crate) fn index_unclean(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::record::samples;

    fn meta(state: State) -> LockMeta {
        samples::meta("a.example.org", "r", state)
    }

    fn record(state: State, teardown: Option<&str>) -> RunRecord {
        RunRecord {
            teardown: teardown.map(str::to_owned),
            ..samples::record(meta(state))
        }
    }

    #[test]
    fn the_record_decides_over_the_lock_metadata() {
        // The record is written before the metadata: a clean record beats running metadata.
        let p = ReapPlan::of(
            &meta(State::Running),
            Some(&record(State::Clean, Some("td"))),
            None,
        );
        assert_eq!(p.what, Reap::Nothing);
        let p = ReapPlan::of(
            &meta(State::Clean),
            Some(&record(State::TearingDown, Some("td"))),
            None,
        );
        assert_eq!((p.what, p.teardown.as_deref()), (Reap::Full, Some("td")));
    }

    #[test]
    fn a_queued_run_never_touched_its_app() {
        let p = ReapPlan::of(&meta(State::Queued), None, Some("fallback"));
        assert_eq!(p.what, Reap::DirOnly);
    }

    #[test]
    fn the_fallback_teardown_is_only_for_a_run_without_a_record() {
        // A record without a teardown runs none, whatever the reaper's fallback.
        let p = ReapPlan::of(
            &meta(State::Running),
            Some(&record(State::Running, None)),
            Some("fb"),
        );
        assert_eq!((p.what, p.teardown), (Reap::Full, None));
        let p = ReapPlan::of(&meta(State::Running), None, Some("fb"));
        assert_eq!((p.what, p.teardown.as_deref()), (Reap::Full, Some("fb")));
        let p = ReapPlan::of(&meta(State::TearingDown), None, None);
        assert_eq!((p.what, p.teardown), (Reap::Full, None));
    }
}
