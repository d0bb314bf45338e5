//! B5: janitor and status over 10,000 clean unheld lockfiles + 10 held.

use std::fs::{self, File};
use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use runner_tests::{flock_holders, pid_alive, Sandbox};

use crate::measure::{measure, Plan, Side};
use crate::report::{Report, Row};
use crate::util::{code_of, spawn, term, timed_run, wait_exit, wait_for, LIMIT, STEP};
use crate::world::{log_file, log_tail, Ctx, Dirs, World};

/// What the figure measures, for the report.
pub const ABOUT: &str = "\
    10,000 lockfiles `app-cNNNNN.bench.localhost.lock` holding a clean run's metadata (copied \
    from a real finished run) + 10 apps held by live `tether run -- sleep 3600`; per iteration \
    the 10,000 are re-created (untimed), then `tether status`, the baseline loop (some \
    iterations) and finally `tether janitor` (which unlinks the 10,000) are timed, spawn → \
    exit. Afterwards exactly the 10 held lockfiles must remain.";

pub const B5_CLEAN: usize = 10_000;
pub const B5_HELD: usize = 10;

pub fn run(ctx: &Ctx, rep: &mut Report) -> Result<(), String> {
    let w = World::new("b5")?;
    let sb = &w.sb;
    let (log_t, log_b) = (log_file(sb, "tether")?, log_file(sb, "base")?);
    let dirs = &w.dirs;

    // Ten live runs hold ten apps for the whole figure.
    let mut held = Vec::new();
    for h in 0..B5_HELD {
        let app = format!("held-{h:02}.bench.localhost");
        let mut cmd = ctx.tether_run(
            dirs,
            &log_t,
            (&app, &format!("b5-held-{h}")),
            &[],
            &["sleep", "3600"],
        );
        held.push((app, spawn(&mut cmd)?));
    }
    let result = measure_held(ctx, rep, (sb, dirs), (&log_t, &log_b), &held);
    for (_, child) in &held {
        term(child.id());
    }
    for (_, child) in &mut held {
        let _ = wait_exit(child, LIMIT);
    }
    result
}

/// The figure proper, while the ten runs of `held` hold their apps.
fn measure_held(
    ctx: &Ctx,
    rep: &mut Report,
    (sb, dirs): (&Sandbox, &Dirs),
    (log_t, log_b): (&File, &File),
    held: &[(String, Child)],
) -> Result<(), String> {
    for (app, _) in held {
        let lock = dirs.lock_path(app);
        wait_for(
            &format!("run of {app} to hold its lock"),
            LIMIT,
            STEP,
            || {
                !flock_holders(&lock).is_empty()
                    && fs::read(&lock)
                        .ok()
                        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                        .is_some_and(|m| m["state"] == "running")
            },
        )?;
    }

    // A real clean lockfile, as a finished run leaves it, is the template of the 10,000.
    let tmpl_app = "c00000.bench.localhost";
    let mut cmd = ctx.tether_run(dirs, log_t, (tmpl_app, "b5-template"), &[], &["true"]);
    let st = wait_exit(&mut spawn(&mut cmd)?, LIMIT)?;
    if !st.success() {
        return Err(format!("template run exited {}", code_of(st)));
    }
    let template: serde_json::Value = fs::read(dirs.lock_path(tmpl_app))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("the template lockfile is not JSON")?;
    if template["state"] != "clean" {
        return Err(format!("the template lockfile is not clean: {template}"));
    }
    let files: Vec<(PathBuf, Vec<u8>)> = (0..B5_CLEAN)
        .map(|j| {
            let app = format!("c{j:05}.bench.localhost");
            let run_id = format!("b5-clean-{j:05}");
            let mut v = template.clone();
            v["app"] = app.clone().into();
            v["run_dir"] = sb.run_dir(&run_id).to_string_lossy().into_owned().into();
            v["run_id"] = run_id.into();
            (
                dirs.lock_path(&app),
                serde_json::to_vec(&v).unwrap_or_default(),
            )
        })
        .collect();
    let populate = || -> Result<(), String> {
        for (path, content) in &files {
            fs::write(path, content).map_err(|e| format!("writing {}: {e}", path.display()))?;
        }
        Ok(())
    };

    // Baseline: a shell loop trying each lock. Forking flock(1) 10,010 times takes far longer
    // than the whole budget of this figure, so it runs on a 1-in-10 sample (1,000 clean + the
    // 10 held) on a few iterations, and its time is scaled up to the 10,010 files.
    let globs = ["app-c????0.bench.localhost.lock", "app-held-*.lock"];
    let sampled = B5_CLEAN / 10 + B5_HELD;
    let scale = (B5_CLEAN + B5_HELD) as f64 / sampled as f64;
    let script = r#"d=$1; shift; for g in "$@"; do for f in "$d"/$g; do flock -n "$f" true || echo "busy: $f"; done; done"#;

    let plan = Plan {
        id: "B5",
        warm: 1,
        n: ctx.n(3, 30),
        budget: Duration::from_secs(65),
        min_samples: 10,
        unit: "iterations",
        reap: false,
    };
    let base_every = if ctx.quick { usize::MAX } else { 10 };
    // Samples: the janitor (tether) and the baseline loop (base); `tether status` aside.
    let mut sta = Vec::new();
    let samples = measure(ctx, rep, &plan, |it, samples| {
        populate()?;
        let with_base = !it.warm_up && (it.index - plan.warm).is_multiple_of(base_every);
        for side in it.order() {
            match side {
                Side::Tether => {
                    let (st, dt) = timed_run(&mut ctx.tether("status", dirs, log_t), LIMIT)?;
                    if !st.success() {
                        return Err(format!("tether status exited {}", code_of(st)));
                    }
                    if !it.warm_up {
                        sta.push(dt);
                    }
                }
                Side::Base if with_base => {
                    let mut c = ctx.command("bash", log_b);
                    c.arg("-c")
                        .arg(script)
                        .arg("bench-b5")
                        .arg(&dirs.locks)
                        .args(globs);
                    let (st, dt) = timed_run(&mut c, Duration::from_secs(180))?;
                    if !st.success() {
                        return Err(format!("the flock -n loop exited {}", code_of(st)));
                    }
                    samples.record(it, Side::Base, dt * scale);
                }
                Side::Base => {}
            }
        }
        let mut c = ctx.tether("janitor", dirs, log_t);
        let (st, dt) = timed_run(&mut c, Duration::from_secs(120))?;
        if !st.success() {
            return Err(format!(
                "tether janitor exited {}; log tail:\n    {}",
                code_of(st),
                log_tail(sb, "tether")
            ));
        }
        samples.record(it, Side::Tether, dt);
        let left = fs::read_dir(&dirs.locks)
            .map(|d| d.count())
            .map_err(|e| format!("listing the lock dir: {e}"))?;
        if left != B5_HELD {
            return Err(format!(
                "after the janitor the lock dir holds {left} entries, expected the {B5_HELD} held"
            ));
        }
        Ok(())
    })?;
    for (app, child) in held {
        if !pid_alive(child.id() as i32) {
            return Err(format!("the run holding {app} died during B5"));
        }
    }
    rep.note(
        "B5",
        format!(
            "stdout of janitor/status/loop goes to /dev/null. Baseline loop: `{script}`, run over \
             a 1-in-10 sample ({sampled} files) on {}, time ×{scale:.2}",
            if ctx.quick {
                "the first measured iteration".to_owned()
            } else {
                format!("every {base_every}th iteration")
            }
        ),
    );
    let rj = Row::new(
        "B5",
        "`tether janitor`, 10,000 clean unheld + 10 held lockfiles (ms)",
        "median ≤ 1000 ms",
    )
    .with_ab("shell loop of `flock -n`", &samples);
    let pj = rj.tether.is_some_and(|s| s.median <= 1000.0);
    rep.rows.push(rj.judge(pj));
    let rs = Row::new(
        "B5",
        "`tether status`, same lock dir (ms)",
        "median ≤ 1000 ms",
    )
    .with_tether(&sta)
    .with_base("shell loop of `flock -n`", &samples.base)
    .median_ratio();
    let ps = rs.tether.is_some_and(|s| s.median <= 1000.0);
    rep.rows.push(rs.judge(ps));
    Ok(())
}
