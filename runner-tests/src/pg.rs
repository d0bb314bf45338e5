//! A throwaway PostgreSQL server per test (issue 16), from the PostgreSQL 15 binaries in
//! `/usr/lib/postgresql/15/bin`, run as the `postgres` user.
//!
//! - **Template**: `initdb` runs once per target dir into `<target>/tether-pg-template/`
//!   (guarded by a flock on `<target>/tether-pg-template.lock`, built in a staging dir and
//!   renamed into place, so a half-made template is never used). It has the role `tether`
//!   (password [`PASSWORD`]) owning the database `tether`; local (unix socket) connections are
//!   trusted, TCP ones need the password (scram-sha-256).
//! - **Per test**: [`Postgres::start`] copies the template into a fresh temp dir and starts
//!   `postgres` on a free port on 127.0.0.1, its unix socket in that temp dir, `fsync=off`.
//!   Dropping it stops the server (`SIGQUIT`: PostgreSQL's immediate shutdown, which also
//!   stops every backend) and waits for it, then removes the dir.
//! - **Nothing survives a killed test**: the server is started with `PR_SET_PDEATHSIG` =
//!   `SIGQUIT` towards the test thread that started it, so a SIGKILLed test (nextest's
//!   timeout, a crash) takes its server down with it; the backends leave when the postmaster
//!   does (they watch it).
//! - **In a network namespace**: [`Postgres::start_in`] starts it inside one (the hosts fixture,
//!   `netns.rs`), listening on that namespace's address and letting in its clients by password.
//! - **Loud**: a test that needs PostgreSQL and cannot start it panics with the reason and the
//!   server's log. Nothing is skipped.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::POLL;

/// Where the PostgreSQL 15 server binaries are.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The password of the role `tether` in every test server.
pub const PASSWORD: &str = "tether-test-password";
/// The variable the suite's configs name in `cluster.password_env`.
pub const PASSWORD_ENV: &str = "TETHER_TEST_PG_PASSWORD";

/// How long a server may take to start (a loaded CI machine).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a start is retried when another test took the port in between.
const PORT_TRIES: usize = 5;

/// Where [`Postgres::start_in`] puts a server: a network namespace, the addresses it listens
/// on there, and the clients (a CIDR) it lets in with the password.
#[derive(Debug, Clone)]
pub struct NetPlace {
    /// `/run/netns/<name>` (what `ip netns add` makes).
    pub netns: PathBuf,
    /// A `listen_addresses` value, e.g. `10.1.2.254`.
    pub listen: String,
    /// A `pg_hba.conf` address, e.g. `10.1.2.0/24`.
    pub clients: String,
}

/// One running test server; see the module doc.
#[derive(Debug)]
pub struct Postgres {
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    port: u16,
    /// The server's arguments after `-D <data> -p <port>`, for [`Postgres::restart`].
    args: Vec<String>,
    /// The network namespace it runs in ([`Postgres::start_in`]), for a restart too.
    netns: Option<PathBuf>,
}

/// uid and gid of the `postgres` user.
fn postgres_ids() -> (libc::uid_t, libc::gid_t) {
    let user = nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .unwrap_or_else(|| {
            panic!("the PostgreSQL test server needs the `postgres` user (apt-get install postgresql-15)")
        });
    (user.uid.as_raw(), user.gid.as_raw())
}

/// A command run as `postgres`, its parent-death signal set after the identity change (the
/// kernel clears it on a change of credentials).
fn as_postgres(program: &str, deathsig: Option<libc::c_int>) -> Command {
    as_postgres_in(program, deathsig, None)
}

/// [`as_postgres`], first entering the network namespace open on `netns` (`setns` needs
/// `CAP_SYS_ADMIN`, which the identity change drops: so it comes before it). The fd stays open
/// in the parent until the spawn returns, so the child still has it.
fn as_postgres_in(
    program: &str,
    deathsig: Option<libc::c_int>,
    netns: Option<std::os::fd::RawFd>,
) -> Command {
    let path = Path::new(PG_BIN).join(program);
    assert!(
        path.is_file(),
        "PostgreSQL server binary {} is missing: the suite needs PostgreSQL 15 \
         (apt-get install postgresql-15)",
        path.display()
    );
    let (uid, gid) = postgres_ids();
    let mut cmd = Command::new(path);
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = netns {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(sig) = deathsig {
                if libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// Run `cmd` to completion; panic with its output when it fails.
fn run_ok(mut cmd: Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `<target>`: above `<target>/<profile>/deps/<test exe>` or `<target>/<profile>/<helper>`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe() to locate the target dir");
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir.pop();
    dir
}

/// A temp dir the `postgres` user owns.
fn postgres_temp_dir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("creating a temp dir for PostgreSQL");
    let (uid, gid) = postgres_ids();
    std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", dir.path().display()));
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.path().display()));
    dir
}

/// The template data dir, made once (see the module doc).
fn template() -> PathBuf {
    let target = target_dir();
    fs::create_dir_all(&target).unwrap_or_else(|e| panic!("mkdir {}: {e}", target.display()));
    let tpl = target.join("tether-pg-template");
    let lock_path = target.join("tether-pg-template.lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap_or_else(|e| panic!("open {}: {e}", lock_path.display()));
    nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map(|held| {
            if !tpl.join("data/PG_VERSION").is_file() {
                build_template(&tpl);
            }
            drop(held);
        })
        .unwrap_or_else(|(_, e)| panic!("flock {}: {e}", lock_path.display()));
    tpl
}

fn build_template(tpl: &Path) {
    let staging = postgres_temp_dir("tether-pg-initdb-");
    let data = staging.path().join("data");
    let pwfile = staging.path().join("pw");
    fs::write(&pwfile, "postgres-test-password\n").expect("writing the initdb password file");
    let (uid, gid) = postgres_ids();
    std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).expect("chown the password file");
    let mut initdb = as_postgres("initdb", None);
    initdb
        .arg("-D")
        .arg(&data)
        .args([
            "--username=postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .arg(format!("--pwfile={}", pwfile.display()));
    run_ok(initdb, "initdb");
    // The role and database the tests connect as, made in single-user mode (no server yet).
    let mut single = as_postgres("postgres", None);
    single
        .args(["--single", "-D"])
        .arg(&data)
        .args(["-c", "fsync=off", "postgres"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = single.spawn().expect("starting postgres --single");
    {
        use std::io::Write;
        let mut stdin = child
            .stdin
            .take()
            .expect("the single-user postgres's stdin");
        writeln!(
            stdin,
            "CREATE ROLE tether LOGIN PASSWORD '{PASSWORD}';\nCREATE DATABASE tether OWNER tether;"
        )
        .expect("writing to postgres --single");
    }
    let out = child
        .wait_with_output()
        .expect("waiting for postgres --single");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("ERROR"),
        "creating the test role and database failed ({}):\n{text}",
        out.status
    );
    let staged = tpl.with_extension("tmp");
    let _ = fs::remove_dir_all(&staged);
    fs::create_dir_all(&staged).expect("creating the template staging dir");
    copy_tree(&data, &staged.join("data"));
    let _ = fs::remove_dir_all(tpl);
    fs::rename(&staged, tpl).expect("renaming the template into place");
}

/// A CA and a server certificate for `localhost` / 127.0.0.1 in `dir` (P-256 keys, one day),
/// the key readable by the `postgres` user only.
fn make_certs(dir: &Path) {
    let script = r#"set -e
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -keyout ca.key -out ca.crt -subj /CN=tether-test-ca \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout server.key -out server.csr -subj /CN=localhost
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > ext.cnf
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 \
  -extfile ext.cnf -out server.crt
chmod 600 server.key
"#;
    let mut sh = Command::new("sh");
    sh.args(["-c", script]).current_dir(dir);
    run_ok(sh, "making the test TLS certificates with openssl");
    let (uid, gid) = postgres_ids();
    for f in ["server.key", "server.crt", "ca.crt"] {
        std::os::unix::fs::chown(dir.join(f), Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {f}: {e}"));
    }
}

/// `cp -a` (owners and modes kept: the copy stays the `postgres` user's).
fn copy_tree(from: &Path, to: &Path) {
    let mut cp = Command::new("cp");
    cp.arg("-a").arg(from).arg(to);
    run_ok(cp, "copying a PostgreSQL data dir");
}

/// The SQL whose one row counts the sessions waiting (not granted) for an advisory lock: all
/// of them, and those whose `application_name` is `id` — read it with [`waiting_counts`].
/// (`id` is a test's run id: no quote in it.)
pub fn waiting_sql(id: &str) -> String {
    format!(
        "SELECT count(*) || ' ' || count(*) FILTER (WHERE s.application_name = '{id}') \
         FROM pg_locks l JOIN pg_stat_activity s USING (pid) \
         WHERE l.locktype = 'advisory' AND NOT l.granted"
    )
}

/// `(all waiters, waiters named id)` from [`waiting_sql`]'s output (`usize::MAX` when unreadable).
pub fn waiting_counts(row: &str) -> (usize, usize) {
    let mut it = row.split(' ').map(|n| n.parse().unwrap_or(usize::MAX));
    (
        it.next().unwrap_or(usize::MAX),
        it.next().unwrap_or(usize::MAX),
    )
}

/// The class of the cluster queue's ticket locks, `'tque'` (two-key advisory locks
/// `(TICKET_CLASS, ticket_key)`, PROTOCOL §15 "Under a cluster").
pub const TICKET_CLASS: u32 = 0x7471_7565;

/// The SQL condition that a row `r` of `tether.runs` is a live entry of `app`'s cluster queue:
/// it has a `ticket`, and its ticket lock is granted in this database (a row with a ticket but
/// no such lock is a dead waiter's). (`app` is a test's domain: no quote in it.)
pub fn live_entry_sql(app: &str) -> String {
    format!(
        "r.app = '{app}' AND r.ticket IS NOT NULL AND EXISTS ( \
           SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND l.classid = {TICKET_CLASS} AND l.objid = r.ticket_key::oid AND l.objsubid = 2)"
    )
}

/// The SQL whose one row names the runs queued for `app` in the cluster's queue (its live
/// entries, [`live_entry_sql`]) in queue order — ticket names compared bytewise — separated by
/// spaces; read it with [`queue_ids`].
pub fn queue_sql(app: &str) -> String {
    format!(
        "SELECT coalesce(string_agg(r.run_id, ' ' ORDER BY r.ticket COLLATE \"C\"), '') \
         FROM tether.runs r WHERE {}",
        live_entry_sql(app)
    )
}

/// The run ids of [`queue_sql`]'s output, in queue order.
pub fn queue_ids(row: &str) -> Vec<String> {
    row.split_whitespace().map(str::to_owned).collect()
}

/// A cluster URL on 127.0.0.1 where nothing listens (a port taken from the kernel and released),
/// and its port: a database that is down.
pub fn refused_url() -> (String, u16) {
    let port = free_port();
    (
        format!("postgres://tether@127.0.0.1:{port}/tether?sslmode=disable"),
        port,
    )
}

/// A port nobody listens on right now (another test may take it before the server does: the
/// start is then retried).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0 to find a free port")
}

/// Start `postgres` on `root`'s data dir and `port` with `args`, its output to `log`, inside
/// the network namespace `netns` (a `/run/netns/<name>` file) when given.
fn spawn_server(
    root: &Path,
    port: u16,
    args: &[String],
    log: fs::File,
    netns: Option<&Path>,
) -> Child {
    // Opened before the spawn, entered by the child (`as_postgres_in`).
    let ns = netns.map(|p| {
        fs::File::open(p)
            .unwrap_or_else(|e| panic!("opening the network namespace {}: {e}", p.display()))
    });
    let mut cmd = as_postgres_in(
        "postgres",
        Some(libc::SIGQUIT),
        ns.as_ref().map(std::os::fd::AsRawFd::as_raw_fd),
    );
    cmd.arg("-D")
        .arg(root.join("data"))
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .stdout(log.try_clone().expect("dup the log fd"))
        .stderr(log);
    cmd.spawn()
        .unwrap_or_else(|e| panic!("starting PostgreSQL: {e}"))
}

impl Postgres {
    /// Start a fresh server (see the module doc). Panics, with the server's log, when it
    /// cannot.
    pub fn start() -> Postgres {
        Postgres::start_with(false)
    }

    /// [`Postgres::start`] with TLS on: a throwaway CA ([`Postgres::ca_file`]) signed the
    /// server's certificate for `localhost` and 127.0.0.1 (made with `openssl`).
    pub fn start_with_tls() -> Postgres {
        Postgres::start_with(true)
    }

    /// A fresh server inside another network namespace (the hosts fixture, `netns.rs`):
    /// started in the namespace of `place.netns`, listening on `place.listen` (a
    /// `listen_addresses` value) besides its unix socket, accepting password (scram)
    /// connections from `place.clients` (a CIDR) too. [`Postgres::psql`] still works: it
    /// goes through the unix socket, which is a file, not part of any network namespace.
    pub fn start_in(place: &NetPlace) -> Postgres {
        Postgres::start_full(false, Some(place))
    }

    fn start_with(tls: bool) -> Postgres {
        Postgres::start_full(tls, None)
    }

    fn start_full(tls: bool, place: Option<&NetPlace>) -> Postgres {
        let tpl = template();
        let dir = postgres_temp_dir("tether-pg-");
        let root = dir.path().to_path_buf();
        copy_tree(&tpl.join("data"), &root.join("data"));
        if let Some(p) = place {
            use std::io::Write;
            let hba = root.join("data/pg_hba.conf");
            fs::OpenOptions::new()
                .append(true)
                .open(&hba)
                .and_then(|mut f| writeln!(f, "host all all {} scram-sha-256", p.clients))
                .unwrap_or_else(|e| panic!("appending to {}: {e}", hba.display()));
        }
        let mut tls_args = Vec::new();
        if tls {
            make_certs(&root);
            tls_args = vec![
                "-c".to_owned(),
                "ssl=on".to_owned(),
                "-c".to_owned(),
                format!("ssl_cert_file={}", root.join("server.crt").display()),
                "-c".to_owned(),
                format!("ssl_key_file={}", root.join("server.key").display()),
            ];
        }
        let mut last_log = String::new();
        for _ in 0..PORT_TRIES {
            let port = free_port();
            let log = root.join(format!("server-{port}.log"));
            let log_file = fs::File::create(&log).expect("creating the server log");
            let (uid, gid) = postgres_ids();
            std::os::unix::fs::chown(&log, Some(uid), Some(gid)).expect("chown the server log");
            let mut args = vec!["-k".to_owned(), root.display().to_string()];
            args.extend(
                [
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=50",
                    "-c",
                    "shared_buffers=16MB",
                ]
                .map(str::to_owned),
            );
            args.extend(tls_args.iter().cloned());
            if let Some(p) = place {
                // A later `-c` wins: the namespace's addresses instead of 127.0.0.1.
                args.extend(["-c".to_owned(), format!("listen_addresses={}", p.listen)]);
            }
            let netns = place.map(|p| p.netns.clone());
            let child = spawn_server(&root, port, &args, log_file, netns.as_deref());
            let mut pg = Postgres {
                child: Some(child),
                dir: None,
                root: root.clone(),
                port,
                args,
                netns,
            };
            match pg.wait_ready(&log) {
                Ok(()) => {
                    pg.dir = Some(dir);
                    return pg;
                }
                Err(text) => {
                    pg.stop();
                    let port_taken = text.contains("Address already in use");
                    last_log = text;
                    if !port_taken {
                        break;
                    }
                }
            }
        }
        panic!("the PostgreSQL test server did not start:\n{last_log}");
    }

    /// Until `postmaster.pid` says `ready`; `Err(log)` when the server exits or times out.
    fn wait_ready(&mut self, log: &Path) -> Result<(), String> {
        let pidfile = self.root.join("data/postmaster.pid");
        let until = Instant::now() + START_TIMEOUT;
        loop {
            let ready = fs::read_to_string(&pidfile)
                .ok()
                .is_some_and(|t| t.lines().nth(7).is_some_and(|l| l.trim() == "ready"));
            if ready {
                return Ok(());
            }
            let exited = match self.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                Some(Err(e)) => Some(e.to_string()),
                _ => None,
            };
            let log_text = || fs::read_to_string(log).unwrap_or_default();
            if let Some(status) = exited {
                return Err(format!("postgres exited ({status}):\n{}", log_text()));
            }
            if Instant::now() > until {
                return Err(format!(
                    "postgres not ready after {START_TIMEOUT:?}:\n{}",
                    log_text()
                ));
            }
            std::thread::sleep(POLL); // polling postmaster.pid, bounded
        }
    }

    /// [`Postgres::start`], then TCP connections from 127.0.0.1 are trusted (no password): the
    /// server of the suite's cluster switch (`TETHER_TEST_CLUSTER=1`, see [`crate::Sandbox`]).
    /// tether reads a cluster password only through a config file's `password_env` /
    /// `password_file`, and a test's own `--config` would drop that; with trust,
    /// `TETHER_CLUSTER_URL` alone configures the cluster and every test keeps its own config.
    /// Returns once a password-less TCP connection works (the reload is asynchronous).
    pub fn start_trusting_tcp() -> Postgres {
        let pg = Postgres::start();
        let hba = pg.root.join("data/pg_hba.conf");
        // Rewritten in place: the file stays the `postgres` user's, in its 0700 data dir.
        fs::write(
            &hba,
            "local all all trust\nhost all all 127.0.0.1/32 trust\n",
        )
        .unwrap_or_else(|e| panic!("writing {}: {e}", hba.display()));
        pg.psql("SELECT pg_reload_conf()");
        let until = Instant::now() + START_TIMEOUT;
        loop {
            let out = Command::new(Path::new(PG_BIN).join("psql"))
                .args(["-h", "127.0.0.1", "-p", &pg.port.to_string()])
                .args(["-U", "tether", "-d", "tether", "-w", "-X", "-A", "-t"])
                .args(["-c", "SELECT 1"])
                .env_remove("PGPASSWORD")
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("starting psql: {e}"));
            if out.status.success() {
                return pg;
            }
            assert!(
                Instant::now() < until,
                "password-less TCP connections still refused after {START_TIMEOUT:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(POLL); // polling the asynchronous reload, bounded
        }
    }

    /// The CA that signed the server's certificate ([`Postgres::start_with_tls`]).
    pub fn ca_file(&self) -> PathBuf {
        self.root.join("ca.crt")
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory of the unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    /// The postmaster's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// `postgres://tether@<host>:<port>/tether?sslmode=disable`.
    pub fn url_with_host(&self, host: &str) -> String {
        format!(
            "postgres://tether@{host}:{}/tether?sslmode=disable",
            self.port
        )
    }

    /// [`Postgres::url_with_host`] on 127.0.0.1.
    pub fn url(&self) -> String {
        self.url_with_host("127.0.0.1")
    }

    /// A config file's `cluster:` block for this server (password from [`PASSWORD_ENV`]).
    pub fn config_block(&self) -> String {
        format!(
            "cluster:\n  url: {}\n  password_env: {PASSWORD_ENV}\n  connect_timeout: 10s\n",
            self.url()
        )
    }

    /// The server's log so far (its stdout and stderr), e.g. with `log_connections` on.
    pub fn server_log(&self) -> String {
        let path = self.root.join(format!("server-{}.log", self.port));
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    }

    /// The pid of the server backend of the session named `id` (a run's own session: its
    /// `application_name` is the run id). Panics unless there is exactly one.
    pub fn backend_of(&self, id: &str) -> i32 {
        let text = self.psql(&format!(
            "SELECT pid FROM pg_stat_activity WHERE application_name = '{id}'"
        ));
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("one backend for {id}, got {text:?}"))
    }

    /// Run SQL as the superuser over the unix socket; the rows, `|`-separated, one a line.
    /// Panics when psql fails.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(Path::new(PG_BIN).join("psql"))
            .arg("-h")
            .arg(&self.root)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "tether",
            ])
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("starting psql: {e}"));
        assert!(
            out.status.success(),
            "psql {sql:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim_end().to_owned()
    }

    /// Stop the server at once (immediate shutdown, as a crash would) and start it again on
    /// the same data dir and port; returns when it accepts connections again. Every session
    /// of before is gone.
    pub fn restart(&mut self) {
        self.stop();
        // An immediate stop may leave the old `postmaster.pid` saying `ready`: the wait below
        // must read the new server's.
        let _ = fs::remove_file(self.root.join("data/postmaster.pid"));
        let log = self.root.join(format!("server-{}-restart.log", self.port));
        let log_file = fs::File::create(&log).expect("creating the server log");
        let (uid, gid) = postgres_ids();
        std::os::unix::fs::chown(&log, Some(uid), Some(gid)).expect("chown the server log");
        self.child = Some(spawn_server(
            &self.root,
            self.port,
            &self.args,
            log_file,
            self.netns.as_deref(),
        ));
        if let Err(text) = self.wait_ready(&log) {
            panic!("the PostgreSQL test server did not restart:\n{text}");
        }
    }

    /// Stop the server now (immediate shutdown) and wait for it; idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT);
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() > until => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
                Ok(None) => std::thread::sleep(POLL), // polling the server's exit, bounded
            }
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        if std::env::var_os("TETHER_TEST_KEEP").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("runner-tests: keeping {}", dir.keep().display());
            }
        }
    }
}

/// A server backend stopped with SIGSTOP (a backend that cannot answer, or one caught in the
/// middle of a lock wait), continued on drop: a failing test never leaves it stopped, nor the
/// server unable to stop. Signalling a backend of the `postgres` user needs root.
pub struct StoppedBackend(pub i32);

impl StoppedBackend {
    pub fn stop(pid: i32) -> StoppedBackend {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGSTOP,
        );
        StoppedBackend(pid)
    }
}

impl Drop for StoppedBackend {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGCONT,
        );
    }
}
