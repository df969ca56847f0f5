//! Cache behaviour through a real mount: changes made on the NAS behind
//! nassync's back, persistence of the disk cache across remounts, readdir
//! offsets while a directory changes, and concurrent readers and writers.

mod common;

use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::{Duration, Instant};

use common::Mount;

/// Waits up to `limit` for `f` to hold, polling.
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

#[test]
fn an_external_change_is_seen_at_the_next_open() {
    // Long time limits: only close-to-open can reveal the change.
    let m = Mount::new("actimeo=60");
    fs::write(m.n("f"), "version one").unwrap();
    assert_eq!(fs::read_to_string(m.m("f")).unwrap(), "version one");
    // Same size, so only mtime/ctime tell the versions apart.
    std::thread::sleep(Duration::from_millis(20));
    fs::write(m.n("f"), "version two").unwrap();
    assert_eq!(fs::read_to_string(m.m("f")).unwrap(), "version two");
    assert!(m.stats()["invalidations"] >= 1);
    // Replaced by another client (a new file under the name, as a save
    // through a temporary file elsewhere makes): the next open finds it.
    fs::remove_file(m.n("f")).unwrap();
    fs::write(m.n("f"), "version three").unwrap();
    assert_eq!(fs::read_to_string(m.m("f")).unwrap(), "version three");
}

#[test]
fn an_external_change_is_seen_after_the_time_limit() {
    let m = Mount::new("actimeo=1");
    fs::write(m.n("f"), "short").unwrap();
    fs::create_dir(m.n("d")).unwrap();
    let f = fs::File::open(m.m("f")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 5);
    assert!(!m.m("d/new").exists());
    fs::write(m.n("f"), "much longer now").unwrap();
    fs::write(m.n("d/new"), "x").unwrap();
    // Through the descriptor that is still open: attributes expire.
    assert!(eventually(Duration::from_secs(5), || f
        .metadata()
        .unwrap()
        .len()
        == 15));
    let mut buf = [0u8; 15];
    assert!(eventually(Duration::from_secs(5), || {
        f.read_at(&mut buf, 0).is_ok_and(|n| n == 15) && &buf == b"much longer now"
    }));
    // New names appear once the negative entry expires.
    assert!(eventually(Duration::from_secs(5), || m.m("d/new").exists()));
    fs::remove_file(m.n("d/new")).unwrap();
    assert!(eventually(Duration::from_secs(5), || !m
        .m("d/new")
        .exists()));
}

/// A reader that keeps a file open and only reads (no stat) sees a
/// same-size change on the NAS once the attributes expire, as one that
/// opens it again does.
#[test]
fn a_same_size_change_is_seen_through_a_descriptor_kept_open() {
    let m = Mount::new("actimeo=1");
    fs::write(m.n("f"), "version one").unwrap();
    let f = fs::File::open(m.m("f")).unwrap();
    let mut buf = [0u8; 11];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"version one");
    std::thread::sleep(Duration::from_millis(50));
    fs::write(m.n("f"), "version two").unwrap();
    assert!(eventually(Duration::from_secs(10), || {
        f.read_exact_at(&mut buf, 0).is_ok() && &buf == b"version two"
    }));
}

#[test]
fn the_disk_cache_serves_a_remount_without_reading_the_nas() {
    let mut m = Mount::new("block_size=256K");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(m.n("big"), &data).unwrap();
    assert_eq!(fs::read(m.m("big")).unwrap(), data);
    let first = m.stats();
    assert!(first["nas_bytes_read"] >= data.len() as u64);
    m.remount();
    assert_eq!(fs::read(m.m("big")).unwrap(), data);
    let second = m.stats();
    assert_eq!(
        second["nas_bytes_read"], 0,
        "served from the disk cache: {second:?}"
    );
    assert!(second["disk_hits"] >= 11);
    // Changed on the NAS while unmounted: the cache must not serve it.
    m.unmount();
    let mut changed = data.clone();
    changed[1_000_000] ^= 0xff;
    fs::write(m.n("big"), &changed).unwrap();
    m.mount();
    assert_eq!(fs::read(m.m("big")).unwrap(), changed);
}

#[test]
fn a_damaged_disk_cache_block_is_fetched_again() {
    let mut m = Mount::new("block_size=64K");
    let data = vec![7u8; 200_000];
    fs::write(m.n("f"), &data).unwrap();
    assert_eq!(fs::read(m.m("f")).unwrap(), data);
    m.unmount();
    // Flip bytes in every cached data file.
    for src in fs::read_dir(&m.cache).unwrap() {
        let dir = src.unwrap().path().join("data");
        for f in fs::read_dir(dir).unwrap() {
            let f = fs::OpenOptions::new()
                .write(true)
                .open(f.unwrap().path())
                .unwrap();
            f.write_all_at(&[0x55; 16], 70_000).unwrap();
        }
    }
    m.mount();
    assert_eq!(fs::read(m.m("f")).unwrap(), data);
    assert!(m.stats()["disk_corrupt_blocks"] >= 1);
}

#[test]
fn the_cache_directory_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let m = Mount::new("");
    for d in fs::read_dir(&m.cache).unwrap() {
        let mode = d.unwrap().metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}

#[test]
fn readdir_offsets_stay_valid_while_the_directory_changes() {
    let m = Mount::new("");
    fs::create_dir(m.n("d")).unwrap();
    for i in 0..2000 {
        fs::write(m.n(&format!("d/file-with-a-long-name-{i:05}")), "").unwrap();
    }
    // Read the directory in several getdents calls while removing and
    // adding entries: every entry present throughout is returned once.
    let dir = nix::dir::Dir::open(
        &m.m("d"),
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap();
    let mut seen = std::collections::HashMap::new();
    let mut dir = dir;
    for (n, e) in dir.iter().enumerate() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        *seen.entry(name).or_insert(0) += 1;
        if n == 500 {
            for i in 1500..1600 {
                fs::remove_file(m.m(&format!("d/file-with-a-long-name-{i:05}"))).unwrap();
            }
            for i in 0..100 {
                fs::write(m.m(&format!("d/added-{i}")), "").unwrap();
            }
        }
    }
    for i in 0..1500 {
        let name = format!("file-with-a-long-name-{i:05}");
        assert_eq!(seen.get(&name), Some(&1), "{name}");
    }
    assert!(seen.values().all(|c| *c == 1));
}

#[test]
fn concurrent_readers_and_writers_see_consistent_data() {
    let m = Mount::new("block_size=64K");
    let size = 1 << 20;
    for i in 0..4 {
        fs::write(m.m(&format!("f{i}")), vec![i as u8; size]).unwrap();
    }
    fs::write(m.m("shared"), vec![0u8; size]).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let m = &m;
            s.spawn(move || {
                // Own file: write a pattern, read it back.
                let f = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(m.m(&format!("f{t}")))
                    .unwrap();
                let mut rng = fastrand::Rng::with_seed(t as u64);
                for round in 0..200u32 {
                    let off = rng.u64(..(size as u64 - 4096));
                    let val = (round % 250) as u8 + 1;
                    f.write_all_at(&[val; 4096], off).unwrap();
                    let mut back = [0u8; 4096];
                    f.read_exact_at(&mut back, off).unwrap();
                    assert!(back.iter().all(|b| *b == val));
                }
                // Shared file: each thread owns one 4 KiB slot in every
                // 16 KiB; others read concurrently.
                let sh = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(m.m("shared"))
                    .unwrap();
                for k in 0..(size / 16384) as u64 {
                    sh.write_all_at(&[t + 1; 4096], k * 16384 + t as u64 * 4096)
                        .unwrap();
                    let mut buf = vec![0u8; 16384];
                    sh.read_exact_at(&mut buf, k * 16384).unwrap();
                    assert!(
                        buf[t as usize * 4096..(t as usize + 1) * 4096]
                            .iter()
                            .all(|b| *b == t + 1)
                    );
                }
            });
        }
    });
    let mut all = Vec::new();
    fs::File::open(m.m("shared"))
        .unwrap()
        .read_to_end(&mut all)
        .unwrap();
    for (k, chunk) in all.chunks(4096).enumerate() {
        assert!(chunk.iter().all(|b| *b == (k % 4) as u8 + 1), "slot {k}");
    }
    m.flush(None);
    assert_eq!(all, fs::read(m.n("shared")).unwrap());
}

#[test]
fn sequential_reads_prefetch_ahead() {
    let m = Mount::new("block_size=64K,readahead=1M");
    let data: Vec<u8> = (0..4_000_000u32).map(|i| (i % 241) as u8).collect();
    fs::write(m.n("big"), &data).unwrap();
    let mut f = fs::File::open(m.m("big")).unwrap();
    let mut buf = vec![0u8; 128 << 10];
    let mut got = Vec::new();
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, data);
    assert!(m.stats()["readahead_blocks"] > 0);
}

#[test]
fn the_kernel_page_cache_is_kept_across_opens_of_an_unchanged_file() {
    let m = Mount::new("actimeo=60");
    fs::write(m.n("f"), vec![3u8; 500_000]).unwrap();
    assert_eq!(fs::read(m.m("f")).unwrap().len(), 500_000);
    let served =
        |s: &std::collections::HashMap<String, u64>| s["mem_hits"] + s["disk_hits"] + s["misses"];
    let before = served(&m.stats());
    for _ in 0..3 {
        assert_eq!(fs::read(m.m("f")).unwrap().len(), 500_000);
    }
    assert_eq!(
        served(&m.stats()),
        before,
        "re-reads came from the kernel's page cache"
    );
    // Once the file changes on the NAS, the next open drops it.
    fs::write(m.n("f"), vec![4u8; 500_000]).unwrap();
    assert!(fs::read(m.m("f")).unwrap().iter().all(|b| *b == 4));
}

#[test]
fn attributes_of_recently_changed_files_stay_short_lived() {
    // With a long attr_timeout_max, a file that changed moments ago is
    // still revalidated after attr_timeout (its age is tiny); the rule
    // itself is unit-tested in src/fs.rs.
    let m = Mount::new("attr_timeout=300ms,attr_timeout_max=1h,entry_timeout=300ms");
    fs::write(m.n("f"), "short").unwrap();
    let stat = || fs::symlink_metadata(m.m("f")).unwrap().len();
    assert_eq!(stat(), 5);
    fs::write(m.n("f"), "much longer now").unwrap();
    assert!(eventually(Duration::from_secs(5), || stat() == 15));
}

fn getx(p: &std::path::Path, name: &str) -> Result<Vec<u8>, i32> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let name = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the given length.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn setx(p: &std::path::Path, name: &str, value: &[u8]) {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings and a value of the given length.
    let r = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
}

#[test]
fn xattrs_are_cached_with_the_attributes() {
    let m = Mount::new("actimeo=60");
    fs::write(m.n("f"), "x").unwrap();
    setx(&m.n("f"), "user.k", b"one");
    assert_eq!(getx(&m.m("f"), "user.k"), Ok(b"one".to_vec()));
    assert_eq!(getx(&m.m("f"), "user.none"), Err(libc::ENODATA));
    // Asked again while fresh: answered without the NAS (an `ls -l`
    // asks for two attributes of every file).
    // (`nassync stats` itself costs a NAS call or two: measured first.)
    let first = m.stats()["nas_ops"];
    let before = m.stats()["nas_ops"];
    let own = before - first;
    for _ in 0..10 {
        assert_eq!(getx(&m.m("f"), "user.k"), Ok(b"one".to_vec()));
        assert_eq!(getx(&m.m("f"), "user.none"), Err(libc::ENODATA));
    }
    assert_eq!(m.stats()["nas_ops"], before + own);
    // A file's first questions: one listxattr answers every name that is
    // not there, whatever the number of questions.
    fs::write(m.n("g"), "x").unwrap();
    setx(&m.n("g"), "user.k", b"gee");
    assert!(m.m("g").exists());
    let before = m.stats()["nas_ops"];
    for name in ["user.none", "security.selinux", "system.posix_acl_access"] {
        assert_eq!(getx(&m.m("g"), name), Err(libc::ENODATA), "{name}");
    }
    assert_eq!(m.stats()["nas_ops"], before + own + 1);
    // Not listed to every daemon, and so asked of the NAS (once, then
    // cached).
    for _ in 0..3 {
        assert_eq!(getx(&m.m("g"), "trusted.none"), Err(libc::ENODATA));
    }
    assert_eq!(m.stats()["nas_ops"], before + 2 * own + 2);
    assert_eq!(getx(&m.m("g"), "user.k"), Ok(b"gee".to_vec()));
    drop(m);
    // Changed on the NAS (its ctime moves): seen once the attributes expire.
    let m = Mount::new("actimeo=1");
    fs::write(m.n("f"), "x").unwrap();
    setx(&m.n("f"), "user.k", b"one");
    assert_eq!(getx(&m.m("f"), "user.k"), Ok(b"one".to_vec()));
    setx(&m.n("f"), "user.k", b"two");
    assert!(eventually(Duration::from_secs(5), || getx(
        &m.m("f"),
        "user.k"
    ) == Ok(
        b"two".to_vec()
    )));
    // Changed through the mount: seen at once.
    setx(&m.m("f"), "user.k", b"three");
    assert_eq!(getx(&m.m("f"), "user.k"), Ok(b"three".to_vec()));
    setx(&m.m("f"), "user.none", b"now");
    assert_eq!(getx(&m.m("f"), "user.none"), Ok(b"now".to_vec()));
}

#[test]
fn a_fresh_listing_is_served_without_the_nas() {
    let m = Mount::new("actimeo=60");
    fs::create_dir(m.n("d")).unwrap();
    for i in 0..50 {
        fs::write(m.n(&format!("d/f{i}")), "x").unwrap();
    }
    let list = || {
        let mut v: Vec<(String, u64)> = fs::read_dir(m.m("d"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().into_string().unwrap(),
                    e.metadata().unwrap().len(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let first = list();
    assert_eq!(first.len(), 50);
    // (`nassync stats` itself may cost NAS calls: measured first.)
    let r = m.stats();
    let s = m.stats();
    assert_eq!(list(), first);
    let t = m.stats();
    for k in ["nas_readdirs", "nas_getattrs", "nas_lookups"] {
        assert_eq!(t[k] - s[k], s[k] - r[k], "{k}: asked the NAS again");
    }
    // A name added through the mount is in the next listing at once.
    fs::write(m.m("d/new"), "y").unwrap();
    assert!(list().iter().any(|(n, _)| n == "new"));
    fs::remove_file(m.m("d/f0")).unwrap();
    assert!(!list().iter().any(|(n, _)| n == "f0"));
}

#[test]
fn the_kernel_serves_a_listing_again_only_while_it_is_current() {
    let m = Mount::new("actimeo=60");
    fs::create_dir(m.n("d")).unwrap();
    for i in 0..50 {
        fs::write(m.n(&format!("d/f{i}")), "x").unwrap();
    }
    let list = |m: &Mount| {
        let mut v: Vec<String> = fs::read_dir(m.m("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(list(&m).len(), 50);
    // Listed again: the kernel's copy. Only opendir, releasedir and perhaps
    // a getattr of the directory (just changed: short-lived attributes)
    // reach nassync, no readdir (`nassync stats` makes no FUSE request).
    let before = m.stats()["fuse_ops"];
    assert_eq!(list(&m).len(), 50);
    assert!(m.stats()["fuse_ops"] - before <= 3);
    // Changes through the mount are in the next listing at once.
    fs::remove_file(m.m("d/f0")).unwrap();
    fs::write(m.m("d/own"), "z").unwrap();
    let l = list(&m);
    assert!(!l.contains(&"f0".to_string()) && l.contains(&"own".to_string()));
    drop(m);
    // Short time limits: a name added on the NAS shows up by itself.
    let m = Mount::new("actimeo=1");
    fs::create_dir_all(m.n("d")).unwrap();
    assert!(!list(&m).contains(&"late".to_string()));
    assert!(!list(&m).contains(&"late".to_string()));
    // Even when the directory's mtime is put back (as tar and rsync do),
    // which the kernel's own check of its copy would not notice.
    let mtime = fs::metadata(m.n("d")).unwrap().modified().unwrap();
    fs::write(m.n("d/late"), "w").unwrap();
    fs::File::open(m.n("d"))
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || list(&m)
        .contains(&"late".to_string())));
}

#[test]
fn a_large_directory_is_listed_whole_and_right() {
    // More entries than one lookup batch (128): batches run side by side.
    let m = Mount::new("");
    fs::create_dir(m.n("big")).unwrap();
    for i in 0..700 {
        fs::write(m.n(&format!("big/f{i:03}")), "x".repeat(i % 17)).unwrap();
    }
    fs::create_dir(m.n("big/sub")).unwrap();
    std::os::unix::fs::symlink("f001", m.n("big/link")).unwrap();
    let list = |dir: &std::path::Path| {
        let mut v: Vec<(String, u64, bool, u64)> = fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let md = fs::symlink_metadata(e.path()).unwrap();
                let ino = std::os::unix::fs::MetadataExt::ino(&md);
                (
                    e.file_name().into_string().unwrap(),
                    md.len(),
                    md.is_dir(),
                    ino,
                )
            })
            .collect();
        v.sort();
        v
    };
    let through = list(&m.m("big"));
    let direct = list(&m.n("big"));
    assert_eq!(through.len(), 702);
    assert_eq!(through, direct);
}

#[test]
fn a_random_read_fetches_what_it_needs_not_a_whole_block() {
    let m = Mount::new("block_size=1M");
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 253) as u8).collect();
    fs::write(m.n("f"), &data).unwrap();
    // O_DIRECT: the reads reach nassync as they are (no kernel readahead).
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.m("f"))
        .unwrap();
    let before = m.stats()["nas_bytes_read"];
    let mut buf = vec![0u8; 4096];
    for k in [7u64, 3, 5, 1, 6, 2] {
        let off = k * (1 << 20) + 8192;
        f.read_exact_at(&mut buf, off).unwrap();
        assert_eq!(buf[..], data[off as usize..off as usize + 4096]);
    }
    let read = m.stats()["nas_bytes_read"] - before;
    assert!(read <= 6 * 4096 * 2, "{read} bytes read from the NAS");
    // Reading on from there is sequential: whole blocks and readahead.
    f.read_exact_at(&mut buf, 2 * (1 << 20) + 8192 + 4096)
        .unwrap();
    assert!(m.stats()["nas_bytes_read"] - before >= 1 << 20);
}

/// Names from raw getdents64 calls of `bufsize` bytes on `fd`, until the
/// end or `max` calls.
fn getdents(fd: i32, bufsize: usize, max: usize) -> Vec<String> {
    let mut names = Vec::new();
    let mut buf = vec![0u8; bufsize];
    for _ in 0..max {
        // SAFETY: a buffer of the given length.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
        assert!(n >= 0, "{}", std::io::Error::last_os_error());
        if n == 0 {
            break;
        }
        let mut off = 0usize;
        while off < n as usize {
            let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
            let name = &buf[off + 19..off + reclen];
            let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
            names.push(String::from_utf8_lossy(&name[..end]).into_owned());
            off += reclen;
        }
    }
    names
}

#[test]
fn a_name_unlinked_while_a_directory_is_read_does_not_come_back() {
    // fstests generic/637: reading on through a handle opened before the
    // unlink may show the name; a handle opened after it must not.
    let m = Mount::new("");
    fs::create_dir(m.m("d")).unwrap();
    for i in 1..=100 {
        fs::write(m.m(&format!("d/{i}")), "").unwrap();
    }
    for victim in ["10", "20", "50", "90"] {
        let old = fs::File::open(m.m("d")).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&old);
        let first = getdents(fd, 200, 1);
        assert!(!first.is_empty());
        fs::remove_file(m.m(&format!("d/{victim}"))).unwrap();
        let new = fs::File::open(m.m("d")).unwrap();
        getdents(fd, 200, 10_000); // the old handle reads on
        let names = getdents(std::os::fd::AsRawFd::as_raw_fd(&new), 200, 10_000);
        assert!(!names.iter().any(|n| n == victim), "stale entry {victim}");
        assert!(!m.m(&format!("d/{victim}")).exists());
    }
}

#[test]
fn listing_again_and_again_does_not_keep_attributes_fresh() {
    // A directory polled faster than attr_timeout must still see a change
    // made on the NAS once the attributes expire.
    let m = Mount::new("actimeo=1");
    fs::create_dir(m.n("d")).unwrap();
    fs::write(m.n("d/f"), "short").unwrap();
    let size = || {
        fs::read_dir(m.m("d"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .next()
    };
    assert_eq!(size(), Some(5));
    fs::write(m.n("d/f"), "much longer now").unwrap();
    let seen = eventually(Duration::from_secs(6), || {
        std::thread::sleep(Duration::from_millis(250));
        size() == Some(15)
    });
    assert!(
        seen,
        "the change was never seen while the directory was polled"
    );
}

#[test]
fn a_tree_with_more_entries_than_the_daemon_has_descriptors_can_be_walked() {
    // Each inode the kernel holds keeps a descriptor open in the daemon
    // (a directory source's nodes), and the kernel keeps names until
    // memory runs short: the daemon asks it to drop some before it runs
    // out (EMFILE), here with a limit it cannot raise.
    let mut m = Mount::prepare("");
    m.nofile = Some(2048);
    for d in 0..20 {
        let dir = m.nas.join(format!("d{d:02}"));
        fs::create_dir(&dir).unwrap();
        for f in 0..250 {
            fs::write(dir.join(format!("f{f:03}")), format!("{d} {f}")).unwrap();
        }
    }
    m.mount();
    let limits = fs::read_to_string(format!("/proc/{}/limits", m.pid())).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 2048 ")),
        "{limits}"
    );
    // The most descriptors held at once, sampled while the tree is
    // walked: shedding lags behind a walk (forgets come later), and the
    // daemon must keep room for files opened meanwhile.
    let walking = std::sync::atomic::AtomicBool::new(true);
    std::thread::scope(|sc| {
        let peak = sc.spawn(|| {
            let mut peak = 0;
            while walking.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(descriptors(&m));
                std::thread::sleep(Duration::from_millis(2));
            }
            peak
        });
        let walked = std::panic::catch_unwind(|| walk(&m));
        walking.store(false, std::sync::atomic::Ordering::Relaxed);
        let peak = peak.join().unwrap();
        if let Err(e) = walked {
            std::panic::resume_unwind(e);
        }
        assert!(peak <= 2048 * 7 / 8, "{peak} descriptors open at once");
    });
    assert!(m.stats()["kernel_names_dropped"] > 0);
    m.unmount();
    assert!(m.last_exit.unwrap().success(), "{}", m.log());
}

/// How many descriptors the daemon has open.
fn descriptors(m: &Mount) -> usize {
    fs::read_dir(format!("/proc/{}/fd", m.pid()))
        .unwrap()
        .count()
}

fn walk(m: &Mount) {
    for pass in 0..2 {
        let mut seen = 0;
        for d in 0..20 {
            let dir = m.m(&format!("d{d:02}"));
            for e in fs::read_dir(&dir).unwrap() {
                let e = e.unwrap();
                fs::symlink_metadata(e.path()).unwrap();
                seen += 1;
            }
            for f in (0..250).step_by(25) {
                let p = dir.join(format!("f{f:03}"));
                assert_eq!(
                    fs::read_to_string(&p).unwrap(),
                    format!("{d} {f}"),
                    "pass {pass}"
                );
            }
        }
        assert_eq!(seen, 5000);
        let fds = descriptors(m);
        assert!(fds < 2048, "{fds} descriptors open");
    }
}
