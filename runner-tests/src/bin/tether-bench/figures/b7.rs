//! B7: contention.

use std::ffi::OsString;
use std::fs::File;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use crate::measure::{measure_pairs, Plan, Side};
use crate::report::{Report, Row};
use crate::stats::stats;
use crate::util::{now_ns, os, read_ns, spawn, wait_exit, LIMIT};
use crate::world::{log_file, Ctx, World};

/// What the figure measures, for the report.
pub const ABOUT: &str = "\
    8 threads each running 100 `tether run --app X -- stamp ...` back to back on one app vs \
    the same with `flock L stamp ...`; throughput = 800 / wall time per trial, 5 interleaved \
    trial pairs (30 pairs of 1,600 runs would not fit the 5-minute budget); overlaps from the \
    stamps (marker files on tmpfs, as in B2).";

/// What the baseline side runs under `flock L`: the stamp itself (B7), or the same
/// `tether run` on an app of its own per worker (B13: tether's work, ordered by plain flock).
#[derive(Clone, Copy, PartialEq)]
pub enum Base {
    Stamp,
    Tether,
    /// `tether run --app X_w -- flock L stamp ...`: the same tether work outside the lock as
    /// the queue's runs, only the command ordered by plain flock.
    FlockInside,
}

pub struct Trial {
    pub throughput: f64,
    pub overlaps: usize,
    pub excl_overlaps: usize,
    pub failures: usize,
    /// Each run's wait: from its spawn to its command's start stamp (ns).
    pub waits: Vec<u64>,
}

pub fn b7_trial(
    ctx: &Ctx,
    world: &World,
    log: &File,
    (side, base): (Side, Base),
    (trial, runs): (usize, usize),
) -> Result<Trial, String> {
    const WORKERS: usize = 8;
    let app = "b7.bench.localhost";
    let dirs = &world.dirs;
    let flock_lock = world.lock("b7-flock.lock");
    let tag = if side == Side::Tether { "t" } else { "b" };
    let token = world.mark(&format!("b7-{tag}-{trial}.excl"));
    let barrier = Barrier::new(WORKERS + 1);
    let stamp_paths = |k: usize, i: usize| {
        (
            world.mark(&format!("b7-{tag}-{trial}-{k}-{i}.s")),
            world.mark(&format!("b7-{tag}-{trial}-{k}-{i}.e")),
        )
    };
    let (wall, per_worker) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..WORKERS)
            .map(|w| {
                let (barrier, token, stamp_paths, flock_lock) =
                    (&barrier, &token, &stamp_paths, &flock_lock);
                s.spawn(move || {
                    barrier.wait();
                    let (mut fails, mut excl) = (0usize, 0usize);
                    let mut spawned = Vec::with_capacity(runs);
                    for i in 0..runs {
                        let (sp, ep) = stamp_paths(w, i);
                        let stamp: Vec<OsString> = vec![
                            os(&ctx.stamp),
                            "--start".into(),
                            os(&sp),
                            "--excl".into(),
                            os(token),
                            "--end".into(),
                            os(&ep),
                        ];
                        let mut cmd = match side {
                            Side::Tether => {
                                let id = format!("b7-{trial}-{w}-{i}");
                                ctx.tether_run(dirs, log, (app, &id), &[], &stamp)
                            }
                            Side::Base if base == Base::FlockInside => {
                                let (app, id) = (
                                    format!("b13-w{w}.bench.localhost"),
                                    format!("b13-{trial}-{w}-{i}"),
                                );
                                let mut inner: Vec<OsString> = vec!["flock".into(), os(flock_lock)];
                                inner.extend(stamp.iter().cloned());
                                ctx.tether_run(dirs, log, (&app, &id), &[], &inner)
                            }
                            Side::Base if base == Base::Tether => {
                                let (app, id) = (
                                    format!("b13-w{w}.bench.localhost"),
                                    format!("b13-{trial}-{w}-{i}"),
                                );
                                let t = ctx.tether_run(dirs, log, (&app, &id), &[], &stamp);
                                let mut c = ctx.command("flock", log);
                                c.arg(flock_lock).arg(t.get_program()).args(t.get_args());
                                for (k, v) in t.get_envs() {
                                    match v {
                                        Some(v) => c.env(k, v),
                                        None => c.env_remove(k),
                                    };
                                }
                                c
                            }
                            Side::Base => {
                                let mut c = ctx.command("flock", log);
                                c.arg(flock_lock).args(&stamp);
                                c
                            }
                        };
                        spawned.push(now_ns());
                        match spawn(&mut cmd).and_then(|mut c| wait_exit(&mut c, LIMIT)) {
                            Ok(st) if st.success() => {}
                            Ok(st) if st.code() == Some(99) => excl += 1,
                            _ => fails += 1,
                        }
                    }
                    (fails, excl, spawned)
                })
            })
            .collect();
        barrier.wait();
        let t0 = Instant::now();
        let results: Vec<(usize, usize, Vec<u64>)> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or((runs, 0, Vec::new())))
            .collect();
        (t0.elapsed(), results)
    });
    let failures: usize = per_worker.iter().map(|r| r.0).sum();
    let excl_overlaps: usize = per_worker.iter().map(|r| r.1).sum();
    let mut spans = Vec::new();
    let mut waits = Vec::new();
    let mut missing = 0;
    for (w, worker) in per_worker.iter().enumerate() {
        for i in 0..runs {
            let (sp, ep) = stamp_paths(w, i);
            match (read_ns(&sp), read_ns(&ep)) {
                (Ok(s), Ok(e)) => {
                    spans.push((s, e));
                    if let Some(t) = worker.2.get(i) {
                        waits.push(s.saturating_sub(*t));
                    }
                }
                _ => missing += 1,
            }
        }
    }
    spans.sort_unstable();
    let (mut overlaps, mut max_end) = (0, 0);
    for &(s, e) in &spans {
        if s < max_end {
            overlaps += 1;
        }
        max_end = max_end.max(e);
    }
    Ok(Trial {
        throughput: (WORKERS * runs) as f64 / wall.as_secs_f64(),
        overlaps,
        excl_overlaps,
        // A failed run usually leaves no stamps: count each failure once.
        failures: failures.max(missing),
        waits,
    })
}

pub fn run(ctx: &Ctx, rep: &mut Report) -> Result<(), String> {
    let w = World::new("b7")?;
    let sb = &w.sb;
    let log = log_file(sb, "all")?;
    let runs = ctx.n(20, 100);
    // Five pairs, not 30: one trial is the figure's 8 × 100 runs (~3 s a pair), so 30 pairs
    // would be 48,000 runs per side — over the bench's 5-minute budget, and deep into the
    // churn regime of a journal-less ext4 (see settle_disk). One trial's throughput swings by
    // ±20 % on a shared 2-core VM, so one is not enough either.
    let plan = Plan {
        id: "B7",
        warm: 1,
        n: ctx.n(1, 5),
        budget: Duration::from_secs(60),
        min_samples: 1,
        unit: "trials",
        reap: true,
    };
    let (mut t_ov, mut b_ov, mut t_fail, mut b_fail) = (0, 0, 0, 0);
    let samples = measure_pairs(ctx, rep, &plan, |side, it| {
        let trial = it.index;
        let runs = if it.warm_up { 5 } else { runs };
        let r = b7_trial(ctx, &w, &log, (side, Base::Stamp), (trial, runs))?;
        if !it.warm_up {
            let ov = r.overlaps + r.excl_overlaps;
            match side {
                Side::Tether => {
                    t_ov += ov;
                    t_fail += r.failures;
                }
                Side::Base => {
                    b_ov += ov;
                    b_fail += r.failures;
                }
            }
        }
        Ok(Some(r.throughput))
    })?;
    let (t, b) = (&samples.tether, &samples.base);
    rep.note(
        "B7",
        format!(
            "8 threads × {runs} runs per trial, each run's command is `stamp --start S --excl T \
             --end E` (both sides); an overlap is a start stamp before the latest end stamp so \
             far, or the exclusive token T found present. Overlaps: tether {t_ov}, flock(1) \
             {b_ov}; failed runs: tether {t_fail}, flock(1) {b_fail}. Figures are runs/s per \
             trial (higher is better); ratio = tether / flock(1). Median of the per-pair \
             ratios (each tether trial over the flock(1) trial next to it): {:.2}×.",
            stats(&t.iter().zip(b).map(|(t, b)| t / b).collect::<Vec<_>>())
                .map_or(f64::NAN, |s| s.median)
        ),
    );
    let row = Row::new(
        "B7",
        "contention: 8 workers × 100 runs, one app (runs/s)",
        "0 overlaps; ≥ 0.5× flock(1)",
    )
    .with_ab("`flock L cmd` loop", &samples);
    let pass = row.ratio.is_some_and(|r| r >= 0.5) && t_ov == 0 && t_fail == 0;
    rep.rows.push(row.judge(pass));
    Ok(())
}
