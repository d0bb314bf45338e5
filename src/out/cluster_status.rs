//! The cluster in `tether status` (issue 16 §7, CLI-CONTRACT §27): for each app with a row in
//! `tether.runs`, the cluster's holder and its waiters in the server's grant order, from
//! `pg_locks` (the app's advisory key; waiters by `waitstart`) joined with `pg_stat_activity`
//! (`application_name` = run id) and the rows (`cluster::runs::line_of`); and the dead runs
//! whose rows wait for a reaper. Read on a session of its own (`tether-status-<pid>`): no lock
//! is taken, nothing is written.

use crate::cluster::runs::{self, Row};
use crate::cluster::session::Session;
use crate::config::cluster::ClusterTarget;
use crate::config::duration;
use crate::error::Result;
use crate::ident::names::Domain;
use serde::Serialize;

/// One app as the cluster sees it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct ClusterApp {
    pub(crate) app: String,
    pub(crate) holder: Option<ClusterRun>,
    /// In the order the server will grant the lock.
    pub(crate) waiters: Vec<ClusterRun>,
    /// Rows of runs that are gone (no session): a holder's next reap, or leftovers pending on
    /// their host (`reaped`).
    pub(crate) dead: Vec<ClusterRun>,
}

/// A run in the cluster: where it runs and for how long it has held (holder) or waited
/// (waiter) or how old its row is (dead).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct ClusterRun {
    pub(crate) run_id: String,
    pub(crate) host: String,
    pub(crate) pid: i32,
    pub(crate) state: String,
    pub(crate) group: Option<String>,
    pub(crate) fence: Option<i64>,
    pub(crate) age_s: u64,
    pub(crate) ci_link: Option<String>,
}

impl ClusterRun {
    fn of(r: &Row, holder: bool) -> ClusterRun {
        let age = if holder {
            r.held_for.unwrap_or(r.age)
        } else {
            r.age
        };
        ClusterRun {
            run_id: r.run_id.clone(),
            host: r.host.clone(),
            pid: r.pid,
            state: r.state.clone(),
            group: r.group.clone(),
            fence: r.fence,
            age_s: age.max(0.0) as u64,
            ci_link: r.ci_link.clone(),
        }
    }
}

/// Every app with a row, and who holds and waits for it.
pub(crate) fn collect(target: &ClusterTarget) -> Result<Vec<ClusterApp>> {
    let mut s = Session::connect(target, &format!("tether-status-{}", std::process::id()))?;
    if s.value("SELECT to_regclass('tether.runs') IS NOT NULL")? != "t" {
        return Ok(Vec::new());
    }
    let rows = runs::all(&mut s)?;
    let mut apps: Vec<String> = rows.iter().map(|r| r.app.clone()).collect();
    apps.dedup();
    let mut out = Vec::new();
    for app in apps {
        let Ok(domain) = Domain::parse(&app) else {
            continue;
        };
        let (holder, waiters) = runs::line_of(
            &mut s,
            domain.as_str(),
            crate::state::cluster_lock::key(&domain),
        )?;
        let dead = rows
            .iter()
            .filter(|r| r.app == app && !r.session_alive)
            .map(|r| ClusterRun::of(r, false))
            .collect();
        out.push(ClusterApp {
            app,
            holder: holder.as_ref().map(|h| ClusterRun::of(h, true)),
            waiters: waiters.iter().map(|w| ClusterRun::of(w, false)).collect(),
            dead,
        });
    }
    Ok(out)
}

/// The CLUSTER section of the text form: one line per run, holder first, then the waiters by
/// position, then the dead.
pub(crate) fn to_text(
    apps: &[ClusterApp],
    table: impl Fn(&[&str], &[Vec<String>]) -> String,
) -> String {
    let mut out = String::from("CLUSTER\n");
    let mut rows = Vec::new();
    for a in apps {
        let line = |role: String, r: &ClusterRun| {
            vec![
                a.app.clone(),
                role,
                r.run_id.clone(),
                r.host.clone(),
                r.pid.to_string(),
                duration::human_secs(r.age_s),
                r.ci_link.clone().unwrap_or_else(|| "-".into()),
            ]
        };
        if let Some(h) = &a.holder {
            rows.push(line("holder".into(), h));
        }
        for (i, w) in a.waiters.iter().enumerate() {
            rows.push(line(format!("waiter {}", i + 1), w));
        }
        for d in &a.dead {
            rows.push(line(format!("dead ({})", d.state), d));
        }
    }
    if rows.is_empty() {
        out.push_str("  (none)\n");
    } else {
        out.push_str(&table(
            &["APP", "ROLE", "RUN", "HOST", "PID", "FOR", "CI"],
            &rows,
        ));
    }
    out
}
