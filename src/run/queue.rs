//! Steps 4 and 6 (CLI-CONTRACT §5, PROTOCOL §12, PROTOCOL §12): waiting for the app lock — visibly, interruptibly,
//! within `--lock-timeout`, under the busy policy (`wait`, `fail`, `cancel-older`) — and for a
//! host slot. The lock itself comes from the lock backend (`state::lock::AppLocks`).

use super::claim::Claimed;
use super::finish::{announce_acquired, announce_waiting, describe_holder};
use super::Stop;
use crate::config::duration;
use crate::error::Error;
use crate::ident::names::{Domain, RunId};
use crate::output;
use crate::state::applock::{AppLock, Attempt, BusyLock};
use crate::state::cluster_lock::into_error;
use crate::state::record::{self, LockMeta};
use crate::state::rundir;
use crate::sys::signals::{until, Event};
use crate::sys::supervisor::Supervisor;
use std::path::Path;
use std::time::{Duration, Instant};

/// How often a run waiting for a host slot looks again.
const SLOT_POLL: Duration = Duration::from_millis(20);
/// How often a plain wait looks for a holder of its group to cancel (`cancel-older`).
const LOOK_AGAIN: Duration = Duration::from_millis(200);

impl Claimed {
    /// Take the lock of `app`, waiting visibly (and interruptibly) while it is busy. `ours`:
    /// the run's own app (in its queue, under the busy policy: `waitline.rs`), else the app of
    /// a dead run reusing our id (a plain wait on the lock).
    pub(super) fn acquire(
        &mut self,
        app: &Domain,
        ours: bool,
        sup: &mut Supervisor,
    ) -> Result<AppLock, Stop> {
        if ours {
            return self.acquire_queued(app, sup);
        }
        let locks = self.ctx.app_locks.clone();
        let started = Instant::now();
        let mut announced = false;
        loop {
            let busy = match locks.try_acquire(app) {
                Ok(Attempt::Held(l)) => {
                    if announced {
                        announce_acquired(app, started);
                    }
                    return Ok(l);
                }
                Ok(Attempt::Busy(b)) => b,
                Err(e) => return Err(Stop::Fail(into_error(e, "app lock"))),
            };
            announced = true;
            if let Some(held) = self.wait_busy(app, busy, started, false, sup)? {
                return Ok(held);
            }
        }
    }

    /// Wait for a busy app lock, visibly (the waiting line now and every wait-progress
    /// interval), interruptibly and within `--lock-timeout` counted from `started`;
    /// `cancel_older`: look for a holder of our group on this host every [`LOOK_AGAIN`].
    /// `Ok(None)`: the lockfile was replaced meanwhile — try again.
    pub(super) fn wait_busy(
        &mut self,
        app: &Domain,
        busy: BusyLock,
        started: Instant,
        cancel_older: bool,
        sup: &mut Supervisor,
    ) -> Result<Option<AppLock>, Stop> {
        announce_waiting(app, &describe_holder(busy.holder(), busy.holder_pid()));
        let waiting = busy
            .wait()
            .map_err(|e| Stop::Fail(into_error(e, "cannot wait for lock")))?;
        let mut next_progress = Instant::now() + self.ctx.spec.wait_progress;
        let mut next_look = Instant::now();
        let give_up = self.ctx.spec.lock_timeout.map(|t| started + t);
        loop {
            let mut timeout = until(next_progress);
            if cancel_older {
                if Instant::now() >= next_look {
                    let (meta, pid) = self.ctx.app_locks.holder_now(app);
                    self.cancel_holder_if_same_group(meta, pid);
                    next_look = Instant::now() + LOOK_AGAIN;
                }
                timeout = timeout.min(until(next_look));
            }
            if let Some(g) = give_up {
                timeout = timeout.min(until(g));
            }
            let events = sup.wait(Some(timeout), Some(waiting.ready_fd()));
            if events.contains(&Event::Ready) {
                break;
            }
            super::act_on(events, &self.ctx)?;
            if give_up.is_some_and(|g| Instant::now() >= g) {
                return Err(Stop::Busy(format!(
                    "app lock {app}: still held after --lock-timeout {} — giving up",
                    duration::canonical(self.ctx.spec.lock_timeout.unwrap_or_default())
                )));
            }
            if Instant::now() >= next_progress {
                announce_waiting(
                    app,
                    &describe_holder(waiting.holder(), waiting.holder_pid()),
                );
                next_progress = Instant::now() + self.ctx.spec.wait_progress;
            }
        }
        match waiting.finish() {
            Ok(Some(held)) => {
                announce_acquired(app, started);
                Ok(Some(held))
            }
            // The janitor unlinked the file we waited on: start over on the new inode.
            Ok(None) => {
                output::debug("lock", "lockfile was replaced while waiting; retrying");
                Ok(None)
            }
            Err(e) => Err(Stop::Fail(into_error(e, "app lock"))),
        }
    }

    /// Step 6: the lowest free slot below `count`, waiting (visibly, interruptibly) while all
    /// are busy. Free slots are found by polling: a flock cannot wait for "any of N".
    pub(super) fn take_slot(&mut self, count: u32, sup: &mut Supervisor) -> Result<(), Stop> {
        let started = Instant::now();
        let mut next_progress = started;
        let mut waited = false;
        loop {
            match crate::state::slots::try_take(&self.ctx.lock_dir, count) {
                Ok(Some(slot)) => {
                    let after = if waited {
                        format!(" after {}", duration::human(started.elapsed()))
                    } else {
                        String::new()
                    };
                    output::emit(
                        output::Level::Info,
                        "slot",
                        &format!("slot {} of {count} taken{after}", slot.label()),
                        &[("slot", slot.label().into()), ("slots", count.into())],
                    );
                    let _ = record::write_meta(slot.lock.file(), &self.ctx.record.meta);
                    self.slot = Some(slot);
                    return Ok(());
                }
                Ok(None) => {}
                Err(e) => return Err(Stop::Fail(Error::tether(format!("slot lock: {e}")))),
            }
            self.note_queued();
            waited = true;
            if Instant::now() >= next_progress {
                let busy = if count == 1 {
                    "the 1 slot is busy — waiting".to_string()
                } else {
                    format!("all {count} slots busy — waiting")
                };
                output::emit(
                    output::Level::Info,
                    "slots-busy",
                    &busy,
                    &[("slots", count.into())],
                );
                next_progress = Instant::now() + self.ctx.spec.wait_progress;
            }
            let events = sup.wait(Some(SLOT_POLL), None);
            super::act_on(events, &self.ctx)?;
        }
    }

    /// `--on-busy cancel-older` (PROTOCOL §12): SIGTERM the holder when its own record has our
    /// group key and its pid is the lock's holder in the kernel's lock table and still the
    /// process that wrote the record (start time). A holder of another group, or one we cannot
    /// identify, is never signalled. True: the holder is an older run of our group (signalled
    /// now or before).
    pub(super) fn cancel_holder_if_same_group(
        &mut self,
        meta: Option<LockMeta>,
        holder: Option<i32>,
    ) -> bool {
        match self.older_holder_of_our_group(meta, holder) {
            Some(meta) => {
                self.cancel_holder(meta);
                true
            }
            None => false,
        }
    }

    /// The holder's metadata when it is an older run of our group, verified as above (or one
    /// we already signalled).
    pub(super) fn older_holder_of_our_group(
        &self,
        meta: Option<LockMeta>,
        holder: Option<i32>,
    ) -> Option<LockMeta> {
        let group = self.ctx.spec.group.as_deref()?;
        let meta = meta?;
        if self.cancelled.contains(&meta.run_id) {
            return Some(meta);
        }
        if meta.run_id == self.ctx.spec.run_id.as_str()
            || meta.started_at > self.ctx.record.meta.started_at
        {
            return None;
        }
        let id = RunId::parse(&meta.run_id).ok()?;
        if Path::new(&meta.run_dir) != rundir::path_of(&self.ctx.runs_dir, &id) {
            return None;
        }
        let rec = rundir::open_trusted(&self.ctx.runs_dir, id.as_str())
            .ok()
            .and_then(|d| record::read_record(&d).ok())?;
        if rec.meta.run_id != meta.run_id || rec.group.as_deref() != Some(group) {
            return None;
        }
        if holder != Some(meta.pid)
            || crate::sys::procfs::start_time(meta.pid) != Some(meta.pid_start)
        {
            return None;
        }
        Some(meta)
    }

    /// SIGTERM a verified holder of our group, once.
    pub(super) fn cancel_holder(&mut self, meta: LockMeta) {
        if self.cancelled.contains(&meta.run_id) {
            return;
        }
        let group = self.ctx.spec.group.clone().unwrap_or_default();
        output::emit(
            output::Level::Info,
            "cancelling",
            &format!("cancelling older run {} of group {group}", meta.run_id),
            &[
                ("run_id", meta.run_id.clone().into()),
                ("group", group.clone().into()),
            ],
        );
        terminate(&meta.run_id, meta.pid);
        self.cancelled.insert(meta.run_id);
    }
}

/// One SIGTERM to the core of an older run of our group (a failure is said, not fatal).
pub(super) fn terminate(run_id: &str, pid: i32) {
    if let Err(e) = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    ) {
        output::warn(
            "cancelling",
            &format!("cannot signal run {run_id} (pid {pid}): {e}"),
        );
    }
}
