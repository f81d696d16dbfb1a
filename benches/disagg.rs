//! Disaggregated prefill/decode, measured in one run (CPU, loopback):
//!
//! 1. **KV transfer throughput**: a 2048-token prompt's blocks at SmolLM2-135M's size (128 ×
//!    737,280 bytes) pulled over the TCP transport (checksummed records, verified) vs the same
//!    bytes over a plain loopback TCP stream, and vs a `memcpy` of them. Target: ≥ 0.5 × the
//!    plain stream.
//! 2. **TTFT disaggregated vs aggregated** on SmolLM2 (real weights): prefill on one engine
//!    (one token, KV held), the pull over TCP, the first token on a second engine — vs one
//!    engine doing it all.
//! 3. **How long a prefiller holds blocks after its decoder dies**: the decoder connects and
//!    drops mid-transfer (the blocks are freed at once), vs never pulling (the lease, 30 s by
//!    default; vLLM holds them 480 s).
//!
//! Run: `cargo bench --bench disagg` (LLMD_BENCH_PROMPT, LLMD_BENCH_REPEAT).
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/env.rs"]
mod env;
use env::env_usize;

use futures_util::future::BoxFuture;
use llmd::engine::{EngineCore, Hold, KvOptions, Prompt, ReceivedKv};
use llmd::kv::auth::{ClusterSecret, TransferToken};
use llmd::kv::transfer::{
    serve, Expected, HeldKv, HeldKvSource, KvTransport, Producer, RemoteKv, TcpTransport,
    TransferLayout, TransferStats,
};
use llmd::{EngineConfig, RequestId, SamplingParams};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request's KV in memory, served to every pull (whatever id it names); records when
/// each release happens.
struct Source {
    keep: HeldKv,
    released: Mutex<Vec<Instant>>,
}

/// The token every bench pull presents.
const TOKEN: TransferToken = TransferToken([3; 16]);

/// Serves `keep` on a loopback side channel under `layout` (with `secret`: every pull proves
/// it first); its port, the source and the serving task.
async fn start_producer(
    keep: HeldKv,
    layout: TransferLayout,
    secret: Option<Arc<ClusterSecret>>,
) -> (u16, Arc<Source>, tokio::task::JoinHandle<()>) {
    let source = Arc::new(Source {
        keep,
        released: Mutex::new(Vec::new()),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(serve(
        listener,
        Producer {
            source: source.clone(),
            layout,
            stats: Arc::new(TransferStats::default()),
            rdma: None,
            secret,
        },
    ));
    (port, source, task)
}

fn bench_secret() -> Arc<ClusterSecret> {
    Arc::new(ClusterSecret::new(b"bench-cluster-secret-0123456789").unwrap())
}

impl HeldKvSource for Source {
    fn engine_id(&self) -> &str {
        "bench"
    }
    fn read(
        &self,
        _id: &str,
        token: &TransferToken,
        blocks: std::ops::Range<usize>,
    ) -> BoxFuture<'_, Result<Option<HeldKv>, String>> {
        let r = token.matches(&TOKEN).then(|| self.keep.slice(blocks));
        Box::pin(async move { Ok(r) })
    }
    fn release(&self, _id: &str) {
        self.released.lock().unwrap().push(Instant::now());
    }
    fn read_prefix(
        &self,
        hashes: Vec<llmd::kv::BlockHash>,
    ) -> BoxFuture<'_, Result<Vec<Vec<u8>>, String>> {
        // The held blocks, under their hashes: a peer's cached prefix.
        let n = self
            .keep
            .hashes
            .iter()
            .zip(&hashes)
            .take_while(|(a, b)| a == b)
            .count();
        let r = self.keep.payloads[..n].to_vec();
        Box::pin(async move { Ok(r) })
    }
}

fn best(repeat: usize, mut f: impl FnMut() -> f64) -> f64 {
    (0..repeat).map(|_| f()).fold(f64::INFINITY, f64::min)
}

fn main() {
    let repeat = env_usize("LLMD_BENCH_REPEAT", 5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("P/D on loopback (CPU, best of {repeat})");
    rt.block_on(throughput(repeat));
    rt.block_on(hold_after_drop());
    if let Some(dir) = common::shared_model("smollm2-135m-instruct") {
        ttft(
            &rt,
            &dir,
            env_usize("LLMD_BENCH_PROMPT", 512),
            repeat.min(3),
        );
    }
}

async fn throughput(repeat: usize) {
    let (block, blocks) = (737_280usize, 128usize);
    let payloads: Vec<Vec<u8>> = (0..blocks)
        .map(|b| (0..block).map(|i| (i * 31 + b) as u8).collect())
        .collect();
    let bytes = (block * blocks) as f64;
    let layout = TransferLayout {
        identity: "model=bench;layers=30".into(),
        payload_len: block,
    };
    let hashes: Vec<llmd::kv::BlockHash> = (0..blocks)
        .map(|b| llmd::kv::BlockHash([b as u8; 32]))
        .collect();
    let keep = HeldKv {
        payloads: payloads.clone(),
        prompt_len: 2048,
        hashes: hashes.clone(),
    };
    let expected = Expected {
        prompt_len: 2048,
        hashes: hashes.clone(),
    };
    // P/D pulls (by request and token) and E/W pulls (by hash), without and with the cluster
    // secret's handshake, interleaved so both see the same machine.
    let (open_port, _, _) = start_producer(keep.clone(), layout.clone(), None).await;
    let (auth_port, _, _) = start_producer(keep, layout.clone(), Some(bench_secret())).await;
    let client = |secret| TcpTransport {
        layout: layout.clone(),
        timeout: Duration::from_secs(60),
        secret,
    };
    let (open, auth) = (client(None), client(Some(bench_secret())));
    let remote = |port| RemoteKv {
        host: "127.0.0.1".into(),
        port,
        engine_id: "bench".into(),
        request_id: "r".into(),
        token: TOKEN,
    };
    let (mut ours, mut ours_auth, mut ew_auth) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    for _ in 0..repeat {
        let t = Instant::now();
        let got = open.fetch(&remote(open_port), &expected).await.unwrap();
        ours = ours.min(t.elapsed().as_secs_f64());
        assert_eq!(got.payloads.len(), blocks);
        let t = Instant::now();
        let got = auth.fetch(&remote(auth_port), &expected).await.unwrap();
        ours_auth = ours_auth.min(t.elapsed().as_secs_f64());
        assert_eq!(got.payloads.len(), blocks);
        let t = Instant::now();
        let got = auth
            .fetch_prefix("127.0.0.1", auth_port, &hashes)
            .await
            .unwrap();
        ew_auth = ew_auth.min(t.elapsed().as_secs_f64());
        assert_eq!(got.payloads.len(), blocks);
    }

    // The same bytes over a plain loopback TCP stream, written and read block by block.
    let raw = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let raw_port = raw.local_addr().unwrap().port();
    let send = payloads.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = raw.accept().await else {
                return;
            };
            s.set_nodelay(true).unwrap();
            let mut go = [0u8; 1];
            s.read_exact(&mut go).await.unwrap();
            for p in &send {
                s.write_all(p).await.unwrap();
            }
        }
    });
    let mut plain = f64::INFINITY;
    for _ in 0..repeat {
        let t = Instant::now();
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", raw_port))
            .await
            .unwrap();
        s.set_nodelay(true).unwrap();
        s.write_all(&[1]).await.unwrap();
        let mut got = Vec::with_capacity(blocks);
        for _ in 0..blocks {
            let mut buf = vec![0u8; block];
            s.read_exact(&mut buf).await.unwrap();
            got.push(buf);
        }
        plain = plain.min(t.elapsed().as_secs_f64());
        assert_eq!(got.len(), blocks);
    }
    let memcpy = best(repeat, || {
        let t = Instant::now();
        let copy: Vec<Vec<u8>> = payloads.iter().map(|p| p.to_vec()).collect();
        let s = t.elapsed().as_secs_f64();
        std::hint::black_box(copy);
        s
    });
    // East/west pulls cannot run without the secret any more: what it adds to one is the
    // handshake, measured here as an empty pull with it against the same exchange without
    // (refused at once), best of 5 rounds of 200.
    let (mut with_hs, mut without_hs) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..200 {
            auth.fetch_prefix("127.0.0.1", auth_port, &[])
                .await
                .unwrap();
        }
        with_hs = with_hs.min(t.elapsed().as_secs_f64() / 200.0);
        let t = Instant::now();
        for _ in 0..200 {
            let _ = open.fetch_prefix("127.0.0.1", open_port, &[]).await;
        }
        without_hs = without_hs.min(t.elapsed().as_secs_f64() / 200.0);
    }
    let handshake = (with_hs - without_hs).max(0.0);
    let gbs = |s: f64| bytes / s / 1e9;
    println!(
        "with the cluster secret (handshake on every pull): P/D pull {:.2} GB/s, E/W pull {:.2} GB/s; unauthenticated/authenticated P/D {:.3} (target >= 0.95); the handshake {:.0} us a pull, E/W pull without it / with it {:.4} (target >= 0.95)",
        gbs(ours_auth),
        gbs(ew_auth),
        ours / ours_auth,
        handshake * 1e6,
        (ew_auth - handshake) / ew_auth
    );
    println!(
        "transfer of {blocks} blocks x {block} B ({:.1} MB): ours {:.2} GB/s, plain loopback TCP {:.2} GB/s, memcpy {:.2} GB/s; ours/plain {:.3} (target >= 0.5), ours/memcpy {:.3}",
        bytes / 1e6,
        gbs(ours),
        gbs(plain),
        gbs(memcpy),
        plain / ours,
        memcpy / ours
    );
}

async fn hold_after_drop() {
    let block = 737_280usize;
    let keep = HeldKv {
        payloads: vec![vec![7u8; block]; 128],
        prompt_len: 2048,
        hashes: vec![llmd::kv::BlockHash([7; 32]); 128],
    };
    let layout = TransferLayout {
        identity: "model=bench".into(),
        payload_len: block,
    };
    let (port, source, _) = start_producer(keep, layout, None).await;
    // A decoder that asks, reads a little, and dies.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut hello = b"LLMDKVT2".to_vec();
    for part in ["bench", "r"] {
        hello.extend_from_slice(&(part.len() as u32).to_le_bytes());
        hello.extend_from_slice(part.as_bytes());
    }
    hello.extend_from_slice(&TOKEN.0);
    s.write_all(&hello).await.unwrap();
    let mut some = vec![0u8; 1 << 20];
    s.read_exact(&mut some).await.unwrap();
    let died = Instant::now();
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(30);
    let freed = loop {
        if let Some(t) = source.released.lock().unwrap().first().copied() {
            break t;
        }
        assert!(Instant::now() < deadline, "never released");
        tokio::time::sleep(Duration::from_micros(200)).await;
    };
    println!(
        "blocks held after the decoder's connection dropped mid-transfer: {:.1} ms (a decoder that never pulls: the lease, --kv-transfer-lease-secs, default 30 s; vLLM+NIXL: 480 s)",
        freed.saturating_duration_since(died).as_secs_f64() * 1e3
    );
}

fn greedy(n: usize) -> SamplingParams {
    SamplingParams {
        max_tokens: Some(n),
        ignore_eos: true,
        ..SamplingParams::greedy()
    }
}

/// Time until `core` gives `id` its first token.
fn first_token(core: &mut EngineCore, id: &RequestId) -> Duration {
    let t = Instant::now();
    loop {
        let out = core.step().unwrap();
        if out
            .iter()
            .any(|o| &o.request_id == id && !o.new_token_ids.is_empty())
        {
            return t.elapsed();
        }
    }
}

fn ttft(rt: &tokio::runtime::Runtime, dir: &std::path::Path, prompt_len: usize, repeat: usize) {
    let mut c = EngineConfig::new(dir);
    c.max_model_len = Some(prompt_len + 64);
    c.scheduler.max_num_batched_tokens = prompt_len.max(64);
    c.cache.num_blocks = Some((prompt_len + 64).div_ceil(16) * 2);
    let mut single = EngineCore::new(c.clone()).unwrap();
    let mut prefill = EngineCore::new(c.clone()).unwrap();
    let mut decode = EngineCore::new(c).unwrap();
    let layout = prefill.limits().kv_layout.clone();
    let (mut agg, mut disagg, mut pull) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    for round in 0..repeat {
        // A new prompt each round: nothing comes from a prefix cache.
        let prompt: Vec<u32> = (0..prompt_len as u32)
            .map(|i| 4 + (i * 7919 + round as u32 * 104_729) % 49_000)
            .collect();
        let id = RequestId(format!("a{round}"));
        single
            .add_request(id.clone(), &Prompt::Tokens(prompt.clone()), greedy(2), 0)
            .unwrap();
        agg = agg.min(first_token(&mut single, &id).as_secs_f64());
        while single.has_unfinished_requests() {
            single.step().unwrap();
        }
        // Prefill, hold, pull over TCP, first token on the decoder.
        let id = RequestId(format!("d{round}"));
        let t = Instant::now();
        prefill
            .add_tokens_with_kv(
                id.clone(),
                prompt.clone(),
                greedy(1),
                0,
                KvOptions {
                    hold: Some(Hold {
                        lease: Duration::from_secs(30),
                        token: TOKEN,
                    }),
                    ..Default::default()
                },
            )
            .unwrap();
        while prefill.has_unfinished_requests() {
            prefill.step().unwrap();
        }
        let held = prefill
            .read_held(&id, &TOKEN, 0..usize::MAX)
            .unwrap()
            .unwrap();
        prefill.release_held(&id);
        let expected = Expected {
            prompt_len: prompt.len(),
            hashes: held.hashes.clone(),
        };
        let t_pull = Instant::now();
        let fetched = rt.block_on(async {
            let (port, _, server) = start_producer(held, layout.clone(), None).await;
            let client = TcpTransport {
                layout: layout.clone(),
                timeout: Duration::from_secs(60),
                secret: None,
            };
            let r = client
                .fetch(
                    &RemoteKv {
                        host: "127.0.0.1".into(),
                        port,
                        engine_id: "bench".into(),
                        request_id: id.0.clone(),
                        token: TOKEN,
                    },
                    &expected,
                )
                .await
                .unwrap();
            server.abort();
            r
        });
        pull = pull.min(t_pull.elapsed().as_secs_f64());
        decode
            .add_tokens_with_kv(
                id.clone(),
                prompt.clone(),
                greedy(2),
                0,
                KvOptions {
                    received: Some(ReceivedKv {
                        payloads: fetched.payloads,
                        covered: fetched.prompt_len,
                    }),
                    ..Default::default()
                },
            )
            .unwrap();
        first_token(&mut decode, &id);
        disagg = disagg.min(t.elapsed().as_secs_f64());
        while decode.has_unfinished_requests() {
            decode.step().unwrap();
        }
    }
    println!(
        "TTFT, SmolLM2-135M, {prompt_len}-token prompt: aggregated {:.1} ms, disaggregated {:.1} ms (of which the pull {:.1} ms); disaggregated/aggregated {:.3}",
        agg * 1e3,
        disagg * 1e3,
        pull * 1e3,
        disagg / agg
    );
}
