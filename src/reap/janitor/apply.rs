//! The real sweep: each step of the plan applied under the locks it takes. A step's probe is
//! only a hint — a lock that turned busy since is a live run and left alone; a dir that is gone
//! was dealt with by an earlier step.

use super::plan::{past_retention, Step};
use super::report::{entry, skipped};
use super::Sweep;
use crate::config::duration;
use crate::ident::names::{Domain, RunId};
use crate::state::applock::{AppLocks, Attempt};
use crate::state::lock;
use crate::state::record::{self, State};
use crate::state::rundir;
use crate::sys::cgroup::Orphan;
use crate::sys::proc_locks;
use crate::sys::safe_fs::{Dir, ReadError};
use crate::sys::tree::{self, Members};
use std::time::Duration;

impl Sweep<'_, '_> {
    pub(super) fn apply(&mut self, step: Step) {
        match step {
            Step::Skip {
                kind,
                name,
                app,
                why,
            } => {
                self.report.push(skipped(kind, &name, app, why));
            }
            Step::Lock { name, app, .. } => self.lockfile(&name, &app),
            Step::RunDir { name, .. } => self.run_dir(&name),
            Step::Retired { name } => self.retired(&name),
            Step::Orphan(o) => self.orphan(o),
        }
    }

    fn lockfile(&mut self, name: &str, app: &Domain) {
        let Some(lock) = self.lock.clone() else {
            return;
        };
        let held = match AppLocks::flock(lock.clone()).try_acquire_existing(app) {
            Ok(Some(h)) => h,
            Ok(None) => return self.report_live(&lock, name, app),
            Err(err) => {
                let mut e = entry("lockfile", name, "skipped");
                e.app = Some(app.to_string());
                e.detail = Some(err.to_string());
                return self.report.push(e);
            }
        };
        let meta = held.meta();
        match self.reaper.reconcile(app, &held, None) {
            Ok(n) => {
                let mut e = entry("lockfile", name, if n > 0 { "reaped" } else { "removed" });
                e.app = Some(app.to_string());
                e.run_id = meta.as_ref().map(|m| m.run_id.clone());
                e.detail = Some(if n > 0 {
                    format!("reaped {n} dead run(s); lockfile removed")
                } else {
                    "unheld lockfile removed".into()
                });
                // Unlink while still holding: waiters on this inode re-open the path.
                if let Err(err) = held.unlink() {
                    e.detail = Some(format!("cannot remove lockfile: {err}"));
                }
                held.release();
                self.report.push(e);
            }
            Err(failed) => {
                if let Some(m) = &meta {
                    self.record_failure(&m.run_id);
                }
                held.release();
                let mut e = entry("lockfile", name, "failed");
                e.app = Some(app.to_string());
                e.detail = Some(match failed.run_id.as_deref() {
                    Some(id) => format!(
                        "{}; to give up on it: {}",
                        failed.message,
                        self.forget_hint(id)
                    ),
                    None => failed.message,
                });
                e.run_id = meta.map(|m| m.run_id);
                self.report.push(e);
            }
        }
    }

    fn report_live(&mut self, lock: &Dir, name: &str, app: &Domain) {
        let meta = AppLocks::flock(lock.clone()).holder_meta(app);
        let holder = lock.stat_at(name).ok().and_then(|st| {
            proc_locks::entries_for(&proc_locks::read(), st.st_dev, st.st_ino)
                .into_iter()
                .find(|e| !e.waiting)
                .map(|e| e.pid)
        });
        let mut e = entry("lockfile", name, "live");
        e.app = Some(app.to_string());
        e.run_id = meta.as_ref().map(|m| m.run_id.clone());
        e.pid = meta.as_ref().map(|m| m.pid).or(holder);
        // The kernel's holder is the truth; say so when the metadata names someone else (a
        // janitor mid-reap holds the lock under the dead run's metadata).
        let mismatch = match (&meta, holder) {
            (Some(m), Some(h)) if h != m.pid => Some(format!(
                "the lock is held by pid {h}, not by the recorded pid {}",
                m.pid
            )),
            _ => None,
        };
        if let Some(m) = &meta {
            let (deadline, grace, td) = self
                .record_of(&m.run_id)
                .map(|r| (r.deadline_ms, r.grace_ms, r.teardown_timeout_ms))
                .unwrap_or((3_600_000, 10_000, 300_000));
            let bound = Duration::from_millis(2 * (deadline + grace + td));
            let held_for = Duration::from_secs(record::unix_now().saturating_sub(m.started_at));
            if deadline > 0 && held_for > bound {
                e.detail = Some(format!(
                    "possible leaked run: held for {} (> 2 × (deadline + grace + teardown timeout) = {})",
                    duration::human(held_for),
                    duration::human(bound)
                ));
            }
        }
        if let Some(m) = mismatch {
            e.detail = Some(match e.detail.take() {
                Some(d) => format!("{d}; {m}"),
                None => m,
            });
        }
        self.report.push(e);
    }

    fn run_dir(&mut self, name: &str) {
        if self.reaper.has_reaped(name) {
            // Reaped with its app's lockfile above.
            return;
        }
        let Some(runs) = self.reaper.runs().cloned() else {
            return;
        };
        let Ok(dir) = rundir::open_trusted(&runs, name) else {
            return; // gone meanwhile (reaped above)
        };
        let held = match lock::try_acquire_existing(&dir, rundir::LOCK_FILE) {
            Ok(Some(h)) => h,
            Ok(None) => return, // live (or still being claimed): not ours
            Err(err) => {
                let mut e = entry("run-dir", name, "skipped");
                e.detail = Some(format!("run.lock: {err}"));
                return self.report.push(e);
            }
        };
        let run_dir = rundir::RunDir::adopt(runs.clone(), name.to_owned(), dir.clone(), held);
        // Re-read under its lock.
        match record::read_record(&dir) {
            Err(ReadError::Missing) => {
                let mut e = entry("run-dir", name, "removed");
                e.detail = Some("no run record (it never reached its app)".into());
                if let Err(err) = run_dir.remove() {
                    e.action = "failed";
                    e.detail = Some(format!("cannot remove: {err}"));
                }
                self.report.push(e);
            }
            Err(ReadError::Refused(why)) => self.reap_unreadable(run_dir, name, &why),
            Ok(r) if r.meta.state == State::Clean => self.settled(run_dir, &dir, name, &r),
            Ok(r) => {
                // Dead and unclean: reap it under its app's lock, never while someone holds it.
                run_dir.release();
                let Ok(app) = Domain::parse(&r.meta.app) else {
                    let mut e = entry("run-dir", name, "skipped");
                    e.detail = Some(format!("record names an invalid app {:?}", r.meta.app));
                    return self.report.push(e);
                };
                self.reap_app_of_run_dir(&app, name, &r.meta.run_id);
            }
        }
    }

    fn settled(&mut self, run_dir: rundir::RunDir, dir: &Dir, name: &str, r: &record::RunRecord) {
        if !past_retention(dir, r, self.opts.retain) {
            run_dir.release();
            return;
        }
        let reaped = r.reason.as_deref() == Some(crate::reap::reaper::REAPED);
        if !reaped && !r.keep {
            // Its run died after its teardown: what that teardown left running (in the run's
            // cgroup, carrying its token) goes with it.
            self.reaper.kill_leftovers(&r.meta);
        }
        let mut e = entry("run-dir", name, "removed");
        e.app = Some(r.meta.app.clone());
        e.run_id = Some(r.meta.run_id.clone());
        e.detail = Some(if reaped {
            "run dir of a reaped run".into()
        } else if r.keep {
            "clean run dir past its retention".into()
        } else {
            "run dir of a run that died after its teardown".into()
        });
        if let Err(err) = run_dir.remove() {
            e.action = "failed";
            e.detail = Some(format!("cannot remove: {err}"));
        }
        self.report.push(e);
    }

    fn reap_unreadable(&mut self, run_dir: rundir::RunDir, name: &str, why: &str) {
        let Ok(id) = RunId::parse(name) else {
            let mut e = entry("run-dir", name, "skipped");
            e.detail = Some(format!("{why}; and its name is not a run id"));
            run_dir.release();
            return self.report.push(e);
        };
        let mut e = entry("run-dir", name, "reaped");
        e.run_id = Some(name.to_owned());
        match self.reaper.reap_unreadable(run_dir, &id, why) {
            Ok(()) => {
                e.detail = Some(match &self.opts.teardown {
                    Some(_) => format!(
                        "unknown dead run ({why}): leftovers killed, the configured teardown ran"
                    ),
                    None => format!(
                        "unknown dead run ({why}): leftovers killed; no teardown ran (none \
                         configured: --teardown)"
                    ),
                });
            }
            Err(failed) => {
                e.action = "failed";
                e.detail = Some(format!(
                    "{}; to give up on it: {}",
                    failed.message,
                    self.forget_hint(name)
                ));
            }
        }
        self.report.push(e);
    }

    fn reap_app_of_run_dir(&mut self, app: &Domain, name: &str, run_id: &str) {
        let Some(lock) = self.lock_dir_to_reap(name) else {
            return;
        };
        let held = match AppLocks::flock(lock).try_acquire(app) {
            Ok(Attempt::Held(h)) => h,
            Ok(Attempt::Busy(_)) => {
                let mut e = entry("run-dir", name, "live");
                e.app = Some(app.to_string());
                e.run_id = Some(run_id.to_owned());
                e.detail = Some("its app is locked: left to the holder, who reconciles".into());
                return self.report.push(e);
            }
            Err(err) => {
                let mut e = entry("run-dir", name, "failed");
                e.detail = Some(format!("app lock: {err}"));
                return self.report.push(e);
            }
        };
        let result = self.reaper.reconcile(app, &held, None);
        let mut e = entry("run-dir", name, "reaped");
        e.app = Some(app.to_string());
        e.run_id = Some(run_id.to_owned());
        match result {
            Ok(n) => {
                e.detail = Some(format!("reaped {n} dead run(s) of its app"));
                // Leave no lockfile we created just for this reap.
                if held.meta().is_none_or(|m| m.state == State::Clean) {
                    let _ = held.unlink();
                }
            }
            Err(failed) => {
                e.action = "failed";
                let id = failed.run_id.clone().unwrap_or_else(|| run_id.to_owned());
                e.detail = Some(format!(
                    "{}; to give up on it: {}",
                    failed.message,
                    self.forget_hint(&id)
                ));
                self.record_failure(name);
            }
        }
        held.release();
        self.report.push(e);
    }

    /// The lock dir, made if a reboot wiped it (to lock the app of a dead run found in the
    /// runs dir).
    fn lock_dir_to_reap(&mut self, name: &str) -> Option<Dir> {
        if let Some(l) = &self.lock {
            return Some(l.clone());
        }
        match crate::state::dirs::choose("lock dir", &self.opts.lock_dir, 0o755)
            .and_then(|c| c.open())
        {
            Ok(s) => {
                self.lock = Some(s.dir.clone());
                Some(s.dir)
            }
            Err(err) => {
                let mut e = entry("run-dir", name, "failed");
                e.detail = Some(err.message);
                self.report.push(e);
                None
            }
        }
    }

    fn retired(&mut self, name: &str) {
        let Some(runs) = self.reaper.runs().cloned() else {
            return;
        };
        let mut e = entry("run-dir", name, "removed");
        e.detail = Some("retired run dir of a finished run".into());
        // Its run may still be deleting it (holding its run.lock): leave it then.
        let Ok(dir) = rundir::open_trusted(&runs, name) else {
            let mut e = entry("run-dir", name, "skipped");
            e.detail = Some("not tether's; not touched".into());
            return self.report.push(e);
        };
        let held = lock::try_acquire_existing(&dir, rundir::LOCK_FILE);
        if matches!(held, Ok(None)) && dir.stat_at(rundir::LOCK_FILE).is_ok() {
            return;
        }
        if let Err(err) = runs.remove_tree(name) {
            e.action = "failed";
            e.detail = Some(format!("cannot remove: {err}"));
        }
        self.report.push(e);
    }

    /// SPEC §4.4 / issue 14: a run cgroup whose core is dead and whose state is gone (wiped
    /// dirs, a deleted sandbox): everything in it is killed and it is removed.
    fn orphan(&mut self, o: Orphan) {
        if !o.cgroup.exists() {
            return; // reaped with its run above
        }
        let mut e = entry("cgroup", &o.name(), "removed");
        e.run_id = Some(o.run_id.clone());
        let members = Members {
            cgroup: Some(o.cgroup.clone()),
            ..Members::default()
        };
        let done = tree::terminate(&members, self.opts.grace, self.reaper.supervisor());
        e.detail = Some(format!(
            "cgroup of dead run {} (core pid {}): {} process(es) killed",
            o.run_id, o.core_pid, done.found
        ));
        if let Err(err) = o.cgroup.remove() {
            e.action = "failed";
            e.detail = Some(format!(
                "cannot remove {}: {err}",
                o.cgroup.path().display()
            ));
        }
        self.report.push(e);
    }
}
