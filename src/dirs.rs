//! Where tether keeps its locks and run dirs (SPEC §2), and the safety checks on them.
//!
//! A lock dir another user can write to lets them swap a lockfile for a symlink or a FIFO and
//! make runs of one app overlap; a runs dir they can write lets them plant a `run.json` whose
//! teardown command a root janitor would execute. So both are refused when they are symlinks,
//! owned by someone else, or group/world writable without the sticky bit.

use crate::error::{Error, Result};
use nix::unistd::{geteuid, Uid};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub fn is_root() -> bool {
    geteuid().is_root()
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn home() -> PathBuf {
    env_path("HOME").unwrap_or_else(|| PathBuf::from("/"))
}

pub fn default_lock_dir() -> PathBuf {
    if is_root() {
        PathBuf::from("/run/lock/tether")
    } else if let Some(rt) = env_path("XDG_RUNTIME_DIR") {
        rt.join("tether")
    } else {
        PathBuf::from(format!("/tmp/tether-{}", geteuid()))
    }
}

pub fn default_runs_dir() -> PathBuf {
    if is_root() {
        PathBuf::from("/var/lib/tether/runs")
    } else {
        env_path("XDG_STATE_HOME")
            .unwrap_or_else(|| home().join(".local/state"))
            .join("tether/runs")
    }
}

/// Check an existing directory without creating anything. `Ok(false)` when it is missing.
pub fn check_dir(what: &str, path: &Path) -> Result<bool> {
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::path(&format!("cannot inspect {what}"), path, e)),
    };
    let ft = md.file_type();
    if ft.is_symlink() {
        return Err(Error::tether(format!(
            "{what} {} is a symlink; refusing to follow it",
            path.display()
        )));
    }
    if !ft.is_dir() {
        return Err(Error::tether(format!(
            "{what} {} is not a directory",
            path.display()
        )));
    }
    let me = geteuid();
    if md.uid() != me.as_raw() && md.uid() != Uid::from_raw(0).as_raw() {
        return Err(Error::tether(format!(
            "{what} {} is owned by uid {}, not by uid {} or root",
            path.display(),
            md.uid(),
            me
        )));
    }
    let mode = md.mode();
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(Error::tether(format!(
            "{what} {} is group/world writable (mode {:o}) without the sticky bit",
            path.display(),
            mode & 0o7777
        )));
    }
    Ok(true)
}

/// Create a missing directory with `mode` (parents as needed), then check it.
pub fn ensure_dir(what: &str, path: &Path, mode: u32) -> Result<()> {
    if check_dir(what, path)? {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true).mode(mode);
    builder
        .create(path)
        .map_err(|e| Error::path(&format!("cannot create {what}"), path, e))?;
    // The umask may have narrowed the mode; set it exactly on the leaf we own.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::path(&format!("cannot chmod {what}"), path, e))?;
    check_dir(what, path).map(|_| ())
}

/// Refuse a directory we cannot write (checked with `access(2)`, which knows about root,
/// read-only mounts and ACLs).
pub fn check_writable(what: &str, path: &Path) -> Result<()> {
    use nix::unistd::{access, AccessFlags};
    access(path, AccessFlags::W_OK | AccessFlags::X_OK).map_err(|e| {
        Error::tether(format!(
            "{what} {} is not writable: {}",
            path.display(),
            e.desc()
        ))
    })
}
