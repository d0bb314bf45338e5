//! What B3 and B4 share: one run of a 100-process tree under tether or timeout(1), SIGTERMed
//! once it is ready.

use std::ffi::OsString;
use std::fs::File;
use std::time::{Duration, Instant};

use runner_tests::pid_alive;

use crate::measure::Side;
use crate::util::{
    code_of, lock_free, ms, os, read_pids, reap_orphans, spawn, term, wait_exit, wait_for, LIMIT,
};
use crate::world::{log_file, Ctx, World};

pub struct TreeSample {
    /// SIGTERM → (tether: exited and lockfile free; timeout: exited), ms.
    pub total: f64,
    /// SIGTERM → exited (waitpid), ms.
    pub exited: f64,
    /// Processes of the tree still alive (not zombies) when the front exited.
    pub survivors: usize,
    pub code: i32,
}

/// Runs of `tree-helper --children 100` in a world of their own: app `<tag>.bench.localhost`,
/// run ids `<tag>-<i>`, one log for both sides.
pub struct TreeRun<'a> {
    ctx: &'a Ctx,
    w: World,
    log: File,
    app: String,
    ignore_term: bool,
    grace: &'static str,
}

impl<'a> TreeRun<'a> {
    /// `ignore_term`: the tree ignores SIGTERM; `grace`: tether's `--grace`.
    pub fn new(
        ctx: &'a Ctx,
        tag: &str,
        ignore_term: bool,
        grace: &'static str,
    ) -> Result<TreeRun<'a>, String> {
        let w = World::new(tag)?;
        let log = log_file(&w.sb, "all")?;
        Ok(TreeRun {
            ctx,
            w,
            log,
            app: format!("{tag}.bench.localhost"),
            ignore_term,
            grace,
        })
    }

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
                    &self.log,
                    (&self.app, &id),
                    &["--grace", self.grace],
                    &tree,
                )
            }
            Side::Base => {
                let mut c = self.ctx.command("timeout", &self.log);
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
                let lock = self.w.dirs.lock_path(&self.app);
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
