//! `tether status --format prometheus` (issue 17, item 6) against the real kernel: a held app
//! with a waiter blocked in `flock`, a run whose core was SIGKILLed (its reap pending), and
//! journal lines from real runs — the exposition's key samples say what the test made.

use std::collections::BTreeMap;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::time::Duration;

use runner_tests::{
    poll_some_every, rid, start_held_run, touch, wait_app_waiters, Sandbox, TIMEOUT,
};

/// Every sample of an exposition, by its series (`name{labels}`). Panics on a line that is
/// neither a `# HELP`/`# TYPE` comment nor `<series> <number>`, and on a missing final newline.
fn samples(text: &str) -> BTreeMap<String, f64> {
    assert!(text.ends_with('\n'), "no trailing newline:\n{text}");
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with("# HELP tether_") || line.starts_with("# TYPE tether_") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|e| panic!("{e}: value of {line:?}"));
        assert!(
            out.insert(series.to_owned(), value).is_none(),
            "{series} twice"
        );
    }
    out
}

fn scrape(sb: &Sandbox) -> BTreeMap<String, f64> {
    let out = sb.tether_status().args(["--format", "prometheus"]).run();
    out.assert_code(0);
    samples(&out.stdout)
}

fn get(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no {series} in {m:#?}"))
}

/// Every result the issue lists: each has a `tether_runs_total` sample per app.
const RESULTS: &str = "passed failed cancelled deadline superseded lock-lost";

/// The `tether_runs_total` samples of `app`, every result the issue lists.
fn results(m: &BTreeMap<String, f64>, app: &str) -> Vec<(String, f64)> {
    RESULTS
        .split_whitespace()
        .map(|r| {
            let series = format!("tether_runs_total{{app=\"{app}\",result=\"{r}\"}}");
            (r.to_owned(), get(m, &series))
        })
        .collect()
}

/// A run of `app` whose core is SIGKILLed while its command runs: it leaves its app's lock
/// free with `running` metadata and its run dir unclean — a dead run pending a reap.
fn dead_run(sb: &Sandbox, app: &str, name: &str) {
    let id = rid(sb, name);
    let never = sb.mark(&format!("{name}.never"));
    let mut held = start_held_run(sb, app, &id, &never, |c| c);
    kill(Pid::from_raw(held.core), Signal::SIGKILL).expect("kill -9 the core");
    held.run.wait_exit(TIMEOUT).assert_code(137);
}

#[test]
fn prometheus_exposition_shows_a_held_app_its_waiter_a_dead_run_and_the_journal() {
    let sb = Sandbox::new();
    let (busy, dead, reaped) = ("busy.example.org", "dead.example.org", "reaped.example.org");
    // Journal lines from real runs: busy passed and failed; reaped passed after reaping a
    // dead run of its app.
    for (name, cmd, code) in [("ok", "true", 0), ("ko", "exit 3", 3)] {
        sb.tether_run()
            .app(busy)
            .run_id(rid(&sb, name))
            .command(["sh", "-c", cmd])
            .run()
            .assert_code(code);
    }
    dead_run(&sb, reaped, "to-reap");
    sb.tether_run()
        .app(reaped)
        .run_id(rid(&sb, "reaper"))
        .command(["true"])
        .run()
        .assert_code(0);
    dead_run(&sb, dead, "dead");

    // A holder of busy and one waiter blocked in flock behind it.
    let release = sb.mark("release");
    let mut holder = start_held_run(&sb, busy, &rid(&sb, "holder"), &release, |c| c);
    let mut waiter = sb
        .tether_run()
        .app(busy)
        .run_id(rid(&sb, "waiter"))
        .command(["true"])
        .spawn();
    wait_app_waiters(&sb, busy, 1, TIMEOUT);

    // Ages are whole seconds (of the records' clock): scrape until both have reached one.
    let app = |name: &str, a: &str| format!("{name}{{app=\"{a}\"}}");
    let m = poll_some_every(TIMEOUT, Duration::from_millis(100), || {
        let m = scrape(&sb);
        let aged = get(&m, &app("tether_app_holder_age_seconds", busy)) >= 1.0
            && get(&m, &app("tether_app_oldest_wait_seconds", busy)) >= 1.0;
        aged.then_some(m)
    })
    .unwrap_or_else(|| {
        panic!(
            "holder age and oldest wait never reached 1 s: {:#?}",
            scrape(&sb)
        )
    });
    assert_eq!(get(&m, &app("tether_app_lock_held", busy)), 1.0);
    if sb.cluster().is_none() {
        assert_eq!(get(&m, &app("tether_app_waiters", busy)), 1.0);
    } else {
        // Under a cluster the waiter stands in the server's queue, not the host's (D84): the
        // cluster's families count it (CLI-CONTRACT §27).
        assert_eq!(get(&m, &app("tether_cluster_lock_held", busy)), 1.0);
        assert_eq!(get(&m, &app("tether_cluster_waiters", busy)), 1.0);
    }
    assert!(
        get(&m, &app("tether_app_holder_age_seconds", busy))
            >= get(&m, &app("tether_app_oldest_wait_seconds", busy)),
        "the holder started before its waiter: {m:#?}"
    );
    assert_eq!(get(&m, &app("tether_app_reap_pending", dead)), 1.0);
    assert_eq!(get(&m, &app("tether_app_reap_pending", reaped)), 0.0);
    assert_eq!(get(&m, "tether_dead_runs_pending_reap"), 1.0);
    assert_eq!(get(&m, "tether_slots_busy"), 0.0);
    let expect = |passed: f64, failed: f64| -> Vec<(String, f64)> {
        let mut v: Vec<(String, f64)> = RESULTS
            .split_whitespace()
            .map(|r| (r.to_owned(), 0.0))
            .collect();
        v[0].1 = passed;
        v[1].1 = failed;
        v
    };
    assert_eq!(results(&m, busy), expect(1.0, 1.0));
    assert_eq!(results(&m, reaped), expect(1.0, 0.0));
    assert_eq!(
        results(&m, dead),
        expect(0.0, 0.0),
        "a killed core writes no line"
    );
    assert_eq!(get(&m, &app("tether_reaps_total", reaped)), 1.0);
    assert_eq!(get(&m, &app("tether_lock_wait_seconds_count", busy)), 2.0);
    assert_eq!(get(&m, &app("tether_hold_seconds_count", busy)), 2.0);
    assert_eq!(get(&m, &app("tether_teardowns_failed_total", busy)), 0.0);

    // Released: the holder and the waiter pass, the queue empties, the counters follow.
    touch(&release);
    holder.run.wait_exit(TIMEOUT).assert_code(0);
    waiter.wait_exit(TIMEOUT).assert_code(0);
    let m = scrape(&sb);
    assert_eq!(get(&m, &app("tether_app_lock_held", busy)), 0.0);
    assert_eq!(get(&m, &app("tether_app_waiters", busy)), 0.0);
    if sb.cluster().is_some() {
        // A released app keeps no row, so the cluster's families have no sample for it.
        assert!(
            !m.contains_key(&app("tether_cluster_waiters", busy)),
            "{m:#?}"
        );
    }
    assert_eq!(get(&m, &app("tether_app_oldest_wait_seconds", busy)), 0.0);
    assert_eq!(results(&m, busy), expect(3.0, 1.0));
    assert_eq!(get(&m, &app("tether_lock_wait_seconds_count", busy)), 4.0);
    // The waiter's wait is the longest of the four (the others found the app free).
    let p95 = format!("tether_lock_wait_seconds{{app=\"{busy}\",quantile=\"0.95\"}}");
    assert!(get(&m, &p95) > 0.0, "{m:#?}");
}
