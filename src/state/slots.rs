//! Host slots (PROTOCOL §12): `slot-NN.lock` files in the lock dir cap how many commands run at
//! once on this host, across apps.
//!
//! The failure this closes (cf. "every worker got slot 0"): slot ids must be unique among
//! live runs and verified, not assigned by counting. A slot is a kernel flock, so two live
//! runs can never hold the same one and a dead holder's slot is freed by the kernel. A run
//! takes the *lowest* free slot below the current N; lowering N is safe: runs holding higher
//! slots finish, and no new run takes a slot ≥ N.

use crate::state::lock::{self, HeldLock, TryLock};
use crate::sys::safe_fs::Dir;
use std::io;

/// The slot lockfile's name in the lock dir.
pub(crate) fn slot_name(n: u32) -> String {
    format!("slot-{n:02}.lock")
}

/// A held slot.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) number: u32,
    pub(crate) lock: HeldLock,
}

impl Slot {
    /// `TETHER_SLOT`: two digits, as in the file name.
    pub(crate) fn label(&self) -> String {
        format!("{:02}", self.number)
    }
}

/// Try each slot from 0 to `count - 1` once; the first free one is ours.
pub(crate) fn try_take(lock_dir: &Dir, count: u32) -> io::Result<Option<Slot>> {
    for n in 0..count {
        match lock::try_acquire(lock_dir, slot_name(n))? {
            TryLock::Held(lock) => return Ok(Some(Slot { number: n, lock })),
            TryLock::Busy(_) => continue,
        }
    }
    Ok(None)
}
