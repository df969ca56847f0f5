//! The core without a kernel: driven directly over a real directory through
//! the instrumented backend, whose faults stand in for a slow or failing
//! NAS.

use std::ffi::OsStr;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use nassync::backend::dir::DirBackend;
use nassync::backend::instrumented::{Fault, Instrumented};
use nassync::backend::{Creds, SetAttr};
use nassync::data::DataCache;
use nassync::fs::{Core, FsConfig, ROOT};
use nassync::stats::Stats;

fn core(
    dir: &std::path::Path,
) -> (
    Arc<Core<Instrumented<DirBackend>>>,
    Arc<nassync::backend::instrumented::FaultControl>,
) {
    core_with(dir, Duration::from_secs(1))
}

/// [`core`] with attributes and entries cached for `ttl`.
fn core_with(
    dir: &std::path::Path,
    ttl: Duration,
) -> (
    Arc<Core<Instrumented<DirBackend>>>,
    Arc<nassync::backend::instrumented::FaultControl>,
) {
    let stats = Arc::new(Stats::default());
    let backend = Instrumented::new(DirBackend::new(dir).unwrap(), stats.clone());
    let faults = backend.faults();
    let data = DataCache::new(8 << 20, None, 64 << 10, 0, stats.clone());
    (
        Arc::new(Core::new(Arc::new(backend), config(ttl), data, stats).unwrap()),
        faults,
    )
}

/// Attributes, entries and negative entries cached for `ttl`.
fn config(ttl: Duration) -> FsConfig {
    FsConfig {
        attr_timeout: ttl,
        attr_timeout_max: ttl,
        entry_timeout: ttl,
        entry_timeout_max: ttl,
        negative_timeout: ttl,
        readahead: 0,
        uid: None,
        gid: None,
        umask: None,
    }
}

const ROOT_CREDS: Creds = Creds {
    uid: 0,
    gid: 0,
    umask: 0,
};

#[test]
fn a_cached_read_completes_while_another_request_is_stuck_in_the_nas() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cached"), vec![1u8; 100_000]).unwrap();
    std::fs::write(dir.path().join("cold"), vec![2u8; 100_000]).unwrap();
    let (core, faults) = core(dir.path());
    let cached = core.lookup(ROOT, OsStr::new("cached")).unwrap().attr.ino;
    let cold = core.lookup(ROOT, OsStr::new("cold")).unwrap().attr.ino;
    let fa = core.open(cached, libc::O_RDONLY).unwrap().fh;
    let fb = core.open(cold, libc::O_RDONLY).unwrap().fh;
    assert_eq!(core.read(fa, 0, 100_000).unwrap(), vec![1u8; 100_000]);

    faults.set(Fault::Stall, Some("read"));
    let (tx, rx) = mpsc::channel();
    let c2 = core.clone();
    let stuck = std::thread::spawn(move || {
        let r = c2.read(fb, 0, 4096);
        tx.send(()).unwrap();
        r
    });
    while faults.stalled() == 0 {
        std::thread::yield_now();
    }
    // The NAS is stuck on the cold read; the cached one still completes.
    assert_eq!(core.read(fa, 50_000, 10).unwrap(), vec![1u8; 10]);
    assert!(core.getattr(cached, None).is_ok());
    assert!(rx.try_recv().is_err(), "the cold read must still be stuck");
    faults.set(Fault::None, None);
    assert_eq!(stuck.join().unwrap().unwrap(), vec![2u8; 4096]);
}

#[test]
fn nas_errors_keep_their_errno() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), "x").unwrap();
    std::fs::create_dir(dir.path().join("d")).unwrap();
    std::fs::write(dir.path().join("d/inside"), "x").unwrap();
    let (core, faults) = core(dir.path());
    fn errno<T>(r: Result<T, nassync::error::FsError>) -> i32 {
        r.map(|_| ()).unwrap_err().errno()
    }
    assert_eq!(
        errno(core.lookup(ROOT, OsStr::new("missing"))),
        libc::ENOENT
    );
    assert_eq!(
        errno(core.mkdir(ROOT, OsStr::new("d"), 0o755, ROOT_CREDS)),
        libc::EEXIST
    );
    assert_eq!(errno(core.rmdir(ROOT, OsStr::new("d"))), libc::ENOTEMPTY);
    assert_eq!(errno(core.rmdir(ROOT, OsStr::new("f"))), libc::ENOTDIR);
    assert_eq!(errno(core.getattr(999_999_999, None)), libc::ESTALE);
    assert_eq!(errno(core.read(12345, 0, 1)), libc::EBADF);
    let f = core.lookup(ROOT, OsStr::new("f")).unwrap().attr.ino;
    let fh = core.open(f, libc::O_RDWR).unwrap().fh;
    faults.set(Fault::Fail(libc::ENOSPC), Some("write"));
    assert_eq!(errno(core.write(fh, 0, b"abc", None)), libc::ENOSPC);
    faults.set(Fault::Fail(libc::EIO), Some("read"));
    assert_eq!(errno(core.read(fh, 0, 1)), libc::EIO);
    faults.set(Fault::Fail(libc::EACCES), None);
    assert_eq!(
        errno(core.setattr(
            f,
            None,
            &SetAttr {
                mode: Some(0o600),
                ..Default::default()
            },
            None
        )),
        libc::EACCES
    );
    faults.set(Fault::None, None);
    assert_eq!(core.read(fh, 0, 1).unwrap(), b"x");
}

#[test]
fn clearing_set_id_bits_costs_no_nas_call_when_there_are_none() {
    use nassync::killpriv::Modifier;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let mode = |name: &str| {
        std::fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    std::fs::write(dir.path().join("plain"), "x").unwrap();
    std::fs::write(dir.path().join("setid"), "x").unwrap();
    std::fs::set_permissions(
        dir.path().join("setid"),
        std::fs::Permissions::from_mode(0o6766),
    )
    .unwrap();
    let plain_mode = mode("plain");
    let (core, _) = core(dir.path());
    // An unprivileged writer, as the kernel flags it (FUSE_WRITE_KILL_SUIDGID).
    let user = Modifier {
        uid: 4242,
        gid: 4242,
        pid: 0,
        privileged: Some(false),
    };
    let nas_ops = || core.stats().nas_ops.load(Ordering::Relaxed);
    let plain = core.lookup(ROOT, OsStr::new("plain")).unwrap().attr.ino;
    let fh = core.open(plain, libc::O_RDWR).unwrap().fh;
    let before = nas_ops();
    core.write(fh, 0, b"a", None).unwrap();
    let privileged = nas_ops() - before;
    let before = nas_ops();
    core.write(fh, 0, b"b", Some(&user)).unwrap();
    assert_eq!(nas_ops() - before, privileged, "no extra NAS call");
    let before = nas_ops();
    core.fallocate(fh, 0, 10, 0, &user).unwrap();
    let fallocate = nas_ops() - before;
    assert_eq!(fallocate, 2, "fallocate and its getattr only");
    assert_eq!(mode("plain"), plain_mode);

    let setid = core.lookup(ROOT, OsStr::new("setid")).unwrap().attr.ino;
    let fh = core.open(setid, libc::O_RDWR).unwrap().fh;
    core.write(fh, 0, b"y", Some(&user)).unwrap();
    // S_ISUID always, S_ISGID for a caller outside the group (root's).
    assert_eq!(mode("setid"), 0o766);
    let (attr, _) = core.getattr(setid, None).unwrap();
    assert_eq!(attr.perm, 0o766, "the cached attributes follow");
}

/// Reads directory handle `fh` from `offset`, taking at most `max` entries
/// (the kernel's buffer filling up).
fn list_some(
    core: &Core<Instrumented<DirBackend>>,
    fh: u64,
    offset: u64,
    max: usize,
) -> Vec<String> {
    let mut names = Vec::new();
    core.readdir(fh, offset, false, &mut |e| {
        if names.len() == max {
            return true;
        }
        names.push(e.name.to_string_lossy().into_owned());
        false
    })
    .unwrap();
    names
}

#[test]
fn the_kernel_is_told_to_keep_a_listing_only_when_its_cache_holds_that_listing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("d");
    std::fs::create_dir(&d).unwrap();
    for i in 0..40 {
        std::fs::write(d.join(format!("n{:02}", (i * 7) % 40)), b"x").unwrap();
    }
    // Long enough that a busy machine does not outlast it between calls.
    let ttl = Duration::from_secs(3);
    let (core, _) = core_with(dir.path(), ttl);
    let ino = core.lookup(ROOT, OsStr::new("d")).unwrap().attr.ino;
    let all = |core: &Core<_>| {
        let h = core.opendir(ino).unwrap();
        let names = list_some(core, h.fh, 0, usize::MAX);
        core.releasedir(h.fh).unwrap();
        (h.keep_cache, names)
    };
    let kept = |core: &Core<_>| {
        let h = core.opendir(ino).unwrap();
        core.releasedir(h.fh).unwrap();
        h.keep_cache
    };
    // Read from the NAS, then from the tables: one order, whoever serves
    // it, or handles filling the kernel's cache together would mix two.
    let (keep, first) = all(&core);
    assert!(!keep);
    let mut sorted = first[2..].to_vec();
    sorted.sort();
    assert_eq!(first[2..], sorted[..], "served in name order");
    let (keep, again) = all(&core);
    assert!(keep, "a listing served whole and unchanged may be kept");
    assert_eq!(again, first);

    // A handle rewound after the listing changed may have left the start
    // of the old listing in the kernel's cache, for the new one to be
    // appended to: nothing is kept.
    std::fs::write(d.join("late"), b"z").unwrap();
    let h = core.opendir(ino).unwrap();
    assert_eq!(list_some(&core, h.fh, 0, 3), first[..3]);
    std::thread::sleep(ttl + Duration::from_millis(100));
    let rewound = list_some(&core, h.fh, 0, usize::MAX);
    core.releasedir(h.fh).unwrap();
    assert!(rewound.contains(&"late".to_string()));
    assert!(!kept(&core), "the kernel's cache may hold a mix");
    // That opendir had the kernel drop its pages: only the new listing
    // went in since.
    // Kept once a reply has reached the end since (completing the cache).
    let (keep, first) = all(&core);
    assert!(!keep);
    assert_eq!(first, rewound);
    assert!(kept(&core));

    // The same with two handles: the first serves the start of a listing,
    // the second, after a change, a new listing whole.
    let x = core.opendir(ino).unwrap();
    let y = core.opendir(ino).unwrap();
    assert_eq!(list_some(&core, x.fh, 0, 3), first[..3]);
    core.releasedir(x.fh).unwrap();
    std::fs::write(d.join("new"), b"y").unwrap();
    std::thread::sleep(ttl + Duration::from_millis(100));
    assert_eq!(list_some(&core, y.fh, 0, usize::MAX).len(), first.len() + 1);
    core.releasedir(y.fh).unwrap();
    assert!(!kept(&core), "the kernel's cache may hold a mix");
}

#[test]
fn a_readdirplus_after_a_plain_readdir_gives_each_entry_its_own_attributes() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..6 {
        std::fs::write(dir.path().join(format!("f{i}")), vec![0u8; i]).unwrap();
    }
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let (core, _) = core(dir.path());
    let h = core.opendir(ROOT).unwrap();
    // First read past the start and plain (after a seekdir): the listing
    // is taken without attributes; the kernel then asks for plus.
    assert_eq!(list_some(&core, h.fh, 2, 1).len(), 1);
    let mut seen = Vec::new();
    core.readdir(h.fh, 1, true, &mut |e| {
        let entry = e.entry.expect("plus");
        assert_eq!(entry.attr.ino, e.ino, "{:?}", e.name);
        assert_eq!(entry.attr.kind, e.kind, "{:?}", e.name);
        seen.push((e.name.to_string_lossy().into_owned(), entry.attr.size));
        false
    })
    .unwrap();
    core.releasedir(h.fh).unwrap();
    assert!(seen.iter().any(|(n, _)| n == ".."));
    for i in 0..6 {
        assert!(seen.contains(&(format!("f{i}"), i as u64)), "{seen:?}");
    }
    // Each name handed out counts as a lookup: the inode is known.
    let f3 = core.lookup(ROOT, OsStr::new("f3")).unwrap().attr.ino;
    assert_eq!(core.getattr(f3, None).unwrap().0.size, 3);
}

/// A name found absent, then seen in a listing (another client made it),
/// is not answered absent by the old negative entry when the NAS hangs,
/// even where that listing was not kept whole (a removal while it was
/// read): the NAS may have it, so EIO once offline, never ENOENT.
#[test]
fn a_name_listed_since_it_was_found_absent_is_not_absent_while_the_nas_hangs() {
    use nassync::backend::bounded::BoundedBackend;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("s")).unwrap();
    std::fs::write(dir.path().join("junk"), "x").unwrap();
    let stats = Arc::new(Stats::default());
    let inner = Instrumented::new(DirBackend::new(dir.path()).unwrap(), stats.clone());
    let faults = inner.faults();
    let backend = BoundedBackend::new(inner, Duration::from_secs(3), stats.clone());
    let ttl = Duration::from_millis(100);
    let data = DataCache::new(8 << 20, None, 64 << 10, 0, stats.clone());
    let core = Arc::new(Core::new(Arc::new(backend), config(ttl), data, stats).unwrap());
    let s = core.lookup(ROOT, OsStr::new("s")).unwrap().attr.ino;
    core.lookup(ROOT, OsStr::new("junk")).unwrap();
    let errno = |r: Result<nassync::fs::Entry, nassync::error::FsError>| r.unwrap_err().errno();
    assert_eq!(errno(core.lookup(s, OsStr::new("x"))), libc::ENOENT);
    std::fs::write(dir.path().join("s/x"), "made elsewhere").unwrap();
    std::thread::sleep(2 * ttl);

    // Listed while a removal elsewhere makes the listing incomplete.
    faults.set(Fault::Stall, Some("readdir"));
    let c2 = core.clone();
    let lister = std::thread::spawn(move || {
        let fh = c2.opendir(s).unwrap().fh;
        let mut names = Vec::new();
        c2.readdir(fh, 0, false, &mut |e| {
            names.push(e.name.to_string_lossy().into_owned());
            false
        })
        .unwrap();
        c2.releasedir(fh).unwrap();
        names
    });
    while faults.stalled() == 0 {
        std::thread::yield_now();
    }
    core.unlink(ROOT, OsStr::new("junk")).unwrap();
    faults.set(Fault::None, None);
    assert!(lister.join().unwrap().contains(&"x".to_string()));
    std::thread::sleep(2 * ttl);

    faults.set(Fault::Stall, None);
    let r = core.lookup(s, OsStr::new("x"));
    faults.set(Fault::None, None);
    assert_eq!(errno(r), libc::EIO);
}
