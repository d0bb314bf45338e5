//! Steps 4–7 (CLI-CONTRACT §5): take the app lock, reap dead runs of the app (reconcile, PROTOCOL §6), take
//! a slot, apply limits, prepare what the command may write, and write `running`. `hold` is the
//! last step that may give up: the `Held` it returns has touched the app.

use super::claim::Claimed;
use super::finish::Aborted;
use super::{write_state, Ctx, Stop};
use crate::config::env::RunVars;
use crate::error::{Error, Failure};
use crate::ident::names::Domain;
use crate::output;
use crate::reap::reaper::cluster::Here;
use crate::reap::reaper::{DeadRun, ReapFailed, ReapPolicy, Reaper};
use crate::state::applock::AppLock;
use crate::state::record::{RunRecord, State};
use crate::state::rundir::{self, RunDir};
use crate::state::slots::Slot;
use crate::sys::supervisor::Supervisor;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A run that holds its app: lock metadata and record say `running`.
pub(super) struct Held {
    pub(super) ctx: Ctx,
    pub(super) dir: RunDir,
    pub(super) app_lock: AppLock,
    pub(super) slot: Option<Slot>,
}

impl Claimed {
    /// Steps 4–7. On any stop before the `running` record, the claim is given up and nothing is
    /// left behind.
    pub(super) fn hold(mut self, sup: &mut Supervisor) -> Result<Held, Aborted> {
        if let Err(stop) = self.take_app(sup) {
            return Err(self.abort(stop));
        }
        let Claimed {
            mut ctx,
            mut dir,
            app_lock,
            slot,
            ..
        } = self;
        let Some(app_lock) = app_lock else {
            // take_app returns Ok only with the lock held.
            let stop = Stop::Fail(Error::tether("internal: the app lock was lost"));
            return Err(Aborted::from_ctx(ctx, stop));
        };
        // 7. Running: the app is ours.
        ctx.record.lock_wait_ms = Some(ctx.admission_wait().as_millis() as u64);
        ctx.record.meta.state = State::Running;
        write_state(&mut dir, Some(&app_lock), &ctx.record);
        // With a cluster, the front kills our leftovers at once should this core be SIGKILLed
        // (D77): the next holder, maybe on another host, waits for that.
        if let Some(will) = super::aftercare::will_of(&ctx) {
            sup.leave_will(&will);
        }
        Ok(Held {
            ctx,
            dir,
            app_lock,
            slot,
        })
    }

    fn take_app(&mut self, sup: &mut Supervisor) -> Result<(), Stop> {
        // 4. The app lock — with a cluster, after this host's share of earlier reaps: the
        // leftovers of its runs reaped on other hosts (PROTOCOL §17; their reapers may be
        // waiting for it while holding the very lock we are about to wait for).
        self.sweep_cluster_leftovers(sup)?;
        self.ctx.lock_wait.start();
        let app = self.ctx.spec.app.clone();
        let mut lock = self.acquire(&app, true, sup)?;
        self.ctx.lock_wait.stop();
        self.ctx.held_since = Some(Instant::now());
        self.ctx.record.fence = lock.fence();
        // A cluster lock is renewed from now on, and every wait of the run watches the renewal
        // (PROTOCOL §16): reaping, the slot wait, setup, the command and the teardown.
        let heartbeat = self.ctx.spec.cluster.as_ref().and_then(|target| {
            lock.start_heartbeat(&app, self.ctx.spec.run_id.as_str(), target.timing)
        });
        self.app_lock = Some(lock);
        match heartbeat {
            Some(Ok(lease)) => sup.watch_lease(lease),
            Some(Err(e)) => {
                return Err(Stop::Fail(Error::new(
                    Failure::Unavailable,
                    format!("app lock {app}: cannot start the cluster heartbeat: {e}"),
                )))
            }
            None => {}
        }
        // 5. Reconcile.
        self.reconcile(sup)?;
        if self.own_dead.take().is_some() {
            self.prepare_dir(false)?;
        }
        super::check_funnel(sup, &self.ctx)?;
        // 6. A host slot, if slots are configured.
        if let Some(count) = self.ctx.spec.slots {
            self.ctx.slot_wait.start();
            let taken = self.take_slot(count, sup);
            self.ctx.slot_wait.stop();
            taken?;
        }
        self.apply_limits();
        self.prepare_run_as_dirs()
    }

    fn reaper<'s>(&self, sup: &'s mut Supervisor) -> Reaper<'s> {
        Reaper::new(
            sup,
            Some(self.ctx.runs_dir.clone()),
            ReapPolicy {
                fallback_teardown: self.ctx.spec.teardown.clone(),
                teardown_timeout: self.ctx.spec.teardown_timeout,
                grace: self.ctx.spec.grace,
            },
            self.ctx.cgroup.clone(),
        )
    }

    /// With a cluster: kill the leftovers of this host's runs that were reaped elsewhere, on a
    /// session of its own (`<run id>.sweep`). The server unreachable stops the run here, as the
    /// lock would (exit 75, nothing left).
    fn sweep_cluster_leftovers(&mut self, sup: &mut Supervisor) -> Result<(), Stop> {
        let Some(target) = self.ctx.spec.cluster.clone() else {
            return Ok(());
        };
        let name = format!("{}.sweep", self.ctx.spec.run_id);
        let mut s =
            crate::cluster::session::Session::connect(&target, &name).map_err(Stop::Fail)?;
        // A schema not made yet has nothing to sweep (the lock's session makes it).
        if s.value("SELECT to_regclass('tether.runs') IS NOT NULL")
            .map_err(Stop::Fail)?
            != "t"
        {
            return Ok(());
        }
        let mut reaper = self.reaper(sup);
        reaper.sweep_reaped(&mut s, &Here::now());
        drop(reaper);
        super::check_funnel(sup, &self.ctx)
    }

    /// How long to wait for another host to confirm a reaped run's leftovers killed.
    fn leftovers_wait(&self) -> std::time::Duration {
        self.ctx
            .spec
            .cluster
            .as_ref()
            .and_then(|c| c.leftovers_wait)
            .unwrap_or(crate::config::settings::CLUSTER_LEFTOVERS_WAIT)
    }

    /// Step 5: reap dead unclean runs of our app (ours first, when we reuse a dead run's id).
    fn reconcile(&mut self, sup: &mut Supervisor) -> Result<(), Stop> {
        // Re-read under the app lock: another reaper may have settled it since our claim.
        let own_dead = self.own_dead.as_ref().and_then(|d| {
            self.dir
                .read_record()
                .ok()
                .filter(|r| r.meta.state != State::Clean && r.meta.run_id == d.meta.run_id)
        });
        let own_dir = self.dir.dir().clone();
        let app = self.ctx.spec.app.clone();
        let own_id = self.ctx.spec.run_id.to_string();
        let confirm = self.leftovers_wait();
        // With a cluster: the app's rows, read under its cluster lock in the acquisition's
        // round trip (DECISIONS D80). When they show nothing to settle — every other row a
        // waiter whose session is connected — and the local reconcile reaps nothing, no
        // statement is needed: the run goes on without a session of its own. Otherwise they
        // are read again and settled (PROTOCOL §17) on a session of the run's own
        // (`<run id>.reap`) — the lock's session belongs to the heartbeat, which must not pause
        // while a dead run's teardown runs.
        let first_rows = self.app_lock.as_mut().and_then(AppLock::take_cluster_rows);
        let quiet = own_dead.is_none()
            && first_rows
                .as_ref()
                .is_some_and(|rows| nothing_to_settle(rows, &own_id));
        let mut book = None;
        let mut reaper = self.reaper(sup);
        match (&self.ctx.spec.cluster, quiet) {
            (Some(_), true) => reaper.set_cluster_rows(first_rows.unwrap_or_default()),
            (Some(target), false) => {
                let mut s = match crate::cluster::session::Session::connect(
                    target,
                    &format!("{own_id}.reap"),
                ) {
                    Ok(s) => s,
                    Err(e) => return Err(Stop::Fail(e)),
                };
                match crate::cluster::runs::of_app(&mut s, app.as_str()) {
                    Ok(rows) => reaper.set_cluster_rows(rows),
                    Err(e) => return Err(Stop::Fail(e)),
                }
                book = Some(s);
            }
            (None, _) => {}
        }
        let mut result = Ok(());
        let mut reaped = 0;
        if let Some(dead) = own_dead {
            result = reaper.reap(own_dead_run(dead, own_dir));
            reaped += usize::from(result.is_ok());
        }
        if let (Ok(()), Some(lock)) = (&result, &self.app_lock) {
            result = reaper
                .reconcile(&app, lock, Some(&own_id))
                .map(|n| reaped += n);
        }
        // The quiet path's local reconcile touched a run after all: its row (if any) is
        // settled as on the other path.
        if let (Ok(()), Some(target), true) = (
            &result,
            &self.ctx.spec.cluster,
            quiet && !reaper.reaped_log().is_empty(),
        ) {
            match crate::cluster::session::Session::connect(target, &format!("{own_id}.reap")) {
                Ok(s) => book = Some(s),
                Err(e) => return Err(Stop::Fail(e)),
            }
        }
        // Then the cluster's dead runs of the app: rows of runs reaped here go, another host's
        // dead holder is reaped from its row.
        if let (Ok(()), Some(s)) = (&result, book.as_mut()) {
            result = reaper
                .reap_cluster(s, &app, &own_id, &Here::now(), confirm)
                .map(|n| reaped += n);
        }
        drop(reaper);
        self.ctx.reaps += reaped;
        if let Err(e) = result {
            return Err(Stop::Fail(self.reap_failed(e)));
        }
        // Funnel events that arrived while reaping: decided on now.
        super::check_funnel(sup, &self.ctx)
    }

    /// CLI-CONTRACT §5 step 3: our run id belonged to a dead run of another app. Reap it under that app's lock.
    pub(super) fn reap_own_dead_of_other_app(
        &mut self,
        dead: RunRecord,
        sup: &mut Supervisor,
    ) -> Result<(), Stop> {
        let other = Domain::parse(&dead.meta.app)
            .map_err(|e| Stop::Fail(Error::tether(format!("dead run record: {e}"))))?;
        let held = self.acquire(&other, false, sup)?;
        let own_dir = self.dir.dir().clone();
        let mut reaper = self.reaper(sup);
        let mut result = reaper.reap(own_dead_run(dead, own_dir));
        if result.is_ok() {
            result = reaper.reconcile(&other, &held, None).map(|_| ());
        }
        drop(reaper);
        held.release();
        if let Err(e) = result {
            return Err(Stop::Fail(self.reap_failed(e)));
        }
        self.prepare_dir(false)?;
        super::check_funnel(sup, &self.ctx)
    }

    /// A dead run could not be reaped: the run refuses to start (D7), and says how to give up
    /// on the dead run if its teardown can never succeed.
    fn reap_failed(&self, e: ReapFailed) -> Error {
        let hint = e
            .run_id
            .as_deref()
            .map(|id| {
                format!(
                    "; if its teardown can never succeed, give up on it with: {}",
                    crate::reap::forget::hint(
                        Some(self.ctx.lock_dir.path()),
                        Some(self.ctx.runs_dir.path()),
                        id
                    )
                )
            })
            .unwrap_or_default();
        Error::tether(format!("cannot start: {}{hint}", e.message))
    }

    /// `limits` (CLI-CONTRACT §10): cgroup controllers where available, rlimits for nofile and nproc
    /// (set in the child). Each limit that cannot be applied gets one warning.
    fn apply_limits(&self) {
        let l = &self.ctx.spec.limits;
        if l.memory.is_none() && l.pids.is_none() && l.cpu.is_none() {
            return;
        }
        let warnings = match &self.ctx.cgroup {
            Some(cg) => cg.apply_limits(l),
            None => [
                ("memory", l.memory.is_some()),
                ("pids", l.pids.is_some()),
                ("cpu", l.cpu.is_some()),
            ]
            .iter()
            .filter(|(_, set)| *set)
            .map(|(name, _)| format!("limits.{name} not applied: this run has no cgroup"))
            .collect(),
        };
        for w in warnings {
            output::warn("limits", &w);
        }
    }

    /// `run_env` dirs under the run dir are created (and, with `run_as`, owned by that user,
    /// like `tmp/`); the run dir becomes traversable (0711) so the user can reach them, while
    /// `run.json` stays owner-only. Setup and teardown get a `tether-tmp/` of their own. All
    /// through the run dir's fd: nothing here follows a symlink.
    fn prepare_run_as_dirs(&self) -> Result<(), Stop> {
        let base = self.dir.path();
        let run_dir = self.dir.dir();
        let fail = |what: &str, p: &Path, e: std::io::Error| Stop::Fail(Error::path(what, p, e));
        let slot = self.slot.as_ref().map(|s| s.label()).unwrap_or_default();
        let base_text = base.display().to_string();
        let vars = RunVars {
            run_dir: &base_text,
            run_id: self.ctx.spec.run_id.as_str(),
            app: self.ctx.spec.app.as_str(),
            slot: &slot,
        };
        let tmp = run_dir
            .open_dir(rundir::TMP_DIR)
            .map_err(|e| fail("cannot open", &self.dir.tmp_path(), e))?;
        let mut for_user = vec![tmp];
        for (_, value) in self.ctx.spec.env_policy.expanded_run_env(&vars) {
            let p = PathBuf::from(&value);
            let Ok(rel) = p.strip_prefix(&base) else {
                continue;
            };
            if rel.as_os_str().is_empty() {
                continue;
            }
            let mut cur = run_dir.clone();
            for comp in rel.components() {
                let std::path::Component::Normal(name) = comp else {
                    return Err(Stop::Fail(Error::tether(format!(
                        "run_env dir {} is not a plain path below the run dir",
                        p.display()
                    ))));
                };
                match cur.create_dir(name, 0o755) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(fail("cannot create run_env dir", &p, e)),
                }
                cur = cur
                    .open_dir(name)
                    .map_err(|e| fail("cannot open run_env dir", &p, e))?;
            }
            for_user.push(cur);
        }
        let Some(id) = &self.ctx.spec.run_as else {
            return Ok(());
        };
        run_dir
            .chmod(0o711)
            .map_err(|e| fail("cannot chmod run dir", &base, e))?;
        for d in for_user {
            d.chown(id.uid, id.gid).map_err(|e| {
                Stop::Fail(Error::tether(format!(
                    "cannot chown {} to {}: {e}",
                    d.path().display(),
                    id.user
                )))
            })?;
        }
        match run_dir.create_dir(rundir::OWN_TMP_DIR, 0o700) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(fail("cannot create", &base.join(rundir::OWN_TMP_DIR), e)),
        }
    }
}

/// Whether the app's rows, read under its cluster lock, leave the holder nothing to do
/// (PROTOCOL §17): every row but its own is a waiter whose session is connected. Anything else
/// — a `running` row (a dead holder, or one whose teardown failed, its session perhaps not yet
/// gone), `reaped`, `cleaned`, a waiter without a session — takes the full reconcile.
fn nothing_to_settle(rows: &[crate::cluster::runs::Row], own: &str) -> bool {
    rows.iter()
        .all(|r| r.run_id == own || (r.state == crate::cluster::runs::WAITING && r.session_alive))
}

/// The dead run whose id we reuse: its record is settled in our (its) run dir, which we keep.
fn own_dead_run(dead: RunRecord, dir: crate::sys::safe_fs::Dir) -> DeadRun {
    DeadRun {
        meta: dead.meta.clone(),
        record: Some(dead),
        dir: None,
        record_dir: Some(dir),
        remove_dir: false,
    }
}

#[cfg(test)]
mod tests {
    use super::nothing_to_settle;
    use crate::cluster::runs::Row;

    fn row(id: &str, state: &str, alive: bool) -> Row {
        Row {
            run_id: id.into(),
            ..crate::cluster::runs::sample_row(state, alive)
        }
    }

    #[test]
    fn only_connected_waiters_leave_the_holder_nothing_to_settle() {
        let own = row("me", "running", true);
        assert!(nothing_to_settle(&[], "me"));
        assert!(nothing_to_settle(
            &[own.clone(), row("w", "waiting", true)],
            "me"
        ));
        // A dead waiter's row goes; a running row is a dead holder or a failed teardown (its
        // session may still be closing); reaped/cleaned rows have a host to hear from.
        for other in [
            row("w", "waiting", false),
            row("x", "running", false),
            row("x", "running", true),
            row("x", "reaped", false),
            row("x", "cleaned", false),
        ] {
            assert!(
                !nothing_to_settle(&[own.clone(), other.clone()], "me"),
                "{other:?}"
            );
        }
    }
}
