//! The in-memory block cache: moka, bounded in bytes. Concurrent misses on
//! one block are merged: one caller fetches, the others wait for it.

use std::sync::Arc;

use moka::sync::Cache;

/// (inode, epoch, block index).
pub type BlockKey = (u64, u64, u64);

/// See the module documentation.
pub struct MemCache {
    cache: Cache<BlockKey, Arc<[u8]>>,
}

impl MemCache {
    pub fn new(capacity_bytes: u64) -> Self {
        MemCache {
            cache: Cache::builder()
                .max_capacity(capacity_bytes)
                .weigher(|_k, v: &Arc<[u8]>| v.len().max(1).try_into().unwrap_or(u32::MAX))
                .build(),
        }
    }

    pub fn get(&self, key: &BlockKey) -> Option<Arc<[u8]>> {
        self.cache.get(key)
    }

    pub fn contains(&self, key: &BlockKey) -> bool {
        self.cache.contains_key(key)
    }

    /// The block, from memory or from `fetch`, which runs once however many
    /// callers miss on the same key at once.
    pub fn get_or_fetch<E: Send + Sync + 'static>(
        &self,
        key: BlockKey,
        fetch: impl FnOnce() -> Result<Arc<[u8]>, E>,
    ) -> Result<(Arc<[u8]>, bool), Arc<E>> {
        let mut fetched = false;
        let block = self.cache.try_get_with(key, || {
            fetched = true;
            fetch()
        })?;
        Ok((block, !fetched))
    }

    pub fn weighted_size(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.weighted_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_in_bytes() {
        let c = MemCache::new(4 << 20);
        for i in 0..64 {
            let k = (1, 0, i);
            c.get_or_fetch::<()>(k, || Ok(vec![0u8; 1 << 20].into()))
                .unwrap();
        }
        assert!(c.weighted_size() <= 4 << 20);
    }

    #[test]
    fn second_get_is_a_hit() {
        let c = MemCache::new(1 << 20);
        let (_, hit) = c
            .get_or_fetch::<()>((1, 0, 0), || Ok(vec![1u8; 10].into()))
            .unwrap();
        assert!(!hit);
        let (b, hit) = c
            .get_or_fetch::<()>((1, 0, 0), || panic!("must not fetch"))
            .unwrap();
        assert!(hit);
        assert_eq!(&b[..], &[1u8; 10]);
    }
}
