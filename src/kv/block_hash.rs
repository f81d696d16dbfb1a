//! Prefix-cache block hashes: a chain over full blocks of token ids.
//!
//! Block `i` of a sequence hashes `(hash of block i-1, its block_size token ids, extra keys)`;
//! block 0's parent is a root derived from a seed string. A request's extra keys (its
//! `cache_salt`) are mixed into its first block only, as vLLM does ([`block_extra`]): the
//! chain carries them into every later block. Two blocks share a hash only when their whole
//! prefixes (and extra keys) are equal, so the longest cached prefix is found by walking
//! hashes until the first miss.
//!
//! Hashes cross processes (a router indexes them, another worker reuses them), so both schemes
//! are stable: no per-process randomness, fixed seeds.
//!
//! - [`BlockHashAlgo::Sha256Cbor`] (`sha256_cbor`) — vLLM's `--prefix-caching-hash-algo
//!   sha256_cbor` as used with llm-d: digest = SHA-256 of the canonical CBOR encoding of the
//!   3-element array `[parent digest (byte string, 32 bytes), [token ids as unsigned ints],
//!   extra keys (null when none, else an array of text strings)]`; the root is SHA-256 of the
//!   CBOR text string of the seed (vLLM's `PYTHONHASHSEED`). vLLM publishes a block's hash in
//!   KV events as the low 64 bits: the last 8 digest bytes read big-endian
//!   ([`BlockHash::external`]). Known answers in the tests were computed with Python's
//!   `cbor2.dumps(..., canonical=True)` and `hashlib.sha256`.
//! - [`BlockHashAlgo::Xxh3`] (`xxh3_64`, the default: ~20× cheaper) — xxh3-64 with seed 0 over
//!   the bytes `parent digest (32) ‖ token count (u32 LE) ‖ tokens (u32 LE each) ‖ for each extra
//!   key: length (u32 LE) ‖ UTF-8 bytes`; the 64-bit result is stored big-endian in the last 8
//!   digest bytes (the rest zero), the root is xxh3-64 of the seed's UTF-8 bytes.
use super::KvError;
use crate::request::TokenId;
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

/// A block's chained digest (32 bytes; xxh3 uses the last 8).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub [u8; 32]);

impl BlockHash {
    /// The 64-bit form published to routers: the low 64 bits (last 8 bytes, big-endian), as
    /// vLLM converts hashes for KV events.
    pub fn external(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[24..]);
        u64::from_be_bytes(b)
    }

    /// The 32 bytes as 64 lowercase hex digits (file names and keys of the KV tiers).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The inverse of [`Self::to_hex`]; None for anything but 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(BlockHash(out))
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockHash({:016x})", self.external())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BlockHashAlgo {
    #[default]
    Xxh3,
    Sha256Cbor,
}

impl BlockHashAlgo {
    pub fn as_str(self) -> &'static str {
        match self {
            BlockHashAlgo::Xxh3 => "xxh3_64",
            BlockHashAlgo::Sha256Cbor => "sha256_cbor",
        }
    }
}

impl FromStr for BlockHashAlgo {
    type Err = KvError;
    fn from_str(s: &str) -> Result<Self, KvError> {
        match s {
            "xxh3_64" | "xxh3" => Ok(BlockHashAlgo::Xxh3),
            "sha256_cbor" | "sha256_cbor_64bit" => Ok(BlockHashAlgo::Sha256Cbor),
            other => Err(KvError::UnknownHashAlgo(other.to_string())),
        }
    }
}

/// Hashes blocks with one algorithm and root.
#[derive(Clone, Debug)]
pub struct BlockHasher {
    algo: BlockHashAlgo,
    root: BlockHash,
}

impl BlockHasher {
    /// `seed` plays the part of vLLM's `PYTHONHASHSEED`: workers that share cached blocks (and
    /// the router indexing them) must use the same seed.
    pub fn new(algo: BlockHashAlgo, seed: &str) -> Self {
        let root = match algo {
            BlockHashAlgo::Sha256Cbor => {
                let mut enc = Vec::new();
                cbor::text(&mut enc, seed);
                BlockHash(Sha256::digest(&enc).into())
            }
            BlockHashAlgo::Xxh3 => xxh3_digest(seed.as_bytes()),
        };
        Self { algo, root }
    }

    pub fn algo(&self) -> BlockHashAlgo {
        self.algo
    }

    /// The hash of one full block given its parent's (None for the first block).
    pub fn hash(
        &self,
        parent: Option<&BlockHash>,
        tokens: &[TokenId],
        extra: &[String],
    ) -> BlockHash {
        let parent = parent.unwrap_or(&self.root);
        match self.algo {
            BlockHashAlgo::Sha256Cbor => {
                let mut enc = Vec::with_capacity(40 + tokens.len() * 5);
                cbor::array_header(&mut enc, 3);
                cbor::bytes(&mut enc, &parent.0);
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
                BlockHash(Sha256::digest(&enc).into())
            }
            BlockHashAlgo::Xxh3 => {
                let mut b = Vec::with_capacity(36 + tokens.len() * 4);
                b.extend_from_slice(&parent.0);
                b.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
                for &t in tokens {
                    b.extend_from_slice(&t.to_le_bytes());
                }
                for e in extra {
                    b.extend_from_slice(&(e.len() as u32).to_le_bytes());
                    b.extend_from_slice(e.as_bytes());
                }
                xxh3_digest(&b)
            }
        }
    }

    /// Chained hashes of every full block of `tokens` (a partial last block is not hashed);
    /// `extra` (the request's extra keys) goes into the first block.
    pub fn hash_blocks(
        &self,
        tokens: &[TokenId],
        block_size: usize,
        extra: &[String],
    ) -> Vec<BlockHash> {
        let mut out: Vec<BlockHash> = Vec::with_capacity(tokens.len() / block_size);
        for (i, chunk) in tokens.chunks_exact(block_size).enumerate() {
            let h = self.hash(out.last(), chunk, block_extra(i, extra));
            out.push(h);
        }
        out
    }

    /// The hashes of `tokens`' full blocks short of its last token (which must run to give
    /// logits): what a prefix lookup, here or on a peer, can find of a prompt.
    pub fn hash_prefix_blocks(
        &self,
        tokens: &[TokenId],
        block_size: usize,
        extra: &[String],
    ) -> Vec<BlockHash> {
        let usable = tokens.len().saturating_sub(1) / block_size * block_size;
        self.hash_blocks(&tokens[..usable], block_size, extra)
    }

    /// The hashes that bind a prompt's transferred KV to the prompt: every block's chained hash,
    /// the partial last block's included (over its tokens alone, so it differs from any full
    /// block's). The full blocks' are their prefix-cache hashes. A prefill worker sends these
    /// with the blocks; a decode worker computes them for the prompt it was given and uses the
    /// blocks only where they agree.
    pub fn hash_prompt(
        &self,
        tokens: &[TokenId],
        block_size: usize,
        extra: &[String],
    ) -> Vec<BlockHash> {
        let mut out: Vec<BlockHash> = Vec::with_capacity(tokens.len().div_ceil(block_size));
        for (i, chunk) in tokens.chunks(block_size).enumerate() {
            let h = self.hash(out.last(), chunk, block_extra(i, extra));
            out.push(h);
        }
        out
    }
}

/// A request's extra block-hash keys for its `cache_salt` (none without one): how workers and
/// the router alike key a salted request.
pub fn salt_keys(cache_salt: Option<&str>) -> Vec<String> {
    cache_salt.map(str::to_string).into_iter().collect()
}

/// The extra keys of block `i` of a request whose extra keys are `extra`: all of them for the
/// first block, none after it (the chain carries them on), as vLLM mixes `cache_salt` in.
pub fn block_extra(i: usize, extra: &[String]) -> &[String] {
    if i == 0 {
        extra
    } else {
        &[]
    }
}

fn xxh3_digest(bytes: &[u8]) -> BlockHash {
    let mut d = [0u8; 32];
    d[24..].copy_from_slice(&xxhash_rust::xxh3::xxh3_64(bytes).to_be_bytes());
    BlockHash(d)
}

/// The few CBOR (RFC 8949) items the hash needs, in canonical (shortest) form.
pub(crate) mod cbor {
    fn head(out: &mut Vec<u8>, major: u8, v: u64) {
        let m = major << 5;
        if v < 24 {
            out.push(m | v as u8);
        } else if v <= u8::MAX as u64 {
            out.extend_from_slice(&[m | 24, v as u8]);
        } else if v <= u16::MAX as u64 {
            out.push(m | 25);
            out.extend_from_slice(&(v as u16).to_be_bytes());
        } else if v <= u32::MAX as u64 {
            out.push(m | 26);
            out.extend_from_slice(&(v as u32).to_be_bytes());
        } else {
            out.push(m | 27);
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
    pub fn uint(out: &mut Vec<u8>, v: u64) {
        head(out, 0, v);
    }
    pub fn bytes(out: &mut Vec<u8>, b: &[u8]) {
        head(out, 2, b.len() as u64);
        out.extend_from_slice(b);
    }
    pub fn text(out: &mut Vec<u8>, s: &str) {
        head(out, 3, s.len() as u64);
        out.extend_from_slice(s.as_bytes());
    }
    pub fn array_header(out: &mut Vec<u8>, len: u64) {
        head(out, 4, len);
    }
    pub fn null(out: &mut Vec<u8>) {
        out.push(0xf6);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn hex_form_roundtrips_and_refuses_anything_else() {
        let mut b = [0u8; 32];
        b[0] = 0xab;
        b[31] = 0x01;
        let h = BlockHash(b);
        let s = h.to_hex();
        assert_eq!(s.len(), 64);
        assert!(s.starts_with("ab") && s.ends_with("01"), "{s}");
        assert_eq!(BlockHash::from_hex(&s), Some(h));
        for bad in ["", "ab", &s[..63], &format!("{s}0"), &s.replace('a', "g")] {
            assert_eq!(BlockHash::from_hex(bad), None, "{bad}");
        }
    }

    #[test]
    fn cbor_matches_rfc8949_examples() {
        let enc = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut v = Vec::new();
            f(&mut v);
            hex(&v)
        };
        assert_eq!(enc(&|v| cbor::uint(v, 0)), "00");
        assert_eq!(enc(&|v| cbor::uint(v, 23)), "17");
        assert_eq!(enc(&|v| cbor::uint(v, 24)), "1818");
        assert_eq!(enc(&|v| cbor::uint(v, 1000)), "1903e8");
        assert_eq!(enc(&|v| cbor::uint(v, 1000000)), "1a000f4240");
        assert_eq!(enc(&|v| cbor::uint(v, 1000000000000)), "1b000000e8d4a51000");
        assert_eq!(enc(&|v| cbor::text(v, "IETF")), "6449455446");
        assert_eq!(enc(&|v| cbor::bytes(v, &[1, 2, 3, 4])), "4401020304");
        assert_eq!(enc(&|v| cbor::null(v)), "f6");
        assert_eq!(
            enc(&|v| {
                cbor::array_header(v, 3);
                for i in 1..=3 {
                    cbor::uint(v, i)
                }
            }),
            "83010203"
        );
    }

    /// Known answers from Python:
    /// root = sha256(cbor2.dumps('0', canonical=True)).digest()
    /// h1 = sha256(cbor2.dumps((root, (1, 2, 3, 4), None), canonical=True)).digest()
    /// h2 = sha256(cbor2.dumps((h1, (5, 6, 7, 300000), ('lora-a',)), canonical=True)).digest()
    /// external = int.from_bytes(h, 'big') & ((1 << 64) - 1)
    #[test]
    fn sha256_cbor_matches_vllm_scheme() {
        let h = BlockHasher::new(BlockHashAlgo::Sha256Cbor, "0");
        assert_eq!(
            hex(&h.root.0),
            "4e1195df020de59e0d65a33a4279f1183e7ae4e5d980e309f8b55adff2e61c3e"
        );
        let h1 = h.hash(None, &[1, 2, 3, 4], &[]);
        assert_eq!(
            hex(&h1.0),
            "c9d58ba695280d69b243e1e0df813136ca9196b286fb1a021e0b2e028ef071cb"
        );
        assert_eq!(h1.external(), 2164874634404590027);
        let h2 = h.hash(Some(&h1), &[5, 6, 7, 300000], &["lora-a".to_string()]);
        assert_eq!(h2.external(), 13249109884167993003);
    }

    #[test]
    fn chain_depends_on_parent_tokens_extra_and_seed() {
        for algo in [BlockHashAlgo::Xxh3, BlockHashAlgo::Sha256Cbor] {
            let h = BlockHasher::new(algo, "0");
            let a = h.hash(None, &[1, 2], &[]);
            assert_eq!(a, h.hash(None, &[1, 2], &[]), "{algo:?} deterministic");
            assert_ne!(a, h.hash(None, &[2, 1], &[]));
            assert_ne!(a, h.hash(None, &[1, 2], &["lora".into()]));
            assert_ne!(h.hash(Some(&a), &[3, 4], &[]), h.hash(None, &[3, 4], &[]));
            assert_ne!(a, BlockHasher::new(algo, "1").hash(None, &[1, 2], &[]));
            let blocks = h.hash_blocks(&[1, 2, 3, 4, 5], 2, &[]);
            assert_eq!(blocks.len(), 2, "partial blocks are not hashed");
            assert_eq!(blocks[0], a);
            assert_eq!(blocks[1], h.hash(Some(&a), &[3, 4], &[]));
        }
    }

    /// Known answer from Python: xxhash.xxh3_64_intdigest(b'0') for the root.
    #[test]
    fn xxh3_root_known_answer() {
        let h = BlockHasher::new(BlockHashAlgo::Xxh3, "0");
        assert_eq!(h.root.external(), XXH3_OF_ZERO_CHAR);
    }

    const XXH3_OF_ZERO_CHAR: u64 = 1838281907459330133;

    #[test]
    fn names_parse() {
        assert_eq!(
            "xxh3_64".parse::<BlockHashAlgo>().unwrap(),
            BlockHashAlgo::Xxh3
        );
        assert_eq!(
            "sha256_cbor".parse::<BlockHashAlgo>().unwrap(),
            BlockHashAlgo::Sha256Cbor
        );
        assert!(matches!(
            "md5".parse::<BlockHashAlgo>(),
            Err(KvError::UnknownHashAlgo(_))
        ));
    }
}
