//! Objects created through the mount exist locally first.
//!
//! [`Overlay`] wraps the NAS backend. A create, mkdir, symlink or mknod
//! makes a *local object*: a provisional inode number, its attributes in
//! memory and in the journal (`objects` table), and for a file its content
//! in `upper/<prov>` under the cache directory. It returns at local-disk
//! speed, whether the NAS answers or not. Renames, unlinks, hard links and
//! attribute changes of local objects stay local too, so a temporary file
//! created and deleted before the write-back delay never reaches the NAS.
//! A hard link to a local file is a local object of its own (`link_to`),
//! shown as the file and made on the NAS together with it.
//!
//! The pending namespace changes are therefore creations; removals of
//! NAS objects, made while the NAS did not answer or vouched for by the
//! core's fresh cache while it does; and renames, hard links and
//! attribute changes of NAS objects made while it did not answer: the
//! NAS's tree with the local objects added, the removed names taken away
//! and the renamed objects shown at their new names (`removals`, one
//! ordered list: a rename's paths are those of after the changes before
//! it). The replay thread applies the removals and renames first, in the
//! order they were made, each only if the NAS still has the object
//! removed or renamed here (else it is a conflict and the NAS's object
//! stays), a rename never over anything (a name taken there meanwhile
//! gives the conflict name); then it creates the local objects on the NAS,
//! parents first, `writeback_delay` after their creation (or at once on
//! `flush`); the removals too wait that long. Everything else that
//! changes the NAS's namespace (link, rename, and the removals the cache
//! cannot vouch for, of an object that is on the NAS while it answers;
//! xattrs) goes to the NAS at once, after the pending removals and after
//! *materializing* the local objects it involves: those, and only those,
//! are created on the NAS first. Any order that creates parents first is
//! valid, because creations of distinct objects commute.
//!
//! A file is created on the NAS under a hidden name, filled, given its
//! mode and times, synced and renamed into place without replacing
//! anything: another client never sees half a file, and a name taken on
//! the NAS meanwhile gets the conflict name (both kept). Once created, an
//! object keeps its provisional inode number for the life of the mount
//! (and in the journal while a data row names it); the NAS's ctime of that
//! moment is shown as the local one, so that write-back and the block
//! cache see the same version as before.
//!
//! Lock order: `removing`, then `replay` (write-held by a creation that may
//! make directories; read-held by each of the files created several at a
//! time once their directories are on the NAS), then a local file's
//! `content`, then `window`, then its `stripes` (in ascending order), then
//! `state`. `state` is never held across a NAS call.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant, SystemTime};

use super::bounded::{is_unreachable, unreachable, where_name_known_absent};
use super::{
    Attr, BResult, Backend, BackendError, Creds, DirEntry, FileKind, OpenMode, RenameFlags,
    SetAttr, SetTime, StatFs, Validator,
};
use crate::cache::CacheError;
use crate::writeback::journal::{
    AliasRecord, ConflictRecord, Journal, LeftoverRecord, ObjParent, ObjectRecord, RemovalRecord,
    SetRecord, XattrRecord, join_bytes,
};
use crate::writeback::{Moved, OwnMeta, PendingInfo, Staged, conflict_name, conflict_stamp, under};

/// Provisional inode numbers: far above any a NAS hands out in practice.
pub const PROV_BASE: u64 = 0xFFFF_0000_0000_0000;

/// Names the replay uses on the NAS while a file is being filled.
const HIDDEN: &[u8] = b".nassync-new-";

/// How many stripes `Overlay::window` has.
const STRIPES: usize = 64;

/// The stripe of directory `ino` (provisional numbers differ in their
/// low bits, the NAS's anywhere: mixed first).
fn stripe(ino: u64) -> usize {
    (ino.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize % STRIPES
}

/// The stripes of `dirs`, each once, in the order they are taken (always
/// ascending: two placements or a placement and a rename never wait for
/// each other in a circle).
fn stripes_of(dirs: &[u64]) -> Vec<usize> {
    let mut v: Vec<usize> = dirs.iter().map(|d| stripe(*d)).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Directories a new file is being placed in, for the time it takes: their
/// NAS times are about to move by nassync's own doing (see
/// `Overlay::quiet`), so whoever is shown them meanwhile (a lookup from
/// their parent, which does not hold their stripe) gets them as shown
/// last.
struct Placing<'a, B: Backend> {
    ov: &'a Overlay<B>,
    dirs: Vec<u64>,
}

impl<'a, B: Backend> Placing<'a, B> {
    fn new(ov: &'a Overlay<B>, dirs: Vec<u64>) -> Self {
        let mut st = ov.st();
        for d in &dirs {
            *st.placing.entry(*d).or_default() += 1;
        }
        drop(st);
        Placing { ov, dirs }
    }
}

impl<B: Backend> Drop for Placing<'_, B> {
    fn drop(&mut self) {
        let mut st = self.ov.st();
        for d in &self.dirs {
            if let Some(n) = st.placing.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    st.placing.remove(d);
                }
            }
        }
    }
}

/// A lock guard, kept only to be released when dropped.
#[allow(dead_code)]
enum Guard<'a> {
    Read(RwLockReadGuard<'a, ()>),
    Write(RwLockWriteGuard<'a, ()>),
}

/// What is held of `Overlay::window`: all of it, or read-held with some
/// of its stripes.
struct Window<'a> {
    _all: Guard<'a>,
    _stripes: Vec<Guard<'a>>,
}

fn hidden_name(prov: u64) -> OsString {
    let mut n = HIDDEN.to_vec();
    n.extend_from_slice(format!("{prov:016x}").as_bytes());
    OsString::from(OsStr::from_bytes(&n))
}

/// The cache directory's filesystem cannot hold that offset or size.
fn too_big(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::EFBIG)
}

fn is_hidden(name: &OsStr) -> bool {
    name.as_bytes().starts_with(HIDDEN)
}

/// Picks the leftovers recorded at `name` in `dir` (with `known`, only
/// those whose NAS number is known).
fn leftover_at<N>(dir: u64, name: &OsStr, known: bool) -> impl Fn(&Leftover<N>) -> bool + '_ {
    move |l| l.dir_ino == dir && l.name == name && (!known || l.nas_ino.is_some())
}

/// The local object whose hidden name `name` is (see [`hidden_name`]).
fn prov_of_hidden(name: &OsStr) -> Option<u64> {
    let hex = name.as_bytes().strip_prefix(HIDDEN)?;
    u64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

fn err(op: &'static str, errno: i32) -> BackendError {
    BackendError::errno(op, errno)
}

fn io(op: &'static str) -> impl Fn(std::io::Error) -> BackendError {
    move |e| BackendError::new(op, e)
}

fn journal_err(op: &'static str) -> impl Fn(CacheError) -> BackendError {
    move |e| BackendError::new(op, std::io::Error::other(e.to_string()))
}

/// A node: an object on the NAS (`nas`), or a local object (`nas: None`,
/// found by its provisional number, and on the NAS too once created).
#[derive(Clone, Debug)]
pub struct ONode<N> {
    /// The inode number shown (a provisional one stays).
    ino: u64,
    nas: Option<N>,
}

/// What the open files of a local file share (each has its own
/// descriptor of `upper/<prov>`: no descriptor is held for a file that
/// is not open).
pub struct Content<B: Backend> {
    prov: u64,
    /// Read-held by I/O, write-held while the file is created on the NAS.
    lock: RwLock<()>,
    /// Set once the file is on the NAS: I/O goes there from then on.
    nas: Mutex<Option<NasCopy<B>>>,
    promoted: AtomicBool,
}

/// A created file's NAS node, and its NAS file once opened.
type NasCopy<B> = (<B as Backend>::Node, Option<Arc<<B as Backend>::File>>);

/// A new object: its provisional number, attributes, and for a file its
/// content and an open descriptor of it.
type Made<B> = (u64, Attr, Option<(Arc<Content<B>>, File)>);

/// An open file: on the NAS, or local (its upper file, and whether it
/// appends).
pub enum OFile<B: Backend> {
    Nas(B::File, u64),
    Local(Arc<Content<B>>, File, bool),
}

struct Obj<B: Backend> {
    attr: Attr,
    target: Option<OsString>,
    /// The directory it is in (shown inode number) and its name there.
    parent: u64,
    name: OsString,
    /// The NAS node of `parent` when that is on the NAS.
    parent_nas: Option<B::Node>,
    /// On the NAS (created): its node there.
    nas: Option<B::Node>,
    /// Removed before it reached the NAS.
    gone: bool,
    content: Option<Arc<Content<B>>>,
    created: Instant,
    /// A failed attempt: not retried before this.
    retry_at: Option<Instant>,
    attempts: u32,
    error: Option<String>,
    applying: bool,
    /// Its owner set here since the last attempt at making it on the NAS
    /// began (not known after a restart: taken as set while `applying`).
    chowned: bool,
    /// See [`ObjectRecord::nas_ino`].
    nas_ino: Option<u64>,
    /// A further name of local file `link_to` (a hard link made here):
    /// shown as that file, made on the NAS with it (see `place_links`).
    link_to: Option<u64>,
}

/// A directory on the NAS: where it is (for paths in the journal) and
/// what its children inherit.
#[derive(Clone)]
struct NasDir {
    parent: u64,
    name: OsString,
    perm: u16,
    gid: u32,
}

/// Mode and times a directory created here gets once its children are on
/// the NAS (creating them would move the mtime).
#[derive(Clone, Copy)]
struct Deferred {
    perm: Option<u16>,
    atime: SystemTime,
    mtime: SystemTime,
}

/// What an attempt to create an object on the NAS that did not finish may
/// have left there, to remove once the object moved or went away here.
struct Leftover<N> {
    id: u64,
    dir: N,
    /// The directory's inode number as shown.
    dir_ino: u64,
    name: OsString,
    hidden: OsString,
    kind: FileKind,
    size: u64,
    target: Option<OsString>,
    nas_ino: Option<u64>,
}

/// A NAS object removed (or renamed: `to`) here while the NAS did not
/// answer, still to remove (rename) there: not shown meanwhile (shown
/// at its new name).
#[derive(Clone)]
struct Removal<N> {
    id: u64,
    dir: N,
    /// The directory's inode number as shown.
    dir_ino: u64,
    /// Its path when removed (for status and the log).
    path: OsString,
    name: OsString,
    kind: FileKind,
    /// The version removed here: another one found there is kept.
    was: Validator,
    since: Instant,
    /// Why the last attempt did not finish (the NAS did not answer).
    error: Option<String>,
    to: Option<MoveTo<N>>,
    /// Neither removed nor renamed: attributes set here.
    set: Option<SetHere<N>>,
    /// Made for the rename over it that follows, in the same journal
    /// transaction (see [`Overlay::replacing_move_stale`]).
    for_next: bool,
}

impl<N> Removal<N> {
    /// Whether it takes its name away (a removal, a rename; not a link
    /// or a change of attributes).
    fn takes_name(&self) -> bool {
        self.set.is_none() && !self.to.as_ref().is_some_and(|t| t.link)
    }

    /// Its paths (where the object is, where it goes) at or under `old`
    /// (`below`: only under it) are under `new` now.
    fn follow(&mut self, old: &OsStr, new: &OsStr, below: bool) {
        let paths = std::iter::once(&mut self.path).chain(self.to.as_mut().map(|t| &mut t.path));
        for p in paths {
            if below && p.as_os_str() == old {
                continue;
            }
            if let Some(np) = moved_path(p, old, new) {
                *p = np;
            }
        }
    }
}

/// Attributes of a NAS object set here, to set there.
#[derive(Clone)]
struct SetHere<N> {
    node: N,
    rec: SetRecord,
    /// An extended attribute instead (`rec` then sets nothing).
    xattr: Option<XattrRecord>,
}

/// Where a NAS object renamed here goes.
#[derive(Clone)]
struct MoveTo<N> {
    /// The object itself: shown at its new name until renamed there.
    node: N,
    /// None: a directory made here, not on the NAS yet when the change
    /// was made; made there first at the replay.
    dir: Option<N>,
    /// The directory's inode number as shown.
    dir_ino: u64,
    name: OsString,
    /// Its new path (for status and the log).
    path: OsString,
    /// A hard link: the object keeps its name too.
    link: bool,
}

/// The directories made here, by path (their journal rows), and the
/// journal's next provisional number, at open.
struct NewDirs {
    by_path: HashMap<OsString, ObjectRecord>,
    next_prov: u64,
}

/// What pending removals and renames make of a name (see
/// [`Overlay::pending_at`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum AtName {
    /// They do not touch it: the NAS's answer stands.
    Nas,
    Gone,
    /// The rename of this id renamed a NAS object there.
    MovedIn(u64),
}

struct State<B: Backend> {
    objs: HashMap<u64, Obj<B>>,
    leftovers: Vec<Leftover<B::Node>>,
    /// In the order they were made.
    removals: VecDeque<Removal<B::Node>>,
    /// Renames into new directories turned into removals (row id: the
    /// rename and the version it had), until made on the NAS: for
    /// `undo_remove_later`.
    unmoved: HashMap<u64, (MoveTo<B::Node>, Validator)>,
    /// Local objects not on the NAS yet, per directory (shown inode).
    children: HashMap<u64, BTreeMap<OsString, u64>>,
    /// A local file's further names (hard links made here), by the
    /// file's provisional number.
    links: HashMap<u64, BTreeSet<u64>>,
    dirs: HashMap<u64, NasDir>,
    /// NAS inode number -> the provisional one it is shown as.
    alias: HashMap<u64, AliasRecord>,
    /// Directories with local children: when they last changed here.
    touched: HashMap<u64, SystemTime>,
    deferred: HashMap<u64, Deferred>,
    /// The NAS nodes of `deferred` directories, where known: found again
    /// by path, a directory renamed since may not be (its mode was then
    /// dropped).
    deferred_nodes: HashMap<u64, B::Node>,
    /// Whether a NAS directory has a default ACL (then creations in it
    /// go to the NAS, which applies it).
    acl_default: HashMap<u64, bool>,
    /// Extended attributes set here on local files and directories (not
    /// ACLs: see `local_xattr`), made on the NAS with them.
    xattrs: HashMap<u64, BTreeMap<OsString, Vec<u8>>>,
    /// Directories this mount created on the NAS: names in them are not
    /// checked there before a creation (nobody else is expected to add
    /// any; one that did meanwhile makes a conflict, as offline).
    own: HashSet<u64>,
    /// A directory's (mtime, ctime) as last shown, and as shown while the
    /// NAS's are those right after nassync's own creations in it (which
    /// change nothing in the view: the objects were shown already).
    shown: HashMap<u64, (SystemTime, SystemTime)>,
    masks: HashMap<u64, Mask>,
    /// See [`Placing`].
    placing: HashMap<u64, u32>,
    next_prov: u64,
    root: u64,
}

struct Mask {
    nas: (SystemTime, SystemTime),
    shown: (SystemTime, SystemTime),
}

struct Sched {
    kick: bool,
    all: bool,
    stop: bool,
    /// Until when the replay thread sleeps (None: it is working, and
    /// looks at every object before it sleeps again).
    sleeping_until: Option<Instant>,
}

/// A local object not on the NAS yet, for `nassync status`.
pub struct PendingObject {
    pub path: OsString,
    pub kind: FileKind,
    /// A NAS object removed here, not yet there (else a new object).
    pub removed: bool,
    /// A NAS object renamed (or, with `link`, hard-linked) here, not yet
    /// there: its new path (`path` is its old one).
    pub moved_to: Option<OsString>,
    pub link: bool,
    /// A NAS object whose attributes were set here, not yet there.
    pub set: bool,
    pub age: Duration,
    pub attempts: u32,
    pub error: Option<String>,
}

/// See the module documentation.
pub struct Overlay<B: Backend> {
    lower: Arc<B>,
    journal: Arc<Journal>,
    delay: Duration,
    host: String,
    /// Whether the NAS keeps user xattrs: those of new objects are then
    /// kept here until they are created there (`local_xattr`).
    xattrs_ok: bool,
    state: Mutex<State<B>>,
    /// Write-held by a creation on the NAS that may make directories;
    /// read-held by each of the files made several at a time.
    replay: RwLock<()>,
    /// Held while removals made offline are applied on the NAS (in order).
    removing: Mutex<()>,
    /// Write-held from the NAS call that puts a new object in its
    /// directory until the view knows it is there; read-held by getattr
    /// and readdir of directories, which combine the NAS's answer with
    /// the local children (and would count it twice, or miss it). A new
    /// file is placed with `window` read-held and only the `stripes` of
    /// its directories write-held: readers of other directories carry on,
    /// and files of several directories are placed at once.
    window: RwLock<()>,
    /// Each read-held with `window` by a reader of a directory whose
    /// inode number maps to it (see [`stripe`]).
    stripes: Box<[RwLock<()>]>,
    sched: Mutex<Sched>,
    wake: Condvar,
    progress: Condvar,
    upper_synced: AtomicBool,
    /// Whether write-back has data of a local file still to put into its
    /// upper file (see [`Staged::watch_data`]).
    data_pending: std::sync::OnceLock<Box<dyn Fn(u64) -> bool + Send + Sync>>,
    /// Tells write-back that nassync itself moved a file's ctime on the
    /// NAS (see [`Staged::watch_own_meta`]).
    own_meta: std::sync::OnceLock<OwnMeta>,
    /// Tells write-back that paths under one are now under another (see
    /// [`Staged::watch_moved`]).
    moved: std::sync::OnceLock<Moved>,
    created: AtomicU64,
    conflicts: AtomicU64,
    retries: AtomicU64,
}

fn now() -> SystemTime {
    crate::clock::now()
}

/// `dir/name`, or `name` in the share's root.
fn join_path(dir: &OsStr, name: &OsStr) -> OsString {
    OsString::from_vec(join_bytes(dir.as_bytes(), name.as_bytes()))
}

/// `p`, `old` or a path under it, moved to `new`.
fn moved_path(p: &OsStr, old: &OsStr, new: &OsStr) -> Option<OsString> {
    crate::writeback::journal::under_moved(p.as_bytes(), old, new).map(OsString::from_vec)
}

/// The directories on the way down to `path` (from the share's root):
/// the path of each, and its name.
fn path_steps(path: &OsStr) -> impl Iterator<Item = (OsString, &OsStr)> {
    let mut here = OsString::new();
    path.as_bytes()
        .split(|b| *b == b'/')
        .filter(|c| !c.is_empty())
        .map(move |c| {
            let name = OsStr::from_bytes(c);
            here = join_path(&here, name);
            (here.clone(), name)
        })
}

fn kind_name(k: FileKind) -> &'static str {
    match k {
        FileKind::File => "file",
        FileKind::Dir => "dir",
        FileKind::Symlink => "symlink",
        _ => "special",
    }
}

impl<B: Backend> Overlay<B> {
    /// Takes up the local objects the journal holds (the NAS must answer:
    /// the directories they are in are found again by path).
    pub fn open(
        lower: Arc<B>,
        journal: Arc<Journal>,
        delay: Duration,
        host: String,
    ) -> Result<Arc<Overlay<B>>, CacheError> {
        let setup = |e: BackendError| CacheError::Setup {
            path: journal.upper_dir().display().to_string(),
            reason: e.to_string(),
        };
        let (root_node, root_attr) = lower.root().map_err(setup)?;
        // Whether the NAS keeps user xattrs (not a kernel NFSv3 mount, not
        // nfs://): asking for one it does not have says so (reading only).
        let xattrs_ok = lower.keeps_xattrs()
            && matches!(
                lower.getxattr(&root_node, OsStr::new("user.nassync-probe")),
                Err(e) if e.raw_errno() == libc::ENODATA
            );
        // Aliases no data row names: nothing knows those numbers any more.
        journal.prune_aliases()?;
        let aliases = journal.load_aliases()?;
        let mut st = State {
            objs: HashMap::new(),
            leftovers: Vec::new(),
            removals: VecDeque::new(),
            unmoved: HashMap::new(),
            children: HashMap::new(),
            links: HashMap::new(),
            dirs: HashMap::new(),
            alias: aliases.iter().map(|a| (a.nas_ino, *a)).collect(),
            touched: HashMap::new(),
            deferred: HashMap::new(),
            deferred_nodes: HashMap::new(),
            acl_default: HashMap::new(),
            xattrs: HashMap::new(),
            own: HashSet::new(),
            shown: HashMap::new(),
            masks: HashMap::new(),
            placing: HashMap::new(),
            next_prov: PROV_BASE + 1,
            root: root_attr.ino,
        };
        for a in &aliases {
            st.next_prov = st.next_prov.max(a.prov + 1);
        }
        st.dirs.insert(
            root_attr.ino,
            NasDir {
                parent: root_attr.ino,
                name: OsString::new(),
                perm: root_attr.perm,
                gid: root_attr.gid,
            },
        );
        let ov = Overlay {
            lower,
            journal,
            delay,
            host,
            xattrs_ok,
            state: Mutex::new(st),
            replay: RwLock::new(()),
            removing: Mutex::new(()),
            window: RwLock::new(()),
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            sched: Mutex::new(Sched {
                kick: false,
                all: false,
                stop: false,
                sleeping_until: None,
            }),
            wake: Condvar::new(),
            progress: Condvar::new(),
            upper_synced: AtomicBool::new(true),
            data_pending: std::sync::OnceLock::new(),
            own_meta: std::sync::OnceLock::new(),
            moved: std::sync::OnceLock::new(),
            created: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        };
        // Renames made here change the paths that the rows after them name:
        // made on the NAS now, in order with the removals around them.
        let mut changes = ov.journal.load_removals()?;
        // Directories given times here: set again once the new objects in
        // them are there (creating those moves them).
        let mut retimed = Vec::new();
        // Directories made here that such renames go into are made on the
        // NAS with them, and taken as theirs once the objects are loaded.
        let mut made_dirs = Vec::new();
        if changes.iter().any(|r| r.to.is_some() || r.set.is_some()) {
            let mut new_dirs = Self::new_dir_paths(ov.journal.load_objects()?);
            let mut queue: VecDeque<RemovalRecord> = std::mem::take(&mut changes).into();
            while let Some(r) = queue.pop_front() {
                let nas_target = Self::target_freed_after(&r, &queue);
                let (attr, repathed) = ov.apply_at_open(
                    &root_node,
                    root_attr.ino,
                    &r,
                    (&mut new_dirs, &mut made_dirs, nas_target),
                )?;
                retimed.extend(attr);
                if repathed {
                    queue = ov.journal.load_removals()?.into();
                    new_dirs = Self::new_dir_paths(ov.journal.load_objects()?);
                }
            }
        }
        // (Read after: a rename that got the conflict name moved rows.)
        let (records, next) = ov.journal.load_objects()?;
        {
            let mut st = ov.st();
            st.next_prov = st.next_prov.max(next);
        }
        {
            let xattrs = ov.journal.xattrs()?;
            let mut st = ov.st();
            for (p, name, value) in xattrs {
                st.xattrs.entry(p).or_default().insert(name, value);
            }
        }
        let mut known = HashSet::new();
        for r in records {
            let (parent, parent_nas) = match &r.parent {
                ObjParent::Local(p) => (*p, None),
                ObjParent::Nas(path) => match ov.walk(&root_node, root_attr.ino, path) {
                    Ok((node, ino)) => (ino, Some(node)),
                    // Its directory went away on the NAS (or a rename made
                    // here could not be made there): created again, so
                    // that the object lands where it was shown.
                    Err(e) => match ov
                        .make_path(path)
                        .and_then(|_| ov.walk(&root_node, root_attr.ino, path))
                    {
                        Ok((node, ino)) => (ino, Some(node)),
                        Err(e2) => {
                            log::warn!(
                                "journal: the directory {path:?} of a new object is gone ({e}), \
                                 and cannot be made again ({e2}); it goes into the share's root"
                            );
                            (root_attr.ino, Some(root_node.clone()))
                        }
                    },
                },
            };
            // A further name of a local file, whose row comes first (a
            // lower number).
            let link_attr = match r.link_to {
                Some(f) => match ov.st().objs.get(&f).filter(|o| o.link_to.is_none()) {
                    Some(o) => Some(o.attr),
                    None => {
                        log::warn!(
                            "journal: the file of hard link {:?} is not a new file any more; \
                             the name is dropped",
                            r.name
                        );
                        ov.journal.delete_object(r.prov)?;
                        continue;
                    }
                },
                None => None,
            };
            let mut upper_len = 0;
            let content = if r.kind == FileKind::File && r.link_to.is_none() {
                let path = ov.journal.upper_path(r.prov);
                known.insert(path.clone());
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .open(&path)?;
                upper_len = f.metadata()?.len();
                Some(Arc::new(Content {
                    prov: r.prov,
                    lock: RwLock::new(()),
                    nas: Mutex::new(None),
                    promoted: AtomicBool::new(false),
                }))
            } else {
                None
            };
            let size = match (&content, &r.target) {
                (Some(_), _) => upper_len,
                (None, Some(t)) => t.len() as u64,
                _ if r.kind == FileKind::Dir => 4096,
                _ => 0,
            };
            let attr = Attr {
                ino: r.prov,
                kind: r.kind,
                perm: r.perm,
                nlink: if r.kind == FileKind::Dir { 2 } else { 1 },
                uid: r.uid,
                gid: r.gid,
                rdev: r.rdev,
                size,
                blocks: size.div_ceil(512),
                blksize: 4096,
                atime: r.atime,
                mtime: r.mtime,
                ctime: r.ctime,
            };
            let attr = link_attr.unwrap_or(attr);
            let mut st = ov.st();
            st.next_prov = st.next_prov.max(r.prov + 1);
            if let Some(f) = r.link_to {
                st.links.entry(f).or_default().insert(r.prov);
                if let Some(o) = st.objs.get_mut(&f) {
                    o.attr.nlink += 1;
                }
            }
            let mut name = r.name.clone();
            if st
                .children
                .get(&parent)
                .is_some_and(|m| m.contains_key(&name))
            {
                // Cannot happen unless the journal was edited; keep both.
                name.push(format!(".nassync-{:x}", r.prov));
            }
            st.children
                .entry(parent)
                .or_default()
                .insert(name.clone(), r.prov);
            if r.kind == FileKind::Dir {
                if let Some(p) = st.objs.get_mut(&parent) {
                    p.attr.nlink += 1;
                }
            }
            st.objs.insert(
                r.prov,
                Obj {
                    attr,
                    target: r.target.clone(),
                    parent,
                    name,
                    parent_nas,
                    nas: None,
                    gone: false,
                    content,
                    created: Instant::now(),
                    retry_at: None,
                    attempts: 0,
                    error: None,
                    applying: r.applying,
                    chowned: r.applying,
                    nas_ino: r.nas_ino,
                    link_to: r.link_to,
                },
            );
        }
        for p in made_dirs {
            let found = {
                let mut st = ov.st();
                match st.objs.get_mut(&p) {
                    Some(o) if !o.gone && o.nas.is_none() => {
                        o.applying = true;
                        true
                    }
                    _ => false,
                }
            };
            if found {
                let persisted = ov.persist(&ov.st(), p);
                match persisted.and_then(|()| ov.promote_chain_now(p)) {
                    Ok(_) => {}
                    Err(e) if is_unreachable(&e) => {
                        return Err(CacheError::Setup {
                            path: ov.journal.upper_dir().display().to_string(),
                            reason: format!("creating a new directory on the NAS: {e}"),
                        });
                    }
                    // Tried again by the write-back, as any new directory.
                    Err(e) => log::warn!("journal: a new directory on the NAS: {e}"),
                }
            }
        }
        {
            let mut st = ov.st();
            for a in retimed {
                if st.children.contains_key(&a.ino) {
                    let d = Deferred {
                        perm: Some(a.perm),
                        atime: a.atime,
                        mtime: a.mtime,
                    };
                    st.deferred.insert(a.ino, d);
                }
            }
        }
        for l in ov.journal.load_leftovers()? {
            match ov.walk(&root_node, root_attr.ino, &l.dir_path) {
                Ok((dir, dir_ino)) => ov.st().leftovers.push(Leftover {
                    id: l.id,
                    dir,
                    dir_ino,
                    name: l.name,
                    hidden: l.hidden,
                    kind: l.kind,
                    size: l.size,
                    target: l.target,
                    nas_ino: l.nas_ino,
                }),
                // Its directory is gone, and with it what was left there.
                Err(_) => ov.journal.delete_leftover(l.id)?,
            }
        }
        for r in changes {
            match ov.walk(&root_node, root_attr.ino, &r.dir_path) {
                Ok((dir, dir_ino)) => ov.st().removals.push_back(Removal {
                    id: r.id,
                    dir,
                    dir_ino,
                    path: join_path(&r.dir_path, &r.name),
                    name: r.name,
                    kind: r.kind,
                    was: r.was,
                    since: Instant::now(),
                    error: None,
                    to: None,
                    set: None,
                    for_next: false,
                }),
                // Its directory is gone from there (removed, or renamed
                // by another client): what was to go is not found again.
                Err(e) if e.raw_errno() == libc::ENOENT => {
                    let path = join_path(&r.dir_path, &r.name);
                    ov.note_conflict(
                        &path,
                        &path,
                        "removed here, but its directory is no longer there on the NAS: \
                         nothing removed",
                    );
                    ov.journal.delete_removal(r.id)?
                }
                Err(e) => {
                    return Err(CacheError::Setup {
                        path: ov.journal.upper_dir().display().to_string(),
                        reason: format!("finding {:?} again: {e}", r.dir_path),
                    });
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(ov.journal.upper_dir()) {
            for e in entries.flatten() {
                if !known.contains(&e.path()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let pending = {
            let st = ov.st();
            st.objs.len() + st.leftovers.len() + st.removals.len()
        };
        if pending > 0 {
            log::info!("journal: {pending} new objects still to create on the NAS");
            ov.sched().kick = true;
        }
        Ok(Arc::new(ov))
    }

    /// Whether a row after `r`, a rename or link, removes or renames away
    /// its target directory or one above it: then that directory was the
    /// NAS's when `r` was made, even where a directory made here has its
    /// path now (`mv f P/; mv P Q; mkdir P`).
    fn target_freed_after(r: &RemovalRecord, later: &VecDeque<RemovalRecord>) -> bool {
        let Some((td, _)) = &r.to else { return false };
        later.iter().any(|q| {
            let frees = q.set.is_none() && !(q.to.is_some() && q.link);
            frees && crate::writeback::under(td, Some(&join_path(&q.dir_path, &q.name)))
        })
    }

    /// The paths of the directories made here (journal rows `records`),
    /// with their row.
    fn new_dir_paths((records, next_prov): (Vec<ObjectRecord>, u64)) -> NewDirs {
        let by: HashMap<u64, &ObjectRecord> = records.iter().map(|r| (r.prov, r)).collect();
        fn path<'a>(
            by: &HashMap<u64, &'a ObjectRecord>,
            mut r: &'a ObjectRecord,
        ) -> Option<OsString> {
            let mut names = vec![r.name.clone()];
            for _ in 0..4096 {
                match &r.parent {
                    ObjParent::Nas(p) => {
                        return Some(names.iter().rev().fold(p.clone(), |a, n| join_path(&a, n)));
                    }
                    ObjParent::Local(q) => {
                        r = by.get(q)?;
                        names.push(r.name.clone());
                    }
                }
            }
            None
        }
        let by_path = records
            .iter()
            .filter(|r| r.kind == FileKind::Dir && r.link_to.is_none())
            .filter_map(|r| Some((path(&by, r)?, r.clone())))
            .collect();
        NewDirs { by_path, next_prov }
    }

    /// At open, the target directory `td` of a rename or link (to `tn`)
    /// is on the NAS: if it is one made here (`new_dirs`), made there by
    /// nassync (an earlier mount, or a creation cut short), it is taken as
    /// the new directory at this mount, with the new ones above it (noted
    /// in `made`); not made by nassync, another client took its name
    /// meanwhile: the object goes into that one (the new directory gets
    /// the conflict name), a conflict.
    fn found_new_dir(&self, (td, tn): (&OsStr, &OsStr), new_dirs: &NewDirs, made: &mut Vec<u64>) {
        match new_dirs.by_path.get(td) {
            Some(o) if o.applying => {
                for (here, _) in path_steps(td) {
                    if let Some(o) = new_dirs.by_path.get(&here) {
                        if o.applying && !made.contains(&o.prov) {
                            made.push(o.prov);
                        }
                    }
                }
            }
            Some(_) => {
                let shown = join_path(td, tn);
                self.note_conflict(
                    &shown,
                    &shown,
                    "renamed here into a new directory whose name was taken on the NAS \
                     meanwhile: it went into the NAS's directory",
                );
            }
            None => {}
        }
    }

    /// At open, for a rename or link into `path`, a directory made here
    /// (`new_dirs`) and not on the NAS yet: it is made there, with the new
    /// directories above it (noted in `made`). None where `path` is not
    /// one, or a directory above it is gone from the NAS.
    fn make_new_dirs(
        &self,
        root: &B::Node,
        (path, tn): (&OsStr, &OsStr),
        new_dirs: &mut NewDirs,
        made: &mut Vec<u64>,
    ) -> Result<Option<B::Node>, CacheError> {
        let setup = |reason: String| CacheError::Setup {
            path: self.journal.upper_dir().display().to_string(),
            reason,
        };
        if !new_dirs.by_path.contains_key(path) {
            return Ok(None);
        }
        let mut node = root.clone();
        for (here, name) in path_steps(path) {
            node = match self.lower.lookup(&node, name) {
                Ok((n, a)) if a.kind == FileKind::Dir => {
                    // A new directory's name taken by another client: as
                    // in `found_new_dir`, into that one, a conflict.
                    if new_dirs.by_path.get(&here).is_some_and(|r| !r.applying) {
                        let shown = join_path(path, tn);
                        self.note_conflict(
                            &shown,
                            &shown,
                            "renamed here into a new directory under one whose name was taken \
                             on the NAS meanwhile: it went under the NAS's directory",
                        );
                    }
                    n
                }
                // Something else there now: gone as a directory.
                Ok(_) => return Ok(None),
                Err(e) if e.raw_errno() == libc::ENOENT => match new_dirs.by_path.get(&here) {
                    Some(r) => {
                        // Its row says first that the NAS may hold it: a
                        // crash before it is taken as the new directory
                        // leaves it taken then, not a conflict.
                        let was = r.clone();
                        let mut r = r.clone();
                        r.applying = true;
                        self.journal.put_object(&r, new_dirs.next_prov)?;
                        let creds = Creds {
                            uid: r.uid,
                            gid: r.gid,
                            umask: 0,
                        };
                        let mode = (r.perm & 0o777) as u32 | 0o700;
                        match self.lower.mkdir(&node, name, mode, creds) {
                            Ok((n, _)) => {
                                made.push(r.prov);
                                new_dirs.by_path.insert(here.clone(), r);
                                n
                            }
                            Err(e) if is_unreachable(&e) => {
                                return Err(setup(format!("making {here:?} on the NAS: {e}")));
                            }
                            // Refused: made later as any new directory
                            // (the rename stays undone, a conflict).
                            Err(e) => {
                                log::warn!("journal: {here:?} cannot be made on the NAS: {e}");
                                self.journal.put_object(&was, new_dirs.next_prov)?;
                                return Ok(None);
                            }
                        }
                    }
                    None => return Ok(None),
                },
                Err(e) if is_unreachable(&e) => {
                    return Err(setup(format!("finding {here:?} again: {e}")));
                }
                Err(e) => {
                    log::warn!("journal: {here:?} cannot be found on the NAS: {e}");
                    return Ok(None);
                }
            };
        }
        Ok(Some(node))
    }

    /// Makes on the NAS a removal, rename, link or change of attributes
    /// recorded by an earlier mount (the NAS must answer), then drops its
    /// row. A directory whose times it set: its attributes after; and
    /// whether later rows were rewritten (a rename got the conflict name).
    fn apply_at_open(
        &self,
        root: &B::Node,
        root_ino: u64,
        r: &RemovalRecord,
        (new_dirs, made, nas_target): (&mut NewDirs, &mut Vec<u64>, bool),
    ) -> Result<(Option<Attr>, bool), CacheError> {
        let mut retimed = None;
        let mut repathed = false;
        let setup = |reason: String| CacheError::Setup {
            path: self.journal.upper_dir().display().to_string(),
            reason,
        };
        let path = join_path(&r.dir_path, &r.name);
        let find = |p: &OsStr| match self.walk(root, root_ino, p) {
            Ok((n, _)) => Ok(Some(n)),
            // Gone, or no longer a directory.
            Err(e) if matches!(e.raw_errno(), libc::ENOENT | libc::ENOTDIR) => Ok(None),
            Err(e) => Err(setup(format!("finding {p:?} again: {e}"))),
        };
        // (what is shown as changed, where the NAS's object is, why)
        let outcome = match (&r.to, find(&r.dir_path)?) {
            (None, Some(d)) if r.set.is_some() => match self.lower.lookup(&d, &r.name) {
                Ok((node, _)) => {
                    let set = r.set.unwrap_or_else(|| unreachable!());
                    let done = self.set_on_nas(&node, &r.was, (&set, r.xattr.as_ref()), r.was.ino);
                    if let (Ok(None), FileKind::Dir, Some(_)) = (&done, r.kind, set.mtime) {
                        retimed = self.lower.getattr(&node).ok();
                    }
                    done.map(|c| c.map(|why| (path.clone(), path.clone(), why)))
                }
                Err(e) if matches!(e.raw_errno(), libc::ENOENT | libc::ESTALE) => Ok(Some((
                    path.clone(),
                    path.clone(),
                    "attributes set here, and removed on the NAS meanwhile".to_string(),
                ))),
                Err(e) => Err(e),
            },
            // Its directory is gone, and with it what was to go.
            (None, None) => Ok(None),
            (None, Some(d)) => self
                .remove_on_nas(&d, &r.name, r.kind, &r.was)
                .map(|c| c.map(|why| (path.clone(), path.clone(), why))),
            (Some((td, tn)), None) => Ok(Some((
                join_path(td, tn),
                path.clone(),
                "renamed here, and its directory removed on the NAS meanwhile: nothing to rename"
                    .to_string(),
            ))),
            (Some((td, tn)), Some(d)) => match match find(td)? {
                // The NAS's directory then (see `target_freed_after`).
                n if nas_target => n,
                None => self.make_new_dirs(root, (td, tn), new_dirs, made)?,
                Some(n) => {
                    self.found_new_dir((td, tn), new_dirs, made);
                    Some(n)
                }
            } {
                None => Ok(Some((
                    join_path(td, tn),
                    path.clone(),
                    "renamed here into a directory removed on the NAS meanwhile: \
                     it stays where it was"
                        .to_string(),
                ))),
                Some(nd) => {
                    let done = match r.link {
                        true => match self.lower.lookup(&d, &r.name) {
                            Ok((node, _)) => self.link_on_nas(&node, &r.was, (&nd, tn), r.was.ino),
                            Err(e) if matches!(e.raw_errno(), libc::ENOENT | libc::ESTALE) => {
                                Ok(Some((
                                    "linked here, and removed on the NAS meanwhile: no link made"
                                        .into(),
                                    None,
                                )))
                            }
                            Err(e) => Err(e),
                        },
                        false => {
                            self.move_on_nas((&d, &r.name), (&nd, tn), r.kind, &r.was, r.was.ino)
                        }
                    };
                    done.map(|c| {
                        c.map(|(why, kept)| {
                            let kept = match kept {
                                Some(k) => {
                                    let kept = join_path(td, &k);
                                    if !r.link {
                                        self.repath(r.id, r.was.ino, &join_path(td, tn), &kept);
                                        repathed = true;
                                    }
                                    kept
                                }
                                None => path.clone(),
                            };
                            (join_path(td, tn), kept, why)
                        })
                    })
                }
            },
        };
        // A rename not made (the object stays where it was): what followed
        // it to its new path (a directory's rows, a file's data rows)
        // comes back.
        let stayed = match &outcome {
            Ok(Some((_, kept, _))) => *kept == path,
            Ok(None) => false,
            Err(e) => !is_unreachable(e),
        };
        // (Gone there: what was made in it or written to it here comes back
        // at the new name, as shown.)
        let stayed = stayed
            && match find(&r.dir_path)? {
                Some(d) => match self.lower.lookup(&d, &r.name) {
                    Ok((_, a)) => a.ino == r.was.ino,
                    Err(e) if is_unreachable(&e) => {
                        return Err(setup(format!("finding {path:?} again: {e}")));
                    }
                    Err(_) => false,
                },
                None => false,
            };
        if let (Some((td, tn)), false, true) = (&r.to, r.link, stayed) {
            self.journal
                .repath(r.id, r.was.ino, &join_path(td, tn), &path)?;
            repathed = true;
        }
        match outcome {
            Ok(None) => log::info!("journal: {path:?} changed on the NAS as it was here"),
            Ok(Some((shown, kept, why))) => self.note_conflict(&shown, &kept, &why),
            Err(e) if is_unreachable(&e) => {
                return Err(setup(format!("changing {path:?} on the NAS: {e}")));
            }
            Err(e) => {
                let why = format!("could not be changed on the NAS ({e})");
                self.note_conflict(&path, &path, &why);
            }
        }
        self.journal.delete_removal(r.id)?;
        Ok((retimed, repathed))
    }

    /// Starts the thread that creates local objects on the NAS.
    pub fn start(self: &Arc<Self>) -> std::io::Result<std::thread::JoinHandle<()>> {
        let ov = self.clone();
        std::thread::Builder::new()
            .name("namespace".into())
            .spawn(move || ov.run())
    }

    fn st(&self) -> MutexGuard<'_, State<B>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `window` read-held, and the stripes of directories `dirs`: not
    /// while an object is being placed in one of them.
    fn window_read(&self, dirs: &[u64]) -> Window<'_> {
        self.window_with(dirs, false)
    }

    /// `window` read-held and the stripes of directories `dirs`
    /// write-held: for placing a new file in them (see `window`).
    fn window_place(&self, dirs: &[u64]) -> Window<'_> {
        self.window_with(dirs, true)
    }

    fn window_with(&self, dirs: &[u64], place: bool) -> Window<'_> {
        let all = Guard::Read(self.window.read().unwrap_or_else(|e| e.into_inner()));
        let stripes = stripes_of(dirs)
            .into_iter()
            .map(|i| {
                let s = &self.stripes[i];
                if place {
                    Guard::Write(s.write().unwrap_or_else(|e| e.into_inner()))
                } else {
                    Guard::Read(s.read().unwrap_or_else(|e| e.into_inner()))
                }
            })
            .collect();
        Window {
            _all: all,
            _stripes: stripes,
        }
    }

    /// All of `window`: no reader, no other placement.
    fn window_all(&self) -> Window<'_> {
        Window {
            _all: Guard::Write(self.window.write().unwrap_or_else(|e| e.into_inner())),
            _stripes: Vec::new(),
        }
    }

    /// Local object `p`'s attributes as of now (`fallback` once gone).
    fn attr_now(&self, p: u64, fallback: Attr) -> Attr {
        self.st().objs.get(&p).map(|o| o.attr).unwrap_or(fallback)
    }

    fn sched(&self) -> MutexGuard<'_, Sched> {
        self.sched.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new object is due at `due`: the replay thread wakes earlier if
    /// it would sleep past that. Not a pass per creation: each looks at
    /// every object, and an untar makes thousands.
    fn due_at(&self, due: Instant) {
        let s = self.sched();
        if s.sleeping_until.is_some_and(|t| due < t) {
            self.wake.notify_all();
        }
    }

    fn kick(&self, all: bool) {
        let mut s = self.sched();
        s.kick = true;
        s.all |= all;
        self.wake.notify_all();
    }

    /// Finds `path` below `root` on the NAS, learning the directories met.
    fn walk(&self, root: &B::Node, root_ino: u64, path: &OsStr) -> BResult<(B::Node, u64)> {
        let mut node = root.clone();
        let mut ino = root_ino;
        for c in path
            .as_bytes()
            .split(|b| *b == b'/')
            .filter(|c| !c.is_empty())
        {
            let name = OsStr::from_bytes(c);
            let (n, a) = self.lower.lookup(&node, name)?;
            let a = self.up(a);
            self.saw_dir(ino, name, &a);
            node = n;
            ino = a.ino;
        }
        Ok((node, ino))
    }

    /// A NAS object's attributes as shown: its provisional number if it
    /// was created here, the local ctime until it changes on the NAS, and
    /// the changes local children made to a directory.
    fn up(&self, a: Attr) -> Attr {
        let mut st = self.st();
        Self::up_in(&mut st, a)
    }

    fn up_in(st: &mut State<B>, mut a: Attr) -> Attr {
        crate::clock::observe(a.mtime);
        if a.kind != FileKind::Dir && !st.removals.is_empty() {
            // Hard links made here, not on the NAS yet.
            let links = st
                .removals
                .iter()
                .filter(|r| r.was.ino == a.ino && r.to.as_ref().is_some_and(|t| t.link))
                .count() as u32;
            a.nlink += links;
        }
        let nas_ino = a.ino;
        if let Some(al) = st.alias.get(&a.ino) {
            a.ino = al.prov;
            if a.ctime == al.nas_ctime {
                a.ctime = al.local_ctime;
            }
        }
        if a.kind == FileKind::Dir {
            if let Some(m) = st.masks.get(&a.ino) {
                if (a.mtime, a.ctime) == m.nas {
                    (a.mtime, a.ctime) = m.shown;
                }
            }
        }
        let mut a = Self::dir_up(st, a);
        // Attributes set here, not on the NAS yet: newer than what
        // `dir_up` knows, except times moved by entries made since.
        // (Not an extended attribute's: the ctime a file's data is
        // checked by stays the NAS's until it is set there.)
        for s in st.removals.iter().filter(|r| r.was.ino == nas_ino) {
            if let Some(s) = s.set.as_ref().filter(|s| s.xattr.is_none()) {
                let s = &s.rec;
                if let Some(m) = s.mode {
                    a.perm = (m & 0o7777) as u16;
                }
                a.uid = s.uid.unwrap_or(a.uid);
                a.gid = s.gid.unwrap_or(a.gid);
                a.atime = s.atime.unwrap_or(a.atime);
                let touched = st.touched.get(&a.ino).is_some_and(|t| *t > s.ctime);
                if !touched {
                    a.mtime = s.mtime.unwrap_or(a.mtime);
                }
                a.ctime = a.ctime.max(s.ctime);
            }
        }
        if a.kind == FileKind::Dir {
            if st.placing.contains_key(&a.ino) {
                if let Some(&(m, c)) = st.shown.get(&a.ino) {
                    // Not recorded as shown: `quiet` masks the NAS's times
                    // with those shown before. (A directory made here
                    // shows its own mtime until it is settled.)
                    let t = st.touched.get(&a.ino).copied().unwrap_or(m);
                    if !st.deferred.contains_key(&a.ino) {
                        a.mtime = m.max(t);
                    }
                    a.ctime = c.max(t);
                    return a;
                }
            }
            st.shown.insert(a.ino, (a.mtime, a.ctime));
        }
        a
    }

    fn dir_up(st: &State<B>, mut a: Attr) -> Attr {
        if a.kind == FileKind::Dir {
            if let Some(t) = st.touched.get(&a.ino) {
                a.mtime = a.mtime.max(*t);
                a.ctime = a.ctime.max(*t);
            }
            if let Some(d) = st.deferred.get(&a.ino) {
                a.mtime = d.mtime;
                a.atime = d.atime;
                if let Some(p) = d.perm {
                    a.perm = p;
                }
            }
            if let Some(m) = st.children.get(&a.ino) {
                let subdirs = m
                    .values()
                    .filter(|p| st.objs.get(p).is_some_and(|o| o.attr.kind == FileKind::Dir))
                    .count();
                a.nlink += subdirs as u32;
            }
            let dirs = st.removals.iter().filter(|r| r.kind == FileKind::Dir);
            let gone = dirs
                .clone()
                .filter(|r| r.dir_ino == a.ino && r.takes_name())
                .count() as u32;
            let came = dirs
                .filter(|r| r.to.as_ref().is_some_and(|t| t.dir_ino == a.ino))
                .count() as u32;
            // 1: the NAS does not count subdirectories (btrfs).
            if gone != came && a.nlink >= 2 {
                a.nlink = (a.nlink + came).saturating_sub(gone).max(2);
            }
        }
        a
    }

    fn saw_dir(&self, parent: u64, name: &OsStr, a: &Attr) {
        if a.kind != FileKind::Dir {
            return;
        }
        let mut st = self.st();
        st.dirs.insert(
            a.ino,
            NasDir {
                parent,
                name: name.to_os_string(),
                perm: a.perm,
                gid: a.gid,
            },
        );
    }

    /// The NAS node of `node`, if it is on the NAS.
    fn nas_of(&self, node: &ONode<B::Node>) -> Option<B::Node> {
        match &node.nas {
            Some(n) => Some(n.clone()),
            None => self.st().objs.get(&node.ino).and_then(|o| o.nas.clone()),
        }
    }

    /// The NAS directory that local object `ino` is (to be made) under.
    fn nas_dir_above(&self, ino: u64) -> Option<B::Node> {
        let st = self.st();
        let mut cur = ino;
        for _ in 0..4096 {
            let o = st.objs.get(&cur).filter(|o| !o.gone)?;
            if let Some(n) = &o.nas {
                return Some(n.clone());
            }
            match st.objs.get(&o.parent) {
                Some(_) => cur = o.parent,
                None => return o.parent_nas.clone(),
            }
        }
        None
    }

    /// Whether `ino` is a directory made here, not on the NAS yet.
    fn is_new_dir(st: &State<B>, ino: u64) -> bool {
        st.objs
            .get(&ino)
            .is_some_and(|o| !o.gone && o.nas.is_none() && o.attr.kind == FileKind::Dir)
    }

    /// Whether directory `dir` made here has entries: new objects, or NAS
    /// objects renamed into it.
    fn has_entries(st: &State<B>, dir: u64) -> bool {
        st.children.get(&dir).is_some_and(|m| !m.is_empty())
            || !Self::moved_into(st, dir).is_empty()
    }

    /// Whether renames or links still to make on the NAS go into `dir`
    /// (its mode, which may not let its owner write, waits for them).
    fn moves_into(st: &State<B>, dir: u64) -> bool {
        st.removals
            .iter()
            .any(|r| r.to.as_ref().is_some_and(|t| t.dir_ino == dir))
    }

    /// Whether `ino` is `anc` or under it, as the view knows the tree.
    fn is_under(st: &State<B>, mut ino: u64, anc: u64) -> bool {
        for _ in 0..4096 {
            if ino == anc {
                return true;
            }
            ino = match (st.objs.get(&ino), st.dirs.get(&ino)) {
                (Some(o), _) if o.nas.is_none() => o.parent,
                (_, Some(d)) => d.parent,
                _ => return false,
            };
        }
        false
    }

    /// Whether renames or links still to make on the NAS go into a
    /// directory made here that is `dir` or under it.
    fn moves_into_tree(st: &State<B>, dir: u64) -> bool {
        st.removals.iter().any(|r| {
            r.to.as_ref()
                .is_some_and(|t| t.dir.is_none() && Self::is_under(st, t.dir_ino, dir))
        })
    }

    /// The NAS's inode number of the object shown as `shown` (an object
    /// created here keeps its provisional number once on the NAS).
    fn nas_ino_of(st: &State<B>, shown: u64) -> u64 {
        st.alias
            .values()
            .find(|al| al.prov == shown)
            .map_or(shown, |al| al.nas_ino)
    }

    /// The extended attributes of NAS object `shown` set or removed here
    /// and not on the NAS yet, in the order they were.
    fn xattrs_kept(st: &State<B>, shown: u64) -> Vec<XattrRecord> {
        let mut rows = st
            .removals
            .iter()
            .filter_map(|r| Some((r.was.ino, r.set.as_ref()?.xattr.as_ref()?)))
            .peekable();
        // (The aliases only looked through when there are any.)
        if rows.peek().is_none() {
            return Vec::new();
        }
        let nas_ino = Self::nas_ino_of(st, shown);
        rows.filter(|(ino, _)| *ino == nas_ino)
            .map(|(_, x)| x.clone())
            .collect()
    }

    /// The inode number shown for NAS inode number `ino`.
    fn shown_of(st: &State<B>, ino: u64) -> u64 {
        st.alias.get(&ino).map_or(ino, |al| al.prov)
    }

    fn local(&self, ino: u64) -> bool {
        self.st().objs.get(&ino).is_some_and(|o| o.nas.is_none())
    }

    /// The local file (by a name of it) or directory `ino` is, while not
    /// on the NAS: its extended attributes are kept here.
    fn local_file_or_dir(st: &State<B>, ino: u64) -> Option<u64> {
        let o = st.objs.get(&ino)?;
        let p = o.link_to.unwrap_or(ino);
        let o = st.objs.get(&p)?;
        (o.nas.is_none() && matches!(o.attr.kind, FileKind::File | FileKind::Dir)).then_some(p)
    }

    /// setxattr (`set`: value and flags) or removexattr of `name` on a
    /// local file or directory, kept here and in the journal and made on
    /// the NAS with the object (`put_xattrs`), so that `cp -a` or `tar
    /// --xattrs` into the mount keeps its local speed, and works while
    /// the NAS does not answer. None (nothing done) for what goes to the
    /// NAS as before: an object on the NAS or being created there, a
    /// symlink or special file, a name outside `user.*` (a POSIX ACL: the
    /// NAS derives the mode from it), or a NAS without user xattrs.
    fn local_xattr(
        &self,
        node: &ONode<B::Node>,
        name: &OsStr,
        set: Option<(&[u8], i32)>,
    ) -> Option<BResult<()>> {
        // Only user.*: what the probe says the NAS keeps; security.* and
        // trusted.* have rules of their own (a capability goes at a
        // write), left to the NAS.
        if !name.as_bytes().starts_with(b"user.") || !self.xattrs_ok {
            return None;
        }
        let op = if set.is_some() {
            "setxattr"
        } else {
            "removexattr"
        };
        let mut st = self.st();
        let p = Self::local_file_or_dir(&st, node.ino)?;
        if st.objs.get(&p).is_none_or(|o| o.applying || o.gone) {
            return None;
        }
        let has = st.xattrs.get(&p).is_some_and(|m| m.contains_key(name));
        let refused = match set {
            Some((_, f)) if f & libc::XATTR_CREATE != 0 && has => Some(libc::EEXIST),
            Some((_, f)) if f & libc::XATTR_REPLACE != 0 && !has => Some(libc::ENODATA),
            None if !has => Some(libc::ENODATA),
            _ => None,
        };
        if let Some(errno) = refused {
            return Some(Err(err(op, errno)));
        }
        let value = set.map(|(v, _)| v);
        if let Err(e) = self.journal.set_xattr(p, name, value) {
            return Some(Err(journal_err("journal")(e)));
        }
        match value {
            Some(v) => {
                st.xattrs
                    .entry(p)
                    .or_default()
                    .insert(name.to_os_string(), v.to_vec());
            }
            None => {
                if let Some(m) = st.xattrs.get_mut(&p) {
                    m.remove(name);
                }
            }
        }
        // As on the NAS: an xattr change moves the ctime.
        if let Some(o) = st.objs.get_mut(&p) {
            o.attr.ctime = now();
        }
        Some(Ok(()))
    }

    /// Sets on `node`, local object `p` being created on the NAS, the
    /// extended attributes set here (before a file is renamed into
    /// place: it appears whole). One the NAS refuses is dropped, a
    /// conflict; a NAS that does not answer fails the creation (retried).
    fn put_xattrs(&self, p: u64, node: &B::Node) -> BResult<()> {
        let xattrs: Vec<(OsString, Vec<u8>)> = match self.st().xattrs.get(&p) {
            Some(m) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            None => return Ok(()),
        };
        for (name, value) in xattrs {
            match self.lower.setxattr(node, &name, &value, 0) {
                Ok(()) => {}
                Err(e) if is_unreachable(&e) => return Err(e),
                Err(e) => {
                    let path = {
                        let mut st = self.st();
                        if let Some(m) = st.xattrs.get_mut(&p) {
                            m.remove(&name);
                        }
                        st.objs
                            .get(&p)
                            .map_or_else(OsString::new, |o| Self::obj_path(&st, o))
                    };
                    if let Err(e) = self.journal.set_xattr(p, &name, None) {
                        log::warn!("journal: {e}");
                    }
                    self.note_conflict(
                        &path,
                        &path,
                        &format!(
                            "extended attribute {name:?} set here, refused by the NAS ({e}): dropped"
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    /// The NAS node of `node`, creating it (and the local directories it is
    /// in) on the NAS first if it is local.
    fn materialize(&self, node: &ONode<B::Node>) -> BResult<B::Node> {
        if let Some(n) = self.nas_of(node) {
            return Ok(n);
        }
        self.promote_chain(node.ino)
    }

    fn promote_chain(&self, ino: u64) -> BResult<B::Node> {
        // A name removed here may be the one to take.
        self.apply_removals()?;
        self.promote_chain_now(ino)
    }

    /// [`Self::promote_chain`] without the pending removals and renames
    /// first: called by their replay, for a directory made here that a
    /// rename or link goes into.
    fn promote_chain_now(&self, ino: u64) -> BResult<B::Node> {
        let _g = self.replay.write().unwrap_or_else(|e| e.into_inner());
        // One of them moved or removed here meanwhile (EAGAIN): the chain
        // taken again (a rename's replay would otherwise take that for a
        // rename the NAS refused).
        let mut tries = 0;
        loop {
            match self.promote_chain_once(ino) {
                Err(e) if e.raw_errno() == libc::EAGAIN && tries < 3 => tries += 1,
                r => return r,
            }
        }
    }

    /// The directories made here above `ino` (and `ino`), made on the NAS
    /// top down; `replay` write-held.
    fn promote_chain_once(&self, ino: u64) -> BResult<B::Node> {
        let mut chain = Vec::new();
        {
            let st = self.st();
            // A further name of a file is made with the file, and the
            // directories of the file's further names before it.
            let file = Self::file_of(&st, ino);
            let mut starts = vec![file];
            if let Some(set) = st.links.get(&file) {
                starts.extend(set.iter().filter_map(|l| st.objs.get(l).map(|o| o.parent)));
            }
            for (i, start) in starts.into_iter().enumerate() {
                let mut cur = start;
                while let Some(o) = st.objs.get(&cur) {
                    if o.nas.is_some() {
                        break;
                    }
                    if o.gone {
                        if i == 0 {
                            return Err(err("create on the NAS", libc::ENOENT));
                        }
                        break;
                    }
                    chain.push(cur);
                    cur = o.parent;
                }
            }
        }
        for p in chain.iter().rev() {
            match self.promote_one(*p, true) {
                Err(e) if matches!(e.raw_errno(), libc::ENOENT | libc::ESTALE) => {
                    // Its NAS directory may be gone (removed by another
                    // client) or known by a stale handle: found again by
                    // path, or created again, and tried once more.
                    let parent = {
                        let st = self.st();
                        match st.objs.get(p) {
                            Some(o) if !o.gone && !st.objs.contains_key(&o.parent) => o.parent,
                            _ => return Err(e),
                        }
                    };
                    let Some(path) = Self::dir_path(&self.st(), parent) else {
                        return Err(e);
                    };
                    self.recreate_parent(parent, &path)?;
                    self.promote_one(*p, true)?;
                }
                r => r?,
            }
        }
        self.st()
            .objs
            .get(&ino)
            .and_then(|o| o.nas.clone())
            .ok_or_else(|| err("create on the NAS", libc::ENOENT))
    }

    /// The path of a directory from the share's root, if known.
    fn dir_path(st: &State<B>, mut ino: u64) -> Option<OsString> {
        let mut parts: Vec<OsString> = Vec::new();
        for _ in 0..4096 {
            if ino == st.root {
                let mut out = Vec::new();
                for (i, p) in parts.iter().rev().enumerate() {
                    if i > 0 {
                        out.push(b'/');
                    }
                    out.extend_from_slice(p.as_bytes());
                }
                return Some(OsString::from(OsStr::from_bytes(&out)));
            }
            if let Some(o) = st.objs.get(&ino).filter(|o| o.nas.is_none()) {
                parts.push(o.name.clone());
                ino = o.parent;
            } else {
                let d = st.dirs.get(&ino)?;
                parts.push(d.name.clone());
                ino = d.parent;
            }
        }
        None
    }

    /// The journal row of a local object; None once it is gone or on the
    /// NAS (its row is deleted then, and must not come back).
    fn record(st: &State<B>, prov: u64) -> Option<ObjectRecord> {
        let o = st.objs.get(&prov).filter(|o| !o.gone && o.nas.is_none())?;
        let parent = if st.objs.get(&o.parent).is_some_and(|p| p.nas.is_none()) {
            ObjParent::Local(o.parent)
        } else {
            ObjParent::Nas(Self::dir_path(st, o.parent).unwrap_or_default())
        };
        Some(ObjectRecord {
            prov,
            kind: o.attr.kind,
            parent,
            name: o.name.clone(),
            applying: o.applying,
            perm: o.attr.perm,
            uid: o.attr.uid,
            gid: o.attr.gid,
            rdev: o.attr.rdev,
            atime: o.attr.atime,
            mtime: o.attr.mtime,
            ctime: o.attr.ctime,
            target: o.target.clone(),
            created: SystemTime::now(),
            nas_ino: o.nas_ino,
            link_to: o.link_to,
        })
    }

    /// The rows of the new objects whose directory is on the NAS: they
    /// name it by path, which a rename of a directory above changes.
    fn nas_rows(st: &State<B>) -> Vec<ObjectRecord> {
        st.objs
            .iter()
            .filter(|(_, o)| o.nas.is_none() && !o.gone)
            .filter(|(_, o)| st.objs.get(&o.parent).is_none_or(|p| p.nas.is_some()))
            .filter_map(|(p, _)| Self::record(st, *p))
            .collect()
    }

    /// NAS object `shown` (inode number as shown) was renamed on the NAS
    /// to `name` in `dir` rather than to the name it has here (a conflict):
    /// a directory's place follows.
    fn moved_to_conflict(&self, shown: u64, dir: u64, name: &OsStr) {
        let mut st = self.st();
        if let Some(d) = st.dirs.get_mut(&shown) {
            d.parent = dir;
            d.name = name.to_os_string();
        }
    }

    /// NAS object `ino`, renamed here to `old` by change `id`, is at `new`
    /// on the NAS (a conflict): what acts on it there follows (see
    /// [`Journal::repath`]): the journal's rows, the pending changes
    /// here, and write-back's rows. Whether it stays at `old` here.
    fn repath(&self, id: u64, ino: u64, old: &OsStr, new: &OsStr) -> bool {
        let there = match self.journal.repath(id, ino, old, new) {
            Ok(t) => t,
            Err(e) => {
                log::warn!("journal: {e}");
                false
            }
        };
        if let Some(new_name) = Path::new(new).file_name() {
            let mut st = self.st();
            for r in st.removals.iter_mut().filter(|r| r.id > id) {
                if r.was.ino == ino && r.path == old {
                    r.name = new_name.to_os_string();
                    r.path = new.to_os_string();
                    if r.takes_name() {
                        break;
                    }
                    continue;
                }
                // As the journal's rows: the paths under it follow, up to
                // a change that puts something else at `old`.
                r.follow(old, new, true);
                if r.to.as_ref().is_some_and(|t| t.path == old) {
                    break;
                }
            }
        }
        if there {
            if let Some(f) = self.moved.get() {
                f(old, new);
            }
        }
        there
    }

    fn persist(&self, st: &State<B>, prov: u64) -> BResult<()> {
        if let Some(r) = Self::record(st, prov) {
            self.journal
                .put_object(&r, st.next_prov)
                .map_err(journal_err("journal"))?;
        }
        Ok(())
    }

    /// The attributes a new object gets in `dir`, or None when the NAS
    /// must create it (a default ACL applies there).
    fn inherit(
        &self,
        dir: &ONode<B::Node>,
        creds: Creds,
        dir_nas: Option<&B::Node>,
    ) -> Option<(u32, bool)> {
        let (perm, gid) = {
            let st = self.st();
            match st.objs.get(&dir.ino) {
                Some(o) if o.nas.is_none() => (o.attr.perm, o.attr.gid),
                _ => {
                    let d = st.dirs.get(&dir.ino)?;
                    (d.perm, d.gid)
                }
            }
        };
        if let Some(n) = dir_nas {
            let known = self.st().acl_default.get(&dir.ino).copied();
            let acl = match known {
                Some(a) => a,
                None => {
                    // Offline, or the NAS slow to answer where the name is
                    // known absent (`name_absent_here`): taken as none, and
                    // asked again next time.
                    let got = where_name_known_absent(|| {
                        self.lower
                            .getxattr(n, OsStr::new("system.posix_acl_default"))
                    });
                    let a = match got {
                        Ok(_) => true,
                        Err(e) if is_unreachable(&e) => return Some(self.no_acl(perm, gid, creds)),
                        Err(_) => false,
                    };
                    self.st().acl_default.insert(dir.ino, a);
                    a
                }
            };
            if acl {
                return None;
            }
        }
        Some(self.no_acl(perm, gid, creds))
    }

    /// The group and set-group-ID bit of an object made in a directory
    /// of mode `perm` and group `gid` without a default ACL.
    fn no_acl(&self, perm: u16, gid: u32, creds: Creds) -> (u32, bool) {
        let setgid = perm & libc::S_ISGID as u16 != 0;
        (if setgid { gid } else { creds.gid }, setgid)
    }

    /// Makes a local object in `dir`, or None when it must be made on the
    /// NAS (see `inherit`, and modes with setuid/setgid asked for). With
    /// `link_to`, the object is a further name of that local file (the
    /// caller holds its content lock), and the file's attributes are
    /// returned.
    #[allow(clippy::too_many_arguments)]
    fn make(
        &self,
        dir: &ONode<B::Node>,
        name: &OsStr,
        kind: FileKind,
        mode: u32,
        rdev: u64,
        target: Option<&OsStr>,
        creds: Creds,
        link_to: Option<u64>,
    ) -> BResult<Option<Made<B>>> {
        let op = "create";
        if name.as_bytes().contains(&b'/') || name.is_empty() {
            return Err(err(op, libc::EINVAL));
        }
        if kind != FileKind::Dir && mode & (libc::S_ISUID | libc::S_ISGID) != 0 {
            return Ok(None);
        }
        let dir_nas = self.nas_of(dir);
        if self
            .st()
            .children
            .get(&dir.ino)
            .is_some_and(|m| m.contains_key(name))
        {
            return Err(err(op, libc::EEXIST));
        }
        // A NAS object renamed here to that name.
        if let AtName::MovedIn(_) = Self::pending_at(&self.st(), dir.ino, name) {
            return Err(err(op, libc::EEXIST));
        }
        let own = self.st().own.contains(&dir.ino);
        match &dir_nas {
            Some(_) if own => {}
            // Removed here: free (the removal reaches the NAS first).
            Some(_) if Self::is_removed(&self.st(), dir.ino, name) => {}
            Some(n) => {
                if is_hidden(name) {
                    return Err(err(op, libc::EEXIST));
                }
                // Where the core's listing says the name is absent, as
                // offline if the NAS is slow to answer (`name_absent_here`).
                let got = where_name_known_absent(|| self.lower.lookup(n, name));
                match got {
                    // What an attempt cut short left (not shown): free,
                    // removed before the new one is placed there.
                    Ok((_, a)) if Self::is_leftover(&self.st(), dir.ino, name, a.ino) => {}
                    Ok((_, a)) => {
                        log::debug!("{name:?} in {:x} taken on the NAS (ino {})", dir.ino, a.ino);
                        return Err(err(op, libc::EEXIST));
                    }
                    Err(e) if e.raw_errno() == libc::ENOENT => {}
                    // Offline: taken here; a name taken on the NAS
                    // meanwhile gets the conflict name when it is created.
                    Err(e) if is_unreachable(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            None => {
                let st = self.st();
                match st.objs.get(&dir.ino) {
                    Some(o) if !o.gone && o.attr.kind == FileKind::Dir => {}
                    Some(o) if o.attr.kind != FileKind::Dir => {
                        return Err(err(op, libc::ENOTDIR));
                    }
                    _ => return Err(err(op, libc::ENOENT)),
                }
            }
        }
        let Some((gid, setgid)) = self.inherit(dir, creds, dir_nas.as_ref()) else {
            return Ok(None);
        };
        let mut perm = (mode & 0o7777) as u16;
        if kind == FileKind::Dir && setgid {
            perm |= libc::S_ISGID as u16;
        }
        let t = now();
        let mut st = self.st();
        // Checked again: another creation may have won meanwhile.
        if st
            .children
            .get(&dir.ino)
            .is_some_and(|m| m.contains_key(name))
        {
            return Err(err(op, libc::EEXIST));
        }
        let link_attr = match link_to {
            Some(f) => match st.objs.get(&f) {
                Some(o) if o.nas.is_none() && !o.gone && o.link_to.is_none() => Some(o.attr),
                // Removed meanwhile (a file with no name left cannot get one).
                _ => return Err(err("link", libc::ENOENT)),
            },
            None => None,
        };
        let prov = st.next_prov;
        st.next_prov += 1;
        let content = if kind == FileKind::File && link_to.is_none() {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(self.journal.upper_path(prov))
                .map_err(io(op))?;
            self.upper_synced.store(false, Ordering::Relaxed);
            Some((
                Arc::new(Content {
                    prov,
                    lock: RwLock::new(()),
                    nas: Mutex::new(None),
                    promoted: AtomicBool::new(false),
                }),
                f,
            ))
        } else {
            None
        };
        let size = match (kind, target) {
            (_, Some(t)) => t.len() as u64,
            // What a local filesystem shows for a directory.
            (FileKind::Dir, _) => 4096,
            _ => 0,
        };
        let attr = link_attr.unwrap_or(Attr {
            ino: prov,
            kind,
            perm,
            nlink: if kind == FileKind::Dir { 2 } else { 1 },
            uid: creds.uid,
            gid,
            rdev,
            size,
            blocks: if kind == FileKind::Dir { 8 } else { 0 },
            blksize: 4096,
            atime: t,
            mtime: t,
            ctime: t,
        });
        st.objs.insert(
            prov,
            Obj {
                attr,
                target: target.map(|t| t.to_os_string()),
                parent: dir.ino,
                name: name.to_os_string(),
                parent_nas: dir_nas,
                nas: None,
                gone: false,
                content: content.as_ref().map(|(c, _)| c.clone()),
                created: Instant::now(),
                retry_at: None,
                attempts: 0,
                error: None,
                applying: false,
                chowned: false,
                nas_ino: None,
                link_to,
            },
        );
        if let Err(e) = self.persist(&st, prov) {
            st.objs.remove(&prov);
            st.xattrs.remove(&prov);
            drop(st);
            let _ = std::fs::remove_file(self.journal.upper_path(prov));
            return Err(e);
        }
        st.children
            .entry(dir.ino)
            .or_default()
            .insert(name.to_os_string(), prov);
        Self::dir_changed(
            &mut st,
            dir.ino,
            t,
            if kind == FileKind::Dir { 1 } else { 0 },
        );
        let mut attr = attr;
        if let Some(f) = link_to {
            st.links.entry(f).or_default().insert(prov);
            if let Some(o) = st.objs.get_mut(&f) {
                o.attr.nlink += 1;
                o.attr.ctime = t;
                attr = o.attr;
            }
            if let Err(e) = self.persist(&st, f) {
                log::warn!("journal: {e}");
            }
        }
        drop(st);
        self.due_at(Instant::now() + self.delay);
        Ok(Some((prov, attr, content)))
    }

    /// A directory's entries changed here at `t`; `subdirs` more or fewer
    /// directories in it.
    fn dir_changed(st: &mut State<B>, dir: u64, t: SystemTime, subdirs: i32) {
        match st.objs.get_mut(&dir) {
            Some(o) if o.nas.is_none() => {
                o.attr.mtime = t;
                o.attr.ctime = t;
                o.attr.nlink = (o.attr.nlink as i64 + subdirs as i64).max(2) as u32;
            }
            _ => {
                st.touched.insert(dir, t);
            }
        }
    }

    /// Local object `prov` moves or goes away here: what an unfinished
    /// attempt may have put on the NAS at its old place is removed later.
    fn left_behind(&self, st: &mut State<B>, prov: u64) {
        let Some(o) = st.objs.get(&prov) else { return };
        if !o.applying || o.nas.is_some() {
            return;
        }
        let dir = match st.objs.get(&o.parent) {
            Some(p) => p.nas.clone(),
            None => o.parent_nas.clone(),
        };
        let Some(dir) = dir else { return };
        let mut rec = LeftoverRecord {
            id: 0,
            dir_path: Self::dir_path(st, o.parent).unwrap_or_default(),
            name: o.name.clone(),
            hidden: hidden_name(prov),
            kind: o.attr.kind,
            size: o.attr.size,
            mtime: o.attr.mtime,
            target: o.target.clone(),
            nas_ino: o.nas_ino,
        };
        log::debug!(
            "leftover of {prov:x}: {:?} in {:?} nas ino {:?}",
            rec.name,
            rec.dir_path,
            rec.nas_ino
        );
        // Recorded before the move or removal is: after a crash, the next
        // mount still knows what to remove.
        match self.journal.add_leftover(&rec) {
            Ok(id) => rec.id = id,
            Err(e) => log::warn!("journal: {e}"),
        }
        let l = Leftover {
            id: rec.id,
            dir,
            dir_ino: st.objs.get(&prov).map(|o| o.parent).unwrap_or(0),
            name: rec.name,
            hidden: rec.hidden,
            kind: rec.kind,
            size: rec.size,
            target: rec.target,
            nas_ino: rec.nas_ino,
        };
        st.leftovers.push(l);
        if let Some(o) = st.objs.get_mut(&prov) {
            o.applying = false;
            // That number is the leftover's now: a later attempt's object
            // is known by its own (or, its answer lost, by none).
            o.nas_ino = None;
        }
        if let Err(e) = self.persist(st, prov) {
            log::warn!("journal: {e}");
        }
    }

    /// Removes what unfinished attempts left on the NAS, where it is
    /// surely theirs.
    fn clean_leftovers(&self) {
        // Not while a creation is under way: it may be the one that left
        // something, not yet finished making it.
        let _g = self.replay.write().unwrap_or_else(|e| e.into_inner());
        let list = std::mem::take(&mut self.st().leftovers);
        for l in list {
            if !self.clean_leftover(&l) {
                self.st().leftovers.push(l);
            }
        }
    }

    /// Removes leftover `l` from the NAS if it is surely ours, and its
    /// record; false where the NAS did not answer (kept for later).
    fn clean_leftover(&self, l: &Leftover<B::Node>) -> bool {
        // (Not the hidden file of an object still to make in that
        // directory: moved back there, its attempts fill that file again,
        // maybe now.)
        let live = l.kind == FileKind::File
            && prov_of_hidden(&l.hidden).is_some_and(|k| {
                self.st()
                    .objs
                    .get(&k)
                    .is_some_and(|o| !o.gone && o.nas.is_none() && o.parent == l.dir_ino)
            });
        if l.kind == FileKind::File && !live {
            if let Err(e) = self.lower.unlink(&l.dir, &l.hidden) {
                if is_unreachable(&e) {
                    return false;
                }
            }
        }
        let ours = match self.lower.lookup(&l.dir, &l.name) {
            Ok((n, a)) if a.kind == l.kind => match l.kind {
                // Renamed into place: surely ours if it is the file
                // made under the hidden name.
                FileKind::File => l.nas_ino == Some(a.ino) && a.size == l.size,
                // Not one of ours that reached the NAS since, nor one
                // with new objects waiting in it (the NAS says empty).
                FileKind::Dir => {
                    let st = self.st();
                    l.nas_ino.is_none_or(|i| i == a.ino)
                        && !st.alias.contains_key(&a.ino)
                        && !st.children.contains_key(&a.ino)
                }
                FileKind::Symlink => self.lower.readlink(&n).ok() == l.target,
                _ => true,
            },
            Err(e) if is_unreachable(&e) => return false,
            _ => false,
        };
        log::debug!(
            "leftover {:?} in {}: {}",
            l.name,
            l.dir_ino,
            if ours {
                "removing it"
            } else {
                "not there, or not ours"
            }
        );
        if ours {
            // A directory only if empty: rmdir refuses otherwise.
            let r = if l.kind == FileKind::Dir {
                self.lower.rmdir(&l.dir, &l.name)
            } else {
                self.lower.unlink(&l.dir, &l.name)
            };
            if let Err(e) = r {
                if is_unreachable(&e) {
                    return false;
                }
            }
        }
        if let Err(e) = self.journal.delete_leftover(l.id) {
            log::warn!("journal: {e}");
        }
        true
    }

    /// A creation at `name` in `parent` met an object there: if what an
    /// unfinished attempt left (a creation the NAS made though its answer
    /// was lost), it is removed first (the creation runs outside the
    /// write-back's passes too, which remove leftovers before creating).
    /// Whether one was; the NAS not answering, an error.
    fn clean_leftovers_at(&self, parent: u64, name: &OsStr) -> BResult<bool> {
        self.clean_leftovers_where(leftover_at(parent, name, false))
    }

    /// [`Self::clean_leftovers_at`] for the leftovers `which` picks.
    fn clean_leftovers_where(&self, which: impl Fn(&Leftover<B::Node>) -> bool) -> BResult<bool> {
        let here: Vec<Leftover<B::Node>> = {
            let mut st = self.st();
            if !st.leftovers.iter().any(&which) {
                return Ok(false);
            }
            let (here, rest) = std::mem::take(&mut st.leftovers)
                .into_iter()
                .partition(|l| which(l));
            st.leftovers = rest;
            here
        };
        let found = !here.is_empty();
        let mut kept = false;
        for l in here {
            if !self.clean_leftover(&l) {
                self.st().leftovers.push(l);
                kept = true;
            }
        }
        if kept {
            return Err(unreachable("create on the NAS"));
        }
        Ok(found)
    }

    /// `make` at `name` in `parent`, made again once if it met a leftover
    /// of ours there (removed first). Also when the object is being made:
    /// a leftover is not to be taken for what an earlier attempt made.
    /// The outer error: the NAS not answering about the leftover.
    fn past_leftovers<T>(
        &self,
        parent: u64,
        name: &OsStr,
        make: impl Fn() -> BResult<T>,
    ) -> BResult<BResult<T>> {
        match make() {
            Err(e) if e.raw_errno() == libc::EEXIST => {
                match self.clean_leftovers_at(parent, name)? {
                    true => Ok(make()),
                    false => Ok(Err(e)),
                }
            }
            r => Ok(r),
        }
    }

    /// Removes the hidden file of an attempt given up before placing it,
    /// and forgets its number (freed, it may come back as another's).
    /// `made`: the number of the hidden file this attempt made, whose
    /// leftover (the object moved meanwhile) is gone with it.
    fn unmake_hidden(&self, p: u64, dir: &B::Node, tmp: &OsStr, made: Option<u64>) {
        let gone = self.lower.unlink(dir, tmp).is_ok();
        let mut st = self.st();
        if gone && made.is_some() {
            // Never placed, and its number free again: a record naming it
            // would take another file that gets the number for ours.
            let (drop, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut st.leftovers)
                .into_iter()
                .partition(|l| l.hidden == tmp && l.nas_ino == made && l.kind == FileKind::File);
            st.leftovers = keep;
            for l in drop {
                if let Err(e) = self.journal.delete_leftover(l.id) {
                    log::warn!("journal: {e}");
                }
            }
        }
        if let Some(o) = st.objs.get_mut(&p) {
            if o.nas_ino.take().is_none() {
                return;
            }
        }
        if let Err(e) = self.persist(&st, p) {
            log::warn!("journal: {e}");
        }
    }

    /// Before a rename, link or creation made on the NAS at `name` in
    /// `dir` (not one of the write-back's creations, which see to it
    /// themselves): what unfinished attempts left there, removed where
    /// surely ours. Not while a creation is under way (as
    /// `clean_leftovers`): nothing that `window` or `replay` held.
    /// With `known`, only those whose NAS number is known.
    fn clear_leftovers_for(&self, dir: u64, name: &OsStr, known: bool) -> BResult<()> {
        let which = leftover_at(dir, name, known);
        if !self.st().leftovers.iter().any(&which) {
            return Ok(());
        }
        let _g = self.replay.write().unwrap_or_else(|e| e.into_inner());
        self.clean_leftovers_where(which).map(|_| ())
    }

    fn local_attr(&self, ino: u64) -> Option<Attr> {
        let st = self.st();
        let o = st.objs.get(&ino)?;
        if o.nas.is_some() {
            return None;
        }
        let mut a = o.attr;
        if o.gone {
            a.nlink = 0;
        }
        Some(a)
    }

    /// Removes name `name` in `dir` of local object `prov`: the object
    /// never reaches the NAS, unless it is a file with further names.
    fn remove_local(&self, st: &mut State<B>, dir: u64, name: &OsStr, prov: u64) -> BResult<()> {
        let t = now();
        if let Some(f) = st.objs.get(&prov).and_then(|o| o.link_to) {
            // A further name of a file: only the name goes.
            self.journal
                .delete_object(prov)
                .map_err(journal_err("journal"))?;
            Self::drop_name(st, dir, name);
            if let Some(o) = st.objs.get_mut(&prov) {
                o.gone = true;
            }
            Self::unlink_from(st, f, prov, t);
            if let Err(e) = self.persist(st, f) {
                log::warn!("journal: {e}");
            }
            Self::dir_changed(st, dir, t, 0);
            return Ok(());
        }
        if let Some(&l) = st.links.get(&prov).and_then(|s| s.iter().next()) {
            // The file keeps living under its next name: it takes the
            // place of that link, in one journal transaction.
            self.left_behind(st, prov);
            let Some(lo) = st.objs.get(&l) else {
                return Err(err("unlink", libc::EIO));
            };
            let (lparent, lname, lparent_nas) = (lo.parent, lo.name.clone(), lo.parent_nas.clone());
            if let Some(o) = st.objs.get_mut(&prov) {
                o.parent = lparent;
                o.name = lname.clone();
                o.parent_nas = lparent_nas;
            }
            let rec = Self::record(st, prov).ok_or_else(|| err("unlink", libc::EIO))?;
            self.journal
                .replace_objects(&[rec], &[l])
                .map_err(journal_err("journal"))?;
            Self::drop_name(st, dir, name);
            st.children.entry(lparent).or_default().insert(lname, prov);
            if let Some(o) = st.objs.get_mut(&l) {
                o.gone = true;
            }
            Self::unlink_from(st, prov, l, t);
            Self::dir_changed(st, dir, t, 0);
            return Ok(());
        }
        log::debug!("new object {prov:x} {name:?} removed before it reached the NAS");
        self.left_behind(st, prov);
        self.journal
            .delete_object(prov)
            .map_err(journal_err("journal"))?;
        Self::drop_name(st, dir, name);
        let is_dir = st
            .objs
            .get(&prov)
            .is_some_and(|o| o.attr.kind == FileKind::Dir);
        if let Some(o) = st.objs.get_mut(&prov) {
            o.gone = true;
            o.attr.ctime = t;
            o.attr.nlink = 0;
        }
        Self::dir_changed(st, dir, t, if is_dir { -1 } else { 0 });
        let _ = std::fs::remove_file(self.journal.upper_path(prov));
        Ok(())
    }

    /// The local file that local object `x` is a name of (itself unless a
    /// hard link made here).
    fn file_of(st: &State<B>, x: u64) -> u64 {
        st.objs.get(&x).and_then(|o| o.link_to).unwrap_or(x)
    }

    fn drop_name(st: &mut State<B>, dir: u64, name: &OsStr) {
        if let Some(m) = st.children.get_mut(&dir) {
            m.remove(name);
            if m.is_empty() {
                st.children.remove(&dir);
            }
        }
    }

    /// Link `l` of local file `f` is gone (removed, or handed its name).
    fn unlink_from(st: &mut State<B>, f: u64, l: u64, t: SystemTime) {
        if let Some(s) = st.links.get_mut(&f) {
            s.remove(&l);
            if s.is_empty() {
                st.links.remove(&f);
            }
        }
        if let Some(o) = st.objs.get_mut(&f) {
            o.attr.nlink = o.attr.nlink.saturating_sub(1).max(1);
            o.attr.ctime = t;
        }
    }

    /// Whether `(dir, name)` on the NAS, with inode number `ino` there, is
    /// what an unfinished creation left and is still to be removed: not
    /// shown.
    fn is_leftover(st: &State<B>, dir: u64, name: &OsStr, ino: u64) -> bool {
        st.leftovers
            .iter()
            .any(|l| l.dir_ino == dir && l.name == name && l.nas_ino == Some(ino))
    }

    /// Whether `name` in `dir` was removed (or renamed away) here and not
    /// yet on the NAS, with nothing renamed there since.
    fn is_removed(st: &State<B>, dir: u64, name: &OsStr) -> bool {
        Self::pending_at(st, dir, name) == AtName::Gone
    }

    /// What the removals and renames still to make on the NAS make of
    /// `name` in `dir`: the last of them that touches it decides.
    fn pending_at(st: &State<B>, dir: u64, name: &OsStr) -> AtName {
        for r in st.removals.iter().rev() {
            if r.to
                .as_ref()
                .is_some_and(|t| t.dir_ino == dir && t.name == name)
            {
                return AtName::MovedIn(r.id);
            }
            if r.dir_ino == dir && r.name == name && r.takes_name() {
                return AtName::Gone;
            }
        }
        AtName::Nas
    }

    /// The NAS object renamed here to `name` in `dir` (not there yet), as
    /// shown: Err(ENOENT) if it is gone from the NAS meanwhile.
    fn moved_in(
        &self,
        dir: &ONode<B::Node>,
        name: &OsStr,
        id: u64,
    ) -> BResult<(ONode<B::Node>, Attr)> {
        let node = {
            let st = self.st();
            let r = st.removals.iter().find(|r| r.id == id);
            match r.and_then(|r| r.to.as_ref()) {
                Some(t) => t.node.clone(),
                // Made on the NAS meanwhile: it is there now.
                None => {
                    drop(st);
                    return self.lookup(dir, name);
                }
            }
        };
        let a = match self.lower.getattr(&node) {
            // A descriptor held outlives the object's last name.
            Ok(a) if a.nlink == 0 => return Err(err("lookup", libc::ENOENT)),
            Ok(a) => a,
            Err(e) if e.raw_errno() == libc::ESTALE => return Err(err("lookup", libc::ENOENT)),
            Err(e) => return Err(e),
        };
        let (node, a) = self.node_up(node, a);
        self.saw_dir(dir.ino, name, &a);
        Ok((node, a))
    }

    /// The entries the renames still to make on the NAS put in `dir`.
    fn moved_into(st: &State<B>, dir: u64) -> Vec<DirEntry> {
        let mut out: Vec<DirEntry> = Vec::new();
        for r in &st.removals {
            let Some(t) = r.to.as_ref().filter(|t| t.dir_ino == dir) else {
                continue;
            };
            // The last change of that name, only.
            if Self::pending_at(st, dir, &t.name) == AtName::MovedIn(r.id) {
                let ino = Self::shown_of(st, r.was.ino);
                out.push(DirEntry {
                    name: t.name.clone(),
                    ino,
                    kind: r.kind,
                });
            }
        }
        out
    }

    fn local_child(&self, dir: u64, name: &OsStr) -> Option<u64> {
        self.st()
            .children
            .get(&dir)
            .and_then(|m| m.get(name))
            .copied()
    }

    // ---- the replay ----

    fn run(&self) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let all = {
                let mut s = self.sched();
                while !s.kick && !s.stop {
                    let wait = self
                        .next_due()
                        .unwrap_or(Duration::from_secs(3600))
                        .max(Duration::from_millis(10));
                    s.sleeping_until = Some(Instant::now() + wait);
                    let (g, to) = self
                        .wake
                        .wait_timeout(s, wait)
                        .unwrap_or_else(|e| e.into_inner());
                    s = g;
                    s.sleeping_until = None;
                    if to.timed_out() {
                        break;
                    }
                }
                if s.stop {
                    return;
                }
                s.kick = false;
                std::mem::take(&mut s.all)
            };
            if !self.lower.online() || self.lower.held_up() {
                // Once it answers again, everything goes (all: the
                // backoffs of the failures while it did not are moot).
                std::thread::sleep(Duration::from_millis(50));
                self.kick(true);
                continue;
            }
            match self.pass(all) {
                Ok(()) => backoff = Duration::from_millis(500),
                // Not a reason to back off: the loop above waits for it.
                Err(()) if !self.lower.online() => self.kick(true),
                Err(()) => {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    if all {
                        self.kick(true);
                    }
                }
            }
            self.progress.notify_all();
        }
    }

    /// How long until the oldest local object is due.
    fn next_due(&self) -> Option<Duration> {
        let st = self.st();
        let now = Instant::now();
        if !st.leftovers.is_empty() {
            return Some(Duration::from_millis(500));
        }
        // Removals and the like are made `writeback_delay` after they were
        // made here, as data and creations are.
        let removal = st.removals.front().map(|r| {
            (r.since + self.delay)
                .saturating_duration_since(now)
                .max(Duration::from_millis(if r.error.is_some() {
                    500
                } else {
                    0
                }))
        });
        // A directory whose last new child was placed outside a pass (by
        // an operation that needed it on the NAS) still waits for its mode
        // and times.
        if st
            .deferred
            .keys()
            .any(|d| !st.children.contains_key(d) && !Self::moves_into(&st, *d))
        {
            return Some(Duration::from_millis(500));
        }
        st.objs
            .iter()
            .filter(|(_, o)| o.nas.is_none() && !o.gone)
            // (Made with the first rename into it, see `pass`.)
            .filter(|(p, o)| o.attr.kind != FileKind::Dir || !Self::moves_into_tree(&st, **p))
            .map(|(_, o)| {
                let due = o.retry_at.unwrap_or(o.created + self.delay);
                due.saturating_duration_since(now)
            })
            .chain(removal)
            .min()
    }

    /// Creates on the NAS every local object that is due (all with
    /// `all`), parents first. Err when an attempt failed.
    fn pass(&self, all: bool) -> Result<(), ()> {
        let now = Instant::now();
        // Sorted: an attempt cut short first (it may have landed on the
        // NAS, and until it is settled its directory's link count counts
        // it twice: once there, once here); then what is not a file
        // (directories: the files go into them), then files; each in the
        // order made.
        let due: Vec<(bool, bool, u64)> = {
            let st = self.st();
            let mut v: Vec<(bool, bool, u64)> = st
                .objs
                .iter()
                // Further names of files are made with their files.
                .filter(|(_, o)| o.nas.is_none() && !o.gone && o.link_to.is_none())
                .filter(|(_, o)| all || o.retry_at.unwrap_or(o.created + self.delay) <= now)
                // Made by the replay of the first rename into it (or into
                // a new directory under it): placed under a conflict name
                // before, it would leave the rows naming its old path.
                .filter(|(p, o)| o.attr.kind != FileKind::Dir || !Self::moves_into_tree(&st, **p))
                .map(|(p, o)| (!o.applying, o.attr.kind == FileKind::File, *p))
                .collect();
            v.sort_unstable();
            v
        };
        if !self.st().leftovers.is_empty() {
            self.clean_leftovers();
        }
        // Before the creations: one may take a name removed here (made
        // before it, so due before it). The NAS not answering those, the
        // creations wait too.
        if self.apply_removals_until((!all).then_some(now)).is_err() {
            return Err(());
        }
        let (files, first): (Vec<_>, Vec<_>) =
            due.into_iter().partition(|&(fresh, file, _)| fresh && file);
        let mut failed = false;
        let first: Vec<u64> = first.into_iter().map(|(_, _, p)| p).collect();
        if self.promote_each(&first, &mut failed) {
            let files = self.without_pending_data(files.into_iter().map(|(_, _, p)| p));
            let later = self.promote_files(&files, &mut failed);
            self.promote_each(&later, &mut failed);
        }
        self.settle_dirs();
        if failed { Err(()) } else { Ok(()) }
    }

    /// The files of `due` whose written data is in their upper file. The
    /// others wait for write-back to put it there (a moment later, and
    /// locally): created before, a file would reach the NAS empty, and
    /// its data in a second round of NAS calls (open, write, times,
    /// fsync, close: about twice the round trips of an untar).
    fn without_pending_data(&self, due: impl Iterator<Item = u64>) -> Vec<u64> {
        let Some(pending) = self.data_pending.get() else {
            return due.collect();
        };
        let (ready, wait): (Vec<u64>, Vec<u64>) = due.partition(|p| !pending(*p));
        if !wait.is_empty() {
            let later = Instant::now() + Duration::from_millis(250);
            let mut st = self.st();
            for p in wait {
                if let Some(o) = st.objs.get_mut(&p) {
                    o.retry_at = Some(later);
                }
            }
        }
        ready
    }

    /// Creates the local objects `due` on the NAS one after the other,
    /// with what they are in. False once the NAS stopped answering.
    fn promote_each(&self, due: &[u64], failed: &mut bool) -> bool {
        for &p in due {
            if !self.lower.online() {
                *failed = true;
                return false;
            }
            if self.local(p) {
                if let Err(e) = self.promote_chain(p) {
                    *failed = true;
                    self.attempt_failed(p, &e);
                    if is_unreachable(&e) {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// Creates the new files `due` on the NAS, several at a time: a file
    /// is several NAS round trips (create, write, times, fsync, rename),
    /// and files of an untar are thousands. Only files whose directory is
    /// on the NAS are made here, each under `replay` read-held (the
    /// creations that may make directories hold it alone); the others,
    /// and the files whose directory went away meanwhile, are returned
    /// for [`Self::promote_each`].
    fn promote_files(&self, due: &[u64], failed: &mut bool) -> Vec<u64> {
        const IN_FLIGHT: usize = 8;
        let due = self.across_dirs(due);
        let queue = Mutex::new(due.iter().copied());
        let later = Mutex::new(Vec::new());
        let stop = AtomicBool::new(false);
        let any_failed = AtomicBool::new(false);
        let work = || {
            loop {
                let Some(p) = queue.lock().unwrap_or_else(|e| e.into_inner()).next() else {
                    return;
                };
                if stop.load(Ordering::Relaxed) || !self.lower.online() {
                    stop.store(true, Ordering::Relaxed);
                    any_failed.store(true, Ordering::Relaxed);
                    return;
                }
                let r = self.apply_removals().and_then(|()| {
                    let _g = self.replay.read().unwrap_or_else(|e| e.into_inner());
                    self.promote_one(p, false)
                });
                match r {
                    Ok(()) => {}
                    Err(e) if matches!(e.raw_errno(), libc::ENOENT | libc::ESTALE) => {
                        // Its directory is not on the NAS (moved here into
                        // a new one meanwhile), or is to be found again or
                        // made again: one at a time.
                        later.lock().unwrap_or_else(|e| e.into_inner()).push(p);
                    }
                    Err(e) => {
                        any_failed.store(true, Ordering::Relaxed);
                        self.attempt_failed(p, &e);
                        if is_unreachable(&e) {
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                }
            }
        };
        crate::parallel::on_threads(IN_FLIGHT.min(due.len()), work);
        if any_failed.load(Ordering::Relaxed) {
            *failed = true;
        }
        if stop.load(Ordering::Relaxed) {
            return Vec::new();
        }
        let mut later = later.into_inner().unwrap_or_else(|e| e.into_inner());
        later.sort_unstable();
        later
    }

    /// `due` in turns over their directories (each directory's in the
    /// order made): the files in flight are then mostly in different
    /// directories, which a NAS, as the view here (see `window`), changes
    /// one entry at a time.
    fn across_dirs(&self, due: &[u64]) -> Vec<u64> {
        let mut by_dir: BTreeMap<u64, VecDeque<u64>> = BTreeMap::new();
        {
            let st = self.st();
            for &p in due {
                let d = st.objs.get(&p).map_or(0, |o| o.parent);
                by_dir.entry(d).or_default().push_back(p);
            }
        }
        let mut out = Vec::with_capacity(due.len());
        while !by_dir.is_empty() {
            by_dir.retain(|_, q| {
                out.extend(q.pop_front());
                !q.is_empty()
            });
        }
        out
    }

    /// Notes a failed attempt to create `p` on the NAS: its error (for
    /// status) and when to try again.
    fn attempt_failed(&self, p: u64, e: &BackendError) {
        let mut st = self.st();
        if !is_unreachable(e) {
            self.retries.fetch_add(1, Ordering::Relaxed);
        }
        if log::log_enabled!(log::Level::Debug) {
            if let Some(o) = st.objs.get(&p) {
                let po = st
                    .objs
                    .get(&o.parent)
                    .map(|po| (&po.name, &po.nas, po.gone));
                log::debug!(
                    "{p:x} failed (attempt {}): parent {:x} {po:?} parent_nas {:?}",
                    o.attempts + 1,
                    o.parent,
                    o.parent_nas
                );
            }
        }
        if let Some(o) = st.objs.get_mut(&p) {
            o.attempts += 1;
            if o.attempts == 1 && !is_unreachable(e) {
                log::warn!("creating {:?} on the NAS: {e}; will retry", o.name);
            }
            o.error = Some(e.to_string());
            // The NAS not answering says nothing of the object: it goes
            // again as soon as the NAS answers.
            let wait = if is_unreachable(e) {
                Duration::ZERO
            } else {
                Duration::from_millis(500)
                    .saturating_mul(1 << o.attempts.min(6))
                    .min(Duration::from_secs(30))
            };
            o.retry_at = Some(Instant::now() + wait);
        }
    }

    /// Applies on the NAS, in the order they were made, the removals,
    /// renames, links and attribute changes kept here. Err once the NAS
    /// does not answer (the rest wait); every other outcome is final:
    /// made, found made already, or kept as a conflict (changed there
    /// meanwhile, or not empty).
    fn apply_removals(&self) -> BResult<()> {
        self.apply_removals_until(None)
    }

    /// As `apply_removals`, with `at`: only those due then
    /// (`writeback_delay` after they were made).
    fn apply_removals_until(&self, at: Option<Instant>) -> BResult<()> {
        if self.st().removals.is_empty() {
            return Ok(());
        }
        let _g = self.removing.lock().unwrap_or_else(|e| e.into_inner());
        // Also the rows made meanwhile (an rm -rf going on): the caller
        // may be about to rename a directory they are under, whose path
        // they hold. (At most MAX_KEPT_CHANGES, see fs.rs, are kept while
        // the NAS answers: the wait is bounded.)
        loop {
            let due = |r: &&Removal<B::Node>| at.is_none_or(|at| r.since + self.delay <= at);
            let Some(r) = self.st().removals.front().filter(due).cloned() else {
                return Ok(());
            };
            let shown = Self::shown_of(&self.st(), r.was.ino);
            let Removal {
                id,
                dir,
                dir_ino,
                mut path,
                name,
                kind,
                was,
                to,
                set,
                ..
            } = r;
            let set = set.map(|s| (s.node, s.rec, s.xattr));
            // Into a directory made here: it (and the new directories it
            // is in) is made on the NAS first. (Not under `window_place`,
            // which its creation takes.)
            let mut to = to;
            let mut made_err = None;
            if let Some(t) = to.as_mut().filter(|t| t.dir.is_none()) {
                let made = self.promote_chain_now(t.dir_ino);
                // The paths as now, whether the chain was made or not: a
                // directory of it may have got the conflict name (`finish`).
                if let Some(f) = self.st().removals.iter().find(|r| r.id == id) {
                    path = f.path.clone();
                    if let Some(ft) = f.to.as_ref().filter(|ft| ft.dir_ino == t.dir_ino) {
                        t.path = ft.path.clone();
                    }
                }
                match made {
                    Ok(n) => {
                        // (Unless sent elsewhere meanwhile, see below.)
                        if let Some(f) = self.st().removals.iter_mut().find(|r| r.id == id) {
                            if let Some(ft) = f.to.as_mut() {
                                if ft.dir_ino == t.dir_ino && ft.dir.is_none() {
                                    ft.dir = Some(n.clone());
                                }
                            }
                        }
                        t.dir = Some(n);
                    }
                    Err(e) if is_unreachable(&e) => {
                        if let Some(r) = self.st().removals.front_mut() {
                            r.error = Some(e.to_string());
                        }
                        return Err(e);
                    }
                    Err(e) => made_err = Some(e),
                }
            }
            // What an attempt cut short left at the target name goes first
            // (it would be taken for another client's there).
            if let Some(t) = to
                .as_ref()
                .filter(|t| t.dir.is_some() && made_err.is_none())
            {
                if let Err(e) = self.clear_leftovers_for(t.dir_ino, &t.name, false) {
                    if let Some(r) = self.st().removals.front_mut() {
                        r.error = Some(e.to_string());
                    }
                    return Err(e);
                }
            }
            // Readers of the directories it changes wait until the view
            // has the change too (a listing must not combine the NAS's of
            // after with the pending change, or the other way round).
            let mut dirs = vec![dir_ino];
            dirs.extend(to.as_ref().map(|t| t.dir_ino));
            let _w = set.is_none().then(|| self.window_place(&dirs));
            // A rename into a new directory may have been undone or sent
            // elsewhere meanwhile (`remove_moved_in`, `move_moved_in`,
            // which hold that directory's stripe): taken again.
            if let Some(t) = &to {
                let now = self.st().removals.front().and_then(|f| {
                    (f.id == id).then(|| f.to.as_ref().map(|x| (x.dir_ino, x.name.clone())))
                });
                if now != Some(Some((t.dir_ino, t.name.clone()))) {
                    continue;
                }
            }
            // (what is shown as changed, where the NAS's object is, why)
            let outcome = match &to {
                _ if made_err.is_some() => Err(made_err.take().unwrap_or_else(|| unreachable!())),
                None if set.is_some() => {
                    let (node, rec, x) = set.as_ref().unwrap_or_else(|| unreachable!());
                    self.set_on_nas(node, &was, (rec, x.as_ref()), shown)
                        .map(|c| c.map(|reason| (path.clone(), path.clone(), reason)))
                }
                None => match self.replacing_move_stale(id, dir_ino, &name) {
                    Ok(true) => Ok(Some((
                        path.clone(),
                        path.clone(),
                        "to be replaced by a rename here, whose object was removed or replaced \
                         on the NAS meanwhile: the NAS's stays"
                            .to_string(),
                    ))),
                    Ok(false) => self
                        .remove_on_nas(&dir, &name, kind, &was)
                        .map(|c| c.map(|reason| (path.clone(), path.clone(), reason))),
                    Err(e) => Err(e),
                },
                Some(t) => match (t.link, &t.dir) {
                    (_, None) => Err(err("rename", libc::EIO)),
                    (true, Some(td)) => self.link_on_nas(&t.node, &was, (td, &t.name), shown),
                    (false, Some(td)) => {
                        self.move_on_nas((&dir, &name), (td, &t.name), kind, &was, shown)
                    }
                }
                .map(|c| {
                    c.map(|(reason, kept)| match kept {
                        Some(kept) => {
                            let parent = Path::new(&t.path).parent();
                            let parent = parent.map_or(OsStr::new(""), |p| p.as_os_str());
                            let kept_path = join_path(parent, &kept);
                            if !t.link {
                                self.moved_to_conflict(shown, t.dir_ino, &kept);
                                self.repath(id, was.ino, &t.path, &kept_path);
                            }
                            (t.path.clone(), kept_path, reason)
                        }
                        None => (t.path.clone(), path.clone(), reason),
                    })
                }),
            };
            let what = match &to {
                Some(t) if t.link => "linked",
                Some(_) => "renamed",
                None if set.is_some() => "changed",
                None => "removed",
            };
            let conflict = match outcome {
                Ok(c) => c,
                Err(e) if is_unreachable(&e) => {
                    if let Some(r) = self.st().removals.front_mut() {
                        r.error = Some(e.to_string());
                    }
                    return Err(e);
                }
                Err(e) => Some((
                    path.clone(),
                    path.clone(),
                    format!("could not be {what} on the NAS ({e})"),
                )),
            };
            // A rename not made (the object stays where it was, or is
            // gone): what followed it to its new path comes back (a
            // directory's rows, a file's data rows), and a directory made
            // here no longer counts a directory that did not come.
            if let (Some(t), Some((_, kept, _))) = (to.as_ref().filter(|t| !t.link), &conflict) {
                if *kept == path {
                    // (Gone there: what was made in it or written to it
                    // here comes back at the new name, as shown.)
                    let there = match self.lower.lookup(&dir, &name) {
                        Ok((_, a)) => a.ino == was.ino,
                        // Not knowing is not "gone": the row stays, tried
                        // again.
                        Err(e) if is_unreachable(&e) => {
                            if let Some(r) = self.st().removals.front_mut() {
                                r.error = Some(e.to_string());
                            }
                            return Err(e);
                        }
                        Err(_) => false,
                    };
                    if there {
                        self.moved_to_conflict(shown, dir_ino, &name);
                        self.repath(id, was.ino, &t.path, &path);
                        let mut st = self.st();
                        let new_dir = st.objs.get_mut(&t.dir_ino).filter(|o| o.nas.is_none());
                        if let (FileKind::Dir, Some(o)) = (kind, new_dir) {
                            o.attr.nlink = o.attr.nlink.saturating_sub(1).max(2);
                        }
                    }
                }
            }
            // The first, unless a rollback took it meanwhile.
            let mut st = self.st();
            st.unmoved.remove(&id);
            match st.removals.front() {
                Some(r) if r.id == id => drop(st.removals.pop_front()),
                _ => st.removals.retain(|r| r.id != id),
            }
            drop(st);
            // Counted once the row no longer shows: a conflict makes the
            // mount ask again, which must not see the row.
            if let Some((shown_path, kept, reason)) = conflict {
                self.note_conflict(&shown_path, &kept, &reason);
            } else {
                log::debug!("{what} {path:?} (nas ino {}) on the NAS", was.ino);
            }
            if let Err(e) = self.journal.delete_removal(id) {
                log::warn!("journal: {e}");
            }
        }
    }

    /// Whether removal `id` (of `name` in `dir_ino`) was made for a rename
    /// over it (the next row, of the same journal transaction) whose
    /// object is no longer on the NAS as it was renamed here: the rename
    /// will not be made, so neither is the removal (the NAS's object
    /// stays, rather than neither).
    fn replacing_move_stale(&self, id: u64, dir_ino: u64, name: &OsStr) -> BResult<bool> {
        let next = {
            let st = self.st();
            // (Not a removal made on its own just before a rename there.)
            if !st
                .removals
                .front()
                .is_some_and(|f| f.id == id && f.for_next)
            {
                return Ok(false);
            }
            st.removals.get(1).filter(|m| m.id == id + 1).and_then(|m| {
                let t = m.to.as_ref()?;
                (!t.link && t.dir_ino == dir_ino && t.name == name)
                    .then(|| (m.dir.clone(), m.name.clone(), m.kind, m.was.ino))
            })
        };
        let Some((mdir, mname, kind, ino)) = next else {
            return Ok(false);
        };
        match self.lower.lookup(&mdir, &mname) {
            Ok((_, a)) => Ok(a.ino != ino || a.kind != kind),
            Err(e) if matches!(e.raw_errno(), libc::ENOENT | libc::ESTALE) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Applies the pending changes, then checks that each of `names`
    /// that showed a NAS object renamed or linked there here still leads
    /// to it on the NAS: if that name was taken there meanwhile, the
    /// object got the conflict name and what the NAS has under the name
    /// is another client's, never to act on by this name (ENOENT).
    fn apply_removals_at(
        &self,
        names: &[(&ONode<B::Node>, &OsStr)],
        op: &'static str,
    ) -> BResult<()> {
        let expect: Vec<(&ONode<B::Node>, &OsStr, u64)> = {
            let st = self.st();
            names
                .iter()
                .filter_map(|(d, n)| match Self::pending_at(&st, d.ino, n) {
                    AtName::MovedIn(id) => {
                        let r = st.removals.iter().find(|r| r.id == id)?;
                        Some((*d, *n, r.was.ino))
                    }
                    _ => None,
                })
                .collect()
        };
        self.apply_removals()?;
        for (dir, name, ino) in expect {
            let Some(d) = self.nas_of(dir) else { continue };
            match self.lower.lookup(&d, name) {
                Ok((_, a)) if a.ino == ino => {}
                Ok(_) => {
                    log::warn!(
                        "{op} {name:?}: the NAS has another object under that name (a conflict); \
                         not acting on it"
                    );
                    return Err(err(op, libc::ENOENT));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The removal of NAS object `node` (of `kind`, version `was`), `name`
    /// in `dir`, while the NAS does not answer: its journal row, whose
    /// data rows go with it, and its entry (id 0 until journaled).
    #[allow(clippy::type_complexity)]
    fn removal(
        st: &State<B>,
        (dir, d, name): (&ONode<B::Node>, B::Node, &OsStr),
        (node, kind, was): (&ONode<B::Node>, FileKind, Validator),
    ) -> BResult<(RemovalRecord, Option<u64>, Removal<B::Node>)> {
        let op = "remove";
        if st
            .children
            .get(&dir.ino)
            .is_some_and(|m| m.contains_key(name))
        {
            return Err(err(op, libc::EIO));
        }
        if kind == FileKind::Dir && st.children.get(&was.ino).is_some_and(|m| !m.is_empty()) {
            return Err(err(op, libc::ENOTEMPTY));
        }
        if Self::is_removed(st, dir.ino, name) {
            return Err(err(op, libc::ENOENT));
        }
        // Without its directory's path it could not be found after a
        // restart: refused, as before.
        let Some(dir_path) = Self::dir_path(st, dir.ino) else {
            return Err(err(op, libc::EIO));
        };
        // The node's number, not the attributes' (a file saved over
        // another shows the new file's until looked up again); an object
        // created here is known by its provisional number.
        let nas_ino = Self::nas_ino_of(st, node.ino);
        let was = Validator {
            ino: nas_ino,
            ..was
        };
        let rec = RemovalRecord {
            id: 0,
            dir_path,
            name: name.to_os_string(),
            kind,
            was,
            to: None,
            link: false,
            set: None,
            xattr: None,
        };
        let r = Removal {
            id: 0,
            dir: d,
            dir_ino: dir.ino,
            path: join_path(&rec.dir_path, &rec.name),
            name: rec.name.clone(),
            kind,
            was,
            since: Instant::now(),
            error: None,
            to: None,
            set: None,
            for_next: false,
        };
        Ok((rec, (kind == FileKind::File).then_some(node.ino), r))
    }

    /// The rename still to make that put NAS object `node` at `name` in
    /// `dir`, a directory made here (not on the NAS yet): its position in
    /// the queue. None if it is not one (a link, another object).
    fn moved_in_row(
        st: &State<B>,
        dir: &ONode<B::Node>,
        name: &OsStr,
        node: &ONode<B::Node>,
    ) -> Option<usize> {
        let AtName::MovedIn(id) = Self::pending_at(st, dir.ino, name) else {
            return None;
        };
        let pos = st.removals.iter().position(|r| r.id == id)?;
        let r = &st.removals[pos];
        let t = r.to.as_ref()?;
        let ours = r.was.ino == Self::nas_ino_of(st, node.ino);
        (!t.link && t.dir.is_none() && ours).then_some(pos)
    }

    /// Whether the rename still to make at `pos` (of a file, not a
    /// directory) can go to `name` in `dir` instead, or be undone, in its
    /// place in the queue: the changes after it must not depend on where
    /// it goes. None of them renames a directory (the paths it was
    /// given as the NAS would have them then, are those of now), or
    /// takes, frees or fills that name, nor the name of a directory made
    /// here that it would go into or under (made on the NAS in the
    /// rename's place: the NAS would have the name taken, or free, at the
    /// wrong time), and no such directory has the name the rename frees.
    fn settled_after(st: &State<B>, pos: usize, dir: u64, name: &OsStr) -> bool {
        let mut names = vec![(dir, name)];
        let mut cur = dir;
        while let Some(o) = st.objs.get(&cur).filter(|o| o.nas.is_none() && !o.gone) {
            if names.len() > 4096 {
                return false;
            }
            names.push((o.parent, o.name.as_os_str()));
            cur = o.parent;
        }
        // Nor its own old name: the NAS object leaves it only then.
        let own = &st.removals[pos];
        if names[1..].contains(&(own.dir_ino, own.name.as_os_str())) {
            return false;
        }
        let at = |d: u64, n: &OsStr| names.iter().any(|&(pd, pn)| pd == d && pn == n);
        st.removals.iter().skip(pos + 1).all(|r| {
            let moves_dir = r.kind == FileKind::Dir && r.to.as_ref().is_some_and(|t| !t.link);
            let fills = r.to.as_ref().is_some_and(|t| at(t.dir_ino, &t.name));
            !moves_dir && !fills && !at(r.dir_ino, &r.name)
        })
    }

    /// Whether `name` in `dir` holds a new object, or a NAS object renamed
    /// there, not on the NAS yet.
    fn taken_here(st: &State<B>, dir: u64, name: &OsStr) -> bool {
        st.children.get(&dir).is_some_and(|m| m.contains_key(name))
            || matches!(Self::pending_at(st, dir, name), AtName::MovedIn(_))
    }

    /// `rm` of a NAS object renamed here into a directory made here, before
    /// the rename reached the NAS: the rename becomes the removal of the
    /// object where it is on the NAS (the same row, in its place: the
    /// changes after it found its old name vacated, as it still is).
    fn remove_moved_in(
        &self,
        dir: &ONode<B::Node>,
        name: &OsStr,
        (node, kind, was): (&ONode<B::Node>, FileKind, Validator),
        at: SystemTime,
    ) -> BResult<()> {
        let mut st = self.st();
        let Some(pos) = Self::moved_in_row(&st, dir, name, node) else {
            return Err(err("remove", libc::EIO));
        };
        // A directory's rows followed it there: the NAS way.
        if kind == FileKind::Dir {
            return Err(err("remove", libc::EIO));
        }
        let id = st.removals[pos].id;
        // The version to remove is the caller's (the NAS's, for a file
        // with changes pending), not the one the rename noted.
        let was = Validator {
            ino: Self::nas_ino_of(&st, node.ino),
            ..was
        };
        let data_of = (kind == FileKind::File).then_some(node.ino);
        self.journal
            .reshape(id, None, &was, data_of)
            .map_err(journal_err("journal"))?;
        let r = &mut st.removals[pos];
        let before = (r.to.take(), r.was);
        r.was = was;
        if let (Some(t), old) = before {
            st.unmoved.insert(id, (t, old));
        }
        log::debug!(
            "{:?} (nas ino {}) renamed here into a new directory, then removed: removed \
             where it is on the NAS once it answers",
            st.removals[pos].path,
            st.removals[pos].was.ino
        );
        Self::dir_changed(&mut st, dir.ino, at, 0);
        Ok(())
    }

    /// `mv` of a NAS object renamed here into a directory made here, before
    /// that rename reached the NAS: the rename goes to the new name
    /// instead, when no change after it relies on where it goes
    /// (`settled_after`), the new name is free and the new directory is
    /// one the first rename could go to.
    fn move_moved_in(
        &self,
        (dir, name): (&ONode<B::Node>, &OsStr),
        (newdir, newname): (&ONode<B::Node>, &OsStr),
        node: &ONode<B::Node>,
        at: SystemTime,
    ) -> BResult<()> {
        let op = "rename";
        let nd = self.nas_of(newdir);
        let mut st = self.st();
        let Some(pos) = Self::moved_in_row(&st, dir, name, node) else {
            return Err(err(op, libc::EIO));
        };
        // (A directory's rows followed it there: the NAS way.)
        if !Self::settled_after(&st, pos, newdir.ino, newname)
            || is_hidden(newname)
            || st.removals[pos].kind == FileKind::Dir
        {
            return Err(err(op, libc::EIO));
        }
        let row = st.removals[pos].id;
        // A new object there, or one renamed there: the NAS way. (A NAS
        // object there: the caller vouched that there is none.)
        if Self::taken_here(&st, newdir.ino, newname) {
            return Err(err(op, libc::EIO));
        }
        let (src_dir, kind) = (st.removals[pos].dir.clone(), st.removals[pos].kind);
        // Back where it was on the NAS: nothing to make there.
        let r = &st.removals[pos];
        if (r.dir_ino, r.name.as_os_str()) == (newdir.ino, newname) {
            let id = r.id;
            self.journal
                .delete_removal(id)
                .map_err(journal_err("journal"))?;
            st.removals.remove(pos);
            log::debug!("a rename still to make was undone here");
            Self::dir_changed(&mut st, dir.ino, at, 0);
            Self::dir_changed(&mut st, newdir.ino, at, 0);
            return Ok(());
        }
        let new_dir_ok = nd.is_some() || Self::is_new_dir(&st, newdir.ino);
        if !new_dir_ok || kind == FileKind::Dir {
            return Err(err(op, libc::EIO));
        }
        let Some(newdir_path) = Self::dir_path(&st, newdir.ino) else {
            return Err(err(op, libc::EIO));
        };
        drop(st);
        // (Where the NAS's filesystem may differ: EXDEV at the replay.)
        let target = nd.clone().or_else(|| self.nas_dir_above(newdir.ino));
        if !target.is_some_and(|t| self.lower.same_fs(&src_dir, &t)) {
            return Err(err(op, libc::EIO));
        }
        let mut st = self.st();
        // Still that row, and still nothing after it in the way; the new
        // name still free and its directory where it was.
        if Self::taken_here(&st, newdir.ino, newname)
            || Self::dir_path(&st, newdir.ino).as_ref() != Some(&newdir_path)
        {
            return Err(err(op, libc::EIO));
        }
        let pos = match Self::moved_in_row(&st, dir, name, node) {
            Some(p)
                if st.removals[p].id == row && Self::settled_after(&st, p, newdir.ino, newname) =>
            {
                p
            }
            _ => return Err(err(op, libc::EIO)),
        };
        let id = st.removals[pos].id;
        let was = st.removals[pos].was;
        self.journal
            .reshape(id, Some((&newdir_path, newname)), &was, None)
            .map_err(journal_err("journal"))?;
        let newpath = join_path(&newdir_path, newname);
        if let Some(t) = st.removals[pos].to.as_mut() {
            t.dir = nd;
            t.dir_ino = newdir.ino;
            t.name = newname.to_os_string();
            t.path = newpath.clone();
        }
        log::debug!("a rename still to make goes to {newpath:?} instead");
        Self::dir_changed(&mut st, dir.ino, at, 0);
        Self::dir_changed(&mut st, newdir.ino, at, 0);
        Ok(())
    }

    /// Removal `r`, journaled, is in the view; its directory changed `at`.
    fn removed(st: &mut State<B>, r: Removal<B::Node>, at: SystemTime) {
        if r.kind == FileKind::Dir {
            st.dirs
                .retain(|_, v| !(v.parent == r.dir_ino && v.name == r.name));
        }
        Self::dir_changed(st, r.dir_ino, at, 0);
        st.removals.push_back(r);
    }

    /// Renames `name` in NAS directory `dir` to `newname` in `newdir` if it
    /// is still the object renamed here (`shown`: its inode number here),
    /// never over anything: Some((reason, None)) when it stays where it
    /// is, Some((reason, Some(conflict name))) when the new name was taken
    /// there meanwhile.
    fn move_on_nas(
        &self,
        (dir, name): (&B::Node, &OsStr),
        (newdir, newname): (&B::Node, &OsStr),
        kind: FileKind,
        was: &Validator,
        shown: u64,
    ) -> BResult<Option<(String, Option<OsString>)>> {
        let a = match self.lower.lookup(dir, name) {
            Ok((_, a)) => Some(a),
            Err(e) if matches!(e.raw_errno(), libc::ENOENT | libc::ESTALE) => None,
            Err(e) => return Err(e),
        };
        let Some(a) = a.filter(|a| a.ino == was.ino && a.kind == kind) else {
            // Made already (by an attempt cut short by a crash, or
            // abandoned after `timeo` and finished since)?
            if let Ok((_, b)) = self.lower.lookup(newdir, newname) {
                if b.ino == was.ino {
                    return Ok(None);
                }
            }
            if a.is_none() {
                return Ok(Some((
                    "renamed here, and removed on the NAS meanwhile: nothing to rename".into(),
                    None,
                )));
            }
            return Ok(Some((
                "renamed here, and replaced on the NAS meanwhile: the NAS's stays where it is"
                    .into(),
                None,
            )));
        };
        self.own_ctime(shown, None);
        let kept = self.move_noreplace((dir, name), newdir, newname)?;
        if kind == FileKind::File {
            if let Ok((_, b)) = self.lower.lookup(newdir, &kept) {
                self.own_ctime(shown, Some((&a, &b)));
            }
        }
        Ok((kept != newname).then(|| {
            (
                "renamed here to a name taken on the NAS meanwhile: the NAS's keeps it".into(),
                Some(kept),
            )
        }))
    }

    /// [`Backend::set_later`] and [`Backend::xattr_later`]: a row that
    /// sets `rec` (or, with `xattr`, an extended attribute) of NAS object
    /// `node`, known as `name` in `dir`.
    fn keep_set(
        &self,
        (dir, name): (&ONode<B::Node>, &OsStr),
        node: &ONode<B::Node>,
        kind: FileKind,
        was: Validator,
        rec: SetRecord,
        xattr: Option<XattrRecord>,
    ) -> BResult<()> {
        let op = if xattr.is_some() {
            "setxattr"
        } else {
            "setattr"
        };
        let _w = self.window_read(&[dir.ino]);
        let (Some(d), Some(obj)) = (self.nas_of(dir), self.nas_of(node)) else {
            return Err(err(op, libc::EIO));
        };
        let mut st = self.st();
        if Self::pending_at(&st, dir.ino, name) == AtName::Gone
            || st
                .children
                .get(&dir.ino)
                .is_some_and(|m| m.contains_key(name))
        {
            // Known by a name changed here: not found again by it.
            return Err(err(op, libc::EIO));
        }
        let Some(dir_path) = Self::dir_path(&st, dir.ino) else {
            return Err(err(op, libc::EIO));
        };
        let nas_ino = Self::nas_ino_of(&st, node.ino);
        let was = Validator {
            ino: nas_ino,
            ..was
        };
        let r = RemovalRecord {
            id: 0,
            dir_path,
            name: name.to_os_string(),
            kind,
            was,
            to: None,
            link: false,
            set: Some(rec),
            xattr: xattr.clone(),
        };
        let id = self
            .journal
            .add_change(&r, None, &[])
            .map_err(journal_err("journal"))?;
        let what = match &r.xattr {
            Some(x) => format!("xattr {:?}", x.name),
            None => "attributes".into(),
        };
        log::debug!("{what} of {name:?} (nas ino {nas_ino}) set here; on the NAS once it answers");
        st.removals.push_back(Removal {
            id,
            dir: d,
            dir_ino: dir.ino,
            path: join_path(&r.dir_path, &r.name),
            name: r.name,
            kind,
            was,
            since: Instant::now(),
            error: None,
            to: None,
            set: Some(SetHere {
                node: obj,
                rec,
                xattr,
            }),
            for_next: false,
        });
        // What new objects made in it inherit.
        if let Some(x) = st.dirs.get_mut(&node.ino) {
            if let Some(m) = rec.mode {
                x.perm = (m & 0o7777) as u16;
            }
            x.gid = rec.gid.unwrap_or(x.gid);
        }
        drop(st);
        // Due after the write-back delay, as creations (an rm -rf must
        // not run a pass per entry).
        self.due_at(Instant::now() + self.delay);
        Ok(())
    }

    /// setattr of NAS object `n` (`ino` here): a directory's mode and
    /// times are set again after new objects still to create in it.
    fn setattr_nas(
        &self,
        n: &B::Node,
        ino: u64,
        lf: Option<&B::File>,
        changes: &SetAttr,
    ) -> BResult<Attr> {
        let _w = self.window_read(&[ino]);
        // A directory with new objects still to create in it gets its mode
        // after them (one without write for its owner could not take them).
        let later_mode = changes
            .mode
            .filter(|_| self.st().children.contains_key(&ino));
        let now = SetAttr {
            mode: changes.mode.filter(|_| later_mode.is_none()),
            ..*changes
        };
        let nothing = now.mode.is_none()
            && now.uid.is_none()
            && now.gid.is_none()
            && now.size.is_none()
            && now.atime.is_none()
            && now.mtime.is_none();
        let a = match nothing {
            true => self.lower.getattr(n)?,
            false => self.lower.setattr(n, lf, &now)?,
        };
        let mut st = self.st();
        if a.kind == FileKind::Dir
            && (changes.mtime.is_some() || changes.atime.is_some() || changes.mode.is_some())
        {
            let ino = st.alias.get(&a.ino).map(|al| al.prov).unwrap_or(a.ino);
            if st.children.contains_key(&ino) || st.deferred.contains_key(&ino) {
                // Local children still to create would move the mtime on
                // the NAS: set again once they are there.
                let perm = later_mode.map_or(a.perm, |m| (m & 0o7777) as u16);
                st.deferred.insert(
                    ino,
                    Deferred {
                        perm: Some(perm),
                        atime: a.atime,
                        mtime: a.mtime,
                    },
                );
                st.deferred_nodes.insert(ino, n.clone());
            }
        }
        Ok(Self::up_in(&mut st, a))
    }

    /// Sets on NAS object `node` (`shown` here) the attributes (or the
    /// extended attribute) set here, if it is still the object they were
    /// set on; Some(reason) when they are dropped instead (the object is
    /// gone, or the NAS refuses them).
    fn set_on_nas(
        &self,
        node: &B::Node,
        was: &Validator,
        (rec, xattr): (&SetRecord, Option<&XattrRecord>),
        shown: u64,
    ) -> BResult<Option<String>> {
        let what = match xattr {
            Some(x) => format!("extended attribute {:?}", x.name),
            None => "attributes".into(),
        };
        let before = match self.lower.getattr(node) {
            Ok(a) if a.ino == was.ino && a.nlink > 0 => a,
            Ok(_) => {
                return Ok(Some(format!(
                    "{what} set here, and removed on the NAS meanwhile"
                )));
            }
            Err(e) if matches!(e.raw_errno(), libc::ENOENT | libc::ESTALE) => {
                return Ok(Some(format!(
                    "{what} set here, and removed on the NAS meanwhile"
                )));
            }
            Err(e) => return Err(e),
        };
        let done = match xattr {
            Some(x) => {
                // A file's write-back must not take the new ctime for
                // another client's change.
                self.own_ctime(shown, None);
                let r = match &x.value {
                    Some(v) => self.lower.setxattr(node, &x.name, v, 0),
                    // Gone already (by another client): as wished.
                    None => match self.lower.removexattr(node, &x.name) {
                        Err(e) if e.raw_errno() == libc::ENODATA => Ok(()),
                        r => r,
                    },
                };
                if r.is_ok() {
                    if let Ok(after) = self.lower.getattr(node) {
                        self.own_ctime(shown, Some((&before, &after)));
                    }
                }
                r
            }
            None => {
                let changes = SetAttr {
                    mode: rec.mode,
                    uid: rec.uid,
                    gid: rec.gid,
                    size: None,
                    atime: rec.atime.map(SetTime::At),
                    mtime: rec.mtime.map(SetTime::At),
                };
                self.setattr_nas(node, shown, None, &changes).map(|_| ())
            }
        };
        match done {
            Ok(()) => Ok(None),
            Err(e)
                if matches!(
                    e.raw_errno(),
                    libc::EPERM | libc::EACCES | libc::EOPNOTSUPP | libc::E2BIG | libc::ERANGE
                ) || (xattr.is_some() && e.raw_errno() == libc::ENOSPC) =>
            {
                Ok(Some(format!(
                    "{what} set here that the NAS refuses ({e}): dropped"
                )))
            }
            Err(e) => Err(e),
        }
    }

    /// Makes a hard link `newname` in `newdir` to NAS file `node` if it is
    /// still the one linked here (`was`), never over anything: as
    /// [`Overlay::move_on_nas`].
    fn link_on_nas(
        &self,
        node: &B::Node,
        was: &Validator,
        (newdir, newname): (&B::Node, &OsStr),
        shown: u64,
    ) -> BResult<Option<(String, Option<OsString>)>> {
        let gone = || {
            Ok(Some((
                "linked here, and removed on the NAS meanwhile: no link made".into(),
                None,
            )))
        };
        let before = match self.lower.getattr(node) {
            Ok(a) if a.ino == was.ino && a.nlink > 0 => a,
            Ok(_) => return gone(),
            Err(e) if matches!(e.raw_errno(), libc::ENOENT | libc::ESTALE) => return gone(),
            Err(e) => return Err(e),
        };
        self.own_ctime(shown, None);
        let linked = |r: BResult<Attr>| {
            if let Ok(after) = &r {
                self.own_ctime(shown, Some((&before, after)));
            }
            r
        };
        let kept = match linked(self.lower.link(node, newdir, newname)) {
            Ok(_) => return Ok(None),
            Err(e) if e.raw_errno() != libc::EEXIST => return Err(e),
            // Made already (an attempt cut short by a crash, or abandoned
            // after `timeo` and finished since)?
            Err(_)
                if self
                    .lower
                    .lookup(newdir, newname)
                    .is_ok_and(|(_, a)| a.ino == was.ino) =>
            {
                return Ok(None);
            }
            Err(_) => {
                let made = self.conflict_create(newdir, newname, |n| {
                    linked(self.lower.link(node, newdir, n)).map(|a| (node.clone(), a))
                })?;
                made.0
            }
        };
        Ok(Some((
            "linked here to a name taken on the NAS meanwhile: the NAS's keeps it".into(),
            Some(kept),
        )))
    }

    /// nassync itself is about to move (`None`), or has moved from
    /// `before` to `after`, the ctime of NAS file `shown` (a rename or a
    /// link made here applied there): write-back, and the data rows in the
    /// journal (at mount), must not take it for another client's change.
    fn own_ctime(&self, shown: u64, change: Option<(&Attr, &Attr)>) {
        let own = self.own_meta.get();
        match change {
            None => {
                if let Some(f) = own {
                    f(shown, None);
                }
            }
            Some((a, b)) if a.kind == FileKind::File && b.ino == a.ino && b.ctime != a.ctime => {
                if let Err(e) = self.journal.rebase_ctime(a.ino, a.ctime, b.ctime) {
                    log::warn!("journal: {e}");
                }
                if let Some(f) = own {
                    f(shown, Some(b));
                }
            }
            Some(_) => {}
        }
    }

    /// Removes `name` from NAS directory `dir` if it is still the version
    /// removed here; Some(reason) when what is there is kept instead.
    fn remove_on_nas(
        &self,
        dir: &B::Node,
        name: &OsStr,
        kind: FileKind,
        was: &Validator,
    ) -> BResult<Option<String>> {
        let a = match self.lower.lookup(dir, name) {
            Ok((_, a)) => a,
            Err(e) if matches!(e.raw_errno(), libc::ENOENT | libc::ESTALE) => return Ok(None),
            Err(e) => return Err(e),
        };
        if a.ino != was.ino || a.kind != kind {
            return Ok(Some(
                "removed here, and replaced on the NAS meanwhile: the NAS's is kept".into(),
            ));
        }
        if kind == FileKind::Dir {
            return match self.lower.rmdir(dir, name) {
                Ok(()) => Ok(None),
                Err(e) if matches!(e.raw_errno(), libc::ENOTEMPTY | libc::EEXIST) => Ok(Some(
                    "removed here, but it gained entries on the NAS meanwhile: it stays with them"
                        .into(),
                )),
                Err(e) if e.raw_errno() == libc::ENOENT => Ok(None),
                Err(e) => Err(e),
            };
        }
        if a.size != was.size || a.mtime != was.mtime {
            log::debug!(
                "{name:?} removed here as size {} mtime {:?}; the NAS has size {} mtime {:?}",
                was.size,
                was.mtime,
                a.size,
                a.mtime
            );
            return Ok(Some(
                "removed here, but changed on the NAS meanwhile: the NAS's version is kept".into(),
            ));
        }
        match self.lower.unlink(dir, name) {
            Ok(()) => Ok(None),
            Err(e) if e.raw_errno() == libc::ENOENT => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Gives directories their mode and times once no local child is left
    /// to create in them.
    fn settle_dirs(&self) {
        let ready: Vec<u64> = {
            let st = self.st();
            st.deferred
                .keys()
                .filter(|d| !st.children.contains_key(d) && !Self::moves_into(&st, **d))
                .copied()
                .collect()
        };
        for d in ready {
            // Found first: finding it may walk the NAS, which must not
            // hold off the view's readers.
            let node = ONode { ino: d, nas: None };
            let held = self.st().deferred_nodes.get(&d).cloned();
            let Some(n) = self.nas_of(&node).or(held).or_else(|| self.dir_node(d)) else {
                log::warn!(
                    "directory {:?}: not found on the NAS to set its mode and times",
                    Self::dir_path(&self.st(), d)
                );
                let mut st = self.st();
                st.deferred.remove(&d);
                st.deferred_nodes.remove(&d);
                continue;
            };
            // A chmod or utimes of the directory here goes to the NAS under
            // `window` read-held and updates what is deferred: set under
            // `window` with what is deferred then, an older mode or time
            // cannot overwrite a newer one.
            let _w = self.window.write().unwrap_or_else(|e| e.into_inner());
            let x = {
                let st = self.st();
                match st.deferred.get(&d) {
                    Some(x) if !st.children.contains_key(&d) && !Self::moves_into(&st, d) => *x,
                    _ => continue,
                }
            };
            let changes = SetAttr {
                mode: x.perm.map(|p| p as u32),
                atime: Some(SetTime::At(x.atime)),
                mtime: Some(SetTime::At(x.mtime)),
                ..SetAttr::default()
            };
            match self.lower.setattr(&n, None, &changes) {
                Ok(a) => {
                    let mut st = self.st();
                    if st.children.contains_key(&d) {
                        continue;
                    }
                    st.deferred.remove(&d);
                    st.deferred_nodes.remove(&d);
                    st.touched.remove(&d);
                    let ctime = st.shown.get(&d).map(|s| s.1).unwrap_or(a.ctime);
                    st.masks.insert(
                        d,
                        Mask {
                            nas: (a.mtime, a.ctime),
                            shown: (x.mtime, ctime),
                        },
                    );
                    if let Some(al) = st.alias.values_mut().find(|al| al.prov == d) {
                        al.nas_ctime = a.ctime;
                    }
                }
                // Tried again at the next pass.
                Err(e) if is_unreachable(&e) => {}
                // Gone, or refused: nothing to wait for.
                Err(e) => {
                    log::warn!("setting the mode and times of a directory made on the NAS: {e}");
                    let mut st = self.st();
                    st.deferred.remove(&d);
                    st.deferred_nodes.remove(&d);
                }
            }
        }
    }

    /// The NAS node of a NAS directory (not created here), found by path.
    fn dir_node(&self, ino: u64) -> Option<B::Node> {
        let path = Self::dir_path(&self.st(), ino)?;
        let (root, rattr) = self.lower.root().ok()?;
        self.walk(&root, rattr.ino, &path).ok().map(|(n, _)| n)
    }

    /// Creates local object `p` on the NAS, in its directory there (made
    /// again first if it went away, when `make_dirs`: only with `replay`
    /// write-held).
    fn promote_one(&self, p: u64, make_dirs: bool) -> BResult<()> {
        let op = "create on the NAS";
        let (mut attr, target, name, parent, parent_nas, content, applying, hidden_ino) = {
            let st = self.st();
            let Some(o) = st.objs.get(&p) else {
                return Err(err(op, libc::ENOENT));
            };
            if o.nas.is_some() {
                return Ok(());
            }
            if o.gone {
                return Err(err(op, libc::ENOENT));
            }
            if let Some(f) = o.link_to {
                // A further name: made with its file.
                drop(st);
                return self.promote_one(f, make_dirs);
            }
            let (parent_nas, parent_here) = match st.objs.get(&o.parent) {
                Some(po) => (po.nas.clone(), true),
                None => (o.parent_nas.clone(), false),
            };
            (
                o.attr,
                o.target.clone(),
                o.name.clone(),
                o.parent,
                (parent_nas, parent_here),
                o.content.clone(),
                o.applying,
                o.nas_ino,
            )
        };
        let dir = match parent_nas {
            (Some(n), _) => n,
            (None, _) if !make_dirs => return Err(err(op, libc::ENOENT)),
            // A directory made here, not yet on the NAS: moved into since
            // the chain of directories to make was taken. Made first.
            (None, true) => self.made_first(parent)?,
            (None, false) => {
                let path = Self::dir_path(&self.st(), parent).unwrap_or_default();
                self.recreate_parent(parent, &path)?
            }
        };
        if attr.kind == FileKind::File {
            // Its further names' directories must be on the NAS too.
            self.link_places(p, make_dirs, make_dirs)?;
        }
        // Marked as being made only when the attempt may reach the NAS: a
        // directory marked so takes one found at its name as its own.
        if !applying && self.lower.offline_since().is_some() {
            return Err(unreachable(op));
        }
        if !applying {
            let mut st = self.st();
            if let Some(o) = st.objs.get_mut(&p) {
                // Moved since the snapshot above (a rename does not note
                // what it leaves behind before this is set): taken again
                // from where it is now.
                if o.parent != parent || o.name != name {
                    return Err(err(op, libc::EAGAIN));
                }
                o.applying = true;
            }
            self.persist(&st, p)?;
        }
        // Its owner as of when it is made (taken again under the lock
        // that a setattr of it waits for: a chown may come in between).
        let creds_of = |a: &Attr| Creds {
            uid: a.uid,
            gid: a.gid,
            umask: 0,
        };
        let mut kept = name.clone();
        let c;
        let _content_guard;
        let _w;
        let (node, nas_attr) = match attr.kind {
            FileKind::File => {
                c = content.ok_or_else(|| err(op, libc::EIO))?;
                _content_guard = c.lock.write().unwrap_or_else(|e| e.into_inner());
                // As of now: writes and setattr wait for the content lock.
                let attr = self.attr_now(p, attr);
                // Moved meanwhile (what it left is a leftover now, not to
                // fill), or its hidden file's number forgotten since: as
                // of now, too.
                let hidden_ino = {
                    let st = self.st();
                    match st.objs.get(&p) {
                        Some(o) if o.applying && !o.gone => o.nas_ino,
                        _ => return Err(err(op, libc::EAGAIN)),
                    }
                };

                let creds = creds_of(&attr);
                let upper = File::open(self.journal.upper_path(p)).map_err(io(op))?;
                let tmp = hidden_name(p);
                let rw = OpenMode {
                    read: true,
                    write: true,
                    append: false,
                    truncate: false,
                };
                if applying {
                    // An attempt cut short may have placed it already: the
                    // local content may have changed since, so it is filled
                    // again.
                    let placed = match self.lower.lookup(&dir, &name) {
                        Ok(x) => Some(x),
                        Err(e) if e.raw_errno() == libc::ENOENT => None,
                        // Unknown: trying again later beats a second copy.
                        Err(e) => return Err(e),
                    };
                    if let Some((n, a)) = placed {
                        if a.kind == FileKind::File && hidden_ino == Some(a.ino) {
                            let f = self.lower.open(&n, rw)?;
                            // Ours: with the owner set here since (a
                            // chown between the attempts; not the NAS's
                            // own choice, as a squashed root's).
                            let a = self.owner_since(p, (parent, &name), &n, a, &attr)?;
                            self.owner_sent(p);
                            // Before its mode (which may not let its owner
                            // write).
                            self.put_xattrs(p, &n)?;
                            self.fill(&n, &f, &upper, &attr, a.perm, true)?;
                            drop(f);
                            let _ = self.lower.unlink(&dir, &tmp);
                            let _w = self.window.write().unwrap_or_else(|e| e.into_inner());
                            if !self.still_here(p) {
                                return Err(err(op, libc::EAGAIN));
                            }
                            let places = match self.link_places(p, make_dirs, false) {
                                // Moved meanwhile (see below): tried again.
                                Err(e) if e.raw_errno() == libc::ENOENT && make_dirs => {
                                    return Err(err(op, libc::EAGAIN));
                                }
                                r => r?,
                            };
                            let links = self.place_links(&n, a.ino, places)?;
                            let a = self.lower.getattr(&n)?;
                            self.created_on_nas(p, &c, n, a, &kept, &links)?;
                            return Ok(());
                        }
                    }
                    // Its hidden file may hold an earlier attempt's bytes.
                    self.unmake_hidden(p, &dir, &tmp, None);
                }
                let (node, hattr, f) = self.lower.create(
                    &dir,
                    &tmp,
                    (attr.perm & 0o777) as u32 | 0o600,
                    rw,
                    false,
                    creds,
                )?;
                self.owner_sent(p);
                log::debug!(
                    "{p:x} filled as {tmp:?} (ino {}), was {hidden_ino:?}",
                    hattr.ino
                );
                // (Against the number as recorded now, not as this attempt
                // began: the earlier attempt's file was forgotten above,
                // and the NAS may give this one the same number.)
                let mut st = self.st();
                let changed = st
                    .objs
                    .get_mut(&p)
                    .is_some_and(|o| o.nas_ino.replace(hattr.ino) != Some(hattr.ino));
                if changed {
                    self.persist(&st, p)?;
                }
                drop(st);
                self.put_xattrs(p, &node)?;
                self.fill(&node, &f, &upper, &attr, hattr.perm, hattr.size > 0)?;
                drop(f);
                // Its directories held off, not the whole view; all of it
                // when directories may be made again on the way
                // (`make_dirs`, rare), which changes others.
                let (_w, dirs) = if make_dirs {
                    (self.window_all(), self.dirs_of_file(p))
                } else {
                    self.hold_dirs_of(p)
                };
                let _placing = Placing::new(self, dirs);
                if !self.still_here(p) {
                    self.unmake_hidden(p, &dir, &tmp, Some(hattr.ino));
                    return Err(err(op, libc::EAGAIN));
                }
                // Its further names, before the view says it is there
                // (still under `window`); one moved meanwhile into a
                // directory not on the NAS yet: tried again, not placed
                // (with that directory made first: at once by a chain,
                // later by the parallel pass).
                let places = match self.link_places(p, make_dirs, false) {
                    Err(e) if e.raw_errno() == libc::ENOENT => {
                        self.unmake_hidden(p, &dir, &tmp, Some(hattr.ino));
                        let again = if make_dirs {
                            libc::EAGAIN
                        } else {
                            libc::ENOENT
                        };
                        return Err(err(op, again));
                    }
                    r => r?,
                };
                // What an attempt cut short left at its name goes first
                // (one whose number is known: no other file is taken for it).
                self.clean_leftovers_where(leftover_at(parent, &name, true))?;
                kept = self.place(&dir, &tmp, &name, attr.kind)?;
                let links = self.place_links(&node, hattr.ino, places)?;
                let a = self.lower.getattr(&node)?;
                self.created_on_nas(p, &c, node.clone(), a, &kept, &links)?;
                // The content lock is released as this returns.
                return Ok(());
            }
            FileKind::Dir => {
                _w = self.window.write().unwrap_or_else(|e| e.into_inner());
                if !self.still_here(p) {
                    return Err(err(op, libc::EAGAIN));
                }
                // As of now: setattr of a local object waits for `window`.
                attr = self.attr_now(p, attr);
                let creds = creds_of(&attr);
                let made = self.past_leftovers(parent, &name, || {
                    self.lower
                        .mkdir(&dir, &name, (attr.perm & 0o777) as u32 | 0o700, creds)
                })?;
                let (n, a) = match made {
                    Ok(x) => x,
                    Err(e) if e.raw_errno() == libc::EEXIST => match self.lower.lookup(&dir, &name)
                    {
                        // Made by an attempt cut short (after it, as its
                        // number tells: a chown here since; before, or a
                        // crash: the NAS gone before its chown): this one.
                        // (Not another's, where this one's number is known.)
                        Ok((n, a))
                            if applying
                                && a.kind == FileKind::Dir
                                && hidden_ino.is_none_or(|i| i == a.ino) =>
                        {
                            log::debug!(
                                "{p:x} found at {name:?} as made by an earlier attempt \
                                 (ino {}, recorded {hidden_ino:?}, owner {}:{}, here {}:{})",
                                a.ino,
                                a.uid,
                                a.gid,
                                attr.uid,
                                attr.gid
                            );
                            let a = match hidden_ino == Some(a.ino) {
                                true => self.owner_since(p, (parent, &name), &n, a, &attr)?,
                                false => self.owned_as(p, (&dir, parent, &name), &n, a, &attr)?,
                            };
                            (n, a)
                        }
                        _ => {
                            let (cname, n, a) = self.conflict_create(&dir, &name, |cn| {
                                self.lower.mkdir(
                                    &dir,
                                    cn,
                                    (attr.perm & 0o777) as u32 | 0o700,
                                    creds,
                                )
                            })?;
                            kept = cname;
                            (n, a)
                        }
                    },
                    Err(e) => return Err(e),
                };
                self.owner_sent(p);
                // Before what may cut this attempt short.
                self.made_as(p, a.ino)?;
                self.put_xattrs(p, &n)?;
                self.st().deferred.insert(
                    p,
                    Deferred {
                        perm: Some(attr.perm),
                        atime: attr.atime,
                        mtime: attr.mtime,
                    },
                );
                (n, a)
            }
            FileKind::Symlink => {
                _w = self.window.write().unwrap_or_else(|e| e.into_inner());
                if !self.still_here(p) {
                    return Err(err(op, libc::EAGAIN));
                }
                // As of now: setattr of a local object waits for `window`.
                attr = self.attr_now(p, attr);
                let creds = creds_of(&attr);
                let t = target.clone().unwrap_or_default();
                let made = self
                    .past_leftovers(parent, &name, || self.lower.symlink(&dir, &name, &t, creds))?;
                match made {
                    Ok(x) => x,
                    Err(e) if e.raw_errno() == libc::EEXIST => {
                        let same = applying
                            && self
                                .lower
                                .lookup(&dir, &name)
                                .ok()
                                .filter(|(_, a)| a.kind == FileKind::Symlink)
                                .and_then(|(n, _)| self.lower.readlink(&n).ok())
                                .is_some_and(|x| x == t);
                        if same {
                            let (n, a) = self.lower.lookup(&dir, &name)?;
                            let a = match hidden_ino == Some(a.ino) {
                                true => self.owner_since(p, (parent, &name), &n, a, &attr)?,
                                false => self.owned_as(p, (&dir, parent, &name), &n, a, &attr)?,
                            };
                            (n, a)
                        } else {
                            let (cname, n, a) = self.conflict_create(&dir, &name, |cn| {
                                self.lower.symlink(&dir, cn, &t, creds)
                            })?;
                            kept = cname;
                            (n, a)
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            k => {
                let fmt = match k {
                    FileKind::Fifo => libc::S_IFIFO,
                    FileKind::Socket => libc::S_IFSOCK,
                    FileKind::CharDev => libc::S_IFCHR,
                    _ => libc::S_IFBLK,
                };
                _w = self.window.write().unwrap_or_else(|e| e.into_inner());
                if !self.still_here(p) {
                    return Err(err(op, libc::EAGAIN));
                }
                attr = self.attr_now(p, attr);
                let creds = creds_of(&attr);
                let mode = fmt | attr.perm as u32;
                let made = self.past_leftovers(parent, &name, || {
                    self.lower.mknod(&dir, &name, mode, attr.rdev, creds)
                })?;
                match made {
                    Ok(x) => x,
                    Err(e) if e.raw_errno() == libc::EEXIST => {
                        match self.lower.lookup(&dir, &name) {
                            Ok((n, a)) if applying && a.kind == k => {
                                let a = match hidden_ino == Some(a.ino) {
                                    true => self.owner_since(p, (parent, &name), &n, a, &attr)?,
                                    false => {
                                        self.owned_as(p, (&dir, parent, &name), &n, a, &attr)?
                                    }
                                };
                                (n, a)
                            }
                            _ => {
                                let (cname, n, a) = self.conflict_create(&dir, &name, |cn| {
                                    self.lower.mknod(&dir, cn, mode, attr.rdev, creds)
                                })?;
                                kept = cname;
                                (n, a)
                            }
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        if attr.kind != FileKind::File {
            self.owner_sent(p);
            self.made_as(p, nas_attr.ino)?;
        }
        // Symlinks and special files get their times now (a directory's
        // wait for its children, a file's were set above).
        let nas_attr = if attr.kind == FileKind::Dir {
            nas_attr
        } else {
            let times = SetAttr {
                atime: Some(SetTime::At(attr.atime)),
                mtime: Some(SetTime::At(attr.mtime)),
                ..SetAttr::default()
            };
            match self.lower.setattr(&node, None, &times) {
                Ok(a) => a,
                // Recorded with the NAS's own times, the object would look
                // changed there: an offline removal of it would then be
                // refused as a conflict. Tried again (it is found, as
                // this attempt's, and given its times).
                Err(e) if is_unreachable(&e) => return Err(e),
                // A NAS that cannot set a symlink's times.
                Err(_) => nas_attr,
            }
        };
        self.finish(p, node, nas_attr, &kept, attr.ctime, &[])
    }

    /// NAS object `n` (attributes `a`), found at `name` in `dir` and
    /// taken as made by an earlier attempt at creating local object
    /// `attr`, given its owner if that attempt left it the daemon's: it
    /// may have made it as the daemon and been cut short before the
    /// chown (see `DirBackend::create_as`). Only then: another client's
    /// object found there is not given away. The group is left to a
    /// set-group-ID directory, as a creation leaves it. A chown the NAS
    /// refuses is dropped, a conflict, as for any owner set here.
    fn owned_as(
        &self,
        p: u64,
        (dir, parent, name): (&B::Node, u64, &OsStr),
        n: &B::Node,
        a: Attr,
        attr: &Attr,
    ) -> BResult<Attr> {
        let daemon = nix::unistd::geteuid().as_raw();
        if a.uid != daemon {
            return Ok(a);
        }
        // The daemon's own uid wanted: the group only if changed here since
        // that attempt (`chowned`; not another root's object's group, nor
        // one the NAS chose).
        let chgrp = attr.uid == daemon
            && a.gid != attr.gid
            && self.st().objs.get(&p).is_some_and(|o| o.chowned);
        if attr.uid == daemon && !chgrp {
            return Ok(a);
        }
        let setgid = self.lower.getattr(dir)?.perm & libc::S_ISGID as u16 != 0;
        let chown = SetAttr {
            uid: (attr.uid != daemon).then_some(attr.uid),
            gid: (!setgid && (attr.uid != daemon || chgrp)).then_some(attr.gid),
            ..SetAttr::default()
        };
        if chown.uid.is_none() && chown.gid.is_none() {
            return Ok(a);
        }
        self.chown_on_nas((parent, name), n, a, &chown)
    }

    /// NAS object `n` (`a`), made by an earlier attempt at creating local
    /// object `p` (its NAS inode number recorded then), given the owner
    /// set here since that attempt, if any (`chowned`).
    fn owner_since(
        &self,
        p: u64,
        (parent, name): (u64, &OsStr),
        n: &B::Node,
        a: Attr,
        attr: &Attr,
    ) -> BResult<Attr> {
        if !self.st().objs.get(&p).is_some_and(|o| o.chowned) {
            return Ok(a);
        }
        let chown = SetAttr {
            uid: (a.uid != attr.uid).then_some(attr.uid),
            gid: (a.gid != attr.gid).then_some(attr.gid),
            ..SetAttr::default()
        };
        if chown.uid.is_none() && chown.gid.is_none() {
            return Ok(a);
        }
        self.chown_on_nas((parent, name), n, a, &chown)
    }

    /// Local object `p` has been given its owner on the NAS as shown here
    /// (a chown of it waits for the attempt to end).
    fn owner_sent(&self, p: u64) {
        if let Some(o) = self.st().objs.get_mut(&p) {
            o.chowned = false;
        }
    }

    /// Local object `p` was made on the NAS as NAS inode `ino`: after an
    /// attempt cut short, an object there with that number is this one.
    fn made_as(&self, p: u64, ino: u64) -> BResult<()> {
        let mut st = self.st();
        if let Some(o) = st.objs.get_mut(&p) {
            o.nas_ino = Some(ino);
        }
        self.persist(&st, p)
    }

    /// `chown` of object `n` (`a`), `name` in directory `parent`, made on
    /// the NAS: one the NAS refuses is dropped, a conflict.
    fn chown_on_nas(
        &self,
        (parent, name): (u64, &OsStr),
        n: &B::Node,
        a: Attr,
        chown: &SetAttr,
    ) -> BResult<Attr> {
        match self.lower.setattr(n, None, chown) {
            Ok(a) => Ok(a),
            Err(e) if is_unreachable(&e) => Err(e),
            Err(e) => {
                let path = join_path(
                    &Self::dir_path(&self.st(), parent).unwrap_or_default(),
                    name,
                );
                self.note_conflict(
                    &path,
                    &path,
                    &format!("the NAS refused its owner ({e}); it keeps the NAS's"),
                );
                Ok(a)
            }
        }
    }

    /// Directory `d`, made here, made on the NAS now (with the directories
    /// above it); its NAS node. `replay` write-held.
    fn made_first(&self, d: u64) -> BResult<B::Node> {
        self.promote_one(d, true)?;
        self.st()
            .objs
            .get(&d)
            .and_then(|o| o.nas.clone())
            .ok_or_else(|| err("create on the NAS", libc::ENOENT))
    }

    /// The further names of local file `p`: (link, name, NAS directory).
    /// A directory made here and not on the NAS yet is made first with
    /// `make_new` (not while `window` is held), or ENOENT; a NAS directory
    /// gone is made again with `make_dirs`.
    fn link_places(
        &self,
        p: u64,
        make_dirs: bool,
        make_new: bool,
    ) -> BResult<Vec<(u64, OsString, B::Node)>> {
        type Place<N> = (u64, OsString, u64, Option<N>, bool);
        let ls: Vec<Place<B::Node>> = {
            let st = self.st();
            st.links
                .get(&p)
                .map(|set| {
                    set.iter()
                        .filter_map(|l| {
                            let o = st.objs.get(l)?;
                            let (dir, local_dir) = match st.objs.get(&o.parent) {
                                Some(po) => (po.nas.clone(), true),
                                None => (o.parent_nas.clone(), false),
                            };
                            Some((*l, o.name.clone(), o.parent, dir, local_dir))
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut out = Vec::with_capacity(ls.len());
        for (l, name, parent, dir, local_dir) in ls {
            let dir = match dir {
                Some(d) => d,
                None if make_dirs && !local_dir => {
                    let path = Self::dir_path(&self.st(), parent).unwrap_or_default();
                    self.recreate_parent(parent, &path)?
                }
                // Moved into since the chain was taken (see promote_one).
                None if make_new => self.made_first(parent)?,
                None => return Err(err("create on the NAS", libc::ENOENT)),
            };
            out.push((l, name, dir));
        }
        Ok(out)
    }

    /// Makes the further names `places` of the file just placed on the NAS
    /// as `node` (NAS inode `nas_ino`); a name taken there meanwhile gets
    /// the conflict name, one made by an attempt cut short is taken as is.
    fn place_links(
        &self,
        node: &B::Node,
        nas_ino: u64,
        places: Vec<(u64, OsString, B::Node)>,
    ) -> BResult<Vec<(u64, OsString)>> {
        let mut out = Vec::with_capacity(places.len());
        for (l, name, dir) in places {
            let mut linked = self.lower.link(node, &dir, &name);
            if linked
                .as_ref()
                .is_err_and(|e| e.raw_errno() == libc::EEXIST)
            {
                // What an attempt cut short left there goes first (one
                // whose number is known, as for the file's own name).
                let parent = self.st().objs.get(&l).map(|o| o.parent);
                let cleaned = match parent {
                    Some(d) => self.clean_leftovers_where(leftover_at(d, &name, true))?,
                    None => false,
                };
                if cleaned {
                    linked = self.lower.link(node, &dir, &name);
                }
            }
            let kept = match linked {
                Ok(_) => name,
                Err(e) if e.raw_errno() == libc::EEXIST => match self.lower.lookup(&dir, &name) {
                    Ok((_, a)) if a.ino == nas_ino => name,
                    _ => {
                        self.conflict_create(&dir, &name, |cn| {
                            self.lower.link(node, &dir, cn).map(|a| (node.clone(), a))
                        })?
                        .0
                    }
                },
                Err(e) => return Err(e),
            };
            log::debug!("{l:x} linked on the NAS as {kept:?}");
            out.push((l, kept));
        }
        Ok(out)
    }

    /// Writes the content of `upper` into NAS file `f` of `node`, with the
    /// size, mode and times of `attr`, and syncs it. Holes stay holes,
    /// unless the file held bytes already (`existing`: emptied first).
    fn fill(
        &self,
        node: &B::Node,
        f: &B::File,
        upper: &File,
        attr: &Attr,
        nas_perm: u16,
        existing: bool,
    ) -> BResult<()> {
        let op = "create on the NAS";
        if existing {
            let empty = SetAttr {
                size: Some(0),
                ..SetAttr::default()
            };
            self.lower.setattr(node, Some(f), &empty)?;
        }
        let len = upper.metadata().map_err(io(op))?.len();
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0u64;
        // The NAS file's size: it was empty (or emptied above).
        let mut size = 0u64;
        while pos < len {
            let n = (len - pos).min(buf.len() as u64) as usize;
            let got = upper.read_at(&mut buf[..n], pos).map_err(io(op))?;
            if got == 0 {
                break;
            }
            if buf[..got].iter().any(|b| *b != 0) {
                self.lower.write(f, pos, &buf[..got])?;
                size = pos + got as u64;
            }
            pos += got as u64;
        }
        // Only what is not right yet: each is a NAS round trip of its own
        // over a directory source (chmod, truncate, utimes), per file of
        // an untar.
        let changes = SetAttr {
            mode: (nas_perm != attr.perm).then_some(attr.perm as u32),
            size: (size != len).then_some(len),
            atime: Some(SetTime::At(attr.atime)),
            mtime: Some(SetTime::At(attr.mtime)),
            ..SetAttr::default()
        };
        self.lower.setattr(node, Some(f), &changes)?;
        self.lower.fsync(f, false)
    }

    /// The directories of local file `p`'s names (where it is placed on
    /// the NAS, with its further names).
    fn dirs_of_file(&self, p: u64) -> Vec<u64> {
        let st = self.st();
        let mut dirs: Vec<u64> = st.objs.get(&p).map(|o| o.parent).into_iter().collect();
        if let Some(ls) = st.links.get(&p) {
            dirs.extend(ls.iter().filter_map(|l| st.objs.get(l)).map(|o| o.parent));
        }
        dirs.sort_unstable();
        dirs.dedup();
        dirs
    }

    /// `window_place` for the directories of file `p`. Its further names
    /// cannot change meanwhile (link waits for the content lock, which the
    /// caller holds), but one can move to another directory: taken again
    /// then.
    fn hold_dirs_of(&self, p: u64) -> (Window<'_>, Vec<u64>) {
        loop {
            let dirs = self.dirs_of_file(p);
            let w = self.window_place(&dirs);
            let now = self.dirs_of_file(p);
            let held = stripes_of(&dirs);
            if stripes_of(&now).iter().all(|i| held.contains(i)) {
                return (w, now);
            }
        }
    }

    /// Whether local object `p` is still where its creation on the NAS
    /// started (checked under `window`, which holds off renames and
    /// removals here until the creation is recorded).
    fn still_here(&self, p: u64) -> bool {
        self.st()
            .objs
            .get(&p)
            .is_some_and(|o| o.applying && !o.gone)
    }

    /// Renames the filled hidden file to `name` without replacing
    /// anything; a name taken meanwhile gets the conflict name.
    fn place(&self, dir: &B::Node, tmp: &OsStr, name: &OsStr, _k: FileKind) -> BResult<OsString> {
        self.move_noreplace((dir, tmp), dir, name)
    }

    /// Renames `from` to `name` in `newdir` on the NAS without replacing
    /// anything: to `name`'s conflict name if it is taken. The name used.
    fn move_noreplace(
        &self,
        (dir, from): (&B::Node, &OsStr),
        newdir: &B::Node,
        name: &OsStr,
    ) -> BResult<OsString> {
        let noreplace = RenameFlags {
            noreplace: true,
            ..RenameFlags::default()
        };
        match self.lower.rename(dir, from, newdir, name, noreplace) {
            Ok(()) => return Ok(name.to_os_string()),
            Err(e) if e.raw_errno() != libc::EEXIST => return Err(e),
            Err(_) => {}
        }
        let stamp = conflict_stamp(SystemTime::now());
        for n in 1..100 {
            let cname = conflict_name(name, &stamp, &self.host, n);
            match self.lower.rename(dir, from, newdir, &cname, noreplace) {
                Ok(()) => return Ok(cname),
                Err(e) if e.raw_errno() == libc::EEXIST => continue,
                Err(e) => return Err(e),
            }
        }
        Err(err("create on the NAS", libc::EEXIST))
    }

    fn conflict_create(
        &self,
        _dir: &B::Node,
        name: &OsStr,
        mut make: impl FnMut(&OsStr) -> BResult<(B::Node, Attr)>,
    ) -> BResult<(OsString, B::Node, Attr)> {
        let stamp = conflict_stamp(SystemTime::now());
        for n in 1..100 {
            let cname = conflict_name(name, &stamp, &self.host, n);
            match make(&cname) {
                Ok((node, a)) => return Ok((cname, node, a)),
                Err(e) if e.raw_errno() == libc::EEXIST => continue,
                Err(e) => return Err(e),
            }
        }
        Err(err("create on the NAS", libc::EEXIST))
    }

    /// The parent of `p` is a NAS directory that is gone: created again
    /// (with its path), so that nothing written here is lost.
    fn recreate_parent(&self, parent: u64, path: &OsStr) -> BResult<B::Node> {
        let (node, _) = self.make_path(path)?;
        let mut st = self.st();
        for o in st.objs.values_mut() {
            if o.parent == parent {
                o.parent_nas = Some(node.clone());
            }
        }
        Ok(node)
    }

    /// The NAS directory at `path`, made (with the directories above it)
    /// where missing: a conflict, noted.
    fn make_path(&self, path: &OsStr) -> BResult<(B::Node, Attr)> {
        let (mut node, mut attr) = self.lower.root()?;
        let mut made = false;
        for (_, name) in path_steps(path) {
            (node, attr) = match self.lower.lookup(&node, name) {
                Ok(x) => x,
                Err(e) if e.raw_errno() == libc::ENOENT => {
                    let creds = Creds {
                        uid: 0,
                        gid: 0,
                        umask: 0o022,
                    };
                    made = true;
                    self.lower.mkdir(&node, name, 0o755, creds)?
                }
                Err(e) => return Err(e),
            };
        }
        if made {
            self.note_conflict(
                path,
                path,
                "the directory was removed on the NAS while new files in it were waiting; created again",
            );
        }
        Ok((node, attr))
    }

    fn note_conflict(&self, path: &OsStr, kept: &OsStr, reason: &str) {
        self.conflicts.fetch_add(1, Ordering::Relaxed);
        log::warn!("conflict: {path:?}: {reason}; kept as {kept:?}");
        let rec = ConflictRecord {
            at: SystemTime::now(),
            path: path.to_os_string(),
            kept_as: kept.to_os_string(),
            reason: reason.to_string(),
        };
        if let Err(e) = self.journal.add_conflict(&rec) {
            log::warn!("journal: {e}");
        }
    }

    fn created_on_nas(
        &self,
        p: u64,
        c: &Arc<Content<B>>,
        node: B::Node,
        a: Attr,
        kept: &OsStr,
        links: &[(u64, OsString)],
    ) -> BResult<()> {
        let ctime = self
            .st()
            .objs
            .get(&p)
            .map(|o| o.attr.ctime)
            .unwrap_or(a.ctime);
        // The caller holds the content lock: no I/O between these.
        self.finish(p, node.clone(), a, kept, ctime, links)?;
        *c.nas.lock().unwrap_or_else(|e| e.into_inner()) = Some((node, None));
        c.promoted.store(true, Ordering::Release);
        let _ = std::fs::remove_file(self.journal.upper_path(p));
        Ok(())
    }

    /// Whether `ino` is local directory `top`, or a local directory under
    /// it made here (not on the NAS yet).
    fn in_new_tree(st: &State<B>, mut ino: u64, top: u64) -> bool {
        for _ in 0..4096 {
            if ino == top {
                return true;
            }
            match st.objs.get(&ino) {
                Some(o) if o.nas.is_none() && !o.gone => ino = o.parent,
                _ => return false,
            }
        }
        false
    }

    /// Local object `p` is on the NAS as `node` under `kept`, and its
    /// further names `links` (link, name it got there).
    fn finish(
        &self,
        p: u64,
        node: B::Node,
        a: Attr,
        kept: &OsStr,
        local_ctime: SystemTime,
        links: &[(u64, OsString)],
    ) -> BResult<()> {
        let alias = AliasRecord {
            nas_ino: a.ino,
            prov: p,
            nas_ctime: a.ctime,
            local_ctime,
        };
        let mut st = self.st();
        log::debug!("{p:x} created on the NAS as {kept:?} (ino {})", a.ino);
        // Moved or removed here meanwhile (`left_behind` took note of what
        // was just made on the NAS, to remove it): created again later,
        // where it is now.
        if !st.objs.get(&p).is_some_and(|o| o.applying && !o.gone) {
            return Err(err("create on the NAS", libc::EAGAIN));
        }
        // New objects in it are now in a directory on the NAS: their rows
        // say where by path.
        let (parent_path, name, kind) = st
            .objs
            .get(&p)
            .map(|o| {
                let pp = Self::dir_path(&st, o.parent).unwrap_or_default();
                (pp, o.name.clone(), o.attr.kind)
            })
            .unwrap_or((OsString::new(), OsString::new(), FileKind::File));
        let here = join_path(&parent_path, kept);
        // A directory under the conflict name: what the renames and links
        // still to make put into it or into a new directory in it (they
        // wait for it, see `pass`) is there, and the rows under each such
        // path follow. Not the rest under its old path: at open, what a
        // rename into it found there went into the NAS's directory of that
        // name, and its rows name where it is.
        let mut moved: Vec<(OsString, OsString)> = Vec::new();
        if kind == FileKind::Dir && name != kept {
            let old = join_path(&parent_path, &name);
            let into: BTreeSet<&OsStr> = st
                .removals
                .iter()
                .filter_map(|r| r.to.as_ref())
                .filter(|t| Self::in_new_tree(&st, t.dir_ino, p))
                .map(|t| t.path.as_os_str())
                .collect();
            moved = into
                .into_iter()
                .filter_map(|t| Some((t.to_os_string(), moved_path(t, &old, &here)?)))
                .collect();
        }
        let kids: Vec<ObjectRecord> = st
            .children
            .get(&p)
            .map(|m| m.values().copied().collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|c| Self::record(&st, c))
            .map(|mut r| {
                r.parent = ObjParent::Nas(here.clone());
                r
            })
            .collect();
        let link_rows: Vec<u64> = links.iter().map(|(l, _)| *l).collect();
        self.journal
            .object_created(&alias, &kids, &link_rows, &moved)
            .map_err(journal_err("journal"))?;
        for (old, new) in &moved {
            log::debug!("rows under {old:?} follow to {new:?}");
            for r in st.removals.iter_mut() {
                r.follow(old, new, false);
            }
        }
        // On the NAS with it now (their rows went with the object's).
        st.xattrs.remove(&p);
        self.created.fetch_add(1, Ordering::Relaxed);
        st.alias.insert(a.ino, alias);
        let Some(o) = st.objs.get_mut(&p) else {
            return Ok(());
        };
        o.nas = Some(node.clone());
        o.applying = false;
        o.error = None;
        let (parent, name) = (o.parent, o.name.clone());
        let kind = o.attr.kind;
        if kind == FileKind::Dir {
            let (perm, gid) = (o.attr.perm, o.attr.gid);
            st.own.insert(p);
            // Made without a default ACL (a directory with one is made by
            // the NAS); setxattr keeps this up to date.
            st.acl_default.insert(p, false);
            st.dirs.insert(
                p,
                NasDir {
                    parent,
                    name: kept.to_os_string(),
                    perm,
                    gid,
                },
            );
        }
        let mut placed = vec![(p, parent, name, kept.to_os_string())];
        for (l, kept_l) in links {
            if let Some(lo) = st.objs.get_mut(l) {
                lo.nas = Some(node.clone());
                lo.applying = false;
                lo.error = None;
                placed.push((*l, lo.parent, lo.name.clone(), kept_l.clone()));
            }
        }
        st.links.remove(&p);
        let mut quiet = Vec::new();
        let mut conflicts = Vec::new();
        for (x, parent, name, kept) in placed {
            if let Some(m) = st.children.get_mut(&parent) {
                if m.get(&name) == Some(&x) {
                    m.remove(&name);
                }
                if m.is_empty() {
                    st.children.remove(&parent);
                }
            }
            if kept == name {
                quiet.push(parent);
                continue;
            }
            let path = Self::dir_path(&st, parent).unwrap_or_default();
            if let Some(o) = st.objs.get_mut(&x) {
                o.name = kept.clone();
            }
            conflicts.push((join_path(&path, &name), join_path(&path, &kept)));
        }
        drop(st);
        if let Some(f) = self.moved.get() {
            for (old, new) in &moved {
                f(old, new);
            }
        }
        quiet.sort_unstable();
        quiet.dedup();
        for d in quiet {
            self.quiet(d);
        }
        for (full, kept_full) in conflicts {
            self.note_conflict(
                &full,
                &kept_full,
                "the name was taken on the NAS meanwhile; the new one got the conflict name",
            );
        }
        Ok(())
    }

    /// nassync created an object in `dir` on the NAS that was shown there
    /// already: the directory's new NAS times are not a change to show.
    fn quiet(&self, dir: u64) {
        let node = ONode {
            ino: dir,
            nas: None,
        };
        let Some(n) = self.nas_of(&node).or_else(|| {
            let st = self.st();
            st.objs
                .values()
                .find(|o| o.parent == dir)
                .and_then(|o| o.parent_nas.clone())
        }) else {
            return;
        };
        if let Ok(a) = self.lower.getattr(&n) {
            let mut st = self.st();
            if let Some(shown) = st.shown.get(&dir).copied() {
                st.masks.insert(
                    dir,
                    Mask {
                        nas: (a.mtime, a.ctime),
                        shown,
                    },
                );
            }
        }
    }

    // ---- flush, status, shutdown ----

    /// Creates every local object on the NAS now; returns how many are
    /// left (the NAS did not answer, or refused) once `deadline` passes or
    /// nothing more can be done.
    pub fn flush_all(&self, deadline: Option<Instant>) -> usize {
        let mut last_left = usize::MAX;
        loop {
            let left = self.pending_count();
            if left == 0 {
                self.settle_dirs();
                return 0;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return left;
            }
            if !self.lower.online() {
                return left;
            }
            // Errors are recorded per object; one more pass after one that
            // made no progress would fail the same way.
            let _ = self.pass(true);
            let after = self.pending_count();
            if after >= last_left && after == left {
                return after;
            }
            last_left = after;
        }
    }

    pub fn pending_count(&self) -> usize {
        self.pending_under(None) as usize
    }

    pub fn pending_objects(&self) -> Vec<PendingObject> {
        let st = self.st();
        let mut v: Vec<(u64, PendingObject)> = st
            .objs
            .iter()
            .filter(|(_, o)| o.nas.is_none() && !o.gone)
            .map(|(p, o)| {
                (
                    *p,
                    PendingObject {
                        path: Self::obj_path(&st, o),
                        kind: o.attr.kind,
                        removed: false,
                        moved_to: None,
                        link: false,
                        set: false,
                        age: o.created.elapsed(),
                        attempts: o.attempts,
                        error: o.error.clone(),
                    },
                )
            })
            .collect();
        v.sort_by_key(|(p, _)| *p);
        let removals = st.removals.iter().map(|r| PendingObject {
            path: r.path.clone(),
            kind: r.kind,
            removed: r.to.is_none() && r.set.is_none(),
            set: r.set.is_some(),
            moved_to: r.to.as_ref().map(|t| t.path.clone()),
            link: r.to.as_ref().is_some_and(|t| t.link),
            age: r.since.elapsed(),
            attempts: 0,
            error: r.error.clone(),
        });
        removals.chain(v.into_iter().map(|(_, o)| o)).collect()
    }

    /// The path shown for a pending object.
    fn obj_path(st: &State<B>, o: &Obj<B>) -> OsString {
        let mut path = Self::dir_path(st, o.parent).unwrap_or_default();
        if !path.is_empty() {
            path.push("/");
        }
        path.push(&o.name);
        path
    }

    /// How many of [`Self::pending_objects`] are under `prefix`; paths
    /// are only made when there is a prefix.
    pub fn pending_under(&self, prefix: Option<&OsStr>) -> u64 {
        let st = self.st();
        let objs = st.objs.values().filter(|o| o.nas.is_none() && !o.gone);
        let n = match prefix {
            None => objs.count() + st.removals.len(),
            Some(_) => {
                objs.filter(|o| under(&Self::obj_path(&st, o), prefix))
                    .count()
                    + st.removals
                        .iter()
                        .filter(|r| {
                            // A rename or link counts under both places.
                            under(&r.path, prefix)
                                || r.to.as_ref().is_some_and(|t| under(&t.path, prefix))
                        })
                        .count()
            }
        };
        n as u64
    }

    /// (created on the NAS, conflicts) since the mount.
    pub fn counters(&self) -> (u64, u64) {
        (
            self.created.load(Ordering::Relaxed),
            self.conflicts.load(Ordering::Relaxed),
        )
    }

    /// Stops the replay thread (after `flush` at unmount).
    pub fn stop_replay(&self) {
        self.sched().stop = true;
        self.wake.notify_all();
    }

    fn node_up(&self, n: B::Node, a: Attr) -> (ONode<B::Node>, Attr) {
        let a = self.up(a);
        (
            ONode {
                ino: a.ino,
                nas: Some(n),
            },
            a,
        )
    }

    fn local_node(&self, prov: u64) -> Option<(ONode<B::Node>, Attr)> {
        let st = self.st();
        let mut o = st.objs.get(&prov)?;
        // A further name of a file: that file.
        let prov = match o.link_to {
            Some(f) => {
                o = st.objs.get(&f)?;
                f
            }
            None => prov,
        };
        let mut a = o.attr;
        if let Some(n) = &o.nas {
            // Created on the NAS meanwhile.
            let n = n.clone();
            drop(st);
            return Some((
                ONode {
                    ino: prov,
                    nas: Some(n),
                },
                a,
            ));
        }
        if o.gone {
            a.nlink = 0;
        }
        Some((
            ONode {
                ino: prov,
                nas: None,
            },
            a,
        ))
    }

    /// An open file of local file `node` through its upper file.
    fn open_local(
        &self,
        node: &ONode<B::Node>,
        c: Arc<Content<B>>,
        upper: File,
        mode: OpenMode,
    ) -> BResult<OFile<B>> {
        if mode.truncate {
            let _g = c.lock.read().unwrap_or_else(|e| e.into_inner());
            if !c.promoted.load(Ordering::Acquire) {
                upper.set_len(0).map_err(io("open"))?;
                drop(_g);
                self.touch_file(node.ino, None);
                let mut st = self.st();
                if let Some(o) = st.objs.get_mut(&node.ino) {
                    o.attr.size = 0;
                }
            }
        }
        Ok(OFile::Local(c, upper, mode.append))
    }

    fn content_of(&self, prov: u64) -> Option<Arc<Content<B>>> {
        self.st().objs.get(&prov).and_then(|o| o.content.clone())
    }

    /// The NAS file of a local file created on the NAS since it was opened.
    fn nas_file(&self, c: &Content<B>, write: bool) -> BResult<Arc<B::File>> {
        let mut g = c.nas.lock().unwrap_or_else(|e| e.into_inner());
        let Some((node, file)) = g.as_mut() else {
            return Err(err("open", libc::EIO));
        };
        if let Some(f) = file {
            return Ok(f.clone());
        }
        let mode = OpenMode {
            read: true,
            write: true,
            append: false,
            truncate: false,
        };
        let f = match self.lower.open(node, mode) {
            Ok(f) => f,
            Err(e) if !write => self
                .lower
                .open(
                    node,
                    OpenMode {
                        write: false,
                        ..mode
                    },
                )
                .map_err(|_| e)?,
            Err(e) => return Err(e),
        };
        let f = Arc::new(f);
        *file = Some(f.clone());
        Ok(f)
    }

    /// A local file grows beyond what the cache directory's filesystem
    /// holds (the NAS may hold more): it goes to the NAS now.
    fn escalate(&self, c: &Content<B>) -> BResult<Arc<B::File>> {
        self.promote_chain(c.prov)?;
        self.nas_file(c, true)
    }

    fn touch_file(&self, prov: u64, end: Option<u64>) {
        let t = now();
        let mut st = self.st();
        if let Some(o) = st.objs.get_mut(&prov) {
            if let Some(end) = end {
                o.attr.size = o.attr.size.max(end);
            }
            o.attr.blocks = o.attr.size.div_ceil(512);
            o.attr.mtime = t;
            o.attr.ctime = t;
        }
    }
}

impl<B: Backend> Backend for Overlay<B> {
    type Node = ONode<B::Node>;
    type File = OFile<B>;

    fn root(&self) -> BResult<(Self::Node, Attr)> {
        let (n, a) = self.lower.root()?;
        Ok(self.node_up(n, a))
    }

    fn lookup(&self, dir: &Self::Node, name: &OsStr) -> BResult<(Self::Node, Attr)> {
        if let Some(p) = self.local_child(dir.ino, name) {
            if let Some(x) = self.local_node(p) {
                return Ok(x);
            }
        }
        let Some(n) = self.nas_of(dir) else {
            // A directory made here: a NAS object renamed into it.
            let at = Self::pending_at(&self.st(), dir.ino, name);
            return match at {
                AtName::MovedIn(id) => self.moved_in(dir, name, id),
                _ => Err(err("lookup", libc::ENOENT)),
            };
        };
        if is_hidden(name) {
            return Err(err("lookup", libc::ENOENT));
        }
        let at = Self::pending_at(&self.st(), dir.ino, name);
        match at {
            AtName::Nas => {}
            AtName::Gone => return Err(err("lookup", libc::ENOENT)),
            AtName::MovedIn(id) => return self.moved_in(dir, name, id),
        }
        let _w = self.window_read(&[dir.ino]);
        let (node, a) = self.lower.lookup(&n, name)?;
        if Self::is_leftover(&self.st(), dir.ino, name, a.ino) {
            return Err(err("lookup", libc::ENOENT));
        }
        let (node, a) = self.node_up(node, a);
        self.saw_dir(dir.ino, name, &a);
        Ok((node, a))
    }

    fn lookup_many(
        &self,
        dir: &Self::Node,
        names: &[OsString],
    ) -> Vec<BResult<(Self::Node, Attr)>> {
        type Answer<N> = Option<BResult<(ONode<N>, Attr)>>;
        let mut out: Vec<Answer<B::Node>> = Vec::with_capacity(names.len());
        let mut ask = Vec::new();
        for name in names {
            match self
                .local_child(dir.ino, name)
                .and_then(|p| self.local_node(p))
            {
                Some(x) => out.push(Some(Ok(x))),
                None => {
                    let at = Self::pending_at(&self.st(), dir.ino, name);
                    match at {
                        AtName::Gone => out.push(Some(Err(err("lookup", libc::ENOENT)))),
                        AtName::MovedIn(id) => out.push(Some(self.moved_in(dir, name, id))),
                        AtName::Nas => {
                            out.push(None);
                            ask.push(name.clone());
                        }
                    }
                }
            }
        }
        let _w = self.window_read(&[dir.ino]);
        if !ask.is_empty() {
            let answers = match self.nas_of(dir) {
                Some(n) => self.lower.lookup_many(&n, &ask),
                None => ask
                    .iter()
                    .map(|_| Err(err("lookup", libc::ENOENT)))
                    .collect(),
            };
            let mut answers = answers.into_iter().zip(ask.iter());
            for slot in out.iter_mut().filter(|s| s.is_none()) {
                let Some((r, name)) = answers.next() else {
                    *slot = Some(Err(err("lookup", libc::EIO)));
                    continue;
                };
                *slot = Some(r.and_then(|(node, a)| {
                    if Self::is_leftover(&self.st(), dir.ino, name, a.ino) {
                        return Err(err("lookup", libc::ENOENT));
                    }
                    let (node, a) = self.node_up(node, a);
                    self.saw_dir(dir.ino, name, &a);
                    Ok((node, a))
                }));
            }
        }
        out.into_iter()
            .map(|s| s.unwrap_or_else(|| Err(err("lookup", libc::EIO))))
            .collect()
    }

    fn getattr(&self, node: &Self::Node) -> BResult<Attr> {
        if let Some(a) = self.local_attr(node.ino) {
            return Ok(a);
        }
        let n = self
            .nas_of(node)
            .ok_or_else(|| err("getattr", libc::ENOENT))?;
        let _w = self.window_read(&[node.ino]);
        let a = self.lower.getattr(&n)?;
        let a = self.up(a);
        if a.kind == FileKind::Dir {
            if let Some(d) = self.st().dirs.get_mut(&a.ino) {
                d.perm = a.perm;
                d.gid = a.gid;
            }
        }
        Ok(a)
    }

    fn setattr(
        &self,
        node: &Self::Node,
        file: Option<&Self::File>,
        changes: &SetAttr,
    ) -> BResult<Attr> {
        if self.local(node.ino) {
            let c = self.content_of(node.ino);
            let _g = c
                .as_ref()
                .map(|c| c.lock.read().unwrap_or_else(|e| e.into_inner()));
            // A directory or symlink being placed on the NAS takes its
            // attributes under `window` (a file's, under its content lock).
            let _w = c.is_none().then(|| self.window_read(&[node.ino]));
            if c.is_none() && !self.local(node.ino) {
                drop(_w);
                return self.setattr(node, file, changes);
            }
            if let Some(c) = &c {
                if c.promoted.load(Ordering::Acquire) {
                    drop(_g);
                    return self.setattr(node, file, changes);
                }
                if let Some(size) = changes.size {
                    let set = match file {
                        Some(OFile::Local(_, f, _)) => f.set_len(size),
                        _ => OpenOptions::new()
                            .write(true)
                            .open(self.journal.upper_path(c.prov))
                            .and_then(|f| f.set_len(size)),
                    };
                    match set {
                        Ok(()) => {}
                        Err(e) if too_big(&e) => {
                            drop(_g);
                            self.escalate(c)?;
                            return self.setattr(node, file, changes);
                        }
                        Err(e) => return Err(BackendError::new("truncate", e)),
                    }
                }
            }
            let t = now();
            let mut st = self.st();
            let o = st
                .objs
                .get_mut(&node.ino)
                .ok_or_else(|| err("setattr", libc::ENOENT))?;
            if let Some(m) = changes.mode {
                o.attr.perm = (m & 0o7777) as u16;
            }
            if let Some(u) = changes.uid {
                o.attr.uid = u;
            }
            if let Some(g) = changes.gid {
                o.attr.gid = g;
            }
            o.chowned |= changes.uid.is_some() || changes.gid.is_some();
            if let Some(s) = changes.size {
                o.attr.size = s;
                o.attr.blocks = s.div_ceil(512);
                o.attr.mtime = t;
            }
            let at = |x: SetTime| match x {
                SetTime::Now => t,
                SetTime::At(v) => v,
            };
            if let Some(x) = changes.atime {
                o.attr.atime = at(x);
            }
            if let Some(x) = changes.mtime {
                o.attr.mtime = at(x);
            }
            o.attr.ctime = t;
            let mut a = o.attr;
            if o.gone {
                a.nlink = 0;
            }
            if !o.gone {
                self.persist(&st, node.ino)?;
            }
            return Ok(a);
        }
        let n = self.materialize(node)?;
        // After the changes made here while the NAS did not answer.
        self.apply_removals()?;
        let nas_file;
        let lf = match file {
            Some(OFile::Nas(f, _)) => Some(f),
            Some(OFile::Local(c, _, _)) => match self.nas_file(c, true) {
                Ok(f) => {
                    nas_file = f;
                    Some(&*nas_file)
                }
                Err(_) => None,
            },
            None => None,
        };
        self.setattr_nas(&n, node.ino, lf, changes)
    }

    fn readlink(&self, node: &Self::Node) -> BResult<OsString> {
        {
            let st = self.st();
            if let Some(o) = st.objs.get(&node.ino) {
                if let Some(t) = &o.target {
                    return Ok(t.clone());
                }
            }
        }
        let n = self
            .nas_of(node)
            .ok_or_else(|| err("readlink", libc::ENOENT))?;
        self.lower.readlink(&n)
    }

    fn readdir(&self, dir: &Self::Node) -> BResult<Vec<DirEntry>> {
        let _w = self.window_read(&[dir.ino]);
        let mut out = match self.nas_of(dir) {
            Some(n) => {
                let mut v = self.lower.readdir(&n)?;
                let st = self.st();
                v.retain(|e| {
                    !is_hidden(&e.name)
                        && !Self::is_leftover(&st, dir.ino, &e.name, e.ino)
                        && Self::pending_at(&st, dir.ino, &e.name) == AtName::Nas
                });
                for e in &mut v {
                    if let Some(al) = st.alias.get(&e.ino) {
                        e.ino = al.prov;
                    }
                }
                v.extend(Self::moved_into(&st, dir.ino));
                v
            }
            None => {
                let st = self.st();
                match st.objs.get(&dir.ino) {
                    Some(o) if !o.gone => {}
                    _ => return Err(err("readdir", libc::ENOENT)),
                }
                Self::moved_into(&st, dir.ino)
            }
        };
        let st = self.st();
        if let Some(m) = st.children.get(&dir.ino) {
            out.retain(|e| !m.contains_key(&e.name));
            for (name, p) in m {
                if let Some(o) = st.objs.get(p) {
                    out.push(DirEntry {
                        name: name.clone(),
                        ino: o.link_to.unwrap_or(*p),
                        kind: o.attr.kind,
                    });
                }
            }
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
        let kind = FileKind::from_mode(mode).ok_or_else(|| err("mknod", libc::EINVAL))?;
        if kind == FileKind::File {
            let (n, a, _f) = self.create(
                dir,
                name,
                mode & 0o7777,
                OpenMode {
                    read: true,
                    write: false,
                    append: false,
                    truncate: false,
                },
                true,
                creds,
            )?;
            return Ok((n, a));
        }
        match self.make(dir, name, kind, mode, rdev, None, creds, None)? {
            Some((p, a, _)) => Ok((ONode { ino: p, nas: None }, a)),
            None => {
                self.apply_removals()?;
                let d = self.materialize(dir)?;
                self.clear_leftovers_for(dir.ino, name, false)?;
                let (n, a) = self.lower.mknod(&d, name, mode, rdev, creds)?;
                Ok(self.node_up(n, a))
            }
        }
    }

    fn mkdir(
        &self,
        dir: &Self::Node,
        name: &OsStr,
        mode: u32,
        creds: Creds,
    ) -> BResult<(Self::Node, Attr)> {
        match self.make(dir, name, FileKind::Dir, mode, 0, None, creds, None)? {
            Some((p, a, _)) => Ok((ONode { ino: p, nas: None }, a)),
            None => {
                self.apply_removals()?;
                let d = self.materialize(dir)?;
                self.clear_leftovers_for(dir.ino, name, false)?;
                let (n, a) = self.lower.mkdir(&d, name, mode, creds)?;
                let r = self.node_up(n, a);
                self.saw_dir(dir.ino, name, &r.1);
                Ok(r)
            }
        }
    }

    fn symlink(
        &self,
        dir: &Self::Node,
        name: &OsStr,
        target: &OsStr,
        creds: Creds,
    ) -> BResult<(Self::Node, Attr)> {
        match self.make(
            dir,
            name,
            FileKind::Symlink,
            0o777,
            0,
            Some(target),
            creds,
            None,
        )? {
            Some((p, a, _)) => Ok((ONode { ino: p, nas: None }, a)),
            None => {
                self.apply_removals()?;
                let d = self.materialize(dir)?;
                self.clear_leftovers_for(dir.ino, name, false)?;
                let (n, a) = self.lower.symlink(&d, name, target, creds)?;
                Ok(self.node_up(n, a))
            }
        }
    }

    fn link(&self, node: &Self::Node, dir: &Self::Node, name: &OsStr) -> BResult<Attr> {
        if self.local_child(dir.ino, name).is_some() {
            return Err(err("link", libc::EEXIST));
        }
        // A new file gets a further name here, at local speed and whether
        // the NAS answers or not; it is made on the NAS with the file.
        let c = {
            let st = self.st();
            st.objs
                .get(&node.ino)
                .filter(|o| o.nas.is_none() && o.link_to.is_none())
                .and_then(|o| o.content.clone())
        };
        if let Some(c) = c {
            // Not while the file is being placed on the NAS.
            let _g = c.lock.read().unwrap_or_else(|e| e.into_inner());
            if !c.promoted.load(Ordering::Acquire) && self.local(node.ino) {
                let a = self
                    .local_attr(node.ino)
                    .ok_or_else(|| err("link", libc::ENOENT))?;
                let creds = Creds {
                    uid: a.uid,
                    gid: a.gid,
                    umask: 0,
                };
                let made =
                    self.make(dir, name, FileKind::File, 0, 0, None, creds, Some(node.ino))?;
                if let Some((_, a, _)) = made {
                    return Ok(a);
                }
            }
        }
        self.apply_removals()?;
        let n = self.materialize(node)?;
        let d = self.materialize(dir)?;
        self.clear_leftovers_for(dir.ino, name, false)?;
        let a = self.lower.link(&n, &d, name)?;
        Ok(self.up(a))
    }

    fn unlink(&self, dir: &Self::Node, name: &OsStr) -> BResult<()> {
        // Not while a new object is being placed on the NAS (see `window`).
        let _w = self.window_read(&[dir.ino]);
        if let Some(p) = self.local_child(dir.ino, name) {
            let mut st = self.st();
            match st.objs.get(&p) {
                Some(o) if o.attr.kind == FileKind::Dir => return Err(err("unlink", libc::EISDIR)),
                Some(o) if o.nas.is_none() => return self.remove_local(&mut st, dir.ino, name, p),
                _ => {}
            }
        }
        let at = Self::pending_at(&self.st(), dir.ino, name);
        if at == AtName::Gone || self.nas_of(dir).is_none() && at == AtName::Nas {
            return Err(err("unlink", libc::ENOENT));
        }
        drop(_w);
        // (A rename into a directory made here makes that directory.)
        self.apply_removals_at(&[(dir, name)], "unlink")?;
        let d = self
            .nas_of(dir)
            .ok_or_else(|| err("unlink", libc::ENOENT))?;
        self.lower.unlink(&d, name)
    }

    fn rmdir(&self, dir: &Self::Node, name: &OsStr) -> BResult<()> {
        let _w = self.window_read(&[dir.ino]);
        if let Some(p) = self.local_child(dir.ino, name) {
            let mut st = self.st();
            match st.objs.get(&p) {
                Some(o) if o.attr.kind != FileKind::Dir => return Err(err("rmdir", libc::ENOTDIR)),
                Some(o) if o.nas.is_none() => {
                    if Self::has_entries(&st, p) {
                        return Err(err("rmdir", libc::ENOTEMPTY));
                    }
                    return self.remove_local(&mut st, dir.ino, name, p);
                }
                _ => {}
            }
        }
        let Some(d) = self.nas_of(dir) else {
            let moved_in = {
                let st = self.st();
                match Self::pending_at(&st, dir.ino, name) {
                    AtName::MovedIn(id) => st.removals.iter().find(|r| r.id == id).map(|r| r.kind),
                    _ => None,
                }
            };
            return match moved_in {
                // A NAS directory renamed into this new one: the NAS way,
                // once that rename is made there (with this directory).
                Some(FileKind::Dir) => {
                    drop(_w);
                    self.apply_removals_at(&[(dir, name)], "rmdir")?;
                    if self.nas_of(dir).is_none() {
                        return Err(err("rmdir", libc::EIO));
                    }
                    self.rmdir(dir, name)
                }
                Some(_) => Err(err("rmdir", libc::ENOTDIR)),
                None => Err(err("rmdir", libc::ENOENT)),
            };
        };
        if Self::is_removed(&self.st(), dir.ino, name) {
            return Err(err("rmdir", libc::ENOENT));
        }
        // Its entries removed here go from the NAS first.
        drop(_w);
        self.apply_removals_at(&[(dir, name)], "rmdir")?;
        // Local children still to create keep it from being empty.
        let has_local = !self.st().children.is_empty();
        if has_local {
            // Not knowing is not "empty": the NAS may answer the rmdir.
            let a = self.up(self.lower.lookup(&d, name)?.1);
            let st = self.st();
            if st.children.get(&a.ino).is_some_and(|m| !m.is_empty()) {
                return Err(err("rmdir", libc::ENOTEMPTY));
            }
        }
        self.lower.rmdir(&d, name)?;
        let mut st = self.st();
        st.dirs
            .retain(|_, v| !(v.parent == dir.ino && v.name == name));
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
        let op = "rename";
        // Not while a new object is being placed on the NAS (see `window`).
        let w = self.window_read(&[dir.ino, newdir.ino]);
        let src = self.local_child(dir.ino, name).filter(|p| self.local(*p));
        let dst = self
            .local_child(newdir.ino, newname)
            .filter(|p| self.local(*p));
        if let (Some(p), false) = (src, flags.exchange) {
            // A local object: moved here, unless it replaces something on
            // the NAS (then it is created there first).
            let newdir_nas = self.nas_of(newdir);
            let taken_on_nas = match (&newdir_nas, dst) {
                (_, Some(_)) => false,
                // A NAS object renamed here into a directory made here:
                // replaced on the NAS, once the rename is made there.
                (None, None) => Self::pending_at(&self.st(), newdir.ino, newname) != AtName::Nas,
                (Some(_), None) if Self::is_removed(&self.st(), newdir.ino, newname) => false,
                // A NAS object renamed here to that name.
                (Some(_), None)
                    if Self::pending_at(&self.st(), newdir.ino, newname) != AtName::Nas =>
                {
                    true
                }
                (Some(n), None) => match self.lower.lookup(n, newname) {
                    Ok(_) => true,
                    Err(e) if e.raw_errno() == libc::ENOENT => false,
                    // Offline: free as far as the core's cache knows (it
                    // removed what it knew there first, see `remove_later`);
                    // a name taken on the NAS meanwhile gets the conflict
                    // name, as for a creation.
                    Err(e) if is_unreachable(&e) && flags.vouched_free => false,
                    Err(e) => return Err(e),
                },
            };
            if is_hidden(newname) && newdir_nas.is_some() {
                return Err(err(op, libc::EINVAL));
            }
            // A directory that renames still to make go into: made on the
            // NAS (and they there) first, so that their rows keep naming
            // it by its path.
            let holds_moves = Self::moves_into_tree(&self.st(), p);
            if !taken_on_nas && !holds_moves {
                let mut st = self.st();
                let kind = st
                    .objs
                    .get(&p)
                    .map(|o| o.attr.kind)
                    .ok_or_else(|| err(op, libc::ENOENT))?;
                if newdir_nas.is_none() && st.objs.get(&newdir.ino).is_none_or(|o| o.gone) {
                    return Err(err(op, libc::ENOENT));
                }
                if let Some(q) = dst {
                    // Two names of one file: nothing to do (POSIX).
                    if Self::file_of(&st, q) == Self::file_of(&st, p) {
                        return Ok(());
                    }
                    if flags.noreplace {
                        return Err(err(op, libc::EEXIST));
                    }
                    let qkind = st.objs.get(&q).map(|o| o.attr.kind);
                    match (kind == FileKind::Dir, qkind == Some(FileKind::Dir)) {
                        (true, false) => return Err(err(op, libc::ENOTDIR)),
                        (false, true) => return Err(err(op, libc::EISDIR)),
                        (true, true) if Self::has_entries(&st, q) => {
                            return Err(err(op, libc::ENOTEMPTY));
                        }
                        _ => {}
                    }
                    self.remove_local(&mut st, newdir.ino, newname, q)?;
                }
                self.left_behind(&mut st, p);
                Self::drop_name(&mut st, dir.ino, name);
                st.children
                    .entry(newdir.ino)
                    .or_default()
                    .insert(newname.to_os_string(), p);
                let t = now();
                let sub = if kind == FileKind::Dir { 1 } else { 0 };
                if let Some(o) = st.objs.get_mut(&p) {
                    o.parent = newdir.ino;
                    o.name = newname.to_os_string();
                    o.parent_nas = newdir_nas;
                    o.attr.ctime = t;
                }
                Self::dir_changed(&mut st, dir.ino, t, -sub);
                Self::dir_changed(&mut st, newdir.ino, t, sub);
                // Its children's rows hold its place through it; its own
                // row and theirs (paths of NAS parents) are rewritten.
                self.persist(&st, p)?;
                return Ok(());
            }
        }
        // Everything else happens on the NAS, with what it involves there
        // (which may mean placing new objects there: not under `window`),
        // after the removals made while it did not answer.
        drop(w);
        log::debug!(
            "rename {name:?} in {:x} on the NAS (src {src:x?}, dst {dst:x?})",
            dir.ino
        );
        self.apply_removals_at(&[(dir, name), (newdir, newname)], op)?;
        if !flags.exchange {
            // A directory with new objects in it is not empty, whatever
            // the NAS says.
            let target = match dst {
                Some(q) => Some(q),
                None if !self.st().children.is_empty() => match self.nas_of(newdir) {
                    Some(nd) => match self.lower.lookup(&nd, newname) {
                        Ok((_, a)) => Some(self.up(a).ino),
                        Err(e) if e.raw_errno() == libc::ENOENT => None,
                        // Not knowing is not "empty" (see rmdir).
                        Err(e) => return Err(e),
                    },
                    None => None,
                },
                None => None,
            };
            let busy =
                target.is_some_and(|t| self.st().children.get(&t).is_some_and(|m| !m.is_empty()));
            if busy {
                let src_dir = match src {
                    Some(p) => self
                        .st()
                        .objs
                        .get(&p)
                        .is_some_and(|o| o.attr.kind == FileKind::Dir),
                    None => match self.nas_of(dir) {
                        Some(d) => self.lower.lookup(&d, name)?.1.kind == FileKind::Dir,
                        None => return Err(err(op, libc::ENOENT)),
                    },
                };
                return Err(err(
                    op,
                    if src_dir {
                        libc::ENOTEMPTY
                    } else {
                        libc::EISDIR
                    },
                ));
            }
        }
        // Placed under another name (a conflict): that is the one to move.
        let mut name = name.to_os_string();
        if let Some(p) = src {
            self.promote_chain(p)?;
            if let Some(now) = self.st().objs.get(&p).map(|o| o.name.clone()) {
                name = now;
            }
        }
        let name = name.as_os_str();
        if let Some(q) = dst {
            self.promote_chain(q)?;
        }
        let d = self.materialize(dir)?;
        let nd = self.materialize(newdir)?;
        // (With noreplace, only those the view hides: one whose number
        // is unknown shows, and is not for a rename to replace.)
        if !flags.exchange {
            self.clear_leftovers_for(newdir.ino, newname, flags.noreplace)?;
        }
        self.lower.rename(&d, name, &nd, newname, flags)?;
        let mut st = self.st();
        // The paths of the directories known there follow: the moved one
        // takes the new name, the one it replaced goes, the one it was
        // exchanged with takes the old name.
        let at = |st: &State<B>, p: u64, n: &OsStr| -> Vec<u64> {
            st.dirs
                .iter()
                .filter(|(_, v)| v.parent == p && v.name == n)
                .map(|(k, _)| *k)
                .collect()
        };
        let (moved, there) = (at(&st, dir.ino, name), at(&st, newdir.ino, newname));
        for k in &there {
            if flags.exchange {
                if let Some(v) = st.dirs.get_mut(k) {
                    v.parent = dir.ino;
                    v.name = name.to_os_string();
                }
            } else {
                st.dirs.remove(k);
            }
        }
        for k in &moved {
            if let Some(v) = st.dirs.get_mut(k) {
                v.parent = newdir.ino;
                v.name = newname.to_os_string();
            }
        }
        // The journal holds the paths of NAS directories with new objects
        // in them: a directory renamed on the NAS moves them.
        for r in Self::nas_rows(&st) {
            if let Err(e) = self.journal.put_object(&r, st.next_prov) {
                log::warn!("journal: {e}");
            }
        }
        Ok(())
    }

    fn open(&self, node: &Self::Node, mode: OpenMode) -> BResult<Self::File> {
        if self.local(node.ino) {
            let Some(c) = self.content_of(node.ino) else {
                return Err(err("open", libc::ENXIO));
            };
            let upper = OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.journal.upper_path(c.prov));
            match upper {
                Ok(upper) => return self.open_local(node, c, upper, mode),
                // Placed on the NAS since `local` was asked (its upper file
                // goes once it is there): opened there.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !self.local(node.ino) => {}
                Err(e) => return Err(io("open")(e)),
            }
        }
        let n = self.nas_of(node).ok_or_else(|| err("open", libc::ENOENT))?;
        Ok(OFile::Nas(self.lower.open(&n, mode)?, node.ino))
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
        match self.make(dir, name, FileKind::File, mode, 0, None, creds, None) {
            Ok(Some((p, a, c))) => {
                let (c, f) = c.ok_or_else(|| err("create", libc::EIO))?;
                Ok((
                    ONode { ino: p, nas: None },
                    a,
                    OFile::Local(c, f, open.append),
                ))
            }
            Err(e) if e.raw_errno() == libc::EEXIST && !exclusive => {
                let (n, _) = self.lookup(dir, name)?;
                let f = self.open(&n, open)?;
                let a = match &f {
                    OFile::Local(c, _, _) => self.local_attr(c.prov).unwrap_or(self.getattr(&n)?),
                    OFile::Nas(..) => self.getattr(&n)?,
                };
                if a.kind == FileKind::Dir {
                    return Err(err("create", libc::EISDIR));
                }
                Ok((n, a, f))
            }
            Err(e) => Err(e),
            Ok(None) => {
                self.apply_removals()?;
                let d = self.materialize(dir)?;
                self.clear_leftovers_for(dir.ino, name, false)?;
                let (n, a, f) = self.lower.create(&d, name, mode, open, exclusive, creds)?;
                let (n, a) = self.node_up(n, a);
                let ino = n.ino;
                Ok((n, a, OFile::Nas(f, ino)))
            }
        }
    }

    fn read(&self, file: &Self::File, offset: u64, buf: &mut [u8]) -> BResult<usize> {
        match file {
            OFile::Nas(f, _) => self.lower.read(f, offset, buf),
            OFile::Local(c, upper, _) => {
                let _g = c.lock.read().unwrap_or_else(|e| e.into_inner());
                if c.promoted.load(Ordering::Acquire) {
                    let f = self.nas_file(c, false)?;
                    drop(_g);
                    return self.lower.read(&f, offset, buf);
                }
                let mut done = 0;
                while done < buf.len() {
                    let n = upper
                        .read_at(&mut buf[done..], offset + done as u64)
                        .map_err(io("read"))?;
                    if n == 0 {
                        break;
                    }
                    done += n;
                }
                Ok(done)
            }
        }
    }

    fn write(&self, file: &Self::File, offset: u64, data: &[u8]) -> BResult<usize> {
        match file {
            OFile::Nas(f, _) => self.lower.write(f, offset, data),
            OFile::Local(c, upper, append) => {
                let _g = c.lock.read().unwrap_or_else(|e| e.into_inner());
                if c.promoted.load(Ordering::Acquire) {
                    let f = self.nas_file(c, true)?;
                    drop(_g);
                    return self.lower.write(&f, offset, data);
                }
                let offset = if *append {
                    upper.metadata().map_err(io("write"))?.len()
                } else {
                    offset
                };
                match upper.write_all_at(data, offset) {
                    Ok(()) => {}
                    Err(e) if too_big(&e) => {
                        drop(_g);
                        let f = self.escalate(c)?;
                        return self.lower.write(&f, offset, data);
                    }
                    Err(e) => return Err(BackendError::new("write", e)),
                }
                self.touch_file(c.prov, Some(offset + data.len() as u64));
                Ok(data.len())
            }
        }
    }

    fn fsync(&self, file: &Self::File, datasync: bool) -> BResult<()> {
        match file {
            OFile::Nas(f, _) => self.lower.fsync(f, datasync),
            OFile::Local(c, upper, _) => {
                let _g = c.lock.read().unwrap_or_else(|e| e.into_inner());
                if c.promoted.load(Ordering::Acquire) {
                    let f = self.nas_file(c, true)?;
                    drop(_g);
                    return self.lower.fsync(&f, datasync);
                }
                upper.sync_data().map_err(io("fsync"))?;
                drop(_g);
                let node = ONode {
                    ino: c.prov,
                    nas: None,
                };
                self.sync_namespace(&node)
            }
        }
    }

    fn fallocate(&self, file: &Self::File, mode: i32, offset: u64, len: u64) -> BResult<()> {
        match file {
            OFile::Nas(f, _) => self.lower.fallocate(f, mode, offset, len),
            OFile::Local(c, upper, _) => {
                let _g = c.lock.read().unwrap_or_else(|e| e.into_inner());
                if c.promoted.load(Ordering::Acquire) {
                    let f = self.nas_file(c, true)?;
                    drop(_g);
                    return self.lower.fallocate(&f, mode, offset, len);
                }
                // SAFETY: plain syscall on a descriptor we own.
                let r =
                    unsafe { libc::fallocate(upper.as_raw_fd(), mode, offset as i64, len as i64) };
                if r != 0 {
                    let e = std::io::Error::last_os_error();
                    if too_big(&e) {
                        drop(_g);
                        let f = self.escalate(c)?;
                        return self.lower.fallocate(&f, mode, offset, len);
                    }
                    return Err(BackendError::new("fallocate", e));
                }
                let size = upper.metadata().map_err(io("fallocate"))?.len();
                let mut st = self.st();
                if let Some(o) = st.objs.get_mut(&c.prov) {
                    o.attr.size = size;
                    o.attr.blocks = size.div_ceil(512);
                    let t = now();
                    o.attr.mtime = t;
                    o.attr.ctime = t;
                }
                Ok(())
            }
        }
    }

    fn fgetattr(&self, file: &Self::File) -> BResult<Attr> {
        match file {
            OFile::Nas(f, _) => {
                let _w = self.window_read(&[]);
                Ok(self.up(self.lower.fgetattr(f)?))
            }
            OFile::Local(c, _, _) => {
                {
                    // Not halfway through its creation on the NAS (which
                    // holds the lock): local, or the NAS file set.
                    let _g = c.lock.read().unwrap_or_else(|e| e.into_inner());
                    if !c.promoted.load(Ordering::Acquire) {
                        if let Some(a) = self.local_attr(c.prov) {
                            return Ok(a);
                        }
                    }
                }
                let f = self.nas_file(c, false)?;
                Ok(self.up(self.lower.fgetattr(&f)?))
            }
        }
    }

    fn fsyncdir(&self, dir: &Self::Node) -> BResult<()> {
        self.sync_namespace(dir)?;
        match self.nas_of(dir) {
            // Offline, what changed here is durable in the journal now and
            // reaches the NAS later, as a file's data does at its fsync
            // (changes made on the NAS itself were stable there when it
            // answered them: NFS makes them so).
            Some(n) => match self.lower.fsyncdir(&n) {
                Err(e) if is_unreachable(&e) => Ok(()),
                r => r,
            },
            None => Ok(()),
        }
    }

    fn statfs(&self, node: &Self::Node) -> BResult<StatFs> {
        match self.nas_of(node) {
            Some(n) => self.lower.statfs(&n),
            None => {
                let (r, _) = self.lower.root()?;
                self.lower.statfs(&r)
            }
        }
    }

    fn getxattr(&self, node: &Self::Node, name: &OsStr) -> BResult<Vec<u8>> {
        {
            let st = self.st();
            if let Some(p) = Self::local_file_or_dir(&st, node.ino) {
                return st
                    .xattrs
                    .get(&p)
                    .and_then(|m| m.get(name))
                    .cloned()
                    .ok_or_else(|| err("getxattr", libc::ENODATA));
            }
        }
        if self.local(node.ino) {
            return Err(err("getxattr", libc::ENODATA));
        }
        let n = self
            .nas_of(node)
            .ok_or_else(|| err("getxattr", libc::ENOENT))?;
        // Set or removed here, not on the NAS yet: the latest change.
        let kept = Self::xattrs_kept(&self.st(), node.ino);
        if let Some(x) = kept.into_iter().rfind(|x| x.name == name) {
            return x.value.ok_or_else(|| err("getxattr", libc::ENODATA));
        }
        self.lower.getxattr(&n, name)
    }

    fn listxattr(&self, node: &Self::Node) -> BResult<Vec<u8>> {
        {
            let st = self.st();
            if let Some(p) = Self::local_file_or_dir(&st, node.ino) {
                let mut out = Vec::new();
                for name in st.xattrs.get(&p).into_iter().flat_map(|m| m.keys()) {
                    out.extend_from_slice(name.as_bytes());
                    out.push(0);
                }
                return Ok(out);
            }
        }
        if self.local(node.ino) {
            return Ok(Vec::new());
        }
        let n = self
            .nas_of(node)
            .ok_or_else(|| err("listxattr", libc::ENOENT))?;
        // Taken first: one made on the NAS meanwhile is in its answer, and
        // laying it over again changes nothing.
        let kept = Self::xattrs_kept(&self.st(), node.ino);
        let mut list = self.lower.listxattr(&n)?;
        for x in &kept {
            list = super::xattr_list_with(&list, &x.name, x.value.is_some());
        }
        Ok(list)
    }

    fn setxattr(&self, node: &Self::Node, name: &OsStr, value: &[u8], flags: i32) -> BResult<()> {
        // (Not worth making a new object on the NAS for: the same answer
        // whether it answers or not.)
        if !self.lower.keeps_xattrs() {
            return Err(err("setxattr", libc::EOPNOTSUPP));
        }
        if let Some(done) = self.local_xattr(node, name, Some((value, flags))) {
            return done;
        }
        // An access ACL that says no more than the mode (`cp -a` sets one
        // on each copy) is a chmod of a local object: no need for the NAS.
        if let (true, Some(bits)) = (name == "system.posix_acl_access", acl_mode_bits(value)) {
            let perm = {
                let st = self.st();
                Self::local_file_or_dir(&st, node.ino)
                    .and_then(|p| st.objs.get(&p))
                    .filter(|o| !o.applying && !o.gone)
                    .map(|o| o.attr.perm)
            };
            if let Some(perm) = perm {
                let mode = (perm as u32 & !0o777) | bits;
                let chmod = SetAttr {
                    mode: Some(mode),
                    ..SetAttr::default()
                };
                return self.setattr(node, None, &chmod).map(|_| ());
            }
        }
        let n = self.materialize(node)?;
        // After the changes made here while the NAS did not answer (an
        // older chmod must not land on a newer ACL).
        self.apply_removals()?;
        self.lower.setxattr(&n, name, value, flags)?;
        if name == "system.posix_acl_default" {
            self.st().acl_default.insert(node.ino, true);
        }
        Ok(())
    }

    fn removexattr(&self, node: &Self::Node, name: &OsStr) -> BResult<()> {
        if !self.lower.keeps_xattrs() {
            return Err(err("removexattr", libc::EOPNOTSUPP));
        }
        if let Some(done) = self.local_xattr(node, name, None) {
            return done;
        }
        // A local object being created on the NAS takes the name there.
        let kept = {
            let st = self.st();
            Self::local_file_or_dir(&st, node.ino)
                .and_then(|p| st.xattrs.get(&p))
                .is_some_and(|m| m.contains_key(name))
        };
        if self.local(node.ino) && !kept {
            return Err(err("removexattr", libc::ENODATA));
        }
        let n = self.materialize(node)?;
        self.apply_removals()?;
        self.lower.removexattr(&n, name)?;
        if name == "system.posix_acl_default" {
            self.st().acl_default.remove(&node.ino);
        }
        Ok(())
    }

    fn max_file_size(&self) -> u64 {
        self.lower.max_file_size()
    }

    fn keeps_xattrs(&self) -> bool {
        self.lower.keeps_xattrs()
    }

    fn lists_acls(&self, node: &Self::Node) -> bool {
        match &node.nas {
            Some(n) => self.lower.lists_acls(n),
            None => false,
        }
    }

    fn same_fs(&self, a: &Self::Node, b: &Self::Node) -> bool {
        // A directory made here will be made in the NAS directory it is
        // under.
        let nas = |n: &Self::Node| self.nas_of(n).or_else(|| self.nas_dir_above(n.ino));
        match (nas(a), nas(b)) {
            (Some(a), Some(b)) => self.lower.same_fs(&a, &b),
            _ => false,
        }
    }

    fn online(&self) -> bool {
        self.lower.online()
    }

    fn held_up(&self) -> bool {
        self.lower.held_up()
    }

    fn offline_since(&self) -> Option<SystemTime> {
        self.lower.offline_since()
    }

    fn unfinished_changes(&self) -> usize {
        self.lower.unfinished_changes()
    }

    /// A new file (symlink, special file) already on the NAS is kept here
    /// only while something holds its provisional node: its entry keeps
    /// its NAS node, an open descriptor of a directory source, and an
    /// untar of tens of thousands of files would otherwise keep one each
    /// for the life of the mount. A later lookup finds it on the NAS,
    /// under the same inode number (`alias`). Directories stay: new
    /// objects in them refer to them.
    fn forget(&self, node: &Self::Node) {
        // Asked before `st` is taken: no lock of write-back under it.
        if self.data_pending.get().is_some_and(|p| p(node.ino)) {
            return;
        }
        let mut st = self.st();
        let Some(o) = st.objs.get(&node.ino) else {
            return;
        };
        let done = o.nas.is_some()
            && !o.applying
            && !o.gone
            && o.attr.kind != FileKind::Dir
            && o.link_to.is_none()
            && o.content.as_ref().is_none_or(|c| Arc::strong_count(c) == 1)
            && !st.links.contains_key(&node.ino)
            && !st.children.contains_key(&node.ino);
        if done {
            log::trace!("inode {}: on the NAS and forgotten: let go", node.ino);
            st.objs.remove(&node.ino);
        }
    }

    fn local_path(&self, ino: u64) -> Option<OsString> {
        let st = self.st();
        let o = st.objs.get(&ino).filter(|o| o.nas.is_none() && !o.gone)?;
        let mut p = Self::dir_path(&st, o.parent)?;
        if !p.is_empty() {
            p.push("/");
        }
        p.push(&o.name);
        Some(p)
    }

    fn pending_path(&self, ino: u64) -> Option<OsString> {
        let st = self.st();
        for r in st.removals.iter().rev().filter(|r| r.was.ino == ino) {
            match &r.to {
                Some(t) if !t.link => return Some(t.path.clone()),
                // A link, or attributes: it keeps its name.
                Some(_) => {}
                None if r.set.is_some() => {}
                None => return None,
            }
        }
        None
    }

    fn defers_removals(&self) -> bool {
        true
    }

    fn changes_kept(&self) -> usize {
        self.st().removals.len()
    }

    fn attrs_pending(&self) -> HashSet<u64> {
        let st = self.st();
        st.removals
            .iter()
            .filter(|r| r.set.is_some())
            .map(|r| st.alias.get(&r.was.ino).map_or(r.was.ino, |al| al.prov))
            .collect()
    }

    fn remove_later(
        &self,
        dir: &Self::Node,
        name: &OsStr,
        (node, kind, was): (&Self::Node, FileKind, Validator),
        at: SystemTime,
    ) -> BResult<()> {
        let _w = self.window_read(&[dir.ino]);
        // (Not under `state`: it may look there.)
        let Some(d) = self.nas_of(dir) else {
            return self.remove_moved_in(dir, name, (node, kind, was), at);
        };
        let mut st = self.st();
        let (rec, data_of, mut r) = Self::removal(&st, (dir, d, name), (node, kind, was))?;
        r.id = self
            .journal
            .add_removal(&rec, data_of)
            .map_err(journal_err("journal"))?;
        log::debug!(
            "{name:?} (nas ino {}) removed here; on the NAS once it answers",
            r.was.ino
        );
        Self::removed(&mut st, r, at);
        drop(st);
        // Due after the write-back delay, as creations (an rm -rf must
        // not run a pass per entry).
        self.due_at(Instant::now() + self.delay);
        Ok(())
    }

    fn move_later(
        &self,
        (dir, name): (&Self::Node, &OsStr),
        (newdir, newname): (&Self::Node, &OsStr),
        (node, kind, was): (&Self::Node, FileKind, Validator),
        over: Option<(&Self::Node, FileKind, Validator)>,
        link: bool,
        at: SystemTime,
    ) -> BResult<()> {
        let op = if link { "link" } else { "rename" };
        let _w = self.window_read(&[dir.ino, newdir.ino]);
        if self.nas_of(dir).is_none() && !link && over.is_none() {
            return self.move_moved_in((dir, name), (newdir, newname), node, at);
        }
        let (Some(d), Some(obj)) = (self.nas_of(dir), self.nas_of(node)) else {
            return Err(err(op, libc::EIO));
        };
        // Into a directory made here, not on the NAS yet (`mkdir x; mv f
        // x/` offline): made there first at the replay. Not over another
        // object, and not where the NAS may refuse it (EXDEV). A directory
        // takes the rows under it along as into any directory (their
        // paths then go through the new one, which the replay, and a
        // later mount, make before them).
        let nd = self.nas_of(newdir);
        if nd.is_none() {
            let new_dir = Self::is_new_dir(&self.st(), newdir.ino);
            if !new_dir || over.is_some() || !self.same_fs(dir, newdir) {
                return Err(err(op, libc::EIO));
            }
        }
        if is_hidden(newname) {
            return Err(err(op, libc::EINVAL));
        }
        let mut st = self.st();
        if st
            .children
            .get(&dir.ino)
            .is_some_and(|m| m.contains_key(name))
        {
            return Err(err(op, libc::EIO));
        }
        match Self::pending_at(&st, dir.ino, name) {
            AtName::Gone => return Err(err(op, libc::ENOENT)),
            AtName::Nas | AtName::MovedIn(_) => {}
        }
        // The NAS object at the new name goes with the rename, in the same
        // journal transaction.
        let gone = match (over, link) {
            (Some(_), true) => return Err(err(op, libc::EEXIST)),
            (Some(o), false) => {
                let nd = nd.clone().ok_or_else(|| err(op, libc::EIO))?;
                Some(Self::removal(&st, (newdir, nd, newname), o)?)
            }
            (None, _) => None,
        };
        if gone.is_none() {
            if let AtName::MovedIn(_) = Self::pending_at(&st, newdir.ino, newname) {
                return Err(err(op, if link { libc::EEXIST } else { libc::EIO }));
            }
        }
        // Paths as the NAS will have them once the changes before this
        // one are made there (without them the change could not be found
        // again after a restart: refused).
        let (Some(dir_path), Some(newdir_path)) = (
            Self::dir_path(&st, dir.ino),
            Self::dir_path(&st, newdir.ino),
        ) else {
            return Err(err(op, libc::EIO));
        };
        // A new object there is replaced (the caller checked the kinds).
        let replaced = st
            .children
            .get(&newdir.ino)
            .and_then(|m| m.get(newname))
            .copied();
        if let (Some(_), true) = (replaced, link) {
            return Err(err(op, libc::EEXIST));
        }
        if let Some(q) = replaced {
            let qdir = st
                .objs
                .get(&q)
                .is_some_and(|o| o.attr.kind == FileKind::Dir);
            match (kind == FileKind::Dir, qdir) {
                (true, false) => return Err(err(op, libc::ENOTDIR)),
                (false, true) => return Err(err(op, libc::EISDIR)),
                (true, true) if Self::has_entries(&st, q) => {
                    return Err(err(op, libc::ENOTEMPTY));
                }
                _ => {}
            }
        }
        let nas_ino = Self::nas_ino_of(&st, node.ino);
        let was = Validator {
            ino: nas_ino,
            ..was
        };
        let rec = RemovalRecord {
            id: 0,
            dir_path,
            name: name.to_os_string(),
            kind,
            was,
            to: Some((newdir_path, newname.to_os_string())),
            link,
            set: None,
            xattr: None,
        };
        let (path, newpath) = (
            join_path(&rec.dir_path, &rec.name),
            join_path(
                &rec.to.as_ref().map(|t| t.0.clone()).unwrap_or_default(),
                newname,
            ),
        );
        // A directory takes along the rows that name it by path: those of
        // the new objects in it (their paths as they will be, computed
        // with its entry moved for the time it takes) and the leftovers.
        let moved_dir = kind == FileKind::Dir && !link;
        // Not a directory above a new one that renames still to make go
        // into: their rows name it by the path it has now.
        if moved_dir && Self::moves_into_tree(&st, node.ino) {
            return Err(err(op, libc::EIO));
        }
        let rows = if moved_dir {
            let old = st.dirs.get(&node.ino).cloned();
            let there = st
                .dirs
                .iter()
                .find(|(k, v)| **k != node.ino && v.parent == newdir.ino && v.name == newname)
                .map(|(k, v)| (*k, v.clone()));
            if let Some((k, _)) = &there {
                st.dirs.remove(k);
            }
            if let Some(x) = st.dirs.get_mut(&node.ino) {
                x.parent = newdir.ino;
                x.name = newname.to_os_string();
            }
            let rows = Self::nas_rows(&st);
            if let Some(o) = old {
                st.dirs.insert(node.ino, o);
            }
            if let Some((k, v)) = there {
                st.dirs.insert(k, v);
            }
            rows
        } else {
            Vec::new()
        };
        let mut changes = Vec::new();
        if let Some((grec, data_of, _)) = &gone {
            changes.push((grec, *data_of));
        }
        changes.push((&rec, None));
        let repath = moved_dir.then_some((path.as_os_str(), newpath.as_os_str()));
        let ids = self
            .journal
            .add_changes(&changes, &rows, repath)
            .map_err(journal_err("journal"))?;
        if let Some((_, _, mut g)) = gone {
            g.id = ids[0];
            g.for_next = true;
            Self::removed(&mut st, g, at);
        }
        if moved_dir {
            if let Some(x) = st.dirs.get_mut(&node.ino) {
                x.parent = newdir.ino;
                x.name = newname.to_os_string();
            }
        }
        log::debug!(
            "{path:?} (nas ino {nas_ino}) {} here to {newpath:?}{}; on the NAS once it answers",
            if link { "linked" } else { "renamed" },
            if nd.is_none() {
                ", a new directory"
            } else {
                ""
            }
        );
        let subdirs = i32::from(moved_dir && nd.is_none());
        st.removals.push_back(Removal {
            id: ids[ids.len() - 1],
            dir: d,
            dir_ino: dir.ino,
            path,
            name: rec.name,
            kind,
            was,
            since: Instant::now(),
            error: None,
            to: Some(MoveTo {
                node: obj,
                dir: nd,
                dir_ino: newdir.ino,
                name: newname.to_os_string(),
                path: newpath,
                link,
            }),
            set: None,
            for_next: false,
        });
        // Only once the rename is in the journal: a crash before keeps the
        // new object (a conflict copy at worst), never loses it.
        if let Some(q) = replaced {
            if let Err(e) = self.remove_local(&mut st, newdir.ino, newname, q) {
                log::warn!("{newname:?}: the new object replaced here stays in the journal: {e}");
            }
        }
        if !link {
            Self::dir_changed(&mut st, dir.ino, at, 0);
        }
        // (A NAS directory's link count follows its rows: `dir_up`.)
        Self::dir_changed(&mut st, newdir.ino, at, subdirs);
        drop(st);
        // Due after the write-back delay, as creations (an rm -rf must
        // not run a pass per entry).
        self.due_at(Instant::now() + self.delay);
        Ok(())
    }

    fn set_later(
        &self,
        (dir, name): (&Self::Node, &OsStr),
        node: &Self::Node,
        kind: FileKind,
        was: Validator,
        changes: &SetAttr,
    ) -> BResult<()> {
        let op = "setattr";
        let at = |t: Option<SetTime>| match t {
            Some(SetTime::At(t)) => Ok(Some(t)),
            Some(SetTime::Now) => Err(err(op, libc::EIO)),
            None => Ok(None),
        };
        let rec = SetRecord {
            mode: changes.mode,
            uid: changes.uid,
            gid: changes.gid,
            atime: at(changes.atime)?,
            mtime: at(changes.mtime)?,
            ctime: now(),
        };
        if changes.size.is_some() {
            return Err(err(op, libc::EIO));
        }
        self.keep_set((dir, name), node, kind, was, rec, None)
    }

    fn xattr_later(
        &self,
        at: (&Self::Node, &OsStr),
        node: &Self::Node,
        kind: FileKind,
        was: Validator,
        (name, value): (&OsStr, Option<&[u8]>),
    ) -> BResult<()> {
        // Those the NAS keeps as they are (not ACLs, which set the mode,
        // nor security labels).
        if !name.as_bytes().starts_with(b"user.") || !self.xattrs_ok {
            return Err(err("setxattr", libc::EIO));
        }
        let rec = SetRecord {
            mode: None,
            uid: None,
            gid: None,
            atime: None,
            mtime: None,
            ctime: now(),
        };
        let x = XattrRecord {
            name: name.to_os_string(),
            value: value.map(|v| v.to_vec()),
        };
        self.keep_set(at, node, kind, was, rec, Some(x))
    }

    fn undo_remove_later(&self, dir: &Self::Node, name: &OsStr) {
        let mut st = self.st();
        // The latest removal of that name: a plain one, or a rename into a
        // new directory turned into a removal (made a rename again).
        let plain = st.removals.iter().rposition(|r| {
            r.dir_ino == dir.ino && r.name == name && r.to.is_none() && r.set.is_none()
        });
        let unmoved = st
            .removals
            .iter()
            .enumerate()
            .rev()
            .find(|(_, r)| {
                r.to.is_none()
                    && st
                        .unmoved
                        .get(&r.id)
                        .is_some_and(|(t, _)| t.dir_ino == dir.ino && t.name == name)
            })
            .map(|(i, _)| i);
        match (plain, unmoved) {
            (_, Some(u)) if plain.is_none_or(|p| u > p) => {
                let id = st.removals[u].id;
                let Some((t, was)) = st.unmoved.remove(&id) else {
                    return;
                };
                // Where its directory is now; gone, the removal stays.
                let gone = st.objs.get(&t.dir_ino).is_none_or(|o| o.gone);
                let Some(dir_path) = Self::dir_path(&st, t.dir_ino).filter(|_| !gone) else {
                    log::warn!("{:?}: its directory is gone; the removal stays", t.path);
                    return;
                };
                let done = self
                    .journal
                    .reshape(id, Some((&dir_path, &t.name)), &was, None);
                if let Err(e) = done {
                    log::warn!("journal: {e}");
                    return;
                }
                let r = &mut st.removals[u];
                r.was = was;
                r.to = Some(MoveTo {
                    path: join_path(&dir_path, &t.name),
                    ..t
                });
            }
            (Some(i), _) => {
                let Some(r) = st.removals.remove(i) else {
                    return;
                };
                drop(st);
                if let Err(e) = self.journal.delete_removal(r.id) {
                    log::warn!("journal: {e}");
                }
            }
            _ => {}
        }
    }

    fn sync_namespace(&self, _node: &Self::Node) -> BResult<()> {
        if !self.upper_synced.swap(true, Ordering::AcqRel) {
            if let Err(e) = File::open(self.journal.upper_dir()).and_then(|f| f.sync_all()) {
                self.upper_synced.store(false, Ordering::Relaxed);
                return Err(BackendError::new("fsync", e));
            }
        }
        self.journal.commit_durable().map_err(journal_err("fsync"))
    }
}

impl<B: Backend> Staged for Overlay<B> {
    fn flush(&self, deadline: Option<Instant>) -> usize {
        self.flush_all(deadline)
    }

    fn watch_data(&self, pending: Box<dyn Fn(u64) -> bool + Send + Sync>) {
        let _ = self.data_pending.set(pending);
    }

    fn watch_own_meta(&self, own: OwnMeta) {
        let _ = self.own_meta.set(own);
    }

    fn watch_moved(&self, moved: Moved) {
        let _ = self.moved.set(moved);
    }

    fn settle(&self) {
        if self.lower.online() {
            self.settle_dirs();
        }
    }

    fn pending(&self) -> Vec<PendingInfo> {
        self.pending_objects()
            .into_iter()
            .map(|o| PendingInfo {
                new: (!o.removed && !o.set && o.moved_to.is_none()).then_some(kind_name(o.kind)),
                attrs: o.set.then_some(kind_name(o.kind)),
                removed: o.removed.then_some(kind_name(o.kind)),
                moved: o.moved_to.map(|to| (kind_name(o.kind), to, o.link)),
                path: o.path,
                bytes: 0,
                age: o.age,
                phase: if o.attempts > 0 {
                    "retrying"
                } else {
                    "waiting"
                },
                attempts: o.attempts,
                error: o.error,
            })
            .collect()
    }

    fn pending_under(&self, prefix: Option<&OsStr>) -> u64 {
        Overlay::pending_under(self, prefix)
    }

    fn conflicts(&self) -> u64 {
        self.counters().1
    }

    fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    fn stop(&self) {
        self.stop_replay();
    }
}

/// The permission bits an access ACL (system.posix_acl_access, Linux's
/// xattr format: version 2, then tag, perm, id per entry) gives, if it
/// has only the owner, group and other entries: then it says no more
/// than a mode.
fn acl_mode_bits(value: &[u8]) -> Option<u32> {
    const USER_OBJ: u16 = 0x01;
    const GROUP_OBJ: u16 = 0x04;
    const OTHER: u16 = 0x20;
    let (head, entries) = value.split_at_checked(4)?;
    if u32::from_le_bytes(head.try_into().ok()?) != 2 || entries.len() != 3 * 8 {
        return None;
    }
    let mut bits = 0;
    let mut seen = 0;
    for e in entries.chunks_exact(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u16::from_le_bytes([e[2], e[3]]) as u32 & 7;
        let shift = match tag {
            USER_OBJ => 6,
            GROUP_OBJ => 3,
            OTHER => 0,
            _ => return None,
        };
        seen |= tag;
        bits |= perm << shift;
    }
    (seen == USER_OBJ | GROUP_OBJ | OTHER).then_some(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_acl_that_says_no_more_than_the_mode_is_a_mode() {
        let acl = |entries: &[(u16, u16)]| {
            let mut v = 2u32.to_le_bytes().to_vec();
            for (tag, perm) in entries {
                v.extend_from_slice(&tag.to_le_bytes());
                v.extend_from_slice(&perm.to_le_bytes());
                v.extend_from_slice(&u32::MAX.to_le_bytes());
            }
            v
        };
        // What `cp -a` sets for mode 0640: user rw-, group r--, other ---.
        assert_eq!(
            acl_mode_bits(&acl(&[(1, 6), (4, 4), (0x20, 0)])),
            Some(0o640)
        );
        assert_eq!(
            acl_mode_bits(&acl(&[(1, 7), (4, 5), (0x20, 5)])),
            Some(0o755)
        );
        // A named user and a mask: a real ACL, for the NAS.
        let named = acl(&[(1, 6), (2, 6), (4, 4), (0x10, 6), (0x20, 0)]);
        assert_eq!(acl_mode_bits(&named), None);
        // Malformed, or another version.
        assert_eq!(acl_mode_bits(&acl(&[(1, 6), (1, 6), (0x20, 0)])), None);
        assert_eq!(acl_mode_bits(&[1, 0, 0, 0]), None);
        assert_eq!(acl_mode_bits(&[]), None);
    }
    use crate::backend::dir::DirBackend;

    struct Setup {
        nas: tempfile::TempDir,
        cache: tempfile::TempDir,
        ov: Arc<Overlay<DirBackend>>,
    }

    fn open(nas: tempfile::TempDir, cache: tempfile::TempDir) -> Setup {
        let lower = Arc::new(DirBackend::new(nas.path()).unwrap());
        let journal = Arc::new(Journal::open(cache.path()).unwrap());
        let ov = Overlay::open(lower, journal, Duration::from_secs(3600), "host".into()).unwrap();
        Setup { nas, cache, ov }
    }

    fn setup() -> Setup {
        open(tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap())
    }

    fn me() -> Creds {
        Creds {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            umask: 0o022,
        }
    }

    const RW: OpenMode = OpenMode {
        read: true,
        write: true,
        append: false,
        truncate: false,
    };

    fn names(dir: &std::path::Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    /// A file being placed on the NAS holds off the readers of its own
    /// directory only, and its directory's times moved by the placement
    /// are not shown, also through a lookup from the parent (which does
    /// not wait for it).
    #[test]
    fn placing_a_file_holds_off_its_own_directory_only() {
        use crate::backend::instrumented::{Fault, Instrumented};
        use std::sync::mpsc;
        let nas = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        for i in 0..10 {
            std::fs::create_dir(nas.path().join(format!("d{i}"))).unwrap();
        }
        let stats = Arc::new(crate::stats::Stats::default());
        let lower = Instrumented::new(DirBackend::new(nas.path()).unwrap(), stats);
        let faults = lower.faults();
        let journal = Arc::new(Journal::open(cache.path()).unwrap());
        let ov = Overlay::open(
            Arc::new(lower),
            journal,
            Duration::from_secs(3600),
            "h".into(),
        )
        .unwrap();
        let (root, ra) = ov.root().unwrap();
        let dirs: Vec<_> = (0..10)
            .map(|i| ov.lookup(&root, OsStr::new(&format!("d{i}"))).unwrap())
            .collect();
        // Two directories whose stripes differ from each other and the root's.
        let (a, aa) = dirs
            .iter()
            .find(|(_, x)| stripe(x.ino) != stripe(ra.ino))
            .cloned()
            .unwrap();
        let (b, _) = dirs
            .iter()
            .find(|(_, x)| ![stripe(ra.ino), stripe(aa.ino)].contains(&stripe(x.ino)))
            .cloned()
            .unwrap();
        let aname = std::path::Path::new(nas.path()).join(
            dirs.iter()
                .position(|(_, x)| x.ino == aa.ino)
                .map(|i| format!("d{i}"))
                .unwrap(),
        );
        let (_, _, file) = ov
            .create(&a, OsStr::new("f"), 0o644, RW, true, me())
            .unwrap();
        ov.write(&file, 0, b"placed").unwrap();
        drop(file);
        let nas_mtime = || std::fs::metadata(&aname).unwrap().modified().unwrap();
        let before = nas_mtime();
        // As shown with the new file in it.
        let (_, aa) = ov.lookup(&root, aname.file_name().unwrap()).unwrap();
        std::thread::sleep(Duration::from_millis(20));

        // The placement stops at the attribute read after its rename.
        faults.set(Fault::Stall, Some("getattr"));
        let flusher = {
            let ov = ov.clone();
            std::thread::spawn(move || ov.flush_all(None))
        };
        let t0 = Instant::now();
        while faults.stalled() == 0 {
            assert!(t0.elapsed() < Duration::from_secs(20), "never stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(names(&aname), ["f"], "renamed into place, not recorded yet");
        assert_ne!(nas_mtime(), before, "the NAS directory changed");

        // Another directory's reader does not wait for it...
        let (tx, rx) = mpsc::channel();
        {
            let (ov, b) = (ov.clone(), b.clone());
            std::thread::spawn(move || {
                let _ = tx.send(ov.lookup(&b, OsStr::new("x")).map(|_| ()));
            });
        }
        let r = rx.recv_timeout(Duration::from_secs(20));
        assert!(
            matches!(&r, Ok(Err(e)) if e.raw_errno() == libc::ENOENT),
            "{r:?}"
        );
        // ...nor does a lookup of the directory from the root, which shows
        // its times as before...
        let (_, shown) = ov.lookup(&root, aname.file_name().unwrap()).unwrap();
        assert_eq!((shown.mtime, shown.ctime), (aa.mtime, aa.ctime));
        // ...while its own listing waits until the file is recorded.
        let (tx, rx) = mpsc::channel();
        {
            let (ov, a) = (ov.clone(), a.clone());
            std::thread::spawn(move || {
                let _ = tx.send(ov.readdir(&a).map(|v| v.len()));
            });
        }
        std::thread::sleep(Duration::from_millis(200));
        assert!(rx.try_recv().is_err(), "listed halfway through a placement");
        faults.set(Fault::None, None);
        assert_eq!(flusher.join().unwrap(), 0);
        let listed = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(listed.unwrap(), 1, "the file listed once");
        let (_, after) = ov.lookup(&root, aname.file_name().unwrap()).unwrap();
        assert_eq!((after.mtime, after.ctime), (aa.mtime, aa.ctime));
    }

    #[test]
    fn creations_stay_local_until_flushed_and_keep_their_number() {
        let s = setup();
        let (root, _) = s.ov.root().unwrap();
        let (d, da) = s.ov.mkdir(&root, OsStr::new("d"), 0o750, me()).unwrap();
        assert!(da.ino >= PROV_BASE);
        let (f, fa, file) =
            s.ov.create(&d, OsStr::new("f"), 0o640, RW, true, me())
                .unwrap();
        s.ov.write(&file, 0, b"local bytes").unwrap();
        s.ov.symlink(&d, OsStr::new("l"), OsStr::new("f"), me())
            .unwrap();
        assert!(names(s.nas.path()).is_empty(), "nothing on the NAS yet");
        let listed: Vec<_> =
            s.ov.readdir(&d)
                .unwrap()
                .into_iter()
                .map(|e| e.name)
                .collect();
        assert_eq!(listed.len(), 2);
        assert_eq!(s.ov.pending_count(), 3);
        // Counted under a prefix as listed, without listing.
        let paths: Vec<_> = s.ov.pending_objects().into_iter().map(|o| o.path).collect();
        assert_eq!(paths, ["d", "d/f", "d/l"]);
        for (prefix, n) in [("d", 3), ("d/f", 1), ("e", 0), ("", 3)] {
            assert_eq!(s.ov.pending_under(Some(OsStr::new(prefix))), n, "{prefix}");
        }

        assert_eq!(s.ov.flush_all(None), 0);
        assert_eq!(
            std::fs::read(s.nas.path().join("d/f")).unwrap(),
            b"local bytes"
        );
        assert_eq!(
            std::fs::read_link(s.nas.path().join("d/l")).unwrap(),
            std::path::Path::new("f")
        );
        let md = std::fs::metadata(s.nas.path().join("d")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o7777,
            0o750
        );
        // Same number, same ctime, through the node and by name.
        let after = s.ov.getattr(&f).unwrap();
        assert_eq!(
            (after.ino, after.ctime),
            (fa.ino, s.ov.fgetattr(&file).unwrap().ctime)
        );
        let (_, by_name) = s.ov.lookup(&d, OsStr::new("f")).unwrap();
        assert_eq!(by_name.ino, fa.ino);
        // Writes through the file opened while it was local reach the NAS.
        s.ov.write(&file, 0, b"LOCAL").unwrap();
        assert_eq!(
            std::fs::read(s.nas.path().join("d/f")).unwrap(),
            b"LOCAL bytes"
        );
        assert_eq!(names(&s.nas.path().join("d")), ["f", "l"]);
    }

    /// An overlay over a backend whose calls can be made to fail.
    struct Faulty {
        nas: tempfile::TempDir,
        _cache: tempfile::TempDir,
        ov: Arc<Overlay<crate::backend::instrumented::Instrumented<DirBackend>>>,
        faults: Arc<crate::backend::instrumented::FaultControl>,
    }

    fn faulty() -> Faulty {
        use crate::backend::instrumented::Instrumented;
        let nas = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let stats = Arc::new(crate::stats::Stats::default());
        let lower = Instrumented::new(DirBackend::new(nas.path()).unwrap(), stats);
        let faults = lower.faults();
        let journal = Arc::new(Journal::open(cache.path()).unwrap());
        let ov = Overlay::open(
            Arc::new(lower),
            journal,
            Duration::from_secs(3600),
            "h".into(),
        )
        .unwrap();
        Faulty {
            nas,
            _cache: cache,
            ov,
            faults,
        }
    }

    impl Faulty {
        /// A write-back pass cut short at NAS call `op`. (A panic stands
        /// for the NAS gone: this backend is not bounded.)
        fn cut(&self, op: &'static str) {
            self.cut_in(op, || {
                self.ov.flush_all(None);
            });
        }

        /// `work` cut short at NAS call `op`.
        fn cut_in(&self, op: &'static str, work: impl FnOnce()) {
            use crate::backend::instrumented::Fault;
            self.faults.set(Fault::Panic, Some(op));
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
            self.faults.set(Fault::None, None);
            assert!(r.is_err(), "{op}");
        }

        /// A new file `name` in `dir` holding `data`, closed.
        fn new_file(&self, dir: &ONode<DirNodeOf>, name: &str, data: &[u8]) -> Attr {
            let (_, a, f) = self
                .ov
                .create(dir, OsStr::new(name), 0o644, RW, true, me())
                .unwrap();
            self.ov.write(&f, 0, data).unwrap();
            a
        }
    }

    /// A file placed on the NAS by an attempt cut short just after (the
    /// NAS gone) gets, at the next attempt, the owner set here in between.
    #[test]
    fn a_chown_between_attempts_reaches_a_file_the_first_placed() {
        use crate::backend::instrumented::Fault;
        use std::os::unix::fs::MetadataExt;
        let s = faulty();
        let (nas, ov, faults) = (&s.nas, &s.ov, &s.faults);
        let (root, _) = ov.root().unwrap();
        let (f, _, file) = ov
            .create(&root, OsStr::new("f"), 0o750, RW, true, me())
            .unwrap();
        ov.write(&file, 0, b"bytes").unwrap();
        // Another, whose owner the NAS chose itself (as for a squashed
        // root): left as it is, not a conflict.
        let (g, _, _) = ov
            .create(&root, OsStr::new("g"), 0o640, RW, true, me())
            .unwrap();
        faults.set(Fault::Fail(libc::EIO), Some("getattr"));
        assert_eq!(ov.flush_all(None), 2);
        faults.set(Fault::None, None);
        assert_eq!(names(nas.path()), ["f", "g"], "placed by the first attempt");
        std::os::unix::fs::chown(nas.path().join("g"), Some(3000), Some(3000)).unwrap();
        let chown = SetAttr {
            uid: Some(1000),
            gid: Some(2000),
            ..SetAttr::default()
        };
        let a = ov.setattr(&f, None, &chown).unwrap();
        assert_eq!((a.uid, a.gid), (1000, 2000));
        assert_eq!(ov.flush_all(None), 0);
        let md = std::fs::metadata(nas.path().join("f")).unwrap();
        assert_eq!((md.uid(), md.gid()), (1000, 2000));
        assert_eq!(md.mode() & 0o7777, (a.perm & 0o7777) as u32);
        assert_eq!(std::fs::read(nas.path().join("f")).unwrap(), b"bytes");
        let shown = ov.getattr(&f).unwrap();
        assert_eq!((shown.uid, shown.gid), (1000, 2000));
        let md = std::fs::metadata(nas.path().join("g")).unwrap();
        assert_eq!((md.uid(), md.gid()), (3000, 3000));
        assert_eq!(ov.getattr(&g).unwrap().uid, 3000);
        assert_eq!(ov.conflicts.load(Ordering::Relaxed), 0);
    }

    /// The same for a directory and a symlink made on the NAS as a user
    /// (not the daemon) by an attempt cut short after: the owner set
    /// here since reaches them.
    #[test]
    fn a_chown_between_attempts_reaches_a_directory_or_symlink_the_first_made() {
        use std::os::unix::fs::MetadataExt;
        let s = faulty();
        let (nas, ov) = (&s.nas, &s.ov);
        let (root, _) = ov.root().unwrap();
        let user = Creds {
            uid: 1000,
            gid: 1000,
            umask: 0o022,
        };
        let chown = SetAttr {
            uid: Some(2000),
            gid: Some(2000),
            ..SetAttr::default()
        };
        // A symlink's times, set after it is made: cut short there.
        let (l, _) = ov
            .symlink(&root, OsStr::new("l"), OsStr::new("t"), user)
            .unwrap();
        s.cut("setattr");
        assert_eq!(names(nas.path()), ["l"], "made by the first attempt");
        ov.setattr(&l, None, &chown).unwrap();
        // A directory's xattrs, set after it is made: cut short there.
        let (d, _) = ov.mkdir(&root, OsStr::new("d"), 0o755, user).unwrap();
        ov.setxattr(&d, OsStr::new("user.k"), b"v", 0).unwrap();
        s.cut("setxattr");
        assert_eq!(names(nas.path()), ["d", "l"], "made by the first attempt");
        ov.setattr(&d, None, &chown).unwrap();
        assert_eq!(ov.flush_all(None), 0);
        for n in ["d", "l"] {
            let md = std::fs::symlink_metadata(nas.path().join(n)).unwrap();
            assert_eq!((md.uid(), md.gid()), (2000, 2000), "{n}");
        }
        assert_eq!(ov.conflicts.load(Ordering::Relaxed), 0);
    }

    /// A directory made on the NAS by an attempt whose answer was lost,
    /// then removed here, is removed there before a new directory takes
    /// its name, also when that one is made outside the write-back's
    /// passes (as a rename into it does): no conflict.
    #[test]
    fn a_leftover_yields_its_name_to_a_new_directory_made_there() {
        let s = faulty();
        let (nas, ov) = (&s.nas, &s.ov);
        let (root, _) = ov.root().unwrap();
        ov.mkdir(&root, OsStr::new("b"), 0o755, me()).unwrap();
        // (A panic stands for the NAS gone: this backend is not bounded.)
        s.cut("mkdir");
        ov.rmdir(&root, OsStr::new("b")).unwrap();
        let (_, a) = ov.mkdir(&root, OsStr::new("b"), 0o700, me()).unwrap();
        // The NAS made the first all the same, late (a call abandoned
        // after `timeo` that finished there).
        std::fs::create_dir(nas.path().join("b")).unwrap();
        ov.promote_one(a.ino, false).unwrap();
        assert_eq!(names(nas.path()), ["b"]);
        assert_eq!(ov.conflicts.load(Ordering::Relaxed), 0);
        assert!(ov.st().leftovers.is_empty());
    }

    /// NAS directory `b` with, at `a`, what an attempt cut short left
    /// (a directory made here, removed since); NAS directory `x` and NAS
    /// file `f` beside it.
    fn leftover_at_b_a() -> (Faulty, ONode<DirNodeOf>) {
        let s = faulty();
        std::fs::create_dir(s.nas.path().join("b")).unwrap();
        std::fs::create_dir(s.nas.path().join("x")).unwrap();
        std::fs::write(s.nas.path().join("f"), "f").unwrap();
        let (root, _) = s.ov.root().unwrap();
        let (b, _) = s.ov.lookup(&root, OsStr::new("b")).unwrap();
        let (a, _) = s.ov.mkdir(&b, OsStr::new("a"), 0o755, me()).unwrap();
        s.ov.setxattr(&a, OsStr::new("user.k"), b"v", 0).unwrap();
        s.cut("setxattr");
        s.ov.rmdir(&b, OsStr::new("a")).unwrap();
        assert_eq!(names(&s.nas.path().join("b")), ["a"], "left behind");
        assert_eq!(s.ov.st().leftovers.len(), 1);
        (s, b)
    }

    type DirNodeOf = <crate::backend::instrumented::Instrumented<DirBackend> as Backend>::Node;

    /// A rename kept for later (offline) to a name where an attempt cut
    /// short left something of ours: the leftover goes first, then the
    /// rename is made (not taken for a name taken by another client).
    #[test]
    fn a_kept_rename_to_a_leftovers_name_removes_it_first() {
        let (s, b) = leftover_at_b_a();
        let (nas, ov) = (&s.nas, &s.ov);
        let (root, _) = ov.root().unwrap();
        let (x, xa) = ov.lookup(&root, OsStr::new("x")).unwrap();
        let was = Validator {
            ino: xa.ino,
            size: xa.size,
            mtime: xa.mtime,
            ctime: xa.ctime,
        };
        ov.move_later(
            (&root, OsStr::new("x")),
            (&b, OsStr::new("a")),
            (&x, FileKind::Dir, was),
            None,
            false,
            SystemTime::now(),
        )
        .unwrap();
        ov.apply_removals().unwrap();
        assert_eq!(ov.conflicts.load(Ordering::Relaxed), 0);
        assert_eq!(names(nas.path()), ["b", "f"]);
        assert_eq!(names(&nas.path().join("b")), ["a"]);
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(nas.path().join("b/a")).unwrap().ino();
        assert_eq!(ino, xa.ino, "x moved there");
        assert!(ov.st().leftovers.is_empty());
    }

    /// A directory the NAS made though the attempt's answer was lost (its
    /// number unknown), made as the daemon, then given another group
    /// here: found at the next attempt, it gets that group.
    #[test]
    fn a_chgrp_reaches_a_directory_whose_creation_answer_was_lost() {
        use std::os::unix::fs::MetadataExt;
        let s = faulty();
        let (nas, ov) = (&s.nas, &s.ov);
        let (root, _) = ov.root().unwrap();
        let (d, da) = ov.mkdir(&root, OsStr::new("d"), 0o755, me()).unwrap();
        s.cut("mkdir");
        let gid = me().gid + 1000;
        let to = SetAttr {
            gid: Some(gid),
            ..SetAttr::default()
        };
        ov.setattr(&d, None, &to).unwrap();
        // The NAS made it all the same, as the daemon.
        std::fs::create_dir(nas.path().join("d")).unwrap();
        ov.promote_one(da.ino, false).unwrap();
        let md = std::fs::metadata(nas.path().join("d")).unwrap();
        assert_eq!((md.uid(), md.gid()), (me().uid, gid));
        assert_eq!(ov.conflicts.load(Ordering::Relaxed), 0);
    }

    /// A new directory whose first attempt was cut short before making it
    /// does not take, at the next, a leftover at its name (another local
    /// object's, moved away since) for what that attempt made.
    #[test]
    fn a_directory_being_made_does_not_adopt_a_leftover_at_its_name() {
        let s = faulty();
        let (nas, ov) = (&s.nas, &s.ov);
        let (root, _) = ov.root().unwrap();
        let (d1, _) = ov.mkdir(&root, OsStr::new("n"), 0o755, me()).unwrap();
        ov.setxattr(&d1, OsStr::new("user.k"), b"v", 0).unwrap();
        s.cut("setxattr");
        // (Known by its times: a new one may get the freed number.)
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        std::fs::File::open(nas.path().join("n"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        ov.rename(
            &root,
            OsStr::new("n"),
            &root,
            OsStr::new("m"),
            RenameFlags::default(),
        )
        .unwrap();
        let (_, d2) = ov.mkdir(&root, OsStr::new("n"), 0o700, me()).unwrap();
        s.cut_in("mkdir", || {
            let _ = ov.promote_one(d2.ino, false);
        });
        ov.promote_one(d2.ino, false).unwrap();
        let md = std::fs::metadata(nas.path().join("n")).unwrap();
        assert_ne!(
            md.modified().unwrap(),
            old,
            "the leftover taken for the new directory"
        );
        assert_eq!(ov.conflicts.load(Ordering::Relaxed), 0);
        assert!(ov.st().leftovers.is_empty());
    }

    /// Attempts cut short before and after placing a new file: the third
    /// finishes it, not taking it for another's (the second's hidden file
    /// may get the number the first's had, which the NAS freed: as ext4
    /// does here; where numbers are not reused, this passes either way).
    #[test]
    fn a_file_placed_by_an_attempt_cut_short_is_finished_by_the_next() {
        use std::os::unix::fs::MetadataExt;
        let s = faulty();
        let (nas, ov) = (&s.nas, &s.ov);
        let (root, _) = ov.root().unwrap();
        s.new_file(&root, "f", b"data");
        s.cut("rename");
        let first = std::fs::read_dir(nas.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        let first = first.metadata().unwrap().ino();
        // Placed this time, cut short just after.
        s.cut("getattr");
        let placed = std::fs::metadata(nas.path().join("f")).unwrap().ino();
        eprintln!("hidden file numbers: {first}, then {placed}");
        ov.flush_all(None);
        assert_eq!(names(nas.path()), ["f"]);
        assert_eq!(std::fs::read(nas.path().join("f")).unwrap(), b"data");
        assert_eq!(ov.conflicts.load(Ordering::Relaxed), 0);
    }

    /// A new file renamed away and back after an attempt cut short: its
    /// leftover at that name is cleaned before the file is placed, and
    /// that does not remove the hidden file the new attempt just filled
    /// (the same name: it is the same object's).
    #[test]
    fn a_file_moved_away_and_back_is_placed_past_its_own_leftover() {
        let s = faulty();
        let (nas, ov) = (&s.nas, &s.ov);
        let (root, _) = ov.root().unwrap();
        let a = s.new_file(&root, "n", b"data");
        s.cut("rename");
        let flags = RenameFlags::default();
        ov.rename(&root, OsStr::new("n"), &root, OsStr::new("m"), flags)
            .unwrap();
        ov.rename(&root, OsStr::new("m"), &root, OsStr::new("n"), flags)
            .unwrap();
        assert_eq!(ov.st().leftovers.len(), 1);
        ov.promote_one(a.ino, false).unwrap();
        assert_eq!(names(nas.path()), ["n"]);
        assert_eq!(std::fs::read(nas.path().join("n")).unwrap(), b"data");
        assert_eq!(ov.conflicts.load(Ordering::Relaxed), 0);
    }

    /// A new file renamed here while an attempt fills its hidden file:
    /// the attempt gives up and removes that file, and the leftover
    /// recorded for it goes too (its number, free again, could come back
    /// as another file's at that name).
    #[test]
    fn a_hidden_file_given_up_leaves_no_leftover_record() {
        use crate::backend::instrumented::Fault;
        let s = faulty();
        let (nas, ov) = (&s.nas, &s.ov);
        let (root, _) = ov.root().unwrap();
        let a = s.new_file(&root, "n", b"data");
        s.faults.set(Fault::Stall, Some("write"));
        let r = std::thread::scope(|sc| {
            let t = sc.spawn(|| ov.promote_one(a.ino, false));
            while s.faults.stalled() == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
            ov.rename(
                &root,
                OsStr::new("n"),
                &root,
                OsStr::new("m"),
                RenameFlags::default(),
            )
            .unwrap();
            assert_eq!(ov.st().leftovers.len(), 1);
            s.faults.set(Fault::None, None);
            t.join().unwrap()
        });
        assert_eq!(r.unwrap_err().raw_errno(), libc::EAGAIN);
        assert!(ov.st().leftovers.is_empty());
        assert_eq!(names(nas.path()), Vec::<String>::new());
    }

    /// A name where an attempt cut short left something of ours is free
    /// for a new file (not EEXIST, which `ls` would not explain); the
    /// leftover goes before the file is placed there.
    #[test]
    fn a_new_file_at_a_leftovers_name_takes_it() {
        let (s, b) = leftover_at_b_a();
        let (nas, ov) = (&s.nas, &s.ov);
        let a = s.new_file(&b, "a", b"new");
        // (Not as a pass, which removes leftovers first.)
        ov.promote_one(a.ino, false).unwrap();
        assert_eq!(std::fs::read(nas.path().join("b/a")).unwrap(), b"new");
        assert_eq!(ov.conflicts.load(Ordering::Relaxed), 0);
        assert!(ov.st().leftovers.is_empty());
    }

    /// The same for a rename made on the NAS at once (a file over what
    /// the view shows as no name would otherwise fail with EISDIR).
    #[test]
    fn a_rename_to_a_leftovers_name_removes_it_first() {
        let (s, b) = leftover_at_b_a();
        let (nas, ov) = (&s.nas, &s.ov);
        let (root, _) = ov.root().unwrap();
        ov.rename(
            &root,
            OsStr::new("f"),
            &b,
            OsStr::new("a"),
            RenameFlags::default(),
        )
        .unwrap();
        assert_eq!(std::fs::read(nas.path().join("b/a")).unwrap(), b"f");
        assert_eq!(ov.conflicts.load(Ordering::Relaxed), 0);
        assert!(ov.st().leftovers.is_empty());
    }

    /// A directory made on the NAS by a cut-short attempt, then renamed
    /// here; made again at the new name by an attempt whose answer was
    /// lost; then removed here: both leftovers are removed from the NAS
    /// (the second is not taken for another's by the first's number).
    #[test]
    fn leftovers_of_a_directory_made_twice_are_both_removed() {
        let s = faulty();
        let (nas, ov) = (&s.nas, &s.ov);
        let (root, _) = ov.root().unwrap();
        let (d, _) = ov.mkdir(&root, OsStr::new("d"), 0o755, me()).unwrap();
        ov.setxattr(&d, OsStr::new("user.k"), b"v", 0).unwrap();
        s.cut("setxattr");
        assert_eq!(names(nas.path()), ["d"]);
        ov.rename(
            &root,
            OsStr::new("d"),
            &root,
            OsStr::new("e"),
            RenameFlags::default(),
        )
        .unwrap();
        s.cut("mkdir");
        assert_eq!(names(nas.path()), Vec::<String>::new(), "d removed");
        // d's number is not taken for e's (the NAS may give e another).
        assert_eq!(ov.st().objs.get(&d.ino).and_then(|o| o.nas_ino), None);
        // The NAS made e all the same; its answer was lost.
        std::fs::create_dir(nas.path().join("e")).unwrap();
        ov.rmdir(&root, OsStr::new("e")).unwrap();
        // (As the write-back's next pass does.)
        ov.clean_leftovers();
        assert_eq!(names(nas.path()), Vec::<String>::new(), "e removed");
        assert!(ov.st().leftovers.is_empty());
    }

    /// A directory made here, moved here into another new directory
    /// after the write-back took the chain of directories to make for it
    /// (with the one it was in; a rename waits for a creation on the NAS,
    /// not for the rest of the chain): it goes into the new directory,
    /// made first, with no conflict (not into one made at that path as if
    /// the NAS had lost it, with the new one at the conflict name).
    #[test]
    fn a_new_directory_moved_into_another_after_its_chain_was_taken_goes_there() {
        let s = faulty();
        let (nas, ov) = (&s.nas, &s.ov);
        let (root, _) = ov.root().unwrap();
        let (a, ai) = ov.mkdir(&root, OsStr::new("a"), 0o755, me()).unwrap();
        let (_, b) = ov.mkdir(&a, OsStr::new("b"), 0o755, me()).unwrap();
        let (n, _) = ov.mkdir(&root, OsStr::new("n"), 0o755, me()).unwrap();
        // The chain a, b: a made.
        let _g = ov.replay.write().unwrap();
        ov.promote_one(ai.ino, true).unwrap();
        ov.rename(
            &a,
            OsStr::new("b"),
            &n,
            OsStr::new("b"),
            RenameFlags::default(),
        )
        .unwrap();
        // Then b, as the chain goes on.
        ov.promote_one(b.ino, true).unwrap();
        drop(_g);
        assert_eq!(names(nas.path()), ["a", "n"]);
        assert_eq!(names(&nas.path().join("n")), ["b"]);
        ov.flush_all(None);
        assert_eq!(names(nas.path()), ["a", "n"]);
        assert_eq!(ov.conflicts.load(Ordering::Relaxed), 0);
    }

    /// The same for a further name of a new file, moved into a new
    /// directory after the chain was taken: the directory is made first.
    #[test]
    fn a_link_moved_into_a_new_directory_after_the_chain_was_taken_goes_there() {
        let s = faulty();
        let (nas, ov) = (&s.nas, &s.ov);
        let (root, _) = ov.root().unwrap();
        let (a, ai) = ov.mkdir(&root, OsStr::new("a"), 0o755, me()).unwrap();
        let (fnode, fa, f) = ov
            .create(&root, OsStr::new("f"), 0o644, RW, true, me())
            .unwrap();
        drop(f);
        ov.link(&fnode, &a, OsStr::new("l")).unwrap();
        let (n, _) = ov.mkdir(&root, OsStr::new("n"), 0o755, me()).unwrap();
        let _g = ov.replay.write().unwrap();
        ov.promote_one(ai.ino, true).unwrap();
        ov.rename(
            &a,
            OsStr::new("l"),
            &n,
            OsStr::new("l"),
            RenameFlags::default(),
        )
        .unwrap();
        ov.promote_one(fa.ino, true).unwrap();
        drop(_g);
        assert_eq!(names(nas.path()), ["a", "f", "n"]);
        assert_eq!(names(&nas.path().join("n")), ["l"]);
        assert_eq!(ov.conflicts.load(Ordering::Relaxed), 0);
    }

    /// A new directory made on the NAS under the conflict name (another
    /// client took its name) for a rename into it, the NAS then gone
    /// before that rename: at the next mount the rename goes into it,
    /// not into the other client's directory.
    #[test]
    fn a_rename_into_a_new_directory_given_the_conflict_name_finds_it_after_a_crash() {
        let s = faulty();
        std::fs::create_dir(s.nas.path().join("r")).unwrap();
        std::fs::write(s.nas.path().join("r/f"), b"nas file").unwrap();
        std::fs::write(s.nas.path().join("r/g"), b"g").unwrap();
        let f_ino = ino_of(&s.nas.path().join("r/f"));
        let g_ino = ino_of(&s.nas.path().join("r/g"));
        {
            let ov = &s.ov;
            let (root, _) = ov.root().unwrap();
            let (r, _) = ov.lookup(&root, OsStr::new("r")).unwrap();
            let (x, _) = ov.mkdir(&r, OsStr::new("x"), 0o755, me()).unwrap();
            let (sub, _) = ov.mkdir(&x, OsStr::new("sub"), 0o755, me()).unwrap();
            for (name, to) in [("f", &sub), ("g", &x)] {
                let (n, a) = ov.lookup(&r, OsStr::new(name)).unwrap();
                ov.move_later(
                    (&r, OsStr::new(name)),
                    (to, OsStr::new(name)),
                    (&n, FileKind::File, a.validator()),
                    None,
                    false,
                    SystemTime::now(),
                )
                .unwrap();
            }
        }
        std::fs::create_dir(s.nas.path().join("r/x")).unwrap();
        // The chain x, x/sub made; the NAS gone at the rename.
        s.cut("rename");
        let taken: Vec<String> = names(&s.nas.path().join("r"))
            .into_iter()
            .filter(|n| n.starts_with("x.nassync-conflict-"))
            .collect();
        assert_eq!(taken.len(), 1, "{taken:?}");
        assert_eq!(names(&s.nas.path().join("r").join(&taken[0])), ["sub"]);
        assert_eq!(names(&s.nas.path().join("r")), ["f", "g", "x", &taken[0]]);
        // Write-back, for data written from now on, takes the file to be
        // where its rename goes.
        let pending = s.ov.pending_path(g_ino).unwrap();
        assert_eq!(pending, OsString::from(format!("r/{}/g", taken[0])));
        let Faulty {
            nas, _cache, ov, ..
        } = s;
        drop(ov);
        let s = open(nas, _cache);
        let nas = s.nas.path().join("r");
        assert_eq!(names(&nas), ["x", &taken[0]]);
        assert!(names(&nas.join("x")).is_empty(), "the other client's");
        let moved = nas.join(&taken[0]).join("sub/f");
        assert_eq!(ino_of(&moved), f_ino);
        assert_eq!(ino_of(&nas.join(&taken[0]).join("g")), g_ino);
        assert_eq!(s.ov.flush_all(None), 0);
        let c = s.ov.journal.conflicts(10).unwrap();
        assert_eq!(c.len(), 1, "the name taken, only");
        assert_eq!(std::fs::read(&moved).unwrap(), b"nas file");
    }

    /// The same, and the NAS refuses the rename once the directory is
    /// made: the NAS directory stays where it was, and what was made in it
    /// here is made there, also after a crash (its row comes back with it
    /// from the conflict name, not only from the name taken).
    #[test]
    fn a_refused_rename_into_a_new_directory_given_the_conflict_name_brings_its_rows_back() {
        use crate::backend::instrumented::Fault;
        let s = faulty();
        std::fs::create_dir_all(s.nas.path().join("r/d")).unwrap();
        {
            let ov = &s.ov;
            let (root, _) = ov.root().unwrap();
            let (r, _) = ov.lookup(&root, OsStr::new("r")).unwrap();
            let (d, da) = ov.lookup(&r, OsStr::new("d")).unwrap();
            let (x, _) = ov.mkdir(&r, OsStr::new("x"), 0o755, me()).unwrap();
            ov.move_later(
                (&r, OsStr::new("d")),
                (&x, OsStr::new("d")),
                (&d, FileKind::Dir, da.validator()),
                None,
                false,
                SystemTime::now(),
            )
            .unwrap();
            let (d, _) = ov.lookup(&x, OsStr::new("d")).unwrap();
            s.new_file(&d, "n", b"made in d");
        }
        std::fs::create_dir(s.nas.path().join("r/x")).unwrap();
        s.faults.set(Fault::Fail(libc::EACCES), Some("rename"));
        let _ = s.ov.apply_removals();
        s.faults.set(Fault::None, None);
        let r = s.nas.path().join("r");
        let n = names(&r);
        assert_eq!(n.len(), 3, "{n:?}");
        assert!(n[2].starts_with("x.nassync-conflict-"), "{n:?}");
        let (rows, _) = s.ov.journal.load_objects().unwrap();
        let parents: Vec<_> = rows
            .iter()
            .filter(|o| o.name == "n")
            .map(|o| o.parent.clone())
            .collect();
        assert_eq!(parents, [ObjParent::Nas("r/d".into())]);
        let Faulty {
            nas, _cache, ov, ..
        } = s;
        drop(ov);
        let s = open(nas, _cache);
        assert_eq!(s.ov.flush_all(None), 0);
        let r = s.nas.path().join("r");
        assert_eq!(std::fs::read(r.join("d/n")).unwrap(), b"made in d");
        assert!(
            names(&r.join(&n[2])).is_empty(),
            "{:?}",
            names(&r.join(&n[2]))
        );
    }

    #[test]
    fn what_is_removed_before_it_reached_the_nas_never_does() {
        let s = setup();
        let (root, _) = s.ov.root().unwrap();
        let (d, _) = s.ov.mkdir(&root, OsStr::new("tmp"), 0o755, me()).unwrap();
        let (_, _, f) =
            s.ov.create(&d, OsStr::new("a"), 0o644, RW, true, me())
                .unwrap();
        s.ov.write(&f, 0, b"x").unwrap();
        s.ov.rename(
            &d,
            OsStr::new("a"),
            &root,
            OsStr::new("b"),
            RenameFlags::default(),
        )
        .unwrap();
        assert_eq!(
            s.ov.rmdir(&root, OsStr::new("tmp"))
                .map_err(|e| e.raw_errno())
                .err(),
            None
        );
        s.ov.unlink(&root, OsStr::new("b")).unwrap();
        assert_eq!(s.ov.pending_count(), 0);
        assert_eq!(s.ov.flush_all(None), 0);
        assert!(names(s.nas.path()).is_empty());
        assert!(names(&s.cache.path().join("upper")).is_empty());
    }

    #[test]
    fn a_directory_with_new_objects_is_not_empty() {
        let s = setup();
        std::fs::create_dir(s.nas.path().join("old")).unwrap();
        let (root, _) = s.ov.root().unwrap();
        let (old, _) = s.ov.lookup(&root, OsStr::new("old")).unwrap();
        s.ov.create(&old, OsStr::new("new"), 0o644, RW, true, me())
            .unwrap();
        let e = |r: BResult<()>| r.map_err(|e| e.raw_errno()).err();
        assert_eq!(
            e(s.ov.rmdir(&root, OsStr::new("old"))),
            Some(libc::ENOTEMPTY)
        );
        s.ov.mkdir(&root, OsStr::new("other"), 0o755, me()).unwrap();
        let flags = RenameFlags::default();
        assert_eq!(
            e(s.ov.rename(&root, OsStr::new("other"), &root, OsStr::new("old"), flags)),
            Some(libc::ENOTEMPTY)
        );
    }

    #[test]
    fn a_name_taken_on_the_nas_meanwhile_gets_the_conflict_name() {
        let s = setup();
        let (root, _) = s.ov.root().unwrap();
        let (_, _, f) =
            s.ov.create(&root, OsStr::new("r.txt"), 0o644, RW, true, me())
                .unwrap();
        s.ov.write(&f, 0, b"mine").unwrap();
        std::fs::write(s.nas.path().join("r.txt"), b"theirs").unwrap();
        assert_eq!(s.ov.flush_all(None), 0);
        let n = names(s.nas.path());
        assert_eq!(n.len(), 2, "{n:?}");
        assert!(
            n[0].starts_with("r.nassync-conflict-") && n[0].ends_with("-host.txt"),
            "{n:?}"
        );
        assert_eq!(std::fs::read(s.nas.path().join(&n[0])).unwrap(), b"mine");
        assert_eq!(
            std::fs::read(s.nas.path().join("r.txt")).unwrap(),
            b"theirs"
        );
        assert_eq!(s.ov.counters().1, 1);
    }

    #[test]
    fn new_objects_are_taken_up_again_from_the_journal() {
        let s = setup();
        std::fs::create_dir(s.nas.path().join("share")).unwrap();
        {
            let (root, _) = s.ov.root().unwrap();
            let (share, _) = s.ov.lookup(&root, OsStr::new("share")).unwrap();
            let (d, _) = s.ov.mkdir(&share, OsStr::new("d"), 0o700, me()).unwrap();
            let (_, _, f) =
                s.ov.create(&d, OsStr::new("f"), 0o600, RW, true, me())
                    .unwrap();
            s.ov.write(&f, 0, b"kept").unwrap();
            s.ov.sync_namespace(&d).unwrap();
        }
        let Setup { nas, cache, ov } = s;
        drop(ov);
        let s = open(nas, cache);
        assert_eq!(s.ov.pending_count(), 2);
        let (root, _) = s.ov.root().unwrap();
        let (share, _) = s.ov.lookup(&root, OsStr::new("share")).unwrap();
        let (d, _) = s.ov.lookup(&share, OsStr::new("d")).unwrap();
        let (f, _) = s.ov.lookup(&d, OsStr::new("f")).unwrap();
        let file = s.ov.open(&f, RW).unwrap();
        let mut buf = [0u8; 8];
        let n = s.ov.read(&file, 0, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"kept");
        assert_eq!(s.ov.flush_all(None), 0);
        assert_eq!(
            std::fs::read(s.nas.path().join("share/d/f")).unwrap(),
            b"kept"
        );
    }

    fn ino_of(p: &std::path::Path) -> u64 {
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap())
    }

    /// A hard link to a new file is a local name too: shown as the file,
    /// made on the NAS with it, one inode with both names there.
    #[test]
    fn hard_links_to_new_files_stay_local_and_land_together() {
        let s = setup();
        let (root, _) = s.ov.root().unwrap();
        let (d, _) = s.ov.mkdir(&root, OsStr::new("d"), 0o755, me()).unwrap();
        let (f, fa, file) =
            s.ov.create(&root, OsStr::new("f"), 0o640, RW, true, me())
                .unwrap();
        s.ov.write(&file, 0, b"shared").unwrap();
        let a = s.ov.link(&f, &d, OsStr::new("g")).unwrap();
        assert_eq!((a.ino, a.nlink), (fa.ino, 2));
        assert_eq!(
            s.ov.link(&f, &d, OsStr::new("g"))
                .map_err(|e| e.raw_errno())
                .err(),
            Some(libc::EEXIST)
        );
        let (g, ga) = s.ov.lookup(&d, OsStr::new("g")).unwrap();
        assert_eq!((g.ino, ga.nlink), (fa.ino, 2));
        let listed = s.ov.readdir(&d).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].ino, fa.ino);
        assert!(names(s.nas.path()).is_empty(), "nothing on the NAS yet");
        // A rename of one name over the other changes nothing (POSIX).
        s.ov.rename(
            &d,
            OsStr::new("g"),
            &root,
            OsStr::new("f"),
            RenameFlags::default(),
        )
        .unwrap();
        assert!(s.ov.lookup(&d, OsStr::new("g")).is_ok());

        assert_eq!(s.ov.flush_all(None), 0);
        let (p1, p2) = (s.nas.path().join("f"), s.nas.path().join("d/g"));
        assert_eq!(std::fs::read(&p2).unwrap(), b"shared");
        assert_eq!(ino_of(&p1), ino_of(&p2));
        let after = s.ov.getattr(&f).unwrap();
        assert_eq!((after.ino, after.nlink), (fa.ino, 2));
        let (_, by_name) = s.ov.lookup(&d, OsStr::new("g")).unwrap();
        assert_eq!(by_name.ino, fa.ino);
        assert_eq!(s.ov.pending_count(), 0);
    }

    /// A new file on the NAS that nothing holds any more is let go (its
    /// NAS node is a descriptor); it is found again by name, under the
    /// same inode number. What is still held, open, or a directory stays.
    #[test]
    fn a_new_file_on_the_nas_is_let_go_once_forgotten() {
        let s = setup();
        let (root, _) = s.ov.root().unwrap();
        let (d, da) = s.ov.mkdir(&root, OsStr::new("d"), 0o755, me()).unwrap();
        let (f, fa, file) =
            s.ov.create(&d, OsStr::new("f"), 0o640, RW, true, me())
                .unwrap();
        s.ov.write(&file, 0, b"content").unwrap();
        let (g, _, open) =
            s.ov.create(&d, OsStr::new("g"), 0o640, RW, true, me())
                .unwrap();
        // Not on the NAS yet: kept whatever the kernel does.
        s.ov.forget(&f);
        assert!(s.ov.st().objs.contains_key(&fa.ino));
        drop(file);
        assert_eq!(s.ov.flush_all(None), 0);
        let held = |ino: u64| s.ov.st().objs.contains_key(&ino);
        assert!(held(fa.ino) && held(g.ino) && held(da.ino));
        s.ov.forget(&f);
        s.ov.forget(&g); // still open
        s.ov.forget(&d); // a directory
        assert!(!held(fa.ino));
        assert!(held(g.ino) && held(da.ino));
        let (f2, a2) = s.ov.lookup(&d, OsStr::new("f")).unwrap();
        assert_eq!((f2.ino, a2.ino, a2.size), (fa.ino, fa.ino, 7));
        assert_eq!(s.ov.getattr(&f2).unwrap().ino, fa.ino);
        let listed = s.ov.readdir(&d).unwrap();
        assert!(listed.iter().any(|e| e.name == "f" && e.ino == fa.ino));
        drop(open);
        s.ov.forget(&g);
        assert!(!held(g.ino));
    }

    /// The file lives on under its other name when its first is removed;
    /// a removed link takes only its name; both survive a restart.
    #[test]
    fn a_new_file_keeps_its_content_under_its_last_name() {
        let s = setup();
        {
            let (root, _) = s.ov.root().unwrap();
            let (f, fa, file) =
                s.ov.create(&root, OsStr::new("a"), 0o600, RW, true, me())
                    .unwrap();
            s.ov.write(&file, 0, b"kept").unwrap();
            s.ov.link(&f, &root, OsStr::new("b")).unwrap();
            s.ov.link(&f, &root, OsStr::new("c")).unwrap();
            s.ov.unlink(&root, OsStr::new("a")).unwrap();
            s.ov.unlink(&root, OsStr::new("c")).unwrap();
            let (b, ba) = s.ov.lookup(&root, OsStr::new("b")).unwrap();
            assert_eq!((b.ino, ba.nlink), (fa.ino, 1));
            s.ov.link(&f, &root, OsStr::new("e")).unwrap();
            s.ov.sync_namespace(&root).unwrap();
        }
        let Setup { nas, cache, ov } = s;
        drop(ov);
        let s = open(nas, cache);
        assert_eq!(s.ov.pending_count(), 2);
        let (root, _) = s.ov.root().unwrap();
        let (b, ba) = s.ov.lookup(&root, OsStr::new("b")).unwrap();
        let (e, _) = s.ov.lookup(&root, OsStr::new("e")).unwrap();
        assert_eq!((b.ino, ba.nlink), (e.ino, 2));
        for gone in ["a", "c"] {
            assert!(s.ov.lookup(&root, OsStr::new(gone)).is_err(), "{gone}");
        }
        let file = s.ov.open(&e, RW).unwrap();
        let mut buf = [0u8; 8];
        let n = s.ov.read(&file, 0, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"kept");
        drop(file);
        assert_eq!(s.ov.flush_all(None), 0);
        assert_eq!(names(s.nas.path()), ["b", "e"]);
        assert_eq!(std::fs::read(s.nas.path().join("b")).unwrap(), b"kept");
        assert_eq!(
            ino_of(&s.nas.path().join("b")),
            ino_of(&s.nas.path().join("e"))
        );
    }
}
