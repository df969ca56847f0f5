//! The control socket: how `nassync stats`, `status` and `flush`
//! talk to a running daemon, so that nothing extra appears inside the mount.
//!
//! One unix stream socket per mount, named after a hash of the canonical
//! mount point under the runtime directory (/run/nassync for root,
//! $XDG_RUNTIME_DIR/nassync otherwise). A client sends one command line and
//! reads the reply until the daemon closes the connection. Every reply
//! starts with `mountpoint PATH`, so a client can tell a hash collision.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The runtime directory for control sockets.
pub fn runtime_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/run/nassync");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("nassync"),
        _ => std::env::temp_dir().join(format!("nassync-{}", nix::unistd::geteuid())),
    }
}

/// FNV-1a: stable across versions and platforms, which std's hasher is not.
pub fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

/// The control socket of the mount at `mountpoint` (canonical path).
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    runtime_dir().join(format!(
        "{:016x}.sock",
        fnv64(mountpoint.as_os_str().as_bytes())
    ))
}

/// Answers one command, writing the reply (which may stream progress
/// lines) to the connection.
pub type Handler = Arc<dyn Fn(&str, &mut dyn Write) + Send + Sync>;

/// A listening control socket; removed when dropped.
pub struct Server {
    path: PathBuf,
}

impl Server {
    /// Listens at `path` and answers each command with `handler` on a
    /// thread of its own.
    pub fn start(path: &Path, mountpoint: &Path, handler: Handler) -> std::io::Result<Server> {
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)?;
        }
        // A socket left by a daemon that was killed: nobody answers on it.
        if path.exists() && UnixStream::connect(path).is_err() {
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path)?;
        // Stats are not secret; writes to the socket are not possible
        // beyond the read-only commands.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
        let mp = mountpoint.to_path_buf();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(mut conn) = conn else { continue };
                    let handler = handler.clone();
                    let mp = mp.clone();
                    let _ = std::thread::Builder::new()
                        .name("control-conn".into())
                        .spawn(move || {
                            let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                            let mut line = String::new();
                            if BufReader::new(&conn).read_line(&mut line).is_err() {
                                return;
                            }
                            if writeln!(conn, "mountpoint {}", mp.display()).is_err() {
                                return;
                            }
                            handler(line.trim(), &mut conn);
                        });
                }
            })?;
        Ok(Server {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends `command` to the daemon of `mountpoint` and returns its reply
/// (without the `mountpoint` line).
pub fn request(mountpoint: &Path, command: &str) -> anyhow::Result<String> {
    let mut reply = String::new();
    request_lines(
        mountpoint,
        command,
        Some(Duration::from_secs(30)),
        &mut |l| {
            reply.push_str(l);
            reply.push('\n');
        },
    )?;
    Ok(reply)
}

/// Sends `command` and hands each line of the reply to `line` as it
/// arrives; `timeout` bounds the wait for each line.
pub fn request_lines(
    mountpoint: &Path,
    command: &str,
    timeout: Option<Duration>,
    line: &mut dyn FnMut(&str),
) -> anyhow::Result<()> {
    use anyhow::Context;
    let path = socket_path(mountpoint);
    let mut conn = UnixStream::connect(&path).with_context(|| {
        format!(
            "no nassync daemon answers for {} (socket {})",
            mountpoint.display(),
            path.display()
        )
    })?;
    conn.set_read_timeout(timeout)?;
    writeln!(conn, "{command}")?;
    let mut reader = BufReader::new(conn);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    if first.trim_end_matches('\n') != format!("mountpoint {}", mountpoint.display()) {
        anyhow::bail!(
            "the daemon at {} serves another mount point",
            path.display()
        );
    }
    for l in reader.lines() {
        line(&l?);
    }
    Ok(())
}
