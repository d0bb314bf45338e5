//! `tether janitor` (SPEC §8): sweep the lock dir and the runs dir, reap what dead runs left,
//! and never touch a live run.
//!
//! Life and death come from lock probes only. A held app lock is a live run: it is reported
//! (with a warning when it has been held longer than its own bounds allow) and left alone. An
//! unheld one is taken, identity-checked, reconciled (SPEC §4.4) and then unlinked *while still
//! held*, so a waiter blocked on it wakes up on an orphaned inode, fails its identity check
//! and re-opens the path (PROTOCOL.md). Run dirs whose `run.lock` is free are reaped under
//! their app's lock; this is what finds dead runs after a reboot wiped `/run/lock`.
//! Two janitors at once are safe: the lock decides which one reaps.
//!
//! `--dry-run` takes no lock at all: it reads the kernel's lock table instead, so it cannot
//! make a starting run see a busy lock.

use crate::config::duration;
use crate::config::places::Place;
use crate::error::{Error, Result};
use crate::ident::names::{Domain, RunId};
use crate::output;
use crate::reap::reaper::{ReapPolicy, Reaper};
use crate::state::applock::{AppLocks, Attempt};
use crate::state::dirs;
use crate::state::lock;
use crate::state::record::{self, State};
use crate::state::rundir;
use crate::sys::proc_locks;
use crate::sys::safe_fs::{kind, Dir, Kind, ReadError};
use crate::sys::supervisor::Supervisor;
use crate::sys::tree::{self, Members};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;

pub struct Options {
    pub lock_dir: Place,
    pub runs_dir: Place,
    pub teardown: Option<String>,
    pub teardown_timeout: Duration,
    pub grace: Duration,
    pub app: Option<Domain>,
    pub dry_run: bool,
    pub retain: Duration,
    /// Orphan run cgroups younger than this are left alone (`--orphan-age`).
    pub orphan_age: Duration,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Entry {
    /// `lockfile`, `run-dir` or `cgroup`.
    pub kind: &'static str,
    /// File or directory name inside its dir.
    pub name: String,
    /// live | reaped | removed | skipped | failed | kept | would-reap | would-remove
    pub action: &'static str,
    pub app: Option<String>,
    pub run_id: Option<String>,
    pub pid: Option<i32>,
    pub detail: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub dry_run: bool,
    pub entries: Vec<Entry>,
    pub live: usize,
    pub reaped: usize,
    pub removed: usize,
    pub skipped: usize,
    pub failed: usize,
}

impl Report {
    fn push(&mut self, e: Entry) {
        match e.action {
            "live" | "kept" => self.live += usize::from(e.action == "live"),
            "reaped" | "would-reap" => self.reaped += 1,
            "removed" | "would-remove" => self.removed += 1,
            "skipped" => self.skipped += 1,
            "failed" => self.failed += 1,
            _ => {}
        }
        self.entries.push(e);
    }
}

fn entry(kind: &'static str, name: &str, action: &'static str) -> Entry {
    Entry {
        kind,
        name: name.to_owned(),
        action,
        app: None,
        run_id: None,
        pid: None,
        detail: None,
    }
}

/// Sweep both dirs, then tether's cgroups. `Err` only for unsafe dirs or a funnel that
/// cannot be set up.
pub fn sweep(opts: &Options) -> Result<Report> {
    let lock = dirs::choose("lock dir", &opts.lock_dir, 0o755)?.existing();
    let runs = dirs::choose("runs dir", &opts.runs_dir, 0o700)?.existing();
    let mut sup = Supervisor::standalone()
        .map_err(|e| Error::tether(format!("cannot set up signal handling: {e}")))?;
    let mut report = Report {
        dry_run: opts.dry_run,
        ..Report::default()
    };
    let mut sweep = Sweep {
        opts,
        lock: lock.map(|s| s.dir),
        runs_path: runs.as_ref().map(|s| s.dir.path().to_owned()),
        reaper: Reaper::new(
            &mut sup,
            runs.map(|s| s.dir),
            ReapPolicy {
                fallback_teardown: opts.teardown.clone(),
                teardown_timeout: opts.teardown_timeout,
                grace: opts.grace,
            },
            None,
        ),
        report: &mut report,
    };
    sweep.locks();
    sweep.run_dirs();
    sweep.cgroups();
    if sweep.stop_requested() {
        output::warn(
            "janitor",
            "signal received — stopped after the current reap",
        );
    }
    Ok(report)
}

/// One sweep's state: the dirs, the reaper, the report.
struct Sweep<'o, 'f> {
    opts: &'o Options,
    lock: Option<Dir>,
    runs_path: Option<PathBuf>,
    reaper: Reaper<'f>,
    report: &'o mut Report,
}

fn say(e: &Entry) {
    let subject = e.app.clone().unwrap_or_else(|| e.name.clone());
    let mut msg = match (e.action, &e.run_id, e.pid) {
        ("live", Some(id), Some(pid)) => {
            format!("{subject}: live run {id} (pid {pid}), leaving it")
        }
        ("live", _, pid) => format!(
            "{subject}: live run unknown (pid {}), leaving it",
            pid.map(|p| p.to_string())
                .unwrap_or_else(|| "unknown".into())
        ),
        (action, _, _) => format!("{subject}: {action}"),
    };
    if let Some(d) = &e.detail {
        msg.push_str(&format!(" — {d}"));
    }
    let level = match e.action {
        "failed" => output::Level::Error,
        "skipped" => output::Level::Warn,
        _ => output::Level::Info,
    };
    output::emit(level, e.action, &msg, &[]);
}

impl Sweep<'_, '_> {
    fn stop_requested(&mut self) -> bool {
        self.reaper.supervisor().stop_requested()
    }

    fn push(&mut self, e: Entry) {
        say(&e);
        self.report.push(e);
    }

    /// `tether forget …` for a run whose reap keeps failing (the exact command, dirs included
    /// when they are not the defaults).
    fn forget_hint(&self, run_id: &str) -> String {
        crate::reap::forget::hint(
            self.lock.as_ref().map(|d| d.path()),
            self.runs_path.as_deref(),
            run_id,
        )
    }

    fn locks(&mut self) {
        let Some(lock) = self.lock.clone() else {
            return;
        };
        let table = proc_locks::read();
        for (name, _) in lock.entries().unwrap_or_default() {
            if self.stop_requested() {
                return;
            }
            let name = name.to_string_lossy().into_owned();
            let Some(domain_text) = name
                .strip_prefix("app-")
                .and_then(|n| n.strip_suffix(".lock"))
            else {
                if !name.starts_with("slot-") {
                    let mut e = entry("lockfile", &name, "skipped");
                    e.detail = Some("not an app lockfile name".into());
                    self.push(e);
                }
                continue;
            };
            let domain = match Domain::parse(domain_text) {
                Ok(d) if d.as_str() == domain_text => d,
                _ => {
                    let mut e = entry("lockfile", &name, "skipped");
                    e.detail = Some("name is not a valid app domain".into());
                    self.push(e);
                    continue;
                }
            };
            if self.opts.app.as_ref().is_some_and(|a| *a != domain) {
                continue;
            }
            let mut e = entry("lockfile", &name, "skipped");
            e.app = Some(domain.to_string());
            match lock.stat_at(&name) {
                Ok(st) if kind(&st) == Kind::File => {}
                Ok(st) => {
                    e.detail = Some(match kind(&st) {
                        Kind::Symlink => "is a symlink".into(),
                        Kind::Dir => "is a directory".into(),
                        _ => "is not a regular file".into(),
                    });
                    self.push(e);
                    continue;
                }
                Err(err) => {
                    e.detail = Some(format!("cannot inspect: {err}"));
                    self.push(e);
                    continue;
                }
            }
            if self.opts.dry_run {
                if let Some(id) = self.dry_run_lock(&lock, &name, &domain, &table) {
                    self.reaper.note_reaped(id);
                }
                continue;
            }
            let held = match AppLocks::flock(lock.clone()).try_acquire_existing(&domain) {
                Ok(Some(h)) => h,
                Ok(None) => {
                    self.report_live(&lock, &name, &domain);
                    continue;
                }
                Err(err) => {
                    e.detail = Some(err.to_string());
                    self.push(e);
                    continue;
                }
            };
            let meta = held.meta();
            match self.reaper.reconcile(&domain, &held, None) {
                Ok(n) => {
                    let mut e = entry("lockfile", &name, if n > 0 { "reaped" } else { "removed" });
                    e.app = Some(domain.to_string());
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
                    self.push(e);
                }
                Err(failed) => {
                    if let Some(m) = &meta {
                        self.record_failure(&m.run_id);
                    }
                    held.release();
                    let mut e = entry("lockfile", &name, "failed");
                    e.app = Some(domain.to_string());
                    e.detail = Some(match failed.run_id.as_deref() {
                        Some(id) => format!(
                            "{}; to give up on it: {}",
                            failed.message,
                            self.forget_hint(id)
                        ),
                        None => failed.message,
                    });
                    e.run_id = meta.map(|m| m.run_id);
                    self.push(e);
                }
            }
        }
    }

    /// The record of run `id` in our runs dir, if it is there and readable.
    fn record_of(&self, id: &str) -> Option<record::RunRecord> {
        let runs = self.reaper.runs()?;
        let dir = rundir::open_trusted(runs, id).ok()?;
        record::read_record(&dir).ok()
    }

    fn report_live(&mut self, lock: &Dir, name: &str, domain: &Domain) {
        let meta = lock::open_existing(lock, name)
            .ok()
            .and_then(|f| record::read_meta(&f));
        let holder = lock.stat_at(name).ok().and_then(|st| {
            proc_locks::entries_for(&proc_locks::read(), st.st_dev, st.st_ino)
                .into_iter()
                .find(|e| !e.waiting)
                .map(|e| e.pid)
        });
        let mut e = entry("lockfile", name, "live");
        e.app = Some(domain.to_string());
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
        self.push(e);
    }

    fn dry_run_lock(
        &mut self,
        lock: &Dir,
        name: &str,
        domain: &Domain,
        table: &[proc_locks::LockEntry],
    ) -> Option<String> {
        let st = lock.stat_at(name).ok()?;
        let entries = proc_locks::entries_for(table, st.st_dev, st.st_ino);
        let holder = entries.iter().find(|e| !e.waiting).map(|e| e.pid);
        let meta = lock::open_existing(lock, name)
            .ok()
            .and_then(|f| record::read_meta(&f));
        let mut e = match holder {
            Some(pid) => {
                let mut e = entry("lockfile", name, "live");
                e.pid = meta.as_ref().map(|m| m.pid).or(Some(pid));
                e
            }
            None => match &meta {
                Some(m) if m.state != State::Clean => {
                    let mut e = entry("lockfile", name, "would-reap");
                    e.detail = Some(format!(
                        "would reap dead run {} and remove the lockfile",
                        m.run_id
                    ));
                    e
                }
                _ if st.st_size > 0 && meta.is_none() => {
                    let mut e = entry("lockfile", name, "would-reap");
                    e.detail = Some("would reap an unknown dead run (unreadable metadata)".into());
                    e
                }
                _ => {
                    let mut e = entry("lockfile", name, "would-remove");
                    e.detail = Some("would remove the unheld lockfile".into());
                    e
                }
            },
        };
        e.app = Some(domain.to_string());
        e.run_id = meta.map(|m| m.run_id);
        let would_reap = (e.action == "would-reap")
            .then(|| e.run_id.clone())
            .flatten();
        self.push(e);
        would_reap
    }

    fn run_dirs(&mut self) {
        let Some(runs) = self.reaper.runs().cloned() else {
            return;
        };
        let table = if self.opts.dry_run {
            proc_locks::read()
        } else {
            Vec::new()
        };
        for (name, _) in runs.entries().unwrap_or_default() {
            if self.stop_requested() {
                return;
            }
            let name = name.to_string_lossy().into_owned();
            if name.starts_with('.') && !name.starts_with(rundir::RETIRED_PREFIX) {
                // tether's own files (`.forgotten.jsonl`): no run id starts with a dot.
                continue;
            }
            let mut e = entry("run-dir", &name, "skipped");
            match runs.stat_at(&name) {
                Ok(st) if kind(&st) == Kind::Dir => {}
                Ok(_) => {
                    e.detail = Some("not a directory".into());
                    self.push(e);
                    continue;
                }
                Err(err) => {
                    e.detail = Some(format!("cannot inspect: {err}"));
                    self.push(e);
                    continue;
                }
            }
            if name.starts_with(rundir::RETIRED_PREFIX) {
                // A run dir whose run tore down cleanly and crashed before deleting it: its
                // record is stale by design (never reaped again), so only the files go.
                self.remove_retired(&runs, &name);
                continue;
            }
            if self.reaper.has_reaped(&name) {
                if self.opts.dry_run {
                    // Listed, but counted once: it is the dead run of a lockfile above.
                    let mut e = entry("run-dir", &name, "would-reap");
                    e.run_id = Some(name.clone());
                    e.detail = Some("the dead run named by its app lockfile above".into());
                    say(&e);
                    self.report.entries.push(e);
                }
                continue;
            }
            let dir = match rundir::open_trusted(&runs, &name) {
                Ok(d) => d,
                Err(err) => {
                    // Not tether's: never acted on, whatever its record says.
                    e.detail = Some(format!("{err}; not touched"));
                    self.push(e);
                    continue;
                }
            };
            let rec = record::read_record(&dir);
            if let Some(app) = &self.opts.app {
                if !matches!(&rec, Ok(r) if r.meta.app == app.as_str()) {
                    continue;
                }
            }
            if self.opts.dry_run {
                self.dry_run_dir(&dir, &name, &rec, &table);
                continue;
            }
            let held = match lock::try_acquire_existing(&dir, rundir::LOCK_FILE) {
                Ok(Some(h)) => h,
                Ok(None) => continue, // live (or still being claimed): not ours
                Err(err) => {
                    e.detail = Some(format!("run.lock: {err}"));
                    self.push(e);
                    continue;
                }
            };
            let run_dir = rundir::RunDir::adopt(runs.clone(), name.clone(), dir.clone(), held);
            // Re-read under its lock.
            match record::read_record(&dir) {
                Err(ReadError::Missing) => {
                    let mut e = entry("run-dir", &name, "removed");
                    e.detail = Some("no run record (it never reached its app)".into());
                    if let Err(err) = run_dir.remove() {
                        e.action = "failed";
                        e.detail = Some(format!("cannot remove: {err}"));
                    }
                    self.push(e);
                }
                Err(ReadError::Refused(why)) => self.reap_unreadable(run_dir, &name, &why),
                Ok(r) if r.meta.state == State::Clean => self.settled(run_dir, &dir, &name, &r),
                Ok(r) => {
                    // Dead and unclean: reap it under its app's lock, never while someone holds it.
                    run_dir.release();
                    let Ok(app) = Domain::parse(&r.meta.app) else {
                        let mut e = entry("run-dir", &name, "skipped");
                        e.detail = Some(format!("record names an invalid app {:?}", r.meta.app));
                        self.push(e);
                        continue;
                    };
                    self.reap_app_of_run_dir(&app, &name, &r.meta.run_id);
                }
            }
        }
    }

    fn dry_run_dir(
        &mut self,
        dir: &Dir,
        name: &str,
        rec: &std::result::Result<record::RunRecord, ReadError>,
        table: &[proc_locks::LockEntry],
    ) {
        let held = dir.stat_at(rundir::LOCK_FILE).ok().is_some_and(|st| {
            proc_locks::entries_for(table, st.st_dev, st.st_ino)
                .iter()
                .any(|x| !x.waiting)
        });
        if held {
            return;
        }
        let (action, detail) = match rec {
            Ok(r) if r.meta.state == State::Clean => {
                if self.past_retention(dir, r) {
                    ("would-remove", "clean run dir: nothing left to do".to_string())
                } else {
                    return;
                }
            }
            Ok(_) => (
                "would-reap",
                "dead unclean run: would reap it under its app lock".to_string(),
            ),
            Err(ReadError::Missing) => (
                "would-remove",
                "no run record (it never reached its app)".to_string(),
            ),
            Err(ReadError::Refused(why)) => (
                "would-reap",
                format!("unknown dead run ({why}): would kill what carries its id and run the fallback teardown"),
            ),
        };
        let mut e = entry("run-dir", name, action);
        e.app = rec.as_ref().ok().map(|r| r.meta.app.clone());
        e.run_id = rec.as_ref().ok().map(|r| r.meta.run_id.clone());
        e.detail = Some(detail);
        self.push(e);
    }

    /// A clean record whose dir is still there: kept on purpose (`--keep-run-dir`) until its
    /// retention passes; otherwise (reaped, or its run died after its teardown) it goes now.
    fn past_retention(&self, dir: &Dir, r: &record::RunRecord) -> bool {
        let reaped = r.reason.as_deref() == Some(crate::reap::reaper::REAPED);
        if reaped || !r.keep {
            return true;
        }
        let age = dir
            .stat_at(rundir::RECORD_FILE)
            .ok()
            .map(|st| {
                let now = record::unix_now() as i64;
                Duration::from_secs(now.saturating_sub(st.st_mtime).max(0) as u64)
            })
            .unwrap_or_default();
        age >= self.opts.retain
    }

    fn settled(&mut self, run_dir: rundir::RunDir, dir: &Dir, name: &str, r: &record::RunRecord) {
        if !self.past_retention(dir, r) {
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
        e.detail = Some(
            if r.reason.as_deref() == Some(crate::reap::reaper::REAPED) {
                "run dir of a reaped run".into()
            } else if r.keep {
                "clean run dir past its retention".into()
            } else {
                "run dir of a run that died after its teardown".into()
            },
        );
        if let Err(err) = run_dir.remove() {
            e.action = "failed";
            e.detail = Some(format!("cannot remove: {err}"));
        }
        self.push(e);
    }

    fn reap_unreadable(&mut self, run_dir: rundir::RunDir, name: &str, why: &str) {
        let Ok(id) = RunId::parse(name) else {
            let mut e = entry("run-dir", name, "skipped");
            e.detail = Some(format!("{why}; and its name is not a run id"));
            run_dir.release();
            self.push(e);
            return;
        };
        let mut e = entry("run-dir", name, "reaped");
        e.run_id = Some(name.to_owned());
        match self.reaper.reap_unreadable(run_dir, &id, why) {
            Ok(()) => {
                e.detail = Some(match &self.opts.teardown {
                    Some(_) => format!("unknown dead run ({why}): leftovers killed, the configured teardown ran"),
                    None => format!("unknown dead run ({why}): leftovers killed; no teardown ran (none configured: --teardown)"),
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
        self.push(e);
    }

    fn reap_app_of_run_dir(&mut self, app: &Domain, name: &str, run_id: &str) {
        let lock = match &self.lock {
            Some(l) => l.clone(),
            // The lock dir is gone (a reboot wiped /run/lock): make it, to lock the app.
            None => {
                match dirs::choose("lock dir", &self.opts.lock_dir, 0o755).and_then(|c| c.open()) {
                    Ok(s) => {
                        self.lock = Some(s.dir.clone());
                        s.dir
                    }
                    Err(err) => {
                        let mut e = entry("run-dir", name, "failed");
                        e.detail = Some(err.message);
                        self.push(e);
                        return;
                    }
                }
            }
        };
        let held = match AppLocks::flock(lock).try_acquire(app) {
            Ok(Attempt::Held(h)) => h,
            Ok(Attempt::Busy(_)) => {
                let mut e = entry("run-dir", name, "live");
                e.app = Some(app.to_string());
                e.run_id = Some(run_id.to_owned());
                e.detail = Some("its app is locked: left to the holder, who reconciles".into());
                self.push(e);
                return;
            }
            Err(err) => {
                let mut e = entry("run-dir", name, "failed");
                e.detail = Some(format!("app lock: {err}"));
                self.push(e);
                return;
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
                let empty_or_clean = held.meta().map(|m| m.state == State::Clean).unwrap_or(true);
                if empty_or_clean {
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
        self.push(e);
    }

    fn remove_retired(&mut self, runs: &Dir, name: &str) {
        let action = if self.opts.dry_run {
            "would-remove"
        } else {
            "removed"
        };
        let mut e = entry("run-dir", name, action);
        e.detail = Some("retired run dir of a finished run".into());
        if !self.opts.dry_run {
            // Its run may still be deleting it (holding its run.lock): leave it then.
            if let Ok(dir) = rundir::open_trusted(runs, name) {
                let held = lock::try_acquire_existing(&dir, rundir::LOCK_FILE);
                if matches!(held, Ok(None)) && dir.stat_at(rundir::LOCK_FILE).is_ok() {
                    return;
                }
            } else {
                let mut e = entry("run-dir", name, "skipped");
                e.detail = Some("not tether's; not touched".into());
                self.push(e);
                return;
            }
            if let Err(err) = runs.remove_tree(name) {
                e.action = "failed";
                e.detail = Some(format!("cannot remove: {err}"));
            }
        }
        self.push(e);
    }

    /// SPEC §4.4 / issue 14: run cgroups whose core is dead and whose state is gone (wiped
    /// dirs, a deleted sandbox) — everything in them is killed and they are removed. Only
    /// cgroups at least `--orphan-age` old: a fresh death is its app's next holder's to reap
    /// (kill, then teardown, in that order). Not with `--app` (a cgroup does not say its app).
    fn cgroups(&mut self) {
        if self.opts.app.is_some() || self.stop_requested() {
            return;
        }
        for orphan in crate::sys::cgroup::orphans() {
            if self.stop_requested() {
                return;
            }
            if orphan
                .cgroup
                .age()
                .is_some_and(|a| a < self.opts.orphan_age)
            {
                continue;
            }
            let name = orphan
                .cgroup
                .path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let action = if self.opts.dry_run {
                "would-remove"
            } else {
                "removed"
            };
            let mut e = entry("cgroup", &name, action);
            e.run_id = Some(orphan.run_id.clone());
            if self.opts.dry_run {
                e.detail = Some(format!(
                    "cgroup of dead run {} (core pid {}): would kill what is in it and remove it",
                    orphan.run_id, orphan.core_pid
                ));
                self.push(e);
                continue;
            }
            let members = Members {
                cgroup: Some(orphan.cgroup.clone()),
                ..Members::default()
            };
            let done = tree::terminate(&members, self.opts.grace, self.reaper.supervisor());
            let n = done.found;
            e.detail = Some(format!(
                "cgroup of dead run {} (core pid {}): {n} process(es) killed",
                orphan.run_id, orphan.core_pid
            ));
            if let Err(err) = orphan.cgroup.remove() {
                e.action = "failed";
                e.detail = Some(format!(
                    "cannot remove {}: {err}",
                    orphan.cgroup.path().display()
                ));
            }
            self.push(e);
        }
    }

    /// Count failed reaps in the kept record, so operators see a run that keeps failing.
    fn record_failure(&self, run_id: &str) {
        let Some(runs) = self.reaper.runs() else {
            return;
        };
        let Ok(dir) = rundir::open_trusted(runs, run_id) else {
            return;
        };
        if let Ok(mut r) = record::read_record(&dir) {
            r.reap_failures += 1;
            let _ = record::write_record(&dir, &r);
        }
    }
}
