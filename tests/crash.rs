//! The crash loop: a writer changes files through the mount and fsyncs,
//! while the daemon is killed with SIGKILL at random moments (write-back
//! running alongside, writeback_delay=100ms). After each kill the source is
//! mounted again with the same cache directory; every file must hold what
//! the last confirmed fsync left, plus possibly the one change in flight.
//! At the end everything is flushed and the NAS files compared with the
//! model, byte for byte.
//!
//! NASSYNC_CRASH_ITERS sets the number of kills (default 30) and
//! NASSYNC_CRASH_SEED replays a run (the seed is printed).

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Mount;
use common::simnas::SimNas;

const FILES: usize = 3;
const MAX: u64 = 1 << 20;

/// What a file may hold: `confirmed`, or `inflight` if the change being
/// made when the daemon died got through (in part: byte by byte, one or
/// the other).
#[derive(Clone, Default)]
struct FileModel {
    confirmed: Vec<u8>,
    inflight: Option<Vec<u8>>,
    /// The change in flight is a write (not a truncate): the kill may have
    /// stopped the daemon's own write of it into its pending file part
    /// way (at a page boundary, as a write interrupted by SIGKILL does),
    /// which nothing confirmed: any length between the two.
    torn_ok: bool,
}

fn acceptable(got: &[u8], m: &FileModel) -> Result<(), String> {
    if got == m.confirmed.as_slice() {
        return Ok(());
    }
    let Some(f) = &m.inflight else {
        let at = got.iter().zip(&m.confirmed).position(|(a, b)| a != b);
        let run = at.map(|a| {
            got[a..]
                .iter()
                .zip(&m.confirmed[a..])
                .take_while(|(x, y)| x != y)
                .count()
        });
        return Err(format!(
            "length {} vs confirmed {}, first difference at {at:?} for {run:?} bytes: {:?} instead of {:?}",
            got.len(),
            m.confirmed.len(),
            at.map(|a| &got[a..(a + 8).min(got.len())]),
            at.map(|a| &m.confirmed[a..(a + 8).min(m.confirmed.len())]),
        ));
    };
    let between = m.torn_ok && (m.confirmed.len()..=f.len()).contains(&got.len());
    if got.len() != m.confirmed.len() && got.len() != f.len() && !between {
        return Err(format!(
            "length {} is neither confirmed {} nor in-flight {}",
            got.len(),
            m.confirmed.len(),
            f.len()
        ));
    }
    for (i, b) in got.iter().enumerate() {
        let c = m.confirmed.get(i).copied().unwrap_or(0);
        let n = f.get(i).copied().unwrap_or(0);
        if *b != c && *b != n {
            return Err(format!(
                "byte {i} is {b}, neither confirmed {c} nor in-flight {n}"
            ));
        }
    }
    Ok(())
}

fn name(i: usize) -> String {
    format!("file{i}")
}

/// Writes and fsyncs until an operation fails (the daemon is gone).
fn writer(
    mnt: std::path::PathBuf,
    model: Arc<Mutex<Vec<FileModel>>>,
    seed: u64,
    stop: Arc<AtomicBool>,
) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let files: Vec<_> = (0..FILES)
        .map(|i| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(mnt.join(name(i)))
        })
        .collect();
    let Ok(files) = files.into_iter().collect::<Result<Vec<_>, _>>() else {
        return;
    };
    while !stop.load(Ordering::Relaxed) {
        let i = rng.usize(..FILES);
        let mut next = model.lock().unwrap()[i].confirmed.clone();
        let f = &files[i];
        // Announce the change before making it.
        let op = rng.u8(..10);
        match op {
            0..=6 => {
                let off = rng.u64(..MAX);
                let n = rng.usize(1..64 << 10);
                let data: Vec<u8> = (0..n).map(|_| rng.u8(1..)).collect();
                if next.len() < off as usize + n {
                    next.resize(off as usize + n, 0);
                }
                next[off as usize..off as usize + n].copy_from_slice(&data);
                {
                    let mut m = model.lock().unwrap();
                    m[i].inflight = Some(next.clone());
                    m[i].torn_ok = true;
                }
                if f.write_all_at(&data, off).is_err() {
                    return;
                }
            }
            _ => {
                let size = rng.u64(..MAX);
                next.resize(size as usize, 0);
                {
                    let mut m = model.lock().unwrap();
                    m[i].inflight = Some(next.clone());
                    m[i].torn_ok = false;
                }
                if f.set_len(size).is_err() {
                    return;
                }
            }
        }
        if f.sync_all().is_err() {
            return;
        }
        let mut m = model.lock().unwrap();
        m[i].confirmed = next;
        m[i].inflight = None;
    }
}

#[test]
fn sigkill_at_random_moments_loses_nothing_fsync_confirmed() {
    let seed = std::env::var("NASSYNC_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let iters: usize = std::env::var("NASSYNC_CRASH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    eprintln!("crash loop: seed {seed}, {iters} kills");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut m = Mount::prepare(
        &std::env::var("NASSYNC_CRASH_OPTIONS").unwrap_or_else(|_| "writeback_delay=100ms".into()),
    );
    let mut initial = Vec::new();
    for i in 0..FILES {
        let data: Vec<u8> = (0..rng.usize(..MAX as usize)).map(|_| rng.u8(..)).collect();
        std::fs::write(m.n(&name(i)), &data).unwrap();
        initial.push(FileModel {
            confirmed: data,
            inflight: None,
            torn_ok: false,
        });
    }
    let model = Arc::new(Mutex::new(initial));
    m.mount();
    for iter in 0..iters {
        let stop = Arc::new(AtomicBool::new(false));
        let w = {
            let (mnt, model, stop) = (m.mnt.clone(), model.clone(), stop.clone());
            let s = rng.u64(..);
            std::thread::spawn(move || writer(mnt, model, s, stop))
        };
        std::thread::sleep(Duration::from_millis(rng.u64(20..400)));
        m.kill();
        stop.store(true, Ordering::Relaxed);
        w.join().unwrap();
        m.mount();
        // What the mount shows after the journal was taken up again.
        let mut mm = model.lock().unwrap();
        for i in 0..FILES {
            let got = std::fs::read(m.m(&name(i))).unwrap();
            if let Err(e) = acceptable(&got, &mm[i]) {
                panic!("seed {seed}, kill {iter}, {}: {e}\n{}", name(i), m.log());
            }
            mm[i] = FileModel {
                confirmed: got,
                inflight: None,
                torn_ok: false,
            };
        }
    }
    m.flush(None);
    let mm = model.lock().unwrap();
    for i in 0..FILES {
        let nas = std::fs::read(m.n(&name(i))).unwrap();
        assert!(
            nas == mm[i].confirmed,
            "seed {seed}: {} on the NAS differs from the model after the final flush",
            name(i)
        );
    }
    assert_eq!(m.status_value("conflicts"), 0, "seed {seed}");
    eprintln!("crash loop: {iters} kills, nothing lost");
}

/// The namespace as the crash loop sees it: directories and files with
/// their content, and the value of a directory's xattr `user.k` under
/// `xattr_key(dir)`.
type Tree = std::collections::BTreeMap<String, Option<Vec<u8>>>;

fn xattr_key(dir: &str) -> String {
    format!("{dir}\0user.k")
}

/// Where a file's mode is kept in a [`Tree`], when not 644.
fn mode_key(file: &str) -> String {
    format!("{file}\0mode")
}

fn mode_value(mode: u32) -> Option<Vec<u8>> {
    (mode != 0o644).then(|| format!("{mode:o}").into_bytes())
}

fn read_tree(root: &std::path::Path) -> std::io::Result<Tree> {
    let mut out = Tree::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(root.join(&rel))? {
            let e = e?;
            let name = e.file_name().into_string().unwrap();
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if e.file_type()?.is_dir() {
                match common::xget(&root.join(&r), "user.k") {
                    Ok(v) => drop(out.insert(xattr_key(&r), Some(v))),
                    Err(libc::ENODATA) => {}
                    Err(e) => {
                        let e = std::io::Error::from_raw_os_error(e);
                        return Err(std::io::Error::new(e.kind(), format!("{r}: getxattr: {e}")));
                    }
                }
                stack.push(r.clone());
                out.insert(r, None);
            } else {
                let data = std::fs::read(root.join(&r))
                    .map_err(|e| std::io::Error::new(e.kind(), format!("{r}: {e}")))?;
                let mode = std::os::unix::fs::MetadataExt::mode(&e.metadata()?) & 0o7777;
                if let Some(v) = mode_value(mode) {
                    out.insert(mode_key(&r), Some(v));
                }
                out.insert(r.clone(), Some(data));
            }
        }
    }
    Ok(out)
}

/// A namespace change being made when the daemon died.
#[derive(Clone, Debug)]
enum NsOp {
    Create(String, Vec<u8>),
    Mkdir(String),
    Rename(String, String),
    Unlink(String),
    Link(String, String),
    /// setxattr user.k of a directory.
    SetXattr(String, Vec<u8>),
    /// chmod of a file with one link.
    Chmod(String, u32),
}

/// The states an interrupted `op` may leave `t` in (a creation also as
/// an empty file: its data was not fsynced yet).
fn outcomes(t: &Tree, op: &NsOp) -> Vec<Tree> {
    let mut done = t.clone();
    let mut empty = None;
    match op {
        NsOp::Create(p, data) => {
            done.insert(p.clone(), Some(data.clone()));
            let mut e = t.clone();
            e.insert(p.clone(), Some(Vec::new()));
            empty = Some(e);
        }
        NsOp::Mkdir(p) => {
            done.insert(p.clone(), None);
        }
        NsOp::Rename(a, b) => {
            let v = done.remove(a).unwrap();
            done.insert(b.clone(), v);
            if let Some(v) = done.remove(&mode_key(a)) {
                done.insert(mode_key(b), v);
            }
        }
        NsOp::Unlink(a) => {
            done.remove(a);
            done.remove(&mode_key(a));
        }
        NsOp::Link(a, b) => {
            let v = done.get(a).cloned().unwrap();
            done.insert(b.clone(), v);
            if let Some(v) = done.get(&mode_key(a)).cloned() {
                done.insert(mode_key(b), v);
            }
        }
        NsOp::Chmod(a, mode) => {
            done.remove(&mode_key(a));
            if let Some(v) = mode_value(*mode) {
                done.insert(mode_key(a), Some(v));
            }
        }
        NsOp::SetXattr(d, v) => {
            done.insert(xattr_key(d), Some(v.clone()));
        }
    }
    [Some(t.clone()), Some(done), empty]
        .into_iter()
        .flatten()
        .collect()
}

/// Creates, renames, links and removes files and directories, and sets
/// directories' xattrs, through the mount, each confirmed by fsync of the
/// file and of its directories, until an operation fails (the daemon is
/// gone).
fn ns_writer(
    mnt: std::path::PathBuf,
    model: Arc<Mutex<(Tree, Option<NsOp>)>>,
    seed: u64,
    stop: Arc<AtomicBool>,
) {
    let mut rng = fastrand::Rng::with_seed(seed);
    // Through a descriptor of the mount's root: once the daemon is killed
    // and the mount detached, the path would lead to the directory under
    // it, where creations would succeed.
    let Ok(root) = std::fs::File::open(&mnt) else {
        return;
    };
    let mnt = std::path::PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&root)
    ));
    let sync_dir = |rel: &str| -> bool {
        let dir = std::path::Path::new(rel)
            .parent()
            .map(|p| mnt.join(p))
            .unwrap_or_else(|| mnt.clone());
        std::fs::File::open(dir).and_then(|f| f.sync_all()).is_ok()
    };
    let mut n = rng.u32(..);
    while !stop.load(Ordering::Relaxed) {
        let t = model.lock().unwrap().0.clone();
        let dirs: Vec<&String> = t
            .iter()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k)
            .collect();
        let files: Vec<&String> = t
            .iter()
            .filter(|(k, v)| v.is_some() && !k.contains('\0'))
            .map(|(k, _)| k)
            .collect();
        n = n.wrapping_add(1);
        let in_dir = |rng: &mut fastrand::Rng, leaf: String| match dirs.len() {
            0 => leaf,
            k => match rng.usize(..=k) {
                i if i == k => leaf,
                i => format!("{}/{leaf}", dirs[i]),
            },
        };
        let op = match rng.u8(..13) {
            0..=4 => {
                let data: Vec<u8> = (0..rng.usize(..20_000)).map(|_| rng.u8(1..)).collect();
                NsOp::Create(in_dir(&mut rng, format!("f{n}")), data)
            }
            5 if dirs.len() < 6 => NsOp::Mkdir(in_dir(&mut rng, format!("d{n}"))),
            6..=7 if !files.is_empty() => {
                let a = files[rng.usize(..files.len())].clone();
                NsOp::Rename(a, in_dir(&mut rng, format!("r{n}")))
            }
            8..=9 if !files.is_empty() => NsOp::Unlink(files[rng.usize(..files.len())].clone()),
            10 if !files.is_empty() => {
                let a = files[rng.usize(..files.len())].clone();
                NsOp::Link(a, in_dir(&mut rng, format!("l{n}")))
            }
            11 if !dirs.is_empty() => {
                let d = dirs[rng.usize(..dirs.len())].clone();
                NsOp::SetXattr(d, (0..rng.usize(..40)).map(|_| rng.u8(..)).collect())
            }
            12 if !files.is_empty() => {
                let a = files[rng.usize(..files.len())].clone();
                // (The model keeps modes by name: not of a file with links.)
                match std::fs::metadata(mnt.join(&a)) {
                    Ok(md) if std::os::unix::fs::MetadataExt::nlink(&md) == 1 => {}
                    Ok(_) => continue,
                    Err(_) => return,
                }
                NsOp::Chmod(a, [0o600, 0o640, 0o644, 0o444][rng.usize(..4)])
            }
            _ => continue,
        };
        model.lock().unwrap().1 = Some(op.clone());
        let ok = match &op {
            NsOp::Create(p, data) => {
                std::fs::File::create_new(mnt.join(p))
                    .and_then(|mut f| {
                        std::io::Write::write_all(&mut f, data)?;
                        // (Whatever the umask: the model's mode.)
                        use std::os::unix::fs::PermissionsExt;
                        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
                        f.sync_all()
                    })
                    .is_ok()
                    && sync_dir(p)
            }
            NsOp::Mkdir(p) => std::fs::create_dir(mnt.join(p)).is_ok() && sync_dir(p),
            NsOp::Rename(a, b) => {
                std::fs::rename(mnt.join(a), mnt.join(b)).is_ok() && sync_dir(a) && sync_dir(b)
            }
            NsOp::Unlink(a) => std::fs::remove_file(mnt.join(a)).is_ok() && sync_dir(a),
            NsOp::Link(a, b) => std::fs::hard_link(mnt.join(a), mnt.join(b)).is_ok() && sync_dir(b),
            NsOp::Chmod(a, mode) => {
                use std::os::unix::fs::PermissionsExt;
                let p = mnt.join(a);
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).is_ok()
                    && std::fs::File::open(&p).and_then(|f| f.sync_all()).is_ok()
            }
            NsOp::SetXattr(d, v) => {
                common::xset(&mnt.join(d), "user.k", v, 0).is_ok()
                    && std::fs::File::open(mnt.join(d))
                        .and_then(|f| f.sync_all())
                        .is_ok()
            }
        };
        if !ok {
            return;
        }
        let mut m = model.lock().unwrap();
        m.0 = outcomes(&m.0, &op).swap_remove(1);
        m.1 = None;
    }
}

/// Creates, mkdirs, renames, hard links and unlinks of files and
/// directories, new and on the NAS, with the replay running alongside (writeback_delay=100ms).
/// Nobody else changes the NAS, so a conflict copy after a kill (the data
/// kept under a conflict name beside a stale version) is a failure too.
#[test]
fn sigkill_during_namespace_operations_loses_nothing_fsync_confirmed() {
    ns_crash_loop(Loop::Online);
}

/// The same with the NAS (simnas) not answering while the writer runs:
/// renames, hard links and removals of objects on the NAS are then kept
/// in the journal, and made on the NAS at the next mount, before
/// anything else (the NAS answers again before each mount).
#[test]
fn sigkill_during_offline_namespace_operations_loses_nothing() {
    ns_crash_loop(Loop::Offline);
}

/// The same with names and attributes cached for 10 minutes while the
/// NAS answers: renames, hard links and removals of objects on the NAS
/// that the cache vouches for are kept in the journal (as offline) and
/// made on the NAS by the write-back, which the kills interrupt.
#[test]
fn sigkill_during_kept_namespace_changes_loses_nothing() {
    ns_crash_loop(Loop::Kept);
}

#[derive(Clone, Copy, PartialEq)]
enum Loop {
    Online,
    Offline,
    Kept,
}

fn ns_crash_loop(kind: Loop) {
    let offline = kind == Loop::Offline;
    let seed = std::env::var("NASSYNC_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let iters: usize = std::env::var("NASSYNC_CRASH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let what = match kind {
        Loop::Online => "namespace",
        Loop::Offline => "offline namespace",
        Loop::Kept => "kept namespace",
    };
    eprintln!("{what} crash loop: seed {seed}, {iters} kills");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut m = Mount::prepare(match kind {
        Loop::Online => "writeback_delay=100ms",
        Loop::Offline => "writeback_delay=100ms,timeo=30,actimeo=1,unmount_flush_timeout=1s",
        Loop::Kept => "writeback_delay=100ms,actimeo=600",
    });
    let sim = offline.then(|| SimNas::start(m.dir.path(), &["--attr-ttl", "0"]));
    if let Some(sim) = &sim {
        m.nas = sim.nas.clone();
    }
    std::fs::create_dir(m.n("d0")).unwrap();
    std::fs::write(m.n("d0/old"), "on the NAS").unwrap();
    std::fs::set_permissions(
        m.n("d0/old"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let mut initial = Tree::new();
    initial.insert("d0".into(), None);
    initial.insert("d0/old".into(), Some(b"on the NAS".to_vec()));
    let model = Arc::new(Mutex::new((initial, None)));
    m.mount();
    let mut interrupted = 0;
    let mut kept = 0;
    for iter in 0..iters {
        if kind == Loop::Kept {
            // Cached, so that the writer's changes are vouched for.
            read_tree(&m.mnt).unwrap();
        }
        if let Some(sim) = &sim {
            // The tree as it is now is cached (read back below, or at the
            // start), so that what the writer does offline is vouched for.
            if iter == 0 {
                read_tree(&m.mnt).unwrap();
            }
            sim.ctl("fail ENOTCONN");
            // (Once the attributes expire, a call reaches the NAS.)
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !m.status().lines().any(|l| l == "nas offline") {
                assert!(
                    std::time::Instant::now() < deadline,
                    "seed {seed}: not offline"
                );
                std::thread::sleep(Duration::from_millis(200));
                let _ = std::fs::metadata(m.mnt.join("d0"));
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let w = {
            let (mnt, model, stop) = (m.mnt.clone(), model.clone(), stop.clone());
            let s = rng.u64(..);
            std::thread::spawn(move || ns_writer(mnt, model, s, stop))
        };
        std::thread::sleep(Duration::from_millis(rng.u64(20..400)));
        kept += m.stats().get("kept_changes").copied().unwrap_or(0);
        m.kill();
        stop.store(true, Ordering::Relaxed);
        w.join().unwrap();
        if let Some(sim) = &sim {
            sim.ctl("fail off");
        }
        m.mount();
        let got = match read_tree(&m.mnt) {
            Ok(t) => t,
            Err(e) => panic!(
                "seed {seed}, kill {iter}: the mount cannot be read back: {e}\n{}",
                m.log()
            ),
        };
        let mut mm = model.lock().unwrap();
        let allowed = match &mm.1 {
            Some(op) => outcomes(&mm.0, op),
            None => vec![mm.0.clone()],
        };
        if !allowed.contains(&got) {
            let want = &allowed[0];
            let only_got: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
            let only_want: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
            let differ: Vec<_> = got
                .iter()
                .filter(|(k, v)| want.get(*k).is_some_and(|w| w != *v))
                .map(|(k, _)| k)
                .collect();
            panic!(
                "seed {seed}, kill {iter}: the mount is not what fsync confirmed \
                 (in flight: {:?}); only in the mount: {only_got:?}, missing: {only_want:?}, \
                 other content: {differ:?}\n{}",
                mm.1.as_ref()
                    .map(|o| format!("{o:?}").chars().take(80).collect::<String>()),
                m.log()
            );
        }
        if mm.1.is_some() && got != mm.0 {
            interrupted += 1;
        }
        mm.0 = got;
        mm.1 = None;
    }
    m.flush(None);
    let mm = model.lock().unwrap();
    let nas = read_tree(&m.nas).unwrap();
    assert!(
        nas == mm.0,
        "seed {seed}: the NAS differs from the model after the final flush: only on the NAS {:?}, missing {:?}",
        nas.keys()
            .filter(|k| !mm.0.contains_key(*k))
            .collect::<Vec<_>>(),
        mm.0.keys()
            .filter(|k| !nas.contains_key(*k))
            .collect::<Vec<_>>()
    );
    assert_eq!(m.status_value("conflicts"), 0, "seed {seed}");
    eprintln!(
        "{what} crash loop: {iters} kills ({interrupted} mid-operation), {} entries \
         ({} directories with an xattr, {} files with a mode set), {kept} changes kept while \
         the NAS answered, nothing lost, no conflict copy",
        mm.0.len(),
        mm.0.keys().filter(|k| k.ends_with("\0user.k")).count(),
        mm.0.keys().filter(|k| k.ends_with("\0mode")).count()
    );
    if kind == Loop::Kept {
        assert!(kept > 0, "seed {seed}: nothing was kept for later");
    }
}
