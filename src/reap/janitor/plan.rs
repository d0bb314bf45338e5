//! The janitor's plan (issue 15): what is in the lock dir, the runs dir and tether's cgroups,
//! and what the janitor would do about each — read from the kernel's lock table and the
//! records, taking no lock and changing nothing. `--dry-run` prints the plan; the real sweep
//! applies the same plan, step by step, re-checking each under the locks it takes (apply.rs):
//! the lock decides, never the plan.

use super::report::{entry, Entry};
use super::Options;
use crate::ident::names::Domain;
use crate::state::lock;
use crate::state::record::{self, LockMeta, RunRecord, State};
use crate::state::rundir;
use crate::sys::cgroup::{self, Orphan};
use crate::sys::proc_locks::{self, LockEntry};
use crate::sys::safe_fs::{kind, Dir, Kind, ReadError};
use std::collections::HashSet;
use std::time::Duration;

/// One thing the janitor found, with what the probes said about it.
pub(super) enum Step {
    /// Not tether's to act on (an odd entry): reported with the reason, never touched.
    Skip {
        kind: &'static str,
        name: String,
        app: Option<String>,
        why: String,
    },
    /// An app lockfile.
    Lock {
        name: String,
        app: Domain,
        /// Its metadata (`None`: none, torn, or not tether's).
        meta: Option<LockMeta>,
        /// Whether it has content at all (garbage is an unknown dead run of the app).
        has_content: bool,
        /// The holder in the kernel's lock table, if any.
        holder: Option<i32>,
    },
    /// A run dir that is tether's.
    RunDir {
        name: String,
        record: Result<RunRecord, ReadError>,
        /// Its `run.lock` is held (a live run, or one being claimed).
        held: bool,
        /// A lockfile step above reaps this very run (listed once in a dry run).
        reaped_by_lockfile: bool,
    },
    /// A run dir taken out of sight by a finished run that died before deleting it.
    Retired { name: String },
    /// A run cgroup whose core is dead, older than `--orphan-age`.
    Orphan(Orphan),
}

/// Everything in reach, in the order the sweep handles it: lockfiles, run dirs, cgroups.
pub(super) fn plan(opts: &Options, lock: Option<&Dir>, runs: Option<&Dir>) -> Vec<Step> {
    let table = proc_locks::read();
    let mut steps = Vec::new();
    if let Some(lock) = lock {
        lock_steps(opts, lock, &table, &mut steps);
    }
    // The runs the lockfiles above would reap (their run dirs are the same dead runs).
    let by_lockfile: HashSet<String> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Lock {
                meta: Some(m),
                holder: None,
                ..
            } if m.state != State::Clean => Some(m.run_id.clone()),
            _ => None,
        })
        .collect();
    if let Some(runs) = runs {
        run_dir_steps(opts, runs, &table, &by_lockfile, &mut steps);
    }
    // Not with --app: a cgroup does not say its app.
    if opts.app.is_none() {
        steps.extend(
            cgroup::orphans()
                .into_iter()
                .filter(|o| o.cgroup.age().is_none_or(|a| a >= opts.orphan_age))
                .map(Step::Orphan),
        );
    }
    steps
}

fn lock_steps(opts: &Options, lock: &Dir, table: &[LockEntry], steps: &mut Vec<Step>) {
    for (name, _) in lock.entries().unwrap_or_default() {
        let name = name.to_string_lossy().into_owned();
        let skip = |app: Option<&Domain>, why: &str| Step::Skip {
            kind: "lockfile",
            name: name.clone(),
            app: app.map(Domain::to_string),
            why: why.to_owned(),
        };
        let Some(domain_text) = name
            .strip_prefix("app-")
            .and_then(|n| n.strip_suffix(".lock"))
        else {
            if !name.starts_with("slot-") {
                steps.push(skip(None, "not an app lockfile name"));
            }
            continue;
        };
        let app = match Domain::parse(domain_text) {
            Ok(d) if d.as_str() == domain_text => d,
            _ => {
                steps.push(skip(None, "name is not a valid app domain"));
                continue;
            }
        };
        if opts.app.as_ref().is_some_and(|a| *a != app) {
            continue;
        }
        let st = match lock.stat_at(&name) {
            Ok(st) if kind(&st) == Kind::File => st,
            Ok(st) => {
                let why = match kind(&st) {
                    Kind::Symlink => "is a symlink",
                    Kind::Dir => "is a directory",
                    _ => "is not a regular file",
                };
                steps.push(skip(Some(&app), why));
                continue;
            }
            Err(err) => {
                steps.push(skip(Some(&app), &format!("cannot inspect: {err}")));
                continue;
            }
        };
        let holder = proc_locks::entries_for(table, st.st_dev, st.st_ino)
            .into_iter()
            .find(|e| !e.waiting)
            .map(|e| e.pid);
        let meta = lock::open_existing(lock, &name)
            .ok()
            .and_then(|f| record::read_meta(&f));
        steps.push(Step::Lock {
            name,
            app,
            meta,
            has_content: st.st_size > 0,
            holder,
        });
    }
}

fn run_dir_steps(
    opts: &Options,
    runs: &Dir,
    table: &[LockEntry],
    by_lockfile: &HashSet<String>,
    steps: &mut Vec<Step>,
) {
    for (name, _) in runs.entries().unwrap_or_default() {
        let name = name.to_string_lossy().into_owned();
        if name.starts_with('.') && !name.starts_with(rundir::RETIRED_PREFIX) {
            // tether's own files (`.forgotten.jsonl`): no run id starts with a dot.
            continue;
        }
        let skip = |why: String| Step::Skip {
            kind: "run-dir",
            name: name.clone(),
            app: None,
            why,
        };
        match runs.stat_at(&name) {
            Ok(st) if kind(&st) == Kind::Dir => {}
            Ok(_) => {
                steps.push(skip("not a directory".into()));
                continue;
            }
            Err(err) => {
                steps.push(skip(format!("cannot inspect: {err}")));
                continue;
            }
        }
        if name.starts_with(rundir::RETIRED_PREFIX) {
            steps.push(Step::Retired { name });
            continue;
        }
        let dir = match rundir::open_trusted(runs, &name) {
            Ok(d) => d,
            // Not tether's: never acted on, whatever its record says.
            Err(err) => {
                steps.push(skip(format!("{err}; not touched")));
                continue;
            }
        };
        let record = record::read_record(&dir);
        if let Some(app) = &opts.app {
            if !matches!(&record, Ok(r) if r.meta.app == app.as_str()) {
                continue;
            }
        }
        let held = dir.stat_at(rundir::LOCK_FILE).ok().is_some_and(|st| {
            proc_locks::entries_for(table, st.st_dev, st.st_ino)
                .iter()
                .any(|x| !x.waiting)
        });
        steps.push(Step::RunDir {
            reaped_by_lockfile: by_lockfile.contains(&name),
            name,
            record,
            held,
        });
    }
}

/// Whether a clean record's dir can go: one kept on purpose (`--keep-run-dir`) waits for its
/// retention; a reaped run's, or one whose run died after its teardown, goes now.
pub(super) fn past_retention(dir: &Dir, r: &RunRecord, retain: Duration) -> bool {
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
    age >= retain
}

impl Step {
    /// What a dry run says about this step: the entry, and whether it counts (a run dir
    /// reaped by its lockfile above is listed but counted once). `None`: nothing to say.
    pub(super) fn would(&self, opts: &Options, runs: Option<&Dir>) -> Option<(Entry, bool)> {
        match self {
            Step::Skip {
                kind,
                name,
                app,
                why,
            } => {
                let mut e = entry(kind, name, "skipped");
                e.app = app.clone();
                e.detail = Some(why.clone());
                Some((e, true))
            }
            Step::Lock {
                name,
                app,
                meta,
                has_content,
                holder,
            } => {
                let mut e = match (holder, meta) {
                    (Some(pid), _) => {
                        let mut e = entry("lockfile", name, "live");
                        e.pid = meta.as_ref().map(|m| m.pid).or(Some(*pid));
                        e
                    }
                    (None, Some(m)) if m.state != State::Clean => {
                        let mut e = entry("lockfile", name, "would-reap");
                        e.detail = Some(format!(
                            "would reap dead run {} and remove the lockfile",
                            m.run_id
                        ));
                        e
                    }
                    (None, None) if *has_content => {
                        let mut e = entry("lockfile", name, "would-reap");
                        e.detail =
                            Some("would reap an unknown dead run (unreadable metadata)".into());
                        e
                    }
                    _ => {
                        let mut e = entry("lockfile", name, "would-remove");
                        e.detail = Some("would remove the unheld lockfile".into());
                        e
                    }
                };
                e.app = Some(app.to_string());
                e.run_id = meta.as_ref().map(|m| m.run_id.clone());
                Some((e, true))
            }
            Step::RunDir { held: true, .. } => None,
            Step::RunDir {
                name,
                reaped_by_lockfile: true,
                ..
            } => {
                let mut e = entry("run-dir", name, "would-reap");
                e.run_id = Some(name.clone());
                e.detail = Some("the dead run named by its app lockfile above".into());
                Some((e, false))
            }
            Step::RunDir { name, record, .. } => {
                let (action, detail) = match record {
                    Ok(r) if r.meta.state == State::Clean => {
                        let dir = runs.and_then(|runs| rundir::open_trusted(runs, name).ok())?;
                        if !past_retention(&dir, r, opts.retain) {
                            return None;
                        }
                        (
                            "would-remove",
                            "clean run dir: nothing left to do".to_string(),
                        )
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
                        format!(
                            "unknown dead run ({why}): would kill what carries its id and run \
                             the fallback teardown"
                        ),
                    ),
                };
                let mut e = entry("run-dir", name, action);
                e.app = record.as_ref().ok().map(|r| r.meta.app.clone());
                e.run_id = record.as_ref().ok().map(|r| r.meta.run_id.clone());
                e.detail = Some(detail);
                Some((e, true))
            }
            Step::Retired { name } => {
                let mut e = entry("run-dir", name, "would-remove");
                e.detail = Some("retired run dir of a finished run".into());
                Some((e, true))
            }
            Step::Orphan(o) => {
                let mut e = entry("cgroup", &o.name(), "would-remove");
                e.run_id = Some(o.run_id.clone());
                e.detail = Some(format!(
                    "cgroup of dead run {} (core pid {}): would kill what is in it and remove it",
                    o.run_id, o.core_pid
                ));
                Some((e, true))
            }
        }
    }
}
