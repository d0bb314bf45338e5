//! A cgroup v2 per run, when one can be created: the only container a process cannot leave by
//! `setsid()`, double-forking or re-parenting, and the only atomic way to kill a whole tree
//! (`cgroup.kill`, Linux ≥ 5.14).
//!
//! The cgroup2 mount is `/sys/fs/cgroup` on a unified host or `/sys/fs/cgroup/unified` on a
//! hybrid one (checked first, with `statfs`), else wherever `/proc/self/mountinfo` says. Where no cgroup can be created
//! (no v2 mount, read-only, not delegated to us) tether falls back to process groups,
//! re-parented descendants and an environment marker (see `tree`), and says so at debug level.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

/// Where cgroup2 is mounted, if anywhere. The usual places are asked first: rendering
/// mountinfo costs the kernel a path lookup per mount, on every run (BENCHMARKS B7).
pub(crate) fn mount_point() -> Option<PathBuf> {
    for usual in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if is_cgroup2_mount(Path::new(usual)) {
            return Some(PathBuf::from(usual));
        }
    }
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_mountinfo(&text)
}

/// `path` is the root of a cgroup2 mount: its filesystem is cgroup2 and its parent's is not
/// (a cgroup2 filesystem below it would be a cgroup, not a mount).
fn is_cgroup2_mount(path: &Path) -> bool {
    is_cgroup2(path) && path.parent().is_none_or(|parent| !is_cgroup2(parent))
}

fn parse_mountinfo(text: &str) -> Option<PathBuf> {
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        if post.split_whitespace().next() == Some("cgroup2") {
            let mount = pre.split_whitespace().nth(4)?;
            return Some(PathBuf::from(unescape_octal(mount)));
        }
    }
    None
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Our own cgroup v2 path (the `0::` line of `/proc/self/cgroup`).
pub(crate) fn own_cgroup() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// The dir under the mount where a root tether makes run cgroups (`<mount>/tether/<token>`).
const TETHER_DIR: &str = "tether";
/// Prefix of run cgroups made in our own (delegated) cgroup (`<own>/tether-<token>`).
const DELEGATED_PREFIX: &str = "tether-";

fn is_cgroup2(p: &Path) -> bool {
    nix::sys::statfs::statfs(p)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// A run cgroup whose run's core is no longer alive.
#[derive(Debug)]
pub(crate) struct Orphan {
    pub(crate) cgroup: RunCgroup,
    pub(crate) run_id: String,
    pub(crate) core_pid: i32,
}

/// Every run cgroup in the places this process can see (`<mount>/tether/`, and the delegated
/// subtree of its own cgroup) whose core — named in the cgroup's name, with its start time —
/// is dead. A live run's cgroup never matches: its core is alive.
pub(crate) fn orphans() -> Vec<Orphan> {
    let Some(mount) = mount_point() else {
        return Vec::new();
    };
    let mut places = vec![(mount.join(TETHER_DIR), "")];
    if let Some(own) = own_cgroup() {
        places.push((mount.join(own.trim_start_matches('/')), DELEGATED_PREFIX));
    }
    let mut out = Vec::new();
    for (dir, prefix) in places {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(token) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
                continue;
            };
            let Some((id, pid, start)) = crate::sys::procfs::parse_token(token) else {
                continue;
            };
            if !e.file_type().is_ok_and(|t| t.is_dir())
                || crate::sys::procfs::core_alive(pid, start)
            {
                continue;
            }
            out.push(Orphan {
                cgroup: RunCgroup { path: e.path() },
                run_id: id.to_owned(),
                core_pid: pid,
            });
        }
    }
    out.sort_by(|a, b| a.cgroup.path.cmp(&b.cgroup.path));
    out
}

impl Orphan {
    /// The cgroup's directory name.
    pub(crate) fn name(&self) -> String {
        self.cgroup
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// The orphan cgroups of the dead run `id`.
pub(crate) fn orphans_of_run(id: &str) -> Vec<RunCgroup> {
    orphans()
        .into_iter()
        .filter(|o| o.run_id == id)
        .map(|o| o.cgroup)
        .collect()
}

/// A run's cgroup directory.
#[derive(Debug, Clone)]
pub(crate) struct RunCgroup {
    path: PathBuf,
}

impl RunCgroup {
    /// Create a cgroup named `name` (the run's token `<run-id>.<pid>.<start>`: run ids are
    /// only unique within one runs dir, so two live runs must never share a cgroup): first
    /// `<mount>/tether/<name>` (where a root operator can enable controllers), then
    /// `<mount><own cgroup>/tether-<name>` (a delegated subtree). `Err` says why none could
    /// be made.
    pub(crate) fn create(run_id: &str) -> Result<RunCgroup, String> {
        let mount = mount_point().ok_or("no cgroup2 mount")?;
        let mut tried = Vec::new();
        // The delegated subtree is only looked up (in /proc/self/cgroup) when the first fails.
        let delegated = || {
            own_cgroup().map(|own| {
                mount
                    .join(own.trim_start_matches('/'))
                    .join(format!("{DELEGATED_PREFIX}{run_id}"))
            })
        };
        let first = std::iter::once(mount.join(TETHER_DIR).join(run_id));
        for path in first.chain(std::iter::from_fn(delegated).take(1)) {
            match create_dir(&path) {
                Ok(()) => return Ok(RunCgroup { path }),
                Err(e) => tried.push(format!("{}: {e}", path.display())),
            }
        }
        Err(tried.join("; "))
    }

    /// The cgroup a (dead) run's record or lock metadata names (`cgroup`) — only if it is
    /// provably the run's whose token is `token`: a plain path under the cgroup2 mount, named
    /// after that token
    /// (`<mount>/tether/<token>` or `…/tether-<token>`), and, when it exists, a cgroup2
    /// directory owned by tether's uid. Anything else could make a reaper kill every process
    /// of some other cgroup (PROTOCOL.md, "Trust model").
    pub(crate) fn recorded(cgroup: Option<&str>, token: &str) -> Result<RunCgroup, String> {
        let path = Path::new(cgroup.ok_or("no cgroup recorded")?);
        if !path.is_absolute()
            || path
                .components()
                .any(|c| !matches!(c, Component::RootDir | Component::Normal(_)))
        {
            return Err("not a plain absolute path".into());
        }
        let mount = mount_point().ok_or("no cgroup2 mount on this host")?;
        if !path.starts_with(&mount) {
            return Err(format!("not under the cgroup2 mount {}", mount.display()));
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let named_after_run = (name == token
            && path.parent() == Some(mount.join(TETHER_DIR).as_path()))
            || name == format!("{DELEGATED_PREFIX}{token}");
        if !named_after_run {
            return Err(format!("not the cgroup of run {token}"));
        }
        // path-ok: cgroupfs is the kernel's; the path is a cgroup tether made or checked (`recorded`)
        match std::fs::symlink_metadata(path) {
            // Gone: nothing to kill, nothing to trust.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot inspect it: {e}")),
            Ok(md) => {
                use std::os::unix::fs::MetadataExt;
                let me = nix::unistd::geteuid().as_raw();
                if !md.is_dir() || md.file_type().is_symlink() {
                    return Err("not a directory".into());
                }
                if md.uid() != me {
                    return Err(format!("owned by uid {}, not by uid {me}", md.uid()));
                }
                if !is_cgroup2(path) {
                    return Err("not on a cgroup2 file system".into());
                }
            }
        }
        Ok(RunCgroup {
            path: path.to_owned(),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// How long ago the cgroup was made (a run cgroup's directory never changes after that:
    /// it has no children).
    pub(crate) fn age(&self) -> Option<std::time::Duration> {
        // path-ok: cgroupfs is the kernel's; the path is a cgroup tether made or checked (`recorded`)
        std::fs::symlink_metadata(&self.path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
    }

    /// The cgroup directory opened for `clone3(CLONE_INTO_CGROUP)`.
    pub(crate) fn dir_fd(&self) -> io::Result<OwnedFd> {
        // path-ok: cgroupfs is the kernel's; the path is a cgroup tether made or checked (`recorded`)
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(&self.path)?;
        Ok(f.into())
    }

    pub(crate) fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    pub(crate) fn exists(&self) -> bool {
        self.path.is_dir()
    }

    /// Send `sig` to every member.
    pub(crate) fn signal(&self, sig: nix::sys::signal::Signal) {
        for pid in self.pids() {
            // ESRCH (gone meanwhile) is fine.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }

    /// SIGKILL every member: `cgroup.kill` where the kernel has it, else one by one.
    pub(crate) fn kill_all(&self) {
        // path-ok: cgroupfs is the kernel's; the path is a cgroup tether made or checked (`recorded`)
        let killed = OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.kill"))
            .and_then(|mut f| f.write_all(b"1"))
            .is_ok();
        if !killed {
            self.signal(nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// Apply `limits.memory`/`pids`/`cpu` through the controllers. Returns one warning per
    /// limit that could not be applied, naming it and why (never silently ignored).
    pub(crate) fn apply_limits(&self, limits: &crate::config::Limits) -> Vec<String> {
        let mut wanted: Vec<(&str, &str, String)> = Vec::new();
        if let Some(m) = limits.memory {
            wanted.push(("memory", "memory.max", m.to_string()));
        }
        if let Some(p) = limits.pids {
            wanted.push(("pids", "pids.max", p.to_string()));
        }
        if let Some(c) = limits.cpu {
            let period = 100_000u64;
            wanted.push((
                "cpu",
                "cpu.max",
                format!("{} {period}", (c * period as f64) as u64),
            ));
        }
        let mut warnings = Vec::new();
        for (controller, file, value) in wanted {
            if let Err(why) = self.enable_controller(controller) {
                warnings.push(format!(
                    "limits.{controller} not applied: the {controller} controller is not available ({why})"
                ));
                continue;
            }
            // path-ok: cgroupfs is the kernel's; the path is a cgroup tether made or checked (`recorded`)
            if let Err(e) = std::fs::write(self.path.join(file), &value) {
                warnings.push(format!(
                    "limits.{controller} not applied: cannot write {file}: {e}"
                ));
            }
        }
        warnings
    }

    /// Enable `controller` in every ancestor's `cgroup.subtree_control` down to ours.
    fn enable_controller(&self, controller: &str) -> Result<(), String> {
        let mount = mount_point().ok_or("no cgroup2 mount")?;
        let rel = self
            .path
            .strip_prefix(&mount)
            .map_err(|_| "cgroup outside the mount")?;
        let mut dir = mount.clone();
        let mut parents = vec![dir.clone()];
        for comp in rel.parent().into_iter().flat_map(|p| p.components()) {
            dir = dir.join(comp);
            parents.push(dir.clone());
        }
        for p in parents {
            let available =
                std::fs::read_to_string(p.join("cgroup.controllers")).unwrap_or_default();
            if !available.split_whitespace().any(|c| c == controller) {
                return Err(format!("not in {}", p.join("cgroup.controllers").display()));
            }
            let enabled =
                std::fs::read_to_string(p.join("cgroup.subtree_control")).unwrap_or_default();
            if !enabled.split_whitespace().any(|c| c == controller) {
                // path-ok: cgroupfs is the kernel's; the path is a cgroup tether made or checked (`recorded`)
                std::fs::write(p.join("cgroup.subtree_control"), format!("+{controller}"))
                    .map_err(|e| format!("cannot enable it in {}: {e}", p.display()))?;
            }
        }
        Ok(())
    }

    /// Remove the (empty) cgroup; a missing one is fine.
    pub(crate) fn remove(&self) -> io::Result<()> {
        // path-ok: cgroupfs is the kernel's; the path is a cgroup tether made or checked (`recorded`)
        match std::fs::remove_dir(&self.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

fn create_dir(path: &Path) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        // path-ok: cgroupfs is the kernel's; the path is a cgroup tether made or checked (`recorded`)
        match std::fs::create_dir(parent) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    // Never adopt an existing cgroup: it belongs to another run instance.
    // path-ok: cgroupfs is the kernel's; the path is a cgroup tether made or checked (`recorded`)
    std::fs::create_dir(path)?;
    // Writable cgroup.procs is what we actually need.
    // path-ok: cgroupfs is the kernel's; the path is a cgroup tether made or checked (`recorded`)
    OpenOptions::new()
        .write(true)
        .open(path.join("cgroup.procs"))
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_mountinfo() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_mountinfo(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_mountinfo(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(parse_mountinfo("1 0 0:1 / / rw - ext4 /dev/sda rw\n"), None);
        assert_eq!(unescape_octal("/a\\040b"), "/a b");
    }

    /// The statfs fast path must name the mount mountinfo names (on hosts with one cgroup2
    /// mount, like this project's CI): checked on the real kernel this runs on.
    #[test]
    fn the_fast_path_agrees_with_mountinfo() {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mounts = text.lines().filter(|l| l.contains(" - cgroup2 ")).count();
        if mounts != 1 {
            eprintln!("SKIPPED: {mounts} cgroup2 mounts here; the check needs exactly one");
            return;
        }
        assert_eq!(mount_point(), parse_mountinfo(&text));
    }
}
