//! Per-app serialization, lock hygiene and reconcile, against the real kernel (PROTOCOL §3–§6, §12).
//!
//! Every test drives the real `tether` binary with real flocks. Orderings are never hoped for:
//! a waiter is proven blocked in the kernel (`/proc/locks`) before its holder is released, a
//! holder's command waits for a release marker the test creates, and commands announce what
//! they did in marker files or an `O_APPEND` log. Shell-side waits are bounded loops (they give
//! up with status 99), so a broken tether fails a test instead of hanging it.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use runner_tests::{
    app_waiters, helper_bin, lock_is_free, log_lines, names, pid_alive, pid_comm, proc_info,
    read_fd_listing, rid, run_dirs, sh_wait_for, shell_quote, snapshot, start_held_run, touch,
    wait_all_gone, wait_app_queue, wait_app_waiters, wait_file, wait_holder_pid, wait_line,
    wait_pids, wait_until, Finished, RunningTether, Sandbox, TIMEOUT,
};

/// The `pid` of run `id`'s record once its state is `state`.
fn wait_record_pid(sb: &Sandbox, id: &str, state: &str) -> i32 {
    sb.wait_record(id, state)["pid"]
        .as_i64()
        .unwrap_or_default() as i32
}

/// Index of the first stderr line containing every one of `parts`.
fn line_index(f: &Finished, parts: &[&str]) -> Option<usize> {
    f.stderr
        .lines()
        .position(|l| parts.iter().all(|p| l.contains(p)))
}

/// CLI-CONTRACT §1, CLI-CONTRACT §5 step 4: four runs of one app take turns; each waiter is proven blocked in
/// `flock` before the holder is let go, says whom it waits for, and says when it got the lock.
#[test]
fn same_app_runs_never_overlap() {
    let sb = Sandbox::new();
    let app = "serial.example.org";
    let lock = sb.lock_path(app);
    let log = sb.mark("turns.log");
    let release = sb.mark("release");
    fs::create_dir(&release).expect("creating the release dir");
    let wait = sh_wait_for(&format!("{}/\"$TETHER_RUN_ID\"", shell_quote(&release)));
    let log_q = shell_quote(&log);
    let script = format!(
        r#"echo "start $TETHER_RUN_ID" >> {log_q}; {wait}; echo "end $TETHER_RUN_ID" >> {log_q}"#
    );
    let run = |id: &str| {
        sb.tether_run()
            .app(app)
            .run_id(id)
            .command(["sh", "-c", &script])
            .spawn()
    };

    let ids: Vec<String> = (0..4).map(|n| rid(&sb, &format!("r{n}"))).collect();
    let r0 = ids[0].as_str();
    let mut first = run(r0);
    wait_line(&log, &format!("start {r0}"), TIMEOUT);
    let core0 = wait_holder_pid(&sb, app, r0);
    assert_eq!(
        core0,
        first.wait_core_pid(TIMEOUT),
        "the lock metadata's pid is r0's core"
    );
    let mut waiters: Vec<(String, RunningTether)> = ids[1..]
        .iter()
        .map(|id| (id.to_string(), run(id)))
        .collect();
    wait_app_queue(&sb, app, 3, TIMEOUT);
    // A run stands in the queue from its arrival (its ticket comes before its run dir claim,
    // D83) and says its waiting line a moment later: each says it while r0 still holds.
    for (_, waiter) in &mut waiters {
        waiter.wait_line("— waiting", TIMEOUT);
    }

    let mut order: Vec<String> = Vec::new();
    for k in 0..4 {
        runner_tests::wait_count(&log, "start ", k + 1, TIMEOUT);
        let lines = log_lines(&log);
        let holder = lines
            .last()
            .and_then(|l| l.strip_prefix("start "))
            .unwrap_or_else(|| panic!("turn {k}: the log does not end in a start: {lines:?}"))
            .to_owned();
        assert_eq!(
            lines.len(),
            2 * k + 1,
            "turn {k}: runs overlap (log {lines:?})"
        );
        assert!(
            !order.contains(&holder),
            "{holder} ran twice (log {lines:?})"
        );
        // Everyone else is queued (PROTOCOL §15; under a cluster in the server's queue, D84)
        // while `holder` runs, and nobody started.
        if k < 3 {
            wait_app_queue(&sb, app, 3 - k, TIMEOUT);
        }
        assert_eq!(
            log_lines(&log),
            lines,
            "a run started while {holder} held the app"
        );
        touch(&release.join(&holder));
        wait_line(&log, &format!("end {holder}"), TIMEOUT);
        order.push(holder);
    }
    assert_eq!(order[0], r0, "the first holder goes first");

    first.wait_exit(TIMEOUT).assert_code(0);
    let mut finished = Vec::new();
    for (id, waiter) in &mut waiters {
        let f = waiter.wait_exit(TIMEOUT);
        f.assert_code(0);
        finished.push((id.clone(), f));
    }

    let expected: Vec<String> = order
        .iter()
        .flat_map(|id| [format!("start {id}"), format!("end {id}")])
        .collect();
    assert_eq!(
        log_lines(&log),
        expected,
        "strictly alternating start/end pairs"
    );
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, ids);

    for (id, f) in &finished {
        // "position p of n — held by …" on one host; no position under a cluster (§25).
        let held_by = format!("held by run {r0} (pid {core0}, ");
        let waiting = line_index(f, &[&held_by, "— waiting"])
            .unwrap_or_else(|| panic!("{id}: no waiting line naming {r0} and pid {core0}\n{f}"));
        let acquired = line_index(f, &[&format!("tether: app lock {app}: acquired after ")])
            .unwrap_or_else(|| panic!("{id}: no acquired line\n{f}"));
        assert!(waiting < acquired, "{id}: waiting before acquired\n{f}");
    }
    assert!(lock_is_free(&lock));
}

/// CLI-CONTRACT §1: runs of different apps proceed in parallel — each command waits for the other's
/// marker, so both can only succeed if they run at the same time.
#[test]
fn different_apps_overlap() {
    let sb = Sandbox::new();
    let (mark_a, mark_b) = (sb.mark("a.started"), sb.mark("b.started"));
    let cmd = |mine: &Path, other: &Path| {
        format!(
            "touch {}; {}",
            shell_quote(mine),
            sh_wait_for(&shell_quote(other))
        )
    };
    let script_a = cmd(&mark_a, &mark_b);
    let script_b = cmd(&mark_b, &mark_a);
    let mut a = sb
        .tether_run()
        .app("a.example.org")
        .run_id(rid(&sb, "run-a"))
        .command(["sh", "-c", &script_a])
        .spawn();
    let mut b = sb
        .tether_run()
        .app("b.example.org")
        .run_id(rid(&sb, "run-b"))
        .command(["sh", "-c", &script_b])
        .spawn();
    let fa = a.wait_exit(TIMEOUT);
    let fb = b.wait_exit(TIMEOUT);
    for f in [&fa, &fb] {
        f.assert_code(0)
            .assert_stderr_lacks("held by")
            .assert_stderr_contains("result=passed");
    }
}

/// Starts a holder run of `app` ([`start_held_run`]: its command waits for `release`);
/// returns it once it holds the app, with its core pid (from the lock metadata).
fn start_holder(
    sb: &Sandbox,
    app: &str,
    id: &str,
    release: &Path,
    extra: &[&str],
) -> (RunningTether, i32) {
    let held = start_held_run(sb, app, id, release, |cmd| cmd.args(extra));
    (held.run, held.core)
}

/// CLI-CONTRACT §13, CLI-CONTRACT: the waiting line names the holder's run id and core pid, and is
/// repeated every `--wait-progress-interval`.
#[test]
fn waiting_line_names_holder_and_repeats() {
    let sb = Sandbox::new();
    let app = "progress.example.org";
    let release = sb.mark("release");
    let holder_id = rid(&sb, "holder");
    let (mut holder, core) = start_holder(&sb, app, &holder_id, &release, &[]);

    let mut waiter = sb
        .tether_run()
        .app(app)
        .run_id(rid(&sb, "waiter"))
        .args(["--wait-progress-interval", "300ms"])
        .command(["true"])
        .spawn();
    wait_app_waiters(&sb, app, 1, TIMEOUT);
    // With the default 60 s interval a second line could not come this soon.
    waiter.wait_count("— waiting", 2, Duration::from_secs(10));
    assert!(
        !app_waiters(&sb, app).is_empty(),
        "still blocked (in the kernel, or in the cluster's queue under a cluster)"
    );

    touch(&release);
    holder.wait_exit(TIMEOUT).assert_code(0);
    let f = waiter.wait_exit(TIMEOUT);
    f.assert_code(0);
    let lines = f.stderr_lines("— waiting");
    assert!(lines.len() >= 2, "at least two waiting lines\n{f}");
    // The position in the queue — the host's, or under a cluster the cluster's (PROTOCOL §15
    // "Under a cluster"); the holder is of this host, so no host is named.
    let held_by =
        format!("tether: app lock {app}: position 1 of 1 — held by run {holder_id} (pid {core}, ");
    for line in &lines {
        assert!(
            line.starts_with(&held_by) && line.ends_with(") — waiting"),
            "waiting line {line:?} should start with {held_by:?}\n{f}"
        );
    }
    f.assert_stderr_contains(&format!("tether: app lock {app}: acquired after "));
}

/// CLI-CONTRACT §3, PROTOCOL §3: two runs of one app have distinct run dirs; the waiting run is `queued` in
/// its own run dir and touches neither the holder's run dir nor the holder's lock metadata.
#[test]
fn waiting_run_never_touches_the_holders_run_dir() {
    let sb = Sandbox::new();
    let app = "dirs.example.org";
    let release = sb.mark("release");
    let (holder_id, waiter_id) = (rid(&sb, "holder"), rid(&sb, "waiter"));
    let (mut holder, _core) = start_holder(&sb, app, &holder_id, &release, &[]);
    let holder_dir = sb.run_dir(&holder_id);
    let before = snapshot(&holder_dir, &[]);
    assert!(
        before.iter().any(|l| l.starts_with("run.json ")),
        "holder run dir has run.json: {before:#?}"
    );
    let meta_before = fs::read(sb.lock_path(app)).expect("reading the lock metadata");

    let mut waiter = sb
        .tether_run()
        .app(app)
        .run_id(&waiter_id)
        .command(["true"])
        .spawn();
    let waiters = wait_app_waiters(&sb, app, 1, TIMEOUT);
    waiter.wait_line("— waiting", TIMEOUT);
    let waiter_core = waiter.wait_core_pid(TIMEOUT);
    assert_eq!(
        waiters,
        vec![waiter_core],
        "the waiter's core is the one blocked"
    );

    let record = sb
        .run_record(&waiter_id)
        .expect("the waiter's run.json exists while it waits");
    assert_eq!(record["state"], "queued", "waiter record: {record}");
    assert_eq!(record["pid"], waiter_core, "waiter record: {record}");
    assert_ne!(sb.run_dir(&waiter_id), holder_dir);
    assert_eq!(
        snapshot(&holder_dir, &[]),
        before,
        "the waiter changed the holder's run dir"
    );
    assert_eq!(
        fs::read(sb.lock_path(app)).expect("reading the lock metadata"),
        meta_before,
        "the waiter changed the holder's lock metadata"
    );

    touch(&release);
    holder.wait_exit(TIMEOUT).assert_code(0);
    waiter.wait_exit(TIMEOUT).assert_code(0);
    assert_eq!(run_dirs(&sb.runs_dir()), Vec::<String>::new());
}

/// CLI-CONTRACT §5 step 3, CLI-CONTRACT §5 step 3: a second run with the id of a live run is refused with the first's
/// core pid, exit 125, runs nothing and leaves the first alone; the first finishes normally.
#[test]
fn same_run_id_twice_is_refused() {
    let sb = Sandbox::new();
    let app = "first.example.org";
    let release = sb.mark("release");
    let dup = rid(&sb, "dup");
    let (mut first, core) = start_holder(&sb, app, &dup, &release, &[]);
    let dir = sb.run_dir(&dup);
    let before = snapshot(&dir, &[]);

    let marker = sb.mark("second.ran");
    let second_app = "second.example.org";
    let f = sb
        .tether_run()
        .app(second_app)
        .run_id(&dup)
        .command(["touch", marker.to_str().unwrap()])
        .timeout(Duration::from_secs(20))
        .run();
    f.assert_code(125)
        .assert_stderr_contains(&format!("run id {dup} is in use by pid {core}"));
    assert!(!marker.exists(), "the second run ran its command\n{f}");
    assert!(
        !sb.lock_path(second_app).exists(),
        "the refused run created a lockfile\n{f}"
    );
    assert_eq!(
        snapshot(&dir, &[]),
        before,
        "the refused run touched the run dir"
    );
    assert!(first.is_running(), "the first run is still running");

    touch(&release);
    let ff = first.wait_exit(TIMEOUT);
    ff.assert_code(0).assert_stderr_contains("result=passed");
    assert!(!dir.exists(), "the first run removed its run dir");
}

fn assert_no_lock_fds(listing: &[(i32, String)], sb: &Sandbox, whose: &str) {
    let locks = sb.lock_dir();
    for (fd, target) in listing {
        assert!(
            !Path::new(target).starts_with(&locks) && !target.ends_with("/run.lock"),
            "{whose} inherited fd {fd} -> {target}: {listing:?}"
        );
    }
}

/// CLI-CONTRACT §5: neither the app lock fd nor the run.lock fd reach the command or the teardown
/// command, so a daemon the command leaves behind cannot keep the app locked (and it is killed
/// at teardown anyway).
#[test]
fn lock_fds_are_not_inherited_and_a_daemon_does_not_keep_the_lock() {
    let sb = Sandbox::new();
    let app = "fds.example.org";
    let fdl = helper_bin!("fd-lister");
    let (cmd_fds, td_fds) = (sb.mark("command.fds"), sb.mark("teardown.fds"));
    let daemon_file = sb.mark("daemon.pid");
    let release = sb.mark("release");
    let script = format!(
        "{} --out {}; \
         DP={} setsid sh -c 'echo $$ > \"$DP.tmp\" && mv \"$DP.tmp\" \"$DP\" && exec sleep 1000' \
         </dev/null >/dev/null 2>&1 & {}",
        shell_quote(&fdl),
        shell_quote(&cmd_fds),
        shell_quote(&daemon_file),
        sh_wait_for(&shell_quote(&release))
    );
    let mut run = sb
        .tether_run()
        .app(app)
        .run_id(rid(&sb, "fds"))
        .teardown(format!(
            "{} --out {}",
            shell_quote(&fdl),
            shell_quote(&td_fds)
        ))
        .command(["sh", "-c", &script])
        .spawn();

    let daemon = wait_pids(&daemon_file, TIMEOUT)[0];
    sb.guard().pid(daemon);
    wait_until("the daemon to exec sleep", TIMEOUT, || {
        pid_comm(daemon).as_deref() == Some("sleep")
    });
    let info = proc_info(daemon).expect("the daemon exists");
    assert_eq!(
        info.sid, daemon,
        "the daemon leads its own session: {info:?}"
    );
    let daemon_fds: Vec<(i32, String)> = fs::read_dir(format!("/proc/{daemon}/fd"))
        .expect("listing the daemon's fds")
        .flatten()
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            Some((fd, fs::read_link(e.path()).ok()?.display().to_string()))
        })
        .collect();
    assert_no_lock_fds(&daemon_fds, &sb, "the daemon");
    wait_file(&cmd_fds, TIMEOUT);

    touch(&release);
    let f = run.wait_exit(TIMEOUT);
    f.assert_code(0);
    assert!(
        lock_is_free(sb.lock_path(app)),
        "the app lock is free after tether exited\n{f}"
    );
    assert!(
        !pid_alive(daemon),
        "the daemon outlived the run: {:?}\n{f}",
        proc_info(daemon)
    );

    let cmd_listing = read_fd_listing(&cmd_fds);
    assert!(!cmd_listing.is_empty(), "fd-lister saw its stdio");
    assert_no_lock_fds(&cmd_listing, &sb, "the command");
    let td_listing = read_fd_listing(&td_fds);
    assert_no_lock_fds(&td_listing, &sb, "the teardown command");
}

/// CLI-CONTRACT §7, PROTOCOL §12: with the app busy, `--on-busy fail` exits 75 at once and `--lock-timeout
/// 500ms` exits 75 after at least 500 ms; neither runs its command nor leaves a run dir.
#[test]
fn busy_app_with_on_busy_fail_or_lock_timeout_exits_75_and_runs_nothing() {
    let sb = Sandbox::new();
    let app = "busy.example.org";
    let release = sb.mark("release");
    let holder_id = rid(&sb, "holder");
    let (fail_id, timeout_id) = (rid(&sb, "busy-fail"), rid(&sb, "busy-timeout"));
    let (mut holder, _core) = start_holder(&sb, app, &holder_id, &release, &[]);

    let marker = sb.mark("fail.ran");
    let t0 = Instant::now();
    let f = sb
        .tether_run()
        .app(app)
        .run_id(&fail_id)
        .args(["--on-busy", "fail"])
        .command(["touch", marker.to_str().unwrap()])
        .timeout(Duration::from_secs(20))
        .run();
    let took = t0.elapsed();
    f.assert_code(75);
    assert!(
        took < Duration::from_secs(5),
        "--on-busy fail took {took:?}\n{f}"
    );
    assert!(!marker.exists(), "--on-busy fail ran the command\n{f}");
    assert!(
        !sb.run_dir(&fail_id).exists(),
        "--on-busy fail left its run dir\n{f}"
    );

    let marker = sb.mark("timeout.ran");
    let t0 = Instant::now();
    let f = sb
        .tether_run()
        .app(app)
        .run_id(&timeout_id)
        .args(["--lock-timeout", "500ms"])
        .command(["touch", marker.to_str().unwrap()])
        .timeout(Duration::from_secs(20))
        .run();
    let took = t0.elapsed();
    f.assert_code(75)
        .assert_stderr_contains(&format!("held by run {holder_id} "));
    assert!(
        took >= Duration::from_millis(500),
        "--lock-timeout 500ms gave up after {took:?}\n{f}"
    );
    assert!(!marker.exists(), "--lock-timeout ran the command\n{f}");
    assert!(
        !sb.run_dir(&timeout_id).exists(),
        "--lock-timeout left its run dir\n{f}"
    );
    assert_eq!(run_dirs(&sb.runs_dir()), std::slice::from_ref(&holder_id));
    if sb.cluster().is_none() {
        // The queue the timed-out run stood in keeps only its counter (PROTOCOL §15).
        assert_eq!(
            names(&sb.lock_dir()),
            [format!("app-{app}.lock"), format!("queue-{app}")]
        );
        assert_eq!(
            names(&sb.lock_dir().join(format!("queue-{app}"))),
            ["counter"]
        );
    } else {
        // Under a cluster the run waited in the server's queue, not the host's (D84): it took
        // no host ticket, and its place on the server ended with its session when it gave up.
        assert_eq!(names(&sb.lock_dir()), [format!("app-{app}.lock")]);
        assert_eq!(app_waiters(&sb, app), Vec::<i32>::new(), "still queued");
    }

    assert!(holder.is_running(), "the holder was left alone");
    touch(&release);
    holder.wait_exit(TIMEOUT).assert_code(0);
}

/// The path of the cgroup2 mount, if this host has one (then tether must use a run cgroup).
fn cgroup2_mounted() -> bool {
    fs::read_to_string("/proc/self/mountinfo").is_ok_and(|t| {
        t.lines().any(|l| {
            l.split_once(" - ")
                .is_some_and(|(_, post)| post.starts_with("cgroup2 "))
        })
    })
}

/// Starts run `id` of `app` whose command is a tree-helper tree, SIGKILLs its core, and waits
/// for its front to end. Returns the tree's pids (all but the first, whose PDEATHSIG killed
/// it, are proven still alive: the leftovers a reaper must kill).
fn kill_core_of_tree_run(
    sb: &Sandbox,
    app: &str,
    id: &str,
    teardown: &str,
    no_cgroup: bool,
) -> Vec<i32> {
    let pids_file = sb.fresh_mark("tree.pids");
    let tree = helper_bin!("tree-helper");
    let mut cmd = sb
        .tether_run()
        .app(app)
        .run_id(id)
        .teardown(teardown)
        .command([
            tree.to_str().unwrap(),
            "--pids-file",
            pids_file.to_str().unwrap(),
            "--children",
            "2",
            "--setsid",
            "--double-fork",
        ]);
    if no_cgroup {
        cmd = cmd.env("TETHER_NO_CGROUP", "1");
    }
    let mut run = cmd.spawn();
    let pids = wait_pids(&pids_file, TIMEOUT);
    sb.guard().pids(&pids);
    let core = wait_record_pid(sb, id, "running");
    assert_eq!(core, run.wait_core_pid(TIMEOUT), "run.json pid is the core");
    let record = sb.run_record(id).expect("run.json");
    if no_cgroup {
        assert!(record["cgroup"].is_null(), "TETHER_NO_CGROUP=1: {record}");
    } else if cgroup2_mounted() {
        assert!(
            record["cgroup"].is_string(),
            "expected a run cgroup: {record}"
        );
    }

    runner_tests::sigkill_core(core);
    run.wait_exit(TIMEOUT);
    let survivors: Vec<i32> = pids[1..].to_vec();
    for &pid in &survivors {
        assert!(
            pid_alive(pid),
            "precondition: leftover {pid} of the dead run is alive ({pids:?})"
        );
    }
    assert!(
        lock_is_free(sb.lock_path(app)),
        "the kernel released the dead run's lock"
    );
    pids
}

fn reconcile_reaps_a_dead_run_once(no_cgroup: bool) {
    let sb = Sandbox::new();
    let app = "reap.example.org";
    let (dead, next, third) = (rid(&sb, "dead"), rid(&sb, "next"), rid(&sb, "third"));
    let log = sb.mark("teardown.log");
    let teardown = format!(
        "echo \"$TETHER_REASON $TETHER_RUN_ID\" >> {}",
        shell_quote(&log)
    );
    let pids = kill_core_of_tree_run(&sb, app, &dead, &teardown, no_cgroup);
    assert!(sb.run_dir(&dead).exists(), "the dead run left its dir");

    let f = sb
        .tether_run()
        .app(app)
        .run_id(&next)
        .teardown(&teardown)
        .command(["true"])
        .run();
    f.assert_code(0)
        .assert_stderr_contains(&format!("reaping dead run {dead} of {app}"));
    assert_eq!(
        runner_tests::count_lines(&log, &format!("reaped {dead}")),
        1,
        "one reap of {dead}: {:?}\n{f}",
        log_lines(&log)
    );
    wait_all_gone(&pids, Duration::from_secs(5));
    assert!(
        !sb.run_dir(&dead).exists(),
        "the reap removed the dead run's dir\n{f}"
    );

    let f3 = sb
        .tether_run()
        .app(app)
        .run_id(&third)
        .teardown(&teardown)
        .command(["true"])
        .run();
    f3.assert_code(0).assert_stderr_lacks("reaping");
    assert_eq!(
        runner_tests::count_lines(&log, "reaped"),
        1,
        "the third run reaped again: {:?}\n{f3}",
        log_lines(&log)
    );
    assert_eq!(
        log_lines(&log),
        [
            format!("reaped {dead}"),
            format!("exited {next}"),
            format!("exited {third}")
        ]
    );
}

/// CLI-CONTRACT §1, PROTOCOL §6: the next run of an app reaps a run whose core was SIGKILLed — leftovers
/// killed via the run cgroup, teardown once with `reaped`, run dir removed — and only once.
#[test]
fn next_run_reaps_a_sigkilled_run_once_with_cgroup() {
    reconcile_reaps_a_dead_run_once(false);
}

/// As above, with `TETHER_NO_CGROUP=1` for the dead run: leftovers are found by the
/// environment marker.
#[test]
fn next_run_reaps_a_sigkilled_run_once_without_cgroup() {
    reconcile_reaps_a_dead_run_once(true);
}

/// CLI-CONTRACT §5 step 3, PROTOCOL §6: re-using the run id of a dead run reaps it first (exactly once, under
/// the dead run's app lock), then runs; a later run of the dead run's app does not reap it
/// again. `other_app`: the new run is for another app than the dead one.
/// The new run (reusing dead run `id`'s id) passed; the teardown log shows the dead run reaped
/// once, then the new run's command, then `last` (the new run's own teardown line).
fn assert_reaped_once_before_the_command(
    f: &Finished,
    log: &Path,
    app: &str,
    id: &str,
    last: String,
) {
    f.assert_code(0)
        .assert_stderr_contains(&format!("reaping dead run {id} of {app}"));
    assert_eq!(
        log_lines(log),
        [format!("reaped {id}"), format!("cmd {id}"), last],
        "the dead run reaped once, before the new run's command\n{f}"
    );
}

fn reusing_a_dead_run_id_reaps_it_first(other_app: bool) {
    let sb = Sandbox::new();
    let app = "dead.example.org";
    let new_app = if other_app { "other.example.org" } else { app };
    let (reused, after) = (rid(&sb, "reused"), rid(&sb, "after"));
    let log = sb.mark("teardown.log");
    let teardown = format!(
        "echo \"$TETHER_REASON $TETHER_RUN_ID\" >> {}",
        shell_quote(&log)
    );
    let pids = kill_core_of_tree_run(&sb, app, &reused, &teardown, false);

    let script = format!("echo \"cmd $TETHER_RUN_ID\" >> {}", shell_quote(&log));
    let f = sb
        .tether_run()
        .app(new_app)
        .run_id(&reused)
        .teardown(&teardown)
        .command(["sh", "-c", &script])
        .run();
    assert_reaped_once_before_the_command(&f, &log, app, &reused, format!("exited {reused}"));
    assert_eq!(
        f.stderr_lines("reaping dead run").len(),
        1,
        "one reaping line\n{f}"
    );
    wait_all_gone(&pids, Duration::from_secs(5));
    assert!(!sb.run_dir(&reused).exists());

    let f2 = sb
        .tether_run()
        .app(app)
        .run_id(&after)
        .command(["true"])
        .run();
    f2.assert_code(0).assert_stderr_lacks("reaping");
    assert_eq!(
        runner_tests::count_lines(&log, "reaped"),
        1,
        "reaped again: {:?}\n{f2}",
        log_lines(&log)
    );
}

/// CLI-CONTRACT §5 step 3 + CLI-CONTRACT §12: a run reusing a dead run's id while the app is busy (here a plain flock holder
/// that never reconciles) must not overwrite the dead run's record with its own `queued` one
/// while it waits: the reap under the app lock takes the dead run's teardown command and
/// cgroup from that record.
#[test]
fn reusing_a_dead_run_id_while_the_app_is_busy_keeps_its_record_for_the_reap() {
    let sb = Sandbox::new();
    let app = "dead.example.org";
    let reused = rid(&sb, "reused");
    let log = sb.mark("teardown.log");
    let teardown = format!(
        "echo \"$TETHER_REASON $TETHER_RUN_ID\" >> {}",
        shell_quote(&log)
    );
    let pids = kill_core_of_tree_run(&sb, app, &reused, &teardown, false);
    let dead_pid = sb.run_record(&reused).expect("the dead run's record")["pid"].clone();

    let held = runner_tests::hold_lock(sb.lock_path(app));
    let script = format!("echo \"cmd $TETHER_RUN_ID\" >> {}", shell_quote(&log));
    let mut run = sb
        .tether_run()
        .app(app)
        .run_id(&reused)
        .teardown("echo \"new $TETHER_REASON\" >> ".to_owned() + &shell_quote(&log))
        .command(["sh", "-c", &script])
        .spawn();
    wait_app_waiters(&sb, app, 1, TIMEOUT);
    let record = sb.run_record(&reused).expect("a record while waiting");
    assert_eq!(
        (record["pid"].clone(), record["state"].clone()),
        (dead_pid, serde_json::json!("running")),
        "the waiting run replaced the dead run's record"
    );
    drop(held);
    let f = run.wait_exit(TIMEOUT);
    assert_reaped_once_before_the_command(&f, &log, app, &reused, "new exited".to_owned());
    wait_all_gone(&pids, Duration::from_secs(5));
}

/// PROTOCOL §15, "Why it cannot deadlock" (DECISIONS D83): a run that finds its app busy takes
/// its ticket on arrival; when its claim then turns up a dead run of *another* app under its run
/// id, it leaves its app's queue before it waits for that app's lock to reap it — it never
/// stands in one app's queue while waiting for another app — and queues again afterwards.
#[test]
fn an_arriving_run_waits_to_reap_a_dead_run_of_another_app_outside_its_queue() {
    let sb = Sandbox::new();
    let (dead_app, app) = ("dead.example.org", "arrival.example.org");
    let reused = rid(&sb, "reused");
    let log = sb.mark("teardown.log");
    let teardown = format!(
        "echo \"$TETHER_REASON $TETHER_RUN_ID\" >> {}",
        shell_quote(&log)
    );
    let pids = kill_core_of_tree_run(&sb, dead_app, &reused, &teardown, false);
    let dead_app_held = runner_tests::hold_lock(sb.lock_path(dead_app));
    let release = sb.fresh_mark("release");
    let mut holder = start_held_run(&sb, app, &rid(&sb, "holder"), &release, |c| c);
    let script = format!("echo \"cmd $TETHER_RUN_ID\" >> {}", shell_quote(&log));
    let mut run = sb
        .tether_run()
        .app(app)
        .run_id(&reused)
        .teardown(&teardown)
        .command(["sh", "-c", &script])
        .spawn();
    let core = wait_app_waiters(&sb, dead_app, 1, TIMEOUT)[0];
    assert_eq!(core, run.wait_core_pid(TIMEOUT));
    assert!(
        !runner_tests::app_queue(&sb, app).contains(&core),
        "queued for {app} while waiting for {dead_app}"
    );
    drop(dead_app_held);
    wait_until("the run to queue again", TIMEOUT, || {
        runner_tests::app_queue(&sb, app).contains(&core)
    });
    touch(&release);
    holder.run.wait_exit(TIMEOUT).assert_code(0);
    let f = run.wait_exit(TIMEOUT);
    assert_reaped_once_before_the_command(&f, &log, dead_app, &reused, format!("exited {reused}"));
    wait_all_gone(&pids, Duration::from_secs(5));
}

#[test]
fn reusing_a_dead_run_id_of_the_same_app_reaps_it_once_first() {
    reusing_a_dead_run_id_reaps_it_first(false);
}

#[test]
fn reusing_a_dead_run_id_for_another_app_reaps_it_once_first() {
    reusing_a_dead_run_id_reaps_it_first(true);
}

/// D88: a run gives its record inodes to the runs dir's pool (`.spares/`, 0700) when it retires
/// its dir, and the next run writes its record into one of them instead of creating an inode;
/// that record is the new run's alone (nothing of the old one left after it).
#[test]
fn record_inodes_are_recycled_through_the_runs_dir_pool() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let sb = Sandbox::new();
    let app = "pool.example.org";
    // A long first record (its teardown command), so a shorter one written over it would show.
    sb.tether_run()
        .app(app)
        .teardown(format!("true {}", "x".repeat(2000)))
        .command(["true"])
        .run()
        .assert_code(0);
    let pool = sb.runs_dir().join(".spares");
    let meta = fs::metadata(&pool).expect("the pool exists after a run");
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    let pooled: Vec<u64> = fs::read_dir(&pool)
        .expect("listing the pool")
        .flatten()
        .map(|e| e.metadata().expect("a pool entry").ino())
        .collect();
    // run.json plus the spares of `queued`-less run with a teardown: `running`, `tearing-down`,
    // `clean`.
    assert!(pooled.len() >= 3, "pooled: {pooled:?}");
    assert_eq!(run_dirs(&sb.runs_dir()), Vec::<String>::new());

    let seen = sb.mark("seen");
    let id = rid(&sb, "second");
    sb.tether_run()
        .app(app)
        .run_id(&id)
        .command([
            "sh",
            "-c",
            &format!(
                "stat -c %i \"$TETHER_RUN_DIR/run.json\" > {0}.tmp && cat \"$TETHER_RUN_DIR/run.json\" >> {0}.tmp && mv {0}.tmp {0}",
                shell_quote(&seen)
            ),
        ])
        .run()
        .assert_code(0);
    let text = fs::read_to_string(&seen).expect("the command's note");
    let (ino, record) = text.split_once('\n').expect("inode, then the record");
    let ino: u64 = ino.trim().parse().expect("an inode number");
    assert!(
        pooled.contains(&ino),
        "the second run's record {ino} is not one of the pooled inodes {pooled:?}"
    );
    let record: serde_json::Value =
        serde_json::from_str(record).expect("the whole file is one record, no old tail");
    assert_eq!(record["run_id"], id.as_str());
    assert_eq!(record["state"], "running");
}

/// D90: a run marks its runs dir `FS_TOPDIR_FL` (`chattr +T`), so ext4 spreads run dirs over its
/// block groups. Skipped, saying so, where the runs dir's filesystem has no inode flags.
#[test]
fn a_run_asks_the_filesystem_to_spread_run_dirs() {
    use std::os::fd::AsRawFd;
    const FS_TOPDIR_FL: libc::c_int = 0x0002_0000;
    let flags = |dir: &Path| -> Option<libc::c_int> {
        let f = fs::File::open(dir).ok()?;
        let mut flags: libc::c_int = 0;
        // SAFETY: FS_IOC_GETFLAGS writes one int to a live local.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) };
        (rc == 0).then_some(flags)
    };
    let sb = Sandbox::new();
    let runs = sb.runs_dir();
    fs::create_dir_all(&runs).expect("making the runs dir");
    let Some(before) = flags(&runs) else {
        println!(
            "SKIPPED: {} has no inode flags (FS_IOC_GETFLAGS)",
            runs.display()
        );
        return;
    };
    assert_eq!(before & FS_TOPDIR_FL, 0, "a fresh dir is not marked yet");
    sb.tether_run()
        .app("spread.example.org")
        .command(["true"])
        .run()
        .assert_code(0);
    let after = flags(&runs).expect("flags after the run");
    assert_ne!(after & FS_TOPDIR_FL, 0, "the runs dir is not marked +T");
    assert_eq!(after & !FS_TOPDIR_FL, before, "no other flag changed");
}
