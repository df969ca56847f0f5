//! A randomized model test in the spirit of fsx: random reads, writes,
//! truncates, fallocates, renames and reopenings on a few files through the
//! mount, every read checked byte for byte against an in-memory model.
//! Runs a fixed seed (CI) and a random one, printed so that a failure can
//! be replayed with NASSYNC_MODEL_SEED=<seed>.

mod common;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::Mount;

const FILES: usize = 3;
const MAX_SIZE: u64 = 3 << 20;

struct Model {
    files: Vec<Vec<u8>>,
    names: Vec<String>,
}

fn open(dir: &Path, name: &str) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(name))
        .unwrap()
}

fn run(seed: u64, ops: usize, options: &str) {
    // Extra options, to replay a failure under other settings.
    let extra = std::env::var("NASSYNC_MODEL_OPTIONS").unwrap_or_default();
    let options = &[options, &extra]
        .iter()
        .filter(|o| !o.is_empty())
        .cloned()
        .collect::<Vec<_>>()
        .join(",");
    eprintln!("model test: seed {seed}, {ops} operations, options {options:?}");
    let m = Mount::new(options);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut model = Model {
        files: vec![Vec::new(); FILES],
        names: (0..FILES).map(|i| format!("f{i}")).collect(),
    };
    let mut handles: HashMap<usize, File> = HashMap::new();
    for i in 0..FILES {
        handles.insert(i, open(&m.mnt, &model.names[i]));
    }
    let mut trace: Vec<String> = Vec::new();
    for step in 0..ops {
        let i = rng.usize(..FILES);
        let len = model.files[i].len() as u64;
        let recent = trace
            .iter()
            .rev()
            .take(12)
            .rev()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ");
        let ctx = |what: &str| {
            format!("seed {seed} step {step} file {i} {what}; recent operations:\n  {recent}")
        };
        match rng.u32(..100) {
            0..=34 => {
                // write, sometimes across block boundaries or past EOF
                let off = rng.u64(..=(len + 4096).min(MAX_SIZE - 1));
                let n = rng.usize(1..=(64 << 10)).min((MAX_SIZE - off) as usize);
                let data: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
                trace.push(format!("{step}: write f{i} {off}+{n} (size {len})"));
                handles[&i]
                    .write_all_at(&data, off)
                    .unwrap_or_else(|e| panic!("{}: {e}", ctx("write")));
                let f = &mut model.files[i];
                if f.len() < off as usize + n {
                    f.resize(off as usize + n, 0);
                }
                f[off as usize..off as usize + n].copy_from_slice(&data);
            }
            35..=69 => {
                let off = rng.u64(..=len + 100);
                let n = rng.usize(1..=(256 << 10));
                trace.push(format!("{step}: read f{i} {off}+{n} (size {len})"));
                let mut buf = vec![0u8; n];
                let mut got = 0;
                while got < n {
                    let r = handles[&i]
                        .read_at(&mut buf[got..], off + got as u64)
                        .unwrap_or_else(|e| panic!("{}: {e}", ctx("read")));
                    if r == 0 {
                        break;
                    }
                    got += r;
                }
                let f = &model.files[i];
                let start = (off as usize).min(f.len());
                let end = (off as usize + n).min(f.len());
                assert_eq!(got, end - start, "{} (read {off}+{n})", ctx("read length"));
                if buf[..got] != f[start..end] {
                    let at = buf[..got]
                        .iter()
                        .zip(&f[start..end])
                        .position(|(a, b)| a != b);
                    let a = at.unwrap_or(0);
                    let run = buf[a..got]
                        .iter()
                        .zip(&f[start + a..end])
                        .take_while(|(x, y)| x != y)
                        .count();
                    let log = m.log();
                    let notable: Vec<&str> = log
                        .lines()
                        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                        .collect();
                    panic!(
                        "daemon warnings:\n{}\n{}: content differs at offset {} for {run} bytes (got {:?}, expected {:?})",
                        notable.join("\n"),
                        ctx("read"),
                        off + a as u64,
                        &buf[a..(a + 8).min(got)],
                        &f[start + a..(start + a + 8).min(end)],
                    );
                }
            }
            70..=79 => {
                let size = rng.u64(..MAX_SIZE);
                trace.push(format!("{step}: truncate f{i} to {size} (size {len})"));
                handles[&i]
                    .set_len(size)
                    .unwrap_or_else(|e| panic!("{}: {e}", ctx("truncate")));
                model.files[i].resize(size as usize, 0);
            }
            80..=84 => {
                let off = rng.u64(..MAX_SIZE / 2);
                let n = rng.u64(1..MAX_SIZE / 2);
                trace.push(format!("{step}: fallocate f{i} {off}+{n} (size {len})"));
                // SAFETY: plain syscall.
                let r =
                    unsafe { libc::fallocate(handles[&i].as_raw_fd(), 0, off as i64, n as i64) };
                assert_eq!(r, 0, "{}", ctx("fallocate"));
                let f = &mut model.files[i];
                if f.len() < (off + n) as usize {
                    f.resize((off + n) as usize, 0);
                }
            }
            85..=91 => {
                // close and reopen (close-to-open revalidation)
                trace.push(format!("{step}: reopen f{i}"));
                handles.remove(&i);
                handles.insert(i, open(&m.mnt, &model.names[i]));
            }
            92..=95 => {
                // rename to a fresh name; the descriptor stays valid
                let new = format!("f{i}-{step}");
                trace.push(format!("{step}: rename f{i} to {new}"));
                std::fs::rename(m.mnt.join(&model.names[i]), m.mnt.join(&new))
                    .unwrap_or_else(|e| panic!("{}: {e}", ctx("rename")));
                model.names[i] = new;
            }
            _ => {
                // swap two files' names with a rename over an existing file
                let j = (i + 1) % FILES;
                if i != j {
                    trace.push(format!("{step}: swap f{i} and f{j}"));
                    let tmp = format!("tmp-{step}");
                    std::fs::rename(m.mnt.join(&model.names[i]), m.mnt.join(&tmp)).unwrap();
                    std::fs::rename(m.mnt.join(&model.names[j]), m.mnt.join(&model.names[i]))
                        .unwrap();
                    std::fs::rename(m.mnt.join(&tmp), m.mnt.join(&model.names[j])).unwrap();
                    model.files.swap(i, j);
                    let (hi, hj) = (handles.remove(&i).unwrap(), handles.remove(&j).unwrap());
                    handles.insert(i, hj);
                    handles.insert(j, hi);
                }
            }
        }
    }
    // The end state, through fresh opens and directly on the NAS (once
    // everything is written back).
    drop(handles);
    m.flush(None);
    for i in 0..FILES {
        let through = std::fs::read(m.mnt.join(&model.names[i])).unwrap();
        if through != model.files[i] {
            let at = through
                .iter()
                .zip(&model.files[i])
                .position(|(a, b)| a != b);
            let log = m.log();
            let notable: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect();
            panic!(
                "seed {seed}: final content of file {i} through the mount: length {} vs {}, first difference at {at:?}\ndaemon warnings:\n{}\nrecent operations:\n{}",
                through.len(),
                model.files[i].len(),
                notable.join("\n"),
                trace[trace.len().saturating_sub(20)..].join("\n")
            );
        }
        let nas = std::fs::read(m.nas.join(&model.names[i])).unwrap();
        assert!(
            nas == model.files[i],
            "seed {seed}: final content of file {i} on the NAS"
        );
    }
}

fn ops() -> usize {
    std::env::var("NASSYNC_MODEL_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

#[test]
fn fixed_seed() {
    run(
        0x006e_6173_7379_6e63,
        ops(),
        "block_size=64K,mem_cache_size=1M,cache_size=2M",
    );
}

#[test]
fn random_seed() {
    let seed = std::env::var("NASSYNC_MODEL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    run(seed, ops(), "");
}
