//! B9 (issue 16): cross-host handoff — the holder's command end → the waiter's command start,
//! the waiter on the other host (network namespace), through the cluster lock.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use crate::figures::hosts::{blocked, cluster, psql_lock, tether_run};
use crate::measure::{measure_pairs, Plan, Side};
use crate::report::{Report, Row};
use crate::util::{code_of, os, read_ns, spawn, touch, wait_exit, wait_file, wait_for, LIMIT};
use crate::world::{log_file, log_tail, Ctx, World};

/// What the figure measures, for the report.
pub const ABOUT: &str = "\
    B2's chain across hosts: two network-namespace hosts (their own lock and runs dirs, host \
    names) and a PostgreSQL 15 server in a third namespace, reached over veth pairs \
    (`runner_tests::netns`). Runs of one app alternate between the hosts; each command is \
    `stamp --start S --wait G --end E`; the next run (on the other host) is started, the \
    harness waits until its session waits for the advisory lock on the server (`pg_locks`, \
    not granted), then creates G; latency = next S − this E. Baseline: the same chain of bare \
    `psql -c 'SELECT pg_advisory_lock(K)' -c '\\! stamp …'` sessions on the same hosts (the \
    lock released by psql's exit), interleaved handoff by handoff.";

const FIGURE: &str = "cross-host handoff: holder's command end → waiter's command start (ms)";

struct Link {
    child: Child,
    start: PathBuf,
    gate: PathBuf,
    end: PathBuf,
}

pub fn run(ctx: &Ctx, rep: &mut Report) -> Result<(), String> {
    let Some(c) = cluster(ctx, rep, "B9", FIGURE) else {
        return Ok(());
    };
    let w = World::new("b9")?;
    let (log_t, log_b) = (log_file(&w.sb, "tether")?, log_file(&w.sb, "base")?);
    let app = "b9.bench.localhost";
    let plan = Plan {
        id: "B9",
        warm: ctx.n(2, 5),
        n: ctx.n(10, 100),
        budget: Duration::from_secs(60),
        min_samples: 30,
        unit: "handoffs",
        reap: false,
    };
    let name = |side: Side, k: usize| match side {
        Side::Tether => format!("b9-{k}"),
        Side::Base => format!("b9-base-{k}"),
    };
    let start_link = |side: Side, k: usize| -> Result<Link, String> {
        let tag = if side == Side::Tether { "t" } else { "b" };
        let m = |what: &str| w.mark(&format!("b9-{tag}-{k}.{what}"));
        let (start, gate, end) = (m("start"), m("gate"), m("end"));
        let stamp: Vec<OsString> = vec![
            os(&ctx.stamp),
            "--start".into(),
            os(&start),
            "--wait".into(),
            os(&gate),
            "--end".into(),
            os(&end),
        ];
        let h = c.host(k % 2);
        let mut cmd = match side {
            Side::Tether => {
                let mut cmd = tether_run(ctx, h, h.config(), (app, &name(side, k)), &stamp);
                cmd.stderr(log_t.try_clone().map_err(|e| e.to_string())?);
                cmd
            }
            Side::Base => {
                let line: Vec<String> = stamp.iter().map(runner_tests::shell_quote).collect();
                let mut cmd = psql_lock(
                    &c,
                    h,
                    &name(side, k),
                    4242,
                    &format!("exec {}", line.join(" ")),
                );
                cmd.stderr(log_b.try_clone().map_err(|e| e.to_string())?);
                cmd
            }
        };
        cmd.stdout(std::process::Stdio::null());
        let child = spawn(&mut cmd)?;
        Ok(Link {
            child,
            start,
            gate,
            end,
        })
    };

    let mut cur_t = start_link(Side::Tether, 0)?;
    wait_file(&cur_t.start)?;
    let mut cur_b = start_link(Side::Base, 0)?;
    wait_file(&cur_b.start)?;
    let samples = measure_pairs(ctx, rep, &plan, |side, it| {
        let k = it.index;
        let cur = match side {
            Side::Tether => &mut cur_t,
            Side::Base => &mut cur_b,
        };
        let next = start_link(side, k + 1)?;
        let waiter = name(side, k + 1);
        wait_for(
            &format!("{waiter} waiting for the advisory lock"),
            LIMIT,
            Duration::from_millis(1),
            || blocked(&c, &waiter),
        )?;
        touch(&cur.gate)?;
        let st = wait_exit(&mut cur.child, LIMIT)?;
        if !st.success() {
            let log = if side == Side::Tether {
                "tether"
            } else {
                "base"
            };
            return Err(format!(
                "B9 {side:?} holder {k} exited {}; log tail:\n    {}",
                code_of(st),
                log_tail(&w.sb, log)
            ));
        }
        wait_file(&next.start)?;
        let lat_ns = read_ns(&next.start)? as i64 - read_ns(&cur.end)? as i64;
        *cur = next;
        Ok(Some(lat_ns as f64 / 1e6))
    })?;
    for cur in [&mut cur_t, &mut cur_b] {
        touch(&cur.gate)?;
        wait_exit(&mut cur.child, LIMIT)?;
    }
    let row = Row::new("B9", FIGURE, "p50 ≤ 5 ms, p99 ≤ 20 ms")
        .with_ab("bare `psql` `pg_advisory_lock` chain", &samples);
    let pass = row.tether.is_some_and(|s| s.median <= 5.0 && s.p99 <= 20.0);
    rep.rows.push(row.judge(pass));
    Ok(())
}
