//! The directory backend: a NAS reached through a local path (in production
//! the kernel NFS mount of the share).
//!
//! Nodes are `O_PATH` descriptors, as in libfuse's passthrough_ll: they stay
//! valid when the object is renamed (by nassync or by another client), hard
//! links need no path bookkeeping, and the inode number is the NAS's own.
//! Operations that need a path use the descriptor's `/proc/self/fd/N` link.
//! Following that link (as the xattr calls do) lands on the object the
//! descriptor holds, and stops there: for a symlink, the symlink itself, not
//! its target (what virtiofsd relies on too). The `*xattrat` calls of
//! Linux 6.13 would not help: they refuse `O_PATH` descriptors (EBADF).
//!
//! Objects are created with the caller's filesystem uid and gid
//! (setfsuid/setfsgid, per thread), so that a NAS that squashes root still
//! sees the right owner; where that fails for lack of permission that the
//! kernel has already granted (supplementary groups), the object is created
//! by the daemon and given to the caller with chown.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{
    Attr, BResult, Backend, BackendError, Creds, DirEntry, FileKind, OpenMode, RenameFlags,
    SetAttr, SetTime, StatFs,
};

/// An object on the NAS, held open with `O_PATH`.
#[derive(Debug)]
pub struct DirNode {
    fd: OwnedFd,
    kind: FileKind,
    /// See [`Backend::lists_acls`]: decided per filesystem.
    lists_acls: bool,
    /// The device it is on (see [`Backend::same_fs`]).
    dev: u64,
}

impl DirNode {
    fn proc_path(&self) -> CString {
        proc_path(self.fd.as_raw_fd())
    }
}

fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL in a number")
}

/// A file opened for I/O on the NAS.
#[derive(Debug)]
pub struct DirFile {
    file: File,
}

/// The NAS as a directory tree under `root`.
#[derive(Debug)]
pub struct DirBackend {
    root: PathBuf,
    is_root: bool,
    /// The device of the source; objects on another (a filesystem mounted
    /// inside the source) get inode numbers that cannot collide.
    root_dev: u64,
    /// The source filesystem's largest file size (see [`probe_max_size`]).
    max_size: u64,
    /// [`Backend::lists_acls`] for each filesystem (device) met under the
    /// source, asked once, where a node is made (in a bounded NAS call).
    lists_acls: Mutex<HashMap<u64, bool>>,
}

/// Whether a filesystem (its statfs) is cifs/smb3, whose listxattr
/// leaves out the POSIX ACLs its getxattr serves. Unknown: taken as so.
fn is_smb(fs: nix::Result<nix::sys::statfs::Statfs>) -> bool {
    const CIFS_MAGIC_NUMBER: u32 = 0xFF53_4D42;
    const SMB2_MAGIC_NUMBER: u32 = 0xFE53_4D42;
    const SMB_SUPER_MAGIC: u32 = 0x517B;
    match fs {
        // The magic numbers are 32 bits; f_type is i64, u64 or i32.
        Ok(s) => [CIFS_MAGIC_NUMBER, SMB2_MAGIC_NUMBER, SMB_SUPER_MAGIC]
            .contains(&(s.filesystem_type().0 as u32)),
        Err(_) => true,
    }
}

/// The largest size a file can have on the filesystem of `dir`, found by
/// truncating an unnamed temporary file (O_TMPFILE: never visible on the
/// NAS, gone when closed). Filesystems without O_TMPFILE (NFS among them)
/// and a read-only source give the largest `off_t`.
fn probe_max_size(dir: &Path) -> u64 {
    let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
    else {
        return i64::MAX as u64;
    };
    // Only EFBIG says "too large"; any other failure leaves the limit
    // unknown rather than guessed.
    let fits = |size: u64| match f.set_len(size) {
        Ok(()) => Some(true),
        Err(e) if e.raw_os_error() == Some(libc::EFBIG) => Some(false),
        Err(_) => None,
    };
    let (mut lo, mut hi) = (0u64, i64::MAX as u64);
    match fits(hi) {
        Some(false) => {}
        _ => return hi,
    }
    // lo fits, hi does not.
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        match fits(mid) {
            Some(true) => lo = mid,
            Some(false) => hi = mid,
            None => return i64::MAX as u64,
        }
    }
    lo
}

fn err(op: &'static str) -> BackendError {
    BackendError::new(op, io::Error::last_os_error())
}

fn cstr(op: &'static str, name: &OsStr) -> BResult<CString> {
    CString::new(name.as_bytes()).map_err(|_| BackendError::errno(op, libc::EINVAL))
}

fn check(op: &'static str, ret: libc::c_int) -> BResult<libc::c_int> {
    if ret < 0 { Err(err(op)) } else { Ok(ret) }
}

fn to_time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        // sec is negative and nsec counts forward from it.
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

fn to_timespec(t: Option<SetTime>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(SetTime::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(SetTime::At(t)) => {
            let (sec, nsec) = match t.duration_since(UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
                Err(e) => {
                    let d = e.duration();
                    let mut sec = -(d.as_secs() as i64);
                    let mut nsec = d.subsec_nanos() as i64;
                    if nsec > 0 {
                        sec -= 1;
                        nsec = 1_000_000_000 - nsec;
                    }
                    (sec, nsec)
                }
            };
            libc::timespec {
                tv_sec: sec,
                tv_nsec: nsec,
            }
        }
    }
}

pub(crate) fn attr_from_stat(st: &libc::stat) -> BResult<Attr> {
    let kind = FileKind::from_mode(st.st_mode).ok_or(BackendError::errno("stat", libc::EIO))?;
    Ok(Attr {
        ino: st.st_ino,
        kind,
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        blksize: st.st_blksize as u32,
        atime: to_time(st.st_atime, st.st_atime_nsec),
        mtime: to_time(st.st_mtime, st.st_mtime_nsec),
        ctime: to_time(st.st_ctime, st.st_ctime_nsec),
    })
}

fn fstat_fd(op: &'static str, fd: RawFd) -> BResult<Attr> {
    Ok(stat_fd(op, fd)?.0)
}

/// Attributes and the device number of what `fd` refers to.
fn stat_fd(op: &'static str, fd: RawFd) -> BResult<(Attr, u64)> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: st is a valid out-pointer, the path a valid C string.
    check(op, unsafe {
        libc::fstatat(
            fd,
            empty.as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok((attr_from_stat(&st)?, st.st_dev))
}

fn open_path_at(op: &'static str, dirfd: RawFd, name: &CString) -> BResult<OwnedFd> {
    open_path_flags(op, dirfd, name, libc::O_NOFOLLOW)
}

/// An `O_PATH` descriptor; `extra` is O_NOFOLLOW for a name in a directory,
/// 0 for a /proc/self/fd link (which must be followed to its object).
fn open_path_flags(
    op: &'static str,
    dirfd: RawFd,
    name: &CString,
    extra: libc::c_int,
) -> BResult<OwnedFd> {
    // SAFETY: plain syscall; the result is checked before being owned.
    let fd = unsafe { libc::openat(dirfd, name.as_ptr(), libc::O_PATH | extra | libc::O_CLOEXEC) };
    check(op, fd)?;
    // SAFETY: fd was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Runs `f` with the thread's filesystem uid/gid set to the caller's, when
/// the daemon is root and the caller is not.
fn as_caller<T>(is_root: bool, creds: Creds, f: impl FnOnce() -> BResult<T>) -> BResult<T> {
    if !is_root || (creds.uid == 0 && creds.gid == 0) {
        return f();
    }
    struct Restore;
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: setfsuid/setfsgid only change this thread's credentials.
            unsafe {
                libc::setfsuid(0);
                libc::setfsgid(0);
            }
        }
    }
    // SAFETY: as above; restored by the guard even if f panics.
    unsafe {
        libc::setfsgid(creds.gid);
        libc::setfsuid(creds.uid);
    }
    let _restore = Restore;
    f()
}

fn open_flags(mode: OpenMode) -> libc::c_int {
    let mut flags = match (mode.read, mode.write) {
        (_, false) => libc::O_RDONLY,
        (false, true) => libc::O_WRONLY,
        (true, true) => libc::O_RDWR,
    };
    if mode.append {
        flags |= libc::O_APPEND;
    }
    if mode.truncate {
        flags |= libc::O_TRUNC;
    }
    flags | libc::O_CLOEXEC
}

impl DirBackend {
    /// A backend rooted at `root`, which must be a directory.
    pub fn new(root: &Path) -> io::Result<DirBackend> {
        let meta = std::fs::metadata(root)?;
        if !meta.is_dir() {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        Ok(DirBackend {
            root: root.to_path_buf(),
            is_root: nix::unistd::geteuid().is_root(),
            root_dev: std::os::unix::fs::MetadataExt::dev(&meta),
            max_size: probe_max_size(root),
            lists_acls: Mutex::new(HashMap::from([(
                std::os::unix::fs::MetadataExt::dev(&meta),
                !is_smb(nix::sys::statfs::statfs(root)),
            )])),
        })
    }

    /// Attributes of `fd`, with an inode number unique across the
    /// filesystems under the source.
    fn attr(&self, op: &'static str, fd: RawFd) -> BResult<Attr> {
        Ok(self.attr_dev(op, fd)?.0)
    }

    /// [`Self::attr`], and the device `fd` is on.
    fn attr_dev(&self, op: &'static str, fd: RawFd) -> BResult<(Attr, u64)> {
        let (mut attr, dev) = stat_fd(op, fd)?;
        if dev != self.root_dev {
            let mut key = dev.to_le_bytes().to_vec();
            key.extend_from_slice(&attr.ino.to_le_bytes());
            attr.ino = crate::control::fnv64(&key) | (1 << 63);
        }
        Ok((attr, dev))
    }

    fn node(&self, op: &'static str, fd: OwnedFd) -> BResult<(Arc<DirNode>, Attr)> {
        let (attr, dev) = self.attr_dev(op, fd.as_raw_fd())?;
        let known = self
            .lists_acls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&dev)
            .copied();
        let lists_acls = known.unwrap_or_else(|| {
            // A filesystem mounted inside the source: once per device.
            let yes = !is_smb(nix::sys::statfs::fstatfs(&fd));
            self.lists_acls
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(dev, yes);
            yes
        });
        Ok((
            Arc::new(DirNode {
                fd,
                kind: attr.kind,
                lists_acls,
                dev,
            }),
            attr,
        ))
    }

    /// Gives a just-created object to the caller, when it was created by the
    /// daemon itself: the owner is the caller, the group the caller's
    /// unless the directory passes its own down (setgid).
    fn give_to_caller(&self, dir: &DirNode, fd: RawFd, creds: Creds) -> BResult<()> {
        if !self.is_root {
            return Ok(());
        }
        let dir_attr = fstat_fd("chown", dir.fd.as_raw_fd())?;
        let gid = if dir_attr.perm as u32 & libc::S_ISGID != 0 {
            u32::MAX // leave the inherited group
        } else {
            creds.gid
        };
        // SAFETY: plain syscall on a descriptor we own.
        check("chown", unsafe {
            libc::fchownat(
                fd,
                c"".as_ptr(),
                creds.uid,
                gid,
                libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        Ok(())
    }

    /// Creates an object with `make` as the caller; on EACCES/EPERM (the
    /// caller's supplementary groups are not in the thread's credentials)
    /// creates it as the daemon and chowns it.
    fn create_as(
        &self,
        op: &'static str,
        dir: &DirNode,
        name: &CString,
        creds: Creds,
        make: impl Fn() -> libc::c_int,
    ) -> BResult<(Arc<DirNode>, Attr)> {
        let first = as_caller(self.is_root, creds, || check(op, make()).map(|_| ()));
        let chown_needed = match first {
            Ok(()) => false,
            Err(e)
                if self.is_root
                    && creds.uid != 0
                    && matches!(e.raw_errno(), libc::EACCES | libc::EPERM) =>
            {
                check(op, make())?;
                true
            }
            Err(e) => return Err(e),
        };
        let fd = open_path_at(op, dir.fd.as_raw_fd(), name)?;
        if chown_needed {
            self.give_to_caller(dir, fd.as_raw_fd(), creds)?;
        }
        self.node(op, fd)
    }
}

impl Backend for DirBackend {
    type Node = Arc<DirNode>;
    type File = DirFile;

    fn root(&self) -> BResult<(Self::Node, Attr)> {
        let path = cstr("mount", self.root.as_os_str())?;
        let fd = open_path_at("mount", libc::AT_FDCWD, &path)?;
        let (node, attr) = self.node("mount", fd)?;
        if attr.kind != FileKind::Dir {
            return Err(BackendError::errno("mount", libc::ENOTDIR));
        }
        Ok((node, attr))
    }

    fn lookup(&self, dir: &Self::Node, name: &OsStr) -> BResult<(Self::Node, Attr)> {
        let name = cstr("lookup", name)?;
        let fd = open_path_at("lookup", dir.fd.as_raw_fd(), &name)?;
        self.node("lookup", fd)
    }

    fn getattr(&self, node: &Self::Node) -> BResult<Attr> {
        self.attr("getattr", node.fd.as_raw_fd())
    }

    fn setattr(
        &self,
        node: &Self::Node,
        file: Option<&Self::File>,
        changes: &SetAttr,
    ) -> BResult<Attr> {
        let op = "setattr";
        let path = node.proc_path();
        if let Some(mode) = changes.mode {
            if node.kind != FileKind::Symlink {
                // SAFETY: valid C string path.
                check(op, unsafe { libc::chmod(path.as_ptr(), mode & 0o7777) })?;
            }
        }
        if changes.uid.is_some() || changes.gid.is_some() {
            // SAFETY: plain syscall on our descriptor.
            check(op, unsafe {
                libc::fchownat(
                    node.fd.as_raw_fd(),
                    c"".as_ptr(),
                    changes.uid.unwrap_or(u32::MAX),
                    changes.gid.unwrap_or(u32::MAX),
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
        }
        if let Some(size) = changes.size {
            let ret = match file {
                // SAFETY: plain syscalls.
                Some(f) => unsafe { libc::ftruncate(f.file.as_raw_fd(), size as libc::off_t) },
                None => unsafe { libc::truncate(path.as_ptr(), size as libc::off_t) },
            };
            check(op, ret)?;
        }
        if changes.atime.is_some() || changes.mtime.is_some() {
            let times = [to_timespec(changes.atime), to_timespec(changes.mtime)];
            let r = if node.kind == FileKind::Symlink {
                // The /proc link would lead to the symlink's target; the
                // descriptor itself names the symlink (Linux 5.8+).
                // SAFETY: times has the two entries utimensat reads.
                unsafe {
                    libc::utimensat(
                        node.fd.as_raw_fd(),
                        c"".as_ptr(),
                        times.as_ptr(),
                        libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                    )
                }
            } else {
                // SAFETY: as above.
                unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0) }
            };
            check(op, r)?;
        }
        self.attr(op, node.fd.as_raw_fd())
    }

    fn readlink(&self, node: &Self::Node) -> BResult<OsString> {
        let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
        // SAFETY: buf is writable for its length.
        let n = unsafe {
            libc::readlinkat(
                node.fd.as_raw_fd(),
                c"".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(err("readlink"));
        }
        buf.truncate(n as usize);
        Ok(OsString::from_vec(buf))
    }

    fn readdir(&self, dir: &Self::Node) -> BResult<Vec<DirEntry>> {
        let op = "readdir";
        let fd = nix::fcntl::openat(
            dir.fd.as_fd(),
            ".",
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| BackendError::errno(op, e as i32))?;
        let mut d = nix::dir::Dir::from_fd(fd).map_err(|e| BackendError::errno(op, e as i32))?;
        let dfd = d.as_raw_fd();
        let mut out = Vec::new();
        for entry in d.iter() {
            let entry = entry.map_err(|e| BackendError::errno(op, e as i32))?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let kind = match entry
                .file_type()
                .and_then(|t| FileKind::from_dirent_type(dirent_type(t)))
            {
                Some(k) => k,
                None => {
                    let mut st: libc::stat = unsafe { std::mem::zeroed() };
                    // SAFETY: valid C string from the dirent, valid out-pointer.
                    let r = unsafe {
                        libc::fstatat(
                            dfd,
                            entry.file_name().as_ptr(),
                            &mut st,
                            libc::AT_SYMLINK_NOFOLLOW,
                        )
                    };
                    if r < 0 {
                        continue; // gone since the listing was read
                    }
                    match FileKind::from_mode(st.st_mode) {
                        Some(k) => k,
                        None => continue,
                    }
                }
            };
            out.push(DirEntry {
                name: OsStr::from_bytes(name).to_os_string(),
                ino: entry.ino(),
                kind,
            });
        }
        Ok(out)
    }

    fn mknod(
        &self,
        dir: &Self::Node,
        name: &OsStr,
        mode: u32,
        rdev: u64,
        creds: Creds,
    ) -> BResult<(Self::Node, Attr)> {
        let c = cstr("mknod", name)?;
        let dfd = dir.fd.as_raw_fd();
        self.create_as("mknod", dir, &c, creds, || {
            // SAFETY: valid C string.
            unsafe { libc::mknodat(dfd, c.as_ptr(), mode, rdev as libc::dev_t) }
        })
    }

    fn mkdir(
        &self,
        dir: &Self::Node,
        name: &OsStr,
        mode: u32,
        creds: Creds,
    ) -> BResult<(Self::Node, Attr)> {
        let c = cstr("mkdir", name)?;
        let dfd = dir.fd.as_raw_fd();
        self.create_as("mkdir", dir, &c, creds, || {
            // SAFETY: valid C string.
            unsafe { libc::mkdirat(dfd, c.as_ptr(), mode) }
        })
    }

    fn symlink(
        &self,
        dir: &Self::Node,
        name: &OsStr,
        target: &OsStr,
        creds: Creds,
    ) -> BResult<(Self::Node, Attr)> {
        let c = cstr("symlink", name)?;
        let t = cstr("symlink", target)?;
        let dfd = dir.fd.as_raw_fd();
        self.create_as("symlink", dir, &c, creds, || {
            // SAFETY: valid C strings.
            unsafe { libc::symlinkat(t.as_ptr(), dfd, c.as_ptr()) }
        })
    }

    fn link(&self, node: &Self::Node, dir: &Self::Node, name: &OsStr) -> BResult<Attr> {
        let c = cstr("link", name)?;
        let src = node.proc_path();
        // SAFETY: valid C strings.
        check("link", unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                src.as_ptr(),
                dir.fd.as_raw_fd(),
                c.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        })?;
        self.attr("link", node.fd.as_raw_fd())
    }

    fn unlink(&self, dir: &Self::Node, name: &OsStr) -> BResult<()> {
        let c = cstr("unlink", name)?;
        // SAFETY: valid C string.
        check("unlink", unsafe {
            libc::unlinkat(dir.fd.as_raw_fd(), c.as_ptr(), 0)
        })?;
        Ok(())
    }

    fn rmdir(&self, dir: &Self::Node, name: &OsStr) -> BResult<()> {
        let c = cstr("rmdir", name)?;
        // SAFETY: valid C string.
        check("rmdir", unsafe {
            libc::unlinkat(dir.fd.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR)
        })?;
        Ok(())
    }

    fn rename(
        &self,
        dir: &Self::Node,
        name: &OsStr,
        newdir: &Self::Node,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> BResult<()> {
        let a = cstr("rename", name)?;
        let b = cstr("rename", newname)?;
        let mut f = 0;
        if flags.noreplace {
            f |= libc::RENAME_NOREPLACE;
        }
        if flags.exchange {
            f |= libc::RENAME_EXCHANGE;
        }
        // The raw system call: musl's libc has no renameat2 wrapper.
        // SAFETY: valid C strings; the arguments are those of renameat2(2).
        let r = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                dir.fd.as_raw_fd(),
                a.as_ptr(),
                newdir.fd.as_raw_fd(),
                b.as_ptr(),
                f,
            )
        };
        check("rename", r as libc::c_int)?;
        Ok(())
    }

    fn open(&self, node: &Self::Node, mode: OpenMode) -> BResult<Self::File> {
        let path = node.proc_path();
        // SAFETY: valid C string.
        let fd = check("open", unsafe {
            libc::open(path.as_ptr(), open_flags(mode))
        })?;
        // SAFETY: fd was just opened and is owned by nobody else.
        Ok(DirFile {
            file: unsafe { File::from_raw_fd(fd) },
        })
    }

    fn create(
        &self,
        dir: &Self::Node,
        name: &OsStr,
        mode: u32,
        open: OpenMode,
        exclusive: bool,
        creds: Creds,
    ) -> BResult<(Self::Node, Attr, Self::File)> {
        let op = "create";
        let c = cstr(op, name)?;
        let mut flags = open_flags(open) | libc::O_CREAT | libc::O_NOFOLLOW;
        if exclusive {
            flags |= libc::O_EXCL;
        }
        let dfd = dir.fd.as_raw_fd();
        let make = || {
            // SAFETY: valid C string.
            unsafe { libc::openat(dfd, c.as_ptr(), flags, mode) }
        };
        let mut chown_needed = false;
        let fd = match as_caller(self.is_root, creds, || check(op, make())) {
            Ok(fd) => fd,
            Err(e)
                if self.is_root
                    && creds.uid != 0
                    && matches!(e.raw_errno(), libc::EACCES | libc::EPERM) =>
            {
                chown_needed = true;
                check(op, make())?
            }
            Err(e) => return Err(e),
        };
        // SAFETY: fd was just opened and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        // The node is the very inode that was opened, whatever happens to
        // the name meanwhile.
        let node_fd = open_path_flags(op, libc::AT_FDCWD, &proc_path(fd), 0)?;
        if chown_needed {
            self.give_to_caller(dir, node_fd.as_raw_fd(), creds)?;
        }
        let (node, attr) = self.node(op, node_fd)?;
        Ok((node, attr, DirFile { file }))
    }

    fn read(&self, file: &Self::File, offset: u64, buf: &mut [u8]) -> BResult<usize> {
        // A block read near the largest offset would end past it, which
        // pread refuses (EINVAL) although there is nothing there to read.
        let reach = (i64::MAX as u64).saturating_sub(offset);
        let len = usize::try_from(reach).unwrap_or(usize::MAX).min(buf.len());
        let buf = &mut buf[..len];
        let mut done = 0;
        while done < buf.len() {
            match file.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(BackendError::new("read", e)),
            }
        }
        // nassync keeps what it read in its own caches: the kernel's copy
        // of the NAS file (NFS page cache) would be a second one, and
        // dropping it later costs the next open of the file dearly.
        if done > 0 {
            let _ = nix::fcntl::posix_fadvise(
                &file.file,
                offset as i64,
                done as i64,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            );
        }
        Ok(done)
    }

    fn write(&self, file: &Self::File, offset: u64, data: &[u8]) -> BResult<usize> {
        file.file
            .write_all_at(data, offset)
            .map_err(|e| BackendError::new("write", e))?;
        Ok(data.len())
    }

    fn fsync(&self, file: &Self::File, datasync: bool) -> BResult<()> {
        let r = if datasync {
            file.file.sync_data()
        } else {
            file.file.sync_all()
        };
        r.map_err(|e| BackendError::new("fsync", e))
    }

    fn fallocate(&self, file: &Self::File, mode: i32, offset: u64, len: u64) -> BResult<()> {
        // SAFETY: plain syscall on our descriptor.
        check("fallocate", unsafe {
            libc::fallocate(
                file.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        })?;
        Ok(())
    }

    fn fgetattr(&self, file: &Self::File) -> BResult<Attr> {
        self.attr("getattr", file.file.as_raw_fd())
    }

    fn fsyncdir(&self, dir: &Self::Node) -> BResult<()> {
        let f = nix::fcntl::openat(
            dir.fd.as_fd(),
            ".",
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| BackendError::errno("fsyncdir", e as i32))?;
        File::from(f)
            .sync_all()
            .map_err(|e| BackendError::new("fsyncdir", e))
    }

    fn same_fs(&self, a: &Self::Node, b: &Self::Node) -> bool {
        a.dev == b.dev
    }

    fn lists_acls(&self, node: &Self::Node) -> bool {
        node.lists_acls
    }
    fn max_file_size(&self) -> u64 {
        self.max_size
    }

    fn statfs(&self, node: &Self::Node) -> BResult<StatFs> {
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid out-pointer; fstatvfs accepts O_PATH descriptors.
        check("statfs", unsafe {
            libc::fstatvfs(node.fd.as_raw_fd(), &mut s)
        })?;
        Ok(StatFs {
            blocks: s.f_blocks,
            bfree: s.f_bfree,
            bavail: s.f_bavail,
            files: s.f_files,
            ffree: s.f_ffree,
            bsize: s.f_bsize as u32,
            namelen: s.f_namemax as u32,
            frsize: s.f_frsize as u32,
        })
    }

    fn getxattr(&self, node: &Self::Node, name: &OsStr) -> BResult<Vec<u8>> {
        let op = "getxattr";
        let path = node.proc_path();
        let c = cstr(op, name)?;
        xattr_read(op, |buf, len| {
            // SAFETY: buf is writable for len bytes (or null with len 0).
            unsafe { libc::getxattr(path.as_ptr(), c.as_ptr(), buf, len) }
        })
    }

    fn listxattr(&self, node: &Self::Node) -> BResult<Vec<u8>> {
        let op = "listxattr";
        let path = node.proc_path();
        xattr_read(op, |buf, len| {
            // SAFETY: buf is writable for len bytes (or null with len 0).
            unsafe { libc::listxattr(path.as_ptr(), buf.cast(), len) }
        })
    }

    fn setxattr(&self, node: &Self::Node, name: &OsStr, value: &[u8], flags: i32) -> BResult<()> {
        let op = "setxattr";
        let path = node.proc_path();
        let c = cstr(op, name)?;
        // SAFETY: value is readable for its length.
        check(op, unsafe {
            libc::setxattr(
                path.as_ptr(),
                c.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        })?;
        Ok(())
    }

    fn removexattr(&self, node: &Self::Node, name: &OsStr) -> BResult<()> {
        let op = "removexattr";
        let path = node.proc_path();
        let c = cstr(op, name)?;
        // SAFETY: valid C strings.
        check(op, unsafe { libc::removexattr(path.as_ptr(), c.as_ptr()) })?;
        Ok(())
    }
}

fn dirent_type(t: nix::dir::Type) -> u8 {
    use nix::dir::Type;
    match t {
        Type::Fifo => libc::DT_FIFO,
        Type::CharacterDevice => libc::DT_CHR,
        Type::Directory => libc::DT_DIR,
        Type::BlockDevice => libc::DT_BLK,
        Type::File => libc::DT_REG,
        Type::Symlink => libc::DT_LNK,
        Type::Socket => libc::DT_SOCK,
    }
}

/// Reads an xattr value or list, growing the buffer if it changed size
/// between the size query and the read.
fn xattr_read(
    op: &'static str,
    call: impl Fn(*mut libc::c_void, usize) -> isize,
) -> BResult<Vec<u8>> {
    // The VFS caps values and lists at 64 KiB: one call with that room is
    // one NAS round trip where asking for the size first takes two.
    let mut buf = vec![0u8; 1 << 16];
    let m = call(buf.as_mut_ptr().cast(), buf.len());
    if m >= 0 {
        // An exact copy: the answers are cached, 64 KiB each would add up.
        return Ok(buf[..m as usize].to_vec());
    }
    let e = err(op);
    if e.raw_errno() != libc::ERANGE {
        return Err(e);
    }
    loop {
        let n = call(std::ptr::null_mut(), 0);
        if n < 0 {
            return Err(err(op));
        }
        let mut buf = vec![0u8; n as usize];
        let m = call(buf.as_mut_ptr().cast(), buf.len());
        if m < 0 {
            let e = err(op);
            if e.raw_errno() == libc::ERANGE {
                continue;
            }
            return Err(e);
        }
        buf.truncate(m as usize);
        return Ok(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probed_size_is_the_filesystems_exact_limit() {
        let dir = tempfile::tempdir().unwrap();
        let max = probe_max_size(dir.path());
        let f = std::fs::File::create(dir.path().join("f")).unwrap();
        f.set_len(max).unwrap();
        if max < i64::MAX as u64 {
            let e = f.set_len(max + 1).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EFBIG));
        }
        // Nothing is left behind in the directory.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }
}
