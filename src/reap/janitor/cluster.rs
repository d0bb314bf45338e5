//! The janitor and the cluster (issue 16 §7, PROTOCOL §17): on this host, kill the leftovers of
//! this host's runs that were reaped elsewhere (rows `reaped`); report, without touching, the
//! dead runs of other hosts — theirs to clean (leftovers) or the app's next holder's (teardown).
//! The local reaping itself goes on as without a cluster, each app under its flock *and* its
//! cluster lock (`Sweep::app_locks`), so it never overlaps a reaper on another host.

use super::report::{entry, Entry, Report};
use crate::cluster::runs::{self, Row};
use crate::cluster::session::Session;
use crate::config::cluster::ClusterTarget;
use crate::error::Result;
use crate::reap::reaper::cluster::Here;
use crate::reap::reaper::Reaper;

/// The janitor's own session (`tether-janitor-<pid>`: never a run's name). `None` when the
/// schema does not exist yet (nothing to look at).
pub(super) fn connect(target: &ClusterTarget) -> Result<Option<Session>> {
    let mut s = Session::connect(target, &format!("tether-janitor-{}", std::process::id()))?;
    if s.value("SELECT to_regclass('tether.runs') IS NOT NULL")? != "t" {
        return Ok(None);
    }
    Ok(Some(s))
}

/// Kill this host's reaped runs' leftovers (a dry run only says which), then report the
/// other hosts' dead runs, one entry each.
pub(super) fn sweep(
    s: &mut Session,
    reaper: Option<&mut Reaper<'_>>,
    app: Option<&crate::ident::names::Domain>,
    report: &mut Report,
) -> Result<()> {
    let here = Here::now();
    let of_app = |r: &Row| app.is_none_or(|a| a.as_str() == r.app);
    match reaper {
        Some(reaper) => {
            let before = runs::of_host(s, &here.host, runs::REAPED)?;
            reaper.sweep_reaped(s, &here);
            for row in before.iter().filter(|r| of_app(r)) {
                if runs::state_of(s, &row.run_id)?.as_deref() != Some(runs::REAPED) {
                    report.push(leftovers(row, "leftovers-killed"));
                }
            }
        }
        None => {
            for row in runs::of_host(s, &here.host, runs::REAPED)?
                .iter()
                .filter(|r| of_app(r))
            {
                report.push(leftovers(row, "would-kill-leftovers"));
            }
        }
    }
    for row in runs::all(s)?.iter().filter(|r| of_app(r)) {
        if here.owns(row) || row.session_alive {
            continue;
        }
        let left_to = match row.state.as_str() {
            runs::RUNNING => "its teardown is left to the app's next holder",
            runs::WAITING => "a dead waiter; its row is left to the app's next holder",
            runs::REAPED => "reaped; its leftovers are left to its own host",
            _ => continue,
        };
        let mut e = entry("cluster-run", &row.run_id, "other-host");
        e.app = Some(row.app.clone());
        e.run_id = Some(row.run_id.clone());
        e.pid = Some(row.pid);
        e.detail = Some(format!(
            "dead run on host {} (state {}): {left_to}",
            row.host, row.state
        ));
        report.push(e);
    }
    Ok(())
}

fn leftovers(row: &Row, action: &'static str) -> Entry {
    let mut e = entry("cluster-run", &row.run_id, action);
    e.app = Some(row.app.clone());
    e.run_id = Some(row.run_id.clone());
    e.pid = Some(row.pid);
    e.detail = Some("reaped on another host; its leftovers here".into());
    e
}
