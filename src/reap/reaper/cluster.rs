//! Dead cluster runs (issue 16 §3, PROTOCOL §17): reaping a dead run of *another* host exactly
//! once cluster-wide, and killing a reaped run's leftovers on its *own* host.
//!
//! Exactly once: every teardown of a dead run — the local reconcile's and the cross-host
//! reap's — runs under the app's cluster lock (a run holds it at step 5; a janitor takes it
//! with a try), so two reapers never look at one row at the same time; and the row's state says
//! who did what. A `running` row with no session is reaped by the holder: on its own host by
//! the local reconcile (which deletes the row), elsewhere from the row (`reaped`). A local
//! reaper that finds the row `reaped` or `cleaned` runs no teardown: it was run elsewhere.
//!
//! Nothing read from a row is acted on as a pid or a path on this host without the local
//! reaper's checks: the leftovers sweep acts only on rows naming this host *and boot*, only when
//! the run's own record (its run dir in our runs dir, under its `run.lock`) names the same pid
//! and start time, and never while that pid with that start time lives.

use super::{base_env, Reaper, REAPED};
use crate::cluster::runs::{self, Row};
use crate::cluster::session::Session;
use crate::ident::names::{Domain, RunId};
use crate::output;
use crate::state::lock;
use crate::state::record::{self, LockMeta, State};
use crate::state::rundir;
use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

/// This host as the rows name hosts: its node name and its boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Here {
    pub(crate) host: String,
    pub(crate) boot_id: String,
}

impl Here {
    pub(crate) fn now() -> Here {
        Here {
            host: crate::sys::procfs::hostname(),
            boot_id: crate::sys::procfs::boot_id(),
        }
    }

    /// Whether `row` is of this host in this boot (its pid means a process here).
    pub(crate) fn owns(&self, row: &Row) -> bool {
        row.host == self.host && row.boot_id == self.boot_id
    }
}

/// How often a run waiting for another host's confirmation looks at the row: first after
/// `CONFIRM_POLL_FIRST`, doubling up to `CONFIRM_POLL`.
const CONFIRM_POLL: Duration = Duration::from_millis(100);
const CONFIRM_POLL_FIRST: Duration = Duration::from_millis(2);

/// What the holder does with another run's row of its app (pure: unit-tested).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowAction {
    /// Alive (its session is connected), or not the holder's business.
    Leave,
    /// A waiter that died: its row goes.
    Remove,
    /// A dead holder of another host (or another boot of this one): run its teardown here.
    Reap,
    /// A dead holder of this host: the local reconcile reaps it; its row goes after.
    Local,
}

pub(crate) fn action(row: &Row, own: &str, here: &Here) -> RowAction {
    if row.run_id == own || row.session_alive {
        return RowAction::Leave;
    }
    match row.state.as_str() {
        runs::WAITING => RowAction::Remove,
        runs::RUNNING if here.owns(row) => RowAction::Local,
        runs::RUNNING => RowAction::Reap,
        // `reaped`: its host still has to kill its leftovers; `cleaned`: done everywhere — the
        // confirmation a reaper waited for, removed by whoever sees it next.
        runs::CLEANED => RowAction::Remove,
        _ => RowAction::Leave,
    }
}

/// A row's dead run as lock metadata (for the local reaper's leftover kill and its messages):
/// no run dir, no cgroup — what the row cannot vouch for is left out.
fn meta_of(row: &Row) -> LockMeta {
    let mut meta = LockMeta {
        version: record::VERSION,
        app: row.app.clone(),
        run_id: row.run_id.clone(),
        pid: row.pid,
        pid_start: row.pid_start,
        host: row.host.clone(),
        started_at: 0,
        state: State::Running,
        run_dir: String::new(),
        cgroup: None,
        ci: None,
        token: None,
    };
    meta.token = Some(meta.expected_token());
    meta
}

impl Reaper<'_> {
    /// Before the local reconcile: the app's rows, so that `reap` knows a run whose teardown
    /// already ran on another host.
    pub(crate) fn set_cluster_rows(&mut self, rows: Vec<Row>) {
        self.rows = Some(rows);
    }

    /// The row state of dead run `id`, when the rows were read.
    pub(super) fn row_state(&self, id: &str) -> Option<&str> {
        self.rows
            .as_ref()?
            .iter()
            .find(|r| r.run_id == id)
            .map(|r| r.state.as_str())
    }

    /// After the local reconcile, under the app's cluster lock: settle the other rows of `app`
    /// (PROTOCOL §17). Rows of runs this pass reaped locally go; dead waiters go; a dead holder
    /// of another host gets its teardown here (`TETHER_REASON=reaped`), its row `reaped`, and
    /// this run waits up to `confirm` for its host to kill its leftovers. Returns how many
    /// runs it reaped; a failed teardown stops the run (the row stays `running`).
    pub(crate) fn reap_cluster(
        &mut self,
        s: &mut Session,
        app: &Domain,
        own: &str,
        here: &Here,
        confirm: Duration,
    ) -> Result<usize, super::ReapFailed> {
        let rows = runs::of_app(s, app.as_str()).map_err(|e| {
            super::ReapFailed::new(
                format!("cannot read the cluster's runs: {}", e.message),
                None,
            )
        })?;
        let mut count = 0;
        for row in rows {
            // Reaped (or found clean) by the local reconcile just now: its row goes (a reaper
            // elsewhere waiting for its leftovers takes "gone" as done).
            if here.owns(&row) && row.run_id != own && self.has_reaped(&row.run_id) {
                drop(runs::remove(s, &row.run_id));
                continue;
            }
            match action(&row, own, here) {
                RowAction::Leave => {}
                RowAction::Remove => drop(runs::remove(s, &row.run_id)),
                // One of this host whose run dir is here is the local reconcile's: a record
                // that says its teardown ran (it died after it, before its release) needs no
                // second one — its row goes; any other (alive, or its reap failed) is left as
                // the local reconcile left it.
                RowAction::Local => match self.local_record_state(&row.run_id) {
                    Some(Some(State::Clean)) => drop(runs::remove(s, &row.run_id)),
                    Some(_) => {}
                    // Its run dir lost: reaped from its row, like another host's.
                    None => {
                        self.reap_row(s, &row, here)?;
                        count += 1;
                        drop(runs::remove(s, &row.run_id));
                    }
                },
                RowAction::Reap => {
                    self.reap_row(s, &row, here)?;
                    count += 1;
                    if here.owns(&row) {
                        drop(runs::remove(s, &row.run_id));
                    } else {
                        self.await_leftovers(s, &row, confirm);
                    }
                }
            }
        }
        Ok(count)
    }

    /// What this host's runs dir says of run `id`: `None` when it has no run dir there (or none
    /// tether trusts); `Some(None)` when its record cannot be read.
    fn local_record_state(&self, id: &str) -> Option<Option<State>> {
        let dir = crate::state::rundir::open_trusted(self.runs.as_ref()?, id).ok()?;
        Some(
            crate::state::record::read_record(&dir)
                .ok()
                .filter(|r| r.meta.run_id == id)
                .map(|r| r.meta.state),
        )
    }

    /// Run a dead run's teardown from its row, then mark it `reaped` (of this host and boot:
    /// its leftovers are killed here first, by its token, with the local checks).
    fn reap_row(
        &mut self,
        s: &mut Session,
        row: &Row,
        here: &Here,
    ) -> Result<(), super::ReapFailed> {
        self.mark_reaped(&row.run_id);
        output::emit(
            output::Level::Info,
            "reaping",
            &format!(
                "reaping dead run {} of {} on host {}",
                row.run_id, row.app, row.host
            ),
            &[
                ("run_id", row.run_id.clone().into()),
                ("app", row.app.clone().into()),
                ("host", row.host.clone().into()),
            ],
        );
        if here.owns(row) {
            self.kill_leftovers(&meta_of(row));
        }
        if let Some(script) = row.teardown.clone() {
            let mut env: Vec<(OsString, OsString)> = base_env();
            env.push(("TETHER_APP".into(), row.app.clone().into()));
            env.push(("TETHER_RUN_ID".into(), row.run_id.clone().into()));
            if let Some(f) = row.fence {
                env.push(("TETHER_FENCE".into(), f.to_string().into()));
            }
            let o = self.run_teardown(&script, &env, Path::new("/"), &mut |_| {});
            if !o.ok() {
                return Err(super::ReapFailed::new(
                    format!(
                        "teardown of dead run {} of {} (host {}) {}; its row stays for the next holder",
                        row.run_id,
                        row.app,
                        row.host,
                        o.describe()
                    ),
                    Some(&row.run_id),
                ));
            }
        }
        // Marked right after the teardown, before anything else can be cut short: a reaper that
        // dies now leaves `reaped`, which no one runs the teardown for again.
        if let Err(e) = runs::set_state(s, &row.run_id, runs::RUNNING, runs::REAPED) {
            output::warn(
                "reaping",
                &format!("cannot mark run {} reaped: {}", row.run_id, e.message),
            );
        }
        Ok(())
    }

    /// Wait up to `confirm` for the dead run's host to kill its leftovers — its front at once
    /// (the row's `leftovers_killed`, D77), or its next sweep (the row `cleaned` or gone) —
    /// with one line either way. Funnel events meanwhile are queued (the caller acts on them
    /// after) and end the wait.
    fn await_leftovers(&mut self, s: &mut Session, row: &Row, confirm: Duration) {
        let until = Instant::now() + confirm;
        let (id, host) = (&row.run_id, &row.host);
        let mut poll = CONFIRM_POLL_FIRST;
        loop {
            let confirmed = match runs::confirmation_of(s, id) {
                Ok(Some((st, killed))) if st == runs::REAPED => killed,
                // Cleaned by its host's sweep (or gone): the row goes.
                Ok(_) => {
                    drop(runs::remove(s, id));
                    true
                }
                Err(_) => break,
            };
            // Killed by its front, the row stays `reaped` for its host's next sweep, which
            // settles the run's record there (removing it now would leave a `running` record
            // with no row, which that host would reap a second time).
            if confirmed {
                output::emit(
                    output::Level::Info,
                    "leftovers",
                    &format!("leftovers of run {id} on host {host} killed"),
                    &[("run_id", id.clone().into()), ("host", host.clone().into())],
                );
                return;
            }
            if Instant::now() >= until || self.sup.stop_requested() {
                break;
            }
            // A poll interval, not an ordering: the row is looked at again after it. Short at
            // first — a front confirms within milliseconds — then backing off.
            self.sup
                .pause(poll.min(until.saturating_duration_since(Instant::now())));
            poll = (poll * 2).min(CONFIRM_POLL);
        }
        output::emit(
            output::Level::Warn,
            "leftovers",
            &format!(
                "leftovers of run {id} on host {host} not confirmed after {}; going on",
                crate::config::duration::canonical(confirm)
            ),
            &[("run_id", id.clone().into()), ("host", host.clone().into())],
        );
    }

    /// On this host, at a run's start or a janitor's sweep: kill the leftovers of this host's
    /// runs that were reaped elsewhere (rows `reaped`), with the local machinery and no
    /// teardown, settle their records, and mark the rows `cleaned`. Rows of an earlier boot
    /// of this host have nothing left to kill. Returns the runs handled.
    pub(crate) fn sweep_reaped(&mut self, s: &mut Session, here: &Here) -> usize {
        let rows = match runs::of_host(s, &here.host, runs::REAPED) {
            Ok(r) => r,
            Err(e) => {
                output::warn(
                    "leftovers",
                    &format!("cannot read the cluster's runs: {}", e.message),
                );
                return 0;
            }
        };
        let mut done = 0;
        for row in &rows {
            if here.owns(row) && !self.kill_reaped_leftovers(row) {
                continue;
            }
            if let Ok(true) = runs::set_state(s, &row.run_id, runs::REAPED, runs::CLEANED) {
                done += 1;
            }
        }
        done
    }

    /// Kill a reaped run's leftovers here; false when it must be left (its core lives, or its
    /// run dir is held by someone).
    fn kill_reaped_leftovers(&mut self, row: &Row) -> bool {
        if crate::sys::procfs::core_alive(row.pid, row.pid_start) {
            return false;
        }
        let mut meta = meta_of(row);
        // Its own record, when its run dir is ours and agrees with the row: the cgroup comes
        // from there (the row has none), and the record is settled so that no local reaper
        // runs the teardown again.
        let dir = RunId::parse(&row.run_id)
            .ok()
            .zip(self.runs.clone())
            .and_then(|(id, runs)| rundir::open_trusted(&runs, id.as_str()).ok());
        let mut held = None;
        let mut rec = None;
        if let Some(d) = &dir {
            match lock::try_acquire_existing(d, rundir::LOCK_FILE) {
                Ok(Some(h)) => held = Some(h),
                // Someone holds its run dir (a reaper, a run reusing its id): theirs.
                Ok(None) | Err(_) => return false,
            }
            rec = record::read_record(d).ok().filter(|r| {
                r.meta.run_id == row.run_id
                    && r.meta.pid == row.pid
                    && r.meta.pid_start == row.pid_start
            });
        }
        if let Some(r) = &rec {
            meta = r.meta.clone();
        }
        self.kill_leftovers(&meta);
        if let (Some(d), Some(mut r)) = (&dir, rec) {
            if r.meta.state != State::Clean {
                r.meta.state = State::Clean;
                r.reason = Some(REAPED.into());
                let _ = record::write_record(d, &r);
            }
        }
        drop(held);
        output::emit(
            output::Level::Info,
            "leftovers",
            &format!(
                "killed the leftovers of run {} of {} (reaped on another host)",
                row.run_id, row.app
            ),
            &[("run_id", row.run_id.clone().into())],
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(state: &str, host: &str, alive: bool) -> Row {
        Row {
            host: host.into(),
            ..runs::sample_row(state, alive)
        }
    }

    #[test]
    fn the_holder_reaps_only_dead_holders_of_other_hosts() {
        let here = Here {
            host: "a".into(),
            boot_id: "b".into(),
        };
        assert_eq!(
            action(&row("running", "b", false), "x", &here),
            RowAction::Reap
        );
        assert_eq!(
            action(&row("running", "a", false), "x", &here),
            RowAction::Local
        );
        assert_eq!(
            action(&row("running", "b", true), "x", &here),
            RowAction::Leave
        );
        assert_eq!(
            action(&row("running", "b", false), "r", &here),
            RowAction::Leave
        );
        assert_eq!(
            action(&row("waiting", "b", false), "x", &here),
            RowAction::Remove
        );
        assert_eq!(
            action(&row("waiting", "b", true), "x", &here),
            RowAction::Leave
        );
        assert_eq!(
            action(&row("reaped", "b", false), "x", &here),
            RowAction::Leave
        );
        assert_eq!(
            action(&row("cleaned", "b", false), "x", &here),
            RowAction::Remove
        );
        // Another boot of this host: its pids mean nothing here, so it is reaped from its row.
        let other_boot = Row {
            boot_id: "old".into(),
            ..row("running", "a", false)
        };
        assert_eq!(action(&other_boot, "x", &here), RowAction::Reap);
    }
}
