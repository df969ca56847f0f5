//! The pending files of dirty files (`pending/<fid>`), opened when used.
//!
//! A descriptor held for each dirty file would run out of them
//! (RLIMIT_NOFILE): an untar of 20,000 files made while the NAS is away
//! leaves 20,000 dirty files. At most [`OPEN_MAX`] stay open, the least
//! recently used closed first. Closing one before it is synced loses no
//! error: since Linux 4.16 a write-back error nobody has seen yet is
//! reported to the next fsync, whichever descriptor it is made on.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

/// Pending files kept open at most.
pub const OPEN_MAX: usize = 256;

/// The open ones: fid -> (file, last use), and the use clock.
type Open = (HashMap<u64, (Arc<File>, u64)>, u64);

pub struct PendingFiles {
    dir: PathBuf,
    open: Mutex<Open>,
}

impl PendingFiles {
    pub fn new(dir: PathBuf) -> PendingFiles {
        PendingFiles {
            dir,
            open: Mutex::new((HashMap::new(), 0)),
        }
    }

    pub fn path(&self, fid: u64) -> PathBuf {
        self.dir.join(format!("{fid:016x}"))
    }

    fn lock(&self) -> MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pending file of `fid`, made empty.
    pub fn create(&self, fid: u64) -> io::Result<Arc<File>> {
        self.open_file(fid, true)
    }

    /// The pending file of `fid`.
    pub fn get(&self, fid: u64) -> io::Result<Arc<File>> {
        {
            let mut g = self.lock();
            g.1 += 1;
            let tick = g.1;
            if let Some((f, used)) = g.0.get_mut(&fid) {
                *used = tick;
                return Ok(f.clone());
            }
        }
        self.open_file(fid, false)
    }

    fn open_file(&self, fid: u64, create: bool) -> io::Result<Arc<File>> {
        let f = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .truncate(create)
                .mode(0o600)
                .open(self.path(fid))?,
        );
        let mut g = self.lock();
        g.1 += 1;
        let tick = g.1;
        if g.0.len() >= OPEN_MAX && !g.0.contains_key(&fid) {
            // One pass over at most OPEN_MAX entries: cheap beside the
            // open(2) that brought us here.
            if let Some(old) = g.0.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| *k) {
                g.0.remove(&old);
            }
        }
        g.0.insert(fid, (f.clone(), tick));
        Ok(f)
    }

    /// Closes the pending file of `fid` (its row is gone).
    pub fn forget(&self, fid: u64) {
        self.lock().0.remove(&fid);
    }

    /// Removes the pending file of `fid`.
    pub fn remove(&self, fid: u64) {
        self.forget(fid);
        let _ = std::fs::remove_file(self.path(fid));
    }

    #[cfg(test)]
    fn open_count(&self) -> usize {
        self.lock().0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn no_more_than_open_max_stay_open_and_content_outlives_closing() {
        let dir = tempfile::tempdir().unwrap();
        let p = PendingFiles::new(dir.path().to_path_buf());
        let n = OPEN_MAX as u64 * 3;
        for fid in 0..n {
            p.create(fid)
                .unwrap()
                .write_all_at(&fid.to_le_bytes(), 4096)
                .unwrap();
            assert!(p.open_count() <= OPEN_MAX);
        }
        for fid in 0..n {
            let mut b = [0u8; 8];
            p.get(fid).unwrap().read_exact_at(&mut b, 4096).unwrap();
            assert_eq!(u64::from_le_bytes(b), fid);
        }
        // create() empties; get() does not.
        assert_eq!(p.get(5).unwrap().metadata().unwrap().len(), 4104);
        assert_eq!(p.create(5).unwrap().metadata().unwrap().len(), 0);
        p.remove(7);
        assert!(!p.path(7).exists());
        assert!(p.open_count() <= OPEN_MAX);
    }
}
