//! The KV tiers, measured against recomputing, in one run (CPU).
//!
//! 1. **TTFT of a long shared prefix.** A PREFIX-token prompt (default 2048) runs once; two
//!    filler prompts then push every one of its blocks out of the device pool; then the prefix
//!    plus 16 new tokens arrives and we time its first token. Three engines: no tiers (the
//!    prefix is recomputed), a host tier, and a disk tier (host tier too small to hold it;
//!    the disk files' pages are dropped from the page cache before the timed request, so the
//!    read hits the device). Prints each TTFT and recompute / tier.
//! 2. **Decode throughput with offloading on vs off** under a workload that evicts all the
//!    time: BATCH sequences decode in a pool with no spare blocks, so every block a sequence
//!    fills is committed, copied to the host tier, and evicts another block. Runs alternate
//!    off/on REPEAT times; the best of each is compared (on / off; the target is >= 0.95).
//!
//! Models: SmolLM2-135M (real weights, `../shared/models`) and stories260K (the worst case for
//! the overhead: its forward is so cheap that copying blocks is a larger share).
//! Run: `cargo bench --bench kv_tiers` (LLMD_BENCH_PREFIX, LLMD_BENCH_GEN, LLMD_BENCH_REPEAT,
//! LLMD_BENCH_MODELS=a,b, LLMD_BENCH_PARTS=ttft,decode).
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/env.rs"]
mod env;
use env::env_usize;

use llmd::engine::{EngineCore, Prompt};
use llmd::kv::tiers::{Tier, TierConfig};
use llmd::{EngineConfig, RequestId, SamplingParams};
use std::path::Path;
use std::time::{Duration, Instant};

fn tokens(n: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (4 + (s >> 33) % (vocab as u64 - 4)) as u32
        })
        .collect()
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..SamplingParams::greedy()
    }
}

/// Runs one request to its end; the time to its first token.
fn run(core: &mut EngineCore, id: &str, prompt: &[u32], max_tokens: usize) -> Duration {
    let start = Instant::now();
    core.add_request(
        RequestId::from(id),
        &Prompt::Tokens(prompt.to_vec()),
        greedy(max_tokens),
        0,
    )
    .unwrap();
    let mut ttft = None;
    while core.has_unfinished_requests() {
        let out = core.step().unwrap();
        if ttft.is_none() && out.iter().any(|o| !o.new_token_ids.is_empty()) {
            ttft = Some(start.elapsed());
        }
    }
    ttft.expect("a first token")
}

/// Drops every file under `root` from the page cache.
fn drop_page_cache(root: &Path) {
    for layout in std::fs::read_dir(root).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(layout.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(file) = std::fs::File::open(f.path()) {
                use std::os::fd::AsRawFd;
                let _ = file.sync_all();
                // SAFETY: fadvise takes a valid descriptor and a range.
                unsafe {
                    libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
                }
            }
        }
    }
}

/// TTFT of PREFIX + 16 tokens after the prefix was evicted from the device; the tier stats.
fn ttft_after_eviction(
    dir: &Path,
    prefix: usize,
    vocab: usize,
    tiers: TierConfig,
    disk_root: Option<&Path>,
) -> (Duration, Option<llmd::kv::connector::TierStats>, u64) {
    let max_len = prefix + 64;
    let mut c = EngineConfig::new(dir);
    c.max_model_len = Some(max_len);
    c.scheduler.max_num_batched_tokens = 512;
    c.cache.num_blocks = Some(max_len.div_ceil(16) + 2);
    c.kv_tiers = tiers;
    let mut core = EngineCore::new(c).unwrap();
    let p = tokens(prefix, 1, vocab);
    run(&mut core, "prefix", &p, 1);
    run(&mut core, "filler-1", &tokens(prefix + 32, 2, vocab), 1);
    run(&mut core, "filler-2", &tokens(prefix + 32, 3, vocab), 1);
    if let Some(root) = disk_root {
        drop_page_cache(root);
    }
    let mut again = p.clone();
    again.extend(tokens(16, 4, vocab));
    let device_hits_before = core.scheduler().prefix_cache_stats().hits;
    let t = run(&mut core, "again", &again, 1);
    let device_hits = core.scheduler().prefix_cache_stats().hits - device_hits_before;
    (t, core.tier_stats(), device_hits)
}

/// Decode tokens/s of BATCH sequences in a pool with no spare blocks.
fn evicting_decode(
    dir: &Path,
    vocab: usize,
    batch: usize,
    gen: usize,
    offload: bool,
) -> (f64, u64) {
    let prompt = 64;
    let mut c = EngineConfig::new(dir);
    c.max_model_len = Some(prompt + gen + 1);
    c.scheduler.max_num_seqs = batch;
    c.scheduler.max_num_batched_tokens = batch * prompt;
    // Exactly the blocks the batch needs: every block allocated evicts a cached one.
    c.cache.num_blocks = Some(batch * (prompt + gen).div_ceil(16));
    if offload {
        c.kv_tiers = TierConfig {
            host_bytes: 1 << 30,
            ..Default::default()
        };
    }
    let mut core = EngineCore::new(c).unwrap();
    // A first round fills the pool with cached blocks, so the timed round evicts.
    for round in 0..2 {
        for i in 0..batch {
            core.add_request(
                RequestId(format!("r{round}-{i}")),
                &Prompt::Tokens(tokens(prompt, 100 * round as u64 + i as u64, vocab)),
                greedy(gen),
                0,
            )
            .unwrap();
        }
        let first = core.step().unwrap();
        assert_eq!(first.len(), batch);
        let start = Instant::now();
        let mut n = 0;
        while core.has_unfinished_requests() {
            n += core.step().unwrap().len();
        }
        if round == 1 {
            let stored = core
                .tier_stats()
                .map_or(0, |s| s.stored_bytes[Tier::Host.index()]);
            return (n as f64 / start.elapsed().as_secs_f64(), stored);
        }
    }
    unreachable!()
}

fn main() {
    let prefix = env_usize("LLMD_BENCH_PREFIX", 2048);
    let gen = env_usize("LLMD_BENCH_GEN", 128);
    let repeat = env_usize("LLMD_BENCH_REPEAT", 3);
    let selected = env::model_selected;
    println!(
        "KV tiers vs recompute (CPU, {} threads)",
        rayon::current_num_threads()
    );
    for name in ["smollm2-135m-instruct", "stories260K"] {
        if !selected(name) {
            continue;
        }
        let Some(dir) = common::shared_model(name) else {
            continue;
        };
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let vocab = cfg["vocab_size"].as_u64().unwrap() as usize;
        let max_pos = cfg["max_position_embeddings"].as_u64().unwrap() as usize;
        let prefix = prefix.min(max_pos - 64).div_ceil(16) * 16;

        let parts = std::env::var("LLMD_BENCH_PARTS").unwrap_or_else(|_| "ttft,decode".into());
        if parts.contains("ttft") {
            ttft_part(name, &dir, prefix, vocab);
        }
        if parts.contains("decode") {
            decode_part(name, &dir, vocab, gen, repeat);
        }
    }
}

fn ttft_part(name: &str, dir: &Path, prefix: usize, vocab: usize) {
    let (recompute, _, hits) = ttft_after_eviction(dir, prefix, vocab, TierConfig::default(), None);
    println!(
        "{name}: prefix {prefix} tokens; recompute TTFT {:.1} ms (device hits {hits} tokens)",
        ms(recompute)
    );
    let (host, s, hits) = ttft_after_eviction(
        dir,
        prefix,
        vocab,
        TierConfig {
            host_bytes: 4 << 30,
            ..Default::default()
        },
        None,
    );
    let s = s.unwrap();
    println!(
            "{name}: host tier TTFT {:.1} ms, {:.2}x faster (loaded {} tokens, device hits {hits}, decision {})",
            ms(host),
            recompute.as_secs_f64() / host.as_secs_f64(),
            s.load_hit_tokens,
            decision(&s, Tier::Host),
        );
    let disk_dir = tempfile::tempdir().unwrap();
    let (disk, s, hits) = ttft_after_eviction(
        dir,
        prefix,
        vocab,
        TierConfig {
            host_bytes: 1 << 20,
            disk_path: Some(disk_dir.path().to_path_buf()),
            disk_bytes: 8 << 30,
            ..Default::default()
        },
        Some(disk_dir.path()),
    );
    let s = s.unwrap();
    println!(
            "{name}: disk tier TTFT {:.1} ms (page cache dropped), {:.2}x faster (loaded {} tokens, device hits {hits}, decision {})",
            ms(disk),
            recompute.as_secs_f64() / disk.as_secs_f64(),
            s.load_hit_tokens,
            decision(&s, Tier::Disk),
        );
}

fn decode_part(name: &str, dir: &Path, vocab: usize, gen: usize, repeat: usize) {
    let batch = 8;
    let gen = if name.starts_with("stories") {
        gen * 2
    } else {
        gen
    };
    let mut off = 0f64;
    let mut on = 0f64;
    let mut stored = 0;
    for _ in 0..repeat {
        off = off.max(evicting_decode(dir, vocab, batch, gen, false).0);
        let (t, b) = evicting_decode(dir, vocab, batch, gen, true);
        on = on.max(t);
        stored = b;
    }
    println!(
            "{name}: evicting decode, batch {batch}, {gen} tokens: off {off:.1} tok/s, on {on:.1} tok/s, on/off {:.3} (target >= 0.95; {:.1} MB offloaded per run)",
            on / off,
            stored as f64 / 1e6
        );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn decision(s: &llmd::kv::connector::TierStats, tier: Tier) -> String {
    format!(
        "{} (load {:.1} us/block vs recompute {:.1} us/block)",
        if s.costs.load_wins(tier) {
            "load"
        } else {
            "recompute"
        },
        s.costs.load_ns[tier.index()] / 1e3,
        s.costs.recompute_ns / 1e3
    )
}
