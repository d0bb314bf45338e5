//! B3: teardown latency of a 100-process tree that exits on SIGTERM.

use std::time::Duration;

use super::tree::TreeRun;
use crate::measure::{measure_pairs, Plan, Side};
use crate::report::{Report, Row};
use crate::stats::{num, stats};
use crate::world::Ctx;

/// What the figure measures, for the report.
pub const ABOUT: &str = "\
    `tether run --grace 10s -- tree-helper --children 100` (101 processes, all exit on TERM): \
    once the tree has reported ready, SIGTERM to the tether front; time until the front is \
    reaped (pidfd) and the app lockfile try-locks free. Baseline: `timeout 60 tree-helper \
    --children 100`, SIGTERM to timeout, time until timeout is reaped.";

pub fn run(ctx: &Ctx, rep: &mut Report) -> Result<(), String> {
    let runner = TreeRun::new(ctx, "b3", false, "10s")?;
    let plan = Plan {
        id: "B3",
        warm: ctx.n(1, 3),
        n: ctx.n(5, 30),
        budget: Duration::from_secs(25),
        min_samples: 10,
        unit: "pairs",
        reap: false,
    };
    let (mut t_exit, mut t_gap) = (Vec::new(), Vec::new());
    let (mut t_surv, mut b_surv, mut bad_codes) = (0, 0, Vec::new());
    let samples = measure_pairs(ctx, rep, &plan, |side, it| {
        let s = runner.once(side, it.index)?;
        if s.code != 143 {
            bad_codes.push(format!("{side:?}: {}", s.code));
        }
        if !it.warm_up {
            match side {
                Side::Tether => {
                    t_exit.push(s.exited);
                    t_gap.push(s.total - s.exited);
                    t_surv += s.survivors;
                }
                Side::Base => b_surv += s.survivors,
            }
        }
        Ok(Some(s.total))
    })?;
    if let Some(s) = stats(&t_exit) {
        rep.note(
            "B3",
            format!(
                "SIGTERM → tether front exited alone: median {} ms, max {} ms; the lock was \
                 free {} ms (median) later. Tree processes alive when the front exited: \
                 tether {t_surv} in all; timeout {b_surv} in all (timeout(1) does not wait \
                 for grandchildren, so its figure stops before the tree is gone).",
                num(s.median),
                num(s.max),
                num(stats(&t_gap).map_or(f64::NAN, |x| x.median))
            ),
        );
    }
    if !bad_codes.is_empty() {
        rep.note(
            "B3",
            format!("unexpected exit codes (want 143): {}", bad_codes.join(", ")),
        );
    }
    let row = Row::new(
        "B3",
        "teardown: SIGTERM → exited + lock free, 100-process tree exiting on TERM (ms)",
        "median ≤ 50 ms",
    )
    .with_ab("`timeout 60 <tree>`, SIGTERM → exited", &samples);
    let pass = row.tether.is_some_and(|s| s.median <= 50.0) && t_surv == 0 && bad_codes.is_empty();
    rep.rows.push(row.judge(pass));
    Ok(())
}
