//! Test-only pause points (cargo feature `fault-injection`, enabled only in the suite's build):
//! the suite holds tether at a point where a race would otherwise need luck.

#[cfg(feature = "fault-injection")]
use std::time::{Duration, Instant};

/// When the variable `var` names a path: create `<path>.waiting`, then poll until `<path>`
/// exists (at most 60 s). Compiled out of release builds.
#[cfg(feature = "fault-injection")]
pub(crate) fn fault_pause(var: &str) {
    let Some(path) = std::env::var_os(var) else {
        return;
    };
    let path = std::path::PathBuf::from(path);
    let mut waiting = path.clone().into_os_string();
    waiting.push(".waiting");
    // path-ok: test-only fault injection marker (feature fault-injection)
    let _ = std::fs::write(&waiting, std::process::id().to_string());
    let until = Instant::now() + Duration::from_secs(60);
    while !path.exists() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(2)); // polling a marker file, bounded
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub(crate) fn fault_pause(_var: &str) {}
