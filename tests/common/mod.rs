//! Shared by the mount tests: a nassync mount over a temporary "NAS"
//! directory, unmounted in Drop even when the test fails, and helpers.
#![allow(dead_code)]

pub mod simnas;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const NASSYNC: &str = env!("CARGO_BIN_EXE_nassync");

/// Fails (never skips) when FUSE is not usable: CI must have it.
pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: these tests need FUSE (install fuse3)"
    );
}

/// The NFS server the mount tests go through instead of a plain
/// directory, when `NASSYNC_TEST_NFS` is set (by scripts/test): the
/// directory it exports and its `nfs://` URL.
pub fn nfs_export() -> Option<(PathBuf, String)> {
    let v = std::env::var("NASSYNC_TEST_NFS").ok()?;
    let (dir, url) = v.split_once('=')?;
    Some((PathBuf::from(dir), url.trim_end_matches('/').to_string()))
}

/// Whether the NAS is reached over NFS (which has no xattrs, ACLs or
/// fallocate).
pub fn over_nfs() -> bool {
    nfs_export().is_some()
}

/// For a test that cannot run over NFS: says why (SKIPPED) and returns
/// true when the tests go over NFS.
pub fn skip_over_nfs(why: &str) -> bool {
    if over_nfs() {
        eprintln!("SKIPPED over NFS: {why}");
    }
    over_nfs()
}

/// The source to mount for the NAS directory `nas`: itself, or its URL
/// on the NFS server that exports it.
pub fn source_of(nas: &Path) -> std::ffi::OsString {
    match nfs_export() {
        Some((dir, url)) if nas.starts_with(&dir) => {
            let rel = nas.strip_prefix(&dir).unwrap();
            format!("{url}/{}", rel.display()).into()
        }
        _ => nas.as_os_str().to_owned(),
    }
}

pub fn is_mounted(path: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = path.to_str().unwrap().replace(' ', "\\040");
    text.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// Waits, by polling /proc/self/mountinfo, until `path` is (or is not) a
/// mount point. Panics after 20 s.
pub fn wait_mounted(path: &Path, mounted: bool, child: Option<&mut Child>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut child = child;
    while is_mounted(path) != mounted {
        if let Some(c) = child.as_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                panic!("nassync exited early with {status}");
            }
        }
        if Instant::now() >= deadline {
            // No daemon left behind by a failed test.
            if let Some(c) = child.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
            detach(path);
            panic!("timed out waiting for {path:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A nassync mount of `nas` at `mnt` with a cache in `cache` (or, for
/// [`Mount::of_source`] without `own_cache`, where nassync chooses).
pub struct Mount {
    pub dir: tempfile::TempDir,
    pub nas: PathBuf,
    pub mnt: PathBuf,
    pub cache: PathBuf,
    pub options: String,
    /// What is mounted, if not `nas` itself (an `nfs://` URL).
    pub source: Option<std::ffi::OsString>,
    own_cache: bool,
    child: Option<Child>,
    /// How the daemon exited at the last unmount.
    pub last_exit: Option<std::process::ExitStatus>,
    /// A descriptor limit for the daemon that it cannot raise.
    pub nofile: Option<u64>,
}

impl Mount {
    /// A new empty NAS directory mounted with `options` (added to the
    /// test defaults).
    pub fn new(options: &str) -> Mount {
        let mut m = Mount::prepare(options);
        m.mount();
        m
    }

    /// Like [`Mount::new`], without mounting yet (to set up the NAS
    /// directory first).
    pub fn prepare(options: &str) -> Mount {
        let mut b = tempfile::Builder::new();
        b.prefix("nassync-test");
        // Over NFS the NAS directory is inside what the server exports.
        let dir = match nfs_export() {
            Some((dir, _)) => b.tempdir_in(dir),
            None => b.tempdir(),
        }
        .unwrap();
        let nas = dir.path().join("nas");
        std::fs::create_dir(&nas).unwrap();
        Mount::build(dir, nas, options, true)
    }

    /// Another mount of the NAS directory `nas` (which it does not own),
    /// with its own cache directory, or with none given (`own_cache`
    /// false: nassync's default choice, under /var/cache/nassync for root).
    pub fn of_source(nas: &Path, options: &str, own_cache: bool) -> Mount {
        let dir = tempfile::Builder::new()
            .prefix("nassync-test")
            .tempdir()
            .unwrap();
        let mut m = Mount::build(dir, nas.to_path_buf(), options, own_cache);
        m.mount();
        m
    }

    fn build(dir: tempfile::TempDir, nas: PathBuf, options: &str, own_cache: bool) -> Mount {
        require_fuse();
        let mnt = dir.path().join("mnt");
        let cache = dir.path().join("cache");
        std::fs::create_dir(&mnt).unwrap();
        Mount {
            dir,
            nas,
            mnt,
            cache,
            options: options.to_string(),
            source: None,
            own_cache,
            child: None,
            last_exit: None,
            nofile: None,
        }
    }

    pub fn mount(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .unwrap();
        let mut opts = Vec::new();
        if self.own_cache {
            opts.push(format!("cache_dir={}", self.cache.display()));
        }
        if !self.options.is_empty() {
            opts.push(self.options.clone());
        }
        let mut cmd = Command::new(NASSYNC);
        let source = self.source.clone().unwrap_or_else(|| source_of(&self.nas));
        cmd.arg("mount").arg(source).arg(&self.mnt);
        if !opts.is_empty() {
            cmd.arg("-o").arg(opts.join(","));
        }
        if let Some(n) = self.nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit and prctl are async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    let l = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // Without CAP_SYS_RESOURCE, root cannot raise it again.
                    const CAP_SYS_RESOURCE: libc::c_ulong = 24;
                    if libc::prctl(libc::PR_CAPBSET_DROP, CAP_SYS_RESOURCE, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .arg("--foreground")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_mounted(&self.mnt, true, Some(&mut child));
        self.child = Some(child);
    }

    /// Unmounts and waits for the daemon to exit.
    pub fn unmount(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // EBUSY while another process is still walking a path through the
        // mount (a `nassync flush` starting up): try again for a while.
        let busy_until = Instant::now() + Duration::from_secs(10);
        while is_mounted(&self.mnt) {
            match nix::mount::umount2(&self.mnt, nix::mount::MntFlags::empty()) {
                Err(nix::errno::Errno::EBUSY) if Instant::now() < busy_until => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => break,
            }
        }
        // Write-back may flush for up to unmount_flush_timeout (30 s).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.last_exit = Some(status);
                    break;
                }
                _ if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        if is_mounted(&self.mnt) {
            detach(&self.mnt);
        }
    }

    pub fn remount(&mut self) {
        self.unmount();
        self.mount();
    }

    /// Kills the daemon with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.child = None;
        detach(&self.mnt);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn m(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn n(&self, rel: &str) -> PathBuf {
        self.nas.join(rel)
    }

    /// The daemon's counters, from `nassync stats`.
    pub fn stats(&self) -> HashMap<String, u64> {
        let out = Command::new(NASSYNC)
            .arg("stats")
            .arg(&self.mnt)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    /// `nassync flush [PATH]` (the whole mount without a path); panics
    /// if it fails.
    pub fn flush(&self, path: Option<&Path>) {
        let out = Command::new(NASSYNC)
            .arg("flush")
            .arg(path.unwrap_or(&self.mnt))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nassync flush: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// `nassync status`.
    pub fn status(&self) -> String {
        let out = Command::new(NASSYNC)
            .arg("status")
            .arg(&self.mnt)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until `nassync status` shows the line `want`; panics after
    /// `within`.
    pub fn wait_status(&self, want: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let s = self.status();
            if s.lines().any(|l| l == want) {
                return;
            }
            assert!(Instant::now() < deadline, "no {want:?} in status:\n{s}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A number from `nassync status`.
    pub fn status_value(&self, key: &str) -> u64 {
        self.status()
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in status"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Detaches whatever is mounted at `path` with the system call itself:
/// umount(8) would run the installed umount.fuse.nassync helper.
pub fn detach(path: &Path) {
    let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
}

/// The errno of an io result, or 0.
pub fn errno<T>(r: &std::io::Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

/// setxattr of `p`: Ok, or the errno.
pub fn xset(p: &Path, name: &str, value: &[u8], flags: i32) -> Result<(), i32> {
    let (cp, cn) = (cstr(p), std::ffi::CString::new(name).unwrap());
    // SAFETY: valid C strings and buffer.
    let r = unsafe {
        libc::setxattr(
            cp.as_ptr(),
            cn.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    };
    if r == 0 { Ok(()) } else { Err(last_errno()) }
}

/// getxattr of `p`: the value, or the errno.
pub fn xget(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let (cp, cn) = (cstr(p), std::ffi::CString::new(name).unwrap());
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C strings and buffer.
    let n = unsafe { libc::getxattr(cp.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(last_errno());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// removexattr of `p`: Ok, or the errno.
pub fn xremove(p: &Path, name: &str) -> Result<(), i32> {
    let (cp, cn) = (cstr(p), std::ffi::CString::new(name).unwrap());
    // SAFETY: valid C strings.
    let r = unsafe { libc::removexattr(cp.as_ptr(), cn.as_ptr()) };
    if r == 0 { Ok(()) } else { Err(last_errno()) }
}

/// The user.* names of `p`'s xattrs, sorted.
pub fn xlist(p: &Path) -> Vec<String> {
    let cp = cstr(p);
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C string and buffer.
    let n = unsafe { libc::listxattr(cp.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "listxattr {}: {}", p.display(), last_errno());
    let mut names: Vec<String> = buf[..n as usize]
        .split(|b| *b == 0)
        .filter(|s| s.starts_with(b"user."))
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    names.sort();
    names
}

fn cstr(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(p.as_os_str())).unwrap()
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A small tmpfs (standing in for a full NAS, or a filesystem mounted
/// inside the share); unmounted when dropped.
pub struct SmallFs(pub std::path::PathBuf);

impl SmallFs {
    pub fn mount(at: &Path, size: &str) -> SmallFs {
        nix::mount::mount(
            Some("tmpfs"),
            at,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size}").as_str()),
        )
        .expect("mount a tmpfs for the NAS");
        SmallFs(at.to_path_buf())
    }

    pub fn resize(&self, size: &str) {
        nix::mount::mount(
            None::<&str>,
            &self.0,
            None::<&str>,
            nix::mount::MsFlags::MS_REMOUNT,
            Some(format!("size={size}").as_str()),
        )
        .expect("resize the tmpfs");
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}
