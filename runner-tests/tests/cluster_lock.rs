//! Issue 16, part 1, item 5: the cluster-wide app lock against a real PostgreSQL 15.
//!
//! Two "hosts" are two pairs of lock and runs dirs in one sandbox: their `flock`s are separate
//! kernel objects, so only the cluster lock can keep their runs of one app apart. (Hosts as
//! network namespaces, with partitions, come with self-fencing in a later part.) Commands log
//! `+<fence>` when they start and `-<fence>` when they end, one `write` per line on an
//! `O_APPEND` file, so the log is a faithful order of who ran when.

use std::fs;

use runner_tests::{
    dir_host, log_lines, rid, run_dirs, sh_wait_for, shell_quote, touch, wait_line, wait_until,
    write_config, DirHost, Postgres, RunningTether, Sandbox, TIMEOUT,
};

/// The run record of `id` on host `h`.
fn record(h: &DirHost, id: &str) -> Option<serde_json::Value> {
    let text = fs::read_to_string(h.runs.join(id).join("run.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// `+F` / `-F` pairs in `lines`: the fences in order; panics on an overlap or a mismatch.
fn handoffs(lines: &[String]) -> Vec<i64> {
    assert!(
        lines.len().is_multiple_of(2),
        "unfinished run in the log: {lines:?}"
    );
    lines
        .chunks(2)
        .map(|pair| {
            let start = pair[0].strip_prefix('+');
            let end = pair[1].strip_prefix('-');
            assert!(
                start.is_some() && start == end,
                "runs overlapped (or a fence changed): {pair:?} in {lines:?}"
            );
            start
                .and_then(|f| f.parse().ok())
                .unwrap_or_else(|| panic!("not a fence: {pair:?}"))
        })
        .collect()
}

#[test]
fn cluster_lock_keeps_two_hosts_apart_and_fences_increase() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &pg.config_block());
    let (a, b) = (dir_host(&sb, "host-a"), dir_host(&sb, "host-b"));
    let app = "two-hosts.test";
    let log = sb.mark("log");
    let release = sb.mark("release");
    let q = shell_quote(&log);
    let id_a = rid(&sb, "a");
    let mut run_a = a
        .run(&sb, &cfg, app, &id_a)
        .arg("--keep-run-dir")
        .teardown(format!("echo \"teardown $TETHER_FENCE\" >> {q}"))
        .command([
            "sh",
            "-c",
            &format!(
                "echo \"+$TETHER_FENCE\" >> {q}; {}; echo \"-$TETHER_FENCE\" >> {q}",
                sh_wait_for(&shell_quote(&release))
            ),
        ])
        .spawn();
    wait_line(&log, "+", TIMEOUT);

    // The holder's core runs its main thread and the lock's heartbeat (D56), nothing else,
    // and holds a session advisory lock.
    let core = record(&a, &id_a)
        .and_then(|r| r["pid"].as_i64())
        .unwrap_or_else(|| panic!("run.json of {id_a} with a pid"));
    assert_eq!(
        runner_tests::thread_names(core as i32),
        // `cluster-heartbeat`, as the kernel keeps it (15 bytes).
        vec!["tether".to_owned(), "cluster-heartbe".to_owned()],
        "the holder's core runs its main thread and the heartbeat while it holds the lock"
    );
    assert_eq!(
        pg.psql(&format!(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity s USING (pid) \
             WHERE l.locktype = 'advisory' AND l.granted AND s.application_name = '{id_a}'"
        )),
        "1",
        "the holder's session (named after its run) holds one advisory lock"
    );

    let id_b = rid(&sb, "b");
    let mut run_b: RunningTether = b
        .run(&sb, &cfg, app, &id_b)
        .command([
            "sh",
            "-c",
            &format!("echo \"+$TETHER_FENCE\" >> {q}; echo \"-$TETHER_FENCE\" >> {q}"),
        ])
        .spawn();
    run_b.wait_line("— waiting", TIMEOUT);
    wait_until("host B's run waits in PostgreSQL", TIMEOUT, || {
        pg.psql(&format!(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity s USING (pid) \
             WHERE l.locktype = 'advisory' AND NOT l.granted AND s.application_name = '{id_b}'"
        )) == "1"
    });
    assert_eq!(
        log_lines(&log).len(),
        1,
        "B has not started while A holds the app"
    );

    touch(&release);
    run_a.wait_exit(TIMEOUT).assert_code(0);
    run_b.wait_exit(TIMEOUT).assert_code(0);
    let lines = log_lines(&log);
    assert_eq!(lines.len(), 5, "{lines:?}");
    let fence_a: i64 = lines[0][1..].parse().expect("A's fence");
    let fence_b: i64 = lines[3][1..].parse().expect("B's fence");
    assert_eq!(
        lines,
        vec![
            format!("+{fence_a}"),
            format!("-{fence_a}"),
            format!("teardown {fence_a}"),
            format!("+{fence_b}"),
            format!("-{fence_b}"),
        ],
        "A's command and teardown, then B's; the teardown sees A's fence"
    );
    assert!(
        fence_b > fence_a,
        "fences increase: {fence_a} then {fence_b}"
    );
    assert_eq!(
        record(&a, &id_a).and_then(|r| r["fence"].as_i64()),
        Some(fence_a),
        "run.json records the fence"
    );
}

#[test]
fn cluster_lock_handoffs_across_hosts_never_overlap() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &pg.config_block());
    let hosts = [dir_host(&sb, "host-a"), dir_host(&sb, "host-b")];
    let app = "handoffs.test";
    let log = sb.mark("log");
    let q = shell_quote(&log);
    const RUNS: usize = 8;
    // The sleep is the workload that would overlap if the lock did not hold (ordering-free).
    let script =
        format!("echo \"+$TETHER_FENCE\" >> {q}; sleep 0.05; echo \"-$TETHER_FENCE\" >> {q}");
    let mut runs: Vec<RunningTether> = (0..RUNS)
        .map(|i| {
            hosts[i % 2]
                .run(&sb, &cfg, app, &rid(&sb, &format!("r{i}")))
                .command(["sh", "-c", &script])
                .spawn()
        })
        .collect();
    for run in &mut runs {
        run.wait_exit(TIMEOUT).assert_code(0);
    }
    let fences = handoffs(&log_lines(&log));
    assert_eq!(fences.len(), RUNS, "every run ran once");
    assert!(
        fences.windows(2).all(|w| w[0] < w[1]),
        "fences strictly increase in the order the runs held the app: {fences:?}"
    );
    for h in &hosts {
        assert_eq!(
            run_dirs(&h.runs),
            Vec::<String>::new(),
            "clean runs leave no run dir"
        );
    }
}

#[test]
fn cluster_lock_database_down_at_start_exits_75_leaving_nothing() {
    let sb = Sandbox::new();
    let (url, port) = runner_tests::pg::refused_url();
    let cfg = write_config(&sb, "cluster.yml", &format!("cluster:\n  url: {url}\n"));
    let h = dir_host(&sb, "host-a");
    let ran = sb.mark("ran");
    let out = h
        .run(&sb, &cfg, "down.test", &rid(&sb, "down"))
        .teardown(format!("touch {}", shell_quote(&ran)))
        .command(["touch", &ran.display().to_string()])
        .run();
    out.assert_code(75);
    out.assert_stderr_contains(&format!(
        "tether: error: cluster {url} (127.0.0.1:{port}): cannot connect: error connecting to \
         server: Connection refused"
    ));
    assert!(
        !ran.exists(),
        "neither the command nor a teardown ran\n{out}"
    );
    assert_eq!(
        run_dirs(&h.runs),
        Vec::<String>::new(),
        "no run dir is left"
    );
    assert_eq!(
        out.summary_field("result"),
        Some("failed"),
        "the summary says it failed\n{out}"
    );
}

#[test]
fn without_a_cluster_a_run_has_no_fence() {
    let sb = Sandbox::new();
    let mark = sb.mark("fence");
    sb.tether_run()
        .app("no-cluster.test")
        .run_id(rid(&sb, "plain"))
        .env_remove("TETHER_CLUSTER_URL")
        .command([
            "sh",
            "-c",
            &format!("echo \"${{TETHER_FENCE-unset}}\" > {}", shell_quote(&mark)),
        ])
        .run()
        .assert_code(0);
    assert_eq!(fs::read_to_string(&mark).expect("the mark"), "unset\n");
}

#[test]
fn cluster_lock_wait_is_bounded_by_lock_timeout_and_leaves_no_waiter() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &pg.config_block());
    let (a, b) = (dir_host(&sb, "host-a"), dir_host(&sb, "host-b"));
    let started = sb.mark("started");
    let release = sb.mark("release");
    let mut holder = a
        .run(&sb, &cfg, "bounded.test", &rid(&sb, "a"))
        .command([
            "sh",
            "-c",
            &format!(
                "touch {}; {}",
                shell_quote(&started),
                sh_wait_for(&shell_quote(&release))
            ),
        ])
        .spawn();
    runner_tests::wait_file(&started, TIMEOUT);
    let ran = sb.mark("b-ran");
    let id_b = rid(&sb, "b");
    let out = b
        .run(&sb, &cfg, "bounded.test", &id_b)
        .arg("--lock-timeout")
        .arg("1s")
        .command(["touch", &ran.display().to_string()])
        .run();
    out.assert_code(75);
    out.assert_stderr_contains("still held after --lock-timeout 1s — giving up");
    assert!(!ran.exists(), "B's command never ran\n{out}");
    assert_eq!(run_dirs(&b.runs), Vec::<String>::new(), "B left no run dir");
    wait_until("B's session is gone from the server", TIMEOUT, || {
        pg.psql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{id_b}'"
        )) == "0"
    });
    touch(&release);
    holder.wait_exit(TIMEOUT).assert_code(0);
}

#[test]
fn cluster_lock_refuses_a_transaction_pooling_proxy() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let proxy = runner_tests::PoolingProxy::start(pg.socket_dir(), pg.port());
    let url = format!(
        "postgres://tether@127.0.0.1:{}/tether?sslmode=disable",
        proxy.port()
    );
    let cfg = write_config(&sb, "cluster.yml", &format!("cluster:\n  url: {url}\n"));
    let h = dir_host(&sb, "host-a");
    let ran = sb.mark("ran");
    let out = h
        .run(&sb, &cfg, "pooled.test", &rid(&sb, "pooled"))
        .command(["touch", &ran.display().to_string()])
        .run();
    out.assert_code(125);
    out.assert_stderr_contains("the server backend changed between two statements");
    assert!(
        !ran.exists(),
        "the command never ran behind a pooler\n{out}"
    );
    assert_eq!(
        run_dirs(&h.runs),
        Vec::<String>::new(),
        "no run dir is left"
    );
}
