//! The CLI surface of the `tether` binary: usage errors are exit 125 (not clap's 2), help and
//! version are 0, and the usage message names the culprit. Building these tests is also what
//! makes `cargo test --workspace` build `target/<profile>/tether` for the real-kernel suite in
//! `runner-tests/`.

use std::process::Command;

fn tether(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(args)
        .env_remove("TETHER_APP")
        .env_remove("TETHER_RUN_ID")
        .env_remove("TETHER_CONFIG")
        .output()
        .expect("running tether")
}

#[test]
fn help_and_version_exit_zero() {
    for args in [
        &["--help"][..],
        &["--version"],
        &["run", "--help"],
        &["janitor", "--help"],
    ] {
        let out = tether(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        assert!(!out.stdout.is_empty(), "{args:?} prints to stdout");
    }
}

#[test]
fn usage_errors_exit_125_naming_the_culprit() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["run", "--app", "a.example.org", "--bogus", "--", "true"],
            "--bogus",
        ),
        (&["run", "--app", "a.example.org", "true"], "true"),
        (
            &[
                "run",
                "--app",
                "a.example.org",
                "--deadline",
                "10x",
                "--",
                "true",
            ],
            "10x",
        ),
        (&["frobnicate"], "frobnicate"),
        (&[], "Usage"),
    ];
    for (args, culprit) in cases {
        let out = tether(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {stderr}");
        assert!(
            stderr.contains(culprit),
            "{args:?} should name {culprit:?}: {stderr}"
        );
    }
}

#[test]
fn usage_error_message_snapshot() {
    let out = tether(&[
        "run",
        "--app",
        "a.example.org",
        "--grace",
        "soon",
        "--",
        "true",
    ]);
    insta::assert_snapshot!(String::from_utf8_lossy(&out.stderr));
}

/// Output to a closed stdout (`tether status | head -0`, a dead agent) fails with EPIPE;
/// tether carries on and exits with its own code instead of panicking (`println!` would).
#[test]
fn a_closed_stdout_is_not_a_panic() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.yml");
    std::fs::write(&config, "deadline: 5m\n").expect("writing the config");
    for args in [&["config", "show"][..], &["status", "--json"]] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let child = Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(args)
            .env("TETHER_CONFIG", &config)
            .env("TETHER_LOCK_DIR", dir.path().join("locks"))
            .env("TETHER_RUNS_DIR", dir.path().join("runs"))
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("running tether");
        let out = child.wait_with_output().expect("waiting for tether");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
    }
}

/// A flag given twice takes the last value (as `timeout(1)`, `flock(1)` and wrapper scripts that
/// append to a base command line expect), instead of clap's "cannot be used multiple times":
/// with a missing dir first and a file second, `status` complains about the second.
#[test]
fn a_flag_given_twice_takes_the_last_value() {
    let file = tempfile::NamedTempFile::new().expect("a temporary file");
    let last = file.path().to_str().expect("a UTF-8 temporary path");
    let out = tether(&[
        "status",
        "--lock-dir",
        "/nonexistent/tether-locks",
        "--runs-dir",
        "/nonexistent/tether-runs",
        "--runs-dir",
        last,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains(&format!("runs dir {last} is not a directory")),
        "the last --runs-dir decides: {stderr}"
    );
}
