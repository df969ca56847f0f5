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
    let stats = Arc::new(Stats::default());
    let backend = Instrumented::new(DirBackend::new(dir).unwrap(), stats.clone());
    let faults = backend.faults();
    let data = DataCache::new(8 << 20, None, 64 << 10, 0, stats.clone());
    let cfg = FsConfig {
        attr_timeout: Duration::from_secs(1),
        entry_timeout: Duration::from_secs(1),
        negative_timeout: Duration::from_secs(1),
        readahead: 0,
        uid: None,
        gid: None,
        umask: None,
    };
    (
        Arc::new(Core::new(Arc::new(backend), cfg, data, stats).unwrap()),
        faults,
    )
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
    assert_eq!(errno(core.write(fh, 0, b"abc")), libc::ENOSPC);
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
            }
        )),
        libc::EACCES
    );
    faults.set(Fault::None, None);
    assert_eq!(core.read(fh, 0, 1).unwrap(), b"x");
}
