//! `lock-holder --path P --ready F [--content TEXT]`: a live holder of a lock that is not tether.
//!
//! Opens P (created 0644 if missing, never truncated, `O_NOFOLLOW`), takes an exclusive
//! `flock` on it (blocking), optionally replaces the file's content with TEXT (to pose as a
//! holder with given metadata), then writes its pid to F atomically (`F.tmp`, then rename) and
//! waits forever. F existing means the lock is held. The lock goes when the process dies —
//! exactly what tether and the janitor must rely on. Exit status 2 on bad usage, 1 on an OS error.

use std::fs::{self, OpenOptions};
use std::io::{Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::exit;

fn usage(msg: &str) -> ! {
    eprintln!("lock-holder: {msg}");
    eprintln!("usage: lock-holder --path P --ready F [--content TEXT]");
    exit(2)
}

fn fail(what: &str, path: &std::path::Path, e: std::io::Error) -> ! {
    eprintln!("lock-holder: {what} {}: {e}", path.display());
    exit(1)
}

fn main() {
    let (mut path, mut ready, mut content) = (None, None, None);
    let mut it = std::env::args_os().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{arg:?} needs a value")))
        };
        match arg.to_str() {
            Some("--path") => path = Some(PathBuf::from(value())),
            Some("--ready") => ready = Some(PathBuf::from(value())),
            Some("--content") => content = Some(value()),
            _ => usage(&format!("unexpected argument {arg:?}")),
        }
    }
    let path = path.unwrap_or_else(|| usage("--path is required"));
    let ready = ready.unwrap_or_else(|| usage("--ready is required"));

    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .unwrap_or_else(|e| fail("opening", &path, e));
    if let Err(e) = file.lock() {
        fail("flock(LOCK_EX)", &path, e);
    }
    if let Some(content) = content {
        use std::os::unix::ffi::OsStrExt;
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(content.as_bytes()));
        if let Err(e) = written {
            fail("writing", &path, e);
        }
    }

    let mut tmp = ready.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written = fs::File::create(&tmp)
        .and_then(|mut f| writeln!(f, "{}", std::process::id()))
        .and_then(|()| fs::rename(&tmp, &ready));
    if let Err(e) = written {
        fail("writing", &ready, e);
    }
    loop {
        // SAFETY: pause() has no preconditions; the lock lives as long as `file` (never dropped).
        unsafe { libc::pause() };
    }
}
