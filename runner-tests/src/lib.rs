//! Fixture library of tether's real-kernel concurrency suite.
//!
//! The suite runs the **real** `tether` binary with real processes, flocks and signals; nothing
//! is mocked. This crate gives the tests:
//!
//! - where the binaries are: [`tether_bin`], [`helper_bin()`] and the [`helper_bin!`] macro;
//! - a private world per test: [`Sandbox`] (a temp dir with `locks/`, `runs/`, `marks/`,
//!   `logs/`) whose `Drop` kills every process that still mentions it;
//! - ways to start tether: [`TetherCmd`] → [`RunningTether`] → [`Finished`] (stderr goes to a
//!   file, so lines can be awaited while tether runs), and [`StepShell`] for tether started
//!   *inside* a `sh -e`/`bash -e` step script in its own process group, as a CI agent does;
//!   [`FakeAgent`] for a step whose output an agent reads through a pipe, so the test can kill
//!   the agent and leave the step shell alive (Buildbot); [`start_held_run`] for a run that
//!   holds its app until the test releases it;
//! - observation without luck: `wait_*` helpers block on a file, a line, a pid's death or a
//!   flock waiter against a deadline and panic with context on timeout; `poll_*` helpers return
//!   `bool` instead. Nothing here sleeps to hope for an ordering: every remaining sleep is a
//!   poll step inside a loop with a deadline;
//! - no leaks: [`ProcessGuard`], [`KillOnDrop`], and the sandbox's sweep;
//! - probes: [`lock_is_free`], [`flock_holders`]/[`flock_waiters`] (`/proc/locks`),
//!   [`proc_info`], [`sig_ignored`], [`children_of`], [`inheritable_fds`].
//!
//! Invariants the tests can rely on:
//! - every helper binary announces readiness by creating a file atomically (write `F.tmp`,
//!   rename to `F`, see [`helper`]), so `wait_file(F)` then reading F never sees a partial file;
//! - `pid_alive` is false for zombies, so "killed but not yet reaped by its parent" counts as dead;
//! - commands started here never inherit the test's CI environment (`TETHER_*`, Drone,
//!   Woodpecker, GitLab, GitHub, Forgejo, Gitea, Buildkite, Jenkins variables are removed, see
//!   [`ci_vars`]) unless a test sets them.
//!
//! Environment facts to keep in mind:
//! - fds the test process itself inherited without `FD_CLOEXEC` (from whatever started
//!   `cargo test`) pass through tether to its command; assert on fd *targets*, or allow
//!   [`inheritable_fds`];
//! - where PID 1 does not reap (some containers), orphans killed by a test stay zombies
//!   forever; [`pid_alive`] counts them as dead.
//!
//! One kernel subtlety: tether's front sets `PR_SET_PDEATHSIG` towards its
//! parent, and the kernel fires it when the parent *thread* exits. Spawn tether from the test's
//! own thread (not from a short-lived helper thread), or it gets SIGTERM when that thread ends.
//!
//! The tether binary is not built by `cargo test -p runner-tests`; run the suite with
//! `cargo test --workspace` (which also unifies the `fault-injection` feature into it), or point
//! `TETHER_BIN` at a binary.

mod agent;
mod command;
mod dir_hosts;
mod files;
mod held;
pub mod helper;
mod locks;
pub mod netns;
pub mod pg;
mod pg_proxy;
mod procs;
mod sandbox;
mod shell;
mod users;
mod wait;
mod waiters;

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

pub use agent::{FakeAgent, FakeAgentCmd};
pub use command::{on_host, Finished, RunningTether, TetherCmd};
pub use dir_hosts::{dir_host, DirHost};
pub use files::{
    backdate, log_lines, names, rid, run_dirs, sh_wait_for, snapshot, suffix, touch,
    wait_holder_pid, write_config,
};
pub use held::{start_held_run, HeldRun};
pub use locks::{
    flock_holders, flock_waiters, hold_lock, lock_is_free, open_lock_file, poll_lock_free,
    queue_tickets, wait_flock_waiters, wait_hold_lock, wait_lock_free, wait_queued,
};
pub use netns::{Cluster, Host};
pub use nix::sys::signal::Signal;
pub use pg::Postgres;
pub use pg_proxy::PoolingProxy;
pub use procs::{
    children_of, descendants_of, pid_alive, pid_comm, poll_all_gone, poll_pid_gone, proc_info,
    sig_ignored, sigkill_core, sigkilled_core_front_status, thread_names, wait_all_gone,
    wait_child_named, wait_pid_gone, KillOnDrop, ProcInfo, ProcessGuard,
};
pub use sandbox::{cluster_switch, Sandbox, CLUSTER_SWITCH};
pub use shell::{StepShell, StepShellCmd};
pub use users::{cgroup2_writable, is_root, TempUser};
pub use wait::{
    count_lines, poll_some, poll_some_every, poll_until, read_json, read_pids, wait_count,
    wait_file, wait_line, wait_pids, wait_some, wait_until,
};
pub use waiters::{app_lock_waiters, app_queue, app_waiters, wait_app_queue, wait_app_waiters};

/// Default bound for every wait in the suite: generous, because a loaded CI host is slow, and
/// a wait only takes this long when the test is failing anyway.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Step of every poll loop. Only ever used inside a loop with a deadline.
pub const POLL: Duration = Duration::from_millis(5);

/// Path of the `tether` binary under test: `TETHER_BIN` if set, else `<target>/<profile>/tether`
/// next to this test executable (test executables live in `<target>/<profile>/deps/`).
///
/// Panics with a clear message when it is missing. Warns (on stderr, shown for failing tests)
/// when a file under the root crate's `src/` is newer than the binary: a stale binary would
/// make the suite test old code.
pub fn tether_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let bin = BIN.get_or_init(|| {
        let bin = resolve_tether_bin(std::env::var_os("TETHER_BIN"), std::env::current_exe().ok())?;
        warn_if_stale(&bin);
        Ok(bin)
    });
    match bin {
        Ok(bin) => bin.clone(),
        Err(msg) => panic!("{msg}"),
    }
}

/// The pure part of [`tether_bin`]: from the `TETHER_BIN` value and the current executable, the
/// binary's path or the message to panic with.
pub fn resolve_tether_bin(env: Option<OsString>, exe: Option<PathBuf>) -> Result<PathBuf, String> {
    if let Some(env) = env.filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(env);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!(
                "TETHER_BIN={} does not name a file; unset it to use the workspace build",
                bin.display()
            ))
        };
    }
    let exe = exe.ok_or("cannot locate the current test executable to find tether")?;
    let dir = bin_dir_of(&exe)
        .ok_or_else(|| format!("cannot derive the target dir from {}", exe.display()))?;
    let bin = dir.join("tether");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "the tether binary is missing at {} (derived from {}): build it with \
             `cargo test --workspace` (or `cargo build --workspace`), or set TETHER_BIN",
            bin.display(),
            exe.display()
        ))
    }
}

/// `<target>/<profile>/` for an executable in `<target>/<profile>/deps/` or `<target>/<profile>/`.
fn bin_dir_of(exe: &Path) -> Option<PathBuf> {
    let dir = exe.parent()?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf)
    } else {
        Some(dir.to_path_buf())
    }
}

fn warn_if_stale(bin: &Path) {
    let Ok(built) = bin.metadata().and_then(|m| m.modified()) else {
        return;
    };
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../src");
    let mut stack = vec![src];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|m| m > built)
            {
                eprintln!(
                    "runner-tests: WARNING: {} is newer than {}: the tether binary is stale; \
                     run `cargo test --workspace`",
                    path.display(),
                    bin.display()
                );
                return;
            }
        }
    }
}

/// Path of one of this crate's helper binaries (`tree-helper`, `fd-lister`, `exit-with`,
/// `ignore-term`, `lock-holder`, `no-clone3`, `fake-agent`): `CARGO_BIN_EXE_<name>` from the environment when
/// set, else the directory the tether binary is built to. Panics when missing.
///
/// In this crate's integration tests prefer the [`helper_bin!`] macro, which Cargo resolves at
/// compile time.
pub fn helper_bin(name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(format!("CARGO_BIN_EXE_{name}")) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe() to locate the helper binaries");
    let dir = bin_dir_of(&exe).unwrap_or_else(|| panic!("no target dir above {}", exe.display()));
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "helper binary {name} missing at {}: build it with `cargo test --workspace`",
        bin.display()
    );
    bin
}

/// Path of a helper binary of this crate, resolved by Cargo at compile time
/// (`CARGO_BIN_EXE_<name>`); usable only in this crate's integration tests.
///
/// ```ignore
/// let tree = runner_tests::helper_bin!("tree-helper");
/// ```
#[macro_export]
macro_rules! helper_bin {
    ($name:literal) => {
        ::std::path::PathBuf::from(env!(concat!("CARGO_BIN_EXE_", $name)))
    };
}

/// Starts `lock-holder` on `path` in its own process group and waits until it holds the flock
/// (its ready file exists): a live holder that is not tether. Killing it (or dropping the
/// handle) releases the lock, as the death of a real holder would.
pub fn start_lock_holder(sb: &Sandbox, path: impl AsRef<Path>) -> KillOnDrop {
    let path = path.as_ref();
    let ready = sb.fresh_mark("lock-holder.ready");
    let mut cmd = std::process::Command::new(helper_bin("lock-holder"));
    cmd.arg("--path")
        .arg(path)
        .arg("--ready")
        .arg(&ready)
        .process_group(0);
    let holder = KillOnDrop::spawn(&mut cmd);
    wait_file(&ready, TIMEOUT);
    holder
}

/// The fds of the test process itself that a child would inherit (no `FD_CLOEXEC`): whatever
/// the environment that started the test leaked into it. These pass through tether to its
/// command too, so fd assertions must allow them (or, better, look for specific targets).
pub fn inheritable_fds() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let fds: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    let mut inheritable: Vec<i32> = fds
        .into_iter()
        .filter(|&fd| {
            // SAFETY: F_GETFD only reads the descriptor's flags; a closed fd gives EBADF.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            flags >= 0 && flags & libc::FD_CLOEXEC == 0
        })
        .collect();
    inheritable.sort_unstable();
    inheritable
}

/// Parses an `fd-lister` output file into `(fd, target)` pairs.
pub fn read_fd_listing(file: impl AsRef<Path>) -> Vec<(i32, String)> {
    let file = file.as_ref();
    let text = std::fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("reading fd listing {}: {e}", file.display()));
    text.lines()
        .map(|l| {
            l.split_once(" -> ")
                .and_then(|(fd, target)| Some((fd.parse().ok()?, target.to_owned())))
                .unwrap_or_else(|| panic!("{}: not an fd line: {l:?}", file.display()))
        })
        .collect()
}

/// Quotes `s` for a POSIX shell (single quotes unless it is made of safe characters only).
pub fn shell_quote(s: impl AsRef<std::ffi::OsStr>) -> String {
    let s = s.as_ref().to_string_lossy();
    let safe = |c: char| c.is_ascii_alphanumeric() || "_./:=@%+,-".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The names of this process's environment variables that a command started by the suite (or
/// by the bench) must not inherit, as they would change what tether does: `TETHER_*`, `CI` and
/// the CI-detection variables (Drone, Woodpecker, GitLab, GitHub, Forgejo, Gitea, Buildkite,
/// Jenkins). The one list of them.
pub fn ci_vars() -> Vec<OsString> {
    const PREFIXES: [&str; 9] = [
        "TETHER_",
        "DRONE",
        "CI_",
        "GITHUB_",
        "GITLAB_",
        "WOODPECKER",
        "FORGEJO_",
        "GITEA_",
        "BUILDKITE",
    ];
    // Jenkins's variables have no common prefix: those `ident::ci_env::jenkins` reads.
    const JENKINS: [&str; 12] = [
        "JENKINS_URL",
        "BUILD_TAG",
        "BUILD_NUMBER",
        "BUILD_URL",
        "JOB_NAME",
        "STAGE_NAME",
        "CHANGE_ID",
        "CHANGE_TARGET",
        "BRANCH_NAME",
        "TAG_NAME",
        "GIT_BRANCH",
        "GIT_COMMIT",
    ];
    std::env::vars_os()
        .map(|(key, _)| key)
        .filter(|key| {
            let key = key.to_string_lossy();
            key == "CI"
                || JENKINS.contains(&key.as_ref())
                || PREFIXES.iter().any(|p| key.starts_with(p))
        })
        .collect()
}

/// Removes from `cmd` the variables of the test's own environment that would change what
/// tether does: those of [`ci_vars`]. With the cluster switch on, sets `TETHER_CLUSTER_URL` to
/// the switch's server (see [`Sandbox`]); a test's own `.env()`/`.env_remove()` comes after.
pub(crate) fn scrub_env(cmd: &mut std::process::Command) {
    for key in ci_vars() {
        cmd.env_remove(key);
    }
    if let Some(url) = sandbox::switch_cluster_url() {
        cmd.env("TETHER_CLUSTER_URL", url);
    }
}

/// A command line for messages: program and arguments, shell-quoted.
pub(crate) fn display_command(cmd: &std::process::Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(shell_quote)
        .collect::<Vec<_>>()
        .join(" ")
}
