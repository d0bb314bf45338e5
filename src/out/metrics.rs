//! `tether status --format prometheus` (CLI-CONTRACT §16): what `status` sees, and what the run
//! journal (`out::history`) remembers, in the Prometheus text format that node_exporter's
//! textfile collector reads (every family with one `# HELP` and one `# TYPE` line before its
//! samples, a family's samples together, label values escaped, no timestamps).
//!
//! The journal keeps one old generation and drops it at the next rotation (PROTOCOL §13), so a
//! figure over "the whole journal" can fall. Prometheus treats any fall of a counter as a
//! restart from 0; the counters here are therefore taken over the current generation alone,
//! which does start again from 0 when it rotates — exactly a restart, which `rate()` and
//! `increase()` handle. The quantiles come from both generations, the figures `tether history`
//! prints (DECISIONS D54).

use super::history::{self, Entry};
use super::status::{AppLock, Status};
use crate::error::Error;
use crate::output;
use crate::sys::safe_fs::Dir;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;

/// Every result a run can end with: each app has a `tether_runs_total` sample for each, 0 when
/// none, so a dashboard has no holes. A result outside the list that the journal holds is
/// added after them.
pub(crate) const RESULTS: [&str; 6] = [
    "passed",
    "failed",
    "cancelled",
    "deadline",
    "superseded",
    "lock-lost",
];

/// The journal as the metrics read it.
#[derive(Debug, Default)]
pub(crate) struct Journal {
    /// Both generations: the quantiles.
    pub(crate) all: Vec<Entry>,
    /// The current generation: the counters and the summaries' `_sum` and `_count`.
    pub(crate) current: Vec<Entry>,
}

/// Print the metrics; the exit code. A journal tether may not read (not a regular file of
/// ours or root's) is an error: no output, so the collector keeps the last good file.
pub(crate) fn print(st: &Status, slots: Option<u32>, runs: Option<&Dir>) -> i32 {
    match read_journal(runs) {
        Ok(journal) => {
            let now = crate::state::record::unix_now();
            output::stdout(&render(st, slots, &journal, now));
            0
        }
        Err(e) => {
            output::error(&e.message);
            e.exit_code()
        }
    }
}

fn read_journal(runs: Option<&Dir>) -> Result<Journal, Error> {
    let Some(runs) = runs else {
        return Ok(Journal::default());
    };
    let generation = |name: &str| {
        history::load_generation(runs, name)
            .map_err(|why| Error::tether(format!("metrics: journal: {why}")))
    };
    let (current, skipped) = generation(history::HISTORY)?;
    let (mut all, skipped_old) = generation(history::HISTORY_OLD)?;
    if skipped + skipped_old > 0 {
        output::warn(
            "history",
            &format!(
                "{} journal line(s) could not be read; skipped",
                skipped + skipped_old
            ),
        );
    }
    all.extend(current.iter().cloned());
    Ok(Journal { all, current })
}

/// The text of one exposition, families in a fixed order, apps in name order.
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        self.text.push_str(&format!(
            "# HELP {name} {}\n# TYPE {name} {kind}\n",
            help.replace('\\', "\\\\").replace('\n', "\\n")
        ));
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            let pairs: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
                .collect();
            self.text.push_str(&format!("{{{}}}", pairs.join(",")));
        }
        self.text.push_str(&format!(" {value}\n"));
    }

    /// One gauge or counter with a sample per app.
    fn per_app<T: Display>(
        &mut self,
        (name, kind, help): (&str, &str, &str),
        apps: &[App],
        value: impl Fn(&App) -> T,
    ) {
        self.family(name, kind, help);
        for a in apps {
            self.sample(name, &[("app", &a.name)], value(a));
        }
    }

    /// A summary per app: p50 and p95 over `all`, `_sum` and `_count` over `current`.
    fn summary(&mut self, name: &str, help: &str, apps: &[App], pick: fn(&Entry) -> Option<u64>) {
        self.family(name, "summary", help);
        for a in apps {
            let all: Vec<u64> = a.all.iter().filter_map(|e| pick(e)).collect();
            let current: Vec<u64> = a.current.iter().filter_map(|e| pick(e)).collect();
            for (q, p) in [("0.5", 50), ("0.95", 95)] {
                let v = if all.is_empty() {
                    f64::NAN
                } else {
                    seconds(history::percentile(&all, p))
                };
                self.sample(name, &[("app", &a.name), ("quantile", q)], v);
            }
            let sum = seconds(current.iter().sum());
            self.sample(&format!("{name}_sum"), &[("app", &a.name)], sum);
            self.sample(&format!("{name}_count"), &[("app", &a.name)], current.len());
        }
    }
}

/// A label value as the format wants it: backslash, double quote and newline escaped.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// One app: its lock as `status` saw it (none: no lockfile) and its journal lines.
struct App<'a> {
    name: String,
    lock: Option<&'a AppLock>,
    oldest_wait_s: u64,
    all: Vec<&'a Entry>,
    current: Vec<&'a Entry>,
}

/// How long the app's longest-waiting run has waited: the longest wait in its queue, or of a
/// live run whose record says `queued` other than the holder (a holder waiting for a slot is
/// `queued` too), whichever is longer.
fn oldest_wait(st: &Status, app: &str, holder: Option<i32>, now: u64) -> u64 {
    let queued = st
        .apps
        .iter()
        .filter(|a| a.app == app)
        .flat_map(|a| a.queue.iter().filter_map(|q| q.waiting_s));
    st.runs
        .iter()
        .filter(|r| r.status == "live" && r.state.as_deref() == Some("queued"))
        .filter(|r| r.app.as_deref() == Some(app) && (r.pid.is_none() || r.pid != holder))
        .filter_map(|r| r.started_at)
        .map(|t| now.saturating_sub(t))
        .chain(queued)
        .max()
        .unwrap_or(0)
}

fn apps<'a>(st: &'a Status, journal: &'a Journal, now: u64) -> Vec<App<'a>> {
    let names: BTreeSet<&str> = st
        .apps
        .iter()
        .map(|a| a.app.as_str())
        .chain(journal.all.iter().map(|e| e.app.as_str()))
        .collect();
    names
        .into_iter()
        .map(|name| {
            let lock = st.apps.iter().find(|a| a.app == name);
            let of = |v: &'a [Entry]| v.iter().filter(|e| e.app == name).collect();
            App {
                name: name.to_owned(),
                lock,
                oldest_wait_s: oldest_wait(st, name, lock.and_then(|l| l.pid), now),
                all: of(&journal.all),
                current: of(&journal.current),
            }
        })
        .collect()
}

/// The exposition for `st`, the host's slot count (if known) and the journal, at `now`.
pub(crate) fn render(st: &Status, slots: Option<u32>, journal: &Journal, now: u64) -> String {
    let apps = apps(st, journal, now);
    let mut out = Exposition {
        text: String::new(),
    };
    let lock = |a: &App, f: fn(&AppLock) -> u64| a.lock.map_or(0, f);
    out.per_app(
        (
            "tether_app_lock_held",
            "gauge",
            "1 while a live run holds the app's lock, else 0.",
        ),
        &apps,
        |a| lock(a, |l| u64::from(l.held)),
    );
    out.per_app(
        (
            "tether_app_holder_age_seconds",
            "gauge",
            "Seconds since the run holding the app's lock started; 0 when it is not held.",
        ),
        &apps,
        |a| lock(a, |l| l.age_s.filter(|_| l.held).unwrap_or(0)),
    );
    out.per_app(
        (
            "tether_app_waiters",
            "gauge",
            "Runs waiting for the app's lock.",
        ),
        &apps,
        |a| lock(a, |l| l.waiters as u64),
    );
    out.per_app(
        (
            "tether_app_oldest_wait_seconds",
            "gauge",
            "Seconds the app's longest-waiting run has waited; 0 when none waits.",
        ),
        &apps,
        |a| a.oldest_wait_s,
    );
    out.per_app(
        (
            "tether_app_reap_pending",
            "gauge",
            "1 when the app's last holder died and its reap is pending, else 0.",
        ),
        &apps,
        |a| lock(a, |l| u64::from(l.reap_pending)),
    );
    // A dead run shows as its app's dead lock and as its run dir: count it once.
    let dead: BTreeSet<&str> = st
        .apps
        .iter()
        .filter(|a| a.reap_pending)
        .filter_map(|a| a.run_id.as_deref())
        .chain(
            st.runs
                .iter()
                .filter(|r| r.reap_pending)
                .map(|r| r.run_id.as_str()),
        )
        .collect();
    out.family(
        "tether_dead_runs_pending_reap",
        "gauge",
        "Dead runs not reaped yet (the app's next holder or tether janitor reaps them).",
    );
    out.sample("tether_dead_runs_pending_reap", &[], dead.len());
    out.family("tether_slots_busy", "gauge", "Host slots in use.");
    out.sample("tether_slots_busy", &[], st.slots.len());
    if let Some(total) = slots {
        out.family(
            "tether_slots_total",
            "gauge",
            "Host slots configured (status --slots, else the config's slots).",
        );
        out.sample("tether_slots_total", &[], total);
    }
    out.summary(
        "tether_lock_wait_seconds",
        "Time runs waited to be let in (app lock and slot): quantiles over the journal, \
         _sum and _count since its last rotation.",
        &apps,
        |e| Some(e.lock_wait_ms),
    );
    out.summary(
        "tether_hold_seconds",
        "Time runs held the app's lock, over the runs that held it: quantiles over the \
         journal, _sum and _count since its last rotation.",
        &apps,
        |e| Some(e.hold_ms).filter(|&h| h > 0),
    );
    results(&mut out, &apps);
    out.per_app(
        (
            "tether_reaps_total",
            "counter",
            "Dead runs reaped by runs before their command, since the journal's last rotation.",
        ),
        &apps,
        |a| a.current.iter().map(|e| e.reaps).sum::<usize>(),
    );
    out.per_app(
        (
            "tether_teardowns_failed_total",
            "counter",
            "Runs whose teardown failed, since the journal's last rotation.",
        ),
        &apps,
        |a| a.current.iter().filter(|e| e.teardown == "failed").count(),
    );
    if let Some(cluster) = &st.cluster {
        cluster_families(&mut out, cluster);
    }
    out.text
}

/// With a cluster (CLI-CONTRACT §27): per app with a row, whether some run holds its cluster
/// lock, for how long, how many wait in the server, and how many dead rows wait for a reaper.
fn cluster_families(out: &mut Exposition, apps: &[super::cluster_status::ClusterApp]) {
    let mut apps: Vec<&super::cluster_status::ClusterApp> = apps.iter().collect();
    apps.sort_by(|a, b| a.app.cmp(&b.app));
    type Pick = fn(&super::cluster_status::ClusterApp) -> u64;
    let families: [(&str, &str, Pick); 4] = [
        (
            "tether_cluster_lock_held",
            "1 while a run on some host holds the app's cluster lock, else 0.",
            |a| u64::from(a.holder.is_some()),
        ),
        (
            "tether_cluster_holder_age_seconds",
            "Seconds since the cluster holder took the app's lock; 0 when it is not held.",
            |a| a.holder.as_ref().map_or(0, |h| h.age_s),
        ),
        (
            "tether_cluster_waiters",
            "Runs waiting for the app's cluster lock in the server, all hosts.",
            |a| a.waiters.len() as u64,
        ),
        (
            "tether_cluster_dead_runs",
            "Rows of the app's dead cluster runs: a teardown or leftovers pending.",
            |a| a.dead.len() as u64,
        ),
    ];
    for (name, help, pick) in families {
        out.family(name, "gauge", help);
        for a in &apps {
            out.sample(name, &[("app", &a.app)], pick(a));
        }
    }
}

/// `tether_runs_total{app, result}`: every listed result for every app, then any other result
/// the journal holds.
fn results(out: &mut Exposition, apps: &[App]) {
    let name = "tether_runs_total";
    out.family(
        name,
        "counter",
        "Runs ended, by result, since the journal's last rotation.",
    );
    for a in apps {
        let mut counts: BTreeMap<&str, usize> = RESULTS.iter().map(|r| (*r, 0)).collect();
        for e in &a.current {
            *counts.entry(e.result.as_str()).or_insert(0) += 1;
        }
        let others = counts.keys().copied().filter(|r| !RESULTS.contains(r));
        let order: Vec<&str> = RESULTS.iter().copied().chain(others).collect();
        for r in order {
            let n = counts.get(r).copied().unwrap_or(0);
            out.sample(name, &[("app", &a.name), ("result", r)], n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::out::status::{RunDirStatus, Slot};

    const NOW: u64 = 1_796_400_000;

    /// The checks `promtool check metrics` would make that matter to the textfile collector:
    /// every line is a `# HELP`, a `# TYPE` or a sample `name{label="value",…} value`; each
    /// family has one HELP and one TYPE, both before its samples, and its samples together; a
    /// summary's samples are its name (with `quantile`), `_sum` and `_count`; label values are
    /// escaped; no sample twice; no timestamp; a trailing newline. Names are `tether_…`,
    /// counters end in `_total`.
    fn check(text: &str) -> Result<(), String> {
        if !text.ends_with('\n') {
            return Err("no trailing newline".into());
        }
        let mut kinds: BTreeMap<String, String> = BTreeMap::new();
        let mut helped: BTreeSet<String> = BTreeSet::new();
        let mut closed: BTreeSet<String> = BTreeSet::new();
        let mut current: Option<String> = None;
        let mut seen: BTreeSet<String> = BTreeSet::new();
        for (n, line) in text.lines().enumerate() {
            let at = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
            if let Some(rest) = line.strip_prefix("# ") {
                let mut words = rest.splitn(3, ' ');
                let (what, name, tail) = (words.next(), words.next(), words.next());
                let (Some(what), Some(name), Some(tail)) = (what, name, tail) else {
                    return Err(at("short comment"));
                };
                if current.as_deref() != Some(name) {
                    if let Some(prev) = current.replace(name.to_owned()) {
                        closed.insert(prev);
                    }
                }
                if closed.contains(name) {
                    return Err(at("family split"));
                }
                let fresh = match what {
                    "HELP" => helped.insert(name.to_owned()),
                    "TYPE" => {
                        let known = ["counter", "gauge", "summary", "histogram", "untyped"];
                        if !known.contains(&tail) {
                            return Err(at("unknown type"));
                        }
                        if tail == "counter" && !name.ends_with("_total") {
                            return Err(at("counter without _total"));
                        }
                        kinds.insert(name.to_owned(), tail.to_owned()).is_none()
                    }
                    _ => return Err(at("unknown comment")),
                };
                if !fresh {
                    return Err(at("second HELP or TYPE"));
                }
                continue;
            }
            let (series, value) = line.rsplit_once(' ').ok_or_else(|| at("no value"))?;
            if value.parse::<f64>().is_err() && !["NaN", "+Inf", "-Inf"].contains(&value) {
                return Err(at("value not a number"));
            }
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (
                    name,
                    rest.strip_suffix('}')
                        .ok_or_else(|| at("labels unclosed"))?,
                ),
                None => (series, ""),
            };
            let name_ok = |s: &str| {
                s.starts_with("tether_")
                    && s.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            };
            if !name_ok(name) {
                return Err(at("bad metric name"));
            }
            let family = current
                .clone()
                .ok_or_else(|| at("sample before HELP/TYPE"))?;
            let kind = kinds.get(&family).ok_or_else(|| at("sample before TYPE"))?;
            if !helped.contains(&family) {
                return Err(at("sample before HELP"));
            }
            let has_quantile = labels_of(labels).map_err(|e| at(&e))?;
            let fits = match kind.as_str() {
                "summary" => {
                    (name == family && has_quantile)
                        || name == format!("{family}_sum")
                        || name == format!("{family}_count")
                }
                _ => name == family && !has_quantile,
            };
            if !fits {
                return Err(at("sample outside its family"));
            }
            if !seen.insert(series.to_owned()) {
                return Err(at("sample twice"));
            }
        }
        Ok(())
    }

    /// Parse `k="v",…`: names, quotes, escapes (only `\\`, `\"`, `\n`). Whether `quantile`
    /// is among them.
    fn labels_of(mut s: &str) -> Result<bool, String> {
        let mut quantile = false;
        while !s.is_empty() {
            let (key, rest) = s.split_once("=\"").ok_or("label without =\"")?;
            let key_ok = !key.is_empty()
                && !key.starts_with(|c: char| c.is_ascii_digit())
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !key_ok {
                return Err(format!("bad label name {key:?}"));
            }
            quantile |= key == "quantile";
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\' | '"' | 'n')) => {}
                        _ => return Err("bad escape".into()),
                    },
                    Some((_, '\n')) => return Err("raw newline".into()),
                    Some((i, '"')) => break i,
                    Some(_) => {}
                    None => return Err("unterminated label value".into()),
                }
            };
            s = &rest[end + 1..];
            if let Some(more) = s.strip_prefix(',') {
                s = more;
            } else if !s.is_empty() {
                return Err("junk after a label".into());
            }
        }
        Ok(quantile)
    }

    fn lock(app: &str, status: &'static str, run: &str, pid: Option<i32>) -> AppLock {
        AppLock {
            app: app.into(),
            status,
            held: status == "held",
            reap_pending: status == "dead",
            pid,
            run_id: Some(run.into()),
            waiters: 0,
            age_s: pid.map(|_| 192),
            state: Some("running".into()),
            ci: None,
            queue: Vec::new(),
        }
    }

    fn dir(id: &str, status: &str, app: &str, state: &str, pid: i32, ago: u64) -> RunDirStatus {
        let live = (status == "live").then_some(pid);
        RunDirStatus {
            started_at: Some(NOW - ago),
            ..crate::out::status::tests::run(id, status, app, state, live)
        }
    }

    fn line(app: &str, result: &str, wait_ms: u64, hold_ms: u64) -> Entry {
        Entry {
            at: NOW - 600,
            run_id: format!("{app}-{result}-{wait_ms}"),
            app: app.into(),
            group: None,
            host: "ci-1".into(),
            result: result.into(),
            exit: 0,
            reason: "exited".into(),
            lock_wait_ms: wait_ms,
            slot_wait_ms: None,
            runtime_ms: hold_ms,
            hold_ms,
            teardown: if result == "failed" { "failed" } else { "ok" }.into(),
            reaps: usize::from(result == "passed"),
        }
    }

    /// A held app (two queued waiters, 60 s and 30 s; its holder also `queued`, waiting for a
    /// slot, since long ago), a dead one (its lock and its run dir: one dead run), another dead
    /// run dir, a free app; one slot of 4 busy. The journal: an old generation and a current
    /// one, one app only in the old one.
    fn fixture() -> (Status, Journal) {
        let mut held = lock("shop.example.org", "held", "gh-1", Some(4242));
        held.waiters = 2;
        let st = Status {
            cluster: None,
            apps: vec![
                held,
                lock("dead.example.org", "dead", "drone-7-1", None),
                lock("idle.example.org", "free", "drone-6-1", None),
            ],
            slots: vec![Slot {
                slot: "00".into(),
                pid: 4242,
            }],
            runs: vec![
                dir("gh-1", "live", "shop.example.org", "queued", 4242, 900),
                dir("gh-2", "live", "shop.example.org", "queued", 4300, 60),
                dir("gh-3", "live", "shop.example.org", "queued", 4301, 30),
                dir(
                    "drone-7-1",
                    "dead-unclean",
                    "dead.example.org",
                    "running",
                    0,
                    999,
                ),
                dir(
                    "drone-8-1",
                    "dead-unclean",
                    "idle.example.org",
                    "running",
                    0,
                    999,
                ),
            ],
        };
        let journal = Journal {
            all: vec![
                line("shop.example.org", "passed", 10, 1_000),
                line("gone.example.org", "passed", 0, 500),
                line("shop.example.org", "failed", 30, 3_000),
                line("shop.example.org", "cancelled", 5_000, 0),
                line("shop.example.org", "lock-lost", 20, 2_500),
            ],
            current: vec![
                line("shop.example.org", "failed", 30, 3_000),
                line("shop.example.org", "cancelled", 5_000, 0),
                line("shop.example.org", "lock-lost", 20, 2_500),
            ],
        };
        (st, journal)
    }

    #[test]
    fn exposition_snapshot_passes_the_format_check() {
        let (st, journal) = fixture();
        let text = render(&st, Some(4), &journal, NOW);
        insta::assert_snapshot!("metrics_prometheus", text);
        check(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    }

    fn value(text: &str, series: &str) -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no sample {series}:\n{text}"))
            .to_owned()
    }

    #[test]
    fn gauges_say_what_status_sees() {
        let (st, journal) = fixture();
        let text = render(&st, Some(4), &journal, NOW);
        let shop = "{app=\"shop.example.org\"}";
        let v = |name: &str, labels: &str| value(&text, &format!("{name}{labels}"));
        assert_eq!(v("tether_app_holder_age_seconds", shop), "192");
        assert_eq!(v("tether_app_waiters", shop), "2");
        // The holder's own `queued` record (a slot wait) is not a waiter.
        assert_eq!(v("tether_app_oldest_wait_seconds", shop), "60");
        let dead = "{app=\"dead.example.org\"}";
        assert_eq!(v("tether_app_reap_pending", dead), "1");
        assert_eq!(v("tether_app_holder_age_seconds", dead), "0");
        // drone-7-1 (lock and run dir) and drone-8-1.
        assert_eq!(v("tether_dead_runs_pending_reap", ""), "2");
        assert_eq!(
            (v("tether_slots_busy", ""), v("tether_slots_total", "")),
            ("1".into(), "4".into())
        );
        // Unknown slot count: no sample rather than a made-up one.
        let unknown = render(&st, None, &journal, NOW);
        assert!(!unknown.contains("tether_slots_total"), "{unknown}");
        check(&unknown).unwrap_or_else(|e| panic!("{e}\n{unknown}"));
    }

    #[test]
    fn counters_count_the_current_generation_and_quantiles_the_whole_journal() {
        let (st, journal) = fixture();
        let text = render(&st, None, &journal, NOW);
        let shop = |extra: &str| format!("{{app=\"shop.example.org\"{extra}}}");
        let v = |name: &str, labels: String| value(&text, &format!("{name}{labels}"));
        for (result, n) in [
            ("passed", "0"),
            ("failed", "1"),
            ("cancelled", "1"),
            ("deadline", "0"),
            ("superseded", "0"),
            ("lock-lost", "1"),
        ] {
            let labels = shop(&format!(",result=\"{result}\""));
            assert_eq!(v("tether_runs_total", labels), n, "{result}");
        }
        // An app only in the old generation: every result, all 0; NaN-free quantiles.
        let gone = "{app=\"gone.example.org\",result=\"passed\"}";
        assert_eq!(value(&text, &format!("tether_runs_total{gone}")), "0");
        // Waits 10 (old), 30, 5000, 20 ms: p50 20 ms, p95 5 s; sum and count: current only.
        assert_eq!(
            v("tether_lock_wait_seconds", shop(",quantile=\"0.5\"")),
            "0.02"
        );
        assert_eq!(
            v("tether_lock_wait_seconds", shop(",quantile=\"0.95\"")),
            "5"
        );
        assert_eq!(v("tether_lock_wait_seconds_sum", shop("")), "5.05");
        assert_eq!(v("tether_lock_wait_seconds_count", shop("")), "3");
        // Hold time over the runs that held: the cancelled one did not.
        assert_eq!(v("tether_hold_seconds_count", shop("")), "2");
        assert_eq!(v("tether_hold_seconds_sum", shop("")), "5.5");
        assert_eq!(v("tether_teardowns_failed_total", shop("")), "1");
        // No run in the journal: NaN quantiles, zero sum and count.
        let idle = "{app=\"idle.example.org\",quantile=\"0.5\"}";
        assert_eq!(value(&text, &format!("tether_hold_seconds{idle}")), "NaN");
        assert_eq!(
            value(&text, "tether_reaps_total{app=\"gone.example.org\"}"),
            "0"
        );
    }

    #[test]
    fn a_result_outside_the_list_is_counted_after_it() {
        let journal = Journal {
            all: vec![line("a.example.org", "busy", 0, 0)],
            current: vec![line("a.example.org", "busy", 0, 0)],
        };
        let st = Status {
            cluster: None,
            apps: Vec::new(),
            slots: Vec::new(),
            runs: Vec::new(),
        };
        let text = render(&st, None, &journal, NOW);
        let results: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("tether_runs_total{"))
            .collect();
        assert_eq!(results.len(), RESULTS.len() + 1, "{text}");
        assert_eq!(
            results.last().copied(),
            Some("tether_runs_total{app=\"a.example.org\",result=\"busy\"} 1")
        );
        check(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    }

    #[test]
    fn the_cluster_adds_its_families_per_app() {
        use crate::out::cluster_status::{ClusterApp, ClusterRun};
        let run = |id: &str, age_s| ClusterRun {
            run_id: id.into(),
            host: "h".into(),
            pid: 1,
            state: "running".into(),
            group: None,
            fence: Some(3),
            age_s,
            ci_link: None,
        };
        let (mut st, journal) = fixture();
        st.cluster = Some(vec![ClusterApp {
            app: "c.test".into(),
            holder: Some(run("r1", 42)),
            waiters: vec![run("r2", 5), run("r3", 1)],
            dead: vec![run("r0", 9)],
        }]);
        let text = render(&st, None, &journal, NOW);
        check(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(
            value(&text, "tether_cluster_lock_held{app=\"c.test\"}"),
            "1"
        );
        assert_eq!(
            value(&text, "tether_cluster_holder_age_seconds{app=\"c.test\"}"),
            "42"
        );
        assert_eq!(value(&text, "tether_cluster_waiters{app=\"c.test\"}"), "2");
        assert_eq!(
            value(&text, "tether_cluster_dead_runs{app=\"c.test\"}"),
            "1"
        );
        let (st, journal) = fixture();
        assert!(!render(&st, None, &journal, NOW).contains("tether_cluster_"));
    }

    #[test]
    fn label_values_are_escaped() {
        // Lockfile names are whatever is in the lock dir: status reads them all.
        let st = Status {
            cluster: None,
            apps: vec![lock("we\"ird\\app\nx", "free", "r", None)],
            slots: Vec::new(),
            runs: Vec::new(),
        };
        let text = render(&st, None, &Journal::default(), NOW);
        assert!(
            text.contains("tether_app_waiters{app=\"we\\\"ird\\\\app\\nx\"} 0\n"),
            "{text}"
        );
        check(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    }

    /// The check fails on each defect it names (a check that cannot fail proves nothing).
    #[test]
    fn the_format_check_refuses_broken_expositions() {
        let good = "# HELP tether_x X.\n# TYPE tether_x gauge\ntether_x{app=\"a\"} 1\n";
        check(good).expect("a good exposition");
        let bad = [
            ("tether_x 1\n", "sample before HELP/TYPE"),
            ("# HELP tether_x X.\ntether_x 1\n", "sample before TYPE"),
            ("# TYPE tether_x gauge\ntether_x 1\n", "sample before HELP"),
            (
                "# HELP tether_x X.\n# TYPE tether_x gauge\ntether_x 1",
                "no trailing newline",
            ),
            (
                "# HELP tether_x X.\n# TYPE tether_x gauge\n# TYPE tether_x gauge\ntether_x 1\n",
                "second HELP or TYPE",
            ),
            (
                "# HELP tether_x X.\n# TYPE tether_x gauge\ntether_x{app=\"a\"} 1\n\
                 # HELP tether_y Y.\n# TYPE tether_y gauge\ntether_y 1\n\
                 # HELP tether_x X.\n",
                "family split",
            ),
            (
                "# HELP tether_x X.\n# TYPE tether_x gauge\ntether_y 1\n",
                "sample outside its family",
            ),
            (
                "# HELP tether_x X.\n# TYPE tether_x gauge\ntether_x{app=\"a\"b\"} 1\n",
                "junk after a label",
            ),
            (
                "# HELP tether_x X.\n# TYPE tether_x gauge\ntether_x{app=\"a\\q\"} 1\n",
                "bad escape",
            ),
            (
                "# HELP tether_x X.\n# TYPE tether_x gauge\ntether_x 1\ntether_x 2\n",
                "sample twice",
            ),
            (
                "# HELP tether_x X.\n# TYPE tether_x gauge\ntether_x one\n",
                "value not a number",
            ),
            (
                "# HELP tether_x X.\n# TYPE tether_x counter\ntether_x 1\n",
                "counter without _total",
            ),
            (
                "# HELP tether_x X.\n# TYPE tether_x summary\ntether_x{app=\"a\"} 1\n",
                "sample outside its family",
            ),
            (
                "# HELP Tether-x X.\n# TYPE Tether-x gauge\nTether-x 1\n",
                "bad metric name",
            ),
        ];
        for (text, why) in bad {
            let err = check(text).expect_err(why);
            assert!(err.contains(why), "{why}: got {err}");
        }
    }
}
