//! The queue of an app's waiters (PROTOCOL §14, issue 17), against the real kernel: first come,
//! first served under load, supersede in place, a SIGKILLed or SIGSTOPped waiter, `--max-queue`,
//! `--queue-order newest-first`, and `tether status` listing the queue.
//!
//! Orderings are never hoped for: each waiter is started only once the one before it is proven
//! queued (its ticket exists and its core holds the ticket's flock, from `/proc/locks`); every
//! command appends its run id to one `O_APPEND` log, which is the acquisition order.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use runner_tests::{
    log_lines, names, queue_tickets, rid, run_dirs, shell_quote, start_held_run, touch,
    wait_flock_waiters, wait_until, HeldRun, RunningTether, Sandbox, Signal, TetherCmd, TIMEOUT,
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

/// A run of `app` whose command appends its run id to `log`.
fn logging_run<'a>(sb: &'a Sandbox, app: &str, id: &str, log: &Path) -> TetherCmd<'a> {
    let script = format!("echo \"$TETHER_RUN_ID\" >> {}", shell_quote(log));
    sb.tether_run()
        .app(app)
        .run_id(id)
        .command(["sh", "-c", &script])
}

/// Start `cmd` and return once the queue of `app` has `n` live tickets, the last one held by
/// the new run's core: it is queued, behind everyone before it.
fn enqueue(sb: &Sandbox, app: &str, cmd: TetherCmd<'_>, n: usize) -> (RunningTether, i32) {
    let run = cmd.spawn();
    let core = run.wait_core_pid(TIMEOUT);
    let mut have = Vec::new();
    wait_until("the run to be queued", TIMEOUT, || {
        have = queue_tickets(sb.lock_dir(), app);
        have.len() >= n && have.iter().any(|(_, pid)| *pid == core)
    });
    (run, core)
}

/// A holder of `app` in group `group`, released by `release`.
fn hold(sb: &Sandbox, app: &str, id: &str, release: &Path, extra: &[&str]) -> HeldRun {
    start_held_run(sb, app, id, release, |c| c.args(extra))
}

/// One FIFO trial: a holder, 20 waiters queued one after another, then released. With
/// `supersede`, waiter 5 is of group S and waiter 12, of the same group with
/// `--on-busy cancel-older`, supersedes it in place. Returns the acquisition order and the
/// expected one.
fn fifo_trial(sb: &Sandbox, trial: usize, supersede: bool) -> (Vec<String>, Vec<String>) {
    let app = format!(
        "t{trial}{}.fifo.example.org",
        if supersede { "s" } else { "" }
    );
    let log = sb.fresh_mark("order.log");
    let release = sb.fresh_mark("release");
    let holder = hold(sb, &app, &rid(sb, &format!("h{trial}")), &release, &[]);
    let ids: Vec<String> = (0..20).map(|k| rid(sb, &format!("w{trial}-{k}"))).collect();
    let mut runs = Vec::new();
    let mut queued = 0;
    for (k, id) in ids.iter().enumerate() {
        let mut cmd = logging_run(sb, &app, id, &log);
        if supersede && k == 5 {
            cmd = cmd.args(["--group", "S"]);
        }
        if supersede && k == 12 {
            cmd = cmd.args(["--group", "S", "--on-busy", "cancel-older"]);
            // It replaces waiter 5: the queue keeps its length.
            queued -= 1;
        }
        queued += 1;
        runs.push(enqueue(sb, &app, cmd, queued).0);
    }
    touch(&release);
    let mut holder = holder.run;
    holder.wait_exit(TIMEOUT).assert_code(0);
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
    (log_lines(&log), expected)
}

/// Issue 17 item 1, PROTOCOL §14: 20 waiters started in a known order while both cores are
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

/// PROTOCOL §14: a waiter SIGKILLed in the middle of the queue leaves it by itself (the kernel
/// releases its ticket); the one behind it moves up, and the queue runs to its end.
#[test]
fn a_sigkilled_waiter_leaves_the_queue_and_those_behind_move_up() {
    let sb = Sandbox::new();
    let app = "killed.example.org";
    let log = sb.mark("order.log");
    let release = sb.mark("release");
    let mut holder = hold(&sb, app, &rid(&sb, "h"), &release, &[]);
    let ids: Vec<String> = ["w1", "w2", "w3"].iter().map(|n| rid(&sb, n)).collect();
    let mut runs = Vec::new();
    for (k, id) in ids.iter().enumerate() {
        let cmd = logging_run(&sb, app, id, &log).args(["--wait-progress-interval", "60s"]);
        runs.push(enqueue(&sb, app, cmd, k + 1));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(runs[1].1), Signal::SIGKILL)
        .expect("killing w2's core");
    // w3 says its new place as soon as it sees it.
    runs[2].0.wait_line("position 2 of 2", TIMEOUT);
    assert_eq!(
        queue_tickets(sb.lock_dir(), app).len(),
        2,
        "w2's ticket is gone"
    );
    touch(&release);
    holder.run.wait_exit(TIMEOUT).assert_code(0);
    let mut w3 = runs.pop().expect("w3");
    let _w2 = runs.pop().expect("w2");
    let mut w1 = runs.pop().expect("w1");
    w1.0.wait_exit(TIMEOUT).assert_code(0);
    w3.0.wait_exit(TIMEOUT).assert_code(0);
    assert_eq!(log_lines(&log), [ids[0].clone(), ids[2].clone()]);
    assert!(queue_tickets(sb.lock_dir(), app).is_empty());
}

/// `/proc/<pid>/stat`'s state letter.
fn proc_state(pid: i32) -> Option<char> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    text[text.rfind(')')? + 1..].trim_start().chars().next()
}

/// PROTOCOL §14: a waiter whose core is SIGSTOPped is skipped by the one behind it after the
/// wait-progress interval, with a line naming it, so the queue moves; once continued it takes
/// back its place in front of those still waiting.
#[test]
fn a_stopped_waiter_is_skipped_after_the_bound_and_retakes_its_place_when_continued() {
    let sb = Sandbox::new();
    let app = "stopped.example.org";
    let log = sb.mark("order.log");
    let release = sb.mark("release");
    let mut holder = hold(&sb, app, &rid(&sb, "h"), &release, &[]);
    let (w1, w2) = (rid(&sb, "w1"), rid(&sb, "w2"));
    let every = ["--wait-progress-interval", "300ms"];
    let (mut r1, core1) = enqueue(&sb, app, logging_run(&sb, app, &w1, &log).args(every), 1);
    let (mut r2, core2) = enqueue(&sb, app, logging_run(&sb, app, &w2, &log).args(every), 2);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(core1), Signal::SIGSTOP).expect("SIGSTOP");
    let line = r2.wait_line("skipping it", TIMEOUT);
    assert!(
        line.contains(&format!("run {w1} ahead in the queue is stopped")),
        "{line}"
    );
    // w2 now waits on the app lock itself, as the head does.
    wait_until("w2 to wait on the app lock", TIMEOUT, || {
        runner_tests::flock_waiters(sb.lock_path(app)).contains(&core2)
    });
    assert_eq!(proc_state(core1), Some('T'), "w1 is still stopped");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(core1), Signal::SIGCONT).expect("SIGCONT");
    wait_until("w1 to run again", TIMEOUT, || {
        proc_state(core1).is_some_and(|s| s != 'T')
    });
    touch(&release);
    holder.run.wait_exit(TIMEOUT).assert_code(0);
    let f1 = r1.wait_exit(TIMEOUT);
    f1.assert_code(0);
    let f2 = r2.wait_exit(TIMEOUT);
    f2.assert_code(0);
    assert_eq!(
        log_lines(&log),
        [w1, w2],
        "continued, w1 went first again\n{f1}\n{f2}"
    );
}

/// Issue 17 item 2, PROTOCOL §14: holder A0 and queued B1, A1, B2; a new A run with
/// `--on-busy cancel-older` cancels both older A runs — the holder torn down once, the queued
/// one leaving with `superseded` (exit 143) having run nothing — and takes the holder's place
/// (the head); the B runs keep their order.
#[test]
fn supersede_replaces_the_holder_and_the_queued_runs_of_the_group_and_takes_the_head() {
    let sb = Sandbox::new();
    let app = "supersede.example.org";
    let log = sb.mark("order.log");
    let release = sb.mark("release");
    let a0 = rid(&sb, "a0");
    let td = format!("echo teardown-{a0} >> {}", shell_quote(&log));
    let holder = hold(
        &sb,
        app,
        &a0,
        &release,
        &["--group", "A", "--teardown", &td],
    );
    let ids: Vec<String> = ["b1", "a1", "b2", "a2"]
        .iter()
        .map(|n| rid(&sb, n))
        .collect();
    let groups = ["B", "A", "B", "A"];
    let mut runs = Vec::new();
    for k in 0..3 {
        let cmd = logging_run(&sb, app, &ids[k], &log).args(["--group", groups[k]]);
        runs.push(enqueue(&sb, app, cmd, k + 1).0);
    }
    let cmd =
        logging_run(&sb, app, &ids[3], &log).args(["--group", "A", "--on-busy", "cancel-older"]);
    let mut a2 = cmd.spawn();
    let mut h = holder.run;
    h.wait_exit(TIMEOUT).assert_code(143);
    let a1 = runs[1].wait_exit(TIMEOUT);
    a1.assert_code(143)
        .assert_stderr_contains("result=superseded")
        .assert_stderr_contains(&format!("superseded by run {}", ids[3]));
    assert!(!sb.run_dir(&ids[1]).exists(), "a1 left no run dir");
    a2.wait_exit(TIMEOUT)
        .assert_code(0)
        .assert_stderr_contains(&format!("cancelling older queued run {}", ids[1]));
    runs[0].wait_exit(TIMEOUT).assert_code(0);
    runs[2].wait_exit(TIMEOUT).assert_code(0);
    assert_eq!(
        log_lines(&log),
        [
            format!("teardown-{a0}"),
            ids[3].clone(),
            ids[0].clone(),
            ids[2].clone()
        ],
        "a0 torn down once, a1 ran nothing, a2 went first, the B runs in their order"
    );
}

/// Issue 17 item 2, PROTOCOL §14: with a holder of another group, the new A run takes the
/// place of the foremost A run it replaced: holder C0, queued B1, A1, B2, A2, then A3 → B1,
/// A3, B2.
#[test]
fn supersede_takes_the_place_of_the_foremost_queued_run_it_replaced() {
    let sb = Sandbox::new();
    let app = "inplace.example.org";
    let log = sb.mark("order.log");
    let release = sb.mark("release");
    let mut holder = hold(&sb, app, &rid(&sb, "c0"), &release, &["--group", "C"]);
    let ids: Vec<String> = ["b1", "a1", "b2", "a2"]
        .iter()
        .map(|n| rid(&sb, n))
        .collect();
    let groups = ["B", "A", "B", "A"];
    let mut runs = Vec::new();
    for k in 0..4 {
        let cmd = logging_run(&sb, app, &ids[k], &log).args(["--group", groups[k]]);
        runs.push(enqueue(&sb, app, cmd, k + 1).0);
    }
    let a3 = rid(&sb, "a3");
    let cmd = logging_run(&sb, app, &a3, &log).args(["--group", "A", "--on-busy", "cancel-older"]);
    let (mut r3, core3) = enqueue(&sb, app, cmd, 3);
    let order: Vec<i32> = queue_tickets(sb.lock_dir(), app)
        .iter()
        .map(|t| t.1)
        .collect();
    assert_eq!(order.get(1), Some(&core3), "a3 is second, where a1 was");
    for k in [1, 3] {
        runs[k]
            .wait_exit(TIMEOUT)
            .assert_code(143)
            .assert_stderr_contains("result=superseded");
    }
    touch(&release);
    holder.run.wait_exit(TIMEOUT).assert_code(0);
    r3.wait_exit(TIMEOUT).assert_code(0);
    runs[0].wait_exit(TIMEOUT).assert_code(0);
    runs[2].wait_exit(TIMEOUT).assert_code(0);
    assert_eq!(
        log_lines(&log),
        [ids[0].clone(), a3, ids[2].clone()],
        "the holder of group C untouched; a3 between the B runs"
    );
}

/// Issue 17 item 3, CLI-CONTRACT §7: with two runs queued, a run with `--max-queue 2` gives up
/// at once with 75 and a line saying why, and leaves nothing behind.
#[test]
fn max_queue_refuses_the_next_waiter_at_once_with_75() {
    let sb = Sandbox::new();
    let app = "bounded.example.org";
    let log = sb.mark("order.log");
    let release = sb.mark("release");
    let mut holder = hold(&sb, app, &rid(&sb, "h"), &release, &[]);
    let (w1, w2, w3) = (rid(&sb, "w1"), rid(&sb, "w2"), rid(&sb, "w3"));
    let (mut r1, _) = enqueue(&sb, app, logging_run(&sb, app, &w1, &log), 1);
    let (mut r2, _) = enqueue(&sb, app, logging_run(&sb, app, &w2, &log), 2);
    let before = names(&sb.lock_dir().join(format!("queue-{app}")));
    let t0 = Instant::now();
    let f = logging_run(&sb, app, &w3, &log)
        .args(["--max-queue", "2"])
        .timeout(Duration::from_secs(20))
        .run();
    let took = t0.elapsed();
    f.assert_code(75).assert_stderr_contains(&format!(
        "tether: warning: app lock {app}: 2 runs already waiting (--max-queue 2) — giving up"
    ));
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(!sb.run_dir(&w3).exists(), "no run dir left");
    assert_eq!(
        names(&sb.lock_dir().join(format!("queue-{app}"))),
        before,
        "no ticket or temp file left"
    );
    touch(&release);
    holder.run.wait_exit(TIMEOUT).assert_code(0);
    r1.wait_exit(TIMEOUT).assert_code(0);
    r2.wait_exit(TIMEOUT).assert_code(0);
    assert_eq!(log_lines(&log), [w1, w2]);
    assert_eq!(run_dirs(&sb.runs_dir()), Vec::<String>::new());
}

/// Issue 17 item 1: `--queue-order newest-first` serves the latest arrival first.
#[test]
fn newest_first_serves_the_latest_arrival_first() {
    let sb = Sandbox::new();
    let app = "newest.example.org";
    let log = sb.mark("order.log");
    let release = sb.mark("release");
    let mut holder = hold(&sb, app, &rid(&sb, "h"), &release, &[]);
    let ids: Vec<String> = ["w1", "w2", "w3"].iter().map(|n| rid(&sb, n)).collect();
    let mut runs = Vec::new();
    for (k, id) in ids.iter().enumerate() {
        let cmd = logging_run(&sb, app, id, &log).args(["--queue-order", "newest-first"]);
        runs.push(enqueue(&sb, app, cmd, k + 1).0);
    }
    // The newest is the head: it alone waits on the app lock.
    wait_flock_waiters(sb.lock_path(app), 1, TIMEOUT);
    touch(&release);
    holder.run.wait_exit(TIMEOUT).assert_code(0);
    for r in &mut runs {
        r.wait_exit(TIMEOUT).assert_code(0);
    }
    let mut expected = ids.clone();
    expected.reverse();
    assert_eq!(log_lines(&log), expected);
}

/// Issue 17 item 4, CLI-CONTRACT §13 and §16: the waiting line says the position and who is
/// ahead; `tether status` (text and `--json`) lists the waiters in queue order with run id,
/// group, pid and waiting time.
#[test]
fn the_queue_is_visible_in_the_waiting_line_and_in_status() {
    let sb = Sandbox::new();
    let app = "visible.example.org";
    let log = sb.mark("order.log");
    let release = sb.mark("release");
    let h = rid(&sb, "h");
    let mut holder = hold(&sb, app, &h, &release, &[]);
    let (w1, w2) = (rid(&sb, "w1"), rid(&sb, "w2"));
    let (mut r1, c1) = enqueue(
        &sb,
        app,
        logging_run(&sb, app, &w1, &log).args(["--group", "g1"]),
        1,
    );
    let (mut r2, c2) = enqueue(&sb, app, logging_run(&sb, app, &w2, &log), 2);
    let line = r2.wait_line("position 2 of 2", TIMEOUT);
    let prefix = format!(
        "tether: app lock {app}: position 2 of 2 — held by run {h} (pid {}, ",
        holder.core
    );
    assert!(line.starts_with(&prefix), "{line}");
    assert!(
        line.contains(&format!("); ahead: run {w1} (waiting ")),
        "{line}"
    );
    assert!(line.ends_with(") — waiting"), "{line}");
    r1.wait_line(&format!("position 1 of 1 — held by run {h} "), TIMEOUT);

    let st = sb.tether_status().arg("--json").run();
    st.assert_code(0);
    let v: serde_json::Value = serde_json::from_str(&st.stdout).expect("status JSON");
    let a = &v["apps"][0];
    assert_eq!(a["run_id"], h.as_str());
    let q = a["queue"].as_array().expect("queue array");
    let got: Vec<(i64, &str, Option<&str>, i64)> = q
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
    assert_eq!(
        got,
        [
            (1, w1.as_str(), Some("g1"), i64::from(c1)),
            (2, w2.as_str(), None, i64::from(c2))
        ]
    );
    assert!(q.iter().all(|w| w["waiting_s"].as_u64().is_some()), "{q:?}");
    let text = sb.tether_status().run();
    let rows: Vec<&str> = text
        .stdout
        .lines()
        .skip_while(|l| *l != "QUEUE")
        .skip(2)
        .take(2)
        .collect();
    assert!(
        rows[0].contains(&format!(" 1    {w1}")) && rows[0].contains(" g1 "),
        "{}",
        text.stdout
    );
    assert!(rows[1].contains(&format!(" 2    {w2}")), "{}", text.stdout);
    touch(&release);
    holder.run.wait_exit(TIMEOUT).assert_code(0);
    r1.wait_exit(TIMEOUT).assert_code(0);
    r2.wait_exit(TIMEOUT).assert_code(0);
}
