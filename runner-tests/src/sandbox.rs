//! The per-test world: a temp dir with tether's lock dir and runs dir, marker files and logs.
//!
//! Layout: `locks/` (0755, tether's `--lock-dir`), `runs/` (0700, `--runs-dir`), `marks/`
//! (marker files written by commands and teardowns), `logs/` (captured stdout/stderr). The
//! modes are set explicitly, so a permissive umask cannot make tether refuse the dirs (CLI-CONTRACT §3).
//!
//! Dropping the sandbox is the last line of defence against leaks: it SIGKILLs its
//! [`ProcessGuard`] and then every process whose command line, environment or working directory
//! mentions the sandbox (which covers tether itself via `--lock-dir`, and every command it
//! starts via `TETHER_RUN_DIR`/`TMPDIR`), until none is left. Set `TETHER_TEST_KEEP=1` to keep
//! the directory for inspection.
//!
//! **The cluster switch** (issue 16, DECISIONS D73): with `TETHER_TEST_CLUSTER=1` in the test's
//! environment, every sandbox holds a throwaway PostgreSQL ([`Postgres::start_trusting_tcp`]),
//! one per test process (sandboxes alive at the same time share it), started with the first
//! sandbox and stopped when the last one drops — after the sandbox's sweep has killed its
//! tethers. While it lives, every command the suite starts through [`crate::scrub_env`] (tether
//! itself, step shells, fake agents, and so every tether started inside them) gets
//! `TETHER_CLUSTER_URL` pointing at it: every run takes the cluster lock and gets a fence.
//! Without the switch nothing changes. A test whose property legitimately differs with a
//! cluster checks [`cluster_switch`] (or is filtered out in `.ci/run`), with the reason in
//! TESTPLAN.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::command::TetherCmd;
use crate::pg::Postgres;
use crate::procs::{describe_pid, proc_info, ProcessGuard};
use crate::shell::StepShellCmd;
use crate::POLL;

/// The variable that turns the cluster switch on (see the module doc).
pub const CLUSTER_SWITCH: &str = "TETHER_TEST_CLUSTER";

/// Whether the suite runs with a cluster configured: `TETHER_TEST_CLUSTER` is set, non-empty
/// and not `0`.
pub fn cluster_switch() -> bool {
    std::env::var_os(CLUSTER_SWITCH).is_some_and(|v| !v.is_empty() && v != "0")
}

/// The switch's server while some sandbox holds it; a `Weak` so that the last sandbox's drop
/// stops it (a static is never dropped).
static SWITCH_SERVER: Mutex<Weak<Postgres>> = Mutex::new(Weak::new());

/// The switch's server, started if no sandbox holds one.
fn switch_server() -> Arc<Postgres> {
    let mut slot = SWITCH_SERVER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(pg) = slot.upgrade() {
        return pg;
    }
    let pg = Arc::new(Postgres::start_trusting_tcp());
    *slot = Arc::downgrade(&pg);
    pg
}

/// `TETHER_CLUSTER_URL` for the commands the suite starts: the switch's server's URL while one
/// lives, else `None` (the switch off, or no sandbox alive).
pub(crate) fn switch_cluster_url() -> Option<String> {
    SWITCH_SERVER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .upgrade()
        .map(|pg| pg.url())
}

/// A private temp dir per test, see the module doc.
#[derive(Debug)]
pub struct Sandbox {
    guard: ProcessGuard,
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    counter: AtomicUsize,
    /// The cluster switch's server (see the module doc); dropped after `Drop::drop`'s sweep.
    cluster: Option<Arc<Postgres>>,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    /// Creates the temp dir and its `locks/`, `runs/`, `marks/`, `logs/`; with the cluster
    /// switch on, starts (or shares) its PostgreSQL server — from the calling thread, whose
    /// exit stops it (PDEATHSIG): create sandboxes on the test's own thread.
    pub fn new() -> Sandbox {
        let dir = tempfile::Builder::new()
            .prefix("tether-test-")
            .tempdir()
            .expect("creating the sandbox temp dir");
        // Canonical, so that paths match what /proc shows (no symlinked /tmp surprises).
        let root = dir
            .path()
            .canonicalize()
            .expect("canonicalizing the sandbox dir");
        for (sub, mode) in [
            ("locks", 0o755),
            ("runs", 0o700),
            ("marks", 0o755),
            ("logs", 0o755),
        ] {
            let path = root.join(sub);
            fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
        }
        Sandbox {
            guard: ProcessGuard::new(),
            dir: Some(dir),
            root,
            counter: AtomicUsize::new(0),
            cluster: cluster_switch().then(switch_server),
        }
    }

    /// The cluster switch's server, when the switch is on.
    pub fn cluster(&self) -> Option<&Postgres> {
        self.cluster.as_deref()
    }

    /// The sandbox root.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// tether's `--lock-dir`.
    pub fn lock_dir(&self) -> PathBuf {
        self.root.join("locks")
    }

    /// tether's `--runs-dir`.
    pub fn runs_dir(&self) -> PathBuf {
        self.root.join("runs")
    }

    /// Path of a marker file `marks/<name>` (not created).
    pub fn mark(&self, name: &str) -> PathBuf {
        self.root.join("marks").join(name)
    }

    /// A marker path `marks/<stem>-<n>`, unique within the sandbox (not created).
    pub fn fresh_mark(&self, stem: &str) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.mark(&format!("{stem}-{n}"))
    }

    /// `<lock dir>/app-<domain>.lock`.
    pub fn lock_path(&self, domain: &str) -> PathBuf {
        self.lock_dir().join(format!("app-{domain}.lock"))
    }

    /// `<lock dir>/slot-NN.lock`.
    pub fn slot_lock_path(&self, slot: u32) -> PathBuf {
        self.lock_dir().join(format!("slot-{slot:02}.lock"))
    }

    /// `<runs dir>/<id>/`.
    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.runs_dir().join(id)
    }

    /// The run record `<runs dir>/<id>/run.json`, parsed; `None` if missing or torn.
    pub fn run_record(&self, id: &str) -> Option<serde_json::Value> {
        crate::wait::read_json(self.run_dir(id).join("run.json"))
    }

    /// Waits (bounded by `TIMEOUT`) until run `id`'s record is in `state`; returns it.
    pub fn wait_record(&self, id: &str, state: &str) -> serde_json::Value {
        crate::wait::wait_some(
            &format!("run.json of {id} in state {state}"),
            crate::TIMEOUT,
            || self.run_record(id).filter(|r| r["state"] == state),
        )
    }

    /// The metadata in the app lockfile of `domain`, parsed; `None` if missing or torn.
    pub fn lock_metadata(&self, domain: &str) -> Option<serde_json::Value> {
        crate::wait::read_json(self.lock_path(domain))
    }

    /// The guard killed when the sandbox drops: record pids read from helpers' pid files here.
    pub fn guard(&self) -> &ProcessGuard {
        &self.guard
    }

    /// A fresh pair of log paths `logs/<stem>-<n>.stdout` / `.stderr`.
    pub(crate) fn log_paths(&self, stem: &str) -> (PathBuf, PathBuf) {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let logs = self.root.join("logs");
        (
            logs.join(format!("{stem}-{n}.stdout")),
            logs.join(format!("{stem}-{n}.stderr")),
        )
    }

    /// `tether run` with `--lock-dir`/`--runs-dir` of this sandbox.
    pub fn tether_run(&self) -> TetherCmd<'_> {
        TetherCmd::new(self, "run")
    }

    /// `tether janitor` with `--lock-dir`/`--runs-dir` of this sandbox.
    pub fn tether_janitor(&self) -> TetherCmd<'_> {
        TetherCmd::new(self, "janitor")
    }

    /// `tether status` with `--lock-dir`/`--runs-dir` of this sandbox.
    pub fn tether_status(&self) -> TetherCmd<'_> {
        TetherCmd::new(self, "status")
    }

    /// Any tether subcommand (or none: `""`), with the sandbox's dirs.
    pub fn tether(&self, subcommand: &str) -> TetherCmd<'_> {
        TetherCmd::new(self, subcommand)
    }

    /// A step script run by `sh -e -c` (or `.bash()`), in its own process group.
    pub fn step_shell(&self, script: &str) -> StepShellCmd<'_> {
        StepShellCmd::new(self, script)
    }

    /// A CI agent reading the output of `sh -c <script>` through a pipe (see [`crate::FakeAgent`]).
    pub fn fake_agent(&self, script: &str) -> crate::FakeAgentCmd<'_> {
        crate::FakeAgentCmd::new(self, script)
    }

    /// Live (non-zombie) processes other than this one whose command line, environment or
    /// working directory mentions the sandbox, described. For "nothing outlives the run" checks.
    pub fn leftovers(&self) -> Vec<String> {
        self.mentioning_pids()
            .into_iter()
            .map(describe_pid)
            .collect()
    }

    /// Waits until [`Sandbox::leftovers`] is empty; panics listing them otherwise.
    pub fn wait_no_leftovers(&self, timeout: Duration) {
        if !crate::wait::poll_until(timeout, || self.mentioning_pids().is_empty()) {
            panic!(
                "processes of this sandbox ({}) still alive after {timeout:?}:\n{}",
                self.root.display(),
                self.leftovers().join("\n")
            );
        }
    }

    fn mentioning_pids(&self) -> Vec<i32> {
        let me = std::process::id() as i32;
        let mut found = Vec::new();
        let Ok(procs) = fs::read_dir("/proc") else {
            return found;
        };
        for entry in procs.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            if pid != me && self.mentions(pid) {
                found.push(pid);
            }
        }
        found
    }

    /// Whether `pid` is alive (not a zombie) and its command line, environment or working
    /// directory mentions the sandbox.
    pub(crate) fn mentions(&self, pid: i32) -> bool {
        if proc_info(pid).is_none_or(|i| matches!(i.state, 'Z' | 'X')) {
            return false;
        }
        let needle = self.root.as_os_str().as_encoded_bytes();
        let dir = Path::new("/proc").join(pid.to_string());
        let mentions = |name: &str| {
            fs::read(dir.join(name))
                .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
        };
        fs::read_link(dir.join("cwd")).is_ok_and(|c| c.starts_with(&self.root))
            || mentions("cmdline")
            || mentions("environ")
    }

    /// SIGKILLs the guard's processes, then sweeps processes mentioning the sandbox until none
    /// is left (bounded). Idempotent; run by `Drop`.
    pub fn kill_everything(&self) {
        self.guard.kill_all();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut reported = Vec::new();
        loop {
            let pids = self.mentioning_pids();
            if pids.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "sandbox {}: could not kill {}",
                    self.root.display(),
                    pids.iter()
                        .map(|&p| describe_pid(p))
                        .collect::<Vec<_>>()
                        .join("; ")
                );
                return;
            }
            for pid in pids {
                if !reported.contains(&pid) {
                    eprintln!("sandbox: killing leftover {}", describe_pid(pid));
                    reported.push(pid);
                }
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(POLL); // ordering-free: poll step under a deadline
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.kill_everything();
        if std::env::var_os("TETHER_TEST_KEEP").is_some_and(|v| !v.is_empty() && v != "0") {
            if let Some(dir) = self.dir.take() {
                eprintln!("sandbox kept at {}", dir.keep().display());
            }
        }
    }
}
