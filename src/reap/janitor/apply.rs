//! The real sweep: each step of the plan applied under the locks it takes. The plan's probe is
//! only a hint — a lock that turned busy since is a live run and left alone; a dir that is gone
//! was dealt with by an earlier step — and what is re-read under a lock is decided again by the
//! plan's own functions (decide.rs), so the sweep reports the verbs the dry run printed.

use super::decide::{self, Gone, RunDirAction};
use super::plan::{self, Step};
use super::report::{entry, Entry};
use super::Sweep;
use crate::ident::names::{Domain, RunId};
use crate::reap::reaper::OwnDead;
use crate::state::applock::Attempt;
use crate::state::lock;
use crate::state::record::{self, State};
use crate::state::rundir;
use crate::sys::cgroup::Orphan;
use crate::sys::proc_locks;
use crate::sys::safe_fs::Dir;
use crate::sys::tree::{self, Members};

impl Sweep<'_, '_> {
    pub(super) fn apply(&mut self, step: Step) {
        let planned = step.entry();
        match step {
            Step::Skip { .. } => self.report.push(planned),
            Step::Lock { name, app, .. } => self.lockfile(&name, &app),
            Step::RunDir { name, .. } => self.run_dir(&name, planned),
            Step::Retired { name } => self.retired(&name, planned),
            Step::Orphan(o) => self.orphan(o, planned),
        }
    }

    /// Runs a reconcile reaped (the log since `mark`) besides those in `except`: each is
    /// reported with its own run dir's step, where the sweep gets to it.
    fn defer_reaped(&mut self, mark: usize, app: &Domain, except: &[Option<String>]) {
        let ids: Vec<String> = self
            .reaper
            .reaped_log()
            .get(mark..)
            .unwrap_or_default()
            .iter()
            .filter(|id| !except.iter().flatten().any(|x| x == *id))
            .cloned()
            .collect();
        for id in ids {
            self.pending.insert(id, app.to_string());
        }
    }

    /// Runs reaped with an app's lock whose run dirs were no step of the plan (held when it
    /// was made): reported at the end, so every reap has its entry.
    pub(super) fn report_pending(&mut self) {
        let mut pending: Vec<(String, String)> =
            std::mem::take(&mut self.pending).into_iter().collect();
        pending.sort();
        for (id, app) in pending {
            let mut e = entry("run-dir", &id, "reaped");
            e.app = Some(app);
            e.run_id = Some(id.clone());
            e.detail = Some("dead unclean run, reaped under its app's lock".into());
            self.report.push(e);
        }
    }

    fn lockfile(&mut self, name: &str, app: &Domain) {
        let Some(lock) = self.lock.clone() else {
            return;
        };
        let mut held = match self.app_locks(lock.clone()).try_acquire_existing(app) {
            Ok(Some(h)) => h,
            Ok(None) => return self.report_live(&lock, name, app),
            Err(err) => {
                let mut e = entry("lockfile", name, "skipped");
                e.app = Some(app.to_string());
                e.detail = Some(err.to_string());
                return self.report.push(e);
            }
        };
        // Decided again from what is read under the lock, by the plan's own rule.
        let meta = held.meta();
        let own = OwnDead::of(app, meta.clone(), held.has_content(), None);
        let mut e = decide::unheld_lock(name, app, meta.as_ref(), own.as_ref());
        let own_id = match &own {
            Some(OwnDead::Run(m)) => Some(m.run_id.clone()),
            _ => None,
        };
        let mark = self.reaper.reaped_log().len();
        self.rows_before(&mut held, app);
        let result = self.reaper.reconcile(app, &held, None);
        self.rows_after(&mut held, mark);
        let failed_id = result.as_ref().err().and_then(|f| f.run_id.clone());
        self.defer_reaped(mark, app, &[own_id, failed_id]);
        match result {
            Ok(_) => {
                // Unlink while still holding: waiters on this inode re-open the path.
                if let Err(err) = held.unlink() {
                    e.detail = Some(format!("cannot remove lockfile: {err}"));
                }
                held.release();
            }
            Err(failed) => {
                if let Some(m) = &meta {
                    self.record_failure(&m.run_id);
                }
                held.release();
                e.action = "failed";
                e.detail = Some(match failed.run_id.as_deref() {
                    Some(id) => format!(
                        "{}; to give up on it: {}",
                        failed.message,
                        self.forget_hint(id)
                    ),
                    None => failed.message,
                });
            }
        }
        self.report.push(e);
    }

    fn report_live(&mut self, lock: &Dir, name: &str, app: &Domain) {
        let meta = self.app_locks(lock.clone()).holder_meta(app);
        let holder = lock.stat_at(name).ok().and_then(|st| {
            proc_locks::entries_for(&proc_locks::read(), st.st_dev, st.st_ino)
                .into_iter()
                .find(|e| !e.waiting)
                .map(|e| e.pid)
        });
        let rec = meta
            .as_ref()
            .and_then(|m| plan::record_of(self.reaper.runs(), &m.run_id));
        let e = decide::live(
            name,
            app,
            meta.as_ref(),
            holder,
            rec.as_ref(),
            record::unix_now(),
        );
        self.report.push(e);
    }

    fn run_dir(&mut self, name: &str, planned: Entry) {
        if self.reaper.has_reaped(name) {
            // Reaped with its app's lock above: its entry is here, unless that step had it.
            if let Some(app) = self.pending.remove(name) {
                let mut e = planned;
                e.action = "reaped";
                e.app = Some(app);
                e.detail = Some("dead unclean run, reaped under its app's lock".into());
                self.report.push(e);
            }
            return;
        }
        let Some(runs) = self.reaper.runs().cloned() else {
            return;
        };
        let Ok(dir) = rundir::open_trusted(&runs, name) else {
            return; // gone meanwhile
        };
        let held = match lock::try_acquire_existing(&dir, rundir::LOCK_FILE) {
            Ok(Some(h)) => h,
            Ok(None) => return, // live (or being claimed) since the plan: not ours
            Err(err) => {
                let mut e = entry("run-dir", name, "skipped");
                e.detail = Some(format!("run.lock: {err}"));
                return self.report.push(e);
            }
        };
        let run_dir = rundir::RunDir::adopt(runs.clone(), name.to_owned(), dir.clone(), held);
        // Decided again under its lock, by the plan's own rule.
        let record = record::read_record(&dir);
        let action = RunDirAction::of(name, &record, plan::record_age(&dir), self.opts.retain);
        let record = record.ok();
        let mut e = action.entry(name, record.as_ref());
        match action {
            RunDirAction::Skip(_) | RunDirAction::Keep { .. } => run_dir.release(),
            RunDirAction::RemoveUnrecorded | RunDirAction::Remove(_) => {
                if let (RunDirAction::Remove(Gone::DiedAfterTeardown), Some(r)) = (&action, &record)
                {
                    self.reaper.kill_leftovers(&r.meta);
                }
                if let Err(err) = run_dir.remove() {
                    e.action = "failed";
                    e.detail = Some(format!("cannot remove: {err}"));
                }
            }
            RunDirAction::ReapUnreadable { id, why } => {
                self.reap_unreadable(run_dir, &id, &why, &mut e)
            }
            RunDirAction::ReapUnclean { app } => {
                // Reaped under its app's lock, never while someone holds it.
                run_dir.release();
                self.reap_app_of_run_dir(&app, name, &mut e);
            }
        }
        self.report.push(e);
    }

    fn reap_unreadable(&mut self, run_dir: rundir::RunDir, id: &RunId, why: &str, e: &mut Entry) {
        match self.reaper.reap_unreadable(run_dir, id, why) {
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
                    self.forget_hint(id.as_str())
                ));
            }
        }
    }

    fn reap_app_of_run_dir(&mut self, app: &Domain, name: &str, e: &mut Entry) {
        let Some(lock) = self.lock_dir_to_reap(e) else {
            return;
        };
        let mut held = match self.app_locks(lock).try_acquire(app) {
            Ok(Attempt::Held(h)) => h,
            Ok(Attempt::Busy(_)) => {
                e.action = "live";
                e.detail = Some("its app is locked: left to the holder, who reconciles".into());
                return;
            }
            Err(err) => {
                e.action = "failed";
                e.detail = Some(format!("app lock: {err}"));
                return;
            }
        };
        let mark = self.reaper.reaped_log().len();
        self.rows_before(&mut held, app);
        let result = self.reaper.reconcile(app, &held, None);
        self.rows_after(&mut held, mark);
        let failed_id = result.as_ref().err().and_then(|f| f.run_id.clone());
        self.defer_reaped(mark, app, &[Some(name.to_owned()), failed_id]);
        match result {
            Ok(_) => {
                // Leave no lockfile we created just for this reap.
                if held.meta().is_none_or(|m| m.state == State::Clean) {
                    let _ = held.unlink();
                }
                if !self.reaper.has_reaped(name) {
                    // Its record turned unclean after this sweep read the runs dir.
                    e.action = "skipped";
                    e.detail =
                        Some("not among its app's dead runs yet: left to the next sweep".into());
                }
            }
            Err(failed) => {
                e.action = "failed";
                let id = failed.run_id.clone().unwrap_or_else(|| name.to_owned());
                e.detail = Some(format!(
                    "{}; to give up on it: {}",
                    failed.message,
                    self.forget_hint(&id)
                ));
                self.record_failure(&id);
            }
        }
        held.release();
    }

    /// The lock dir, made if a reboot wiped it (to lock the app of a dead run found in the
    /// runs dir); on failure `e` says so.
    fn lock_dir_to_reap(&mut self, e: &mut Entry) -> Option<Dir> {
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
                e.action = "failed";
                e.detail = Some(err.message);
                None
            }
        }
    }

    fn retired(&mut self, name: &str, mut e: Entry) {
        let Some(runs) = self.reaper.runs().cloned() else {
            return;
        };
        let Ok(dir) = rundir::open_trusted(&runs, name) else {
            return; // gone meanwhile
        };
        // Its run may still be deleting it (holding its run.lock): leave it then.
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

    /// PROTOCOL §6 / issue 14: a run cgroup whose core is dead and whose state is gone (wiped
    /// dirs, a deleted sandbox): everything in it is killed and it is removed.
    fn orphan(&mut self, o: Orphan, mut e: Entry) {
        if !o.cgroup.exists() {
            return; // gone meanwhile
        }
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
