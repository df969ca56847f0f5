//! The filesystem core: inodes, open handles and the metadata cache over a
//! [`Backend`], with the data path in [`crate::data`]. It returns plain
//! values and [`FsError`]s and never sees a FUSE reply, so tests drive it
//! directly.
//!
//! Inode numbers are the NAS's own (st_ino, NFS fileid), so they stay the
//! same across remounts; the NAS root and inode 1 swap places, since FUSE
//! calls the root 1.
//!
//! Metadata cache: attributes for `attr_timeout`, names (from lookups and
//! directory listings) for `entry_timeout`, absent names for
//! `negative_timeout`. Changes made through the mount update it at once;
//! changes made on the NAS are seen when these expire, and at open, which
//! always asks the NAS (close-to-open, as NFS).
//!
//! Lock order: `tables`, then `handles`; neither is held across a NAS call,
//! so one slow NAS call stalls only the request that made it.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::backend::{
    Attr, Backend, BackendError, Creds, FileKind, OpenMode, RenameFlags, SetAttr, StatFs,
};
use crate::data::{DataCache, FetchFn, FileData};
use crate::error::{FsError, FsResult};
use crate::killpriv::{self, Change, Modifier};
use crate::stats::Stats;

/// The FUSE root inode number.
pub const ROOT: u64 = 1;

/// Cache lifetimes of the core.
#[derive(Clone, Debug)]
pub struct FsConfig {
    pub attr_timeout: Duration,
    pub entry_timeout: Duration,
    pub negative_timeout: Duration,
    /// Bytes to prefetch ahead of a sequential reader.
    pub readahead: u64,
    /// Owner, group and permission mask shown for every file instead of
    /// the NAS's (`uid=`, `gid=`, `umask=`, for a NAS whose numeric ids do
    /// not match this machine's). The NAS's own values are not changed.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub umask: Option<u32>,
}

/// A name resolved to an inode, with how long the kernel may keep it.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Attributes, with `ino` already the FUSE inode number.
    pub attr: Attr,
    pub attr_ttl: Duration,
    pub entry_ttl: Duration,
}

/// An open file or directory.
#[derive(Clone, Copy, Debug)]
pub struct Opened {
    pub fh: u64,
    /// The kernel's page cache of the file is still the NAS's content.
    pub keep_cache: bool,
}

/// One entry handed to a readdir consumer.
#[derive(Debug)]
pub struct DirOut<'a> {
    pub ino: u64,
    /// The offset of the next entry.
    pub next: u64,
    pub kind: FileKind,
    pub name: &'a OsStr,
    /// For readdirplus: the entry, looked up.
    pub entry: Option<&'a Entry>,
}

struct Inode<B: Backend> {
    node: B::Node,
    kind: FileKind,
    /// The kernel's lookup count; the inode is dropped when it reaches 0.
    lookups: u64,
    attr: Attr,
    attr_until: Instant,
    entry_until: Instant,
    /// Whether this directory has a default POSIX ACL, once asked.
    default_acl: Option<bool>,
    /// The last known name, to keep `names` in step.
    parent: u64,
    name: OsString,
    data: Arc<FileData>,
}

struct Listing {
    names: HashMap<OsString, u64>,
    until: Instant,
}

struct Tables<B: Backend> {
    inodes: HashMap<u64, Inode<B>>,
    /// (parent, name) -> inode, for inodes the kernel holds.
    names: HashMap<(u64, OsString), u64>,
    /// Complete listings of directories, name -> FUSE inode.
    listings: HashMap<u64, Listing>,
    negatives: HashMap<(u64, OsString), Instant>,
}

struct FileHandle<B: Backend> {
    ino: u64,
    file: Arc<B::File>,
    data: Arc<FileData>,
    fetch: FetchFn,
    append: bool,
    /// Where the last read ended, to spot sequential readers.
    last_end: AtomicU64,
}

struct DirItem<B: Backend> {
    name: OsString,
    ino: u64,
    kind: FileKind,
    plus: Option<(B::Node, Attr)>,
}

struct DirHandle<B: Backend> {
    ino: u64,
    /// The listing as read at offset 0; offsets index into it, so they stay
    /// valid while the directory changes.
    items: Option<Vec<DirItem<B>>>,
}

enum Handle<B: Backend> {
    File(Arc<FileHandle<B>>),
    Dir(Arc<Mutex<DirHandle<B>>>),
}

/// See the module documentation.
pub struct Core<B: Backend> {
    backend: Arc<B>,
    cfg: FsConfig,
    root_nas_ino: u64,
    tables: Mutex<Tables<B>>,
    handles: Mutex<HashMap<u64, Handle<B>>>,
    next_fh: AtomicU64,
    data: Arc<DataCache>,
    stats: Arc<Stats>,
}

fn open_mode(flags: i32) -> OpenMode {
    let acc = flags & libc::O_ACCMODE;
    OpenMode {
        read: acc == libc::O_RDONLY || acc == libc::O_RDWR,
        // Read too, so that the cache can fill blocks around a write later.
        write: acc == libc::O_WRONLY || acc == libc::O_RDWR,
        append: flags & libc::O_APPEND != 0,
        truncate: false,
    }
}

impl<B: Backend> Core<B> {
    pub fn new(
        backend: Arc<B>,
        cfg: FsConfig,
        data: Arc<DataCache>,
        stats: Arc<Stats>,
    ) -> FsResult<Core<B>> {
        let (node, attr) = backend.root()?;
        let root_nas_ino = attr.ino;
        let now = Instant::now();
        let mut inodes = HashMap::new();
        inodes.insert(
            ROOT,
            Inode {
                node,
                kind: FileKind::Dir,
                lookups: 1,
                attr,
                attr_until: now,
                entry_until: now,
                default_acl: None,
                parent: ROOT,
                name: OsString::new(),
                data: Arc::new(FileData::default()),
            },
        );
        Ok(Core {
            backend,
            cfg,
            root_nas_ino,
            tables: Mutex::new(Tables {
                inodes,
                names: HashMap::new(),
                listings: HashMap::new(),
                negatives: HashMap::new(),
            }),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            data,
            stats,
        })
    }

    pub fn config(&self) -> &FsConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    pub fn data_cache(&self) -> &Arc<DataCache> {
        &self.data
    }

    fn tables(&self) -> MutexGuard<'_, Tables<B>> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handles(&self) -> MutexGuard<'_, HashMap<u64, Handle<B>>> {
        self.handles.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// NAS inode number -> FUSE inode number (and back: it is an involution).
    fn fuse_ino(&self, nas: u64) -> u64 {
        if nas == self.root_nas_ino {
            ROOT
        } else if nas == ROOT {
            self.root_nas_ino
        } else {
            nas
        }
    }

    /// Attributes as the kernel is shown them: the FUSE inode number, and
    /// the owner overrides of the mount.
    fn present(&self, mut attr: Attr) -> Attr {
        attr.ino = self.fuse_ino(attr.ino);
        if let Some(uid) = self.cfg.uid {
            attr.uid = uid;
        }
        if let Some(gid) = self.cfg.gid {
            attr.gid = gid;
        }
        if let Some(mask) = self.cfg.umask {
            attr.perm &= !(mask as u16 & 0o777);
        }
        attr
    }

    fn entry(&self, attr: Attr) -> Entry {
        Entry {
            attr: self.present(attr),
            attr_ttl: self.cfg.attr_timeout,
            entry_ttl: self.cfg.entry_timeout,
        }
    }

    fn node(&self, ino: u64) -> FsResult<(B::Node, FileKind, Arc<FileData>)> {
        let t = self.tables();
        let i = t.inodes.get(&ino).ok_or(FsError::UnknownInode(ino))?;
        Ok((i.node.clone(), i.kind, i.data.clone()))
    }

    fn file_handle(&self, fh: u64) -> FsResult<Arc<FileHandle<B>>> {
        match self.handles().get(&fh) {
            Some(Handle::File(h)) => Ok(h.clone()),
            _ => Err(FsError::UnknownHandle(fh)),
        }
    }

    fn dir_handle(&self, fh: u64) -> FsResult<Arc<Mutex<DirHandle<B>>>> {
        match self.handles().get(&fh) {
            Some(Handle::Dir(h)) => Ok(h.clone()),
            _ => Err(FsError::UnknownHandle(fh)),
        }
    }

    fn add_handle(&self, h: Handle<B>) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles().insert(fh, h);
        fh
    }

    /// Fresh attributes of `ino` seen from the NAS: cache them, and drop
    /// cached data if the file changed.
    fn saw_attr(&self, ino: u64, attr: &Attr) -> FsResult<()> {
        let data = {
            let mut t = self.tables();
            let Some(i) = t.inodes.get_mut(&ino) else {
                return Ok(());
            };
            i.attr = *attr;
            i.attr_until = Instant::now() + self.cfg.attr_timeout;
            i.data.clone()
        };
        if attr.kind == FileKind::File {
            self.data.observe(ino, &data, &attr.validator())?;
        }
        Ok(())
    }

    /// Records that `name` in `parent` is `node`; counts a kernel lookup
    /// if `count`.
    fn remember(
        &self,
        parent: u64,
        name: &OsStr,
        node: B::Node,
        attr: Attr,
        count: bool,
    ) -> FsResult<Entry> {
        let ino = self.fuse_ino(attr.ino);
        let now = Instant::now();
        let data = {
            let mut t = self.tables();
            let t = &mut *t;
            let inode = t.inodes.entry(ino).or_insert_with(|| Inode {
                node: node.clone(),
                kind: attr.kind,
                lookups: 0,
                attr,
                attr_until: now,
                entry_until: now,
                default_acl: None,
                parent,
                name: name.to_os_string(),
                data: Arc::new(FileData::default()),
            });
            if inode.kind != attr.kind {
                // The NAS reused the number for another object.
                inode.node = node;
                inode.kind = attr.kind;
                inode.data = Arc::new(FileData::default());
            }
            inode.attr = attr;
            inode.attr_until = now + self.cfg.attr_timeout;
            inode.entry_until = now + self.cfg.entry_timeout;
            if count {
                inode.lookups += 1;
            }
            // Other links of the same inode keep their own name entries.
            inode.parent = parent;
            inode.name = name.to_os_string();
            let data = inode.data.clone();
            t.names.insert((parent, name.to_os_string()), ino);
            t.negatives.remove(&(parent, name.to_os_string()));
            if let Some(l) = t.listings.get_mut(&parent) {
                l.names.insert(name.to_os_string(), ino);
            }
            data
        };
        if attr.kind == FileKind::File {
            self.data.observe(ino, &data, &attr.validator())?;
        }
        Ok(self.entry(attr))
    }

    /// The name is gone from `parent`: forget it, and expire the attributes
    /// of the inode it named (its link count and ctime changed).
    fn forget_name(&self, t: &mut Tables<B>, parent: u64, name: &OsStr, negative: bool) {
        let key = (parent, name.to_os_string());
        if let Some(ino) = t.names.remove(&key) {
            if let Some(i) = t.inodes.get_mut(&ino) {
                i.attr_until = Instant::now();
            }
        }
        if let Some(l) = t.listings.get_mut(&parent) {
            if let Some(ino) = l.names.remove(name) {
                if let Some(i) = t.inodes.get_mut(&ino) {
                    i.attr_until = Instant::now();
                }
            }
        }
        if negative && !self.cfg.negative_timeout.is_zero() {
            t.negatives
                .insert(key, Instant::now() + self.cfg.negative_timeout);
        }
        self.expire_attr(t, parent);
    }

    fn expire_attr(&self, t: &mut Tables<B>, ino: u64) {
        if let Some(i) = t.inodes.get_mut(&ino) {
            i.attr_until = Instant::now();
        }
    }

    /// A name was added to `parent` through the mount.
    fn added_name(&self, parent: u64) {
        let mut t = self.tables();
        self.expire_attr(&mut t, parent);
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Entry> {
        if name.len() > 255 {
            return Err(BackendError::errno("lookup", libc::ENAMETOOLONG).into());
        }
        let now = Instant::now();
        let dir_node = {
            let mut t = self.tables();
            let t = &mut *t;
            let key = (parent, name.to_os_string());
            if let Some(until) = t.negatives.get(&key) {
                if *until > now {
                    Stats::inc(&self.stats.negative_hits);
                    return Err(FsError::NotFound);
                }
                t.negatives.remove(&key);
            }
            let mut known = t.names.get(&key).copied();
            if known.is_none() {
                if let Some(l) = t.listings.get(&parent) {
                    if l.until > now {
                        match l.names.get(name) {
                            Some(ino) => known = Some(*ino),
                            None if !self.cfg.negative_timeout.is_zero() => {
                                Stats::inc(&self.stats.negative_hits);
                                return Err(FsError::NotFound);
                            }
                            None => {}
                        }
                    }
                }
            }
            if let Some(ino) = known {
                if let Some(i) = t.inodes.get_mut(&ino) {
                    let fresh_name = i.entry_until > now
                        || t.listings.get(&parent).is_some_and(|l| l.until > now);
                    if fresh_name && i.attr_until > now {
                        i.lookups += 1;
                        let attr = i.attr;
                        Stats::inc(&self.stats.entry_hits);
                        return Ok(self.entry(attr));
                    }
                }
            }
            t.inodes
                .get(&parent)
                .ok_or(FsError::UnknownInode(parent))?
                .node
                .clone()
        };
        match self.backend.lookup(&dir_node, name) {
            Ok((node, attr)) => self.remember(parent, name, node, attr, true),
            Err(e) => {
                if e.raw_errno() == libc::ENOENT && !self.cfg.negative_timeout.is_zero() {
                    let mut t = self.tables();
                    t.names.remove(&(parent, name.to_os_string()));
                    if let Some(l) = t.listings.get_mut(&parent) {
                        l.names.remove(name);
                    }
                    if t.negatives.len() > 100_000 {
                        t.negatives.clear();
                    }
                    t.negatives.insert(
                        (parent, name.to_os_string()),
                        Instant::now() + self.cfg.negative_timeout,
                    );
                }
                Err(e.into())
            }
        }
    }

    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let mut t = self.tables();
        let Some(i) = t.inodes.get_mut(&ino) else {
            return;
        };
        i.lookups = i.lookups.saturating_sub(n);
        if i.lookups == 0 {
            if let Some(i) = t.inodes.remove(&ino) {
                let key = (i.parent, i.name);
                if t.names.get(&key) == Some(&ino) {
                    t.names.remove(&key);
                }
            }
        }
    }

    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> FsResult<(Attr, Duration)> {
        let node = {
            let t = self.tables();
            let i = t.inodes.get(&ino).ok_or(FsError::UnknownInode(ino))?;
            if i.attr_until > Instant::now() {
                Stats::inc(&self.stats.attr_hits);
                return Ok((self.present(i.attr), self.cfg.attr_timeout));
            }
            i.node.clone()
        };
        let file = fh.and_then(|fh| self.file_handle(fh).ok());
        let attr = match file {
            Some(h) => self.backend.fgetattr(&h.file)?,
            None => self.backend.getattr(&node)?,
        };
        self.saw_attr(ino, &attr)?;
        Ok((self.present(attr), self.cfg.attr_timeout))
    }

    /// Applies `changes` for `who` (the caller, if known), clearing the
    /// set-user-ID and set-group-ID bits by the kernel's rules
    /// ([`crate::killpriv`]) for a truncate, a chown, or a SETATTR that
    /// changes nothing, which is how the kernel asks for them to go.
    pub fn setattr(
        &self,
        ino: u64,
        fh: Option<u64>,
        changes: &SetAttr,
        who: Option<&Modifier>,
    ) -> FsResult<(Attr, Duration)> {
        let (node, kind, data) = self.node(ino)?;
        let old_size = self.cached_size(ino);
        let file = fh.and_then(|fh| self.file_handle(fh).ok());
        let file = file.as_ref().map(|h| &*h.file);
        let mut changes = *changes;
        let owner = changes.uid.is_some() || changes.gid.is_some();
        let change = if changes.mode.is_some() || kind != FileKind::File {
            None
        } else if changes.size.is_some() {
            Some(Change::Data)
        } else if owner || (changes.atime.is_none() && changes.mtime.is_none()) {
            Some(Change::Owner)
        } else {
            None
        };
        let kill = who.zip(change);
        if let (Some((who, change)), Some(cached)) = (kill, self.cached_attr(ino)) {
            // In the same call, before the size or owner changes.
            let bits = self.bits_to_clear(&cached, who, change);
            if bits != 0 {
                changes.mode = Some((cached.perm & !bits) as u32);
            }
        }
        let mut attr = self.backend.setattr(&node, file, &changes)?;
        if let Some((who, change)) = kill.filter(|_| !owner) {
            // The cached attributes may have been out of date.
            let bits = self.bits_to_clear(&attr, who, change);
            if bits != 0 {
                attr = self.kill_privs(&node, file, &attr, bits, who)?;
            }
        }
        if kind == FileKind::File {
            let v = attr.validator();
            match changes.size {
                Some(size) => self
                    .data
                    .changed(ino, &data, old_size.min(size), u64::MAX, &v)?,
                None => self.data.changed(ino, &data, 0, 0, &v)?,
            }
        }
        {
            let mut t = self.tables();
            if let Some(i) = t.inodes.get_mut(&ino) {
                i.attr = attr;
                i.attr_until = Instant::now() + self.cfg.attr_timeout;
            }
        }
        Ok((self.present(attr), self.cfg.attr_timeout))
    }

    /// The set-user-ID and set-group-ID bits that `who` making `change` to
    /// a file with attributes `attr` must clear, judged on what the kernel
    /// is shown (the owner overrides of the mount).
    fn bits_to_clear(&self, attr: &Attr, who: &Modifier, change: Change) -> u16 {
        if attr.kind != FileKind::File {
            return 0;
        }
        let shown = self.present(*attr);
        killpriv::bits_to_clear(shown.perm, shown.gid, who, change)
    }

    /// Clears `bits` of `attr`'s mode on the NAS; returns the attributes
    /// after the change.
    fn kill_privs(
        &self,
        node: &B::Node,
        file: Option<&B::File>,
        attr: &Attr,
        bits: u16,
        who: &Modifier,
    ) -> FsResult<Attr> {
        log::debug!(
            "inode {}: clearing mode bits {bits:o} for uid {} (pid {})",
            attr.ino,
            who.uid,
            who.pid
        );
        let changes = SetAttr {
            mode: Some((attr.perm & !bits) as u32),
            ..Default::default()
        };
        Ok(self.backend.setattr(node, file, &changes)?)
    }

    /// Before a write or fallocate: clears the bits that the cached
    /// attributes of `ino` say must go, and caches the result.
    fn kill_privs_before(&self, ino: u64, file: &B::File, who: &Modifier) -> FsResult<()> {
        let Some(cached) = self.cached_attr(ino) else {
            return Ok(());
        };
        let bits = self.bits_to_clear(&cached, who, Change::Data);
        if bits == 0 {
            return Ok(());
        }
        let (node, _, _) = self.node(ino)?;
        let attr = self.kill_privs(&node, Some(file), &cached, bits, who)?;
        if let Some(i) = self.tables().inodes.get_mut(&ino) {
            i.attr = attr;
        }
        Ok(())
    }

    /// After a write or fallocate: clears what the fresh attributes `after`
    /// still show (the cached ones were out of date), and returns the
    /// attributes to keep.
    fn kill_privs_after(
        &self,
        ino: u64,
        file: &B::File,
        after: Attr,
        who: &Modifier,
    ) -> FsResult<Attr> {
        let bits = self.bits_to_clear(&after, who, Change::Data);
        if bits == 0 {
            return Ok(after);
        }
        let (node, _, _) = self.node(ino)?;
        self.kill_privs(&node, Some(file), &after, bits, who)
    }

    fn cached_attr(&self, ino: u64) -> Option<Attr> {
        self.tables().inodes.get(&ino).map(|i| i.attr)
    }

    fn cached_size(&self, ino: u64) -> u64 {
        self.tables()
            .inodes
            .get(&ino)
            .map(|i| i.attr.size)
            .unwrap_or(0)
    }

    pub fn readlink(&self, ino: u64) -> FsResult<OsString> {
        let (node, _, _) = self.node(ino)?;
        Ok(self.backend.readlink(&node)?)
    }

    fn parent_node(&self, parent: u64) -> FsResult<B::Node> {
        Ok(self.node(parent)?.0)
    }

    /// The mode to create with: the caller's umask applies unless the
    /// directory has a default ACL, which the NAS then applies instead.
    fn creation_mode(&self, parent: u64, dir: &B::Node, mode: u32, creds: Creds) -> u32 {
        if creds.umask == 0 {
            return mode;
        }
        let known = self
            .tables()
            .inodes
            .get(&parent)
            .and_then(|i| i.default_acl);
        let has = known.unwrap_or_else(|| {
            let has = self
                .backend
                .getxattr(dir, OsStr::new("system.posix_acl_default"))
                .is_ok_and(|v| !v.is_empty());
            if let Some(i) = self.tables().inodes.get_mut(&parent) {
                i.default_acl = Some(has);
            }
            has
        });
        if has {
            mode
        } else {
            mode & !(creds.umask & 0o7777)
        }
    }

    pub fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u64,
        creds: Creds,
    ) -> FsResult<Entry> {
        let dir = self.parent_node(parent)?;
        let mode = self.creation_mode(parent, &dir, mode, creds);
        let (node, attr) = self.backend.mknod(&dir, name, mode, rdev, creds)?;
        self.added_name(parent);
        self.remember(parent, name, node, attr, true)
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, creds: Creds) -> FsResult<Entry> {
        let dir = self.parent_node(parent)?;
        let mode = self.creation_mode(parent, &dir, mode, creds);
        let (node, attr) = self.backend.mkdir(&dir, name, mode, creds)?;
        self.added_name(parent);
        let ino = self.fuse_ino(attr.ino);
        // A new directory is empty: its listing is known.
        self.tables().listings.insert(
            ino,
            Listing {
                names: HashMap::new(),
                until: Instant::now() + self.cfg.entry_timeout,
            },
        );
        self.remember(parent, name, node, attr, true)
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &OsStr,
        creds: Creds,
    ) -> FsResult<Entry> {
        let dir = self.parent_node(parent)?;
        let (node, attr) = self.backend.symlink(&dir, name, target, creds)?;
        self.added_name(parent);
        self.remember(parent, name, node, attr, true)
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> FsResult<Entry> {
        let (node, _, _) = self.node(ino)?;
        let dir = self.parent_node(newparent)?;
        let attr = self.backend.link(&node, &dir, newname)?;
        self.added_name(newparent);
        self.remember(newparent, newname, node, attr, true)
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let dir = self.parent_node(parent)?;
        self.backend.unlink(&dir, name)?;
        let mut t = self.tables();
        self.forget_name(&mut t, parent, name, true);
        Ok(())
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let dir = self.parent_node(parent)?;
        self.backend.rmdir(&dir, name)?;
        let mut t = self.tables();
        if let Some(ino) = t.names.get(&(parent, name.to_os_string())).copied() {
            t.listings.remove(&ino);
        }
        self.forget_name(&mut t, parent, name, true);
        Ok(())
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> FsResult<()> {
        let dir = self.parent_node(parent)?;
        let newdir = self.parent_node(newparent)?;
        self.backend.rename(&dir, name, &newdir, newname, flags)?;
        let mut t = self.tables();
        let t = &mut *t;
        let src_key = (parent, name.to_os_string());
        let dst_key = (newparent, newname.to_os_string());
        let lookup = |t: &Tables<B>, key: &(u64, OsString)| {
            t.names.get(key).copied().or_else(|| {
                t.listings
                    .get(&key.0)
                    .and_then(|l| l.names.get(&key.1).copied())
            })
        };
        let src = lookup(t, &src_key);
        let dst = lookup(t, &dst_key);
        // The replaced or exchanged inode changed (link count, ctime).
        self.forget_name(t, newparent, newname, false);
        self.forget_name(t, parent, name, !flags.exchange);
        let place = |t: &mut Tables<B>, ino: Option<u64>, key: &(u64, OsString)| {
            let Some(ino) = ino else { return };
            t.negatives.remove(key);
            t.names.insert(key.clone(), ino);
            if let Some(l) = t.listings.get_mut(&key.0) {
                l.names.insert(key.1.clone(), ino);
            }
            if let Some(i) = t.inodes.get_mut(&ino) {
                i.parent = key.0;
                i.name = key.1.clone();
                i.attr_until = Instant::now();
            }
        };
        place(t, src, &dst_key);
        if flags.exchange {
            place(t, dst, &src_key);
        }
        if src.is_none() {
            // Not known under its old name: the new name's listing entry is
            // unknown too.
            if let Some(l) = t.listings.get_mut(&newparent) {
                l.until = Instant::now();
            }
        }
        Ok(())
    }

    fn open_handle(&self, ino: u64, file: B::File, data: Arc<FileData>, append: bool) -> u64 {
        let file = Arc::new(file);
        let bs = self.data.block_size();
        let (backend, f) = (self.backend.clone(), file.clone());
        let fetch: FetchFn = Arc::new(move |idx| {
            let mut buf = vec![0u8; bs as usize];
            let n = backend.read(&f, idx * bs, &mut buf)?;
            buf.truncate(n);
            Ok(buf)
        });
        self.add_handle(Handle::File(Arc::new(FileHandle {
            ino,
            file,
            data,
            fetch,
            append,
            last_end: AtomicU64::new(0),
        })))
    }

    pub fn open(&self, ino: u64, flags: i32) -> FsResult<Opened> {
        let (node, kind, data) = self.node(ino)?;
        let mode = open_mode(flags);
        let file = self.backend.open(&node, mode)?;
        // Close-to-open: the attributes of what was just opened.
        let attr = self.backend.fgetattr(&file)?;
        {
            let mut t = self.tables();
            if let Some(i) = t.inodes.get_mut(&ino) {
                i.attr = attr;
                i.attr_until = Instant::now() + self.cfg.attr_timeout;
            }
        }
        let keep_cache = if kind == FileKind::File {
            self.data.revalidate(ino, &data, &attr.validator())?
        } else {
            false
        };
        let fh = self.open_handle(ino, file, data, mode.append);
        Ok(Opened { fh, keep_cache })
    }

    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        creds: Creds,
    ) -> FsResult<(Entry, Opened)> {
        let dir = self.parent_node(parent)?;
        let mode = self.creation_mode(parent, &dir, mode, creds);
        let omode = open_mode(flags);
        let exclusive = flags & libc::O_EXCL != 0;
        let (node, attr, file) = self
            .backend
            .create(&dir, name, mode, omode, exclusive, creds)?;
        self.added_name(parent);
        let entry = self.remember(parent, name, node, attr, true)?;
        let ino = entry.attr.ino;
        let (_, _, data) = self.node(ino)?;
        self.data.revalidate(ino, &data, &attr.validator())?;
        let fh = self.open_handle(ino, file, data, omode.append);
        Ok((
            entry,
            Opened {
                fh,
                keep_cache: false,
            },
        ))
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let h = self.file_handle(fh)?;
        let out = self.data.read(h.ino, &h.data, offset, size, &h.fetch)?;
        let end = offset + out.len() as u64;
        let prev = h.last_end.swap(end, Ordering::Relaxed);
        if self.cfg.readahead > 0 && prev == offset && !out.is_empty() {
            let bs = self.data.block_size();
            let size = self.cached_size(h.ino);
            self.data.prefetch(
                h.ino,
                &h.data,
                end / bs,
                self.cfg.readahead.div_ceil(bs),
                size,
                &h.fetch,
            );
        }
        Ok(out)
    }

    /// Writes `data` at `offset`. `who`, when the kernel asks for it
    /// (FUSE_WRITE_KILL_SUIDGID), is the unprivileged caller, for whom the
    /// set-user-ID and set-group-ID bits are cleared first.
    pub fn write(
        &self,
        fh: u64,
        offset: u64,
        data: &[u8],
        who: Option<&Modifier>,
    ) -> FsResult<u32> {
        let h = self.file_handle(fh)?;
        let old_size = self.cached_size(h.ino);
        if let Some(who) = who {
            self.kill_privs_before(h.ino, &h.file, who)?;
        }
        let n = self.backend.write(&h.file, offset, data)? as u64;
        let mut after = self.backend.fgetattr(&h.file)?;
        if let Some(who) = who {
            after = self.kill_privs_after(h.ino, &h.file, after, who)?;
        }
        let mut start = offset.min(old_size);
        let mut end = offset + n;
        if h.append {
            start = start.min(after.size.saturating_sub(n));
            end = end.max(after.size);
        }
        self.data
            .changed(h.ino, &h.data, start, end, &after.validator())?;
        let mut t = self.tables();
        if let Some(i) = t.inodes.get_mut(&h.ino) {
            i.attr = after;
            i.attr_until = Instant::now() + self.cfg.attr_timeout;
        }
        Ok(n as u32)
    }

    pub fn flush(&self, fh: u64) -> FsResult<()> {
        self.file_handle(fh).map(|_| ())
    }

    pub fn release(&self, fh: u64) -> FsResult<()> {
        match self.handles().remove(&fh) {
            Some(_) => Ok(()),
            None => Err(FsError::UnknownHandle(fh)),
        }
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> FsResult<()> {
        let h = self.file_handle(fh)?;
        Ok(self.backend.fsync(&h.file, datasync)?)
    }

    /// fallocate(2) on an open file, for `who`, who clears set-user-ID and
    /// set-group-ID bits as a write does.
    pub fn fallocate(
        &self,
        fh: u64,
        offset: u64,
        len: u64,
        mode: i32,
        who: &Modifier,
    ) -> FsResult<()> {
        let h = self.file_handle(fh)?;
        let old_size = self.cached_size(h.ino);
        self.kill_privs_before(h.ino, &h.file, who)?;
        self.backend.fallocate(&h.file, mode, offset, len)?;
        let after = self.backend.fgetattr(&h.file)?;
        let after = self.kill_privs_after(h.ino, &h.file, after, who)?;
        let end = if mode == 0 {
            offset.saturating_add(len)
        } else {
            u64::MAX
        };
        self.data.changed(
            h.ino,
            &h.data,
            offset.min(old_size),
            end,
            &after.validator(),
        )?;
        let mut t = self.tables();
        if let Some(i) = t.inodes.get_mut(&h.ino) {
            i.attr = after;
            i.attr_until = Instant::now() + self.cfg.attr_timeout;
        }
        Ok(())
    }

    pub fn opendir(&self, ino: u64) -> FsResult<Opened> {
        let (_, kind, _) = self.node(ino)?;
        if kind != FileKind::Dir {
            return Err(BackendError::errno("opendir", libc::ENOTDIR).into());
        }
        let fh = self.add_handle(Handle::Dir(Arc::new(Mutex::new(DirHandle {
            ino,
            items: None,
        }))));
        Ok(Opened {
            fh,
            keep_cache: false,
        })
    }

    fn list(&self, ino: u64, plus: bool) -> FsResult<Vec<DirItem<B>>> {
        let (node, _, _) = self.node(ino)?;
        let parent = {
            let t = self.tables();
            t.inodes.get(&ino).map(|i| i.parent).unwrap_or(ROOT)
        };
        let listing = self.backend.readdir(&node)?;
        let mut items = Vec::with_capacity(listing.len() + 2);
        items.push(DirItem {
            name: ".".into(),
            ino,
            kind: FileKind::Dir,
            plus: None,
        });
        items.push(DirItem {
            name: "..".into(),
            ino: parent,
            kind: FileKind::Dir,
            plus: None,
        });
        let mut names = HashMap::with_capacity(listing.len());
        for e in listing {
            let fino = self.fuse_ino(e.ino);
            // A name whose inode is held already reuses its node (for the
            // directory backend, its descriptor: a listing of 10,000 files
            // must not open 10,000 more).
            let held = plus
                .then(|| {
                    let t = self.tables();
                    let fino = *t.names.get(&(ino, e.name.clone()))?;
                    // Only if the name still leads to that inode.
                    (fino == self.fuse_ino(e.ino)).then_some(())?;
                    Some(t.inodes.get(&fino)?.node.clone())
                })
                .flatten();
            let plus = if let Some(held) = held {
                match self.backend.getattr(&held) {
                    Ok(attr) => Some((held, attr)),
                    Err(err) if err.raw_errno() == libc::ENOENT => continue,
                    Err(err) => return Err(err.into()),
                }
            } else if plus {
                match self.backend.lookup(&node, &e.name) {
                    Ok(found) => Some(found),
                    Err(err) if err.raw_errno() == libc::ENOENT => continue, // gone
                    Err(err) => return Err(err.into()),
                }
            } else {
                None
            };
            let (fino, kind) = match &plus {
                Some((_, a)) => (self.fuse_ino(a.ino), a.kind),
                None => (fino, e.kind),
            };
            names.insert(e.name.clone(), fino);
            items.push(DirItem {
                name: e.name,
                ino: fino,
                kind,
                plus,
            });
        }
        let mut t = self.tables();
        t.listings.insert(
            ino,
            Listing {
                names,
                until: Instant::now() + self.cfg.entry_timeout,
            },
        );
        Ok(items)
    }

    /// Hands entries from `offset` on to `add`, which returns true when it
    /// can take no more. With `plus`, each entry taken counts as a lookup.
    pub fn readdir(
        &self,
        fh: u64,
        offset: u64,
        plus: bool,
        add: &mut dyn FnMut(DirOut<'_>) -> bool,
    ) -> FsResult<()> {
        let h = self.dir_handle(fh)?;
        let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
        if offset == 0 || h.items.is_none() {
            let items = self.list(h.ino, plus)?;
            h.items = Some(items);
        }
        let dir_ino = h.ino;
        let items = h.items.as_deref().unwrap_or_default();
        for (i, item) in items.iter().enumerate().skip(offset as usize) {
            let next = i as u64 + 1;
            match (&item.plus, plus) {
                (Some((node, attr)), true) => {
                    let provisional = self.entry(*attr);
                    let full = add(DirOut {
                        ino: item.ino,
                        next,
                        kind: item.kind,
                        name: &item.name,
                        entry: Some(&provisional),
                    });
                    if full {
                        break;
                    }
                    self.remember(dir_ino, &item.name, node.clone(), *attr, true)?;
                }
                (None, true) => {
                    // "." and "..": the kernel takes no lookup for them.
                    let (attr, _) = self
                        .getattr(item.ino, None)
                        .or_else(|_| self.getattr(dir_ino, None))?;
                    let e = Entry {
                        attr,
                        attr_ttl: Duration::ZERO,
                        entry_ttl: Duration::ZERO,
                    };
                    if add(DirOut {
                        ino: item.ino,
                        next,
                        kind: item.kind,
                        name: &item.name,
                        entry: Some(&e),
                    }) {
                        break;
                    }
                }
                (_, false) => {
                    if add(DirOut {
                        ino: item.ino,
                        next,
                        kind: item.kind,
                        name: &item.name,
                        entry: None,
                    }) {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    pub fn releasedir(&self, fh: u64) -> FsResult<()> {
        self.release(fh)
    }

    pub fn fsyncdir(&self, ino: u64) -> FsResult<()> {
        let (node, _, _) = self.node(ino)?;
        Ok(self.backend.fsyncdir(&node)?)
    }

    pub fn statfs(&self, ino: u64) -> FsResult<StatFs> {
        let node = match self.node(ino) {
            Ok((n, _, _)) => n,
            Err(_) => self.node(ROOT)?.0,
        };
        Ok(self.backend.statfs(&node)?)
    }

    pub fn getxattr(&self, ino: u64, name: &OsStr) -> FsResult<Vec<u8>> {
        let (node, _, _) = self.node(ino)?;
        Ok(self.backend.getxattr(&node, name)?)
    }

    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        let (node, _, _) = self.node(ino)?;
        Ok(self.backend.listxattr(&node)?)
    }

    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> FsResult<()> {
        let (node, _, _) = self.node(ino)?;
        self.backend.setxattr(&node, name, value, flags)?;
        // ctime changed (and the mode, for an ACL).
        let mut t = self.tables();
        self.expire_attr(&mut t, ino);
        if let Some(i) = t.inodes.get_mut(&ino) {
            i.default_acl = None;
        }
        Ok(())
    }

    pub fn removexattr(&self, ino: u64, name: &OsStr) -> FsResult<()> {
        let (node, _, _) = self.node(ino)?;
        self.backend.removexattr(&node, name)?;
        let mut t = self.tables();
        self.expire_attr(&mut t, ino);
        if let Some(i) = t.inodes.get_mut(&ino) {
            i.default_acl = None;
        }
        Ok(())
    }

    /// Inodes the kernel holds (for stats).
    pub fn inode_count(&self) -> usize {
        self.tables().inodes.len()
    }

    /// Open file and directory handles (for stats).
    pub fn handle_count(&self) -> usize {
        self.handles().len()
    }
}
