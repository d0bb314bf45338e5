//! Exactly once, really (issue 14): the teardown never runs twice even when the core dies right
//! after it; odd state (a FIFO, `/dev/zero`, an 8 GiB file where a record should be) never
//! hangs anything; a dead run whose state was lost (a power loss, a wiped dir) is still found
//! by what it left; the janitor's lines say what happened; and a reap that can never succeed
//! has a way out (`tether forget`).
//!
//! Dead runs are made the way the world makes them: a real `tether run` whose core is
//! SIGKILLed. A leftover is a background process of the command or teardown; with a cgroup it
//! stays in the run's cgroup, without one (`TETHER_NO_CGROUP=1`) it carries the run's token.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use runner_tests::{
    backdate, cgroup2_writable, helper_bin, log_lines, pid_alive, poll_pid_gone, rid, sh_wait_for,
    shell_quote, touch, wait_file, wait_holder_pid, wait_pids, Sandbox, TetherCmd, TIMEOUT,
};

/// `echo "$TETHER_REASON $TETHER_RUN_ID ${TETHER_APP-none}" >> log`.
fn logger(log: &Path) -> String {
    format!(
        r#"echo "$TETHER_REASON ${{TETHER_RUN_ID-none}} ${{TETHER_APP-none}}" >> {}"#,
        shell_quote(log)
    )
}

fn sigkill(pid: i32) {
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap_or_else(|e| panic!("kill {pid}: {e}"));
}

fn run_cmd<'a>(sb: &'a Sandbox, app: &str, id: &str, cgroup: bool) -> TetherCmd<'a> {
    let cmd = sb.tether_run().app(app).run_id(id).args(["--grace", "1s"]);
    if cgroup {
        cmd
    } else {
        cmd.env("TETHER_NO_CGROUP", "1")
    }
}

/// The janitor with a short grace (the fixture keeps other tests' orphan cgroups out of its
/// reach: `FIXTURE_ORPHAN_AGE`).
fn janitor(sb: &Sandbox) -> TetherCmd<'_> {
    sb.tether_janitor().args(["--grace", "1s"])
}

// ---------------------------------------------------------------------------------------------
// 1. the double teardown

/// A teardown that logs, then leaves a TERM-ignoring process behind (it writes `bg` once it
/// runs, and the teardown exits only after that).
fn teardown_leaving_a_leftover(log: &Path, bg: &Path) -> String {
    format!(
        "{}; {} --ready {} & {}",
        logger(log),
        shell_quote(helper_bin!("ignore-term")),
        shell_quote(bg),
        sh_wait_for(&shell_quote(bg))
    )
}

/// Item 1: the core is SIGKILLed after its teardown command exited 0, while it is still
/// killing what the teardown left (a TERM-ignoring background process holds that window open
/// for the 2 s grace). The record already says `clean`: the next run of the app does not reap
/// it again (one teardown line), and the janitor kills the teardown's leftover (it is in the
/// run's cgroup, or carries the run's token) and removes the run dir.
fn core_killed_while_cleaning_up_after_its_teardown(cgroup: bool) {
    let sb = Sandbox::new();
    let app = "once.example.org";
    let id = rid(&sb, "once");
    let log = sb.mark("td.log");
    let bg = sb.mark("bg.ready");
    let teardown = teardown_leaving_a_leftover(&log, &bg);
    let mut run = run_cmd(&sb, app, &id, cgroup)
        .teardown(&teardown)
        .command(["true"])
        .spawn();
    let core = run.wait_core_pid(TIMEOUT);
    let leftover = wait_pids(&bg, TIMEOUT)[0];
    sb.wait_record(&id, "clean");
    sigkill(core);
    run.wait_exit(TIMEOUT);
    assert!(
        pid_alive(leftover),
        "the teardown's leftover died with the core already"
    );

    let next = run_cmd(&sb, app, &rid(&sb, "next"), cgroup)
        .command(["true"])
        .run();
    next.assert_code(0);
    assert!(
        !next.stderr.contains("reaping"),
        "the clean run was reaped again\n{next}"
    );
    assert_eq!(log_lines(&log), [format!("exited {id} {app}")], "{next}");

    let j = janitor(&sb).run();
    j.assert_code(0);
    assert!(
        poll_pid_gone(leftover, TIMEOUT),
        "the teardown's leftover outlived the janitor\n{j}"
    );
    assert!(!sb.run_dir(&id).exists(), "the run dir stays\n{j}");
    assert_eq!(log_lines(&log).len(), 1, "a second teardown ran\n{j}");
}

#[test]
fn core_killed_while_cleaning_up_after_its_teardown_with_cgroup() {
    core_killed_while_cleaning_up_after_its_teardown(true);
}

#[test]
fn core_killed_while_cleaning_up_after_its_teardown_without_cgroup() {
    core_killed_while_cleaning_up_after_its_teardown(false);
}

/// Item 1 in its narrowest window (D91): the core is SIGKILLed when its record says `clean` but
/// its lock metadata does not yet, while the teardown's TERM-ignoring leftover still runs. The
/// next run of the app finds the metadata unclean and the record clean: it runs no second
/// teardown, and it kills what that teardown left before it removes the run dir. Before D91 it
/// removed the dir alone, and nothing could find the leftover afterwards (the stress run's one
/// failure of `core_killed_while_cleaning_up_after_its_teardown_without_cgroup`, whose SIGKILL
/// can land in this window).
fn core_killed_between_clean_record_and_clean_metadata(cgroup: bool) {
    let sb = Sandbox::new();
    let app = "window.example.org";
    let id = rid(&sb, "window");
    let log = sb.mark("td.log");
    let bg = sb.mark("bg.ready");
    let pause = sb.mark("pause");
    let teardown = teardown_leaving_a_leftover(&log, &bg);
    let mut run = run_cmd(&sb, app, &id, cgroup)
        .teardown(&teardown)
        .env("TETHER_FAULT_PAUSE_CLEAN_RECORD_BEFORE_META", &pause)
        .command(["true"])
        .spawn();
    let core = run.wait_core_pid(TIMEOUT);
    let leftover = wait_pids(&bg, TIMEOUT)[0];
    wait_file(pause.with_extension("waiting"), TIMEOUT);
    sigkill(core);
    run.wait_exit(TIMEOUT);
    assert_eq!(
        sb.run_record(&id).map(|r| r["state"].clone()),
        Some("clean".into()),
        "the record at the pause"
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&fs::read(sb.lock_path(app)).expect("reading the lock metadata"))
            .expect("lock metadata");
    assert_ne!(meta["state"], "clean", "the metadata at the pause: {meta}");
    assert!(pid_alive(leftover), "the leftover died with the core");

    let next = run_cmd(&sb, app, &rid(&sb, "next"), cgroup)
        .command(["true"])
        .run();
    next.assert_code(0);
    assert!(
        poll_pid_gone(leftover, TIMEOUT),
        "the next run left the teardown's leftover alive\n{next}"
    );
    assert_eq!(
        log_lines(&log),
        [format!("exited {id} {app}")],
        "a second teardown ran\n{next}"
    );
    assert!(!sb.run_dir(&id).exists(), "the run dir stays\n{next}");
}

#[test]
fn core_killed_between_clean_record_and_clean_metadata_without_cgroup() {
    core_killed_between_clean_record_and_clean_metadata(false);
}

#[test]
fn core_killed_between_clean_record_and_clean_metadata_with_cgroup() {
    core_killed_between_clean_record_and_clean_metadata(true);
}

/// Item 1 at a fault-injection point: the core paused after its teardown command exited 0
/// (and after its leftovers were killed), before the run dir is retired, and SIGKILLed there.
/// Lock metadata and record both say `clean`: neither the next run nor the janitor runs the
/// teardown a second time.
#[test]
fn core_killed_between_teardown_and_retire_is_not_torn_down_twice() {
    let sb = Sandbox::new();
    let app = "retire.example.org";
    let id = rid(&sb, "retire");
    let log = sb.mark("td.log");
    let pause = sb.mark("pause");
    let mut run = sb
        .tether_run()
        .app(app)
        .run_id(&id)
        .teardown(logger(&log))
        .env("TETHER_FAULT_PAUSE_AFTER_TEARDOWN", &pause)
        .command(["true"])
        .spawn();
    let core = run.wait_core_pid(TIMEOUT);
    wait_file(pause.with_extension("waiting"), TIMEOUT);
    sigkill(core);
    run.wait_exit(TIMEOUT);
    let state = sb.run_record(&id).map(|r| r["state"].clone());

    let next = sb
        .tether_run()
        .app(app)
        .run_id(rid(&sb, "next"))
        .command(["true"])
        .run();
    next.assert_code(0);
    let j = janitor(&sb).run();
    j.assert_code(0);
    assert_eq!(
        log_lines(&log),
        [format!("exited {id} {app}")],
        "the teardown ran again\n{next}\n{j}"
    );
    assert_eq!(state, Some("clean".into()), "the record left at the pause");
    assert!(!sb.run_dir(&id).exists(), "the run dir stays\n{j}");
}

// ---------------------------------------------------------------------------------------------
// 2. odd files where records should be

/// Item 2: a FIFO, a symlink to `/dev/zero` and an 8 GiB (sparse) file in `run.json`'s place.
/// `status`, `janitor` and a `run` (whose reconcile reads every run dir's record) each finish
/// within a generous bound and run nothing from them; the janitor names the record it refused.
#[test]
fn odd_files_in_a_records_place_never_hang_anything() {
    for odd in ["fifo", "dev-zero", "huge"] {
        let sb = Sandbox::new();
        let dir = sb.run_dir("odd");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("run.lock"), "").unwrap();
        let record = dir.join("run.json");
        match odd {
            "fifo" => nix::unistd::mkfifo(&record, nix::sys::stat::Mode::from_bits_truncate(0o600))
                .unwrap(),
            "dev-zero" => std::os::unix::fs::symlink("/dev/zero", &record).unwrap(),
            _ => fs::File::create(&record).unwrap().set_len(8 << 30).unwrap(),
        }
        let bound = Duration::from_secs(20);
        sb.tether_status().timeout(bound).run().assert_code(0);
        sb.tether_run()
            .app("odd.example.org")
            .command(["true"])
            .timeout(bound)
            .run()
            .assert_code(0);
        let j = janitor(&sb).timeout(bound).run();
        j.assert_code(0);
        assert!(
            j.stderr.contains("run.json") && j.stderr.contains("reaping dead run odd"),
            "{odd}: the janitor does not say which record it refused\n{j}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. the power-loss case

/// A run of `app` whose command leaves a `sleep 1000` behind, its core SIGKILLed once it holds
/// the lock: returns the leftover's pid and the run's cgroup, if it had one.
fn run_killed_leaving_a_process(
    sb: &Sandbox,
    app: &str,
    id: &str,
    cgroup: bool,
) -> (i32, Option<String>) {
    let bg = sb.mark("bg.pid");
    let script = format!(
        "sleep 1000 & echo $! > {p}.tmp && mv {p}.tmp {p}; wait",
        p = shell_quote(&bg)
    );
    let mut run = run_cmd(sb, app, id, cgroup)
        .command(["sh", "-c", &script])
        .spawn();
    let leftover = wait_pids(&bg, TIMEOUT)[0];
    let core = wait_holder_pid(sb, app, id);
    let cg = sb
        .run_record(id)
        .and_then(|r| r["cgroup"].as_str().map(str::to_owned));
    runner_tests::sigkill_core(core);
    run.wait_exit(TIMEOUT);
    (leftover, cg)
}

/// Item 3: a reboot during a record write leaves an empty `run.json`, and `/run/lock` is wiped.
/// The janitor still kills what the dead run left (by its cgroup, or by its id and a token of a
/// dead core), runs the configured teardown with `TETHER_RUN_ID` (no app is known), and removes
/// the run dir.
fn empty_record_and_wiped_lock_dir(cgroup: bool) {
    let sb = Sandbox::new();
    let app = "power.example.org";
    let id = rid(&sb, "power");
    let log = sb.mark("td.log");
    let (leftover, cg) = run_killed_leaving_a_process(&sb, app, &id, cgroup);
    assert_eq!(cg.is_some(), cgroup && cgroup2_writable(), "cgroup: {cg:?}");
    fs::write(sb.run_dir(&id).join("run.json"), "").unwrap();
    fs::remove_file(sb.lock_path(app)).unwrap();
    assert!(pid_alive(leftover));

    let j = janitor(&sb).teardown(logger(&log)).run();
    j.assert_code(0);
    assert!(
        poll_pid_gone(leftover, TIMEOUT),
        "the leftover survived\n{j}"
    );
    assert_eq!(log_lines(&log), [format!("reaped {id} none")], "{j}");
    assert!(!sb.run_dir(&id).exists(), "the run dir stays\n{j}");
    if let Some(cg) = cg {
        assert!(!Path::new(&cg).exists(), "its cgroup {cg} stays\n{j}");
    }
}

#[test]
fn empty_record_and_wiped_lock_dir_is_still_reaped_with_cgroup() {
    empty_record_and_wiped_lock_dir(true);
}

#[test]
fn empty_record_and_wiped_lock_dir_is_still_reaped_without_cgroup() {
    empty_record_and_wiped_lock_dir(false);
}

// ---------------------------------------------------------------------------------------------
// 4. orphan cgroups

/// Item 4: a dead run whose state is gone entirely (run dir and lockfile deleted) leaves its
/// cgroup with a process in it. A janitor leaves a young one to the app's next holder
/// (`--orphan-age`, 10m by default); past that age (the test backdates it an hour) it kills
/// what is in it and removes it. A live run's cgroup is never touched.
#[test]
fn orphan_cgroup_of_a_vanished_run_is_swept() {
    if !cgroup2_writable() {
        eprintln!("SKIPPED (needs root and cgroup2): orphan_cgroup_of_a_vanished_run_is_swept");
        return;
    }
    let sb = Sandbox::new();
    let app = "orphan.example.org";
    let id = rid(&sb, "orphan");
    let (leftover, cg) = run_killed_leaving_a_process(&sb, app, &id, true);
    let cg = cg.expect("a run cgroup");
    fs::remove_dir_all(sb.run_dir(&id)).unwrap();
    fs::remove_file(sb.lock_path(app)).unwrap();

    // A live run of another app, whose cgroup must survive every sweep.
    let release = sb.mark("release");
    let live_id = rid(&sb, "live");
    let mut live = run_cmd(&sb, "live.example.org", &live_id, true)
        .command(["sh", "-c", &sh_wait_for(&shell_quote(&release))])
        .spawn();
    wait_holder_pid(&sb, "live.example.org", &live_id);

    let young = janitor(&sb).args(["--orphan-age", "10m"]).run();
    young.assert_code(0);
    assert!(pid_alive(leftover), "a young orphan was swept\n{young}");
    backdate(Path::new(&cg), 3600);
    let j = janitor(&sb).args(["--orphan-age", "10m"]).run();
    j.assert_code(0);
    assert!(
        poll_pid_gone(leftover, TIMEOUT),
        "the orphan's process survived\n{j}"
    );
    assert!(
        !Path::new(&cg).exists(),
        "the orphan cgroup {cg} stays\n{j}"
    );
    // Which janitor swept it is not asserted: once it is an hour old, any janitor of the
    // suite running at the same time (the soak's) may be first; the sweep is what counts.
    touch(&release);
    live.wait_exit(TIMEOUT).assert_code(0);
}

// ---------------------------------------------------------------------------------------------
// 5. honest lines

/// Item 5: an unreadable record with no `--teardown` is reported as such: the line says no
/// teardown ran (never "using the configured teardown"). A runs dir that is a file is an error
/// for `status` (125, naming it), not an empty list.
#[test]
fn janitor_and_status_say_what_really_happened() {
    let sb = Sandbox::new();
    let dir = sb.run_dir("garbled");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("run.lock"), "").unwrap();
    fs::write(dir.join("run.json"), "{\"version\":1,\"ap").unwrap();
    let j = janitor(&sb).run();
    j.assert_code(0).assert_stderr_contains("no teardown ran");
    assert!(!j.stderr.contains("using the configured teardown"), "{j}");

    let sb = Sandbox::new();
    fs::remove_dir(sb.runs_dir()).unwrap();
    fs::write(sb.runs_dir(), "not a dir\n").unwrap();
    let s = sb.tether_status().run();
    s.assert_code(125)
        .assert_stderr_contains(sb.runs_dir().to_str().unwrap());
    janitor(&sb).run().assert_code(125);
}

// ---------------------------------------------------------------------------------------------
// 8. a way out

/// A run of `app` whose teardown command does not exist (a typo): it exits 125 and leaves its
/// run dir and unclean lock metadata for a reap that can never succeed. Its run id.
fn run_with_a_failing_teardown(sb: &Sandbox, app: &str) -> String {
    let id = rid(sb, "typo");
    sb.tether_run()
        .app(app)
        .run_id(&id)
        .teardown("nonexist-td")
        .command(["true"])
        .run()
        .assert_code(125);
    id
}

/// Item 8: a teardown with a typo fails the same way forever. The run exits 125 and keeps its
/// state; the next run of the app and the janitor fail too, each printing the exact `tether
/// forget` command; `tether forget` refuses a live run, forgets the dead one (runs nothing,
/// records who did it, removes the state), and the app runs again.
#[test]
fn a_failing_teardown_can_be_forgotten() {
    let sb = Sandbox::new();
    let app = "typo.example.org";
    let id = run_with_a_failing_teardown(&sb, app);
    let hint = format!(
        "tether forget --lock-dir {} --runs-dir {} {id}",
        sb.lock_dir().display(),
        sb.runs_dir().display()
    );
    let next = sb
        .tether_run()
        .app(app)
        .run_id(rid(&sb, "next"))
        .command(["true"])
        .run();
    next.assert_code(125).assert_stderr_contains(&hint);
    let j = janitor(&sb).run();
    j.assert_code(1).assert_stderr_contains(&hint);

    // A live run is refused.
    let release = sb.mark("release");
    let live_id = rid(&sb, "live");
    let mut live = sb
        .tether_run()
        .app("other.example.org")
        .run_id(&live_id)
        .command(["sh", "-c", &sh_wait_for(&shell_quote(&release))])
        .spawn();
    wait_holder_pid(&sb, "other.example.org", &live_id);
    sb.tether("forget")
        .arg(&live_id)
        .run()
        .assert_code(125)
        .assert_stderr_contains("live");
    touch(&release);
    live.wait_exit(TIMEOUT).assert_code(0);

    let f = sb.tether("forget").arg(&id).run();
    f.assert_code(0)
        .assert_stderr_contains(&format!("forgot run {id}"));
    assert!(!sb.run_dir(&id).exists(), "{f}");
    let journal = fs::read_to_string(sb.runs_dir().join(".forgotten.jsonl")).unwrap();
    let entry: serde_json::Value = serde_json::from_str(journal.trim()).unwrap();
    assert_eq!(entry["run_id"], id.as_str());
    assert_eq!(entry["by_uid"], nix::unistd::geteuid().as_raw());
    let again = sb
        .tether_run()
        .app(app)
        .run_id(rid(&sb, "again"))
        .command(["true"])
        .run();
    again.assert_code(0);
    assert!(
        !again.stderr.contains("reaping"),
        "the forgotten run was reaped\n{again}"
    );
    janitor(&sb).run().assert_code(0);
}

/// `forget` with a lock dir that fails the trust checks: the run is still forgotten (its state
/// is in the runs dir), the lock dir is not written to, and a warning says the app's lock
/// metadata was left as it is (it used to be silent).
#[test]
fn forget_with_an_untrusted_lock_dir_says_it_left_the_metadata() {
    let sb = Sandbox::new();
    let app = "typo2.example.org";
    let id = run_with_a_failing_teardown(&sb, app);
    let lock_file = sb.lock_dir().join(format!("app-{app}.lock"));
    let before = fs::read(&lock_file).expect("lock metadata");
    fs::set_permissions(sb.lock_dir(), fs::Permissions::from_mode(0o777)).expect("chmod");
    let f = sb.tether("forget").arg(&id).run();
    f.assert_code(0)
        .assert_stderr_contains(&format!("forgot run {id}"))
        .assert_stderr_contains(&format!(
            "warning: lock dir {} is group/world writable",
            sb.lock_dir().display()
        ))
        .assert_stderr_contains(&format!("the lock metadata of {app} was left as it is"));
    assert!(!sb.run_dir(&id).exists(), "{f}");
    assert_eq!(fs::read(&lock_file).expect("lock metadata"), before, "{f}");
    fs::set_permissions(sb.lock_dir(), fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Item 8: `--teardown-timeout 0` means no timeout, as `--deadline 0` does (it used to time
/// the teardown out at once).
#[test]
fn teardown_timeout_zero_means_no_timeout() {
    let sb = Sandbox::new();
    let log = sb.mark("td.log");
    let f = sb
        .tether_run()
        .app("notimeout.example.org")
        .teardown(format!("sleep 1; echo done >> {}", shell_quote(&log)))
        .args(["--teardown-timeout", "0"])
        .command(["true"])
        .run();
    f.assert_code(0);
    assert_eq!(log_lines(&log), ["done"], "{f}");
}
