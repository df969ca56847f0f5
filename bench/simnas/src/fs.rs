//! Passthrough filesystem in the style of libfuse's passthrough_ll: every
//! inode is an O_PATH fd on the backing file, keyed by (st_dev, st_ino), and
//! the kernel node id is the backing st_ino (root = 1), so inode numbers seen
//! through the mount are stable. Every callback except forget/release/
//! releasedir is a simulated NAS round trip (see `Sim::round_trip`).

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use libc::c_int;
use nix::dir::{Dir, Type};
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use crate::sim::{Op, Sim, lock};

type Res<T> = Result<T, Errno>;
const GEN: Generation = Generation(0);

fn last_err() -> Errno {
    Errno::from(std::io::Error::last_os_error())
}

fn cvt(r: c_int) -> Res<c_int> {
    if r < 0 { Err(last_err()) } else { Ok(r) }
}

fn cvt_size(r: isize) -> Res<usize> {
    if r < 0 {
        Err(last_err())
    } else {
        Ok(r as usize)
    }
}

fn cstr(name: &OsStr) -> Res<CString> {
    CString::new(name.as_bytes()).map_err(|_| Errno::EINVAL)
}

/// `/proc/self/fd/N`: how to reach an O_PATH fd with calls that take a path.
fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).unwrap_or_default()
}

fn stat_at(dir: RawFd, name: &CStr, flags: c_int) -> Res<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    let flags = flags | libc::AT_SYMLINK_NOFOLLOW;
    cvt(unsafe { libc::fstatat(dir, name.as_ptr(), st.as_mut_ptr(), flags) })?;
    Ok(unsafe { st.assume_init() })
}

fn stat_fd(fd: RawFd) -> Res<libc::stat> {
    stat_at(fd, c"", libc::AT_EMPTY_PATH)
}

fn kind(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn systime(sec: i64, nsec: i64) -> SystemTime {
    let t = if sec >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(sec as u64))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(sec.unsigned_abs()))
    };
    let t = t.unwrap_or(UNIX_EPOCH);
    t.checked_add(Duration::from_nanos(nsec.clamp(0, 999_999_999) as u64))
        .unwrap_or(t)
}

fn timespec(t: Option<TimeOrNow>) -> libc::timespec {
    let (tv_sec, tv_nsec) = match t {
        None => (0, libc::UTIME_OMIT),
        Some(TimeOrNow::Now) => (0, libc::UTIME_NOW),
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
            Err(e) => {
                let d = e.duration();
                let (s, n) = (-(d.as_secs() as i64), d.subsec_nanos() as i64);
                if n > 0 {
                    (s - 1, 1_000_000_000 - n)
                } else {
                    (s, 0)
                }
            }
        },
    };
    libc::timespec { tv_sec, tv_nsec }
}

struct Inode {
    fd: OwnedFd,
    id: u64,
    key: (u64, u64),
}

impl Inode {
    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[derive(Default)]
struct Table {
    by_id: HashMap<u64, (Arc<Inode>, u64)>,
    by_key: HashMap<(u64, u64), u64>,
    next_synthetic: u64,
}

struct DirEntry {
    name: Vec<u8>,
    ino: u64,
    kind: FileType,
}

pub struct SimFs {
    sim: Arc<Sim>,
    ttl: Duration,
    chown: bool,
    root_key: (u64, u64),
    table: Mutex<Table>,
    files: RwLock<HashMap<u64, Arc<File>>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next_fh: AtomicU64,
}

impl SimFs {
    pub fn new(backing: &Path, sim: Arc<Sim>, ttl: Duration) -> anyhow::Result<SimFs> {
        let fd = nix::fcntl::open(
            backing,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let st = stat_fd(fd.as_raw_fd()).map_err(|e| anyhow::anyhow!("stat backing: {e:?}"))?;
        let root_key = (st.st_dev, st.st_ino);
        let mut t = Table {
            next_synthetic: 1 << 63,
            ..Default::default()
        };
        t.by_id.insert(
            1,
            (
                Arc::new(Inode {
                    fd,
                    id: 1,
                    key: root_key,
                }),
                1,
            ),
        );
        t.by_key.insert(root_key, 1);
        Ok(SimFs {
            sim,
            ttl,
            chown: nix::unistd::geteuid().is_root(),
            root_key,
            table: Mutex::new(t),
            files: RwLock::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        })
    }

    /// A NAS round trip around `f`: latency/freeze/fault first, and a panic
    /// inside `f` becomes EIO instead of killing a worker thread.
    fn rt<T>(&self, op: Op, f: impl FnOnce() -> Res<T>) -> Res<T> {
        self.sim.round_trip(op).map_err(Errno::from_i32)?;
        catch_unwind(AssertUnwindSafe(f)).unwrap_or(Err(Errno::EIO))
    }

    fn inode(&self, ino: INodeNo) -> Res<Arc<Inode>> {
        let t = lock(&self.table);
        t.by_id
            .get(&ino.0)
            .map(|e| e.0.clone())
            .ok_or(Errno::ESTALE)
    }

    fn file(&self, fh: FileHandle) -> Res<Arc<File>> {
        let files = self.files.read().unwrap_or_else(|e| e.into_inner());
        files.get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn add_file(&self, f: File) -> u64 {
        let fh = self.next_fh.fetch_add(1, Relaxed);
        let mut files = self.files.write().unwrap_or_else(|e| e.into_inner());
        files.insert(fh, Arc::new(f));
        fh
    }

    /// Inode number reported for a backing (dev, ino) that may not be in the table.
    fn map_ino(&self, dev: u64, ino: u64) -> u64 {
        if (dev, ino) == self.root_key {
            return 1;
        }
        lock(&self.table)
            .by_key
            .get(&(dev, ino))
            .copied()
            .unwrap_or(ino)
    }

    fn attr(&self, st: &libc::stat, id: u64) -> FileAttr {
        FileAttr {
            ino: INodeNo(id),
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: systime(st.st_atime, st.st_atime_nsec),
            mtime: systime(st.st_mtime, st.st_mtime_nsec),
            ctime: systime(st.st_ctime, st.st_ctime_nsec),
            crtime: UNIX_EPOCH,
            kind: kind(st.st_mode),
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }

    /// Look `name` up in `parent`, taking one lookup reference on the result
    /// (the kernel will send a matching forget).
    fn do_lookup(&self, parent: &Inode, name: &CStr) -> Res<FileAttr> {
        let flags = libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        let fd = cvt(unsafe { libc::openat(parent.raw(), name.as_ptr(), flags) })?;
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let st = stat_fd(fd.as_raw_fd())?;
        let key = (st.st_dev, st.st_ino);
        let mut t = lock(&self.table);
        if let Some(&id) = t.by_key.get(&key) {
            if let Some(e) = t.by_id.get_mut(&id) {
                e.1 += 1;
                return Ok(self.attr(&st, id));
            }
        }
        // Node id = backing st_ino unless that would clash (ino 0/1, or the same
        // st_ino on another device); then use a synthetic id from the top half.
        let mut id = st.st_ino;
        while id <= 1 || t.by_id.contains_key(&id) {
            t.next_synthetic += 1;
            id = t.next_synthetic;
        }
        t.by_id.insert(id, (Arc::new(Inode { fd, id, key }), 1));
        t.by_key.insert(key, id);
        self.sim.inodes.store(t.by_id.len() as u64, Relaxed);
        Ok(self.attr(&st, id))
    }

    fn forget_n(&self, id: u64, n: u64) {
        if id == 1 {
            return;
        }
        let mut t = lock(&self.table);
        let gone = match t.by_id.get_mut(&id) {
            Some(e) => {
                e.1 = e.1.saturating_sub(n);
                e.1 == 0
            }
            None => false,
        };
        if gone {
            if let Some((node, _)) = t.by_id.remove(&id) {
                if t.by_key.get(&node.key) == Some(&id) {
                    t.by_key.remove(&node.key);
                }
            }
            self.sim.inodes.store(t.by_id.len() as u64, Relaxed);
        }
    }

    fn getattr_inode(&self, n: &Inode) -> Res<FileAttr> {
        Ok(self.attr(&stat_fd(n.raw())?, n.id))
    }

    /// Give a freshly created node to the caller (we run as root). In a setgid
    /// directory the group was already inherited, so leave it alone.
    fn chown_new(&self, parent: &Inode, name: &CStr, fd: Option<RawFd>, req: &Request) {
        if !self.chown {
            return;
        }
        let setgid = stat_fd(parent.raw()).is_ok_and(|st| st.st_mode & libc::S_ISGID != 0);
        let gid = if setgid { u32::MAX } else { req.gid() };
        let r = match fd {
            Some(fd) => unsafe { libc::fchown(fd, req.uid(), gid) },
            None => unsafe {
                libc::fchownat(
                    parent.raw(),
                    name.as_ptr(),
                    req.uid(),
                    gid,
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            },
        };
        if r < 0 {
            log::warn!("chown of new node {name:?} failed: {:?}", last_err());
        }
    }

    /// Shared tail of mknod/mkdir/symlink: chown, restore set-id bits that the
    /// chown cleared, and look the new node up.
    fn finish_new(
        &self,
        p: &Inode,
        name: &CStr,
        mode: Option<u32>,
        req: &Request,
    ) -> Res<FileAttr> {
        self.chown_new(p, name, None, req);
        if let Some(mode) = mode.filter(|m| self.chown && m & 0o6000 != 0) {
            unsafe { libc::fchmodat(p.raw(), name.as_ptr(), mode & 0o7777, 0) };
        }
        self.do_lookup(p, name)
    }

    fn read_dir(&self, n: &Inode) -> Res<Vec<DirEntry>> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let mut dir =
            Dir::openat(&n.fd, ".", flags, Mode::empty()).map_err(|e| Errno::from_i32(e as i32))?;
        let dev = stat_fd(n.raw())?.st_dev;
        let mut out = Vec::new();
        for e in dir.iter() {
            let e = e.map_err(|e| Errno::from_i32(e as i32))?;
            let name = e.file_name();
            let kind = match e.file_type() {
                Some(Type::Directory) => FileType::Directory,
                Some(Type::File) => FileType::RegularFile,
                Some(Type::Symlink) => FileType::Symlink,
                Some(Type::Fifo) => FileType::NamedPipe,
                Some(Type::Socket) => FileType::Socket,
                Some(Type::CharacterDevice) => FileType::CharDevice,
                Some(Type::BlockDevice) => FileType::BlockDevice,
                None => match stat_at(n.raw(), name, 0) {
                    Ok(st) => kind(st.st_mode),
                    Err(_) => continue,
                },
            };
            let ino = if name.to_bytes() == b"." {
                n.id
            } else {
                self.map_ino(dev, e.ino())
            };
            out.push(DirEntry {
                name: name.to_bytes().to_vec(),
                ino,
                kind,
            });
        }
        Ok(out)
    }

    fn dir(&self, fh: FileHandle) -> Res<Arc<Vec<DirEntry>>> {
        lock(&self.dirs).get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn xattr_reply(r: Res<Vec<u8>>, size: u32, reply: ReplyXattr) {
        match r {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(e),
        }
    }

    /// Run a getxattr/listxattr-style call twice: once for the size, once for the data.
    fn xattr_get(f: impl Fn(*mut libc::c_void, usize) -> isize) -> Res<Vec<u8>> {
        loop {
            let n = cvt_size(f(std::ptr::null_mut(), 0))?;
            let mut buf = vec![0u8; n];
            match cvt_size(f(buf.as_mut_ptr().cast(), n)) {
                Ok(m) => {
                    buf.truncate(m);
                    return Ok(buf);
                }
                Err(e) if e == Errno::ERANGE => continue, // grew meanwhile
                Err(e) => return Err(e),
            }
        }
    }
}

fn reply_entry(r: Res<FileAttr>, ttl: &Duration, reply: ReplyEntry) {
    match r {
        Ok(a) => reply.entry(ttl, &a, GEN),
        Err(e) => reply.error(e),
    }
}

fn reply_empty(r: Res<()>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn is_symlink(n: &Inode) -> bool {
    stat_fd(n.raw()).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK)
}

impl Filesystem for SimFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Readdirplus like NFS, and parallel lookups within one directory.
        for f in [
            InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
        ] {
            let _ = config.add_capabilities(f);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self.rt(Op::Lookup, || {
            self.do_lookup(&*self.inode(parent)?, &cstr(name)?)
        });
        reply_entry(r, &self.ttl, reply);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.sim.count(Op::Forget);
        self.forget_n(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.rt(Op::Getattr, || self.getattr_inode(&*self.inode(ino)?)) {
            Ok(a) => reply.attr(&self.ttl, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = self.rt(Op::Setattr, || {
            let n = self.inode(ino)?;
            let file = fh.and_then(|fh| self.file(fh).ok());
            let ffd = file.as_ref().map(|f| f.as_raw_fd());
            let path = proc_path(n.raw());
            if let Some(m) = mode {
                let m = m & 0o7777;
                cvt(match ffd {
                    Some(fd) => unsafe { libc::fchmod(fd, m) },
                    None => unsafe { libc::chmod(path.as_ptr(), m) },
                })?;
            }
            if uid.is_some() || gid.is_some() {
                let (u, g) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
                let fl = libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW;
                cvt(unsafe { libc::fchownat(n.raw(), c"".as_ptr(), u, g, fl) })?;
            }
            if let Some(s) = size {
                let s = libc::off_t::try_from(s).map_err(|_| Errno::EFBIG)?;
                cvt(match ffd {
                    Some(fd) => unsafe { libc::ftruncate(fd, s) },
                    None => unsafe { libc::truncate(path.as_ptr(), s) },
                })?;
            }
            if atime.is_some() || mtime.is_some() {
                let ts = [timespec(atime), timespec(mtime)];
                cvt(match ffd {
                    Some(fd) => unsafe { libc::futimens(fd, ts.as_ptr()) },
                    None => unsafe {
                        libc::utimensat(libc::AT_FDCWD, path.as_ptr(), ts.as_ptr(), 0)
                    },
                })?;
            }
            self.getattr_inode(&n)
        });
        match r {
            Ok(a) => reply.attr(&self.ttl, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self.rt(Op::Readlink, || {
            let n = self.inode(ino)?;
            let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
            let len = cvt_size(unsafe {
                libc::readlinkat(n.raw(), c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len())
            })?;
            buf.truncate(len);
            Ok(buf)
        });
        match r {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = self.rt(Op::Mknod, || {
            let (p, c) = (self.inode(parent)?, cstr(name)?);
            cvt(unsafe { libc::mknodat(p.raw(), c.as_ptr(), mode, rdev as libc::dev_t) })?;
            self.finish_new(&p, &c, Some(mode), req)
        });
        reply_entry(r, &self.ttl, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.rt(Op::Mkdir, || {
            let (p, c) = (self.inode(parent)?, cstr(name)?);
            cvt(unsafe { libc::mkdirat(p.raw(), c.as_ptr(), mode) })?;
            self.finish_new(&p, &c, Some(mode), req)
        });
        reply_entry(r, &self.ttl, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.rt(Op::Unlink, || {
            let (p, c) = (self.inode(parent)?, cstr(name)?);
            cvt(unsafe { libc::unlinkat(p.raw(), c.as_ptr(), 0) }).map(drop)
        });
        reply_empty(r, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.rt(Op::Rmdir, || {
            let (p, c) = (self.inode(parent)?, cstr(name)?);
            cvt(unsafe { libc::unlinkat(p.raw(), c.as_ptr(), libc::AT_REMOVEDIR) }).map(drop)
        });
        reply_empty(r, reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.rt(Op::Symlink, || {
            let (p, c, t) = (
                self.inode(parent)?,
                cstr(link_name)?,
                cstr(target.as_os_str())?,
            );
            cvt(unsafe { libc::symlinkat(t.as_ptr(), p.raw(), c.as_ptr()) })?;
            self.finish_new(&p, &c, None, req)
        });
        reply_entry(r, &self.ttl, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.rt(Op::Rename, || {
            let (p, c) = (self.inode(parent)?, cstr(name)?);
            let (np, nc) = (self.inode(newparent)?, cstr(newname)?);
            let r = unsafe {
                libc::renameat2(p.raw(), c.as_ptr(), np.raw(), nc.as_ptr(), flags.bits())
            };
            cvt(r).map(drop)
        });
        reply_empty(r, reply);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = self.rt(Op::Link, || {
            let (n, np, nc) = (self.inode(ino)?, self.inode(newparent)?, cstr(newname)?);
            let (np_fd, nc_p) = (np.raw(), nc.as_ptr());
            // AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH; otherwise go through /proc.
            let r =
                unsafe { libc::linkat(n.raw(), c"".as_ptr(), np_fd, nc_p, libc::AT_EMPTY_PATH) };
            if r < 0 {
                let p = proc_path(n.raw());
                cvt(unsafe {
                    libc::linkat(
                        libc::AT_FDCWD,
                        p.as_ptr(),
                        np_fd,
                        nc_p,
                        libc::AT_SYMLINK_FOLLOW,
                    )
                })?;
            }
            self.do_lookup(&np, &nc)
        });
        reply_entry(r, &self.ttl, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = self.rt(Op::Open, || {
            let n = self.inode(ino)?;
            let fl = (flags.0
                & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_NOFOLLOW))
                | libc::O_CLOEXEC;
            let fd = cvt(unsafe { libc::open(proc_path(n.raw()).as_ptr(), fl) })?;
            Ok(self.add_file(unsafe { File::from_raw_fd(fd) }))
        });
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let r = self.rt(Op::Read, || {
            let f = self.file(fh)?;
            let mut buf = vec![0u8; size as usize];
            let mut n = 0;
            while n < buf.len() {
                match f.read_at(&mut buf[n..], offset + n as u64) {
                    Ok(0) => break,
                    Ok(m) => n += m,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) if n == 0 => return Err(e.into()),
                    Err(_) => break,
                }
            }
            buf.truncate(n);
            self.sim.add_read(n);
            self.sim.transfer(n);
            Ok(buf)
        });
        match r {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let r = self.rt(Op::Write, || {
            let f = self.file(fh)?;
            self.sim.transfer(data.len());
            let mut n = 0;
            while n < data.len() {
                match f.write_at(&data[n..], offset + n as u64) {
                    Ok(0) => break,
                    Ok(m) => n += m,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) if n == 0 => return Err(e.into()),
                    Err(_) => break,
                }
            }
            self.sim.add_written(n);
            Ok(n as u32)
        });
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(dup(fd)) reports deferred write errors, as libfuse passthrough does.
        let r = self.rt(Op::Flush, || {
            let fd = cvt(unsafe { libc::dup(self.file(fh)?.as_raw_fd()) })?;
            cvt(unsafe { libc::close(fd) }).map(drop)
        });
        reply_empty(r, reply);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.sim.count(Op::Release);
        self.files
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.rt(Op::Fsync, || {
            let f = self.file(fh)?;
            if datasync {
                f.sync_data()
            } else {
                f.sync_all()
            }
            .map_err(Errno::from)
        });
        reply_empty(r, reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // The listing is snapshotted here so readdir offsets stay stable.
        let r = self.rt(Op::Opendir, || {
            let entries = self.read_dir(&*self.inode(ino)?)?;
            let fh = self.next_fh.fetch_add(1, Relaxed);
            lock(&self.dirs).insert(fh, Arc::new(entries));
            Ok(fh)
        });
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.rt(Op::Readdir, || self.dir(fh)) {
            Ok(entries) => {
                for (i, e) in entries.iter().enumerate().skip(offset as usize) {
                    let name = OsStr::from_bytes(&e.name);
                    if reply.add(INodeNo(e.ino), i as u64 + 1, e.kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let r = self.rt(Op::Readdirplus, || Ok((self.dir(fh)?, self.inode(ino)?)));
        let (entries, dir) = match r {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            let Ok(name) = CString::new(e.name.clone()) else {
                continue;
            };
            let off = i as u64 + 1;
            let dot = e.name == b"." || e.name == b"..";
            // "." and ".." are not linked by the kernel, so take no reference.
            let attr = if dot {
                stat_at(dir.raw(), &name, 0).map(|st| self.attr(&st, e.ino))
            } else {
                self.do_lookup(&dir, &name)
            };
            let Ok(attr) = attr else { continue }; // vanished since opendir
            if reply.add(
                attr.ino,
                off,
                OsStr::from_bytes(&e.name),
                &self.ttl,
                &attr,
                GEN,
            ) {
                if !dot {
                    self.forget_n(attr.ino.0, 1); // did not fit: kernel never saw it
                }
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.sim.count(Op::Releasedir);
        lock(&self.dirs).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.rt(Op::Fsyncdir, || {
            let n = self.inode(ino)?;
            let fd = cvt(unsafe {
                libc::openat(
                    n.raw(),
                    c".".as_ptr(),
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            })?;
            let f = unsafe { File::from_raw_fd(fd) };
            if datasync {
                f.sync_data()
            } else {
                f.sync_all()
            }
            .map_err(Errno::from)
        });
        reply_empty(r, reply);
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let r = self.rt(Op::Statfs, || {
            let n = self.inode(ino).or_else(|_| self.inode(INodeNo::ROOT))?;
            let mut s = MaybeUninit::<libc::statvfs>::uninit();
            cvt(unsafe { libc::fstatvfs(n.raw(), s.as_mut_ptr()) })?;
            Ok(unsafe { s.assume_init() })
        });
        match r {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    // xattrs go through /proc/self/fd/N, which cannot address a symlink itself:
    // symlinks report no xattrs and refuse to get them set.
    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let r = self.rt(Op::Setxattr, || {
            let (n, c) = (self.inode(ino)?, cstr(name)?);
            if is_symlink(&n) {
                return Err(Errno::EPERM);
            }
            let p = proc_path(n.raw());
            cvt(unsafe {
                libc::setxattr(
                    p.as_ptr(),
                    c.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    flags,
                )
            })
            .map(drop)
        });
        reply_empty(r, reply);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let r = self.rt(Op::Getxattr, || {
            let (n, c) = (self.inode(ino)?, cstr(name)?);
            if is_symlink(&n) {
                return Err(Errno::NO_XATTR);
            }
            let p = proc_path(n.raw());
            Self::xattr_get(|buf, len| unsafe { libc::getxattr(p.as_ptr(), c.as_ptr(), buf, len) })
        });
        Self::xattr_reply(r, size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let r = self.rt(Op::Listxattr, || {
            let n = self.inode(ino)?;
            if is_symlink(&n) {
                return Ok(Vec::new());
            }
            let p = proc_path(n.raw());
            Self::xattr_get(|buf, len| unsafe { libc::listxattr(p.as_ptr(), buf.cast(), len) })
        });
        Self::xattr_reply(r, size, reply);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.rt(Op::Removexattr, || {
            let (n, c) = (self.inode(ino)?, cstr(name)?);
            if is_symlink(&n) {
                return Err(Errno::NO_XATTR);
            }
            let p = proc_path(n.raw());
            cvt(unsafe { libc::removexattr(p.as_ptr(), c.as_ptr()) }).map(drop)
        });
        reply_empty(r, reply);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let r = self.rt(Op::Access, || {
            let n = self.inode(ino)?;
            let p = proc_path(n.raw());
            cvt(unsafe { libc::faccessat(libc::AT_FDCWD, p.as_ptr(), mask.bits(), 0) }).map(drop)
        });
        reply_empty(r, reply);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.rt(Op::Create, || {
            let (p, c) = (self.inode(parent)?, cstr(name)?);
            let fl = (flags & !libc::O_NOCTTY) | libc::O_CLOEXEC | libc::O_NOFOLLOW;
            // Create exclusively first so we only chown a file we really made.
            let mut fd = unsafe {
                libc::openat(p.raw(), c.as_ptr(), fl | libc::O_CREAT | libc::O_EXCL, mode)
            };
            let created = fd >= 0;
            if !created && flags & libc::O_EXCL == 0 && last_err() == Errno::EEXIST {
                fd = unsafe { libc::openat(p.raw(), c.as_ptr(), fl & !libc::O_CREAT) };
            }
            let f = unsafe { File::from_raw_fd(cvt(fd)?) };
            if created {
                self.chown_new(&p, &c, Some(f.as_raw_fd()), req);
                if self.chown && mode & 0o6000 != 0 {
                    unsafe { libc::fchmod(f.as_raw_fd(), mode & 0o7777) };
                }
            }
            let attr = self.do_lookup(&p, &c)?;
            Ok((attr, self.add_file(f)))
        });
        match r {
            Ok((a, fh)) => reply.created(&self.ttl, &a, GEN, FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = self.rt(Op::Fallocate, || {
            let f = self.file(fh)?;
            let off = libc::off_t::try_from(offset).map_err(|_| Errno::EFBIG)?;
            let len = libc::off_t::try_from(length).map_err(|_| Errno::EFBIG)?;
            cvt(unsafe { libc::fallocate(f.as_raw_fd(), mode, off, len) }).map(drop)
        });
        reply_empty(r, reply);
    }
}
