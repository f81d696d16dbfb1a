//! The KV-cache event publisher: each engine step's [`KvEvent`]s, sent over ZeroMQ in vLLM's
//! wire format (`vllm/distributed/kv_events.py`) so llm-d's KV-cache indexer routes by prefix to
//! llmd workers exactly as it does to vLLM ones.
//!
//! Wire contract (what a subscriber sees):
//! - PUB socket, one message of three frames per batch: the topic, the sequence number as 8
//!   bytes big-endian, and the msgpack payload. Sequence numbers start at 0 and grow by one per
//!   batch sent, without gaps.
//! - Payload: `[ts, [event, ...], data_parallel_rank]`, vLLM's `KVEventBatch` as msgspec encodes
//!   it (`array_like=True`; msgspec ignores `omit_defaults` for array-like structs, so every
//!   field is written): `ts` a float64 of seconds since the Unix epoch, the rank an int or nil.
//! - Each event a tagged positional array, as msgspec encodes vLLM's `array_like=True, tag=True`
//!   event structs:
//!   `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
//!   lora_name, extra_keys, group_idx, kv_cache_spec_kind, kv_cache_spec_sliding_window]`,
//!   `["BlockRemoved", block_hashes, medium, group_idx]`, `["AllBlocksCleared"]`. Hashes are
//!   msgpack unsigned ints, every int in its shortest form, as msgspec writes them. llmd has one
//!   full-attention KV group and no LoRA, so `lora_id`, `lora_name` and the sliding window are
//!   nil, `extra_keys` one nil per block, `group_idx` 0 and `kv_cache_spec_kind`
//!   `"full_attention"`: the values vLLM sends for such a model.
//! - Replay (when `replay_endpoint` is set), as vLLM since 0.26 (vllm#45177): a DEALER sends
//!   `[b"", start_seq (8 bytes BE)]`; the ROUTER answers, for each kept batch with
//!   `seq >= start_seq` in order, `[b"", topic, seq (8 bytes BE), payload]`, then the end marker
//!   `[b"", b"", -1 (8 bytes BE, signed), b""]`. The last `buffer_steps` batches are kept.
//!
//! - Binding: the PUB and replay sockets bind `tcp://*:PORT` (every IPv4 interface),
//!   `tcp://[::]:PORT` (every interface) or `tcp://IP:PORT` for one address of this machine: the
//!   pod IP, `127.0.0.1`, `[::1]`. vLLM binds only the wildcard forms and *connects* its PUB
//!   socket to any other host; llmd always binds, and refuses a host name.
//!
//! Security: the events carry every cached prompt's token ids (and the replay socket the last
//! `buffer_steps` batches of them), so the ports must be reachable only by the router or
//! indexer; bind them to the pod IP or loopback rather than `*` where that is all they need.
//!
//! Invariants: [`ZmqEventPublisher::publish`] never blocks the engine — it stamps the time and
//! queues the batch in a bounded channel, dropping (and counting) it when the channel is full.
//! One thread, `llmd-kv-events`, owns the PUB socket, numbers, encodes, sends and keeps each
//! batch; the replay socket has a thread of its own (`replay`), so no replay client can delay
//! live publishing. Dropping the last handle drains the queue, closes the sockets and joins
//! both threads, so the ports are free again when the drop returns.
mod config;
mod replay;
mod wire;

pub use config::{KvEventsConfig, Publisher};
pub use replay::MAX_REPLAYS_IN_FLIGHT;
pub use wire::{encode_batch, TooLong, END_SEQ};

use crate::kv::{KvEvent, KvEventSink};
use anyhow::{anyhow, bail, Context};
use replay::{ReplayBuffer, ReplayServer, SharedBuffer};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use zeromq::{PubSocket, Socket, SocketSend, ZmqMessage};

/// Least time between two "queue full" warnings.
const DROP_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// The high-water mark zeromq 0.7 applies to each PUB subscriber.
const FIXED_HWM: usize = 100_000;

/// The vLLM-compatible ZeroMQ KV-event publisher. See the module docs for the wire format.
pub struct ZmqEventPublisher {
    queue: BatchQueue,
    /// Taken by `Drop`: closing the channel is what stops the thread.
    tx: Option<mpsc::Sender<QueuedBatch>>,
    thread: Option<JoinHandle<()>>,
    endpoint: String,
    /// Dropped after the publisher thread, so the buffer it pushes to outlives it either way.
    replay: Option<ReplayServer>,
}

/// One `publish` call, waiting for the publisher thread.
struct QueuedBatch {
    /// Seconds since the Unix epoch when the engine published the batch.
    ts: f64,
    events: Vec<KvEvent>,
}

impl ZmqEventPublisher {
    /// Binds the PUB socket on a new `llmd-kv-events` thread (and the ROUTER replay socket, when
    /// `replay_endpoint` is set, on a `llmd-kv-replay` thread) and returns once both are bound,
    /// or with the bind error (an address in use or not of this machine, a bad endpoint).
    ///
    /// `data_parallel_rank`, as in vLLM, is written into every batch and offsets the TCP port
    /// of both endpoints (`tcp://*:5557` binds 5557 + rank). vLLM always has a rank (0 without
    /// data parallelism); pass `Some(0)` to send what vLLM sends, `None` to send nil.
    ///
    /// Endpoints are `tcp://HOST:PORT` with HOST `*`, `[::]` or an IP address of this machine
    /// (see [`bind_endpoint`]); a port of 0 binds a free port ([`Self::endpoint`] tells which).
    pub fn start(
        cfg: &KvEventsConfig,
        data_parallel_rank: Option<u32>,
    ) -> anyhow::Result<Arc<Self>> {
        let rank = data_parallel_rank.unwrap_or(0);
        let endpoint = bind_endpoint(&cfg.endpoint, rank)?;
        let replay = cfg
            .replay_endpoint
            .as_deref()
            .map(|e| bind_endpoint(e, rank))
            .transpose()?;
        if cfg.hwm != FIXED_HWM {
            tracing::warn!(
                hwm = cfg.hwm,
                "KV events: the ZeroMQ high-water mark is fixed at {FIXED_HWM} messages per \
                 subscriber; the configured hwm is ignored"
            );
        }

        let topic = bytes::Bytes::from(cfg.topic.clone().into_bytes());
        let buffer: SharedBuffer = Arc::new(Mutex::new(ReplayBuffer::new(cfg.buffer_steps)));
        // Bound first: if the PUB socket then fails, dropping it stops its thread.
        let replay = replay
            .map(|e| ReplayServer::start(e, topic.clone(), buffer.clone()))
            .transpose()?;

        let (tx, rx) = mpsc::channel(cfg.max_queue_size);
        let (bound_tx, bound_rx) = std_mpsc::channel();
        let worker = Worker {
            topic,
            data_parallel_rank,
            buffer,
            next_seq: 0,
        };
        let thread = std::thread::Builder::new()
            .name("llmd-kv-events".to_string())
            .spawn(move || worker.run(endpoint, rx, bound_tx))
            .context("spawning the KV events thread")?;
        let bound = bound_rx
            .recv()
            .map_err(|_| anyhow!("the KV events thread exited before binding its socket"))
            .and_then(|r| r);
        let endpoint = match bound {
            Ok(endpoint) => endpoint,
            Err(e) => {
                let _ = thread.join();
                return Err(e);
            }
        };
        tracing::info!(
            %endpoint,
            replay_endpoint = replay.as_ref().map_or("none", ReplayServer::endpoint),
            topic = %cfg.topic,
            "publishing KV cache events"
        );
        Ok(Arc::new(Self {
            queue: BatchQueue::new(),
            tx: Some(tx),
            thread: Some(thread),
            endpoint,
            replay,
        }))
    }

    /// The PUB socket's bound endpoint, with the port actually bound.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The ROUTER replay socket's bound endpoint, with the port actually bound.
    pub fn replay_endpoint(&self) -> Option<&str> {
        self.replay.as_ref().map(ReplayServer::endpoint)
    }

    /// Replay requests refused because [`MAX_REPLAYS_IN_FLIGHT`] replays were being served.
    pub fn refused_replays(&self) -> u64 {
        self.replay
            .as_ref()
            .map_or(0, |r| r.stats.refused.load(Ordering::Relaxed))
    }

    /// Replays that sent every batch asked for and the end marker.
    pub fn served_replays(&self) -> u64 {
        self.replay
            .as_ref()
            .map_or(0, |r| r.stats.served.load(Ordering::Relaxed))
    }

    /// Batches dropped because the queue to the publisher thread was full.
    pub fn dropped_batches(&self) -> u64 {
        self.queue.dropped()
    }
}

impl KvEventSink for ZmqEventPublisher {
    /// Queues the batch without blocking; an empty batch is not sent (vLLM publishes only steps
    /// that produced events).
    fn publish(&self, events: Vec<KvEvent>) {
        if events.is_empty() {
            return;
        }
        if let Some(tx) = &self.tx {
            let ts = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.queue.push(tx, QueuedBatch { ts, events });
        }
    }
}

impl Drop for ZmqEventPublisher {
    fn drop(&mut self) {
        // Closing the channel lets the thread send what is queued, close its sockets and end.
        self.tx.take();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the KV events thread panicked");
            }
        }
        // Stops the replay thread and joins it.
        self.replay.take();
    }
}

/// The engine's side of the channel: a non-blocking push that counts what it drops.
struct BatchQueue {
    dropped: AtomicU64,
    created: Instant,
    /// Milliseconds after `created` of the last "queue full" warning, plus one (0: never).
    last_warning_ms: AtomicU64,
}

impl BatchQueue {
    fn new() -> Self {
        Self {
            dropped: AtomicU64::new(0),
            created: Instant::now(),
            last_warning_ms: AtomicU64::new(0),
        }
    }

    fn push(&self, tx: &mpsc::Sender<QueuedBatch>, batch: QueuedBatch) {
        match tx.try_send(batch) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if self.may_warn() {
                    tracing::warn!(
                        dropped_batches = dropped,
                        "KV events queue is full: dropping a batch of KV cache events; \
                         subscribers' indexes will miss it"
                    );
                }
            }
            // Only after the thread died; `Drop` or the panic already said why.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// True at most once per [`DROP_WARNING_INTERVAL`].
    fn may_warn(&self) -> bool {
        let now = u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX) + 1;
        let last = self.last_warning_ms.load(Ordering::Relaxed);
        let interval = u64::try_from(DROP_WARNING_INTERVAL.as_millis()).unwrap_or(u64::MAX);
        (last == 0 || now.saturating_sub(last) >= interval)
            && self
                .last_warning_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Everything the `llmd-kv-events` thread owns besides its socket.
struct Worker {
    topic: bytes::Bytes,
    data_parallel_rank: Option<u32>,
    buffer: SharedBuffer,
    next_seq: u64,
}

impl Worker {
    fn run(
        self,
        endpoint: String,
        rx: mpsc::Receiver<QueuedBatch>,
        bound: std_mpsc::Sender<anyhow::Result<String>>,
    ) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = bound.send(Err(anyhow!(e).context("building the KV events runtime")));
                return;
            }
        };
        runtime.block_on(self.serve(endpoint, rx, bound));
        // Dropping the runtime drops the socket's connection tasks, closing every connection.
        drop(runtime);
    }

    async fn serve(
        mut self,
        endpoint: String,
        mut rx: mpsc::Receiver<QueuedBatch>,
        bound: std_mpsc::Sender<anyhow::Result<String>>,
    ) {
        let mut publisher = PubSocket::new();
        match publisher
            .bind(&endpoint)
            .await
            .with_context(|| format!("binding the KV events PUB socket to {endpoint}"))
        {
            Ok(bound_endpoint) => {
                let _ = bound.send(Ok(bound_endpoint.to_string()));
            }
            Err(e) => {
                let _ = bound.send(Err(e));
                return;
            }
        }
        while let Some(batch) = rx.recv().await {
            self.send_live(&mut publisher, batch).await;
        }
        for e in publisher.close().await {
            tracing::debug!(error = %e, "closing the KV events PUB socket");
        }
    }

    /// Numbers, encodes, sends and keeps one batch.
    async fn send_live(&mut self, publisher: &mut PubSocket, batch: QueuedBatch) {
        let payload = match encode_batch(batch.ts, &batch.events, self.data_parallel_rank) {
            Ok(payload) => bytes::Bytes::from(payload),
            Err(e) => {
                tracing::error!(error = %e, "KV events batch cannot be encoded; dropped");
                return;
            }
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let frames = vec![
            self.topic.clone(),
            bytes::Bytes::copy_from_slice(&seq.to_be_bytes()),
            payload.clone(),
        ];
        // Kept even if the send fails: a subscriber that noticed can still replay it.
        self.buffer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(seq, payload);
        if let Err(e) = send_frames(publisher, frames).await {
            tracing::warn!(error = %e, seq, "KV events batch not sent");
        }
    }
}

async fn send_frames(
    socket: &mut impl SocketSend,
    frames: Vec<bytes::Bytes>,
) -> anyhow::Result<()> {
    let message = ZmqMessage::try_from(frames).map_err(|e| anyhow!("{e}"))?;
    socket.send(message).await?;
    Ok(())
}

/// vLLM's `offset_endpoint_port`: rank r > 0 moves a TCP endpoint's port up by r, so each data
/// parallel rank of one host binds its own port.
fn offset_endpoint_port(endpoint: &str, rank: u32) -> anyhow::Result<String> {
    let Some(rest) = endpoint.strip_prefix("tcp://") else {
        bail!("KV events endpoint {endpoint:?}: only tcp://host:port endpoints are supported");
    };
    let (host, port) = rest
        .rsplit_once(':')
        .with_context(|| format!("KV events endpoint {endpoint:?} has no port"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("KV events endpoint {endpoint:?}: bad port {port:?}"))?;
    // Port 0 asks the OS for any free port, whatever the rank.
    if rank == 0 || port == 0 {
        return Ok(endpoint.to_string());
    }
    let port = u16::try_from(u32::from(port) + rank).with_context(|| {
        format!("KV events endpoint {endpoint:?}: port + data parallel rank {rank} is past 65535")
    })?;
    Ok(format!("tcp://{host}:{port}"))
}

/// The address a KV events socket binds for `endpoint`, moved up by the data parallel `rank`:
/// `tcp://*:PORT` binds every IPv4 interface (`0.0.0.0`), `tcp://[::]:PORT` every interface,
/// `tcp://IP:PORT` (`[IPv6]` in brackets) that address alone — the pod IP, or loopback for a
/// router in the same pod. A host name is refused: vLLM would connect its PUB socket to it.
pub fn bind_endpoint(endpoint: &str, rank: u32) -> anyhow::Result<String> {
    let endpoint = offset_endpoint_port(endpoint, rank)?;
    let rest = endpoint.trim_start_matches("tcp://");
    let (host, port) = rest
        .rsplit_once(':')
        .with_context(|| format!("KV events endpoint {endpoint:?} has no port"))?;
    if host == "*" {
        return Ok(format!("tcp://0.0.0.0:{port}"));
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match bare.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => Ok(format!("tcp://{ip}:{port}")),
        Ok(IpAddr::V6(ip)) => Ok(format!("tcp://[{ip}]:{port}")),
        Err(_) => bail!(
            "KV events endpoint {endpoint:?}: llmd binds its KV event sockets, to `*` (every \
             interface) or to an IP address of this machine (the pod IP, 127.0.0.1, [::1]); \
             {host:?} is not one (vLLM would connect to a host name, which llmd does not do)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_offset_by_rank_as_vllm_does() {
        assert_eq!(
            offset_endpoint_port("tcp://*:5557", 0).unwrap(),
            "tcp://*:5557"
        );
        assert_eq!(
            offset_endpoint_port("tcp://*:5557", 3).unwrap(),
            "tcp://*:5560"
        );
        assert_eq!(
            offset_endpoint_port("tcp://[::]:5557", 1).unwrap(),
            "tcp://[::]:5558"
        );
        assert_eq!(offset_endpoint_port("tcp://*:0", 2).unwrap(), "tcp://*:0");
        assert!(offset_endpoint_port("tcp://*:65535", 1).is_err());
        assert!(offset_endpoint_port("ipc:///tmp/kv", 0).is_err());
        assert!(offset_endpoint_port("tcp://*", 0).is_err());
        assert!(offset_endpoint_port("tcp://*:port", 0).is_err());
    }

    #[test]
    fn endpoints_bind_a_wildcard_or_an_ip_of_this_machine() {
        assert_eq!(
            bind_endpoint("tcp://*:5557", 0).unwrap(),
            "tcp://0.0.0.0:5557"
        );
        assert_eq!(
            bind_endpoint("tcp://*:5557", 2).unwrap(),
            "tcp://0.0.0.0:5559"
        );
        assert_eq!(
            bind_endpoint("tcp://[::]:5557", 0).unwrap(),
            "tcp://[::]:5557"
        );
        assert_eq!(
            bind_endpoint("tcp://127.0.0.1:5557", 1).unwrap(),
            "tcp://127.0.0.1:5558"
        );
        assert_eq!(
            bind_endpoint("tcp://10.1.2.3:0", 0).unwrap(),
            "tcp://10.1.2.3:0"
        );
        assert_eq!(bind_endpoint("tcp://[::1]:7", 0).unwrap(), "tcp://[::1]:7");
        assert_eq!(bind_endpoint("tcp://::1:7", 0).unwrap(), "tcp://[::1]:7");
        for bad in ["tcp://indexer:5557", "tcp://localhost:5557", "tcp://:5557"] {
            let e = bind_endpoint(bad, 0).unwrap_err().to_string();
            assert!(e.contains("IP address of this machine"), "{bad}: {e}");
        }
        assert!(bind_endpoint("ipc:///tmp/kv", 0).is_err());
        let cfg = KvEventsConfig {
            endpoint: "tcp://indexer:5557".to_string(),
            ..KvEventsConfig::default()
        };
        let e = ZmqEventPublisher::start(&cfg, None).err().expect("refused");
        assert!(e.to_string().contains("indexer"), "{e}");
        let cfg = KvEventsConfig {
            endpoint: "tcp://127.0.0.1:0".to_string(),
            replay_endpoint: Some("tcp://replayer:5558".to_string()),
            ..KvEventsConfig::default()
        };
        let e = ZmqEventPublisher::start(&cfg, None).err().expect("refused");
        assert!(e.to_string().contains("replayer"), "{e}");
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_blocking() {
        let (tx, mut rx) = mpsc::channel(1);
        let queue = BatchQueue::new();
        let batch = || QueuedBatch {
            ts: 0.0,
            events: vec![KvEvent::AllBlocksCleared],
        };
        queue.push(&tx, batch());
        queue.push(&tx, batch());
        queue.push(&tx, batch());
        assert_eq!(queue.dropped(), 2);
        assert!(rx.try_recv().is_ok());
        queue.push(&tx, batch());
        assert_eq!(queue.dropped(), 2);
        drop(rx);
        queue.push(&tx, batch());
        assert_eq!(queue.dropped(), 3);
    }

    #[test]
    fn drop_warnings_are_rate_limited() {
        let queue = BatchQueue::new();
        assert!(queue.may_warn());
        assert!(!queue.may_warn());
        assert!(!queue.may_warn());
    }
}
