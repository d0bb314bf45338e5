//! `swapper --mode flip|swap --target T [--name N] [--go F] [--stop F] [--deadline-ms MS]`:
//! a hostile local user's race loop against root's file system work (issue 13).
//!
//! - `flip`: in the current directory, make `N` a symlink to `T`, remove it, again and again:
//!   a path root is about to create flips between missing and a symlink to a victim.
//! - `swap`: in the current directory, keep an entry `e` that is swapped between a directory
//!   and a symlink to `T` (`renameat2(RENAME_EXCHANGE)`, atomic), and keep creating files, so
//!   a removal by path keeps failing with `ENOTEMPTY` and retrying on entries that change
//!   kind under it.
//!
//! `--go F` is created (in the current directory) once the loop runs. The loop ends when
//! `--stop F` exists, when the deadline passes (default 10 s), or (`swap`) when the current
//! directory is gone or no longer ours (root removed it, or took it over to remove it). Exit 0; 2 on bad usage; 1 when the loop could not even start.

use std::ffi::CString;
use std::process::exit;
use std::time::{Duration, Instant};

use runner_tests::helper::Cli;

fn main() {
    let mut cli = Cli::new(
        "swapper",
        "swapper --mode flip|swap --target T [--name N] [--go F] [--stop F] [--deadline-ms MS]",
    );
    let (mut mode, mut target, mut name, mut go, mut stop) = (None, None, None, None, None);
    let mut deadline = Duration::from_secs(10);
    while let Some(arg) = cli.next() {
        match arg.to_str() {
            Some("--mode") => mode = Some(cli.text("--mode")),
            Some("--target") => target = Some(cli.text("--target")),
            Some("--name") => name = Some(cli.text("--name")),
            Some("--go") => go = Some(cli.path("--go")),
            Some("--stop") => stop = Some(cli.path("--stop")),
            Some("--deadline-ms") => {
                let ms = cli.text("--deadline-ms");
                let ms = ms
                    .parse()
                    .unwrap_or_else(|_| cli.usage("--deadline-ms needs a number"));
                deadline = Duration::from_millis(ms);
            }
            _ => cli.unexpected(&arg),
        }
    }
    let c = |s: &str| CString::new(s).unwrap_or_else(|_| cli.usage("NUL in an argument"));
    let target = c(&cli.required(target, "--target"));
    let end = Instant::now() + deadline;
    let stopped = || stop.as_ref().is_some_and(|s| s.exists()) || Instant::now() >= end;
    let mut announced = false;
    let mut announce = || {
        if let (Some(go), false) = (&go, announced) {
            announced = true;
            let _ = std::fs::write(go, b"");
        }
    };
    match mode.as_deref() {
        Some("flip") => {
            let name = c(&name.unwrap_or_else(|| cli.usage("--name is required for flip")));
            while !stopped() {
                // SAFETY: symlink/unlink with valid NUL-terminated strings.
                unsafe {
                    libc::symlink(target.as_ptr(), name.as_ptr());
                    announce();
                    libc::unlink(name.as_ptr());
                }
            }
        }
        Some("swap") => {
            let (e, other) = (c("e"), c("e.other"));
            // SAFETY: plain syscalls with valid NUL-terminated strings.
            unsafe {
                if libc::mkdir(e.as_ptr(), 0o755) != 0
                    || libc::symlink(target.as_ptr(), other.as_ptr()) != 0
                {
                    eprintln!(
                        "swapper: cannot set up: {}",
                        std::io::Error::last_os_error()
                    );
                    exit(1);
                }
            }
            // SAFETY: opening the current directory; the fd pins it for the checks below.
            let here = unsafe {
                libc::open(
                    c".".as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            };
            let mut n = 0u64;
            loop {
                n += 1;
                // The swap itself runs flat out; the rest only every so often, so the entry
                // changes kind as often as the kernel allows.
                // SAFETY: renameat2 on two names of the current directory.
                let exchanged = unsafe {
                    libc::renameat2(
                        libc::AT_FDCWD,
                        e.as_ptr(),
                        libc::AT_FDCWD,
                        other.as_ptr(),
                        libc::RENAME_EXCHANGE,
                    ) == 0
                };
                if exchanged && !n.is_multiple_of(64) {
                    continue;
                }
                if stopped() {
                    break;
                }
                let filler = c(&format!("f{n}"));
                // SAFETY: plain syscalls with valid NUL-terminated strings and a stat buffer.
                let gone = unsafe {
                    if !exchanged {
                        // Root removed one of them: put them back.
                        libc::mkdir(e.as_ptr(), 0o755);
                        libc::symlink(target.as_ptr(), other.as_ptr());
                    }
                    let fd = libc::open(
                        filler.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o644,
                    );
                    if fd >= 0 {
                        libc::close(fd);
                    }
                    announce();
                    // Removed (no links left), or taken from us (no more access): done.
                    let mut st: libc::stat = std::mem::zeroed();
                    fd < 0
                        && (libc::fstat(here, &mut st) != 0
                            || st.st_nlink == 0
                            || st.st_uid != libc::geteuid())
                };
                if gone {
                    break;
                }
            }
        }
        _ => cli.usage("--mode flip|swap is required"),
    }
}
