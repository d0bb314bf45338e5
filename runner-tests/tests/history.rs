//! The run journal and `tether history` (issue 17, item 5) against the real kernel.
//!
//! Sixteen real `tether run`s end together (their commands all wait for one marker file the
//! test creates) and append to the journal at once; the journal is read back byte for byte.
//! With a small rotation bound the appends race the rotation too. The text and JSON views are
//! pinned with insta on a journal written by the test, so every figure is known.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use runner_tests::{rid, sh_wait_for, shell_quote, touch, RunningTether, Sandbox, TIMEOUT};
use serde_json::Value;

/// Every line of both generations, parsed; panics on a line that is not a whole JSON object.
fn journal_lines(runs: &Path) -> Vec<Value> {
    let mut lines = Vec::new();
    for name in [".history.jsonl.1", ".history.jsonl"] {
        let Ok(text) = fs::read_to_string(runs.join(name)) else {
            continue;
        };
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "{name} ends mid-line: {text:?}"
        );
        for line in text.lines() {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("torn or mixed line in {name}: {e}: {line:?}"));
            lines.push(v);
        }
    }
    lines
}

/// `n` runs of `n` apps whose commands all end when `go` appears.
fn sixteen_runs_ending_together(sb: &Sandbox, n: usize, env: &[(&str, &str)]) -> Vec<String> {
    let go = sb.mark("go");
    let started = sb.mark("started");
    let script = format!(
        "echo x >> {}; {}",
        shell_quote(&started),
        sh_wait_for(&shell_quote(&go))
    );
    let ids: Vec<String> = (0..n).map(|i| rid(sb, &format!("h{i}"))).collect();
    let mut runs: Vec<RunningTether> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut cmd = sb
                .tether_run()
                .app(format!("hist-{i}.example.org"))
                .run_id(id)
                .command(["sh", "-c", &script]);
            for (k, v) in env {
                cmd = cmd.env(k, v);
            }
            cmd.spawn()
        })
        .collect();
    runner_tests::wait_until("every command started", TIMEOUT, || {
        fs::read_to_string(&started).is_ok_and(|t| t.lines().count() == n)
    });
    touch(&go);
    for r in &mut runs {
        r.wait_exit(TIMEOUT).assert_code(0);
    }
    ids
}

/// Sixteen runs ending at once: sixteen whole lines, one per run, no torn or mixed line.
#[test]
fn sixteen_concurrent_appends_leave_sixteen_whole_lines() {
    let sb = Sandbox::new();
    let ids = sixteen_runs_ending_together(&sb, 16, &[]);
    let lines = journal_lines(&sb.runs_dir());
    let seen: BTreeSet<String> = lines
        .iter()
        .map(|v| v["run_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(lines.len(), 16, "{lines:#?}");
    assert_eq!(seen, ids.into_iter().collect(), "one line per run");
    for v in &lines {
        assert_eq!(v["result"], "passed", "{v}");
        assert!(v["hold_ms"].as_u64().is_some(), "{v}");
    }
}

/// With a bound of ~4 lines the sixteen appends race the rotation: still no torn line, at most
/// two generations, each bounded, no line twice.
#[test]
fn appends_racing_the_rotation_stay_whole_and_bounded() {
    let sb = Sandbox::new();
    let max = 1_600u64;
    let ids: BTreeSet<String> =
        sixteen_runs_ending_together(&sb, 16, &[("TETHER_HISTORY_MAX_BYTES", &max.to_string())])
            .into_iter()
            .collect();
    let runs = sb.runs_dir();
    let lines = journal_lines(&runs);
    let kept: Vec<String> = lines
        .iter()
        .map(|v| v["run_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    let unique: BTreeSet<String> = kept.iter().cloned().collect();
    assert_eq!(unique.len(), kept.len(), "a line twice: {kept:?}");
    assert!(unique.is_subset(&ids), "{unique:?}");
    assert!(
        runs.join(".history.jsonl.1").exists(),
        "16 lines over a 1600-byte bound rotated at least once"
    );
    // A writer that saw the journal below the bound appends without a lock: at most the
    // sixteen lines of this test past the bound.
    let longest = lines
        .iter()
        .map(|v| v.to_string().len() as u64 + 1)
        .max()
        .unwrap_or(0);
    for name in [".history.jsonl", ".history.jsonl.1"] {
        let len = fs::metadata(runs.join(name)).map(|m| m.len()).unwrap_or(0);
        assert!(len < max + 16 * longest, "{name}: {len} bytes");
    }
}

/// `tether history` on a known journal: per-app counts and percentiles, `--app`, `--since`,
/// text and JSON pinned.
#[test]
fn history_shows_runs_and_per_app_figures() {
    let sb = Sandbox::new();
    let runs = sb.runs_dir();
    fs::create_dir_all(&runs).expect("runs dir");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    // Two days ago (outside --since 24h), then three recent runs.
    let entry = |at: u64, id: &str, app: &str, result: &str, wait: u64, hold: u64| {
        serde_json::json!({
            "at": at, "run_id": id, "app": app, "group": "org/app#pr-7", "host": "ci-1",
            "result": result, "exit": if result == "passed" { 0 } else { 1 },
            "reason": "exited", "lock_wait_ms": wait, "runtime_ms": hold, "hold_ms": hold,
            "teardown": "ok", "reaps": 0
        })
        .to_string()
    };
    let journal = [
        entry(
            now - 2 * 86_400,
            "old-1",
            "a.example.org",
            "passed",
            1,
            1_000,
        ),
        entry(now - 300, "r-1", "a.example.org", "passed", 0, 60_000),
        entry(now - 200, "r-2", "a.example.org", "failed", 4_200, 30_000),
        entry(now - 100, "r-3", "b.example.org", "passed", 250, 90_000),
    ]
    .join("\n")
        + "\n";
    fs::write(runs.join(".history.jsonl"), journal).expect("journal");

    let run = |args: &[&str]| {
        let f = sb.tether("history").args(args).run();
        f.assert_code(0);
        f
    };
    let all = run(&["--json"]);
    let doc: Value = serde_json::from_str(&all.stdout).expect("JSON");
    assert_eq!(doc["runs"].as_array().map(Vec::len), Some(4), "{all}");
    let recent = run(&["--json", "--since", "24h"]);
    let doc: Value = serde_json::from_str(&recent.stdout).expect("JSON");
    assert_eq!(doc["runs"].as_array().map(Vec::len), Some(3), "{recent}");
    let a = &doc["apps"][0];
    assert_eq!(
        (a["app"].as_str(), a["runs"].as_u64()),
        (Some("a.example.org"), Some(2))
    );
    assert_eq!(a["lock_wait_ms_p95"], 4_200);
    assert_eq!(a["hold_ms_p50"], 30_000);
    assert_eq!(a["results"]["failed"], 1);
    let only_b = run(&["--json", "--app", "B.example.org"]);
    let doc: Value = serde_json::from_str(&only_b.stdout).expect("JSON");
    assert_eq!(doc["runs"].as_array().map(Vec::len), Some(1), "{only_b}");

    // Text view: timestamps vary with the clock; everything else is pinned.
    let text = run(&["--since", "24h"]).stdout;
    let text: String = text
        .lines()
        .map(|l| match l.find('Z') {
            Some(z) if l.starts_with("  20") => format!("  <time>{}", &l[z + 1..]),
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    insta::assert_snapshot!("history_text", text);
}

/// A bad `--app` is refused naming it; a missing runs dir is an empty history, not an error.
#[test]
fn history_refuses_a_bad_app_and_is_empty_without_a_journal() {
    let sb = Sandbox::new();
    let bad = sb.tether("history").args(["--app", "a b"]).run();
    bad.assert_code(125).assert_stderr_contains("\"a b\"");
    let empty = sb.tether("history").args(["--json"]).run();
    empty.assert_code(0);
    let doc: Value = serde_json::from_str(&empty.stdout).expect("JSON");
    assert_eq!(doc["runs"], serde_json::json!([]), "{empty}");
}
