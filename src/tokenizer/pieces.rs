//! Long texts encoded in pieces: in parallel, and each piece once while it stays in a cache.
//! The router tokenizes every prompt it routes (its keys are the workers' block hashes), and
//! most of a long prompt is text it has seen before: a system prompt, a conversation's history,
//! the documents of a RAG template.
//!
//! A text is cut only before an ASCII space that follows an ASCII letter or digit, and only for
//! a tokenizer whose every part keeps the two sides of such a place apart, so the ids of the
//! pieces, joined, are exactly the ids of the whole ([`Pieces::new`] checks the tokenizer's own
//! serialized form and says why when it does not qualify):
//! - normalizers that work per character or per canonical sequence (none, NFC/NFD/NFKC/NFKD,
//!   lowercase): an ASCII letter or digit and the space after it are left as they are and never
//!   composed with one another;
//! - a pre-tokenizer that splits words there: byte-level with GPT-2's pattern, Llama 3's or
//!   Qwen 2's split pattern, whitespace, or Metaspace with splitting on; digits and punctuation
//!   splitting may come with them. In each of those patterns no match runs from a letter or
//!   digit into the space after it, and the next match starts at that space whatever precedes
//!   it; a prefix space is only added to text that does not start with one;
//! - a model that encodes word by word (BPE without dropout, WordPiece, Unigram, WordLevel);
//! - added tokens that neither hold whitespace after their first character nor strip it on
//!   their right; no truncation and no padding;
//! - a post-processor that puts the same ids before and after any one sequence (found by
//!   encoding two probes with and without special tokens).
//!
//! Where a cut falls depends on the text near it (content-defined, as deduplicating stores
//! do), so a text that shares a stretch with an earlier one cuts it the same way and finds its
//! pieces in the cache even after a difference earlier on.
use std::sync::{Arc, Mutex};

use lru::LruCache;
use rayon::prelude::*;
use serde_json::Value;

use super::byte_level::ByteLevel;
use crate::request::TokenId;

/// No piece is cut shorter than this (bytes)…
const MIN_PIECE: usize = 256;
/// …and past this one is cut at the first place allowed.
const MAX_PIECE: usize = 1024;
/// Bytes before a candidate place that decide whether to cut there.
const WINDOW: usize = 8;

/// The split patterns (`Split` pre-tokenizer, `Isolated`) that keep a letter or digit and the
/// space after it apart: Llama 3's and Qwen 2's.
#[cfg(test)]
pub(super) const SPLIT_PATTERN_NAMES: [&str; 2] = ["Llama 3", "Qwen 2"];
#[cfg(test)]
pub(super) fn split_pattern(i: usize) -> &'static str {
    SPLIT_PATTERNS[i]
}
const SPLIT_PATTERNS: [&str; 2] = [
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
];

/// How a tokenizer encodes long texts in pieces.
pub(super) struct Pieces {
    /// Ids the post-processor puts before and after one sequence.
    before: Vec<TokenId>,
    after: Vec<TokenId>,
    /// Encode a text's uncached pieces on rayon's threads.
    parallel: bool,
    /// Byte-level BPE's words found fast, where the tokenizer is one (see `byte_level.rs`).
    byte_level: Option<ByteLevel>,
    cache: Option<Mutex<Cache>>,
}

/// Pieces' ids by their text, least recently used out first, bounded in bytes.
struct Cache {
    map: LruCache<Box<str>, Arc<[TokenId]>>,
    bytes: usize,
    cap: usize,
}

impl Cache {
    fn cost(text: &str, ids: &[TokenId]) -> usize {
        // The text, the ids and the entry's own bookkeeping.
        text.len() + std::mem::size_of_val(ids) + 64
    }

    fn put(&mut self, text: &str, ids: Arc<[TokenId]>) {
        let cost = Self::cost(text, &ids);
        if cost > self.cap {
            return;
        }
        if let Some(old) = self.map.put(text.into(), ids) {
            self.bytes -= Self::cost(text, &old);
        }
        self.bytes += cost;
        while self.bytes > self.cap {
            let Some((t, ids)) = self.map.pop_lru() else {
                break;
            };
            self.bytes -= Self::cost(&t, &ids);
        }
    }
}

impl Pieces {
    /// The way to encode `inner`'s long texts in pieces, or why it cannot be done exactly.
    /// `cache_bytes` bounds the piece cache (0: none).
    pub(super) fn new(
        inner: &tokenizers::Tokenizer,
        parallel: bool,
        cache_bytes: usize,
    ) -> Result<Self, String> {
        let form = serde_json::to_value(inner).map_err(|e| e.to_string())?;
        check(&form)?;
        let (before, after) = specials(inner)?;
        let byte_level = ByteLevel::new(&form, &SPLIT_PATTERNS)
            .map_err(|why| tracing::info!("byte-level fast path not used: {why}"))
            .ok();
        Ok(Self {
            before,
            after,
            parallel,
            byte_level,
            cache: (cache_bytes > 0).then(|| {
                Mutex::new(Cache {
                    map: LruCache::unbounded(),
                    bytes: 0,
                    cap: cache_bytes,
                })
            }),
        })
    }

    /// The ids of `text`, or None when it is too short to cut and there is no fast path for it
    /// (the caller encodes it whole).
    pub(super) fn encode(
        &self,
        inner: &tokenizers::Tokenizer,
        text: &str,
        add_special_tokens: bool,
    ) -> Option<tokenizers::Result<Vec<TokenId>>> {
        let pieces = cut(text);
        if pieces.len() < 2 && self.byte_level.is_none() {
            return None;
        }
        let mut found: Vec<Option<Arc<[TokenId]>>> = match &self.cache {
            Some(c) => {
                let mut c = c.lock().unwrap_or_else(|e| e.into_inner());
                pieces.iter().map(|p| c.map.get(*p).cloned()).collect()
            }
            None => vec![None; pieces.len()],
        };
        let missing: Vec<usize> = (0..pieces.len()).filter(|&i| found[i].is_none()).collect();
        let encode = |&i: &usize| -> tokenizers::Result<Arc<[TokenId]>> {
            let fast = self.byte_level.as_ref();
            match fast.and_then(|b| b.encode(inner.get_model(), pieces[i])) {
                Some(ids) => Ok(ids?.into()),
                None => Ok(inner.encode_fast(pieces[i], false)?.get_ids().into()),
            }
        };
        let encoded: tokenizers::Result<Vec<Arc<[TokenId]>>> = if self.parallel {
            missing.par_iter().map(encode).collect()
        } else {
            missing.iter().map(encode).collect()
        };
        let encoded = match encoded {
            Ok(e) => e,
            Err(e) => return Some(Err(e)),
        };
        if let Some(c) = &self.cache {
            let mut c = c.lock().unwrap_or_else(|e| e.into_inner());
            for (&i, ids) in missing.iter().zip(&encoded) {
                c.put(pieces[i], ids.clone());
            }
        }
        for (i, ids) in missing.into_iter().zip(encoded) {
            found[i] = Some(ids);
        }
        let n: usize = found.iter().flatten().map(|p| p.len()).sum();
        let mut ids = Vec::with_capacity(n + self.before.len() + self.after.len());
        if add_special_tokens {
            ids.extend_from_slice(&self.before);
        }
        for p in found.iter().flatten() {
            ids.extend_from_slice(p);
        }
        if add_special_tokens {
            ids.extend_from_slice(&self.after);
        }
        Some(Ok(ids))
    }
}

/// `text` cut into pieces before an ASCII space that follows an ASCII letter or digit; each
/// piece (but the last) at least [`MIN_PIECE`] bytes, cut where a hash of the bytes before the
/// place picks it, or at the first place allowed past [`MAX_PIECE`].
pub(super) fn cut(text: &str) -> Vec<&str> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = start + MIN_PIECE;
    while i < b.len() {
        if b[i] == b' ' && b[i - 1].is_ascii_alphanumeric() {
            let len = i - start;
            if len >= MAX_PIECE || window_hash(&b[i - WINDOW..i]).is_multiple_of(4) {
                // Both sides are ASCII: `i` is a character boundary.
                out.push(&text[start..i]);
                start = i;
                i += MIN_PIECE;
                continue;
            }
        }
        i += 1;
    }
    out.push(&text[start..]);
    out
}

/// FNV-1a of a few bytes.
fn window_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Whether the tokenizer (its serialized form) keeps the two sides of a cut apart; why not.
fn check(t: &Value) -> Result<(), String> {
    if !t["truncation"].is_null() {
        return Err("it truncates".into());
    }
    if !t["padding"].is_null() {
        return Err("it pads".into());
    }
    for n in flatten(&t["normalizer"], "normalizers") {
        match n["type"].as_str() {
            Some("NFC" | "NFD" | "NFKC" | "NFKD" | "Lowercase") => {}
            other => return Err(format!("normalizer {other:?}")),
        }
    }
    let mut splits = false;
    for p in flatten(&t["pre_tokenizer"], "pretokenizers") {
        match p["type"].as_str() {
            Some("ByteLevel") => splits |= p["use_regex"].as_bool() == Some(true),
            Some("Whitespace" | "WhitespaceSplit") => splits = true,
            Some("Metaspace") if p["split"].as_bool() == Some(true) => splits = true,
            Some("Split")
                if p["behavior"] == "Isolated"
                    && p["invert"].as_bool() == Some(false)
                    && p["pattern"]["Regex"]
                        .as_str()
                        .is_some_and(|r| SPLIT_PATTERNS.contains(&r)) =>
            {
                splits = true
            }
            Some("Digits" | "Punctuation") => {}
            other => return Err(format!("pre-tokenizer {other:?} ({p})")),
        }
    }
    if !splits {
        return Err("no pre-tokenizer splits words at spaces".into());
    }
    match t["model"]["type"].as_str() {
        Some("BPE") if t["model"]["dropout"].is_null() => {}
        Some("WordPiece" | "Unigram" | "WordLevel") => {}
        other => return Err(format!("model {other:?}")),
    }
    for a in t["added_tokens"].as_array().into_iter().flatten() {
        let content = a["content"].as_str().unwrap_or_default();
        if a["rstrip"].as_bool() == Some(true) || content.chars().skip(1).any(char::is_whitespace) {
            return Err(format!("added token {content:?}"));
        }
    }
    Ok(())
}

/// A component and the members of a `Sequence` of them (none for null).
fn flatten<'a>(v: &'a Value, members: &str) -> Vec<&'a Value> {
    match v {
        Value::Null => Vec::new(),
        v if v["type"] == "Sequence" => v[members]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|m| flatten(m, members))
            .collect(),
        v => vec![v],
    }
}

/// The ids the post-processor puts before and after a sequence, the same for two probes.
type Specials = (Vec<TokenId>, Vec<TokenId>);
fn specials(inner: &tokenizers::Tokenizer) -> Result<Specials, String> {
    let around = |probe: &str| -> Result<Specials, String> {
        let ids = |special| {
            inner
                .encode_fast(probe, special)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| e.to_string())
        };
        let (plain, with) = (ids(false)?, ids(true)?);
        let at = (0..=with.len().saturating_sub(plain.len()))
            .find(|&i| with[i..].starts_with(&plain))
            .ok_or("the post-processor changes the sequence itself")?;
        Ok((with[..at].to_vec(), with[at + plain.len()..].to_vec()))
    };
    let a = around("Hello world")?;
    if around("0 x, y\nz")? != a {
        return Err("the post-processor adds different ids to different texts".into());
    }
    Ok(a)
}
