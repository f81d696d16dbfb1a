//! A byte-level BPE tokenizer (the GPT-2 scheme Llama 3, Qwen2 and SmolLM use) with exactly
//! `spec.vocab` ids, written as `tokenizer.json` plus `tokenizer_config.json`.
//!
//! Id layout: 0 `<unk>`, 1 `<s>`, 2 `</s>`, 3 `<|eot_id|>` (special, added tokens), 4..260 the
//! 256 bytes in byte order, then merges built from a fixed list of common English words until
//! the vocabulary is full. Any text encodes (bytes are the fallback) and decodes back exactly.

use super::{Arch, TinyModelSpec, BOS_ID, EOS_ID, EOT_ID, UNK_ID};
use serde_json::json;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

const SPECIALS: [(u32, &str); 4] = [
    (UNK_ID, "<unk>"),
    (BOS_ID, "<s>"),
    (EOS_ID, "</s>"),
    (EOT_ID, "<|eot_id|>"),
];

/// Specials plus one token per byte.
pub const MIN_VOCAB: usize = SPECIALS.len() + 256;

/// Words (with their leading space, as byte-level BPE sees them) whose merges fill the vocab
/// first, so short English prompts take few tokens.
const WORDS: &[&str] = &[
    " the", " a", " and", " to", " was", " he", " she", " it", " of", " in", " on", " with",
    " they", " her", " his", " said", " one", " day", " time", " there", " little", " big",
    " girl", " boy", " cat", " dog", " play", " happy", " mom", " saw", " upon", "Once", " once",
    " tree", " ball", " friend", " is", " you", " that", " for", " are", " be", " this", " not",
    " have", " had", " we", " can", " all", " so", " what", " up", " out", " go", " very", "The",
    " house", " sun", " park", " want", " see", " like", " new", " help", "ing", "ed", ".",
    " bird", " fish", " run", " jump", " red", " blue", " good", " sad", " love", " toy",
];

/// GPT-2's reversible byte → printable-char map.
fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            let cp = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(cp).expect("code points below 0x200 are valid chars")
        })
        .collect()
}

/// (vocab in id order, merges in rank order).
fn build_vocab(size: usize) -> (Vec<String>, Vec<String>) {
    assert!(size >= MIN_VOCAB, "vocab {size} below {MIN_VOCAB}");
    let byte_char = bytes_to_unicode();
    let mut tokens: Vec<String> = SPECIALS.iter().map(|(_, t)| t.to_string()).collect();
    tokens.extend(byte_char.iter().map(|c| c.to_string()));
    let mut known: HashSet<String> = tokens.iter().cloned().collect();
    let mut merges = Vec::new();

    let letters: Vec<String> = ('a'..='z').map(String::from).collect();
    let pair_words = letters
        .iter()
        .flat_map(|a| letters.iter().map(move |b| format!("{a}{b}")));
    let words = WORDS.iter().map(|w| w.to_string()).chain(pair_words);
    'outer: for word in words {
        let mut parts = word.bytes().map(|b| byte_char[usize::from(b)].to_string());
        let Some(mut current) = parts.next() else {
            continue;
        };
        for part in parts {
            let merged = format!("{current}{part}");
            if !known.contains(&merged) {
                if tokens.len() == size {
                    break 'outer;
                }
                merges.push(format!("{current} {part}"));
                known.insert(merged.clone());
                tokens.push(merged.clone());
            }
            current = merged;
        }
    }
    // Large vocabularies (benchmark models of a real model's shape) run out of merges: the
    // remaining ids are vocabulary entries no merge produces, which still decode.
    let mut pad = 0;
    while tokens.len() < size {
        tokens.push(format!("<pad_{pad}>"));
        pad += 1;
    }
    (tokens, merges)
}

fn tokenizer_json(spec: &TinyModelSpec) -> serde_json::Value {
    let (tokens, merges) = build_vocab(spec.vocab);
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), json!(id)))
        .collect();
    let added: Vec<_> = SPECIALS
        .iter()
        .map(|(id, content)| {
            json!({
                "id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            })
        })
        .collect();
    let post_processor = if spec.arch.adds_bos() {
        json!({
            "type": "TemplateProcessing",
            "single": [
                { "SpecialToken": { "id": "<s>", "type_id": 0 } },
                { "Sequence": { "id": "A", "type_id": 0 } }
            ],
            "pair": [
                { "SpecialToken": { "id": "<s>", "type_id": 0 } },
                { "Sequence": { "id": "A", "type_id": 0 } },
                { "SpecialToken": { "id": "<s>", "type_id": 1 } },
                { "Sequence": { "id": "B", "type_id": 1 } }
            ],
            "special_tokens": { "<s>": { "id": "<s>", "ids": [BOS_ID], "tokens": ["<s>"] } }
        })
    } else {
        json!({ "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false,
                "use_regex": false })
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                           "use_regex": true },
        "post_processor": post_processor,
        "decoder": { "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                     "use_regex": true },
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges
        }
    })
}

/// A plain role-tagged template; it deliberately leaves BOS to the tokenizer.
const CHAT_TEMPLATE: &str = "{% for message in messages %}<|{{ message['role'] }}|>\n\
{{ message['content'] }}{{ eos_token }}\n{% endfor %}\
{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

fn tokenizer_config_json(spec: &TinyModelSpec) -> serde_json::Value {
    let decoder: BTreeMap<String, serde_json::Value> = SPECIALS
        .iter()
        .map(|(id, content)| {
            let entry = json!({ "content": content, "lstrip": false, "normalized": false,
                                "rstrip": false, "single_word": false, "special": true });
            (id.to_string(), entry)
        })
        .collect();
    let eos = if spec.arch == Arch::Llama3 {
        "<|eot_id|>"
    } else {
        "</s>"
    };
    json!({
        "add_bos_token": spec.arch.adds_bos(),
        "add_eos_token": false,
        "added_tokens_decoder": decoder,
        "bos_token": if spec.arch.adds_bos() { json!("<s>") } else { json!(null) },
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "eos_token": eos,
        "model_max_length": spec.max_pos,
        "pad_token": null,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    })
}

pub(super) fn write_tokenizer_files(dir: &Path, spec: &TinyModelSpec) {
    super::tiny_model::write_json(&dir.join("tokenizer.json"), &tokenizer_json(spec));
    super::tiny_model::write_json(
        &dir.join("tokenizer_config.json"),
        &tokenizer_config_json(spec),
    );
}

/// Loads `dir/tokenizer.json` with the `tokenizers` crate; panics with the path on failure.
pub fn load_tokenizer(dir: &Path) -> tokenizers::Tokenizer {
    let path = dir.join("tokenizer.json");
    tokenizers::Tokenizer::from_file(&path)
        .unwrap_or_else(|e| panic!("load {}: {e}", path.display()))
}
