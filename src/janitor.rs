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

use crate::dirs;
use crate::duration;
use crate::error::{Error, Result};
use crate::lifetime::{self, Event};
use crate::lock;
use crate::names::Domain;
use crate::output;
use crate::proc_locks;
use crate::reconcile::Reaper;
use crate::record::{self, State};
use crate::rundir;
use serde::Serialize;
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct Options {
    pub lock_dir: PathBuf,
    pub runs_dir: PathBuf,
    pub teardown: Option<String>,
    pub teardown_timeout: Duration,
    pub grace: Duration,
    pub app: Option<Domain>,
    pub dry_run: bool,
    pub retain: Duration,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Entry {
    /// `lockfile` or `run-dir`.
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

/// Sweep both dirs. `Err` only for unsafe dirs or a funnel that cannot be set up.
pub fn sweep(opts: &Options) -> Result<Report> {
    // Records name run dirs by absolute path; compare like with like.
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let opts = &Options {
        lock_dir: absolute(&opts.lock_dir),
        runs_dir: absolute(&opts.runs_dir),
        teardown: opts.teardown.clone(),
        teardown_timeout: opts.teardown_timeout,
        grace: opts.grace,
        app: opts.app.clone(),
        dry_run: opts.dry_run,
        retain: opts.retain,
    };
    let have_locks = dirs::check_dir("lock dir", &opts.lock_dir)?;
    let have_runs = dirs::check_dir("runs dir", &opts.runs_dir)?;
    let mut funnel = lifetime::standalone()
        .map_err(|e| Error::tether(format!("cannot set up signal handling: {e}")))?;
    let mut report = Report {
        dry_run: opts.dry_run,
        ..Report::default()
    };
    let mut reaper = Reaper {
        funnel: &mut funnel,
        fallback_teardown: opts.teardown.clone(),
        teardown_timeout: opts.teardown_timeout,
        grace: opts.grace,
        deferred: Vec::new(),
        reaped: HashSet::new(),
        index: None,
    };
    if have_locks {
        sweep_locks(opts, &mut reaper, &mut report);
    }
    if have_runs && !stop_requested(&reaper.deferred) {
        sweep_runs(opts, &mut reaper, &mut report);
    }
    if stop_requested(&reaper.deferred) {
        output::warn(
            "janitor",
            "signal received — stopped after the current reap",
        );
    }
    Ok(report)
}

fn stop_requested(events: &[Event]) -> bool {
    events
        .iter()
        .any(|e| matches!(e, Event::Signal(_) | Event::ParentDied | Event::Deadline))
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

fn sorted_entries(dir: &Path) -> Vec<std::fs::DirEntry> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|r| r.flatten().collect())
        .unwrap_or_default();
    v.sort_by_key(|e| e.file_name());
    v
}

fn sweep_locks(opts: &Options, reaper: &mut Reaper<'_>, report: &mut Report) {
    let table = proc_locks::read();
    for de in sorted_entries(&opts.lock_dir) {
        if stop_requested(&reaper.deferred) {
            return;
        }
        let name = de.file_name().to_string_lossy().into_owned();
        let path = de.path();
        let Some(domain_text) = name
            .strip_prefix("app-")
            .and_then(|n| n.strip_suffix(".lock"))
        else {
            if !name.starts_with("slot-") {
                let mut e = entry("lockfile", &name, "skipped");
                e.detail = Some("not an app lockfile name".into());
                say(&e);
                report.push(e);
            }
            continue;
        };
        let domain = match Domain::parse(domain_text) {
            Ok(d) if d.as_str() == domain_text => d,
            _ => {
                let mut e = entry("lockfile", &name, "skipped");
                e.detail = Some("name is not a valid app domain".into());
                say(&e);
                report.push(e);
                continue;
            }
        };
        if opts.app.as_ref().is_some_and(|a| *a != domain) {
            continue;
        }
        let mut e = entry("lockfile", &name, "skipped");
        e.app = Some(domain.to_string());
        match std::fs::symlink_metadata(&path) {
            Ok(md) if md.file_type().is_file() => {}
            Ok(md) => {
                e.detail = Some(if md.file_type().is_symlink() {
                    "is a symlink".into()
                } else if md.is_dir() {
                    "is a directory".into()
                } else {
                    "is not a regular file".into()
                });
                say(&e);
                report.push(e);
                continue;
            }
            Err(err) => {
                e.detail = Some(format!("cannot inspect: {err}"));
                say(&e);
                report.push(e);
                continue;
            }
        }
        if opts.dry_run {
            if let Some(id) = dry_run_lock(&path, &domain, &table, report) {
                reaper.reaped.insert(id);
            }
            continue;
        }
        let held = match lock::try_acquire_existing(&path) {
            Ok(Some(h)) => h,
            Ok(None) => {
                report_live(&path, &domain, report);
                continue;
            }
            Err(err) => {
                e.detail = Some(err.to_string());
                say(&e);
                report.push(e);
                continue;
            }
        };
        let meta = record::read_meta(held.file());
        match reaper.reconcile(&domain, &held, &opts.runs_dir, None) {
            Ok(n) => {
                let mut e = entry("lockfile", &name, if n > 0 { "reaped" } else { "removed" });
                e.app = Some(domain.to_string());
                e.run_id = meta.as_ref().map(|m| m.run_id.clone());
                if n > 0 {
                    e.detail = Some(format!("reaped {n} dead run(s); lockfile removed"));
                } else {
                    e.detail = Some("unheld lockfile removed".into());
                }
                // Unlink while still holding: waiters on this inode re-open the path.
                if let Err(err) = std::fs::remove_file(&path) {
                    e.detail = Some(format!("cannot remove lockfile: {err}"));
                }
                held.release();
                say(&e);
                report.push(e);
            }
            Err(failed) => {
                if let Some(m) = &meta {
                    let dir = PathBuf::from(&m.run_dir);
                    if dir.parent() == Some(opts.runs_dir.as_path()) {
                        record_failure(&dir);
                    }
                }
                held.release();
                let mut e = entry("lockfile", &name, "failed");
                e.app = Some(domain.to_string());
                e.run_id = meta.map(|m| m.run_id);
                e.detail = Some(failed.0);
                say(&e);
                report.push(e);
            }
        }
    }
}

fn report_live(path: &Path, domain: &Domain, report: &mut Report) {
    let meta = lock::open_existing(path)
        .ok()
        .and_then(|f| record::read_meta(&f));
    let holder = std::fs::symlink_metadata(path).ok().and_then(|md| {
        proc_locks::entries_for(&proc_locks::read(), md.dev(), md.ino())
            .into_iter()
            .find(|e| !e.waiting)
            .map(|e| e.pid)
    });
    let mut e = entry("lockfile", &format!("app-{domain}.lock"), "live");
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
        let rec = record::read_record(&Path::new(&m.run_dir).join(rundir::RECORD_FILE));
        let (deadline, grace, td) = rec
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
    say(&e);
    report.push(e);
}

fn dry_run_lock(
    path: &Path,
    domain: &Domain,
    table: &[proc_locks::LockEntry],
    report: &mut Report,
) -> Option<String> {
    let Ok(md) = std::fs::symlink_metadata(path) else {
        return None;
    };
    let entries = proc_locks::entries_for(table, md.dev(), md.ino());
    let holder = entries.iter().find(|e| !e.waiting).map(|e| e.pid);
    let meta = lock::open_existing(path)
        .ok()
        .and_then(|f| record::read_meta(&f));
    let name = format!("app-{domain}.lock");
    let mut e = match holder {
        Some(pid) => {
            let mut e = entry("lockfile", &name, "live");
            e.pid = meta.as_ref().map(|m| m.pid).or(Some(pid));
            e
        }
        None => match &meta {
            Some(m) if m.state != State::Clean => {
                let mut e = entry("lockfile", &name, "would-reap");
                e.detail = Some(format!(
                    "would reap dead run {} and remove the lockfile",
                    m.run_id
                ));
                e
            }
            _ if md.len() > 0 && meta.is_none() => {
                let mut e = entry("lockfile", &name, "would-reap");
                e.detail = Some("would reap an unknown dead run (unreadable metadata)".into());
                e
            }
            _ => {
                let mut e = entry("lockfile", &name, "would-remove");
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
    say(&e);
    report.push(e);
    would_reap
}

fn sweep_runs(opts: &Options, reaper: &mut Reaper<'_>, report: &mut Report) {
    let table = if opts.dry_run {
        proc_locks::read()
    } else {
        Vec::new()
    };
    for de in sorted_entries(&opts.runs_dir) {
        if stop_requested(&reaper.deferred) {
            return;
        }
        let name = de.file_name().to_string_lossy().into_owned();
        let path = de.path();
        let mut e = entry("run-dir", &name, "skipped");
        match std::fs::symlink_metadata(&path) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => {
                e.detail = Some("not a directory".into());
                say(&e);
                report.push(e);
                continue;
            }
            Err(err) => {
                e.detail = Some(format!("cannot inspect: {err}"));
                say(&e);
                report.push(e);
                continue;
            }
        }
        if name.starts_with(rundir::RETIRED_PREFIX) {
            // A run dir whose run tore down cleanly and crashed before deleting it: its
            // record is stale by design (never reaped again), so only the files go.
            remove_retired(&path, &name, opts.dry_run, report);
            continue;
        }
        if reaper.reaped.contains(&name) {
            if opts.dry_run {
                // Listed, but counted once: it is the dead run of a lockfile above.
                let mut e = entry("run-dir", &name, "would-reap");
                e.run_id = Some(name.clone());
                e.detail = Some("the dead run named by its app lockfile above".into());
                say(&e);
                report.entries.push(e);
            }
            continue;
        }
        let rec = record::read_record(&path.join(rundir::RECORD_FILE));
        if let (Some(app), Some(r)) = (&opts.app, &rec) {
            if r.meta.app != app.as_str() {
                continue;
            }
        } else if opts.app.is_some() && rec.is_none() {
            continue;
        }
        let lock_path = path.join(rundir::LOCK_FILE);
        if opts.dry_run {
            let held = std::fs::symlink_metadata(&lock_path)
                .ok()
                .is_some_and(|md| {
                    proc_locks::entries_for(&table, md.dev(), md.ino())
                        .iter()
                        .any(|x| !x.waiting)
                });
            if held {
                continue;
            }
            let (action, detail) = match &rec {
                Some(r) if r.meta.state == State::Clean => (
                    "would-remove",
                    "clean run dir: removed once older than the retention",
                ),
                Some(_) => (
                    "would-reap",
                    "dead unclean run: would reap it under its app lock",
                ),
                None => ("would-remove", "no readable run record"),
            };
            let mut e = entry("run-dir", &name, action);
            e.app = rec.as_ref().map(|r| r.meta.app.clone());
            e.run_id = rec.as_ref().map(|r| r.meta.run_id.clone());
            e.detail = Some(detail.into());
            say(&e);
            report.push(e);
            continue;
        }
        let held = match lock::try_acquire_existing(&lock_path) {
            Ok(Some(h)) => h,
            Ok(None) => continue, // live (or still being claimed): not ours
            Err(err) => {
                e.detail = Some(format!("run.lock: {err}"));
                say(&e);
                report.push(e);
                continue;
            }
        };
        let rec = record::read_record(&path.join(rundir::RECORD_FILE));
        match rec {
            None => {
                let dir = rundir::RunDir::adopt(path.clone(), held);
                let mut e = entry("run-dir", &name, "removed");
                e.detail = Some("no readable run record (it never reached its app)".into());
                if let Err(err) = dir.remove() {
                    e.action = "failed";
                    e.detail = Some(format!("cannot remove: {err}"));
                }
                say(&e);
                report.push(e);
            }
            Some(r) if r.meta.state == State::Clean => {
                let age = std::fs::metadata(path.join(rundir::RECORD_FILE))
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .unwrap_or_default();
                let dir = rundir::RunDir::adopt(path.clone(), held);
                // Retention is for kept runs; a dead run a reaper already settled goes now.
                let reaped = r.reason.as_deref() == Some(crate::reconcile::REAPED);
                if reaped || age >= opts.retain {
                    let mut e = entry("run-dir", &name, "removed");
                    e.app = Some(r.meta.app.clone());
                    e.run_id = Some(r.meta.run_id.clone());
                    e.detail = Some(if reaped {
                        "run dir of a reaped run".into()
                    } else {
                        "clean run dir past its retention".into()
                    });
                    if let Err(err) = dir.remove() {
                        e.action = "failed";
                        e.detail = Some(format!("cannot remove: {err}"));
                    }
                    say(&e);
                    report.push(e);
                } else {
                    dir.release();
                }
            }
            Some(r) => {
                // Dead and unclean: reap it under its app's lock, never while someone holds it.
                held.release();
                let Ok(app) = Domain::parse(&r.meta.app) else {
                    let mut e = entry("run-dir", &name, "skipped");
                    e.detail = Some(format!("record names an invalid app {:?}", r.meta.app));
                    say(&e);
                    report.push(e);
                    continue;
                };
                reap_app_of_run_dir(opts, reaper, report, &app, &name, &r.meta.run_id);
            }
        }
    }
}

fn reap_app_of_run_dir(
    opts: &Options,
    reaper: &mut Reaper<'_>,
    report: &mut Report,
    app: &Domain,
    name: &str,
    run_id: &str,
) {
    let lock_path = crate::run::app_lock_path(&opts.lock_dir, app);
    if let Err(err) = dirs::ensure_dir("lock dir", &opts.lock_dir, 0o755) {
        let mut e = entry("run-dir", name, "failed");
        e.detail = Some(err.message);
        say(&e);
        report.push(e);
        return;
    }
    let held = match lock::try_acquire(&lock_path) {
        Ok(lock::TryLock::Held(h)) => h,
        Ok(lock::TryLock::Busy(_)) => {
            let mut e = entry("run-dir", name, "live");
            e.app = Some(app.to_string());
            e.run_id = Some(run_id.to_owned());
            e.detail = Some("its app is locked: left to the holder, who reconciles".into());
            say(&e);
            report.push(e);
            return;
        }
        Err(err) => {
            let mut e = entry("run-dir", name, "failed");
            e.detail = Some(format!("app lock: {err}"));
            say(&e);
            report.push(e);
            return;
        }
    };
    let result = reaper.reconcile(app, &held, &opts.runs_dir, None);
    let mut e = entry("run-dir", name, "reaped");
    e.app = Some(app.to_string());
    e.run_id = Some(run_id.to_owned());
    match result {
        Ok(n) => {
            e.detail = Some(format!("reaped {n} dead run(s) of its app"));
            // Leave no lockfile we created just for this reap.
            let empty_or_clean = record::read_meta(held.file())
                .map(|m| m.state == State::Clean)
                .unwrap_or(true);
            if empty_or_clean {
                let _ = std::fs::remove_file(&lock_path);
            }
        }
        Err(failed) => {
            e.action = "failed";
            e.detail = Some(failed.0);
            record_failure(&opts.runs_dir.join(name));
        }
    }
    held.release();
    say(&e);
    report.push(e);
}

fn remove_retired(path: &Path, name: &str, dry_run: bool, report: &mut Report) {
    let action = if dry_run { "would-remove" } else { "removed" };
    let mut e = entry("run-dir", name, action);
    e.detail = Some("retired run dir of a finished run".into());
    if !dry_run {
        // Its run may still be deleting it (holding its run.lock): leave it then.
        let held = lock::try_acquire_existing(&path.join(rundir::LOCK_FILE));
        if matches!(held, Ok(None)) && path.join(rundir::LOCK_FILE).exists() {
            return;
        }
        if let Err(err) = rundir::remove_tree(path) {
            e.action = "failed";
            e.detail = Some(format!("cannot remove: {err}"));
        }
    }
    say(&e);
    report.push(e);
}

/// Count failed reaps in the kept record, so operators see a run that keeps failing.
fn record_failure(dir: &Path) {
    let path = dir.join(rundir::RECORD_FILE);
    if let Some(mut r) = record::read_record(&path) {
        r.reap_failures += 1;
        let _ = record::write_record(&path, &r);
    }
}
