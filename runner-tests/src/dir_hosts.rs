//! "Hosts" as directories: one sandbox, each host with its own lock dir and runs dir, so their
//! `flock`s are separate kernel objects and only the cluster lock can keep their runs of one
//! app apart (issue 16). The cluster suites (`cluster_lock.rs`, `cluster_fence.rs`) share it;
//! hosts as network namespaces, with real partitions, are a fixture of their own.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::pg::{PASSWORD, PASSWORD_ENV};
use crate::{Sandbox, TetherCmd};

/// One simulated host: its own lock dir and runs dir.
pub struct DirHost {
    pub lock: PathBuf,
    pub runs: PathBuf,
}

/// Make host `name` under the sandbox (lock dir 0755, runs dir 0700).
pub fn dir_host(sb: &Sandbox, name: &str) -> DirHost {
    let root = sb.path().join(name);
    let h = DirHost {
        lock: root.join("locks"),
        runs: root.join("runs"),
    };
    for (dir, mode) in [(&root, 0o755), (&h.lock, 0o755), (&h.runs, 0o700)] {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        fs::set_permissions(dir, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
    }
    h
}

impl DirHost {
    /// `tether run` on this host with the cluster config `cfg` and the suite's password.
    pub fn run<'a>(&self, sb: &'a Sandbox, cfg: &Path, app: &str, id: &str) -> TetherCmd<'a> {
        sb.tether_run()
            .no_sandbox_dirs()
            .arg("--lock-dir")
            .arg(&self.lock)
            .arg("--runs-dir")
            .arg(&self.runs)
            .arg("--config")
            .arg(cfg)
            .app(app)
            .run_id(id)
            .env(PASSWORD_ENV, PASSWORD)
    }
}
