//! The queue of an app's waiters (PROTOCOL §15, issue 17), against the real kernel: first come,
//! first served under load, supersede in place, a SIGKILLed or SIGSTOPped waiter, `--max-queue`,
//! `--queue-order newest-first`, and `tether status` listing the queue.
//!
//! Orderings are never hoped for: each waiter is started only once the one before it is proven
//! queued (its ticket exists and its core holds the ticket's flock, from `/proc/locks`; under
//! a cluster, its row in `tether.runs` has a ticket whose ticket lock its session holds:
//! [`runner_tests::app_queue`]); every command appends its run id to one `O_APPEND` log, which
//! is the acquisition order.
//!
//! With the cluster switch (`.ci/run`'s second pass) every case runs too: the cluster queue
//! (PROTOCOL §15 "Under a cluster") offers them all. Where a case looks at the queue's
//! machinery rather than its order — who waits on the app lock itself, what `tether status`
//! lists, the holder in the waiting line — it asks [`runner_tests::app_queue`] and
//! [`runner_tests::app_lock_waiters`], which answer in both modes, or reads the cluster's side.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use runner_tests::{
    app_lock_waiters, app_queue, log_lines, names, queue_tickets, rid, run_dirs, shell_quote,
    start_held_run, touch, wait_file, wait_until, HeldRun, RunningTether, Sandbox, Signal,
    TetherCmd, TIMEOUT,
};

/// Processes that keep both cores busy; killed when dropped.
struct Hogs(Vec<Child>);

impl Hogs {
    fn start(n: usize) -> Hogs {
        Hogs(
            (0..n)
                .map(|_| {
                    Command::new("sh")
                        .args(["-c", "while :; do :; done"])
                        .spawn()
                        .expect("starting a CPU hog")
                })
                .collect(),
        )
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One app's world for a queue test: its sandbox, the log every command appends its run id to
/// (the acquisition order), and its holder's release marker.
struct Q<'a> {
    sb: &'a Sandbox,
    app: String,
    log: PathBuf,
    release: PathBuf,
}

impl<'a> Q<'a> {
    fn new(sb: &'a Sandbox, app: &str) -> Q<'a> {
        Q {
            sb,
            app: app.to_owned(),
            log: sb.fresh_mark("order.log"),
            release: sb.fresh_mark("release"),
        }
    }

    /// A holder (run id from `name`) that runs until [`Q::release`].
    fn hold(&self, name: &str, extra: &[&str]) -> (String, HeldRun) {
        let id = rid(self.sb, name);
        let held = start_held_run(self.sb, &self.app, &id, &self.release, |c| c.args(extra));
        (id, held)
    }

    /// A run whose command appends its run id to the log.
    fn run(&self, id: &str) -> TetherCmd<'a> {
        let script = format!("echo \"$TETHER_RUN_ID\" >> {}", shell_quote(&self.log));
        self.sb
            .tether_run()
            .app(&self.app)
            .run_id(id)
            .command(["sh", "-c", &script])
    }

    /// Start `cmd` and return once the queue has `n` runs, one of them the new run's core
    /// (one host: `n` live tickets, one held by it; a cluster: `n` live entries of the cluster
    /// queue, one of them its row): it is queued, behind everyone before it. Returns the run
    /// and its core's pid.
    fn enqueue(&self, cmd: TetherCmd<'_>, n: usize) -> (RunningTether, i32) {
        let run = cmd.spawn();
        let core = run.wait_core_pid(TIMEOUT);
        wait_until("the run to be queued", TIMEOUT, || {
            let have = app_queue(self.sb, &self.app);
            have.len() >= n && have.contains(&core)
        });
        (run, core)
    }

    /// Queue one run per `(name, extra args)`, in order, each proven queued before the next
    /// starts (`first` runs are queued already).
    fn queue(&self, first: usize, runs: &[(&str, &[&str])]) -> (Vec<String>, Vec<RunningTether>) {
        let ids: Vec<String> = runs.iter().map(|(n, _)| rid(self.sb, n)).collect();
        let started = ids
            .iter()
            .zip(runs)
            .enumerate()
            .map(|(k, (id, (_, extra)))| self.enqueue(self.run(id).args(*extra), first + k + 1).0)
            .collect();
        (ids, started)
    }

    /// Let the holder go; it must exit with `code`.
    fn release(&self, mut holder: HeldRun, code: i32) {
        touch(&self.release);
        holder.run.wait_exit(TIMEOUT).assert_code(code);
    }

    fn order(&self) -> Vec<String> {
        log_lines(&self.log)
    }
}

/// Every run in `runs` exits 0.
fn all_pass<'r>(runs: impl IntoIterator<Item = &'r mut RunningTether>) {
    for r in runs {
        r.wait_exit(TIMEOUT).assert_code(0);
    }
}

/// One FIFO trial: a holder, 20 waiters queued one after another, then released. With
/// `supersede`, waiter 5 is of group S and waiter 12, of the same group with
/// `--on-busy cancel-older`, supersedes it in place. Returns the acquisition order and the
/// expected one.
fn fifo_trial(sb: &Sandbox, trial: usize, supersede: bool) -> (Vec<String>, Vec<String>) {
    let tag = if supersede { "s" } else { "" };
    let q = Q::new(sb, &format!("t{trial}{tag}.fifo.example.org"));
    let (_, holder) = q.hold(&format!("h{trial}"), &[]);
    let ids: Vec<String> = (0..20).map(|k| rid(sb, &format!("w{trial}-{k}"))).collect();
    let mut runs = Vec::new();
    let mut queued = 0;
    for (k, id) in ids.iter().enumerate() {
        let mut cmd = q.run(id);
        if supersede && k == 5 {
            cmd = cmd.args(["--group", "S"]);
        }
        if supersede && k == 12 {
            cmd = cmd.args(["--group", "S", "--on-busy", "cancel-older"]);
            // It replaces waiter 5: the queue keeps its length.
            queued -= 1;
        }
        queued += 1;
        runs.push(q.enqueue(cmd, queued).0);
    }
    q.release(holder, 0);
    for (k, mut r) in runs.into_iter().enumerate() {
        let f = r.wait_exit(TIMEOUT);
        if supersede && k == 5 {
            f.assert_code(143)
                .assert_stderr_contains("result=superseded");
        } else {
            f.assert_code(0);
        }
    }
    let mut expected = ids.clone();
    if supersede {
        let new = expected.remove(12);
        expected[5] = new;
    }
    (q.order(), expected)
}

/// Issue 17 item 1, PROTOCOL §15: 20 waiters started in a known order while both cores are
/// busy take the app in that order, in 20 of 20 trials — and so they do with a supersede in
/// the same queue (the replaced run's place goes to its replacement).
#[test]
fn twenty_waiters_take_the_app_in_arrival_order_under_load() {
    let sb = Sandbox::new();
    let _hogs = Hogs::start(2);
    let t0 = Instant::now();
    for trial in 0..20 {
        let supersede = trial % 2 == 1;
        let (got, expected) = fifo_trial(&sb, trial, supersede);
        assert_eq!(got, expected, "trial {trial} (supersede: {supersede})");
    }
    eprintln!("20 trials took {:?}", t0.elapsed());
}

/// PROTOCOL §15, "Arrival" (DECISIONS D83): a run without a group that finds its app busy
/// stands in the queue from its start, before its run dir is claimed — so the runs are served
/// in the order they were started, not in the order their start-ups happened to finish. A run
/// with a group takes its ticket only once its `queued` record exists (a superseding run
/// verifies a queued one by it). Under a cluster no run takes a host ticket (its place is on the server, D84).
#[test]
fn a_run_arriving_at_a_busy_app_is_queued_before_its_run_dir_is_claimed() {
    let sb = Sandbox::new();
    let q = Q::new(&sb, "arrival.fifo.example.org");
    let (_, holder) = q.hold("h", &[]);
    let (plain, grouped) = (rid(&sb, "plain"), rid(&sb, "grouped"));
    let mut runs = Vec::new();
    for (id, extra, early) in [
        (&plain, &[][..], true),
        (&grouped, &["--group", "G"][..], false),
    ] {
        let pause = sb.fresh_mark("before-claim");
        let mut waiting = pause.clone().into_os_string();
        waiting.push(".waiting");
        let run = q
            .run(id)
            .args(extra)
            .env("TETHER_FAULT_PAUSE_BEFORE_CLAIM", &pause)
            .spawn();
        wait_file(PathBuf::from(waiting), TIMEOUT);
        let core = run.wait_core_pid(TIMEOUT);
        let ticketed = queue_tickets(sb.lock_dir(), &q.app)
            .iter()
            .any(|&(_, pid)| pid == core);
        assert_eq!(
            ticketed,
            early && sb.cluster().is_none(),
            "run {id} {extra:?}: a host ticket before its claim"
        );
        assert!(!sb.run_dir(id).exists(), "run {id}: no run dir yet");
        touch(&pause);
        // Queued (its claim done, waiting) before the next one starts.
        wait_until("the run to wait", TIMEOUT, || {
            app_queue(&sb, &q.app).contains(&core) && sb.run_dir(id).exists()
        });
        runs.push(run);
    }
    q.release(holder, 0);
    all_pass(&mut runs);
    assert_eq!(q.order(), [plain, grouped]);
}

/// PROTOCOL §15: a waiter SIGKILLed in the middle of the queue leaves it by itself (the kernel
/// releases its ticket); the one behind it moves up, and the queue runs to its end.
#[test]
fn a_sigkilled_waiter_leaves_the_queue_and_those_behind_move_up() {
    let sb = Sandbox::new();
    let q = Q::new(&sb, "killed.example.org");
    let (_, holder) = q.hold("h", &[]);
    let (ids, mut runs) = q.queue(0, &[("w1", &[]), ("w2", &[]), ("w3", &[])]);
    let queue = app_queue(&sb, &q.app);
    assert_eq!(queue.len(), 3, "{queue:?}");
    let w2 = queue[1];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(w2), Signal::SIGKILL)
        .expect("killing w2's core");
    // w3 says its new place as soon as it sees it.
    runs[2].wait_line("position 2 of 2", TIMEOUT);
    // Under a cluster: w2's ticket lock goes with its session, and its row is no live entry.
    wait_until("w2 to leave the queue", TIMEOUT, || {
        !app_queue(&sb, &q.app).contains(&w2)
    });
    assert_eq!(
        app_queue(&sb, &q.app),
        [queue[0], queue[2]],
        "w2's place is gone, w1 and w3 keep their order"
    );
    q.release(holder, 0);
    let (w1, w3) = runs.split_at_mut(2);
    all_pass([&mut w1[0], &mut w3[0]]);
    assert_eq!(q.order(), [ids[0].clone(), ids[2].clone()]);
    assert!(app_queue(&sb, &q.app).is_empty());
}

/// `/proc/<pid>/stat`'s state letter.
fn proc_state(pid: i32) -> Option<char> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    text[text.rfind(')')? + 1..].trim_start().chars().next()
}

/// PROTOCOL §15: a waiter whose core is SIGSTOPped is skipped by the one behind it after the
/// wait-progress interval, with a line naming it, so the queue moves; once continued it takes
/// back its place in front of those still waiting. Under a cluster "stopped" is seen from the
/// server: the stopped waiter stops looking at the queue (its row's `looked` gets old).
#[test]
fn a_stopped_waiter_is_skipped_after_the_bound_and_retakes_its_place_when_continued() {
    let sb = Sandbox::new();
    let q = Q::new(&sb, "stopped.example.org");
    let (_, holder) = q.hold("h", &[]);
    // The bound; a cluster waiter looks every 200 ms, and one that has not looked for the
    // bound is skipped: well above that, so that a loaded machine skips nobody by mistake.
    let every: &[&str] = &["--wait-progress-interval", "1s"];
    let (ids, mut runs) = q.queue(0, &[("w1", every), ("w2", every)]);
    let queue = app_queue(&sb, &q.app);
    assert_eq!(queue.len(), 2, "{queue:?}");
    let (core1, core2) = (queue[0], queue[1]);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(core1), Signal::SIGSTOP).expect("SIGSTOP");
    let line = runs[1].wait_line("skipping it", TIMEOUT);
    let named = format!("run {} ahead in the queue is stopped", ids[0]);
    assert!(line.contains(&named), "{line}");
    // w2 now waits on the app lock itself, as the head does.
    wait_until("w2 to wait on the app lock", TIMEOUT, || {
        app_lock_waiters(&sb, &q.app).contains(&core2)
    });
    assert_eq!(proc_state(core1), Some('T'), "w1 is still stopped");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(core1), Signal::SIGCONT).expect("SIGCONT");
    wait_until("w1 to run again", TIMEOUT, || {
        proc_state(core1).is_some_and(|s| s != 'T')
    });
    // Continued, w1 is the head again and waits on the app lock itself (one host: it never
    // left the kernel's flock; a cluster: it looked at the queue again — it counts again).
    wait_until("w1 to wait on the app lock again", TIMEOUT, || {
        app_lock_waiters(&sb, &q.app).contains(&core1)
    });
    q.release(holder, 0);
    all_pass(&mut runs);
    assert_eq!(q.order(), ids, "continued, w1 went first again");
}

/// Issue 17 item 2, PROTOCOL §15: holder A0 and queued B1, A1, B2; a new A run with
/// `--on-busy cancel-older` cancels both older A runs — the holder torn down once, the queued
/// one leaving with `superseded` (exit 143) having run nothing — and takes the holder's place
/// (the head); the B runs keep their order.
#[test]
fn supersede_replaces_the_holder_and_the_queued_runs_of_the_group_and_takes_the_head() {
    let sb = Sandbox::new();
    let q = Q::new(&sb, "supersede.example.org");
    let a0 = rid(&sb, "a0");
    let td = format!("echo teardown-{a0} >> {}", shell_quote(&q.log));
    let held = start_held_run(&sb, &q.app, &a0, &q.release, |c| {
        c.args(["--group", "A", "--teardown", &td])
    });
    let (b, a): (&[&str], &[&str]) = (&["--group", "B"], &["--group", "A"]);
    let (ids, mut runs) = q.queue(0, &[("b1", b), ("a1", a), ("b2", b)]);
    let a2 = rid(&sb, "a2");
    let mut new = q
        .run(&a2)
        .args(["--group", "A", "--on-busy", "cancel-older"])
        .spawn();
    let mut holder = held.run;
    holder.wait_exit(TIMEOUT).assert_code(143);
    runs[1]
        .wait_exit(TIMEOUT)
        .assert_code(143)
        .assert_stderr_contains("result=superseded")
        .assert_stderr_contains(&format!("superseded by run {a2}"));
    assert!(!sb.run_dir(&ids[1]).exists(), "a1 left no run dir");
    new.wait_exit(TIMEOUT)
        .assert_code(0)
        .assert_stderr_contains(&format!("cancelling older queued run {}", ids[1]));
    let (b1, b2) = runs.split_at_mut(2);
    all_pass([&mut b1[0], &mut b2[0]]);
    assert_eq!(
        q.order(),
        [format!("teardown-{a0}"), a2, ids[0].clone(), ids[2].clone()],
        "a0 torn down once, a1 ran nothing, a2 went first, the B runs in their order"
    );
}

/// Issue 17 item 2, PROTOCOL §15: with a holder of another group, the new A run takes the
/// place of the foremost A run it replaced: holder C0, queued B1, A1, B2, A2, then A3 → B1,
/// A3, B2.
#[test]
fn supersede_takes_the_place_of_the_foremost_queued_run_it_replaced() {
    let sb = Sandbox::new();
    let q = Q::new(&sb, "inplace.example.org");
    let (_, holder) = q.hold("c0", &["--group", "C"]);
    let (b, a): (&[&str], &[&str]) = (&["--group", "B"], &["--group", "A"]);
    let (ids, mut runs) = q.queue(0, &[("b1", b), ("a1", a), ("b2", b), ("a2", a)]);
    let a3 = rid(&sb, "a3");
    let cmd = q
        .run(&a3)
        .args(["--group", "A", "--on-busy", "cancel-older"]);
    let (mut r3, core3) = q.enqueue(cmd, 3);
    // The replaced runs leave; then the queue is b1, a3, b2.
    for k in [1, 3] {
        runs[k]
            .wait_exit(TIMEOUT)
            .assert_code(143)
            .assert_stderr_contains("result=superseded");
    }
    let order = app_queue(&sb, &q.app);
    assert_eq!(order.len(), 3, "{order:?}");
    assert_eq!(order.get(1), Some(&core3), "a3 is second, where a1 was");
    q.release(holder, 0);
    let (b1, rest) = runs.split_at_mut(2);
    all_pass([&mut r3, &mut b1[0], &mut rest[0]]);
    assert_eq!(
        q.order(),
        [ids[0].clone(), a3, ids[2].clone()],
        "the holder of group C untouched; a3 between the B runs"
    );
}

/// Issue 17 item 3, CLI-CONTRACT §7: with two runs queued, a run with `--max-queue 2` gives up
/// at once with 75 and a line saying why, and leaves nothing behind.
#[test]
fn max_queue_refuses_the_next_waiter_at_once_with_75() {
    let sb = Sandbox::new();
    let q = Q::new(&sb, "bounded.example.org");
    let (_, holder) = q.hold("h", &[]);
    let (ids, mut runs) = q.queue(0, &[("w1", &[]), ("w2", &[])]);
    let queue_dir = sb.lock_dir().join(format!("queue-{}", q.app));
    let before = names(&queue_dir);
    let w3 = rid(&sb, "w3");
    let t0 = Instant::now();
    let f = q
        .run(&w3)
        .args(["--max-queue", "2"])
        .timeout(Duration::from_secs(20))
        .run();
    let took = t0.elapsed();
    f.assert_code(75).assert_stderr_contains(&format!(
        "tether: warning: app lock {}: 2 runs already waiting (--max-queue 2) — giving up",
        q.app
    ));
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(!sb.run_dir(&w3).exists(), "no run dir left");
    assert_eq!(names(&queue_dir), before, "no ticket or temp file left");
    q.release(holder, 0);
    all_pass(&mut runs);
    assert_eq!(q.order(), ids);
    assert_eq!(run_dirs(&sb.runs_dir()), Vec::<String>::new());

    // `--max-queue 0`: never wait, and no queue dir made for an app nobody queued for yet.
    let q0 = Q::new(&sb, "bounded0.example.org");
    let (_, holder) = q0.hold("h0", &[]);
    q0.run(&rid(&sb, "z"))
        .args(["--max-queue", "0"])
        .run()
        .assert_code(75)
        .assert_stderr_contains("busy and --max-queue 0 — giving up");
    assert!(!sb.lock_dir().join(format!("queue-{}", q0.app)).exists());
    q0.release(holder, 0);
}

/// Issue 17 item 1: `--queue-order newest-first` serves the latest arrival first.
#[test]
fn newest_first_serves_the_latest_arrival_first() {
    let sb = Sandbox::new();
    let q = Q::new(&sb, "newest.example.org");
    let (_, holder) = q.hold("h", &[]);
    let newest: &[&str] = &["--queue-order", "newest-first"];
    let (mut ids, mut runs) = q.queue(0, &[("w1", newest), ("w2", newest), ("w3", newest)]);
    let cores: Vec<i32> = runs.iter().map(|r| r.wait_core_pid(TIMEOUT)).collect();
    assert_eq!(
        app_queue(&sb, &q.app),
        [cores[2], cores[1], cores[0]],
        "the queue is newest first"
    );
    // The newest is the head: it waits on the app lock itself.
    wait_until("the newest to wait on the app lock", TIMEOUT, || {
        app_lock_waiters(&sb, &q.app).contains(&cores[2])
    });
    q.release(holder, 0);
    all_pass(&mut runs);
    ids.reverse();
    assert_eq!(q.order(), ids);
}

/// A waiter as `tether status --json` lists it: (position, run id, group, pid).
type Listed<'a> = (i64, &'a str, Option<&'a str>, i64);

/// Issue 17 item 4, CLI-CONTRACT §13 and §16: the waiting line says the position and who is
/// ahead; `tether status` (text and `--json`) lists the waiters in queue order with run id,
/// group, pid and waiting time — the host's QUEUE, or under a cluster its CLUSTER section
/// (§27).
#[test]
fn the_queue_is_visible_in_the_waiting_line_and_in_status() {
    let sb = Sandbox::new();
    let cluster = sb.cluster().is_some();
    let q = Q::new(&sb, "visible.example.org");
    let (h, holder) = q.hold("h", &[]);
    let (ids, mut runs) = q.queue(0, &[("w1", &["--group", "g1"]), ("w2", &[])]);
    let queue = app_queue(&sb, &q.app);
    assert_eq!(queue.len(), 2, "{queue:?}");
    let (w1, w2) = (&ids[0], &ids[1]);
    let line = runs[1].wait_line("position 2 of 2", TIMEOUT);
    // (Under a cluster too: the holder is of this host, which the line does not name.)
    let prefix = format!(
        "tether: app lock {}: position 2 of 2 — held by run {h} (pid {}, ",
        q.app, holder.core
    );
    assert!(line.starts_with(&prefix), "{line}");
    let ahead = format!("); ahead: run {w1} (waiting ");
    assert!(line.contains(&ahead), "{line}");
    assert!(line.ends_with(") — waiting"), "{line}");
    runs[0].wait_line(&format!("position 1 of 1 — held by run {h} "), TIMEOUT);

    let st = sb.tether_status().arg("--json").run();
    st.assert_code(0);
    let v: serde_json::Value = serde_json::from_str(&st.stdout).expect("status JSON");
    let a = &v["apps"][0];
    assert_eq!(a["run_id"], h.as_str());
    let (listed, want_pids): (Vec<Listed>, _) = if cluster {
        let entry = v["cluster"]
            .as_array()
            .and_then(|c| c.iter().find(|e| e["app"] == q.app.as_str()))
            .unwrap_or_else(|| panic!("no cluster entry for {}: {v:#}", q.app));
        assert_eq!(entry["holder"]["run_id"], h.as_str(), "{v:#}");
        let waiters = entry["waiters"].as_array().expect("waiters array");
        assert!(
            waiters.iter().all(|w| w["age_s"].as_u64().is_some()),
            "{waiters:?}"
        );
        let listed = waiters
            .iter()
            .enumerate()
            .map(|(i, w)| {
                (
                    i as i64 + 1,
                    w["run_id"].as_str().unwrap_or(""),
                    w["group"].as_str(),
                    w["pid"].as_i64().unwrap_or(0),
                )
            })
            .collect();
        (listed, queue.clone())
    } else {
        let tickets: Vec<i32> = queue_tickets(sb.lock_dir(), &q.app)
            .iter()
            .map(|t| t.1)
            .collect();
        let waiters = a["queue"].as_array().expect("queue array");
        assert!(
            waiters.iter().all(|w| w["waiting_s"].as_u64().is_some()),
            "{waiters:?}"
        );
        let listed = waiters
            .iter()
            .map(|w| {
                (
                    w["position"].as_i64().unwrap_or(0),
                    w["run_id"].as_str().unwrap_or(""),
                    w["group"].as_str(),
                    w["pid"].as_i64().unwrap_or(0),
                )
            })
            .collect();
        (listed, tickets)
    };
    let want = [
        (1, w1.as_str(), Some("g1"), i64::from(want_pids[0])),
        (2, w2.as_str(), None, i64::from(want_pids[1])),
    ];
    assert_eq!(listed, want, "{v:#}");
    let text = sb.tether_status().run();
    if cluster {
        // CLUSTER: APP ROLE RUN HOST PID FOR CI, the waiters' role `waiter <n>`.
        let rows: Vec<Vec<&str>> = text
            .stdout
            .lines()
            .skip_while(|l| *l != "CLUSTER")
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|cells| cells.get(1) == Some(&"waiter"))
            .collect();
        let got: Vec<(&str, &str)> = rows.iter().map(|c| (c[2], c[3])).collect();
        assert_eq!(
            got,
            [("1", w1.as_str()), ("2", w2.as_str())],
            "{}",
            text.stdout
        );
    } else {
        let rows: Vec<&str> = text
            .stdout
            .lines()
            .skip_while(|l| *l != "QUEUE")
            .skip(2)
            .take(2)
            .collect();
        let first = rows[0].contains(&format!(" 1    {w1}")) && rows[0].contains(" g1 ");
        assert!(first, "{}", text.stdout);
        assert!(rows[1].contains(&format!(" 2    {w2}")), "{}", text.stdout);
    }
    q.release(holder, 0);
    all_pass(&mut runs);
}
