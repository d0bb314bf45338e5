//! Real "hosts" for the cluster tests (issue 16): network namespaces made by the test, one of
//! them running a throwaway PostgreSQL, the others each a CI host with its own lock dir, runs
//! dir and host name, so that a partition between a host and the database is a real one.
//!
//! - **Layout** of a [`Cluster`] of N hosts: the database namespace `tether-<pid>-<k>-db`
//!   (loopback up, the server's address `10.A.B.254/32` on it) and, per host i, a namespace
//!   `tether-<pid>-<k>-h<i>` joined to the database's by a veth pair (`vh` on the host,
//!   `vd<i>` on the database's side, the /30 `10.A.B.4i`), a default route through it, and a
//!   veth `sink` that is never brought up (what a partition redirects to). `A.B` is the test
//!   process's pid modulo 65536 and `k` counts the clusters of the process. Every address is
//!   given inside namespaces the test made, so nothing here touches the machine's own network:
//!   the pid only keeps the addresses recognisable (a clash would be harmless).
//! - **The server** is [`Postgres::start_in`] the database namespace (as the `postgres` user,
//!   `PR_SET_PDEATHSIG` set after the identity change, as every test server), listening on
//!   `10.A.B.254`; the hosts reach it through their veth, the test through its unix socket
//!   ([`Cluster::psql`]).
//! - **tether on a host** is a direct child of the test: `nsenter --net=/run/netns/<ns> unshare
//!   --uts sh -c 'hostname <host> && exec tether …'` — every step execs, so the pid the test
//!   spawned is tether's front, its `PR_SET_PDEATHSIG` points at the test as usual, and the
//!   fixture's process-group handling works unchanged. `nsenter` rather than `ip netns exec`:
//!   the latter also remounts `/sys` in a mount namespace of its own, which would hide
//!   `/sys/fs/cgroup` from tether (DECISIONS D65).
//! - **Partitions are real**: [`Host::partition`] drops every IP packet between the host and
//!   the database silently (a `clsact` qdisc on `vh` whose u32 filters redirect both directions
//!   to the down `sink`: no link event, no ICMP, no error on either side — what a partition
//!   past the first hop looks like). ARP still passes: dropping it too would let the host's
//!   kernel fail its neighbour lookup after ~3 s and report "no route to host", which a host
//!   behind a router never sees; [`Host::partition_link`] takes `vh` down
//!   instead (the kernel then knows). [`Host::heal`] undoes either. This kernel has no `netem`
//!   (no `sch_netem`), which is why the drop is a redirect (D65).
//! - **Nothing stays behind**: dropping the cluster stops the server, then deletes the
//!   namespaces (which deletes their veths). A test killed outright cannot drop it: its server
//!   dies with it (PDEATHSIG), and the next [`Cluster::new`] of any test deletes every
//!   `tether-<pid>-…` namespace whose pid is dead.
//! - **Root only**: without root the fixture panics saying so — a cluster test must never pass
//!   by not running.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::command::TetherCmd;
use crate::pg::{NetPlace, Postgres, PASSWORD, PASSWORD_ENV};
use crate::sandbox::Sandbox;
use crate::{is_root, shell_quote, tether_bin};

/// Where `ip netns add` puts its namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Prefix of every namespace the fixture makes: `tether-<pid>-<k>-…`.
const PREFIX: &str = "tether-";
/// Most hosts one cluster can have (a /30 each in a /24, below the server's `.254`).
pub const MAX_HOSTS: usize = 60;
/// The `connect_timeout` of the cluster's default config: a partitioned host's start gives
/// up after it.
pub const CONNECT_TIMEOUT: &str = "10s";

/// Clusters made by this process so far (the `k` of the names).
static CLUSTERS: AtomicUsize = AtomicUsize::new(0);

/// Runs `ip`/`tc` (or anything) to success; panics with its output otherwise.
fn sh_ok(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim_end()
    );
}

/// Panics unless this process is root: namespaces, veths and qdiscs need it.
fn require_root(what: &str) {
    assert!(
        is_root(),
        "{what} needs root (network namespaces, veth pairs, tc): run the suite as root, as CI \
         does — this test does not skip"
    );
}

/// A named network namespace (`ip netns add`); deleted on drop.
#[derive(Debug)]
struct Netns {
    name: String,
}

impl Netns {
    fn add(name: String) -> Netns {
        sh_ok("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> …`.
    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        sh_ok("ip", &all);
    }

    /// `tc -n <ns> …`.
    fn tc(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        sh_ok("tc", &all);
    }

    fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the name frees the namespace once no process is in it; its veth ends go
        // with it. Best effort: a Drop must not panic.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The pid in a fixture namespace name `tether-<pid>-…`.
fn owner_pid(name: &str) -> Option<i32> {
    name.strip_prefix(PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()
        .filter(|&p: &i32| p > 0)
}

/// Deletes the fixture namespaces whose test process is dead (a test killed before its drop);
/// returns their names.
pub fn remove_stale_namespaces() -> Vec<String> {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        let dead = matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        );
        if dead {
            drop(Netns { name: name.clone() });
            removed.push(name);
        }
    }
    removed
}

/// The names of this process's fixture namespaces that exist now.
pub fn own_namespaces() -> Vec<String> {
    let prefix = format!("{PREFIX}{}-", std::process::id());
    let mut names: Vec<String> = fs::read_dir(NETNS_DIR)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// One CI host of a [`Cluster`]: a network namespace, a host name, a lock dir and a runs dir.
#[derive(Debug)]
pub struct Host {
    ns: Netns,
    name: String,
    addr: String,
    gateway: String,
    lock: PathBuf,
    runs: PathBuf,
    config: PathBuf,
    /// `<dir>/<host>.tether`: a script that execs tether inside the host (see the module doc).
    wrapper: PathBuf,
}

impl Host {
    /// The host name tether sees (`host-a`, `host-b`, …).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's address on its link to the database.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The namespace's name (`ip netns list`).
    pub fn netns(&self) -> &str {
        &self.ns.name
    }

    /// This host's `--lock-dir`.
    pub fn lock_dir(&self) -> &Path {
        &self.lock
    }

    /// This host's `--runs-dir`.
    pub fn runs_dir(&self) -> &Path {
        &self.runs
    }

    /// This host's app lock file of `app`.
    pub fn lock_path(&self, app: &str) -> PathBuf {
        self.lock.join(format!("app-{app}.lock"))
    }

    /// The cluster's default config file (the same for every host).
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// The run record `run.json` of `id` on this host, if there is one.
    pub fn record(&self, id: &str) -> Option<serde_json::Value> {
        crate::read_json(self.runs.join(id).join("run.json"))
    }

    /// `program args…` inside this host's network namespace (host name unchanged), with the
    /// test's CI variables removed and the cluster's password variable set.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns.path().display()))
            .arg("--")
            .arg(program);
        crate::scrub_env(&mut cmd);
        cmd.env(PASSWORD_ENV, PASSWORD).stdin(Stdio::null());
        cmd
    }

    /// `tether args…` on this host (its namespace and its host name), as a plain command: the
    /// caller adds `--lock-dir`/`--runs-dir`/`--config` (see [`Host::lock_dir`] …) or uses
    /// [`Host::run`].
    pub fn tether<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(&self.wrapper);
        cmd.args(args);
        crate::scrub_env(&mut cmd);
        cmd.env(PASSWORD_ENV, PASSWORD).stdin(Stdio::null());
        cmd
    }

    /// `tether run` on this host through the suite's builder, with this host's lock dir, runs
    /// dir and the cluster's default config; logs go to `sb`.
    pub fn run<'a>(&self, sb: &'a Sandbox) -> TetherCmd<'a> {
        self.run_config(sb, &self.config)
    }

    /// [`Host::run`] with another config file (e.g. [`Cluster::write_config`]'s).
    pub fn run_config<'a>(&self, sb: &'a Sandbox, config: &Path) -> TetherCmd<'a> {
        self.with_dirs(sb.tether_run(), config)
    }

    /// Any tether subcommand on this host, with its dirs and `config`.
    pub fn subcommand<'a>(&self, sb: &'a Sandbox, sub: &str, config: &Path) -> TetherCmd<'a> {
        self.with_dirs(sb.tether(sub), config)
    }

    fn with_dirs<'a>(&self, cmd: TetherCmd<'a>, config: &Path) -> TetherCmd<'a> {
        cmd.bin(&self.wrapper)
            .no_sandbox_dirs()
            .arg("--lock-dir")
            .arg(&self.lock)
            .arg("--runs-dir")
            .arg(&self.runs)
            .arg("--config")
            .arg(config)
            .env(PASSWORD_ENV, PASSWORD)
    }

    /// Cuts the host off the database silently: every IP packet on its link is dropped, both
    /// ways, with no link event and no error (see the module doc).
    pub fn partition(&self) {
        self.ns.tc(&["qdisc", "add", "dev", "vh", "clsact"]);
        for dir in ["egress", "ingress"] {
            self.ns.tc(&[
                "filter", "add", "dev", "vh", dir, "protocol", "ip", "u32", "match", "u32", "0",
                "0", "action", "mirred", "egress", "redirect", "dev", "sink",
            ]);
        }
    }

    /// Cuts the host off by taking its link down (the host's kernel knows: routes through it
    /// go, sends fail at once).
    pub fn partition_link(&self) {
        self.ns.ip(&["link", "set", "vh", "down"]);
    }

    /// Undoes [`Host::partition`] and [`Host::partition_link`] (whichever is in force).
    pub fn heal(&self) {
        let _ = Command::new("tc")
            .args(["-n", &self.ns.name, "qdisc", "del", "dev", "vh", "clsact"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .status();
        self.ns.ip(&["link", "set", "vh", "up"]);
        // Taking the link down removed the route through it; `replace` is idempotent.
        self.ns
            .ip(&["route", "replace", "default", "via", &self.gateway]);
    }
}

/// A PostgreSQL server in a namespace of its own and N hosts wired to it; see the module doc.
#[derive(Debug)]
pub struct Cluster {
    pg: Option<Postgres>,
    hosts: Vec<Host>,
    db: Option<Netns>,
    db_addr: String,
    url: String,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// A server and `hosts` hosts (`host-a`, `host-b`, …), each with its lock and runs dir,
    /// and a default config naming the server (password from [`PASSWORD_ENV`],
    /// `connect_timeout` [`CONNECT_TIMEOUT`]). Panics when not root or when a step fails.
    pub fn new(hosts: usize) -> Cluster {
        Cluster::with_tether(hosts, &tether_bin())
    }

    /// [`Cluster::new`] whose hosts run the tether binary `tether` (the bench's `--tether`).
    pub fn with_tether(hosts: usize, tether: &Path) -> Cluster {
        require_root("the hosts fixture (runner_tests::netns::Cluster)");
        assert!(
            (1..=MAX_HOSTS).contains(&hosts),
            "1 to {MAX_HOSTS} hosts, not {hosts}"
        );
        remove_stale_namespaces();
        let pid = std::process::id();
        let k = CLUSTERS.fetch_add(1, Ordering::Relaxed);
        let net = format!("10.{}.{}", (pid >> 8) & 0xff, pid & 0xff);
        let db_addr = format!("{net}.254");
        let dir = tempfile::Builder::new()
            .prefix("tether-hosts-")
            .tempdir()
            .expect("creating the hosts fixture's temp dir");
        let db = Netns::add(format!("{PREFIX}{pid}-{k}-db"));
        db.ip(&["addr", "add", &format!("{db_addr}/32"), "dev", "lo"]);
        let config = dir.path().join("cluster.yml");
        let made: Vec<Host> = (0..hosts)
            .map(|i| Cluster::add_host(&db, &net, (pid, k, i), dir.path(), (&config, tether)))
            .collect();
        let pg = Postgres::start_in(&NetPlace {
            netns: db.path(),
            listen: db_addr.clone(),
            clients: format!("{net}.0/24"),
        });
        let url = pg.url_with_host(&db_addr);
        let cluster = Cluster {
            pg: Some(pg),
            hosts: made,
            db: Some(db),
            db_addr,
            url,
            dir,
        };
        fs::write(&config, cluster.config_text(CONNECT_TIMEOUT, ""))
            .unwrap_or_else(|e| panic!("writing {}: {e}", config.display()));
        cluster
    }

    fn add_host(
        db: &Netns,
        net: &str,
        (pid, k, i): (u32, usize, usize),
        dir: &Path,
        (config, tether): (&Path, &Path),
    ) -> Host {
        let letter = char::from(b'a' + (i % 26) as u8);
        let name = if i < 26 {
            format!("host-{letter}")
        } else {
            format!("host-{letter}{}", i / 26)
        };
        let ns = Netns::add(format!("{PREFIX}{pid}-{k}-h{i}"));
        let peer = format!("vd{i}");
        ns.ip(&[
            "link", "add", "vh", "type", "veth", "peer", "name", &peer, "netns", &db.name,
        ]);
        let (gateway, addr) = (
            format!("{net}.{}", 4 * i + 1),
            format!("{net}.{}", 4 * i + 2),
        );
        db.ip(&["addr", "add", &format!("{gateway}/30"), "dev", &peer]);
        db.ip(&["link", "set", &peer, "up"]);
        ns.ip(&["addr", "add", &format!("{addr}/30"), "dev", "vh"]);
        ns.ip(&["link", "set", "vh", "up"]);
        ns.ip(&["route", "add", "default", "via", &gateway]);
        // Never up: a partition redirects the host's traffic into it, where it is dropped.
        ns.ip(&[
            "link",
            "add",
            "sink",
            "type",
            "veth",
            "peer",
            "name",
            "sink-peer",
        ]);
        let root = dir.join(&name);
        let (lock, runs) = (root.join("locks"), root.join("runs"));
        for (d, mode) in [(&root, 0o755), (&lock, 0o755), (&runs, 0o700)] {
            fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
            fs::set_permissions(d, fs::Permissions::from_mode(mode))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", d.display()));
        }
        let wrapper = dir.join(format!("{name}.tether"));
        let script = format!(
            "#!/bin/sh\n# tether on {name}: its network namespace, its host name; every step \
             execs.\nexec nsenter --net={} -- unshare --uts -- sh -c 'hostname \"$0\" && exec \
             \"$@\"' {name} {} \"$@\"\n",
            shell_quote(ns.path()),
            shell_quote(tether)
        );
        fs::write(&wrapper, script)
            .and_then(|()| fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)))
            .unwrap_or_else(|e| panic!("writing {}: {e}", wrapper.display()));
        Host {
            ns,
            name,
            addr,
            gateway,
            lock,
            runs,
            config: config.to_path_buf(),
            wrapper,
        }
    }

    /// The hosts, in order (`host-a` first).
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Host `i` (0 = `host-a`).
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// The server (its pid, port, unix socket).
    pub fn pg(&self) -> &Postgres {
        self.pg.as_ref().expect("the cluster's server")
    }

    /// Stops the server now (immediate shutdown): the database is down for every host.
    pub fn stop_server(&mut self) {
        if let Some(pg) = self.pg.as_mut() {
            pg.stop();
        }
    }

    /// Stops the server at once and starts it again in its namespace, same data and port
    /// ([`Postgres::restart`]): every session of before is gone.
    pub fn restart_server(&mut self) {
        if let Some(pg) = self.pg.as_mut() {
            pg.restart();
        }
    }

    /// The server's address, as the hosts reach it.
    pub fn db_addr(&self) -> &str {
        &self.db_addr
    }

    /// The cluster URL every host uses.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database namespace's name.
    pub fn db_netns(&self) -> &str {
        &self.db.as_ref().expect("the database namespace").name
    }

    /// SQL as the superuser, through the server's unix socket (see [`Postgres::psql`]).
    pub fn psql(&self, sql: &str) -> String {
        self.pg().psql(sql)
    }

    /// A config file's text: the `cluster:` block for this server with this `connect_timeout`
    /// and `extra` appended (lines inside the block indented two spaces, e.g. `"  heartbeat:
    /// 1s\n"`, then any top-level keys).
    pub fn config_text(&self, connect_timeout: &str, extra: &str) -> String {
        format!(
            "cluster:\n  url: {}\n  password_env: {PASSWORD_ENV}\n  connect_timeout: \
             {connect_timeout}\n{extra}",
            self.url
        )
    }

    /// Writes [`Cluster::config_text`] to `<fixture dir>/<name>`; its path.
    pub fn write_config(&self, name: &str, connect_timeout: &str, extra: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::write(&path, self.config_text(connect_timeout, extra))
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The server first (it runs in the database namespace), then the namespaces.
        drop(self.pg.take());
        self.hosts.clear();
        drop(self.db.take());
    }
}

#[cfg(test)]
mod tests {
    use super::owner_pid;

    #[test]
    fn the_owner_pid_is_read_from_the_name() {
        assert_eq!(owner_pid("tether-4121-0-db"), Some(4121));
        assert_eq!(owner_pid("tether-4121-3-h12"), Some(4121));
        assert_eq!(owner_pid("tether-x-0-db"), None);
        assert_eq!(owner_pid("other-4121-0-db"), None);
        assert_eq!(owner_pid("tether-0-0-db"), None);
    }
}
