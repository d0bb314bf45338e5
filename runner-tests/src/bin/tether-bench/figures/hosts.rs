//! What B9–B12 share: a cluster of two netns hosts and a PostgreSQL server
//! (`runner_tests::netns`), or a visible reason why there is none — the bench still runs B1–B8
//! without root or PostgreSQL.

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

use runner_tests::netns::Cluster;
use runner_tests::pg::{PASSWORD, PG_BIN};
use runner_tests::{is_root, Host};

use crate::report::{Report, Row, Verdict};
use crate::world::Ctx;

/// The cluster for figure `id`, or `None` after a skipped row and a note saying why.
pub fn cluster(ctx: &Ctx, rep: &mut Report, id: &'static str, figure: &str) -> Option<Cluster> {
    match make(ctx) {
        Ok(c) => Some(c),
        Err(why) => {
            eprintln!("tether-bench: {id} skipped: {why}");
            rep.note(id, format!("skipped: {why}"));
            let mut row = Row::new(id, figure, "—");
            row.verdict = Verdict::Skipped;
            rep.rows.push(row);
            None
        }
    }
}

fn make(ctx: &Ctx) -> Result<Cluster, String> {
    if !is_root() {
        return Err("needs root (network namespaces for the hosts)".to_owned());
    }
    let postgres = Path::new(PG_BIN).join("postgres");
    if !postgres.is_file() {
        return Err(format!(
            "needs PostgreSQL 15 ({} is missing)",
            postgres.display()
        ));
    }
    for tool in ["ip", "tc", "nsenter", "unshare", "psql", "hostname"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
        if !found {
            return Err(format!("needs `{tool}` on the PATH"));
        }
    }
    let tether = ctx.tether.clone();
    // The fixture panics (with the reason) when a step fails: here that is a skip, not a crash.
    let made = std::panic::catch_unwind(move || Cluster::with_tether(2, &tether));
    made.map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "the hosts fixture failed".to_owned());
        format!("cannot set up the hosts: {msg}")
    })
}

/// `tether run` on `h` with its dirs and the cluster's config (or `config`), app, run id, and
/// the command after `--`.
pub fn tether_run(
    ctx: &Ctx,
    h: &Host,
    config: &Path,
    (app, id): (&str, &str),
    cmd: &[OsString],
) -> Command {
    let mut c = h.tether(["run"]);
    for k in &ctx.scrub {
        c.env_remove(k);
    }
    c.envs(ctx.tether_env.iter().map(|(k, v)| (k, v)))
        .arg("--lock-dir")
        .arg(h.lock_dir())
        .arg("--runs-dir")
        .arg(h.runs_dir())
        .arg("--config")
        .arg(config)
        .args(["--app", app, "--run-id", id, "--"])
        .args(cmd);
    c
}

/// A bare `psql` session on `h` named `name` (`application_name`) that takes the advisory lock
/// `key`, then runs `shell` (`\!`) holding it; it releases by exiting.
pub fn psql_lock(c: &Cluster, h: &Host, name: &str, key: i64, shell: &str) -> Command {
    let mut cmd = h.command("psql");
    cmd.args(["-X", "-q", "-h", c.db_addr(), "-p"])
        .arg(c.pg().port().to_string())
        .args(["-U", "tether", "-d", "tether", "-c"])
        .arg(format!("SELECT pg_advisory_lock({key})"))
        .arg("-c")
        .arg(format!("\\! {shell}"))
        .env("PGPASSWORD", PASSWORD)
        .env("PGAPPNAME", name);
    cmd
}

/// Whether the session named `name` waits for an advisory lock on the server.
pub fn blocked(c: &Cluster, name: &str) -> bool {
    c.psql(&format!(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity s USING (pid) \
         WHERE l.locktype = 'advisory' AND NOT l.granted AND s.application_name = '{name}'"
    )) == "1"
}
