//! The FUSE adapter: each callback makes one call into [`Core`] and turns
//! its value or error into the reply. Nothing else lives here.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::backend::{Attr, Backend, Creds, FileKind, RenameFlags, SetAttr, SetTime};
use crate::error::FsError;
use crate::fs::{Core, Entry, Opened};
use crate::killpriv::Modifier;
use crate::stats::Stats;

/// The fuser filesystem over a core.
pub struct FuseFs<B: Backend> {
    core: Arc<Core<B>>,
    max_write: u32,
}

impl<B: Backend> FuseFs<B> {
    pub fn new(core: Arc<Core<B>>, max_write: u32) -> Self {
        FuseFs { core, max_write }
    }

    /// Counts the request and logs it with its latency at debug level.
    fn op<T>(&self, name: &str, ino: u64, req: &Request, f: impl FnOnce() -> T) -> T {
        Stats::inc(&self.core.stats().fuse_ops);
        let start = Instant::now();
        let r = f();
        log::debug!(
            "{name} ino={ino} pid={} took {:?}",
            req.pid(),
            start.elapsed()
        );
        r
    }
}

/// The reply's errno; an EIO is logged with its cause, which the
/// application cannot see.
fn errno(e: &FsError) -> Errno {
    let n = e.errno();
    if n == libc::EIO {
        log::warn!("{e}");
    }
    Errno::from_i32(n)
}

fn kind(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: UNIX_EPOCH,
        kind: kind(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: a.blksize,
        flags: 0,
    }
}

fn reply_entry(reply: ReplyEntry, r: Result<Entry, FsError>, negative_ttl: Duration) {
    match r {
        Ok(e) => reply.entry_with_ttls(
            &e.attr_ttl,
            &e.entry_ttl,
            &file_attr(&e.attr),
            Generation(0),
        ),
        Err(e) if e.errno() == libc::ENOENT && !negative_ttl.is_zero() => {
            // Inode 0 with a lifetime: the kernel caches the absence.
            let mut attr = file_attr(&negative_placeholder());
            attr.ino = INodeNo(0);
            reply.entry_with_ttls(&Duration::ZERO, &negative_ttl, &attr, Generation(0));
        }
        Err(e) => reply.error(errno(&e)),
    }
}

fn negative_placeholder() -> Attr {
    Attr {
        ino: 0,
        kind: FileKind::File,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        size: 0,
        blocks: 0,
        blksize: 4096,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
    }
}

fn reply_empty(reply: ReplyEmpty, r: Result<(), FsError>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

fn open_flags(o: &Opened) -> FopenFlags {
    if o.keep_cache {
        FopenFlags::FOPEN_KEEP_CACHE
    } else {
        FopenFlags::empty()
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(t),
    })
}

fn creds(req: &Request, umask: u32) -> Creds {
    Creds {
        uid: req.uid(),
        gid: req.gid(),
        umask,
    }
}

/// The caller as the one changing a file's data; `privileged` as in
/// [`Modifier`].
fn modifier(req: &Request, privileged: Option<bool>) -> Modifier {
    Modifier {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
        privileged,
    }
}

fn reply_xattr(reply: ReplyXattr, size: u32, r: Result<Vec<u8>, FsError>) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::from_i32(libc::ERANGE)),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(&e)),
    }
}

impl<B: Backend> Filesystem for FuseFs<B> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Not FUSE_AUTO_INVAL_DATA: with it the kernel drops a file's whole
        // page cache whenever the mtime it is shown moves, which this
        // mount's own writes do. A page fully written by one thread is
        // unlocked while its WRITE is on its way here; dropped then, and
        // read again by another thread before the write arrives, it holds
        // the bytes from before the write, and the write's mtime (often
        // the same coarse-clock tick) drops it no more: the writer reads
        // its old bytes back. A change on the NAS (seen when the data
        // cache drops its version) drops the page cache explicitly
        // instead (DataCache::on_stale, see mount.rs); and as reads through
        // a descriptor kept open no longer make the kernel ask for
        // attributes, the daemon asks for those of open files itself as
        // they expire (Core::revalidate_open).
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            // The kernel enforces POSIX ACLs (stored on the NAS as xattrs),
            // and leaves the umask to nassync, which must not apply it
            // under a directory with a default ACL.
            | InitFlags::FUSE_POSIX_ACL
            | InitFlags::FUSE_DONT_MASK
            // nassync clears set-user-ID and set-group-ID bits on write,
            // truncate, fallocate and chown (crate::killpriv): the kernel's
            // own fallback misses a set-group-ID case of the local rules.
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        let supported = config.capabilities() & wanted;
        let _ = config.add_capabilities(supported);
        let _ = config.set_max_write(self.max_write);
        let _ = config
            .set_max_readahead(u32::MAX)
            .or_else(|max| config.set_max_readahead(max));
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self.op("lookup", parent.0, req, || self.core.lookup(parent.0, name));
        reply_entry(reply, r, self.core.config().negative_timeout);
    }

    fn forget(&self, req: &Request, ino: INodeNo, nlookup: u64) {
        self.op("forget", ino.0, req, || self.core.forget(ino.0, nlookup));
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.op("getattr", ino.0, req, || {
            self.core.getattr(ino.0, fh.map(|f| f.0))
        }) {
            Ok((a, ttl)) => reply.attr(&ttl, &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
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
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let changes = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
        };
        // Whether the caller has CAP_FSETID is not said here (fuser does
        // not pass FATTR_KILL_SUIDGID on): nassync asks /proc if it matters.
        let who = modifier(req, None);
        match self.op("setattr", ino.0, req, || {
            self.core
                .setattr(ino.0, fh.map(|f| f.0), &changes, Some(&who))
        }) {
            Ok((a, ttl)) => reply.attr(&ttl, &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.op("readlink", ino.0, req, || self.core.readlink(ino.0)) {
            Ok(t) => reply.data(std::os::unix::ffi::OsStrExt::as_bytes(t.as_os_str())),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = self.op("mknod", parent.0, req, || {
            self.core
                .mknod(parent.0, name, mode, rdev as u64, creds(req, umask))
        });
        reply_entry(reply, r, Duration::ZERO);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.op("mkdir", parent.0, req, || {
            self.core.mkdir(parent.0, name, mode, creds(req, umask))
        });
        reply_entry(reply, r, Duration::ZERO);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.op("unlink", parent.0, req, || self.core.unlink(parent.0, name));
        reply_empty(reply, r);
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.op("rmdir", parent.0, req, || self.core.rmdir(parent.0, name));
        reply_empty(reply, r);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.op("symlink", parent.0, req, || {
            self.core
                .symlink(parent.0, link_name, target.as_os_str(), creds(req, 0))
        });
        reply_entry(reply, r, Duration::ZERO);
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.op("rename", parent.0, req, || {
            if flags.contains(fuser::RenameFlags::RENAME_WHITEOUT) {
                return Err(FsError::Invalid("RENAME_WHITEOUT"));
            }
            let f = RenameFlags {
                noreplace: flags.contains(fuser::RenameFlags::RENAME_NOREPLACE),
                exchange: flags.contains(fuser::RenameFlags::RENAME_EXCHANGE),
                vouched_free: false,
            };
            self.core.rename(parent.0, name, newparent.0, newname, f)
        });
        reply_empty(reply, r);
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = self.op("link", ino.0, req, || {
            self.core.link(ino.0, newparent.0, newname)
        });
        reply_entry(reply, r, Duration::ZERO);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.op("open", ino.0, req, || self.core.open(ino.0, flags.0)) {
            Ok(o) => reply.opened(FileHandle(o.fh), open_flags(&o)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.op("read", ino.0, req, || self.core.read(fh.0, offset, size)) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // Set by the kernel when the caller lacks CAP_FSETID.
        let who = write_flags
            .contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID)
            .then(|| modifier(req, Some(false)));
        match self.op("write", ino.0, req, || {
            self.core.write(fh.0, offset, data, who.as_ref())
        }) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let r = self.op("flush", ino.0, req, || self.core.flush(fh.0));
        reply_empty(reply, r);
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.op("release", ino.0, req, || self.core.release(fh.0));
        reply_empty(reply, r);
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.op("fsync", ino.0, req, || self.core.fsync(fh.0, datasync));
        reply_empty(reply, r);
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.op("opendir", ino.0, req, || self.core.opendir(ino.0)) {
            Ok(o) => {
                // The kernel keeps what readdir returned, and uses it
                // again only while the core says it is current.
                let mut flags = FopenFlags::FOPEN_CACHE_DIR;
                if o.keep_cache {
                    flags |= FopenFlags::FOPEN_KEEP_CACHE;
                }
                reply.opened(FileHandle(o.fh), flags)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.op("readdir", ino.0, req, || {
            self.core.readdir(fh.0, offset, false, &mut |d| {
                reply.add(INodeNo(d.ino), d.next, kind(d.kind), d.name)
            })
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let r = self.op("readdirplus", ino.0, req, || {
            self.core
                .readdir(fh.0, offset, true, &mut |d| match d.entry {
                    Some(e) => reply.add(
                        INodeNo(d.ino),
                        d.next,
                        d.name,
                        &e.attr_ttl,
                        &file_attr(&e.attr),
                        Generation(0),
                    ),
                    None => true,
                })
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn releasedir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.op("releasedir", ino.0, req, || self.core.releasedir(fh.0));
        reply_empty(reply, r);
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.op("fsyncdir", ino.0, req, || self.core.fsyncdir(ino.0));
        reply_empty(reply, r);
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        match self.op("statfs", ino.0, req, || self.core.statfs(ino.0)) {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let r = self.op("setxattr", ino.0, req, || {
            self.core.setxattr(ino.0, name, value, flags)
        });
        reply_empty(reply, r);
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let r = self.op("getxattr", ino.0, req, || self.core.getxattr(ino.0, name));
        reply_xattr(reply, size, r);
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let r = self.op("listxattr", ino.0, req, || self.core.listxattr(ino.0));
        reply_xattr(reply, size, r);
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.op("removexattr", ino.0, req, || {
            self.core.removexattr(ino.0, name)
        });
        reply_empty(reply, r);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks access itself.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.op("create", parent.0, req, || {
            self.core
                .create(parent.0, name, mode, flags, creds(req, umask))
        }) {
            Ok((e, o)) => reply.created(
                &e.entry_ttl,
                &file_attr(&e.attr),
                Generation(0),
                FileHandle(o.fh),
                open_flags(&o),
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = self.op("fallocate", ino.0, req, || {
            // No flag from the kernel here: nassync asks /proc.
            self.core
                .fallocate(fh.0, offset, length, mode, &modifier(req, None))
        });
        reply_empty(reply, r);
    }
}
