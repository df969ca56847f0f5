//! Which bytes of a rewritten file must reach the NAS: the new content is
//! diffed with `fast_rsync` against the signature of the base version, and
//! only what the delta does not copy from the same place in the base is
//! written. The NAS file is updated in place (its inode, links and owner
//! kept), so a block found elsewhere in the base still has to be written
//! where it now belongs, unless the base already holds it there.

use fast_rsync::{Signature, SignatureOptions, diff};

/// Granularity of the comparison.
pub const BLOCK: u32 = 4096;

/// The runs `(offset, len)` of `new` that differ from `base` at the same
/// offsets (offsets relative to the window). Every run the delta says is
/// unchanged is checked byte for byte, since MD4 matches are not proof.
pub fn changed_runs(base: &[u8], new: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut push = |off: usize, len: usize| {
        if len == 0 {
            return;
        }
        match runs.last_mut() {
            Some((o, l)) if *o + *l == off => *l += len,
            _ => runs.push((off, len)),
        }
    };
    if base.is_empty() {
        push(0, new.len());
        return runs;
    }
    let sig = Signature::calculate(
        base,
        SignatureOptions {
            block_size: BLOCK,
            crypto_hash_size: 16,
        },
    );
    let mut delta = Vec::new();
    if diff(&sig.index(), new, &mut delta).is_err() {
        push(0, new.len());
        return runs;
    }
    // Same bytes at the same offset in base and new.
    let same = |dst: usize, len: usize| {
        dst + len <= base.len() && base[dst..dst + len] == new[dst..dst + len]
    };
    let mut d = &delta[4..]; // after the magic
    let mut dst = 0usize;
    let take = |d: &mut &[u8], n: usize| -> Option<u64> {
        if d.len() < n {
            return None;
        }
        let mut b = [0u8; 8];
        b[8 - n..].copy_from_slice(&d[..n]);
        *d = &d[n..];
        Some(u64::from_be_bytes(b))
    };
    while let Some((&cmd, rest)) = d.split_first() {
        d = rest;
        match cmd {
            0 => break,
            0x01..=0x44 => {
                let n = if cmd <= 0x40 {
                    cmd as usize
                } else {
                    match take(&mut d, 1 << (cmd - 0x41)) {
                        Some(n) => n as usize,
                        None => break,
                    }
                };
                if d.len() < n {
                    break;
                }
                d = &d[n..];
                if same(dst, n) {
                    // A literal that happens to equal the base here.
                } else {
                    push(dst, n);
                }
                dst += n;
            }
            0x45..=0x54 => {
                let c = cmd - 0x45;
                let (Some(_src), Some(len)) =
                    (take(&mut d, 1 << (c / 4)), take(&mut d, 1 << (c % 4)))
                else {
                    break;
                };
                let len = len as usize;
                if !same(dst, len) {
                    push(dst, len);
                }
                dst += len;
            }
            _ => break,
        }
    }
    if dst < new.len() {
        // A delta we could not follow to the end: write the rest.
        push(dst, new.len() - dst);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(base: &[u8], new: &[u8], runs: &[(usize, usize)]) -> Vec<u8> {
        let mut out = base.to_vec();
        out.resize(new.len(), 0);
        for &(o, l) in runs {
            out[o..o + l].copy_from_slice(&new[o..o + l]);
        }
        out
    }

    #[test]
    fn only_the_changed_part_is_written() {
        let mut rng = fastrand::Rng::with_seed(1);
        let base: Vec<u8> = (0..1 << 20).map(|_| rng.u8(..)).collect();
        let mut new = base.clone();
        for b in &mut new[300_000..310_000] {
            *b = rng.u8(..);
        }
        let runs = changed_runs(&base, &new);
        let total: usize = runs.iter().map(|r| r.1).sum();
        assert!(total <= 10_000 + 2 * BLOCK as usize, "{total}");
        assert_eq!(apply(&base, &new, &runs), new);
    }

    #[test]
    fn repeated_blocks_are_not_rewritten() {
        // All-zero base and new: every block matches some zero block; none
        // needs writing.
        let base = vec![0u8; 256 * 1024];
        let mut new = base.clone();
        new[100_000] = 1;
        let runs = changed_runs(&base, &new);
        let total: usize = runs.iter().map(|r| r.1).sum();
        assert!(total <= 2 * BLOCK as usize, "{total}");
        assert_eq!(apply(&base, &new, &runs), new);
    }

    #[test]
    fn any_change_is_reproduced() {
        let mut rng = fastrand::Rng::with_seed(2);
        for _ in 0..50 {
            let len = rng.usize(0..40_000);
            let base: Vec<u8> = (0..len).map(|_| rng.u8(0..4)).collect();
            let mut new = base.clone();
            // Shift, grow, shrink, edit.
            match rng.u8(0..4) {
                0 => new.insert(rng.usize(0..=new.len()), 9),
                1 => new.extend((0..rng.usize(0..9000)).map(|_| rng.u8(..))),
                2 => new.truncate(rng.usize(0..=new.len())),
                _ => {
                    if !new.is_empty() {
                        let i = rng.usize(0..new.len());
                        new[i] ^= 0x55;
                    }
                }
            }
            let runs = changed_runs(&base, &new);
            let got = apply(&base, &new, &runs);
            assert_eq!(got, new);
        }
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;

    #[test]
    fn zeroed_and_rewritten_regions_are_reproduced() {
        let mut rng = fastrand::Rng::with_seed(9);
        for round in 0..300 {
            let len = rng.usize(1..300_000);
            let base: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            let mut new = base.clone();
            for _ in 0..rng.usize(1..5) {
                let a = rng.usize(0..new.len());
                let b = rng.usize(a..=new.len().min(a + 100_000));
                match rng.u8(0..3) {
                    0 => new[a..b].fill(0),
                    1 => new[a..b].iter_mut().for_each(|x| *x = rng.u8(..)),
                    _ => {
                        let n = rng.usize(0..=new.len());
                        new.resize(n, 0)
                    }
                }
            }
            let runs = changed_runs(&base, &new);
            let mut out = base.clone();
            out.resize(new.len(), 0);
            for &(o, l) in &runs {
                out[o..o + l].copy_from_slice(&new[o..o + l]);
            }
            assert!(out == new, "round {round}");
        }
    }
}
