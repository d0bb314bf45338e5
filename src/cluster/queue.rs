//! The queue of an app's waiters on the cluster's server (issue 17 under a cluster, PROTOCOL
//! §15 "Under a cluster", DECISIONS D84): the host queue's design on PostgreSQL's primitives.
//!
//! - A waiter's place is its row's `ticket` (names compare bytewise, as the host queue's
//!   ticket names do: one total order for every reader, oldest-first and newest-first alike).
//! - A place is live while the waiter's lock session holds the **ticket lock**
//!   `(TICKET_CLASS, ticket_key)`: the server releases it when the session ends, so a dead
//!   waiter leaves the queue by itself (its row is ignored, and deleted by the next holder's
//!   reap, §17); nothing sweeps.
//! - Registrations of one app are serialised by the **counter lock** `(COUNTER_CLASS,
//!   fold32(app key))`, transaction-scoped and taken without blocking: two arrivals never count
//!   the same queue (`--max-queue`) or take the same place (supersede in place).
//!
//! Two-key advisory locks (`objsubid = 2` in `pg_locks`) never conflict with the app locks'
//! one-key (bigint) locks; the classes differ from the schema's set-up lock (`'teth'`).
//! Everything here is SQL text and its parsing; the waits are `state::cluster_lock`'s.

use super::runs::{lit, Victim, RUNNING, WAITING};
use super::session::Session;
use crate::error::{Error, Result};
use std::time::Duration;

/// The ticket locks' first key: `'tque'`.
pub(crate) const TICKET_CLASS: i32 = 0x7471_7565;
/// The counter locks' first key: `'tqcn'`.
pub(crate) const COUNTER_CLASS: i32 = 0x7471_636e;

/// The app key folded to the counter lock's second key (two apps that collide only
/// serialise their registrations).
pub(crate) fn counter_key(app_key: i64) -> i32 {
    let k = app_key as u64;
    ((k >> 32) ^ (k & 0xffff_ffff)) as u32 as i32
}

/// The ticket lock's second key for ticket number `n` (non-negative; numbers 2^31 apart never
/// stand in one queue at once).
pub(crate) fn ticket_key(n: i64) -> i32 {
    (n & 0x7fff_ffff) as i32
}

/// A live place in an app's queue, as read on the server.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub(crate) run_id: String,
    pub(crate) host: String,
    pub(crate) pid: i32,
    pub(crate) group: Option<String>,
    pub(crate) ticket: String,
    pub(crate) ticket_key: i32,
    /// Seconds since it started waiting.
    pub(crate) waited: f64,
    /// Seconds since it last looked at the queue (a stopped waiter's grows).
    pub(crate) unseen: f64,
}

/// `pg_locks` rows of this database only.
const THIS_DATABASE: &str = "(SELECT oid FROM pg_database WHERE datname = current_database())";

/// The condition "row `r` holds a live place": a ticket, and its ticket lock granted (held
/// exclusively: a waiter behind it holds it shared for an instant once it is let go). The
/// subquery is not correlated, so `pg_locks` (which takes every lock partition's lock to read
/// the lock table) is read once per statement, not once per row.
fn live(r: &str) -> String {
    format!(
        "{r}.ticket IS NOT NULL AND {r}.ticket_key::oid IN (SELECT l.objid FROM pg_locks l \
         WHERE l.locktype = 'advisory' AND l.granted AND l.classid = {TICKET_CLASS} \
         AND l.objsubid = 2 AND l.mode = 'ExclusiveLock' AND l.database = {THIS_DATABASE})"
    )
}

/// The live places of `app`, in queue order.
pub(crate) fn live_sql(app: &str) -> String {
    format!(
        "SELECT r.run_id, r.host, r.pid, r.grp, r.ticket, r.ticket_key, \
         extract(epoch FROM now() - r.started), \
         extract(epoch FROM now() - coalesce(r.looked, r.started)) \
         FROM tether.runs r WHERE r.app = {} AND {} ORDER BY r.ticket COLLATE \"C\"",
        lit(app),
        live("r")
    )
}

/// The rows of a [`live_sql`] answer, sorted bytewise again (the order every reader agrees
/// on, whatever the database's collation).
pub(crate) fn parse_entries(rows: Vec<Vec<Option<String>>>) -> Vec<Entry> {
    let mut entries: Vec<Entry> = rows
        .into_iter()
        .filter_map(|cols| {
            let mut it = cols.into_iter();
            let mut next = || it.next().flatten();
            let run_id = next()?;
            let host = next()?;
            let pid = next()?.parse().ok()?;
            let group = next();
            let ticket = next()?;
            let ticket_key = next()?.parse().ok()?;
            let waited = next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
            let unseen = next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
            Some(Entry {
                run_id,
                host,
                pid,
                group,
                ticket,
                ticket_key,
                waited,
                unseen,
            })
        })
        .collect();
    entries.sort_by(|a, b| a.ticket.as_bytes().cmp(b.ticket.as_bytes()));
    entries
}

/// The app's holder as its row says (for the waiting line and supersede): the `running` row
/// of `app` with a session named after it, newest grant first.
pub(crate) fn holder_sql(app: &str) -> String {
    format!(
        "SELECT r.run_id, r.host, r.pid, r.grp, \
         extract(epoch FROM now() - coalesce(r.acquired, r.started)) \
         FROM tether.runs r WHERE r.app = {} AND r.state = '{RUNNING}' \
         AND EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.application_name = r.run_id) \
         ORDER BY r.acquired DESC NULLS LAST LIMIT 1",
        lit(app)
    )
}

/// The holder as [`holder_sql`] reads it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Holder {
    pub(crate) run_id: String,
    pub(crate) host: String,
    pub(crate) pid: i32,
    pub(crate) group: Option<String>,
    /// Seconds since it took the lock.
    pub(crate) held: f64,
}

pub(crate) fn parse_holder(rows: Vec<Vec<Option<String>>>) -> Option<Holder> {
    let mut it = rows.into_iter().next()?.into_iter();
    let mut next = || it.next().flatten();
    Some(Holder {
        run_id: next()?,
        host: next()?,
        pid: next()?.parse().ok()?,
        group: next(),
        held: next().and_then(|v| v.parse().ok()).unwrap_or(0.0),
    })
}

/// A registration's first round trip: open the transaction, try the counter lock, draw the
/// ticket number, read the queue and the holder. Four result sets: (BEGIN has none) the
/// try and the number, the live places, the holder.
pub(crate) fn register_read_sql(app: &str, app_key: i64) -> String {
    format!(
        "BEGIN; SELECT pg_try_advisory_xact_lock({COUNTER_CLASS}, {}), \
         nextval('tether.ticket'); {}; {}",
        counter_key(app_key),
        live_sql(app),
        holder_sql(app)
    )
}

/// A registration's second round trip, under the counter lock: take the ticket lock, write
/// the place, mark the runs superseded (`victims`, when any) and commit. Result sets: the
/// ticket lock, the place's update, the marked victims (`run_id, state, host`).
pub(crate) fn register_write_sql(me: &str, ticket: &str, key: i32, victims: &[String]) -> String {
    let mark = if victims.is_empty() {
        "SELECT NULL, NULL, NULL WHERE false".to_owned()
    } else {
        let ids: Vec<String> = victims.iter().map(|v| lit(v)).collect();
        format!(
            "UPDATE tether.runs SET superseded_by = {me} WHERE run_id IN ({}) \
             AND superseded_by IS NULL AND state IN ('{WAITING}', '{RUNNING}') \
             RETURNING run_id, state, host",
            ids.join(", "),
            me = lit(me)
        )
    };
    format!(
        "SELECT pg_advisory_lock({TICKET_CLASS}, {key}); \
         UPDATE tether.runs SET ticket = {}, ticket_key = {key}, looked = now() \
         WHERE run_id = {}; {mark}; COMMIT",
        lit(ticket),
        lit(me)
    )
}

/// A waiter's look: it is seen (`looked`), learns whether it was superseded, and reads the
/// queue and the holder. Result sets: the mark, the live places, the holder.
pub(crate) fn look_sql(me: &str, app: &str) -> String {
    format!(
        "UPDATE tether.runs SET looked = now() WHERE run_id = {} RETURNING superseded_by; {}; {}",
        lit(me),
        live_sql(app),
        holder_sql(app)
    )
}

/// How long one wait of a queued run blocks in the server before it looks again (`SET LOCAL
/// lock_timeout`): the host queue's look interval, or a third of the skip bound when that is
/// shorter (a waiter must look several times within the bound, or the runs behind it would
/// take it for stopped), never under 20 ms.
pub(crate) fn wait_slice(skip_after: Duration) -> Duration {
    (skip_after / 3).clamp(Duration::from_millis(20), Duration::from_millis(200))
}

/// Wait (at most `slice`) for the waiter ahead, whose ticket lock is `key`, to leave: a shared
/// lock, let go of at once — waiters behind one place wait for it together.
pub(crate) fn wait_ticket_sql(key: i32, slice: Duration) -> String {
    format!(
        "SET LOCAL lock_timeout = {}; SELECT pg_advisory_lock_shared({TICKET_CLASS}, {key}); \
         SELECT pg_advisory_unlock_shared({TICKET_CLASS}, {key})",
        slice.as_millis()
    )
}

/// This session's granted advisory lock `(classid, objid, objsubid)` in `mode`, as a
/// `pg_locks` condition.
fn own_lock(classid: u32, objid: u32, objsubid: u8, mode: &str) -> String {
    format!(
        "l.pid = pg_backend_pid() AND l.locktype = 'advisory' AND l.granted \
         AND l.classid = {classid} AND l.objid = {objid} AND l.objsubid = {objsubid} \
         AND l.mode = '{mode}'"
    )
}

/// After a slice ended by its `lock_timeout`: whether the app lock `app_key` was granted
/// anyway (DECISIONS D85). PostgreSQL can grant a waiter its lock in the instant the timeout
/// fires and still fail the statement — the error path keeps the grant — and a session-level
/// lock outlives the failed statement. A waiter that took the failure at its word would hold
/// the app unknowingly, and could go on to wait behind a run that waits for it.
pub(crate) fn granted_anyway(s: &mut Session, app_key: i64) -> Result<bool> {
    let k = app_key as u64;
    let held = s.value(&format!(
        "SELECT count(*) FROM pg_locks l WHERE {}",
        own_lock((k >> 32) as u32, k as u32, 1, "ExclusiveLock")
    ))?;
    Ok(held != "0")
}

/// [`granted_anyway`] for a wait on the place ahead (ticket lock `key`, shared): a shared lock
/// granted as the slice ended is let go (the run ahead left — `true`).
pub(crate) fn left_anyway(s: &mut Session, key: i32) -> Result<bool> {
    let let_go = s.value(&format!(
        "SELECT count(pg_advisory_unlock_shared({TICKET_CLASS}, {key})) FROM pg_locks l \
         WHERE {}",
        own_lock(TICKET_CLASS as u32, key as u32, 2, "ShareLock")
    ))?;
    Ok(let_go != "0")
}

/// The head's wait (at most `slice`) for the app lock `app_key`.
pub(crate) fn wait_app_sql(app_key: i64, slice: Duration) -> String {
    format!(
        "SET LOCAL lock_timeout = {}; SELECT pg_advisory_lock({app_key})",
        slice.as_millis()
    )
}

/// The head check of the grant's round trip (PROTOCOL §15): no live place of `app` ahead of
/// `ticket` whose waiter looked within `skip_after` (one that did not is stopped, and skipped).
pub(crate) fn none_ahead_sql(app: &str, ticket: &str, skip_after: Duration) -> String {
    format!(
        "NOT EXISTS (SELECT 1 FROM tether.runs q WHERE q.app = {} AND {} \
         AND q.ticket COLLATE \"C\" < {} COLLATE \"C\" \
         AND coalesce(q.looked, q.started) > now() - interval '{} milliseconds')",
        lit(app),
        live("q"),
        lit(ticket),
        skip_after.as_millis().max(1)
    )
}

/// Leave the queue on the grant (the row is `running`, so the head check passed): the place
/// cleared, the ticket lock let go.
pub(crate) fn leave_on_grant_sql(me: &str, key: i32) -> String {
    format!(
        "SELECT pg_advisory_unlock({TICKET_CLASS}, {key}) FROM tether.runs \
         WHERE run_id = {me} AND state = '{RUNNING}'; \
         UPDATE tether.runs SET ticket = NULL WHERE run_id = {me} AND state = '{RUNNING}'",
        me = lit(me)
    )
}

/// The place a new ticket takes (PROTOCOL §15): its arrival (`n` counted up for oldest-first,
/// down for newest-first), the head (it replaced the holder), or right behind `after` (the
/// foremost queued run it replaced) — `.1` appended while the name is taken.
pub(crate) fn place(
    n: i64,
    newest_first: bool,
    head: bool,
    after: Option<&str>,
    taken: &[String],
) -> String {
    const MID: i64 = 5_000_000_000_000_000_000;
    if head {
        return format!("{:020}.{n}", 0);
    }
    if let Some(after) = after {
        let mut name = format!("{after}.1");
        while taken.iter().any(|t| t == &name) {
            name.push_str(".1");
        }
        return name;
    }
    let v = if newest_first { MID - n } else { MID + n };
    format!("{v:020}")
}

/// What a registration's first round trip read, under the counter lock.
#[derive(Debug)]
pub(crate) struct Registration {
    /// The new ticket's number.
    pub(crate) n: i64,
    pub(crate) entries: Vec<Entry>,
    pub(crate) holder: Option<Holder>,
}

/// A registration's first round trip ([`register_read_sql`]). `None`: another arrival holds
/// the counter lock — rolled back, try again shortly.
pub(crate) fn register_read(
    s: &mut Session,
    app: &str,
    app_key: i64,
) -> Result<Option<Registration>> {
    let mut sets = s.result_sets(&register_read_sql(app, app_key))?.into_iter();
    let (_begin, Some(tried), Some(live), Some(holder)) =
        (sets.next(), sets.next(), sets.next(), sets.next())
    else {
        let _ = s.execute("ROLLBACK");
        return Err(Error::tether(format!(
            "cluster {}: the queue's registration did not answer",
            s.server
        )));
    };
    let mut cols = tried.into_iter().next().unwrap_or_default().into_iter();
    let got = cols.next().flatten().as_deref() == Some("t");
    let n = cols.next().flatten().and_then(|v| v.parse::<i64>().ok());
    match (got, n) {
        (true, Some(n)) => Ok(Some(Registration {
            n,
            entries: parse_entries(live),
            holder: parse_holder(holder),
        })),
        _ => {
            s.execute("ROLLBACK")?;
            Ok(None)
        }
    }
}

/// End a registration without a place (`--max-queue`): the counter lock is let go.
pub(crate) fn register_abandon(s: &mut Session) -> Result<()> {
    s.execute("ROLLBACK")
}

/// A registration's second round trip ([`register_write_sql`]): the place taken, the victims
/// marked, committed. The victims the mark reached (a run that ended meanwhile is not one).
pub(crate) fn register_write(
    s: &mut Session,
    me: &str,
    (ticket, key): (&str, i32),
    victims: &[String],
) -> Result<Vec<Victim>> {
    let sets = s.result_sets(&register_write_sql(me, ticket, key, victims))?;
    let marked = sets.into_iter().nth(2).unwrap_or_default();
    Ok(marked
        .into_iter()
        .filter_map(|r| {
            let mut it = r.into_iter();
            Some(Victim {
                run_id: it.next()??,
                state: it.next()??,
                host: it.next()??,
            })
        })
        .collect())
}

/// Cancel the lock waits of the marked waiters `run_ids` (their sessions are named after
/// them): a wait on the app or on the place ahead ends at once, and the waiter finds its mark
/// (PROTOCOL §18). One between two waits finds it at its next look.
pub(crate) fn cancel_waits(s: &mut Session, run_ids: &[String]) -> Result<()> {
    if run_ids.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = run_ids.iter().map(|v| lit(v)).collect();
    s.execute(&format!(
        "SELECT pg_cancel_backend(a.pid) FROM pg_stat_activity a \
         WHERE a.application_name IN ({}) AND EXISTS (SELECT 1 FROM pg_locks l \
         WHERE l.pid = a.pid AND l.locktype = 'advisory' AND NOT l.granted)",
        ids.join(", ")
    ))
}

/// What a waiter's look read ([`look_sql`]).
#[derive(Debug)]
pub(crate) struct Look {
    /// The run that superseded this one, if one did.
    pub(crate) superseded_by: Option<String>,
    pub(crate) entries: Vec<Entry>,
    pub(crate) holder: Option<Holder>,
}

/// A waiter's look at the queue.
pub(crate) fn look(s: &mut Session, me: &str, app: &str) -> Result<Look> {
    let mut sets = s.result_sets(&look_sql(me, app))?.into_iter();
    let (Some(mark), Some(live), Some(holder)) = (sets.next(), sets.next(), sets.next()) else {
        return Err(Error::tether(format!(
            "cluster {}: the queue did not answer",
            s.server
        )));
    };
    Ok(Look {
        superseded_by: mark
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next().flatten()),
        entries: parse_entries(live),
        holder: parse_holder(holder),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_sort_as_the_host_queue_names_do() {
        let a = place(1, false, false, None, &[]);
        let b = place(2, false, false, None, &[]);
        let newest = place(3, true, false, None, &[]);
        let head = place(4, false, true, None, &[]);
        let behind_a = place(5, false, false, Some(&a), &[]);
        let behind_a_again = place(6, false, false, Some(&a), std::slice::from_ref(&behind_a));
        let mut all = vec![&b, &behind_a_again, &a, &newest, &behind_a, &head];
        all.sort_by(|x, y| x.as_bytes().cmp(y.as_bytes()));
        assert_eq!(
            all,
            vec![&head, &newest, &a, &behind_a, &behind_a_again, &b]
        );
    }

    #[test]
    fn a_waiter_looks_at_least_three_times_within_the_skip_bound() {
        assert_eq!(
            wait_slice(Duration::from_secs(60)),
            Duration::from_millis(200)
        );
        assert_eq!(
            wait_slice(Duration::from_millis(300)),
            Duration::from_millis(100)
        );
        assert_eq!(wait_slice(Duration::ZERO), Duration::from_millis(20));
    }

    #[test]
    fn keys_stay_in_range() {
        assert!(ticket_key(i64::MAX) >= 0);
        assert_eq!(ticket_key(5), 5);
        assert_eq!(counter_key(0x0000_0001_0000_0001), 0);
    }
}
