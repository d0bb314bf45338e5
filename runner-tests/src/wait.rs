//! Bounded waiting on files and lines: the suite's only way to learn that something happened.
//!
//! Every wait is a poll loop with a deadline (never a bare sleep hoping for an ordering).
//! `wait_*` panic on timeout with what was awaited and what was seen; `poll_*` return `bool`.
//! Line matching looks at complete lines only (ending in `\n`), so a line being written is
//! never matched half-way.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::POLL;

/// The one poll loop of the crate: calls `probe` (at least once) every `step` until it returns
/// `Some` or `timeout` passes; returns what it found. Every other wait of the fixture, of the
/// helper binaries and of the bench (with its finer steps) goes through this function.
pub fn poll_some_every<T>(
    timeout: Duration,
    step: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = probe() {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(step); // ordering-free: poll step under a deadline
    }
}

/// [`poll_some_every`] with the suite's step, [`POLL`].
pub fn poll_some<T>(timeout: Duration, probe: impl FnMut() -> Option<T>) -> Option<T> {
    poll_some_every(timeout, POLL, probe)
}

/// Like [`poll_some`], but panics on timeout saying what was awaited.
pub fn wait_some<T>(what: &str, timeout: Duration, probe: impl FnMut() -> Option<T>) -> T {
    match poll_some(timeout, probe) {
        Some(found) => found,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// Calls `cond` until it returns true or `timeout` passes; returns whether it did.
pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    poll_some(timeout, || cond().then_some(())).is_some()
}

/// Like [`poll_until`], but panics on timeout saying what was awaited.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    wait_some(what, timeout, || cond().then_some(()))
}

/// Polls `child` until it exits, reaping it; `None` if it is still running after `timeout`.
pub(crate) fn poll_exit(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    poll_some(timeout, || child.try_wait().ok().flatten())
}

/// Waits until `path` exists.
pub fn wait_file(path: impl AsRef<Path>, timeout: Duration) {
    let path = path.as_ref();
    if !poll_until(timeout, || path.exists()) {
        let dir = path.parent().map(listing).unwrap_or_default();
        panic!(
            "timed out after {timeout:?} waiting for file {}\nits directory holds: {dir}",
            path.display()
        );
    }
}

fn listing(dir: &Path) -> String {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            let mut names: Vec<String> = entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            format!("{names:?}")
        }
        Err(e) => format!("(unreadable: {e})"),
    }
}

/// Complete lines of `path` (a missing file has none).
pub(crate) fn complete_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let end = text.rfind('\n').map_or(0, |i| i + 1);
    text[..end].lines().map(str::to_owned).collect()
}

/// First complete line of `path` containing `substring`, if any.
pub(crate) fn find_line(path: &Path, substring: &str) -> Option<String> {
    complete_lines(path)
        .into_iter()
        .find(|l| l.contains(substring))
}

/// Waits for a complete line containing `substring` in `file`; returns that line.
pub fn wait_line(file: impl AsRef<Path>, substring: &str, timeout: Duration) -> String {
    let file = file.as_ref();
    if let Some(line) = poll_some(timeout, || find_line(file, substring)) {
        return line;
    }
    panic!(
        "timed out after {timeout:?} waiting for a line containing {substring:?} in {}\n\
         --- content ---\n{}",
        file.display(),
        String::from_utf8_lossy(&std::fs::read(file).unwrap_or_default())
    );
}

/// Number of complete lines of `file` containing `substring` (0 for a missing file).
pub fn count_lines(file: impl AsRef<Path>, substring: &str) -> usize {
    complete_lines(file.as_ref())
        .iter()
        .filter(|l| l.contains(substring))
        .count()
}

/// Polls until `file` has at least `n` complete lines containing `substring`: whether it did
/// in time, and the last count seen.
pub(crate) fn poll_count(
    file: &Path,
    substring: &str,
    n: usize,
    timeout: Duration,
) -> (bool, usize) {
    let mut count = 0;
    let found = poll_until(timeout, || {
        count = count_lines(file, substring);
        count >= n
    });
    (found, count)
}

/// Waits until `file` has at least `n` complete lines containing `substring`; returns the count.
pub fn wait_count(file: impl AsRef<Path>, substring: &str, n: usize, timeout: Duration) -> usize {
    let file = file.as_ref();
    let (found, count) = poll_count(file, substring, n, timeout);
    if found {
        return count;
    }
    panic!(
        "timed out after {timeout:?} waiting for {n} lines containing {substring:?} in {} \
         (have {count})\n--- content ---\n{}",
        file.display(),
        String::from_utf8_lossy(&std::fs::read(file).unwrap_or_default())
    );
}

/// Pids listed in `file`, one per line (the first field of each non-empty line).
/// Panics when the file is unreadable or a line is not a pid.
pub fn read_pids(file: impl AsRef<Path>) -> Vec<i32> {
    let file = file.as_ref();
    let text = std::fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("reading pids from {}: {e}", file.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
                .filter(|&p: &i32| p > 0)
                .unwrap_or_else(|| panic!("{}: not a pid line: {l:?}", file.display()))
        })
        .collect()
}

/// Waits for a pids file written atomically (as the helpers do), then reads it.
pub fn wait_pids(file: impl AsRef<Path>, timeout: Duration) -> Vec<i32> {
    wait_file(file.as_ref(), timeout);
    read_pids(file)
}

/// Parses `file` as JSON; `None` when it is missing, torn or not JSON.
pub fn read_json(file: impl AsRef<Path>) -> Option<serde_json::Value> {
    let text = std::fs::read(file.as_ref()).ok()?;
    serde_json::from_slice(&text).ok()
}
