//! The replay side of the KV event publisher: a ROUTER socket on a thread of its own
//! (`llmd-kv-replay`), answering each request from a task of its own.
//!
//! Invariants: nothing here runs on the publisher thread, so a slow or hostile replay client
//! (one that asks for everything, again and again, and reads slowly or not at all) cannot delay
//! live publishing; the only thing the two threads share is the [`ReplayBuffer`], locked just
//! long enough to push one batch or to take a snapshot of the batches to replay (reference
//! counted, not copied). At most [`MAX_REPLAYS_IN_FLIGHT`] replays are served at once; a
//! request past that is refused (answered with the end marker alone), and each replay ends
//! after [`REPLAY_DEADLINE`] however slowly its client reads.
use super::wire::END_SEQ;
use anyhow::{anyhow, Context};
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use zeromq::{RouterSendHalf, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// Replays served at once. A subscriber replays once when it joins and once per gap it sees, so
/// a handful of routers (or indexers) never need more; past it a request is refused rather than
/// queued, so a client asking for everything repeatedly holds at most this many snapshots.
pub const MAX_REPLAYS_IN_FLIGHT: usize = 4;

/// How long one replay message may wait for a client that does not read before the replay is
/// abandoned. Generous: a slow replay delays nothing else, this only frees its slot.
const REPLAY_SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest one replay may take, however slowly (but steadily) its client reads.
const REPLAY_DEADLINE: Duration = Duration::from_secs(60);

/// How long a refusal may wait for its client; a refusal not sent by then is dropped.
const REFUSAL_SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Refusals waiting to be sent; more are counted but not answered.
const REFUSAL_QUEUE: usize = 64;

/// Pause after the replay socket fails to receive.
const REPLAY_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Replay messages sent before the replay task lets other tasks of its thread run.
const YIELD_EVERY: usize = 256;

/// The last `capacity` batches sent, `(seq, payload)`, oldest first. Shared by the publisher
/// thread (which pushes) and the replay thread (which takes snapshots).
pub(super) struct ReplayBuffer {
    capacity: usize,
    batches: VecDeque<(u64, Bytes)>,
}

impl ReplayBuffer {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            batches: VecDeque::with_capacity(capacity.min(1024)),
        }
    }

    pub(super) fn push(&mut self, seq: u64, payload: Bytes) {
        if self.capacity == 0 {
            return;
        }
        if self.batches.len() == self.capacity {
            self.batches.pop_front();
        }
        self.batches.push_back((seq, payload));
    }

    /// The kept batches with `seq >= start`, oldest first.
    pub(super) fn since(&self, start: u64) -> impl Iterator<Item = &(u64, Bytes)> {
        let first = self.batches.partition_point(|(seq, _)| *seq < start);
        self.batches.range(first..)
    }
}

pub(super) type SharedBuffer = Arc<Mutex<ReplayBuffer>>;

/// Counters of the replay socket.
#[derive(Debug, Default)]
pub(super) struct ReplayStats {
    /// Replays that sent every batch asked for and the end marker.
    pub served: AtomicU64,
    /// Requests refused because [`MAX_REPLAYS_IN_FLIGHT`] replays were being served.
    pub refused: AtomicU64,
    /// Replays abandoned: the client stopped reading, or [`REPLAY_DEADLINE`] passed.
    pub abandoned: AtomicU64,
}

/// The replay thread; dropping it stops the thread, closes the socket and joins.
pub(super) struct ReplayServer {
    endpoint: String,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    pub(super) stats: Arc<ReplayStats>,
}

impl ReplayServer {
    /// Binds the ROUTER socket to `endpoint` on a new `llmd-kv-replay` thread; returns once it
    /// is bound, or with the bind error.
    pub(super) fn start(
        endpoint: String,
        topic: Bytes,
        buffer: SharedBuffer,
    ) -> anyhow::Result<Self> {
        let (stop, stopped) = oneshot::channel();
        let (bound_tx, bound_rx) = std_mpsc::channel();
        let stats = Arc::new(ReplayStats::default());
        let task_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("llmd-kv-replay".to_string())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = bound_tx
                            .send(Err(anyhow!(e).context("building the KV replay runtime")));
                        return;
                    }
                };
                runtime.block_on(serve(
                    endpoint, topic, buffer, task_stats, bound_tx, stopped,
                ));
                // Dropping the runtime drops the replay tasks and the socket's connection
                // tasks, closing every connection and the listener.
                drop(runtime);
            })
            .context("spawning the KV events replay thread")?;
        let bound = bound_rx
            .recv()
            .map_err(|_| anyhow!("the KV events replay thread exited before binding its socket"))
            .and_then(|r| r);
        match bound {
            Ok(endpoint) => Ok(Self {
                endpoint,
                stop: Some(stop),
                thread: Some(thread),
                stats,
            }),
            Err(e) => {
                let _ = thread.join();
                Err(e)
            }
        }
    }

    /// The bound endpoint, with the port actually bound.
    pub(super) fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

impl Drop for ReplayServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the KV events replay thread panicked");
            }
        }
    }
}

async fn serve(
    endpoint: String,
    topic: Bytes,
    buffer: SharedBuffer,
    stats: Arc<ReplayStats>,
    bound: std_mpsc::Sender<anyhow::Result<String>>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut router = RouterSocket::new();
    match router
        .bind(&endpoint)
        .await
        .with_context(|| format!("binding the KV events replay socket to {endpoint}"))
    {
        Ok(bound_endpoint) => {
            let _ = bound.send(Ok(bound_endpoint.to_string()));
        }
        Err(e) => {
            let _ = bound.send(Err(e));
            return;
        }
    }
    let (send, mut recv) = router.split();
    let permits = Arc::new(Semaphore::new(MAX_REPLAYS_IN_FLIGHT));
    let (refuse_tx, refuse_rx) = mpsc::channel(REFUSAL_QUEUE);
    tokio::spawn(send_refusals(send.clone(), refuse_rx));
    loop {
        let request = tokio::select! {
            _ = &mut stop => break,
            request = recv.recv() => request,
        };
        let request = match request {
            Ok(request) => request,
            Err(e) => {
                tracing::warn!(error = %e, "KV events replay socket");
                // Not a tight loop if the socket keeps failing.
                tokio::time::sleep(REPLAY_ERROR_BACKOFF).await;
                continue;
            }
        };
        let Some((client, start)) = parse_request(request) else {
            continue;
        };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let batches: Vec<(u64, Bytes)> = buffer
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .since(start)
                    .cloned()
                    .collect();
                tokio::spawn(serve_replay(
                    send.clone(),
                    topic.clone(),
                    client,
                    batches,
                    permit,
                    stats.clone(),
                ));
            }
            Err(_) => {
                let refused = stats.refused.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(
                    refused_replays = refused,
                    "KV events replay refused: {MAX_REPLAYS_IN_FLIGHT} replays are in flight"
                );
                // Best effort: when the refusal queue is full the client just gets no answer.
                let _ = refuse_tx.try_send(client);
            }
        }
    }
}

/// `(client, start_seq)` of a `[client, b"", start_seq]` request.
fn parse_request(request: ZmqMessage) -> Option<(Bytes, u64)> {
    let frames = request.into_vec();
    match frames.as_slice() {
        [client, delimiter, start] if delimiter.is_empty() && start.len() <= 8 => {
            // Read as vLLM does (`int.from_bytes(start, "big")`), so a short frame works.
            let mut be = [0u8; 8];
            be[8 - start.len()..].copy_from_slice(start);
            Some((client.clone(), u64::from_be_bytes(be)))
        }
        _ => {
            tracing::warn!(frames = frames.len(), "invalid KV events replay request");
            None
        }
    }
}

/// Sends `batches` and the end marker to `client`, within [`REPLAY_DEADLINE`].
async fn serve_replay(
    mut send: RouterSendHalf,
    topic: Bytes,
    client: Bytes,
    batches: Vec<(u64, Bytes)>,
    _permit: OwnedSemaphorePermit,
    stats: Arc<ReplayStats>,
) {
    let replay = async {
        let empty = Bytes::new();
        for (i, (seq, payload)) in batches.into_iter().enumerate() {
            let reply = vec![
                client.clone(),
                empty.clone(),
                topic.clone(),
                Bytes::copy_from_slice(&seq.to_be_bytes()),
                payload,
            ];
            send_with_timeout(&mut send, reply, REPLAY_SEND_TIMEOUT)
                .await
                .with_context(|| format!("batch {seq}"))?;
            if (i + 1) % YIELD_EVERY == 0 {
                tokio::task::yield_now().await;
            }
        }
        send_with_timeout(&mut send, end_marker(client.clone()), REPLAY_SEND_TIMEOUT)
            .await
            .context("the end marker")
    };
    let result = match tokio::time::timeout(REPLAY_DEADLINE, replay).await {
        Ok(result) => result,
        Err(_) => Err(anyhow!("the replay took more than {REPLAY_DEADLINE:?}")),
    };
    match result {
        Ok(()) => {
            stats.served.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            stats.abandoned.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = format!("{e:#}"), "KV events replay abandoned");
        }
    }
}

/// Answers each refused client with the end marker alone, as if nothing were kept, so it does
/// not wait for its own timeout.
async fn send_refusals(mut send: RouterSendHalf, mut clients: mpsc::Receiver<Bytes>) {
    while let Some(client) = clients.recv().await {
        if let Err(e) = send_with_timeout(&mut send, end_marker(client), REFUSAL_SEND_TIMEOUT).await
        {
            tracing::debug!(error = %e, "KV events replay refusal not sent");
        }
    }
}

/// `[client, b"", b"", END_SEQ, b""]`.
fn end_marker(client: Bytes) -> Vec<Bytes> {
    let empty = Bytes::new();
    vec![
        client,
        empty.clone(),
        empty.clone(),
        Bytes::from_static(&END_SEQ),
        empty,
    ]
}

async fn send_with_timeout(
    send: &mut RouterSendHalf,
    frames: Vec<Bytes>,
    limit: Duration,
) -> anyhow::Result<()> {
    let message = ZmqMessage::try_from(frames).map_err(|e| anyhow!("{e}"))?;
    tokio::time::timeout(limit, send.send(message))
        .await
        .map_err(|_| anyhow!("the client read nothing for {limit:?}"))??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_buffer_keeps_the_latest_batches() {
        let mut buffer = ReplayBuffer::new(3);
        for seq in 0..5 {
            buffer.push(seq, Bytes::from(vec![seq as u8]));
        }
        let seqs = |start| buffer.since(start).map(|(seq, _)| *seq).collect::<Vec<_>>();
        assert_eq!(seqs(0), [2, 3, 4]);
        assert_eq!(seqs(3), [3, 4]);
        assert_eq!(seqs(5), Vec::<u64>::new());
        assert_eq!(buffer.since(4).next().unwrap().1.as_ref(), [4]);
        let mut none = ReplayBuffer::new(0);
        none.push(0, Bytes::new());
        assert_eq!(none.since(0).count(), 0);
    }

    #[test]
    fn replay_requests_are_parsed_as_vllm_does() {
        let request = |frames: Vec<&'static [u8]>| {
            ZmqMessage::try_from(
                frames
                    .into_iter()
                    .map(Bytes::from_static)
                    .collect::<Vec<_>>(),
            )
            .unwrap()
        };
        let (client, start) = parse_request(request(vec![b"id", b"", &[0, 0, 0, 0, 0, 0, 1, 2]]))
            .expect("a valid request");
        assert_eq!((client.as_ref(), start), (&b"id"[..], 258));
        assert_eq!(parse_request(request(vec![b"id", b"", &[5]])).unwrap().1, 5);
        assert!(parse_request(request(vec![b"id", b"x", &[5]])).is_none());
        assert!(parse_request(request(vec![b"id", b"", &[0; 9]])).is_none());
        assert!(parse_request(request(vec![b"id", b""])).is_none());
    }
}
