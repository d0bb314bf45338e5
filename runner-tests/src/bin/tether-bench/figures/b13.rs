//! B13 (issue 17): how evenly waiters are served — the spread of wait times (max / median)
//! under B7's load, tether's queue against plain `flock(1)` ordering the same tether runs
//! (DECISIONS D86), and, for reference, against D53's first baseline.

use std::time::Duration;

use crate::figures::b7::{b7_trial, Base};
use crate::measure::{measure_pairs, Plan, Side};
use crate::report::{Report, Row};
use crate::stats::stats;
use crate::world::{log_file, Ctx, World};

/// What the figure measures, for the report.
pub const ABOUT: &str = "\
    B7's load, 8 threads each running `tether run --app X -- stamp ...` back to back on one \
    app (tether's queue) vs `tether run --app X_w -- flock L stamp ...` (the same tether runs, \
    an app of their own per worker, so tether's start-up and teardown stay outside the lock as \
    with the queue; only the command is ordered, by plain flock: D86); a run's wait = its \
    command's start stamp minus the time its worker spawned it; per trial the spread = max \
    wait / median wait (lower is fairer), 5 interleaved trial pairs of 8 × 50 runs. Also \
    shown, not judged: D53's first baseline, `flock L tether run --app X_w -- stamp ...` (the \
    whole tether run inside the lock), trialled beside each pair.";

pub fn run(ctx: &Ctx, rep: &mut Report) -> Result<(), String> {
    let w = World::new("b13")?;
    let log = log_file(&w.sb, "all")?;
    let runs = ctx.n(10, 50);
    let plan = Plan {
        id: "B13",
        warm: 1,
        n: ctx.n(1, 5),
        budget: Duration::from_secs(90),
        min_samples: 1,
        unit: "trials",
        reap: true,
    };
    let (mut t_max, mut b_max, mut around_max) = (Vec::new(), Vec::new(), Vec::new());
    let mut around = Vec::new();
    // One trial's spread, and its longest wait (ms).
    let spread = |side: Side, base: Base, trial: usize, runs: usize| {
        let r = b7_trial(ctx, &w, &log, (side, base), (trial, runs))?;
        let waits: Vec<f64> = r.waits.iter().map(|&ns| ns as f64 / 1e6).collect();
        Ok::<_, String>(stats(&waits).map(|s| (s.max / s.median.max(1e-3), s.max)))
    };
    let samples = measure_pairs(ctx, rep, &plan, |side, it| {
        let runs = if it.warm_up { 5 } else { runs };
        let trial = 100 + it.index;
        let Some((value, max)) = spread(side, Base::FlockInside, trial, runs)? else {
            return Ok(None);
        };
        if side == Side::Base {
            // D53's baseline beside the judged one, in the same minute.
            if let Some((v, m)) = spread(side, Base::Tether, 200 + it.index, runs)? {
                if !it.warm_up {
                    around.push(v);
                    around_max.push(m);
                }
            }
        }
        if !it.warm_up {
            match side {
                Side::Tether => t_max.push(max),
                Side::Base => b_max.push(max),
            }
        }
        Ok(Some(value))
    })?;
    let med = |v: &[f64]| stats(v).map_or(f64::NAN, |s| s.median);
    rep.note(
        "B13",
        format!(
            "8 threads × {runs} runs per trial; figures are max wait / median wait per trial \
             (lower is better). Longest wait, median over trials: tether's queue {:.0} ms, \
             plain flock(1) ordering the commands of the same tether runs {:.0} ms, D53's \
             `flock L tether run` {:.0} ms (its spread {:.2}, not judged: the whole tether run \
             inside the lock is a different load, D86).",
            med(&t_max),
            med(&b_max),
            med(&around_max),
            med(&around)
        ),
    );
    let row = Row::new(
        "B13",
        "fairness: spread of wait times, 8 workers, one app (max/median)",
        "the queue's spread < plain flock's",
    )
    .with_ab("`tether run --app X_w -- flock L …` loop", &samples);
    let pass = match (row.tether, row.base) {
        (Some(t), Some(b)) => t.median < b.median,
        _ => false,
    };
    rep.rows.push(row.judge(pass));
    rep.rows.push(
        Row::new(
            "B13 (D53)",
            "the same spread against D53's first baseline (reference, not judged)",
            "—",
        )
        .with_tether(&samples.tether)
        .with_base("`flock L tether run …` loop", &around)
        .median_ratio(),
    );
    Ok(())
}
