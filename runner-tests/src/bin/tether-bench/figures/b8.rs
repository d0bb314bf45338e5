//! B8: scale.

use std::time::{Duration, Instant};

use crate::measure::{measure_pairs, Plan, Side};
use crate::report::{Report, Row};
use crate::util::{ms, spawn, wait_exit, LIMIT};
use crate::world::{log_file, Ctx, World};

/// What the figure measures, for the report.
pub const ABOUT: &str = "\
    64 `tether run --app b8-NN... -- sleep 1` over 64 apps started at once; wall time until \
    all exited and the failure count, 30 interleaved trial pairs (the target is on the \
    maximum); 64 × `flock L_i sleep 1` for reference.";

pub fn run(ctx: &Ctx, rep: &mut Report) -> Result<(), String> {
    const RUNS: usize = 64;
    let w = World::new("b8")?;
    let sb = &w.sb;
    let log = log_file(sb, "all")?;
    // 30 pairs (~70 s): the target is on the maximum, so every trial counts.
    let plan = Plan {
        id: "B8",
        warm: 1,
        n: ctx.n(1, 30),
        budget: Duration::from_secs(100),
        min_samples: 1,
        unit: "trials",
        reap: true,
    };
    let (mut t_fail, mut b_fail) = (0, 0);
    let samples = measure_pairs(ctx, rep, &plan, |side, it| {
        let trial = it.index;
        let t0 = Instant::now();
        let mut children = Vec::with_capacity(RUNS);
        let mut fails = 0;
        for j in 0..RUNS {
            let mut cmd = match side {
                Side::Tether => {
                    let app = format!("b8-{j:02}.bench.localhost");
                    let id = format!("b8-{trial}-{j}");
                    ctx.tether_run(&w.dirs, &log, (&app, &id), &[], &["sleep", "1"])
                }
                Side::Base => {
                    let mut c = ctx.command("flock", &log);
                    c.arg(w.lock(&format!("b8-{j}.lock"))).args(["sleep", "1"]);
                    c
                }
            };
            match spawn(&mut cmd) {
                Ok(c) => children.push(c),
                Err(_) => fails += 1,
            }
        }
        for c in &mut children {
            match wait_exit(c, LIMIT) {
                Ok(st) if st.success() => {}
                _ => fails += 1,
            }
        }
        let wall = ms(t0.elapsed());
        if !it.warm_up {
            match side {
                Side::Tether => t_fail += fails,
                Side::Base => b_fail += fails,
            }
        }
        Ok(Some(wall))
    })?;
    rep.note(
        "B8",
        format!(
            "wall time from the first spawn to the last exit of {RUNS} runs started at once; \
             failed runs: tether {t_fail}, flock(1) {b_fail}"
        ),
    );
    let row = Row::new(
        "B8",
        "scale: 64 concurrent runs, 64 apps, `sleep 1` (ms)",
        "max ≤ 2000 ms; 0 failures",
    )
    .with_ab("64 × `flock L_i sleep 1`", &samples);
    let pass = row.tether.is_some_and(|s| s.max <= 2000.0) && t_fail == 0;
    rep.rows.push(row.judge(pass));
    Ok(())
}
