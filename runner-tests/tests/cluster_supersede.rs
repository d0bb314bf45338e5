//! Issue 17 across hosts: `--on-busy cancel-older` under a cluster supersedes every older run
//! of the group on every host (PROTOCOL §18, DECISIONS D81–D82) — the holder tears down once
//! (exit 143, as a local cancel-older holder), the queued ones leave as `superseded` (143,
//! nothing run), runs of other groups keep their order, and the new run keeps its own arrival
//! place. A cancel of a waiter's statement that is not a supersede (no mark on its row) never
//! makes it leave as `superseded`.
//!
//! A "host" is its own lock dir, runs dir and host name (`unshare --uts`), as in
//! `cluster_queue.rs`: the only queue the hosts share is PostgreSQL's. Each arrival is started
//! only once the ones before it are seen waiting in PostgreSQL (`pg_locks`), so the arrival
//! order is known exactly.

use std::fs;
use std::path::Path;

use runner_tests::{
    dir_host, log_lines, on_host, rid, run_dirs, sh_wait_for, shell_quote, wait_file, wait_until,
    write_config, DirHost, Postgres, RunningTether, Sandbox, TetherCmd, TIMEOUT,
};

/// One simulated host: its own lock dir and runs dir (`dir_hosts.rs`) and its host name.
struct Host {
    name: String,
    dirs: DirHost,
}

fn host(sb: &Sandbox, name: &str) -> Host {
    Host {
        name: name.to_owned(),
        dirs: dir_host(sb, name),
    }
}

/// `tether run` on host `h` (its dirs, its host name) with the cluster config `cfg`.
fn run_on<'a>(sb: &'a Sandbox, h: &Host, cfg: &Path, app: &str, id: &str) -> TetherCmd<'a> {
    h.dirs.run(sb, cfg, app, id).wrapped(on_host(&h.name))
}

/// Sessions waiting (not granted) for an advisory lock: all of them, and those named `id`.
fn pg_waiting(pg: &Postgres, id: &str) -> (usize, usize) {
    runner_tests::pg::waiting_counts(&pg.psql(&runner_tests::pg::waiting_sql(id)))
}

/// A holder on `h` that keeps `app` until the file `<id>-never` appears or a cancel ends it (it
/// gives up after 30 s, exit 99), its teardown appending `td <reason>` to `td`.
fn holder(
    sb: &Sandbox,
    h: &Host,
    cfg: &Path,
    app: &str,
    id: &str,
    group: &str,
    td: &Path,
) -> RunningTether {
    let started = sb.mark(&format!("{id}-started"));
    let never = sb.mark(&format!("{id}-never"));
    let t = run_on(sb, h, cfg, app, id)
        .args(["--group", group])
        .teardown(format!("echo \"td $TETHER_REASON\" >> {}", shell_quote(td)))
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
    t
}

/// The order the app's commands ran in: each appends `<name> <host name>` to `order`.
fn note(order: &Path, name: &str) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!("echo \"{name} $(hostname)\" >> {}", shell_quote(order)),
    ]
}

#[test]
fn cluster_cancel_older_supersedes_the_groups_older_runs_on_every_host() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &pg.config_block());
    let (a, b) = (host(&sb, "host-a"), host(&sb, "host-b"));
    let app = "xsuper.test";
    let td = sb.mark("td.log");
    let order = sb.mark("order");
    let holder_id = rid(&sb, "A0");
    let mut holder = holder(&sb, &a, &cfg, app, &holder_id, "pr-A", &td);

    // Queued across both hosts, groups A, B, A, B, each seen waiting before the next starts.
    let arrivals = [
        (&b, "QA1", "pr-A"),
        (&a, "QB1", "pr-B"),
        (&a, "QA2", "pr-A"),
        (&b, "QB2", "pr-B"),
    ];
    let mut queued: Vec<(String, RunningTether)> = Vec::new();
    for (n, (h, name, group)) in arrivals.iter().enumerate() {
        let id = rid(&sb, name);
        let t = run_on(&sb, h, &cfg, app, &id)
            .args(["--group", group])
            .command(note(&order, name))
            .spawn();
        wait_until(
            &format!("{name} waits in PostgreSQL behind {n} others"),
            TIMEOUT,
            || pg_waiting(&pg, &id) == (n + 1, 1),
        );
        queued.push((id, t));
    }

    // The new run of group A, on host b.
    let new_id = rid(&sb, "NEW");
    let newer = run_on(&sb, &b, &cfg, app, &new_id)
        .args(["--group", "pr-A", "--on-busy", "cancel-older"])
        .command(note(&order, "NEW"))
        .run();
    newer.assert_code(0);
    newer.assert_stderr_contains(&format!(
        "cancelling older run {holder_id} of group pr-A on host host-a"
    ));
    for (i, host) in [(0, "host-b"), (2, "host-a")] {
        newer.assert_stderr_contains(&format!(
            "cancelling older queued run {} of group pr-A on host {host}",
            queued[i].0
        ));
    }
    assert_eq!(
        newer.stderr_lines("cancelling older").len(),
        3,
        "only the three older runs of group A are cancelled\n{newer}"
    );

    // The holder: torn down once, as a local cancel-older's SIGTERM would.
    let h = holder.wait_exit(TIMEOUT);
    h.assert_code(143)
        .assert_stderr_contains(&format!("superseded by run {new_id} of this run's group"));
    assert_eq!(h.summary_field("result"), Some("cancelled"), "{h}");
    assert_eq!(
        log_lines(&td),
        ["td signal"],
        "the holder's teardown ran exactly once\n{h}"
    );

    // The queued A runs: superseded, nothing run; the B runs ran.
    let mut finished = Vec::new();
    for (id, mut t) in queued {
        finished.push((id, t.wait_exit(TIMEOUT)));
    }
    for i in [0, 2] {
        let (_, f) = &finished[i];
        f.assert_code(143).assert_stderr_contains(&format!(
            "superseded by run {new_id} of this run's group while queued"
        ));
        assert_eq!(f.summary_field("result"), Some("superseded"), "{f}");
        assert_eq!(f.summary_field("teardown"), Some("none"), "{f}");
    }
    for i in [1, 3] {
        let (_, f) = &finished[i];
        f.assert_code(0).assert_stderr_lacks("superseded");
    }

    // B runs in their order, then the new run in its own arrival place (D82).
    assert_eq!(
        log_lines(&order),
        ["QB1 host-a", "QB2 host-b", "NEW host-b"],
        "the B runs kept their order, the superseded ones ran nothing, the new run came last"
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM tether.runs"),
        "0",
        "no row is left"
    );
    for h in [&a, &b] {
        assert_eq!(
            run_dirs(&h.dirs.runs),
            Vec::<String>::new(),
            "no run dir is left"
        );
    }
}

#[test]
fn cluster_a_cancelled_wait_without_a_mark_is_not_a_supersede() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &pg.config_block());
    let (a, b) = (host(&sb, "host-a"), host(&sb, "host-b"));
    let app = "xcancel.test";
    let td = sb.mark("td.log");
    let ran = sb.mark("ran");
    let holder_id = rid(&sb, "H");
    let mut holder = holder(&sb, &a, &cfg, app, &holder_id, "pr-1", &td);
    let wid = rid(&sb, "W");
    let mut waiter = run_on(&sb, &b, &cfg, app, &wid)
        .args(["--group", "pr-1"])
        .command(note(&ran, "W"))
        .spawn();
    wait_until("W waits in PostgreSQL", TIMEOUT, || {
        pg_waiting(&pg, &wid) == (1, 1)
    });

    // An operator's (or a statement timeout's) cancel: no mark on W's row.
    let cancelled = pg.psql(&format!(
        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = '{wid}'"
    ));
    assert_eq!(cancelled, "t", "W's backend was cancelled");
    let w = waiter.wait_exit(TIMEOUT);
    // Not a supersede: the failure it was before supersedes existed (125, the statement's
    // error), never 143.
    w.assert_code(125).assert_stderr_lacks("superseded");
    assert_eq!(w.summary_field("result"), Some("failed"), "{w}");
    w.assert_stderr_contains("canceling statement due to user request");
    assert!(log_lines(&ran).is_empty(), "W ran nothing\n{w}");

    // The holder is untouched: still holding, not told anything.
    assert!(holder.is_running(), "the holder still runs");
    assert_eq!(
        pg.psql(&format!(
            "SELECT coalesce(superseded_by, 'none') FROM tether.runs WHERE run_id = '{holder_id}'"
        )),
        "none"
    );
    holder.signal(runner_tests::Signal::SIGTERM);
    holder.wait_exit(TIMEOUT).assert_code(143);
    assert_eq!(log_lines(&td), ["td signal"]);
}

/// The window between the mark and the cancel: a marked waiter that is granted the lock before
/// its wait is cancelled (here: marked by hand, never cancelled) leaves as `superseded` at the
/// grant — its `running` update refuses a marked row — running nothing, and the lock goes on
/// to the next waiter at once.
#[test]
fn cluster_a_marked_waiter_granted_before_its_cancel_leaves_superseded() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &pg.config_block());
    let (a, b) = (host(&sb, "host-a"), host(&sb, "host-b"));
    let app = "xgrant.test";
    let td = sb.mark("td.log");
    let order = sb.mark("order");
    let holder_id = rid(&sb, "H");
    let mut holder = holder(&sb, &a, &cfg, app, &holder_id, "pr-1", &td);
    let mut waiters = Vec::new();
    for (n, (h, name)) in [(&b, "W1"), (&a, "W2")].into_iter().enumerate() {
        let id = rid(&sb, name);
        let t = run_on(&sb, h, &cfg, app, &id)
            .args(["--group", "pr-1"])
            .command(note(&order, name))
            .spawn();
        wait_until(&format!("{name} waits in PostgreSQL"), TIMEOUT, || {
            pg_waiting(&pg, &id) == (n + 1, 1)
        });
        waiters.push((id, t));
    }
    let w1 = waiters[0].0.clone();
    pg.psql(&format!(
        "UPDATE tether.runs SET superseded_by = 'someone-newer' WHERE run_id = '{w1}'"
    ));
    // The holder lets go (its command's wait ends: a normal exit).
    fs::write(sb.mark(&format!("{holder_id}-never")), "").expect("release the holder");
    holder.wait_exit(TIMEOUT).assert_code(0);
    let mut done = Vec::new();
    for (_, mut t) in waiters {
        done.push(t.wait_exit(TIMEOUT));
    }
    done[0]
        .assert_code(143)
        .assert_stderr_contains("superseded by run someone-newer of this run's group");
    assert_eq!(done[0].summary_field("result"), Some("superseded"));
    done[1].assert_code(0);
    assert_eq!(
        log_lines(&order),
        ["W2 host-a"],
        "the marked waiter ran nothing; the next one got the lock"
    );
}
