//! The NAS, behind a trait.
//!
//! Everything nassync does to the NAS goes through [`Backend`]; no other
//! module may touch the source path. The trait is handle based so that it
//! fits both a directory (a kernel NFS mount: nodes are `O_PATH` descriptors)
//! and a user-space NFSv3 client (nodes are NFS file handles): a node is an
//! opaque, cheaply cloned reference to one object on the NAS, valid across
//! renames, and a file is an object opened for I/O.
//!
//! Calls may be slow (the NAS is across a network) and are made without any
//! nassync lock held. Errors are [`BackendError`]: the errno the NAS gave
//! plus what was being done, so that the meaning survives to the FUSE reply.

pub mod bounded;
pub mod dir;
pub mod instrumented;
pub mod nfs;
pub mod overlay;

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::time::SystemTime;

/// What kind of object a node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl FileKind {
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => FileKind::File,
            libc::S_IFDIR => FileKind::Dir,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDev,
            libc::S_IFBLK => FileKind::BlockDev,
            _ => return None,
        })
    }

    pub fn from_dirent_type(t: u8) -> Option<FileKind> {
        Some(match t {
            libc::DT_REG => FileKind::File,
            libc::DT_DIR => FileKind::Dir,
            libc::DT_LNK => FileKind::Symlink,
            libc::DT_FIFO => FileKind::Fifo,
            libc::DT_SOCK => FileKind::Socket,
            libc::DT_CHR => FileKind::CharDev,
            libc::DT_BLK => FileKind::BlockDev,
            _ => return None,
        })
    }
}

/// Attributes of a NAS object, as the NAS reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    /// The NAS's identity of the object (st_ino, NFS fileid). Stable as long
    /// as the object exists, so nassync uses it as the inode number.
    pub ino: u64,
    pub kind: FileKind,
    /// Permission bits including setuid, setgid and sticky (mode & 0o7777).
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    pub blksize: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

impl Attr {
    /// What identifies one version of the content: if any of these changed,
    /// cached data is not the NAS's data any more (NFS close-to-open checks
    /// the same change attributes).
    pub fn validator(&self) -> Validator {
        Validator {
            ino: self.ino,
            size: self.size,
            mtime: self.mtime,
            ctime: self.ctime,
        }
    }
}

/// The change attributes of one version of a file's content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validator {
    pub ino: u64,
    pub size: u64,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

/// One entry of a directory listing.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub name: OsString,
    pub ino: u64,
    pub kind: FileKind,
}

/// The caller on whose behalf an object is created: it will own it.
#[derive(Clone, Copy, Debug)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    /// The caller's umask, applied by the core unless the directory has a
    /// default POSIX ACL (which then decides, as on a local filesystem).
    pub umask: u32,
}

/// A time to set: a given instant or the NAS's "now".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    Now,
    At(SystemTime),
}

/// The changes of a setattr; `None` leaves a field as it is.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// Capacity of the NAS filesystem.
#[derive(Clone, Copy, Debug, Default)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// Flags of rename(2) that the NAS must honour.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenameFlags {
    pub noreplace: bool,
    pub exchange: bool,
    /// Not rename(2)'s: while the NAS does not answer, the caller's cache
    /// vouches that the new name is free (or removed here), so a backend
    /// that keeps a local view may move a new object there without asking
    /// the NAS.
    pub vouched_free: bool,
}

/// How a file is opened on the NAS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenMode {
    pub read: bool,
    pub write: bool,
    pub append: bool,
    pub truncate: bool,
}

/// An error from the NAS: the errno it gave and the operation it failed.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {source}")]
pub struct BackendError {
    pub op: &'static str,
    #[source]
    pub source: std::io::Error,
}

impl BackendError {
    pub fn new(op: &'static str, source: std::io::Error) -> Self {
        BackendError { op, source }
    }
    pub fn errno(op: &'static str, errno: i32) -> Self {
        BackendError::new(op, std::io::Error::from_raw_os_error(errno))
    }
    /// An errno with a message of the backend's own (what the NFS
    /// server said, say), which `raw_errno` still finds.
    pub fn coded(op: &'static str, errno: i32, message: impl Into<String>) -> Self {
        let kind = std::io::Error::from_raw_os_error(errno).kind();
        BackendError::new(op, std::io::Error::new(kind, Coded(errno, message.into())))
    }
    /// The POSIX errno, or EIO when the cause has none.
    pub fn raw_errno(&self) -> i32 {
        errno_of(&self.source)
    }
}

/// The errno of an I/O error, also of one made by [`BackendError::coded`].
pub fn errno_of(e: &std::io::Error) -> i32 {
    if let Some(c) = e.get_ref().and_then(|s| s.downcast_ref::<Coded>()) {
        return c.0;
    }
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// A listxattr answer (NUL-terminated names) with `name` in it (last) or
/// not, as after a setxattr (`present`) or removexattr of it.
pub fn xattr_list_with(list: &[u8], name: &OsStr, present: bool) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let name = name.as_bytes();
    let mut out = Vec::with_capacity(list.len() + name.len() + 1);
    for n in list
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty() && *n != name)
    {
        out.extend_from_slice(n);
        out.push(0);
    }
    if present {
        out.extend_from_slice(name);
        out.push(0);
    }
    out
}

/// An errno and a message.
#[derive(Debug, Clone)]
pub struct Coded(pub i32, pub String);

impl fmt::Display for Coded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plain = std::io::Error::from_raw_os_error(self.0);
        write!(f, "{} ({plain})", self.1)
    }
}

impl std::error::Error for Coded {}

pub type BResult<T> = Result<T, BackendError>;

/// A NAS share. See the module documentation.
pub trait Backend: Send + Sync + 'static {
    /// A reference to one object on the NAS, valid across renames.
    type Node: Clone + Send + Sync + fmt::Debug + 'static;
    /// An object opened for I/O.
    type File: Send + Sync + 'static;

    /// The root of the share.
    fn root(&self) -> BResult<(Self::Node, Attr)>;
    fn lookup(&self, dir: &Self::Node, name: &OsStr) -> BResult<(Self::Node, Attr)>;
    /// Looks up several names of `dir` (a listing's entries) in one call,
    /// so that a backend can batch them (NFS's READDIRPLUS) and a wrapper
    /// pays its per-call cost once. One answer per name, in order.
    fn lookup_many(
        &self,
        dir: &Self::Node,
        names: &[OsString],
    ) -> Vec<BResult<(Self::Node, Attr)>> {
        names.iter().map(|n| self.lookup(dir, n)).collect()
    }
    fn getattr(&self, node: &Self::Node) -> BResult<Attr>;
    /// Applies `changes`; `file`, when given, is an open file of `node`
    /// (a truncate through it works where the path would be refused).
    fn setattr(
        &self,
        node: &Self::Node,
        file: Option<&Self::File>,
        changes: &SetAttr,
    ) -> BResult<Attr>;
    fn readlink(&self, node: &Self::Node) -> BResult<OsString>;
    /// The whole listing of a directory, without "." and "..", in one batch.
    fn readdir(&self, dir: &Self::Node) -> BResult<Vec<DirEntry>>;

    fn mknod(
        &self,
        dir: &Self::Node,
        name: &OsStr,
        mode: u32,
        rdev: u64,
        creds: Creds,
    ) -> BResult<(Self::Node, Attr)>;
    fn mkdir(
        &self,
        dir: &Self::Node,
        name: &OsStr,
        mode: u32,
        creds: Creds,
    ) -> BResult<(Self::Node, Attr)>;
    fn symlink(
        &self,
        dir: &Self::Node,
        name: &OsStr,
        target: &OsStr,
        creds: Creds,
    ) -> BResult<(Self::Node, Attr)>;
    fn link(&self, node: &Self::Node, dir: &Self::Node, name: &OsStr) -> BResult<Attr>;
    fn unlink(&self, dir: &Self::Node, name: &OsStr) -> BResult<()>;
    fn rmdir(&self, dir: &Self::Node, name: &OsStr) -> BResult<()>;
    fn rename(
        &self,
        dir: &Self::Node,
        name: &OsStr,
        newdir: &Self::Node,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> BResult<()>;

    fn open(&self, node: &Self::Node, mode: OpenMode) -> BResult<Self::File>;
    /// Creates and opens a regular file; `exclusive` fails with EEXIST if
    /// the name exists.
    #[allow(clippy::too_many_arguments)]
    fn create(
        &self,
        dir: &Self::Node,
        name: &OsStr,
        mode: u32,
        open: OpenMode,
        exclusive: bool,
        creds: Creds,
    ) -> BResult<(Self::Node, Attr, Self::File)>;
    /// Reads up to `buf.len()` bytes at `offset`; fewer only at end of file.
    fn read(&self, file: &Self::File, offset: u64, buf: &mut [u8]) -> BResult<usize>;
    /// Writes all of `data` at `offset` (at the end for an append file).
    fn write(&self, file: &Self::File, offset: u64, data: &[u8]) -> BResult<usize>;
    fn fsync(&self, file: &Self::File, datasync: bool) -> BResult<()>;
    fn fallocate(&self, file: &Self::File, mode: i32, offset: u64, len: u64) -> BResult<()>;
    /// Attributes through an open file (works after the name is gone).
    fn fgetattr(&self, file: &Self::File) -> BResult<Attr>;
    fn fsyncdir(&self, dir: &Self::Node) -> BResult<()>;
    fn statfs(&self, node: &Self::Node) -> BResult<StatFs>;

    fn getxattr(&self, node: &Self::Node, name: &OsStr) -> BResult<Vec<u8>>;
    fn listxattr(&self, node: &Self::Node) -> BResult<Vec<u8>>;
    fn setxattr(&self, node: &Self::Node, name: &OsStr, value: &[u8], flags: i32) -> BResult<()>;
    fn removexattr(&self, node: &Self::Node, name: &OsStr) -> BResult<()>;

    /// The largest size a file can have on the share, as far as the
    /// backend knows (the largest `off_t` when it does not). Write-back
    /// refuses a size beyond it at once, as the NAS itself would.
    fn max_file_size(&self) -> u64 {
        i64::MAX as u64
    }

    /// Whether listxattr of `node` names every POSIX ACL
    /// (system.posix_acl_access, system.posix_acl_default) that getxattr
    /// finds: true of local filesystems and of Linux's NFS client, not of
    /// cifs, which serves ACLs it does not list. Then one listxattr answers
    /// `ls -l`'s question about each file's ACL. Answered without I/O.
    fn lists_acls(&self, _node: &Self::Node) -> bool {
        false
    }

    /// Whether the NAS can keep extended attributes at all (not NFSv3,
    /// whose getxattr finds none and setxattr is EOPNOTSUPP). Answered
    /// without I/O.
    fn keeps_xattrs(&self) -> bool {
        true
    }

    /// Whether directories `a` and `b` are on the same filesystem of the
    /// NAS, as the backend knows without asking it: a rename or link
    /// between them cannot fail with EXDEV (a snapshot directory, a
    /// filesystem mounted inside the share). False where it cannot tell.
    fn same_fs(&self, _a: &Self::Node, _b: &Self::Node) -> bool {
        false
    }

    /// Whether the NAS is answering, as far as the backend knows; while it
    /// is not, calls fail at once ([`bounded::is_unreachable`]) and
    /// write-back waits.
    fn online(&self) -> bool {
        true
    }

    /// Whether a call the cache answered for is still unanswered (see
    /// [`bounded::cache_can_answer`]): write-back then starts nothing new,
    /// whose calls would wait `timeo` holding what readers need.
    fn held_up(&self) -> bool {
        false
    }

    /// Since when the NAS has not been answering, if it is not.
    fn offline_since(&self) -> Option<std::time::SystemTime> {
        None
    }

    /// Calls that change the NAS, abandoned after `timeo` and not finished
    /// yet: write-back waits for them (they could still land).
    fn unfinished_changes(&self) -> usize {
        0
    }

    /// Makes the namespace changes kept locally so far (objects created
    /// but not on the NAS yet, see [`overlay`]) survive a crash: fsync and
    /// fsyncdir call it. Nothing to do for a backend that keeps none.
    fn sync_namespace(&self, _node: &Self::Node) -> BResult<()> {
        Ok(())
    }

    /// The path from the share's root of an object known only here (a
    /// new object, by its inode number), which write-back trusts over the
    /// path its row recorded. None for objects on the NAS.
    fn local_path(&self, _ino: u64) -> Option<OsString> {
        None
    }

    /// The path from the share's root of an object on the NAS renamed here
    /// (by its inode number), while that rename is still to make there:
    /// the path shown, which write-back trusts over the path its row
    /// recorded (the rename may have moved since, see
    /// `Overlay::finish`). None for the others.
    fn pending_path(&self, _ino: u64) -> Option<OsString> {
        None
    }

    /// The kernel and the core no longer hold `node`: what a backend keeps
    /// for it alone may go.
    fn forget(&self, _node: &Self::Node) {}

    /// Whether removals of what the cache vouches for may be kept for
    /// later while the NAS answers (see [`Backend::remove_later`]): not
    /// for a backend without a local view of the namespace.
    fn defers_removals(&self) -> bool {
        false
    }

    /// How many removals, renames, links and attribute changes of NAS
    /// objects are kept here, waiting for the NAS.
    fn changes_kept(&self) -> usize {
        0
    }

    /// The objects (by inode number here) with attribute or xattr
    /// changes kept for later, not made on the NAS yet.
    fn attrs_pending(&self) -> std::collections::HashSet<u64> {
        std::collections::HashSet::new()
    }

    /// Removes `name` (`node`, of `kind`, the NAS version `was`: its inode
    /// number is the node's) from `dir` here at once, `dir` changed `at`,
    /// and from the NAS later, in order with the other changes kept (see
    /// [`overlay`]): while the NAS does not answer, or for what the
    /// caller's cache vouches for. EIO for a backend that keeps no local
    /// view of the namespace.
    fn remove_later(
        &self,
        _dir: &Self::Node,
        _name: &OsStr,
        (_node, _kind, _was): (&Self::Node, FileKind, Validator),
        _at: std::time::SystemTime,
    ) -> BResult<()> {
        Err(BackendError::errno("remove", libc::EIO))
    }

    /// While the NAS does not answer: renames `name` in `dir` (`obj`: its
    /// node, kind and NAS version) to `newname` in `newdir` here at once,
    /// and on the NAS once it answers, in order with the removals (see
    /// [`overlay`]); with `link`, makes `newname` a further name of it
    /// instead. The caller vouches that the new name is free, or holds
    /// `over` (a NAS object, as for [`Backend::remove_later`]), removed
    /// with the rename. EIO for a backend that keeps no local view of the
    /// namespace. `at`: the time the directories changed.
    fn move_later(
        &self,
        _from: (&Self::Node, &OsStr),
        _to: (&Self::Node, &OsStr),
        _obj: (&Self::Node, FileKind, Validator),
        _over: Option<(&Self::Node, FileKind, Validator)>,
        _link: bool,
        _at: SystemTime,
    ) -> BResult<()> {
        Err(BackendError::errno("rename", libc::EIO))
    }

    /// While the NAS does not answer: sets the mode, owner or times in
    /// `changes` (no size, no `SetTime::Now`) of `node` (of `kind`, the
    /// NAS version `was`, known as `name` in `dir`) here at once and on the
    /// NAS once it answers, in order with the removals and renames; the
    /// attributes as they are then. EIO for a backend that keeps no local
    /// view of the namespace.
    fn set_later(
        &self,
        _at: (&Self::Node, &OsStr),
        _node: &Self::Node,
        _kind: FileKind,
        _was: Validator,
        _changes: &SetAttr,
    ) -> BResult<()> {
        Err(BackendError::errno("setattr", libc::EIO))
    }

    /// While the NAS does not answer: sets extended attribute `name` of
    /// `node` to `value` (None: removes it), as [`Backend::set_later`].
    /// Only attributes the NAS keeps as they are (`user.*`, where it
    /// keeps those); the caller has checked any XATTR_CREATE or
    /// XATTR_REPLACE. EIO for others, and for a backend that keeps no
    /// local view of the namespace.
    fn xattr_later(
        &self,
        _at: (&Self::Node, &OsStr),
        _node: &Self::Node,
        _kind: FileKind,
        _was: Validator,
        _xattr: (&OsStr, Option<&[u8]>),
    ) -> BResult<()> {
        Err(BackendError::errno("setxattr", libc::EIO))
    }

    /// Takes back the last [`Backend::remove_later`] of `name` in `dir`
    /// (the operation it was part of failed).
    fn undo_remove_later(&self, _dir: &Self::Node, _name: &OsStr) {}
}
