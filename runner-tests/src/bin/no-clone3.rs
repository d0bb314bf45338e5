//! `no-clone3 ERRNO PROGRAM [ARGS...]`: runs PROGRAM under a seccomp filter that makes every
//! `clone3` call fail with ERRNO (ENOSYS = 38 like an old kernel or Docker's older default
//! profile, EPERM = 1 like stricter filters), so the suite can show tether's spawn falling
//! back to fork on the real kernel. The filter is inherited by everything PROGRAM starts.
//!
//! x86_64 only (the filter compares the syscall number and does not check the architecture).
//! Exit status 2 on bad usage, 126 when the filter cannot be installed or exec fails.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::process::exit;

use runner_tests::helper::Cli;

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn main() {
    let mut cli = Cli::new("no-clone3", "no-clone3 ERRNO PROGRAM [ARGS...]");
    let errno: u32 = cli
        .next()
        .and_then(|e| e.to_str().and_then(|s| s.parse().ok()))
        .filter(|&e| e > 0 && e < 4096)
        .unwrap_or_else(|| cli.usage("ERRNO must be a number in 1..4095"));
    let args: Vec<_> = cli.by_ref().collect();
    let argv: Vec<CString> = args
        .iter()
        .map(|a| CString::new(a.as_bytes()).unwrap_or_else(|_| cli.usage("NUL byte in argument")))
        .collect();
    if argv.is_empty() {
        cli.usage("missing PROGRAM");
    }

    // offsetof(struct seccomp_data, nr) == 0.
    let filter = [
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: libc::SYS_clone3 as u32,
        },
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ERRNO | errno),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl with a valid, live filter program; execvp with NUL-terminated arrays.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ) != 0
        {
            eprintln!(
                "no-clone3: cannot install the filter: {}",
                std::io::Error::last_os_error()
            );
            exit(126);
        }
        let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        libc::execvp(ptrs[0], ptrs.as_ptr());
    }
    eprintln!(
        "no-clone3: cannot exec {:?}: {}",
        argv[0],
        std::io::Error::last_os_error()
    );
    exit(126)
}
