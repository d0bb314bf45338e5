//! Small readers of `/proc`: a pid's start time and parent, the process table as a parent map,
//! and environment markers. Every reader tolerates processes vanishing mid-read.

use std::collections::HashMap;

/// `/proc/<pid>/stat` fields after the command name (which may contain spaces and parens).
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    use std::io::Read;
    // One read into a buffer the whole line fits in (~300 bytes, a few hundred more at most):
    // `read_to_string` would stat the file (size 0) and grow its buffer from 32 bytes, six
    // reads for one line, and a queued run reads a line per run ahead of it.
    let mut buf = [0u8; 4096];
    let mut file = std::fs::File::open(format!("/proc/{pid}/stat")).ok()?;
    let mut len = 0;
    while len < buf.len() {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    let text = std::str::from_utf8(&buf[..len]).ok()?;
    let close = text.rfind(')')?;
    Some(
        text[close + 1..]
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    )
}

/// Start time of `pid` in clock ticks since boot (field 22), to tell a recycled pid apart.
pub(crate) fn start_time(pid: i32) -> Option<u64> {
    // After ")" the fields start at field 3 (state), so field 22 is index 19.
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// Is `pid` stopped (`T`, e.g. by SIGSTOP) or stopped by a tracer (`t`)?
pub(crate) fn is_stopped(pid: i32) -> bool {
    stat_fields(pid)
        .and_then(|f| f.first().cloned())
        .is_some_and(|s| s == "T" || s == "t")
}

/// Is `pid` a live process (not a zombie, not gone)?
pub(crate) fn is_alive(pid: i32) -> bool {
    match stat_fields(pid) {
        Some(f) => f.first().map(String::as_str) != Some("Z"),
        None => false,
    }
}

/// Every pid in `/proc` right now (empty if `/proc` is unreadable).
fn all_pids() -> impl Iterator<Item = i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flat_map(|dir| dir.flatten())
        .filter_map(|entry| {
            entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
        })
}

/// Every process's parent: pid → ppid.
pub(crate) fn parent_map() -> HashMap<i32, i32> {
    let mut map = HashMap::new();
    for pid in all_pids() {
        if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1)?.parse().ok()) {
            map.insert(pid, ppid);
        }
    }
    map
}

/// All descendants of `root` (not `root` itself), from one snapshot of the table.
pub(crate) fn descendants(root: i32) -> Vec<i32> {
    descendants_in(&parent_map(), root)
}

pub(crate) fn descendants_in(parents: &HashMap<i32, i32>, root: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for (&pid, &ppid) in parents {
        children.entry(ppid).or_default().push(pid);
    }
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        if let Some(kids) = children.get(&p) {
            for &k in kids {
                if k != root && !out.contains(&k) {
                    out.push(k);
                    stack.push(k);
                }
            }
        }
    }
    out
}

/// Our own ancestors (parent, grandparent, … up to pid 1), which a marker scan must never kill.
pub(crate) fn ancestors_of_self() -> Vec<i32> {
    let parents = parent_map();
    let mut out = Vec::new();
    let mut p = std::process::id() as i32;
    while let Some(&pp) = parents.get(&p) {
        if pp <= 1 || out.contains(&pp) {
            break;
        }
        out.push(pp);
        p = pp;
    }
    out
}

/// Processes whose environment contains every `NAME=value` of `markers`.
pub(crate) fn pids_with_env(markers: &[String]) -> Vec<i32> {
    let mut out = Vec::new();
    if markers.is_empty() {
        return out;
    }
    for pid in all_pids() {
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
        if markers.iter().all(|m| vars.contains(&m.as_bytes())) {
            out.push(pid);
        }
    }
    out
}

/// Processes of a dead run known only by its id: their environment carries
/// `TETHER_RUN_ID=<id>` and a `TETHER_RUN_TOKEN=<id>.<core pid>.<core start>` whose core is no
/// longer alive (a shell that merely exported the id, or a live run's process, never matches).
pub(crate) fn pids_of_dead_run(id: &str) -> Vec<i32> {
    let id_var = format!("TETHER_RUN_ID={id}");
    let token_prefix = format!("TETHER_RUN_TOKEN={id}.");
    let mut out = Vec::new();
    for pid in all_pids() {
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
        if !vars.contains(&id_var.as_bytes()) {
            continue;
        }
        let core = vars.iter().find_map(|v| {
            let rest = std::str::from_utf8(v.strip_prefix(token_prefix.as_bytes())?).ok()?;
            core_of_token_tail(rest)
        });
        // A zombie core is dead too: under an init that does not reap (some containers) a
        // dead core can stay a zombie, and its leftovers must not be taken for a live run's.
        if let Some((core_pid, core_start)) = core {
            if !core_alive(core_pid, core_start) {
                out.push(pid);
            }
        }
    }
    out
}

/// `<pid>.<start>` (the end of a run token) as numbers.
pub(crate) fn core_of_token_tail(tail: &str) -> Option<(i32, u64)> {
    let (pid, start) = tail.split_once('.')?;
    Some((pid.parse().ok()?, start.parse().ok()?))
}

/// Split a run token `<run-id>.<core pid>.<core start>` (run ids may contain dots).
pub(crate) fn parse_token(token: &str) -> Option<(&str, i32, u64)> {
    let mut parts = token.rsplitn(3, '.');
    let start = parts.next()?.parse().ok()?;
    let pid = parts.next()?.parse().ok()?;
    let id = parts.next()?;
    (!id.is_empty()).then_some((id, pid, start))
}

/// `PF_EXITING` in `/proc/<pid>/stat`'s flags: the process is in `exit()`.
const PF_EXITING: u64 = 0x4;

/// Is the process `pid` that started at `start` still alive — not exiting, not a zombie? A
/// core killed a moment ago drops its flocks early in `exit()` (before it is even a zombie,
/// and a zombie until its front reaps it), so the next holder of its lock may look while it
/// still has a `/proc` entry: it must count as dead, or its leftovers would not be reaped.
pub(crate) fn core_alive(pid: i32, start: u64) -> bool {
    let Some(f) = stat_fields(pid) else {
        return false;
    };
    let state = f.first().map(String::as_str);
    // After ")" the fields start at field 3 (state): flags (field 9) is index 6.
    let flags: u64 = f.get(6).and_then(|s| s.parse().ok()).unwrap_or(0);
    !matches!(state, Some("Z" | "X"))
        && flags & PF_EXITING == 0
        && f.get(19).and_then(|s| s.parse().ok()) == Some(start)
}

/// This host's name, for records.
/// This boot's id (`/proc/sys/kernel/random/boot_id`): a pid and its start time mean a process
/// only within one boot. Empty when unreadable.
pub(crate) fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

pub(crate) fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descendants_follow_the_tree() {
        let parents: HashMap<i32, i32> = [(10, 1), (11, 10), (12, 11), (13, 10), (20, 1)]
            .into_iter()
            .collect();
        let mut d = descendants_in(&parents, 10);
        d.sort();
        assert_eq!(d, vec![11, 12, 13]);
    }

    #[test]
    fn tokens_split_from_the_right() {
        assert_eq!(parse_token("a.b-1.42.7"), Some(("a.b-1", 42, 7)));
        assert_eq!(parse_token("r.42"), None);
        assert_eq!(parse_token(".42.7"), None);
        assert_eq!(core_of_token_tail("42.7"), Some((42, 7)));
    }

    #[test]
    fn a_zombie_core_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let start = start_time(pid).unwrap();
        // Dead but not reaped: a zombie, whose /proc entry still has its start time.
        let gone = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while stat_fields(pid).and_then(|f| f.first().cloned()).as_deref() != Some("Z") {
            assert!(std::time::Instant::now() < gone, "never a zombie");
            std::thread::sleep(std::time::Duration::from_millis(2)); // poll step, bounded
        }
        assert_eq!(start_time(pid), Some(start));
        assert!(!core_alive(pid, start));
        child.wait().unwrap();
        assert!(!core_alive(pid, start));
        let me = std::process::id() as i32;
        assert!(core_alive(me, start_time(me).unwrap()));
    }

    #[test]
    fn reads_own_start_time() {
        let me = std::process::id() as i32;
        assert!(start_time(me).is_some());
        assert!(is_alive(me));
    }
}
