//! B10 (issue 16): a holder's core SIGKILLed on one host → the waiter's command start on the
//! other: how fast the server releases a dead holder's lock and the next run starts.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::figures::hosts::{blocked, cluster, psql_lock, tether_run};
use crate::measure::{measure_pairs, Plan, Side};
use crate::report::{Report, Row};
use crate::util::{now_ns, os, read_ns, spawn, touch, wait_exit, wait_file, wait_for, LIMIT};
use crate::world::{log_file, Ctx, World};

/// What the figure measures, for the report.
pub const ABOUT: &str = "\
    on B9's hosts, per trial and app of its own: a holder on host-a (`stamp --start S --wait \
    G`), a waiter on host-b blocked on the server (`pg_locks`); the harness takes \
    CLOCK_MONOTONIC and SIGKILLs the holder's core (the process holding the session); latency \
    = the waiter's command's S − that time. Baseline: the same with bare `psql … \
    pg_advisory_lock` sessions, SIGKILL to the holding psql.";

const FIGURE: &str = "holder's core SIGKILLed → waiter's command start, other host (ms)";

struct Run {
    child: Child,
    start: PathBuf,
    gate: PathBuf,
}

pub fn run(ctx: &Ctx, rep: &mut Report) -> Result<(), String> {
    let Some(c) = cluster(ctx, rep, "B10", FIGURE) else {
        return Ok(());
    };
    let w = World::new("b10")?;
    let log = log_file(&w.sb, "all")?;
    let plan = Plan {
        id: "B10",
        warm: ctx.n(1, 3),
        n: ctx.n(5, 30),
        budget: Duration::from_secs(50),
        min_samples: 10,
        unit: "trials",
        reap: false,
    };
    let start = |side: Side, k: usize, role: &str, host: usize| -> Result<(Run, String), String> {
        let tag = if side == Side::Tether { "t" } else { "b" };
        let name = format!("b10-{tag}-{k}-{role}");
        let (s, gate) = (
            w.mark(&format!("{name}.start")),
            w.mark(&format!("{name}.gate")),
        );
        let stamp: Vec<OsString> = vec![
            os(&ctx.stamp),
            "--start".into(),
            os(&s),
            "--wait".into(),
            os(&gate),
        ];
        let h = c.host(host);
        let mut cmd = match side {
            Side::Tether => {
                let app = format!("b10-{k}.bench.localhost");
                tether_run(ctx, h, h.config(), (&app, &name), &stamp)
            }
            Side::Base => {
                let line: Vec<String> = stamp.iter().map(runner_tests::shell_quote).collect();
                let key = 10_000 + k as i64;
                psql_lock(&c, h, &name, key, &format!("exec {}", line.join(" ")))
            }
        };
        cmd.stdout(std::process::Stdio::null())
            .stderr(log.try_clone().map_err(|e| e.to_string())?);
        let child = spawn(&mut cmd)?;
        Ok((
            Run {
                child,
                start: s,
                gate,
            },
            name,
        ))
    };
    let samples = measure_pairs(ctx, rep, &plan, |side, it| {
        let k = it.index;
        let (mut holder, _) = start(side, k, "holder", 0)?;
        wait_file(&holder.start)?;
        let (mut waiter, waiter_name) = start(side, k, "waiter", 1)?;
        wait_for(
            &format!("{waiter_name} waiting for the advisory lock"),
            LIMIT,
            Duration::from_millis(1),
            || blocked(&c, &waiter_name),
        )?;
        // The process holding the session: tether's core (the front's child named tether),
        // or psql itself.
        let victim = match side {
            Side::Tether => {
                runner_tests::wait_child_named(holder.child.id() as i32, "tether", LIMIT)
            }
            Side::Base => holder.child.id() as i32,
        };
        let t_kill = now_ns();
        kill(Pid::from_raw(victim), Signal::SIGKILL).map_err(|e| format!("kill {victim}: {e}"))?;
        wait_file(&waiter.start)?;
        let lat_ns = read_ns(&waiter.start)? as i64 - t_kill as i64;
        // The killed holder's command is an orphan now: its gate ends it.
        for r in [&mut holder, &mut waiter] {
            touch(&r.gate)?;
        }
        wait_exit(&mut holder.child, LIMIT)?;
        wait_exit(&mut waiter.child, LIMIT)?;
        Ok(Some(lat_ns as f64 / 1e6))
    })?;
    let row =
        Row::new("B10", FIGURE, "p50 ≤ 50 ms").with_ab("bare `psql` session SIGKILLed", &samples);
    let pass = row.tether.is_some_and(|s| s.median <= 50.0);
    rep.rows.push(row.judge(pass));
    Ok(())
}
