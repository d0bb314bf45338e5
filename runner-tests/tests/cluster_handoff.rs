//! The cluster handoff's hot path (issue 16 benchmark B9, DECISIONS D80) against a real
//! PostgreSQL 15: a run that takes the app's cluster lock does its bookkeeping on the lock's
//! session in the acquisition's one round trip, and connects no bookkeeping session
//! (`<run id>.reap`) when the app's rows leave nothing to settle — while a row that does need
//! settling (a dead holder of another host) still gets the full reconcile on that session.
//!
//! What connects is read from the server's own log (`log_connections`, which names each
//! session's `application_name`): the sessions are real, nothing is mocked.

use std::path::Path;

use runner_tests::pg::{PASSWORD, PASSWORD_ENV};
use runner_tests::{
    log_lines, rid, sh_wait_for, shell_quote, touch, wait_line, wait_until, write_config, Postgres,
    Sandbox, TetherCmd, TIMEOUT,
};

/// A server that logs every connection with its `application_name`.
fn logging_server() -> Postgres {
    let pg = Postgres::start();
    pg.psql("ALTER SYSTEM SET log_connections = on");
    pg.psql("SELECT pg_reload_conf()");
    // The reload is asynchronous: a fresh session sees the setting once the postmaster has
    // read it (the backends start from the postmaster's settings).
    wait_until("log_connections on", TIMEOUT, || {
        pg.psql("SHOW log_connections") == "on"
    });
    pg
}

/// The `application_name`s of the sessions the server logged so far.
fn connected(pg: &Postgres) -> Vec<String> {
    pg.server_log()
        .lines()
        .filter_map(|l| l.split("connection authorized: ").nth(1))
        .filter_map(|rest| rest.split("application_name=").nth(1))
        .map(|name| name.split_whitespace().next().unwrap_or("").to_owned())
        .collect()
}

/// A SQL string literal (standard_conforming_strings is on).
fn sql_lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn run<'a>(sb: &'a Sandbox, cfg: &Path, app: &str, id: &str) -> TetherCmd<'a> {
    TetherCmd::new(sb, "run")
        .arg("--config")
        .arg(cfg)
        .env(PASSWORD_ENV, PASSWORD)
        .app(app)
        .run_id(id)
}

/// A handoff between two runs with nothing to settle: the waiter's command starts after the
/// holder's ended (and gets the next fence), both rows go `running` and then away, and
/// neither run connects a `.reap` session — the lock's own session did the bookkeeping.
/// Sanity: the log does show each run's lock session and its `.sweep` session.
#[test]
fn handoff_with_nothing_to_settle_connects_no_bookkeeping_session() {
    let sb = Sandbox::new();
    let pg = logging_server();
    let cfg = write_config(&sb, "cluster.yml", &pg.config_block());
    let app = "handoff.test";
    let log = sb.mark("order.log");
    let (rel_h, rel_w) = (sb.mark("rel-h"), sb.mark("rel-w"));
    let (id_h, id_w) = (rid(&sb, "h"), rid(&sb, "w"));
    let held = |tag: &str, release: &Path| {
        let q = shell_quote(&log);
        vec![
            "sh".to_owned(),
            "-c".to_owned(),
            format!(
                "echo \"+{tag} $TETHER_FENCE\" >> {q}; {}; echo \"-{tag}\" >> {q}",
                sh_wait_for(&shell_quote(release))
            ),
        ]
    };
    let mut holder = run(&sb, &cfg, app, &id_h)
        .command(held("h", &rel_h))
        .spawn();
    wait_line(&log, "+h", TIMEOUT);
    let mut waiter = run(&sb, &cfg, app, &id_w)
        .command(held("w", &rel_w))
        .spawn();
    // The waiter stands in PostgreSQL's queue (its lock not granted) before the holder ends.
    wait_until("the waiter in the server's queue", TIMEOUT, || {
        runner_tests::pg::waiting_counts(&pg.psql(&runner_tests::pg::waiting_sql(&id_w))).1 == 1
    });
    touch(&rel_h);
    holder.wait_exit(TIMEOUT).assert_code(0);
    wait_line(&log, "+w", TIMEOUT);
    assert_eq!(
        pg.psql(&format!(
            "SELECT state FROM tether.runs WHERE run_id = '{id_w}'"
        )),
        "running",
        "the waiter's row once it holds the lock"
    );
    touch(&rel_w);
    waiter.wait_exit(TIMEOUT).assert_code(0);
    let lines = log_lines(&log);
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(
        lines[0].starts_with("+h ") && lines[1] == "-h" && lines[2].starts_with("+w "),
        "the waiter started after the holder ended: {lines:?}"
    );
    let fence = |l: &str| l.split(' ').nth(1).and_then(|f| f.parse::<i64>().ok());
    assert!(
        fence(&lines[2]) > fence(&lines[0]),
        "the fence grows: {lines:?}"
    );
    assert_eq!(pg.psql("SELECT count(*) FROM tether.runs"), "0");
    let names = connected(&pg);
    for id in [&id_h, &id_w] {
        assert!(names.contains(id), "{id}'s lock session not in {names:?}");
        assert!(
            names.contains(&format!("{id}.sweep")),
            "{id}.sweep not in {names:?}"
        );
        assert!(
            !names.contains(&format!("{id}.reap")),
            "{id} connected a bookkeeping session with nothing to settle: {names:?}"
        );
    }
}

/// The other direction: a dead holder's `running` row of another host (no session) is not
/// "nothing to settle" — the run reads the rows again on its `.reap` session, runs the dead
/// run's teardown there once (`TETHER_REASON=reaped`) and marks the row `reaped`.
#[test]
fn handoff_with_a_dead_holder_row_settles_it_on_a_bookkeeping_session() {
    let sb = Sandbox::new();
    let pg = logging_server();
    let cfg = write_config(
        &sb,
        "cluster.yml",
        &format!("{}  leftovers_wait: 1s\n", pg.config_block()),
    );
    let app = "settle.test";
    let td = sb.mark("td.log");
    let dead = rid(&sb, "dead");
    // The schema is made by the first run's lock session.
    run(&sb, &cfg, app, &rid(&sb, "first"))
        .command(["true"])
        .run()
        .assert_code(0);
    pg.psql(&format!(
        "INSERT INTO tether.runs (run_id, app, host, boot_id, pid, pid_start, state, teardown, \
         fence, acquired, heartbeat, started) VALUES ('{dead}', '{app}', 'elsewhere', 'boot-x', \
         4242, 1, 'running', {}, 1, now(), now(), now())",
        sql_lit(&format!(
            "echo \"td $TETHER_REASON $TETHER_RUN_ID\" >> {}",
            shell_quote(&td)
        ))
    ));
    let id = rid(&sb, "next");
    let out = run(&sb, &cfg, app, &id).command(["true"]).run();
    out.assert_code(0);
    assert_eq!(
        log_lines(&td),
        [format!("td reaped {dead}")],
        "the dead holder's teardown, once\n{out}"
    );
    assert_eq!(
        pg.psql(&format!(
            "SELECT state FROM tether.runs WHERE run_id = '{dead}'"
        )),
        "reaped"
    );
    let names = connected(&pg);
    assert!(
        names.contains(&format!("{id}.reap")),
        "no .reap session in {names:?}"
    );
}
