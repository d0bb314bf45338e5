//! Starting a child the way a supervisor must (SPEC §3.1 step 8; tini, process-wrap):
//! its own process group, PDEATHSIG=SIGKILL towards the core (re-checked), every signal
//! disposition back to default (an agent may have started us with SIGINT ignored) and the
//! signal mask emptied (the core blocks its funnel signals), stdin `/dev/null`, and — when
//! the run has a cgroup — created inside it, so not even its first instruction runs outside.
//!
//! The child is started with `clone3(CLONE_INTO_CGROUP)` when the run has a cgroup: moving a
//! process into a cgroup after the fact waits for an RCU grace period (measured: ~10 ms on
//! the handoff path), creating it there does not. Everything the child needs is allocated
//! before the clone; the child only makes raw syscalls (async-signal-safe) and execs.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub struct SpawnSpec<'a> {
    /// Absolute path of the program (resolved before anything was created).
    pub program: &'a Path,
    /// Arguments after argv[0].
    pub args: &'a [OsString],
    /// The complete environment (the child gets exactly this).
    pub env: &'a [(OsString, OsString)],
    pub cwd: Option<&'a Path>,
    /// The run's cgroup directory, opened before the clone: the child is created inside it
    /// (`clone3(CLONE_INTO_CGROUP)`), so no process of the run ever runs outside it.
    pub cgroup_dir: Option<RawFd>,
    /// The core's pid: if the child's parent is no longer this, the core died mid-fork.
    pub core_pid: i32,
    /// Drop to this user (run_as) before exec.
    pub identity: Option<&'a crate::identity::Identity>,
    /// `(resource, limit)` pairs set with setrlimit before exec.
    pub rlimits: &'a [(libc::__rlimit_resource_t, u64)],
}

/// A started child.
#[derive(Debug, Clone, Copy)]
pub struct Spawned {
    pub pid: i32,
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

#[repr(C)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Why a spawn failed.
#[derive(Debug)]
pub enum SpawnError {
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

/// Start a child (SPEC §3.1 step 8).
pub fn spawn(spec: &SpawnSpec<'_>) -> Result<Spawned, SpawnError> {
    prepare_and_clone(spec)
}

fn prepare_and_clone(spec: &SpawnSpec<'_>) -> Result<Spawned, SpawnError> {
    let start = SpawnError::Start;
    let path = cstring(spec.program.as_os_str().as_bytes()).map_err(start)?;
    let mut argv = vec![path.clone()];
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
    let (err_r, err_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| start(io::Error::from(e)))?;

    let pid = clone_child(spec.cgroup_dir).map_err(start)?;
    if pid == 0 {
        // SAFETY: in the child; `child_exec` only makes raw syscalls on prepared memory.
        unsafe { child_exec(&p, err_w.as_raw_fd()) }
    }
    drop(err_w);
    // The exec reports failure as an errno on the CLOEXEC pipe; EOF means it succeeded.
    let mut buf = [0u8; 4];
    let n = loop {
        match nix::unistd::read(&err_r, &mut buf) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other.unwrap_or(0),
        }
    };
    if n == 4 {
        return Err(SpawnError::Exec(io::Error::from_raw_os_error(
            i32::from_ne_bytes(buf),
        )));
    }
    Ok(Spawned { pid })
}

/// clone3 straight into the cgroup when asked (falling back to fork + migration only when
/// the kernel lacks CLONE_INTO_CGROUP); plain fork otherwise. Returns 0 in the child.
fn clone_child(cgroup_dir: Option<RawFd>) -> io::Result<i32> {
    if let Some(dir) = cgroup_dir {
        let args = CloneArgs {
            flags: CLONE_INTO_CGROUP,
            pidfd: 0,
            child_tid: 0,
            parent_tid: 0,
            exit_signal: libc::SIGCHLD as u64,
            stack: 0,
            stack_size: 0,
            tls: 0,
            set_tid: 0,
            set_tid_size: 0,
            cgroup: dir as u64,
        };
        // SAFETY: clone3 with fork semantics (no stack, no shared VM); the process is single
        // threaded here, so the child is a plain copy of it.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &args as *const CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        if ret >= 0 {
            return Ok(ret as i32);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // No clone3 / no CLONE_INTO_CGROUP: migrate the old way.
            Some(libc::ENOSYS) | Some(libc::E2BIG) | Some(libc::EINVAL) => {
                // SAFETY: fork in a single-threaded process.
                let pid = unsafe { libc::fork() };
                if pid < 0 {
                    return Err(io::Error::last_os_error());
                }
                if pid == 0 {
                    // SAFETY: openat + write on a valid dir fd, in the child.
                    unsafe {
                        let procs = libc::openat(
                            dir,
                            c"cgroup.procs".as_ptr(),
                            libc::O_WRONLY | libc::O_CLOEXEC,
                        );
                        if procs < 0 || libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
                            libc::_exit(crate::exit::TETHER_FAILURE);
                        }
                    }
                }
                return Ok(pid);
            }
            _ => return Err(err),
        }
    }
    // SAFETY: fork in a single-threaded process.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pid)
}

/// In the child: undo the core's setup and exec. Never returns. Only raw syscalls on memory
/// prepared before the clone (async-signal-safe). Credentials go through raw syscalls so that
/// only this thread (the only one) is affected.
unsafe fn child_exec(p: &Prepared, err_fd: RawFd) -> ! {
    let fail = |fd: RawFd| -> ! {
        let e = *libc::__errno_location();
        let bytes = e.to_ne_bytes();
        libc::write(fd, bytes.as_ptr().cast(), 4);
        libc::_exit(crate::exit::NOT_FOUND)
    };
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
    for sig in 1..libc::SIGRTMIN() {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    // The core blocks its funnel signals; a child that inherited that mask would ignore
    // SIGTERM forever (and pass the mask on to everything it forks).
    let mut empty: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut empty);
    libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    libc::execve(p.path.as_ptr(), p.argv_ptrs.as_ptr(), p.envp_ptrs.as_ptr());
    fail(err_fd)
}

/// How a command name resolves, checked before anything is created (SPEC §12).
pub enum Resolved {
    Found(PathBuf),
    NotFound(String),
    NotExecutable(String),
}

/// Resolve `program` the way `execvp` will: a name with a `/` is taken as a path, anything
/// else is searched in `path_var`.
pub fn resolve(program: &OsString, path_var: Option<&OsString>) -> Resolved {
    let name = Path::new(program);
    if program.is_empty() {
        return Resolved::NotFound("empty command".into());
    }
    if program.as_encoded_bytes().contains(&b'/') {
        return check_candidate(name).unwrap_or_else(|| {
            Resolved::NotFound(format!("command not found: {}", name.display()))
        });
    }
    let default_path = OsString::from("/usr/local/bin:/usr/bin:/bin");
    let search = path_var.unwrap_or(&default_path);
    let mut not_exec = None;
    for dir in std::env::split_paths(search) {
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        match check_candidate(&dir.join(name)) {
            Some(Resolved::Found(p)) => return Resolved::Found(p),
            Some(Resolved::NotExecutable(m)) => not_exec = not_exec.or(Some(m)),
            _ => {}
        }
    }
    not_exec
        .map(Resolved::NotExecutable)
        .unwrap_or_else(|| Resolved::NotFound(format!("command not found: {}", name.display())))
}

fn check_candidate(path: &Path) -> Option<Resolved> {
    let md = std::fs::metadata(path).ok()?;
    if md.is_dir() {
        return Some(Resolved::NotExecutable(format!(
            "command is a directory: {}",
            path.display()
        )));
    }
    use nix::unistd::{access, AccessFlags};
    if access(path, AccessFlags::X_OK).is_err() {
        return Some(Resolved::NotExecutable(format!(
            "command is not executable: {}",
            path.display()
        )));
    }
    Some(Resolved::Found(path.to_owned()))
}
