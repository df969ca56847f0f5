//! Bounded waiting on the NAS, and the online/offline state.
//!
//! Every call of the wrapped backend runs on a thread of an elastic pool
//! while the caller waits at most `timeo`. A call that does not answer in
//! time is abandoned where it is (a call stuck in a hard NFS mount cannot
//! be interrupted; its thread is left to finish whenever the kernel lets
//! it) and the pool grows a new thread, so the daemon's other threads carry
//! on. The first timeout, or an error that means the NAS is gone, marks the
//! NAS offline: from then on calls fail at once with EIO ([`is_unreachable`]
//! tells them apart) and the core answers from its caches, until a probe in
//! the background finds the NAS answering again.
//!
//! A request that the cache can answer (the attributes of an object it
//! knows, a name it knows or a listing it holds whole) waits for the NAS
//! at most [`PATIENCE`]: a NAS that hangs costs the first such request a
//! second, not `timeo`, and an untar or a build carries on from the cache
//! while nassync finds out whether the NAS is gone. Until that call
//! answers, such requests are answered from the cache at once; if it has
//! not answered by `timeo`, the NAS is offline as above. If it answers,
//! the NAS is slow rather than gone, and calls wait `timeo` again for a
//! while.
//!
//! Files opened while offline are opened on the NAS when first needed
//! (a read of data that is not cached), so that an application can open a
//! cached file and read it without the NAS.

use std::cell::Cell;
use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use super::{
    Attr, BResult, Backend, BackendError, Creds, DirEntry, OpenMode, RenameFlags, SetAttr, StatFs,
};
use crate::stats::Stats;

/// Threads kept waiting for work; more are started on demand.
const MIN_THREADS: usize = 4;
/// At most this many threads (busy, idle or stuck in a hung call).
const MAX_THREADS: usize = 1024;
/// An idle thread beyond MIN_THREADS ends after this long.
const IDLE: Duration = Duration::from_secs(30);

/// How long a request the cache can answer waits for the NAS (at most
/// `timeo`): a NAS on a slow link answers within it, one that hangs does
/// not hold up what the cache can serve.
pub const PATIENCE: Duration = Duration::from_secs(1);

thread_local! {
    /// Set by [`cache_can_answer`] for the calls made inside it.
    static CACHE_CAN_ANSWER: Cell<bool> = const { Cell::new(false) };
    /// Set by [`name_absent_here`].
    static NAME_ABSENT: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, whose NAS calls that change nothing wait at most
/// [`PATIENCE`], and none while an earlier such call is still unanswered:
/// they then fail as if offline ([`is_unreachable`]), and the caller
/// answers from its caches. Only for requests the caches can answer.
pub fn cache_can_answer<T>(f: impl FnOnce() -> T) -> T {
    with_flag(&CACHE_CAN_ANSWER, f)
}

/// Runs `f`, the creation of a name that the caller's listing held whole
/// says is absent: the check that it is absent on the NAS too may then be
/// made inside [`cache_can_answer`] ([`name_known_absent`]); the creation
/// itself is not (it changes the NAS).
pub fn name_absent_here<T>(f: impl FnOnce() -> T) -> T {
    with_flag(&NAME_ABSENT, f)
}

/// Whether the caller runs inside [`name_absent_here`].
pub fn name_known_absent() -> bool {
    NAME_ABSENT.with(|c| c.get())
}

/// Runs `f`, a question a creation asks the NAS, inside
/// [`cache_can_answer`] where the name is known absent
/// ([`name_known_absent`]): the creation then does not wait for the NAS.
pub fn where_name_known_absent<T>(f: impl FnOnce() -> T) -> T {
    if name_known_absent() {
        cache_can_answer(f)
    } else {
        f()
    }
}

fn with_flag<T>(flag: &'static std::thread::LocalKey<Cell<bool>>, f: impl FnOnce() -> T) -> T {
    struct Reset(&'static std::thread::LocalKey<Cell<bool>>, bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            self.0.with(|c| c.set(self.1));
        }
    }
    let _reset = Reset(flag, flag.with(|c| c.replace(true)));
    f()
}

/// The error a call gets while the NAS does not answer.
#[derive(Debug)]
struct Unreachable;

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the NAS is not answering (offline)")
    }
}

impl std::error::Error for Unreachable {}

/// The error of a call made while the NAS does not answer.
pub(crate) fn unreachable(op: &'static str) -> BackendError {
    BackendError::new(
        op,
        std::io::Error::new(std::io::ErrorKind::TimedOut, Unreachable),
    )
}

/// Whether `e` means "the NAS did not answer" (as opposed to an answer
/// that was an error). Applications see EIO.
pub fn is_unreachable(e: &BackendError) -> bool {
    e.source.get_ref().is_some_and(|s| s.is::<Unreachable>())
}

/// Answers from a NAS that mean it is gone rather than that the call was
/// wrong (a soft NFS mount's timeout, a dead connection).
fn means_gone(e: &BackendError) -> bool {
    matches!(
        Some(e.raw_errno()),
        Some(libc::ETIMEDOUT | libc::ENOTCONN | libc::EHOSTDOWN | libc::EHOSTUNREACH)
            | Some(libc::ENETUNREACH | libc::ECONNREFUSED | libc::ECONNRESET)
    )
}

type Job = Box<dyn FnOnce() + Send>;

/// A copy of `e` (io::Error is not Clone), keeping what `is_unreachable`
/// and `raw_errno` look at.
fn clone_io(e: &std::io::Error) -> std::io::Error {
    if e.get_ref().is_some_and(|s| s.is::<Unreachable>()) {
        return std::io::Error::new(std::io::ErrorKind::TimedOut, Unreachable);
    }
    if let Some(c) = e.get_ref().and_then(|s| s.downcast_ref::<super::Coded>()) {
        return std::io::Error::new(e.kind(), c.clone());
    }
    match e.raw_os_error() {
        Some(n) => std::io::Error::from_raw_os_error(n),
        None => std::io::Error::new(e.kind(), e.to_string()),
    }
}

#[derive(Default)]
struct PoolState {
    jobs: VecDeque<Job>,
    idle: usize,
    threads: usize,
}

/// Threads that run NAS calls; grows when every thread is busy (or stuck).
#[derive(Default)]
struct Pool {
    state: Mutex<PoolState>,
    work: Condvar,
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn submit(self: &Arc<Self>, job: Job) {
        let mut s = self.lock();
        s.jobs.push_back(job);
        if s.idle < s.jobs.len() && s.threads < MAX_THREADS {
            s.threads += 1;
            let pool = self.clone();
            let spawned = std::thread::Builder::new()
                .name("nas-call".into())
                .spawn(move || pool.work_loop());
            if spawned.is_err() {
                s.threads -= 1;
            }
        }
        drop(s);
        self.work.notify_one();
    }

    fn work_loop(&self) {
        let mut s = self.lock();
        loop {
            if let Some(job) = s.jobs.pop_front() {
                drop(s);
                // Keeps the thread (and the pool's count of them) alive.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                s = self.lock();
                continue;
            }
            s.idle += 1;
            let (g, t) = self
                .work
                .wait_timeout(s, IDLE)
                .unwrap_or_else(|e| e.into_inner());
            s = g;
            s.idle -= 1;
            if t.timed_out() && s.jobs.is_empty() && s.threads > MIN_THREADS {
                s.threads -= 1;
                return;
            }
        }
    }
}

/// See [`Bounded::slow_call_pending`].
#[derive(Default)]
struct Slow {
    /// The call given up on after [`PATIENCE`]: when it was made, its
    /// name, and whether it has finished.
    call: Option<(Instant, &'static str, Arc<AtomicBool>)>,
    /// Until when calls wait `timeo` again: one of them answered after
    /// [`PATIENCE`], so the NAS is slow rather than gone, and its answers
    /// (fresh ones, as NFS would wait for) are worth the wait.
    impatient_until: Option<Instant>,
}

/// How long calls wait `timeo` again after a NAS slower than [`PATIENCE`]
/// answered.
const SLOW_NAS_MEMORY: Duration = Duration::from_secs(60);

/// Sets its flag when dropped: when a pool job ends, even by a panic.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Where one call's answer is left for its caller.
struct Slot<T> {
    answer: Mutex<(Option<T>, bool)>,
    done: Condvar,
}

/// Online/offline, shared by everything that asks.
struct Link {
    offline_since: Mutex<Option<SystemTime>>,
    offline: AtomicBool,
    changed: Condvar,
}

/// See the module documentation.
pub struct Bounded<B: Backend> {
    inner: Arc<B>,
    timeo: Duration,
    pool: Arc<Pool>,
    link: Arc<Link>,
    /// Abandoned calls that change the NAS and have not finished yet.
    stuck_changes: Arc<AtomicUsize>,
    /// See [`cache_can_answer`] and [`Self::slow_call_pending`].
    slow: Mutex<Slow>,
    /// The share's root as first seen: the probe checks that the source is
    /// still the same share (not the empty directory under a lost mount).
    root_ino: Mutex<Option<u64>>,
    stats: Arc<Stats>,
    probing: AtomicBool,
}

impl<B: Backend> fmt::Debug for Bounded<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bounded")
            .field("timeo", &self.timeo)
            .field("offline", &self.is_offline())
            .finish()
    }
}

/// A file of the wrapped backend; opened on the NAS at first use when it
/// was opened while offline. Closed on a pool thread: a close can hang too.
pub struct BoundedFile<B: Backend> {
    file: Mutex<Option<Arc<B::File>>>,
    node: B::Node,
    mode: OpenMode,
    pool: Arc<Pool>,
}

impl<B: Backend> Drop for BoundedFile<B> {
    fn drop(&mut self) {
        if let Some(f) = self
            .file
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            self.pool.submit(Box::new(move || drop(f)));
        }
    }
}

impl<B: Backend> Bounded<B> {
    pub fn new(inner: B, timeo: Duration, stats: Arc<Stats>) -> Self {
        Bounded {
            inner: Arc::new(inner),
            timeo,
            pool: Arc::new(Pool::default()),
            link: Arc::new(Link {
                offline_since: Mutex::new(None),
                offline: AtomicBool::new(false),
                changed: Condvar::new(),
            }),
            stuck_changes: Arc::new(AtomicUsize::new(0)),
            slow: Mutex::new(Slow::default()),
            root_ino: Mutex::new(None),
            stats,
            probing: AtomicBool::new(false),
        }
    }

    pub fn inner(&self) -> &B {
        &self.inner
    }

    pub fn is_offline(&self) -> bool {
        self.link.offline.load(Ordering::Acquire)
    }

    /// Since when the NAS has been offline.
    pub fn offline_since(&self) -> Option<SystemTime> {
        *self
            .link
            .offline_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the NAS is online, at most `max`; whether it is.
    pub fn wait_online(&self, max: Duration) -> bool {
        let g = self
            .link
            .offline_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (g, _) = self
            .link
            .changed
            .wait_timeout_while(g, max, |s| s.is_some())
            .unwrap_or_else(|e| e.into_inner());
        g.is_none()
    }

    fn go_offline(self: &Arc<Self>, why: &str)
    where
        B: Backend,
    {
        let mut s = self
            .link
            .offline_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if s.is_none() {
            *s = Some(SystemTime::now());
            self.link.offline.store(true, Ordering::Release);
            Stats::inc(&self.stats.offline_periods);
            log::warn!("NAS offline: {why}; serving from the cache");
            self.link.changed.notify_all();
        }
        drop(s);
        if !self.probing.swap(true, Ordering::AcqRel) {
            let this = self.clone();
            let spawned = std::thread::Builder::new()
                .name("nas-probe".into())
                .spawn(move || this.probe_loop());
            if spawned.is_err() {
                self.probing.store(false, Ordering::Release);
            }
        }
    }

    fn go_online(&self) {
        let mut s = self
            .link
            .offline_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(since) = s.take() {
            self.link.offline.store(false, Ordering::Release);
            let took = SystemTime::now().duration_since(since).unwrap_or_default();
            log::warn!("NAS online again after {took:?}");
            self.link.changed.notify_all();
        }
    }

    /// Asks the NAS until it answers as the same share; then marks it
    /// online. One probe at a time: a probe stuck in a hung NAS is waited
    /// for, not repeated, so that an outage of hours does not pile up
    /// stuck threads. Write-back (`online`) also waits for abandoned calls
    /// that change the NAS; reads do not.
    fn probe_loop(self: Arc<Self>) {
        let mut pause = Duration::from_millis(200);
        let max_pause = self
            .timeo
            .clamp(Duration::from_secs(1), Duration::from_secs(5));
        loop {
            std::thread::sleep(pause);
            pause = (pause * 2).min(max_pause);
            let slot: Arc<(Mutex<Option<BResult<u64>>>, Condvar)> =
                Arc::new((Mutex::new(None), Condvar::new()));
            let (inner, s2) = (self.inner.clone(), slot.clone());
            self.pool.submit(Box::new(move || {
                let r = inner.root().and_then(|(root, attr)| {
                    inner.statfs(&root)?;
                    Ok(attr.ino)
                });
                *s2.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                s2.1.notify_all();
            }));
            let mut g = slot.0.lock().unwrap_or_else(|e| e.into_inner());
            let r = loop {
                if let Some(r) = g.take() {
                    break r;
                }
                g = slot
                    .1
                    .wait_timeout(g, max_pause)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            };
            drop(g);
            let want = *self.root_ino.lock().unwrap_or_else(|e| e.into_inner());
            match r {
                Ok(ino) if want.is_none_or(|w| w == ino) => {
                    self.go_online();
                    self.probing.store(false, Ordering::Release);
                    // A timeout may have raced with the flag: look again.
                    if self.is_offline() && !self.probing.swap(true, Ordering::AcqRel) {
                        continue;
                    }
                    return;
                }
                Ok(ino) => {
                    log::warn!(
                        "the source is not the share it was (root inode {ino}); still offline"
                    );
                }
                Err(e) => log::debug!("NAS probe: {e}"),
            }
        }
    }

    /// Whether a call given up on after [`PATIENCE`] is still unanswered;
    /// once it has been so for `timeo`, the NAS goes offline.
    fn slow_call_pending(self: &Arc<Self>) -> bool {
        let mut g = self.slow.lock().unwrap_or_else(|e| e.into_inner());
        let Some((since, op, done)) = &g.call else {
            return false;
        };
        if done.load(Ordering::Acquire) {
            log::info!(
                "the NAS answered after {:?}: waiting for it again",
                since.elapsed()
            );
            g.call = None;
            g.impatient_until = Some(Instant::now() + SLOW_NAS_MEMORY);
            return false;
        }
        if since.elapsed() < self.timeo {
            return true;
        }
        let op = *op;
        g.call = None;
        drop(g);
        Stats::inc(&self.stats.nas_timeouts);
        self.go_offline(&format!("{op} did not answer within {:?}", self.timeo));
        false
    }

    /// Whether calls of requests the cache can answer wait only
    /// [`PATIENCE`] now (see [`Slow::impatient_until`]).
    fn patient(&self) -> bool {
        let g = self.slow.lock().unwrap_or_else(|e| e.into_inner());
        g.impatient_until.is_none_or(|t| Instant::now() >= t)
    }

    /// Runs `f` on a pool thread and waits for it at most `wait`; a call
    /// given up on before `timeo` is left to answer (see
    /// [`Self::slow_call_pending`]).
    fn run<T: Send + 'static>(
        &self,
        op: &'static str,
        changes: bool,
        wait: Duration,
        f: impl FnOnce(&B) -> BResult<T> + Send + 'static,
    ) -> Result<T, Option<BackendError>> {
        let slot = Arc::new(Slot {
            answer: Mutex::new((None, false)),
            done: Condvar::new(),
        });
        let inner = self.inner.clone();
        let stuck = self.stuck_changes.clone();
        let s2 = slot.clone();
        let finished = Arc::new(AtomicBool::new(false));
        let f2 = finished.clone();
        let start = Instant::now();
        self.pool.submit(Box::new(move || {
            let _finished = SetOnDrop(f2);
            // A panic in a backend is a bug, but it must not look like a
            // hung NAS (its caller would wait out timeo and go offline).
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&inner)))
                .unwrap_or_else(|_| {
                    log::error!("a NAS call ({op}) panicked");
                    Err(BackendError::errno(op, libc::EIO))
                });
            let mut a = s2.answer.lock().unwrap_or_else(|e| e.into_inner());
            if a.1 {
                // Abandoned by its caller.
                if changes {
                    stuck.fetch_sub(1, Ordering::AcqRel);
                }
                log::info!("an abandoned NAS call ({op}) finished");
            } else {
                a.0 = Some(r);
                s2.done.notify_all();
            }
        }));
        let deadline = start + wait.min(self.timeo);
        let mut a = slot.answer.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = a.0.take() {
                return r.map_err(Some);
            }
            let now = Instant::now();
            if now >= deadline && wait < self.timeo && !changes {
                a.1 = true;
                drop(a);
                let mut g = self.slow.lock().unwrap_or_else(|e| e.into_inner());
                if g.call.as_ref().is_none_or(|s| s.2.load(Ordering::Acquire)) {
                    log::info!("{op} did not answer within {wait:?}: answering from the cache");
                    g.call = Some((start, op, finished));
                }
                return Err(None);
            }
            if now >= deadline {
                a.1 = true;
                if changes {
                    self.stuck_changes.fetch_add(1, Ordering::AcqRel);
                }
                Stats::inc(&self.stats.nas_timeouts);
                return Err(None);
            }
            a = slot
                .done
                .wait_timeout(a, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The handle the core holds: the wrapper, shared with its probe thread.
pub struct BoundedBackend<B: Backend>(pub Arc<Bounded<B>>);

impl<B: Backend> fmt::Debug for BoundedBackend<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<B: Backend> BoundedBackend<B> {
    pub fn new(inner: B, timeo: Duration, stats: Arc<Stats>) -> Self {
        BoundedBackend(Arc::new(Bounded::new(inner, timeo, stats)))
    }

    /// One call, bounded; `changes` if it changes the NAS (then it must have
    /// finished before write-back carries on after an outage).
    fn call<T: Send + 'static>(
        &self,
        op: &'static str,
        changes: bool,
        f: impl FnOnce(&B) -> BResult<T> + Send + 'static,
    ) -> BResult<T> {
        let slow = self.0.slow_call_pending();
        if self.0.is_offline() {
            return Err(unreachable(op));
        }
        let patient = !changes && CACHE_CAN_ANSWER.with(|c| c.get()) && self.0.patient();
        if patient && slow {
            Stats::inc(&self.0.stats.slow_nas_hits);
            return Err(unreachable(op));
        }
        let wait = if patient { PATIENCE } else { self.0.timeo };
        match self.0.run(op, changes, wait, f) {
            Ok(v) => Ok(v),
            Err(Some(e)) if means_gone(&e) => {
                self.0.go_offline(&format!("{op}: {e}"));
                Err(unreachable(op))
            }
            Err(Some(e)) => Err(e),
            Err(None) if patient && PATIENCE < self.0.timeo => {
                Stats::inc(&self.0.stats.slow_nas_hits);
                Err(unreachable(op))
            }
            Err(None) => {
                self.0
                    .go_offline(&format!("{op} did not answer within {:?}", self.0.timeo));
                Err(unreachable(op))
            }
        }
    }

    /// The NAS file behind `f`, opening it now if it was opened offline.
    fn file(&self, f: &BoundedFile<B>) -> BResult<Arc<B::File>> {
        let mut g = f.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(file) = &*g {
            return Ok(file.clone());
        }
        let (node, mode) = (f.node.clone(), f.mode);
        let file = Arc::new(self.call("open", false, move |b| b.open(&node, mode))?);
        *g = Some(file.clone());
        Ok(file)
    }
}

impl<B: Backend> Backend for BoundedBackend<B> {
    type Node = B::Node;
    type File = BoundedFile<B>;

    fn root(&self) -> BResult<(Self::Node, Attr)> {
        let r = self.call("root", false, |b| b.root())?;
        let mut known = self.0.root_ino.lock().unwrap_or_else(|e| e.into_inner());
        known.get_or_insert(r.1.ino);
        Ok(r)
    }
    fn lookup(&self, dir: &Self::Node, name: &OsStr) -> BResult<(Self::Node, Attr)> {
        let (dir, name) = (dir.clone(), name.to_os_string());
        self.call("lookup", false, move |b| b.lookup(&dir, &name))
    }
    fn lookup_many(
        &self,
        dir: &Self::Node,
        names: &[OsString],
    ) -> Vec<BResult<(Self::Node, Attr)>> {
        let (d, n) = (dir.clone(), names.to_vec());
        match self.call("lookup", false, move |b| Ok(b.lookup_many(&d, &n))) {
            Ok(v) => v,
            Err(e) => names
                .iter()
                .map(|_| Err(BackendError::new(e.op, clone_io(&e.source))))
                .collect(),
        }
    }
    fn getattr(&self, node: &Self::Node) -> BResult<Attr> {
        let node = node.clone();
        self.call("getattr", false, move |b| b.getattr(&node))
    }
    fn setattr(&self, n: &Self::Node, f: Option<&Self::File>, c: &SetAttr) -> BResult<Attr> {
        let file = f.map(|f| self.file(f)).transpose()?;
        let (n, c) = (n.clone(), *c);
        self.call("setattr", true, move |b| b.setattr(&n, file.as_deref(), &c))
    }
    fn readlink(&self, node: &Self::Node) -> BResult<OsString> {
        let node = node.clone();
        self.call("readlink", false, move |b| b.readlink(&node))
    }
    fn readdir(&self, dir: &Self::Node) -> BResult<Vec<DirEntry>> {
        let dir = dir.clone();
        self.call("readdir", false, move |b| b.readdir(&dir))
    }
    fn mknod(
        &self,
        dir: &Self::Node,
        name: &OsStr,
        mode: u32,
        rdev: u64,
        creds: Creds,
    ) -> BResult<(Self::Node, Attr)> {
        let (dir, name) = (dir.clone(), name.to_os_string());
        self.call("mknod", true, move |b| {
            b.mknod(&dir, &name, mode, rdev, creds)
        })
    }
    fn mkdir(&self, d: &Self::Node, n: &OsStr, mode: u32, c: Creds) -> BResult<(Self::Node, Attr)> {
        let (d, n) = (d.clone(), n.to_os_string());
        self.call("mkdir", true, move |b| b.mkdir(&d, &n, mode, c))
    }
    fn symlink(
        &self,
        d: &Self::Node,
        n: &OsStr,
        t: &OsStr,
        c: Creds,
    ) -> BResult<(Self::Node, Attr)> {
        let (d, n, t) = (d.clone(), n.to_os_string(), t.to_os_string());
        self.call("symlink", true, move |b| b.symlink(&d, &n, &t, c))
    }
    fn link(&self, node: &Self::Node, dir: &Self::Node, name: &OsStr) -> BResult<Attr> {
        let (node, dir, name) = (node.clone(), dir.clone(), name.to_os_string());
        self.call("link", true, move |b| b.link(&node, &dir, &name))
    }
    fn unlink(&self, dir: &Self::Node, name: &OsStr) -> BResult<()> {
        let (dir, name) = (dir.clone(), name.to_os_string());
        self.call("unlink", true, move |b| b.unlink(&dir, &name))
    }
    fn rmdir(&self, dir: &Self::Node, name: &OsStr) -> BResult<()> {
        let (dir, name) = (dir.clone(), name.to_os_string());
        self.call("rmdir", true, move |b| b.rmdir(&dir, &name))
    }
    fn rename(
        &self,
        d: &Self::Node,
        n: &OsStr,
        nd: &Self::Node,
        nn: &OsStr,
        f: RenameFlags,
    ) -> BResult<()> {
        let (d, n, nd, nn) = (d.clone(), n.to_os_string(), nd.clone(), nn.to_os_string());
        self.call("rename", true, move |b| b.rename(&d, &n, &nd, &nn, f))
    }
    fn open(&self, node: &Self::Node, mode: OpenMode) -> BResult<Self::File> {
        let file = if self.0.is_offline() {
            None
        } else {
            let n = node.clone();
            // An open that finds the NAS gone is completed at first use,
            // like one made while offline.
            match self.call("open", false, move |b| b.open(&n, mode)) {
                Ok(f) => Some(Arc::new(f)),
                Err(e) if is_unreachable(&e) => None,
                Err(e) => return Err(e),
            }
        };
        Ok(BoundedFile {
            file: Mutex::new(file),
            node: node.clone(),
            mode,
            pool: self.0.pool.clone(),
        })
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
        let (d, n) = (dir.clone(), name.to_os_string());
        let (node, attr, file) = self.call("create", true, move |b| {
            b.create(&d, &n, mode, open, exclusive, creds)
        })?;
        let file = BoundedFile {
            file: Mutex::new(Some(Arc::new(file))),
            node: node.clone(),
            mode: open,
            pool: self.0.pool.clone(),
        };
        Ok((node, attr, file))
    }
    fn read(&self, file: &Self::File, offset: u64, buf: &mut [u8]) -> BResult<usize> {
        let f = self.file(file)?;
        let len = buf.len();
        let data = self.call("read", false, move |b| {
            let mut v = vec![0u8; len];
            let n = b.read(&f, offset, &mut v)?;
            v.truncate(n);
            Ok(v)
        })?;
        buf[..data.len()].copy_from_slice(&data);
        Ok(data.len())
    }
    fn write(&self, file: &Self::File, offset: u64, data: &[u8]) -> BResult<usize> {
        let f = self.file(file)?;
        let data = data.to_vec();
        self.call("write", true, move |b| b.write(&f, offset, &data))
    }
    fn fsync(&self, file: &Self::File, datasync: bool) -> BResult<()> {
        let f = self.file(file)?;
        self.call("fsync", true, move |b| b.fsync(&f, datasync))
    }
    fn fallocate(&self, file: &Self::File, mode: i32, offset: u64, len: u64) -> BResult<()> {
        let f = self.file(file)?;
        self.call("fallocate", true, move |b| {
            b.fallocate(&f, mode, offset, len)
        })
    }
    fn fgetattr(&self, file: &Self::File) -> BResult<Attr> {
        let f = self.file(file)?;
        self.call("getattr", false, move |b| b.fgetattr(&f))
    }
    fn fsyncdir(&self, dir: &Self::Node) -> BResult<()> {
        let dir = dir.clone();
        self.call("fsyncdir", true, move |b| b.fsyncdir(&dir))
    }
    fn statfs(&self, node: &Self::Node) -> BResult<StatFs> {
        let node = node.clone();
        self.call("statfs", false, move |b| b.statfs(&node))
    }
    fn max_file_size(&self) -> u64 {
        self.0.inner.max_file_size()
    }
    fn lists_acls(&self, node: &Self::Node) -> bool {
        self.0.inner.lists_acls(node)
    }
    fn keeps_xattrs(&self) -> bool {
        self.0.inner.keeps_xattrs()
    }
    fn same_fs(&self, a: &Self::Node, b: &Self::Node) -> bool {
        self.0.inner.same_fs(a, b)
    }
    fn getxattr(&self, node: &Self::Node, name: &OsStr) -> BResult<Vec<u8>> {
        let (node, name) = (node.clone(), name.to_os_string());
        self.call("getxattr", false, move |b| b.getxattr(&node, &name))
    }
    fn listxattr(&self, node: &Self::Node) -> BResult<Vec<u8>> {
        let node = node.clone();
        self.call("listxattr", false, move |b| b.listxattr(&node))
    }
    fn setxattr(&self, node: &Self::Node, name: &OsStr, value: &[u8], flags: i32) -> BResult<()> {
        let (node, name, value) = (node.clone(), name.to_os_string(), value.to_vec());
        self.call("setxattr", true, move |b| {
            b.setxattr(&node, &name, &value, flags)
        })
    }
    fn removexattr(&self, node: &Self::Node, name: &OsStr) -> BResult<()> {
        let (node, name) = (node.clone(), name.to_os_string());
        self.call("removexattr", true, move |b| b.removexattr(&node, &name))
    }
    fn online(&self) -> bool {
        // (A call given up on after PATIENCE is not taken for offline:
        // the core's keep-for-later and flush decisions rest on this.)
        self.0.slow_call_pending();
        !self.0.is_offline() && self.0.stuck_changes.load(Ordering::Acquire) == 0
    }
    fn held_up(&self) -> bool {
        self.0.slow_call_pending()
    }
    fn offline_since(&self) -> Option<SystemTime> {
        self.0.slow_call_pending();
        self.0.offline_since()
    }
    fn unfinished_changes(&self) -> usize {
        self.0.stuck_changes.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::dir::DirBackend;
    use crate::backend::instrumented::{Fault, FaultControl, Instrumented};

    fn setup() -> (
        tempfile::TempDir,
        BoundedBackend<Instrumented<DirBackend>>,
        Arc<FaultControl>,
    ) {
        setup_with(Duration::from_millis(300))
    }

    fn setup_with(
        timeo: Duration,
    ) -> (
        tempfile::TempDir,
        BoundedBackend<Instrumented<DirBackend>>,
        Arc<FaultControl>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"hello").unwrap();
        let stats = Arc::new(Stats::default());
        let inner = Instrumented::new(DirBackend::new(dir.path()).unwrap(), stats.clone());
        let faults = inner.faults();
        let b = BoundedBackend::new(inner, timeo, stats);
        (dir, b, faults)
    }

    fn wait_online(b: &BoundedBackend<Instrumented<DirBackend>>) {
        assert!(b.0.wait_online(Duration::from_secs(10)), "still offline");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !b.online() {
            assert!(Instant::now() < deadline, "abandoned calls never finished");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_hung_call_is_abandoned_after_timeo_and_the_nas_is_offline_until_it_answers() {
        let (_d, b, faults) = setup();
        let (root, _) = b.root().unwrap();
        assert!(b.online());
        faults.set(Fault::Stall, None);
        let t0 = Instant::now();
        let e = b.lookup(&root, OsStr::new("f")).unwrap_err();
        assert!(is_unreachable(&e), "{e}");
        assert_eq!(e.raw_errno(), libc::EIO);
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert!(!b.online() && b.offline_since().is_some());
        // Offline: no more waiting.
        let t0 = Instant::now();
        assert!(is_unreachable(&b.getattr(&root).unwrap_err()));
        assert!(t0.elapsed() < Duration::from_millis(100));
        faults.set(Fault::None, None);
        wait_online(&b);
        assert!(b.offline_since().is_none());
        assert_eq!(b.lookup(&root, OsStr::new("f")).unwrap().1.size, 5);
    }

    #[test]
    fn what_the_cache_can_answer_waits_for_a_slow_nas_a_second_not_timeo() {
        let (_d, b, faults) = setup_with(Duration::from_secs(4));
        let (root, _) = b.root().unwrap();
        faults.set(Fault::Stall, None);
        // The first waits PATIENCE; the NAS is not offline for that, but
        // write-back holds off (`held_up`).
        let t0 = Instant::now();
        let e = cache_can_answer(|| b.getattr(&root)).unwrap_err();
        assert!(is_unreachable(&e), "{e}");
        let took = t0.elapsed();
        assert!(
            took >= PATIENCE && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert!(b.online() && b.held_up() && b.offline_since().is_none());
        // While that call is unanswered, the next ones do not wait.
        let t0 = Instant::now();
        assert!(is_unreachable(
            &cache_can_answer(|| b.lookup(&root, OsStr::new("f"))).unwrap_err()
        ));
        assert!(t0.elapsed() < Duration::from_millis(500));
        assert_eq!(faults.stalled(), 1, "no second call");
        // It answers: the NAS is slow, not gone, and its answers are worth
        // waiting for again (up to timeo), as before.
        faults.set(Fault::None, None);
        let deadline = Instant::now() + Duration::from_secs(5);
        while b.0.slow_call_pending() {
            assert!(Instant::now() < deadline, "never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            cache_can_answer(|| b.lookup(&root, OsStr::new("f")))
                .unwrap()
                .1
                .size,
            5
        );
        faults.set(Fault::Stall, None);
        let t0 = Instant::now();
        assert!(is_unreachable(
            &cache_can_answer(|| b.getattr(&root)).unwrap_err()
        ));
        assert!(t0.elapsed() >= Duration::from_secs(4), "{:?}", t0.elapsed());
        assert!(b.offline_since().is_some());
        faults.set(Fault::None, None);
        wait_online(&b);

        // One that does not answer by timeo makes the NAS offline, at the
        // next call (here one the cache could not answer).
        let (_d, b, faults) = setup_with(Duration::from_secs(3));
        let (root, _) = b.root().unwrap();
        faults.set(Fault::Stall, None);
        assert!(is_unreachable(
            &cache_can_answer(|| b.getattr(&root)).unwrap_err()
        ));
        std::thread::sleep(Duration::from_secs(3));
        let t0 = Instant::now();
        assert!(is_unreachable(
            &b.lookup(&root, OsStr::new("f")).unwrap_err()
        ));
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "{:?}",
            t0.elapsed()
        );
        assert!(!b.online() && b.offline_since().is_some());
        faults.set(Fault::None, None);
        wait_online(&b);
    }

    #[test]
    fn a_backend_that_panics_gives_eio_at_once_and_the_nas_stays_online() {
        // A long time limit: printing a panic (with RUST_BACKTRACE) may
        // take longer than the usual 300 ms in a debug build.
        let (_d, b, faults) = setup_with(Duration::from_secs(20));
        let (root, _) = b.root().unwrap();
        faults.set(Fault::Panic, Some("lookup"));
        for _ in 0..(MIN_THREADS + 2) {
            let t0 = Instant::now();
            let e = b.lookup(&root, OsStr::new("f")).unwrap_err();
            assert!(!is_unreachable(&e) && e.raw_errno() == libc::EIO, "{e}");
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "not held to the time limit"
            );
        }
        assert!(b.online());
        faults.set(Fault::None, None);
        assert_eq!(b.lookup(&root, OsStr::new("f")).unwrap().1.size, 5);
    }

    #[test]
    fn a_probe_stuck_in_a_hung_nas_is_not_repeated() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let inner = Instrumented::new(DirBackend::new(dir.path()).unwrap(), stats.clone());
        let faults = inner.faults();
        let b = BoundedBackend::new(inner, Duration::from_millis(200), stats.clone());
        let (root, _) = b.root().unwrap();
        faults.set(Fault::Stall, None);
        assert!(is_unreachable(&b.getattr(&root).unwrap_err()));
        let calls = || stats.nas_ops.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(500));
        let before = calls();
        // Probes would come every 200 ms to 1 s: one is stuck, no more.
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(calls(), before, "probes piled up");
        assert_eq!(faults.stalled(), 2, "the first call and one probe");
        faults.set(Fault::None, None);
        wait_online(&b);
    }

    #[test]
    fn an_abandoned_change_holds_write_back_until_it_has_finished() {
        let (_d, b, faults) = setup();
        let (root, _) = b.root().unwrap();
        let (node, _) = b.lookup(&root, OsStr::new("f")).unwrap();
        let f = b
            .open(
                &node,
                OpenMode {
                    read: true,
                    write: true,
                    append: false,
                    truncate: false,
                },
            )
            .unwrap();
        faults.set(Fault::Stall, Some("write"));
        assert!(is_unreachable(&b.write(&f, 0, b"HELLO").unwrap_err()));
        // The probe gets answers (only writes hang): reads go on, but the
        // hung write could still land, so write-back must wait for it.
        assert!(b.0.wait_online(Duration::from_secs(10)));
        assert_eq!(b.lookup(&root, OsStr::new("f")).unwrap().1.size, 5);
        std::thread::sleep(Duration::from_millis(500));
        assert!(!b.online());
        assert_eq!(b.unfinished_changes(), 1);
        faults.set(Fault::None, None);
        wait_online(&b);
        assert_eq!(b.unfinished_changes(), 0);
        let mut buf = [0u8; 5];
        assert_eq!(b.read(&f, 0, &mut buf).unwrap(), 5);
        assert_eq!(&buf, b"HELLO", "the abandoned write landed");
    }

    #[test]
    fn names_are_looked_up_in_one_bounded_call() {
        let (d, b, faults) = setup();
        std::fs::write(d.path().join("g"), b"x").unwrap();
        let (root, _) = b.root().unwrap();
        let names: Vec<OsString> = ["f", "none", "g"].iter().map(OsString::from).collect();
        let got = b.lookup_many(&root, &names);
        assert_eq!(got[0].as_ref().unwrap().1.size, 5);
        assert_eq!(got[1].as_ref().unwrap_err().raw_errno(), libc::ENOENT);
        assert_eq!(got[2].as_ref().unwrap().1.size, 1);
        faults.set(Fault::Stall, None);
        let got = b.lookup_many(&root, &names);
        assert!(got.iter().all(|r| r.as_ref().is_err_and(is_unreachable)));
        faults.set(Fault::None, None);
    }

    #[test]
    fn a_file_opened_offline_is_opened_on_the_nas_at_its_first_use() {
        let (_d, b, faults) = setup();
        let (root, _) = b.root().unwrap();
        let (node, _) = b.lookup(&root, OsStr::new("f")).unwrap();
        faults.set(Fault::Fail(libc::ENOTCONN), None);
        assert!(is_unreachable(&b.getattr(&node).unwrap_err()));
        let mode = OpenMode {
            read: true,
            write: false,
            append: false,
            truncate: false,
        };
        let f = b.open(&node, mode).expect("open while offline");
        let mut buf = [0u8; 5];
        assert!(is_unreachable(&b.read(&f, 0, &mut buf).unwrap_err()));
        faults.set(Fault::None, None);
        wait_online(&b);
        assert_eq!(b.read(&f, 0, &mut buf).unwrap(), 5);
        assert_eq!(&buf, b"hello");
    }
}
