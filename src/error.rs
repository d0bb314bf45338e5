//! tether's own failures, mapped exhaustively onto the exit codes of CLI-CONTRACT §7.
//!
//! Everything that can go wrong *before* the command starts is one of these, carries a
//! lowercase sentence naming the culprit (path, value, pid, errno), and leaves nothing
//! behind. After the command starts tether no longer fails fast: it logs and tears down.

use std::fmt;
use std::io;
use std::path::Path;

/// The class of a failure: decides the exit code, nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Bad arguments, config, directories, run id in use, teardown failed after a pass.
    Tether,
    /// The command exists but cannot be executed.
    NotExecutable,
    /// The command was not found.
    NotFound,
    /// The cluster's database is unreachable: nothing was done, retry later.
    Unavailable,
}

impl Failure {
    pub(crate) fn exit_code(self) -> i32 {
        match self {
            Failure::Tether => crate::exit::TETHER_FAILURE,
            Failure::NotExecutable => crate::exit::NOT_EXECUTABLE,
            Failure::NotFound => crate::exit::NOT_FOUND,
            Failure::Unavailable => crate::exit::UNAVAILABLE,
        }
    }
}

/// One failure with its message. `Display` is the message alone.
#[derive(Debug)]
pub(crate) struct Error {
    pub(crate) failure: Failure,
    pub(crate) message: String,
}

pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn new(failure: Failure, message: impl Into<String>) -> Self {
        Error {
            failure,
            message: message.into(),
        }
    }

    /// A tether failure (exit 125).
    pub(crate) fn tether(message: impl Into<String>) -> Self {
        Error::new(Failure::Tether, message)
    }

    /// An OS call failed on a path: `<what> <path>: <errno text>`.
    pub(crate) fn path(what: &str, path: &Path, err: io::Error) -> Self {
        Error::tether(format!("{what} {}: {err}", path.display()))
    }

    pub(crate) fn exit_code(&self) -> i32 {
        self.failure.exit_code()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}
