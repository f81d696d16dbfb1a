//! The KV tiers below the device pool on real models (stories260K, SmolLM2): a prefix evicted
//! from a small device pool comes back from host memory, from disk (also after a restart),
//! and from a Redis server shared by two engines — each time giving exactly the tokens of a
//! run with an unbounded device pool — and corrupt, truncated or vanished blocks cost only a
//! recompute.
mod common;

use llmd::config::KvEventsHandle;
use llmd::engine::{EngineCore, Prompt};
use llmd::kv::auth::ClusterSecret;
use llmd::kv::connector::TierStats;
use llmd::kv::events::RecordingSink;
use llmd::kv::tiers::{RemoteOptions, Tier, TierConfig};
use llmd::kv::{BlockHash, BlockHashAlgo, BlockHasher, KvEvent, Medium};
use llmd::{EngineConfig, RequestId, SamplingParams};
use std::path::Path;
use std::sync::Arc;
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

// ---- Security of the tiers (issue 20) ----

const SECRET: &[u8] = b"the cluster secret of this test, 32b";

fn secret() -> ClusterSecret {
    ClusterSecret::new(SECRET).unwrap()
}

fn remote_tier(url: &str, secret: Option<ClusterSecret>) -> TierConfig {
    TierConfig {
        remote_url: Some(url.to_string()),
        remote: RemoteOptions {
            secret,
            ..Default::default()
        },
        always_load: true,
        ..Default::default()
    }
}

/// Every `llmd:kv:*` key on the server and its value.
fn remote_values(c: &mut redis::Connection) -> Vec<(String, Vec<u8>)> {
    let keys: Vec<String> = redis::cmd("KEYS").arg("llmd:kv:*").query(c).unwrap();
    keys.into_iter()
        .map(|k| {
            let v: Vec<u8> = redis::cmd("GET").arg(&k).query(c).unwrap();
            (k, v)
        })
        .collect()
}

/// `record` (a block record, see `llmd::kv::block_record`) with its payload replaced by
/// zeros and a valid checksum: what a writer to Redis who knows the format plants.
fn poisoned(record: &[u8]) -> Vec<u8> {
    let u32_at = |i: usize| u32::from_le_bytes(record[i..i + 4].try_into().unwrap()) as usize;
    let header_len = u32_at(8);
    let payload_len = u64::from_le_bytes(record[12..20].try_into().unwrap()) as usize;
    let hash = BlockHash(record[20..52].try_into().unwrap());
    let identity = std::str::from_utf8(&record[56..56 + u32_at(52)]).unwrap();
    assert_eq!(
        llmd::kv::block_record::decode(record, &hash, identity, payload_len)
            .unwrap()
            .len(),
        payload_len
    );
    assert!(header_len + payload_len < record.len());
    llmd::kv::block_record::encode(&hash, identity, &vec![0; payload_len])
}

/// Records in Redis are `record || HMAC(secret, key, record)`; a value whose tag does not
/// verify — a bad tag, a tag under another secret, or no tag at all (what a writer without
/// the secret puts there) — is refused like a corrupt record: counted, never loaded, the
/// prompt recomputed with the tokens of an engine without tiers. An engine without a secret
/// takes the planted records (the threat is real).
#[test]
fn remote_records_with_a_bad_mac_are_refused_and_recomputed() {
    let Some(model) = stories() else { return };
    let Some(server) = common::RedisServer::start() else {
        return;
    };
    let url = server.url();
    let mut c = server.client();
    let a = prompt(160, 31, 500);
    let mut again = a.clone();
    again.extend(prompt(20, 99, 500));
    let want = run(
        &mut EngineCore::new(config(&model, None)).unwrap(),
        "ref",
        &again,
        24,
    );
    {
        let mut writer =
            EngineCore::new(config(&model, Some(remote_tier(&url, Some(secret()))))).unwrap();
        run(&mut writer, "compute", &a, 4);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tier_stats(&writer).blocks[Tier::Remote.index()] < 10 {
            assert!(Instant::now() < deadline, "{:?}", tier_stats(&writer));
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let written = remote_values(&mut c);
    assert!(written.len() >= 10, "{}", written.len());
    // What the worker wrote: the record, then its tag under the secret.
    for (k, v) in &written {
        let (rec, tag) = v.split_at(v.len() - 32);
        assert!(
            secret().verify("kv-remote-record", &[k.as_bytes(), rec], tag),
            "{k}"
        );
    }
    let other = ClusterSecret::new(b"a secret this deployment never had").unwrap();
    type Forge = fn(&str, &[u8], &ClusterSecret) -> Vec<u8>;
    let variants: [(&str, Forge); 3] = [
        ("the worker's record, its tag damaged", |_, v, _| {
            let mut v = v.to_vec();
            let n = v.len();
            v[n - 1] ^= 1;
            v
        }),
        (
            "a poisoned record tagged under another secret",
            |k, v, other| {
                let mut p = poisoned(&v[..v.len() - 32]);
                let tag = other.mac("kv-remote-record", &[k.as_bytes(), &p]);
                p.extend_from_slice(&tag);
                p
            },
        ),
        ("a poisoned record without a tag", |_, v, _| {
            poisoned(&v[..v.len() - 32])
        }),
    ];
    for (what, forge) in variants {
        for (k, v) in &written {
            let _: () = redis::cmd("SET")
                .arg(k)
                .arg(forge(k, v, &other))
                .query(&mut c)
                .unwrap();
        }
        let mut reader =
            EngineCore::new(config(&model, Some(remote_tier(&url, Some(secret()))))).unwrap();
        let got = run(&mut reader, "read", &again, 24);
        assert_eq!(
            got, want,
            "{what}: tokens differ from an engine without tiers"
        );
        let s = tier_stats(&reader);
        assert_eq!(s.loaded_blocks[Tier::Remote.index()], 0, "{what}: {s:?}");
        assert!(s.auth_failures >= 1, "{what}: not counted: {s:?}");
        assert_eq!(s.checksum_failures, s.auth_failures, "{what}: {s:?}");
        assert_eq!(reader.counters().prompt_tokens_computed, 180, "{what}");
        // The metric the refusal is counted in.
        let mut text = String::new();
        llmd::server::metrics::render_tiers(&mut text, "model_name=\"m\"", &s);
        assert!(
            common::metric(&text, "llmd:kv_tier_auth_failures_total", "") >= 1.0,
            "{what}: {text}"
        );
    }
    // Without a secret the same planted records are taken as the prompt's KV.
    for (k, v) in &written {
        let _: () = redis::cmd("SET")
            .arg(k)
            .arg(poisoned(&v[..v.len() - 32]))
            .query(&mut c)
            .unwrap();
    }
    let mut trusting = EngineCore::new(config(&model, Some(remote_tier(&url, None)))).unwrap();
    run(&mut trusting, "trusting", &again, 24);
    let s = tier_stats(&trusting);
    assert!(s.loaded_blocks[Tier::Remote.index()] >= 10, "{s:?}");
    assert_eq!(s.auth_failures, 0);
}

/// Reads `fifo` to its end on a thread of its own (detached: it may wait for a writer that
/// never comes), so a writer stuck opening it goes on. Also on drop: a test that fails still
/// lets the tier thread finish, so the engine's drop does not hang.
struct Unblock(std::path::PathBuf, bool);

impl Unblock {
    fn now(&mut self) {
        if !std::mem::replace(&mut self.1, true) {
            let fifo = self.0.clone();
            std::thread::spawn(move || std::fs::read(fifo));
        }
    }
}

impl Drop for Unblock {
    fn drop(&mut self) {
        self.now();
    }
}

/// A tier that never finishes a store (the disk tier writing into a FIFO nobody reads) and
/// many stores: the queue holds at most its capacity, the rest are dropped and counted, and
/// the engine thread keeps serving with the right tokens.
#[test]
fn a_stuck_tier_drops_stores_and_never_blocks_the_engine() {
    let Some(model) = stories() else { return };
    let dir = tempfile::tempdir().unwrap();
    let tiers = TierConfig {
        disk_path: Some(dir.path().to_path_buf()),
        disk_bytes: 64 << 20,
        queue_blocks: 4,
        always_load: true,
        ..Default::default()
    };
    let prompts: Vec<Vec<u32>> = (0..12).map(|i| prompt(64, 40 + i, 500)).collect();
    let want: Vec<Vec<u32>> = {
        let mut core = EngineCore::new(config(&model, None)).unwrap();
        prompts
            .iter()
            .enumerate()
            .map(|(i, p)| run(&mut core, &format!("ref{i}"), p, 8))
            .collect()
    };
    let mut core = EngineCore::new(config(&model, Some(tiers))).unwrap();
    // The first block the engine stores is the first prompt's first: its `.tmp` is a FIFO, so
    // the tier thread blocks opening it.
    let layout = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .next()
        .expect("the disk tier made its layout directory")
        .path();
    let seed = std::env::var("PYTHONHASHSEED").unwrap_or_else(|_| "0".into());
    let first = BlockHasher::new(BlockHashAlgo::Xxh3, &seed).hash(None, &prompts[0][..16], &[]);
    let fifo = layout.join(format!("{}.tmp", first.to_hex()));
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string and mode.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut unblock = Unblock(fifo, false);
    let mut max_queued = 0;
    for (i, p) in prompts.iter().enumerate() {
        let got = run(&mut core, &format!("p{i}"), p, 8);
        assert_eq!(got, want[i], "request {i}");
        max_queued = max_queued.max(tier_stats(&core).queued_blocks);
    }
    let s = tier_stats(&core);
    assert_eq!(s.blocks[Tier::Disk.index()], 0, "the tier was stuck: {s:?}");
    assert!(
        max_queued <= 4,
        "the queue grew past its capacity: {max_queued}"
    );
    // 12 prompts of 4 blocks each and more: all but a few were dropped.
    assert!(s.dropped_blocks >= 12 * 4 - 4 - 8, "{s:?}");
    let mut text = String::new();
    llmd::server::metrics::render_tiers(&mut text, "model_name=\"m\"", &s);
    assert_eq!(
        common::metric(&text, "llmd:kv_tier_dropped_blocks_total", ""),
        s.dropped_blocks as f64
    );
    unblock.now();
    drop(core);
    drop(unblock);
}

/// Mounts a tmpfs of `size` at `dir`, unmounted on drop; None (after saying why) where this
/// machine does not let the test mount one. Under CI it fails instead when the refusal came
/// to root holding CAP_SYS_ADMIN, who can mount.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Self(dir.to_path_buf())),
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                    Err(e) => e.to_string(),
                };
                // SAFETY: geteuid has no preconditions.
                let root = unsafe { libc::geteuid() } == 0;
                let cap_sys_admin = std::fs::read_to_string("/proc/self/status")
                    .ok()
                    .and_then(|s| {
                        let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
                        u64::from_str_radix(hex, 16).ok()
                    })
                    .is_some_and(|caps| caps & (1 << 21) != 0);
                assert!(
                    !(std::env::var("CI").as_deref() == Ok("true") && root && cap_sys_admin),
                    "root with CAP_SYS_ADMIN could not mount a tmpfs: {why}"
                );
                eprintln!("skipping: cannot mount a tmpfs here (root: {root}, CAP_SYS_ADMIN: {cap_sys_admin}): {why}");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The disk tier on a real 1 MiB filesystem, filled until writes fail: no `.tmp` is left,
/// every block the tier indexes is a whole file on disk, the `BlockStored`/`BlockRemoved`
/// events for the disk medium add up to exactly the files there, and the blocks that did fit
/// load back correctly after a restart.
#[test]
fn a_full_disk_keeps_the_index_and_the_events_true() {
    let Some(model) = stories() else { return };
    let dir = tempfile::tempdir().unwrap();
    let Some(_mounted) = Tmpfs::mount(dir.path(), "1m") else {
        return;
    };
    let tiers = || TierConfig {
        disk_path: Some(dir.path().to_path_buf()),
        // Far more than the filesystem holds: the disk fills before the tier evicts.
        disk_bytes: 64 << 20,
        always_load: true,
        ..Default::default()
    };
    let sink = Arc::new(RecordingSink::default());
    let mut c = config(&model, Some(tiers()));
    c.kv_events = Some(KvEventsHandle(sink.clone()));
    let mut core = EngineCore::new(c).unwrap();
    let stats = core.tier_stats_handle().unwrap();
    // 8 prompts of 10 blocks and their decode blocks: ~90 records of ~21 KB, on 1 MiB.
    let prompts: Vec<Vec<u32>> = (0..8).map(|i| prompt(160, 60 + i, 500)).collect();
    for (i, p) in prompts.iter().enumerate() {
        run(&mut core, &format!("fill{i}"), p, 4);
    }
    drop(core); // the tier thread finishes every queued store
    let s = stats.get();
    assert!(
        s.errors[Tier::Disk.index()] > 0,
        "the disk never filled: {s:?}"
    );
    assert_eq!(s.queued_blocks, 0);
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .flat_map(|layout| std::fs::read_dir(layout.path()).unwrap().flatten())
        .map(|f| f.path())
        .collect();
    let tmp: Vec<_> = files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "tmp"))
        .collect();
    assert!(tmp.is_empty(), "failed writes left {tmp:?}");
    let kvb: Vec<_> = files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "kvb"))
        .collect();
    assert_eq!(kvb.len(), files.len(), "{files:?}");
    assert!(!kvb.is_empty());
    assert_eq!(kvb.len(), s.blocks[Tier::Disk.index()], "index vs files");
    let len = std::fs::metadata(kvb[0]).unwrap().len();
    for f in &kvb {
        assert_eq!(
            std::fs::metadata(f).unwrap().len(),
            len,
            "{f:?} is not whole"
        );
    }
    let on_disk: std::collections::BTreeSet<u64> = kvb
        .iter()
        .map(|f| {
            let stem = f.file_stem().unwrap().to_str().unwrap();
            BlockHash::from_hex(stem).unwrap().external()
        })
        .collect();
    let mut announced = std::collections::BTreeSet::new();
    for batch in sink.0.lock().unwrap().iter() {
        for e in batch {
            match e {
                KvEvent::BlockStored {
                    block_hashes,
                    medium: Medium::Disk,
                    ..
                } => announced.extend(block_hashes.iter().copied()),
                KvEvent::BlockRemoved {
                    block_hashes,
                    medium: Medium::Disk,
                } => {
                    for h in block_hashes {
                        announced.remove(h);
                    }
                }
                _ => {}
            }
        }
    }
    assert_eq!(announced, on_disk, "the disk's events vs its files");

    // A new engine on the full disk indexes exactly those files and loads what fits.
    let want = {
        let mut core = EngineCore::new(config(&model, None)).unwrap();
        run(&mut core, "ref", &prompts[0], 8)
    };
    let mut core = EngineCore::new(config(&model, Some(tiers()))).unwrap();
    assert_eq!(tier_stats(&core).blocks[Tier::Disk.index()], kvb.len());
    assert_eq!(run(&mut core, "again", &prompts[0], 8), want);
    let s = tier_stats(&core);
    assert_eq!(s.checksum_failures, 0, "{s:?}");
    assert!(s.loaded_blocks[Tier::Disk.index()] > 0, "{s:?}");
}

/// A CA and a certificate it signed for 127.0.0.1 and localhost, as PEM files in `dir`:
/// (ca.pem, server.pem, server.key).
fn test_pki(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "llmd test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, leaf.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// `llmd serve` on stories260K with `extra` flags, healthy.
async fn serve(tag: &str, model: &Path, extra: &[String]) -> common::LlmdProcess {
    let mut args: Vec<String> = ["serve", "--model"].map(String::from).to_vec();
    args.push(model.display().to_string());
    for a in [
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--device",
        "cpu",
        "--kv-cache-memory-gb",
        "0.02",
        "--kv-tier-always-load",
    ] {
        args.push(a.into());
    }
    args.extend(extra.iter().cloned());
    common::LlmdProcess::start(tag, &args, "/health").await
}

/// The text of a greedy completion of `prompt`.
async fn complete(p: &common::LlmdProcess, prompt: &str) -> String {
    let r = reqwest::Client::new()
        .post(p.url("/v1/completions"))
        .json(&serde_json::json!({"prompt": prompt, "max_tokens": 12, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

/// Two `llmd serve` workers share a prefix through a real Redis that speaks TLS only, with a
/// certificate from a CA made here (`--kv-remote-tls-ca-file`), AUTH (`requirepass`, the
/// password from `--kv-remote-password-file`) and records tagged with the cluster secret
/// (`--kv-transfer-secret-file`). Without the CA flag (only the built-in public roots) or
/// without the password, a worker gets no blocks from the server and still answers the same.
/// Values planted under the worker's keys by a client without the secret are refused and
/// counted in `llmd:kv_tier_auth_failures_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_blocks_over_tls_with_a_password_and_a_secret() {
    let Some(model) = stories() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_pki(dir.path());
    let password = "correct horse battery staple";
    let Some(server) = common::RedisServer::start_with(&common::RedisOptions {
        password: Some(password.into()),
        tls: Some((cert, key)),
    }) else {
        return;
    };
    let url = server.url();
    assert!(url.starts_with("rediss://"), "{url}");
    let pw_file = dir.path().join("password");
    std::fs::write(&pw_file, format!("{password}\n")).unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let s = |p: &Path| p.display().to_string();
    let url_flag = ["--kv-remote-url".to_string(), url.clone()];
    let ca_flag = ["--kv-remote-tls-ca-file".to_string(), s(&ca)];
    let pw_flag = ["--kv-remote-password-file".to_string(), s(&pw_file)];
    let secret_flag = ["--kv-transfer-secret-file".to_string(), s(&secret_file)];
    let all = [&url_flag[..], &ca_flag, &pw_flag, &secret_flag].concat();
    let prompt = "Once upon a time, there was a little girl named Lily. She loved to play \
                  outside in the sunshine. One day, she saw a big red ball in the park. "
        .repeat(3);
    let remote = |m: &str, name: &str| common::metric(m, name, "tier=\"remote\"");

    let first = serve("tls-first", &model, &all).await;
    let text = complete(&first, &prompt).await;
    first
        .metrics_until("blocks stored on the TLS server", |m| {
            remote(m, "llmd:kv_tier_blocks") >= 4.0
        })
        .await;

    let second = serve("tls-second", &model, &all).await;
    assert_eq!(complete(&second, &prompt).await, text);
    let m = second.metrics().await;
    assert!(remote(&m, "llmd:kv_tier_loaded_blocks_total") >= 4.0, "{m}");
    assert_eq!(
        common::metric(&m, "llmd:kv_tier_auth_failures_total", ""),
        0.0
    );
    drop(second);

    // The public roots do not trust this CA; no password is refused by the server.
    for (tag, flags) in [
        (
            "tls-no-ca",
            [&url_flag[..], &pw_flag, &secret_flag].concat(),
        ),
        (
            "tls-no-password",
            [&url_flag[..], &ca_flag, &secret_flag].concat(),
        ),
    ] {
        let w = serve(tag, &model, &flags).await;
        assert_eq!(complete(&w, &prompt).await, text, "{tag}");
        let m = w.metrics().await;
        assert_eq!(
            remote(&m, "llmd:kv_tier_loaded_blocks_total"),
            0.0,
            "{tag}: {m}"
        );
        assert!(remote(&m, "llmd:kv_tier_errors_total") >= 1.0, "{tag}: {m}");
    }

    // A client with the CA and the password but not the secret plants records.
    let mut c = redis::Client::build_with_tls(
        format!("rediss://:{password}@127.0.0.1:{}", server.port()),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(&ca).unwrap()),
        },
    )
    .unwrap()
    .get_connection_with_timeout(Duration::from_secs(5))
    .unwrap();
    let written = remote_values(&mut c);
    assert!(written.len() >= 4);
    for (k, v) in &written {
        let _: () = redis::cmd("SET")
            .arg(k)
            .arg(poisoned(&v[..v.len() - 32]))
            .query(&mut c)
            .unwrap();
    }
    let third = serve("tls-planted", &model, &all).await;
    assert_eq!(complete(&third, &prompt).await, text);
    let m = third.metrics().await;
    assert!(
        common::metric(&m, "llmd:kv_tier_auth_failures_total", "") >= 1.0,
        "{m}"
    );
    assert_eq!(remote(&m, "llmd:kv_tier_loaded_blocks_total"), 0.0, "{m}");
}

/// `llmd generate` with a password in the remote URL: neither its log (the URL logged when
/// the server cannot be reached) nor the error of a URL that does not parse contains the
/// password; both show `user:***@`.
#[test]
fn the_remote_password_never_reaches_logs_or_errors() {
    let Some(model) = stories() else { return };
    let pw = "s3cr3t-pw-not-for-logs";
    let port = common::free_port();
    let generate = |url: String| {
        std::process::Command::new(env!("CARGO_BIN_EXE_llmd"))
            .args(["generate", "--device", "cpu", "--max-tokens", "2"])
            .args(["--prompt", "Once upon a time", "--kv-tier-always-load"])
            .arg("--model")
            .arg(&model)
            .args(["--kv-remote-url", &url])
            .env("RUST_LOG", "debug")
            .output()
            .unwrap()
    };
    // Nothing listens on the port: the tier logs that the server is unreachable.
    let out = generate(format!("redis://user:{pw}@127.0.0.1:{port}"));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{all}");
    assert!(!all.contains(pw), "{all}");
    assert!(all.contains("user:***@"), "{all}");
    // A database that is not a number: start-up fails, naming the URL.
    let out = generate(format!("redis://user:{pw}@127.0.0.1:{port}/notadb"));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{all}");
    assert!(!all.contains(pw), "{all}");
    assert!(all.contains("user:***@"), "{all}");
}
