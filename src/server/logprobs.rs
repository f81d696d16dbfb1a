//! Engine logprobs in OpenAI's two shapes: completions' legacy parallel lists and chat's
//! per-token objects. Token strings are each token decoded alone, special tokens kept.
use super::openai::{
    finite_logprob, ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob,
};
use crate::engine::TokenLogprob;
use crate::tokenizer::Tokenizer;
use crate::TokenId;

fn token_str(tok: &Tokenizer, id: TokenId) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

/// Completions' `logprobs`; `offsets[i]` is where token `i`'s text starts in the choice text.
pub fn completion(tok: &Tokenizer, lps: &[TokenLogprob], offsets: &[usize]) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for (i, lp) in lps.iter().enumerate() {
        out.tokens.push(token_str(tok, lp.token));
        out.token_logprobs.push(finite_logprob(lp.logprob));
        let mut top = serde_json::Map::new();
        for &(id, l) in &lp.top {
            top.entry(token_str(tok, id))
                .or_insert_with(|| serde_json::Value::from(finite_logprob(l)));
        }
        out.top_logprobs.push(top);
        out.text_offset.push(offsets.get(i).copied().unwrap_or(0));
    }
    out
}

/// Chat's `logprobs.content`.
pub fn chat(tok: &Tokenizer, lps: &[TokenLogprob]) -> ChatLogprobs {
    ChatLogprobs {
        content: lps
            .iter()
            .map(|lp| {
                let token = token_str(tok, lp.token);
                ChatTokenLogprob {
                    bytes: token.as_bytes().to_vec(),
                    token,
                    logprob: finite_logprob(lp.logprob),
                    top_logprobs: lp
                        .top
                        .iter()
                        .map(|&(id, l)| {
                            let token = token_str(tok, id);
                            TopLogprob {
                                bytes: token.as_bytes().to_vec(),
                                token,
                                logprob: finite_logprob(l),
                            }
                        })
                        .collect(),
                }
            })
            .collect(),
    }
}
