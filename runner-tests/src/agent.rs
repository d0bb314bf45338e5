//! A CI agent that reads the step's output: the `fake-agent` helper running `sh -c <step>`.
//!
//! Buildbot's worker (and any agent that runs `sh -c "<step>"` without exec) leaves a shell
//! between itself and tether; when the agent is SIGKILLed that shell survives, so tether's
//! PDEATHSIG never fires. What does change is that nobody reads tether's stdout/stderr any
//! more. [`FakeAgent`] plays that agent: stdout and stderr of the step are a pipe (or a socket)
//! only the agent reads, copied to a log file in `logs/`; [`FakeAgent::kill`] SIGKILLs the agent
//! alone and reaps it, so its end of the pipe is closed when it returns.
//!
//! The step runs in the agent's process group, which leads its own; dropping the agent SIGKILLs
//! that group (whatever of the step is left) and reaps the agent.

use std::path::PathBuf;
use std::time::Duration;

use crate::procs::KillOnDrop;
use crate::sandbox::Sandbox;
use crate::wait::{read_pids, wait_file};
use crate::{helper_bin, Signal, TIMEOUT};

/// Builder of a [`FakeAgent`]; see [`Sandbox::fake_agent`].
#[derive(Debug, Clone)]
pub struct FakeAgentCmd<'a> {
    sb: &'a Sandbox,
    script: String,
    stderr_to_file: bool,
    socket: bool,
}

impl<'a> FakeAgentCmd<'a> {
    pub fn new(sb: &'a Sandbox, script: &str) -> Self {
        FakeAgentCmd {
            sb,
            script: script.to_owned(),
            stderr_to_file: false,
            socket: false,
        }
    }

    /// The step's stderr goes to a file in `logs/` instead of the agent's pipe: only stdout is
    /// watched by tether, and tether's lines stay readable after the agent is gone.
    pub fn stderr_to_file(mut self) -> Self {
        self.stderr_to_file = true;
        self
    }

    /// A Unix stream socket instead of a pipe.
    pub fn socket(mut self) -> Self {
        self.socket = true;
        self
    }

    /// Starts the agent, which starts `sh -c <script>`; returns once both pids are known.
    pub fn spawn(&self) -> FakeAgent {
        let ready = self.sb.fresh_mark("fake-agent.ready");
        let (log, stderr_path) = self.sb.log_paths("agent");
        let mut cmd = std::process::Command::new(helper_bin("fake-agent"));
        cmd.arg("--ready").arg(&ready).arg("--log").arg(&log);
        if self.stderr_to_file {
            cmd.arg("--stderr-file").arg(&stderr_path);
        }
        if self.socket {
            cmd.arg("--socket");
        }
        cmd.args(["--", "sh", "-c", &self.script]);
        crate::scrub_env(&mut cmd);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.current_dir(self.sb.path());
        let proc = KillOnDrop::spawn(&mut cmd);
        wait_file(&ready, TIMEOUT);
        let pids = read_pids(&ready);
        assert_eq!(pids.len(), 2, "fake-agent ready file {}", ready.display());
        assert_eq!(pids[0], proc.pid(), "fake-agent names itself first");
        FakeAgent {
            proc,
            shell_pid: pids[1],
            log,
            stderr_path: self.stderr_to_file.then_some(stderr_path),
        }
    }
}

/// A running fake agent, see the module doc.
#[derive(Debug)]
pub struct FakeAgent {
    proc: KillOnDrop,
    /// The step shell the agent started (`sh -c <script>`).
    pub shell_pid: i32,
    /// Everything the agent read from the step.
    pub log: PathBuf,
    /// The step's stderr file, with [`FakeAgentCmd::stderr_to_file`].
    pub stderr_path: Option<PathBuf>,
}

impl FakeAgent {
    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    /// SIGKILLs the agent only (not the step) and reaps it: when this returns, nobody reads
    /// the step's output any more.
    pub fn kill(&mut self) {
        self.proc.signal(Signal::SIGKILL);
        let status = self.proc.wait_exit(TIMEOUT);
        assert_eq!(
            KillOnDrop::code_of(status),
            128 + Signal::SIGKILL as i32,
            "the fake agent died of something else"
        );
    }

    /// Waits up to `timeout` for the agent to exit by itself (its step ended); its status.
    pub fn try_wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        self.proc.try_wait_exit(timeout).map(KillOnDrop::code_of)
    }

    /// What the agent read so far.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }
}
