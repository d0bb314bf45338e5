//! Processes: liveness as the kernel sees it, process-tree queries, and leak guards.
//!
//! Liveness comes from `/proc/<pid>/stat`: a zombie (`Z`) or dead (`X`) process is *not*
//! alive, because a process tether killed may sit unreaped for a moment (or forever, when it
//! was re-parented to an init that does not reap). A pid is identified by (pid, start time), so a
//! guard never kills a recycled pid. The guards here are the last line of defence: a failing
//! test must not leave its process trees running.

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::Mutex;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::wait::{poll_exit, poll_some, poll_until};

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: i32,
    /// `comm` (the executable's name, at most 15 bytes).
    pub comm: String,
    /// `R`, `S`, `D`, `Z`, `T`, …
    pub state: char,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// Start time in clock ticks since boot: with the pid, identifies the process.
    pub start_time: u64,
}

/// Reads `/proc/<pid>/stat`; `None` when the process does not exist (any more).
pub fn proc_info(pid: i32) -> Option<ProcInfo> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_owned();
    // Fields after the comm, starting with field 3 (state).
    let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    Some(ProcInfo {
        pid,
        comm,
        state: rest.first()?.chars().next()?,
        ppid: rest.get(1)?.parse().ok()?,
        pgid: rest.get(2)?.parse().ok()?,
        sid: rest.get(3)?.parse().ok()?,
        start_time: rest.get(19)?.parse().ok()?,
    })
}

/// True while `pid` exists and is neither a zombie nor dead. False for ESRCH.
pub fn pid_alive(pid: i32) -> bool {
    match proc_info(pid) {
        Some(info) => !matches!(info.state, 'Z' | 'X'),
        // /proc unreadable mid-exit: ask the kernel directly.
        None => !matches!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH)),
    }
}

/// `comm` of `pid` (e.g. `tether`, `sh`, `tree-helper`), if it exists.
pub fn pid_comm(pid: i32) -> Option<String> {
    proc_info(pid).map(|i| i.comm)
}

/// One line describing `pid` for failure messages: stat fields and command line.
pub(crate) fn describe_pid(pid: i32) -> String {
    match proc_info(pid) {
        Some(i) => {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .trim_end_matches('\0')
                        .replace('\0', " ")
                })
                .unwrap_or_default();
            // Whose it is: the run id it carries and its cgroup (for leftovers).
            let run = fs::read(format!("/proc/{pid}/environ"))
                .ok()
                .and_then(|env| {
                    env.split(|&b| b == 0)
                        .find_map(|v| v.strip_prefix(b"TETHER_RUN_ID".as_slice()))
                        .map(|v| {
                            String::from_utf8_lossy(v.strip_prefix(b"=").unwrap_or(v)).into_owned()
                        })
                })
                .map(|id| format!(" run {id}"))
                .unwrap_or_default();
            let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .ok()
                .and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("0::"))
                        .map(str::to_owned)
                })
                .map(|c| format!(" cgroup {c}"))
                .unwrap_or_default();
            format!(
                "pid {pid} ({}) state {} ppid {} pgid {} sid {}{run}{cgroup}: {cmdline}",
                i.comm, i.state, i.ppid, i.pgid, i.sid
            )
        }
        None => format!("pid {pid} (gone)"),
    }
}

/// Whether `pid` has `sig` set to SIG_IGN (from `SigIgn` in `/proc/<pid>/status`). Lets a test
/// know an ignore-TERM helper is armed without sending it anything.
pub fn sig_ignored(pid: i32, sig: Signal) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1u64 << (sig as i32 - 1)) != 0)
}

/// Direct children of `pid` (from `/proc/<pid>/task/*/children`).
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut kids = Vec::new();
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(text) = fs::read_to_string(task.path().join("children")) {
                kids.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok()),
                );
            }
        }
    }
    kids.sort_unstable();
    kids.dedup();
    kids
}

/// All descendants of `pid` that are still its descendants (orphans re-parented elsewhere are
/// not), breadth first.
pub fn descendants_of(pid: i32) -> Vec<i32> {
    let mut all = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for kid in children_of(p) {
            if !all.contains(&kid) {
                all.push(kid);
                frontier.push(kid);
            }
        }
    }
    all
}

/// Waits until `parent` has a live child whose `comm` is `comm`; returns its pid. Used to find
/// tether's front under a [`crate::StepShell`], or tether's core under the front.
pub fn wait_child_named(parent: i32, comm: &str, timeout: Duration) -> i32 {
    if let Some(child) = poll_some(timeout, || {
        children_of(parent)
            .into_iter()
            .find(|&c| pid_alive(c) && pid_comm(c).as_deref() == Some(comm))
    }) {
        return child;
    }
    let kids: Vec<String> = children_of(parent).into_iter().map(describe_pid).collect();
    panic!(
        "timed out after {timeout:?} waiting for a child named {comm:?} of {}\nchildren: {kids:#?}",
        describe_pid(parent)
    );
}

/// Polls until `pid` is not alive (gone or zombie); returns whether it happened in time.
pub fn poll_pid_gone(pid: i32, timeout: Duration) -> bool {
    poll_until(timeout, || !pid_alive(pid))
}

/// SIGKILLs a run's core (`core`) so that its leftovers outlive it, as the single-host cases of
/// a dead run mean: nobody kills them before the next run or janitor does. Under the cluster
/// switch a live front would (its aftercare, DECISIONS D77), so there the front (the core's
/// parent) is stopped first and SIGKILLed once the core is dead — a host whose tether is gone
/// entirely; the front then ends killed by SIGKILL instead of exiting 137
/// ([`sigkilled_core_front_status`]).
pub fn sigkill_core(core: i32) {
    let front = crate::cluster_switch()
        .then(|| proc_info(core).map(|p| p.ppid))
        .flatten();
    let sig = |pid: i32, s: Signal| {
        kill(Pid::from_raw(pid), s).unwrap_or_else(|e| panic!("kill -{s} {pid}: {e}"))
    };
    if let Some(front) = front {
        sig(front, Signal::SIGSTOP);
    }
    sig(core, Signal::SIGKILL);
    if let Some(front) = front {
        wait_pid_gone(core, crate::TIMEOUT);
        sig(front, Signal::SIGKILL);
    }
}

/// How the front of a run whose core [`sigkill_core`] killed ends: `Ok(137)` (it mirrors the
/// core's death), or under the cluster switch `Err(SIGKILL)` (it was killed too).
pub fn sigkilled_core_front_status() -> Result<i32, Signal> {
    if crate::cluster_switch() {
        Err(Signal::SIGKILL)
    } else {
        Ok(137)
    }
}

/// Waits until `pid` is not alive; panics describing the process otherwise.
pub fn wait_pid_gone(pid: i32, timeout: Duration) {
    if !poll_pid_gone(pid, timeout) {
        panic!(
            "timed out after {timeout:?} waiting for pid {pid} to die: {}",
            describe_pid(pid)
        );
    }
}

/// Polls until none of `pids` is alive; returns whether it happened in time.
pub fn poll_all_gone(pids: &[i32], timeout: Duration) -> bool {
    poll_until(timeout, || pids.iter().all(|&p| !pid_alive(p)))
}

/// Waits until none of `pids` is alive; panics listing the survivors otherwise.
pub fn wait_all_gone(pids: &[i32], timeout: Duration) {
    if !poll_all_gone(pids, timeout) {
        let survivors: Vec<String> = pids
            .iter()
            .filter(|&&p| pid_alive(p))
            .map(|&p| describe_pid(p))
            .collect();
        panic!(
            "timed out after {timeout:?} waiting for {} pids to die; survivors:\n{}",
            pids.len(),
            survivors.join("\n")
        );
    }
}

/// SIGKILLs the process group `pgid` that the process started at clock tick `leader_start` led,
/// unless that number now names another process. Once a reaped leader's group is empty its pid is
/// free; with a small `pid_max` (32768 here) a parallel suite reuses it within seconds, and a
/// blind `kill(-pid)` would then hit whatever group the new owner leads — another test's tether.
/// While any member of our group lives, the number cannot be reused, so the kill reaches exactly
/// our leftovers.
pub(crate) fn kill_own_group(pgid: i32, leader_start: Option<u64>) {
    let recycled = match (proc_info(pgid), leader_start) {
        (Some(now), Some(then)) => now.start_time != then,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if pgid > 1 && !recycled {
        let _ = kill(Pid::from_raw(-pgid), Signal::SIGKILL);
    }
}

/// SIGKILLs recorded pids and process groups when dropped (or on [`ProcessGuard::kill_all`]).
///
/// A pid is recorded with its start time and killed only if the same process still exists, so
/// a recycled pid is never hit. Shareable (`&self` methods) so one guard can serve a whole test.
#[derive(Debug, Default)]
pub struct ProcessGuard {
    inner: Mutex<GuardInner>,
}

#[derive(Debug, Default)]
struct GuardInner {
    pids: Vec<(i32, u64)>,
    pgids: Vec<(i32, Option<u64>)>,
}

impl ProcessGuard {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `pid` (ignored if it is already gone).
    pub fn pid(&self, pid: i32) {
        if let Some(info) = proc_info(pid) {
            self.lock().pids.push((pid, info.start_time));
        }
    }

    /// Records every pid of `pids`.
    pub fn pids(&self, pids: &[i32]) {
        for &pid in pids {
            self.pid(pid);
        }
    }

    /// Records process group `pgid` (killed with `kill(-pgid, SIGKILL)`).
    pub fn pgid(&self, pgid: i32) {
        let leader_start = proc_info(pgid).map(|i| i.start_time);
        self.lock().pgids.push((pgid, leader_start));
    }

    /// SIGKILLs everything recorded that still exists. Idempotent.
    pub fn kill_all(&self) {
        let (pids, pgids) = {
            let mut inner = self.lock();
            (
                std::mem::take(&mut inner.pids),
                std::mem::take(&mut inner.pgids),
            )
        };
        for (pgid, leader_start) in pgids {
            kill_own_group(pgid, leader_start);
        }
        for (pid, start) in pids {
            if proc_info(pid).is_some_and(|i| i.start_time == start) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GuardInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// A child process of the test that is SIGKILLed (and its process group too, when it leads
/// one) and reaped when dropped. For helpers the test starts directly.
#[derive(Debug)]
pub struct KillOnDrop {
    child: Child,
    what: String,
    /// The child leads its own process group; its start time, to tell it from a later process
    /// that got the same pid.
    own_group: Option<Option<u64>>,
}

impl KillOnDrop {
    /// Spawns `cmd` (stdin from `/dev/null`). Put it in its own process group first with
    /// `cmd.process_group(0)` if the whole group should die with it.
    pub fn spawn(cmd: &mut Command) -> KillOnDrop {
        let what = crate::display_command(cmd);
        let child = cmd
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
        let own_group = proc_info(child.id() as i32)
            .filter(|i| i.pgid == i.pid)
            .map(|i| Some(i.start_time));
        KillOnDrop {
            child,
            what,
            own_group,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The underlying [`Child`].
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid()), sig)
            .unwrap_or_else(|e| panic!("kill({}, {sig}) of {}: {e}", self.pid(), self.what));
    }

    /// Waits for the process to exit and reaps it; `None` on timeout. Repeated calls return the
    /// same status.
    pub fn try_wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        poll_exit(&mut self.child, timeout)
    }

    /// Waits for the process to exit and reaps it; panics on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.try_wait_exit(timeout) {
            Some(status) => status,
            None => panic!(
                "timed out after {timeout:?} waiting for {} to exit: {}",
                self.what,
                describe_pid(self.pid())
            ),
        }
    }

    /// Exit code, or 128 + signal, of an exited process (for messages and quick asserts).
    pub fn code_of(status: ExitStatus) -> i32 {
        status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(-1)
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // The group first: its other members may outlive an already-exited leader.
        if let Some(start) = self.own_group {
            kill_own_group(self.pid(), start);
        }
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The names (`comm`) of `pid`'s threads: the main thread first, then the others sorted.
/// Empty when the process is gone.
pub fn thread_names(pid: i32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut others = Vec::new();
    let mut main = None;
    for entry in dir.flatten() {
        let tid = entry.file_name().to_string_lossy().into_owned();
        let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")) else {
            continue;
        };
        let comm = comm.trim_end().to_owned();
        if tid == pid.to_string() {
            main = Some(comm);
        } else {
            others.push(comm);
        }
    }
    others.sort();
    main.into_iter().chain(others).collect()
}
