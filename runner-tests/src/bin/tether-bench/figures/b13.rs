//! B13 (issue 17): how evenly waiters are served — the spread of wait times (max / median)
//! under B7's load, tether's queue against plain `flock(1)`.

use std::time::Duration;

use crate::figures::b7::{b7_trial, Base};
use crate::measure::{measure_pairs, Plan, Side};
use crate::report::{Report, Row};
use crate::stats::stats;
use crate::world::{log_file, Ctx, World};

/// What the figure measures, for the report.
pub const ABOUT: &str = "\
    B7's load, 8 threads each running `tether run --app X -- stamp ...` back to back on one \
    app (tether's queue) vs `flock L tether run --app X_w -- stamp ...` (the same tether work, \
    an app of its own per worker, ordered by plain flock); a run's wait = its command's start \
    stamp minus the time its worker spawned it; per trial the spread = max wait / median wait \
    (lower is fairer), 3 interleaved trial pairs of 8 × 50 runs.";

pub fn run(ctx: &Ctx, rep: &mut Report) -> Result<(), String> {
    let w = World::new("b13")?;
    let log = log_file(&w.sb, "all")?;
    let runs = ctx.n(10, 50);
    let plan = Plan {
        id: "B13",
        warm: 1,
        n: ctx.n(1, 3),
        budget: Duration::from_secs(60),
        min_samples: 1,
        unit: "trials",
        reap: true,
    };
    let (mut t_max, mut b_max) = (Vec::new(), Vec::new());
    let samples = measure_pairs(ctx, rep, &plan, |side, it| {
        let runs = if it.warm_up { 5 } else { runs };
        let r = b7_trial(ctx, &w, &log, (side, Base::Tether), (100 + it.index, runs))?;
        let waits: Vec<f64> = r.waits.iter().map(|&ns| ns as f64 / 1e6).collect();
        let Some(s) = stats(&waits) else {
            return Ok(None);
        };
        if !it.warm_up {
            match side {
                Side::Tether => t_max.push(s.max),
                Side::Base => b_max.push(s.max),
            }
        }
        Ok(Some(s.max / s.median.max(1e-3)))
    })?;
    let med = |v: &[f64]| stats(v).map_or(f64::NAN, |s| s.median);
    rep.note(
        "B13",
        format!(
            "8 threads × {runs} runs per trial; figures are max wait / median wait per trial \
             (lower is better). Longest wait, median over trials: tether's queue {:.0} ms, plain \
             flock(1) around the same tether runs {:.0} ms.",
            med(&t_max),
            med(&b_max)
        ),
    );
    let row = Row::new(
        "B13",
        "fairness: spread of wait times, 8 workers, one app (max/median)",
        "the queue's spread < plain flock's",
    )
    .with_ab("`flock L tether run …` loop", &samples);
    let pass = match (row.tether, row.base) {
        (Some(t), Some(b)) => t.median < b.median,
        _ => false,
    };
    rep.rows.push(row.judge(pass));
    Ok(())
}
