//! Property-based fuzzing of llmd's untrusted inputs, bounded for CI: safetensors files and shard
//! indexes, KV block records, the KV event batches the router receives from workers,
//! `config.json` (parsed, and loaded by an engine), `tokenizer_config.json` with chat templates,
//! and HTTP bodies against the OpenAI routes. Each property must answer — `Ok`, a typed
//! error, a 4xx in OpenAI's shape — never panic, hang or answer 5xx.
//!
//! `LLMD_FUZZ_CASES` sets the cases per property (default below); `LLMD_FUZZ_SEED` replays a
//! failure. `cargo bench --bench fuzz` runs the same properties far longer. The generators and
//! properties live in `common/fuzz_props.rs`; the regression tests at the end pin the bugs these
//! properties found.
mod common;
#[path = "common/fuzz_props.rs"]
mod fuzz_props;

use fuzz_props::*;
use llmd::model::{ModelError, WeightFiles};
use std::path::PathBuf;

/// Cases per property in CI: the whole file runs in well under a minute on two cores (most
/// cases take well under a millisecond; a template burning its fuel takes up to a second).
const CI_CASES: u32 = 1000;

/// Prints what a property did (shown with `--nocapture`).
fn report(r: Report) {
    println!(
        "{}: {} cases in {:.1} s",
        r.name,
        r.cases,
        r.elapsed.as_secs_f64()
    );
}

/// stories260K, or `None` to skip where it is absent; under CI a missing model fails instead.
fn stories() -> Option<PathBuf> {
    // Skips outside CI; a failure under CI (see `common::shared_model`).
    common::shared_model("stories260K")
}

#[test]
fn safetensors_files() {
    report(check(
        "safetensors_files",
        cases(CI_CASES),
        seed(),
        st_bytes(),
        check_safetensors_file,
    ));
}

#[test]
fn safetensors_well_formed_roundtrip() {
    report(check(
        "safetensors_well_formed_roundtrip",
        cases(CI_CASES),
        seed(),
        st_file_valid(),
        check_safetensors_roundtrip,
    ));
}

#[test]
fn safetensors_sharded() {
    report(check(
        "safetensors_sharded",
        cases(CI_CASES),
        seed(),
        sharded_case(),
        check_safetensors_sharded,
    ));
}

#[test]
fn kv_block_records() {
    report(check(
        "kv_block_records",
        cases(CI_CASES),
        seed(),
        kv_record_case(),
        check_kv_record,
    ));
}

/// The router's decoder of the workers' KV event batches (a worker is a network peer).
#[test]
fn kv_event_batches() {
    report(check(
        "kv_event_batches",
        cases(CI_CASES),
        seed(),
        kv_batch_case(),
        check_kv_batch,
    ));
}

#[test]
fn config_json() {
    report(check(
        "config_json",
        cases(CI_CASES),
        seed(),
        config_text(),
        check_config,
    ));
}

#[test]
fn config_json_in_engine() {
    let Some(model) = stories() else { return };
    report(check(
        "config_json_in_engine",
        cases(CI_CASES),
        seed(),
        engine_config_case(&model),
        |case| check_engine_config(model.clone(), case),
    ));
}

#[test]
fn tokenizer_config_json() {
    let Some(model) = stories() else { return };
    report(check(
        "tokenizer_config_json",
        cases(CI_CASES),
        seed(),
        tokenizer_case(),
        |case| check_tokenizer(model.clone(), case),
    ));
}

#[test]
fn http_bodies() {
    let Some(model) = stories() else { return };
    let server = HttpServer::new(&model);
    report(check(
        "http_bodies",
        cases(CI_CASES),
        seed(),
        http_case(),
        |case| check_http(&server, case),
    ));
}

// ---------------------------------------------------------------------------------------------
// Regressions: the bugs the properties above found, pinned as plain tests.
// ---------------------------------------------------------------------------------------------

/// Offsets chaining up to near `usize::MAX` made safetensors 0.8 overflow (a panic in debug
/// builds) while checking them against the file size; `WeightFiles::open` now refuses them first.
#[test]
fn offsets_near_usize_max_are_corrupt_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("model.safetensors"),
        huge_chain(0, 0).bytes(),
    );
    match WeightFiles::open(dir.path()) {
        Err(ModelError::CorruptWeights { reason, .. }) => {
            assert!(reason.contains("past the end of the file"), "{reason}")
        }
        other => panic!("{:?}", other.err()),
    }
}

/// A shard index may only name files of the model directory, as the hub fetcher requires:
/// `../x` and `/x` read files elsewhere, and non-string values were silently skipped.
#[test]
fn shard_index_names_only_plain_files() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    let valid = small_valid_st_file().bytes();
    write(&root.path().join("outside.safetensors"), &valid);
    for target in [
        "\"../outside.safetensors\"",
        "\"/etc/hostname\"",
        "\".\"",
        "5",
        "null",
    ] {
        let index = format!("{{\"weight_map\":{{\"model.norm.weight\":{target}}}}}");
        write(&dir.join("model.safetensors.index.json"), index.as_bytes());
        match WeightFiles::open(&dir) {
            Err(ModelError::CorruptWeights { reason, .. }) => {
                assert!(reason.contains("is not a file name"), "{target}: {reason}")
            }
            other => panic!("{target}: {:?}", other.err()),
        }
    }
}

/// An engine on stories260K's weights whose config.json says `num_hidden_layers`.
fn engine_with_layers(
    model: &std::path::Path,
    layers: &str,
    block_size: usize,
) -> llmd::Result<()> {
    let config = std::fs::read_to_string(model.join("config.json")).unwrap();
    let config = config.replace(
        "\"num_hidden_layers\": 5",
        &format!("\"num_hidden_layers\": {layers}"),
    );
    let dir = model_dir_with_config(model, &config);
    let mut c = llmd::EngineConfig::new(dir.path());
    c.num_threads = Some(1);
    c.cache.num_blocks = Some(64);
    c.cache.block_size = block_size;
    llmd::EngineCore::new(c).map(|_| ())
}

/// The loader reserved `num_hidden_layers` layers before finding their weights: 2^40 aborted
/// the process on the allocation. Now the first missing layer is the error.
#[test]
fn absurd_layer_count_is_a_missing_tensor_not_an_abort() {
    let Some(model) = stories() else { return };
    match engine_with_layers(&model, "1099511627776", 16) {
        Err(llmd::Error::Model(ModelError::MissingTensor { name })) => {
            assert!(name.starts_with("model.layers.5."), "{name}")
        }
        other => panic!("{other:?}"),
    }
}

/// The KV bytes of one block overflowed (a panic in debug builds, a division by zero after
/// wrapping in release ones) with a huge block size.
#[test]
fn kv_block_size_overflow_is_a_config_error() {
    let Some(model) = stories() else { return };
    match engine_with_layers(&model, "5", 1 << 62) {
        Err(llmd::Error::Config { field, .. }) => assert_eq!(field, "block_size"),
        other => panic!("{other:?}"),
    }
}

/// `max_tokens` near `usize::MAX` overflowed the context-length sums, in the server and in the
/// engine: now a 400 naming the context length, and `PromptTooLong`.
#[test]
fn huge_max_tokens_is_refused_not_a_panic() {
    let Some(model) = stories() else { return };
    let server = HttpServer::new(&model);
    for (path, body) in [
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"system","content":"Once upon a time"}],"max_tokens":18446744073709551615}"#,
        ),
        (
            "/v1/completions",
            r#"{"prompt":"Once upon a time","max_tokens":18446744073709551615}"#,
        ),
    ] {
        let case = HttpCase {
            path,
            content_type: Some("application/json"),
            templated: false,
            body: Bytes(body.as_bytes().to_vec()),
        };
        check_http(&server, case).unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    let mut c = llmd::EngineConfig::new(&model);
    c.num_threads = Some(1);
    c.max_model_len = Some(64);
    c.cache.num_blocks = Some(8);
    let mut core = llmd::EngineCore::new(c).unwrap();
    let params = llmd::SamplingParams {
        max_tokens: Some(usize::MAX),
        ..llmd::SamplingParams::greedy()
    };
    let prompt = llmd::Prompt::Tokens(vec![1, 2, 3]);
    assert!(matches!(
        core.add_request("r".into(), &prompt, params, 0),
        Err(llmd::Error::PromptTooLong { .. })
    ));
}

/// Bodies over the 32 MiB limit are a 413 in OpenAI's shape (too slow to generate per case).
#[test]
fn oversized_body_is_413() {
    let Some(model) = stories() else { return };
    let server = HttpServer::new(&model);
    let body = format!("{{\"prompt\":\"{}\"}}", "a".repeat(33 << 20));
    let case = HttpCase {
        path: "/v1/completions",
        content_type: Some("application/json"),
        templated: false,
        body: Bytes(body.into_bytes()),
    };
    check_http(&server, case).unwrap();
}
