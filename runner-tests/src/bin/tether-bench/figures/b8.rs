//! B8: scale.

use std::time::Instant;

use crate::measure::{pair_order, Side};
use crate::report::{Report, Row};
use crate::util::{ms, reap_orphans, spawn, wait_exit, LIMIT};
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
    let (warm, n) = (1, ctx.n(1, 30));
    let budget = ctx.budget(100);
    let (mut t, mut b, mut t_fail, mut b_fail) = (Vec::new(), Vec::new(), 0, 0);
    for trial in 0..warm + n {
        if budget.over() && !t.is_empty() {
            rep.note(
                "B8",
                format!("stopped by its time budget after {} trials", t.len()),
            );
            break;
        }
        for side in pair_order(trial) {
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
            if trial >= warm {
                match side {
                    Side::Tether => {
                        t.push(wall);
                        t_fail += fails;
                    }
                    Side::Base => {
                        b.push(wall);
                        b_fail += fails;
                    }
                }
            }
        }
        reap_orphans();
    }
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
    .with_tether(&t)
    .with_base("64 × `flock L_i sleep 1`", &b)
    .median_ratio();
    let pass = row.tether.is_some_and(|s| s.max <= 2000.0) && t_fail == 0;
    rep.rows.push(row.judge(pass));
    Ok(())
}
