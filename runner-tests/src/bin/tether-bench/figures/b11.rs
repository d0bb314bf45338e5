//! B11 (issue 16): a partition → the holder's command killed (self-fence), and → the waiter's
//! command start on the other host; overlaps (a waiter's start before the holder's command
//! died) counted, which must be 0.

use std::ffi::OsString;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Child;
use std::time::{Duration, Instant};

use crate::figures::hosts::{cluster, tether_run};
use crate::report::{Report, Row};
use crate::util::{
    code_of, now_ns, os, read_ns, spawn, touch, wait_exit, wait_file, wait_for, LIMIT,
};
use crate::world::{log_file, log_tail, Ctx, World};

/// What the figure measures, for the report.
pub const ABOUT: &str = "\
    on B9's hosts with the default fencing knobs (heartbeat 1 s, self_fence 5 s, \
    server_release 15 s): N holders on host-a, one app each, command `stamp --start S --wait \
    <never>`; N waiters on host-b, all queued on the server; the harness takes CLOCK_MONOTONIC \
    and partitions host-a silently (IP dropped both ways, `Host::partition`). Per trial: \
    partition → the holder's command gone (a pidfd per command, polled every ms) and \
    partition → the waiter's command start (its S); an overlap is a waiter's start before its \
    holder's command was gone. The N trials run at once (one partition cuts them all off: N = \
    20, one round; 5 in quick mode).";

const KILLED: &str = "partition → holder's command killed by its self-fence (ms)";
const STARTED: &str = "partition → waiter's command start, other host (ms)";

struct Trial {
    holder: Child,
    waiter: Child,
    pidfd: OwnedFd,
    gone_ns: Option<u64>,
}

pub fn run(ctx: &Ctx, rep: &mut Report) -> Result<(), String> {
    let Some(c) = cluster(ctx, rep, "B11", KILLED) else {
        return Ok(());
    };
    let w = World::new("b11")?;
    let log = log_file(&w.sb, "all")?;
    let n = ctx.n(5, 20);
    let (a, b) = (c.host(0), c.host(1));
    let never = w.mark("b11.never");
    let stamp = runner_tests::shell_quote(&ctx.stamp);
    let mut trials = Vec::with_capacity(n);
    let mut holders = Vec::with_capacity(n);
    for k in 0..n {
        let (pid, start) = (
            w.mark(&format!("b11-{k}.pid")),
            w.mark(&format!("b11-{k}.start")),
        );
        let script = format!(
            "echo $$ > {p}.tmp && mv {p}.tmp {p} && exec {stamp} --start {s} --wait {never} \
             --wait-timeout-ms 120000",
            p = runner_tests::shell_quote(&pid),
            s = runner_tests::shell_quote(&start),
            never = runner_tests::shell_quote(&never),
        );
        let app = format!("b11-{k}.bench.localhost");
        let cmd: Vec<OsString> = vec!["sh".into(), "-c".into(), script.into()];
        let mut t = tether_run(ctx, a, a.config(), (&app, &format!("b11-a{k}")), &cmd);
        t.stdout(std::process::Stdio::null())
            .stderr(log.try_clone().map_err(|e| e.to_string())?);
        holders.push((spawn(&mut t)?, pid, start, app));
    }
    let mut waiter_starts = Vec::with_capacity(n);
    for (k, (holder, pid, start, app)) in holders.into_iter().enumerate() {
        wait_file(&start)?;
        wait_file(&pid)?;
        let pid: i32 = fs::read_to_string(&pid)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .ok_or("B11: a holder's command pid")?;
        // SAFETY: pidfd_open(2) on a live pid; returns a new fd or -1.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as libc::c_int;
        if raw < 0 {
            return Err(format!(
                "pidfd_open({pid}): {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: a fresh fd nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(raw) };
        let ws = w.mark(&format!("b11-{k}.waiter"));
        let cmd: Vec<OsString> = vec![os(&ctx.stamp), "--start".into(), os(&ws)];
        let mut t = tether_run(ctx, b, b.config(), (&app, &format!("b11-b{k}")), &cmd);
        t.stdout(std::process::Stdio::null())
            .stderr(log.try_clone().map_err(|e| e.to_string())?);
        let waiter = spawn(&mut t)?;
        trials.push(Trial {
            holder,
            waiter,
            pidfd,
            gone_ns: None,
        });
        waiter_starts.push(ws);
    }
    wait_for(
        "every waiter queued on the server",
        LIMIT,
        Duration::from_millis(5),
        || {
            c.psql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
                == n.to_string()
        },
    )?;

    let t_part = now_ns();
    a.partition();
    let until = Instant::now() + LIMIT;
    while trials.iter().any(|t| t.gone_ns.is_none()) && Instant::now() < until {
        let mut fds: Vec<libc::pollfd> = trials
            .iter()
            .map(|t| libc::pollfd {
                fd: if t.gone_ns.is_none() {
                    t.pidfd.as_raw_fd()
                } else {
                    -1
                },
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: poll(2) on pollfds we own, for at most 1 s.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        let now = now_ns();
        if ready > 0 {
            for (t, fd) in trials.iter_mut().zip(&fds) {
                if fd.revents != 0 && t.gone_ns.is_none() {
                    t.gone_ns = Some(now);
                }
            }
        }
    }
    let (mut killed, mut started, mut overlaps, mut failures) = (Vec::new(), Vec::new(), 0, 0);
    for (t, ws) in trials.iter_mut().zip(&waiter_starts) {
        let h = wait_exit(&mut t.holder, LIMIT)?;
        let wst = wait_exit(&mut t.waiter, LIMIT)?;
        if code_of(h) != 75 || !wst.success() {
            failures += 1;
            continue;
        }
        let gone = t
            .gone_ns
            .ok_or("B11: a holder's command outlived the bench's limit")?;
        let start = read_ns(ws)?;
        if start < gone {
            overlaps += 1;
        }
        killed.push((gone - t_part) as f64 / 1e6);
        started.push((start as i64 - t_part as i64) as f64 / 1e6);
    }
    a.heal();
    touch(&never)?;
    if failures > 0 {
        rep.note(
            "B11",
            format!(
                "{failures} of {n} trials did not end as expected (holder 75, waiter 0); log \
                 tail:\n    {}",
                log_tail(&w.sb, "all")
            ),
        );
    }
    rep.note(
        "B11",
        format!(
            "{n} trials at once, default knobs; overlaps (a waiter's command started before its \
             holder's command was gone): {overlaps}; the margin is the gap between the two rows"
        ),
    );
    let ok = overlaps == 0 && failures == 0;
    rep.rows.push(
        Row::new("B11", KILLED, "≤ self_fence + 1 s (6 s); 0 overlaps")
            .with_tether(&killed)
            .judge(ok && killed.iter().all(|&k| k <= 5_000.0 + 1_000.0)),
    );
    rep.rows.push(
        Row::new("B11", STARTED, "after the kill, every trial (0 overlaps)")
            .with_tether(&started)
            .judge(ok),
    );
    Ok(())
}
