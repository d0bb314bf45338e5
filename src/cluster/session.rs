//! One connection to the cluster's PostgreSQL server, on the calling thread and no other.
//!
//! The sync `postgres` crate drives its connection on a current-thread tokio runtime that
//! lives inside the client: no worker thread. The one thing in it that would start a thread is
//! the host name lookup (tokio's `lookup_host` runs `getaddrinfo` through `spawn_blocking`), so
//! tether resolves the host itself with std's `ToSocketAddrs` on the calling thread and hands
//! the client an address (`hostaddr`), keeping the name for TLS. The core that forks the
//! command must stay single-threaded (DECISIONS D43); `runner-tests/tests/cluster.rs` counts
//! the threads after a connection and a query.

use super::tls;
use crate::config::cluster::{ClusterTarget, FenceTiming, SslMode};
use crate::error::{Error, Failure, Result};
use postgres::SimpleQueryMessage;
use std::io::Read;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

/// The client side's dead-peer detection on the socket (TCP keepalives and
/// `TCP_USER_TIMEOUT`), shown by `tether cluster check`.
pub(crate) const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
pub(crate) const KEEPALIVE_RETRIES: u32 = 3;
pub(crate) const TCP_USER_TIMEOUT: Duration = Duration::from_secs(5);

/// How many separate statements must agree on the backend pid.
pub(crate) const POOL_PROBES: usize = 3;

/// Longest password file read.
const PASSWORD_FILE_MAX: u64 = 4096;

/// An open session (one server backend, as long as nothing pools in between).
pub(crate) struct Session {
    /// Boxed: the client is large, and sessions move into lock waits and out again.
    client: Box<postgres::Client>,
    /// The server as messages name it: the URL, and the address used.
    pub(crate) server: String,
}

impl Session {
    /// Connect to the cluster's server as `application_name` (shown in `pg_stat_activity`).
    /// Unreachable (refused, timed out, no route, the server starting or shutting down):
    /// [`Failure::Unavailable`], exit 75. Refused credentials or database: a tether failure.
    pub(crate) fn connect(target: &ClusterTarget, application_name: &str) -> Result<Session> {
        let url = &target.url;
        let password = read_password(target)?;
        let timeout = target
            .connect_timeout
            .unwrap_or(crate::config::settings::CLUSTER_CONNECT_TIMEOUT);
        let addrs = resolve(&url.host, url.port).map_err(|e| {
            Error::new(
                Failure::Unavailable,
                format!("cluster {url}: cannot resolve {}: {e}", url.host),
            )
        })?;
        let mut last = None;
        for addr in addrs {
            let mut config = postgres::Config::new();
            config
                .host(&url.host)
                .hostaddr(addr.ip())
                .port(addr.port())
                .user(&url.user)
                .dbname(&url.dbname)
                .application_name(application_name)
                .connect_timeout(timeout)
                .keepalives(true)
                .keepalives_idle(KEEPALIVE_IDLE)
                .keepalives_interval(KEEPALIVE_INTERVAL)
                .keepalives_retries(KEEPALIVE_RETRIES)
                .tcp_user_timeout(TCP_USER_TIMEOUT);
            if let Some(pw) = &password {
                config.password(pw);
            }
            let connected = match url.sslmode {
                SslMode::Disable => {
                    config.ssl_mode(postgres::config::SslMode::Disable);
                    config.connect(postgres::NoTls)
                }
                SslMode::Require => {
                    config.ssl_mode(postgres::config::SslMode::Require);
                    config.connect(tls::require()?)
                }
                SslMode::VerifyFull => {
                    config.ssl_mode(postgres::config::SslMode::Require);
                    config.connect(tls::verify_full(target.ca_file.as_deref())?)
                }
            };
            match connected {
                Ok(client) => {
                    return Ok(Session {
                        client: Box::new(client),
                        server: format!("{url} ({addr})"),
                    })
                }
                Err(e) => last = Some((addr, e)),
            }
        }
        Err(match last {
            Some((addr, e)) => connect_error(&format!("{url} ({addr})"), &e),
            None => Error::new(
                Failure::Unavailable,
                format!("cluster {url}: {} has no address", url.host),
            ),
        })
    }

    /// The backend pid over [`POOL_PROBES`] separate statements: session advisory locks need one
    /// backend for the whole session, which a transaction-pooling proxy (PgBouncer
    /// `pool_mode=transaction`) does not give.
    pub(crate) fn same_backend(&mut self) -> Result<String> {
        let first = self.value("SELECT pg_backend_pid()")?;
        for _ in 1..POOL_PROBES {
            let next = self.value("SELECT pg_backend_pid()")?;
            if next != first {
                return Err(Error::tether(format!(
                    "cluster {}: the server backend changed between two statements (pid {first}, \
                     then {next}): a transaction-pooling proxy (e.g. PgBouncer with \
                     pool_mode=transaction) is in between, and session advisory locks do not work \
                     through it; connect to PostgreSQL directly or use pool_mode=session",
                    self.server
                )));
            }
        }
        Ok(first)
    }

    /// Run `sql` (simple protocol: one round trip, no prepared statement) and return its
    /// rows as text (`NULL` as `None`).
    pub(crate) fn rows(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        let msgs = self
            .client
            .simple_query(sql)
            .map_err(|e| self.error("query failed", &e))?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
                }
                _ => None,
            })
            .collect())
    }

    /// Run several statements in one round trip (simple protocol: one message, run by the
    /// server as one implicit transaction) and return each statement's rows, in order, one
    /// set per statement (a statement without rows gives an empty set). The B9 hot path
    /// (DECISIONS D80) makes its bookkeeping one round trip with it.
    pub(crate) fn result_sets(&mut self, sql: &str) -> Result<Vec<Vec<Vec<Option<String>>>>> {
        let msgs = self
            .client
            .simple_query(sql)
            .map_err(|e| self.error("query failed", &e))?;
        let mut sets = Vec::new();
        let mut current = Vec::new();
        for m in &msgs {
            match m {
                SimpleQueryMessage::Row(r) => {
                    current.push((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
                }
                SimpleQueryMessage::CommandComplete(_) => sets.push(std::mem::take(&mut current)),
                _ => {}
            }
        }
        Ok(sets)
    }

    /// The first column of the first row of `sql`.
    pub(crate) fn value(&mut self, sql: &str) -> Result<String> {
        self.rows(sql)?
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next().flatten())
            .ok_or_else(|| Error::tether(format!("cluster {}: {sql}: no value", self.server)))
    }

    /// Run statements for their effect.
    pub(crate) fn execute(&mut self, sql: &str) -> Result<()> {
        self.client
            .batch_execute(sql)
            .map_err(|e| self.error("statement failed", &e))
    }

    /// Run `sql`, whose lock waits are bounded by `lock_timeout`: `Ok(false)` when a wait
    /// timed out (SQLSTATE 55P03, the statements after it not run), `Ok(true)` when all ran.
    pub(crate) fn execute_bounded(&mut self, sql: &str) -> Result<bool> {
        match self.client.batch_execute(sql) {
            Ok(()) => Ok(true),
            Err(e) if e.code().is_some_and(|c| c.code() == "55P03") => Ok(false),
            Err(e) => Err(self.error("statement failed", &e)),
        }
    }

    /// Run statements for their effect; a failure as one line without the server (the
    /// heartbeat's report, whose log line names the server itself).
    pub(crate) fn execute_quiet(&mut self, sql: &str) -> std::result::Result<(), String> {
        self.client.batch_execute(sql).map_err(|e| one_line(&e))
    }

    /// The server-side bound on a lock session (PROTOCOL §16): the server drops a silent
    /// client — and with it its lock or its place in the queue — within `server_release` of
    /// the last byte it received, never sooner than one second before. Settable per session
    /// by any user; `tether cluster check` sets them too, to show what a lock session gets.
    pub(crate) fn set_server_timeouts(&mut self, timing: &FenceTiming) -> Result<()> {
        let t = timing.server();
        self.execute(&format!(
            "SET tcp_keepalives_idle = {}; SET tcp_keepalives_interval = {}; \
             SET tcp_keepalives_count = {}; SET tcp_user_timeout = {}; \
             SET client_connection_check_interval = {}",
            t.keepalives_idle_s,
            t.keepalives_interval_s,
            t.keepalives_count,
            t.user_timeout_ms,
            t.check_interval_ms
        ))
    }

    /// An error of this session, classed like a connect error.
    pub(crate) fn error(&self, what: &str, e: &postgres::Error) -> Error {
        // The server going away is "retry later" (75), whether the socket closed or the
        // server said so first: SQLSTATE class 08 (connection exception) and 57P01–57P03
        // (shut down, crashed, not accepting connections yet) — a restart, a failover, an
        // operator's pg_terminate_backend.
        let gone = e.code().is_some_and(|c| {
            let code = c.code();
            code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
        });
        let failure = if e.as_db_error().is_none() || gone {
            Failure::Unavailable
        } else {
            Failure::Tether
        };
        Error::new(
            failure,
            format!("cluster {}: {what}: {}", self.server, one_line(e)),
        )
    }
}

/// Resolve on this thread (see the module doc). An address literal needs no lookup.
fn resolve(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    Ok((host, port).to_socket_addrs()?.collect())
}

/// Refused credentials, an unknown database or a missing privilege will not get better by
/// retrying (125); everything else at connect time is the server being unreachable (75).
/// A TLS failure that is the certificate's or the configuration's (not the network's) is
/// permanent too.
fn connect_error(server: &str, e: &postgres::Error) -> Error {
    let permanent = e.code().is_some_and(|c| {
        let code = c.code();
        code.starts_with("28") || code == "3D000" || code == "42501"
    }) || tls_refused(e);
    let failure = if permanent {
        Failure::Tether
    } else {
        Failure::Unavailable
    };
    Error::new(
        failure,
        format!("cluster {server}: cannot connect: {}", one_line(e)),
    )
}

/// Whether the chain holds a rustls error other than an I/O one (a certificate refused, a
/// handshake the server cannot do), or the server's "no TLS here" (sslmode asks for TLS).
fn tls_refused(e: &postgres::Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = next {
        // io::Error hides its payload from `source()`: look inside.
        let inner = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|i| i as &(dyn std::error::Error + 'static));
        for candidate in [Some(err), inner].into_iter().flatten() {
            if candidate.downcast_ref::<rustls::Error>().is_some()
                || candidate.to_string() == "server does not support TLS"
            {
                return true;
            }
        }
        next = err.source();
    }
    false
}

/// The error and its causes on one line (a server error's DETAIL/HINT come on new lines).
pub(crate) fn one_line(e: &postgres::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text.replace('\n', "; ")
}

/// The password from the variable or the file the config names, if any.
fn read_password(target: &ClusterTarget) -> Result<Option<String>> {
    if let Some(var) = &target.password_env {
        return match std::env::var(var) {
            Ok(v) if !v.is_empty() => Ok(Some(v)),
            _ => Err(Error::tether(format!(
                "cluster password_env: the variable {var} is not set (or empty)"
            ))),
        };
    }
    let Some(path) = &target.password_file else {
        return Ok(None);
    };
    let fail =
        |what: String| Error::tether(format!("cluster password_file {}: {what}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| fail(format!("cannot open: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| fail(format!("cannot stat: {e}")))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(fail(format!(
            "mode {:04o} lets others read it: make it 0600 (or 0400)",
            meta.mode() & 0o7777
        )));
    }
    let mut text = String::new();
    file.take(PASSWORD_FILE_MAX + 1)
        .read_to_string(&mut text)
        .map_err(|e| fail(format!("cannot read: {e}")))?;
    if text.len() as u64 > PASSWORD_FILE_MAX {
        return Err(fail(format!("longer than {PASSWORD_FILE_MAX} bytes")));
    }
    let pw = text.strip_suffix('\n').unwrap_or(&text);
    let pw = pw.strip_suffix('\r').unwrap_or(pw);
    if pw.is_empty() || pw.contains('\n') {
        return Err(fail("expected one line with the password".into()));
    }
    Ok(Some(pw.to_owned()))
}
