//! Starting a child the way a supervisor must (CLI-CONTRACT §5 step 8; tini, process-wrap):
//! its own process group, PDEATHSIG=SIGKILL towards the core (re-checked), every signal
//! disposition back to default (an agent may have started us with SIGINT ignored) and the
//! signal mask emptied (the core blocks its funnel signals), stdin `/dev/null`, and — when
//! the run has a cgroup — created inside it, so not even its first instruction runs outside.
//!
//! The child is started with `clone3(CLONE_INTO_CGROUP)` when the run has a cgroup: moving a
//! process into a cgroup after the fact waits for an RCU grace period (measured: ~10 ms on
//! the handoff path), creating it there does not. Everything the child needs is allocated
//! before the clone; the child only makes raw syscalls (async-signal-safe) and execs.

mod vfork;

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use vfork::vfork_clone3;

pub(crate) struct SpawnSpec<'a> {
    /// Absolute path of the program (resolved before anything was created): what is exec'd.
    pub(crate) program: &'a Path,
    /// `argv[0]` as the user typed it (`ps` shows `sleep 100`, not `/usr/bin/sleep 100`, as
    /// with `flock(1)`, `timeout(1)`, `env(1)`); `None`: the program's path.
    pub(crate) argv0: Option<&'a std::ffi::OsStr>,
    /// Arguments after argv[0].
    pub(crate) args: &'a [OsString],
    /// The complete environment (the child gets exactly this).
    pub(crate) env: &'a [(OsString, OsString)],
    pub(crate) cwd: Option<&'a Path>,
    /// The run's cgroup directory, opened before the clone: the child is created inside it
    /// (`clone3(CLONE_INTO_CGROUP)`), so no process of the run ever runs outside it.
    pub(crate) cgroup_dir: Option<RawFd>,
    /// The core's pid: if the child's parent is no longer this, the core died mid-fork.
    pub(crate) core_pid: i32,
    /// Drop to this user (run_as) before exec.
    pub(crate) identity: Option<&'a crate::ident::identity::Identity>,
    /// `(resource, limit)` pairs set with setrlimit before exec.
    pub(crate) rlimits: &'a [(libc::__rlimit_resource_t, u64)],
}

/// A started child.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Spawned {
    pub(crate) pid: i32,
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in argument"))
}

/// Everything the child touches, allocated before the clone (the child must not allocate).
struct Prepared {
    path: CString,
    argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    cwd: Option<CString>,
    devnull: OwnedFd,
    groups: Vec<libc::gid_t>,
    ids: Option<(libc::gid_t, libc::uid_t)>,
    rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    core_pid: i32,
}

/// Why a spawn failed.
#[derive(Debug)]
pub(crate) enum SpawnError {
    /// Preparing or cloning failed (nothing ran); with a cgroup, retrying without may help.
    Start(io::Error),
    /// The child could not exec (its errno: `NotFound` → 127, otherwise 126).
    Exec(io::Error),
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpawnError::Start(e) | SpawnError::Exec(e) => e.fmt(f),
        }
    }
}

/// Start a child (CLI-CONTRACT §5 step 8).
pub(crate) fn spawn(spec: &SpawnSpec<'_>) -> Result<Spawned, SpawnError> {
    prepare_and_clone(spec)
}

fn prepare_and_clone(spec: &SpawnSpec<'_>) -> Result<Spawned, SpawnError> {
    let start = SpawnError::Start;
    let path = cstring(spec.program.as_os_str().as_bytes()).map_err(start)?;
    let argv0 = match spec.argv0 {
        Some(a) => cstring(a.as_bytes()).map_err(start)?,
        None => path.clone(),
    };
    let mut argv = vec![argv0];
    for a in spec.args {
        argv.push(cstring(a.as_bytes()).map_err(start)?);
    }
    let mut envp = Vec::with_capacity(spec.env.len());
    for (k, v) in spec.env {
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        envp.push(cstring(&kv).map_err(start)?);
    }
    let devnull: OwnedFd = std::fs::File::open("/dev/null").map_err(start)?.into();
    let mut p = Prepared {
        path,
        argv_ptrs: Vec::new(),
        envp_ptrs: Vec::new(),
        argv,
        envp,
        cwd: spec
            .cwd
            .map(|c| cstring(c.as_os_str().as_bytes()))
            .transpose()
            .map_err(start)?,
        devnull,
        groups: spec
            .identity
            .map(|id| id.groups.iter().map(|g| g.as_raw()).collect())
            .unwrap_or_default(),
        ids: spec.identity.map(|id| (id.gid.as_raw(), id.uid.as_raw())),
        rlimits: spec.rlimits.to_vec(),
        core_pid: spec.core_pid,
    };
    p.argv_ptrs = p
        .argv
        .iter()
        .map(|c| c.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    p.envp_ptrs = p
        .envp
        .iter()
        .map(|c| c.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let first = match spec.cgroup_dir {
        Some(fd) => Join::Clone(fd),
        None => Join::Not,
    };
    match spawn_once(&p, first)? {
        Born::Ran(pid) => Ok(Spawned { pid }),
        Born::KilledAtBirth(pid) => {
            reap_now(pid);
            let Join::Clone(fd) = first else {
                return Err(start(io::Error::other(
                    "the child was killed before it ran",
                )));
            };
            // Linux 6.1x kills a child cloned into a cgroup whose cgroup.kill count differs
            // from its parent's (a cgroup that was killed once: the run's, after its command's
            // tree; or ours, by the service manager). Migrating keeps the child in the cgroup.
            crate::output::debug(
                "spawn",
                "the kernel killed the child cloned into the run cgroup at birth (cgroup.kill \
                 was used there or on ours); joining it by migration instead",
            );
            match spawn_once(&p, Join::Migrate(fd))? {
                Born::Ran(pid) => Ok(Spawned { pid }),
                Born::KilledAtBirth(pid) => {
                    reap_now(pid);
                    Err(start(io::Error::other(
                        "the child was killed before it ran",
                    )))
                }
            }
        }
    }
}

/// How the child gets into the run's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Join {
    /// It does not (no cgroup).
    Not,
    /// Created inside it (`clone3(CLONE_INTO_CGROUP)`; a plain fork migrates instead).
    Clone(RawFd),
    /// Moves itself in (writes `0` to `cgroup.procs`) before anything else.
    Migrate(RawFd),
}

/// What became of a child.
enum Born {
    /// It ran (and exec'd: an exec failure is an error).
    Ran(i32),
    /// It never ran a single instruction: the kernel killed it as it was created.
    KilledAtBirth(i32),
}

/// Reap a child that died at birth (it never ran, so nothing else waits for it).
fn reap_now(pid: i32) {
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
}

/// One clone and exec. The child's first act is to write `R` on the close-on-exec pipe; an
/// exec failure adds its errno. So EOF after `R` is a successful exec, and EOF before it a
/// child that never ran.
fn spawn_once(p: &Prepared, join: Join) -> Result<Born, SpawnError> {
    let start = SpawnError::Start;
    let (err_r, err_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| start(io::Error::from(e)))?;
    let pid = clone_child(p, err_w.as_raw_fd(), join).map_err(start)?;
    drop(err_w);
    let mut buf = [0u8; 5];
    let mut n = 0;
    while n < buf.len() {
        match nix::unistd::read(&err_r, &mut buf[n..]) {
            Err(nix::errno::Errno::EINTR) => continue,
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    match n {
        0 => Ok(Born::KilledAtBirth(pid)),
        5 => Err(SpawnError::Exec(io::Error::from_raw_os_error(
            i32::from_ne_bytes([buf[1], buf[2], buf[3], buf[4]]),
        ))),
        _ => Ok(Born::Ran(pid)),
    }
}

/// Start the child: `clone3(CLONE_VM | CLONE_VFORK)` on a stack of its own, straight into the
/// cgroup when asked, the way `posix_spawn` starts one (see [`vfork_clone3`]); where that is not
/// available (old kernel, or not x86_64), a plain fork (plus a migration into the cgroup).
/// Returns the child's pid; the child itself never returns from here.
fn clone_child(p: &Prepared, err_fd: RawFd, join: Join) -> io::Result<i32> {
    let (into, migrate) = match join {
        Join::Not => (None, None),
        Join::Clone(fd) => (Some(fd), None),
        Join::Migrate(fd) => (None, Some(fd)),
    };
    let why_fork = if fork_forced() {
        "forced by TETHER_FAULT_FORK_SPAWN".to_string()
    } else {
        match vfork_clone3(p, err_fd, into, migrate) {
            Ok(pid) => return Ok(pid),
            // No clone3 / no CLONE_INTO_CGROUP (kernel < 5.7), or an architecture without the
            // trampoline: fork the old way.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOSYS | libc::E2BIG | libc::EINVAL)
                ) =>
            {
                format!("clone3: {e}")
            }
            // Without a cgroup only the syscall itself can have been refused (a seccomp filter
            // answering EPERM for clone3). With one, the caller retries without it first.
            Err(e) if into.is_none() => format!("clone3: {e}"),
            Err(e) => return Err(e),
        }
    };
    crate::output::debug("spawn", &format!("forking the child ({why_fork})"));
    // SAFETY: the child only makes raw syscalls and execs, so a thread of ours that held a lock
    // at the fork (the cluster heartbeat, D56) cannot deadlock it.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: in the forked child; only raw syscalls on prepared memory. A fork cannot
        // be created inside the cgroup, so it moves itself in.
        unsafe { child_exec(p, err_fd, into.or(migrate)) }
    }
    Ok(pid)
}

/// Test-only (cargo feature `fault-injection`): `TETHER_FAULT_FORK_SPAWN=1` takes the fork
/// path that old kernels and other architectures take, so the suite covers it here too.
#[cfg(feature = "fault-injection")]
fn fork_forced() -> bool {
    std::env::var_os("TETHER_FAULT_FORK_SPAWN").is_some_and(|v| v == "1")
}

#[cfg(not(feature = "fault-injection"))]
fn fork_forced() -> bool {
    false
}

/// In the child: say it ran, join the cgroup if asked, undo the core's setup and exec. Never
/// returns. Only raw syscalls on memory prepared before the clone (async-signal-safe).
/// Credentials go through raw syscalls so that only this thread (the only one) is affected.
///
/// # Safety
/// Call only in a freshly cloned child, with `p` prepared before the clone and `err_fd` the
/// write end of the close-on-exec pipe.
unsafe fn child_exec(p: &Prepared, err_fd: RawFd, migrate: Option<RawFd>) -> ! {
    // SAFETY: the caller's contract: a fresh child with prepared memory; only raw,
    // async-signal-safe syscalls on that memory follow.
    unsafe {
        let fail = |fd: RawFd| -> ! {
            let e = *libc::__errno_location();
            let bytes = e.to_ne_bytes();
            libc::write(fd, bytes.as_ptr().cast(), 4);
            libc::_exit(crate::exit::NOT_FOUND)
        };
        libc::write(err_fd, b"R".as_ptr().cast(), 1);
        if let Some(dir) = migrate {
            let procs = libc::openat(
                dir,
                c"cgroup.procs".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if procs < 0 || libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
                libc::_exit(crate::exit::TETHER_FAILURE);
            }
            libc::close(procs);
        }
        if libc::setpgid(0, 0) != 0 || libc::dup2(p.devnull.as_raw_fd(), 0) < 0 {
            fail(err_fd);
        }
        for &(resource, value) in &p.rlimits {
            let lim = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            if libc::setrlimit(resource, &lim) != 0 {
                fail(err_fd);
            }
        }
        if let Some((gid, uid)) = p.ids {
            if libc::syscall(libc::SYS_setgroups, p.groups.len(), p.groups.as_ptr()) != 0
                || libc::syscall(libc::SYS_setgid, gid) != 0
                || libc::syscall(libc::SYS_setuid, uid) != 0
            {
                fail(err_fd);
            }
        }
        if let Some(cwd) = &p.cwd {
            if libc::chdir(cwd.as_ptr()) != 0 {
                fail(err_fd);
            }
        }
        // After any credential change: changing credentials clears PDEATHSIG.
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            fail(err_fd);
        }
        if libc::getppid() != p.core_pid {
            libc::_exit(crate::exit::from_signal(libc::SIGKILL));
        }
        // `signal` refuses glibc's internal signals (32, 33) with EINVAL; they keep their
        // disposition, as under every other supervisor, so its result is not checked.
        for sig in 1..libc::SIGRTMIN() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        // The core blocks its funnel signals; a child that inherited that mask would ignore
        // SIGTERM forever (and pass the mask on to everything it forks).
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
            fail(err_fd);
        }
        libc::execve(p.path.as_ptr(), p.argv_ptrs.as_ptr(), p.envp_ptrs.as_ptr());
        fail(err_fd)
    }
}
