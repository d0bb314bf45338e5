//! The run journal (issue 17): every run that had a runs dir appends one JSON line —
//! its summary plus group, hold time and reaps — to `<runs dir>/.history.jsonl`, and
//! `tether history` reads it back with per-app lock-wait and hold-time percentiles.
//!
//! Appends never take a lock: each line is one `write(2)` on an `O_APPEND` descriptor, which
//! the kernel applies whole at the end of a regular file, so concurrent runs cannot tear or
//! interleave a line. The journal is bounded: a writer that finds it at or over its size
//! rotates it to `.history.jsonl.1` (one old generation is kept) under an exclusive `flock`
//! on the file it opened, and only if the name still points at that very inode — so two
//! writers that both see a full journal rotate it once, never the fresh one. A writer still
//! holding the old inode appends to `.1`: nothing is lost, nothing is torn.

use crate::config::duration;
use crate::output;
use crate::sys::safe_fs::{Dir, ReadError};
use nix::fcntl::OFlag;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::fd::AsFd;
use std::time::Duration;

/// The journal, in the runs dir (a name no run id can have).
pub(crate) const HISTORY: &str = ".history.jsonl";
/// Its previous generation.
pub(crate) const HISTORY_OLD: &str = ".history.jsonl.1";
/// Rotate at this size (`TETHER_HISTORY_MAX_BYTES` overrides it: tests, small hosts).
const MAX_BYTES: u64 = 4 << 20;
/// A reader takes at most this much of one generation.
const READ_CAP: u64 = 64 << 20;

/// One finished run, as the journal keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// Unix seconds when the run ended.
    pub(crate) at: u64,
    pub(crate) run_id: String,
    pub(crate) app: String,
    #[serde(default)]
    pub(crate) group: Option<String>,
    pub(crate) host: String,
    /// passed | failed | cancelled | deadline
    pub(crate) result: String,
    pub(crate) exit: i32,
    pub(crate) reason: String,
    pub(crate) lock_wait_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) slot_wait_ms: Option<u64>,
    pub(crate) runtime_ms: u64,
    /// How long the run held its app lock (0: it never got it).
    pub(crate) hold_ms: u64,
    /// ok | failed | none
    pub(crate) teardown: String,
    /// Dead runs this run reaped before its command.
    pub(crate) reaps: usize,
}

/// Append `entry`; a failure is one warning (a journal must never change a run's outcome).
pub(crate) fn append(runs: &Dir, entry: &Entry) {
    if let Err(e) = try_append(runs, entry, max_bytes()) {
        output::warn(
            "history",
            &format!("cannot append to {}: {e}", runs.join(HISTORY).display()),
        );
    }
}

fn max_bytes() -> u64 {
    std::env::var("TETHER_HISTORY_MAX_BYTES")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(MAX_BYTES)
}

fn open(runs: &Dir) -> std::io::Result<std::fs::File> {
    runs.open_file(
        HISTORY,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_APPEND,
        0o600,
    )
}

fn try_append(runs: &Dir, entry: &Entry, max: u64) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let mut file = open(runs)?;
    if file.metadata()?.len() >= max {
        rotate(runs, &file, max)?;
        file = open(runs)?;
    }
    // One write for the whole line: O_APPEND places it whole at the end.
    let written = file.write(&line)?;
    if written != line.len() {
        return Err(std::io::Error::other(format!(
            "short write ({written} of {} bytes)",
            line.len()
        )));
    }
    Ok(())
}

/// Move the full journal aside — once, whoever else saw it full at the same moment.
fn rotate(runs: &Dir, file: &std::fs::File, max: u64) -> std::io::Result<()> {
    let locked = nix::fcntl::Flock::lock(file.try_clone()?, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| std::io::Error::from(e))?;
    let mine = nix::sys::stat::fstat(locked.as_fd()).map_err(std::io::Error::from)?;
    let named = runs.stat_at(HISTORY)?;
    if crate::sys::safe_fs::same_file(&named, &mine) && named.st_size as u64 >= max {
        runs.rename(HISTORY, runs, HISTORY_OLD)?;
    }
    Ok(())
}

/// Every entry of both generations, oldest first, and how many lines did not parse.
pub(crate) fn load(runs: &Dir) -> Result<(Vec<Entry>, usize), String> {
    let (mut entries, mut skipped) = load_generation(runs, HISTORY_OLD)?;
    let (current, more) = load_generation(runs, HISTORY)?;
    entries.extend(current);
    skipped += more;
    entries.sort_by_key(|e| e.at);
    Ok((entries, skipped))
}

/// The entries of one generation (`HISTORY` or `HISTORY_OLD`), in file order, and how many of
/// its lines did not parse. A generation that does not exist is empty.
pub(crate) fn load_generation(runs: &Dir, name: &str) -> Result<(Vec<Entry>, usize), String> {
    let bytes = match runs.read_owned(name, READ_CAP) {
        Ok(b) => b,
        Err(ReadError::Missing) => return Ok((Vec::new(), 0)),
        Err(ReadError::Refused(why)) => return Err(why),
    };
    let mut entries = Vec::new();
    let mut skipped = 0;
    for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        match serde_json::from_slice::<Entry>(line) {
            Ok(e) => entries.push(e),
            Err(_) => skipped += 1,
        }
    }
    Ok((entries, skipped))
}

/// Lock wait and hold time per app: the figures `history` prints and the metrics export.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub(crate) struct AppStats {
    pub(crate) app: String,
    pub(crate) runs: usize,
    pub(crate) results: std::collections::BTreeMap<String, usize>,
    pub(crate) lock_wait_ms_p50: u64,
    pub(crate) lock_wait_ms_p95: u64,
    pub(crate) hold_ms_p50: u64,
    pub(crate) hold_ms_p95: u64,
    pub(crate) reaps: usize,
    pub(crate) failed_teardowns: usize,
}

/// Per app, in name order.
pub(crate) fn stats(entries: &[Entry]) -> Vec<AppStats> {
    let mut by_app: std::collections::BTreeMap<&str, Vec<&Entry>> = Default::default();
    for e in entries {
        by_app.entry(&e.app).or_default().push(e);
    }
    by_app
        .into_iter()
        .map(|(app, runs)| {
            let waits: Vec<u64> = runs.iter().map(|e| e.lock_wait_ms).collect();
            // Hold time of the runs that held the app at all.
            let holds: Vec<u64> = runs
                .iter()
                .filter(|e| e.hold_ms > 0)
                .map(|e| e.hold_ms)
                .collect();
            let mut results = std::collections::BTreeMap::new();
            for e in &runs {
                *results.entry(e.result.clone()).or_insert(0) += 1;
            }
            AppStats {
                app: app.to_owned(),
                runs: runs.len(),
                results,
                lock_wait_ms_p50: percentile(&waits, 50),
                lock_wait_ms_p95: percentile(&waits, 95),
                hold_ms_p50: percentile(&holds, 50),
                hold_ms_p95: percentile(&holds, 95),
                reaps: runs.iter().map(|e| e.reaps).sum(),
                failed_teardowns: runs.iter().filter(|e| e.teardown == "failed").count(),
            }
        })
        .collect()
}

/// Nearest-rank percentile (`p` in 1..=100); 0 for no values.
pub(crate) fn percentile(values: &[u64], p: u32) -> u64 {
    if values.is_empty() {
        return 0;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = (u64::from(p) * v.len() as u64).div_ceil(100).max(1) as usize;
    v[rank.min(v.len()) - 1]
}

/// `YYYY-MM-DDTHH:MM:SSZ` for unix seconds (UTC; no time-zone database needed).
pub(crate) fn utc(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

/// The text form: per-app figures, then the runs, oldest first.
pub(crate) fn to_text(entries: &[Entry], stats: &[AppStats]) -> String {
    let ms = |v: u64| duration::human(Duration::from_millis(v));
    let app_w = stats.iter().map(|s| s.app.len()).max().unwrap_or(0).max(3);
    let mut out = format!(
        "{:<app_w$}  {:>5}  {:>6}  {:>6}  {:>5}  {:>19}  {:>19}\n",
        "APP", "RUNS", "PASSED", "FAILED", "OTHER", "LOCK WAIT p50/p95", "HOLD p50/p95"
    );
    for s in stats {
        let passed = s.results.get("passed").copied().unwrap_or(0);
        let failed = s.results.get("failed").copied().unwrap_or(0);
        let waits = format!("{} / {}", ms(s.lock_wait_ms_p50), ms(s.lock_wait_ms_p95));
        let holds = format!("{} / {}", ms(s.hold_ms_p50), ms(s.hold_ms_p95));
        out.push_str(&format!(
            "{:<app_w$}  {:>5}  {:>6}  {:>6}  {:>5}  {waits:>19}  {holds:>19}\n",
            s.app,
            s.runs,
            passed,
            failed,
            s.runs - passed - failed,
        ));
    }
    out.push_str("\nRUNS (oldest first)\n");
    if entries.is_empty() {
        out.push_str("  (none)\n");
    }
    for e in entries {
        out.push_str(&format!(
            "  {}  {}  run {}  {}  exit={}  lock_wait={}  runtime={}  teardown={}{}\n",
            utc(e.at),
            e.app,
            e.run_id,
            e.result,
            e.exit,
            ms(e.lock_wait_ms),
            ms(e.runtime_ms),
            e.teardown,
            e.group
                .as_ref()
                .map(|g| format!("  group={g}"))
                .unwrap_or_default(),
        ));
    }
    out
}

/// `tether history`'s arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct HistoryArgs {
    /// Only runs of this app domain.
    #[arg(long)]
    pub(crate) app: Option<String>,
    /// Only runs that ended within this long (e.g. 24h).
    #[arg(long, value_parser = crate::config::args::duration)]
    pub(crate) since: Option<Duration>,
    /// Print one JSON document: the runs and the per-app figures.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) places: crate::config::args::PlaceArgs,
    #[command(flatten)]
    pub(crate) output: crate::config::args::OutputArgs,
}

/// `tether history`. Reads only: no lock taken, nothing written.
pub(crate) fn main(args: HistoryArgs) -> i32 {
    args.output.init();
    let fail = |e: crate::error::Error| {
        output::error(&e.message);
        e.exit_code()
    };
    let app = match args.app.as_deref().map(crate::ident::names::Domain::parse) {
        None => None,
        Some(Ok(d)) => Some(d.to_string()),
        Some(Err(e)) => return fail(crate::error::Error::tether(e)),
    };
    let cfg = match crate::config::args::load(&args.places, Some(&args.output)) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let place = crate::config::settings::Settings::new(&cfg).runs_dir(args.places.runs_dir);
    let runs = match crate::state::dirs::choose("runs dir", &place, 0o700) {
        Ok(r) => r.existing(),
        Err(e) => return fail(e),
    };
    let (mut entries, skipped) = match runs.as_ref().map(|r| load(&r.dir)) {
        None => (Vec::new(), 0),
        Some(Ok(loaded)) => loaded,
        Some(Err(why)) => return fail(crate::error::Error::tether(format!("history: {why}"))),
    };
    if skipped > 0 {
        output::warn(
            "history",
            &format!("{skipped} journal line(s) could not be read; skipped"),
        );
    }
    let now = crate::state::record::unix_now();
    let oldest = args.since.map(|d| now.saturating_sub(d.as_secs()));
    entries
        .retain(|e| app.as_deref().is_none_or(|a| e.app == a) && oldest.is_none_or(|t| e.at >= t));
    let per_app = stats(&entries);
    if args.json {
        let doc = serde_json::json!({ "runs": entries, "apps": per_app });
        output::stdout(&format!("{doc:#}\n"));
    } else {
        output::stdout(&to_text(&entries, &per_app));
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(app: &str, result: &str, wait: u64, hold: u64) -> Entry {
        Entry {
            at: 1_796_400_000,
            run_id: format!("r-{wait}"),
            app: app.into(),
            group: None,
            host: "h".into(),
            result: result.into(),
            exit: 0,
            reason: "exited".into(),
            lock_wait_ms: wait,
            slot_wait_ms: None,
            runtime_ms: hold,
            hold_ms: hold,
            teardown: "ok".into(),
            reaps: 0,
        }
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50), 50);
        assert_eq!(percentile(&v, 95), 95);
        assert_eq!(percentile(&[7], 95), 7);
        assert_eq!(percentile(&[], 50), 0);
        assert_eq!(percentile(&[30, 10, 20], 50), 20);
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_796_419_337), "2026-12-04T21:22:17Z");
    }

    #[test]
    fn stats_per_app_count_results_and_skip_unheld_runs_in_hold_time() {
        let entries = [
            entry("a.example.org", "passed", 10, 1_000),
            entry("a.example.org", "failed", 30, 3_000),
            entry("a.example.org", "cancelled", 5_000, 0),
            entry("b.example.org", "passed", 0, 500),
        ];
        let s = stats(&entries);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].app, "a.example.org");
        assert_eq!(s[0].runs, 3);
        assert_eq!(s[0].results.get("cancelled"), Some(&1));
        assert_eq!(s[0].lock_wait_ms_p50, 30);
        assert_eq!(s[0].lock_wait_ms_p95, 5_000);
        // The cancelled run never held the app: not a 0 ms hold.
        assert_eq!(s[0].hold_ms_p50, 1_000);
        assert_eq!(s[0].hold_ms_p95, 3_000);
        assert_eq!(s[1].runs, 1);
    }

    #[test]
    fn appends_rotate_once_and_keep_one_generation() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let runs = Dir::open_unchecked(tmp.path()).expect("open");
        let e = entry("a.example.org", "passed", 1, 2);
        let line = serde_json::to_vec(&e).expect("json").len() as u64 + 1;
        // Room for three lines: the fourth append rotates first.
        for _ in 0..4 {
            try_append(&runs, &e, 3 * line).expect("append");
        }
        let (all, skipped) = load(&runs).expect("load");
        assert_eq!((all.len(), skipped), (4, 0));
        let old = std::fs::read(tmp.path().join(HISTORY_OLD)).expect("old generation");
        assert_eq!(old.len() as u64, 3 * line);
        // A second rotation replaces the old generation: the journal stays bounded.
        for _ in 0..6 {
            try_append(&runs, &e, 3 * line).expect("append");
        }
        let (all, _) = load(&runs).expect("load");
        assert!(all.len() <= 6, "{} entries kept", all.len());
    }

    #[test]
    fn a_torn_or_foreign_line_is_skipped_and_counted() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let runs = Dir::open_unchecked(tmp.path()).expect("open");
        let e = entry("a.example.org", "passed", 1, 2);
        try_append(&runs, &e, MAX_BYTES).expect("append");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(tmp.path().join(HISTORY))
            .expect("open");
        f.write_all(b"{\"at\": 1, \"run\n").expect("write");
        try_append(&runs, &e, MAX_BYTES).expect("append");
        let (all, skipped) = load(&runs).expect("load");
        assert_eq!((all.len(), skipped), (2, 1));
    }
}
