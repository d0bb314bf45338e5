//! CI runs against the real kernel (CLI-CONTRACT §7, PROTOCOL §12, CLI-CONTRACT §9, CLI-CONTRACT §13, CLI-CONTRACT §14; issue 4): busy policies,
//! cancel-older, a deadline passing during the lock wait, reporting to a real HTTP server, and
//! CI detection end to end.
//!
//! Every test drives the real `tether` binary. Orderings are never hoped for: a waiter is proven
//! blocked in the kernel (`/proc/locks`) or proven to have looked again (its repeated waiting
//! lines, with `TETHER_WAIT_PROGRESS_INTERVAL=100ms`) before anything is asserted about it;
//! holders wait for release markers the test creates (bounded shell loops that give up with
//! status 99); teardowns log to an `O_APPEND` file. The HTTP server is a real TCP listener on
//! 127.0.0.1 that records every request it reads.
//!
//! Run ids are unique per sandbox (tether names a run's cgroup after the run id, which is
//! host-wide, and tests run in parallel); where a test needs tether to derive the run id from
//! CI variables, the repo name carries the sandbox's suffix for the same reason.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use runner_tests::{
    count_lines, log_lines, rid, run_dirs, sh_wait_for, shell_quote, start_held_run, suffix, touch,
    wait_app_waiters, wait_file, wait_holder_pid, write_config, Finished, RunningTether, Sandbox,
    TetherCmd, TIMEOUT,
};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// helpers

/// Parses a summary duration (`250ms`, `1.2s`, `3m05s`, `1h02m`).
fn parse_human(text: &str) -> Duration {
    let bad = || -> u64 { panic!("not a summary duration: {text:?}") };
    if let Some(ms) = text.strip_suffix("ms") {
        return Duration::from_millis(ms.parse().unwrap_or_else(|_| bad()));
    }
    if let Some((h, m)) = text.split_once('h') {
        let h: u64 = h.parse().unwrap_or_else(|_| bad());
        let m: u64 = m.trim_end_matches('m').parse().unwrap_or_else(|_| bad());
        return Duration::from_secs(h * 3600 + m * 60);
    }
    if let Some((m, s)) = text.split_once('m') {
        let m: u64 = m.parse().unwrap_or_else(|_| bad());
        let s: u64 = s.trim_end_matches('s').parse().unwrap_or_else(|_| bad());
        return Duration::from_secs(m * 60 + s);
    }
    let secs: f64 = text
        .strip_suffix('s')
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| bad() as f64);
    Duration::from_secs_f64(secs)
}

/// The summary's `lock_wait`, from the line and from `--summary-json`'s `lock_wait_ms` (the
/// smaller of the two, so both must show the wait).
fn lock_wait_of(f: &Finished, summary_json: &Path) -> Duration {
    let line = parse_human(
        f.summary_field("lock_wait")
            .unwrap_or_else(|| panic!("no lock_wait in the summary\n{f}")),
    );
    let json: Value = serde_json::from_slice(&fs::read(summary_json).unwrap_or_default())
        .unwrap_or_else(|e| panic!("summary JSON {}: {e}\n{f}", summary_json.display()));
    let ms = json["lock_wait_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("no lock_wait_ms in {json}"));
    line.min(Duration::from_millis(ms))
}

/// Index of the first stderr line containing every one of `parts`.
fn line_index(f: &Finished, parts: &[&str]) -> Option<usize> {
    f.stderr
        .lines()
        .position(|l| parts.iter().all(|p| l.contains(p)))
}

/// A holder run ([`start_held_run`]: its command waits for `release`) whose teardown appends
/// `td <name> $TETHER_REASON` to `log`. Returned once it holds the app.
fn start_holder(
    sb: &Sandbox,
    app: &str,
    id: &str,
    name: &str,
    release: &Path,
    log: &Path,
    extra: &[&str],
) -> RunningTether {
    let teardown = format!(r#"echo "td {name} $TETHER_REASON" >> {}"#, shell_quote(log));
    start_held_run(sb, app, id, release, |cmd| {
        cmd.teardown(teardown).args(extra)
    })
    .run
}

/// A command that appends `ran <name>` to `log`.
fn log_command(log: &Path, name: &str) -> [String; 3] {
    [
        "sh".into(),
        "-c".into(),
        format!("echo 'ran {name}' >> {}", shell_quote(log)),
    ]
}

// ---------------------------------------------------------------------------------------------
// 8. --on-busy fail, --lock-timeout

/// CLI-CONTRACT §7, PROTOCOL §12, CLI-CONTRACT §13: with the app held, `--on-busy fail` exits 75 at once and
/// `--lock-timeout 300ms` exits 75 after at least 300 ms; neither runs its command, leaves a
/// run dir, or disturbs the holder; both summaries say `result=cancelled exit=75`.
#[test]
fn busy_app_fails_fast_or_after_the_lock_timeout_with_75() {
    let sb = Sandbox::new();
    let app = "busy.example.org";
    let (release, log) = (sb.mark("release"), sb.mark("log"));
    let holder_id = rid(&sb, "holder");
    let mut holder = start_holder(&sb, app, &holder_id, "holder", &release, &log, &[]);

    let cases: [(&str, &[&str]); 2] = [
        ("fail", &["--on-busy", "fail"]),
        ("timeout", &["--lock-timeout", "300ms"]),
    ];
    for (name, args) in cases {
        let id = rid(&sb, name);
        let t0 = Instant::now();
        let f = sb
            .tether_run()
            .app(app)
            .run_id(&id)
            .args(args)
            .command(log_command(&log, name))
            .timeout(Duration::from_secs(20))
            .run();
        let took = t0.elapsed();
        f.assert_code(75)
            .assert_stderr_contains(&format!("held by run {holder_id} "));
        if name == "fail" {
            assert!(
                took < Duration::from_secs(3),
                "--on-busy fail took {took:?}\n{f}"
            );
        } else {
            assert!(
                took >= Duration::from_millis(300),
                "--lock-timeout 300ms gave up after {took:?}\n{f}"
            );
        }
        assert_eq!(f.summary_field("result"), Some("cancelled"), "{f}");
        assert_eq!(f.summary_field("exit"), Some("75"), "{f}");
        assert_eq!(f.summary_field("teardown"), Some("none"), "{f}");
        assert_eq!(count_lines(&log, &format!("ran {name}")), 0, "{f}");
        assert!(!sb.run_dir(&id).exists(), "{name}: run dir left\n{f}");
    }
    assert!(holder.is_running(), "the holder was left alone");
    touch(&release);
    holder.wait_exit(TIMEOUT).assert_code(0);
    assert_eq!(log_lines(&log), ["td holder exited"]);
}

// ---------------------------------------------------------------------------------------------
// 9. cancel-older

/// PROTOCOL §12: `--on-busy cancel-older` with the holder's `--group`: the holder gets SIGTERM,
/// tears down once (reason `signal`) and exits 143; the newer run says whom it cancels, then
/// `acquired after`, and runs only after the holder's teardown.
#[test]
fn cancel_older_terminates_the_holder_of_the_same_group() {
    let sb = Sandbox::new();
    let app = "cancel.example.org";
    let (never, log) = (sb.mark("never"), sb.mark("log"));
    let (a, b) = (rid(&sb, "a"), rid(&sb, "b"));
    let mut ra = start_holder(&sb, app, &a, "A", &never, &log, &["--group", "g1"]);

    let mut rb = sb
        .tether_run()
        .app(app)
        .run_id(&b)
        .args(["--group", "g1", "--on-busy", "cancel-older"])
        .teardown(format!(
            r#"echo "td B $TETHER_REASON" >> {}"#,
            shell_quote(&log)
        ))
        .command(log_command(&log, "B"))
        .spawn();
    let fa = ra.wait_exit(TIMEOUT);
    fa.assert_code(143)
        .assert_stderr_contains("tether: received SIGTERM — tearing down");
    assert_eq!(fa.summary_field("result"), Some("cancelled"), "{fa}");
    let fb = rb.wait_exit(TIMEOUT);
    fb.assert_code(0);
    let cancelling = line_index(
        &fb,
        &[&format!("tether: cancelling older run {a} of group g1")],
    )
    .unwrap_or_else(|| panic!("no cancelling line\n{fb}"));
    let acquired = line_index(&fb, &[&format!("tether: app lock {app}: acquired after ")])
        .unwrap_or_else(|| panic!("no acquired line\n{fb}"));
    assert!(cancelling < acquired, "cancelling before acquired\n{fb}");
    assert_eq!(
        log_lines(&log),
        ["td A signal", "ran B", "td B exited"],
        "A tore down once, before B ran\nA: {fa}\nB: {fb}"
    );
}

/// PROTOCOL §12: a holder of another group is never signalled: the cancel-older run waits (proven
/// blocked in `flock`, and proven to have re-examined the holder several times), the holder
/// runs on, and once its command is released the waiter takes over.
#[test]
fn cancel_older_never_signals_a_holder_of_another_group() {
    let sb = Sandbox::new();
    let app = "groups.example.org";
    let (release, log) = (sb.mark("release"), sb.mark("log"));
    let (a2, b) = (rid(&sb, "a2"), rid(&sb, "b"));
    let mut ra = start_holder(&sb, app, &a2, "A2", &release, &log, &["--group", "g2"]);

    let mut rb = sb
        .tether_run()
        .app(app)
        .run_id(&b)
        .args(["--group", "g1", "--on-busy", "cancel-older"])
        .env("TETHER_WAIT_PROGRESS_INTERVAL", "100ms")
        .command(log_command(&log, "B"))
        .spawn();
    wait_app_waiters(&sb, app, 1, TIMEOUT);
    // Four waiting lines, 100 ms apart after the first: B re-examined the holder (it does so
    // every 200 ms) at least once meanwhile, and still left it alone.
    rb.wait_count(&format!("held by run {a2} "), 4, TIMEOUT);
    assert!(ra.is_running(), "the holder of g2 is still running");
    assert!(
        log_lines(&log).is_empty(),
        "nothing tore down or ran: {:?}",
        log_lines(&log)
    );
    assert!(
        !rb.stderr().contains("cancelling"),
        "B tried to cancel another group's run\n{}",
        rb.stderr()
    );

    touch(&release);
    let fa = ra.wait_exit(TIMEOUT);
    fa.assert_code(0);
    let fb = rb.wait_exit(TIMEOUT);
    fb.assert_code(0).assert_stderr_lacks("cancelling");
    assert_eq!(
        log_lines(&log),
        ["td A2 exited", "ran B"],
        "A: {fa}\nB: {fb}"
    );
}

/// Issue 18: `--on-busy cancel-older` with no group (no `--group`, no CI run detected) cannot
/// cancel anything; it says why, once, instead of waiting silently, and leaves the holder alone.
#[test]
fn cancel_older_without_a_group_says_why_once() {
    let sb = Sandbox::new();
    let app = "nogroup.example.org";
    let (release, log) = (sb.mark("release"), sb.mark("log"));
    let (a, b) = (rid(&sb, "a"), rid(&sb, "b"));
    let mut ra = start_holder(&sb, app, &a, "A", &release, &log, &[]);

    let mut rb = sb
        .tether_run()
        .app(app)
        .run_id(&b)
        .args(["--on-busy", "cancel-older"])
        .env("TETHER_WAIT_PROGRESS_INTERVAL", "100ms")
        .command(log_command(&log, "B"))
        .spawn();
    // Four waiting lines: B looked at the holder again and again, and said it once.
    rb.wait_count(&format!("held by run {a} "), 4, TIMEOUT);
    let why = "tether: warning: --on-busy cancel-older: this run has no group";
    assert_eq!(count_lines(&rb.stderr_path, why), 1, "{}", rb.stderr());
    assert!(ra.is_running(), "the holder was left alone");
    // The holder's age comes from a whole-second stamp: it prints as `0s`, never `0ms`.
    let stderr = rb.stderr();
    let held: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("held by run"))
        .collect();
    assert!(
        held.iter()
            .all(|l| !l.contains("ms) —") && l.contains("s) —")),
        "holder ages in whole seconds: {held:#?}"
    );

    touch(&release);
    ra.wait_exit(TIMEOUT).assert_code(0);
    let fb = rb.wait_exit(TIMEOUT);
    fb.assert_code(0).assert_stderr_lacks("cancelling");
    assert_eq!(fb.stderr_lines(why).len(), 1, "{fb}");
    assert_eq!(log_lines(&log), ["td A exited", "ran B"], "{fb}");
}

/// PROTOCOL §12: the default group comes from the CI environment (repo + PR): a second Drone build
/// of the same PR cancels the first without any `--group`.
#[test]
fn cancel_older_default_group_comes_from_the_ci_environment() {
    let sb = Sandbox::new();
    let app = "pr7.example.org";
    let repo = format!("org/app-{}", suffix(&sb));
    let (never, log) = (sb.mark("never"), sb.mark("log"));
    let drone = |build: &str| {
        sb.tether_run()
            .env("DRONE", "true")
            .env("DRONE_REPO", &repo)
            .env("DRONE_PULL_REQUEST", "7")
            .env("DRONE_BUILD_NUMBER", build)
    };

    let started = sb.mark("first.started");
    let script = format!(
        "touch {}; {}",
        shell_quote(&started),
        sh_wait_for(&shell_quote(&never))
    );
    let first = drone("1")
        .app(app)
        .teardown(format!(
            r#"echo "td first $TETHER_REASON" >> {}"#,
            shell_quote(&log)
        ))
        .command(["sh", "-c", &script]);
    let mut r1 = first.spawn();
    wait_file(&started, TIMEOUT);
    let runs = run_dirs(&sb.runs_dir());
    assert_eq!(runs.len(), 1, "{runs:?}");
    let first_id = runs[0].clone();
    wait_holder_pid(&sb, app, &first_id);

    let mut r2 = drone("2")
        .app(app)
        .args(["--on-busy", "cancel-older"])
        .command(log_command(&log, "second"))
        .spawn();
    let f1 = r1.wait_exit(TIMEOUT);
    f1.assert_code(143);
    let f2 = r2.wait_exit(TIMEOUT);
    f2.assert_code(0).assert_stderr_contains(&format!(
        "tether: cancelling older run {first_id} of group {repo}#pr-7"
    ));
    assert_eq!(log_lines(&log), ["td first signal", "ran second"], "{f2}");
}

// ---------------------------------------------------------------------------------------------
// 10. deadline during the lock wait

/// CLI-CONTRACT §7, CLI-CONTRACT §6: the deadline passing while a run waits for the app lock ends it with 142:
/// its command never runs, its run dir is removed, and the holder is untouched (still
/// running, still the lock's holder, no teardown of the app by the waiter).
#[test]
fn deadline_during_the_lock_wait_exits_142_and_leaves_the_holder_alone() {
    let sb = Sandbox::new();
    let app = "deadline-wait.example.org";
    let (release, log) = (sb.mark("release"), sb.mark("log"));
    let (a, b) = (rid(&sb, "a"), rid(&sb, "b"));
    let mut ra = start_holder(&sb, app, &a, "A", &release, &log, &[]);

    let t0 = Instant::now();
    let mut rb = sb
        .tether_run()
        .app(app)
        .run_id(&b)
        .args(["--deadline", "1s"])
        .teardown(format!(
            r#"echo "td B $TETHER_REASON" >> {}"#,
            shell_quote(&log)
        ))
        .command(log_command(&log, "B"))
        .spawn();
    // Its waiting line, not its entry in /proc/locks: the wait lasts only until the deadline,
    // and a poll of the lock table can miss a window that short on a loaded machine (the line
    // stays, and is found after B's exit too).
    rb.wait_line("— waiting", TIMEOUT);
    let fb = rb.wait_exit(TIMEOUT);
    let took = t0.elapsed();
    fb.assert_code(142)
        .assert_stderr_contains("tether: deadline 1s reached — tearing down");
    assert!(
        took >= Duration::from_secs(1),
        "gave up after {took:?}\n{fb}"
    );
    assert_eq!(fb.summary_field("result"), Some("deadline"), "{fb}");
    assert!(!sb.run_dir(&b).exists(), "B's run dir was removed\n{fb}");
    assert!(
        log_lines(&log).is_empty(),
        "B neither ran its command nor tore down A's app: {:?}\n{fb}",
        log_lines(&log)
    );

    assert!(ra.is_running(), "A is unaffected");
    assert_eq!(
        sb.lock_metadata(app).map(|m| m["run_id"].clone()),
        Some(Value::from(a.clone())),
        "A still holds the app"
    );
    assert!(sb.run_dir(&a).exists());
    touch(&release);
    ra.wait_exit(TIMEOUT).assert_code(0);
    assert_eq!(log_lines(&log), ["td A exited"]);
}

/// A run of `app` that waits for the lock held by a holder of the test (the holder's command
/// waits for `release`) until it gives up by `args`; returns its outcome and its summary JSON.
fn waiter_that_gives_up(sb: &Sandbox, app: &str, args: &[&str]) -> (Finished, PathBuf) {
    let (release, log) = (sb.fresh_mark("release"), sb.fresh_mark("log"));
    let mut holder = start_holder(sb, app, &rid(sb, "holder"), "holder", &release, &log, &[]);
    let summary_json = sb.fresh_mark("summary.json");
    let mut waiter = sb
        .tether_run()
        .app(app)
        .run_id(rid(sb, "waiter"))
        .args(args)
        .teardown(format!(
            r#"echo "td waiter $TETHER_REASON" >> {}"#,
            shell_quote(&log)
        ))
        .arg("--summary-json")
        .arg(&summary_json)
        .command(log_command(&log, "waiter"))
        .spawn();
    // Its waiting line, not its entry in /proc/locks: a 300 ms wait is a window a poll of the
    // lock table can miss on a loaded machine (the line stays, and is found after the exit too).
    waiter.wait_line("— waiting", TIMEOUT);
    let f = waiter.wait_exit(TIMEOUT);
    assert_eq!(
        log_lines(&log),
        Vec::<String>::new(),
        "the waiter did nothing\n{f}"
    );
    touch(&release);
    holder.wait_exit(TIMEOUT).assert_code(0);
    (f, summary_json)
}

/// CLI-CONTRACT §13: the summary's `lock_wait` (line and JSON) is the time spent waiting for the lock,
/// also when the wait ended with `--lock-timeout`.
#[test]
fn summary_reports_the_lock_wait_of_a_lock_timeout() {
    let sb = Sandbox::new();
    let (f, summary_json) = waiter_that_gives_up(
        &sb,
        "wait-timeout.example.org",
        &["--lock-timeout", "300ms"],
    );
    f.assert_code(75);
    let waited = lock_wait_of(&f, &summary_json);
    assert!(
        waited >= Duration::from_millis(300),
        "lock_wait {waited:?} after a 300 ms lock timeout\n{f}"
    );
}

/// CLI-CONTRACT §13: the summary's `lock_wait` is the time spent waiting for the lock, also when the
/// deadline ended the wait.
#[test]
fn summary_reports_the_lock_wait_of_a_deadline_during_the_wait() {
    let sb = Sandbox::new();
    let (f, summary_json) =
        waiter_that_gives_up(&sb, "wait-deadline.example.org", &["--deadline", "1s"]);
    f.assert_code(142);
    let waited = lock_wait_of(&f, &summary_json);
    assert!(
        waited >= Duration::from_millis(500),
        "lock_wait {waited:?} after waiting for the lock until the 1 s deadline\n{f}"
    );
}

/// CLI-CONTRACT §13: `teardown=ok|failed|none` says what became of the teardown command: a run that
/// never took the app (deadline during the lock wait) never runs its teardown, so its summary
/// says `teardown=none`, not `ok` (a PR-comment bot must not read "torn down fine").
#[test]
fn summary_of_a_run_that_never_took_the_app_claims_no_teardown() {
    let sb = Sandbox::new();
    let (f, summary_json) =
        waiter_that_gives_up(&sb, "no-teardown.example.org", &["--deadline", "1s"]);
    f.assert_code(142);
    assert_eq!(f.summary_field("teardown"), Some("none"), "{f}");
    let json: Value =
        serde_json::from_slice(&fs::read(&summary_json).unwrap_or_default()).expect("summary JSON");
    assert_eq!(json["teardown"], "none", "{json}");
}

// ---------------------------------------------------------------------------------------------
// 11. reporting

/// One HTTP request as the test server read it.
#[derive(Debug, Clone)]
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Whether the probe file existed when the connection was accepted.
    probe_existed: bool,
    accepted_at: Instant,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "request body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

#[derive(Debug, Clone, Copy)]
enum Answer {
    Status(u16),
    /// Read the request, never answer, keep the socket open.
    Never,
}

/// A real HTTP/1.1 server on 127.0.0.1 (port 0) that records each request and answers with a
/// fixed status (or never). Stopped when dropped.
struct Server {
    port: u16,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(answer: Answer, probe: Option<PathBuf>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        let port = listener.local_addr().expect("local addr").port();
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (reqs, stopping) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut held: Vec<TcpStream> = Vec::new();
            while !stopping.load(Ordering::Relaxed) {
                let stream = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5)); // accept poll step
                        continue;
                    }
                    Err(_) => continue,
                };
                let accepted_at = Instant::now();
                let probe_existed = probe.as_ref().is_some_and(|p| p.exists());
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut stream = stream;
                let Some((method, path, headers, body)) = read_request(&mut stream) else {
                    continue;
                };
                reqs.lock().unwrap().push(Request {
                    method,
                    path,
                    headers,
                    body,
                    probe_existed,
                    accepted_at,
                });
                match answer {
                    Answer::Status(code) => {
                        let reply = format!(
                            "HTTP/1.1 {code} Test\r\nContent-Type: application/json\r\n\
                             Content-Length: 2\r\nConnection: close\r\n\r\n{{}}"
                        );
                        let _ = stream.write_all(reply.as_bytes());
                        let _ = stream.flush();
                    }
                    Answer::Never => held.push(stream),
                }
            }
        });
        Server {
            port,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one HTTP/1.1 request (Content-Length or chunked body).
#[allow(clippy::type_complexity)]
fn read_request(
    stream: &mut TcpStream,
) -> Option<(String, String, Vec<(String, String)>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut rest = buf[head_end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split_whitespace();
    let method = first.next()?.to_owned();
    let path = first.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let body = if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        while rest.len() < len {
            let n = stream.read(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            rest.extend_from_slice(&chunk[..n]);
        }
        rest.truncate(len);
        rest
    } else if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        while !rest.windows(5).any(|w| w == b"0\r\n\r\n") {
            let n = stream.read(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            rest.extend_from_slice(&chunk[..n]);
        }
        let mut body = Vec::new();
        let mut data = &rest[..];
        loop {
            let eol = data.windows(2).position(|w| w == b"\r\n")?;
            let size_text = String::from_utf8_lossy(&data[..eol]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            data = &data[eol + 2..];
            if size == 0 {
                break;
            }
            body.extend_from_slice(data.get(..size)?);
            data = data.get(size + 2..)?;
        }
        body
    } else {
        Vec::new()
    };
    Some((method, path, headers, body))
}

/// The Drone environment of PR 7 of org/app, build 5.
fn drone_pr7(cmd: TetherCmd<'_>) -> TetherCmd<'_> {
    cmd.env("DRONE", "true")
        .env("DRONE_REPO", "org/app")
        .env("DRONE_PULL_REQUEST", "7")
        .env("DRONE_BUILD_NUMBER", "5")
}

/// CLI-CONTRACT §14, CLI-CONTRACT: after teardown, a Gitea PR comment goes to
/// `/api/v1/repos/org/app/issues/7/comments` with `Authorization: token T` and a markdown body
/// naming the run id and result; the webhook gets the summary JSON.
#[test]
fn report_posts_a_gitea_comment_and_the_webhook_summary() {
    let sb = Sandbox::new();
    let td = sb.mark("teardown.done");
    let server = Server::start(Answer::Status(201), Some(td.clone()));
    let cfg = write_config(
        &sb,
        "report.yml",
        &format!(
            "report:\n  webhook: \"{url}/hook\"\n  comment:\n    api: gitea\n    url: \"{url}\"\n    token_env: FORGE_TOKEN\n",
            url = server.url()
        ),
    );
    let id = rid(&sb, "gitea");
    let f = drone_pr7(sb.tether_run())
        .app("report.example.org")
        .run_id(&id)
        .env("FORGE_TOKEN", "t0ken")
        .teardown(format!("touch {}", shell_quote(&td)))
        .arg("--config")
        .arg(&cfg)
        .command(["true"])
        .run();
    f.assert_code(0).assert_stderr_lacks("warning");
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2, "one comment, one webhook: {reqs:#?}\n{f}");

    let comment = &reqs[0];
    assert_eq!(comment.method, "POST");
    assert_eq!(comment.path, "/api/v1/repos/org/app/issues/7/comments");
    assert_eq!(comment.header("authorization"), Some("token t0ken"));
    let body = comment.json();
    let text = body["body"].as_str().expect("a \"body\" string");
    assert!(text.contains(&id) && text.contains("passed"), "{text}");
    assert!(comment.probe_existed, "the teardown ran before the report");

    let hook = &reqs[1];
    assert_eq!(hook.method, "POST");
    assert_eq!(hook.path, "/hook");
    assert_eq!(
        hook.header("authorization"),
        None,
        "no token to the webhook"
    );
    let summary = hook.json();
    assert_eq!(summary["run_id"], id.as_str());
    assert_eq!(summary["app"], "report.example.org");
    assert_eq!(summary["result"], "passed");
    assert_eq!(summary["exit"], 0);
    assert_eq!(summary["ci"]["pr"], "7");
}

/// CLI-CONTRACT §14: the GitHub API variant: `/repos/org/app/issues/7/comments` with a Bearer token.
#[test]
fn report_posts_a_github_comment_with_a_bearer_token() {
    let sb = Sandbox::new();
    let server = Server::start(Answer::Status(201), None);
    let cfg = write_config(
        &sb,
        "report.yml",
        &format!(
            "report:\n  comment:\n    api: github\n    url: \"{}\"\n    token_env: GH_TOKEN\n",
            server.url()
        ),
    );
    let id = rid(&sb, "github");
    let f = sb
        .tether_run()
        .app("report-gh.example.org")
        .run_id(&id)
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_REPOSITORY", "org/app")
        .env("GITHUB_REF", "refs/pull/7/merge")
        .env("GITHUB_RUN_ID", "5")
        .env("GH_TOKEN", "ghs_x")
        .arg("--config")
        .arg(&cfg)
        .command(["sh", "-c", "exit 3"])
        .run();
    f.assert_code(3).assert_stderr_lacks("warning");
    let reqs = server.requests();
    assert_eq!(reqs.len(), 1, "{reqs:#?}\n{f}");
    assert_eq!(reqs[0].path, "/repos/org/app/issues/7/comments");
    assert_eq!(reqs[0].header("authorization"), Some("Bearer ghs_x"));
    let body = reqs[0].json();
    let text = body["body"].as_str().expect("a \"body\" string");
    assert!(text.contains(&id) && text.contains("failed"), "{text}");
}

/// CLI-CONTRACT §14, CLI-CONTRACT: a server that always answers 500 gets exactly 1 + `retries`
/// attempts per target; each failed target is one warning line; the exit code stays the
/// command's.
#[test]
fn report_retries_a_failing_server_then_warns_without_changing_the_exit_code() {
    let sb = Sandbox::new();
    let server = Server::start(Answer::Status(500), None);
    let cfg = write_config(
        &sb,
        "report.yml",
        &format!(
            "report:\n  retries: 2\n  timeout: 8s\n  webhook: \"{url}/hook\"\n  comment:\n    api: gitea\n    url: \"{url}\"\n    token_env: FORGE_TOKEN\n",
            url = server.url()
        ),
    );
    let f = drone_pr7(sb.tether_run())
        .app("report-500.example.org")
        .run_id(rid(&sb, "r500"))
        .env("FORGE_TOKEN", "t0ken")
        .arg("--config")
        .arg(&cfg)
        .command(["sh", "-c", "exit 3"])
        .run();
    f.assert_code(3);
    assert_eq!(f.summary_field("exit"), Some("3"), "{f}");
    let reqs = server.requests();
    let comments = reqs
        .iter()
        .filter(|r| r.path.ends_with("/comments"))
        .count();
    let hooks = reqs.iter().filter(|r| r.path == "/hook").count();
    assert_eq!(
        (comments, hooks),
        (3, 3),
        "1 + 2 retries each: {reqs:#?}\n{f}"
    );
    let warnings = f.stderr_lines("tether: warning: ");
    assert_eq!(warnings.len(), 2, "{f}");
    assert!(warnings
        .iter()
        .any(|w| w.starts_with("tether: warning: PR comment not posted: ")));
    assert!(warnings.iter().any(|w| w.starts_with(&format!(
        "tether: warning: webhook {}/hook not notified: ",
        server.url()
    ))));
}

/// CLI-CONTRACT §14: a server that never answers cannot hang tether: with `report.timeout: 1s` it
/// exits within a few seconds, with one warning and the command's exit code, and the teardown
/// had already run when the report was attempted.
#[test]
fn report_to_a_server_that_never_answers_is_bounded_by_the_timeout() {
    let sb = Sandbox::new();
    let td = sb.mark("teardown.done");
    let server = Server::start(Answer::Never, Some(td.clone()));
    let cfg = write_config(
        &sb,
        "report.yml",
        &format!(
            "report:\n  timeout: 1s\n  webhook: \"{}/hook\"\n",
            server.url()
        ),
    );
    let t0 = Instant::now();
    let f = sb
        .tether_run()
        .app("report-hang.example.org")
        .run_id(rid(&sb, "hang"))
        .teardown(format!("touch {}", shell_quote(&td)))
        .arg("--config")
        .arg(&cfg)
        .command(["sh", "-c", "exit 4"])
        .timeout(Duration::from_secs(30))
        .run();
    let took = t0.elapsed();
    f.assert_code(4);
    assert!(took < Duration::from_secs(6), "tether took {took:?}\n{f}");
    let reqs = server.requests();
    assert!(!reqs.is_empty(), "the webhook was attempted\n{f}");
    assert!(
        reqs.iter().all(|r| r.probe_existed),
        "the teardown ran before the report"
    );
    // From the first connection to tether's exit: the 1 s budget, plus a little.
    let report_to_exit = reqs[0].accepted_at.elapsed();
    assert!(
        report_to_exit < Duration::from_secs(4),
        "tether hung {report_to_exit:?} on the report\n{f}"
    );
    let warnings = f.stderr_lines("tether: warning: ");
    assert_eq!(warnings.len(), 1, "{f}");
    assert!(
        warnings[0].starts_with(&format!(
            "tether: warning: webhook {}/hook not notified: ",
            server.url()
        )),
        "{f}"
    );
    assert_eq!(f.summary_field("exit"), Some("4"), "{f}");
}

// ---------------------------------------------------------------------------------------------
// 12. CI detection end to end

/// One CI system's variables and what tether must make of them.
struct Ci<'a> {
    system: &'a str,
    vars: Vec<(&'a str, String)>,
    repo: String,
    pr: &'a str,
}

/// CLI-CONTRACT §9: with a CI system's variables and no `--run-id`, the run id (run dir name and
/// summary) contains the build number 267 and the repo slug; `run.json` records `ci` with the
/// system, repo and PR; `--summary-json` carries the same `ci` object, which is returned.
fn ci_detected_end_to_end(make: impl FnOnce(&str) -> Ci<'static>) -> Value {
    let sb = Sandbox::new();
    let sfx = suffix(&sb);
    let ci = make(&sfx);
    let summary_json = sb.mark("summary.json");
    let mut cmd = sb
        .tether_run()
        .app(format!("ci-{}.example.org", ci.system))
        .arg("--keep-run-dir")
        .arg("--summary-json")
        .arg(&summary_json)
        .command(["true"]);
    for (k, v) in &ci.vars {
        cmd = cmd.env(k, v);
    }
    let f = cmd.run();
    f.assert_code(0);

    let runs = run_dirs(&sb.runs_dir());
    assert_eq!(runs.len(), 1, "one kept run dir: {runs:?}\n{f}");
    let id = &runs[0];
    let slug = ci.repo.replace('/', "-");
    assert!(
        id.contains("267") && id.contains(&slug) && id.starts_with(ci.system),
        "run id {id:?} carries the system, build 267 and the repo slug {slug:?}"
    );
    assert!(
        f.summary()
            .is_some_and(|s| s.starts_with(&format!("tether: run {id} summary: "))),
        "{f}"
    );

    let record = sb.run_record(id).expect("run.json of the kept run dir");
    let rec_ci = &record["ci"];
    assert_eq!(rec_ci["system"], ci.system, "{record:#}");
    assert_eq!(rec_ci["repo"], ci.repo.as_str(), "{record:#}");
    assert_eq!(rec_ci["pr"], ci.pr, "{record:#}");
    assert_eq!(rec_ci["build"], "267", "{record:#}");

    let summary: Value = serde_json::from_slice(&fs::read(&summary_json).expect("summary JSON"))
        .expect("summary JSON parses");
    assert_eq!(summary["run_id"], id.as_str());
    assert_eq!(&summary["ci"], rec_ci, "the summary has the same ci object");
    rec_ci.clone()
}

#[test]
fn drone_is_detected_end_to_end() {
    ci_detected_end_to_end(|sfx| {
        let repo = format!("org/app-{sfx}");
        Ci {
            system: "drone",
            vars: vec![
                ("DRONE", "true".into()),
                ("DRONE_REPO", repo.clone()),
                ("DRONE_BUILD_NUMBER", "267".into()),
                ("DRONE_STAGE_NUMBER", "1".into()),
                ("DRONE_STEP_NUMBER", "3".into()),
                ("DRONE_PULL_REQUEST", "7".into()),
                ("DRONE_COMMIT_SHA", "abc123".into()),
            ],
            repo,
            pr: "7",
        }
    });
}

#[test]
fn woodpecker_is_detected_end_to_end() {
    ci_detected_end_to_end(|sfx| {
        let repo = format!("org/app-{sfx}");
        Ci {
            system: "woodpecker",
            vars: vec![
                ("CI", "woodpecker".into()),
                ("CI_REPO", repo.clone()),
                ("CI_PIPELINE_NUMBER", "267".into()),
                ("CI_WORKFLOW_NUMBER", "1".into()),
                ("CI_STEP_NUMBER", "2".into()),
                ("CI_COMMIT_PULL_REQUEST", "8".into()),
            ],
            repo,
            pr: "8",
        }
    });
}

#[test]
fn github_actions_is_detected_end_to_end() {
    ci_detected_end_to_end(|sfx| {
        let repo = format!("org/app-{sfx}");
        Ci {
            system: "github",
            vars: vec![
                ("GITHUB_ACTIONS", "true".into()),
                ("GITHUB_REPOSITORY", repo.clone()),
                ("GITHUB_RUN_ID", "267".into()),
                ("GITHUB_RUN_ATTEMPT", "1".into()),
                ("GITHUB_JOB", "test".into()),
                ("GITHUB_REF", "refs/pull/9/merge".into()),
            ],
            repo,
            pr: "9",
        }
    });
}

#[test]
fn gitlab_ci_is_detected_end_to_end() {
    ci_detected_end_to_end(|sfx| {
        let repo = format!("group/sub/app-{sfx}");
        Ci {
            system: "gitlab",
            vars: vec![
                ("GITLAB_CI", "true".into()),
                ("CI_PROJECT_PATH", repo.clone()),
                ("CI_PIPELINE_ID", "267".into()),
                ("CI_JOB_ID", "4242".into()),
                ("CI_MERGE_REQUEST_IID", "11".into()),
            ],
            repo,
            pr: "11",
        }
    });
}

/// A Forgejo runner sets its own marker, Gitea's and GitHub's: the run is Forgejo's, and its
/// link points at the Forgejo server, by run number.
#[test]
fn forgejo_actions_is_detected_end_to_end() {
    let ci = ci_detected_end_to_end(|sfx| {
        let repo = format!("org/app-{sfx}");
        Ci {
            system: "forgejo",
            vars: vec![
                ("FORGEJO_ACTIONS", "true".into()),
                ("GITEA_ACTIONS", "true".into()),
                ("GITHUB_ACTIONS", "true".into()),
                ("GITHUB_SERVER_URL", "https://code.example.org".into()),
                ("GITHUB_REPOSITORY", repo.clone()),
                ("GITHUB_RUN_ID", "267".into()),
                ("GITHUB_RUN_NUMBER", "31".into()),
                ("GITHUB_RUN_ATTEMPT", "1".into()),
                ("GITHUB_JOB", "test".into()),
                ("GITHUB_REF", "refs/pull/10/head".into()),
            ],
            repo,
            pr: "10",
        }
    });
    let link = ci["link"].as_str().unwrap_or_default();
    assert!(
        link.starts_with("https://code.example.org/org/app-") && link.ends_with("/actions/runs/31"),
        "{ci:#}"
    );
}

#[test]
fn gitea_actions_is_detected_end_to_end() {
    ci_detected_end_to_end(|sfx| {
        let repo = format!("org/app-{sfx}");
        Ci {
            system: "gitea",
            vars: vec![
                ("GITEA_ACTIONS", "true".into()),
                ("GITHUB_ACTIONS", "true".into()),
                ("GITHUB_REPOSITORY", repo.clone()),
                ("GITHUB_RUN_ID", "267".into()),
                ("GITHUB_JOB", "test".into()),
                ("GITHUB_REF", "refs/pull/12/head".into()),
            ],
            repo,
            pr: "12",
        }
    });
}

#[test]
fn buildkite_is_detected_end_to_end() {
    ci_detected_end_to_end(|sfx| Ci {
        system: "buildkite",
        vars: vec![
            ("BUILDKITE", "true".into()),
            ("BUILDKITE_ORGANIZATION_SLUG", "org".into()),
            ("BUILDKITE_PIPELINE_SLUG", format!("app-{sfx}")),
            ("BUILDKITE_BUILD_NUMBER", "267".into()),
            (
                "BUILDKITE_JOB_ID",
                "0190f3c2-5d8e-4a7b-9c1d-2e3f4a5b6c7d".into(),
            ),
            ("BUILDKITE_PULL_REQUEST", "13".into()),
        ],
        repo: format!("org/app-{sfx}"),
        pr: "13",
    });
}

#[test]
fn jenkins_is_detected_end_to_end() {
    ci_detected_end_to_end(|sfx| {
        let repo = format!("org/app-{sfx}");
        Ci {
            system: "jenkins",
            vars: vec![
                ("BUILD_TAG", format!("jenkins-org-app-{sfx}-267")),
                ("JOB_NAME", repo.clone()),
                ("BUILD_NUMBER", "267".into()),
                ("STAGE_NAME", "e2e".into()),
                ("CHANGE_ID", "14".into()),
            ],
            repo,
            pr: "14",
        }
    });
}
