//! Issue 16 §3 and §7 against a real PostgreSQL 15: the rows of `tether.runs`, a dead holder of
//! one host reaped exactly once by a run on another, its leftovers killed on its own host, and
//! the cluster in the waiting line, `status` and `janitor` (PROTOCOL §17, CLI-CONTRACT §27).
//!
//! Two "hosts" are two lock dirs and runs dirs, and two host names: each tether runs in a UTS
//! namespace of its own (`unshare --uts`, then `hostname`, then `exec tether`; the pid stays the
//! tether's), so the rows name different hosts while the kernel is shared — which is what lets a
//! test see a leftover die.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use runner_tests::pg::{PASSWORD, PASSWORD_ENV};
use runner_tests::{
    log_lines, pid_alive, poll_pid_gone, rid, sh_wait_for, shell_quote, touch, wait_line,
    wait_pids, wait_until, write_config, Postgres, Sandbox, Signal, TetherCmd, TIMEOUT,
};

/// One simulated host: its name, lock dir, runs dir, and the wrapper that starts tether under
/// that name.
struct Host {
    #[allow(dead_code)] // named for the reader; the wrapper carries it
    name: String,
    lock: PathBuf,
    runs: PathBuf,
    wrapper: PathBuf,
}

fn host(sb: &Sandbox, name: &str) -> Host {
    let root = sb.path().join(name);
    let h = Host {
        name: name.to_owned(),
        lock: root.join("locks"),
        runs: root.join("runs"),
        wrapper: root.join("tether-on-host"),
    };
    for (dir, mode) in [(&root, 0o755), (&h.lock, 0o755), (&h.runs, 0o700)] {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        fs::set_permissions(dir, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
    }
    let script = format!(
        "#!/bin/sh\nexec unshare --uts /bin/sh -c 'hostname \"$0\" && exec \"$@\"' {} {} \"$@\"\n",
        shell_quote(name),
        shell_quote(runner_tests::tether_bin())
    );
    fs::write(&h.wrapper, script).unwrap_or_else(|e| panic!("writing the wrapper: {e}"));
    fs::set_permissions(&h.wrapper, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod the wrapper: {e}"));
    h
}

/// `tether <sub>` on host `h` with the cluster config `cfg` and its dirs.
fn on<'a>(sb: &'a Sandbox, h: &Host, cfg: &Path, sub: &str) -> TetherCmd<'a> {
    TetherCmd::new(sb, sub)
        .no_sandbox_dirs()
        .bin(&h.wrapper)
        .arg("--lock-dir")
        .arg(&h.lock)
        .arg("--runs-dir")
        .arg(&h.runs)
        .arg("--config")
        .arg(cfg)
        .env(PASSWORD_ENV, PASSWORD)
}

/// `tether run` of `app` as `id` on host `h`.
fn run_on<'a>(sb: &'a Sandbox, h: &Host, cfg: &Path, app: &str, id: &str) -> TetherCmd<'a> {
    on(sb, h, cfg, "run").app(app).run_id(id)
}

/// The config: the server, and how long a reaper waits for a dead run's host.
fn config(sb: &Sandbox, pg: &Postgres, leftovers_wait: &str) -> PathBuf {
    write_config(
        sb,
        "cluster.yml",
        &format!("{}  leftovers_wait: {leftovers_wait}\n", pg.config_block()),
    )
}

/// `state` of `id`'s row, or `None` without one.
fn row_state(pg: &Postgres, id: &str) -> Option<String> {
    let s = pg.psql(&format!(
        "SELECT state FROM tether.runs WHERE run_id = '{id}'"
    ));
    (!s.is_empty()).then_some(s)
}

/// Wait for `id`'s row to be in `state`.
fn wait_row(pg: &Postgres, id: &str, state: &str) {
    wait_until(&format!("row {id} {state}"), TIMEOUT, || {
        row_state(pg, id).as_deref() == Some(state)
    });
}

fn teardown_logger(log: &Path) -> String {
    format!(
        "echo \"td $TETHER_REASON $TETHER_RUN_ID $TETHER_FENCE\" >> {}",
        shell_quote(log)
    )
}

/// A run's command that logs `+<fence>`, waits for `release`, logs `-<fence>`.
fn held_command(log: &Path, release: &Path) -> Vec<String> {
    let q = shell_quote(log);
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "echo \"+$TETHER_FENCE\" >> {q}; {}; echo \"-$TETHER_FENCE\" >> {q}",
            sh_wait_for(&shell_quote(release))
        ),
    ]
}

/// The row lifecycle: `waiting` (no fence) before the lock, `running` with the fence, the host,
/// the core's pid, the group and the teardown once it holds it, gone after a clean end; a run
/// that gives up waiting (`--lock-timeout`) leaves no row.
#[test]
fn cluster_rows_go_waiting_running_gone_and_a_run_giving_up_leaves_none() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = config(&sb, &pg, "10s");
    let (a, b, c) = (
        host(&sb, "host-a"),
        host(&sb, "host-b"),
        host(&sb, "host-c"),
    );
    let app = "rows.test";
    let (log_a, rel_a) = (sb.mark("a.log"), sb.mark("rel-a"));
    let (log_b, rel_b) = (sb.mark("b.log"), sb.mark("rel-b"));
    let (id_a, id_b, id_c) = (rid(&sb, "a"), rid(&sb, "b"), rid(&sb, "c"));
    let mut run_a = run_on(&sb, &a, &cfg, app, &id_a)
        .args(["--group", "g-a"])
        .teardown("true")
        .command(held_command(&log_a, &rel_a))
        .spawn();
    wait_line(&log_a, "+", TIMEOUT);
    let core_a = run_a.wait_core_pid(TIMEOUT);
    let fence_a = log_lines(&log_a)[0].trim_start_matches('+').to_owned();
    assert_eq!(
        pg.psql(&format!(
            "SELECT state, host, pid, fence, grp, teardown, acquired IS NOT NULL \
             FROM tether.runs WHERE run_id = '{id_a}'"
        )),
        format!("running|host-a|{core_a}|{fence_a}|g-a|true|t"),
        "the holder's row"
    );

    let mut run_b = run_on(&sb, &b, &cfg, app, &id_b)
        .command(held_command(&log_b, &rel_b))
        .spawn();
    wait_row(&pg, &id_b, "waiting");
    assert_eq!(
        pg.psql(&format!(
            "SELECT host, fence IS NULL, acquired IS NULL FROM tether.runs WHERE run_id = '{id_b}'"
        )),
        "host-b|t|t",
        "a waiter's row has no fence yet"
    );

    // A third run on a third host gives up waiting: its row goes with it.
    let gave_up = run_on(&sb, &c, &cfg, app, &id_c)
        .args(["--lock-timeout", "1s"])
        .command(["true"])
        .run();
    gave_up.assert_code(75);
    assert_eq!(
        row_state(&pg, &id_c),
        None,
        "the row of a run that gave up\n{gave_up}"
    );

    touch(&rel_a);
    run_a.wait_exit(TIMEOUT).assert_code(0);
    assert_eq!(
        row_state(&pg, &id_a),
        None,
        "the row of a run that ended clean"
    );
    wait_line(&log_b, "+", TIMEOUT);
    wait_row(&pg, &id_b, "running");
    touch(&rel_b);
    run_b.wait_exit(TIMEOUT).assert_code(0);
    assert_eq!(pg.psql("SELECT count(*) FROM tether.runs"), "0");
}

/// Host A's holder leaves a `sleep 1000` behind and its core *and front* are killed (the front
/// stopped first, so that its aftercare cannot run: a host whose tether is gone entirely, the
/// case the next sweep is for). Returns the leftover's pid and A's fence.
fn holder_killed_on_a(
    sb: &Sandbox,
    a: &Host,
    cfg: &Path,
    app: &str,
    id: &str,
    td_log: &Path,
) -> (i32, String) {
    let bg = sb.mark(&format!("{id}.bg"));
    let started = sb.mark(&format!("{id}.started"));
    let script = format!(
        "echo \"$TETHER_FENCE\" > {s}; sleep 1000 & echo $! > {p}.tmp && mv {p}.tmp {p}; wait",
        s = shell_quote(&started),
        p = shell_quote(&bg)
    );
    let mut run = run_on(sb, a, cfg, app, id)
        .teardown(teardown_logger(td_log))
        .command(["sh", "-c", &script])
        .spawn();
    let leftover = wait_pids(&bg, TIMEOUT)[0];
    let fence = fs::read_to_string(&started)
        .unwrap_or_default()
        .trim()
        .to_owned();
    let core = run.wait_core_pid(TIMEOUT);
    let front = run.pid();
    signal(front, Signal::SIGSTOP);
    signal(core, Signal::SIGKILL);
    assert!(poll_pid_gone(core, TIMEOUT), "the core survived SIGKILL");
    signal(front, Signal::SIGKILL);
    run.wait_exit(TIMEOUT);
    assert!(pid_alive(leftover), "the leftover died with the core");
    (leftover, fence)
}

fn signal(pid: i32, sig: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
        .unwrap_or_else(|e| panic!("kill -{sig} {pid}: {e}"));
}

/// §3 item 3, at once (D77): only A's core is SIGKILLed; A's front, still there, kills the
/// leftover before it exits and marks the row. B, with a `leftovers_wait` far beyond the test's
/// bound (10m), reaps A's run once and goes on as soon as it reads the mark; the row stays
/// `reaped` for A's next sweep, which settles A's record without a second teardown. Without
/// the aftercare the leftover outlives A's tether and B waits the full 10 minutes.
#[test]
fn a_killed_cores_front_kills_its_leftovers_at_once_and_the_reaper_goes_on() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = config(&sb, &pg, "10m");
    let (a, b) = (host(&sb, "host-a"), host(&sb, "host-b"));
    let app = "aftercare.test";
    let td = sb.mark("td.log");
    let id_a = rid(&sb, "a");
    let bg = sb.mark("a.bg");
    let script = format!(
        "sleep 1000 & echo $! > {p}.tmp && mv {p}.tmp {p}; wait",
        p = shell_quote(&bg)
    );
    let mut run_a = run_on(&sb, &a, &cfg, app, &id_a)
        .teardown(teardown_logger(&td))
        .command(["sh", "-c", &script])
        .spawn();
    let leftover = wait_pids(&bg, TIMEOUT)[0];
    signal(run_a.wait_core_pid(TIMEOUT), Signal::SIGKILL);
    let done_a = run_a.wait_exit(TIMEOUT);
    done_a.assert_code(137);
    done_a.assert_stderr_contains(&format!(
        "the core of run {id_a} of {app} was killed: its leftovers on this host are killed"
    ));
    // Killed before the front exited, not later by anyone else.
    assert!(
        poll_pid_gone(leftover, std::time::Duration::from_secs(2)),
        "the leftover outlived A's front\n{done_a}"
    );
    assert_eq!(
        pg.psql(&format!(
            "SELECT state, leftovers_killed FROM tether.runs WHERE run_id = '{id_a}'"
        )),
        "running|t"
    );

    let done_b = run_on(&sb, &b, &cfg, app, &rid(&sb, "b"))
        .teardown("true")
        .command(["true"])
        .run();
    done_b.assert_code(0);
    done_b.assert_stderr_contains(&format!("reaping dead run {id_a} of {app} on host host-a"));
    done_b.assert_stderr_contains(&format!("leftovers of run {id_a} on host host-a killed"));
    assert_eq!(
        log_lines(&td).len(),
        1,
        "A's teardown, once, on B\n{done_b}"
    );
    assert!(log_lines(&td)[0].starts_with(&format!("td reaped {id_a} ")));
    assert_eq!(row_state(&pg, &id_a).as_deref(), Some("reaped"));

    let again = run_on(&sb, &a, &cfg, app, &rid(&sb, "a2"))
        .teardown("true")
        .command(["true"])
        .run();
    again.assert_code(0);
    assert_eq!(
        log_lines(&td).len(),
        1,
        "a second teardown of A's run\n{again}"
    );
    assert_eq!(pg.psql("SELECT count(*) FROM tether.runs"), "0", "{again}");
}

/// §3 item 2–3, confirmed: B takes the lock, runs A's teardown once (`reaped`, A's run id and
/// fence), marks the row `reaped` and waits; A's next tether start (a run of another app)
/// kills the leftover and marks the row; B says so and starts. A's next run of the app later
/// finds A's dead run settled: no second teardown anywhere.
#[test]
fn a_dead_holder_is_reaped_once_on_another_host_and_its_leftovers_killed_on_its_own() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = config(&sb, &pg, "60s");
    let (a, b) = (host(&sb, "host-a"), host(&sb, "host-b"));
    let app = "reap.test";
    let td = sb.mark("td.log");
    let id_a = rid(&sb, "a");
    let (leftover, fence) = holder_killed_on_a(&sb, &a, &cfg, app, &id_a, &td);
    assert_eq!(row_state(&pg, &id_a).as_deref(), Some("running"));

    let started_b = sb.mark("b.started");
    let id_b = rid(&sb, "b");
    let mut run_b = run_on(&sb, &b, &cfg, app, &id_b)
        .teardown("true")
        .command(["sh", "-c", &format!("touch {}", shell_quote(&started_b))])
        .spawn();
    wait_row(&pg, &id_a, "reaped");
    assert_eq!(
        log_lines(&td),
        [format!("td reaped {id_a} {fence}")],
        "A's teardown ran on B, once"
    );
    // B waits for A's host: its command has not started while the row says `reaped`.
    assert!(
        !started_b.exists(),
        "B started before A's leftovers were confirmed"
    );
    assert!(pid_alive(leftover));

    // A's next tether start (any app) kills the leftover and marks the row.
    let other = run_on(&sb, &a, &cfg, "other.test", &rid(&sb, "a2"))
        .command(["true"])
        .run();
    other.assert_code(0);
    other.assert_stderr_contains(&format!("killed the leftovers of run {id_a} of {app}"));
    assert!(
        poll_pid_gone(leftover, TIMEOUT),
        "the leftover survived\n{other}"
    );
    let done_b = run_b.wait_exit(TIMEOUT);
    done_b.assert_code(0);
    done_b.assert_stderr_contains(&format!("reaping dead run {id_a} of {app} on host host-a"));
    done_b.assert_stderr_contains(&format!("leftovers of run {id_a} on host host-a killed"));
    assert!(started_b.exists());

    // A's next run of the app: A's dead run is settled, no second teardown.
    let again = run_on(&sb, &a, &cfg, app, &rid(&sb, "a3"))
        .teardown("true")
        .command(["true"])
        .run();
    again.assert_code(0);
    assert_eq!(
        log_lines(&td).len(),
        1,
        "a second teardown of A's run\n{again}"
    );
    assert_eq!(pg.psql("SELECT count(*) FROM tether.runs"), "0", "{again}");
}

/// §3 item 3, not confirmed: with nothing running on A, B waits `leftovers_wait` (1s here), says
/// so and starts its command; a later run (A still silent) neither reaps A's run again nor
/// waits again. A's next run of the app kills the leftover on its way in and runs no second
/// teardown.
#[test]
fn a_reaper_goes_on_after_the_leftovers_wait_and_the_dead_host_still_cleans_up() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = config(&sb, &pg, "1s");
    let (a, b) = (host(&sb, "host-a"), host(&sb, "host-b"));
    let app = "unconfirmed.test";
    let td = sb.mark("td.log");
    let id_a = rid(&sb, "a");
    let (leftover, fence) = holder_killed_on_a(&sb, &a, &cfg, app, &id_a, &td);

    let id_b = rid(&sb, "b");
    let done_b = run_on(&sb, &b, &cfg, app, &id_b)
        .teardown("true")
        .command(["true"])
        .run();
    done_b.assert_code(0);
    done_b.assert_stderr_contains(&format!(
        "leftovers of run {id_a} on host host-a not confirmed after 1s; going on"
    ));
    assert_eq!(log_lines(&td), [format!("td reaped {id_a} {fence}")]);
    assert_eq!(row_state(&pg, &id_a).as_deref(), Some("reaped"));
    assert!(pid_alive(leftover), "a leftover on A was killed from B");

    // Host A does not come back (yet): the next holders neither reap A's run again nor wait
    // for its leftovers again — the `reaped` row is waited for once.
    let next_b = run_on(&sb, &b, &cfg, app, &rid(&sb, "b2"))
        .teardown("true")
        .command(["true"])
        .run();
    next_b.assert_code(0);
    next_b.assert_stderr_lacks("leftovers");
    next_b.assert_stderr_lacks("reaping");
    assert_eq!(log_lines(&td).len(), 1, "{next_b}");
    assert_eq!(row_state(&pg, &id_a).as_deref(), Some("reaped"));

    let again = run_on(&sb, &a, &cfg, app, &rid(&sb, "a2"))
        .teardown("true")
        .command(["true"])
        .run();
    again.assert_code(0);
    assert!(
        poll_pid_gone(leftover, TIMEOUT),
        "the leftover survived\n{again}"
    );
    assert_eq!(
        log_lines(&td).len(),
        1,
        "a second teardown of A's run\n{again}"
    );
    assert_eq!(pg.psql("SELECT count(*) FROM tether.runs"), "0", "{again}");
}

/// §7: the waiting line names a holder on another host (`run R on host H (pid P, age)`).
#[test]
fn the_waiting_line_names_the_remote_holder_and_its_host() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = config(&sb, &pg, "10s");
    let (a, b) = (host(&sb, "host-a"), host(&sb, "host-b"));
    let app = "line.test";
    let (log, release) = (sb.mark("a.log"), sb.mark("rel"));
    let id_a = rid(&sb, "a");
    let mut run_a = run_on(&sb, &a, &cfg, app, &id_a)
        .command(held_command(&log, &release))
        .spawn();
    wait_line(&log, "+", TIMEOUT);
    let core_a = run_a.wait_core_pid(TIMEOUT);
    let mut run_b = run_on(&sb, &b, &cfg, app, &rid(&sb, "b"))
        .command(["true"])
        .spawn();
    let line = run_b.wait_line("waiting", TIMEOUT);
    assert!(
        line.contains(&format!(
            "held by run {id_a} on host host-a (pid {core_a}, "
        )),
        "{line}"
    );
    touch(&release);
    run_a.wait_exit(TIMEOUT).assert_code(0);
    run_b.wait_exit(TIMEOUT).assert_code(0);
}

/// Wait until `id` waits for the cluster lock in the server (a not-granted advisory lock of a
/// session named after it).
fn wait_pg_waiter(pg: &Postgres, id: &str) {
    wait_until(&format!("{id} waiting in pg_locks"), TIMEOUT, || {
        pg.psql(&format!(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
             WHERE l.locktype = 'advisory' AND NOT l.granted AND a.application_name = '{id}'"
        )) == "1"
    });
}

/// §7: `status` (JSON and text) shows the cluster's holder on host A and two waiters on hosts
/// B and C in the order they started waiting, with their hosts, pids and ages; its Prometheus
/// form counts them.
#[test]
fn status_shows_the_cluster_holder_and_its_waiters_in_order_with_their_hosts() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = config(&sb, &pg, "10s");
    let (a, b, c) = (
        host(&sb, "host-a"),
        host(&sb, "host-b"),
        host(&sb, "host-c"),
    );
    let app = "status.test";
    let (log, release) = (sb.mark("a.log"), sb.mark("rel"));
    let (id_a, id_b, id_c) = (rid(&sb, "a"), rid(&sb, "b"), rid(&sb, "c"));
    let mut run_a = run_on(&sb, &a, &cfg, app, &id_a)
        .command(held_command(&log, &release))
        .spawn();
    wait_line(&log, "+", TIMEOUT);
    let core_a = run_a.wait_core_pid(TIMEOUT);
    let mut run_b = run_on(&sb, &b, &cfg, app, &id_b)
        .args(["--group", "g-b"])
        .command(["true"])
        .spawn();
    wait_pg_waiter(&pg, &id_b);
    let mut run_c = run_on(&sb, &c, &cfg, app, &id_c).command(["true"]).spawn();
    wait_pg_waiter(&pg, &id_c);
    let core_b = run_b.wait_core_pid(TIMEOUT);
    let core_c = run_c.wait_core_pid(TIMEOUT);

    let json = on(&sb, &a, &cfg, "status").arg("--json").run();
    json.assert_code(0);
    let v: serde_json::Value =
        serde_json::from_str(&json.stdout).unwrap_or_else(|e| panic!("status --json: {e}\n{json}"));
    let cl = &v["cluster"][0];
    assert_eq!(cl["app"], app, "{json}");
    let holder = &cl["holder"];
    assert_eq!(
        (
            holder["run_id"].as_str(),
            holder["host"].as_str(),
            holder["pid"].as_i64()
        ),
        (Some(id_a.as_str()), Some("host-a"), Some(i64::from(core_a))),
        "{json}"
    );
    assert_eq!(holder["state"], "running");
    assert!(holder["fence"].as_i64().is_some(), "{json}");
    let waiters: Vec<(String, String, i64)> = cl["waiters"]
        .as_array()
        .unwrap_or_else(|| panic!("no waiters\n{json}"))
        .iter()
        .map(|w| {
            (
                w["run_id"].as_str().unwrap_or_default().to_owned(),
                w["host"].as_str().unwrap_or_default().to_owned(),
                w["pid"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        waiters,
        [
            (id_b.clone(), "host-b".to_owned(), i64::from(core_b)),
            (id_c.clone(), "host-c".to_owned(), i64::from(core_c)),
        ],
        "{json}"
    );
    assert_eq!(cl["waiters"][0]["group"], "g-b");
    assert!(cl["waiters"][0]["age_s"].as_u64().is_some(), "{json}");

    let text = on(&sb, &a, &cfg, "status").run();
    text.assert_code(0);
    let lines: Vec<&str> = text
        .stdout
        .lines()
        .skip_while(|l| *l != "CLUSTER")
        .collect();
    assert_eq!(lines.len(), 5, "{text}");
    let cells = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(cells(lines[1])[..5], ["APP", "ROLE", "RUN", "HOST", "PID"]);
    assert_eq!(
        cells(lines[2])[..5],
        [app, "holder", &id_a, "host-a", &core_a.to_string()]
    );
    assert_eq!(
        cells(lines[3])[..6],
        [app, "waiter", "1", &id_b, "host-b", &core_b.to_string()]
    );
    assert_eq!(
        cells(lines[4])[..6],
        [app, "waiter", "2", &id_c, "host-c", &core_c.to_string()]
    );

    let prom = on(&sb, &a, &cfg, "status")
        .args(["--format", "prometheus"])
        .run();
    prom.assert_code(0);
    for series in [
        format!("tether_cluster_lock_held{{app=\"{app}\"}} 1"),
        format!("tether_cluster_waiters{{app=\"{app}\"}} 2"),
    ] {
        assert!(prom.stdout.lines().any(|l| l == series), "{series}\n{prom}");
    }

    touch(&release);
    run_a.wait_exit(TIMEOUT).assert_code(0);
    run_b.wait_exit(TIMEOUT).assert_code(0);
    run_c.wait_exit(TIMEOUT).assert_code(0);
}

/// §7: a janitor on host B reports host A's dead run, one line, and touches nothing (its
/// `--dry-run` says the same); the janitor on host A reaps it (teardown once, leftover killed,
/// row gone) under the app's flock and cluster lock.
#[test]
fn janitor_reports_other_hosts_dead_runs_untouched_and_reaps_its_own() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = config(&sb, &pg, "10s");
    let (a, b) = (host(&sb, "host-a"), host(&sb, "host-b"));
    let app = "janitor.test";
    let td = sb.mark("td.log");
    let id_a = rid(&sb, "a");
    let (leftover, fence) = holder_killed_on_a(&sb, &a, &cfg, app, &id_a, &td);

    let line = format!(
        "cluster run {id_a} of {app}: other-host — dead run on host host-a (state running): \
         its teardown is left to the app's next holder"
    );
    for dry in [true, false] {
        let mut j = on(&sb, &b, &cfg, "janitor");
        if dry {
            j = j.arg("--dry-run");
        }
        let out = j.run();
        out.assert_code(0);
        assert_eq!(out.stderr_lines(&line).len(), 1, "dry run {dry}\n{out}");
        assert_eq!(row_state(&pg, &id_a).as_deref(), Some("running"), "{out}");
        assert!(log_lines(&td).is_empty(), "a teardown ran on B\n{out}");
        assert!(pid_alive(leftover));
    }

    let own = on(&sb, &a, &cfg, "janitor").run();
    own.assert_code(0);
    assert_eq!(
        log_lines(&td),
        [format!("td reaped {id_a} {fence}")],
        "{own}"
    );
    assert!(
        poll_pid_gone(leftover, TIMEOUT),
        "the leftover survived\n{own}"
    );
    assert_eq!(row_state(&pg, &id_a), None, "{own}");
}

/// A `tether.runs` made by the first cluster tether (no `grp`, `acquired`, `leftovers_killed`,
/// `superseded_by`; `fence NOT NULL`) is brought up to date by the next run, once, with one
/// line naming what changed.
#[test]
fn an_older_runs_table_is_migrated_once() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    pg.psql(
        "CREATE SCHEMA tether AUTHORIZATION tether; \
         CREATE TABLE tether.runs (run_id text PRIMARY KEY, app text NOT NULL, \
           host text NOT NULL, boot_id text NOT NULL, pid integer NOT NULL, \
           pid_start bigint NOT NULL, state text NOT NULL, teardown text, ci_link text, \
           fence bigint NOT NULL, heartbeat timestamptz NOT NULL DEFAULT now(), \
           started timestamptz NOT NULL DEFAULT now()); \
         CREATE INDEX runs_app ON tether.runs (app); \
         CREATE SEQUENCE tether.fence AS bigint MINVALUE 1; \
         ALTER TABLE tether.runs OWNER TO tether; ALTER SEQUENCE tether.fence OWNER TO tether",
    );
    let cfg = config(&sb, &pg, "10s");
    let a = host(&sb, "host-a");
    let first = run_on(&sb, &a, &cfg, "migrate.test", &rid(&sb, "m1"))
        .command(["true"])
        .run();
    first.assert_code(0);
    assert_eq!(
        first.stderr_lines("tether: cluster: created").len(),
        1,
        "{first}"
    );
    first.assert_stderr_contains(
        "cluster: created sequence tether.ticket, column tether.runs.grp, column \
         tether.runs.acquired, column tether.runs.leftovers_killed, column \
         tether.runs.superseded_by, column tether.runs.ticket, column tether.runs.ticket_key, \
         column tether.runs.looked, nullable tether.runs.fence on",
    );
    assert_eq!(
        pg.psql(
            "SELECT string_agg(column_name || ':' || is_nullable, ',' ORDER BY column_name) \
             FROM information_schema.columns WHERE table_schema = 'tether' AND table_name = 'runs' \
             AND column_name IN ('grp', 'acquired', 'fence', 'leftovers_killed')"
        ),
        "acquired:YES,fence:YES,grp:YES,leftovers_killed:NO"
    );
    let second = run_on(&sb, &a, &cfg, "migrate.test", &rid(&sb, "m2"))
        .command(["true"])
        .run();
    second.assert_code(0).assert_stderr_lacks("created");
}

/// The other order: A's dead holder is reaped first by the next run *on A* (the local reconcile,
/// teardown once, its row deleted under the cluster lock), and a run on B afterwards finds
/// nothing to reap.
#[test]
fn a_dead_holder_reaped_on_its_own_host_is_not_reaped_again_elsewhere() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = config(&sb, &pg, "10s");
    let (a, b) = (host(&sb, "host-a"), host(&sb, "host-b"));
    let app = "local-first.test";
    let td = sb.mark("td.log");
    let id_a = rid(&sb, "a");
    let (leftover, fence) = holder_killed_on_a(&sb, &a, &cfg, app, &id_a, &td);

    let local = run_on(&sb, &a, &cfg, app, &rid(&sb, "a2"))
        .teardown("true")
        .command(["true"])
        .run();
    local.assert_code(0);
    assert_eq!(
        log_lines(&td),
        [format!("td reaped {id_a} {fence}")],
        "{local}"
    );
    assert!(
        poll_pid_gone(leftover, TIMEOUT),
        "the leftover survived\n{local}"
    );
    assert_eq!(row_state(&pg, &id_a), None, "{local}");

    let remote = run_on(&sb, &b, &cfg, app, &rid(&sb, "b"))
        .teardown("true")
        .command(["true"])
        .run();
    remote.assert_code(0).assert_stderr_lacks("reaping");
    assert_eq!(log_lines(&td).len(), 1, "a second teardown\n{remote}");
}

/// §3 item 3 through the janitor: B reaped A's dead holder and went on unconfirmed; `tether
/// janitor` on A (its `--dry-run` first: `would-kill-leftovers`, nothing killed) kills the
/// leftover, says `leftovers-killed`, marks the row `cleaned` and then, settling A's app lock,
/// deletes it; no teardown runs on A.
#[test]
fn the_janitor_kills_the_leftovers_of_its_hosts_runs_reaped_elsewhere() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = config(&sb, &pg, "1s");
    let (a, b) = (host(&sb, "host-a"), host(&sb, "host-b"));
    let app = "janitor-leftovers.test";
    let td = sb.mark("td.log");
    let id_a = rid(&sb, "a");
    let (leftover, _) = holder_killed_on_a(&sb, &a, &cfg, app, &id_a, &td);
    run_on(&sb, &b, &cfg, app, &rid(&sb, "b"))
        .teardown("true")
        .command(["true"])
        .run()
        .assert_code(0);
    assert_eq!(row_state(&pg, &id_a).as_deref(), Some("reaped"));

    let dry = on(&sb, &a, &cfg, "janitor").arg("--dry-run").run();
    dry.assert_code(0);
    assert_eq!(
        dry.stderr_lines(&format!(
            "cluster run {id_a} of {app}: would-kill-leftovers"
        ))
        .len(),
        1,
        "{dry}"
    );
    assert!(pid_alive(leftover), "a dry run killed\n{dry}");
    assert_eq!(row_state(&pg, &id_a).as_deref(), Some("reaped"));

    let j = on(&sb, &a, &cfg, "janitor").run();
    j.assert_code(0);
    assert_eq!(
        j.stderr_lines(&format!("cluster run {id_a} of {app}: leftovers-killed"))
            .len(),
        1,
        "{j}"
    );
    assert!(
        poll_pid_gone(leftover, TIMEOUT),
        "the leftover survived\n{j}"
    );
    assert_eq!(log_lines(&td).len(), 1, "a second teardown\n{j}");
    // Marked `cleaned`, then the same sweep settles A's app lock (the dead run's record is
    // clean: nothing to run) under both locks and deletes the row.
    assert_eq!(row_state(&pg, &id_a), None, "{j}");
}

/// §4 with §3 (D61, D78): a holder whose session the server ends (`pg_terminate_backend`)
/// self-fences — exit 75, `lock-lost`, its own teardown — while B, granted the lock at once,
/// finds A's row `running` without a session and may run A's teardown again (`reaped`: the one
/// case of two teardowns, both with A's fence). Either way B's command starts only after A's
/// own teardown is over: A settles its row from a session of its own once its teardown is done
/// (deleted, or marked `leftovers_killed` when B reaped it already), which is what ends B's
/// wait — with `leftovers_wait` at 10 minutes, B would otherwise time the test out. No row is
/// left once A's host runs tether again, and nothing is torn down a third time.
#[test]
fn a_self_fenced_holder_settles_its_row_and_the_next_holder_starts_after_its_teardown() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(
        &sb,
        "cluster.yml",
        &format!(
            "{}  heartbeat: 200ms\n  self_fence: 1s\n  server_release: 3200ms\n  \
             leftovers_wait: 10m\n",
            pg.config_block()
        ),
    );
    let (a, b) = (host(&sb, "host-a"), host(&sb, "host-b"));
    let app = "self-fenced.test";
    let td = sb.mark("td.log");
    let (started_a, never) = (sb.mark("a.started"), sb.mark("never"));
    let id_a = rid(&sb, "a");
    let mut run_a = run_on(&sb, &a, &cfg, app, &id_a)
        .teardown(teardown_logger(&td))
        .command([
            "sh",
            "-c",
            &format!(
                "touch {}; {}",
                shell_quote(&started_a),
                sh_wait_for(&shell_quote(&never))
            ),
        ])
        .spawn();
    wait_until("A's command started", TIMEOUT, || started_a.exists());
    let (ok_b, early_b) = (sb.mark("b.ok"), sb.mark("b.early"));
    let id_b = rid(&sb, "b");
    // B's command looks at the teardown log the moment it starts: A's own teardown must be in it.
    let mut run_b = run_on(&sb, &b, &cfg, app, &id_b)
        .teardown("true")
        .command([
            "sh",
            "-c",
            &format!(
                "if grep -q '^td lock-lost {id_a} ' {td}; then touch {ok}; else touch {early}; fi",
                td = shell_quote(&td),
                ok = shell_quote(&ok_b),
                early = shell_quote(&early_b)
            ),
        ])
        .spawn();
    wait_pg_waiter(&pg, &id_b);

    assert_eq!(
        pg.psql(&format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = '{id_a}'"
        )),
        "1"
    );
    let done_a = run_a.wait_exit(TIMEOUT);
    done_a.assert_code(75);
    assert_eq!(
        done_a.summary_field("result"),
        Some("lock-lost"),
        "{done_a}"
    );
    let done_b = run_b.wait_exit(TIMEOUT);
    done_b.assert_code(0);
    assert!(
        ok_b.exists() && !early_b.exists(),
        "B's command started before A's own teardown was over\n{done_a}\n{done_b}"
    );
    let teardowns = log_lines(&td);
    let fence = teardowns
        .iter()
        .find(|l| l.starts_with(&format!("td lock-lost {id_a} ")))
        .map(|l| l.rsplit(' ').next().unwrap_or_default().to_owned())
        .unwrap_or_else(|| panic!("A's own teardown did not run: {teardowns:?}"));
    let mut reasons: Vec<String> = teardowns
        .iter()
        .map(|l| {
            assert_eq!(
                l.rsplit(' ').next(),
                Some(fence.as_str()),
                "every teardown of A's run carries A's fence: {teardowns:?}"
            );
            l.split(' ').nth(1).unwrap_or_default().to_owned()
        })
        .collect();
    reasons.sort();
    assert!(
        reasons == ["lock-lost"] || reasons == ["lock-lost", "reaped"],
        "A's own teardown once and at most one reap of it (D61): {teardowns:?}"
    );

    let again = run_on(&sb, &a, &cfg, app, &rid(&sb, "a2"))
        .teardown("true")
        .command(["true"])
        .run();
    again.assert_code(0);
    assert_eq!(log_lines(&td).len(), teardowns.len(), "{again}");
    assert_eq!(pg.psql("SELECT count(*) FROM tether.runs"), "0", "{again}");
}
