//! B4: teardown latency of a 100-process tree that ignores SIGTERM.

use std::time::Duration;

use super::tree::TreeRun;
use crate::measure::{measure, Plan, Side};
use crate::report::{Report, Row};
use crate::world::Ctx;

/// What the figure measures, for the report.
pub const ABOUT: &str = "\
    as B3 with `tree-helper --ignore-term` and `--grace 1s`: tether must SIGKILL after the \
    grace.";

pub fn run(ctx: &Ctx, rep: &mut Report) -> Result<(), String> {
    let runner = TreeRun::new(ctx, "b4", true, "1s")?;
    let plan = Plan {
        id: "B4",
        warm: ctx.n(0, 1),
        n: ctx.n(3, 30),
        budget: Duration::from_secs(40),
        min_samples: 10,
        unit: "runs",
        reap: false,
    };
    let (mut surv, mut bad_codes) = (0, Vec::new());
    let samples = measure(ctx, rep, &plan, |it, samples| {
        let s = runner.once(Side::Tether, it.index)?;
        if s.code != 143 {
            bad_codes.push(s.code.to_string());
        }
        if !it.warm_up {
            surv += s.survivors;
        }
        samples.record(it, Side::Tether, s.total);
        Ok(())
    })?;
    if surv > 0 || !bad_codes.is_empty() {
        rep.note(
            "B4",
            format!(
                "{surv} tree processes alive when tether exited; unexpected exit codes: {}",
                bad_codes.join(", ")
            ),
        );
    }
    let row = Row::new(
        "B4",
        "teardown: same, tree ignores TERM, `--grace 1s` (ms)",
        "median ≤ 1050 ms (grace + 50)",
    )
    .with_tether(&samples.tether);
    let pass = row.tether.is_some_and(|s| s.median <= 1050.0) && surv == 0 && bad_codes.is_empty();
    rep.rows.push(row.judge(pass));
    Ok(())
}
