//! The front's aftercare for a cluster run whose core was SIGKILLed (DECISIONS D77, PROTOCOL
//! §17): kill the run's leftovers on this host at once, and tell the cluster so.
//!
//! A SIGKILLed core closes its lock session, and the next holder — on any host — reaps the
//! dead run from its row at once. What it cannot do is kill the run's leftover processes: they
//! live on this host. Without aftercare they live until this host's next `tether run` or janitor
//! sweep, and the new holder waits `cluster.leftovers_wait` for that. The front, the core's
//! parent, is still here and hears the core die within microseconds: it kills the leftovers
//! with the local reaper's machinery (the run's cgroup, its token in the environment), then sets
//! the row's `leftovers_killed`, which ends the new holder's wait.
//!
//! What the front knows of the run comes from the core (its *will*, one JSON line written once
//! the run holds its app, over a pipe only the two share), never from state another user could
//! write: the run dir is reopened through the trusted walk, its `run.lock` taken (someone
//! holding it — a local reaper — owns the run then), and its record must name this core's pid.
//! The teardown is not the front's business: it belongs to whoever holds the app lock next.

use super::Ctx;
use crate::cluster::session::Session;
use crate::config::cluster::{parse_url, ClusterTarget};
use crate::config::places::Place;
use crate::output;
use crate::reap::reaper::cluster::Here;
use crate::reap::reaper::{ReapPolicy, Reaper};
use crate::state::record::{self, State};
use crate::state::{dirs, lock, rundir};
use crate::sys::supervisor::Supervisor;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// What the front needs to act for a dead core: the run, where its run dir is, the grace, and
/// how to reach the cluster (the password is read from its source again, never carried).
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Will {
    run_id: String,
    app: String,
    runs_dir: PathBuf,
    grace_ms: u64,
    url: String,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    connect_timeout_ms: Option<u64>,
}

/// The will of a run that holds its app, as one line; `None` without a cluster (on one host
/// the next run or janitor sweep kills the leftovers before the teardown, as always).
pub(super) fn will_of(ctx: &Ctx) -> Option<String> {
    let target = ctx.spec.cluster.as_ref()?;
    let will = Will {
        run_id: ctx.spec.run_id.to_string(),
        app: ctx.spec.app.to_string(),
        runs_dir: ctx.runs_dir.path().to_path_buf(),
        grace_ms: ctx.spec.grace.as_millis() as u64,
        url: target.url.to_string(),
        password_env: target.password_env.clone(),
        password_file: target.password_file.clone(),
        ca_file: target.ca_file.clone(),
        connect_timeout_ms: target.connect_timeout.map(|d| d.as_millis() as u64),
    };
    serde_json::to_string(&will).ok()
}

impl Will {
    fn target(&self) -> Option<ClusterTarget> {
        let url = parse_url(&self.url).ok()?;
        Some(ClusterTarget {
            url,
            password_env: self.password_env.clone(),
            password_file: self.password_file.clone(),
            ca_file: self.ca_file.clone(),
            connect_timeout: self.connect_timeout_ms.map(Duration::from_millis),
            timing: crate::config::cluster::DEFAULT_TIMING,
            leftovers_wait: None,
        })
    }
}

/// [`crate::sys::front::Aftercare`] for `tether run`: runs in the front, after its core died
/// by a signal. Every failure is one warning; the next holder's wait and this host's next
/// sweep remain as they were without aftercare.
pub(crate) fn after_core_killed(core: Pid, will: &[u8]) {
    if will.is_empty() {
        return;
    }
    let will: Will = match serde_json::from_slice(will) {
        Ok(w) => w,
        Err(e) => {
            output::warn("aftercare", &format!("cannot read the core's will: {e}"));
            return;
        }
    };
    let id = will.run_id.clone();
    match kill_leftovers(core, &will) {
        Ok(()) => {}
        Err(why) => {
            output::warn(
                "aftercare",
                &format!("the core of run {id} was killed; its leftovers are left to this host's next sweep: {why}"),
            );
            return;
        }
    }
    let Some(target) = will.target() else {
        output::warn(
            "aftercare",
            &format!("cannot parse the cluster URL of run {id}"),
        );
        return;
    };
    let marked = Session::connect(&target, &format!("{id}.front")).and_then(|mut s| {
        let here = Here::now();
        crate::cluster::runs::mark_leftovers_killed(
            &mut s,
            &id,
            (&here.host, &here.boot_id),
            core.as_raw(),
        )
    });
    match marked {
        Ok(_) => output::emit(
            output::Level::Info,
            "aftercare",
            &format!(
                "the core of run {id} of {} was killed: its leftovers on this host are killed; \
                 its teardown is the next holder's",
                will.app
            ),
            &[
                ("run_id", id.clone().into()),
                ("app", will.app.clone().into()),
            ],
        ),
        Err(e) => output::warn(
            "aftercare",
            &format!(
                "the core of run {id} was killed and its leftovers here are killed, but the \
                 cluster was not told: {}",
                e.message
            ),
        ),
    }
}

/// Kill the leftovers of the will's run on this host, after the local reaper's checks.
fn kill_leftovers(core: Pid, will: &Will) -> Result<(), String> {
    let mut sup = Supervisor::standalone().map_err(|e| format!("cannot supervise: {e}"))?;
    let runs = dirs::choose("runs dir", &Place::given(will.runs_dir.clone()), 0o700)
        .map_err(|e| e.message)?
        .existing()
        .ok_or_else(|| format!("runs dir {} is gone", will.runs_dir.display()))?;
    let dir = rundir::open_trusted(&runs.dir, &will.run_id)
        .map_err(|e| format!("cannot open its run dir: {e}"))?;
    // Its run.lock: free now that the core is dead; held, the run is someone else's to reap.
    let held = match lock::try_acquire_existing(&dir, rundir::LOCK_FILE) {
        Ok(Some(h)) => h,
        Ok(None) => return Err("its run dir is held by another tether".into()),
        Err(e) => return Err(format!("cannot lock its run dir: {e}")),
    };
    let rec = record::read_record(&dir).map_err(|e| format!("cannot read its record: {e}"))?;
    if rec.meta.run_id != will.run_id || rec.meta.pid != core.as_raw() {
        return Err("its record names another run or core".into());
    }
    if rec.meta.state == State::Clean {
        return Ok(());
    }
    let policy = ReapPolicy {
        fallback_teardown: None,
        teardown_timeout: Duration::ZERO,
        grace: Duration::from_millis(will.grace_ms),
    };
    Reaper::new(&mut sup, Some(runs.dir.clone()), policy, None).kill_leftovers(&rec.meta);
    drop(held);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_will_round_trips_its_cluster_target() {
        let will = Will {
            run_id: "r1".into(),
            app: "a.test".into(),
            runs_dir: "/run/tether/runs".into(),
            grace_ms: 5000,
            url: "postgres://tether@[::1]:5433/ci?sslmode=require".into(),
            password_env: Some("PGPW".into()),
            password_file: None,
            ca_file: Some("/etc/ca.pem".into()),
            connect_timeout_ms: Some(2000),
        };
        let line = serde_json::to_string(&will).expect("serialize");
        let back: Will = serde_json::from_str(&line).expect("parse");
        assert_eq!(back, will);
        let t = back.target().expect("a target");
        assert_eq!(t.url.to_string(), will.url);
        assert_eq!(t.connect_timeout, Some(Duration::from_millis(2000)));
    }
}
