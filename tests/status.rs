//! `tether status` on the command line over a state built with known values (no lock held, so
//! no pid or age varies): its text and JSON (insta snapshots), a dead holder shown as dead in
//! both, and `-q` / `--log-format` as the other commands have them.

use serde_json::{json, Value};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

/// The state: a dead run (its app's lock free, its metadata and record `running`), a finished
/// app (clean, free), and a `--keep-run-dir` run dir; run ids as Drone and GitHub make them.
fn state(top: &Path) {
    let (locks, runs) = (top.join("locks"), top.join("runs"));
    fs::create_dir(&locks).unwrap();
    fs::create_dir(&runs).unwrap();
    fs::set_permissions(&locks, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&runs, fs::Permissions::from_mode(0o700)).unwrap();
    let meta = |app: &str, id: &str, state: &str| {
        json!({
            "version": 1, "app": app, "run_id": id, "pid": 999_999, "pid_start": 1,
            "host": "ci-host", "started_at": 1_700_000_000u64, "state": state,
            "run_dir": runs.join(id).to_string_lossy(), "cgroup": null, "ci": null, "token": null,
        })
    };
    // An empty config file: the host's own config plays no part.
    fs::write(top.join("config.yaml"), "").unwrap();
    let long = "a-rather-long-review-app-name.staging.eu-west-1.example.org";
    for (app, id, st) in [
        (long, "drone-12345-3", "running"),
        ("idle.example.org", "gh-1234567890-1", "clean"),
    ] {
        fs::write(
            locks.join(format!("app-{app}.lock")),
            meta(app, id, st).to_string(),
        )
        .unwrap();
    }
    for (app, id, st, keep) in [
        (long, "drone-12345-3", "running", false),
        ("idle.example.org", "gh-1234567890-1", "clean", true),
    ] {
        let dir = runs.join(id);
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        fs::write(dir.join("run.lock"), "").unwrap();
        let mut rec = meta(app, id, st);
        for (k, v) in [
            ("command", json!(["make", "test"])),
            ("teardown", json!("make down")),
            ("deadline_ms", json!(3_600_000)),
            ("grace_ms", json!(10_000)),
            ("teardown_timeout_ms", json!(300_000)),
            ("reap_failures", json!(0)),
            ("keep", json!(keep)),
        ] {
            rec[k] = v;
        }
        fs::write(dir.join("run.json"), rec.to_string()).unwrap();
    }
}

fn status(top: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("status")
        .arg("--lock-dir")
        .arg(top.join("locks"))
        .arg("--runs-dir")
        .arg(top.join("runs"))
        .args(args)
        .env("TETHER_CONFIG", top.join("config.yaml"))
        .output()
        .expect("running tether status")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn status_text_and_json_snapshots_show_a_dead_holder_as_dead() {
    let t = tempfile::tempdir().unwrap();
    state(t.path());
    let out = status(t.path(), &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = text(&out.stdout);
    insta::assert_snapshot!("status_cli_text", stdout);
    let dead = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("a-rather-long-review-app-name"))
        .unwrap_or_else(|| panic!("no line for the dead app:\n{stdout}"));
    assert!(
        dead.contains(" dead ") && dead.contains("reap pending") && !dead.contains(" free "),
        "{dead}"
    );

    let out = status(t.path(), &["--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: Value = serde_json::from_str(&text(&out.stdout)).unwrap();
    insta::assert_json_snapshot!("status_cli_json", v);
    let app = &v["apps"][0];
    assert_eq!(
        (&app["status"], &app["held"], &app["reap_pending"]),
        (&json!("dead"), &json!(false), &json!(true)),
        "{v:#}"
    );
    assert_eq!(v["apps"][1]["status"], "free");
    assert_eq!(v["runs"][0]["status"], "dead-unclean");
    assert_eq!(v["runs"][1]["status"], "kept");
}

#[test]
fn status_takes_quiet_and_log_format_as_the_other_commands() {
    let t = tempfile::tempdir().unwrap();
    state(t.path());
    let quiet = status(t.path(), &["-q"]);
    assert_eq!(quiet.status.code(), Some(0), "{quiet:?}");
    assert_eq!(
        quiet.stdout,
        status(t.path(), &[]).stdout,
        "-q changes stdout"
    );
    assert!(quiet.stderr.is_empty(), "{quiet:?}");

    // An error (the runs dir is a file) is one JSON line with --log-format json.
    let file = t.path().join("afile");
    fs::write(&file, "").unwrap();
    let refused = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tether"))
            .arg("status")
            .args(extra)
            .arg("--runs-dir")
            .arg(&file)
            .arg("--lock-dir")
            .arg(t.path().join("locks"))
            .env("TETHER_CONFIG", t.path().join("config.yaml"))
            .output()
            .unwrap()
    };
    let out = refused(&["--log-format", "json"]);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    let line: Value = serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{e}: {err}"));
    assert_eq!(line["level"], "error", "{err}");
    assert!(
        line["msg"].as_str().unwrap_or_default().contains("afile"),
        "{err}"
    );
    // The same error in text starts `tether: `.
    let out = refused(&[]);
    assert!(text(&out.stderr).starts_with("tether: error: "), "{out:?}");
}

/// `--format prometheus` over the same state plus a journal with both generations: the
/// exposition pinned (no lock held, so nothing varies), the dead holder's reap pending, the
/// slot count from the config file (or `--slots`), counters over the current generation;
/// `--format json` is `--json`; `--json` with `--format` is a usage error.
#[test]
fn status_prometheus_snapshot_and_format_flags() {
    let t = tempfile::tempdir().unwrap();
    state(t.path());
    fs::write(t.path().join("config.yaml"), "slots: 3\n").unwrap();
    let line = |id: &str, result: &str, wait: u64, hold: u64| {
        json!({
            "at": 1_700_000_100u64, "run_id": id, "app": "idle.example.org", "group": null,
            "host": "ci-host", "result": result, "exit": 0, "reason": "exited",
            "lock_wait_ms": wait, "runtime_ms": hold, "hold_ms": hold, "teardown": "ok",
            "reaps": 1,
        })
        .to_string()
            + "\n"
    };
    let runs = t.path().join("runs");
    fs::write(
        runs.join(".history.jsonl.1"),
        line("old-1", "passed", 100, 900),
    )
    .unwrap();
    let current = line("new-1", "passed", 300, 1_100) + &line("new-2", "failed", 0, 700);
    fs::write(runs.join(".history.jsonl"), current).unwrap();
    for f in [".history.jsonl", ".history.jsonl.1"] {
        fs::set_permissions(runs.join(f), fs::Permissions::from_mode(0o600)).unwrap();
    }

    let out = status(t.path(), &["--format", "prometheus"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let prom = text(&out.stdout);
    insta::assert_snapshot!("status_cli_prometheus", prom);
    for sample in [
        "tether_app_reap_pending{app=\"a-rather-long-review-app-name.staging.eu-west-1.example.org\"} 1\n",
        "tether_dead_runs_pending_reap 1\n",
        "tether_slots_total 3\n",
        "tether_runs_total{app=\"idle.example.org\",result=\"passed\"} 1\n",
        "tether_runs_total{app=\"idle.example.org\",result=\"failed\"} 1\n",
        "tether_reaps_total{app=\"idle.example.org\"} 2\n",
        "tether_lock_wait_seconds_count{app=\"idle.example.org\"} 2\n",
        "tether_lock_wait_seconds{app=\"idle.example.org\",quantile=\"0.95\"} 0.3\n",
    ] {
        assert!(prom.contains(sample), "no {sample:?} in:\n{prom}");
    }
    let flag = status(t.path(), &["--format", "prometheus", "--slots", "8"]);
    assert!(
        text(&flag.stdout).contains("tether_slots_total 8\n"),
        "{flag:?}"
    );

    assert_eq!(
        status(t.path(), &["--format", "json"]).stdout,
        status(t.path(), &["--json"]).stdout
    );
    assert_eq!(
        status(t.path(), &["--format", "text"]).stdout,
        status(t.path(), &[]).stdout
    );
    let both = status(t.path(), &["--json", "--format", "text"]);
    assert_eq!(both.status.code(), Some(125), "{both:?}");
    assert!(
        text(&both.stderr).starts_with("tether: usage: "),
        "{both:?}"
    );
    assert!(both.stdout.is_empty(), "{both:?}");
}
