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
         teardown = EXCLUDED.teardown, fence = NULL, acquired = NULL, heartbeat = now()",
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
/// statement, which the acquisition sends in its one round trip (DECISIONS D80).
pub(crate) fn mark_running_sql(run_id: &str, fence: &str) -> String {
    format!(
        "UPDATE tether.runs SET state = '{RUNNING}', fence = {fence}, acquired = now(), \
         heartbeat = now() WHERE run_id = {}",
        lit(run_id)
    )
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

/// The run holding advisory lock `key` and the runs waiting for it (by `waitstart`, PG ≥ 14),
/// from `pg_locks` joined with `pg_stat_activity` (`application_name` = run id) and the rows.
/// A session with no row (not a tether run, or its row gone) is left out.
pub(crate) fn line_of(s: &mut Session, key: i64) -> Result<(Option<Row>, Vec<Row>)> {
    let k = key as u64;
    let (hi, lo) = (k >> 32, k & 0xffff_ffff);
    let rows = s.rows(&format!(
        "SELECT l.granted, a.application_name FROM pg_locks l \
         JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.classid = {hi} AND l.objid = {lo} \
         ORDER BY l.granted DESC, l.waitstart NULLS LAST"
    ))?;
    let ids: Vec<(bool, String)> = rows
        .into_iter()
        .filter_map(|r| {
            let mut it = r.into_iter();
            let granted = it.next()?? == "t";
            Some((granted, it.next()??))
        })
        .collect();
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
