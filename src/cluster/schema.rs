//! What tether keeps in the cluster's database: the schema `tether` with the table `runs` (one
//! row per cluster run, issue 16 §3), the sequence `fence` (the fencing tokens, §5) and the
//! sequence `ticket` (the cluster queue's numbers, issue 17).
//! Created on first use, idempotently, under a transaction-scoped advisory lock so that two
//! tethers starting at once do not race each other's `CREATE` (PROTOCOL.md, "Cluster").

use super::session::Session;
use crate::error::{Error, Result};

/// The two-key advisory lock that serialises schema creation: `('teth', 1)`. Two-key advisory
/// locks never conflict with the one-key (bigint) locks the app locks use.
const SETUP_LOCK: (i32, i32) = (0x7465_7468, 1);

/// The columns of `tether.runs` and their types, as `information_schema` names them.
pub(crate) const RUN_COLUMNS: &[(&str, &str, &str)] = &[
    ("run_id", "text", "text PRIMARY KEY"),
    ("app", "text", "text NOT NULL"),
    ("host", "text", "text NOT NULL"),
    ("boot_id", "text", "text NOT NULL"),
    ("pid", "integer", "integer NOT NULL"),
    // The pid's start time in clock ticks since boot (/proc/<pid>/stat field 22): a pid is
    // only the same process with the same start time.
    ("pid_start", "bigint", "bigint NOT NULL"),
    ("state", "text", "text NOT NULL"),
    ("teardown", "text", "text"),
    ("ci_link", "text", "text"),
    // NULL while the run waits (issue 16 §3: the row exists before the lock).
    ("fence", "bigint", "bigint"),
    (
        "heartbeat",
        "timestamp with time zone",
        "timestamptz NOT NULL DEFAULT now()",
    ),
    (
        "started",
        "timestamp with time zone",
        "timestamptz NOT NULL DEFAULT now()",
    ),
    // Added by the rows of PROTOCOL §17 (migrated in by `ensure` on older schemas):
    // the run's `--group`, and when it took the lock.
    ("grp", "text", "text"),
    ("acquired", "timestamp with time zone", "timestamptz"),
    // Set by the dead run's own host once its leftovers are killed (the front's aftercare,
    // D77): the end of a reaper's `leftovers_wait`.
    (
        "leftovers_killed",
        "boolean",
        "boolean NOT NULL DEFAULT false",
    ),
    // Issue 17 across hosts (PROTOCOL §18): the run of the same group that superseded this
    // one; set once by the newer run, read by the run itself (its heartbeat, or its failed
    // wait), never cleared while the run lives.
    ("superseded_by", "text", "text"),
    // Issue 17's queue under a cluster (PROTOCOL §15 "Under a cluster"): the run's place in
    // its app's queue (NULL: not queued; names compare bytewise), the key of the ticket lock its
    // session holds while it stands there, and when it last looked at the queue (a stopped
    // waiter's grows old, and the runs behind it skip it).
    ("ticket", "text", "text"),
    ("ticket_key", "integer", "integer"),
    ("looked", "timestamp with time zone", "timestamptz"),
];

/// Columns a schema made before PROTOCOL §17 lacks: `ensure` adds them (their declarations are
/// in [`RUN_COLUMNS`]).
const ADDED_COLUMNS: &[&str] = &[
    "grp",
    "acquired",
    "leftovers_killed",
    "superseded_by",
    "ticket",
    "ticket_key",
    "looked",
];

/// Make what is missing; returns what was created (empty: everything was there).
pub(crate) fn ensure(s: &mut Session) -> Result<Vec<&'static str>> {
    s.execute(&format!(
        "BEGIN; SELECT pg_advisory_xact_lock({}, {})",
        SETUP_LOCK.0, SETUP_LOCK.1
    ))?;
    let made = create_missing(s);
    // COMMIT on success; on failure the transaction is rolled back (and the lock freed).
    let end = if made.is_ok() { "COMMIT" } else { "ROLLBACK" };
    let ended = s.execute(end);
    let made = made?;
    ended?;
    Ok(made)
}

fn create_missing(s: &mut Session) -> Result<Vec<&'static str>> {
    let row = s.rows(
        "SELECT to_regnamespace('tether') IS NOT NULL, \
                to_regclass('tether.runs') IS NOT NULL, \
                to_regclass('tether.fence') IS NOT NULL, \
                to_regclass('tether.ticket') IS NOT NULL",
    )?;
    let have: Vec<bool> = row
        .first()
        .map(|r| r.iter().map(|v| v.as_deref() == Some("t")).collect())
        .unwrap_or_default();
    let [schema, runs, fence, ticket] = have[..] else {
        return Err(Error::tether(format!(
            "cluster {}: cannot read the catalog",
            s.server
        )));
    };
    let mut made = Vec::new();
    if !schema {
        s.execute("CREATE SCHEMA tether")
            .map_err(|e| explain(e, "schema tether"))?;
        made.push("schema tether");
    }
    if !runs {
        let cols: Vec<String> = RUN_COLUMNS
            .iter()
            .map(|(name, _, decl)| format!("{name} {decl}"))
            .collect();
        s.execute(&format!(
            "CREATE TABLE tether.runs ({}); CREATE INDEX runs_app ON tether.runs (app)",
            cols.join(", ")
        ))
        .map_err(|e| explain(e, "table tether.runs"))?;
        made.push("table tether.runs");
    }
    if !fence {
        s.execute("CREATE SEQUENCE tether.fence AS bigint MINVALUE 1")
            .map_err(|e| explain(e, "sequence tether.fence"))?;
        made.push("sequence tether.fence");
    }
    if !ticket {
        s.execute("CREATE SEQUENCE tether.ticket AS bigint MINVALUE 1")
            .map_err(|e| explain(e, "sequence tether.ticket"))?;
        made.push("sequence tether.ticket");
    }
    if runs {
        migrate(s, &mut made)?;
    }
    Ok(made)
}

/// Bring a `tether.runs` made by an older tether up to [`RUN_COLUMNS`]: add the missing
/// columns, let `fence` be NULL. The catalog is read first, so a current schema costs one
/// query and no `ALTER` (which would take the table's exclusive lock on every run start).
fn migrate(s: &mut Session, made: &mut Vec<&'static str>) -> Result<()> {
    let rows = s.rows(
        "SELECT column_name, is_nullable FROM information_schema.columns \
         WHERE table_schema = 'tether' AND table_name = 'runs'",
    )?;
    let have = |name: &str| {
        rows.iter()
            .find(|r| r.first().and_then(|c| c.as_deref()) == Some(name))
            .map(|r| r.get(1).and_then(|c| c.as_deref()) == Some("YES"))
    };
    // A table that is not an older tether's (a column of the first version missing) is left
    // as it is: `verify` names what is wrong with it.
    let original = RUN_COLUMNS
        .iter()
        .filter(|(n, _, _)| !ADDED_COLUMNS.contains(n));
    if original.clone().any(|(n, _, _)| have(n).is_none()) {
        return Ok(());
    }
    for name in ADDED_COLUMNS {
        if have(name).is_none() {
            let decl = RUN_COLUMNS
                .iter()
                .find(|(n, _, _)| n == name)
                .map_or("text", |(_, _, d)| d);
            s.execute(&format!(
                "ALTER TABLE tether.runs ADD COLUMN IF NOT EXISTS {name} {decl}"
            ))
            .map_err(|e| explain(e, "the new columns of tether.runs"))?;
            made.push(match *name {
                "grp" => "column tether.runs.grp",
                "leftovers_killed" => "column tether.runs.leftovers_killed",
                "superseded_by" => "column tether.runs.superseded_by",
                "ticket" => "column tether.runs.ticket",
                "ticket_key" => "column tether.runs.ticket_key",
                "looked" => "column tether.runs.looked",
                _ => "column tether.runs.acquired",
            });
        }
    }
    if have("fence") == Some(false) {
        s.execute("ALTER TABLE tether.runs ALTER COLUMN fence DROP NOT NULL")
            .map_err(|e| explain(e, "the new columns of tether.runs"))?;
        made.push("nullable tether.runs.fence");
    }
    Ok(())
}

/// Add what to do to a failed `CREATE`.
fn explain(e: Error, what: &str) -> Error {
    Error::new(
        e.failure,
        format!(
            "{} (creating {what}; the cluster user needs CREATE on the database, or an \
             administrator creates the schema once with `tether cluster check`)",
            e.message
        ),
    )
}

/// Check that what exists is what this tether needs: every column of `tether.runs` with its
/// type, and the sequence. A mismatch names each difference.
pub(crate) fn verify(s: &mut Session) -> Result<()> {
    let rows = s.rows(
        "SELECT column_name, data_type FROM information_schema.columns \
         WHERE table_schema = 'tether' AND table_name = 'runs'",
    )?;
    let found: Vec<(String, String)> = rows
        .into_iter()
        .filter_map(|r| {
            let mut it = r.into_iter();
            Some((it.next()??, it.next()??))
        })
        .collect();
    let mut wrong = Vec::new();
    for (name, ty, _) in RUN_COLUMNS {
        match found.iter().find(|(n, _)| n == name) {
            None => wrong.push(format!("column {name} is missing")),
            Some((_, t)) if t != ty => wrong.push(format!("column {name} is {t}, not {ty}")),
            Some(_) => {}
        }
    }
    for seq in ["fence", "ticket"] {
        let have = s.value(&format!("SELECT to_regclass('tether.{seq}') IS NOT NULL"))?;
        if have != "t" {
            wrong.push(format!("sequence tether.{seq} is missing"));
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(Error::tether(format!(
            "cluster {}: the schema tether is not what this tether needs: {}",
            s.server,
            wrong.join("; ")
        )))
    }
}
