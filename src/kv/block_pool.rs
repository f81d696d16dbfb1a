//! The block pool: the only owner of physical KV blocks.
//!
//! Each block has a reference count and, once full and cached, a hash. Blocks with no
//! references sit in the free queue — an index-linked doubly linked list, so a cache hit can
//! pull a block out of the middle in O(1). Allocation pops from the head; a popped block that
//! still carries a hash is evicted from the cache then. Freed blocks are appended at the tail,
//! so eviction is least-recently-freed first (LRU), and callers free a sequence's blocks tail
//! first so its prefix outlives its suffix.
//!
//! Invariants: a block is in the free queue iff its ref count is 0; `cached[h] == b` iff
//! `hash[b] == Some(h)`; `num_free` is the length of the free queue.
use super::{BlockHash, BlockId};
use std::collections::HashMap;

/// Prefix-cache lookups, in tokens (as vLLM's `prefix_cache_queries` / `prefix_cache_hits`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    pub queries: u64,
    pub hits: u64,
}

const NIL: u32 = u32::MAX;

pub struct BlockPool {
    ref_cnt: Vec<u32>,
    hash: Vec<Option<BlockHash>>,
    /// Free-queue links; `NIL` ends the list.
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    num_free: usize,
    cached: HashMap<BlockHash, BlockId>,
    enable_caching: bool,
    /// Hashes evicted since the last [`BlockPool::take_evicted`], when recording (KV events).
    evicted: Option<Vec<BlockHash>>,
}

impl BlockPool {
    pub fn new(num_blocks: usize, enable_caching: bool) -> Self {
        let mut p = Self {
            ref_cnt: vec![0; num_blocks],
            hash: vec![None; num_blocks],
            prev: vec![NIL; num_blocks],
            next: vec![NIL; num_blocks],
            head: NIL,
            tail: NIL,
            num_free: 0,
            cached: HashMap::new(),
            enable_caching,
            evicted: None,
        };
        for b in 0..num_blocks as u32 {
            p.push_tail(b);
        }
        p
    }

    pub fn num_total_blocks(&self) -> usize {
        self.ref_cnt.len()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.num_free
    }

    /// Fraction of blocks in use (referenced by a live request).
    pub fn usage(&self) -> f32 {
        if self.ref_cnt.is_empty() {
            return 0.0;
        }
        1.0 - self.num_free as f32 / self.ref_cnt.len() as f32
    }

    pub fn ref_count(&self, b: BlockId) -> u32 {
        self.ref_cnt[b.0 as usize]
    }

    pub fn get_cached_block(&self, h: &BlockHash) -> Option<BlockId> {
        if !self.enable_caching {
            return None;
        }
        self.cached.get(h).copied()
    }

    /// Takes a reference on each block; a block at zero leaves the free queue (keeping its hash).
    pub fn touch(&mut self, blocks: &[BlockId]) {
        for &b in blocks {
            if self.ref_cnt[b.0 as usize] == 0 {
                self.unlink(b.0);
            }
            self.ref_cnt[b.0 as usize] += 1;
        }
    }

    /// Pops `n` blocks from the free-queue head with one reference each, evicting their cached
    /// hashes. None (and no change) when fewer than `n` are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.num_free {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let b = self.head;
            self.unlink(b);
            if let Some(h) = self.hash[b as usize].take() {
                self.cached.remove(&h);
                if let Some(ev) = &mut self.evicted {
                    ev.push(h);
                }
            }
            self.ref_cnt[b as usize] = 1;
            out.push(BlockId(b));
        }
        Some(out)
    }

    /// Drops one reference per block, in order; blocks reaching zero go to the free-queue tail
    /// (so the first given is evicted first).
    pub fn free(&mut self, blocks: impl IntoIterator<Item = BlockId>) {
        for b in blocks {
            let rc = &mut self.ref_cnt[b.0 as usize];
            debug_assert!(*rc > 0, "double free of block {}", b.0);
            *rc = rc.saturating_sub(1);
            if *rc == 0 {
                self.push_tail(b.0);
            }
        }
    }

    /// Records that `block` (full, referenced) holds `hash`. Returns false when caching is off,
    /// the block already has a hash, or another block already holds this hash.
    pub fn cache_block(&mut self, block: BlockId, hash: BlockHash) -> bool {
        if !self.enable_caching
            || self.hash[block.0 as usize].is_some()
            || self.cached.contains_key(&hash)
        {
            return false;
        }
        self.hash[block.0 as usize] = Some(hash);
        self.cached.insert(hash, block);
        true
    }

    /// Starts keeping the hashes of evicted blocks for [`BlockPool::take_evicted`].
    pub fn record_evictions(&mut self) {
        self.evicted.get_or_insert_with(Vec::new);
    }

    /// Hashes evicted since the last call, in eviction order (empty when not recording).
    pub fn take_evicted(&mut self) -> Vec<BlockHash> {
        self.evicted
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Forgets every cached hash (only when no block is in use, like vLLM).
    pub fn reset_prefix_cache(&mut self) -> bool {
        if self.num_free != self.ref_cnt.len() {
            return false;
        }
        self.cached.clear();
        self.hash.iter_mut().for_each(|h| *h = None);
        true
    }

    fn push_tail(&mut self, b: u32) {
        self.prev[b as usize] = self.tail;
        self.next[b as usize] = NIL;
        if self.tail == NIL {
            self.head = b;
        } else {
            self.next[self.tail as usize] = b;
        }
        self.tail = b;
        self.num_free += 1;
    }

    fn unlink(&mut self, b: u32) {
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[b as usize] = NIL;
        self.next[b as usize] = NIL;
        self.num_free -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u8) -> BlockHash {
        BlockHash([i; 32])
    }

    #[test]
    fn allocate_and_free_round_trip() {
        let mut p = BlockPool::new(4, true);
        let a = p.allocate(3).unwrap();
        assert_eq!(a, vec![BlockId(0), BlockId(1), BlockId(2)]);
        assert_eq!(p.num_free_blocks(), 1);
        assert!(p.allocate(2).is_none());
        assert_eq!(
            p.num_free_blocks(),
            1,
            "a failed allocation changes nothing"
        );
        p.free(a);
        assert_eq!(p.num_free_blocks(), 4);
        assert_eq!(p.usage(), 0.0);
    }

    #[test]
    fn freed_cached_blocks_hit_until_evicted_lru() {
        let mut p = BlockPool::new(3, true);
        let a = p.allocate(3).unwrap();
        for (i, b) in a.iter().enumerate() {
            assert!(p.cache_block(*b, h(i as u8)));
        }
        // Free tail first: block 2, then 1, then 0 → eviction order 2, 1, 0.
        p.free(a.iter().rev().copied());
        assert_eq!(p.get_cached_block(&h(0)), Some(BlockId(0)));
        // A hit pulls block 0 out of the middle of the free queue.
        p.touch(&[BlockId(0)]);
        assert_eq!(p.num_free_blocks(), 2);
        let got = p.allocate(1).unwrap();
        assert_eq!(got, vec![BlockId(2)], "least recently freed goes first");
        assert_eq!(
            p.get_cached_block(&h(2)),
            None,
            "evicted hash no longer hits"
        );
        assert_eq!(p.get_cached_block(&h(1)), Some(BlockId(1)));
        p.free([BlockId(0), BlockId(2)]);
        assert_eq!(p.num_free_blocks(), 3);
    }

    #[test]
    fn shared_blocks_need_every_reference_dropped() {
        let mut p = BlockPool::new(2, true);
        let a = p.allocate(1).unwrap();
        p.touch(&a);
        assert_eq!(p.ref_count(a[0]), 2);
        p.free(a.clone());
        assert_eq!(p.num_free_blocks(), 1);
        p.free(a);
        assert_eq!(p.num_free_blocks(), 2);
    }

    #[test]
    fn duplicate_hashes_and_disabled_caching() {
        let mut p = BlockPool::new(2, true);
        let a = p.allocate(2).unwrap();
        assert!(p.cache_block(a[0], h(7)));
        assert!(!p.cache_block(a[1], h(7)), "one block per hash");
        assert!(!p.cache_block(a[0], h(8)), "one hash per block");
        let mut off = BlockPool::new(1, false);
        let b = off.allocate(1).unwrap();
        assert!(!off.cache_block(b[0], h(1)));
        assert_eq!(off.get_cached_block(&h(1)), None);
        assert!(!p.reset_prefix_cache(), "blocks in use");
        p.free(a);
        assert!(p.reset_prefix_cache());
        assert_eq!(p.get_cached_block(&h(7)), None);
    }
}
