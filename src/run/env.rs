//! The run's environment (CLI-CONTRACT §8): the policy's (`env.allow`, `env.set`, `run_env`) plus
//! tether's own variables.

use super::Ctx;
use crate::config::env::{self as environment, RunVars};
use crate::state::rundir;
use std::ffi::OsString;

/// Whose environment: the command's (the allow-list applies; under `run_as` the target user's
/// HOME/USER/LOGNAME) or tether's side (setup, teardown: everything, and a `TMPDIR` of
/// tether's own under `run_as`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Command,
    Tether,
}

/// The environment for `side`; `slot` is the run's slot label, if it has one.
pub(super) fn run_env(ctx: &Ctx, slot: Option<String>, side: Side) -> Vec<(OsString, OsString)> {
    let spec = &ctx.spec;
    let for_command = side == Side::Command;
    let dir = rundir::path_of(&ctx.runs_dir, &spec.run_id);
    let dir_text = dir.display().to_string();
    let slot_text = slot.clone().unwrap_or_default();
    let vars = RunVars {
        run_dir: &dir_text,
        run_id: spec.run_id.as_str(),
        app: spec.app.as_str(),
        slot: &slot_text,
    };
    let mut env = spec.env_policy.build(for_command, &vars);
    environment::set(&mut env, "TETHER_APP", spec.app.as_str().into());
    environment::set(&mut env, "TETHER_RUN_ID", spec.run_id.as_str().into());
    environment::set(&mut env, "TETHER_RUN_DIR", dir.clone().into_os_string());
    // Under run_as the command's tmp/ is the run_as user's: setup and teardown (tether's
    // side, root) get one the command cannot plant symlinks in.
    let tmp = if !for_command && spec.run_as.is_some() {
        rundir::OWN_TMP_DIR
    } else {
        rundir::TMP_DIR
    };
    environment::set(&mut env, "TMPDIR", dir.join(tmp).into_os_string());
    if slot.is_some() {
        environment::set(&mut env, "TETHER_SLOT", slot_text.into());
    }
    if let Some(fence) = ctx.record.fence {
        environment::set(&mut env, "TETHER_FENCE", fence.to_string().into());
    }
    if let (true, Some(id)) = (for_command, &spec.run_as) {
        environment::set(&mut env, "HOME", id.home.clone().into_os_string());
        environment::set(&mut env, "USER", id.user.clone().into());
        environment::set(&mut env, "LOGNAME", id.user.clone().into());
    }
    // The run's marker: a reaper finds what the run started by it, even without a cgroup.
    if let Some(token) = &ctx.record.meta.token {
        environment::set(&mut env, "TETHER_RUN_TOKEN", token.clone().into());
    }
    env
}
