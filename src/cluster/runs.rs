//! The rows of `tether.runs` (issue 16 §3, PROTOCOL §17): one per cluster run, written on the
//! run's own lock session — `waiting` before it tries the cluster lock, `running` (with its fence
//! and `acquired`) once it holds it, gone when its teardown is over. A dead run's row is what
//! lets a holder on another host run its teardown (`reaped`), and its own host kill its
//! leftovers (`cleaned`).
//!
//! Everything is sent through the simple protocol with literals made by [`lit`] (quotes and
//! backslashes doubled, as an `E''` string: correct whatever `standard_conforming_strings`
//! says). Nothing read back from a row is trusted as a path, pid or command on this host: the
//! callers check the boot id, the pid's start time and the run's own record first.

use super::session::Session;
use crate::error::Result;

/// Row states (PROTOCOL §17).
pub(crate) const WAITING: &str = "waiting";
pub(crate) const RUNNING: &str = "running";
/// Its teardown ran on another host; its own host still has to kill its leftovers.
pub(crate) const REAPED: &str = "reaped";
/// Its own host killed its leftovers; its local record is settled by that host's next reaper.
pub(crate) const CLEANED: &str = "cleaned";

/// What a run writes about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NewRow {
    pub(crate) run_id: String,
    pub(crate) app: String,
    pub(crate) host: String,
    pub(crate) boot_id: String,
    pub(crate) pid: i32,
    pub(crate) pid_start: u64,
    pub(crate) group: Option<String>,
    pub(crate) ci_link: Option<String>,
    pub(crate) teardown: Option<String>,
}

/// A row as read back, with whether a session named after the run is connected
/// (`pg_stat_activity.application_name` = run id) and ages in seconds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Row {
    pub(crate) run_id: String,
    pub(crate) app: String,
    pub(crate) host: String,
    pub(crate) boot_id: String,
    pub(crate) pid: i32,
    pub(crate) pid_start: u64,
    pub(crate) state: String,
    pub(crate) group: Option<String>,
    pub(crate) ci_link: Option<String>,
    pub(crate) teardown: Option<String>,
    pub(crate) fence: Option<i64>,
    /// Seconds since it started waiting (`started`).
    pub(crate) age: f64,
    /// Seconds since it took the lock (`acquired`), if it did.
    pub(crate) held_for: Option<f64>,
    pub(crate) session_alive: bool,
}

/// A SQL string literal for `s`: `E'…'` with `'` and `\` doubled; a NUL (which no PostgreSQL
/// text can hold) becomes U+FFFD.
pub(crate) fn lit(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 3);
    out.push_str("E'");
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\0' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

fn opt(s: &Option<String>) -> String {
    s.as_deref().map_or_else(|| "NULL".into(), lit)
}

/// Insert (or, for a run that tries again after a head check, reset) the run's `waiting` row.
pub(crate) fn insert_waiting(s: &mut Session, r: &NewRow) -> Result<()> {
    s.execute(&format!(
        "INSERT INTO tether.runs (run_id, app, host, boot_id, pid, pid_start, state, grp, \
         ci_link, teardown, fence, acquired, heartbeat, started) \
         VALUES ({}, {}, {}, {}, {}, {}, '{WAITING}', {}, {}, {}, NULL, NULL, now(), now()) \
         ON CONFLICT (run_id) DO UPDATE SET app = EXCLUDED.app, host = EXCLUDED.host, \
         boot_id = EXCLUDED.boot_id, pid = EXCLUDED.pid, pid_start = EXCLUDED.pid_start, \
         state = EXCLUDED.state, grp = EXCLUDED.grp, ci_link = EXCLUDED.ci_link, \
         teardown = EXCLUDED.teardown, fence = NULL, acquired = NULL, heartbeat = now(), \
         ticket = NULL, ticket_key = NULL, looked = NULL, superseded_by = CASE WHEN tether.runs.pid = EXCLUDED.pid \
         AND tether.runs.pid_start = EXCLUDED.pid_start THEN tether.runs.superseded_by END",
        lit(&r.run_id),
        lit(&r.app),
        lit(&r.host),
        lit(&r.boot_id),
        r.pid,
        r.pid_start,
        opt(&r.group),
        opt(&r.ci_link),
        opt(&r.teardown),
    ))
}

/// The lock is taken: `running`, the fence (`fence`: an SQL expression), `acquired` — the
/// statement, which the acquisition sends in its one round trip (DECISIONS D80) — unless a
/// newer run of the group marked the row superseded while it waited (PROTOCOL §18): then it
/// updates nothing (`RETURNING` says so), the row stays `waiting`, and the caller fails with
/// [`superseded_error`]; it closes the session (the lock goes to the next waiter) and the run
/// leaves as `superseded`, having run nothing. One statement, so a mark and this update are
/// ordered by the row's lock: a mark after it finds the row `running` (the holder's heartbeat
/// sees it), a mark before it makes it update nothing.
/// `also`: a further condition (` AND …`), the queued run's head check.
pub(crate) fn mark_running_sql(run_id: &str, fence: &str, also: &str) -> String {
    format!(
        "UPDATE tether.runs SET state = '{RUNNING}', fence = {fence}, acquired = now(), \
         heartbeat = now() WHERE run_id = {} AND superseded_by IS NULL{also} RETURNING 1",
        lit(run_id)
    )
}

/// The failure of a wait or a grant whose run was marked superseded by `by`, read while its
/// own session was still open: once that session closes, the next holder may delete the row
/// of a waiter with no session (PROTOCOL §17) and the mark with it. [`superseded_in`] reads it
/// back.
pub(crate) fn superseded_error(s: &Session, run_id: &str, by: &str) -> crate::error::Error {
    crate::error::Error::tether(format!(
        "cluster {}: run {run_id} {SUPERSEDED_BY}{by}{WHILE_WAITING}",
        s.server
    ))
}

const SUPERSEDED_BY: &str = "was superseded by run ";
const WHILE_WAITING: &str = " while it waited";

/// The superseding run named by a [`superseded_error`] (a run id holds no space).
pub(crate) fn superseded_in(message: &str) -> Option<String> {
    let (_, rest) = message.rsplit_once(SUPERSEDED_BY)?;
    let by = rest.strip_suffix(WHILE_WAITING)?;
    (!by.is_empty() && !by.contains(' ')).then(|| by.to_owned())
}

/// The run that superseded `run_id` (its row's `superseded_by`), if one did.
pub(crate) fn superseded_by(s: &mut Session, run_id: &str) -> Result<Option<String>> {
    Ok(s.rows(&format!(
        "SELECT superseded_by FROM tether.runs WHERE run_id = {}",
        lit(run_id)
    ))?
    .into_iter()
    .next()
    .and_then(|r| r.into_iter().next().flatten()))
}

/// [`superseded_by`] on a session of its own (`<run id>.look`), for a failure that carried no
/// answer; a failure to look is said in one warning and taken as no mark.
pub(crate) fn superseded_looked_up(
    target: &crate::config::cluster::ClusterTarget,
    run_id: &str,
) -> Option<String> {
    let looked = Session::connect(target, &format!("{run_id}.look"))
        .and_then(|mut s| superseded_by(&mut s, run_id));
    looked.unwrap_or_else(|e| {
        crate::output::warn(
            "cluster",
            &format!(
                "cannot read whether run {run_id} was superseded: {}",
                e.message
            ),
        );
        None
    })
}

/// An older run of a group that a newer run marked superseded (PROTOCOL §18).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Victim {
    pub(crate) run_id: String,
    /// `waiting` or `running` when it was marked.
    pub(crate) state: String,
    pub(crate) host: String,
}

/// Remove the row of `run_id`.
pub(crate) fn remove(s: &mut Session, run_id: &str) -> Result<()> {
    s.execute(&format!(
        "DELETE FROM tether.runs WHERE run_id = {}",
        lit(run_id)
    ))
}

/// Remove the row of `run_id` if it names `host` and `boot_id` (a run this host reaped).
pub(crate) fn remove_of(s: &mut Session, run_id: &str, host: &str, boot_id: &str) -> Result<()> {
    s.execute(&format!(
        "DELETE FROM tether.runs WHERE run_id = {} AND host = {} AND boot_id = {}",
        lit(run_id),
        lit(host),
        lit(boot_id)
    ))
}

/// Move `run_id` from state `from` to `to`; whether it was in `from` (a compare-and-set: two
/// hosts never both move one row).
pub(crate) fn set_state(s: &mut Session, run_id: &str, from: &str, to: &str) -> Result<bool> {
    let n = s.rows(&format!(
        "UPDATE tether.runs SET state = {} WHERE run_id = {} AND state = {} RETURNING 1",
        lit(to),
        lit(run_id),
        lit(from)
    ))?;
    Ok(!n.is_empty())
}

/// The front's aftercare (D77): the leftovers of this host's dead run `run_id`, whose core was
/// `pid`, are killed. Only the row of that run on this host (`host`, `boot_id`) is marked.
pub(crate) fn mark_leftovers_killed(
    s: &mut Session,
    run_id: &str,
    (host, boot_id): (&str, &str),
    pid: i32,
) -> Result<bool> {
    let n = s.rows(&format!(
        "UPDATE tether.runs SET leftovers_killed = true WHERE run_id = {} AND host = {} \
         AND boot_id = {} AND pid = {pid} RETURNING 1",
        lit(run_id),
        lit(host),
        lit(boot_id)
    ))?;
    Ok(!n.is_empty())
}

/// A run whose teardown is over but whose lock session is gone (self-fenced, D78) settles its
/// own row from a session of its own: still `running` (no holder has reaped it yet) → deleted,
/// so that no one runs its teardown again; `reaped` (a holder elsewhere ran it again, D61) →
/// `leftovers_killed`, since its tree died before its teardown, so that holder stops waiting.
pub(crate) fn settle_own(s: &mut Session, run_id: &str) -> Result<()> {
    let id = lit(run_id);
    s.execute(&format!(
        "DELETE FROM tether.runs WHERE run_id = {id} AND state = '{RUNNING}'; \
         UPDATE tether.runs SET leftovers_killed = true WHERE run_id = {id} AND state = '{REAPED}'"
    ))
}

/// The state of `run_id`'s row and whether its host killed its leftovers (`None`: no row).
pub(crate) fn confirmation_of(s: &mut Session, run_id: &str) -> Result<Option<(String, bool)>> {
    Ok(s.rows(&format!(
        "SELECT state, leftovers_killed FROM tether.runs WHERE run_id = {}",
        lit(run_id)
    ))?
    .into_iter()
    .next()
    .and_then(|r| {
        let state = r.first().cloned().flatten()?;
        let killed = r.get(1).cloned().flatten().as_deref() == Some("t");
        Some((state, killed))
    }))
}

/// The state of `run_id`'s row (`None`: no row).
pub(crate) fn state_of(s: &mut Session, run_id: &str) -> Result<Option<String>> {
    Ok(s.rows(&format!(
        "SELECT state FROM tether.runs WHERE run_id = {}",
        lit(run_id)
    ))?
    .into_iter()
    .next()
    .and_then(|r| r.into_iter().next().flatten()))
}

const SELECT: &str = "SELECT r.run_id, r.app, r.host, r.boot_id, r.pid, r.pid_start, r.state, \
     r.grp, r.ci_link, r.teardown, r.fence, \
     extract(epoch FROM now() - r.started)::float8, \
     extract(epoch FROM now() - r.acquired)::float8, \
     EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.application_name = r.run_id) \
     FROM tether.runs r";

/// Every row of `app`, oldest first.
pub(crate) fn of_app(s: &mut Session, app: &str) -> Result<Vec<Row>> {
    select(s, &of_app_sql(app))
}

/// The statement [`of_app`] runs, for a caller that sends it in a batch (DECISIONS D80).
pub(crate) fn of_app_sql(app: &str) -> String {
    format!("{SELECT} WHERE r.app = {} ORDER BY r.started", lit(app))
}

/// Rows as [`of_app_sql`]'s statement returns them (one that does not parse is skipped).
pub(crate) fn parse_rows(rows: Vec<Vec<Option<String>>>) -> Vec<Row> {
    rows.into_iter().filter_map(parse).collect()
}

/// Every row, by app, oldest first.
pub(crate) fn all(s: &mut Session) -> Result<Vec<Row>> {
    select(s, &format!("{SELECT} ORDER BY r.app, r.started"))
}

/// The rows naming host `host` (any boot) in state `state`.
pub(crate) fn of_host(s: &mut Session, host: &str, state: &str) -> Result<Vec<Row>> {
    select(
        s,
        &format!(
            "{SELECT} WHERE r.host = {} AND r.state = {} ORDER BY r.started",
            lit(host),
            lit(state)
        ),
    )
}

/// The run holding `app`'s lock (advisory lock `key`) and the runs waiting for it in queue
/// order: the live places of the app's queue (PROTOCOL §15 "Under a cluster"), then any
/// session waiting for the key without a place (a run reaping a dead run of another app) by
/// `waitstart`. From `pg_locks` joined with `pg_stat_activity` (`application_name` = run id)
/// and the rows; a session with no row (not a tether run, or its row gone) is left out.
pub(crate) fn line_of(s: &mut Session, app: &str, key: i64) -> Result<(Option<Row>, Vec<Row>)> {
    let k = key as u64;
    let (hi, lo) = (k >> 32, k & 0xffff_ffff);
    let rows = s.rows(&format!(
        "SELECT l.granted, a.application_name FROM pg_locks l \
         JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.classid = {hi} AND l.objid = {lo} \
         ORDER BY l.granted DESC, l.waitstart NULLS LAST"
    ))?;
    let mut ids: Vec<(bool, String)> = rows
        .into_iter()
        .filter_map(|r| {
            let mut it = r.into_iter();
            let granted = it.next()?? == "t";
            Some((granted, it.next()??))
        })
        .collect();
    let queued: Vec<String> = super::queue::parse_entries(s.rows(&super::queue::live_sql(app))?)
        .into_iter()
        .map(|e| e.run_id)
        .collect();
    // Places first, in queue order; a key waiter that also has a place is listed once.
    let key_waiters: Vec<(bool, String)> = ids
        .drain(..)
        .filter(|(g, id)| *g || !queued.contains(id))
        .collect();
    let mut ids: Vec<(bool, String)> = key_waiters.iter().filter(|(g, _)| *g).cloned().collect();
    ids.extend(queued.into_iter().map(|id| (false, id)));
    ids.extend(key_waiters.into_iter().filter(|(g, _)| !*g));
    if ids.is_empty() {
        return Ok((None, Vec::new()));
    }
    let list: Vec<String> = ids.iter().map(|(_, id)| lit(id)).collect();
    let found = select(
        s,
        &format!("{SELECT} WHERE r.run_id IN ({})", list.join(", ")),
    )?;
    let by_id = |id: &str| found.iter().find(|r| r.run_id == id).cloned();
    let holder = ids.iter().find(|(g, _)| *g).and_then(|(_, id)| by_id(id));
    let waiters = ids
        .iter()
        .filter(|(g, _)| !*g)
        .filter_map(|(_, id)| by_id(id))
        .collect();
    Ok((holder, waiters))
}

/// The row of the run holding advisory lock `key` (the session granted it, named after the
/// run), in one round trip — the waiting line's and `--on-busy fail`'s holder, without the
/// queue [`line_of`] also reads.
pub(crate) fn holder_of(s: &mut Session, key: i64) -> Result<Option<Row>> {
    let k = key as u64;
    let (hi, lo) = (k >> 32, k & 0xffff_ffff);
    Ok(select(
        s,
        &format!(
            "{SELECT} WHERE r.run_id IN (SELECT a.application_name FROM pg_locks l \
             JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' \
             AND l.granted AND l.objsubid = 1 AND l.classid = {hi} AND l.objid = {lo}) LIMIT 1"
        ),
    )?
    .into_iter()
    .next())
}

fn select(s: &mut Session, sql: &str) -> Result<Vec<Row>> {
    Ok(s.rows(sql)?.into_iter().filter_map(parse).collect())
}

/// One row from its text columns (a row that does not parse is skipped: nothing is done to
/// what cannot be read).
fn parse(cols: Vec<Option<String>>) -> Option<Row> {
    let mut it = cols.into_iter();
    let mut next = || it.next().flatten();
    let run_id = next()?;
    let app = next()?;
    let host = next()?;
    let boot_id = next()?;
    let pid = next()?.parse().ok()?;
    let pid_start = next()?.parse().ok()?;
    let state = next()?;
    let group = next();
    let ci_link = next();
    let teardown = next();
    let fence = next().and_then(|f| f.parse().ok());
    let age = next().and_then(|f| f.parse().ok()).unwrap_or(0.0);
    let held_for = next().and_then(|f| f.parse().ok());
    let session_alive = next().as_deref() == Some("t");
    Some(Row {
        run_id,
        app,
        host,
        boot_id,
        pid,
        pid_start,
        state,
        group,
        ci_link,
        teardown,
        fence,
        age,
        held_for,
        session_alive,
    })
}

/// A row for unit tests of what the layers above do with rows: run `r`'s row of `a.test` on
/// host `h`, boot `b`, pid 1, nothing optional set.
#[cfg(test)]
pub(crate) fn sample_row(state: &str, alive: bool) -> Row {
    Row {
        run_id: "r".into(),
        app: "a.test".into(),
        host: "h".into(),
        boot_id: "b".into(),
        pid: 1,
        pid_start: 1,
        state: state.into(),
        group: None,
        ci_link: None,
        teardown: None,
        fence: None,
        age: 0.0,
        held_for: None,
        session_alive: alive,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_double_quotes_and_backslashes() {
        assert_eq!(lit("a"), "E'a'");
        assert_eq!(lit("it's"), "E'it''s'");
        assert_eq!(lit(r"a\'; DROP"), r"E'a\\''; DROP'");
        assert_eq!(lit("x\0y"), "E'x\u{fffd}y'");
    }

    #[test]
    fn a_supersede_is_read_back_from_its_failure_only() {
        let m = "cluster x (1.2.3.4:5): run r-1 was superseded by run r-2 while it waited";
        assert_eq!(superseded_in(m).as_deref(), Some("r-2"));
        for other in [
            "cluster x: statement failed: ERROR: canceling statement due to user request",
            "cluster x: run r-1 was superseded by run  while it waited",
            "run r-1 was superseded by run r 2 while it waited",
        ] {
            assert_eq!(superseded_in(other), None, "{other}");
        }
    }

    #[test]
    fn a_row_parses_from_text_and_nulls() {
        let cols = [
            Some("r1"),
            Some("a.test"),
            Some("h"),
            Some("b"),
            Some("42"),
            Some("99"),
            Some("running"),
            None,
            None,
            Some("echo td"),
            Some("7"),
            Some("1.5"),
            None,
            Some("f"),
        ]
        .map(|c| c.map(str::to_owned))
        .to_vec();
        let r = parse(cols).expect("parses");
        assert_eq!((r.pid, r.pid_start, r.fence), (42, 99, Some(7)));
        assert_eq!((r.group, r.held_for, r.session_alive), (None, None, false));
        assert_eq!(r.teardown.as_deref(), Some("echo td"));
    }
}
