//! Where tether keeps its locks and run dirs (CLI-CONTRACT §3), and the trust checks that make them
//! safe to act on as root (PROTOCOL.md, "Trust model").
//!
//! A state dir is reached by walking from `/` one component at a time on directory fds
//! (`openat(O_NOFOLLOW)`), and each directory is judged on its open fd, so what is checked is
//! what is used. The rules, as OpenSSH's `StrictModes` and systemd's safe path transitions:
//! - the state dir itself (lock dir, runs dir) is a real directory owned by root or by
//!   tether's uid and writable by nobody else — sticky or not: a sticky dir still lets anyone
//!   *create* entries, and a planted run record is a root code execution;
//! - every ancestor is owned by root or tether's uid and not writable by group or others,
//!   unless it is sticky (like `/tmp`): there nobody else can rename or delete our entry, so
//!   the entry below it only has to be ours (which the rule above already demands);
//! - a symlink on the way is followed only if root or tether's uid owns it (it lives in a
//!   directory that passed the checks, so nobody else can swap it); the state dir itself is
//!   never a symlink.
//!
//! Missing dirs are created with `mkdirat` on the checked parent fd and their mode set with
//! `fchmod` on the new dir's fd, never by path. Parents created on the way get 0755, so a
//! `run_as` user can traverse to its `tmp/`.
//!
//! Built-in defaults never depend on environment variables (the same user under cron, `su` or
//! `sudo -u` must find the same lock dir, or two runs of one app overlap), and each has a
//! fallback that is used, with a warning, when the preferred dir is unusable — e.g. another
//! user created `/run/lock/tether` first.

use crate::config::places::Place;
use crate::error::{Error, Result};
use crate::sys::safe_fs::{kind, Dir, Kind};
use nix::sys::stat::FileStat;
use nix::unistd::{geteuid, Uid};
use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

/// How many symlinks one walk follows at most (as the kernel's `ELOOP` limit).
const MAX_SYMLINKS: usize = 40;

/// Mode of the directories created on the way to a state dir.
const PARENT_MODE: u32 = 0o755;

/// A state dir that passed the checks, open.
#[derive(Debug, Clone)]
pub(crate) struct StateDir {
    pub(crate) dir: Dir,
    /// Every directory walked to reach it, from `/` to the dir itself, with what `fstat` said.
    chain: Vec<(PathBuf, FileStat)>,
}

/// What a check found at a candidate.
enum Found {
    Existing(StateDir),
    /// Missing, but creatable: every existing ancestor passed the checks and the deepest one
    /// is writable by us.
    Missing(PathBuf),
}

/// A state dir chosen for use; missing ones are created by [`Chosen::open`].
pub(crate) struct Chosen {
    what: &'static str,
    found: Found,
    mode: u32,
}

impl Chosen {
    /// The dir, when it exists already.
    pub(crate) fn existing_dir(&self) -> Option<&Dir> {
        match &self.found {
            Found::Existing(s) => Some(&s.dir),
            Found::Missing(_) => None,
        }
    }

    /// The dir, created first if it was missing.
    pub(crate) fn open(self) -> Result<StateDir> {
        match self.found {
            Found::Existing(s) => Ok(s),
            Found::Missing(path) => match walk(self.what, &path, Some(self.mode))? {
                Walked::Existing(s) => Ok(s),
                Walked::Missing { .. } => Err(Error::tether(format!(
                    "cannot create {} {}",
                    self.what,
                    path.display()
                ))),
            },
        }
    }

    /// The dir if it exists (janitor, status: they create nothing).
    pub(crate) fn existing(self) -> Option<StateDir> {
        match self.found {
            Found::Existing(s) => Some(s),
            Found::Missing(_) => None,
        }
    }
}

/// Pick the first usable candidate of `place` without creating anything: an existing dir that
/// passes the checks, or a missing one that could be created. Falling back past the preferred
/// dir is said in a warning; when no candidate is usable, the preferred one's error is
/// returned. `mode` is what a missing dir will be created with.
pub(crate) fn choose(what: &'static str, place: &Place, mode: u32) -> Result<Chosen> {
    let mut first_error = None;
    for path in &place.candidates {
        let outcome = walk(what, path, None).and_then(|w| match w {
            Walked::Existing(s) => Ok(Found::Existing(s)),
            Walked::Missing { deepest } => {
                use nix::unistd::{faccessat, AccessFlags};
                use std::os::fd::AsFd;
                faccessat(
                    deepest.as_fd(),
                    ".",
                    AccessFlags::W_OK | AccessFlags::X_OK,
                    nix::fcntl::AtFlags::AT_EACCESS,
                )
                .map_err(|e| {
                    Error::tether(format!(
                        "cannot create {what} {}: {} is not writable: {}",
                        path.display(),
                        deepest.path().display(),
                        e.desc()
                    ))
                })?;
                Ok(Found::Missing(path.clone()))
            }
        });
        match outcome {
            Ok(found) => {
                if let Some(e) = &first_error {
                    let e: &Error = e;
                    crate::output::warn(
                        "fallback",
                        &format!("{}; using {} instead", e.message, path.display()),
                    );
                }
                return Ok(Chosen { what, found, mode });
            }
            Err(e) => {
                if first_error.is_none() {
                    first_error = Some(e);
                }
            }
        }
    }
    Err(first_error.unwrap_or_else(|| Error::tether(format!("no {what} configured"))))
}

enum Walked {
    Existing(StateDir),
    Missing { deepest: Dir },
}

/// Walk `path` from `/`, checking every directory on its fd; create what is missing when
/// `create` gives the state dir's mode.
fn walk(what: &str, path: &Path, create: Option<u32>) -> Result<Walked> {
    let shown = path.display().to_string();
    let refuse = |msg: String| Error::tether(format!("{what} {shown}{msg}"));
    let me = geteuid();
    let trusted = |uid: u32| uid == 0 || uid == me.as_raw();
    let absolute = std::path::absolute(path)
        .map_err(|e| Error::path(&format!("cannot resolve {what}"), path, e))?;
    let mut queue: VecDeque<OsString> = lexical_components(&absolute);
    if queue.is_empty() {
        return Err(refuse(" is the root directory".into()));
    }
    let root = Dir::open_unchecked(Path::new("/"))
        .map_err(|e| Error::path("cannot open", Path::new("/"), e))?;
    let root_stat = root
        .stat()
        .map_err(|e| Error::path("cannot inspect", Path::new("/"), e))?;
    let mut chain: Vec<(Dir, FileStat)> = vec![(root, root_stat)];
    let mut symlinks = 0;
    while let Some(name) = queue.pop_front() {
        if name == ".." {
            if chain.len() > 1 {
                chain.pop();
            }
            continue;
        }
        let last = queue.is_empty();
        let (parent, parent_stat) = chain
            .last()
            .cloned()
            .ok_or_else(|| refuse(": empty".into()))?;
        check_ancestor(&parent, &parent_stat, trusted).map_err(&refuse)?;
        let here = parent.join(&name);
        let mut created = false;
        let entry = match parent.stat_at(&name) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let Some(mode) = create else {
                    return Ok(Walked::Missing { deepest: parent });
                };
                match parent.create_dir(&name, if last { mode } else { PARENT_MODE }) {
                    Ok(()) => created = true,
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                    Err(e) => return Err(Error::path(&format!("cannot create {what}"), &here, e)),
                }
                parent
                    .stat_at(&name)
                    .map_err(|e| Error::path(&format!("cannot inspect {what}"), &here, e))?
            }
            Err(e) => return Err(Error::path(&format!("cannot inspect {what}"), &here, e)),
        };
        match kind(&entry) {
            Kind::Symlink if last => {
                return Err(refuse(" is a symlink; refusing to follow it".into()))
            }
            Kind::Symlink => {
                if !trusted(entry.st_uid) {
                    return Err(refuse(format!(
                        ": {} is a symlink owned by uid {}; refusing to follow it",
                        here.display(),
                        entry.st_uid
                    )));
                }
                symlinks += 1;
                if symlinks > MAX_SYMLINKS {
                    return Err(refuse(": too many levels of symlinks".into()));
                }
                let target = parent
                    .read_link(&name)
                    .map_err(|e| Error::path("cannot read symlink", &here, e))?;
                let target = PathBuf::from(target);
                if target.is_absolute() {
                    chain.truncate(1);
                }
                for c in target_components(&target).into_iter().rev() {
                    queue.push_front(c);
                }
                continue;
            }
            Kind::Dir => {}
            _ if last => return Err(refuse(" is not a directory".into())),
            _ => {
                return Err(refuse(format!(": {} is not a directory", here.display())));
            }
        }
        let opened = match parent.open_dir(&name) {
            Err(e) if e.raw_os_error() == Some(libc::EACCES) && !last => {
                // An ancestor we may search but not read (a home dir of mode 0711).
                parent.open_dir_path_only(&name)
            }
            other => other,
        };
        let dir = opened.map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP | libc::ENOTDIR) => refuse(format!(
                ": {} changed while it was being checked",
                here.display()
            )),
            _ => Error::path(&format!("cannot open {what}"), &here, e),
        })?;
        if created {
            // The umask may have narrowed the mode; set it exactly, on the fd.
            let mode = match (last, create) {
                (true, Some(mode)) => mode,
                _ => PARENT_MODE,
            };
            dir.chmod(mode)
                .map_err(|e| Error::path(&format!("cannot chmod {what}"), &here, e))?;
        }
        let st = dir
            .stat()
            .map_err(|e| Error::path(&format!("cannot inspect {what}"), &here, e))?;
        chain.push((dir, st));
    }
    let (dir, st) = chain
        .last()
        .cloned()
        .ok_or_else(|| refuse(": empty".into()))?;
    if !trusted(st.st_uid) {
        let squat_hint = chain
            .len()
            .checked_sub(2)
            .and_then(|i| chain.get(i))
            .filter(|(_, p)| p.st_mode & 0o1002 == 0o1002)
            .map(|_| {
                " — another user created it first in a world-writable dir; have it created at \
                 boot (ci/tmpfiles.d/tether.conf), remove it, or choose another dir"
            })
            .unwrap_or("");
        return Err(refuse(format!(
            " is owned by uid {}, not by uid {me} or root{squat_hint}",
            st.st_uid
        )));
    }
    if st.st_mode & 0o022 != 0 {
        return Err(refuse(format!(
            " is group/world writable (mode {:o}); refusing it, sticky or not: another user \
             could plant a lockfile or run record in it",
            st.st_mode & 0o7777
        )));
    }
    Ok(Walked::Existing(StateDir {
        dir,
        chain: chain
            .into_iter()
            .map(|(d, s)| (d.path().to_owned(), s))
            .collect(),
    }))
}

/// The rule for a directory on the way: owned by root or us, and not writable by group or
/// others unless sticky.
fn check_ancestor(dir: &Dir, st: &FileStat, trusted: impl Fn(u32) -> bool) -> Result<(), String> {
    if !trusted(st.st_uid) {
        return Err(format!(
            ": its ancestor {} is owned by uid {}, not by uid {} or root: that user could \
             replace what lies below it",
            dir.path().display(),
            st.st_uid,
            geteuid()
        ));
    }
    if st.st_mode & 0o022 != 0 && st.st_mode & 0o1000 == 0 {
        return Err(format!(
            ": its ancestor {} is writable by group or others (mode {:o}) without the sticky \
             bit: anyone could replace what lies below it",
            dir.path().display(),
            st.st_mode & 0o7777
        ));
    }
    Ok(())
}

/// The components of an absolute path, `.` dropped and `..` applied lexically (as the user
/// wrote it; `..` inside symlink targets is applied on the walk, as the kernel does).
fn lexical_components(path: &Path) -> VecDeque<OsString> {
    let mut out: VecDeque<OsString> = VecDeque::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push_back(n.to_owned()),
            Component::ParentDir => {
                out.pop_back();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

fn target_components(path: &Path) -> Vec<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

/// Refuse a directory we cannot write (asked with `faccessat` on its fd, which knows about
/// root, read-only mounts and ACLs).
pub(crate) fn check_writable(what: &str, dir: &Dir) -> Result<()> {
    use nix::unistd::{faccessat, AccessFlags};
    use std::os::fd::AsFd;
    faccessat(
        dir.as_fd(),
        ".",
        AccessFlags::W_OK | AccessFlags::X_OK,
        nix::fcntl::AtFlags::AT_EACCESS,
    )
    .map_err(|e| {
        Error::tether(format!(
            "{what} {} is not writable: {}",
            dir.path().display(),
            e.desc()
        ))
    })
}

impl StateDir {
    /// Refuse (with the culprit named) when user `uid` (groups `gids`) cannot search every
    /// directory on the way to this one: a `run_as` command must reach its `tmp/`.
    pub(crate) fn check_reachable_by(
        &self,
        user: &str,
        uid: Uid,
        gids: &[nix::unistd::Gid],
    ) -> Result<()> {
        // The dir itself is made traversable by the caller; its ancestors must already be.
        let ancestors = &self.chain[..self.chain.len().saturating_sub(1)];
        for (path, st) in ancestors {
            let mode = st.st_mode;
            let ok = mode & 0o001 != 0
                || (mode & 0o010 != 0 && gids.iter().any(|g| g.as_raw() == st.st_gid))
                || (mode & 0o100 != 0 && st.st_uid == uid.as_raw());
            if !ok {
                return Err(Error::tether(format!(
                    "run_as user {user} cannot reach the runs dir {}: {} is mode {:o} (owner \
                     uid {}, group {})",
                    self.dir.path().display(),
                    path.display(),
                    mode & 0o7777,
                    st.st_uid,
                    st.st_gid
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_dot_is_applied_as_written() {
        let c = lexical_components(Path::new("/a/./b/../c"));
        assert_eq!(c, ["a", "c"].map(OsString::from));
        assert_eq!(
            target_components(Path::new("../x/./y")),
            ["..", "x", "y"].map(OsString::from)
        );
    }
}
