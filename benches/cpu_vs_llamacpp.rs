//! llmd against llama.cpp on the CPU: the same real SmolLM2-135M, the same thread count, one run.
//!
//! llama.cpp runs through llama-cpp-python (built from source: ../shared/BUILD-NOTES.md has the
//! recipe) on an F16 GGUF that `benches/hf_to_gguf.py` writes from the shared checkpoint with
//! the `gguf` package's writer (cached under target/bench-data). Each engine runs in its own
//! process, one after the other, so neither's memory or threads touch the other's:
//! - batch-1 decode: a 32-token prompt of real text, then `LLMD_BENCH_GEN` (128) greedy tokens,
//!   tokens/s over the decode phase, best of `LLMD_BENCH_REPEAT` (3);
//! - prefill: 512 tokens of real text in one pass, tokens/s to the first token's logits, best of
//!   the same repeats (llmd with prefix caching off, llama.cpp with its KV cleared each time);
//!   then 2048 tokens, in a second pair of processes with a context to fit (where attention's
//!   share of the work shows; llama.cpp takes it in its default 512-token passes, llmd in one);
//! - resident memory: the process's VmRSS after the runs minus before the model was loaded
//!   (what the model and the engine hold, without the Python interpreter llama.cpp runs in);
//! - greedy agreement: how many of the decoded tokens equal llama.cpp's (bf16 weights against
//!   their f16 rounding: a check that both run the same model, not a tolerance).
//!
//! Then int8: llmd with `--quantization int8` (Q8_0 weights quantized at load) against llama.cpp
//! on a Q8_0 GGUF of the same checkpoint (the same script, `q8_0`): decode, the 512-token
//! prefill, memory and greedy agreement (both quantize the same way, but llama.cpp's embedding
//! and activation rounding differ in detail, so agreement is printed, not required), and llmd
//! int8's decode against llama.cpp F16's (the decode target, reached with fewer bytes).
//!
//! Prints each figure and llmd ÷ llama.cpp with the targets (decode ≥ 1.2, prefill of
//! 512 ≥ 1.0, memory ≤ 1.1; the memory rows are from the first, 1k-context pair). Run: `cargo bench --bench cpu_vs_llamacpp`; `LLMD_BENCH_THREADS`
//! (default: the available cores), `LLMD_PYTHON` (default python3).
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/env.rs"]
mod env;

use env::env_usize;
use llmd::engine::{EngineCore, Prompt};
use llmd::{EngineConfig, RequestId, SamplingParams};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Real text for the prompts (repeated to reach the prefill length).
const TEXT: &str = "The lighthouse keeper climbed the spiral stairs each evening, counting the \
steps as his father had taught him, and lit the great lamp before the last of the light left the \
water. Ships passed far out on the horizon, their own small lights answering his, and on clear \
nights he could see the lamps of the next lighthouse along the coast, forty miles to the north. \
In the winter storms the spray reached the gallery rail, and the whole tower hummed with the \
wind; he wrote each night's weather in the log in a careful hand, the pressure, the wind's \
direction and strength, the ships he had seen and the hour he had seen them. ";

const DECODE_PROMPT: usize = 32;
const PREFILL_PROMPT: usize = 512;
/// The long prefill: where attention's share shows.
const LONG_PREFILL: usize = 2048;

fn rss_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// llmd's side, in this (child) process: the job's figures as one JSON object on stdout.
fn child(job: &Value) {
    let dir = PathBuf::from(job["model"].as_str().unwrap());
    let (gen, repeat, n_ctx, prefill_len) = (
        job["gen"].as_u64().unwrap() as usize,
        job["repeat"].as_u64().unwrap() as usize,
        job["n_ctx"].as_u64().unwrap() as usize,
        job["prefill_len"].as_u64().unwrap() as usize,
    );
    let before = rss_kb("VmRSS");
    let mut c = EngineConfig::new(&dir);
    if job["int8"].as_bool() == Some(true) {
        c.quantization = Some(llmd::config::Quantization::Int8);
    }
    c.max_model_len = Some(n_ctx);
    c.scheduler.max_num_seqs = 1;
    c.scheduler.max_num_batched_tokens = prefill_len;
    c.cache.num_blocks = Some(n_ctx / 16 + 8);
    c.cache.enable_prefix_caching = false;
    let mut core = EngineCore::new(c).unwrap();
    let text = TEXT.repeat(prefill_len / 100 + 1);
    let ids = core.tokenizer().encode(&text, true).unwrap();
    let (decode_prompt, prefill_prompt) =
        (ids[..DECODE_PROMPT].to_vec(), ids[..prefill_len].to_vec());
    let mut n = 0;
    let mut run = |core: &mut EngineCore, prompt: &[u32], max: usize| {
        n += 1;
        let params = SamplingParams {
            max_tokens: Some(max),
            ignore_eos: true,
            ..SamplingParams::greedy()
        };
        core.add_request(
            RequestId(format!("r{n}")),
            &Prompt::Tokens(prompt.to_vec()),
            params,
            0,
        )
        .unwrap();
    };
    let mut decode = Vec::new();
    let mut greedy = Vec::new();
    for _ in 0..repeat * usize::from(gen > 0) {
        run(&mut core, &decode_prompt, gen);
        let mut ids: Vec<u32> = core.step().unwrap()[0].new_token_ids.clone();
        let start = Instant::now();
        while core.has_unfinished_requests() {
            for o in core.step().unwrap() {
                ids.extend(&o.new_token_ids);
            }
        }
        decode.push((ids.len() - 1) as f64 / start.elapsed().as_secs_f64());
        greedy = ids;
    }
    let mut prefill = Vec::new();
    for _ in 0..repeat {
        run(&mut core, &prefill_prompt, 1);
        let start = Instant::now();
        let out = core.step().unwrap();
        prefill.push(prefill_len as f64 / start.elapsed().as_secs_f64());
        assert_eq!(out[0].new_token_ids.len(), 1, "the prompt in one step");
        while core.has_unfinished_requests() {
            core.step().unwrap();
        }
    }
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    println!(
        "{}",
        json!({
            "decode_tok_s": best(&decode),
            "prefill_tok_s": best(&prefill),
            "greedy": greedy,
            "decode_prompt": decode_prompt,
            "prefill_prompt": prefill_prompt,
            "rss_before_kb": before,
            "rss_after_kb": rss_kb("VmRSS"),
            "rss_peak_kb": rss_kb("VmHWM"),
        })
    );
}

/// Runs `cmd` with `job` on its stdin; its stdout's last line as JSON.
fn run_json(mut cmd: Command, job: &Value, what: &str) -> Value {
    let mut p = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    p.stdin
        .take()
        .unwrap()
        .write_all(job.to_string().as_bytes())
        .unwrap();
    let out = p.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        eprintln!("{what} failed ({}): {text}", out.status);
        std::process::exit(1);
    }
    serde_json::from_str(text.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{what}: not one JSON line ({e}): {text}"))
}

/// The `kind` (f16 or q8_0) GGUF of `model`, written once by benches/hf_to_gguf.py.
fn gguf(python: &str, model: &Path, kind: &str) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("target"));
    let dir = target.join("bench-data");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(format!(
        "{}-{kind}.gguf",
        model.file_name().unwrap().to_string_lossy()
    ));
    if !out.exists() {
        let tmp = out.with_extension("gguf.tmp");
        let ok = Command::new(python)
            .arg(manifest.join("benches/hf_to_gguf.py"))
            .arg(model)
            .arg(&tmp)
            .arg(kind)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("benches/hf_to_gguf.py failed: it needs numpy and `pip install gguf`");
            std::process::exit(1);
        }
        std::fs::rename(&tmp, &out).unwrap();
    }
    out
}

fn main() {
    let mut stdin_job = String::new();
    if std::env::args().any(|a| a == "--llmd-child") {
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut stdin_job).unwrap();
        child(&serde_json::from_str(&stdin_job).unwrap());
        return;
    }
    let Some(model) = common::shared_model("smollm2-135m-instruct") else {
        eprintln!("cpu_vs_llamacpp: ../shared/models/smollm2-135m-instruct is missing");
        std::process::exit(1);
    };
    let python = std::env::var("LLMD_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_llama = Command::new(&python)
        .args(["-c", "import llama_cpp"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_llama {
        eprintln!(
            "cpu_vs_llamacpp: `{python} -c 'import llama_cpp'` failed. Build llama-cpp-python from \
             source (../shared/BUILD-NOTES.md): pip download --no-binary :all: \
             llama-cpp-python==0.3.36, then CMAKE_ARGS=-DGGML_NATIVE=ON pip install the sdist"
        );
        std::process::exit(1);
    }
    let threads = env_usize(
        "LLMD_BENCH_THREADS",
        std::thread::available_parallelism().map_or(2, |n| n.get()),
    );
    let gen = env_usize("LLMD_BENCH_GEN", 128);
    let repeat = env_usize("LLMD_BENCH_REPEAT", 3);
    let gguf_f16 = gguf(&python, &model, "f16");
    let gguf_q8 = gguf(&python, &model, "q8_0");

    // Each engine twice, each time in a fresh process: decode, the 512-token prefill and memory
    // with a 1k context; then the 2k prefill alone with a context to fit it.
    // Then int8 against Q8_0, the first job's figures.
    let jobs = [
        (1024, PREFILL_PROMPT, gen, false),
        (LONG_PREFILL + 256, LONG_PREFILL, 0, false),
        (1024, PREFILL_PROMPT, gen, true),
    ];
    let mut results = Vec::new();
    for (n_ctx, prefill_len, gen, int8) in jobs {
        let mut me = Command::new(std::env::current_exe().unwrap());
        me.arg("--llmd-child")
            .env("RAYON_NUM_THREADS", threads.to_string());
        let ours = run_json(
            me,
            &json!({"model": model, "gen": gen, "repeat": repeat, "n_ctx": n_ctx,
                    "prefill_len": prefill_len, "int8": int8}),
            "llmd",
        );
        let mut py = Command::new(&python);
        py.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/llamacpp_peer.py"));
        let theirs = run_json(
            py,
            &json!({
                "gguf": if int8 { &gguf_q8 } else { &gguf_f16 },
                "threads": threads,
                "n_ctx": n_ctx,
                "decode_prompt": ours["decode_prompt"],
                "prefill_prompt": ours["prefill_prompt"],
                "gen": gen,
                "repeat": repeat,
            }),
            "llama.cpp",
        );
        results.push((ours, theirs));
    }
    let (ours, theirs) = &results[0];
    let (long_ours, long_theirs) = &results[1];
    let (q_ours, q_theirs) = &results[2];

    let f = |v: &Value, k: &str| v[k].as_f64().unwrap();
    let mem = |v: &Value| (f(v, "rss_after_kb") - f(v, "rss_before_kb")) / 1024.0;
    let ids = |v: &Value| -> Vec<u64> {
        v["greedy"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect()
    };
    // Greedy tokens equal from the start, and of how many.
    let agree = |x: &[u64], y: &[u64]| {
        let same = x.iter().zip(y).take_while(|(x, y)| x == y).count();
        (same, x.len().min(y.len()))
    };
    let header = |ours: &str, theirs: &str| {
        println!(
            "{:<34} {:>12} {:>12} {:>8} {:>8}",
            "", ours, theirs, "ratio", "target"
        );
    };
    let peak = |o: &Value, t: &Value| {
        println!(
            "{:<34} {:>12.1} {:>12.1}",
            "peak resident (whole process), MiB",
            f(o, "rss_peak_kb") / 1024.0,
            f(t, "rss_peak_kb") / 1024.0
        );
    };
    let (a, b) = (ids(ours), ids(theirs));
    println!(
        "SmolLM2-135M on the CPU, {threads} threads, llama-cpp-python {} (F16 GGUF) vs llmd \
         (the checkpoint's bf16), best of {repeat}",
        theirs["llama_cpp_python"].as_str().unwrap_or("?")
    );
    header("llmd", "llama.cpp");
    let row = |name: &str, x: f64, y: f64, target: &str| {
        println!("{name:<34} {x:>12.1} {y:>12.1} {:>7.2}x {target:>8}", x / y);
    };
    row(
        &format!("decode batch 1, tok/s ({gen} tokens)"),
        f(ours, "decode_tok_s"),
        f(theirs, "decode_tok_s"),
        ">= 1.2",
    );
    row(
        &format!("prefill {PREFILL_PROMPT} tokens, tok/s"),
        f(ours, "prefill_tok_s"),
        f(theirs, "prefill_tok_s"),
        ">= 1.0",
    );
    row(
        &format!("prefill {LONG_PREFILL} tokens, tok/s"),
        f(long_ours, "prefill_tok_s"),
        f(long_theirs, "prefill_tok_s"),
        "",
    );
    row(
        "resident memory added, MiB",
        mem(ours),
        mem(theirs),
        "<= 1.1",
    );
    peak(ours, theirs);
    let (same, of) = agree(&a, &b);
    println!("greedy tokens equal from the start: {same} of {of}");

    println!();
    println!(
        "int8: llmd --quantization int8 (Q8_0 at load) vs llama.cpp Q8_0 GGUF, same run, best of \
         {repeat}"
    );
    header("llmd int8", "llama Q8_0");
    row(
        &format!("decode batch 1, tok/s ({gen} tokens)"),
        f(q_ours, "decode_tok_s"),
        f(q_theirs, "decode_tok_s"),
        "",
    );
    row(
        &format!("prefill {PREFILL_PROMPT} tokens, tok/s"),
        f(q_ours, "prefill_tok_s"),
        f(q_theirs, "prefill_tok_s"),
        "",
    );
    row("resident memory added, MiB", mem(q_ours), mem(q_theirs), "");
    peak(q_ours, q_theirs);
    header("llmd int8", "llama F16");
    row(
        "decode batch 1, tok/s",
        f(q_ours, "decode_tok_s"),
        f(theirs, "decode_tok_s"),
        ">= 1.2",
    );
    let qa = ids(q_ours);
    let (q_same, q_of) = agree(&qa, &ids(q_theirs));
    let (b_same, b_of) = agree(&qa, &a);
    println!(
        "greedy tokens equal from the start: llmd int8 vs llama.cpp Q8_0 {q_same} of {q_of}, \
         llmd int8 vs llmd bf16 {b_same} of {b_of}"
    );
}
