//! Disaggregated prefill/decode at the engine level, on stories260K: a prefill engine keeps a
//! finished prompt's KV for a decode engine, which decodes from the received blocks the exact
//! tokens a single engine produces, computing no prompt token itself; held blocks go back to
//! the pool when released or when their lease runs out.
mod common;

use llmd::engine::{EngineCore, Hold, KvOptions, Prompt, ReceivedKv};
use llmd::kv::auth::TransferToken;
use llmd::kv::transfer::HeldKv;
use llmd::{EngineConfig, RequestId, SamplingParams};
use std::time::Duration;

fn config() -> Option<EngineConfig> {
    let dir = common::shared_model("stories260K")?;
    let mut c = EngineConfig::new(dir);
    c.max_model_len = Some(256);
    c.cache.num_blocks = Some(64);
    c.scheduler.max_num_batched_tokens = 64;
    Some(c)
}

fn greedy(n: usize) -> SamplingParams {
    SamplingParams {
        max_tokens: Some(n),
        ignore_eos: true,
        ..SamplingParams::greedy()
    }
}

fn run(core: &mut EngineCore, id: &RequestId) -> Vec<u32> {
    let mut out = Vec::new();
    while core.has_unfinished_requests() {
        for o in core.step().unwrap() {
            if &o.request_id == id {
                out.extend(o.new_token_ids);
            }
        }
    }
    out
}

/// What one engine of `cfg` generates for `prompt` alone: `n` greedy tokens.
fn single_engine(cfg: EngineConfig, id: &RequestId, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut single = EngineCore::new(cfg).unwrap();
    single
        .add_request(id.clone(), &Prompt::Tokens(prompt.to_vec()), greedy(n), 0)
        .unwrap();
    run(&mut single, id)
}

/// The token the tests' held KV is read with.
const TOKEN: TransferToken = TransferToken([5; 16]);
/// Every block of a held request.
const ALL: std::ops::Range<usize> = 0..usize::MAX;

/// Queues a producer request: one token, its prompt's KV held for `lease` under [`TOKEN`].
fn add_held(core: &mut EngineCore, id: &RequestId, prompt: &[u32], lease: Duration) {
    add_held_salted(core, id, prompt, lease, None);
}

fn add_held_salted(
    core: &mut EngineCore,
    id: &RequestId,
    prompt: &[u32],
    lease: Duration,
    cache_salt: Option<&str>,
) {
    core.add_tokens_with_kv(
        id.clone(),
        prompt.to_vec(),
        greedy(1),
        0,
        KvOptions {
            hold: Some(Hold {
                lease,
                token: TOKEN,
            }),
            cache_salt: cache_salt.map(str::to_string),
            ..Default::default()
        },
    )
    .unwrap();
}

/// Queues a consumer request decoding `max_tokens` from KV received for its prompt.
fn add_received(
    core: &mut EngineCore,
    id: &RequestId,
    prompt: &[u32],
    max_tokens: usize,
    held: HeldKv,
) {
    core.add_tokens_with_kv(
        id.clone(),
        prompt.to_vec(),
        greedy(max_tokens),
        0,
        KvOptions {
            received: Some(ReceivedKv {
                payloads: held.payloads,
                covered: held.prompt_len,
            }),
            ..Default::default()
        },
    )
    .unwrap();
}

fn prompt(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 4 + (i * 7919 + 13) % 500).collect()
}

#[test]
fn decode_from_transferred_kv_matches_a_single_engine() {
    let Some(cfg) = config() else { return };
    // Prompt lengths: a whole number of blocks, one past, and a partial last block.
    for len in [48, 49, 57] {
        let p = prompt(len);
        let id = RequestId::from("r");
        let want = single_engine(cfg.clone(), &id, &p, 20);

        let mut prefill = EngineCore::new(cfg.clone()).unwrap();
        let idle = prefill.num_free_blocks();
        add_held(&mut prefill, &id, &p, Duration::from_secs(30));
        let first = run(&mut prefill, &id);
        assert_eq!(first, want[..1], "len {len}: the prefiller's token");
        assert_eq!(prefill.num_held(), 1);
        let held = prefill.read_held(&id, &TOKEN, ALL).unwrap().expect("held");
        assert_eq!(held.prompt_len, len);
        assert_eq!(held.payloads.len(), len.div_ceil(16));
        // What binds the blocks to the prompt is what a decoder computes for it; another
        // token reads nothing.
        let hasher = &prefill.limits().block_hasher;
        assert_eq!(held.hashes, hasher.hash_prompt(&p, 16, &[]));
        assert!(prefill
            .read_held(&id, &TransferToken([6; 16]), ALL)
            .unwrap()
            .is_none());
        assert!(prefill.num_free_blocks() < idle, "held blocks are not free");
        assert!(prefill.release_held(&id));
        assert_eq!(prefill.num_free_blocks(), idle, "released");
        assert!(!prefill.release_held(&id));

        let mut decode = EngineCore::new(cfg.clone()).unwrap();
        add_received(&mut decode, &id, &p, 20, held);
        let got = run(&mut decode, &id);
        assert_eq!(got, want, "len {len}: decoded from transferred KV");
        assert_eq!(
            decode.counters().prompt_tokens_computed,
            0,
            "len {len}: the decoder computed prompt tokens"
        );
        assert_eq!(decode.num_free_blocks(), 64);
    }
}

#[test]
fn held_kv_is_freed_when_its_lease_runs_out() {
    let Some(cfg) = config() else { return };
    let mut prefill = EngineCore::new(cfg).unwrap();
    let idle = prefill.num_free_blocks();
    let id = RequestId::from("lease");
    add_held(&mut prefill, &id, &prompt(40), Duration::from_millis(50));
    run(&mut prefill, &id);
    assert_eq!(prefill.num_held(), 1);
    assert_eq!(prefill.expire_held(), 0, "not yet");
    std::thread::sleep(Duration::from_millis(80));
    assert_eq!(prefill.expire_held(), 1);
    assert_eq!(prefill.num_free_blocks(), idle);
    assert!(prefill.read_held(&id, &TOKEN, ALL).unwrap().is_none());
    assert_eq!(prefill.counters().kv_leases_expired, 1);
}

#[test]
fn received_kv_that_does_not_fit_the_prompt_is_refused() {
    let Some(cfg) = config() else { return };
    let mut decode = EngineCore::new(cfg).unwrap();
    let bad = |payloads: Vec<Vec<u8>>, covered| KvOptions {
        received: Some(ReceivedKv { payloads, covered }),
        ..Default::default()
    };
    // stories260K: 5 layers × K,V × 16 tokens × 4 heads × 8 dims × 4 bytes.
    let block = vec![0u8; 5 * 2 * 16 * 4 * 8 * 4];
    for (i, opts) in [
        bad(vec![block.clone(); 2], 40),
        bad(vec![block.clone(); 3], 50),
        bad(vec![vec![0u8; 7]; 3], 40),
    ]
    .into_iter()
    .enumerate()
    {
        let e = decode
            .add_tokens_with_kv(RequestId(format!("b{i}")), prompt(40), greedy(2), 0, opts)
            .unwrap_err();
        assert!(e.to_string().contains("kv_transfer_params"), "{e}");
    }
    assert!(!decode.has_unfinished_requests());
}

#[test]
fn a_producer_serves_a_prefix_it_loads_from_its_host_tier() {
    let Some(mut cfg) = config() else { return };
    // A 20-block pool with a host tier: the producer's prefix comes back from the host tier
    // instead of being recomputed, and the decoder gets the same KV.
    cfg.cache.num_blocks = Some(20);
    cfg.kv_tiers = llmd::kv::tiers::TierConfig {
        host_bytes: 64 << 20,
        always_load: true,
        ..Default::default()
    };
    let p = prompt(160);
    let id = RequestId::from("t");
    let want = single_engine(config().unwrap(), &id, &p, 12);
    let mut prefill = EngineCore::new(cfg.clone()).unwrap();
    // Compute the prefix once, then evict it from the device with another prompt.
    prefill
        .add_request("first".into(), &Prompt::Tokens(p.clone()), greedy(1), 0)
        .unwrap();
    run(&mut prefill, &"first".into());
    let other: Vec<u32> = prompt(250).iter().map(|t| 4 + (t * 3) % 500).collect();
    prefill
        .add_request("evict".into(), &Prompt::Tokens(other), greedy(1), 0)
        .unwrap();
    run(&mut prefill, &"evict".into());
    let before = prefill.counters().prompt_tokens_computed;
    add_held(&mut prefill, &id, &p, Duration::from_secs(30));
    run(&mut prefill, &id);
    let stats = prefill.tier_stats().unwrap();
    assert!(stats.load_hit_tokens >= 16, "{stats:?}");
    assert!(
        prefill.counters().prompt_tokens_computed - before < 160,
        "the producer recomputed its whole prefix"
    );
    let held = prefill.read_held(&id, &TOKEN, ALL).unwrap().expect("held");
    prefill.release_held(&id);
    let mut cfg_decode = config().unwrap();
    cfg_decode.cache.num_blocks = Some(64);
    let mut decode = EngineCore::new(cfg_decode).unwrap();
    add_received(&mut decode, &id, &p, 12, held);
    assert_eq!(run(&mut decode, &id), want);
    assert_eq!(decode.counters().prompt_tokens_computed, 0);
}

/// The held KV of one request, served by the producer's side channel.
struct Holding {
    held: std::sync::Mutex<Option<HeldKv>>,
}

impl llmd::kv::transfer::HeldKvSource for Holding {
    fn engine_id(&self) -> &str {
        "prefill@1"
    }
    fn read(
        &self,
        _id: &str,
        _token: &TransferToken,
        blocks: std::ops::Range<usize>,
    ) -> futures_util::future::BoxFuture<'_, Result<Option<HeldKv>, String>> {
        let h = self.held.lock().unwrap().as_ref().map(|h| h.slice(blocks));
        Box::pin(async move { Ok(h) })
    }
    fn release(&self, _id: &str) {
        self.held.lock().unwrap().take();
    }
    fn read_prefix(
        &self,
        _hashes: Vec<llmd::kv::BlockHash>,
    ) -> futures_util::future::BoxFuture<'_, Result<Vec<Vec<u8>>, String>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// The RDMA transport's protocol end to end with a real model's KV: the prefiller's blocks
/// are staged in registered memory and READ by the decoder through the in-process model of
/// an RC fabric (no HCA here), then decoded from.
#[test]
fn decode_from_kv_read_over_rdma_matches_a_single_engine() {
    use llmd::kv::transfer::verbs::LoopbackNet;
    use llmd::kv::transfer::{
        serve, Expected, KvTransport, Producer, RdmaProducer, RdmaTransport, RemoteKv,
        TcpTransport, TransferStats,
    };
    use std::sync::Arc;
    let Some(cfg) = config() else { return };
    let p = prompt(57);
    let id = RequestId::from("r");
    let want = single_engine(cfg.clone(), &id, &p, 20);
    let mut prefill = EngineCore::new(cfg.clone()).unwrap();
    add_held(&mut prefill, &id, &p, Duration::from_secs(30));
    run(&mut prefill, &id);
    let held = prefill.read_held(&id, &TOKEN, ALL).unwrap().expect("held");
    let layout = prefill.limits().kv_layout.clone();
    let expected = Expected {
        prompt_len: p.len(),
        hashes: prefill.limits().block_hasher.hash_prompt(&p, 16, &[]),
    };

    let rt = tokio::runtime::Runtime::new().unwrap();
    let net = LoopbackNet::new();
    let fetched = rt.block_on(async {
        let producer = RdmaProducer::new(net.fabric(), &layout, 16 << 20).unwrap();
        let source = Arc::new(Holding {
            held: std::sync::Mutex::new(Some(held)),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(serve(
            listener,
            Producer {
                source: source.clone(),
                layout: layout.clone(),
                stats: Arc::new(TransferStats::default()),
                rdma: Some(Arc::new(producer)),
                secret: None,
            },
        ));
        let tcp = TcpTransport {
            layout: layout.clone(),
            timeout: Duration::from_secs(30),
            secret: None,
        };
        let consumer = RdmaTransport::new(tcp, net.fabric(), 16 << 20).unwrap();
        let f = consumer
            .fetch(
                &RemoteKv {
                    host: "127.0.0.1".into(),
                    port,
                    engine_id: "prefill@1".into(),
                    request_id: "r".into(),
                    token: TOKEN,
                },
                &expected,
            )
            .await
            .unwrap();
        assert_eq!(
            consumer
                .tcp_pulls
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(source.held.lock().unwrap().is_none(), "released once read");
        f
    });
    assert_eq!(fetched.prompt_len, 57);
    assert_eq!(
        net.reads.load(std::sync::atomic::Ordering::Relaxed),
        57usize.div_ceil(16) as u64,
        "one READ per block"
    );
    let mut decode = EngineCore::new(cfg).unwrap();
    add_received(
        &mut decode,
        &id,
        &p,
        20,
        HeldKv {
            payloads: fetched.payloads,
            prompt_len: fetched.prompt_len,
            hashes: expected.hashes,
        },
    );
    assert_eq!(run(&mut decode, &id), want);
    assert_eq!(decode.counters().prompt_tokens_computed, 0);
}

/// A peer's pull of a cached prefix is served from the disk tier straight, without loading
/// the blocks into the device: here by an engine restarted on the disk path another run
/// filled, whose device cache is empty.
#[test]
fn a_cached_prefix_is_served_from_the_disk_tier_without_the_device() {
    let Some(cfg) = config() else { return };
    let disk = tempfile::tempdir().unwrap();
    let mut tiered = cfg.clone();
    tiered.kv_tiers = llmd::kv::tiers::TierConfig {
        disk_path: Some(disk.path().to_path_buf()),
        disk_bytes: 64 << 20,
        ..Default::default()
    };
    let p = prompt(100);
    let id = RequestId::from("d");
    let want = single_engine(cfg.clone(), &id, &p, 12);
    {
        let mut first = EngineCore::new(tiered.clone()).unwrap();
        first
            .add_request("fill".into(), &Prompt::Tokens(p.clone()), greedy(1), 0)
            .unwrap();
        run(&mut first, &"fill".into());
        // The tier thread stores behind the engine: wait for the six full blocks.
        let t0 = std::time::Instant::now();
        while first.tier_stats().unwrap().blocks[1] < 6 && t0.elapsed().as_secs() < 20 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let peer = EngineCore::new(tiered).unwrap();
    let hasher = &peer.limits().block_hasher;
    let mut hashes = Vec::new();
    for chunk in p.chunks_exact(16) {
        let h = hasher.hash(hashes.last(), chunk, &[]);
        hashes.push(h);
    }
    let free = peer.num_free_blocks();
    let read = peer.read_cached_prefix(&hashes).unwrap();
    assert!(
        read.device.is_empty(),
        "a fresh engine's device cache is empty"
    );
    let payloads = read.finish_blocking();
    assert_eq!(payloads.len(), 6, "every full block, from disk");
    assert_eq!(peer.num_free_blocks(), free, "no device block was used");
    assert_eq!(peer.counters().prompt_tokens_computed, 0);
    assert_eq!(peer.tier_stats().unwrap().peer_read_blocks, 6);
    let mut decode = EngineCore::new(cfg).unwrap();
    add_received(
        &mut decode,
        &id,
        &p,
        12,
        HeldKv {
            payloads,
            prompt_len: 96,
            hashes: Vec::new(),
        },
    );
    assert_eq!(run(&mut decode, &id), want);
    assert_eq!(
        decode.counters().prompt_tokens_computed,
        4,
        "only the 4 tokens past the last full block were computed"
    );
}

/// Held KV cannot take more than half the pool: past it the oldest held request is freed
/// first (a client asking only for prefills, or decoders that never pull, cannot pin the
/// pool until their leases run out).
#[test]
fn held_kv_is_capped_at_half_the_pool_oldest_freed_first() {
    let Some(cfg) = config() else { return };
    let mut prefill = EngineCore::new(cfg).unwrap();
    let idle = prefill.num_free_blocks();
    // 64 blocks: each 160-token prompt holds 10, so the fourth crosses 32.
    let ids: Vec<RequestId> = (0..4).map(|i| RequestId(format!("h{i}"))).collect();
    for (i, id) in ids.iter().enumerate() {
        let p: Vec<u32> = prompt(160)
            .iter()
            .map(|t| 4 + (t + i as u32 * 11) % 500)
            .collect();
        add_held(&mut prefill, id, &p, Duration::from_secs(30 + i as u64));
        run(&mut prefill, id);
    }
    assert_eq!(prefill.num_held(), 3, "the oldest was freed");
    assert!(prefill.read_held(&ids[0], &TOKEN, ALL).unwrap().is_none());
    assert!(prefill.read_held(&ids[3], &TOKEN, ALL).unwrap().is_some());
    assert_eq!(prefill.counters().kv_held_evicted, 1);
    for id in &ids[1..] {
        assert!(prefill.release_held(id));
    }
    assert_eq!(prefill.num_free_blocks(), idle);
}

/// A cache salt is part of the hashes that bind held KV to its prompt: a decoder with
/// another salt (another tenant) computes other hashes and would refuse the blocks.
#[test]
fn the_cache_salt_is_part_of_the_binding_hashes() {
    let Some(cfg) = config() else { return };
    let p = prompt(40);
    let mut prefill = EngineCore::new(cfg).unwrap();
    let id = RequestId::from("s");
    add_held_salted(
        &mut prefill,
        &id,
        &p,
        Duration::from_secs(30),
        Some("tenant-a"),
    );
    run(&mut prefill, &id);
    let held = prefill.read_held(&id, &TOKEN, ALL).unwrap().expect("held");
    let hasher = &prefill.limits().block_hasher;
    let salted = |s: &str| hasher.hash_prompt(&p, 16, &[s.to_string()]);
    assert_eq!(held.hashes, salted("tenant-a"));
    assert_ne!(held.hashes, salted("tenant-b"));
    assert_ne!(held.hashes, hasher.hash_prompt(&p, 16, &[]));
    // Every block differs, not only the first: the salt goes down the chain.
    assert!(held
        .hashes
        .iter()
        .zip(salted("tenant-b"))
        .all(|(a, b)| *a != b));
}

/// A salted request's published blocks carry the salt as their first block's extra keys, and
/// the router, keying the same prompt with the same salt, finds them (and not with another
/// salt or none): the router hashes as the workers do.
#[test]
fn salted_blocks_are_published_with_their_salt_and_the_router_keys_them_alike() {
    use llmd::kv::events::{KvEvent, RecordingSink};
    use llmd::router::index::{KeyScheme, Keyer, PrefixIndex, TierWeights};
    use std::sync::Arc;
    let Some(mut cfg) = config() else { return };
    let sink = Arc::new(RecordingSink::default());
    cfg.kv_events = Some(llmd::config::KvEventsHandle(sink.clone()));
    let mut core = EngineCore::new(cfg).unwrap();
    let p = prompt(50);
    let id = RequestId::from("salted");
    core.add_tokens_with_kv(
        id.clone(),
        p.clone(),
        greedy(1),
        0,
        KvOptions {
            cache_salt: Some("tenant-a".into()),
            ..Default::default()
        },
    )
    .unwrap();
    run(&mut core, &id);
    let events: Vec<KvEvent> = sink.0.lock().unwrap().iter().flatten().cloned().collect();
    let stored: Vec<&Vec<Vec<String>>> = events
        .iter()
        .filter_map(|e| match e {
            KvEvent::BlockStored { extra_keys, .. } => Some(extra_keys),
            _ => None,
        })
        .collect();
    assert!(!stored.is_empty(), "{events:?}");
    assert_eq!(stored[0][0], vec!["tenant-a".to_string()]);
    assert!(stored[0][1..].iter().all(Vec::is_empty));
    let keyer = Keyer::new(KeyScheme::Fnv64a, "0", 16);
    let mut ix = PrefixIndex::new(keyer.clone());
    ix.apply("w", &events);
    let w = TierWeights::default();
    let salt = |s: &str| vec![s.to_string()];
    assert_eq!(
        ix.prefix("w", &keyer.keys_salted(&p, &salt("tenant-a")), &w)
            .blocks,
        3
    );
    assert_eq!(
        ix.prefix("w", &keyer.keys_salted(&p, &salt("tenant-b")), &w)
            .blocks,
        0
    );
    assert_eq!(ix.prefix("w", &keyer.keys(&p), &w).blocks, 0);
}
