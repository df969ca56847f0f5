//! nfs:// sources against a real NFS server (nfs-ganesha in a network
//! namespace of the test's own, tests/nfs/ganesha), and what happens when
//! that server hangs, dies, shuts down or drops off the network: requests
//! that need it fail within `timeo`, cached ones keep working, nothing
//! spins, and once it is back nassync reconnects by itself and writes back
//! what it kept (docs/SEMANTICS.md, "nfs:// sources").

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Mount, NASSYNC, errno};

const GANESHA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/nfs/ganesha");
const AWAY: &[u8] = b"written while the server was away";
const TIMEO: Duration = Duration::from_secs(2);
/// How long a failing request may take: `timeo` plus scheduling slack on a
/// loaded 2-core machine. A hang would take forever.
const PROMPT: Duration = Duration::from_secs(12);

/// One NFS server, stopped (namespace and all) when dropped.
struct Server {
    n: u32,
    dir: PathBuf,
    ip: String,
}

impl Server {
    fn start(dir: &Path) -> Server {
        Server::start_with(dir, &[])
    }

    fn start_with(dir: &Path, env: &[(&str, &str)]) -> Server {
        common::require_fuse();
        std::fs::create_dir_all(dir).unwrap();
        // Server numbers are namespaces: take the first free one.
        let first = 100 + std::process::id() % 100;
        for i in 0..150 {
            let n = 100 + (first + i * 7) % 150;
            let out = Command::new(GANESHA)
                .args(["start", &n.to_string()])
                .arg(dir)
                .envs(env.iter().copied())
                .output()
                .expect("run tests/nfs/ganesha");
            if out.status.success() {
                let ip = String::from_utf8_lossy(&out.stdout).trim().to_string();
                return Server {
                    n,
                    dir: dir.to_path_buf(),
                    ip,
                };
            }
            // 3: another server has that number; anything else is ours.
            if out.status.code() != Some(3) {
                let _ = Command::new(GANESHA)
                    .args(["stop", &n.to_string()])
                    .status();
                panic!(
                    "ganesha {n} did not start: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        panic!("no free server number");
    }

    fn url(&self) -> String {
        format!("nfs://{}/export", self.ip)
    }

    fn run(&self, args: &[&str]) {
        let n = self.n.to_string();
        let out = Command::new(GANESHA)
            .arg(args[0])
            .arg(&n)
            .args(&args[1..])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ganesha {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new(GANESHA)
            .args(["stop", &self.n.to_string()])
            .status();
    }
}

/// A server exporting a fresh directory, and a nassync mount of it.
fn setup(options: &str) -> (Mount, Server) {
    let mut m = Mount::prepare(&format!("timeo={}s,{options}", TIMEO.as_secs()));
    let server = Server::start(&m.nas.clone());
    m.source = Some(server.url().into());
    (m, server)
}

/// CPU time the process has used (user + system), from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap_or(100) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

fn wait_status(m: &Mount, want: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while !m.status().lines().any(|l| l == want) {
        assert!(
            Instant::now() < deadline,
            "status never said {want:?}:\n{}\n{}",
            m.status(),
            m.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed))
        .collect()
}

/// A file that exists on the server but was never read through the mount
/// fails with EIO within the time limit; cached files keep being served,
/// and writes to them are accepted; the daemon does not spin meanwhile.
fn check_while_unreachable(m: &Mount, cached: &[u8], spin_window: Duration) {
    let t = Instant::now();
    let r = std::fs::read(m.m("cold"));
    assert_eq!(errno(&r), libc::EIO);
    assert!(t.elapsed() < PROMPT, "took {:?}", t.elapsed());
    eprintln!(
        "TIMING uncached read failed with EIO after {:?}",
        t.elapsed()
    );
    let got = std::fs::read(m.m("a")).unwrap_or_else(|e| panic!("cached read: {e}\n{}", m.log()));
    assert_eq!(got, cached);
    // Changes to cached files are accepted (new names need the server:
    // namespace changes are not journaled yet).
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.m("a"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, AWAY, 0).unwrap();
    drop(f);
    let before = cpu_time(m.pid());
    std::thread::sleep(spin_window);
    let used = cpu_time(m.pid()) - before;
    assert!(
        used < spin_window / 4,
        "the daemon used {used:?} of CPU in {spin_window:?} while the server was away"
    );
    eprintln!("TIMING daemon CPU while the server was away: {used:?} in {spin_window:?}");
}

fn prepare_files(m: &mut Mount, server: &Server) -> Vec<u8> {
    let a = pattern(1 << 20, 3);
    std::fs::write(server.dir.join("a"), &a).unwrap();
    std::fs::write(server.dir.join("cold"), pattern(1 << 20, 5)).unwrap();
    m.mount();
    assert_eq!(std::fs::read(m.m("a")).unwrap(), a);
    std::fs::symlink_metadata(m.m("cold")).unwrap();
    a
}

fn check_recovered(m: &Mount, server: &Server) {
    let t = Instant::now();
    wait_status(m, "nas online", Duration::from_secs(60));
    eprintln!(
        "TIMING online again {:?} after the server was back",
        t.elapsed()
    );
    m.flush(None);
    let a = std::fs::read(server.dir.join("a")).unwrap();
    assert_eq!(&a[..AWAY.len()], AWAY);
    assert_eq!(a[AWAY.len()..], pattern(1 << 20, 3)[AWAY.len()..]);
    assert_eq!(std::fs::read(m.m("cold")).unwrap(), pattern(1 << 20, 5));
}

#[test]
fn an_nfs_share_is_mounted_by_url_or_host_path() {
    let (mut m, server) = setup("");
    std::fs::create_dir(server.dir.join("sub")).unwrap();
    std::fs::write(server.dir.join("sub/f"), b"from the server").unwrap();
    m.mount();
    assert_eq!(std::fs::read(m.m("sub/f")).unwrap(), b"from the server");
    std::fs::write(m.m("sub/g"), b"through nassync").unwrap();
    m.flush(None);
    assert_eq!(
        std::fs::read(server.dir.join("sub/g")).unwrap(),
        b"through nassync"
    );
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        mounts.contains(&format!("{} ", server.url())),
        "the source shows as the URL: {mounts}"
    );
    m.unmount();
    // The mount(8) form, of a directory below the export.
    m.source = Some(format!("{}:/export/sub", server.ip).into());
    m.mount();
    assert_eq!(std::fs::read(m.m("g")).unwrap(), b"through nassync");
}

#[test]
fn a_wrong_nfs_source_fails_the_mount_with_the_reason() {
    let (m, server) = setup("");
    let try_mount = |source: &str, opts: &str| {
        let t = Instant::now();
        let out = Command::new(NASSYNC)
            .args(["mount", source])
            .arg(&m.mnt)
            .args([
                "-o",
                &format!("timeo=2s,cache_dir={}{opts}", m.cache.display()),
            ])
            .output()
            .unwrap();
        let mounted = common::is_mounted(&m.mnt);
        if mounted {
            common::detach(&m.mnt);
        }
        assert!(!mounted, "{source} was mounted");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            t.elapsed(),
        )
    };
    let (code, err, _) = try_mount(&format!("nfs://{}/nowhere", server.ip), "");
    assert_eq!(code, Some(32), "{err}");
    assert!(err.contains("refused the export"), "{err}");
    let (code, err, _) = try_mount(&format!("nfs://{}/export?colour=red", server.ip), "");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("unknown option"), "{err}");
    let (code, err, _) = try_mount(&format!("{}:/export", server.ip), ",nconnect=99");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("nconnect"), "{err}");
    // Nobody at that address: the time limit, not a hang.
    server.run(&["link", "down"]);
    let (code, err, took) = try_mount(&server.url(), "");
    assert_eq!(code, Some(32), "{err}");
    assert!(took < PROMPT, "took {took:?}: {err}");
    assert!(!m.cache.exists() || std::fs::read_dir(&m.cache).unwrap().count() == 0);
}

#[test]
fn a_hung_server_fails_requests_in_time_and_is_caught_up_with_after() {
    let (mut m, server) = setup("");
    let a = prepare_files(&mut m, &server);
    server.run(&["signal", "STOP"]);
    check_while_unreachable(&m, &a, Duration::from_secs(3));
    wait_status(&m, "nas offline", Duration::from_secs(5));
    server.run(&["signal", "CONT"]);
    check_recovered(&m, &server);
}

#[test]
fn a_server_killed_mid_read_fails_the_read_and_is_reconnected_after_restart() {
    let (mut m, server) = setup("");
    let a = prepare_files(&mut m, &server);
    let big = pattern(64 << 20, 11);
    std::fs::write(server.dir.join("big"), &big).unwrap();
    // Read slowly (1 MiB per 50 ms): the server dies in the middle.
    let path = m.m("big");
    let reader = std::thread::spawn(move || {
        let f = std::fs::File::open(path).unwrap();
        let mut buf = vec![0; 1 << 20];
        let mut off = 0u64;
        loop {
            let t = Instant::now();
            match f.read_at(&mut buf, off) {
                Ok(0) => return (Ok(off), t.elapsed()),
                Ok(n) => off += n as u64,
                Err(e) => return (Err(e.raw_os_error()), t.elapsed()),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    server.run(&["signal", "KILL"]);
    let (r, took) = reader.join().unwrap();
    assert_eq!(
        r,
        Err(Some(libc::EIO)),
        "the read of a file whose server died"
    );
    assert!(took < PROMPT, "the failing read took {took:?}");
    eprintln!("TIMING read of a file whose server died: EIO after {took:?}");
    check_while_unreachable(&m, &a, Duration::from_secs(3));
    server.run(&["restart"]);
    check_recovered(&m, &server);
    assert_eq!(std::fs::read(m.m("big")).unwrap(), big);
}

#[test]
fn a_server_shut_down_gracefully_does_not_make_the_daemon_spin() {
    let (mut m, server) = setup("");
    let a = prepare_files(&mut m, &server);
    server.run(&["signal", "TERM"]);
    std::thread::sleep(Duration::from_millis(500));
    check_while_unreachable(&m, &a, Duration::from_secs(3));
    server.run(&["restart"]);
    check_recovered(&m, &server);
}

#[test]
fn a_server_cut_off_the_network_fails_requests_in_time() {
    let (mut m, server) = setup("");
    let a = prepare_files(&mut m, &server);
    server.run(&["link", "down"]);
    check_while_unreachable(&m, &a, Duration::from_secs(3));
    server.run(&["link", "up"]);
    check_recovered(&m, &server);
}

#[test]
fn nfs_sources_refuse_what_nfsv3_lacks() {
    let (mut m, _server) = setup("writeback_delay=1h");
    m.mount();
    std::fs::write(m.m("a"), b"a").unwrap();
    std::fs::write(m.m("b"), b"b").unwrap();
    let c = |p: PathBuf| std::ffi::CString::new(p.into_os_string().into_encoded_bytes()).unwrap();
    let (pa, pb) = (c(m.m("a")), c(m.m("b")));
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            pa.as_ptr(),
            libc::AT_FDCWD,
            pb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EINVAL)
    );
    let name = c"user.x";
    // SAFETY: valid C strings and buffer.
    let r = unsafe { libc::setxattr(pa.as_ptr(), name.as_ptr(), b"v".as_ptr().cast(), 1, 0) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EOPNOTSUPP)
    );
    assert_eq!(std::fs::read(m.m("a")).unwrap(), b"a");
    // The same for a new file, not on the NAS yet: at once, and it is not
    // made there for it (nor kept here to be lost there).
    std::fs::write(m.m("c"), b"c").unwrap();
    let pc = c(m.m("c"));
    // SAFETY: valid C strings and buffer.
    let r = unsafe { libc::setxattr(pc.as_ptr(), name.as_ptr(), b"v".as_ptr().cast(), 1, 0) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EOPNOTSUPP)
    );
    assert!(!m.nas.join("c").exists(), "made on the NAS for a setxattr");
}

/// The server restarts between unstable WRITEs and the COMMIT, having
/// lost what they wrote (simulated: the file is emptied on the server
/// while it is down). The COMMIT sees a new write verifier, and the
/// writes are sent again: nothing is lost.
#[test]
fn writes_a_restarted_server_lost_are_sent_again_at_commit() {
    use nassync::backend::{Backend, OpenMode};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("export"));
    std::fs::write(server.dir.join("f"), b"").unwrap();
    let nfs = backend(&server);
    let (root, _) = nfs.root().unwrap();
    let (node, _) = nfs.lookup(&root, "f".as_ref()).unwrap();
    let rw = OpenMode {
        read: true,
        write: true,
        append: false,
        truncate: false,
    };
    let f = nfs.open(&node, rw).unwrap();
    let data = pattern(3 << 20, 17);
    assert_eq!(nfs.write(&f, 0, &data).unwrap(), data.len());
    server.run(&["signal", "KILL"]);
    std::fs::write(server.dir.join("f"), b"").unwrap();
    // ganesha's verifier is its start time in seconds.
    std::thread::sleep(Duration::from_millis(1100));
    server.run(&["restart"]);
    nfs.fsync(&f, false).unwrap();
    assert_eq!(nfs.resent_bytes(), data.len() as u64);
    assert_eq!(std::fs::read(server.dir.join("f")).unwrap(), data);
    // With nothing lost, a commit sends nothing again.
    nfs.write(&f, 0, b"x").unwrap();
    nfs.fsync(&f, false).unwrap();
    assert_eq!(nfs.resent_bytes(), data.len() as u64);
}

/// The server re-exports the share under a new id: every handle nassync
/// holds is stale. Each is found again by its path (the root by a new
/// MOUNT), and work goes on.
#[test]
fn handles_the_server_no_longer_knows_are_found_again_by_path() {
    let (mut m, server) = setup("actimeo=0");
    std::fs::create_dir(server.dir.join("d")).unwrap();
    std::fs::write(server.dir.join("d/f"), b"before").unwrap();
    m.mount();
    assert_eq!(std::fs::read(m.m("d/f")).unwrap(), b"before");
    let open = std::fs::File::open(m.m("d/f")).unwrap();
    server.run(&["reexport"]);
    // Same file (same inode) with new content: read through old handles.
    std::fs::OpenOptions::new()
        .write(true)
        .open(server.dir.join("d/f"))
        .unwrap()
        .write_all_at(b"after!", 0)
        .unwrap();
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut &open, &mut got).unwrap();
    assert_eq!(got, b"after!", "{}", m.log());
    assert_eq!(std::fs::read(m.m("d/f")).unwrap(), b"after!");
    std::fs::write(m.m("d/g"), b"new").unwrap();
    std::fs::write(m.m("top"), b"in the root").unwrap();
    m.flush(None);
    assert_eq!(std::fs::read(server.dir.join("d/g")).unwrap(), b"new");
    assert_eq!(
        std::fs::read(server.dir.join("top")).unwrap(),
        b"in the root"
    );
    assert!(m.log().contains("went stale; found again"), "{}", m.log());
}

/// Most NAS exports take clients on ports below 1024 only (`secure`). As
/// root, nassync connects from one; `noresvport` does not, and is refused.
#[test]
fn as_root_nassync_connects_from_a_privileged_port() {
    let mut m = Mount::prepare(&format!("timeo={}s", TIMEO.as_secs()));
    let server = Server::start_with(&m.nas.clone(), &[("GANESHA_PRIVILEGED", "true")]);
    std::fs::write(server.dir.join("f"), b"secure").unwrap();
    m.source = Some(server.url().into());
    m.mount();
    assert_eq!(std::fs::read(m.m("f")).unwrap(), b"secure");
    m.unmount();
    let out = Command::new(NASSYNC)
        .args(["mount", &server.url()])
        .arg(&m.mnt)
        .args([
            "-o",
            &format!("timeo=2s,noresvport,cache_dir={}", m.cache.display()),
        ])
        .output()
        .unwrap();
    if common::is_mounted(&m.mnt) {
        common::detach(&m.mnt);
        panic!("an insecure port was accepted: the test proves nothing");
    }
    assert_eq!(out.status.code(), Some(32));
}

fn backend(server: &Server) -> nassync::backend::nfs::NfsBackend {
    use nassync::backend::nfs::{NfsBackend, NfsOptions, NfsSource};
    NfsBackend::connect(
        &NfsSource::parse(&server.url()).unwrap(),
        &NfsOptions {
            timeo: TIMEO,
            nconnect: 2,
            resvport: true,
        },
    )
    .unwrap()
}

/// A file open here that a rename would replace is hidden first (the
/// server would delete it); if the rename then fails, it gets its name
/// back instead of vanishing at close.
#[test]
fn a_failed_rename_over_an_open_file_leaves_it_in_place() {
    use nassync::backend::{Backend, OpenMode, RenameFlags};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("export"));
    std::fs::write(server.dir.join("b"), b"keep me").unwrap();
    let nfs = backend(&server);
    let (root, _) = nfs.root().unwrap();
    let (b, _) = nfs.lookup(&root, "b".as_ref()).unwrap();
    let read = OpenMode {
        read: true,
        write: false,
        append: false,
        truncate: false,
    };
    let f = nfs.open(&b, read).unwrap();
    let r = nfs.rename(
        &root,
        "missing".as_ref(),
        &root,
        "b".as_ref(),
        RenameFlags::default(),
    );
    assert_eq!(r.unwrap_err().raw_errno(), libc::ENOENT);
    assert_eq!(std::fs::read(server.dir.join("b")).unwrap(), b"keep me");
    drop(f);
    assert_eq!(std::fs::read(server.dir.join("b")).unwrap(), b"keep me");
    let names: Vec<_> = std::fs::read_dir(&server.dir).unwrap().collect();
    assert_eq!(names.len(), 1, "nothing hidden is left: {names:?}");
}

/// rmdir of a directory listed empty here that held a file open here: the
/// NAS keeps the file under a hidden name while it is open, so the
/// directory is not removed then (ENOTEMPTY, as a kernel NFS client
/// says) rather than removed here and brought back by the NAS later.
#[test]
fn a_directory_emptied_of_an_open_file_is_not_removed_to_come_back() {
    let (mut m, server) = setup("writeback_delay=1h,actimeo=600");
    m.mount();
    std::fs::create_dir(m.m("d")).unwrap();
    std::fs::write(m.m("d/f"), b"data").unwrap();
    m.flush(None);
    assert_eq!(std::fs::read_dir(m.m("d")).unwrap().count(), 1);
    let f = std::fs::File::open(m.m("d/f")).unwrap();
    std::fs::remove_file(m.m("d/f")).unwrap();
    // Listed again, empty here.
    assert_eq!(std::fs::read_dir(m.m("d")).unwrap().count(), 0);
    match std::fs::remove_dir(m.m("d")) {
        Ok(()) => panic!("removed while the NAS still holds the open file"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOTEMPTY), "{e}"),
    }
    assert!(m.m("d").exists());
    drop(f);
    std::fs::remove_dir(m.m("d")).unwrap();
    m.flush(None);
    assert!(!server.dir.join("d").exists());
    assert!(!m.m("d").exists());
    assert_eq!(m.status_value("conflicts"), 0, "{}", m.status());
}

/// A file unlinked while open lives on under a hidden name, which is gone
/// once it is closed: its directory can be removed right after.
#[test]
fn a_directory_emptied_of_an_open_unlinked_file_can_be_removed_after_close() {
    let (mut m, server) = setup("");
    m.mount();
    std::fs::create_dir(m.m("d")).unwrap();
    std::fs::write(m.m("d/f"), b"data").unwrap();
    m.flush(None);
    let f = std::fs::File::open(m.m("d/f")).unwrap();
    std::fs::remove_file(m.m("d/f")).unwrap();
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut &f, &mut got).unwrap();
    assert_eq!(got, b"data");
    assert!(std::fs::read_dir(m.m("d")).unwrap().next().is_none());
    drop(f);
    std::fs::remove_dir(m.m("d")).unwrap();
    // (Made on the NAS at once by the replay.)
    m.flush(None);
    assert!(!server.dir.join("d").exists());
}

/// FUSE's release comes after close(2) has returned: an rmdir that comes
/// first waits for it (briefly) instead of failing with ENOTEMPTY, and a
/// file still held open keeps failing it.
#[test]
fn an_rmdir_waits_for_a_late_release_of_an_unlinked_file() {
    use nassync::backend::{Backend, OpenMode};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("export"));
    let nfs = backend(&server);
    let (root, _) = nfs.root().unwrap();
    let read = OpenMode {
        read: true,
        write: false,
        append: false,
        truncate: false,
    };
    for late in [Some(Duration::from_millis(300)), None] {
        std::fs::create_dir(server.dir.join("d")).unwrap();
        std::fs::write(server.dir.join("d/f"), b"data").unwrap();
        let (d, _) = nfs.lookup(&root, "d".as_ref()).unwrap();
        let (f, _) = nfs.lookup(&d, "f".as_ref()).unwrap();
        let file = nfs.open(&f, read).unwrap();
        nfs.unlink(&d, "f".as_ref()).unwrap();
        let hidden: Vec<_> = std::fs::read_dir(server.dir.join("d")).unwrap().collect();
        assert_eq!(hidden.len(), 1, "hidden while open: {hidden:?}");
        let Some(late) = late else {
            // Still open: the wait is bounded and the rmdir refused.
            let r = nfs.rmdir(&root, "d".as_ref());
            assert_eq!(r.unwrap_err().raw_errno(), libc::ENOTEMPTY);
            drop(file);
            break;
        };
        let closer = std::thread::spawn(move || {
            std::thread::sleep(late);
            drop(file);
        });
        nfs.rmdir(&root, "d".as_ref()).unwrap();
        closer.join().unwrap();
        assert!(!server.dir.join("d").exists());
    }
    nfs.rmdir(&root, "d".as_ref()).unwrap();
    assert!(!server.dir.join("d").exists());
}
