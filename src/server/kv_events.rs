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
//! - Binding or connecting, as vLLM decides (`ZmqEventPublisher._socket_setup`): the PUB socket
//!   *binds* when its endpoint has `*` or `::` in it (`tcp://*:PORT`, every IPv4 interface;
//!   `tcp://[::]:PORT`, every interface; `tcp://[::1]:PORT`) and *connects* to any other host
//!   (`tcp://router:5557`, `tcp://10.0.0.9:5557`, `tcp://127.0.0.1:5557`): llm-d's centralized
//!   topology, where the endpoint picker binds one SUB socket that every model server's PUB
//!   connects to, telling them apart by the topic (`kv@<pod-ip:port>@<model>`). A connected PUB
//!   reconnects whenever the connection drops (the router restarted): the first attempt at
//!   once, then after 100 ms, doubling up to [`MAX_RECONNECT_INTERVAL`]; what is published while
//!   no subscriber is connected is lost to it, as with vLLM (it stays in the replay buffer).
//!   The replay socket always binds (`tcp://*:PORT`, `tcp://[::]:PORT` or `tcp://IP:PORT` for
//!   one address of this machine), in both modes, as vLLM's does.
//! - The data parallel rank moves the port up by the rank in both modes, as vLLM does: rank r
//!   binds PORT + r, or connects to PORT + r (so a centralized subscriber takes rank r > 0's
//!   events on its PORT + r).
//!
//! Security: the events carry every cached prompt's token ids (and the replay socket the last
//! `buffer_steps` batches of them), so the ports must be reachable only by the router or
//! indexer. A connecting PUB socket opens no port; a bound one takes `*` or `[::]` (restrict it
//! with a NetworkPolicy) or `[::1]`; bind the replay socket to the pod IP or loopback rather than
//! `*` where that is all it needs.
//!
//! Invariants: [`ZmqEventPublisher::publish`] never blocks the engine — it stamps the time and
//! queues the batch in a bounded channel, dropping (and counting) it when the channel is full.
//! One thread, `llmd-kv-events`, owns the PUB socket, (re)connects it, numbers, encodes, sends
//! and keeps each batch; the replay socket has a thread of its own (`replay`), so no replay
//! client can delay live publishing. Dropping the last handle drains the queue, closes the
//! sockets and joins both threads, so the ports are free again when the drop returns.
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

/// The first wait before connecting again after a failed attempt (libzmq's `reconnect_ivl`).
const RECONNECT_INTERVAL: Duration = Duration::from_millis(100);

/// The longest wait between two connection attempts of a connecting PUB socket.
pub const MAX_RECONNECT_INTERVAL: Duration = Duration::from_secs(2);

/// How long one connection attempt may hold the publisher thread (batches wait meanwhile).
const CONNECT_ATTEMPT: Duration = Duration::from_secs(1);

/// What the PUB socket does with its endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PubTarget {
    /// Binds this address (see [`bind_endpoint`]).
    Bind(String),
    /// Connects to this `tcp://HOST:PORT`, and again whenever the connection drops.
    Connect(String),
}

/// What vLLM's publisher does with a PUB `endpoint` for data parallel `rank`: the port moved up
/// by the rank, then a bind when the endpoint has `*` or `::` in it, else a connect to it.
pub fn pub_target(endpoint: &str, rank: u32) -> anyhow::Result<PubTarget> {
    let offset = offset_endpoint_port(endpoint, rank)?;
    if offset.contains('*') || offset.contains("::") {
        return bind_endpoint(endpoint, rank).map(PubTarget::Bind);
    }
    let rest = offset.trim_start_matches("tcp://");
    let (host, port) = rest
        .rsplit_once(':')
        .with_context(|| format!("KV events endpoint {endpoint:?} has no port"))?;
    if host.is_empty() {
        bail!("KV events endpoint {endpoint:?} names no host to connect to");
    }
    if port == "0" {
        bail!(
            "KV events endpoint {endpoint:?}: an endpoint naming a host is connected to (as vLLM \
             does), and port 0 cannot be; to bind a free port, use tcp://*:0"
        );
    }
    Ok(PubTarget::Connect(offset))
}

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
    /// Binds or connects the PUB socket on a new `llmd-kv-events` thread (and binds the ROUTER
    /// replay socket, when `replay_endpoint` is set, on a `llmd-kv-replay` thread) and returns
    /// once the sockets are bound, or with the error (an address in use or not of this machine,
    /// a bad endpoint). A connecting PUB socket returns at once and connects in the background
    /// (the subscriber may start later), reconnecting whenever the connection drops.
    ///
    /// `data_parallel_rank`, as in vLLM, is written into every batch and offsets the TCP port
    /// of both endpoints (`tcp://*:5557` binds 5557 + rank, `tcp://router:5557` connects to
    /// 5557 + rank). vLLM always has a rank (0 without data parallelism); pass `Some(0)` to send
    /// what vLLM sends, `None` to send nil.
    ///
    /// The PUB endpoint binds or connects as [`pub_target`] says; the replay endpoint binds
    /// (see [`bind_endpoint`]). A port of 0 binds a free port ([`Self::endpoint`] tells which).
    pub fn start(
        cfg: &KvEventsConfig,
        data_parallel_rank: Option<u32>,
    ) -> anyhow::Result<Arc<Self>> {
        let rank = data_parallel_rank.unwrap_or(0);
        let target = pub_target(&cfg.endpoint, rank)?;
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
            .spawn(move || worker.run(target, rx, bound_tx))
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

    /// The PUB socket's bound endpoint, with the port actually bound; or the endpoint it
    /// connects to.
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
        target: PubTarget,
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
        runtime.block_on(self.serve(target, rx, bound));
        // Dropping the runtime drops the socket's connection tasks, closing every connection.
        drop(runtime);
    }

    async fn serve(
        mut self,
        target: PubTarget,
        mut rx: mpsc::Receiver<QueuedBatch>,
        bound: std_mpsc::Sender<anyhow::Result<String>>,
    ) {
        let mut publisher = PubSocket::new();
        let connect_to = match target {
            PubTarget::Bind(endpoint) => {
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
                None
            }
            PubTarget::Connect(endpoint) => {
                let _ = bound.send(Ok(endpoint.clone()));
                Some(endpoint)
            }
        };
        match connect_to {
            None => {
                while let Some(batch) = rx.recv().await {
                    self.send_live(&mut publisher, batch).await;
                }
            }
            Some(endpoint) => {
                self.serve_connected(&mut publisher, &endpoint, &mut rx)
                    .await
            }
        }
        for e in publisher.close().await {
            tracing::debug!(error = %e, "closing the KV events PUB socket");
        }
    }

    /// The connecting PUB socket's loop: sends what is queued and keeps one connection to
    /// `endpoint`, connecting again (after [`RECONNECT_INTERVAL`], doubling up to
    /// [`MAX_RECONNECT_INTERVAL`]) whenever it fails or drops.
    async fn serve_connected(
        &mut self,
        publisher: &mut PubSocket,
        endpoint: &str,
        rx: &mut mpsc::Receiver<QueuedBatch>,
    ) {
        use futures_util::StreamExt;
        use zeromq::SocketEvent;
        let mut monitor = publisher.monitor();
        // The subscriber connected to, once the monitor has named it; `connected` is set as
        // soon as `connect` returns.
        let mut peer = None;
        let mut connected = false;
        let mut wait = RECONNECT_INTERVAL;
        let mut retry_at = tokio::time::Instant::now();
        let mut failures = 0u64;
        loop {
            if !connected && tokio::time::Instant::now() >= retry_at {
                match tokio::time::timeout(CONNECT_ATTEMPT, publisher.connect(endpoint)).await {
                    Ok(Ok(())) => {
                        tracing::info!(%endpoint, "KV events: PUB socket connected");
                        connected = true;
                        failures = 0;
                        wait = RECONNECT_INTERVAL;
                    }
                    outcome => {
                        failures += 1;
                        // Once per power of two: a subscriber down for long does not flood
                        // the log.
                        if failures.is_power_of_two() {
                            let error = match outcome {
                                Ok(Err(e)) => e.to_string(),
                                _ => format!("no connection within {CONNECT_ATTEMPT:?}"),
                            };
                            tracing::warn!(
                                %endpoint, %error, failures,
                                "KV events: cannot connect the PUB socket; retrying"
                            );
                        }
                        retry_at = tokio::time::Instant::now() + wait;
                        wait = (wait * 2).min(MAX_RECONNECT_INTERVAL);
                    }
                }
            }
            tokio::select! {
                batch = rx.recv() => match batch {
                    Some(batch) => self.send_live(publisher, batch).await,
                    None => return,
                },
                Some(event) = monitor.next() => match event {
                    SocketEvent::Connected(_, id) => peer = Some(id),
                    SocketEvent::Disconnected(id) if peer.as_ref() == Some(&id) => {
                        tracing::warn!(
                            %endpoint,
                            "KV events: the subscriber went away; reconnecting"
                        );
                        peer = None;
                        connected = false;
                        retry_at = tokio::time::Instant::now();
                    }
                    _ => {}
                },
                () = tokio::time::sleep_until(retry_at), if !connected => {}
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
/// router in the same pod. A host name is refused: a ROUTER socket binds an address of this
/// machine.
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
             {host:?} is not one"
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
        // The replay socket binds in both modes, so a host name is refused there.
        let cfg = KvEventsConfig {
            endpoint: "tcp://router:5557".to_string(),
            replay_endpoint: Some("tcp://replayer:5558".to_string()),
            ..KvEventsConfig::default()
        };
        let e = ZmqEventPublisher::start(&cfg, None).err().expect("refused");
        assert!(e.to_string().contains("replayer"), "{e}");
    }

    #[test]
    fn the_pub_socket_binds_wildcards_and_connects_to_hosts_as_vllm_does() {
        let bind = |e: &str| PubTarget::Bind(e.to_string());
        let connect = |e: &str| PubTarget::Connect(e.to_string());
        assert_eq!(
            pub_target("tcp://*:5557", 0).unwrap(),
            bind("tcp://0.0.0.0:5557")
        );
        assert_eq!(
            pub_target("tcp://*:5557", 2).unwrap(),
            bind("tcp://0.0.0.0:5559")
        );
        assert_eq!(pub_target("tcp://[::]:0", 1).unwrap(), bind("tcp://[::]:0"));
        // vLLM's test is a substring one: `::` binds, so IPv6 loopback binds too.
        assert_eq!(
            pub_target("tcp://[::1]:7", 0).unwrap(),
            bind("tcp://[::1]:7")
        );
        // Any other host is connected to, the port moved up by the rank as vLLM does.
        assert_eq!(
            pub_target("tcp://epp.ns.svc:5557", 0).unwrap(),
            connect("tcp://epp.ns.svc:5557")
        );
        assert_eq!(
            pub_target("tcp://10.0.0.9:5557", 3).unwrap(),
            connect("tcp://10.0.0.9:5560")
        );
        assert_eq!(
            pub_target("tcp://127.0.0.1:5557", 0).unwrap(),
            connect("tcp://127.0.0.1:5557")
        );
        for (bad, says) in [
            ("tcp://127.0.0.1:0", "port 0"),
            ("tcp://:5557", "no host"),
            ("tcp://router", "no port"),
            ("ipc:///tmp/kv", "tcp://"),
            ("tcp://router:65535", "past 65535"),
        ] {
            let rank = u32::from(bad.ends_with("65535"));
            let e = pub_target(bad, rank).unwrap_err();
            assert!(format!("{e:#}").contains(says), "{bad}: {e:#}");
        }
        // A connecting publisher starts even with nobody listening yet.
        let cfg = KvEventsConfig {
            endpoint: format!("tcp://127.0.0.1:{}", free_port()),
            ..KvEventsConfig::default()
        };
        let publisher = ZmqEventPublisher::start(&cfg, None).expect("starts");
        assert_eq!(publisher.endpoint(), cfg.endpoint);
        publisher.publish(vec![KvEvent::AllBlocksCleared]);
        drop(publisher);
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
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
