//! A CI step shell: tether started *inside* `sh -e -c` / `bash -e -c`, not exec'd.
//!
//! This is how CI agents run a step (CLI-CONTRACT §5): the shell is the parent of tether's front, and
//! the shell leads its own process group, so a test can play each agent — SIGKILL the shell
//! only (Drone exec), SIGKILL the whole group (Woodpecker local), SIGTERM then SIGKILL the group
//! (GitLab shell), or signal the top process only (GitHub). The group is set up with
//! `process_group(0)` before exec, so its pgid equals the shell's pid. A no-op line is appended
//! to the script so the shell cannot exec its last command (tether stays the shell's child). stdout/stderr go to files
//! in the sandbox's `logs/` (tether, inheriting them, writes there too).
//!
//! Dropping a `StepShell` SIGKILLs its process group and reaps the shell.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::command::{status_text, Finished};
use crate::procs::{describe_pid, wait_child_named};
use crate::sandbox::Sandbox;
use crate::wait::{find_line, poll_exit, poll_some};

/// Builder of a [`StepShell`]; see [`Sandbox::step_shell`].
#[derive(Debug, Clone)]
pub struct StepShellCmd<'a> {
    sb: &'a Sandbox,
    shell: &'static str,
    script: String,
    envs: Vec<(OsString, OsString)>,
}

impl<'a> StepShellCmd<'a> {
    pub fn new(sb: &'a Sandbox, script: &str) -> Self {
        StepShellCmd {
            sb,
            shell: "sh",
            script: script.to_owned(),
            envs: Vec::new(),
        }
    }

    /// Runs the script with `bash -e -c` instead of `sh -e -c`.
    pub fn bash(mut self) -> Self {
        self.shell = "bash";
        self
    }

    /// Sets an environment variable for the shell (and so for tether in it).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Starts the shell in a new process group (pgid = its pid), cwd the sandbox root.
    pub fn spawn(&self) -> StepShell {
        let (stdout_path, stderr_path) = self.sb.log_paths(self.shell);
        let stdout = File::create(&stdout_path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", stdout_path.display()));
        let stderr = File::create(&stderr_path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", stderr_path.display()));
        // The trailing no-op keeps the shell from exec'ing the script's last command (dash and
        // bash both do that for `-c`): tether must run *under* the shell, as in a CI step.
        // Under `-e` a failing command still ends the shell with that command's status.
        let script = format!("{}\n:\n", self.script);
        let mut cmd = Command::new(self.shell);
        cmd.args(["-e", "-c", &script, "step"]);
        crate::scrub_env(&mut cmd);
        cmd.envs(self.envs.iter().map(|(k, v)| (k, v)))
            .current_dir(self.sb.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0);
        let command_line = crate::display_command(&cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {command_line}: {e}"));
        let leader_start = crate::procs::proc_info(child.id() as i32).map(|i| i.start_time);
        StepShell {
            child,
            leader_start,
            stdout_path,
            stderr_path,
            command_line,
        }
    }
}

/// A running step shell, see the module doc.
#[derive(Debug)]
pub struct StepShell {
    pub child: Child,
    /// The shell's start time (see `kill_own_group`).
    leader_start: Option<u64>,
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
    pub command_line: String,
}

impl StepShell {
    /// The shell's pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The step's process group (equal to the shell's pid).
    pub fn pgid(&self) -> i32 {
        self.pid()
    }

    /// Waits for the shell's child named `comm` (e.g. `"tether"`: the front); returns its pid.
    pub fn wait_child_named(&self, comm: &str, timeout: Duration) -> i32 {
        wait_child_named(self.pid(), comm, timeout)
    }

    /// Sends `sig` to the shell only (Drone's exec runner: SIGKILL the step shell).
    pub fn kill_shell(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid()), sig)
            .unwrap_or_else(|e| panic!("kill({}, {sig}): {e}", self.pid()));
    }

    /// Sends `sig` to the step's whole process group (Woodpecker, GitLab).
    pub fn kill_group(&self, sig: Signal) {
        kill(Pid::from_raw(-self.pgid()), sig)
            .unwrap_or_else(|e| panic!("kill(-{}, {sig}): {e}", self.pgid()));
    }

    /// Everything written to the step's stderr so far (the shell's and tether's).
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stderr_path).unwrap_or_default()).into_owned()
    }

    /// Waits for a stderr line containing `pattern`; returns it. Panics with the stderr so far
    /// on timeout (the shell exiting does not end the wait: its children may still write).
    pub fn wait_line(&self, pattern: &str, timeout: Duration) -> String {
        if let Some(line) = poll_some(timeout, || find_line(&self.stderr_path, pattern)) {
            return line;
        }
        panic!(
            "timed out after {timeout:?} waiting for a step stderr line containing {pattern:?}\n\
             shell: {}\ncommand: {}\n--- stderr ---\n{}",
            describe_pid(self.pid()),
            self.command_line,
            self.stderr()
        );
    }

    /// Waits up to `timeout` for the shell to exit and reaps it; `None` if still running.
    pub fn try_wait_exit(&mut self, timeout: Duration) -> Option<Finished> {
        Some(Finished::collect(
            poll_exit(&mut self.child, timeout)?,
            &self.stdout_path,
            &self.stderr_path,
            &self.command_line,
        ))
    }

    /// Waits for the shell to exit and reaps it. On timeout, kills the group and panics.
    pub fn wait_exit(&mut self, timeout: Duration) -> Finished {
        if let Some(finished) = self.try_wait_exit(timeout) {
            return finished;
        }
        let state = describe_pid(self.pid());
        self.kill_now();
        let status = self
            .child
            .try_wait()
            .ok()
            .flatten()
            .map(status_text)
            .unwrap_or_default();
        panic!(
            "step shell did not exit within {timeout:?} ({state}); killed it ({status})\n\
             command: {}\n--- stderr ---\n{}",
            self.command_line,
            self.stderr()
        );
    }

    fn kill_now(&mut self) {
        crate::procs::kill_own_group(self.pgid(), self.leader_start);
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for StepShell {
    fn drop(&mut self) {
        self.kill_now();
    }
}
