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

use super::heartbeat::Heartbeat;
use crate::cluster::schema;
use crate::cluster::session::Session;
use crate::config::cluster::{ClusterTarget, FenceTiming};
use crate::error::Error;
use crate::ident::names::Domain;
use crate::sys::lease::Lease;
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
        let beat = Heartbeat::start(session, run_id, timing)?;
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
    /// the schema ensured (one line when it was created), and the server told to drop it
    /// within `server_release` of its going silent — a waiter's place in the queue as much as a
    /// holder's lock ([`Session::set_server_timeouts`]).
    pub(crate) fn connect(&self) -> io::Result<Session> {
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
        Ok(s)
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
            Ok(Ok(fence(session)?))
        } else {
            Ok(Err(session))
        }
    }
}

/// Draw the fence for a lock just taken on `session`.
fn fence(mut session: Session) -> io::Result<ClusterHold> {
    let text = session
        .value("SELECT nextval('tether.fence')")
        .map_err(io_err)?;
    let fence = text.parse::<i64>().map_err(|_| {
        io_err(Error::tether(format!(
            "cluster {}: the fence {text:?} is not a number",
            session.server
        )))
    })?;
    Ok(ClusterHold {
        server: session.server.clone(),
        session: Some(session),
        beat: None,
        fence,
    })
}

/// A wait for the flock (when `file` is given) and then the cluster lock, on a helper thread.
pub(crate) struct ClusterWait {
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
        Ok((file, fence(session)?))
    }
}
