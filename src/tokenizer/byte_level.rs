//! Byte-level BPE (GPT-2's scheme, as SmolLM2, Llama 3 and Qwen 2 use it) without the
//! tokenizers crate's per-character bookkeeping: the text is split into words by the
//! tokenizer's own split pattern run on the `regex` crate's DFA, each word's bytes are mapped
//! to the vocabulary's characters, and the crate's own BPE model (with its word cache) encodes
//! each word. The crate's general pipeline tracks the alignment of every character through
//! normalization and offsets through encoding, and runs the split pattern on a backtracking
//! engine because of its one look-ahead; a router that only needs ids pays for neither.
//!
//! The look-ahead: the patterns end `…|\s+(?!\S)|\s+`, a run of whitespace that leaves its last
//! character to the word after it. A DFA cannot look ahead, so the pattern is run without that
//! alternative and a whitespace run found by the final `\s+` with a non-space after it gives
//! its last character back: the search resumes there, where the next word's optional leading
//! space (or, for a newline, a match of its own) takes it — what the backtracking engine finds.
//! Every other alternative is tried in the same order by both engines (leftmost-first).
//!
//! Used only for tokenizers this module recognises in their serialized form ([`ByteLevel::new`]
//! says why not otherwise), and only for texts holding no added token (the crate's own pipeline
//! encodes those). Tests prove the ids equal the crate's on random texts over letters, digits,
//! marks, whitespace of every kind and contractions.
use regex::Regex;
use serde_json::Value;
use tokenizers::Model;

use crate::request::TokenId;

/// GPT-2's split pattern (the `ByteLevel` pre-tokenizer's own, `use_regex: true`).
const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// What every pattern handled here ends with: the look-ahead alternative, then plain `\s+`.
const LOOKAHEAD_TAIL: &str = r"|\s+(?!\S)|\s+";

/// A byte-level BPE tokenizer's pre-tokenization, done fast.
pub(super) struct ByteLevel {
    /// Each numeric character is a word of its own first (`Digits`, `individual_digits`).
    digits: bool,
    /// The split pattern without its look-ahead alternative.
    words: Regex,
    /// The pattern has an alternative taking whitespace runs with line breaks (`\s*[\r\n]+`,
    /// before the look-ahead), so a whitespace match holding one did not come from `\s+`.
    line_breaks_apart: bool,
    /// Added tokens' texts: a text holding any is left to the crate.
    added: Vec<String>,
    /// GPT-2's map from bytes to the vocabulary's characters.
    chars: [char; 256],
}

impl ByteLevel {
    /// The fast path for the tokenizer with this serialized form, or why there is none.
    /// `split_patterns` are the `Split` patterns known to end in [`LOOKAHEAD_TAIL`] with no
    /// other look-around.
    pub(super) fn new(form: &Value, split_patterns: &[&str]) -> Result<Self, String> {
        if !form["normalizer"].is_null() {
            return Err("it normalizes".into());
        }
        let model = &form["model"];
        if model["type"] != "BPE" || !model["dropout"].is_null() {
            return Err(format!("model {} is not plain BPE", model["type"]));
        }
        let parts: Vec<&Value> = match &form["pre_tokenizer"] {
            v if v["type"] == "Sequence" => v["pretokenizers"]
                .as_array()
                .map(|a| a.iter().collect())
                .unwrap_or_default(),
            v => vec![v],
        };
        let byte_level = |p: &Value, regex: bool| {
            p["type"] == "ByteLevel"
                && p["add_prefix_space"].as_bool() == Some(false)
                && p["use_regex"].as_bool() == Some(regex)
        };
        let (digits, pattern) = match parts.as_slice() {
            [b] if byte_level(b, true) => (false, GPT2_PATTERN),
            [d, b]
                if d["type"] == "Digits"
                    && d["individual_digits"].as_bool() == Some(true)
                    && byte_level(b, true) =>
            {
                (true, GPT2_PATTERN)
            }
            [s, b]
                if s["type"] == "Split"
                    && s["behavior"] == "Isolated"
                    && s["invert"].as_bool() == Some(false)
                    && byte_level(b, false) =>
            {
                let p = s["pattern"]["Regex"].as_str().unwrap_or_default();
                let known = split_patterns.iter().find(|k| **k == p);
                (
                    false,
                    *known.ok_or("its split pattern is not one known here")?,
                )
            }
            _ => return Err("its pre-tokenizer is not byte-level BPE's".into()),
        };
        let head = pattern
            .strip_suffix(LOOKAHEAD_TAIL)
            .ok_or("its pattern does not end in the look-ahead alternative")?;
        let words = Regex::new(&format!(r"{head}|\s+")).map_err(|e| e.to_string())?;
        let added = form["added_tokens"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["content"].as_str())
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect();
        Ok(Self {
            digits,
            words,
            line_breaks_apart: head.contains(r"\s*[\r\n]+"),
            added,
            chars: gpt2_byte_chars(),
        })
    }

    /// The ids of `text` without special tokens, or None when it holds an added token's text.
    pub(super) fn encode(
        &self,
        model: &impl Model,
        text: &str,
    ) -> Option<tokenizers::Result<Vec<TokenId>>> {
        if self.added.iter().any(|a| text.contains(a.as_str())) {
            return None;
        }
        let mut ids = Vec::with_capacity(text.len() / 3);
        let mut mapped = String::new();
        let mut failed = None;
        self.for_each_word(text, |word| {
            if failed.is_some() {
                return;
            }
            mapped.clear();
            mapped.extend(word.bytes().map(|b| self.chars[usize::from(b)]));
            match model.tokenize(&mapped) {
                Ok(tokens) => ids.extend(tokens.iter().map(|t| t.id)),
                Err(e) => failed = Some(e),
            }
        });
        Some(match failed {
            Some(e) => Err(e),
            None => Ok(ids),
        })
    }

    /// Calls `f` with each word of `text`, in order, as the crate's pre-tokenizer splits it.
    fn for_each_word<'a>(&self, text: &'a str, mut f: impl FnMut(&'a str)) {
        if !self.digits {
            return self.split(text, &mut f);
        }
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if c.is_numeric() {
                self.split(&text[start..i], &mut f);
                start = i + c.len_utf8();
                f(&text[i..start]);
            }
        }
        self.split(&text[start..], &mut f);
    }

    /// The split pattern's words of `s` (and any text between matches, kept as the crate's
    /// `Isolated` split keeps it).
    fn split<'a>(&self, s: &'a str, f: &mut impl FnMut(&'a str)) {
        let mut at = 0;
        while let Some(m) = self.words.find_at(s, at) {
            if m.start() > at {
                f(&s[at..m.start()]);
            }
            let w = m.as_str();
            // A run of whitespace from the final `\s+` (greedy, so a non-space follows unless
            // the text ends): the look-ahead alternative would have left its last character.
            let from_final = m.end() < s.len()
                && w.chars().all(char::is_whitespace)
                && !(self.line_breaks_apart && w.contains(['\r', '\n']));
            match w.char_indices().last() {
                Some((last, _)) if from_final && last > 0 => {
                    f(&w[..last]);
                    at = m.start() + last;
                }
                _ => {
                    f(w);
                    at = m.end();
                }
            }
        }
        if at < s.len() {
            f(&s[at..]);
        }
    }
}

/// GPT-2's reversible map from bytes to printable characters: printable Latin-1 bytes stand for
/// themselves, the others for the characters from U+0100 on, in byte order.
fn gpt2_byte_chars() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut out = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        out[usize::from(b)] = if printable(b) {
            char::from(b)
        } else {
            next += 1;
            char::from_u32(next - 1).expect("below U+0200")
        };
    }
    out
}
