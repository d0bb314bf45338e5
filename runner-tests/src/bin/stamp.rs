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
use std::path::{Path, PathBuf};
use std::process::exit;
use std::time::{Duration, Instant};

fn now_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

fn usage(msg: &str) -> ! {
    eprintln!("stamp: {msg}");
    eprintln!("usage: stamp [--start F] [--excl T] [--wait M [--wait-timeout-ms N]] [--end F]");
    exit(2)
}

fn write_atomic(path: &Path, ns: u128) {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    if let Err(e) = fs::write(&tmp, format!("{ns}\n")).and_then(|()| fs::rename(&tmp, path)) {
        eprintln!("stamp: writing {}: {e}", path.display());
        exit(1);
    }
}

fn main() {
    let t_start = now_ns();
    let (mut start, mut excl, mut wait, mut end) = (None, None, None, None);
    let mut wait_timeout = Duration::from_secs(60);
    let mut it = std::env::args_os().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{arg:?} needs a value")))
        };
        match arg.to_str() {
            Some("--start") => start = Some(PathBuf::from(value())),
            Some("--excl") => excl = Some(PathBuf::from(value())),
            Some("--wait") => wait = Some(PathBuf::from(value())),
            Some("--end") => end = Some(PathBuf::from(value())),
            Some("--wait-timeout-ms") => {
                let ms = value()
                    .to_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| usage("--wait-timeout-ms takes a number"));
                wait_timeout = Duration::from_millis(ms);
            }
            _ => usage(&format!("unexpected argument {arg:?}")),
        }
    }

    if let Some(start) = &start {
        write_atomic(start, t_start);
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
            Err(e) => {
                eprintln!("stamp: creating {}: {e}", token.display());
                exit(1);
            }
        }
    }

    if let Some(marker) = &wait {
        let until = Instant::now() + wait_timeout;
        while !marker.exists() {
            if Instant::now() >= until {
                eprintln!(
                    "stamp: {} did not appear within {wait_timeout:?}",
                    marker.display()
                );
                exit(98);
            }
            std::thread::sleep(Duration::from_micros(200)); // bounded poll for the marker
        }
    }

    let t_end = now_ns();
    if let Some(end) = &end {
        write_atomic(end, t_end);
    }
    if excl_created {
        if let Some(token) = &excl {
            let _ = fs::remove_file(token);
        }
    }
    exit(if overlapped { 99 } else { 0 })
}
