//! Write-back: writes land in local files at local disk speed and reach the
//! NAS later, in the background, as deltas, through a crash-safe journal
//! ([`journal`]).
//!
//! Each file with pending changes is a [`Dirty`]: its journal row, the
//! local file holding its changed bytes (`pending/<fid>`), and where it is
//! in write-back. The local content of a dirty file is, byte by byte: the
//! changed bytes where it was written, zeros where it was truncated and
//! not written since, and the base version (the NAS version the changes
//! started from, read through the block caches) elsewhere.
//!
//! Write-back of one file, an explicit state machine ([`Phase`]):
//! `Waiting` (changes pending, `writeback_delay` after the last change it
//! becomes due) -> `Applying` (one attempt: snapshot the changed ranges,
//! check the NAS file is still the base version, write the ranges into it,
//! set its size and mtime, fsync, adopt the new NAS version as the base)
//! -> removed when nothing changed meanwhile, else `Waiting` again. A
//! failed attempt goes to `Retry` (backoff, the error shown in status); a
//! NAS file that is no longer the base version is a conflict: the local
//! version is written beside it under a conflict name, and the file is
//! settled. Changes made during an attempt are kept for the next one.
//!
//! Lock order: a `Dirty`'s lock, then the journal's. The `files` map lock
//! is never held while taking a `Dirty`'s lock for long, nor across a NAS
//! call; NAS calls are made with no lock held.

pub mod delta;
pub mod journal;
mod pending;
pub mod ranges;

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::backend::{
    Attr, BResult, Backend, BackendError, Creds, OpenMode, SetAttr, SetTime, Validator,
};
use crate::cache::CacheError;
use crate::data::{DataCache, FetchFn, FileData};
use crate::error::{FsError, FsResult};
use journal::{ConflictRecord, DataRecord, Journal, RowState};
use ranges::RangeSet;

/// How write-back behaves.
#[derive(Clone, Debug)]
pub struct WbConfig {
    /// A file is written back this long after its last change.
    pub delay: Duration,
    /// Writers wait while more bytes than this are pending.
    pub max_dirty: u64,
    /// This machine's name, for conflict file names.
    pub host: String,
}

/// Where one dirty file is in write-back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    Waiting,
    Applying,
    /// The last attempt failed; the next one is not before `at`.
    Retry {
        at: Instant,
    },
}

/// What the core knows of a file when it first changes.
pub struct Start<B: Backend> {
    pub fuse_ino: u64,
    pub node: B::Node,
    pub path: OsString,
    pub base: Validator,
    pub data: Arc<FileData>,
    /// Permission bits, uid and gid.
    pub owner: (u16, u32, u32),
    /// Link count.
    pub nlink: u32,
}

struct DirtyInner<B: Backend> {
    rec: DataRecord,
    ctime: SystemTime,
    node: Option<B::Node>,
    phase: Phase,
    /// The ranges an attempt is writing: still read from `pending`.
    applying: RangeSet,
    /// The smallest size since the attempt's snapshot.
    trunc_live: u64,
    last_change: Instant,
    /// Written back as soon as possible (a flush asked for it).
    due: bool,
    attempts: u32,
    last_error: Option<String>,
    /// Its last name was removed: nothing to write back; kept only while
    /// open.
    orphan: bool,
    /// Removals of a name of it by nassync under way (see
    /// [`WriteBack::unlinking`]).
    unlinking: u32,
    /// `pending/` was fsynced since this file's pending file was created.
    dir_synced: bool,
    /// The in-memory state is newer than the journal row.
    row_stale: bool,
    /// No longer in `files`: whoever holds it must look again.
    removed: bool,
    /// The errno of the last failure.
    last_errno: i32,
    /// When the NAS last refused an attempt (EPERM, EACCES, EROFS): a
    /// flush does not wait for a retry refused again.
    refused_at: Option<Instant>,
    /// [`WriteBack::meta_clock`] when `rec.base` was read from the NAS
    /// (0: unknown).
    base_clock: u64,
}

impl<B: Backend> DirtyInner<B> {
    fn weight(&self) -> u64 {
        self.rec.ranges.bytes() + self.applying.bytes()
    }

    /// The permission bits, uid and gid set here and not on the NAS yet.
    fn owner_to_set(&self) -> Option<(u16, u32, u32)> {
        self.rec.owner.filter(|_| self.rec.owner_here)
    }

    /// The row as it must be on disk: every range not yet on the NAS.
    fn row(&self) -> DataRecord {
        let mut r = self.rec.clone();
        if !self.applying.is_empty() {
            r.ranges.union(&self.applying);
        }
        r
    }
}

/// One file with changes not yet on the NAS.
pub struct Dirty<B: Backend> {
    nas_ino: u64,
    fuse_ino: u64,
    data: Arc<FileData>,
    inner: Mutex<DirtyInner<B>>,
}

impl<B: Backend> Dirty<B> {
    fn lock(&self) -> MutexGuard<'_, DirtyInner<B>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The attributes a dirty file shows instead of the NAS's.
#[derive(Clone, Copy, Debug)]
pub struct LocalAttr {
    pub size: u64,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// Permission bits, uid and gid set here, not on the NAS yet.
    pub owner: Option<(u16, u32, u32)>,
    pub atime: Option<SystemTime>,
}

impl LocalAttr {
    fn of<B: Backend>(g: &DirtyInner<B>) -> LocalAttr {
        LocalAttr {
            size: g.rec.size,
            mtime: g.rec.mtime,
            ctime: g.ctime,
            owner: g.owner_to_set(),
            atime: g.rec.atime,
        }
    }

    pub fn apply(&self, a: &mut Attr) {
        a.size = self.size;
        a.mtime = self.mtime;
        a.ctime = self.ctime;
        a.blocks = a.blocks.max(self.size.div_ceil(512));
        if let Some((perm, uid, gid)) = self.owner {
            (a.perm, a.uid, a.gid) = (perm, uid, gid);
        }
        if let Some(t) = self.atime {
            a.atime = t;
        }
    }
}

/// The namespace changes kept locally (`backend::overlay`): flushed,
/// counted and shown together with the data.
pub trait Staged: Send + Sync {
    /// Puts them on the NAS now; returns how many are left.
    fn flush(&self, deadline: Option<Instant>) -> usize;
    /// Finishes what waits on objects already placed (the final mode and
    /// times of directories made on the NAS).
    fn settle(&self);
    fn pending(&self) -> Vec<PendingInfo>;
    /// How many of `pending()` are under `prefix`, without listing them:
    /// a flush asks after each file that lands.
    fn pending_under(&self, prefix: Option<&OsStr>) -> u64;
    /// Conflicts found since the mount.
    fn conflicts(&self) -> u64;
    /// Attempts that failed (and will be retried) since the mount.
    fn retries(&self) -> u64;
    fn stop(&self);
    /// How to ask whether a file (by the number it has here) has data
    /// still to write back: a new file then waits for it, and reaches
    /// the NAS with it in one go.
    fn watch_data(&self, pending: Box<dyn Fn(u64) -> bool + Send + Sync>);
    /// How to tell write-back that nassync itself is about to move the
    /// ctime of a file on the NAS (a rename made here while the NAS did
    /// not answer, applied there: see [`WriteBack::own_meta_op`]), and
    /// then its attributes after (see [`WriteBack::meta_changed`]).
    fn watch_own_meta(&self, _own: OwnMeta) {}
    /// How to tell write-back that a file it may know by path is now
    /// under another one (`renamed`: a rename made here got the conflict
    /// name on the NAS).
    fn watch_moved(&self, _moved: Moved) {}
}

/// See [`WriteBack::own_ctime`].
pub type OwnCtime = Box<dyn Fn(u64, &Attr) + Send + Sync>;

/// See [`Staged::watch_own_meta`].
pub type OwnMeta = Box<dyn Fn(u64, Option<&Attr>) + Send + Sync>;
/// See [`Staged::watch_moved`].
pub type Moved = Box<dyn Fn(&OsStr, &OsStr) + Send + Sync>;

/// One pending file, for `nassync status`.
#[derive(Clone, Debug)]
pub struct PendingInfo {
    /// A new object, not on the NAS yet, and its kind.
    pub new: Option<&'static str>,
    /// An object on the NAS removed here, not there yet, and its kind.
    pub removed: Option<&'static str>,
    /// An object on the NAS renamed here, not there yet: its kind and new
    /// path (`path` is the old one), and whether it is a hard link made
    /// there (the object keeping its name) rather than a rename.
    pub moved: Option<(&'static str, OsString, bool)>,
    /// An object on the NAS whose attributes were set here, not there
    /// yet, and its kind (a file's go with its data instead).
    pub attrs: Option<&'static str>,
    pub path: OsString,
    pub bytes: u64,
    pub age: Duration,
    pub phase: &'static str,
    pub attempts: u32,
    pub error: Option<String>,
}

#[derive(Default)]
struct Counters {
    written_bytes: AtomicU64,
    files_written: AtomicU64,
    retries: AtomicU64,
    conflicts: AtomicU64,
}

struct Sched {
    kick: bool,
    stop: bool,
}

/// See the module documentation.
/// Dirty files that keep their NAS node at most: a node of a directory
/// source is an open descriptor. The others are found by their path at
/// write-back, as after a restart.
const NODES_MAX: usize = 256;

pub struct WriteBack<B: Backend> {
    /// Dirty files holding their node (see [`NODES_MAX`]).
    nodes_held: AtomicUsize,
    /// The pending files of `files`, opened when used.
    pfiles: pending::PendingFiles,
    backend: Arc<B>,
    journal: Arc<Journal>,
    staged: std::sync::OnceLock<Arc<dyn Staged>>,
    /// Told when a change kept for later and made on the NAS since moved
    /// a file's ctime (shown inode number, its NAS attributes after).
    own_ctime: std::sync::OnceLock<OwnCtime>,
    data: Arc<DataCache>,
    cfg: WbConfig,
    files: Mutex<HashMap<u64, Arc<Dirty<B>>>>,
    dirty_bytes: AtomicU64,
    sched: Mutex<Sched>,
    wake: Condvar,
    /// Notified whenever a write-back attempt ends.
    progress: Condvar,
    progress_lock: Mutex<()>,
    counters: Counters,
    /// NAS inode numbers whose local attributes the core must drop
    /// (the file settled); `settled_any` says whether there are some.
    settled: Mutex<Vec<u64>>,
    settled_any: AtomicBool,
    /// Files whose last name was removed through the mount while open and
    /// with nothing pending: what is written to them until the last close
    /// has nowhere to go (never restored on the NAS as a file "removed
    /// there").
    gone_here: Mutex<HashSet<u64>>,
    settle_count: AtomicU64,
    /// The NAS inode number -> FUSE inode number mapping of the core.
    fuse_ino: Box<dyn Fn(u64) -> u64 + Send + Sync>,
    /// Counts nassync's own metadata changes on the NAS (rename, chmod,
    /// link, xattrs), which move a file's ctime; `own_meta` holds the
    /// count at the last one per file.
    meta_clock: AtomicU64,
    own_meta: Mutex<HashMap<u64, u64>>,
}

fn cache_err(e: CacheError) -> FsError {
    FsError::Cache(e)
}

fn io_err(e: std::io::Error) -> FsError {
    FsError::Cache(CacheError::Io(e))
}

impl<B: Backend> WriteBack<B> {
    /// Opens the journal in `dir` and takes up the changes it holds: they
    /// are part of the local view at once and are written back as usual.
    pub fn open(
        journal: Arc<Journal>,
        backend: Arc<B>,
        data: Arc<DataCache>,
        cfg: WbConfig,
        fuse_ino: Box<dyn Fn(u64) -> u64 + Send + Sync>,
    ) -> Result<Arc<WriteBack<B>>, CacheError> {
        let dir = journal.dir().to_path_buf();
        let dir = dir.as_path();
        let records = journal.load_data()?;
        let wb = Arc::new(WriteBack {
            backend,
            pfiles: pending::PendingFiles::new(journal.pending_dir()),
            nodes_held: AtomicUsize::new(0),
            journal,
            staged: std::sync::OnceLock::new(),
            own_ctime: std::sync::OnceLock::new(),
            data,
            cfg,
            files: Mutex::new(HashMap::new()),
            dirty_bytes: AtomicU64::new(0),
            sched: Mutex::new(Sched {
                kick: false,
                stop: false,
            }),
            wake: Condvar::new(),
            progress: Condvar::new(),
            progress_lock: Mutex::new(()),
            counters: Counters::default(),
            settled: Mutex::new(Vec::new()),
            settled_any: AtomicBool::new(false),
            gone_here: Mutex::new(HashSet::new()),
            settle_count: AtomicU64::new(0),
            fuse_ino,
            meta_clock: AtomicU64::new(1),
            own_meta: Mutex::new(HashMap::new()),
        });
        let mut known = std::collections::HashSet::new();
        for rec in records {
            let path = wb.journal.pending_path(rec.fid);
            // Made empty if missing; not kept open (see `pending`).
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)?;
            known.insert(path);
            let fuse_ino = (wb.fuse_ino)(rec.nas_ino);
            let fd = Arc::new(FileData::default());
            // The cached blocks must be the base's, or none; after an
            // interrupted attempt, blocks cached while it wrote may be
            // neither.
            let setup = |e: FsError| CacheError::Setup {
                path: dir.display().to_string(),
                reason: e.to_string(),
            };
            wb.data
                .revalidate(fuse_ino, &fd, &rec.base)
                .map_err(setup)?;
            if rec.state == RowState::Applying {
                wb.data
                    .replaced(fuse_ino, &fd, &[(0, u64::MAX)], &rec.base)
                    .map_err(setup)?;
            }
            log::info!(
                "journal: {} bytes of {:?} still to write back",
                rec.ranges.bytes(),
                rec.path
            );
            log::debug!(
                "journal row {}: size {} trunc {} base size {} state {:?} ranges {:?}",
                rec.fid,
                rec.size,
                rec.trunc,
                rec.base.size,
                rec.state,
                rec.ranges.iter().collect::<Vec<_>>()
            );
            let d = Dirty {
                nas_ino: rec.nas_ino,
                fuse_ino,
                data: fd,
                inner: Mutex::new(DirtyInner {
                    ctime: rec.mtime,
                    trunc_live: rec.size,
                    rec,
                    node: None,
                    phase: Phase::Waiting,
                    applying: RangeSet::new(),
                    last_change: Instant::now(),
                    due: true,
                    attempts: 0,
                    last_error: None,
                    orphan: false,
                    unlinking: 0,
                    dir_synced: true,
                    row_stale: false,
                    removed: false,
                    last_errno: 0,
                    refused_at: None,
                    base_clock: 0,
                }),
            };
            wb.dirty_bytes
                .fetch_add(d.lock().weight(), Ordering::Relaxed);
            wb.files_lock().insert(d.nas_ino, Arc::new(d));
        }
        // Pending files of changes that were never journaled (a crash
        // before the first commit): nothing refers to them.
        if let Ok(entries) = std::fs::read_dir(wb.journal.pending_dir()) {
            for e in entries.flatten() {
                if !known.contains(&e.path()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(wb)
    }

    /// The namespace changes to flush and show with the data.
    pub fn set_staged(self: &Arc<Self>, s: Arc<dyn Staged>) {
        let wb = Arc::downgrade(self);
        s.watch_data(Box::new(move |ino| {
            wb.upgrade().is_some_and(|wb| wb.is_dirty(ino))
        }));
        let wb = Arc::downgrade(self);
        s.watch_own_meta(Box::new(move |ino, attr| {
            if let Some(wb) = wb.upgrade() {
                match attr {
                    None => wb.own_meta_op(ino),
                    Some(a) => {
                        wb.meta_changed(ino, a);
                        if let Some(f) = wb.own_ctime.get() {
                            f(ino, a);
                        }
                    }
                }
            }
        }));
        let wb = Arc::downgrade(self);
        s.watch_moved(Box::new(move |old, new| {
            if let Some(wb) = wb.upgrade() {
                wb.renamed(old, new);
            }
        }));
        let _ = self.staged.set(s);
    }

    /// See [`WriteBack::own_ctime`].
    pub fn on_own_ctime(&self, f: OwnCtime) {
        let _ = self.own_ctime.set(f);
    }

    fn staged_under(&self, prefix: Option<&OsStr>) -> u64 {
        self.staged.get().map_or(0, |s| s.pending_under(prefix))
    }

    /// Starts the write-back thread.
    pub fn start(self: &Arc<Self>) -> std::io::Result<std::thread::JoinHandle<()>> {
        let wb = self.clone();
        std::thread::Builder::new()
            .name("writeback".into())
            .spawn(move || wb.run())
    }

    fn files_lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<Dirty<B>>>> {
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, nas_ino: u64) -> Option<Arc<Dirty<B>>> {
        self.files_lock().get(&nas_ino).cloned()
    }

    pub fn is_dirty(&self, nas_ino: u64) -> bool {
        self.files_lock().contains_key(&nas_ino)
    }

    /// The local attributes of a dirty file.
    pub fn local_attr(&self, nas_ino: u64) -> Option<LocalAttr> {
        let d = self.get(nas_ino)?;
        let g = d.lock();
        Some(LocalAttr::of(&g))
    }

    /// Whether a dirty file has a mode or owner set here that the NAS
    /// does not have yet: later changes of them are made here too, in
    /// order.
    pub fn owner_here(&self, nas_ino: u64) -> bool {
        self.get(nas_ino).is_some_and(|d| d.lock().rec.owner_here)
    }

    /// The NAS version a dirty file's changes started from; None also
    /// when an attempt may have written part of them there (the NAS's
    /// version is then not known).
    pub fn base(&self, nas_ino: u64) -> Option<Option<Validator>> {
        let d = self.get(nas_ino)?;
        let g = d.lock();
        let unsure = g.rec.state == RowState::Applying || g.phase == Phase::Applying;
        Some((!unsure).then_some(g.rec.base))
    }

    /// The cache state a dirty file's base blocks are kept under.
    pub fn file_data(&self, nas_ino: u64) -> Option<Arc<FileData>> {
        self.get(nas_ino).map(|d| d.data.clone())
    }

    /// NAS inode numbers of files that stopped being dirty since the last
    /// call: their attributes are the NAS's again.
    pub fn take_settled(&self) -> Vec<u64> {
        if !self.settled_any.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut *self.settled.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Conflicts found since the mount, data and namespace: each makes
    /// the NAS show what the mount's cached listings do not (a conflict
    /// copy, an object kept there).
    pub fn conflict_count(&self) -> u64 {
        let staged = self.staged.get().map_or(0, |s| s.conflicts());
        self.counters.conflicts.load(Ordering::Relaxed) + staged
    }

    /// Counts files that stopped being dirty.
    pub fn settle_gen(&self) -> u64 {
        self.settle_count.load(Ordering::Acquire)
    }

    fn settle(&self, nas_ino: u64) {
        self.settle_count.fetch_add(1, Ordering::AcqRel);
        self.settled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(nas_ino);
        self.settled_any.store(true, Ordering::Release);
    }

    fn get_or_start(
        &self,
        nas_ino: u64,
        start: &dyn Fn() -> FsResult<Start<B>>,
    ) -> FsResult<Arc<Dirty<B>>> {
        if let Some(d) = self.get(nas_ino) {
            return Ok(d);
        }
        let s = start()?;
        // The cached blocks are the base's from now on.
        self.data.revalidate(s.fuse_ino, &s.data, &s.base)?;
        let mut files = self.files_lock();
        if let Some(d) = files.get(&nas_ino) {
            return Ok(d.clone());
        }
        let now = SystemTime::now();
        let mut rec = DataRecord {
            fid: 0,
            nas_ino,
            path: s.path,
            path2: None,
            base: s.base,
            state: RowState::Pending,
            size: s.base.size,
            trunc: s.base.size,
            mtime: s.base.mtime,
            ranges: RangeSet::new(),
            created: now,
            owner: Some(s.owner),
            owner_here: false,
            atime: None,
        };
        rec.fid = self.journal.insert_data(&rec).map_err(cache_err)?;
        self.pfiles.create(rec.fid).map_err(|e| {
            let _ = self.journal.delete(rec.fid);
            io_err(e)
        })?;
        let d = Arc::new(Dirty {
            nas_ino,
            fuse_ino: s.fuse_ino,
            data: s.data,
            inner: Mutex::new(DirtyInner {
                ctime: s.base.ctime,
                trunc_live: rec.size,
                rec,
                node: self.hold_node(s.node, s.nlink > 1),
                phase: Phase::Waiting,
                applying: RangeSet::new(),
                last_change: Instant::now(),
                due: false,
                attempts: 0,
                last_error: None,
                orphan: false,
                unlinking: 0,
                dir_synced: false,
                row_stale: false,
                removed: false,
                last_errno: 0,
                refused_at: None,
                base_clock: 0,
            }),
        });
        if self.gone_here_lock().contains(&nas_ino) {
            let mut g = d.lock();
            g.orphan = true;
            if let Err(e) = self.journal.delete(g.rec.fid) {
                log::warn!("journal: cannot drop the row of a removed file: {e}");
            }
        }
        files.insert(nas_ino, d.clone());
        Ok(d)
    }

    /// `n`, to keep in a dirty file, if fewer than [`NODES_MAX`] are kept
    /// or it must be (`always`: a file with several links, whose path may
    /// name a link removed here since).
    fn hold_node(&self, n: B::Node, always: bool) -> Option<B::Node> {
        let held = self
            .nodes_held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                (always || h < NODES_MAX).then_some(h + 1)
            });
        held.is_ok().then_some(n)
    }

    fn release_node(&self, g: &mut DirtyInner<B>) {
        if g.node.take().is_some() {
            self.nodes_held.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn gone_here_lock(&self) -> MutexGuard<'_, HashSet<u64>> {
        self.gone_here.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn account(&self, before: u64, after: u64) {
        if after >= before {
            self.dirty_bytes
                .fetch_add(after - before, Ordering::Relaxed);
        } else {
            // Saturating: a miscount must never wrap into "everything is
            // pending", which would hold every writer forever.
            let _ = self
                .dirty_bytes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v.saturating_sub(before - after))
                });
        }
    }

    /// Writes `data` at `offset` (at the end, for `append`) into the local
    /// view of a file; returns the offset written at and the new attributes.
    pub fn write(
        &self,
        nas_ino: u64,
        start: &dyn Fn() -> FsResult<Start<B>>,
        offset: u64,
        data: &[u8],
        append: bool,
    ) -> FsResult<LocalAttr> {
        let attr = loop {
            let d = self.get_or_start(nas_ino, start)?;
            let mut g = d.lock();
            if g.removed {
                continue; // settled meanwhile: start again from the NAS's
            }
            let before = g.weight();
            let at = if append { g.rec.size } else { offset };
            let end = at
                .checked_add(data.len() as u64)
                .ok_or(FsError::Invalid("write past the largest offset"))?;
            self.fits("write", end)?;
            let file = self.pfiles.get(g.rec.fid).map_err(io_err)?;
            file.write_all_at(data, at).map_err(io_err)?;
            g.rec.ranges.insert(at, end);
            g.rec.size = g.rec.size.max(end);
            self.changed(&mut g);
            self.account(before, g.weight());
            break LocalAttr::of(&g);
        };
        self.throttle();
        Ok(attr)
    }

    fn changed(&self, g: &mut DirtyInner<B>) {
        let now = crate::clock::now();
        g.rec.mtime = now;
        g.ctime = now;
        g.last_change = Instant::now();
        g.row_stale = true;
    }

    /// A file may not grow past what the NAS can hold: that would be
    /// accepted here and fail at every write-back.
    fn fits(&self, op: &'static str, end: u64) -> FsResult<()> {
        if end > self.backend.max_file_size() {
            return Err(BackendError::errno(op, libc::EFBIG).into());
        }
        Ok(())
    }

    /// Sets the local size of a file (truncate or extend).
    pub fn truncate(
        &self,
        nas_ino: u64,
        start: &dyn Fn() -> FsResult<Start<B>>,
        size: u64,
    ) -> FsResult<LocalAttr> {
        self.fits("truncate", size)?;
        let d = loop {
            let d = self.get_or_start(nas_ino, start)?;
            if !d.lock().removed {
                break d;
            }
        };
        let mut g = d.lock();
        if g.removed {
            drop(g);
            return self.truncate(nas_ino, start, size);
        }
        let before = g.weight();
        if size < g.rec.size {
            g.rec.ranges.truncate(size);
            g.applying.truncate(size);
            g.rec.trunc = g.rec.trunc.min(size);
            g.trunc_live = g.trunc_live.min(size);
        }
        g.rec.size = size;
        self.changed(&mut g);
        self.account(before, g.weight());
        Ok(LocalAttr::of(&g))
    }

    /// Sets attributes of a file in its local view, to set on the NAS
    /// with its data: the permission bits, uid and gid (`owner`), and
    /// times. For a chmod, chown or utimensat while the NAS does not
    /// answer.
    pub fn set_attrs(
        &self,
        nas_ino: u64,
        start: &dyn Fn() -> FsResult<Start<B>>,
        owner: Option<(u16, u32, u32)>,
        atime: Option<SystemTime>,
        mtime: Option<SystemTime>,
    ) -> FsResult<LocalAttr> {
        loop {
            let d = self.get_or_start(nas_ino, start)?;
            let mut g = d.lock();
            if g.removed {
                continue; // settled meanwhile: start again from the NAS's
            }
            if let Some(o) = owner {
                g.rec.owner = Some(o);
                g.rec.owner_here = true;
            }
            if let Some(t) = atime {
                g.rec.atime = Some(t);
            }
            if let Some(t) = mtime {
                g.rec.mtime = t;
            }
            g.ctime = crate::clock::now();
            g.last_change = Instant::now();
            // No fsync follows a chmod: the row says it at once.
            g.row_stale = self.journal.update_data(&g.row()).is_err();
            return Ok(LocalAttr::of(&g));
        }
    }

    /// nassync itself changed a dirty file's metadata on the NAS (chmod,
    /// link, rename...), which changed its ctime: if nothing else changed,
    /// the new ctime is still the base version, not someone else's change.
    pub fn meta_changed(&self, nas_ino: u64, attr: &Attr) {
        let Some(d) = self.get(nas_ino) else { return };
        let mut g = d.lock();
        // The operation changed the file's ctime: the local view shows it.
        g.ctime = g.ctime.max(attr.ctime);
        let owner = Some((attr.perm, attr.uid, attr.gid));
        if attr.ino == g.rec.base.ino && g.rec.owner != owner && !g.rec.owner_here {
            g.rec.owner = owner;
            g.row_stale = true;
        }
        let b = g.rec.base;
        if attr.ino == b.ino
            && attr.size == b.size
            && attr.mtime == b.mtime
            && attr.ctime != b.ctime
        {
            g.rec.base.ctime = attr.ctime;
            if self.journal.update_data(&g.row()).is_ok() {
                g.row_stale = false;
            }
        }
    }

    /// nassync has just changed the metadata of a file on the NAS itself.
    /// A ctime that moved since the base version then proves nothing
    /// about other clients (see the conflict check in `write_back`).
    pub fn own_meta_op(&self, nas_ino: u64) {
        let t = self.meta_clock.fetch_add(1, Ordering::AcqRel) + 1;
        self.own_meta
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(nas_ino, t);
    }

    /// Whether nassync changed the file's metadata since clock `since`.
    fn own_meta_since(&self, nas_ino: u64, since: u64) -> bool {
        self.own_meta
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&nas_ino)
            .is_some_and(|t| *t > since)
    }

    /// The mtime a dirty file is to have on the NAS once written back
    /// (utimensat on a dirty file).
    pub fn set_mtime(&self, nas_ino: u64, mtime: SystemTime) {
        if let Some(d) = self.get(nas_ino) {
            let mut g = d.lock();
            g.rec.mtime = mtime;
            g.ctime = crate::clock::now();
            g.row_stale = true;
        }
    }

    /// Reads the local view of a dirty file; `None` if it is not dirty.
    /// `base` reads the base version (fewer bytes at its end).
    pub fn read(
        &self,
        nas_ino: u64,
        offset: u64,
        size: u32,
        base: &dyn Fn(u64, u32) -> FsResult<Vec<u8>>,
    ) -> Option<FsResult<Vec<u8>>> {
        loop {
            let d = self.get(nas_ino)?;
            match self.compose(&d, offset, size as u64, base) {
                // Settled (its pending file gone) or moved to another row
                // meanwhile: look again.
                Err(_) if d.lock().removed => continue,
                r => return Some(r),
            }
        }
    }

    /// Local content of `offset..offset+len` (fewer at the end of file).
    fn compose(
        &self,
        d: &Dirty<B>,
        offset: u64,
        len: u64,
        base: &dyn Fn(u64, u32) -> FsResult<Vec<u8>>,
    ) -> FsResult<Vec<u8>> {
        // Local parts are read under the lock; base parts after it.
        let (end, trunc, mut out, holes) = {
            let g = d.lock();
            let end = offset.saturating_add(len).min(g.rec.size);
            if end <= offset {
                return Ok(Vec::new());
            }
            let merged;
            let ranges = if g.applying.is_empty() {
                &g.rec.ranges
            } else {
                let mut m = g.rec.ranges.clone();
                m.union(&g.applying);
                merged = m;
                &merged
            };
            let mut out = vec![0u8; (end - offset) as usize];
            let mut holes = Vec::new();
            for (o, l, covered) in ranges.split(offset, end) {
                let at = (o - offset) as usize;
                if covered {
                    self.pfiles
                        .get(g.rec.fid)
                        .and_then(|f| f.read_exact_at(&mut out[at..at + l as usize], o))
                        .map_err(io_err)?;
                } else {
                    holes.push((o, l));
                }
            }
            (end, g.rec.trunc, out, holes)
        };
        let _ = end;
        for (o, l) in holes {
            // Zeros at and after `trunc`; the base before it.
            let stop = (o + l).min(trunc);
            let mut pos = o;
            while pos < stop {
                let n = (stop - pos).min(16 << 20) as u32;
                let b = base(pos, n)?;
                let at = (pos - offset) as usize;
                out[at..at + b.len()].copy_from_slice(&b);
                if (b.len() as u32) < n {
                    break; // the base ends here; the rest stays zero
                }
                pos += n as u64;
            }
        }
        Ok(out)
    }

    /// Makes a file's local changes durable: its pending file and its
    /// journal row are synced.
    pub fn fsync(&self, nas_ino: u64) -> FsResult<()> {
        let Some(d) = self.get(nas_ino) else {
            return Ok(());
        };
        {
            let mut g = d.lock();
            if g.orphan {
                return Ok(());
            }
            if g.removed {
                // Settled (on the NAS, synced there) or moved to another
                // row: look again.
                drop(g);
                return self.fsync(nas_ino);
            }
            self.pfiles
                .get(g.rec.fid)
                .and_then(|f| f.sync_data())
                .map_err(io_err)?;
            if !g.dir_synced {
                File::open(self.journal.pending_dir())
                    .and_then(|f| f.sync_all())
                    .map_err(io_err)?;
                g.dir_synced = true;
            }
            self.journal.update_data(&g.row()).map_err(cache_err)?;
            g.row_stale = false;
        }
        self.journal.commit_durable().map_err(cache_err)
    }

    /// At close: the journal row catches up (not synced: that is fsync's).
    pub fn flush_row(&self, nas_ino: u64) -> FsResult<()> {
        let Some(d) = self.get(nas_ino) else {
            return Ok(());
        };
        let mut g = d.lock();
        if g.row_stale && !g.orphan {
            self.journal.update_data(&g.row()).map_err(cache_err)?;
            g.row_stale = false;
        }
        Ok(())
    }

    /// The file's path from the share's root changed (a rename through the
    /// mount): `old` and everything under it is now under `new`.
    pub fn renamed(&self, old: &OsStr, new: &OsStr) {
        self.rename_rows(old, new, false);
    }

    /// Before a rename of `old` to `new` on the NAS: the rows under `old`
    /// note where they are going (see [`DataRecord::path2`]); `renamed`
    /// or `rename_failed` follows.
    pub fn renaming(&self, old: &OsStr, new: &OsStr) {
        self.rename_rows(old, new, true);
    }

    /// The rename announced by `renaming` did not happen.
    pub fn rename_failed(&self, old: &OsStr) {
        // Not under the files lock: a file's lock comes first.
        let files: Vec<_> = self.files_lock().values().cloned().collect();
        for d in files {
            let mut g = d.lock();
            let p = g.rec.path.as_bytes();
            let o = old.as_bytes();
            let hit = p == o || (p.starts_with(o) && p.get(o.len()) == Some(&b'/'));
            if hit && g.rec.path2.take().is_some() {
                let _ = self.journal.update_data(&g.row());
            }
        }
    }

    fn rename_rows(&self, old: &OsStr, new: &OsStr, ahead: bool) {
        let files: Vec<_> = self.files_lock().values().cloned().collect();
        for d in files {
            let mut g = d.lock();
            if let Some(np) = journal::under_moved(g.rec.path.as_bytes(), old, new) {
                let np = OsString::from(std::ffi::OsStr::from_bytes(&np));
                if ahead {
                    g.rec.path2 = Some(np);
                } else {
                    g.rec.path = np;
                    g.rec.path2 = None;
                }
                log::debug!(
                    "write-back row {} follows a rename to {:?}",
                    g.rec.fid,
                    g.rec.path
                );
                g.row_stale = true;
                if let Err(e) = self.journal.update_data(&g.row()) {
                    log::warn!("journal: cannot record a rename: {e}");
                } else {
                    g.row_stale = false;
                }
            }
        }
    }

    /// A file written from scratch (`from`, truncated to nothing since its
    /// base, not open) was renamed over the regular file `to`: instead of
    /// replacing `to` on the NAS, its content is written back into `to`
    /// as a delta against `to`'s version, keeping `to`'s inode, links and
    /// owner. The caller removes `from`'s name on the NAS. `from` stays a
    /// second key of the same changes, for the kernel's old inode.
    /// Returns false (nothing changed) when `from` does not qualify.
    pub fn retarget(&self, from: u64, to: Start<B>, to_nas: u64) -> FsResult<bool> {
        let Some(old) = self.get(from) else {
            return Ok(false);
        };
        if self.is_dirty(to_nas) {
            return Ok(false);
        }
        self.data.revalidate(to.fuse_ino, &to.data, &to.base)?;
        let mut g = old.lock();
        if g.orphan || g.removed || g.phase == Phase::Applying || g.rec.trunc != 0 {
            return Ok(false);
        }
        let mut rec = g.row();
        rec.nas_ino = to_nas;
        rec.base = to.base;
        rec.path = to.path;
        rec.owner = Some(to.owner);
        rec.owner_here = false;
        rec.atime = None;
        rec.state = RowState::Pending;
        let inner = DirtyInner {
            rec,
            ctime: g.ctime,
            node: None,
            phase: Phase::Waiting,
            applying: RangeSet::new(),
            trunc_live: g.rec.size,
            last_change: g.last_change,
            due: g.due,
            attempts: 0,
            last_error: None,
            orphan: false,
            unlinking: 0,
            dir_synced: g.dir_synced,
            row_stale: false,
            removed: false,
            last_errno: 0,
            refused_at: None,
            base_clock: 0,
        };
        self.journal.update_data(&inner.rec).map_err(cache_err)?;
        self.journal.commit_durable().map_err(cache_err)?;
        let mut inner = inner;
        inner.node = self.hold_node(to.node, to.nlink > 1);
        let d = Arc::new(Dirty {
            nas_ino: to_nas,
            fuse_ino: to.fuse_ino,
            data: to.data,
            inner: Mutex::new(inner),
        });
        // Whoever holds the old one looks again and finds the new one,
        // under every number the old one was known by (a new file placed
        // on the NAS is known by its provisional one and the NAS's): one
        // left behind, marked removed, would be pending for ever.
        g.removed = true;
        self.release_node(&mut g);
        let mut files = self.files_lock();
        for v in files.values_mut() {
            if Arc::ptr_eq(v, &old) {
                *v = d.clone();
            }
        }
        files.insert(from, d.clone());
        files.insert(to_nas, d);
        Ok(true)
    }

    /// The file's last name was removed on the NAS: its changes have
    /// nowhere to go. Kept for reading while `open` handles remain.
    pub fn unlinked(&self, nas_ino: u64, open: bool) {
        let Some(d) = self.get(nas_ino) else {
            if open {
                self.gone_here_lock().insert(nas_ino);
            }
            return;
        };
        {
            let mut g = d.lock();
            g.orphan = true;
            if let Err(e) = self.journal.delete(g.rec.fid) {
                log::warn!("journal: cannot drop the row of a removed file: {e}");
            }
        }
        if !open {
            self.drop_file(&d);
        }
    }

    /// nassync is about to remove or move a name of the file (unlink, a
    /// rename of it or over it), until the returned mark is dropped: a
    /// write-back attempt that finds the file gone from its path meanwhile
    /// must not take it for one another client removed and restore it (the
    /// change is this mount's own; `unlinked` or `renamed` follows).
    pub fn unlinking(&self, nas_ino: u64) -> Unlinking<B> {
        let d = self.get(nas_ino);
        if let Some(d) = &d {
            d.lock().unlinking += 1;
        }
        Unlinking { d }
    }

    /// The last handle of an orphaned file closed.
    pub fn closed(&self, nas_ino: u64) {
        self.gone_here_lock().remove(&nas_ino);
        if let Some(d) = self.get(nas_ino) {
            if d.lock().orphan {
                self.drop_file(&d);
            }
        }
    }

    fn drop_file(&self, d: &Arc<Dirty<B>>) {
        let mut g = d.lock();
        if g.removed {
            return;
        }
        let w = g.weight();
        self.account(w, 0);
        // Counted out: an attempt still running on it must not count it
        // out again.
        g.rec.ranges = RangeSet::new();
        g.applying = RangeSet::new();
        self.remove_locked(d, &mut g);
        drop(g);
        self.notify_progress();
    }

    /// Bytes pending in all files.
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_bytes.load(Ordering::Relaxed)
    }

    /// Writers wait while too much is pending.
    fn throttle(&self) {
        let mut waited = false;
        while self.dirty_bytes() > self.cfg.max_dirty {
            if self.sched().stop {
                return;
            }
            if !waited {
                log::debug!("more than max_dirty pending: slowing writers");
                waited = true;
            }
            self.kick_all();
            let g = self.progress_lock.lock().unwrap_or_else(|e| e.into_inner());
            let _ = self.progress.wait_timeout(g, Duration::from_millis(100));
        }
    }

    fn sched(&self) -> MutexGuard<'_, Sched> {
        self.sched.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn kick(&self) {
        self.sched().kick = true;
        self.wake.notify_all();
    }

    /// Makes every file (under `prefix`, if given) due now.
    fn mark_due(&self, prefix: Option<&OsStr>) -> usize {
        let files: Vec<_> = self.files_lock().values().cloned().collect();
        let mut n = 0;
        for d in files {
            let mut g = d.lock();
            if g.orphan || !under(&g.rec.path, prefix) {
                continue;
            }
            g.due = true;
            if let Phase::Retry { .. } = g.phase {
                g.phase = Phase::Retry { at: Instant::now() };
            }
            n += 1;
        }
        n
    }

    fn kick_all(&self) {
        self.mark_due(None);
        self.kick();
    }

    fn notify_progress(&self) {
        let _g = self.progress_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.progress.notify_all();
    }

    /// Whether every file with changes under `prefix` had its last
    /// attempt refused by the NAS after `since`, and no new object waits.
    fn all_refused_since(&self, prefix: Option<&OsStr>, since: Instant) -> bool {
        if self.staged_under(prefix) > 0 {
            return false;
        }
        let files: Vec<_> = self.files_lock().values().cloned().collect();
        let mut refused = 0;
        for d in files {
            let g = d.lock();
            if g.orphan || !under(&g.rec.path, prefix) {
                continue;
            }
            if !matches!(g.phase, Phase::Retry { .. }) || g.refused_at.is_none_or(|t| t < since) {
                return false;
            }
            refused += 1;
        }
        refused > 0
    }

    /// Files and bytes pending (under `prefix`).
    pub fn pending(&self, prefix: Option<&OsStr>) -> (u64, u64) {
        let files: Vec<_> = self.files_lock().values().cloned().collect();
        let (mut n, mut bytes) = (0, 0);
        for d in files {
            let g = d.lock();
            if !g.orphan && under(&g.rec.path, prefix) {
                n += 1;
                bytes += g.weight();
            }
        }
        (n + self.staged_under(prefix), bytes)
    }

    /// Writes back everything (under `prefix`) now, and waits until it has
    /// reached the NAS, or until `deadline`. `progress` is told the files
    /// and bytes left, now and then. Returns what is left.
    pub fn flush(
        &self,
        prefix: Option<&OsStr>,
        deadline: Option<Instant>,
        progress: &mut dyn FnMut(u64, u64) -> bool,
    ) -> (u64, u64) {
        let mut last_mark = Instant::now();
        let start = last_mark;
        self.mark_due(prefix);
        self.kick();
        let mut staged_tried = false;
        loop {
            let mut left = self.pending(prefix);
            // What is left, the NAS refused since the flush began: waiting
            // for the retries would wait for ever (a read-only export, an
            // immutable file). The caller says why.
            if left.0 > 0 && self.all_refused_since(prefix, start) {
                return left;
            }
            if left.0 > 0 && left.1 == 0 && !staged_tried {
                // Only new objects are left (files without data are
                // counted as objects): they go to the NAS now.
                let staged = self.staged_under(prefix);
                if staged > 0 && staged == left.0 {
                    if let Some(s) = self.staged.get() {
                        s.flush(deadline);
                    }
                    staged_tried = true;
                    left = self.pending(prefix);
                    if left.0 > 0 && left.1 == 0 {
                        return left;
                    }
                }
            }
            if left.0 == 0 && !staged_tried {
                // Directories made on the NAS get their final mode and
                // times once nothing is left to create in them: a flush
                // ends with that done too.
                if let Some(s) = self.staged.get() {
                    s.settle();
                }
                staged_tried = true;
            }
            if left.0 == 0 || !progress(left.0, left.1) {
                return left;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return left;
            }
            // Offline: the changes wait for the NAS, not the caller (a
            // short grace for a NAS that just came back and whose
            // abandoned calls are finishing).
            if !self.backend.online() && last_mark.elapsed() > Duration::from_millis(300) {
                return self.pending(prefix);
            }
            // Changes made while flushing are flushed too.
            if last_mark.elapsed() > Duration::from_millis(500) {
                self.mark_due(prefix);
                self.kick();
                last_mark = Instant::now();
            }
            let g = self.progress_lock.lock().unwrap_or_else(|e| e.into_inner());
            let _ = self.progress.wait_timeout(g, Duration::from_millis(200));
        }
    }

    /// Writes one file back now (before an operation the NAS must do
    /// itself); fails with the NAS's error if that fails.
    pub fn flush_file(&self, nas_ino: u64) -> FsResult<()> {
        loop {
            // Not while the NAS is offline or an abandoned change may still
            // land on it: that write could overtake this one.
            if !self.backend.online() && self.is_dirty(nas_ino) {
                return Err(BackendError::errno("write-back", libc::EIO).into());
            }
            let Some(d) = self.get(nas_ino) else {
                return Ok(());
            };
            let busy = {
                let g = d.lock();
                if g.orphan || g.removed {
                    return Ok(());
                }
                g.phase == Phase::Applying
            };
            if busy {
                let g = self.progress_lock.lock().unwrap_or_else(|e| e.into_inner());
                let _ = self.progress.wait_timeout(g, Duration::from_millis(50));
                continue;
            }
            self.apply(&d);
            let g = d.lock();
            if let (Phase::Retry { .. }, Some(e)) = (&g.phase, &g.last_error) {
                return Err(BackendError::new(
                    "write-back",
                    std::io::Error::new(
                        std::io::Error::from_raw_os_error(g.last_errno).kind(),
                        e.clone(),
                    ),
                )
                .into());
            }
        }
    }

    /// One write-back attempt of every pending file, in the calling
    /// thread, oldest first (the write-back thread does the same when
    /// files are due).
    pub fn write_back_now(&self) {
        let mut files: Vec<(SystemTime, Arc<Dirty<B>>)> = self
            .files_lock()
            .values()
            .map(|d| (d.lock().rec.created, d.clone()))
            .collect();
        files.sort_by_key(|(c, _)| *c);
        for (_, d) in files {
            self.apply(&d);
        }
    }

    /// Stops the write-back thread after flushing what it can before
    /// `deadline`; returns (files, bytes) left in the journal.
    pub fn shutdown(&self, timeout: Duration) -> (u64, u64) {
        let deadline = Instant::now() + timeout;
        let left = self.flush(None, Some(deadline), &mut |_, _| true);
        if let Some(s) = self.staged.get() {
            s.stop();
        }
        self.sched().stop = true;
        self.wake.notify_all();
        // Rows catch up, so that the journal has everything for next time.
        let files: Vec<_> = self.files_lock().values().cloned().collect();
        for d in files {
            let mut g = d.lock();
            if !g.orphan {
                let _ = self.pfiles.get(g.rec.fid).and_then(|f| f.sync_data());
                if self.journal.update_data(&g.row()).is_ok() {
                    g.row_stale = false;
                }
            }
        }
        let _ = self.journal.commit_durable();
        if let Err(e) = self.journal.checkpoint() {
            log::warn!("journal: {e}");
        }
        left
    }

    /// For `nassync status`.
    pub fn status(&self) -> (Vec<PendingInfo>, Vec<ConflictRecord>, [u64; 4]) {
        let files: Vec<_> = self.files_lock().values().cloned().collect();
        let mut out = Vec::new();
        for d in files {
            let g = d.lock();
            if g.orphan {
                continue;
            }
            out.push(PendingInfo {
                new: None,
                removed: None,
                moved: None,
                attrs: None,
                path: g.rec.path.clone(),
                bytes: g.weight(),
                age: g.rec.created.elapsed().unwrap_or_default(),
                phase: match g.phase {
                    Phase::Waiting => "waiting",
                    Phase::Applying => "writing",
                    Phase::Retry { .. } => "retrying",
                },
                attempts: g.attempts,
                error: g.last_error.clone(),
            });
        }
        if let Some(s) = self.staged.get() {
            out.extend(s.pending());
        }
        out.sort_by_key(|p| std::cmp::Reverse(p.age));
        let conflicts = self.journal.conflicts(50).unwrap_or_default();
        let staged_conflicts = self.staged.get().map(|s| s.conflicts()).unwrap_or(0);
        let staged_retries = self.staged.get().map(|s| s.retries()).unwrap_or(0);
        let c = &self.counters;
        (
            out,
            conflicts,
            [
                c.written_bytes.load(Ordering::Relaxed),
                c.files_written.load(Ordering::Relaxed),
                c.retries.load(Ordering::Relaxed) + staged_retries,
                c.conflicts.load(Ordering::Relaxed) + staged_conflicts,
            ],
        )
    }

    /// The write-back thread.
    fn run(&self) {
        let mut was_online = true;
        loop {
            {
                let mut s = self.sched();
                if s.stop {
                    return;
                }
                if !s.kick {
                    s = self
                        .wake
                        .wait_timeout(s, Duration::from_millis(250))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
                if s.stop {
                    return;
                }
                s.kick = false;
            }
            // While the NAS does not answer, nothing is tried; when it is
            // back, everything waiting for a retry goes at once.
            // Nor while a call the cache answered for is unanswered.
            let online = self.backend.online() && !self.backend.held_up();
            let back = online && !was_online;
            was_online = online;
            if !online {
                continue;
            }
            let now = Instant::now();
            let files: Vec<_> = self.files_lock().values().cloned().collect();
            if back {
                for d in &files {
                    let mut g = d.lock();
                    if let Phase::Retry { .. } = g.phase {
                        g.phase = Phase::Retry { at: now };
                    }
                }
            }
            let mut due: Vec<(SystemTime, Arc<Dirty<B>>)> = files
                .into_iter()
                .filter_map(|d| {
                    let g = d.lock();
                    let ready = match g.phase {
                        Phase::Waiting => {
                            g.due || now.duration_since(g.last_change) >= self.cfg.delay
                        }
                        Phase::Retry { at } => now >= at,
                        Phase::Applying => false,
                    };
                    let created = g.rec.created;
                    drop(g);
                    ready.then_some((created, d))
                })
                .collect();
            // Oldest first: the journal's order.
            due.sort_by_key(|(c, _)| *c);
            for (_, d) in due {
                if self.sched().stop {
                    return;
                }
                self.apply(&d);
            }
        }
    }

    /// Resolves a path from the share's root: (directory, file).
    fn resolve(&self, path: &OsStr) -> BResult<Resolved<B>> {
        let (mut dir, _) = self.backend.root()?;
        let comps: Vec<&[u8]> = path
            .as_bytes()
            .split(|b| *b == b'/')
            .filter(|c| !c.is_empty())
            .collect();
        let Some((last, parents)) = comps.split_last() else {
            return Err(BackendError::errno("resolve", libc::EISDIR));
        };
        for c in parents {
            dir = self.backend.lookup(&dir, OsStr::from_bytes(c))?.0;
        }
        match self.backend.lookup(&dir, OsStr::from_bytes(last)) {
            Ok(found) => Ok((dir, Some(found))),
            Err(e) if e.raw_errno() == libc::ENOENT => Ok((dir, None)),
            Err(e) => Err(e),
        }
    }

    /// One write-back attempt of one file.
    fn apply(&self, d: &Arc<Dirty<B>>) {
        // A new file's place is known below for sure (a crash between its
        // rename there and the row's may have left the row behind); so is
        // that of a file renamed here, until the rename is made there (a
        // directory made here that it went into may have got the conflict
        // name since).
        let moved = self
            .backend
            .local_path(d.nas_ino)
            .or_else(|| self.backend.pending_path(d.nas_ino));
        // The snapshot: what this attempt writes.
        let snap = {
            let mut g = d.lock();
            if g.orphan || g.removed || g.phase == Phase::Applying {
                return;
            }
            if let Some(p) = moved.filter(|p| *p != g.rec.path) {
                log::debug!("write-back row {} follows its file to {p:?}", g.rec.fid);
                g.rec.path = p;
                if self.journal.update_data(&g.row()).is_ok() {
                    g.row_stale = false;
                }
            }
            let ranges = std::mem::take(&mut g.rec.ranges);
            g.applying = ranges.clone();
            g.trunc_live = g.rec.size;
            g.phase = Phase::Applying;
            g.due = false;
            Snap {
                ranges,
                size: g.rec.size,
                trunc: g.rec.trunc,
                base: g.rec.base,
                mtime: g.rec.mtime,
                node: g.node.clone(),
                path: g.rec.path.clone(),
                path2: g.rec.path2.clone(),
                recovering: g.rec.state == RowState::Applying,
                base_clock: g.base_clock,
                owner: g.owner_to_set(),
                atime: g.rec.atime,
            }
        };
        log::debug!(
            "write-back of {:?}: {} bytes in {} ranges, size {}, trunc {}, base size {}{}",
            snap.path,
            snap.ranges.bytes(),
            snap.ranges.iter().count(),
            snap.size,
            snap.trunc,
            snap.base.size,
            if snap.recovering {
                ", after an interrupted attempt"
            } else {
                ""
            }
        );
        let result = self.write_back(d, &snap);
        let mut g = d.lock();
        let before = g.weight();
        if g.orphan || g.removed {
            // Unlinked (or dropped) meanwhile: nothing to record; an open
            // orphan keeps its bytes for reading.
            let applying = std::mem::take(&mut g.applying);
            g.rec.ranges.union(&applying);
            g.phase = Phase::Waiting;
            self.account(before, g.weight());
            drop(g);
            self.notify_progress();
            return;
        }
        match result {
            Ok(Outcome::Written(after, written, clock, refused)) => {
                if let Some(why) = refused {
                    // Dropped: the row settles without them.
                    self.conflict(&snap.path, snap.path.clone(), why);
                }
                g.base_clock = clock;
                self.counters
                    .written_bytes
                    .fetch_add(written, Ordering::Relaxed);
                self.counters.files_written.fetch_add(1, Ordering::Relaxed);
                let applied = std::mem::take(&mut g.applying);
                // The NAS now holds the snapshot: it is the new base, and
                // cached base blocks of what changed are stale.
                // All of the snapshot was written, even what a truncate
                // has dropped from `applied` since.
                let mut stale = snap.ranges.clone();
                if snap.recovering {
                    // What an interrupted attempt left is unknown.
                    stale.insert(0, u64::MAX);
                } else if snap.size != snap.base.size || snap.trunc < snap.base.size {
                    stale.insert(snap.trunc.min(snap.base.size).min(snap.size), u64::MAX);
                }
                let stale: Vec<(u64, u64)> = stale.iter().collect();
                if let Err(e) = self
                    .data
                    .replaced(d.fuse_ino, &d.data, &stale, &after.validator())
                {
                    log::warn!("cache: {e}");
                }
                g.rec.base = after.validator();
                g.rec.trunc = g.trunc_live;
                if snap.owner.is_some() && g.rec.owner == snap.owner {
                    g.rec.owner_here = false;
                }
                if !g.rec.owner_here {
                    g.rec.owner = Some((after.perm, after.uid, after.gid));
                }
                if g.rec.atime == snap.atime {
                    g.rec.atime = None;
                }
                g.rec.state = RowState::Pending;
                g.attempts = 0;
                g.last_error = None;
                g.phase = Phase::Waiting;
                self.account(before, g.weight());
                let settled = g.rec.ranges.is_empty()
                    && g.rec.trunc >= g.rec.size
                    && g.rec.size == after.size
                    && g.rec.mtime == snap.mtime
                    && !g.rec.owner_here
                    && g.rec.atime.is_none();
                if settled {
                    self.remove_locked(d, &mut g);
                } else {
                    // The row first: until it no longer names the applied
                    // ranges, a restart may need their bytes.
                    match self.journal.update_data(&g.row()) {
                        Ok(()) => {
                            g.row_stale = false;
                            // Bytes written meanwhile stay.
                            let mut punch = applied;
                            for (s, e) in g.rec.ranges.iter() {
                                punch.remove(s, e);
                            }
                            if let Ok(f) = self.pfiles.get(g.rec.fid) {
                                for (s, e) in punch.iter() {
                                    punch_hole(&f, s, e);
                                }
                            }
                        }
                        Err(e) => log::warn!("journal: {e}"),
                    }
                }
            }
            Ok(Outcome::Conflict {
                kept_as,
                reason,
                nas,
            }) => {
                self.conflict(&snap.path, kept_as, reason);
                if snap.attrs_only() && snap.changed_since(&g) {
                    // Only attributes were settled: what was written or
                    // set here during the attempt stays, on the version
                    // it was made on (the next attempt keeps both).
                    g.phase = Phase::Retry {
                        at: Instant::now() + Duration::from_millis(100),
                    };
                    drop(g);
                    self.notify_progress();
                    return;
                }
                g.applying = RangeSet::new();
                // Changes made during the attempt went into the copy or
                // come after it; either way the name is the NAS's again.
                g.rec.ranges = RangeSet::new();
                self.account(before, 0);
                // From now on the file is the NAS's version.
                if let Some(v) = nas {
                    let _ = self.data.revalidate(d.fuse_ino, &d.data, &v);
                }
                self.remove_locked(d, &mut g);
            }
            Ok(Outcome::Raced) => {
                log::debug!("write-back of {:?}: its name changed meanwhile", snap.path);
                let applying = std::mem::take(&mut g.applying);
                g.rec.ranges.union(&applying);
                g.phase = Phase::Retry {
                    at: Instant::now() + Duration::from_millis(100),
                };
                self.account(before, g.weight());
            }
            Err((e, wrote)) => {
                // An offline NAS is waited for (see `run`), not counted
                // as a failed attempt.
                let offline = !self.backend.online();
                if !offline {
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    g.attempts += 1;
                }
                let backoff = if offline {
                    Duration::ZERO
                } else {
                    Duration::from_millis(250)
                        .saturating_mul(1 << g.attempts.min(7))
                        .min(Duration::from_secs(30))
                };
                if offline {
                    log::info!("write-back of {:?} waits for the NAS: {e}", snap.path);
                } else if g.attempts == 1 {
                    log::warn!("write-back of {:?} failed, will retry: {e}", snap.path);
                } else {
                    log::debug!(
                        "write-back of {:?} failed again ({}): {e}",
                        snap.path,
                        g.attempts
                    );
                }
                g.last_error = Some(e.to_string());
                g.last_errno = e.errno();
                // A refusal a retry will meet again, not a passing state
                // (a file busy, a rename on its way, space that a flush
                // may free here or there).
                let refused = matches!(e.errno(), libc::EPERM | libc::EACCES | libc::EROFS);
                g.refused_at = (!offline && refused).then(Instant::now);
                let applying = std::mem::take(&mut g.applying);
                g.rec.ranges.union(&applying);
                if wrote {
                    g.rec.state = RowState::Applying;
                    // Blocks cached while it wrote may be neither the
                    // base's nor the NAS's now.
                    if let Err(e) =
                        self.data
                            .replaced(d.fuse_ino, &d.data, &[(0, u64::MAX)], &snap.base)
                    {
                        log::warn!("cache: {e}");
                    }
                }
                g.phase = Phase::Retry {
                    at: Instant::now() + backoff,
                };
                if let Err(e) = self.journal.update_data(&g.row()) {
                    log::warn!("journal: {e}");
                }
                self.account(before, g.weight());
            }
        }
        drop(g);
        self.notify_progress();
    }

    /// Counts, logs and records a conflict.
    fn conflict(&self, path: &OsStr, kept_as: OsString, reason: String) {
        self.counters.conflicts.fetch_add(1, Ordering::Relaxed);
        if kept_as == path {
            log::warn!("conflict: {path:?} {reason}");
        } else {
            log::warn!("conflict: {path:?} {reason}; the local version was kept as {kept_as:?}");
        }
        let rec = ConflictRecord {
            at: SystemTime::now(),
            path: path.to_os_string(),
            kept_as,
            reason,
        };
        if let Err(e) = self.journal.add_conflict(&rec) {
            log::warn!("journal: {e}");
        }
    }

    /// Forgets a file that has nothing pending any more (`g` is its lock).
    fn remove_locked(&self, d: &Arc<Dirty<B>>, g: &mut DirtyInner<B>) {
        g.removed = true;
        self.release_node(g);
        if let Err(e) = self.journal.delete(g.rec.fid) {
            log::warn!("journal: {e}");
        }
        self.pfiles.remove(g.rec.fid);
        let keys: Vec<u64> = {
            let mut files = self.files_lock();
            let keys = files
                .iter()
                .filter(|(_, x)| Arc::ptr_eq(x, d))
                .map(|(k, _)| *k)
                .collect::<Vec<_>>();
            files.retain(|_, x| !Arc::ptr_eq(x, d));
            keys
        };
        for k in keys {
            self.settle(k);
        }
    }

    /// Writes the snapshot into the NAS file. Err carries whether the NAS
    /// file may have been changed.
    fn write_back(&self, d: &Arc<Dirty<B>>, snap: &Snap<B>) -> Result<Outcome, (FsError, bool)> {
        let e0 = |e: BackendError| (FsError::from(e), false);
        // A rename by nassync was under way when the daemon stopped (or is
        // now): that rename moved its ctime.
        let mut renamed_ahead = snap.path2.is_some();
        let held = match &snap.node {
            Some(n) => match self.backend.getattr(n) {
                // A node held open (a directory source keeps O_PATH
                // descriptors) outlives the file's last name.
                Ok(a) if a.nlink == 0 => {
                    return self
                        .lost(d, snap, "the file was removed on the NAS")
                        .map_err(e0);
                }
                Ok(a) => Some((n.clone(), a)),
                // A node that no longer leads anywhere (a stale handle, a
                // new file the overlay has let go): found by its path, or
                // lost if it is not there either.
                Err(e) if matches!(e.raw_errno(), libc::ENOENT | libc::ESTALE) => {
                    self.release_node(&mut d.lock());
                    None
                }
                Err(e) => return Err(e0(e)),
            },
            None => None,
        };
        let (node, attr) = match held {
            Some(x) => x,
            None => match self.resolve(&snap.path).map_err(e0)? {
                (_, Some((n, a))) if a.ino == snap.base.ino => {
                    let mut g = d.lock();
                    if !g.removed && g.node.is_none() {
                        g.node = self.hold_node(n.clone(), a.nlink > 1);
                    }
                    drop(g);
                    (n, a)
                }
                // Being renamed when the daemon stopped: it may have
                // reached its new name.
                _ if snap.path2.is_some() => {
                    let p2 = snap.path2.clone().unwrap_or_default();
                    match self.resolve(&p2).map_err(e0)? {
                        (_, Some((n, a))) if a.ino == snap.base.ino => {
                            renamed_ahead = true;
                            let mut g = d.lock();
                            if !g.removed && g.node.is_none() {
                                g.node = self.hold_node(n.clone(), a.nlink > 1);
                            }
                            g.rec.path = p2;
                            g.rec.path2 = None;
                            if self.journal.update_data(&g.row()).is_ok() {
                                g.row_stale = false;
                            }
                            (n, a)
                        }
                        _ => {
                            return self
                                .lost(d, snap, "the file is no longer at its path on the NAS")
                                .map_err(e0);
                        }
                    }
                }
                _ => {
                    return self
                        .lost(d, snap, "the file is no longer at its path on the NAS")
                        .map_err(e0);
                }
            },
        };
        if attr.ino != snap.base.ino {
            return self
                .lost(d, snap, "another file is at its path on the NAS")
                .map_err(e0);
        }
        let v = attr.validator();
        // Only the ctime moved, and nassync itself renamed, chmodded...
        // the file since: that is not another client's change.
        let own_ctime = v.ino == snap.base.ino
            && v.size == snap.base.size
            && v.mtime == snap.base.mtime
            && (renamed_ahead || self.own_meta_since(d.nas_ino, snap.base_clock));
        // A new file not on the NAS yet is nobody else's to change: its
        // ctime moved by this mount's own link or chmod before a restart
        // (which forgot `own_meta`) is no conflict.
        let local = || self.backend.local_path(d.nas_ino).is_some();
        if !snap.recovering && v != snap.base && !own_ctime && !local() {
            let reason = "changed on the NAS since nassync last saw it";
            if snap.attrs_only() {
                return self.attrs_over(snap, &node, &attr, reason).map_err(e0);
            }
            return self.keep_both(d, snap, reason).map_err(e0);
        }
        // From here on the NAS file may hold part of the change.
        {
            let mut g = d.lock();
            if g.rec.state != RowState::Applying {
                g.rec.state = RowState::Applying;
                let r = self.journal.update_data(&g.row());
                drop(g);
                r.and_then(|_| self.journal.commit_durable())
                    .map_err(|e| (cache_err(e), false))?;
            }
        }
        let wrote = |e: BackendError| (FsError::from(e), true);
        if snap.attrs_only() {
            return self.set_attrs_only(&node, &attr, snap).map_err(wrote);
        }
        let file = self
            .backend
            .open(
                &node,
                OpenMode {
                    read: true,
                    // Setting a mode, owner or times needs no write access
                    // (a file read-only to a squashed root).
                    write: !snap.attrs_only(),
                    append: false,
                    truncate: false,
                },
            )
            .map_err(wrote)?;
        let file = Arc::new(file);
        if let Some((perm, _, _)) = snap.owner {
            // Set-ID bits cleared here (a write by another user) go before
            // the new bytes: never new content under the old bits.
            let drop = attr.perm & 0o6000 & !perm;
            if drop != 0 {
                let c = SetAttr {
                    mode: Some((attr.perm & !drop) as u32),
                    ..Default::default()
                };
                self.backend
                    .setattr(&node, Some(&file), &c)
                    .map_err(wrote)?;
            }
        }
        let base_fn = self.base_reader(d, Some(file.clone()));
        let mut written = 0u64;
        // How far the NAS file goes now: the base's size, or after an
        // interrupted attempt whatever that attempt left.
        let extent = attr.size;
        let rewrite = snap.trunc < extent;
        if rewrite {
            // The base's tail was dropped and written again, perhaps
            // mostly the same: diff against the base, write what differs.
            const WINDOW: u64 = 4 << 20;
            let lo = snap.ranges.first().unwrap_or(u64::MAX).min(snap.trunc) / WINDOW * WINDOW;
            let hi = snap.size.min(extent);
            let mut pos = lo;
            while pos < hi {
                let end = (pos + WINDOW).min(hi);
                let touched = end > snap.trunc || snap.ranges.split(pos, end).iter().any(|r| r.2);
                if touched {
                    let new = self
                        .compose_snap(d, snap, pos, end - pos, &*base_fn)
                        .map_err(|e| (e, true))?;
                    let old = base_fn(pos, (end - pos) as u32).map_err(|e| (e, true))?;
                    if new != old {
                        for (o, l) in delta::changed_runs(&old, &new) {
                            self.backend
                                .write(&file, pos + o as u64, &new[o..o + l])
                                .map_err(wrote)?;
                            written += l as u64;
                        }
                    }
                }
                pos = end;
            }
            // Past the base's end: the written ranges as they are.
            for (s, e) in snap.ranges.iter() {
                let s = s.max(hi);
                let e = e.min(snap.size);
                if s < e {
                    written += self.copy_range(d, &file, s, e).map_err(|e| (e, true))?;
                }
            }
        } else {
            for (s, e) in snap.ranges.iter() {
                let e = e.min(snap.size);
                if s < e {
                    written += self.copy_range(d, &file, s, e).map_err(|e| (e, true))?;
                }
            }
        }
        let mut now = self.backend.fgetattr(&file).map_err(wrote)?;
        let mut refused = None;
        let mut changes = SetAttr {
            atime: snap.atime.map(SetTime::At),
            mtime: Some(SetTime::At(snap.mtime)),
            ..Default::default()
        };
        if now.size != snap.size {
            changes.size = Some(snap.size);
        }
        if let Some(owner) = snap.owner {
            // The size before the mode: a truncate without CAP_FSETID
            // clears set-ID bits.
            if let Some(size) = changes.size.take() {
                let c = SetAttr {
                    size: Some(size),
                    ..Default::default()
                };
                now = self
                    .backend
                    .setattr(&node, Some(&file), &c)
                    .map_err(wrote)?;
            }
            match self.set_owner(&node, Some(&file), &now, owner) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_errno(), libc::EPERM | libc::EACCES) => {
                    refused = Some(format!(
                        "the NAS refused the mode and owner set here ({e}); they were dropped"
                    ));
                }
                Err(e) => return Err(wrote(e)),
            }
        }
        match self.backend.setattr(&node, Some(&file), &changes) {
            Ok(_) => {}
            // Times only (the size went first, when it changed): dropped
            // as the mode and owner are, not retried for ever.
            Err(e)
                if changes.size.is_none()
                    && matches!(e.raw_errno(), libc::EPERM | libc::EACCES) =>
            {
                let what = format!("the NAS refused the times set here ({e}); they were dropped");
                refused = Some(match refused {
                    Some(r) => format!("{r}; {what}"),
                    None => what,
                });
            }
            Err(e) => return Err(wrote(e)),
        }
        self.backend.fsync(&file, false).map_err(wrote)?;
        let clock = self.meta_clock.load(Ordering::Acquire);
        let after = self.backend.fgetattr(&file).map_err(wrote)?;
        Ok(Outcome::Written(after, written, clock, refused))
    }

    /// A row of attributes only (a chmod, chown or utimensat kept here):
    /// set on NAS file `node` (attributes `attr`) by its node, without
    /// opening, writing or syncing it, which would cost a NAS round trip
    /// each. Refused ones are dropped, as in `write_back`.
    fn set_attrs_only(&self, node: &B::Node, attr: &Attr, snap: &Snap<B>) -> BResult<Outcome> {
        let mut refused = None;
        let mut now = *attr;
        let refusal = |e: &BackendError| matches!(e.raw_errno(), libc::EPERM | libc::EACCES);
        if let Some(owner) = snap.owner {
            match self.set_owner(node, None, attr, owner) {
                Ok(a) => now = a,
                Err(e) if refusal(&e) => {
                    refused = Some(format!(
                        "the NAS refused the mode and owner set here ({e}); they were dropped"
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        let times = SetAttr {
            atime: snap.atime.map(SetTime::At),
            mtime: (snap.mtime != now.mtime).then_some(SetTime::At(snap.mtime)),
            ..Default::default()
        };
        if times.atime.is_some() || times.mtime.is_some() {
            match self.backend.setattr(node, None, &times) {
                Ok(a) => now = a,
                Err(e) if refusal(&e) => {
                    let what =
                        format!("the NAS refused the times set here ({e}); they were dropped");
                    refused = Some(match refused {
                        Some(r) => format!("{r}; {what}"),
                        None => what,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        let clock = self.meta_clock.load(Ordering::Acquire);
        Ok(Outcome::Written(now, 0, clock, refused))
    }

    /// Gives the NAS file `node` (attributes `attr`) the permission bits,
    /// uid and gid `owner`: the owner first, as a chown may clear set-ID
    /// bits. Returns the attributes after.
    fn set_owner(
        &self,
        node: &B::Node,
        file: Option<&B::File>,
        attr: &Attr,
        (perm, uid, gid): (u16, u32, u32),
    ) -> BResult<Attr> {
        let mut now = *attr;
        if (now.uid, now.gid) != (uid, gid) {
            let c = SetAttr {
                uid: Some(uid),
                gid: Some(gid),
                ..Default::default()
            };
            now = self.backend.setattr(node, file, &c)?;
        }
        if now.perm != perm {
            let c = SetAttr {
                mode: Some(perm as u32),
                ..Default::default()
            };
            now = self.backend.setattr(node, file, &c)?;
        }
        Ok(now)
    }

    /// Only attributes were changed here, and the NAS file changed
    /// meanwhile: its content stays as the NAS has it, with the mode and
    /// owner set here (they do not depend on the content); times set here
    /// are dropped (the NAS's are the newer content's).
    fn attrs_over(
        &self,
        snap: &Snap<B>,
        node: &B::Node,
        attr: &Attr,
        reason: &str,
    ) -> BResult<Outcome> {
        let (after, what) = match snap.owner {
            Some(owner) => (
                self.set_owner(node, None, attr, owner)?,
                "its content kept, with the mode and owner set here",
            ),
            None => (*attr, "its content and times kept"),
        };
        Ok(Outcome::Conflict {
            kept_as: snap.path.clone(),
            reason: format!("{reason}; {what}"),
            nas: Some(after.validator()),
        })
    }

    /// Copies `s..e` from the pending file into the NAS file.
    fn copy_range(&self, d: &Dirty<B>, file: &B::File, s: u64, e: u64) -> FsResult<u64> {
        // Several chunks in flight: each write is a NAS round trip (over a
        // kernel NFS or FUSE mount of the NAS, one per wsize or 128 KiB),
        // which one stream waits out in turn, leaving the link idle.
        // 1 MiB in flight, as one stream had: on a slow link each write
        // must still finish within `timeo`.
        const CHUNK: u64 = 256 << 10;
        const IN_FLIGHT: u64 = 4;
        let chunks = (e - s).div_ceil(CHUNK);
        let next = AtomicU64::new(0);
        let failed: Mutex<Option<FsError>> = Mutex::new(None);
        let work = || {
            let mut buf = vec![0u8; (e - s).min(CHUNK) as usize];
            loop {
                if failed.lock().unwrap_or_else(|x| x.into_inner()).is_some() {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= chunks {
                    return;
                }
                let pos = s + i * CHUNK;
                let n = (e - pos).min(CHUNK) as usize;
                let r = {
                    let g = d.lock();
                    self.pfiles
                        .get(g.rec.fid)
                        .and_then(|f| f.read_exact_at(&mut buf[..n], pos))
                        .map_err(io_err)
                }
                .and_then(|()| Ok(self.backend.write(file, pos, &buf[..n])?));
                if let Err(x) = r {
                    failed
                        .lock()
                        .unwrap_or_else(|x| x.into_inner())
                        .get_or_insert(x);
                    return;
                }
            }
        };
        crate::parallel::on_threads(IN_FLIGHT.min(chunks) as usize, work);
        match failed.into_inner().unwrap_or_else(|x| x.into_inner()) {
            Some(x) => Err(x),
            None => Ok(e - s),
        }
    }

    /// Reads the base version through the block caches, from `file` on a
    /// miss.
    fn base_reader(
        &self,
        d: &Arc<Dirty<B>>,
        file: Option<Arc<B::File>>,
    ) -> Box<dyn Fn(u64, u32) -> FsResult<Vec<u8>> + '_> {
        let bs = self.data.block_size();
        let backend = self.backend.clone();
        let fetch: FetchFn = Arc::new(move |idx| {
            let Some(f) = &file else {
                return Err(BackendError::errno("read base", libc::ENOENT));
            };
            let mut buf = vec![0u8; bs as usize];
            let n = backend.read(f, idx * bs, &mut buf)?;
            buf.truncate(n);
            Ok(buf)
        });
        let d = d.clone();
        Box::new(move |off, len| self.data.read(d.fuse_ino, &d.data, off, len, &fetch))
    }

    /// The content of the snapshot at `off..off+len`: like [`compose`]
    /// but with the snapshot's truncation point.
    fn compose_snap(
        &self,
        d: &Dirty<B>,
        snap: &Snap<B>,
        off: u64,
        len: u64,
        base: &dyn Fn(u64, u32) -> FsResult<Vec<u8>>,
    ) -> FsResult<Vec<u8>> {
        let end = (off + len).min(snap.size);
        let mut out = vec![0u8; end.saturating_sub(off) as usize];
        for (o, l, covered) in snap.ranges.split(off, end) {
            let at = (o - off) as usize;
            if covered {
                let g = d.lock();
                self.pfiles
                    .get(g.rec.fid)
                    .and_then(|f| f.read_exact_at(&mut out[at..at + l as usize], o))
                    .map_err(io_err)?;
            } else {
                let stop = (o + l).min(snap.trunc);
                if stop > o {
                    let b = base(o, (stop - o) as u32)?;
                    out[at..at + b.len()].copy_from_slice(&b);
                }
            }
        }
        Ok(out)
    }

    /// The file is gone from where it was (removed or moved on the NAS by
    /// another client): the local version is restored under its name, or
    /// kept under a conflict name if something else took the name.
    fn lost(&self, d: &Arc<Dirty<B>>, snap: &Snap<B>, reason: &str) -> BResult<Outcome> {
        // Removed or moved through this mount, not by another client:
        // nothing to restore (the attempt's result is dropped once
        // `unlinked` has run; else it is tried again, at the new path).
        // A rename may also have finished, and its mark gone, since the
        // attempt took the path it looked at.
        {
            let g = d.lock();
            if g.unlinking > 0
                || g.orphan
                || g.removed
                || g.rec.path != snap.path
                || g.rec.path2 != snap.path2
            {
                return Ok(Outcome::Raced);
            }
        }
        if snap.attrs_only() {
            // Nothing written here to restore: the removal stands.
            return Ok(Outcome::Conflict {
                kept_as: snap.path.clone(),
                reason: format!("{reason}; the attributes set here were dropped"),
                nas: None,
            });
        }
        self.keep(d, snap, reason, true)
    }

    /// Writes the local version under a conflict name beside the NAS's.
    fn keep_both(&self, d: &Arc<Dirty<B>>, snap: &Snap<B>, reason: &str) -> BResult<Outcome> {
        self.keep(d, snap, reason, false)
    }

    fn keep(
        &self,
        d: &Arc<Dirty<B>>,
        snap: &Snap<B>,
        reason: &str,
        restore: bool,
    ) -> BResult<Outcome> {
        let (dir, existing) = match self.resolve(&snap.path) {
            Ok(r) => r,
            // The directory is gone too: keep it at the root.
            Err(_) => (self.backend.root()?.0, None),
        };
        let name = Path::new(&snap.path)
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| OsString::from("file"));
        // The local version's mode and owner, as last known here (the
        // NAS's file may be gone; never more open than the file was).
        let (uid, gid, perm) = match (d.lock().rec.owner, &existing) {
            (Some((p, u, g)), _) => (u, g, p),
            (None, Some((_, a))) => (a.uid, a.gid, a.perm),
            (None, None) => (0, 0, 0o600),
        };
        let creds = Creds { uid, gid, umask: 0 };
        let rw = OpenMode {
            read: true,
            write: true,
            append: false,
            truncate: false,
        };
        let stamp = conflict_stamp(SystemTime::now());
        // n = 0: the file's own name, when restoring it and it is free.
        let mut n = if restore && existing.is_none() { 0 } else { 1 };
        let (kept, node, file) = loop {
            let cname = if n == 0 {
                name.clone()
            } else {
                conflict_name(&name, &stamp, &self.cfg.host, n)
            };
            match self
                .backend
                .create(&dir, &cname, perm as u32 & 0o7777, rw, true, creds)
            {
                Ok((node, _, f)) => break (cname, node, f),
                Err(e) if e.raw_errno() == libc::EEXIST && n < 100 => n += 1,
                Err(e) => return Err(e),
            }
        };
        // The local version: the pending file and the cached base. Base
        // blocks nassync no longer has come from the NAS's current file;
        // the bytes written locally are always the local ones.
        let ro = OpenMode {
            read: true,
            write: false,
            append: false,
            truncate: false,
        };
        let nas_file = existing
            .as_ref()
            .and_then(|(n, _)| self.backend.open(n, ro).ok())
            .map(Arc::new);
        let base_fn = self.base_reader(d, nas_file);
        let mut pos = 0;
        while pos < snap.size {
            let n = (snap.size - pos).min(4 << 20);
            let chunk = self.compose_snap(d, snap, pos, n, &*base_fn).map_err(|e| {
                BackendError::new(
                    "conflict copy",
                    std::io::Error::from_raw_os_error(e.errno()),
                )
            })?;
            self.backend.write(&file, pos, &chunk)?;
            pos += n;
        }
        self.backend.setattr(
            &node,
            Some(&file),
            &SetAttr {
                mtime: Some(SetTime::At(snap.mtime)),
                ..Default::default()
            },
        )?;
        self.backend.fsync(&file, false)?;
        let mut path = Path::new(&snap.path)
            .parent()
            .map(|p| p.as_os_str().to_os_string())
            .unwrap_or_default();
        if !path.is_empty() {
            path.push("/");
        }
        path.push(&kept);
        Ok(Outcome::Conflict {
            kept_as: path,
            reason: if n == 0 {
                format!("{reason}; restored")
            } else {
                reason.to_string()
            },
            nas: existing.map(|(_, a)| a.validator()),
        })
    }
}

/// See [`WriteBack::unlinking`].
pub struct Unlinking<B: Backend> {
    d: Option<Arc<Dirty<B>>>,
}

impl<B: Backend> Drop for Unlinking<B> {
    fn drop(&mut self) {
        if let Some(d) = &self.d {
            let mut g = d.lock();
            g.unlinking = g.unlinking.saturating_sub(1);
        }
    }
}

/// A path's directory, and the file if it exists.
type Resolved<B> = (<B as Backend>::Node, Option<(<B as Backend>::Node, Attr)>);

struct Snap<B: Backend> {
    ranges: RangeSet,
    size: u64,
    trunc: u64,
    base: Validator,
    mtime: SystemTime,
    node: Option<B::Node>,
    path: OsString,
    path2: Option<OsString>,
    /// A previous attempt may have written part of the change already.
    recovering: bool,
    base_clock: u64,
    /// Permission bits, uid and gid set here.
    owner: Option<(u16, u32, u32)>,
    atime: Option<SystemTime>,
}

impl<B: Backend> Snap<B> {
    /// Nothing but attributes changed here: no byte, no size.
    fn attrs_only(&self) -> bool {
        self.ranges.is_empty() && self.size == self.base.size && self.trunc >= self.size
    }

    /// Whether the file changed here since the snapshot.
    fn changed_since(&self, g: &DirtyInner<B>) -> bool {
        !g.rec.ranges.is_empty()
            || g.rec.size != self.size
            || g.rec.trunc < self.trunc
            || g.rec.mtime != self.mtime
            || g.owner_to_set() != self.owner
            || g.rec.atime != self.atime
    }
}

enum Outcome {
    /// The NAS's new attributes, the bytes written, the meta clock
    /// before those attributes were read, and why the NAS refused the mode
    /// and owner set here, if it did (they are dropped: retried, they
    /// would keep the file pending for ever).
    Written(Attr, u64, u64, Option<String>),
    /// A name of the file was being removed or moved through this mount
    /// while the attempt looked for it: nothing was written; tried again.
    Raced,
    /// The local version was kept as `kept_as`; `nas` is the NAS's version.
    Conflict {
        kept_as: OsString,
        reason: String,
        nas: Option<Validator>,
    },
}

/// Whether `path` is `prefix` or inside it (None: everything).
pub fn under(path: &OsStr, prefix: Option<&OsStr>) -> bool {
    let Some(prefix) = prefix else { return true };
    let (p, o) = (path.as_bytes(), prefix.as_bytes());
    o.is_empty() || p == o || (p.starts_with(o) && p.get(o.len()) == Some(&b'/'))
}

fn punch_hole(f: &File, start: u64, end: u64) {
    use std::os::fd::AsRawFd;
    let len = end.saturating_sub(start).min(i64::MAX as u64);
    // SAFETY: plain syscall; failing only keeps bytes nobody reads.
    unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            start.min(i64::MAX as u64) as libc::off_t,
            len as libc::off_t,
        );
    }
}

/// `YYYYMMDD-HHMMSS` in local time.
// libc marks time_t deprecated on musl (its width changes with musl 1.2);
// it is what localtime_r takes either way.
#[allow(deprecated)]
pub fn conflict_stamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as libc::time_t)
        .unwrap_or(0);
    // SAFETY: localtime_r writes into the struct we pass.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    unsafe { libc::localtime_r(&secs, &mut tm) };
    format!(
        "{:04}{:02}{:02}-{:02}{:02}{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// `NAME.nassync-conflict-STAMP-HOST.EXT`, the extension kept last so that
/// the copy opens with the same program; `-N` before it from the second.
pub fn conflict_name(name: &OsStr, stamp: &str, host: &str, n: u32) -> OsString {
    let b = name.as_bytes();
    // A leading dot starts a hidden name, not an extension.
    let split = b.iter().rposition(|c| *c == b'.').filter(|i| *i > 0);
    let (stem, ext) = match split {
        Some(i) => (&b[..i], Some(&b[i + 1..])),
        None => (b, None),
    };
    let mut out = stem.to_vec();
    out.extend_from_slice(format!(".nassync-conflict-{stamp}-{host}").as_bytes());
    if n > 1 {
        out.extend_from_slice(format!("-{n}").as_bytes());
    }
    if let Some(ext) = ext {
        out.push(b'.');
        out.extend_from_slice(ext);
    }
    OsString::from(OsStr::from_bytes(&out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_names_keep_the_extension_last() {
        let c = |n: &str, k| conflict_name(OsStr::new(n), "20261122-081500", "laptop", k);
        assert_eq!(
            c("report.docx", 1),
            "report.nassync-conflict-20261122-081500-laptop.docx"
        );
        assert_eq!(
            c("a.tar.gz", 1),
            "a.tar.nassync-conflict-20261122-081500-laptop.gz"
        );
        assert_eq!(
            c("Makefile", 1),
            "Makefile.nassync-conflict-20261122-081500-laptop"
        );
        assert_eq!(
            c(".bashrc", 2),
            ".bashrc.nassync-conflict-20261122-081500-laptop-2"
        );
    }
}
