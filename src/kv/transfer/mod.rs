//! Moving a finished prompt's KV from a prefill worker to a decode worker (disaggregated
//! prefill/decode, llm-d's flow): the decoder pulls the blocks the prefiller holds for a
//! request, over the KV side channel.
//!
//! [`KvTransport`] is the one interface; [`TcpTransport`] is its TCP implementation (RDMA verbs
//! is the other one the design leaves room for). The producer side is [`serve`], which answers
//! pulls with blocks it reads through a [`HeldKvSource`] (the engine) and frees a request's
//! blocks as soon as the consumer has them or its connection drops.
//!
//! Wire protocol (integers little-endian):
//! ```text
//! [with a cluster secret: the handshake of crate::kv::auth::Handshake first]
//! consumer → producer: "LLMDKVT2" | engine_id_len u32 | engine_id | request_id_len u32 | request_id
//!                      | transfer token (16)
//!                   or "LLMDKVH2" | count u32 | hashes (32 bytes each)     (east/west, by hash)
//! producer → consumer: status u8 | message_len u32 | message | prompt_len u64 | blocks u32
//!                      then per block: record_len u64 | record (block_record, checksummed)
//! consumer → producer: 0 (done) | 1 (resend: count u32, indices u32…, then the blocks again, then 0)
//! ```
//! Status: 0 ok, 1 nothing held under that id with that token, 2 the consumer named another
//! engine (a stale id from before a restart: ids carry the start time), 3 the producer failed
//! to read, 4 no RDMA here ([`rdma`]), 5 not authorized (the secret's handshake is required,
//! or east/west pulls are off because this producer has no secret).
//!
//! Security (see README "Security"):
//! - **Binding**: each block travels as a [`super::block_record`] under the prompt's own chained
//!   block hash ([`super::BlockHasher::hash_prompt`], cache salt included) and the model and
//!   layout identity. The consumer computes the hashes of the prompt *it* was given and takes
//!   a block only under its own hash: KV computed for another prompt is refused
//!   ([`TransferError::Mismatch`]) and the prompt is computed instead, so nobody can bind
//!   someone else's KV to their prompt and from there into the prefix cache. The block count
//!   and prompt length are checked against the consumer's own before any payload is read.
//! - **Authorization**: a held request is read only with its [`TransferToken`] (128 random
//!   bits the producer issued in its `kv_transfer_params`); a wrong token, a wrong request id
//!   and a released request are the same answer. With a cluster secret both ends prove it
//!   before anything else ([`Handshake`]), so a forged producer is refused; east/west pulls by
//!   hash need it. A wrong engine id is refused without naming the real one.
//! - **Exhaustion**: at most [`MAX_CONNECTIONS`] connections are served at once (more are
//!   closed unread); a consumer has [`HELLO_DEADLINE`] to say what it wants and
//!   [`IDLE_DEADLINE`] for each later message.
//!
//! Integrity: the consumer checks each record, asks once for the damaged ones again, and
//! otherwise gives up (its caller recomputes).
use super::auth::{ClusterSecret, Handshake, TransferToken};
use super::block_record::{self, RecordError};
use super::BlockHash;

mod rdma;
pub mod verbs;
use futures_util::future::BoxFuture;
pub use rdma::{slot_len, RdmaProducer, RdmaTransport, Staging};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAGIC: &[u8; 8] = b"LLMDKVT2";
/// A pull of a cached prefix by block hash (east/west, between peers).
const PREFIX_MAGIC: &[u8; 8] = b"LLMDKVH2";
/// Most side-channel connections a producer serves at once: past it new ones are closed
/// before anything is read (a pull is one connection; decoders pull a few at a time).
pub const MAX_CONNECTIONS: usize = 256;
/// How long a consumer has, once connected, to prove the secret and say what it wants.
pub const HELLO_DEADLINE: Duration = Duration::from_secs(5);
/// How long the producer waits for each later message of a consumer (its done or resend).
pub const IDLE_DEADLINE: Duration = Duration::from_secs(30);
/// The producer's status: not authorized.
const UNAUTHORIZED: u8 = 5;
/// Longest id or message accepted on the wire.
const MAX_STR: usize = 4096;
/// Most blocks one transfer may carry (a million-token prompt at 16 tokens per block).
const MAX_BLOCKS: usize = 1 << 16;

/// Where a decode worker pulls a request's KV from (the prefiller's `kv_transfer_params`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteKv {
    pub host: String,
    pub port: u16,
    /// The prefiller's engine id (with its start time, so a restarted one differs).
    pub engine_id: String,
    /// The prefiller's request whose KV is held.
    pub request_id: String,
    /// The token the prefiller issued for that KV: nothing is read without it.
    pub token: TransferToken,
}

/// What a consumer knows of the KV it pulls for a prompt: the prompt's length and its
/// blocks' hashes as the consumer computes them ([`super::BlockHasher::hash_prompt`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    pub prompt_len: usize,
    pub hashes: Vec<BlockHash>,
}

/// A transfer's result: `payloads[i]` is block `i` of the prompt (all layers' K and V).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    pub payloads: Vec<Vec<u8>>,
    pub prompt_len: usize,
    /// Blocks that failed their check once and came back intact when asked again.
    pub reread: usize,
}

/// Why a pull failed; the decoder then computes the prompt itself.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("KV transfer from {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("KV transfer from {addr}: no KV is held for request {request_id} (released, expired, or never held)")]
    NotHeld { addr: String, request_id: String },
    #[error("KV transfer from {addr}: stale engine id: {message}")]
    StaleEngine { addr: String, message: String },
    #[error("KV transfer from {addr}: the producer failed: {message}")]
    Producer { addr: String, message: String },
    #[error("KV transfer from {addr}: protocol error: {what}")]
    Protocol { addr: String, what: String },
    #[error("KV transfer from {addr}: block {index} failed its check twice: {reason}")]
    Corrupt {
        addr: String,
        index: usize,
        reason: String,
    },
    #[error("KV transfer from {addr} timed out after {seconds} s")]
    Timeout { addr: String, seconds: f64 },
    #[error("KV transfer from {addr} over RDMA: {message}")]
    Rdma { addr: String, message: String },
    #[error("KV transfer from {addr}: not authorized: {what}")]
    Unauthorized { addr: String, what: String },
    #[error("KV transfer from {addr}: the KV is not this prompt's: {what}")]
    Mismatch { addr: String, what: String },
}

impl TransferError {
    /// The metric label of a fallback to local prefill.
    pub fn cause(&self) -> &'static str {
        match self {
            TransferError::Io { .. } => "io",
            TransferError::NotHeld { .. } => "not_held",
            TransferError::StaleEngine { .. } => "stale_engine",
            TransferError::Producer { .. } => "producer",
            TransferError::Protocol { .. } => "protocol",
            TransferError::Corrupt { .. } => "corrupt",
            TransferError::Timeout { .. } => "timeout",
            TransferError::Rdma { .. } => "rdma",
            TransferError::Unauthorized { .. } => "unauthorized",
            TransferError::Mismatch { .. } => "prompt_mismatch",
        }
    }
}

/// Pulls KV from another worker.
pub trait KvTransport: Send + Sync {
    /// A request's KV held by a prefill worker, for a prompt as `expected` describes it (the
    /// pull fails with [`TransferError::Mismatch`] unless the KV is that prompt's).
    fn fetch<'a>(
        &'a self,
        from: &'a RemoteKv,
        expected: &'a Expected,
    ) -> BoxFuture<'a, Result<Fetched, TransferError>>;
    /// The leading run of `hashes` that peer `host:port` has cached (east/west: a prefix one
    /// worker computed, pulled by another instead of recomputed). `prompt_len` is 0.
    fn fetch_prefix<'a>(
        &'a self,
        host: &'a str,
        port: u16,
        hashes: &'a [BlockHash],
    ) -> BoxFuture<'a, Result<Fetched, TransferError>>;
}

/// What a block's record is checked against: the model and layout, and the block size.
#[derive(Clone, Debug)]
pub struct TransferLayout {
    /// `KvIdentity::canonical()` of this worker's model and layout.
    pub identity: String,
    /// Bytes of one block's K and V over all layers.
    pub payload_len: usize,
}

impl TransferLayout {
    /// The payload of `record` if it is block `hash` under this layout, intact.
    fn open(&self, record: &[u8], hash: &BlockHash) -> Result<Vec<u8>, RecordError> {
        block_record::decode(record, hash, &self.identity, self.payload_len).map(<[u8]>::to_vec)
    }
}

/// A pull's payloads as their checks come in, and the blocks to ask for again.
struct Checked {
    payloads: Vec<Option<Vec<u8>>>,
    bad: Vec<usize>,
}

impl Checked {
    fn new(blocks: usize) -> Self {
        Self {
            payloads: vec![None; blocks],
            bad: Vec::new(),
        }
    }

    /// Block `i`'s first check: damage is logged and the block asked for again; an intact
    /// block of another prompt ends the pull (asking again would bring the same).
    fn first(
        &mut self,
        addr: &str,
        via: &str,
        i: usize,
        r: Result<Vec<u8>, RecordError>,
    ) -> Result<(), TransferError> {
        match r {
            Ok(p) => self.payloads[i] = Some(p),
            Err(e @ RecordError::WrongBlock { .. }) => return Err(mismatch(addr, i, &e)),
            Err(reason) => {
                tracing::warn!(%addr, via, block = i, %reason, "a transferred KV block failed its check; asking again");
                self.bad.push(i);
            }
        }
        Ok(())
    }

    /// Block `i` checked again: a second failure ends the pull.
    fn again(
        &mut self,
        addr: &str,
        i: usize,
        r: Result<Vec<u8>, RecordError>,
    ) -> Result<(), TransferError> {
        let p = r.map_err(|e| match e {
            RecordError::WrongBlock { .. } => mismatch(addr, i, &e),
            reason => TransferError::Corrupt {
                addr: addr.to_string(),
                index: i,
                reason: reason.to_string(),
            },
        })?;
        self.payloads[i] = Some(p);
        Ok(())
    }

    /// The pull's result (every payload present by then).
    fn into_fetched(self, prompt_len: usize, reread: usize) -> Fetched {
        Fetched {
            payloads: self
                .payloads
                .into_iter()
                .map(|p| p.unwrap_or_default())
                .collect(),
            prompt_len,
            reread,
        }
    }
}

/// The consumer's "send (or stage) these blocks again" message: 1 | count u32 | indices u32….
fn resend_request(bad: &[usize]) -> Vec<u8> {
    let mut ask = vec![1u8];
    ask.extend_from_slice(&(bad.len() as u32).to_le_bytes());
    for &i in bad {
        ask.extend_from_slice(&(i as u32).to_le_bytes());
    }
    ask
}

fn mismatch(addr: &str, i: usize, e: &RecordError) -> TransferError {
    TransferError::Mismatch {
        addr: addr.to_string(),
        what: format!("block {i}: {e}"),
    }
}

/// Checks a producer's header against what the consumer expects, before any payload is read.
fn check_shape(
    addr: &str,
    expected: &Expected,
    prompt_len: usize,
    blocks: usize,
) -> Result<(), TransferError> {
    if prompt_len != expected.prompt_len || blocks != expected.hashes.len() {
        return Err(TransferError::Mismatch {
            addr: addr.to_string(),
            what: format!(
                "the producer holds {blocks} blocks of a {prompt_len}-token prompt, this prompt                  has {} tokens in {} blocks",
                expected.prompt_len,
                expected.hashes.len()
            ),
        });
    }
    Ok(())
}

/// Connects to a producer; with a secret, proves it and checks the producer's proof first.
async fn connect(addr: &str, secret: Option<&ClusterSecret>) -> Result<TcpStream, TransferError> {
    let io = |source| TransferError::Io {
        addr: addr.to_string(),
        source,
    };
    let mut s = TcpStream::connect(addr).await.map_err(io)?;
    s.set_nodelay(true).map_err(io)?;
    let Some(secret) = secret else {
        return Ok(s);
    };
    let unauthorized = |what: String| TransferError::Unauthorized {
        addr: addr.to_string(),
        what,
    };
    let cn = Handshake::nonce();
    let mut hello = Handshake::MAGIC.to_vec();
    hello.extend_from_slice(&cn);
    s.write_all(&hello).await.map_err(io)?;
    let mut reply = [0u8; Handshake::NONCE + 32];
    s.read_exact(&mut reply).await.map_err(|e| {
        unauthorized(format!(
            "no answer to the secret's handshake ({e}): a producer without the cluster secret?"
        ))
    })?;
    let (pn, proof) = reply.split_at(Handshake::NONCE);
    if !Handshake::check_producer(secret, &cn, pn, proof) {
        return Err(unauthorized(
            "the producer did not prove the cluster secret".into(),
        ));
    }
    s.write_all(&Handshake::consumer_proof(secret, &cn, pn))
        .await
        .map_err(io)?;
    Ok(s)
}

/// The TCP transport.
pub struct TcpTransport {
    pub layout: TransferLayout,
    /// Limit on a whole pull.
    pub timeout: Duration,
    /// The cluster secret both ends prove before a pull (None: held pulls by token only, and
    /// no east/west pulls).
    pub secret: Option<Arc<ClusterSecret>>,
}

impl KvTransport for TcpTransport {
    fn fetch<'a>(
        &'a self,
        from: &'a RemoteKv,
        expected: &'a Expected,
    ) -> BoxFuture<'a, Result<Fetched, TransferError>> {
        Box::pin(async move {
            let addr = format!("{}:{}", from.host, from.port);
            match tokio::time::timeout(self.timeout, self.pull(&addr, from, expected)).await {
                Ok(r) => r,
                Err(_) => Err(TransferError::Timeout {
                    addr,
                    seconds: self.timeout.as_secs_f64(),
                }),
            }
        })
    }

    fn fetch_prefix<'a>(
        &'a self,
        host: &'a str,
        port: u16,
        hashes: &'a [BlockHash],
    ) -> BoxFuture<'a, Result<Fetched, TransferError>> {
        Box::pin(async move {
            let addr = format!("{host}:{port}");
            match tokio::time::timeout(self.timeout, self.pull_prefix(&addr, hashes)).await {
                Ok(r) => r,
                Err(_) => Err(TransferError::Timeout {
                    addr,
                    seconds: self.timeout.as_secs_f64(),
                }),
            }
        })
    }
}

/// The hello of a pull of held KV (after the handshake, if any), behind `magic`.
fn held_hello(magic: &[u8; 8], from: &RemoteKv) -> Vec<u8> {
    let mut hello = magic.to_vec();
    put_str(&mut hello, &from.engine_id);
    put_str(&mut hello, &from.request_id);
    hello.extend_from_slice(&from.token.0);
    hello
}

impl TcpTransport {
    async fn pull(
        &self,
        addr: &str,
        from: &RemoteKv,
        expected: &Expected,
    ) -> Result<Fetched, TransferError> {
        let hello = held_hello(MAGIC, from);
        self.exchange(addr, &hello, &from.request_id, Some(expected), |i| {
            expected.hashes[i]
        })
        .await
    }

    async fn pull_prefix(
        &self,
        addr: &str,
        hashes: &[BlockHash],
    ) -> Result<Fetched, TransferError> {
        let mut hello = Vec::new();
        hello.extend_from_slice(PREFIX_MAGIC);
        hello.extend_from_slice(&(hashes.len().min(MAX_BLOCKS) as u32).to_le_bytes());
        for h in hashes.iter().take(MAX_BLOCKS) {
            hello.extend_from_slice(&h.0);
        }
        let mut f = self
            .exchange(addr, &hello, "prefix", None, |i| {
                hashes.get(i).copied().unwrap_or(BlockHash([0; 32]))
            })
            .await?;
        if f.payloads.len() > hashes.len() {
            return Err(TransferError::Protocol {
                addr: addr.to_string(),
                what: format!("{} blocks for {} hashes", f.payloads.len(), hashes.len()),
            });
        }
        f.prompt_len = 0;
        Ok(f)
    }

    /// Connects (with the handshake when there is a secret), sends `hello`, reads the header
    /// (checked against `shape` when given) and the records (block `i` checked against
    /// `hash(i)`), asks once for the damaged ones again, and says it is done.
    async fn exchange(
        &self,
        addr: &str,
        hello: &[u8],
        request_id: &str,
        shape: Option<&Expected>,
        hash: impl Fn(usize) -> BlockHash,
    ) -> Result<Fetched, TransferError> {
        let io = |source| TransferError::Io {
            addr: addr.to_string(),
            source,
        };
        let mut s = connect(addr, self.secret.as_deref()).await?;
        s.write_all(hello).await.map_err(io)?;
        let status = s.read_u8().await.map_err(io)?;
        let message = read_str(&mut s).await.map_err(io)?;
        let prompt_len = s.read_u64_le().await.map_err(io)? as usize;
        let blocks = s.read_u32_le().await.map_err(io)? as usize;
        check_status(status, message, addr, request_id)?;
        let addr_s = addr.to_string();
        if blocks > MAX_BLOCKS {
            return Err(TransferError::Protocol {
                addr: addr_s,
                what: "block count".into(),
            });
        }
        if let Some(e) = shape {
            check_shape(addr, e, prompt_len, blocks)?;
        }
        let check = |i: usize, record: &[u8]| self.layout.open(record, &hash(i));
        let mut got = Checked::new(blocks);
        for i in 0..blocks {
            let record = self.read_record(&mut s, addr).await?;
            got.first(addr, "tcp", i, check(i, &record))?;
        }
        let reread = got.bad.len();
        if reread > 0 {
            s.write_all(&resend_request(&got.bad)).await.map_err(io)?;
            for i in got.bad.clone() {
                let record = self.read_record(&mut s, addr).await?;
                if let Err(e) = got.again(addr, i, check(i, &record)) {
                    let _ = s.write_all(&[0]).await;
                    return Err(e);
                }
            }
        }
        s.write_all(&[0]).await.map_err(io)?;
        Ok(got.into_fetched(prompt_len, reread))
    }

    async fn read_record(&self, s: &mut TcpStream, addr: &str) -> Result<Vec<u8>, TransferError> {
        let len = s.read_u64_le().await.map_err(|source| TransferError::Io {
            addr: addr.to_string(),
            source,
        })? as usize;
        // A record is a header, the payload and a checksum: a few KB more than the payload.
        if len > self.layout.payload_len + 2 * MAX_STR + 128 {
            return Err(TransferError::Protocol {
                addr: addr.to_string(),
                what: format!("a record of {len} bytes"),
            });
        }
        let mut buf = vec![0u8; len];
        s.read_exact(&mut buf)
            .await
            .map_err(|source| TransferError::Io {
                addr: addr.to_string(),
                source,
            })?;
        Ok(buf)
    }
}

/// The error a producer's status byte stands for (0 is success).
fn check_status(
    status: u8,
    message: String,
    addr: &str,
    request_id: &str,
) -> Result<(), TransferError> {
    let addr = addr.to_string();
    match status {
        0 => Ok(()),
        1 => Err(TransferError::NotHeld {
            addr,
            request_id: request_id.to_string(),
        }),
        2 => Err(TransferError::StaleEngine { addr, message }),
        UNAUTHORIZED => Err(TransferError::Unauthorized {
            addr,
            what: message,
        }),
        _ => Err(TransferError::Producer { addr, message }),
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

async fn read_str(s: &mut TcpStream) -> std::io::Result<String> {
    let len = s.read_u32_le().await? as usize;
    if len > MAX_STR {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a string of {len} bytes"),
        ));
    }
    let mut b = vec![0u8; len];
    s.read_exact(&mut b).await?;
    String::from_utf8(b).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// A finished request's KV held by the producer: `payloads[i]` is prompt block `i` (or of the
/// range read, [`HeldKvSource::read`]), whose hash binding it to the prompt is `hashes[i]`
/// ([`super::BlockHasher::hash_prompt`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldKv {
    pub payloads: Vec<Vec<u8>>,
    pub prompt_len: usize,
    pub hashes: Vec<BlockHash>,
}

impl HeldKv {
    /// This KV with only the payloads of `blocks` (clamped), as a source answers a read.
    pub fn slice(&self, blocks: std::ops::Range<usize>) -> HeldKv {
        let n = self.payloads.len();
        HeldKv {
            payloads: self.payloads[blocks.start.min(n)..blocks.end.min(n)].to_vec(),
            prompt_len: self.prompt_len,
            hashes: self.hashes.clone(),
        }
    }
}

/// Blocks the producer reads from the engine at a time while it sends a held request's KV.
pub const CHUNK_BLOCKS: usize = 32;

/// Where the producer finds held KV: the engine.
pub trait HeldKvSource: Send + Sync + 'static {
    /// This engine's id (with its start time).
    fn engine_id(&self) -> &str;
    /// The payloads of blocks `blocks` (clamped to what is held) of `request_id`'s held
    /// prompt, its prompt length and every block's hash; Ok(None) when nothing is held under
    /// it with `token`. The producer reads [`CHUNK_BLOCKS`] at a time while it sends, so no
    /// pull copies a whole prompt's KV at once.
    fn read(
        &self,
        request_id: &str,
        token: &TransferToken,
        blocks: std::ops::Range<usize>,
    ) -> BoxFuture<'_, Result<Option<HeldKv>, String>>;
    /// Frees the blocks held for `request_id`.
    fn release(&self, request_id: &str);
    /// The payloads of the leading run of `hashes` in the engine's prefix cache.
    fn read_prefix(&self, hashes: Vec<BlockHash>) -> BoxFuture<'_, Result<Vec<Vec<u8>>, String>>;
}

/// What the producer counts, and a fault to inject (tests of the consumer's checks).
#[derive(Debug, Default)]
pub struct TransferStats {
    pub blocks_sent: std::sync::atomic::AtomicU64,
    pub bytes_sent: std::sync::atomic::AtomicU64,
    pub transfers: std::sync::atomic::AtomicU64,
    pub refused: std::sync::atomic::AtomicU64,
    /// Connections refused as unauthorized (no or a wrong proof of the secret, east/west
    /// without one).
    pub unauthorized: std::sync::atomic::AtomicU64,
    /// Connections closed unread: [`MAX_CONNECTIONS`] were being served.
    pub over_capacity: std::sync::atomic::AtomicU64,
    /// Flip a byte of block `.0`'s record the next `.1` times it is sent.
    pub corrupt: std::sync::Mutex<Option<(usize, u32)>>,
    /// Pause this long after sending block `.0` (tests that kill the producer mid-transfer).
    pub stall_after: std::sync::Mutex<Option<(usize, Duration)>>,
}

/// A fault the producer injects into its transfers: `corrupt@B` (block B damaged once, so
/// the consumer reads it again), `corrupt2@B` (damaged twice: the consumer gives up),
/// `stall@B:MS` (a pause after block B). For failure tests (hidden `--kv-transfer-fault`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransferFault {
    Corrupt { block: usize, times: u32 },
    Stall { block: usize, millis: u64 },
}

impl std::str::FromStr for TransferFault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("unknown KV transfer fault {s:?}: corrupt@B, corrupt2@B or stall@B:MS");
        let (kind, rest) = s.split_once('@').ok_or_else(bad)?;
        match kind {
            "corrupt" | "corrupt2" => Ok(TransferFault::Corrupt {
                block: rest.parse().map_err(|_| bad())?,
                times: if kind == "corrupt" { 1 } else { 2 },
            }),
            "stall" => {
                let (b, ms) = rest.split_once(':').ok_or_else(bad)?;
                Ok(TransferFault::Stall {
                    block: b.parse().map_err(|_| bad())?,
                    millis: ms.parse().map_err(|_| bad())?,
                })
            }
            _ => Err(bad()),
        }
    }
}

impl TransferStats {
    /// Arms `fault` for the next transfers.
    pub fn inject(&self, fault: TransferFault) {
        match fault {
            TransferFault::Corrupt { block, times } => {
                *self.corrupt.lock().unwrap_or_else(|e| e.into_inner()) = Some((block, times));
            }
            TransferFault::Stall { block, millis } => {
                *self.stall_after.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((block, Duration::from_millis(millis)));
            }
        }
    }

    fn stall(&self, i: usize) -> Option<Duration> {
        match *self.stall_after.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((b, d)) if b == i => Some(d),
            _ => None,
        }
    }
}

impl TransferStats {
    /// Whether to damage block `i` this time (counts the injected fault down).
    fn take_corrupt(&self, i: usize) -> bool {
        let mut c = self.corrupt.lock().unwrap_or_else(|e| e.into_inner());
        match *c {
            Some((b, n)) if b == i && n > 0 => {
                *c = (n > 1).then_some((b, n - 1));
                true
            }
            _ => false,
        }
    }
}

/// What a producer serves pulls with.
pub struct Producer {
    pub source: Arc<dyn HeldKvSource>,
    pub layout: TransferLayout,
    pub stats: Arc<TransferStats>,
    /// The RDMA side, when consumers may READ the blocks ([`RdmaTransport`]).
    pub rdma: Option<Arc<RdmaProducer>>,
    /// The cluster secret every consumer must prove (None: held pulls by token only, and no
    /// east/west pulls by hash).
    pub secret: Option<Arc<ClusterSecret>>,
}

/// Serves pulls on `listener` until the task is dropped: each connection is one request's
/// transfer; its held blocks are released when the consumer is done or goes away.
pub async fn serve(listener: TcpListener, producer: Producer) {
    use std::sync::atomic::Ordering::Relaxed;
    let producer = Arc::new(producer);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %e, "KV side channel: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            producer.stats.over_capacity.fetch_add(1, Relaxed);
            tracing::warn!(%peer, limit = MAX_CONNECTIONS, "KV side channel: too many connections; closing a new one");
            drop(conn);
            continue;
        };
        let p = producer.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = answer(conn, &p).await {
                tracing::warn!(%peer, error = %e, "KV transfer connection ended with an error");
            }
        });
    }
}

fn timed_out(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, what.to_string())
}

/// One read or write of a transfer, bounded by [`IDLE_DEADLINE`] (a consumer that stops
/// reading or answering does not hold the connection, and its blocks, forever).
pub(super) async fn within<T>(
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout(IDLE_DEADLINE, f)
        .await
        .map_err(|_| timed_out("the KV consumer went quiet"))?
}

/// Reads the consumer's request (its caller bounds it by [`HELLO_DEADLINE`]): the handshake
/// when this producer has a secret, then the magic and what it wants — whether over RDMA, and
/// what. `Err` closes the connection; `Ok(None)` means the consumer was refused (already
/// answered).
async fn read_request(
    s: &mut TcpStream,
    secret: Option<&ClusterSecret>,
    stats: &TransferStats,
) -> std::io::Result<Option<(bool, Wanted)>> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic).await?;
    let refuse = |stats: &TransferStats| stats.unauthorized.fetch_add(1, Relaxed);
    match (secret, &magic == Handshake::MAGIC) {
        (Some(k), true) => {
            let mut cn = [0u8; Handshake::NONCE];
            s.read_exact(&mut cn).await?;
            let pn = Handshake::nonce();
            let mut reply = pn.to_vec();
            reply.extend_from_slice(&Handshake::producer_proof(k, &cn, &pn));
            s.write_all(&reply).await?;
            let mut proof = [0u8; 32];
            s.read_exact(&mut proof).await?;
            if !Handshake::check_consumer(k, &cn, &pn, &proof) {
                refuse(stats);
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "a consumer without the cluster secret",
                ));
            }
            s.read_exact(&mut magic).await?;
        }
        (None, true) => {
            // Not ours to prove: the consumer sees the connection close and gives up.
            refuse(stats);
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "a consumer with a cluster secret; this producer has none",
            ));
        }
        (Some(_), false) => {
            refuse(stats);
            let msg = "this producer requires the cluster secret (--kv-transfer-secret-file)";
            s.write_all(&header(UNAUTHORIZED, msg, 0, 0)).await?;
            return Ok(None);
        }
        (None, false) => {}
    }
    let (prefix, over_rdma) = match &magic {
        m if m == MAGIC => (false, false),
        m if m == PREFIX_MAGIC => (true, false),
        m if m == rdma::RDMA_MAGIC => (false, true),
        m if m == rdma::RDMA_PREFIX_MAGIC => (true, true),
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not a KV transfer request",
            ))
        }
    };
    if prefix && secret.is_none() {
        refuse(stats);
        let msg = "east/west pulls by hash need a cluster secret on both workers";
        s.write_all(&header(UNAUTHORIZED, msg, 0, 0)).await?;
        return Ok(None);
    }
    Ok(Some((over_rdma, read_wanted(s, prefix).await?)))
}

/// The producer's reply header.
fn header(status: u8, message: &str, prompt_len: usize, blocks: usize) -> Vec<u8> {
    let mut h = vec![status];
    put_str(&mut h, message);
    h.extend_from_slice(&(prompt_len as u64).to_le_bytes());
    h.extend_from_slice(&(blocks as u32).to_le_bytes());
    h
}

/// What a consumer asks for.
enum Wanted {
    /// A request's held KV (its engine id, its request id, its token).
    Held(String, String, TransferToken),
    /// The leading run of these hashes in the prefix cache.
    Prefix(Vec<BlockHash>),
}

async fn read_wanted(s: &mut TcpStream, prefix: bool) -> std::io::Result<Wanted> {
    if !prefix {
        let engine_id = read_str(s).await?;
        let request_id = read_str(s).await?;
        let mut token = [0u8; 16];
        s.read_exact(&mut token).await?;
        return Ok(Wanted::Held(engine_id, request_id, TransferToken(token)));
    }
    let n = s.read_u32_le().await? as usize;
    if n > MAX_BLOCKS {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a prefix of {n} blocks"),
        ));
    }
    let mut hashes = Vec::with_capacity(n);
    for _ in 0..n {
        let mut h = [0u8; 32];
        s.read_exact(&mut h).await?;
        hashes.push(BlockHash(h));
    }
    Ok(Wanted::Prefix(hashes))
}

async fn answer(mut s: TcpStream, p: &Producer) -> std::io::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let (source, layout, stats, rdma) = (&*p.source, &p.layout, &*p.stats, p.rdma.as_deref());
    s.set_nodelay(true)?;
    let hello = async {
        let Some((over_rdma, wanted)) = read_request(&mut s, p.secret.as_deref(), stats).await?
        else {
            return Ok(None);
        };
        let consumer = if over_rdma {
            Some(rdma::read_endpoint(&mut s).await?)
        } else {
            None
        };
        Ok::<_, std::io::Error>(Some((over_rdma, wanted, consumer)))
    };
    let Some((over_rdma, wanted, consumer)) =
        tokio::time::timeout(HELLO_DEADLINE, hello)
            .await
            .map_err(|_| timed_out("no KV transfer request within the deadline"))??
    else {
        return Ok(());
    };
    if over_rdma && rdma.is_none() {
        // Before anything is read or released: the consumer pulls again over TCP.
        return rdma::refuse_no_rdma(&mut s).await;
    }
    let (held, blocks, release) = match wanted {
        Wanted::Held(engine_id, request_id, token) => {
            if engine_id != source.engine_id() {
                stats.refused.fetch_add(1, Relaxed);
                // The real id is not named: it would tell a stranger what to ask for.
                let msg = "this producer is not the engine named (it restarted since?)";
                return s.write_all(&header(2, msg, 0, 0)).await;
            }
            // Over TCP only the shape now, the blocks as they are sent; RDMA stages them all.
            let first = if consumer.is_some() { usize::MAX } else { 0 };
            let held = match source.read(&request_id, &token, 0..first).await {
                Ok(Some(h)) => h,
                Ok(None) => {
                    stats.refused.fetch_add(1, Relaxed);
                    return s.write_all(&header(1, "not held", 0, 0)).await;
                }
                Err(e) => return s.write_all(&header(3, &e, 0, 0)).await,
            };
            let blocks = Payloads::Held {
                source,
                id: request_id.clone(),
                token,
            };
            (held, blocks, Some(request_id))
        }
        Wanted::Prefix(hashes) => {
            let mut payloads = match source.read_prefix(hashes.clone()).await {
                Ok(p) => p,
                Err(e) => return s.write_all(&header(3, &e, 0, 0)).await,
            };
            if payloads.is_empty() {
                stats.refused.fetch_add(1, Relaxed);
            }
            // The leading run of the hashes asked for, each block under its own.
            payloads.truncate(hashes.len());
            let mut hashes = hashes;
            hashes.truncate(payloads.len());
            let held = HeldKv {
                prompt_len: 0,
                payloads,
                hashes,
            };
            (held, Payloads::Loaded, None)
        }
    };
    // From here held blocks are released however the connection ends.
    let result = match consumer {
        Some(c) => rdma::serve_reads(&mut s, c, &held, layout, stats, rdma).await,
        None => send_blocks(&mut s, &held, blocks, layout, stats).await,
    };
    if let Some(id) = release {
        source.release(&id);
    }
    stats.transfers.fetch_add(1, Relaxed);
    result
}

/// Where [`send_blocks`] takes payloads from: those already read (a prefix), or a held
/// request's, read from the engine [`CHUNK_BLOCKS`] at a time as they are sent.
enum Payloads<'a> {
    Loaded,
    Held {
        source: &'a dyn HeldKvSource,
        id: String,
        token: TransferToken,
    },
}

impl Payloads<'_> {
    /// The payloads of `blocks`: borrowed from `loaded`, or read from the source.
    async fn get<'l>(
        &self,
        loaded: &'l [Vec<u8>],
        blocks: std::ops::Range<usize>,
    ) -> std::io::Result<std::borrow::Cow<'l, [Vec<u8>]>> {
        match self {
            Payloads::Loaded => Ok(std::borrow::Cow::Borrowed(&loaded[blocks])),
            Payloads::Held { source, id, token } => {
                let want = blocks.len();
                match source.read(id, token, blocks).await {
                    Ok(Some(h)) if h.payloads.len() == want => {
                        Ok(std::borrow::Cow::Owned(h.payloads))
                    }
                    Ok(_) => Err(std::io::Error::other(
                        "the held KV was released during its transfer",
                    )),
                    Err(e) => Err(std::io::Error::other(e)),
                }
            }
        }
    }
}

/// Sends `held`'s blocks (its payloads, or read through `payloads`), each under its hash.
async fn send_blocks(
    s: &mut TcpStream,
    held: &HeldKv,
    payloads: Payloads<'_>,
    layout: &TransferLayout,
    stats: &TransferStats,
) -> std::io::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let hashes = &held.hashes;
    let n = hashes.len();
    s.write_all(&header(0, "", held.prompt_len, n)).await?;
    let record = |i: usize, payload: &[u8]| {
        let mut r = block_record::encode(&hashes[i], &layout.identity, payload);
        if stats.take_corrupt(i) {
            let mid = r.len() / 2;
            r[mid] ^= 0x40;
        }
        let mut out = (r.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&r);
        out
    };
    for start in (0..n).step_by(CHUNK_BLOCKS) {
        let chunk = payloads
            .get(&held.payloads, start..(start + CHUNK_BLOCKS).min(n))
            .await?;
        for (i, p) in (start..).zip(chunk.iter()) {
            let r = record(i, p);
            within(s.write_all(&r)).await?;
            stats.blocks_sent.fetch_add(1, Relaxed);
            stats.bytes_sent.fetch_add(r.len() as u64, Relaxed);
            if let Some(d) = stats.stall(i) {
                s.flush().await?;
                tokio::time::sleep(d).await;
            }
        }
    }
    match within(s.read_u8()).await? {
        0 => Ok(()),
        1 => {
            let k = within(s.read_u32_le()).await? as usize;
            if k > n {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("resend of {k} blocks of {n}"),
                ));
            }
            let mut idx = Vec::with_capacity(k);
            for _ in 0..k {
                idx.push(within(s.read_u32_le()).await? as usize);
            }
            for i in idx {
                if i >= n {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("resend of block {i} of {n}"),
                    ));
                }
                let p = payloads.get(&held.payloads, i..i + 1).await?;
                within(s.write_all(&record(i, &p[0]))).await?;
            }
            within(s.read_u8()).await.map(|_| ())
        }
        other => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unknown consumer op {other}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::Mutex;

    /// The token `req-1` is held under.
    pub(super) const TOKEN: TransferToken = TransferToken([7; 16]);

    pub(super) struct Fake {
        pub id: String,
        /// Held KV and its token.
        pub held: Mutex<HashMap<String, (HeldKv, TransferToken)>>,
        /// The block ranges read, in order.
        pub reads: Mutex<Vec<std::ops::Range<usize>>>,
    }

    impl HeldKvSource for Fake {
        fn engine_id(&self) -> &str {
            &self.id
        }
        fn read(
            &self,
            request_id: &str,
            token: &TransferToken,
            blocks: std::ops::Range<usize>,
        ) -> BoxFuture<'_, Result<Option<HeldKv>, String>> {
            self.reads.lock().unwrap().push(blocks.clone());
            let r = self
                .held
                .lock()
                .unwrap()
                .get(request_id)
                .filter(|(_, t)| t.matches(token))
                .map(|(h, _)| h.slice(blocks));
            Box::pin(async move { Ok(r) })
        }
        fn release(&self, request_id: &str) {
            self.held.lock().unwrap().remove(request_id);
        }
        fn read_prefix(
            &self,
            hashes: Vec<BlockHash>,
        ) -> BoxFuture<'_, Result<Vec<Vec<u8>>, String>> {
            // Holds blocks [i; 64] under BlockHash([i; 32]) for i in 1..=3.
            let out = hashes
                .iter()
                .map_while(|h| {
                    let i = h.0[0];
                    ((1..=3).contains(&i) && h.0 == [i; 32]).then(|| vec![i; 64])
                })
                .collect();
            Box::pin(async move { Ok(out) })
        }
    }

    pub(super) fn secret(s: &str) -> Arc<ClusterSecret> {
        Arc::new(ClusterSecret::new(format!("{s}-0123456789abcdef").as_bytes()).unwrap())
    }

    #[tokio::test]
    async fn a_peer_serves_the_leading_run_of_a_prefix_it_has_cached() {
        let (_, _, port) = producer_with(None, Some(secret("k"))).await;
        let want: Vec<BlockHash> = [1u8, 2, 3, 9, 1]
            .iter()
            .map(|&i| BlockHash([i; 32]))
            .collect();
        let peer = client_with(Some(secret("k")));
        let got = peer.fetch_prefix("127.0.0.1", port, &want).await.unwrap();
        assert_eq!(got.payloads, vec![vec![1u8; 64], vec![2; 64], vec![3; 64]]);
        let none = peer
            .fetch_prefix("127.0.0.1", port, &[BlockHash([9; 32])])
            .await
            .unwrap();
        assert!(none.payloads.is_empty());
    }

    #[tokio::test]
    async fn east_west_pulls_need_the_cluster_secret_on_both_ends() {
        let want = [BlockHash([1; 32])];
        // A producer without a secret serves no pull by hash.
        let (_, stats, port) = producer().await;
        let e = client()
            .fetch_prefix("127.0.0.1", port, &want)
            .await
            .unwrap_err();
        assert_eq!(e.cause(), "unauthorized", "{e}");
        assert_eq!(stats.unauthorized.load(Relaxed), 1);
        // A producer with one refuses a consumer without it, and one with another.
        let (_, stats, port) = producer_with(None, Some(secret("k"))).await;
        for c in [client(), client_with(Some(secret("other")))] {
            let e = c.fetch_prefix("127.0.0.1", port, &want).await.unwrap_err();
            assert_eq!(e.cause(), "unauthorized", "{e}");
        }
        // The one with another secret refused the producer's proof first and hung up, so
        // the producer counted only the one without.
        assert_eq!(stats.unauthorized.load(Relaxed), 1);
        assert_eq!(stats.blocks_sent.load(Relaxed), 0);
    }

    #[tokio::test]
    async fn a_forged_producer_without_the_secret_is_refused_before_anything_is_read() {
        // The consumer holds the secret; the "producer" does not (a stranger's listener that
        // answers the handshake with bytes of its choosing).
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let mut hello = [0u8; 24];
                let _ = c.read_exact(&mut hello).await;
                let _ = c.write_all(&[0x42; 48]).await;
                let mut rest = [0u8; 64];
                let _ = c.read(&mut rest).await;
            }
        });
        let e = client_with(Some(secret("k")))
            .fetch(&remote(port, "engine-a@1", "req-1"), &expected())
            .await
            .unwrap_err();
        assert_eq!(e.cause(), "unauthorized", "{e}");
        assert!(e.to_string().contains("did not prove"), "{e}");
    }

    pub(super) fn layout() -> TransferLayout {
        TransferLayout {
            identity: "model=test;layers=1".into(),
            payload_len: 64,
        }
    }

    /// The hashes `req-1`'s prompt has (as its consumer computes them).
    pub(super) fn hashes() -> Vec<BlockHash> {
        (0..3u8).map(|b| BlockHash([100 + b; 32])).collect()
    }

    pub(super) fn expected() -> Expected {
        Expected {
            prompt_len: 40,
            hashes: hashes(),
        }
    }

    async fn producer() -> (Arc<Fake>, Arc<TransferStats>, u16) {
        producer_with(None, None).await
    }

    /// A producer holding `req-1` (3 blocks of 64 bytes, 40 tokens, under [`hashes`] and
    /// [`TOKEN`]) under engine `engine-a@1`, and blocks 1..=3 of a prefix cache.
    pub(super) async fn producer_with(
        rdma: Option<Arc<RdmaProducer>>,
        secret: Option<Arc<ClusterSecret>>,
    ) -> (Arc<Fake>, Arc<TransferStats>, u16) {
        let fake = Arc::new(Fake {
            id: "engine-a@1".into(),
            held: Mutex::new(HashMap::new()),
            reads: Mutex::new(Vec::new()),
        });
        let payloads: Vec<Vec<u8>> = (0..3u8).map(|b| vec![b; 64]).collect();
        fake.held.lock().unwrap().insert(
            "req-1".into(),
            (
                HeldKv {
                    payloads,
                    prompt_len: 40,
                    hashes: hashes(),
                },
                TOKEN,
            ),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stats = Arc::new(TransferStats::default());
        tokio::spawn(serve(
            listener,
            Producer {
                source: fake.clone(),
                layout: layout(),
                stats: stats.clone(),
                rdma,
                secret,
            },
        ));
        (fake, stats, port)
    }

    pub(super) fn remote(port: u16, engine: &str, req: &str) -> RemoteKv {
        RemoteKv {
            host: "127.0.0.1".into(),
            port,
            engine_id: engine.into(),
            request_id: req.into(),
            token: TOKEN,
        }
    }

    pub(super) fn client() -> TcpTransport {
        client_with(None)
    }

    pub(super) fn client_with(secret: Option<Arc<ClusterSecret>>) -> TcpTransport {
        TcpTransport {
            layout: layout(),
            timeout: Duration::from_secs(10),
            secret,
        }
    }

    #[tokio::test]
    async fn pulls_verified_blocks_and_the_producer_releases_them() {
        for secret in [None, Some(secret("k"))] {
            let (fake, stats, port) = producer_with(None, secret.clone()).await;
            let got = client_with(secret)
                .fetch(&remote(port, "engine-a@1", "req-1"), &expected())
                .await
                .unwrap();
            assert_eq!(got.prompt_len, 40);
            assert_eq!(
                got.payloads,
                (0..3u8).map(|b| vec![b; 64]).collect::<Vec<_>>()
            );
            assert_eq!(got.reread, 0);
            // Released once read: a second pull finds nothing.
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(fake.held.lock().unwrap().is_empty());
            let e = client()
                .fetch(&remote(port, "engine-a@1", "req-1"), &expected())
                .await
                .unwrap_err();
            assert!(matches!(e.cause(), "not_held" | "unauthorized"), "{e}");
            assert_eq!(stats.blocks_sent.load(Relaxed), 3);
        }
    }

    #[tokio::test]
    async fn a_long_prompts_blocks_are_read_a_chunk_at_a_time_as_they_are_sent() {
        let (fake, _, port) = producer().await;
        let n = 2 * CHUNK_BLOCKS + 5;
        let hashes: Vec<BlockHash> = (0..n).map(|i| BlockHash([i as u8; 32])).collect();
        let long = HeldKv {
            payloads: (0..n).map(|i| vec![i as u8; 64]).collect(),
            prompt_len: n * 16,
            hashes: hashes.clone(),
        };
        fake.held
            .lock()
            .unwrap()
            .insert("long".into(), (long.clone(), TOKEN));
        let got = client()
            .fetch(
                &remote(port, "engine-a@1", "long"),
                &Expected {
                    prompt_len: n * 16,
                    hashes,
                },
            )
            .await
            .unwrap();
        assert_eq!(got.payloads, long.payloads);
        let reads = fake.reads.lock().unwrap().clone();
        // The shape first, then the blocks in chunks: never the whole prompt at once.
        assert_eq!(reads[0], 0..0);
        assert_eq!(
            reads[1..],
            [
                0..CHUNK_BLOCKS,
                CHUNK_BLOCKS..2 * CHUNK_BLOCKS,
                2 * CHUNK_BLOCKS..n
            ]
        );
    }

    #[tokio::test]
    async fn a_wrong_token_reads_nothing_and_keeps_the_blocks() {
        let (fake, stats, port) = producer().await;
        let mut r = remote(port, "engine-a@1", "req-1");
        r.token = TransferToken([8; 16]);
        let e = client().fetch(&r, &expected()).await.unwrap_err();
        // The same answer as for an id never held: a guess learns nothing.
        assert_eq!(e.cause(), "not_held", "{e}");
        assert_eq!(stats.blocks_sent.load(Relaxed), 0);
        assert_eq!(fake.held.lock().unwrap().len(), 1);
        // The right token still works.
        client()
            .fetch(&remote(port, "engine-a@1", "req-1"), &expected())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn kv_of_another_prompt_is_refused_not_read_again() {
        let (_, stats, port) = producer().await;
        let mut other = expected();
        other.hashes[1] = BlockHash([9; 32]);
        let e = client()
            .fetch(&remote(port, "engine-a@1", "req-1"), &other)
            .await
            .unwrap_err();
        assert_eq!(e.cause(), "prompt_mismatch", "{e}");
        assert!(e.to_string().contains("block 1"), "{e}");
        // Not asked for again: an intact block of another prompt is not damage.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(stats.blocks_sent.load(Relaxed), 3);
    }

    #[tokio::test]
    async fn a_prompt_of_another_length_is_refused_before_any_block_is_read() {
        for (len, blocks) in [(41, 3), (40, 2), (56, 4)] {
            let (_, _, port) = producer().await;
            let e = client()
                .fetch(
                    &remote(port, "engine-a@1", "req-1"),
                    &Expected {
                        prompt_len: len,
                        hashes: hashes().into_iter().cycle().take(blocks).collect(),
                    },
                )
                .await
                .unwrap_err();
            assert_eq!(e.cause(), "prompt_mismatch", "{e}");
            assert!(
                e.to_string().contains("3 blocks of a 40-token prompt"),
                "{e}"
            );
        }
    }

    #[tokio::test]
    async fn a_stale_engine_id_is_a_clear_error_that_names_no_engine_and_keeps_the_blocks() {
        let (fake, _, port) = producer().await;
        let e = client()
            .fetch(&remote(port, "engine-a@0", "req-1"), &expected())
            .await
            .unwrap_err();
        assert_eq!(e.cause(), "stale_engine");
        assert!(!e.to_string().contains("engine-a@1"), "{e}");
        assert_eq!(fake.held.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_block_damaged_once_is_read_again_twice_is_an_error() {
        let (fake, stats, port) = producer().await;
        *stats.corrupt.lock().unwrap() = Some((1, 1));
        let got = client()
            .fetch(&remote(port, "engine-a@1", "req-1"), &expected())
            .await
            .unwrap();
        assert_eq!(got.reread, 1);
        assert_eq!(got.payloads[1], vec![1u8; 64]);

        let two = HeldKv {
            payloads: vec![vec![7; 64]; 2],
            prompt_len: 20,
            hashes: hashes()[..2].to_vec(),
        };
        fake.held
            .lock()
            .unwrap()
            .insert("req-2".into(), (two, TOKEN));
        *stats.corrupt.lock().unwrap() = Some((0, 2));
        let e = client()
            .fetch(
                &remote(port, "engine-a@1", "req-2"),
                &Expected {
                    prompt_len: 20,
                    hashes: hashes()[..2].to_vec(),
                },
            )
            .await
            .unwrap_err();
        assert_eq!(e.cause(), "corrupt", "{e}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            fake.held.lock().unwrap().is_empty(),
            "released after the failed transfer"
        );
    }

    #[tokio::test]
    async fn a_producer_that_is_gone_is_an_io_error() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = client()
            .fetch(&remote(port, "x", "y"), &expected())
            .await
            .unwrap_err();
        assert_eq!(e.cause(), "io", "{e}");
    }

    #[tokio::test]
    async fn blocks_of_another_model_fail_their_check() {
        let (_, _, port) = producer().await;
        let other = TcpTransport {
            layout: TransferLayout {
                identity: "model=other;layers=1".into(),
                payload_len: 64,
            },
            timeout: Duration::from_secs(10),
            secret: None,
        };
        let e = other
            .fetch(&remote(port, "engine-a@1", "req-1"), &expected())
            .await
            .unwrap_err();
        assert_eq!(e.cause(), "corrupt", "{e}");
    }
}

/// Fuzzing of the side-channel protocol (both ends), bounded for CI: `LLMD_FUZZ_CASES` sets the
/// cases per property (default 200), `LLMD_FUZZ_SEED` replays a failure.
#[cfg(test)]
mod fuzz {
    use super::tests::{expected, layout, producer_with, remote};
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

    fn runner() -> TestRunner {
        let cases = std::env::var("LLMD_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200);
        let seed: u64 = std::env::var("LLMD_FUZZ_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20);
        let mut s = [0u8; 32];
        s[..8].copy_from_slice(&seed.to_le_bytes());
        TestRunner::new_with_rng(
            Config {
                cases,
                failure_persistence: None,
                ..Config::default()
            },
            TestRng::from_seed(RngAlgorithm::ChaCha, &s),
        )
    }

    /// Bytes that start like the protocol's messages more often than chance would.
    fn wire() -> BoxedStrategy<Vec<u8>> {
        let magics: Vec<Vec<u8>> = [
            MAGIC,
            PREFIX_MAGIC,
            rdma::RDMA_MAGIC,
            rdma::RDMA_PREFIX_MAGIC,
            Handshake::MAGIC,
        ]
        .iter()
        .map(|m| m.to_vec())
        .collect();
        let valid = held_hello(MAGIC, &remote(1, "engine-a@1", "req-1"));
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            (
                proptest::sample::select(magics),
                proptest::collection::vec(any::<u8>(), 0..200)
            )
                .prop_map(|(mut m, tail)| {
                    m.extend(tail);
                    m
                }),
            (0..valid.len(), any::<u8>(), 0..valid.len() + 8, Just(valid)).prop_map(
                |(at, x, cut, mut v)| {
                    v[at] ^= x | 1;
                    v.truncate(cut);
                    v
                }
            ),
        ]
        .boxed()
    }

    /// Whatever a consumer sends, the producer's connection ends without a panic, and the KV
    /// it holds stays held for the consumer with the token (and is served to it).
    #[test]
    fn the_producer_survives_any_request() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (fake, _, port) = rt.block_on(producer_with(None, None));
        let producer = Arc::new(Producer {
            source: fake.clone() as Arc<dyn HeldKvSource>,
            layout: layout(),
            stats: Arc::new(TransferStats::default()),
            rdma: None,
            secret: Some(super::tests::secret("k")),
        });
        let open = Arc::new(Producer {
            secret: None,
            source: fake.clone(),
            layout: layout(),
            stats: Arc::new(TransferStats::default()),
            rdma: None,
        });
        runner()
            .run(&(wire(), any::<bool>()), |(bytes, with_secret)| {
                let p = if with_secret { &producer } else { &open }.clone();
                let joined = rt.block_on(async move {
                    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
                    let addr = l.local_addr().unwrap();
                    let task = tokio::spawn(async move {
                        let (s, _) = l.accept().await.unwrap();
                        let _ = answer(s, &p).await;
                    });
                    let mut c = TcpStream::connect(addr).await.unwrap();
                    let _ = c.write_all(&bytes).await;
                    let _ = c.shutdown().await;
                    let mut sink = Vec::new();
                    let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut sink))
                        .await;
                    drop(c);
                    tokio::time::timeout(Duration::from_secs(10), task).await
                });
                let joined = joined.map_err(|_| TestCaseError::fail("the producer hung"))?;
                prop_assert!(joined.is_ok(), "the producer panicked: {joined:?}");
                prop_assert_eq!(fake.held.lock().unwrap().len(), 1, "held KV was released");
                Ok(())
            })
            .unwrap();
        // Still served, whole, to its consumer.
        let got = rt
            .block_on(
                super::tests::client().fetch(&remote(port, "engine-a@1", "req-1"), &expected()),
            )
            .unwrap();
        assert_eq!(got.payloads.len(), 3);
    }

    /// A real producer's answer to a pull, as bytes: what the fuzzed producers mutate.
    fn valid_answer() -> Vec<u8> {
        let held = HeldKv {
            payloads: (0..3u8).map(|b| vec![b; 64]).collect(),
            prompt_len: 40,
            hashes: super::tests::hashes(),
        };
        let mut out = header(0, "", 40, 3);
        for (h, p) in held.hashes.iter().zip(&held.payloads) {
            let r = block_record::encode(h, &layout().identity, p);
            out.extend_from_slice(&(r.len() as u64).to_le_bytes());
            out.extend_from_slice(&r);
        }
        out
    }

    /// Whatever a producer answers, the consumer returns an error or exactly the KV the
    /// prompt's hashes name — never a panic, never other bytes.
    #[test]
    fn the_consumer_takes_nothing_unverified_from_any_answer() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let valid = valid_answer();
        let answers = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            (
                proptest::collection::vec((0..valid.len(), any::<u8>()), 1..4),
                0..valid.len() + 16,
                Just(valid.clone())
            )
                .prop_map(|(flips, cut, mut v)| {
                    for (at, x) in flips {
                        v[at] ^= x | 1;
                    }
                    v.truncate(cut);
                    v
                }),
        ];
        let want: Vec<Vec<u8>> = (0..3u8).map(|b| vec![b; 64]).collect();
        runner()
            .run(&answers, |answer| {
                let got = rt.block_on(async move {
                    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
                    let port = l.local_addr().unwrap().port();
                    tokio::spawn(async move {
                        let (mut s, _) = l.accept().await.unwrap();
                        let mut hello =
                            vec![0u8; held_hello(MAGIC, &remote(1, "engine-a@1", "req-1")).len()];
                        let _ = s.read_exact(&mut hello).await;
                        let _ = s.write_all(&answer).await;
                        let _ = s.shutdown().await;
                        let mut rest = Vec::new();
                        let _ = s.read_to_end(&mut rest).await;
                    });
                    let c = TcpTransport {
                        layout: layout(),
                        timeout: Duration::from_secs(10),
                        secret: None,
                    };
                    c.fetch(&remote(port, "engine-a@1", "req-1"), &expected())
                        .await
                });
                if let Ok(f) = got {
                    prop_assert_eq!(&f.payloads, &want);
                    prop_assert_eq!(f.prompt_len, 40);
                }
                Ok(())
            })
            .unwrap();
    }
}
