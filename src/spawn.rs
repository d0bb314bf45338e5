//! Starting a child the way a supervisor must (SPEC §3.1 step 8; tini, process-wrap):
//! its own process group, PDEATHSIG=SIGKILL towards the core (re-checked), every signal
//! disposition back to default (an agent may have started us with SIGINT ignored) and the
//! signal mask emptied (the core blocks its funnel signals), stdin `/dev/null`, and — when the run has a cgroup —
//! moved into it before `exec`, so not even its first instruction runs outside.
//!
//! The pre-exec hook only makes async-signal-safe calls (prctl, getppid, sigaction, write).

use std::ffi::OsString;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct SpawnSpec<'a> {
    pub program: &'a Path,
    pub args: &'a [OsString],
    /// The complete environment (the child gets exactly this).
    pub env: &'a [(OsString, OsString)],
    pub cwd: Option<&'a Path>,
    /// `cgroup.procs` of the run's cgroup, opened before fork.
    pub cgroup_procs: Option<RawFd>,
    /// The core's pid: if the child's parent is no longer this, the core died mid-fork.
    pub core_pid: i32,
    /// Drop to this user (run_as) before exec.
    pub identity: Option<&'a crate::identity::Identity>,
    /// `(resource, limit)` pairs set with setrlimit before exec.
    pub rlimits: &'a [(libc::__rlimit_resource_t, u64)],
}

pub fn spawn(spec: &SpawnSpec<'_>) -> io::Result<Child> {
    let mut cmd = Command::new(spec.program);
    cmd.args(spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .process_group(0);
    if let Some(dir) = spec.cwd {
        cmd.current_dir(dir);
    }
    let core_pid = spec.core_pid;
    let cgroup = spec.cgroup_procs;
    // Everything the child needs is allocated here, before fork.
    let creds = spec.identity.map(|id| {
        let groups: Vec<libc::gid_t> = id.groups.iter().map(|g| g.as_raw()).collect();
        (groups, id.gid.as_raw(), id.uid.as_raw())
    });
    let rlimits: Vec<(libc::__rlimit_resource_t, u64)> = spec.rlimits.to_vec();
    // SAFETY: the closure runs between fork and exec and only calls async-signal-safe
    // functions on values captured by copy.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = cgroup {
                // Mandatory when asked: teardown then trusts the cgroup alone to find the
                // run's processes. The caller retries without a cgroup if this fails.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            for &(resource, value) in &rlimits {
                let lim = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                if libc::setrlimit(resource, &lim) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some((groups, gid, uid)) = &creds {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(*gid) != 0
                    || libc::setuid(*uid) != 0
                {
                    return Err(io::Error::last_os_error());
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
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != core_pid {
                libc::_exit(crate::exit::from_signal(libc::SIGKILL));
            }
            for sig in 1..libc::SIGRTMIN() {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            // The core blocks its funnel signals; a child that inherited that mask would
            // ignore SIGTERM forever (and pass the mask on to everything it forks).
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            Ok(())
        });
    }
    cmd.spawn()
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
