//! STUB (helper B implements).
use crate::request::TokenId;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer: {0}")]
    Other(String),
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

pub struct Tokenizer {}

impl Tokenizer {
    pub fn from_dir(_dir: &Path) -> Result<Self, TokenizerError> {
        todo!()
    }
    pub fn encode(&self, _text: &str, _add_special_tokens: bool) -> Result<Vec<TokenId>, TokenizerError> {
        todo!()
    }
    pub fn decode(&self, _ids: &[TokenId], _skip_special_tokens: bool) -> Result<String, TokenizerError> {
        todo!()
    }
    pub fn vocab_size(&self) -> usize {
        todo!()
    }
    pub fn eos_token_ids(&self) -> &[TokenId] {
        todo!()
    }
    pub fn bos_token_id(&self) -> Option<TokenId> {
        todo!()
    }
    pub fn has_chat_template(&self) -> bool {
        todo!()
    }
    pub fn apply_chat_template(
        &self,
        _messages: &[ChatMessage],
        _add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        todo!()
    }
}

pub struct IncrementalDetokenizer {}

impl IncrementalDetokenizer {
    pub fn new(_prompt: &[TokenId], _skip_special_tokens: bool) -> Self {
        todo!()
    }
    pub fn push(&mut self, _tok: &Tokenizer, _token: TokenId) -> Result<String, TokenizerError> {
        todo!()
    }
    pub fn output_text(&self) -> &str {
        todo!()
    }
}

pub struct StopStrings {}

pub enum StopMatch {
    None,
    Stopped { truncate_to: usize },
}

impl StopStrings {
    pub fn new(_stops: &[String], _include_stop_str_in_output: bool) -> Self {
        todo!()
    }
    pub fn check(&self, _text: &str, _new_chars_start: usize) -> StopMatch {
        todo!()
    }
    pub fn holdback(&self, _text: &str) -> usize {
        todo!()
    }
}
