//! Tests against the real tokenizer files of the two shared models, plus synthetic model
//! directories for the configuration variants those two do not cover.
use super::*;

#[path = "../../tests/common/shared.rs"]
mod shared_models;

/// The shared model's tokenizer, or `None` (with a note) where the models are absent — a
/// failure under `CI` (see `shared_models::shared_model`).
fn shared(name: &str) -> Option<Tokenizer> {
    let dir = shared_models::shared_model(name)?;
    Some(Tokenizer::from_dir(&dir).expect("shared tokenizer loads"))
}

/// stories260K's `tokenizer.json`, or `None` as [`shared`].
fn stories_tokenizer_json() -> Option<std::path::PathBuf> {
    Some(shared_models::shared_model("stories260K")?.join("tokenizer.json"))
}

fn user(content: &str) -> ChatMessage {
    ChatMessage {
        role: "user".into(),
        content: content.into(),
    }
}

/// A model directory with stories260K's tokenizer.json and the given side files.
fn synthetic_dir(config: Option<&str>, generation: Option<&str>) -> Option<tempfile::TempDir> {
    let src = stories_tokenizer_json()?;
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::copy(&src, dir.path().join("tokenizer.json")).expect("copy tokenizer.json");
    if let Some(c) = config {
        std::fs::write(dir.path().join("tokenizer_config.json"), c).expect("write config");
    }
    if let Some(g) = generation {
        std::fs::write(dir.path().join("generation_config.json"), g).expect("write config");
    }
    Some(dir)
}

const UNICODE_TEXT: &str = "Once upon a time, héllo wörld 🦀 日本語! The crab said \"ça va?\" \
    and ate 3 ½ apples — then 🦀🦀 wrote 東京タワー, naïve café, Ω≈ç√∫ and went home.";

#[test]
fn stories260k_special_tokens_and_exactly_one_bos() {
    let Some(tok) = shared("stories260K") else {
        return;
    };
    assert_eq!(tok.vocab_size(), 512);
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_ids(), &[2]);
    assert_eq!(tok.token_to_id("</s>"), Some(2));
    let with = tok.encode("Once upon a time", true).unwrap();
    let without = tok.encode("Once upon a time", false).unwrap();
    assert_eq!(with[0], 1);
    assert_eq!(with.iter().filter(|&&t| t == 1).count(), 1);
    assert_eq!(&with[1..], &without[..]);
    assert!(!without.contains(&1));
    assert!(!tok.has_chat_template());
    assert!(matches!(
        tok.apply_chat_template(&[user("Hi")], true),
        Err(TokenizerError::NoChatTemplate)
    ));
}

#[test]
fn encode_decode_round_trip_on_both_models() {
    for name in ["stories260K", "smollm2-135m-instruct"] {
        let Some(tok) = shared(name) else { continue };
        let ids = tok.encode(UNICODE_TEXT, false).unwrap();
        assert_eq!(tok.decode(&ids, true).unwrap(), UNICODE_TEXT, "{name}");
        let ids = tok.encode(UNICODE_TEXT, true).unwrap();
        assert_eq!(tok.decode(&ids, true).unwrap(), UNICODE_TEXT, "{name}");
    }
}

#[test]
fn smollm2_has_no_bos_and_eos_from_both_configs() {
    let Some(tok) = shared("smollm2-135m-instruct") else {
        return;
    };
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_ids(), &[2]);
    // No add_bos_token and a ByteLevel post-processor: nothing is added.
    assert_eq!(
        tok.encode("Hello", true).unwrap(),
        tok.encode("Hello", false).unwrap()
    );
    assert_eq!(
        tok.decode(&[1, 2], false).unwrap(),
        "<|im_start|><|im_end|>"
    );
    assert_eq!(tok.decode(&[1, 2], true).unwrap(), "");
}

#[test]
fn smollm2_chat_template_renders_exactly() {
    let Some(tok) = shared("smollm2-135m-instruct") else {
        return;
    };
    assert!(tok.has_chat_template());
    // Hand-derived from the template in tokenizer_config.json: a default system turn is
    // inserted when the first message is not a system message.
    let system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by \
                  Hugging Face<|im_end|>\n";
    assert_eq!(
        tok.apply_chat_template(&[user("Hi")], true).unwrap(),
        format!("{system}<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    );
    assert_eq!(
        tok.apply_chat_template(&[user("Hi")], false).unwrap(),
        format!("{system}<|im_start|>user\nHi<|im_end|>\n")
    );
    let own_system = ChatMessage {
        role: "system".into(),
        content: "Be brief.".into(),
    };
    assert_eq!(
        tok.apply_chat_template(&[own_system, user("Hi")], true)
            .unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\n"
    );
}

#[test]
fn template_features_raise_exception_and_config_variants() {
    let template =
        "{% if messages|length == 0 %}{{ raise_exception('need at least one message') }}\
        {% endif %}{{ bos_token }}\n{% for m in messages %}\n  {% if m.content.startswith('!') %}\
        [cmd]{% endif %}{{ m.content.strip() }}{{ eos_token }}\n{% endfor %}\n\
        {% if add_generation_prompt %}>{% endif %}";
    let config = serde_json::json!({
        "add_bos_token": true,
        "bos_token": {"content": "<s>", "lstrip": false},
        "eos_token": "</s>",
        "chat_template": [
            {"name": "tool_use", "template": "tools!"},
            {"name": "default", "template": template},
        ],
    });
    let Some(dir) = synthetic_dir(
        Some(&config.to_string()),
        Some(r#"{"eos_token_id": [0, 2, 0]}"#),
    ) else {
        return;
    };
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    // generation_config's ids first, then the tokenizer's EOS, without duplicates.
    assert_eq!(tok.eos_token_ids(), &[0, 2]);
    assert_eq!(tok.bos_token_id(), Some(1));
    // trim_blocks drops the newline after each block tag (not after `{{ bos_token }}`),
    // lstrip_blocks the indentation before one; pycompat supplies .strip(), .startswith().
    let rendered = tok
        .apply_chat_template(&[user("  hi "), user("!go")], true)
        .unwrap();
    assert_eq!(rendered, "<s>\nhi</s>\n[cmd]!go</s>\n>");
    match tok.apply_chat_template(&[], true) {
        Err(TokenizerError::TemplateException { message }) => {
            assert_eq!(message, "need at least one message")
        }
        other => panic!("expected TemplateException, got {other:?}"),
    }
}

#[test]
fn broken_template_fails_only_when_applied() {
    let config = r#"{"chat_template": "{% for m in messages %}{{ m.content }"}"#;
    let Some(dir) = synthetic_dir(Some(config), None) else {
        return;
    };
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert!(tok.has_chat_template());
    assert!(matches!(
        tok.apply_chat_template(&[user("Hi")], true),
        Err(TokenizerError::Template { .. })
    ));
    let undefined_call = r#"{"chat_template": "{{ no_such_function() }}"}"#;
    let Some(dir) = synthetic_dir(Some(undefined_call), None) else {
        return;
    };
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert!(matches!(
        tok.apply_chat_template(&[user("Hi")], true),
        Err(TokenizerError::Template { .. })
    ));
}

#[test]
fn bos_is_prepended_only_without_a_post_processor() {
    let Some(src) = stories_tokenizer_json() else {
        return;
    };
    let json = std::fs::read_to_string(&src).expect("reading tokenizer.json");
    let mut parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    parsed["post_processor"] = serde_json::Value::Null;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), parsed.to_string()).unwrap();
    let config = |add: bool| format!(r#"{{"add_bos_token": {add}, "bos_token": "<s>"}}"#);
    std::fs::write(dir.path().join("tokenizer_config.json"), config(true)).unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let plain = tok.encode("Once upon", false).unwrap();
    let ids = tok.encode("Once upon", true).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(&ids[1..], &plain[..]);
    // Text that already starts with BOS does not get a second one.
    let ids = tok.encode("<s>Once upon", true).unwrap();
    assert_eq!(ids.iter().take_while(|&&t| t == 1).count(), 1);
    std::fs::write(dir.path().join("tokenizer_config.json"), config(false)).unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.encode("Once upon", true).unwrap(), plain);
}

#[test]
fn missing_and_malformed_files_are_reported_with_their_path() {
    let dir = tempfile::tempdir().unwrap();
    match Tokenizer::from_dir(dir.path()) {
        Err(TokenizerError::MissingFile { path }) => {
            assert_eq!(path, dir.path().join("tokenizer.json"))
        }
        other => panic!("expected MissingFile, got {:?}", other.err()),
    }
    std::fs::write(dir.path().join("tokenizer.json"), "{ not json").unwrap();
    match Tokenizer::from_dir(dir.path()) {
        Err(TokenizerError::Parse { path, .. }) => {
            assert_eq!(path, dir.path().join("tokenizer.json"))
        }
        other => panic!("expected Parse, got {:?}", other.err()),
    }
    let Some(dir) = synthetic_dir(Some("[1, 2"), None) else {
        return;
    };
    match Tokenizer::from_dir(dir.path()) {
        Err(TokenizerError::Parse { path, .. }) => {
            assert_eq!(path, dir.path().join("tokenizer_config.json"))
        }
        other => panic!("expected Parse, got {:?}", other.err()),
    }
}

/// Streams `output` through a detokenizer and checks every push for split characters.
fn stream(tok: &Tokenizer, prompt: &[TokenId], output: &[TokenId], skip: bool) -> String {
    let mut detok = IncrementalDetokenizer::new(prompt, skip);
    let mut streamed = String::new();
    for &t in output {
        let piece = detok.push(tok, t).unwrap();
        assert!(
            !piece.contains(char::REPLACEMENT_CHARACTER),
            "split char in {piece:?}"
        );
        streamed.push_str(&piece);
    }
    streamed.push_str(&detok.flush(tok).unwrap());
    assert_eq!(streamed, detok.output_text());
    streamed
}

#[test]
fn incremental_detokenization_equals_full_decode() {
    for name in ["stories260K", "smollm2-135m-instruct"] {
        let Some(tok) = shared(name) else { continue };
        let long = UNICODE_TEXT.repeat(3);
        let ids = tok.encode(&long, false).unwrap();
        assert!(ids.len() > 100);
        assert_eq!(
            stream(&tok, &[], &ids, true),
            tok.decode(&ids, true).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn incremental_detokenization_after_a_prompt_keeps_the_leading_space() {
    for name in ["stories260K", "smollm2-135m-instruct"] {
        let Some(tok) = shared(name) else { continue };
        let prompt_text = "Once upon a time";
        let full = tok
            .encode(
                &format!("{prompt_text} there was a 🦀 named 日本語 Bob."),
                true,
            )
            .unwrap();
        let prompt_len = tok.encode(prompt_text, true).unwrap().len();
        let (prompt, output) = full.split_at(prompt_len);
        let full_text = tok.decode(&full, true).unwrap();
        let prompt_decoded = tok.decode(prompt, true).unwrap();
        let expected = full_text.strip_prefix(prompt_decoded.as_str()).unwrap();
        assert!(expected.starts_with(" there"), "{name}: {expected:?}");
        assert_eq!(stream(&tok, prompt, output, true), expected, "{name}");
    }
}

#[test]
fn incremental_detokenization_respects_skip_special_tokens() {
    let Some(tok) = shared("smollm2-135m-instruct") else {
        return;
    };
    let mut output = tok.encode("Hi there", false).unwrap();
    output.push(2);
    assert_eq!(stream(&tok, &[1], &output, true), "Hi there");
    assert_eq!(stream(&tok, &[1], &output, false), "Hi there<|im_end|>");
}

#[test]
fn flush_emits_a_trailing_incomplete_character() {
    let Some(tok) = shared("stories260K") else {
        return;
    };
    // Stories260K spells 🦀 with four byte-fallback tokens; stop after two of them.
    let ids = tok.encode("a🦀", false).unwrap();
    let cut = &ids[..ids.len() - 2];
    let mut detok = IncrementalDetokenizer::new(&[], true);
    let pushed: String = cut.iter().map(|&t| detok.push(&tok, t).unwrap()).collect();
    assert_eq!(pushed, "a");
    let rest = detok.flush(&tok).unwrap();
    assert!(rest.contains(char::REPLACEMENT_CHARACTER), "{rest:?}");
    assert_eq!(detok.output_text(), tok.decode(cut, true).unwrap());
}

#[test]
fn tokenizer_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
    assert_send_sync::<IncrementalDetokenizer>();
}

// --- Long texts in pieces -----------------------------------------------------------------------

/// Words for texts that exercise the cut places: letters, digits, punctuation, newlines, runs
/// of spaces, non-ASCII letters, a combining mark, a no-break space, an emoji and added tokens.
const PIECE_WORDS: [&str; 24] = [
    "the",
    "Router",
    "keys",
    "blocks",
    "2048",
    "x7",
    "a.b",
    "it's",
    "don't",
    "\n",
    "\n\n",
    "  ",
    "\t",
    "café",
    "中文",
    "e\u{301}",
    "\u{a0}",
    "🙂",
    "<|im_start|>",
    "<|im_end|>",
    "(x)",
    "--",
    "3.14",
    "ÉTÉ",
];

/// A text of `n` words drawn by `pick` (an index per word), joined by single spaces.
fn piece_text(picks: &[usize]) -> String {
    let words: Vec<&str> = picks
        .iter()
        .map(|&i| PIECE_WORDS[i % PIECE_WORDS.len()])
        .collect();
    words.join(" ")
}

/// A tokenizer directory whose tokenizer.json is `model`'s with `edit` applied.
fn edited_tokenizer(model: &str, edit: impl FnOnce(&mut Value)) -> Option<Tokenizer> {
    let src = shared_models::shared_model(model)?;
    let mut json: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    edit(&mut json);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
    Some(Tokenizer::from_dir(dir.path()).unwrap())
}

/// The tokenizers whose long texts are cut, each with a twin that encodes whole: SmolLM2's
/// (GPT-2 byte level with digits split), the same vocabulary behind Llama 3's and Qwen 2's
/// split patterns, and stories260K's vocabulary behind a splitting Metaspace.
fn piece_tokenizers() -> Vec<(&'static str, Tokenizer, Tokenizer)> {
    let mut out = Vec::new();
    for (i, pattern) in super::pieces::SPLIT_PATTERN_NAMES.iter().enumerate() {
        let edit = |j: &mut Value| {
            j["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": super::pieces::split_pattern(i)},
                 "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                 "use_regex": false}]});
        };
        if let (Some(a), Some(b)) = (
            edited_tokenizer("smollm2-135m-instruct", edit),
            edited_tokenizer("smollm2-135m-instruct", edit),
        ) {
            out.push((*pattern, a, b));
        }
    }
    let metaspace = |j: &mut Value| {
        j["normalizer"] = Value::Null;
        j["pre_tokenizer"] = serde_json::json!({"type": "Metaspace", "replacement": "▁",
            "prepend_scheme": "first", "split": true});
    };
    if let (Some(a), Some(b)) = (
        edited_tokenizer("stories260K", metaspace),
        edited_tokenizer("stories260K", metaspace),
    ) {
        out.push(("Metaspace", a, b));
    }
    if let (Some(a), Some(b)) = (
        shared("smollm2-135m-instruct"),
        shared("smollm2-135m-instruct"),
    ) {
        out.push(("SmolLM2", a, b));
    }
    for (name, t, _) in &mut out {
        t.encode_in_pieces(true, 1 << 20)
            .unwrap_or_else(|why| panic!("{name} qualifies: {why}"));
    }
    out
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(8))]

    /// In pieces (in parallel, then again from the cache, then a text sharing a stretch with
    /// it) the ids are exactly those of the whole, with and without special tokens.
    #[test]
    fn pieces_give_exactly_the_ids_of_the_whole(
        picks in proptest::collection::vec(0usize..1000, 150..700),
        at in 0usize..100,
    ) {
        let text = piece_text(&picks);
        let cut = at * picks.len() / 100;
        let variant = format!("{} changed {}", piece_text(&picks[..cut]), piece_text(&picks[cut..]));
        for (name, pieces, whole) in piece_tokenizers() {
            for t in [&text, &text, &variant] {
                for special in [true, false] {
                    proptest::prop_assert_eq!(
                        pieces.encode(t, special).unwrap(),
                        whole.encode(t, special).unwrap(),
                        "{} (special tokens: {})", name, special
                    );
                }
            }
        }
    }
}

#[test]
fn cuts_fall_before_a_space_after_a_letter_or_digit_and_realign_after_a_change() {
    let picks: Vec<usize> = (0..3000).map(|i| i * 7 + i / 3).collect();
    let text = piece_text(&picks);
    let pieces = super::pieces::cut(&text);
    assert!(pieces.len() > 10, "{} pieces", pieces.len());
    assert_eq!(pieces.concat(), text);
    for p in &pieces[1..] {
        assert!(p.starts_with(' '), "{p:?}");
    }
    for (a, _) in pieces.iter().zip(&pieces[1..]) {
        assert!(a.len() >= 256, "{} bytes", a.len());
        assert!(a.as_bytes()[a.len() - 1].is_ascii_alphanumeric(), "{a:?}");
    }
    // A text with something inserted near its start cuts the rest of it the same way.
    let changed = format!("an inserted sentence {text}");
    let again = super::pieces::cut(&changed);
    let shared = pieces.iter().filter(|p| again.contains(p)).count();
    assert!(
        shared + 3 >= pieces.len(),
        "{shared} of {} pieces shared",
        pieces.len()
    );
}

#[test]
fn tokenizers_that_cannot_be_cut_exactly_say_why_and_encode_whole() {
    // stories260K: a Prepend normalizer and no pre-tokenizer (one word for the whole text).
    if let Some(mut t) = shared("stories260K") {
        let why = t.encode_in_pieces(true, 0).unwrap_err();
        assert!(why.contains("normalizer"), "{why}");
        let text = piece_text(&(0..400).collect::<Vec<_>>());
        assert_eq!(
            t.encode(&text, true).unwrap(),
            shared("stories260K").unwrap().encode(&text, true).unwrap()
        );
    }
    type Edit = fn(&mut Value);
    let refused: [(&str, Edit); 4] = [
        (
            "truncates",
            |j| j["truncation"] = serde_json::json!({"direction": "Right", "max_length": 512, "strategy": "LongestFirst", "stride": 0}),
        ),
        (
            "pre-tokenizer",
            |j| j["pre_tokenizer"] = serde_json::json!({"type": "Split", "pattern": {"Regex": "\\s+\\S"}, "behavior": "Isolated", "invert": false}),
        ),
        (
            "no pre-tokenizer splits",
            |j| {
                j["pre_tokenizer"] =
                    serde_json::json!({"type": "Digits", "individual_digits": true})
            },
        ),
        ("added token", |j| {
            j["added_tokens"].as_array_mut().unwrap().push(serde_json::json!({"id": 49152, "content": "two words", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": false}))
        }),
    ];
    for (why, edit) in refused {
        if let Some(mut t) = edited_tokenizer("smollm2-135m-instruct", edit) {
            let e = t.encode_in_pieces(true, 0).unwrap_err();
            assert!(e.contains(why), "{e:?} should say {why:?}");
        }
    }
}

// --- Byte-level words, fast ---------------------------------------------------------------------

/// Fragments of texts for the byte-level fast path: every class its split pattern tells apart
/// (letters of several scripts, marks, digits and other numbers, whitespace of every kind with
/// and without line breaks, contractions in both cases, punctuation, symbols, controls).
const BYTE_LEVEL_FRAGMENTS: [&str; 40] = [
    "a", "Zx", "é", "ſ", "\u{212a}", "中文", "e\u{301}", "\u{301}", "0", "42", "٣", "½", "Ⅻ", " ",
    "  ", "   ", "\t", "\n", "\r\n", "\r", "\n\n", "\u{a0}", "\u{3000}", "\u{85}", "\u{2028}", "'",
    "'s", "'S", "'ll", "'RE", "'t", ".", ",", "🙂", "-", "$", "!?", "\u{200b}", "\u{7f}", "\u{0}",
];

/// SmolLM2's tokenizer.json with `edit` applied, and its serialized form as the crate reads it.
fn raw_byte_level(edit: impl FnOnce(&mut Value)) -> Option<(Value, tokenizers::Tokenizer)> {
    let src = shared_models::shared_model("smollm2-135m-instruct")?;
    let mut json: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    edit(&mut json);
    let t: tokenizers::Tokenizer = json.to_string().parse().unwrap();
    Some((serde_json::to_value(&t).unwrap(), t))
}

/// SmolLM2's own pre-tokenizer (digits apart, then GPT-2's pattern), GPT-2's pattern alone,
/// and Llama 3's and Qwen 2's split patterns, all over SmolLM2's vocabulary.
type ByteLevelCase = (String, tokenizers::Tokenizer, super::byte_level::ByteLevel);
fn byte_level_tokenizers() -> Vec<ByteLevelCase> {
    // Each case's pre-tokenizer (None: SmolLM2's own).
    let mut cases: Vec<(String, Option<Value>)> = vec![
        ("SmolLM2".into(), None),
        (
            "GPT-2".into(),
            Some(serde_json::json!({"type": "ByteLevel",
                "add_prefix_space": false, "trim_offsets": true, "use_regex": true})),
        ),
    ];
    for (i, name) in super::pieces::SPLIT_PATTERN_NAMES.iter().enumerate() {
        cases.push((
            name.to_string(),
            Some(serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": super::pieces::split_pattern(i)},
                 "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                 "use_regex": false}]})),
        ));
    }
    let patterns: Vec<&str> = (0..super::pieces::SPLIT_PATTERN_NAMES.len())
        .map(super::pieces::split_pattern)
        .collect();
    cases
        .into_iter()
        .filter_map(|(name, pre)| {
            let (form, t) = raw_byte_level(|j| {
                if let Some(pre) = pre {
                    j["pre_tokenizer"] = pre;
                }
            })?;
            let fast = super::byte_level::ByteLevel::new(&form, &patterns)
                .unwrap_or_else(|why| panic!("{name} qualifies: {why}"));
            Some((name, t, fast))
        })
        .collect()
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]

    /// The fast path's ids are exactly the tokenizers crate's, on every tokenizer it takes.
    #[test]
    fn byte_level_fast_path_gives_exactly_the_crates_ids(
        picks in proptest::collection::vec(0usize..BYTE_LEVEL_FRAGMENTS.len(), 0..40),
    ) {
        static TOKENIZERS: std::sync::LazyLock<Vec<ByteLevelCase>> =
            std::sync::LazyLock::new(byte_level_tokenizers);
        let text: String = picks.iter().map(|&i| BYTE_LEVEL_FRAGMENTS[i]).collect();
        for (name, t, fast) in TOKENIZERS.iter() {
            let want = t.encode_fast(text.as_str(), false).unwrap().get_ids().to_vec();
            let got = fast.encode(t.get_model(), &text).expect("no added token").unwrap();
            proptest::prop_assert_eq!(got, want, "{} on {:?}", name, text);
        }
    }
}

#[test]
fn byte_level_fast_path_leaves_added_tokens_and_other_tokenizers_to_the_crate() {
    let Some((form, t)) = raw_byte_level(|_| {}) else {
        return;
    };
    let fast = super::byte_level::ByteLevel::new(&form, &[]).unwrap();
    assert!(fast.encode(t.get_model(), "hi <|im_start|>user").is_none());
    // A long real-looking text: the same ids as the crate's. (Every added token of SmolLM2's
    // starts with `<`: without it the README holds none, whatever it comes to say.)
    let text = std::fs::read_to_string("README.md")
        .unwrap()
        .replace('<', "‹");
    assert!(form["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a["content"].as_str().unwrap().starts_with('<')));
    assert_eq!(
        fast.encode(t.get_model(), &text).unwrap().unwrap(),
        t.encode_fast(text.as_str(), false).unwrap().get_ids()
    );
    type Edit = fn(&mut Value);
    let refused: [(&str, Edit); 4] = [
        ("normalizes", |j| {
            j["normalizer"] = serde_json::json!({"type": "NFC"})
        }),
        ("pre-tokenizer", |j| {
            j["pre_tokenizer"] = serde_json::json!({"type": "ByteLevel",
                "add_prefix_space": true, "trim_offsets": true, "use_regex": true})
        }),
        ("split pattern", |j| {
            j["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": "\\s+|\\S+"},
                 "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                 "use_regex": false}]})
        }),
        ("BPE", |j| j["model"]["dropout"] = serde_json::json!(0.1)),
    ];
    for (why, edit) in refused {
        let (form, _) = raw_byte_level(edit).unwrap();
        let e = super::byte_level::ByteLevel::new(&form, &[]).err().unwrap();
        assert!(e.contains(why), "{e:?} should say {why:?}");
    }
}
