//! A lease the supervisor watches (issue 16 §4, PROTOCOL §16): a pipe on which a helper reports
//! each renewal (with the time its request was *sent*) or its failure, and the window within
//! which the next renewal must be seen. The supervisor turns a failure, a closed pipe or an
//! expired window into one `Event::LockLost`, in every wait of the run — so setup, the command,
//! the slot wait, a reap and the teardown all notice it the same way.
//!
//! Plain data on purpose: `sys` knows nothing of PostgreSQL or app locks. The writer (the
//! cluster heartbeat in `state/`) and the reader (the supervisor) share only this framing:
//!
//! - `o` + 8 bytes (little-endian u64): a renewal whose request was sent at that
//!   `CLOCK_MONOTONIC` time, in nanoseconds;
//! - `f` + 2 bytes (little-endian u16 length) + that many bytes of UTF-8: the renewal failed,
//!   and why;
//! - `s` + 2 bytes (little-endian u16 length) + that many bytes of UTF-8: the renewal's answer
//!   says the holder was superseded by the run named (PROTOCOL §18) — not a loss: the lease
//!   stays watched, and the supervisor hands out one notice (`Watched::take_superseded`).
//!
//! Each frame is one `write(2)` of at most 515 bytes, below `PIPE_BUF`, so frames
//! never interleave or tear. The deadline is measured from the *send* time of the last answered
//! renewal, never from when its answer arrived: the server's silence clock (PROTOCOL §16) can
//! only have started at or after that send, so a deadline counted from it is never later than
//! the server's view allows.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

/// The longest failure text carried (longer ones are cut at a character boundary): a frame
/// (tag, length, text) stays far below `PIPE_BUF`.
const WHY_MAX: usize = 512;

/// `CLOCK_MONOTONIC` now, as a duration since boot (not `Instant`: it crosses a pipe).
pub(crate) fn mono_now() -> Duration {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => Duration::new(ts.tv_sec() as u64, ts.tv_nsec() as u32),
        // CLOCK_MONOTONIC cannot fail on Linux; were it to, "now" as zero makes every
        // deadline look passed — the safe direction (fence early, never late).
        Err(_) => Duration::ZERO,
    }
}

/// Report a renewal sent at `sent` (from [`mono_now`]). A full pipe drops the report: the
/// core then fences early, never late.
pub(crate) fn report_ok(fd: BorrowedFd<'_>, sent: Duration) {
    let mut frame = [0u8; 9];
    frame[0] = b'o';
    frame[1..].copy_from_slice(&(sent.as_nanos() as u64).to_le_bytes());
    let _ = nix::unistd::write(fd, &frame);
}

/// Report that renewing failed, and why.
pub(crate) fn report_failed(fd: BorrowedFd<'_>, why: &str) {
    let _ = nix::unistd::write(fd, &text_frame(b'f', why));
}

/// Report that the holder was superseded by run `by` (once).
pub(crate) fn report_superseded(fd: BorrowedFd<'_>, by: &str) {
    let _ = nix::unistd::write(fd, &text_frame(b's', by));
}

/// A frame of `tag`, a little-endian u16 length and `text` cut to [`WHY_MAX`] bytes.
fn text_frame(tag: u8, text: &str) -> Vec<u8> {
    let mut end = text.len().min(WHY_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let text = &text.as_bytes()[..end];
    let mut frame = Vec::with_capacity(3 + text.len());
    frame.push(tag);
    frame.extend_from_slice(&(text.len() as u16).to_le_bytes());
    frame.extend_from_slice(text);
    frame
}

/// What the run hands the supervisor to watch.
pub(crate) struct Lease {
    /// The read end of the report pipe (non-blocking; a dup the supervisor owns).
    pub(crate) fd: OwnedFd,
    /// How long after the send of the last answered renewal the lease still counts.
    pub(crate) window: Duration,
    /// The send time ([`mono_now`]) of the last answered renewal so far.
    pub(crate) last_ok: Duration,
    /// What is lost, for the log line: e.g. `app lock x: cluster session to <server>`.
    pub(crate) label: String,
}

/// A lease being watched: the lease and what its pipe said so far.
pub(crate) struct Watched {
    lease: Lease,
    /// Bytes of a frame not complete yet (cannot happen with atomic writes; kept for safety).
    partial: Vec<u8>,
    failed: Option<String>,
    /// The run that superseded the holder, until taken (PROTOCOL §18).
    superseded: Option<String>,
    /// Whether a superseded notice was handed out already (it is handed out once).
    superseded_told: bool,
}

impl Watched {
    pub(crate) fn new(lease: Lease) -> Watched {
        Watched {
            lease,
            partial: Vec::new(),
            failed: None,
            superseded: None,
            superseded_told: false,
        }
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.lease.fd.as_raw_fd()
    }

    /// The time left before the lease expires (zero when expired), as of `now`.
    pub(crate) fn remaining(&self, now: Duration) -> Duration {
        (self.lease.last_ok + self.lease.window).saturating_sub(now)
    }

    /// Read every report waiting in the pipe (it is non-blocking).
    pub(crate) fn take_reports(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match nix::unistd::read(self.lease.fd.as_fd(), &mut buf) {
                Ok(0) => {
                    // The writer is gone without saying why: it cannot renew any more.
                    self.failed
                        .get_or_insert_with(|| "the heartbeat stopped".into());
                    return;
                }
                Ok(n) => self.partial.extend_from_slice(&buf[..n]),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break, // EAGAIN: nothing more now
            }
        }
        self.parse();
    }

    fn parse(&mut self) {
        let mut at = 0;
        let data = std::mem::take(&mut self.partial);
        while at < data.len() {
            match data[at] {
                b'o' if data.len() >= at + 9 => {
                    let mut n = [0u8; 8];
                    n.copy_from_slice(&data[at + 1..at + 9]);
                    let sent = Duration::from_nanos(u64::from_le_bytes(n));
                    self.lease.last_ok = self.lease.last_ok.max(sent);
                    at += 9;
                }
                tag @ (b'f' | b's') if data.len() >= at + 3 => {
                    let len = usize::from(u16::from_le_bytes([data[at + 1], data[at + 2]]));
                    if data.len() < at + 3 + len {
                        break;
                    }
                    let text = String::from_utf8_lossy(&data[at + 3..at + 3 + len]).into_owned();
                    if tag == b'f' {
                        self.failed.get_or_insert(text);
                    } else if !self.superseded_told {
                        self.superseded.get_or_insert(text);
                    }
                    at += 3 + len;
                }
                b'o' | b'f' | b's' => break, // incomplete: wait for the rest
                _ => {
                    // Not our framing: treat the lease as lost rather than guess.
                    self.failed
                        .get_or_insert_with(|| "unreadable heartbeat report".into());
                    return;
                }
            }
        }
        self.partial = data[at..].to_vec();
    }

    /// The run that superseded the holder, once (later reports of it are ignored).
    pub(crate) fn take_superseded(&mut self) -> Option<String> {
        let by = self.superseded.take()?;
        self.superseded_told = true;
        Some(by)
    }

    /// The log line's text when the lease is lost as of `now`: a reported failure, or the
    /// window passed since the last answered renewal was sent.
    pub(crate) fn lost(&self, now: Duration) -> Option<String> {
        let silent = now.saturating_sub(self.lease.last_ok);
        let why = match &self.failed {
            Some(why) => why.clone(),
            None if silent >= self.lease.window => "no answer to the heartbeat".into(),
            None => return None,
        };
        Some(format!(
            "{} lost ({why}) after {:.1}s without a heartbeat",
            self.lease.label,
            silent.as_secs_f64()
        ))
    }
}

/// A non-blocking, close-on-exec pipe for a lease: (read end, write end).
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (rx, tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
        .map_err(io::Error::from)?;
    Ok((rx, tx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watched(window_ms: u64) -> (Watched, OwnedFd) {
        let (rx, tx) = pipe().expect("pipe");
        let w = Watched::new(Lease {
            fd: rx,
            window: Duration::from_millis(window_ms),
            last_ok: Duration::from_secs(100),
            label: "app lock a: cluster session to s".into(),
        });
        (w, tx)
    }

    #[test]
    fn a_renewal_moves_the_deadline_by_its_send_time() {
        let (mut w, tx) = watched(500);
        let t = Duration::from_secs(100);
        assert_eq!(w.remaining(t + Duration::from_millis(200)).as_millis(), 300);
        assert!(w.lost(t + Duration::from_millis(499)).is_none());
        report_ok(tx.as_fd(), t + Duration::from_millis(400));
        w.take_reports();
        assert!(w.lost(t + Duration::from_millis(899)).is_none());
        let text = w.lost(t + Duration::from_millis(900)).expect("expired");
        assert_eq!(
            text,
            "app lock a: cluster session to s lost (no answer to the heartbeat) after 0.5s \
             without a heartbeat"
        );
        // An older send time reported late never moves the deadline back.
        report_ok(tx.as_fd(), t);
        w.take_reports();
        assert_eq!(w.remaining(t + Duration::from_millis(400)).as_millis(), 500);
    }

    #[test]
    fn a_failure_or_a_closed_pipe_loses_the_lease_at_once() {
        let (mut w, tx) = watched(5000);
        let t = Duration::from_secs(100);
        report_failed(tx.as_fd(), "db error: terminating connection");
        w.take_reports();
        let text = w.lost(t).expect("failed");
        assert!(
            text.contains("(db error: terminating connection)"),
            "{text}"
        );
        let (mut w, tx) = watched(5000);
        drop(tx);
        w.take_reports();
        assert!(w
            .lost(t)
            .expect("closed")
            .contains("(the heartbeat stopped)"));
    }

    #[test]
    fn a_supersede_notice_is_handed_out_once_and_keeps_the_lease() {
        let (mut w, tx) = watched(5000);
        let t = Duration::from_secs(100);
        report_superseded(tx.as_fd(), "r-new");
        report_ok(tx.as_fd(), t + Duration::from_millis(10));
        report_superseded(tx.as_fd(), "r-new");
        w.take_reports();
        assert_eq!(w.take_superseded().as_deref(), Some("r-new"));
        assert!(w.lost(t + Duration::from_millis(20)).is_none());
        report_superseded(tx.as_fd(), "r-newer");
        w.take_reports();
        assert_eq!(w.take_superseded(), None);
    }

    #[test]
    fn long_reasons_are_cut_at_a_character_boundary() {
        let (mut w, tx) = watched(5000);
        report_failed(tx.as_fd(), &"é".repeat(400));
        w.take_reports();
        let text = w.lost(Duration::from_secs(100)).expect("failed");
        assert_eq!(text.matches('é').count(), WHY_MAX / 2);
    }
}
