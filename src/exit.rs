//! The exit codes of CLI-CONTRACT §7, in one place so no other module spells a number.

/// SIGTERM received, or the parent died (128 + 15).
pub(crate) const TERMINATED: i32 = 143;
/// SIGINT received (128 + 2).
pub(crate) const INTERRUPTED: i32 = 130;
/// SIGHUP received (128 + 1).
pub(crate) const HUNG_UP: i32 = 129;
/// The deadline passed (128 + SIGALRM).
pub(crate) const DEADLINE: i32 = 142;
/// The app lock could not be had under the busy policy; nothing was run.
pub(crate) const BUSY: i32 = 75;
/// The cluster's database could not be reached: retry later (EX_TEMPFAIL, like `BUSY`).
pub(crate) const UNAVAILABLE: i32 = 75;
/// tether's own failure.
pub(crate) const TETHER_FAILURE: i32 = 125;
/// The command is not executable.
pub(crate) const NOT_EXECUTABLE: i32 = 126;
/// The command was not found.
pub(crate) const NOT_FOUND: i32 = 127;

/// A process killed by signal `n` is reported as the shell does: 128 + n.
pub(crate) fn from_signal(n: i32) -> i32 {
    128 + n
}
