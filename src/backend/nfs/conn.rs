//! Connections to the NFS server: a small pool, a deadline on every call,
//! and a fresh connection (with a fresh MOUNT) whenever one breaks.
//!
//! nfs3_client has one outstanding call per connection, no deadline (a
//! hung server blocks a call forever) and a reader that takes a closed
//! connection (a read of 0 bytes) for "no data yet" and spins. Here every
//! call runs under `timeo` and is dropped with its connection when the
//! time is up, and end of stream is an error ([`Io`]).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use nfs3_client::io::{AsyncRead, AsyncWrite};
use nfs3_client::nfs3_types::mount::mountstat3;
use nfs3_client::nfs3_types::nfs3::nfs_fh3;
use nfs3_client::nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::{ConnectError, MountError, Nfs3Client, Nfs3ConnectionBuilder, RpcError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::source::NfsSource;
use crate::backend::{BResult, BackendError};

/// A TCP stream whose end is an error, not an endless run of empty reads.
pub struct Io(TcpStream);

impl AsyncRead for Io {
    async fn async_read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf).await?;
        if n == 0 && !buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "the NFS server closed the connection",
            ));
        }
        Ok(n)
    }
}

impl AsyncWrite for Io {
    async fn async_write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf).await
    }
}

struct Connector;

impl nfs3_client::net::Connector for Connector {
    type Connection = Io;

    async fn connect(&self, addr: SocketAddr) -> std::io::Result<Io> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Io(s))
    }

    async fn connect_with_port(&self, addr: SocketAddr, local_port: u16) -> std::io::Result<Io> {
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        let any: IpAddr = if addr.is_ipv4() {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        };
        sock.bind(SocketAddr::new(any, local_port))?;
        let s = sock.connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Io(s))
    }
}

pub type Conn = Nfs3Client<Io>;

/// How to reach the server.
#[derive(Clone, Debug)]
pub struct ConnConfig {
    pub source: NfsSource,
    pub timeo: Duration,
    /// Connections kept (one call in flight on each).
    pub nconnect: usize,
    /// Connect from a port below 1024 (needs root; most NAS exports ask
    /// for it).
    pub resvport: bool,
    pub uid: u32,
    pub gid: u32,
}

/// The export that MOUNT accepted and the rest of the source's path below
/// it (looked up from the export's root).
#[derive(Clone, Debug)]
pub struct Mounted {
    pub export: String,
    pub rest: Vec<String>,
    pub root: nfs_fh3,
}

/// A connection idle this long is not trusted: servers close idle ones
/// (Linux's after 6 minutes), and a call on a dead one is a failure.
const MAX_IDLE: Duration = Duration::from_secs(30);

/// The runtime of every NFS connection of the process. Never dropped: a
/// runtime may not be dropped from its own threads, where the last
/// reference to a pool could otherwise be (a background commit).
fn runtime() -> std::io::Result<&'static tokio::runtime::Runtime> {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    if let Some(rt) = RT.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("nassync-nfs")
        .enable_all()
        .build()?;
    Ok(RT.get_or_init(|| rt))
}

pub struct Pool {
    rt: &'static tokio::runtime::Runtime,
    cfg: ConnConfig,
    free: Mutex<Vec<(Conn, std::time::Instant)>>,
    permits: tokio::sync::Semaphore,
    mounted: Mutex<Option<Mounted>>,
    /// Bytes written again after the server lost them (a new verifier).
    pub resent: AtomicU64,
}

fn timed_out(op: &'static str) -> BackendError {
    BackendError::errno(op, libc::ETIMEDOUT)
}

/// An RPC-level failure: the errno the rest of nassync understands.
/// Transport failures are ones [`crate::backend::bounded`] takes for "the
/// NAS is gone".
pub fn rpc_error(op: &'static str, e: RpcError) -> BackendError {
    let errno = match &e {
        RpcError::Io(io) => transport_errno(io),
        RpcError::Auth(_) => libc::EACCES,
        _ => libc::EIO,
    };
    BackendError::coded(op, errno, format!("NFS: {e}"))
}

/// A failure of the connection itself, as one of the errnos that mean
/// "the NAS is gone" to the rest of nassync (never EPIPE and the like,
/// which an application would take for its own mistake).
fn transport_errno(io: &std::io::Error) -> i32 {
    use std::io::ErrorKind as K;
    match io.kind() {
        K::TimedOut => libc::ETIMEDOUT,
        K::ConnectionRefused => libc::ECONNREFUSED,
        K::HostUnreachable => libc::EHOSTUNREACH,
        K::NetworkUnreachable | K::NetworkDown => libc::ENETUNREACH,
        _ => libc::ECONNRESET,
    }
}

fn connect_error(e: ConnectError) -> BackendError {
    match e {
        ConnectError::Io(io) => {
            let errno = transport_errno(&io);
            BackendError::coded("connect", errno, format!("NFS connect: {io}"))
        }
        ConnectError::Portmap(p) => BackendError::coded(
            "portmap",
            libc::ECONNREFUSED,
            format!("NFS portmapper: {p}"),
        ),
        ConnectError::Mount(MountError::Rpc(r)) => rpc_error("mount", r),
        ConnectError::Mount(MountError::Denied(s)) => BackendError::coded(
            "mount",
            match s {
                mountstat3::MNT3ERR_NOENT => libc::ENOENT,
                mountstat3::MNT3ERR_ACCES | mountstat3::MNT3ERR_PERM => libc::EACCES,
                mountstat3::MNT3ERR_NOTDIR => libc::ENOTDIR,
                _ => libc::EIO,
            },
            format!("the NFS server refused the export: {s}"),
        ),
    }
}

impl Pool {
    pub fn new(cfg: ConnConfig) -> std::io::Result<Pool> {
        Ok(Pool {
            rt: runtime()?,
            permits: tokio::sync::Semaphore::new(cfg.nconnect.max(1)),
            cfg,
            free: Mutex::new(Vec::new()),
            mounted: Mutex::new(None),
            resent: AtomicU64::new(0),
        })
    }

    pub fn config(&self) -> &ConnConfig {
        &self.cfg
    }

    pub fn mounted(&self) -> Option<Mounted> {
        self.mounted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn credential(&self) -> opaque_auth<'static> {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "nassync".into());
        opaque_auth::auth_unix(&auth_unix {
            stamp: std::process::id(),
            machinename: Opaque::owned(host.into_bytes()),
            uid: self.cfg.uid,
            gid: self.cfg.gid,
            gids: vec![],
        })
    }

    async fn resolve(&self) -> BResult<IpAddr> {
        let host = &self.cfg.source.host;
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(ip);
        }
        let mut addrs = tokio::net::lookup_host((host.as_str(), 0))
            .await
            .map_err(|e| {
                BackendError::coded(
                    "resolve",
                    libc::EHOSTUNREACH,
                    format!("cannot resolve {host}: {e}"),
                )
            })?;
        addrs.next().map(|a| a.ip()).ok_or_else(|| {
            BackendError::coded(
                "resolve",
                libc::EHOSTUNREACH,
                format!("{host} has no address"),
            )
        })
    }

    /// A new connection, with a MOUNT first (a server that restarted may
    /// want one). The first time, finds the export: the longest prefix
    /// of the source path that the server accepts.
    async fn connect(&self) -> BResult<(Conn, nfs_fh3)> {
        let ip = self.resolve().await?;
        let known = self.mounted();
        let splits = match &known {
            Some(m) => vec![(m.export.clone(), m.rest.clone())],
            None => self.cfg.source.export_splits(),
        };
        let mut first_err = None;
        for (export, rest) in splits {
            let mut b = Nfs3ConnectionBuilder::new(Connector, ip.to_string(), &export)
                .connect_from_privileged_port(self.cfg.resvport)
                .credential(self.credential());
            if let Some(p) = self.cfg.source.nfs_port {
                b = b.nfs3_port(p);
            }
            if let Some(p) = self.cfg.source.mount_port {
                b = b.mount_port(p);
            }
            match b.mount().await {
                Ok(c) => {
                    let root = c.root_nfs_fh3();
                    if known.is_none() {
                        log::info!("NFS export {export} of {}", self.cfg.source.host);
                        *self.mounted.lock().unwrap_or_else(|e| e.into_inner()) = Some(Mounted {
                            export,
                            rest,
                            root: root.clone(),
                        });
                    }
                    return Ok((c.into_nfs3_client(), root));
                }
                Err(ConnectError::Mount(MountError::Denied(
                    s @ (mountstat3::MNT3ERR_NOENT | mountstat3::MNT3ERR_ACCES),
                ))) if known.is_none() => {
                    // Maybe a directory below an export: try a shorter one.
                    first_err
                        .get_or_insert(connect_error(ConnectError::Mount(MountError::Denied(s))));
                }
                Err(e) => return Err(connect_error(e)),
            }
        }
        Err(first_err.unwrap_or_else(|| BackendError::errno("mount", libc::ENOENT)))
    }

    fn take(&self) -> Option<(Conn, std::time::Instant)> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.retain(|(_, at)| at.elapsed() < MAX_IDLE);
        free.pop()
    }

    fn put(&self, c: Conn) {
        let now = std::time::Instant::now();
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((c, now));
    }

    /// Drops every idle connection: the next calls connect afresh.
    fn reset(&self) {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Runs `f` on the runtime under the deadline. For work that needs no
    /// connection of its own, or several calls in a row.
    pub fn block_on<T>(&self, op: &'static str, f: impl Future<Output = BResult<T>>) -> BResult<T> {
        match self
            .rt
            .block_on(async { tokio::time::timeout(self.cfg.timeo, f).await })
        {
            Ok(r) => r,
            Err(_) => Err(timed_out(op)),
        }
    }

    /// Starts `f` in the background (a commit when a file is dropped).
    pub fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        self.rt.spawn(f);
    }

    /// One RPC on a pooled connection, under the caller's deadline: `f`
    /// gets the connection and gives it back with the answer. An
    /// idempotent call that fails on a connection taken from the pool (it
    /// may have died while idle) is tried once more on a new one.
    pub async fn call<R, F, Fut>(&self, op: &'static str, idempotent: bool, mut f: F) -> BResult<R>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = (Conn, Result<R, RpcError>)>,
    {
        let _permit = self
            .permits
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let mut retried = false;
        loop {
            let taken = match self.take() {
                // A call that must not be repeated is not risked on a
                // connection that sat idle: a NULL call checks it first.
                Some((mut c, at)) if !idempotent && at.elapsed() > Duration::from_secs(1) => {
                    match c.null().await {
                        Ok(()) => Some(c),
                        Err(e) => {
                            log::info!("NFS: idle connection dropped: {e}");
                            self.reset();
                            None
                        }
                    }
                }
                Some((c, _)) => Some(c),
                None => None,
            };
            let (conn, fresh) = match taken {
                Some(c) => (c, false),
                None => (self.connect().await?.0, true),
            };
            let (conn, r) = f(conn).await;
            match r {
                Ok(v) => {
                    self.put(conn);
                    return Ok(v);
                }
                // An answer out of step with its call: the stream is
                // not to be trusted any more.
                Err(e) if e.is_connection_reusable() && !matches!(e, RpcError::UnexpectedXid) => {
                    self.put(conn);
                    return Err(rpc_error(op, e));
                }
                Err(e) => {
                    drop(conn);
                    log::info!("NFS {op}: connection dropped: {e}");
                    if !fresh {
                        // Its idle siblings are likely dead too (a
                        // restarted server): connect afresh.
                        self.reset();
                    }
                    if !fresh && idempotent && !retried {
                        retried = true;
                        continue;
                    }
                    return Err(rpc_error(op, e));
                }
            }
        }
    }

    /// MOUNTs the export again on a new connection (kept in the pool):
    /// the export's root handle as the server gives it now.
    pub async fn remount(&self) -> BResult<nfs_fh3> {
        let (c, root) = self.connect().await?;
        self.put(c);
        Ok(root)
    }

    /// Connects (and finds the export) once, under the deadline.
    pub fn first_connect(&self) -> BResult<Mounted> {
        self.block_on("mount", async {
            let (c, _) = self.connect().await?;
            self.put(c);
            Ok(())
        })?;
        Ok(self.mounted().expect("set by connect"))
    }
}
