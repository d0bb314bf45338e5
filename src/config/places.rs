//! Where tether's state lives by default (CLI-CONTRACT §3, DECISIONS D27), and whether we are root.
//! The defaults never depend on environment variables: the same user under cron, `su` or
//! `sudo -u` must find the same lock dir, or two runs of one app overlap. Each has a fallback
//! that `state::dirs` uses, with a warning, when the preferred dir is unusable.

use nix::unistd::geteuid;
use std::path::{Path, PathBuf};

pub(crate) fn is_root() -> bool {
    geteuid().is_root()
}

/// Where a state dir may live: the one place the operator named, or the built-in default
/// followed by its fallbacks.
#[derive(Debug, Clone)]
pub(crate) struct Place {
    pub(crate) candidates: Vec<PathBuf>,
}

impl Place {
    /// A dir named by flag, environment or config file: used as is, never replaced.
    pub(crate) fn given(path: PathBuf) -> Place {
        Place {
            candidates: vec![path],
        }
    }

    /// The default lock dir: `/run/lock/tether` for root (created at boot by
    /// `ci/tmpfiles.d/tether.conf`), else `<home>/.local/state/tether/locks`.
    pub(crate) fn default_lock_dir() -> Place {
        if is_root() {
            Place {
                candidates: vec![
                    PathBuf::from("/run/lock/tether"),
                    PathBuf::from("/var/lib/tether/locks"),
                ],
            }
        } else {
            Place::per_user("locks", format!("/tmp/tether-{}", geteuid()))
        }
    }

    /// The default runs dir: `/var/lib/tether/runs` for root, else
    /// `<home>/.local/state/tether/runs`.
    pub(crate) fn default_runs_dir() -> Place {
        if is_root() {
            Place::given(PathBuf::from("/var/lib/tether/runs"))
        } else {
            Place::per_user("runs", format!("/tmp/tether-{}/runs", geteuid()))
        }
    }

    /// `<home>/.local/state/tether/<leaf>`, with the home directory from the user database
    /// (not `$HOME`), then `fallback`.
    fn per_user(leaf: &str, fallback: String) -> Place {
        let home = nix::unistd::User::from_uid(geteuid())
            .ok()
            .flatten()
            .map(|u| u.dir)
            .filter(|d| d.is_absolute() && d != Path::new("/"));
        let mut candidates: Vec<PathBuf> = home
            .map(|h| h.join(".local/state/tether").join(leaf))
            .into_iter()
            .collect();
        candidates.push(PathBuf::from(fallback));
        Place { candidates }
    }

    /// The dir tether uses when nothing is wrong (for `config show`).
    pub(crate) fn preferred(&self) -> &Path {
        &self.candidates[0]
    }
}
