//! `fd-lister --out F`: records which file descriptors a process was started with.
//!
//! Writes one line `N -> TARGET` per open fd (from `/proc/self/fd`, sorted by number) to F
//! atomically (`F.tmp`, then rename) and exits 0. Run as tether's command (or teardown
//! command) it proves that the app lock, `run.lock` and slot fds are not inherited (CLI-CONTRACT §5).
//! The directory handle used to list `/proc/self/fd` is closed before the targets are read, so
//! it never appears in the output; the output file is opened only after the listing.
//! Exit status 2 on bad usage, 1 on an I/O error.

use std::fs;

use runner_tests::helper::Cli;

fn main() {
    let mut cli = Cli::new("fd-lister", "fd-lister --out F");
    let mut out = None;
    while let Some(arg) = cli.next() {
        match arg.to_str() {
            Some("--out") => out = Some(cli.path("--out")),
            _ => cli.unexpected(&arg),
        }
    }
    let out = cli.required(out, "--out");

    // List the numbers first and drop the directory handle, so its own fd is gone (its
    // readlink then fails with ENOENT and is skipped).
    let mut fds: Vec<u32> = match fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect(),
        Err(e) => cli.fail(&format!("reading /proc/self/fd: {e}")),
    };
    fds.sort_unstable();
    let mut listing = String::new();
    for fd in fds {
        if let Ok(target) = fs::read_link(format!("/proc/self/fd/{fd}")) {
            listing.push_str(&format!("{fd} -> {}\n", target.display()));
        }
    }
    cli.write_ready(&out, listing);
}
