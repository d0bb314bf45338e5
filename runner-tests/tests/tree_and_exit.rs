//! The command's process tree, exit codes, teardown failure and bad input, against the real
//! kernel (CLI-CONTRACT §5, CLI-CONTRACT §7, CLI-CONTRACT §5 step 3, CLI-CONTRACT §6, CLI-CONTRACT §19).
//!
//! Every test drives the real `tether` binary. Trees are built by `tree-helper`, which reports
//! its pids only once every process is set up; death is asserted on those pids. "Nothing left
//! behind" is asserted on a full snapshot of the sandbox (names, inodes, sizes, mtimes, small
//! files' content), on marker files the command would have written, and on processes.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use runner_tests::{
    helper_bin, lock_is_free, log_lines, names, pid_alive, proc_info, rid, sh_wait_for,
    shell_quote, snapshot, touch, wait_pids, Finished, Sandbox, TetherCmd, TIMEOUT,
};

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

// ---------------------------------------------------------------------------------------------
// 10. Descendants that leave the process group or are orphaned die at teardown.

/// How tether starts the command: `clone3(CLONE_VM|CLONE_VFORK)` (the normal path on x86_64), or
/// the fork path of old kernels and other architectures (forced by a fault-injection switch).
#[derive(Clone, Copy, PartialEq)]
enum SpawnPath {
    Vfork,
    Fork,
}

/// Verbose on both paths: the fork path's debug line must appear on one and be absent on the
/// other, so a silent fallback from vfork to fork fails the vfork tests.
fn spawn_path(mut cmd: TetherCmd<'_>, path: SpawnPath) -> TetherCmd<'_> {
    cmd = cmd.arg("-v");
    if path == SpawnPath::Fork {
        cmd = cmd.env("TETHER_FAULT_FORK_SPAWN", "1");
    }
    cmd
}

/// The run's stderr proves the path the command was started on.
fn assert_spawn_path(f: &Finished, path: SpawnPath) {
    if path == SpawnPath::Fork {
        f.assert_stderr_contains("forking the child (forced by TETHER_FAULT_FORK_SPAWN)");
    } else {
        f.assert_stderr_lacks("forking the child");
    }
}

/// CLI-CONTRACT §5 step 8, CLI-CONTRACT §6: the command starts a tree-helper in the background (plain children,
/// a `setsid()` child, a double-forked orphan) and exits 0 by itself; when tether has exited,
/// every process of that tree is dead and the exit code is the command's 0.
fn escaped_descendants_die_at_teardown(no_cgroup: bool, path: SpawnPath) {
    let sb = Sandbox::new();
    let pids_file = sb.mark("tree.pids");
    // The command exits only once the test has looked at the tree: exiting as soon as the pids
    // appear let teardown kill the tree before the session check read /proc (a 1-in-20 flake).
    let go_file = sb.mark("tree.go");
    let tree = helper_bin!("tree-helper");
    let script = format!(
        "{} --pids-file {} --children 2 --setsid --double-fork </dev/null & {}; exit 0",
        shell_quote(&tree),
        shell_quote(&pids_file),
        sh_wait_for(&shell_quote(&go_file))
    );
    let mut cmd = sb
        .tether_run()
        .app("tree.example.org")
        .run_id(rid(&sb, "tree"))
        .command(["sh", "-c", &script]);
    if no_cgroup {
        cmd = cmd.env("TETHER_NO_CGROUP", "1");
    }
    let mut run = spawn_path(cmd, path).spawn();
    let pids = wait_pids(&pids_file, TIMEOUT);
    sb.guard().pids(&pids);
    assert_eq!(pids.len(), 1 + 2 + 1 + 1, "tree pids: {pids:?}");
    let setsid = proc_info(pids[3]);
    assert!(
        setsid.as_ref().is_some_and(|i| i.sid == pids[3]),
        "the setsid child leads its own session: {setsid:?}"
    );
    touch(&go_file);

    let f = run.wait_exit(TIMEOUT);
    f.assert_code(0).assert_stderr_contains("result=passed");
    assert_spawn_path(&f, path);
    let survivors: Vec<String> = pids
        .iter()
        .filter(|&&p| pid_alive(p))
        .map(|&p| format!("{:?}", proc_info(p)))
        .collect();
    assert!(
        survivors.is_empty(),
        "processes of the run outlived tether:\n{}\n{f}",
        survivors.join("\n")
    );
    assert!(lock_is_free(sb.lock_path("tree.example.org")));
}

#[test]
fn setsid_and_double_forked_descendants_die_at_teardown_with_cgroup() {
    escaped_descendants_die_at_teardown(false, SpawnPath::Vfork);
}

#[test]
fn setsid_and_double_forked_descendants_die_at_teardown_without_cgroup() {
    escaped_descendants_die_at_teardown(true, SpawnPath::Vfork);
}

/// The same on the fork path (old kernels, other architectures): the child moves itself into
/// the cgroup before exec.
#[test]
fn setsid_and_double_forked_descendants_die_at_teardown_with_cgroup_forked() {
    escaped_descendants_die_at_teardown(false, SpawnPath::Fork);
}

/// Issue 15 item 6: the command's `argv[0]` is what the user typed, as with `flock(1)`,
/// `timeout(1)` and `env(1)`: `sh -c 'echo $0'` prints `sh` (not `/usr/bin/sh`), a path typed
/// as a path stays that path, and `ps` (`/proc/<pid>/cmdline`) shows `sleep 100`. Both spawn
/// paths. Fails on a tether that puts the resolved path in `argv[0]`.
fn argv0_is_as_typed(path: SpawnPath) {
    let sb = Sandbox::new();
    let said = sb.mark("argv0");
    let script = format!("printf %s \"$0\" > {}", shell_quote(&said));
    for (n, shell) in ["sh", "/bin/sh"].into_iter().enumerate() {
        let cmd = sb
            .tether_run()
            .app("argv0.example.org")
            .run_id(rid(&sb, &format!("argv0-{n}")))
            .command([shell, "-c", &script]);
        let f = spawn_path(cmd, path).spawn().wait_exit(TIMEOUT);
        f.assert_code(0);
        assert_spawn_path(&f, path);
        let seen = fs::read_to_string(&said).expect("the command wrote its $0");
        assert_eq!(seen, shell, "`{shell} -c 'echo $0'` under tether\n{f}");
    }

    let cmd = sb
        .tether_run()
        .app("argv0.example.org")
        .run_id(rid(&sb, "argv0-ps"))
        .command(["sleep", "100"]);
    let mut run = spawn_path(cmd, path).spawn();
    let core = run.wait_core_pid(TIMEOUT);
    let sleeper = runner_tests::wait_child_named(core, "sleep", TIMEOUT);
    sb.guard().pids(&[sleeper]);
    // The kernel names the process at exec a moment before it lays out its arguments: an empty
    // cmdline is "not there yet", polled for, bounded.
    let cmdline = runner_tests::poll_some(TIMEOUT, || {
        fs::read(format!("/proc/{sleeper}/cmdline"))
            .ok()
            .filter(|c| !c.is_empty())
    })
    .expect("the command's cmdline");
    run.signal(runner_tests::Signal::SIGTERM);
    let f = run.wait_exit(TIMEOUT);
    assert_eq!(
        String::from_utf8_lossy(&cmdline).replace('\0', " "),
        "sleep 100 ",
        "what ps shows for `tether run -- sleep 100`\n{f}"
    );
}

#[test]
fn argv0_is_as_typed_vfork() {
    argv0_is_as_typed(SpawnPath::Vfork);
}

#[test]
fn argv0_is_as_typed_forked() {
    argv0_is_as_typed(SpawnPath::Fork);
}

// ---------------------------------------------------------------------------------------------
// 11. Exit codes pass through step shells.

/// CLI-CONTRACT §7: tether run inside a `sh -e` / `bash -e` step script (not exec'd) ends the step
/// with the command's own status (0, 1, 7, 255), and with 128+N when the command died of a
/// signal N that tether did not send (SIGKILL, SIGABRT).
fn exit_codes_pass_through(bash: bool) {
    let sb = Sandbox::new();
    let exit_with = helper_bin!("exit-with");
    let exit_with = exit_with.to_str().unwrap();
    let cases: [(&str, &str, i32); 6] = [
        ("--code", "0", 0),
        ("--code", "1", 1),
        ("--code", "7", 7),
        ("--code", "255", 255),
        ("--signal", "9", 128 + 9),
        ("--signal", "6", 128 + 6),
    ];
    for (n, (flag, value, expected)) in cases.into_iter().enumerate() {
        let tether = sb
            .tether_run()
            .app("exit.example.org")
            .run_id(rid(&sb, &format!("exit{n}")))
            .command([exit_with, flag, value]);
        let mut step = sb.step_shell(&tether.to_shell());
        if bash {
            step = step.bash();
        }
        let f = step.spawn().wait_exit(TIMEOUT);
        assert_eq!(
            f.code,
            Some(expected),
            "exit-with {flag} {value} under {}: expected step exit {expected}\n{f}",
            if bash { "bash -e" } else { "sh -e" }
        );
        assert_eq!(
            f.summary_field("exit"),
            Some(expected.to_string().as_str()),
            "summary exit field\n{f}"
        );
    }
}

#[test]
fn exit_codes_pass_through_sh_e() {
    exit_codes_pass_through(false);
}

#[test]
fn exit_codes_pass_through_bash_e() {
    exit_codes_pass_through(true);
}

// ---------------------------------------------------------------------------------------------
// 12. A failing teardown command.

fn teardown_fails(command_code: i32, expected: i32) {
    let sb = Sandbox::new();
    let app = "leak.example.org";
    let id = rid(&sb, "leak");
    let f = sb
        .tether_run()
        .app(app)
        .run_id(&id)
        .teardown("exit 4")
        .command([
            helper_bin!("exit-with").to_str().unwrap(),
            "--code",
            &command_code.to_string(),
        ])
        .run();
    f.assert_code(expected)
        .assert_stderr_contains("teardown command exited with status 4");
    assert_eq!(f.summary_field("teardown"), Some("failed"), "summary\n{f}");
    assert_eq!(
        f.summary_field("exit"),
        Some(expected.to_string().as_str()),
        "summary\n{f}"
    );
    let record = sb
        .run_record(&id)
        .unwrap_or_else(|| panic!("the run dir and run.json are kept\n{f}"));
    assert_eq!(record["state"], "tearing-down", "run.json: {record}\n{f}");
    assert!(
        lock_is_free(sb.lock_path(app)),
        "the app lock is released\n{f}"
    );
}

/// CLI-CONTRACT §7, CLI-CONTRACT §6: a passing command whose teardown fails must not look green: exit 125,
/// `teardown=failed`, the run stays `tearing-down` with its run dir kept, the lock is free.
#[test]
fn failing_teardown_after_a_passing_command_exits_125_and_keeps_state() {
    teardown_fails(0, 125);
}

/// CLI-CONTRACT §7: after a failing command (exit 3), a failing teardown keeps the command's code.
#[test]
fn failing_teardown_after_a_failing_command_keeps_its_code() {
    teardown_fails(3, 3);
}

// ---------------------------------------------------------------------------------------------
// 13. Bad input: a clear message, the documented code, nothing left behind.

/// Runs `cmd` (whose command, if any, would create `marker`) and asserts CLI-CONTRACT §19: exit
/// `code`; exactly one error message, naming `culprit`; nothing created or changed in the
/// sandbox; the marker absent; no process of the sandbox alive.
fn assert_refused(sb: &Sandbox, cmd: TetherCmd<'_>, marker: &Path, code: i32, culprit: &str) {
    let before = snapshot(sb.path(), &["logs"]);
    let f = cmd.timeout(Duration::from_secs(20)).run();
    assert_refusal(sb, &f, before, marker, code, culprit);
}

fn assert_refusal(
    sb: &Sandbox,
    f: &Finished,
    before: Vec<String>,
    marker: &Path,
    code: i32,
    culprit: &str,
) {
    f.assert_code(code);
    // A usage error (clap's) is `tether: usage: …` (issue 18, D35), any other `tether: error: …`.
    let errors = f
        .stderr
        .lines()
        .filter(|l| l.starts_with("tether: error:") || l.starts_with("tether: usage:"))
        .count();
    assert_eq!(errors, 1, "exactly one error message\n{f}");
    assert!(
        f.stderr.lines().all(|l| l.starts_with("tether: ")),
        "every line starts with `tether: `\n{f}"
    );
    assert!(
        f.stderr.contains(culprit),
        "the message names {culprit:?}\n{f}"
    );
    assert!(!marker.exists(), "the command ran\n{f}");
    assert_eq!(
        snapshot(sb.path(), &["logs"]),
        before,
        "something was left behind\n{f}"
    );
    assert!(
        sb.leftovers().is_empty(),
        "processes left: {:?}\n{f}",
        sb.leftovers()
    );
}

/// A `touch <marker>` command line.
fn touch_cmd(marker: &Path) -> [String; 2] {
    ["touch".into(), marker.to_str().unwrap().into()]
}

#[test]
fn unknown_flag_is_refused() {
    let sb = Sandbox::new();
    let m = sb.mark("ran");
    let cmd = sb
        .tether_run()
        .app("bad.example.org")
        .arg("--bogus-flag")
        .command(touch_cmd(&m));
    assert_refused(&sb, cmd, &m, 125, "--bogus-flag");
}

#[test]
fn missing_command_or_separator_is_refused() {
    let sb = Sandbox::new();
    let m = sb.mark("ran");
    // No `--` and no command.
    let cmd = sb.tether_run().app("bad.example.org");
    assert_refused(&sb, cmd, &m, 125, "<COMMAND>");
    // `--` with nothing after it.
    let cmd = sb
        .tether_run()
        .app("bad.example.org")
        .command(Vec::<String>::new());
    assert_refused(&sb, cmd, &m, 125, "<COMMAND>");
    // A command without `--` before it (CLI-CONTRACT §3: `-- <COMMAND>`).
    let [touch, path] = touch_cmd(&m);
    let cmd = sb.tether_run().app("bad.example.org").args([&touch, &path]);
    assert_refused(&sb, cmd, &m, 125, "touch");
}

#[test]
fn invalid_domains_are_refused() {
    for domain in ["../x", "a/b", "a..b", "", "with space", "-a.example.org"] {
        let sb = Sandbox::new();
        let m = sb.mark("ran");
        // `--app=VALUE`, so that clap takes a leading `-` as part of the value.
        let cmd = sb
            .tether_run()
            .arg(format!("--app={domain}"))
            .command(touch_cmd(&m));
        let culprit = format!("{domain:?}");
        assert_refused(&sb, cmd, &m, 125, &culprit);
    }
}

#[test]
fn invalid_run_ids_are_refused() {
    for id in [".x", "a/b", "..", "a b"] {
        let sb = Sandbox::new();
        let m = sb.mark("ran");
        let cmd = sb
            .tether_run()
            .app("ok.example.org")
            .run_id(id)
            .command(touch_cmd(&m));
        let culprit = format!("{id:?}");
        assert_refused(&sb, cmd, &m, 125, &culprit);
    }
}

#[test]
fn unparsable_duration_is_refused() {
    for (flag, value) in [
        ("--deadline", "10x"),
        ("--grace", "ms"),
        // A bare number is seconds (as timeout(1)); units out of order or unknown are not.
        ("--lock-timeout", "30m1h"),
        ("--teardown-timeout", "1d"),
    ] {
        let sb = Sandbox::new();
        let m = sb.mark("ran");
        let cmd = sb
            .tether_run()
            .app("ok.example.org")
            .args([flag, value])
            .command(touch_cmd(&m));
        assert_refused(&sb, cmd, &m, 125, value);
    }
}

/// README "What may surprise you": a failing `--setup` ends the run before the command, with
/// the setup's status as tether's exit code, and the teardown still runs — once.
#[test]
fn setup_failure_exits_with_its_status_and_still_tears_down() {
    let sb = Sandbox::new();
    let m = sb.mark("ran");
    let log = sb.mark("teardown.log");
    let f = sb
        .tether_run()
        .app("setup-fails.example.org")
        .args(["--setup", "exit 3"])
        .teardown(format!(
            "echo \"td $TETHER_REASON $TETHER_EXIT_CODE\" >> {}",
            shell_quote(&log)
        ))
        .command(touch_cmd(&m))
        .timeout(Duration::from_secs(20))
        .run();
    f.assert_code(3)
        .assert_stderr_contains("setup command failed with status 3");
    assert!(!m.exists(), "the command ran after a failed setup\n{f}");
    assert_eq!(log_lines(&log), ["td exited 3"], "{f}");
    assert_eq!(f.summary_field("exit"), Some("3"), "{f}");
}

/// Issue 18: a `TETHER_RUN_ID` outside the id alphabet is refused naming the variable (the
/// user never typed `--run-id`), and the run's summary line is still printed.
#[test]
fn invalid_run_id_from_the_environment_names_the_variable() {
    let sb = Sandbox::new();
    let m = sb.mark("ran");
    let before = snapshot(sb.path(), &["logs"]);
    let f = sb
        .tether_run()
        .app("ok.example.org")
        .env("TETHER_RUN_ID", "bb 1")
        .command(touch_cmd(&m))
        .timeout(Duration::from_secs(20))
        .run();
    assert_refusal(
        &sb,
        &f,
        before,
        &m,
        125,
        "TETHER_RUN_ID: invalid run id \"bb 1\"",
    );
    assert_eq!(f.summary_field("result"), Some("failed"), "{f}");
    assert_eq!(f.summary_field("exit"), Some("125"), "{f}");
}

/// Issue 18: `TETHER_CONFIG=` and `TETHER_RUN_ID=` (set, but empty) behave as unset: the
/// default config, a derived run id — not "a value is required" or "invalid run id".
#[test]
fn empty_tether_variables_count_as_unset() {
    let sb = Sandbox::new();
    let m = sb.mark("ran");
    let f = sb
        .tether_run()
        .app("ok.example.org")
        .env("TETHER_RUN_ID", "")
        .env("TETHER_CONFIG", "")
        .command(touch_cmd(&m))
        .timeout(Duration::from_secs(20))
        .run();
    f.assert_code(0).assert_stderr_lacks("error");
    assert!(m.exists(), "the command ran\n{f}");
    let id = f.summary().and_then(|l| l.split_whitespace().nth(2));
    assert!(
        id.is_some_and(|id| id.starts_with("local-")),
        "a derived run id: {id:?}\n{f}"
    );
}

/// `tether run` with explicit dirs (not the sandbox's own ones).
fn run_with_dirs<'a>(sb: &'a Sandbox, lock_dir: &Path, runs_dir: &Path, m: &Path) -> TetherCmd<'a> {
    sb.tether_run()
        .no_sandbox_dirs()
        .arg("--lock-dir")
        .arg(lock_dir)
        .arg("--runs-dir")
        .arg(runs_dir)
        .app("ok.example.org")
        .command(touch_cmd(m))
}

#[test]
fn lock_dir_symlink_is_refused() {
    let sb = Sandbox::new();
    let m = sb.mark("ran");
    let link = sb.path().join("locks-link");
    symlink(sb.lock_dir(), &link).expect("symlink");
    let cmd = run_with_dirs(&sb, &link, &sb.runs_dir(), &m);
    assert_refused(&sb, cmd, &m, 125, link.to_str().unwrap());
}

#[test]
fn runs_dir_symlink_is_refused() {
    let sb = Sandbox::new();
    let m = sb.mark("ran");
    let link = sb.path().join("runs-link");
    symlink(sb.runs_dir(), &link).expect("symlink");
    let cmd = run_with_dirs(&sb, &sb.lock_dir(), &link, &m);
    assert_refused(&sb, cmd, &m, 125, link.to_str().unwrap());
}

/// CLI-CONTRACT §3, issue 13: a group/world-writable lock dir or runs dir is refused — with the sticky
/// bit too (a sticky dir still lets anyone *create* entries: a planted run record would be a
/// root code execution). Exit 125, the message names the dir, nothing is run or created.
#[test]
fn writable_dirs_are_refused_sticky_or_not() {
    for which in ["locks", "runs"] {
        for mode in [0o777, 0o775, 0o1777, 0o1770] {
            let sb = Sandbox::new();
            let m = sb.mark("ran");
            let dir = sb.path().join(which);
            chmod(&dir, mode);
            let cmd = sb.tether_run().app("ok.example.org").command(touch_cmd(&m));
            assert_refused(&sb, cmd, &m, 125, dir.to_str().unwrap());
        }
    }
}

/// CLI-CONTRACT §3, PROTOCOL §3: a symlink in the lockfile's place is never followed: exit 125, its target
/// neither created (dangling) nor written (existing), no run dir left, nothing run.
#[test]
fn symlink_in_the_lockfiles_place_is_refused() {
    let app = "ok.example.org";
    // Dangling: the target must not be created.
    let sb = Sandbox::new();
    let m = sb.mark("ran");
    let target = sb.path().join("not-created");
    symlink(&target, sb.lock_path(app)).expect("symlink");
    let cmd = sb.tether_run().app(app).command(touch_cmd(&m));
    let lock = sb.lock_path(app);
    assert_refused(&sb, cmd, &m, 125, lock.to_str().unwrap());
    assert!(!target.exists(), "the symlink's target was created");

    // Existing: the target must not be written (the snapshot covers its content and mtime).
    let sb = Sandbox::new();
    let m = sb.mark("ran");
    let target = sb.path().join("precious");
    fs::write(&target, "precious content\n").expect("writing the target");
    symlink(&target, sb.lock_path(app)).expect("symlink");
    let cmd = sb.tether_run().app(app).command(touch_cmd(&m));
    let lock = sb.lock_path(app);
    assert_refused(&sb, cmd, &m, 125, lock.to_str().unwrap());
    assert_eq!(fs::read_to_string(&target).unwrap(), "precious content\n");
}

#[test]
fn directory_in_the_lockfiles_place_is_refused() {
    let app = "ok.example.org";
    let sb = Sandbox::new();
    let m = sb.mark("ran");
    fs::create_dir(sb.lock_path(app)).expect("mkdir");
    let cmd = sb.tether_run().app(app).command(touch_cmd(&m));
    let lock = sb.lock_path(app);
    assert_refused(&sb, cmd, &m, 125, lock.to_str().unwrap());
}

/// CLI-CONTRACT §7, CLI-CONTRACT §19: a command that does not exist → 127; nothing created, locked or started.
#[test]
fn command_not_found_exits_127() {
    let sb = Sandbox::new();
    let m = sb.mark("ran");
    for missing in ["tether-no-such-command-xyz", "./no-such-script.sh"] {
        let cmd = sb
            .tether_run()
            .app("ok.example.org")
            .command([missing, "arg"]);
        assert_refused(&sb, cmd, &m, 127, missing);
    }
}

/// CLI-CONTRACT §7, CLI-CONTRACT §19: a file without the x bit, and a directory → 126; nothing left behind.
#[test]
fn command_not_executable_exits_126() {
    let sb = Sandbox::new();
    let m = sb.mark("ran");
    let script = sb.path().join("not-executable.sh");
    fs::write(&script, format!("#!/bin/sh\ntouch {}\n", shell_quote(&m))).expect("writing");
    chmod(&script, 0o644);
    let dir = sb.path().join("a-directory");
    fs::create_dir(&dir).expect("mkdir");
    for path in [&script, &dir] {
        let cmd = sb
            .tether_run()
            .app("ok.example.org")
            .command([path.to_str().unwrap()]);
        assert_refused(&sb, cmd, &m, 126, path.to_str().unwrap());
    }
}

/// CLI-CONTRACT §7: a command that passes the up-front checks but that the kernel refuses to exec
/// (executable, but neither a binary nor a `#!` script: ENOEXEC) → 126, reported by the child
/// through its close-on-exec pipe, on both spawn paths; the run tears down and leaves the app
/// free.
fn exec_failure_in_the_child_exits_126(path: SpawnPath) {
    let sb = Sandbox::new();
    let bogus = sb.path().join("not-a-program");
    fs::write(&bogus, "this is not a program\n").expect("writing");
    chmod(&bogus, 0o755);
    let cmd = sb
        .tether_run()
        .app("exec.example.org")
        .run_id(rid(&sb, "exec"))
        .command([bogus.to_str().unwrap()]);
    let f = spawn_path(cmd, path).run();
    f.assert_code(126)
        .assert_stderr_contains(&format!("cannot start {}", bogus.display()))
        .assert_stderr_contains("Exec format error");
    assert_spawn_path(&f, path);
    assert_eq!(
        f.summary_field("exit"),
        Some("126"),
        "summary exit field\n{f}"
    );
    assert!(lock_is_free(sb.lock_path("exec.example.org")));
}

#[test]
fn exec_failure_in_the_child_exits_126_vfork() {
    exec_failure_in_the_child_exits_126(SpawnPath::Vfork);
}

#[test]
fn exec_failure_in_the_child_exits_126_forked() {
    exec_failure_in_the_child_exits_126(SpawnPath::Fork);
}

/// D18: where `clone3` is refused, tether forks the command instead, shown under a real seccomp
/// filter (`no-clone3`). ENOSYS (an old kernel, older container profiles): the fork path still
/// puts the command in the run's cgroup. EPERM (a stricter filter): the cgroup cannot be joined
/// at creation, so the run goes on without it, as any failure to join does.
fn clone3_refused_falls_back_to_fork(errno: i32) {
    let sb = Sandbox::new();
    let seen = sb.mark("cgroup-of-command");
    let tether = sb
        .tether_run()
        .app("noclone3.example.org")
        .run_id(rid(&sb, &format!("noclone3-{errno}")))
        .arg("-v")
        .command([
            "sh",
            "-c",
            &format!("cat /proc/$$/cgroup > {}", shell_quote(&seen)),
        ]);
    let script = format!(
        "{} {errno} env {}",
        shell_quote(helper_bin!("no-clone3")),
        tether.to_shell()
    );
    let f = sb.step_shell(&script).spawn().wait_exit(TIMEOUT);
    assert_eq!(f.code, Some(0), "run under no-clone3 {errno}\n{f}");
    let why = if errno == libc::ENOSYS {
        "Function not implemented"
    } else {
        "Operation not permitted"
    };
    f.assert_stderr_contains(&format!("forking the child (clone3: {why}"))
        .assert_stderr_contains("result=passed");
    assert!(lock_is_free(sb.lock_path("noclone3.example.org")));

    let command_cgroup = fs::read_to_string(&seen).expect("the command ran");
    let run_cgroup = f
        .stderr_lines("tether: run cgroup ")
        .first()
        .and_then(|l| l.rsplit('/').next())
        .map(str::to_owned);
    let Some(run_cgroup) = run_cgroup else {
        eprintln!(
            "NOTE (no run cgroup on this host): clone3_refused_falls_back_to_fork({errno}) \
             checked the fallback, not cgroup membership"
        );
        return;
    };
    let in_run_cgroup = command_cgroup
        .lines()
        .any(|l| l.ends_with(&format!("/{run_cgroup}")));
    if errno == libc::ENOSYS {
        assert!(
            in_run_cgroup,
            "the forked command joined the run cgroup {run_cgroup}: {command_cgroup}\n{f}"
        );
    } else {
        f.assert_stderr_contains("cannot join the run's cgroup; running without it");
        assert!(!in_run_cgroup, "{command_cgroup}\n{f}");
    }
}

#[test]
fn clone3_refused_with_enosys_falls_back_to_fork_into_the_cgroup() {
    clone3_refused_falls_back_to_fork(libc::ENOSYS);
}

#[test]
fn clone3_refused_with_eperm_falls_back_to_fork_without_a_cgroup() {
    clone3_refused_falls_back_to_fork(libc::EPERM);
}

/// CLI-CONTRACT §19, CLI-CONTRACT: `--config x` naming a file that cannot be read (and, while config
/// files are not supported, any `--config`) → 125 with one message about the config, nothing
/// left behind.
#[test]
fn unreadable_config_is_refused() {
    let sb = Sandbox::new();
    let m = sb.mark("ran");
    let config = sb.path().join("no-such-config.yml");
    let cmd = sb
        .tether_run()
        .app("ok.example.org")
        .arg("--config")
        .arg(&config)
        .command(touch_cmd(&m));
    assert_refused(&sb, cmd, &m, 125, "config");
}

// ---------------------------------------------------------------------------------------------
// 14. --keep-run-dir.

/// CLI-CONTRACT §5 step 3, CLI-CONTRACT §6: `--keep-run-dir` keeps the run dir after a clean run: run.json in state
/// `clean`, `tmp/` (the command's TMPDIR) still there with what the command put in it.
#[test]
fn keep_run_dir_keeps_a_clean_run_dir() {
    let sb = Sandbox::new();
    let app = "keep.example.org";
    let id = rid(&sb, "keep");
    let f = sb
        .tether_run()
        .app(app)
        .run_id(&id)
        .arg("--keep-run-dir")
        .command(["sh", "-c", "echo kept > \"$TMPDIR/evidence\""])
        .run();
    f.assert_code(0).assert_stderr_contains("result=passed");
    let dir = sb.run_dir(&id);
    let record = sb
        .run_record(&id)
        .unwrap_or_else(|| panic!("run.json kept\n{f}"));
    assert_eq!(record["state"], "clean", "run.json: {record}");
    assert!(dir.join("tmp").is_dir(), "tmp/ kept: {:?}", names(&dir));
    assert_eq!(
        fs::read_to_string(dir.join("tmp/evidence")).ok().as_deref(),
        Some("kept\n"),
        "the command's TMPDIR is the kept run dir's tmp/"
    );
    assert!(lock_is_free(sb.lock_path(app)));

    // A kept clean run dir is not a dead run: the next run of the app reaps nothing.
    let f2 = sb
        .tether_run()
        .app(app)
        .run_id(rid(&sb, "keep-next"))
        .command(["true"])
        .run();
    f2.assert_code(0).assert_stderr_lacks("reaping");
    assert!(dir.exists(), "the kept run dir survives the next run");
}

// ---------------------------------------------------------------------------------------------
// Isolation of runs that share a run id across runs dirs.

/// CLI-CONTRACT §3, CLI-CONTRACT §6: run ids are unique per runs dir only, so two live runs in different runs dirs
/// (two runner agents with their own dirs, or a developer reproducing CI run 267 locally while
/// CI runs it) may share one. Tearing one down must kill *its* process tree only: the other
/// run's command survives and finishes normally.
#[test]
fn same_run_id_in_two_runs_dirs_is_isolated() {
    let (sa, sbx) = (Sandbox::new(), Sandbox::new());
    let id = rid(&sa, "shared");
    let started = sa.mark("a.started");
    let release = sa.mark("a.release");
    let script = format!(
        "echo $$ > {s}.tmp && mv {s}.tmp {s}; \
         i=0; while [ ! -e {r} ]; do i=$((i+1)); if [ $i -gt 3000 ]; then exit 99; fi; \
         sleep 0.01; done; exit 0",
        s = shell_quote(&started),
        r = shell_quote(&release)
    );
    let mut a = sa
        .tether_run()
        .app("a.example.org")
        .run_id(&id)
        .command(["sh", "-c", &script])
        .spawn();
    let a_cmd = wait_pids(&started, TIMEOUT)[0];

    let fb = sbx
        .tether_run()
        .app("b.example.org")
        .run_id(&id)
        .command(["true"])
        .run();
    fb.assert_code(0);
    assert!(
        pid_alive(a_cmd),
        "run {id} in {} killed the command of run {id} in {}: {:?}\n{fb}",
        sbx.path().display(),
        sa.path().display(),
        proc_info(a_cmd)
    );

    fs::write(&release, b"").expect("creating the release marker");
    let fa = a.wait_exit(TIMEOUT);
    fa.assert_code(0).assert_stderr_contains("result=passed");
}
