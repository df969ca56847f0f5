//! The NAS over NFSv3, from user space (`nfs://HOST/EXPORT` sources).
//!
//! Nodes are NFS file handles. Handles stay valid across a server restart,
//! so a broken connection is simply replaced ([`conn`]); a handle the
//! server no longer knows (NFS3ERR_STALE: the export was re-created, say)
//! is looked up again by the path it was found under, and kept if the
//! path still leads to the same file id.
//!
//! Writes are UNSTABLE and made durable by COMMIT at fsync. The server
//! may lose unstable data if it restarts before the COMMIT; it says so by
//! answering with a different write verifier. Each open file therefore
//! keeps its uncommitted writes until a COMMIT under the same verifier as
//! all of them succeeds, and sends them again if the verifier changed.

pub mod conn;
pub mod source;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use nfs3_client::nfs3_types::nfs3::{
    self, COMMIT3args, CREATE3args, FSINFO3args, FSSTAT3args, GETATTR3args, LINK3args, LOOKUP3args,
    MKDIR3args, MKNOD3args, Nfs3Option, Nfs3Result, READ3args, READDIRPLUS3args, READLINK3args,
    REMOVE3args, RENAME3args, RMDIR3args, SETATTR3args, SYMLINK3args, WRITE3args, createhow3,
    createverf3, devicedata3, diropargs3, fattr3, filename3, ftype3, mknoddata3, nfs_fh3, nfspath3,
    nfsstat3, nfstime3, sattr3, set_atime, set_mtime, specdata3, stable_how, symlinkdata3,
};
use nfs3_client::nfs3_types::xdr_codec::Opaque;

use super::{
    Attr, BResult, Backend, BackendError, Creds, DirEntry, FileKind, OpenMode, RenameFlags,
    SetAttr, SetTime, StatFs,
};
use conn::{ConnConfig, Pool};
pub use source::NfsSource;

/// Uncommitted bytes an open file keeps before it commits on its own.
const MAX_UNCOMMITTED: u64 = 32 << 20;
/// Names of unlinked files kept while open. Those of this daemon (its
/// instance id follows the prefix) are not listed; others' are, as
/// Linux's NFS client lists its .nfsXXXX files.
const HIDDEN_PREFIX: &[u8] = b".nassync-unlinked-";

/// How long an rmdir waits for the release of a file unlinked while
/// open, whose close has returned (see `sweep_hidden`).
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// This daemon's prefix of hidden names: the prefix and a random id.
fn own_hidden_prefix() -> &'static [u8] {
    static P: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        let mut p = HIDDEN_PREFIX.to_vec();
        p.extend(format!("{:08x}-", fastrand::u32(..)).bytes());
        p
    })
}
/// How long a READDIRPLUS listing answers lookups of its names.
const LISTING_FRESH: Duration = Duration::from_secs(1);

/// The closure that makes one RPC on a pooled connection (see
/// [`conn::Pool::call`]): `args` is built afresh for each try.
macro_rules! rpc {
    ($method:ident, $args:expr) => {
        |mut c: conn::Conn| {
            let a = $args;
            async move {
                let r = c.$method(&a).await;
                (c, r)
            }
        }
    };
}

/// The errno an NFS status stands for (RFC 1813, section 2.6).
pub fn nfsstat_errno(s: nfsstat3) -> i32 {
    use nfsstat3::*;
    match s {
        NFS3_OK => 0,
        NFS3ERR_PERM => libc::EPERM,
        NFS3ERR_NOENT => libc::ENOENT,
        NFS3ERR_IO => libc::EIO,
        NFS3ERR_NXIO => libc::ENXIO,
        NFS3ERR_ACCES => libc::EACCES,
        NFS3ERR_EXIST => libc::EEXIST,
        NFS3ERR_XDEV => libc::EXDEV,
        NFS3ERR_NODEV => libc::ENODEV,
        NFS3ERR_NOTDIR => libc::ENOTDIR,
        NFS3ERR_ISDIR => libc::EISDIR,
        NFS3ERR_INVAL => libc::EINVAL,
        NFS3ERR_FBIG => libc::EFBIG,
        NFS3ERR_NOSPC => libc::ENOSPC,
        NFS3ERR_ROFS => libc::EROFS,
        NFS3ERR_MLINK => libc::EMLINK,
        NFS3ERR_NAMETOOLONG => libc::ENAMETOOLONG,
        NFS3ERR_NOTEMPTY => libc::ENOTEMPTY,
        NFS3ERR_DQUOT => libc::EDQUOT,
        NFS3ERR_STALE | NFS3ERR_BADHANDLE => libc::ESTALE,
        NFS3ERR_REMOTE => libc::EREMOTE,
        NFS3ERR_NOTSUPP => libc::EOPNOTSUPP,
        NFS3ERR_JUKEBOX => libc::EAGAIN,
        NFS3ERR_BADTYPE => libc::EINVAL,
        // Protocol trouble between client and server, not the caller's.
        NFS3ERR_NOT_SYNC | NFS3ERR_BAD_COOKIE | NFS3ERR_TOOSMALL | NFS3ERR_SERVERFAULT => libc::EIO,
    }
}

fn status_err(op: &'static str, s: nfsstat3) -> BackendError {
    BackendError::coded(op, nfsstat_errno(s), format!("NFS server: {s}"))
}

fn ok<T, E>(op: &'static str, r: Nfs3Result<T, E>) -> BResult<T> {
    match r {
        Nfs3Result::Ok(v) => Ok(v),
        Nfs3Result::Err((s, _)) => Err(status_err(op, s)),
    }
}

fn kind_of(t: ftype3) -> FileKind {
    match t {
        ftype3::NF3REG => FileKind::File,
        ftype3::NF3DIR => FileKind::Dir,
        ftype3::NF3BLK => FileKind::BlockDev,
        ftype3::NF3CHR => FileKind::CharDev,
        ftype3::NF3LNK => FileKind::Symlink,
        ftype3::NF3SOCK => FileKind::Socket,
        ftype3::NF3FIFO => FileKind::Fifo,
    }
}

fn attr_of(a: &fattr3) -> Attr {
    Attr {
        ino: a.fileid,
        kind: kind_of(a.type_),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: libc::makedev(a.rdev.specdata1, a.rdev.specdata2),
        size: a.size,
        blocks: a.used.div_ceil(512),
        blksize: 4096,
        atime: a.atime.into(),
        mtime: a.mtime.into(),
        ctime: a.ctime.into(),
    }
}

fn nfstime(t: SystemTime) -> nfstime3 {
    // Before 1970 or after 2106 cannot be said in NFSv3.
    nfstime3::try_from(t).unwrap_or_default()
}

fn name3(name: &OsStr) -> filename3<'_> {
    filename3(Opaque::borrowed(name.as_bytes()))
}

/// `name` in the directory `dir`, as RPCs take it.
fn dirop<'a>(dir: &nfs_fh3, name: &'a OsStr) -> diropargs3<'a> {
    diropargs3 {
        dir: dir.clone(),
        name: name3(name),
    }
}

/// One object on the server.
#[derive(Debug)]
pub struct NfsNode {
    fh: RwLock<nfs_fh3>,
    ino: u64,
    /// Components from the source's root, as found: to find the object
    /// again if its handle goes stale.
    path: Vec<OsString>,
    /// Last known permission bits (for setgid directories).
    perm: AtomicU32,
    /// The root generation it was found under ([`NfsBackend::root_gen`]).
    root_gen: AtomicU64,
}

impl NfsNode {
    fn fh(&self) -> nfs_fh3 {
        self.fh.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

pub struct NfsFile {
    node: Arc<NfsNode>,
    append: bool,
    /// Shared by every open file of the same object.
    unstable: Arc<AsyncMutex<Unstable>>,
    pool: Arc<Pool>,
    open: Arc<OpenFiles>,
}

/// Files open through nassync, by file id. NFSv3 servers delete a file
/// at its last unlink even while clients have it open; like Linux's NFS
/// client, nassync then renames it to a hidden name instead ("silly
/// rename") and removes it when the last open file of it is dropped.
#[derive(Default)]
pub struct OpenFiles {
    map: Mutex<HashMap<u64, OpenFile>>,
    /// Signalled when a file's last open file is gone.
    released: std::sync::Condvar,
}

#[derive(Default)]
struct OpenFile {
    count: usize,
    /// Where it was hidden: (directory handle, name).
    hidden: Option<(nfs_fh3, OsString)>,
    unstable: Arc<AsyncMutex<Unstable>>,
}

impl OpenFiles {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, OpenFile>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A file hidden by [`NfsBackend::hide_if_open`], held open meanwhile.
struct Hidden {
    name: OsString,
    held: Arc<NfsNode>,
}

/// Writes of one object that the server has not made durable yet, in
/// the order they were sent, each with the verifier it was answered with.
/// Kept per object, not per open file: a commit or a truncation covers
/// every writer, and no old write can be sent again over a newer one.
/// A write answered as stable has no verifier (`None`); it is kept only
/// behind an unstable one, to be sent again after it if that one is.
/// A tokio mutex: held across RPCs, also by a background commit.
#[derive(Default)]
struct Unstable {
    writes: Vec<(u64, Vec<u8>, Option<[u8; 8]>)>,
    bytes: u64,
}

type AsyncMutex<T> = tokio::sync::Mutex<T>;

impl Drop for NfsFile {
    fn drop(&mut self) {
        release(&self.pool, &self.open, &self.node);
    }
}

/// One open file (or hold) of `node` is gone. At the last: a hidden
/// unlinked file is removed (now, so that an rmdir right after the close
/// works), and writes not yet committed are committed in the background
/// (close(2) does not wait for durability, but the data must get there),
/// the entry staying meanwhile so that a new open, fsync or truncation
/// shares them.
fn release(pool: &Arc<Pool>, open: &Arc<OpenFiles>, node: &Arc<NfsNode>) {
    let (hidden, unstable) = {
        let mut map = open.lock();
        let Some(o) = map.get_mut(&node.ino) else {
            return;
        };
        o.count -= 1;
        if o.count > 0 {
            return;
        }
        if o.hidden.is_some() {
            let o = map.remove(&node.ino).expect("just seen");
            open.released.notify_all();
            (o.hidden, None)
        } else {
            (None, Some(o.unstable.clone()))
        }
    };
    if let Some((dir, name)) = hidden {
        let r = pool.block_on(
            "unlink",
            pool.call(
                "unlink",
                false,
                rpc!(
                    remove,
                    REMOVE3args {
                        object: dirop(&dir, &name),
                    }
                ),
            ),
        );
        // Gone already: an rmdir that waited for this close removed it.
        let gone = matches!(r, Ok(Nfs3Result::Err((nfsstat3::NFS3ERR_NOENT, _))));
        if !matches!(r, Ok(Nfs3Result::Ok(_))) && !gone {
            log::warn!("NFS: could not remove the hidden unlinked file {name:?}");
        }
        return;
    }
    let Some(unstable) = unstable else { return };
    let (pool2, open2, node2) = (pool.clone(), open.clone(), node.clone());
    pool.spawn(async move {
        let mut u = unstable.lock().await;
        if !u.writes.is_empty() {
            let timeo = pool2.config().timeo;
            let r = tokio::time::timeout(timeo * 4, commit_all(&pool2, &node2, &mut u)).await;
            if !matches!(r, Ok(Ok(()))) {
                log::warn!(
                    "NFS: {} bytes written to file {} and closed without fsync could not be \
                     committed",
                    u.bytes,
                    node2.ino
                );
            }
        }
        drop(u);
        let mut map = open2.lock();
        if map
            .get(&node2.ino)
            .is_some_and(|o| o.count == 0 && Arc::ptr_eq(&o.unstable, &unstable))
        {
            map.remove(&node2.ino);
        }
    });
}

/// One COMMIT of the whole file: the server's verifier.
async fn commit_once(pool: &Pool, node: &NfsNode) -> BResult<[u8; 8]> {
    Ok(pool
        .call(
            "commit",
            true,
            rpc!(
                commit,
                COMMIT3args {
                    file: node.fh(),
                    offset: 0,
                    count: 0,
                }
            ),
        )
        .await
        .and_then(|r| ok("commit", r))?
        .verf
        .0)
}

/// Commits `u`. A write answered with another verifier than the
/// COMMIT's may be lost (the server restarted since): it is sent again,
/// with every write after it (a later one may overlap it), and committed
/// again. `u` is emptied only once all of it is durable.
async fn commit_all(pool: &Pool, node: &NfsNode, u: &mut Unstable) -> BResult<()> {
    for _ in 0..4 {
        let verf = commit_once(pool, node).await?;
        let Some(first) = u.writes.iter().position(|w| w.2.is_some_and(|v| v != verf)) else {
            *u = Unstable::default();
            return Ok(());
        };
        let again: u64 = u.writes[first..].iter().map(|w| w.1.len() as u64).sum();
        log::warn!(
            "NFS: the server may have lost {again} bytes written to file {} (it restarted): \
             sending them again",
            node.ino
        );
        pool.resent.fetch_add(again, Ordering::Relaxed);
        for w in &mut u.writes[first..] {
            w.2 = write_chunk(pool, node, w.0, &w.1, stable_how::UNSTABLE).await?;
        }
    }
    Err(BackendError::coded(
        "commit",
        libc::EIO,
        "the NFS server keeps losing unstable writes",
    ))
}

/// One WRITE (at most wtmax bytes); the verifier if it is not yet stable.
async fn write_chunk(
    pool: &Pool,
    node: &NfsNode,
    off: u64,
    data: &[u8],
    stable: stable_how,
) -> BResult<Option<[u8; 8]>> {
    let res = pool
        .call(
            "write",
            true,
            rpc!(
                write,
                WRITE3args {
                    file: node.fh(),
                    offset: off,
                    count: data.len() as u32,
                    stable,
                    data: Opaque::borrowed(data),
                }
            ),
        )
        .await
        .and_then(|r| ok("write", r))?;
    if (res.count as usize) < data.len() {
        // A short write happens only on a full disk.
        return Err(BackendError::errno("write", libc::ENOSPC));
    }
    Ok(match res.committed {
        stable_how::UNSTABLE => Some(res.verf.0),
        _ => None,
    })
}

/// One READDIRPLUS entry: name, file id, and handle and attributes when
/// the server gave them.
type PlusEntry = (OsString, u64, Option<(nfs_fh3, fattr3)>);

/// A listing with the handles and attributes READDIRPLUS gave.
struct Listing {
    at: Instant,
    entries: HashMap<OsString, (nfs_fh3, fattr3)>,
}

pub struct NfsBackend {
    pool: Arc<Pool>,
    root: Arc<NfsNode>,
    is_root: bool,
    rtmax: u32,
    wtmax: u32,
    maxfilesize: u64,
    namelen: u32,
    listings: Mutex<HashMap<u64, Listing>>,
    open: Arc<OpenFiles>,
    /// How many times the root's handle changed (a re-export): a node
    /// found under an older one may be found again by its path.
    root_gen: AtomicU64,
}

impl std::fmt::Debug for NfsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NfsBackend({})", self.pool.config().source)
    }
}

/// Mount-time settings of the NFS client.
#[derive(Clone, Debug)]
pub struct NfsOptions {
    pub timeo: Duration,
    pub nconnect: usize,
    pub resvport: bool,
}

impl NfsBackend {
    /// Connects, finds the export and the source directory below it, and
    /// asks the server for its transfer sizes.
    pub fn connect(source: &NfsSource, o: &NfsOptions) -> BResult<NfsBackend> {
        let is_root = nix::unistd::geteuid().is_root();
        let cfg = ConnConfig {
            source: source.clone(),
            timeo: o.timeo,
            nconnect: o.nconnect,
            resvport: o.resvport && is_root,
            uid: source
                .uid
                .unwrap_or_else(|| nix::unistd::geteuid().as_raw()),
            gid: source
                .gid
                .unwrap_or_else(|| nix::unistd::getegid().as_raw()),
        };
        let pool = Arc::new(Pool::new(cfg).map_err(|e| BackendError::new("runtime", e))?);
        let mounted = pool.first_connect()?;
        let mut b = NfsBackend {
            pool,
            root: Arc::new(NfsNode {
                fh: RwLock::new(mounted.root.clone()),
                ino: 0,
                path: Vec::new(),
                perm: AtomicU32::new(0),
                root_gen: AtomicU64::new(0),
            }),
            is_root,
            rtmax: 1 << 20,
            wtmax: 1 << 20,
            maxfilesize: i64::MAX as u64,
            namelen: 255,
            listings: Mutex::new(HashMap::new()),
            open: Arc::new(OpenFiles::default()),
            root_gen: AtomicU64::new(0),
        };
        // The source may be a directory below the export.
        let mut node = b.root.clone();
        for c in &mounted.rest {
            let (n, a) = b.lookup(&node, OsStr::new(c))?;
            if a.kind != FileKind::Dir {
                return Err(BackendError::coded(
                    "lookup",
                    libc::ENOTDIR,
                    format!("{c} is not a directory"),
                ));
            }
            node = n;
        }
        let a = b.getattr(&node)?;
        if a.kind != FileKind::Dir {
            return Err(BackendError::errno("getattr", libc::ENOTDIR));
        }
        b.root = Arc::new(NfsNode {
            fh: RwLock::new(node.fh()),
            ino: a.ino,
            path: Vec::new(),
            perm: AtomicU32::new(a.perm as u32),
            root_gen: AtomicU64::new(0),
        });
        let fsroot = b.root.fh();
        let info = b.ask(
            "fsinfo",
            true,
            rpc!(
                fsinfo,
                FSINFO3args {
                    fsroot: fsroot.clone()
                }
            ),
        )?;
        // Servers say 0 for "no limit"; keep transfers at a sane size.
        let clamp = |v: u32| if v == 0 { 1 << 20 } else { v.min(4 << 20) };
        b.rtmax = clamp(info.rtmax);
        b.wtmax = clamp(info.wtmax);
        if info.maxfilesize > 0 {
            b.maxfilesize = info.maxfilesize.min(i64::MAX as u64);
        }
        if let Ok(pc) = b.ask(
            "pathconf",
            true,
            rpc!(
                pathconf,
                nfs3::PATHCONF3args {
                    object: fsroot.clone()
                }
            ),
        ) {
            if pc.name_max > 0 {
                b.namelen = pc.name_max;
            }
        }
        log::info!(
            "NFS {}: export {}, rtmax {} wtmax {}",
            b.pool.config().source,
            mounted.export,
            b.rtmax,
            b.wtmax
        );
        Ok(b)
    }

    /// Bytes sent again because the server lost them before a COMMIT.
    pub fn resent_bytes(&self) -> u64 {
        self.pool.resent.load(Ordering::Relaxed)
    }

    /// One RPC, blocking, under the deadline.
    fn run<R, F, Fut>(&self, op: &'static str, idempotent: bool, f: F) -> BResult<R>
    where
        F: FnMut(conn::Conn) -> Fut,
        Fut: std::future::Future<Output = (conn::Conn, Result<R, nfs3_client::RpcError>)>,
    {
        self.pool.block_on(op, self.pool.call(op, idempotent, f))
    }

    /// One RPC whose NFS status, if not OK, is the error.
    fn ask<T, E, F, Fut>(&self, op: &'static str, idempotent: bool, f: F) -> BResult<T>
    where
        F: FnMut(conn::Conn) -> Fut,
        Fut: std::future::Future<
                Output = (conn::Conn, Result<Nfs3Result<T, E>, nfs3_client::RpcError>),
            >,
    {
        self.run(op, idempotent, f).and_then(|r| ok(op, r))
    }

    /// Runs `op` with the node's handle; if the handle went stale, finds
    /// the node again by its path and tries once more.
    fn on<T>(&self, node: &NfsNode, mut op: impl FnMut(nfs_fh3) -> BResult<T>) -> BResult<T> {
        match op(node.fh()) {
            Err(e) if e.raw_errno() == libc::ESTALE && self.refind(node) => op(node.fh()),
            r => r,
        }
    }

    /// After NFS3ERR_STALE: finds the node again, true if its handle was
    /// renewed. Only a server that renewed every handle (a re-export:
    /// the root's changed too) is trusted to have kept the same object at
    /// the same path; a stale handle under an unchanged root means the
    /// object is gone (its inode number may already be another file's).
    fn refind(&self, node: &NfsNode) -> bool {
        if node.ino == self.root.ino {
            return self.refind_root();
        }
        let now = self.root_gen.load(Ordering::Relaxed);
        if node.root_gen.load(Ordering::Relaxed) == now && !self.refind_root() {
            return false;
        }
        match self.walk(&node.path) {
            Ok((fh, a)) if a.ino == node.ino => {
                log::info!("NFS: handle of {:?} went stale; found again", node.path);
                *node.fh.write().unwrap_or_else(|e| e.into_inner()) = fh;
                node.root_gen
                    .store(self.root_gen.load(Ordering::Relaxed), Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    /// The handle and attributes `path` leads to from the source's root.
    fn walk(&self, path: &[OsString]) -> BResult<(nfs_fh3, Attr)> {
        let mut fh = self.root.fh();
        let mut attr = self.getattr_fh(&fh)?;
        for c in path {
            (fh, attr) = self.lookup_fh(&fh, c)?;
        }
        Ok((fh, attr))
    }

    fn refind_root(&self) -> bool {
        let Some(m) = self.pool.mounted() else {
            return false;
        };
        let found = self
            .pool
            .block_on("mount", self.pool.remount())
            .and_then(|mut fh| {
                for c in &m.rest {
                    fh = self.lookup_fh(&fh, OsStr::new(c))?.0;
                }
                let a = self.getattr_fh(&fh)?;
                Ok((fh, a))
            });
        match found {
            Ok((fh, a)) if a.ino == self.root.ino && fh != self.root.fh() => {
                log::info!("NFS: the root handle went stale; found again");
                *self.root.fh.write().unwrap_or_else(|e| e.into_inner()) = fh;
                self.root_gen.fetch_add(1, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    fn make_node(&self, dir: &NfsNode, name: &OsStr, fh: nfs_fh3, a: &Attr) -> Arc<NfsNode> {
        let mut path = dir.path.clone();
        path.push(name.to_os_string());
        Arc::new(NfsNode {
            fh: RwLock::new(fh),
            ino: a.ino,
            path,
            perm: AtomicU32::new(a.perm as u32),
            root_gen: AtomicU64::new(self.root_gen.load(Ordering::Relaxed)),
        })
    }

    fn getattr_fh(&self, fh: &nfs_fh3) -> BResult<Attr> {
        let r = self.run(
            "getattr",
            true,
            rpc!(getattr, GETATTR3args { object: fh.clone() }),
        )?;
        Ok(attr_of(&ok("getattr", r)?.obj_attributes))
    }

    fn lookup_fh(&self, dir: &nfs_fh3, name: &OsStr) -> BResult<(nfs_fh3, Attr)> {
        let r = self.run(
            "lookup",
            true,
            rpc!(
                lookup,
                LOOKUP3args {
                    what: dirop(dir, name),
                }
            ),
        )?;
        let ok = ok("lookup", r)?;
        let attr = match ok.obj_attributes {
            Nfs3Option::Some(a) => attr_of(&a),
            Nfs3Option::None => self.getattr_fh(&ok.object)?,
        };
        Ok((ok.object, attr))
    }

    /// The object a create-like call made: its handle and attributes from
    /// the reply, or from a LOOKUP when the server left them out.
    fn made(
        &self,
        dir: &NfsNode,
        name: &OsStr,
        fh: nfs3::post_op_fh3,
        attr: nfs3::post_op_attr,
    ) -> BResult<(Arc<NfsNode>, Attr)> {
        let (fh, a) = match (fh, attr) {
            (Nfs3Option::Some(fh), Nfs3Option::Some(a)) => (fh, attr_of(&a)),
            (Nfs3Option::Some(fh), Nfs3Option::None) => {
                let a = self.getattr_fh(&fh)?;
                (fh, a)
            }
            _ => self.lookup_fh(&dir.fh(), name)?,
        };
        Ok((self.make_node(dir, name, fh, &a), a))
    }

    /// The attributes a new object gets: its mode, and, when nassync runs
    /// as root (the server trusts it with any owner), the caller as owner
    /// (the group stays the directory's in a setgid directory).
    fn new_attrs(&self, dir: &NfsNode, mode: Option<u32>, creds: Creds) -> sattr3 {
        let setgid = dir.perm.load(Ordering::Relaxed) & libc::S_ISGID != 0;
        sattr3 {
            mode: mode.map_or(Nfs3Option::None, |m| Nfs3Option::Some(m & 0o7777)),
            uid: if self.is_root {
                Nfs3Option::Some(creds.uid)
            } else {
                Nfs3Option::None
            },
            gid: if self.is_root && !setgid {
                Nfs3Option::Some(creds.gid)
            } else {
                Nfs3Option::None
            },
            ..Default::default()
        }
    }

    fn forget_listings(&self) {
        self.listings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn do_setattr(&self, node: &NfsNode, s: sattr3) -> BResult<Attr> {
        self.forget_listings();
        let r = self.on(node, |fh| {
            self.ask(
                "setattr",
                true,
                rpc!(
                    setattr,
                    SETATTR3args {
                        object: fh.clone(),
                        new_attributes: s.clone(),
                        guard: Nfs3Option::None,
                    }
                ),
            )
        })?;
        let a = match r.obj_wcc.after {
            Nfs3Option::Some(a) => attr_of(&a),
            Nfs3Option::None => self.getattr_fh(&node.fh())?,
        };
        node.perm.store(a.perm as u32, Ordering::Relaxed);
        Ok(a)
    }

    /// The whole listing, by READDIRPLUS, with handles and attributes.
    fn list_plus(&self, dir: &NfsNode, with_hidden: bool) -> BResult<Vec<PlusEntry>> {
        self.on(dir, |fh| {
            let mut out = Vec::new();
            let mut cookie = 0;
            let mut verf = nfs3::cookieverf3::default();
            let mut restarted = false;
            loop {
                let r = self.run(
                    "readdir",
                    true,
                    rpc!(
                        readdirplus,
                        READDIRPLUS3args {
                            dir: fh.clone(),
                            cookie,
                            cookieverf: verf,
                            dircount: 64 << 10,
                            maxcount: 512 << 10,
                        }
                    ),
                )?;
                let r = match r {
                    // The directory changed under a long listing: again.
                    Nfs3Result::Err((nfsstat3::NFS3ERR_BAD_COOKIE, _)) if !restarted => {
                        restarted = true;
                        out.clear();
                        cookie = 0;
                        verf = nfs3::cookieverf3::default();
                        continue;
                    }
                    r => ok("readdir", r)?,
                };
                verf = r.cookieverf;
                let n = r.reply.entries.0.len();
                for e in r.reply.entries.0 {
                    cookie = e.cookie;
                    let name = e.name.0.as_ref();
                    if name == b"."
                        || name == b".."
                        || (!with_hidden && name.starts_with(own_hidden_prefix()))
                    {
                        continue;
                    }
                    let plus = match (e.name_handle, e.name_attributes) {
                        (Nfs3Option::Some(h), Nfs3Option::Some(a)) if !h.data.is_empty() => {
                            Some((h, a))
                        }
                        _ => None,
                    };
                    out.push((OsString::from_vec(name.to_vec()), e.fileid, plus));
                }
                if r.reply.eof {
                    return Ok(out);
                }
                if n == 0 {
                    return Err(BackendError::coded(
                        "readdir",
                        libc::EIO,
                        "NFS server: empty READDIRPLUS reply before the end",
                    ));
                }
            }
        })
    }

    fn open_file(&self, node: &Arc<NfsNode>, append: bool) -> NfsFile {
        let unstable = {
            let mut open = self.open.lock();
            let o = open.entry(node.ino).or_default();
            o.count += 1;
            o.unstable.clone()
        };
        NfsFile {
            node: node.clone(),
            append,
            unstable,
            pool: self.pool.clone(),
            open: self.open.clone(),
        }
    }

    /// Makes every write of `node` durable (before a truncation, which
    /// an old write sent again must not undo).
    fn commit_node(&self, node: &NfsNode) -> BResult<()> {
        let u = self.open.lock().get(&node.ino).map(|o| o.unstable.clone());
        match u {
            Some(u) => self.commit(node, &u),
            None => Ok(()),
        }
    }

    fn commit(&self, node: &NfsNode, u: &AsyncMutex<Unstable>) -> BResult<()> {
        // Held across the COMMIT: a second fsync waits for this one
        // instead of finding nothing to do before the data is durable.
        let mut u = u.blocking_lock();
        if u.writes.is_empty() {
            return Ok(());
        }
        // On failure the writes stay, for the next fsync.
        self.pool
            .block_on("commit", commit_all(&self.pool, node, &mut u))
    }

    /// Before `name` in `dir` goes away (unlink, or rename over it): if
    /// it is the last name of a file open here, hides it under a new name
    /// instead (nothing else to do for an unlink). The file is held open
    /// until the caller passes the hold to [`Self::let_go`].
    fn hide_if_open(&self, dir: &NfsNode, name: &OsStr) -> BResult<Option<Hidden>> {
        if self.open.lock().is_empty() {
            return Ok(None);
        }
        let (fh, a) = match self.lookup_fh(&dir.fh(), name) {
            Ok(v) => v,
            Err(e) if e.raw_errno() == libc::ENOENT => return Ok(None),
            Err(e) => return Err(e),
        };
        if a.kind != FileKind::File || a.nlink > 1 {
            return Ok(None);
        }
        match self.open.lock().get_mut(&a.ino) {
            Some(o) => o.count += 1, // the hold
            None => return Ok(None),
        }
        let held = self.make_node(dir, name, fh, &a);
        let mut name_hidden = OsString::from_vec(own_hidden_prefix().to_vec());
        name_hidden.push(format!("{:016x}-{:08x}", a.ino, fastrand::u32(..)));
        if let Err(e) = self.rename_raw(dir, name, &dir.fh(), &name_hidden) {
            release(&self.pool, &self.open, &held);
            return Err(e);
        }
        if let Some(o) = self.open.lock().get_mut(&a.ino) {
            o.hidden = Some((dir.fh(), name_hidden.clone()));
        }
        Ok(Some(Hidden {
            name: name_hidden,
            held,
        }))
    }

    /// Ends the hold of [`Self::hide_if_open`] (at the last close, the
    /// hidden file goes).
    fn let_go(&self, h: Hidden) {
        release(&self.pool, &self.open, &h.held);
    }

    /// Undoes [`Self::hide_if_open`] after the rename it made way for
    /// failed, when the failure is certain (the server said no) and the
    /// name is still free.
    fn unhide(&self, dir: &NfsNode, name: &OsStr, h: &Hidden, why: &BackendError) {
        let uncertain = matches!(
            why.raw_errno(),
            libc::ETIMEDOUT
                | libc::ECONNRESET
                | libc::ECONNREFUSED
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
        );
        let free = !uncertain
            && matches!(self.lookup_fh(&dir.fh(), name), Err(e) if e.raw_errno() == libc::ENOENT);
        if free && self.rename_raw(dir, &h.name, &dir.fh(), name).is_ok() {
            if let Some(o) = self.open.lock().get_mut(&h.held.ino) {
                o.hidden = None;
            }
        } else {
            log::warn!(
                "NFS: {name:?} stays hidden as {:?} after a failed rename over it ({why})",
                h.name
            );
        }
    }

    /// Removes the hidden unlinked files this daemon left in `dir`/`name`
    /// (a remove at close that failed, or a close still on its way); true
    /// if that leaves the directory empty. Others' are left alone: they
    /// may still be open elsewhere.
    fn sweep_hidden(&self, dir: &Arc<NfsNode>, name: &OsStr) -> bool {
        let Ok((sub, _)) = self.lookup(dir, name) else {
            return false;
        };
        let Ok(list) = self.list_plus(&sub, true) else {
            return false;
        };
        if list
            .iter()
            .any(|(n, _, _)| !n.as_bytes().starts_with(own_hidden_prefix()))
        {
            return false;
        }
        // The kernel sends FUSE's release after close(2) has returned: an
        // rmdir right after closing the last open file of an unlinked one
        // can come first. Such a release is waited for, briefly; a file
        // still held open keeps the directory from being removed.
        let inos: Vec<u64> = list.iter().map(|(_, ino, _)| *ino).collect();
        let deadline = std::time::Instant::now() + RELEASE_WAIT;
        let mut map = self.open.lock();
        while inos.iter().any(|i| map.contains_key(i)) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            map = (self.open.released.wait_timeout(map, left))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(map);
        list.iter().all(|(n, _, _)| match self.unlink_raw(&sub, n) {
            Ok(()) => true,
            // Its release removed it meanwhile.
            Err(e) => e.raw_errno() == libc::ENOENT,
        })
    }

    fn unlink_raw(&self, dir: &NfsNode, name: &OsStr) -> BResult<()> {
        self.on(dir, |fh| {
            self.ask(
                "unlink",
                false,
                rpc!(
                    remove,
                    REMOVE3args {
                        object: dirop(&fh, name),
                    }
                ),
            )
        })?;
        Ok(())
    }

    fn rename_raw(
        &self,
        dir: &NfsNode,
        name: &OsStr,
        to: &nfs_fh3,
        newname: &OsStr,
    ) -> BResult<()> {
        self.on(dir, |fh| {
            self.ask(
                "rename",
                false,
                rpc!(
                    rename,
                    RENAME3args {
                        from: dirop(&fh, name),
                        to: dirop(to, newname),
                    }
                ),
            )
        })?;
        Ok(())
    }
}

impl Backend for NfsBackend {
    type Node = Arc<NfsNode>;
    type File = NfsFile;

    fn root(&self) -> BResult<(Self::Node, Attr)> {
        let a = self.getattr(&self.root)?;
        Ok((self.root.clone(), a))
    }

    fn lookup(&self, dir: &Self::Node, name: &OsStr) -> BResult<(Self::Node, Attr)> {
        if name.len() > self.namelen as usize {
            return Err(BackendError::errno("lookup", libc::ENAMETOOLONG));
        }
        let (fh, a) = self.on(dir, |fh| self.lookup_fh(&fh, name))?;
        Ok((self.make_node(dir, name, fh, &a), a))
    }

    fn lookup_many(
        &self,
        dir: &Self::Node,
        names: &[OsString],
    ) -> Vec<BResult<(Self::Node, Attr)>> {
        // Answered from the READDIRPLUS that the listing just made.
        let mut known: HashMap<OsString, (nfs_fh3, fattr3)> = HashMap::new();
        {
            let l = self.listings.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(l) = l.get(&dir.ino).filter(|l| l.at.elapsed() < LISTING_FRESH) {
                for n in names {
                    if let Some(v) = l.entries.get(n) {
                        known.insert(n.clone(), v.clone());
                    }
                }
            }
        }
        names
            .iter()
            .map(|n| match known.remove(n) {
                Some((fh, a)) => {
                    let a = attr_of(&a);
                    Ok((self.make_node(dir, n, fh, &a), a))
                }
                None => self.lookup(dir, n),
            })
            .collect()
    }

    fn getattr(&self, node: &Self::Node) -> BResult<Attr> {
        let mut a = self.on(node, |fh| self.getattr_fh(&fh))?;
        node.perm.store(a.perm as u32, Ordering::Relaxed);
        if a.kind == FileKind::File
            && self
                .open
                .lock()
                .get(&a.ino)
                .is_some_and(|o| o.hidden.is_some())
        {
            // Unlinked: its hidden name does not count.
            a.nlink = a.nlink.saturating_sub(1);
        }
        Ok(a)
    }

    fn setattr(
        &self,
        node: &Self::Node,
        file: Option<&Self::File>,
        changes: &SetAttr,
    ) -> BResult<Attr> {
        if changes.size.is_some() {
            // No write of before the truncation may be sent again after it.
            match file {
                Some(f) => self.commit(&f.node, &f.unstable)?,
                None => self.commit_node(node)?,
            }
        }
        let t = |t: Option<SetTime>| match t {
            None => (false, None),
            Some(SetTime::Now) => (true, None),
            Some(SetTime::At(t)) => (true, Some(nfstime(t))),
        };
        let s = sattr3 {
            mode: changes
                .mode
                .map_or(Nfs3Option::None, |m| Nfs3Option::Some(m & 0o7777)),
            uid: changes.uid.map_or(Nfs3Option::None, Nfs3Option::Some),
            gid: changes.gid.map_or(Nfs3Option::None, Nfs3Option::Some),
            size: changes.size.map_or(Nfs3Option::None, Nfs3Option::Some),
            atime: match t(changes.atime) {
                (false, _) => set_atime::DONT_CHANGE,
                (true, None) => set_atime::SET_TO_SERVER_TIME,
                (true, Some(t)) => set_atime::SET_TO_CLIENT_TIME(t),
            },
            mtime: match t(changes.mtime) {
                (false, _) => set_mtime::DONT_CHANGE,
                (true, None) => set_mtime::SET_TO_SERVER_TIME,
                (true, Some(t)) => set_mtime::SET_TO_CLIENT_TIME(t),
            },
        };
        self.do_setattr(node, s)
    }

    fn readlink(&self, node: &Self::Node) -> BResult<OsString> {
        let r = self.on(node, |fh| {
            self.ask(
                "readlink",
                true,
                rpc!(
                    readlink,
                    READLINK3args {
                        symlink: fh.clone(),
                    }
                ),
            )
        })?;
        Ok(OsString::from_vec(r.data.0.to_vec()))
    }

    fn readdir(&self, dir: &Self::Node) -> BResult<Vec<DirEntry>> {
        let list = self.list_plus(dir, false)?;
        let mut entries = HashMap::with_capacity(list.len());
        let mut out = Vec::with_capacity(list.len());
        for (name, fileid, plus) in list {
            let kind = match &plus {
                Some((_, a)) => kind_of(a.type_),
                // A server that left the attributes out: ask for them.
                None => match self.lookup(dir, &name) {
                    Ok((_, a)) => a.kind,
                    // Gone since the listing: not listed.
                    Err(e) if e.raw_errno() == libc::ENOENT => continue,
                    Err(e) => return Err(e),
                },
            };
            if let Some(p) = plus {
                entries.insert(name.clone(), p);
            }
            out.push(DirEntry {
                name,
                ino: fileid,
                kind,
            });
        }
        let mut l = self.listings.lock().unwrap_or_else(|e| e.into_inner());
        l.retain(|_, v| v.at.elapsed() < LISTING_FRESH);
        if l.len() < 16 {
            l.insert(
                dir.ino,
                Listing {
                    at: Instant::now(),
                    entries,
                },
            );
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
        if mode & libc::S_IFMT == libc::S_IFREG {
            let open = OpenMode {
                read: false,
                write: false,
                append: false,
                truncate: false,
            };
            let (n, a, _) = self.create(dir, name, mode, open, true, creds)?;
            return Ok((n, a));
        }
        self.forget_listings();
        let attrs = self.new_attrs(dir, Some(mode), creds);
        let fmt = mode & libc::S_IFMT;
        if ![libc::S_IFCHR, libc::S_IFBLK, libc::S_IFSOCK, libc::S_IFIFO].contains(&fmt) {
            return Err(BackendError::errno("mknod", libc::EINVAL));
        }
        let what = || {
            let dev = devicedata3 {
                dev_attributes: attrs.clone(),
                spec: specdata3 {
                    specdata1: libc::major(rdev),
                    specdata2: libc::minor(rdev),
                },
            };
            match fmt {
                libc::S_IFCHR => mknoddata3::NF3CHR(dev),
                libc::S_IFBLK => mknoddata3::NF3BLK(dev),
                libc::S_IFSOCK => mknoddata3::NF3SOCK(attrs.clone()),
                _ => mknoddata3::NF3FIFO(attrs.clone()),
            }
        };
        let r = self.on(dir, |fh| {
            self.ask(
                "mknod",
                false,
                rpc!(
                    mknod,
                    MKNOD3args {
                        where_: dirop(&fh, name),
                        what: what(),
                    }
                ),
            )
        })?;
        self.made(dir, name, r.obj, r.obj_attributes)
    }

    fn mkdir(
        &self,
        dir: &Self::Node,
        name: &OsStr,
        mode: u32,
        creds: Creds,
    ) -> BResult<(Self::Node, Attr)> {
        self.forget_listings();
        let attrs = self.new_attrs(dir, Some(mode), creds);
        let r = self.on(dir, |fh| {
            self.ask(
                "mkdir",
                false,
                rpc!(
                    mkdir,
                    MKDIR3args {
                        where_: dirop(&fh, name),
                        attributes: attrs.clone(),
                    }
                ),
            )
        })?;
        self.made(dir, name, r.obj, r.obj_attributes)
    }

    fn symlink(
        &self,
        dir: &Self::Node,
        name: &OsStr,
        target: &OsStr,
        creds: Creds,
    ) -> BResult<(Self::Node, Attr)> {
        self.forget_listings();
        let attrs = self.new_attrs(dir, Some(0o777), creds);
        let r = self.on(dir, |fh| {
            self.ask(
                "symlink",
                false,
                rpc!(
                    symlink,
                    SYMLINK3args {
                        where_: dirop(&fh, name),
                        symlink: symlinkdata3 {
                            symlink_attributes: attrs.clone(),
                            symlink_data: nfspath3(Opaque::borrowed(target.as_bytes())),
                        },
                    }
                ),
            )
        })?;
        self.made(dir, name, r.obj, r.obj_attributes)
    }

    fn link(&self, node: &Self::Node, dir: &Self::Node, name: &OsStr) -> BResult<Attr> {
        self.forget_listings();
        let file = node.fh();
        let r = self.on(dir, |fh| {
            self.ask(
                "link",
                false,
                rpc!(
                    link,
                    LINK3args {
                        file: file.clone(),
                        link: dirop(&fh, name),
                    }
                ),
            )
        })?;
        match r.file_attributes {
            Nfs3Option::Some(a) => Ok(attr_of(&a)),
            Nfs3Option::None => self.getattr(node),
        }
    }

    fn unlink(&self, dir: &Self::Node, name: &OsStr) -> BResult<()> {
        self.forget_listings();
        if let Some(h) = self.hide_if_open(dir, name)? {
            self.let_go(h);
            return Ok(());
        }
        self.unlink_raw(dir, name)
    }

    fn rmdir(&self, dir: &Self::Node, name: &OsStr) -> BResult<()> {
        self.forget_listings();
        let rmdir = || {
            self.on(dir, |fh| {
                self.ask(
                    "rmdir",
                    false,
                    rpc!(
                        rmdir,
                        RMDIR3args {
                            object: dirop(&fh, name),
                        }
                    ),
                )
            })
        };
        match rmdir() {
            Err(e) if e.raw_errno() == libc::ENOTEMPTY && self.sweep_hidden(dir, name) => rmdir()?,
            r => r?,
        };
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
        if flags.exchange {
            // NFSv3 has no atomic exchange (Linux's NFS client says so too).
            return Err(BackendError::errno("rename", libc::EINVAL));
        }
        if flags.noreplace {
            // Checked, not atomic: NFSv3 has no such flag.
            match self.lookup_fh(&newdir.fh(), newname) {
                Ok(_) => return Err(BackendError::errno("rename", libc::EEXIST)),
                Err(e) if e.raw_errno() == libc::ENOENT => {}
                Err(e) => return Err(e),
            }
        }
        self.forget_listings();
        // A file open here that the rename replaces must live on.
        let hidden = self.hide_if_open(newdir, newname)?;
        let r = self.rename_raw(dir, name, &newdir.fh(), newname);
        if let Some(h) = hidden {
            if let Err(e) = &r {
                // Nothing replaced it: it gets its name back.
                self.unhide(newdir, newname, &h, e);
            }
            self.let_go(h);
        }
        r
    }

    fn open(&self, node: &Self::Node, mode: OpenMode) -> BResult<Self::File> {
        // NFSv3 has no open: the handle is all. A truncating open
        // truncates now.
        if mode.truncate && mode.write {
            self.commit_node(node)?;
            self.do_setattr(
                node,
                sattr3 {
                    size: Nfs3Option::Some(0),
                    ..Default::default()
                },
            )?;
        }
        Ok(self.open_file(node, mode.append))
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
        self.forget_listings();
        let attrs = self.new_attrs(dir, Some(mode), creds);
        let (node, attr) = if exclusive {
            // EXCLUSIVE with a verifier: a create retried after a lost
            // reply finds its own file instead of failing with EEXIST.
            // The server keeps the verifier in the times; the mode and
            // owner are set afterwards.
            let verf = createverf3(fastrand::u64(..).to_ne_bytes());
            let r = self.on(dir, |fh| {
                self.ask(
                    "create",
                    true,
                    rpc!(
                        create,
                        CREATE3args {
                            where_: dirop(&fh, name),
                            how: createhow3::EXCLUSIVE(verf),
                        }
                    ),
                )
            })?;
            let (node, _) = self.made(dir, name, r.obj, r.obj_attributes)?;
            let now = nfstime(SystemTime::now());
            let mut s = attrs;
            s.atime = set_atime::SET_TO_CLIENT_TIME(now);
            s.mtime = set_mtime::SET_TO_CLIENT_TIME(now);
            let a = match self.do_setattr(&node, s.clone()) {
                // A root-squashed export: the owner is the server's choice.
                Err(e) if e.raw_errno() == libc::EPERM && s.uid.is_some() => {
                    s.uid = Nfs3Option::None;
                    s.gid = Nfs3Option::None;
                    self.do_setattr(&node, s)
                }
                r => r,
            };
            let a = match a {
                Ok(a) => a,
                Err(e) => {
                    // Not left half made (verifier for times, no mode).
                    let _ = self.unlink_raw(dir, name);
                    return Err(e);
                }
            };
            (node, a)
        } else {
            let mut s = attrs;
            if open.truncate {
                s.size = Nfs3Option::Some(0);
            }
            let r = self.on(dir, |fh| {
                self.ask(
                    "create",
                    true,
                    rpc!(
                        create,
                        CREATE3args {
                            where_: dirop(&fh, name),
                            how: createhow3::UNCHECKED(s.clone()),
                        }
                    ),
                )
            })?;
            self.made(dir, name, r.obj, r.obj_attributes)?
        };
        if attr.kind != FileKind::File {
            return Err(BackendError::errno("create", libc::EISDIR));
        }
        let f = self.open_file(&node, open.append);
        Ok((node, attr, f))
    }

    fn read(&self, file: &Self::File, offset: u64, buf: &mut [u8]) -> BResult<usize> {
        let node = &file.node;
        let mut done = 0;
        while done < buf.len() {
            let want = (buf.len() - done).min(self.rtmax as usize);
            let off = offset + done as u64;
            let r = self.on(node, |fh| {
                self.ask(
                    "read",
                    true,
                    rpc!(
                        read,
                        READ3args {
                            file: fh.clone(),
                            offset: off,
                            count: want as u32,
                        }
                    ),
                )
            })?;
            let data = r.data.as_ref();
            let n = data.len().min(want);
            buf[done..done + n].copy_from_slice(&data[..n]);
            done += n;
            if r.eof || n == 0 {
                break;
            }
        }
        Ok(done)
    }

    fn write(&self, file: &Self::File, offset: u64, data: &[u8]) -> BResult<usize> {
        self.forget_listings();
        let offset = if file.append {
            // Not atomic: NFSv3 has no append (nor has its kernel client).
            self.getattr(&file.node)?.size
        } else {
            offset
        };
        let pool = &self.pool;
        let node = &file.node;
        for (i, chunk) in data.chunks(self.wtmax as usize).enumerate() {
            let off = offset + (i * self.wtmax as usize) as u64;
            let v = pool.block_on(
                "write",
                write_chunk(pool, node, off, chunk, stable_how::UNSTABLE),
            );
            let v = match v {
                Err(e) if e.raw_errno() == libc::ESTALE && self.refind(node) => pool.block_on(
                    "write",
                    write_chunk(pool, node, off, chunk, stable_how::UNSTABLE),
                )?,
                r => r?,
            };
            let mut u = file.unstable.blocking_lock();
            if v.is_none() && u.writes.is_empty() {
                continue; // durable, and nothing before it to resend
            }
            u.writes.push((off, chunk.to_vec(), v));
            u.bytes += chunk.len() as u64;
            let full = u.bytes >= MAX_UNCOMMITTED;
            drop(u);
            if full {
                self.commit(node, &file.unstable)?;
            }
        }
        Ok(data.len())
    }

    fn fsync(&self, file: &Self::File, _datasync: bool) -> BResult<()> {
        self.commit(&file.node, &file.unstable)
    }

    fn fallocate(&self, _file: &Self::File, _mode: i32, _offset: u64, _len: u64) -> BResult<()> {
        Err(BackendError::errno("fallocate", libc::EOPNOTSUPP))
    }

    fn fgetattr(&self, file: &Self::File) -> BResult<Attr> {
        self.getattr(&file.node)
    }

    fn fsyncdir(&self, _dir: &Self::Node) -> BResult<()> {
        // Directory operations are synchronous on an NFSv3 server.
        Ok(())
    }

    fn statfs(&self, node: &Self::Node) -> BResult<StatFs> {
        let r = self.on(node, |fh| {
            self.ask(
                "statfs",
                true,
                rpc!(fsstat, FSSTAT3args { fsroot: fh.clone() }),
            )
        })?;
        let bsize = 4096u64;
        Ok(StatFs {
            blocks: r.tbytes / bsize,
            bfree: r.fbytes / bsize,
            bavail: r.abytes / bsize,
            files: r.tfiles,
            ffree: r.ffiles,
            bsize: bsize as u32,
            namelen: self.namelen,
            frsize: bsize as u32,
        })
    }

    // NFSv3 has no extended attributes (Linux's client has none either).
    fn keeps_xattrs(&self) -> bool {
        false
    }

    fn getxattr(&self, _node: &Self::Node, _name: &OsStr) -> BResult<Vec<u8>> {
        // None is there (the kernel asks for ACLs at every access check,
        // and must hear "no ACL", not an error).
        Err(BackendError::errno("getxattr", libc::ENODATA))
    }

    fn listxattr(&self, _node: &Self::Node) -> BResult<Vec<u8>> {
        Ok(Vec::new())
    }

    fn setxattr(
        &self,
        _node: &Self::Node,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
    ) -> BResult<()> {
        Err(BackendError::errno("setxattr", libc::EOPNOTSUPP))
    }

    fn removexattr(&self, _node: &Self::Node, _name: &OsStr) -> BResult<()> {
        Err(BackendError::errno("removexattr", libc::EOPNOTSUPP))
    }

    /// Only a directory with itself: NFSv3 file ids do not say which
    /// filesystem of the server an object is on (its snapshots share
    /// them), and the fsid is not kept with the nodes.
    fn same_fs(&self, a: &Self::Node, b: &Self::Node) -> bool {
        a.ino == b.ino
    }

    fn max_file_size(&self) -> u64 {
        self.maxfilesize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nfs_errors_keep_their_meaning() {
        assert_eq!(nfsstat_errno(nfsstat3::NFS3ERR_NOENT), libc::ENOENT);
        assert_eq!(nfsstat_errno(nfsstat3::NFS3ERR_NOTEMPTY), libc::ENOTEMPTY);
        assert_eq!(nfsstat_errno(nfsstat3::NFS3ERR_XDEV), libc::EXDEV);
        assert_eq!(nfsstat_errno(nfsstat3::NFS3ERR_NOSPC), libc::ENOSPC);
        assert_eq!(nfsstat_errno(nfsstat3::NFS3ERR_DQUOT), libc::EDQUOT);
        assert_eq!(nfsstat_errno(nfsstat3::NFS3ERR_STALE), libc::ESTALE);
        assert_eq!(nfsstat_errno(nfsstat3::NFS3ERR_NOTSUPP), libc::EOPNOTSUPP);
        assert_eq!(nfsstat_errno(nfsstat3::NFS3ERR_SERVERFAULT), libc::EIO);
        let e = status_err("lookup", nfsstat3::NFS3ERR_NOENT);
        assert_eq!(e.raw_errno(), libc::ENOENT);
        assert!(e.to_string().contains("NFS3ERR_NOENT"), "{e}");
    }
}
