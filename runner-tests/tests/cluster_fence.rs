//! Issue 16 §4 and §6: self-fencing against a real PostgreSQL 15 — a holder whose cluster
//! session is lost (killed by the server, the server stopped, the server silent) kills its
//! command's whole tree at once and tears down with `TETHER_REASON=lock-lost`, exit 75; a
//! waiter whose session dies ends with 75 and never runs its command; a quiet cluster run passes
//! with exactly one helper thread (the heartbeat), gone after the release (PROTOCOL §16).
//!
//! Two "hosts" are two pairs of lock and runs dirs in one sandbox, as in `cluster_lock.rs`.
//! The knobs are small so each case is fast: heartbeat 200 ms, self-fence 1 s, server release
//! 3.2 s (the smallest `config` allows for these: self_fence + heartbeat + 2 s).

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use runner_tests::pg::{StoppedBackend, PASSWORD, PASSWORD_ENV};
use runner_tests::{
    dir_host, log_lines, pid_alive, read_pids, rid, sh_wait_for, shell_quote, start_lock_holder,
    thread_names, touch, wait_count, wait_some, wait_until, write_config, Postgres, Sandbox,
    TIMEOUT,
};

const HEARTBEAT: Duration = Duration::from_millis(200);
const SELF_FENCE: Duration = Duration::from_secs(1);

/// The server's `cluster:` block with the suite's small fencing knobs.
fn fence_config(pg: &Postgres) -> String {
    format!(
        "{}  heartbeat: 200ms\n  self_fence: 1s\n  server_release: 3200ms\n",
        pg.config_block()
    )
}

/// Shell: the command's tree — a background child and the shell itself, both pids written to
/// `pids`, both waiting for `never` (which the test never makes).
fn tree_command(pids: &Path, never: &Path) -> Vec<String> {
    let wait = sh_wait_for(&shell_quote(never));
    let p = shell_quote(pids);
    vec![
        "sh".into(),
        "-c".into(),
        format!("( {wait} ) & echo $! >> {p}; echo $$ >> {p}; {wait}"),
    ]
}

/// A teardown that appends `$TETHER_REASON $TETHER_EXIT_CODE` to `file`.
fn reasons_teardown(file: &Path) -> String {
    format!(
        "echo \"$TETHER_REASON $TETHER_EXIT_CODE\" >> {}",
        shell_quote(file)
    )
}

/// The pids of the tree, once both are written.
fn tree_pids(pids: &Path) -> Vec<i32> {
    wait_count(pids, "", 2, TIMEOUT);
    read_pids(pids)
}

/// Wall-clock nanoseconds, comparable with `date +%s%N` in the runs' shells.
fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// The first line of `file` as nanoseconds (`date +%s%N`).
fn read_ns(file: &Path) -> i128 {
    let text = fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    text.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("{}: not a timestamp: {text:?}", file.display()))
}

/// Wait until the run `id` waits for an advisory lock (its session queued on the server).
fn wait_queued(pg: &Postgres, id: &str) {
    wait_until(
        &format!("{id} queued for the advisory lock"),
        TIMEOUT,
        || {
            pg.psql(&format!(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity s USING (pid) \
             WHERE l.locktype = 'advisory' AND NOT l.granted AND s.application_name = '{id}'"
            )) == "1"
        },
    );
}

/// The line prefix every lock-lost line of `app` on `pg` starts with.
fn lock_lost_prefix(pg: &Postgres, app: &str) -> String {
    format!(
        "tether: error: lock-lost: app lock {app}: cluster session to {} (127.0.0.1:{}) lost (",
        pg.url(),
        pg.port()
    )
}

#[test]
fn fence_a_holder_whose_session_is_killed_kills_its_tree_and_tears_down_lock_lost() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &fence_config(&pg));
    let a = dir_host(&sb, "host-a");
    let app = "fence-killed.test";
    let (pids, never, reasons) = (sb.mark("pids"), sb.mark("never"), sb.mark("reasons"));
    let id = rid(&sb, "a");
    let mut run = a
        .run(&sb, &cfg, app, &id)
        .teardown(reasons_teardown(&reasons))
        .command(tree_command(&pids, &never))
        .spawn();
    let tree = tree_pids(&pids);

    let t0 = Instant::now();
    assert_eq!(
        pg.psql(&format!(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = '{id}') t"
        )),
        "1",
        "the holder's session is the one named after its run"
    );
    let done = run.wait_exit(TIMEOUT);
    let took = t0.elapsed();
    done.assert_code(75);
    assert!(
        took < Duration::from_secs(5),
        "the holder noticed at its next heartbeat ({HEARTBEAT:?}), not after {took:?}\n{done}"
    );
    for pid in &tree {
        assert!(
            !pid_alive(*pid),
            "pid {pid} of the command's tree survived\n{done}"
        );
    }
    assert_eq!(
        log_lines(&reasons),
        vec!["lock-lost 75"],
        "the teardown ran once, told lock-lost\n{done}"
    );
    assert_eq!(done.summary_field("result"), Some("lock-lost"), "{done}");
    let lost = done.stderr_lines("lock-lost:");
    assert_eq!(lost.len(), 1, "one lock-lost line\n{done}");
    assert!(
        lost[0].starts_with(&lock_lost_prefix(&pg, app)),
        "the line names the app and the server\n{done}"
    );
    done.assert_stderr_lacks("grace");
}

#[test]
fn fence_a_lock_lost_while_waiting_for_a_slot_ends_the_run_with_nothing_run() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &fence_config(&pg));
    let a = dir_host(&sb, "host-a");
    let app = "fence-slot.test";
    let (ran, reasons) = (sb.mark("ran"), sb.mark("reasons"));
    // The host's only slot is someone else's: after the cluster lock the run waits for it.
    let _slot = start_lock_holder(&sb, a.lock.join("slot-00.lock"));
    let id = rid(&sb, "a");
    let mut run = a
        .run(&sb, &cfg, app, &id)
        .args(["--slots", "1"])
        .teardown(reasons_teardown(&reasons))
        .command(["sh", "-c", &format!("touch {}", shell_quote(&ran))])
        .spawn();
    run.wait_line("tether: the 1 slot is busy — waiting", TIMEOUT);
    pg.psql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{id}'"
    ));
    let done = run.wait_exit(TIMEOUT);
    done.assert_code(75);
    assert_eq!(done.summary_field("result"), Some("lock-lost"), "{done}");
    assert_eq!(done.stderr_lines("lock-lost:").len(), 1, "{done}");
    assert!(!ran.exists(), "the command never ran\n{done}");
    assert!(
        !reasons.exists(),
        "no teardown was owed: nothing ran\n{done}"
    );
}

#[test]
fn fence_the_database_stopping_fences_the_holder_ends_the_waiter_and_a_restart_serves_again() {
    let sb = Sandbox::new();
    let mut pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &fence_config(&pg));
    let (a, b) = (dir_host(&sb, "host-a"), dir_host(&sb, "host-b"));
    let app = "fence-restart.test";
    let (pids, never, reasons) = (sb.mark("pids"), sb.mark("never"), sb.mark("reasons"));
    let ran_b = sb.mark("ran-b");
    let id_a = rid(&sb, "a");
    let mut run_a = a
        .run(&sb, &cfg, app, &id_a)
        .teardown(reasons_teardown(&reasons))
        .command(tree_command(&pids, &never))
        .spawn();
    let tree = tree_pids(&pids);
    let id_b = rid(&sb, "b");
    let mut run_b = b
        .run(&sb, &cfg, app, &id_b)
        .command(["sh", "-c", &format!("touch {}", shell_quote(&ran_b))])
        .spawn();
    wait_queued(&pg, &id_b);

    pg.stop();
    let done_a = run_a.wait_exit(TIMEOUT);
    done_a.assert_code(75);
    assert_eq!(
        done_a.summary_field("result"),
        Some("lock-lost"),
        "{done_a}"
    );
    assert_eq!(log_lines(&reasons), vec!["lock-lost 75"], "{done_a}");
    for pid in &tree {
        assert!(!pid_alive(*pid), "pid {pid} survived\n{done_a}");
    }
    let done_b = run_b.wait_exit(TIMEOUT);
    done_b.assert_code(75);
    assert!(
        !ran_b.exists(),
        "the waiter never ran its command\n{done_b}"
    );
    let errors = done_b.stderr_lines("tether: error:");
    assert_eq!(errors.len(), 1, "one error line\n{done_b}");
    assert!(
        errors[0].contains(&format!("cluster {} (127.0.0.1:{})", pg.url(), pg.port())),
        "the waiter's line names the server\n{done_b}"
    );

    pg.restart();
    let id_c = rid(&sb, "c");
    let done_c = b
        .run(&sb, &cfg, app, &id_c)
        .command(["sh", "-c", "test -n \"$TETHER_FENCE\""])
        .run();
    done_c.assert_code(0);
    assert_eq!(done_c.summary_field("result"), Some("passed"), "{done_c}");
}

#[test]
fn fence_a_silent_server_fences_the_holder_in_time_and_the_lock_moves_only_after() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &fence_config(&pg));
    let (a, b) = (dir_host(&sb, "host-a"), dir_host(&sb, "host-b"));
    let app = "fence-silent.test";
    let never = sb.mark("never");
    for trial in 0..3 {
        let pids = sb.mark(&format!("pids-{trial}"));
        let a_teardown = sb.mark(&format!("a-teardown-{trial}"));
        let a_dead = sb.mark(&format!("a-dead-{trial}"));
        let b_start = sb.mark(&format!("b-start-{trial}"));
        let id_a = rid(&sb, &format!("a{trial}"));
        let mut run_a = a
            .run(&sb, &cfg, app, &id_a)
            .teardown(format!(
                "date +%s%N > {td}; for p in $(cat {p}); do kill -0 $p 2>/dev/null && echo \
                 alive $p >> {dead}; done; echo checked >> {dead}",
                td = shell_quote(&a_teardown),
                p = shell_quote(&pids),
                dead = shell_quote(&a_dead)
            ))
            .command(tree_command(&pids, &never))
            .spawn();
        tree_pids(&pids);
        let id_b = rid(&sb, &format!("b{trial}"));
        let mut run_b = b
            .run(&sb, &cfg, app, &id_b)
            .command([
                "sh",
                "-c",
                &format!("date +%s%N > {}", shell_quote(&b_start)),
            ])
            .spawn();
        wait_queued(&pg, &id_b);

        // The holder's backend stops answering; the server's kernel still acknowledges, so
        // only the heartbeat's missing answers can tell.
        let backend = pg.backend_of(&id_a);
        let t0 = now_ns();
        let stopped = StoppedBackend::stop(backend);
        run_a.wait_line("lock-lost:", TIMEOUT);
        drop(stopped);
        let done_a = run_a.wait_exit(TIMEOUT);
        done_a.assert_code(75);
        assert_eq!(
            done_a.summary_field("result"),
            Some("lock-lost"),
            "{done_a}"
        );
        assert!(
            done_a.stderr_lines("lock-lost:")[0].starts_with(&format!(
                "{}no answer to the heartbeat)",
                lock_lost_prefix(&pg, app)
            )),
            "{done_a}"
        );
        let done_b = run_b.wait_exit(TIMEOUT);
        done_b.assert_code(0);

        let fenced_after = Duration::from_nanos((read_ns(&a_teardown) - t0).max(0) as u64);
        assert!(
            // The last answered beat was sent up to one beat (and a late wake-up) before.
            fenced_after + HEARTBEAT * 2 >= SELF_FENCE,
            "trial {trial}: fenced {fenced_after:?} after the server fell silent: too early for \
             self_fence {SELF_FENCE:?}\n{done_a}"
        );
        assert!(
            fenced_after <= SELF_FENCE + Duration::from_secs(2),
            "trial {trial}: fenced {fenced_after:?} after the server fell silent\n{done_a}"
        );
        assert_eq!(
            log_lines(&a_dead),
            vec!["checked"],
            "trial {trial}: the holder's tree was dead when its teardown started"
        );
        assert!(
            read_ns(&a_teardown) < read_ns(&b_start),
            "trial {trial}: the other host's command started before the holder's was dead\n\
             {done_a}\n{done_b}"
        );
    }
}

#[test]
fn fence_a_quiet_cluster_run_passes_with_one_heartbeat_thread_gone_after_release() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &fence_config(&pg));
    let a = dir_host(&sb, "host-a");
    let app = "fence-quiet.test";
    let (threads, go) = (sb.mark("threads"), sb.mark("go"));
    let released = sb.mark("released");
    let id = rid(&sb, "a");
    // The setup and the command list the core's threads as they start (their parent forked
    // them from its main thread while the heartbeat ran).
    let list = format!(
        "echo $(cat /proc/$PPID/task/*/comm | sort) >> {}",
        shell_quote(&threads)
    );
    let mut run = a
        .run(&sb, &cfg, app, &id)
        .arg("--setup")
        .arg(&list)
        .command([
            "sh",
            "-c",
            &format!("{list}; {}", sh_wait_for(&shell_quote(&go))),
        ])
        .env("TETHER_FAULT_PAUSE_AFTER_RELEASE", &released)
        .spawn();
    wait_count(&threads, "", 2, TIMEOUT);
    let seen = log_lines(&threads);
    // Two threads each time: the main thread and the heartbeat, no other. A thread takes its
    // name from inside, a moment after it starts: at the setup's start the heartbeat may
    // still carry the name it inherited; by the command's it has beaten, named.
    assert!(
        ["cluster-heartbe tether", "tether tether"].contains(&seen[0].as_str()),
        "at the setup's start: {seen:?}"
    );
    assert_eq!(
        seen[1], "cluster-heartbe tether",
        "at the command's start: {seen:?}"
    );
    // The heartbeat beats: its statement, again and again on the run's session.
    let beat = |pg: &Postgres| {
        pg.psql(&format!(
            "SELECT query || ' @' || state_change FROM pg_stat_activity \
             WHERE application_name = '{id}'"
        ))
    };
    let update = format!(
        "UPDATE tether.runs SET heartbeat = now() WHERE run_id = '{id}' RETURNING superseded_by @"
    );
    let mut first = String::new();
    wait_until("the first heartbeat", TIMEOUT, || {
        first = beat(&pg);
        first.starts_with(&update)
    });
    wait_until("a second heartbeat", TIMEOUT, || beat(&pg) != first);
    touch(&go);

    let waiting = released.with_extension("waiting");
    // The core writes its pid into the file it creates: read until the pid is there.
    let core = wait_some("the core's pid at the fault point", TIMEOUT, || {
        fs::read_to_string(&waiting)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
    });
    let after = thread_names(core);
    touch(&released);
    let done = run.wait_exit(TIMEOUT);
    done.assert_code(0);
    assert_eq!(done.summary_field("result"), Some("passed"), "{done}");
    assert_eq!(
        after,
        vec!["tether".to_owned()],
        "after the release the heartbeat thread is gone\n{done}"
    );
    assert_eq!(
        pg.psql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{id}'"
        )),
        "0",
        "the session is closed"
    );
}

#[test]
fn fence_knobs_show_in_config_show_and_cluster_check_and_bad_ones_are_refused() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &fence_config(&pg));
    let shown = sb
        .tether("config")
        .no_sandbox_dirs()
        .arg("show")
        .arg("--config")
        .arg(&cfg)
        .run();
    shown.assert_code(0);
    for (key, value) in [
        ("cluster.heartbeat", "200ms"),
        ("cluster.self_fence", "1s"),
        ("cluster.server_release", "3200ms"),
    ] {
        assert!(
            shown
                .stdout
                .lines()
                .any(|l| l.starts_with(key) && l.contains(value)),
            "config show has {key} {value}\n{shown}"
        );
    }
    let check = sb
        .tether("cluster")
        .no_sandbox_dirs()
        .arg("check")
        .arg("--config")
        .arg(&cfg)
        .env(PASSWORD_ENV, PASSWORD)
        .run();
    check.assert_code(0);
    assert!(
        check.stdout.contains(
            "server: tcp_keepalives_idle=1 tcp_keepalives_interval=1 tcp_keepalives_count=2 \
             tcp_user_timeout=2200 client_connection_check_interval=1s"
        ),
        "cluster check shows what a lock session sets\n{check}"
    );
    assert!(
        check
            .stdout
            .contains("fencing     heartbeat=200ms self_fence=1s server_release=3200ms"),
        "{check}"
    );

    let bad = write_config(
        &sb,
        "bad.yml",
        &format!(
            "{}  self_fence: 2s\n  server_release: 3s\n",
            pg.config_block()
        ),
    );
    let refused = sb
        .tether("config")
        .no_sandbox_dirs()
        .arg("check")
        .arg("--config")
        .arg(&bad)
        .run();
    refused.assert_code(125);
    refused.assert_stderr_contains(
        "server_release (3s) must be at least self_fence + heartbeat + 2s (5s)",
    );
}
