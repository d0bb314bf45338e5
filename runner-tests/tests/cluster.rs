//! Issue 16, part 1: the cluster's foundation against a real PostgreSQL 15 — the throwaway
//! server fixture, the connection (one thread), `tether cluster check` (schema created once,
//! verified, server and keepalives reported, a transaction-pooling proxy refused), and the
//! failures (unreachable: 75; credentials: 125).
//!
//! Every test that needs a server starts its own ([`Postgres::start`]); one that cannot fails.

use std::path::Path;
use std::time::Duration;

use runner_tests::pg::{PASSWORD, PASSWORD_ENV};
use runner_tests::{
    helper_bin, pid_alive, touch, wait_file, wait_pid_gone, write_config, Finished, KillOnDrop,
    PoolingProxy, Postgres, Sandbox, TIMEOUT,
};

/// `tether cluster check` with `config` (a file in the sandbox) and the suite's password.
fn check(sb: &Sandbox, config: &Path, extra: &[&str]) -> Finished {
    sb.tether("cluster")
        .no_sandbox_dirs()
        .arg("check")
        .arg("--config")
        .arg(config)
        .args(extra)
        .env(PASSWORD_ENV, PASSWORD)
        .run()
}

/// The server's objects in the schema `tether`, sorted (`r` table, `S` sequence, `i` index).
fn tether_objects(pg: &Postgres) -> String {
    pg.psql(
        "SELECT string_agg(c.relkind::text || ':' || c.relname, ',' ORDER BY c.relname) \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'tether'",
    )
}

#[test]
fn cluster_check_creates_the_schema_once_then_finds_it() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &pg.config_block());
    assert_eq!(
        tether_objects(&pg),
        "",
        "a fresh server has no tether schema"
    );

    let first = check(&sb, &cfg, &[]);
    first.assert_code(0);
    let created = first.stderr_lines("created");
    assert_eq!(
        created,
        vec![format!(
            "tether: cluster: created schema tether, table tether.runs, sequence tether.fence, \
             sequence tether.ticket on {} (127.0.0.1:{})",
            pg.url(),
            pg.port()
        )],
        "exactly one line says what was created\n{first}"
    );
    assert_eq!(
        tether_objects(&pg),
        "S:fence,r:runs,i:runs_app,i:runs_pkey,S:ticket",
        "the schema holds the runs table (and its indexes) and the fence and ticket sequences"
    );
    let cols = pg.psql(
        "SELECT string_agg(column_name, ',' ORDER BY ordinal_position) \
         FROM information_schema.columns WHERE table_schema='tether' AND table_name='runs'",
    );
    assert_eq!(
        cols,
        "run_id,app,host,boot_id,pid,pid_start,state,teardown,ci_link,fence,heartbeat,started,\
         grp,acquired,leftovers_killed,superseded_by,ticket,ticket_key,looked"
    );
    let out = &first.stdout;
    assert!(
        out.contains(&format!(
            "server      {} (127.0.0.1:{})",
            pg.url(),
            pg.port()
        )),
        "{first}"
    );
    assert!(out.contains("version     PostgreSQL 15."), "{first}");
    assert!(out.contains("schema      tether ok"), "{first}");
    assert!(out.contains("(no transaction pooling)"), "{first}");
    assert!(
        out.contains("keepalive   server: tcp_keepalives_idle=")
            && out.contains("client_connection_check_interval=")
            && out.contains("client: keepalives idle=5s interval=1s count=3"),
        "{first}"
    );

    let second = check(&sb, &cfg, &[]);
    second.assert_code(0).assert_stderr_lacks("created");
    assert_eq!(
        second.stderr, "",
        "an existing schema is verified silently\n{second}"
    );
    assert_eq!(
        tether_objects(&pg),
        "S:fence,r:runs,i:runs_app,i:runs_pkey,S:ticket"
    );
}

#[test]
fn cluster_check_names_what_an_alien_schema_lacks() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    pg.psql(
        "CREATE SCHEMA tether AUTHORIZATION tether; \
         CREATE TABLE tether.runs (run_id text PRIMARY KEY, app integer); \
         ALTER TABLE tether.runs OWNER TO tether",
    );
    let cfg = write_config(&sb, "cluster.yml", &pg.config_block());
    let out = check(&sb, &cfg, &[]);
    out.assert_code(125);
    let line = out.stderr_lines("tether: error: cluster").join("\n");
    assert!(
        line.contains("the schema tether is not what this tether needs")
            && line.contains("column app is integer, not text")
            && line.contains("column host is missing"),
        "{out}"
    );
    assert_eq!(
        tether_objects(&pg),
        "S:fence,r:runs,i:runs_pkey,S:ticket",
        "only the missing sequences were added; the table was not touched"
    );
}

#[test]
fn cluster_connection_starts_no_thread() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    // A host *name*: the lookup is where tokio would start a blocking-pool thread.
    let cfg = write_config(
        &sb,
        "cluster.yml",
        &format!(
            "cluster:\n  url: {}\n  password_env: {PASSWORD_ENV}\n",
            pg.url_with_host("localhost")
        ),
    );
    let pause = sb.mark("checked");
    let mut run = sb
        .tether("cluster")
        .no_sandbox_dirs()
        .arg("check")
        .arg("--config")
        .arg(&cfg)
        .env(PASSWORD_ENV, PASSWORD)
        .env("TETHER_FAULT_CLUSTER_CHECKED", &pause)
        .spawn();
    let waiting = pause.with_extension("waiting");
    wait_file(&waiting, TIMEOUT);
    let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", run.pid()))
        .expect("reading /proc/<pid>/task")
        .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
        .collect();
    touch(&pause);
    let done = run.wait_exit(TIMEOUT);
    done.assert_code(0);
    assert_eq!(
        tasks,
        vec![run.pid().to_string()],
        "after connecting (by host name), creating the schema and querying, tether has one \
         thread\n{done}"
    );
}

#[test]
fn cluster_check_unreachable_exits_75_naming_the_server() {
    let sb = Sandbox::new();
    let (url, port) = runner_tests::pg::refused_url();
    let cfg = write_config(&sb, "cluster.yml", &format!("cluster:\n  url: {url}\n"));
    let out = check(&sb, &cfg, &[]);
    out.assert_code(75);
    assert_eq!(
        out.stderr.lines().collect::<Vec<_>>(),
        vec![format!(
            "tether: error: cluster {url} (127.0.0.1:{port}): cannot connect: error connecting \
             to server: Connection refused (os error 111)"
        )],
        "one line naming the server and the error\n{out}"
    );
    assert_eq!(out.stdout, "");
}

#[test]
fn cluster_check_unreachable_is_bounded_by_the_connect_timeout() {
    let sb = Sandbox::new();
    // A listener whose backlog is full does not complete the handshake: the connect hangs
    // until the timeout (nothing answers on 127.0.0.1 with a SYN-ACK once the queue is full).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener");
    let port = listener.local_addr().expect("its address").port();
    let mut fillers = Vec::new();
    let url = format!("postgres://tether@127.0.0.1:{port}/tether?sslmode=disable");
    // Fill the accept queue (never accepted) so the next connect waits.
    for _ in 0..256 {
        match std::net::TcpStream::connect_timeout(
            &([127, 0, 0, 1], port).into(),
            Duration::from_millis(50),
        ) {
            Ok(s) => fillers.push(s),
            Err(_) => break,
        }
    }
    let cfg = write_config(
        &sb,
        "cluster.yml",
        &format!("cluster:\n  url: {url}\n  connect_timeout: 1s\n"),
    );
    let started = std::time::Instant::now();
    let out = check(&sb, &cfg, &[]);
    let took = started.elapsed();
    out.assert_code(75);
    out.assert_stderr_contains(&format!("tether: error: cluster {url}"));
    assert!(
        took < Duration::from_secs(20),
        "the connect timeout (1s) bounds the wait; took {took:?}\n{out}"
    );
    drop(listener);
}

#[test]
fn cluster_check_refuses_a_transaction_pooling_proxy() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let proxy = PoolingProxy::start(pg.socket_dir(), pg.port());
    let url = format!(
        "postgres://tether@127.0.0.1:{}/tether?sslmode=disable",
        proxy.port()
    );
    let cfg = write_config(&sb, "cluster.yml", &format!("cluster:\n  url: {url}\n"));
    let out = check(&sb, &cfg, &[]);
    out.assert_code(125);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line\n{out}");
    assert!(
        lines[0].starts_with(&format!("tether: error: cluster {url}"))
            && lines[0].contains("the server backend changed between two statements (pid ")
            && lines[0].contains("transaction-pooling proxy")
            && lines[0].contains("pool_mode=session"),
        "{out}"
    );
    assert_eq!(
        tether_objects(&pg),
        "",
        "refused before anything was created"
    );

    // The same server without the proxy passes: the refusal was the proxy's doing.
    let direct = write_config(&sb, "direct.yml", &pg.config_block());
    check(&sb, &direct, &[]).assert_code(0);
}

#[test]
fn cluster_check_refused_credentials_exit_125() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let cfg = write_config(&sb, "cluster.yml", &pg.config_block());
    let out = sb
        .tether("cluster")
        .no_sandbox_dirs()
        .args(["check", "--config"])
        .arg(&cfg)
        .env(PASSWORD_ENV, "wrong")
        .run();
    out.assert_code(125);
    assert_eq!(out.stderr.lines().count(), 1, "{out}");
    out.assert_stderr_contains("password authentication failed for user \"tether\"");

    let unset = sb
        .tether("cluster")
        .no_sandbox_dirs()
        .args(["check", "--config"])
        .arg(&cfg)
        .env_remove(PASSWORD_ENV)
        .run();
    unset.assert_code(125);
    assert_eq!(
        unset.stderr.trim_end(),
        format!(
            "tether: error: cluster password_env: the variable {PASSWORD_ENV} is not set (or empty)"
        )
    );
    assert_eq!(tether_objects(&pg), "", "nothing created");
}

#[test]
fn cluster_password_file_and_url_flag() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let pw = sb.path().join("pg-password");
    std::fs::write(&pw, format!("{PASSWORD}\n")).expect("writing the password file");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    // The URL in the file points nowhere; the flag (then the variable) wins.
    let cfg = write_config(
        &sb,
        "cluster.yml",
        &format!(
            "cluster:\n  url: postgres://nobody@127.0.0.1:1/none?sslmode=disable\n  \
             password_file: {}\n",
            pw.display()
        ),
    );
    let open = check(&sb, &cfg, &["--cluster-url", &pg.url()]);
    open.assert_code(125);
    assert!(
        open.stderr
            .contains("mode 0644 lets others read it: make it 0600"),
        "a password file others can read is refused\n{open}"
    );
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    check(&sb, &cfg, &["--cluster-url", &pg.url()]).assert_code(0);
    let by_env = sb
        .tether("cluster")
        .no_sandbox_dirs()
        .args(["check", "--config"])
        .arg(&cfg)
        .env("TETHER_CLUSTER_URL", pg.url())
        .run();
    by_env.assert_code(0);
    assert!(by_env.stdout.contains(&pg.url()), "{by_env}");
}

#[test]
fn cluster_url_with_a_password_is_refused() {
    let sb = Sandbox::new();
    let out = sb
        .tether("cluster")
        .no_sandbox_dirs()
        .args([
            "check",
            "--cluster-url",
            "postgres://tether:hunter2@127.0.0.1/tether",
        ])
        .run();
    out.assert_code(125);
    out.assert_stderr_contains("has a password in it: never put a password in the URL");
    out.assert_stderr_lacks("hunter2");

    let cfg = write_config(
        &sb,
        "cluster.yml",
        "cluster:\n  url: postgres://tether:hunter2@db/tether\n",
    );
    let file = sb
        .tether("config")
        .no_sandbox_dirs()
        .args(["check"])
        .arg(&cfg)
        .run();
    file.assert_code(125);
    file.assert_stderr_contains(":2: key \"url\": cluster URL");
    file.assert_stderr_contains("has a password in it");
    file.assert_stderr_lacks("hunter2");
}

#[test]
fn cluster_check_without_a_cluster_says_how_to_configure_one() {
    let sb = Sandbox::new();
    let cfg = write_config(&sb, "empty.yml", "deadline: 10m\n");
    let out = sb
        .tether("cluster")
        .no_sandbox_dirs()
        .args(["check", "--config"])
        .arg(&cfg)
        .env_remove("TETHER_CLUSTER_URL")
        .run();
    out.assert_code(125);
    assert_eq!(
        out.stderr.trim_end(),
        "tether: error: no cluster configured: set cluster.url in the config file, \
         --cluster-url or TETHER_CLUSTER_URL"
    );
}

#[test]
fn pg_fixture_server_dies_with_a_killed_test() {
    let sb = Sandbox::new();
    let ready = sb.mark("pg-holder.pid");
    let holder = KillOnDrop::spawn(
        std::process::Command::new(helper_bin("pg-holder"))
            .arg("--ready")
            .arg(&ready),
    );
    wait_file(&ready, TIMEOUT);
    let text = std::fs::read_to_string(&ready).expect("reading the postmaster pid");
    let (pid, dir) = text.trim().split_once(' ').expect("<pid> <dir>");
    let postmaster: i32 = pid.parse().expect("a pid");
    assert!(pid_alive(postmaster), "the server runs while its test does");
    let backends = children(postmaster);
    assert!(
        !backends.is_empty(),
        "a running server has its helper processes"
    );
    drop(holder); // SIGKILL: no destructor runs in pg-holder
    wait_pid_gone(postmaster, TIMEOUT);
    for pid in backends {
        wait_pid_gone(pid, TIMEOUT);
    }
    // The killed holder could not remove its server's dir.
    std::fs::remove_dir_all(dir).unwrap_or_else(|e| panic!("removing {dir}: {e}"));
}

#[test]
fn pg_fixture_drop_stops_the_server_and_its_backends() {
    let pg = Postgres::start();
    let postmaster = pg.pid();
    assert_eq!(pg.psql("SELECT 1"), "1");
    let backends = children(postmaster);
    assert!(!backends.is_empty());
    drop(pg);
    assert!(!pid_alive(postmaster), "drop waited for the postmaster");
    for pid in backends {
        wait_pid_gone(pid, TIMEOUT);
    }
}

/// The direct children of `pid` (a postmaster's checkpointer, writers, backends).
fn children(pid: i32) -> Vec<i32> {
    runner_tests::children_of(pid)
}

#[test]
fn cluster_tls_verify_full_and_require() {
    let sb = Sandbox::new();
    let pg = Postgres::start_with_tls();
    let url = |host: &str, mode: &str| {
        format!(
            "postgres://tether@{host}:{}/tether?sslmode={mode}",
            pg.port()
        )
    };
    let cfg = |name: &str, url: String, ca: bool| {
        let ca = if ca {
            format!("  ca_file: {}\n", pg.ca_file().display())
        } else {
            String::new()
        };
        write_config(
            &sb,
            name,
            &format!("cluster:\n  url: {url}\n  password_env: {PASSWORD_ENV}\n{ca}"),
        )
    };

    // verify-full against the test CA, by name and by address (both in the certificate).
    for host in ["localhost", "127.0.0.1"] {
        let out = check(&sb, &cfg("full.yml", url(host, "verify-full"), true), &[]);
        out.assert_code(0);
        assert!(
            out.stdout.contains("tls         TLSv1.3 ")
                && out.stdout.contains("(sslmode=verify-full)"),
            "the server sees a TLS session\n{out}"
        );
    }
    // verify-full with the public CAs only: the test CA is unknown, refused for good (125).
    let out = check(
        &sb,
        &cfg("public.yml", url("localhost", "verify-full"), false),
        &[],
    );
    out.assert_code(125);
    out.assert_stderr_contains("cannot connect: error performing TLS handshake");
    out.assert_stderr_contains("UnknownIssuer");
    // require: encrypted, the certificate not checked.
    let out = check(
        &sb,
        &cfg("require.yml", url("127.0.0.1", "require"), false),
        &[],
    );
    out.assert_code(0);
    assert!(out.stdout.contains("tls         TLSv1.3 "), "{out}");
    // disable: the server says so too.
    let out = check(
        &sb,
        &cfg("plain.yml", url("127.0.0.1", "disable"), false),
        &[],
    );
    out.assert_code(0);
    assert!(
        out.stdout.contains("tls         off (sslmode=disable)"),
        "{out}"
    );
}

#[test]
fn cluster_tls_required_but_not_offered_is_125() {
    let sb = Sandbox::new();
    let pg = Postgres::start();
    let url = format!(
        "postgres://tether@127.0.0.1:{}/tether?sslmode=require",
        pg.port()
    );
    let cfg = write_config(
        &sb,
        "cluster.yml",
        &format!("cluster:\n  url: {url}\n  password_env: {PASSWORD_ENV}\n"),
    );
    let out = check(&sb, &cfg, &[]);
    out.assert_code(125);
    out.assert_stderr_contains("server does not support TLS");
}

#[test]
fn cluster_config_show_names_sources_never_the_password() {
    let sb = Sandbox::new();
    let show = |cfg: &Path, env_url: Option<&str>| {
        let mut cmd = sb
            .tether("config")
            .no_sandbox_dirs()
            .args(["show", "--config"])
            .arg(cfg)
            .env(PASSWORD_ENV, PASSWORD)
            .env_remove("TETHER_CLUSTER_URL");
        if let Some(url) = env_url {
            cmd = cmd.env("TETHER_CLUSTER_URL", url);
        }
        let out = cmd.run();
        out.assert_code(0);
        assert!(!out.stdout.contains(PASSWORD), "the password leaked\n{out}");
        out.stdout
    };
    let line = |text: &str, key: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{key} ")))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    let none = write_config(&sb, "none.yml", "deadline: 1m\n");
    let out = show(&none, None);
    assert_eq!(
        line(&out, "cluster.url"),
        "cluster.url none (single host: local locks only) (default)"
    );
    // `config show` lists every key, set or not: without a cluster, no password source.
    assert_eq!(
        line(&out, "cluster.password"),
        "cluster.password none (default)",
        "no cluster, no password source"
    );

    let cfg = write_config(
        &sb,
        "cluster.yml",
        &format!("cluster:\n  url: postgres://tether@db:5433/ci\n  password_env: {PASSWORD_ENV}\n"),
    );
    let file = format!("(file {})", cfg.display());
    let out = show(&cfg, None);
    assert_eq!(
        line(&out, "cluster.url"),
        format!("cluster.url postgres://tether@db:5433/ci?sslmode=verify-full {file}")
    );
    assert_eq!(
        line(&out, "cluster.password"),
        format!("cluster.password from ${PASSWORD_ENV} {file}")
    );
    assert_eq!(
        line(&out, "cluster.connect_timeout"),
        "cluster.connect_timeout 5s (default)"
    );
    let out = show(&cfg, Some("postgres://other@h/db?sslmode=disable"));
    assert_eq!(
        line(&out, "cluster.url"),
        "cluster.url postgres://other@h:5432/db?sslmode=disable (env TETHER_CLUSTER_URL)"
    );
}
