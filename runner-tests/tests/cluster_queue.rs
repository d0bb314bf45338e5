//! Issue 16 §2 and issue 17 under a cluster: the order of waiters across hosts, and what the
//! host queue's options do with a cluster configured (PROTOCOL §15 "Under a cluster").
//!
//! A "host" is its own lock dir, runs dir and host name (`unshare --uts`): their flocks are
//! separate kernel objects, so the only queue they share is PostgreSQL's. Each arrival is
//! started only once the one before it is seen *waiting in PostgreSQL* (`pg_locks`, not
//! granted, its session named after its run id), so the arrival order is known exactly.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use runner_tests::pg::{PASSWORD, PASSWORD_ENV};
use runner_tests::{
    log_lines, on_host, rid, run_dirs, sh_wait_for, shell_quote, touch, wait_file, wait_until,
    write_config, Postgres, RunningTether, Sandbox, TetherCmd, TIMEOUT,
};

/// One simulated host: its name, its own lock dir and runs dir.
struct Host {
    name: String,
    lock: PathBuf,
    runs: PathBuf,
}

fn host(sb: &Sandbox, name: &str) -> Host {
    let root = sb.path().join(name);
    let h = Host {
        name: name.to_owned(),
        lock: root.join("locks"),
        runs: root.join("runs"),
    };
    for (dir, mode) in [(&root, 0o755), (&h.lock, 0o755), (&h.runs, 0o700)] {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        fs::set_permissions(dir, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
    }
    h
}

/// `tether run` on host `h` (its dirs, its host name) with the cluster config `cfg`.
fn run_on<'a>(sb: &'a Sandbox, h: &Host, cfg: &Path, app: &str, id: &str) -> TetherCmd<'a> {
    sb.tether_run()
        .wrapped(on_host(&h.name))
        .no_sandbox_dirs()
        .arg("--lock-dir")
        .arg(&h.lock)
        .arg("--runs-dir")
        .arg(&h.runs)
        .arg("--config")
        .arg(cfg)
        .app(app)
        .run_id(id)
        .env(PASSWORD_ENV, PASSWORD)
}

/// Sessions waiting (not granted) for an advisory lock: all of them, and those named `id`.
fn pg_waiting(pg: &Postgres, id: &str) -> (usize, usize) {
    runner_tests::pg::waiting_counts(&pg.psql(&runner_tests::pg::waiting_sql(id)))
}

/// Two hosts whose runs wait for one app, and a third whose run holds it.
struct World<'a> {
    sb: &'a Sandbox,
    pg: &'a Postgres,
    cfg: PathBuf,
    hosts: [Host; 2],
    holder_host: Host,
}

/// A holder on `w.holder_host` keeps `app` while `arrivals` (host index, name) start one by
/// one, each only once the previous ones wait in PostgreSQL; then the holder ends. Returns the
/// order the arrivals' commands ran in, as `<name> <host name>` lines.
fn arrivals_in_order(
    w: &World,
    app: &str,
    arrivals: &[(usize, &str)],
    trial: usize,
) -> Vec<String> {
    let (sb, pg, cfg, hosts, holder_host) = (w.sb, w.pg, &w.cfg, &w.hosts, &w.holder_host);
    let order = sb.mark(&format!("order-{trial}"));
    let started = sb.mark(&format!("started-{trial}"));
    let release = sb.mark(&format!("release-{trial}"));
    let mut holder = run_on(
        sb,
        holder_host,
        cfg,
        app,
        &rid(sb, &format!("holder-{trial}")),
    )
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
    wait_file(&started, TIMEOUT);
    let q = shell_quote(&order);
    let mut waiters: Vec<RunningTether> = Vec::new();
    for (n, (h, name)) in arrivals.iter().enumerate() {
        let id = rid(sb, &format!("{name}-{trial}"));
        waiters.push(
            run_on(sb, &hosts[*h], cfg, app, &id)
                .command(["sh", "-c", &format!("echo \"{name} $(hostname)\" >> {q}")])
                .spawn(),
        );
        wait_until(
            &format!("{name} waits in PostgreSQL behind {n} others (trial {trial})"),
            TIMEOUT,
            || pg_waiting(pg, &id) == (n + 1, 1),
        );
    }
    touch(&release);
    holder.wait_exit(TIMEOUT).assert_code(0);
    for w in &mut waiters {
        w.wait_exit(TIMEOUT).assert_code(0);
    }
    log_lines(&order)
}

#[test]
fn cluster_waiters_of_two_hosts_are_served_in_arrival_order() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &pg.config_block());
    let w = World {
        sb: &sb,
        pg: &pg,
        cfg,
        hosts: [host(&sb, "host-a"), host(&sb, "host-b")],
        holder_host: host(&sb, "host-c"),
    };
    // Bunched and interleaved: three of host a, two of host b, then a and b alternating. With
    // the flock taken first only one run per host waited in PostgreSQL at a time, and the
    // first five came out A1 B1 A2 B2 A3.
    let arrivals = [
        (0, "A1"),
        (0, "A2"),
        (0, "A3"),
        (1, "B1"),
        (1, "B2"),
        (0, "A4"),
        (1, "B3"),
    ];
    let expected: Vec<String> = arrivals
        .iter()
        .map(|(h, name)| format!("{name} {}", w.hosts[*h].name))
        .collect();
    for trial in 0..3 {
        let got = arrivals_in_order(&w, "fifo.test", &arrivals, trial);
        assert_eq!(
            got, expected,
            "trial {trial}: the app went to the waiters of both hosts in arrival order"
        );
    }
    for h in w.hosts.iter().chain([&w.holder_host]) {
        assert_eq!(
            run_dirs(&h.runs),
            Vec::<String>::new(),
            "no run dir is left"
        );
    }
}

/// Sessions holding (granted) an advisory lock, named `id`.
fn pg_holding(pg: &Postgres, id: &str) -> String {
    pg.psql(&format!(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity s USING (pid) \
         WHERE l.locktype = 'advisory' AND l.granted AND s.application_name = '{id}'"
    ))
}

#[test]
fn cluster_lock_is_taken_before_the_hosts_flock() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &pg.config_block());
    let (a, b) = (host(&sb, "host-a"), host(&sb, "host-b"));
    let app = "order.test";
    let log = sb.mark("log");
    let q = shell_quote(&log);
    let started = sb.mark("started");
    let release = sb.mark("release");
    // A tether without a cluster holds host a's flock of the app (it waits for nothing else).
    let mut local = sb
        .tether_run()
        .wrapped(on_host(&a.name))
        .no_sandbox_dirs()
        .arg("--lock-dir")
        .arg(&a.lock)
        .arg("--runs-dir")
        .arg(&a.runs)
        .app(app)
        .run_id(rid(&sb, "local"))
        .env_remove("TETHER_CLUSTER_URL")
        .command([
            "sh",
            "-c",
            &format!(
                "touch {}; {}; echo local >> {q}",
                shell_quote(&started),
                sh_wait_for(&shell_quote(&release))
            ),
        ])
        .spawn();
    wait_file(&started, TIMEOUT);
    // A cluster run on host a takes the cluster lock at once and then waits for the flock.
    let id_a = rid(&sb, "a");
    let mut run_a = run_on(&sb, &a, &cfg, app, &id_a)
        .command(["sh", "-c", &format!("echo a >> {q}")])
        .spawn();
    run_a.wait_line("— waiting", TIMEOUT);
    wait_until(
        "A holds the cluster lock while it waits for the flock",
        TIMEOUT,
        || pg_holding(&pg, &id_a) == "1",
    );
    // A run on host b waits in PostgreSQL behind A: B holds nothing, so nothing can circle.
    let id_b = rid(&sb, "b");
    let mut run_b = run_on(&sb, &b, &cfg, app, &id_b)
        .command(["sh", "-c", &format!("echo b >> {q}")])
        .spawn();
    wait_until("B waits in PostgreSQL", TIMEOUT, || {
        pg_waiting(&pg, &id_b) == (1, 1)
    });
    assert_eq!(log_lines(&log), Vec::<String>::new(), "nobody ran yet");
    touch(&release);
    local.wait_exit(TIMEOUT).assert_code(0);
    run_a.wait_exit(TIMEOUT).assert_code(0);
    run_b.wait_exit(TIMEOUT).assert_code(0);
    assert_eq!(
        log_lines(&log),
        ["local", "a", "b"],
        "the flock's holder, then A (which held the cluster lock), then B"
    );
}

#[test]
fn cluster_max_queue_counts_the_waiters_in_postgresql() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &pg.config_block());
    let (a, b) = (host(&sb, "host-a"), host(&sb, "host-b"));
    let app = "max.test";
    let started = sb.mark("started");
    let release = sb.mark("release");
    let mut holder = run_on(&sb, &a, &cfg, app, &rid(&sb, "holder"))
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
    wait_file(&started, TIMEOUT);
    // One waiter, on the other host: the host's own tickets could not have counted it.
    let id_w = rid(&sb, "w");
    let mut waiter = run_on(&sb, &b, &cfg, app, &id_w).command(["true"]).spawn();
    wait_until("the waiter waits in PostgreSQL", TIMEOUT, || {
        pg_waiting(&pg, &id_w) == (1, 1)
    });
    let ran = sb.mark("ran");
    let out = run_on(&sb, &a, &cfg, app, &rid(&sb, "over"))
        .arg("--max-queue")
        .arg("1")
        .command(["touch", &ran.display().to_string()])
        .run();
    out.assert_code(75);
    out.assert_stderr_contains(
        "app lock max.test: 1 run already waiting (--max-queue 1) — giving up",
    );
    assert!(!ran.exists(), "the refused run ran nothing\n{out}");
    // --max-queue 2 lets it in behind the one waiter.
    let id_in = rid(&sb, "in");
    let mut second = run_on(&sb, &a, &cfg, app, &id_in)
        .arg("--max-queue")
        .arg("2")
        .command(["true"])
        .spawn();
    wait_until("the second waiter waits in PostgreSQL", TIMEOUT, || {
        pg_waiting(&pg, &id_in) == (2, 1)
    });
    touch(&release);
    holder.wait_exit(TIMEOUT).assert_code(0);
    waiter.wait_exit(TIMEOUT).assert_code(0);
    second.wait_exit(TIMEOUT).assert_code(0);
    for h in [&a, &b] {
        assert_eq!(
            run_dirs(&h.runs),
            Vec::<String>::new(),
            "no run dir is left"
        );
    }
}

#[test]
fn cluster_refuses_newest_first_naming_the_option() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &pg.config_block());
    let a = host(&sb, "host-a");
    let ran = sb.mark("ran");
    let out = run_on(&sb, &a, &cfg, "newest.test", &rid(&sb, "n"))
        .arg("--queue-order")
        .arg("newest-first")
        .command(["touch", &ran.display().to_string()])
        .run();
    out.assert_code(125);
    out.assert_stderr_contains(
        "queue order newest-first (--queue-order, queue_order) is not available with a cluster",
    );
    assert!(!ran.exists(), "nothing ran\n{out}");
    assert_eq!(run_dirs(&a.runs), Vec::<String>::new(), "nothing is left");
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name <> '' AND backend_type = 'client backend' AND application_name <> 'psql'"),
        "0",
        "refused before connecting"
    );
}

#[test]
fn cluster_waiter_sigkilled_in_the_middle_leaves_the_queue_by_itself() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &pg.config_block());
    let (a, b) = (host(&sb, "host-a"), host(&sb, "host-b"));
    let app = "killed.test";
    let order = sb.mark("order");
    let q = shell_quote(&order);
    let started = sb.mark("started");
    let release = sb.mark("release");
    let mut holder = run_on(&sb, &a, &cfg, app, &rid(&sb, "holder"))
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
    wait_file(&started, TIMEOUT);
    let mut waiters = Vec::new();
    for (n, (h, name)) in [(&b, "W1"), (&a, "W2"), (&b, "W3")].into_iter().enumerate() {
        let id = rid(&sb, name);
        waiters.push(
            run_on(&sb, h, &cfg, app, &id)
                .command(["sh", "-c", &format!("echo {name} >> {q}")])
                .spawn(),
        );
        wait_until(&format!("{name} waits in PostgreSQL"), TIMEOUT, || {
            pg_waiting(&pg, &id) == (n + 1, 1)
        });
    }
    // The middle waiter's core dies: its session closes and the server drops it from the queue.
    let core = waiters[1].wait_core_pid(TIMEOUT);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(core),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL the middle waiter's core");
    let id_w3 = rid(&sb, "W3");
    wait_until("the killed waiter left PostgreSQL's queue", TIMEOUT, || {
        pg_waiting(&pg, &id_w3) == (2, 1)
    });
    touch(&release);
    holder.wait_exit(TIMEOUT).assert_code(0);
    waiters[0].wait_exit(TIMEOUT).assert_code(0);
    waiters[2].wait_exit(TIMEOUT).assert_code(0);
    let _ = waiters[1].wait_exit(TIMEOUT);
    assert_eq!(
        log_lines(&order),
        ["W1", "W3"],
        "the ones around the killed waiter kept their order; it ran nothing"
    );
}

#[test]
fn cluster_cancel_older_cancels_a_holder_of_the_group_on_this_host() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &pg.config_block());
    let a = host(&sb, "host-a");
    let app = "cancel.test";
    let started = sb.mark("started");
    let never = sb.mark("never");
    let mut older = run_on(&sb, &a, &cfg, app, &rid(&sb, "older"))
        .args(["--group", "pr-7"])
        .command([
            "sh",
            "-c",
            &format!(
                "touch {}; {}",
                shell_quote(&started),
                sh_wait_for(&shell_quote(&never))
            ),
        ])
        .spawn();
    wait_file(&started, TIMEOUT);
    let ran = sb.mark("newer-ran");
    let newer = run_on(&sb, &a, &cfg, app, &rid(&sb, "newer"))
        .args(["--group", "pr-7", "--on-busy", "cancel-older"])
        .command(["touch", &ran.display().to_string()])
        .run();
    newer.assert_code(0);
    newer.assert_stderr_contains("cancelling older run");
    older.wait_exit(TIMEOUT).assert_code(143);
    assert!(ran.exists(), "the newer run ran once the older one let go");
}
