//! The write-back journal: every change not yet on the NAS, in order, in
//! SQLite (WAL) under `cache_dir`. The format is described in
//! docs/WRITEBACK.md; [`FORMAT`] changes whenever it does.
//!
//! One row of `ops` per pending change. A `data` row stands for all the
//! pending writes and truncations of one file (they are coalesced into it);
//! the bytes themselves live in `pending/<fid>`, a sparse file holding each
//! changed byte at its own offset, so that writes and reads run at local
//! disk speed. The row's `args` is zstd-compressed, like every payload the
//! journal holds. Namespace operations (a later change) become rows of
//! their own kinds in the same table, replayed in `seq` order.
//!
//! Durability: commits are not synced (synchronous=NORMAL) except those
//! that confirm an fsync ([`Journal::commit_durable`]).

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};

use super::ranges::RangeSet;
use crate::backend::{FileKind, Validator};
use crate::cache::CacheError;

/// Journal format version. A journal of another version is refused, never
/// emptied: it may hold the only copy of someone's work.
pub const FORMAT: i64 = 8;

/// Tables added by format 2 (objects created through the mount and not on
/// the NAS yet, and the inode numbers they keep once there). A format-1
/// journal gains them at open.
const FORMAT2_TABLES: &str = "
    CREATE TABLE objects (
        prov INTEGER PRIMARY KEY,
        kind INTEGER NOT NULL,
        parent_prov INTEGER,
        parent_path BLOB,
        name BLOB NOT NULL,
        state TEXT NOT NULL,
        args BLOB NOT NULL,
        created_ns INTEGER NOT NULL,
        nas_ino INTEGER);
    CREATE TABLE aliases (
        nas_ino INTEGER PRIMARY KEY,
        prov INTEGER NOT NULL,
        nas_ctime_ns INTEGER NOT NULL,
        local_ctime_ns INTEGER NOT NULL);
    CREATE TABLE leftovers (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        dir_path BLOB NOT NULL,
        name BLOB NOT NULL,
        hidden BLOB NOT NULL,
        kind INTEGER NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        target BLOB,
        nas_ino INTEGER);";

/// Added by format 3: NAS objects removed here while the NAS did not
/// answer, still to remove there. Earlier formats gain it at open.
const FORMAT3_TABLES: &str = "
    CREATE TABLE removals (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        dir_path BLOB NOT NULL,
        name BLOB NOT NULL,
        kind INTEGER NOT NULL,
        nas_ino INTEGER NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        ctime_ns INTEGER NOT NULL);";

/// Added by format 4: a hard link made here to a new file is a row of its
/// own, naming the file's row. Earlier formats gain the columns at open.
/// And a data row keeps its file's mode and owner, to restore the file
/// with them if it is removed on the NAS meanwhile.
const FORMAT4_COLUMNS: &str = "ALTER TABLE objects ADD COLUMN link_to INTEGER;
    ALTER TABLE ops ADD COLUMN perm INTEGER;
    ALTER TABLE ops ADD COLUMN uid INTEGER;
    ALTER TABLE ops ADD COLUMN gid INTEGER;";

/// Added by format 5: a data row can carry a mode and owner set here
/// (`owner_here`) and an atime, to set on the NAS file with its data (a
/// chmod, chown or utimensat while the NAS did not answer).
const FORMAT5_COLUMNS: &str = "ALTER TABLE ops ADD COLUMN owner_here INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE ops ADD COLUMN atime_ns INTEGER;";

/// Added by format 7: extended attributes set on new files and
/// directories here, made on the NAS with them. Earlier formats gain it at
/// open.
const FORMAT7_TABLES: &str = "
    CREATE TABLE xattrs (
        prov INTEGER NOT NULL,
        name BLOB NOT NULL,
        value BLOB NOT NULL,
        PRIMARY KEY (prov, name)
    );";

/// Added by format 8: a row of `removals` that sets attributes can set or
/// remove an extended attribute of a NAS object instead (a NULL value
/// removes it).
const FORMAT8_COLUMNS: &str = "ALTER TABLE removals ADD COLUMN xattr_name BLOB;
    ALTER TABLE removals ADD COLUMN xattr_value BLOB;";

/// Added by format 6: a row of `removals` with a destination is a rename
/// (or with `to_link`, a hard link) of a NAS object made while the NAS
/// did not answer, one with `set_ctime_ns` a change of its attributes
/// (in the same order as the removals).
const FORMAT6_COLUMNS: &str = "ALTER TABLE removals ADD COLUMN to_dir_path BLOB;
    ALTER TABLE removals ADD COLUMN to_name BLOB;
    ALTER TABLE removals ADD COLUMN to_link INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE removals ADD COLUMN set_mode INTEGER;
    ALTER TABLE removals ADD COLUMN set_uid INTEGER;
    ALTER TABLE removals ADD COLUMN set_gid INTEGER;
    ALTER TABLE removals ADD COLUMN set_atime_ns INTEGER;
    ALTER TABLE removals ADD COLUMN set_mtime_ns INTEGER;
    ALTER TABLE removals ADD COLUMN set_ctime_ns INTEGER;";

/// Where a data row is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowState {
    /// Waiting for write-back.
    Pending,
    /// Write-back started writing into the NAS file; if the daemon stops
    /// now, the NAS file may hold part of the change, and the next attempt
    /// writes it again (the writes are idempotent).
    Applying,
}

impl RowState {
    fn as_str(self) -> &'static str {
        match self {
            RowState::Pending => "pending",
            RowState::Applying => "applying",
        }
    }
    fn parse(s: &str) -> Option<RowState> {
        match s {
            "pending" => Some(RowState::Pending),
            "applying" => Some(RowState::Applying),
            _ => None,
        }
    }
}

/// The pending data change of one file.
#[derive(Clone, Debug, PartialEq)]
pub struct DataRecord {
    /// Local id: names `pending/<fid>`.
    pub fid: u64,
    /// The NAS's inode number of the file.
    pub nas_ino: u64,
    /// Path from the share's root when last known, to find the file again
    /// after a restart.
    pub path: OsString,
    /// The path it is being renamed to (`path2` column): set before the
    /// rename, folded into `path` after it, so that a crash in between
    /// leaves both places to look.
    pub path2: Option<OsString>,
    /// The NAS version the change started from: write-back checks that the
    /// NAS file is still this version before writing into it.
    pub base: Validator,
    pub state: RowState,
    /// Local size.
    pub size: u64,
    /// The smallest size the file had since `base`: the base's bytes at and
    /// after it are gone (read as zeros where not rewritten).
    pub trunc: u64,
    pub mtime: SystemTime,
    /// Bytes changed since `base`, held in `pending/<fid>`.
    pub ranges: RangeSet,
    pub created: SystemTime,
    /// The file's permission bits, uid and gid as last known here.
    pub owner: Option<(u16, u32, u32)>,
    /// `owner` was set here and is not on the NAS yet.
    pub owner_here: bool,
    /// An atime set here, not on the NAS yet.
    pub atime: Option<SystemTime>,
}

/// A conflict found at write-back: both versions were kept.
#[derive(Clone, Debug)]
pub struct ConflictRecord {
    pub at: SystemTime,
    pub path: OsString,
    pub kept_as: OsString,
    pub reason: String,
}

/// A change after another, as [`Journal::repath`] reads it.
struct LaterRow {
    id: i64,
    dir: Vec<u8>,
    name: Vec<u8>,
    ino: i64,
    to_dir: Option<Vec<u8>>,
    to_name: Option<Vec<u8>>,
    link: bool,
    set: bool,
}

/// `p` with its leading `old` (a whole path, or its leading components)
/// replaced by `new`; None when `p` is not `old` or under it.
pub fn under_moved(p: &[u8], old: &OsStr, new: &OsStr) -> Option<Vec<u8>> {
    let rest = p.strip_prefix(old.as_bytes())?;
    if !(rest.is_empty() || rest[0] == b'/') {
        return None;
    }
    let mut v = new.as_bytes().to_vec();
    v.extend_from_slice(rest);
    Some(v)
}

/// `dir/name`, or `name` in the share's root.
pub fn join_bytes(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut v = dir.to_vec();
    if !v.is_empty() {
        v.push(b'/');
    }
    v.extend_from_slice(name);
    v
}

fn nanos(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

fn from_nanos(n: i64) -> SystemTime {
    if n >= 0 {
        UNIX_EPOCH + Duration::from_nanos(n as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(n.unsigned_abs())
    }
}

fn setup_err(path: &Path, reason: impl ToString) -> CacheError {
    CacheError::Setup {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

thread_local! {
    /// A compression context per thread: making one costs more than
    /// compressing a row's few dozen bytes (measured on an untar).
    static ZSTD: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// `raw` zstd-compressed (level 3), or as it is if that fails.
fn compress(raw: Vec<u8>) -> Vec<u8> {
    ZSTD.with(|z| {
        let mut z = z.borrow_mut();
        if z.is_none() {
            *z = zstd::bulk::Compressor::new(3).ok();
        }
        match z.as_mut().map(|c| c.compress(&raw)) {
            Some(Ok(c)) => c,
            _ => raw,
        }
    })
}

/// The `args` payload of a data row, before compression: size, trunc,
/// mtime (ns), then the ranges.
fn encode_args(r: &DataRecord) -> Vec<u8> {
    let mut raw = Vec::with_capacity(24 + r.ranges.iter().count() * 16);
    raw.extend_from_slice(&r.size.to_le_bytes());
    raw.extend_from_slice(&r.trunc.to_le_bytes());
    raw.extend_from_slice(&nanos(r.mtime).to_le_bytes());
    raw.extend_from_slice(&r.ranges.to_bytes());
    compress(raw)
}

fn decode_args(blob: &[u8]) -> Option<(u64, u64, SystemTime, RangeSet)> {
    let raw = zstd::stream::decode_all(blob).ok()?;
    if raw.len() < 24 {
        return None;
    }
    let size = u64::from_le_bytes(raw[0..8].try_into().ok()?);
    let trunc = u64::from_le_bytes(raw[8..16].try_into().ok()?);
    let mtime = from_nanos(i64::from_le_bytes(raw[16..24].try_into().ok()?));
    let ranges = RangeSet::from_bytes(&raw[24..])?;
    Some((size, trunc, mtime, ranges))
}

/// See the module documentation.
pub struct Journal {
    dir: PathBuf,
    conn: Mutex<Connection>,
    /// The `next_prov` last stored (0: not known), so that an object row
    /// is put without writing it again: one page less per commit.
    next_prov_stored: AtomicU64,
    _lock: File,
}

impl Journal {
    /// Opens the journal in `dir` (the cache directory), creating it if
    /// absent. A journal that is damaged or of another format is an error,
    /// and is left as it is.
    pub fn open(dir: &Path) -> Result<Journal, CacheError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(dir.join("pending"))
            .and_then(|_| {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .create(dir.join("upper"))
            })
            .map_err(|e| setup_err(dir, format!("cannot create it: {e}")))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join("journal.lock"))
            .map_err(|e| setup_err(dir, format!("not writable: {e}")))?;
        // SAFETY: plain syscall on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(setup_err(
                dir,
                "its write-back journal is in use by another nassync daemon",
            ));
        }
        let path = dir.join("journal.sqlite");
        let corrupt = |e: &dyn std::fmt::Display| {
            setup_err(
                &path,
                format!(
                    "the write-back journal cannot be read ({e}); it may hold changes not \
                     yet on the NAS, so nassync leaves it alone: move it away to start \
                     with an empty journal"
                ),
            )
        };
        let conn = Connection::open(&path).map_err(|e| corrupt(&e))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(|e| corrupt(&e))?;
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|e| corrupt(&e))?;
        if check != "ok" {
            return Err(corrupt(&check));
        }
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| corrupt(&e))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| corrupt(&e))?;
        let tables: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'",
                [],
                |r| r.get(0),
            )
            .map_err(|e| corrupt(&e))?;
        if tables == 0 {
            conn.execute_batch(
                "BEGIN;
                 CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                 CREATE TABLE ops (
                     seq INTEGER PRIMARY KEY AUTOINCREMENT,
                     kind TEXT NOT NULL,
                     nas_ino INTEGER NOT NULL,
                     path BLOB NOT NULL,
                     path2 BLOB,
                     base_ino INTEGER, base_size INTEGER,
                     base_mtime_ns INTEGER, base_ctime_ns INTEGER,
                     state TEXT NOT NULL,
                     args BLOB NOT NULL,
                     created_ns INTEGER NOT NULL);
                 CREATE TABLE conflicts (
                     id INTEGER PRIMARY KEY AUTOINCREMENT,
                     at_ns INTEGER NOT NULL,
                     path BLOB NOT NULL,
                     kept_as BLOB NOT NULL,
                     reason TEXT NOT NULL);
                 COMMIT;",
            )?;
            conn.execute_batch(&format!(
                "BEGIN; {FORMAT2_TABLES} {FORMAT3_TABLES} {FORMAT4_COLUMNS} {FORMAT5_COLUMNS} \
                 {FORMAT6_COLUMNS} {FORMAT7_TABLES} {FORMAT8_COLUMNS} COMMIT;"
            ))?;
            conn.execute("INSERT INTO meta VALUES ('format', ?1)", params![FORMAT])?;
        }
        let format: Option<i64> = conn
            .query_row("SELECT value FROM meta WHERE key = 'format'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| corrupt(&e))?;
        if format == Some(1) {
            conn.execute_batch(&format!(
                "BEGIN; {FORMAT2_TABLES} UPDATE meta SET value = 2 WHERE key = 'format'; COMMIT;"
            ))
            .map_err(|e| corrupt(&e))?;
        }
        let format = if format == Some(1) { Some(2) } else { format };
        if format == Some(2) {
            conn.execute_batch(&format!(
                "BEGIN; {FORMAT3_TABLES} UPDATE meta SET value = 3 WHERE key = 'format'; COMMIT;"
            ))
            .map_err(|e| corrupt(&e))?;
        }
        let format = if format == Some(2) { Some(3) } else { format };
        if format == Some(3) {
            conn.execute_batch(&format!(
                "BEGIN; {FORMAT4_COLUMNS} UPDATE meta SET value = 4 WHERE key = 'format'; COMMIT;"
            ))
            .map_err(|e| corrupt(&e))?;
        }
        let format = if format == Some(3) { Some(4) } else { format };
        if format == Some(4) {
            conn.execute_batch(&format!(
                "BEGIN; {FORMAT5_COLUMNS} UPDATE meta SET value = 5 WHERE key = 'format'; COMMIT;"
            ))
            .map_err(|e| corrupt(&e))?;
        }
        let format = if format == Some(4) { Some(5) } else { format };
        if format == Some(5) {
            conn.execute_batch(&format!(
                "BEGIN; {FORMAT6_COLUMNS} UPDATE meta SET value = 6 WHERE key = 'format'; COMMIT;"
            ))
            .map_err(|e| corrupt(&e))?;
        }
        let format = if format == Some(5) { Some(6) } else { format };
        if format == Some(6) {
            conn.execute_batch(&format!(
                "BEGIN; {FORMAT7_TABLES} UPDATE meta SET value = 7 WHERE key = 'format'; COMMIT;"
            ))
            .map_err(|e| corrupt(&e))?;
        }
        let format = if format == Some(6) { Some(7) } else { format };
        if format == Some(7) {
            conn.execute_batch(&format!(
                "BEGIN; {FORMAT8_COLUMNS} UPDATE meta SET value = 8 WHERE key = 'format'; COMMIT;"
            ))
            .map_err(|e| corrupt(&e))?;
        }
        let format = if format == Some(7) { Some(8) } else { format };
        if format != Some(FORMAT) {
            return Err(corrupt(&format!(
                "format {format:?}, this nassync reads format {FORMAT}"
            )));
        }
        Ok(Journal {
            dir: dir.to_path_buf(),
            conn: Mutex::new(conn),
            next_prov_stored: AtomicU64::new(0),
            _lock: lock,
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `pending/<fid>`: the changed bytes of a file.
    pub fn pending_path(&self, fid: u64) -> PathBuf {
        self.dir.join("pending").join(format!("{fid:016x}"))
    }

    pub fn pending_dir(&self) -> PathBuf {
        self.dir.join("pending")
    }

    /// Adds a data row; returns its fid.
    pub fn insert_data(&self, r: &DataRecord) -> Result<u64, CacheError> {
        let conn = self.conn();
        // Cached statements: one create of an untar makes several rows.
        conn.prepare_cached(
            "INSERT INTO ops (kind, nas_ino, path, base_ino, base_size, base_mtime_ns,
                              base_ctime_ns, state, args, created_ns, path2, perm, uid, gid,
                              owner_here, atime_ns)
             VALUES ('data', ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        )?
        .execute(params![
            r.nas_ino as i64,
            r.path.as_bytes(),
            r.base.ino as i64,
            r.base.size as i64,
            nanos(r.base.mtime),
            nanos(r.base.ctime),
            r.state.as_str(),
            encode_args(r),
            nanos(r.created),
            r.path2.as_ref().map(|p| p.as_bytes().to_vec()),
            r.owner.map(|o| o.0 as i64),
            r.owner.map(|o| o.1 as i64),
            r.owner.map(|o| o.2 as i64),
            r.owner_here as i64,
            r.atime.map(nanos),
        ])?;
        Ok(conn.last_insert_rowid() as u64)
    }

    pub fn update_data(&self, r: &DataRecord) -> Result<(), CacheError> {
        self.conn()
            .prepare_cached(
                "UPDATE ops SET nas_ino = ?2, path = ?3, base_ino = ?4, base_size = ?5,
                 base_mtime_ns = ?6, base_ctime_ns = ?7, state = ?8, args = ?9, path2 = ?10,
                 perm = ?11, uid = ?12, gid = ?13, owner_here = ?14, atime_ns = ?15
             WHERE seq = ?1",
            )?
            .execute(params![
                r.fid as i64,
                r.nas_ino as i64,
                r.path.as_bytes(),
                r.base.ino as i64,
                r.base.size as i64,
                nanos(r.base.mtime),
                nanos(r.base.ctime),
                r.state.as_str(),
                encode_args(r),
                r.path2.as_ref().map(|p| p.as_bytes().to_vec()),
                r.owner.map(|o| o.0 as i64),
                r.owner.map(|o| o.1 as i64),
                r.owner.map(|o| o.2 as i64),
                r.owner_here as i64,
                r.atime.map(nanos),
            ])?;
        Ok(())
    }

    pub fn delete(&self, fid: u64) -> Result<(), CacheError> {
        self.conn()
            .prepare_cached("DELETE FROM ops WHERE seq = ?1")?
            .execute([fid as i64])?;
        Ok(())
    }

    /// Makes every commit so far durable (syncs the WAL).
    pub fn commit_durable(&self) -> Result<(), CacheError> {
        let conn = self.conn();
        conn.pragma_update(None, "synchronous", "FULL")?;
        // An empty write transaction: committing it syncs the WAL, and with
        // it every frame appended before.
        let r = conn.execute("UPDATE meta SET value = value WHERE key = 'format'", []);
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        r?;
        Ok(())
    }

    /// Folds the WAL into the database file (at a clean stop), so that
    /// the journal is one self-contained file.
    pub fn checkpoint(&self) -> Result<(), CacheError> {
        self.conn()
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }

    /// Every data row, oldest first. A row that cannot be decoded is an
    /// error: nothing is dropped silently.
    pub fn load_data(&self) -> Result<Vec<DataRecord>, CacheError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT seq, nas_ino, path, base_ino, base_size, base_mtime_ns, base_ctime_ns,
                    state, args, created_ns, kind, path2, perm, uid, gid, owner_here, atime_ns
             FROM ops ORDER BY seq",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                (
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                ),
                r.get::<_, String>(7)?,
                r.get::<_, Vec<u8>>(8)?,
                r.get::<_, i64>(9)?,
                r.get::<_, String>(10)?,
                r.get::<_, Option<Vec<u8>>>(11)?,
                (
                    r.get::<_, Option<i64>>(12)?,
                    r.get::<_, Option<i64>>(13)?,
                    r.get::<_, Option<i64>>(14)?,
                ),
                (r.get::<_, i64>(15)?, r.get::<_, Option<i64>>(16)?),
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (
                seq,
                nas_ino,
                path,
                (bi, bs, bm, bc),
                state,
                args,
                created,
                kind,
                path2,
                own,
                (own_here, atime),
            ) = row?;
            let bad = |what: &str| CacheError::Setup {
                path: self.dir.join("journal.sqlite").display().to_string(),
                reason: format!("journal row {seq} ({kind}): {what}; left as it is"),
            };
            if kind != "data" {
                return Err(bad("an operation this nassync does not know"));
            }
            let state = RowState::parse(&state).ok_or_else(|| bad("unknown state"))?;
            let (size, trunc, mtime, ranges) =
                decode_args(&args).ok_or_else(|| bad("damaged payload"))?;
            out.push(DataRecord {
                fid: seq as u64,
                nas_ino: nas_ino as u64,
                path: OsString::from_vec(path),
                path2: path2.map(OsString::from_vec),
                base: Validator {
                    ino: bi as u64,
                    size: bs as u64,
                    mtime: from_nanos(bm),
                    ctime: from_nanos(bc),
                },
                state,
                size,
                trunc,
                mtime,
                ranges,
                created: from_nanos(created),
                owner: match own {
                    (Some(p), Some(u), Some(g)) => Some((p as u16, u as u32, g as u32)),
                    _ => None,
                },
                owner_here: own_here != 0,
                atime: atime.map(from_nanos),
            });
        }
        Ok(out)
    }

    pub fn add_conflict(&self, c: &ConflictRecord) -> Result<(), CacheError> {
        self.conn().execute(
            "INSERT INTO conflicts (at_ns, path, kept_as, reason) VALUES (?1, ?2, ?3, ?4)",
            params![
                nanos(c.at),
                c.path.as_bytes(),
                c.kept_as.as_bytes(),
                c.reason
            ],
        )?;
        Ok(())
    }

    /// The most recent conflicts, newest last.
    pub fn conflicts(&self, limit: usize) -> Result<Vec<ConflictRecord>, CacheError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT at_ns, path, kept_as, reason FROM
               (SELECT * FROM conflicts ORDER BY id DESC LIMIT ?1) ORDER BY id",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            Ok(ConflictRecord {
                at: from_nanos(r.get(0)?),
                path: OsString::from_vec(r.get(1)?),
                kept_as: OsString::from_vec(r.get(2)?),
                reason: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// Where a local object is: in a directory that is local too, or in one
/// on the NAS, by its path from the share's root.
#[derive(Clone, Debug, PartialEq)]
pub enum ObjParent {
    Local(u64),
    Nas(OsString),
}

/// An object created through the mount that is not on the NAS yet (see
/// `backend::overlay`): where it is, and its attributes. A file's content
/// is in `upper/<prov>`.
#[derive(Clone, Debug, PartialEq)]
pub struct ObjectRecord {
    pub prov: u64,
    pub kind: FileKind,
    pub parent: ObjParent,
    pub name: OsString,
    /// Being created on the NAS: after a crash, the NAS may hold it.
    pub applying: bool,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub target: Option<OsString>,
    pub created: SystemTime,
    /// The NAS's inode number of the file being filled under its hidden
    /// name, once made: after a crash, a file at its name with this number
    /// is this one (renamed into place just before).
    pub nas_ino: Option<u64>,
    /// A further name of new file `link_to` (a hard link made here): made
    /// on the NAS as a link once that file is there. Its kind is the
    /// file's; its attributes are not used.
    pub link_to: Option<u64>,
}

/// What an unfinished creation on the NAS may have left there (see
/// `backend::overlay`), to remove where it is surely that creation's.
#[derive(Clone, Debug, PartialEq)]
pub struct LeftoverRecord {
    pub id: u64,
    pub dir_path: OsString,
    pub name: OsString,
    pub hidden: OsString,
    pub kind: FileKind,
    pub size: u64,
    pub mtime: SystemTime,
    pub target: Option<OsString>,
    pub nas_ino: Option<u64>,
}

/// A NAS object removed here while the NAS did not answer (see
/// `backend::overlay`): `was` is the version removed.
#[derive(Clone, Debug, PartialEq)]
pub struct RemovalRecord {
    pub id: u64,
    pub dir_path: OsString,
    pub name: OsString,
    pub kind: FileKind,
    pub was: Validator,
    /// A rename rather than a removal: the directory (path from the
    /// share's root, as it is once the changes before this one are made)
    /// and the name it moves to.
    pub to: Option<(OsString, OsString)>,
    /// With `to`: a hard link made there, the object staying where it is.
    pub link: bool,
    /// Neither a removal nor a rename: attributes set here.
    pub set: Option<SetRecord>,
    /// With `set` (its attributes all None): an extended attribute set or
    /// removed here instead.
    pub xattr: Option<XattrRecord>,
}

/// An extended attribute of a NAS object set (`value`) or removed (None)
/// here while the NAS did not answer.
#[derive(Clone, Debug, PartialEq)]
pub struct XattrRecord {
    pub name: OsString,
    pub value: Option<Vec<u8>>,
}

/// Attributes of a NAS object set here while the NAS did not answer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SetRecord {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
    /// When they were set (the object's ctime here).
    pub ctime: SystemTime,
}

/// A NAS inode number that stands for a local object's provisional one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AliasRecord {
    pub nas_ino: u64,
    pub prov: u64,
    pub nas_ctime: SystemTime,
    pub local_ctime: SystemTime,
}

fn kind_code(k: FileKind) -> i64 {
    match k {
        FileKind::File => 1,
        FileKind::Dir => 2,
        FileKind::Symlink => 3,
        FileKind::Fifo => 4,
        FileKind::Socket => 5,
        FileKind::CharDev => 6,
        FileKind::BlockDev => 7,
    }
}

fn kind_of(c: i64) -> Option<FileKind> {
    Some(match c {
        1 => FileKind::File,
        2 => FileKind::Dir,
        3 => FileKind::Symlink,
        4 => FileKind::Fifo,
        5 => FileKind::Socket,
        6 => FileKind::CharDev,
        7 => FileKind::BlockDev,
        _ => return None,
    })
}

/// perm u16, uid u32, gid u32, rdev u64, atime, mtime, ctime (i64 ns),
/// then the symlink target if any; little-endian, zstd-compressed.
fn encode_obj(r: &ObjectRecord) -> Vec<u8> {
    let mut raw = Vec::with_capacity(48);
    raw.extend_from_slice(&r.perm.to_le_bytes());
    raw.extend_from_slice(&r.uid.to_le_bytes());
    raw.extend_from_slice(&r.gid.to_le_bytes());
    raw.extend_from_slice(&r.rdev.to_le_bytes());
    for t in [r.atime, r.mtime, r.ctime] {
        raw.extend_from_slice(&nanos(t).to_le_bytes());
    }
    if let Some(t) = &r.target {
        raw.extend_from_slice(t.as_bytes());
    }
    compress(raw)
}

type ObjArgs = (u16, u32, u32, u64, [SystemTime; 3], Vec<u8>);

fn decode_obj(blob: &[u8]) -> Option<ObjArgs> {
    let raw = zstd::stream::decode_all(blob).ok()?;
    if raw.len() < 42 {
        return None;
    }
    let perm = u16::from_le_bytes(raw[0..2].try_into().ok()?);
    let uid = u32::from_le_bytes(raw[2..6].try_into().ok()?);
    let gid = u32::from_le_bytes(raw[6..10].try_into().ok()?);
    let rdev = u64::from_le_bytes(raw[10..18].try_into().ok()?);
    let t = |i: usize| -> Option<SystemTime> {
        Some(from_nanos(i64::from_le_bytes(
            raw[i..i + 8].try_into().ok()?,
        )))
    };
    let times = [t(18)?, t(26)?, t(34)?];
    Some((perm, uid, gid, rdev, times, raw[42..].to_vec()))
}

impl Journal {
    /// The cache directory the journal is in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `upper/<prov>`: the content of a local file.
    pub fn upper_path(&self, prov: u64) -> PathBuf {
        self.dir.join("upper").join(format!("{prov:016x}"))
    }

    pub fn upper_dir(&self) -> PathBuf {
        self.dir.join("upper")
    }

    /// Adds or replaces the row of a local object; `next_prov` is stored
    /// with it, so that a provisional number is never handed out twice.
    pub fn put_object(&self, r: &ObjectRecord, next_prov: u64) -> Result<(), CacheError> {
        let mut conn = self.conn();
        if self.next_prov_stored.load(Ordering::Relaxed) == next_prov {
            // One statement, one implicit transaction.
            Self::put_in(&conn, r)?;
            return Ok(());
        }
        let tx = conn.transaction()?;
        Self::put_in(&tx, r)?;
        tx.prepare_cached("INSERT OR REPLACE INTO meta VALUES ('next_prov', ?1)")?
            .execute([next_prov as i64])?;
        tx.commit()?;
        self.next_prov_stored.store(next_prov, Ordering::Relaxed);
        Ok(())
    }

    fn put_in(conn: &Connection, r: &ObjectRecord) -> Result<(), CacheError> {
        let (pp, path) = match &r.parent {
            ObjParent::Local(p) => (Some(*p as i64), None),
            ObjParent::Nas(path) => (None, Some(path.as_bytes().to_vec())),
        };
        conn.prepare_cached(
            "INSERT OR REPLACE INTO objects
                 (prov, kind, parent_prov, parent_path, name, state, args, created_ns, nas_ino,
                  link_to)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?
        .execute(params![
            r.prov as i64,
            kind_code(r.kind),
            pp,
            path,
            r.name.as_bytes(),
            if r.applying { "applying" } else { "pending" },
            encode_obj(r),
            nanos(r.created),
            r.nas_ino.map(|i| i as i64),
            r.link_to.map(|i| i as i64),
        ])?;
        Ok(())
    }

    fn delete_obj_row(conn: &Connection, prov: u64) -> Result<(), CacheError> {
        conn.prepare_cached("DELETE FROM objects WHERE prov = ?1")?
            .execute([prov as i64])?;
        conn.prepare_cached("DELETE FROM xattrs WHERE prov = ?1")?
            .execute([prov as i64])?;
        Ok(())
    }

    /// Sets (or with None removes) extended attribute `name` of new object
    /// `prov`.
    pub fn set_xattr(
        &self,
        prov: u64,
        name: &OsStr,
        value: Option<&[u8]>,
    ) -> Result<(), CacheError> {
        let conn = self.conn();
        match value {
            Some(v) => conn
                .prepare_cached("INSERT OR REPLACE INTO xattrs VALUES (?1, ?2, ?3)")?
                .execute(params![prov as i64, name.as_bytes(), v])?,
            None => conn
                .prepare_cached("DELETE FROM xattrs WHERE prov = ?1 AND name = ?2")?
                .execute(params![prov as i64, name.as_bytes()])?,
        };
        Ok(())
    }

    /// The extended attributes of new objects: (prov, name, value).
    #[allow(clippy::type_complexity)]
    pub fn xattrs(&self) -> Result<Vec<(u64, OsString, Vec<u8>)>, CacheError> {
        let conn = self.conn();
        let mut q = conn.prepare("SELECT prov, name, value FROM xattrs")?;
        let rows = q.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                OsString::from_vec(r.get::<_, Vec<u8>>(1)?),
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Drops the data rows of the file write-back knows as `nas_ino`, in
    /// the caller's transaction.
    fn delete_data_of(tx: &rusqlite::Transaction, nas_ino: u64) -> Result<(), CacheError> {
        tx.prepare_cached("DELETE FROM ops WHERE nas_ino = ?1 AND kind = 'data'")?
            .execute([nas_ino as i64])?;
        Ok(())
    }

    /// Puts the rows `put` and deletes the rows `delete` in one
    /// transaction (a name of a new file handed to one of its links).
    pub fn replace_objects(&self, put: &[ObjectRecord], delete: &[u64]) -> Result<(), CacheError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for r in put {
            Self::put_in(&tx, r)?;
        }
        for p in delete {
            Self::delete_obj_row(&tx, *p)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// A local object removed before it reached the NAS: its row goes, and
    /// in the same transaction the data rows of its content (write-back
    /// knows it by its provisional number). Apart, a crash between the two
    /// would leave a data row whose file is gone, which write-back takes for
    /// a file removed by another client and restores (docs/SEMANTICS.md).
    pub fn delete_object(&self, prov: u64) -> Result<(), CacheError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        Self::delete_obj_row(&tx, prov)?;
        Self::delete_data_of(&tx, prov)?;
        tx.commit()?;
        Ok(())
    }

    /// The object is on the NAS now, as `alias.nas_ino`: its row goes, the
    /// alias stays while anything may know it by its provisional number.
    /// `children`, new objects in it, are now in a directory on the NAS:
    /// their rows name it by path from now on, in the same transaction;
    /// the rows of `links`, its further names made with it, go too. A
    /// directory made under the conflict name takes along the rows under
    /// the paths of what it holds (`moved`: from the old path of each to
    /// the new): the changes still to make (renames into it, what acts on
    /// them after) and the rows of now; a crash before those changes are
    /// made then finds it.
    pub fn object_created(
        &self,
        alias: &AliasRecord,
        children: &[ObjectRecord],
        links: &[u64],
        moved: &[(OsString, OsString)],
    ) -> Result<(), CacheError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        Self::delete_obj_row(&tx, alias.prov)?;
        for l in links {
            Self::delete_obj_row(&tx, *l)?;
        }
        for c in children {
            Self::put_in(&tx, c)?;
        }
        if !moved.is_empty() {
            type Row = (i64, Vec<u8>, Vec<u8>, Option<Vec<u8>>, Option<Vec<u8>>);
            let rows: Vec<Row> = {
                let mut stmt =
                    tx.prepare("SELECT id, dir_path, name, to_dir_path, to_name FROM removals")?;
                let it = stmt.query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?;
                it.collect::<Result<_, _>>()?
            };
            // The directory of `dir/name` once that path moved, if it did.
            let follow = |dir: &[u8], name: &[u8]| {
                let full = join_bytes(dir, name);
                moved.iter().find_map(|(o, n)| {
                    let mut np = under_moved(&full, o, n)?;
                    np.truncate(np.len().saturating_sub(name.len() + 1));
                    Some(np)
                })
            };
            for (id, dir, name, to_dir, to_name) in rows {
                if let Some(np) = follow(&dir, &name) {
                    tx.execute(
                        "UPDATE removals SET dir_path = ?2 WHERE id = ?1",
                        params![id, np],
                    )?;
                }
                if let Some(np) = to_dir.zip(to_name).and_then(|(d, n)| follow(&d, &n)) {
                    tx.execute(
                        "UPDATE removals SET to_dir_path = ?2 WHERE id = ?1",
                        params![id, np],
                    )?;
                }
            }
            Self::repath_all_in(&tx, moved, true)?;
        }
        tx.prepare_cached("INSERT OR REPLACE INTO aliases VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![
                alias.nas_ino as i64,
                alias.prov as i64,
                nanos(alias.nas_ctime),
                nanos(alias.local_ctime)
            ])?;
        tx.commit()?;
        Ok(())
    }

    /// Every local object, oldest first, and the next provisional number.
    pub fn load_objects(&self) -> Result<(Vec<ObjectRecord>, u64), CacheError> {
        let conn = self.conn();
        let next: Option<i64> = conn
            .query_row("SELECT value FROM meta WHERE key = 'next_prov'", [], |r| {
                r.get(0)
            })
            .optional()?;
        let mut stmt = conn.prepare(
            "SELECT prov, kind, parent_prov, parent_path, name, state, args, created_ns, nas_ino,
                    link_to
             FROM objects ORDER BY prov",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, Option<Vec<u8>>>(3)?,
                r.get::<_, Vec<u8>>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, Vec<u8>>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, Option<i64>>(8)?,
                r.get::<_, Option<i64>>(9)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (prov, kind, pp, path, name, state, args, created, nas_ino, link_to) = row?;
            let bad = |what: &str| CacheError::Setup {
                path: self.dir.join("journal.sqlite").display().to_string(),
                reason: format!("journal object {prov}: {what}; left as it is"),
            };
            let kind = kind_of(kind).ok_or_else(|| bad("unknown kind"))?;
            let parent = match (pp, path) {
                (Some(p), _) => ObjParent::Local(p as u64),
                (None, Some(path)) => ObjParent::Nas(OsString::from_vec(path)),
                (None, None) => return Err(bad("no parent")),
            };
            let (perm, uid, gid, rdev, [atime, mtime, ctime], target) =
                decode_obj(&args).ok_or_else(|| bad("damaged payload"))?;
            out.push(ObjectRecord {
                prov: prov as u64,
                kind,
                parent,
                name: OsString::from_vec(name),
                applying: state == "applying",
                perm,
                uid,
                gid,
                rdev,
                atime,
                mtime,
                ctime,
                target: (kind == FileKind::Symlink).then(|| OsString::from_vec(target)),
                created: from_nanos(created),
                nas_ino: nas_ino.map(|i| i as u64),
                link_to: link_to.map(|i| i as u64),
            });
        }
        Ok((out, next.unwrap_or(0) as u64))
    }

    pub fn load_aliases(&self) -> Result<Vec<AliasRecord>, CacheError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT nas_ino, prov, nas_ctime_ns, local_ctime_ns FROM aliases")?;
        let rows = stmt.query_map([], |r| {
            Ok(AliasRecord {
                nas_ino: r.get::<_, i64>(0)? as u64,
                prov: r.get::<_, i64>(1)? as u64,
                nas_ctime: from_nanos(r.get(2)?),
                local_ctime: from_nanos(r.get(3)?),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records a leftover; returns its id.
    pub fn add_leftover(&self, l: &LeftoverRecord) -> Result<u64, CacheError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO leftovers (dir_path, name, hidden, kind, size, mtime_ns, target, nas_ino)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                l.dir_path.as_bytes(),
                l.name.as_bytes(),
                l.hidden.as_bytes(),
                kind_code(l.kind),
                l.size as i64,
                nanos(l.mtime),
                l.target.as_ref().map(|t| t.as_bytes().to_vec()),
                l.nas_ino.map(|i| i as i64),
            ],
        )?;
        Ok(conn.last_insert_rowid() as u64)
    }

    pub fn delete_leftover(&self, id: u64) -> Result<(), CacheError> {
        self.conn()
            .execute("DELETE FROM leftovers WHERE id = ?1", [id as i64])?;
        Ok(())
    }

    pub fn load_leftovers(&self) -> Result<Vec<LeftoverRecord>, CacheError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, dir_path, name, hidden, kind, size, mtime_ns, target, nas_ino
             FROM leftovers",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, Vec<u8>>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, Option<Vec<u8>>>(7)?,
                r.get::<_, Option<i64>>(8)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, dir, name, hidden, kind, size, mtime, target, nas_ino) = row?;
            let Some(kind) = kind_of(kind) else { continue };
            out.push(LeftoverRecord {
                id: id as u64,
                dir_path: OsString::from_vec(dir),
                name: OsString::from_vec(name),
                hidden: OsString::from_vec(hidden),
                kind,
                size: size as u64,
                mtime: from_nanos(mtime),
                target: target.map(OsString::from_vec),
                nas_ino: nas_ino.map(|i| i as u64),
            });
        }
        Ok(out)
    }

    /// Records a removal (committed: it is the removal's only trace);
    /// returns its id. The data rows of a removed file (`data_of`: the
    /// number write-back knows it by) go in the same transaction: kept past
    /// a crash, write-back would take the file for one removed by another
    /// client and restore it.
    pub fn add_removal(&self, r: &RemovalRecord, data_of: Option<u64>) -> Result<u64, CacheError> {
        self.add_change(r, data_of, &[])
    }

    /// Records a removal or a rename (`r.to`), and in the same transaction
    /// drops the data rows of `data_of` (see [`Journal::add_removal`]) and
    /// rewrites the object rows `objects` (new objects under a directory
    /// renamed: their path changed with it).
    pub fn add_change(
        &self,
        r: &RemovalRecord,
        data_of: Option<u64>,
        objects: &[ObjectRecord],
    ) -> Result<u64, CacheError> {
        let ids = self.add_changes(&[(r, data_of)], objects, None)?;
        Ok(ids[0])
    }

    /// Several changes in one transaction, in order (a removal and the
    /// rename over what it removed); with `repath` (a directory renamed),
    /// the leftover rows under its old path follow it: they name it by
    /// its path as it will be once the rename is made (the object rows
    /// are in `objects`; the data rows follow through write-back). Their
    /// ids.
    pub fn add_changes(
        &self,
        changes: &[(&RemovalRecord, Option<u64>)],
        objects: &[ObjectRecord],
        repath: Option<(&OsStr, &OsStr)>,
    ) -> Result<Vec<u64>, CacheError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut ids = Vec::new();
        for (r, data_of) in changes {
            tx.execute(
                "INSERT INTO removals (dir_path, name, kind, nas_ino, size, mtime_ns, ctime_ns,
                     to_dir_path, to_name, to_link, set_mode, set_uid, set_gid, set_atime_ns,
                     set_mtime_ns, set_ctime_ns, xattr_name, xattr_value)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
                     ?17, ?18)",
                params![
                    r.dir_path.as_bytes(),
                    r.name.as_bytes(),
                    kind_code(r.kind),
                    r.was.ino as i64,
                    r.was.size as i64,
                    nanos(r.was.mtime),
                    nanos(r.was.ctime),
                    r.to.as_ref().map(|t| t.0.as_bytes()),
                    r.to.as_ref().map(|t| t.1.as_bytes()),
                    r.link as i64,
                    r.set.and_then(|s| s.mode),
                    r.set.and_then(|s| s.uid),
                    r.set.and_then(|s| s.gid),
                    r.set.and_then(|s| s.atime).map(nanos),
                    r.set.and_then(|s| s.mtime).map(nanos),
                    r.set.map(|s| nanos(s.ctime)),
                    r.xattr.as_ref().map(|x| x.name.as_bytes()),
                    r.xattr.as_ref().and_then(|x| x.value.as_deref()),
                ],
            )?;
            ids.push(tx.last_insert_rowid() as u64);
            if let Some(ino) = data_of {
                Self::delete_data_of(&tx, *ino)?;
            }
        }
        if let Some((old, new)) = repath {
            Self::repath_in(&tx, old, new, false)?;
        }
        for o in objects {
            Self::put_in(&tx, o)?;
        }
        tx.commit()?;
        Ok(ids)
    }

    /// NAS object `ino`, renamed here to `old` by change `id`, is at `new`
    /// on the NAS instead (the name was taken there: a conflict). The
    /// changes after `id` that act on it by that name, or on paths under
    /// it, follow, up to the first that moves it away or puts something
    /// else at `old`; past that, `old` is another object's. If it is
    /// still at `old` once all are made, the other rows under `old`
    /// (objects, data, leftovers: they hold the paths of now) follow too.
    /// Returns whether it is (the caller's rows in memory then follow).
    pub fn repath(&self, id: u64, ino: u64, old: &OsStr, new: &OsStr) -> Result<bool, CacheError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let new_name = Path::new(new).file_name().unwrap_or(new);
        let later: Vec<LaterRow> = {
            let mut stmt = tx.prepare(
                "SELECT id, dir_path, name, nas_ino, to_dir_path, to_name, to_link,
                        set_ctime_ns IS NOT NULL
                 FROM removals WHERE id > ?1 ORDER BY id",
            )?;
            let it = stmt.query_map([id as i64], |r| {
                Ok(LaterRow {
                    id: r.get(0)?,
                    dir: r.get(1)?,
                    name: r.get(2)?,
                    ino: r.get(3)?,
                    to_dir: r.get(4)?,
                    to_name: r.get(5)?,
                    link: r.get::<_, i64>(6)? != 0,
                    set: r.get(7)?,
                })
            })?;
            it.collect::<Result<_, _>>()?
        };
        let mut there = true;
        for LaterRow {
            id: rid,
            dir,
            name,
            ino: nino,
            to_dir,
            to_name,
            link,
            set,
        } in later
        {
            let to = to_dir.as_deref().zip(to_name.as_deref());
            if join_bytes(&dir, &name) == old.as_bytes() && nino as u64 == ino {
                tx.execute(
                    "UPDATE removals SET name = ?2 WHERE id = ?1",
                    params![rid, new_name.as_bytes()],
                )?;
                // Renamed away or removed: `old` is no longer it.
                if (to.is_some() && !link) || (to.is_none() && !set) {
                    there = false;
                    break;
                }
                continue;
            }
            for col in ["dir_path", "to_dir_path"] {
                let p = if col == "dir_path" {
                    Some(dir.as_slice())
                } else {
                    to_dir.as_deref()
                };
                if let Some(np) = p.and_then(|p| under_moved(p, old, new)) {
                    tx.execute(
                        &format!("UPDATE removals SET {col} = ?2 WHERE id = ?1"),
                        params![rid, np],
                    )?;
                }
            }
            if to.is_some_and(|(d, n)| join_bytes(d, n) == old.as_bytes()) {
                there = false;
                break;
            }
        }
        if there {
            Self::repath_in(&tx, old, new, true)?;
        }
        tx.commit()?;
        Ok(there)
    }

    /// The rows of now (leftovers; with `all`, also objects and data)
    /// under `old` follow to `new`.
    fn repath_in(tx: &Connection, old: &OsStr, new: &OsStr, all: bool) -> Result<(), CacheError> {
        Self::repath_all_in(tx, &[(old.to_os_string(), new.to_os_string())], all)
    }

    /// [`Self::repath_in`] for several moves (`moved`: old, new), in one
    /// pass over each table.
    fn repath_all_in(
        tx: &Connection,
        moved: &[(OsString, OsString)],
        all: bool,
    ) -> Result<(), CacheError> {
        let mut cols = vec![("leftovers", "id", "dir_path")];
        if all {
            cols.extend([
                ("objects", "prov", "parent_path"),
                ("ops", "seq", "path"),
                ("ops", "seq", "path2"),
            ]);
        }
        for (table, key, col) in cols {
            let rows: Vec<(i64, Vec<u8>)> = {
                let mut stmt = tx.prepare(&format!(
                    "SELECT {key}, {col} FROM {table} WHERE {col} IS NOT NULL"
                ))?;
                let it = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                it.collect::<Result<_, _>>()?
            };
            for (k, p) in rows {
                if let Some(np) = moved.iter().find_map(|(o, n)| under_moved(&p, o, n)) {
                    tx.execute(
                        &format!("UPDATE {table} SET {col} = ?2 WHERE {key} = ?1"),
                        params![k, np],
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Rename `id` is undone (`to` None: its row becomes the removal of
    /// the object where it was, in its place in the order, of version
    /// `was`), or done again (`to`: where to), and the data rows of
    /// `data_of` go, in one transaction.
    pub fn reshape(
        &self,
        id: u64,
        to: Option<(&OsStr, &OsStr)>,
        was: &Validator,
        data_of: Option<u64>,
    ) -> Result<(), CacheError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE removals SET to_dir_path = ?2, to_name = ?3, to_link = 0, nas_ino = ?4,
                 size = ?5, mtime_ns = ?6, ctime_ns = ?7
             WHERE id = ?1",
            params![
                id as i64,
                to.map(|t| t.0.as_bytes()),
                to.map(|t| t.1.as_bytes()),
                was.ino as i64,
                was.size as i64,
                nanos(was.mtime),
                nanos(was.ctime),
            ],
        )?;
        if let Some(ino) = data_of {
            Self::delete_data_of(&tx, ino)?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn delete_removal(&self, id: u64) -> Result<(), CacheError> {
        self.conn()
            .execute("DELETE FROM removals WHERE id = ?1", [id as i64])?;
        Ok(())
    }

    /// The removals in the order they were made.
    pub fn load_removals(&self) -> Result<Vec<RemovalRecord>, CacheError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, dir_path, name, kind, nas_ino, size, mtime_ns, ctime_ns,
                 to_dir_path, to_name, to_link, set_mode, set_uid, set_gid, set_atime_ns,
                 set_mtime_ns, set_ctime_ns, xattr_name, xattr_value
             FROM removals ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                (
                    r.get::<_, i64>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, i64>(3)?,
                ),
                (
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, i64>(7)?,
                ),
                r.get::<_, Option<Vec<u8>>>(8)?,
                r.get::<_, Option<Vec<u8>>>(9)?,
                r.get::<_, i64>(10)?,
                (
                    r.get::<_, Option<u32>>(11)?,
                    r.get::<_, Option<u32>>(12)?,
                    r.get::<_, Option<u32>>(13)?,
                    r.get::<_, Option<i64>>(14)?,
                    r.get::<_, Option<i64>>(15)?,
                    r.get::<_, Option<i64>>(16)?,
                ),
                (
                    r.get::<_, Option<Vec<u8>>>(17)?,
                    r.get::<_, Option<Vec<u8>>>(18)?,
                ),
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (
                (id, dir, name, kind),
                (ino, size, mtime, ctime),
                to_dir,
                to_name,
                link,
                (mode, uid, gid, sa, sm, sc),
                (xname, xvalue),
            ) = row?;
            let set = sc.map(|sc| SetRecord {
                mode,
                uid,
                gid,
                atime: sa.map(from_nanos),
                mtime: sm.map(from_nanos),
                ctime: from_nanos(sc),
            });
            let Some(kind) = kind_of(kind) else { continue };
            let to = match (to_dir, to_name) {
                (Some(d), Some(n)) => Some((OsString::from_vec(d), OsString::from_vec(n))),
                _ => None,
            };
            out.push(RemovalRecord {
                id: id as u64,
                dir_path: OsString::from_vec(dir),
                name: OsString::from_vec(name),
                kind,
                was: Validator {
                    ino: ino as u64,
                    size: size as u64,
                    mtime: from_nanos(mtime),
                    ctime: from_nanos(ctime),
                },
                link: link != 0 && to.is_some(),
                xattr: xname
                    .filter(|_| set.is_some() && to.is_none())
                    .map(|n| XattrRecord {
                        name: OsString::from_vec(n),
                        value: xvalue,
                    }),
                set: set.filter(|_| to.is_none()),
                to,
            });
        }
        Ok(out)
    }

    /// nassync itself renamed NAS file `ino` (a rename made while the NAS
    /// did not answer, applied at mount): the data rows whose base had its
    /// ctime of before, `old`, get the one of after (it is not another
    /// client's change).
    pub fn rebase_ctime(
        &self,
        ino: u64,
        old: SystemTime,
        new: SystemTime,
    ) -> Result<usize, CacheError> {
        Ok(self.conn().execute(
            "UPDATE ops SET base_ctime_ns = ?3 WHERE base_ino = ?1 AND base_ctime_ns = ?2",
            params![ino as i64, nanos(old), nanos(new)],
        )?)
    }

    /// Drops the aliases that no data row refers to: at mount, nothing
    /// else knows a provisional number any more.
    pub fn prune_aliases(&self) -> Result<usize, CacheError> {
        Ok(self.conn().execute(
            "DELETE FROM aliases WHERE prov NOT IN (SELECT nas_ino FROM ops)",
            [],
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new file's row, in directory "dir" of the NAS.
    const PROV_TEST: u64 = 0xFFFF_0000_0000_0010;

    fn object(prov: u64) -> ObjectRecord {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        ObjectRecord {
            prov,
            kind: FileKind::File,
            parent: ObjParent::Nas(OsString::from("dir")),
            name: OsString::from("new"),
            applying: false,
            perm: 0o644,
            uid: 0,
            gid: 0,
            rdev: 0,
            atime: t,
            mtime: t,
            ctime: t,
            target: None,
            created: t,
            nas_ino: None,
            link_to: None,
        }
    }

    fn record() -> DataRecord {
        let mut ranges = RangeSet::new();
        ranges.insert(4096, 8192);
        ranges.insert(1 << 30, (1 << 30) + 7);
        let t = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        DataRecord {
            fid: 0,
            nas_ino: 42,
            path: OsString::from("dir/file.txt"),
            path2: Some(OsString::from("dir/new name.txt")),
            base: Validator {
                ino: 42,
                size: 10,
                mtime: t,
                ctime: t,
            },
            state: RowState::Pending,
            size: (1 << 30) + 7,
            trunc: 10,
            mtime: t,
            ranges,
            created: t,
            owner: Some((0o640, 1000, 100)),
            owner_here: true,
            atime: Some(t + Duration::from_nanos(3)),
        }
    }

    #[test]
    fn rows_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = record();
        {
            let j = Journal::open(dir.path()).unwrap();
            r.fid = j.insert_data(&r).unwrap();
            r.state = RowState::Applying;
            j.update_data(&r).unwrap();
            j.commit_durable().unwrap();
        }
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.load_data().unwrap(), vec![r.clone()]);
        j.delete(r.fid).unwrap();
        assert!(j.load_data().unwrap().is_empty());
    }

    /// A format-3 journal (before hard links of new files, attributes in
    /// data rows, and xattrs of new objects) is upgraded in place and keeps
    /// its objects and rows; a newer format is refused, untouched.
    #[test]
    fn a_format_3_journal_is_upgraded_and_a_newer_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let obj = object(0xFFFF_0000_0000_0009);
        {
            let j = Journal::open(dir.path()).unwrap();
            j.put_object(&obj, obj.prov + 1).unwrap();
            j.insert_data(&record()).unwrap();
            j.conn()
                .execute_batch(
                    "ALTER TABLE objects DROP COLUMN link_to;
                     ALTER TABLE ops DROP COLUMN owner_here;
                     ALTER TABLE ops DROP COLUMN atime_ns;
                     ALTER TABLE ops DROP COLUMN perm;
                     ALTER TABLE ops DROP COLUMN uid;
                     ALTER TABLE ops DROP COLUMN gid;
                     ALTER TABLE removals DROP COLUMN to_dir_path;
                     ALTER TABLE removals DROP COLUMN to_name;
                     ALTER TABLE removals DROP COLUMN to_link;
                     ALTER TABLE removals DROP COLUMN set_mode;
                     ALTER TABLE removals DROP COLUMN set_uid;
                     ALTER TABLE removals DROP COLUMN set_gid;
                     ALTER TABLE removals DROP COLUMN set_atime_ns;
                     ALTER TABLE removals DROP COLUMN set_mtime_ns;
                     ALTER TABLE removals DROP COLUMN set_ctime_ns;
                     ALTER TABLE removals DROP COLUMN xattr_name;
                     ALTER TABLE removals DROP COLUMN xattr_value;
                     DROP TABLE xattrs;
                     UPDATE meta SET value = 3 WHERE key = 'format';",
                )
                .unwrap();
        }
        let j = Journal::open(dir.path()).unwrap();
        let (objs, next) = j.load_objects().unwrap();
        assert_eq!((objs, next), (vec![obj.clone()], obj.prov + 1));
        let mut link = obj.clone();
        link.prov += 1;
        link.link_to = Some(obj.prov);
        j.put_object(&link, link.prov + 1).unwrap();
        assert_eq!(j.load_objects().unwrap().0, vec![obj, link]);
        // The data row is kept, without what format 3 did not hold.
        let rows = j.load_data().unwrap();
        let mut r = record();
        (r.fid, r.owner, r.owner_here, r.atime) = (rows[0].fid, None, false, None);
        assert_eq!(rows, vec![r.clone()]);
        r.owner = Some((0o600, 7, 8));
        r.owner_here = true;
        j.update_data(&r).unwrap();
        assert_eq!(j.load_data().unwrap(), vec![r]);
        // Format 6: removals and renames, in order.
        let mut gone = RemovalRecord {
            id: 0,
            dir_path: "a".into(),
            name: "b".into(),
            kind: FileKind::File,
            was: record().base,
            to: None,
            link: false,
            set: None,
            xattr: None,
        };
        let mut set = gone.clone();
        set.set = Some(SetRecord {
            mode: Some(0o750),
            uid: None,
            gid: Some(7),
            atime: None,
            mtime: Some(UNIX_EPOCH + Duration::from_secs(1_000_000_000)),
            ctime: UNIX_EPOCH + Duration::from_nanos(1_100_000_000_123_456_789),
        });
        let mut moved = gone.clone();
        moved.to = Some(("c/d".into(), "e".into()));
        let mut linked = moved.clone();
        linked.link = true;
        gone.id = j.add_removal(&gone, None).unwrap();
        moved.id = j.add_change(&moved, None, &[]).unwrap();
        linked.id = j.add_change(&linked, None, &[]).unwrap();
        set.id = j.add_change(&set, None, &[]).unwrap();
        // Format 8: xattrs of NAS objects; an empty value is not a removal.
        let mut xattrs = Vec::new();
        for value in [Some(b"v".to_vec()), Some(Vec::new()), None] {
            let mut x = gone.clone();
            x.set = Some(SetRecord {
                mode: None,
                uid: None,
                gid: None,
                atime: None,
                mtime: None,
                ctime: UNIX_EPOCH + Duration::from_secs(5),
            });
            x.xattr = Some(XattrRecord {
                name: "user.k".into(),
                value,
            });
            x.id = j.add_change(&x, None, &[]).unwrap();
            xattrs.push(x);
        }
        let mut all = vec![gone, moved, linked, set];
        all.extend(xattrs);
        assert_eq!(j.load_removals().unwrap(), all);
        // Format 7: xattrs of new objects.
        let prov = 0xFFFF_0000_0000_0009;
        j.set_xattr(prov, OsStr::new("user.a"), Some(b"1")).unwrap();
        j.set_xattr(prov, OsStr::new("user.b"), Some(b"2")).unwrap();
        j.set_xattr(prov, OsStr::new("user.b"), None).unwrap();
        assert_eq!(
            j.xattrs().unwrap(),
            vec![(prov, OsString::from("user.a"), b"1".to_vec())]
        );
        j.delete_object(prov).unwrap();
        assert!(j.xattrs().unwrap().is_empty());
        j.conn()
            .execute("UPDATE meta SET value = 9 WHERE key = 'format'", [])
            .unwrap();
        drop(j);
        assert!(Journal::open(dir.path()).is_err());
    }

    /// A renamed object found under another name takes along the rows
    /// under its path and the changes that act on it, and only those
    /// (`dir2` is not under `dir`); past a change that renames it away,
    /// its old path is another's.
    #[test]
    fn rows_follow_a_path_that_moved() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut objs = vec![object(PROV_TEST), object(PROV_TEST + 1)];
        objs[1].parent = ObjParent::Nas("dir2/sub".into());
        for o in &objs {
            j.put_object(o, o.prov + 1).unwrap();
        }
        let mut data = record();
        data.fid = j.insert_data(&data).unwrap();
        let mut change = RemovalRecord {
            id: 0,
            dir_path: "dir/a".into(),
            name: "b".into(),
            kind: FileKind::File,
            was: record().base,
            to: Some(("dir".into(), "c".into())),
            link: false,
            set: None,
            xattr: None,
        };
        change.id = j.add_change(&change, None, &[]).unwrap();
        let ino = 77;
        let mut chmod = change.clone();
        (chmod.dir_path, chmod.name, chmod.to, chmod.was.ino) =
            ("".into(), "dir".into(), None, ino);
        chmod.set = Some(SetRecord {
            mode: Some(0o700),
            uid: None,
            gid: None,
            atime: None,
            mtime: None,
            ctime: UNIX_EPOCH,
        });
        chmod.id = j.add_change(&chmod, None, &[]).unwrap();
        assert!(
            j.repath(0, ino, OsStr::new("dir"), OsStr::new("dir.k"))
                .unwrap()
        );
        objs[0].parent = ObjParent::Nas("dir.k".into());
        assert_eq!(j.load_objects().unwrap().0, objs);
        data.path = "dir.k/file.txt".into();
        data.path2 = Some("dir.k/new name.txt".into());
        assert_eq!(j.load_data().unwrap(), vec![data.clone()]);
        change.dir_path = "dir.k/a".into();
        change.to = Some(("dir.k".into(), "c".into()));
        chmod.name = "dir.k".into();
        assert_eq!(
            j.load_removals().unwrap(),
            vec![change.clone(), chmod.clone()]
        );
        // Renamed away from `dir.k` (to `e`) before a change under it: the
        // change after, and the rows of now, are another object's.
        let mut away = chmod.clone();
        (away.name, away.set, away.to) = ("dir.k".into(), None, Some(("".into(), "e".into())));
        away.id = j.add_change(&away, None, &[]).unwrap();
        let mut after = change.clone();
        after.id = j.add_change(&after, None, &[]).unwrap();
        assert!(
            !j.repath(chmod.id, ino, OsStr::new("dir.k"), OsStr::new("dir.l"))
                .unwrap()
        );
        away.name = "dir.l".into();
        assert_eq!(j.load_removals().unwrap(), vec![change, chmod, away, after]);
        assert_eq!(j.load_data().unwrap(), vec![data]);
    }

    /// A directory made under the conflict name takes along the rows under
    /// what renames put into it (`moved`), in the transaction that records
    /// it as made, and nothing else under its old path.
    #[test]
    fn rows_follow_what_went_into_a_directory_given_the_conflict_name() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut x = object(PROV_TEST);
        (x.kind, x.parent, x.name) = (FileKind::Dir, ObjParent::Nas("r".into()), "x".into());
        let mut inside = object(PROV_TEST + 1);
        inside.parent = ObjParent::Nas("r/x/d".into());
        let mut other = object(PROV_TEST + 2);
        other.parent = ObjParent::Nas("r/x/o".into());
        for o in [&x, &inside, &other] {
            j.put_object(o, PROV_TEST + 3).unwrap();
        }
        let mut data = record();
        (data.path, data.path2) = ("r/x/d/f".into(), Some("r/x/d/g".into()));
        data.fid = j.insert_data(&data).unwrap();
        let mut data_other = record();
        (data_other.nas_ino, data_other.path, data_other.path2) = (43, "r/x/o/f".into(), None);
        data_other.fid = j.insert_data(&data_other).unwrap();
        let row = |dir: &str, name: &str, to: Option<(&str, &str)>| RemovalRecord {
            id: 0,
            dir_path: dir.into(),
            name: name.into(),
            kind: FileKind::File,
            was: record().base,
            to: to.map(|(d, n)| (d.into(), n.into())),
            link: false,
            set: None,
            xattr: None,
        };
        // d renamed into x, something in d removed, a file renamed to
        // where d is not.
        let mut rows = vec![
            row("r", "d", Some(("r/x", "d"))),
            row("r/x/d/sub", "y", None),
            row("r/x", "d", Some(("r/x/d2", "e"))),
            row("r", "h", Some(("r/x", "o2"))),
        ];
        for r in &mut rows {
            r.id = j.add_change(r, None, &[]).unwrap();
        }
        let alias = AliasRecord {
            nas_ino: 7,
            prov: x.prov,
            nas_ctime: UNIX_EPOCH,
            local_ctime: UNIX_EPOCH,
        };
        let moved = [("r/x/d".into(), "r/x.k/d".into())];
        j.object_created(&alias, &[], &[], &moved).unwrap();
        inside.parent = ObjParent::Nas("r/x.k/d".into());
        assert_eq!(j.load_objects().unwrap().0, vec![inside, other]);
        (data.path, data.path2) = ("r/x.k/d/f".into(), Some("r/x.k/d/g".into()));
        assert_eq!(j.load_data().unwrap(), vec![data, data_other]);
        rows[0].to = Some(("r/x.k".into(), "d".into()));
        rows[1].dir_path = "r/x.k/d/sub".into();
        rows[2].dir_path = "r/x.k".into();
        assert_eq!(j.load_removals().unwrap(), rows);
    }

    /// A local object and the data rows of its content go together, and
    /// nothing else does: a crash cannot leave the content of a removed
    /// file to be restored.
    #[test]
    fn a_removed_local_object_takes_its_data_rows_along() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let prov = 0xFFFF_0000_0000_0007;
        let obj = object(prov);
        j.put_object(&obj, prov + 1).unwrap();
        let mut mine = record();
        mine.nas_ino = prov;
        mine.fid = j.insert_data(&mine).unwrap();
        let mut other = record();
        other.fid = j.insert_data(&other).unwrap();
        j.delete_object(prov).unwrap();
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert!(j.load_objects().unwrap().0.is_empty());
        assert_eq!(j.load_data().unwrap(), vec![other]);
    }

    #[test]
    fn a_damaged_journal_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.sqlite");
        std::fs::write(&path, b"this is not a database, but someone's data").unwrap();
        let before = std::fs::read(&path).unwrap();
        let e = Journal::open(dir.path()).err().expect("refused");
        assert!(e.to_string().contains("journal"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn a_second_daemon_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _a = Journal::open(dir.path()).unwrap();
        assert!(Journal::open(dir.path()).is_err());
    }
}
