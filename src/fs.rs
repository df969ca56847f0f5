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

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crate::backend::bounded::{
    cache_can_answer, is_unreachable, name_absent_here, where_name_known_absent,
};
use crate::backend::{
    Attr, BResult, Backend, BackendError, Creds, FileKind, OpenMode, RenameFlags, SetAttr, SetTime,
    StatFs, Validator,
};
use crate::cache::CacheError;
use crate::data::{DataCache, FetchFn, FileData};
use crate::error::{FsError, FsResult};
use crate::killpriv::{self, Change, Modifier};
use crate::stats::Stats;
use crate::writeback::{LocalAttr, Start, WriteBack};

/// The longest the kernel may keep what is served while the NAS does not
/// answer (see `Core::offline_ttl`).
const OFFLINE_TTL: Duration = Duration::from_secs(1);

/// The FUSE root inode number.
pub const ROOT: u64 = 1;

/// How long `shed_names` leaves the inodes it sent alone.
const SHED_AGAIN: Duration = Duration::from_secs(5);

/// Tells the kernel to drop a name (a parent's inode and a name in it).
pub type NameDropper = Box<dyn Fn(u64, &OsStr) + Send + Sync>;

/// Cache lifetimes of the core.
#[derive(Clone, Debug)]
pub struct FsConfig {
    pub attr_timeout: Duration,
    /// Attributes of objects unchanged for long are kept up to this
    /// (see `attr_ttl`); at most `attr_timeout` when not above it.
    pub attr_timeout_max: Duration,
    pub entry_timeout: Duration,
    pub entry_timeout_max: Duration,
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

/// A tenth of the time since `attr` last changed, within `min..=max`.
fn adaptive(min: Duration, max: Duration, attr: &Attr) -> Duration {
    if max <= min {
        return min;
    }
    let changed = attr.mtime.max(attr.ctime);
    let age = std::time::SystemTime::now()
        .duration_since(changed)
        .unwrap_or_default();
    (age / 10).clamp(min, max)
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

/// What the NAS let this daemon do, learned from the changes it took in
/// this mount: whose objects' mode and owner it may change (as the NAS
/// sees the daemon: root, a squashed root, the `uid=` of an nfs://
/// source...). A change is only kept for later (`Core::keeps_set`) where
/// an earlier one proved the NAS would take it, so that the first of a
/// kind goes to the NAS at once and a refusal reaches the caller.
#[derive(Default)]
struct NasProof {
    /// Owners of objects whose mode or owner the NAS changed.
    owners: HashSet<u32>,
    /// Owners of objects writable by their owner only whose `user.*`
    /// xattrs the NAS changed.
    writes: HashSet<u32>,
    /// The longest `user.*` value the NAS took.
    xattr_len: usize,
    /// The NAS gave an object away (chown to another user): the daemon is
    /// its root, which file modes do not bind.
    any_owner: bool,
}

impl<B: Backend> Inode<B> {
    /// Lays a file's local attributes, after an attribute change kept
    /// here, over the cached ones. The ctime it moved does not make the
    /// xattrs known stale (so a chown after a chmod kept here asks the NAS
    /// nothing).
    fn apply_local_attrs(&mut self, l: &LocalAttr) {
        let was = self.attr.ctime;
        l.apply(&mut self.attr);
        if let Some(c) = self.xattrs.as_mut().filter(|c| c.ctime == was) {
            c.ctime = self.attr.ctime;
        }
    }
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
    /// A symlink's target, once read: served while the NAS is offline.
    target: Option<OsString>,
    /// Kept when the kernel forgets it: under a pin, for offline use.
    kept: bool,
    /// Extended attributes read, valid while the attributes are fresh and
    /// the ctime the same (an xattr change on the NAS moves the ctime).
    xattrs: Option<Box<XattrCache>>,
    /// What readdir replies gave the kernel since it last dropped its
    /// cache of this directory (FOPEN_CACHE_DIR): all that cache can hold.
    /// See [`Core::kernel_listing_current`]. Boxed: most inodes are files.
    kernel: Option<Box<KernelListings>>,
}

/// See [`Inode::kernel`].
#[derive(Default)]
struct KernelListings {
    /// The listings served, as [`fingerprint`]s: when last served, and
    /// whether a reply reached the end (it may have completed the cache).
    served: Vec<(u64, Instant, bool)>,
    /// More listings went in than are worth following: keep nothing.
    mixed: bool,
    /// Open handles and the listing each serves: what their replies may
    /// still add, however late the kernel takes them in.
    open: Vec<(u64, u64)>,
}

/// The extended attributes of one inode as last read from the NAS.
struct XattrCache {
    ctime: std::time::SystemTime,
    /// `listxattr`'s answer.
    list: Option<Vec<u8>>,
    /// Whether it names every POSIX ACL ([`Backend::lists_acls`]).
    acls_listed: bool,
    /// `getxattr`'s answers: a value, or the errno (ENODATA, ENOTSUP).
    values: HashMap<OsString, Result<Vec<u8>, i32>>,
}

#[derive(Clone, Copy)]
struct XattrStamp {
    xgen: u64,
    ctime: Option<std::time::SystemTime>,
}

struct Listing {
    names: HashMap<OsString, u64>,
    /// The kinds of the inodes listed, for a listing served offline.
    kinds: HashMap<u64, FileKind>,
    until: Instant,
    /// False once a name may be missing from `names` (a rename from a name
    /// nassync did not know): it is then not served offline.
    complete: bool,
}

struct Tables<B: Backend> {
    inodes: HashMap<u64, Inode<B>>,
    /// (parent, name) -> inode, for inodes the kernel holds.
    names: HashMap<(u64, OsString), u64>,
    /// Complete listings of directories, name -> FUSE inode.
    listings: HashMap<u64, Listing>,
    /// Counts names removed, so that a listing read before a removal is
    /// not taken as current after it.
    names_gen: u64,
    negatives: HashMap<(u64, OsString), Instant>,
    /// Open files unlinked on the NAS -> the directory they were in.
    open_unlinked: HashMap<u64, u64>,
    /// NAS objects whose mode, owner or times were set here for the NAS
    /// to take later: if it refuses, the kernel's copy of their
    /// attributes is to go too (see `drain_settled`).
    attrs_set_here: HashSet<u64>,
    /// Files and directories whose `user.*` xattrs were set here for the
    /// NAS to take later (see `keeps_set`).
    xattrs_set_here: HashSet<u64>,
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
    /// With plus: the entry's inode and attributes are to be taken from
    /// the tables as it is handed out (`plus` is then None), not from the
    /// NAS; handing it out must not make it look fresh for longer.
    cached: bool,
    /// Set while `plus` holds a node from the NAS not yet handed out: not
    /// in the tables, but a descriptor all the same (or the tables' own,
    /// asked for attributes, which a shed would leave open here).
    unhanded: Option<Unhanded>,
}

impl<B: Backend> DirItem<B> {
    /// Drops the node kept for the entry, handed out now: the tables hold
    /// it, and a clone kept here would keep its descriptor open past the
    /// kernel's forget. Not offline (`Core::list_cached`), where one
    /// forgotten could not be looked up again.
    fn handed_out(&mut self) {
        if !self.cached {
            self.plus = None;
            self.unhanded = None;
        }
    }
}

/// What `Core::shed_names` sent.
struct Shedding {
    /// The inodes whose names were sent since `since` and the kernel has
    /// not forgotten: their forgets are awaited, and they are not sent
    /// again until `SHED_AGAIN` has passed (the kernel may be using them).
    sent: HashSet<u64>,
    since: Instant,
    /// When `shed_names` last ran past its checks.
    last_ran: Instant,
    /// Until when `wait_for_room` does not wait, after a wait that the
    /// kernel's forgets did not end.
    wait_off_until: Instant,
}

/// Counts, in `Core::unhanded_nodes`, a node a listing holds (see
/// `Core::room`).
struct Unhanded(Arc<AtomicUsize>);

impl Unhanded {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for Unhanded {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct DirHandle<B: Backend> {
    ino: u64,
    /// The listing as read at offset 0; offsets index into it, so they stay
    /// valid while the directory changes.
    items: Option<Vec<DirItem<B>>>,
    /// [`Core::settle_gen`] before the listing was read.
    settle_gen: u64,
    /// The tables' `names_gen` when the listing was taken.
    names_gen: u64,
    /// The [`fingerprint`] of `items`.
    fingerprint: u64,
}

enum Handle<B: Backend> {
    File(Arc<FileHandle<B>>),
    Dir(Arc<Mutex<DirHandle<B>>>),
}

/// See the module documentation.
/// At most this many changes of NAS objects are kept for later while the
/// NAS answers (see `Core::defers_changes`): each lookup of the overlay's
/// view looks through them, and an operation that goes to the NAS first
/// makes those pending; beyond it, changes go to the NAS at once.
const MAX_KEPT_CHANGES: usize = 4096;

pub struct Core<B: Backend> {
    backend: Arc<B>,
    cfg: FsConfig,
    root_nas_ino: u64,
    tables: Mutex<Tables<B>>,
    handles: Mutex<HashMap<u64, Handle<B>>>,
    next_fh: AtomicU64,
    /// Counts nassync's own xattr changes: an answer read from the NAS
    /// before one is not stored after it.
    xattr_gen: AtomicU64,
    /// Conflicts seen by `drain_settled`.
    conflicts_seen: AtomicU64,
    /// What the NAS let this daemon change so far (`keeps_set`).
    nas_proof: Mutex<NasProof>,
    /// Tells the kernel to drop its copy of an inode's attributes (set by
    /// the mount: a notification, sent from a thread of its own).
    kernel_attrs_stale: OnceLock<Box<dyn Fn(u64) + Send + Sync>>,
    /// How many inodes are too many, and how the kernel is told to drop
    /// a name (see `shed_names`).
    kernel_names: OnceLock<(usize, NameDropper)>,
    /// Set when there are too many inodes, for `wait_shed`.
    shed_wanted: (Mutex<bool>, std::sync::Condvar),
    /// What `shed_names` sent, for itself and `wait_for_room`.
    shedding: Mutex<Shedding>,
    /// Nodes listings hold that are not handed out yet (`Unhanded`).
    unhanded_nodes: Arc<AtomicUsize>,
    /// Held while a listing takes room (`take_room`).
    room_taken: Mutex<()>,
    /// Whether `defers_changes` logged the NAS's first refusal.
    refusal_noted: AtomicBool,
    data: Arc<DataCache>,
    stats: Arc<Stats>,
    /// Write-back, unless writes go straight to the NAS (`-o sync`).
    wb: Option<Arc<WriteBack<B>>>,
    /// The NAS's capacity as last seen, for `df` while it is offline.
    last_statfs: Mutex<Option<StatFs>>,
    /// Held by a pin from its walk (which keeps the inodes it meets) until
    /// the pin is recorded, and by a release of kept inodes: a release in
    /// between would let go of the tree being pinned.
    pin_lock: Mutex<()>,
}

/// NAS inode number <-> FUSE inode number: the NAS root and 1 swap places.
pub fn map_ino(root_nas_ino: u64, ino: u64) -> u64 {
    if ino == root_nas_ino {
        ROOT
    } else if ino == ROOT {
        root_nas_ino
    } else {
        ino
    }
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
        let backend_statfs = backend.statfs(&node).ok();
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
                target: None,
                kept: true,
                xattrs: None,
                kernel: None,
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
                names_gen: 0,
                negatives: HashMap::new(),
                open_unlinked: HashMap::new(),
                attrs_set_here: HashSet::new(),
                xattrs_set_here: HashSet::new(),
            }),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            xattr_gen: AtomicU64::new(0),
            conflicts_seen: AtomicU64::new(0),
            nas_proof: Mutex::new(NasProof::default()),
            kernel_attrs_stale: OnceLock::new(),
            kernel_names: OnceLock::new(),
            shed_wanted: (Mutex::new(false), std::sync::Condvar::new()),
            shedding: Mutex::new(Shedding {
                sent: HashSet::new(),
                since: Instant::now(),
                last_ran: Instant::now(),
                wait_off_until: Instant::now(),
            }),
            unhanded_nodes: Arc::new(AtomicUsize::new(0)),
            room_taken: Mutex::new(()),
            refusal_noted: AtomicBool::new(false),
            data,
            stats,
            wb: None,
            // For `df` while offline, should that come before any statfs.
            last_statfs: Mutex::new(backend_statfs),
            pin_lock: Mutex::new(()),
        })
    }

    /// The NAS's inode number of the share's root.
    pub fn root_nas_ino(&self) -> u64 {
        self.root_nas_ino
    }

    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// Turns write-back on: writes go to `wb` instead of the NAS.
    pub fn set_writeback(&mut self, wb: Arc<WriteBack<B>>) {
        self.wb = Some(wb);
    }

    pub fn writeback(&self) -> Option<&Arc<WriteBack<B>>> {
        self.wb.as_ref()
    }

    /// Since when the NAS has not been answering, if it is not.
    pub fn nas_offline_since(&self) -> Option<std::time::SystemTime> {
        self.backend.offline_since()
    }

    /// NAS calls that change it, abandoned and not finished yet.
    pub fn nas_unfinished_changes(&self) -> usize {
        self.backend.unfinished_changes()
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

    /// See the field.
    pub fn pin_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.pin_lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `name` in `parent` as the NAS has it, without a kernel
    /// lookup, and keeps the inode when the kernel forgets it (pinned
    /// trees stay known for offline use). Returns the FUSE inode number.
    pub fn adopt(
        &self,
        parent: u64,
        name: &OsStr,
        node: B::Node,
        attr: Attr,
        target: Option<OsString>,
    ) -> FsResult<u64> {
        let entry = self.remember(parent, name, node, attr, false, self.settle_gen())?;
        let ino = entry.attr.ino;
        if let Some(i) = self.tables().inodes.get_mut(&ino) {
            i.kept = true;
            if target.is_some() {
                i.target = target;
            }
        }
        Ok(ino)
    }

    /// Lets go of the inodes kept for pins whose path `pinned` no longer
    /// covers (after an unpin), or whose name is gone (unlinked, renamed,
    /// replaced): the kernel's lookups alone decide about them from now
    /// on. Returns how many inodes were dropped.
    pub fn release_kept(&self, pinned: &dyn Fn(&[u8]) -> bool) -> usize {
        use std::os::unix::ffi::OsStrExt;
        let mut t = self.tables();
        // A file with hard links stays kept if any of its names is pinned.
        let mut covered: HashSet<u64> = HashSet::new();
        for ((parent, name), ino) in &t.names {
            let kept = t.inodes.get(ino).is_some_and(|i| i.kept);
            if !kept || *ino == ROOT || covered.contains(ino) {
                continue;
            }
            let Some(mut path) = Self::path_in(&t, *parent) else {
                continue;
            };
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(name.as_bytes());
            if pinned(&path) {
                covered.insert(*ino);
            }
        }
        let released: Vec<u64> = t
            .inodes
            .iter()
            .filter(|(ino, i)| i.kept && **ino != ROOT && !covered.contains(ino))
            .map(|(&ino, _)| ino)
            .collect();
        let mut dropped = 0;
        let mut forgotten = Vec::new();
        for ino in released {
            let Some(i) = t.inodes.get_mut(&ino) else {
                continue;
            };
            i.kept = false;
            if i.lookups == 0 {
                if let Some(i) = t.inodes.remove(&ino) {
                    let key = (i.parent, i.name);
                    if t.names.get(&key) == Some(&ino) {
                        t.names.remove(&key);
                    }
                    forgotten.push(i.node);
                }
                t.listings.remove(&ino);
                dropped += 1;
            }
        }
        drop(t);
        for n in &forgotten {
            self.backend.forget(n);
        }
        dropped
    }

    /// `path_of` within tables already locked; None if the chain is broken.
    fn path_in(t: &Tables<B>, ino: u64) -> Option<Vec<u8>> {
        use std::os::unix::ffi::OsStrExt;
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut cur = ino;
        while cur != ROOT {
            let i = t.inodes.get(&cur)?;
            parts.push(i.name.as_bytes());
            cur = i.parent;
            if parts.len() > 4096 {
                return None;
            }
        }
        parts.reverse();
        Some(parts.join(&b'/'))
    }

    /// Records the complete listing of directory `ino` (adopted entries),
    /// for offline use; it is not taken as fresh while the NAS answers.
    pub fn adopt_listing(&self, ino: u64, entries: Vec<(OsString, u64, FileKind)>) {
        let mut names = HashMap::with_capacity(entries.len());
        let mut kinds = HashMap::with_capacity(entries.len());
        for (name, fino, kind) in entries {
            names.insert(name, fino);
            kinds.insert(fino, kind);
        }
        let mut t = self.tables();
        let until = t.listings.get(&ino).map_or_else(Instant::now, |l| l.until);
        t.listings.insert(
            ino,
            Listing {
                names,
                kinds,
                until,
                complete: true,
            },
        );
    }

    /// The data state of `ino` (a FUSE inode number) if the core holds it.
    pub fn file_data(&self, ino: u64) -> Option<Arc<FileData>> {
        self.tables().inodes.get(&ino).map(|i| i.data.clone())
    }

    fn tables(&self) -> MutexGuard<'_, Tables<B>> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handles(&self) -> MutexGuard<'_, HashMap<u64, Handle<B>>> {
        self.handles.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// NAS inode number -> FUSE inode number (and back: it is an involution).
    fn fuse_ino(&self, nas: u64) -> u64 {
        map_ino(self.root_nas_ino, nas)
    }

    /// The local attributes of a file with changes not yet on the NAS, laid
    /// over the NAS's; returns whether it has some.
    fn overlay(&self, ino: u64, attr: &mut Attr) -> bool {
        let Some(wb) = &self.wb else { return false };
        if attr.kind != FileKind::File {
            return false;
        }
        match wb.local_attr(self.fuse_ino(ino)) {
            Some(l) => {
                l.apply(attr);
                true
            }
            None => false,
        }
    }

    /// Write-back's settle count, to take before reading attributes from
    /// the NAS (see [`Core::fresh`]).
    fn settle_gen(&self) -> u64 {
        self.wb.as_ref().map(|w| w.settle_gen()).unwrap_or(0)
    }

    /// Attributes read from the NAS while a write-back of the file was
    /// finishing may show the middle of it; they are read again once it
    /// is done (`g0`: [`Core::settle_gen`] before they were read).
    fn fresh(&self, node: &B::Node, attr: &mut Attr, g0: u64) {
        let Some(wb) = &self.wb else { return };
        if attr.kind == FileKind::File && wb.settle_gen() != g0 && !wb.is_dirty(attr.ino) {
            if let Ok(a) = self.backend.getattr(node) {
                *attr = a;
            }
        }
    }

    /// Files whose changes all reached the NAS show the NAS's attributes
    /// again: their cached ones expire.
    fn drain_settled(&self) {
        let Some(wb) = &self.wb else { return };
        // A conflict leaves on the NAS what the listings cached here do
        // not show (an object whose removal or rename it kept, a conflict
        // copy): they expire now rather than hide it for their time to
        // live (kept, to serve while the NAS is offline). Conflicts are
        // rare; telling which listings they touch is not worth it.
        let conflicts = wb.conflict_count();
        if self.conflicts_seen.swap(conflicts, Ordering::Relaxed) != conflicts {
            let mut t = self.tables();
            let now = Instant::now();
            for l in t.listings.values_mut() {
                l.until = l.until.min(now);
            }
            t.negatives.clear();
            // So do xattrs answered with a change kept here that the NAS
            // then refused (its ctime did not move): asked again while it
            // answers, still served while it does not.
            self.xattr_gen.fetch_add(1, Ordering::SeqCst);
            for c in t.inodes.values_mut().filter_map(|i| i.xattrs.as_mut()) {
                c.ctime = std::time::UNIX_EPOCH;
            }
            // And attributes set here that the NAS may have refused: the
            // kernel holds them for their time to live otherwise. Those
            // made on the NAS since leave the set (a file's, once settled:
            // below).
            drop(t);
            let pending = self.backend.attrs_pending();
            let mut t = self.tables();
            let set_here: Vec<u64> = t.attrs_set_here.iter().copied().collect();
            for ino in &set_here {
                self.expire_attr(&mut t, *ino);
            }
            let Tables {
                inodes,
                attrs_set_here,
                ..
            } = &mut *t;
            attrs_set_here.retain(|ino| {
                inodes.get(ino).is_some_and(|i| {
                    i.kind == FileKind::File || pending.contains(&self.fuse_ino(*ino))
                })
            });
            drop(t);
            if let Some(f) = self.kernel_attrs_stale.get() {
                set_here.into_iter().for_each(f);
            }
        }
        let settled = wb.take_settled();
        if settled.is_empty() {
            return;
        }
        let mut t = self.tables();
        let mut set_here = Vec::new();
        for nas in settled {
            let ino = self.fuse_ino(nas);
            self.expire_attr(&mut t, ino);
            // Its attributes set here are on the NAS now, or refused: the
            // kernel asks again.
            if t.attrs_set_here.remove(&ino) {
                set_here.push(ino);
            }
        }
        drop(t);
        if let Some(f) = self.kernel_attrs_stale.get() {
            set_here.into_iter().for_each(f);
        }
    }

    /// Takes note of conflicts found since the last request (see
    /// `drain_settled`): for the mount's background thread, and the end of
    /// a flush, as the kernel asks nothing while it trusts its caches.
    pub fn notice_conflicts(&self) {
        self.drain_settled();
    }

    /// Sets how the kernel is told to drop its copy of an inode's
    /// attributes.
    pub fn on_kernel_attrs_stale(&self, f: Box<dyn Fn(u64) + Send + Sync>) {
        let _ = self.kernel_attrs_stale.set(f);
    }

    /// Sets the most inodes to hold, and how the kernel is told to drop
    /// one of its names (see `shed_names`).
    pub fn on_too_many_inodes(&self, max: usize, f: NameDropper) {
        let _ = self.kernel_names.set((max, f));
    }

    /// Waits at most `max` until there are too many inodes (see
    /// `shed_names`): for the mount's thread that sheds them.
    pub fn wait_shed(&self, max: Duration) {
        let (m, cv) = &self.shed_wanted;
        let g = m.lock().unwrap_or_else(|e| e.into_inner());
        let (mut g, _) = cv
            .wait_timeout_while(g, max, |wanted| !*wanted)
            .unwrap_or_else(|e| e.into_inner());
        *g = false;
    }

    fn want_shed(&self) {
        let (m, cv) = &self.shed_wanted;
        *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }

    /// Runs `f` again while it fails for want of descriptors (a directory
    /// source's nodes are some), at most for a second: the kernel is asked
    /// to drop names meanwhile, and forgets their inodes.
    fn short_of_descriptors<T, E>(
        &self,
        mut f: impl FnMut() -> Result<T, E>,
        errno: impl Fn(&E) -> i32,
    ) -> Result<T, E> {
        let mut got = f();
        let mut tries = 0;
        while got
            .as_ref()
            .is_err_and(|e| matches!(errno(e), libc::EMFILE | libc::ENFILE))
            && tries < 20
            && self.too_many(self.tables().inodes.len())
        {
            tries += 1;
            self.want_shed();
            std::thread::sleep(Duration::from_millis(50));
            got = f();
        }
        got
    }

    /// Whether there are more inodes than `on_too_many_inodes` allows,
    /// counting with `inodes` the nodes listings hold (`Unhanded`).
    fn too_many(&self, inodes: usize) -> bool {
        self.kernel_names
            .get()
            .is_some_and(|(max, _)| inodes + self.unhanded_nodes.load(Ordering::Relaxed) > *max)
    }

    /// How many more inodes may be taken before the ceiling, a quarter
    /// over the most `on_too_many_inodes` allows: what is shed comes back
    /// as the kernel's forgets, later, and a walk takes thousands of
    /// inodes a second meanwhile.
    fn room(&self) -> usize {
        match self.kernel_names.get() {
            Some((max, _)) => (max + max / 4).saturating_sub(
                self.tables().inodes.len() + self.unhanded_nodes.load(Ordering::Relaxed),
            ),
            None => usize::MAX,
        }
    }

    /// Takes room (see `room`) for up to `want` nodes a listing is to
    /// hold, each counted until it is handed out or dropped; None when
    /// nodes are not descriptors. Listings side by side share the room.
    fn take_room(&self, want: usize) -> Option<Vec<Unhanded>> {
        self.kernel_names.get()?;
        let _one_at_a_time = self.room_taken.lock().unwrap_or_else(|e| e.into_inner());
        let n = self.room().min(want);
        Some(
            (0..n)
                .map(|_| Unhanded::new(&self.unhanded_nodes))
                .collect(),
        )
    }

    /// Before a lookup or a listing takes new inodes (descriptors): at
    /// the ceiling, waits up to a second for the forgets of what
    /// `shed_names` sent. Not when none is awaited (all in use or with
    /// changes) nor offline, and not again for `SHED_AGAIN` after a wait
    /// that the forgets did not end (the kernel may be holding them
    /// behind this very request's directory lock).
    fn wait_for_room(&self) {
        if self.room() > 0 || self.backend.offline_since().is_some() {
            return;
        }
        let start = Instant::now();
        let shedding = || self.shedding.lock().unwrap_or_else(|e| e.into_inner());
        if shedding().wait_off_until > start {
            return;
        }
        // (Room taken by listings under the most sheds nothing.)
        while self.room() == 0 && self.too_many(self.tables().inodes.len()) {
            let mut s = shedding();
            if s.last_ran > start && s.sent.is_empty() {
                return;
            }
            if start.elapsed() > Duration::from_secs(1) {
                s.wait_off_until = Instant::now() + SHED_AGAIN;
                return;
            }
            drop(s);
            self.want_shed();
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Each inode the kernel holds keeps its NAS node, which on a
    /// directory source is an open descriptor, and the kernel lets go of
    /// names only under memory pressure: a `find` over a share larger
    /// than the descriptor limit would end in EMFILE. Past the most set by
    /// `on_too_many_inodes`, the kernel is asked to drop the names of the
    /// files whose attributes expire first (down to three quarters of it),
    /// except those open, with changes here or with other links; what it
    /// does not use it then forgets, and looks up again when needed. Called by a thread of
    /// the mount as soon as there are too many, and once a second.
    pub fn shed_names(&self) {
        let Some((max, drop_name)) = self.kernel_names.get() else {
            return;
        };
        // Offline, a name forgotten could not be looked up again, and
        // nothing opens descriptors.
        if !self.too_many(self.tables().inodes.len()) || self.backend.offline_since().is_some() {
            return;
        }
        let open = self.open_inos();
        let (want, mut c) = {
            let mut shedding = self.shedding.lock().unwrap_or_else(|e| e.into_inner());
            if shedding.since.elapsed() > SHED_AGAIN {
                shedding.sent.clear();
                shedding.since = Instant::now();
            }
            let t = self.tables();
            let held = t.inodes.len() + self.unhanded_nodes.load(Ordering::Relaxed);
            let Some(want) = held.checked_sub(max - max / 4) else {
                return;
            };
            // Not directories: one in use (a shell's working directory)
            // would be unhashed, its path lost to getcwd. Not files with
            // other names: only the last one known would go.
            let c: Vec<(Instant, u64)> = t
                .inodes
                .iter()
                .filter(|(ino, i)| {
                    **ino != ROOT
                        && i.lookups > 0
                        && !i.kept
                        && i.kind != FileKind::Dir
                        && i.attr.nlink <= 1
                        && !open.contains(*ino)
                        && !shedding.sent.contains(*ino)
                })
                .map(|(ino, i)| (i.attr_until, *ino))
                .collect();
            (want, c)
        };
        // Nor files with changes here (asked without the tables held),
        // before choosing: otherwise they could fill every place.
        c.retain(|v| !self.is_dirty(v.1));
        if c.len() > want {
            c.select_nth_unstable_by_key(want, |v| v.0);
            c.truncate(want);
        }
        let victims: Vec<(u64, u64, OsString)> = {
            let t = self.tables();
            c.into_iter()
                .filter_map(|(_, ino)| {
                    let i = t.inodes.get(&ino)?;
                    Some((ino, i.parent, i.name.clone()))
                })
                .collect()
        };
        {
            let mut shedding = self.shedding.lock().unwrap_or_else(|e| e.into_inner());
            shedding.sent.extend(victims.iter().map(|v| v.0));
            shedding.last_ran = Instant::now();
        }
        log::debug!("asking the kernel to drop {} names", victims.len());
        Stats::add(&self.stats.kernel_names_dropped, victims.len() as u64);
        for (_, parent, name) in victims {
            drop_name(parent, &name);
        }
    }

    /// The path of `ino` from the share's root, as last known.
    fn path_of(&self, ino: u64) -> Option<OsString> {
        use std::os::unix::ffi::OsStringExt;
        Self::path_in(&self.tables(), ino).map(OsString::from_vec)
    }

    fn child_path(&self, parent: u64, name: &OsStr) -> Option<OsString> {
        let mut p = self.path_of(parent)?;
        if !p.is_empty() {
            p.push("/");
        }
        p.push(name);
        Some(p)
    }

    /// What write-back needs when a file first changes.
    fn start_info(&self, ino: u64, data: &Arc<FileData>) -> FsResult<Start<B>> {
        let (node, attr) = {
            let t = self.tables();
            let i = t.inodes.get(&ino).ok_or(FsError::UnknownInode(ino))?;
            (i.node.clone(), i.attr)
        };
        let path = self.path_of(ino).unwrap_or_else(|| {
            log::warn!(
                "inode {ino}: path unknown; after a crash its changes would be kept at the root"
            );
            OsString::new()
        });
        let base = data.cached().unwrap_or_else(|| attr.validator());
        Ok(Start {
            fuse_ino: ino,
            node,
            path,
            base,
            data: data.clone(),
            owner: (attr.perm, attr.uid, attr.gid),
            nlink: attr.nlink,
        })
    }

    /// Stores local attributes of `ino` after a local change.
    fn store_local(&self, ino: u64, l: &LocalAttr) -> Attr {
        let mut t = self.tables();
        match t.inodes.get_mut(&ino) {
            Some(i) => {
                l.apply(&mut i.attr);
                i.attr
            }
            None => {
                let mut a = self.placeholder_attr(ino);
                l.apply(&mut a);
                a
            }
        }
    }

    fn placeholder_attr(&self, ino: u64) -> Attr {
        let now = std::time::SystemTime::now();
        Attr {
            ino,
            kind: FileKind::File,
            perm: 0,
            nlink: 0,
            uid: 0,
            gid: 0,
            rdev: 0,
            size: 0,
            blocks: 0,
            blksize: 4096,
            atime: now,
            mtime: now,
            ctime: now,
        }
    }

    /// After nassync changed metadata of `ino` on the NAS itself: a file
    /// with pending changes keeps its base version (see
    /// [`WriteBack::meta_changed`]).
    fn own_meta_change(&self, ino: u64, attr: Option<&Attr>) {
        let Some(wb) = &self.wb else { return };
        let nas = self.fuse_ino(ino);
        wb.own_meta_op(nas);
        let Some((node, data)) = self
            .tables()
            .inodes
            .get(&ino)
            .filter(|i| i.kind == FileKind::File)
            .map(|i| (i.node.clone(), i.data.clone()))
        else {
            return;
        };
        let dirty = wb.is_dirty(nas);
        if !dirty && data.cached().is_none() {
            return;
        }
        let fetched;
        let attr = match attr {
            Some(a) => a,
            None => match self.backend.getattr(&node) {
                Ok(a) => {
                    fetched = a;
                    &fetched
                }
                Err(_) => return,
            },
        };
        if dirty {
            wb.meta_changed(nas, attr);
        } else if let Err(e) = self.data.own_ctime(ino, &data, &attr.validator()) {
            log::warn!("cache: {e}");
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
            attr_ttl: self.attr_ttl(&attr),
            entry_ttl: self.entry_ttl(&attr),
        }
    }

    /// The entry of inode `ino` of the tables, whose lookups were counted
    /// there: the kernel must get that number. Its attributes may carry
    /// another (a file saved over another answers with that one's, see
    /// `save_over`), and a lookup count kept under one number and
    /// forgotten under the other would drop an inode the kernel holds.
    fn entry_of(&self, ino: u64, mut attr: Attr) -> Entry {
        attr.ino = self.fuse_ino(ino);
        self.entry(attr)
    }

    /// How long `attr` may be trusted: like an NFS client's attribute
    /// cache, a tenth of the time since the object last changed, between
    /// `attr_timeout` and `attr_timeout_max` (acregmin and acregmax).
    fn attr_ttl(&self, attr: &Attr) -> Duration {
        adaptive(self.cfg.attr_timeout, self.cfg.attr_timeout_max, attr)
    }

    /// How long a name leading to `attr` may be trusted (the same rule,
    /// between `entry_timeout` and `entry_timeout_max`).
    fn entry_ttl(&self, attr: &Attr) -> Duration {
        adaptive(self.cfg.entry_timeout, self.cfg.entry_timeout_max, attr)
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
    fn saw_attr(&self, ino: u64, attr: &mut Attr) -> FsResult<()> {
        crate::clock::observe(attr.ctime);
        let dirty = self.overlay(ino, attr);
        let data = {
            let mut t = self.tables();
            let Some(i) = t.inodes.get_mut(&ino) else {
                return Ok(());
            };
            i.attr = *attr;
            i.attr_until = Instant::now() + self.attr_ttl(&i.attr);
            i.data.clone()
        };
        if attr.kind == FileKind::File && !dirty {
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
        g0: u64,
    ) -> FsResult<Entry> {
        self.remember_at(parent, name, node, attr, count, g0, None, true)
    }

    /// [`Core::remember`] for an entry of a listing taken when the tables'
    /// `names_gen` was `snapshot`: if a name has been removed since, the
    /// entry may be one of them and does not bind its name again (a
    /// directory read on through an old handle must not bring an unlinked
    /// name back into the tables).
    #[allow(clippy::too_many_arguments)]
    fn remember_at(
        &self,
        parent: u64,
        name: &OsStr,
        node: B::Node,
        mut attr: Attr,
        count: bool,
        g0: u64,
        snapshot: Option<u64>,
        stamp: bool,
    ) -> FsResult<Entry> {
        let ino = self.fuse_ino(attr.ino);
        self.fresh(&node, &mut attr, g0);
        crate::clock::observe(attr.ctime);
        let dirty = self.overlay(ino, &mut attr);
        let wb_data = if dirty {
            self.wb.as_ref().and_then(|wb| wb.file_data(attr.ino))
        } else {
            None
        };
        let now = Instant::now();
        let many;
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
                data: wb_data.clone().unwrap_or_default(),
                target: None,
                kept: false,
                xattrs: None,
                kernel: None,
            });
            if inode.kind != attr.kind {
                // The NAS reused the number for another object.
                inode.node = node;
                inode.kind = attr.kind;
                inode.data = Arc::new(FileData::default());
                inode.target = None;
            } else if stamp {
                // A fresh answer's node: the number may have been reused
                // for an object of the same kind (a directory removed and
                // another made), and the old node names the removed one.
                inode.node = node;
            }
            // Attributes the tables gave out keep their expiry: only an
            // answer of the NAS makes them fresh again.
            if stamp {
                inode.attr = attr;
                inode.attr_until = now + self.attr_ttl(&inode.attr);
                inode.entry_until = now + self.entry_ttl(&inode.attr);
            }
            if count {
                inode.lookups += 1;
            }
            let data = inode.data.clone();
            if snapshot.is_none_or(|g| g == t.names_gen) {
                // Other links of the same inode keep their own name entries.
                inode.parent = parent;
                inode.name = name.to_os_string();
                t.names.insert((parent, name.to_os_string()), ino);
                t.negatives.remove(&(parent, name.to_os_string()));
                if let Some(l) = t.listings.get_mut(&parent) {
                    l.names.insert(name.to_os_string(), ino);
                    l.kinds.insert(ino, attr.kind);
                }
            }
            many = t.inodes.len();
            data
        };
        if self.too_many(many) {
            self.want_shed();
        }
        // Only a fresh answer tells the NAS's version: attributes kept in
        // a listing may predate what write-back made there since.
        if attr.kind == FileKind::File && !dirty && stamp {
            self.data.observe(ino, &data, &attr.validator())?;
        }
        Ok(self.entry(attr))
    }

    /// The name is gone from `parent`: forget it, and expire the attributes
    /// of the inode it named (its link count and ctime changed).
    fn forget_name(&self, t: &mut Tables<B>, parent: u64, name: &OsStr, negative: bool) {
        t.names_gen += 1;
        let key = (parent, name.to_os_string());
        let held = t.names.remove(&key);
        if let Some(i) = held.and_then(|ino| t.inodes.get_mut(&ino)) {
            i.attr_until = Instant::now();
        }
        let listed = t
            .listings
            .get_mut(&parent)
            .and_then(|l| l.names.remove(name));
        if let Some(i) = listed.and_then(|ino| t.inodes.get_mut(&ino)) {
            i.attr_until = Instant::now();
        }
        if negative {
            self.note_absent(t, key);
        }
        self.expire_attr(t, parent);
    }

    /// Notes that `key`'s name is absent: a negative entry, kept past its
    /// time to live as the NAS's last word (see `lookup_in`), until the
    /// name is seen again or there are too many.
    fn note_absent(&self, t: &mut Tables<B>, key: (u64, OsString)) {
        if self.cfg.negative_timeout.is_zero() {
            return;
        }
        if t.negatives.len() > 100_000 {
            t.negatives.clear();
        }
        t.negatives
            .insert(key, Instant::now() + self.cfg.negative_timeout);
    }

    /// `name` in `parent`, which led to `ino` (a file with other links),
    /// is gone: if `ino` was last known by it, it is known by another name
    /// the tables hold, if any, since write-back records a file's changes
    /// by that path.
    fn name_went(t: &mut Tables<B>, ino: u64, parent: u64, name: &OsStr) {
        let by_it = |i: &Inode<B>| i.parent == parent && i.name == name;
        if !t.inodes.get(&ino).is_some_and(by_it) {
            return;
        }
        let other = t
            .names
            .iter()
            .find(|(_, v)| **v == ino)
            .map(|(k, _)| k.clone())
            .or_else(|| {
                t.listings.iter().find_map(|(d, l)| {
                    l.names
                        .iter()
                        .find(|(_, v)| **v == ino)
                        .map(|(n, _)| (*d, n.clone()))
                })
            });
        if let (Some((p, n)), Some(i)) = (other, t.inodes.get_mut(&ino)) {
            i.parent = p;
            i.name = n;
        }
    }

    /// A subdirectory came to or left directory `ino` through the mount:
    /// its link count as last seen follows (as the kernel's does), since
    /// it is what is shown while the NAS does not answer.
    fn subdirs_changed(t: &mut Tables<B>, ino: u64, delta: i32) {
        if let Some(i) = t.inodes.get_mut(&ino) {
            if i.attr.kind == FileKind::Dir {
                i.attr.nlink = (i64::from(i.attr.nlink) + i64::from(delta)).max(2) as u32;
            }
        }
    }

    fn expire_attr(&self, t: &mut Tables<B>, ino: u64) {
        if let Some(i) = t.inodes.get_mut(&ino) {
            i.attr_until = Instant::now();
        }
    }

    /// The inode `name` in `parent` leads to as the tables know it: a name
    /// the kernel holds, or an entry of the directory's listing.
    fn ino_at(t: &Tables<B>, parent: u64, name: &OsStr) -> Option<u64> {
        t.names
            .get(&(parent, name.to_os_string()))
            .copied()
            .or_else(|| {
                t.listings
                    .get(&parent)
                    .and_then(|l| l.names.get(name).copied())
            })
    }

    /// The inode `name` in `parent` leads to as the tables know it, with
    /// its link count and ctime then: see `link_dropped`.
    fn links_of(t: &Tables<B>, parent: u64, name: &OsStr) -> Option<(u64, u32, SystemTime)> {
        let ino = Self::ino_at(t, parent, name)?;
        let i = t.inodes.get(&ino)?;
        (i.attr.kind != FileKind::Dir).then_some((ino, i.attr.nlink, i.attr.ctime))
    }

    /// A name of a file went through the mount (unlink, renamed over):
    /// its link count as last seen follows, as the kernel's does, since it
    /// is what is shown while the NAS does not answer (its other names).
    /// `before`, from `links_of` before the operation: unless the tables
    /// learned the file's attributes anew meanwhile (then already after).
    fn link_dropped(t: &mut Tables<B>, before: Option<(u64, u32, SystemTime)>) {
        let Some((ino, nlink, ctime)) = before else {
            return;
        };
        if let Some(i) = t.inodes.get_mut(&ino) {
            if (i.attr.nlink, i.attr.ctime) == (nlink, ctime) {
                i.attr.nlink = nlink.saturating_sub(1);
            }
        }
    }

    /// How long the kernel may keep what is served while the NAS does not
    /// answer: the attributes last seen, which may be older than changes
    /// made through the mount since (an unlink expires the attributes of
    /// the file's other names, it does not rewrite them). Short, so that
    /// the kernel asks again soon after the NAS is back.
    fn offline_ttl(&self) -> Duration {
        self.cfg.attr_timeout.min(OFFLINE_TTL)
    }

    /// Directory `parent` changed here only (a removal kept to make on the
    /// NAS later), `at`: its attributes as cached stay good, with that
    /// mtime and ctime (as the backend shows them); asking the NAS would
    /// cost a round trip per entry of an `rm -rf` (the kernel checks the
    /// directory's permissions before each).
    fn changed_here(&self, t: &mut Tables<B>, parent: u64, at: Option<SystemTime>) {
        let Some(at) = at else { return };
        if let Some(i) = t.inodes.get_mut(&parent) {
            i.attr.mtime = i.attr.mtime.max(at);
            i.attr.ctime = i.attr.ctime.max(at);
            i.attr_until = Instant::now() + self.attr_ttl(&i.attr);
        }
    }

    /// A name was added to `parent` through the mount.
    fn added_name(&self, parent: u64) {
        let mut t = self.tables();
        self.expire_attr(&mut t, parent);
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Entry> {
        self.lookup_in(parent, name, true)
    }

    /// `lookup`; `wait` for room (`wait_for_room`) before the NAS is
    /// asked, except within a listing, whose directory the kernel holds.
    fn lookup_in(&self, parent: u64, name: &OsStr, wait: bool) -> FsResult<Entry> {
        self.drain_settled();
        if name.len() > 255 {
            return Err(BackendError::errno("lookup", libc::ENAMETOOLONG).into());
        }
        let now = Instant::now();
        let dir_node = {
            let mut t = self.tables();
            let t = &mut *t;
            let key = (parent, name.to_os_string());
            // Expired, a negative entry is kept as the NAS's last word:
            // the answer if the NAS does not give one now.
            let absent_before = match t.negatives.get(&key) {
                Some(until) if *until > now => {
                    Stats::inc(&self.stats.negative_hits);
                    return Err(FsError::NotFound);
                }
                Some(_) => true,
                None => false,
            };
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
                        return Ok(self.entry_of(ino, attr));
                    }
                }
            }
            let listed = t.listings.get(&parent).is_some_and(|l| l.complete);
            let node = t
                .inodes
                .get(&parent)
                .ok_or(FsError::UnknownInode(parent))?
                .node
                .clone();
            // What the offline branch below can answer with.
            let answerable = match known {
                Some(ino) => t.inodes.contains_key(&ino),
                // Absent, or there with its inode still held.
                None => t
                    .listings
                    .get(&parent)
                    .filter(|l| l.complete)
                    .map_or(absent_before, |l| {
                        l.names.get(name).is_none_or(|i| t.inodes.contains_key(i))
                    }),
            };
            (node, known, listed, answerable)
        };
        let (dir_node, known, listed, answerable) = dir_node;
        let g0 = self.settle_gen();
        let ask = || {
            if answerable {
                cache_can_answer(|| self.backend.lookup(&dir_node, name))
            } else {
                self.backend.lookup(&dir_node, name)
            }
        };
        if wait {
            self.wait_for_room();
        }
        let got = self.short_of_descriptors(ask, |e| e.raw_errno());
        match got {
            Ok((node, attr)) => self.remember(parent, name, node, attr, true, g0),
            Err(e) if is_unreachable(&e) => {
                // Offline: what the cache knows, however old. A name that
                // a complete listing has but whose inode is no longer held
                // is EIO, never ENOENT: it must not look deleted.
                let _ = listed;
                let mut t = self.tables();
                let in_listing = t
                    .listings
                    .get(&parent)
                    .filter(|l| l.complete)
                    .map(|l| l.names.get(name).copied());
                let ino = known.or(in_listing.flatten());
                if let Some((ino, i)) = ino.and_then(|ino| Some((ino, t.inodes.get_mut(&ino)?))) {
                    i.lookups += 1;
                    let attr = i.attr;
                    drop(t);
                    Stats::inc(&self.stats.offline_hits);
                    let mut entry = self.entry_of(ino, attr);
                    entry.attr_ttl = self.offline_ttl();
                    entry.entry_ttl = self.cfg.entry_timeout.min(OFFLINE_TTL);
                    return Ok(entry);
                }
                let absent = t.negatives.contains_key(&(parent, name.to_os_string()));
                if in_listing == Some(None) || (absent && in_listing.is_none()) {
                    Stats::inc(&self.stats.offline_hits);
                    return Err(FsError::NotFound);
                }
                Err(e.into())
            }
            Err(e) => {
                if e.raw_errno() == libc::ENOENT && !self.cfg.negative_timeout.is_zero() {
                    let mut t = self.tables();
                    t.names.remove(&(parent, name.to_os_string()));
                    if let Some(l) = t.listings.get_mut(&parent) {
                        l.names.remove(name);
                    }
                    self.note_absent(&mut t, (parent, name.to_os_string()));
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
        if i.lookups == 0 && !i.kept {
            if let Some(i) = t.inodes.remove(&ino) {
                let key = (i.parent, i.name);
                if t.names.get(&key) == Some(&ino) {
                    t.names.remove(&key);
                }
                drop(t);
                // Forgotten: if it comes back, it may be sent again.
                self.shedding
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .sent
                    .remove(&ino);
                self.backend.forget(&i.node);
            }
        }
    }

    /// Files open here whose attributes expired are asked for again: if
    /// one changed on the NAS, its cached data goes, and with it the
    /// kernel's page cache ([`DataCache::on_stale`]). This is the check
    /// the kernel makes before a read with FUSE_AUTO_INVAL_DATA, which
    /// the mount does not ask for (see `init` in fuse.rs): a reader that
    /// keeps a file open sees a change on the NAS once the attributes
    /// expire, as one that opens it again does. Called about once a
    /// second.
    pub fn revalidate_open(&self) {
        if !self.backend.online() {
            return;
        }
        let inos = self.open_inos();
        // Files with changes here show the local version: nothing to check.
        let dirty = |ino: u64| {
            self.wb
                .as_ref()
                .is_some_and(|wb| wb.is_dirty(self.fuse_ino(ino)))
        };
        let now = Instant::now();
        for ino in inos {
            let expired = self
                .tables()
                .inodes
                .get(&ino)
                .is_some_and(|i| i.attr_until <= now);
            if expired && !dirty(ino) {
                if let Err(e) = self.getattr(ino, None) {
                    log::debug!("inode {ino}: revalidating an open file: {e}");
                }
            }
        }
    }

    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> FsResult<(Attr, Duration)> {
        self.drain_settled();
        let node = {
            let t = self.tables();
            let i = t.inodes.get(&ino).ok_or(FsError::UnknownInode(ino))?;
            let now = Instant::now();
            if i.attr_until > now {
                Stats::inc(&self.stats.attr_hits);
                return Ok((self.present(i.attr), i.attr_until - now));
            }
            i.node.clone()
        };
        let file = fh.and_then(|fh| self.file_handle(fh).ok());
        let g0 = self.settle_gen();
        // The attributes last seen answer if the NAS is slow to.
        let got = cache_can_answer(|| match file {
            Some(h) => self.backend.fgetattr(&h.file),
            None => self.backend.getattr(&node),
        });
        let mut attr = match got {
            Ok(a) => a,
            Err(e) if is_unreachable(&e) => {
                // Offline: the attributes last seen.
                let t = self.tables();
                let i = t.inodes.get(&ino).ok_or(e)?;
                Stats::inc(&self.stats.offline_hits);
                return Ok((self.present(i.attr), self.offline_ttl()));
            }
            Err(e) => return Err(e.into()),
        };
        self.fresh(&node, &mut attr, g0);
        self.saw_attr(ino, &mut attr)?;
        Ok((self.present(attr), self.attr_ttl(&attr)))
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
        if let (Some(wb), FileKind::File) = (&self.wb, kind) {
            return self.setattr_local(wb, ino, fh, (&node, &data), changes, kill);
        }
        let old_size = self.cached_size(ino);
        let file = fh.and_then(|fh| self.file_handle(fh).ok());
        let file = file.as_ref().map(|h| &*h.file);
        let mut changes = *changes;
        if let (Some((who, change)), Some(cached)) = (kill, self.cached_attr(ino)) {
            // In the same call, before the size or owner changes.
            let bits = self.bits_to_clear(&cached, who, change);
            if bits != 0 {
                changes.mode = Some((cached.perm & !bits) as u32);
            }
        }
        if kind != FileKind::File && self.keeps_set(ino, &changes) {
            if let Some(r) = self.setattr_later(ino, &node, kind, &changes)? {
                Stats::inc(&self.stats.kept_changes);
                return Ok(r);
            }
        }
        let before = self.proof_base(ino, false);
        let mut attr = match self.backend.setattr(&node, file, &changes) {
            Ok(a) => {
                self.nas_took(before.as_ref(), &changes, &a);
                a
            }
            Err(e) if is_unreachable(&e) && kind != FileKind::File => {
                return self
                    .setattr_later(ino, &node, kind, &changes)?
                    .ok_or_else(|| e.into());
            }
            Err(e) => return Err(e.into()),
        };
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
                i.attr_until = Instant::now() + self.attr_ttl(&i.attr);
            }
        }
        Ok((self.present(attr), self.attr_ttl(&attr)))
    }

    /// The NAS does not answer: the mode, owner or times of a directory,
    /// symlink or special file on the NAS that the cache knows (by a name
    /// of it) are set here and on the NAS once it answers
    /// ([`Backend::set_later`]); a file's go with its data instead (see
    /// `setattr_local`). None, having done nothing, where the cache cannot
    /// tell.
    fn setattr_later(
        &self,
        ino: u64,
        node: &B::Node,
        kind: FileKind,
        changes: &SetAttr,
    ) -> FsResult<Option<(Attr, Duration)>> {
        if self.wb.is_none() || changes.size.is_some() {
            return Ok(None);
        }
        let Some((mut attr, parent, name)) = self.known_name(ino) else {
            return Ok(None);
        };
        let now = crate::clock::now();
        let at = |t: Option<SetTime>| {
            t.map(|t| match t {
                SetTime::Now => now,
                SetTime::At(t) => t,
            })
        };
        let (atime, mtime) = (at(changes.atime), at(changes.mtime));
        let changes = SetAttr {
            atime: atime.map(SetTime::At),
            mtime: mtime.map(SetTime::At),
            ..*changes
        };
        let dir = self.parent_node(parent)?;
        match self
            .backend
            .set_later((&dir, &name), node, kind, attr.validator(), &changes)
        {
            Ok(()) => {}
            Err(x) if x.raw_errno() == libc::EIO => return Ok(None),
            Err(x) => return Err(x.into()),
        }
        if let Some(m) = changes.mode {
            attr.perm = (m & 0o7777) as u16;
        }
        attr.uid = changes.uid.unwrap_or(attr.uid);
        attr.gid = changes.gid.unwrap_or(attr.gid);
        attr.atime = atime.unwrap_or(attr.atime);
        attr.mtime = mtime.unwrap_or(attr.mtime);
        attr.ctime = now;
        let mut t = self.tables();
        t.attrs_set_here.insert(ino);
        if let Some(i) = t.inodes.get_mut(&ino) {
            // (Its xattrs are still as known.)
            if let Some(c) = i.xattrs.as_mut().filter(|c| c.ctime == i.attr.ctime) {
                c.ctime = now;
            }
            i.attr = attr;
            i.attr_until = Instant::now() + self.attr_ttl(&attr);
        }
        Ok(Some((self.present(attr), self.attr_ttl(&attr))))
    }

    /// An inode's attributes as cached and a name of it that the cache
    /// still leads to it by: (attributes, directory, name).
    fn known_name(&self, ino: u64) -> Option<(Attr, u64, OsString)> {
        let t = self.tables();
        let i = t.inodes.get(&ino)?;
        let key = (i.parent, i.name.clone());
        let here = t.names.get(&key).copied().or_else(|| {
            t.listings
                .get(&i.parent)
                .and_then(|l| l.names.get(&i.name).copied())
        });
        (here == Some(ino)).then(|| (i.attr, i.parent, i.name.clone()))
    }

    /// setattr with write-back: the size and mtime of a file change
    /// locally (written back with its data), the rest on the NAS at once.
    fn setattr_local(
        &self,
        wb: &Arc<WriteBack<B>>,
        ino: u64,
        fh: Option<u64>,
        (node, data): (&B::Node, &Arc<FileData>),
        changes: &SetAttr,
        kill: Option<(&Modifier, Change)>,
    ) -> FsResult<(Attr, Duration)> {
        let nas = self.fuse_ino(ino);
        let start = || self.start_info(ino, data);
        let mut remote = *changes;
        remote.size = None;
        let owner = changes.uid.is_some() || changes.gid.is_some();
        if let (Some((who, change)), Some(cached)) = (kill, self.cached_attr(ino)) {
            // setuid/setgid go on the NAS at once, in the same call.
            let bits = self.bits_to_clear(&cached, who, change);
            if bits != 0 {
                remote.mode = Some((cached.perm & !bits) as u32);
            }
        }
        let mut local_mtime = None;
        if let Some(size) = changes.size {
            let unchanged = !wb.is_dirty(nas) && size == self.cached_size(ino);
            if !unchanged {
                let l = wb.truncate(nas, &start, size)?;
                self.store_local(ino, &l);
            }
        }
        if let Some(t) = changes.mtime {
            if wb.is_dirty(nas) {
                // The NAS gets it with the data; changing it there now
                // would look like someone else's change.
                remote.mtime = None;
                local_mtime = Some(match t {
                    SetTime::Now => crate::clock::now(),
                    SetTime::At(t) => t,
                });
            }
        }
        let has_remote = remote.mode.is_some()
            || remote.uid.is_some()
            || remote.gid.is_some()
            || remote.atime.is_some()
            || remote.mtime.is_some();
        let mut here = has_remote && self.attrs_here(wb, nas);
        let takes = |a: Attr| self.nas_takes(&a, &remote);
        let keeps = || self.defers_changes() && self.cached_attr(ino).is_some_and(takes);
        if here && self.backend.online() && !keeps() {
            // Kept behind a change kept before it (their order holds), but
            // not one the NAS may refuse: both go to it now, in order.
            wb.flush_file(nas)?;
            here = self.attrs_here(wb, nas);
        }
        let kept = has_remote && !here && self.keeps_set(ino, &remote);
        if kept || (here && self.backend.online()) {
            Stats::inc(&self.stats.kept_changes);
        }
        if here || kept {
            let cur = self.cached_attr(ino).ok_or(FsError::UnknownInode(ino))?;
            let owner = (remote.mode.is_some() || remote.uid.is_some() || remote.gid.is_some())
                .then(|| {
                    (
                        remote.mode.map_or(cur.perm, |m| (m & 0o7777) as u16),
                        remote.uid.unwrap_or(cur.uid),
                        remote.gid.unwrap_or(cur.gid),
                    )
                });
            let at = |t: SetTime| match t {
                SetTime::Now => crate::clock::now(),
                SetTime::At(t) => t,
            };
            let mtime = remote.mtime.map(at).or(local_mtime.take());
            let l = wb.set_attrs(nas, &start, owner, remote.atime.map(at), mtime)?;
            let mut t = self.tables();
            t.attrs_set_here.insert(ino);
            if let Some(i) = t.inodes.get_mut(&ino) {
                i.apply_local_attrs(&l);
            }
        } else if has_remote {
            let file = fh.and_then(|fh| self.file_handle(fh).ok());
            let file = file.as_ref().map(|h| &*h.file);
            let before = self.proof_base(ino, false);
            let mut attr = self.backend.setattr(node, file, &remote)?;
            self.nas_took(before.as_ref(), &remote, &attr);
            if let Some((who, change)) = kill.filter(|_| !owner) {
                // The cached attributes may have been out of date.
                let bits = self.bits_to_clear(&attr, who, change);
                if bits != 0 {
                    attr = self.kill_privs(node, file, &attr, bits, who)?;
                }
            }
            self.own_meta_change(ino, Some(&attr));
            let dirty = self.overlay(ino, &mut attr);
            if !dirty {
                self.data.observe(ino, data, &attr.validator())?;
            }
            let mut t = self.tables();
            if let Some(i) = t.inodes.get_mut(&ino) {
                i.attr = attr;
                i.attr_until = Instant::now() + self.attr_ttl(&i.attr);
            }
        }
        if let Some(m) = local_mtime {
            wb.set_mtime(nas, m);
        }
        let attr = {
            let mut t = self.tables();
            let i = t.inodes.get_mut(&ino).ok_or(FsError::UnknownInode(ino))?;
            if let Some(l) = wb.local_attr(nas) {
                l.apply(&mut i.attr);
            }
            i.attr
        };
        Ok((self.present(attr), self.attr_ttl(&attr)))
    }

    /// Whether attribute changes of NAS file `nas` are kept here, to set
    /// on the NAS with its data: while the NAS does not answer, or while a
    /// mode or owner set here waits for it (the order of changes holds).
    /// Not for new objects: the overlay keeps theirs.
    fn attrs_here(&self, wb: &WriteBack<B>, nas: u64) -> bool {
        (!self.backend.online() || wb.owner_here(nas)) && self.backend.local_path(nas).is_none()
    }

    /// Whether a chmod, chown or utimensat of NAS object `ino` is kept for
    /// later while the NAS answers (as a removal is, `journaled_removal`):
    /// the cache knows the object within its time to live, and the NAS
    /// would let this daemon make the change (it is root there, or owns
    /// the object and keeps its owner: otherwise the NAS's EPERM is to
    /// reach the caller now, not undo the change later).
    fn keeps_set(&self, ino: u64, changes: &SetAttr) -> bool {
        let Some(a) = self.may_keep(ino).filter(|_| changes.size.is_none()) else {
            return false;
        };
        // A file's xattrs kept here reach the NAS apart from its mode
        // (journal rows, write-back rows): a mode without write for its
        // owner could come first and refuse them.
        let unwritable = changes.mode.is_some_and(|m| m & 0o200 == 0)
            && self.tables().xattrs_set_here.contains(&ino)
            && !self
                .nas_proof
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .any_owner;
        !unwritable && self.nas_takes(&a, changes)
    }

    /// Whether the NAS is known to take `changes` of an object with
    /// attributes `attr` (see `NasProof`), and to need nothing of them
    /// before what nassync does there next.
    fn nas_takes(&self, attr: &Attr, changes: &SetAttr) -> bool {
        let proof = self.nas_proof.lock().unwrap_or_else(|e| e.into_inner());
        let owns = proof.any_owner || proof.owners.contains(&attr.uid);
        let gives_away = changes.uid.is_some_and(|u| u != attr.uid)
            || changes.gid.is_some_and(|g| g != attr.gid);
        // A mode that grants what the object lacks may be needed by the
        // NAS calls that follow it (making a file in a directory, opening
        // a file to write it back), which would come first; a directory's
        // set-group-ID bit decides the group of what is made in it.
        let grants = changes
            .mode
            .is_some_and(|m| (m & 0o777) as u16 & !attr.perm != 0);
        let setgid = changes.mode.is_some_and(|m| {
            attr.kind == FileKind::Dir && ((m & 0o7777) as u16 ^ attr.perm) & 0o2000 != 0
        });
        // Write-back opens a file to set what was kept (its owner needs
        // read permission there, before and after).
        let unreadable = attr.kind == FileKind::File
            && (attr.perm & 0o400 == 0 || changes.mode.is_some_and(|m| m & 0o400 == 0));
        owns && !setgid && (proof.any_owner || !gives_away && !grants && !unreadable)
    }

    /// The cached attributes of NAS object `ino` if a change of it may be
    /// kept for later while the NAS answers, as far as the cache and the
    /// NAS's refusals tell.
    fn may_keep(&self, ino: u64) -> Option<Attr> {
        if self.wb.is_none()
            || !self.backend.online()
            || self.backend.local_path(self.fuse_ino(ino)).is_some()
            || !self.vouch_is_fresh(ino, false)
            || !self.defers_changes()
        {
            return None;
        }
        // (And by a name that still leads to it: a file's changes are
        // kept by its path.)
        self.known_name(ino).map(|(a, _, _)| a)
    }

    /// What a change of `ino` about to go to the NAS can prove (see
    /// `nas_took`): its attributes, fresh, if it is on the NAS and the call
    /// will carry the change there (not a new object's, made here; not a
    /// directory's, whose mode waits for what is to be made in it).
    /// With `dirs`, a directory's too (for an xattr change, which it
    /// carries at once).
    fn proof_base(&self, ino: u64, dirs: bool) -> Option<Attr> {
        let a = self.cached_attr(ino)?;
        let on_nas = self.backend.local_path(self.fuse_ino(ino)).is_none();
        let carried = dirs || a.kind != FileKind::Dir;
        (on_nas && carried && self.vouch_is_fresh(ino, false)).then_some(a)
    }

    /// What a change the NAS took proves about what it lets this daemon
    /// do (see `NasProof`); `before`: the object's attributes before it.
    fn nas_took(&self, before: Option<&Attr>, changes: &SetAttr, after: &Attr) {
        let Some(b) = before else { return };
        // (A share that ignores a chmod or chown, as some SMB ones do,
        // proves nothing.)
        if changes
            .mode
            .is_some_and(|m| (m & 0o7777) as u16 != after.perm)
            || changes.uid.is_some_and(|u| u != after.uid)
            || changes.gid.is_some_and(|g| g != after.gid)
        {
            return;
        }
        let set = |t: Option<SetTime>| matches!(t, Some(SetTime::At(_)));
        if changes.mode.is_none()
            && changes.uid.is_none()
            && changes.gid.is_none()
            && !set(changes.atime)
            && !set(changes.mtime)
        {
            return; // (utimensat to now needs write access only)
        }
        let mut proof = self.nas_proof.lock().unwrap_or_else(|e| e.into_inner());
        proof.owners.insert(b.uid);
        if changes.uid.is_some_and(|u| u != b.uid) {
            proof.any_owner = true;
        }
    }

    /// Whether changes of NAS objects may be kept for later while the NAS
    /// answers: not once it refused a change in this mount (EPERM, EACCES,
    /// EROFS: a read-only export, a squashed root, an immutable file), so
    /// that its refusals reach the caller rather than undo, after the
    /// fact, what succeeded here.
    fn defers_changes(&self) -> bool {
        let refusals = self.stats.nas_refusals.load(Ordering::Relaxed);
        if refusals > 0 && !self.refusal_noted.swap(true, Ordering::Relaxed) {
            log::warn!(
                "the NAS refused a change: from now on, changes of objects on the NAS go to it \
                 at once while it answers"
            );
        }
        refusals == 0
            && self.backend.defers_removals()
            && self.backend.changes_kept() < MAX_KEPT_CHANGES
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

    /// With write-back, before a local write or fallocate: clears on the
    /// NAS the bits the cached attributes say must go (files with neither
    /// bit cost nothing).
    fn kill_privs_local(&self, ino: u64, file: &B::File, who: &Modifier) -> FsResult<()> {
        let Some(cached) = self.cached_attr(ino) else {
            return Ok(());
        };
        let bits = self.bits_to_clear(&cached, who, Change::Data);
        if bits == 0 {
            return Ok(());
        }
        let (node, _, data) = self.node(ino)?;
        let nas = self.fuse_ino(ino);
        if let Some(wb) = &self.wb {
            if self.attrs_here(wb, nas) {
                // As a chmod made here (see `setattr_local`).
                let owner = (cached.perm & !bits, cached.uid, cached.gid);
                let start = || self.start_info(ino, &data);
                let l = wb.set_attrs(nas, &start, Some(owner), None, None)?;
                self.store_local(ino, &l);
                self.tables().attrs_set_here.insert(ino);
                return Ok(());
            }
        }
        let mut attr = self.kill_privs(&node, Some(file), &cached, bits, who)?;
        self.own_meta_change(ino, Some(&attr));
        self.overlay(ino, &mut attr);
        if let Some(i) = self.tables().inodes.get_mut(&ino) {
            i.attr = attr;
        }
        Ok(())
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
        match self.backend.readlink(&node) {
            Ok(target) => {
                if let Some(i) = self.tables().inodes.get_mut(&ino) {
                    i.target = Some(target.clone());
                }
                Ok(target)
            }
            Err(e) if is_unreachable(&e) => {
                let t = self.tables();
                let target = t.inodes.get(&ino).and_then(|i| i.target.clone());
                target.ok_or(FsError::Backend(e))
            }
            Err(e) => Err(e.into()),
        }
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
            // Offline, or the NAS slow to answer where the name is known
            // absent (the creation does not wait for it then): taken as
            // none (the overlay does the same), and asked again next time.
            let got = where_name_known_absent(|| {
                self.backend
                    .getxattr(dir, OsStr::new("system.posix_acl_default"))
            });
            if got.as_ref().is_err_and(is_unreachable) {
                return false;
            }
            let has = got.is_ok_and(|v| !v.is_empty());
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
        let (node, attr) = self.creating(parent, name, || {
            let mode = self.creation_mode(parent, &dir, mode, creds);
            self.backend.mknod(&dir, name, mode, rdev, creds)
        })?;
        self.added_name(parent);
        self.remember(parent, name, node, attr, true, self.settle_gen())
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, creds: Creds) -> FsResult<Entry> {
        let dir = self.parent_node(parent)?;
        let (node, attr) = self.creating(parent, name, || {
            let mode = self.creation_mode(parent, &dir, mode, creds);
            self.backend.mkdir(&dir, name, mode, creds)
        })?;
        let ino = self.fuse_ino(attr.ino);
        {
            let mut t = self.tables();
            self.expire_attr(&mut t, parent);
            Self::subdirs_changed(&mut t, parent, 1);
            // A new directory is empty: its listing is known.
            t.listings.insert(
                ino,
                Listing {
                    names: HashMap::new(),
                    kinds: HashMap::new(),
                    until: Instant::now() + self.cfg.entry_timeout,
                    complete: true,
                },
            );
        }
        let entry = self.remember(parent, name, node, attr, true, self.settle_gen())?;
        // Made where there is no default ACL: it has none either.
        let mut t = self.tables();
        if t.inodes.get(&parent).and_then(|i| i.default_acl) == Some(false) {
            if let Some(i) = t.inodes.get_mut(&ino) {
                i.default_acl = Some(false);
            }
        }
        drop(t);
        Ok(entry)
    }

    /// Runs the creation `f` of `name` in `parent`; where a listing held
    /// whole, or the last lookup of the name (a negative entry, however
    /// old), says it is absent, the NAS's word on that waits at most
    /// `PATIENCE` (see `name_absent_here`), as for a lookup.
    fn creating<T>(&self, parent: u64, name: &OsStr, f: impl FnOnce() -> T) -> T {
        let absent = {
            let t = self.tables();
            match t.listings.get(&parent) {
                Some(l) if l.complete => !l.names.contains_key(name),
                _ => t.negatives.contains_key(&(parent, name.to_os_string())),
            }
        };
        if absent { name_absent_here(f) } else { f() }
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &OsStr,
        creds: Creds,
    ) -> FsResult<Entry> {
        let dir = self.parent_node(parent)?;
        let (node, attr) = self.creating(parent, name, || {
            self.backend.symlink(&dir, name, target, creds)
        })?;
        self.added_name(parent);
        self.remember(parent, name, node, attr, true, self.settle_gen())
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> FsResult<Entry> {
        let (node, _, _) = self.node(ino)?;
        let dir = self.parent_node(newparent)?;
        if let Some((attr, at)) = self.journaled_link(ino, &node, (newparent, &dir), newname) {
            let mut t = self.tables();
            self.changed_here(&mut t, newparent, Some(at));
            drop(t);
            return self.remember(newparent, newname, node, attr, true, self.settle_gen());
        }
        let attr = match self.backend.link(&node, &dir, newname) {
            Ok(attr) => {
                self.own_meta_change(ino, Some(&attr));
                attr
            }
            Err(e) if is_unreachable(&e) => {
                let attr = self.link_later(ino, &node, (newparent, &dir), newname, e)?;
                // Not those attributes (made here): the NAS's ctime moves
                // only once the link is made there (see `Overlay::own_ctime`).
                if let Some(wb) = &self.wb {
                    wb.own_meta_op(self.fuse_ino(ino));
                }
                // The ctime shown moved by this link alone: the cached data
                // is still the file's (and all there is while offline).
                if let Ok((_, FileKind::File, data)) = self.node(ino) {
                    if let Err(e) = self.data.own_ctime(ino, &data, &attr.validator()) {
                        log::warn!("cache: {e}");
                    }
                }
                attr
            }
            Err(e) => return Err(e.into()),
        };
        self.added_name(newparent);
        self.remember(newparent, newname, node, attr, true, self.settle_gen())
    }

    /// A change kept for later (a rename, a link) was made on the NAS and
    /// moved the ctime of file `shown` (the NAS inode number, as shown) to
    /// `attr`'s: the data cached is still the NAS's version, as when such
    /// a change goes to the NAS at once (`own_meta_change`).
    pub fn own_ctime_on_nas(&self, shown: u64, attr: &Attr) {
        let ino = self.fuse_ino(shown);
        let data = self
            .tables()
            .inodes
            .get(&ino)
            .filter(|i| i.kind == FileKind::File)
            .map(|i| i.data.clone());
        if let Some(data) = data {
            if let Err(e) = self.data.own_ctime(ino, &data, &attr.validator()) {
                log::warn!("cache: {e}");
            }
        }
    }

    /// A hard link to a file on the NAS that the cache vouches for (as
    /// `journaled_removal`), under a name it knows free, goes into the
    /// journal as offline (`link_later`) and returns at local speed: its
    /// attributes, and the time its new directory changed. The file's
    /// ctime is the NAS's until the link is made there (it moves then, as
    /// the view shows it: a ctime shown here first would go back once the
    /// attributes expire, and drop the cached data). None (nothing done)
    /// when the NAS is to be asked.
    fn journaled_link(
        &self,
        ino: u64,
        node: &B::Node,
        (newparent, newdir): (u64, &B::Node),
        newname: &OsStr,
    ) -> Option<(Attr, SystemTime)> {
        let wb = self.wb.as_ref()?;
        if !self.defers_changes() {
            return None;
        }
        self.drain_settled();
        let nas = self.fuse_ino(ino);
        // (`same_fs`, as for renames: the file's directory, as known.)
        let (_, parent, _) = self.known_name(ino)?;
        if !self
            .backend
            .same_fs(&self.parent_node(parent).ok()?, newdir)
        {
            return None;
        }
        if self.backend.local_path(nas).is_some()
            || wb.is_dirty(nas)
            || !self.vouch_is_fresh(ino, false)
            || !self.vouch_free(newparent, newname)
        {
            return None;
        }
        let ctime = self.cached_attr(ino)?.ctime;
        let e = BackendError::errno("link", libc::EIO);
        let mut attr = self
            .link_later(ino, node, (newparent, newdir), newname, e)
            .ok()?;
        Stats::inc(&self.stats.kept_changes);
        let at = std::mem::replace(&mut attr.ctime, ctime);
        Some((attr, at))
    }

    /// The NAS does not answer: a hard link to a file on the NAS that the
    /// cache knows (by a name of it), to a name it vouches for, is made
    /// here and on the NAS once it answers ([`Backend::move_later`]).
    /// `e`, the NAS's error, where the cache cannot tell.
    fn link_later(
        &self,
        ino: u64,
        node: &B::Node,
        (newparent, newdir): (u64, &B::Node),
        newname: &OsStr,
        e: BackendError,
    ) -> FsResult<Attr> {
        if self.backend.local_path(self.fuse_ino(ino)).is_some() {
            return Err(e.into());
        }
        let (mut attr, parent, name) = match self.known_name(ino) {
            Some(x) if x.0.kind != FileKind::Dir => x,
            _ => return Err(e.into()),
        };
        if self.known_child(newparent, newname).is_some() {
            return Err(BackendError::errno("link", libc::EEXIST).into());
        }
        let dir = self.parent_node(parent)?;
        let was = attr.validator();
        let at = crate::clock::now();
        match self.backend.move_later(
            (&dir, &name),
            (newdir, newname),
            (node, attr.kind, was),
            None,
            true,
            at,
        ) {
            Ok(()) => {}
            Err(x) if x.raw_errno() == libc::EIO => return Err(e.into()),
            Err(x) => return Err(x.into()),
        }
        attr.nlink += 1;
        attr.ctime = at;
        Ok(attr)
    }

    /// Removes `name` (rmdir or unlink): kept for later when the cache
    /// vouches for it (`journaled_removal`), else on the NAS, else, while
    /// the NAS does not answer, kept for later if it can be
    /// (`remove_later`). When kept, the time its directory changed.
    fn remove(
        &self,
        parent: u64,
        dir: &B::Node,
        name: &OsStr,
        rmdir: bool,
    ) -> FsResult<Option<SystemTime>> {
        if let Some(at) = self.journaled_removal(parent, dir, name, rmdir)? {
            return Ok(Some(at));
        }
        let r = match rmdir {
            true => self.backend.rmdir(dir, name),
            false => self.backend.unlink(dir, name),
        };
        match r {
            Ok(()) => Ok(None),
            Err(e) if is_unreachable(&e) => {
                Ok(Some(self.remove_later(parent, dir, name, rmdir, e)?))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let dir = self.parent_node(parent)?;
        let victim = self.known_child(parent, name);
        self.flush_before_link_goes(&victim)?;
        // Until `link_removed` below has told write-back.
        let _mark = match (&victim, &self.wb) {
            (Some((ino, _)), Some(wb)) => Some(wb.unlinking(self.fuse_ino(*ino))),
            _ => None,
        };
        let links = Self::links_of(&self.tables(), parent, name);
        let later = self.remove(parent, &dir, name, false)?;
        let open = victim.as_ref().is_some_and(|(ino, _)| self.is_open(*ino));
        {
            let mut t = self.tables();
            Self::link_dropped(&mut t, links);
            self.forget_name(&mut t, parent, name, true);
            if let Some((ino, _, _)) = links.filter(|l| l.1 > 1) {
                Self::name_went(&mut t, ino, parent, name);
            }
            self.changed_here(&mut t, parent, later);
            // The NAS may keep an open file under a hidden name (nfs://)
            // until it is closed: its directory may not be empty there.
            if let (None, true, Some((ino, _))) = (later, open, &victim) {
                t.open_unlinked.insert(*ino, parent);
            }
        }
        let later = later.is_some();
        match (victim, &self.wb) {
            // Its only link (see `remove_later`), whatever the NAS says
            // if it answers again meanwhile.
            (Some((ino, _)), Some(wb)) if later => {
                wb.unlinked(self.fuse_ino(ino), self.is_open(ino))
            }
            (Some(v), _) => self.link_removed(v),
            _ => {}
        }
        Ok(())
    }

    /// The `user.*` extended attributes of `node`, names and values,
    /// sorted (none where the backend keeps none); None where it cannot
    /// tell. (Only those: a new file here has no others, and a NAS file's
    /// security label or NFSv4 ACL would be the NAS's to give it anyway.)
    fn user_xattrs_of(&self, node: &B::Node) -> Option<Vec<(OsString, Vec<u8>)>> {
        use std::os::unix::ffi::OsStrExt;
        let list = match self.backend.listxattr(node) {
            Ok(l) => l,
            Err(e) if e.raw_errno() == libc::EOPNOTSUPP => return Some(Vec::new()),
            Err(_) => return None,
        };
        let mut out = Vec::new();
        let names = list.split(|&b| b == 0);
        for n in names.filter(|n| n.starts_with(b"user.")) {
            let name = OsStr::from_bytes(n);
            match self.backend.getxattr(node, name) {
                Ok(v) => out.push((name.to_os_string(), v)),
                Err(e) if e.raw_errno() == libc::ENODATA => {}
                Err(_) => return None,
            }
        }
        out.sort();
        Some(out)
    }

    /// A file written from scratch renamed over an existing file (how
    /// editors save): rather than replace the NAS file, write-back writes
    /// the new content into it as a delta (see [`WriteBack::retarget`]),
    /// and only the temporary name goes from the NAS. Returns false, having
    /// changed nothing, when the rename does not qualify: the new file must
    /// be all local and closed, the old one a regular file with one link
    /// and nothing pending, open nowhere on this machine, with the new
    /// file's mode and user xattrs (else the rename goes to the NAS as
    /// usual).
    #[allow(clippy::too_many_arguments)]
    fn save_over(
        &self,
        dir: &B::Node,
        name: &OsStr,
        src: u64,
        (dst, dst_node): &(u64, B::Node),
        dst_path: &OsStr,
        newparent: u64,
        newname: &OsStr,
    ) -> FsResult<bool> {
        let Some(wb) = &self.wb else { return Ok(false) };
        let (src_nas, dst_nas) = (self.fuse_ino(src), self.fuse_ino(*dst));
        // An open replaced file keeps its old content for whoever has it
        // open, as on a local filesystem: then the rename goes to the NAS.
        if src == *dst
            || !wb.is_dirty(src_nas)
            || wb.is_dirty(dst_nas)
            || self.is_open(src)
            || self.is_open(*dst)
        {
            return Ok(false);
        }
        let (src_kind, src_links, src_perm, src_node, dst_data) = {
            let t = self.tables();
            let (Some(si), Some(di)) = (t.inodes.get(&src), t.inodes.get(dst)) else {
                return Ok(false);
            };
            let (kind, nlink, perm) = (si.kind, si.attr.nlink, si.attr.perm);
            (kind, nlink, perm, si.node.clone(), di.data.clone())
        };
        if src_kind != FileKind::File || src_links != 1 {
            return Ok(false);
        }
        // The file to be replaced, as the NAS has it now. The result of a
        // rename has the new file's mode: a delta keeps the old file's, so
        // only when they are the same (editors make them so). The owner is
        // the old file's (docs/SEMANTICS.md).
        let attr = match self.backend.getattr(dst_node) {
            Ok(a) if a.kind == FileKind::File && a.nlink == 1 && a.perm == src_perm => a,
            _ => return Ok(false),
        };
        // Nor its user xattrs (the new file's own would be lost).
        match (
            self.user_xattrs_of(&src_node),
            self.user_xattrs_of(dst_node),
        ) {
            (Some(a), Some(b)) if a == b => {}
            _ => return Ok(false),
        }
        let start = Start {
            fuse_ino: *dst,
            node: dst_node.clone(),
            path: dst_path.to_os_string(),
            base: attr.validator(),
            data: dst_data.clone(),
            owner: (attr.perm, attr.uid, attr.gid),
            nlink: attr.nlink,
        };
        // Atomic with write-back: if it has started on the file, the
        // rename goes to the NAS as usual.
        if !wb.retarget(src_nas, start, dst_nas)? {
            return Ok(false);
        }
        // The content is safe in the journal under the old file's name; the
        // temporary name goes from the NAS (if that fails, it stays there,
        // an empty or partial stray file, and nothing is lost).
        if let Err(e) = self.backend.unlink(dir, name) {
            log::warn!("save over {dst_path:?}: could not remove {name:?} from the NAS: {e}");
        }
        log::debug!("save over {dst_path:?}: written back as a delta into the existing file");
        let mut t = self.tables();
        let t = &mut *t;
        self.forget_name(t, newparent, newname, false);
        let parent_of_src = t.inodes.get(&src).map(|i| i.parent);
        if let Some(p) = parent_of_src {
            self.forget_name(t, p, name, true);
        }
        // The name is the kernel's inode for the new file, which now
        // reaches the NAS's file: the kernel forgets the old file's inode
        // (it was replaced), and an unlink or rename of the name that
        // follows without a lookup must still find the pending changes.
        t.names.insert((newparent, newname.to_os_string()), src);
        if let Some(l) = t.listings.get_mut(&newparent) {
            l.names.insert(newname.to_os_string(), src);
            l.kinds.insert(src, FileKind::File);
        }
        let now = Instant::now();
        if let Some(i) = t.inodes.get_mut(&src) {
            i.node = dst_node.clone();
            i.data = dst_data;
            i.parent = newparent;
            i.name = newname.to_os_string();
            i.attr_until = now;
        }
        if let Some(i) = t.inodes.get_mut(dst) {
            i.attr_until = now;
        }
        Ok(true)
    }

    /// The NAS does not answer: an unlink or rmdir (`rmdir`) of what the
    /// cache knows is kept by the backend to apply once it answers (see
    /// [`Backend::remove_later`]). `e`, the NAS's error, where the cache
    /// cannot tell: a name it does not know, a directory not listed whole,
    /// a file with other links (whose count could not be shown right).
    fn remove_later(
        &self,
        parent: u64,
        dir: &B::Node,
        name: &OsStr,
        rmdir: bool,
        e: BackendError,
    ) -> FsResult<SystemTime> {
        let (node, kind, was) = match self.vouch_removal(parent, name, rmdir) {
            Ok(v) => v,
            Err(Some(x)) => return Err(x),
            Err(None) => return Err(e.into()),
        };
        let at = crate::clock::now();
        match self.backend.remove_later(dir, name, (&node, kind, was), at) {
            Ok(()) => Ok(at),
            // The backend keeps no such view: the NAS's error.
            Err(x) if x.raw_errno() == libc::EIO => Err(e.into()),
            Err(x) => Err(x.into()),
        }
    }

    /// An unlink or rmdir of an object on the NAS that the cache vouches
    /// for (see `vouch_removal`) goes into the journal, as offline, and
    /// returns at local speed: the replay makes it on the NAS after the
    /// write-back delay (before any other change of the NAS's namespace
    /// needs it), unless the object changed there meanwhile (a conflict,
    /// as offline). When it did, the time its directory changed; None
    /// (nothing done) when the cache cannot vouch: the NAS is asked.
    fn journaled_removal(
        &self,
        parent: u64,
        dir: &B::Node,
        name: &OsStr,
        rmdir: bool,
    ) -> FsResult<Option<SystemTime>> {
        let Some(wb) = &self.wb else { return Ok(None) };
        if !self.defers_changes() {
            return Ok(None);
        }
        // Attributes cached here from before a write-back that just ended
        // are not the NAS's version to remove.
        self.drain_settled();
        // A new object goes at local speed anyway. An open file stays
        // where the NAS keeps open unlinked files (nfs://: a hidden name,
        // which its directory's rmdir must see), and one with changes
        // pending is removed with them: both go to the NAS at once.
        let ino = match self.known_child(parent, name) {
            Some((ino, _)) if self.backend.local_path(self.fuse_ino(ino)).is_none() => ino,
            _ => return Ok(None),
        };
        if self.is_open(ino) || wb.is_dirty(self.fuse_ino(ino)) || !self.vouch_is_fresh(ino, rmdir)
        {
            return Ok(None);
        }
        let (node, kind, was) = match self.vouch_removal(parent, name, rmdir) {
            Ok(v) => v,
            Err(_) => return Ok(None),
        };
        let at = crate::clock::now();
        match self.backend.remove_later(dir, name, (&node, kind, was), at) {
            // Opened meanwhile (the kernel does not hold an open off an
            // unlink): as an open file, it goes to the NAS at once.
            Ok(()) if !rmdir && self.is_open(ino) => {
                self.backend.undo_remove_later(dir, name);
                Ok(None)
            }
            Ok(()) => {
                Stats::inc(&self.stats.kept_changes);
                Ok(Some(at))
            }
            Err(_) => Ok(None),
        }
    }

    /// A rename of a file or symlink on the NAS that the cache vouches for
    /// (as `journaled_removal`), to a name it vouches for (free, or a NAS
    /// object it could remove), goes into the journal, as offline, and
    /// returns at local speed: the replay makes it on the NAS after the
    /// write-back delay, before any other change of the NAS needs it. When
    /// kept, the time its directories changed; None (nothing done) when
    /// the NAS is to be asked.
    /// Directories go to the NAS at once: what is under them is written
    /// back by path.
    fn journaled_rename(
        &self,
        (dir, name): (&B::Node, &OsStr),
        (newparent, newdir, newname): (u64, &B::Node, &OsStr),
        flags: RenameFlags,
        moved: &Option<(u64, B::Node)>,
        replaced: &Option<(u64, B::Node)>,
    ) -> Option<SystemTime> {
        let Some(wb) = &self.wb else { return None };
        let Some((s, s_node)) = moved else {
            return None;
        };
        // Between filesystems (a snapshot directory, a filesystem mounted
        // in the share) the NAS refuses it (EXDEV): mv is to copy at once.
        if flags.exchange || !self.defers_changes() || !self.backend.same_fs(dir, newdir) {
            return None;
        }
        self.drain_settled();
        // New objects move here anyway; open files and those with changes
        // pending go at once, as for removals.
        let kept_back = |i: u64| {
            self.backend.local_path(self.fuse_ino(i)).is_some()
                || self.is_open(i)
                || wb.is_dirty(self.fuse_ino(i))
                || !self.vouch_is_fresh(i, false)
        };
        if kept_back(*s) {
            return None;
        }
        let (kind, was) = match self.tables().inodes.get(s) {
            Some(i) if i.kind != FileKind::Dir => (i.kind, i.attr.validator()),
            _ => return None,
        };
        let over = match replaced {
            // (A rename onto another link of itself does nothing.)
            Some((r, _)) if r == s || flags.noreplace || kept_back(*r) => return None,
            Some(_) => match self.vouch_removal(newparent, newname, false) {
                Ok(v) => Some(v),
                Err(_) => return None,
            },
            None if self.vouch_free(newparent, newname) => None,
            None => return None,
        };
        let over = over.as_ref().map(|(n, k, w)| (n, *k, *w));
        let at = crate::clock::now();
        let obj = (s_node, kind, was);
        self.backend
            .move_later((dir, name), (newdir, newname), obj, over, false, at)
            .ok()?;
        Stats::inc(&self.stats.kept_changes);
        Some(at)
    }

    /// Whether the cache vouches that `name` is free in `parent`, within
    /// the time to live of the negative entries.
    fn vouch_free(&self, parent: u64, name: &OsStr) -> bool {
        let t = self.tables();
        let now = Instant::now();
        let key = (parent, name.to_os_string());
        if t.names.contains_key(&key) {
            return false;
        }
        let negative = t.negatives.get(&key).is_some_and(|u| *u > now);
        let unlisted = !self.cfg.negative_timeout.is_zero()
            && t.listings
                .get(&parent)
                .is_some_and(|l| l.complete && l.until > now && !l.names.contains_key(name));
        negative || unlisted
    }

    /// Whether what the cache knows of `ino` is still within its time to
    /// live, as a kernel NFS client would trust it: its attributes (a
    /// link count, a version) and, for a directory, its listing. Older,
    /// the NAS is asked. (Its name is the kernel's, as fresh as the
    /// entry's time to live.)
    fn vouch_is_fresh(&self, ino: u64, dir: bool) -> bool {
        let t = self.tables();
        let now = Instant::now();
        let known = t.inodes.get(&ino).is_some_and(|i| i.attr_until > now);
        let listed = |d: u64| {
            t.listings
                .get(&d)
                .is_some_and(|l| l.complete && l.until > now)
        };
        let hides = || t.open_unlinked.values().any(|d| *d == ino);
        known && (!dir || listed(ino) && !hides())
    }

    /// What the cache vouches for of `name` in `parent`, to remove it
    /// while the NAS does not answer: its node, kind and the NAS version
    /// to remove. Err(None) where it cannot tell (see `remove_later`).
    fn vouch_removal(
        &self,
        parent: u64,
        name: &OsStr,
        rmdir: bool,
    ) -> Result<(B::Node, FileKind, Validator), Option<FsError>> {
        let op = if rmdir { "rmdir" } else { "unlink" };
        let errno = |n| Err(Some(BackendError::errno(op, n).into()));
        let (ino, kind, mut was, node) = {
            let t = self.tables();
            let listing = t.listings.get(&parent).filter(|l| l.complete);
            let known = t
                .names
                .get(&(parent, name.to_os_string()))
                .copied()
                .or_else(|| listing.and_then(|l| l.names.get(name).copied()));
            let Some(ino) = known else {
                return Err(listing.map(|_| FsError::NotFound));
            };
            let Some(i) = t.inodes.get(&ino) else {
                return Err(None);
            };
            match (rmdir, i.kind == FileKind::Dir) {
                (true, false) => return errno(libc::ENOTDIR),
                (false, true) => return errno(libc::EISDIR),
                (false, false) if i.attr.nlink > 1 => return Err(None),
                (true, true) => match t.listings.get(&ino) {
                    Some(l) if l.complete && !l.names.is_empty() => return errno(libc::ENOTEMPTY),
                    Some(l) if l.complete => {}
                    _ => return Err(None),
                },
                _ => {}
            }
            (ino, i.kind, i.attr.validator(), i.node.clone())
        };
        // Changes pending: the NAS has the version they started from,
        // unless an attempt to write them back did not finish.
        match self.wb.as_ref().and_then(|wb| wb.base(self.fuse_ino(ino))) {
            Some(Some(base)) => was = base,
            Some(None) => return Err(None),
            None => {}
        }
        Ok((node, kind, was))
    }

    /// The inode `name` in `parent` leads to, if known (with its node).
    fn known_child(&self, parent: u64, name: &OsStr) -> Option<(u64, B::Node)> {
        self.wb.as_ref()?;
        let t = self.tables();
        let ino = Self::ino_at(&t, parent, name)?;
        Some((ino, t.inodes.get(&ino)?.node.clone()))
    }

    /// A name of `victim` was removed on the NAS (unlink, or replaced by a
    /// rename): if it was the last, its pending changes have nowhere to go.
    /// Before a name of a file on the NAS with other links goes (an unlink,
    /// a rename over it): its changes still to write back go first. Their
    /// row finds the file by a path, maybe this name; after a crash the
    /// row would lead nowhere, and what it holds would be lost.
    fn flush_before_link_goes(&self, victim: &Option<(u64, B::Node)>) -> FsResult<()> {
        let (Some((ino, _)), Some(wb)) = (victim, &self.wb) else {
            return Ok(());
        };
        let nas = self.fuse_ino(*ino);
        let links = self.cached_attr(*ino).map_or(0, |a| a.nlink);
        if links > 1 && wb.is_dirty(nas) && self.backend.local_path(nas).is_none() {
            wb.flush_file(nas)?;
        }
        Ok(())
    }

    fn link_removed(&self, (ino, node): (u64, B::Node)) {
        let Some(wb) = &self.wb else { return };
        let nas = self.fuse_ino(ino);
        let open = self.is_open(ino);
        if !wb.is_dirty(nas) && !open {
            return;
        }
        match self.backend.getattr(&node) {
            Ok(a) if a.nlink > 0 => wb.meta_changed(nas, &a),
            _ => wb.unlinked(nas, self.is_open(ino)),
        }
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let dir = self.parent_node(parent)?;
        let later = self.remove(parent, &dir, name, true)?;
        let mut t = self.tables();
        if let Some(ino) = t.names.get(&(parent, name.to_os_string())).copied() {
            t.listings.remove(&ino);
        }
        Self::subdirs_changed(&mut t, parent, -1);
        self.forget_name(&mut t, parent, name, true);
        self.changed_here(&mut t, parent, later);
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
        let moved = self.known_child(parent, name);
        let replaced = self.known_child(newparent, newname);
        if !flags.exchange && moved.as_ref().map(|m| m.0) != replaced.as_ref().map(|r| r.0) {
            self.flush_before_link_goes(&replaced)?;
        }
        let replaced_links = Self::links_of(&self.tables(), newparent, newname);
        // A write-back attempt that finds either gone from its path meanwhile
        // must not restore it (see `WriteBack::unlinking`).
        let _marks: Vec<_> = match &self.wb {
            Some(wb) => [&moved, &replaced]
                .into_iter()
                .flatten()
                .map(|(ino, _)| wb.unlinking(self.fuse_ino(*ino)))
                .collect(),
            None => Vec::new(),
        };
        let paths = self.wb.as_ref().and_then(|_| {
            Some((
                self.child_path(parent, name)?,
                self.child_path(newparent, newname)?,
            ))
        });
        if let (Some((s, _)), Some(d), Some((_, dst_path)), false, false) =
            (&moved, &replaced, &paths, flags.exchange, flags.noreplace)
        {
            if self.save_over(&dir, name, *s, d, dst_path, newparent, newname)? {
                return Ok(());
            }
        }
        // Rows of pending changes note the new path first: a crash between
        // the rename and the rows' update must not lose the file.
        if let (Some(wb), Some((old, new)), false) = (&self.wb, &paths, flags.exchange) {
            wb.renaming(old, new);
        }
        // The rename moves the file's ctime: a write-back attempt that
        // looks at it before `own_meta_change` below must know it is ours.
        if let (Some(wb), Some((ino, _))) = (&self.wb, &moved) {
            wb.own_meta_op(self.fuse_ino(*ino));
        }
        let kept = match self.rename_or_later(
            (&dir, name),
            (newparent, &newdir, newname),
            flags,
            &moved,
            &replaced,
        ) {
            Ok(kept) => kept,
            Err(e) => {
                if let (Some(wb), Some((old, _))) = (&self.wb, &paths) {
                    wb.rename_failed(old);
                }
                return Err(e);
            }
        };
        if let (Some((ino, _)), None) = (&moved, kept) {
            // rename changes the ctime (before the rows drop the rename in
            // flight: until then, a ctime moved is known to be this one).
            // (A rename kept for later moves it when made there, see
            // `Overlay::own_ctime`.)
            self.own_meta_change(*ino, None);
        }
        if let (Some(wb), Some((old, new))) = (&self.wb, &paths) {
            if flags.exchange {
                // Through a temporary name, so that the two swap.
                let tmp = OsString::from("\0nassync-exchange");
                wb.renamed(old, &tmp);
                wb.renamed(new, old);
                wb.renamed(&tmp, new);
            } else {
                wb.renamed(old, new);
            }
        }
        if let (Some(r), false) = (replaced, flags.exchange) {
            if moved.as_ref().map(|m| m.0) != Some(r.0) {
                // As an unlink of an open file (see `unlink`).
                if self.is_open(r.0) {
                    self.tables().open_unlinked.insert(r.0, newparent);
                }
                self.link_removed(r);
            }
        }
        let mut t = self.tables();
        let t = &mut *t;
        let src_key = (parent, name.to_os_string());
        let dst_key = (newparent, newname.to_os_string());
        let src = Self::ino_at(t, parent, name);
        let dst = Self::ino_at(t, newparent, newname);
        let is_dir = |t: &Tables<B>, ino: Option<u64>| {
            ino.and_then(|i| t.inodes.get(&i))
                .is_some_and(|i| i.kind == FileKind::Dir)
        };
        if !flags.exchange && is_dir(t, src) {
            if parent != newparent {
                Self::subdirs_changed(t, parent, -1);
                if !is_dir(t, dst) {
                    Self::subdirs_changed(t, newparent, 1);
                }
            } else if dst != src && is_dir(t, dst) {
                // The directory it replaced is gone.
                Self::subdirs_changed(t, parent, -1);
            }
        }
        if flags.exchange && parent != newparent {
            // A directory swapped with what is not one moves a link.
            let d = i32::from(is_dir(t, src)) - i32::from(is_dir(t, dst));
            if d != 0 {
                Self::subdirs_changed(t, parent, -d);
                Self::subdirs_changed(t, newparent, d);
            }
        }
        // A rename kept for later leaves the NAS's object as it was: what
        // is known of it stays good for its time (a second mv of it is
        // kept too).
        let src_until = kept
            .and(src)
            .and_then(|i| t.inodes.get(&i))
            .map(|i| i.attr_until);
        // The replaced or exchanged inode changed (link count, ctime).
        if !flags.exchange && dst != src {
            Self::link_dropped(t, replaced_links);
        }
        self.forget_name(t, newparent, newname, false);
        self.forget_name(t, parent, name, !flags.exchange);
        let other_links = replaced_links.filter(|l| l.1 > 1 && Some(l.0) != src);
        if let (Some((d, _, _)), false) = (other_links, flags.exchange) {
            Self::name_went(t, d, newparent, newname);
        }
        self.changed_here(t, parent, kept);
        self.changed_here(t, newparent, kept);
        let place = |t: &mut Tables<B>, ino: Option<u64>, key: &(u64, OsString)| {
            let Some(ino) = ino else { return };
            t.negatives.remove(key);
            t.names.insert(key.clone(), ino);
            let kind = t.inodes.get(&ino).map(|i| i.kind);
            if let Some(l) = t.listings.get_mut(&key.0) {
                l.names.insert(key.1.clone(), ino);
                // (Moved from another directory: its kind, for a listing
                // served from the cache once the kernel forgets it.)
                if let Some(k) = kind {
                    l.kinds.insert(ino, k);
                }
            }
            if let Some(i) = t.inodes.get_mut(&ino) {
                i.parent = key.0;
                i.name = key.1.clone();
                i.attr_until = Instant::now();
            }
        };
        place(t, src, &dst_key);
        if let (Some(until), Some(i)) = (src_until, src.and_then(|i| t.inodes.get_mut(&i))) {
            i.attr_until = until;
        }
        if flags.exchange {
            place(t, dst, &src_key);
        }
        if src.is_none() {
            // Not known under its old name: the new name's listing entry is
            // unknown too.
            if let Some(l) = t.listings.get_mut(&newparent) {
                l.until = Instant::now();
                l.complete = false;
            }
        }
        Ok(())
    }

    /// The backend's rename. Offline, an object the cache knows moved to a
    /// name it vouches for (an editor's save through a temporary file, a
    /// `mv`, made while the NAS is away): a NAS object there is removed
    /// here (and from the NAS once it answers, see [`Core::remove_later`]);
    /// then a new object is moved here, the backend told the name is free,
    /// and an object on the NAS is renamed here and there once it answers
    /// ([`Backend::move_later`]).
    fn rename_or_later(
        &self,
        (dir, name): (&B::Node, &OsStr),
        (newparent, newdir, newname): (u64, &B::Node, &OsStr),
        flags: RenameFlags,
        moved: &Option<(u64, B::Node)>,
        replaced: &Option<(u64, B::Node)>,
    ) -> FsResult<Option<SystemTime>> {
        let kept = self.journaled_rename(
            (dir, name),
            (newparent, newdir, newname),
            flags,
            moved,
            replaced,
        );
        if kept.is_some() {
            return Ok(kept);
        }
        let e = match self.backend.rename(dir, name, newdir, newname, flags) {
            Ok(()) => return Ok(None),
            Err(e) if is_unreachable(&e) && !flags.exchange => e,
            Err(e) => return Err(e.into()),
        };
        let local = |i: u64| self.backend.local_path(self.fuse_ino(i)).is_some();
        let Some((s, s_node)) = moved else {
            return Err(e.into());
        };
        // An object on the NAS, as the cache knows it.
        let nas_src = match local(*s) {
            true => None,
            false => {
                let t = self.tables();
                match t.inodes.get(s) {
                    Some(i) => Some((i.kind, i.attr.validator())),
                    None => return Err(e.into()),
                }
            }
        };
        let mut removed_first = false;
        // A NAS object there, removed with the rename (one journal commit).
        let mut over = None;
        match replaced {
            Some((r, _)) if r == s => return Ok(None),
            // A new object over another: the backend moves it over that one.
            Some((r, _)) if local(*r) && nas_src.is_none() => return Err(e.into()),
            Some((r, _)) => {
                if flags.noreplace {
                    return Err(BackendError::errno("rename", libc::EEXIST).into());
                }
                let kind = |i: u64| self.tables().inodes.get(&i).map(|x| x.kind);
                let dir_kind = Some(FileKind::Dir);
                let (sd, rd) = (kind(*s) == dir_kind, kind(*r) == dir_kind);
                match (sd, rd) {
                    (true, false) => {
                        return Err(BackendError::errno("rename", libc::ENOTDIR).into());
                    }
                    (false, true) => return Err(BackendError::errno("rename", libc::EISDIR).into()),
                    _ => {}
                }
                // (A new object there is replaced by the backend.)
                match (local(*r), nas_src.is_some()) {
                    (true, _) => {}
                    (false, true) => match self.vouch_removal(newparent, newname, rd) {
                        Ok(v) => over = Some(v),
                        Err(Some(x)) => return Err(x),
                        Err(None) => return Err(e.into()),
                    },
                    (false, false) => {
                        self.remove_later(newparent, newdir, newname, rd, e)?;
                        removed_first = true;
                    }
                }
            }
            None => {}
        }
        let vouched = RenameFlags {
            vouched_free: true,
            ..flags
        };
        let done = match nas_src {
            Some((kind, was)) => {
                let over = over.as_ref().map(|(n, k, w)| (n, *k, *w));
                let obj = (s_node, kind, was);
                let at = crate::clock::now();
                self.backend
                    .move_later((dir, name), (newdir, newname), obj, over, false, at)
            }
            None => self.backend.rename(dir, name, newdir, newname, vouched),
        };
        match done {
            Ok(()) => Ok(None),
            Err(e) => {
                // The target stays, as the failed rename leaves it.
                if removed_first {
                    self.backend.undo_remove_later(newdir, newname);
                }
                Err(e.into())
            }
        }
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
        let g0 = self.settle_gen();
        // Close-to-open: the attributes of what was just opened; the
        // cached version serves if the NAS is slow to answer.
        let (file, got) = cache_can_answer(|| {
            let file =
                self.short_of_descriptors(|| self.backend.open(&node, mode), |e| e.raw_errno())?;
            let got = self.backend.fgetattr(&file);
            Ok::<_, BackendError>((file, got))
        })?;
        let mut attr = match got {
            Ok(a) => a,
            Err(e) if is_unreachable(&e) => {
                // Offline: the cached version is the one there is; the NAS
                // is asked again at the next open once it answers.
                let known = self.tables().inodes.contains_key(&ino);
                if !known {
                    return Err(e.into());
                }
                Stats::inc(&self.stats.offline_hits);
                let fh = self.open_handle(ino, file, data, mode.append);
                return Ok(Opened {
                    fh,
                    keep_cache: true,
                });
            }
            Err(e) => return Err(e.into()),
        };
        if attr.nlink == 0 && kind == FileKind::File && !self.is_open(ino) && !self.is_dirty(ino) {
            // Removed on the NAS by another client (a directory source's
            // nodes outlive the last name): stale, as over NFS. The kernel
            // then looks the name up again and finds what is there now.
            drop(file);
            let mut t = self.tables();
            t.names_gen += 1;
            t.names.retain(|_, i| *i != ino);
            for l in t.listings.values_mut() {
                l.names.retain(|_, i| *i != ino);
            }
            self.expire_attr(&mut t, ino);
            return Err(FsError::UnknownInode(ino));
        }
        self.fresh(&node, &mut attr, g0);
        if self.overlay(ino, &mut attr) {
            // Changes not yet on the NAS: the local version is the one to
            // show, and the kernel's cache of it is current.
            let mut t = self.tables();
            if let Some(i) = t.inodes.get_mut(&ino) {
                i.attr = attr;
                i.attr_until = Instant::now() + self.attr_ttl(&i.attr);
            }
            drop(t);
            let fh = self.open_handle(ino, file, data, mode.append);
            return Ok(Opened {
                fh,
                keep_cache: true,
            });
        }
        {
            let mut t = self.tables();
            if let Some(i) = t.inodes.get_mut(&ino) {
                i.attr = attr;
                i.attr_until = Instant::now() + self.attr_ttl(&i.attr);
            }
        }
        let keep_cache = if kind == FileKind::File {
            // Also not when a change seen earlier (a stat before this open)
            // still has the kernel's pages to drop: dropped now, at once.
            let same = self.data.revalidate(ino, &data, &attr.validator())?;
            let stale = self.data.take_kernel_stale(ino);
            same && !stale
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
        let omode = open_mode(flags);
        let exclusive = flags & libc::O_EXCL != 0;
        let (node, attr, file) = self.creating(parent, name, || {
            let mode = self.creation_mode(parent, &dir, mode, creds);
            self.backend
                .create(&dir, name, mode, omode, exclusive, creds)
        })?;
        self.added_name(parent);
        let entry = self.remember(parent, name, node, attr, true, self.settle_gen())?;
        let ino = entry.attr.ino;
        let (_, _, data) = self.node(ino)?;
        self.data.revalidate(ino, &data, &attr.validator())?;
        // Not kept (keep_cache false below): nothing left to drop later.
        self.data.take_kernel_stale(ino);
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
        let sequential = h.last_end.load(Ordering::Relaxed) == offset;
        // A read that does not follow the previous one and needs the NAS
        // fetches only what it asks for: a 4 KiB random read must not cost
        // a whole block over the link (random reads are then not kept on
        // disk, only in the kernel's page cache).
        let base = |o: u64, l: u32| {
            if sequential || self.data.covered(h.ino, &h.data, o, l) {
                return self.data.read(h.ino, &h.data, o, l, &h.fetch);
            }
            Stats::inc(&self.stats.direct_reads);
            let mut buf = vec![0u8; l as usize];
            let n = self.backend.read(&h.file, o, &mut buf)?;
            buf.truncate(n);
            Ok(buf)
        };
        if let Some(wb) = &self.wb {
            if let Some(r) = wb.read(self.fuse_ino(h.ino), offset, size, &base) {
                return r;
            }
        }
        let out = base(offset, size)?;
        let end = offset + out.len() as u64;
        h.last_end.store(end, Ordering::Relaxed);
        if self.cfg.readahead > 0 && sequential && !out.is_empty() {
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
        if let Some(wb) = &self.wb {
            if let Some(who) = who {
                self.kill_privs_local(h.ino, &h.file, who)?;
            }
            let start = || self.start_info(h.ino, &h.data);
            let nas = self.fuse_ino(h.ino);
            match wb.write(nas, &start, offset, data, h.append) {
                Ok(l) => {
                    self.store_local(h.ino, &l);
                    return Ok(data.len() as u32);
                }
                // The pending file keeps bytes at their own offset, and the
                // cache's filesystem may not reach offsets the NAS's does
                // (ext4 stops at 16 TiB, a file can reach 2^63): such a write
                // goes to the NAS itself, after what is pending there.
                Err(FsError::Cache(CacheError::Io(e))) if e.raw_os_error() == Some(libc::EFBIG) => {
                    log::debug!("write at {offset}: beyond the cache's reach, written through");
                    wb.flush_file(nas)?;
                }
                Err(e) => return Err(e),
            }
        }
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
            i.attr_until = Instant::now() + self.attr_ttl(&i.attr);
        }
        Ok(n as u32)
    }

    pub fn flush(&self, fh: u64) -> FsResult<()> {
        let h = self.file_handle(fh)?;
        if let Some(wb) = &self.wb {
            wb.flush_row(self.fuse_ino(h.ino))?;
        }
        Ok(())
    }

    pub fn release(&self, fh: u64) -> FsResult<()> {
        let (h, open) = {
            let mut handles = self.handles();
            let Some(h) = handles.remove(&fh) else {
                return Err(FsError::UnknownHandle(fh));
            };
            let open = match &h {
                Handle::File(f) => handles
                    .values()
                    .any(|o| matches!(o, Handle::File(g) if g.ino == f.ino)),
                _ => false,
            };
            (h, open)
        };
        if let (false, Handle::File(h)) = (open, &h) {
            self.tables().open_unlinked.remove(&h.ino);
        }
        if let (Some(wb), Handle::File(h)) = (&self.wb, &h) {
            if !open {
                wb.closed(self.fuse_ino(h.ino));
            }
        }
        // Dropped outside the handles' lock: closing a NAS file may take
        // a round trip (an NFS file unlinked while open is removed now).
        drop(h);
        Ok(())
    }

    fn is_dirty(&self, ino: u64) -> bool {
        self.wb
            .as_ref()
            .is_some_and(|wb| wb.is_dirty(self.fuse_ino(ino)))
    }

    /// The inodes of the files open here.
    fn open_inos(&self) -> HashSet<u64> {
        self.handles()
            .values()
            .filter_map(|h| match h {
                Handle::File(f) => Some(f.ino),
                _ => None,
            })
            .collect()
    }

    fn is_open(&self, ino: u64) -> bool {
        self.handles()
            .values()
            .any(|o| matches!(o, Handle::File(f) if f.ino == ino))
    }

    /// With write-back: durable on local disk (the NAS gets it later).
    pub fn fsync(&self, fh: u64, datasync: bool) -> FsResult<()> {
        let h = self.file_handle(fh)?;
        if let Some(wb) = &self.wb {
            wb.fsync(self.fuse_ino(h.ino))?;
            // A file created here may not be on the NAS yet either.
            let (node, _, _) = self.node(h.ino)?;
            return Ok(self.backend.sync_namespace(&node)?);
        }
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
        if let Some(wb) = &self.wb {
            let nas = self.fuse_ino(h.ino);
            let end = offset
                .checked_add(len)
                .ok_or(FsError::Invalid("fallocate past the largest offset"))?;
            if mode == 0 {
                self.kill_privs_local(h.ino, &h.file, who)?;
                // Allocation is the NAS's business; the size is ours. But
                // space that the NAS does not have is refused now, as
                // fallocate promises, not found missing at write-back.
                let grow = end.saturating_sub(self.cached_size(h.ino));
                if grow > 0 {
                    let (root, _, _) = self.node(ROOT)?;
                    let st = self.backend.statfs(&root)?;
                    let room = st.bavail.saturating_mul(st.frsize.max(1) as u64);
                    if grow > room.saturating_sub(wb.dirty_bytes()) {
                        return Err(BackendError::errno("fallocate", libc::ENOSPC).into());
                    }
                }
                if end > self.cached_size(h.ino) {
                    let start = || self.start_info(h.ino, &h.data);
                    let l = wb.truncate(nas, &start, end)?;
                    self.store_local(h.ino, &l);
                }
                return Ok(());
            }
            // Holes and zeroed ranges are made by the NAS itself, on the
            // file as written back.
            wb.flush_file(nas)?;
        }
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
            i.attr_until = Instant::now() + self.attr_ttl(&i.attr);
        }
        Ok(())
    }

    pub fn opendir(&self, ino: u64) -> FsResult<Opened> {
        self.drain_settled();
        let (_, kind, _) = self.node(ino)?;
        if kind != FileKind::Dir {
            return Err(BackendError::errno("opendir", libc::ENOTDIR).into());
        }
        let keep_cache = self.kernel_listing_current(ino);
        let fh = self.add_handle(Handle::Dir(Arc::new(Mutex::new(DirHandle {
            ino,
            items: None,
            settle_gen: 0,
            names_gen: 0,
            fingerprint: 0,
        }))));
        Ok(Opened { fh, keep_cache })
    }

    /// Whether the listing the kernel may have cached for directory `ino`
    /// is the one nassync would serve now, without asking the NAS: then
    /// the kernel may answer readdir itself. Like NFS's close-to-open, each
    /// opendir after the listing's time to live goes back to the NAS. When
    /// not, the kernel drops the pages of its cache at this opendir.
    ///
    /// The kernel fills its cache from the replies of any handle that reads
    /// at the position the cache has reached, from offset 0 on, so a
    /// complete cache may be stitched from several replies. Every listing
    /// is served in one order (by name), so if every reply since the pages
    /// were last dropped served the same listing, the cache holds that
    /// listing (or is incomplete, and the kernel asks again).
    fn kernel_listing_current(&self, ino: u64) -> bool {
        let mut t = self.tables();
        let current = Self::listing_fingerprint(&t, ino);
        let Some(i) = t.inodes.get_mut(&ino) else {
            return false;
        };
        let k = i.kernel.get_or_insert_with(Default::default);
        // Served whole, so the cache is complete and takes no more.
        let whole = matches!(k.served[..], [(fp, _, true)] if Some(fp) == current);
        if whole && !k.mixed {
            return true;
        }
        // The kernel drops the pages now, so only replies from here on can
        // complete the cache; but one of an open handle (or one just
        // sent) may still reach it after the drop.
        let now = Instant::now();
        k.served
            .retain(|s| now.saturating_duration_since(s.1) < Duration::from_secs(1));
        for &(_, fp) in &k.open {
            if !k.served.iter().any(|s| s.0 == fp) {
                k.served.push((fp, now, false));
            }
        }
        for s in &mut k.served {
            s.2 = false;
        }
        k.mixed = false;
        false
    }

    /// The [`fingerprint`] of what list_cached would serve for `ino`, if
    /// its listing is fresh and complete.
    fn listing_fingerprint(t: &Tables<B>, ino: u64) -> Option<u64> {
        let (i, l) = (t.inodes.get(&ino)?, t.listings.get(&ino)?);
        if !l.complete || l.until <= Instant::now() {
            return None;
        }
        // What list_cached would serve.
        let entries = l.names.iter().filter_map(|(n, f)| {
            let kind = t
                .inodes
                .get(f)
                .map(|i| i.kind)
                .or_else(|| l.kinds.get(f).copied())?;
            Some((n.as_os_str(), *f, kind))
        });
        let dots = [
            (OsStr::new("."), ino, FileKind::Dir),
            (OsStr::new(".."), i.parent, FileKind::Dir),
        ];
        Some(fingerprint(dots.into_iter().chain(entries)))
    }

    /// Notes that handle `fh` replied to a readdir of directory `ino` with
    /// listing `fp`, up to its end or not.
    fn kernel_served(&self, ino: u64, fh: u64, fp: u64, to_end: bool) {
        let mut t = self.tables();
        let Some(i) = t.inodes.get_mut(&ino) else {
            return;
        };
        let k = i.kernel.get_or_insert_with(Default::default);
        let now = Instant::now();
        let full = k.served.len() >= 8;
        match k.served.iter_mut().find(|s| s.0 == fp) {
            Some(s) => {
                s.1 = now;
                s.2 |= to_end;
            }
            // A directory changing under a reader that rewinds: no point
            // following every listing (the open handles' are kept).
            None if full => k.mixed = true,
            None => k.served.push((fp, now, to_end)),
        }
        match k.open.iter_mut().find(|o| o.0 == fh) {
            Some(o) => o.1 = fp,
            None => k.open.push((fh, fp)),
        }
    }

    fn list(&self, ino: u64, plus: bool, from: u64) -> FsResult<Vec<DirItem<B>>> {
        let (node, _, _) = self.node(ino)?;
        let parent = {
            let t = self.tables();
            t.inodes.get(&ino).map(|i| i.parent).unwrap_or(ROOT)
        };
        let gen_before = self.tables().names_gen;
        let read_at = Instant::now();
        let mut listing = self.backend.readdir(&node)?;
        // The order list_cached serves (see kernel_listing_current), and
        // the order names are handed out in: those looked up below, for
        // which there was room, come first.
        listing.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        let mut items = Vec::with_capacity(listing.len() + 2);
        items.push(DirItem {
            name: ".".into(),
            ino,
            kind: FileKind::Dir,
            plus: None,
            cached: false,
            unhanded: None,
        });
        items.push(DirItem {
            name: "..".into(),
            ino: parent,
            kind: FileKind::Dir,
            plus: None,
            cached: false,
            unhanded: None,
        });
        // What each entry needs from the NAS. A name whose inode is held
        // reuses its node (for the directory backend, its descriptor: a
        // listing of 10,000 files must not open 10,000 more), and its
        // attributes if they are fresh.
        enum Need<N> {
            Nothing,
            Have(N, Attr),
            GetAttr(N),
            Lookup,
        }
        // Names not held are looked up now from offset `from` on (the
        // kernel may start a handle there) and only as far as there is
        // room for their nodes (`take_room`); the others as the kernel
        // takes them (readdir).
        let skip = (from as usize).saturating_sub(2);
        let needs: Vec<Need<B::Node>> = {
            let t = self.tables();
            let now = Instant::now();
            listing
                .iter()
                .enumerate()
                .map(|(k, e)| {
                    if !plus {
                        return Need::Nothing;
                    }
                    let held = t
                        .names
                        .get(&(ino, e.name.clone()))
                        // Only if the name still leads to that inode.
                        .filter(|f| **f == self.fuse_ino(e.ino))
                        .and_then(|f| t.inodes.get(f));
                    match held {
                        Some(i) if i.attr_until > now => Need::Have(i.node.clone(), i.attr),
                        Some(i) => Need::GetAttr(i.node.clone()),
                        None if k < skip => Need::Nothing,
                        None => Need::Lookup,
                    }
                })
                .collect()
        };
        // Files with local changes show the NAS's attributes under the
        // local ones: those are asked for (outside the tables' lock).
        let needs: Vec<Need<B::Node>> = needs
            .into_iter()
            .map(|n| match n {
                Need::Have(node, a) if self.wb.as_ref().is_some_and(|wb| wb.is_dirty(a.ino)) => {
                    Need::GetAttr(node)
                }
                n => n,
            })
            .collect();
        // Nodes asked for attributes are the tables', but kept here they
        // would stay open if shed meanwhile: room is taken for them first
        // (they count twice while the tables hold them, to be safe).
        let count = |f: fn(&Need<B::Node>) -> bool| needs.iter().filter(|n| f(n)).count();
        let getattrs = count(|n| matches!(n, Need::GetAttr(_)));
        let mut room = self.take_room(getattrs + count(|n| matches!(n, Need::Lookup)));
        let mut left = room
            .as_ref()
            .map_or(usize::MAX, |r| r.len().saturating_sub(getattrs));
        let needs: Vec<Need<B::Node>> = needs
            .into_iter()
            .map(|n| match n {
                Need::Lookup if left == 0 => Need::Nothing,
                Need::Lookup => {
                    left -= 1;
                    Need::Lookup
                }
                n => n,
            })
            .collect();
        // Batches of names looked up in one backend call each (READDIRPLUS
        // over NFS), side by side: a cold listing costs a few round trips,
        // not one per entry.
        type Got<N> = Option<BResult<(N, Attr)>>;
        let mut batches: Vec<Vec<usize>> = Vec::new();
        for (i, n) in needs.iter().enumerate() {
            if matches!(n, Need::GetAttr(_) | Need::Lookup) {
                match batches.last_mut() {
                    Some(b) if b.len() < 128 => b.push(i),
                    _ => batches.push(vec![i]),
                }
            }
        }
        let run = |batch: &Vec<usize>| -> Vec<(usize, Got<B::Node>)> {
            let names: Vec<OsString> = batch
                .iter()
                .filter(|i| matches!(needs[**i], Need::Lookup))
                .map(|i| listing[*i].name.clone())
                .collect();
            let mut found = self.backend.lookup_many(&node, &names).into_iter();
            batch
                .iter()
                .map(|i| match &needs[*i] {
                    Need::GetAttr(n) => (*i, Some(self.backend.getattr(n).map(|a| (n.clone(), a)))),
                    _ => (*i, found.next()),
                })
                .collect()
        };
        let parts: Vec<Vec<(usize, Got<B::Node>)>> = if batches.len() < 2 {
            batches.iter().map(run).collect()
        } else {
            let workers = batches.len().min(4);
            std::thread::scope(|sc| {
                let handles: Vec<_> = (0..workers)
                    .map(|k| {
                        let (run, batches) = (&run, &batches);
                        sc.spawn(move || {
                            batches
                                .iter()
                                .skip(k)
                                .step_by(workers)
                                .flat_map(run)
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_default())
                    .collect()
            })
        };
        let mut fetched: Vec<Got<B::Node>> = Vec::new();
        fetched.resize_with(listing.len(), || None);
        for (i, r) in parts.into_iter().flatten() {
            fetched[i] = r;
        }
        let mut names = HashMap::with_capacity(listing.len());
        let mut kinds = HashMap::with_capacity(listing.len());
        for ((e, need), got) in listing.into_iter().zip(needs).zip(fetched) {
            let fino = self.fuse_ino(e.ino);
            let cached = matches!(need, Need::Have(..));
            let plus = match (need, got) {
                (Need::Have(n, a), _) => Some((n, a)),
                (_, Some(Ok(found))) => Some(found),
                // Gone meanwhile.
                (_, Some(Err(err))) if err.raw_errno() == libc::ENOENT => continue,
                // Looked up as the kernel takes it, when there may be more.
                (Need::Lookup, Some(Err(err)))
                    if matches!(err.raw_errno(), libc::EMFILE | libc::ENFILE) =>
                {
                    None
                }
                (_, Some(Err(err))) => return Err(err.into()),
                (_, None) => None,
            };
            let (fino, kind) = match &plus {
                Some((_, a)) => (self.fuse_ino(a.ino), a.kind),
                None => (fino, e.kind),
            };
            // Held by the tables: taken from there as it is handed out.
            let plus = plus.filter(|_| !cached);
            names.insert(e.name.clone(), fino);
            kinds.insert(fino, kind);
            items.push(DirItem {
                name: e.name,
                ino: fino,
                kind,
                // (What is left came from the NAS.)
                unhanded: plus
                    .as_ref()
                    .and_then(|_| room.as_mut().and_then(|r| r.pop())),
                plus,
                cached,
            });
        }
        let mut t = self.tables();
        let dir_ttl = t
            .inodes
            .get(&ino)
            .map_or(self.cfg.entry_timeout, |i| self.entry_ttl(&i.attr));
        // A name removed while the NAS was being read may be in it.
        let complete = t.names_gen == gen_before;
        // Negative entries older than this listing are wrong about the
        // names in it (kept, they would answer for the NAS if it hangs).
        let noted_before = read_at + self.cfg.negative_timeout;
        // (Most listings meet none: no key is built for each name then.)
        let any = !t.negatives.is_empty();
        for name in names.keys().filter(|_| any) {
            let key = (ino, name.clone());
            if t.negatives.get(&key).is_some_and(|u| *u <= noted_before) {
                t.negatives.remove(&key);
            }
        }
        t.listings.insert(
            ino,
            Listing {
                names,
                kinds,
                until: Instant::now() + if complete { dir_ttl } else { Duration::ZERO },
                complete,
            },
        );
        Ok(items)
    }

    /// The listing of `ino` from the tables, if it and (with `plus`) the
    /// attributes of every entry are fresh: a warm `ls -l` or `find` does
    /// not ask the NAS about every entry again.
    fn list_fresh(&self, ino: u64, plus: bool) -> Option<Vec<DirItem<B>>> {
        let now = Instant::now();
        {
            let t = self.tables();
            let l = t.listings.get(&ino)?;
            if !l.complete || l.until <= now {
                return None;
            }
            if plus
                && l.names
                    .values()
                    .any(|f| t.inodes.get(f).is_none_or(|i| i.attr_until <= now))
            {
                return None;
            }
        }
        let items = self.list_cached(ino, plus, false)?;
        Stats::inc(&self.stats.entry_hits);
        Some(items)
    }

    /// Whether [`Self::list_cached`] can serve `ino` (with `plus`).
    fn can_list_cached(&self, ino: u64, plus: bool) -> bool {
        let t = self.tables();
        t.listings.get(&ino).is_some_and(|l| {
            l.complete
                && (!plus
                    || l.names
                        .values()
                        .all(|f| t.inodes.contains_key(f) || !l.kinds.contains_key(f)))
        })
    }

    /// The listing of `ino` as last seen, however old, while the NAS is
    /// offline. With `plus`, only the entries whose inode is still known
    /// (the kernel holds it): the others have no attributes to give.
    /// `offline`: the nodes are kept in the listing (nothing is shed
    /// offline, and an entry forgotten meanwhile could not be looked up
    /// again); otherwise taken from the tables as they are handed out.
    fn list_cached(&self, ino: u64, plus: bool, offline: bool) -> Option<Vec<DirItem<B>>> {
        let t = self.tables();
        let l = t.listings.get(&ino).filter(|l| l.complete)?;
        let parent = t.inodes.get(&ino).map(|i| i.parent).unwrap_or(ROOT);
        let mut items = vec![
            DirItem {
                name: ".".into(),
                ino,
                kind: FileKind::Dir,
                plus: None,
                cached: false,
                unhanded: None,
            },
            DirItem {
                name: "..".into(),
                ino: parent,
                kind: FileKind::Dir,
                plus: None,
                cached: false,
                unhanded: None,
            },
        ];
        let mut names: Vec<(&OsString, &u64)> = l.names.iter().collect();
        names.sort();
        for (name, fino) in names {
            let inode = t.inodes.get(fino);
            let Some(kind) = inode.map(|i| i.kind).or_else(|| l.kinds.get(fino).copied()) else {
                continue;
            };
            let (cached, node) = match (plus, inode) {
                (true, Some(i)) => (true, offline.then(|| (i.node.clone(), i.attr))),
                // No attributes to give for it: the listing cannot be
                // served whole, and a partial one would look like deletions.
                (true, None) => return None,
                (false, _) => (false, None),
            };
            items.push(DirItem {
                name: name.clone(),
                ino: *fino,
                kind,
                cached,
                plus: node,
                unhanded: None,
            });
        }
        Some(items)
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
            h.settle_gen = self.settle_gen();
            h.names_gen = self.tables().names_gen;
            let listed = match self.list_fresh(h.ino, plus) {
                Some(items) => Ok(items),
                None => {
                    if plus {
                        self.wait_for_room();
                    }
                    // With the listing last seen to fall back on, a NAS
                    // slow to answer is waited for a second, as for a stat.
                    let answerable = self.can_list_cached(h.ino, plus);
                    let list = || {
                        self.short_of_descriptors(|| self.list(h.ino, plus, offset), |e| e.errno())
                    };
                    if answerable {
                        cache_can_answer(list)
                    } else {
                        list()
                    }
                }
            };
            let items = match listed {
                Ok(items) => items,
                Err(FsError::Backend(e)) if is_unreachable(&e) => {
                    let items = self
                        .list_cached(h.ino, plus, true)
                        .ok_or(FsError::Backend(e))?;
                    Stats::inc(&self.stats.offline_hits);
                    items
                }
                Err(e) => return Err(e),
            };
            h.fingerprint = fingerprint(items.iter().map(|i| (i.name.as_os_str(), i.ino, i.kind)));
            h.items = Some(items);
        }
        let g0 = h.settle_gen;
        let names_gen = h.names_gen;
        let dir_ino = h.ino;
        let fingerprint = h.fingerprint;
        let items = h.items.as_deref_mut().unwrap_or_default();
        let mut to_end = true;
        let mut added = 0;
        for (i, item) in items.iter_mut().enumerate().skip(offset as usize) {
            let next = i as u64 + 1;
            // An entry the tables held when listed is taken from them now:
            // a node kept in the listing would keep its descriptor open
            // after the name was shed. Gone meanwhile, it is looked up.
            let from_tables = (plus && item.cached && item.plus.is_none())
                .then(|| {
                    let t = self.tables();
                    t.inodes.get(&item.ino).map(|i| (i.node.clone(), i.attr))
                })
                .flatten();
            match (from_tables.as_ref().or(item.plus.as_ref()), plus) {
                (Some((node, attr)), true) => {
                    // Attributes from the tables: as they are now (a long
                    // listing is handed out over several requests), and
                    // kept by the kernel as long as they are good here,
                    // not longer for being listed again; those served
                    // while the NAS does not answer (expired), as
                    // `offline_ttl`.
                    let now_known = item
                        .cached
                        .then(|| {
                            let t = self.tables();
                            t.inodes.get(&item.ino).map(|i| (i.attr, i.attr_until))
                        })
                        .flatten();
                    let mut shown = now_known.map_or(*attr, |(a, _)| a);
                    self.fresh(node, &mut shown, g0);
                    self.overlay(item.ino, &mut shown);
                    let mut provisional = self.entry(shown);
                    if item.cached {
                        let left = now_known.map_or(Duration::ZERO, |(_, u)| {
                            u.saturating_duration_since(Instant::now())
                        });
                        let ttl = if left.is_zero() {
                            self.offline_ttl()
                        } else {
                            left
                        };
                        provisional.attr_ttl = provisional.attr_ttl.min(ttl);
                    }
                    if self.tables().names_gen != names_gen {
                        // A name was removed since the listing was taken,
                        // perhaps this one: the kernel must not keep it.
                        provisional.entry_ttl = Duration::ZERO;
                        provisional.attr_ttl = Duration::ZERO;
                    }
                    let full = add(DirOut {
                        ino: item.ino,
                        next,
                        kind: item.kind,
                        name: &item.name,
                        entry: Some(&provisional),
                    });
                    if full {
                        to_end = false;
                        break;
                    }
                    self.remember_at(
                        dir_ino,
                        &item.name,
                        node.clone(),
                        *attr,
                        true,
                        g0,
                        Some(names_gen),
                        !item.cached,
                    )?;
                    // Handed out again (the reader's buffer was full), it
                    // is looked up again.
                    item.handed_out();
                    added += 1;
                }
                (None, true) => {
                    let dot = item.name == "." || item.name == "..";
                    let e = if dot {
                        // The kernel takes no lookup for them. The entry's
                        // inode number is its attributes'.
                        let (mut attr, _) = self
                            .getattr(item.ino, None)
                            .or_else(|_| self.getattr(dir_ino, None))?;
                        attr.ino = item.ino;
                        Entry {
                            attr,
                            attr_ttl: Duration::ZERO,
                            entry_ttl: Duration::ZERO,
                        }
                    } else {
                        // Listed without attributes (the handle's first
                        // readdir was not plus, or no room for them all):
                        // looked up now, which counts as the kernel's
                        // lookup. Short of room, the reply ends once it
                        // has entries: the names of this directory can be
                        // dropped only between replies, as the kernel
                        // holds its lock across each. So does it on an
                        // error, which the next reply gives alone: one
                        // given now would lose the entries before it, and
                        // the lookups counted for them.
                        let held = || {
                            self.tables()
                                .names
                                .contains_key(&(dir_ino, item.name.clone()))
                        };
                        if added > 0 && self.room() == 0 && !held() {
                            to_end = false;
                            break;
                        }
                        match self.lookup_in(dir_ino, &item.name, false) {
                            Ok(e) => e,
                            Err(e) if e.errno() == libc::ENOENT => continue,
                            Err(_) if added > 0 => {
                                to_end = false;
                                break;
                            }
                            Err(e) => return Err(e),
                        }
                    };
                    if add(DirOut {
                        ino: item.ino,
                        next,
                        kind: item.kind,
                        name: &item.name,
                        entry: Some(&e),
                    }) {
                        if !dot {
                            self.forget(e.attr.ino, 1);
                        }
                        to_end = false;
                        break;
                    }
                    added += 1;
                }
                (_, false) => {
                    if add(DirOut {
                        ino: item.ino,
                        next,
                        kind: item.kind,
                        name: &item.name,
                        entry: None,
                    }) {
                        to_end = false;
                        break;
                    }
                    item.handed_out();
                    added += 1;
                }
            }
        }
        // After the entries: the kernel takes them in once the reply is
        // sent. An empty reply at the end counts, as it completes a cache.
        self.kernel_served(dir_ino, fh, fingerprint, to_end);
        Ok(())
    }

    pub fn releasedir(&self, fh: u64) -> FsResult<()> {
        if let Ok(h) = self.dir_handle(fh) {
            let ino = h.lock().unwrap_or_else(|e| e.into_inner()).ino;
            if let Some(k) = self
                .tables()
                .inodes
                .get_mut(&ino)
                .and_then(|i| i.kernel.as_mut())
            {
                k.open.retain(|o| o.0 != fh);
            }
        }
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
        match self.backend.statfs(&node) {
            Ok(st) => {
                *self.last_statfs.lock().unwrap_or_else(|e| e.into_inner()) = Some(st);
                Ok(st)
            }
            // Offline: the figures last seen (df must not fail).
            Err(e) if is_unreachable(&e) => self
                .last_statfs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .ok_or(FsError::Backend(e)),
            Err(e) => Err(e.into()),
        }
    }

    /// The xattr cache of `ino` if it may answer now (any age offline).
    fn xattr_cache<T>(
        &self,
        ino: u64,
        offline: bool,
        f: impl FnOnce(&XattrCache) -> Option<T>,
    ) -> Option<T> {
        let t = self.tables();
        let i = t.inodes.get(&ino)?;
        let c = i.xattrs.as_deref()?;
        if !offline && (i.attr_until <= Instant::now() || c.ctime != i.attr.ctime) {
            return None;
        }
        f(c)
    }

    /// Taken before asking the NAS about xattrs, for [`Self::xattr_store`].
    fn xattr_stamp(&self, ino: u64) -> XattrStamp {
        let t = self.tables();
        XattrStamp {
            xgen: self.xattr_gen.load(Ordering::SeqCst),
            ctime: t.inodes.get(&ino).map(|i| i.attr.ctime),
        }
    }

    /// Records an xattr answer of the NAS for `ino`, unless nassync changed
    /// xattrs or saw the inode change since `stamp`: the answer may then
    /// be older than the ctime it would be filed under.
    ///
    /// Nor while the NAS does not answer: an answer then is of changes
    /// kept here (see `xattr_later`), which the cache has already, and
    /// filed under a ctime changed here it would drop the rest.
    fn xattr_store(&self, ino: u64, stamp: XattrStamp, f: impl FnOnce(&mut XattrCache)) {
        if self.backend.offline_since().is_some() {
            return;
        }
        let mut t = self.tables();
        if self.xattr_gen.load(Ordering::SeqCst) != stamp.xgen {
            return;
        }
        let Some(i) = t.inodes.get_mut(&ino) else {
            return;
        };
        let ctime = i.attr.ctime;
        if stamp.ctime != Some(ctime) {
            return;
        }
        let fresh = || {
            Box::new(XattrCache {
                ctime,
                list: None,
                acls_listed: false,
                values: HashMap::new(),
            })
        };
        let c = i.xattrs.get_or_insert_with(fresh);
        if c.ctime != ctime {
            *c = fresh();
        }
        f(c);
    }

    pub fn getxattr(&self, ino: u64, name: &OsStr) -> FsResult<Vec<u8>> {
        // (A refused change kept here must not be answered.)
        self.drain_settled();
        let cached = |c: &XattrCache| {
            c.values.get(name).cloned().or_else(|| {
                let list = c.list.as_deref()?;
                (always_listed(name, c.acls_listed) && !xattr_listed(list, name))
                    .then_some(Err(libc::ENODATA))
            })
        };
        let answer = |r: Result<Vec<u8>, i32>| match r {
            Ok(v) => Ok(v),
            Err(errno) => Err(BackendError::errno("getxattr", errno).into()),
        };
        if let Some(r) = self.xattr_cache(ino, false, cached) {
            Stats::inc(&self.stats.attr_hits);
            return answer(r);
        }
        let stamp = self.xattr_stamp(ino);
        let (node, _, _) = self.node(ino)?;
        // `ls -l` asks each file for security.selinux, which NAS files
        // rarely have: one listxattr answers that and any user.* name.
        let acls_listed = self.backend.lists_acls(&node);
        if always_listed(name, acls_listed)
            && self.xattr_cache(ino, false, |c| c.list.clone()).is_none()
        {
            if let Ok(list) = self.backend.listxattr(&node) {
                let absent = !xattr_listed(&list, name);
                self.xattr_store(ino, stamp, |c| {
                    c.list = Some(list);
                    c.acls_listed = acls_listed;
                });
                if absent {
                    return answer(Err(libc::ENODATA));
                }
            }
        }
        let r = match self.backend.getxattr(&node, name) {
            Ok(v) => Ok(v),
            Err(e) if is_unreachable(&e) => {
                return match self.xattr_cache(ino, true, cached) {
                    Some(r) => answer(r),
                    None => Err(e.into()),
                };
            }
            Err(e) if matches!(e.raw_errno(), libc::ENODATA | libc::EOPNOTSUPP) => {
                Err(e.raw_errno())
            }
            Err(e) => return Err(e.into()),
        };
        self.xattr_store(ino, stamp, |c| {
            c.values.insert(name.to_os_string(), r.clone());
        });
        answer(r)
    }

    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        self.drain_settled();
        if let Some(l) = self.xattr_cache(ino, false, |c| c.list.clone()) {
            Stats::inc(&self.stats.attr_hits);
            return Ok(l);
        }
        let stamp = self.xattr_stamp(ino);
        let (node, _, _) = self.node(ino)?;
        match self.backend.listxattr(&node) {
            Ok(l) => {
                let acls_listed = self.backend.lists_acls(&node);
                self.xattr_store(ino, stamp, |c| {
                    c.list = Some(l.clone());
                    c.acls_listed = acls_listed;
                });
                Ok(l)
            }
            Err(e) if is_unreachable(&e) => self
                .xattr_cache(ino, true, |c| c.list.clone())
                .ok_or_else(|| e.into()),
            Err(e) => Err(e.into()),
        }
    }

    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> FsResult<()> {
        let (node, kind, _) = self.node(ino)?;
        if self.keep_xattr(ino, (&node, kind), (name, Some(value)), flags)? {
            return Ok(());
        }
        self.owner_first(ino, kind)?;
        let before = self.proof_base(ino, true);
        self.xattr_gen.fetch_add(1, Ordering::SeqCst);
        let r = self.backend.setxattr(&node, name, value, flags);
        self.xattr_gen.fetch_add(1, Ordering::SeqCst);
        match r {
            Ok(()) => {}
            Err(e) if is_unreachable(&e) => {
                return self.xattr_later(ino, (&node, kind), (name, Some(value)), flags, e, false);
            }
            Err(e) => return Err(e.into()),
        }
        self.nas_took_xattr(before, name, value.len());
        self.own_meta_change(ino, None);
        // ctime changed (and the mode, for an ACL).
        let mut t = self.tables();
        self.expire_attr(&mut t, ino);
        if let Some(i) = t.inodes.get_mut(&ino) {
            i.default_acl = None;
            i.xattrs = None;
        }
        Ok(())
    }

    pub fn removexattr(&self, ino: u64, name: &OsStr) -> FsResult<()> {
        let (node, kind, _) = self.node(ino)?;
        if self.keep_xattr(ino, (&node, kind), (name, None), 0)? {
            return Ok(());
        }
        self.owner_first(ino, kind)?;
        self.xattr_gen.fetch_add(1, Ordering::SeqCst);
        let r = self.backend.removexattr(&node, name);
        self.xattr_gen.fetch_add(1, Ordering::SeqCst);
        match r {
            Ok(()) => {}
            Err(e) if is_unreachable(&e) => {
                return self.xattr_later(ino, (&node, kind), (name, None), 0, e, false);
            }
            Err(e) => return Err(e.into()),
        }
        self.own_meta_change(ino, None);
        let mut t = self.tables();
        self.expire_attr(&mut t, ino);
        if let Some(i) = t.inodes.get_mut(&ino) {
            i.default_acl = None;
            i.xattrs = None;
        }
        Ok(())
    }

    /// The NAS changed a `user.*` xattr of `ino`, to a value of `len`
    /// bytes (see `NasProof::writes`): only its owner could write to it.
    fn nas_took_xattr(&self, before: Option<Attr>, name: &OsStr, len: usize) {
        let user = is_user_xattr(name);
        if let Some(a) = before.filter(|a| user && a.perm & 0o222 == 0o200) {
            let mut proof = self.nas_proof.lock().unwrap_or_else(|e| e.into_inner());
            proof.writes.insert(a.uid);
            proof.xattr_len = proof.xattr_len.max(len);
        }
    }

    /// Before an xattr change of file `ino` goes to the NAS: a mode or
    /// owner kept here for it goes first (set after, it would undo an
    /// ACL's mask).
    fn owner_first(&self, ino: u64, kind: FileKind) -> FsResult<()> {
        let nas = self.fuse_ino(ino);
        match &self.wb {
            Some(wb) if kind == FileKind::File && self.backend.online() && wb.owner_here(nas) => {
                wb.flush_file(nas)
            }
            _ => Ok(()),
        }
    }

    /// While the NAS answers, a `user.*` xattr change of NAS object `ino`
    /// is kept for later as offline (`xattr_later`), with the rules of
    /// `keeps_set`: true when it was (or refused from what the cache knows
    /// fresh: EEXIST, ENODATA), false when the NAS is to be asked.
    fn keep_xattr(
        &self,
        ino: u64,
        (node, kind): (&B::Node, FileKind),
        (name, value): (&OsStr, Option<&[u8]>),
        flags: i32,
    ) -> FsResult<bool> {
        let user = is_user_xattr(name);
        // XATTR_CREATE and XATTR_REPLACE are the NAS's to answer: another
        // client may have set or removed the name meanwhile.
        if !user || flags != 0 || !self.backend.keeps_xattrs() {
            return Ok(false);
        }
        let Some(attr) = self.may_keep(ino) else {
            return Ok(false);
        };
        // user.* names take write permission (the owner's, for the owners
        // the NAS let this daemon write to).
        let proof = self.nas_proof.lock().unwrap_or_else(|e| e.into_inner());
        let writes = proof.writes.contains(&attr.uid) || proof.owners.contains(&attr.uid);
        if !(proof.any_owner || writes && attr.perm & 0o200 != 0) {
            return Ok(false);
        }
        // Nor a long value the NAS may have no room for (ext4 keeps about
        // 4 KiB an inode), unless it took one as long.
        if value.is_some_and(|v| v.len() > proof.xattr_len.max(255)) {
            return Ok(false);
        }
        drop(proof);
        let e = BackendError::errno("setxattr", libc::EIO);
        match self.xattr_later(ino, (node, kind), (name, value), flags, e, true) {
            Ok(()) => {
                Stats::inc(&self.stats.kept_changes);
                Ok(true)
            }
            Err(e) if e.errno() == libc::EIO => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The NAS does not answer (`e`): extended attribute `name` of an
    /// object on the NAS that the cache knows (by a name of it) is set to
    /// `value` (None: removed) here, and on the NAS once it answers
    /// ([`Backend::xattr_later`]). `e` where the cache cannot tell (it
    /// does not know the object's name, or whether it has the attribute
    /// when that matters: with `fresh`, from answers within their time to
    /// live only) or the backend cannot keep it.
    fn xattr_later(
        &self,
        ino: u64,
        (node, kind): (&B::Node, FileKind),
        (name, value): (&OsStr, Option<&[u8]>),
        flags: i32,
        e: BackendError,
        fresh: bool,
    ) -> FsResult<()> {
        // Those the NAS keeps as they are (not ACLs, which set the mode,
        // nor security labels).
        let user = is_user_xattr(name);
        let Some((attr, parent, at)) = self.known_name(ino).filter(|_| self.wb.is_some() && user)
        else {
            return Err(e.into());
        };
        // Whether it has it now, as far as the cache knows (of any age:
        // as getxattr answers while the NAS does not).
        let has = self.xattr_cache(ino, !fresh, |c| match c.values.get(name) {
            Some(v) => Some(v.is_ok()),
            None => c.list.as_deref().map(|l| xattr_listed(l, name)),
        });
        let refused = |errno| Err(BackendError::errno("setxattr", errno).into());
        match (value, has) {
            (None, Some(false)) => return refused(libc::ENODATA),
            (Some(_), Some(true)) if flags & libc::XATTR_CREATE != 0 => {
                return refused(libc::EEXIST);
            }
            (Some(_), Some(false)) if flags & libc::XATTR_REPLACE != 0 => {
                return refused(libc::ENODATA);
            }
            (None, None) => return Err(e.into()),
            (Some(_), None) if flags != 0 => return Err(e.into()),
            _ => {}
        }
        let dir = self.parent_node(parent)?;
        match self
            .backend
            .xattr_later((&dir, &at), node, kind, attr.validator(), (name, value))
        {
            Ok(()) => {}
            Err(x) if x.raw_errno() == libc::EIO => return Err(e.into()),
            Err(x) => return Err(x.into()),
        }
        // A NAS answer asked before is older than this.
        self.xattr_gen.fetch_add(1, Ordering::SeqCst);
        let mut t = self.tables();
        t.xattrs_set_here.insert(ino);
        if let Some(i) = t.inodes.get_mut(&ino) {
            // Filed under no ctime the NAS shows: offline it answers (of any
            // age), online the NAS does, with the changes kept here laid
            // over (and if the NAS refuses the change, without it). Kept
            // while the NAS answers, over what was known fresh, it is still
            // current: until the NAS makes it (its ctime moves then) or a
            // conflict (`drain_settled`).
            let current = fresh
                && i.attr_until > Instant::now()
                && i.xattrs.as_ref().is_none_or(|c| c.ctime == i.attr.ctime);
            let c = i.xattrs.get_or_insert_with(|| {
                Box::new(XattrCache {
                    ctime: std::time::UNIX_EPOCH,
                    list: None,
                    acls_listed: false,
                    values: HashMap::new(),
                })
            });
            c.ctime = match current {
                true => i.attr.ctime,
                false => std::time::UNIX_EPOCH,
            };
            let v = value.map(|v| v.to_vec()).ok_or(libc::ENODATA);
            c.values.insert(name.to_os_string(), v);
            if let Some(list) = c.list.as_mut() {
                *list = crate::backend::xattr_list_with(list, name, value.is_some());
            }
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

/// An order-independent digest of a directory listing's (name, inode,
/// kind) entries: equal listings give equal digests, whatever the hash
/// map order.
fn fingerprint<'a>(entries: impl Iterator<Item = (&'a OsStr, u64, FileKind)>) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    let h = BuildHasherDefault::<DefaultHasher>::default();
    entries.fold(0u64, |acc, e| acc.wrapping_add(h.hash_one(e)))
}

/// Whether listxattr names `name` whenever getxattr would find it. Not so
/// for the rest of the system namespace (NFSv4's system.nfs4_acl is never
/// listed), nor for trusted.* (listed to CAP_SYS_ADMIN only), nor for POSIX
/// ACLs unless the backend says so. A security.* name that an LSM answers
/// for never reaches nassync.
fn always_listed(name: &OsStr, lists_acls: bool) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let n = name.as_bytes();
    n.starts_with(b"user.")
        || n.starts_with(b"security.")
        || (lists_acls && (n == b"system.posix_acl_access" || n == b"system.posix_acl_default"))
}

/// Whether `name` is in the `user.*` namespace: what the NAS keeps as
/// it is (not ACLs, which set the mode, nor security labels).
fn is_user_xattr(name: &OsStr) -> bool {
    use std::os::unix::ffi::OsStrExt;
    name.as_bytes().starts_with(b"user.")
}

/// Whether a listxattr answer (NUL-terminated names) holds `name`.
fn xattr_listed(list: &[u8], name: &OsStr) -> bool {
    use std::os::unix::ffi::OsStrExt;
    list.split(|&b| b == 0).any(|n| n == name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn changed(ago: Duration) -> Attr {
        let t = SystemTime::now() - ago;
        Attr {
            ino: 2,
            kind: FileKind::File,
            perm: 0o644,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            size: 0,
            blocks: 0,
            blksize: 4096,
            atime: t,
            mtime: t,
            ctime: t,
        }
    }

    #[test]
    fn attributes_live_a_tenth_of_their_age_within_the_limits() {
        let (min, max) = (Duration::from_secs(3), Duration::from_secs(60));
        let ttl = |ago| adaptive(min, max, &changed(ago));
        assert_eq!(ttl(Duration::ZERO), min);
        assert_eq!(ttl(Duration::from_secs(20)), min);
        let mid = ttl(Duration::from_secs(300));
        assert!(
            mid >= Duration::from_secs(30) && mid < Duration::from_secs(31),
            "{mid:?}"
        );
        assert_eq!(ttl(Duration::from_secs(86400)), max);
        // The later of mtime and ctime counts: a chmod is a change.
        let mut a = changed(Duration::from_secs(86400));
        a.ctime = SystemTime::now();
        assert_eq!(adaptive(min, max, &a), min);
        // A NAS clock ahead of ours: no age at all.
        let mut a = changed(Duration::ZERO);
        a.mtime = SystemTime::now() + Duration::from_secs(3600);
        a.ctime = a.mtime;
        assert_eq!(adaptive(min, max, &a), min);
        // actimeo: a fixed lifetime.
        assert_eq!(
            adaptive(min, min, &changed(Duration::from_secs(86400))),
            min
        );
    }

    #[test]
    fn a_listing_digest_ignores_order_and_sees_any_change() {
        use FileKind::{Dir, File};
        let a = [("x", 1, File), ("y", 2, File), ("z", 3, Dir)];
        let fp = |v: &[(&str, u64, FileKind)]| {
            fingerprint(v.iter().map(|(n, i, k)| (OsStr::new(*n), *i, *k)))
        };
        assert_eq!(fp(&a), fp(&[("z", 3, Dir), ("x", 1, File), ("y", 2, File)]));
        assert_ne!(fp(&a), fp(&[("x", 1, File), ("y", 2, File)]));
        assert_ne!(fp(&a), fp(&[("x", 1, File), ("y", 2, File), ("z", 4, Dir)]));
        assert_ne!(fp(&a), fp(&[("x", 1, File), ("y", 2, File), ("w", 3, Dir)]));
        assert_ne!(
            fp(&a),
            fp(&[("x", 1, File), ("y", 2, File), ("z", 3, File)])
        );
    }

    #[test]
    fn only_names_that_listxattr_always_shows_are_answered_from_it() {
        let list = b"user.a\0security.selinux\0";
        assert!(xattr_listed(list, OsStr::new("user.a")));
        assert!(!xattr_listed(list, OsStr::new("user.")));
        assert!(!xattr_listed(list, OsStr::new("user.b")));
        let listed = |n: &str| always_listed(OsStr::new(n), true);
        assert!(listed("user.b"));
        assert!(listed("security.selinux"));
        assert!(listed("system.posix_acl_access"));
        // Served by cifs without being listed.
        assert!(!always_listed(OsStr::new("system.posix_acl_access"), false));
        assert!(!listed("system.nfs4_acl"));
        // Hidden from listxattr for a daemon without CAP_SYS_ADMIN.
        assert!(!listed("trusted.a"));
    }
}
