//! A dead CI agent is noticed (D32): the reader of tether's stdout/stderr going away tears the
//! run down with `TETHER_REASON=agent-gone`, exit 143.
//!
//! The agent is `fake-agent` (see `runner_tests::FakeAgent`): it runs
//! `sh -c "tether run …; echo $? > code"` with the step's output on a pipe (or socket) only it
//! reads, the way Buildbot's worker runs a step. The test SIGKILLs the agent alone; the shell
//! survives it (it writes tether's exit code to `code` afterwards), so tether's PDEATHSIG never
//! fires — only the closed pipe tells.
//!
//! Once the agent is gone, tether's stderr lines on that pipe are lost, so these tests assert
//! through files: the teardown command appends `"$TETHER_REASON $TETHER_EXIT_CODE"` to a log,
//! the shell writes the exit code, `--summary-json` has the rest. Where a test needs tether's
//! lines it sends the step's stderr to a file and watches stdout alone.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use runner_tests::{
    helper_bin, lock_is_free, pid_alive, poll_until, read_json, rid, sh_wait_for, shell_quote,
    wait_child_named, wait_file, wait_line, wait_pids, write_config, FakeAgent, Sandbox, TetherCmd,
    TIMEOUT,
};

const APP: &str = "agent.example.org";

/// How soon after the agent's death the teardown must have started. tether reacts at once
/// (its front polls the pipe); the bound is generous for a loaded CI host.
const REACTION: Duration = Duration::from_secs(5);

/// One step under a fake agent: the files its tether run writes.
struct Scene<'a> {
    sb: &'a Sandbox,
    id: String,
    /// The teardown command appends `"$TETHER_REASON $TETHER_EXIT_CODE"` here.
    teardown_log: PathBuf,
    /// The step shell writes tether's exit code here (it outlives the agent).
    code_file: PathBuf,
    summary_json: PathBuf,
}

impl<'a> Scene<'a> {
    fn new(sb: &'a Sandbox, tag: &str) -> Scene<'a> {
        Scene {
            sb,
            id: rid(sb, tag),
            teardown_log: sb.mark("teardown.log"),
            code_file: sb.mark("code"),
            summary_json: sb.mark("summary.json"),
        }
    }

    fn tether(&self) -> TetherCmd<'a> {
        self.sb
            .tether_run()
            .app(APP)
            .run_id(&self.id)
            .teardown(format!(
                r#"echo "$TETHER_REASON $TETHER_EXIT_CODE" >> {}"#,
                shell_quote(&self.teardown_log)
            ))
            .args(["--grace", "1s", "--summary-json"])
            .arg(&self.summary_json)
    }

    /// The step script: tether, then its exit code into `code` (which also keeps `sh` from
    /// exec'ing tether: the shell stays tether's parent, as in a CI step).
    fn step(&self, tether: &TetherCmd) -> String {
        format!(
            "{}; echo $? > {}",
            tether.to_shell(),
            shell_quote(&self.code_file)
        )
    }

    fn teardown_lines(&self) -> Vec<String> {
        fs::read_to_string(&self.teardown_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// tether's exit code, as the surviving step shell saw it.
    fn wait_code(&self, context: &dyn std::fmt::Display) -> i32 {
        wait_file(&self.code_file, TIMEOUT);
        let mut text = String::new();
        // The shell's `echo` may still be writing: wait for the whole line.
        poll_until(TIMEOUT, || {
            text = fs::read_to_string(&self.code_file).unwrap_or_default();
            text.ends_with('\n')
        });
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("code file holds {text:?}\n{context}"))
    }

    /// The run is over and left nothing: its tree and tether are dead, the app lock is free
    /// and says clean, the run dir is gone, no process mentions the sandbox.
    #[track_caller]
    fn assert_nothing_left(&self, pids: &[i32], context: &dyn std::fmt::Display) {
        let alive: Vec<i32> = pids.iter().copied().filter(|&p| pid_alive(p)).collect();
        assert!(
            alive.is_empty(),
            "processes of the run survived: {alive:?} (of {pids:?})\n{context}"
        );
        assert!(
            lock_is_free(self.sb.lock_path(APP)),
            "the app lock is still held\n{context}"
        );
        assert_eq!(
            self.sb.lock_metadata(APP).map(|m| m["state"].clone()),
            Some(serde_json::json!("clean")),
            "the lock metadata must say clean\n{context}"
        );
        assert!(
            !self.sb.run_dir(&self.id).exists(),
            "the run dir was not removed\n{context}"
        );
        self.sb.wait_no_leftovers(TIMEOUT);
    }

    #[track_caller]
    fn assert_summary(
        &self,
        exit: i32,
        result: &str,
        reason: &str,
        context: &dyn std::fmt::Display,
    ) {
        let s = read_json(&self.summary_json)
            .unwrap_or_else(|| panic!("no readable --summary-json\n{context}"));
        assert_eq!(s["exit"], exit, "summary {s}\n{context}");
        assert_eq!(s["result"], result, "summary {s}\n{context}");
        assert_eq!(s["reason"], reason, "summary {s}\n{context}");
        assert_eq!(s["run_id"], self.id.as_str(), "summary {s}\n{context}");
    }
}

/// Failure context: what the agent read before it died, and tether's stderr file if any.
fn context(agent: &FakeAgent) -> String {
    let stderr = agent
        .stderr_path
        .as_ref()
        .map(|p| String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned())
        .unwrap_or_default();
    format!(
        "--- agent read ---\n{}\n--- step stderr file ---\n{stderr}",
        agent.output()
    )
}

#[derive(Clone, Copy, PartialEq)]
enum Output {
    /// stdout and stderr on one pipe, as Buildbot runs a step.
    Pipe,
    /// stdout on a Unix stream socket, stderr too.
    Socket,
    /// stdout on the pipe, stderr to a file (so tether's lines can be read afterwards).
    StdoutOnly,
}

/// Kill the agent under a running step; the run must tear down at once as agent-gone.
fn agent_dies_mid_step(output: Output) {
    let sb = Sandbox::new();
    let scene = Scene::new(&sb, "agent-gone");
    let pids_file = sb.mark("tree.pids");
    let tether = scene.tether().command([
        helper_bin!("tree-helper").into_os_string(),
        "--pids-file".into(),
        pids_file.clone().into_os_string(),
        "--children".into(),
        "2".into(),
        "--setsid".into(),
        "--double-fork".into(),
    ]);
    let mut agent = sb.fake_agent(&scene.step(&tether));
    agent = match output {
        Output::Pipe => agent,
        Output::Socket => agent.socket(),
        Output::StdoutOnly => agent.stderr_to_file(),
    };
    let mut agent = agent.spawn();
    let tree = wait_pids(&pids_file, TIMEOUT);
    sb.guard().pids(&tree);
    let front = wait_child_named(agent.shell_pid, "tether", TIMEOUT);
    let core = wait_child_named(front, "tether", TIMEOUT);
    sb.guard().pids(&[agent.shell_pid, front, core]);

    let t0 = Instant::now();
    agent.kill();
    let ctx = context(&agent);
    wait_file(&scene.teardown_log, TIMEOUT);
    let reaction = t0.elapsed();
    assert!(
        reaction <= REACTION,
        "the teardown started {reaction:?} after the agent died\n{ctx}"
    );
    let code = scene.wait_code(&ctx);
    let ctx = context(&agent);
    assert_eq!(code, 143, "tether's exit code\n{ctx}");
    assert_eq!(
        scene.teardown_lines(),
        ["agent-gone 143"],
        "the teardown must run exactly once with TETHER_REASON=agent-gone\n{ctx}"
    );
    scene.assert_summary(143, "cancelled", "agent-gone", &ctx);
    let mut all = tree.clone();
    all.extend([front, core]);
    scene.assert_nothing_left(&all, &ctx);
    if let Some(stderr) = &agent.stderr_path {
        let text = fs::read_to_string(stderr).unwrap_or_default();
        assert!(
            text.lines()
                .any(|l| l == "tether: agent gone (stdout/stderr has no reader) — tearing down"),
            "expected the funnel line\n{ctx}"
        );
        let last = text.lines().last().unwrap_or_default();
        assert!(
            last.starts_with(&format!("tether: run {} summary: ", scene.id))
                && last.contains(" result=cancelled exit=143 "),
            "the summary must be the last line: {last:?}\n{ctx}"
        );
    }
}

#[test]
fn dead_agent_tears_the_run_down_once_as_agent_gone() {
    agent_dies_mid_step(Output::Pipe);
}

#[test]
fn dead_agent_is_noticed_through_a_socket() {
    agent_dies_mid_step(Output::Socket);
}

#[test]
fn dead_agent_is_noticed_on_stdout_alone_with_the_funnel_line() {
    agent_dies_mid_step(Output::StdoutOnly);
}

/// The agent dies under a step whose agent watch is off; the command then finishes by itself
/// (the test releases it) and the run ends as usual: exit 0, teardown `exited`.
fn agent_dies_with_the_watch_off(scene: &Scene, tether: TetherCmd, stderr_to_file: bool) {
    let sb = scene.sb;
    let started = sb.mark("command.started");
    let release = sb.mark("command.release");
    let command = format!(
        ": > {started}; {wait}; exit 0",
        started = shell_quote(&started),
        wait = sh_wait_for(&shell_quote(&release)),
    );
    let tether = tether.command(["sh", "-c", &command]);
    let mut agent = sb.fake_agent(&scene.step(&tether));
    if stderr_to_file {
        agent = agent.stderr_to_file();
    }
    let mut agent = agent.spawn();
    wait_file(&started, TIMEOUT);
    let front = wait_child_named(agent.shell_pid, "tether", TIMEOUT);
    let core = wait_child_named(front, "tether", TIMEOUT);
    sb.guard().pids(&[agent.shell_pid, front, core]);

    agent.kill();
    match &agent.stderr_path {
        // The core says it heard of the agent's death and carries on (debug line, -v): from
        // here on a teardown would already have begun.
        Some(stderr) => {
            wait_line(stderr, "agent watch is off — carrying on", TIMEOUT);
        }
        // Nothing tells of a notice that is never sent: give tether 400 times its usual
        // reaction time (a few ms in the tests above) to start a teardown it must not start.
        None => {
            let torn_down = poll_until(Duration::from_secs(2), || scene.teardown_log.exists());
            assert!(!torn_down, "the run was torn down\n{}", context(&agent));
        }
    }
    assert!(
        !scene.teardown_log.exists(),
        "the run was torn down although the agent watch is off\n{}",
        context(&agent)
    );
    fs::write(&release, "").expect("releasing the command");
    let code = scene.wait_code(&context(&agent));
    let ctx = context(&agent);
    assert_eq!(code, 0, "the command completed; tether's exit code\n{ctx}");
    assert_eq!(scene.teardown_lines(), ["exited 0"], "{ctx}");
    scene.assert_summary(0, "passed", "exited", &ctx);
    scene.assert_nothing_left(&[front, core], &ctx);
}

#[test]
fn no_agent_watch_flag_keeps_the_run_going_when_the_agent_dies() {
    let sb = Sandbox::new();
    let scene = Scene::new(&sb, "no-watch");
    let tether = scene.tether().arg("--no-agent-watch");
    agent_dies_with_the_watch_off(&scene, tether, false);
}

#[test]
fn agent_watch_false_in_the_config_keeps_the_run_going_when_the_agent_dies() {
    let sb = Sandbox::new();
    let scene = Scene::new(&sb, "no-watch-config");
    let config = write_config(&sb, "config.yml", "agent_watch: false\n");
    let tether = scene.tether().arg("--config").arg(&config).arg("-v");
    agent_dies_with_the_watch_off(&scene, tether, true);
}
