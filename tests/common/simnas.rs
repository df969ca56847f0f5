//! simnas (bench/simnas) as the NAS under a test: a FUSE passthrough that
//! can be frozen (a hung NAS) or made to fail, over its control socket.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::NASSYNC;

pub fn simnas_bin() -> PathBuf {
    let p = Path::new(NASSYNC).parent().unwrap().join("simnas");
    assert!(
        p.exists(),
        "build the workspace first (cargo build --workspace): {p:?}"
    );
    p
}

/// A command to simnas's control socket, spoken in-process: a child
/// process would inherit (and, at exec, close) descriptors on the mount,
/// which needs a free daemon thread.
pub fn ctl(sock: &Path, cmd: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut conn = std::os::unix::net::UnixStream::connect(sock).unwrap();
    writeln!(conn, "{cmd}").unwrap();
    let mut reply = String::new();
    for line in BufReader::new(conn).lines() {
        let line = line.unwrap();
        let last = line == "end" || line == "ok" || line.starts_with("err");
        reply.push_str(&line);
        reply.push('\n');
        if last {
            break;
        }
    }
    assert!(!reply.starts_with("err"), "simnas ctl {cmd}: {reply}");
    reply
}

/// simnas at `nas` over `backing`, thawed and unmounted in Drop.
pub struct SimNas {
    pub backing: PathBuf,
    pub nas: PathBuf,
    pub sock: PathBuf,
}

impl SimNas {
    /// Starts simnas over `dir/backing` at `dir/simnas`.
    pub fn start(dir: &Path, args: &[&str]) -> SimNas {
        let s = SimNas {
            backing: dir.join("backing"),
            nas: dir.join("simnas"),
            sock: dir.join("simnas.sock"),
        };
        for d in [&s.backing, &s.nas] {
            std::fs::create_dir_all(d).unwrap();
        }
        let out = Command::new(simnas_bin())
            .arg(&s.backing)
            .arg(&s.nas)
            .arg("--control")
            .arg(&s.sock)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "simnas: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        s
    }

    pub fn ctl(&self, cmd: &str) -> String {
        ctl(&self.sock, cmd)
    }
}

impl Drop for SimNas {
    fn drop(&mut self) {
        if let Ok(mut c) = std::os::unix::net::UnixStream::connect(&self.sock) {
            let _ = std::io::Write::write_all(&mut c, b"thaw\nfail off\n");
        }
        let _ = nix::mount::umount2(&self.nas, nix::mount::MntFlags::MNT_DETACH);
    }
}
