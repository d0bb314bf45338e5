//! The janitor's plan (issue 15, issue 18): what is in the lock dir, the runs dir and tether's
//! cgroups, and what the janitor will do about each — read from the kernel's lock table and the
//! records, taking no lock and changing nothing. Every action is decided here (decide.rs holds
//! the decisions the real sweep makes again under its locks). `--dry-run` prints the plan's
//! entries as `would-…`; the real sweep applies the same steps (apply.rs) and reports the same
//! verbs. Each item is listed once: a dead run by its lockfile when the lockfile names it (its
//! run dir is not a step of its own), else by its run dir.

use super::decide::{self, RunDirAction};
use super::report::{entry, skipped, Entry};
use super::Options;
use crate::ident::names::Domain;
use crate::reap::reaper::OwnDead;
use crate::state::lock;
use crate::state::record::{self, LockMeta, RunRecord};
use crate::state::rundir;
use crate::sys::cgroup::{self, Orphan};
use crate::sys::proc_locks::{self, LockEntry};
use crate::sys::safe_fs::{kind, Dir, Kind};
use std::collections::HashSet;
use std::time::Duration;

/// One thing the janitor found, and what it will do about it.
pub(super) enum Step {
    /// Not tether's to act on (an odd entry): reported with the reason, never touched.
    Skip {
        kind: &'static str,
        name: String,
        app: Option<String>,
        why: String,
    },
    /// An app lockfile. Held: `live` is its entry, and it is left alone. Free: its own dead run
    /// (`own`) is reaped under it, then it is unlinked while still held.
    Lock {
        name: String,
        app: Domain,
        meta: Option<LockMeta>,
        live: Option<Entry>,
        own: Option<OwnDead>,
    },
    /// A run dir of tether's whose `run.lock` is free.
    RunDir {
        name: String,
        record: Option<RunRecord>,
        action: RunDirAction,
    },
    /// A run dir taken out of sight by a finished run that died before deleting it.
    Retired { name: String },
    /// A run cgroup whose core is dead, older than `--orphan-age`, of no run reaped above.
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
    plan_with(
        opts,
        lock,
        runs,
        &proc_locks::read(),
        orphans,
        record::unix_now(),
    )
}

/// The plan from a given lock table, orphan cgroups and clock (the kernel's, or a test's).
fn plan_with(
    opts: &Options,
    lock: Option<&Dir>,
    runs: Option<&Dir>,
    table: &[LockEntry],
    orphans: Vec<Orphan>,
    now: u64,
) -> Vec<Step> {
    let mut steps = Vec::new();
    if let Some(lock) = lock {
        lock_steps(opts, lock, runs, table, now, &mut steps);
    }
    // The dead runs the lockfiles above stand for: their run dirs go with them.
    let by_lockfile: HashSet<String> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Lock {
                own: Some(OwnDead::Run(m)),
                ..
            } => Some(m.run_id.clone()),
            _ => None,
        })
        .collect();
    if let Some(runs) = runs {
        run_dir_steps(opts, runs, table, &by_lockfile, &mut steps);
    }
    // A cgroup of a run reaped above goes with its run, not as an orphan.
    let mut killed = by_lockfile;
    killed.extend(steps.iter().filter_map(|s| match s {
        Step::RunDir { name, action, .. } => action.kills(name),
        _ => None,
    }));
    steps.extend(
        orphans
            .into_iter()
            .filter(|o| o.cgroup.age().is_none_or(|a| a >= opts.orphan_age))
            .filter(|o| !killed.contains(&o.run_id))
            .map(Step::Orphan),
    );
    steps
}

fn lock_steps(
    opts: &Options,
    lock: &Dir,
    runs: Option<&Dir>,
    table: &[LockEntry],
    now: u64,
    steps: &mut Vec<Step>,
) {
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
            // Slots, and the app queues (PROTOCOL §15: a dead waiter's ticket is unlinked by
            // the next waiter that looks; an empty queue is a counter, kept as lockfiles are).
            if !name.starts_with("slot-") && !name.starts_with(crate::state::queue::DIR_PREFIX) {
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
        let (live, own) = match holder {
            Some(_) => {
                let rec = meta.as_ref().and_then(|m| record_of(runs, &m.run_id));
                let e = decide::live(&name, &app, meta.as_ref(), holder, rec.as_ref(), now);
                (Some(e), None)
            }
            None => (None, OwnDead::of(&app, meta.clone(), st.st_size > 0, None)),
        };
        steps.push(Step::Lock {
            name,
            app,
            meta,
            live,
            own,
        });
    }
}

/// The record of run `id` in the runs dir, if it is there and readable.
pub(super) fn record_of(runs: Option<&Dir>, id: &str) -> Option<RunRecord> {
    let dir = rundir::open_trusted(runs?, id).ok()?;
    record::read_record(&dir).ok()
}

/// How old the record in `dir` is (its mtime; 0 when it cannot be read).
pub(super) fn record_age(dir: &Dir) -> Duration {
    dir.stat_at(rundir::RECORD_FILE)
        .ok()
        .map(|st| {
            let now = record::unix_now() as i64;
            Duration::from_secs(now.saturating_sub(st.st_mtime).max(0) as u64)
        })
        .unwrap_or_default()
}

/// Whether `dir`'s `run.lock` is held in `table`.
fn run_lock_held(dir: &Dir, table: &[LockEntry]) -> bool {
    dir.stat_at(rundir::LOCK_FILE).ok().is_some_and(|st| {
        proc_locks::entries_for(table, st.st_dev, st.st_ino)
            .iter()
            .any(|x| !x.waiting)
    })
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
        let dir = match rundir::open_trusted(runs, &name) {
            Ok(d) => d,
            // Not tether's: never acted on, whatever its record says.
            Err(err) => {
                steps.push(skip(format!("{err}; not touched")));
                continue;
            }
        };
        // Held: a live run (or one being claimed, or a retired dir its run is deleting).
        if run_lock_held(&dir, table) {
            continue;
        }
        if name.starts_with(rundir::RETIRED_PREFIX) {
            steps.push(Step::Retired { name });
            continue;
        }
        let record = record::read_record(&dir);
        if let Some(app) = &opts.app {
            if !matches!(&record, Ok(r) if r.meta.app == app.as_str()) {
                continue;
            }
        }
        if by_lockfile.contains(&name) {
            continue; // listed, and reaped, with its lockfile
        }
        let action = RunDirAction::of(&name, &record, record_age(&dir), opts.retain);
        steps.push(Step::RunDir {
            name,
            record: record.ok(),
            action,
        });
    }
}

impl Step {
    /// The entry the sweep reports for this step when it goes as planned (a dry run prints
    /// it as `would-…`).
    pub(super) fn entry(&self) -> Entry {
        match self {
            Step::Skip {
                kind,
                name,
                app,
                why,
            } => skipped(kind, name, app.clone(), why.clone()),
            Step::Lock { live: Some(e), .. } => e.clone(),
            Step::Lock {
                name,
                app,
                meta,
                own,
                ..
            } => decide::unheld_lock(name, app, meta.as_ref(), own.as_ref()),
            Step::RunDir {
                name,
                record,
                action,
            } => action.entry(name, record.as_ref()),
            Step::Retired { name } => {
                let mut e = entry("run-dir", name, "removed");
                e.detail = Some("retired run dir of a finished run".into());
                e
            }
            Step::Orphan(o) => {
                let mut e = entry("cgroup", &o.name(), "removed");
                e.run_id = Some(o.run_id.clone());
                e.detail = Some(format!(
                    "cgroup of dead run {} (core pid {}): what is in it is killed",
                    o.run_id, o.core_pid
                ));
                e
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::places::Place;
    use crate::state::record::{samples, RunRecord, State};
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
            cluster: None,
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

    /// (name, action) of every entry a dry run would print.
    fn would(steps: &[Step]) -> Vec<(String, String)> {
        steps
            .iter()
            .map(|s| s.entry().would())
            .map(|e| (e.name, e.action.to_owned()))
            .collect()
    }

    fn plan_of(lock: Option<&Dir>, runs: Option<&Dir>, table: &[LockEntry]) -> Vec<Step> {
        plan_with(&opts(), lock, runs, table, Vec::new(), 1_000)
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
        std::fs::create_dir(locks.join("queue-live.example.org")).unwrap();
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
        let steps = plan_of(Some(&lock_dir), Some(&runs_dir), &table);
        let got = would(&steps);
        let has = |name: &str, action: &str| got.iter().any(|(n, a)| n == name && a == action);
        assert!(has("app-live.example.org.lock", "live"), "{got:?}");
        assert!(has("app-dead.example.org.lock", "would-reap"), "{got:?}");
        assert!(has("app-clean.example.org.lock", "would-remove"), "{got:?}");
        assert!(has("app-junk.example.org.lock", "would-reap"), "{got:?}");
        assert!(has("app-link.example.org.lock", "skipped"), "{got:?}");
        assert!(has("stray", "skipped"), "{got:?}");
        // The dead run of a lockfile above is listed once: by its lockfile.
        assert!(got.iter().all(|(n, _)| n != "dead"), "{got:?}");
        // Kept on purpose within its retention: said so, changed nothing.
        assert!(has("kept", "kept"), "{got:?}");
        assert!(has("norecord", "would-remove"), "{got:?}");
        assert!(has("garbled", "would-reap"), "{got:?}");
        assert!(has("settled", "would-remove"), "{got:?}");
        assert!(has("unclean", "would-reap"), "{got:?}");
        assert!(has(".retired-x-1", "would-remove"), "{got:?}");
        assert!(has("afile", "skipped"), "{got:?}");
        // tether's own files, slots: nothing to say.
        for quiet in [".forgotten.jsonl", "slot-00.lock", "queue-live.example.org"] {
            assert!(got.iter().all(|(n, ..)| n != quiet), "{quiet}: {got:?}");
        }
        // Nothing is listed twice.
        let mut names: Vec<&String> = got.iter().map(|(n, _)| n).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), got.len(), "{got:?}");
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
        assert!(would(&plan_of(None, Some(&runs_dir), &table)).is_empty());
        assert_eq!(
            would(&plan_of(None, Some(&runs_dir), &[])),
            [("busy".to_owned(), "would-reap".to_owned())]
        );
    }
}
