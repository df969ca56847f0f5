//! A hung NAS under a real mount: simnas (bench/simnas) serves the source
//! directory and is frozen; a read that needs the NAS hangs, while a read
//! that nassync's cache can answer completes.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{NASSYNC, is_mounted, require_fuse, wait_mounted};

fn simnas() -> PathBuf {
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
fn ctl(sock: &Path, cmd: &str) -> String {
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
struct SimNas {
    nas: PathBuf,
    sock: PathBuf,
}

impl Drop for SimNas {
    fn drop(&mut self) {
        if let Ok(mut c) = std::os::unix::net::UnixStream::connect(&self.sock) {
            let _ = std::io::Write::write_all(&mut c, b"thaw\n");
        }
        let _ = nix::mount::umount2(&self.nas, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The nassync mount, unmounted in Drop (before simnas, declared after it).
struct Nassync(PathBuf);

impl Drop for Nassync {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new(NASSYNC).arg("umount").arg(&self.0).status();
        }
        if is_mounted(&self.0) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

#[test]
fn a_cached_read_completes_while_the_nas_hangs() {
    require_fuse();
    let t = tempfile::tempdir().unwrap();
    let (backing, nas, mnt) = (
        t.path().join("backing"),
        t.path().join("nas"),
        t.path().join("mnt"),
    );
    for d in [&backing, &nas, &mnt] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::write(backing.join("cached"), vec![1u8; 1 << 20]).unwrap();
    std::fs::write(backing.join("cold"), vec![2u8; 1 << 20]).unwrap();
    let sock = t.path().join("simnas.sock");
    let out = Command::new(simnas())
        .arg(&backing)
        .arg(&nas)
        .arg("--control")
        .arg(&sock)
        .output()
        .unwrap();
    let _simnas = SimNas {
        nas: nas.clone(),
        sock: sock.clone(),
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(NASSYNC)
        .arg("mount")
        .arg(&nas)
        .arg(&mnt)
        .arg("-o")
        .arg(format!(
            "cache_dir={},actimeo=60",
            t.path().join("cache").display()
        ))
        .output()
        .unwrap();
    let _nassync = Nassync(mnt.clone());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_mounted(&mnt, true, None);

    // O_DIRECT: reads reach the daemon instead of the kernel's page cache.
    let open = |name: &str| {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(mnt.join(name))
            .unwrap()
    };
    let cached = open("cached");
    let cold = open("cold");
    let mut buf = vec![0u8; 1 << 20];
    cached.read_exact_at(&mut buf, 0).unwrap();

    ctl(&sock, "freeze");
    let (tx, rx) = mpsc::channel();
    let stuck = std::thread::spawn(move || {
        let mut b = vec![0u8; 4096];
        let r = cold.read_exact_at(&mut b, 0).map(|()| b[0]);
        let _ = tx.send(());
        r
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ctl(&sock, "stats")
        .lines()
        .any(|l| l.starts_with("blocked ") && l != "blocked 0")
    {
        assert!(
            Instant::now() < deadline,
            "the cold read never reached the NAS"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // A watchdog thaws the NAS after 30 s, so that a cached read that
    // wrongly waits for the NAS fails the test instead of hanging it.
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let watchdog_sock = sock.clone();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(Duration::from_secs(30)).is_err() {
            ctl(&watchdog_sock, "thaw");
        }
    });
    let start = Instant::now();
    let mut small = vec![0u8; 4096];
    cached.read_exact_at(&mut small, 512 << 10).unwrap();
    let took = start.elapsed();
    let still_stuck = rx.try_recv().is_err();
    let _ = done_tx.send(());
    watchdog.join().unwrap();
    assert!(
        took < Duration::from_secs(30),
        "the cached read waited for the hung NAS"
    );
    assert!(small.iter().all(|b| *b == 1));
    assert!(
        still_stuck,
        "the cold read must still be waiting for the NAS"
    );
    ctl(&sock, "thaw");
    assert_eq!(stuck.join().unwrap().unwrap(), 2);
}
