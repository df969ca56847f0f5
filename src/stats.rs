//! Counters, named in one place. Shown by `nassync stats` through the
//! control socket; never through files inside the mount.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        /// Monotonic counters of one mount.
        #[derive(Debug, Default)]
        pub struct Stats {
            $(#[doc = $doc] pub $name: AtomicU64,)*
        }

        impl Stats {
            /// `name value` lines, one per counter, in declaration order.
            pub fn render(&self) -> String {
                let mut out = String::new();
                $(let _ = writeln!(out, "{} {}", stringify!($name), self.$name.load(Ordering::Relaxed));)*
                out
            }

            /// The counters as (name, value) pairs.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    fuse_ops: "FUSE requests served",
    nas_ops: "calls made to the NAS",
    nas_errors: "calls to the NAS that failed (including ENOENT answers)",
    nas_refusals: "changes the NAS refused (EPERM, EACCES, EROFS): from the first, changes of NAS objects go to it at once",
    kept_changes: "removals, renames, hard links and attribute changes of NAS objects kept in the journal while the NAS answered (made there after writeback_delay)",
    nas_slow_calls: "calls to the NAS that took a second or more",
    nas_timeouts: "calls to the NAS abandoned after timeo",
    offline_periods: "times the NAS went offline",
    offline_hits: "requests answered from the cache because the NAS was offline",
    kernel_names_dropped: "names the kernel was asked to drop, so that it forgets inodes before the daemon runs out of descriptors",
    slow_nas_hits: "NAS calls of requests the cache can answer not waited for, the NAS being over a second late with one (see offline_hits for the requests)",
    nas_bytes_read: "file bytes read from the NAS",
    nas_bytes_written: "file bytes written to the NAS",
    nas_lookups: "lookups sent to the NAS",
    nas_getattrs: "getattrs sent to the NAS",
    nas_readdirs: "directory listings read from the NAS",
    nas_reads: "read calls sent to the NAS",
    nas_writes: "write calls sent to the NAS",
    mem_hits: "blocks served from the memory cache",
    disk_hits: "blocks served from the disk cache",
    misses: "blocks read from the NAS",
    disk_corrupt: "disk cache blocks that failed their checksum and were fetched again",
    readahead_blocks: "blocks prefetched by readahead",
    direct_reads: "random reads of uncached data served from the NAS without a whole block",
    attr_hits: "attribute requests answered from the metadata cache",
    entry_hits: "lookups answered from a cached directory listing",
    negative_hits: "lookups answered by a cached negative entry",
    invalidations: "files whose cached data was dropped because the NAS changed",
    evicted_bytes: "bytes evicted from the disk cache",
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Parses `name value` lines as rendered by [`Stats::render`].
pub fn parse(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_and_parse_round_trip() {
        let s = Stats::default();
        Stats::add(&s.nas_bytes_read, 42);
        Stats::inc(&s.mem_hits);
        let parsed = parse(&s.render());
        assert!(parsed.contains(&("nas_bytes_read".to_string(), 42)));
        assert!(parsed.contains(&("mem_hits".to_string(), 1)));
        assert_eq!(parsed.len(), s.snapshot().len());
    }
}
