//! Small file and naming helpers every suite file needs: unique run ids per sandbox, marker
//! files, log files written by commands, directory listings, and the shell snippet commands use
//! to wait (bounded) for a marker.

use crate::Sandbox;
use std::fs;
use std::path::{Path, PathBuf};

/// The random part of the sandbox's directory name: run ids that contain it never collide
/// with another test's (cgroups and environment markers are host-wide).
pub fn suffix(sb: &Sandbox) -> String {
    let root = sb.path().file_name().unwrap_or_default().to_string_lossy();
    root.rsplit('-').next().unwrap_or_default().to_owned()
}

/// A run id unique to this sandbox: `<name>-<sandbox suffix>`.
pub fn rid(sb: &Sandbox, name: &str) -> String {
    format!("{name}-{}", suffix(sb))
}

/// Make `path` (not followed if a symlink) look `secs` old: its access and modification times
/// set that far back. A janitor judges a record's retention and a cgroup's `--orphan-age` by
/// the mtime, so a test ages an item without waiting.
pub fn backdate(path: &Path, secs: i64) {
    use nix::sys::time::TimeSpec;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    let then = TimeSpec::new(now - secs, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &then,
        &then,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap_or_else(|e| panic!("backdating {}: {e}", path.display()));
}

/// Create an empty marker file.
pub fn touch(path: &Path) {
    fs::write(path, b"").unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
}

/// Complete lines of a log file written by commands and teardowns (a line still being
/// written is left out).
pub fn log_lines(path: &Path) -> Vec<String> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let end = text.rfind('\n').map_or(0, |i| i + 1);
    text[..end].lines().map(str::to_owned).collect()
}

/// The run journal's files, which live in the runs dir beside the run dirs (issue 17).
pub const JOURNAL_FILES: &[&str] = &[".history.jsonl", ".history.jsonl.1"];

/// The runs dir's pool of record inodes (D88): runs move their record files there instead of
/// deleting them, and take their spares from there.
pub const SPARE_POOL: &str = ".spares";

/// The run dirs (and anything else left) in a runs dir, sorted: its entries without the run
/// journal, which every finished run appends to by design, and the spare pool, which every
/// run that claimed a run dir gives its record files to.
pub fn run_dirs(runs_dir: &Path) -> Vec<String> {
    names(runs_dir)
        .into_iter()
        .filter(|n| !JOURNAL_FILES.contains(&n.as_str()) && n != SPARE_POOL)
        .collect()
}

/// Names in a directory, sorted (a missing directory has none).
pub fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Shell snippet: wait (polling, bounded to ~30 s) until the file named by the shell word
/// `word` exists; `exit 99` if it never does.
pub fn sh_wait_for(word: &str) -> String {
    format!(
        "i=0; while [ ! -e {word} ]; do i=$((i+1)); \
         if [ $i -gt 3000 ]; then exit 99; fi; sleep 0.01; done"
    )
}

/// Write a config (or any) file into the sandbox.
pub fn write_config(sb: &Sandbox, name: &str, text: &str) -> PathBuf {
    let path = sb.path().join(name);
    fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

/// A recursive description of everything under `root` except the top-level names in `skip`:
/// names, modes, sizes, inodes, mtimes, symlink targets and the content of regular files.
/// Equal snapshots mean nothing was created, removed or written. Never follows a symlink and
/// never opens a FIFO.
pub fn snapshot(root: &Path, skip: &[&str]) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for path in entries.flatten().map(|e| e.path()) {
            if skip.iter().any(|s| path == root.join(s)) {
                continue;
            }
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .display()
                .to_string();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                out.push(format!("{rel} (vanished)"));
                continue;
            };
            let mut line = format!(
                "{rel} mode={:o} len={} ino={} mtime={}.{}",
                meta.mode(),
                meta.len(),
                meta.ino(),
                meta.mtime(),
                meta.mtime_nsec()
            );
            if meta.file_type().is_symlink() {
                line.push_str(&format!(" -> {:?}", fs::read_link(&path).ok()));
            } else if meta.is_dir() {
                stack.push(path.clone());
            } else if meta.is_file() {
                line.push_str(&format!(
                    " content={:?}",
                    String::from_utf8_lossy(&fs::read(&path).unwrap_or_default())
                ));
            }
            out.push(line);
        }
    }
    out.sort();
    out
}

/// Waits until the app lock of `domain` names run `id` as `running`; returns the holder's pid
/// from the metadata (the core's pid, CLI-CONTRACT).
pub fn wait_holder_pid(sb: &Sandbox, domain: &str, id: &str) -> i32 {
    crate::wait_some(
        &format!("lock metadata of {domain} naming run {id} as running"),
        crate::TIMEOUT,
        || {
            sb.lock_metadata(domain).and_then(|m| {
                (m["run_id"] == id && m["state"] == "running").then(|| m["pid"].as_i64())?
            })
        },
    ) as i32
}
