//! Step 3 (CLI-CONTRACT §5): claim the run dir — create it, take `run.lock`, make the run's cgroup
//! — and everything a claimed run does before it holds its app: waiting visibly, giving up
//! without leaving anything behind.

use super::finish::Aborted;
use super::plan::Plan;
use super::{Ctx, Stop};
use crate::error::Error;
use crate::output;
use crate::state::applock::AppLock;
use crate::state::queue::{Queue, Ticket};
use crate::state::record::RunRecord;
use crate::state::rundir::{self, RunDir};
use crate::state::slots::Slot;
use crate::sys::cgroup::RunCgroup;
use crate::sys::fault::fault_pause;
use crate::sys::supervisor::Supervisor;
use std::collections::HashSet;

/// A run that holds its run dir (and maybe, on the way to `Held`, its app lock and a slot),
/// but has not touched its app.
pub(super) struct Claimed {
    pub(super) ctx: Ctx,
    pub(super) dir: RunDir,
    /// The run dir was made now (else it was a dead run's, or a kept one).
    pub(super) fresh: bool,
    /// A dead run's unclean record found in our run dir (same run id reused, same app): it is
    /// reaped under our app lock, and its record must survive until then.
    pub(super) own_dead: Option<RunRecord>,
    pub(super) app_lock: Option<AppLock>,
    pub(super) slot: Option<Slot>,
    /// The `queued` record has been written (only runs that wait write it).
    pub(super) queued_noted: bool,
    /// Run ids this run has already asked to cancel (each is signalled once).
    pub(super) cancelled: HashSet<String>,
    /// The ticket taken as the run arrived, before the claim (`waitline::arrival_ticket`).
    pub(super) early: Option<(Queue, Ticket)>,
}

impl Plan {
    /// Create the state dirs if needed, claim the run dir, make the cgroup.
    pub(super) fn claim(self, sup: &mut Supervisor) -> Result<Claimed, Aborted> {
        let (spec, dirs) = self.open();
        let dirs = match dirs {
            Ok(d) => d,
            Err(e) => return Err(Aborted::before_claim(spec, e)),
        };
        let ctx = Ctx::new(spec, dirs.lock, dirs.runs);
        if let Err(stop) = super::check_funnel(sup, &ctx) {
            return Err(Aborted::from_ctx(ctx, stop));
        }
        // A busy app: in its queue at once, in arrival order (PROTOCOL §15). Left on any
        // abort below (the ticket goes with the `Claimed`, or with this frame).
        let early = match super::waitline::arrival_ticket(&ctx, sup) {
            Ok(t) => t,
            Err(stop) => return Err(Aborted::from_ctx(ctx, stop)),
        };
        fault_pause("TETHER_FAULT_PAUSE_BEFORE_CLAIM");
        let claim = match rundir::claim(&ctx.runs_dir, &ctx.spec.run_id) {
            Ok(c) => c,
            Err(e) => return Err(Aborted::from_ctx(ctx, Stop::Fail(e))),
        };
        let mut claimed = Claimed {
            ctx,
            dir: claim.dir,
            fresh: !claim.existed,
            own_dead: None,
            app_lock: None,
            slot: None,
            queued_noted: false,
            cancelled: HashSet::new(),
            early,
        };
        fault_pause("TETHER_FAULT_PAUSE_AFTER_CLAIM");
        match claimed.settle_claim(claim.dead, sup) {
            Ok(()) => Ok(claimed),
            Err(stop) => Err(claimed.abort(stop)),
        }
    }
}

impl Claimed {
    fn settle_claim(&mut self, dead: Option<RunRecord>, sup: &mut Supervisor) -> Result<(), Stop> {
        if let Some(dead) = dead {
            if dead.meta.app == self.ctx.spec.app.as_str() {
                // Reaped under our own app lock in step 5.
                self.own_dead = Some(dead);
            } else {
                // It waits for that app's lock: never while standing in our app's queue
                // (PROTOCOL §15, "Why it cannot deadlock"). It queues again afterwards.
                self.early = None;
                self.reap_own_dead_of_other_app(dead, sup)?;
            }
        }
        self.make_cgroup();
        if self.own_dead.is_none() {
            self.prepare_dir(self.fresh)?;
        }
        super::check_funnel(sup, &self.ctx)
    }

    /// The run's cgroup is made while still queued: off the app lock's critical path.
    fn make_cgroup(&mut self) {
        let cgroup = if std::env::var_os("TETHER_NO_CGROUP").is_some_and(|v| v == "1") {
            Err("TETHER_NO_CGROUP=1".to_string())
        } else {
            let name = self.ctx.record.meta.token.clone().unwrap_or_default();
            RunCgroup::create(&name)
        };
        match cgroup {
            Ok(cg) => {
                output::debug("cgroup", &format!("run cgroup {}", cg.path().display()));
                self.ctx.record.meta.cgroup = Some(cg.path().display().to_string());
                self.ctx.cgroup = Some(cg);
            }
            Err(why) => output::debug(
                "cgroup",
                &format!("no cgroup for this run ({why}); using process group + descendants"),
            ),
        }
    }

    /// Empty a reused dir and create `tmp/`. The `queued` record is written only if the run
    /// has to wait (`note_queued`): an uncontended run goes straight to `running`. A run dir
    /// without a record is safe from janitors while its `run.lock` is held.
    pub(super) fn prepare_dir(&mut self, fresh: bool) -> Result<(), Stop> {
        let spares = rundir::spares_needed(self.ctx.spec.teardown.is_some());
        self.dir
            .prepare(fresh)
            .and_then(|()| self.dir.prepare_spares(spares))
            .map_err(|e| Stop::Fail(Error::path("cannot prepare run dir", &self.dir.path(), e)))
    }

    /// Make a waiting run visible (`status`, a reaper after a crash) as `queued`, once.
    pub(super) fn note_queued(&mut self) {
        // A reused dead run's record stays until it is reaped: the reaper takes its teardown
        // command from there.
        if self.queued_noted || self.own_dead.is_some() {
            return;
        }
        self.queued_noted = true;
        if let Err(e) = self.dir.write_record(&self.ctx.record) {
            output::warn(
                "record",
                &format!("cannot write {}: {e}", self.dir.record_path().display()),
            );
        }
        // That write used a spare; make it good while we wait.
        let spares = rundir::spares_needed(self.ctx.spec.teardown.is_some());
        let _ = self.dir.prepare_spares(spares);
    }

    /// Give up before the app was touched: leave nothing behind (a dead run's record in our
    /// dir stays for the next reaper).
    pub(super) fn abort(self, stop: Stop) -> Aborted {
        let Claimed {
            mut ctx,
            dir,
            own_dead,
            app_lock,
            slot,
            ..
        } = self;
        if let Some(cg) = ctx.cgroup.take() {
            let _ = cg.remove();
        }
        if let Some(slot) = slot {
            slot.lock.release();
        }
        // Its cluster row goes with it (PROTOCOL §17): on the lock's session when it held the
        // lock (it ran nothing: nothing to reap), else on a session of its own.
        if let Some(mut lock) = app_lock {
            if let Err(e) = lock.remove_row(ctx.spec.run_id.as_str()) {
                super::teardown::settle_row_elsewhere(&ctx, &e);
            }
            lock.release();
        } else {
            ctx.app_locks.forget_waiting_row();
        }
        if own_dead.is_some() {
            dir.release();
        } else if let Err(e) = dir.remove() {
            output::warn("cleanup", &format!("cannot remove run dir: {e}"));
        }
        Aborted::from_ctx(ctx, stop)
    }
}
