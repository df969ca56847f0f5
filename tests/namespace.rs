//! New objects exist locally first (docs/SEMANTICS.md, "New files and
//! directories"): creations return without the NAS, survive a crash, reach
//! the NAS after the write-back delay (or on flush) identical, and a name
//! taken on the NAS meanwhile gets the conflict name.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::simnas::SimNas;
use common::{Mount, SmallFs, errno, over_nfs};

/// Every entry under `root`: kind, mode, size, content, target, mtime
/// (unless `times` is false) and which hard links it shares.
fn tree(root: &Path, times: bool) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut inodes: HashMap<u64, String> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(root.join(&rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let r = rel.join(&n);
            let p = root.join(&r);
            let md = fs::symlink_metadata(&p).unwrap();
            let mut d = format!("mode={:o}", md.mode());
            if md.is_file() {
                d.push_str(&format!(
                    " size={} data={:?}",
                    md.len(),
                    fs::read(&p).unwrap()
                ));
                if md.nlink() > 1 {
                    let first = inodes
                        .entry(md.ino())
                        .or_insert_with(|| r.display().to_string());
                    d.push_str(&format!(" links={} same_as={first}", md.nlink()));
                }
            } else if md.file_type().is_symlink() {
                d.push_str(&format!(" -> {:?}", fs::read_link(&p).unwrap()));
            } else if md.is_dir() {
                stack.push(r.clone());
            }
            if times {
                d.push_str(&format!(" mtime={}.{:09}", md.mtime(), md.mtime_nsec()));
            }
            out.insert(r.display().to_string(), d);
        }
    }
    out
}

fn diff(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    for (k, v) in a {
        match b.get(k) {
            Some(w) if w == v => {}
            Some(w) => out.push_str(&format!("{k}: {v}\n   vs {w}\n")),
            None => out.push_str(&format!("{k}: only in the first\n")),
        }
    }
    for k in b.keys().filter(|k| !a.contains_key(*k)) {
        out.push_str(&format!("{k}: only in the second\n"));
    }
    out
}

fn set_mtime(p: &Path, secs: u64) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let ts = libc::timespec {
        tv_sec: secs as i64,
        tv_nsec: 0,
    };
    // SAFETY: valid C string and two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            [ts, ts].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {}", p.display());
}

/// A tarball of `dirs` directories of `per_dir` small files, with
/// symlinks, odd modes and old mtimes, and hard links in two of them.
fn tarball(dir: &Path, dirs: usize, per_dir: usize) -> PathBuf {
    let src = dir.join("src");
    let top = src.join("top");
    for d in 0..dirs {
        let dd = top.join(format!("d{d:02}/sub"));
        fs::create_dir_all(&dd).unwrap();
        for f in 0..per_dir {
            let p = dd.join(format!("f{f:03}.txt"));
            fs::write(&p, format!("dir {d} file {f}\n").repeat(f % 7 + 1)).unwrap();
            if f % 5 == 0 {
                fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
            }
            set_mtime(&p, 1_600_000_000 + (d * 1000 + f) as u64);
        }
        std::os::unix::fs::symlink("f000.txt", dd.join("link")).unwrap();
        set_mtime(&dd.join("link"), 1_500_000_000);
        if d < 2 {
            fs::hard_link(dd.join("f001.txt"), dd.join("hard")).unwrap();
        }
        fs::set_permissions(&dd, fs::Permissions::from_mode(0o750)).unwrap();
        set_mtime(&dd, 1_400_000_000 + d as u64);
        set_mtime(&top.join(format!("d{d:02}")), 1_300_000_000);
    }
    set_mtime(&top, 1_200_000_000);
    let tar = dir.join("t.tar");
    let st = Command::new("tar")
        .arg("cf")
        .arg(&tar)
        .arg("-C")
        .arg(&src)
        .arg("top")
        .status()
        .unwrap();
    assert!(st.success());
    tar
}

fn untar(tar: &Path, into: &Path) {
    let st = Command::new("tar")
        .arg("xf")
        .arg(tar)
        .arg("-C")
        .arg(into)
        .status()
        .unwrap();
    assert!(st.success(), "tar xf into {}", into.display());
}

#[test]
fn an_untar_makes_no_nas_round_trip_per_file_and_lands_identical() {
    let m = Mount::new("writeback_delay=1h");
    let tar = tarball(m.dir.path(), 20, 100);
    let reference = m.dir.path().join("ref");
    fs::create_dir(&reference).unwrap();
    untar(&tar, &reference);
    let want = tree(&reference, true);
    assert!(want.len() > 2000);

    let before = m.stats()["nas_ops"];
    untar(&tar, &m.mnt);
    let calls = m.stats()["nas_ops"] - before;
    eprintln!("untar of {} entries: {calls} NAS calls", want.len());
    // The top directory's name is checked on the NAS (hard links to the
    // new files are local names too); nothing per file.
    assert!(calls < 20, "{calls} NAS calls for {} entries", want.len());
    assert!(!m.n("top").exists(), "nothing on the NAS before the delay");
    assert_eq!(diff(&want, &tree(&m.m(""), true)), "", "the mount");
    let pending = m.status_value("pending_files");
    assert!(pending > 2000, "{pending} pending");

    m.flush(None);
    assert_eq!(m.status_value("pending_files"), 0);
    assert_eq!(diff(&want, &tree(&m.nas, true)), "", "the NAS");
    assert_eq!(diff(&want, &tree(&m.m(""), true)), "", "the mount after");
    assert!(!m.log().contains("conflict"), "{}", m.log());
}

/// rm -rf of a tree on the NAS that the mount has listed: the removals
/// go into the journal and reach the NAS after the write-back delay (or a
/// flush), not one NAS round trip per entry before rm returns.
#[test]
fn an_rm_rf_of_a_listed_tree_makes_no_nas_round_trip_per_entry() {
    // (Names and attributes fresh for the whole test: the NAS calls
    // counted are the removals', not revalidations.)
    let m = Mount::new("writeback_delay=1h,actimeo=600");
    for d in 0..10 {
        let dd = m.n(&format!("top/d{d}/sub"));
        fs::create_dir_all(&dd).unwrap();
        for f in 0..100 {
            fs::write(dd.join(format!("f{f:03}")), format!("{d} {f}")).unwrap();
        }
        std::os::unix::fs::symlink("f000", dd.join("link")).unwrap();
    }
    let entries = tree(&m.m(""), true).len();
    assert!(entries > 1000);
    let before = m.stats()["nas_ops"];
    fs::remove_dir_all(m.m("top")).unwrap();
    let calls = m.stats()["nas_ops"] - before;
    eprintln!("rm -rf of {entries} entries: {calls} NAS calls");
    assert!(calls < 20, "{calls} NAS calls for {entries} entries");
    assert!(!m.m("top").exists());
    assert!(
        m.n("top/d5/sub/f050").exists(),
        "on the NAS only after the delay"
    );
    let status = m.status();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("pending top/d5/sub/f050 ") && l.contains(" removed=file")),
        "{status}"
    );
    m.flush(None);
    assert!(!m.n("top").exists());
    assert_eq!(m.status_value("conflicts"), 0, "{}", m.status());
}

/// mv of files on the NAS that the mount has listed, to names it knows
/// free (or over a NAS file it knows): the renames go into the journal and
/// reach the NAS after the write-back delay (or a flush), each file
/// keeping its NAS inode; a file written after its rename lands under
/// its new name.
#[test]
fn renames_of_listed_nas_files_make_no_nas_round_trip_each() {
    let mut m = Mount::prepare("writeback_delay=1h,actimeo=600");
    fs::create_dir_all(m.n("in")).unwrap();
    fs::create_dir_all(m.n("out")).unwrap();
    for f in 0..200 {
        fs::write(m.n(&format!("in/f{f:03}")), format!("file {f}")).unwrap();
    }
    std::os::unix::fs::symlink("f000", m.n("in/link")).unwrap();
    fs::write(m.n("out/old"), "replaced").unwrap();
    m.mount();
    let inos: Vec<u64> = (0..200)
        .map(|f| fs::metadata(m.n(&format!("in/f{f:03}"))).unwrap().ino())
        .collect();
    // Listed: names and attributes known.
    assert!(tree(&m.m(""), true).len() >= 204);
    let before = m.stats();
    for f in 0..100 {
        fs::rename(m.m(&format!("in/f{f:03}")), m.m(&format!("out/g{f:03}"))).unwrap();
    }
    for f in 100..200 {
        fs::rename(m.m(&format!("in/f{f:03}")), m.m(&format!("in/h{f:03}"))).unwrap();
    }
    fs::rename(m.m("in/link"), m.m("out/link")).unwrap();
    fs::rename(m.m("in/h199"), m.m("out/old")).unwrap();
    let after = m.stats();
    let calls = after["nas_ops"] - before["nas_ops"];
    eprintln!("201 renames and one over a file: {calls} NAS calls");
    // nfs:// cannot tell the server's filesystems apart: renames to
    // another directory go to the NAS at once there.
    if over_nfs() {
        assert_eq!(after["kept_changes"] - before["kept_changes"], 100);
    } else {
        assert!(calls < 10, "{calls} NAS calls for 202 renames");
        assert_eq!(after["kept_changes"] - before["kept_changes"], 202);
    }
    // Seen at once here, on the NAS only later.
    assert_eq!(fs::read_to_string(m.m("out/g042")).unwrap(), "file 42");
    assert_eq!(fs::read_to_string(m.m("out/old")).unwrap(), "file 199");
    assert_eq!(
        fs::read_link(m.m("out/link")).unwrap().to_str(),
        Some("f000")
    );
    assert!(!m.m("in/f142").exists());
    // (Over nfs://, the renames that went to the NAS made those kept
    // before them there first.)
    if !over_nfs() {
        assert_eq!(fs::read_to_string(m.n("in/f142")).unwrap(), "file 142");
        assert_eq!(fs::read_to_string(m.n("out/old")).unwrap(), "replaced");
        let status = m.status();
        assert!(
            status
                .lines()
                .any(|l| l.starts_with("pending in/f142 ") && l.contains(" moved=file to=in/h142")),
            "{status}"
        );
    }
    // Written after the rename: lands under the new name.
    fs::write(m.m("in/h150"), "changed after its rename").unwrap();
    // A flush of the directory renamed into makes the renames.
    m.flush(Some(&m.m("out")));
    assert_eq!(fs::read_to_string(m.n("out/g042")).unwrap(), "file 42");
    m.flush(None);
    assert_eq!(m.status_value("conflicts"), 0, "{}", m.status());
    let names = |d: &str| {
        let mut v: Vec<String> = fs::read_dir(m.n(d))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    let mut want_in: Vec<String> = (100..199).map(|f| format!("h{f:03}")).collect();
    want_in.sort();
    assert_eq!(names("in"), want_in);
    assert_eq!(names("out").len(), 102);
    for (f, ino) in inos.iter().enumerate().take(100) {
        let p = m.n(&format!("out/g{f:03}"));
        assert_eq!(fs::read_to_string(&p).unwrap(), format!("file {f}"));
        assert_eq!(fs::metadata(&p).unwrap().ino(), *ino, "renamed, not copied");
    }
    assert_eq!(fs::metadata(m.n("out/old")).unwrap().ino(), inos[199]);
    assert_eq!(fs::read_to_string(m.n("out/old")).unwrap(), "file 199");
    assert_eq!(
        fs::read_to_string(m.n("in/h150")).unwrap(),
        "changed after its rename"
    );
    assert_eq!(
        fs::read_link(m.n("out/link")).unwrap().to_str(),
        Some("f000")
    );
}

/// ln of listed NAS files (cp -al, a snapshot backup): the links go into
/// the journal, show at once (link counts included), and reach the NAS
/// later as links of the same NAS files.
#[test]
fn hard_links_of_listed_nas_files_make_no_nas_round_trip_each() {
    let mut m = Mount::prepare("writeback_delay=1h,actimeo=600");
    fs::create_dir_all(m.n("src")).unwrap();
    fs::create_dir_all(m.n("snap")).unwrap();
    for f in 0..100 {
        fs::write(m.n(&format!("src/f{f:02}")), format!("file {f}")).unwrap();
    }
    m.mount();
    assert!(tree(&m.m(""), true).len() >= 102);
    let before = m.stats();
    for f in 0..100 {
        fs::hard_link(m.m(&format!("src/f{f:02}")), m.m(&format!("snap/f{f:02}"))).unwrap();
    }
    let after = m.stats();
    let calls = after["nas_ops"] - before["nas_ops"];
    eprintln!("100 links: {calls} NAS calls");
    // (To another directory: at once over nfs://, see the renames.)
    if !over_nfs() {
        assert!(calls < 10, "{calls} NAS calls for 100 links");
        assert_eq!(after["kept_changes"] - before["kept_changes"], 100);
    }
    assert_eq!(fs::metadata(m.m("src/f07")).unwrap().nlink(), 2);
    assert_eq!(fs::metadata(m.m("snap/f07")).unwrap().nlink(), 2);
    assert_eq!(
        fs::metadata(m.m("src/f07")).unwrap().ino(),
        fs::metadata(m.m("snap/f07")).unwrap().ino()
    );
    assert_eq!(fs::read_to_string(m.m("snap/f07")).unwrap(), "file 7");
    if !over_nfs() {
        assert!(!m.n("snap/f07").exists(), "on the NAS only after the delay");
    }
    // A link's name removed again before it reached the NAS.
    fs::remove_file(m.m("snap/f99")).unwrap();
    m.flush(None);
    assert_eq!(m.status_value("conflicts"), 0, "{}", m.status());
    for f in 0..99 {
        let (a, b) = (m.n(&format!("src/f{f:02}")), m.n(&format!("snap/f{f:02}")));
        assert_eq!(
            fs::metadata(&a).unwrap().ino(),
            fs::metadata(&b).unwrap().ino()
        );
        assert_eq!(fs::metadata(&a).unwrap().nlink(), 2);
    }
    assert!(!m.n("snap/f99").exists());
    assert_eq!(fs::metadata(m.n("src/f99")).unwrap().nlink(), 1);
}

/// chmod -R, chown -R and touch of a listed tree on the NAS: the changes
/// go into the journal, show at once, and reach the same NAS objects
/// later, without dropping cached data or making a conflict.
#[test]
fn attribute_changes_of_listed_nas_objects_make_no_nas_round_trip_each() {
    let mut m = Mount::prepare("writeback_delay=1h,actimeo=600");
    fs::create_dir_all(m.n("d/sub")).unwrap();
    for f in 0..100 {
        fs::write(m.n(&format!("d/f{f:02}")), format!("file {f}")).unwrap();
    }
    std::os::unix::fs::symlink("f00", m.n("d/link")).unwrap();
    m.mount();
    assert!(tree(&m.m(""), true).len() >= 103);
    let inos: Vec<u64> = (0..100)
        .map(|f| fs::metadata(m.m(&format!("d/f{f:02}"))).unwrap().ino())
        .collect();
    assert_eq!(fs::read_to_string(m.m("d/f07")).unwrap(), "file 7");
    // As `ls -l` does (chown asks for security.capability).
    for f in 0..100 {
        common::xlist(&m.m(&format!("d/f{f:02}")));
    }
    let before = m.stats();
    for f in 0..100 {
        let p = m.m(&format!("d/f{f:02}"));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::chown(&p, Some(1234), Some(4321)).unwrap();
        set_mtime(&p, 1_000_000_000 + f);
    }
    fs::set_permissions(m.m("d/sub"), fs::Permissions::from_mode(0o711)).unwrap();
    set_mtime(&m.m("d/sub"), 1_200_000_000);
    std::os::unix::fs::lchown(m.m("d/link"), Some(1234), None).unwrap();
    let after = m.stats();
    let calls = after["nas_ops"] - before["nas_ops"];
    eprintln!("302 attribute changes: {calls} NAS calls");
    for (k, v) in &after {
        if before.get(k) != Some(v) {
            eprintln!("{k}: {:?} -> {v}", before.get(k));
        }
    }
    assert!(calls < 10, "{calls} NAS calls for 303 attribute changes");
    // The first chmod and chown go to the NAS: that it takes them is what
    // lets the next ones wait.
    assert_eq!(after["kept_changes"] - before["kept_changes"], 301);
    // Seen at once here, on the NAS only later.
    let here = fs::metadata(m.m("d/f42")).unwrap();
    assert_eq!(
        (here.mode() & 0o7777, here.uid(), here.gid(), here.mtime()),
        (0o640, 1234, 4321, 1_000_000_042)
    );
    let sub = fs::metadata(m.m("d/sub")).unwrap();
    assert_eq!((sub.mode() & 0o7777, sub.mtime()), (0o711, 1_200_000_000));
    assert_eq!(fs::symlink_metadata(m.m("d/link")).unwrap().uid(), 1234);
    assert_eq!(fs::metadata(m.n("d/f42")).unwrap().uid(), 0);
    assert_ne!(fs::metadata(m.n("d/sub")).unwrap().mode() & 0o7777, 0o711);
    m.flush(None);
    assert_eq!(m.status_value("conflicts"), 0, "{}", m.status());
    for (f, ino) in inos.iter().enumerate() {
        let p = m.n(&format!("d/f{f:02}"));
        let md = fs::metadata(&p).unwrap();
        assert_eq!(
            (md.ino(), md.mode() & 0o7777, md.uid(), md.gid()),
            (*ino, 0o640, 1234, 4321),
            "{}",
            p.display()
        );
        assert_eq!(md.mtime(), 1_000_000_000 + f as i64);
        assert_eq!(fs::read_to_string(&p).unwrap(), format!("file {f}"));
    }
    let sub = fs::metadata(m.n("d/sub")).unwrap();
    assert_eq!((sub.mode() & 0o7777, sub.mtime()), (0o711, 1_200_000_000));
    assert_eq!(fs::symlink_metadata(m.n("d/link")).unwrap().uid(), 1234);
    // The cached data outlived the changes: no NAS read for it.
    let before = m.stats();
    assert_eq!(fs::read_to_string(m.m("d/f07")).unwrap(), "file 7");
    let after = m.stats();
    assert_eq!(after["nas_reads"], before["nas_reads"]);
}

/// setfattr of listed NAS files and directories (`user.*`, as tagging
/// tools do): kept in the journal, shown at once, made on the NAS later.
#[test]
fn user_xattr_changes_of_listed_nas_objects_make_no_nas_round_trip_each() {
    if common::skip_over_nfs("nfs:// keeps no xattrs") {
        return;
    }
    let mut m = Mount::prepare("writeback_delay=1h,actimeo=600");
    fs::create_dir_all(m.n("d/sub")).unwrap();
    for f in 0..100 {
        let p = m.n(&format!("d/f{f:02}"));
        fs::write(&p, format!("file {f}")).unwrap();
        common::xset(&p, "user.old", b"was", 0).unwrap();
    }
    m.mount();
    assert!(tree(&m.m(""), true).len() >= 101);
    // As `ls -l` and `getfattr` do.
    for f in 0..100 {
        common::xlist(&m.m(&format!("d/f{f:02}")));
    }
    common::xlist(&m.m("d/sub"));
    let before = m.stats();
    for f in 0..100 {
        let p = m.m(&format!("d/f{f:02}"));
        common::xset(&p, "user.tag", format!("t{f}").as_bytes(), 0).unwrap();
        common::xremove(&p, "user.old").unwrap();
        // Answered from what is known.
        assert_eq!(common::xremove(&p, "user.old"), Err(libc::ENODATA));
        assert_eq!(
            common::xget(&p, "user.tag").unwrap(),
            format!("t{f}").as_bytes()
        );
    }
    common::xset(&m.m("d/sub"), "user.tag", b"dir", 0).unwrap();
    let after = m.stats();
    let calls = after["nas_ops"] - before["nas_ops"];
    eprintln!("201 xattr changes: {calls} NAS calls");
    assert!(calls < 10, "{calls} NAS calls for 201 xattr changes");
    // The first goes to the NAS, as above, and so does the next of that
    // file (its ctime moved there: asked again).
    assert_eq!(after["kept_changes"] - before["kept_changes"], 199);
    assert_eq!(common::xlist(&m.m("d/f42")), ["user.tag"]);
    assert_eq!(common::xget(&m.n("d/f42"), "user.old").unwrap(), b"was");
    assert_eq!(common::xget(&m.n("d/f42"), "user.tag"), Err(libc::ENODATA));
    // XATTR_CREATE is the NAS's to answer (another client may have set
    // the name): what was kept before it is made there first.
    assert_eq!(
        common::xset(&m.m("d/f42"), "user.tag", b"again", libc::XATTR_CREATE),
        Err(libc::EEXIST)
    );
    assert_eq!(common::xget(&m.n("d/f42"), "user.tag").unwrap(), b"t42");
    m.flush(None);
    assert_eq!(m.status_value("conflicts"), 0, "{}", m.status());
    for f in 0..100 {
        let p = m.n(&format!("d/f{f:02}"));
        assert_eq!(common::xlist(&p), ["user.tag"], "{}", p.display());
        assert_eq!(
            common::xget(&p, "user.tag").unwrap(),
            format!("t{f}").as_bytes()
        );
        assert_eq!(fs::read_to_string(&p).unwrap(), format!("file {f}"));
    }
    assert_eq!(common::xget(&m.n("d/sub"), "user.tag").unwrap(), b"dir");
    // And the mount shows the NAS's, now that it has them.
    assert_eq!(common::xget(&m.m("d/f07"), "user.tag").unwrap(), b"t7");
    assert_eq!(common::xlist(&m.m("d/f07")), ["user.tag"]);
}

/// A file's cached data outlives its kept rename and link: once they are
/// made on the NAS, the NAS's ctime moved by nassync itself is not taken
/// for another client's change.
#[test]
fn cached_data_outlives_a_kept_rename_and_link() {
    let mut m = Mount::prepare("writeback_delay=1h,actimeo=2");
    fs::create_dir(m.n("d")).unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(m.n("d/movie"), &data).unwrap();
    fs::write(m.n("d/song"), &data[..500_000]).unwrap();
    m.mount();
    assert_eq!(fs::read(m.m("d/movie")).unwrap(), data);
    assert_eq!(fs::read(m.m("d/song")).unwrap(), &data[..500_000]);
    assert!(tree(&m.m(""), true).len() >= 3);
    let before = m.stats();
    fs::rename(m.m("d/movie"), m.m("d/film")).unwrap();
    fs::hard_link(m.m("d/song"), m.m("d/track")).unwrap();
    assert_eq!(m.stats()["kept_changes"] - before["kept_changes"], 2);
    let ctime = |p: &str| fs::metadata(m.m(p)).unwrap().ctime_nsec();
    let song_ctime = ctime("d/track");
    // Attributes expired, before and after the changes reach the NAS:
    // the next opens see the NAS's.
    for flush in [false, true] {
        if flush {
            m.flush(None);
            assert!(m.n("d/film").exists() && m.n("d/track").exists());
        }
        std::thread::sleep(Duration::from_millis(2100));
        assert_eq!(fs::read(m.m("d/film")).unwrap(), data);
        assert_eq!(fs::read(m.m("d/track")).unwrap(), &data[..500_000]);
        assert_eq!(fs::metadata(m.m("d/song")).unwrap().nlink(), 2);
        if !flush {
            assert_eq!(ctime("d/track"), song_ctime, "the NAS's until made there");
        }
        let after = m.stats();
        assert_eq!(
            after["invalidations"], before["invalidations"],
            "flush {flush}"
        );
        assert_eq!(
            after["nas_bytes_read"], before["nas_bytes_read"],
            "flush {flush}"
        );
    }
}

/// A rename or link into a filesystem mounted inside the share (a
/// snapshot directory, a dataset) is not kept for later: the NAS refuses
/// it with EXDEV at once, so that mv copies instead. Within that
/// filesystem, it is kept.
#[test]
fn renames_between_filesystems_of_the_share_are_refused_at_once() {
    if common::skip_over_nfs("the test mounts a filesystem in the NAS directory") {
        return;
    }
    let mut m = Mount::prepare("writeback_delay=1h,actimeo=600");
    fs::create_dir(m.n("other")).unwrap();
    let _other = SmallFs::mount(&m.n("other"), "1m");
    fs::write(m.n("f"), "on the share").unwrap();
    fs::write(m.n("other/g"), "on another filesystem").unwrap();
    m.mount();
    assert!(tree(&m.m(""), true).len() >= 3);
    let before = m.stats()["kept_changes"];
    let r = fs::rename(m.m("f"), m.m("other/f"));
    assert_eq!(errno(&r), libc::EXDEV);
    let r = fs::hard_link(m.m("f"), m.m("other/f"));
    assert_eq!(errno(&r), libc::EXDEV);
    let r = fs::rename(m.m("other/g"), m.m("g"));
    assert_eq!(errno(&r), libc::EXDEV);
    assert_eq!(m.stats()["kept_changes"], before);
    fs::rename(m.m("other/g"), m.m("other/h")).unwrap();
    assert_eq!(m.stats()["kept_changes"], before + 1);
    m.flush(None);
    assert_eq!(
        fs::read_to_string(m.n("other/h")).unwrap(),
        "on another filesystem"
    );
    assert_eq!(fs::read_to_string(m.n("f")).unwrap(), "on the share");
    assert_eq!(m.status_value("conflicts"), 0, "{}", m.status());
    m.unmount();
}

/// A rename over a NAS file, kept for later, whose object another client
/// removes on the NAS meanwhile: the rename cannot be made, so the file it
/// was to replace stays too (not neither), and the conflict is reported.
#[test]
fn a_kept_rename_over_a_file_whose_object_goes_meanwhile_leaves_the_file() {
    let mut m = Mount::prepare("writeback_delay=1h,actimeo=600");
    fs::create_dir(m.n("d")).unwrap();
    fs::write(m.n("d/new"), "new version").unwrap();
    fs::write(m.n("d/current"), "current version").unwrap();
    m.mount();
    assert!(tree(&m.m(""), true).len() >= 3);
    let before = m.stats()["kept_changes"];
    fs::rename(m.m("d/new"), m.m("d/current")).unwrap();
    assert_eq!(m.stats()["kept_changes"], before + 1, "kept for later");
    fs::remove_file(m.n("d/new")).unwrap();
    m.flush(None);
    assert_eq!(
        fs::read_to_string(m.n("d/current")).unwrap(),
        "current version"
    );
    assert!(m.status_value("conflicts") >= 1, "{}", m.status());
}

/// A directory on the NAS chmod'ed while new files wait to be created in
/// it gets the mode once they are there (creating them needs write
/// access), on that directory: also when it was renamed, moved, or
/// exchanged with another one meanwhile (the other keeps its own mode).
#[test]
fn a_mode_waiting_for_new_children_follows_its_directory_through_renames() {
    if common::skip_over_nfs("RENAME_EXCHANGE is not in NFSv3") {
        return;
    }
    let mut m = Mount::prepare("writeback_delay=1h");
    fs::create_dir_all(m.n("top/d")).unwrap();
    fs::create_dir_all(m.n("top/x")).unwrap();
    fs::create_dir(m.n("other")).unwrap();
    m.mount();
    let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o7777;
    fs::write(m.m("top/d/new"), "waiting").unwrap();
    fs::set_permissions(m.m("top/d"), fs::Permissions::from_mode(0o500)).unwrap();
    let c = |p: PathBuf| std::ffi::CString::new(p.into_os_string().into_encoded_bytes()).unwrap();
    let (pd, px) = (c(m.m("top/d")), c(m.m("top/x")));
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            pd.as_ptr(),
            libc::AT_FDCWD,
            px.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    fs::rename(m.m("top/x"), m.m("top/e")).unwrap();
    fs::rename(m.m("top"), m.m("other/top")).unwrap();
    m.flush(None);
    let p = m.n("other/top/e");
    assert_eq!(mode(&p), 0o500);
    assert_eq!(fs::read_to_string(p.join("new")).unwrap(), "waiting");
    assert_eq!(mode(&m.n("other/top/d")), 0o755, "the other one's own");
    assert_eq!(m.status_value("conflicts"), 0, "{}", m.status());
}

/// A rename kept for later whose new name another client takes on the
/// NAS meanwhile: the NAS's file keeps the name, the renamed one gets the
/// conflict name, and the conflict is reported (docs/SEMANTICS.md).
#[test]
fn a_kept_rename_to_a_name_taken_on_the_nas_meanwhile_keeps_both() {
    let mut m = Mount::prepare("writeback_delay=1h,actimeo=600");
    fs::create_dir(m.n("d")).unwrap();
    fs::write(m.n("d/draft"), "mine").unwrap();
    m.mount();
    assert!(tree(&m.m(""), true).len() >= 2);
    let before = m.stats()["nas_ops"];
    fs::rename(m.m("d/draft"), m.m("d/final")).unwrap();
    assert_eq!(m.stats()["nas_ops"], before, "kept for later");
    fs::write(m.n("d/final"), "theirs").unwrap();
    m.flush(None);
    assert_eq!(fs::read_to_string(m.n("d/final")).unwrap(), "theirs");
    assert!(!m.n("d/draft").exists());
    let kept: Vec<_> = fs::read_dir(m.n("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != "final")
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        fs::read_to_string(m.n(&format!("d/{}", kept[0]))).unwrap(),
        "mine"
    );
    assert_eq!(m.status_value("conflicts"), 1, "{}", m.status());
}

#[test]
fn a_temporary_file_created_and_removed_never_reaches_the_nas() {
    let m = Mount::new("writeback_delay=1h");
    fs::create_dir(m.m("build")).unwrap();
    fs::write(m.m("build/tmp.o"), vec![7u8; 100_000]).unwrap();
    fs::rename(m.m("build/tmp.o"), m.m("build/out.o")).unwrap();
    fs::write(m.m("build/scratch"), "x").unwrap();
    fs::remove_file(m.m("build/scratch")).unwrap();
    fs::create_dir(m.m("build/empty")).unwrap();
    fs::remove_dir(m.m("build/empty")).unwrap();
    let before = m.stats();
    m.flush(None);
    let after = m.stats();
    assert_eq!(fs::read(m.n("build/out.o")).unwrap(), vec![7u8; 100_000]);
    let mut names: Vec<_> = fs::read_dir(m.n("build"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["out.o"]);
    // Only out.o's bytes went over, once.
    let written = after["nas_bytes_written"] - before["nas_bytes_written"];
    assert_eq!(written, 100_000);
}

/// docs/SEMANTICS.md: nothing written is dropped. Another client removes
/// a directory (empty on the NAS) while new files wait in it here: it is
/// created again, with them, and the conflict is reported.
#[test]
fn a_directory_removed_on_the_nas_while_new_files_wait_in_it_is_made_again() {
    let m = Mount::new("writeback_delay=1h");
    fs::create_dir_all(m.n("p/q")).unwrap();
    fs::write(m.m("p/q/f"), "waiting").unwrap();
    fs::create_dir(m.m("p/q/d")).unwrap();
    fs::write(m.m("p/q/d/g"), "deeper").unwrap();
    fs::remove_dir(m.n("p/q")).unwrap();
    fs::remove_dir(m.n("p")).unwrap();
    m.flush(None);
    assert_eq!(fs::read_to_string(m.n("p/q/f")).unwrap(), "waiting");
    assert_eq!(fs::read_to_string(m.n("p/q/d/g")).unwrap(), "deeper");
    let status = m.status();
    assert!(status.contains("created again"), "{status}");
}

#[test]
fn a_name_taken_on_the_nas_meanwhile_gets_the_conflict_name() {
    let mut m = Mount::prepare("writeback_delay=1h,actimeo=1");
    fs::create_dir(m.n("d")).unwrap();
    m.mount();
    fs::write(m.m("d/report.txt"), "written here").unwrap();
    fs::create_dir(m.m("d/photos")).unwrap();
    fs::write(m.m("d/photos/a.jpg"), "a here").unwrap();
    // Another client, meanwhile, on the NAS.
    fs::write(m.n("d/report.txt"), "written there").unwrap();
    fs::create_dir(m.n("d/photos")).unwrap();
    fs::write(m.n("d/photos/b.jpg"), "b there").unwrap();
    m.flush(None);

    assert_eq!(
        fs::read_to_string(m.n("d/report.txt")).unwrap(),
        "written there"
    );
    let names: Vec<String> = fs::read_dir(m.n("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let kept = names
        .iter()
        .find(|n| n.starts_with("report.nassync-conflict-") && n.ends_with(".txt"))
        .unwrap_or_else(|| panic!("no conflict copy in {names:?}"));
    assert_eq!(
        fs::read_to_string(m.n("d").join(kept)).unwrap(),
        "written here"
    );
    let dkept = names
        .iter()
        .find(|n| n.starts_with("photos.nassync-conflict-"))
        .unwrap_or_else(|| panic!("no conflict directory in {names:?}"));
    assert_eq!(
        fs::read_to_string(m.n("d").join(dkept).join("a.jpg")).unwrap(),
        "a here"
    );
    assert_eq!(
        fs::read_to_string(m.n("d/photos/b.jpg")).unwrap(),
        "b there"
    );
    let status = m.status();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("conflict d/report.txt kept_as=d/report.nassync-conflict-")),
        "{status}"
    );
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("conflict d/photos kept_as=")),
        "{status}"
    );
    // The mount shows both, once its names expire.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        fs::read_to_string(m.m("d/report.txt")).unwrap(),
        "written there"
    );
    assert_eq!(
        fs::read_to_string(m.m("d").join(kept)).unwrap(),
        "written here"
    );
    assert_eq!(
        fs::read_to_string(m.m("d").join(dkept).join("a.jpg")).unwrap(),
        "a here"
    );
}

#[test]
fn new_objects_survive_a_crash_and_land_after_the_next_mount() {
    let mut m = Mount::new("writeback_delay=1h");
    fs::create_dir_all(m.m("a/b")).unwrap();
    fs::write(m.m("a/b/synced"), "fsynced").unwrap();
    fs::File::open(m.m("a/b/synced"))
        .unwrap()
        .sync_all()
        .unwrap();
    std::os::unix::fs::symlink("b/synced", m.m("a/link")).unwrap();
    fs::set_permissions(m.m("a/b"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::File::open(m.m("a")).unwrap().sync_all().unwrap();
    m.kill();
    assert!(!m.n("a").exists());
    m.mount();
    assert_eq!(fs::read_to_string(m.m("a/b/synced")).unwrap(), "fsynced");
    assert_eq!(fs::read_to_string(m.m("a/link")).unwrap(), "fsynced");
    assert_eq!(
        fs::metadata(m.m("a/b")).unwrap().permissions().mode() & 0o7777,
        0o700
    );
    m.flush(None);
    assert_eq!(fs::read_to_string(m.n("a/b/synced")).unwrap(), "fsynced");
    assert_eq!(fs::read_link(m.n("a/link")).unwrap(), Path::new("b/synced"));
    assert_eq!(
        fs::metadata(m.n("a/b")).unwrap().permissions().mode() & 0o7777,
        0o700
    );
}

/// Hard links to a new file survive a crash with it, the file lives on
/// under a link when its first name is removed, and its ctime, moved by
/// them here, is no conflict after the restart.
#[test]
fn hard_links_to_a_new_file_survive_a_crash_without_a_conflict() {
    let mut m = Mount::new("writeback_delay=1h");
    fs::create_dir(m.m("d")).unwrap();
    let mut f = fs::File::create(m.m("first")).unwrap();
    std::io::Write::write_all(&mut f, b"linked data").unwrap();
    f.sync_all().unwrap();
    drop(f);
    fs::hard_link(m.m("first"), m.m("d/second")).unwrap();
    fs::hard_link(m.m("first"), m.m("third")).unwrap();
    fs::remove_file(m.m("first")).unwrap();
    assert_eq!(fs::metadata(m.m("third")).unwrap().nlink(), 2);
    for d in ["", "d"] {
        fs::File::open(m.m(d)).unwrap().sync_all().unwrap();
    }
    m.kill();
    assert!(!m.n("third").exists());
    m.mount();
    let (a, b) = (
        fs::metadata(m.m("d/second")).unwrap(),
        fs::metadata(m.m("third")).unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    assert!(!m.m("first").exists());
    m.flush(None);
    assert_eq!(fs::read(m.n("d/second")).unwrap(), b"linked data");
    assert_eq!(
        fs::metadata(m.n("d/second")).unwrap().ino(),
        fs::metadata(m.n("third")).unwrap().ino()
    );
    assert!(!m.n("first").exists());
    assert_eq!(m.status_value("conflicts"), 0, "{}", m.log());
    let names: Vec<_> = fs::read_dir(&m.nas)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn the_inode_number_of_a_new_file_stays_once_it_is_on_the_nas() {
    let m = Mount::new("writeback_delay=1h");
    fs::write(m.m("f"), "one").unwrap();
    let before = fs::metadata(m.m("f")).unwrap();
    m.flush(None);
    let after = fs::metadata(m.m("f")).unwrap();
    assert_eq!(before.ino(), after.ino());
    assert_eq!(
        (
            before.ctime(),
            before.ctime_nsec(),
            before.mtime(),
            before.mtime_nsec()
        ),
        (
            after.ctime(),
            after.ctime_nsec(),
            after.mtime(),
            after.mtime_nsec()
        )
    );
    // Changed again, written back as any file on the NAS is.
    fs::write(m.m("f"), "two").unwrap();
    m.flush(None);
    assert_eq!(fs::read_to_string(m.n("f")).unwrap(), "two");
    assert!(!m.log().contains("conflict"), "{}", m.log());
}

#[test]
fn an_untar_while_the_nas_is_away_lands_once_it_is_back() {
    let mut m = Mount::prepare("timeo=1,actimeo=1,writeback_delay=1s");
    let sim = SimNas::start(m.dir.path(), &["--attr-ttl", "0"]);
    m.nas = sim.nas.clone();
    fs::create_dir(sim.backing.join("share")).unwrap();
    m.mount();
    let tar = tarball(m.dir.path(), 5, 40);
    let reference = m.dir.path().join("ref");
    fs::create_dir(&reference).unwrap();
    untar(&tar, &reference);
    let want = tree(&reference, true);
    // The listing of share is known; then the NAS stops answering.
    assert_eq!(fs::read_dir(m.m("share")).unwrap().count(), 0);
    sim.ctl("freeze");
    std::thread::sleep(Duration::from_millis(1100));
    // The first call that needs the NAS is abandoned after timeo.
    let _ = fs::metadata(m.m("share/nothing"));
    m.wait_status("nas offline", Duration::from_secs(5));

    // All of the tar is kept here, hard links included.
    untar(&tar, &m.m("share"));
    // The times are compared on the NAS only (the mount shows them too,
    // but checking the view once is enough).
    let got = tree(&m.m("share"), false);
    let mut want_untimed = want.clone();
    for v in want_untimed.values_mut() {
        if let Some(i) = v.find(" mtime=") {
            v.truncate(i);
        }
    }
    assert_eq!(diff(&want_untimed, &got), "", "the mount while offline");
    assert!(m.status_value("pending_files") > 200);
    assert!(!sim.backing.join("share/top").exists());

    sim.ctl("thaw");
    m.wait_status("nas online", Duration::from_secs(20));
    // By itself, without a flush.
    let deadline = Instant::now() + Duration::from_secs(60);
    while m.status_value("pending_files") > 0 {
        assert!(Instant::now() < deadline, "{}", m.status());
        std::thread::sleep(Duration::from_millis(200));
    }
    // (The directories' times are set just after their last new files.)
    while !diff(&want, &tree(&sim.backing.join("share"), true)).is_empty()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        diff(&want, &tree(&sim.backing.join("share"), true)),
        "",
        "the NAS"
    );
    assert_eq!(m.status_value("conflicts"), 0);
    assert_eq!(errno(&fs::read(m.m("share/missing"))), libc::ENOENT);
}

/// A new file renamed over a NAS file that was itself renamed over a new
/// file shows its own attributes, not the ones of the file it replaced.
#[test]
fn a_new_file_renamed_over_a_renamed_nas_file_keeps_its_own_mode() {
    let m = Mount::new("writeback_delay=1h");
    fs::write(m.n("b"), "old").unwrap();
    fs::set_permissions(m.m("b"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(m.m("c"), "new c").unwrap();
    fs::rename(m.m("b"), m.m("c")).unwrap();
    fs::write(m.m("b"), "new b").unwrap();
    fs::set_permissions(m.m("b"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::rename(m.m("b"), m.m("c")).unwrap();
    let md = fs::symlink_metadata(m.m("c")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o644);
    assert_eq!(fs::read_to_string(m.m("c")).unwrap(), "new b");
    m.flush(None);
    let md = fs::symlink_metadata(m.n("c")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o644);
    assert_eq!(fs::read_to_string(m.n("c")).unwrap(), "new b");
    assert!(!m.n("b").exists());
}

/// A new directory that an operation needs on the NAS at once (a NAS
/// directory moved into it) is made there with the owner's rights to fill
/// it, and gets its own mode back after: also when nothing else is
/// waiting, and by the time a flush returns. So does one that a NAS file
/// renamed into it (kept for later) needs at the replay.
#[test]
fn a_new_directory_placed_for_a_rename_into_it_gets_its_mode_on_the_nas() {
    let m = Mount::new("writeback_delay=1h");
    fs::write(m.n("x"), "on the NAS").unwrap();
    fs::create_dir(m.n("sub")).unwrap();
    fs::create_dir(m.m("d")).unwrap();
    fs::set_permissions(m.m("d"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::rename(m.m("sub"), m.m("d/sub")).unwrap();
    assert!(m.n("d/sub").is_dir());
    fs::create_dir(m.m("e")).unwrap();
    fs::set_permissions(m.m("e"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::rename(m.m("x"), m.m("e/x")).unwrap();
    assert!(m.n("x").exists(), "kept for later");
    m.flush(None);
    assert_eq!(fs::read_to_string(m.n("e/x")).unwrap(), "on the NAS");
    let md = fs::symlink_metadata(m.n("e")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o640);
    let md = fs::symlink_metadata(m.n("d")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o640);
    assert_eq!(
        fs::symlink_metadata(m.m("d")).unwrap().mode() & 0o7777,
        0o640
    );
}

/// Sets the immutable attribute on a NAS directory (even root cannot
/// create in it then) and clears it when dropped.
struct Immutable(PathBuf);

impl Immutable {
    fn set(path: &Path) -> Immutable {
        let st = Command::new("chattr").arg("+i").arg(path).status().unwrap();
        assert!(st.success(), "chattr +i {}", path.display());
        Immutable(path.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// A flush that the NAS refuses fails, says what and why, and keeps the
/// change, which reaches the NAS once the NAS takes it.
#[test]
fn a_flush_the_nas_refuses_says_why_and_keeps_the_change() {
    if common::skip_over_nfs("chattr works on the server's directory only") {
        return;
    }
    let mut m = Mount::prepare("writeback_delay=1h");
    fs::create_dir(m.nas.join("locked")).unwrap();
    m.mount();
    fs::write(m.m("locked/new.txt"), "kept").unwrap();
    let lock = Immutable::set(&m.nas.join("locked"));
    let out = Command::new(common::NASSYNC)
        .arg("flush")
        .arg(&m.mnt)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "flush succeeded: {err}");
    assert!(
        err.contains("\"locked/new.txt\"") && err.contains("Operation not permitted"),
        "{err}"
    );
    assert_eq!(fs::read_to_string(m.m("locked/new.txt")).unwrap(), "kept");
    drop(lock);
    m.flush(None);
    assert_eq!(fs::read_to_string(m.n("locked/new.txt")).unwrap(), "kept");
    assert_eq!(m.status_value("pending_files"), 0);
}

/// A removal kept for later that the NAS then refuses (an immutable file
/// here; a read-only export or a squashed root elsewhere) comes back at
/// once, reported as a conflict; from then on removals go to the NAS at once,
/// and its refusals reach the caller.
#[test]
fn a_removal_the_nas_refuses_later_comes_back_and_the_next_are_refused_at_once() {
    if common::skip_over_nfs("chattr works on the server's directory only") {
        return;
    }
    let mut m = Mount::prepare("writeback_delay=1h,actimeo=600");
    for f in ["a", "b", "c"] {
        fs::write(m.nas.join(f), f).unwrap();
    }
    m.mount();
    let _a = Immutable::set(&m.nas.join("a"));
    let _b = Immutable::set(&m.nas.join("b"));
    assert_eq!(fs::read_dir(m.m("")).unwrap().count(), 3);
    fs::metadata(m.m("a")).unwrap();
    let before = m.stats()["nas_ops"];
    fs::remove_file(m.m("a")).unwrap();
    assert_eq!(m.stats()["nas_ops"], before, "kept for later");
    assert!(!m.m("a").exists());
    m.flush(None);
    let status = m.status();
    assert_eq!(m.status_value("conflicts"), 1, "{status}");
    assert!(status.contains("conflict a"), "{status}");
    assert!(
        m.log().contains("could not be removed on the NAS"),
        "{}",
        m.log()
    );
    assert_eq!(fs::read_to_string(m.n("a")).unwrap(), "a");
    // The mount shows it again at once, though its listing was cached
    // for ten minutes.
    let mut names: Vec<_> = fs::read_dir(m.m(""))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(fs::read_to_string(m.m("a")).unwrap(), "a");
    // The NAS refused once: the next removal is its to refuse, at once.
    fs::metadata(m.m("b")).unwrap();
    assert_eq!(errno(&fs::remove_file(m.m("b"))), libc::EPERM);
    assert_eq!(fs::read_to_string(m.m("b")).unwrap(), "b");
    fs::metadata(m.m("c")).unwrap();
    fs::remove_file(m.m("c")).unwrap();
    assert!(!m.n("c").exists(), "made on the NAS at once");
    assert_eq!(m.status_value("conflicts"), 1, "{}", m.status());
}

/// A chmod kept for later that the NAS then refuses (an immutable file, a
/// squashed root) is a conflict and undone here; from then on, attribute
/// changes of NAS objects go to the NAS at once and its refusal reaches
/// the caller.
#[test]
fn an_attribute_change_the_nas_refuses_later_is_undone_and_the_next_are_refused_at_once() {
    if common::skip_over_nfs("chattr works on the server's directory only") {
        return;
    }
    let mut m = Mount::prepare("writeback_delay=1h,actimeo=600");
    for f in ["a", "b", "c"] {
        fs::write(m.nas.join(f), f).unwrap();
        fs::set_permissions(m.nas.join(f), fs::Permissions::from_mode(0o644)).unwrap();
    }
    fs::create_dir(m.nas.join("d")).unwrap();
    fs::set_permissions(m.nas.join("d"), fs::Permissions::from_mode(0o755)).unwrap();
    m.mount();
    let _a = Immutable::set(&m.nas.join("a"));
    let _b = Immutable::set(&m.nas.join("b"));
    let _d = Immutable::set(&m.nas.join("d"));
    assert_eq!(fs::read_dir(m.m("")).unwrap().count(), 4);
    let xattrs = !over_nfs();
    if xattrs {
        common::xlist(&m.m("a"));
    }
    // The NAS takes a first change at once (and so shows it would).
    fs::set_permissions(m.m("c"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(m.n("c")).unwrap().mode() & 0o7777, 0o640);
    let before = m.stats()["nas_ops"];
    fs::set_permissions(m.m("a"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(m.m("d"), fs::Permissions::from_mode(0o700)).unwrap();
    if xattrs {
        common::xset(&m.m("a"), "user.t", b"1", 0).unwrap();
    }
    assert_eq!(m.stats()["nas_ops"], before, "kept for later");
    assert_eq!(fs::metadata(m.m("a")).unwrap().mode() & 0o7777, 0o600);
    assert_eq!(fs::metadata(m.m("d")).unwrap().mode() & 0o7777, 0o700);
    m.flush(None);
    let status = m.status();
    let conflicts = if xattrs { 3 } else { 2 };
    assert_eq!(m.status_value("conflicts"), conflicts, "{status}");
    // Shown as the NAS has it again, though cached for ten minutes (the
    // kernel is told from a thread of the daemon's: within a moment).
    let mode = |p: &str| fs::metadata(m.m(p)).unwrap().mode() & 0o7777;
    let t0 = Instant::now();
    while (mode("a"), mode("d")) != (0o644, 0o755) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!((mode("a"), mode("d")), (0o644, 0o755));
    assert_eq!(fs::read_to_string(m.m("a")).unwrap(), "a");
    if xattrs {
        assert_eq!(common::xget(&m.m("a"), "user.t"), Err(libc::ENODATA));
        assert_eq!(common::xset(&m.m("b"), "user.t", b"1", 0), Err(libc::EPERM));
    }
    // The NAS refused: the next change is its to refuse, at once.
    assert_eq!(
        errno(&fs::set_permissions(
            m.m("b"),
            fs::Permissions::from_mode(0o600)
        )),
        libc::EPERM
    );
    assert_eq!(fs::metadata(m.m("b")).unwrap().mode() & 0o7777, 0o644);
    fs::set_permissions(m.m("c"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        fs::metadata(m.n("c")).unwrap().mode() & 0o7777,
        0o600,
        "made on the NAS at once"
    );
    assert_eq!(m.status_value("conflicts"), conflicts, "{}", m.status());
}

/// Which attribute changes wait: not the first the NAS is asked for (an
/// immutable file's chmod fails at once), nor a mode that grants what the
/// NAS object lacks or a directory's set-group-ID bit (what nassync does
/// on the NAS next may need them first); a mode that takes away does.
#[test]
fn attribute_changes_the_nas_may_refuse_or_needs_first_go_to_it_at_once() {
    if common::skip_over_nfs("chattr works on the server's directory only") {
        return;
    }
    let mut m = Mount::prepare("writeback_delay=1h,actimeo=600");
    for f in ["locked", "f", "r", "g"] {
        fs::write(m.nas.join(f), f).unwrap();
        fs::set_permissions(m.nas.join(f), fs::Permissions::from_mode(0o644)).unwrap();
    }
    fs::create_dir(m.nas.join("d")).unwrap();
    fs::set_permissions(m.nas.join("d"), fs::Permissions::from_mode(0o555)).unwrap();
    m.mount();
    let _l = Immutable::set(&m.nas.join("locked"));
    assert_eq!(fs::read_dir(m.m("")).unwrap().count(), 5);
    let nas = m.nas.clone();
    let nas_mode = |p: &str| fs::metadata(nas.join(p)).unwrap().mode() & 0o7777;
    // Changes of objects made here prove nothing about the NAS.
    fs::write(m.m("new"), "new").unwrap();
    fs::set_permissions(m.m("new"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(m.m("new"), Some(1234), Some(1234)).unwrap();
    fs::metadata(m.m("locked")).unwrap();
    // Nothing proves yet that the NAS takes it: asked, and it refuses.
    assert_eq!(
        errno(&fs::set_permissions(
            m.m("locked"),
            fs::Permissions::from_mode(0o600)
        )),
        libc::EPERM
    );
    assert_eq!(fs::metadata(m.m("locked")).unwrap().mode() & 0o7777, 0o644);
    // The refusal was at once, not after the fact: nothing to undo.
    assert_eq!(m.status_value("conflicts"), 0, "{}", m.status());
    drop(_l);
    // A fresh mount (the refusal stops keeping for the rest of one).
    m.unmount();
    m.mount();
    assert_eq!(fs::read_dir(m.m("")).unwrap().count(), 6);
    fs::set_permissions(m.m("f"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(nas_mode("f"), 0o640, "the first goes to the NAS");
    fs::set_permissions(m.m("f"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(nas_mode("f"), 0o640, "taking away waits");
    fs::set_permissions(m.m("f"), fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(
        nas_mode("f"),
        0o644,
        "granting goes to the NAS, after what waited"
    );
    fs::set_permissions(m.m("d"), fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(nas_mode("d"), 0o755, "granting goes to the NAS");
    fs::set_permissions(m.m("d"), fs::Permissions::from_mode(0o2755)).unwrap();
    assert_eq!(nas_mode("d"), 0o2755, "set-group-ID goes to the NAS");
    fs::set_permissions(m.m("d"), fs::Permissions::from_mode(0o2750)).unwrap();
    assert_eq!(nas_mode("d"), 0o2755, "taking away waits");
    fs::write(m.m("d/new"), "new").unwrap();
    // A file's mode without read for its owner: write-back could not
    // open it to set what follows.
    fs::set_permissions(m.m("r"), fs::Permissions::from_mode(0o200)).unwrap();
    assert_eq!(nas_mode("r"), 0o200, "unreadable goes to the NAS");
    // An ACL set after a kept mode: the mode goes first (set after, it
    // would narrow the ACL's mask again).
    fs::set_permissions(m.m("g"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(nas_mode("g"), 0o644, "taking away waits");
    let acl = Command::new("setfacl")
        .args(["-m", "u:1234:rw"])
        .arg(m.m("g"))
        .status()
        .unwrap();
    assert!(acl.success());
    assert_eq!(nas_mode("g"), 0o660, "the ACL's mask shows as the group's");
    m.flush(None);
    assert_eq!(nas_mode("g"), 0o660, "and stays");
    // A mode without write for the owner of a file with xattrs kept: the
    // xattrs could not be set after it.
    let x = m.m("g");
    fs::metadata(&x).unwrap();
    common::xset(&x, "user.t", b"1", 0).unwrap();
    assert_eq!(common::xget(&nas.join("g"), "user.t"), Err(libc::ENODATA));
    fs::set_permissions(&x, fs::Permissions::from_mode(0o440)).unwrap();
    assert_eq!(nas_mode("g"), 0o440, "goes to the NAS, after the xattr");
    assert_eq!(common::xget(&nas.join("g"), "user.t").unwrap(), b"1");
    m.flush(None);
    assert_eq!(
        (nas_mode("d"), nas_mode("f"), nas_mode("g")),
        (0o2750, 0o644, 0o440)
    );
    assert_eq!(fs::read_to_string(m.n("d/new")).unwrap(), "new");
    assert_eq!(m.status_value("conflicts"), 0, "{}", m.status());
}

/// A file with changes to write back keeps them by a path of it: when
/// that name goes while other links remain (ln f g; rm f), the changes
/// go to the NAS first, so that a crash after it loses none of them.
#[test]
fn changes_of_a_file_whose_name_goes_while_other_links_remain_survive_a_crash() {
    let mut m = Mount::prepare("writeback_delay=1h,actimeo=600");
    for f in ["proof", "chmodded", "written", "other"] {
        fs::write(m.n(f), f).unwrap();
        fs::set_permissions(m.n(f), fs::Permissions::from_mode(0o644)).unwrap();
    }
    m.mount();
    assert_eq!(fs::read_dir(m.m("")).unwrap().count(), 4);
    // (The first chmod goes to the NAS; the next waits.)
    fs::set_permissions(m.m("proof"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(m.m("chmodded"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        fs::metadata(m.n("chmodded")).unwrap().mode() & 0o7777,
        0o644
    );
    fs::write(m.m("written"), "written here").unwrap();
    for f in ["chmodded", "written"] {
        fs::hard_link(m.m(f), m.m(&format!("{f}.link"))).unwrap();
        fs::remove_file(m.m(f)).unwrap();
        fs::File::open(m.m(&format!("{f}.link")))
            .unwrap()
            .sync_all()
            .unwrap();
    }
    // And the other way: ln f l; rm l; chmod f (the file was last known
    // by the name that went).
    fs::metadata(m.m("other")).unwrap();
    fs::hard_link(m.m("other"), m.m("other.link")).unwrap();
    fs::remove_file(m.m("other.link")).unwrap();
    fs::metadata(m.m("other")).unwrap();
    fs::set_permissions(m.m("other"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::File::open(m.m("other")).unwrap().sync_all().unwrap();
    m.kill();
    m.mount();
    let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(&m.m("other")), 0o600);
    assert_eq!(mode(&m.m("chmodded.link")), 0o600);
    assert_eq!(
        fs::read_to_string(m.m("written.link")).unwrap(),
        "written here"
    );
    m.flush(None);
    assert_eq!(mode(&m.n("chmodded.link")), 0o600);
    assert_eq!(
        fs::read_to_string(m.n("written.link")).unwrap(),
        "written here"
    );
    assert!(!m.n("chmodded").exists() && !m.n("written").exists());
    assert_eq!(mode(&m.n("other")), 0o600);
    assert_eq!(m.status_value("conflicts"), 0, "{}", m.status());
}

/// What cannot wait for the write-back delay is removed on the NAS at
/// once: a file open here (its reader keeps it, with no link left, as on
/// a local filesystem) and a file with changes still to write back; what
/// the cache knows fresh is kept for later.
#[test]
fn removals_of_open_or_changed_files_go_to_the_nas_at_once() {
    let mut m = Mount::prepare("writeback_delay=1h,actimeo=600");
    for f in ["open.txt", "changed.txt", "plain.txt"] {
        fs::write(m.nas.join(f), f).unwrap();
    }
    m.mount();
    for f in ["open.txt", "changed.txt", "plain.txt"] {
        fs::metadata(m.m(f)).unwrap();
    }
    let open = fs::File::open(m.m("open.txt")).unwrap();
    fs::remove_file(m.m("open.txt")).unwrap();
    assert!(!m.n("open.txt").exists());
    assert_eq!(open.metadata().unwrap().nlink(), 0);
    let mut got = String::new();
    std::io::Read::read_to_string(&mut &open, &mut got).unwrap();
    assert_eq!(got, "open.txt");
    drop(open);
    fs::write(m.m("changed.txt"), "changed here").unwrap();
    fs::remove_file(m.m("changed.txt")).unwrap();
    assert!(!m.n("changed.txt").exists());
    fs::remove_file(m.m("plain.txt")).unwrap();
    assert!(m.n("plain.txt").exists(), "kept for later");
    m.flush(None);
    assert!(!m.n("plain.txt").exists());
    assert_eq!(fs::read_dir(m.m("")).unwrap().count(), 0);
    assert_eq!(m.status_value("conflicts"), 0, "{}", m.status());
}

/// Extended attributes set on new files and directories stay here with
/// them (no NAS call; `cp -a` and `tar --xattrs` keep their local speed)
/// and reach the NAS with them, a file's before it appears there.
#[test]
fn xattrs_of_new_objects_reach_the_nas_with_them() {
    use common::{xget, xlist, xremove, xset};
    if common::skip_over_nfs("NFSv3 has no extended attributes") {
        return;
    }
    let m = Mount::new("writeback_delay=1h");
    fs::create_dir(m.m("d")).unwrap();
    fs::write(m.m("d/f"), "data").unwrap();
    let before = m.stats()["nas_ops"];
    xset(&m.m("d"), "user.dir", b"D", 0).unwrap();
    xset(&m.m("d/f"), "user.one", b"1", 0).unwrap();
    xset(&m.m("d/f"), "user.two", b"2", 0).unwrap();
    assert_eq!(
        xset(&m.m("d/f"), "user.one", b"x", libc::XATTR_CREATE),
        Err(libc::EEXIST)
    );
    assert_eq!(
        xset(&m.m("d/f"), "user.no", b"x", libc::XATTR_REPLACE),
        Err(libc::ENODATA)
    );
    xremove(&m.m("d/f"), "user.two").unwrap();
    assert_eq!(xremove(&m.m("d/f"), "user.two"), Err(libc::ENODATA));
    assert_eq!(xget(&m.m("d/f"), "user.one"), Ok(b"1".to_vec()));
    assert_eq!(xget(&m.m("d/f"), "user.two"), Err(libc::ENODATA));
    assert_eq!(xlist(&m.m("d/f")), ["user.one"]);
    assert_eq!(xget(&m.m("d"), "user.dir"), Ok(b"D".to_vec()));
    assert_eq!(m.stats()["nas_ops"], before, "kept here");
    assert!(!m.n("d").exists());
    m.flush(None);
    assert_eq!(xget(&m.n("d/f"), "user.one"), Ok(b"1".to_vec()));
    assert_eq!(xlist(&m.n("d/f")), ["user.one"]);
    assert_eq!(xget(&m.n("d"), "user.dir"), Ok(b"D".to_vec()));
    assert_eq!(fs::read_to_string(m.n("d/f")).unwrap(), "data");
    assert_eq!(m.status_value("conflicts"), 0, "{}", m.status());
}
