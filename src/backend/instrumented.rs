//! A wrapper around any backend that counts every call and the bytes moved
//! (that is how `nassync stats` and the tests know what reached the NAS), and
//! that can be told to fail or stall calls (the tests' broken NAS).

use std::ffi::{OsStr, OsString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{
    Attr, BResult, Backend, BackendError, Creds, DirEntry, OpenMode, RenameFlags, SetAttr, StatFs,
};
use crate::stats::Stats;

/// A NAS call slower than this is logged as a warning.
const SLOW_CALL: Duration = Duration::from_secs(1);

/// What the wrapper does to calls whose operation name matches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    #[default]
    None,
    /// Fail with this errno.
    Fail(i32),
    /// Fail the next call with this errno, then none.
    FailOnce(i32),
    /// Block until the fault is changed.
    Stall,
    /// Panic, as a backend with a bug would.
    Panic,
}

/// Armed faults, shared with whoever controls them.
#[derive(Debug, Default)]
pub struct FaultControl {
    state: Mutex<(Fault, Option<&'static str>, u64)>,
    changed: Condvar,
    /// Reported as not answering (see [`Backend::online`]).
    offline: AtomicBool,
}

impl FaultControl {
    /// Applies `fault` to calls of operation `op` (all calls if `None`).
    pub fn set(&self, fault: Fault, op: Option<&'static str>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 = fault;
        s.1 = op;
        self.changed.notify_all();
    }

    /// Makes the backend report the NAS as not answering, or answering.
    pub fn set_offline(&self, offline: bool) {
        self.offline.store(offline, Ordering::Release);
    }

    fn offline(&self) -> bool {
        self.offline.load(Ordering::Acquire)
    }

    /// How many calls are blocked in a stall right now.
    pub fn stalled(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).2
    }

    fn check(&self, op: &'static str) -> BResult<()> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let applies = s.1.is_none_or(|o| o == op);
            match (&s.0, applies) {
                (Fault::Fail(errno), true) => return Err(BackendError::errno(op, *errno)),
                (Fault::FailOnce(errno), true) => {
                    let errno = *errno;
                    s.0 = Fault::None;
                    return Err(BackendError::errno(op, errno));
                }
                (Fault::Panic, true) => {
                    drop(s);
                    panic!("injected panic in {op}");
                }
                (Fault::Stall, true) => {
                    s.2 += 1;
                    s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
                    s.2 -= 1;
                }
                _ => return Ok(()),
            }
        }
    }
}

/// See the module documentation.
#[derive(Debug)]
pub struct Instrumented<B> {
    inner: B,
    stats: Arc<Stats>,
    faults: Arc<FaultControl>,
}

impl<B: Backend> Instrumented<B> {
    pub fn new(inner: B, stats: Arc<Stats>) -> Self {
        Instrumented {
            inner,
            stats,
            faults: Arc::new(FaultControl::default()),
        }
    }

    pub fn faults(&self) -> Arc<FaultControl> {
        self.faults.clone()
    }

    fn call<T>(&self, op: &'static str, f: impl FnOnce() -> BResult<T>) -> BResult<T> {
        self.call_as(op, false, f)
    }

    /// A call that changes the NAS: its refusals are counted.
    fn change<T>(&self, op: &'static str, f: impl FnOnce() -> BResult<T>) -> BResult<T> {
        self.call_as(op, true, f)
    }

    fn call_as<T>(
        &self,
        op: &'static str,
        changes: bool,
        f: impl FnOnce() -> BResult<T>,
    ) -> BResult<T> {
        Stats::inc(&self.stats.nas_ops);
        log::trace!("NAS {op}");
        let start = Instant::now();
        let r = self.faults.check(op).and_then(|()| f());
        let took = start.elapsed();
        if took >= SLOW_CALL {
            Stats::inc(&self.stats.nas_slow_calls);
            log::warn!("slow NAS: {op} took {took:?}");
        }
        if let Err(e) = &r {
            Stats::inc(&self.stats.nas_errors);
            if changes && matches!(e.raw_errno(), libc::EPERM | libc::EACCES | libc::EROFS) {
                Stats::inc(&self.stats.nas_refusals);
            }
            log::debug!("NAS {op} failed: {e}");
        }
        r
    }
}

impl<B: Backend> Backend for Instrumented<B> {
    type Node = B::Node;
    type File = B::File;

    fn root(&self) -> BResult<(Self::Node, Attr)> {
        self.call("root", || self.inner.root())
    }
    fn lookup(&self, dir: &Self::Node, name: &OsStr) -> BResult<(Self::Node, Attr)> {
        Stats::inc(&self.stats.nas_lookups);
        self.call("lookup", || self.inner.lookup(dir, name))
    }
    fn getattr(&self, node: &Self::Node) -> BResult<Attr> {
        Stats::inc(&self.stats.nas_getattrs);
        self.call("getattr", || self.inner.getattr(node))
    }
    fn setattr(&self, n: &Self::Node, f: Option<&Self::File>, c: &SetAttr) -> BResult<Attr> {
        self.change("setattr", || self.inner.setattr(n, f, c))
    }
    fn readlink(&self, node: &Self::Node) -> BResult<OsString> {
        self.call("readlink", || self.inner.readlink(node))
    }
    fn readdir(&self, dir: &Self::Node) -> BResult<Vec<DirEntry>> {
        Stats::inc(&self.stats.nas_readdirs);
        self.call("readdir", || self.inner.readdir(dir))
    }
    fn mknod(
        &self,
        dir: &Self::Node,
        name: &OsStr,
        mode: u32,
        rdev: u64,
        creds: Creds,
    ) -> BResult<(Self::Node, Attr)> {
        self.change("mknod", || self.inner.mknod(dir, name, mode, rdev, creds))
    }
    fn mkdir(&self, d: &Self::Node, n: &OsStr, mode: u32, c: Creds) -> BResult<(Self::Node, Attr)> {
        self.change("mkdir", || self.inner.mkdir(d, n, mode, c))
    }
    fn symlink(
        &self,
        d: &Self::Node,
        n: &OsStr,
        t: &OsStr,
        c: Creds,
    ) -> BResult<(Self::Node, Attr)> {
        self.change("symlink", || self.inner.symlink(d, n, t, c))
    }
    fn link(&self, node: &Self::Node, dir: &Self::Node, name: &OsStr) -> BResult<Attr> {
        self.change("link", || self.inner.link(node, dir, name))
    }
    fn unlink(&self, dir: &Self::Node, name: &OsStr) -> BResult<()> {
        self.change("unlink", || self.inner.unlink(dir, name))
    }
    fn rmdir(&self, dir: &Self::Node, name: &OsStr) -> BResult<()> {
        self.change("rmdir", || self.inner.rmdir(dir, name))
    }
    fn rename(
        &self,
        d: &Self::Node,
        n: &OsStr,
        nd: &Self::Node,
        nn: &OsStr,
        f: RenameFlags,
    ) -> BResult<()> {
        self.change("rename", || self.inner.rename(d, n, nd, nn, f))
    }
    fn open(&self, node: &Self::Node, mode: OpenMode) -> BResult<Self::File> {
        // Opening to write is a change (its refusals count).
        let changes = mode.write || mode.truncate;
        self.call_as("open", changes, || self.inner.open(node, mode))
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
        self.change("create", || {
            self.inner.create(dir, name, mode, open, exclusive, creds)
        })
    }
    fn read(&self, file: &Self::File, offset: u64, buf: &mut [u8]) -> BResult<usize> {
        Stats::inc(&self.stats.nas_reads);
        let n = self.call("read", || self.inner.read(file, offset, buf))?;
        Stats::add(&self.stats.nas_bytes_read, n as u64);
        Ok(n)
    }
    fn write(&self, file: &Self::File, offset: u64, data: &[u8]) -> BResult<usize> {
        Stats::inc(&self.stats.nas_writes);
        let n = self.change("write", || self.inner.write(file, offset, data))?;
        Stats::add(&self.stats.nas_bytes_written, n as u64);
        Ok(n)
    }
    fn fsync(&self, file: &Self::File, datasync: bool) -> BResult<()> {
        self.call("fsync", || self.inner.fsync(file, datasync))
    }
    fn fallocate(&self, file: &Self::File, mode: i32, offset: u64, len: u64) -> BResult<()> {
        self.change("fallocate", || {
            self.inner.fallocate(file, mode, offset, len)
        })
    }
    fn fgetattr(&self, file: &Self::File) -> BResult<Attr> {
        Stats::inc(&self.stats.nas_getattrs);
        self.call("getattr", || self.inner.fgetattr(file))
    }
    fn fsyncdir(&self, dir: &Self::Node) -> BResult<()> {
        self.call("fsyncdir", || self.inner.fsyncdir(dir))
    }
    fn statfs(&self, node: &Self::Node) -> BResult<StatFs> {
        self.call("statfs", || self.inner.statfs(node))
    }
    fn max_file_size(&self) -> u64 {
        self.inner.max_file_size()
    }
    fn lists_acls(&self, node: &Self::Node) -> bool {
        self.inner.lists_acls(node)
    }
    fn keeps_xattrs(&self) -> bool {
        self.inner.keeps_xattrs()
    }
    fn same_fs(&self, a: &Self::Node, b: &Self::Node) -> bool {
        self.inner.same_fs(a, b)
    }
    fn online(&self) -> bool {
        !self.faults.offline() && self.inner.online()
    }
    fn held_up(&self) -> bool {
        self.inner.held_up()
    }
    fn offline_since(&self) -> Option<std::time::SystemTime> {
        self.inner.offline_since()
    }
    fn unfinished_changes(&self) -> usize {
        self.inner.unfinished_changes()
    }
    fn getxattr(&self, node: &Self::Node, name: &OsStr) -> BResult<Vec<u8>> {
        self.call("getxattr", || self.inner.getxattr(node, name))
    }
    fn listxattr(&self, node: &Self::Node) -> BResult<Vec<u8>> {
        self.call("listxattr", || self.inner.listxattr(node))
    }
    fn setxattr(&self, node: &Self::Node, name: &OsStr, value: &[u8], flags: i32) -> BResult<()> {
        self.change("setxattr", || self.inner.setxattr(node, name, value, flags))
    }
    fn removexattr(&self, node: &Self::Node, name: &OsStr) -> BResult<()> {
        self.change("removexattr", || self.inner.removexattr(node, name))
    }
}
