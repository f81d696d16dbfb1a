//! Streaming detokenization: turns one token at a time into text without ever emitting half
//! of a UTF-8 character or a wrongly stripped leading space.
//!
//! The algorithm is HF TGI's / vLLM's prefix/read offsets. Tokens do not decode
//! independently (SentencePiece strips the leading space of a decode, byte-level and
//! byte-fallback tokens may hold part of a character), so each step decodes a short window
//! twice: `ids[prefix..read]` (already emitted) and `ids[prefix..]`; the difference is new
//! text, emitted only once it does not end in U+FFFD (an incomplete character). The window
//! starts on the last few prompt tokens, so the first output token decodes in context.
//!
//! Invariant: `output_text()` is the concatenation of everything `push` and `flush`
//! returned; without a prompt it equals `decode(output ids)`, with one it equals the suffix
//! that `decode(prompt + output)` adds to `decode(prompt)`.
use super::{Tokenizer, TokenizerError};
use crate::request::TokenId;

/// Prompt tokens used as decoding context (vLLM uses the same 5).
const PROMPT_CONTEXT_TOKENS: usize = 5;

pub struct IncrementalDetokenizer {
    /// The decoding window: `ids[..prefix_offset]` were dropped as no longer needed, so the
    /// window always starts at `prefix_offset == 0`. `[read_offset + pending]`
    ids: Vec<TokenId>,
    /// Tokens `ids[..read_offset]` are fully emitted (or prompt context).
    read_offset: usize,
    /// Byte length of `decode(ids[..read_offset])`, cached between steps.
    prefix_len: Option<usize>,
    skip_special_tokens: bool,
    output: String,
}

impl IncrementalDetokenizer {
    pub fn new(prompt: &[TokenId], skip_special_tokens: bool) -> Self {
        let context = &prompt[prompt.len().saturating_sub(PROMPT_CONTEXT_TOKENS)..];
        Self {
            ids: context.to_vec(),
            read_offset: context.len(),
            prefix_len: None,
            skip_special_tokens,
            output: String::new(),
        }
    }

    /// Adds one output token; returns the text it completed (often empty while a multi-byte
    /// character is still partial, or for a skipped special token).
    pub fn push(&mut self, tok: &Tokenizer, token: TokenId) -> Result<String, TokenizerError> {
        self.ids.push(token);
        let prefix_len = match self.prefix_len {
            Some(len) => len,
            None => {
                let len = tok
                    .decode(&self.ids[..self.read_offset], self.skip_special_tokens)?
                    .len();
                self.prefix_len = Some(len);
                len
            }
        };
        let text = tok.decode(&self.ids, self.skip_special_tokens)?;
        if text.len() <= prefix_len || text.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(String::new());
        }
        // A prefix length that is not a char boundary of the longer decode means the two
        // decodes disagree mid-character; wait for more tokens rather than split it.
        let Some(delta) = text.get(prefix_len..) else {
            return Ok(String::new());
        };
        let delta = delta.to_owned();
        // The old read position becomes the new window start.
        self.ids.drain(..self.read_offset);
        self.read_offset = self.ids.len();
        self.prefix_len = None;
        self.output.push_str(&delta);
        Ok(delta)
    }

    /// Emits whatever text is still held back (an incomplete character at the end of
    /// generation decodes as U+FFFD, as `decode` would show it). Call once, when the request
    /// finishes.
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String, TokenizerError> {
        if self.ids.len() == self.read_offset {
            return Ok(String::new());
        }
        let prefix = tok.decode(&self.ids[..self.read_offset], self.skip_special_tokens)?;
        let text = tok.decode(&self.ids, self.skip_special_tokens)?;
        let delta = match text.strip_prefix(prefix.as_str()) {
            Some(rest) => rest.to_owned(),
            None => String::new(),
        };
        self.ids.drain(..self.read_offset);
        self.read_offset = self.ids.len();
        self.prefix_len = None;
        self.output.push_str(&delta);
        Ok(delta)
    }

    /// All text emitted so far.
    pub fn output_text(&self) -> &str {
        &self.output
    }
}
