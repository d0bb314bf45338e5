//! Throw-away local users for the tests that play a hostile (or just another) local user:
//! created with `useradd`, removed with `userdel` when dropped — also when the test fails.
//! Only root can make them; tests that need one say so visibly when they cannot run.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

/// A user that exists for one test.
#[derive(Debug)]
pub struct TempUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Its home directory (created, owned by it) when made with [`TempUser::with_home`].
    pub home: Option<PathBuf>,
}

/// Whether the suite runs as root (the only way to make users, switch to them, and own
/// cgroups); tests that need it print `SKIPPED (needs root): …` otherwise.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether this process can make and own cgroups (root, with cgroup2 mounted): runs then get
/// a cgroup each; tests that need one print `SKIPPED (needs root and cgroup2): …` otherwise.
pub fn cgroup2_writable() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|t| t.contains(" - cgroup2 "))
        && is_root()
}

impl TempUser {
    /// A user without a home directory.
    pub fn create() -> TempUser {
        TempUser::make(false)
    }

    /// A user with a home directory of its own (`useradd -m`).
    pub fn with_home() -> TempUser {
        TempUser::make(true)
    }

    fn make(home: bool) -> TempUser {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64 ^ d.as_secs())
            .unwrap_or(0);
        let tag = (nanos ^ ((std::process::id() as u64) << 20)) & 0xffff_ffff;
        let name = format!("tether-t-{tag:08x}");
        let shell = if Path::new("/usr/sbin/nologin").exists() {
            "/usr/sbin/nologin"
        } else {
            "/bin/false"
        };
        let mut cmd = Command::new("useradd");
        cmd.args(["-s", shell, if home { "-m" } else { "-M" }, &name]);
        // useradd takes a lock on /etc/passwd: parallel tests may have to try again.
        let mut last = None;
        for _ in 0..50 {
            let out = cmd.output().expect("running useradd");
            if out.status.success() {
                last = None;
                break;
            }
            last = Some(String::from_utf8_lossy(&out.stderr).into_owned());
            std::thread::sleep(std::time::Duration::from_millis(100)); // ordering-free: bounded retry of a busy useradd lock
        }
        if let Some(err) = last {
            panic!("useradd {name} failed: {err}");
        }
        let user = nix::unistd::User::from_name(&name)
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("user {name} not found after useradd"));
        TempUser {
            name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            home: home.then_some(user.dir),
        }
    }

    /// A command that runs as this user (its uid, its group, no supplementary groups).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        // std clears the supplementary groups when root switches uid.
        cmd.uid(self.uid).gid(self.gid);
        cmd
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        let mut args = vec!["-f"];
        if self.home.is_some() {
            args.push("-r");
        }
        args.push(&self.name);
        for _ in 0..50 {
            match Command::new("userdel").args(&args).output() {
                Ok(o) if o.status.success() => return,
                // 8: the user is logged in (a process of it is still exiting); 10: a lock.
                Ok(_) => std::thread::sleep(std::time::Duration::from_millis(100)), // ordering-free: bounded retry
                Err(e) => {
                    eprintln!("userdel {}: {e}", self.name);
                    return;
                }
            }
        }
        eprintln!("userdel {} kept failing", self.name);
    }
}
