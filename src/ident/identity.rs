//! `run_as` (CLI-CONTRACT §10): the command drops to a user (and group) in the child before `exec`;
//! setup and teardown stay as the invoking user.
//!
//! Resolved up front, so an unknown user or group is a validation error (exit 125) before
//! anything is created; and refused when tether is not root (a non-root tether cannot switch
//! users, and pretending to would run the command as the wrong user).

use crate::config::RunAs;
use crate::error::{Error, Result};
use nix::unistd::{Gid, Group, Uid, User};
use std::ffi::CString;
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub(crate) user: String,
    pub(crate) uid: Uid,
    pub(crate) gid: Gid,
    /// Supplementary groups (initgroups equivalent).
    pub(crate) groups: Vec<Gid>,
    pub(crate) home: PathBuf,
}

pub(crate) fn resolve(ra: &RunAs) -> Result<Identity> {
    if !crate::config::places::is_root() {
        return Err(Error::tether(not_root(ra)));
    }
    lookup(ra)
}

/// `tether config check`'s look at `run_as`: the user and group must exist (an error, as at
/// run time); checked by a non-root user, a warning that `tether run` would refuse it here.
pub(crate) fn check(ra: &RunAs) -> Result<Option<String>> {
    lookup(ra)?;
    Ok((!crate::config::places::is_root()).then(|| not_root(ra)))
}

fn not_root(ra: &RunAs) -> String {
    format!(
        "run_as user {:?} needs tether to run as root (it runs as uid {})",
        ra.user,
        nix::unistd::geteuid()
    )
}

/// The user and group of `run_as`, as they exist on this host.
fn lookup(ra: &RunAs) -> Result<Identity> {
    let user = User::from_name(&ra.user)
        .map_err(|e| Error::tether(format!("run_as user {:?}: {e}", ra.user)))?
        .ok_or_else(|| Error::tether(format!("run_as user {:?} does not exist", ra.user)))?;
    let gid = match &ra.group {
        Some(g) => {
            Group::from_name(g)
                .map_err(|e| Error::tether(format!("run_as group {g:?}: {e}")))?
                .ok_or_else(|| Error::tether(format!("run_as group {g:?} does not exist")))?
                .gid
        }
        None => user.gid,
    };
    let name = CString::new(user.name.clone())
        .map_err(|_| Error::tether(format!("run_as user {:?}: invalid name", ra.user)))?;
    let mut groups = nix::unistd::getgrouplist(&name, gid)
        .map_err(|e| Error::tether(format!("run_as user {:?}: group list: {e}", ra.user)))?;
    if !groups.contains(&gid) {
        groups.push(gid);
    }
    Ok(Identity {
        user: user.name,
        uid: user.uid,
        gid,
        groups,
        home: user.dir,
    })
}
