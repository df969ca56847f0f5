//! A set of byte ranges: the parts of a file that changed locally.

use std::collections::BTreeMap;

/// Disjoint, non-adjacent half-open ranges `start..end`, kept merged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start -> end
    map: BTreeMap<u64, u64>,
    /// Bytes covered, kept up to date.
    total: u64,
}

impl RangeSet {
    pub fn new() -> Self {
        RangeSet::default()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Total bytes covered.
    pub fn bytes(&self) -> u64 {
        self.total
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.iter().map(|(s, e)| (*s, *e))
    }

    pub fn first(&self) -> Option<u64> {
        self.map.keys().next().copied()
    }

    /// Adds `start..end`, merging with overlapping or touching ranges.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        // A range that starts before `start` and reaches it.
        if let Some((&ps, &pe)) = self.map.range(..=s).next_back() {
            if pe >= s {
                s = ps;
                e = e.max(pe);
                self.map.remove(&ps);
                self.total -= pe - ps;
            }
        }
        let overlapping: Vec<u64> = self.map.range(s..=e).map(|(k, _)| *k).collect();
        for k in overlapping {
            if let Some(ke) = self.map.remove(&k) {
                e = e.max(ke);
                self.total -= ke - k;
            }
        }
        self.map.insert(s, e);
        self.total += e - s;
    }

    /// Removes `start..end`.
    pub fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let touched: Vec<(u64, u64)> = self
            .map
            .range(..end)
            .filter(|(_, e)| **e > start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in touched {
            self.map.remove(&s);
            self.total -= e - s;
            if s < start {
                self.map.insert(s, start);
                self.total += start - s;
            }
            if e > end {
                self.map.insert(end, e);
                self.total += e - end;
            }
        }
    }

    /// Drops everything at or after `size`.
    pub fn truncate(&mut self, size: u64) {
        self.remove(size, u64::MAX);
    }

    /// Adds every range of `other`.
    pub fn union(&mut self, other: &RangeSet) {
        for (s, e) in other.iter() {
            self.insert(s, e);
        }
    }

    /// The parts of `start..end` covered, and the parts not covered, in
    /// order: `(offset, len, covered)`.
    pub fn split(&self, start: u64, end: u64) -> Vec<(u64, u64, bool)> {
        let mut out = Vec::new();
        let mut pos = start;
        let first = match self.map.range(..=start).next_back() {
            Some((&s, _)) => s,
            None => start,
        };
        for (&s, &e) in self.map.range(first..end) {
            if e <= pos {
                continue;
            }
            let s = s.max(pos);
            if s > pos {
                out.push((pos, s - pos, false));
            }
            let e = e.min(end);
            out.push((s, e - s, true));
            pos = e;
        }
        if pos < end {
            out.push((pos, end - pos, false));
        }
        out
    }

    /// Serialized as little-endian (start, end) pairs.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.map.len() * 16);
        for (s, e) in self.iter() {
            out.extend_from_slice(&s.to_le_bytes());
            out.extend_from_slice(&e.to_le_bytes());
        }
        out
    }

    pub fn from_bytes(b: &[u8]) -> Option<RangeSet> {
        if b.len() % 16 != 0 {
            return None;
        }
        let mut set = RangeSet::new();
        for c in b.chunks_exact(16) {
            let s = u64::from_le_bytes(c[..8].try_into().ok()?);
            let e = u64::from_le_bytes(c[8..].try_into().ok()?);
            if s >= e {
                return None;
            }
            set.insert(s, e);
        }
        Some(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(r: &RangeSet) -> Vec<(u64, u64)> {
        r.iter().collect()
    }

    #[test]
    fn inserts_merge() {
        let mut r = RangeSet::new();
        r.insert(10, 20);
        r.insert(30, 40);
        assert_eq!(v(&r), [(10, 20), (30, 40)]);
        r.insert(20, 30);
        assert_eq!(v(&r), [(10, 40)]);
        r.insert(5, 12);
        r.insert(35, 50);
        assert_eq!(v(&r), [(5, 50)]);
        r.insert(60, 70);
        r.insert(0, 100);
        assert_eq!(v(&r), [(0, 100)]);
        assert_eq!(r.bytes(), 100);
    }

    #[test]
    fn removes_split() {
        let mut r = RangeSet::new();
        r.insert(0, 100);
        r.remove(10, 20);
        assert_eq!(v(&r), [(0, 10), (20, 100)]);
        r.truncate(50);
        assert_eq!(v(&r), [(0, 10), (20, 50)]);
        r.remove(0, 30);
        assert_eq!(v(&r), [(30, 50)]);
    }

    #[test]
    fn split_covers_the_whole_span() {
        let mut r = RangeSet::new();
        r.insert(10, 20);
        r.insert(30, 40);
        assert_eq!(
            r.split(15, 35),
            [(15, 5, true), (20, 10, false), (30, 5, true)]
        );
        assert_eq!(r.split(0, 5), [(0, 5, false)]);
        assert_eq!(r.split(40, 45), [(40, 5, false)]);
    }

    #[test]
    fn matches_a_bitmap_model() {
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..200 {
            let mut r = RangeSet::new();
            let mut model = [false; 64];
            for _ in 0..20 {
                let a = rng.u64(0..64);
                let b = rng.u64(a..=64);
                let add = rng.bool();
                if add {
                    r.insert(a, b);
                } else {
                    r.remove(a, b);
                }
                for m in &mut model[a as usize..b as usize] {
                    *m = add;
                }
            }
            let mut got = [false; 64];
            for (s, e) in r.iter() {
                for g in &mut got[s as usize..e as usize] {
                    *g = true;
                }
            }
            assert_eq!(got, model);
            assert_eq!(r.bytes(), model.iter().filter(|m| **m).count() as u64);
            let back = RangeSet::from_bytes(&r.to_bytes()).unwrap();
            assert_eq!(back, r);
            // Merged: no two ranges touch.
            let all: Vec<_> = r.iter().collect();
            for w in all.windows(2) {
                assert!(w[0].1 < w[1].0);
            }
        }
    }
}
