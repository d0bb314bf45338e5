//! The CLI surface of the `tether` binary: usage errors are exit 125 (not clap's 2) and one
//! `tether: usage: …` line naming the culprit (or one JSON object), help and version are 0. Building these tests is also what
//! makes `cargo test --workspace` build `target/<profile>/tether` for the real-kernel suite in
//! `runner-tests/`.

use std::process::Command;

fn tether(args: &[&str]) -> std::process::Output {
    tether_with_config(args, None)
}

/// tether with `TETHER_CONFIG` set to `config`, or unset (and no default config file found:
/// `XDG_CONFIG_HOME` names a directory that does not exist).
fn tether_with_config(args: &[&str], config: Option<&std::path::Path>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
    cmd.args(args)
        .env_remove("TETHER_APP")
        .env_remove("TETHER_RUN_ID")
        .env_remove("TETHER_CONFIG")
        .env("XDG_CONFIG_HOME", "/nonexistent/tether-test-config");
    if let Some(c) = config {
        cmd.env("TETHER_CONFIG", c);
    }
    cmd.output().expect("running tether")
}

#[test]
fn help_and_version_exit_zero() {
    for args in [
        &["--help"][..],
        &["--version"],
        &["run", "--help"],
        &["janitor", "--help"],
        &["config", "check", "--help"],
        &["help", "run"],
    ] {
        let out = tether(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        assert!(!out.stdout.is_empty(), "{args:?} prints to stdout");
        assert!(
            out.stderr.is_empty(),
            "{args:?}: clap's own text, on stdout only"
        );
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
        (&[], "needs a subcommand: run, janitor"),
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

/// The usage errors a script sees, one per case (issue 18, D35): every one is a single line
/// starting `tether: usage: `, exit 125, and ends pointing to the right `--help`.
const USAGE_CASES: &[&str] = &[
    "run --app a.example.org --bogus -- true",
    "run --app a.example.org --timeout 5x -- true",
    "run --app a.example.org --lock-timeout 5x -- true",
    "run --app a.example.org --on-busy wiat -- true",
    "run --app a.example.org true",
    "run --app a.example.org",
    "run -- true",
    "run --app a.example.org -5 -- true",
    "run --app a.example.org --slots -5 -- true",
    "runn --app a.example.org -- true",
    "frobnicate -5",
    "janitor -q -v",
    "config",
    "config chek",
    "completions tcsh",
    "",
];

#[test]
fn usage_errors_are_one_prefixed_line_snapshot() {
    let mut transcript = String::new();
    for case in USAGE_CASES {
        let args: Vec<&str> = case.split_whitespace().collect();
        let out = tether(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}: {out:?}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("tether: usage: "), "{args:?}: {stderr}");
        assert!(
            stderr.trim_end().ends_with(" --help'"),
            "{args:?}: {stderr}"
        );
        // clap's tip for a stray `-5` is `use '-- -5'`: after `--` comes the command to run.
        assert!(
            !stderr.contains("-- -5") && !stderr.contains("as a value, use"),
            "{args:?}: {stderr}"
        );
        transcript.push_str(&format!("$ tether {case}\n{stderr}"));
    }
    insta::assert_snapshot!(transcript);
}

#[test]
fn usage_errors_are_json_lines_with_log_format_json() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.yml");
    std::fs::write(&config, "log_format: json\n").expect("writing the config");
    let config_arg = format!("--config={}", config.display());
    for case in USAGE_CASES {
        let args: Vec<&str> = case.split_whitespace().collect();
        let Some((sub, rest)) = args.split_first() else {
            continue;
        };
        // The flag (both spellings), or a config file's log_format (flag, environment).
        let mut flag_space = vec![*sub, "--log-format", "json"];
        flag_space.extend(rest);
        let mut flag_eq = vec![*sub, "--log-format=json"];
        flag_eq.extend(rest);
        let mut by_flag = vec![*sub, config_arg.as_str()];
        by_flag.extend(rest);
        for (argv, env) in [
            (&flag_space, None),
            (&flag_eq, None),
            (&by_flag, None),
            (&args, Some(config.as_path())),
        ] {
            let out = tether_with_config(argv, env);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(125), "{argv:?}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "{argv:?}: {stderr}");
            let line: serde_json::Value = serde_json::from_str(stderr.trim_end())
                .unwrap_or_else(|e| panic!("{argv:?}: not JSON ({e}): {stderr}"));
            assert_eq!(line["level"], "error", "{argv:?}: {stderr}");
            assert_eq!(line["event"], "usage", "{argv:?}: {stderr}");
            let help = line["help"].as_str().unwrap_or_default();
            assert!(
                help.starts_with("tether ") && help.ends_with(" --help"),
                "{stderr}"
            );
            let msg = line["msg"].as_str().unwrap_or_default();
            assert!(msg.ends_with(&format!("see '{help}'")), "{stderr}");
        }
    }
}

/// After `--` everything is the command's: a `--log-format json` there is not tether's.
#[test]
fn a_log_format_after_the_double_dash_is_the_commands() {
    let out = tether(&["run", "--bogus", "--", "sh", "--log-format", "json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.starts_with("tether: usage: "), "{stderr}");
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
