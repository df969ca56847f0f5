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

const FILES: usize = 3;
const MAX: u64 = 1 << 20;

/// What a file may hold: `confirmed`, or `inflight` if the change being
/// made when the daemon died got through (in part: byte by byte, one or
/// the other).
#[derive(Clone, Default)]
struct FileModel {
    confirmed: Vec<u8>,
    inflight: Option<Vec<u8>>,
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
    if got.len() != m.confirmed.len() && got.len() != f.len() {
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
                model.lock().unwrap()[i].inflight = Some(next.clone());
                if f.write_all_at(&data, off).is_err() {
                    return;
                }
            }
            _ => {
                let size = rng.u64(..MAX);
                next.resize(size as usize, 0);
                model.lock().unwrap()[i].inflight = Some(next.clone());
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
