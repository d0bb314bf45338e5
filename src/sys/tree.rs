//! Killing a run's whole process tree, and nothing else (CLI-CONTRACT §6 step 2).
//!
//! The failure this closes: a cleanup that unmounts or deletes while `make` children still
//! run ("device busy"), or a daemon the command double-forked outliving the run. A run's
//! processes are found three ways, because each alone has a hole:
//! - its cgroup, when it has one (nothing escapes it);
//! - its process group and every descendant of the core — the core is a child subreaper, so
//!   processes that `setsid()` or double-fork are re-parented to it and stay descendants;
//! - for a *dead* run (its core gone, so no descendants): processes carrying its
//!   `TETHER_RUN_ID` and unique `TETHER_RUN_TOKEN` in their environment.
//!
//! Termination is TERM (+CONT for stopped ones), a grace period, then KILL, repeated until a
//! fresh look finds nothing: a process forked between two looks is caught by the next.

use crate::sys::cgroup::RunCgroup;
use crate::sys::procfs;
use crate::sys::signals::until;
use crate::sys::supervisor::Supervisor;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::time::{Duration, Instant};

/// What belongs to a run.
#[derive(Debug, Default, Clone)]
pub(crate) struct Members {
    /// The command's process group id (= its pid).
    pub(crate) pgid: Option<i32>,
    /// Descendants of this pid (the live core) belong to the run.
    pub(crate) descendants_of: Option<i32>,
    pub(crate) cgroup: Option<RunCgroup>,
    /// `NAME=value` markers that must all be in a process's environment.
    pub(crate) env_markers: Vec<String>,
    /// A dead run known only by its id: processes carrying it and the token of a core that
    /// is no longer alive (`procfs::pids_of_dead_run`).
    pub(crate) dead_run: Option<String>,
}

impl Members {
    /// The live processes of the run right now (never ourselves or our ancestors).
    pub(crate) fn list(&self) -> Vec<i32> {
        let me = std::process::id() as i32;
        let mut pids = Vec::new();
        if let Some(root) = self.descendants_of {
            pids.extend(procfs::descendants(root));
        }
        if let Some(cg) = &self.cgroup {
            pids.extend(cg.pids());
        }
        if !self.env_markers.is_empty() || self.dead_run.is_some() {
            let ancestors = procfs::ancestors_of_self();
            let mut found = procfs::pids_with_env(&self.env_markers);
            if let Some(id) = &self.dead_run {
                found.extend(procfs::pids_of_dead_run(id));
            }
            pids.extend(found.into_iter().filter(|p| !ancestors.contains(p)));
        }
        pids.sort_unstable();
        pids.dedup();
        pids.retain(|&p| p != me && procfs::is_alive(p));
        pids
    }

    fn signal(&self, sig: Signal, pids: &[i32]) {
        // ESRCH (the process is gone already) is what we want; nothing to report.
        if let Some(pg) = self.pgid {
            let _ = kill(Pid::from_raw(-pg), sig);
        }
        for &p in pids {
            let _ = kill(Pid::from_raw(p), sig);
            if sig == Signal::SIGTERM {
                let _ = kill(Pid::from_raw(p), Signal::SIGCONT);
            }
        }
        if let Some(cg) = &self.cgroup {
            if sig == Signal::SIGKILL {
                cg.kill_all();
            } else {
                cg.signal(sig);
            }
        }
    }
}

/// Outcome of a termination.
#[derive(Debug, Default)]
pub(crate) struct Terminated {
    /// How many processes there were when it began.
    pub(crate) found: usize,
    /// Processes that needed SIGKILL after the grace period.
    pub(crate) killed_after_grace: usize,
    /// Which processes those were (for the debug line).
    pub(crate) late: Vec<i32>,
    /// Processes still alive after the KILL phase gave up (should be empty).
    pub(crate) survivors: Vec<i32>,
}

/// TERM the run's processes, wait up to `grace`, KILL what remains, and return when nothing
/// remains. Our own children are reaped along the way (into the supervisor's table), and funnel
/// events that arrive meanwhile stay queued in the supervisor: a termination is never cut short.
pub(crate) fn terminate(members: &Members, grace: Duration, sup: &mut Supervisor) -> Terminated {
    end(members, Some(grace), sup)
}

/// SIGKILL the run's processes at once, no SIGTERM and no grace, and return when nothing
/// remains: for a lost cluster lock, where the fence deadline matters more than a clean exit
/// (PROTOCOL §16, D57).
pub(crate) fn kill_at_once(members: &Members, sup: &mut Supervisor) -> Terminated {
    end(members, None, sup)
}

/// `grace` `None`: straight to SIGKILL.
fn end(members: &Members, grace: Option<Duration>, sup: &mut Supervisor) -> Terminated {
    let mut out = Terminated::default();
    sup.reap();
    let mut remaining = members.list();
    out.found = remaining.len();
    if remaining.is_empty() {
        // The common case (the command exited and left nothing): no signals, no waiting.
        return out;
    }
    if let Some(grace) = grace {
        members.signal(Signal::SIGTERM, &remaining);
        let grace_end = Instant::now() + grace;
        loop {
            sup.reap();
            remaining = members.list();
            if remaining.is_empty() || Instant::now() >= grace_end {
                break;
            }
            // Woken early by SIGCHLD; otherwise look again soon (exits of non-children do not
            // signal us).
            sup.pause(until(grace_end).min(Duration::from_millis(10)));
        }
        if remaining.is_empty() {
            return out;
        }
        out.killed_after_grace = remaining.len();
    }
    out.late = remaining.clone();
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        members.signal(Signal::SIGKILL, &remaining);
        sup.reap();
        remaining = members.list();
        if remaining.is_empty() || Instant::now() >= give_up {
            break;
        }
        sup.pause(Duration::from_millis(5));
    }
    sup.reap();
    out.survivors = remaining;
    out
}
