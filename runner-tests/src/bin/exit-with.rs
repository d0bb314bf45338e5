//! `exit-with --code N` / `exit-with --signal N`: ends with a chosen status, for exit-code
//! pass-through tests (CLI-CONTRACT §7).
//!
//! `--code N` exits with status N. `--signal N` restores the default disposition of signal N,
//! unblocks it and raises it on itself, so the process dies *by* that signal (the parent sees
//! WIFSIGNALED, and tether must report 128+N). If the signal's default action does not kill
//! (e.g. SIGCHLD), it exits 1 with a message. Exit status 2 on bad usage.

use std::process::exit;

use runner_tests::helper::Cli;

fn main() {
    let mut cli = Cli::new("exit-with", "exit-with --code N | exit-with --signal N");
    let flag = cli
        .next()
        .unwrap_or_else(|| cli.usage("missing --code or --signal"));
    let flag = flag.to_str().unwrap_or("");
    let value = cli.next();
    let n: i32 = cli.parse_number(value, flag);
    if let Some(extra) = cli.next() {
        cli.unexpected(&extra);
    }
    match flag {
        "--code" => exit(n),
        "--signal" => {
            // SAFETY: plain libc calls on a signal number; an invalid number makes them fail,
            // which is reported below.
            unsafe {
                libc::signal(n, libc::SIG_DFL);
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, n);
                libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                if libc::raise(n) != 0 {
                    eprintln!("exit-with: raise({n}): {}", std::io::Error::last_os_error());
                    exit(1);
                }
            }
            eprintln!("exit-with: signal {n} did not terminate the process");
            exit(1)
        }
        _ => cli.usage(&format!("unexpected argument {flag:?}")),
    }
}
