//! Write-back at the core, without a kernel: a randomized model test with
//! the write-back thread running alongside, failure injection through the
//! instrumented backend, and the delta byte counts of docs/WRITEBACK.md.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nassync::backend::dir::DirBackend;
use nassync::backend::instrumented::{Fault, FaultControl, Instrumented};
use nassync::backend::{Creds, SetAttr};
use nassync::cache::disk::DiskCache;
use nassync::data::DataCache;
use nassync::fs::{Core, FsConfig, ROOT, map_ino};
use nassync::killpriv::Modifier;
use nassync::stats::Stats;
use nassync::writeback::{WbConfig, WriteBack};

type B = Instrumented<DirBackend>;

struct Setup {
    core: Arc<Core<B>>,
    wb: Arc<WriteBack<B>>,
    faults: Arc<FaultControl>,
    stats: Arc<Stats>,
    nas: tempfile::TempDir,
    _cache: tempfile::TempDir,
}

fn setup(delay: Duration, block: u64, disk: u64) -> Setup {
    let nas = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    setup_in(nas, cache, delay, block, disk, true)
}

thread_local! {
    static MAX_DIRTY: std::cell::Cell<u64> = const { std::cell::Cell::new(1 << 40) };
}

fn setup_in(
    nas: tempfile::TempDir,
    cache: tempfile::TempDir,
    delay: Duration,
    block: u64,
    disk: u64,
    thread: bool,
) -> Setup {
    let stats = Arc::new(Stats::default());
    let backend = Arc::new(Instrumented::new(
        DirBackend::new(nas.path()).unwrap(),
        stats.clone(),
    ));
    let faults = backend.faults();
    let disk = (disk > 0).then(|| DiskCache::open(cache.path(), block, disk).unwrap());
    let data = DataCache::new(1 << 20, disk, block, 0, stats.clone());
    let cfg = FsConfig {
        attr_timeout: Duration::from_millis(50),
        attr_timeout_max: Duration::from_millis(50),
        entry_timeout: Duration::from_millis(50),
        entry_timeout_max: Duration::from_millis(50),
        negative_timeout: Duration::ZERO,
        readahead: 0,
        uid: None,
        gid: None,
        umask: None,
    };
    let mut core = Core::new(backend.clone(), cfg, data.clone(), stats.clone()).unwrap();
    let root = core.root_nas_ino();
    let journal = Arc::new(nassync::writeback::journal::Journal::open(cache.path()).unwrap());
    let wb = WriteBack::open(
        journal,
        backend,
        data,
        WbConfig {
            delay,
            max_dirty: MAX_DIRTY.with(|m| m.get()),
            host: "testhost".into(),
        },
        Box::new(move |i| map_ino(root, i)),
    )
    .unwrap();
    core.set_writeback(wb.clone());
    if thread {
        wb.start().unwrap();
    }
    Setup {
        core: Arc::new(core),
        wb,
        faults,
        stats,
        nas,
        _cache: cache,
    }
}

const ROOT_WHO: Modifier = Modifier {
    uid: 0,
    gid: 0,
    pid: 0,
    privileged: Some(true),
};

const ROOT_CREDS: Creds = Creds {
    uid: 0,
    gid: 0,
    umask: 0,
};

fn flush(wb: &WriteBack<B>, within: Duration) -> (u64, u64) {
    wb.flush(None, Some(Instant::now() + within), &mut |_, _| true)
}

#[test]
fn random_operations_with_write_back_running_alongside() {
    random_operations(true);
}

/// The same, with write-back run at chosen steps: replayable exactly.
#[test]
fn random_operations_with_write_back_in_between() {
    random_operations(false);
}

fn random_operations(thread: bool) {
    let seed = std::env::var("NASSYNC_MODEL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("seed {seed}");
    let s = setup_in(
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        Duration::ZERO,
        64 << 10,
        2 << 20,
        thread,
    );
    let mut rng = fastrand::Rng::with_seed(seed);
    let names = ["a", "b", "c"];
    let mut model: Vec<Vec<u8>> = vec![Vec::new(); 3];
    let mut fhs = Vec::new();
    let mut inos = Vec::new();
    for n in names {
        let (e, o) = s
            .core
            .create(ROOT, OsStr::new(n), 0o644, libc::O_RDWR, ROOT_CREDS)
            .unwrap();
        inos.push(e.attr.ino);
        fhs.push(o.fh);
    }
    let max: u64 = std::env::var("NASSYNC_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let mut trace = Vec::new();
    for step in 0..3000 {
        let i = rng.usize(..3);
        let len = model[i].len() as u64;
        match rng.u8(..100) {
            0..=39 => {
                let off = rng.u64(..max);
                let n = rng.usize(1..20_000);
                let data: Vec<u8> = (0..n).map(|_| rng.u8(1..)).collect();
                trace.push(format!("{step}: write {i} {off}+{n}"));
                s.core.write(fhs[i], off, &data, None).unwrap();
                let f = &mut model[i];
                if f.len() < off as usize + n {
                    f.resize(off as usize + n, 0);
                }
                f[off as usize..off as usize + n].copy_from_slice(&data);
            }
            40..=69 => {
                let off = rng.u64(..max);
                let n = rng.u32(1..30_000);
                trace.push(format!("{step}: read {i} {off}+{n}"));
                let got = s.core.read(fhs[i], off, n).unwrap();
                let f = &model[i];
                let a = (off as usize).min(f.len());
                let b = (off as usize + n as usize).min(f.len());
                if got != f[a..b] {
                    let at = got.iter().zip(&f[a..b]).position(|(x, y)| x != y);
                    panic!(
                        "seed {seed}: read differs (len {} vs {}, first at {at:?}); trace:\n{}",
                        got.len(),
                        b - a,
                        trace[trace.len().saturating_sub(30)..].join("\n")
                    );
                }
            }
            70..=84 => {
                let size = rng.u64(..max);
                trace.push(format!("{step}: truncate {i} {size} (was {len})"));
                let changes = SetAttr {
                    size: Some(size),
                    ..Default::default()
                };
                s.core
                    .setattr(inos[i], Some(fhs[i]), &changes, None)
                    .unwrap();
                model[i].resize(size as usize, 0);
            }
            85..=86 => {
                let off = rng.u64(..max);
                let n = rng.u64(1..max / 2);
                trace.push(format!("{step}: fallocate {i} {off}+{n} (was {len})"));
                s.core.fallocate(fhs[i], off, n, 0, &ROOT_WHO).unwrap();
                if model[i].len() < (off + n) as usize {
                    model[i].resize((off + n) as usize, 0);
                }
            }
            87 => {
                let j = (i + 1) % 3;
                trace.push(format!("{step}: swap {i} {j}"));
                let (a, b) = (OsStr::new(names[i]), OsStr::new(names[j]));
                let t = OsStr::new("tmp");
                let f = Default::default();
                s.core.rename(ROOT, a, ROOT, t, f).unwrap();
                s.core.rename(ROOT, b, ROOT, a, f).unwrap();
                s.core.rename(ROOT, t, ROOT, b, f).unwrap();
                model.swap(i, j);
                fhs.swap(i, j);
                inos.swap(i, j);
            }
            88..=89 => {
                trace.push(format!("{step}: fsync {i}"));
                s.core.fsync(fhs[i], false).unwrap();
            }
            90..=94 => {
                trace.push(format!("{step}: reopen {i}"));
                s.core.flush(fhs[i]).unwrap();
                s.core.release(fhs[i]).unwrap();
                fhs[i] = s.core.open(inos[i], libc::O_RDWR).unwrap().fh;
            }
            _ => {
                trace.push(format!("{step}: write-back"));
                if thread {
                    std::thread::sleep(Duration::from_millis(rng.u64(0..5)));
                } else {
                    s.wb.write_back_now();
                }
            }
        }
        if std::env::var("NASSYNC_FULL_CHECK").is_ok() {
            for k in 0..3 {
                let all = s.core.read(fhs[k], 0, model[k].len() as u32 + 1).unwrap();
                if all != model[k] {
                    let at = all.iter().zip(&model[k]).position(|(x, y)| x != y);
                    panic!(
                        "seed {seed}: file {k} wrong after step {step} (len {} vs {}, first at {at:?}); trace:\n{}",
                        all.len(),
                        model[k].len(),
                        trace[trace.len().saturating_sub(12)..].join("\n")
                    );
                }
            }
        }
        let (attr, _) = s.core.getattr(inos[i], Some(fhs[i])).unwrap();
        assert_eq!(
            attr.size,
            model[i].len() as u64,
            "seed {seed}: size of {i} after step {step}; trace:\n{}",
            trace[trace.len().saturating_sub(30)..].join("\n")
        );
    }
    if thread {
        assert_eq!(flush(&s.wb, Duration::from_secs(60)).0, 0);
    } else {
        s.wb.write_back_now();
        assert_eq!(s.wb.pending(None).0, 0);
    }
    let (_, conflicts, counters) = s.wb.status();
    assert!(conflicts.is_empty(), "seed {seed}: {conflicts:?}");
    assert_eq!(counters[3], 0);
    for (i, n) in names.iter().enumerate() {
        let nas = std::fs::read(s.nas.path().join(n)).unwrap();
        if nas != model[i] {
            let at = nas.iter().zip(&model[i]).position(|(a, b)| a != b);
            let run = at.map(|a| {
                nas[a..]
                    .iter()
                    .zip(&model[i][a..])
                    .take_while(|(x, y)| x != y)
                    .count()
            });
            let via = s.core.read(fhs[i], 0, model[i].len() as u32 + 10).unwrap();
            panic!(
                "seed {seed}: NAS content of {n}: len {} vs {}, first difference at {at:?} for {run:?} bytes, model there {:?}, through the core {}; trace:\n{}",
                nas.len(),
                model[i].len(),
                at.map(|a| &model[i][a..(a + 8).min(model[i].len())]),
                if via == model[i] { "right" } else { "wrong" },
                trace.join("\n")
            );
        }
    }
}

fn open_file(core: &Core<B>, name: &str) -> (u64, u64) {
    let e = core.lookup(ROOT, OsStr::new(name)).unwrap();
    let fh = core.open(e.attr.ino, libc::O_RDWR).unwrap().fh;
    (e.attr.ino, fh)
}

#[test]
fn nas_errors_keep_changes_pending_retried_and_shown() {
    for errno in [libc::EIO, libc::ENOSPC, libc::EACCES] {
        let s = setup(Duration::ZERO, 4096, 1 << 20);
        std::fs::write(s.nas.path().join("f"), b"old").unwrap();
        let (_, fh) = open_file(&s.core, "f");
        s.core.write(fh, 0, b"new content", None).unwrap();
        s.faults.set(Fault::Fail(errno), Some("write"));
        assert_eq!(flush(&s.wb, Duration::from_secs(2)).0, 1, "errno {errno}");
        let (pending, _, counters) = s.wb.status();
        assert_eq!(pending.len(), 1);
        assert!(pending[0].attempts >= 1, "{pending:?}");
        let err = pending[0].error.clone().unwrap_or_default();
        let text = std::io::Error::from_raw_os_error(errno).to_string();
        assert!(err.contains(&text), "{err:?} should say {text:?}");
        assert!(counters[2] >= 1, "retries counted");
        // Nothing lost meanwhile: the local view has it.
        assert_eq!(s.core.read(fh, 0, 100).unwrap(), b"new content");
        s.faults.set(Fault::None, None);
        assert_eq!(flush(&s.wb, Duration::from_secs(60)).0, 0);
        assert_eq!(
            std::fs::read(s.nas.path().join("f")).unwrap(),
            b"new content"
        );
        assert!(s.wb.status().1.is_empty(), "no conflict from our own retry");
    }
}

#[test]
fn a_hung_nas_stalls_neither_reads_nor_writes() {
    let s = setup(Duration::ZERO, 4096, 1 << 20);
    std::fs::write(s.nas.path().join("f"), vec![b'o'; 10_000]).unwrap();
    let (_, fh) = open_file(&s.core, "f");
    assert_eq!(s.core.read(fh, 0, 10).unwrap(), b"oooooooooo");
    s.faults.set(Fault::Stall, Some("write"));
    s.core.write(fh, 0, b"first", None).unwrap();
    // Write-back is now stuck in the NAS.
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.faults.stalled() == 0 {
        assert!(
            Instant::now() < deadline,
            "write-back never reached the NAS"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Local work goes on.
    s.core.write(fh, 5000, b"second", None).unwrap();
    let got = s.core.read(fh, 0, 10_000).unwrap();
    assert_eq!(&got[..5], b"first");
    assert_eq!(&got[5000..5006], b"second");
    assert_eq!(flush(&s.wb, Duration::from_millis(300)).0, 1);
    s.faults.set(Fault::None, None);
    assert_eq!(flush(&s.wb, Duration::from_secs(60)).0, 0);
    assert_eq!(std::fs::read(s.nas.path().join("f")).unwrap(), got);
}

/// The figures of docs/WRITEBACK.md: bytes written to the NAS, counted by
/// the instrumented backend.
#[test]
fn only_what_changed_reaches_the_nas() {
    const MIB: u64 = 1 << 20;
    let s = setup(Duration::from_secs(3600), MIB, 0);
    let written = || {
        s.stats
            .nas_bytes_written
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let mut rng = fastrand::Rng::with_seed(11);

    // 1 MiB changed inside a 1 GiB file.
    std::fs::File::create(s.nas.path().join("huge"))
        .unwrap()
        .set_len(1024 * MIB)
        .unwrap();
    let (_, fh) = open_file(&s.core, "huge");
    let change: Vec<u8> = (0..MIB).map(|_| rng.u8(..)).collect();
    let before = written();
    s.core.write(fh, 512 * MIB + 12345, &change, None).unwrap();
    assert_eq!(flush(&s.wb, Duration::from_secs(120)).0, 0);
    let in_place = written() - before;
    eprintln!("1 MiB changed in a 1 GiB file: {in_place} bytes written to the NAS");
    assert!(in_place <= 2 * MIB, "{in_place}");

    // A 256 MiB file rewritten from scratch (O_TRUNC), 1 MiB of it
    // different.
    let base: Vec<u8> = (0..256 * MIB).map(|_| rng.u8(..)).collect();
    std::fs::write(s.nas.path().join("doc"), &base).unwrap();
    let mut new = base.clone();
    for b in &mut new[(100 * MIB) as usize..(101 * MIB) as usize] {
        *b = rng.u8(..);
    }
    let (ino, fh) = open_file(&s.core, "doc");
    let before = written();
    let truncate = SetAttr {
        size: Some(0),
        ..Default::default()
    };
    s.core.setattr(ino, Some(fh), &truncate, None).unwrap();
    for (i, chunk) in new.chunks(MIB as usize).enumerate() {
        s.core.write(fh, i as u64 * MIB, chunk, None).unwrap();
    }
    assert_eq!(flush(&s.wb, Duration::from_secs(300)).0, 0);
    let rewrite = written() - before;
    eprintln!(
        "256 MiB rewritten with O_TRUNC, 1 MiB different: {rewrite} bytes written to the NAS"
    );
    assert!(rewrite <= 8 * MIB, "{rewrite}");
    assert!(std::fs::read(s.nas.path().join("doc")).unwrap() == new);

    // The same saved through a temporary file renamed over the original.
    std::fs::write(s.nas.path().join("doc2"), &base).unwrap();
    let (doc2, fh2) = open_file(&s.core, "doc2");
    // Closed, as an editor has it when it saves (a replaced file still
    // open keeps its old content, so is replaced the usual way).
    s.core.release(fh2).unwrap();
    let (e, o) = s
        .core
        .create(
            ROOT,
            OsStr::new("doc2.tmp"),
            0o644,
            libc::O_RDWR,
            ROOT_CREDS,
        )
        .unwrap();
    let before = written();
    for (i, chunk) in new.chunks(MIB as usize).enumerate() {
        s.core.write(o.fh, i as u64 * MIB, chunk, None).unwrap();
    }
    s.core.fsync(o.fh, false).unwrap();
    s.core.release(o.fh).unwrap();
    let _ = e;
    let plain = Default::default();
    s.core
        .rename(
            ROOT,
            OsStr::new("doc2.tmp"),
            ROOT,
            OsStr::new("doc2"),
            plain,
        )
        .unwrap();
    assert_eq!(flush(&s.wb, Duration::from_secs(300)).0, 0);
    let renamed = written() - before;
    eprintln!(
        "256 MiB saved through a temporary file and a rename, 1 MiB different: {renamed} bytes written to the NAS"
    );
    assert!(renamed <= 8 * MIB, "{renamed}");
    assert!(std::fs::read(s.nas.path().join("doc2")).unwrap() == new);
    assert!(!s.nas.path().join("doc2.tmp").exists());
    let nas_ino = std::fs::metadata(s.nas.path().join("doc2")).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&nas_ino),
        map_ino(s.core.root_nas_ino(), doc2)
    );
}

#[test]
fn writers_wait_while_too_much_is_pending() {
    const LIMIT: u64 = 256 << 10;
    const CHUNK: usize = 64 << 10;
    MAX_DIRTY.with(|m| m.set(LIMIT));
    let s = setup(Duration::from_secs(3600), 4096, 1 << 20);
    MAX_DIRTY.with(|m| m.set(1 << 40));
    std::fs::write(s.nas.path().join("f"), b"").unwrap();
    let (_, fh) = open_file(&s.core, "f");
    // The NAS hangs: nothing can be written back.
    s.faults.set(Fault::Stall, Some("write"));
    let writer = {
        let core = s.core.clone();
        std::thread::spawn(move || {
            for i in 0..32u64 {
                core.write(fh, i * CHUNK as u64, &[i as u8 + 1; CHUNK], None)
                    .unwrap();
            }
        })
    };
    // The writer is held back: what is pending never goes much past the
    // limit (one write beyond it), however long it tries.
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.faults.stalled() == 0 {
        assert!(Instant::now() < deadline, "write-back never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    for _ in 0..20 {
        assert!(
            s.wb.dirty_bytes() <= LIMIT + CHUNK as u64,
            "{}",
            s.wb.dirty_bytes()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!writer.is_finished());
    // The NAS is back: the writer finishes and everything arrives.
    s.faults.set(Fault::None, None);
    writer.join().unwrap();
    assert_eq!(flush(&s.wb, Duration::from_secs(60)).0, 0);
    let nas = std::fs::read(s.nas.path().join("f")).unwrap();
    assert_eq!(nas.len(), 32 * CHUNK);
    for (i, c) in nas.chunks(CHUNK).enumerate() {
        assert!(c.iter().all(|b| *b == i as u8 + 1), "chunk {i}");
    }
}

#[test]
fn a_file_unlinked_while_written_back_is_not_counted_twice() {
    const LIMIT: u64 = 64 << 10;
    MAX_DIRTY.with(|m| m.set(LIMIT));
    let s = setup(Duration::ZERO, 4096, 1 << 20);
    MAX_DIRTY.with(|m| m.set(1 << 40));
    std::fs::write(s.nas.path().join("f"), b"").unwrap();
    let (_, fh) = open_file(&s.core, "f");
    s.faults.set(Fault::Stall, Some("write"));
    s.core.write(fh, 0, &[1u8; 40_000], None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.faults.stalled() == 0 {
        assert!(Instant::now() < deadline, "write-back never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Removed while its write-back is in the NAS.
    s.core.release(fh).unwrap();
    s.core.unlink(ROOT, OsStr::new("f")).unwrap();
    s.faults.set(Fault::None, None);
    assert_eq!(flush(&s.wb, Duration::from_secs(60)).0, 0);
    assert_eq!(s.wb.dirty_bytes(), 0);
    // Writers are not held back by bytes that are no longer pending.
    std::fs::write(s.nas.path().join("g"), b"").unwrap();
    let (_, fh) = open_file(&s.core, "g");
    s.core.write(fh, 0, &[2u8; 40_000], None).unwrap();
    assert_eq!(s.wb.dirty_bytes(), 40_000);
    assert_eq!(flush(&s.wb, Duration::from_secs(60)).0, 0);
    assert_eq!(s.wb.dirty_bytes(), 0);
}

/// A write-back attempt that finds its file gone while this mount is
/// removing it must not take that for another client's removal and
/// restore the file (the crash loop once saw a deleted file come back).
#[test]
fn a_file_unlinked_here_while_its_write_back_looks_for_it_stays_gone() {
    let s = setup(Duration::ZERO, 4096, 1 << 20);
    std::fs::write(s.nas.path().join("f"), b"old").unwrap();
    let (_, fh) = open_file(&s.core, "f");
    s.faults.set(Fault::Stall, Some("getattr"));
    s.core.write(fh, 0, b"new content", None).unwrap();
    s.core.release(fh).unwrap();
    let wait_stalled = |n: u64, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.faults.stalled() < n {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // The attempt asks the NAS about the file...
    wait_stalled(1, "write-back never asked for the file");
    // ...which is unlinked here meanwhile (the unlink waits, in turn, in its
    // getattr of the file, before write-back hears of it).
    let core = s.core.clone();
    let unlink = std::thread::spawn(move || core.unlink(ROOT, OsStr::new("f")));
    wait_stalled(2, "the unlink never asked for the file");
    assert!(!s.nas.path().join("f").exists());
    s.faults.set(Fault::None, None);
    unlink.join().unwrap().unwrap();
    assert_eq!(flush(&s.wb, Duration::from_secs(60)).0, 0);
    let left: Vec<_> = std::fs::read_dir(s.nas.path()).unwrap().collect();
    assert!(left.is_empty(), "the file came back: {left:?}");
    assert!(
        s.wb.status().1.is_empty(),
        "no conflict: {:?}",
        s.wb.status().1
    );
}

/// A write-back attempt that looks for its file by path (after a restart)
/// and misses it because this mount renamed it meanwhile, the rename
/// already done and told, must try again at the new path, not restore
/// the file at the old one (the crash loop saw a renamed file come back
/// beside its new name, which lacked the pending data).
#[test]
fn a_file_renamed_here_while_its_write_back_looks_for_it_is_not_restored() {
    let nas = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    std::fs::write(nas.path().join("f"), b"old").unwrap();
    let s = setup_in(nas, cache, Duration::from_secs(3600), 4096, 1 << 20, false);
    let (_, fh) = open_file(&s.core, "f");
    s.core.write(fh, 0, b"new content", None).unwrap();
    s.core.fsync(fh, false).unwrap();
    s.core.release(fh).unwrap();
    let Setup {
        core,
        wb,
        nas,
        _cache: cache,
        ..
    } = s;
    drop((core, wb));
    // The next mount knows the file by its path only.
    let s = setup_in(nas, cache, Duration::ZERO, 4096, 1 << 20, false);
    s.faults.set(Fault::Stall, Some("lookup"));
    s.wb.start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.faults.stalled() < 1 {
        assert!(Instant::now() < deadline, "write-back never looked");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The rename, as the core makes it: on the NAS, then told.
    let ino =
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(s.nas.path().join("f")).unwrap());
    std::fs::rename(s.nas.path().join("f"), s.nas.path().join("g")).unwrap();
    s.wb.own_meta_op(ino);
    s.wb.renamed(OsStr::new("f"), OsStr::new("g"));
    s.faults.set(Fault::None, None);
    assert_eq!(flush(&s.wb, Duration::from_secs(60)).0, 0);
    assert_eq!(
        std::fs::read(s.nas.path().join("g")).unwrap(),
        b"new content",
        "{:?}",
        s.wb.status()
    );
    assert!(!s.nas.path().join("f").exists(), "restored at the old path");
    assert!(
        s.wb.status().1.is_empty(),
        "no conflict: {:?}",
        s.wb.status().1
    );
}

/// Descriptors open in this process.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// A dirty file holds no descriptor of its own: thousands of them (an
/// untar while the NAS is away) must not run into RLIMIT_NOFILE.
#[test]
fn dirty_files_do_not_each_hold_a_descriptor() {
    let s = setup(Duration::from_secs(3600), 4096, 1 << 20);
    let n = 2000;
    for i in 0..n {
        std::fs::write(s.nas.path().join(format!("f{i}")), b"old").unwrap();
    }
    let before = open_fds();
    for i in 0..n {
        let (ino, fh) = open_file(&s.core, &format!("f{i}"));
        s.core
            .write(fh, 0, format!("new {i}").as_bytes(), None)
            .unwrap();
        s.core.release(fh).unwrap();
        // As the kernel does: its node's own descriptor goes.
        s.core.forget(ino, 1);
    }
    let grown = open_fds().saturating_sub(before);
    // 256 pending files and 256 nodes at most are kept open; other
    // tests of this binary open files meanwhile: a loose bound, far
    // below one per dirty file.
    assert!(grown < 800, "{grown} more descriptors for {n} dirty files");
    assert_eq!(s.wb.status().0.len(), n);
    // Each still reads back, and lands.
    for i in [0, n / 2, n - 1] {
        let (_, fh) = open_file(&s.core, &format!("f{i}"));
        assert_eq!(
            s.core.read(fh, 0, 100).unwrap(),
            format!("new {i}").as_bytes()
        );
        s.core.release(fh).unwrap();
    }
    assert_eq!(flush(&s.wb, Duration::from_secs(120)).0, 0);
    for i in 0..n {
        assert_eq!(
            std::fs::read(s.nas.path().join(format!("f{i}"))).unwrap(),
            format!("new {i}").as_bytes()
        );
    }
}

/// Past the dirty files that keep their NAS node, a file with several
/// links still keeps its own: its path may name a link removed since, and
/// the changes belong to the file, under its other name.
#[test]
fn changes_to_a_file_stay_with_it_when_the_name_they_came_by_is_removed() {
    let s = setup(Duration::from_secs(3600), 4096, 1 << 20);
    for i in 0..300 {
        let name = format!("f{i}");
        std::fs::write(s.nas.path().join(&name), b"old").unwrap();
        let (_, fh) = open_file(&s.core, &name);
        s.core.write(fh, 0, b"new", None).unwrap();
        s.core.release(fh).unwrap();
    }
    std::fs::write(s.nas.path().join("a"), b"old content").unwrap();
    std::fs::hard_link(s.nas.path().join("a"), s.nas.path().join("b")).unwrap();
    let (_, fh) = open_file(&s.core, "a");
    s.core.write(fh, 0, b"new", None).unwrap();
    s.core.release(fh).unwrap();
    s.core.unlink(ROOT, OsStr::new("a")).unwrap();
    assert_eq!(flush(&s.wb, Duration::from_secs(60)).0, 0);
    assert!(
        !s.nas.path().join("a").exists(),
        "the removed name stays removed"
    );
    assert_eq!(
        std::fs::read(s.nas.path().join("b")).unwrap(),
        b"new content"
    );
    assert!(s.wb.status().1.is_empty(), "{:?}", s.wb.status().1);
}

/// A mode and owner set here while the NAS did not answer, which the NAS
/// then refuses (EPERM: a squashed root, a filesystem without owners),
/// are dropped with a conflict: retried, they would keep the file pending
/// for ever (and every later chmod of it with them).
#[test]
fn attributes_the_nas_refuses_are_dropped_with_a_conflict() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let s = setup(Duration::from_secs(3600), 4096, 1 << 20);
    let f = s.nas.path().join("f");
    std::fs::write(&f, b"content").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    let ino = s.core.lookup(ROOT, OsStr::new("f")).unwrap().attr.ino;
    s.faults.set_offline(true);
    let changes = SetAttr {
        mode: Some(0o600),
        uid: Some(4321),
        ..Default::default()
    };
    let (a, _) = s.core.setattr(ino, None, &changes, None).unwrap();
    assert_eq!((a.perm, a.uid), (0o600, 4321));
    assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o7777, 0o644);
    s.faults.set_offline(false);
    s.faults.set(Fault::FailOnce(libc::EPERM), Some("setattr"));
    assert_eq!(flush(&s.wb, Duration::from_secs(30)).0, 0);
    let (pending, conflicts, _) = s.wb.status();
    assert!(pending.is_empty(), "{pending:?}");
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert!(conflicts[0].reason.contains("refused"), "{conflicts:?}");
    let md = std::fs::metadata(&f).unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid()), (0o644, 0));
    let (a, _) = s.core.getattr(ino, None).unwrap();
    assert_eq!((a.perm, a.uid), (0o644, 0));
    assert_eq!(std::fs::read(&f).unwrap(), b"content");
}
