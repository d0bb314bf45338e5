//! `ignore-term --ready F`: a command that shrugs off SIGTERM, so tether must escalate to
//! SIGKILL after `--grace`.
//!
//! Sets SIGTERM to SIG_IGN, then writes its pid to F atomically (`F.tmp`, then rename) — F
//! existing means the disposition is already in place — and pauses forever.
//! Exit status 2 on bad usage, 1 on an OS error.

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::process::exit;

fn usage(msg: &str) -> ! {
    eprintln!("ignore-term: {msg}");
    eprintln!("usage: ignore-term --ready F");
    exit(2)
}

fn main() {
    let mut ready = None;
    let mut it = std::env::args_os().skip(1);
    while let Some(arg) = it.next() {
        match arg.to_str() {
            Some("--ready") => {
                ready = Some(PathBuf::from(
                    it.next().unwrap_or_else(|| usage("--ready needs a value")),
                ))
            }
            _ => usage(&format!("unexpected argument {arg:?}")),
        }
    }
    let ready = ready.unwrap_or_else(|| usage("--ready is required"));

    // SAFETY: setting a disposition to SIG_IGN is always sound.
    if unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) } == libc::SIG_ERR {
        eprintln!(
            "ignore-term: signal(SIGTERM, SIG_IGN): {}",
            std::io::Error::last_os_error()
        );
        exit(1);
    }

    let mut tmp = ready.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written = fs::File::create(&tmp)
        .and_then(|mut f| writeln!(f, "{}", std::process::id()))
        .and_then(|()| fs::rename(&tmp, &ready));
    if let Err(e) = written {
        eprintln!("ignore-term: writing {}: {e}", ready.display());
        exit(1);
    }
    loop {
        // SAFETY: pause() has no preconditions.
        unsafe { libc::pause() };
    }
}
