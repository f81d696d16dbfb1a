//! The router's global prefix index: which worker holds which KV block, in which tier, fed by
//! the workers' KV events.
//!
//! Block keys are the router's own, computed the way llm-d's KV-cache indexer computes them,
//! so one index serves llmd workers and plain vLLM pods whatever hash scheme each uses: the
//! key of a block is a hash of the canonical CBOR of `[parent key (uint), [token ids], null]`
//! — FNV-64a ([`KeyScheme::Fnv64a`], the default) or the low 64 bits of SHA-256
//! ([`KeyScheme::Sha256`], read big-endian from the digest's last 8 bytes, as vLLM's
//! `sha256_cbor_64bit`) — and the first block's parent is the same hash of the CBOR text
//! string of the hash seed (vLLM's `PYTHONHASHSEED`). A `BlockStored` event carries its
//! blocks' tokens and the worker's hash of their parent, so the router maps each worker's own
//! hashes to its keys as events arrive and never needs the worker's scheme.
use crate::kv::block_hash::{block_extra, cbor};
use crate::kv::{KvEvent, Medium};
use lru::LruCache;
use sha2::{Digest, Sha256};
use smallvec::SmallVec;
use std::collections::HashMap;

/// How block keys are hashed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyScheme {
    Fnv64a,
    Sha256,
}

impl std::str::FromStr for KeyScheme {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fnv64a" => Ok(Self::Fnv64a),
            "sha256" | "sha256_cbor_64bit" => Ok(Self::Sha256),
            _ => Err(format!("unknown key scheme {s:?}: fnv64a or sha256")),
        }
    }
}

fn fnv64a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Computes block keys.
#[derive(Clone, Debug)]
pub struct Keyer {
    scheme: KeyScheme,
    root: u64,
    /// Tokens per block of the requests the router keys (the workers' block size).
    pub block_size: usize,
}

impl Keyer {
    pub fn new(scheme: KeyScheme, seed: &str, block_size: usize) -> Self {
        let mut enc = Vec::new();
        cbor::text(&mut enc, seed);
        let root = Self::digest(scheme, &enc);
        Self {
            scheme,
            root,
            block_size: block_size.max(1),
        }
    }

    fn digest(scheme: KeyScheme, bytes: &[u8]) -> u64 {
        match scheme {
            KeyScheme::Fnv64a => fnv64a(bytes),
            KeyScheme::Sha256 => {
                let d = Sha256::digest(bytes);
                let mut b = [0u8; 8];
                b.copy_from_slice(&d[24..]);
                u64::from_be_bytes(b)
            }
        }
    }

    /// The key of a block of `tokens` after `parent` (None: the first block).
    pub fn key(&self, parent: Option<u64>, tokens: &[u32]) -> u64 {
        self.key_with(parent, tokens, &[])
    }

    /// [`Self::key`] of a block hashed with extra keys (a first block's cache salt): the
    /// CBOR's third element is then the array of their text strings instead of null.
    pub fn key_with(&self, parent: Option<u64>, tokens: &[u32], extra: &[String]) -> u64 {
        let mut enc = Vec::with_capacity(12 + tokens.len() * 5);
        cbor::array_header(&mut enc, 3);
        cbor::uint(&mut enc, parent.unwrap_or(self.root));
        cbor::array_header(&mut enc, tokens.len() as u64);
        for &t in tokens {
            cbor::uint(&mut enc, t as u64);
        }
        if extra.is_empty() {
            cbor::null(&mut enc);
        } else {
            cbor::array_header(&mut enc, extra.len() as u64);
            for e in extra {
                cbor::text(&mut enc, e);
            }
        }
        Self::digest(self.scheme, &enc)
    }

    /// Keys of every full block of `tokens`.
    pub fn keys(&self, tokens: &[u32]) -> Vec<u64> {
        self.keys_salted(tokens, &[])
    }

    /// Keys of every full block of `tokens` for a request with extra keys `extra` (its
    /// `cache_salt`), mixed into the first block as the workers hash it.
    pub fn keys_salted(&self, tokens: &[u32], extra: &[String]) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::with_capacity(tokens.len() / self.block_size);
        for (i, chunk) in tokens.chunks_exact(self.block_size).enumerate() {
            out.push(self.key_with(out.last().copied(), chunk, block_extra(i, extra)));
        }
        out
    }
}

/// The tiers a worker holds a block in, as bits: GPU 1, CPU 2, DISK 4.
fn bit(m: Medium) -> u8 {
    match m {
        Medium::Gpu => 1,
        Medium::Cpu => 2,
        Medium::Disk => 4,
    }
}

/// What a cached block is worth by the fastest tier holding it (device > host > disk).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TierWeights {
    pub gpu: f64,
    pub cpu: f64,
    pub disk: f64,
}

impl Default for TierWeights {
    fn default() -> Self {
        Self {
            gpu: 1.0,
            cpu: 0.8,
            disk: 0.5,
        }
    }
}

impl TierWeights {
    fn of(&self, media: u8) -> f64 {
        if media & 1 != 0 {
            self.gpu
        } else if media & 2 != 0 {
            self.cpu
        } else if media & 4 != 0 {
            self.disk
        } else {
            0.0
        }
    }
}

/// One block a worker holds, under the router's key.
struct Block {
    /// Tiers holding it.
    media: u8,
    /// The worker's hash of it (events name blocks by it)…
    hash: u64,
    /// …and any other hash the worker published for the same key (rare: no allocation when
    /// there is none).
    aliases: Vec<u64>,
}

impl Block {
    fn hashes(&self) -> impl Iterator<Item = u64> + '_ {
        std::iter::once(self.hash).chain(self.aliases.iter().copied())
    }
}

/// What one worker holds. `blocks` is kept in least-recently-used order (stored, or part of a
/// prompt sent there: [`PrefixIndex::expect`]); `keys` has exactly the hashes of `blocks`, so both are bounded by
/// [`IndexLimits::max_blocks_per_worker`].
struct WorkerBlocks {
    /// The worker's own block hash → the router's key.
    keys: HashMap<u64, u64>,
    /// Key → the block.
    blocks: LruCache<u64, Block>,
    /// Keys of prompts the router sent here whose blocks no event has confirmed yet (their
    /// prefill may still be running), until when they count; oldest first.
    pending: LruCache<u64, std::time::Instant>,
    /// This worker's number in [`Holders`].
    slot: u32,
}

impl WorkerBlocks {
    fn new(slot: u32) -> Self {
        Self {
            keys: HashMap::new(),
            // Bounded by hand, so that an evicted block's hashes leave `keys` with it.
            blocks: LruCache::unbounded(),
            pending: LruCache::unbounded(),
            slot,
        }
    }

    /// Forgets the block of `key` and its hashes.
    fn forget(&mut self, key: u64, stored: &mut Holders<u8>) {
        if let Some(b) = self.blocks.pop(&key) {
            stored.remove(key, self.slot);
            for h in b.hashes() {
                if self.keys.get(&h) == Some(&key) {
                    self.keys.remove(&h);
                }
            }
        }
    }

    /// Evicts least recently used blocks down to `cap`; how many went.
    fn evict_to(&mut self, cap: usize, stored: &mut Holders<u8>) -> u64 {
        let mut n = 0;
        while self.blocks.len() > cap {
            let Some((&key, _)) = self.blocks.peek_lru() else {
                break;
            };
            self.forget(key, stored);
            n += 1;
        }
        n
    }

    /// Drops the oldest pending key.
    fn pop_pending(&mut self, pending: &mut Holders<()>) -> bool {
        match self.pending.pop_lru() {
            Some((k, _)) => {
                pending.remove(k, self.slot);
                true
            }
            None => false,
        }
    }
}

/// Per key, the workers (by slot) whose [`WorkerBlocks`] have it, each with a value (the tiers
/// holding the block; nothing for a pending key): one probe finds every worker holding a block
/// and in which tiers, where asking each worker is one probe per worker and block. Kept exactly
/// in step with the workers' own maps (every insertion, change and removal goes through both).
struct Holders<V>(HashMap<u64, SmallVec<[(u32, V); 2]>, lru::DefaultHasher>);

impl<V: Copy> Default for Holders<V> {
    fn default() -> Self {
        Self(HashMap::default())
    }
}

impl<V: Copy> Holders<V> {
    /// Records that `slot` holds `key` with `value` (replacing what it had).
    fn set(&mut self, key: u64, slot: u32, value: V) {
        let v = self.0.entry(key).or_default();
        match v.iter_mut().find(|(s, _)| *s == slot) {
            Some(e) => e.1 = value,
            None => v.push((slot, value)),
        }
    }

    fn remove(&mut self, key: u64, slot: u32) {
        if let std::collections::hash_map::Entry::Occupied(mut e) = self.0.entry(key) {
            e.get_mut().retain(|(s, _)| *s != slot);
            if e.get().is_empty() {
                e.remove();
            }
        }
    }

    fn get(&self, key: &u64) -> &[(u32, V)] {
        self.0.get(key).map_or(&[], |v| v.as_slice())
    }
}

/// How much the index may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexLimits {
    /// Blocks indexed per worker (`--max-index-blocks-per-worker`); past it the least recently
    /// used go.
    pub max_blocks_per_worker: usize,
    /// Pending keys ([`PrefixIndex::expect`]) per worker; past it the oldest go.
    pub max_pending_per_worker: usize,
    /// Pending keys over all workers; past it the oldest of the worker with the most go.
    pub max_pending_total: usize,
}

/// Default of `--max-index-blocks-per-worker`.
pub const DEFAULT_MAX_INDEX_BLOCKS_PER_WORKER: usize = 1_000_000;

impl Default for IndexLimits {
    fn default() -> Self {
        Self {
            max_blocks_per_worker: DEFAULT_MAX_INDEX_BLOCKS_PER_WORKER,
            max_pending_per_worker: 1 << 16,
            max_pending_total: 1 << 20,
        }
    }
}

/// A worker's cached prefix of a request.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PrefixMatch {
    /// Leading blocks the worker holds in any tier.
    pub blocks: usize,
    /// Those blocks weighted by their fastest tier.
    pub weighted: f64,
}

/// The index: per worker, the blocks it holds.
pub struct PrefixIndex {
    keyer: Keyer,
    limits: IndexLimits,
    workers: HashMap<String, WorkerBlocks>,
    /// Which workers hold each key (their `blocks`) and which expect it (their `pending`).
    stored: Holders<u8>,
    pending: Holders<()>,
    /// The next worker's slot, and the slots of workers dropped (taken first: slots stay
    /// below the most workers ever indexed at once).
    next_slot: u32,
    free_slots: Vec<u32>,
    /// `BlockStored` blocks whose parent the router had never seen (events missed): skipped.
    pub orphans: u64,
    /// Events whose block size is not the router's.
    pub foreign_block_size: u64,
    /// Blocks dropped because their worker's share of the index was full.
    pub evicted: u64,
}

impl PrefixIndex {
    pub fn new(keyer: Keyer) -> Self {
        Self::with_limits(keyer, IndexLimits::default())
    }

    pub fn with_limits(keyer: Keyer, limits: IndexLimits) -> Self {
        Self {
            keyer,
            limits: IndexLimits {
                max_blocks_per_worker: limits.max_blocks_per_worker.max(1),
                ..limits
            },
            workers: HashMap::new(),
            stored: Holders::default(),
            pending: Holders::default(),
            next_slot: 0,
            free_slots: Vec::new(),
            orphans: 0,
            foreign_block_size: 0,
            evicted: 0,
        }
    }

    pub fn keyer(&self) -> &Keyer {
        &self.keyer
    }

    /// Applies what `worker`'s KV event stream says: a batch of events, or a restart.
    pub fn update(&mut self, worker: &str, u: &super::events::Update) {
        match u {
            super::events::Update::Events(events) => self.apply(worker, events),
            super::events::Update::Reset => self.drop_worker(worker),
        }
    }

    /// Applies one batch of `worker`'s events.
    pub fn apply(&mut self, worker: &str, events: &[KvEvent]) {
        let bs = self.keyer.block_size;
        let cap = self.limits.max_blocks_per_worker;
        for e in events {
            match e {
                KvEvent::BlockStored {
                    block_hashes,
                    parent_block_hash,
                    token_ids,
                    block_size,
                    medium,
                    extra_keys,
                } => {
                    if *block_size != bs {
                        self.foreign_block_size += 1;
                        continue;
                    }
                    let w = Self::worker_entry(
                        &mut self.workers,
                        (&mut self.next_slot, &mut self.free_slots),
                        worker,
                    );
                    let mut parent = match parent_block_hash {
                        None => None,
                        Some(p) => match w.keys.get(p) {
                            Some(k) => Some(*k),
                            None => {
                                self.orphans += block_hashes.len() as u64;
                                continue;
                            }
                        },
                    };
                    for (i, (h, chunk)) in block_hashes
                        .iter()
                        .zip(token_ids.chunks_exact(bs))
                        .enumerate()
                    {
                        let extra = extra_keys.get(i).map_or(&[][..], Vec::as_slice);
                        let key = self.keyer.key_with(parent, chunk, extra);
                        if w.pending.pop(&key).is_some() {
                            self.pending.remove(key, w.slot);
                        }
                        w.keys.insert(*h, key);
                        let b = w.blocks.get_or_insert_mut(key, || Block {
                            media: 0,
                            hash: *h,
                            aliases: Vec::new(),
                        });
                        if b.hash != *h && !b.aliases.contains(h) {
                            b.aliases.push(*h);
                        }
                        b.media |= bit(*medium);
                        self.stored.set(key, w.slot, b.media);
                        parent = Some(key);
                        self.evicted += w.evict_to(cap, &mut self.stored);
                    }
                }
                KvEvent::BlockRemoved {
                    block_hashes,
                    medium,
                } => {
                    let Some(w) = self.workers.get_mut(worker) else {
                        continue;
                    };
                    for h in block_hashes {
                        let Some(&key) = w.keys.get(h) else { continue };
                        let gone = match w.blocks.peek_mut(&key) {
                            Some(b) => {
                                b.media &= !bit(*medium);
                                self.stored.set(key, w.slot, b.media);
                                b.media == 0
                            }
                            None => true,
                        };
                        if gone {
                            w.keys.remove(h);
                            w.forget(key, &mut self.stored);
                        }
                    }
                }
                KvEvent::AllBlocksCleared => self.drop_worker(worker),
            }
        }
    }

    /// Records that a prompt of `keys` was sent to `worker`: the blocks it holds of it count
    /// as used (least recently used order), and until an event confirms (or `ttl` passes)
    /// the others count as held there, so the prompts that follow it while it is still being
    /// prefilled go to the same worker. Pending keys are capped per worker and in all
    /// ([`IndexLimits`]): the oldest go first.
    pub fn expect(&mut self, worker: &str, keys: &[u64], ttl: std::time::Duration) {
        let now = std::time::Instant::now();
        let until = now + ttl;
        let per_worker = self.limits.max_pending_per_worker;
        let w = Self::worker_entry(
            &mut self.workers,
            (&mut self.next_slot, &mut self.free_slots),
            worker,
        );
        for k in keys {
            // `get` moves a held block to the most recently used end.
            if w.blocks.get(k).is_none() {
                w.pending.put(*k, until);
                self.pending.set(*k, w.slot, ());
            }
        }
        // One TTL for all: the least recently put are the first to expire.
        while w.pending.peek_lru().is_some_and(|(_, t)| *t <= now) {
            w.pop_pending(&mut self.pending);
        }
        while w.pending.len() > per_worker {
            w.pop_pending(&mut self.pending);
        }
        let total: usize = self.workers.values().map(|w| w.pending.len()).sum();
        let mut excess = total.saturating_sub(self.limits.max_pending_total);
        while excess > 0 {
            let Some(largest) = self.workers.values_mut().max_by_key(|w| w.pending.len()) else {
                break;
            };
            let n = excess.min(largest.pending.len());
            for _ in 0..n {
                largest.pop_pending(&mut self.pending);
            }
            excess -= n;
        }
    }

    /// Takes back what [`Self::expect`] said `worker` would cache for `keys` (the request was
    /// served elsewhere); blocks its events confirmed stay.
    pub fn unexpect(&mut self, worker: &str, keys: &[u64]) {
        if let Some(w) = self.workers.get_mut(worker) {
            for k in keys {
                if w.pending.pop(k).is_some() {
                    self.pending.remove(*k, w.slot);
                }
            }
        }
    }

    /// Forgets everything `worker` held (it vanished, or restarted).
    pub fn drop_worker(&mut self, worker: &str) {
        if let Some(w) = self.workers.remove(worker) {
            for (k, _) in w.blocks.iter() {
                self.stored.remove(*k, w.slot);
            }
            for (k, _) in w.pending.iter() {
                self.pending.remove(*k, w.slot);
            }
            self.free_slots.push(w.slot);
        }
    }

    /// `worker`'s blocks, made (with the next slot) when it has none.
    fn worker_entry<'a>(
        workers: &'a mut HashMap<String, WorkerBlocks>,
        slots: (&mut u32, &mut Vec<u32>),
        worker: &str,
    ) -> &'a mut WorkerBlocks {
        if !workers.contains_key(worker) {
            let (next, free) = slots;
            let slot = free.pop().unwrap_or_else(|| {
                *next += 1;
                *next - 1
            });
            workers.insert(worker.to_string(), WorkerBlocks::new(slot));
        }
        workers.get_mut(worker).expect("just made")
    }

    /// Blocks indexed for `worker`.
    pub fn num_blocks(&self, worker: &str) -> usize {
        self.workers.get(worker).map_or(0, |w| w.blocks.len())
    }

    /// Pending keys ([`Self::expect`]) held for `worker`, expired or not.
    pub fn num_pending(&self, worker: &str) -> usize {
        self.workers.get(worker).map_or(0, |w| w.pending.len())
    }

    /// The leading run of `keys` that one worker holds, read from that worker's own maps
    /// (the router asks [`Self::prefix_all`], which the tests hold to this).
    pub fn prefix(&self, worker: &str, keys: &[u64], weights: &TierWeights) -> PrefixMatch {
        let Some(w) = self.workers.get(worker) else {
            return PrefixMatch::default();
        };
        let now = std::time::Instant::now();
        let mut m = PrefixMatch::default();
        for k in keys {
            match w.blocks.peek(k) {
                Some(b) if b.media != 0 => {
                    m.blocks += 1;
                    m.weighted += weights.of(b.media);
                }
                _ if w.pending.peek(k).is_some_and(|t| *t > now) => {
                    // On its way into the device.
                    m.blocks += 1;
                    m.weighted += weights.gpu;
                }
                _ => break,
            }
        }
        m
    }

    /// The leading run of `keys` that each worker in `workers` holds (blocks in any tier, or
    /// keys still pending there): one probe of each key's holders per prompt block, and a look
    /// at the workers that hold it (or expect it) only, instead of one probe per worker and
    /// block. Read-only: a router asks every worker, and only the one the prompt is sent to
    /// uses its blocks ([`Self::expect`] marks them), so a prefix every worker holds is not
    /// reordered in every worker's LRU list.
    pub fn prefix_all(
        &self,
        workers: &[&str],
        keys: &[u64],
        weights: &TierWeights,
    ) -> Vec<PrefixMatch> {
        let now = std::time::Instant::now();
        let mut out = vec![PrefixMatch::default(); workers.len()];
        // Each known worker's slot → its place in `workers`. A worker's run of blocks goes on
        // at the `j`th key while it has matched all `j` before it (`blocks == j`).
        let mut place: Vec<Option<(usize, &WorkerBlocks)>> = vec![None; self.next_slot as usize];
        for (i, n) in workers.iter().enumerate() {
            if let Some(w) = self.workers.get(*n) {
                place[w.slot as usize] = Some((i, w));
            }
        }
        // Workers whose run goes on.
        let mut alive = place.iter().flatten().count();
        for (j, k) in keys.iter().enumerate() {
            let mut going = 0;
            for &(slot, media) in self.stored.get(k) {
                if let Some((i, _)) = place[slot as usize] {
                    if out[i].blocks == j && media != 0 {
                        out[i].blocks += 1;
                        out[i].weighted += weights.of(media);
                        going += 1;
                    }
                }
            }
            // The pending keys matter only to a worker not holding this block.
            if going < alive {
                for &(slot, ()) in self.pending.get(k) {
                    if let Some((i, w)) = place[slot as usize] {
                        if out[i].blocks == j && w.pending.peek(k).is_some_and(|t| *t > now) {
                            // On its way into the device.
                            out[i].blocks += 1;
                            out[i].weighted += weights.gpu;
                            going += 1;
                        }
                    }
                }
            }
            if going == 0 {
                break;
            }
            alive = going;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(hashes: &[u64], parent: Option<u64>, tokens: &[u32], medium: Medium) -> KvEvent {
        KvEvent::BlockStored {
            block_hashes: hashes.to_vec(),
            parent_block_hash: parent,
            token_ids: tokens.to_vec(),
            block_size: 4,
            medium,
            extra_keys: vec![Vec::new(); hashes.len()],
        }
    }

    #[test]
    fn a_cache_salt_keys_the_first_block_and_salted_events_map_to_salted_keys() {
        let k = Keyer::new(KeyScheme::Fnv64a, "0", 4);
        // [1, [2, 3], ["t"]] is 83 01 82 02 03 81 61 74: the keys where null was.
        assert_eq!(
            k.key_with(Some(1), &[2, 3], &["t".to_string()]),
            fnv64a(&[0x83, 0x01, 0x82, 0x02, 0x03, 0x81, 0x61, 0x74])
        );
        let tokens = [1u32, 2, 3, 4, 5, 6, 7, 8];
        let salt = ["tenant-a".to_string()];
        let salted = k.keys_salted(&tokens, &salt);
        assert_eq!(salted[1], k.key(Some(salted[0]), &tokens[4..]));
        assert_ne!(salted, k.keys(&tokens));
        // A worker's salted blocks (the salt on the first only) are found by salted keys.
        let mut ix = PrefixIndex::new(k.clone());
        let mut e = stored(&[11, 12], None, &tokens, Medium::Gpu);
        if let KvEvent::BlockStored { extra_keys, .. } = &mut e {
            extra_keys[0] = salt.to_vec();
        }
        ix.apply("w", &[e]);
        let w = TierWeights::default();
        assert_eq!(ix.prefix("w", &salted, &w).blocks, 2);
        assert_eq!(ix.prefix("w", &k.keys(&tokens), &w).blocks, 0);
        let other = k.keys_salted(&tokens, &["tenant-b".to_string()]);
        assert_eq!(ix.prefix("w", &other, &w).blocks, 0);
    }

    #[test]
    fn fnv64a_and_the_cbor_payload_are_the_published_ones() {
        // FNV-1a 64 test vectors (Fowler/Noll/Vo).
        assert_eq!(fnv64a(b""), 0xcbf29ce484222325);
        assert_eq!(fnv64a(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv64a(b"foobar"), 0x85944171f73967e8);
        // The key hashes CBOR [parent, [tokens], null]: [1, [2, 3], null] is 83 01 82 02 03 f6.
        let k = Keyer::new(KeyScheme::Fnv64a, "", 2);
        assert_eq!(
            k.key(Some(1), &[2, 3]),
            fnv64a(&[0x83, 0x01, 0x82, 0x02, 0x03, 0xf6])
        );
        // The root is the hash of the seed as a CBOR text string ("" is 0x60).
        assert_eq!(k.key(None, &[2, 3]), k.key(Some(fnv64a(&[0x60])), &[2, 3]));
        let s = Keyer::new(KeyScheme::Sha256, "", 2);
        let d = Sha256::digest([0x83, 0x01, 0x82, 0x02, 0x03, 0xf6]);
        assert_eq!(
            s.key(Some(1), &[2, 3]),
            u64::from_be_bytes(d[24..].try_into().unwrap())
        );
    }

    #[test]
    fn keys_chain_and_depend_on_the_seed() {
        let a = Keyer::new(KeyScheme::Fnv64a, "0", 4);
        let keys = a.keys(&[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(keys.len(), 2, "the partial block is not keyed");
        assert_eq!(keys[1], a.key(Some(keys[0]), &[5, 6, 7, 8]));
        let b = Keyer::new(KeyScheme::Fnv64a, "1", 4);
        assert_ne!(b.keys(&[1, 2, 3, 4]), a.keys(&[1, 2, 3, 4]));
    }

    #[test]
    fn events_map_worker_hashes_to_keys_across_batches_and_tiers() {
        let k = Keyer::new(KeyScheme::Fnv64a, "", 4);
        let mut ix = PrefixIndex::new(k.clone());
        let tokens: Vec<u32> = (0..16).collect();
        let keys = k.keys(&tokens);
        let w = TierWeights::default();
        // Worker hashes are opaque numbers; blocks arrive in two batches chained by parent.
        ix.apply("a", &[stored(&[100, 101], None, &tokens[..8], Medium::Gpu)]);
        ix.apply(
            "a",
            &[stored(&[102, 103], Some(101), &tokens[8..], Medium::Gpu)],
        );
        assert_eq!(ix.prefix("a", &keys, &w).blocks, 4);
        assert_eq!(ix.prefix("b", &keys, &w).blocks, 0);
        // Offloaded to the host, then dropped from the device: still held, worth less.
        ix.apply(
            "a",
            &[
                stored(&[102, 103], Some(101), &tokens[8..], Medium::Cpu),
                KvEvent::BlockRemoved {
                    block_hashes: vec![102, 103],
                    medium: Medium::Gpu,
                },
            ],
        );
        let m = ix.prefix("a", &keys, &w);
        assert_eq!(m.blocks, 4);
        assert!((m.weighted - (2.0 + 2.0 * 0.8)).abs() < 1e-9, "{m:?}");
        // Gone from the host too: the run stops at block 2.
        ix.apply(
            "a",
            &[KvEvent::BlockRemoved {
                block_hashes: vec![102],
                medium: Medium::Cpu,
            }],
        );
        assert_eq!(ix.prefix("a", &keys, &w).blocks, 2);
        // A block whose parent was never seen cannot be keyed: skipped, counted.
        ix.apply("b", &[stored(&[7], Some(6), &tokens[4..8], Medium::Gpu)]);
        assert_eq!(ix.orphans, 1);
        assert_eq!(ix.num_blocks("b"), 0);
        ix.apply("a", &[KvEvent::AllBlocksCleared]);
        assert_eq!(ix.prefix("a", &keys, &w).blocks, 0);
    }

    #[test]
    fn prompts_sent_to_a_worker_count_as_held_until_confirmed_or_expired() {
        let k = Keyer::new(KeyScheme::Fnv64a, "", 4);
        let mut ix = PrefixIndex::new(k.clone());
        let tokens: Vec<u32> = (0..12).collect();
        let keys = k.keys(&tokens);
        let w = TierWeights::default();
        ix.expect("a", &keys, std::time::Duration::from_secs(30));
        assert_eq!(ix.prefix("a", &keys, &w).blocks, 3);
        // Confirmed by the worker's event, then evicted: gone, not pending any more.
        ix.apply("a", &[stored(&[1, 2, 3], None, &tokens, Medium::Gpu)]);
        ix.apply(
            "a",
            &[KvEvent::BlockRemoved {
                block_hashes: vec![1, 2, 3],
                medium: Medium::Gpu,
            }],
        );
        assert_eq!(ix.prefix("a", &keys, &w).blocks, 0);
        ix.expect("b", &keys, std::time::Duration::ZERO);
        assert_eq!(ix.prefix("b", &keys, &w).blocks, 0, "expired");
    }

    #[test]
    fn a_full_worker_share_evicts_the_least_recently_used_blocks() {
        let k = Keyer::new(KeyScheme::Fnv64a, "", 4);
        let limits = IndexLimits {
            max_blocks_per_worker: 4,
            ..IndexLimits::default()
        };
        let mut ix = PrefixIndex::with_limits(k.clone(), limits);
        let w = TierWeights::default();
        // Six one-block prompts, each stored by its own event: the two oldest go.
        let prompts: Vec<Vec<u32>> = (0..6u32).map(|i| vec![i * 10; 4]).collect();
        for (i, p) in prompts.iter().enumerate() {
            ix.apply("a", &[stored(&[100 + i as u64], None, p, Medium::Gpu)]);
            assert!(ix.num_blocks("a") <= 4, "over the cap after {i}");
        }
        assert_eq!(ix.num_blocks("a"), 4);
        assert_eq!(ix.evicted, 2);
        let held = |ix: &mut PrefixIndex, i: usize| ix.prefix("a", &k.keys(&prompts[i]), &w).blocks;
        assert_eq!(
            (held(&mut ix, 0), held(&mut ix, 1)),
            (0, 0),
            "the oldest went"
        );
        // A lookup is not a use (every worker is asked), a prompt sent there is: after
        // prompt 2 is sent to "a", storing one more evicts prompt 3, the least recently used.
        assert_eq!(held(&mut ix, 2), 1);
        assert_eq!(held(&mut ix, 3), 1);
        ix.expect(
            "a",
            &k.keys(&prompts[2]),
            std::time::Duration::from_secs(30),
        );
        assert_eq!(ix.num_pending("a"), 0, "held blocks are not pending");
        ix.apply("a", &[stored(&[200], None, &[7; 4], Medium::Gpu)]);
        assert_eq!(ix.num_blocks("a"), 4);
        assert_eq!((held(&mut ix, 2), held(&mut ix, 3)), (1, 0));
        // Looked up without being sent: prompt 4 stays the least recently used and goes next.
        assert_eq!(held(&mut ix, 4), 1);
        ix.apply("a", &[stored(&[201], None, &[8; 4], Medium::Gpu)]);
        assert_eq!(held(&mut ix, 4), 0);
        // An evicted block's hash is forgotten with it: its removal and its children are no-ops
        // (the child is an orphan), nothing grows past the cap.
        ix.apply(
            "a",
            &[
                KvEvent::BlockRemoved {
                    block_hashes: vec![100, 103],
                    medium: Medium::Gpu,
                },
                stored(&[300], Some(103), &[1; 4], Medium::Gpu),
            ],
        );
        assert_eq!(ix.orphans, 1);
        assert_eq!(ix.num_blocks("a"), 4);
        // A long chain in one event: the count stays at the cap, the newest blocks are kept.
        let long: Vec<u32> = (0..40).collect();
        let hashes: Vec<u64> = (1000..1010).collect();
        ix.apply("a", &[stored(&hashes, None, &long, Medium::Gpu)]);
        assert_eq!(ix.num_blocks("a"), 4);
        let keys = k.keys(&long);
        assert_eq!(ix.prefix("a", &keys, &w).blocks, 0, "the chain's head went");
        assert_eq!(ix.prefix("a", &keys[6..], &w).blocks, 4);
        assert_eq!(
            ix.workers["a"].keys.len(),
            4,
            "hashes leave with their blocks"
        );
    }

    #[test]
    fn pending_keys_are_capped_per_worker_and_in_all() {
        let k = Keyer::new(KeyScheme::Fnv64a, "", 4);
        let limits = IndexLimits {
            max_blocks_per_worker: 100,
            max_pending_per_worker: 8,
            max_pending_total: 12,
        };
        let mut ix = PrefixIndex::with_limits(k.clone(), limits);
        let w = TierWeights::default();
        let ttl = std::time::Duration::from_secs(30);
        let first: Vec<u32> = (0..16).collect();
        ix.expect("a", &k.keys(&first), ttl);
        let second: Vec<u32> = (100..124).collect();
        ix.expect("a", &k.keys(&second), ttl);
        assert_eq!(ix.num_pending("a"), 8, "the per-worker cap");
        assert_eq!(
            ix.prefix("a", &k.keys(&first), &w).blocks,
            0,
            "the oldest went"
        );
        assert_eq!(ix.prefix("a", &k.keys(&second), &w).blocks, 6);
        let third: Vec<u32> = (200..224).collect();
        ix.expect("b", &k.keys(&third), ttl);
        assert_eq!(ix.num_pending("b"), 6);
        assert_eq!(
            ix.num_pending("a") + ix.num_pending("b"),
            12,
            "the total cap"
        );
        assert_eq!(
            ix.num_pending("a"),
            6,
            "taken from the worker with the most"
        );
        assert_eq!(ix.prefix("b", &k.keys(&third), &w).blocks, 6);
    }

    #[test]
    fn workers_with_different_hash_schemes_share_keys() {
        // Two workers publish different hashes for the same tokens: the router keys agree.
        let k = Keyer::new(KeyScheme::Fnv64a, "", 4);
        let mut ix = PrefixIndex::new(k.clone());
        let tokens: Vec<u32> = (10..18).collect();
        ix.apply("llmd", &[stored(&[1, 2], None, &tokens, Medium::Gpu)]);
        ix.apply(
            "vllm",
            &[stored(&[0xdead, 0xbeef], None, &tokens, Medium::Gpu)],
        );
        let keys = k.keys(&tokens);
        let w = TierWeights::default();
        assert_eq!(ix.prefix("llmd", &keys, &w).blocks, 2);
        assert_eq!(ix.prefix("vllm", &keys, &w).blocks, 2);
    }

    /// The holders maps say exactly what the workers' own maps say.
    fn assert_holders_in_step(ix: &PrefixIndex) {
        let mut stored: HashMap<u64, Vec<(u32, u8)>> = HashMap::new();
        let mut pending: HashMap<u64, Vec<(u32, ())>> = HashMap::new();
        for w in ix.workers.values() {
            for (k, b) in w.blocks.iter() {
                stored.entry(*k).or_default().push((w.slot, b.media));
            }
            for (k, _) in w.pending.iter() {
                pending.entry(*k).or_default().push((w.slot, ()));
            }
        }
        fn same<V: Copy + Ord + std::fmt::Debug>(
            mine: &Holders<V>,
            theirs: HashMap<u64, Vec<(u32, V)>>,
        ) {
            assert_eq!(mine.0.len(), theirs.len());
            for (k, mut held) in theirs {
                let mut said = mine.get(&k).to_vec();
                said.sort_unstable();
                held.sort_unstable();
                assert_eq!(said, held, "key {k:x}");
            }
        }
        same(&ix.stored, stored);
        same(&ix.pending, pending);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Whatever the workers store, evict, remove, clear and whatever the router expects and
        /// takes back, every worker's match from `prefix_all` is its `prefix`, and the holders
        /// stay in step with the workers' maps.
        #[test]
        fn prefix_all_is_every_workers_prefix(
            ops in proptest::collection::vec((0u8..6, 0usize..3, 0usize..6, 1usize..5), 1..60),
        ) {
            let k = Keyer::new(KeyScheme::Fnv64a, "0", 2);
            let limits = IndexLimits {
                max_blocks_per_worker: 6,
                max_pending_per_worker: 4,
                max_pending_total: 7,
            };
            let mut ix = PrefixIndex::with_limits(k.clone(), limits);
            let names = ["a", "b", "c"];
            // Prompts sharing prefixes: prompt p is the first `len` blocks of one of two chains.
            let tokens = |p: usize, len: usize| -> Vec<u32> {
                (0..2 * len).map(|t| (p % 2 * 100 + t) as u32).collect()
            };
            let w = TierWeights::default();
            let ttl = std::time::Duration::from_secs(60);
            for (op, who, p, len) in ops {
                let name = names[who];
                let t = tokens(p, len);
                let keys = k.keys(&t);
                // A worker's own hashes for the prompt's blocks (any numbers, chained).
                let hashes: Vec<u64> = keys.iter().map(|x| x ^ (who as u64 + 1)).collect();
                match op {
                    0 => ix.apply(name, &[KvEvent::BlockStored {
                        block_hashes: hashes,
                        parent_block_hash: None,
                        token_ids: t,
                        block_size: 2,
                        medium: if p % 3 == 0 { Medium::Cpu } else { Medium::Gpu },
                        extra_keys: vec![Vec::new(); keys.len()],
                    }]),
                    1 => ix.apply(name, &[KvEvent::BlockRemoved {
                        block_hashes: hashes[len / 2..].to_vec(),
                        medium: Medium::Gpu,
                    }]),
                    2 => ix.expect(name, &keys, ttl),
                    3 => ix.unexpect(name, &keys[..len.div_ceil(2)]),
                    4 => ix.apply(name, &[KvEvent::AllBlocksCleared]),
                    _ => ix.drop_worker(name),
                }
                assert_holders_in_step(&ix);
                for q in 0..4 {
                    let keys = k.keys(&tokens(q, 5));
                    let all = ix.prefix_all(&names, &keys, &w);
                    for (n, m) in names.iter().zip(&all) {
                        proptest::prop_assert_eq!(*m, ix.prefix(n, &keys, &w));
                    }
                }
            }
        }
    }
}
