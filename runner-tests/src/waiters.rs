//! Runs waiting for an app, seen from outside and in both modes of the suite: one
//! implementation for every test that waits until "N runs wait for app X", so a test reads the
//! same with and without the cluster switch ([`crate::cluster_switch`], DECISIONS D73, D79).
//!
//! - **Host mode** (no cluster): a waiting run is a tether core blocked in the kernel's `flock`
//!   of the app's lockfile ([`crate::flock_waiters`]), and the queue is the host's ticket queue
//!   ([`crate::queue_tickets`], PROTOCOL §15).
//! - **Cluster mode** (the switch's server lives): the queue is tether's own on the server
//!   (PROTOCOL §15 "Under a cluster"): a queued run is a row of `tether.runs` for the app with a
//!   `ticket` whose ticket lock (two-key advisory lock `(0x74717565 'tque', ticket_key)`) is
//!   granted — a row with a ticket but no such lock is a dead waiter's and is not counted — in
//!   the order of the tickets' names compared bytewise (`ORDER BY ticket COLLATE "C"`), mapped to
//!   its core by the row's `pid` (rows of this host only: the `host` column is this UTS
//!   namespace's host name). Besides those, as before the cluster queue: a run that holds the
//!   cluster lock and is blocked in the kernel's `flock` (a janitor's reap, a test's own
//!   [`crate::hold_lock`] holds it) — the head — and a session waiting for the app's key in
//!   `pg_locks` without a ticket (a run reaping a dead run of that app) are counted too.
//!
//! A session waiting for the app's key is mapped back to its tether core through the socket:
//! the backend's `client_port` (`pg_stat_activity`) names the core's end of the TCP connection
//! in `/proc/net/tcp`, whose inode is an fd of the core (looked for among the processes named
//! `tether`; a waiting run has started no command that could share it). A session that cannot be
//! mapped yet (its connection still being set up or torn down) makes the probe answer "not
//! yet", never a wrong pid. Cores that do not mention the sandbox (another sandbox of the same
//! test process shares the server) are not counted, whether found by their row or their socket.
//!
//! [`app_lock_waiters`] names the runs waiting on the app lock itself — the head of the queue:
//! the kernel's `flock` on one host; with a cluster, also the sessions waiting in `pg_locks` for
//! the app's key (the head's wait is bounded by a 200 ms `lock_timeout` and retried, so a probe
//! may miss it for a moment: poll it).

use std::collections::HashMap;
use std::fs;
use std::sync::Mutex;
use std::time::Duration;

use crate::locks::{flock_waiters, queue_tickets};
use crate::pg::Postgres;
use crate::sandbox::Sandbox;
use crate::wait::poll_some_every;

/// Poll step when every probe asks the server and scans `/proc/*/fd`: coarser than
/// [`crate::POLL`], so that polling does not load the machine it measures.
const PG_POLL: Duration = Duration::from_millis(10);

/// The advisory-lock key tether takes for `app` (FNV-1a, 64 bits, of the domain; the product's
/// `state::cluster_lock::key`), as `pg_locks` shows it: `(classid, objid)`, its two halves.
fn key_halves(app: &str) -> (u64, u64) {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in app.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h >> 32, h & 0xffff_ffff)
}

/// The fixture's own connection to the switch's server, kept between polls (a `psql` per poll
/// costs a process and a connection; under `queue`'s FIFO trials, with CPU hogs on every core,
/// that made a trial take over ten seconds). Keyed by the server's port; dropped and made again
/// after an error (the server restarted or another server is the switch's now).
static CONNECTION: Mutex<Option<(u16, postgres::Client)>> = Mutex::new(None);

/// The rows `sql` answers on the fixture's connection to `pg`, each as its columns' text
/// (`None` for NULL); `None` when the server cannot be asked right now.
fn query(pg: &Postgres, sql: &str) -> Option<Vec<Vec<Option<String>>>> {
    let mut slot = CONNECTION
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if slot.as_ref().is_none_or(|(port, _)| *port != pg.port()) {
        // Superuser: only it sees every session's `client_port`. Trusted on 127.0.0.1
        // (`Postgres::start_trusting_tcp`).
        let client = postgres::Config::new()
            .host("127.0.0.1")
            .port(pg.port())
            .user("postgres")
            .dbname("tether")
            .application_name("runner-tests waiters")
            .connect(postgres::NoTls)
            .ok()?;
        *slot = Some((pg.port(), client));
    }
    let (_, client) = slot.as_mut()?;
    let Ok(messages) = client.simple_query(sql) else {
        *slot = None;
        return None;
    };
    Some(
        messages
            .iter()
            .filter_map(|m| match m {
                postgres::SimpleQueryMessage::Row(row) => Some(
                    (0..row.len())
                        .map(|i| row.get(i).map(str::to_owned))
                        .collect(),
                ),
                _ => None,
            })
            .collect(),
    )
}

/// The client ports of the sessions waiting in `pg`'s lock table for `app`'s key (the app lock
/// itself, not a ticket), fewest blockers first; `None` when the server cannot be asked now.
fn pg_waiting_ports(pg: &Postgres, app: &str) -> Option<Vec<u16>> {
    let (hi, lo) = key_halves(app);
    let sql = format!(
        "SELECT s.client_port FROM pg_locks l JOIN pg_stat_activity s USING (pid) \
         WHERE l.locktype = 'advisory' AND NOT l.granted \
         AND l.classid = {hi} AND l.objid = {lo} AND l.objsubid = 1 \
         ORDER BY cardinality(pg_blocking_pids(l.pid)), l.waitstart, l.pid"
    );
    Some(
        query(pg, &sql)?
            .into_iter()
            // A unix-socket session has no port (NULL): not one of tether's.
            .filter_map(|row| row.into_iter().next().flatten()?.parse::<u16>().ok())
            .collect(),
    )
}

/// The cluster queue's SQL for `app`: its live entries ([`crate::pg::live_entry_sql`]) in
/// queue order, as `(pid, host)`.
fn ticket_rows_sql(app: &str) -> String {
    format!(
        "SELECT r.pid, r.host FROM tether.runs r WHERE {} ORDER BY r.ticket COLLATE \"C\"",
        crate::pg::live_entry_sql(app)
    )
}

/// This UTS namespace's host name, as tether writes it into a row's `host`.
fn this_host() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// The cores of this sandbox queued for `app` in the cluster's queue, in queue order (see the
/// module doc); `None` when the server cannot be asked right now. Before any run made the
/// schema there is no queue.
fn pg_ticket_cores(sb: &Sandbox, pg: &Postgres, app: &str) -> Option<Vec<i32>> {
    let made = query(pg, "SELECT to_regclass('tether.runs') IS NOT NULL")?;
    if made
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .as_deref()
        != Some("t")
    {
        return Some(Vec::new());
    }
    let here = this_host();
    Some(
        query(pg, &ticket_rows_sql(app))?
            .into_iter()
            .filter_map(|row| {
                let mut cols = row.into_iter();
                let pid = cols.next().flatten()?.parse::<i32>().ok()?;
                let host = cols.next().flatten()?;
                (host == here && sb.mentions(pid)).then_some(pid)
            })
            .collect(),
    )
}

/// The inodes of this network namespace's TCP sockets `127.0.0.1:<port> → 127.0.0.1:remote`,
/// by local port: the client ends of connections to the server on `remote` (one read of
/// `/proc/net/tcp` for all sessions).
fn client_sockets(remote: u16) -> HashMap<u16, u64> {
    let table = fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let want_remote = format!("0100007F:{remote:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            // "sl local rem st tx:rx tr:tm retrnsmt uid timeout inode ..."
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() <= 9 || f[2] != want_remote {
                return None;
            }
            let port = u16::from_str_radix(f[1].strip_prefix("0100007F:")?, 16).ok()?;
            let ino = f[9].parse::<u64>().ok().filter(|&i| i != 0)?;
            Some((port, ino))
        })
        .collect()
}

/// The open sockets of every process named `tether` (a core, or a front), `inode → pid`, from
/// `/proc/*/fd` — one pass for all sessions, and only through tether's fds: reading every
/// process's fds on a loaded machine made one probe take up to a second.
fn tether_sockets() -> HashMap<u64, i32> {
    let mut owners = HashMap::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return owners;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let comm = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != "tether" {
            continue;
        }
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let Some(ino) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            owners.insert(ino, pid);
        }
    }
    owners
}

/// Sessions already mapped to their cores: `(server port, client port) → (socket inode, pid)`.
/// Reading `/proc/net/tcp` and every tether's fds takes tens of milliseconds on a machine with
/// many sockets; a mapped session is only re-checked (its pid still has that socket open: a
/// client port reused by a later connection fails the check and is mapped again).
static MAPPED: Mutex<Option<Mapped>> = Mutex::new(None);

/// `(server port, client port) → (socket inode, core pid)`.
type Mapped = HashMap<(u16, u16), (u64, i32)>;

/// Whether process `pid` has the socket `ino` open.
fn has_socket(pid: i32, ino: u64) -> bool {
    let want = format!("socket:[{ino}]");
    fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
        fds.flatten()
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == want.as_str()))
    })
}

/// The cores whose connections to the server on `server` have the client `ports`, in the same
/// order; `None` while one cannot be mapped (its connection being set up or torn down).
fn cores_of_ports(server: u16, ports: &[u16]) -> Option<Vec<i32>> {
    let mut slot = MAPPED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mapped = slot.get_or_insert_with(HashMap::new);
    let known = |mapped: &Mapped, port: u16| {
        mapped
            .get(&(server, port))
            .filter(|&&(ino, pid)| has_socket(pid, ino))
            .map(|&(_, pid)| pid)
    };
    if ports.iter().any(|&port| known(mapped, port).is_none()) {
        let sockets = client_sockets(server);
        let owners = tether_sockets();
        for &port in ports {
            if let Some((&ino, &pid)) = sockets
                .get(&port)
                .and_then(|ino| Some((ino, owners.get(ino)?)))
            {
                mapped.insert((server, port), (ino, pid));
            }
        }
    }
    ports.iter().map(|&port| known(mapped, port)).collect()
}

/// The cores of this sandbox waiting in PostgreSQL for `app`, in queue order; `None` while a
/// session cannot be mapped to a process yet.
fn pg_waiting_cores(sb: &Sandbox, pg: &Postgres, app: &str) -> Option<Vec<i32>> {
    let ports = pg_waiting_ports(pg, app)?;
    if ports.is_empty() {
        return Some(Vec::new());
    }
    let cores = cores_of_ports(pg.port(), &ports)?;
    Some(cores.into_iter().filter(|&pid| sb.mentions(pid)).collect())
}

/// Pushes the pids of `more` not in `cores` yet, in their order.
fn push_new(cores: &mut Vec<i32>, more: impl IntoIterator<Item = i32>) {
    for pid in more {
        if !cores.contains(&pid) {
            cores.push(pid);
        }
    }
}

/// The runs of `sb` waiting on `app`'s lock itself right now, as their cores' pids: blocked in
/// the kernel's `flock`, then (cluster mode) waiting in `pg_locks` for the app's key. `None`
/// when the picture is not readable yet (retry).
fn on_the_lock_now(sb: &Sandbox, app: &str) -> Option<Vec<i32>> {
    let mut cores = flock_waiters(sb.lock_path(app));
    if let Some(pg) = sb.cluster() {
        push_new(&mut cores, pg_waiting_cores(sb, pg, app)?);
    }
    Some(cores)
}

/// The runs of `sb` waiting for `app` right now, as their cores' pids, head first; `None` when
/// the picture is not readable yet (retry). Host mode: the cores blocked in the kernel's
/// `flock` of the app. Cluster mode: as [`queued_now`] (every queued run waits).
fn blocked_now(sb: &Sandbox, app: &str) -> Option<Vec<i32>> {
    if sb.cluster().is_some() {
        return queued_now(sb, app);
    }
    Some(flock_waiters(sb.lock_path(app)))
}

/// The runs of `sb` queued for `app`, as their cores' pids in queue order; `None` when not
/// readable yet. Host mode: the host queue's tickets (PROTOCOL §15) — whose head is the one
/// blocked in `flock` — plus a flock waiter that holds no ticket. Cluster mode: a run blocked
/// in the `flock` (it holds the cluster lock: the head), the cluster queue's live entries in
/// ticket order, then the sessions waiting for the app's key without a ticket.
fn queued_now(sb: &Sandbox, app: &str) -> Option<Vec<i32>> {
    let mut cores = Vec::new();
    if let Some(pg) = sb.cluster() {
        push_new(&mut cores, flock_waiters(sb.lock_path(app)));
        push_new(&mut cores, pg_ticket_cores(sb, pg, app)?);
        push_new(&mut cores, pg_waiting_cores(sb, pg, app)?);
        return Some(cores);
    }
    push_new(
        &mut cores,
        queue_tickets(sb.lock_dir(), app)
            .into_iter()
            .map(|(_, pid)| pid),
    );
    push_new(&mut cores, flock_waiters(sb.lock_path(app)));
    Some(cores)
}

fn step(sb: &Sandbox) -> Duration {
    if sb.cluster().is_some() {
        PG_POLL
    } else {
        crate::POLL
    }
}

/// The runs of `sb` really waiting for `app` now — blocked in the kernel's `flock` of the app,
/// or (cluster mode) queued in the cluster's queue or waiting for the app's key — as their
/// cores' pids, head first. Touches nothing. See the module doc.
pub fn app_waiters(sb: &Sandbox, app: &str) -> Vec<i32> {
    poll_some_every(Duration::from_secs(5), step(sb), || blocked_now(sb, app)).unwrap_or_default()
}

/// Waits until at least `n` runs of `sb` really wait for `app` ([`app_waiters`]) — queued, not
/// just about to be; returns their cores' pids, head first. Panics on timeout.
pub fn wait_app_waiters(sb: &Sandbox, app: &str, n: usize, timeout: Duration) -> Vec<i32> {
    let mut last = Vec::new();
    let found = poll_some_every(timeout, step(sb), || {
        let cores = blocked_now(sb, app)?;
        last.clone_from(&cores);
        (cores.len() >= n).then_some(cores)
    });
    found.unwrap_or_else(|| {
        panic!(
            "timed out after {timeout:?} waiting for {n} runs waiting for {app} (have {last:?}; \
             cluster: {})",
            sb.cluster().is_some()
        )
    })
}

/// The runs of `sb` queued for `app`, as their cores' pids in queue order (see
/// [`queued_now`]: the host's tickets, or the server's queue under a cluster). Touches nothing.
pub fn app_queue(sb: &Sandbox, app: &str) -> Vec<i32> {
    poll_some_every(Duration::from_secs(5), step(sb), || queued_now(sb, app)).unwrap_or_default()
}

/// Waits until at least `n` runs of `sb` are queued for `app` ([`app_queue`]); returns their
/// cores' pids in queue order. Panics on timeout.
pub fn wait_app_queue(sb: &Sandbox, app: &str, n: usize, timeout: Duration) -> Vec<i32> {
    let mut last = Vec::new();
    let found = poll_some_every(timeout, step(sb), || {
        let cores = queued_now(sb, app)?;
        last.clone_from(&cores);
        (cores.len() >= n).then_some(cores)
    });
    found.unwrap_or_else(|| {
        panic!(
            "timed out after {timeout:?} waiting for {n} runs queued for {app} (have {last:?}; \
             cluster: {})",
            sb.cluster().is_some()
        )
    })
}

/// The runs of `sb` waiting on `app`'s lock itself now — the head of the queue, blocked in the
/// kernel's `flock` of the app or (cluster mode) in `pg_locks` for the app's key — as their
/// cores' pids. A snapshot (a cluster head's wait is retried every 200 ms): poll it. Touches
/// nothing.
pub fn app_lock_waiters(sb: &Sandbox, app: &str) -> Vec<i32> {
    poll_some_every(Duration::from_secs(5), step(sb), || {
        on_the_lock_now(sb, app)
    })
    .unwrap_or_default()
}
