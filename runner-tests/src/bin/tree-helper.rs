//! `tree-helper`: a command that builds a process tree shaped like the ones tether must kill.
//!
//! ```text
//! tree-helper --pids-file F [--children N] [--setsid] [--double-fork] [--ignore-term]
//! ```
//!
//! Starts `N` (default 3) plain children, plus with `--setsid` one child that leaves the process
//! group and session (`setsid()`), plus with `--double-fork` one grandchild whose parent exits at
//! once (the grandchild is orphaned and re-parented to the nearest subreaper — tether's core, when
//! run under tether). Every process pauses forever. With `--ignore-term` all of them, this one
//! included, ignore SIGTERM (set before forking, so the children inherit it), which forces tether
//! to escalate to SIGKILL.
//!
//! Readiness: each child reports `<role> <pid>` on a pipe once it is set up (after `setsid()`);
//! the parent reads the pipe to EOF (every write end closed = every child reported or died), then
//! writes all live pids to F atomically (`F.tmp`, then rename), one per line, in a fixed order:
//! its own pid, the plain children, the setsid child, the double-fork grandchild. No sleeps.
//! Exit status 2 on bad usage, 1 when the tree could not be built.

use std::fs;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::exit;

use runner_tests::helper::Cli;

struct Args {
    pids_file: PathBuf,
    children: usize,
    setsid: bool,
    double_fork: bool,
    ignore_term: bool,
}

fn parse_args(cli: &mut Cli) -> Args {
    let mut pids_file = None;
    let mut children = 3usize;
    let (mut setsid, mut double_fork, mut ignore_term) = (false, false, false);
    while let Some(arg) = cli.next() {
        match arg.to_str() {
            Some("--pids-file") => pids_file = Some(cli.path("--pids-file")),
            Some("--children") => children = cli.number("--children"),
            Some("--setsid") => setsid = true,
            Some("--double-fork") => double_fork = true,
            Some("--ignore-term") => ignore_term = true,
            _ => cli.unexpected(&arg),
        }
    }
    Args {
        pids_file: cli.required(pids_file, "--pids-file"),
        children,
        setsid,
        double_fork,
        ignore_term,
    }
}

/// Never returns: the body of every process of the tree once it is ready.
fn pause_forever() -> ! {
    loop {
        // SAFETY: pause() has no preconditions.
        unsafe { libc::pause() };
    }
}

/// Reports `<role> <pid>\n` on the pipe (one write, < PIPE_BUF, so atomic) and closes it.
fn report(write_fd: libc::c_int, role: &str) {
    let line = format!("{role} {}\n", std::process::id());
    // SAFETY: write_fd is the pipe's write end, owned by this process after fork.
    let n = unsafe { libc::write(write_fd, line.as_ptr().cast(), line.len()) };
    if n != line.len() as isize {
        // SAFETY: _exit is async-signal-safe and always fine in a forked child.
        unsafe { libc::_exit(1) };
    }
    // SAFETY: closing our copy of the write end so the parent sees EOF once all reported.
    unsafe { libc::close(write_fd) };
}

/// Forks; in the child closes `close_in_child` (the pipe's read end, if still open) and runs
/// `body`, which is expected never to return (the child `_exit(1)`s if it does).
fn fork_child(close_in_child: Option<libc::c_int>, body: impl FnOnce()) -> libc::pid_t {
    // SAFETY: this program is single-threaded, so the child may run arbitrary code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        eprintln!("tree-helper: fork: {}", std::io::Error::last_os_error());
        exit(1);
    }
    if pid == 0 {
        if let Some(fd) = close_in_child {
            // SAFETY: the child's copy of the read end is not needed.
            unsafe { libc::close(fd) };
        }
        body();
        // SAFETY: _exit in a forked child skips the parent's atexit handlers.
        unsafe { libc::_exit(1) }
    }
    pid
}

fn main() {
    let mut cli = Cli::new(
        "tree-helper",
        "tree-helper --pids-file F [--children N] [--setsid] [--double-fork] [--ignore-term]",
    );
    let args = parse_args(&mut cli);

    if args.ignore_term {
        // SAFETY: setting a disposition to SIG_IGN is always sound; inherited by forks.
        if unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) } == libc::SIG_ERR {
            eprintln!(
                "tree-helper: signal(SIGTERM, SIG_IGN): {}",
                std::io::Error::last_os_error()
            );
            exit(1);
        }
    }

    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        eprintln!("tree-helper: pipe: {}", std::io::Error::last_os_error());
        exit(1);
    }
    let (read_fd, write_fd) = (fds[0], fds[1]);

    for _ in 0..args.children {
        fork_child(Some(read_fd), || {
            report(write_fd, "child");
            pause_forever()
        });
    }
    if args.setsid {
        fork_child(Some(read_fd), || {
            // SAFETY: setsid() has no memory-safety preconditions; a forked child is never a
            // process group leader, so it succeeds.
            if unsafe { libc::setsid() } < 0 {
                unsafe { libc::_exit(1) };
            }
            report(write_fd, "setsid");
            pause_forever()
        });
    }
    if args.double_fork {
        let middle = fork_child(Some(read_fd), || {
            fork_child(None, || {
                report(write_fd, "orphan");
                pause_forever()
            });
            // The middle process exits at once: the grandchild is orphaned.
            // SAFETY: _exit in a forked child skips the parent's atexit handlers.
            unsafe { libc::_exit(0) }
        });
        let mut status = 0;
        // SAFETY: middle is our child; reaping it keeps it from lingering as a zombie.
        unsafe { libc::waitpid(middle, &mut status, 0) };
    }
    // SAFETY: the parent's copy of the write end must be closed to see EOF.
    unsafe { libc::close(write_fd) };

    // SAFETY: read_fd is the pipe's read end, owned by us and not used elsewhere.
    let mut reader = fs::File::from(unsafe { OwnedFd::from_raw_fd(read_fd) });
    let mut reports = String::new();
    if let Err(e) = reader.read_to_string(&mut reports) {
        eprintln!("tree-helper: reading the readiness pipe: {e}");
        exit(1);
    }
    drop(reader);

    let mut by_role: Vec<(usize, u32)> = Vec::new();
    for line in reports.lines() {
        let (role, pid) = line.split_once(' ').unwrap_or(("", ""));
        let rank = match role {
            "child" => 0,
            "setsid" => 1,
            "orphan" => 2,
            _ => {
                eprintln!("tree-helper: garbled readiness report {line:?}");
                exit(1)
            }
        };
        match pid.parse() {
            Ok(pid) => by_role.push((rank, pid)),
            Err(_) => {
                eprintln!("tree-helper: garbled readiness report {line:?}");
                exit(1)
            }
        }
    }
    let expected = args.children + usize::from(args.setsid) + usize::from(args.double_fork);
    if by_role.len() != expected {
        eprintln!(
            "tree-helper: expected {expected} readiness reports, got {}: {reports:?}",
            by_role.len()
        );
        exit(1);
    }
    by_role.sort_by_key(|&(rank, _)| rank);

    let mut out = format!("{}\n", std::process::id());
    for (_, pid) in &by_role {
        out.push_str(&format!("{pid}\n"));
    }
    cli.write_ready(&args.pids_file, out);
    pause_forever()
}
