//! The janitor's plan (issue 15): what is in the lock dir, the runs dir and tether's cgroups,
//! and what the janitor would do about each — read from the kernel's lock table and the
//! records, taking no lock and changing nothing. `--dry-run` prints the plan; the real sweep
//! applies the same plan, step by step, re-checking each under the locks it takes (apply.rs):
//! the lock decides, never the plan.

use super::report::{entry, skipped, Entry};
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
        /// Its metadata (`None`: none, torn, or not tether's). Boxed, as the record below.
        meta: Option<Box<LockMeta>>,
        /// Whether it has content at all (garbage is an unknown dead run of the app).
        has_content: bool,
        /// The holder in the kernel's lock table, if any.
        holder: Option<i32>,
    },
    /// A run dir that is tether's.
    RunDir {
        name: String,
        /// Boxed: a record is large next to the other steps.
        record: Box<Result<RunRecord, ReadError>>,
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
    // Not with --app: a cgroup does not say its app.
    let orphans = if opts.app.is_none() {
        cgroup::orphans()
    } else {
        Vec::new()
    };
    plan_with(opts, lock, runs, &proc_locks::read(), orphans)
}

/// The plan from a given lock table and given orphan cgroups (the kernel's, or a test's).
fn plan_with(
    opts: &Options,
    lock: Option<&Dir>,
    runs: Option<&Dir>,
    table: &[LockEntry],
    orphans: Vec<Orphan>,
) -> Vec<Step> {
    let mut steps = Vec::new();
    if let Some(lock) = lock {
        lock_steps(opts, lock, table, &mut steps);
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
        run_dir_steps(opts, runs, table, &by_lockfile, &mut steps);
    }
    steps.extend(
        orphans
            .into_iter()
            .filter(|o| o.cgroup.age().is_none_or(|a| a >= opts.orphan_age))
            .map(Step::Orphan),
    );
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
            .and_then(|f| record::read_meta(&f))
            .map(Box::new);
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
            record: Box::new(record),
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
            } => Some((skipped(kind, name, app.clone(), why.clone()), true)),
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
                let (action, detail) = match record.as_ref() {
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
                e.app = record.as_ref().as_ref().ok().map(|r| r.meta.app.clone());
                e.run_id = record.as_ref().as_ref().ok().map(|r| r.meta.run_id.clone());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::places::Place;
    use crate::state::record::{samples, RunRecord};
    use std::os::unix::fs::MetadataExt;

    fn opts() -> Options {
        Options {
            lock_dir: Place::given("/nonexistent".into()),
            runs_dir: Place::given("/nonexistent".into()),
            teardown: None,
            teardown_timeout: Duration::from_secs(1),
            grace: Duration::from_secs(1),
            app: None,
            dry_run: true,
            retain: Duration::from_secs(3600),
            orphan_age: Duration::from_secs(600),
        }
    }

    fn meta(app: &str, id: &str, state: State) -> LockMeta {
        samples::meta(app, id, state)
    }

    fn record(app: &str, id: &str, state: State, keep: bool) -> String {
        let r = RunRecord {
            keep,
            ..samples::record(meta(app, id, state))
        };
        serde_json::to_string(&r).unwrap()
    }

    /// A lock table in which `path`'s inode is held by `pid`.
    fn held_by(path: &std::path::Path, pid: i32) -> LockEntry {
        let md = std::fs::metadata(path).unwrap();
        let dev = md.dev();
        LockEntry {
            pid,
            major: (((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff)) as u32,
            minor: ((dev & 0xff) | ((dev >> 12) & !0xff)) as u32,
            inode: md.ino(),
            waiting: false,
        }
    }

    /// (name, action, detail) of every entry a dry run would print.
    fn would(steps: &[Step], runs: &Dir) -> Vec<(String, String, bool)> {
        steps
            .iter()
            .filter_map(|s| s.would(&opts(), Some(runs)))
            .map(|(e, counted)| (e.name, e.action.to_owned(), counted))
            .collect()
    }

    #[test]
    fn the_plan_says_what_the_probes_say_without_touching_anything() {
        let t = tempfile::tempdir().unwrap();
        let (locks, runs) = (t.path().join("locks"), t.path().join("runs"));
        std::fs::create_dir(&locks).unwrap();
        std::fs::create_dir(&runs).unwrap();
        let w = |p: std::path::PathBuf, text: &str| std::fs::write(p, text).unwrap();
        let m = |app, id, st| serde_json::to_string(&meta(app, id, st)).unwrap();
        w(
            locks.join("app-live.example.org.lock"),
            &m("live.example.org", "live", State::Running),
        );
        w(
            locks.join("app-dead.example.org.lock"),
            &m("dead.example.org", "dead", State::Running),
        );
        w(
            locks.join("app-clean.example.org.lock"),
            &m("clean.example.org", "c", State::Clean),
        );
        w(locks.join("app-junk.example.org.lock"), "{\"garbage");
        w(locks.join("stray"), "");
        w(locks.join("slot-00.lock"), "");
        std::os::unix::fs::symlink("/etc/passwd", locks.join("app-link.example.org.lock")).unwrap();
        for (id, rec) in [
            (
                "dead",
                Some(record("dead.example.org", "dead", State::Running, false)),
            ),
            ("norecord", None),
            ("garbled", Some("{\"version\":1,\"ap".to_owned())),
            (
                "kept",
                Some(record("k.example.org", "kept", State::Clean, true)),
            ),
            (
                "settled",
                Some(record("k.example.org", "settled", State::Clean, false)),
            ),
            (
                "unclean",
                Some(record(
                    "u.example.org",
                    "unclean",
                    State::TearingDown,
                    false,
                )),
            ),
            (".retired-x-1", None),
        ] {
            std::fs::create_dir(runs.join(id)).unwrap();
            std::fs::write(runs.join(id).join("run.lock"), "").unwrap();
            if let Some(rec) = rec {
                std::fs::write(runs.join(id).join("run.json"), rec).unwrap();
            }
        }
        w(runs.join(".forgotten.jsonl"), "{}\n");
        w(runs.join("afile"), "");
        let table = vec![held_by(&locks.join("app-live.example.org.lock"), 42)];
        let before = tree_state(t.path());
        let (lock_dir, runs_dir) = (
            Dir::open_unchecked(&locks).unwrap(),
            Dir::open_unchecked(&runs).unwrap(),
        );
        let steps = plan_with(
            &opts(),
            Some(&lock_dir),
            Some(&runs_dir),
            &table,
            Vec::new(),
        );
        let got = would(&steps, &runs_dir);
        let has = |name: &str, action: &str| got.iter().any(|(n, a, _)| n == name && a == action);
        assert!(has("app-live.example.org.lock", "live"), "{got:?}");
        assert!(has("app-dead.example.org.lock", "would-reap"), "{got:?}");
        assert!(has("app-clean.example.org.lock", "would-remove"), "{got:?}");
        assert!(has("app-junk.example.org.lock", "would-reap"), "{got:?}");
        assert!(has("app-link.example.org.lock", "skipped"), "{got:?}");
        assert!(has("stray", "skipped"), "{got:?}");
        // The dead run of a lockfile above: listed, counted once.
        assert!(
            got.contains(&("dead".into(), "would-reap".into(), false)),
            "{got:?}"
        );
        assert!(has("norecord", "would-remove"), "{got:?}");
        assert!(has("garbled", "would-reap"), "{got:?}");
        assert!(has("settled", "would-remove"), "{got:?}");
        assert!(has("unclean", "would-reap"), "{got:?}");
        assert!(has(".retired-x-1", "would-remove"), "{got:?}");
        assert!(has("afile", "skipped"), "{got:?}");
        // Kept on purpose within its retention, tether's own files, slots: nothing to say.
        for quiet in ["kept", ".forgotten.jsonl", "slot-00.lock"] {
            assert!(got.iter().all(|(n, ..)| n != quiet), "{quiet}: {got:?}");
        }
        // Planning changed nothing: every name, content, mode and mtime as before.
        assert_eq!(tree_state(t.path()), before, "the plan touched the dirs");
    }

    /// Every entry under `top` (symlinks not followed) with its mode, mtime and file content.
    fn tree_state(top: &std::path::Path) -> Vec<(std::path::PathBuf, u32, i64, i64, Vec<u8>)> {
        use std::os::unix::fs::MetadataExt;
        let mut out = Vec::new();
        let mut todo = vec![top.to_path_buf()];
        while let Some(p) = todo.pop() {
            let md = std::fs::symlink_metadata(&p).unwrap();
            let content = if md.is_file() {
                std::fs::read(&p).unwrap()
            } else {
                Vec::new()
            };
            if md.is_dir() {
                for e in std::fs::read_dir(&p).unwrap() {
                    todo.push(e.unwrap().path());
                }
            }
            out.push((p, md.mode(), md.mtime(), md.mtime_nsec(), content));
        }
        out.sort();
        out
    }

    #[test]
    fn a_run_dir_whose_run_lock_is_held_is_not_a_candidate() {
        let t = tempfile::tempdir().unwrap();
        let runs = t.path().join("runs");
        std::fs::create_dir_all(runs.join("busy")).unwrap();
        std::fs::write(runs.join("busy/run.lock"), "").unwrap();
        std::fs::write(
            runs.join("busy/run.json"),
            record("b.example.org", "busy", State::Running, false),
        )
        .unwrap();
        let table = vec![held_by(&runs.join("busy/run.lock"), 7)];
        let runs_dir = Dir::open_unchecked(&runs).unwrap();
        let steps = plan_with(&opts(), None, Some(&runs_dir), &table, Vec::new());
        assert!(would(&steps, &runs_dir).is_empty());
        let steps = plan_with(&opts(), None, Some(&runs_dir), &[], Vec::new());
        assert_eq!(
            would(&steps, &runs_dir),
            [("busy".to_owned(), "would-reap".to_owned(), true)]
        );
    }
}
