//! Cache behaviour through a real mount: changes made on the NAS behind
//! nassync's back, persistence of the disk cache across remounts, readdir
//! offsets while a directory changes, and concurrent readers and writers.

mod common;

use std::fs;
use std::io::Read;
use std::os::unix::fs::FileExt;
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
