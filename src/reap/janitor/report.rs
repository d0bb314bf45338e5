//! The janitor's report: one entry per thing it looked at, a line each, and the counts.

use crate::output;
use serde::Serialize;

/// One line of the report.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct Entry {
    /// `lockfile`, `run-dir` or `cgroup`.
    pub(crate) kind: &'static str,
    /// File or directory name inside its dir.
    pub(crate) name: String,
    /// live | reaped | removed | skipped | failed | kept | would-reap | would-remove
    pub(crate) action: &'static str,
    pub(crate) app: Option<String>,
    pub(crate) run_id: Option<String>,
    pub(crate) pid: Option<i32>,
    pub(crate) detail: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct Report {
    pub(crate) dry_run: bool,
    pub(crate) entries: Vec<Entry>,
    pub(crate) live: usize,
    /// Run dirs kept with `--keep-run-dir` within their retention.
    pub(crate) kept: usize,
    pub(crate) reaped: usize,
    pub(crate) removed: usize,
    pub(crate) skipped: usize,
    pub(crate) failed: usize,
}

impl Report {
    /// Say the entry and count it.
    pub(super) fn push(&mut self, e: Entry) {
        say(&e);
        match e.action {
            "live" => self.live += 1,
            "kept" => self.kept += 1,
            "reaped" | "would-reap" => self.reaped += 1,
            "removed" | "would-remove" => self.removed += 1,
            "skipped" => self.skipped += 1,
            "failed" => self.failed += 1,
            _ => {}
        }
        self.entries.push(e);
    }
}

impl Entry {
    /// The entry as a dry run says it: what would change is `would-reap` / `would-remove`;
    /// what changes nothing (`live`, `kept`, `skipped`) is said as it is.
    pub(super) fn would(mut self) -> Entry {
        self.action = match self.action {
            "reaped" => "would-reap",
            "removed" => "would-remove",
            other => other,
        };
        self
    }
}

pub(super) fn entry(kind: &'static str, name: &str, action: &'static str) -> Entry {
    Entry {
        kind,
        name: name.to_owned(),
        action,
        app: None,
        run_id: None,
        pid: None,
        detail: None,
    }
}

/// A thing the janitor leaves alone, and why.
pub(super) fn skipped(kind: &'static str, name: &str, app: Option<String>, why: String) -> Entry {
    Entry {
        app,
        detail: Some(why),
        ..entry(kind, name, "skipped")
    }
}

/// The entry's line (CLI-CONTRACT §15: `<domain>: live run <id> (pid <pid>), leaving it`, …).
fn say(e: &Entry) {
    // A lockfile is its app's; a run dir or cgroup is named (several may be one app's).
    let subject = match (e.kind, &e.app) {
        ("lockfile", Some(app)) => app.clone(),
        ("lockfile", None) => e.name.clone(),
        (kind, Some(app)) => format!("{} {} of {app}", kind.replace('-', " "), e.name),
        (kind, None) => format!("{} {}", kind.replace('-', " "), e.name),
    };
    let mut msg = match (e.action, &e.run_id, e.pid) {
        ("live", Some(id), Some(pid)) => {
            format!("{subject}: live run {id} (pid {pid}), leaving it")
        }
        ("live", _, pid) => format!(
            "{subject}: live run unknown (pid {}), leaving it",
            pid.map(|p| p.to_string())
                .unwrap_or_else(|| "unknown".into())
        ),
        (action, _, _) => format!("{subject}: {action}"),
    };
    if let Some(d) = &e.detail {
        msg.push_str(&format!(" — {d}"));
    }
    let level = match e.action {
        "failed" => output::Level::Error,
        "skipped" => output::Level::Warn,
        _ => output::Level::Info,
    };
    output::emit(level, e.action, &msg, &[]);
}
