//! The cluster half of an app lock (issue 16): a **session-level advisory lock** on a
//! connection the run's core owns for the whole run, taken **before** the host's `flock` of the
//! same app, and a fencing token from the sequence `tether.fence` (PROTOCOL.md §14).
//!
//! Why the cluster lock comes first (DECISIONS D69, D84): a run waits in the app's queue on the
//! server holding nothing of the app, so every waiter of every host stands in one queue, served
//! in its order. Taken the other way round, the host's flock would let only one run per host
//! into that queue at a time.
//!
//! Why the order cannot deadlock (D70): every cluster run takes the two locks of an app in the
//! same order (cluster lock, then this host's flock) and holds the locks of one app at a time.
//! A cluster waiter holds neither; a run blocked on the flock already holds the cluster lock; a
//! flock holder is either that cluster holder (it waits for nothing) or something that never
//! waits for the cluster lock (a janitor's or reaper's non-blocking probe, a tether without a
//! cluster). The waits-for chain always ends at a holder that waits for nothing.
//!
//! The blocking waits (`pg_advisory_lock`, then the `flock`) run on a helper thread that only
//! signals a pipe (as the flock wait does, D4); the thread is joined before the lock is handed
//! out, so the command is still forked from a single-threaded core.

use super::heartbeat::Heartbeat;
use super::record::{self, LockMeta};
use crate::cluster::queue;
use crate::cluster::runs::{self, NewRow};
use crate::cluster::schema;
use crate::cluster::session::Session;
use crate::config::cluster::{ClusterTarget, FenceTiming};
use crate::error::Error;
use crate::ident::names::Domain;
use crate::sys::lease::Lease;
use std::fmt;
use std::io;

/// Where the cluster locks live, and who takes them (`application_name`: the run id).
#[derive(Debug, Clone)]
pub(crate) struct ClusterLocks {
    pub(crate) target: ClusterTarget,
    pub(crate) run_id: String,
    /// The run's row in `tether.runs` (PROTOCOL §17); `None` for a janitor's probe, which
    /// writes none.
    pub(crate) row: Option<NewRow>,
    /// Whether a session of this run wrote its row (shared by the clones the run's waits use).
    pub(crate) row_written: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// A held cluster lock: the session it lives on (closing it releases the lock) and the fence.
/// Once the run watches it, the session is the heartbeat's (PROTOCOL §16), and comes back to
/// be closed when the hold is dropped.
pub(crate) struct ClusterHold {
    session: Option<Session>,
    beat: Option<Heartbeat>,
    /// The server as messages name it.
    server: String,
    pub(crate) fence: i64,
    /// The run id whose row this acquisition marked `running` (PROTOCOL §17), while it is.
    row: Option<String>,
    /// Leave the row `running` at release: the run's teardown failed, so the next holder reaps it.
    keep_row: bool,
    /// What the acquisition's round trip read and did for the run (DECISIONS D80); boxed: a
    /// hold is moved around in lock states.
    acquired: Option<Box<Acquired>>,
}

/// What a run's acquisition did besides the fence, in the same round trip (DECISIONS D80).
struct Acquired {
    /// The app's rows, read under the lock, for the run's reconcile: taken once.
    rows: Option<Vec<runs::Row>>,
    /// When the round trip, which also bounded the session's statements
    /// (`statement_timeout`), was sent: the heartbeat's first renewal (PROTOCOL §16).
    bounded_at: Option<std::time::Duration>,
}

impl ClusterHold {
    /// The session back on the calling thread, for statements at the end of the hold: the
    /// heartbeat (if running) is stopped first. `None`: the heartbeat was stuck in a statement
    /// on a silent server and kept the session (it closes when tether exits).
    fn session_back(&mut self) -> Option<&mut Session> {
        if let Some(beat) = self.beat.take() {
            self.session = beat.stop();
        }
        self.session.as_mut()
    }

    /// Before the session closes: a row still `running` goes back to `waiting` (a run that
    /// releases the lock to wait again is alive, and the next holder must not take it for a
    /// dead one), unless [`keep_row`](Self::keep_row) was called. Best effort: a failure
    /// leaves a row the next holder judges by its session.
    pub(crate) fn release_row(&mut self) {
        if let Some(id) = self.row.take() {
            if !self.keep_row {
                if let Some(s) = self.session_back() {
                    let _ = runs::set_state(s, &id, runs::RUNNING, runs::WAITING);
                }
            }
        }
    }

    /// The app's rows as read at the acquisition, under the lock (once; `None` after, and for
    /// an acquisition that wrote no row).
    pub(crate) fn take_rows(&mut self) -> Option<Vec<runs::Row>> {
        self.acquired.as_mut().and_then(|a| a.rows.take())
    }

    /// The run's teardown failed: its row stays `running` for the next holder to reap.
    pub(crate) fn keep_row(&mut self) {
        self.keep_row = true;
    }

    /// Remove the run's own row (its teardown is over), on the lock's session — the heartbeat
    /// stopped first: this is the end of the hold.
    pub(crate) fn remove_row(&mut self, run_id: &str) -> crate::error::Result<()> {
        self.row = None;
        let server = self.server.clone();
        match self.session_back() {
            Some(s) => runs::remove(s, run_id),
            None => Err(Error::new(
                crate::error::Failure::Unavailable,
                format!("cluster {server}: the heartbeat kept the session (a statement hangs)"),
            )),
        }
    }

    /// The lock's session while no heartbeat has it (a janitor's probe): statements made under
    /// the lock. `None` while the heartbeat renews it — a run's holder makes its statements on
    /// a session of its own (PROTOCOL §17), since its heartbeat must never pause.
    pub(crate) fn session(&mut self) -> Option<&mut Session> {
        if self.beat.is_some() {
            return None;
        }
        self.session.as_mut()
    }
}

impl fmt::Debug for ClusterHold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterHold(fence {} on {})", self.fence, self.server)
    }
}

impl ClusterHold {
    /// Hand the session to a heartbeat (issue 16 §4) and return the lease the supervisor
    /// watches. An error means the session is gone (closed, the lock released).
    pub(crate) fn start_heartbeat(
        &mut self,
        app: &Domain,
        run_id: &str,
        timing: FenceTiming,
    ) -> io::Result<Lease> {
        let session = self
            .session
            .take()
            .ok_or_else(|| io::Error::other("internal: the heartbeat is already running"))?;
        let beat = Heartbeat::start(
            session,
            run_id,
            timing,
            self.acquired.as_mut().and_then(|a| a.bounded_at.take()),
        )?;
        let lease = beat.lease(format!(
            "app lock {app}: cluster session to {}",
            self.server
        ));
        self.beat = Some(beat);
        lease
    }
}

impl Drop for ClusterHold {
    /// Release: stop the heartbeat (the session comes back), then close the session.
    fn drop(&mut self) {
        if let Some(beat) = self.beat.take() {
            drop(beat.stop());
        }
        drop(self.session.take());
    }
}

/// A tether error carried through the seam's `io::Result`; [`into_error`] takes it back out
/// with its class (an unreachable database stays exit 75).
pub(super) fn io_err(e: Error) -> io::Error {
    io::Error::other(e)
}

/// The error inside `e`, class kept; any other I/O error as a tether failure about `what`.
pub(crate) fn into_error(e: io::Error, what: &str) -> Error {
    match e.get_ref().and_then(|i| i.downcast_ref::<Error>()) {
        Some(inner) => Error::new(inner.failure, inner.message.clone()),
        None => Error::tether(format!("{what}: {e}")),
    }
}

/// The advisory-lock key of an app: FNV-1a (64 bits) of its domain. Two apps that collide only
/// serialise with each other — the safe direction.
pub(crate) fn key(app: &Domain) -> i64 {
    key_of(app.as_str())
}

/// [`key`] of an app's name as a row holds it.
pub(crate) fn key_of(app: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in app.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h as i64
}

impl ClusterLocks {
    /// A session for one app lock: connected, refused behind a transaction-pooling proxy,
    /// the schema ensured (one line when it was created), the server told to drop it within
    /// `server_release` of its going silent — a waiter's place in the queue as much as a
    /// holder's lock ([`Session::set_server_timeouts`]) — and the run's `waiting` row written.
    pub(crate) fn connect(&self, app: &Domain) -> io::Result<Session> {
        let mut s = Session::connect(&self.target, &self.run_id).map_err(io_err)?;
        s.same_backend().map_err(io_err)?;
        let made = schema::ensure(&mut s).map_err(io_err)?;
        if !made.is_empty() {
            crate::output::info(
                "cluster-schema-created",
                &format!("cluster: created {} on {}", made.join(", "), s.server),
            );
        }
        s.set_server_timeouts(&self.target.timing).map_err(io_err)?;
        // The run's row, before it tries or waits for the lock (PROTOCOL §17): `status` shows
        // waiters from it, and a waiter that dies leaves a row with no session behind it.
        if let Some(row) = self.row_for(app) {
            runs::insert_waiting(&mut s, row).map_err(io_err)?;
            self.row_written
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(s)
    }

    /// A run that gives up before it holds the lock removes its `waiting` row, on a session
    /// of its own (the one that waited is blocked in the server). Only when it wrote one: a
    /// run that never reached the server does not wait for it again.
    pub(crate) fn forget_waiting_row(&self) {
        let Some(row) = &self.row else { return };
        if !self.row_written.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let gone =
            Session::connect(&self.target, &format!("{}.leave", self.run_id)).and_then(|mut s| {
                s.execute(&format!(
                    "DELETE FROM tether.runs WHERE run_id = {} AND state = '{}'",
                    runs::lit(&row.run_id),
                    runs::WAITING
                ))
            });
        if let Err(e) = gone {
            crate::output::warn(
                "cluster",
                &format!(
                    "cannot remove the waiting row of run {}: {}",
                    row.run_id, e.message
                ),
            );
        }
    }

    /// The run's row when `app` is the run's own (a run reaping a dead run of another app under
    /// that app's lock writes no row for it).
    pub(crate) fn row_for(&self, app: &Domain) -> Option<&NewRow> {
        self.row.as_ref().filter(|r| r.app == app.as_str())
    }

    /// Try the cluster lock of `app` on `session` once: the hold, or the session back. For
    /// the run's own app a free lock with a live place in the app's queue is the queue's
    /// (PROTOCOL §15 "Under a cluster"): it is let go at once and the run queues.
    pub(crate) fn try_lock(
        &self,
        mut session: Session,
        app: &Domain,
    ) -> io::Result<Result<ClusterHold, Session>> {
        let k = key(app);
        let got = match self.row_for(app) {
            Some(row) => {
                let sets = session
                    .result_sets(&format!(
                        "SELECT pg_try_advisory_lock({k}); SELECT count(*) FROM ({}) q",
                        queue::live_sql(&row.app)
                    ))
                    .map_err(io_err)?;
                let first = |i: usize| {
                    sets.get(i)
                        .and_then(|set| set.first())
                        .and_then(|r| r.first().cloned().flatten())
                        .unwrap_or_default()
                };
                let (got, queued) = (first(0) == "t", first(1) != "0");
                if got && queued {
                    session
                        .execute(&format!("SELECT pg_advisory_unlock({k})"))
                        .map_err(io_err)?;
                    return Ok(Err(session));
                }
                if got {
                    "t".to_owned()
                } else {
                    String::new()
                }
            }
            None => session
                .value(&format!("SELECT pg_try_advisory_lock({k})"))
                .map_err(io_err)?,
        };
        if got == "t" {
            let own = self.row_for(app).map(|r| (r, self.target.timing));
            match fence(session, own, None)? {
                Fenced::Held(hold) => Ok(Ok(hold)),
                Fenced::NotHead(session) => Ok(Err(session)),
            }
        } else {
            Ok(Err(session))
        }
    }
}

/// What drawing the fence came to: the hold, or — for a queued run whose head check failed
/// (a live, unskipped place now stands ahead of its own) — the session back, the app lock
/// already let go on it, the run's place kept.
pub(super) enum Fenced {
    Held(ClusterHold),
    NotHead(Session),
}

/// A run's place in its app's queue on the cluster (PROTOCOL §15 "Under a cluster"): its
/// ticket, the key of the ticket lock its session holds, and after how long without a look a
/// waiter ahead of it is skipped (the wait-progress interval).
#[derive(Debug, Clone)]
pub(crate) struct Spot {
    pub(crate) ticket: String,
    pub(crate) key: i32,
    pub(crate) skip_after: std::time::Duration,
}

/// Draw the fence for a lock just taken on `session`; for the run's own app (`own`: its row
/// and fence timing) in the same round trip (DECISIONS D80): mark its row `running` with the
/// fence — for a queued run (`spot`) only if it is still the head, leaving the queue in the
/// same message — bound the session's statements for the heartbeat (`statement_timeout`,
/// PROTOCOL §16), and read the app's rows for the reconcile: one message, which the server runs
/// as one implicit transaction after the grant.
pub(super) fn fence(
    mut session: Session,
    own: Option<(&NewRow, FenceTiming)>,
    spot: Option<&Spot>,
) -> io::Result<Fenced> {
    let Some((row, timing)) = own else {
        let text = session
            .value("SELECT nextval('tether.fence')")
            .map_err(io_err)?;
        let fence = parse_fence(&session, &text)?;
        return Ok(Fenced::Held(hold_of(session, fence, None, None)));
    };
    let sent = crate::sys::lease::mono_now();
    let mut sets = session
        .result_sets(&own_sql(row, &timing, spot))
        .map_err(io_err)?;
    let bad = |what: &str| io_err(Error::tether(format!("cluster {}: {what}", session.server)));
    // The fence, [leaving the queue: two], the SET, the rows.
    let expected = if spot.is_some() { 5 } else { 3 };
    if sets.len() != expected {
        return Err(bad("the acquisition's statements did not all answer"));
    }
    let rows = sets.pop().unwrap_or_default();
    let first = sets
        .into_iter()
        .next()
        .and_then(|set| set.into_iter().next())
        .unwrap_or_default();
    let mut cols = first.into_iter();
    let text = cols.next().flatten().ok_or_else(|| bad("no fence drawn"))?;
    let marked_running = cols.next().flatten().as_deref() != Some("0");
    let fence = parse_fence(&session, &text)?;
    if !marked_running {
        // A newer run of the group superseded us while we waited (PROTOCOL §18) — asked now,
        // on our own session, before it closes.
        if let Ok(Some(by)) = runs::superseded_by(&mut session, &row.run_id) {
            return Err(io_err(runs::superseded_error(&session, &row.run_id, &by)));
        }
        // Not the head any more: the lock goes back to the queue, our place stays.
        if spot.is_some() {
            session
                .execute(&format!(
                    "SET statement_timeout = 0; SELECT pg_advisory_unlock({})",
                    key_of(&row.app)
                ))
                .map_err(io_err)?;
            return Ok(Fenced::NotHead(session));
        }
    }
    let rows = runs::parse_rows(rows);
    let acquired = Acquired {
        rows: Some(rows),
        bounded_at: Some(sent),
    };
    Ok(Fenced::Held(hold_of(
        session,
        fence,
        Some(row.run_id.clone()),
        Some(Box::new(acquired)),
    )))
}

/// The acquisition's one round trip for the run's own app (see [`fence`]). The fence is drawn
/// once (a volatile CTE is evaluated once) and the row update runs whether or not the row is
/// there (how many rows it marked comes back beside the fence: none for a superseded run, or
/// for a queued run that is no longer the head); `statement_timeout` comes after the
/// statements that must not be bounded by it.
fn own_sql(row: &NewRow, timing: &FenceTiming, spot: Option<&Spot>) -> String {
    let (head_check, leave) = match spot {
        Some(spot) => (
            format!(
                " AND {}",
                queue::none_ahead_sql(&row.app, &spot.ticket, spot.skip_after)
            ),
            format!("{}; ", queue::leave_on_grant_sql(&row.run_id, spot.key)),
        ),
        None => (String::new(), String::new()),
    };
    format!(
        "WITH f AS (SELECT nextval('tether.fence') AS v), u AS ({}) \
         SELECT v, (SELECT count(*) FROM u) FROM f; {leave}\
         SET statement_timeout = {}; {}",
        runs::mark_running_sql(&row.run_id, "(SELECT v FROM f)", &head_check),
        timing.self_fence.as_millis().max(1),
        runs::of_app_sql(&row.app)
    )
}

fn parse_fence(session: &Session, text: &str) -> io::Result<i64> {
    text.parse::<i64>().map_err(|_| {
        io_err(Error::tether(format!(
            "cluster {}: the fence {text:?} is not a number",
            session.server
        )))
    })
}

fn hold_of(
    session: Session,
    fence: i64,
    row: Option<String>,
    acquired: Option<Box<Acquired>>,
) -> ClusterHold {
    ClusterHold {
        server: session.server.clone(),
        session: Some(session),
        beat: None,
        fence,
        row,
        keep_row: false,
        acquired,
    }
}

/// The run holding `app`'s cluster lock, as lock metadata for the waiting line (PROTOCOL §17);
/// `None` when it cannot be told (no row, a query failure: the line says "unknown").
pub(super) fn remote_holder(session: &mut Session, app: &Domain) -> Option<LockMeta> {
    let h = runs::holder_of(session, key(app)).ok()??;
    let held = h.held_for.unwrap_or(h.age).max(0.0) as u64;
    Some(LockMeta {
        version: record::VERSION,
        app: h.app,
        run_id: h.run_id,
        pid: h.pid,
        pid_start: h.pid_start,
        host: h.host,
        started_at: record::unix_now().saturating_sub(held),
        state: record::State::Running,
        run_dir: String::new(),
        cgroup: None,
        ci: None,
        token: None,
    })
}

/// The cluster's holder of `app`, looked up on a session of its own (`<run id>.look`, so it is
/// never taken for the run's own session). `None` on any failure.
pub(super) fn cluster_holder(cluster: &ClusterLocks, app: &Domain) -> Option<LockMeta> {
    let mut s = Session::connect(&cluster.target, &format!("{}.look", cluster.run_id)).ok()?;
    remote_holder(&mut s, app)
}
