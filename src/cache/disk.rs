//! The persistent block cache under `cache_dir`: survives remounts, bounded
//! by `cache_size` with LRU eviction.
//!
//! Layout (format version [`FORMAT`]): `index.sqlite` holds, per file, the
//! validator of the version whose blocks are cached, and per block its
//! length, CRC32 and last use; `data/<inode as 16 hex digits>` is a sparse
//! file holding each cached block at its own offset. A block is written to
//! its data file before its row is committed, and checked against its CRC
//! on every read, so a torn or damaged block is a miss, never served.
//! `lock` is held (flock) by the one daemon using the directory.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};

use super::CacheError;
use crate::backend::Validator;

/// On-disk format version; a directory of another version is emptied.
pub const FORMAT: i64 = 1;

/// One pin, for `nassync status`.
#[derive(Clone, Debug)]
pub struct PinInfo {
    /// From the share's root, without a leading "/".
    pub path: Vec<u8>,
    pub files: u64,
    /// The size of the pinned files' current versions.
    pub bytes: u64,
    /// How much of that is in the cache.
    pub cached: u64,
}

/// See the module documentation.
pub struct DiskCache {
    root: PathBuf,
    conn: Mutex<Connection>,
    block_size: u64,
    capacity: u64,
    used: AtomicU64,
    evicted: AtomicU64,
    corrupt: AtomicU64,
    _lock: File,
}

fn nanos(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

fn now_ms() -> i64 {
    nanos(SystemTime::now()) / 1_000_000
}

fn setup_err(path: &Path, reason: impl ToString) -> CacheError {
    CacheError::Setup {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Takes the directory's lock, if no other daemon holds it.
fn try_lock(lock: &File) -> bool {
    // SAFETY: plain syscall on a descriptor we own.
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

impl DiskCache {
    /// Whether a daemon holds the cache directory `root` now (it may take
    /// or let go of it at any moment: only a hint, for choosing one).
    pub fn in_use(root: &Path) -> bool {
        match File::open(root.join("lock")) {
            // The probe's own lock goes with the descriptor.
            Ok(f) => !try_lock(&f),
            Err(_) => false,
        }
    }

    /// Opens (creating if needed, mode 0700) the cache directory `root`.
    /// Fails if it cannot be written or is in use by another daemon.
    pub fn open(root: &Path, block_size: u64, capacity: u64) -> Result<DiskCache, CacheError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root.join("data"))
            .map_err(|e| setup_err(root, format!("cannot create it: {e}")))?;
        fs::set_permissions(root, fs::Permissions::from_mode(0o700))
            .map_err(|e| setup_err(root, format!("cannot set its mode: {e}")))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(root.join("lock"))
            .map_err(|e| setup_err(root, format!("not writable: {e}")))?;
        if !try_lock(&lock) {
            return Err(CacheError::InUse {
                path: root.display().to_string(),
            });
        }
        let conn = Connection::open(root.join("index.sqlite"))
            .map_err(|e| setup_err(root, format!("cannot open the index: {e}")))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // The cache is not precious: a lost row is a miss, and CRCs catch
        // data that did not reach the disk.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS files (
                 ino INTEGER PRIMARY KEY, size INTEGER NOT NULL,
                 mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS blocks (
                 ino INTEGER NOT NULL, idx INTEGER NOT NULL, len INTEGER NOT NULL,
                 crc INTEGER NOT NULL, used_ms INTEGER NOT NULL,
                 PRIMARY KEY (ino, idx));
             CREATE INDEX IF NOT EXISTS blocks_lru ON blocks (used_ms);
             CREATE TABLE IF NOT EXISTS pins (path BLOB PRIMARY KEY, created_ms INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS pinned (
                 pin BLOB NOT NULL, ino INTEGER NOT NULL, PRIMARY KEY (pin, ino));
             CREATE INDEX IF NOT EXISTS pinned_ino ON pinned (ino);",
        )?;
        let meta = |conn: &Connection, key: &str| -> rusqlite::Result<Option<i64>> {
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
        };
        let format = meta(&conn, "format")?;
        let bs = meta(&conn, "block_size")?;
        if format != Some(FORMAT) || bs != Some(block_size as i64) {
            if format.is_some() {
                log::warn!(
                    "cache {}: format {format:?}/block size {bs:?} differs, emptying it",
                    root.display()
                );
            }
            conn.execute_batch(
                "DELETE FROM blocks; DELETE FROM files; DELETE FROM pinned; DELETE FROM pins;",
            )?;
            for entry in fs::read_dir(root.join("data"))? {
                let _ = fs::remove_file(entry?.path());
            }
            conn.execute(
                "INSERT OR REPLACE INTO meta VALUES ('format', ?1), ('block_size', ?2)",
                params![FORMAT, block_size as i64],
            )?;
        }
        let used: i64 =
            conn.query_row("SELECT COALESCE(SUM(len), 0) FROM blocks", [], |r| r.get(0))?;
        let cache = DiskCache {
            root: root.to_path_buf(),
            conn: Mutex::new(conn),
            block_size,
            capacity,
            used: AtomicU64::new(used as u64),
            evicted: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            _lock: lock,
        };
        cache.evict_if_needed()?;
        Ok(cache)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn data_path(&self, ino: u64) -> PathBuf {
        self.root.join("data").join(format!("{ino:016x}"))
    }

    /// Whether the cached blocks of `ino` belong to version `v`. If they do
    /// not, they are dropped and `v` becomes the cached version.
    pub fn check_validator(&self, ino: u64, v: &Validator) -> Result<bool, CacheError> {
        let conn = self.conn();
        let row: Option<(i64, i64, i64)> = conn
            .prepare_cached("SELECT size, mtime_ns, ctime_ns FROM files WHERE ino = ?1")?
            .query_row([ino as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        let want = (v.size as i64, nanos(v.mtime), nanos(v.ctime));
        if row == Some(want) {
            return Ok(true);
        }
        self.drop_blocks_locked(&conn, ino, 0, u64::MAX)?;
        conn.prepare_cached("INSERT OR REPLACE INTO files VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![ino as i64, want.0, want.1, want.2])?;
        Ok(false)
    }

    /// Records `v` as the version of the cached blocks of `ino`, without
    /// dropping any (after a change made through nassync itself).
    pub fn set_validator(&self, ino: u64, v: &Validator) -> Result<(), CacheError> {
        self.conn()
            .prepare_cached("INSERT OR REPLACE INTO files VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![
                ino as i64,
                v.size as i64,
                nanos(v.mtime),
                nanos(v.ctime)
            ])?;
        Ok(())
    }

    /// Whether block `idx` of `ino` is cached (not checked against its CRC).
    pub fn has(&self, ino: u64, idx: u64) -> Result<bool, CacheError> {
        Ok(self
            .conn()
            .prepare_cached("SELECT 1 FROM blocks WHERE ino = ?1 AND idx = ?2")?
            .query_row(params![ino as i64, idx as i64], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Block `idx` of `ino`, if cached and intact.
    pub fn get(&self, ino: u64, idx: u64) -> Result<Option<Vec<u8>>, CacheError> {
        let row: Option<(i64, i64)> = self
            .conn()
            .prepare_cached("SELECT len, crc FROM blocks WHERE ino = ?1 AND idx = ?2")?
            .query_row(params![ino as i64, idx as i64], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let Some((len, crc)) = row else {
            return Ok(None);
        };
        let mut buf = vec![0u8; len as usize];
        let ok = match File::open(self.data_path(ino)) {
            Ok(f) => f.read_exact_at(&mut buf, idx * self.block_size).is_ok(),
            Err(_) => false,
        };
        if !ok || crc32fast::hash(&buf) as i64 != crc {
            log::warn!("disk cache: block {idx} of inode {ino} is damaged; fetching it again");
            let conn = self.conn();
            self.drop_blocks_locked(&conn, ino, idx, idx)?;
            self.corrupt.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        self.conn()
            .prepare_cached("UPDATE blocks SET used_ms = ?3 WHERE ino = ?1 AND idx = ?2")?
            .execute(params![ino as i64, idx as i64, now_ms()])?;
        Ok(Some(buf))
    }

    /// Stores block `idx` of `ino`.
    pub fn put(&self, ino: u64, idx: u64, data: &[u8]) -> Result<(), CacheError> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(self.data_path(ino))?;
        f.write_all_at(data, idx * self.block_size)?;
        let old: Option<i64> = {
            let conn = self.conn();
            let old = conn
                .prepare_cached("SELECT len FROM blocks WHERE ino = ?1 AND idx = ?2")?
                .query_row(params![ino as i64, idx as i64], |r| r.get(0))
                .optional()?;
            conn.prepare_cached("INSERT OR REPLACE INTO blocks VALUES (?1, ?2, ?3, ?4, ?5)")?
                .execute(params![
                    ino as i64,
                    idx as i64,
                    data.len() as i64,
                    crc32fast::hash(data) as i64,
                    now_ms()
                ])?;
            old
        };
        self.used.fetch_add(data.len() as u64, Ordering::Relaxed);
        if let Some(old) = old {
            self.used.fetch_sub(old as u64, Ordering::Relaxed);
        }
        self.evict_if_needed()
    }

    /// Drops blocks `first..=last` of `ino`.
    pub fn drop_blocks(&self, ino: u64, first: u64, last: u64) -> Result<(), CacheError> {
        let conn = self.conn();
        self.drop_blocks_locked(&conn, ino, first, last)
    }

    fn drop_blocks_locked(
        &self,
        conn: &Connection,
        ino: u64,
        first: u64,
        last: u64,
    ) -> Result<(), CacheError> {
        let last = last.min(i64::MAX as u64);
        let (rows, freed): (i64, i64) = conn
            .prepare_cached(
                "SELECT COUNT(*), COALESCE(SUM(len), 0) FROM blocks
                 WHERE ino = ?1 AND idx BETWEEN ?2 AND ?3",
            )?
            .query_row(params![ino as i64, first as i64, last as i64], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        if rows == 0 && first != 0 {
            return Ok(());
        }
        if rows > 0 {
            conn.prepare_cached("DELETE FROM blocks WHERE ino = ?1 AND idx BETWEEN ?2 AND ?3")?
                .execute(params![ino as i64, first as i64, last as i64])?;
        }
        self.used.fetch_sub(freed as u64, Ordering::Relaxed);
        let path = self.data_path(ino);
        if first == 0 && last >= i64::MAX as u64 {
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        } else if let Ok(f) = OpenOptions::new().write(true).open(&path) {
            let start = first * self.block_size;
            let len = (last - first + 1).saturating_mul(self.block_size);
            // SAFETY: plain syscall; failure only leaves unreferenced data.
            unsafe {
                libc::fallocate(
                    f.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    start as libc::off_t,
                    len.min(i64::MAX as u64) as libc::off_t,
                );
            }
        }
        Ok(())
    }

    fn evict_if_needed(&self) -> Result<(), CacheError> {
        if self.used.load(Ordering::Relaxed) <= self.capacity {
            return Ok(());
        }
        // Evict down to 90% so that eviction runs in batches.
        let target = self.capacity / 10 * 9;
        let conn = self.conn();
        while self.used.load(Ordering::Relaxed) > target {
            let victims: Vec<(i64, i64)> = conn
                .prepare(
                    "SELECT ino, idx FROM blocks WHERE ino NOT IN (SELECT ino FROM pinned)
                     ORDER BY used_ms LIMIT 64",
                )?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            if victims.is_empty() {
                break;
            }
            for (ino, idx) in victims {
                let before = self.used.load(Ordering::Relaxed);
                self.drop_blocks_locked(&conn, ino as u64, idx as u64, idx as u64)?;
                let after = self.used.load(Ordering::Relaxed);
                self.evicted
                    .fetch_add(before.saturating_sub(after), Ordering::Relaxed);
                if after <= target {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Pins `inos` under the pin `path` (they are never evicted), in
    /// place of what that pin held before. Refused if the pinned files
    /// (`bytes` for these) would take more than 90% of the capacity: the
    /// cache must keep room to work.
    pub fn pin(&self, path: &[u8], files: &[(u64, u64)]) -> Result<(), CacheError> {
        let mut conn = self.conn();
        let others: i64 = conn.query_row(
            "SELECT COALESCE(SUM(f.size), 0) FROM files f
             WHERE f.ino IN (SELECT ino FROM pinned WHERE pin != ?1)",
            [path],
            |r| r.get(0),
        )?;
        // Files also under another pin (nested pins) are counted there.
        let mut shared = std::collections::HashSet::new();
        {
            let mut q = conn.prepare("SELECT DISTINCT ino FROM pinned WHERE pin != ?1")?;
            for ino in q.query_map([path], |r| r.get::<_, i64>(0))? {
                shared.insert(ino? as u64);
            }
        }
        let bytes: u64 = files
            .iter()
            .filter(|(ino, _)| !shared.contains(ino))
            .map(|(_, size)| size)
            .sum();
        let room = self.capacity / 10 * 9;
        if (others as u64).saturating_add(bytes) > room {
            return Err(CacheError::NoRoom {
                needed: bytes,
                room: room.saturating_sub(others as u64),
            });
        }
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT OR IGNORE INTO pins VALUES (?1, ?2)",
            params![path, now_ms()],
        )?;
        tx.execute("DELETE FROM pinned WHERE pin = ?1", [path])?;
        {
            let mut add = tx.prepare("INSERT OR IGNORE INTO pinned VALUES (?1, ?2)")?;
            for (ino, _) in files {
                add.execute(params![path, *ino as i64])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Removes the pin `path`; false if there was none.
    pub fn unpin(&self, path: &[u8]) -> Result<bool, CacheError> {
        let conn = self.conn();
        conn.execute("DELETE FROM pinned WHERE pin = ?1", [path])?;
        Ok(conn.execute("DELETE FROM pins WHERE path = ?1", [path])? > 0)
    }

    /// Every pin.
    pub fn pins(&self) -> Result<Vec<PinInfo>, CacheError> {
        let conn = self.conn();
        let mut q = conn.prepare(
            "SELECT p.path,
                (SELECT COUNT(*) FROM pinned x WHERE x.pin = p.path),
                (SELECT COALESCE(SUM(f.size), 0) FROM files f
                    WHERE f.ino IN (SELECT ino FROM pinned x WHERE x.pin = p.path)),
                (SELECT COALESCE(SUM(b.len), 0) FROM blocks b
                    WHERE b.ino IN (SELECT ino FROM pinned x WHERE x.pin = p.path))
             FROM pins p ORDER BY p.path",
        )?;
        let rows = q
            .query_map([], |r| {
                Ok(PinInfo {
                    path: r.get(0)?,
                    files: r.get::<_, i64>(1)? as u64,
                    bytes: r.get::<_, i64>(2)? as u64,
                    cached: r.get::<_, i64>(3)? as u64,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Blocks found damaged and dropped.
    pub fn corrupt_blocks(&self) -> u64 {
        self.corrupt.load(Ordering::Relaxed)
    }

    pub fn evicted_bytes(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn v(size: u64, t: u64) -> Validator {
        let at = UNIX_EPOCH + Duration::from_secs(t);
        Validator {
            ino: 7,
            size,
            mtime: at,
            ctime: at,
        }
    }

    #[test]
    fn blocks_survive_reopen_while_the_version_holds() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = DiskCache::open(dir.path(), 4096, 1 << 20).unwrap();
            assert!(!c.check_validator(7, &v(10, 1)).unwrap());
            c.put(7, 0, b"0123456789").unwrap();
        }
        let c = DiskCache::open(dir.path(), 4096, 1 << 20).unwrap();
        assert!(c.check_validator(7, &v(10, 1)).unwrap());
        assert_eq!(c.get(7, 0).unwrap().unwrap(), b"0123456789");
        // Another version drops the blocks.
        assert!(!c.check_validator(7, &v(10, 2)).unwrap());
        assert_eq!(c.get(7, 0).unwrap(), None);
        assert_eq!(c.used_bytes(), 0);
    }

    #[test]
    fn empty_blocks_are_dropped_too() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 4096, 1 << 20).unwrap();
        c.put(7, 3, b"").unwrap();
        c.drop_blocks(7, 2, 5).unwrap();
        assert_eq!(c.get(7, 3).unwrap(), None);
    }

    #[test]
    fn a_damaged_block_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 4096, 1 << 20).unwrap();
        c.put(7, 1, &[5u8; 4096]).unwrap();
        let f = OpenOptions::new().write(true).open(c.data_path(7)).unwrap();
        f.write_all_at(b"x", 4096 + 100).unwrap();
        assert_eq!(c.get(7, 1).unwrap(), None);
        assert_eq!(c.corrupt_blocks(), 1);
        assert_eq!(c.used_bytes(), 0, "dropped after the damage was seen");
    }

    #[test]
    fn eviction_keeps_the_size_bounded_and_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 4096, 10 * 4096).unwrap();
        for i in 0..30 {
            c.put(1, i, &[i as u8; 4096]).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(c.used_bytes() <= 10 * 4096);
        assert_eq!(c.get(1, 0).unwrap(), None);
        assert_eq!(c.get(1, 29).unwrap().unwrap(), vec![29u8; 4096]);
    }

    #[test]
    fn a_second_daemon_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!DiskCache::in_use(dir.path()), "never used");
        let a = DiskCache::open(dir.path(), 4096, 1 << 20).unwrap();
        assert!(DiskCache::in_use(dir.path()));
        let b = DiskCache::open(dir.path(), 4096, 1 << 20);
        assert!(matches!(b, Err(CacheError::InUse { .. })));
        drop(a);
        assert!(!DiskCache::in_use(dir.path()), "free again");
        assert!(DiskCache::open(dir.path(), 4096, 1 << 20).is_ok());
    }

    #[test]
    fn the_directory_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("c");
        let _c = DiskCache::open(&root, 4096, 1 << 20).unwrap();
        let mode = fs::metadata(&root).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
