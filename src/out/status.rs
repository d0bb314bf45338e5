//! `tether status` (SPEC §9): what the kernel says, read without taking a single lock.
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
use std::time::Duration;

#[derive(Debug, Serialize)]
pub(crate) struct AppLock {
    pub(crate) app: String,
    pub(crate) held: bool,
    /// Holder pid from the kernel's lock table.
    pub(crate) pid: Option<i32>,
    pub(crate) run_id: Option<String>,
    pub(crate) waiters: usize,
    pub(crate) age_s: Option<u64>,
    pub(crate) state: Option<String>,
    /// The holder's CI origin (system, repo, PR, commit, link).
    pub(crate) ci: Option<crate::ident::ci_env::CiInfo>,
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
    pub(crate) app: Option<String>,
    pub(crate) state: Option<String>,
    pub(crate) pid: Option<i32>,
    pub(crate) ci: Option<crate::ident::ci_env::CiInfo>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Status {
    pub(crate) apps: Vec<AppLock>,
    pub(crate) slots: Vec<Slot>,
    pub(crate) runs: Vec<RunDirStatus>,
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
        apps.push(AppLock {
            app: app.to_owned(),
            held: holder.is_some(),
            pid: holder,
            run_id: meta.as_ref().map(|m| m.run_id.clone()),
            waiters: entries.iter().filter(|e| e.waiting).count(),
            age_s: meta
                .as_ref()
                .filter(|_| holder.is_some())
                .map(|m| crate::state::record::unix_now().saturating_sub(m.started_at)),
            state: meta.as_ref().map(|m| m.state.as_str().to_owned()),
            ci: meta.as_ref().and_then(|m| m.ci.clone()),
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
            app: rec.as_ref().map(|r| r.meta.app.clone()),
            state: rec.as_ref().map(|r| r.meta.state.as_str().to_owned()),
            pid: holder,
            ci: rec.as_ref().and_then(|r| r.meta.ci.clone()),
        });
    }
    Status { apps, slots, runs }
}

impl Status {
    pub(crate) fn to_text(&self) -> String {
        let mut out = String::new();
        out.push_str("APP LOCKS\n");
        if self.apps.is_empty() {
            out.push_str("  (none)\n");
        }
        for a in &self.apps {
            let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            out.push_str(&format!(
                "  {:<40} {:<5} run={} pid={} waiters={} age={} state={}\n",
                a.app,
                if a.held { "held" } else { "free" },
                opt(&a.run_id),
                a.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                a.waiters,
                a.age_s
                    .map(|s| duration::human(Duration::from_secs(s)))
                    .unwrap_or_else(|| "-".into()),
                opt(&a.state),
            ));
        }
        out.push_str("SLOTS\n");
        if self.slots.is_empty() {
            out.push_str("  (none in use)\n");
        }
        for s in &self.slots {
            out.push_str(&format!("  slot-{} pid={}\n", s.slot, s.pid));
        }
        out.push_str("RUN DIRS\n");
        if self.runs.is_empty() {
            out.push_str("  (none)\n");
        }
        for r in &self.runs {
            let ci =
                r.ci.as_ref()
                    .map(|c| {
                        format!(
                            " ci={}:{}{}",
                            c.system,
                            c.repo.clone().unwrap_or_else(|| "-".into()),
                            c.pr.as_ref()
                                .map(|p| format!("#pr-{p}"))
                                .unwrap_or_default()
                        )
                    })
                    .unwrap_or_default();
            out.push_str(&format!(
                "  {:<40} {:<12} app={} state={}{}{}\n",
                r.run_id,
                r.status,
                r.app.clone().unwrap_or_else(|| "-".into()),
                r.state.clone().unwrap_or_else(|| "-".into()),
                r.pid.map(|p| format!(" pid={p}")).unwrap_or_default(),
                ci,
            ));
        }
        out
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct StatusArgs {
    /// Print one JSON document.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) places: crate::config::args::PlaceArgs,
}

/// `tether status`.
pub(crate) fn main(args: StatusArgs) -> i32 {
    let cfg = match crate::config::args::load(&args.places, None) {
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
    let st = collect(
        lock_dir.as_ref().map(|d| &d.dir),
        runs_dir.as_ref().map(|d| &d.dir),
    );
    if args.json {
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
    0
}
