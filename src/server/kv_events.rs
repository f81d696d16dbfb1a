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
//! Invariants: [`ZmqEventPublisher::publish`] never blocks the engine — it stamps the time and
//! queues the batch in a bounded channel, dropping (and counting) it when the channel is full.
//! One thread, `llmd-kv-events`, owns both sockets, numbers, encodes, sends and keeps each
//! batch; dropping the last handle drains the queue, closes the sockets and joins that thread,
//! so the ports are free again when the drop returns.
mod config;
mod wire;

pub use config::{KvEventsConfig, Publisher};
pub use wire::{encode_batch, TooLong, END_SEQ};

use crate::kv::{KvEvent, KvEventSink};
use anyhow::{anyhow, bail, Context};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// How long one replay message may wait for a slow replay client before the replay is
/// abandoned, so a client that stops reading cannot hold up live publishing for long.
const REPLAY_SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Pause after the replay socket fails to receive.
const REPLAY_ERROR_BACKOFF: Duration = Duration::from_millis(100);

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
    replay_endpoint: Option<String>,
}

/// One `publish` call, waiting for the publisher thread.
struct QueuedBatch {
    /// Seconds since the Unix epoch when the engine published the batch.
    ts: f64,
    events: Vec<KvEvent>,
}

impl ZmqEventPublisher {
    /// Binds the PUB socket (and the ROUTER replay socket when `replay_endpoint` is set) on a
    /// new `llmd-kv-events` thread and returns once both are bound, or with the bind error
    /// (an address in use, a bad endpoint).
    ///
    /// `data_parallel_rank`, as in vLLM, is written into every batch and offsets the TCP port
    /// of both endpoints (`tcp://*:5557` binds 5557 + rank). vLLM always has a rank (0 without
    /// data parallelism); pass `Some(0)` to send what vLLM sends, `None` to send nil.
    ///
    /// Endpoints are `tcp://host:port`; a port of 0 binds a free port ([`Self::endpoint`] tells
    /// which). Like vLLM, the PUB socket binds only a wildcard endpoint (host `*` or one with
    /// `::`); vLLM connects the PUB socket to any other host, which llmd refuses rather than
    /// silently binding instead.
    pub fn start(
        cfg: &KvEventsConfig,
        data_parallel_rank: Option<u32>,
    ) -> anyhow::Result<Arc<Self>> {
        let rank = data_parallel_rank.unwrap_or(0);
        let endpoint = bind_address(&offset_endpoint_port(&cfg.endpoint, rank)?);
        if !is_vllm_bind_endpoint(&cfg.endpoint) {
            bail!(
                "KV events endpoint {:?}: vLLM would connect its PUB socket to this host; llmd \
                 only binds, so give a wildcard endpoint such as tcp://*:5557",
                cfg.endpoint
            );
        }
        let replay = cfg
            .replay_endpoint
            .as_deref()
            .map(|e| offset_endpoint_port(e, rank).map(|e| bind_address(&e)))
            .transpose()?;
        if cfg.hwm != FIXED_HWM {
            tracing::warn!(
                hwm = cfg.hwm,
                "KV events: the ZeroMQ high-water mark is fixed at {FIXED_HWM} messages per \
                 subscriber; the configured hwm is ignored"
            );
        }

        let (tx, rx) = mpsc::channel(cfg.max_queue_size);
        let (bound_tx, bound_rx) = std_mpsc::channel();
        let worker = Worker {
            topic: bytes::Bytes::from(cfg.topic.clone().into_bytes()),
            data_parallel_rank,
            buffer: ReplayBuffer::new(cfg.buffer_steps),
            next_seq: 0,
        };
        let thread = std::thread::Builder::new()
            .name("llmd-kv-events".to_string())
            .spawn(move || worker.run(endpoint, replay, rx, bound_tx))
            .context("spawning the KV events thread")?;
        let bound = bound_rx
            .recv()
            .map_err(|_| anyhow!("the KV events thread exited before binding its sockets"))
            .and_then(|r| r);
        let (endpoint, replay_endpoint) = match bound {
            Ok(endpoints) => endpoints,
            Err(e) => {
                let _ = thread.join();
                return Err(e);
            }
        };
        tracing::info!(
            %endpoint,
            replay_endpoint = replay_endpoint.as_deref().unwrap_or("none"),
            topic = %cfg.topic,
            "publishing KV cache events"
        );
        Ok(Arc::new(Self {
            queue: BatchQueue::new(),
            tx: Some(tx),
            thread: Some(thread),
            endpoint,
            replay_endpoint,
        }))
    }

    /// The PUB socket's bound endpoint, with the port actually bound.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The ROUTER replay socket's bound endpoint, with the port actually bound.
    pub fn replay_endpoint(&self) -> Option<&str> {
        self.replay_endpoint.as_deref()
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

/// The last `capacity` batches sent, `(seq, payload)`, oldest first.
struct ReplayBuffer {
    capacity: usize,
    batches: VecDeque<(u64, bytes::Bytes)>,
}

impl ReplayBuffer {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            batches: VecDeque::with_capacity(capacity.min(1024)),
        }
    }

    fn push(&mut self, seq: u64, payload: bytes::Bytes) {
        if self.capacity == 0 {
            return;
        }
        if self.batches.len() == self.capacity {
            self.batches.pop_front();
        }
        self.batches.push_back((seq, payload));
    }

    /// The kept batches with `seq >= start`, oldest first.
    fn since(&self, start: u64) -> impl Iterator<Item = &(u64, bytes::Bytes)> {
        let first = self.batches.partition_point(|(seq, _)| *seq < start);
        self.batches.range(first..)
    }
}

/// Everything the `llmd-kv-events` thread owns besides its sockets.
struct Worker {
    topic: bytes::Bytes,
    data_parallel_rank: Option<u32>,
    buffer: ReplayBuffer,
    next_seq: u64,
}

/// What the thread reports once bound: the PUB and replay endpoints with their real ports.
type Bound = anyhow::Result<(String, Option<String>)>;

impl Worker {
    fn run(
        self,
        endpoint: String,
        replay: Option<String>,
        rx: mpsc::Receiver<QueuedBatch>,
        bound: std_mpsc::Sender<Bound>,
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
        runtime.block_on(self.serve(endpoint, replay, rx, bound));
        // Dropping the runtime drops the sockets' connection tasks, closing every connection.
        drop(runtime);
    }

    async fn serve(
        mut self,
        endpoint: String,
        replay: Option<String>,
        mut rx: mpsc::Receiver<QueuedBatch>,
        bound: std_mpsc::Sender<Bound>,
    ) {
        let (mut publisher, mut router) = match bind_sockets(&endpoint, replay.as_deref()).await {
            Ok((publisher, pub_endpoint, router)) => {
                let replay_endpoint = router.as_ref().map(|(_, e)| e.clone());
                let _ = bound.send(Ok((pub_endpoint, replay_endpoint)));
                (publisher, router.map(|(r, _)| r))
            }
            Err(e) => {
                let _ = bound.send(Err(e));
                return;
            }
        };
        loop {
            tokio::select! {
                // Live batches first: replay is the non-critical path, as in vLLM.
                biased;
                batch = rx.recv() => match batch {
                    Some(batch) => self.send_live(&mut publisher, batch).await,
                    None => break,
                },
                request = recv_replay_request(&mut router) => match (request, router.as_mut()) {
                    (Ok(request), Some(router)) => self.serve_replay(router, request).await,
                    (Err(e), _) => {
                        tracing::warn!(error = %e, "KV events replay socket");
                        // Not a tight loop if the socket keeps failing.
                        tokio::time::sleep(REPLAY_ERROR_BACKOFF).await;
                    }
                    (Ok(_), None) => {}
                },
            }
        }
        for e in publisher.close().await {
            tracing::debug!(error = %e, "closing the KV events PUB socket");
        }
        if let Some(router) = router {
            for e in router.close().await {
                tracing::debug!(error = %e, "closing the KV events replay socket");
            }
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
        self.buffer.push(seq, payload);
        if let Err(e) = send_frames(publisher, frames).await {
            tracing::warn!(error = %e, seq, "KV events batch not sent");
        }
    }

    /// Answers `[client, b"", start_seq]` with every kept batch from `start_seq` on and the
    /// end marker.
    async fn serve_replay(&self, router: &mut RouterSocket, request: ZmqMessage) {
        let frames = request.into_vec();
        let (client, start) = match frames.as_slice() {
            [client, delimiter, start] if delimiter.is_empty() && start.len() <= 8 => {
                // Read as vLLM does (`int.from_bytes(start, "big")`), so a short frame works.
                let mut be = [0u8; 8];
                be[8 - start.len()..].copy_from_slice(start);
                (client.clone(), u64::from_be_bytes(be))
            }
            _ => {
                tracing::warn!(frames = frames.len(), "invalid KV events replay request");
                return;
            }
        };
        let empty = bytes::Bytes::new();
        for (seq, payload) in self.buffer.since(start) {
            let reply = vec![
                client.clone(),
                empty.clone(),
                self.topic.clone(),
                bytes::Bytes::copy_from_slice(&seq.to_be_bytes()),
                payload.clone(),
            ];
            if let Err(e) = send_replay(router, reply).await {
                tracing::warn!(error = %e, seq, "KV events replay abandoned");
                return;
            }
        }
        let end = vec![
            client,
            empty.clone(),
            empty.clone(),
            bytes::Bytes::from_static(&END_SEQ),
            empty,
        ];
        if let Err(e) = send_replay(router, end).await {
            tracing::warn!(error = %e, "KV events replay end marker not sent");
        }
    }
}

async fn bind_sockets(
    endpoint: &str,
    replay: Option<&str>,
) -> anyhow::Result<(PubSocket, String, Option<(RouterSocket, String)>)> {
    let mut publisher = PubSocket::new();
    let bound = publisher
        .bind(endpoint)
        .await
        .with_context(|| format!("binding the KV events PUB socket to {endpoint}"))?;
    let router = match replay {
        Some(replay) => {
            let mut router = RouterSocket::new();
            let replay_bound = router
                .bind(replay)
                .await
                .with_context(|| format!("binding the KV events replay socket to {replay}"))?;
            Some((router, replay_bound.to_string()))
        }
        None => None,
    };
    Ok((publisher, bound.to_string(), router))
}

async fn recv_replay_request(router: &mut Option<RouterSocket>) -> zeromq::ZmqResult<ZmqMessage> {
    match router {
        Some(router) => router.recv().await,
        None => std::future::pending().await,
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

async fn send_replay(router: &mut RouterSocket, frames: Vec<bytes::Bytes>) -> anyhow::Result<()> {
    tokio::time::timeout(REPLAY_SEND_TIMEOUT, send_frames(router, frames))
        .await
        .map_err(|_| anyhow!("the client read nothing for {REPLAY_SEND_TIMEOUT:?}"))?
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

/// vLLM's test for binding rather than connecting the PUB socket.
fn is_vllm_bind_endpoint(endpoint: &str) -> bool {
    endpoint.contains('*') || endpoint.contains("::")
}

/// ZeroMQ's `*` host (every IPv4 interface) spelled as the address the OS binds.
fn bind_address(endpoint: &str) -> String {
    match endpoint.strip_prefix("tcp://*:") {
        Some(port) => format!("tcp://0.0.0.0:{port}"),
        None => endpoint.to_string(),
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
    fn only_wildcard_endpoints_bind_the_pub_socket() {
        assert!(is_vllm_bind_endpoint("tcp://*:5557"));
        assert!(is_vllm_bind_endpoint("tcp://[::]:5557"));
        assert!(!is_vllm_bind_endpoint("tcp://indexer:5557"));
        assert!(!is_vllm_bind_endpoint("tcp://127.0.0.1:5557"));
        assert_eq!(bind_address("tcp://*:5557"), "tcp://0.0.0.0:5557");
        assert_eq!(bind_address("tcp://127.0.0.1:1"), "tcp://127.0.0.1:1");
        let cfg = KvEventsConfig {
            endpoint: "tcp://indexer:5557".to_string(),
            ..KvEventsConfig::default()
        };
        let e = ZmqEventPublisher::start(&cfg, None).err().expect("refused");
        assert!(e.to_string().contains("wildcard"), "{e}");
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

    #[test]
    fn replay_buffer_keeps_the_latest_batches() {
        let mut buffer = ReplayBuffer::new(3);
        for seq in 0..5 {
            buffer.push(seq, bytes::Bytes::from(vec![seq as u8]));
        }
        let seqs = |start| buffer.since(start).map(|(seq, _)| *seq).collect::<Vec<_>>();
        assert_eq!(seqs(0), [2, 3, 4]);
        assert_eq!(seqs(3), [3, 4]);
        assert_eq!(seqs(5), Vec::<u64>::new());
        assert_eq!(buffer.since(4).next().unwrap().1.as_ref(), [4]);
        let mut none = ReplayBuffer::new(0);
        none.push(0, bytes::Bytes::new());
        assert_eq!(none.since(0).count(), 0);
    }
}
