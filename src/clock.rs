//! The clock that stamps changes made locally (write-back's mtime and
//! ctime, `UTIME_NOW`).
//!
//! Objects created on the NAS get the NAS filesystem's timestamps, which a
//! Linux kernel takes from its coarse clock (up to a tick behind the real
//! time) or, with multigrain timestamps, from a floor that never goes back.
//! Stamping local changes with the fine-grained clock would make a file
//! written here look newer than a file created on the NAS right after it
//! (fstests generic/423 checks this order). So local stamps come from the
//! coarse clock, raised to the newest NAS timestamp seen so far — but never
//! past the real time, so a NAS whose clock runs ahead cannot drag local
//! stamps into the future.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Newest NAS timestamp seen, in nanoseconds since the epoch.
static FLOOR: AtomicI64 = AtomicI64::new(0);

fn read(clock: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec.saturating_mul(1_000_000_000) + ts.tv_nsec
}

fn to_time(ns: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64)
}

fn nanos(t: SystemTime) -> Option<i64> {
    t.duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_nanos()).ok())
}

/// The stamp for a change made now.
pub fn now() -> SystemTime {
    let coarse = read(libc::CLOCK_REALTIME_COARSE);
    to_time(coarse.max(FLOOR.load(Ordering::Relaxed)))
}

/// Notes a timestamp the NAS gave one of its objects.
pub fn observe(t: SystemTime) {
    let Some(ns) = nanos(t) else { return };
    if ns <= read(libc::CLOCK_REALTIME) {
        FLOOR.fetch_max(ns, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_ahead_of_the_real_time_and_never_behind_what_the_nas_showed() {
        let before = SystemTime::now();
        let t = now();
        assert!(t <= SystemTime::now());
        // The coarse clock lags by at most a tick (a few ms).
        assert!(before.duration_since(t).unwrap_or_default() < Duration::from_millis(100));

        let seen = SystemTime::now();
        observe(seen);
        assert!(now() >= seen);

        // A NAS clock that runs ahead is ignored.
        observe(SystemTime::now() + Duration::from_secs(3600));
        assert!(now() <= SystemTime::now());
    }
}
