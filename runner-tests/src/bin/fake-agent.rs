//! `fake-agent --ready F --log L [--stderr-file E] [--socket] -- PROGRAM [ARGS...]`: a CI agent
//! that collects a step's output, as Buildbot's worker does.
//!
//! Starts PROGRAM (usually `sh -c "<step>"`) with stdout and stderr on one pipe (with
//! `--socket`: one end of a Unix stream socket pair) whose read end only this process holds;
//! with `--stderr-file E` stderr goes to the file E instead, so only stdout is on the pipe.
//! Writes `<own pid>\n<PROGRAM's pid>\n` to F atomically (`F.tmp`, then rename), then copies
//! everything it reads to L until end of file, reaps PROGRAM and exits with its status.
//! SIGKILLing this process closes the read end: that is the agent's death tether must notice.
//! Exit status 2 on bad usage, 1 on an OS error.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{exit, Command, Stdio};

fn usage(msg: &str) -> ! {
    eprintln!("fake-agent: {msg}");
    eprintln!(
        "usage: fake-agent --ready F --log L [--stderr-file E] [--socket] -- PROGRAM [ARGS...]"
    );
    exit(2)
}

fn fail(what: &str, path: &Path, e: std::io::Error) -> ! {
    eprintln!("fake-agent: {what} {}: {e}", path.display());
    exit(1)
}

fn main() {
    let (mut ready, mut log, mut stderr_file, mut socket) = (None, None, None, false);
    let mut program: Vec<OsString> = Vec::new();
    let mut it = std::env::args_os().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{arg:?} needs a value")))
        };
        match arg.to_str() {
            Some("--ready") => ready = Some(PathBuf::from(value())),
            Some("--log") => log = Some(PathBuf::from(value())),
            Some("--stderr-file") => stderr_file = Some(PathBuf::from(value())),
            Some("--socket") => socket = true,
            Some("--") => {
                program.extend(it.by_ref());
                break;
            }
            _ => usage(&format!("unexpected argument {arg:?}")),
        }
    }
    let ready = ready.unwrap_or_else(|| usage("--ready is required"));
    let log = log.unwrap_or_else(|| usage("--log is required"));
    let Some((prog, args)) = program.split_first() else {
        usage("a program is required after --")
    };

    // Both ends are close-on-exec: after the spawn only this process holds the read end.
    let (mut reader, writer): (Box<dyn Read>, OwnedFd) = if socket {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .unwrap_or_else(|e| fail("socketpair for", &log, e));
        (Box::new(ours), theirs.into())
    } else {
        let (ours, theirs) = std::io::pipe().unwrap_or_else(|e| fail("pipe for", &log, e));
        (Box::new(ours), theirs.into())
    };
    let stderr = match &stderr_file {
        Some(path) => Stdio::from(File::create(path).unwrap_or_else(|e| fail("creating", path, e))),
        None => Stdio::from(
            writer
                .try_clone()
                .unwrap_or_else(|e| fail("dup of the pipe for", &log, e)),
        ),
    };
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer))
        .stderr(stderr);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| fail("spawning", Path::new(prog), e));
    // The write ends now live only in the child (and what it starts).
    drop(cmd);

    let mut out = File::create(&log).unwrap_or_else(|e| fail("creating", &log, e));
    let mut tmp = ready.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written = File::create(&tmp)
        .and_then(|mut f| writeln!(f, "{}\n{}", std::process::id(), child.id()))
        .and_then(|()| fs::rename(&tmp, &ready));
    if let Err(e) = written {
        fail("writing", &ready, e);
    }

    // Read until every writer is gone, as an agent does; copy it so a test can look.
    let mut buf = [0u8; 4096];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Err(e) = out.write_all(&buf[..n]) {
                    fail("writing", &log, e);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => fail("reading the step's output for", &log, e),
        }
    }
    let status = child
        .wait()
        .unwrap_or_else(|e| fail("waiting for", Path::new(prog), e));
    exit(
        status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(1),
    )
}
