//! Issue 17 across hosts: `--on-busy cancel-older` under a cluster supersedes every older run
//! of the group on every host, in place (PROTOCOL §15 "Under a cluster", §18) — the holder
//! tears down once (exit 143, as a local cancel-older holder), the queued ones leave as
//! `superseded` (143, nothing run), runs of other groups keep their order, and the new run
//! takes the place of what it replaced: the head when it replaced the holder, else the place of
//! the foremost queued run it replaced. A cancel of a waiter's statement that is not a
//! supersede (no mark on its row) never makes it leave as `superseded`.
//!
//! A "host" is its own lock dir, runs dir and host name (`unshare --uts`), as in
//! `cluster_queue.rs`: the only queue the hosts share is the cluster's. Each arrival is started
//! only once the ones before it are seen queued on the server (the app's live queue entries in
//! queue order, [`runner_tests::pg::queue_sql`]), so the arrival order is known exactly.

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

/// The runs queued for `app` on the server, in queue order (its live queue entries).
fn pg_queue(pg: &Postgres, app: &str) -> Vec<String> {
    runner_tests::pg::queue_ids(&pg.psql(&runner_tests::pg::queue_sql(app)))
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

/// Queue one run per `(host, name, group)` of `arrivals`, each started once the ones before it
/// are queued on the server in arrival order; their commands note `<name> <host>` in `order`.
fn queue_runs(
    sb: &Sandbox,
    pg: &Postgres,
    cfg: &Path,
    app: &str,
    order: &Path,
    arrivals: &[(&Host, &str, &str)],
) -> Vec<(String, RunningTether)> {
    let mut queued: Vec<(String, RunningTether)> = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    for (h, name, group) in arrivals {
        let id = rid(sb, name);
        let t = run_on(sb, h, cfg, app, &id)
            .args(["--group", group])
            .command(note(order, name))
            .spawn();
        ids.push(id.clone());
        wait_until(
            &format!(
                "{name} queued on the server behind {} others",
                ids.len() - 1
            ),
            TIMEOUT,
            || pg_queue(pg, app) == ids,
        );
        queued.push((id, t));
    }
    queued
}

/// A queued run that was superseded: 143, `result=superseded`, no teardown, ran nothing.
fn assert_superseded(f: &runner_tests::Finished, by: &str) {
    f.assert_code(143).assert_stderr_contains(&format!(
        "superseded by run {by} of this run's group while queued"
    ));
    assert_eq!(f.summary_field("result"), Some("superseded"), "{f}");
    assert_eq!(f.summary_field("teardown"), Some("none"), "{f}");
}

/// Holder A0 (group A, host a); queued A1 (host b), B1 (host a), A2 (host b), B2 (host a); a
/// new A3 of group A on host b with cancel-older replaces the holder and both queued A runs and
/// takes the head: A0 torn down once, A1 and A2 gone having run nothing, then A3, B1, B2.
#[test]
fn cluster_cancel_older_supersedes_the_groups_runs_on_every_host_and_takes_the_head() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &pg.config_block());
    let (a, b) = (host(&sb, "host-a"), host(&sb, "host-b"));
    let app = "xsuper.test";
    let td = sb.mark("td.log");
    let order = sb.mark("order");
    let holder_id = rid(&sb, "A0");
    let mut holder = holder(&sb, &a, &cfg, app, &holder_id, "pr-A", &td);

    // Queued across both hosts, groups A, B, A, B.
    let arrivals = [
        (&b, "A1", "pr-A"),
        (&a, "B1", "pr-B"),
        (&b, "A2", "pr-A"),
        (&a, "B2", "pr-B"),
    ];
    let queued = queue_runs(&sb, &pg, &cfg, app, &order, &arrivals);

    // The new run of group A, on host b.
    let new_id = rid(&sb, "A3");
    let mut newer = run_on(&sb, &b, &cfg, app, &new_id)
        .args(["--group", "pr-A", "--on-busy", "cancel-older"])
        .command(note(&order, "A3"))
        .spawn();

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
        assert_superseded(&finished[i].1, &new_id);
    }
    for i in [1, 3] {
        finished[i]
            .1
            .assert_code(0)
            .assert_stderr_lacks("superseded");
    }
    let newer = newer.wait_exit(TIMEOUT);
    newer.assert_code(0);
    newer.assert_stderr_contains(&format!(
        "cancelling older run {holder_id} of group pr-A on host host-a"
    ));
    for (i, host) in [(0, "host-b"), (2, "host-b")] {
        newer.assert_stderr_contains(&format!(
            "cancelling older queued run {} of group pr-A on host {host}",
            finished[i].0
        ));
    }
    assert_eq!(
        newer.stderr_lines("cancelling older").len(),
        3,
        "only the three older runs of group A are cancelled\n{newer}"
    );

    // The new run took the holder's place, the head; the B runs kept their order.
    assert_eq!(
        log_lines(&order),
        ["A3 host-b", "B1 host-a", "B2 host-a"],
        "A3 first (the head), then the B runs in their order; A1 and A2 ran nothing"
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

/// As above with a holder of group B: B0 holds (host a), queued A1 (host b), B1 (host a), A2
/// (host b), B2 (host a); A3 (host b) replaces A1 and A2 and takes A1's place — the foremost
/// it replaced: the queue reads A3, B1, B2 while B0, untouched, still holds; then B0, A3, B1,
/// B2 run in that order.
#[test]
fn cluster_cancel_older_takes_the_place_of_the_foremost_queued_run_it_replaced() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &pg.config_block());
    let (a, b) = (host(&sb, "host-a"), host(&sb, "host-b"));
    let app = "xplace.test";
    let td = sb.mark("td.log");
    let order = sb.mark("order");
    let holder_id = rid(&sb, "B0");
    let mut holder = holder(&sb, &a, &cfg, app, &holder_id, "pr-B", &td);
    let arrivals = [
        (&b, "A1", "pr-A"),
        (&a, "B1", "pr-B"),
        (&b, "A2", "pr-A"),
        (&a, "B2", "pr-B"),
    ];
    let mut queued = queue_runs(&sb, &pg, &cfg, app, &order, &arrivals);
    let new_id = rid(&sb, "A3");
    let mut newer = run_on(&sb, &b, &cfg, app, &new_id)
        .args(["--group", "pr-A", "--on-busy", "cancel-older"])
        .command(note(&order, "A3"))
        .spawn();
    for i in [0, 2] {
        let f = queued[i].1.wait_exit(TIMEOUT);
        assert_superseded(&f, &new_id);
    }
    let (b1, b2) = (queued[1].0.clone(), queued[3].0.clone());
    wait_until("the queue to read A3, B1, B2", TIMEOUT, || {
        pg_queue(&pg, app) == [new_id.clone(), b1.clone(), b2.clone()]
    });
    assert!(holder.is_running(), "the holder of group B is untouched");
    assert!(log_lines(&td).is_empty(), "no teardown of B0 yet");
    // B0 lets go (its command's wait ends: a normal exit).
    fs::write(sb.mark(&format!("{holder_id}-never")), "").expect("release the holder");
    holder.wait_exit(TIMEOUT).assert_code(0);
    assert_eq!(log_lines(&td), ["td exited"], "B0's own teardown, once");
    let newer = newer.wait_exit(TIMEOUT);
    newer.assert_code(0);
    assert_eq!(
        newer.stderr_lines("cancelling older").len(),
        2,
        "only the two queued A runs are cancelled, not B0\n{newer}"
    );
    for i in [1, 3] {
        queued[i].1.wait_exit(TIMEOUT).assert_code(0);
    }
    assert_eq!(
        log_lines(&order),
        ["A3 host-b", "B1 host-a", "B2 host-a"],
        "A3 in A1's place, then the B runs in their order"
    );
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
    wait_until("W queued on the server", TIMEOUT, || {
        pg_queue(&pg, app) == [wid.as_str()]
    });

    // An operator's (or a statement timeout's) cancel: no mark on W's row. W's waits are
    // sliced (200 ms each, a look between): a cancel that lands between two statements does
    // nothing, so it is sent again until W ends.
    let mut cancels = 0;
    let w = loop {
        let cancelled = pg.psql(&format!(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = '{wid}'"
        ));
        cancels += 1;
        if let Some(w) = waiter.try_wait_exit(std::time::Duration::from_millis(100)) {
            break w;
        }
        assert_ne!(cancelled, "f", "W's backend may be cancelled");
        assert!(cancels < 300, "W still waits after {cancels} cancels");
    };
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
    let waiters = queue_runs(
        &sb,
        &pg,
        &cfg,
        app,
        &order,
        &[(&b, "W1", "pr-1"), (&a, "W2", "pr-1")],
    );
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
