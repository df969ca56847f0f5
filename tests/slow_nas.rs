//! A hung NAS under a real mount: simnas (bench/simnas) serves the source
//! directory and is frozen; a read that needs the NAS hangs, while a read
//! that nassync's cache can answer completes.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::simnas::{SimNas, ctl};
use common::{NASSYNC, is_mounted, require_fuse, wait_mounted};

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
    let sim = SimNas::start(t.path(), &[]);
    let (backing, nas, sock) = (sim.backing.clone(), sim.nas.clone(), sim.sock.clone());
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    std::fs::write(backing.join("cached"), vec![1u8; 1 << 20]).unwrap();
    std::fs::write(backing.join("cold"), vec![2u8; 1 << 20]).unwrap();
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
