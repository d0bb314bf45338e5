//! File system work on tether's own state, relative to directory fds (PROTOCOL.md, "Trust
//! model").
//!
//! tether runs as root beside untrusted commands. Whatever it does to its state must not be
//! steerable by a path someone else can change between a check and a use. So a state directory
//! is opened once (walked from `/` by `dirs`), and from then on every file is created, opened,
//! renamed and removed *relative to that fd* (`openat`/`mkdirat`/`unlinkat`/`renameat2`, always
//! with `O_NOFOLLOW`); modes and owners change only through fds (`fchmod`/`fchown`); files are
//! opened `O_NONBLOCK` and judged on the fd (`fstat`) before a byte is read, so a FIFO cannot
//! hang a reader and an 8 GiB file cannot exhaust one.

use nix::errno::Errno;
use nix::fcntl::{self, AtFlags, OFlag, RenameFlags};
use nix::sys::stat::{self, FileStat, Mode, SFlag};
use nix::unistd::{self, Gid, Uid, UnlinkatFlags};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How a directory is opened: never through a symlink in its last component.
const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// Flags every file open adds: no symlink, no controlling tty, no fd leak into children, and
/// no blocking on a FIFO someone put in a file's place.
const FILE_FLAGS: OFlag = OFlag::O_NOFOLLOW
    .union(OFlag::O_CLOEXEC)
    .union(OFlag::O_NONBLOCK)
    .union(OFlag::O_NOCTTY);

/// Trees deeper than this are flattened while they are removed (one fd per level otherwise).
const REMOVE_DEPTH: usize = 32;

/// How often a removal starts over when entries keep appearing (a live process writing).
const REMOVE_ATTEMPTS: usize = 8;

/// A directory opened without following a symlink. Clones share the fd.
#[derive(Debug, Clone)]
pub(crate) struct Dir {
    fd: Arc<OwnedFd>,
    path: Arc<PathBuf>,
}

/// The kind of a file, from its mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

pub(crate) fn kind(st: &FileStat) -> Kind {
    match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => Kind::File,
        SFlag::S_IFDIR => Kind::Dir,
        SFlag::S_IFLNK => Kind::Symlink,
        _ => Kind::Other,
    }
}

/// Why a file was not read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// There is no such file.
    Missing,
    /// It exists but is not one tether may trust or read; the text says why.
    Refused(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Missing => f.write_str("missing"),
            ReadError::Refused(why) => f.write_str(why),
        }
    }
}

fn errno(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Whether `st` names the same file as `other`.
pub(crate) fn same_file(st: &FileStat, other: &FileStat) -> bool {
    st.st_dev == other.st_dev && st.st_ino == other.st_ino
}

impl Dir {
    /// Open `path` as it is (intermediate symlinks followed). Only for directories whose
    /// trustworthiness does not rest on this open: `/`, test fixtures, the cgroup mount.
    pub(crate) fn open_unchecked(path: &Path) -> io::Result<Dir> {
        let fd = fcntl::open(path, DIR_FLAGS, Mode::empty()).map_err(errno)?;
        Ok(Dir::from_fd(fd, path.to_owned()))
    }

    fn from_fd(fd: OwnedFd, path: PathBuf) -> Dir {
        Dir {
            fd: Arc::new(fd),
            path: Arc::new(path),
        }
    }

    /// The path this directory was opened as (for messages and for the paths handed to
    /// commands; never for file system calls).
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    pub(crate) fn stat(&self) -> io::Result<FileStat> {
        stat::fstat(self.fd.as_fd()).map_err(errno)
    }

    /// `lstat` of an entry.
    pub(crate) fn stat_at(&self, name: impl AsRef<OsStr>) -> io::Result<FileStat> {
        stat::fstatat(self.fd.as_fd(), name.as_ref(), AtFlags::AT_SYMLINK_NOFOLLOW).map_err(errno)
    }

    /// Open a subdirectory (`ENOTDIR`/`ELOOP` when the entry is not a directory).
    pub(crate) fn open_dir(&self, name: impl AsRef<OsStr>) -> io::Result<Dir> {
        let name = name.as_ref();
        let fd = fcntl::openat(self.fd.as_fd(), name, DIR_FLAGS, Mode::empty()).map_err(errno)?;
        Ok(Dir::from_fd(fd, self.path.join(name)))
    }

    /// Open a subdirectory that may not be readable (`O_PATH`): good for `*at` calls and
    /// `fstat` only. Used to walk ancestors a non-root tether may only search.
    pub(crate) fn open_dir_path_only(&self, name: impl AsRef<OsStr>) -> io::Result<Dir> {
        let name = name.as_ref();
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = fcntl::openat(self.fd.as_fd(), name, flags, Mode::empty()).map_err(errno)?;
        Ok(Dir::from_fd(fd, self.path.join(name)))
    }

    pub(crate) fn create_dir(&self, name: impl AsRef<OsStr>, mode: u32) -> io::Result<()> {
        stat::mkdirat(
            self.fd.as_fd(),
            name.as_ref(),
            Mode::from_bits_truncate(mode),
        )
        .map_err(errno)
    }

    pub(crate) fn read_link(&self, name: impl AsRef<OsStr>) -> io::Result<OsString> {
        fcntl::readlinkat(self.fd.as_fd(), name.as_ref()).map_err(errno)
    }

    /// Open a file with `flags` plus `O_NOFOLLOW|O_CLOEXEC|O_NONBLOCK|O_NOCTTY`; refuse
    /// anything but a regular file (judged on the opened fd).
    pub(crate) fn open_file(
        &self,
        name: impl AsRef<OsStr>,
        flags: OFlag,
        mode: u32,
    ) -> io::Result<File> {
        let name = name.as_ref();
        let fd = fcntl::openat(
            self.fd.as_fd(),
            name,
            flags | FILE_FLAGS,
            Mode::from_bits_truncate(mode),
        )
        .map_err(|e| match e {
            Errno::ELOOP => io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is a symlink; refusing to follow it",
                    self.join(name).display()
                ),
            ),
            Errno::EISDIR => io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is a directory", self.join(name).display()),
            ),
            other => {
                let e = errno(other);
                io::Error::new(
                    e.kind(),
                    format!("cannot open {}: {e}", self.join(name).display()),
                )
            }
        })?;
        let file = File::from(fd);
        let st = stat::fstat(file.as_fd()).map_err(errno)?;
        if kind(&st) != Kind::File {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", self.join(name).display()),
            ));
        }
        Ok(file)
    }

    /// Read a small file tether wrote itself: a regular file owned by our effective uid (or
    /// root, who can do anything anyway), at most `cap` bytes. Anything else is refused without blocking (a FIFO, a device, a file
    /// of another owner, an oversized one) and the reason is returned.
    pub(crate) fn read_owned(
        &self,
        name: impl AsRef<OsStr>,
        cap: u64,
    ) -> Result<Vec<u8>, ReadError> {
        let name = name.as_ref();
        let shown = || self.join(name).display().to_string();
        let fd = match fcntl::openat(
            self.fd.as_fd(),
            name,
            OFlag::O_RDONLY | FILE_FLAGS,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Err(ReadError::Missing),
            Err(Errno::ELOOP) => {
                return Err(ReadError::Refused(format!("{} is a symlink", shown())))
            }
            Err(e) => return Err(ReadError::Refused(format!("{}: {}", shown(), errno(e)))),
        };
        let mut file = File::from(fd);
        let st = stat::fstat(file.as_fd())
            .map_err(|e| ReadError::Refused(format!("{}: {}", shown(), errno(e))))?;
        if kind(&st) != Kind::File {
            return Err(ReadError::Refused(format!(
                "{} is not a regular file",
                shown()
            )));
        }
        let me = Uid::effective().as_raw();
        if st.st_uid != me && st.st_uid != 0 {
            return Err(ReadError::Refused(format!(
                "{} is owned by uid {}, not by uid {me} or root",
                shown(),
                st.st_uid
            )));
        }
        if st.st_size as u64 > cap {
            return Err(ReadError::Refused(format!(
                "{} is {} bytes, more than a record may be ({cap})",
                shown(),
                st.st_size
            )));
        }
        let mut buf = Vec::with_capacity(st.st_size as usize);
        (&mut file)
            .take(cap + 1)
            .read_to_end(&mut buf)
            .map_err(|e| ReadError::Refused(format!("{}: {e}", shown())))?;
        if buf.len() as u64 > cap {
            return Err(ReadError::Refused(format!(
                "{} grew beyond {cap} bytes while it was read",
                shown()
            )));
        }
        Ok(buf)
    }

    /// Create `name` (which must not exist) with `bytes` in it.
    pub(crate) fn write_new(
        &self,
        name: impl AsRef<OsStr>,
        bytes: &[u8],
        mode: u32,
    ) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let file = self.open_file(name, OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL, mode)?;
        file.write_all_at(bytes, 0)
    }

    /// Swap two entries of this directory atomically (`renameat2(RENAME_EXCHANGE)`).
    pub(crate) fn exchange(&self, a: impl AsRef<OsStr>, b: impl AsRef<OsStr>) -> io::Result<()> {
        self.renameat2(a.as_ref(), self, b.as_ref(), RenameFlags::RENAME_EXCHANGE)
    }

    /// `renameat` from this directory into `to_dir` (which may be this one).
    pub(crate) fn rename(
        &self,
        from: impl AsRef<OsStr>,
        to_dir: &Dir,
        to: impl AsRef<OsStr>,
    ) -> io::Result<()> {
        fcntl::renameat(
            self.fd.as_fd(),
            from.as_ref(),
            to_dir.fd.as_fd(),
            to.as_ref(),
        )
        .map_err(errno)
    }

    /// Ask ext2/3/4 to spread this directory's subdirectories over the filesystem's block
    /// groups (`FS_TOPDIR_FL`, what `chattr +T` sets: the Orlov allocator then treats it as the
    /// top of a hierarchy). Best effort, and a no-op once set: another filesystem, or a
    /// directory we may not change, keeps what it has (DECISIONS D90).
    pub(crate) fn spread_subdirs(&self) {
        const FS_TOPDIR_FL: libc::c_int = 0x0002_0000;
        let fd = self.fd.as_raw_fd();
        // The kernel reads and writes an `int` for these, whatever the request's encoded size.
        let mut flags: libc::c_int = 0;
        // SAFETY: FS_IOC_GETFLAGS writes one int through the pointer, to a live local.
        if unsafe { libc::ioctl(fd, libc::FS_IOC_GETFLAGS, &mut flags) } != 0 {
            return;
        }
        if flags & FS_TOPDIR_FL == 0 {
            flags |= FS_TOPDIR_FL;
            // SAFETY: FS_IOC_SETFLAGS reads one int through the pointer, from a live local.
            unsafe { libc::ioctl(fd, libc::FS_IOC_SETFLAGS, &flags) };
        }
    }

    /// `renameat2(RENAME_NOREPLACE)` from this directory into `to_dir`: `EEXIST` instead of
    /// replacing what is there.
    pub(crate) fn rename_noreplace(
        &self,
        from: impl AsRef<OsStr>,
        to_dir: &Dir,
        to: impl AsRef<OsStr>,
    ) -> io::Result<()> {
        self.renameat2(
            from.as_ref(),
            to_dir,
            to.as_ref(),
            RenameFlags::RENAME_NOREPLACE,
        )
    }

    fn renameat2(
        &self,
        from: &OsStr,
        to_dir: &Dir,
        to: &OsStr,
        flags: RenameFlags,
    ) -> io::Result<()> {
        fcntl::renameat2(self.fd.as_fd(), from, to_dir.fd.as_fd(), to, flags).map_err(errno)
    }

    pub(crate) fn unlink(&self, name: impl AsRef<OsStr>) -> io::Result<()> {
        unistd::unlinkat(self.fd.as_fd(), name.as_ref(), UnlinkatFlags::NoRemoveDir).map_err(errno)
    }

    pub(crate) fn remove_dir(&self, name: impl AsRef<OsStr>) -> io::Result<()> {
        unistd::unlinkat(self.fd.as_fd(), name.as_ref(), UnlinkatFlags::RemoveDir).map_err(errno)
    }

    pub(crate) fn chmod(&self, mode: u32) -> io::Result<()> {
        stat::fchmod(self.fd.as_fd(), Mode::from_bits_truncate(mode)).map_err(errno)
    }

    pub(crate) fn chown(&self, uid: Uid, gid: Gid) -> io::Result<()> {
        unistd::fchown(self.fd.as_fd(), Some(uid), Some(gid)).map_err(errno)
    }

    /// Entry names with their kind (when the file system says), sorted, without `.`/`..`.
    pub(crate) fn entries(&self) -> io::Result<Vec<(OsString, Option<Kind>)>> {
        // A fresh open file description of this directory: its read offset is our own.
        let mut dir =
            nix::dir::Dir::openat(self.fd.as_fd(), ".", DIR_FLAGS, Mode::empty()).map_err(errno)?;
        let mut out = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(errno)?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let kind = entry.file_type().map(|t| match t {
                nix::dir::Type::File => Kind::File,
                nix::dir::Type::Directory => Kind::Dir,
                nix::dir::Type::Symlink => Kind::Symlink,
                _ => Kind::Other,
            });
            out.push((OsStr::from_bytes(name).to_owned(), kind));
        }
        out.sort();
        Ok(out)
    }

    /// Remove `name` and everything below it, never following a symlink and never changing a
    /// mode except through an fd pinned with `O_NOFOLLOW` on a directory we own. Safe while
    /// another process keeps changing the tree: each directory is emptied through its own fd,
    /// so a directory swapped for a symlink is only ever unlinked, never entered.
    pub(crate) fn remove_tree(&self, name: impl AsRef<OsStr>) -> io::Result<()> {
        let name = name.as_ref();
        let mut last = None;
        for _ in 0..REMOVE_ATTEMPTS {
            match self.remove_entry(name, self, 0) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::ENOTEMPTY)))
    }

    /// Remove one entry of `self`; `top` is the root of the tree being removed (deep subtrees
    /// are moved up into it, so no more than `REMOVE_DEPTH` fds are open at once; at depth 0
    /// the entry itself becomes the root).
    fn remove_entry(&self, name: &OsStr, top: &Dir, depth: usize) -> io::Result<()> {
        for _ in 0..REMOVE_ATTEMPTS {
            match self.unlink(name) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                // Linux answers EISDIR for a directory (EPERM on some file systems).
                Err(e) if matches!(e.raw_os_error(), Some(libc::EISDIR | libc::EPERM)) => {}
                Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                    // We may not write `self`: ours but read-only (a test's chmod 500).
                    self.make_accessible_self()?;
                    continue;
                }
                Err(e) => return Err(e),
            }
            let child = match self.open_dir(name) {
                Ok(d) => d,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                // Swapped for a symlink or a file since the unlink: unlink that.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR | libc::ELOOP)) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                    self.make_accessible(name)?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if depth >= REMOVE_DEPTH {
                // Too deep to hold another fd per level: move the subtree up to `top` under a
                // name of its own and remove it from there.
                let moved = OsString::from(format!(
                    ".deep-{}-{}",
                    std::process::id(),
                    child.stat()?.st_ino
                ));
                self.rename(name, top, &moved)?;
                return top.remove_entry(&moved, top, 1);
            }
            // Deep subtrees are moved up into the root of this removal (never out of it).
            let top = if depth == 0 { &child } else { top };
            child.empty(top, depth + 1)?;
            match self.remove_dir(name) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                // Refilled meanwhile, or swapped: look again.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOTEMPTY | libc::EEXIST | libc::ENOTDIR)
                    ) => {}
                Err(e) if e.raw_os_error() == Some(libc::EACCES) => self.make_accessible_self()?,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::from_raw_os_error(libc::ENOTEMPTY))
    }

    fn empty(&self, top: &Dir, depth: usize) -> io::Result<()> {
        self.seize();
        let entries = match self.entries() {
            Ok(e) => e,
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                self.make_accessible_self()?;
                self.entries()?
            }
            Err(e) => return Err(e),
        };
        for (name, _) in entries {
            self.remove_entry(&name, top, depth)?;
        }
        Ok(())
    }

    /// As root, take a directory that is about to be removed away from whoever owns it (a
    /// `run_as` user's `tmp/`), through its pinned fd: from here on no process of that user can
    /// add entries to it, so emptying it cannot be raced forever.
    fn seize(&self) {
        if Uid::effective().is_root() {
            let _ = self.chown(Uid::from_raw(0), Gid::from_raw(0));
            let _ = self.chmod(0o700);
        }
    }

    /// Give ourselves rwx on this directory (we own it; only needed when not root).
    fn make_accessible_self(&self) -> io::Result<()> {
        let st = self.stat()?;
        if st.st_uid != Uid::effective().as_raw() {
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        self.chmod(0o700)
    }

    /// The same for a subdirectory we cannot open for reading: pin it with `O_PATH` (no
    /// symlink followed), check it is ours, and change the mode of exactly that inode through
    /// its `/proc/self/fd` link (`fchmod` does not take an `O_PATH` fd).
    fn make_accessible(&self, name: &OsStr) -> io::Result<()> {
        let pinned = self.open_dir_path_only(name)?;
        let st = pinned.stat()?;
        if st.st_uid != Uid::effective().as_raw() {
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        let link = format!("/proc/self/fd/{}", pinned.fd.as_raw_fd());
        // path-ok: the /proc/self/fd link of an O_PATH fd pinned with O_NOFOLLOW: that very inode
        stat::fchmodat(
            fcntl::AT_FDCWD,
            link.as_str(),
            Mode::from_bits_truncate(0o700),
            stat::FchmodatFlags::FollowSymlink,
        )
        .map_err(errno)
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tmp() -> (tempfile::TempDir, Dir) {
        let t = tempfile::tempdir().unwrap();
        let d = Dir::open_unchecked(t.path()).unwrap();
        (t, d)
    }

    #[test]
    fn remove_tree_never_follows_symlinks_and_handles_deep_trees() {
        let (t, d) = tmp();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::fs::create_dir(outside.path().join("vdir")).unwrap();
        std::fs::write(outside.path().join("vdir/f"), "keep").unwrap();
        let mut deep = t.path().join("tree");
        for i in 0..(REMOVE_DEPTH * 3) {
            deep = deep.join(format!("d{i}"));
        }
        std::fs::create_dir_all(&deep).unwrap();
        symlink(&victim, deep.join("to-file")).unwrap();
        symlink(outside.path().join("vdir"), t.path().join("tree/to-dir")).unwrap();
        std::fs::write(deep.join("f"), "x").unwrap();
        d.remove_tree("tree").unwrap();
        assert!(!t.path().join("tree").exists());
        assert_eq!(
            crate::sys::safe_fs::tests::names(t.path()),
            Vec::<String>::new()
        );
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(
            std::fs::read_to_string(outside.path().join("vdir/f")).unwrap(),
            "keep"
        );
    }

    #[test]
    fn remove_tree_copes_with_unreadable_dirs_we_own() {
        let (t, d) = tmp();
        let locked = t.path().join("a/locked");
        std::fs::create_dir_all(locked.join("inner")).unwrap();
        std::fs::write(locked.join("inner/f"), "x").unwrap();
        Dir::open_unchecked(&locked).unwrap().chmod(0o000).unwrap();
        Dir::open_unchecked(&t.path().join("a"))
            .unwrap()
            .chmod(0o500)
            .unwrap();
        d.remove_tree("a").unwrap();
        assert!(!t.path().join("a").exists());
    }

    #[test]
    fn read_owned_refuses_fifos_symlinks_and_oversized_files_without_blocking() {
        let (t, d) = tmp();
        nix::unistd::mkfifo(&t.path().join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        symlink("/etc/hostname", t.path().join("link")).unwrap();
        let big = File::create(t.path().join("big")).unwrap();
        big.set_len(8 << 30).unwrap();
        std::fs::write(t.path().join("ok"), b"{}").unwrap();
        assert!(matches!(
            d.read_owned("missing", 10),
            Err(ReadError::Missing)
        ));
        for name in ["fifo", "link", "big"] {
            match d.read_owned(name, 1 << 20) {
                Err(ReadError::Refused(why)) => assert!(why.contains(name), "{why}"),
                other => panic!("{name}: {other:?}"),
            }
        }
        assert_eq!(d.read_owned("ok", 10).unwrap(), b"{}");
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}
