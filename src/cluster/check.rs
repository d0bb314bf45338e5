//! `tether cluster check`: connect, refuse a transaction-pooling proxy, create what is missing
//! (one line saying so), verify the schema, and report the server version and the keepalive
//! settings in force. Exit 0 when the cluster is usable; 75 when the server is unreachable;
//! 125 for everything else (no cluster configured, bad URL, credentials, pooler, schema).

use super::schema;
use super::session::{self, Session};
use crate::config::args::ClusterArgs;
use crate::config::cluster::ClusterTarget;
use crate::error::{Error, Result};
use crate::sys::fault::fault_pause;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Args)]
pub(crate) struct ClusterCmdArgs {
    #[command(subcommand)]
    pub(crate) action: ClusterAction,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ClusterAction {
    /// Connect to the cluster's PostgreSQL server, create tether's schema if missing, verify
    /// it, and report the server version, the keepalive settings and the backend stability.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    #[arg(long, env = "TETHER_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) cluster: ClusterArgs,
}

/// `tether cluster …`.
pub(crate) fn main(args: ClusterCmdArgs) -> i32 {
    crate::output::init(Default::default(), false, false);
    let ClusterAction::Check(args) = args.action;
    match check(args) {
        Ok(report) => {
            crate::output::stdout(&report);
            0
        }
        Err(e) => {
            crate::output::error(&e.message);
            e.exit_code()
        }
    }
}

fn check(args: CheckArgs) -> Result<String> {
    let cfg = crate::config::load(args.config.as_deref())?;
    let target = args.cluster.target(&cfg)?.ok_or_else(|| {
        Error::tether(
            "no cluster configured: set cluster.url in the config file, --cluster-url or \
             TETHER_CLUSTER_URL",
        )
    })?;
    let mut s = Session::connect(&target, "tether cluster check")?;
    let pid = s.same_backend()?;
    let made = schema::ensure(&mut s)?;
    if !made.is_empty() {
        crate::output::info(
            "cluster-schema-created",
            &format!("cluster: created {} on {}", made.join(", "), s.server),
        );
    }
    schema::verify(&mut s)?;
    // What a lock session gets (PROTOCOL §16), so the keepalives shown are the ones in force
    // for a run's lock.
    s.set_server_timeouts(&target.timing)?;
    let settings = s.rows(
        "SELECT current_setting('server_version'), \
                current_setting('tcp_keepalives_idle'), \
                current_setting('tcp_keepalives_interval'), \
                current_setting('tcp_keepalives_count'), \
                current_setting('tcp_user_timeout'), \
                current_setting('client_connection_check_interval'), \
                (SELECT CASE WHEN ssl THEN version || ' ' || cipher ELSE 'off' END \
                   FROM pg_stat_ssl WHERE pid = pg_backend_pid())",
    )?;
    let v: Vec<String> = settings
        .into_iter()
        .next()
        .unwrap_or_default()
        .into_iter()
        .map(|x| x.unwrap_or_else(|| "?".into()))
        .collect();
    let get = |i: usize| v.get(i).cloned().unwrap_or_else(|| "?".into());
    // The suite counts this process's threads here (one: the connection started none).
    fault_pause("TETHER_FAULT_CLUSTER_CHECKED");
    Ok(report(&target, &s, pid, &get))
}

fn report(
    target: &ClusterTarget,
    s: &Session,
    pid: String,
    get: &dyn Fn(usize) -> String,
) -> String {
    let line = |k: &str, v: String| format!("{k:<11} {v}\n");
    let mut out = String::new();
    out.push_str(&line("server", s.server.clone()));
    out.push_str(&line("version", format!("PostgreSQL {}", get(0))));
    out.push_str(&line(
        "schema",
        format!(
            "tether ok (table tether.runs, {} columns; sequences tether.fence, tether.ticket)",
            schema::RUN_COLUMNS.len()
        ),
    ));
    out.push_str(&line(
        "tls",
        format!("{} (sslmode={})", get(6), target.url.sslmode.name()),
    ));
    out.push_str(&line(
        "backend",
        format!(
            "pid {pid}, the same over {} statements (no transaction pooling)",
            session::POOL_PROBES
        ),
    ));
    out.push_str(&line(
        "keepalive",
        format!(
            "server: tcp_keepalives_idle={} tcp_keepalives_interval={} tcp_keepalives_count={} \
             tcp_user_timeout={} client_connection_check_interval={}",
            get(1),
            get(2),
            get(3),
            get(4),
            get(5)
        ),
    ));
    let t = target.timing;
    out.push_str(&line(
        "",
        format!(
            "(as a lock session sets them: the server drops a silent one {}–{} after its last \
             byte)",
            crate::config::duration::canonical(std::time::Duration::from_millis(
                t.server().user_timeout_ms
            )),
            crate::config::duration::canonical(t.server_release),
        ),
    ));
    out.push_str(&line(
        "",
        format!(
            "client: keepalives idle={}s interval={}s count={} tcp_user_timeout={}s \
             connect_timeout={}",
            session::KEEPALIVE_IDLE.as_secs(),
            session::KEEPALIVE_INTERVAL.as_secs(),
            session::KEEPALIVE_RETRIES,
            session::TCP_USER_TIMEOUT.as_secs(),
            crate::config::duration::canonical(
                target
                    .connect_timeout
                    .unwrap_or(crate::config::settings::CLUSTER_CONNECT_TIMEOUT)
            ),
        ),
    ));
    out.push_str(&line(
        "fencing",
        format!(
            "heartbeat={} self_fence={} server_release={}",
            crate::config::duration::canonical(t.heartbeat),
            crate::config::duration::canonical(t.self_fence),
            crate::config::duration::canonical(t.server_release),
        ),
    ));
    out
}
