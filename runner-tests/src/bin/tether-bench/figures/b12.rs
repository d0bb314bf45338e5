//! B12 (issue 16): what a configured cluster adds to an uncontended `tether run -- true`.

use std::ffi::OsString;
use std::fs;
use std::time::Duration;

use crate::figures::hosts::{cluster, tether_run};
use crate::measure::{measure_pairs, Plan, Side};
use crate::report::{Report, Row};
use crate::stats::stats;
use crate::util::{code_of, timed_run, LIMIT};
use crate::world::{log_file, log_tail, Ctx, World};

/// What the figure measures, for the report.
pub const ABOUT: &str = "\
    spawn → exit of an uncontended `tether run --app X -- true` on a netns host (B9's), with \
    the cluster configured (connect, the pooling probe, the schema check, the advisory lock, \
    the fence, the release) vs the same run on the same host with a config file that has no \
    cluster (the host's flock only); both go through the host's `nsenter … unshare --uts sh` \
    wrapper, so the difference is the cluster's cost.";

const FIGURE: &str = "uncontended `tether run -- true`, cluster configured (ms)";

pub fn run(ctx: &Ctx, rep: &mut Report) -> Result<(), String> {
    let Some(c) = cluster(ctx, rep, "B12", FIGURE) else {
        return Ok(());
    };
    let w = World::new("b12")?;
    let log = log_file(&w.sb, "all")?;
    let plain = w.sb.path().join("no-cluster.yml");
    fs::write(&plain, "# no cluster: the host's flock only\n")
        .map_err(|e| format!("writing {}: {e}", plain.display()))?;
    let h = c.host(0);
    let plan = Plan {
        id: "B12",
        warm: ctx.n(2, 5),
        n: ctx.n(10, 60),
        budget: Duration::from_secs(40),
        min_samples: 20,
        unit: "pairs",
        reap: true,
    };
    let samples = measure_pairs(ctx, rep, &plan, |side, it| {
        let (config, app) = match side {
            Side::Tether => (h.config(), "b12-cluster.bench.localhost"),
            Side::Base => (plain.as_path(), "b12-local.bench.localhost"),
        };
        let id = format!("b12-{side:?}-{}", it.index);
        let mut cmd = tether_run(ctx, h, config, (app, &id), &[OsString::from("true")]);
        cmd.stdout(std::process::Stdio::null())
            .stderr(log.try_clone().map_err(|e| e.to_string())?);
        let (st, took) = timed_run(&mut cmd, LIMIT)?;
        if !st.success() {
            return Err(format!(
                "B12 {side:?} run exited {}; log tail:\n    {}",
                code_of(st),
                log_tail(&w.sb, "all")
            ));
        }
        Ok(Some(took))
    })?;
    let med = |v: &[f64]| stats(v).map_or(f64::NAN, |s| s.median);
    rep.note(
        "B12",
        format!(
            "the cluster adds {:.2} ms to the median run ({:.2} ms with, {:.2} ms without)",
            med(&samples.tether) - med(&samples.base),
            med(&samples.tether),
            med(&samples.base)
        ),
    );
    let row = Row::new("B12", FIGURE, "—").with_ab("the same run, no cluster configured", &samples);
    rep.rows.push(row);
    Ok(())
}
