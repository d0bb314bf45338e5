//! Small utilities: bounded waits, process handling, /proc, time.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use runner_tests::poll_some_every;

/// Poll step of the latency-sensitive waits (a bounded loop each time).
pub const STEP: Duration = Duration::from_micros(200);
/// Bound on any single wait: far beyond any sane figure; hitting it is an error.
pub const LIMIT: Duration = Duration::from_secs(30);
pub const MIB: f64 = 1024.0 * 1024.0;

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Polls `cond` every `step` until it holds; `Err` naming `what` after `timeout`.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    step: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<(), String> {
    poll_some_every(timeout, step, || cond().then_some(()))
        .ok_or_else(|| format!("timed out after {timeout:?} waiting for {what}"))
}

pub fn wait_file(path: &Path) -> Result<(), String> {
    wait_for(&format!("file {}", path.display()), LIMIT, STEP, || {
        path.exists()
    })
}

/// CLOCK_MONOTONIC now, in nanoseconds (the clock `stamp` writes).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which lives for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn read_ns(path: &Path) -> Result<u64, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    text.trim()
        .parse()
        .map_err(|e| format!("{}: not a timestamp ({e}): {text:?}", path.display()))
}

pub fn touch(path: &Path) -> Result<(), String> {
    File::create(path)
        .map(drop)
        .map_err(|e| format!("creating {}: {e}", path.display()))
}

/// Whether nobody holds a flock on `path` (try-lock, released at once). Never panics.
pub fn lock_free(path: &Path) -> bool {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(_) => false,
        Ok(f) => f.try_lock().is_ok(),
    }
}

/// Blocks (no polling: a pidfd) until `child` exits, then reaps it. After `timeout` the
/// child is SIGKILLed and reaped and an error returned.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Result<ExitStatus, String> {
    let pid = child.id() as libc::c_int;
    // SAFETY: pidfd_open(2) on our own child, not yet reaped; returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as libc::c_int;
    let deadline = Instant::now() + timeout;
    if raw >= 0 {
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll(2) on one pollfd we own.
            let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1 << 30) as i32) };
            if n > 0 {
                break;
            }
            let interrupted =
                n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted;
            if !interrupted && Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("pid {pid} still running after {timeout:?}: killed"));
            }
        }
    } else {
        let polled = poll_some_every(timeout, STEP, || match child.try_wait() {
            Ok(Some(st)) => Some(Ok(st)),
            Ok(None) => None,
            Err(e) => Some(Err(format!("waiting for pid {pid}: {e}"))),
        });
        return polled.unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("pid {pid} still running after {timeout:?}: killed"))
        });
    }
    child
        .wait()
        .map_err(|e| format!("waiting for pid {pid}: {e}"))
}

/// Spawns `cmd` and waits (bounded by `timeout`) for it to exit: its status and the time from
/// just before the spawn to the exit, in ms.
pub fn timed_run(cmd: &mut Command, timeout: Duration) -> Result<(ExitStatus, f64), String> {
    let t0 = Instant::now();
    let mut child = spawn(cmd)?;
    let st = wait_exit(&mut child, timeout)?;
    Ok((st, ms(t0.elapsed())))
}

/// Exit code the way a shell reports it.
pub fn code_of(st: ExitStatus) -> i32 {
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

/// Reaps every zombie child. Only called when no `Child` of ours is still unwaited (it would
/// steal its status): between iterations and figures.
pub fn reap_orphans() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid(2) with WNOHANG on any child.
        let r = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if r <= 0 {
            break;
        }
    }
}

pub fn term(pid: u32) {
    // SAFETY: kill(2) of a pid we started and have not reaped yet.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
}

/// `/proc/<pid>/task/<pid>/children`.
pub fn children_of(pid: u32) -> Vec<u32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// A `kB` line of a /proc file (`VmHWM:`, `VmRSS:`, `Pss:`), in bytes.
pub fn proc_kb(pid: u32, file: &str, key: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

pub fn read_pids(path: &Path) -> Result<Vec<i32>, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

pub fn first_line(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "?".to_owned())
}

pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned())
}

/// UTC date and time of `t` (civil-from-days, proleptic Gregorian).
pub fn utc(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub fn spawn(cmd: &mut Command) -> Result<Child, String> {
    cmd.spawn()
        .map_err(|e| format!("spawning {:?}: {e}", cmd.get_program()))
}

pub fn os(p: &Path) -> OsString {
    p.as_os_str().to_owned()
}
