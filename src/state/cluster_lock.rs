//! The cluster half of an app lock (issue 16, part 1): a **session-level advisory lock** on a
//! connection the run's core owns for the whole run, taken **after** the host's `flock` of the
//! same app, and a fencing token from the sequence `tether.fence` (PROTOCOL.md, "Cluster").
//!
//! Why the order cannot deadlock: every tether takes the two locks of an app in the same order
//! (this host's flock, then the cluster lock) and holds the locks of one app at a time. A run
//! waiting for the cluster lock holds its host's flock, so on each host at most one run waits
//! in PostgreSQL for a given app; the cluster holder already has both of its locks and waits
//! for neither. The waits-for chain therefore always ends at a holder that waits for nothing.
//!
//! The blocking `pg_advisory_lock` runs on a helper thread that only signals a pipe (as the
//! flock wait does, D4); the thread is joined before the lock is handed out, so the command is
//! still forked from a single-threaded core.

use crate::cluster::runs::{self, NewRow};
use crate::cluster::schema;
use crate::cluster::session::Session;
use crate::config::cluster::ClusterTarget;
use crate::error::Error;
use crate::ident::names::Domain;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::thread::JoinHandle;

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
pub(crate) struct ClusterHold {
    session: Session,
    pub(crate) fence: i64,
    /// The run id whose row this acquisition marked `running` (PROTOCOL §17), while it is.
    row: Option<String>,
    /// Leave the row `running` at release: the run's teardown failed, so the next holder reaps it.
    keep_row: bool,
}

impl ClusterHold {
    /// Before the session closes: a row still `running` goes back to `waiting` (a run that
    /// releases the lock to wait again — the queue's head check — is alive, and the next
    /// holder must not take it for a dead one), unless [`keep_row`](Self::keep_row) was
    /// called. Best effort: a failure leaves a row the next holder judges by its session.
    pub(crate) fn release_row(&mut self) {
        if let Some(id) = self.row.take() {
            if !self.keep_row {
                let _ = runs::set_state(&mut self.session, &id, runs::RUNNING, runs::WAITING);
            }
        }
    }

    /// The run's teardown failed: its row stays `running` for the next holder to reap.
    pub(crate) fn keep_row(&mut self) {
        self.keep_row = true;
    }

    /// Remove the run's own row (its teardown is over).
    pub(crate) fn remove_row(&mut self, run_id: &str) -> crate::error::Result<()> {
        self.row = None;
        runs::remove(&mut self.session, run_id)
    }

    /// The lock's session, for the statements its holder makes under the lock (reaping dead
    /// runs of the app, removing its own row).
    pub(crate) fn session(&mut self) -> &mut Session {
        &mut self.session
    }
}

impl fmt::Debug for ClusterHold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ClusterHold(fence {} on {})",
            self.fence, self.session.server
        )
    }
}

/// A tether error carried through the seam's `io::Result`; [`into_error`] takes it back out
/// with its class (an unreachable database stays exit 75).
fn io_err(e: Error) -> io::Error {
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
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in app.as_str().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h as i64
}

impl ClusterLocks {
    /// A session for one app lock: connected, refused behind a transaction-pooling proxy,
    /// the schema ensured (one line when it was created), the server told to notice a
    /// vanished client during a lock wait, and the run's `waiting` row written.
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
        s.execute("SET client_connection_check_interval = 1000")
            .map_err(io_err)?;
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

    /// Try the cluster lock of `app` on `session` once: the hold, or the session back.
    pub(crate) fn try_lock(
        &self,
        mut session: Session,
        app: &Domain,
    ) -> io::Result<Result<ClusterHold, Session>> {
        let got = session
            .value(&format!("SELECT pg_try_advisory_lock({})", key(app)))
            .map_err(io_err)?;
        if got == "t" {
            Ok(Ok(fence(session, self.row_for(app))?))
        } else {
            Ok(Err(session))
        }
    }
}

/// Draw the fence for a lock just taken on `session`, and mark the run's row `running` with it.
fn fence(mut session: Session, row: Option<&NewRow>) -> io::Result<ClusterHold> {
    let text = session
        .value("SELECT nextval('tether.fence')")
        .map_err(io_err)?;
    let fence = text.parse::<i64>().map_err(|_| {
        io_err(Error::tether(format!(
            "cluster {}: the fence {text:?} is not a number",
            session.server
        )))
    })?;
    if let Some(row) = row {
        runs::mark_running(&mut session, &row.run_id, fence).map_err(io_err)?;
    }
    Ok(ClusterHold {
        session,
        fence,
        row: row.map(|r| r.run_id.clone()),
        keep_row: false,
    })
}

/// A wait for the flock (when `file` is given) and then the cluster lock, on a helper thread.
pub(crate) struct ClusterWait {
    /// Boxed: a wait is moved around while it lasts.
    row: Option<Box<NewRow>>,
    done_rx: OwnedFd,
    handle: JoinHandle<(Option<File>, Session, io::Result<()>)>,
}

impl ClusterWait {
    /// Start waiting: `file` is an app's lockfile still to be flocked (`None`: this run holds
    /// the flock already), then `pg_advisory_lock` on `session`.
    pub(crate) fn start(
        file: Option<File>,
        mut session: Session,
        app: &Domain,
        row: Option<NewRow>,
    ) -> io::Result<Self> {
        let (rx, tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let sql = format!("SELECT pg_advisory_lock({})", key(app));
        let handle = std::thread::Builder::new()
            .name("cluster-wait".into())
            .spawn(move || {
                let mut result = match &file {
                    Some(f) => f.lock(),
                    None => Ok(()),
                };
                if result.is_ok() {
                    result = session.execute(&sql).map_err(io_err);
                }
                let _ = nix::unistd::write(&tx, b"x");
                (file, session, result)
            })?;
        Ok(ClusterWait {
            row: row.map(Box::new),
            done_rx: rx,
            handle,
        })
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.done_rx.as_raw_fd()
    }

    /// Join the thread (finished once `raw_fd` is readable): the flocked file (if it waited
    /// for one) and the cluster hold with its fence.
    pub(crate) fn finish(self) -> io::Result<(Option<File>, ClusterHold)> {
        let (file, session, result) = self
            .handle
            .join()
            .map_err(|_| io::Error::other("cluster lock wait thread panicked"))?;
        result?;
        Ok((file, fence(session, self.row.as_deref())?))
    }
}
