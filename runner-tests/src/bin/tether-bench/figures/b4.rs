//! B4: teardown latency of a 100-process tree that ignores SIGTERM.

use super::b3::TreeRun;
use crate::measure::Side;
use crate::report::{Report, Row};
use crate::world::{log_file, Ctx, World};

/// What the figure measures, for the report.
pub const ABOUT: &str = "\
    as B3 with `tree-helper --ignore-term` and `--grace 1s`: tether must SIGKILL after the \
    grace.";

pub fn run(ctx: &Ctx, rep: &mut Report) -> Result<(), String> {
    let w = World::new("b4")?;
    let sb = &w.sb;
    let log = log_file(sb, "all")?;
    let runner = TreeRun {
        ctx,
        w: &w,
        log: &log,
        app: "b4.bench.localhost",
        ignore_term: true,
        grace: "1s",
    };
    let (warm, n) = (ctx.n(0, 1), ctx.n(3, 30));
    let budget = ctx.budget(40);
    let (mut t, mut surv, mut bad_codes) = (Vec::new(), 0, Vec::new());
    for i in 0..warm + n {
        if budget.over() && t.len() >= 10 {
            rep.note(
                "B4",
                format!("stopped by its time budget after {} runs", t.len()),
            );
            break;
        }
        let s = runner.once(Side::Tether, i)?;
        if s.code != 143 {
            bad_codes.push(s.code.to_string());
        }
        if i >= warm {
            t.push(s.total);
            surv += s.survivors;
        }
    }
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
    .with_tether(&t);
    let pass = row.tether.is_some_and(|s| s.median <= 1050.0) && surv == 0 && bad_codes.is_empty();
    rep.rows.push(row.judge(pass));
    Ok(())
}
