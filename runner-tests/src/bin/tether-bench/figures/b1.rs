//! B1: wall time of a full, uncontended run.

use std::fs;
use std::time::Duration;

use crate::measure::{measure_pairs, Plan, Side};
use crate::report::{Report, Row};
use crate::util::{code_of, timed_run, LIMIT};
use crate::world::{log_file, log_tail, Ctx, World};

/// What the figure measures, for the report.
pub const ABOUT: &str = "\
    spawn → waitpid of `tether run --app X --lock-dir D --runs-dir R -- true` (full lifecycle: \
    front/core split, run dir, app lock, reconcile, metadata, command, teardown, summary) vs \
    `timeout 60 flock L true`; stderr of both goes to a log file, stdout to /dev/null.";

pub fn run(ctx: &Ctx, rep: &mut Report) -> Result<(), String> {
    let w = World::new("b1")?;
    let sb = &w.sb;
    let (log_t, log_b) = (log_file(sb, "tether")?, log_file(sb, "base")?);
    let app = "b1.bench.localhost";
    let flock_lock = w.lock("b1-flock.lock");
    let plan = Plan {
        id: "B1",
        warm: ctx.n(2, 5),
        n: ctx.n(10, 60),
        budget: Duration::from_secs(15),
        min_samples: 30,
        unit: "pairs",
        reap: false,
    };
    let mut failures = Vec::new();
    let samples = measure_pairs(ctx, rep, &plan, |side, it| {
        let i = it.index;
        let id = format!("b1-{i}");
        let mut cmd = match side {
            Side::Tether => ctx.tether_run(&w.dirs, &log_t, (app, &id), &[], &["true"]),
            Side::Base => {
                let mut c = ctx.command("timeout", &log_b);
                c.args(["60", "flock"]).arg(&flock_lock).arg("true");
                c
            }
        };
        let (st, dt) = timed_run(&mut cmd, LIMIT)?;
        if !st.success() {
            failures.push(format!("{side:?} run {i} exited {}", code_of(st)));
            return Ok(None);
        }
        Ok(Some(dt))
    })?;
    if !failures.is_empty() {
        rep.note(
            "B1",
            format!(
                "{} failed runs: {}; tether log tail:\n    {}",
                failures.len(),
                failures.join(", "),
                log_tail(sb, "tether")
            ),
        );
    }
    if let Some(meta) = fs::read(w.dirs.lock_path(app))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    {
        let cg = meta.get("cgroup").cloned().unwrap_or_default();
        rep.note(
            "B1",
            if cg.is_null() {
                "tether ran without a run cgroup (process-group fallback)".to_owned()
            } else {
                format!("tether put each run in its own cgroup v2 (e.g. {cg})")
            },
        );
    }
    let row = Row::new(
        "B1",
        "wall time, `tether run -- true` (ms)",
        "median ≤ 1.5× baseline",
    )
    .with_ab("`timeout 60 flock L true`", &samples);
    let pass = row.ratio.is_some_and(|r| r <= 1.5) && failures.is_empty();
    rep.rows.push(row.judge(pass));
    Ok(())
}
