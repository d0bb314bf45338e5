//! Running the real tether binary: a builder, a handle on a running tether, and its outcome.
//!
//! stdout and stderr go to files in the sandbox's `logs/`, not pipes: lines can be awaited
//! while tether runs, a leaked grandchild holding the file open cannot make a read hang, and
//! a failing assertion can always show everything tether printed. By default tether starts in
//! its own process group (so a misdirected group signal cannot hit the test harness), with
//! stdin from `/dev/null`, the sandbox root as working directory and the test's CI variables
//! removed (see [`crate::scrub_env`]).

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::procs::{describe_pid, wait_child_named};
use crate::sandbox::Sandbox;
use crate::wait::{find_line, poll_count, poll_exit, poll_some};
use crate::{shell_quote, tether_bin, TIMEOUT};

/// `--orphan-age` of every janitor the fixture starts, unless the test gives its own.
pub const FIXTURE_ORPHAN_AGE: &str = "1000h";

/// Builder of one tether invocation inside a [`Sandbox`]:
/// `tether <subcommand> --lock-dir L --runs-dir R [--app A] [--run-id I] [--teardown T]
/// [args…] [-- command…]`.
#[derive(Debug, Clone)]
pub struct TetherCmd<'a> {
    sb: &'a Sandbox,
    bin: Option<PathBuf>,
    /// A command line tether is started through (it must `exec` what follows it).
    wrapper: Vec<OsString>,
    subcommand: String,
    sandbox_dirs: bool,
    app: Option<OsString>,
    run_id: Option<OsString>,
    teardown: Option<OsString>,
    args: Vec<OsString>,
    envs: Vec<(OsString, Option<OsString>)>,
    command: Option<Vec<OsString>>,
    cwd: Option<PathBuf>,
    timeout: Duration,
    own_group: bool,
}

impl<'a> TetherCmd<'a> {
    /// See [`Sandbox::tether_run`], [`Sandbox::tether`].
    pub fn new(sb: &'a Sandbox, subcommand: &str) -> Self {
        TetherCmd {
            sb,
            bin: None,
            wrapper: Vec::new(),
            subcommand: subcommand.to_owned(),
            sandbox_dirs: true,
            app: None,
            run_id: None,
            teardown: None,
            args: Vec::new(),
            envs: Vec::new(),
            command: None,
            cwd: None,
            timeout: TIMEOUT,
            own_group: true,
        }
    }

    /// `--app <domain>`.
    pub fn app(mut self, domain: impl AsRef<OsStr>) -> Self {
        self.app = Some(domain.as_ref().to_owned());
        self
    }

    /// `--run-id <id>`.
    pub fn run_id(mut self, id: impl AsRef<OsStr>) -> Self {
        self.run_id = Some(id.as_ref().to_owned());
        self
    }

    /// `--teardown <shell command>`.
    pub fn teardown(mut self, cmd: impl AsRef<OsStr>) -> Self {
        self.teardown = Some(cmd.as_ref().to_owned());
        self
    }

    /// One more option, placed after the built-in ones and before `--`.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// More options, placed after the built-in ones and before `--`.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable for tether.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), Some(value.as_ref().to_owned())));
        self
    }

    /// Removes an environment variable for tether.
    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.envs.push((key.as_ref().to_owned(), None));
        self
    }

    /// The command to run, after `--`.
    pub fn command<I, S>(mut self, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command = Some(argv.into_iter().map(|a| a.as_ref().to_owned()).collect());
        self
    }

    /// Runs another binary than [`tether_bin`].
    pub fn bin(mut self, bin: impl Into<PathBuf>) -> Self {
        self.bin = Some(bin.into());
        self
    }

    /// Starts tether through `wrapper…` (which must `exec` the tether command line it is
    /// given after its own words, so the pid stays tether's): e.g. [`on_host`] for another
    /// host name in a UTS namespace of its own.
    pub fn wrapped<I, S>(mut self, wrapper: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.wrapper = wrapper.into_iter().map(|a| a.as_ref().to_owned()).collect();
        self
    }

    /// Leaves out `--lock-dir`/`--runs-dir` (to test env, config or defaults).
    pub fn no_sandbox_dirs(mut self) -> Self {
        self.sandbox_dirs = false;
        self
    }

    /// Working directory (default: the sandbox root).
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Bound for [`TetherCmd::run`] (default [`TIMEOUT`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Starts tether in the test's own process group instead of a new one.
    pub fn same_process_group(mut self) -> Self {
        self.own_group = false;
        self
    }

    /// The arguments after the program name.
    pub fn argv(&self) -> Vec<OsString> {
        let mut argv = Vec::new();
        if !self.subcommand.is_empty() {
            argv.push(OsString::from(&self.subcommand));
        }
        if self.sandbox_dirs {
            argv.push("--lock-dir".into());
            argv.push(self.sb.lock_dir().into());
            argv.push("--runs-dir".into());
            argv.push(self.sb.runs_dir().into());
        }
        if self.subcommand == "janitor" {
            // The janitor's orphan-cgroup sweep is host-wide, and tests run in parallel: by
            // default a test's janitor sweeps no other test's orphan. A test of the sweep sets
            // its own `--orphan-age` (the last one given wins).
            argv.push("--orphan-age".into());
            argv.push(FIXTURE_ORPHAN_AGE.into());
        }
        for (flag, value) in [
            ("--app", &self.app),
            ("--run-id", &self.run_id),
            ("--teardown", &self.teardown),
        ] {
            if let Some(value) = value {
                argv.push(flag.into());
                argv.push(value.clone());
            }
        }
        argv.extend(self.args.iter().cloned());
        if let Some(command) = &self.command {
            argv.push("--".into());
            argv.extend(command.iter().cloned());
        }
        argv
    }

    fn program(&self) -> PathBuf {
        self.bin.clone().unwrap_or_else(tether_bin)
    }

    /// The invocation as one shell command line (variables set with `.env()` as `K=V`
    /// prefixes; removals are not expressible and left out), for embedding in a
    /// [`crate::StepShell`] script.
    pub fn to_shell(&self) -> String {
        let mut words: Vec<String> = self
            .envs
            .iter()
            .filter_map(|(k, v)| {
                v.as_ref()
                    .map(|v| format!("{}={}", k.to_string_lossy(), shell_quote(v)))
            })
            .collect();
        words.extend(self.wrapper.iter().map(shell_quote));
        words.push(shell_quote(self.program()));
        words.extend(self.argv().iter().map(shell_quote));
        words.join(" ")
    }

    /// Spawns tether; returns at once.
    pub fn spawn(&self) -> RunningTether {
        let (stdout_path, stderr_path) = self.sb.log_paths("tether");
        let stdout = File::create(&stdout_path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", stdout_path.display()));
        let stderr = File::create(&stderr_path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", stderr_path.display()));
        let mut cmd = match self.wrapper.split_first() {
            None => Command::new(self.program()),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(self.program());
                c
            }
        };
        cmd.args(self.argv());
        crate::scrub_env(&mut cmd);
        for (key, value) in &self.envs {
            match value {
                Some(value) => cmd.env(key, value),
                None => cmd.env_remove(key),
            };
        }
        cmd.current_dir(self.cwd.as_deref().unwrap_or(self.sb.path()))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        if self.own_group {
            cmd.process_group(0);
        }
        let command_line = crate::display_command(&cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {command_line}: {e}"));
        let start = crate::procs::proc_info(child.id() as i32).map(|i| i.start_time);
        RunningTether {
            child,
            own_group: self.own_group.then_some(start),
            stdout_path,
            stderr_path,
            command_line,
        }
    }

    /// Spawns tether and waits for it to exit (bounded by `.timeout()`, default 60 s).
    pub fn run(&self) -> Finished {
        self.spawn().wait_exit(self.timeout)
    }
}

/// The wrapper of a tether started as if on host `name`: a UTS namespace of its own (root
/// only) whose host name is `name`; `unshare` and `sh` both `exec`, so the pid is tether's.
pub fn on_host(name: &str) -> Vec<String> {
    [
        "unshare",
        "--uts",
        "sh",
        "-c",
        "hostname \"$0\" && exec \"$@\"",
        name,
    ]
    .map(String::from)
    .to_vec()
}

/// A tether process started by [`TetherCmd::spawn`]. Dropping it while tether still runs
/// SIGKILLs the front (and its process group), which sends the core into teardown via its
/// PDEATHSIG; the sandbox's sweep then kills whatever remains.
#[derive(Debug)]
pub struct RunningTether {
    pub child: Child,
    /// tether leads its own process group; the front's start time (see `kill_own_group`).
    own_group: Option<Option<u64>>,
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
    pub command_line: String,
}

impl RunningTether {
    /// Pid of tether's front (the process the test started).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for tether's core: the child of the front named `tether`.
    pub fn wait_core_pid(&self, timeout: Duration) -> i32 {
        wait_child_named(self.pid(), "tether", timeout)
    }

    /// Sends `sig` to the front.
    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid()), sig)
            .unwrap_or_else(|e| panic!("kill({}, {sig}): {e}", self.pid()));
    }

    /// Everything tether printed on stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stderr_path).unwrap_or_default()).into_owned()
    }

    /// Whether the front has not exited yet (reaps it if it has).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for a stderr line containing `pattern`; returns it. Panics, with the stderr so
    /// far, on timeout or when tether exits without printing it.
    pub fn wait_line(&mut self, pattern: &str, timeout: Duration) -> String {
        let path = &self.stderr_path;
        let child = &mut self.child;
        // `Ok(line)`, or `Err(status)` when tether exited without printing it.
        let outcome = poll_some(timeout, || match find_line(path, pattern) {
            Some(line) => Some(Ok(line)),
            // One last look after an exit: the line may have been written just before it.
            None => child
                .try_wait()
                .ok()
                .flatten()
                .map(|status| find_line(path, pattern).ok_or(status)),
        });
        let why = match outcome {
            Some(Ok(line)) => return line,
            Some(Err(status)) => format!(
                "tether exited ({}) without printing it",
                status_text(status)
            ),
            None => format!("timed out after {timeout:?}; {}", describe_pid(self.pid())),
        };
        panic!(
            "waiting for a stderr line containing {pattern:?}: {why}\ncommand: {}\n\
             --- stderr ---\n{}",
            self.command_line,
            self.stderr()
        );
    }

    /// Waits until at least `n` stderr lines contain `pattern`; returns the count.
    pub fn wait_count(&mut self, pattern: &str, n: usize, timeout: Duration) -> usize {
        let (found, count) = poll_count(&self.stderr_path, pattern, n, timeout);
        if found {
            return count;
        }
        panic!(
            "timed out after {timeout:?} waiting for {n} stderr lines containing {pattern:?} \
             (have {count})\ncommand: {}\n--- stderr ---\n{}",
            self.command_line,
            self.stderr()
        );
    }

    /// Waits up to `timeout` for tether to exit; `None` if it is still running. Repeated
    /// calls after an exit return the same outcome.
    pub fn try_wait_exit(&mut self, timeout: Duration) -> Option<Finished> {
        poll_exit(&mut self.child, timeout).map(|status| self.finished(status))
    }

    /// Waits for tether to exit. On timeout, SIGKILLs it and panics with its stderr.
    pub fn wait_exit(&mut self, timeout: Duration) -> Finished {
        if let Some(finished) = self.try_wait_exit(timeout) {
            return finished;
        }
        let state = describe_pid(self.pid());
        self.kill_now();
        panic!(
            "tether did not exit within {timeout:?} ({state}); killed it\ncommand: {}\n\
             --- stderr ---\n{}",
            self.command_line,
            self.stderr()
        );
    }

    fn finished(&self, status: ExitStatus) -> Finished {
        Finished::collect(
            status,
            &self.stdout_path,
            &self.stderr_path,
            &self.command_line,
        )
    }

    fn kill_now(&mut self) {
        if let Some(start) = self.own_group {
            crate::procs::kill_own_group(self.pid(), start);
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for RunningTether {
    fn drop(&mut self) {
        self.kill_now();
    }
}

pub(crate) fn status_text(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => format!("{status:?}"),
    }
}

/// The outcome of a finished tether (or step shell): status and everything it printed.
/// `Display` shows it all; the `assert_*` methods print it on failure.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Exit code, if it exited normally.
    pub code: Option<i32>,
    /// Signal number, if it was killed by a signal.
    pub signal: Option<i32>,
    pub stderr: String,
    pub stdout: String,
    pub command_line: String,
}

impl fmt::Display for Finished {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match (self.code, self.signal) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => "unknown status".to_owned(),
        };
        write!(
            f,
            "command: {}\nstatus: {status}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command_line, self.stdout, self.stderr
        )
    }
}

impl Finished {
    /// The outcome of a process that exited with `status` and wrote to these files.
    pub(crate) fn collect(
        status: ExitStatus,
        stdout: &Path,
        stderr: &Path,
        command_line: &str,
    ) -> Finished {
        let read =
            |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
        Finished {
            code: status.code(),
            signal: status.signal(),
            stdout: read(stdout),
            stderr: read(stderr),
            command_line: command_line.to_owned(),
        }
    }

    /// Asserts the exit code is `code`.
    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        assert!(self.code == Some(code), "expected exit code {code}\n{self}");
        self
    }

    /// Asserts it was killed by signal `sig`.
    #[track_caller]
    pub fn assert_signal(&self, sig: Signal) -> &Self {
        assert!(
            self.signal == Some(sig as i32),
            "expected death by {sig}\n{self}"
        );
        self
    }

    /// Asserts some stderr line contains `pattern`.
    #[track_caller]
    pub fn assert_stderr_contains(&self, pattern: &str) -> &Self {
        assert!(
            self.stderr.lines().any(|l| l.contains(pattern)),
            "expected a stderr line containing {pattern:?}\n{self}"
        );
        self
    }

    /// Asserts no stderr line contains `pattern`.
    #[track_caller]
    pub fn assert_stderr_lacks(&self, pattern: &str) -> &Self {
        assert!(
            !self.stderr.lines().any(|l| l.contains(pattern)),
            "expected no stderr line containing {pattern:?}\n{self}"
        );
        self
    }

    /// Stderr lines containing `pattern`.
    pub fn stderr_lines(&self, pattern: &str) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.contains(pattern))
            .collect()
    }

    /// The summary line (`tether: run <id> summary: …`), the last such line of stderr.
    pub fn summary(&self) -> Option<&str> {
        self.stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("tether: run ") && l.contains(" summary: "))
    }

    /// A `key=value` field of the summary line (`app`, `result`, `exit`, `lock_wait`,
    /// `runtime`, `teardown`).
    pub fn summary_field(&self, key: &str) -> Option<&str> {
        let summary = self.summary()?;
        let (_, fields) = summary.split_once(" summary: ")?;
        fields
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }
}
