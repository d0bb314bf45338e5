//! `stamp`: a benchmark command that writes CLOCK_MONOTONIC timestamps (nanoseconds, decimal)
//! to files, so latencies are measured by the commands themselves.
//!
//! ```text
//! stamp [--start F] [--excl T] [--wait M [--wait-timeout-ms N]] [--end F]
//! ```
//!
//! In this order:
//! 1. `--start F`: takes the time first thing in `main` and writes it to F;
//! 2. `--excl T`: creates T with `O_CREAT|O_EXCL` (removed again before exiting). If T already
//!    exists, another command that should have been mutually exclusive with this one is running
//!    right now: says so and exits 99 at the end (after the stamps), so overlaps are counted;
//! 3. `--wait M`: polls every 200 µs until M exists, bounded by `--wait-timeout-ms` (default
//!    60000); a timeout exits 98 without writing the end stamp;
//! 4. `--end F`: takes the time and writes it to F, then exits 0.
//!
//! Every file is written atomically (`F.tmp`, then rename), so a reader that sees F never sees
//! a partial number. The time of a stamp is taken *before* its file is written. Exit status 2
//! on bad usage, 1 on an OS error.

use std::fs;
use std::io::ErrorKind;
use std::process::exit;
use std::time::Duration;

use runner_tests::helper::Cli;
use runner_tests::poll_some_every;

fn now_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

fn main() {
    let t_start = now_ns();
    let mut cli = Cli::new(
        "stamp",
        "stamp [--start F] [--excl T] [--wait M [--wait-timeout-ms N]] [--end F]",
    );
    let (mut start, mut excl, mut wait, mut end) = (None, None, None, None);
    let mut wait_timeout = Duration::from_secs(60);
    while let Some(arg) = cli.next() {
        match arg.to_str() {
            Some("--start") => start = Some(cli.path("--start")),
            Some("--excl") => excl = Some(cli.path("--excl")),
            Some("--wait") => wait = Some(cli.path("--wait")),
            Some("--end") => end = Some(cli.path("--end")),
            Some("--wait-timeout-ms") => {
                wait_timeout = Duration::from_millis(cli.number("--wait-timeout-ms"))
            }
            _ => cli.unexpected(&arg),
        }
    }

    if let Some(start) = &start {
        cli.write_ready(start, format!("{t_start}\n"));
    }

    let mut overlapped = false;
    let mut excl_created = false;
    if let Some(token) = &excl {
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(token)
        {
            Ok(_) => excl_created = true,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                eprintln!(
                    "stamp: OVERLAP: {} exists: another exclusive command is running",
                    token.display()
                );
                overlapped = true;
            }
            Err(e) => cli.fail(&format!("creating {}: {e}", token.display())),
        }
    }

    if let Some(marker) = &wait {
        let step = Duration::from_micros(200);
        if poll_some_every(wait_timeout, step, || marker.exists().then_some(())).is_none() {
            eprintln!(
                "stamp: {} did not appear within {wait_timeout:?}",
                marker.display()
            );
            exit(98);
        }
    }

    let t_end = now_ns();
    if let Some(end) = &end {
        cli.write_ready(end, format!("{t_end}\n"));
    }
    if excl_created {
        if let Some(token) = &excl {
            let _ = fs::remove_file(token);
        }
    }
    exit(if overlapped { 99 } else { 0 })
}
