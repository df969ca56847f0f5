//! POSIX behaviour through a real mount: every scenario runs on a plain
//! directory and on a nassync mount, and the two logs of results (contents,
//! sizes, modes, link counts, errno) must be equal.

mod common;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;

use common::{Mount, errno};

type Log = Vec<String>;

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn ret(r: libc::c_int) -> String {
    if r < 0 {
        format!(
            "errno {}",
            std::io::Error::last_os_error().raw_os_error().unwrap()
        )
    } else {
        "ok".into()
    }
}

fn res<T>(r: std::io::Result<T>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => format!("errno {}", e.raw_os_error().unwrap_or(-1)),
    }
}

fn st(p: &Path) -> String {
    match fs::symlink_metadata(p) {
        Ok(m) => format!(
            "mode={:o} size={} nlink={} uid={} gid={}",
            m.mode(),
            m.size(),
            m.nlink(),
            m.uid(),
            m.gid()
        ),
        Err(e) => format!("errno {}", e.raw_os_error().unwrap_or(-1)),
    }
}

fn read(p: &Path) -> String {
    match fs::read(p) {
        Ok(d) if d.len() > 64 => format!(
            "{} bytes, sum {}",
            d.len(),
            d.iter().map(|b| *b as u64).sum::<u64>()
        ),
        Ok(d) => format!("{:?}", String::from_utf8_lossy(&d)),
        Err(e) => format!("errno {}", e.raw_os_error().unwrap_or(-1)),
    }
}

fn list(p: &Path) -> String {
    match fs::read_dir(p) {
        Ok(it) => {
            let mut v: Vec<String> = it
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v.join(",")
        }
        Err(e) => format!("errno {}", e.raw_os_error().unwrap_or(-1)),
    }
}

fn rename2(a: &Path, b: &Path, flags: u32) -> String {
    // SAFETY: valid C strings.
    ret(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c(a).as_ptr(),
            libc::AT_FDCWD,
            c(b).as_ptr(),
            flags,
        )
    })
}

/// Runs `scenario` on a plain directory and on a mount; the logs must match.
fn compare(options: &str, scenario: fn(&Path, &mut Log)) -> Mount {
    let plain = tempfile::tempdir().unwrap();
    let mut expected = Log::new();
    scenario(plain.path(), &mut expected);
    let m = Mount::new(options);
    let mut got = Log::new();
    scenario(&m.mnt, &mut got);
    assert!(
        common::is_mounted(&m.mnt),
        "the scenario must have run on the mount"
    );
    for (i, (e, g)) in expected.iter().zip(got.iter()).enumerate() {
        assert_eq!(
            e,
            g,
            "step {i} differs (plain dir vs mount)\nlog: {got:#?}\n{}",
            m.log()
        );
    }
    assert_eq!(expected.len(), got.len());
    m
}

fn files(r: &Path, log: &mut Log) {
    let a = r.join("a");
    log.push(res(fs::write(&a, b"hello world")));
    log.push(read(&a));
    log.push(st(&a));
    // O_EXCL on an existing name.
    log.push(res(OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&a)));
    // O_APPEND.
    let mut f = OpenOptions::new().append(true).open(&a).unwrap();
    f.write_all(b"!!").unwrap();
    drop(f);
    log.push(read(&a));
    // O_TRUNC.
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&a)
        .unwrap();
    f.write_all(b"new").unwrap();
    drop(f);
    log.push(read(&a));
    // Overwrite in the middle, read back through the same descriptor.
    let mut f = OpenOptions::new().read(true).write(true).open(&a).unwrap();
    f.write_all_at(b"XY", 1).unwrap();
    let mut s = String::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_string(&mut s).unwrap();
    log.push(s);
    // Truncate up and down.
    f.set_len(10).unwrap();
    log.push(read(&a));
    f.set_len(2).unwrap();
    log.push(read(&a));
    drop(f);
    // Sparse file past 4 GiB.
    let big = r.join("big");
    let f = File::create(&big).unwrap();
    f.write_all_at(b"end", (5u64 << 30) - 3).unwrap();
    f.write_all_at(b"mid", 1 << 32).unwrap();
    drop(f);
    log.push(st(&big));
    let f = File::open(&big).unwrap();
    let mut buf = [0u8; 6];
    f.read_exact_at(&mut buf, (1 << 32) - 3).unwrap();
    log.push(format!("{buf:?}"));
    f.read_exact_at(&mut buf[..3], (5u64 << 30) - 3).unwrap();
    log.push(format!("{buf:?}"));
    let n = f.read_at(&mut buf, 5u64 << 30).unwrap();
    log.push(format!("read at eof: {n}"));
    drop(f);
    log.push(res(fs::remove_file(&big)));
    // fallocate mode 0 extends with zeros.
    let f = OpenOptions::new().read(true).write(true).open(&a).unwrap();
    // SAFETY: plain syscall.
    log.push(ret(unsafe {
        libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, 4096)
    }));
    log.push(st(&a));
    log.push(res(f.sync_all()));
    log.push(res(f.sync_data()));
    drop(f);
    log.push(read(&a));
    // Errors on names.
    log.push(res(fs::read(r.join("missing"))));
    log.push(res(fs::remove_file(r.join("missing"))));
    log.push(res(File::open(r.join("a/b"))));
    log.push(res(File::create(r.join("n".repeat(256)))));
}

#[test]
fn file_operations_match_a_plain_directory() {
    compare("", files);
}

fn dirs(r: &Path, log: &mut Log) {
    let d = r.join("d");
    log.push(res(fs::create_dir(&d)));
    log.push(res(fs::create_dir(&d)));
    log.push(st(&d));
    for i in 0..50 {
        log.push(res(fs::write(d.join(format!("f{i:02}")), format!("{i}"))));
    }
    log.push(list(&d));
    log.push(res(fs::remove_dir(&d)));
    log.push(res(fs::create_dir_all(d.join("sub/deeper"))));
    log.push(st(&d));
    log.push(res(fs::remove_dir(d.join("sub"))));
    log.push(res(fs::remove_dir(d.join("sub/deeper"))));
    log.push(res(fs::remove_dir(d.join("sub"))));
    log.push(res(fs::remove_dir(d.join("f00"))));
    log.push(res(fs::remove_file(&d)));
    for i in 0..50 {
        fs::remove_file(d.join(format!("f{i:02}"))).unwrap();
    }
    log.push(list(&d));
    log.push(res(fs::remove_dir(&d)));
    log.push(list(r));
    // A FIFO.
    let p = r.join("fifo");
    // SAFETY: valid C string.
    log.push(ret(unsafe { libc::mkfifo(c(&p).as_ptr(), 0o640) }));
    log.push(st(&p));
    log.push(res(fs::remove_file(&p)));
}

#[test]
fn directory_operations_match_a_plain_directory() {
    compare("", dirs);
}

fn renames(r: &Path, log: &mut Log) {
    fs::write(r.join("a"), "A").unwrap();
    fs::write(r.join("b"), "B").unwrap();
    fs::create_dir(r.join("d")).unwrap();
    fs::create_dir(r.join("e")).unwrap();
    fs::write(r.join("e/x"), "x").unwrap();
    // Over a file.
    log.push(res(fs::rename(r.join("a"), r.join("b"))));
    log.push(read(&r.join("b")));
    log.push(st(&r.join("a")));
    // NOREPLACE.
    fs::write(r.join("a"), "A2").unwrap();
    log.push(rename2(&r.join("a"), &r.join("b"), libc::RENAME_NOREPLACE));
    // EXCHANGE (NFSv3 has none: see nfs_sources_refuse_what_nfsv3_lacks).
    if !common::over_nfs() {
        log.push(rename2(&r.join("a"), &r.join("b"), libc::RENAME_EXCHANGE));
        log.push(read(&r.join("a")));
        log.push(read(&r.join("b")));
        log.push(rename2(&r.join("a"), &r.join("d"), libc::RENAME_EXCHANGE));
        log.push(st(&r.join("a")));
        log.push(st(&r.join("d")));
        log.push(rename2(&r.join("a"), &r.join("d"), libc::RENAME_EXCHANGE));
    } else {
        fs::rename(r.join("a"), r.join("x0")).unwrap();
        fs::rename(r.join("b"), r.join("a")).unwrap();
        fs::rename(r.join("x0"), r.join("b")).unwrap();
    }
    // Directory over an empty directory, over a non-empty one, over a file.
    fs::create_dir(r.join("f")).unwrap();
    log.push(res(fs::rename(r.join("f"), r.join("d"))));
    log.push(res(fs::rename(r.join("d"), r.join("e"))));
    log.push(res(fs::rename(r.join("d"), r.join("a"))));
    log.push(res(fs::rename(r.join("a"), r.join("d"))));
    // Into a subdirectory and back; into itself.
    log.push(res(fs::rename(r.join("b"), r.join("e/b"))));
    log.push(list(&r.join("e")));
    log.push(res(fs::rename(r.join("e"), r.join("e/x2"))));
    log.push(res(fs::rename(r.join("e/b"), r.join("b"))));
    log.push(res(fs::rename(r.join("missing"), r.join("z"))));
    log.push(list(r));
    log.push(read(&r.join("b")));
    log.push(read(&r.join("e/x")));
}

#[test]
fn renames_match_a_plain_directory() {
    compare("", renames);
}

fn links(r: &Path, log: &mut Log) {
    let a = r.join("a");
    fs::write(&a, "shared").unwrap();
    log.push(res(fs::hard_link(&a, r.join("h"))));
    log.push(res(fs::hard_link(&a, r.join("h"))));
    log.push(st(&a));
    let same = fs::metadata(&a).unwrap().ino() == fs::metadata(r.join("h")).unwrap().ino();
    log.push(format!("same inode: {same}"));
    fs::write(r.join("h"), "changed via h").unwrap();
    log.push(read(&a));
    log.push(res(fs::remove_file(&a)));
    log.push(st(&r.join("h")));
    log.push(res(std::os::unix::fs::symlink("h", r.join("s"))));
    log.push(res(std::os::unix::fs::symlink("h", r.join("s"))));
    log.push(format!("{:?}", fs::read_link(r.join("s")).ok()));
    log.push(read(&r.join("s")));
    log.push(st(&r.join("s")).split(' ').next().unwrap().to_string());
    log.push(res(std::os::unix::fs::symlink("dangling", r.join("s2"))));
    log.push(read(&r.join("s2")));
    log.push(res(fs::read_link(r.join("h"))));
    fs::create_dir(r.join("d")).unwrap();
    log.push(res(fs::hard_link(r.join("d"), r.join("d2"))));
}

#[test]
fn links_match_a_plain_directory() {
    compare("", links);
}

fn attrs(r: &Path, log: &mut Log) {
    let a = r.join("a");
    fs::write(&a, "x").unwrap();
    for mode in [0o600, 0o4755, 0o2710, 0o1777, 0o000, 0o644] {
        log.push(res(fs::set_permissions(
            &a,
            fs::Permissions::from_mode(mode),
        )));
        log.push(st(&a));
    }
    log.push(res(std::os::unix::fs::chown(&a, Some(1234), Some(5678))));
    log.push(st(&a));
    // utimensat: set both, then change mtime only (UTIME_OMIT), then NOW.
    let t = |s, ns| libc::timespec {
        tv_sec: s,
        tv_nsec: ns,
    };
    let set = |times: [libc::timespec; 2]| {
        // SAFETY: valid path, two timespecs.
        ret(unsafe { libc::utimensat(libc::AT_FDCWD, c(&a).as_ptr(), times.as_ptr(), 0) })
    };
    let times = || {
        let m = fs::metadata(&a).unwrap();
        (m.atime(), m.atime_nsec(), m.mtime(), m.mtime_nsec())
    };
    log.push(set([t(1000, 5), t(2000, 7)]));
    log.push(format!("{:?}", times()));
    log.push(set([t(0, libc::UTIME_OMIT), t(3000, 9)]));
    log.push(format!("{:?}", times()));
    log.push(set([t(4000, 11), t(0, libc::UTIME_OMIT)]));
    log.push(format!("{:?}", times()));
    log.push(set([t(0, libc::UTIME_NOW), t(0, libc::UTIME_OMIT)]));
    let (at, _, mt, _) = times();
    log.push(format!(
        "atime recent: {}, mtime kept: {mt}",
        at > 1_600_000_000
    ));
}

#[test]
fn attribute_changes_match_a_plain_directory() {
    compare("", attrs);
}

fn xattrs(r: &Path, log: &mut Log) {
    let a = r.join("a");
    fs::write(&a, "x").unwrap();
    let p = c(&a);
    let set = |name: &str, v: &[u8], flags| {
        let n = CString::new(name).unwrap();
        // SAFETY: valid C strings and buffer.
        ret(unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), flags) })
    };
    let get = |name: &str| {
        let n = CString::new(name).unwrap();
        let mut buf = [0u8; 64];
        // SAFETY: valid C strings and buffer.
        let len =
            unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if len < 0 {
            format!(
                "errno {}",
                std::io::Error::last_os_error().raw_os_error().unwrap()
            )
        } else {
            String::from_utf8_lossy(&buf[..len as usize]).into_owned()
        }
    };
    let list = || {
        let mut buf = [0u8; 256];
        // SAFETY: valid C string and buffer.
        let len = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        let mut names: Vec<String> = buf[..len.max(0) as usize]
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .filter(|s| s.starts_with("user."))
            .collect();
        names.sort();
        names.join(",")
    };
    log.push(set("user.one", b"1", 0));
    log.push(set("user.two", b"22", 0));
    log.push(set("user.one", b"x", libc::XATTR_CREATE));
    log.push(set("user.three", b"x", libc::XATTR_REPLACE));
    log.push(get("user.one"));
    log.push(get("user.two"));
    log.push(get("user.none"));
    log.push(list());
    let n = CString::new("user.one").unwrap();
    // SAFETY: valid C strings.
    log.push(ret(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) }));
    log.push(ret(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) }));
    log.push(list());
    // A too-small buffer is ERANGE.
    let n = CString::new("user.two").unwrap();
    let mut one = [0u8; 1];
    // SAFETY: valid buffer of 1 byte.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), one.as_mut_ptr().cast(), 1) };
    log.push(format!(
        "{r} {}",
        std::io::Error::last_os_error().raw_os_error().unwrap()
    ));
}

#[test]
fn xattrs_match_a_plain_directory() {
    if common::over_nfs() {
        eprintln!("SKIPPED over NFS: NFSv3 has no extended attributes or ACLs");
        return;
    }
    compare("", xattrs);
}

/// The l* xattr calls (the object itself, never a symlink's target), each
/// as "ok", "errno N" or the value / sorted names.
fn lset(p: &Path, name: &str, v: &[u8], flags: libc::c_int) -> String {
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and buffer.
    ret(unsafe { libc::lsetxattr(c(p).as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), flags) })
}

fn lget(p: &Path, name: &str) -> String {
    let n = CString::new(name).unwrap();
    let mut buf = [0u8; 64];
    // SAFETY: valid C strings and buffer.
    let len = unsafe {
        libc::lgetxattr(
            c(p).as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if len < 0 {
        ret(-1)
    } else {
        String::from_utf8_lossy(&buf[..len as usize]).into_owned()
    }
}

fn llist(p: &Path) -> String {
    let mut buf = [0u8; 256];
    // SAFETY: valid C string and buffer.
    let len = unsafe { libc::llistxattr(c(p).as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return ret(-1);
    }
    let mut names: Vec<String> = buf[..len as usize]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .filter(|s| s.starts_with("user.") || s.starts_with("trusted."))
        .collect();
    names.sort();
    names.join(",")
}

fn lremove(p: &Path, name: &str) -> String {
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings.
    ret(unsafe { libc::lremovexattr(c(p).as_ptr(), n.as_ptr()) })
}

/// xattrs on symlinks themselves (generic/062): trusted.* works for root,
/// user.* is refused by the kernel, and the target is never touched. A
/// directory goes through the same steps for comparison.
fn symlink_xattrs(r: &Path, log: &mut Log) {
    fs::write(r.join("target"), "t").unwrap();
    std::os::unix::fs::symlink("target", r.join("link")).unwrap();
    std::os::unix::fs::symlink("nowhere", r.join("dangling")).unwrap();
    fs::create_dir(r.join("dir")).unwrap();
    for name in ["link", "dangling", "dir"] {
        let p = r.join(name);
        log.push(format!("{name}: list {}", llist(&p)));
        log.push(format!("{name}: set {}", lset(&p, "trusted.t", b"one", 0)));
        log.push(format!(
            "{name}: create again {}",
            lset(&p, "trusted.t", b"x", libc::XATTR_CREATE)
        ));
        log.push(format!(
            "{name}: replace {}",
            lset(&p, "trusted.t", b"two", libc::XATTR_REPLACE)
        ));
        log.push(format!("{name}: get {}", lget(&p, "trusted.t")));
        log.push(format!("{name}: get absent {}", lget(&p, "trusted.none")));
        log.push(format!("{name}: set user {}", lset(&p, "user.u", b"u", 0)));
        log.push(format!("{name}: get user {}", lget(&p, "user.u")));
        log.push(format!("{name}: list {}", llist(&p)));
        log.push(format!("{name}: remove {}", lremove(&p, "trusted.t")));
        log.push(format!("{name}: remove again {}", lremove(&p, "trusted.t")));
        log.push(format!("{name}: list {}", llist(&p)));
        log.push(format!(
            "{name}: set to keep {}",
            lset(&p, "trusted.k", b"k", 0)
        ));
    }
    // What was set on the link stayed on the link.
    log.push(format!("target: {}", llist(&r.join("target"))));
    log.push(format!("link: {}", llist(&r.join("link"))));
    log.push(format!("link: {}", lget(&r.join("link"), "trusted.k")));
}

#[test]
fn symlink_xattrs_match_a_plain_directory() {
    if common::over_nfs() {
        eprintln!("SKIPPED over NFS: NFSv3 has no extended attributes or ACLs");
        return;
    }
    let m = compare("", symlink_xattrs);
    // And they are on the NAS's symlink itself.
    m.flush(None);
    assert_eq!(lget(&m.n("link"), "trusted.k"), "k");
    assert_eq!(llist(&m.n("target")), "");
}

fn open_unlinked(r: &Path, log: &mut Log) {
    let a = r.join("a");
    fs::write(&a, "before").unwrap();
    let mut f = OpenOptions::new().read(true).write(true).open(&a).unwrap();
    log.push(res(fs::remove_file(&a)));
    log.push(st(&a));
    f.write_all_at(b"AFTER!", 0).unwrap();
    let mut s = String::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_string(&mut s).unwrap();
    log.push(s);
    log.push(format!("nlink {}", f.metadata().unwrap().nlink()));
    // A new file under the same name is another file.
    fs::write(&a, "new").unwrap();
    log.push(read(&a));
    let mut s = String::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_string(&mut s).unwrap();
    log.push(s);
}

#[test]
fn unlinked_open_files_stay_usable() {
    compare("", open_unlinked);
}

/// Runs `cmd` with sh in `dir` as user and group `uid`: "status stdout".
fn run_as(dir: &Path, cmd: &str, uid: u32) -> String {
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    format!(
        "{} {}",
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim()
    )
}

fn permissions_as_another_user(r: &Path, log: &mut Log) {
    let d = r.join("d");
    fs::create_dir(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
    fs::write(r.join("secret"), "s").unwrap();
    fs::set_permissions(r.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    let run = |cmd: &str| run_as(r, cmd, 4242);
    log.push(run("cat secret"));
    log.push(run("echo hi > d/mine && cat d/mine"));
    log.push(st(&d.join("mine")));
    log.push(run("mkdir d/sub && stat -c '%u %g %a' d/sub"));
    log.push(run("ln -s mine d/link && stat -c '%u %g' d/link"));
    log.push(run("echo x > newfile"));
    // Setgid directories pass their group down.
    let g = r.join("g");
    fs::create_dir(&g).unwrap();
    std::os::unix::fs::chown(&g, None, Some(777)).unwrap();
    fs::set_permissions(&g, fs::Permissions::from_mode(0o2777)).unwrap();
    log.push(run(
        "touch g/f && mkdir g/sub && stat -c '%u %g %a' g/f g/sub",
    ));
}

#[test]
fn ownership_and_permissions_hold_for_other_users() {
    compare("", permissions_as_another_user);
}

fn mode_of(p: &Path) -> String {
    match fs::metadata(p) {
        Ok(m) => format!("{:o}", m.mode() & 0o7777),
        Err(e) => format!("errno {}", e.raw_os_error().unwrap_or(-1)),
    }
}

/// Writes, truncates and fallocates on files with set-user-ID and
/// set-group-ID bits, by a user outside the file's group, by a member and
/// by root, and chowns: which bits survive (generic/683 to 685 and more).
fn suid_sgid_clearing(r: &Path, log: &mut Log) {
    let d = r.join("kp");
    fs::create_dir(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
    let f = d.join("f");
    let reset = |mode: u32, owner: u32, group: u32| {
        fs::write(&f, vec![b'a'; 16384]).unwrap();
        std::os::unix::fs::chown(&f, Some(owner), Some(group)).unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(mode)).unwrap();
    };
    let changes = [
        (
            "write",
            "printf x | dd of=f bs=1 seek=3 conv=notrunc status=none",
        ),
        ("truncate", "truncate -s 100 f"),
        ("open O_TRUNC", ": > f"),
        ("fallocate", "fallocate -o 0 -l 32768 f"),
        ("punch", "fallocate -p -o 0 -l 4096 f"),
        ("zero", "fallocate -z -o 0 -l 4096 f"),
    ];
    // NFSv3 has no fallocate beyond what nassync does locally.
    let changes: Vec<_> = changes
        .into_iter()
        .filter(|(n, _)| !common::over_nfs() || !matches!(*n, "punch" | "zero"))
        .collect();
    let modes = [
        0o6666, 0o6676, 0o6766, 0o6777, 0o2666, 0o2676, 0o4666, 0o0666,
    ];
    // (who, uid, the file's group): 4242 runs in group 4242 only.
    let callers = [("user", 4242, 0), ("member", 4242, 4242), ("root", 0, 0)];
    for (what, cmd) in changes {
        for mode in modes {
            for (who, uid, group) in callers {
                reset(mode, 0, group);
                let out = run_as(&d, cmd, uid);
                log.push(format!(
                    "{what} {mode:o} by {who}: {out} -> {}",
                    mode_of(&f)
                ));
            }
        }
    }
    // chown, chgrp and chown(f, -1, -1), by the owner and by root.
    for mode in [0o6755, 0o6745, 0o2745, 0o4755, 0o2755] {
        reset(mode, 4242, 0);
        std::os::unix::fs::chown(&f, None, None).unwrap();
        log.push(format!("root chown -1 -1 {mode:o}: {}", mode_of(&f)));
        reset(mode, 4242, 0);
        let out = run_as(&d, "chgrp 4242 f", 4242);
        log.push(format!("owner chgrp {mode:o}: {out} -> {}", mode_of(&f)));
        reset(mode, 4242, 0);
        let out = run_as(&d, "chown 4242 f", 4242);
        log.push(format!(
            "owner chown self {mode:o}: {out} -> {}",
            mode_of(&f)
        ));
        reset(mode, 4242, 0);
        std::os::unix::fs::chown(&f, Some(4243), None).unwrap();
        log.push(format!("root chown {mode:o}: {}", mode_of(&f)));
    }
}

#[test]
fn set_id_bits_are_cleared_as_on_a_local_filesystem() {
    let m = compare("", suid_sgid_clearing);
    // On the NAS itself, not only in what the kernel was shown (once
    // there: new files reach it after the write-back delay).
    m.flush(None);
    assert_eq!(mode_of(&m.n("kp/f")), mode_of(&m.m("kp/f")));
}

#[test]
fn inode_numbers_are_the_nas_ones_and_survive_a_remount() {
    let mut m = Mount::new("");
    fs::write(m.n("a"), "x").unwrap();
    fs::create_dir(m.n("d")).unwrap();
    let before: Vec<(u64, i64, i64)> = ["a", "d"]
        .iter()
        .map(|p| {
            let md = fs::metadata(m.m(p)).unwrap();
            (md.ino(), md.ctime(), md.ctime_nsec())
        })
        .collect();
    for (p, (ino, ..)) in ["a", "d"].iter().zip(&before) {
        assert_eq!(*ino, fs::metadata(m.n(p)).unwrap().ino());
    }
    m.remount();
    let after: Vec<(u64, i64, i64)> = ["a", "d"]
        .iter()
        .map(|p| {
            let md = fs::metadata(m.m(p)).unwrap();
            (md.ino(), md.ctime(), md.ctime_nsec())
        })
        .collect();
    assert_eq!(before, after);
}

#[test]
fn statfs_reports_the_nas_capacity() {
    let m = Mount::new("");
    let s = |p: &Path| nix::sys::statvfs::statvfs(p).unwrap();
    let (a, b) = (s(&m.nas), s(&m.mnt));
    assert_eq!(a.blocks(), b.blocks());
    assert_eq!(a.fragment_size(), b.fragment_size());
    assert!(a.blocks_available().abs_diff(b.blocks_available()) < 1024);
}

#[test]
fn changes_through_the_mount_reach_the_nas_and_back() {
    let m = Mount::new("");
    fs::write(m.m("x"), "through").unwrap();
    m.flush(None);
    assert_eq!(fs::read_to_string(m.n("x")).unwrap(), "through");
    fs::create_dir(m.m("dir")).unwrap();
    // New objects reach the NAS after the write-back delay, or on flush.
    assert!(!m.n("dir").exists());
    m.flush(None);
    assert!(m.n("dir").is_dir());
    assert_eq!(errno(&fs::remove_dir(m.m("nope"))), libc::ENOENT);
}

fn acls(r: &Path, log: &mut Log) {
    let sh = |cmd: &str, uid: u32| run_as(r, &format!("umask 022; {cmd}"), uid);
    // A default ACL decides the mode of new files instead of the umask.
    log.push(sh(
        "mkdir d && setfacl -d -m u::rwx,g::rwx,o::rwx d && echo ok",
        0,
    ));
    log.push(sh("touch d/f && mkdir d/sub && stat -c '%a' d/f d/sub", 0));
    log.push(sh("getfacl -c d/sub 2>/dev/null | sort", 0));
    // Without one, the umask applies.
    log.push(sh("mkdir e && touch e/f && stat -c '%a' e e/f", 0));
    // An access ACL grants a user what the mode does not.
    log.push(sh(
        "echo x > e/f && chmod 600 e/f && chmod 755 e && echo ok",
        0,
    ));
    log.push(sh("cat e/f", 4242));
    log.push(sh("setfacl -m u:4242:r e/f && stat -c '%a' e/f", 0));
    log.push(sh("cat e/f", 4242));
    log.push(sh("echo y >> e/f", 4242));
    log.push(sh("chmod 640 e/f && getfacl -c e/f 2>/dev/null | sort", 0));
}

#[test]
fn posix_acls_match_a_plain_directory() {
    if common::over_nfs() {
        eprintln!("SKIPPED over NFS: NFSv3 has no extended attributes or ACLs");
        return;
    }
    compare("", acls);
}
