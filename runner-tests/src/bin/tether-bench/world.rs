//! What a figure runs in: the context (binaries, mode) and a fresh world per figure.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use runner_tests::Sandbox;

pub struct Ctx {
    pub quick: bool,
    pub tether: PathBuf,
    pub stamp: PathBuf,
    pub tree: PathBuf,
    pub python: Option<PathBuf>,
    /// The CI variables of this environment (`runner_tests::ci_vars`), removed from every
    /// command's.
    pub scrub: Vec<OsString>,
    /// `--tether-env K=V`: extra environment for tether only (for investigations).
    pub tether_env: Vec<(String, String)>,
}

impl Ctx {
    /// `quick` in quick mode, else `full`.
    pub fn n(&self, quick: usize, full: usize) -> usize {
        if self.quick {
            quick
        } else {
            full
        }
    }

    /// A command with the CI/TETHER environment removed, stdin and stdout from/to
    /// `/dev/null` and stderr appended to `log`.
    pub fn command(&self, prog: impl AsRef<OsStr>, log: &File) -> Command {
        let mut c = Command::new(prog);
        for k in &self.scrub {
            c.env_remove(k);
        }
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(
            log.try_clone()
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null()),
        );
        c
    }

    /// `tether <sub> --lock-dir <locks> --runs-dir <runs>`.
    pub fn tether(&self, sub: &str, dirs: &Dirs, log: &File) -> Command {
        let mut c = self.command(&self.tether, log);
        c.envs(self.tether_env.iter().map(|(k, v)| (k, v)));
        c.arg(sub)
            .arg("--lock-dir")
            .arg(&dirs.locks)
            .arg("--runs-dir")
            .arg(&dirs.runs);
        c
    }

    /// `tether run --app <app> --run-id <id> [extra] -- <cmd>` in the sandbox.
    pub fn tether_run<S: AsRef<OsStr>>(
        &self,
        dirs: &Dirs,
        log: &File,
        (app, run_id): (&str, &str),
        extra: &[&str],
        cmd: &[S],
    ) -> Command {
        let mut c = self.tether("run", dirs, log);
        c.arg("--app")
            .arg(app)
            .arg("--run-id")
            .arg(run_id)
            .args(extra)
            .arg("--")
            .args(cmd);
        c
    }
}

/// A fresh directory on tmpfs (`/dev/shm`), removed on drop; `path()` is `None` without one.
pub struct ShmDir(Option<PathBuf>);

impl ShmDir {
    pub fn new(tag: &str) -> Result<ShmDir, String> {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            return Ok(ShmDir(None));
        }
        let dir = shm.join(format!("tether-bench-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            })
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
        Ok(ShmDir(Some(dir)))
    }

    pub fn path(&self) -> Option<&Path> {
        self.0.as_deref()
    }
}

impl Drop for ShmDir {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// One figure's private world: a sandbox (runs dir, marks, logs; its drop kills whatever
/// still mentions it) and a lock dir on tmpfs when there is one — where tether's defaults put
/// them on a normal host: `/run/lock/tether` is tmpfs, `/var/lib/tether/runs` is disk. The
/// baselines' lockfiles live in the same lock dir.
pub struct World {
    // Field order is drop order: kill the processes first, then remove the lock dir.
    pub sb: Sandbox,
    pub _shm: ShmDir,
    pub marks: ShmDir,
    pub dirs: Dirs,
}

impl World {
    pub fn new(tag: &str) -> Result<World, String> {
        let sb = Sandbox::new();
        let shm = ShmDir::new(tag)?;
        let dirs = Dirs {
            locks: shm.path().map_or_else(|| sb.lock_dir(), Path::to_path_buf),
            runs: sb.runs_dir(),
        };
        // Not inside the lock dir: B5 counts what the janitor leaves there.
        let marks = ShmDir::new(&format!("{tag}-marks"))?;
        Ok(World {
            sb,
            _shm: shm,
            marks,
            dirs,
        })
    }

    /// A marker file for the commands' stamps: on tmpfs when there is one, so that the
    /// instrument's own file writes (one per stamp, in both tether's and the baseline's
    /// commands) do not add the disk's metadata latency to what is measured.
    pub fn mark(&self, name: &str) -> PathBuf {
        match self.marks.path() {
            Some(dir) => dir.join(name),
            None => self.sb.mark(name),
        }
    }

    /// A baseline's lockfile, in the same lock dir as tether's.
    pub fn lock(&self, name: &str) -> PathBuf {
        self.dirs.locks.join(name)
    }
}

/// tether's `--lock-dir` and `--runs-dir`.
pub struct Dirs {
    pub locks: PathBuf,
    pub runs: PathBuf,
}

impl Dirs {
    pub fn lock_path(&self, app: &str) -> PathBuf {
        self.locks.join(format!("app-{app}.lock"))
    }
}

pub fn log_file(sb: &Sandbox, name: &str) -> Result<File, String> {
    let path = sb.path().join("logs").join(name);
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("opening {}: {e}", path.display()))
}

/// The last lines of a log, for error messages.
pub fn log_tail(sb: &Sandbox, name: &str) -> String {
    let text = fs::read_to_string(sb.path().join("logs").join(name)).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n    ")
}
