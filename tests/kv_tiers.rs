//! The KV tiers below the device pool on real models (stories260K, SmolLM2): a prefix evicted
//! from a small device pool comes back from host memory, from disk (also after a restart),
//! and from a Redis server shared by two engines — each time giving exactly the tokens of a
//! run with an unbounded device pool — and corrupt, truncated or vanished blocks cost only a
//! recompute.
mod common;

use llmd::engine::{EngineCore, Prompt};
use llmd::kv::connector::TierStats;
use llmd::kv::tiers::{Tier, TierConfig};
use llmd::kv::{BlockHashAlgo, BlockHasher};
use llmd::{EngineConfig, RequestId, SamplingParams};
use std::path::Path;
use std::time::{Duration, Instant};

/// stories260K with a device pool of 20 blocks of 16 tokens (room for one 256-token sequence
/// and a little more), or an unbounded pool when `tiers` is None.
fn config(model: &Path, tiers: Option<TierConfig>) -> EngineConfig {
    let mut c = EngineConfig::new(model);
    c.max_model_len = Some(256);
    c.scheduler.max_num_batched_tokens = 64;
    c.scheduler.max_num_seqs = 4;
    match tiers {
        Some(t) => {
            c.cache.num_blocks = Some(20);
            c.kv_tiers = t;
        }
        None => c.cache.num_blocks = Some(512),
    }
    c
}

fn greedy(max_tokens: usize) -> SamplingParams {
    let mut p = SamplingParams::greedy();
    p.max_tokens = Some(max_tokens);
    p.ignore_eos = true;
    p
}

/// Runs one request to the end; its tokens.
fn run(core: &mut EngineCore, id: &str, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let id = RequestId::from(id);
    core.add_request(
        id.clone(),
        &Prompt::Tokens(prompt.to_vec()),
        greedy(max_tokens),
        0,
    )
    .unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while core.has_unfinished_requests() {
        assert!(Instant::now() < deadline, "request {id} never finished");
        for o in core.step().unwrap() {
            if o.request_id == id {
                out.extend(o.new_token_ids);
            }
        }
    }
    out
}

/// `n` pseudo-random ordinary token ids below `vocab`, different for each `seed`.
fn prompt(n: usize, seed: u32, vocab: u32) -> Vec<u32> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            4 + x % (vocab - 4)
        })
        .collect()
}

fn tier_stats(core: &EngineCore) -> TierStats {
    core.tier_stats().expect("tiers are on")
}

/// The scenario every tier test runs: prompt A, then a filler that evicts most of A from the
/// 20-block device pool, then A extended. Returns the tokens of the last request.
fn evict_and_return(core: &mut EngineCore, a: &[u32], filler: &[u32], tag: &str) -> Vec<u32> {
    run(core, &format!("{tag}-a"), a, 8);
    run(core, &format!("{tag}-filler"), filler, 8);
    let mut again = a.to_vec();
    again.extend(prompt(20, 99, 500));
    run(core, &format!("{tag}-again"), &again, 24)
}

fn reference(model: &Path, a: &[u32], filler: &[u32]) -> Vec<u32> {
    let mut core = EngineCore::new(config(model, None)).unwrap();
    evict_and_return(&mut core, a, filler, "ref")
}

fn stories() -> Option<std::path::PathBuf> {
    common::shared_model("stories260K")
}

fn host_only(bytes: usize) -> TierConfig {
    TierConfig {
        host_bytes: bytes,
        always_load: true,
        ..Default::default()
    }
}

#[test]
fn evicted_prefix_comes_back_from_host_memory() {
    let Some(model) = stories() else { return };
    let (a, filler) = (prompt(160, 1, 500), prompt(230, 2, 500));
    let want = reference(&model, &a, &filler);
    let mut core = EngineCore::new(config(&model, Some(host_only(64 << 20)))).unwrap();
    let computed_before = core.counters().prompt_tokens_computed;
    let got = evict_and_return(&mut core, &a, &filler, "host");
    assert_eq!(
        got, want,
        "tokens after a host-tier load differ from the unbounded pool's"
    );
    let s = tier_stats(&core);
    assert!(s.loaded_blocks[Tier::Host.index()] > 0, "{s:?}");
    assert!(s.load_hit_tokens >= 16, "{s:?}");
    assert_eq!(s.checksum_failures, 0);
    // The 180-token request computed only what neither the device nor the host held.
    let computed = core.counters().prompt_tokens_computed - computed_before;
    assert!(
        computed < 160 + 230 + 180 - s.load_hit_tokens + 1,
        "computed {computed}, loaded {}",
        s.load_hit_tokens
    );
    // The decision was measured for the host tier.
    assert!(s.costs.load_ns[Tier::Host.index()] > 0.0 && s.costs.recompute_ns > 0.0);
    assert_eq!(core.num_free_blocks(), 20, "every block came back");
    // One prefix lookup counted per request (not one more for the probe of the tiers).
    assert_eq!(
        core.scheduler().prefix_cache_stats().queries,
        160 + 230 + 180
    );
}

fn disk_tier(path: &Path) -> TierConfig {
    TierConfig {
        // Two records' worth: almost everything goes on to disk.
        host_bytes: 2 * 21_000,
        disk_path: Some(path.to_path_buf()),
        disk_bytes: 64 << 20,
        always_load: true,
        ..Default::default()
    }
}

fn disk_files(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for layout in std::fs::read_dir(root).unwrap().flatten() {
        for f in std::fs::read_dir(layout.path()).unwrap().flatten() {
            if f.path().extension().is_some_and(|e| e == "kvb") {
                out.push(f.path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn evicted_prefix_comes_back_from_disk_and_after_a_restart() {
    let Some(model) = stories() else { return };
    let (a, filler) = (prompt(160, 3, 500), prompt(230, 4, 500));
    let want = reference(&model, &a, &filler);
    let dir = tempfile::tempdir().unwrap();
    let mut core = EngineCore::new(config(&model, Some(disk_tier(dir.path())))).unwrap();
    assert_eq!(evict_and_return(&mut core, &a, &filler, "disk"), want);
    let s = tier_stats(&core);
    assert!(s.loaded_blocks[Tier::Disk.index()] > 0, "{s:?}");
    assert!(s.blocks[Tier::Disk.index()] > 0);
    drop(core);

    // A new engine on the same directory finds A's blocks: the whole 160-token prefix (10
    // blocks) is loaded, nothing of it recomputed.
    let mut core = EngineCore::new(config(&model, Some(disk_tier(dir.path())))).unwrap();
    let mut again = a.clone();
    again.extend(prompt(20, 99, 500));
    let got = run(&mut core, "restart", &again, 24);
    assert_eq!(got, want, "tokens after a restart differ");
    let s = tier_stats(&core);
    assert!(s.loaded_blocks[Tier::Disk.index()] >= 10, "{s:?}");
    assert!(core.counters().prompt_tokens_computed <= 180 - 160);
}

/// The disk file of block `i` of `tokens` (the default hash algorithm and seed).
fn block_file(root: &Path, tokens: &[u32], i: usize) -> std::path::PathBuf {
    let seed = std::env::var("PYTHONHASHSEED").unwrap_or_else(|_| "0".into());
    let hasher = BlockHasher::new(BlockHashAlgo::Xxh3, &seed);
    let mut h = None;
    for b in 0..=i {
        h = Some(hasher.hash(h.as_ref(), &tokens[b * 16..(b + 1) * 16], &[]));
    }
    let name = format!("{}.kvb", h.unwrap().to_hex());
    disk_files(root)
        .into_iter()
        .find(|f| f.file_name().is_some_and(|n| n.to_string_lossy() == name))
        .unwrap_or_else(|| panic!("block {i} is not on disk"))
}

#[derive(Clone, Copy, Debug)]
enum Damage {
    /// One payload byte flipped.
    FlipByte,
    /// The tail lost and zero-filled back to size: what a crash after the rename, before
    /// the data reached the disk, leaves.
    ZeroTail,
}

#[test]
fn corrupt_and_truncated_disk_blocks_are_recomputed() {
    let Some(model) = stories() else { return };
    let (a, filler) = (prompt(160, 5, 500), prompt(230, 6, 500));
    let want = reference(&model, &a, &filler);
    let mut again = a.clone();
    again.extend(prompt(20, 99, 500));
    for damage in [Damage::FlipByte, Damage::ZeroTail] {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut core = EngineCore::new(config(&model, Some(disk_tier(dir.path())))).unwrap();
            assert_eq!(evict_and_return(&mut core, &a, &filler, "w"), want);
        }
        // Block 0 is damaged in place (its length still right, so only the checksum can
        // tell); block 1 is cut short for real, which the tier notices when it opens.
        let b0 = block_file(dir.path(), &again, 0);
        let mut bytes = std::fs::read(&b0).unwrap();
        let len = bytes.len();
        match damage {
            Damage::FlipByte => bytes[len / 2] ^= 0x5a,
            Damage::ZeroTail => bytes[len / 3..].fill(0),
        }
        std::fs::write(&b0, bytes).unwrap();
        let b1 = block_file(dir.path(), &again, 1);
        let len1 = std::fs::metadata(&b1).unwrap().len();
        common::truncate_file(&b1, len1 / 2);

        let mut core = EngineCore::new(config(&model, Some(disk_tier(dir.path())))).unwrap();
        assert!(
            !b1.exists(),
            "{damage:?}: the short file is removed when the tier opens"
        );
        let got = run(&mut core, "after-damage", &again, 24);
        assert_eq!(got, want, "{damage:?}: damaged blocks changed the tokens");
        let s = tier_stats(&core);
        assert_eq!(s.checksum_failures, 1, "{damage:?}: {s:?}");
        assert_eq!(s.loaded_blocks[Tier::Disk.index()], 0, "{damage:?}");
        // Block 0 failed, so the whole prompt was recomputed.
        assert_eq!(core.counters().prompt_tokens_computed, 180, "{damage:?}");
    }
}

#[test]
fn a_block_from_another_model_is_refused() {
    let Some(model) = stories() else { return };
    let dir = tempfile::tempdir().unwrap();
    let a = prompt(100, 7, 500);
    {
        let mut core = EngineCore::new(config(&model, Some(disk_tier(dir.path())))).unwrap();
        run(&mut core, "a", &a, 4);
        run(&mut core, "evict", &prompt(250, 8, 500), 4);
    }
    // The same records planted under another model's layout directory are never read as
    // that model's: a model with another fingerprint has its own directory, so it finds
    // nothing; copying the files into its directory makes them fail the identity check.
    let other_dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        if model.join(f).exists() {
            std::fs::copy(model.join(f), other_dir.path().join(f)).unwrap();
        }
    }
    // A different checkpoint: one weight byte changed at the end of the file.
    let w = other_dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&w, bytes).unwrap();
    let mut core = EngineCore::new(config(other_dir.path(), Some(disk_tier(dir.path())))).unwrap();
    let theirs = disk_files(dir.path());
    let mine = theirs
        .iter()
        .map(|f| f.parent().unwrap().to_path_buf())
        .collect::<std::collections::BTreeSet<_>>();
    assert_eq!(mine.len(), 1, "only the first model wrote blocks so far");
    // Plant the first model's records in the second model's layout directory.
    let own_layout = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| !mine.contains(p))
        .expect("the second engine made its layout directory");
    for f in &theirs {
        std::fs::copy(f, own_layout.join(f.file_name().unwrap())).unwrap();
    }
    drop(core);
    core = EngineCore::new(config(other_dir.path(), Some(disk_tier(dir.path())))).unwrap();
    run(&mut core, "other", &a, 4);
    let s = tier_stats(&core);
    assert!(
        s.checksum_failures >= 1,
        "a foreign record was not refused: {s:?}"
    );
    assert_eq!(s.loaded_blocks[Tier::Disk.index()], 0, "{s:?}");
    assert_eq!(core.counters().prompt_tokens_computed, 100);
}

#[test]
fn two_engines_share_a_prefix_through_redis_and_survive_its_death() {
    let Some(model) = stories() else { return };
    let Some(mut server) = common::RedisServer::start() else {
        return;
    };
    let url = server.url();
    let remote = || TierConfig {
        remote_url: Some(url.clone()),
        always_load: true,
        ..Default::default()
    };
    let a = prompt(160, 9, 500);
    let mut again = a.clone();
    again.extend(prompt(20, 99, 500));
    let want = {
        let mut core = EngineCore::new(config(&model, None)).unwrap();
        run(&mut core, "ref", &again, 24)
    };
    let mut first = EngineCore::new(config(&model, Some(remote()))).unwrap();
    run(&mut first, "compute", &a, 4);
    // The tier thread writes asynchronously: wait until the blocks are on the server.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tier_stats(&first).blocks[Tier::Remote.index()] < 9 {
        assert!(Instant::now() < deadline, "{:?}", tier_stats(&first));
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut second = EngineCore::new(config(&model, Some(remote()))).unwrap();
    let got = run(&mut second, "load", &again, 24);
    assert_eq!(got, want, "tokens after a remote load differ");
    let s = tier_stats(&second);
    assert!(s.loaded_blocks[Tier::Remote.index()] >= 9, "{s:?}");
    assert!(
        second.counters().prompt_tokens_computed <= 180 - 9 * 16,
        "the second engine recomputed the prefix"
    );

    // The server dies: the next requests recompute and still answer correctly.
    server.kill();
    let b = prompt(120, 10, 500);
    let want_b = {
        let mut core = EngineCore::new(config(&model, None)).unwrap();
        run(&mut core, "ref-b", &b, 12)
    };
    let got_b = run(&mut second, "after-death", &b, 12);
    assert_eq!(got_b, want_b);
    let mut third = EngineCore::new(config(&model, Some(remote()))).unwrap();
    assert_eq!(run(&mut third, "no-server", &b, 12), want_b);
    assert!(tier_stats(&third).errors[Tier::Remote.index()] >= 1);
}

#[test]
fn smollm2_prefix_from_host_and_from_disk_matches_an_unbounded_pool() {
    let Some(model) = common::shared_model("smollm2-135m-instruct") else {
        return;
    };
    let (a, filler) = (prompt(160, 11, 49_000), prompt(230, 12, 49_000));
    let want = {
        let mut core = EngineCore::new(config(&model, None)).unwrap();
        evict_and_return(&mut core, &a, &filler, "ref")
    };
    let dir = tempfile::tempdir().unwrap();
    for (tier, tiers) in [
        (
            Tier::Host,
            TierConfig {
                host_bytes: 64 << 20,
                ..Default::default()
            },
        ),
        (
            Tier::Disk,
            TierConfig {
                // One SmolLM2 block (737 KB) in memory: the prefix comes from files.
                host_bytes: 1 << 20,
                disk_path: Some(dir.path().to_path_buf()),
                disk_bytes: 1 << 30,
                ..Default::default()
            },
        ),
    ] {
        let mut core = EngineCore::new(config(&model, Some(tiers))).unwrap();
        let got = evict_and_return(&mut core, &a, &filler, "smol");
        assert_eq!(got, want, "{tier:?}");
        let s = tier_stats(&core);
        // On SmolLM2 a block is far cheaper to load than to recompute: the measured decision
        // loads (no override here).
        assert!(s.costs.load_wins(tier), "{tier:?}: {s:?}");
        assert!(s.loaded_blocks[tier.index()] > 0, "{tier:?}: {s:?}");
        assert!(s.load_hit_tokens >= 16, "{tier:?}");
    }
}

/// LongRoPE's factors depend on the engine's context (`max_model_len` past the model's
/// original context: the long ones), so the same tokens give other KV: blocks a short-context
/// engine wrote to disk are never loaded by a long-context one on the same model files (its
/// KV identity differs), and are loaded by another short-context engine; each gives the
/// tokens of an engine without tiers of its own context.
#[test]
fn longrope_blocks_are_shared_only_between_engines_with_the_same_factors() {
    let model = tempfile::tempdir().unwrap();
    let spec = common::TinyModelSpec::new(common::Arch::Phi3);
    common::write_tiny_model(model.path(), &spec);
    // 512 positions grown from 160.
    assert_eq!(spec.max_pos, 512);
    common::set_longrope(model.path(), &spec, 160, None);
    let disk = tempfile::tempdir().unwrap();
    // A device pool of one sequence and a block (the writer's 140-token filler evicts the
    // prompt's blocks), or a large pool without tiers; `max_model_len` 150 keeps the short
    // factors, 256 takes the long.
    let engine = |max_model_len: usize, tiers: bool| {
        let mut c = EngineConfig::new(model.path());
        c.max_model_len = Some(max_model_len);
        c.scheduler.max_num_batched_tokens = 64;
        c.cache.num_blocks = Some(if tiers {
            max_model_len.div_ceil(16) + 1
        } else {
            64
        });
        if tiers {
            c.kv_tiers = TierConfig {
                host_bytes: 1,
                disk_path: Some(disk.path().to_path_buf()),
                disk_bytes: 64 << 20,
                always_load: true,
                ..Default::default()
            };
        }
        EngineCore::new(c).unwrap()
    };
    let a = prompt(96, 21, spec.vocab as u32);
    let filler = prompt(140, 22, spec.vocab as u32);
    {
        let mut writer = engine(150, true);
        run(&mut writer, "a", &a, 8);
        run(&mut writer, "filler", &filler, 8);
    }
    let mut long = engine(256, true);
    let got_long = run(&mut long, "a", &a, 8);
    assert_eq!(
        tier_stats(&long).loaded_blocks,
        [0; 3],
        "long-context engine loaded short KV"
    );
    assert_eq!(got_long, run(&mut engine(256, false), "a", &a, 8));
    let mut short = engine(150, true);
    let got_short = run(&mut short, "a", &a, 8);
    assert!(
        tier_stats(&short).loaded_blocks[Tier::Disk.index()] > 0,
        "{:?}",
        tier_stats(&short)
    );
    assert_eq!(got_short, run(&mut engine(150, false), "a", &a, 8));
    assert_ne!(
        got_short, got_long,
        "the two factor sets should differ on this model"
    );
}
