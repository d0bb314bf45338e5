//! B3: teardown latency of a 100-process tree that exits on SIGTERM.

use std::ffi::OsString;
use std::fs::File;
use std::time::{Duration, Instant};

use runner_tests::pid_alive;

use crate::measure::{pair_order, Side};
use crate::report::{Report, Row};
use crate::stats::{num, stats};
use crate::util::{
    code_of, lock_free, ms, os, read_pids, reap_orphans, spawn, term, wait_exit, wait_for, LIMIT,
};
use crate::world::{log_file, Ctx, World};

/// What the figure measures, for the report.
pub const ABOUT: &str = "\
    `tether run --grace 10s -- tree-helper --children 100` (101 processes, all exit on TERM): \
    once the tree has reported ready, SIGTERM to the tether front; time until the front is \
    reaped (pidfd) and the app lockfile try-locks free. Baseline: `timeout 60 tree-helper \
    --children 100`, SIGTERM to timeout, time until timeout is reaped.";

pub struct TreeSample {
    /// SIGTERM → (tether: exited and lockfile free; timeout: exited), ms.
    pub total: f64,
    /// SIGTERM → exited (waitpid), ms.
    pub exited: f64,
    /// Processes of the tree still alive (not zombies) when the front exited.
    pub survivors: usize,
    pub code: i32,
}

pub struct TreeRun<'a> {
    pub ctx: &'a Ctx,
    pub w: &'a World,
    pub log: &'a File,
    pub app: &'a str,
    pub ignore_term: bool,
    pub grace: &'a str,
}

impl TreeRun<'_> {
    pub fn once(&self, side: Side, i: usize) -> Result<TreeSample, String> {
        let pids_file = self.w.sb.fresh_mark("tree-pids");
        let mut tree: Vec<OsString> = vec![
            os(&self.ctx.tree),
            "--pids-file".into(),
            os(&pids_file),
            "--children".into(),
            "100".into(),
        ];
        if self.ignore_term {
            tree.push("--ignore-term".into());
        }
        let mut cmd = match side {
            Side::Tether => {
                let id = format!("{}-{i}", self.app.split('.').next().unwrap_or("t"));
                self.ctx.tether_run(
                    &self.w.dirs,
                    self.log,
                    (self.app, &id),
                    &["--grace", self.grace],
                    &tree,
                )
            }
            Side::Base => {
                let mut c = self.ctx.command("timeout", self.log);
                c.arg("60").args(&tree);
                c
            }
        };
        let mut child = spawn(&mut cmd)?;
        let ready = wait_for(
            &format!("the tree's pid file {}", pids_file.display()),
            LIMIT,
            Duration::from_millis(1),
            || pids_file.exists(),
        );
        if let Err(e) = ready {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        let pids = read_pids(&pids_file)?;
        let t0 = Instant::now();
        term(child.id());
        let st = wait_exit(&mut child, LIMIT)?;
        let exited = ms(t0.elapsed());
        let total = match side {
            Side::Tether => {
                let lock = self.w.dirs.lock_path(self.app);
                wait_for(
                    "the app lock to be free",
                    LIMIT,
                    Duration::from_micros(50),
                    || lock_free(&lock),
                )?;
                ms(t0.elapsed())
            }
            Side::Base => exited,
        };
        // Counted after the timing: reading 101 /proc entries takes a while.
        let survivors = pids.iter().filter(|&&p| pid_alive(p)).count();
        // Let the tree finish dying (timeout does not wait for it) before the next sample.
        wait_for(
            "the tree to be gone",
            LIMIT,
            Duration::from_millis(1),
            || pids.iter().all(|&p| !pid_alive(p)),
        )?;
        reap_orphans();
        Ok(TreeSample {
            total,
            exited,
            survivors,
            code: code_of(st),
        })
    }
}

pub fn run(ctx: &Ctx, rep: &mut Report) -> Result<(), String> {
    let w = World::new("b3")?;
    let sb = &w.sb;
    let log = log_file(sb, "all")?;
    let runner = TreeRun {
        ctx,
        w: &w,
        log: &log,
        app: "b3.bench.localhost",
        ignore_term: false,
        grace: "10s",
    };
    let (warm, n) = (ctx.n(1, 3), ctx.n(5, 30));
    let budget = ctx.budget(25);
    let (mut t, mut b, mut t_exit, mut t_gap) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut t_surv, mut b_surv, mut bad_codes) = (0, 0, Vec::new());
    for i in 0..warm + n {
        if budget.over() && t.len() >= 10 {
            rep.note(
                "B3",
                format!("stopped by its time budget after {} pairs", t.len()),
            );
            break;
        }
        for side in pair_order(i) {
            let s = runner.once(side, i)?;
            if s.code != 143 {
                bad_codes.push(format!("{side:?}: {}", s.code));
            }
            if i < warm {
                continue;
            }
            match side {
                Side::Tether => {
                    t.push(s.total);
                    t_exit.push(s.exited);
                    t_gap.push(s.total - s.exited);
                    t_surv += s.survivors;
                }
                Side::Base => {
                    b.push(s.total);
                    b_surv += s.survivors;
                }
            }
        }
    }
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
    .with_tether(&t)
    .with_base("`timeout 60 <tree>`, SIGTERM → exited", &b)
    .median_ratio();
    let pass = row.tether.is_some_and(|s| s.median <= 50.0) && t_surv == 0 && bad_codes.is_empty();
    rep.rows.push(row.judge(pass));
    Ok(())
}
