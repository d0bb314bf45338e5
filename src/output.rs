//! Human (and machine) lines on stderr: every line starts `tether: `, or with
//! `--log-format json` is one JSON object per line (CLI-CONTRACT §13).
//!
//! Each line is formatted whole and written with one `write` so lines of concurrent runs
//! sharing a CI log never interleave mid-line. A failed write to stderr is ignored: losing a
//! log line must never stop a teardown. That is the normal case once the CI agent died: its
//! end of the pipe is gone, every write fails with EPIPE (Rust ignores SIGPIPE), and the run
//! still has its teardown to do (D32). Nothing here uses `eprintln!`/`println!`, which panic
//! on a failed write.

use serde_json::{Map, Value};
use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Settings {
    format: LogFormat,
    /// Lines below this level are dropped.
    threshold: Level,
}

// Process-wide and set from the single main thread; atomics keep it free of locks.
static FORMAT: AtomicU8 = AtomicU8::new(0);
static THRESHOLD: AtomicU8 = AtomicU8::new(1);

/// Configure as soon as the flags are parsed.
pub(crate) fn init(format: LogFormat, quiet: bool, verbose: bool) {
    let threshold = if quiet {
        Level::Warn
    } else if verbose {
        Level::Debug
    } else {
        Level::Info
    };
    set_format(format);
    THRESHOLD.store(threshold as u8, Ordering::Relaxed);
}

/// The format may come from the config file, read after the flags.
pub(crate) fn set_format(format: LogFormat) {
    FORMAT.store(u8::from(format == LogFormat::Json), Ordering::Relaxed);
}

fn settings() -> Settings {
    let format = if FORMAT.load(Ordering::Relaxed) == 1 {
        LogFormat::Json
    } else {
        LogFormat::Text
    };
    let threshold = match THRESHOLD.load(Ordering::Relaxed) {
        0 => Level::Debug,
        1 => Level::Info,
        2 => Level::Warn,
        _ => Level::Error,
    };
    Settings { format, threshold }
}

/// Emit one line. `event` names the moment for JSON readers; `fields` add machine data.
pub(crate) fn emit(level: Level, event: &str, msg: &str, fields: &[(&str, Value)]) {
    emit_forced(level, event, msg, fields, false)
}

/// The summary is printed even under `--quiet`: it is the one line a CI log must end with.
pub(crate) fn emit_forced(
    level: Level,
    event: &str,
    msg: &str,
    fields: &[(&str, Value)],
    force: bool,
) {
    let s = settings();
    if level < s.threshold && !force {
        return;
    }
    let label = match level {
        Level::Error => "error: ",
        Level::Warn => "warning: ",
        Level::Info | Level::Debug => "",
    };
    write_line(s.format, level, label, event, msg, fields);
}

/// A command line tether could not parse (issue 18): `tether: usage: <msg>`, or a JSON line
/// with level `error` and event `usage`. Never filtered: it is the only line such a run prints.
pub(crate) fn usage(msg: &str, fields: &[(&str, Value)]) {
    write_line(
        settings().format,
        Level::Error,
        "usage: ",
        "usage",
        msg,
        fields,
    );
}

/// One line, formatted whole; `label` follows `tether: ` in text and is not part of the JSON.
fn write_line(
    format: LogFormat,
    level: Level,
    label: &str,
    event: &str,
    msg: &str,
    fields: &[(&str, Value)],
) {
    let line = match format {
        LogFormat::Text => format!("tether: {label}{msg}\n"),
        LogFormat::Json => {
            let mut obj = Map::new();
            obj.insert("level".into(), Value::from(level.name()));
            obj.insert("event".into(), Value::from(event));
            obj.insert("msg".into(), Value::from(msg));
            for (k, v) in fields {
                obj.insert((*k).to_string(), v.clone());
            }
            let mut text = Value::Object(obj).to_string();
            text.push('\n');
            text
        }
    };
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Text for stdout (`--json` documents, `status`, `config show`), written whole; a failed
/// write (a closed pipe: `tether status | head -1`) is ignored instead of panicking.
pub(crate) fn stdout(text: &str) {
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

pub(crate) fn info(event: &str, msg: &str) {
    emit(Level::Info, event, msg, &[]);
}

pub(crate) fn warn(event: &str, msg: &str) {
    emit(Level::Warn, event, msg, &[]);
}

pub(crate) fn error(msg: &str) {
    emit(Level::Error, "error", msg, &[]);
}

pub(crate) fn debug(event: &str, msg: &str) {
    emit(Level::Debug, event, msg, &[]);
}
