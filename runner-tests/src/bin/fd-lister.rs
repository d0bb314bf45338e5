//! `fd-lister --out F`: records which file descriptors a process was started with.
//!
//! Writes one line `N -> TARGET` per open fd (from `/proc/self/fd`, sorted by number) to F
//! atomically (`F.tmp`, then rename) and exits 0. Run as tether's command (or teardown
//! command) it proves that the app lock, `run.lock` and slot fds are not inherited (SPEC §3.1).
//! The directory handle used to list `/proc/self/fd` is closed before the targets are read, so
//! it never appears in the output; the output file is opened only after the listing.
//! Exit status 2 on bad usage, 1 on an I/O error.

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::process::exit;

fn usage(msg: &str) -> ! {
    eprintln!("fd-lister: {msg}");
    eprintln!("usage: fd-lister --out F");
    exit(2)
}

fn main() {
    let mut out = None;
    let mut it = std::env::args_os().skip(1);
    while let Some(arg) = it.next() {
        match arg.to_str() {
            Some("--out") => {
                out = Some(PathBuf::from(
                    it.next().unwrap_or_else(|| usage("--out needs a value")),
                ))
            }
            _ => usage(&format!("unexpected argument {arg:?}")),
        }
    }
    let out = out.unwrap_or_else(|| usage("--out is required"));

    // List the numbers first and drop the directory handle, so its own fd is gone (its
    // readlink then fails with ENOENT and is skipped).
    let mut fds: Vec<u32> = match fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect(),
        Err(e) => {
            eprintln!("fd-lister: reading /proc/self/fd: {e}");
            exit(1)
        }
    };
    fds.sort_unstable();
    let mut listing = String::new();
    for fd in fds {
        if let Ok(target) = fs::read_link(format!("/proc/self/fd/{fd}")) {
            listing.push_str(&format!("{fd} -> {}\n", target.display()));
        }
    }

    let mut tmp = out.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written = fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(listing.as_bytes()))
        .and_then(|()| fs::rename(&tmp, &out));
    if let Err(e) = written {
        eprintln!("fd-lister: writing {}: {e}", out.display());
        exit(1);
    }
}
