//! Disaggregated prefill/decode in the HTTP worker, as llm-d's routing sidecar drives vLLM:
//! `kv_transfer_params` in requests and responses, the producer's KV side channel, and the
//! consumer's pull.
//!
//! - A request with `kv_transfer_params.do_remote_decode: true` reaches a **producer**
//!   (prefiller): it runs as usual (the sidecar asks for one token), its prompt's KV blocks are
//!   kept when it finishes, and the response carries the top-level `kv_transfer_params` a
//!   decoder needs to pull them (`do_remote_prefill: true`, `remote_engine_id`,
//!   `remote_request_id`, `remote_block_ids`, `remote_host`, `remote_port`, `tp_size`).
//! - A request with `do_remote_prefill: true` reaches a **consumer** (decoder): it pulls the
//!   blocks over the side channel ([`crate::kv::transfer`]), checks them, and decodes from
//!   them, computing no prompt token. A pull that fails for any reason (producer gone, blocks
//!   expired, stale engine id, corrupt twice) is logged and counted by cause, and the request
//!   is prefilled locally: the client still gets its answer.
//!
//! The producer frees held blocks as soon as the consumer has read them, when its connection
//! drops, or when the lease (`--kv-transfer-lease-secs`) runs out.
//!
//! Trust (README "Security"): `kv_transfer_params` steer this worker's KV, so by default they
//! are believed only from a trusted hop — llmd's sidecar or router, proven by
//! [`crate::kv::auth::TRUSTED_HOP_HEADER`] under the cluster secret — and ignored (counted)
//! from anyone else; `--allow-client-kv-transfer-params` believes every request (behind
//! llm-d's own sidecar, which cannot prove the secret). Either way the KV pulled is used only
//! if it is the prompt's own ([`crate::kv::transfer`]'s binding), and held KV is read only with
//! the token its producer issued.
use super::error::ApiError;
use super::AppState;
use crate::engine::{Hold, KvOptions, ReceivedKv};
use crate::kv::auth::{ClusterSecret, TransferToken, TRUSTED_HOP_HEADER};
use crate::kv::transfer::verbs::DeviceChoice;
use crate::kv::transfer::{
    Expected, HeldKv, HeldKvSource, KvTransport, Producer, RdmaProducer, RdmaTransport, RemoteKv,
    TcpTransport, TransferLayout, TransferStats,
};
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// vLLM's `kv_role`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum KvRole {
    #[serde(rename = "kv_producer")]
    Producer,
    #[serde(rename = "kv_consumer")]
    Consumer,
    #[serde(rename = "kv_both")]
    Both,
}

impl KvRole {
    pub fn produces(self) -> bool {
        matches!(self, KvRole::Producer | KvRole::Both)
    }
    pub fn consumes(self) -> bool {
        matches!(self, KvRole::Consumer | KvRole::Both)
    }
}

/// `--kv-transfer-config` (vLLM's JSON; fields llmd does not use are accepted and ignored, so
/// a vLLM command line works unchanged) and the side channel's address.
#[derive(Clone, Debug)]
pub struct KvTransferConfig {
    /// The connector named: `NixlConnector` or `LlmdConnector` (the same transfer).
    pub connector: String,
    pub role: KvRole,
    /// Port of the KV side channel (vLLM's `VLLM_NIXL_SIDE_CHANNEL_PORT`, default 5600).
    pub port: u16,
    /// Host advertised to decoders in `remote_host` (vLLM's `VLLM_NIXL_SIDE_CHANNEL_HOST`).
    pub advertise_host: String,
    /// How long a producer keeps a finished prompt's blocks for its decoder.
    pub lease: Duration,
    /// Limit on one pull.
    pub timeout: Duration,
    /// A fault the producer injects into its transfers (failure tests only).
    pub fault: Option<crate::kv::transfer::TransferFault>,
    /// How blocks move: TCP, or RDMA READs (with TCP for producers without RDMA).
    pub transport: TransportKind,
    /// The cluster secret (`--kv-transfer-secret-file`): the side channel's handshake, and
    /// the trusted-hop header that makes a request's `kv_transfer_params` believed.
    pub secret: Option<Arc<ClusterSecret>>,
    /// `--allow-client-kv-transfer-params`: believe `kv_transfer_params` from any client.
    pub allow_client_params: bool,
}

/// The KV transport `kv_connector_extra_config.transport` picks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransportKind {
    Tcp,
    Rdma {
        device: DeviceChoice,
        /// Registered memory for staging (producer) and landing (consumer), each.
        staging_bytes: usize,
    },
}

#[derive(Deserialize)]
struct RawConfig {
    kv_connector: Option<String>,
    kv_role: Option<String>,
    #[serde(default)]
    kv_connector_extra_config: ExtraConfig,
}

/// llmd's keys in `kv_connector_extra_config` (vLLM's others, such as NIXL's `backends`,
/// are accepted and ignored).
#[derive(Default, Deserialize)]
struct ExtraConfig {
    transport: Option<String>,
    rdma_device: Option<String>,
    rdma_port: Option<u8>,
    rdma_gid_index: Option<u8>,
    rdma_staging_mb: Option<usize>,
}

impl KvTransferConfig {
    pub fn parse(
        json: &str,
        port: u16,
        advertise_host: String,
        lease: Duration,
    ) -> Result<Self, String> {
        let raw: RawConfig =
            serde_json::from_str(json).map_err(|e| format!("--kv-transfer-config: {e}"))?;
        let role = match raw.kv_role.as_deref() {
            Some("kv_producer") => KvRole::Producer,
            Some("kv_consumer") => KvRole::Consumer,
            Some("kv_both") => KvRole::Both,
            Some(other) => {
                return Err(format!(
                    "--kv-transfer-config: kv_role {other:?} is not one of kv_producer, \
                     kv_consumer, kv_both"
                ))
            }
            None => {
                return Err("--kv-transfer-config: kv_role is required (kv_producer, \
                            kv_consumer or kv_both)"
                    .into())
            }
        };
        // llmd's transfer takes the place of vLLM's NIXL connector (the same kv_transfer_params
        // between prefiller, sidecar and decoder); any other connector means a different way
        // of moving KV that llmd does not have.
        let connector = match raw.kv_connector.as_deref() {
            None => "LlmdConnector".to_string(),
            Some(c @ ("NixlConnector" | "LlmdConnector")) => c.to_string(),
            Some(other) => {
                return Err(format!(
                    "--kv-transfer-config: kv_connector {other:?} has no equivalent in llmd, \
                     whose own KV transfer takes NixlConnector's place (give NixlConnector or \
                     LlmdConnector; host and disk offloading are --kv-offloading-size and \
                     --kv-disk-path)"
                ))
            }
        };
        let x = raw.kv_connector_extra_config;
        let transport = match x.transport.as_deref().unwrap_or("tcp") {
            "tcp" => TransportKind::Tcp,
            "rdma" => TransportKind::Rdma {
                device: DeviceChoice {
                    device: x.rdma_device,
                    port: x.rdma_port,
                    gid_index: x.rdma_gid_index,
                },
                staging_bytes: x.rdma_staging_mb.unwrap_or(256) << 20,
            },
            other => {
                return Err(format!(
                    "--kv-transfer-config: kv_connector_extra_config.transport {other:?} is \
                     not one of \"tcp\", \"rdma\""
                ))
            }
        };
        Ok(Self {
            connector,
            role,
            port,
            advertise_host,
            lease,
            timeout: Duration::from_secs(30),
            fault: None,
            transport,
            secret: None,
            allow_client_params: false,
        })
    }
}

/// `kv_transfer_params` as llm-d's sidecar and vLLM write them.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct KvTransferParams {
    #[serde(default)]
    pub do_remote_decode: bool,
    #[serde(default)]
    pub do_remote_prefill: bool,
    pub remote_engine_id: Option<String>,
    pub remote_request_id: Option<String>,
    pub remote_block_ids: Option<Vec<u64>>,
    pub remote_host: Option<String>,
    pub remote_port: Option<u16>,
    pub tp_size: Option<u32>,
    /// llmd: the token the held KV is read with (hex, 128 bits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_transfer_token: Option<String>,
    /// llmd: the last block's chained hash of the prompt the KV was computed for (hex), so a
    /// decoder given another prompt does not pull at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_prompt_hash: Option<String>,
}

/// Transfer counters for `/metrics`.
#[derive(Debug, Default)]
pub struct TransferMetrics {
    pub producer: Arc<TransferStats>,
    pub blocks_received: AtomicU64,
    pub bytes_received: AtomicU64,
    pub pulls: AtomicU64,
    /// Durations of successful pulls (seconds).
    pub pull_seconds: Mutex<Option<super::metrics::Histogram>>,
    pub reread_blocks: AtomicU64,
    /// Pulls that fell back to a local prefill, by cause.
    pub fallbacks: Mutex<BTreeMap<&'static str, u64>>,
    /// East/west pulls not made, by reason (`cached_here`, `recompute_cheaper`).
    pub skipped: Mutex<BTreeMap<&'static str, u64>>,
    /// What an east/west pull costs per block, measured.
    pub pull_cost: Mutex<PullCost>,
    /// Requests whose `kv_transfer_params` were ignored: not from a trusted hop.
    pub untrusted_params: AtomicU64,
}

/// Every how many pulls skipped as dearer than recompute one is made anyway, so that the
/// estimate follows the network and the peers.
const RECHECK_EVERY: u32 = 16;

/// The running estimate of what pulling a block from a peer costs, and the decision it
/// feeds: pull a cached prefix from a peer, or compute it here.
#[derive(Clone, Debug, Default)]
pub struct PullCost {
    /// ns per block of successful pulls (the whole pull's time over its blocks, so the
    /// connection's set-up counts too), EWMA; 0 before the first.
    pub ns_per_block: f64,
    skipped: u32,
}

impl PullCost {
    /// Whether to pull `n` blocks of which `local` are cached here, when computing a block
    /// costs `recompute_ns`: Err names why not. With no measurement yet, pull (that
    /// measures it); with both, pull when the whole pull is cheaper than computing the blocks
    /// not cached here; and one skipped pull in [`RECHECK_EVERY`] is made anyway.
    pub fn decide(
        &mut self,
        n: usize,
        local: usize,
        recompute_ns: f64,
    ) -> Result<(), &'static str> {
        if local >= n {
            return Err("cached_here");
        }
        if self.ns_per_block <= 0.0 || recompute_ns <= 0.0 {
            return Ok(());
        }
        if self.ns_per_block * n as f64 <= recompute_ns * (n - local) as f64 {
            self.skipped = 0;
            return Ok(());
        }
        self.skipped += 1;
        if self.skipped.is_multiple_of(RECHECK_EVERY) {
            return Ok(());
        }
        Err("recompute_cheaper")
    }

    /// Folds a successful pull of `blocks` blocks that took `elapsed` into the estimate.
    pub fn observe(&mut self, blocks: usize, elapsed: Duration) {
        if blocks == 0 {
            return;
        }
        let ns = elapsed.as_nanos() as f64 / blocks as f64;
        self.ns_per_block = crate::kv::connector::ewma(self.ns_per_block, ns);
    }
}

/// The worker's P/D state.
pub struct Disagg {
    pub config: KvTransferConfig,
    /// This process's engine id: the start time makes a restarted producer a different one.
    pub engine_id: String,
    transport: Box<dyn KvTransport>,
    layout: TransferLayout,
    /// The producer's RDMA device and staging (transport `rdma`).
    rdma: Option<Arc<RdmaProducer>>,
    pub metrics: TransferMetrics,
}

impl Disagg {
    /// The worker's P/D state; with the RDMA transport, `fabric` is its device (opened by
    /// the caller with [`crate::kv::transfer::verbs::open_device`], or a loopback in tests).
    pub fn new(
        config: KvTransferConfig,
        layout: TransferLayout,
        fabric: Option<Arc<dyn crate::kv::transfer::verbs::Fabric>>,
    ) -> Result<Self, String> {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let engine_id = format!("llmd-{}-{started}", std::process::id());
        let tcp = TcpTransport {
            layout: layout.clone(),
            timeout: config.timeout,
            secret: config.secret.clone(),
        };
        let (transport, rdma): (Box<dyn KvTransport>, _) = match (&config.transport, fabric) {
            (TransportKind::Tcp, _) => (Box::new(tcp), None),
            (TransportKind::Rdma { .. }, None) => {
                return Err("the RDMA transport needs a verbs device".into())
            }
            (TransportKind::Rdma { staging_bytes, .. }, Some(f)) => {
                let producer = if config.role.produces() {
                    Some(Arc::new(RdmaProducer::new(
                        f.clone(),
                        &layout,
                        *staging_bytes,
                    )?))
                } else {
                    None
                };
                let consumer: Box<dyn KvTransport> = if config.role.consumes() {
                    Box::new(RdmaTransport::new(tcp, f.clone(), *staging_bytes)?)
                } else {
                    Box::new(tcp)
                };
                tracing::info!(device = %f.name(), staging_mib = staging_bytes >> 20, "KV transfer over RDMA");
                (consumer, producer)
            }
        };
        let metrics = TransferMetrics::default();
        if let Some(f) = config.fault {
            tracing::warn!(fault = ?f, "injecting a fault into KV transfers (testing only)");
            metrics.producer.inject(f);
        }
        Ok(Self {
            config,
            engine_id,
            transport,
            layout,
            rdma,
            metrics,
        })
    }

    /// Whether a request with `headers` may steer KV with its `kv_transfer_params`.
    pub fn trusts(&self, headers: &axum::http::HeaderMap) -> bool {
        if self.config.allow_client_params {
            return true;
        }
        let Some(secret) = &self.config.secret else {
            return false;
        };
        headers
            .get(TRUSTED_HOP_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| secret.is_trusted_hop(v))
    }

    /// What a request's `kv_transfer_params` asks of this worker: KV to hold (producer) or
    /// KV pulled from a producer (consumer; a failed pull is counted and gives no KV).
    /// `salt` is the request's `cache_salt`, part of the hashes binding KV to the prompt.
    pub async fn prepare(
        &self,
        engine: &crate::engine::Engine,
        params: Option<&KvTransferParams>,
        prompts: &[Vec<u32>],
        n: usize,
        stream: bool,
        salt: Option<&str>,
    ) -> Result<KvOptions, ApiError> {
        let Some(p) = params else {
            return Ok(KvOptions::default());
        };
        if p.do_remote_decode {
            if !self.config.role.produces() {
                return Err(ApiError::invalid(
                    "kv_transfer_params",
                    "do_remote_decode needs a worker with kv_role kv_producer or kv_both",
                ));
            }
            if prompts.len() != 1 || n != 1 || stream {
                return Err(ApiError::invalid(
                    "kv_transfer_params",
                    "do_remote_decode takes one prompt, n = 1 and stream = false",
                ));
            }
            return Ok(KvOptions {
                hold: Some(Hold {
                    lease: self.config.lease,
                    token: TransferToken::random(),
                }),
                ..Default::default()
            });
        }
        if !p.do_remote_prefill {
            return Ok(KvOptions::default());
        }
        if !self.config.role.consumes() {
            return Err(ApiError::invalid(
                "kv_transfer_params",
                "do_remote_prefill needs a worker with kv_role kv_consumer or kv_both",
            ));
        }
        if prompts.len() != 1 {
            return Err(ApiError::invalid(
                "kv_transfer_params",
                "do_remote_prefill takes one prompt",
            ));
        }
        let (Some(host), Some(port)) = (p.remote_host.clone(), p.remote_port) else {
            return Err(ApiError::invalid(
                "kv_transfer_params",
                "do_remote_prefill needs remote_host and remote_port",
            ));
        };
        let extra = crate::kv::block_hash::salt_keys(salt);
        let (Some(engine_id), Some(request_id)) =
            (p.remote_engine_id.clone(), p.remote_request_id.clone())
        else {
            // No request named: an east/west pull of whatever prefix of this prompt the peer
            // has cached.
            return Ok(self
                .pull_prefix(engine, &host, port, &prompts[0], &extra)
                .await);
        };
        let Some(token) = p
            .remote_transfer_token
            .as_deref()
            .and_then(TransferToken::from_hex)
        else {
            let why = "kv_transfer_params without a remote_transfer_token";
            self.fallback("unauthorized", why);
            self.trace_pull(
                Instant::now(),
                &host,
                port,
                None,
                Some(("unauthorized", why)),
            );
            return Ok(KvOptions::default());
        };
        let limits = engine.limits();
        let expected = Expected {
            prompt_len: prompts[0].len(),
            hashes: limits
                .block_hasher
                .hash_prompt(&prompts[0], limits.block_size, &extra),
        };
        if let Some(h) = &p.remote_prompt_hash {
            let ours = expected
                .hashes
                .last()
                .map(|h| h.to_hex())
                .unwrap_or_default();
            if !h.eq_ignore_ascii_case(&ours) {
                // Another prompt's KV (or another salt, hash scheme or seed): not pulled, so
                // the producer keeps it for its own decoder.
                let why =
                    "remote_prompt_hash is not this prompt's: the KV was computed for another";
                self.fallback("prompt_mismatch", why);
                self.trace_pull(
                    Instant::now(),
                    &host,
                    port,
                    None,
                    Some(("prompt_mismatch", why)),
                );
                return Ok(KvOptions::default());
            }
        }
        let remote = RemoteKv {
            host,
            port,
            engine_id,
            request_id,
            token,
        };
        let started = Instant::now();
        let fetched = match self.transport.fetch(&remote, &expected).await {
            Ok(f) => f,
            Err(e) => {
                self.fallback(e.cause(), &e.to_string());
                let why = e.to_string();
                self.trace_pull(started, &remote.host, port, None, Some((e.cause(), &why)));
                return Ok(KvOptions::default());
            }
        };
        self.count_pull(started, &fetched);
        self.trace_pull(started, &remote.host, port, Some(&fetched), None);
        Ok(KvOptions {
            received: Some(ReceivedKv {
                payloads: fetched.payloads,
                covered: fetched.prompt_len,
            }),
            ..Default::default()
        })
    }

    /// Pulls the longest prefix of `prompt` (in full blocks, short of its last token) that
    /// peer `host:port` has cached; what it got as received KV (none on failure, counted).
    async fn pull_prefix(
        &self,
        engine: &crate::engine::Engine,
        host: &str,
        port: u16,
        prompt: &[u32],
        extra: &[String],
    ) -> KvOptions {
        let limits = engine.limits();
        let bs = limits.block_size;
        let hashes = limits.block_hasher.hash_prefix_blocks(prompt, bs, extra);
        if hashes.is_empty() {
            return KvOptions::default();
        }
        // Pull only where it beats what this worker would do without it: use its own cache,
        // or compute.
        let local = engine
            .cached_prefix_blocks(hashes.clone())
            .await
            .unwrap_or(0);
        let recompute = limits.prefill_cost.ns_per_token() * bs as f64;
        let verdict = self
            .metrics
            .pull_cost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .decide(hashes.len(), local, recompute);
        if let Err(reason) = verdict {
            tracing::debug!(
                reason,
                blocks = hashes.len(),
                local,
                "east/west pull skipped"
            );
            *self
                .metrics
                .skipped
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(reason)
                .or_default() += 1;
            return KvOptions::default();
        }
        let started = Instant::now();
        let fetched = match self.transport.fetch_prefix(host, port, &hashes).await {
            Ok(f) => f,
            Err(e) => {
                self.fallback(e.cause(), &e.to_string());
                let why = e.to_string();
                self.trace_pull(started, host, port, None, Some((e.cause(), &why)));
                return KvOptions::default();
            }
        };
        if fetched.payloads.is_empty() {
            return KvOptions::default();
        }
        self.count_pull(started, &fetched);
        self.trace_pull(started, host, port, Some(&fetched), None);
        self.metrics
            .pull_cost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(fetched.payloads.len(), started.elapsed());
        let covered = fetched.payloads.len() * bs;
        KvOptions {
            received: Some(ReceivedKv {
                payloads: fetched.payloads,
                covered,
            }),
            ..Default::default()
        }
    }

    fn count_pull(&self, started: Instant, fetched: &crate::kv::transfer::Fetched) {
        let m = &self.metrics;
        m.pulls.fetch_add(1, Relaxed);
        m.pull_seconds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(|| super::metrics::Histogram::new(super::metrics::TRANSFER_BUCKETS))
            .observe(started.elapsed().as_secs_f64());
        m.blocks_received
            .fetch_add(fetched.payloads.len() as u64, Relaxed);
        m.bytes_received.fetch_add(
            fetched.payloads.iter().map(|p| p.len() as u64).sum(),
            Relaxed,
        );
        m.reread_blocks.fetch_add(fetched.reread as u64, Relaxed);
    }

    /// The transfer metrics, in Prometheus text.
    pub fn render_metrics(
        &self,
        out: &mut String,
        l: &str,
        stats: &crate::engine::EngineStats,
        limits: &crate::engine::EngineLimits,
    ) {
        use std::fmt::Write;
        let prefill_block_ns = limits.prefill_cost.ns_per_token() * limits.block_size as f64;
        let m = &self.metrics;
        let p = &m.producer;
        let n = |a: &AtomicU64| a.load(Relaxed);
        let series: [(&str, &str, &str, u64); 14] = [
            (
                "llmd:kv_transfer_blocks_sent_total",
                "counter",
                "KV blocks sent to decode workers.",
                n(&p.blocks_sent),
            ),
            (
                "llmd:kv_transfer_bytes_sent_total",
                "counter",
                "Bytes of KV block records sent to decode workers.",
                n(&p.bytes_sent),
            ),
            (
                "llmd:kv_transfer_pulls_served_total",
                "counter",
                "Pulls of held KV served (their blocks then freed).",
                n(&p.transfers),
            ),
            (
                "llmd:kv_transfer_pulls_refused_total",
                "counter",
                "Pulls refused: nothing held under the id, or a stale engine id.",
                n(&p.refused),
            ),
            (
                "llmd:kv_transfer_blocks_received_total",
                "counter",
                "KV blocks received from prefill workers.",
                n(&m.blocks_received),
            ),
            (
                "llmd:kv_transfer_bytes_received_total",
                "counter",
                "Bytes of KV received from prefill workers.",
                n(&m.bytes_received),
            ),
            (
                "llmd:kv_transfer_pulls_total",
                "counter",
                "Successful pulls of KV from prefill workers.",
                n(&m.pulls),
            ),
            (
                "llmd:kv_transfer_reread_blocks_total",
                "counter",
                "Received blocks that failed their check once and were read again.",
                n(&m.reread_blocks),
            ),
            (
                "llmd:kv_held_requests",
                "gauge",
                "Finished prefills whose KV is held for a decode worker.",
                stats.num_held_kv as u64,
            ),
            (
                "llmd:kv_transfer_leases_expired_total",
                "counter",
                "Held KV freed because no decode worker read it within its lease.",
                stats.counters.kv_leases_expired,
            ),
            (
                "llmd:kv_held_evicted_total",
                "counter",
                "Held KV freed before its lease ended to keep held blocks under half the pool.",
                stats.counters.kv_held_evicted,
            ),
            (
                "llmd:kv_transfer_params_untrusted_total",
                "counter",
                "Requests whose kv_transfer_params were ignored: not from a trusted hop.",
                n(&m.untrusted_params),
            ),
            (
                "llmd:kv_transfer_unauthorized_total",
                "counter",
                "Side-channel connections refused: no or a wrong proof of the cluster secret.",
                n(&p.unauthorized),
            ),
            (
                "llmd:kv_transfer_connections_refused_total",
                "counter",
                "Side-channel connections closed unread: the connection cap was reached.",
                n(&p.over_capacity),
            ),
        ];
        for (name, kind, help, v) in series {
            super::metrics::write_scalar(out, name, kind, help, l, v);
        }
        let hist = m
            .pull_seconds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| super::metrics::Histogram::new(super::metrics::TRANSFER_BUCKETS));
        hist.render(
            out,
            "llmd:kv_transfer_pull_seconds",
            "Histogram of the duration of successful KV pulls from prefill workers, in seconds.",
            l,
        );
        let _ = writeln!(out, "# HELP llmd:kv_transfer_pulls_skipped_total East/west pulls not made: the prefix was cached here, or computing it was measured cheaper than pulling it.\n# TYPE llmd:kv_transfer_pulls_skipped_total counter");
        let skipped = m.skipped.lock().unwrap_or_else(|e| e.into_inner());
        for reason in ["cached_here", "recompute_cheaper"] {
            let n = skipped.get(reason).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "llmd:kv_transfer_pulls_skipped_total{{{l},reason=\"{reason}\"}} {n}"
            );
        }
        drop(skipped);
        let pull_ns = m
            .pull_cost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ns_per_block;
        super::metrics::write_scalar(
            out,
            "llmd:kv_transfer_pull_cost_seconds_per_block",
            "gauge",
            "Measured cost of pulling one KV block from a peer (running estimate; 0 before the first pull).",
            l,
            pull_ns / 1e9,
        );
        super::metrics::write_scalar(
            out,
            "llmd:kv_transfer_recompute_cost_seconds_per_block",
            "gauge",
            "Measured cost of computing one KV block here (running estimate; 0 before the first prefill).",
            l,
            prefill_block_ns / 1e9,
        );
        let _ = writeln!(out, "# HELP llmd:kv_transfer_fallbacks_total Pulls that failed, by cause; each request was prefilled locally instead.\n# TYPE llmd:kv_transfer_fallbacks_total counter");
        let fallbacks = m.fallbacks.lock().unwrap_or_else(|e| e.into_inner());
        for cause in [
            "io",
            "not_held",
            "stale_engine",
            "producer",
            "protocol",
            "corrupt",
            "timeout",
            "rdma",
            "prompt_mismatch",
            "unauthorized",
        ] {
            let n = fallbacks.get(cause).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "llmd:kv_transfer_fallbacks_total{{{l},cause=\"{cause}\"}} {n}"
            );
        }
    }

    /// The `kv_pull` span of the request being served (when tracing is on): from `started` to
    /// now, with what came (`fetched`) or why nothing did (`fallback`: cause, error), in which
    /// case the decoder prefills the prompt itself.
    fn trace_pull(
        &self,
        started: Instant,
        host: &str,
        port: u16,
        fetched: Option<&crate::kv::transfer::Fetched>,
        fallback: Option<(&str, &str)>,
    ) {
        let Some(cx) = crate::telemetry::current() else {
            return;
        };
        use crate::telemetry::Attr;
        let transport = match self.config.transport {
            TransportKind::Tcp => "tcp",
            TransportKind::Rdma { .. } => "rdma",
        };
        let mut attrs = vec![
            Attr::new("llmd.kv.transport", transport),
            Attr::new("llmd.kv.peer", format!("{host}:{port}")),
        ];
        if let Some(f) = fetched {
            let bytes: usize = f.payloads.iter().map(Vec::len).sum();
            attrs.push(Attr::new("llmd.kv.bytes", bytes as i64));
            attrs.push(Attr::new("llmd.kv.blocks", f.payloads.len() as i64));
            attrs.push(Attr::new("llmd.kv.reread_blocks", f.reread as i64));
        }
        if let Some((cause, _)) = fallback {
            attrs.push(Attr::new("llmd.kv.fallback_cause", cause.to_string()));
            attrs.push(Attr::new("llmd.kv.bytes", 0i64));
        }
        crate::telemetry::record(
            &cx,
            "kv_pull",
            crate::telemetry::wall(started),
            std::time::SystemTime::now(),
            attrs,
            fallback.map(|(_, why)| why.to_string()),
        );
    }

    fn fallback(&self, cause: &'static str, why: &str) {
        tracing::warn!(cause, reason = why, "KV pull failed; prefilling locally");
        *self
            .metrics
            .fallbacks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(cause)
            .or_default() += 1;
    }

    /// The response's `kv_transfer_params` for a request held for a decoder under `hold`;
    /// `prompt_hash` is its prompt's last binding hash.
    pub fn producer_reply(
        &self,
        request_id: &str,
        prompt_len: usize,
        block_size: usize,
        hold: &Hold,
        prompt_hash: Option<crate::kv::BlockHash>,
    ) -> KvTransferParams {
        KvTransferParams {
            do_remote_decode: false,
            do_remote_prefill: true,
            remote_engine_id: Some(self.engine_id.clone()),
            remote_request_id: Some(request_id.to_string()),
            remote_block_ids: Some((0..prompt_len.div_ceil(block_size) as u64).collect()),
            remote_host: Some(self.config.advertise_host.clone()),
            remote_port: Some(self.config.port),
            tp_size: Some(1),
            remote_transfer_token: Some(hold.token.to_hex()),
            remote_prompt_hash: prompt_hash.map(|h| h.to_hex()),
        }
    }

    /// Starts the producer's side channel on `host:port`: pulls read held KV through `state`'s
    /// engine.
    pub async fn start_producer(
        &self,
        state: &Arc<AppState>,
        host: &str,
    ) -> anyhow::Result<std::net::SocketAddr> {
        use anyhow::Context;
        let listener = tokio::net::TcpListener::bind((host, self.config.port))
            .await
            .with_context(|| format!("binding the KV side channel {host}:{}", self.config.port))?;
        let addr = listener.local_addr()?;
        let source = Arc::new(EngineSource {
            state: Arc::downgrade(state),
            engine_id: self.engine_id.clone(),
        });
        tokio::spawn(crate::kv::transfer::serve(
            listener,
            Producer {
                source,
                layout: self.layout.clone(),
                stats: self.metrics.producer.clone(),
                rdma: self.rdma.clone(),
                secret: self.config.secret.clone(),
            },
        ));
        Ok(addr)
    }
}

/// The most bytes of a `cache_salt` (vLLM sets none; a tenant id or a digest fits well under).
pub const MAX_CACHE_SALT: usize = 1024;

/// How a request's KV is keyed (`cache_salt`) and what its `kv_transfer_params` ask of this
/// worker (see [`Disagg::prepare`]). Params from a client that is not a trusted hop are
/// ignored (and counted) unless `--allow-client-kv-transfer-params`; without
/// `--kv-transfer-config`, a request that asks for a transfer is refused.
pub async fn kv_options(
    ready: &super::Ready,
    headers: &axum::http::HeaderMap,
    params: Option<&KvTransferParams>,
    cache_salt: Option<&str>,
    prompts: &[Vec<u32>],
    n: usize,
    stream: bool,
) -> Result<KvOptions, ApiError> {
    if let Some(s) = cache_salt {
        if s.is_empty() || s.len() > MAX_CACHE_SALT {
            return Err(ApiError::invalid(
                "cache_salt",
                format!("cache_salt must be a non-empty string of at most {MAX_CACHE_SALT} bytes"),
            ));
        }
    }
    let asks = params.is_some_and(|p| p.do_remote_decode || p.do_remote_prefill);
    let mut kv = match (&ready.disagg, params) {
        (Some(d), Some(_)) if asks && !d.trusts(headers) => {
            d.metrics.untrusted_params.fetch_add(1, Relaxed);
            tracing::warn!("kv_transfer_params from a client that is not a trusted hop; ignored (--allow-client-kv-transfer-params believes them)");
            KvOptions::default()
        }
        (Some(d), p) => {
            d.prepare(&ready.engine, p, prompts, n, stream, cache_salt)
                .await?
        }
        (None, Some(_)) if asks => {
            return Err(ApiError::invalid(
                "kv_transfer_params",
                "this worker has no --kv-transfer-config",
            ))
        }
        (None, _) => KvOptions::default(),
    };
    kv.cache_salt = cache_salt.map(str::to_string);
    Ok(kv)
}

/// The response's `kv_transfer_params` when the request's KV is held for a decoder.
pub fn reply(
    ready: &super::Ready,
    kv: &KvOptions,
    request_id: &str,
    prompt: &[u32],
) -> Option<KvTransferParams> {
    let d = ready.disagg.as_ref()?;
    let hold = kv.hold.as_ref()?;
    let limits = ready.engine.limits();
    let hashes = limits
        .block_hasher
        .hash_prompt(prompt, limits.block_size, &kv.extra_keys());
    Some(d.producer_reply(
        request_id,
        prompt.len(),
        limits.block_size,
        hold,
        hashes.last().copied(),
    ))
}

/// The engine as the side channel's source of held KV.
struct EngineSource {
    state: Weak<AppState>,
    engine_id: String,
}

impl HeldKvSource for EngineSource {
    fn engine_id(&self) -> &str {
        &self.engine_id
    }

    fn read(
        &self,
        request_id: &str,
        token: &TransferToken,
        blocks: std::ops::Range<usize>,
    ) -> BoxFuture<'_, Result<Option<HeldKv>, String>> {
        let id = crate::RequestId::from(request_id);
        let token = *token;
        Box::pin(async move {
            let state = self.state.upgrade().ok_or("the server is shutting down")?;
            let ready = state
                .ready()
                .map_err(|_| "the engine is not ready".to_string())?;
            ready
                .engine
                .read_held(&id, &token, blocks)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn release(&self, request_id: &str) {
        if let Some(state) = self.state.upgrade() {
            if let Ok(ready) = state.ready() {
                ready
                    .engine
                    .release_held(&crate::RequestId::from(request_id));
            }
        }
    }

    fn read_prefix(
        &self,
        hashes: Vec<crate::kv::BlockHash>,
    ) -> BoxFuture<'_, Result<Vec<Vec<u8>>, String>> {
        Box::pin(async move {
            let state = self.state.upgrade().ok_or("the server is shutting down")?;
            let ready = state
                .ready()
                .map_err(|_| "the engine is not ready".to_string())?;
            ready
                .engine
                .read_cached_prefix(hashes)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pull_is_made_when_it_is_measured_cheaper_than_computing_the_blocks_not_cached_here() {
        let mut c = PullCost::default();
        // Nothing measured: pull (which measures).
        assert_eq!(c.decide(10, 0, 0.0), Ok(()));
        assert_eq!(c.decide(10, 0, 1e6), Ok(()));
        // Everything cached here: never.
        assert_eq!(c.decide(10, 10, 1e6), Err("cached_here"));
        c.observe(10, Duration::from_micros(1000)); // 100 µs a block
        assert!((c.ns_per_block - 1e5).abs() < 1.0);
        // Computing a block costs 1 ms: pulling 10 (1 ms) beats computing 10 (10 ms) or 2.
        assert_eq!(c.decide(10, 0, 1e6), Ok(()));
        assert_eq!(c.decide(10, 9, 1e6), Ok(()));
        // Computing costs 50 µs a block: pulling is dearer, and dearer still with 5 cached.
        assert_eq!(c.decide(10, 0, 5e4), Err("recompute_cheaper"));
        assert_eq!(c.decide(10, 5, 9e4), Err("recompute_cheaper"));
        // Skipped pulls are retried now and then, so the estimate can recover.
        let made = (0..(2 * RECHECK_EVERY))
            .filter(|_| c.decide(10, 0, 5e4).is_ok())
            .count();
        assert_eq!(made, 2);
        // The estimate follows new measurements.
        for _ in 0..30 {
            c.observe(10, Duration::from_micros(100)); // 10 µs a block
        }
        assert_eq!(c.decide(10, 0, 5e4), Ok(()));
    }

    #[test]
    fn the_transfer_config_takes_vllm_json_and_llmd_transport_keys() {
        let parse =
            |j: &str| KvTransferConfig::parse(j, 5600, "127.0.0.1".into(), Duration::from_secs(30));
        let c = parse(r#"{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_buffer_device":"cuda","kv_connector_extra_config":{"backends":["UCX"]}}"#).unwrap();
        assert_eq!(c.role, KvRole::Both);
        assert_eq!(c.transport, TransportKind::Tcp);
        let c = parse(r#"{"kv_role":"kv_consumer","kv_connector_extra_config":{"transport":"rdma","rdma_device":"mlx5_1","rdma_gid_index":3,"rdma_staging_mb":64}}"#).unwrap();
        assert_eq!(
            c.transport,
            TransportKind::Rdma {
                device: DeviceChoice {
                    device: Some("mlx5_1".into()),
                    port: None,
                    gid_index: Some(3),
                },
                staging_bytes: 64 << 20,
            }
        );
        assert!(
            parse(r#"{"kv_role":"kv_both","kv_connector_extra_config":{"transport":"shm"}}"#)
                .unwrap_err()
                .contains("\"shm\"")
        );
        assert_eq!(c.connector, "LlmdConnector");
        let e = parse(r#"{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}"#).unwrap_err();
        assert!(
            e.contains("\"LMCacheConnectorV1\"") && e.contains("NixlConnector"),
            "{e}"
        );
    }
}
