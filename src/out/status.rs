//! `tether status` (CLI-CONTRACT §16): what the kernel says, read without taking a single lock.
//!
//! Holders and waiters come from `/proc/locks`, matched by device and inode — a pid in a
//! lockfile can be stale, the kernel's lock table cannot. Run ids and states come from the
//! records. Reading never disturbs a run: no lock is taken, nothing is written.

use crate::config::duration;
use crate::state::record::{self, State};
use crate::state::rundir;
use crate::sys::proc_locks::{self, LockEntry};
use crate::sys::safe_fs::{kind, Dir, Kind};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub(crate) struct AppLock {
    pub(crate) app: String,
    /// `held` (a live run), `dead` (free, but its metadata says a run had it and never
    /// finished: a dead run, reaped by the app's next holder or the janitor) or `free`.
    pub(crate) status: &'static str,
    pub(crate) held: bool,
    /// The run it stands for is dead and not reaped yet.
    pub(crate) reap_pending: bool,
    /// Holder pid from the kernel's lock table.
    pub(crate) pid: Option<i32>,
    pub(crate) run_id: Option<String>,
    pub(crate) waiters: usize,
    pub(crate) age_s: Option<u64>,
    pub(crate) state: Option<String>,
    /// The holder's CI origin (system, repo, PR, commit, link).
    pub(crate) ci: Option<crate::ident::ci_env::CiInfo>,
    /// The runs waiting for it, in queue order (PROTOCOL §15): the first goes next.
    pub(crate) queue: Vec<Queued>,
}

/// A run waiting in an app's queue, as its live ticket says.
#[derive(Debug, Serialize)]
pub(crate) struct Queued {
    /// 1 = next.
    pub(crate) position: usize,
    pub(crate) run_id: Option<String>,
    pub(crate) group: Option<String>,
    /// The ticket's holder in the kernel's lock table.
    pub(crate) pid: Option<i32>,
    /// Unix seconds it started waiting.
    pub(crate) since: Option<u64>,
    pub(crate) waiting_s: Option<u64>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Slot {
    pub(crate) slot: String,
    pub(crate) pid: i32,
}

#[derive(Debug, Serialize)]
pub(crate) struct RunDirStatus {
    pub(crate) run_id: String,
    /// live | dead-unclean | kept | unknown
    pub(crate) status: String,
    /// A dead run not reaped yet (`dead-unclean`).
    pub(crate) reap_pending: bool,
    pub(crate) app: Option<String>,
    pub(crate) state: Option<String>,
    pub(crate) pid: Option<i32>,
    pub(crate) ci: Option<crate::ident::ci_env::CiInfo>,
    /// Unix seconds the run started (its record's `started_at`): a queued live run has been
    /// waiting since then.
    pub(crate) started_at: Option<u64>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Status {
    pub(crate) apps: Vec<AppLock>,
    pub(crate) slots: Vec<Slot>,
    pub(crate) runs: Vec<RunDirStatus>,
    /// With a cluster configured: each app's cluster holder, waiters and dead rows
    /// (`cluster_status`); absent without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cluster: Option<Vec<super::cluster_status::ClusterApp>>,
}

fn entries_of(table: &[LockEntry], dir: &Dir, name: &str) -> Vec<LockEntry> {
    dir.stat_at(name)
        .map(|st| proc_locks::entries_for(table, st.st_dev, st.st_ino))
        .unwrap_or_default()
}

fn read_meta_at(dir: &Dir, name: &str) -> Option<record::LockMeta> {
    let f = crate::state::lock::open_existing(dir, name).ok()?;
    record::read_meta(&f)
}

/// What the kernel and the records say. A dir that does not exist yet has nothing in it.
pub(crate) fn collect(lock_dir: Option<&Dir>, runs_dir: Option<&Dir>) -> Status {
    let table = proc_locks::read();
    let mut apps = Vec::new();
    let mut slots = Vec::new();
    let names = lock_dir
        .map(|d| d.entries().unwrap_or_default())
        .unwrap_or_default();
    for (name, _) in names {
        let Some(lock_dir) = lock_dir else { break };
        let name = name.to_string_lossy().into_owned();
        if !lock_dir
            .stat_at(&name)
            .is_ok_and(|st| kind(&st) == Kind::File)
        {
            continue;
        }
        let entries = entries_of(&table, lock_dir, &name);
        let holder = entries.iter().find(|e| !e.waiting).map(|e| e.pid);
        if let Some(slot) = name
            .strip_prefix("slot-")
            .and_then(|n| n.strip_suffix(".lock"))
        {
            if let Some(pid) = holder {
                slots.push(Slot {
                    slot: slot.to_owned(),
                    pid,
                });
            }
            continue;
        }
        let Some(app) = name
            .strip_prefix("app-")
            .and_then(|n| n.strip_suffix(".lock"))
        else {
            continue;
        };
        let meta = read_meta_at(lock_dir, &name);
        let queue = queue_of(lock_dir, app, &table);
        // The kernel decides life, as for the reaper: a free lock whose metadata is not
        // `clean` is a run that died holding it.
        let dead = holder.is_none() && meta.as_ref().is_some_and(|m| m.state != State::Clean);
        apps.push(AppLock {
            app: app.to_owned(),
            status: match (holder, dead) {
                (Some(_), _) => "held",
                (None, true) => "dead",
                (None, false) => "free",
            },
            held: holder.is_some(),
            reap_pending: dead,
            pid: holder,
            run_id: meta.as_ref().map(|m| m.run_id.clone()),
            waiters: entries
                .iter()
                .filter(|e| e.waiting)
                .count()
                .max(queue.len()),
            age_s: meta
                .as_ref()
                .filter(|_| holder.is_some())
                .map(|m| crate::state::record::unix_now().saturating_sub(m.started_at)),
            state: meta.as_ref().map(|m| m.state.as_str().to_owned()),
            ci: meta.as_ref().and_then(|m| m.ci.clone()),
            queue,
        });
    }
    let mut runs = Vec::new();
    let names = runs_dir
        .map(|d| d.entries().unwrap_or_default())
        .unwrap_or_default();
    for (name, _) in names {
        let Some(runs_dir) = runs_dir else { break };
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue;
        }
        // Only tether's run dirs (a real dir owned by tether's uid); a record is read through
        // the dir's fd, never blocking on a FIFO in its place.
        let Ok(dir) = rundir::open_trusted(runs_dir, name) else {
            continue;
        };
        let holder = entries_of(&table, &dir, rundir::LOCK_FILE)
            .into_iter()
            .find(|e| !e.waiting)
            .map(|e| e.pid);
        let rec = record::read_record(&dir).ok();
        let status = match (&holder, &rec) {
            (Some(_), _) => "live",
            (None, Some(r)) if r.meta.state == State::Clean => "kept",
            (None, Some(_)) => "dead-unclean",
            (None, None) => "unknown",
        };
        runs.push(RunDirStatus {
            run_id: name.to_owned(),
            status: status.into(),
            reap_pending: status == "dead-unclean",
            app: rec.as_ref().map(|r| r.meta.app.clone()),
            state: rec.as_ref().map(|r| r.meta.state.as_str().to_owned()),
            pid: holder,
            ci: rec.as_ref().and_then(|r| r.meta.ci.clone()),
            started_at: rec.as_ref().map(|r| r.meta.started_at),
        });
    }
    Status {
        apps,
        slots,
        runs,
        cluster: None,
    }
}

/// The live tickets of `app`'s queue, read without taking a lock.
fn queue_of(lock_dir: &Dir, app: &str, table: &[LockEntry]) -> Vec<Queued> {
    let Ok(domain) = crate::ident::names::Domain::parse(app) else {
        return Vec::new();
    };
    let Ok(Some(queue)) = crate::state::queue::Queue::open(lock_dir, &domain, false) else {
        return Vec::new();
    };
    let now = record::unix_now();
    queue
        .observed(table)
        .into_iter()
        .enumerate()
        .map(|(i, e)| Queued {
            position: i + 1,
            run_id: e.info.as_ref().map(|t| t.run_id.clone()),
            group: e.info.as_ref().and_then(|t| t.group.clone()),
            pid: e.pid,
            since: e.info.as_ref().map(|t| t.since),
            waiting_s: e.info.as_ref().map(|t| now.saturating_sub(t.since)),
        })
        .collect()
}

/// `-` for what is not known.
fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// Rows under a header, each column as wide as its widest cell (long Drone and GitHub run ids,
/// long domains: nothing is cut), two spaces apart, indented two; no trailing blanks.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::from(" ");
        let last = cells.len().saturating_sub(1);
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            out.push(' ');
            out.push_str(cell);
            if i < last {
                out.push_str(&" ".repeat(w - cell.chars().count() + 1));
            }
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

impl Status {
    pub(crate) fn to_text(&self) -> String {
        let mut out = String::new();
        out.push_str("APP LOCKS\n");
        if self.apps.is_empty() {
            out.push_str("  (none)\n");
        } else {
            let rows: Vec<Vec<String>> = self
                .apps
                .iter()
                .map(|a| {
                    vec![
                        a.app.clone(),
                        a.status.to_owned(),
                        or_dash(a.run_id.as_ref()),
                        or_dash(a.pid),
                        a.waiters.to_string(),
                        or_dash(a.age_s.map(duration::human_secs)),
                        or_dash(a.state.as_ref()),
                        note(a.reap_pending),
                    ]
                })
                .collect();
            out.push_str(&table(
                &[
                    "APP", "LOCK", "RUN", "PID", "WAITERS", "AGE", "RECORD", "NOTE",
                ],
                &rows,
            ));
        }
        out.push_str("QUEUE\n");
        let rows: Vec<Vec<String>> = self
            .apps
            .iter()
            .flat_map(|a| {
                a.queue.iter().map(|q| {
                    vec![
                        a.app.clone(),
                        q.position.to_string(),
                        or_dash(q.run_id.as_ref()),
                        or_dash(q.group.as_ref()),
                        or_dash(q.pid),
                        or_dash(q.waiting_s.map(duration::human_secs)),
                    ]
                })
            })
            .collect();
        if rows.is_empty() {
            out.push_str("  (nobody waiting)\n");
        } else {
            out.push_str(&table(
                &["APP", "POS", "RUN", "GROUP", "PID", "WAITING"],
                &rows,
            ));
        }
        out.push_str("SLOTS\n");
        if self.slots.is_empty() {
            out.push_str("  (none in use)\n");
        } else {
            let rows: Vec<Vec<String>> = self
                .slots
                .iter()
                .map(|s| vec![format!("slot-{}", s.slot), s.pid.to_string()])
                .collect();
            out.push_str(&table(&["SLOT", "PID"], &rows));
        }
        out.push_str("RUN DIRS\n");
        if self.runs.is_empty() {
            out.push_str("  (none)\n");
        } else {
            let rows: Vec<Vec<String>> = self
                .runs
                .iter()
                .map(|r| {
                    let ci = r.ci.as_ref().map(|c| {
                        format!(
                            "{}:{}{}",
                            c.system,
                            c.repo.as_deref().unwrap_or("-"),
                            c.pr.as_ref()
                                .map(|p| format!("#pr-{p}"))
                                .unwrap_or_default()
                        )
                    });
                    vec![
                        r.run_id.clone(),
                        r.status.clone(),
                        or_dash(r.app.as_ref()),
                        or_dash(r.state.as_ref()),
                        or_dash(r.pid),
                        or_dash(ci),
                        note(r.reap_pending),
                    ]
                })
                .collect();
            out.push_str(&table(
                &["RUN ID", "STATUS", "APP", "RECORD", "PID", "CI", "NOTE"],
                &rows,
            ));
        }
        if let Some(apps) = &self.cluster {
            out.push_str(&super::cluster_status::to_text(apps, table));
        }
        out
    }
}

/// The NOTE column: what happens next to a dead run.
fn note(reap_pending: bool) -> String {
    if reap_pending {
        "reap pending (next holder or tether janitor)".into()
    } else {
        String::new()
    }
}

/// What `tether status` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// Three tables.
    Text,
    /// One JSON document.
    Json,
    /// Prometheus metrics for node_exporter's textfile collector.
    Prometheus,
}

#[derive(Debug, clap::Args)]
pub(crate) struct StatusArgs {
    /// What to print [default: text].
    #[arg(long, value_enum)]
    pub(crate) format: Option<Format>,
    /// Print one JSON document (the same as --format json).
    #[arg(long, conflicts_with = "format")]
    pub(crate) json: bool,
    /// The host's slot count, for tether_slots_total [default: the config's slots].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) slots: Option<u32>,
    #[command(flatten)]
    pub(crate) places: crate::config::args::PlaceArgs,
    /// With a cluster: each app's cluster holder and waiters, from the server.
    #[command(flatten)]
    pub(crate) cluster: crate::config::args::ClusterArgs,
    #[command(flatten)]
    pub(crate) output: crate::config::args::OutputArgs,
}

/// `tether status`.
pub(crate) fn main(args: StatusArgs) -> i32 {
    args.output.init();
    let cfg = match crate::config::args::load(&args.places, Some(&args.output)) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let s = crate::config::settings::Settings::new(&cfg);
    let dirs = crate::state::dirs::choose("lock dir", &s.lock_dir(args.places.lock_dir), 0o755)
        .and_then(|l| {
            let r =
                crate::state::dirs::choose("runs dir", &s.runs_dir(args.places.runs_dir), 0o700)?;
            Ok((l.existing(), r.existing()))
        });
    let (lock_dir, runs_dir) = match dirs {
        Ok(d) => d,
        Err(e) => {
            crate::output::error(&e.message);
            return e.exit_code();
        }
    };
    let mut st = collect(
        lock_dir.as_ref().map(|d| &d.dir),
        runs_dir.as_ref().map(|d| &d.dir),
    );
    // The cluster's view (CLI-CONTRACT §27); its server unreachable: the host's view, a line
    // naming the server, exit 75.
    let mut code = 0;
    match args.cluster.target(&cfg) {
        Ok(None) => {}
        Ok(Some(target)) => match super::cluster_status::collect(&target) {
            Ok(apps) => st.cluster = Some(apps),
            Err(e) => {
                crate::output::error(&e.message);
                code = e.exit_code();
            }
        },
        Err(e) => {
            crate::output::error(&e.message);
            return e.exit_code();
        }
    }
    let format = match (args.json, args.format) {
        (true, _) => Format::Json,
        (false, f) => f.unwrap_or(Format::Text),
    };
    if format == Format::Prometheus {
        let slots = args.slots.or(cfg.slots);
        let printed = super::metrics::print(&st, slots, runs_dir.as_ref().map(|d| &d.dir));
        return if code != 0 { code } else { printed };
    }
    if format == Format::Json {
        match serde_json::to_string_pretty(&st) {
            Ok(text) => crate::output::stdout(&format!("{text}\n")),
            Err(e) => {
                crate::output::error(&format!("cannot encode status: {e}"));
                return crate::exit::TETHER_FAILURE;
            }
        }
    } else {
        crate::output::stdout(&st.to_text());
    }
    code
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ident::ci_env::CiInfo;

    fn app(name: &str, status: &'static str, run: Option<&str>, pid: Option<i32>) -> AppLock {
        AppLock {
            app: name.into(),
            status,
            held: status == "held",
            reap_pending: status == "dead",
            pid,
            run_id: run.map(str::to_owned),
            waiters: 0,
            age_s: None,
            state: Some(if status == "free" { "clean" } else { "running" }.into()),
            ci: None,
            queue: Vec::new(),
        }
    }

    /// A run dir row as `collect` reads it (also the metrics tests' rows).
    pub(crate) fn run(
        id: &str,
        status: &str,
        app: &str,
        state: &str,
        pid: Option<i32>,
    ) -> RunDirStatus {
        RunDirStatus {
            run_id: id.into(),
            status: status.into(),
            reap_pending: status == "dead-unclean",
            app: Some(app.into()),
            state: Some(state.into()),
            pid,
            ci: None,
            started_at: Some(1_796_400_000),
        }
    }

    /// Real CI run ids (Drone `drone-<build>-<stage>`, GitHub `gh-<run id>-<attempt>`) and a
    /// domain longer than the old fixed 40-column field; a held app (with waiters, aged 3m12s),
    /// one held for 0 s, a dead one, a free one.
    fn sample() -> Status {
        let long = "a-rather-long-review-app-name.staging.eu-west-1.example.org";
        let mut held = app(long, "held", Some("gh-1234567890-1"), Some(4242));
        held.waiters = 2;
        held.age_s = Some(192);
        held.queue = vec![
            Queued {
                position: 1,
                run_id: Some("gh-1234567891-1".into()),
                group: Some("acme/shop#pr-18".into()),
                pid: Some(4301),
                since: Some(1_700_000_000),
                waiting_s: Some(64),
            },
            Queued {
                position: 2,
                run_id: Some("drone-12346-1".into()),
                group: None,
                pid: Some(4307),
                since: Some(1_700_000_030),
                waiting_s: Some(34),
            },
        ];
        let mut fresh = app("fresh.example.org", "held", Some("drone-12345-3"), Some(77));
        fresh.age_s = Some(0);
        let mut pr = run("gh-1234567890-1", "live", long, "running", Some(4242));
        pr.ci = Some(CiInfo {
            system: "github".into(),
            repo: Some("acme/shop".into()),
            build: Some("1234567890".into()),
            job: Some("test.1".into()),
            pr: Some("17".into()),
            branch: None,
            commit: None,
            link: None,
        });
        Status {
            cluster: None,
            apps: vec![
                held,
                fresh,
                app("dead.example.org", "dead", Some("drone-12345-2"), None),
                app("idle.example.org", "free", Some("drone-12001-1"), None),
            ],
            slots: vec![Slot {
                slot: "00".into(),
                pid: 4242,
            }],
            runs: vec![
                pr,
                run(
                    "drone-12345-2",
                    "dead-unclean",
                    "dead.example.org",
                    "running",
                    None,
                ),
                run(
                    "drone-12345-3",
                    "live",
                    "fresh.example.org",
                    "running",
                    Some(77),
                ),
                run("drone-11111-1", "kept", "idle.example.org", "clean", None),
                RunDirStatus {
                    run_id: "x".into(),
                    status: "unknown".into(),
                    reap_pending: false,
                    app: None,
                    state: None,
                    pid: None,
                    ci: None,
                    started_at: None,
                },
            ],
        }
    }

    #[test]
    fn text_columns_fit_long_run_ids_and_domains() {
        let text = sample().to_text();
        insta::assert_snapshot!("status_text", text);
        // Nothing is cut, and every row's columns line up under their header.
        for needle in [
            "a-rather-long-review-app-name.staging.eu-west-1.example.org",
            "gh-1234567890-1",
        ] {
            assert!(text.contains(needle), "{needle} cut:\n{text}");
        }
        let lines: Vec<&str> = text.lines().collect();
        let header = lines
            .iter()
            .position(|l| l.trim_start().starts_with("APP  "))
            .unwrap();
        let col = lines[header].find("LOCK").unwrap();
        for l in &lines[header + 1..header + 5] {
            let cell = l.get(col..).unwrap_or_default();
            assert!(
                ["held", "dead", "free"].iter().any(|s| cell.starts_with(s)),
                "LOCK column misaligned: {l:?}"
            );
        }
        assert!(
            text.lines().all(|l| l == l.trim_end()),
            "trailing blanks:\n{text}"
        );
    }

    #[test]
    fn a_dead_holder_reads_dead_with_its_reap_pending_in_text_and_json() {
        let st = sample();
        let text = st.to_text();
        let dead = text
            .lines()
            .find(|l| l.contains("dead.example.org"))
            .unwrap();
        assert!(
            dead.contains(" dead ") && dead.contains("reap pending"),
            "{dead}"
        );
        assert!(text.contains(" 3m12s ") && text.contains(" 0s "), "{text}");
        let json = serde_json::to_string_pretty(&st).unwrap();
        insta::assert_snapshot!("status_json", json);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["apps"][2]["status"], "dead");
        assert_eq!(v["apps"][2]["reap_pending"], true);
        assert_eq!(v["runs"][1]["reap_pending"], true);
    }

    #[test]
    fn empty_sections_say_so() {
        let st = Status {
            cluster: None,
            apps: Vec::new(),
            slots: Vec::new(),
            runs: Vec::new(),
        };
        assert_eq!(
            st.to_text(),
            "APP LOCKS\n  (none)\nQUEUE\n  (nobody waiting)\nSLOTS\n  (none in use)\nRUN DIRS\n  (none)\n"
        );
    }
}
