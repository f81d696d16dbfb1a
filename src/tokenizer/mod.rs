//! Text ↔ tokens for one model directory (Hugging Face layout).
//!
//! - [`Tokenizer`]: `tokenizer.json` through the `tokenizers` crate, plus what HF keeps beside
//!   it: special tokens, `add_bos_token` and the chat template from `tokenizer_config.json`,
//!   and the EOS ids from `generation_config.json`.
//! - [`IncrementalDetokenizer`]: streaming token → text that never emits half a character.
//! - [`StopStrings`]: stop-string search and the stream holdback it requires.
//!
//! Invariants: `eos_token_ids()` holds no duplicates; `encode(.., true)` never yields two
//! leading BOS tokens of its own making; a broken chat template does not stop the model from
//! loading (plain completions still work), it fails `apply_chat_template` instead.
mod byte_level;
mod chat_template;
mod detokenizer;
mod pieces;
mod stop;

pub use detokenizer::IncrementalDetokenizer;
pub use stop::{StopMatch, StopStrings};

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::request::TokenId;
use chat_template::ChatTemplate;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("required tokenizer file {path} is missing")]
    MissingFile { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("the model has no chat template")]
    NoChatTemplate,
    /// The template does not compile or failed while rendering.
    #[error("chat template error: {message}")]
    Template { message: String },
    /// The template itself rejected the conversation via `raise_exception(message)`.
    #[error("chat template rejected the conversation: {message}")]
    TemplateException { message: String },
    #[error("cannot encode text: {message}")]
    Encode { message: String },
    #[error("cannot decode token ids: {message}")]
    Decode { message: String },
}

/// One chat turn as the OpenAI API and HF chat templates see it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token_id: Option<TokenId>,
    eos_token_ids: Vec<TokenId>,
    /// Prepend BOS ourselves: `tokenizer.json` has no post-processor and
    /// `tokenizer_config.json` asks for BOS.
    prepend_bos: bool,
    /// `None`: the model has no template; `Some(Err)`: it has one that does not compile.
    chat_template: Option<Result<ChatTemplate, String>>,
    /// Long texts in pieces ([`Self::encode_in_pieces`]); None: whole.
    pieces: Option<pieces::Pieces>,
}

impl Tokenizer {
    /// Loads `tokenizer.json` (required), `tokenizer_config.json` and
    /// `generation_config.json` (both optional) from `dir`. The chat template comes from
    /// `tokenizer_config.json`'s `chat_template` (a string, or a list of `{name, template}`
    /// of which "default" is used), else from a `chat_template.jinja` file.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(TokenizerError::MissingFile {
                path: tokenizer_path,
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|e| {
            TokenizerError::Parse {
                path: tokenizer_path.clone(),
                message: e.to_string(),
            }
        })?;
        let config = read_json_if_present(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        let generation =
            read_json_if_present(&dir.join("generation_config.json"))?.unwrap_or_default();

        let bos_token = config.get("bos_token").and_then(token_content);
        let eos_token = config.get("eos_token").and_then(token_content);
        let bos_token_id = bos_token
            .as_deref()
            .and_then(|t| inner.token_to_id(t))
            .or_else(|| generation.get("bos_token_id").and_then(as_token_id));

        // generation_config's ids first (what the model was tuned to stop on), then the
        // tokenizer's own EOS.
        let mut eos_token_ids: Vec<TokenId> = match generation.get("eos_token_id") {
            Some(Value::Array(ids)) => ids.iter().filter_map(as_token_id).collect(),
            Some(v) => as_token_id(v).into_iter().collect(),
            None => Vec::new(),
        };
        eos_token_ids.extend(eos_token.as_deref().and_then(|t| inner.token_to_id(t)));
        let mut seen = std::collections::HashSet::new();
        eos_token_ids.retain(|id| seen.insert(*id));

        let add_bos_token = config
            .get("add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let prepend_bos =
            add_bos_token && bos_token_id.is_some() && inner.get_post_processor().is_none();

        let chat_template = chat_template_source(dir, &config)?.map(|source| {
            ChatTemplate::new(source, bos_token.clone(), eos_token.clone()).map_err(|e| {
                tracing::warn!(dir = %dir.display(), error = %e, "chat template does not compile");
                e.to_string()
            })
        });

        Ok(Self {
            inner,
            bos_token_id,
            eos_token_ids,
            prepend_bos,
            chat_template,
            pieces: None,
        })
    }

    /// From now on, encodes a long text in pieces where that gives exactly the ids of the
    /// whole (see `pieces.rs` for which tokenizers qualify, and why): the pieces not in a
    /// cache of `cache_bytes` (0: none) are encoded on rayon's threads when `parallel`. Errs,
    /// saying why, for a tokenizer that does not qualify (it keeps encoding texts whole).
    pub fn encode_in_pieces(&mut self, parallel: bool, cache_bytes: usize) -> Result<(), String> {
        self.pieces = Some(pieces::Pieces::new(&self.inner, parallel, cache_bytes)?);
        Ok(())
    }

    /// Token ids of `text`. With `add_special_tokens`, `tokenizer.json`'s post-processor adds
    /// what the model expects (BOS etc.); if there is none and `add_bos_token` is set, BOS is
    /// prepended here unless the text already starts with it.
    pub fn encode(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<TokenId>, TokenizerError> {
        let in_pieces = self
            .pieces
            .as_ref()
            .and_then(|p| p.encode(&self.inner, text, add_special_tokens));
        let mut ids = match in_pieces {
            Some(ids) => ids,
            None => self
                .inner
                .encode_fast(text, add_special_tokens)
                .map(|e| e.get_ids().to_vec()),
        }
        .map_err(|e| TokenizerError::Encode {
            message: e.to_string(),
        })?;
        if add_special_tokens && self.prepend_bos {
            if let Some(bos) = self.bos_token_id {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    pub fn decode(
        &self,
        ids: &[TokenId],
        skip_special_tokens: bool,
    ) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode {
                message: e.to_string(),
            })
    }

    /// Number of token ids the tokenizer knows, added tokens included. The model's embedding
    /// may be larger (padded); it is never smaller.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Every id that ends generation (unless the request ignores EOS), without duplicates.
    pub fn eos_token_ids(&self) -> &[TokenId] {
        &self.eos_token_ids
    }

    pub fn bos_token_id(&self) -> Option<TokenId> {
        self.bos_token_id
    }

    /// The id of a token given by its exact string form (e.g. `"<|im_end|>"`).
    pub fn token_to_id(&self, token: &str) -> Option<TokenId> {
        self.inner.token_to_id(token)
    }

    /// True when the model ships a chat template, even one that fails to compile.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders the chat template the way transformers does (`trim_blocks`, `lstrip_blocks`,
    /// Python string methods), with `messages`, `add_generation_prompt`, `bos_token`,
    /// `eos_token` and `raise_exception` in scope.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        match &self.chat_template {
            None => Err(TokenizerError::NoChatTemplate),
            Some(Err(message)) => Err(TokenizerError::Template {
                message: message.clone(),
            }),
            Some(Ok(template)) => template.render(messages, add_generation_prompt),
        }
    }
}

/// `Ok(None)` when the file does not exist.
fn read_json_if_present(path: &Path) -> Result<Option<Value>, TokenizerError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TokenizerError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TokenizerError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// A special token in `tokenizer_config.json`: a plain string, or an AddedToken object
/// `{"content": ..., ...}` (older transformers).
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

fn as_token_id(v: &Value) -> Option<TokenId> {
    v.as_u64().and_then(|id| TokenId::try_from(id).ok())
}

fn chat_template_source(dir: &Path, config: &Value) -> Result<Option<String>, TokenizerError> {
    match config.get("chat_template") {
        Some(Value::String(s)) => return Ok(Some(s.clone())),
        Some(Value::Array(named)) => {
            let default = named.iter().find_map(|t| {
                (t.get("name")?.as_str()? == "default")
                    .then(|| t.get("template")?.as_str().map(str::to_owned))
                    .flatten()
            });
            return Ok(default);
        }
        _ => {}
    }
    let path = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Io { path, source }),
    }
}

#[cfg(test)]
mod tests;
