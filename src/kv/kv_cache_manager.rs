//! Per-request KV cache management on top of the [`BlockPool`]: which prefix of a prompt is
//! already cached, and blocks for the tokens a step will compute.
//!
//! Block tables are append-only while a request lives. A request's full blocks are hashed once
//! (hashes kept per request, extended as blocks fill) when the step that fills them is
//! scheduled, but a hash is published to the prefix cache only by [`KvCacheManager::commit`],
//! which the engine calls after that step's KV was written. So a step that fails — or a load
//! or transfer that has not landed — never leaves a block findable whose KV does not exist.
//!
//! With a sliding window on every layer ([`KvCacheManager::set_window`]), a running request's
//! leading blocks that no future query can attend to (every position before the window of
//! its next token) go back to the pool as it advances, still published (another request with
//! the same prefix may reuse them until they are evicted); their ids stay in the block table as
//! placeholders that attention never reads. Requests whose whole KV must stay (a prefill kept
//! for a decode worker) are marked with [`KvCacheManager::keep_all`].
//!
//! The prefix lookup follows the window too: a new request needs only the cached blocks its
//! first computed query can attend to, so a hit may start after the prompt's first blocks
//! (long evicted, or released by the request that computed them). The blocks before it are
//! [`ComputedBlocks::skipped`]: placeholders in the table, never owned, read or published.
use super::block_hash::block_extra;
use super::{BlockHash, BlockHasher, BlockId, BlockPool, PrefixCacheStats};
use crate::request::{RequestId, TokenId};
use std::collections::{HashMap, HashSet};

/// Cached prefix blocks found for a new request, and the tokens they cover.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ComputedBlocks {
    /// The cached blocks, for block positions `skipped..skipped + blocks.len()`.
    pub blocks: Vec<BlockId>,
    /// Leading block positions counted as computed but outside the window of every query
    /// still to run (0 without a sliding window): no KV is kept or read for them.
    pub skipped: usize,
    pub num_computed_tokens: usize,
}

impl ComputedBlocks {
    /// Block positions the hit covers, skipped ones included.
    pub fn num_positions(&self) -> usize {
        self.skipped + self.blocks.len()
    }
}

/// A block newly published to the prefix cache (its KV written by a committed step).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommittedBlock {
    pub block: BlockId,
    pub hash: BlockHash,
    /// The previous block's hash in the sequence (None for the first block).
    pub parent: Option<BlockHash>,
    /// The block's `block_size` token ids.
    pub tokens: Vec<TokenId>,
    /// The extra keys mixed into its hash (a first block's cache salt; empty after it).
    pub extra_keys: Vec<String>,
}

pub struct KvCacheManager {
    pool: BlockPool,
    block_size: usize,
    enable_caching: bool,
    hasher: BlockHasher,
    tables: HashMap<RequestId, Vec<BlockId>>,
    /// Hashes of each request's full blocks, in order.
    hashes: HashMap<RequestId, Vec<BlockHash>>,
    /// Each request's extra keys (cache salt), for the record of what its blocks were hashed
    /// with; absent when it has none.
    extra: HashMap<RequestId, Vec<String>>,
    /// How many of each request's leading blocks are published in the prefix cache.
    published: HashMap<RequestId, usize>,
    stats: PrefixCacheStats,
    /// Blocks published since the last [`KvCacheManager::take_committed`], when recording.
    committed: Option<Vec<CommittedBlock>>,
    /// The widest sliding window when every layer has one (None: some layer sees everything).
    window: Option<usize>,
    /// Leading blocks of each request already given back (outside its window).
    released: HashMap<RequestId, usize>,
    /// Requests whose blocks all stay, window or not.
    keep: HashSet<RequestId>,
}

impl KvCacheManager {
    pub fn new(
        num_blocks: usize,
        block_size: usize,
        enable_caching: bool,
        hasher: BlockHasher,
    ) -> Self {
        Self {
            pool: BlockPool::new(num_blocks, enable_caching),
            block_size,
            enable_caching,
            hasher,
            tables: HashMap::new(),
            hashes: HashMap::new(),
            extra: HashMap::new(),
            published: HashMap::new(),
            stats: PrefixCacheStats::default(),
            committed: None,
            window: None,
            released: HashMap::new(),
            keep: HashSet::new(),
        }
    }

    /// Frees blocks outside `window` tokens before each request's next token (set it only
    /// when every layer attends within a window of at most this many tokens).
    pub fn set_window(&mut self, window: Option<usize>) {
        self.window = window.filter(|&w| w > 0);
    }

    /// Keeps every block of `req` until it is freed or detached, window or not.
    pub fn keep_all(&mut self, req: &RequestId) {
        self.keep.insert(req.clone());
    }

    /// Leading blocks of `req` given back because they fell outside the window.
    pub fn num_released(&self, req: &RequestId) -> usize {
        self.released.get(req).copied().unwrap_or(0)
    }

    /// Gives back the request's leading blocks that no query from token `num_computed_tokens`
    /// on can attend to: the window of a query at position p starts at p + 1 - window. Only
    /// published blocks go (their KV is written and findable), head first, so the oldest is
    /// evicted first.
    fn release_outside_window(&mut self, req: &RequestId, num_computed_tokens: usize) {
        let Some(window) = self.window_of(req) else {
            return;
        };
        let Some(table) = self.tables.get(req) else {
            return;
        };
        let mut upto = self
            .first_visible_block(window, num_computed_tokens)
            .min(table.len());
        if self.enable_caching {
            upto = upto.min(self.published.get(req).copied().unwrap_or(0));
        }
        let done = self.released.get(req).copied().unwrap_or(0);
        if upto <= done {
            return;
        }
        self.pool.free(table[done..upto].iter().copied());
        self.released.insert(req.clone(), upto);
    }

    /// The window `req`'s blocks follow: none for a request kept whole.
    fn window_of(&self, req: &RequestId) -> Option<usize> {
        self.window.filter(|_| !self.keep.contains(req))
    }

    /// The first block the query at token `pos` can attend to with a `window`: its window
    /// starts at `pos + 1 - window`.
    fn first_visible_block(&self, window: usize, pos: usize) -> usize {
        (pos + 1).saturating_sub(window) / self.block_size
    }

    /// Keeps what is published and evicted for [`Self::take_committed`] and
    /// [`Self::take_evicted`] (KV events, offloading). Off by default: nobody would drain it.
    pub fn record_changes(&mut self) {
        self.committed.get_or_insert_with(Vec::new);
        self.pool.record_evictions();
    }

    /// Blocks published since the last call, in publication order.
    pub fn take_committed(&mut self) -> Vec<CommittedBlock> {
        self.committed
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Hashes evicted from the device pool since the last call.
    pub fn take_evicted(&mut self) -> Vec<BlockHash> {
        self.pool.take_evicted()
    }

    /// The chained hashes of `tokens`' full blocks, leaving at least one token (a prompt's
    /// last token must run): the candidates for a prefix lookup below the device.
    pub fn prompt_block_hashes(&self, tokens: &[TokenId], extra_keys: &[String]) -> Vec<BlockHash> {
        if !self.enable_caching {
            return Vec::new();
        }
        self.hasher
            .hash_prefix_blocks(tokens, self.block_size, extra_keys)
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The device blocks holding the leading run of `hashes` in the prefix cache.
    pub fn cached_run(&self, hashes: &[BlockHash]) -> Vec<BlockId> {
        hashes
            .iter()
            .map_while(|h| self.pool.get_cached_block(h))
            .collect()
    }

    /// The hasher of this cache's block hashes (for peers that ask by hash).
    pub fn hasher(&self) -> &BlockHasher {
        &self.hasher
    }

    /// Longest cached prefix of `tokens` in full blocks, leaving at least one token to compute
    /// (the last prompt token must run to produce logits). Takes no references. Counts a query
    /// of `tokens.len()` tokens and a hit of the tokens found.
    pub fn get_computed_blocks(
        &mut self,
        req: &RequestId,
        tokens: &[TokenId],
        extra_keys: &[String],
    ) -> ComputedBlocks {
        let out = self.find_computed_blocks(req, tokens, extra_keys);
        self.count_lookup(tokens.len(), out.num_computed_tokens);
        out
    }

    /// Counts a prefix lookup of `queried` tokens that found `hit` (vLLM's
    /// `prefix_cache_queries` / `prefix_cache_hits`).
    pub fn count_lookup(&mut self, queried: usize, hit: usize) {
        if !self.enable_caching || queried == 0 {
            return;
        }
        self.stats.queries += queried as u64;
        self.stats.hits += hit as u64;
    }

    /// [`Self::get_computed_blocks`] without counting the lookup (a probe before the request
    /// is really admitted).
    ///
    /// Without a window this is the longest run of cached blocks from the first. With one
    /// (and `req` not kept whole) it is the longest prefix of `L` blocks whose last blocks —
    /// those the query at token `L * block_size` can attend to — are all cached, as vLLM's
    /// sliding-window manager finds it.
    pub fn find_computed_blocks(
        &self,
        req: &RequestId,
        tokens: &[TokenId],
        extra_keys: &[String],
    ) -> ComputedBlocks {
        let mut out = ComputedBlocks::default();
        if !self.enable_caching || tokens.is_empty() {
            return out;
        }
        let bs = self.block_size;
        let max_blocks = (tokens.len() - 1) / bs;
        let window = self.window_of(req);
        let mut found: Vec<Option<BlockId>> = Vec::with_capacity(max_blocks);
        let mut parent: Option<BlockHash> = None;
        for (i, chunk) in tokens.chunks_exact(bs).take(max_blocks).enumerate() {
            let h = self
                .hasher
                .hash(parent.as_ref(), chunk, block_extra(i, extra_keys));
            let b = self.pool.get_cached_block(&h);
            if b.is_none() && window.is_none() {
                break;
            }
            found.push(b);
            parent = Some(h);
        }
        // `run` = cached blocks ending at block `len - 1`; a prefix of `len` blocks is a hit
        // when its blocks from the first one the next query sees are all in that run.
        let mut best = (0, 0);
        let mut run = 0;
        for (i, b) in found.iter().enumerate() {
            run = if b.is_some() { run + 1 } else { 0 };
            let len = i + 1;
            // At least the last block stays real (a window of one token needs none).
            let first_seen = window.map_or(0, |w| self.first_visible_block(w, len * bs).min(i));
            if run > 0 && len - first_seen <= run {
                best = (first_seen, len);
            }
        }
        let (first, len) = best;
        out.skipped = first;
        out.blocks = found[first..len]
            .iter()
            .map(|b| b.expect("in the run"))
            .collect();
        out.num_computed_tokens = len * bs;
        out
    }

    /// Makes room for tokens `[0, num_computed_tokens + num_new_tokens)` of `req`. `new_computed`
    /// are cache hits for a request with no blocks yet (already counted in
    /// `num_computed_tokens`). Returns false, changing nothing, when the pool is short.
    pub fn allocate_slots(
        &mut self,
        req: &RequestId,
        tokens: &[TokenId],
        num_computed_tokens: usize,
        num_new_tokens: usize,
        new_computed: &ComputedBlocks,
        extra_keys: &[String],
    ) -> bool {
        self.release_outside_window(req, num_computed_tokens);
        let total = num_computed_tokens + num_new_tokens;
        let have = self.tables.get(req).map_or(0, Vec::len) + new_computed.num_positions();
        let need = total.div_ceil(self.block_size).saturating_sub(have);
        // Hits sitting in the free queue stop being free once touched.
        let hits_from_free = new_computed
            .blocks
            .iter()
            .filter(|b| self.pool.ref_count(**b) == 0)
            .count();
        if need + hits_from_free > self.pool.num_free_blocks() {
            return false;
        }
        self.pool.touch(&new_computed.blocks);
        let fresh = self.pool.allocate(need).expect("free blocks were counted");
        let table = self.tables.entry(req.clone()).or_default();
        if new_computed.skipped > 0 {
            // Placeholders for the skipped positions (attention never reads them): the first
            // cached block, so the table holds only ids of this pool.
            let placeholder = new_computed.blocks[0];
            table.extend(std::iter::repeat_n(placeholder, new_computed.skipped));
            self.released.insert(req.clone(), new_computed.skipped);
        }
        table.extend_from_slice(&new_computed.blocks);
        table.extend(fresh);
        if self.enable_caching {
            if !extra_keys.is_empty() {
                self.extra.insert(req.clone(), extra_keys.to_vec());
            }
            let hashes = self.hashes.entry(req.clone()).or_default();
            let full = total.min(tokens.len()) / self.block_size;
            while hashes.len() < full {
                let i = hashes.len();
                let chunk = &tokens[i * self.block_size..(i + 1) * self.block_size];
                hashes.push(
                    self.hasher
                        .hash(hashes.last(), chunk, block_extra(i, extra_keys)),
                );
            }
            // Cache hits are published already: their KV exists.
            let published = self.published.entry(req.clone()).or_default();
            *published = (*published).max(new_computed.num_positions());
        }
        true
    }

    /// Publishes the request's full blocks among its first `num_computed_tokens` tokens, whose
    /// KV is now written, to the prefix cache. Call only after the step (or load) that wrote
    /// them completed.
    /// `tokens` are the request's tokens (for the record of what was published).
    pub fn commit(&mut self, req: &RequestId, tokens: &[TokenId], num_computed_tokens: usize) {
        let (Some(table), Some(hashes)) = (self.tables.get(req), self.hashes.get(req)) else {
            return;
        };
        let published = self.published.entry(req.clone()).or_default();
        let full = (num_computed_tokens / self.block_size)
            .min(hashes.len())
            .min(table.len());
        for i in *published..full {
            if self.pool.cache_block(table[i], hashes[i]) {
                if let Some(c) = &mut self.committed {
                    let bs = self.block_size;
                    c.push(CommittedBlock {
                        block: table[i],
                        hash: hashes[i],
                        parent: i.checked_sub(1).map(|p| hashes[p]),
                        tokens: tokens
                            .get(i * bs..(i + 1) * bs)
                            .unwrap_or_default()
                            .to_vec(),
                        extra_keys: self
                            .extra
                            .get(req)
                            .map_or(&[][..], |e| block_extra(i, e))
                            .to_vec(),
                    });
                }
            }
        }
        *published = (*published).max(full);
    }

    /// Takes the request's blocks out of its table without freeing them: they keep their
    /// reference (so they are never evicted) until [`Self::release`]. A prefiller keeps a
    /// finished request's KV this way until its decoder has read it.
    pub fn detach(&mut self, req: &RequestId) -> Vec<BlockId> {
        self.hashes.remove(req);
        self.extra.remove(req);
        self.published.remove(req);
        self.keep.remove(req);
        let released = self.released.remove(req).unwrap_or(0);
        // Released blocks are not this request's any more (none for a kept request).
        let mut table = self.tables.remove(req).unwrap_or_default();
        table.drain(..released.min(table.len()));
        table
    }

    /// Frees blocks taken by [`Self::detach`], tail first.
    pub fn release(&mut self, blocks: Vec<BlockId>) {
        self.pool.free(blocks.into_iter().rev());
    }

    /// Releases the request's blocks, tail first; unknown ids are ignored.
    pub fn free(&mut self, req: &RequestId) {
        self.hashes.remove(req);
        self.extra.remove(req);
        self.published.remove(req);
        self.keep.remove(req);
        let released = self.released.remove(req).unwrap_or(0);
        if let Some(table) = self.tables.remove(req) {
            self.pool.free(table.into_iter().skip(released).rev());
        }
    }

    pub fn block_table(&self, req: &RequestId) -> &[BlockId] {
        self.tables.get(req).map_or(&[], Vec::as_slice)
    }

    /// The chained hashes of the request's full blocks so far.
    pub fn block_hashes(&self, req: &RequestId) -> &[BlockHash] {
        self.hashes.get(req).map_or(&[], Vec::as_slice)
    }

    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free_blocks()
    }

    pub fn num_total_blocks(&self) -> usize {
        self.pool.num_total_blocks()
    }

    pub fn usage(&self) -> f32 {
        self.pool.usage()
    }

    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::BlockHashAlgo;

    fn mgr(blocks: usize, caching: bool) -> KvCacheManager {
        KvCacheManager::new(
            blocks,
            16,
            caching,
            BlockHasher::new(BlockHashAlgo::Xxh3, "0"),
        )
    }

    fn toks(n: usize, base: u32) -> Vec<u32> {
        (0..n as u32).map(|t| t + base).collect()
    }

    fn admit(m: &mut KvCacheManager, id: &str, tokens: &[u32]) -> ComputedBlocks {
        let r = RequestId::from(id);
        let hit = m.get_computed_blocks(&r, tokens, &[]);
        let n = tokens.len() - hit.num_computed_tokens;
        assert!(m.allocate_slots(&r, tokens, hit.num_computed_tokens, n, &hit, &[]));
        // The step that computes them succeeded.
        m.commit(&r, tokens, tokens.len());
        hit
    }

    #[test]
    fn blocks_are_found_only_after_their_step_commits() {
        let mut m = mgr(16, true);
        let t = toks(40, 0);
        let a = RequestId::from("a");
        assert!(m.allocate_slots(&a, &t, 0, 40, &Default::default(), &[]));
        assert_eq!(m.block_hashes(&a).len(), 2, "hashed when scheduled");
        // The step failed: nothing was written, so nothing may be found.
        assert_eq!(
            m.get_computed_blocks(&"b".into(), &t, &[])
                .num_computed_tokens,
            0
        );
        m.free(&a);
        assert_eq!(
            m.get_computed_blocks(&"b".into(), &t, &[])
                .num_computed_tokens,
            0,
            "freed blocks of a failed step carry no hash"
        );
        // A chunked prefill: 20 tokens written, so only block 0 is complete.
        assert!(m.allocate_slots(&a, &t, 0, 20, &Default::default(), &[]));
        m.commit(&a, &t, 20);
        assert_eq!(
            m.get_computed_blocks(&"b".into(), &t, &[])
                .num_computed_tokens,
            16
        );
        assert!(m.allocate_slots(&a, &t, 20, 20, &Default::default(), &[]));
        m.commit(&a, &t, 40);
        assert_eq!(
            m.get_computed_blocks(&"b".into(), &t, &[])
                .num_computed_tokens,
            32
        );
    }

    #[test]
    fn shared_200_token_prefix_hits_12_blocks() {
        let mut m = mgr(64, true);
        let prefix = toks(200, 1000);
        let a = [prefix.clone(), toks(30, 1)].concat();
        let b = [prefix, toks(25, 500)].concat();
        assert_eq!(admit(&mut m, "a", &a).num_computed_tokens, 0);
        m.free(&"a".into());
        let hit = admit(&mut m, "b", &b);
        assert_eq!(hit.blocks.len(), 12);
        assert_eq!(hit.num_computed_tokens, 192);
        assert_eq!(&m.block_table(&"b".into())[..12], hit.blocks.as_slice());
        let s = m.prefix_cache_stats();
        assert_eq!((s.queries, s.hits), ((a.len() + b.len()) as u64, 192));
        m.free(&"b".into());
        assert_eq!(m.num_free_blocks(), 64);
    }

    #[test]
    fn exact_block_multiple_leaves_one_token_to_compute() {
        let mut m = mgr(16, true);
        let t = toks(48, 0);
        admit(&mut m, "a", &t);
        let hit = admit(&mut m, "b", &t);
        assert_eq!(
            hit.num_computed_tokens, 32,
            "3 full blocks, only 2 reusable"
        );
        // Live sharing: the two requests reference the same first blocks.
        assert_eq!(
            m.block_table(&"a".into())[..2],
            m.block_table(&"b".into())[..2]
        );
        assert_eq!(
            m.num_free_blocks(),
            16 - 4,
            "a's 3 blocks + b's own third block"
        );
        m.free(&"a".into());
        assert_eq!(
            m.num_free_blocks(),
            16 - 3,
            "b keeps the 2 shared blocks and its own"
        );
        m.free(&"b".into());
        assert_eq!(m.num_free_blocks(), 16);
    }

    #[test]
    fn out_of_blocks_changes_nothing() {
        let mut m = mgr(2, true);
        let r = RequestId::from("a");
        assert!(!m.allocate_slots(&r, &toks(40, 0), 0, 40, &Default::default(), &[]));
        assert_eq!(m.num_free_blocks(), 2);
        assert!(m.block_table(&r).is_empty());
    }

    #[test]
    fn decode_fills_and_caches_blocks() {
        let mut m = mgr(8, true);
        let r = RequestId::from("a");
        let mut t = toks(15, 0);
        assert!(m.allocate_slots(&r, &t, 0, 15, &Default::default(), &[]));
        m.commit(&r, &t, 15);
        assert!(m.block_hashes(&r).is_empty());
        t.push(99);
        assert!(m.allocate_slots(&r, &t, 15, 1, &Default::default(), &[]));
        m.commit(&r, &t, 16);
        assert_eq!(m.block_hashes(&r).len(), 1, "the 16th token fills block 0");
        assert_eq!(m.block_table(&r).len(), 1);
        t.push(100);
        assert!(m.allocate_slots(&r, &t, 16, 1, &Default::default(), &[]));
        m.commit(&r, &t, 17);
        assert_eq!(m.block_table(&r).len(), 2);
        m.free(&r);
        // A new request with the same 17 tokens finds block 0.
        let hit = m.get_computed_blocks(&"b".into(), &t, &[]);
        assert_eq!(hit.num_computed_tokens, 16);
    }

    #[test]
    fn eviction_drops_hits_and_caching_can_be_off() {
        let mut m = mgr(4, true);
        m.record_changes();
        let t = toks(33, 0);
        admit(&mut m, "a", &t); // 3 blocks, 2 cached
        let a = m.block_hashes(&"a".into()).to_vec();
        let committed = m.take_committed();
        assert_eq!(committed.len(), 2);
        assert_eq!((committed[0].hash, committed[0].parent), (a[0], None));
        assert_eq!((committed[1].hash, committed[1].parent), (a[1], Some(a[0])));
        assert_eq!(committed[1].tokens, t[16..32]);
        assert_eq!(
            m.prompt_block_hashes(&t, &[]),
            a,
            "33 tokens: 2 full blocks"
        );
        m.free(&"a".into());
        // A different 64-token request needs all 4 blocks: the cached ones are evicted.
        admit(&mut m, "b", &toks(64, 700));
        let mut evicted = m.take_evicted();
        evicted.sort();
        let mut want = a.clone();
        want.sort();
        assert_eq!(evicted, want);
        m.free(&"b".into());
        assert_eq!(
            m.get_computed_blocks(&"c".into(), &t, &[])
                .num_computed_tokens,
            0
        );

        let mut off = mgr(4, false);
        admit(&mut off, "a", &t);
        off.free(&"a".into());
        assert_eq!(
            off.get_computed_blocks(&"b".into(), &t, &[])
                .num_computed_tokens,
            0
        );
    }

    #[test]
    fn extra_keys_separate_caches() {
        let mut m = mgr(8, true);
        let t = toks(40, 0);
        let r = RequestId::from("a");
        let lora = vec!["lora-1".to_string()];
        assert!(m.allocate_slots(&r, &t, 0, 40, &Default::default(), &lora));
        m.commit(&r, &t, 40);
        m.free(&r);
        assert_eq!(
            m.get_computed_blocks(&"b".into(), &t, &[])
                .num_computed_tokens,
            0
        );
        assert_eq!(
            m.get_computed_blocks(&"b".into(), &t, &lora)
                .num_computed_tokens,
            32
        );
    }

    /// With a window, blocks behind every future query's window go back to the pool as the
    /// request advances (published, so still findable), none twice; a kept request gives back
    /// nothing; freeing or detaching afterwards returns only what the request still owns.
    #[test]
    fn blocks_outside_the_window_are_released() {
        let mut m = mgr(16, true);
        m.set_window(Some(32));
        let r = RequestId::from("r");
        let tokens = toks(200, 100);
        // 40 prompt tokens: 3 blocks; no position is outside the window yet.
        assert!(m.allocate_slots(&r, &tokens, 0, 40, &ComputedBlocks::default(), &[]));
        m.commit(&r, &tokens, 40);
        assert_eq!(m.num_free_blocks(), 13);
        // Decoding token 40: its window starts at 9, block 0 (0..16) is still in it.
        assert!(m.allocate_slots(&r, &tokens, 40, 1, &ComputedBlocks::default(), &[]));
        assert_eq!(m.num_released(&r), 0);
        // At 100 computed tokens: the next query (position 100) sees 69.., blocks 0-3 go.
        for pos in 41..100 {
            m.commit(&r, &tokens, pos);
            assert!(m.allocate_slots(&r, &tokens, pos, 1, &ComputedBlocks::default(), &[]));
        }
        m.commit(&r, &tokens, 100);
        assert!(m.allocate_slots(&r, &tokens, 100, 1, &ComputedBlocks::default(), &[]));
        assert_eq!(m.num_released(&r), 4);
        assert_eq!(m.block_table(&r).len(), 7, "placeholders stay in the table");
        assert_eq!(m.num_free_blocks(), 16 - 3);
        // The released blocks are still published: a request with the same prefix hits them.
        let hashes = m.prompt_block_hashes(&tokens[..80], &[]);
        assert!(hashes.len() >= 4);
        assert_eq!(m.cached_run(&hashes).len(), hashes.len());
        m.free(&r);
        assert_eq!(m.num_free_blocks(), 16, "no block freed twice");

        // A kept request releases nothing, and detach hands back every block.
        let k = RequestId::from("k");
        m.keep_all(&k);
        assert!(m.allocate_slots(&k, &tokens, 0, 100, &ComputedBlocks::default(), &[]));
        m.commit(&k, &tokens, 100);
        assert!(m.allocate_slots(&k, &tokens, 100, 1, &ComputedBlocks::default(), &[]));
        assert_eq!(m.num_released(&k), 0);
        assert_eq!(m.detach(&k).len(), 7);
    }

    /// With a window, a new request's hit needs only the blocks its first query can see:
    /// the prompt's head may be gone from the cache (here: released by the request that
    /// computed it, then evicted) and the hit still covers the prompt, the head as
    /// placeholders that are never owned, freed or published. A kept request (a prefill for
    /// a decode worker) and a model without a window need the whole run.
    #[test]
    fn windowed_lookup_skips_blocks_outside_the_window() {
        let mut m = mgr(16, true);
        m.set_window(Some(32));
        let tokens = toks(112, 100);
        let a = RequestId::from("a");
        assert!(m.allocate_slots(&a, &tokens, 0, 100, &ComputedBlocks::default(), &[]));
        m.commit(&a, &tokens, 100);
        // Decoding token 100: blocks 0-3 fall outside the window (it starts at 69).
        assert!(m.allocate_slots(&a, &tokens, 100, 1, &ComputedBlocks::default(), &[]));
        assert_eq!(m.num_released(&a), 4);
        // Another request takes the 9 unused blocks and two of the released: 0 and 1 evicted.
        let c = RequestId::from("c");
        let other = toks(176, 5000);
        assert!(m.allocate_slots(&c, &other, 0, 176, &ComputedBlocks::default(), &[]));
        assert_eq!(m.num_free_blocks(), 2);
        let hashes = m.prompt_block_hashes(&tokens[..97], &[]);
        assert_eq!(m.cached_run(&hashes).len(), 0, "the head is evicted");

        // 97 tokens: 6 full blocks; the query at token 96 sees 65.., i.e. blocks 4 and 5.
        let b = RequestId::from("b");
        let hit = m.find_computed_blocks(&b, &tokens[..97], &[]);
        assert_eq!(hit.skipped, 4);
        assert_eq!(hit.blocks, &m.block_table(&a)[4..6]);
        assert_eq!(hit.num_computed_tokens, 96);
        // 65 tokens: the query at 64 sees 33.. = blocks 2 and 3, which are cached (released
        // by `a`, not evicted): skipped 2.
        let short = m.find_computed_blocks(&b, &tokens[..65], &[]);
        assert_eq!((short.skipped, short.blocks.len()), (2, 2));
        // 49 tokens: the query at 48 sees 17.. = blocks 1 and 2, and block 1 is gone; shorter
        // prefixes need block 0 or 1 too: no hit.
        let none = m.find_computed_blocks(&b, &tokens[..49], &[]);
        assert_eq!(none.num_computed_tokens, 0);

        assert!(m.allocate_slots(&b, &tokens, 96, 1, &hit, &[]));
        assert_eq!(m.block_table(&b).len(), 7);
        assert_eq!(m.num_released(&b), 4, "placeholders are not b's");
        assert_eq!(m.num_free_blocks(), 1);
        // Freeing gives back only what each request owns: every block exactly once.
        for r in [&a, &b, &c] {
            m.free(r);
        }
        assert_eq!(m.num_free_blocks(), 16);

        // A kept request needs the whole run; so does any request without a window.
        let k = RequestId::from("k");
        m.keep_all(&k);
        assert_eq!(
            m.find_computed_blocks(&k, &tokens[..97], &[])
                .num_computed_tokens,
            0
        );
        m.set_window(None);
        assert_eq!(
            m.find_computed_blocks(&b, &tokens[..97], &[])
                .num_computed_tokens,
            0
        );
    }
}
