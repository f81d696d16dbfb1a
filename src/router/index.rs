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
use crate::kv::block_hash::cbor;
use crate::kv::{KvEvent, Medium};
use sha2::{Digest, Sha256};
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
        let mut enc = Vec::with_capacity(12 + tokens.len() * 5);
        cbor::array_header(&mut enc, 3);
        cbor::uint(&mut enc, parent.unwrap_or(self.root));
        cbor::array_header(&mut enc, tokens.len() as u64);
        for &t in tokens {
            cbor::uint(&mut enc, t as u64);
        }
        cbor::null(&mut enc);
        Self::digest(self.scheme, &enc)
    }

    /// Keys of every full block of `tokens`.
    pub fn keys(&self, tokens: &[u32]) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::with_capacity(tokens.len() / self.block_size);
        for chunk in tokens.chunks_exact(self.block_size) {
            out.push(self.key(out.last().copied(), chunk));
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

#[derive(Default)]
struct WorkerBlocks {
    /// The worker's own block hash → the router's key.
    keys: HashMap<u64, u64>,
    /// Key → tiers holding it.
    media: HashMap<u64, u8>,
    /// Keys of prompts the router sent here whose blocks no event has confirmed yet (their
    /// prefill may still be running), until when they count.
    pending: HashMap<u64, std::time::Instant>,
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
    workers: HashMap<String, WorkerBlocks>,
    /// `BlockStored` blocks whose parent the router had never seen (events missed): skipped.
    pub orphans: u64,
    /// Events whose block size is not the router's.
    pub foreign_block_size: u64,
}

impl PrefixIndex {
    pub fn new(keyer: Keyer) -> Self {
        Self {
            keyer,
            workers: HashMap::new(),
            orphans: 0,
            foreign_block_size: 0,
        }
    }

    pub fn keyer(&self) -> &Keyer {
        &self.keyer
    }

    /// Applies one batch of `worker`'s events.
    pub fn apply(&mut self, worker: &str, events: &[KvEvent]) {
        let bs = self.keyer.block_size;
        for e in events {
            match e {
                KvEvent::BlockStored {
                    block_hashes,
                    parent_block_hash,
                    token_ids,
                    block_size,
                    medium,
                } => {
                    if *block_size != bs {
                        self.foreign_block_size += 1;
                        continue;
                    }
                    let w = self.workers.entry(worker.to_string()).or_default();
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
                    for (h, chunk) in block_hashes.iter().zip(token_ids.chunks_exact(bs)) {
                        let key = self.keyer.key(parent, chunk);
                        w.pending.remove(&key);
                        w.keys.insert(*h, key);
                        *w.media.entry(key).or_default() |= bit(*medium);
                        parent = Some(key);
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
                        let gone = match w.media.get_mut(&key) {
                            Some(m) => {
                                *m &= !bit(*medium);
                                *m == 0
                            }
                            None => true,
                        };
                        if gone {
                            w.media.remove(&key);
                            w.keys.remove(h);
                        }
                    }
                }
                KvEvent::AllBlocksCleared => {
                    self.workers.remove(worker);
                }
            }
        }
    }

    /// Records that a prompt of `keys` was sent to `worker`: until an event confirms (or
    /// `ttl` passes), its blocks count as held there, so the prompts that follow it while it
    /// is still being prefilled go to the same worker.
    pub fn expect(&mut self, worker: &str, keys: &[u64], ttl: std::time::Duration) {
        let until = std::time::Instant::now() + ttl;
        let w = self.workers.entry(worker.to_string()).or_default();
        for k in keys {
            if !w.media.contains_key(k) {
                w.pending.insert(*k, until);
            }
        }
        if w.pending.len() > 1 << 16 {
            let now = std::time::Instant::now();
            w.pending.retain(|_, t| *t > now);
        }
    }

    /// Forgets everything `worker` held (it vanished, or restarted).
    pub fn drop_worker(&mut self, worker: &str) {
        self.workers.remove(worker);
    }

    /// Blocks indexed for `worker`.
    pub fn num_blocks(&self, worker: &str) -> usize {
        self.workers.get(worker).map_or(0, |w| w.media.len())
    }

    /// The leading run of `keys` that `worker` holds.
    pub fn prefix(&self, worker: &str, keys: &[u64], weights: &TierWeights) -> PrefixMatch {
        let Some(w) = self.workers.get(worker) else {
            return PrefixMatch::default();
        };
        let now = std::time::Instant::now();
        let mut m = PrefixMatch::default();
        for k in keys {
            match w.media.get(k) {
                Some(&media) if media != 0 => {
                    m.blocks += 1;
                    m.weighted += weights.of(media);
                }
                _ if w.pending.get(k).is_some_and(|t| *t > now) => {
                    // On its way into the device.
                    m.blocks += 1;
                    m.weighted += weights.gpu;
                }
                _ => break,
            }
        }
        m
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
        }
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
}
