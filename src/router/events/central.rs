//! llm-d's centralized KV-event topology: the router binds one SUB socket
//! (`llmd route --kv-events-bind tcp://*:5557`) that every worker's PUB socket connects to —
//! an llmd worker or a vLLM one whose `--kv-events-config` `endpoint` names the router's host
//! (`tcp://router:5557`). One socket carries every worker's batches, so the worker is told by
//! the message's topic, which llm-d's deployments set to `kv@<pod-ip:port>@<model>`.
//!
//! A topic's `<pod-ip:port>` names the worker whose URL has that `host:port`
//! ([`super::super::workers::WorkerSpec::host_port`]); a bare `<pod-ip>` names the one worker on
//! that host, when only one is. Each worker's stream is followed as the per-worker subscription
//! follows it ([`super::subscribe`]): sequence numbers per topic, a later one counted as a gap, an
//! earlier one a restart (its index entries dropped) or a duplicate; oversized and malformed
//! batches counted and skipped. There is no replay here: a worker's replay socket is reached by
//! the per-worker subscription (`--worker URL,events=…,replay=…`), which may run beside this
//! one.
//!
//! Batches whose topic names no known worker are dropped and counted (the worker may be
//! discovered a moment later: until then nothing is routed to it, and the router's own pending
//! entries cover what it sends there first); batches whose topic is not `kv@ID@MODEL` are
//! dropped and counted as malformed. Nothing is kept for an unknown publisher, so the state is
//! bounded by the known workers.
use super::{decode_counted, SubStats, Update};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use zeromq::{Socket, SocketRecv, SubSocket, ZmqMessage};

/// The centralized subscriber's counters: per worker (by name), and for what no worker claims.
#[derive(Debug, Default)]
pub struct CentralStats {
    per_worker: Mutex<HashMap<String, Arc<SubStats>>>,
    /// Batches whose topic named no known worker.
    pub unknown_topic: AtomicU64,
    /// Messages that are not `[topic, seq (8 bytes), payload]` with a `kv@ID@MODEL` topic.
    pub malformed: AtomicU64,
}

impl CentralStats {
    /// The counters of worker `name` (zeros when nothing came from it).
    pub fn worker(&self, name: &str) -> Option<Arc<SubStats>> {
        self.lock().get(name).cloned()
    }

    fn worker_or_new(&self, name: &str) -> Arc<SubStats> {
        self.lock().entry(name.to_string()).or_default().clone()
    }

    /// Forgets the counters of the workers `keep` says are gone.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.lock().retain(|name, _| keep(name));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<SubStats>>> {
        self.per_worker.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The publisher a topic names: `ID` of `kv@ID@MODEL` (the model may itself hold `@`).
pub fn topic_publisher(topic: &[u8]) -> Option<&str> {
    let rest = std::str::from_utf8(topic).ok()?.strip_prefix("kv@")?;
    let (id, _model) = rest.split_once('@')?;
    (!id.is_empty()).then_some(id)
}

/// Which of `workers` (`(name, host:port)`) a topic's publisher `id` is: the one whose
/// `host:port` it is, else, for a bare host, the only one on that host.
pub fn match_worker<'a>(
    id: &str,
    workers: impl Iterator<Item = (&'a str, &'a str)> + Clone,
) -> Option<&'a str> {
    if let Some((name, _)) = workers.clone().find(|(_, hp)| *hp == id) {
        return Some(name);
    }
    let mut on_host = workers.filter(|(_, hp)| hp.rsplit_once(':').is_some_and(|(h, _)| h == id));
    match (on_host.next(), on_host.next()) {
        (Some((name, _)), None) => Some(name),
        _ => None,
    }
}

/// Binds the SUB socket to `endpoint` (subscribed to every topic) and returns it with the
/// endpoint actually bound.
pub async fn bind(endpoint: &str) -> anyhow::Result<(SubSocket, String)> {
    use anyhow::Context;
    let endpoint =
        crate::server::kv_events::bind_endpoint(endpoint, 0).context("--kv-events-bind")?;
    let mut sub = SubSocket::new();
    // Before binding: a publisher accepted in between could miss the subscription.
    sub.subscribe("")
        .await
        .context("--kv-events-bind: subscribing")?;
    let bound = sub.bind(&endpoint).await.with_context(|| {
        format!("--kv-events-bind: binding the KV events SUB socket to {endpoint}")
    })?;
    Ok((sub, bound.to_string()))
}

/// Where one topic's stream stands.
struct Stream {
    worker: String,
    next: u64,
}

/// Receives on the bound `sub` until the task is dropped: `resolve` names the worker a topic's
/// publisher id is (None: no known worker), `apply` takes each update for a worker by name.
pub async fn serve(
    mut sub: SubSocket,
    stats: Arc<CentralStats>,
    resolve: impl Fn(&str) -> Option<String> + Send,
    mut apply: impl FnMut(&str, Update) + Send,
) {
    // By topic publisher id. Entries are made only for ids that name a known worker and are
    // forgotten when it no longer does, so their number is bounded by the workers'.
    let mut streams: HashMap<String, Stream> = HashMap::new();
    let mut receive_errors = 0u64;
    loop {
        let msg = match sub.recv().await {
            Ok(m) => m,
            Err(e) => {
                // A publisher that broke the protocol or went away (zeromq drops it); once per
                // power of two, so a peer that keeps doing so cannot flood the log.
                receive_errors += 1;
                if receive_errors.is_power_of_two() {
                    tracing::warn!(
                        error = %e,
                        receive_errors,
                        "KV events: receiving on the bound SUB socket failed"
                    );
                }
                // Never a busy loop, whatever the library answers.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let Some((id, seq, payload)) = parse(&msg) else {
            let n = stats.malformed.fetch_add(1, Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    malformed_messages = n,
                    "KV events: a message on the bound socket is not [kv@ID@MODEL, seq, payload]"
                );
            }
            continue;
        };
        let Some(worker) = resolve(id) else {
            streams.remove(id);
            let n = stats.unknown_topic.fetch_add(1, Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    publisher = id,
                    unknown_topic_batches = n,
                    "KV events: a batch from a publisher that is no known worker; dropped"
                );
            }
            continue;
        };
        let st = stats.worker_or_new(&worker);
        let stream = streams.entry(id.to_string()).or_insert_with(|| Stream {
            worker: worker.clone(),
            next: seq,
        });
        if stream.worker != worker {
            // The address now belongs to another worker: a fresh stream.
            *stream = Stream {
                worker: worker.clone(),
                next: seq,
            };
        }
        let n = stream.next;
        if seq < n {
            if n - seq > 1 << 20 || (seq == 0 && n > 1) {
                // Numbering started again: a restarted worker.
                apply(&worker, Update::Reset);
            } else {
                continue; // already applied
            }
        } else if seq > n {
            st.gaps.fetch_add(1, Relaxed);
        }
        if let Some(events) = decode_counted(&payload, id, seq, &st) {
            apply(&worker, Update::Events(events));
        }
        st.batches.fetch_add(1, Relaxed);
        stream.next = seq + 1;
    }
}

/// `(publisher id, seq, payload)` of a `[kv@ID@MODEL, seq, payload]` message.
fn parse(msg: &ZmqMessage) -> Option<(&str, u64, bytes::Bytes)> {
    if msg.len() != 3 {
        return None;
    }
    let id = topic_publisher(msg.get(0)?)?;
    let seq = u64::from_be_bytes(msg.get(1)?.as_ref().try_into().ok()?);
    Some((id, seq, msg.get(2)?.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_name_their_publisher() {
        assert_eq!(
            topic_publisher(b"kv@10.0.0.7:8000@Qwen/Qwen3-8B"),
            Some("10.0.0.7:8000")
        );
        assert_eq!(topic_publisher(b"kv@10.0.0.7@m@x"), Some("10.0.0.7"));
        assert_eq!(topic_publisher(b"kv@[::1]:8000@m"), Some("[::1]:8000"));
        for bad in [
            &b""[..],
            b"kv@",
            b"kv@@m",
            b"kv@10.0.0.7",
            b"xx@a@b",
            b"kv@\xff@m",
        ] {
            assert_eq!(topic_publisher(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn publishers_match_a_worker_by_host_port_or_by_its_only_host() {
        let workers = [
            ("http://10.0.0.7:8000", "10.0.0.7:8000"),
            ("http://10.0.0.7:8001", "10.0.0.7:8001"),
            ("http://10.0.0.8:8000", "10.0.0.8:8000"),
            ("http://[::1]:9000", "[::1]:9000"),
        ];
        let w = || workers.iter().map(|(n, hp)| (*n, *hp));
        assert_eq!(
            match_worker("10.0.0.7:8001", w()),
            Some("http://10.0.0.7:8001")
        );
        assert_eq!(match_worker("10.0.0.8", w()), Some("http://10.0.0.8:8000"));
        assert_eq!(match_worker("[::1]", w()), Some("http://[::1]:9000"));
        // Two workers on the host: a bare host is ambiguous.
        assert_eq!(match_worker("10.0.0.7", w()), None);
        assert_eq!(match_worker("10.0.0.9:8000", w()), None);
        assert_eq!(match_worker("10.0.0.7:80", w()), None);
    }

    /// The bound socket takes a connecting llmd publisher's batches, attributed by topic.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bound_socket_takes_a_connecting_publishers_batches() {
        use crate::kv::{KvEvent, KvEventSink};
        use crate::server::kv_events::{KvEventsConfig, Publisher, ZmqEventPublisher};
        let (sub, endpoint) = bind("tcp://127.0.0.1:0").await.expect("binding");
        let stats = Arc::new(CentralStats::default());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(serve(
            sub,
            stats.clone(),
            |id: &str| (id == "10.0.0.7:8000").then(|| "w".to_string()),
            move |name: &str, u| {
                let _ = tx.send((name.to_string(), format!("{u:?}")));
            },
        ));
        let cfg = KvEventsConfig {
            enable_kv_cache_events: true,
            publisher: Publisher::Zmq,
            endpoint,
            topic: "kv@10.0.0.7:8000@m".to_string(),
            ..KvEventsConfig::default()
        };
        let publisher = ZmqEventPublisher::start(&cfg, Some(0)).expect("starting");
        let got = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                publisher.publish(vec![KvEvent::AllBlocksCleared]);
                if let Ok(Some(got)) =
                    tokio::time::timeout(std::time::Duration::from_millis(100), rx.recv()).await
                {
                    return got;
                }
            }
        })
        .await
        .expect("no batch reached the bound socket");
        assert_eq!(got.0, "w");
        assert!(got.1.contains("AllBlocksCleared"), "{}", got.1);
        task.abort();
    }
}
