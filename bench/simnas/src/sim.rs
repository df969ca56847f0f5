//! The "network" part of the simulated NAS: per-round-trip latency, a shared
//! bandwidth limit, operation counters, freeze/thaw and fault injection, plus
//! the text control protocol that drives them at run time.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering::Relaxed};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

macro_rules! ops {
    ($($variant:ident $name:literal),* $(,)?) => {
        /// Operation kinds, one counter each.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Op { $($variant),* }
        const OP_NAMES: &[&str] = &[$($name),*];
    };
}

ops!(
    Lookup "lookup", Forget "forget", Getattr "getattr", Setattr "setattr",
    Readlink "readlink", Mknod "mknod", Mkdir "mkdir", Unlink "unlink", Rmdir "rmdir",
    Symlink "symlink", Rename "rename", Link "link", Open "open", Read "read",
    Write "write", Flush "flush", Release "release", Fsync "fsync", Opendir "opendir",
    Readdir "readdir", Readdirplus "readdirplus", Releasedir "releasedir",
    Fsyncdir "fsyncdir", Statfs "statfs", Setxattr "setxattr", Getxattr "getxattr",
    Listxattr "listxattr", Removexattr "removexattr", Access "access", Create "create",
    Fallocate "fallocate",
);

/// Errnos accepted by the `fail` control command (a raw number also works).
const ERRNOS: &[(&str, i32)] = &[
    ("EIO", libc::EIO),
    ("ENOSPC", libc::ENOSPC),
    ("EACCES", libc::EACCES),
    ("ESTALE", libc::ESTALE),
    ("EPERM", libc::EPERM),
    ("EROFS", libc::EROFS),
    ("ENOTCONN", libc::ENOTCONN),
    ("ETIMEDOUT", libc::ETIMEDOUT),
    ("EHOSTDOWN", libc::EHOSTDOWN),
    ("EAGAIN", libc::EAGAIN),
    ("EINTR", libc::EINTR),
];

/// Mutex lock that shrugs off poisoning: a panicking thread must not wedge the NAS.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The link is modelled as a FIFO pipe: each transfer occupies it for
/// `bytes / rate` seconds after the previous one ends. This is a token bucket
/// with no burst allowance whose debt is paid by sleeping.
struct Link {
    bytes_per_sec: f64,
    free_at: Instant,
}

pub struct Sim {
    ops: [AtomicU64; OP_NAMES.len()],
    ops_total: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    latency_ns: AtomicU64,
    fail: AtomicI32,
    frozen: Mutex<bool>,
    thawed: Condvar,
    blocked: AtomicU64,
    link: Mutex<Link>,
    /// Gauge kept by the filesystem: inodes currently referenced by the kernel.
    pub inodes: AtomicU64,
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::ZERO)
}

impl Sim {
    /// `latency_ms` per round trip; `mbps` in MB/s (10^6 bytes/s), 0 = unlimited.
    pub fn new(latency_ms: f64, mbps: f64) -> Sim {
        let s = Sim {
            ops: std::array::from_fn(|_| AtomicU64::new(0)),
            ops_total: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            latency_ns: AtomicU64::new(0),
            fail: AtomicI32::new(0),
            frozen: Mutex::new(false),
            thawed: Condvar::new(),
            blocked: AtomicU64::new(0),
            inodes: AtomicU64::new(1),
            link: Mutex::new(Link {
                bytes_per_sec: 0.0,
                free_at: Instant::now(),
            }),
        };
        s.set_latency_ms(latency_ms);
        s.set_bandwidth_mbps(mbps);
        s
    }

    pub fn set_latency_ms(&self, ms: f64) {
        let ns = secs(ms / 1000.0).as_nanos().min(u64::MAX as u128) as u64;
        self.latency_ns.store(ns, Relaxed);
    }

    pub fn set_bandwidth_mbps(&self, mbps: f64) {
        let mut l = lock(&self.link);
        l.bytes_per_sec = if mbps.is_finite() && mbps > 0.0 {
            mbps * 1e6
        } else {
            0.0
        };
        l.free_at = Instant::now();
    }

    /// Count an operation that is not a round trip (forget, release, releasedir).
    pub fn count(&self, op: Op) {
        self.ops[op as usize].fetch_add(1, Relaxed);
    }

    /// One NAS round trip: count it, block while frozen, sleep the latency,
    /// then fail with the injected errno if one is set.
    pub fn round_trip(&self, op: Op) -> Result<(), i32> {
        self.count(op);
        self.ops_total.fetch_add(1, Relaxed);
        {
            let mut frozen = lock(&self.frozen);
            if *frozen {
                self.blocked.fetch_add(1, Relaxed);
                while *frozen {
                    frozen = self.thawed.wait(frozen).unwrap_or_else(|e| e.into_inner());
                }
                self.blocked.fetch_sub(1, Relaxed);
            }
        }
        let ns = self.latency_ns.load(Relaxed);
        if ns > 0 {
            std::thread::sleep(Duration::from_nanos(ns));
        }
        match self.fail.load(Relaxed) {
            0 => Ok(()),
            e => Err(e),
        }
    }

    /// Move `bytes` over the shared link: sleeps until the transfer would have
    /// completed given everything else queued on the link.
    pub fn transfer(&self, bytes: usize) {
        let done = {
            let mut l = lock(&self.link);
            if l.bytes_per_sec <= 0.0 || bytes == 0 {
                return;
            }
            let start = l.free_at.max(Instant::now());
            l.free_at = start
                .checked_add(secs(bytes as f64 / l.bytes_per_sec))
                .unwrap_or(start);
            l.free_at
        };
        let now = Instant::now();
        if done > now {
            std::thread::sleep(done - now);
        }
    }

    pub fn add_read(&self, n: usize) {
        self.bytes_read.fetch_add(n as u64, Relaxed);
    }

    pub fn add_written(&self, n: usize) {
        self.bytes_written.fetch_add(n as u64, Relaxed);
    }

    pub fn set_frozen(&self, on: bool) {
        *lock(&self.frozen) = on;
        if !on {
            self.thawed.notify_all();
        }
    }

    fn reset(&self) {
        for c in self
            .ops
            .iter()
            .chain([&self.ops_total, &self.bytes_read, &self.bytes_written])
        {
            c.store(0, Relaxed);
        }
    }

    fn stats(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "ops_total {}", self.ops_total.load(Relaxed));
        for (name, c) in OP_NAMES.iter().zip(&self.ops) {
            let _ = writeln!(s, "ops_{name} {}", c.load(Relaxed));
        }
        let _ = writeln!(s, "bytes_read {}", self.bytes_read.load(Relaxed));
        let _ = writeln!(s, "bytes_written {}", self.bytes_written.load(Relaxed));
        let _ = writeln!(s, "frozen {}", u8::from(*lock(&self.frozen)));
        let _ = writeln!(s, "blocked {}", self.blocked.load(Relaxed));
        let _ = writeln!(s, "inodes {}", self.inodes.load(Relaxed));
        let fail = self.fail.load(Relaxed);
        let name = ERRNOS.iter().find(|e| e.1 == fail).map(|e| e.0.to_string());
        let fail = if fail == 0 {
            "off".into()
        } else {
            name.unwrap_or(fail.to_string())
        };
        let _ = writeln!(s, "fail {fail}");
        let lat = self.latency_ns.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(s, "latency_ms {lat}");
        let _ = writeln!(s, "bandwidth_mbps {}", lock(&self.link).bytes_per_sec / 1e6);
        s.push_str("end\n");
        s
    }

    /// Execute one control-protocol line; returns the full reply (newline terminated).
    pub fn command(&self, line: &str) -> String {
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |w: Option<&&str>| {
            w.and_then(|w| w.parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v >= 0.0)
        };
        match words.as_slice() {
            ["stats"] => return self.stats(),
            ["reset"] => self.reset(),
            ["freeze"] => self.set_frozen(true),
            ["thaw"] => self.set_frozen(false),
            ["fail", "off"] => self.fail.store(0, Relaxed),
            ["fail", e] => {
                let code = ERRNOS
                    .iter()
                    .find(|x| x.0.eq_ignore_ascii_case(e))
                    .map(|x| x.1)
                    .or_else(|| e.parse::<i32>().ok().filter(|n| *n > 0));
                match code {
                    Some(c) => self.fail.store(c, Relaxed),
                    None => return format!("err unknown errno {e}\n"),
                }
            }
            ["latency", _] => match num(words.get(1)) {
                Some(ms) => self.set_latency_ms(ms),
                None => return "err latency wants a number of milliseconds >= 0\n".into(),
            },
            ["bandwidth", _] => match num(words.get(1)) {
                Some(m) => self.set_bandwidth_mbps(m),
                None => return "err bandwidth wants MB/s >= 0 (0 = unlimited)\n".into(),
            },
            _ => return format!("err unknown command: {}\n", line.trim()),
        }
        "ok\n".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol() {
        let s = Sim::new(0.0, 0.0);
        s.round_trip(Op::Lookup).unwrap();
        s.count(Op::Forget);
        s.add_written(10);
        let st = s.command("stats");
        assert!(st.contains("ops_total 1\n") && st.contains("ops_lookup 1\n"));
        assert!(st.contains("ops_forget 1\n") && st.contains("bytes_written 10\n"));
        assert!(st.ends_with("end\n"));
        assert_eq!(s.command("fail ESTALE"), "ok\n");
        assert_eq!(s.round_trip(Op::Read), Err(libc::ESTALE));
        assert!(s.command("stats").contains("fail ESTALE\n"));
        assert_eq!(s.command("fail off"), "ok\n");
        assert_eq!(s.command("reset"), "ok\n");
        assert!(s.command("stats").contains("ops_total 0\n"));
        assert!(s.command("fail EWHAT").starts_with("err"));
        assert!(s.command("latency -1").starts_with("err"));
        assert_eq!(s.command("latency 0.25"), "ok\n");
        assert!(s.command("stats").contains("latency_ms 0.25\n"));
        assert_eq!(s.command("bandwidth 12"), "ok\n");
        assert!(s.command("bogus").starts_with("err"));
    }
}
