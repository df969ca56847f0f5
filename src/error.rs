//! The core's error type, and the one place where an errno is chosen.

use crate::backend::BackendError;
use crate::cache::CacheError;

/// Why a filesystem operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The NAS refused or failed the operation; its errno is kept.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The kernel named an inode nassync does not know (forgotten, or from
    /// before a restart).
    #[error("unknown inode {0}")]
    UnknownInode(u64),
    #[error("unknown file handle {0}")]
    UnknownHandle(u64),
    /// A cached lookup says the name does not exist.
    #[error("no such entry (cached)")]
    NotFound,
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("not supported: {0}")]
    Unsupported(&'static str),
    /// The local cache failed; the NAS's data was not at fault.
    #[error("local cache: {0}")]
    Cache(#[from] CacheError),
    /// An error shared by the callers of one merged cache fetch.
    #[error(transparent)]
    Shared(std::sync::Arc<FsError>),
}

impl FsError {
    /// The errno the application sees. Exhaustive on purpose: a new variant
    /// must decide its errno here.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::Backend(e) => e.raw_errno(),
            FsError::UnknownInode(_) => libc::ESTALE,
            FsError::UnknownHandle(_) => libc::EBADF,
            FsError::NotFound => libc::ENOENT,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::Unsupported(_) => libc::EOPNOTSUPP,
            FsError::Cache(e) => e.errno(),
            FsError::Shared(e) => e.errno(),
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_errno_is_kept() {
        for errno in [
            libc::ENOENT,
            libc::EEXIST,
            libc::ENOTEMPTY,
            libc::EXDEV,
            libc::ENOSPC,
        ] {
            let e: FsError = BackendError::errno("op", errno).into();
            assert_eq!(e.errno(), errno);
        }
        let e: FsError = BackendError::new("op", std::io::Error::other("no errno")).into();
        assert_eq!(e.errno(), libc::EIO);
    }
}
