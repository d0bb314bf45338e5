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
