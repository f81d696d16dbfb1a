//! The KV-event publisher over real sockets: a real pyzmq subscriber checks vLLM's wire format
//! and replay (`tests/kv_events_subscriber.py`), a Rust DEALER checks the replay framing, and
//! the sockets are bound, refused and released as `llmd serve` relies on. A PUB endpoint naming
//! a host connects to a subscriber bound there and reconnects when it restarts; `llmd serve`
//! does so with its topic, and `llmd route --kv-events-bind` tells workers (llmd ones and a
//! pyzmq publisher playing vLLM) apart by theirs (llm-d's centralized topology).
mod common;

use common::{args as strings, stories, LlmdProcess};

use llmd::kv::{KvEvent, KvEventSink, Medium};
use llmd::router::events::{subscribe, SubStats, Update, MAX_BATCH_BYTES};
use llmd::server::kv_events::{
    encode_batch, KvEventsConfig, Publisher, ZmqEventPublisher, END_SEQ, MAX_REPLAYS_IN_FLIGHT,
};
use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use zeromq::{DealerSocket, PubSocket, Socket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

const TOPIC: &str = "kv@test-pod@tiny-model";

/// Held by every test here: one that drops its publisher and binds the same ports again must
/// not race another test's outgoing connections, which the kernel may give the freed port as
/// their local port.
static SOCKETS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SOCKETS.lock().unwrap_or_else(|e| e.into_inner())
}

fn config(endpoint: &str, replay: Option<&str>) -> KvEventsConfig {
    KvEventsConfig {
        enable_kv_cache_events: true,
        publisher: Publisher::Zmq,
        endpoint: endpoint.to_string(),
        replay_endpoint: replay.map(str::to_string),
        topic: TOPIC.to_string(),
        ..KvEventsConfig::default()
    }
}

/// The port of a bound `tcp://host:port` endpoint.
fn port(endpoint: &str) -> u16 {
    endpoint
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {endpoint}"))
}

/// Batch `seq` of the pattern the Python subscriber checks with `--pattern` (`expected_batch`
/// in tests/kv_events_subscriber.py; keep the two in step): every event kind, both parent
/// forms, hashes using all 64 bits.
fn batch_for_seq(seq: u64) -> Vec<KvEvent> {
    let hashes = vec![seq * 1000 + 1, u64::MAX - seq];
    let parent = (seq % 2 == 1).then_some(seq * 1000);
    let first_token = u32::try_from(seq).expect("small seq");
    let stored = |medium| KvEvent::BlockStored {
        block_hashes: hashes.clone(),
        parent_block_hash: parent,
        token_ids: (first_token..first_token + 8).collect(),
        block_size: 4,
        medium,
        extra_keys: vec![Vec::new(); hashes.len()],
    };
    match seq % 3 {
        0 => vec![stored(Medium::Gpu)],
        1 => vec![KvEvent::BlockRemoved {
            block_hashes: hashes.clone(),
            medium: Medium::Cpu,
        }],
        _ => vec![KvEvent::AllBlocksCleared, stored(Medium::Disk)],
    }
}

/// Kills the subscriber if the test fails before it exits.
struct Subscriber {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Subscriber {
    fn spawn(args: &[String]) -> Self {
        let mut child = Command::new("python3")
            .arg("tests/kv_events_subscriber.py")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running python3");
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Self {
            child,
            lines,
            stderr,
        }
    }

    /// The next stdout line starting with `prefix`, waiting up to `timeout`.
    fn line(&mut self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return Some(line),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// Waits for the exit; panics with the script's stderr unless it succeeded.
    fn finish(mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for python3") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the subscriber did not finish within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let stderr = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new));
        let stderr = stderr.join().unwrap_or_default();
        assert!(
            status.success(),
            "tests/kv_events_subscriber.py failed ({status}):\n{stderr}"
        );
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Batches the subscriber must receive live once it has joined.
const LIVE: u64 = 20;

#[test]
fn python_subscriber_checks_vllm_wire_format_and_replay() {
    let _serial = serial();
    if !common::python_has_zmq() {
        return;
    }
    let publisher =
        ZmqEventPublisher::start(&config("tcp://*:0", Some("tcp://127.0.0.1:0")), Some(0))
            .expect("binding the publisher");
    python_subscriber_checks(&publisher, "127.0.0.1");
}

/// Publishes pattern batches: 5 before a pyzmq subscriber (connecting to `host`) joins, then
/// until it has received [`LIVE`] of them live and replayed everything from 0.
fn python_subscriber_checks(publisher: &ZmqEventPublisher, host: &str) {
    python_subscriber_round(publisher, Reach::Connect(host), &mut 0);
}

/// How the pyzmq subscriber meets the publisher.
enum Reach<'a> {
    /// It connects to the publisher's bound port on this host.
    Connect(&'a str),
    /// It binds the endpoint the publisher connects to (llm-d's centralized topology), and
    /// checks that every topic is exactly [`TOPIC`].
    Bind,
}

/// [`python_subscriber_checks`] from batch `published` on (the publisher's next sequence
/// number), which it moves past what it publishes.
fn python_subscriber_round(publisher: &ZmqEventPublisher, reach: Reach, published: &mut u64) {
    let replay = publisher.replay_endpoint().expect("replay endpoint");
    let start = *published;
    let publish = |published: &mut u64| {
        publisher.publish(batch_for_seq(*published));
        *published += 1;
    };
    // Sent before anyone subscribes: only the replay can deliver these.
    for _ in 0..5 {
        publish(published);
    }

    let (endpoint, host, extra) = match reach {
        Reach::Connect(host) => (
            format!("tcp://{host}:{}", port(publisher.endpoint())),
            host,
            vec![],
        ),
        Reach::Bind => (
            publisher.endpoint().to_string(),
            "127.0.0.1",
            vec!["--bind".to_string(), "--exact-topic".to_string()],
        ),
    };
    let mut args = vec![
        "--endpoint".to_string(),
        endpoint,
        "--replay".to_string(),
        format!("tcp://{host}:{}", port(replay)),
        "--topic".to_string(),
        TOPIC.to_string(),
        "--expect".to_string(),
        LIVE.to_string(),
        "--pattern".to_string(),
        "--quiet".to_string(),
    ];
    args.extend(extra);
    let connecting = matches!(reach, Reach::Bind);
    let mut sub = Subscriber::spawn(&args);
    assert!(
        sub.line("READY", Duration::from_secs(30)).is_some(),
        "the subscriber never got ready"
    );
    let first = join(publisher, &mut sub, published);
    // A connecting publisher may send what waited in its queue as soon as it has connected;
    // a bound one had no subscriber for the first five.
    let sent_to_nobody = if connecting { 0 } else { 5 };
    assert!(
        first >= start + sent_to_nobody,
        "joined at {first}, before the batches sent to nobody"
    );
    while *published < first + LIVE {
        publish(published);
    }
    sub.finish(Duration::from_secs(60));
    assert_eq!(publisher.dropped_batches(), 0);
}

/// Publishes pattern batches until `sub` has seen one; the sequence number of the first.
fn join(publisher: &ZmqEventPublisher, sub: &mut Subscriber, published: &mut u64) -> u64 {
    // A SUB socket misses what is published before its subscription reaches the PUB socket,
    // however long it waited: publish until it has seen a batch.
    let deadline = Instant::now() + Duration::from_secs(30);
    let joined = loop {
        assert!(Instant::now() < deadline, "the subscriber never joined");
        publisher.publish(batch_for_seq(*published));
        *published += 1;
        if let Some(line) = sub.line("JOINED", Duration::from_millis(100)) {
            break line;
        }
    };
    joined["JOINED ".len()..].parse().expect("JOINED <seq>")
}

/// Publishes `n` pattern batches and asks a DEALER for the replay from `start`.
async fn replay_over_dealer(n: u64, start: u64) -> (Vec<ZmqMessage>, ZmqMessage) {
    let publisher =
        ZmqEventPublisher::start(&config("tcp://*:0", Some("tcp://127.0.0.1:0")), Some(0))
            .expect("binding the publisher");
    for seq in 0..n {
        publisher.publish(batch_for_seq(seq));
    }
    // The replay socket has a thread of its own: it sees a batch once the publisher sent it.
    if n > 0 {
        wait_until_kept(publisher.replay_endpoint().expect("replay endpoint"), n - 1).await;
    }
    let mut dealer = DealerSocket::new();
    dealer
        .connect(publisher.replay_endpoint().expect("replay endpoint"))
        .await
        .expect("connecting the DEALER");
    let request = vec![
        bytes::Bytes::new(),
        bytes::Bytes::from(start.to_be_bytes().to_vec()),
    ];
    dealer
        .send(ZmqMessage::try_from(request).expect("frames"))
        .await
        .expect("sending the replay request");
    let mut batches = Vec::new();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), dealer.recv())
            .await
            .expect("a replay message within 10 s")
            .expect("receiving");
        if message.get(2).map(|f| f.as_ref()) == Some(&END_SEQ[..]) {
            return (batches, message);
        }
        batches.push(message);
    }
}

// The guard only orders whole tests, each on its own runtime and thread.
#[allow(clippy::await_holding_lock)]
#[tokio::test]
async fn replay_sends_topic_seq_payload_then_the_end_marker() {
    let _serial = serial();
    let (batches, end) = replay_over_dealer(7, 2).await;
    let seqs: Vec<u64> = batches
        .iter()
        .map(|m| {
            assert_eq!(m.len(), 4, "[b\"\", topic, seq, payload]");
            assert!(m.get(0).expect("delimiter").is_empty());
            assert_eq!(m.get(1).expect("topic").as_ref(), TOPIC.as_bytes());
            let seq = m.get(2).expect("seq");
            u64::from_be_bytes(seq.as_ref().try_into().expect("8-byte seq"))
        })
        .collect();
    assert_eq!(seqs, [2, 3, 4, 5, 6]);
    for (m, seq) in batches.iter().zip(2u64..) {
        let mut payload = m.get(3).expect("payload").as_ref();
        let batch = rmpv::decode::read_value(&mut payload).expect("msgpack");
        let events = batch[1].as_array().expect("events");
        assert_eq!(events.len(), batch_for_seq(seq).len(), "batch {seq}");
        let tag = events[0][0].as_str().expect("tag");
        let expected = ["BlockStored", "BlockRemoved", "AllBlocksCleared"][(seq % 3) as usize];
        assert_eq!(tag, expected, "batch {seq}");
    }
    let end: Vec<_> = end.into_vec();
    assert_eq!(end.len(), 4, "[b\"\", b\"\", END_SEQ, b\"\"]");
    assert!(end[0].is_empty() && end[1].is_empty() && end[3].is_empty());
}

// The guard only orders whole tests, each on its own runtime and thread.
#[allow(clippy::await_holding_lock)]
#[tokio::test]
async fn replay_past_the_last_batch_is_just_the_end_marker() {
    let _serial = serial();
    let (batches, _) = replay_over_dealer(3, 3).await;
    assert!(batches.is_empty());
}

#[test]
fn binding_a_port_in_use_fails() {
    let _serial = serial();
    let taken = TcpListener::bind("0.0.0.0:0").expect("a free port");
    let busy = taken.local_addr().expect("address").port();
    let e = ZmqEventPublisher::start(&config(&format!("tcp://*:{busy}"), None), None)
        .err()
        .expect("the PUB port is taken");
    assert!(
        format!("{e:#}").contains("binding the KV events PUB socket"),
        "{e:#}"
    );
    let e = ZmqEventPublisher::start(
        &config("tcp://*:0", Some(&format!("tcp://0.0.0.0:{busy}"))),
        None,
    )
    .err()
    .expect("the replay port is taken");
    assert!(
        format!("{e:#}").contains("binding the KV events replay socket"),
        "{e:#}"
    );
}

#[test]
fn dropping_the_publisher_frees_its_ports() {
    let _serial = serial();
    let publisher =
        ZmqEventPublisher::start(&config("tcp://*:0", Some("tcp://127.0.0.1:0")), Some(0))
            .expect("binding the publisher");
    for seq in 0..10 {
        publisher.publish(batch_for_seq(seq));
    }
    let pub_port = port(publisher.endpoint());
    let replay_port = port(publisher.replay_endpoint().expect("replay endpoint"));
    drop(publisher);
    let again = ZmqEventPublisher::start(
        &config(
            &format!("tcp://*:{pub_port}"),
            Some(&format!("tcp://127.0.0.1:{replay_port}")),
        ),
        Some(0),
    )
    .expect("the ports are free again once the publisher is dropped");
    assert_eq!(port(again.endpoint()), pub_port);
    drop(again);
    TcpListener::bind(("0.0.0.0", pub_port)).expect("PUB port free");
    TcpListener::bind(("127.0.0.1", replay_port)).expect("replay port free");
}

#[test]
fn data_parallel_rank_offsets_both_ports() {
    let _serial = serial();
    let free_port = || {
        let taken = TcpListener::bind("0.0.0.0:0").expect("a free port");
        taken.local_addr().expect("address").port()
    };
    let (pub_port, replay_port) = (free_port(), free_port());
    // Rank 2 of a group whose rank 0 binds `port - 2`: binds `port`, found free above.
    let (Some(pub_base), Some(replay_base)) = (pub_port.checked_sub(2), replay_port.checked_sub(2))
    else {
        return;
    };
    let publisher = ZmqEventPublisher::start(
        &config(
            &format!("tcp://*:{pub_base}"),
            Some(&format!("tcp://127.0.0.1:{replay_base}")),
        ),
        Some(2),
    )
    .expect("binding the publisher");
    assert_eq!(port(publisher.endpoint()), pub_port);
    assert_eq!(
        port(publisher.replay_endpoint().expect("replay endpoint")),
        replay_port
    );
}

// ---------------------------------------------------------------------------------------------
// Security (issue 20): bind addresses, the replay off the publisher's thread, the router's
// subscriber against a hostile publisher.
// ---------------------------------------------------------------------------------------------

/// The local addresses of the listening TCP sockets on `port`, as the kernel reports them
/// (`/proc/net/tcp` and `/proc/net/tcp6`); `None` where those files do not exist (not Linux).
fn listeners_on(port: u16) -> Option<Vec<IpAddr>> {
    let mut found = Vec::new();
    let mut any_file = false;
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        any_file = true;
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // `sl local_address rem_address st ...`; state 0A is LISTEN.
            let (Some(local), Some("0A")) = (fields.get(1), fields.get(3).copied()) else {
                continue;
            };
            let (addr, p) = local.split_once(':').expect("ADDR:PORT");
            if u16::from_str_radix(p, 16).expect("hex port") != port {
                continue;
            }
            // The address is written as 32-bit words in the host's (little-endian) order.
            let words: Vec<[u8; 4]> = (0..addr.len() / 8)
                .map(|i| {
                    u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16)
                        .expect("hex address")
                        .to_le_bytes()
                })
                .collect();
            found.push(match words.as_slice() {
                [w] => IpAddr::from(*w),
                [a, b, c, d] => {
                    let mut bytes = [0u8; 16];
                    for (i, w) in [a, b, c, d].into_iter().enumerate() {
                        bytes[i * 4..i * 4 + 4].copy_from_slice(w);
                    }
                    IpAddr::from(bytes)
                }
                _ => panic!("odd address {addr} in {file}"),
            });
        }
    }
    any_file.then_some(found)
}

/// Asserts that the kernel's only listener on `endpoint`'s port is bound to `ip`.
fn assert_listens_only_on(endpoint: &str, ip: IpAddr) {
    let port = port(endpoint);
    if let Some(listeners) = listeners_on(port) {
        assert_eq!(listeners, [ip], "the listeners on port {port}");
    }
}

/// A PUB endpoint naming a host (`tcp://127.0.0.1:PORT`; in llm-d's centralized topology the
/// router's `tcp://epp:5557`) is connected to, as vLLM does, while the replay socket still binds
/// loopback alone: a real pyzmq subscriber bound there gets the live batches, with exactly the
/// configured topic, and the replay; one killed mid-stream and another bound on the same port
/// get them again once the publisher has reconnected.
#[test]
fn a_pub_naming_a_host_connects_to_a_bound_subscriber_and_reconnects() {
    let _serial = serial();
    if !common::python_has_zmq() {
        return;
    }
    let sub_port = common::free_port();
    let endpoint = format!("tcp://127.0.0.1:{sub_port}");
    let publisher =
        ZmqEventPublisher::start(&config(&endpoint, Some("tcp://127.0.0.1:0")), Some(0))
            .expect("starting a connecting publisher with nobody listening yet");
    assert_eq!(publisher.endpoint(), endpoint);
    if let Some(listeners) = listeners_on(sub_port) {
        assert!(
            listeners.is_empty(),
            "a connecting PUB binds nothing: {listeners:?}"
        );
    }
    let replay = publisher.replay_endpoint().expect("replay endpoint");
    assert_listens_only_on(replay, IpAddr::from([127, 0, 0, 1]));

    let mut published = 0;
    python_subscriber_round(&publisher, Reach::Bind, &mut published);

    // A subscriber killed while batches flow: the publisher sees the connection drop.
    let mut killed = Subscriber::spawn(&[
        "--endpoint".to_string(),
        endpoint.clone(),
        "--bind".to_string(),
        "--topic".to_string(),
        TOPIC.to_string(),
        "--exact-topic".to_string(),
        "--quiet".to_string(),
    ]);
    assert!(killed.line("READY", Duration::from_secs(30)).is_some());
    join(&publisher, &mut killed, &mut published);
    for _ in 0..5 {
        publisher.publish(batch_for_seq(published));
        published += 1;
    }
    drop(killed);

    // The next one, on the same port: the publisher connects again.
    python_subscriber_round(&publisher, Reach::Bind, &mut published);
}

/// `tcp://[::1]:PORT` binds IPv6 loopback alone, and a subscriber receives over it.
#[test]
fn sockets_bind_ipv6_loopback() {
    let _serial = serial();
    if TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipping: no IPv6 loopback here");
        return;
    }
    let publisher = ZmqEventPublisher::start(&config("tcp://[::1]:0", Some("tcp://[::1]:0")), None)
        .expect("binding the publisher to [::1]");
    let v6_loopback = IpAddr::from(std::net::Ipv6Addr::LOCALHOST);
    assert!(
        publisher.endpoint().starts_with("tcp://[::1]:"),
        "{}",
        publisher.endpoint()
    );
    assert_listens_only_on(publisher.endpoint(), v6_loopback);
    assert_listens_only_on(publisher.replay_endpoint().expect("replay"), v6_loopback);
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async {
        let mut sub = SubSocket::new();
        sub.connect(publisher.endpoint()).await.expect("connecting");
        sub.subscribe("").await.expect("subscribing");
        let joined = join_sub(&publisher, &mut sub, || vec![KvEvent::AllBlocksCleared]).await;
        publisher.publish(vec![KvEvent::AllBlocksCleared]);
        let next = receive(&mut sub).await.expect("a batch");
        assert_eq!(seq_of(&next), joined + 1);
    });
}

/// Publishes `batch()` until `sub` receives one; the sequence number of the first received.
async fn join_sub(
    publisher: &ZmqEventPublisher,
    sub: &mut SubSocket,
    batch: impl Fn() -> Vec<KvEvent>,
) -> u64 {
    // A SUB misses what is published before its subscription reaches the PUB socket.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "the subscriber never joined");
        publisher.publish(batch());
        if let Ok(message) = tokio::time::timeout(Duration::from_millis(100), sub.recv()).await {
            return seq_of(&message.expect("receiving"));
        }
    }
}

async fn receive(sub: &mut SubSocket) -> Option<ZmqMessage> {
    tokio::time::timeout(Duration::from_secs(30), sub.recv())
        .await
        .ok()
        .map(|m| m.expect("receiving"))
}

/// The sequence number of a live `[topic, seq, payload]` or replayed `[b"", topic, seq,
/// payload]` message.
fn seq_of(message: &ZmqMessage) -> u64 {
    let seq = message.get(message.len() - 2).expect("a seq frame");
    u64::from_be_bytes(seq.as_ref().try_into().expect("8-byte seq"))
}

/// A DEALER that asked for the replay from `start`.
async fn replay_request(endpoint: &str, start: u64) -> DealerSocket {
    let mut dealer = DealerSocket::new();
    dealer
        .connect(endpoint)
        .await
        .expect("connecting the DEALER");
    let request = vec![
        bytes::Bytes::new(),
        bytes::Bytes::from(start.to_be_bytes().to_vec()),
    ];
    dealer
        .send(ZmqMessage::try_from(request).expect("frames"))
        .await
        .expect("sending the replay request");
    dealer
}

async fn recv_replay(dealer: &mut DealerSocket, what: &str) -> ZmqMessage {
    tokio::time::timeout(Duration::from_secs(10), dealer.recv())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within 10 s"))
        .expect("receiving")
}

fn is_end_marker(message: &ZmqMessage) -> bool {
    message.get(2).map(|f| f.as_ref()) == Some(&END_SEQ[..])
}

/// A replay whose client stops reading is served by a task of its own: live batches keep
/// reaching a subscriber while it is stalled, the replay then completes, and replays past
/// [`MAX_REPLAYS_IN_FLIGHT`] are refused (the end marker alone) instead of queued.
///
/// For the replay to stall, it must outgrow what the sockets buffer for a client that does not
/// read: zeromq 0.7 queues 100,000 messages per peer, and the kernel's TCP buffers take
/// `tcp_wmem` + `tcp_rmem` bytes more. Before the fix the publisher's own thread served the
/// replay, so live batches waited until it gave up on the client, and the replay never ended.
// The guard only orders whole tests, each on its own runtime and thread.
#[allow(clippy::await_holding_lock)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_batches_flow_while_a_stalled_replay_is_served() {
    let _serial = serial();
    // ~500-byte payloads: 100 token ids of 5 bytes each in msgpack.
    let batch = |seq: u64| {
        vec![KvEvent::BlockStored {
            block_hashes: vec![seq],
            parent_block_hash: None,
            token_ids: (100_000..100_100).collect(),
            block_size: 100,
            medium: Medium::Gpu,
            extra_keys: vec![Vec::new()],
        }]
    };
    let payload_bytes = 500;
    let tcp_max = |file: &str| {
        std::fs::read_to_string(file)
            .ok()
            .and_then(|t| t.split_whitespace().nth(2)?.parse::<u64>().ok())
            .unwrap_or(32 << 20)
    };
    let tcp_buffered =
        tcp_max("/proc/sys/net/ipv4/tcp_rmem") + tcp_max("/proc/sys/net/ipv4/tcp_wmem");
    let n = 100_000 + 1024 + tcp_buffered / payload_bytes + 50_000;
    let cfg = KvEventsConfig {
        buffer_steps: n as usize,
        max_queue_size: 20_000,
        ..config("tcp://*:0", Some("tcp://127.0.0.1:0"))
    };
    let publisher = ZmqEventPublisher::start(&cfg, Some(0)).expect("binding the publisher");
    let replay = publisher.replay_endpoint().expect("replay").to_string();
    for seq in 0..n {
        publisher.publish(batch(seq));
        if seq % 10_000 == 9_999 {
            // Lets the publisher thread catch up with the bounded queue.
            wait_until_kept(&replay, seq).await;
        }
    }
    wait_until_kept(&replay, n - 1).await;
    assert_eq!(publisher.dropped_batches(), 0);
    let served_before = publisher.served_replays();

    // The stalled client: reads the first batch (the replay has begun), then nothing.
    let mut stalled = replay_request(&replay, 0).await;
    let first = recv_replay(&mut stalled, "the stalled replay's first batch").await;
    assert_eq!(seq_of(&first), 0);

    // Live batches reach a subscriber meanwhile.
    let mut sub = SubSocket::new();
    sub.connect(&format!("tcp://127.0.0.1:{}", port(publisher.endpoint())))
        .await
        .expect("connecting");
    sub.subscribe("").await.expect("subscribing");
    join_sub(&publisher, &mut sub, || batch(0)).await;
    const LAST: u64 = 0xfeed;
    for _ in 0..20 {
        publisher.publish(batch(0));
    }
    publisher.publish(batch(LAST));
    loop {
        let message = receive(&mut sub)
            .await
            .expect("live batches while the replay is stalled");
        let payload = message.get(2).expect("payload");
        let events = llmd::router::events::decode_batch(payload).expect("a valid batch");
        if matches!(&events[0], KvEvent::BlockStored { block_hashes, .. } if block_hashes[0] == LAST)
        {
            break;
        }
    }
    assert_eq!(
        publisher.served_replays(),
        served_before,
        "the replay ended before the live batches arrived, so it did not stall: the sockets \
         buffered all {n} batches (raise n)"
    );

    // Replays past the bound are refused at once, not queued behind the stalled ones.
    let mut more = Vec::new();
    for _ in 1..MAX_REPLAYS_IN_FLIGHT {
        let mut dealer = replay_request(&replay, 0).await;
        let first = recv_replay(&mut dealer, "a replay within the bound").await;
        // The live batches since have pushed the oldest out of the buffer.
        assert!(
            !is_end_marker(&first),
            "a replay within the bound was refused"
        );
        more.push(dealer);
    }
    let mut refused = replay_request(&replay, 0).await;
    let answer = recv_replay(&mut refused, "the refused replay").await;
    assert!(is_end_marker(&answer), "a replay past the bound was served");
    assert_eq!(publisher.refused_replays(), 1);
    drop(more);

    // The stalled replay was never abandoned: every batch, in order, then the end marker.
    let mut expected = 1;
    loop {
        let message = recv_replay(&mut stalled, &format!("replayed batch {expected}")).await;
        if is_end_marker(&message) {
            break;
        }
        assert_eq!(seq_of(&message), expected);
        expected += 1;
    }
    assert!(expected >= n, "the replay ended at {expected} of {n}");
}

/// Waits until the replay buffer holds batch `seq` (asking for the replay from `seq`).
async fn wait_until_kept(replay: &str, seq: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "batch {seq} was never kept");
        let mut dealer = replay_request(replay, seq).await;
        let message = recv_replay(&mut dealer, "a replay").await;
        if !is_end_marker(&message) {
            assert_eq!(seq_of(&message), seq);
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The router's subscriber, against a real ZeroMQ publisher on loopback sending a batch over
/// [`MAX_BATCH_BYTES`] (a valid one: before the cap it was decoded and applied), a garbage
/// payload and a message of the wrong shape: the first is counted as oversized and never
/// applied, the others as malformed, and the good batch after them arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_drops_oversized_and_malformed_batches_and_keeps_going() {
    let mut publisher = PubSocket::new();
    let endpoint = publisher
        .bind("tcp://127.0.0.1:0")
        .await
        .expect("binding a PUB socket")
        .to_string();
    let stats = Arc::new(SubStats::default());
    let (tx, mut updates) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(subscribe(endpoint, None, stats.clone(), move |u| {
        let _ = tx.send(u);
    }));
    let mut seq = 0u64;
    let message = |seq: &mut u64, payload: Vec<u8>| {
        let frames = vec![
            bytes::Bytes::from(TOPIC.as_bytes().to_vec()),
            bytes::Bytes::from(seq.to_be_bytes().to_vec()),
            bytes::Bytes::from(payload),
        ];
        *seq += 1;
        ZmqMessage::try_from(frames).expect("frames")
    };
    let batch = |events: &[KvEvent]| encode_batch(0.0, events, Some(0)).expect("encoding");
    let stored = |hash: u64, tokens: u32| KvEvent::BlockStored {
        block_hashes: vec![hash],
        parent_block_hash: None,
        token_ids: (1 << 20..(1 << 20) + tokens).collect(),
        block_size: tokens as usize,
        medium: Medium::Gpu,
        extra_keys: vec![Vec::new()],
    };
    const PROBE: u64 = 1;
    const OVERSIZED: u64 = 2;
    const GOOD: u64 = 3;
    let hashes = |u: &Update| match u {
        Update::Events(events) => events
            .iter()
            .filter_map(|e| match e {
                KvEvent::BlockStored { block_hashes, .. } => block_hashes.first().copied(),
                _ => None,
            })
            .collect(),
        Update::Reset => Vec::new(),
    };

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "the subscriber never joined");
        let probe = message(&mut seq, batch(&[stored(PROBE, 1)]));
        publisher.send(probe).await.expect("sending");
        if let Ok(u) = tokio::time::timeout(Duration::from_millis(100), updates.recv()).await {
            assert_eq!(hashes(&u.expect("an update")), [PROBE]);
            break;
        }
    }
    // 5 bytes per token id: a valid batch just over the cap.
    let tokens = u32::try_from(MAX_BATCH_BYTES / 5 + 1).expect("fits");
    let oversized = batch(&[stored(OVERSIZED, tokens)]);
    assert!(oversized.len() > MAX_BATCH_BYTES);
    let oversized = message(&mut seq, oversized);
    publisher.send(oversized).await.expect("sending");
    let garbage = message(&mut seq, b"\x93\xcb\x00\xc1 not msgpack".to_vec());
    publisher.send(garbage).await.expect("sending");
    let wrong_shape = vec![
        bytes::Bytes::from(TOPIC.as_bytes().to_vec()),
        bytes::Bytes::from(seq.to_be_bytes().to_vec()),
    ];
    let wrong_shape = ZmqMessage::try_from(wrong_shape).expect("frames");
    publisher.send(wrong_shape).await.expect("sending");
    let good = message(&mut seq, batch(&[stored(GOOD, 16)]));
    publisher.send(good).await.expect("sending");

    loop {
        let u = tokio::time::timeout(Duration::from_secs(30), updates.recv())
            .await
            .expect("the good batch within 30 s")
            .expect("an update");
        let got = hashes(&u);
        assert!(!got.contains(&OVERSIZED), "the oversized batch was applied");
        if got.contains(&GOOD) {
            break;
        }
    }
    assert_eq!(stats.oversized.load(Relaxed), 1);
    assert_eq!(stats.malformed.load(Relaxed), 2);
    task.abort();
}

// ---------------------------------------------------------------------------------------------
// llm-d's centralized topology with real processes: `llmd serve` connecting its PUB socket to
// a bound subscriber, and `llmd route --kv-events-bind` telling workers apart by topic.
// ---------------------------------------------------------------------------------------------

/// `llmd serve` (stories260K) on `http_port`, with `--kv-events-config` `events` when given.
async fn serve_on(tag: &str, http_port: u16, events: Option<serde_json::Value>) -> LlmdProcess {
    let port = http_port.to_string();
    let mut args = strings(&[
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--kv-cache-memory-gb",
        "0.02",
        "--model",
        &stories(),
    ]);
    if let Some(events) = events {
        args.extend(["--kv-events-config".to_string(), events.to_string()]);
    }
    LlmdProcess::start(tag, &args, "/health").await
}

/// The events config of a worker connecting to `tcp://127.0.0.1:sub_port` under `topic`.
fn connecting_events(sub_port: u16, topic: &str) -> serde_json::Value {
    serde_json::json!({
        "enable_kv_cache_events": true,
        "publisher": "zmq",
        "endpoint": format!("tcp://127.0.0.1:{sub_port}"),
        "topic": topic,
    })
}

/// POSTs a completion of `prompt` to `base`; the worker the router names (empty from a worker).
async fn complete(base: &str, prompt: &str) -> String {
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .json(&serde_json::json!({"prompt": prompt, "max_tokens": 2, "temperature": 0}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200, "completion of {prompt:?}");
    let worker = resp
        .headers()
        .get("x-llmd-worker")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let _ = resp.bytes().await;
    worker
}

/// A prompt of several KV blocks, distinct per `tag`.
fn long_prompt(tag: &str) -> String {
    format!(
        "{tag}: {}",
        "Once upon a time, there was a little dog named Max. He liked to run in the sun. "
            .repeat(5)
    )
}

/// `llmd serve` with an endpoint naming a host connects its PUB socket to a pyzmq subscriber
/// bound there (playing llm-d's endpoint picker): the engine's batches arrive in vLLM's wire
/// format with exactly the configured topic. The subscriber killed mid-stream and another
/// bound on the same port: the batches flow again once the worker has reconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llmd_serve_connects_its_events_to_a_bound_subscriber_and_reconnects() {
    if !common::python_has_zmq() {
        return;
    }
    let (sub_port, http_port) = (common::free_port(), common::free_port());
    let topic = format!("kv@127.0.0.1:{http_port}@stories260K");
    let w = serve_on("w", http_port, Some(connecting_events(sub_port, &topic))).await;
    let endpoint = format!("tcp://127.0.0.1:{sub_port}");
    let mut request = 0;
    for round in ["killed", "kept"] {
        let mut args = strings(&[
            "--endpoint",
            &endpoint,
            "--bind",
            "--topic",
            &topic,
            "--exact-topic",
            "--quiet",
        ]);
        if round == "kept" {
            args.extend(strings(&["--expect", "3"]));
        }
        let mut sub = Subscriber::spawn(&args);
        let ready = tokio::task::block_in_place(|| sub.line("READY", Duration::from_secs(30)));
        assert!(ready.is_some(), "the subscriber never got ready");
        // Requests until the subscriber has joined the stream (the worker connects to it
        // within its reconnect interval), then until it has its batches.
        let deadline = Instant::now() + Duration::from_secs(60);
        let seen_topic = loop {
            assert!(
                Instant::now() < deadline,
                "{round}: no batch reached the subscriber"
            );
            complete(&w.base, &long_prompt(&format!("request {request}"))).await;
            request += 1;
            let line =
                tokio::task::block_in_place(|| sub.line("TOPIC", Duration::from_millis(200)));
            if let Some(line) = line {
                break line;
            }
        };
        assert_eq!(seen_topic, format!("TOPIC {topic}"));
        if round == "killed" {
            drop(sub);
            continue;
        }
        while sub.child.try_wait().expect("waiting").is_none() {
            assert!(
                Instant::now() < deadline,
                "the subscriber never had its 3 batches"
            );
            complete(&w.base, &long_prompt(&format!("request {request}"))).await;
            request += 1;
        }
        tokio::task::block_in_place(|| sub.finish(Duration::from_secs(10)));
    }
}

/// Runs tests/kv_events_publisher.py: a pyzmq PUB connecting to `endpoint` and sending
/// vLLM's batches of `tokens`' blocks under `topic`, `count` of them (0: until dropped).
fn python_publisher(endpoint: &str, topic: &str, tokens: &[u32], count: u32) -> Child {
    Command::new("python3")
        .arg("tests/kv_events_publisher.py")
        .args(["--endpoint", endpoint, "--topic", topic, "--count"])
        .arg(count.to_string())
        .arg("--tokens")
        .arg(serde_json::to_string(tokens).expect("JSON"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("running python3")
}

/// `llmd route --kv-events-bind` binds one SUB socket that the workers' PUB sockets connect
/// to, and tells them apart by topic `kv@<host:port>@<model>`: a prefix sent straight to each
/// of two `llmd serve` workers (never through the router) is indexed for that worker alone,
/// and the router then sends that prefix to it (its own `vllm:prefix_cache_hits_total` rises).
/// A pyzmq publisher playing vLLM, under the topic of a third worker that publishes nothing
/// itself, makes the router send its prefix there. Unknown and malformed topics are counted,
/// not applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_router_bound_for_kv_events_tells_workers_by_topic() {
    if !common::python_has_zmq() {
        return;
    }
    let bind_port = common::free_port();
    let ports = [
        common::free_port(),
        common::free_port(),
        common::free_port(),
    ];
    let topic = |p: u16| format!("kv@127.0.0.1:{p}@stories260K");
    let w1 = serve_on(
        "w1",
        ports[0],
        Some(connecting_events(bind_port, &topic(ports[0]))),
    )
    .await;
    let w2 = serve_on(
        "w2",
        ports[1],
        Some(connecting_events(bind_port, &topic(ports[1]))),
    )
    .await;
    let w3 = serve_on("w3", ports[2], None).await;
    let names: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let bind = format!("tcp://127.0.0.1:{bind_port}");
    let mut args = strings(&[
        "route",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--model",
        &stories(),
        "--backoff",
        "30",
        "--worker-timeout",
        "20",
        "--kv-events-bind",
        &bind,
    ]);
    for n in &names {
        args.extend(["--worker".to_string(), n.clone()]);
    }
    let r = LlmdProcess::start("route", &args, "/health").await;
    let index_blocks = |m: &str, name: &str| {
        common::metric(m, "llmd_router:index_blocks", &format!("worker=\"{name}\""))
    };

    // Each llmd worker caches its own prefix, reached directly: only its events tell the
    // router. A worker's batches reach the router once its PUB socket has connected (within
    // its reconnect interval; what it published before is lost, as with vLLM): prompts of
    // their own until the router indexes one, then the prefix.
    let prefixes = [long_prompt("first"), long_prompt("second")];
    for (i, w) in [&w1, &w2].into_iter().enumerate() {
        until_indexed(&r, w, &names[i], &format!("warm-up {i}")).await;
        let before = index_blocks(&r.metrics().await, &names[i]);
        complete(&w.base, &format!("{} The end.", prefixes[i])).await;
        r.metrics_until(&format!("{}'s prefix never indexed", names[i]), |m| {
            index_blocks(m, &names[i]) > before
        })
        .await;
    }
    let m = r.metrics().await;
    assert_eq!(
        index_blocks(&m, &names[2]),
        0.0,
        "w3 published nothing:\n{m}"
    );

    // The router sends each prefix where it is cached; that worker's own counter agrees.
    for (i, w) in [&w1, &w2].into_iter().enumerate() {
        let hits = |m: &str| common::metric(m, "vllm:prefix_cache_hits_total", "");
        let before = hits(&w.metrics().await);
        for suffix in ["Then", "And so"] {
            let got = complete(&r.base, &format!("{} {suffix}", prefixes[i])).await;
            assert_eq!(got, names[i], "prefix {i} went to {got}");
        }
        let after = hits(&w.metrics().await);
        assert!(
            after > before,
            "{}: prefix hits {before} -> {after}",
            names[i]
        );
    }

    // A third publisher, not llmd's: pyzmq sending vLLM's batches under w3's topic.
    let tokenizer = llmd::tokenizer::Tokenizer::from_dir(std::path::Path::new(&stories()))
        .expect("the stories260K tokenizer");
    let third = long_prompt("third");
    let tokens = tokenizer.encode(&third, true).expect("tokenizing");
    let mut publisher = python_publisher(&bind, &topic(ports[2]), &tokens, 0);
    r.metrics_until(
        "the router never indexed the pyzmq publisher's blocks for w3",
        |m| index_blocks(m, &names[2]) > 0.0,
    )
    .await;
    let _ = publisher.kill();
    let _ = publisher.wait();
    let got = complete(&r.base, &format!("{third} Later")).await;
    assert_eq!(got, names[2], "the prefix published for w3 went to {got}");

    // A topic naming no worker, and one that is not kv@ID@MODEL: counted, nothing indexed.
    for (bad, reason) in [
        ("kv@127.0.0.1:1@stories260K", "unknown_topic"),
        ("not-a-kv-topic", "malformed"),
    ] {
        let mut p = python_publisher(&bind, bad, &tokens, 0);
        r.metrics_until(&format!("{bad:?} never counted as {reason}"), |m| {
            common::metric(
                m,
                "llmd_router:kv_event_unattributed_batches_total",
                &format!("reason=\"{reason}\""),
            ) > 0.0
        })
        .await;
        let _ = p.kill();
        let _ = p.wait();
    }
    let m = r.metrics().await;
    for name in &names[..2] {
        let label = format!("worker=\"{name}\"");
        assert!(
            common::metric(&m, "llmd_router:kv_event_batches_total", &label) > 0.0,
            "{m}"
        );
        assert_eq!(
            common::metric(&m, "llmd_router:kv_event_gaps_total", &label),
            0.0,
            "{m}"
        );
    }

    // The router restarts on the same port: the workers' PUB sockets connect again and their
    // batches are indexed by the new router.
    drop(r);
    let r = LlmdProcess::start("route2", &args, "/health").await;
    for (i, w) in [&w1, &w2].into_iter().enumerate() {
        until_indexed(&r, w, &names[i], &format!("after the restart {i}")).await;
    }
    drop(w3);
}

/// Sends `worker` prompts of its own (`tag`ged, so each stores new blocks) until the router
/// has indexed blocks for it (its PUB socket has connected: within its reconnect interval).
async fn until_indexed(router: &LlmdProcess, worker: &LlmdProcess, name: &str, tag: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in 0.. {
        complete(&worker.base, &long_prompt(&format!("{tag}.{n}"))).await;
        let m = router.metrics().await;
        let label = format!("worker=\"{name}\"");
        if common::metric(&m, "llmd_router:index_blocks", &label) > 0.0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the router never indexed {name}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
