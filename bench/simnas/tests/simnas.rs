//! Integration tests: mount simnas over a temp dir and drive it for real.
//! Needs /dev/fuse and root; without them the tests fail (CI must have FUSE).

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_simnas");

fn fuse_available() -> bool {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: install fuse3"
    );
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the simnas tests mount as root"
    );
    true
}

fn mounted(mnt: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = mnt.as_os_str().as_bytes();
    info.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|p| p.as_bytes() == want))
}

/// Poll `cond` every 10 ms until it holds or `secs` pass.
fn wait_for(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A simnas mount over a temp dir; unmounted on drop even if the test panics.
struct Mount {
    child: Option<Child>,
    backing: PathBuf,
    mnt: PathBuf,
    ctl: PathBuf,
    _dir: tempfile::TempDir, // dropped last, after the unmount
}

impl Mount {
    fn new() -> Mount {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let (backing, mnt, ctl) = (
            root.join("backing"),
            root.join("mnt"),
            root.join("ctl.sock"),
        );
        fs::create_dir(&backing).unwrap();
        fs::create_dir(&mnt).unwrap();
        Mount {
            child: None,
            backing,
            mnt,
            ctl,
            _dir: dir,
        }
    }

    /// Start `simnas --foreground` as our child and wait for the mount to appear.
    fn start(extra: &[&str]) -> Mount {
        let mut m = Mount::new();
        let child = Command::new(BIN)
            .arg(&m.backing)
            .arg(&m.mnt)
            .arg("--foreground")
            .arg("--control")
            .arg(&m.ctl)
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn simnas");
        m.child = Some(child);
        let ready = wait_for(20, || {
            if let Ok(Some(st)) = m.child.as_mut().unwrap().try_wait() {
                panic!("simnas exited early: {st}");
            }
            mounted(&m.mnt)
        });
        assert!(ready, "simnas did not mount within 20s");
        m
    }

    fn m(&self, p: &str) -> PathBuf {
        self.mnt.join(p)
    }

    fn b(&self, p: &str) -> PathBuf {
        self.backing.join(p)
    }

    fn try_ctl(&self, cmd: &str) -> std::io::Result<String> {
        let mut s = UnixStream::connect(&self.ctl)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(format!("{cmd}\n").as_bytes())?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    fn ctl(&self, cmd: &str) -> String {
        self.try_ctl(cmd).expect("control socket")
    }

    fn stat(&self, key: &str) -> u64 {
        let out = self.ctl("stats");
        assert!(out.ends_with("end\n"), "bad stats reply: {out}");
        let line = out
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '));
        line.unwrap_or_else(|| panic!("no {key} in {out}"))
            .parse()
            .unwrap()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // Best effort first: nothing should stay parked inside simnas.
        if self.ctl.exists() {
            let _ = self.try_ctl("thaw");
            let _ = self.try_ctl("fail off");
        }
        // umount(2) directly: umount(8) stats the mount point, which would
        // hang if simnas were still frozen.
        let c = cpath(&self.mnt);
        let unmounted = unsafe { libc::umount2(c.as_ptr(), 0) } == 0;
        if let Some(child) = self.child.as_mut() {
            if unmounted {
                // After a clean unmount simnas exits by itself.
                wait_for(5, || !matches!(child.try_wait(), Ok(None)));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if mounted(&self.mnt) {
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn cpath(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap()
}

#[test]
fn passthrough_matches_backing() {
    if !fuse_available() {
        return;
    }
    let m = Mount::start(&[]);

    // create / write / read
    fs::write(m.m("a.txt"), b"hello world").unwrap();
    assert_eq!(fs::read(m.b("a.txt")).unwrap(), b"hello world");
    assert_eq!(fs::read(m.m("a.txt")).unwrap(), b"hello world");
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(m.m("big"), &big).unwrap();
    assert_eq!(fs::read(m.b("big")).unwrap(), big);
    assert_eq!(fs::read(m.m("big")).unwrap(), big);

    // stable inode numbers: the backing st_ino, root is 1
    assert_eq!(
        fs::metadata(m.m("a.txt")).unwrap().ino(),
        fs::metadata(m.b("a.txt")).unwrap().ino()
    );
    assert_eq!(fs::metadata(&m.mnt).unwrap().ino(), 1);

    // mkdir / readdir
    fs::create_dir(m.m("d")).unwrap();
    for i in 0..50 {
        fs::write(m.m(&format!("d/f{i}")), format!("{i}")).unwrap();
    }
    assert!(fs::metadata(m.b("d")).unwrap().is_dir());
    assert_eq!(names(&m.m("d")), names(&m.b("d")));
    assert_eq!(names(&m.mnt), names(&m.backing));
    assert_eq!(names(&m.m("d")).len(), 50);

    // rename
    fs::rename(m.m("a.txt"), m.m("d/a2.txt")).unwrap();
    assert!(!m.b("a.txt").exists());
    assert_eq!(fs::read(m.b("d/a2.txt")).unwrap(), b"hello world");

    // symlink
    std::os::unix::fs::symlink("a2.txt", m.m("d/ln")).unwrap();
    assert_eq!(fs::read_link(m.b("d/ln")).unwrap(), Path::new("a2.txt"));
    assert_eq!(fs::read_link(m.m("d/ln")).unwrap(), Path::new("a2.txt"));
    assert_eq!(fs::read(m.m("d/ln")).unwrap(), b"hello world");

    // hard link
    fs::hard_link(m.m("d/a2.txt"), m.m("d/hl")).unwrap();
    let (mb, mm) = (
        fs::metadata(m.b("d/hl")).unwrap(),
        fs::metadata(m.m("d/hl")).unwrap(),
    );
    assert_eq!(mb.nlink(), 2);
    assert_eq!(mm.nlink(), 2);
    assert_eq!(mb.ino(), fs::metadata(m.b("d/a2.txt")).unwrap().ino());
    assert_eq!(mm.ino(), mb.ino());

    // truncate, chmod, utimes
    let f = OpenOptions::new()
        .write(true)
        .open(m.m("d/a2.txt"))
        .unwrap();
    f.set_len(5).unwrap();
    drop(f);
    assert_eq!(fs::read(m.b("d/a2.txt")).unwrap(), b"hello");
    fs::File::options()
        .write(true)
        .open(m.m("big"))
        .unwrap()
        .set_len(100_000)
        .unwrap();
    assert_eq!(fs::metadata(m.b("big")).unwrap().len(), 100_000);
    fs::set_permissions(m.m("d/a2.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(
        fs::metadata(m.b("d/a2.txt")).unwrap().mode() & 0o7777,
        0o640
    );
    let t = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    File::options()
        .write(true)
        .open(m.m("d/a2.txt"))
        .unwrap()
        .set_modified(t)
        .unwrap();
    assert_eq!(
        fs::metadata(m.b("d/a2.txt")).unwrap().mtime(),
        1_000_000_000
    );

    // append and pwrite
    let mut f = OpenOptions::new()
        .append(true)
        .open(m.m("d/a2.txt"))
        .unwrap();
    f.write_all(b"!!").unwrap();
    drop(f);
    assert_eq!(fs::read(m.b("d/a2.txt")).unwrap(), b"hello!!");

    // xattrs
    let (pm, pb) = (cpath(&m.m("d/a2.txt")), cpath(&m.b("d/a2.txt")));
    let r = unsafe {
        libc::setxattr(
            pm.as_ptr(),
            c"user.simnas".as_ptr(),
            b"42".as_ptr().cast(),
            2,
            0,
        )
    };
    assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
    let mut buf = [0u8; 16];
    let n = unsafe {
        libc::getxattr(
            pb.as_ptr(),
            c"user.simnas".as_ptr(),
            buf.as_mut_ptr().cast(),
            16,
        )
    };
    assert_eq!(&buf[..n as usize], b"42");
    let n = unsafe {
        libc::getxattr(
            pm.as_ptr(),
            c"user.simnas".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    assert_eq!(n, 2);
    let n = unsafe { libc::listxattr(pm.as_ptr(), buf.as_mut_ptr().cast(), 16) };
    assert!(
        buf[..n as usize]
            .split(|&b| b == 0)
            .any(|x| x == b"user.simnas")
    );
    assert_eq!(
        unsafe { libc::removexattr(pm.as_ptr(), c"user.simnas".as_ptr()) },
        0
    );
    let n = unsafe {
        libc::getxattr(
            pb.as_ptr(),
            c"user.simnas".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    assert_eq!(n, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENODATA)
    );

    // errors map through
    let e = fs::create_dir(m.m("d")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    assert_eq!(
        fs::remove_dir(m.m("d")).unwrap_err().raw_os_error(),
        Some(libc::ENOTEMPTY)
    );

    // unlink / rmdir
    fs::remove_file(m.m("d/hl")).unwrap();
    assert!(!m.b("d/hl").exists());
    assert_eq!(fs::metadata(m.b("d/a2.txt")).unwrap().nlink(), 1);
    fs::remove_dir_all(m.m("d")).unwrap();
    assert!(!m.b("d").exists());
    assert_eq!(names(&m.mnt), names(&m.backing));

    // statfs answers
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(cpath(&m.mnt).as_ptr(), &mut st) }, 0);
    assert!(st.f_blocks > 0);
}

#[test]
fn stats_count_bytes_and_ops() {
    if !fuse_available() {
        return;
    }
    let m = Mount::start(&["--profile", "lan"]);
    assert_eq!(m.ctl("reset"), "ok\n");
    let data = vec![7u8; 1 << 20];
    let mut f = File::create(m.m("one-mib")).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(m.stat("bytes_written"), 1 << 20);
    assert!(m.stat("ops_write") >= 1);
    assert_eq!(m.stat("ops_create"), 1);
    assert!(m.stat("ops_total") >= 3);
    assert_eq!(fs::read(m.m("one-mib")).unwrap(), data);
    assert!(m.stat("bytes_read") >= 1 << 20);

    // The shell client prints the same reply.
    let out = Command::new(BIN)
        .arg("ctl")
        .arg(&m.ctl)
        .arg("stats")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("bytes_written 1048576\n") && text.ends_with("end\n"),
        "{text}"
    );
    let out = Command::new(BIN)
        .arg("ctl")
        .arg(&m.ctl)
        .args(["latency", "0"])
        .output()
        .unwrap();
    assert!(out.status.success() && out.stdout == b"ok\n");
    let out = Command::new(BIN)
        .arg("ctl")
        .arg(&m.ctl)
        .arg("bogus")
        .output()
        .unwrap();
    assert!(!out.status.success());

    assert_eq!(m.ctl("reset"), "ok\n");
    assert_eq!(m.stat("bytes_written"), 0);
}

#[test]
fn freeze_blocks_until_thaw() {
    if !fuse_available() {
        return;
    }
    let m = Mount::start(&[]);
    fs::write(m.b("f"), b"frozen data").unwrap();
    let mut f = File::open(m.m("f")).unwrap(); // open before the freeze
    assert_eq!(m.ctl("freeze"), "ok\n");

    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut s = Vec::new();
        let r = f.read_to_end(&mut s).map(|_| s);
        let _ = tx.send(r.map_err(|e| e.to_string()));
    });
    // The read reaches simnas and parks there.
    assert!(
        wait_for(10, || m.stat("blocked") >= 1),
        "read never blocked"
    );
    assert!(
        matches!(rx.try_recv(), Err(mpsc::TryRecvError::Empty)),
        "read finished while frozen"
    );
    assert_eq!(m.stat("frozen"), 1);

    assert_eq!(m.ctl("thaw"), "ok\n");
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("read still blocked after thaw");
    assert_eq!(got.unwrap(), b"frozen data");
    assert_eq!(m.stat("blocked"), 0);
}

#[test]
fn fail_injects_errno() {
    if !fuse_available() {
        return;
    }
    let m = Mount::start(&[]);
    fs::write(m.b("f"), b"x").unwrap();
    assert_eq!(m.ctl("fail EIO"), "ok\n");
    assert_eq!(
        File::open(m.m("f")).unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
    assert_eq!(
        fs::metadata(m.m("never-seen")).unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
    assert_eq!(m.ctl("fail ENOSPC"), "ok\n");
    assert_eq!(
        File::create(m.m("new")).unwrap_err().raw_os_error(),
        Some(libc::ENOSPC)
    );
    assert!(m.ctl("fail EBOGUS").starts_with("err"));
    assert_eq!(m.ctl("fail off"), "ok\n");
    assert_eq!(fs::read(m.m("f")).unwrap(), b"x");
    assert!(!m.b("new").exists());
}

#[test]
fn detaches_only_when_ready() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new();
    let log = m._dir.path().join("simnas.log");
    let st = Command::new(BIN)
        .arg(&m.backing)
        .arg(&m.mnt)
        .arg("--control")
        .arg(&m.ctl)
        .arg("--log")
        .arg(&log)
        .status()
        .unwrap();
    assert!(st.success());
    // No polling: the parent only exits once the mount is up.
    assert!(mounted(&m.mnt));
    fs::write(m.m("x"), b"y").unwrap();
    assert_eq!(fs::read(m.b("x")).unwrap(), b"y");
    assert!(m.ctl("stats").contains("ops_create 1\n"));
    // The daemon exits after an external unmount and removes its socket.
    assert!(
        Command::new("umount")
            .arg(&m.mnt)
            .status()
            .unwrap()
            .success()
    );
    assert!(wait_for(10, || !m.ctl.exists()), "daemon did not clean up");
    m.child = None;

    // Failure is reported by the parent, with the reason.
    let out = Command::new(BIN)
        .arg(m.b("missing"))
        .arg(&m.mnt)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing"));
    assert!(!mounted(&m.mnt));
}
