//! Offline operation (docs/SEMANTICS.md, "When the NAS does not answer"):
//! the NAS is simnas, frozen (a hung NAS) or failing (a lost mount); calls
//! to it are abandoned after `timeo`, nassync serves what it has cached,
//! accepts writes to cached files, fails the rest promptly with EIO, and
//! writes back by itself once the NAS answers again.

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::simnas::SimNas;
use common::{Mount, errno};

/// Offline, names are shown from the inodes the kernel holds: the tests
/// that make the kernel drop its caches (`true`) run alone, the others
/// together.
fn kernel_caches(drop: bool) -> Box<dyn std::any::Any> {
    static CACHES: std::sync::RwLock<()> = std::sync::RwLock::new(());
    match drop {
        true => Box::new(CACHES.write().unwrap_or_else(|e| e.into_inner())),
        false => Box::new(CACHES.read().unwrap_or_else(|e| e.into_inner())),
    }
}

/// Whether `nassync status` lists `path` as pending with `tag` (such as
/// " removed=file").
fn pending(status: &str, path: &str, tag: &str) -> bool {
    status
        .lines()
        .any(|l| l.starts_with(&format!("pending {path} ")) && l.contains(tag))
}

/// The names in `dir` that are conflict copies of `stem`.
fn conflict_copies(dir: &Path, stem: &str) -> Vec<String> {
    names(dir)
        .into_iter()
        .filter(|n| n.starts_with(&format!("{stem}.nassync-conflict-")))
        .collect()
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// A mount of simnas with a tree on it; the tree is read once through the
/// mount so that it is cached (file `a`, the listing of `d`, symlink `l`);
/// `d/cold` is never read.
fn setup(options: &str) -> (Mount, SimNas, Vec<u8>) {
    let mut m = Mount::prepare(options);
    let sim = SimNas::start(m.dir.path(), &["--attr-ttl", "0"]);
    m.nas = sim.nas.clone();
    let a = pattern(3 << 20, 7);
    std::fs::create_dir(sim.backing.join("d")).unwrap();
    std::fs::write(sim.backing.join("d/a"), &a).unwrap();
    std::fs::write(sim.backing.join("d/cold"), pattern(1 << 20, 9)).unwrap();
    std::os::unix::fs::symlink("a", sim.backing.join("d/l")).unwrap();
    std::fs::create_dir(sim.backing.join("d/sub")).unwrap();
    m.mount();
    assert_eq!(std::fs::read(m.m("d/a")).unwrap(), a);
    assert_eq!(names(&m.m("d")), ["a", "cold", "l", "sub"]);
    for n in ["a", "cold", "l", "sub"] {
        std::fs::symlink_metadata(m.m(&format!("d/{n}"))).unwrap();
    }
    assert_eq!(std::fs::read_link(m.m("d/l")).unwrap(), Path::new("a"));
    (m, sim, a)
}

#[test]
fn a_hung_nas_is_worked_around_and_caught_up_with() {
    let _caches = kernel_caches(false);
    let (mut m, sim, mut a) =
        setup("timeo=1,actimeo=1,writeback_delay=1h,unmount_flush_timeout=5s");
    assert!(m.status().lines().any(|l| l == "nas online"));
    // In a directory not listed: known absent by its last lookup only.
    assert_eq!(errno(&std::fs::metadata(m.m("d/sub/none"))), libc::ENOENT);
    sim.ctl("freeze");
    // Let every cached attribute and listing expire: what follows needs
    // the NAS, which does not answer.
    std::thread::sleep(Duration::from_millis(1200));

    // The first request that needs the NAS waits at most timeo, then
    // nassync is offline and everything cached is served at once.
    let t0 = Instant::now();
    assert_eq!(std::fs::read(m.m("d/a")).unwrap(), a, "cached file");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    m.wait_status("nas offline", Duration::from_secs(5));
    let t0 = Instant::now();
    assert_eq!(names(&m.m("d")), ["a", "cold", "l", "sub"]);
    for n in ["a", "cold", "l", "sub"] {
        std::fs::symlink_metadata(m.m(&format!("d/{n}"))).unwrap();
    }
    assert_eq!(std::fs::read_link(m.m("d/l")).unwrap(), Path::new("a"));
    assert!(std::fs::metadata(m.m("d/sub")).unwrap().is_dir());
    nix::sys::statvfs::statvfs(&m.mnt).expect("df while offline");
    // A name the complete listing does not have is known to be absent.
    assert_eq!(errno(&std::fs::metadata(m.m("d/nothing"))), libc::ENOENT);
    assert_eq!(errno(&std::fs::metadata(m.m("d/sub/none"))), libc::ENOENT);
    // One never looked up there: EIO, as the NAS may have it.
    assert_eq!(errno(&std::fs::metadata(m.m("d/sub/other"))), libc::EIO);
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());

    // Data that is not cached: EIO, promptly.
    let t0 = Instant::now();
    let cold = std::fs::read(m.m("d/cold"));
    assert_eq!(errno(&cold), libc::EIO);
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());

    // Writes to a cached file are taken, survive fsync, and read back.
    let f = OpenOptions::new().write(true).open(m.m("d/a")).unwrap();
    f.write_all_at(b"written while offline", 1 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);
    a[1 << 20..(1 << 20) + 21].copy_from_slice(b"written while offline");
    assert_eq!(std::fs::read(m.m("d/a")).unwrap(), a);
    assert!(m.status_value("pending_files") == 1, "{}", m.status());
    let s = m.stats();
    assert!(s["nas_timeouts"] >= 1 && s["offline_hits"] > 0, "{s:?}");
    // `nassync flush` says so instead of waiting for the NAS.
    let t0 = Instant::now();
    let out = nassync(&[std::ffi::OsStr::new("flush"), m.mnt.as_os_str()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("offline") && err.contains("1 files"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());

    // The NAS answers again: nassync notices by itself and writes back.
    sim.ctl("thaw");
    m.wait_status("nas online", Duration::from_secs(20));
    m.flush(None);
    assert_eq!(std::fs::read(sim.backing.join("d/a")).unwrap(), a);
    assert_eq!(std::fs::read(m.m("d/cold")).unwrap(), pattern(1 << 20, 9));
    m.unmount();
    assert!(m.last_exit.unwrap().success());
}

#[test]
fn a_nas_that_went_away_is_offline_at_once() {
    let _caches = kernel_caches(false);
    // A lost NFS mount answers ENOTCONN (or the kernel's soft-mount
    // ETIMEDOUT) at once: no waiting for timeo.
    let (mut m, sim, a) = setup("timeo=30,actimeo=1,writeback_delay=1h,unmount_flush_timeout=5s");
    sim.ctl("fail ENOTCONN");
    std::thread::sleep(Duration::from_millis(1200));
    let t0 = Instant::now();
    assert_eq!(std::fs::read(m.m("d/a")).unwrap(), a);
    assert_eq!(names(&m.m("d")), ["a", "cold", "l", "sub"]);
    assert_eq!(
        errno(&File::open(m.m("d/cold")).and_then(|f| {
            let mut b = [0u8; 1];
            f.read_at(&mut b, 0)
        })),
        libc::EIO
    );
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    m.wait_status("nas offline", Duration::from_secs(1));
    sim.ctl("fail off");
    m.wait_status("nas online", Duration::from_secs(20));
    assert_eq!(std::fs::read(m.m("d/cold")).unwrap(), pattern(1 << 20, 9));
    m.unmount();
}

#[test]
fn a_hung_nas_holds_up_what_the_cache_can_answer_for_a_second_not_timeo() {
    let _caches = kernel_caches(false);
    // timeo is long: a request that waited for it would fail the test.
    // Write-back soon: it must not start calls that would wait for the
    // hung NAS holding what the requests below need.
    let (mut m, sim, a) =
        setup("timeo=60,actimeo=1,writeback_delay=200ms,unmount_flush_timeout=5s");
    // Made while the NAS answers (whether `d` has a default ACL is then
    // known).
    std::fs::create_dir(m.m("d/first")).unwrap();
    // Looked up, absent: then made while the NAS hangs, in a directory
    // never listed or created into (its default ACL not asked yet).
    assert_eq!(errno(&std::fs::metadata(m.m("d/sub/x"))), libc::ENOENT);
    assert_eq!(errno(&std::fs::metadata(m.m("d/sub/y"))), libc::ENOENT);
    m.flush(None);
    sim.ctl("freeze");
    std::thread::sleep(Duration::from_millis(1200));

    // Every attribute and name here has expired: each request asks the
    // NAS. The first waits a second for it, the rest are answered from
    // the cache while that call is unanswered, and what is made here needs
    // no NAS (an untar into a listed directory: the names it makes there
    // are absent from the listing). The first is a listing, served as
    // last seen.
    let t0 = Instant::now();
    assert_eq!(names(&m.m("d")), ["a", "cold", "first", "l", "sub"]);
    assert_eq!(std::fs::metadata(m.m("d/a")).unwrap().len(), a.len() as u64);
    assert_eq!(std::fs::read(m.m("d/a")).unwrap(), a, "cached file");
    assert!(std::fs::metadata(m.m("d/first")).unwrap().is_dir());
    assert_eq!(errno(&std::fs::metadata(m.m("d/nothing"))), libc::ENOENT);
    std::fs::write(m.m("d/top"), b"top").unwrap();
    assert_eq!(errno(&std::fs::metadata(m.m("d/sub/y"))), libc::ENOENT);
    std::fs::write(m.m("d/sub/x"), b"x").unwrap();
    std::fs::create_dir(m.m("d/new")).unwrap();
    for i in 0..200 {
        std::fs::write(m.m(&format!("d/new/f{i}")), pattern(1000 + i, i as u8)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(1200));
    assert!(std::fs::metadata(m.m("d/sub")).unwrap().is_dir());
    assert_eq!(names(&m.m("d/new")).len(), 200);
    assert_eq!(
        names(&m.m("d")),
        ["a", "cold", "first", "l", "new", "sub", "top"]
    );
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(30), "{took:?}");
    // Not offline: the NAS has not been silent for timeo.
    assert!(
        m.status().lines().any(|l| l == "nas online"),
        "{}",
        m.status()
    );
    let s = m.stats();
    assert!(s["slow_nas_hits"] >= 1 && s["nas_timeouts"] == 0, "{s:?}");

    // Once the NAS answers, it is asked again: a change made there shows,
    // and what was made here lands.
    sim.ctl("thaw");
    std::fs::write(sim.backing.join("d/a"), b"changed on the NAS").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(m.m("d/a")).unwrap().len() != 18 {
        assert!(Instant::now() < deadline, "the NAS's change never showed");
        std::thread::sleep(Duration::from_millis(200));
    }
    m.flush(None);
    for i in 0..200 {
        let f = format!("d/new/f{i}");
        assert_eq!(
            std::fs::read(sim.backing.join(&f)).unwrap(),
            pattern(1000 + i, i as u8)
        );
    }
    assert_eq!(std::fs::read(sim.backing.join("d/top")).unwrap(), b"top");
    assert_eq!(std::fs::read(sim.backing.join("d/sub/x")).unwrap(), b"x");
    m.unmount();
    assert!(m.last_exit.unwrap().success());
}

fn nassync(args: &[&std::ffi::OsStr]) -> std::process::Output {
    std::process::Command::new(common::NASSYNC)
        .args(args)
        .output()
        .unwrap()
}

fn pin_line(m: &Mount, path: &str) -> Option<String> {
    m.status()
        .lines()
        .find(|l| l.starts_with(&format!("pin {path} ")))
        .map(str::to_string)
}

#[test]
fn pinned_files_stay_cached_and_are_there_offline() {
    let _caches = kernel_caches(true);
    let mut m = Mount::prepare(
        "timeo=1,actimeo=1,cache_size=12M,mem_cache_size=4M,block_size=1M,pin_refresh=1s,\
         unmount_flush_timeout=5s",
    );
    let sim = SimNas::start(m.dir.path(), &["--attr-ttl", "0"]);
    m.nas = sim.nas.clone();
    std::fs::create_dir_all(sim.backing.join("p/q")).unwrap();
    let files = [("p/a", 7u8), ("p/b", 8), ("p/q/c", 9)];
    for (name, seed) in files {
        std::fs::write(sim.backing.join(name), pattern(2 << 20, seed)).unwrap();
    }
    for i in 0..3 {
        std::fs::write(sim.backing.join(format!("big{i}")), pattern(8 << 20, i)).unwrap();
    }
    m.mount();
    // Past the refresh that follows the mount: the one below is periodic.
    std::thread::sleep(Duration::from_millis(2500));

    let out = nassync(&[std::ffi::OsStr::new("pin"), m.m("p").as_os_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = pin_line(&m, "/p").unwrap_or_else(|| m.status());
    assert!(
        line.contains("files=3 bytes=6291456") && line.ends_with("cached=100.0%"),
        "{line}"
    );

    // 24 MiB read through a 12 MiB cache: everything not pinned is evicted.
    for i in 0..3 {
        assert_eq!(
            std::fs::read(m.m(&format!("big{i}"))).unwrap(),
            pattern(8 << 20, i)
        );
    }
    let line = pin_line(&m, "/p").unwrap();
    assert!(line.ends_with("cached=100.0%"), "{line}");

    // More than the cache can hold for pins: refused, nothing recorded.
    let out = nassync(&[std::ffi::OsStr::new("pin"), m.mnt.as_os_str()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("left for pins"),
        "{out:?}"
    );
    assert!(pin_line(&m, "/").is_none());

    // A pinned file changed on the NAS is fetched again by the refresh.
    std::fs::write(sim.backing.join("p/a"), pattern(2 << 20, 77)).unwrap();
    std::thread::sleep(Duration::from_millis(3500));
    std::fs::metadata(m.m("p/a")).unwrap();

    // Offline: the pinned tree is all there (the kernel's page cache is
    // dropped so that the daemon has to answer).
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    sim.ctl("freeze");
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(std::fs::read(m.m("p/a")).unwrap(), pattern(2 << 20, 77));
    m.wait_status("nas offline", Duration::from_secs(5));
    for (name, seed) in &files[1..] {
        assert_eq!(
            std::fs::read(m.m(name)).unwrap(),
            pattern(2 << 20, *seed),
            "{name}"
        );
    }
    assert_eq!(errno(&std::fs::read(m.m("big0"))), libc::EIO, "evicted");
    sim.ctl("thaw");
    m.wait_status("nas online", Duration::from_secs(20));

    let out = nassync(&[std::ffi::OsStr::new("unpin"), m.m("p").as_os_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(pin_line(&m, "/p").is_none());
    let out = nassync(&[std::ffi::OsStr::new("unpin"), m.m("p").as_os_str()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not pinned"),
        "{out:?}"
    );
    m.unmount();
}

#[test]
fn mounting_a_nas_that_does_not_answer_fails_within_timeo() {
    let _caches = kernel_caches(false);
    let m = Mount::prepare("");
    let sim = SimNas::start(m.dir.path(), &[]);
    sim.ctl("freeze");
    let err_path = m.dir.path().join("mount.err");
    let t0 = Instant::now();
    let mut child = std::process::Command::new(common::NASSYNC)
        .arg("mount")
        .arg(&sim.nas)
        .arg(&m.mnt)
        .arg("-o")
        .arg(format!("timeo=1,cache_dir={}", m.cache.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    // The error comes within timeo. (The process itself cannot finish
    // before the NAS answers: its abandoned call is stuck in simnas, and a
    // FUSE request already sent cannot be killed. A hard NFS mount's can.)
    let deadline = Instant::now() + Duration::from_secs(20);
    let err = loop {
        let err = std::fs::read_to_string(&err_path).unwrap_or_default();
        if err.contains("no answer within timeo") || Instant::now() > deadline {
            break err;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = t0.elapsed();
    sim.ctl("thaw");
    let status = child.wait().unwrap();
    assert!(err.contains("no answer within timeo"), "{err}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(status.code(), Some(32), "{err}");
    assert!(!common::is_mounted(&m.mnt));
}

#[test]
fn offline_names_the_kernel_forgot_do_not_look_deleted() {
    let _caches = kernel_caches(true);
    let (mut m, sim, _) = setup("timeo=1,actimeo=1,writeback_delay=1h,unmount_flush_timeout=5s");
    let d = File::open(m.m("d")).unwrap();
    // The kernel forgets the inodes (nassync then no longer holds them).
    std::fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    sim.ctl("freeze");
    std::thread::sleep(Duration::from_millis(1200));
    let _ = std::fs::metadata(m.m("d/a"));
    m.wait_status("nas offline", Duration::from_secs(5));
    for n in ["a", "cold", "l", "sub"] {
        let r = std::fs::symlink_metadata(m.m(&format!("d/{n}")));
        assert_ne!(errno(&r), libc::ENOENT, "d/{n} looks deleted offline");
    }
    match std::fs::read_dir(m.m("d")) {
        Ok(it) => {
            let got: Result<Vec<_>, _> = it.collect();
            if let Ok(v) = got {
                assert_eq!(v.len(), 4, "a partial listing looks like deletions");
            }
        }
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO)),
    }
    drop(d);
    sim.ctl("thaw");
    m.wait_status("nas online", Duration::from_secs(20));
    assert!(
        m.m("d/cold").exists(),
        "still a negative entry after the outage"
    );
    m.unmount();
}

#[test]
fn what_a_pin_keeps_in_memory_is_let_go_by_unpin_and_by_removal() {
    let _caches = kernel_caches(true);
    let mut m = Mount::prepare("cache_size=64M,pin_refresh=1h");
    for d in ["p", "r", "q"] {
        std::fs::create_dir(m.n(d)).unwrap();
        for i in 0..200 {
            std::fs::write(m.n(&format!("{d}/f{i}")), b"x").unwrap();
        }
    }
    std::fs::write(m.n("q/huge"), vec![1u8; 100 << 20]).unwrap();
    // A second name outside the pins: the file stays kept for r/f150.
    std::fs::hard_link(m.n("r/f150"), m.n("q/link")).unwrap();
    m.mount();
    // The kernel forgets what it is not using: only what nassync keeps stays.
    let forgotten = |m: &Mount| {
        std::fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        m.stats()["inodes"]
    };
    let pin = |what: &str, path: &Path| nassync(&[std::ffi::OsStr::new(what), path.as_os_str()]);
    assert!(pin("pin", &m.m("p")).status.success());
    assert!(pin("pin", &m.m("r")).status.success());
    assert!(forgotten(&m) >= 400, "{}", forgotten(&m));

    // A pin refused for want of room does not keep its tree.
    assert!(!pin("pin", &m.m("q")).status.success());
    let n = forgotten(&m);
    assert!((400..420).contains(&n), "{n}");

    // Removed under a pin: let go at the next refresh (here: an unpin).
    for i in 0..100 {
        std::fs::remove_file(m.m(&format!("r/f{i}"))).unwrap();
    }
    std::fs::metadata(m.m("q/link")).unwrap();
    assert!(pin("unpin", &m.m("p")).status.success());
    let n = forgotten(&m);
    // The root, r and its remaining 100 files (f150 under its other name
    // too), nothing of p.
    assert!((102..120).contains(&n), "{n}");
    assert!(pin("unpin", &m.m("r")).status.success());
    assert!(forgotten(&m) < 20, "{}", forgotten(&m));
    m.unmount();
}

/// The tree `r/` on simnas for the removal tests, read whole through the
/// mount (every listing and file cached).
fn removal_setup(options: &str) -> (Mount, SimNas) {
    let mut m = Mount::prepare(options);
    let sim = SimNas::start(m.dir.path(), &["--attr-ttl", "0"]);
    m.nas = sim.nas.clone();
    let b = |p: &str| sim.backing.join(p);
    for d in ["r", "r/dir", "r/tree", "r/tree/sub", "r/grown"] {
        std::fs::create_dir(b(d)).unwrap();
    }
    for f in [
        "r/gone.txt",
        "r/edited.txt",
        "r/tree/x",
        "r/tree/sub/y",
        "r/pending.txt",
        "r/again.txt",
    ] {
        std::fs::write(b(f), format!("{f} on the NAS")).unwrap();
    }
    std::os::unix::fs::symlink("gone.txt", b("r/link")).unwrap();
    m.mount();
    for d in ["r", "r/dir", "r/tree", "r/tree/sub", "r/grown"] {
        for n in names(&m.m(d)) {
            let p = m.m(&format!("{d}/{n}"));
            if std::fs::symlink_metadata(&p).unwrap().is_file() {
                std::fs::read(&p).unwrap();
            }
        }
    }
    (m, sim)
}

fn go_offline(m: &Mount, sim: &SimNas) {
    sim.ctl("fail ENOTCONN");
    std::thread::sleep(Duration::from_millis(1200));
    let _ = std::fs::metadata(m.m("r"));
    m.wait_status("nas offline", Duration::from_secs(5));
}

/// A mount of simnas with names and attributes cached for 10 minutes and
/// write-back held for an hour; the NAS has a directory `d`, what `fill`
/// makes there, and `other` (see `nas_gone`).
fn long_cache_mount(fill: impl FnOnce(&Path)) -> (Mount, SimNas) {
    let mut m = Mount::prepare("timeo=30,actimeo=600,writeback_delay=1h");
    let sim = SimNas::start(m.dir.path(), &["--attr-ttl", "0"]);
    m.nas = sim.nas.clone();
    std::fs::create_dir(sim.backing.join("d")).unwrap();
    fill(&sim.backing);
    std::fs::write(sim.backing.join("other"), "x").unwrap();
    m.mount();
    (m, sim)
}

/// The NAS answers again: with the mount kept, or after an unmount while
/// it did not (the changes stay in the journal: exit 75) and a new mount.
fn nas_back(m: &mut Mount, sim: &SimNas, remount: bool) {
    if remount {
        m.unmount();
        assert_eq!(m.last_exit.and_then(|s| s.code()), Some(75), "{}", m.log());
        sim.ctl("fail off");
        m.mount();
    } else {
        sim.ctl("fail off");
        m.wait_status("nas online", Duration::from_secs(20));
    }
}

/// The NAS goes away; reading `other`, never read before, finds it out.
fn nas_gone(m: &Mount, sim: &SimNas) {
    sim.ctl("fail ENOTCONN");
    let _ = std::fs::read(m.m("other"));
    m.wait_status("nas offline", Duration::from_secs(5));
}

/// Offline, a file's attributes are the last seen, with what was done
/// through the mount since: a name of a file with two links unlinked just
/// before the NAS went away leaves it showing one link, not two (the
/// kernel asks again after the unlink, and is answered from the cache).
#[test]
fn the_link_count_shown_offline_follows_unlinks_made_here() {
    let (mut m, sim) = long_cache_mount(|nas| {
        std::fs::write(nas.join("d/f"), "two names").unwrap();
        std::fs::hard_link(nas.join("d/f"), nas.join("d/g")).unwrap();
    });
    assert_eq!(std::fs::metadata(m.m("d/f")).unwrap().nlink(), 2);
    assert_eq!(std::fs::metadata(m.m("d/g")).unwrap().nlink(), 2);
    std::fs::remove_file(m.m("d/g")).unwrap();
    nas_gone(&m, &sim);
    assert_eq!(std::fs::metadata(m.m("d/f")).unwrap().nlink(), 1);
    sim.ctl("fail off");
    m.wait_status("nas online", Duration::from_secs(30));
    assert_eq!(std::fs::metadata(m.m("d/f")).unwrap().nlink(), 1);
    m.unmount();
}

/// A directory renamed over an empty one in the same directory leaves it
/// one subdirectory fewer: its link count shown follows, offline and once
/// the NAS is back (found by the namespace model test).
#[test]
fn a_directory_renamed_over_another_offline_lowers_its_parents_link_count() {
    let _caches = kernel_caches(false);
    let (mut m, sim) = long_cache_mount(|_| {});
    assert_eq!(names(&m.m("d")), Vec::<String>::new());
    // Made here: not on the NAS yet (writeback_delay=1h).
    std::fs::create_dir(m.m("d/a")).unwrap();
    std::fs::create_dir(m.m("d/b")).unwrap();
    assert_eq!(std::fs::metadata(m.m("d")).unwrap().nlink(), 4);
    assert!(std::fs::metadata(m.m("d/a")).unwrap().is_dir());
    assert!(std::fs::metadata(m.m("d/b")).unwrap().is_dir());
    nas_gone(&m, &sim);
    std::fs::rename(m.m("d/b"), m.m("d/a")).unwrap();
    assert_eq!(std::fs::metadata(m.m("d")).unwrap().nlink(), 3);
    nas_back(&mut m, &sim, false);
    assert_eq!(std::fs::metadata(m.m("d")).unwrap().nlink(), 3);
    std::fs::remove_dir(m.m("d/a")).unwrap();
    assert_eq!(std::fs::metadata(m.m("d")).unwrap().nlink(), 2);
    m.flush(None);
    assert_eq!(std::fs::metadata(sim.backing.join("d")).unwrap().nlink(), 2);
    assert_eq!(std::fs::metadata(m.m("d")).unwrap().nlink(), 2);
    m.unmount();
}

/// What is served from the cache while the NAS does not answer is kept
/// by the kernel for at most a second, not the attribute time: once the
/// NAS is back, a change made there meanwhile shows within about a second
/// even with actimeo=600.
#[test]
fn attributes_served_offline_are_asked_again_soon_after_the_nas_is_back() {
    let (mut m, sim) = long_cache_mount(|nas| {
        std::fs::write(nas.join("d/f"), "short").unwrap();
        std::fs::hard_link(nas.join("d/f"), nas.join("d/g")).unwrap();
    });
    assert_eq!(std::fs::metadata(m.m("d/f")).unwrap().len(), 5);
    assert_eq!(std::fs::metadata(m.m("d/g")).unwrap().len(), 5);
    // (The unlink leaves f's cached attributes expired: served offline.)
    std::fs::remove_file(m.m("d/g")).unwrap();
    nas_gone(&m, &sim);
    assert_eq!(std::fs::metadata(m.m("d/f")).unwrap().len(), 5);
    std::fs::write(sim.backing.join("d/f"), "longer, from another client").unwrap();
    sim.ctl("fail off");
    m.wait_status("nas online", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(std::fs::metadata(m.m("d/f")).unwrap().len(), 27);
    m.unmount();
}

/// `ls -l` of `dir`: the listing and each entry's attributes.
fn ls_l(dir: &Path) -> Vec<(String, u64)> {
    names(dir)
        .into_iter()
        .map(|n| {
            let len = std::fs::symlink_metadata(dir.join(&n)).unwrap().len();
            (n, len)
        })
        .collect()
}

/// A listing cached before a write keeps the attributes the NAS had then;
/// served again after that write reached the NAS (offline, or within its
/// time to live), they must not pass for the NAS's version: the next
/// write would take them as its base and, at the replay, report a
/// conflict with nassync's own write (a false conflict copy).
#[test]
fn a_listing_cached_before_a_write_back_does_not_make_the_next_write_a_conflict() {
    let (mut m, sim) = long_cache_mount(|nas| std::fs::write(nas.join("d/f"), "old").unwrap());
    assert_eq!(ls_l(&m.m("d")), [("f".to_string(), 3)]);
    let write_at = |at: u64, what: &str| {
        let f = OpenOptions::new().write(true).open(m.m("d/f")).unwrap();
        f.write_all_at(what.as_bytes(), at).unwrap();
    };
    write_at(3, " and new");
    m.flush(None);
    assert_eq!(
        std::fs::read(sim.backing.join("d/f")).unwrap(),
        b"old and new"
    );
    // Online, within the listing's time to live, then offline; the new
    // names make the kernel read the directory again.
    std::fs::write(m.m("d/g"), "").unwrap();
    assert_eq!(
        ls_l(&m.m("d")),
        [("f".to_string(), 11), ("g".to_string(), 0)]
    );
    write_at(11, ", again");
    m.flush(None);
    assert_eq!(
        std::fs::read(sim.backing.join("d/f")).unwrap(),
        b"old and new, again"
    );
    nas_gone(&m, &sim);
    std::fs::write(m.m("d/h"), "").unwrap();
    assert_eq!(
        ls_l(&m.m("d")),
        [
            ("f".to_string(), 18),
            ("g".to_string(), 0),
            ("h".to_string(), 0)
        ]
    );
    write_at(18, ", offline");
    sim.ctl("fail off");
    m.wait_status("nas online", Duration::from_secs(30));
    m.flush(None);
    assert_eq!(
        std::fs::read(sim.backing.join("d/f")).unwrap(),
        b"old and new, again, offline"
    );
    assert_eq!(names(&sim.backing.join("d")), ["f", "g", "h"]);
    assert!(!m.log().contains("conflict"), "{}", m.log());
    m.unmount();
}

#[test]
fn removals_made_offline_reach_the_nas_unless_it_changed_meanwhile() {
    let _caches = kernel_caches(false);
    let (m, sim) = removal_setup("timeo=30,actimeo=1,writeback_delay=1h");
    go_offline(&m, &sim);
    // rm of files, a symlink, an empty directory, a whole tree; a file
    // with a change pending; a file removed and made again.
    for f in ["r/gone.txt", "r/edited.txt", "r/link"] {
        std::fs::remove_file(m.m(f)).unwrap();
    }
    std::fs::remove_dir(m.m("r/dir")).unwrap();
    std::fs::remove_dir_all(m.m("r/tree")).unwrap();
    std::fs::remove_dir(m.m("r/grown")).unwrap();
    std::fs::write(m.m("r/pending.txt"), "changed here, then removed").unwrap();
    std::fs::remove_file(m.m("r/pending.txt")).unwrap();
    std::fs::remove_file(m.m("r/again.txt")).unwrap();
    std::fs::write(m.m("r/again.txt"), "made again here").unwrap();
    // What cannot be done offline says so, and changes nothing.
    assert_eq!(
        errno(&std::fs::remove_file(m.m("r/gone.txt"))),
        libc::ENOENT
    );
    assert_eq!(names(&m.m("r")), ["again.txt"]);
    let status = m.status();
    for p in [
        "r/gone.txt",
        "r/edited.txt",
        "r/link",
        "r/dir",
        "r/tree/sub/y",
        "r/tree",
        "r/grown",
    ] {
        assert!(pending(&status, p, " removed="), "{p}: {status}");
    }
    // The NAS still has it all; meanwhile another client edits one of the
    // files removed here and adds a file to a directory removed here.
    assert!(sim.backing.join("r/gone.txt").exists());
    std::fs::write(
        sim.backing.join("r/edited.txt"),
        "edited on another machine",
    )
    .unwrap();
    std::fs::write(sim.backing.join("r/grown/new"), "added on another machine").unwrap();

    sim.ctl("fail off");
    m.wait_status("nas online", Duration::from_secs(20));
    m.flush(None);
    let nas = |p: &str| sim.backing.join(p);
    for gone in ["r/gone.txt", "r/link", "r/dir", "r/tree", "r/pending.txt"] {
        assert!(
            std::fs::symlink_metadata(nas(gone)).is_err(),
            "{gone} still on the NAS"
        );
    }
    // Deleted here, edited there: the NAS's version stays, reported.
    assert_eq!(
        std::fs::read_to_string(nas("r/edited.txt")).unwrap(),
        "edited on another machine"
    );
    // Removed here, gained a file there: the directory stays with it.
    assert_eq!(names(&nas("r/grown")), ["new"]);
    assert_eq!(
        std::fs::read_to_string(nas("r/again.txt")).unwrap(),
        "made again here"
    );
    let status = m.status();
    assert!(!status.contains("\npending "), "{status}");
    assert_eq!(m.status_value("conflicts"), 2, "{status}");
    assert!(status.contains("conflict r/edited.txt"), "{status}");
    assert!(status.contains("conflict r/grown"), "{status}");
    assert!(
        m.log().contains("changed on the NAS meanwhile"),
        "{}",
        m.log()
    );
    // The mount shows what the NAS kept once its names expire.
    let deadline = Instant::now() + Duration::from_secs(10);
    while names(&m.m("r")) != ["again.txt", "edited.txt", "grown"] && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(names(&m.m("r")), ["again.txt", "edited.txt", "grown"]);
    assert_eq!(names(&m.m("r/grown")), ["new"]);
}

#[test]
fn removals_made_offline_survive_an_unmount_and_apply_at_the_next_mount() {
    let _caches = kernel_caches(false);
    let (mut m, sim) =
        removal_setup("timeo=30,actimeo=1,writeback_delay=1h,unmount_flush_timeout=1s");
    go_offline(&m, &sim);
    std::fs::remove_file(m.m("r/gone.txt")).unwrap();
    std::fs::remove_dir_all(m.m("r/tree")).unwrap();
    std::fs::set_permissions(
        m.m("r/pending.txt"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
    set_times(&m.m("r/again.txt"), 1_000_000_000, 1_100_000_000).unwrap();
    m.unmount();
    assert_eq!(m.last_exit.and_then(|s| s.code()), Some(75), "{}", m.log());
    assert!(sim.backing.join("r/gone.txt").exists());
    assert_eq!(attrs(&sim.backing.join("r/pending.txt")).0, 0o644);
    sim.ctl("fail off");
    m.mount();
    // Still removed in the view before the NAS has it.
    assert_eq!(
        names(&m.m("r")),
        [
            "again.txt",
            "dir",
            "edited.txt",
            "grown",
            "link",
            "pending.txt"
        ]
    );
    assert_eq!(attrs(&m.m("r/pending.txt")).0, 0o640);
    m.flush(None);
    assert!(!sim.backing.join("r/gone.txt").exists());
    assert!(!sim.backing.join("r/tree").exists());
    assert_eq!(attrs(&sim.backing.join("r/pending.txt")).0, 0o640);
    let a = attrs(&sim.backing.join("r/again.txt"));
    assert_eq!((a.3, a.4), (1_000_000_000, 1_100_000_000));
    assert_eq!(m.status_value("conflicts"), 0, "{}", m.status());
}

#[test]
fn a_save_through_a_temporary_file_works_offline() {
    let _caches = kernel_caches(false);
    let (m, sim) = removal_setup("timeo=30,actimeo=1,writeback_delay=1h");
    go_offline(&m, &sim);
    // How editors save: a new file, renamed over the old one.
    for (name, text) in [("gone.txt", "saved offline"), ("edited.txt", "saved here")] {
        let tmp = m.m(&format!("r/.{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, m.m(&format!("r/{name}"))).unwrap();
        assert_eq!(
            std::fs::read_to_string(m.m(&format!("r/{name}"))).unwrap(),
            text
        );
    }
    // Over a directory: refused as on any filesystem, nothing changed.
    std::fs::write(m.m("r/.x.tmp"), "x").unwrap();
    assert_eq!(
        errno(&std::fs::rename(m.m("r/.x.tmp"), m.m("r/dir"))),
        libc::EISDIR
    );
    std::fs::remove_file(m.m("r/.x.tmp")).unwrap();
    // Meanwhile another client edits one of them.
    std::fs::write(
        sim.backing.join("r/edited.txt"),
        "edited on another machine",
    )
    .unwrap();
    sim.ctl("fail off");
    m.wait_status("nas online", Duration::from_secs(20));
    m.flush(None);
    let nas = |p: &str| std::fs::read_to_string(sim.backing.join(p)).unwrap();
    assert_eq!(nas("r/gone.txt"), "saved offline");
    // Both kept: the NAS's edit under the name, this one beside it.
    assert_eq!(nas("r/edited.txt"), "edited on another machine");
    let copies = conflict_copies(&sim.backing.join("r"), "edited");
    assert_eq!(copies.len(), 1, "{:?}", names(&sim.backing.join("r")));
    assert_eq!(nas(&format!("r/{}", copies[0])), "saved here");
    assert!(
        names(&sim.backing.join("r"))
            .iter()
            .all(|n| !n.ends_with(".tmp"))
    );
    assert!(
        std::fs::metadata(sim.backing.join("r/dir"))
            .unwrap()
            .is_dir()
    );
    assert_eq!(m.status_value("conflicts"), 2, "{}", m.status());
}

/// utimensat with an atime and an mtime (whole seconds).
fn set_times(p: &Path, atime: i64, mtime: i64) -> std::io::Result<()> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let ts = |s| libc::timespec {
        tv_sec: s,
        tv_nsec: 0,
    };
    // SAFETY: valid C string and two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            [ts(atime), ts(mtime)].as_ptr(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// (mode bits, uid, gid, atime, mtime) of `p`.
fn attrs(p: &Path) -> (u32, u32, u32, i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(p).unwrap();
    (
        md.mode() & 0o7777,
        md.uid(),
        md.gid(),
        md.atime(),
        md.mtime(),
    )
}

#[test]
fn attribute_changes_made_offline_reach_the_nas_with_the_data() {
    let _caches = kernel_caches(false);
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (m, sim) = removal_setup("timeo=30,actimeo=1,writeback_delay=1h");
    let b = |p: &str| sim.backing.join(p);
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    let inos: Vec<u64> = ["r/pending.txt", "r/again.txt", "r/tree/x"]
        .iter()
        .map(|p| ino(&b(p)))
        .collect();
    let chmod =
        |p: &str, mode| std::fs::set_permissions(m.m(p), std::fs::Permissions::from_mode(mode));
    go_offline(&m, &sim);
    chmod("r/pending.txt", 0o751).unwrap();
    // chown clears set-ID bits: they are set after it, and stay.
    std::os::unix::fs::chown(m.m("r/again.txt"), Some(1234), Some(5678)).unwrap();
    chmod("r/again.txt", 0o4755).unwrap();
    set_times(&m.m("r/tree/x"), 1_000_000_000, 1_100_000_000).unwrap();
    // Written and chmodded: both go with the data.
    std::fs::OpenOptions::new()
        .append(true)
        .open(m.m("r/tree/sub/y"))
        .unwrap()
        .write_all_at(b" and here", 0)
        .unwrap();
    chmod("r/tree/sub/y", 0o600).unwrap();
    // Another client edits one file and removes another meanwhile.
    chmod("r/edited.txt", 0o700).unwrap();
    set_times(&m.m("r/edited.txt"), 1_000_000_000, 1_000_000_000).unwrap();
    set_times(&m.m("r/gone.txt"), 1_000_000_000, 1_000_000_000).unwrap();
    std::fs::write(b("r/edited.txt"), "edited on another machine").unwrap();
    std::fs::remove_file(b("r/gone.txt")).unwrap();
    // The view shows the changes at once; the NAS does not have them yet.
    assert_eq!(attrs(&m.m("r/pending.txt")).0, 0o751);
    let a = attrs(&m.m("r/again.txt"));
    assert_eq!((a.0, a.1, a.2), (0o4755, 1234, 5678));
    let x = attrs(&m.m("r/tree/x"));
    assert_eq!((x.3, x.4), (1_000_000_000, 1_100_000_000));
    assert_eq!(attrs(&b("r/pending.txt")).0, 0o644);
    assert_eq!(attrs(&b("r/again.txt")).1, 0);
    assert!(m.status().contains("nas offline"), "{}", m.status());
    sim.ctl("fail off");
    m.wait_status("nas online", Duration::from_secs(20));
    m.flush(None);
    // On the NAS, the same files (inodes) with the attributes set here.
    assert_eq!(attrs(&b("r/pending.txt")).0, 0o751);
    let a = attrs(&b("r/again.txt"));
    assert_eq!((a.0, a.1, a.2), (0o4755, 1234, 5678));
    let x = attrs(&b("r/tree/x"));
    assert_eq!((x.3, x.4), (1_000_000_000, 1_100_000_000));
    let y = b("r/tree/sub/y");
    assert_eq!(attrs(&y).0, 0o600);
    assert_eq!(
        std::fs::read_to_string(&y).unwrap(),
        "r/tree/sub/y on the NAS and here"
    );
    let now: Vec<u64> = ["r/pending.txt", "r/again.txt", "r/tree/x"]
        .iter()
        .map(|p| ino(&b(p)))
        .collect();
    assert_eq!(now, inos);
    // The edited file keeps the NAS's content and times, with the mode set
    // here; the removed one stays removed. Both are conflicts; no copies.
    let e = b("r/edited.txt");
    assert_eq!(
        std::fs::read_to_string(&e).unwrap(),
        "edited on another machine"
    );
    assert_eq!(attrs(&e).0, 0o700);
    assert_ne!(attrs(&e).4, 1_000_000_000);
    assert!(!b("r/gone.txt").exists());
    assert!(
        names(&b("r"))
            .iter()
            .all(|n| !n.contains("nassync-conflict")),
        "{:?}",
        names(&b("r"))
    );
    assert_eq!(m.status_value("conflicts"), 2, "{}", m.status());
    // And the mount shows what the NAS has (the kernel's attributes of
    // the edited file, where the NAS's won, expire after actimeo).
    std::thread::sleep(Duration::from_millis(1500));
    for p in [
        "r/pending.txt",
        "r/again.txt",
        "r/tree/x",
        "r/tree/sub/y",
        "r/edited.txt",
    ] {
        let (mm, nn) = (attrs(&m.m(p)), attrs(&b(p)));
        assert_eq!((mm.0, mm.1, mm.2, mm.4), (nn.0, nn.1, nn.2, nn.4), "{p}");
    }
    assert_eq!(
        std::fs::read_to_string(m.m("r/edited.txt")).unwrap(),
        "edited on another machine"
    );
}

/// No fsync follows a chmod: the journal has it at once, and a crash of
/// the daemon while the NAS is away loses none of it.
#[test]
fn attribute_changes_made_offline_survive_a_crash() {
    let _caches = kernel_caches(false);
    use std::os::unix::fs::PermissionsExt;
    let (mut m, sim) = removal_setup("timeo=30,actimeo=1,writeback_delay=1h");
    go_offline(&m, &sim);
    std::fs::set_permissions(m.m("r/pending.txt"), std::fs::Permissions::from_mode(0o604)).unwrap();
    set_times(&m.m("r/again.txt"), 1_000_000_000, 1_100_000_000).unwrap();
    m.kill();
    sim.ctl("fail off");
    m.mount();
    assert_eq!(attrs(&m.m("r/pending.txt")).0, 0o604);
    m.flush(None);
    assert_eq!(attrs(&sim.backing.join("r/pending.txt")).0, 0o604);
    let a = attrs(&sim.backing.join("r/again.txt"));
    assert_eq!((a.3, a.4), (1_000_000_000, 1_100_000_000));
    assert_eq!(m.status_value("conflicts"), 0, "{}", m.status());
}

fn ino(p: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::symlink_metadata(p).unwrap())
}

#[test]
fn renames_made_offline_reach_the_nas_in_order() {
    let _caches = kernel_caches(false);
    let (m, sim) = removal_setup("timeo=30,actimeo=1,writeback_delay=1h");
    let nas = |p: &str| sim.backing.join(p);
    let (file_ino, tree_ino) = (ino(&m.m("r/gone.txt")), ino(&m.m("r/tree")));
    let nas_file_ino = ino(&nas("r/gone.txt"));
    // Its target cached, to be shown offline.
    std::fs::read_link(m.m("r/link")).unwrap();
    go_offline(&m, &sim);
    // Another client takes a name this cache has not seen, and removes a
    // file.
    std::fs::write(nas("r/taken"), "another machine's").unwrap();
    std::fs::remove_file(nas("r/pending.txt")).unwrap();
    // mv of a file, of a tree over an empty directory, of a symlink into
    // another directory, twice in a row; then changes inside a renamed
    // directory: an edit, a new file.
    std::fs::rename(m.m("r/gone.txt"), m.m("r/moved.txt")).unwrap();
    std::fs::rename(m.m("r/tree"), m.m("r/dir")).unwrap();
    std::fs::rename(m.m("r/link"), m.m("r/grown/link")).unwrap();
    std::fs::rename(m.m("r/again.txt"), m.m("r/a2")).unwrap();
    std::fs::rename(m.m("r/a2"), m.m("r/a3")).unwrap();
    std::fs::write(m.m("r/dir/x"), "edited after the move").unwrap();
    std::fs::write(m.m("r/dir/sub/new.txt"), "made in the moved tree").unwrap();
    std::fs::rename(m.m("r/edited.txt"), m.m("r/taken")).unwrap();
    std::fs::rename(m.m("r/pending.txt"), m.m("r/p2")).unwrap();
    std::fs::write(m.m("r/p2"), "edited here after the move").unwrap();
    // Refused as on any filesystem, nothing changed.
    assert_eq!(
        errno(&std::fs::rename(m.m("r/moved.txt"), m.m("r/grown"))),
        libc::EISDIR
    );
    assert_eq!(
        errno(&std::fs::rename(m.m("r/nothing"), m.m("r/x"))),
        libc::ENOENT
    );
    // The view has it all at once, with the same inode numbers.
    assert_eq!(
        names(&m.m("r")),
        ["a3", "dir", "grown", "moved.txt", "p2", "taken"]
    );
    assert_eq!(names(&m.m("r/dir")), ["sub", "x"]);
    assert_eq!(names(&m.m("r/dir/sub")), ["new.txt", "y"]);
    assert_eq!(names(&m.m("r/grown")), ["link"]);
    assert_eq!(ino(&m.m("r/moved.txt")), file_ino);
    assert_eq!(ino(&m.m("r/dir")), tree_ino);
    assert_eq!(
        std::fs::read_to_string(m.m("r/moved.txt")).unwrap(),
        "r/gone.txt on the NAS"
    );
    assert_eq!(
        std::fs::read_link(m.m("r/grown/link")).unwrap(),
        Path::new("gone.txt")
    );
    let status = m.status();
    assert!(
        pending(&status, "r/tree", " moved=dir to=r/dir"),
        "{status}"
    );
    assert!(pending(&status, "r/dir", " removed=dir"), "{status}");
    // The NAS has none of it yet.
    assert!(nas("r/gone.txt").exists() && nas("r/tree/x").exists());

    sim.ctl("fail off");
    m.wait_status("nas online", Duration::from_secs(20));
    m.flush(None);
    let read = |p: &str| std::fs::read_to_string(nas(p)).unwrap();
    assert_eq!(read("r/moved.txt"), "r/gone.txt on the NAS");
    // Renamed, not copied.
    assert_eq!(ino(&nas("r/moved.txt")), nas_file_ino);
    assert_eq!(read("r/dir/x"), "edited after the move");
    assert_eq!(read("r/dir/sub/y"), "r/tree/sub/y on the NAS");
    assert_eq!(read("r/dir/sub/new.txt"), "made in the moved tree");
    assert_eq!(read("r/a3"), "r/again.txt on the NAS");
    assert_eq!(
        std::fs::read_link(nas("r/grown/link")).unwrap(),
        Path::new("gone.txt")
    );
    // The name taken there meanwhile keeps the NAS's file; the one renamed
    // here gets the conflict name. The file removed there is not renamed,
    // but what was written to it here comes back, at its new name.
    assert_eq!(read("r/p2"), "edited here after the move");
    assert_eq!(read("r/taken"), "another machine's");
    let copies = conflict_copies(&nas("r"), "taken");
    assert_eq!(copies.len(), 1, "{:?}", names(&nas("r")));
    assert_eq!(read(&format!("r/{}", copies[0])), "r/edited.txt on the NAS");
    let mut want = vec!["a3", "dir", "grown", "moved.txt", "p2", "taken"];
    want.push(&copies[0]);
    want.sort();
    assert_eq!(names(&nas("r")), want);
    let status = m.status();
    assert!(!status.contains("\npending "), "{status}");
    assert_eq!(m.status_value("conflicts"), 3, "{status}");
    assert!(status.contains("conflict r/p2"), "{status}");
    assert!(status.contains("conflict r/taken"), "{status}");
    // The mount shows what the NAS has once its names expire.
    let deadline = Instant::now() + Duration::from_secs(10);
    while names(&m.m("r")) != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(names(&m.m("r")), want);
    assert_eq!(
        read("r/dir/x"),
        std::fs::read_to_string(m.m("r/dir/x")).unwrap()
    );
}

/// `mkdir x; mv f x/` offline: a NAS object renamed or linked into a
/// directory made here is shown there at once; at the replay the
/// directory is made on the NAS first, and the object renamed into it
/// (not copied).
#[test]
fn renames_into_a_directory_made_offline_reach_the_nas() {
    into_new_directory(false);
}

/// The same across an unmount: made on the NAS at the next mount.
#[test]
fn renames_into_a_directory_made_offline_survive_an_unmount() {
    into_new_directory(true);
}

fn into_new_directory(remount: bool) {
    let _caches = kernel_caches(false);
    let (mut m, sim) =
        removal_setup("timeo=30,actimeo=1,writeback_delay=1h,unmount_flush_timeout=1s");
    let nas = |p: &str| sim.backing.join(p);
    let (file_ino, nas_file_ino) = (ino(&m.m("r/gone.txt")), ino(&nas("r/gone.txt")));
    std::fs::read_link(m.m("r/link")).unwrap();
    go_offline(&m, &sim);
    std::fs::create_dir_all(m.m("r/new/deep")).unwrap();
    std::fs::rename(m.m("r/gone.txt"), m.m("r/new/deep/moved.txt")).unwrap();
    std::fs::rename(m.m("r/link"), m.m("r/new/link")).unwrap();
    std::fs::hard_link(m.m("r/edited.txt"), m.m("r/new/e")).unwrap();
    std::fs::write(m.m("r/new/made"), "made here").unwrap();
    assert_eq!(names(&m.m("r/new")), ["deep", "e", "link", "made"]);
    assert_eq!(names(&m.m("r/new/deep")), ["moved.txt"]);
    assert_eq!(ino(&m.m("r/new/deep/moved.txt")), file_ino);
    assert_eq!(
        std::fs::read_to_string(m.m("r/new/deep/moved.txt")).unwrap(),
        "r/gone.txt on the NAS"
    );
    // Not empty; and the directory stays where the renames into it go
    // until they are made (offline: EIO).
    assert_eq!(
        errno(&std::fs::remove_dir(m.m("r/new/deep"))),
        libc::ENOTEMPTY
    );
    assert_eq!(
        errno(&std::fs::rename(m.m("r/new"), m.m("r/new2"))),
        libc::EIO
    );
    // A hard link made into it is replaced on the NAS, after the link
    // (offline: EIO), never hidden by a new file.
    std::fs::write(m.m("r/new/tmp"), "a save").unwrap();
    assert_eq!(
        errno(&std::fs::rename(m.m("r/new/tmp"), m.m("r/new/e"))),
        libc::EIO
    );
    std::fs::remove_file(m.m("r/new/tmp")).unwrap();
    assert!(!nas("r/new").exists() && nas("r/gone.txt").exists());
    nas_back(&mut m, &sim, remount);
    if remount {
        assert_eq!(names(&m.m("r/new")), ["deep", "e", "link", "made"]);
    }
    m.flush(None);
    let read = |p: &str| std::fs::read_to_string(nas(p)).unwrap();
    assert_eq!(read("r/new/deep/moved.txt"), "r/gone.txt on the NAS");
    // Renamed, not copied.
    assert_eq!(ino(&nas("r/new/deep/moved.txt")), nas_file_ino);
    assert_eq!(ino(&nas("r/new/e")), ino(&nas("r/edited.txt")));
    assert_eq!(
        std::fs::read_link(nas("r/new/link")).unwrap(),
        Path::new("gone.txt")
    );
    assert_eq!(read("r/new/made"), "made here");
    assert!(!nas("r/gone.txt").exists() && !nas("r/link").exists());
    assert_eq!(names(&nas("r/new")), ["deep", "e", "link", "made"]);
    assert_eq!(
        m.status_value("conflicts"),
        0,
        "{}\n{}",
        m.status(),
        m.log()
    );
    // Now on the NAS: as any directory there.
    std::fs::rename(m.m("r/new"), m.m("r/new2")).unwrap();
    std::fs::write(m.m("r/new2/tmp"), "a save").unwrap();
    std::fs::rename(m.m("r/new2/tmp"), m.m("r/new2/deep/moved.txt")).unwrap();
    m.flush(None);
    assert_eq!(read("r/new2/deep/moved.txt"), "a save");
    assert_eq!(names(&nas("r/new2/deep")), ["moved.txt"]);
}

/// Offline, a NAS file renamed into a directory made here can be renamed
/// on (the rename still to make goes there instead, unless a change
/// after it depends on where it goes) or removed (the rename becomes its removal): the NAS ends as
/// if it had been done there, the file renamed, never copied.
#[test]
fn what_was_renamed_into_a_new_directory_offline_can_be_moved_on_or_removed() {
    moved_on_or_removed(false);
}

/// The same across an unmount: the rows as changed are what the next
/// mount makes on the NAS.
#[test]
fn what_was_renamed_into_a_new_directory_offline_and_moved_on_or_removed_survives_an_unmount() {
    moved_on_or_removed(true);
}

fn moved_on_or_removed(remount: bool) {
    let _caches = kernel_caches(false);
    let (mut m, sim) =
        removal_setup("timeo=30,actimeo=1,writeback_delay=1h,unmount_flush_timeout=1s");
    let nas = |p: &str| sim.backing.join(p);
    let nas_ino = ino(&nas("r/gone.txt"));
    // Its target cached, to be shown offline.
    std::fs::read_link(m.m("r/link")).unwrap();
    go_offline(&m, &sim);
    std::fs::create_dir(m.m("r/new")).unwrap();
    std::fs::create_dir(m.m("r/new2")).unwrap();
    std::fs::rename(m.m("r/edited.txt"), m.m("r/new/e")).unwrap();
    std::fs::rename(m.m("r/gone.txt"), m.m("r/new/a")).unwrap();
    std::fs::rename(m.m("r/new/a"), m.m("r/new/b")).unwrap();
    std::fs::rename(m.m("r/new/b"), m.m("r/new2/c")).unwrap();
    std::fs::remove_file(m.m("r/new/e")).unwrap();
    assert_eq!(names(&m.m("r/new")), Vec::<String>::new());
    assert!(!names(&m.m("r")).contains(&"edited.txt".to_string()));
    assert_eq!(names(&m.m("r/new2")), ["c"]);
    assert_eq!(
        std::fs::read_to_string(m.m("r/new2/c")).unwrap(),
        "r/gone.txt on the NAS"
    );
    std::fs::remove_dir(m.m("r/new")).unwrap();
    // Back to a directory on the NAS: a plain rename there.
    std::fs::rename(m.m("r/new2/c"), m.m("r/final")).unwrap();
    assert_eq!(names(&m.m("r/new2")), Vec::<String>::new());
    // An editor's save over a file renamed into a new directory: the NAS
    // file goes, the new one takes its name.
    std::fs::rename(m.m("r/again.txt"), m.m("r/new2/s")).unwrap();
    std::fs::write(m.m("r/new2/tmp"), "a save").unwrap();
    std::fs::rename(m.m("r/new2/tmp"), m.m("r/new2/s")).unwrap();
    assert_eq!(std::fs::read_to_string(m.m("r/new2/s")).unwrap(), "a save");
    // A file edited here, renamed into a new directory, then removed: the
    // NAS's version goes (not kept as "changed on the NAS meanwhile").
    std::fs::write(m.m("r/pending.txt"), "edited here").unwrap();
    std::fs::create_dir(m.m("r/new3")).unwrap();
    std::fs::rename(m.m("r/pending.txt"), m.m("r/new3/p")).unwrap();
    std::fs::remove_file(m.m("r/new3/p")).unwrap();
    // Renamed into a new directory and back: nothing to make on the NAS.
    std::fs::rename(m.m("r/link"), m.m("r/new3/l")).unwrap();
    std::fs::rename(m.m("r/new3/l"), m.m("r/link")).unwrap();
    assert_eq!(names(&m.m("r/new3")), Vec::<String>::new());
    assert_eq!(
        std::fs::read_link(m.m("r/link")).unwrap(),
        Path::new("gone.txt")
    );
    // Renamed on when other changes were kept after it: the same.
    std::fs::rename(m.m("r/tree/x"), m.m("r/new3/x")).unwrap();
    std::fs::rename(m.m("r/tree/sub/y"), m.m("r/new3/y")).unwrap();
    std::fs::rename(m.m("r/new3/x"), m.m("r/new3/x2")).unwrap();
    std::fs::rename(m.m("r/new3/y"), m.m("r/new3/y2")).unwrap();
    // Not once a directory was renamed after it: that needs the NAS.
    std::fs::rename(m.m("r/dir"), m.m("r/dir2")).unwrap();
    assert_eq!(
        errno(&std::fs::rename(m.m("r/new3/x2"), m.m("r/new3/x3"))),
        libc::EIO
    );
    assert_eq!(names(&m.m("r/new3")), ["x2", "y2"]);
    assert!(nas("r/gone.txt").exists() && nas("r/edited.txt").exists());
    nas_back(&mut m, &sim, remount);
    m.flush(None);
    assert_eq!(
        std::fs::read_to_string(nas("r/final")).unwrap(),
        "r/gone.txt on the NAS"
    );
    assert_eq!(ino(&nas("r/final")), nas_ino);
    assert!(!nas("r/gone.txt").exists() && !nas("r/edited.txt").exists());
    assert!(!nas("r/new").exists() && !nas("r/again.txt").exists());
    assert!(!nas("r/pending.txt").exists());
    assert_eq!(
        std::fs::read_link(nas("r/link")).unwrap(),
        Path::new("gone.txt")
    );
    assert_eq!(names(&nas("r/new3")), ["x2", "y2"]);
    assert_eq!(
        std::fs::read_to_string(nas("r/new3/x2")).unwrap(),
        "r/tree/x on the NAS"
    );
    assert!(nas("r/dir2").is_dir() && !nas("r/dir").exists());
    assert_eq!(names(&nas("r/new2")), ["s"]);
    assert_eq!(std::fs::read_to_string(nas("r/new2/s")).unwrap(), "a save");
    assert_eq!(
        m.status_value("conflicts"),
        0,
        "{}\n{}",
        m.status(),
        m.log()
    );
}

/// A file renamed into a new directory is not renamed on into a new
/// directory made at a name freed after the first rename (a NAS file or
/// directory removed): made in the first rename's place among the
/// changes, that directory would meet the NAS object still there. The
/// NAS ends as the mount showed, with no conflict.
#[test]
fn a_file_renamed_into_a_new_directory_is_not_moved_into_one_at_a_name_freed_since() {
    moved_into_a_freed_name(false);
}

#[test]
fn a_file_renamed_into_a_new_directory_is_not_moved_into_one_at_a_name_freed_since_unmount() {
    moved_into_a_freed_name(true);
}

fn moved_into_a_freed_name(remount: bool) {
    let _caches = kernel_caches(false);
    let (mut m, sim) =
        removal_setup("timeo=30,actimeo=1,writeback_delay=1h,unmount_flush_timeout=1s");
    let nas = |p: &str| sim.backing.join(p);
    go_offline(&m, &sim);
    std::fs::create_dir(m.m("r/tmp")).unwrap();
    std::fs::rename(m.m("r/gone.txt"), m.m("r/tmp/a")).unwrap();
    std::fs::rename(m.m("r/again.txt"), m.m("r/tmp/b")).unwrap();
    // A NAS directory, then a NAS file, removed and made again as new
    // directories (the second one under a new directory).
    std::fs::remove_dir(m.m("r/grown")).unwrap();
    std::fs::create_dir(m.m("r/grown")).unwrap();
    std::fs::remove_file(m.m("r/edited.txt")).unwrap();
    std::fs::create_dir_all(m.m("r/edited.txt/deeper")).unwrap();
    for to in ["r/grown/a", "r/edited.txt/a", "r/edited.txt/deeper/a"] {
        assert_eq!(
            errno(&std::fs::rename(m.m("r/tmp/a"), m.m(to))),
            libc::EIO,
            "{to}"
        );
    }
    // Nor into one made at its own old name, which the NAS object leaves
    // only when it is renamed.
    std::fs::rename(m.m("r/link"), m.m("r/tmp/l")).unwrap();
    std::fs::create_dir_all(m.m("r/link/sub")).unwrap();
    for to in ["r/link/l", "r/link/sub/l"] {
        assert_eq!(
            errno(&std::fs::rename(m.m("r/tmp/l"), m.m(to))),
            libc::EIO,
            "{to}"
        );
    }
    // A new directory whose name nothing after the rename touched: fine.
    std::fs::create_dir(m.m("r/new")).unwrap();
    std::fs::rename(m.m("r/tmp/b"), m.m("r/new/b")).unwrap();
    nas_back(&mut m, &sim, remount);
    m.flush(None);
    assert_eq!(names(&nas("r/tmp")), ["a", "l"]);
    assert_eq!(names(&nas("r/link")), ["sub"]);
    assert_eq!(
        std::fs::read_to_string(nas("r/tmp/a")).unwrap(),
        "r/gone.txt on the NAS"
    );
    assert_eq!(
        std::fs::read_to_string(nas("r/new/b")).unwrap(),
        "r/again.txt on the NAS"
    );
    assert_eq!(names(&nas("r/grown")), Vec::<String>::new());
    assert_eq!(names(&nas("r/edited.txt")), ["deeper"]);
    assert_eq!(
        names(&nas("r")),
        [
            "dir",
            "edited.txt",
            "grown",
            "link",
            "new",
            "pending.txt",
            "tmp",
            "tree"
        ]
    );
    assert_eq!(
        m.status_value("conflicts"),
        0,
        "{}\n{}",
        m.status(),
        m.log()
    );
}

/// Offline, a file renamed into a NAS directory that is then renamed away
/// (into a new directory, or to another name), and a new directory made
/// at its old name: at the next mount, the first rename goes into the
/// NAS's directory, as it did here, and that is no conflict.
#[test]
fn a_new_directory_at_the_old_name_of_a_nas_one_moved_into_is_no_conflict_after_an_unmount() {
    let _caches = kernel_caches(false);
    let (mut m, sim) =
        removal_setup("timeo=30,actimeo=1,writeback_delay=1h,unmount_flush_timeout=1s");
    let nas = |p: &str| sim.backing.join(p);
    go_offline(&m, &sim);
    std::fs::rename(m.m("r/gone.txt"), m.m("r/dir/gone.txt")).unwrap();
    std::fs::rename(m.m("r/dir"), m.m("r/dir2")).unwrap();
    std::fs::create_dir(m.m("r/dir")).unwrap();
    std::fs::rename(m.m("r/again.txt"), m.m("r/tree/again.txt")).unwrap();
    std::fs::create_dir_all(m.m("r/arch/2026")).unwrap();
    std::fs::rename(m.m("r/tree"), m.m("r/arch/2026/tree")).unwrap();
    std::fs::create_dir(m.m("r/tree")).unwrap();
    std::fs::write(m.m("r/tree/made"), "made here").unwrap();
    nas_back(&mut m, &sim, true);
    m.flush(None);
    assert_eq!(names(&nas("r/dir2")), ["gone.txt"]);
    assert_eq!(names(&nas("r/dir")), Vec::<String>::new());
    assert_eq!(names(&nas("r/arch/2026/tree")), ["again.txt", "sub", "x"]);
    assert_eq!(names(&nas("r/tree")), ["made"]);
    assert_eq!(
        m.status_value("conflicts"),
        0,
        "{}\n{}",
        m.status(),
        m.log()
    );
}

/// Offline `mkdir -p a/b; mv gone.txt a/b/`, work in a/b, and another
/// client makes a directory `a` meanwhile; found at the next mount: the
/// renamed file goes into the other client's directory, what was made
/// here into the new one under the conflict name. Nothing is lost, and
/// each of the two is a conflict.
#[test]
fn a_new_directory_above_one_moved_into_taken_meanwhile_is_found_at_the_next_mount() {
    let _caches = kernel_caches(false);
    let (mut m, sim) =
        removal_setup("timeo=30,actimeo=1,writeback_delay=1h,unmount_flush_timeout=1s");
    let nas = |p: &str| sim.backing.join(p);
    go_offline(&m, &sim);
    std::fs::create_dir_all(m.m("r/a/b")).unwrap();
    std::fs::rename(m.m("r/gone.txt"), m.m("r/a/b/g")).unwrap();
    std::fs::write(m.m("r/a/b/new"), "made here").unwrap();
    std::io::Write::write_all(
        &mut std::fs::OpenOptions::new()
            .append(true)
            .open(m.m("r/a/b/g"))
            .unwrap(),
        b", edited here",
    )
    .unwrap();
    std::fs::create_dir(nas("r/a")).unwrap();
    nas_back(&mut m, &sim, true);
    m.flush(None);
    let status = m.status();
    // The file, with its edit, where its rename put it: the rows of what
    // went into the other client's directory do not follow the new one
    // to its conflict name.
    assert_eq!(
        std::fs::read_to_string(nas("r/a/b/g")).unwrap(),
        "r/gone.txt on the NAS, edited here",
        "{status}"
    );
    let taken: Vec<String> = names(&nas("r"))
        .into_iter()
        .filter(|n| n.starts_with("a.nassync-conflict-"))
        .collect();
    assert_eq!(taken.len(), 1, "{taken:?}\n{status}");
    assert_eq!(
        std::fs::read_to_string(nas(&format!("r/{}/b/new", taken[0]))).unwrap(),
        "made here"
    );
    assert!(!nas("r/gone.txt").exists());
    assert!(
        status.contains("conflict r/a/b/g ") && m.status_value("conflicts") == 2,
        "{status}"
    );
}

/// `rm a; mv b a` offline, and another client removes b meanwhile: the
/// removal of a is made (the rename, whose object is gone, is the
/// conflict). Only a removal made for a rename over it (`mv b a` over a
/// NAS file, one journal transaction) waits for that rename.
#[test]
fn a_removal_followed_by_a_rename_to_that_name_is_made_on_its_own() {
    let _caches = kernel_caches(false);
    let (m, sim) = removal_setup("timeo=30,actimeo=1,writeback_delay=1h");
    let nas = |p: &str| sim.backing.join(p);
    go_offline(&m, &sim);
    std::fs::remove_file(m.m("r/edited.txt")).unwrap();
    std::fs::rename(m.m("r/gone.txt"), m.m("r/edited.txt")).unwrap();
    std::fs::remove_file(nas("r/gone.txt")).unwrap();
    sim.ctl("fail off");
    m.wait_status("nas online", Duration::from_secs(20));
    m.flush(None);
    assert!(!nas("r/edited.txt").exists() && !nas("r/gone.txt").exists());
    assert_eq!(m.status_value("conflicts"), 1, "{}", m.status());
}

#[test]
fn renames_made_offline_survive_an_unmount_and_apply_at_the_next_mount() {
    let _caches = kernel_caches(false);
    let (mut m, sim) =
        removal_setup("timeo=30,actimeo=1,writeback_delay=1h,unmount_flush_timeout=1s");
    let nas = |p: &str| sim.backing.join(p);
    go_offline(&m, &sim);
    std::fs::rename(m.m("r/tree"), m.m("r/t2")).unwrap();
    std::fs::write(m.m("r/t2/x"), "changed after the move").unwrap();
    std::fs::write(m.m("r/t2/new"), "new in the moved tree").unwrap();
    std::fs::rename(m.m("r/t2/sub/y"), m.m("r/y2")).unwrap();
    // A hard link into the renamed directory; one to a file edited here
    // (the link moves its ctime on the NAS: nassync's own change).
    std::fs::hard_link(m.m("r/gone.txt"), m.m("r/t2/g")).unwrap();
    std::fs::write(m.m("r/edited.txt"), "edited here, then linked").unwrap();
    std::fs::hard_link(m.m("r/edited.txt"), m.m("r/t2/e")).unwrap();
    m.unmount();
    assert_eq!(m.last_exit.and_then(|s| s.code()), Some(75), "{}", m.log());
    assert!(nas("r/tree/x").exists() && !nas("r/t2").exists());
    sim.ctl("fail off");
    m.mount();
    // Made on the NAS at the mount, before anything else looks there.
    assert_eq!(
        names(&m.m("r")),
        [
            "again.txt",
            "dir",
            "edited.txt",
            "gone.txt",
            "grown",
            "link",
            "pending.txt",
            "t2",
            "y2"
        ]
    );
    m.flush(None);
    let read = |p: &str| std::fs::read_to_string(nas(p)).unwrap();
    assert!(!nas("r/tree").exists());
    assert_eq!(read("r/t2/x"), "changed after the move");
    assert_eq!(read("r/t2/new"), "new in the moved tree");
    assert_eq!(read("r/y2"), "r/tree/sub/y on the NAS");
    assert_eq!(names(&nas("r/t2/sub")), Vec::<String>::new());
    assert_eq!(ino(&nas("r/t2/g")), ino(&nas("r/gone.txt")));
    assert_eq!(ino(&nas("r/t2/e")), ino(&nas("r/edited.txt")));
    assert_eq!(read("r/edited.txt"), "edited here, then linked");
    assert_eq!(m.status_value("conflicts"), 0, "{}", m.status());
}

fn nlink(p: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::nlink(&std::fs::symlink_metadata(p).unwrap())
}

#[test]
fn hard_links_made_offline_to_nas_files_reach_the_nas() {
    let _caches = kernel_caches(false);
    let (m, sim) = removal_setup("timeo=30,actimeo=1,writeback_delay=1h");
    let nas = |p: &str| sim.backing.join(p);
    go_offline(&m, &sim);
    // Meanwhile another client takes a name and removes a file.
    std::fs::write(nas("r/taken"), "another machine's").unwrap();
    std::fs::remove_file(nas("r/pending.txt")).unwrap();
    std::fs::hard_link(m.m("r/gone.txt"), m.m("r/dir/hard")).unwrap();
    std::fs::hard_link(m.m("r/edited.txt"), m.m("r/taken")).unwrap();
    std::fs::hard_link(m.m("r/pending.txt"), m.m("r/pl")).unwrap();
    // Refused as on any filesystem, nothing changed.
    assert_eq!(
        errno(&std::fs::hard_link(m.m("r/gone.txt"), m.m("r/again.txt"))),
        libc::EEXIST
    );
    // One file under two names, here at once.
    assert_eq!(ino(&m.m("r/dir/hard")), ino(&m.m("r/gone.txt")));
    assert_eq!(nlink(&m.m("r/dir/hard")), 2);
    assert_eq!(nlink(&m.m("r/gone.txt")), 2);
    assert_eq!(names(&m.m("r/dir")), ["hard"]);
    assert_eq!(
        std::fs::read_to_string(m.m("r/dir/hard")).unwrap(),
        "r/gone.txt on the NAS"
    );
    std::fs::write(m.m("r/dir/hard"), "written through the link").unwrap();
    std::fs::hard_link(m.m("r/dir/hard"), m.m("r/dir/hard2")).unwrap();
    assert_eq!(
        std::fs::read_to_string(m.m("r/gone.txt")).unwrap(),
        "written through the link"
    );
    let status = m.status();
    assert!(
        pending(&status, "r/gone.txt", " linked=file to=r/dir/hard"),
        "{status}"
    );
    assert!(!nas("r/dir/hard").exists());

    sim.ctl("fail off");
    m.wait_status("nas online", Duration::from_secs(20));
    m.flush(None);
    let read = |p: &str| std::fs::read_to_string(nas(p)).unwrap();
    assert_eq!(ino(&nas("r/dir/hard")), ino(&nas("r/gone.txt")));
    assert_eq!(nlink(&nas("r/gone.txt")), 3);
    assert_eq!(read("r/gone.txt"), "written through the link");
    // The name taken there keeps the NAS's file; the link gets the
    // conflict name. No link to a file removed there.
    assert_eq!(read("r/taken"), "another machine's");
    let copies = conflict_copies(&nas("r"), "taken");
    assert_eq!(copies.len(), 1, "{:?}", names(&nas("r")));
    assert_eq!(
        ino(&nas(&format!("r/{}", copies[0]))),
        ino(&nas("r/edited.txt"))
    );
    assert!(!nas("r/pl").exists() && !nas("r/pending.txt").exists());
    let status = m.status();
    assert!(!status.contains("\npending "), "{status}");
    assert_eq!(m.status_value("conflicts"), 2, "{status}");
    assert!(status.contains("conflict r/pl"), "{status}");
    assert!(status.contains("conflict r/taken"), "{status}");
}

fn lowner(p: &Path) -> u32 {
    std::os::unix::fs::MetadataExt::uid(&std::fs::symlink_metadata(p).unwrap())
}

#[test]
fn attribute_changes_of_directories_and_symlinks_made_offline_reach_the_nas() {
    let _caches = kernel_caches(false);
    let (mut m, sim) =
        removal_setup("timeo=30,actimeo=1,writeback_delay=1h,unmount_flush_timeout=1s");
    let nas = |p: &str| sim.backing.join(p);
    go_offline(&m, &sim);
    // Another client removes one of the directories meanwhile.
    std::fs::remove_dir(nas("r/dir")).unwrap();
    let mode = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(m))
    };
    mode(&m.m("r/dir"), 0o700).unwrap();
    set_times(&m.m("r/grown"), 1_000_000_000, 1_100_000_000).unwrap();
    std::os::unix::fs::lchown(m.m("r/link"), Some(1234), None).unwrap();
    // As tar does: the directory's mode, its new entries, then its times.
    mode(&m.m("r/tree"), 0o750).unwrap();
    std::fs::write(m.m("r/tree/new"), "new").unwrap();
    set_times(&m.m("r/tree"), 1_200_000_000, 1_300_000_000).unwrap();
    // Shown at once.
    assert_eq!(attrs(&m.m("r/dir")).0, 0o700);
    let g = attrs(&m.m("r/grown"));
    assert_eq!((g.3, g.4), (1_000_000_000, 1_100_000_000));
    assert_eq!(lowner(&m.m("r/link")), 1234);
    let t = attrs(&m.m("r/tree"));
    assert_eq!((t.0, t.4), (0o750, 1_300_000_000));
    let status = m.status();
    assert!(pending(&status, "r/grown", " attrs=dir"), "{status}");
    assert!(pending(&status, "r/link", " attrs=symlink"), "{status}");
    assert_eq!(attrs(&nas("r/tree")).0, 0o755);
    // Kept across an unmount; set at the next mount.
    m.unmount();
    assert_eq!(m.last_exit.and_then(|s| s.code()), Some(75), "{}", m.log());
    sim.ctl("fail off");
    m.mount();
    m.flush(None);
    let g = attrs(&nas("r/grown"));
    assert_eq!((g.3, g.4), (1_000_000_000, 1_100_000_000));
    assert_eq!(lowner(&nas("r/link")), 1234);
    // Set after the new file was put in it.
    let t = attrs(&nas("r/tree"));
    assert_eq!((t.0, t.4), (0o750, 1_300_000_000), "{}", m.log());
    assert_eq!(std::fs::read_to_string(nas("r/tree/new")).unwrap(), "new");
    // Removed there: stays removed, the change dropped and reported.
    assert!(!nas("r/dir").exists());
    let status = m.status();
    assert!(!status.contains("\npending "), "{status}");
    assert_eq!(m.status_value("conflicts"), 1, "{status}");
    assert!(status.contains("conflict r/dir"), "{status}");
}

fn listed_ino(dir: &Path, name: &str) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.file_name() == name)
        .map(|e| std::os::unix::fs::DirEntryExt::ino(&e))
        .unwrap()
}

#[test]
fn a_name_renamed_to_twice_offline_shows_the_last_object() {
    let _caches = kernel_caches(false);
    let (m, sim) = removal_setup("timeo=30,actimeo=1,writeback_delay=1h");
    let nas = |p: &str| sim.backing.join(p);
    let edited = ino(&m.m("r/edited.txt"));
    go_offline(&m, &sim);
    // Two log rotations.
    std::fs::rename(m.m("r/gone.txt"), m.m("r/b")).unwrap();
    std::fs::rename(m.m("r/b"), m.m("r/c")).unwrap();
    std::fs::rename(m.m("r/edited.txt"), m.m("r/b")).unwrap();
    assert_eq!(listed_ino(&m.m("r"), "b"), edited);
    assert_eq!(ino(&m.m("r/b")), edited);
    assert_eq!(
        std::fs::read_to_string(m.m("r/b")).unwrap(),
        "r/edited.txt on the NAS"
    );
    sim.ctl("fail off");
    m.wait_status("nas online", Duration::from_secs(20));
    m.flush(None);
    let read = |p: &str| std::fs::read_to_string(nas(p)).unwrap();
    assert_eq!(read("r/b"), "r/edited.txt on the NAS");
    assert_eq!(read("r/c"), "r/gone.txt on the NAS");
    assert_eq!(m.status_value("conflicts"), 0, "{}", m.status());
}

#[test]
fn a_directory_renamed_offline_to_a_name_taken_meanwhile_keeps_its_new_files() {
    let _caches = kernel_caches(false);
    // Made once the NAS answers, and at the next mount.
    for remount in [false, true] {
        renamed_to_a_taken_name(remount);
    }
}

fn renamed_to_a_taken_name(remount: bool) {
    let (mut m, sim) =
        removal_setup("timeo=30,actimeo=1,writeback_delay=1h,unmount_flush_timeout=1s");
    let nas = |p: &str| sim.backing.join(p);
    go_offline(&m, &sim);
    std::fs::rename(m.m("r/tree"), m.m("r/T")).unwrap();
    std::fs::write(m.m("r/T/new.txt"), "made in the renamed tree").unwrap();
    std::fs::write(m.m("r/T/x"), "edited in the renamed tree").unwrap();
    // Changes after it, by its path: of something in it, and of itself.
    std::fs::rename(m.m("r/T/sub/y"), m.m("r/T/y2")).unwrap();
    std::fs::set_permissions(
        m.m("r/T"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    if remount {
        m.unmount();
        assert_eq!(m.last_exit.and_then(|s| s.code()), Some(75), "{}", m.log());
    }
    // Meanwhile another client makes a directory of that name.
    std::fs::create_dir(nas("r/T")).unwrap();
    sim.ctl("fail off");
    if remount {
        m.mount();
    } else {
        m.wait_status("nas online", Duration::from_secs(20));
    }
    m.flush(None);
    // The other client's directory keeps the name, untouched; the tree
    // renamed here has the conflict name, with what was made in it.
    assert!(names(&nas("r/T")).is_empty(), "{:?}", names(&nas("r/T")));
    let kept = conflict_copies(&nas("r"), "T");
    assert_eq!(kept.len(), 1, "{:?}", names(&nas("r")));
    let k = |p: &str| nas(&format!("r/{}/{p}", kept[0]));
    assert_eq!(names(&k("")), ["new.txt", "sub", "x", "y2"]);
    assert!(names(&k("sub")).is_empty());
    assert_eq!(attrs(&k("")).0, 0o700);
    assert_eq!(
        std::fs::read_to_string(k("new.txt")).unwrap(),
        "made in the renamed tree"
    );
    assert_eq!(
        std::fs::read_to_string(k("x")).unwrap(),
        "edited in the renamed tree"
    );
    assert!(!nas("r/tree").exists());
    assert_eq!(m.status_value("conflicts"), 1, "{}", m.status());
}

/// A flush while the NAS answers but refuses the change (EACCES here; an
/// immutable file or a read-only export elsewhere) fails and says why,
/// rather than wait for retries refused too; the change stays pending
/// and lands once the NAS takes it.
#[test]
fn a_flush_the_nas_refuses_fails_with_its_reason_instead_of_waiting() {
    let _caches = kernel_caches(false);
    let (m, sim, _) = setup("timeo=5,writeback_delay=1h");
    std::fs::write(m.m("d/cold"), "changed here").unwrap();
    sim.ctl("fail EACCES");
    let out = std::process::Command::new(common::NASSYNC)
        .arg("flush")
        .arg(&m.mnt)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    sim.ctl("fail off");
    assert!(!out.status.success(), "flush succeeded: {err}");
    assert!(
        err.contains("\"d/cold\"") && err.contains("Permission denied"),
        "{err}"
    );
    assert!(
        m.status().lines().any(|l| l == "nas online"),
        "{}",
        m.status()
    );
    m.flush(None);
    assert_eq!(
        std::fs::read_to_string(sim.backing.join("d/cold")).unwrap(),
        "changed here"
    );
    assert_eq!(m.status_value("pending_files"), 0);
}

/// `cp -a` of files with extended attributes into the mount while the NAS
/// does not answer: the copies keep them (and the mode-only ACL cp sets),
/// and take them to the NAS.
#[test]
fn cp_a_with_xattrs_works_offline() {
    use common::{xget, xset};
    let _caches = kernel_caches(false);
    let (m, sim) = removal_setup("timeo=30,actimeo=1,writeback_delay=1h");
    let src = m.dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("doc.pdf"), "a document").unwrap();
    std::fs::set_permissions(
        src.join("doc.pdf"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
    let url = b"https://example.org/doc.pdf";
    xset(&src.join("doc.pdf"), "user.xdg.origin.url", url, 0).unwrap();
    xset(&src, "user.note", b"folder", 0).unwrap();
    go_offline(&m, &sim);
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(m.m("r/copied"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cp -a failed offline: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let copy = m.m("r/copied/doc.pdf");
    assert_eq!(xget(&copy, "user.xdg.origin.url"), Ok(url.to_vec()));
    let mode = |p: &Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
            & 0o7777
    };
    assert_eq!(mode(&copy), 0o640);
    // An access ACL that says no more than a mode (owner rwx, group r-x,
    // other ---), as cp sets when copying one: a chmod, kept here.
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm) in [(1u16, 7u16), (4, 5), (0x20, 0)] {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&u32::MAX.to_le_bytes());
    }
    xset(&copy, "system.posix_acl_access", &acl, 0).unwrap();
    assert_eq!(mode(&copy), 0o750);
    assert_eq!(xget(&copy, "system.posix_acl_access"), Err(libc::ENODATA));
    sim.ctl("fail off");
    m.wait_status("nas online", Duration::from_secs(20));
    m.flush(None);
    let nas = sim.backing.join("r/copied");
    assert_eq!(
        std::fs::read_to_string(nas.join("doc.pdf")).unwrap(),
        "a document"
    );
    assert_eq!(mode(&nas.join("doc.pdf")), 0o750);
    assert_eq!(
        xget(&nas.join("doc.pdf"), "user.xdg.origin.url"),
        Ok(url.to_vec())
    );
    assert_eq!(xget(&nas, "user.note"), Ok(b"folder".to_vec()));
    assert_eq!(m.status_value("conflicts"), 0, "{}", m.status());
}

#[test]
fn xattr_changes_of_nas_objects_made_offline_reach_the_nas() {
    xattrs_offline(false);
}

#[test]
fn xattr_changes_of_nas_objects_made_offline_survive_an_unmount() {
    xattrs_offline(true);
}

/// setfattr on files and directories that are on the NAS, while it does
/// not answer: shown at once, kept in order with the file's new data, and
/// made on the NAS once it answers (or at the next mount) without taking
/// nassync's own change for another client's; an object removed on the
/// NAS meanwhile stays removed, the change reported.
fn xattrs_offline(remount: bool) {
    use common::{xget, xlist, xremove, xset};
    let _caches = kernel_caches(false);
    let (mut m, sim) =
        removal_setup("timeo=30,actimeo=1,writeback_delay=1h,unmount_flush_timeout=1s");
    let nas = |p: &str| sim.backing.join(p);
    xset(&nas("r/edited.txt"), "user.a", b"1", 0).unwrap();
    xset(&nas("r/dir"), "user.b", b"2", 0).unwrap();
    // What the cache knows of them: their attributes (past `actimeo`) and
    // lists, read through the mount.
    std::thread::sleep(Duration::from_millis(1100));
    for p in ["r/edited.txt", "r/dir", "r/gone.txt"] {
        std::fs::metadata(m.m(p)).unwrap();
        xlist(&m.m(p));
    }
    go_offline(&m, &sim);
    std::fs::remove_file(nas("r/gone.txt")).unwrap();
    let file = m.m("r/edited.txt");
    xset(&file, "user.new", b"x", 0).unwrap();
    std::fs::write(&file, "edited offline").unwrap();
    assert_eq!(xremove(&file, "user.a"), Ok(()));
    // As a local filesystem answers, from what the cache knows.
    assert_eq!(xremove(&file, "user.a"), Err(libc::ENODATA));
    assert_eq!(xremove(&file, "user.never"), Err(libc::ENODATA));
    let dir = m.m("r/dir");
    assert_eq!(
        xset(&dir, "user.b", b"3", libc::XATTR_CREATE),
        Err(libc::EEXIST)
    );
    assert_eq!(
        xset(&dir, "user.c", b"3", libc::XATTR_REPLACE),
        Err(libc::ENODATA)
    );
    xset(&dir, "user.b", b"3", libc::XATTR_REPLACE).unwrap();
    xset(&dir, "user.empty", b"", 0).unwrap();
    // Never asked about: set, but not removed or replaced blind.
    xset(&m.m("r/tree"), "user.t", b"tree", 0).unwrap();
    assert_eq!(xremove(&m.m("r/tree/sub"), "user.t"), Err(libc::EIO));
    xset(&m.m("r/gone.txt"), "user.z", b"z", 0).unwrap();
    // Shown at once.
    assert_eq!(xget(&file, "user.new"), Ok(b"x".to_vec()));
    assert_eq!(xget(&file, "user.a"), Err(libc::ENODATA));
    assert_eq!(xlist(&file), ["user.new"]);
    assert_eq!(xget(&dir, "user.b"), Ok(b"3".to_vec()));
    assert_eq!(xlist(&dir), ["user.b", "user.empty"]);
    assert_eq!(xget(&m.m("r/tree"), "user.t"), Ok(b"tree".to_vec()));
    // Not on the NAS yet.
    assert_eq!(xget(&nas("r/edited.txt"), "user.a"), Ok(b"1".to_vec()));
    assert_eq!(xget(&nas("r/dir"), "user.b"), Ok(b"2".to_vec()));
    nas_back(&mut m, &sim, remount);
    if !remount {
        // The NAS answers, the changes are still to make there: shown
        // over what it says (the cached answers are too old by now).
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(xget(&file, "user.new"), Ok(b"x".to_vec()));
        assert_eq!(xget(&file, "user.a"), Err(libc::ENODATA));
        assert_eq!(xlist(&file), ["user.new"]);
        assert_eq!(xlist(&dir), ["user.b", "user.empty"]);
        assert_eq!(xget(&nas("r/edited.txt"), "user.a"), Ok(b"1".to_vec()));
    }
    m.flush(None);
    let f = nas("r/edited.txt");
    assert_eq!(
        std::fs::read_to_string(&f).unwrap(),
        "edited offline",
        "{}\n{}",
        m.status(),
        m.log()
    );
    assert_eq!(xlist(&f), ["user.new"], "{}", m.log());
    assert_eq!(xget(&f, "user.new"), Ok(b"x".to_vec()));
    assert_eq!(xget(&nas("r/dir"), "user.b"), Ok(b"3".to_vec()));
    assert_eq!(xget(&nas("r/dir"), "user.empty"), Ok(Vec::new()));
    assert_eq!(xget(&nas("r/tree"), "user.t"), Ok(b"tree".to_vec()));
    assert!(!nas("r/gone.txt").exists());
    assert_eq!(conflict_copies(&nas("r"), "edited"), Vec::<String>::new());
    let status = m.status();
    assert!(!status.contains("\npending "), "{status}");
    assert_eq!(m.status_value("conflicts"), 1, "{status}");
    assert!(status.contains("conflict r/gone.txt"), "{status}");
    // And through the mount, as on the NAS.
    assert_eq!(xlist(&m.m("r/edited.txt")), ["user.new"]);
    assert_eq!(xget(&m.m("r/dir"), "user.b"), Ok(b"3".to_vec()));
}

/// An xattr change kept offline that the NAS then refuses (an immutable
/// directory: EPERM even for root) is dropped and reported, and the mount
/// shows the NAS's value again, not the refused one. Names other than
/// user.* (ACLs, security labels) still need the NAS: EIO offline.
#[test]
fn an_xattr_change_the_nas_refuses_is_dropped_and_no_longer_shown() {
    use common::{xget, xlist, xremove, xset};
    let _caches = kernel_caches(false);
    let (m, sim) = removal_setup("timeo=30,actimeo=1,writeback_delay=1h");
    let nas = sim.backing.join("r/dir");
    xset(&nas, "user.b", b"nas", 0).unwrap();
    // Made immutable by another client before the mount reads it (its
    // ctime does not move after).
    let st = std::process::Command::new("chattr")
        .arg("+i")
        .arg(&nas)
        .status()
        .unwrap();
    assert!(st.success(), "chattr +i {}", nas.display());
    std::thread::sleep(Duration::from_millis(1100));
    let dir = m.m("r/dir");
    std::fs::metadata(&dir).unwrap();
    assert_eq!(xlist(&dir), ["user.b"]);
    assert_eq!(xget(&dir, "user.b"), Ok(b"nas".to_vec()));
    go_offline(&m, &sim);
    xset(&dir, "user.b", b"here", 0).unwrap();
    assert_eq!(xget(&dir, "user.b"), Ok(b"here".to_vec()));
    // An ACL is not kept: it sets the mode, the NAS applies it.
    assert_eq!(xremove(&dir, "system.posix_acl_default"), Err(libc::EIO));
    assert_eq!(xset(&dir, "security.x", b"1", 0), Err(libc::EIO));
    sim.ctl("fail off");
    m.wait_status("nas online", Duration::from_secs(20));
    m.flush(None);
    let _ = std::process::Command::new("chattr")
        .arg("-i")
        .arg(&nas)
        .status();
    let status = m.status();
    assert_eq!(m.status_value("conflicts"), 1, "{status}");
    assert!(
        status.contains("conflict r/dir") && status.contains("refuses"),
        "{status}"
    );
    assert_eq!(xget(&nas, "user.b"), Ok(b"nas".to_vec()));
    // Past the attributes' time to live: the NAS's value.
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::metadata(&dir).unwrap();
    assert_eq!(xget(&dir, "user.b"), Ok(b"nas".to_vec()), "{}", m.log());
}

#[test]
fn a_nas_directory_renamed_into_a_directory_made_offline_reaches_the_nas() {
    dir_into_new_directory(false);
}

#[test]
fn a_nas_directory_renamed_into_a_directory_made_offline_survives_an_unmount() {
    dir_into_new_directory(true);
}

/// Offline, `mkdir -p archive/2026; mv tree archive/2026/` of a directory
/// on the NAS: shown there at once with what is in it, worked in (new
/// files and directories, an edit, a rename), and on the NAS, once it
/// answers (or at the next mount), the same directory renamed there,
/// never copied, with all of it.
fn dir_into_new_directory(remount: bool) {
    let _caches = kernel_caches(false);
    let (mut m, sim) =
        removal_setup("timeo=30,actimeo=1,writeback_delay=1h,unmount_flush_timeout=1s");
    let nas = |p: &str| sim.backing.join(p);
    let (dir_ino, nas_dir_ino) = (ino(&m.m("r/tree")), ino(&nas("r/tree")));
    go_offline(&m, &sim);
    std::fs::create_dir_all(m.m("r/archive/2026")).unwrap();
    std::fs::rename(m.m("r/tree"), m.m("r/archive/2026/tree")).unwrap();
    let mnt = m.mnt.clone();
    let t = |p: &str| mnt.join(format!("r/archive/2026/tree/{p}"));
    assert_eq!(names(&m.m("r/archive/2026")), ["tree"]);
    assert_eq!(ino(&t("")), dir_ino);
    assert_eq!(names(&t("")), ["sub", "x"]);
    assert_eq!(
        std::fs::read_to_string(t("x")).unwrap(),
        "r/tree/x on the NAS"
    );
    std::fs::write(t("x"), "x edited offline").unwrap();
    std::fs::write(t("new.txt"), "new here").unwrap();
    std::fs::create_dir(t("sub/newsub")).unwrap();
    std::fs::write(t("sub/newsub/f"), "deeper").unwrap();
    std::fs::rename(t("sub/y"), t("y2")).unwrap();
    assert_eq!(names(&t("")), ["new.txt", "sub", "x", "y2"]);
    assert!(!m.m("r/tree").exists());
    assert_eq!(nlink(&m.m("r/archive/2026")), 3);
    assert_eq!(errno(&std::fs::remove_dir(t(""))), libc::ENOTEMPTY);
    // Not empty, and stays where the rename goes until it is made.
    assert_eq!(
        errno(&std::fs::remove_dir(m.m("r/archive/2026"))),
        libc::ENOTEMPTY
    );
    assert_eq!(
        errno(&std::fs::rename(m.m("r/archive"), m.m("r/old"))),
        libc::EIO
    );
    assert!(!nas("r/archive").exists() && nas("r/tree/sub/y").exists());
    nas_back(&mut m, &sim, remount);
    if remount {
        assert_eq!(names(&t("")), ["new.txt", "sub", "x", "y2"]);
    }
    m.flush(None);
    let n = |p: &str| nas(&format!("r/archive/2026/tree/{p}"));
    let read = |p: &str| std::fs::read_to_string(n(p)).unwrap();
    assert_eq!(ino(&n("")), nas_dir_ino, "renamed, not copied");
    assert!(!nas("r/tree").exists());
    assert_eq!(names(&n("")), ["new.txt", "sub", "x", "y2"]);
    assert_eq!(read("x"), "x edited offline");
    assert_eq!(read("new.txt"), "new here");
    assert_eq!(read("sub/newsub/f"), "deeper");
    assert_eq!(read("y2"), "r/tree/sub/y on the NAS");
    assert_eq!(names(&n("sub")), ["newsub"]);
    assert_eq!(
        m.status_value("conflicts"),
        0,
        "{}\n{}",
        m.status(),
        m.log()
    );
    // Now on the NAS: as any directory there.
    std::fs::rename(m.m("r/archive"), m.m("r/old")).unwrap();
    m.flush(None);
    assert_eq!(
        std::fs::read_to_string(nas("r/old/2026/tree/x")).unwrap(),
        "x edited offline"
    );
}

#[test]
fn a_directory_moved_offline_into_a_new_one_whose_name_is_taken_keeps_its_files() {
    dir_into_taken_new_directory(false);
}

#[test]
fn a_directory_moved_offline_into_a_new_one_whose_name_is_taken_keeps_its_files_after_an_unmount() {
    dir_into_taken_new_directory(true);
}

/// Offline `mkdir x; mv tree x/`, then work in x/tree; meanwhile another
/// client makes a *file* named x on the NAS. Once the NAS answers the new
/// directory gets the conflict name and tree goes into it with what was
/// made there; at the next mount (the directory's row then finds the
/// file at its path and the rename fails) tree stays where it was, with
/// them. Either way nothing lands elsewhere, nothing is lost, and the
/// other client's file stays.
fn dir_into_taken_new_directory(remount: bool) {
    let _caches = kernel_caches(false);
    let (mut m, sim) =
        removal_setup("timeo=30,actimeo=1,writeback_delay=1h,unmount_flush_timeout=1s");
    let nas = |p: &str| sim.backing.join(p);
    let nas_dir_ino = ino(&nas("r/tree"));
    go_offline(&m, &sim);
    std::fs::create_dir(m.m("r/x")).unwrap();
    std::fs::rename(m.m("r/tree"), m.m("r/x/tree")).unwrap();
    std::fs::write(m.m("r/x/tree/new.txt"), "new here").unwrap();
    std::fs::write(m.m("r/x/tree/x"), "x edited offline").unwrap();
    std::fs::create_dir(m.m("r/x/tree/sub/newsub")).unwrap();
    std::fs::remove_file(m.m("r/x/tree/sub/y")).unwrap();
    std::fs::write(nas("r/x"), "another client's").unwrap();
    nas_back(&mut m, &sim, remount);
    m.flush(None);
    let status = m.status();
    assert_eq!(
        std::fs::read_to_string(nas("r/x")).unwrap(),
        "another client's"
    );
    let tree = if remount {
        nas("r/tree")
    } else {
        let taken: Vec<String> = names(&nas("r"))
            .into_iter()
            .filter(|n| n.starts_with("x.nassync-conflict-"))
            .collect();
        assert_eq!(taken.len(), 1, "{taken:?}\n{status}");
        nas(&format!("r/{}/tree", taken[0]))
    };
    assert_eq!(ino(&tree), nas_dir_ino, "{status}\n{}", m.log());
    assert_eq!(names(&tree), ["new.txt", "sub", "x"], "{status}");
    assert_eq!(
        std::fs::read_to_string(tree.join("new.txt")).unwrap(),
        "new here"
    );
    assert_eq!(
        std::fs::read_to_string(tree.join("x")).unwrap(),
        "x edited offline"
    );
    assert_eq!(names(&tree.join("sub")), ["newsub"]);
    // Nothing went to the share's root or anywhere else.
    assert_eq!(names(&nas("")), ["r"], "{status}");
    assert!(!status.contains("\npending "), "{status}");
    assert!(m.status_value("conflicts") >= 1, "{status}");
}
