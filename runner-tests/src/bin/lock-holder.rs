//! `lock-holder --path P --ready F [--content TEXT]`: a live holder of a lock that is not tether.
//!
//! Opens P (created 0644 if missing, never truncated, `O_NOFOLLOW`), takes an exclusive
//! `flock` on it (blocking), optionally replaces the file's content with TEXT (to pose as a
//! holder with given metadata), then writes its pid to F atomically (`F.tmp`, then rename) and
//! waits forever. F existing means the lock is held. The lock goes when the process dies —
//! exactly what tether and the janitor must rely on. Exit status 2 on bad usage, 1 on an OS error.

use std::io::{Seek, Write};

use runner_tests::helper::Cli;
use runner_tests::open_lock_file;

fn main() {
    let mut cli = Cli::new(
        "lock-holder",
        "lock-holder --path P --ready F [--content TEXT]",
    );
    let (mut path, mut ready, mut content) = (None, None, None);
    while let Some(arg) = cli.next() {
        match arg.to_str() {
            Some("--path") => path = Some(cli.path("--path")),
            Some("--ready") => ready = Some(cli.path("--ready")),
            Some("--content") => content = Some(cli.value("--content")),
            _ => cli.unexpected(&arg),
        }
    }
    let path = cli.required(path, "--path");
    let ready = cli.required(ready, "--ready");

    let mut file = open_lock_file(&path)
        .unwrap_or_else(|e| cli.fail(&format!("opening {}: {e}", path.display())));
    if let Err(e) = file.lock() {
        cli.fail(&format!("flock(LOCK_EX) {}: {e}", path.display()));
    }
    if let Some(content) = content {
        use std::os::unix::ffi::OsStrExt;
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(content.as_bytes()));
        if let Err(e) = written {
            cli.fail(&format!("writing {}: {e}", path.display()));
        }
    }

    cli.write_pid(&ready);
    loop {
        // SAFETY: pause() has no preconditions; the lock lives as long as `file` (never dropped).
        unsafe { libc::pause() };
    }
}
