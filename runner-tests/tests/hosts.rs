//! Issue 16 — hosts and partitions: the cluster lock between real "hosts" (network namespaces
//! with their own host names, lock dirs and runs dirs, `runner_tests::netns`), a real
//! PostgreSQL 15 in a namespace of its own, and real partitions (packets dropped on a host's
//! link). Needs root; panics saying so otherwise.
//!
//! Commands take their own CLOCK_MONOTONIC stamps (`stamp`) or append to an `O_APPEND` log
//! (one `write` per line) while they hold the app, so the order and the intervals the test
//! checks are the commands' own.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use runner_tests::netns::{own_namespaces, remove_stale_namespaces};
use runner_tests::pg::PASSWORD;
use runner_tests::{
    helper_bin, lock_is_free, log_lines, pid_alive, poll_until, rid, run_dirs, shell_quote, touch,
    wait_file, wait_line, wait_pid_gone, Cluster, Host, RunningTether, Sandbox, TIMEOUT,
};

/// A `psql` session inside `host`'s namespace reading SQL from a pipe, its output going to
/// `out` (a file, so lines can be awaited).
struct PsqlSession {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
}

fn psql_on(c: &Cluster, host: &Host, out: &Path) -> std::process::Command {
    let mut cmd = host.command("psql");
    cmd.args(["-X", "-A", "-t", "-h", c.db_addr(), "-p"])
        .arg(c.pg().port().to_string())
        .args(["-U", "tether", "-d", "tether"])
        .env("PGPASSWORD", PASSWORD)
        .env("PGCONNECT_TIMEOUT", "2");
    let file = fs::File::create(out).unwrap_or_else(|e| panic!("creating {}: {e}", out.display()));
    let err = file.try_clone().expect("dup the psql output file");
    cmd.stdout(file).stderr(err);
    cmd
}

impl PsqlSession {
    fn start(c: &Cluster, host: &Host, out: &Path) -> PsqlSession {
        let mut cmd = psql_on(c, host, out);
        cmd.stdin(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning psql");
        let stdin = child.stdin.take();
        PsqlSession { child, stdin }
    }

    fn send(&mut self, sql: &str) {
        let stdin = self.stdin.as_mut().expect("psql's stdin");
        writeln!(stdin, "{sql}").expect("writing to psql");
        stdin.flush().expect("flushing psql's stdin");
    }
}

impl Drop for PsqlSession {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a fresh connection from `host` to the server succeeds (bounded by a 2 s connect
/// timeout); the psql output when it does not.
fn fresh_connection(c: &Cluster, host: &Host, sb: &Sandbox) -> Result<(), String> {
    let out = sb.fresh_mark("psql-once");
    let status = psql_on(c, host, &out)
        .args(["-c", "SELECT 1"])
        .status()
        .expect("running psql");
    let text = fs::read_to_string(&out).unwrap_or_default();
    if status.success() {
        Ok(())
    } else {
        Err(text)
    }
}

/// The fixture's self-test: a partition really blocks TCP — an established connection gets
/// no answer and no error, a new one times out — and a heal restores both; the link-down kind
/// fails at once instead.
#[test]
fn hosts_fixture_partition_blocks_tcp_silently_and_heal_restores_it() {
    let sb = Sandbox::new();
    let c = Cluster::new(1);
    let h = c.host(0);
    fresh_connection(&c, h, &sb).expect("a host reaches the server through its link");

    let out = sb.mark("session.out");
    let mut s = PsqlSession::start(&c, h, &out);
    s.send("SELECT 'answer-' || 1;");
    wait_line(&out, "answer-1", TIMEOUT);

    h.partition();
    s.send("SELECT 'answer-' || 2;");
    // Absence over a bounded period: the query and its answer are dropped on the wire.
    assert!(
        !poll_until(Duration::from_secs(2), || log_lines(&out)
            .iter()
            .any(|l| l.contains("answer-2"))),
        "a partitioned host's established connection gets no answer"
    );
    let err = fresh_connection(&c, h, &sb).expect_err("a partitioned host cannot connect");
    assert!(
        err.contains("timeout expired"),
        "a silent partition times a connect out (no refusal, no unreachable): {err}"
    );

    h.heal();
    // The same connection answers after the heal: nothing noticed the loss (no reset, no
    // error) — it was silent.
    wait_line(&out, "answer-2", TIMEOUT);
    fresh_connection(&c, h, &sb).expect("a healed host connects again");

    h.partition_link();
    let err = fresh_connection(&c, h, &sb).expect_err("a host whose link is down cannot connect");
    assert!(
        err.contains("unreachable"),
        "a link taken down fails at once, the kernel knows: {err}"
    );
    h.heal();
    fresh_connection(&c, h, &sb).expect("a host whose link came back up connects again");
    s.send("SELECT 'answer-' || 3;");
    wait_line(&out, "answer-3", TIMEOUT);
}

#[test]
fn hosts_fixture_leaves_nothing_and_sweeps_a_dead_tests_namespaces() {
    // A namespace named after a process that is dead: what a killed test leaves.
    let mut dead = std::process::Command::new("true")
        .spawn()
        .expect("spawning true");
    let dead_pid = dead.id();
    dead.wait().expect("reaping true");
    let stale = format!("tether-{dead_pid}-0-db");
    let made = std::process::Command::new("ip")
        .args(["netns", "add", &stale])
        .status()
        .expect("ip netns add");
    assert!(made.success(), "making the stale namespace {stale}");

    let c = Cluster::new(2);
    assert!(
        !Path::new("/run/netns").join(&stale).exists(),
        "a cluster's start deleted the namespace of a dead test ({stale})"
    );
    let mine = own_namespaces();
    assert_eq!(mine.len(), 3, "a database and two hosts: {mine:?}");
    let server = c.pg().pid();
    assert!(pid_alive(server));
    drop(c);
    wait_pid_gone(server, TIMEOUT);
    assert_eq!(
        own_namespaces(),
        Vec::<String>::new(),
        "dropping the cluster deleted its namespaces"
    );
    assert_eq!(remove_stale_namespaces(), Vec::<String>::new());
}

/// Each host is its own host: its host name, its address on the server, its own lock and runs
/// dirs — and tether on it holds the cluster lock over that link.
#[test]
fn each_host_runs_tether_under_its_own_name_and_address() {
    let sb = Sandbox::new();
    let c = Cluster::new(2);
    for (i, h) in c.hosts().iter().enumerate() {
        let id = rid(&sb, &format!("who-{i}"));
        let (name, release) = (sb.mark(&format!("name-{i}")), sb.mark(&format!("go-{i}")));
        let mut run = h
            .run(&sb)
            .app("who.hosts.test")
            .run_id(&id)
            .command([
                "sh",
                "-c",
                &format!(
                    "hostname > {n}.tmp && mv {n}.tmp {n}; {}",
                    runner_tests::sh_wait_for(&shell_quote(&release)),
                    n = shell_quote(&name),
                ),
            ])
            .spawn();
        wait_file(&name, TIMEOUT);
        assert_eq!(
            fs::read_to_string(&name).expect("the host name").trim(),
            h.name()
        );
        assert_eq!(
            c.psql(&format!(
                "SELECT host(client_addr) FROM pg_stat_activity WHERE application_name = '{id}'"
            )),
            h.addr(),
            "the run's session comes from its host's address"
        );
        assert!(
            !lock_is_free(h.lock_path("who.hosts.test")),
            "the run holds its own host's flock"
        );
        touch(&release);
        run.wait_exit(TIMEOUT).assert_code(0);
    }
}

/// `stamp --start S --wait G --end E` in a run of `app` on `h`, after writing the host name
/// and fence to `N`.
struct Link {
    run: RunningTether,
    start: PathBuf,
    gate: PathBuf,
    end: PathBuf,
    who: PathBuf,
}

fn link(sb: &Sandbox, h: &Host, app: &str, k: usize) -> Link {
    let m = |what: &str| sb.mark(&format!("link-{k}.{what}"));
    let (start, gate, end, who) = (m("start"), m("gate"), m("end"), m("who"));
    let stamp = helper_bin!("stamp");
    let script = format!(
        "echo \"$(hostname) $TETHER_FENCE\" > {who}.tmp && mv {who}.tmp {who} && exec {stamp} --start {start} --wait \
         {gate} --end {end}",
        who = shell_quote(&who),
        stamp = shell_quote(&stamp),
        start = shell_quote(&start),
        gate = shell_quote(&gate),
        end = shell_quote(&end),
    );
    let run = h
        .run(sb)
        .app(app)
        .run_id(rid(sb, &format!("h{k}")))
        .command(["sh", "-c", &script])
        .spawn();
    Link {
        run,
        start,
        gate,
        end,
        who,
    }
}

fn read_u128(path: &Path) -> u128 {
    fs::read_to_string(path)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("a stamp in {}", path.display()))
}

#[test]
fn two_hosts_never_overlap_over_50_handoffs() {
    const HANDOFFS: usize = 50;
    let sb = Sandbox::new();
    let c = Cluster::new(2);
    let app = "handoffs.hosts.test";
    let mut cur = link(&sb, c.host(0), app, 0);
    wait_file(&cur.start, TIMEOUT);
    let (mut intervals, mut who) = (Vec::new(), Vec::new());
    for k in 1..=HANDOFFS {
        // The next run, on the other host, must be waiting for the app before the holder ends.
        let mut next = link(&sb, c.host(k % 2), app, k);
        next.run.wait_line("— waiting", TIMEOUT);
        touch(&cur.gate);
        cur.run.wait_exit(TIMEOUT).assert_code(0);
        wait_file(&next.start, TIMEOUT);
        intervals.push((read_u128(&cur.start), read_u128(&cur.end)));
        who.push(fs::read_to_string(&cur.who).expect("who held"));
        cur = next;
    }
    touch(&cur.gate);
    cur.run.wait_exit(TIMEOUT).assert_code(0);
    intervals.push((read_u128(&cur.start), read_u128(&cur.end)));
    who.push(fs::read_to_string(&cur.who).expect("who held"));

    // Every pair of intervals is disjoint: sorted by start, each starts after the one before
    // it ended — and the order is the handoff order.
    let mut sorted = intervals.clone();
    sorted.sort();
    assert_eq!(
        sorted, intervals,
        "the runs held the app in the order they were handed it"
    );
    for (k, w) in intervals.windows(2).enumerate() {
        assert!(
            w[1].0 > w[0].1,
            "run {} started {} ns before run {k} ended",
            k + 1,
            w[0].1 as i128 - w[1].0 as i128
        );
    }
    // The handoffs alternated between the two hosts, with increasing fences.
    let mut last = 0;
    for (k, line) in who.iter().enumerate() {
        let (host, fence) = line
            .trim()
            .split_once(' ')
            .unwrap_or_else(|| panic!("host and fence: {line:?}"));
        assert_eq!(host, c.host(k % 2).name(), "handoff {k}");
        let fence: i64 = fence.parse().expect("a fence");
        assert!(fence > last, "fences increase: {last} then {fence}");
        last = fence;
    }
}

#[test]
fn fence_strictly_increases_over_100_acquisitions_on_2_hosts() {
    const RUNS: usize = 100;
    // Two runs in flight per host: each host's flock queues one, the cluster lock the other.
    const IN_FLIGHT: usize = 4;
    let sb = Sandbox::new();
    let c = Cluster::new(2);
    let log = sb.mark("fences");
    let script = format!(
        "echo \"$TETHER_FENCE $(hostname)\" >> {}",
        shell_quote(&log)
    );
    let mut running: Vec<RunningTether> = Vec::new();
    for k in 0..RUNS {
        if running.len() == IN_FLIGHT {
            running.remove(0).wait_exit(TIMEOUT).assert_code(0);
        }
        running.push(
            c.host(k % 2)
                .run(&sb)
                .app("fences.hosts.test")
                .run_id(rid(&sb, &format!("f{k}")))
                .command(["sh", "-c", &script])
                .spawn(),
        );
    }
    for mut run in running {
        run.wait_exit(TIMEOUT).assert_code(0);
    }
    let lines = log_lines(&log);
    assert_eq!(lines.len(), RUNS, "every run ran once: {lines:?}");
    let fences: Vec<i64> = lines
        .iter()
        .map(|l| {
            l.split_whitespace()
                .next()
                .and_then(|f| f.parse().ok())
                .unwrap_or_else(|| panic!("not a fence: {l:?}"))
        })
        .collect();
    assert!(
        fences.windows(2).all(|w| w[0] < w[1]),
        "fences strictly increase in acquisition order: {fences:?}"
    );
    for h in c.hosts() {
        let n = lines.iter().filter(|l| l.ends_with(h.name())).count();
        assert_eq!(n, RUNS / 2, "{} acquired its half: {lines:?}", h.name());
    }
}

/// What a refused start leaves behind on `h` and the server: nothing.
fn assert_nothing_created(c: &Cluster, h: &Host, app: &str, id: &str, ran: &Path) {
    assert!(!ran.exists(), "neither the command nor a teardown ran");
    assert_eq!(
        run_dirs(h.runs_dir()),
        Vec::<String>::new(),
        "no run dir is left"
    );
    assert!(lock_is_free(h.lock_path(app)), "no lock is held");
    assert_eq!(
        c.psql(&format!(
            "SELECT (SELECT count(*) FROM tether.runs WHERE run_id = '{id}') + \
             (SELECT count(*) FROM pg_stat_activity WHERE application_name = '{id}')"
        )),
        "0",
        "no row, no session on the server"
    );
}

#[test]
fn database_unreachable_at_start_exits_75_leaving_nothing() {
    let sb = Sandbox::new();
    let c = Cluster::new(2);
    // The schema exists (made from host-b), so "no row" is a real check.
    let mut check = c.host(1).tether(["cluster", "check", "--config"]);
    check.arg(c.host(1).config());
    let out = check.output().expect("tether cluster check");
    assert!(out.status.success(), "cluster check: {out:?}");

    let h = c.host(0);
    let cfg = c.write_config("short.yml", "2s", "");
    let app = "down.hosts.test";
    for (kind, partition) in [
        ("silent", Host::partition as fn(&Host)),
        ("link", Host::partition_link as fn(&Host)),
    ] {
        partition(h);
        let id = rid(&sb, kind);
        let ran = sb.mark(&format!("ran-{kind}"));
        let t0 = Instant::now();
        let out = h
            .run_config(&sb, &cfg)
            .app(app)
            .run_id(&id)
            .teardown(format!("touch {}", shell_quote(&ran)))
            .command(["touch", &ran.display().to_string()])
            .run();
        let took = t0.elapsed();
        h.heal();
        out.assert_code(75);
        let server = format!("tether: error: cluster {} (", c.url());
        assert_eq!(
            out.stderr_lines(&server).len(),
            1,
            "one line naming the server ({kind})\n{out}"
        );
        out.assert_stderr_contains("cannot connect");
        assert_eq!(out.summary_field("result"), Some("failed"), "{out}");
        assert!(
            took < Duration::from_secs(12),
            "bounded by the 2 s connect timeout ({kind}): took {took:?}\n{out}"
        );
        if kind == "silent" {
            assert!(
                took >= Duration::from_millis(1900),
                "a silent partition is only noticed by the connect timeout: took {took:?}"
            );
        }
        assert_nothing_created(&c, h, app, &id, &ran);
    }
}

/// Issue 16 §6: with `--lock-timeout` shorter than the connect timeout, the start gives up
/// after the lock timeout (the connect timeout is cut to it, never under 1 s), not after the
/// config's 30 s connect timeout.
#[test]
fn database_unreachable_at_start_is_bounded_by_lock_timeout() {
    let sb = Sandbox::new();
    let c = Cluster::new(1);
    let h = c.host(0);
    let cfg = c.write_config("long.yml", "30s", "");
    h.partition();
    let ran = sb.mark("ran");
    let t0 = Instant::now();
    let out = h
        .run_config(&sb, &cfg)
        .app("bounded.hosts.test")
        .run_id(rid(&sb, "bounded"))
        .arg("--lock-timeout")
        .arg("1s")
        .command(["touch", &ran.display().to_string()])
        .run();
    let took = t0.elapsed();
    h.heal();
    out.assert_code(75);
    assert!(
        took < Duration::from_secs(3),
        "bounded by --lock-timeout 1s, not the 30 s connect timeout: took {took:?}\n{out}"
    );
    assert!(!ran.exists());
    assert_eq!(run_dirs(h.runs_dir()), Vec::<String>::new());
}

/// The fencing knobs of these cases (as `cluster_fence.rs`): heartbeat 200 ms, self-fence 1 s,
/// server release 3.2 s — the smallest release `config` allows for them (F + H + 2 s).
fn fence_config(c: &Cluster) -> PathBuf {
    c.write_config(
        "fence.yml",
        "10s",
        "  heartbeat: 200ms\n  self_fence: 1s\n  server_release: 3200ms\n",
    )
}

/// Whether `n` sessions wait for an advisory lock on the server.
fn queued(c: &Cluster, n: usize) -> bool {
    c.psql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        == n.to_string()
}

/// Issue 16 §4: a holder whose host is cut off kills its command (`lock-lost`, exit 75)
/// before the server hands the lock to the other host — 20 trials at once, on 20 apps, all
/// cut off by one partition of their host. "Killed before" is checked with an upper bound of
/// the kill: the teardown's start stamp (the teardown runs after the tree is dead) precedes the
/// waiter's command's start stamp.
#[test]
fn holder_partitioned_self_fences_before_the_other_host_starts_20_of_20() {
    const TRIALS: usize = 20;
    let sb = Sandbox::new();
    let c = Cluster::new(2);
    let cfg = fence_config(&c);
    let (a, b) = (c.host(0), c.host(1));
    let stamp = shell_quote(helper_bin!("stamp"));
    let never = shell_quote(sb.mark("never"));
    let m = |k: usize, what: &str| sb.mark(&format!("t{k}.{what}"));
    let app = |k: usize| format!("fence-{k}.hosts.test");
    let mut holders: Vec<RunningTether> = (0..TRIALS)
        .map(|k| {
            let (pid, start) = (shell_quote(m(k, "pid")), shell_quote(m(k, "start")));
            a.run_config(&sb, &cfg)
                .app(app(k))
                .run_id(rid(&sb, &format!("a{k}")))
                // Every teardown of the run appends its reason; only the holder's own
                // (`lock-lost`) stamps: the other host, unable to tell a cut-off holder from a
                // dead one, runs it again from its row (`reaped`, DECISIONS D61).
                .teardown(format!(
                    "echo \"$TETHER_REASON\" >> {} && if [ \"$TETHER_REASON\" = lock-lost ]; \
                     then exec {stamp} --start {}; fi",
                    shell_quote(m(k, "reason")),
                    shell_quote(m(k, "teardown"))
                ))
                .command([
                    "sh",
                    "-c",
                    &format!(
                        "echo $$ > {pid}.tmp && mv {pid}.tmp {pid} && exec {stamp} --start \
                         {start} --wait {never} --wait-timeout-ms 120000"
                    ),
                ])
                .spawn()
        })
        .collect();
    for k in 0..TRIALS {
        wait_file(m(k, "start"), TIMEOUT);
    }
    let mut waiters: Vec<RunningTether> = (0..TRIALS)
        .map(|k| {
            b.run_config(&sb, &cfg)
                .app(app(k))
                .run_id(rid(&sb, &format!("b{k}")))
                .command([
                    "sh",
                    "-c",
                    &format!("exec {stamp} --start {}", shell_quote(m(k, "waiter"))),
                ])
                .spawn()
        })
        .collect();
    runner_tests::wait_until("every waiter queued on the server", TIMEOUT, || {
        queued(&c, TRIALS)
    });

    a.partition();
    let mut report = Vec::new();
    for (k, (holder, waiter)) in holders.iter_mut().zip(waiters.iter_mut()).enumerate() {
        let out = holder.wait_exit(TIMEOUT);
        out.assert_code(75);
        assert_eq!(out.summary_field("result"), Some("lock-lost"), "{out}");
        out.assert_stderr_contains("tether: error: lock-lost: app lock");
        waiter.wait_exit(TIMEOUT).assert_code(0);
        let command: i32 = fs::read_to_string(m(k, "pid"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .expect("the holder's command pid");
        assert!(
            !pid_alive(command),
            "trial {k}: the holder's command is dead"
        );
        let reasons = fs::read_to_string(m(k, "reason")).expect("the teardown ran");
        let mut reasons: Vec<&str> = reasons.lines().collect();
        reasons.sort_unstable();
        assert!(
            reasons == ["lock-lost"] || reasons == ["lock-lost", "reaped"],
            "trial {k}: the holder's own teardown once (lock-lost), at most one reap of it \
             from the other host (D61): {reasons:?}"
        );
        let (fenced, started) = (read_u128(&m(k, "teardown")), read_u128(&m(k, "waiter")));
        report.push(format!(
            "trial {k}: killed ≤ {:.0} ms before the other host's start",
            (started as f64 - fenced as f64) / 1e6
        ));
        assert!(
            fenced < started,
            "trial {k}: the waiter's command started {} ns before the holder's teardown \
             (so possibly before its command died)",
            fenced - started
        );
    }
    a.heal();
    eprintln!("{}", report.join("\n"));
}

/// Issue 16 §4, the trap: a waiter whose host is cut off while it waits must not run on a
/// grant it never saw once the server has given the lock to someone else. A holds on host-a;
/// B (host-b) and then C (host-c) queue; host-b is cut off; A ends, the server grants B's
/// session — whose answer is lost — and, after `server_release` of silence, drops it and
/// grants C. Only once C's command runs is host-b healed: B exits 75 having run nothing, and
/// no two commands ever overlapped.
#[test]
fn waiter_partitioned_then_healed_never_gets_the_lock_behind_anyones_back() {
    let sb = Sandbox::new();
    let c = Cluster::new(3);
    let cfg = fence_config(&c);
    let app = "trap.hosts.test";
    let stamp = helper_bin!("stamp");
    let start = |h: &Host, who: &str| -> (RunningTether, PathBuf, PathBuf, PathBuf) {
        let m = |what: &str| sb.mark(&format!("{who}.{what}"));
        let (s, g, e) = (m("start"), m("gate"), m("end"));
        let run = h
            .run_config(&sb, &cfg)
            .app(app)
            .run_id(rid(&sb, who))
            .command([
                stamp.as_os_str(),
                "--start".as_ref(),
                s.as_os_str(),
                "--wait".as_ref(),
                g.as_os_str(),
                "--end".as_ref(),
                e.as_os_str(),
            ])
            .spawn();
        (run, s, g, e)
    };
    let (mut run_a, a_start, a_gate, a_end) = start(c.host(0), "a");
    wait_file(&a_start, TIMEOUT);
    let (mut run_b, b_start, b_gate, _) = start(c.host(1), "b");
    runner_tests::wait_until("B queued", TIMEOUT, || queued(&c, 1));
    let (mut run_c, c_start, c_gate, c_end) = start(c.host(2), "c");
    runner_tests::wait_until("B and C queued", TIMEOUT, || queued(&c, 2));

    c.host(1).partition();
    touch(&a_gate);
    run_a.wait_exit(TIMEOUT).assert_code(0);
    wait_file(&c_start, TIMEOUT);
    c.host(1).heal();
    let out_b = run_b.wait_exit(TIMEOUT);
    out_b.assert_code(75);
    assert!(
        !b_start.exists(),
        "B never ran its command: its grant went to a session the server had dropped\n{out_b}"
    );
    touch(&b_gate);
    touch(&c_gate);
    run_c.wait_exit(TIMEOUT).assert_code(0);
    let (a_end, c_start) = (read_u128(&a_end), read_u128(&c_start));
    assert!(a_end < c_start, "C started after A ended");
    assert!(read_u128(&c_end) > c_start);
}

/// Sessions waiting (not granted) for an advisory lock: all of them, and those named `id`.
fn waiting_in_pg(c: &Cluster, id: &str) -> (usize, usize) {
    runner_tests::pg::waiting_counts(&c.psql(&runner_tests::pg::waiting_sql(id)))
}

/// Issue 16 §2 on network-namespace hosts: a holder on host-c; seven waiters arrive bunched
/// and interleaved on host-a and host-b (A1 A2 A3 B1 B2 A4 B3), each started only once the ones
/// before it wait in PostgreSQL; their commands run in arrival order, each on its own host.
/// (`cluster_queue.rs` proves the same on UTS-only hosts, three trials, and that the old order —
/// flock first — served the hosts in turns.)
#[test]
fn waiters_of_two_netns_hosts_are_served_in_arrival_order() {
    let sb = Sandbox::new();
    let c = Cluster::new(3);
    let cfg = c.write_config("fifo.yml", "10s", "");
    let (holder_host, hosts) = (c.host(2), [c.host(0), c.host(1)]);
    let app = "fifo.hosts.test";
    let (order, started, release) = (sb.mark("order"), sb.mark("started"), sb.mark("release"));
    let mut holder = holder_host
        .run_config(&sb, &cfg)
        .app(app)
        .run_id(rid(&sb, "holder"))
        .command([
            "sh",
            "-c",
            &format!(
                "touch {}; {}",
                shell_quote(&started),
                runner_tests::sh_wait_for(&shell_quote(&release))
            ),
        ])
        .spawn();
    wait_file(&started, TIMEOUT);
    let arrivals = [
        (0, "A1"),
        (0, "A2"),
        (0, "A3"),
        (1, "B1"),
        (1, "B2"),
        (0, "A4"),
        (1, "B3"),
    ];
    let q = shell_quote(&order);
    let mut waiters: Vec<RunningTether> = Vec::new();
    for (n, (h, name)) in arrivals.iter().enumerate() {
        let id = rid(&sb, name);
        waiters.push(
            hosts[*h]
                .run_config(&sb, &cfg)
                .app(app)
                .run_id(&id)
                .command(["sh", "-c", &format!("echo \"{name} $(hostname)\" >> {q}")])
                .spawn(),
        );
        runner_tests::wait_until(
            &format!("{name} waits in PostgreSQL behind {n} others"),
            TIMEOUT,
            || waiting_in_pg(&c, &id) == (n + 1, 1),
        );
    }
    touch(&release);
    holder.wait_exit(TIMEOUT).assert_code(0);
    for w in &mut waiters {
        w.wait_exit(TIMEOUT).assert_code(0);
    }
    let expected: Vec<String> = arrivals
        .iter()
        .map(|(h, name)| format!("{name} {}", hosts[*h].name()))
        .collect();
    assert_eq!(
        log_lines(&order),
        expected,
        "the app went to the waiters of both hosts in arrival order"
    );
}

/// Issue 16 §3 on network-namespace hosts: the holder's core on host-a is SIGKILLed while its
/// command has a `sleep 1000` in the background. The server releases the lock at once; host-b's
/// waiter takes it and runs host-a's teardown once, from the row (`reaped`, host-a's fence, on
/// host-b); the leftover is killed on host-a by host-a's front (its aftercare, D77), which
/// tells the server — so host-b's waiter, although its `leftovers_wait` is 10 minutes, starts
/// its command only once the leftover is dead and well within the test's bound. Host-a's next
/// run settles its record: no second teardown, no row left.
#[test]
fn holder_core_sigkilled_on_one_host_is_reaped_once_on_the_other_and_its_leftovers_die_on_its_own()
{
    let sb = Sandbox::new();
    let c = Cluster::new(2);
    let cfg = c.write_config("reap.yml", "10s", "  leftovers_wait: 10m\n");
    let (a, b) = (c.host(0), c.host(1));
    let app = "reap.hosts.test";
    let td = sb.mark("td.log");
    let teardown = format!(
        "echo \"$TETHER_REASON $TETHER_RUN_ID $(hostname) $TETHER_FENCE\" >> {}",
        shell_quote(&td)
    );
    let (bg, started_a) = (sb.mark("a.bg"), sb.mark("a.started"));
    let id_a = rid(&sb, "a");
    let mut run_a = a
        .run_config(&sb, &cfg)
        .app(app)
        .run_id(&id_a)
        .teardown(&teardown)
        .command([
            "sh",
            "-c",
            &format!(
                "echo \"$TETHER_FENCE\" > {s}; sleep 1000 & echo $! > {p}.tmp && mv {p}.tmp {p}; wait",
                s = shell_quote(&started_a),
                p = shell_quote(&bg)
            ),
        ])
        .spawn();
    let leftover = runner_tests::wait_pids(&bg, TIMEOUT)[0];
    let fence_a = fs::read_to_string(&started_a)
        .expect("A's fence")
        .trim()
        .to_owned();
    // B's command checks, the moment it starts, that A's leftover is already dead.
    let (ok_b, early_b) = (sb.mark("b.ok"), sb.mark("b.early"));
    let mut run_b = b
        .run_config(&sb, &cfg)
        .app(app)
        .run_id(rid(&sb, "b"))
        .teardown("true")
        .command([
            "sh",
            "-c",
            &format!(
                // Dead: gone, or a zombie not reaped yet (its state `Z`).
                "s=$(cut -d' ' -f3 /proc/{leftover}/stat 2>/dev/null); \
                 if [ -z \"$s\" ] || [ \"$s\" = Z ]; then touch {o}; else touch {e}; fi",
                e = shell_quote(&early_b),
                o = shell_quote(&ok_b)
            ),
        ])
        .spawn();
    runner_tests::wait_until("B waiting on the server", TIMEOUT, || queued(&c, 1));

    let core = run_a.wait_core_pid(TIMEOUT);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(core),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap_or_else(|e| panic!("kill {core}: {e}"));
    let done_a = run_a.wait_exit(TIMEOUT);
    done_a.assert_code(137);
    done_a.assert_stderr_contains(&format!(
        "the core of run {id_a} of {app} was killed: its leftovers on this host are killed"
    ));
    let done_b = run_b.wait_exit(TIMEOUT);
    done_b.assert_code(0);
    done_b.assert_stderr_contains(&format!(
        "reaping dead run {id_a} of {app} on host {}",
        a.name()
    ));
    done_b.assert_stderr_contains(&format!(
        "leftovers of run {id_a} on host {} killed",
        a.name()
    ));
    assert!(
        ok_b.exists() && !early_b.exists(),
        "B's command started while A's leftover lived\n{done_a}\n{done_b}"
    );
    assert!(!pid_alive(leftover), "A's leftover survived");
    assert_eq!(
        log_lines(&td),
        [format!("reaped {id_a} {} {fence_a}", b.name())],
        "A's teardown ran once, on host-b, with A's fence"
    );

    let again = a
        .run_config(&sb, &cfg)
        .app(app)
        .run_id(rid(&sb, "a2"))
        .teardown("true")
        .command(["true"])
        .run();
    again.assert_code(0);
    assert_eq!(log_lines(&td).len(), 1, "a second teardown\n{again}");
    assert_eq!(c.psql("SELECT count(*) FROM tether.runs"), "0", "{again}");
}
