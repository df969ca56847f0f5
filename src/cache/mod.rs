//! File data caches: blocks of `block_size` bytes in memory ([`mem`]) and on
//! local disk ([`disk`]).
//!
//! A block is identified in memory by (inode, epoch, index). The epoch of a
//! file changes whenever its cached data may no longer be the NAS's (a write,
//! a truncate, a change seen on the NAS), so stale blocks simply become
//! unreachable and age out of the LRU. The disk cache has no epochs: it keeps
//! per file the validator (size, mtime, ctime, inode) of the version its
//! blocks belong to, and drops blocks explicitly.

pub mod disk;
pub mod mem;

/// Why the local cache failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache index: {0}")]
    Index(#[from] rusqlite::Error),
    #[error("cache file: {0}")]
    Io(#[from] std::io::Error),
    #[error("cache directory {path}: {reason}")]
    Setup { path: String, reason: String },
    /// Another daemon holds the directory's lock.
    #[error("cache directory {path}: in use by another nassync daemon")]
    InUse { path: String },
    /// Pinning would leave the cache no room to work.
    #[error("{needed} bytes to pin, but only {room} bytes of cache_size are left for pins")]
    NoRoom { needed: u64, room: u64 },
}

impl CacheError {
    pub fn errno(&self) -> i32 {
        match self {
            CacheError::Io(e) => match e.raw_os_error() {
                // The local disk is full, or the offset is past what the
                // cache's filesystem can hold: the application can act on
                // these, unlike a generic EIO.
                Some(e @ (libc::ENOSPC | libc::EDQUOT | libc::EFBIG)) => e,
                _ => libc::EIO,
            },
            CacheError::NoRoom { .. } => libc::ENOSPC,
            CacheError::Index(_) | CacheError::Setup { .. } | CacheError::InUse { .. } => libc::EIO,
        }
    }
}
