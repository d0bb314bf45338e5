//! The run's last word (CLI-CONTRACT §13): one summary line, and the same as JSON for bots.
//!
//! The JSON file is replaced atomically (a sibling written whole, then renamed over it), so a
//! bot polling it reads the previous document or the new one, never a torn one; its directory
//! is checked before the run starts, so a typo in `--summary-json` fails fast (D31).

use crate::config::duration::human;
use crate::error::{Error, Result};
use crate::ident::ci_env::CiInfo;
use crate::output;
use crate::sys::safe_fs::Dir;
use serde::Serialize;
use std::io;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Summary {
    pub(crate) run_id: String,
    pub(crate) app: String,
    /// passed | failed | cancelled | deadline
    pub(crate) result: String,
    pub(crate) exit: i32,
    /// All the time spent waiting to start: the app lock, and the host slot with `--slots`.
    pub(crate) lock_wait_ms: u64,
    /// Of `lock_wait_ms`, the wait for a host slot; only with `--slots`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) slot_wait_ms: Option<u64>,
    pub(crate) runtime_ms: u64,
    /// ok | failed | none
    pub(crate) teardown: String,
    /// exited | signal | deadline | parent-died | agent-gone | busy | error
    pub(crate) reason: String,
    pub(crate) ci: Option<CiInfo>,
}

impl Summary {
    pub(crate) fn line(&self) -> String {
        let slot_wait = self
            .slot_wait_ms
            .map(|ms| format!(" slot_wait={}", human(Duration::from_millis(ms))))
            .unwrap_or_default();
        format!(
            "run {} summary: app={} result={} exit={} lock_wait={}{slot_wait} runtime={} teardown={}",
            word(&self.run_id),
            word(&self.app),
            self.result,
            self.exit,
            human(Duration::from_millis(self.lock_wait_ms)),
            human(Duration::from_millis(self.runtime_ms)),
            self.teardown
        )
    }

    /// Print the line (even under --quiet) and write the JSON file if asked.
    pub(crate) fn publish(&self, json_file: Option<&Path>) {
        let fields = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_object().cloned())
            .unwrap_or_default();
        let fields: Vec<(&str, serde_json::Value)> = fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        output::emit_forced(output::Level::Info, "summary", &self.line(), &fields, true);
        if let Some(path) = json_file {
            if let Err(e) = self.write_json(path) {
                output::warn(
                    "summary",
                    &format!("cannot write summary JSON {}: {e}", path.display()),
                );
            }
        }
    }

    /// Write the JSON document to `path`, replacing it atomically.
    pub(crate) fn write_json(&self, path: &Path) -> io::Result<()> {
        let mut text = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        text.push(b'\n');
        replace_file(path, &text)
    }
}

/// A value as one word of the line: `-` for one that is empty or would split it (an app
/// given as `"a b"` that failed validation; the JSON keeps the text as given).
fn word(value: &str) -> &str {
    if value.is_empty() || value.contains(char::is_whitespace) {
        "-"
    } else {
        value
    }
}

/// The directory `--summary-json` will be written in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Before anything starts: the file's directory must exist (else the summary would be lost
/// at the very end, after a whole run), and the path must not name a directory.
pub(crate) fn check_json_path(path: &Path) -> Result<()> {
    let dir = parent_dir(path);
    match std::fs::metadata(dir) {
        Ok(md) if md.is_dir() => {}
        Ok(_) => {
            return Err(Error::tether(format!(
                "--summary-json {}: {} is not a directory",
                path.display(),
                dir.display()
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::tether(format!(
                "--summary-json {}: directory {} does not exist",
                path.display(),
                dir.display()
            )))
        }
        Err(e) => {
            return Err(Error::tether(format!(
                "--summary-json {}: directory {}: {e}",
                path.display(),
                dir.display()
            )))
        }
    }
    if path.is_dir() {
        return Err(Error::tether(format!(
            "--summary-json {} is a directory",
            path.display()
        )));
    }
    Ok(())
}

/// Write `text` to a new sibling of `path` and rename it over `path`: readers see the old
/// file or the new one, whole. The sibling is created exclusively and without following a
/// symlink, so nothing planted under its name is written through; both steps happen relative
/// to the directory's fd.
fn replace_file(path: &Path, text: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"))?;
    // The operator's own directory, opened as named (symlinks on the way are theirs).
    let dir = Dir::open_unchecked(parent_dir(path))?;
    let pid = std::process::id();
    for attempt in 0..16 {
        let tmp = format!(".{}.tmp-{pid}-{attempt}", name.to_string_lossy());
        match dir.write_new(&tmp, text, 0o666) {
            Ok(()) => {}
            // A leftover of an earlier tether that had our pid: take the next name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
        return dir.rename(&tmp, &dir, name).inspect_err(|_| {
            let _ = dir.unlink(&tmp);
        });
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "no free name for the temporary summary file",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn summary(run_id: &str) -> Summary {
        Summary {
            run_id: run_id.into(),
            app: "a.example.org".into(),
            result: "passed".into(),
            exit: 0,
            lock_wait_ms: 1,
            slot_wait_ms: None,
            runtime_ms: 2,
            teardown: "none".into(),
            reason: "exited".into(),
            ci: None,
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// A reader polling the file while it is rewritten 2,000 times (documents of two sizes)
    /// only ever finds one of them whole: never missing, empty, torn or with a tail of the
    /// longer one. Fails against `std::fs::write` (truncate, then write in place).
    #[test]
    fn a_reader_never_finds_a_torn_summary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("summary.json");
        let long = "x".repeat(3000);
        summary("short").write_json(&path).unwrap();
        let stop = AtomicBool::new(false);
        let (reads, bad) = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let (mut reads, mut bad) = (0u32, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let text = std::fs::read(&path).unwrap_or_default();
                    match serde_json::from_slice::<serde_json::Value>(&text) {
                        Ok(v) if v["run_id"] == "short" || v["run_id"] == long.as_str() => {}
                        _ => bad.push(text.len()),
                    }
                    reads += 1;
                }
                (reads, bad)
            });
            for i in 0..2000 {
                let id = if i % 2 == 0 { long.as_str() } else { "short" };
                summary(id).write_json(&path).unwrap();
            }
            stop.store(true, Ordering::Relaxed);
            reader.join().unwrap()
        });
        assert!(reads > 0);
        assert!(
            bad.is_empty(),
            "{} of {reads} reads found no whole summary (sizes {:?})",
            bad.len(),
            &bad[..bad.len().min(10)]
        );
        assert_eq!(
            names(dir.path()),
            ["summary.json"],
            "no temporary file is left"
        );
    }

    #[test]
    fn a_symlink_planted_at_the_temporary_name_is_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let planted = dir
            .path()
            .join(format!(".s.json.tmp-{}-0", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        summary("r1").write_json(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(std::fs::symlink_metadata(&planted).unwrap().is_symlink());
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["run_id"], "r1");
    }

    #[test]
    fn a_missing_directory_is_found_before_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope/s.json");
        let e = check_json_path(&missing).unwrap_err();
        assert!(
            e.message.contains(&missing.display().to_string()),
            "{}",
            e.message
        );
        assert!(e.message.ends_with("nope does not exist"), "{}", e.message);
        let e = check_json_path(dir.path()).unwrap_err();
        assert!(e.message.ends_with("is a directory"), "{}", e.message);
        let file = dir.path().join("f");
        std::fs::write(&file, "").unwrap();
        let e = check_json_path(&file.join("s.json")).unwrap_err();
        assert!(e.message.contains("is not a directory"), "{}", e.message);
        check_json_path(&dir.path().join("s.json")).unwrap();
        check_json_path(Path::new("s.json")).unwrap();
        // A failed write (the path names a directory) leaves no temporary file behind.
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert!(summary("r").write_json(&sub).is_err());
        assert_eq!(names(dir.path()), ["f", "sub"]);
    }
}
