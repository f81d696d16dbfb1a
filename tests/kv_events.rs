//! The KV-event publisher over real sockets: a real pyzmq subscriber checks vLLM's wire format
//! and replay (`tests/kv_events_subscriber.py`), a Rust DEALER checks the replay framing, and
//! the sockets are bound, refused and released as `llmd serve` relies on.
mod common;

use llmd::kv::{KvEvent, KvEventSink, Medium};
use llmd::server::kv_events::{KvEventsConfig, Publisher, ZmqEventPublisher, END_SEQ};
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

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
    let replay = publisher.replay_endpoint().expect("replay endpoint");
    let mut published = 0u64;
    let publish = |published: &mut u64| {
        publisher.publish(batch_for_seq(*published));
        *published += 1;
    };
    // Sent before anyone subscribes: only the replay can deliver these.
    for _ in 0..5 {
        publish(&mut published);
    }

    let mut sub = Subscriber::spawn(&[
        "--endpoint".to_string(),
        format!("tcp://127.0.0.1:{}", port(publisher.endpoint())),
        "--replay".to_string(),
        format!("tcp://127.0.0.1:{}", port(replay)),
        "--topic".to_string(),
        TOPIC.to_string(),
        "--expect".to_string(),
        LIVE.to_string(),
        "--pattern".to_string(),
        "--quiet".to_string(),
    ]);
    assert!(
        sub.line("READY", Duration::from_secs(30)).is_some(),
        "the subscriber never got ready"
    );
    // A SUB socket misses what is published before its subscription reaches the PUB socket,
    // however long it waited: publish until it has seen a batch, then the rest.
    let deadline = Instant::now() + Duration::from_secs(30);
    let joined = loop {
        assert!(Instant::now() < deadline, "the subscriber never joined");
        publish(&mut published);
        if let Some(line) = sub.line("JOINED", Duration::from_millis(100)) {
            break line;
        }
    };
    let first: u64 = joined["JOINED ".len()..].parse().expect("JOINED <seq>");
    assert!(
        first >= 5,
        "joined at {first}, before the batches sent to nobody"
    );
    while published < first + LIVE {
        publish(&mut published);
    }
    sub.finish(Duration::from_secs(60));
    assert_eq!(publisher.dropped_batches(), 0);
}

/// Publishes `n` pattern batches and asks a DEALER for the replay from `start`.
async fn replay_over_dealer(n: u64, start: u64) -> (Vec<ZmqMessage>, ZmqMessage) {
    let publisher =
        ZmqEventPublisher::start(&config("tcp://*:0", Some("tcp://127.0.0.1:0")), Some(0))
            .expect("binding the publisher");
    for seq in 0..n {
        publisher.publish(batch_for_seq(seq));
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
