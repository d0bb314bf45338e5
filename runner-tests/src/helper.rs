//! What the helper binaries (`src/bin/`) share: their command line and the ready files they
//! announce themselves with. Not for the tests themselves.
//!
//! - [`Cli`] walks `argv` and reports bad usage the same way in every helper: `NAME: message`
//!   and `usage: …` on stderr, exit status 2;
//! - [`Cli::write_ready`] writes a ready (or pids, stamp, listing) file atomically: `F.tmp`,
//!   then rename to `F`, so a test that sees F (`wait_file`, `wait_pids`) never reads a partial
//!   one. An error there is `NAME: writing F: …`, exit status 1.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::exit;
use std::str::FromStr;

/// The command line of one helper binary, see the module doc.
pub struct Cli {
    name: &'static str,
    synopsis: &'static str,
    args: std::iter::Skip<std::env::ArgsOs>,
}

impl Cli {
    /// `name` prefixes every message; `synopsis` is the usage line after `usage: `.
    pub fn new(name: &'static str, synopsis: &'static str) -> Cli {
        Cli {
            name,
            synopsis,
            args: std::env::args_os().skip(1),
        }
    }

    /// Says `msg` and the usage line on stderr; exits 2.
    pub fn usage(&self, msg: &str) -> ! {
        eprintln!("{}: {msg}", self.name);
        eprintln!("usage: {}", self.synopsis);
        exit(2)
    }

    /// Says `msg` on stderr; exits 1 (an OS error, not bad usage).
    pub fn fail(&self, msg: &str) -> ! {
        eprintln!("{}: {msg}", self.name);
        exit(1)
    }

    /// Bad usage: `arg` is not one this helper takes.
    pub fn unexpected(&self, arg: &OsString) -> ! {
        self.usage(&format!("unexpected argument {arg:?}"))
    }

    /// The value of option `flag` (the next argument); bad usage when there is none.
    pub fn value(&mut self, flag: &str) -> OsString {
        match self.args.next() {
            Some(value) => value,
            None => self.usage(&format!("{flag} needs a value")),
        }
    }

    /// The value of `flag` as a path.
    pub fn path(&mut self, flag: &str) -> PathBuf {
        PathBuf::from(self.value(flag))
    }

    /// The value of `flag` as UTF-8 text.
    pub fn text(&mut self, flag: &str) -> String {
        let value = self.value(flag);
        value
            .into_string()
            .unwrap_or_else(|v| self.usage(&format!("{flag}: not UTF-8: {v:?}")))
    }

    /// The value of `flag` as a number; bad usage (`{flag} takes a number`) otherwise.
    pub fn number<T: FromStr>(&mut self, flag: &str) -> T {
        let value = self.value(flag);
        self.parse_number(Some(value), flag)
    }

    /// `value` (of `what`) as a number; bad usage (`{what} takes a number`) when it is missing
    /// or not one.
    pub fn parse_number<T: FromStr>(&self, value: Option<OsString>, what: &str) -> T {
        value
            .as_ref()
            .and_then(|v| v.to_str())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| self.usage(&format!("{what} takes a number")))
    }

    /// `value` of option `flag`; bad usage (`{flag} is required`) when it was not given.
    pub fn required<T>(&self, value: Option<T>, flag: &str) -> T {
        value.unwrap_or_else(|| self.usage(&format!("{flag} is required")))
    }

    /// Writes `content` to `path` atomically (`path.tmp`, then rename); on an error says so and
    /// exits 1.
    pub fn write_ready(&self, path: &Path, content: impl AsRef<[u8]>) {
        if let Err(e) = write_atomic(path, content.as_ref()) {
            self.fail(&format!("writing {}: {e}", path.display()));
        }
    }

    /// Writes this process's pid and a newline to the ready file `path`, atomically.
    pub fn write_pid(&self, path: &Path) {
        self.write_ready(path, format!("{}\n", std::process::id()));
    }
}

impl Iterator for Cli {
    type Item = OsString;

    /// The next argument (an option's value is taken with [`Cli::value`] and its kin).
    fn next(&mut self) -> Option<OsString> {
        self.args.next()
    }
}

/// Writes `content` to `path.tmp`, then renames it to `path`: a reader never sees `path`
/// partly written.
pub fn write_atomic(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)
}
