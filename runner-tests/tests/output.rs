//! CLI-CONTRACT §13 output formats: `--log-format json` (one JSON object per line), `-q` (only warnings,
//! errors and the summary), `-v` (debug lines too), and the summary always last.

use runner_tests::*;
use serde_json::Value;

fn lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| !l.trim().is_empty()).collect()
}

/// Every stderr line is one JSON object with level/event/msg; the last is the summary with the
/// same fields as `--summary-json`.
#[test]
fn json_log_format_is_one_object_per_line() {
    let sb = Sandbox::new();
    let summary = sb.mark("summary.json");
    let f = sb
        .tether_run()
        .app("json.example.org")
        .arg("--log-format")
        .arg("json")
        .arg("--summary-json")
        .arg(summary.to_str().expect("utf-8 path"))
        .command(["sh", "-c", "exit 3"])
        .run();
    f.assert_code(3);
    let objs: Vec<Value> = lines(&f.stderr)
        .iter()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}\n{f}"))
        })
        .collect();
    assert!(!objs.is_empty(), "{f}");
    for o in &objs {
        for key in ["level", "event", "msg"] {
            assert!(o.get(key).is_some(), "line lacks {key}: {o}");
        }
    }
    let last = objs.last().expect("a line");
    assert_eq!(
        last["event"], "summary",
        "the summary is the last line: {f}"
    );
    assert_eq!(last["result"], "failed");
    assert_eq!(last["exit"], 3);
    let file: Value = serde_json::from_slice(&std::fs::read(&summary).expect("summary json"))
        .expect("summary json parses");
    for key in ["run_id", "app", "result", "exit", "teardown", "reason"] {
        assert_eq!(
            last[key], file[key],
            "{key} differs between log and --summary-json"
        );
    }
}

/// `-q` drops informational lines (the waiting/acquired lines of a contended run) but keeps
/// the summary; `-v` adds debug lines; the default shows the waiting line.
#[test]
fn quiet_and_verbose_change_what_is_printed() {
    let sb = Sandbox::new();
    let app = "quiet.example.org";
    let release = sb.mark("release");
    let hold = format!(
        "i=0; while [ ! -e {} ] && [ $i -lt 3000 ]; do sleep 0.01; i=$((i+1)); done",
        shell_quote(&release)
    );
    let mut holder = sb
        .tether_run()
        .app(app)
        .command(["sh", "-c", &hold])
        .spawn();
    wait_file(sb.lock_path(app), TIMEOUT);
    wait_until("the holder to take the lock", TIMEOUT, || {
        !flock_holders(sb.lock_path(app)).is_empty()
    });
    let mut quiet = sb.tether_run().app(app).arg("-q").command(["true"]).spawn();
    runner_tests::wait_app_waiters(&sb, app, 1, TIMEOUT);
    let mut verbose = sb.tether_run().app(app).arg("-v").command(["true"]).spawn();
    runner_tests::wait_app_queue(&sb, app, 2, TIMEOUT);
    std::fs::write(&release, b"").expect("creating the release marker");
    holder.wait_exit(TIMEOUT).assert_code(0);
    let q = quiet.wait_exit(TIMEOUT);
    q.assert_code(0);
    let v = verbose.wait_exit(TIMEOUT);
    v.assert_code(0);

    let ql = lines(&q.stderr);
    assert_eq!(ql.len(), 1, "-q prints only the summary here:\n{q}");
    assert!(ql[0].contains(" summary: "), "{q}");
    assert!(!q.stderr.contains("waiting"), "{q}");

    assert!(v.stderr.contains("— waiting"), "{v}");
    assert!(v.stderr.contains("acquired after"), "{v}");
    assert!(
        v.stderr.contains("tether: started ") || v.stderr.contains("run cgroup"),
        "-v shows debug lines:\n{v}"
    );
    assert!(
        lines(&v.stderr)
            .last()
            .is_some_and(|l| l.contains(" summary: ")),
        "{v}"
    );
}

/// `--summary-json` is replaced atomically (D31): a bot polling the file while runs keep
/// rewriting it only ever reads a whole document — never a missing, empty or torn file, nor one
/// with the tail of a longer predecessor. Runs of different apps finish together here, so
/// writes overlap; summaries differ in length (run ids of different lengths).
#[test]
fn summary_json_is_never_seen_half_written() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const ROUNDS: usize = 10;
    const AT_ONCE: usize = 4;
    let sb = Sandbox::new();
    let path = sb.mark("summary.json");
    let suffix = suffix(&sb);
    let ids: Vec<Vec<String>> = (0..ROUNDS)
        .map(|r| {
            (0..AT_ONCE)
                .map(|k| format!("s{}-{r}-{k}-{suffix}", "x".repeat((r + k) % 7)))
                .collect()
        })
        .collect();
    let all_ids: Vec<&str> = ids.iter().flatten().map(String::as_str).collect();
    let stop = AtomicBool::new(false);
    let (reads, whole, bad) = std::thread::scope(|s| {
        // The reader is a thread; every tether is spawned from the test's own thread (the
        // front's PDEATHSIG follows the thread that started it).
        let reader = s.spawn(|| {
            let (mut reads, mut whole, mut bad) = (0u64, 0u64, Vec::new());
            let mut seen = false;
            while !stop.load(Ordering::Relaxed) {
                reads += 1;
                let text = match std::fs::read(&path) {
                    Ok(t) => t,
                    Err(_) if !seen => continue,
                    Err(e) => {
                        bad.push(format!("missing after it existed: {e}"));
                        continue;
                    }
                };
                seen = true;
                match serde_json::from_slice::<Value>(&text) {
                    Ok(v) if v["run_id"].as_str().is_some_and(|id| all_ids.contains(&id)) => {
                        whole += 1
                    }
                    _ => bad.push(format!("{:?}", String::from_utf8_lossy(&text))),
                }
            }
            (reads, whole, bad)
        });
        for (r, round) in ids.iter().enumerate() {
            let mut runs: Vec<RunningTether> = round
                .iter()
                .enumerate()
                .map(|(k, id)| {
                    sb.tether_run()
                        .app(format!("s{r}-{k}.example.org"))
                        .run_id(id)
                        .arg("-q")
                        .arg("--summary-json")
                        .arg(&path)
                        .command(["true"])
                        .spawn()
                })
                .collect();
            for run in &mut runs {
                run.wait_exit(TIMEOUT).assert_code(0);
            }
        }
        stop.store(true, Ordering::Relaxed);
        reader.join().expect("the reader thread")
    });
    assert!(
        bad.is_empty(),
        "{} of {reads} reads found no whole summary; first ones: {:#?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    assert!(whole > 0, "the reader never saw a summary ({reads} reads)");
    let last = read_json(&path).expect("the final summary parses");
    assert!(
        last["run_id"]
            .as_str()
            .is_some_and(|id| all_ids.contains(&id)),
        "{last}"
    );
    assert_eq!(
        names(&sb.path().join("marks")),
        ["summary.json"],
        "no temporary file is left next to it"
    );
}

/// A `--summary-json` whose directory does not exist is found before the run starts: exit
/// 125, one error line naming the path, and nothing created — no lock, no run dir, not even
/// the state dirs; neither command nor teardown ran.
#[test]
fn summary_json_in_a_missing_dir_is_refused_before_anything_starts() {
    let sb = Sandbox::new();
    let missing = sb.path().join("no-such-dir").join("summary.json");
    let ran = sb.mark("command.ran");
    let torn_down = sb.mark("teardown.ran");
    let attempts = [
        ("sandbox dirs", sb.tether_run()),
        (
            "fresh state dirs",
            sb.tether_run()
                .no_sandbox_dirs()
                .arg("--lock-dir")
                .arg(sb.path().join("state/locks"))
                .arg("--runs-dir")
                .arg(sb.path().join("state/runs")),
        ),
    ];
    for (what, cmd) in attempts {
        let f = cmd
            .app("summary.example.org")
            .teardown(format!(": > {}", shell_quote(&torn_down)))
            .arg("--summary-json")
            .arg(&missing)
            .command(["sh", "-c", &format!(": > {}", shell_quote(&ran))])
            .run();
        f.assert_code(125);
        let errors = f.stderr_lines("tether: error:");
        assert_eq!(
            errors,
            [format!(
                "tether: error: --summary-json {}: directory {} does not exist",
                missing.display(),
                sb.path().join("no-such-dir").display()
            )],
            "{what}: one error naming the path\n{f}"
        );
        assert!(!ran.exists(), "{what}: the command ran\n{f}");
        assert!(!torn_down.exists(), "{what}: a teardown ran\n{f}");
        assert!(names(&sb.lock_dir()).is_empty(), "{what}: {f}");
        assert!(run_dirs(&sb.runs_dir()).is_empty(), "{what}: {f}");
        assert!(
            !sb.path().join("state").exists(),
            "{what}: state dirs made\n{f}"
        );
        assert!(
            !sb.path().join("no-such-dir").exists(),
            "{what}: the summary's dir was made\n{f}"
        );
    }
}
