//! Step 10, CLI-CONTRACT §6: the one teardown. `Ended::teardown` consumes the run, so it runs once.
//!
//! Kill the whole tree first (nothing may sit in the run dir), then the teardown command — its
//! `clean` recorded the moment it exits 0 (D25) —, then retire the run dir, release the slot
//! and the app lock; housekeeping (deleting the retired dir, removing the cgroup) comes after
//! the release, so the next run of the app does not wait for it.

use super::env::{run_env, Side};
use super::finish::{log_ignored, Finished};
use super::supervise::Ended;
use super::{write_meta, write_state};
use crate::config::duration;
use crate::config::env as environment;
use crate::output;
use crate::state::record::State;
use crate::sys::fault::fault_pause;
use crate::sys::shell;
use crate::sys::supervisor::Supervisor;
use crate::sys::tree::{self, Members};

impl Ended {
    pub(super) fn teardown(self, sup: &mut Supervisor) -> Finished {
        let Ended {
            held,
            cause,
            child,
            started,
            ended,
        } = self;
        let super::hold::Held {
            mut ctx,
            mut dir,
            app_lock,
            slot,
        } = held;
        ctx.record.exit_code = Some(cause.exit_code());
        ctx.record.reason = Some(cause.reason().into());
        ctx.record.meta.state = State::TearingDown;
        write_state(&mut dir, Some(&app_lock), &ctx.record);

        // Kill the whole tree before anything else (nothing may sit in the run dir).
        // With a cgroup every process of the run is in it (joining is mandatory), so no scan
        // of /proc is needed; without one, the core's descendants are the run.
        let members = Members {
            pgid: child.map(|c| c.pgid()),
            descendants_of: match ctx.cgroup {
                Some(_) => None,
                None => Some(std::process::id() as i32),
            },
            cgroup: ctx.cgroup.clone(),
            ..Members::default()
        };
        // A lost cluster lock: SIGKILL at once, no grace — another host may get the lock
        // within `server_release` of our last heartbeat, and the command must be dead before
        // (PROTOCOL §16). The teardown below still runs, told `TETHER_REASON=lock-lost`.
        let killed = if cause == super::decide::Cause::LockLost {
            tree::kill_at_once(&members, sup)
        } else {
            tree::terminate(&members, ctx.spec.grace, sup)
        };
        log_ignored(&sup.take_queued());
        if killed.killed_after_grace > 0 {
            output::debug(
                "killed",
                &format!("still alive after grace: {:?}", killed.late),
            );
            output::info(
                "killed",
                &format!(
                    "{} process(es) still alive after {} grace — killed",
                    killed.killed_after_grace,
                    duration::canonical(ctx.spec.grace)
                ),
            );
        }
        if !killed.survivors.is_empty() {
            output::warn(
                "killed",
                &format!("processes survived SIGKILL: {:?}", killed.survivors),
            );
        }

        let runtime = ended.duration_since(started);
        ctx.record.runtime_ms = Some(runtime.as_millis() as u64);
        let outcome = ctx.spec.teardown.clone().map(|script| {
            let slot_label = slot.as_ref().map(|s| s.label());
            let mut env = run_env(&ctx, slot_label, Side::Tether);
            environment::set(&mut env, "TETHER_REASON", cause.reason().into());
            environment::set(
                &mut env,
                "TETHER_EXIT_CODE",
                cause.exit_code().to_string().into(),
            );
            let cwd = ctx.spec.cwd.clone().filter(|p| p.is_dir());
            let (cgroup, timeout) = (ctx.cgroup.clone(), ctx.spec.teardown_timeout);
            let record = &mut ctx.record;
            // "Teardown done" is recorded the moment the command exits 0, before its leftovers
            // are killed: a core killed after this point leaves a `clean` record, which no
            // reaper runs the teardown for again (DECISIONS D25).
            let mut on_exit = |o: &shell::Outcome| {
                if o.ok() {
                    record.meta.state = State::Clean;
                    write_state(&mut dir, Some(&app_lock), record);
                }
            };
            let o = shell::run_shell(
                &script,
                &env,
                cwd.as_deref(),
                cgroup.as_ref(),
                timeout,
                sup,
                &mut on_exit,
            );
            log_ignored(&sup.take_queued());
            o
        });
        fault_pause("TETHER_FAULT_PAUSE_AFTER_TEARDOWN");
        let teardown_ok = outcome.as_ref().is_none_or(shell::Outcome::ok);
        if let Some(o) = outcome.as_ref().filter(|o| !o.ok()) {
            output::error(&format!(
                "teardown command {}; run dir and lock state kept for the janitor",
                o.describe()
            ));
        }
        let mut retired = None;
        if teardown_ok {
            if outcome.is_none() {
                ctx.record.meta.state = State::Clean;
                if ctx.spec.keep_run_dir {
                    write_state(&mut dir, Some(&app_lock), &ctx.record);
                } else {
                    // No teardown command, so nothing that could run twice: the record goes
                    // with its dir, and only the lock metadata needs the verdict.
                    write_meta(&app_lock, &ctx.record.meta);
                }
            }
            if ctx.spec.keep_run_dir {
                output::info("kept", &format!("run dir kept: {}", dir.path().display()));
                dir.release();
            } else {
                let path = dir.path();
                match dir.retire() {
                    Ok(r) => retired = Some(r),
                    Err(e) => output::warn(
                        "cleanup",
                        &format!("cannot remove run dir {}: {e}", path.display()),
                    ),
                }
            }
        } else {
            // Record the verdict but stay `tearing-down`: the next holder or janitor reaps.
            ctx.record.meta.state = State::TearingDown;
            write_state(&mut dir, Some(&app_lock), &ctx.record);
            dir.release();
        }
        if let Some(slot) = slot {
            slot.lock.release();
        }
        // The heartbeat stops with the lock: nothing to watch once it is released on purpose.
        sup.end_lease();
        // The run's row goes once its teardown is done, on the lock's session before it
        // closes (PROTOCOL §17); a failed teardown keeps it `running`, so the next holder, on
        // any host, reaps the run as it would reap a dead one.
        let mut app_lock = app_lock;
        if teardown_ok {
            if let Err(e) = app_lock.remove_row(ctx.spec.run_id.as_str()) {
                settle_row_elsewhere(&ctx, &e);
            }
        } else {
            app_lock.keep_row();
        }
        app_lock.release();
        // The suite counts the core's threads here: the heartbeat is gone with the lock.
        fault_pause("TETHER_FAULT_PAUSE_AFTER_RELEASE");
        // Housekeeping after the release, so the next run of the app is not kept waiting:
        // the retired run dir's contents and the (empty) cgroup.
        if let Some(retired) = retired {
            let path = retired.path();
            if let Err(e) = retired.remove() {
                output::warn("cleanup", &format!("cannot remove {}: {e}", path.display()));
            }
        }
        if let Some(cg) = &ctx.cgroup {
            if let Err(e) = cg.remove() {
                output::debug(
                    "cgroup",
                    &format!("cannot remove {}: {e}", cg.path().display()),
                );
            }
        }
        Finished::new(ctx, cause, teardown_ok, runtime)
    }
}

/// The lock's session could not remove the run's row (the lock was lost: self-fenced, or the
/// session failed): settle it on a session of its own, `<run id>.leave`, connecting for at most
/// [`SETTLE_CONNECT`] — a run that lost its lock to a partition is not kept from exiting by a
/// server it cannot reach (D78). Failing that too, one warning: the next holder reaps the row.
pub(super) fn settle_row_elsewhere(ctx: &super::Ctx, first: &crate::error::Error) {
    let Some(target) = &ctx.spec.cluster else {
        return;
    };
    let id = ctx.spec.run_id.as_str();
    let mut target = target.clone();
    target.connect_timeout = Some(
        target
            .connect_timeout
            .map_or(SETTLE_CONNECT, |t| t.min(SETTLE_CONNECT)),
    );
    let settled = crate::cluster::session::Session::connect(&target, &format!("{id}.leave"))
        .and_then(|mut s| crate::cluster::runs::settle_own(&mut s, id));
    if let Err(e) = settled {
        output::warn(
            "cluster",
            &format!(
                "cannot remove the row of run {id}: {}; nor on a session of its own: {}",
                first.message, e.message
            ),
        );
    }
}

/// How long a run whose lock session is gone tries to reach the server to settle its row.
const SETTLE_CONNECT: std::time::Duration = std::time::Duration::from_secs(2);
