//! The data path: reads served from the memory cache, then the disk cache,
//! then the NAS, with readahead for sequential readers; and the bookkeeping
//! that keeps those caches consistent with writes and with changes seen on
//! the NAS.
//!
//! Lock order: `FileData::inner` is taken after any core table lock has
//! been released, and is held only for in-memory work and local disk cache
//! updates, never across a NAS call.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::backend::{BResult, Validator};
use crate::cache::disk::DiskCache;
use crate::cache::mem::{BlockKey, MemCache};
use crate::error::{FsError, FsResult};
use crate::stats::Stats;

/// Fetches block `idx` of a file from the NAS.
pub type FetchFn = Arc<dyn Fn(u64) -> BResult<Vec<u8>> + Send + Sync>;

type Job = Box<dyn FnOnce() + Send>;

static NEXT_EPOCH: AtomicU64 = AtomicU64::new(1);

fn next_epoch() -> u64 {
    NEXT_EPOCH.fetch_add(1, Ordering::Relaxed)
}

/// The cache state of one file's data.
#[derive(Debug)]
pub struct FileData {
    inner: Mutex<DataInner>,
}

#[derive(Debug)]
struct DataInner {
    /// Changes whenever cached blocks may be stale; part of every memory key.
    epoch: u64,
    /// The NAS version the cached blocks belong to, once known.
    cached: Option<Validator>,
}

impl Default for FileData {
    fn default() -> Self {
        FileData {
            inner: Mutex::new(DataInner {
                epoch: next_epoch(),
                cached: None,
            }),
        }
    }
}

impl FileData {
    fn lock(&self) -> MutexGuard<'_, DataInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// The NAS version the cached blocks belong to, once known.
    pub fn cached(&self) -> Option<Validator> {
        self.lock().cached
    }
}

/// The block caches and the readahead workers of one mount.
pub struct DataCache {
    mem: MemCache,
    disk: Option<DiskCache>,
    block_size: u64,
    stats: Arc<Stats>,
    prefetch: Option<SyncSender<Job>>,
    in_flight: Mutex<HashSet<BlockKey>>,
    /// Files whose kernel page cache holds a version the NAS no longer
    /// has, until it is dropped: by the next open (without keeping the
    /// cache), or by the mount's notification (`on_stale`), whichever is
    /// first.
    kernel_stale: Mutex<HashSet<u64>>,
    /// Told the inode of a file whose cached data was dropped because the
    /// NAS version changed: the kernel's page cache of it is stale too.
    on_stale: OnceLock<Box<dyn Fn(u64) + Send + Sync>>,
}

impl DataCache {
    pub fn new(
        mem_bytes: u64,
        disk: Option<DiskCache>,
        block_size: u64,
        readahead_threads: usize,
        stats: Arc<Stats>,
    ) -> Arc<DataCache> {
        let (prefetch, rx) = if readahead_threads > 0 {
            let (tx, rx) = sync_channel::<Job>(256);
            (Some(tx), Some(Arc::new(Mutex::new(rx))))
        } else {
            (None, None)
        };
        let cache = Arc::new(DataCache {
            mem: MemCache::new(mem_bytes),
            disk,
            block_size,
            stats,
            prefetch,
            in_flight: Mutex::new(HashSet::new()),
            kernel_stale: Mutex::new(HashSet::new()),
            on_stale: OnceLock::new(),
        });
        if let Some(rx) = rx {
            for i in 0..readahead_threads {
                let rx: Arc<Mutex<Receiver<Job>>> = rx.clone();
                let _ = std::thread::Builder::new()
                    .name(format!("readahead-{i}"))
                    .spawn(move || {
                        loop {
                            let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                            match job {
                                Ok(job) => job(),
                                Err(_) => return, // the cache is gone
                            }
                        }
                    });
            }
        }
        cache
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Sets what [`Self::revalidate`] calls with the inode of a file whose
    /// cached data it dropped (the mount drops the kernel's page cache).
    pub fn on_stale(&self, f: Box<dyn Fn(u64) + Send + Sync>) {
        let _ = self.on_stale.set(f);
    }

    /// Called at open and whenever fresh attributes of a regular file are
    /// seen: if the NAS version is not the cached one, the cached data is
    /// dropped. Returns whether the cached data (and so the kernel's page
    /// cache) is still valid.
    pub fn revalidate(&self, ino: u64, data: &FileData, v: &Validator) -> FsResult<bool> {
        let mut g = data.lock();
        if g.cached.as_ref() == Some(v) {
            return Ok(true);
        }
        let old = g.cached;
        g.epoch = next_epoch();
        g.cached = Some(*v);
        let checked = match &self.disk {
            Some(disk) => disk.check_validator(ino, v).map(|_| ()),
            None => Ok(()),
        };
        drop(g);
        if let Some(old) = old {
            Stats::inc(&self.stats.invalidations);
            log::debug!("inode {ino}: changed on the NAS, cached data dropped");
            // The kernel's pages, only if the content may differ (as
            // FUSE_AUTO_INVAL_DATA judged: not for a ctime alone).
            if (old.ino, old.size, old.mtime) != (v.ino, v.size, v.mtime) {
                self.kernel_stale_lock().insert(ino);
                if let Some(f) = self.on_stale.get() {
                    f(ino);
                }
            }
        }
        checked?;
        Ok(false)
    }

    fn kernel_stale_lock(&self) -> MutexGuard<'_, HashSet<u64>> {
        self.kernel_stale.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the kernel's page cache of `ino` is still to be dropped
    /// (see `kernel_stale`); taken: whoever asks drops it. An open asks
    /// (then answering without FOPEN_KEEP_CACHE), and so does the mount's
    /// notification thread, which skips what an open has dropped.
    pub fn take_kernel_stale(&self, ino: u64) -> bool {
        self.kernel_stale_lock().remove(&ino)
    }

    /// Fresh attributes seen outside an open (getattr, lookup): drops the
    /// cached data if it belongs to another version. Does nothing for a
    /// file whose version is not known yet (checked at open).
    pub fn observe(&self, ino: u64, data: &FileData, v: &Validator) -> FsResult<()> {
        let known = data.lock().cached;
        match known {
            Some(c) if c != *v => self.revalidate(ino, data, v).map(|_| ()),
            _ => Ok(()),
        }
    }

    /// After nassync changed bytes `start..end` of a file on the NAS
    /// (write, truncate, fallocate): drops the affected cached blocks and
    /// adopts `after`, the NAS version that the change produced.
    pub fn changed(
        &self,
        ino: u64,
        data: &FileData,
        start: u64,
        end: u64,
        after: &Validator,
    ) -> FsResult<()> {
        let mut g = data.lock();
        g.epoch = next_epoch();
        if let Some(disk) = &self.disk {
            if g.cached.is_none() {
                disk.check_validator(ino, after)?;
            }
            if end > start {
                let last = if end == u64::MAX {
                    u64::MAX
                } else {
                    (end - 1) / self.block_size
                };
                disk.drop_blocks(ino, start / self.block_size, last)?;
            }
            disk.set_validator(ino, after)?;
        }
        g.cached = Some(*after);
        Ok(())
    }

    /// After write-back made the NAS file `after`: the byte ranges in
    /// `stale` differ from the cached version, the rest is unchanged.
    pub fn replaced(
        &self,
        ino: u64,
        data: &FileData,
        stale: &[(u64, u64)],
        after: &Validator,
    ) -> FsResult<()> {
        let mut g = data.lock();
        g.epoch = next_epoch();
        if let Some(disk) = &self.disk {
            for &(start, end) in stale {
                if end > start {
                    let last = if end == u64::MAX {
                        u64::MAX
                    } else {
                        (end - 1) / self.block_size
                    };
                    disk.drop_blocks(ino, start / self.block_size, last)?;
                }
            }
            disk.set_validator(ino, after)?;
        }
        g.cached = Some(*after);
        Ok(())
    }

    /// nassync changed the file's metadata on the NAS (rename, chmod...):
    /// if only the ctime moved, the cached version is still the NAS's, and
    /// takes the new ctime (so that write-back does not mistake it for
    /// someone else's change).
    pub fn own_ctime(&self, ino: u64, data: &FileData, v: &Validator) -> FsResult<()> {
        let mut g = data.lock();
        let Some(c) = g.cached else { return Ok(()) };
        if c.ino == v.ino && c.size == v.size && c.mtime == v.mtime && c.ctime != v.ctime {
            g.cached = Some(*v);
            if let Some(disk) = &self.disk {
                disk.set_validator(ino, v)?;
            }
        }
        Ok(())
    }

    /// One block, from memory, disk or NAS.
    fn block(&self, ino: u64, data: &FileData, idx: u64, fetch: &FetchFn) -> FsResult<Arc<[u8]>> {
        let epoch = data.epoch();
        let result = self
            .mem
            .get_or_fetch((ino, epoch, idx), || -> FsResult<Arc<[u8]>> {
                if let Some(disk) = &self.disk {
                    match disk.get(ino, idx) {
                        Ok(Some(b)) => {
                            Stats::inc(&self.stats.disk_hits);
                            return Ok(b.into());
                        }
                        Ok(None) => {}
                        Err(e) => log::warn!("disk cache read failed, using the NAS: {e}"),
                    }
                }
                Stats::inc(&self.stats.misses);
                let bytes = fetch(idx)?;
                if let (Some(disk), false) = (&self.disk, bytes.is_empty()) {
                    // Only if no change raced with the fetch.
                    let g = data.lock();
                    if g.epoch == epoch {
                        if let Err(e) = disk.put(ino, idx, &bytes) {
                            log::warn!("disk cache write failed: {e}");
                        }
                    }
                }
                Ok(bytes.into())
            });
        match result {
            Ok((b, hit)) => {
                if hit {
                    Stats::inc(&self.stats.mem_hits);
                }
                Ok(b)
            }
            Err(e) => Err(FsError::Shared(e)),
        }
    }

    /// Whether every block of `offset..offset+size` is cached, in memory
    /// or on disk.
    pub fn covered(&self, ino: u64, data: &FileData, offset: u64, size: u32) -> bool {
        let bs = self.block_size;
        let epoch = data.epoch();
        let last = offset.saturating_add(size.max(1) as u64 - 1) / bs;
        (offset / bs..=last).all(|idx| {
            self.mem.contains(&(ino, epoch, idx))
                || self
                    .disk
                    .as_ref()
                    .is_some_and(|d| d.has(ino, idx).unwrap_or(false))
        })
    }

    /// Reads `size` bytes at `offset` (fewer at end of file).
    pub fn read(
        &self,
        ino: u64,
        data: &FileData,
        offset: u64,
        size: u32,
        fetch: &FetchFn,
    ) -> FsResult<Vec<u8>> {
        let bs = self.block_size;
        let end = offset.saturating_add(size as u64);
        let mut out = Vec::with_capacity(size as usize);
        let mut pos = offset;
        while pos < end {
            let idx = pos / bs;
            let within = (pos % bs) as usize;
            let b = self.block(ino, data, idx, fetch)?;
            if within >= b.len() {
                break;
            }
            let n = (b.len() - within).min((end - pos) as usize);
            out.extend_from_slice(&b[within..within + n]);
            pos += n as u64;
            if (b.len() as u64) < bs {
                break; // the block holds the end of the file
            }
        }
        Ok(out)
    }

    /// Starts fetching blocks `first..first+count` (those before `size`) in
    /// the background, if not cached already.
    pub fn prefetch(
        self: &Arc<Self>,
        ino: u64,
        data: &Arc<FileData>,
        first: u64,
        count: u64,
        size: u64,
        fetch: &FetchFn,
    ) {
        let Some(tx) = &self.prefetch else { return };
        let epoch = data.epoch();
        let end_idx = size.div_ceil(self.block_size);
        for idx in first..(first + count).min(end_idx) {
            let key = (ino, epoch, idx);
            if self.mem.contains(&key) {
                continue;
            }
            if !self
                .in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key)
            {
                continue;
            }
            let (this, data, fetch) = (self.clone(), data.clone(), fetch.clone());
            let job = Box::new(move || {
                if this.block(ino, &data, idx, &fetch).is_ok() {
                    Stats::inc(&this.stats.readahead_blocks);
                }
                this.in_flight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&key);
            });
            match tx.try_send(job) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    self.in_flight
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&key);
                    return; // the workers are busy: readahead is a hint
                }
            }
        }
    }

    pub fn mem_bytes(&self) -> u64 {
        self.mem.weighted_size()
    }

    pub fn disk(&self) -> Option<&DiskCache> {
        self.disk.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn v(size: u64, t: u64) -> Validator {
        Validator {
            ino: 1,
            size,
            mtime: UNIX_EPOCH + Duration::from_secs(t),
            ctime: UNIX_EPOCH + Duration::from_secs(t),
        }
    }

    fn fetch_from(content: Arc<Mutex<Vec<u8>>>, bs: u64, calls: Arc<AtomicU64>) -> FetchFn {
        Arc::new(move |idx| {
            calls.fetch_add(1, Ordering::Relaxed);
            let c = content.lock().unwrap();
            let start = ((idx * bs) as usize).min(c.len());
            let end = (start + bs as usize).min(c.len());
            Ok(c[start..end].to_vec())
        })
    }

    #[test]
    fn reads_span_blocks_and_stop_at_eof() {
        let stats = Arc::new(Stats::default());
        let cache = DataCache::new(1 << 20, None, 4, 0, stats);
        let content: Vec<u8> = (0..10u8).collect();
        let calls = Arc::new(AtomicU64::new(0));
        let f = fetch_from(Arc::new(Mutex::new(content)), 4, calls.clone());
        let d = FileData::default();
        cache.revalidate(1, &d, &v(10, 1)).unwrap();
        assert_eq!(cache.read(1, &d, 2, 5, &f).unwrap(), vec![2, 3, 4, 5, 6]);
        assert_eq!(cache.read(1, &d, 8, 100, &f).unwrap(), vec![8, 9]);
        assert_eq!(cache.read(1, &d, 12, 4, &f).unwrap(), Vec::<u8>::new());
        let before = calls.load(Ordering::Relaxed);
        assert_eq!(
            cache.read(1, &d, 0, 10, &f).unwrap(),
            (0..10).collect::<Vec<u8>>()
        );
        assert_eq!(calls.load(Ordering::Relaxed), before, "all cached");
    }

    #[test]
    fn a_change_is_never_served_stale() {
        let stats = Arc::new(Stats::default());
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskCache::open(dir.path(), 4, 1 << 20).unwrap();
        let cache = DataCache::new(1 << 20, Some(disk), 4, 0, stats);
        let content = Arc::new(Mutex::new(b"aaaabbbbcc".to_vec()));
        let calls = Arc::new(AtomicU64::new(0));
        let f = fetch_from(content.clone(), 4, calls);
        let d = FileData::default();
        assert!(!cache.revalidate(1, &d, &v(10, 1)).unwrap());
        assert_eq!(cache.read(1, &d, 0, 10, &f).unwrap(), b"aaaabbbbcc");
        // nassync writes "XX" at 5.
        content.lock().unwrap()[5..7].copy_from_slice(b"XX");
        cache.changed(1, &d, 5, 7, &v(10, 2)).unwrap();
        assert_eq!(cache.read(1, &d, 0, 10, &f).unwrap(), b"aaaabXXbcc");
        // Someone else changes the file on the NAS; seen at revalidation.
        content.lock().unwrap()[0..4].copy_from_slice(b"zzzz");
        assert!(cache.revalidate(1, &d, &v(10, 2)).unwrap(), "not seen yet");
        assert!(!cache.revalidate(1, &d, &v(10, 3)).unwrap());
        assert_eq!(cache.read(1, &d, 0, 10, &f).unwrap(), b"zzzzbXXbcc");
    }
}
