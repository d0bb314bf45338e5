//! Self-tests of the fixture library and helper binaries, without the tether binary.
//!
//! The concurrency suite trusts these fixtures to tell it the truth about the kernel (who is
//! alive, who holds a lock, which fds a process got), so they are checked here against real
//! processes first. Nothing here needs `target/<profile>/tether`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::Command;
use std::time::Duration;

use runner_tests::{
    children_of, count_lines, descendants_of, flock_holders, flock_waiters, helper_bin, hold_lock,
    inheritable_fds, lock_is_free, pid_alive, proc_info, read_fd_listing, read_pids,
    resolve_tether_bin, shell_quote, sig_ignored, start_lock_holder, wait_all_gone,
    wait_child_named, wait_file, wait_flock_waiters, wait_line, wait_pid_gone, wait_pids,
    wait_until, Finished, KillOnDrop, ProcessGuard, Sandbox, Signal, TIMEOUT,
};

/// A panic's message, for asserting on what a failing fixture says.
fn panic_message(f: impl FnOnce()) -> String {
    let err = catch_unwind(AssertUnwindSafe(f)).expect_err("expected a panic");
    err.downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

fn spawn_tree(sb: &Sandbox, extra: &[&str]) -> (KillOnDrop, Vec<i32>) {
    let pids_file = sb.fresh_mark("tree.pids");
    let mut cmd = Command::new(helper_bin!("tree-helper"));
    cmd.arg("--pids-file")
        .arg(&pids_file)
        .args(extra)
        .process_group(0);
    let tree = KillOnDrop::spawn(&mut cmd);
    let pids = wait_pids(&pids_file, TIMEOUT);
    sb.guard().pids(&pids);
    (tree, pids)
}

#[test]
fn tree_helper_reports_every_process_of_its_tree() {
    let sb = Sandbox::new();
    let (mut tree, pids) = spawn_tree(&sb, &["--children", "3", "--setsid", "--double-fork"]);
    assert_eq!(pids.len(), 1 + 3 + 1 + 1, "pids: {pids:?}");
    assert_eq!(pids[0], tree.pid(), "its own pid comes first");
    for &pid in &pids {
        assert!(pid_alive(pid), "pid {pid} of {pids:?} is not alive");
    }
    let me = tree.pid();
    for &child in &pids[1..4] {
        let info = proc_info(child).expect("plain child exists");
        assert_eq!((info.ppid, info.pgid), (me, me), "plain child {info:?}");
    }
    let setsid = proc_info(pids[4]).expect("setsid child exists");
    assert_eq!(
        (setsid.ppid, setsid.pgid, setsid.sid),
        (me, setsid.pid, setsid.pid),
        "setsid child leads its own session: {setsid:?}"
    );
    let orphan = proc_info(pids[5]).expect("orphan exists");
    assert_ne!(
        orphan.ppid, me,
        "the double-fork grandchild is re-parented: {orphan:?}"
    );
    assert_eq!(
        orphan.pgid, me,
        "the orphan stays in the helper's group: {orphan:?}"
    );
    let mut kids = children_of(me);
    kids.sort_unstable();
    let mut expected = pids[1..5].to_vec();
    expected.sort_unstable();
    assert_eq!(kids, expected, "children_of lists the direct children");
    let mut desc = descendants_of(me);
    desc.sort_unstable();
    assert_eq!(desc, expected, "the orphan is no longer a descendant");

    // Killing the group leaves the setsid child; killing it too leaves nothing.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(-me), Signal::SIGKILL).expect("kill group");
    tree.wait_exit(TIMEOUT);
    wait_all_gone(&[pids[1], pids[2], pids[3], pids[5]], TIMEOUT);
    assert!(
        pid_alive(pids[4]),
        "the setsid child escaped the group kill"
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[4]), Signal::SIGKILL).expect("kill");
    wait_pid_gone(pids[4], TIMEOUT);
}

#[test]
fn tree_helper_ignore_term_arms_every_process() {
    let sb = Sandbox::new();
    let (_tree, pids) = spawn_tree(&sb, &["--children", "2", "--setsid", "--ignore-term"]);
    assert_eq!(pids.len(), 4, "pids: {pids:?}");
    for &pid in &pids {
        assert!(
            sig_ignored(pid, Signal::SIGTERM),
            "pid {pid} does not ignore SIGTERM"
        );
        assert!(
            !sig_ignored(pid, Signal::SIGINT),
            "pid {pid} ignores SIGINT too"
        );
        // An ignored signal is discarded when sent: the process is untouched afterwards.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM).expect("kill");
        assert!(pid_alive(pid), "pid {pid} died of an ignored SIGTERM");
    }
    sb.guard().kill_all();
    wait_all_gone(&pids, TIMEOUT);
}

#[test]
fn tree_helper_without_extras_starts_three_children() {
    let sb = Sandbox::new();
    let (tree, pids) = spawn_tree(&sb, &[]);
    assert_eq!(pids.len(), 4, "pids: {pids:?}");
    // Dropping the KillOnDrop (own group) must take the whole tree down.
    drop(tree);
    wait_all_gone(&pids, TIMEOUT);
}

#[test]
fn pid_alive_is_false_for_a_zombie_and_after_reap() {
    let sb = Sandbox::new();
    let ready = sb.mark("ignore-term.ready");
    let mut helper = KillOnDrop::spawn(
        Command::new(helper_bin!("ignore-term"))
            .arg("--ready")
            .arg(&ready),
    );
    wait_file(&ready, TIMEOUT);
    let pid = helper.pid();
    assert_eq!(read_pids(&ready), vec![pid]);
    assert!(pid_alive(pid));
    assert!(sig_ignored(pid, Signal::SIGTERM));
    helper.signal(Signal::SIGKILL);
    // Not reaped yet: it turns into a zombie, which must count as dead.
    wait_until("the helper to become a zombie", TIMEOUT, || {
        proc_info(pid).is_some_and(|i| i.state == 'Z')
    });
    assert!(!pid_alive(pid), "a zombie is not alive");
    let status = helper.wait_exit(TIMEOUT);
    assert_eq!(KillOnDrop::code_of(status), 128 + 9);
    assert!(proc_info(pid).is_none(), "reaped");
    assert!(!pid_alive(pid));
}

#[test]
fn lock_holder_holds_the_lock_until_it_dies() {
    let sb = Sandbox::new();
    let path = sb.lock_path("immi-ad3e33.ci.example.org");
    assert!(lock_is_free(&path), "a missing lockfile is free");
    assert!(!path.exists(), "probing must not create the lockfile");

    let mut holder = start_lock_holder(&sb, &path);
    assert!(!lock_is_free(&path), "lock-holder holds it");
    assert_eq!(flock_holders(&path), vec![holder.pid()]);
    assert!(flock_waiters(&path).is_empty());
    let msg = panic_message(|| drop(hold_lock(&path)));
    assert!(
        msg.contains(&holder.pid().to_string()),
        "names the holder: {msg}"
    );

    holder.signal(Signal::SIGKILL);
    holder.wait_exit(TIMEOUT);
    assert!(
        lock_is_free(&path),
        "the kernel released the dead holder's lock"
    );
    assert!(flock_holders(&path).is_empty());

    // The test itself can hold it, and a second open file description in the same
    // process sees it busy.
    let held = hold_lock(&path);
    assert!(!lock_is_free(&path));
    drop(held);
    assert!(lock_is_free(&path));
}

#[test]
fn lock_holder_blocks_behind_a_held_lock_and_writes_content() {
    let sb = Sandbox::new();
    let path = sb.lock_path("app.example.org");
    let ready = sb.mark("holder.ready");
    let held = hold_lock(&path);
    let mut cmd = Command::new(helper_bin!("lock-holder"));
    cmd.arg("--path")
        .arg(&path)
        .arg("--ready")
        .arg(&ready)
        .args(["--content", r#"{"run_id":"fake"}"#]);
    let holder = KillOnDrop::spawn(&mut cmd);
    assert_eq!(wait_flock_waiters(&path, 1, TIMEOUT), vec![holder.pid()]);
    assert!(!ready.exists(), "not ready while blocked");
    drop(held);
    wait_file(&ready, TIMEOUT);
    assert_eq!(flock_holders(&path), vec![holder.pid()]);
    assert_eq!(
        sb.lock_metadata("app.example.org"),
        Some(serde_json::json!({"run_id": "fake"}))
    );
}

#[test]
fn fd_lister_lists_exactly_the_inherited_fds() {
    let sb = Sandbox::new();
    let out = sb.mark("fds");
    let leak = sb.mark("leaked-file");
    let leaked = fs::File::create(&leak).expect("create leak file");
    let cloexec = hold_lock(sb.lock_path("cloexec.example.org"));
    let mut cmd = Command::new(helper_bin!("fd-lister"));
    cmd.arg("--out").arg(&out);
    {
        use std::os::fd::AsRawFd;
        let fd = leaked.as_raw_fd();
        // SAFETY: dup2 is async-signal-safe; fd stays open in the parent until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, 7) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let status = KillOnDrop::spawn(&mut cmd).wait_exit(TIMEOUT);
    assert!(status.success(), "fd-lister failed: {status:?}");
    let listing = read_fd_listing(&out);
    let text = fs::read_to_string(&out).expect("fd listing");
    let fds: Vec<i32> = listing.iter().map(|&(fd, _)| fd).collect();
    // 0-2, the dup2'd fd 7, and whatever the environment leaked into this test process.
    let mut expected = vec![0, 1, 2, 7];
    expected.extend(inheritable_fds());
    expected.sort_unstable();
    expected.dedup();
    assert_eq!(fds, expected, "listing:\n{text}");
    assert!(
        listing.contains(&(0, "/dev/null".to_owned())),
        "listing:\n{text}"
    );
    assert!(
        listing.contains(&(7, leak.display().to_string())),
        "listing:\n{text}"
    );
    assert!(
        !text.contains("cloexec"),
        "close-on-exec lock fd leaked:\n{text}"
    );
    assert!(
        !text.contains("/fd"),
        "the lister's own dir handle is listed:\n{text}"
    );
    drop(cloexec);
}

#[test]
fn exit_with_exits_with_a_code_or_dies_by_a_signal() {
    let run = |args: &[&str]| {
        KillOnDrop::spawn(Command::new(helper_bin!("exit-with")).args(args)).wait_exit(TIMEOUT)
    };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(run(&["--code", "7"]).code(), Some(7));
    assert_eq!(run(&["--code", "0"]).code(), Some(0));
    assert_eq!(run(&["--signal", "15"]).signal(), Some(15));
    assert_eq!(run(&["--signal", "9"]).signal(), Some(9));
    assert_eq!(run(&["--signal", "2"]).signal(), Some(2));
    assert_eq!(
        run(&["--signal", "17"]).code(),
        Some(1),
        "SIGCHLD does not kill"
    );
    assert_eq!(run(&["--bogus"]).code(), Some(2));
}

#[test]
fn step_shell_runs_commands_under_a_shell_in_its_own_group() {
    let sb = Sandbox::new();
    for bash in [false, true] {
        let ready = sb.fresh_mark("in-shell.ready");
        let script = r#"echo "step starts" >&2; "$HELPER" --ready "$READY""#;
        let mut cmd = sb
            .step_shell(script)
            .env("HELPER", helper_bin!("ignore-term"))
            .env("READY", &ready);
        if bash {
            cmd = cmd.bash();
        }
        let mut shell = cmd.spawn();
        shell.wait_line("step starts", TIMEOUT);
        wait_file(&ready, TIMEOUT);
        let helper = read_pids(&ready)[0];
        assert_eq!(shell.pgid(), shell.pid());
        assert_eq!(
            wait_child_named(shell.pid(), "ignore-term", TIMEOUT),
            helper,
            "the shell must stay the helper's parent (no exec of the last command)"
        );
        let info = proc_info(helper).expect("helper exists");
        assert_eq!((info.ppid, info.pgid), (shell.pid(), shell.pgid()));

        // Drone: SIGKILL the shell only; the helper survives (this is what tether's PDEATHSIG
        // is for). Woodpecker: SIGKILL the group; nothing survives.
        shell.kill_shell(Signal::SIGKILL);
        let finished = shell.wait_exit(TIMEOUT);
        assert_eq!(finished.signal, Some(9), "{finished}");
        assert!(pid_alive(helper), "only the shell was killed");
        shell.kill_group(Signal::SIGKILL);
        wait_pid_gone(helper, TIMEOUT);
    }
}

/// The fake agent reads the step's stdout and stderr (one pipe, or a socket; stderr to a file
/// when asked), exits with the step's status when the step ends, and once killed nobody reads
/// the step's output: the step's next write fails with EPIPE.
#[test]
fn fake_agent_reads_the_step_and_its_death_closes_the_pipe() {
    let sb = Sandbox::new();
    for (socket, stderr_to_file) in [(false, false), (true, false), (false, true)] {
        let what = format!("socket={socket} stderr_to_file={stderr_to_file}");
        let started = sb.fresh_mark("step.started");
        let release = sb.fresh_mark("step.release");
        let result = sb.fresh_mark("step.result");
        // SIGPIPE ignored in the step, so a write to the closed pipe fails instead of killing.
        let script = format!(
            "trap '' PIPE; echo out; echo err >&2; : > {started}; {wait}; \
             if echo more 2>/dev/null; then echo written > {result}; \
             else echo failed > {result}; fi",
            started = shell_quote(&started),
            wait = runner_tests::sh_wait_for(&shell_quote(&release)),
            result = shell_quote(&result),
        );
        let mut cmd = sb.fake_agent(&script);
        if socket {
            cmd = cmd.socket();
        }
        if stderr_to_file {
            cmd = cmd.stderr_to_file();
        }
        let mut agent = cmd.spawn();
        wait_file(&started, TIMEOUT);
        assert_eq!(
            proc_info(agent.shell_pid).map(|i| i.ppid),
            Some(agent.pid()),
            "{what}: the step shell is the agent's child"
        );
        wait_line(&agent.log, "out", TIMEOUT);
        match &agent.stderr_path {
            Some(path) => {
                wait_line(path, "err", TIMEOUT);
                assert!(
                    !agent.output().contains("err"),
                    "{what}: {}",
                    agent.output()
                );
            }
            None => {
                wait_line(&agent.log, "err", TIMEOUT);
            }
        }
        agent.kill();
        assert!(
            pid_alive(agent.shell_pid),
            "{what}: the step outlives its agent"
        );
        fs::write(&release, "").expect("releasing the step");
        wait_file(&result, TIMEOUT);
        wait_line(&result, "failed", TIMEOUT);
        wait_pid_gone(agent.shell_pid, TIMEOUT);
    }
    // A step that ends by itself: the agent copies it all and exits with its status.
    let mut agent = sb.fake_agent("echo bye; exit 7").spawn();
    assert_eq!(agent.try_wait_exit(TIMEOUT), Some(7));
    assert_eq!(agent.output(), "bye\n");
}

#[test]
fn step_shell_exits_with_the_failing_command_status() {
    let sb = Sandbox::new();
    let mut shell = sb
        .step_shell(r#""$EXIT_WITH" --code 143; echo "not reached" >&2"#)
        .env("EXIT_WITH", helper_bin!("exit-with"))
        .spawn();
    let finished = shell.wait_exit(TIMEOUT);
    finished.assert_code(143).assert_stderr_lacks("not reached");
    let mut shell = sb.step_shell("true").spawn();
    shell.wait_exit(TIMEOUT).assert_code(0);
}

#[test]
fn sandbox_drop_kills_processes_that_mention_it() {
    let sb = Sandbox::new();
    let ready = sb.mark("stray.ready");
    // A stray the test forgot about: no guard, no KillOnDrop.
    let mut stray = Command::new(helper_bin!("ignore-term"))
        .arg("--ready")
        .arg(&ready)
        .spawn()
        .expect("spawn stray");
    wait_file(&ready, TIMEOUT);
    let pid = stray.id() as i32;
    assert_eq!(sb.leftovers().len(), 1, "{:?}", sb.leftovers());
    let root = sb.path().to_path_buf();
    drop(sb);
    assert!(!pid_alive(pid), "the sandbox sweep killed it");
    stray.wait().expect("reap stray");
    assert!(!root.exists(), "the sandbox dir is removed");
}

/// A KillOnDrop whose group leader was already reaped still kills the members left in its
/// group (they keep the number reserved, so it cannot name anyone else's group); the group
/// kill is skipped only when a different process owns the number now.
#[test]
fn kill_on_drop_kills_a_reaped_leaders_group_members() {
    let sb = Sandbox::new();
    let ready = sb.mark("member.ready");
    let script = format!(
        "{helper} --ready {ready} & {poll}; exit 0",
        helper = shell_quote(helper_bin!("ignore-term")),
        ready = shell_quote(&ready),
        poll = runner_tests::sh_wait_for(&shell_quote(&ready)),
    );
    let mut leader = KillOnDrop::spawn(Command::new("sh").args(["-c", &script]).process_group(0));
    let status = leader.wait_exit(TIMEOUT);
    assert_eq!(KillOnDrop::code_of(status), 0);
    let member = read_pids(&ready)[0];
    sb.guard().pid(member);
    assert_eq!(proc_info(member).map(|i| i.pgid), Some(leader.pid()));
    assert!(proc_info(leader.pid()).is_none(), "the leader is reaped");
    drop(leader);
    wait_pid_gone(member, TIMEOUT);
}

#[test]
fn process_guard_kills_recorded_pids_once() {
    let sb = Sandbox::new();
    let ready = sb.mark("guarded.ready");
    let mut child = Command::new(helper_bin!("ignore-term"))
        .arg("--ready")
        .arg(&ready)
        .spawn()
        .expect("spawn");
    wait_file(&ready, TIMEOUT);
    let pid = child.id() as i32;
    let guard = ProcessGuard::new();
    guard.pid(pid);
    guard.pid(999_999_999); // never existed: ignored
    drop(guard);
    wait_pid_gone(pid, TIMEOUT);
    child.wait().expect("reap");
}

#[test]
fn sandbox_layout_and_modes() {
    let sb = Sandbox::new();
    let mode = |p: std::path::PathBuf| fs::metadata(&p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(sb.lock_dir()), 0o755);
    assert_eq!(mode(sb.runs_dir()), 0o700);
    assert_eq!(
        sb.lock_path("a.example.org"),
        sb.path().join("locks/app-a.example.org.lock")
    );
    assert_eq!(sb.slot_lock_path(3), sb.path().join("locks/slot-03.lock"));
    assert_eq!(sb.run_dir("267"), sb.path().join("runs/267"));
    assert_eq!(sb.mark("x"), sb.path().join("marks/x"));
    assert_ne!(sb.fresh_mark("x"), sb.fresh_mark("x"));
    assert!(sb.run_record("267").is_none());
}

#[test]
fn wait_line_and_count_lines_see_complete_lines_only() {
    let sb = Sandbox::new();
    let file = sb.mark("log");
    fs::write(&file, "tether: one\ntether: tw").expect("write");
    assert_eq!(count_lines(&file, "tether:"), 1);
    assert_eq!(count_lines(sb.mark("missing"), "x"), 0);
    let msg = panic_message(|| {
        wait_line(&file, "tw", Duration::from_millis(50));
    });
    assert!(msg.contains("tether: tw"), "shows the content: {msg}");
    fs::write(&file, "tether: one\ntether: two\n").expect("write");
    assert_eq!(wait_line(&file, "tw", TIMEOUT), "tether: two");
}

#[test]
fn finished_assertions_print_command_status_and_stderr() {
    let finished = Finished {
        code: Some(3),
        signal: None,
        stderr: "tether: app lock a.example.org: acquired after 0s\n\
                 tether: run r1 summary: app=a.example.org result=failed exit=3 lock_wait=0s \
                 runtime=1s teardown=ok\n"
            .to_owned(),
        stdout: String::new(),
        command_line: "tether run --app a.example.org -- false".to_owned(),
    };
    finished.assert_code(3).assert_stderr_contains("acquired");
    assert_eq!(finished.summary_field("result"), Some("failed"));
    assert_eq!(finished.summary_field("exit"), Some("3"));
    assert_eq!(finished.summary_field("teardown"), Some("ok"));
    assert_eq!(finished.summary_field("nope"), None);
    let msg = panic_message(|| {
        finished.assert_code(0);
    });
    for needle in [
        "expected exit code 0",
        "exit code 3",
        "-- false",
        "summary: app=",
    ] {
        assert!(msg.contains(needle), "{needle:?} missing from:\n{msg}");
    }
}

#[test]
fn running_tether_machinery_works_on_a_stand_in_binary() {
    // The builder, stderr polling and exit handling, with /bin/sh standing in for tether.
    let sb = Sandbox::new();
    let ready = sb.mark("stand-in.ready");
    let mut running = sb
        .tether("")
        .no_sandbox_dirs()
        .bin("/bin/sh")
        .args([
            "-c",
            r#"echo "tether: hello $X" >&2; exec "$H" --ready "$R""#,
        ])
        .env("X", "world")
        .env("H", helper_bin!("ignore-term"))
        .env("R", &ready)
        .spawn();
    assert_eq!(running.wait_line("hello", TIMEOUT), "tether: hello world");
    wait_file(&ready, TIMEOUT);
    assert!(running.is_running());
    assert_eq!(
        proc_info(running.pid()).map(|i| i.pgid),
        Some(running.pid()),
        "own process group by default"
    );
    running.signal(Signal::SIGTERM); // ignored
    assert!(running.is_running());
    running.signal(Signal::SIGKILL);
    let finished = running.wait_exit(TIMEOUT);
    assert_eq!(finished.signal, Some(9), "{finished}");
    assert!(finished.stderr.contains("hello world"));

    // wait_line fails fast, with the status, when the process exits without the line.
    let mut quick = sb
        .tether("")
        .no_sandbox_dirs()
        .bin(helper_bin!("exit-with"))
        .args(["--code", "5"])
        .spawn();
    let msg = panic_message(|| {
        quick.wait_line("never printed", TIMEOUT);
    });
    assert!(msg.contains("exited (exit code 5)"), "{msg}");

    let finished = sb
        .tether("")
        .no_sandbox_dirs()
        .bin(helper_bin!("exit-with"))
        .args(["--code", "4"])
        .run();
    finished.assert_code(4);
}

#[test]
fn tether_cmd_builds_the_documented_argv() {
    let sb = Sandbox::new();
    let cmd = sb
        .tether_run()
        .bin("/opt/tether")
        .app("a.example.org")
        .run_id("r-1")
        .teardown("echo down >> 'x y'")
        .args(["--grace", "1s"])
        .env("TETHER_APP", "b.example.org")
        .command(["sh", "-c", "exit 3"]);
    let lock_dir = sb.lock_dir().display().to_string();
    let runs_dir = sb.runs_dir().display().to_string();
    let argv: Vec<String> = cmd
        .argv()
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        argv,
        [
            "run",
            "--lock-dir",
            &lock_dir,
            "--runs-dir",
            &runs_dir,
            "--app",
            "a.example.org",
            "--run-id",
            "r-1",
            "--teardown",
            "echo down >> 'x y'",
            "--grace",
            "1s",
            "--",
            "sh",
            "-c",
            "exit 3"
        ]
    );
    assert_eq!(
        cmd.to_shell(),
        format!(
            "TETHER_APP=b.example.org /opt/tether run --lock-dir {lock_dir} --runs-dir {runs_dir} \
             --app a.example.org --run-id r-1 --teardown 'echo down >> '\\''x y'\\''' \
             --grace 1s -- sh -c 'exit 3'"
        )
    );
}

#[test]
fn tether_bin_resolution_explains_how_to_build_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let deps = dir.path().join("target/debug/deps");
    fs::create_dir_all(&deps).expect("mkdir");
    let exe = deps.join("concurrency-0123abcd");
    let err = resolve_tether_bin(None, Some(exe.clone())).expect_err("missing binary");
    assert!(err.contains("cargo test --workspace"), "{err}");
    assert!(err.contains("target/debug/tether"), "{err}");
    let bin = dir.path().join("target/debug/tether");
    fs::write(&bin, "").expect("fake bin");
    assert_eq!(resolve_tether_bin(None, Some(exe.clone())), Ok(bin.clone()));
    assert_eq!(resolve_tether_bin(Some(bin.clone().into()), None), Ok(bin));
    let err = resolve_tether_bin(Some("/nonexistent/tether".into()), Some(exe))
        .expect_err("bad TETHER_BIN");
    assert!(err.contains("TETHER_BIN=/nonexistent/tether"), "{err}");
}

#[test]
fn helper_bin_at_runtime_matches_the_compile_time_path() {
    for (runtime, compile_time) in [
        (helper_bin("tree-helper"), helper_bin!("tree-helper")),
        (helper_bin("lock-holder"), helper_bin!("lock-holder")),
    ] {
        assert_eq!(
            runtime.canonicalize().expect("runtime path"),
            compile_time.canonicalize().expect("compile-time path")
        );
    }
}
