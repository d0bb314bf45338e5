//! The runs dir's pool of record inodes, `<runs dir>/.spares/<slot>` (DECISIONS D88, PROTOCOL
//! "Files"): a run that retires its dir moves its record files (`run.json` and the spares it
//! used) here instead of deleting them, and the next claim takes its spares from here instead
//! of creating them.
//!
//! Why: every run used to create and delete three record inodes in the runs dir, whose usual
//! home is ext4 on disk. Journaled ext4 logs each create and unlink; journal-less ext4 does
//! worse: each inode allocation skips every inode of its group freed in the last five seconds
//! (`recently_deleted`), so under a stream of runs the allocations cost more the more runs
//! there are (BENCHMARKS "B7"). A rename costs neither.
//!
//! What a recycled inode may still hold: the record of an ended run. A run writes it over from
//! offset 0 and cuts it to length (`record::write_record_into_spare`) before it becomes
//! `run.json`, so a reader of `run.json` never sees it. The only one who could is a reader that
//! opened that run's `run.json` and was still reading it after the run ended and another run
//! reused the inode: it reads a record of the other run, or one it cannot parse, which every
//! reader handles already (a torn or unknown record, PROTOCOL "Records").
//!
//! Trust: the pool is a 0700 directory of ours in the runs dir, which is trusted as a whole
//! (`state::dirs`); a slot is taken only if it is a regular file of ours with one link and
//! mode 0600 (checked before the rename, the pool being ours alone), and `open_file` refuses
//! anything but a regular file when the run writes into it. Slots are fixed names, so the
//! pool never holds more than [`SLOTS`] inodes; when it is full, a run deletes its records as
//! before.

use crate::sys::safe_fs::{kind, Dir, Kind};
use nix::unistd::geteuid;
use std::io;

/// The pool's directory in the runs dir (dot names are never runs: reconcile, janitor and
/// status skip them).
pub(crate) const POOL_DIR: &str = ".spares";
/// How many inodes the pool keeps at most (its slots are named `0` … `31`).
pub(crate) const SLOTS: usize = 32;

/// The pool, open. Takes and puts both go through the slots from `0` up, so the pooled inodes
/// gather in the low slots and a take finds one within a few probes (an empty slot costs one
/// `fstatat`); two runs after the same slot: one wins the rename, the other tries the next.
#[derive(Debug)]
pub(crate) struct Pool {
    dir: Dir,
}

impl Pool {
    /// Open the runs dir's pool, making it if it is missing. `None` if it cannot be made or is
    /// not ours alone (then the run creates and deletes its spares as before).
    pub(crate) fn open(runs: &Dir) -> Option<Pool> {
        let dir = match runs.open_dir(POOL_DIR) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match runs.create_dir(POOL_DIR, 0o700) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(_) => return None,
                }
                runs.open_dir(POOL_DIR).ok()?
            }
            Err(_) => return None,
        };
        let st = dir.stat().ok()?;
        if st.st_uid != geteuid().as_raw() || st.st_mode & 0o077 != 0 {
            return None;
        }
        Some(Pool { dir })
    }

    /// Move a pooled inode into `into` as `name` (which must not exist). False when the pool
    /// has none to give.
    pub(crate) fn take(&self, into: &Dir, name: &str) -> bool {
        for slot in 0..SLOTS {
            let slot = slot.to_string();
            match self.dir.stat_at(&slot) {
                Ok(st) if usable(&st) => {}
                Ok(_) => {
                    // Not one of ours as we left it: out of the pool, and never into a run.
                    let _ = self.dir.remove_tree(&slot);
                    continue;
                }
                Err(_) => continue,
            }
            match self.dir.rename_noreplace(&slot, into, name) {
                Ok(()) => return true,
                // Taken by another run in the meantime.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(_) => return false,
            }
        }
        false
    }

    /// Move `from`/`name` into the lowest free slot. False when the pool is full (the caller
    /// deletes it).
    pub(crate) fn put(&self, from: &Dir, name: &str) -> bool {
        for slot in 0..SLOTS {
            match from.rename_noreplace(name, &self.dir, slot.to_string()) {
                Ok(()) => return true,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(_) => return false,
            }
        }
        false
    }
}

/// A pooled inode a run may write its record into: a regular file of ours, one link, 0600.
fn usable(st: &nix::sys::stat::FileStat) -> bool {
    kind(st) == Kind::File
        && st.st_uid == geteuid().as_raw()
        && st.st_nlink == 1
        && st.st_mode & 0o7777 == 0o600
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn runs() -> (tempfile::TempDir, Dir) {
        let t = tempfile::tempdir().unwrap();
        let d = Dir::open_unchecked(t.path()).unwrap();
        (t, d)
    }

    fn spare(dir: &Dir, name: &str, body: &str) -> u64 {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::metadata(&p).unwrap().ino()
    }

    #[test]
    fn an_inode_put_into_the_pool_is_the_one_a_later_take_gets() {
        let (_t, runs) = runs();
        let pool = Pool::open(&runs).unwrap();
        let meta = std::fs::metadata(runs.join(POOL_DIR)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        runs.create_dir("a", 0o700).unwrap();
        runs.create_dir("b", 0o700).unwrap();
        let a = runs.open_dir("a").unwrap();
        let b = runs.open_dir("b").unwrap();
        let ino = spare(&a, "run.json", "{}");
        assert!(pool.put(&a, "run.json"));
        assert!(!a.join("run.json").exists());
        // Another process (another `Pool` on the same dir) finds it.
        let other = Pool::open(&runs).unwrap();
        assert!(other.take(&b, "run.json.spare-0"));
        assert_eq!(
            std::fs::metadata(b.join("run.json.spare-0")).unwrap().ino(),
            ino
        );
        assert!(
            !other.take(&b, "run.json.spare-1"),
            "the pool is empty again"
        );
    }

    #[test]
    fn the_pool_holds_at_most_its_slots_and_a_full_pool_refuses() {
        let (_t, runs) = runs();
        let pool = Pool::open(&runs).unwrap();
        runs.create_dir("a", 0o700).unwrap();
        let a = runs.open_dir("a").unwrap();
        let mut put = 0;
        for n in 0..(SLOTS * 2) {
            let name = format!("f{n}");
            spare(&a, &name, "x");
            if pool.put(&a, &name) {
                put += 1;
            }
        }
        assert_eq!(put, SLOTS);
        assert_eq!(
            std::fs::read_dir(runs.join(POOL_DIR)).unwrap().count(),
            SLOTS
        );
        // Taking from a full pool frees the lowest slot, and the next put fills it.
        runs.create_dir("b", 0o700).unwrap();
        let b = runs.open_dir("b").unwrap();
        assert!(pool.take(&b, "spare"));
        assert!(!runs.join(POOL_DIR).join("0").exists());
        spare(&a, "again", "x");
        assert!(pool.put(&a, "again"));
        assert!(runs.join(POOL_DIR).join("0").exists());
    }

    #[test]
    fn a_slot_that_is_not_a_private_single_link_file_is_dropped_never_taken() {
        let (_t, runs) = runs();
        let pool = Pool::open(&runs).unwrap();
        let pdir = runs.join(POOL_DIR);
        // Slot 0: a symlink; 1: a hard link to a file elsewhere; 2: world-readable; 3: a dir.
        std::os::unix::fs::symlink("/etc/passwd", pdir.join("0")).unwrap();
        let outside = runs.join("outside");
        std::fs::write(&outside, "x").unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::hard_link(&outside, pdir.join("1")).unwrap();
        std::fs::write(pdir.join("2"), "x").unwrap();
        std::fs::set_permissions(pdir.join("2"), std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::create_dir(pdir.join("3")).unwrap();
        runs.create_dir("a", 0o700).unwrap();
        let a = runs.open_dir("a").unwrap();
        assert!(!pool.take(&a, "run.json.spare-0"));
        assert!(!a.join("run.json.spare-0").exists());
        for slot in ["0", "1", "2", "3"] {
            assert!(
                std::fs::symlink_metadata(pdir.join(slot)).is_err(),
                "slot {slot} left in the pool"
            );
        }
        assert!(outside.exists(), "the hard link's other name is untouched");
    }

    #[test]
    fn a_pool_that_is_not_ours_alone_is_not_used() {
        let (_t, runs) = runs();
        std::fs::create_dir(runs.join(POOL_DIR)).unwrap();
        std::fs::set_permissions(runs.join(POOL_DIR), std::fs::Permissions::from_mode(0o777))
            .unwrap();
        assert!(Pool::open(&runs).is_none());
        std::fs::remove_dir(runs.join(POOL_DIR)).unwrap();
        std::os::unix::fs::symlink("/tmp", runs.join(POOL_DIR)).unwrap();
        assert!(Pool::open(&runs).is_none(), "a symlinked pool is refused");
    }
}
