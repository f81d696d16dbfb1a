//! Generators and properties for fuzzing everything llmd reads from outside: safetensors files
//! and their shard index, `config.json`, `tokenizer_config.json` / `generation_config.json` with
//! their chat templates, and the HTTP bodies of the OpenAI routes.
//!
//! The property everywhere: an answer — `Ok`, a typed error, or a 4xx carrying an OpenAI error
//! object — within a deadline; never a panic, a hang or a 5xx. Where an answer is `Ok`, what the
//! engine derives from it next must hold too (tensor bytes inside the file, finite rotary tables,
//! a model that loads and steps).
//!
//! Shared by `tests/fuzz.rs` (bounded, for CI) and `benches/fuzz.rs` (long runs), which include this
//! file by path; `tests/common/mod.rs` does not, so other test binaries do not build it. Failures
//! name the seed (`LLMD_FUZZ_SEED`) that replays them with the same `LLMD_FUZZ_CASES`.
use llmd::model::{ModelConfig, ModelError, WeightFiles};
use llmd::tokenizer::{ChatMessage, Tokenizer, TokenizerError};
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Running properties
// ---------------------------------------------------------------------------------------------

/// Cases per property: `LLMD_FUZZ_CASES` when set, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("LLMD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `LLMD_FUZZ_SEED` when set (to replay a failure), else a fresh seed, so CI explores new cases
/// on every run.
pub fn seed() -> u64 {
    use std::hash::BuildHasher;
    std::env::var("LLMD_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::collections::hash_map::RandomState::new().hash_one(Instant::now()))
}

/// What one property run did.
#[derive(Clone, Debug)]
pub struct Report {
    pub name: &'static str,
    pub cases: u32,
    pub elapsed: Duration,
}

/// Runs `test` on `cases` inputs drawn from `strategy` with the RNG seeded by `seed`. Panics on
/// the first failure with the shrunk input and the seed.
pub fn check<S>(
    name: &'static str,
    cases: u32,
    seed: u64,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) -> Report
where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases,
        // Failures are replayed by seed; no regression files are written.
        failure_persistence: None,
        // A hang costs a whole case deadline per shrink step: bound the shrinking.
        max_shrink_time: 60_000,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &key));
    let start = Instant::now();
    match runner.run(&strategy, test) {
        Ok(()) => Report {
            name,
            cases,
            elapsed: start.elapsed(),
        },
        Err(TestError::Fail(why, input)) => panic!(
            "property {name} failed: {why}\nminimal input: {input:#?}\nreplay: LLMD_FUZZ_SEED={seed} LLMD_FUZZ_CASES={cases}"
        ),
        Err(TestError::Abort(why)) => panic!("property {name} aborted: {why} (seed {seed})"),
    }
}

/// Runs `f` on its own thread (the default 2 MiB stack, as on tokio's workers) and fails the
/// case when it panics or has not finished within `limit`.
pub fn within<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, TestCaseError> {
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::Builder::new()
        .name("fuzz-case".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| TestCaseError::fail(format!("cannot spawn the case thread: {e}")))?;
    match rx.recv_timeout(limit) {
        Ok(v) => {
            let _ = worker.join();
            Ok(v)
        }
        // The thread is left running: there is no way to stop it, and the run fails anyway.
        Err(RecvTimeoutError::Timeout) => Err(TestCaseError::fail(format!(
            "no answer within {limit:?}: a hang"
        ))),
        Err(RecvTimeoutError::Disconnected) => {
            let why = match worker.join() {
                Err(payload) => panic_message(payload.as_ref()),
                Ok(()) => "the case thread ended without a result".to_string(),
            };
            Err(TestCaseError::fail(format!("panicked: {why}")))
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".to_string())
}

/// Deadline of one file or config case: generous, as debug builds on a loaded CI machine are slow.
const CASE_LIMIT: Duration = Duration::from_secs(30);

/// File or body bytes, shown escaped (`b"..."`) in failure reports rather than one number a line.
#[derive(Clone)]
pub struct Bytes(pub Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "b\"{}\" ({} bytes)", self.0.escape_ascii(), self.0.len())
    }
}

pub fn write(path: &Path, bytes: impl AsRef<[u8]>) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

// ---------------------------------------------------------------------------------------------
// JSON building blocks
// ---------------------------------------------------------------------------------------------

/// JSON texts (some of them not JSON at all) that break naive parsing: numbers past every
/// integer and float range, negative and fractional counts, NaN spelled as strings, lone
/// surrogates, wrong container types.
pub const HOSTILE: &[&str] = &[
    "null",
    "true",
    "false",
    "0",
    "-0",
    "1",
    "-1",
    "2",
    "0.5",
    "-0.5",
    "1e300",
    "-1e300",
    "1e308",
    "1e400",
    "-1e400",
    "1e-400",
    "4294967295",
    "4294967296",
    "9007199254740993",
    "9223372036854775807",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "-9223372036854775809",
    "123456789012345678901234567890",
    "\"NaN\"",
    "\"Infinity\"",
    "\"-1\"",
    "\"1e300\"",
    "\"\"",
    "\"\\ud800\"",
    "\"\\u0000\"",
    "\"\\udfff\\ud800\"",
    "[]",
    "{}",
    "[null]",
    "[[]]",
    "[-1]",
    "[18446744073709551615]",
    "{\"a\":1}",
    "NaN",
    "Infinity",
    "-Infinity",
    "undefined",
    "01",
    "1.",
    ".5",
    "+1",
    "0x10",
    "'x'",
];

/// Strings that stress text handling: empty, NUL, BOM, bidi overrides, combining marks,
/// special-token look-alikes, template and JSON syntax.
const WEIRD_STRINGS: &[&str] = &[
    "",
    " ",
    "\0",
    "\u{feff}",
    "\u{202e}abc",
    "a\u{301}\u{301}\u{301}",
    "🦀🦀",
    "\u{10ffff}",
    "\r\n\t",
    "<s>",
    "</s>",
    "<unk>",
    "<|im_end|>",
    "{{ 1 }}",
    "{% if %}",
    "\\",
    "\"",
    "Once upon a time",
];

/// A string from the lists above, random printable or control text, or a long one.
pub fn weird_string() -> BoxedStrategy<String> {
    prop_oneof![
        4 => select(WEIRD_STRINGS).prop_map(str::to_string),
        4 => "\\PC{0,24}",
        2 => ".{0,12}",
        1 => (1usize..20_000).prop_map(|n| "ab ".repeat(n)),
    ]
    .boxed()
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string())
}

/// JSON (as text) nested `depth` levels: arrays, objects, or both alternating.
pub fn nested(depth: usize, kind: u8) -> String {
    let (open, close) = match kind % 3 {
        0 => ("[", "]"),
        1 => ("{\"a\":", "}"),
        _ => ("[{\"a\":", "}]"),
    };
    format!("{}1{}", open.repeat(depth), close.repeat(depth))
}

/// Nesting around serde_json's recursion limit (128) and far past it.
pub fn deep_json() -> BoxedStrategy<String> {
    prop_oneof![
        4 => (1usize..300, any::<u8>()).prop_map(|(d, k)| nested(d, k)),
        1 => (5_000usize..50_000, any::<u8>()).prop_map(|(d, k)| nested(d, k)),
    ]
    .boxed()
}

/// Arbitrary JSON values whose object keys are mostly `keys`, so random objects reach real
/// fields.
pub fn json_value(keys: &'static [&'static str]) -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        (0u64..16).prop_map(Value::from),
        weird_string().prop_map(Value::String),
    ];
    let key = prop_oneof![3 => select(keys).prop_map(str::to_string), 1 => "\\PC{0,8}"];
    leaf.prop_recursive(6, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
    .boxed()
}

/// A JSON text to put where a value goes: hostile literals, random values, deep nesting, weird
/// strings.
pub fn fragment(keys: &'static [&'static str]) -> BoxedStrategy<String> {
    prop_oneof![
        6 => select(HOSTILE).prop_map(str::to_string),
        3 => json_value(keys).prop_map(|v| v.to_string()),
        2 => weird_string().prop_map(|s| json_str(&s)),
        1 => deep_json(),
    ]
    .boxed()
}

/// How a JSON object given as `(key, value text)` pairs is damaged.
#[derive(Clone, Debug)]
pub enum Edit {
    /// Sets a key: replaces its value where present, else adds it.
    Set(String, String),
    Replace(Index, String),
    Remove(Index),
    Add(String, String),
    Duplicate(Index),
}

pub fn edit(keys: &'static [&'static str]) -> BoxedStrategy<Edit> {
    prop_oneof![
        4 => (any::<Index>(), fragment(keys)).prop_map(|(i, v)| Edit::Replace(i, v)),
        4 => (select(keys), fragment(keys)).prop_map(|(k, v)| Edit::Set(k.to_string(), v)),
        1 => any::<Index>().prop_map(Edit::Remove),
        1 => (select(keys), fragment(keys)).prop_map(|(k, v)| Edit::Add(k.to_string(), v)),
        1 => any::<Index>().prop_map(Edit::Duplicate),
    ]
    .boxed()
}

/// `fields` with `edits` applied, as an object's text.
pub fn object_text(fields: &[(String, String)], edits: &[Edit]) -> String {
    let mut fields = fields.to_vec();
    for e in edits {
        match e {
            Edit::Replace(i, v) if !fields.is_empty() => {
                let i = i.index(fields.len());
                fields[i].1 = v.clone();
            }
            Edit::Remove(i) if !fields.is_empty() => {
                fields.remove(i.index(fields.len()));
            }
            Edit::Duplicate(i) if !fields.is_empty() => {
                let f = fields[i.index(fields.len())].clone();
                fields.push(f);
            }
            Edit::Add(k, v) => fields.push((k.clone(), v.clone())),
            Edit::Set(k, v) => match fields.iter_mut().find(|(key, _)| key == k) {
                Some(f) => f.1 = v.clone(),
                None => fields.push((k.clone(), v.clone())),
            },
            _ => {}
        }
    }
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}:{v}", json_str(k)))
        .collect();
    format!("{{{}}}", body.join(","))
}

/// The `(key, value text)` pairs of a JSON object.
pub fn object_fields(v: &Value) -> Vec<(String, String)> {
    v.as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.to_string())).collect())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// safetensors
// ---------------------------------------------------------------------------------------------

/// Every dtype safetensors 0.8 knows, spellings it does not, and non-strings.
const DTYPES: &[&str] = &[
    "\"F32\"",
    "\"F16\"",
    "\"BF16\"",
    "\"F64\"",
    "\"I64\"",
    "\"I32\"",
    "\"I16\"",
    "\"I8\"",
    "\"U8\"",
    "\"U16\"",
    "\"U32\"",
    "\"U64\"",
    "\"BOOL\"",
    "\"F8_E4M3\"",
    "\"F8_E5M2\"",
    "\"F4\"",
    "\"F6_E2M3\"",
    "\"E8M0\"",
    "\"f32\"",
    "\"\"",
    "\"F128\"",
    "17",
    "null",
    "[\"F32\"]",
];

/// Bits per element of a dtype text, `None` when safetensors does not accept it.
fn dtype_bits(dtype: &str) -> Option<u128> {
    Some(match dtype.trim_matches('"') {
        "F64" | "I64" | "U64" => 64,
        "F32" | "I32" | "U32" => 32,
        "F16" | "BF16" | "I16" | "U16" => 16,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" | "E8M0" => 8,
        "F6_E2M3" => 6,
        "F4" => 4,
        _ => return None,
    })
}

/// Dimensions whose products overflow usize, or that are no dimension at all.
const BAD_DIMS: &[&str] = &[
    "2147483648",
    "4294967296",
    "2305843009213693952",
    "4611686018427387904",
    "9223372036854775807",
    "18446744073709551615",
    "18446744073709551616",
    "-1",
    "1.5",
    "\"2\"",
    "null",
    "1e30",
    "-0",
];

/// How a tensor's `data_offsets` are written.
#[derive(Clone, Debug)]
pub enum Offsets {
    /// Where a correct writer puts them: right after the previous tensor, sized by the shape.
    Consistent,
    Raw(String, String),
    Reversed,
    /// Starting where the previous tensor starts.
    Overlap,
    Shift(i64),
    Missing,
    Triple,
}

#[derive(Clone, Debug)]
pub struct StTensor {
    pub name: String,
    pub dtype: String,
    /// JSON texts of the shape's entries.
    pub dims: Vec<String>,
    pub offsets: Offsets,
}

impl StTensor {
    /// Bytes the shape and dtype call for, when both are well formed.
    fn byte_size(&self) -> Option<u128> {
        let bits = dtype_bits(&self.dtype)?;
        let mut n: u128 = 1;
        for d in &self.dims {
            n = n.checked_mul(d.parse::<u64>().ok()? as u128)?;
        }
        n.checked_mul(bits).map(|b| b.div_ceil(8))
    }
}

/// The 8-byte header length at the start of the file.
#[derive(Clone, Debug)]
pub enum LenField {
    Exact,
    Delta(i64),
    Value(u64),
}

/// Damage done to the finished file's bytes.
#[derive(Clone, Debug)]
pub enum Damage {
    None,
    Truncate(Index),
    Flip(Vec<(Index, u8)>),
    /// A 0xff byte inside the JSON header (not UTF-8).
    NonUtf8,
}

#[derive(Clone, Debug)]
pub struct StFile {
    pub tensors: Vec<StTensor>,
    /// JSON text of `__metadata__`.
    pub metadata: Option<String>,
    /// Spaces after the JSON (safetensors pads headers with them).
    pub pad: usize,
    pub len_field: LenField,
    /// Data bytes beyond (or short of) what the offsets call for.
    pub extra_data: i64,
    /// Element pattern of the data: 0 finite f32/f16 values, 1 all 0xff (NaN), 2 zeros.
    pub fill: u8,
    pub damage: Damage,
}

/// Data sections are written only up to this size; larger ones are cut (and so invalid).
const MAX_DATA: u128 = 1 << 16;

impl StFile {
    /// The file's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let mut entries = Vec::new();
        if let Some(m) = &self.metadata {
            entries.push(format!("\"__metadata__\":{m}"));
        }
        let mut cur: i128 = 0;
        let mut prev_start: i128 = 0;
        for t in &self.tensors {
            let size = t.byte_size().unwrap_or(0).min(i128::MAX as u128 / 4) as i128;
            let offsets = match &t.offsets {
                Offsets::Consistent => Some(format!("[{},{}]", cur, cur + size)),
                Offsets::Raw(a, b) => Some(format!("[{a},{b}]")),
                Offsets::Reversed => Some(format!("[{},{}]", cur + size, cur)),
                Offsets::Overlap => Some(format!("[{},{}]", prev_start, prev_start + size)),
                Offsets::Shift(d) => {
                    let d = *d as i128;
                    Some(format!("[{},{}]", cur + d, cur + d + size))
                }
                Offsets::Missing => None,
                Offsets::Triple => Some(format!("[{},{},{}]", cur, cur + size, cur + size)),
            };
            let offsets = offsets
                .map(|o| format!(",\"data_offsets\":{o}"))
                .unwrap_or_default();
            entries.push(format!(
                "{}:{{\"dtype\":{},\"shape\":[{}]{offsets}}}",
                json_str(&t.name),
                t.dtype,
                t.dims.join(",")
            ));
            prev_start = cur;
            cur += size;
        }
        let mut header = format!("{{{}}}{}", entries.join(","), " ".repeat(self.pad)).into_bytes();
        if matches!(self.damage, Damage::NonUtf8) {
            header.insert(header.len().min(2), 0xff);
        }
        let data_len = (cur + self.extra_data as i128).clamp(0, MAX_DATA as i128) as usize;
        let len = match self.len_field {
            LenField::Exact => header.len() as u64,
            LenField::Delta(d) => (header.len() as u64).wrapping_add_signed(d),
            LenField::Value(v) => v,
        };
        let mut out = len.to_le_bytes().to_vec();
        out.extend_from_slice(&header);
        out.extend((0..data_len).map(|i| match self.fill {
            // Little-endian 1.0f32 (00 00 80 3f): finite read as f32, f16 (0 and 0x3f80 = 1.875)
            // and bf16 (0 and 1.0).
            0 => [0x00, 0x00, 0x80, 0x3f][i % 4],
            1 => 0xff,
            _ => 0,
        }));
        match &self.damage {
            Damage::Truncate(i) => out.truncate(i.index(out.len() + 1)),
            Damage::Flip(flips) => {
                for (i, x) in flips {
                    let i = i.index(out.len());
                    out[i] ^= x;
                }
            }
            Damage::None | Damage::NonUtf8 => {}
        }
        out
    }

    /// Whether the file is exactly what a correct writer produces.
    pub fn is_well_formed(&self) -> bool {
        let mut names: Vec<&str> = self.tensors.iter().map(|t| t.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names.len() == self.tensors.len()
            && self.tensors.iter().all(|t| {
                matches!(t.offsets, Offsets::Consistent)
                    && t.name != "__metadata__"
                    && t.byte_size().is_some_and(|s| s <= MAX_DATA)
                    // Sub-byte dtypes must fill whole bytes.
                    && t.byte_size().is_some_and(|s| {
                        dtype_bits(&t.dtype).is_some_and(|b| s * 8 == elements(t) * b)
                    })
            })
            && self.total_size() <= MAX_DATA
            && self
                .metadata
                .as_deref()
                .is_none_or(|m| m == "{\"format\":\"pt\"}")
            && matches!(self.len_field, LenField::Exact)
            && self.extra_data == 0
            && matches!(self.damage, Damage::None)
    }

    fn total_size(&self) -> u128 {
        self.tensors
            .iter()
            .map(|t| t.byte_size().unwrap_or(u128::MAX / 64))
            .sum()
    }

    /// Where each tensor's data starts in the file, for a well-formed file.
    fn data_start(&self) -> usize {
        let bytes = self.bytes();
        8 + u64::from_le_bytes(bytes[..8].try_into().unwrap_or_default()) as usize
    }
}

fn elements(t: &StTensor) -> u128 {
    t.dims
        .iter()
        .map(|d| d.parse::<u128>().unwrap_or(0))
        .product()
}

/// Names of real checkpoints and odd ones; a small pool, so duplicates occur.
const TENSOR_NAMES: &[&str] = &[
    "model.embed_tokens.weight",
    "model.norm.weight",
    "lm_head.weight",
    "a",
    "",
    "__metadata__",
    "🦀",
];

fn tensor(good: bool) -> BoxedStrategy<StTensor> {
    let name = prop_oneof![4 => select(TENSOR_NAMES).prop_map(str::to_string), 1 => "\\PC{0,8}"];
    if good {
        let dims = prop::collection::vec((1u64..6).prop_map(|d| d.to_string()), 0..3);
        let dtype = select(&DTYPES[..13]).prop_map(str::to_string);
        return (name, dtype, dims)
            .prop_map(|(name, dtype, dims)| StTensor {
                name,
                dtype,
                dims,
                offsets: Offsets::Consistent,
            })
            .boxed();
    }
    let dim = prop_oneof![
        6 => (0u64..6).prop_map(|d| d.to_string()),
        1 => select(BAD_DIMS).prop_map(str::to_string),
    ];
    let offset = prop_oneof![
        3 => (0u64..64).prop_map(|o| o.to_string()),
        1 => select(HOSTILE).prop_map(str::to_string),
    ];
    let offsets = prop_oneof![
        8 => Just(Offsets::Consistent),
        1 => (offset.clone(), offset).prop_map(|(a, b)| Offsets::Raw(a, b)),
        1 => Just(Offsets::Reversed),
        1 => Just(Offsets::Overlap),
        1 => (-8i64..8).prop_map(Offsets::Shift),
        1 => Just(Offsets::Missing),
        1 => Just(Offsets::Triple),
    ];
    (
        name,
        select(DTYPES).prop_map(str::to_string),
        prop::collection::vec(dim, 0..4),
        offsets,
    )
        .prop_map(|(name, dtype, dims, offsets)| StTensor {
            name,
            dtype,
            dims,
            offsets,
        })
        .boxed()
}

/// A file a correct writer could produce.
pub fn st_file_valid() -> BoxedStrategy<StFile> {
    (
        prop::collection::vec(tensor(true), 0..5),
        prop::option::of(Just("{\"format\":\"pt\"}".to_string())),
        0usize..8,
        0u8..3,
    )
        .prop_map(|(mut tensors, metadata, pad, fill)| {
            // Unique names: safetensors keeps one entry per name.
            let mut seen = std::collections::HashSet::new();
            tensors.retain(|t| t.name != "__metadata__" && seen.insert(t.name.clone()));
            StFile {
                tensors,
                metadata,
                pad,
                len_field: LenField::Exact,
                extra_data: 0,
                fill,
                damage: Damage::None,
            }
        })
        .boxed()
}

/// Tensors of up to 2^60 bytes each whose offsets chain right up to `u64::MAX - slack`: the
/// data section's end plus the header then passes `usize::MAX`.
pub fn huge_chain(slack: u64, pad: usize) -> StFile {
    let chunk: u64 = 1 << 60;
    let end = u64::MAX - slack;
    let mut tensors = Vec::new();
    let mut cur = 0u64;
    while cur < end {
        let size = chunk.min(end - cur);
        tensors.push(StTensor {
            name: format!("t{}", tensors.len()),
            dtype: "\"U8\"".into(),
            dims: vec![size.to_string()],
            offsets: Offsets::Consistent,
        });
        cur += size;
    }
    StFile {
        tensors,
        metadata: None,
        pad,
        len_field: LenField::Exact,
        extra_data: 0,
        fill: 0,
        damage: Damage::None,
    }
}

pub fn st_file_huge_chain() -> BoxedStrategy<StFile> {
    (0u64..2048, 0usize..64)
        .prop_map(|(slack, pad)| huge_chain(slack, pad))
        .boxed()
}

/// Any file: random bytes, a valid file damaged, or a header of random entries.
pub fn st_bytes() -> BoxedStrategy<Bytes> {
    let damage = prop_oneof![
        4 => Just(Damage::None),
        2 => any::<Index>().prop_map(Damage::Truncate),
        2 => prop::collection::vec((any::<Index>(), 1u8..=255), 1..4).prop_map(Damage::Flip),
        1 => Just(Damage::NonUtf8),
    ];
    let len_field = prop_oneof![
        6 => Just(LenField::Exact),
        2 => (-16i64..16).prop_map(LenField::Delta),
        1 => select(vec![
            u64::MAX,
            u64::MAX / 2,
            1 << 32,
            100_000_000,
            100_000_001,
            0,
            1,
            7,
        ])
        .prop_map(LenField::Value),
        1 => any::<u64>().prop_map(LenField::Value),
    ];
    let metadata = prop::option::of(prop_oneof![
        Just("{\"format\":\"pt\"}".to_string()),
        json_value(&["format"]).prop_map(|v| v.to_string()),
    ]);
    let random_file = (
        prop::collection::vec(tensor(false), 0..5),
        metadata,
        0usize..4,
        len_field,
        prop_oneof![4 => Just(0i64), 1 => -8i64..8],
        0u8..3,
        damage.clone(),
    )
        .prop_map(
            |(tensors, metadata, pad, len_field, extra_data, fill, damage)| StFile {
                tensors,
                metadata,
                pad,
                len_field,
                extra_data,
                fill,
                damage,
            },
        );
    let damaged_valid = (st_file_valid(), damage).prop_map(|(mut f, damage)| {
        f.damage = damage;
        f
    });
    // A correct length prefix over random bytes, so the JSON parser sees the garbage.
    let framed_garbage = prop::collection::vec(any::<u8>(), 0..128).prop_map(|g| {
        let mut out = (g.len() as u64).to_le_bytes().to_vec();
        out.extend(g);
        out
    });
    prop_oneof![
        2 => prop::collection::vec(any::<u8>(), 0..64),
        1 => framed_garbage,
        4 => random_file.prop_map(|f| f.bytes()),
        3 => damaged_valid.prop_map(|f| f.bytes()),
        1 => st_file_huge_chain().prop_map(|f| f.bytes()),
    ]
    .prop_map(Bytes)
    .boxed()
}

/// Finds every tensor `names` might hold and checks what `get`/`get_checked` return: the shape
/// asked for, as many bytes as shape and dtype say, values finite exactly when `get_checked`
/// accepts them.
fn probe_tensors(w: &WeightFiles, names: &[String]) -> Result<(), TestCaseError> {
    // Sums over the whole checkpoint must not overflow either.
    let _ = (w.total_bytes(), w.total_elements());
    for name in names {
        // Asking for the empty shape makes a shape mismatch report the real one.
        let shape = match w.get(name, &[]) {
            Err(ModelError::TensorShape { got, .. }) => got,
            Err(ModelError::MissingTensor { .. }) => {
                prop_assert!(!w.contains(name), "{name} is listed but missing");
                continue;
            }
            Err(ModelError::TensorDType { .. }) => continue,
            Err(e) => return Err(TestCaseError::fail(format!("get({name}): {e}"))),
            Ok(_) => Vec::new(),
        };
        match w.get(name, &shape) {
            Ok(t) => {
                prop_assert_eq!(t.shape, &shape[..]);
                let numel: usize = shape.iter().product();
                prop_assert_eq!(t.data.len(), numel * t.dtype.size(), "bytes of {}", name);
                let finite = t.to_f32().iter().all(|x| x.is_finite());
                match w.get_checked(name, &shape) {
                    Ok(_) => prop_assert!(finite, "get_checked accepted non-finite {name}"),
                    Err(ModelError::CorruptWeights { .. }) => {
                        prop_assert!(!finite, "get_checked refused finite {name}")
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("get_checked: {e}"))),
                }
            }
            Err(ModelError::TensorDType { .. }) => {}
            Err(e) => return Err(TestCaseError::fail(format!("get({name}, {shape:?}): {e}"))),
        }
    }
    Ok(())
}

/// Every tensor name the header text of `bytes` mentions (best effort: the keys of its JSON).
fn header_names(bytes: &[u8]) -> Vec<String> {
    let Some(len) = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    else {
        return Vec::new();
    };
    let end = usize::try_from(len)
        .ok()
        .and_then(|l| l.checked_add(8))
        .unwrap_or(usize::MAX);
    let header = bytes.get(8..end.min(bytes.len())).unwrap_or_default();
    let mut names: Vec<String> = serde_json::from_slice::<Value>(header)
        .ok()
        .and_then(|v| v.as_object().map(|m| m.keys().cloned().collect()))
        .unwrap_or_default();
    names.extend(TENSOR_NAMES.iter().map(|s| s.to_string()));
    names
}

/// One `model.safetensors`: opening it is `Ok` or a typed error; when `Ok`, every tensor reads
/// back inside the file.
pub fn check_safetensors_file(Bytes(bytes): Bytes) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    write(&dir.path().join("model.safetensors"), &bytes);
    let path = dir.path().to_path_buf();
    let names = header_names(&bytes);
    within(CASE_LIMIT, move || match WeightFiles::open(&path) {
        Ok(w) => probe_tensors(&w, &names),
        Err(e) => {
            prop_assert!(
                matches!(e, ModelError::CorruptWeights { .. } | ModelError::Io { .. }),
                "unexpected error kind: {e:?}"
            );
            prop_assert!(!e.to_string().is_empty());
            Ok(())
        }
    })?
}

/// A file a correct writer produced opens, and each tensor returns exactly the bytes written.
pub fn check_safetensors_roundtrip(file: StFile) -> Result<(), TestCaseError> {
    prop_assume!(file.is_well_formed());
    let bytes = file.bytes();
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    write(&dir.path().join("model.safetensors"), &bytes);
    let w = WeightFiles::open(dir.path())
        .map_err(|e| TestCaseError::fail(format!("a well-formed file was refused: {e}")))?;
    let data = &bytes[file.data_start()..];
    let mut start = 0usize;
    for t in &file.tensors {
        let shape: Vec<usize> = t.dims.iter().map(|d| d.parse().unwrap_or(0)).collect();
        let size = t.byte_size().unwrap_or(0) as usize;
        match w.get(&t.name, &shape) {
            Ok(got) => prop_assert_eq!(got.data, &data[start..start + size]),
            Err(ModelError::TensorDType { .. }) => {
                prop_assert!(!matches!(
                    t.dtype.as_str(),
                    "\"F32\"" | "\"F16\"" | "\"BF16\""
                ))
            }
            Err(e) => return Err(TestCaseError::fail(format!("get({}): {e}", t.name))),
        }
        start += size;
    }
    Ok(())
}

/// Shard file names an index may point at: present ones, a missing one, paths outside or below
/// the model directory, the index itself, a directory.
const SHARD_TARGETS: &[&str] = &[
    "\"model-00001-of-00002.safetensors\"",
    "\"model-00002-of-00002.safetensors\"",
    "\"missing.safetensors\"",
    "\"../outside.safetensors\"",
    "\"sub/inner.safetensors\"",
    "\"sub\"",
    "\"/etc/hostname\"",
    "\"\"",
    "\".\"",
    "\"..\"",
    "\"model.safetensors.index.json\"",
    "5",
    "null",
    "[\"model-00001-of-00002.safetensors\"]",
];

#[derive(Clone, Debug)]
pub struct ShardedCase {
    /// Text of `model.safetensors.index.json`.
    pub index: String,
    /// Bytes of the two shards `model-0000{1,2}-of-00002.safetensors`.
    pub shards: [Bytes; 2],
}

pub fn sharded_case() -> BoxedStrategy<ShardedCase> {
    let target = prop_oneof![
        6 => select(SHARD_TARGETS).prop_map(str::to_string),
        1 => weird_string().prop_map(|s| json_str(&s)),
    ];
    let map = prop::collection::vec((select(TENSOR_NAMES), target), 0..5).prop_map(|kv| {
        let entries: Vec<String> = kv
            .iter()
            .map(|(k, v)| format!("{}:{v}", json_str(k)))
            .collect();
        format!(
            "{{\"metadata\":{{}},\"weight_map\":{{{}}}}}",
            entries.join(",")
        )
    });
    let index = prop_oneof![
        6 => map,
        1 => json_value(&["weight_map", "metadata"]).prop_map(|v| v.to_string()),
        1 => fragment(&["weight_map"]).prop_map(|v| format!("{{\"weight_map\":{v}}}")),
        1 => deep_json(),
        1 => ".{0,16}",
    ];
    let shard = prop_oneof![
        3 => st_file_valid().prop_map(|f| Bytes(f.bytes())),
        1 => st_bytes(),
    ];
    (index, shard.clone(), shard)
        .prop_map(|(index, a, b)| ShardedCase {
            index,
            shards: [a, b],
        })
        .boxed()
}

/// Whether a weight_map value names a plain file inside the model directory.
fn plain_file_name(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        let mut parts = Path::new(s).components();
        matches!(parts.next(), Some(std::path::Component::Normal(_))) && parts.next().is_none()
    })
}

/// A well-formed one-tensor file (`model.norm.weight`, 2 × f32).
pub fn small_valid_st_file() -> StFile {
    StFile {
        tensors: vec![StTensor {
            name: "model.norm.weight".into(),
            dtype: "\"F32\"".into(),
            dims: vec!["2".into()],
            offsets: Offsets::Consistent,
        }],
        metadata: None,
        pad: 0,
        len_field: LenField::Exact,
        extra_data: 0,
        fill: 0,
        damage: Damage::None,
    }
}

/// A sharded checkpoint: `Ok` or a typed error; an index naming anything but plain file names
/// in the directory is refused; when `Ok`, every tensor reads back inside its file.
pub fn check_safetensors_sharded(case: ShardedCase) -> Result<(), TestCaseError> {
    let root = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let dir = root.path().join("model");
    std::fs::create_dir_all(dir.join("sub")).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let valid = small_valid_st_file().bytes();
    write(&root.path().join("outside.safetensors"), &valid);
    write(&dir.join("sub/inner.safetensors"), &valid);
    write(&dir.join("model.safetensors.index.json"), &case.index);
    for (i, bytes) in case.shards.iter().enumerate() {
        write(
            &dir.join(format!("model-0000{}-of-00002.safetensors", i + 1)),
            &bytes.0,
        );
    }
    let mut names: Vec<String> = case
        .shards
        .iter()
        .flat_map(|b| header_names(&b.0))
        .collect();
    names.sort();
    names.dedup();
    let escapes = serde_json::from_str::<Value>(&case.index)
        .ok()
        .and_then(|v| v.get("weight_map").and_then(Value::as_object).cloned())
        .is_some_and(|m| m.values().any(|v| !plain_file_name(v)));
    within(CASE_LIMIT, move || match WeightFiles::open(&dir) {
        Ok(w) => {
            prop_assert!(
                !escapes,
                "an index naming a non-plain shard file was accepted"
            );
            probe_tensors(&w, &names)
        }
        Err(e) => {
            prop_assert!(
                matches!(e, ModelError::CorruptWeights { .. } | ModelError::Io { .. }),
                "unexpected error kind: {e:?}"
            );
            Ok(())
        }
    })?
}

// ---------------------------------------------------------------------------------------------
// config.json
// ---------------------------------------------------------------------------------------------

/// Every key `ModelConfig` reads.
pub const CONFIG_KEYS: &[&str] = &[
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "sliding_window",
    "use_sliding_window",
    "hidden_act",
    "bos_token_id",
    "eos_token_id",
    "rope_type",
    "type",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
];

/// Real configurations (Llama 2 as stories260K, Llama 3.1 with rope scaling, Qwen2, Mistral),
/// the starting points of edits.
pub const CONFIGS: &[&str] = &[
    r#"{"architectures":["LlamaForCausalLM"],"bos_token_id":1,"eos_token_id":2,"head_dim":8,"hidden_act":"silu","hidden_size":64,"intermediate_size":172,"max_position_embeddings":512,"model_type":"llama","num_attention_heads":8,"num_hidden_layers":5,"num_key_value_heads":4,"rms_norm_eps":1e-05,"rope_scaling":null,"rope_theta":10000.0,"tie_word_embeddings":true,"vocab_size":512}"#,
    r#"{"architectures":["LlamaForCausalLM"],"bos_token_id":128000,"eos_token_id":[128001,128008,128009],"hidden_act":"silu","hidden_size":4096,"intermediate_size":14336,"max_position_embeddings":131072,"model_type":"llama","num_attention_heads":32,"num_hidden_layers":32,"num_key_value_heads":8,"rms_norm_eps":1e-05,"rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192,"rope_type":"llama3"},"rope_theta":500000.0,"tie_word_embeddings":false,"vocab_size":128256}"#,
    r#"{"architectures":["Qwen2ForCausalLM"],"bos_token_id":151643,"eos_token_id":151645,"hidden_act":"silu","hidden_size":896,"intermediate_size":4864,"max_position_embeddings":32768,"model_type":"qwen2","num_attention_heads":14,"num_hidden_layers":24,"num_key_value_heads":2,"rms_norm_eps":1e-06,"rope_theta":1000000.0,"sliding_window":32768,"tie_word_embeddings":true,"use_sliding_window":true,"vocab_size":151936}"#,
    r#"{"architectures":["MistralForCausalLM"],"hidden_act":"silu","hidden_size":4096,"intermediate_size":14336,"max_position_embeddings":32768,"model_type":"mistral","num_attention_heads":32,"num_hidden_layers":32,"num_key_value_heads":8,"rms_norm_eps":1e-05,"rope_theta":1000000.0,"sliding_window":4096,"vocab_size":32768,"rope_scaling":{"type":"linear","factor":2.0}}"#,
];

/// Sizes that are zero, odd, indivisible, or overflow when multiplied; a few that are no size.
fn config_size() -> BoxedStrategy<String> {
    prop_oneof![
        8 => select(vec![
            "0",
            "1",
            "2",
            "3",
            "4",
            "7",
            "8",
            "9",
            "16",
            "64",
            "65536",
            "4294967296",
            "4611686018427387904",
            "9223372036854775807",
            "18446744073709551615",
        ])
        .prop_map(str::to_string),
        1 => select(vec!["-8", "8.0", "8.5", "1e3", "18446744073709551616"]).prop_map(str::to_string),
    ]
    .boxed()
}

/// Rotary and norm parameters: zero, negative, tiny, huge, past f32's range.
fn config_float() -> BoxedStrategy<String> {
    select(vec![
        "0", "-0.0", "-1", "1e-45", "1e-30", "1e-6", "0.5", "1", "4", "8", "1e30", "1e39", "1e308",
        "-1e308",
    ])
    .prop_map(str::to_string)
    .boxed()
}

/// `rope_scaling` objects of every type, with fields present or not, sizes or floats.
fn rope_scaling() -> BoxedStrategy<String> {
    let rope_type = select(vec![
        "\"llama3\"",
        "\"linear\"",
        "\"default\"",
        "\"yarn\"",
        "null",
        "5",
    ]);
    let field = (
        select(vec![
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ]),
        prop_oneof![config_float(), config_size()],
    );
    (rope_type, any::<bool>(), prop::collection::vec(field, 0..6))
        .prop_map(|(t, alias, fields)| {
            let key = if alias { "type" } else { "rope_type" };
            let mut parts = vec![format!("\"{key}\":{t}")];
            parts.extend(fields.iter().map(|(k, v)| format!("\"{k}\":{v}")));
            format!("{{{}}}", parts.join(","))
        })
        .boxed()
}

const CONFIG_SIZE_KEYS: &[&str] = &[
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "sliding_window",
    "bos_token_id",
    "eos_token_id",
];

/// One edit of a config: mostly a known field set to a hard value of its type.
fn config_edit() -> BoxedStrategy<Edit> {
    prop_oneof![
        6 => (select(CONFIG_SIZE_KEYS), config_size()).prop_map(|(k, v)| Edit::Set(k.into(), v)),
        3 => (select(vec!["rms_norm_eps", "rope_theta"]), config_float())
            .prop_map(|(k, v)| Edit::Set(k.into(), v)),
        2 => rope_scaling().prop_map(|v| Edit::Set("rope_scaling".into(), v)),
        1 => (
            select(vec!["tie_word_embeddings", "attention_bias", "use_sliding_window"]),
            select(vec!["true", "false", "null", "1"]),
        )
            .prop_map(|(k, v)| Edit::Set(k.into(), v.into())),
        1 => select(vec![
            "[\"LlamaForCausalLM\"]",
            "[\"MistralForCausalLM\"]",
            "[\"Qwen2ForCausalLM\"]",
            "[\"GPT2LMHeadModel\",\"Qwen2ForCausalLM\"]",
            "[]",
            "\"LlamaForCausalLM\"",
        ])
        .prop_map(|v| Edit::Set("architectures".into(), v.into())),
        1 => select(vec!["\"silu\"", "\"gelu\"", "null", "5"])
            .prop_map(|v| Edit::Set("hidden_act".into(), v.into())),
        2 => (select(CONFIG_KEYS), fragment(CONFIG_KEYS)).prop_map(|(k, v)| Edit::Set(k.into(), v)),
        1 => edit(CONFIG_KEYS),
    ]
    .boxed()
}

/// config.json texts: a real one edited, random JSON, nesting, garbage.
pub fn config_text() -> BoxedStrategy<String> {
    let edited =
        (select(CONFIGS), prop::collection::vec(config_edit(), 1..4)).prop_map(|(base, edits)| {
            let fields = object_fields(&serde_json::from_str(base).unwrap_or_default());
            object_text(&fields, &edits)
        });
    prop_oneof![
        8 => edited,
        2 => json_value(CONFIG_KEYS).prop_map(|v| v.to_string()),
        1 => deep_json(),
        1 => ".{0,32}",
    ]
    .boxed()
}

/// Largest head_dim whose rotary tables the property builds; a loader builds them only after
/// every weight matched the config, so larger ones never get that far.
const MAX_TABLE_HEAD_DIM: usize = 1 << 16;

/// `ModelConfig::from_json`: `Ok` or a typed error; when `Ok`, the config is consistent and its
/// rotary tables are finite.
pub fn check_config(text: String) -> Result<(), TestCaseError> {
    within(CASE_LIMIT, move || match ModelConfig::from_json(&text) {
        Err(e) => {
            prop_assert!(
                matches!(
                    e,
                    ModelError::ConfigParse { .. }
                        | ModelError::ConfigField { .. }
                        | ModelError::UnknownArchitecture { .. }
                ),
                "unexpected error kind: {e:?}"
            );
            Ok(())
        }
        Ok(c) => {
            for v in [
                c.hidden_size,
                c.intermediate_size,
                c.num_hidden_layers,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.head_dim,
                c.vocab_size,
                c.max_position_embeddings,
            ] {
                prop_assert!(v > 0, "a zero size was accepted: {c:?}");
            }
            prop_assert_eq!(c.num_attention_heads % c.num_key_value_heads, 0);
            prop_assert_eq!(c.head_dim % 2, 0);
            // What the loader and the engine multiply before any weight is checked: the KV
            // bytes of one token (the engine multiplies by the block size, checked) and the
            // fused q/k/v width.
            let kv_token = [c.num_hidden_layers, 2, c.num_key_value_heads, c.head_dim, 4]
                .iter()
                .try_fold(1usize, |a, &b| a.checked_mul(b));
            let qkv = c
                .num_key_value_heads
                .checked_mul(2)
                .and_then(|kv| kv.checked_add(c.num_attention_heads))
                .and_then(|rows| rows.checked_mul(c.head_dim));
            prop_assert!(kv_token.is_some() && qkv.is_some(), "sizes overflow: {c:?}");
            if c.head_dim <= MAX_TABLE_HEAD_DIM {
                let inv = c.rope_inv_freq(4);
                prop_assert_eq!(inv.len(), c.rotary_dim / 2);
                prop_assert!(
                    inv.iter().all(|f| f.is_finite() && *f > 0.0),
                    "rotary frequencies {inv:?} of {c:?}"
                );
                let table = c.rope_table(4);
                prop_assert_eq!(table.len(), 4 * c.rotary_dim);
                prop_assert!(table.iter().all(|x| x.is_finite()), "rotary table of {c:?}");
            }
            prop_assert!(c.rms_norm_eps.is_finite() && c.rms_norm_eps >= 0.0, "{c:?}");
            Ok(())
        }
    })?
}

/// A directory holding `model`'s weights and tokenizer files (linked) and `config` as its
/// config.json.
pub fn model_dir_with_config(model: &Path, config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        if model.join(f).exists() {
            std::os::unix::fs::symlink(model.join(f), dir.path().join(f))
                .unwrap_or_else(|e| panic!("linking {f}: {e}"));
        }
    }
    write(&dir.path().join("config.json"), config);
    dir
}

/// The real consumer of config.json: an engine on stories260K's weights with an edited config
/// loads or refuses with a typed error; when it loads, it generates.
pub fn check_engine_config(model: PathBuf, case: (String, bool)) -> Result<(), TestCaseError> {
    let (config, explicit_blocks) = case;
    let dir = model_dir_with_config(&model, &config);
    let path = dir.path().to_path_buf();
    within(CASE_LIMIT, move || {
        let mut c = llmd::EngineConfig::new(path);
        c.num_threads = Some(1);
        // Small either way; explicit blocks skip the memory-derived count (and its division).
        c.cache.kv_cache_memory_bytes = Some(8 << 20);
        c.cache.num_blocks = explicit_blocks.then_some(64);
        let mut core = match llmd::EngineCore::new(c) {
            Ok(core) => core,
            Err(e) => {
                prop_assert!(!e.to_string().is_empty());
                return Ok(());
            }
        };
        let params = llmd::SamplingParams {
            max_tokens: Some(2),
            ..llmd::SamplingParams::greedy()
        };
        let prompt = llmd::Prompt::Tokens(vec![1, 100, 200]);
        match core.add_request("r".into(), &prompt, params, 0) {
            Ok(()) => {}
            Err(llmd::Error::PromptTooLong { .. } | llmd::Error::TokenOutOfVocab { .. }) => {
                return Ok(())
            }
            Err(e) => return Err(TestCaseError::fail(format!("add_request: {e}"))),
        }
        let vocab = core.limits().vocab_size;
        for _ in 0..16 {
            if !core.has_unfinished_requests() {
                break;
            }
            let outputs = core
                .step()
                .map_err(|e| TestCaseError::fail(format!("step: {e}")))?;
            for o in outputs {
                prop_assert!(o.new_token_ids.iter().all(|&t| (t as usize) < vocab));
            }
        }
        prop_assert!(
            !core.has_unfinished_requests(),
            "2 tokens took over 16 steps"
        );
        Ok(())
    })?
}

/// Edited stories260K configs (sizes left intact load the real weights) and random ones.
pub fn engine_config_case(model: &Path) -> BoxedStrategy<(String, bool)> {
    let base = std::fs::read_to_string(model.join("config.json"))
        .unwrap_or_else(|e| panic!("reading stories260K's config.json: {e}"));
    let fields = object_fields(&serde_json::from_str(&base).unwrap_or_default());
    let edits = prop::collection::vec(config_edit(), 0..3);
    let text = prop_oneof![
        6 => edits.prop_map(move |e| object_text(&fields, &e)),
        1 => config_text(),
    ];
    (text, any::<bool>()).boxed()
}

// ---------------------------------------------------------------------------------------------
// tokenizer_config.json, generation_config.json, chat templates
// ---------------------------------------------------------------------------------------------

pub const TOKENIZER_KEYS: &[&str] = &[
    "chat_template",
    "bos_token",
    "eos_token",
    "unk_token",
    "add_bos_token",
    "add_eos_token",
    "content",
    "name",
    "template",
    "bos_token_id",
    "eos_token_id",
];

/// Templates of real models: ChatML (SmolLM2, Qwen2), Llama 2 (with `raise_exception`), Zephyr.
const REAL_TEMPLATES: &[&str] = &[
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}",
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}",
];

/// Templates that loop for ever in effect, recurse without end, build huge values or do not
/// parse.
///
/// Not here: doubling a list more than 32 times (`{% set ns.l = ns.l + ns.l %}` in a loop).
/// minijinja 3.1 then flattens the lazy concatenation without charging fuel, so no budget stops
/// it before memory runs out — an upstream limit, reachable only by a model's own template.
const NASTY_TEMPLATES: &[&str] = &[
    "{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}{% endfor %}",
    "{% set ns = namespace(l=[1]) %}{% for i in range(16) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|join }}",
    "{% set ns = namespace(l=[1]) %}{% for i in range(20000) %}{% set ns.l = ns.l + [i] %}{% endfor %}{{ ns.l|length }}",
    "{% for x in range(100) recursive %}{% if loop.depth < 6 %}{{ loop(range(100)) }}{% endif %}{% endfor %}",
    "{% for x in range(10) recursive %}{{ loop(range(10)) }}{% endfor %}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% macro f(n) %}{% if n < 100000 %}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}",
    "{% macro f(n) %}{{ f(n) ~ f(n) }}{% endmacro %}{{ f(0) }}",
    "{% set ns = namespace(s='x') %}{% for i in range(100000) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "{{ 'x' * 1000000000 }}",
    "{{ 'x' * 10000000 }}",
    "{{ range(100000)|list * 100000 }}",
    "{% for i in range(100000) %}{{ messages|tojson }}{% endfor %}",
    "{% include 'chat_template' %}",
    "{% extends 'chat_template' %}",
    "{% include 'missing' %}",
    "{% import 'chat_template' as t %}{{ t }}",
    "{{ raise_exception('refused') }}",
    "{{ raise_exception() }}",
    "{{ messages[0]['content'].split('') }}",
    "{{ messages[0].content.startswith() }}",
    "{{ messages[0].content.format(1, 2) }}",
    "{{ messages[99]['content'] }}",
    "{{ messages|map(attribute='content')|join('\u{0}') }}",
    "{{ 1 / 0 }}",
    "{{ 18446744073709551615 * 18446744073709551615 }}",
    "{% for m in messages %}{{ m.content|indent(1000000) }}{% endfor %}",
    "{{ (messages|length) ** 100000 }}",
    "{% if %}",
    "{{",
    "{% endfor %}",
    "{% raw %}",
];

/// Pieces that combine into odd but plausible templates.
const TEMPLATE_PIECES: &[&str] = &[
    "{% for message in messages %}",
    "{% endfor %}",
    "{% if add_generation_prompt %}",
    "{% endif %}",
    "{% else %}",
    "{{ message['content'] }}",
    "{{ message.role|upper }}",
    "{{ bos_token }}",
    "{{ eos_token }}",
    "{{ loop.index }}",
    "{% set x = messages|length %}",
    "{{ x * x }}",
    "{% for i in range(1000) %}",
    "{{ raise_exception('no') }}",
    "{{ messages|tojson }}",
    "{{ message['content'].strip().split(' ')|reverse|join(' ') }}",
    "{% macro m(a) %}{{ a }}{% endmacro %}",
    "{{ m(message) }}",
    "text\n",
    "{#",
    "#}",
    "{%- ",
    " -%}",
];

fn template_source() -> BoxedStrategy<String> {
    let deep = (1usize..400, any::<bool>()).prop_map(|(d, parens)| {
        if parens {
            format!("{{{{ {}1{} }}}}", "(".repeat(d), ")".repeat(d))
        } else {
            format!("{}x{}", "{% if true %}".repeat(d), "{% endif %}".repeat(d))
        }
    });
    prop_oneof![
        2 => select(REAL_TEMPLATES).prop_map(str::to_string),
        4 => select(NASTY_TEMPLATES).prop_map(str::to_string),
        3 => prop::collection::vec(select(TEMPLATE_PIECES), 0..10).prop_map(|p| p.concat()),
        1 => deep,
        1 => "\\PC{0,40}",
    ]
    .boxed()
}

/// `chat_template` values: a source string, HF's list of named templates, or a wrong type.
fn chat_template_value() -> BoxedStrategy<String> {
    let src = template_source();
    prop_oneof![
        6 => src.clone().prop_map(|s| json_str(&s)),
        1 => src.clone().prop_map(|s| format!("[{{\"name\":\"default\",\"template\":{}}}]", json_str(&s))),
        1 => src.prop_map(|s| format!("[{{\"name\":\"tool_use\",\"template\":{}}}]", json_str(&s))),
        1 => select(vec![
            "[{\"name\":5}]",
            "[{\"name\":\"default\",\"template\":5}]",
            "[\"x\"]",
            "[]",
            "5",
            "null",
            "{}",
        ])
        .prop_map(str::to_string),
        1 => fragment(TOKENIZER_KEYS),
    ]
    .boxed()
}

/// `bos_token`/`eos_token` values: strings (known and unknown), AddedToken objects, wrong types.
fn token_value() -> BoxedStrategy<String> {
    prop_oneof![
        2 => select(vec!["\"<s>\"", "\"</s>\"", "\"<unk>\"", "\"<nope>\"", "\"\""]).prop_map(str::to_string),
        1 => select(vec![
            "{\"content\":\"</s>\",\"lstrip\":false}",
            "{\"content\":5}",
            "{}",
            "[\"</s>\"]",
            "2",
        ])
        .prop_map(str::to_string),
        1 => fragment(TOKENIZER_KEYS),
    ]
    .boxed()
}

#[derive(Clone, Debug)]
pub struct TokenizerCase {
    /// Text of `tokenizer_config.json`; `None`: no such file.
    pub config: Option<String>,
    pub generation: Option<String>,
    /// `chat_template.jinja`, used when the config has no template.
    pub jinja_file: Option<String>,
    pub messages: Vec<ChatMessage>,
    pub add_generation_prompt: bool,
}

fn messages() -> BoxedStrategy<Vec<ChatMessage>> {
    let role = prop_oneof![
        4 => select(vec!["system", "user", "assistant", "tool"]).prop_map(str::to_string),
        1 => weird_string(),
    ];
    prop::collection::vec(
        (role, weird_string()).prop_map(|(role, content)| ChatMessage { role, content }),
        0..4,
    )
    .boxed()
}

pub fn tokenizer_case() -> BoxedStrategy<TokenizerCase> {
    let base = vec![
        ("add_bos_token".to_string(), "true".to_string()),
        ("bos_token".to_string(), "\"<s>\"".to_string()),
        ("eos_token".to_string(), "\"</s>\"".to_string()),
        ("unk_token".to_string(), "\"<unk>\"".to_string()),
    ];
    let field_edit = prop_oneof![
        4 => chat_template_value().prop_map(|v| Edit::Set("chat_template".into(), v)),
        2 => (select(vec!["bos_token", "eos_token"]), token_value())
            .prop_map(|(k, v)| Edit::Set(k.to_string(), v)),
        1 => fragment(TOKENIZER_KEYS).prop_map(|v| Edit::Set("add_bos_token".into(), v)),
        1 => edit(TOKENIZER_KEYS),
    ];
    let edited = (
        prop::option::weighted(0.75, chat_template_value()),
        prop::collection::vec(field_edit, 0..3),
    )
        .prop_map(move |(template, mut edits)| {
            if let Some(t) = template {
                edits.insert(0, Edit::Set("chat_template".into(), t));
            }
            object_text(&base, &edits)
        });
    let config = prop_oneof![
        8 => edited,
        2 => json_value(TOKENIZER_KEYS).prop_map(|v| v.to_string()),
        1 => deep_json(),
        1 => ".{0,16}",
    ];
    let id = prop_oneof![
        select(vec![
            "1",
            "2",
            "511",
            "512",
            "4294967295",
            "4294967296",
            "-1",
            "1.5",
            "null",
            "[2, 2, 2]",
            "[]",
            "[\"2\"]"
        ])
        .prop_map(str::to_string),
        fragment(TOKENIZER_KEYS),
    ];
    let generation = (id.clone(), id)
        .prop_map(|(b, e)| format!("{{\"bos_token_id\":{b},\"eos_token_id\":{e}}}"));
    (
        prop::option::weighted(0.9, config),
        prop::option::weighted(
            0.5,
            prop_oneof![6 => generation, 1 => fragment(TOKENIZER_KEYS)],
        ),
        prop::option::weighted(0.2, template_source()),
        messages(),
        any::<bool>(),
    )
        .prop_map(
            |(config, generation, jinja_file, messages, add_generation_prompt)| TokenizerCase {
                config,
                generation,
                jinja_file,
                messages,
                add_generation_prompt,
            },
        )
        .boxed()
}

/// `Tokenizer::from_dir` beside the real stories260K `tokenizer.json`: `Ok` or a typed error;
/// when `Ok`, EOS ids are distinct, text encodes, and the chat template renders or fails with a
/// template error, in bounded time.
pub fn check_tokenizer(model: PathBuf, case: TokenizerCase) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    std::os::unix::fs::symlink(
        model.join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .map_err(|e| TestCaseError::fail(e.to_string()))?;
    for (name, text) in [
        ("tokenizer_config.json", &case.config),
        ("generation_config.json", &case.generation),
        ("chat_template.jinja", &case.jinja_file),
    ] {
        if let Some(text) = text {
            write(&dir.path().join(name), text);
        }
    }
    let path = dir.path().to_path_buf();
    within(CASE_LIMIT, move || {
        let tok = match Tokenizer::from_dir(&path) {
            Ok(tok) => tok,
            Err(e) => {
                prop_assert!(
                    matches!(e, TokenizerError::Parse { .. } | TokenizerError::Io { .. }),
                    "unexpected error kind: {e:?}"
                );
                return Ok(());
            }
        };
        let eos = tok.eos_token_ids();
        let mut distinct = eos.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        prop_assert_eq!(distinct.len(), eos.len(), "duplicate EOS ids {:?}", eos);
        let ids = tok
            .encode("Once upon a time", true)
            .map_err(|e| TestCaseError::fail(format!("encode: {e}")))?;
        prop_assert!(!ids.is_empty());
        match tok.apply_chat_template(&case.messages, case.add_generation_prompt) {
            Ok(_) => prop_assert!(tok.has_chat_template()),
            Err(TokenizerError::NoChatTemplate) => prop_assert!(!tok.has_chat_template()),
            Err(
                TokenizerError::Template { message }
                | TokenizerError::TemplateException { message },
            ) => {
                prop_assert!(tok.has_chat_template());
                prop_assert!(!message.is_empty());
            }
            Err(e) => return Err(TestCaseError::fail(format!("unexpected error kind: {e:?}"))),
        }
        Ok(())
    })?
}

// ---------------------------------------------------------------------------------------------
// HTTP bodies
// ---------------------------------------------------------------------------------------------

/// Keys of both request types (and of their nested objects).
pub const REQUEST_KEYS: &[&str] = &[
    "model",
    "prompt",
    "messages",
    "role",
    "content",
    "type",
    "text",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "stream",
    "stream_options",
    "include_usage",
    "logprobs",
    "top_logprobs",
    "echo",
    "best_of",
    "suffix",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "min_tokens",
    "include_stop_str_in_output",
    "skip_special_tokens",
];

/// The numeric request fields, for targeted edits.
const NUMERIC_REQUEST_KEYS: &[&str] = &[
    "max_tokens",
    "max_completion_tokens",
    "n",
    "logprobs",
    "top_logprobs",
    "best_of",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "min_tokens",
];

/// Numbers at the edges of every type a request field has (usize, u64, i64, f32).
const EDGE_NUMBERS: &[&str] = &[
    "0",
    "-1",
    "1",
    "2",
    "20",
    "21",
    "128",
    "129",
    "256",
    "257",
    "0.5",
    "1e-400",
    "1e300",
    "-1e300",
    "1e400",
    "3.4e38",
    "3.5e38",
    "-3.5e38",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "\"NaN\"",
];

/// One damage to a request: mostly a numeric field set to an edge value.
fn request_edit() -> BoxedStrategy<Edit> {
    prop_oneof![
        1 => (select(NUMERIC_REQUEST_KEYS), select(EDGE_NUMBERS))
            .prop_map(|(k, v)| Edit::Set(k.into(), v.into())),
        1 => edit(REQUEST_KEYS),
    ]
    .boxed()
}

pub const MODEL_NAME: &str = "stories260K";

const PROMPTS: &[&str] = &[
    "Once upon a time",
    "Lily and Ben were best friends. One day",
    "The little dog ran to the park and",
];

fn text_value() -> BoxedStrategy<String> {
    prop_oneof![
        3 => select(PROMPTS).prop_map(json_str),
        1 => weird_string().prop_map(|s| json_str(&s)),
    ]
    .boxed()
}

fn field(
    key: &'static str,
    value: impl Strategy<Value = String> + 'static,
) -> BoxedStrategy<Option<(String, String)>> {
    rare_field(key, 0.5, value)
}

/// A field present with probability `p`: low for those whose valid values depend on others
/// (`best_of` must equal `n`), so most requests stay valid and reach the engine.
fn rare_field(
    key: &'static str,
    p: f64,
    value: impl Strategy<Value = String> + 'static,
) -> BoxedStrategy<Option<(String, String)>> {
    prop::option::weighted(p, value.prop_map(move |v| (key.to_string(), v))).boxed()
}

fn num<T: std::fmt::Display + std::fmt::Debug + Clone + 'static>(
    s: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<String> {
    s.prop_map(|x| x.to_string()).boxed()
}

/// Sampling fields with valid (or nearly valid) values, each present or not.
fn sampling_fields() -> Vec<BoxedStrategy<Option<(String, String)>>> {
    vec![
        field(
            "model",
            prop_oneof![
                4 => Just("\"stories260K\"".to_string()),
                1 => select(vec!["\"gpt-4\"", "null"]).prop_map(str::to_string),
            ],
        ),
        field("temperature", num(0.0f64..2.0)),
        field("top_p", num(0.05f64..1.0)),
        field("top_k", num(-1i64..50)),
        field("min_p", num(0.0f64..1.0)),
        field("presence_penalty", num(-2.0f64..2.0)),
        field("frequency_penalty", num(-2.0f64..2.0)),
        field("repetition_penalty", num(0.5f64..2.0)),
        field("seed", num(any::<u64>())),
        field(
            "stop",
            prop_oneof![
                text_value(),
                prop::collection::vec(text_value(), 0..3)
                    .prop_map(|v| format!("[{}]", v.join(","))),
            ],
        ),
        rare_field(
            "stop_token_ids",
            0.2,
            prop::collection::vec(0u32..600, 0..3).prop_map(|v| format!("{v:?}")),
        ),
        field("ignore_eos", num(any::<bool>())),
        field("min_tokens", num(0usize..3)),
        field("include_stop_str_in_output", num(any::<bool>())),
        field("skip_special_tokens", num(any::<bool>())),
        field("stream", num(any::<bool>())),
        field(
            "stream_options",
            num(any::<bool>()).prop_map(|b| format!("{{\"include_usage\":{b}}}")),
        ),
    ]
}

/// Fields of a plausible `/v1/completions` request.
fn completion_fields() -> BoxedStrategy<Vec<(String, String)>> {
    let ids = || prop::collection::vec(0u32..530, 0..12).prop_map(|v| format!("{v:?}"));
    let prompt = prop_oneof![
        4 => text_value(),
        1 => prop::collection::vec(text_value(), 1..3).prop_map(|v| format!("[{}]", v.join(","))),
        2 => ids(),
        1 => prop::collection::vec(ids(), 1..3).prop_map(|v| format!("[{}]", v.join(","))),
    ];
    let mut fields = vec![
        prompt.prop_map(|p| Some(("prompt".to_string(), p))).boxed(),
        // Always bounded: generation on debug builds is the slow part of a case.
        num(1usize..6)
            .prop_map(|m| Some(("max_tokens".to_string(), m)))
            .boxed(),
        field("n", num(1usize..3)),
        field("logprobs", num(0usize..6)),
        field("echo", Just("false".to_string())),
        rare_field("best_of", 0.1, num(1usize..3)),
    ];
    fields.extend(sampling_fields());
    fields
        .prop_map(|f| f.into_iter().flatten().collect())
        .boxed()
}

/// Fields of a plausible `/v1/chat/completions` request.
fn chat_fields() -> BoxedStrategy<Vec<(String, String)>> {
    let role = prop_oneof![
        4 => select(vec!["system", "user", "assistant"]).prop_map(json_str),
        1 => weird_string().prop_map(|s| json_str(&s)),
    ];
    let part = prop_oneof![
        3 => text_value().prop_map(|t| format!("{{\"type\":\"text\",\"text\":{t}}}")),
        1 => Just("{\"type\":\"image_url\",\"image_url\":{\"url\":\"x\"}}".to_string()),
        1 => Just("{\"type\":\"text\"}".to_string()),
    ];
    let content = prop_oneof![
        4 => text_value().prop_map(Some),
        1 => prop::collection::vec(part, 0..3).prop_map(|p| Some(format!("[{}]", p.join(",")))),
        1 => Just(Some("null".to_string())),
        1 => Just(None),
    ];
    let message = (role, content).prop_map(|(r, c)| match c {
        Some(c) => format!("{{\"role\":{r},\"content\":{c}}}"),
        None => format!("{{\"role\":{r}}}"),
    });
    let messages = prop::collection::vec(message, 1..4).prop_map(|m| format!("[{}]", m.join(",")));
    let mut fields = vec![
        messages
            .prop_map(|m| Some(("messages".to_string(), m)))
            .boxed(),
        num(1usize..6)
            .prop_map(|m| Some(("max_tokens".to_string(), m)))
            .boxed(),
        field("max_completion_tokens", num(1usize..6)),
        field("n", num(1usize..3)),
        field("logprobs", num(any::<bool>())),
        rare_field("top_logprobs", 0.2, num(0usize..25)),
    ];
    fields.extend(sampling_fields());
    fields
        .prop_map(|f| f.into_iter().flatten().collect())
        .boxed()
}

#[derive(Clone, Debug)]
pub struct HttpCase {
    pub path: &'static str,
    pub content_type: Option<&'static str>,
    /// Whether the server with a chat template answers (see [`HttpServer`]).
    pub templated: bool,
    pub body: Bytes,
}

/// Bodies for the route of `fields`: plausible requests with a few fields damaged, random
/// JSON, deep nesting, invalid UTF-8, garbage, nothing.
fn body(fields: BoxedStrategy<Vec<(String, String)>>) -> BoxedStrategy<Vec<u8>> {
    // Two in five requests are left intact, so that many reach the engine and generate.
    let edits = prop_oneof![
        2 => Just(Vec::new()),
        3 => prop::collection::vec(request_edit(), 1..3),
    ];
    let request = (fields, edits)
        .prop_map(|(f, e)| object_text(&f, &e))
        .boxed();
    let text_body = prop_oneof![
        16 => request.clone(),
        2 => json_value(REQUEST_KEYS).prop_map(|v| v.to_string()),
        1 => deep_json(),
        1 => select(HOSTILE).prop_map(str::to_string),
        1 => request.clone().prop_map(|r| format!("{r} {r}")),
        1 => (request.clone(), any::<Index>()).prop_map(|(r, i)| {
            let mut r = r;
            let mut cut = i.index(r.len() + 1);
            while !r.is_char_boundary(cut) {
                cut -= 1;
            }
            r.truncate(cut);
            r
        }),
        1 => select(vec!["", " ", "\n", "\u{feff}{}"]).prop_map(str::to_string),
    ];
    prop_oneof![
        12 => text_body.prop_map(String::into_bytes),
        // Invalid UTF-8 spliced into an otherwise valid request.
        1 => (request, any::<Index>(), select(vec![0xffu8, 0xc0, 0x80, 0xed])).prop_map(|(r, i, b)| {
            let mut bytes = r.into_bytes();
            let at = i.index(bytes.len() + 1);
            bytes.insert(at, b);
            bytes
        }),
        1 => prop::collection::vec(any::<u8>(), 0..64),
    ]
    .boxed()
}

const COMPLETIONS: &str = "/v1/completions";
const CHAT: &str = "/v1/chat/completions";

/// A request to one of the two routes, mostly with a body meant for it.
pub fn http_case() -> BoxedStrategy<HttpCase> {
    let routed = prop_oneof![
        (Just(COMPLETIONS), body(completion_fields())),
        (Just(CHAT), body(chat_fields())),
    ];
    // Now and then the other route's body.
    let path = |p: &'static str, swap: bool| match (p == CHAT, swap) {
        (true, true) | (false, false) => COMPLETIONS,
        _ => CHAT,
    };
    let content_type = prop_oneof![
        6 => Just(Some("application/json")),
        1 => Just(None),
        1 => select(vec![
            "text/plain",
            "application/x-www-form-urlencoded",
            "application/json; charset=utf-16",
            "multipart/form-data; boundary=x",
        ])
        .prop_map(Some),
    ];
    (
        routed,
        prop::bool::weighted(0.1),
        content_type,
        any::<bool>(),
    )
        .prop_map(move |((p, body), swap, content_type, templated)| HttpCase {
            path: path(p, swap),
            content_type,
            templated,
            body: Bytes(body),
        })
        .boxed()
}

/// A Llama 2 style template that refuses conversations that do not alternate, so chat requests
/// also reach `raise_exception`.
const SERVER_TEMPLATE: &str = REAL_TEMPLATES[1];

/// Routers over stories260K, served in-process: one as shipped (no chat template: the plain
/// fallback) and one with a chat template, on one runtime.
pub struct HttpServer {
    pub rt: tokio::runtime::Runtime,
    pub plain: axum::Router,
    pub templated: axum::Router,
    _dir: tempfile::TempDir,
}

impl HttpServer {
    pub fn new(model: &Path) -> Self {
        let engine = |dir: &Path| {
            let mut c = llmd::EngineConfig::new(dir);
            c.max_model_len = Some(256);
            c.cache.num_blocks = Some(128);
            c.scheduler.max_num_batched_tokens = 256;
            c.scheduler.max_num_seqs = 16;
            c.num_threads = Some(1);
            llmd::Engine::new(c).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
        };
        let cfg = llmd::server::ServerConfig {
            host: "127.0.0.1".into(),
            port: 0,
            api_key: None,
            served_model_name: MODEL_NAME.into(),
            model_path: model.display().to_string(),
            shutdown_timeout: Duration::from_secs(1),
            max_choices_per_request: llmd::server::DEFAULT_MAX_CHOICES_PER_REQUEST,
            request_timeout: None,
            kv_transfer: None,
            prompt_tokens_details: false,
        };
        let config = std::fs::read_to_string(model.join("config.json"))
            .unwrap_or_else(|e| panic!("reading config.json: {e}"));
        let dir = model_dir_with_config(model, &config);
        let mut tok_cfg: Value = std::fs::read_to_string(model.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_else(|| serde_json::json!({}));
        tok_cfg["chat_template"] = Value::from(SERVER_TEMPLATE);
        let tok_path = dir.path().join("tokenizer_config.json");
        let _ = std::fs::remove_file(&tok_path);
        write(&tok_path, tok_cfg.to_string());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("tokio runtime: {e}"));
        Self {
            rt,
            plain: llmd::server::app_with_engine(&cfg, engine(model)).expect("the router"),
            templated: llmd::server::app_with_engine(&cfg, engine(dir.path())).expect("the router"),
            _dir: dir,
        }
    }
}

/// Deadline of one HTTP case: parsing plus at most a few hundred tokens on stories260K.
const HTTP_LIMIT: Duration = Duration::from_secs(60);

/// The API answers every body with 200 or a 4xx carrying an OpenAI error object, within the
/// deadline; a 200 carries choices (or an SSE stream ending in `[DONE]`).
pub fn check_http(server: &HttpServer, case: HttpCase) -> Result<(), TestCaseError> {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let app = if case.templated {
        server.templated.clone()
    } else {
        server.plain.clone()
    };
    let mut req = axum::http::Request::builder().method("POST").uri(case.path);
    if let Some(ct) = case.content_type {
        req = req.header("content-type", ct);
    }
    let req = req
        .body(axum::body::Body::from(case.body.0))
        .map_err(|e| TestCaseError::fail(format!("building the request: {e}")))?;
    // Spawned, so a handler that blocks its worker cannot also stall the deadline's timer.
    let call = server.rt.spawn(async move {
        let resp = app.oneshot(req).await.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok::<_, String>((parts, bytes))
    });
    let answer = server
        .rt
        .block_on(async { tokio::time::timeout(HTTP_LIMIT, call).await });
    let (parts, bytes) = match answer {
        Err(_) => {
            return Err(TestCaseError::fail(format!(
                "no answer within {HTTP_LIMIT:?}"
            )))
        }
        Ok(Err(join)) => return Err(TestCaseError::fail(format!("the handler panicked: {join}"))),
        Ok(Ok(Err(e))) => return Err(TestCaseError::fail(format!("transport error: {e}"))),
        Ok(Ok(Ok(r))) => r,
    };
    let status = parts.status.as_u16();
    let text = String::from_utf8_lossy(&bytes);
    prop_assert!(
        matches!(status, 200 | 400 | 413 | 429),
        "status {status}: {text}"
    );
    let content_type = parts
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if status != 200 {
        prop_assert_eq!(&content_type, "application/json");
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| TestCaseError::fail(format!("error body is not JSON ({e}): {text}")))?;
        let message = v["error"]["message"].as_str().unwrap_or_default();
        prop_assert!(!message.is_empty(), "no error.message: {text}");
        prop_assert!(v["error"]["type"].is_string(), "no error.type: {text}");
        return Ok(());
    }
    if content_type.starts_with("text/event-stream") {
        let data: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        prop_assert_eq!(data.last().copied(), Some("[DONE]"), "stream: {}", text);
        for d in &data[..data.len() - 1] {
            let v: Value = serde_json::from_str(d)
                .map_err(|e| TestCaseError::fail(format!("stream event is not JSON ({e}): {d}")))?;
            prop_assert!(v.is_object());
        }
        return Ok(());
    }
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| TestCaseError::fail(format!("200 body is not JSON ({e}): {text}")))?;
    let choices = v["choices"].as_array().cloned().unwrap_or_default();
    prop_assert!(!choices.is_empty(), "no choices: {text}");
    let mut indices: Vec<u64> = choices.iter().filter_map(|c| c["index"].as_u64()).collect();
    indices.sort_unstable();
    prop_assert_eq!(indices, (0..choices.len() as u64).collect::<Vec<_>>());
    prop_assert!(v["usage"]["completion_tokens"].is_u64(), "no usage: {text}");
    Ok(())
}

// ---- KV block records (the format below the device pool) ----

/// A valid record of a random payload, then damaged: bytes flipped, truncated, extended, or
/// left intact; plus wholly random bytes.
pub fn kv_record_case() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    let valid = (
        proptest::collection::vec(any::<u8>(), 0..512),
        proptest::collection::vec((any::<Index>(), any::<u8>()), 0..4),
        prop_oneof![Just(None), any::<Index>().prop_map(Some)],
        any::<bool>(),
    )
        .prop_map(|(payload, flips, cut, extend)| {
            let mut rec = llmd::kv::block_record::encode(&KV_HASH, KV_IDENTITY, &payload);
            for (i, x) in flips {
                let i = i.index(rec.len());
                rec[i] ^= x;
            }
            if let Some(c) = cut {
                rec.truncate(c.index(rec.len() + 1));
            }
            if extend {
                rec.push(0);
            }
            (payload, rec)
        });
    prop_oneof![
        valid,
        proptest::collection::vec(any::<u8>(), 0..256).prop_map(|b| (Vec::new(), b)),
    ]
}

pub const KV_HASH: llmd::kv::BlockHash = llmd::kv::BlockHash([7; 32]);
pub const KV_IDENTITY: &str = "model=m;layers=1;kv_heads=1;head_dim=8;block_size=16;dtype=f32";

/// Decoding never panics, and a record is accepted only when it is exactly the one written.
pub fn check_kv_record((payload, rec): (Vec<u8>, Vec<u8>)) -> Result<(), TestCaseError> {
    let intact = llmd::kv::block_record::encode(&KV_HASH, KV_IDENTITY, &payload);
    match llmd::kv::block_record::decode(&rec, &KV_HASH, KV_IDENTITY, payload.len()) {
        Ok(p) => {
            prop_assert_eq!(p, payload.as_slice());
            prop_assert!(rec == intact, "a damaged record was accepted");
        }
        Err(_) => prop_assert!(rec != intact, "an intact record was refused"),
    }
    Ok(())
}

// ---- KV event batches (what the router's subscriber decodes from a worker) ----

/// A msgpack scalar of any type, with the edge values of each.
fn msgpack_scalar() -> BoxedStrategy<rmpv::Value> {
    use rmpv::Value;
    prop_oneof![
        Just(Value::Nil),
        any::<bool>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        select(vec![
            0u64,
            1,
            127,
            128,
            255,
            256,
            65535,
            65536,
            u32::MAX as u64,
            1 << 32,
            u64::MAX
        ])
        .prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<f32>().prop_map(Value::F32),
        select(vec![
            "",
            "GPU",
            "CPU",
            "DISK",
            "gpu",
            "BlockStored",
            "BlockRemoved",
            "AllBlocksCleared",
            "full_attention",
            "\u{0}"
        ])
        .prop_map(Value::from),
        ".{0,8}".prop_map(Value::from),
        proptest::collection::vec(any::<u8>(), 0..8).prop_map(Value::Binary),
        (any::<i8>(), proptest::collection::vec(any::<u8>(), 0..4))
            .prop_map(|(t, d)| Value::Ext(t, d)),
    ]
    .boxed()
}

/// Any msgpack value: scalars, arrays and maps nested a few levels.
fn msgpack_value() -> BoxedStrategy<rmpv::Value> {
    use rmpv::Value;
    msgpack_scalar()
        .prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                proptest::collection::vec((inner.clone(), inner), 0..4).prop_map(Value::Map),
            ]
        })
        .boxed()
}

/// An event as vLLM writes it (see `server::kv_events`), every field well typed.
fn kv_event_valid() -> BoxedStrategy<rmpv::Value> {
    use rmpv::Value;
    let hashes = proptest::collection::vec(any::<u64>(), 0..6)
        .prop_map(|h| Value::Array(h.into_iter().map(Value::from).collect()));
    let medium = select(vec!["GPU", "CPU", "DISK"]).prop_map(Value::from);
    let stored = (
        hashes.clone(),
        proptest::option::of(any::<u64>()),
        proptest::collection::vec(any::<u32>(), 0..40),
        0u64..1 << 20,
        medium.clone(),
    )
        .prop_map(|(hashes, parent, tokens, block_size, medium)| {
            let n = hashes.as_array().map_or(0, Vec::len);
            Value::Array(vec![
                Value::from("BlockStored"),
                hashes,
                parent.map_or(Value::Nil, Value::from),
                Value::Array(tokens.into_iter().map(Value::from).collect()),
                Value::from(block_size),
                Value::Nil,
                medium,
                Value::Nil,
                Value::Array(vec![Value::Nil; n]),
                Value::from(0),
                Value::from("full_attention"),
                Value::Nil,
            ])
        });
    let removed = (hashes, medium).prop_map(|(hashes, medium)| {
        Value::Array(vec![
            Value::from("BlockRemoved"),
            hashes,
            medium,
            Value::from(0),
        ])
    });
    prop_oneof![
        3 => stored,
        2 => removed,
        1 => Just(Value::Array(vec![Value::from("AllBlocksCleared")])),
    ]
    .boxed()
}

/// An event with one field replaced by an arbitrary value, cut short, or lengthened.
fn kv_event_damaged() -> BoxedStrategy<rmpv::Value> {
    use rmpv::Value;
    (kv_event_valid(), any::<Index>(), msgpack_value(), 0u8..3)
        .prop_map(|(event, at, value, how)| {
            let Value::Array(mut fields) = event else {
                return event;
            };
            match how {
                0 => {
                    let i = at.index(fields.len());
                    fields[i] = value;
                }
                1 => fields.truncate(at.index(fields.len() + 1)),
                _ => fields.push(value),
            }
            Value::Array(fields)
        })
        .boxed()
}

/// A `[ts, [events], rank]` batch of `events`.
fn kv_batch_value(events: Vec<rmpv::Value>, rank: Option<u32>) -> rmpv::Value {
    use rmpv::Value;
    Value::Array(vec![
        Value::F64(1.5),
        Value::Array(events),
        rank.map_or(Value::Nil, Value::from),
    ])
}

fn msgpack_bytes(v: &rmpv::Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).expect("writing to a Vec");
    out
}

/// One payload for the event decoder, and whether it is a well-formed batch (which must
/// decode).
#[derive(Clone, Debug)]
pub struct KvBatchCase {
    pub payload: Bytes,
    pub well_formed: bool,
}

/// Well-formed batches; batches with damaged events or a damaged outer shape; well-formed
/// bytes flipped, cut or extended; arbitrary bytes and msgpack values; and the classic bombs
/// (nesting past any stack, lengths of 2^32 elements with nothing behind them).
pub fn kv_batch_case() -> BoxedStrategy<KvBatchCase> {
    use rmpv::Value;
    let valid = (
        proptest::collection::vec(kv_event_valid(), 0..6),
        proptest::option::of(any::<u32>()),
    )
        .prop_map(|(events, rank)| msgpack_bytes(&kv_batch_value(events, rank)));
    let well_formed = valid.clone().prop_map(|b| KvBatchCase {
        payload: Bytes(b),
        well_formed: true,
    });
    let damaged_events = proptest::collection::vec(
        prop_oneof![kv_event_valid(), kv_event_damaged(), msgpack_value()],
        1..6,
    )
    .prop_map(|events| msgpack_bytes(&kv_batch_value(events, Some(0))));
    let damaged_shape = (
        proptest::collection::vec(kv_event_valid(), 0..3),
        msgpack_value(),
        any::<Index>(),
    )
        .prop_map(|(events, value, at)| {
            let Value::Array(mut batch) = kv_batch_value(events, Some(0)) else {
                unreachable!("a batch is an array")
            };
            match at.index(4) {
                0 => batch[0] = value,
                1 => batch[1] = value,
                2 => batch.truncate(1),
                _ => batch.push(value),
            }
            msgpack_bytes(&Value::Array(batch))
        });
    let mutated_bytes = (
        valid,
        proptest::collection::vec((any::<Index>(), any::<u8>()), 0..4),
        proptest::option::of(any::<Index>()),
        proptest::collection::vec(any::<u8>(), 0..3),
    )
        .prop_map(|(mut b, flips, cut, extra)| {
            for (i, x) in flips {
                if !b.is_empty() {
                    let i = i.index(b.len());
                    b[i] ^= x;
                }
            }
            if let Some(c) = cut {
                b.truncate(c.index(b.len() + 1));
            }
            b.extend(extra);
            b
        });
    let bombs = prop_oneof![
        (1usize..5000).prop_map(|depth| {
            let mut b = vec![0x93, 0x00, 0x91];
            b.extend(std::iter::repeat_n(0x91, depth));
            b.push(0xc0);
            b
        }),
        select(vec![
            // array32, map32, str32, bin32 and ext32 claiming 2^32 - 1 elements or bytes
            vec![0x93, 0x00, 0xdd, 0xff, 0xff, 0xff, 0xff],
            vec![0x93, 0x00, 0x91, 0xdf, 0xff, 0xff, 0xff, 0xff],
            vec![0x93, 0x00, 0x91, 0x92, 0xdb, 0xff, 0xff, 0xff, 0xff],
            vec![0x93, 0x00, 0x91, 0x92, 0xc6, 0xff, 0xff, 0xff, 0xff],
            vec![0x93, 0x00, 0x91, 0x92, 0xc9, 0xff, 0xff, 0xff, 0xff, 0x01],
            vec![0xc1],
        ]),
    ];
    let as_case = |b: Vec<u8>| KvBatchCase {
        payload: Bytes(b),
        well_formed: false,
    };
    prop_oneof![
        2 => well_formed,
        2 => damaged_events.prop_map(as_case),
        1 => damaged_shape.prop_map(as_case),
        3 => mutated_bytes.prop_map(as_case),
        1 => msgpack_value().prop_map(move |v| as_case(msgpack_bytes(&v))),
        1 => proptest::collection::vec(any::<u8>(), 0..256).prop_map(as_case),
        1 => bombs.prop_map(as_case),
    ]
    .boxed()
}

/// The decoder answers every payload, on a thread with tokio's stack size: `Ok` or an error
/// that says something, never a panic or a hang. A well-formed batch decodes, and whatever
/// decodes is what the publisher would encode again for those events.
pub fn check_kv_batch(case: KvBatchCase) -> Result<(), TestCaseError> {
    let payload = case.payload.0.clone();
    let decoded = within(CASE_LIMIT, move || {
        llmd::router::events::decode_batch(&payload)
    })?;
    match decoded {
        Ok(events) => {
            let again = llmd::server::kv_events::encode_batch(1.5, &events, Some(0))
                .map_err(|e| TestCaseError::fail(format!("re-encoding: {e}")))?;
            let round = llmd::router::events::decode_batch(&again)
                .map_err(|e| TestCaseError::fail(format!("the re-encoded batch: {e}")))?;
            prop_assert_eq!(round, events);
        }
        Err(e) => {
            prop_assert!(!case.well_formed, "a well-formed batch was refused: {}", e);
            prop_assert!(!e.is_empty(), "an empty error");
        }
    }
    Ok(())
}
