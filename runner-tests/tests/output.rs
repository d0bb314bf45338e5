//! SPEC §7 output formats: `--log-format json` (one JSON object per line), `-q` (only warnings,
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
    wait_flock_waiters(sb.lock_path(app), 1, TIMEOUT);
    let mut verbose = sb.tether_run().app(app).arg("-v").command(["true"]).spawn();
    wait_flock_waiters(sb.lock_path(app), 2, TIMEOUT);
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
