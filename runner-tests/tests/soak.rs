//! Soak: many runs of a few apps, some killed or cancelled at random, a janitor sweeping
//! beside them (CLI-CONTRACT §1: serialization per app, teardown exactly once, nothing outlives a dead
//! run; PROTOCOL §6 reaped exactly once; CLI-CONTRACT §15 janitor never reaps a live run).
//!
//! Each run's command appends `start <app> <run> <pid>` to its app's log, sleeps a few ms and
//! appends `end <app> <run> <pid>` (each line one `O_APPEND` write by `echo >>`); its teardown
//! appends `teardown <reason> <run>`. About one run in five is a victim: once its command has
//! logged its start (victims then sleep long, so the blow lands while the command runs), at a
//! random moment it gets one of
//! - SIGKILL of the front (the agent kills the step) → the core tears down, reason `parent-died`;
//! - SIGKILL of the core (tether itself dies) → no teardown of its own; its leftovers and its
//!   app are reaped by the next holder of the app (a run or the janitor), reason `reaped`;
//! - SIGTERM of the front (a cancel) → forwarded, reason `signal`, exit 143;
//! - SIGKILL of the core right after its teardown command finished (once its record says
//!   `clean`), while it still kills what that teardown left (a TERM-ignoring background process
//!   holds that window open) → no second teardown by anyone: one `exited` line; the janitor
//!   kills the teardown's leftover.
//!
//! Afterwards (and after a final janitor sweep) it asserts, per app log, that no run started
//! while another run's holding period (its start to its teardown line, which is written under
//! the lock) was open; that every run has exactly one start and exactly one teardown line,
//! with the reason its fate implies; the exit codes; that no process of any run is left; and
//! that no lockfile or run dir is left.
//!
//! Knobs (for `ci/soak`): `TETHER_SOAK_RUNS` (200), `TETHER_SOAK_PARALLEL` (8),
//! `TETHER_SOAK_APPS` (4), `TETHER_SOAK_SECONDS` (60: no new run starts after that; the test
//! is bounded by it plus a drain bound), `TETHER_SOAK_SEED` (default: from the clock; printed,
//! to replay a failure's choices).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::unistd::Pid;
use runner_tests::{
    flock_waiters, log_lines, pid_alive, shell_quote, Finished, RunningTether, Sandbox, Signal,
    TIMEOUT,
};

/// xorshift64*: tiny, seedable, good enough to pick fates and delays.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn env_num(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        _ => default,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fate {
    /// Runs to the end by itself.
    Normal,
    /// SIGKILL of the front: the core tears down (parent died).
    KillFront,
    /// SIGKILL of the core: reaped by the next holder of its app.
    KillCore,
    /// SIGTERM of the front: forwarded, teardown, 143.
    TermFront,
    /// SIGKILL of the core after its teardown command exited: never torn down again.
    KillCoreAfterTeardown,
}

impl Fate {
    fn reason(self) -> &'static str {
        match self {
            Fate::Normal => "exited",
            Fate::KillFront => "parent-died",
            Fate::KillCore => "reaped",
            Fate::TermFront => "signal",
            Fate::KillCoreAfterTeardown => "exited",
        }
    }
}

/// What the test knows about one run.
struct Run {
    id: String,
    app: usize,
    fate: Fate,
    /// Millis after its command's start line when the victim gets its blow.
    delay_ms: u64,
    /// The core's pid, once known (victims only).
    core: Option<i32>,
    finished: Option<Finished>,
}

/// A run whose front has not exited yet.
struct Active {
    idx: usize,
    tether: RunningTether,
    /// When the victim's start line was seen (then the blow is due at + delay).
    started: Option<Instant>,
    struck: bool,
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

fn kill(pid: i32, sig: Signal) {
    nix::sys::signal::kill(Pid::from_raw(pid), sig)
        .unwrap_or_else(|e| panic!("kill -{sig} {pid}: {e}"));
}

/// Sets the flag when dropped, so the janitor loop ends even when the test panics inside
/// `thread::scope` (which waits for its threads).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Per run id: (start lines, teardown reasons).
type Seen = HashMap<String, (usize, Vec<String>)>;

/// Checks one app's log. Returns (violations, per run id: (starts, teardown reasons)).
fn check_app_log(app: &str, lines: &[String]) -> (Vec<String>, Seen) {
    let mut violations = Vec::new();
    let mut seen: Seen = HashMap::new();
    // The run whose holding period is open: from its start line to its teardown line.
    let mut holder: Option<String> = None;
    for (n, line) in lines.iter().enumerate() {
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["start", a, id, _pid] if *a == app => {
                if let Some(h) = &holder {
                    violations.push(format!(
                        "{app} line {n}: {id} started while {h} held the app (no teardown of {h} yet)"
                    ));
                }
                holder = Some(id.to_string());
                seen.entry(id.to_string()).or_default().0 += 1;
            }
            ["end", a, id, _pid] if *a == app => {
                if holder.as_deref() != Some(id) {
                    violations.push(format!(
                        "{app} line {n}: end of {id} while the holder is {holder:?}"
                    ));
                }
            }
            ["teardown", reason, id] => {
                if holder.as_deref() == Some(id) {
                    holder = None;
                } else {
                    violations.push(format!(
                        "{app} line {n}: teardown ({reason}) of {id} while the holder is {holder:?}"
                    ));
                }
                seen.entry(id.to_string())
                    .or_default()
                    .1
                    .push(reason.to_string());
            }
            _ => violations.push(format!("{app} line {n}: unexpected line {line:?}")),
        }
    }
    if let Some(h) = holder {
        violations.push(format!("{app}: {h} never tore down (no teardown line)"));
    }
    (violations, seen)
}

/// CLI-CONTRACT §1, PROTOCOL §6, CLI-CONTRACT §15 under load: ~200 runs of 4 apps, 8 at a time, ~1 in 5 SIGKILLed (front
/// or core) or SIGTERMed mid-command, a janitor sweeping in a loop: no two holders of an app
/// ever overlap, every run tears down exactly once (a SIGKILLed core's run reaped exactly
/// once), and nothing — process, lockfile, run dir — is left.
#[test]
fn soak_runs_kills_and_janitor() {
    let runs_total = env_num("TETHER_SOAK_RUNS", 200) as usize;
    let parallel = env_num("TETHER_SOAK_PARALLEL", 8).max(1) as usize;
    let apps_n = env_num("TETHER_SOAK_APPS", 4).max(1) as usize;
    let budget = Duration::from_secs(env_num("TETHER_SOAK_SECONDS", 60));
    let seed = env_num("TETHER_SOAK_SEED", unix_nanos());
    eprintln!(
        "soak: seed {seed} (TETHER_SOAK_SEED={seed} replays the choices), {runs_total} runs, \
         {parallel} at a time, {apps_n} apps, {budget:?} budget"
    );
    let mut rng = Rng::new(seed);

    let sb = Sandbox::new();
    let suffix = sb
        .path()
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .rsplit('-')
        .next()
        .unwrap_or_default()
        .to_owned();
    let apps: Vec<String> = (0..apps_n)
        .map(|i| format!("soak{i}.example.org"))
        .collect();
    let logs: Vec<PathBuf> = (0..apps_n)
        .map(|i| sb.mark(&format!("app{i}.log")))
        .collect();
    let locks: Vec<PathBuf> = apps.iter().map(|a| sb.lock_path(a)).collect();

    let mut runs: Vec<Run> = Vec::new();
    let mut active: Vec<Active> = Vec::new();
    let mut max_waiters = 0usize;
    let mut max_waiters_app = String::new();
    let started_at = Instant::now();
    let drain_bound = budget + TIMEOUT;

    let stop = AtomicBool::new(false);
    let sweeps = AtomicUsize::new(0);
    let janitor_reaps = AtomicUsize::new(0);
    let bad_sweeps: Mutex<Vec<Finished>> = Mutex::new(Vec::new());
    // Janitor pid → what it printed: names the culprit when a run blames a pid.
    let janitor_said: Mutex<HashMap<i32, String>> = Mutex::new(HashMap::new());

    std::thread::scope(|s| {
        // Stops the janitor loop also when an assertion below panics inside the scope.
        let _stop = StopOnDrop(&stop);
        // The janitor, sweeping in a loop beside the runs (it has no PDEATHSIG, so a helper
        // thread may start it).
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let mut j = sb.tether_janitor().args(["--grace", "2s"]).spawn();
                let f = j.wait_exit(TIMEOUT);
                janitor_said
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(j.pid(), f.stderr.clone());
                sweeps.fetch_add(1, Ordering::Relaxed);
                let reaps = f
                    .stderr
                    .lines()
                    .filter(|l| l.starts_with("tether: reaping dead run "))
                    .count();
                janitor_reaps.fetch_add(reaps, Ordering::Relaxed);
                if f.code != Some(0) {
                    bad_sweeps.lock().unwrap_or_else(|p| p.into_inner()).push(f);
                }
                std::thread::sleep(Duration::from_millis(20)); // pacing, not ordering // ordering-free
            }
        });

        let mut iteration = 0u64;
        loop {
            let launching = runs.len() < runs_total && started_at.elapsed() < budget;
            if !launching && active.is_empty() {
                break;
            }
            assert!(
                started_at.elapsed() < drain_bound,
                "soak did not drain within {drain_bound:?}; still active: {:?}",
                active
                    .iter()
                    .map(|a| (&runs[a.idx].id, runs[a.idx].fate, a.tether.stderr()))
                    .collect::<Vec<_>>()
            );
            // Launch up to `parallel`.
            while launching && active.len() < parallel && runs.len() < runs_total {
                let n = runs.len();
                let app = rng.below(apps_n as u64) as usize;
                let fate = match rng.below(15) {
                    0 => Fate::KillFront,
                    1 => Fate::KillCore,
                    2 => Fate::TermFront,
                    3 => Fate::KillCoreAfterTeardown,
                    _ => Fate::Normal,
                };
                let id = format!("s{n}-{suffix}");
                let log_q = shell_quote(&logs[app]);
                let nap = if matches!(fate, Fate::Normal | Fate::KillCoreAfterTeardown) {
                    format!("0.0{:02}", 1 + rng.below(15))
                } else {
                    // Longer than the test: a leftover of a SIGKILLed core must be killed by
                    // whoever reaps it, not outlive its own sleep.
                    "1000".to_owned()
                };
                let script = format!(
                    r#"echo "start {app} $TETHER_RUN_ID $$" >> {log_q}; sleep {nap}; echo "end {app} $TETHER_RUN_ID $$" >> {log_q}"#,
                    app = apps[app]
                );
                let mut teardown =
                    format!(r#"echo "teardown $TETHER_REASON $TETHER_RUN_ID" >> {log_q}"#);
                if fate == Fate::KillCoreAfterTeardown {
                    // Leaves a process that shrugs off SIGTERM: the core spends the grace
                    // killing it, after the teardown command has exited.
                    // It is in place (ignoring SIGTERM) before the teardown command exits.
                    let ready = shell_quote(sb.mark(&format!("bg-{n}")));
                    teardown.push_str(&format!(
                        "; {} --ready {ready} & {}",
                        shell_quote(runner_tests::helper_bin!("ignore-term")),
                        runner_tests::sh_wait_for(&ready)
                    ));
                }
                let tether = sb
                    .tether_run()
                    .app(&apps[app])
                    .run_id(&id)
                    .teardown(&teardown)
                    .args(["--grace", "2s"])
                    .command(["sh", "-c", &script])
                    .spawn();
                runs.push(Run {
                    id,
                    app,
                    fate,
                    delay_ms: rng.below(40),
                    core: None,
                    finished: None,
                });
                active.push(Active {
                    idx: n,
                    tether,
                    started: None,
                    struck: false,
                });
            }

            // Victims: strike once the command has started and the delay has passed.
            let mut app_text: HashMap<usize, String> = HashMap::new();
            for a in active.iter_mut() {
                let run = &mut runs[a.idx];
                if run.fate == Fate::Normal || a.struck {
                    continue;
                }
                if a.started.is_none() && run.fate == Fate::KillCoreAfterTeardown {
                    // Its moment: the record says the teardown is done (the core is still
                    // killing what the teardown left).
                    if sb
                        .run_record(&run.id)
                        .is_some_and(|r| r["state"] == "clean")
                    {
                        a.started = Some(Instant::now());
                        run.core = sb
                            .run_record(&run.id)
                            .and_then(|r| r["pid"].as_i64())
                            .map(|p| p as i32);
                    }
                } else if a.started.is_none() {
                    let text = app_text
                        .entry(run.app)
                        .or_insert_with(|| fs::read_to_string(&logs[run.app]).unwrap_or_default());
                    if text.contains(&format!(" {} ", run.id)) {
                        a.started = Some(Instant::now());
                        run.core = Some(a.tether.wait_core_pid(TIMEOUT));
                    }
                }
                if let Some(t) = a.started {
                    if t.elapsed() >= Duration::from_millis(run.delay_ms) {
                        match run.fate {
                            Fate::KillFront => kill(a.tether.pid(), Signal::SIGKILL),
                            Fate::KillCore | Fate::KillCoreAfterTeardown => {
                                kill(run.core.unwrap_or_default(), Signal::SIGKILL)
                            }
                            Fate::TermFront => kill(a.tether.pid(), Signal::SIGTERM),
                            Fate::Normal => {}
                        }
                        a.struck = true;
                    }
                }
            }

            // Reap finished fronts.
            let mut i = 0;
            while i < active.len() {
                match active[i].tether.try_wait_exit(Duration::ZERO) {
                    Some(f) => {
                        let a = active.swap_remove(i);
                        runs[a.idx].finished = Some(f);
                    }
                    None => i += 1,
                }
            }

            iteration += 1;
            if iteration.is_multiple_of(8) {
                for (k, lock) in locks.iter().enumerate() {
                    let mut w = flock_waiters(lock);
                    w.sort_unstable();
                    w.dedup(); // /proc/locks may repeat a line under churn
                    let w = w.len();
                    if w > max_waiters {
                        max_waiters = w;
                        max_waiters_app = apps[k].clone();
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(2)); // poll step under the drain bound
        }
        stop.store(true, Ordering::Relaxed);
    });

    // Cores of SIGKILLed fronts finish their teardown on their own.
    let cores: Vec<i32> = runs.iter().filter_map(|r| r.core).collect();
    runner_tests::wait_all_gone(&cores, TIMEOUT);

    // A final sweep reaps whatever a SIGKILLed core left with no later holder of its app.
    let last = sb.tether_janitor().args(["--grace", "2s"]).run();
    last.assert_code(0);
    let last_reaps = last
        .stderr
        .lines()
        .filter(|l| l.starts_with("tether: reaping dead run "))
        .count();

    // --- assertions ---
    let mut problems: Vec<String> = Vec::new();
    for f in bad_sweeps.into_inner().unwrap_or_else(|p| p.into_inner()) {
        problems.push(format!("a janitor sweep did not exit 0:\n{f}"));
    }
    let mut seen: Seen = HashMap::new();
    for (k, log) in logs.iter().enumerate() {
        let (violations, per_run) = check_app_log(&apps[k], &log_lines(log));
        problems.extend(violations);
        for (id, v) in per_run {
            let e = seen.entry(id).or_default();
            e.0 += v.0;
            e.1.extend(v.1);
        }
    }
    let mut by_fate: BTreeMap<Fate, usize> = BTreeMap::new();
    for run in &runs {
        *by_fate.entry(run.fate).or_default() += 1;
        let (starts, teardowns) = seen.get(&run.id).cloned().unwrap_or_default();
        if starts != 1 {
            problems.push(format!("{} ({:?}): {starts} start lines", run.id, run.fate));
        }
        if teardowns != vec![run.fate.reason().to_owned()] {
            problems.push(format!(
                "{} ({:?}): teardown lines {teardowns:?}, expected exactly one {:?}",
                run.id,
                run.fate,
                run.fate.reason()
            ));
        }
        let Some(f) = &run.finished else {
            problems.push(format!("{}: never finished", run.id));
            continue;
        };
        let ok = match run.fate {
            Fate::Normal => f.code == Some(0),
            Fate::KillFront => f.signal == Some(Signal::SIGKILL as i32),
            Fate::KillCore | Fate::KillCoreAfterTeardown => f.code == Some(137),
            Fate::TermFront => f.code == Some(143),
        };
        if !ok {
            let mut culprit = String::new();
            let said = janitor_said.lock().unwrap_or_else(|p| p.into_inner());
            for (pid, stderr) in said.iter() {
                if f.stderr.contains(&format!(" pid {pid}\n")) {
                    culprit =
                        format!("\n(pid {pid} was a janitor sweep, which printed:\n{stderr})");
                }
            }
            problems.push(format!(
                "{} ({:?}): unexpected exit\n{f}{culprit}",
                run.id, run.fate
            ));
        }
    }
    let reaped_lines: usize = seen
        .values()
        .map(|(_, t)| t.iter().filter(|r| *r == "reaped").count())
        .sum();

    let leftovers = {
        runner_tests::poll_until(Duration::from_secs(10), || sb.leftovers().is_empty());
        sb.leftovers()
    };
    if !leftovers.is_empty() {
        problems.push(format!("processes left: {leftovers:#?}"));
    }
    let lockfiles: Vec<String> = fs::read_dir(sb.lock_dir())
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if !lockfiles.is_empty() {
        problems.push(format!("lock dir not empty: {lockfiles:?}"));
    }
    let run_dirs = runner_tests::run_dirs(&sb.runs_dir());
    if !run_dirs.is_empty() {
        problems.push(format!("runs dir not empty: {run_dirs:?}"));
    }
    for run in runs.iter().filter(|r| r.core.is_some()) {
        let core = run.core.unwrap_or_default();
        if pid_alive(core) {
            problems.push(format!("core {core} of {} still alive", run.id));
        }
    }

    eprintln!(
        "soak: seed {seed}: {} runs in {:.1?} — normal {}, front SIGKILLed {}, core SIGKILLed {}, \
         SIGTERMed {}, core SIGKILLed after its teardown {}; reaped {} (janitor reaps {} + final \
         sweep {}), max waiters {} ({}), {} janitor sweeps",
        runs.len(),
        started_at.elapsed(),
        by_fate.get(&Fate::Normal).unwrap_or(&0),
        by_fate.get(&Fate::KillFront).unwrap_or(&0),
        by_fate.get(&Fate::KillCore).unwrap_or(&0),
        by_fate.get(&Fate::TermFront).unwrap_or(&0),
        by_fate.get(&Fate::KillCoreAfterTeardown).unwrap_or(&0),
        reaped_lines,
        janitor_reaps.load(Ordering::Relaxed),
        last_reaps,
        max_waiters,
        max_waiters_app,
        sweeps.load(Ordering::Relaxed)
    );
    assert!(
        problems.is_empty(),
        "soak (seed {seed}) found {} problem(s):\n{}\n--- final janitor ---\n{last}",
        problems.len(),
        problems.join("\n")
    );
    assert_eq!(
        reaped_lines,
        *by_fate.get(&Fate::KillCore).unwrap_or(&0),
        "one reap per SIGKILLed core"
    );
}
