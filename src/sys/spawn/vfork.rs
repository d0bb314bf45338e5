//! The fast spawn: `clone3(CLONE_VM | CLONE_VFORK [| CLONE_INTO_CGROUP])` on a stack of the
//! child's own, as `posix_spawn` does (DECISIONS D18).

use super::{child_exec, Prepared};
use std::io;
use std::os::fd::RawFd;

#[repr(C)]
pub(super) struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

pub(super) const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// What the vfork child gets: a pointer to this, on the parent's stack (which stays put: the
/// parent is suspended until the child has exec'd or exited).
struct ChildArgs<'a> {
    prepared: &'a Prepared,
    err_fd: RawFd,
    /// A cgroup the child moves itself into first (`Join::Migrate`).
    migrate: Option<RawFd>,
}

/// The child's stack: only `child_exec`'s frame and libc's syscall wrappers run on it.
const CHILD_STACK: usize = 64 * 1024;

/// `clone3(CLONE_VM | CLONE_VFORK [| CLONE_INTO_CGROUP])`: the child shares our memory and runs
/// `child_exec` on a stack of its own until it execs; we are suspended until then. Why not a
/// plain fork: copying the core's page tables and tearing the copy down again in the child's
/// `exec` took ~0.3 ms of the ~0.55 ms a spawn cost (measured: machine-docs/BENCHMARKS.md),
/// and a spawn sits on the handoff path between two runs of an app (B2).
///
/// Why it is sound: the child touches only memory prepared before the clone and makes only
/// async-signal-safe calls (no allocation, no locks); all signals are blocked across the clone,
/// so no handler can run on the child's stack before `child_exec` resets every disposition
/// (the child has its own handler table: no CLONE_SIGHAND); errno is the one shared location
/// the child writes, while we are suspended.
pub(super) fn vfork_clone3(
    p: &Prepared,
    err_fd: RawFd,
    cgroup_dir: Option<RawFd>,
    migrate: Option<RawFd>,
) -> io::Result<i32> {
    // u128 elements: the stack top is 16-byte aligned, as the ABI requires. Left uninitialised
    // (spare capacity): a stack needs no zeroing, and only the pages the child uses get touched.
    let mut stack: Vec<u128> = Vec::with_capacity(CHILD_STACK / std::mem::size_of::<u128>());
    let args = ChildArgs {
        prepared: p,
        err_fd,
        migrate,
    };
    let mut flags = (libc::CLONE_VM | libc::CLONE_VFORK) as u64;
    if cgroup_dir.is_some() {
        flags |= CLONE_INTO_CGROUP;
    }
    let clone_args = CloneArgs {
        flags,
        pidfd: 0,
        child_tid: 0,
        parent_tid: 0,
        exit_signal: libc::SIGCHLD as u64,
        stack: stack.spare_capacity_mut().as_mut_ptr() as u64,
        stack_size: CHILD_STACK as u64,
        tls: 0,
        set_tid: 0,
        set_tid_size: 0,
        cgroup: cgroup_dir.unwrap_or(0) as u64,
    };
    // Every signal blocked across the clone: no handler may run on the child's stack.
    let mut old = nix::sys::signal::SigSet::empty();
    nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::all()),
        Some(&mut old),
    )
    .map_err(io::Error::from)?;
    // SAFETY: `clone_args` describes a valid stack that outlives the child's use of it (we are
    // suspended until it execs or exits); `child_entry` gets a pointer to `args`, alive as long.
    let ret = unsafe {
        raw_clone3(
            &clone_args,
            child_entry,
            &args as *const ChildArgs<'_> as *mut libc::c_void,
        )
    };
    if let Err(e) = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&old),
        None,
    ) {
        // The funnel's signals stay blocked either way; the others would be lost: say so.
        crate::output::warn("spawn", &format!("cannot restore the signal mask: {e}"));
    }
    drop(stack);
    if ret < 0 {
        // The syscall instruction returns -errno itself (errno is not set).
        return Err(io::Error::from_raw_os_error(-ret as i32));
    }
    Ok(ret as i32)
}

/// The vfork child's first Rust frame, on its own stack.
extern "C" fn child_entry(arg: *mut libc::c_void) -> ! {
    // SAFETY: `arg` points at the parent's `ChildArgs`, alive while the parent is suspended.
    unsafe {
        let args = &*(arg as *const ChildArgs<'_>);
        child_exec(args.prepared, args.err_fd, args.migrate)
    }
}

/// The `clone3` syscall with a child that starts on the new stack: the kernel returns 0 there
/// with nothing on it to return to, so the child must call its entry point from here (what
/// libc's `clone()` wrapper does; libc has no wrapper for clone3). Returns the child's pid or
/// `-errno`.
///
/// # Safety
/// `args` must describe a stack the child may use until it execs or exits (the parent is
/// suspended meanwhile with `CLONE_VFORK`), and `entry` must never return.
#[cfg(target_arch = "x86_64")]
unsafe fn raw_clone3(
    args: &CloneArgs,
    entry: extern "C" fn(*mut libc::c_void) -> !,
    arg: *mut libc::c_void,
) -> isize {
    let ret: isize;
    // r12/r13 survive the syscall in both processes; the child's rsp is the new stack's top
    // (16-byte aligned, so the `call` leaves the ABI's alignment at the entry).
    // SAFETY: the caller's contract (above); the asm clobbers only what it declares, and the
    // child never comes back to this frame (it calls `entry`, which never returns).
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") args as *const CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") arg,
            in("r13") entry,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        )
    };
    ret
}

/// Elsewhere: no trampoline (none that could be tested here), so `clone_child` forks.
///
/// # Safety
/// None needed: it only answers `ENOSYS`.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn raw_clone3(
    _args: &CloneArgs,
    _entry: extern "C" fn(*mut libc::c_void) -> !,
    _arg: *mut libc::c_void,
) -> isize {
    -(libc::ENOSYS as isize)
}
