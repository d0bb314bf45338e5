//! B6: peak memory.

use std::fs;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::measure::{measure, Plan, Side};
use crate::report::{Report, Row};
use crate::util::{children_of, code_of, proc_kb, spawn, LIMIT, MIB};
use crate::world::{log_file, Ctx, World};

/// What the figure measures, for the report.
pub const ABOUT: &str = "\
    peak memory of tether's own processes (front + core) during `tether run -- sleep 1`, vs \
    flock(1) and a minimal python3 harness, all three running side by side.";

pub const PY_HARNESS: &str = r#"# minimal flock + prctl harness (baseline of tether-bench B6)
import ctypes, fcntl, os, signal, subprocess, sys
PR_SET_PDEATHSIG = 1
libc = ctypes.CDLL(None, use_errno=True)
def _child():
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
proc = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_child)
rc = proc.wait()
sys.exit(rc if rc >= 0 else 128 - rc)
"#;

/// The high-water mark of one process's resident set, as last seen alive.
#[derive(Default, Clone, Copy)]
pub struct Mem {
    pub hwm: u64,
}

impl Mem {
    pub fn sample(&mut self, pid: u32) {
        if let Some(h) = proc_kb(pid, "status", "VmHWM:") {
            self.hwm = self.hwm.max(h);
        }
    }
}

pub fn run(ctx: &Ctx, rep: &mut Report) -> Result<(), String> {
    let w = World::new("b6")?;
    let sb = &w.sb;
    let log = log_file(sb, "all")?;
    let py_script = sb.path().join("harness.py");
    fs::write(&py_script, PY_HARNESS).map_err(|e| format!("writing the python harness: {e}"))?;
    let app = "b6.bench.localhost";
    let plan = Plan {
        id: "B6",
        warm: ctx.n(1, 1),
        n: ctx.n(3, 30),
        budget: Duration::from_secs(40),
        min_samples: 10,
        unit: "runs",
        reap: true,
    };
    // Samples: peak RSS of tether (front + core) and of flock(1); the rest aside.
    let (mut t_pss, mut f_pss, mut p_hwm, mut p_pss) = (vec![], vec![], vec![], vec![]);
    let samples = measure(ctx, rep, &plan, |it, samples| {
        let i = it.index;
        // The three run side by side (memory does not depend on the order); the spawn order
        // rotates.
        let mut cmds: Vec<(usize, Command)> = Vec::new();
        cmds.push((
            0,
            ctx.tether_run(
                &w.dirs,
                &log,
                (app, &format!("b6-{i}")),
                &[],
                &["sleep", "1"],
            ),
        ));
        let mut c = ctx.command("flock", &log);
        c.arg(w.lock("b6-flock.lock")).args(["sleep", "1"]);
        cmds.push((1, c));
        if let Some(py) = &ctx.python {
            let mut c = ctx.command(py, &log);
            c.arg(&py_script)
                .arg(w.lock("b6-py.lock"))
                .args(["sleep", "1"]);
            cmds.push((2, c));
        }
        let len = cmds.len();
        cmds.rotate_left(i % len);
        let mut children: Vec<(usize, Child)> = Vec::new();
        for (k, mut c) in cmds {
            children.push((k, spawn(&mut c)?));
        }
        let (mut front, mut core, mut flock, mut py) = (
            Mem::default(),
            Mem::default(),
            Mem::default(),
            Mem::default(),
        );
        let (mut pss_t, mut pss_f, mut pss_p) = (0u64, 0u64, 0u64);
        let mut core_pid = None;
        let mut done = vec![false; children.len()];
        let deadline = Instant::now() + LIMIT;
        while done.iter().any(|d| !d) {
            for (j, (k, child)) in children.iter_mut().enumerate() {
                if done[j] {
                    continue;
                }
                let pid = child.id();
                match k {
                    0 => {
                        front.sample(pid);
                        if core_pid.is_none() {
                            core_pid = children_of(pid).first().copied();
                        }
                        let mut pss = proc_kb(pid, "smaps_rollup", "Pss:").unwrap_or(0);
                        if let Some(c) = core_pid {
                            core.sample(c);
                            pss += proc_kb(c, "smaps_rollup", "Pss:").unwrap_or(0);
                        }
                        pss_t = pss_t.max(pss);
                    }
                    1 => {
                        flock.sample(pid);
                        pss_f = pss_f.max(proc_kb(pid, "smaps_rollup", "Pss:").unwrap_or(0));
                    }
                    _ => {
                        py.sample(pid);
                        pss_p = pss_p.max(proc_kb(pid, "smaps_rollup", "Pss:").unwrap_or(0));
                    }
                }
                match child.try_wait() {
                    Ok(Some(st)) if st.success() => done[j] = true,
                    Ok(Some(st)) => {
                        return Err(format!("B6 process {k} exited {}", code_of(st)));
                    }
                    Ok(None) => {}
                    Err(e) => return Err(format!("B6: waiting: {e}")),
                }
            }
            if Instant::now() >= deadline {
                return Err("B6: a run of `sleep 1` did not finish in time".to_owned());
            }
            std::thread::sleep(Duration::from_millis(5)); // sampling period // ordering-free
        }
        if core_pid.is_none() {
            return Err("B6: never saw tether's core process".to_owned());
        }
        samples.record(it, Side::Tether, (front.hwm + core.hwm) as f64 / MIB);
        samples.record(it, Side::Base, flock.hwm as f64 / MIB);
        if !it.warm_up {
            t_pss.push(pss_t as f64 / MIB);
            f_pss.push(pss_f as f64 / MIB);
            if ctx.python.is_some() {
                p_hwm.push(py.hwm as f64 / MIB);
                p_pss.push(pss_p as f64 / MIB);
            }
        }
        Ok(())
    })?;
    rep.note(
        "B6",
        "sampled every 5 ms from /proc during a run of `sleep 1` (the command itself is not \
         counted): tether = VmHWM of the front + VmHWM of the core (a shared page counts twice, \
         so this over-states the tree); flock(1) = the flock process; python = the python3 \
         process running a minimal fcntl.flock + ctypes prctl(PR_SET_PDEATHSIG) + subprocess \
         harness. PSS rows (shared pages split between sharers) are information only.",
    );
    let target = "max ≤ 6 MiB";
    let judge = |row: Row| {
        let pass = row.tether.is_some_and(|s| s.max <= 6.0);
        row.judge(pass)
    };
    rep.rows.push(judge(
        Row::new("B6", "peak RSS, tether front + core (MiB)", target).with_ab("flock(1)", &samples),
    ));
    if ctx.python.is_some() {
        rep.rows.push(judge(
            Row::new("B6", "peak RSS, tether front + core (MiB)", target)
                .with_tether(&samples.tether)
                .with_base("python3 flock+prctl harness", &p_hwm)
                .median_ratio(),
        ));
    }
    rep.rows.push(
        Row::new("B6", "peak PSS, tether front + core (MiB)", "—")
            .with_tether(&t_pss)
            .with_base("flock(1)", &f_pss)
            .median_ratio(),
    );
    if ctx.python.is_some() {
        rep.rows.push(
            Row::new("B6", "peak PSS, tether front + core (MiB)", "—")
                .with_tether(&t_pss)
                .with_base("python3 flock+prctl harness", &p_pss)
                .median_ratio(),
        );
    }
    Ok(())
}
