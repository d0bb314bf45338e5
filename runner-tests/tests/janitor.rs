//! `tether janitor` and `tether status` against the real kernel (PROTOCOL §6, CLI-CONTRACT §15, CLI-CONTRACT §16).
//!
//! A *dead run* is made the way the world makes one: a real `tether run` whose core is
//! SIGKILLed while its command tree (`tree-helper` with a `setsid()` child and a double-fork
//! orphan) runs. The kernel drops its locks; its leftovers stay (in its cgroup, carrying its
//! env marker) until a reaper kills them. Each test then asserts what must hold afterwards:
//! teardown lines counted in an `O_APPEND` log written by the teardown command itself, pids
//! probed in `/proc`, locks probed in `/proc/locks`, files compared byte for byte.
//!
//! Orderings are never hoped for: a waiter is proven blocked in the kernel before anything is
//! released; slow teardowns wait for a release marker the test creates (bounded shell loops
//! that give up with status 99); a waiter is frozen with SIGSTOP (which takes it off the
//! kernel's wait list) where the test needs the lock to be free for a janitor first.
//!
//! Run ids are unique per sandbox: tether names a run's cgroup after the run id
//! (`<cgroup2>/tether/<run-id>`), which is host-wide, and tests run in parallel.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::unistd::Pid;
use runner_tests::{
    backdate, helper_bin, log_lines, names, pid_alive, poll_all_gone, poll_until, rid, run_dirs,
    sh_wait_for, shell_quote, snapshot, start_held_run, start_lock_holder, suffix, touch,
    wait_file, wait_line, wait_pids, wait_until, Finished, HeldRun, RunningTether, Sandbox, Signal,
    TetherCmd, TIMEOUT,
};
use serde_json::{json, Value};

/// `--grace` for the janitor and the runs: leftovers here die on SIGTERM at once.
const GRACE: &str = "2s";

// ---------------------------------------------------------------------------------------------
// helpers

/// A teardown command appending `"<TETHER_REASON> <TETHER_RUN_ID> <TETHER_APP>"` to `log`.
fn teardown_logger(log: &Path) -> String {
    format!(
        r#"echo "$TETHER_REASON ${{TETHER_RUN_ID-none}} ${{TETHER_APP-none}}" >> {}"#,
        shell_quote(log)
    )
}

/// `tether janitor` in the sandbox with a short leftover grace.
fn janitor(sb: &Sandbox) -> TetherCmd<'_> {
    sb.tether_janitor().args(["--grace", GRACE])
}

/// The counters of the janitor's last line (`tether: janitor summary: live=N …`).
fn jsum(f: &Finished) -> BTreeMap<String, usize> {
    let line = f
        .stderr
        .lines()
        .last()
        .filter(|l| l.starts_with("tether: janitor summary: "))
        .unwrap_or_else(|| panic!("the janitor's last stderr line is not its summary\n{f}"));
    line.trim_start_matches("tether: janitor summary: ")
        .split_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// One counter of the janitor summary.
#[track_caller]
fn count(f: &Finished, key: &str) -> usize {
    *jsum(f)
        .get(key)
        .unwrap_or_else(|| panic!("no {key}= in the janitor summary\n{f}"))
}

/// The `--json` report on stdout.
#[track_caller]
fn report(f: &Finished) -> Value {
    serde_json::from_str(&f.stdout)
        .unwrap_or_else(|e| panic!("janitor --json stdout is not one JSON document: {e}\n{f}"))
}

/// The report entry about `name` (a lockfile or run dir name).
#[track_caller]
fn entry<'v>(report: &'v Value, name: &str) -> &'v Value {
    report["entries"]
        .as_array()
        .and_then(|es| es.iter().find(|e| e["name"] == name))
        .unwrap_or_else(|| panic!("no report entry named {name:?} in {report:#}"))
}

// Lock probes. `/proc/locks` is not a snapshot: once it is longer than a page it is read in
// several `read()`s, and entries added or removed meanwhile (other tests' locks) make a
// reader skip or repeat lines. So a holder is checked in its own `/proc/<pid>/fdinfo` (the
// locks held through each fd, read atomically), and waiters — which only `/proc/locks` shows
// — from two consecutive reads that agree.

/// (major, minor, inode) of the file `path` names now (glibc's dev_t encoding).
fn file_id(path: &Path) -> Option<(u64, u64, u64)> {
    let md = fs::symlink_metadata(path).ok()?;
    let dev = md.dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    Some((major, minor, md.ino()))
}

/// `maj:min:ino` of a `/proc/locks` or fdinfo `lock:` line (hex device numbers).
fn parse_id(field: &str) -> Option<(u64, u64, u64)> {
    let mut it = field.split(':');
    Some((
        u64::from_str_radix(it.next()?, 16).ok()?,
        u64::from_str_radix(it.next()?, 16).ok()?,
        it.next()?.parse().ok()?,
    ))
}

/// Whether process `pid` holds a flock on the file `path` names now (its fdinfo).
fn holds_lock(pid: i32, path: &Path) -> bool {
    let Some(id) = file_id(path) else {
        return false;
    };
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        fs::read_to_string(fd.path()).is_ok_and(|text| {
            text.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                // "lock:  1: FLOCK  ADVISORY  WRITE <pid> <maj:min:ino> 0 EOF"
                f.first() == Some(&"lock:")
                    && f.get(2) == Some(&"FLOCK")
                    && f.get(6).and_then(|x| parse_id(x)) == Some(id)
            })
        })
    })
}

/// Sorted, deduplicated (holders, waiters) of the file `path` names, from `/proc/locks`
/// read until two consecutive reads agree.
fn lock_table(path: &Path) -> (Vec<i32>, Vec<i32>) {
    let read = || {
        let Some(id) = file_id(path) else {
            return (Vec::new(), Vec::new());
        };
        let text = fs::read_to_string("/proc/locks").unwrap_or_default();
        let (mut holders, mut waiters) = (Vec::new(), Vec::new());
        for line in text.lines() {
            let mut f: Vec<&str> = line.split_whitespace().skip(1).collect();
            let waiter = f.first() == Some(&"->");
            if waiter {
                f.remove(0);
            }
            if f.first() != Some(&"FLOCK") || f.get(4).and_then(|x| parse_id(x)) != Some(id) {
                continue;
            }
            let Some(pid) = f.get(3).and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            if waiter {
                waiters.push(pid);
            } else {
                holders.push(pid);
            }
        }
        for v in [&mut holders, &mut waiters] {
            v.sort_unstable();
            v.dedup();
        }
        (holders, waiters)
    };
    let mut last = read();
    for _ in 0..200 {
        let now = read();
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// Waits until at least `n` distinct processes are blocked in `flock` on `path`.
fn wait_waiters(path: &Path, n: usize) -> Vec<i32> {
    let mut waiters = Vec::new();
    if poll_until(TIMEOUT, || {
        waiters = lock_table(path).1;
        waiters.len() >= n
    }) {
        return waiters;
    }
    panic!(
        "timed out waiting for {n} flock waiters on {}: {:?}",
        path.display(),
        lock_table(path)
    );
}

/// Sets the flag when dropped — also when a test panics inside `thread::scope`, whose helper
/// threads loop until it is set (else the scope would wait for them forever).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn signal(pid: i32, sig: Signal) {
    nix::sys::signal::kill(Pid::from_raw(pid), sig)
        .unwrap_or_else(|e| panic!("kill -{sig} {pid}: {e}"));
}

/// A dead run: its core was SIGKILLed while its command tree ran.
struct Dead {
    id: String,
    /// The dead core's pid (the `pid` of its record).
    core: i32,
    /// Its command's children (the command itself died with the core), still alive.
    leftovers: Vec<i32>,
    /// Its cgroup dir, if it had one.
    cgroup: Option<PathBuf>,
}

/// Starts `tether run --app app --run-id id --teardown teardown -- tree-helper …` and SIGKILLs
/// its core once the tree is up (`sigkill_core`: nobody kills the leftovers, also under the
/// cluster switch). Asserts how the front ended (137) and that the tree survives.
fn make_dead_run(
    sb: &Sandbox,
    app: &str,
    id: &str,
    teardown: &str,
    extra_env: &[(&str, &str)],
) -> Dead {
    let pids_file = sb.fresh_mark("tree.pids");
    let mut cmd = sb
        .tether_run()
        .app(app)
        .run_id(id)
        .teardown(teardown)
        .args(["--grace", GRACE])
        .command([
            helper_bin("tree-helper").into_os_string(),
            "--pids-file".into(),
            pids_file.clone().into_os_string(),
            "--setsid".into(),
            "--double-fork".into(),
        ]);
    for (k, v) in extra_env {
        cmd = cmd.env(k, v);
    }
    let mut run = cmd.spawn();
    let leftovers = wait_pids(&pids_file, TIMEOUT);
    sb.guard().pids(&leftovers);
    let rec = sb.wait_record(id, "running");
    let core = rec["pid"].as_i64().expect("run.json has a pid") as i32;
    assert_eq!(
        core,
        run.wait_core_pid(TIMEOUT),
        "run.json's pid is the core's"
    );
    assert_eq!(
        sb.lock_metadata(app).map(|m| m["run_id"].clone()),
        Some(json!(id)),
        "the lock metadata names {id}"
    );
    runner_tests::sigkill_core(core);
    let done = run.wait_exit(TIMEOUT);
    match runner_tests::sigkilled_core_front_status() {
        Ok(code) => done.assert_code(code),
        Err(sig) => done.assert_signal(sig),
    };
    wait_until("the dead run's app lock to be dropped", TIMEOUT, || {
        lock_table(&sb.lock_path(app)).0.is_empty()
    });
    // The command itself dies with its core (its PDEATHSIG is SIGKILL); its children stay.
    let leftovers = leftovers[1..].to_vec();
    for &p in &leftovers {
        assert!(
            pid_alive(p),
            "leftover {p} of {id} died with its core: nothing to reap"
        );
    }
    Dead {
        id: id.to_owned(),
        core,
        leftovers,
        cgroup: rec["cgroup"].as_str().map(PathBuf::from),
    }
}

/// Asserts the dead run's leftovers are gone (dead or zombies), its cgroup and run dir too.
#[track_caller]
fn assert_reaped(sb: &Sandbox, dead: &Dead) {
    assert!(
        poll_all_gone(&dead.leftovers, Duration::from_secs(1)),
        "leftovers of {} survive the reap: {:?}",
        dead.id,
        dead.leftovers
            .iter()
            .filter(|&&p| pid_alive(p))
            .collect::<Vec<_>>()
    );
    assert!(
        !sb.run_dir(&dead.id).exists(),
        "run dir of {} kept",
        dead.id
    );
    if let Some(cg) = &dead.cgroup {
        assert!(!cg.exists(), "cgroup {} of {} kept", cg.display(), dead.id);
    }
}

/// A live run ([`start_held_run`]: its command waits for `release`, then exits 0) with
/// `--grace` and a teardown; its run record names its core.
fn start_live_run(sb: &Sandbox, app: &str, id: &str, release: &Path, teardown: &str) -> HeldRun {
    let live = start_held_run(sb, app, id, release, |cmd| {
        cmd.teardown(teardown).args(["--grace", GRACE])
    });
    let recorded = sb.wait_record(id, "running")["pid"]
        .as_i64()
        .unwrap_or_default() as i32;
    assert_eq!(recorded, live.core, "the run record names the core");
    live
}

/// A run of `true` (with `extra` arguments) that passes: it leaves a clean lockfile, and with
/// `--keep-run-dir` its run dir.
fn finished_run(sb: &Sandbox, app: &str, id: &str, extra: &[&str]) {
    sb.tether_run()
        .app(app)
        .run_id(id)
        .args(extra)
        .command(["true"])
        .run()
        .assert_code(0);
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// 1. dead holder

fn dead_holder_is_reaped_exactly_once(extra_env: &[(&str, &str)]) {
    let sb = Sandbox::new();
    let app = "dead.example.org";
    let id = rid(&sb, "dead");
    let log = sb.mark("teardown.log");
    let dead = make_dead_run(&sb, app, &id, &teardown_logger(&log), extra_env);
    if extra_env.is_empty() {
        assert!(dead.cgroup.is_some(), "this host gives runs a cgroup");
    }

    let f = janitor(&sb).run();
    f.assert_code(0)
        .assert_stderr_contains(&format!("tether: reaping dead run {id} of {app}"))
        .assert_stderr_contains(&format!("tether: {app}: reaped"));
    assert_eq!(count(&f, "reaped"), 1, "{f}");
    assert_eq!(count(&f, "failed"), 0, "{f}");
    assert_eq!(
        log_lines(&log),
        vec![format!("reaped {id} {app}")],
        "one teardown, TETHER_REASON=reaped, the dead run's id and app"
    );
    assert_reaped(&sb, &dead);
    assert!(!sb.lock_path(app).exists(), "the lockfile is removed");
    assert!(!pid_alive(dead.core));

    // A second sweep finds nothing to do.
    let before = snapshot(&sb.lock_dir(), &[]);
    let again = janitor(&sb).run();
    again
        .assert_code(0)
        .assert_stderr_lacks("reaping")
        .assert_stderr_lacks(&id);
    assert_eq!(count(&again, "reaped"), 0, "{again}");
    assert_eq!(count(&again, "live"), 0, "{again}");
    assert_eq!(log_lines(&log).len(), 1, "no second teardown");
    assert_eq!(snapshot(&sb.lock_dir(), &[]), before);
    assert_eq!(run_dirs(&sb.runs_dir()), Vec::<String>::new());
    sb.wait_no_leftovers(TIMEOUT);
}

/// CLI-CONTRACT §1, PROTOCOL §6, CLI-CONTRACT §15: a run whose core was SIGKILLed is reaped by the janitor exactly once —
/// leftovers killed (through its cgroup), teardown from its record with TETHER_REASON=reaped,
/// run dir, cgroup and lockfile removed — and a second sweep does nothing.
#[test]
fn dead_holder_is_reaped_exactly_once_via_cgroup() {
    dead_holder_is_reaped_exactly_once(&[]);
}

/// As above without a cgroup (`TETHER_NO_CGROUP=1`): the leftovers (a `setsid()` child and a
/// double-fork orphan among them) are found by their `TETHER_RUN_ID`/`TETHER_RUN_TOKEN` marker.
#[test]
fn dead_holder_is_reaped_exactly_once_via_env_marker() {
    dead_holder_is_reaped_exactly_once(&[("TETHER_NO_CGROUP", "1")]);
}

// ---------------------------------------------------------------------------------------------
// 2. live holder

/// CLI-CONTRACT §1, CLI-CONTRACT §15: the janitor never reaps a live run: it says `live run <id> (pid <core>),
/// leaving it`, the command keeps running, the lock stays held by the core, nothing is torn
/// down; the run then finishes normally (exit 0, one `exited` teardown).
#[test]
fn live_holder_is_never_reaped() {
    let sb = Sandbox::new();
    let app = "live.example.org";
    let id = rid(&sb, "live");
    let log = sb.mark("teardown.log");
    let release = sb.mark("release");
    let mut live = start_live_run(&sb, app, &id, &release, &teardown_logger(&log));
    let lock = sb.lock_path(app);

    for sweep in 0..3 {
        let f = janitor(&sb).run();
        f.assert_code(0)
            .assert_stderr_contains(&format!(
                "tether: {app}: live run {id} (pid {}), leaving it",
                live.core
            ))
            .assert_stderr_lacks("reaping")
            .assert_stderr_lacks("possible leaked run");
        let sum = jsum(&f);
        assert_eq!(
            (sum["live"], sum["reaped"], sum["removed"]),
            (1, 0, 0),
            "sweep {sweep}\n{f}"
        );
        assert!(
            pid_alive(live.cmd_pid),
            "sweep {sweep}: the command was killed"
        );
        assert!(live.run.is_running(), "sweep {sweep}: tether exited");
        assert!(
            holds_lock(live.core, &lock),
            "sweep {sweep}: the core no longer holds the lock: {:?}",
            lock_table(&lock)
        );
        assert!(sb.run_dir(&id).join("run.json").exists());
        assert_eq!(sb.run_record(&id).unwrap_or_default()["state"], "running");
        assert!(log_lines(&log).is_empty(), "sweep {sweep}: a teardown ran");
    }

    touch(&release);
    let f = live.run.wait_exit(TIMEOUT);
    f.assert_code(0).assert_stderr_contains("result=passed");
    assert_eq!(log_lines(&log), vec![format!("exited {id} {app}")]);
    // The lockfile stays (runs never unlink); the next sweep removes it.
    let f = janitor(&sb).run();
    f.assert_code(0);
    assert_eq!(count(&f, "removed"), 1, "{f}");
    assert!(!lock.exists());
    assert_eq!(log_lines(&log).len(), 1);
    sb.wait_no_leftovers(TIMEOUT);
}

// ---------------------------------------------------------------------------------------------
// 3. two janitors

/// CLI-CONTRACT §15 "two janitors at once are safe": started together on one dead lock whose teardown
/// is slow (it waits for a release marker), exactly one janitor runs the teardown; the other
/// finishes meanwhile having seen the lock held (live) or nothing; both exit 0. Covered for a
/// teardown from the dead run's record and for the janitor's fallback teardown (garbage
/// metadata: an unknown dead run).
#[test]
fn two_janitors_reap_a_dead_run_once() {
    for fallback in [false, true] {
        let sb = Sandbox::new();
        let app = if fallback {
            "garbage.example.org"
        } else {
            "twice.example.org"
        };
        let log = sb.mark("teardown.log");
        let started = sb.mark("teardown.started");
        let release = sb.mark("release");
        let slow = format!(
            r#"echo "begin $TETHER_REASON $TETHER_APP" >> {log}; touch {started}; {wait}; echo "end $TETHER_APP" >> {log}"#,
            log = shell_quote(&log),
            started = shell_quote(&started),
            wait = sh_wait_for(&shell_quote(&release)),
        );
        let dead = if fallback {
            fs::write(sb.lock_path(app), b"\x00{not json at all").expect("writing garbage");
            None
        } else {
            Some(make_dead_run(&sb, app, &rid(&sb, "twice"), &slow, &[]))
        };
        let jan = || {
            let mut cmd = janitor(&sb).arg("--json");
            if fallback {
                cmd = cmd.teardown(&slow);
            }
            cmd.spawn()
        };
        let mut janitors = [jan(), jan()];

        wait_file(&started, TIMEOUT);
        // One janitor is inside the slow teardown, holding the app lock; the other must finish
        // without waiting for it.
        let mut done = None;
        wait_until(
            "one janitor to finish while the other reaps",
            TIMEOUT,
            || {
                done = janitors.iter_mut().position(|j| !j.is_running());
                done.is_some()
            },
        );
        let other = done.unwrap_or_default();
        let reaper = 1 - other;
        assert!(
            janitors[reaper].is_running(),
            "both janitors finished while the teardown waits for its release"
        );
        let f_other = janitors[other].wait_exit(TIMEOUT);
        touch(&release);
        let f_reaper = janitors[reaper].wait_exit(TIMEOUT);

        f_reaper.assert_code(0);
        f_other.assert_code(0).assert_stderr_lacks("reaping");
        assert_eq!(count(&f_reaper, "reaped"), 1, "{f_reaper}");
        assert_eq!(count(&f_other, "reaped"), 0, "{f_other}");
        assert_eq!(count(&f_other, "failed"), 0, "{f_other}");
        let rep = report(&f_other);
        eprintln!(
            "fallback={fallback}: the other janitor saw {} entries (live={})",
            rep["entries"].as_array().map_or(0, Vec::len),
            rep["live"]
        );
        for e in rep["entries"].as_array().into_iter().flatten() {
            assert_eq!(
                e["action"], "live",
                "the other janitor only saw the held lock: {rep:#}"
            );
        }
        assert_eq!(
            log_lines(&log),
            vec![format!("begin reaped {app}"), format!("end {app}")],
            "fallback={fallback}: exactly one teardown overall"
        );
        if let Some(dead) = &dead {
            assert_reaped(&sb, dead);
        }
        assert!(!sb.lock_path(app).exists());
        sb.wait_no_leftovers(TIMEOUT);
    }
}

// ---------------------------------------------------------------------------------------------
// 4. unlink under a blocked waiter

/// PROTOCOL §3, CLI-CONTRACT §15, PROTOCOL.md: the janitor unlinks a free lockfile while a run is blocked on
/// it; the waiter wakes on the orphaned inode, fails its identity check, re-opens the path, and
/// there is never a second holder. Holder A and waiter B (proven blocked in the kernel) take
/// turns while a janitor sweeps in a loop; each command logs `start <id> <inode of the
/// lockfile path>` and `end <id>`. Round 0 forces the unlink deterministically (B frozen with
/// SIGSTOP, off the kernel's wait list, until the janitor has unlinked); later rounds race.
#[test]
fn waiter_on_an_unlinked_lockfile_reopens_and_never_overlaps() {
    const ROUNDS: usize = 10;
    let sb = Sandbox::new();
    let app = "unlink.example.org";
    let lock = sb.lock_path(app);
    let log = sb.mark("turns.log");
    let release = sb.mark("release");
    fs::create_dir(&release).expect("creating the release dir");
    let (log_q, lock_q) = (shell_quote(&log), shell_quote(&lock));
    let wait = sh_wait_for(&format!("{}/\"$TETHER_RUN_ID\"", shell_quote(&release)));
    let script = format!(
        r#"ino=$(stat -c %i {lock_q}) || exit 98; echo "start $TETHER_RUN_ID $ino" >> {log_q}; {wait}; echo "end $TETHER_RUN_ID" >> {log_q}"#
    );
    let run = |id: &str| {
        sb.tether_run()
            .app(app)
            .run_id(id)
            .command(["sh", "-c", &script])
            .spawn()
    };
    let start_inode = |id: &str| -> u64 {
        let line = wait_line(&log, &format!("start {id} "), TIMEOUT);
        line.rsplit(' ')
            .next()
            .and_then(|i| i.parse().ok())
            .unwrap_or_default()
    };

    let stop = AtomicBool::new(false);
    let sweeps: Mutex<Vec<Finished>> = Mutex::new(Vec::new());
    let mut order = Vec::new();
    let mut replaced = 0;
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let f = janitor(&sb).arg("--json").run();
                sweeps.lock().unwrap_or_else(|p| p.into_inner()).push(f);
            }
        });
        for k in 0..ROUNDS {
            let (a, b) = (rid(&sb, &format!("a{k}")), rid(&sb, &format!("b{k}")));
            let mut ta = run(&a);
            let ino_a = start_inode(&a);
            // Keep A's inode allocated (an open fd, no lock) for the round, so a lockfile
            // re-created after an unlink cannot get the same inode number back.
            let pin = fs::File::open(&lock).expect("opening A's lockfile");
            assert_eq!(pin.metadata().map(|m| m.ino()).ok(), Some(ino_a));
            let core_a = ta.wait_core_pid(TIMEOUT);
            let mut tb = run(&b);
            let waiters = runner_tests::wait_app_waiters(&sb, app, 1, TIMEOUT);
            let core_b = tb.wait_core_pid(TIMEOUT);
            assert_eq!(waiters, vec![core_b], "round {k}: B's core is the waiter");
            tb.wait_line("— waiting", TIMEOUT);
            assert!(holds_lock(core_a, &lock), "round {k}: A holds");

            if k == 0 {
                signal(core_b, Signal::SIGSTOP);
                wait_until("the frozen waiter to leave the wait list", TIMEOUT, || {
                    lock_table(&lock).1.is_empty()
                });
                touch(&release.join(&a));
                ta.wait_exit(TIMEOUT).assert_code(0);
                // Free now, nobody queued: the janitor loop reconciles and unlinks it.
                wait_until("the janitor to unlink the free lockfile", TIMEOUT, || {
                    !lock.exists()
                });
                signal(core_b, Signal::SIGCONT);
            } else {
                touch(&release.join(&a));
                ta.wait_exit(TIMEOUT).assert_code(0);
            }

            let ino_b = start_inode(&b);
            if k == 0 {
                assert_ne!(ino_b, ino_a, "B re-opened the path after the unlink");
            }
            if ino_b != ino_a {
                replaced += 1;
            }
            // B holds the lockfile that the path names now, and nobody else holds anything.
            assert!(
                holds_lock(core_b, &lock),
                "round {k}: B does not hold the lockfile the path names: {:?}",
                lock_table(&lock)
            );
            assert_eq!(
                fs::metadata(&lock).map(|m| m.ino()).ok(),
                Some(ino_b),
                "round {k}: the path still names B's inode"
            );
            assert_eq!(lock_table(&lock).1, Vec::<i32>::new(), "round {k}: waiters");
            touch(&release.join(&b));
            tb.wait_exit(TIMEOUT).assert_code(0);
            drop(pin);
            order.extend([
                format!("start {a}"),
                format!("end {a}"),
                format!("start {b}"),
                format!("end {b}"),
            ]);
        }
        stop.store(true, Ordering::Relaxed);
    });

    let lines: Vec<String> = log_lines(&log)
        .into_iter()
        .map(|l| {
            // Drop the inode: compare the turn order.
            match l.strip_prefix("start ") {
                Some(rest) => format!("start {}", rest.split(' ').next().unwrap_or_default()),
                None => l,
            }
        })
        .collect();
    assert_eq!(lines, order, "runs overlap or B ran before A ended");

    let sweeps = sweeps.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut removed = 0;
    for f in &sweeps {
        f.assert_code(0);
        assert_eq!(count(f, "reaped"), 0, "nothing was dead\n{f}");
        removed += count(f, "removed");
    }
    eprintln!(
        "{} janitor sweeps, {removed} lockfile removals, B re-opened a new inode in {replaced}/{ROUNDS} rounds",
        sweeps.len()
    );
    assert!(removed >= 1);
    sb.wait_no_leftovers(TIMEOUT);
}

// ---------------------------------------------------------------------------------------------
// 5. a run starting during a reap

/// PROTOCOL §3, PROTOCOL §6, CLI-CONTRACT §15: a run that starts while the janitor reaps its app waits (blocked in
/// the kernel, with its waiting line, its command not started) until the reap is over, then
/// runs and exits 0; the dead run is reaped exactly once (the new run finds nothing to reap).
#[test]
fn run_started_during_a_reap_waits_for_it() {
    let sb = Sandbox::new();
    let app = "during.example.org";
    let log = sb.mark("teardown.log");
    let started = sb.mark("teardown.started");
    let release = sb.mark("release");
    let slow = format!(
        r#"echo "$TETHER_REASON $TETHER_RUN_ID" >> {log}; touch {started}; {wait}"#,
        log = shell_quote(&log),
        started = shell_quote(&started),
        wait = sh_wait_for(&shell_quote(&release)),
    );
    let dead_id = rid(&sb, "dead");
    let dead = make_dead_run(&sb, app, &dead_id, &slow, &[]);

    let mut jan = janitor(&sb).spawn();
    wait_file(&started, TIMEOUT);
    let jan_pid = jan.pid();
    assert!(
        holds_lock(jan_pid, &sb.lock_path(app)),
        "the janitor holds the app"
    );

    let new_id = rid(&sb, "new");
    let cmd_started = sb.mark("new.started");
    let mut new = sb
        .tether_run()
        .app(app)
        .run_id(&new_id)
        .teardown(teardown_logger(&log))
        .command(["sh", "-c", &format!("touch {}", shell_quote(&cmd_started))])
        .spawn();
    // Blocked in the kernel behind the janitor's flock; under a cluster possibly in the
    // server's queue behind the janitor's cluster lock (D84).
    let waiters = runner_tests::wait_app_waiters(&sb, app, 1, TIMEOUT);
    assert_eq!(waiters, vec![new.wait_core_pid(TIMEOUT)]);
    new.wait_line("— waiting", TIMEOUT);
    assert!(
        !cmd_started.exists(),
        "the new run's command started during the reap"
    );
    assert!(jan.is_running());

    touch(&release);
    let fj = jan.wait_exit(TIMEOUT);
    fj.assert_code(0);
    assert_eq!(count(&fj, "reaped"), 1, "{fj}");
    let fnew = new.wait_exit(TIMEOUT);
    fnew.assert_code(0)
        .assert_stderr_contains("acquired after")
        .assert_stderr_lacks("reaping");
    assert!(cmd_started.exists());
    assert_eq!(
        log_lines(&log),
        vec![
            format!("reaped {dead_id}"),
            format!("exited {new_id} {app}")
        ],
        "the dead run reaped once, then the new run's own teardown"
    );
    assert_reaped(&sb, &dead);
    sb.wait_no_leftovers(TIMEOUT);
}

// ---------------------------------------------------------------------------------------------
// 6. reboot

/// CLI-CONTRACT §12, CLI-CONTRACT §15: after a "reboot" that wiped the lock dir (the lockfile and its metadata are
/// gone), the janitor still finds the dead run from its record in the runs dir and reaps it
/// once; no lockfile is left behind.
#[test]
fn dead_run_is_reaped_from_its_record_after_the_lock_dir_is_wiped() {
    let sb = Sandbox::new();
    let app = "reboot.example.org";
    let id = rid(&sb, "reboot");
    let log = sb.mark("teardown.log");
    let dead = make_dead_run(&sb, app, &id, &teardown_logger(&log), &[]);
    fs::remove_dir_all(sb.lock_dir()).expect("wiping the lock dir");

    let f = janitor(&sb).run();
    f.assert_code(0)
        .assert_stderr_contains(&format!("tether: reaping dead run {id} of {app}"));
    assert_eq!(count(&f, "reaped"), 1, "{f}");
    assert_eq!(log_lines(&log), vec![format!("reaped {id} {app}")]);
    assert_reaped(&sb, &dead);
    assert_eq!(
        names(&sb.lock_dir()),
        Vec::<String>::new(),
        "no lockfile left behind"
    );
    assert_eq!(run_dirs(&sb.runs_dir()), Vec::<String>::new());

    let again = janitor(&sb).run();
    again.assert_code(0);
    assert_eq!(count(&again, "reaped"), 0, "{again}");
    assert_eq!(log_lines(&log).len(), 1);
    sb.wait_no_leftovers(TIMEOUT);
}

// ---------------------------------------------------------------------------------------------
// 7. odd entries

/// CLI-CONTRACT §3, CLI-CONTRACT §15: odd entries never crash the janitor: a directory, a dangling symlink, a
/// symlink to a real file (never followed, never written), an invalid domain name, a FIFO
/// (never opened: no hang), a name that is no lockfile, a stray file in the runs dir — each
/// skipped with its reason; a lockfile with garbage content is an unknown dead run of the
/// domain in its name, reaped with the janitor's `--teardown` (TETHER_APP from the name).
/// Missing lock and runs dirs: exit 0, nothing to do.
#[test]
fn odd_entries_are_skipped_with_reasons() {
    let sb = Sandbox::new();
    let locks = sb.lock_dir();
    fs::create_dir(locks.join("app-x.org.lock")).expect("mkdir");
    let nowhere = sb.mark("nowhere");
    std::os::unix::fs::symlink(&nowhere, locks.join("app-y.org.lock")).expect("symlink");
    let victim = sb.mark("victim");
    fs::write(&victim, b"precious").expect("writing the victim");
    std::os::unix::fs::symlink(&victim, locks.join("app-z.org.lock")).expect("symlink");
    fs::write(locks.join("app-UPPER_bad.lock"), b"").expect("write");
    nix::unistd::mkfifo(
        &locks.join("app-f.org.lock"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .expect("mkfifo");
    fs::write(locks.join("notes.txt"), b"hello").expect("write");
    fs::write(locks.join("app-g.org.lock"), b"\x00garbage{{{ not json").expect("write");
    fs::write(sb.runs_dir().join("stray.txt"), b"stray").expect("write");
    let victim_before = snapshot(&sb.path().join("marks"), &[]);
    let log = sb.mark("teardown.log");

    let f = janitor(&sb)
        .teardown(teardown_logger(&log))
        .arg("--json")
        .timeout(Duration::from_secs(30))
        .run();
    f.assert_code(0);
    let rep = report(&f);
    let expect_skip = [
        ("app-x.org.lock", "is a directory"),
        ("app-y.org.lock", "is a symlink"),
        ("app-z.org.lock", "is a symlink"),
        ("app-UPPER_bad.lock", "not a valid app domain"),
        ("app-f.org.lock", "not a regular file"),
        ("notes.txt", "not an app lockfile"),
        ("stray.txt", "not a directory"),
    ];
    for (name, why) in expect_skip {
        let e = entry(&rep, name);
        assert_eq!(e["action"], "skipped", "{name}: {rep:#}");
        assert!(
            e["detail"].as_str().unwrap_or_default().contains(why),
            "{name}: detail should say {why:?}: {e}"
        );
        assert!(
            f.stderr.lines().any(|l| l.starts_with("tether: warning: ")
                && l.contains(": skipped — ")
                && l.contains(why)),
            "no warning line for {name}\n{f}"
        );
    }
    assert_eq!(count(&f, "skipped"), expect_skip.len(), "{f}");
    assert_eq!(entry(&rep, "app-g.org.lock")["action"], "reaped");
    assert_eq!(count(&f, "reaped"), 1, "{f}");
    assert_eq!(log_lines(&log), vec!["reaped none g.org".to_owned()]);

    // Nothing was followed or touched.
    assert!(!nowhere.exists(), "the dangling symlink was followed");
    assert_eq!(
        snapshot(&sb.path().join("marks"), &[])
            .into_iter()
            .filter(|l| !l.starts_with("teardown.log"))
            .collect::<Vec<_>>(),
        victim_before,
        "a symlink target was written"
    );
    for name in [
        "app-x.org.lock",
        "app-y.org.lock",
        "app-z.org.lock",
        "app-f.org.lock",
    ] {
        assert!(
            fs::symlink_metadata(locks.join(name)).is_ok(),
            "{name} was removed"
        );
    }
    assert!(
        !locks.join("app-g.org.lock").exists(),
        "the garbage lockfile was reaped and removed"
    );

    // A second sweep skips the same things and reaps nothing.
    let again = janitor(&sb).teardown(teardown_logger(&log)).run();
    again.assert_code(0);
    assert_eq!(count(&again, "reaped"), 0, "{again}");
    assert_eq!(log_lines(&log).len(), 1);

    // Missing dirs: nothing to do.
    let f = sb
        .tether_janitor()
        .no_sandbox_dirs()
        .arg("--lock-dir")
        .arg(sb.path().join("no-locks"))
        .arg("--runs-dir")
        .arg(sb.path().join("no-runs"))
        .run();
    f.assert_code(0);
    let sum = jsum(&f);
    assert!(sum.values().all(|&n| n == 0), "{f}");
}

// ---------------------------------------------------------------------------------------------
// 8. failing teardown

/// CLI-CONTRACT §15: a dead run whose teardown fails makes the janitor exit 1; its run dir stays
/// (state not clean, `reap_failures` counted in run.json) and its lockfile stays; the next
/// sweep, with the teardown now succeeding, reaps it once and exits 0.
#[test]
fn failed_reap_exits_1_and_the_next_sweep_retries() {
    let sb = Sandbox::new();
    let app = "fail.example.org";
    let id = rid(&sb, "fail");
    let log = sb.mark("teardown.log");
    let attempts = sb.mark("attempts.log");
    let ok = sb.mark("teardown.ok");
    let teardown = format!(
        r#"echo "attempt $TETHER_REASON $TETHER_RUN_ID" >> {att}; if [ -e {ok} ]; then echo "$TETHER_REASON $TETHER_RUN_ID" >> {log}; else exit 3; fi"#,
        att = shell_quote(&attempts),
        ok = shell_quote(&ok),
        log = shell_quote(&log)
    );
    let dead = make_dead_run(&sb, app, &id, &teardown, &[]);

    let f = janitor(&sb).arg("--json").run();
    f.assert_code(1).assert_stderr_contains("failed");
    assert_eq!(count(&f, "failed"), 1, "{f}");
    assert_eq!(count(&f, "reaped"), 0, "{f}");
    let rep = report(&f);
    assert_eq!(rep["failed"], 1);
    assert!(!log_lines(&attempts).is_empty(), "the teardown was tried");
    assert!(log_lines(&log).is_empty());
    let rec = sb.run_record(&id).expect("the run dir and its record stay");
    assert_ne!(rec["state"], "clean", "{rec:#}");
    // Checked last, so the retry below is exercised either way.
    let counted = rec["reap_failures"].clone();
    assert!(
        sb.lock_path(app).exists(),
        "the lockfile stays for the next sweep"
    );
    for &p in &dead.leftovers {
        assert!(
            !pid_alive(p),
            "leftovers are killed before the teardown runs"
        );
    }

    touch(&ok);
    let f = janitor(&sb).run();
    f.assert_code(0);
    assert_eq!(count(&f, "reaped"), 1, "{f}");
    assert_eq!(count(&f, "failed"), 0, "{f}");
    assert_eq!(log_lines(&log), vec![format!("reaped {id}")]);
    assert_reaped(&sb, &dead);
    assert!(!sb.lock_path(app).exists());
    let again = janitor(&sb).run();
    again.assert_code(0);
    assert_eq!(count(&again, "reaped"), 0);
    sb.wait_no_leftovers(TIMEOUT);
    assert_eq!(
        counted, 1,
        "the failed reap is counted in run.json (reap_failures) after the failed sweep: {rec:#}"
    );
}

// ---------------------------------------------------------------------------------------------
// 9. leaked run

/// CLI-CONTRACT §15: a holder held longer than 2 × (deadline + grace + teardown timeout) of its own
/// record is reported as a `possible leaked run` — and still left alone (it is live).
#[test]
fn long_held_lock_is_reported_as_possible_leak_and_left_alone() {
    let sb = Sandbox::new();
    let app = "leak.example.org";
    let id = rid(&sb, "leak");
    let dir = sb.run_dir(&id);
    fs::create_dir(&dir).expect("mkdir run dir");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
    let started_at = unix_now() - 3600;
    let meta = json!({
        "version": 1, "app": app, "run_id": id, "pid": std::process::id(), "pid_start": 1,
        "host": "test", "started_at": started_at, "state": "running",
        "run_dir": dir.to_string_lossy(), "cgroup": null, "ci": null, "token": null,
    });
    let mut record = meta.clone();
    for (k, v) in [
        ("command", json!(["sleep", "1"])),
        (
            "teardown",
            json!(format!("touch {}", shell_quote(sb.mark("teardown.ran")))),
        ),
        ("deadline_ms", json!(1000)),
        ("grace_ms", json!(0)),
        ("teardown_timeout_ms", json!(0)),
        ("reap_failures", json!(0)),
    ] {
        record[k] = v;
    }
    fs::write(
        dir.join("run.json"),
        serde_json::to_vec_pretty(&record).unwrap_or_default(),
    )
    .expect("writing run.json");
    let run_lock_holder = start_lock_holder(&sb, dir.join("run.lock"));
    let holder = sb.fresh_mark("holder.ready");
    let mut cmd = std::process::Command::new(helper_bin("lock-holder"));
    cmd.arg("--path")
        .arg(sb.lock_path(app))
        .arg("--ready")
        .arg(&holder)
        .arg("--content")
        .arg(meta.to_string());
    let app_holder = runner_tests::KillOnDrop::spawn(&mut cmd);
    wait_file(&holder, TIMEOUT);

    let f = janitor(&sb).arg("--json").run();
    f.assert_code(0);
    let line = f
        .stderr_lines(&format!(
            "tether: {app}: live run {id} (pid {}), leaving it",
            std::process::id()
        ))
        .first()
        .map(|l| l.to_string())
        .unwrap_or_else(|| panic!("no live line\n{f}"));
    assert!(line.contains("possible leaked run"), "{line}");
    assert_eq!(count(&f, "reaped"), 0, "{f}");
    assert_eq!(count(&f, "live"), 1, "{f}");
    assert!(entry(&report(&f), &format!("app-{app}.lock"))["detail"]
        .as_str()
        .unwrap_or_default()
        .contains("possible leaked run"));
    assert!(
        holds_lock(app_holder.pid(), &sb.lock_path(app)),
        "still held"
    );
    assert!(dir.join("run.json").exists());
    assert!(!sb.mark("teardown.ran").exists(), "nothing was torn down");
    drop(run_lock_holder);
    drop(app_holder);
}

// ---------------------------------------------------------------------------------------------
// 10. dry run

/// CLI-CONTRACT §15 `--dry-run`: with a dead run, a live run and a clean unheld lockfile present, it
/// says would-reap / live / would-remove and changes nothing — every file byte-identical (same
/// inodes and mtimes), leftovers alive, no teardown; a real sweep then does what it said.
#[test]
fn dry_run_changes_nothing() {
    let sb = Sandbox::new();
    let log = sb.mark("teardown.log");
    let td = teardown_logger(&log);
    let (dead_app, live_app, clean_app) = ("d.example.org", "l.example.org", "c.example.org");
    let dead_id = rid(&sb, "dead");
    let live_id = rid(&sb, "live");
    let dead = make_dead_run(&sb, dead_app, &dead_id, &td, &[]);
    let clean = sb
        .tether_run()
        .app(clean_app)
        .run_id(rid(&sb, "clean"))
        .command(["true"])
        .run();
    clean.assert_code(0);
    assert!(sb.lock_path(clean_app).exists());
    let release = sb.mark("release");
    let mut live = start_live_run(&sb, live_app, &live_id, &release, &td);

    let before = (snapshot(&sb.lock_dir(), &[]), snapshot(&sb.runs_dir(), &[]));
    let f = janitor(&sb).args(["--dry-run", "--json"]).run();
    f.assert_code(0);
    let rep = report(&f);
    assert_eq!(rep["dry_run"], true);
    let e = entry(&rep, &format!("app-{dead_app}.lock"));
    assert_eq!(
        (&e["action"], &e["run_id"]),
        (&json!("would-reap"), &json!(dead_id))
    );
    let e = entry(&rep, &format!("app-{clean_app}.lock"));
    assert_eq!(e["action"], "would-remove");
    let e = entry(&rep, &format!("app-{live_app}.lock"));
    assert_eq!(
        (&e["action"], &e["pid"]),
        (&json!("live"), &json!(live.core))
    );
    // The dead run is listed once, by its lockfile: its run dir goes with it. The live run's
    // dir is not a candidate.
    for unlisted in [&dead_id, &live_id] {
        assert!(
            rep["entries"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|e| e["name"] != unlisted.as_str()),
            "{unlisted} is listed: {rep:#}"
        );
    }
    f.assert_stderr_lacks("reaping dead run");
    assert_eq!(
        (snapshot(&sb.lock_dir(), &[]), snapshot(&sb.runs_dir(), &[])),
        before,
        "dry run wrote"
    );
    assert!(log_lines(&log).is_empty(), "dry run ran a teardown");
    for &p in &dead.leftovers {
        assert!(pid_alive(p), "dry run killed leftover {p}");
    }
    assert!(pid_alive(live.cmd_pid) && live.run.is_running());

    let f = janitor(&sb).arg("--json").run();
    f.assert_code(0);
    let rep = report(&f);
    assert_eq!(
        entry(&rep, &format!("app-{dead_app}.lock"))["action"],
        "reaped"
    );
    assert_eq!(
        entry(&rep, &format!("app-{clean_app}.lock"))["action"],
        "removed"
    );
    assert_eq!(
        entry(&rep, &format!("app-{live_app}.lock"))["action"],
        "live"
    );
    assert_eq!(
        log_lines(&log),
        vec![format!("reaped {dead_id} {dead_app}")]
    );
    assert_reaped(&sb, &dead);
    assert!(!sb.lock_path(clean_app).exists() && !sb.lock_path(dead_app).exists());
    assert!(pid_alive(live.cmd_pid));
    touch(&release);
    live.run.wait_exit(TIMEOUT).assert_code(0);
    sb.wait_no_leftovers(TIMEOUT);
}

/// The (kind, name, action) of every entry of a `--json` report, a dry run's `would-X` said as
/// the sweep's `X`, host-wide cgroups of other tests left out; sorted.
fn planned_actions(f: &Finished, sb: &Sandbox) -> Vec<(String, String, String)> {
    let mut out: Vec<(String, String, String)> = report(f)["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            e["kind"] != "cgroup" || e["name"].as_str().unwrap_or_default().contains(&suffix(sb))
        })
        .map(|e| {
            let action = match e["action"].as_str().unwrap_or_default() {
                "would-reap" => "reaped",
                "would-remove" => "removed",
                other => other,
            };
            let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
            (s(&e["kind"]), s(&e["name"]), action.to_owned())
        })
        .collect();
    out.sort();
    out
}

/// Issue 18: `--dry-run` and the real sweep are one plan. A fixture with an item of each kind —
/// a dead run with leftovers (listed once, by its lockfile: its run dir goes with it), a dead
/// run whose lockfile a reboot wiped (found by its run dir), a `--keep-run-dir` run dir within
/// its 24 h retention and one past it, the run dir of a run that died after its teardown, a run
/// dir without a record, a retired run dir, a stale (clean, unheld) lockfile, a live run, and an
/// orphan cgroup where cgroups are writable — is swept with `--dry-run`, then for real: the
/// (action, item) pairs are the same (`would-X` ↔ `X`), no item is listed twice in either, the
/// counts agree, and each item got the action its case names.
#[test]
fn dry_run_and_sweep_are_one_plan() {
    let sb = Sandbox::new();
    let log = sb.mark("teardown.log");
    let td = teardown_logger(&log);
    let dead = make_dead_run(&sb, "dead.example.org", &rid(&sb, "dead"), &td, &[]);
    let wiped = make_dead_run(&sb, "wiped.example.org", &rid(&sb, "wiped"), &td, &[]);
    fs::remove_file(sb.lock_path("wiped.example.org")).expect("wiping a lockfile");
    let kept = |name: &str| {
        let id = rid(&sb, name);
        finished_run(&sb, "kept.example.org", &id, &["--keep-run-dir"]);
        id
    };
    let (young, old, after) = (kept("young"), kept("old"), kept("after"));
    backdate(&sb.run_dir(&old).join("run.json"), 25 * 3600);
    // A clean record that was not kept: its run died after its teardown.
    let mut rec = sb.run_record(&after).expect("the kept record");
    rec["keep"] = json!(false);
    fs::write(
        sb.run_dir(&after).join("run.json"),
        serde_json::to_vec(&rec).unwrap_or_default(),
    )
    .expect("rewriting run.json");
    let bare = rid(&sb, "bare");
    let retired = format!(".retired-{}-1", rid(&sb, "gone"));
    for name in [&bare, &retired] {
        fs::create_dir(sb.runs_dir().join(name)).expect("mkdir");
        fs::set_permissions(sb.runs_dir().join(name), fs::Permissions::from_mode(0o700))
            .expect("chmod");
        fs::write(sb.runs_dir().join(name).join("run.lock"), b"").expect("run.lock");
    }
    finished_run(&sb, "clean.example.org", &rid(&sb, "clean"), &[]);
    let release = sb.mark("release");
    let mut live = start_live_run(&sb, "live.example.org", &rid(&sb, "live"), &release, &td);
    // An orphan cgroup: its run's state is gone. Aged past this test's --orphan-age, which is
    // below the fixture's (so no other test's janitor sweeps it meanwhile).
    let orphan = if runner_tests::cgroup2_writable() {
        let o = make_dead_run(&sb, "orphan.example.org", &rid(&sb, "orphan"), &td, &[]);
        fs::remove_dir_all(sb.run_dir(&o.id)).expect("removing the orphan's run dir");
        fs::remove_file(sb.lock_path("orphan.example.org")).expect("removing its lockfile");
        let cg = o.cgroup.clone().expect("a run cgroup");
        backdate(&cg, 500 * 3600);
        Some((o, cg))
    } else {
        eprintln!("no writable cgroup2: the orphan cgroup case is left out");
        None
    };

    let sweep = |dry: bool| {
        let cmd = janitor(&sb).args(["--json", "--orphan-age", "400h"]);
        let f = if dry { cmd.arg("--dry-run") } else { cmd }.run();
        f.assert_code(0);
        f
    };
    let before = (snapshot(&sb.lock_dir(), &[]), snapshot(&sb.runs_dir(), &[]));
    let dry = sweep(true);
    assert_eq!(
        (snapshot(&sb.lock_dir(), &[]), snapshot(&sb.runs_dir(), &[])),
        before,
        "the dry run wrote"
    );
    let real = sweep(false);
    let (planned, done) = (planned_actions(&dry, &sb), planned_actions(&real, &sb));
    for (what, list) in [("dry run", &planned), ("sweep", &done)] {
        let mut items: Vec<_> = list.iter().map(|(k, n, _)| (k, n)).collect();
        items.dedup();
        assert_eq!(
            items.len(),
            list.len(),
            "the {what} lists an item twice: {list:#?}"
        );
    }
    assert_eq!(
        planned, done,
        "the dry run said other than the sweep did
{dry}
{real}"
    );
    let (mut sum_dry, sum_real) = (jsum(&dry), jsum(&real));
    sum_dry.remove("(dry");
    assert_eq!(
        sum_dry, sum_real,
        "counts
{dry}
{real}"
    );

    let action = |kind: &str, name: &str| {
        done.iter()
            .find(|(k, n, _)| k == kind && n == name)
            .map(|(_, _, a)| a.clone())
            .unwrap_or_else(|| panic!("no {kind} entry {name:?}: {done:#?}"))
    };
    assert_eq!(action("lockfile", "app-dead.example.org.lock"), "reaped");
    assert!(
        done.iter().all(|(_, n, _)| *n != dead.id),
        "the dead run is listed besides its lockfile: {done:#?}"
    );
    assert_eq!(action("run-dir", &wiped.id), "reaped");
    assert_eq!(action("run-dir", &young), "kept");
    assert_eq!(action("run-dir", &old), "removed");
    assert_eq!(action("run-dir", &after), "removed");
    assert_eq!(action("run-dir", &bare), "removed");
    assert_eq!(action("run-dir", &retired), "removed");
    assert_eq!(action("lockfile", "app-clean.example.org.lock"), "removed");
    assert_eq!(action("lockfile", "app-kept.example.org.lock"), "removed");
    assert_eq!(action("lockfile", "app-live.example.org.lock"), "live");
    // The young kept dir's entry says when it goes.
    let young_entry = entry(&report(&dry), &young).clone();
    assert!(
        young_entry["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("--keep-run-dir"),
        "{young_entry}"
    );

    // And the sweep did it.
    assert_reaped(&sb, &dead);
    assert_reaped(&sb, &wiped);
    let mut reaps = log_lines(&log);
    reaps.sort();
    let mut want = vec![
        format!("reaped {} dead.example.org", dead.id),
        format!("reaped {} wiped.example.org", wiped.id),
    ];
    want.sort();
    assert_eq!(reaps, want, "one teardown per dead run");
    assert!(sb.run_dir(&young).exists(), "the young kept dir went");
    for gone in [&old, &after, &bare, &retired] {
        assert!(!sb.runs_dir().join(gone).exists(), "{gone} stays");
    }
    if let Some((o, cg)) = &orphan {
        let name = cg
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        assert_eq!(action("cgroup", &name), "removed");
        assert!(!cg.exists(), "the orphan cgroup stays");
        assert!(
            poll_all_gone(&o.leftovers, TIMEOUT),
            "the orphan's processes live"
        );
    }
    touch(&release);
    live.run.wait_exit(TIMEOUT).assert_code(0);
    sb.wait_no_leftovers(TIMEOUT);
}

// ---------------------------------------------------------------------------------------------
// 11. --app

/// CLI-CONTRACT §15 `--app DOMAIN`: only that app is swept; another app's dead run, leftovers,
/// lockfile and run dir stay untouched until a full sweep.
#[test]
fn app_flag_sweeps_only_that_app() {
    let sb = Sandbox::new();
    let log = sb.mark("teardown.log");
    let td = teardown_logger(&log);
    let (one, two) = ("one.example.org", "two.example.org");
    let (id1, id2) = (rid(&sb, "one"), rid(&sb, "two"));
    let d1 = make_dead_run(&sb, one, &id1, &td, &[]);
    let d2 = make_dead_run(&sb, two, &id2, &td, &[]);

    let f = janitor(&sb).args(["--app", one, "--json"]).run();
    f.assert_code(0)
        .assert_stderr_lacks(two)
        .assert_stderr_lacks(&id2);
    assert_eq!(count(&f, "reaped"), 1, "{f}");
    for e in report(&f)["entries"].as_array().into_iter().flatten() {
        assert_eq!(e["app"], one, "an entry of another app: {e}");
    }
    assert_eq!(log_lines(&log), vec![format!("reaped {id1} {one}")]);
    assert_reaped(&sb, &d1);
    assert!(sb.lock_path(two).exists() && sb.run_dir(&id2).exists());
    for &p in &d2.leftovers {
        assert!(pid_alive(p), "leftover {p} of the other app was killed");
    }

    let f = janitor(&sb).run();
    f.assert_code(0);
    assert_eq!(count(&f, "reaped"), 1, "{f}");
    assert_eq!(log_lines(&log).len(), 2);
    assert_eq!(log_lines(&log)[1], format!("reaped {id2} {two}"));
    assert_reaped(&sb, &d2);
    sb.wait_no_leftovers(TIMEOUT);
}

/// CLI-CONTRACT §3, CLI-CONTRACT §19: the janitor refuses (exit 125, nothing touched) an invalid `--app` and unsafe
/// dirs (a symlinked lock dir, a world-writable runs dir).
#[test]
fn janitor_refuses_bad_app_and_unsafe_dirs() {
    let sb = Sandbox::new();
    let log = sb.mark("teardown.log");
    let dead = make_dead_run(
        &sb,
        "safe.example.org",
        &rid(&sb, "safe"),
        &teardown_logger(&log),
        &[],
    );
    for bad in ["../x", "a..b", "", "a/b"] {
        let f = janitor(&sb).args(["--app", bad]).run();
        f.assert_code(125);
    }
    let link = sb.path().join("locks-link");
    std::os::unix::fs::symlink(sb.lock_dir(), &link).expect("symlink");
    let f = sb
        .tether_janitor()
        .no_sandbox_dirs()
        .arg("--lock-dir")
        .arg(&link)
        .arg("--runs-dir")
        .arg(sb.runs_dir())
        .run();
    f.assert_code(125);
    let open = sb.path().join("open-runs");
    fs::create_dir(&open).expect("mkdir");
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).expect("chmod");
    let f = sb
        .tether_janitor()
        .no_sandbox_dirs()
        .arg("--lock-dir")
        .arg(sb.lock_dir())
        .arg("--runs-dir")
        .arg(&open)
        .run();
    f.assert_code(125);
    assert!(log_lines(&log).is_empty(), "a refused janitor reaped");
    for &p in &dead.leftovers {
        assert!(pid_alive(p));
    }
    janitor(&sb).run().assert_code(0);
    assert_reaped(&sb, &dead);
}

// ---------------------------------------------------------------------------------------------
// 12. --json snapshot

/// CLI-CONTRACT §15 `--json`: the report's structure is stable (insta snapshot; pids redacted, the
/// sandbox's unique run-id suffix normalized).
#[test]
fn json_report_snapshot() {
    let sb = Sandbox::new();
    let log = sb.mark("teardown.log");
    let td = teardown_logger(&log);
    let dead = make_dead_run(&sb, "dead.example.org", &rid(&sb, "dead"), &td, &[]);
    finished_run(&sb, "clean.example.org", &rid(&sb, "clean"), &[]);
    let release = sb.mark("release");
    let mut live = start_live_run(&sb, "live.example.org", &rid(&sb, "live"), &release, &td);
    fs::create_dir(sb.lock_dir().join("app-dir.example.org.lock")).expect("mkdir");
    fs::write(sb.runs_dir().join("stray"), b"").expect("write");

    let f = janitor(&sb).arg("--json").run();
    f.assert_code(0);
    let text = f.stdout.replace(&format!("-{}", suffix(&sb)), "-SFX");
    let rep: Value = serde_json::from_str(&text).expect("JSON report");
    insta::assert_json_snapshot!("janitor_json_report", rep, {
        ".entries[].pid" => insta::dynamic_redaction(|value, _path| {
            if value.as_i64().is_some() || value.as_u64().is_some() {
                "[pid]".into()
            } else {
                value
            }
        }),
    });
    assert_reaped(&sb, &dead);
    touch(&release);
    live.run.wait_exit(TIMEOUT).assert_code(0);
}

// ---------------------------------------------------------------------------------------------
// 13. status

/// CLI-CONTRACT §16: `tether status --json` shows the kernel's view — an app held by the holder's core
/// (pid from /proc/locks) with its run id, 2 waiters and state running; the waiters' run dirs
/// live and queued (and in the app's queue, PROTOCOL §15); a dead unclean run dir; a kept
/// (`--keep-run-dir`) run dir. It takes no lock and writes nothing: the waiters stay blocked,
/// the lock table, the queue and the files are unchanged.
#[test]
fn status_shows_holders_waiters_and_run_dirs_without_touching_them() {
    let sb = Sandbox::new();
    let app = "status.example.org";
    let lock = sb.lock_path(app);
    let release = sb.mark("release");
    let hid = rid(&sb, "holder");
    let mut holder = start_live_run(&sb, app, &hid, &release, "true");
    let (w1, w2) = (rid(&sb, "w1"), rid(&sb, "w2"));
    let mut waiters: Vec<RunningTether> = [&w1, &w2]
        .iter()
        .map(|id| {
            sb.tether_run()
                .app(app)
                .run_id(id)
                .command(["true"])
                .spawn()
        })
        .collect();
    // Both queue (PROTOCOL §15); the head alone waits on the app lock itself. Under a cluster
    // both wait in the server's queue (D84) and nothing waits in the host's lock table.
    let queue = runner_tests::wait_app_queue(&sb, app, 2, TIMEOUT);
    let cluster = sb.cluster().is_some();
    let waiting = if cluster {
        Vec::new()
    } else {
        wait_waiters(&lock, 1)
    };
    let dead_id = rid(&sb, "dead");
    let dead = make_dead_run(&sb, "other.example.org", &dead_id, "true", &[]);
    let kept_id = rid(&sb, "kept");
    sb.tether_run()
        .app("kept.example.org")
        .run_id(&kept_id)
        .arg("--keep-run-dir")
        .command(["true"])
        .run()
        .assert_code(0);

    let files_before = (snapshot(&sb.lock_dir(), &[]), snapshot(&sb.runs_dir(), &[]));
    let table = |path: &Path| lock_table(path);
    let locks_before = table(&lock);
    let queue_before = runner_tests::queue_tickets(sb.lock_dir(), app);
    let app_queue = || runner_tests::app_queue(&sb, app);
    assert_eq!(app_queue(), queue, "the queue before status");
    let f = sb.tether_status().arg("--json").run();
    f.assert_code(0);
    let st: Value = serde_json::from_str(&f.stdout).unwrap_or_else(|e| panic!("{e}\n{f}"));
    // Nothing moved.
    assert_eq!(table(&lock), locks_before, "status changed the lock table");
    assert_eq!(
        runner_tests::queue_tickets(sb.lock_dir(), app),
        queue_before,
        "status changed the queue"
    );
    assert_eq!(app_queue(), queue, "status changed the queue");
    assert_eq!(locks_before, (vec![holder.core], waiting.clone()));
    assert_eq!(
        (snapshot(&sb.lock_dir(), &[]), snapshot(&sb.runs_dir(), &[])),
        files_before,
        "status wrote"
    );
    for w in &mut waiters {
        assert!(w.is_running(), "a waiter finished while the holder holds");
    }

    let app_entry = st["apps"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["app"] == app))
        .unwrap_or_else(|| panic!("no app entry for {app}: {st:#}"));
    assert_eq!(app_entry["held"], true, "{st:#}");
    assert_eq!(
        app_entry["pid"], holder.core,
        "holder pid from /proc/locks: {st:#}"
    );
    assert_eq!(app_entry["run_id"], hid.as_str());
    // One host: the waiters in the host's queue. Under a cluster: in the server's, which
    // status shows in its `cluster` section (CLI-CONTRACT §27).
    let queued_in = if cluster {
        let entry = st["cluster"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["app"] == app))
            .unwrap_or_else(|| panic!("no cluster entry for {app}: {st:#}"));
        assert_eq!(entry["holder"]["run_id"], hid.as_str(), "{st:#}");
        &entry["waiters"]
    } else {
        assert_eq!(app_entry["waiters"], 2);
        &app_entry["queue"]
    };
    let mut queued: Vec<&str> = queued_in
        .as_array()
        .map(|q| q.iter().filter_map(|w| w["run_id"].as_str()).collect())
        .unwrap_or_default();
    queued.sort_unstable();
    let mut expected = vec![w1.as_str(), w2.as_str()];
    expected.sort_unstable();
    assert_eq!(queued, expected, "{st:#}");
    assert_eq!(app_entry["state"], "running");
    assert!(app_entry["age_s"].as_u64().is_some(), "{st:#}");
    let other = st["apps"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["app"] == "other.example.org"))
        .unwrap_or_else(|| panic!("no app entry for the dead run's app: {st:#}"));
    // The dead run's app: free in the kernel, its metadata still `running` — a dead holder.
    assert_eq!(
        (
            &other["held"],
            &other["waiters"],
            &other["status"],
            &other["reap_pending"]
        ),
        (&json!(false), &json!(0), &json!("dead"), &json!(true)),
        "{st:#}"
    );
    assert_eq!(app_entry["status"], "held", "{st:#}");

    let run = |id: &str| -> Value {
        st["runs"]
            .as_array()
            .and_then(|r| r.iter().find(|e| e["run_id"] == id))
            .cloned()
            .unwrap_or_else(|| panic!("no run entry for {id}: {st:#}"))
    };
    assert_eq!(run(&hid)["status"], "live");
    assert_eq!(run(&hid)["state"], "running");
    assert_eq!(run(&hid)["pid"], holder.core);
    for id in [&w1, &w2] {
        let r = run(id);
        assert_eq!(
            (&r["status"], &r["state"]),
            (&json!("live"), &json!("queued")),
            "{r}"
        );
        // Its core: the pid that holds its ticket in the queue (under a cluster: whose session
        // waits in the server's queue).
        let pid = r["pid"].as_i64().unwrap_or_default() as i32;
        assert!(queue.contains(&pid), "{r} {queue:?}");
    }
    assert_eq!(run(&dead_id)["status"], "dead-unclean");
    assert_eq!(run(&kept_id)["status"], "kept");

    // The text form says the same.
    let text = sb.tether_status().run();
    text.assert_code(0);
    let row = |name: &str| -> Vec<String> {
        text.stdout
            .lines()
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .find(|cells| cells.first().map(String::as_str) == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}\n{text}"))
    };
    // APP LOCK RUN PID WAITERS AGE RECORD [NOTE]
    let held = row(app);
    let waiters_cell = if cluster { "0" } else { "2" };
    assert_eq!(
        (&held[1][..], &held[2], &held[3], &held[4][..]),
        ("held", &hid, &holder.core.to_string(), waiters_cell),
        "{text}"
    );
    let dead_row = row("other.example.org");
    assert_eq!(&dead_row[1], "dead", "{text}");
    assert!(dead_row.join(" ").contains("reap pending"), "{text}");
    assert_eq!(table(&lock), locks_before);

    touch(&release);
    holder.run.wait_exit(TIMEOUT).assert_code(0);
    for w in &mut waiters {
        w.wait_exit(TIMEOUT).assert_code(0);
    }
    let f = janitor(&sb).run();
    f.assert_code(0);
    assert_reaped(&sb, &dead);
    sb.wait_no_leftovers(TIMEOUT);
}

// ---------------------------------------------------------------------------------------------
// reaped at most once, when a dead run's lock is busy for a moment

/// CLI-CONTRACT §5 step 3, PROTOCOL §6 "a dead run is reaped at most once": a run re-using a dead run's id holds
/// the dead run's `run.lock` from its claim until it has reaped it under the app lock. A
/// janitor sweeping in that window (here: the re-using run paused right after its claim) must
/// not make it two reaps: exactly one `reaped` teardown overall.
#[test]
fn dead_run_whose_id_is_being_reused_is_reaped_once() {
    let sb = Sandbox::new();
    let app = "reuse.example.org";
    let id = rid(&sb, "reuse");
    let log = sb.mark("teardown.log");
    let td = teardown_logger(&log);
    let dead = make_dead_run(&sb, app, &id, &td, &[]);

    let gate = sb.mark("claim.gate");
    let mut again = sb
        .tether_run()
        .app(app)
        .run_id(&id)
        .teardown(&td)
        .env("TETHER_FAULT_PAUSE_AFTER_CLAIM", &gate)
        .command(["true"])
        .spawn();
    wait_file(sb.mark("claim.gate.waiting"), TIMEOUT);

    let f = janitor(&sb).run();
    f.assert_code(0);
    touch(&gate);
    again.wait_exit(TIMEOUT).assert_code(0);
    let reaps = log_lines(&log)
        .into_iter()
        .filter(|l| l.starts_with("reaped "))
        .count();
    assert_eq!(
        reaps,
        1,
        "the dead run's teardown ran {reaps} times with TETHER_REASON=reaped\nteardown log: {:?}\n\
         janitor:\n{f}",
        log_lines(&log)
    );
    assert_reaped(&sb, &dead);
    sb.wait_no_leftovers(TIMEOUT);
}

/// PROTOCOL §6, CLI-CONTRACT §15: a dead run's `run.lock` can be busy for a moment while its app lock is free
/// (another janitor probing run dirs). A reaper that finds it so must not run the teardown
/// without also settling the record, or the next sweep reaps the same run again. Here the
/// probe is held by the test during one sweep; after two sweeps the teardown ran once.
#[test]
fn dead_run_is_reaped_once_when_its_run_lock_is_probed_meanwhile() {
    let sb = Sandbox::new();
    let app = "probe.example.org";
    let id = rid(&sb, "probe");
    let log = sb.mark("teardown.log");
    let dead = make_dead_run(&sb, app, &id, &teardown_logger(&log), &[]);

    let probe = runner_tests::hold_lock(sb.run_dir(&id).join("run.lock"));
    let first = janitor(&sb).run();
    drop(probe);
    let second = janitor(&sb).run();
    let third = janitor(&sb).run();
    let reaps = log_lines(&log).len();
    assert_eq!(
        reaps,
        1,
        "teardown ran {reaps} times: {:?}\n--- first sweep ---\n{first}\n--- second sweep ---\n{second}",
        log_lines(&log)
    );
    for f in [&first, &second, &third] {
        f.assert_code(0);
    }
    assert_eq!(count(&third, "reaped"), 0, "{third}");
    assert_reaped(&sb, &dead);
    sb.wait_no_leftovers(TIMEOUT);
}

// ---------------------------------------------------------------------------------------------
// a sweep during a claim

/// CLI-CONTRACT §1, CLI-CONTRACT §5 step 3, CLI-CONTRACT §15: a janitor never disturbs a starting run. Runs are started back
/// to back (distinct ids, a few apps) while janitors sweep in a tight loop; the window where a
/// run has created its run dir but not yet locked its `run.lock` is hit by chance, so this is
/// a stress test: every run must pass (never `run id … is in use by pid <a janitor>`, exit 125)
/// and the janitors must never remove a live run's dir.
#[test]
fn sweeping_janitors_never_fail_starting_runs() {
    const RUNS: usize = 500;
    let sb = Sandbox::new();
    let stop = AtomicBool::new(false);
    let removed_dirs = Mutex::new(Vec::<String>::new());
    let mut failures = Vec::new();
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        for _ in 0..2 {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let f = janitor(&sb).run();
                    for l in f.stderr.lines() {
                        if l.contains(": removed — no run record") {
                            removed_dirs
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(l.to_owned());
                        }
                    }
                }
            });
        }
        let mut active: Vec<RunningTether> = Vec::new();
        for n in 0..RUNS {
            active.push(
                sb.tether_run()
                    .app(format!("claim{}.example.org", n % 4))
                    .run_id(rid(&sb, &format!("c{n}")))
                    .command(["true"])
                    .spawn(),
            );
            if active.len() >= 6 {
                let f = active.remove(0).wait_exit(TIMEOUT);
                if f.code != Some(0) {
                    failures.push(f);
                }
            }
        }
        for mut t in active {
            let f = t.wait_exit(TIMEOUT);
            if f.code != Some(0) {
                failures.push(f);
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    let removed = removed_dirs.into_inner().unwrap_or_else(|p| p.into_inner());
    assert!(
        failures.is_empty(),
        "{} of {RUNS} runs failed while janitors swept; janitors removed run dirs without a \
         record: {removed:#?}\nfirst failure:\n{}",
        failures.len(),
        failures[0]
    );
    sb.wait_no_leftovers(TIMEOUT);
}
