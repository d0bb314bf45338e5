//! The machine the bench runs on: its description, and the state of the disk the runs dirs are on.

use std::fs::{self, File};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::report::Report;
use crate::util::first_line;

/// The type of the filesystem holding `path`, by its statfs magic.
pub fn fs_type(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return "?".to_owned();
    };
    // SAFETY: statfs(2) fills the zeroed struct we own from a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return "?".to_owned();
    }
    match st.f_type as u64 {
        0x0102_1994 => "tmpfs".to_owned(),
        0xEF53 => match ext4_has_journal(path) {
            Some(true) => "ext4 (with a journal)".to_owned(),
            Some(false) => "ext4 **without a journal**".to_owned(),
            None => "ext2/3/4".to_owned(),
        },
        0x5846_5342 => "xfs".to_owned(),
        0x9123_683E => "btrfs".to_owned(),
        0x794C_7630 => "overlayfs".to_owned(),
        0x2FC1_2FC1 => "zfs".to_owned(),
        other => format!("fs magic {other:#x}"),
    }
}

/// Whether the ext4 filesystem holding `path` has a journal: `/sys/fs/ext4/<dev>/journal_task`
/// says `<none>` without one. It matters here: without a journal, ext4's inode allocator skips
/// every recently deleted inode one by one (fs/ext4/ialloc.c, `recently_deleted`), so the cost
/// of creating a file grows with the recent churn of deletions in its block group.
pub fn ext4_has_journal(path: &Path) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let dev = fs::metadata(path).ok()?.dev();
    let want = format!("{}:{}", libc::major(dev), libc::minor(dev));
    for entry in fs::read_dir("/sys/fs/ext4").ok()?.flatten() {
        let name = entry.file_name();
        let block_dev = Path::new("/sys/class/block").join(&name).join("dev");
        if fs::read_to_string(block_dev).is_ok_and(|d| d.trim() == want) {
            let task = fs::read_to_string(entry.path().join("journal_task")).ok()?;
            return Some(task.trim() != "<none>");
        }
    }
    None
}

/// Median time (µs) to create one empty file where the runs dirs go (`$TMPDIR`), over 20
/// files created and then removed.
pub fn create_latency_us() -> f64 {
    let dir = std::env::temp_dir().join(format!("tether-bench-probe-{}", std::process::id()));
    if fs::create_dir(&dir).is_err() {
        return f64::NAN;
    }
    let mut times: Vec<f64> = (0..20)
        .map(|i| {
            let t0 = Instant::now();
            let _ = File::create(dir.join(format!("p{i}")));
            t0.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    let _ = fs::remove_dir_all(&dir);
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Figures must not inherit each other's filesystem state: on ext4 without a journal, creating
/// a file skips every inode deleted in the last 5 s (305 s while its inode table block is
/// dirty), so after a figure that deleted thousands of files, creating one costs ten times
/// more for a minute or two. Wait (bounded) until creating a file costs about what it did when
/// the bench started, and say what was found.
pub fn settle_disk(id: &str, calm: f64, rep: &mut Report) {
    let started = Instant::now();
    let mut now = create_latency_us();
    let settled = |v: f64| v <= (3.0 * calm).max(calm + 50.0);
    let first = now;
    while !settled(now) && started.elapsed() < Duration::from_secs(150) {
        std::thread::sleep(Duration::from_secs(5)); // ordering-free: waiting out kernel writeback
        now = create_latency_us();
    }
    let waited = started.elapsed().as_secs_f64();
    if waited >= 1.0 {
        rep.note(
            id,
            format!(
                "waited {waited:.0} s for the runs dir's filesystem to settle first: creating a \
                 file took {first:.0} µs, then {now:.0} µs (at the start of the bench: {calm:.0} \
                 µs){}",
                if settled(now) {
                    ""
                } else {
                    " — did not settle, measured anyway"
                }
            ),
        );
    }
}

pub fn machine() -> Vec<String> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "?".to_owned());
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "?".to_owned());
    // SAFETY: sysconf has no preconditions.
    let nproc = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let kernel = first_line("uname", &["-srm"]);
    vec![
        format!("nproc: {nproc}"),
        format!("CPU: {model}"),
        format!("memory: {mem}"),
        format!("kernel: {kernel}"),
    ]
}
