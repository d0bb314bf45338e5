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
