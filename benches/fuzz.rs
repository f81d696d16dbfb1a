//! The fuzzing properties of `tests/fuzz.rs`, run long: many more cases per property than CI
//! affords, to find what a bounded run misses. Prints the cases run, the wall time and the seed
//! of each property; a failure panics with the shrunk input and the seed that replays it.
//!
//! Knobs (environment): `LLMD_FUZZ_CASES` (cases per property, default 20000), `LLMD_FUZZ_SEED`
//! (replay), `LLMD_FUZZ_ONLY` (comma list of property names to run).
//!
//! `cargo bench` builds with the release profile, where integer overflow wraps instead of
//! panicking; `cargo bench --bench fuzz --profile dev` keeps the overflow checks of the tests.
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/fuzz_props.rs"]
mod fuzz_props;

use fuzz_props::*;

fn main() {
    let cases = cases(20_000);
    let seed = seed();
    let only: Option<Vec<String>> = std::env::var("LLMD_FUZZ_ONLY")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    let wanted = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|n| n == name));
    let model = common::shared_model("stories260K")
        .expect("the fuzz bench needs shared/models/stories260K");
    println!("fuzz: seed {seed}");
    if wanted("safetensors_files") {
        print(check(
            "safetensors_files",
            cases,
            seed,
            st_bytes(),
            check_safetensors_file,
        ));
    }
    if wanted("safetensors_well_formed_roundtrip") {
        print(check(
            "safetensors_well_formed_roundtrip",
            cases,
            seed,
            st_file_valid(),
            check_safetensors_roundtrip,
        ));
    }
    if wanted("kv_block_records") {
        print(check(
            "kv_block_records",
            cases,
            seed,
            kv_record_case(),
            check_kv_record,
        ));
    }
    if wanted("kv_event_batches") {
        print(check(
            "kv_event_batches",
            cases,
            seed,
            kv_batch_case(),
            check_kv_batch,
        ));
    }
    if wanted("safetensors_sharded") {
        print(check(
            "safetensors_sharded",
            cases,
            seed,
            sharded_case(),
            check_safetensors_sharded,
        ));
    }
    if wanted("config_json") {
        print(check(
            "config_json",
            cases,
            seed,
            config_text(),
            check_config,
        ));
    }
    if wanted("config_json_in_engine") {
        print(check(
            "config_json_in_engine",
            cases,
            seed,
            engine_config_case(&model),
            |case| check_engine_config(model.clone(), case),
        ));
    }
    if wanted("tokenizer_config_json") {
        print(check(
            "tokenizer_config_json",
            cases,
            seed,
            tokenizer_case(),
            |case| check_tokenizer(model.clone(), case),
        ));
    }
    if wanted("http_bodies") {
        let server = HttpServer::new(&model);
        print(check("http_bodies", cases, seed, http_case(), |case| {
            check_http(&server, case)
        }));
    }
}

/// One line per property, as soon as it is done (a long run takes minutes per property).
fn print(r: Report) {
    println!(
        "{:<36} {:>7} cases {:>9.1} s {:>9.2} ms/case",
        r.name,
        r.cases,
        r.elapsed.as_secs_f64(),
        r.elapsed.as_secs_f64() * 1e3 / f64::from(r.cases.max(1))
    );
}
