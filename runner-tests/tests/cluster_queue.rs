//! Issue 16 §2 and issue 17 under a cluster: the order of waiters across hosts, and the host
//! queue's options across hosts (PROTOCOL §15 "Under a cluster": tether's own queue on the
//! server — tickets on the rows of `tether.runs`, each held by its waiter's ticket lock).
//!
//! A "host" is its own lock dir, runs dir and host name (`unshare --uts`): their flocks are
//! separate kernel objects, so the only queue they share is the cluster's. Each arrival is
//! started only once the ones before it are seen *queued on the server* — the app's live queue
//! entries (rows with a ticket whose ticket lock is granted), read in queue order
//! ([`runner_tests::pg::queue_sql`]) — so the arrival order, and each arrival's place, is known
//! exactly.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use runner_tests::pg::{StoppedBackend, PASSWORD, PASSWORD_ENV};
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

/// The runs queued for `app` on the server, in queue order (its live queue entries).
fn pg_queue(pg: &Postgres, app: &str) -> Vec<String> {
    runner_tests::pg::queue_ids(&pg.psql(&runner_tests::pg::queue_sql(app)))
}

/// The order the app's commands ran in: each appends `<name> <host name>` to `order`.
fn note(order: &Path, name: &str) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!("echo \"{name} $(hostname)\" >> {}", shell_quote(order)),
    ]
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
/// one, each only once it is queued on the server behind the previous ones; then the holder
/// ends. Returns the order the arrivals' commands ran in, as `<name> <host name>` lines.
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
    let mut ids = Vec::new();
    for (n, (h, name)) in arrivals.iter().enumerate() {
        let id = rid(sb, &format!("{name}-{trial}"));
        waiters.push(
            run_on(sb, &hosts[*h], cfg, app, &id)
                .command(["sh", "-c", &format!("echo \"{name} $(hostname)\" >> {q}")])
                .spawn(),
        );
        ids.push(id);
        wait_until(
            &format!("{name} queued on the server behind {n} others (trial {trial})"),
            TIMEOUT,
            || pg_queue(pg, app) == ids,
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
    wait_until("B queued on the server", TIMEOUT, || {
        pg_queue(&pg, app) == [id_b.clone()]
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

/// `--max-queue` counts the cluster's queue — the runs of every host — not this host's.
#[test]
fn cluster_max_queue_counts_the_runs_queued_on_every_host() {
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
    wait_until("the waiter queued on the server", TIMEOUT, || {
        pg_queue(&pg, app) == [id_w.clone()]
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
    assert_eq!(pg_queue(&pg, app), [id_w.as_str()], "nothing else queued");
    // --max-queue 2 lets it in behind the one waiter.
    let id_in = rid(&sb, "in");
    let mut second = run_on(&sb, &a, &cfg, app, &id_in)
        .arg("--max-queue")
        .arg("2")
        .command(["true"])
        .spawn();
    wait_until("the second waiter queued behind the first", TIMEOUT, || {
        pg_queue(&pg, app) == [id_w.clone(), id_in.clone()]
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

/// `--queue-order newest-first` across hosts (no longer refused with a cluster): a1 of host a
/// queues oldest-first, then b1 and b2 of host b newest-first — each in front of everyone
/// queued before it — and the app goes to b2, b1, a1.
#[test]
fn cluster_newest_first_serves_the_latest_arrival_first_across_hosts() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &pg.config_block());
    let (a, b) = (host(&sb, "host-a"), host(&sb, "host-b"));
    let app = "newest.test";
    let order = sb.mark("order");
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
    let newest: &[&str] = &["--queue-order", "newest-first"];
    let mut waiters = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    for (h, name, extra) in [(&a, "a1", &[][..]), (&b, "b1", newest), (&b, "b2", newest)] {
        let id = rid(&sb, name);
        waiters.push(
            run_on(&sb, h, &cfg, app, &id)
                .args(extra)
                .command(note(&order, name))
                .spawn(),
        );
        // a1 into an empty queue; each newest-first run in front of everyone queued before it.
        ids.insert(0, id);
        wait_until(&format!("{name} queued at its place"), TIMEOUT, || {
            pg_queue(&pg, app) == ids
        });
    }
    touch(&release);
    holder.wait_exit(TIMEOUT).assert_code(0);
    for w in &mut waiters {
        w.wait_exit(TIMEOUT).assert_code(0);
    }
    assert_eq!(
        log_lines(&order),
        ["b2 host-b", "b1 host-b", "a1 host-a"],
        "the newest first, across hosts; the oldest-first run last"
    );
    for h in [&a, &b] {
        assert_eq!(run_dirs(&h.runs), Vec::<String>::new(), "nothing is left");
    }
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
    let mut ids = Vec::new();
    for (h, name) in [(&b, "W1"), (&a, "W2"), (&b, "W3")] {
        let id = rid(&sb, name);
        waiters.push(
            run_on(&sb, h, &cfg, app, &id)
                .command(["sh", "-c", &format!("echo {name} >> {q}")])
                .spawn(),
        );
        ids.push(id);
        wait_until(&format!("{name} queued on the server"), TIMEOUT, || {
            pg_queue(&pg, app) == ids
        });
    }
    // The middle waiter's core dies: its session closes, its ticket lock with it, and its row
    // is no live queue entry any more.
    let core = waiters[1].wait_core_pid(TIMEOUT);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(core),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL the middle waiter's core");
    wait_until("the killed waiter left the queue", TIMEOUT, || {
        pg_queue(&pg, app) == [ids[0].clone(), ids[2].clone()]
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

/// A holder of `app` on host `h` (run id `id`) that keeps it until `release` exists; returns
/// once its command runs.
fn hold_on(
    sb: &Sandbox,
    h: &Host,
    cfg: &Path,
    app: &str,
    id: &str,
    release: &Path,
) -> RunningTether {
    let started = sb.mark(&format!("{id}-started"));
    let t = run_on(sb, h, cfg, app, id)
        .command([
            "sh",
            "-c",
            &format!(
                "touch {}; {}",
                shell_quote(&started),
                sh_wait_for(&shell_quote(release))
            ),
        ])
        .spawn();
    wait_file(&started, TIMEOUT);
    t
}

/// `tether status` on host `h` (its dirs, its host name) with the cluster config `cfg`.
fn status_on<'a>(sb: &'a Sandbox, h: &Host, cfg: &Path) -> TetherCmd<'a> {
    sb.tether_status()
        .wrapped(on_host(&h.name))
        .no_sandbox_dirs()
        .arg("--lock-dir")
        .arg(&h.lock)
        .arg("--runs-dir")
        .arg(&h.runs)
        .arg("--config")
        .arg(cfg)
        .env(PASSWORD_ENV, PASSWORD)
}

/// Issue 17 item 4 across hosts (CLI-CONTRACT §13, §27): the waiting line names the run's
/// position in the cluster's queue, the holder with its host, and the runs ahead of it on
/// every host; `tether status --json` on either host lists the cluster's waiters in queue
/// order, each with its host and pid.
#[test]
fn cluster_waiting_line_and_status_name_the_positions_across_hosts() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &pg.config_block());
    let (a, b) = (host(&sb, "host-a"), host(&sb, "host-b"));
    let app = "places.test";
    let release = sb.mark("release");
    let h_id = rid(&sb, "H");
    let mut holder = hold_on(&sb, &a, &cfg, app, &h_id, &release);
    let h_core = holder.wait_core_pid(TIMEOUT);
    let mut waiters = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    let arrivals = [(&b, "W1"), (&a, "W2"), (&b, "W3")];
    for (h, name) in arrivals {
        let id = rid(&sb, name);
        // The line is said again every interval: W1 and W2 say their place in the longer
        // queue within 2 s of W3's arrival.
        waiters.push(
            run_on(&sb, h, &cfg, app, &id)
                .env("TETHER_WAIT_PROGRESS_INTERVAL", "2s")
                .command(["true"])
                .spawn(),
        );
        ids.push(id);
        wait_until(&format!("{name} queued on the server"), TIMEOUT, || {
            pg_queue(&pg, app) == ids
        });
    }
    let cores: Vec<i32> = waiters.iter().map(|w| w.wait_core_pid(TIMEOUT)).collect();
    let hosts = ["host-b", "host-a", "host-b"];
    // A run or holder of another host is named with it (` on host <h>`), one of this host's
    // without.
    let on = |of: &str, seen_from: &str| {
        if of == seen_from {
            String::new()
        } else {
            format!(" on host {of}")
        }
    };
    for (k, w) in waiters.iter_mut().enumerate() {
        let line = w.wait_line(&format!("position {} of 3 — ", k + 1), TIMEOUT);
        let prefix = format!(
            "tether: app lock {app}: position {} of 3 — held by run {h_id}{} (pid {h_core}, ",
            k + 1,
            on("host-a", hosts[k])
        );
        assert!(line.starts_with(&prefix), "{line}");
        assert!(line.ends_with(" — waiting"), "{line}");
        // `; ahead: run W1 on host host-b (waiting …), run W2 (waiting …) — waiting`: the runs
        // ahead in queue order, each with its host when not this one.
        let ahead: Vec<&str> = line
            .split_once("; ahead: ")
            .map(|(_, rest)| rest.split("), ").collect())
            .unwrap_or_default();
        assert_eq!(ahead.len(), k, "the runs ahead of W{}: {line}", k + 1);
        for (j, e) in ahead.iter().enumerate() {
            let want = format!("run {}{} (waiting ", ids[j], on(hosts[j], hosts[k]));
            assert!(
                e.starts_with(&want),
                "W{} names W{} as {want:?}: {line}",
                k + 1,
                j + 1
            );
        }
    }
    for h in [&a, &b] {
        let st = status_on(&sb, h, &cfg).arg("--json").run();
        st.assert_code(0);
        let v: serde_json::Value =
            serde_json::from_str(&st.stdout).unwrap_or_else(|e| panic!("{e}\n{st}"));
        let entry = v["cluster"]
            .as_array()
            .and_then(|c| c.iter().find(|e| e["app"] == app))
            .unwrap_or_else(|| panic!("no cluster entry for {app} on {}\n{st}", h.name));
        assert_eq!(
            (
                entry["holder"]["run_id"].as_str(),
                entry["holder"]["host"].as_str()
            ),
            (Some(h_id.as_str()), Some("host-a")),
            "{st}"
        );
        let listed: Vec<(String, String, i64)> = entry["waiters"]
            .as_array()
            .unwrap_or_else(|| panic!("no waiters\n{st}"))
            .iter()
            .map(|w| {
                (
                    w["run_id"].as_str().unwrap_or_default().to_owned(),
                    w["host"].as_str().unwrap_or_default().to_owned(),
                    w["pid"].as_i64().unwrap_or_default(),
                )
            })
            .collect();
        let want: Vec<(String, String, i64)> = (0..3)
            .map(|k| (ids[k].clone(), hosts[k].to_owned(), i64::from(cores[k])))
            .collect();
        assert_eq!(
            listed, want,
            "status on {} lists the queue in order\n{st}",
            h.name
        );
    }
    touch(&release);
    holder.wait_exit(TIMEOUT).assert_code(0);
    for w in &mut waiters {
        w.wait_exit(TIMEOUT).assert_code(0);
    }
}

/// Sessions named `id` waiting (not granted) for the app lock itself — a one-key advisory
/// lock (`objsubid = 1`), not a ticket: the head of the cluster's queue.
fn waits_on_the_app_lock(pg: &Postgres, id: &str) -> bool {
    pg.psql(&format!(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity s USING (pid) \
         WHERE l.locktype = 'advisory' AND NOT l.granted AND l.objsubid = 1 \
         AND s.application_name = '{id}'"
    )) == "1"
}

/// PROTOCOL §15 across hosts: a waiter whose core is SIGSTOPped (on host b) stops looking at
/// the queue; after the wait-progress interval the run behind it (on host a) skips it, with a
/// `queue-skip` line naming it, and waits on the app lock as the head; continued before the
/// holder ends, the stopped run counts again and goes first.
#[test]
fn cluster_a_stopped_waiter_is_skipped_and_goes_first_again_when_continued() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &pg.config_block());
    let (a, b) = (host(&sb, "host-a"), host(&sb, "host-b"));
    let app = "stopped.test";
    let order = sb.mark("order");
    let release = sb.mark("release");
    let mut holder = hold_on(&sb, &a, &cfg, app, &rid(&sb, "H"), &release);
    let mut waiters = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    for (h, name) in [(&b, "W1"), (&a, "W2")] {
        let id = rid(&sb, name);
        waiters.push(
            run_on(&sb, h, &cfg, app, &id)
                .env("TETHER_WAIT_PROGRESS_INTERVAL", "1s")
                .command(note(&order, name))
                .spawn(),
        );
        ids.push(id);
        wait_until(&format!("{name} queued on the server"), TIMEOUT, || {
            pg_queue(&pg, app) == ids
        });
    }
    wait_until("W1, the head, waits on the app lock", TIMEOUT, || {
        waits_on_the_app_lock(&pg, &ids[0])
    });
    let core1 = waiters[0].wait_core_pid(TIMEOUT);
    let pid1 = nix::unistd::Pid::from_raw(core1);
    let stopped_at = std::time::Instant::now();
    nix::sys::signal::kill(pid1, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP W1's core");
    let line = waiters[1].wait_line("skipping it", TIMEOUT);
    let waited = stopped_at.elapsed();
    assert!(line.contains("tether: warning: "), "{line}");
    assert!(
        line.contains(&format!("run {} ", ids[0])),
        "the line names W1: {line}"
    );
    // It looked last at most 200 ms before the stop; skipped only once that is 1 s old.
    assert!(
        waited >= std::time::Duration::from_millis(800),
        "skipped {waited:?} after the stop, before the interval: {line}"
    );
    wait_until("W2 waits on the app lock as the head", TIMEOUT, || {
        waits_on_the_app_lock(&pg, &ids[1])
    });
    assert_eq!(pg_queue(&pg, app), ids, "W1 keeps its place while skipped");
    nix::sys::signal::kill(pid1, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT W1's core");
    // Continued, W1 looks at the queue again, counts again and is the head once more.
    wait_until("W1 waits on the app lock again", TIMEOUT, || {
        waits_on_the_app_lock(&pg, &ids[0])
    });
    touch(&release);
    holder.wait_exit(TIMEOUT).assert_code(0);
    let done: Vec<_> = waiters.iter_mut().map(|w| w.wait_exit(TIMEOUT)).collect();
    done[0].assert_code(0).assert_stderr_lacks("skipping it");
    done[1].assert_code(0);
    assert_eq!(
        done[1].stderr_lines("skipping it").len(),
        1,
        "one queue-skip line per stop\n{}",
        done[1]
    );
    assert_eq!(
        log_lines(&order),
        ["W1 host-b", "W2 host-a"],
        "continued, W1 went first again"
    );
}

/// CLI-CONTRACT §7 across hosts: `--max-queue` is counted and the ticket placed under one
/// server-side lock, so runs of two hosts arriving together never overshoot it: six runs
/// (three per host, `--max-queue 2`) released at once while a holder holds — exactly two
/// queue, four exit 75 having run nothing; in each of 3 trials.
#[test]
fn cluster_max_queue_never_overshoots_when_two_hosts_arrive_together() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &pg.config_block());
    let (a, b) = (host(&sb, "host-a"), host(&sb, "host-b"));
    for trial in 0..3 {
        let app = format!("t{trial}.together.test");
        let order = sb.mark(&format!("order-{trial}"));
        let release = sb.mark(&format!("release-{trial}"));
        let go = sb.mark(&format!("go-{trial}"));
        let mut holder = hold_on(
            &sb,
            &a,
            &cfg,
            &app,
            &rid(&sb, &format!("H{trial}")),
            &release,
        );
        // Each waits for `go` in its UTS namespace, then execs tether: six starts at once.
        let wrapper = |name: &str| -> Vec<String> {
            let mut w = on_host(name);
            w[4] = format!(
                "hostname \"$0\" && {} && exec \"$@\"",
                sh_wait_for(&shell_quote(&go))
            );
            w
        };
        let mut runs: Vec<(String, RunningTether)> = (0..6)
            .map(|k| {
                let h = if k % 2 == 0 { &a } else { &b };
                let name = format!("R{k}");
                let id = rid(&sb, &format!("{name}-{trial}"));
                let t = run_on(&sb, h, &cfg, &app, &id)
                    .wrapped(wrapper(&h.name))
                    .args(["--max-queue", "2"])
                    .command(note(&order, &name))
                    .spawn();
                (id, t)
            })
            .collect();
        touch(&go);
        // Every arrival either queued or gave up.
        let mut refused = Vec::new();
        wait_until(
            &format!("all six queued or refused (trial {trial})"),
            TIMEOUT,
            || {
                for (id, t) in &mut runs {
                    if !refused.iter().any(|(r, _)| r == id) {
                        if let Some(f) = t.try_wait_exit(std::time::Duration::ZERO) {
                            refused.push((id.clone(), f));
                        }
                    }
                }
                refused.len() + pg_queue(&pg, &app).len() >= 6
            },
        );
        let queued = pg_queue(&pg, &app);
        assert_eq!(
            (queued.len(), refused.len()),
            (2, 4),
            "trial {trial}: two queued ({queued:?}), four refused: {:?}",
            refused
                .iter()
                .map(|(id, f)| format!("{id}: {f}"))
                .collect::<Vec<_>>()
        );
        for (_, f) in &refused {
            f.assert_code(75)
                .assert_stderr_contains("2 runs already waiting (--max-queue 2) — giving up");
        }
        assert!(log_lines(&order).is_empty(), "nothing ran while held");
        touch(&release);
        holder.wait_exit(TIMEOUT).assert_code(0);
        for (id, t) in &mut runs {
            if queued.contains(id) {
                t.wait_exit(TIMEOUT).assert_code(0);
            }
        }
        // The two queued ran, in their queue order; the refused ones ran nothing.
        let name_of = |id: &String| -> String {
            let k = runs.iter().position(|(r, _)| r == id).unwrap_or(usize::MAX);
            format!("R{k}")
        };
        let ran: Vec<String> = log_lines(&order)
            .iter()
            .map(|l| l.split(' ').next().unwrap_or_default().to_owned())
            .collect();
        let want: Vec<String> = queued.iter().map(name_of).collect();
        assert_eq!(
            ran, want,
            "trial {trial}: the two queued ran, in queue order"
        );
        assert_eq!(
            pg.psql(&format!(
                "SELECT count(*) FROM tether.runs WHERE app = '{app}'"
            )),
            "0",
            "no row is left"
        );
    }
}

/// Whether a signal `sig` is pending for the whole process `pid` (`ShdPnd` in its status).
fn signal_pending(pid: i32, sig: nix::sys::signal::Signal) -> bool {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("ShdPnd:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (sig as i32 - 1)) != 0)
}

/// The advisory locks of backend `pid` in `pg_locks`: how many with `objsubid` (1: an app's
/// key, 2: a ticket lock), `mode`, and granted or not.
fn backend_locks(pg: &Postgres, pid: i32, objsubid: u8, mode: &str, granted: bool) -> usize {
    pg.psql(&format!(
        "SELECT count(*) FROM pg_locks WHERE pid = {pid} AND locktype = 'advisory' \
         AND objsubid = {objsubid} AND mode = '{mode}' AND granted = {granted}"
    ))
    .parse()
    .unwrap_or(usize::MAX)
}

/// SIGSTOP backend `pid` while it waits in a slice (`waiting()` true before and after the
/// stop: one whose slice ended just before it is continued, and the next slice caught).
fn stop_mid_wait(pid: i32, what: &str, waiting: impl Fn() -> bool) -> StoppedBackend {
    loop {
        wait_until(what, TIMEOUT, &waiting);
        let stopped = StoppedBackend::stop(pid);
        if waiting() {
            return stopped;
        }
    }
}

/// Continue the stopped backend `pid` once the server has granted it a lock (`granted()`) and
/// its slice's `lock_timeout` is pending (SIGALRM, the earliest of its timers): it then fails
/// its statement with 55P03 while holding the lock (DECISIONS D85).
fn continue_granted_as_it_times_out(stopped: StoppedBackend, granted: impl Fn() -> bool) {
    let pid = stopped.0;
    wait_until("the lock granted to the stopped backend", TIMEOUT, granted);
    wait_until("the backend's lock timeout pending", TIMEOUT, || {
        signal_pending(pid, nix::sys::signal::Signal::SIGALRM)
    });
    drop(stopped);
}

fn skip_without_root() -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    if !root {
        eprintln!("SKIPPED: stopping a PostgreSQL backend (user postgres) needs root");
    }
    !root
}

/// PROTOCOL §15 "Under a cluster", DECISIONS D85: PostgreSQL can grant a waiter the app lock in
/// the instant its slice's `lock_timeout` fires and still fail the statement (the error path
/// keeps the grant), and a session-level lock outlives the failed statement. Made to happen on
/// purpose: W1, the head, is waiting on the app lock when its backend is stopped; W2
/// (`--queue-order newest-first`) takes the head's place in front of it; the holder ends, so
/// the server grants the app lock to W1's stopped backend; once the backend's lock timeout is
/// pending, it is continued — it fails the statement, holding the lock. W1 must see that it
/// holds the app lock and hand it on (it is no longer the head): W2 runs, then W1. (A W1 that
/// took the failure at its word kept the app while it waited behind W2, which waited for it:
/// neither ever ran.)
#[test]
fn cluster_app_lock_granted_as_a_slice_times_out_is_not_kept_unknowingly() {
    if skip_without_root() {
        return;
    }
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &pg.config_block());
    let a = host(&sb, "host-a");
    let app = "granted-late.test";
    let order = sb.mark("order");
    let release = sb.mark("release");
    let mut holder = hold_on(&sb, &a, &cfg, app, &rid(&sb, "H"), &release);
    let (id1, id2) = (rid(&sb, "W1"), rid(&sb, "W2"));
    let mut w1 = run_on(&sb, &a, &cfg, app, &id1)
        .command(note(&order, "W1"))
        .spawn();
    wait_until("W1 queued on the server", TIMEOUT, || {
        pg_queue(&pg, app) == [id1.clone()]
    });
    let backend = pg.backend_of(&id1);
    let stopped = stop_mid_wait(backend, "W1, the head, waits on the app lock", || {
        waits_on_the_app_lock(&pg, &id1)
    });
    let mut w2 = run_on(&sb, &a, &cfg, app, &id2)
        .args(["--queue-order", "newest-first"])
        .command(note(&order, "W2"))
        .spawn();
    wait_until("W2 queued in front of W1", TIMEOUT, || {
        pg_queue(&pg, app) == [id2.clone(), id1.clone()]
    });
    touch(&release);
    holder.wait_exit(TIMEOUT).assert_code(0);
    continue_granted_as_it_times_out(stopped, || {
        backend_locks(&pg, backend, 1, "ExclusiveLock", true) == 1
    });
    let bound = std::time::Duration::from_secs(30);
    w2.wait_exit(bound).assert_code(0);
    w1.wait_exit(bound).assert_code(0);
    assert_eq!(
        log_lines(&order),
        ["W2 host-a", "W1 host-a"],
        "W1 handed the app lock on to the head"
    );
}

/// D85 for a wait on the place ahead: W1 waits (shared) on the ticket lock of W0, the head;
/// W1's backend is stopped mid-wait; the holder ends, W0 takes the app and leaves the queue, so
/// the server grants W0's ticket lock to W1's stopped backend; continued once its lock timeout
/// is pending, the backend fails the statement holding it. W1 must let it go: once W1 waits on
/// the app lock as the head, its backend holds no shared ticket lock — only its own place's
/// (a kept one would make W0's ticket look taken for the rest of W1's run). Then W0 and W1 run
/// in order.
#[test]
fn cluster_place_ahead_granted_as_a_slice_times_out_is_let_go() {
    if skip_without_root() {
        return;
    }
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &pg.config_block());
    let a = host(&sb, "host-a");
    let app = "left-late.test";
    let order = sb.mark("order");
    let (release, release0) = (sb.mark("release"), sb.mark("release-w0"));
    let mut holder = hold_on(&sb, &a, &cfg, app, &rid(&sb, "H"), &release);
    let (id0, id1) = (rid(&sb, "W0"), rid(&sb, "W1"));
    let w0_started = sb.mark("w0-started");
    let mut w0 = run_on(&sb, &a, &cfg, app, &id0)
        .command([
            "sh",
            "-c",
            &format!(
                "echo \"W0 $(hostname)\" >> {}; touch {}; {}",
                shell_quote(&order),
                shell_quote(&w0_started),
                sh_wait_for(&shell_quote(&release0))
            ),
        ])
        .spawn();
    wait_until("W0 queued on the server", TIMEOUT, || {
        pg_queue(&pg, app) == [id0.clone()]
    });
    let mut w1 = run_on(&sb, &a, &cfg, app, &id1)
        .command(note(&order, "W1"))
        .spawn();
    wait_until("W1 queued behind W0", TIMEOUT, || {
        pg_queue(&pg, app) == [id0.clone(), id1.clone()]
    });
    let backend = pg.backend_of(&id1);
    let stopped = stop_mid_wait(backend, "W1 waits on W0's place", || {
        backend_locks(&pg, backend, 2, "ShareLock", false) == 1
    });
    touch(&release);
    holder.wait_exit(TIMEOUT).assert_code(0);
    wait_file(&w0_started, TIMEOUT);
    continue_granted_as_it_times_out(stopped, || {
        backend_locks(&pg, backend, 2, "ShareLock", true) == 1
    });
    wait_until("W1 waits on the app lock as the head", TIMEOUT, || {
        waits_on_the_app_lock(&pg, &id1)
    });
    assert_eq!(
        backend_locks(&pg, backend, 2, "ShareLock", true),
        0,
        "W1 let go of W0's ticket lock"
    );
    assert_eq!(
        backend_locks(&pg, backend, 2, "ExclusiveLock", true),
        1,
        "W1 holds its own place"
    );
    touch(&release0);
    w0.wait_exit(TIMEOUT).assert_code(0);
    w1.wait_exit(TIMEOUT).assert_code(0);
    assert_eq!(log_lines(&order), ["W0 host-a", "W1 host-a"]);
}
