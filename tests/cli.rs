//! The command line: detached mounting, unmounting, stats, and bad input,
//! each of which must give a clear error and a non-zero exit, and leave
//! nothing mounted.

mod common;

use std::fs;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Output};

use common::{Mount, NASSYNC, is_mounted, require_fuse};

fn nassync(args: &[&str]) -> Output {
    Command::new(NASSYNC).args(args).output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

struct Dirs {
    _t: tempfile::TempDir,
    nas: std::path::PathBuf,
    mnt: std::path::PathBuf,
    cache: std::path::PathBuf,
}

fn dirs() -> Dirs {
    require_fuse();
    let t = tempfile::tempdir().unwrap();
    let nas = t.path().join("nas");
    let mnt = t.path().join("mnt");
    fs::create_dir(&nas).unwrap();
    fs::create_dir(&mnt).unwrap();
    let cache = t.path().join("cache");
    Dirs {
        _t: t,
        nas,
        mnt,
        cache,
    }
}

#[test]
fn detached_mount_is_ready_when_it_returns_and_umount_waits_for_the_daemon() {
    let d = dirs();
    fs::write(d.nas.join("hello"), "world").unwrap();
    let out = nassync(&[
        "mount",
        s(&d.nas),
        s(&d.mnt),
        "-o",
        &format!("cache_dir={}", s(&d.cache)),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Ready on return: no waiting.
    let ok = is_mounted(&d.mnt)
        && fs::read_to_string(d.mnt.join("hello")).ok().as_deref() == Some("world");
    let stats = nassync(&["stats", s(&d.mnt)]);
    let umount = nassync(&["umount", s(&d.mnt)]);
    if !umount.status.success() {
        common::detach(&d.mnt);
    }
    assert!(ok, "mounted and readable when `nassync mount` returned");
    assert!(stats.status.success());
    let text = String::from_utf8_lossy(&stats.stdout);
    assert!(text.contains("nas_bytes_read 5"), "{text}");
    assert!(
        umount.status.success(),
        "{}",
        String::from_utf8_lossy(&umount.stderr)
    );
    assert!(!is_mounted(&d.mnt));
}

fn assert_refused(args: &[&str], status: i32, needle: &str, mnt: &Path) {
    let out = nassync(args);
    let err = String::from_utf8_lossy(&out.stderr);
    let mounted = is_mounted(mnt);
    if mounted {
        common::detach(mnt);
    }
    assert_eq!(out.status.code(), Some(status), "{args:?}: {err}");
    assert!(
        err.contains(needle),
        "{args:?}: message {err:?} lacks {needle:?}"
    );
    assert!(!mounted, "{args:?} left a mount behind");
}

#[test]
fn bad_input_is_refused_with_a_clear_error_and_nothing_mounted() {
    let d = dirs();
    let cache = format!("cache_dir={}", s(&d.cache));
    let missing = d.nas.join("missing");
    let file = d.nas.join("file");
    fs::write(&file, "x").unwrap();
    let (nas, mnt) = (s(&d.nas), s(&d.mnt));
    // (arguments, exit status, what the message must name)
    let cases: [(&[&str], i32, &str); 8] = [
        (
            &["mount", s(&missing), mnt, "-o", &cache],
            32,
            "No such file",
        ),
        (
            &["mount", s(&file), mnt, "-o", &cache],
            32,
            "not a directory",
        ),
        (
            &["mount", nas, s(&missing), "-o", &cache],
            32,
            "No such file",
        ),
        (
            &["mount", nas, s(&file), "-o", &cache],
            32,
            "not a directory",
        ),
        (&["mount", nas, mnt, "-o", "frobnicate"], 1, "'frobnicate'"),
        (
            &["mount", nas, mnt, "-o", "cache_size=huge"],
            1,
            "cache_size=huge",
        ),
        (
            &["mount", nas, mnt, "-o", "block_size=1000"],
            1,
            "power of two",
        ),
        (&["mount", nas, mnt, "-o", "actimeo=-1"], 1, "actimeo=-1"),
    ];
    for (args, status, needle) in cases {
        assert_refused(args, status, needle, &d.mnt);
    }
    // A cache directory that cannot be written (a file stands in its way).
    let blocker = d.nas.join("blocker");
    fs::write(&blocker, "").unwrap();
    let bad_cache = format!("cache_dir={}/sub", s(&blocker));
    assert_refused(
        &["mount", nas, mnt, "-o", &bad_cache],
        32,
        "cache directory",
        &d.mnt,
    );
    assert_refused(
        &["mount", nas, mnt, "-o", &bad_cache, "--foreground"],
        32,
        "cache directory",
        &d.mnt,
    );
    // Nothing was created for the refused options.
    assert!(
        !d.cache.exists(),
        "bad input must not create the cache directory"
    );
}

#[test]
fn an_already_mounted_mount_point_is_refused() {
    let m = Mount::new("");
    let other = tempfile::tempdir().unwrap();
    let out = nassync(&[
        "mount",
        s(other.path()),
        s(&m.mnt),
        "-o",
        &format!("cache_dir={}", s(&other.path().join("c"))),
    ]);
    assert_eq!(out.status.code(), Some(32));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already mounted"));
    // The first mount is untouched.
    fs::write(m.n("still"), "here").unwrap();
    assert_eq!(fs::read_to_string(m.m("still")).unwrap(), "here");
}

#[test]
fn a_stale_mount_left_by_a_killed_daemon_is_explained_and_can_be_cleaned() {
    let d = dirs();
    let cache = format!("cache_dir={}", s(&d.cache));
    let out = nassync(&["mount", s(&d.nas), s(&d.mnt), "-o", &cache]);
    assert!(out.status.success());
    // Kill the daemon: the mount stays, answering ENOTCONN.
    let stats = String::from_utf8_lossy(&nassync(&["stats", s(&d.mnt)]).stdout).into_owned();
    let pid: i32 = stats
        .lines()
        .find_map(|l| l.strip_prefix("pid "))
        .unwrap()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    while Path::new(&format!("/proc/{pid}")).exists() {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let again = nassync(&["mount", s(&d.nas), s(&d.mnt), "-o", &cache]);
    let err = String::from_utf8_lossy(&again.stderr).into_owned();
    let cleaned = nassync(&["umount", s(&d.mnt)]);
    if is_mounted(&d.mnt) {
        common::detach(&d.mnt);
    }
    assert_eq!(again.status.code(), Some(32), "{err}");
    assert!(err.contains("nassync umount"), "{err}");
    assert!(
        cleaned.status.success(),
        "{}",
        String::from_utf8_lossy(&cleaned.stderr)
    );
    // And then it mounts again.
    let out = nassync(&["mount", s(&d.nas), s(&d.mnt), "-o", &cache]);
    let ok = out.status.success();
    let _ = nassync(&["umount", s(&d.mnt)]);
    assert!(ok, "{}", String::from_utf8_lossy(&out.stderr));
}

/// The cache directory `nassync stats` names for the mount at `mnt`.
fn cache_dir_of(mnt: &Path) -> Option<std::path::PathBuf> {
    let out = nassync(&["stats", s(mnt)]);
    let found = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("cache_dir ").map(Into::into));
    if found.is_none() {
        // Seen once under load in the whole suite: say what stats said.
        eprintln!(
            "nassync stats {}: {}\nstdout: {}\nstderr: {}",
            mnt.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    found
}

/// Removes directories when dropped (declared before the mounts that use
/// them, so it runs after they are unmounted).
struct RemoveOnDrop(Vec<std::path::PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = fs::remove_dir_all(d);
        }
    }
}

#[test]
fn the_same_source_mounts_twice_without_cache_dir() {
    require_fuse();
    let nas = tempfile::tempdir().unwrap();
    // The cache directories nassync may choose for this source (root:
    // under /var/cache/nassync), removed at the end.
    let elsewhere = tempfile::tempdir().unwrap();
    let dirs = nassync::mount::plan(nas.path(), elsewhere.path(), &[], false)
        .unwrap()
        .cache_dirs();
    let _cleanup = RemoveOnDrop(dirs.clone());
    let a = Mount::of_source(nas.path(), "", false);
    let mut b = Mount::of_source(nas.path(), "", false);
    // Two clients of the NAS: what one writes, the other sees once it
    // has reached the NAS.
    fs::write(a.m("f"), "through a").unwrap();
    a.flush(None);
    assert_eq!(fs::read_to_string(b.m("f")).unwrap(), "through a");
    fs::write(b.m("g"), "through b").unwrap();
    b.flush(None);
    assert_eq!(fs::read_to_string(a.m("g")).unwrap(), "through b");
    // The second daemon took the next directory, and said so.
    assert_eq!(cache_dir_of(&a.mnt).as_ref(), Some(&dirs[0]));
    assert_eq!(cache_dir_of(&b.mnt).as_ref(), Some(&dirs[1]));
    assert!(
        b.log().contains("in use by another nassync daemon"),
        "{}",
        b.log()
    );
    // Both unmount cleanly, each waiting for its own daemon.
    for m in [&a.mnt, &b.mnt] {
        let out = nassync(&["umount", s(m)]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!is_mounted(m));
    }
    b.unmount();
    // The source's own directory is free again for the next mount.
    let c = Mount::of_source(nas.path(), "", false);
    assert_eq!(cache_dir_of(&c.mnt).as_ref(), Some(&dirs[0]));
}

#[test]
fn a_cache_dir_given_twice_for_one_source_is_refused() {
    let m = Mount::new("");
    let mnt2 = m.dir.path().join("mnt2");
    fs::create_dir(&mnt2).unwrap();
    let cache = format!("cache_dir={}", s(&m.cache));
    assert_refused(
        &["mount", s(&m.nas), s(&mnt2), "-o", &cache],
        32,
        "in use by another nassync daemon",
        &mnt2,
    );
    assert_refused(
        &["mount", s(&m.nas), s(&mnt2), "-o", &cache, "--foreground"],
        32,
        "cache_dir=",
        &mnt2,
    );
    // The first mount is untouched.
    fs::write(m.n("still"), "here").unwrap();
    assert_eq!(fs::read_to_string(m.m("still")).unwrap(), "here");
}

#[test]
fn sigterm_unmounts_cleanly() {
    let mut m = Mount::new("");
    fs::write(m.m("f"), "x").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(m.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    common::wait_mounted(&m.mnt, false, None);
    m.unmount();
}

#[test]
fn help_lists_the_subcommands() {
    let out = nassync(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for sub in ["mount", "umount", "stats"] {
        assert!(text.contains(sub), "{text}");
    }
    assert!(nassync(&["--version"]).status.success());
}

/// umount(8) with this build's nassync behind the helper; a mount it
/// leaves behind is detached so that the test can fail cleanly.
fn umount8(mnt: &Path) -> Output {
    let out = Command::new("umount")
        .arg(mnt)
        .env("NASSYNC_BIN", NASSYNC)
        .output()
        .unwrap();
    if is_mounted(mnt) {
        common::detach(mnt);
    }
    out
}

/// Installs this build's helper where mount(8) looks for it; it runs this
/// build's nassync through NASSYNC_BIN.
fn install_helper() {
    let helper = Path::new(NASSYNC)
        .parent()
        .unwrap()
        .join("mount-fuse-nassync");
    assert!(helper.exists(), "build the workspace first: {helper:?}");
    // Once per test process: tests run in parallel and use the helpers.
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let tmp = Path::new("/sbin/.mount.fuse.nassync.tmp");
        fs::copy(&helper, tmp).unwrap();
        fs::rename(tmp, "/sbin/mount.fuse.nassync").unwrap();
        let link = Path::new("/sbin/umount.fuse.nassync");
        if fs::read_link(link).ok().as_deref() != Some(Path::new("mount.fuse.nassync")) {
            let _ = fs::remove_file(link);
            std::os::unix::fs::symlink("mount.fuse.nassync", link).unwrap();
        }
    });
}

#[test]
fn mount_dash_t_goes_through_the_helper() {
    let d = dirs();
    install_helper();
    fs::write(d.nas.join("f"), "via mount(8)").unwrap();
    let opts = format!(
        "cache_dir={},_netdev,x-systemd.automount,nofail",
        s(&d.cache)
    );
    let out = Command::new("mount")
        .args(["-t", "fuse.nassync", s(&d.nas), s(&d.mnt), "-o", &opts])
        .env("NASSYNC_BIN", NASSYNC)
        .output()
        .unwrap();
    let read = fs::read_to_string(d.mnt.join("f")).ok();
    let written = fs::write(d.mnt.join("g"), "back").is_ok();
    let umount = umount8(&d.mnt);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(read.as_deref(), Some("via mount(8)"));
    assert!(written && fs::read_to_string(d.nas.join("g")).unwrap() == "back");
    assert!(
        umount.status.success(),
        "{}",
        String::from_utf8_lossy(&umount.stderr)
    );
    // A bad option through mount(8): refused, mount's usage status.
    let out = Command::new("mount")
        .args([
            "-t",
            "fuse.nassync",
            s(&d.nas),
            s(&d.mnt),
            "-o",
            "bogus_option",
        ])
        .env("NASSYNC_BIN", NASSYNC)
        .output()
        .unwrap();
    assert!(!is_mounted(&d.mnt));
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus_option"));
}

#[test]
fn an_fstab_line_mounts_with_mount_dash_capital_t() {
    let d = dirs();
    install_helper();
    fs::write(d.nas.join("f"), "from fstab").unwrap();
    let fstab = d.nas.parent().unwrap().join("fstab");
    fs::write(
        &fstab,
        format!(
            "# a NAS share\n{} {} fuse.nassync _netdev,x-systemd.automount,x-systemd.requires-mounts-for={},cache_size=1G,actimeo=5,cache_dir={} 0 0\n",
            s(&d.nas),
            s(&d.mnt),
            s(&d.nas),
            s(&d.cache)
        ),
    )
    .unwrap();
    let out = Command::new("mount")
        .arg("-T")
        .arg(&fstab)
        .arg(&d.mnt)
        .env("NASSYNC_BIN", NASSYNC)
        .output()
        .unwrap();
    let read = fs::read_to_string(d.mnt.join("f")).ok();
    let pid = daemon_pid(&d.mnt);
    // umount(8) runs umount.fuse.nassync, which returns once the daemon
    // has exited: what is mounted under it can be stopped next.
    let umount = umount8(&d.mnt);
    let daemon_gone = exited(pid);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(read.as_deref(), Some("from fstab"));
    assert!(
        umount.status.success(),
        "{}",
        String::from_utf8_lossy(&umount.stderr)
    );
    assert!(
        daemon_gone,
        "umount returned before the daemon exited (pid {pid:?})"
    );
}

/// Whether the daemon `pid` has exited (or is a zombie, waiting for its
/// parent to collect it).
fn exited(pid: Option<u32>) -> bool {
    pid.is_some_and(|p| {
        std::fs::read_to_string(format!("/proc/{p}/stat")).map_or(true, |st| {
            st.rsplit_once(") ")
                .is_some_and(|(_, r)| r.starts_with('Z'))
        })
    })
}

/// umount(8) decides on a helper from the mount's utab entry, which mount(8)
/// writes only for options such as _netdev: nassync writes one itself, so
/// that a plain `umount` waits for what is pending, new files and
/// directories included, whether mounted with mount(8) or `nassync mount`.
#[test]
fn plain_umount_waits_until_new_files_and_directories_are_on_the_nas() {
    install_helper();
    for via_mount8 in [true, false] {
        let d = dirs();
        // Long enough that nothing goes to the NAS before the unmount.
        let opts = format!("cache_dir={},writeback_delay=1h", s(&d.cache));
        let out = if via_mount8 {
            Command::new("mount")
                .args(["-t", "fuse.nassync", s(&d.nas), s(&d.mnt), "-o", &opts])
                .env("NASSYNC_BIN", NASSYNC)
                .output()
                .unwrap()
        } else {
            nassync(&["mount", s(&d.nas), s(&d.mnt), "-o", &opts])
        };
        let wrote = fs::create_dir(d.mnt.join("dir")).is_ok()
            && fs::write(d.mnt.join("dir/new"), "written through the mount").is_ok()
            && fs::write(d.mnt.join("top"), "top").is_ok();
        let before = d.nas.join("top").exists();
        let pid = daemon_pid(&d.mnt);
        let umount = umount8(&d.mnt);
        let daemon_gone = exited(pid);
        let utab = fs::read_to_string("/run/mount/utab").unwrap_or_default();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(wrote && !before, "via mount(8): {via_mount8}");
        assert!(
            umount.status.success(),
            "{}",
            String::from_utf8_lossy(&umount.stderr)
        );
        assert!(daemon_gone, "umount returned before the daemon exited");
        assert_eq!(
            fs::read_to_string(d.nas.join("dir/new")).ok().as_deref(),
            Some("written through the mount"),
            "via mount(8): {via_mount8}"
        );
        assert_eq!(fs::read_to_string(d.nas.join("top")).unwrap(), "top");
        assert!(
            !utab.contains(&format!("TARGET={} ", s(&d.mnt))),
            "a stale utab entry is left: {utab}"
        );
    }
}

#[test]
fn uid_gid_and_umask_change_what_is_shown_not_the_nas() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let m = Mount::new("uid=1234,gid=5678,umask=027");
    fs::write(m.n("f"), "x").unwrap();
    fs::set_permissions(m.n("f"), fs::Permissions::from_mode(0o666)).unwrap();
    fs::create_dir(m.n("d")).unwrap();
    fs::set_permissions(m.n("d"), fs::Permissions::from_mode(0o777)).unwrap();
    let f = fs::metadata(m.m("f")).unwrap();
    assert_eq!((f.uid(), f.gid(), f.mode() & 0o7777), (1234, 5678, 0o640));
    let d = fs::metadata(m.m("d")).unwrap();
    assert_eq!((d.uid(), d.gid(), d.mode() & 0o7777), (1234, 5678, 0o750));
    let n = fs::metadata(m.n("f")).unwrap();
    assert_eq!(
        (n.uid(), n.mode() & 0o7777),
        (0, 0o666),
        "the NAS keeps its own"
    );
    // The kernel checks the shown owner: uid 1234 may write, others not.
    let run = |uid: u32| {
        use std::os::unix::process::CommandExt;
        Command::new("sh")
            .arg("-c")
            .arg(format!("echo hi > {}", m.m("f").display()))
            .uid(uid)
            .gid(uid)
            .status()
            .unwrap()
            .success()
    };
    assert!(run(1234));
    assert!(!run(4321));
}

#[test]
fn mounting_over_a_systemd_style_autofs_placeholder_works() {
    use std::os::fd::AsRawFd;
    let filesystems = fs::read_to_string("/proc/filesystems").unwrap();
    if !filesystems.split_whitespace().any(|f| f == "autofs") {
        // Built without autofs (some container kernels): there is no
        // placeholder to mount over, so nothing here could go wrong.
        eprintln!("SKIPPED: this kernel has no autofs");
        return;
    }
    let d = dirs();
    fs::write(d.nas.join("f"), "behind autofs").unwrap();
    // An autofs direct mount like systemd's, owned by a process group that
    // never answers: if nassync triggered it, it would hang (the child is
    // killed after 20 s and the test fails).
    let mut owner = Command::new("sleep")
        .arg("120")
        .process_group(0)
        .spawn()
        .unwrap();
    let (_rd, wr) = nix::unistd::pipe().unwrap();
    let data = format!(
        "fd={},pgrp={},minproto=5,maxproto=5,direct",
        wr.as_raw_fd(),
        owner.id()
    );
    nix::mount::mount(
        Some("systemd-1"),
        &d.mnt,
        Some("autofs"),
        nix::mount::MsFlags::empty(),
        Some(data.as_str()),
    )
    .unwrap();
    let mut child = Command::new(NASSYNC)
        .args([
            "mount",
            s(&d.nas),
            s(&d.mnt),
            "-o",
            &format!("cache_dir={}", s(&d.cache)),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let top = nassync::mountinfo::mounted_at(&d.mnt);
    let on_top = top.as_ref().is_some_and(|m| m.fstype == "fuse.nassync");
    // Only look inside if nassync is on top: the placeholder would hang.
    let read = on_top
        .then(|| fs::read_to_string(d.mnt.join("f")).ok())
        .flatten();
    let unmounted = on_top && nassync(&["umount", s(&d.mnt)]).status.success();
    // What remains is systemd's placeholder, untouched by the daemon's exit.
    let after = nassync::mountinfo::mounted_at(&d.mnt).map(|m| m.fstype);
    if nassync::mountinfo::mounted_at(&d.mnt).is_some_and(|m| m.fstype != "autofs") {
        let _ = nix::mount::umount2(&d.mnt, nix::mount::MntFlags::MNT_DETACH); // nassync
    }
    let _ = nix::mount::umount2(&d.mnt, nix::mount::MntFlags::MNT_DETACH); // autofs
    let _ = owner.kill();
    let _ = owner.wait();
    let status = status.expect("nassync mount hung on the autofs placeholder");
    assert!(status.success(), "refused to mount over autofs");
    assert!(on_top, "nassync is not on top: {top:?}");
    assert_eq!(read.as_deref(), Some("behind autofs"));
    assert!(unmounted);
    assert_eq!(
        after.as_deref(),
        Some("autofs"),
        "the placeholder must survive nassync's unmount"
    );
}

fn daemon_pid(mnt: &Path) -> Option<u32> {
    let out = nassync(&["stats", s(mnt)]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("pid ").and_then(|p| p.parse().ok()))
}

/// Makes /dev/fuse usable by every user (as Debian's udev rule does) for
/// the life of the guard, then restores its mode.
struct FuseForUsers(u32);

impl FuseForUsers {
    fn new() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata("/dev/fuse").unwrap().permissions().mode();
        fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(0o666)).unwrap();
        FuseForUsers(mode)
    }
}

impl Drop for FuseForUsers {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(self.0 & 0o7777));
    }
}

#[test]
fn a_user_mounts_through_fusermount3() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let d = dirs();
    let _fuse = FuseForUsers::new();
    let home = d.nas.parent().unwrap().to_path_buf();
    for p in [&home, &d.nas, &d.mnt] {
        fs::set_permissions(p, fs::Permissions::from_mode(0o777)).unwrap();
    }
    fs::write(d.nas.join("f"), "user mount").unwrap();
    // fusermount3 wants a user with a name: nobody.
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let as_user = |args: &[&str]| {
        Command::new(NASSYNC)
            .args(args)
            .env("HOME", &home)
            .env_remove("XDG_RUNTIME_DIR")
            .uid(nobody.uid.as_raw())
            .gid(nobody.gid.as_raw())
            .output()
            .unwrap()
    };
    let out = as_user(&["mount", s(&d.nas), s(&d.mnt)]);
    let read = fs::read_to_string(d.mnt.join("f")).ok();
    let stats = as_user(&["stats", s(&d.mnt)]);
    let umount = as_user(&["umount", s(&d.mnt)]);
    if is_mounted(&d.mnt) {
        common::detach(&d.mnt);
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without allow_other (off for users), even root is kept out; the
    // user reads it through stats instead.
    assert_eq!(
        read, None,
        "root must not see into a user's mount without allow_root"
    );
    assert!(String::from_utf8_lossy(&stats.stdout).contains("source "));
    assert!(
        umount.status.success(),
        "{}",
        String::from_utf8_lossy(&umount.stderr)
    );
    // The user's cache is under the user's home, private.
    let cache = home.join(".cache/nassync");
    assert_eq!(
        fs::metadata(&cache).unwrap().permissions().mode() & 0o777,
        0o700
    );
    // allow_other without user_allow_other: refused, and the message says why.
    let conf = fs::read_to_string("/etc/fuse.conf").unwrap_or_default();
    if !conf.lines().any(|l| l.trim() == "user_allow_other") {
        let out = as_user(&["mount", s(&d.nas), s(&d.mnt), "-o", "allow_other"]);
        if is_mounted(&d.mnt) {
            common::detach(&d.mnt);
        }
        assert_eq!(out.status.code(), Some(32));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("user_allow_other"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn standard_options_reach_the_kernel() {
    let m = Mount::new("ro,noexec,nosuid,nodev,noatime,fsname=mynas");
    fs::write(m.n("f"), "x").unwrap();
    assert_eq!(fs::read_to_string(m.m("f")).unwrap(), "x");
    assert_eq!(common::errno(&fs::write(m.m("g"), "y")), libc::EROFS);
    let line = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(s(&m.mnt)))
        .unwrap()
        .to_string();
    for flag in ["ro", "noexec", "nosuid", "nodev", "noatime"] {
        assert!(
            line.split([' ', ',']).any(|w| w == flag),
            "{flag} missing: {line}"
        );
    }
    assert!(line.contains(" fuse.nassync mynas "), "{line}");
}

#[test]
fn under_systemd_the_daemon_logs_to_the_journal_stream() {
    use std::os::unix::fs::MetadataExt;
    let d = dirs();
    // Stand-in for the journal's socket: a file whose dev:ino is announced
    // in JOURNAL_STREAM, as systemd does for the commands it runs.
    let journal = d.nas.parent().unwrap().join("journal");
    let f = fs::File::create(&journal).unwrap();
    let meta = f.metadata().unwrap();
    let status = Command::new(NASSYNC)
        .args([
            "mount",
            s(&d.nas),
            s(&d.mnt),
            "-o",
            &format!("cache_dir={},log_level=info", s(&d.cache)),
        ])
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(f)
        .status()
        .unwrap();
    let umount = nassync(&["umount", s(&d.mnt)]);
    if is_mounted(&d.mnt) {
        common::detach(&d.mnt);
    }
    assert!(status.success());
    assert!(umount.status.success());
    let logged = fs::read_to_string(&journal).unwrap();
    assert!(
        logged.contains("serving"),
        "the daemon's log went elsewhere: {logged:?}"
    );
}

/// `nassync status | head -1`: a reader that stops reading ends the
/// command quietly, without a panic message.
#[test]
fn status_into_a_closed_pipe_exits_quietly() {
    let m = Mount::new("");
    let (r, w) = nix::unistd::pipe().unwrap();
    drop(r); // closed before anything is written: the write fails (EPIPE)
    let out = Command::new(NASSYNC)
        .arg("status")
        .arg(&m.mnt)
        .stdout(std::process::Stdio::from(w))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status);
    assert!(err.is_empty(), "{err}");
}
