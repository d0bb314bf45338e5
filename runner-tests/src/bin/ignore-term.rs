//! `ignore-term --ready F`: a command that shrugs off SIGTERM, so tether must escalate to
//! SIGKILL after `--grace`.
//!
//! Sets SIGTERM to SIG_IGN, then writes its pid to F atomically (`F.tmp`, then rename) — F
//! existing means the disposition is already in place — and pauses forever.
//! Exit status 2 on bad usage, 1 on an OS error.

use runner_tests::helper::Cli;

fn main() {
    let mut cli = Cli::new("ignore-term", "ignore-term --ready F");
    let mut ready = None;
    while let Some(arg) = cli.next() {
        match arg.to_str() {
            Some("--ready") => ready = Some(cli.path("--ready")),
            _ => cli.unexpected(&arg),
        }
    }
    let ready = cli.required(ready, "--ready");

    // SAFETY: setting a disposition to SIG_IGN is always sound.
    if unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) } == libc::SIG_ERR {
        cli.fail(&format!(
            "signal(SIGTERM, SIG_IGN): {}",
            std::io::Error::last_os_error()
        ));
    }

    cli.write_pid(&ready);
    loop {
        // SAFETY: pause() has no preconditions.
        unsafe { libc::pause() };
    }
}
