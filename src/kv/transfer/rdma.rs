//! The RDMA transport: the producer stages a request's block records in memory registered
//! with its HCA and hands out their addresses and rkeys over the TCP side channel; the
//! consumer READs them one-sidedly into its own registered memory over an RC queue pair,
//! checks each record, asks once for bad ones to be staged again, and says it is done (the
//! producer then frees the staging and the held blocks, as over TCP).
//!
//! Wire protocol, on the same side-channel connection as [`super::TcpTransport`]'s:
//! ```text
//! [with a cluster secret: the handshake of crate::kv::auth::Handshake first]
//! consumer → producer: "LLMDKVR2" | engine_id | request_id | token (16) | consumer endpoint
//!                   or "LLMDKVQ2" | count u32 | hashes (32 bytes each) | consumer endpoint
//! producer → consumer: status u8 | message | prompt_len u64 | blocks u32
//!                      [status 0:] producer endpoint | per block: addr u64 | rkey u32 | len u32
//! consumer → producer: 0 (done) | 1 (stage again: count u32, indices u32…; the producer
//!                      answers one byte 0 when they are staged, in the same places) … 0
//! ```
//! Status 4 means the producer has no RDMA device: the consumer pulls the same KV over TCP
//! instead. The records are the tiers' checksummed [`crate::kv::block_record`]s, so a block
//! damaged anywhere on the way (host memory, the wire, the HCA) is caught.
//!
//! The producer stages host copies (pinned by registration) rather than registering its KV
//! pool: on CUDA that means one device-to-host copy per block before the READ. Registering
//! device memory (GPUDirect RDMA, `ibv_reg_dmabuf_mr`) would remove it; not done.
//!
//! Staging is bounded: a transfer takes slots of the registered pool or is refused (the
//! consumer recomputes); nothing is registered beyond `rdma_staging_mb` on either side. Slots
//! are zeroed when a transfer gives them back, so a consumer that READs outside its own
//! slices (the pool shares one rkey) finds no other transfer's KV left behind; KV of
//! transfers in flight at the same moment is not hidden from it — only consumers that proved
//! the cluster secret get an rkey at all when one is configured.
use super::verbs::{Endpoint, Fabric, QueuePair, ReadOp, Region, RemoteSlice};
use super::{
    block_record, header, read_str, BlockHash, Expected, Fetched, HeldKv, KvTransport, RemoteKv,
    TcpTransport, TransferError, TransferLayout, TransferStats, MAX_BLOCKS,
};
use futures_util::future::BoxFuture;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub(super) const RDMA_MAGIC: &[u8; 8] = b"LLMDKVR2";
pub(super) const RDMA_PREFIX_MAGIC: &[u8; 8] = b"LLMDKVQ2";
/// The producer's status when it has no RDMA device.
const NO_RDMA: u8 = 4;

/// Fixed-size slots (one block record each) in one registered region.
pub struct Staging {
    region: Arc<dyn Region>,
    slot_len: usize,
    free: Mutex<Vec<usize>>,
}

/// Slots taken from a [`Staging`] (or a one-off region when the pool is short): given back
/// when dropped.
pub struct Slots {
    region: Arc<dyn Region>,
    offsets: Vec<usize>,
    pool: Option<Arc<Staging>>,
}

impl Drop for Slots {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            // Nothing of this transfer stays readable in the shared region.
            let zeros = vec![0u8; pool.slot_len];
            for &o in &self.offsets {
                self.region.write(o, &zeros);
            }
            let mut free = pool.free.lock().unwrap_or_else(|e| e.into_inner());
            free.extend(self.offsets.iter().map(|o| o / pool.slot_len));
        }
    }
}

impl Staging {
    /// A region of `slots` slots of `slot_len` bytes, registered with `fabric`.
    pub fn new(fabric: &dyn Fabric, slots: usize, slot_len: usize) -> Result<Arc<Self>, String> {
        let region = fabric
            .register(slots * slot_len)
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(Self {
            region,
            slot_len,
            free: Mutex::new((0..slots).rev().collect()),
        }))
    }

    pub fn free_slots(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// `n` slots, if that many are free.
    fn take(self: &Arc<Self>, n: usize) -> Option<Slots> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < n {
            return None;
        }
        let at = free.len() - n;
        let offsets = free
            .split_off(at)
            .iter()
            .map(|s| s * self.slot_len)
            .collect();
        Some(Slots {
            region: self.region.clone(),
            offsets,
            pool: Some(self.clone()),
        })
    }

    /// `n` slots from the pool; an error when fewer are free (staging is capped: the caller
    /// falls back instead of registering more memory).
    fn take_or_refuse(self: &Arc<Self>, n: usize) -> Result<Slots, String> {
        self.take(n).ok_or_else(|| {
            format!(
                "{n} blocks do not fit the RDMA staging now ({} of {} slots free;                  kv_connector_extra_config.rdma_staging_mb sets its size)",
                self.free_slots(),
                self.region.len() / self.slot_len
            )
        })
    }
}

/// The record length of one block under `layout`.
pub fn slot_len(layout: &TransferLayout) -> usize {
    block_record::record_len(layout.identity.len(), layout.payload_len)
}

/// A producer's RDMA side: its device and staging.
pub struct RdmaProducer {
    pub fabric: Arc<dyn Fabric>,
    pub staging: Arc<Staging>,
}

impl RdmaProducer {
    /// `staging_bytes` of staging registered on `fabric` for records of `layout`.
    pub fn new(
        fabric: Arc<dyn Fabric>,
        layout: &TransferLayout,
        staging_bytes: usize,
    ) -> Result<Self, String> {
        let slot = slot_len(layout);
        let staging = Staging::new(&*fabric, (staging_bytes / slot).max(1), slot)?;
        Ok(Self { fabric, staging })
    }
}

/// Tells an RDMA consumer this producer has none (it then pulls over TCP).
pub(super) async fn refuse_no_rdma(s: &mut TcpStream) -> std::io::Result<()> {
    let msg = "this producer has no RDMA device; pull over TCP";
    s.write_all(&header(NO_RDMA, msg, 0, 0)).await
}

/// Reads the consumer's endpoint (after its hello).
pub(super) async fn read_endpoint(s: &mut TcpStream) -> std::io::Result<Endpoint> {
    let mut b = [0u8; Endpoint::WIRE_LEN];
    s.read_exact(&mut b).await?;
    Ok(Endpoint::from_wire(&b))
}

/// The producer's answer to an RDMA pull whose blocks it has (`held`, each under its hash):
/// stage, connect, hand out the addresses, restage on request, until done.
pub(super) async fn serve_reads(
    s: &mut TcpStream,
    consumer: Endpoint,
    held: &HeldKv,
    layout: &TransferLayout,
    stats: &TransferStats,
    producer: Option<&RdmaProducer>,
) -> std::io::Result<()> {
    let Some(p) = producer else {
        return refuse_no_rdma(s).await;
    };
    let n = held.payloads.len();
    let slots = match p.staging.take_or_refuse(n) {
        Ok(sl) => sl,
        Err(e) => {
            let msg = format!("RDMA staging for {n} blocks: {e}");
            return s.write_all(&header(3, &msg, 0, 0)).await;
        }
    };
    let stage = |i: usize| {
        let mut r = block_record::encode(&held.hashes[i], &layout.identity, &held.payloads[i]);
        if stats.take_corrupt(i) {
            let mid = r.len() / 2;
            r[mid] ^= 0x40;
        }
        slots.region.write(slots.offsets[i], &r);
        r.len()
    };
    let lens: Vec<usize> = (0..n).map(stage).collect();
    let qp = match p.fabric.queue_pair().and_then(|mut qp| {
        qp.connect(&consumer)?;
        Ok(qp)
    }) {
        Ok(qp) => qp,
        Err(e) => return s.write_all(&header(3, &e.to_string(), 0, 0)).await,
    };
    let mut reply = header(0, "", held.prompt_len, n);
    reply.extend_from_slice(&qp.endpoint().to_wire());
    for (offset, len) in slots.offsets.iter().zip(&lens) {
        let slice = RemoteSlice {
            addr: slots.region.addr() + *offset as u64,
            rkey: slots.region.rkey(),
            len: *len as u32,
        };
        reply.extend_from_slice(&slice.to_wire());
    }
    s.write_all(&reply).await?;
    let served = loop {
        match s.read_u8().await? {
            0 => break true,
            1 => {
                let k = s.read_u32_le().await? as usize;
                if k > n {
                    break false;
                }
                let mut idx = Vec::with_capacity(k);
                for _ in 0..k {
                    idx.push(s.read_u32_le().await? as usize);
                }
                if idx.iter().any(|&i| i >= n) {
                    break false;
                }
                for i in idx {
                    // The same length, so the same slice.
                    stage(i);
                }
                s.write_all(&[0]).await?;
            }
            _ => break false,
        }
    };
    // The pair is kept until the consumer is done: a READ in flight needs it.
    drop(qp);
    if !served {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "a bad request from the RDMA consumer",
        ));
    }
    stats.blocks_sent.fetch_add(n as u64, Relaxed);
    stats
        .bytes_sent
        .fetch_add(lens.iter().sum::<usize>() as u64, Relaxed);
    Ok(())
}

/// The RDMA transport (consumer side). A producer without RDMA is pulled from over TCP.
pub struct RdmaTransport {
    pub tcp: TcpTransport,
    pub fabric: Arc<dyn Fabric>,
    landing: Arc<Staging>,
    /// Pulls that went over TCP because the producer had no RDMA.
    pub tcp_pulls: AtomicU64,
}

impl RdmaTransport {
    /// A consumer with `landing_bytes` of registered memory to READ into.
    pub fn new(
        tcp: TcpTransport,
        fabric: Arc<dyn Fabric>,
        landing_bytes: usize,
    ) -> Result<Self, String> {
        let slot = slot_len(&tcp.layout);
        let landing = Staging::new(&*fabric, (landing_bytes / slot).max(1), slot)?;
        Ok(Self {
            tcp,
            fabric,
            landing,
            tcp_pulls: AtomicU64::new(0),
        })
    }

    pub fn free_landing_slots(&self) -> usize {
        self.landing.free_slots()
    }

    async fn timed(
        &self,
        addr: String,
        f: impl std::future::Future<Output = Result<Option<Fetched>, TransferError>>,
    ) -> Result<Option<Fetched>, TransferError> {
        match tokio::time::timeout(self.tcp.timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(TransferError::Timeout {
                addr,
                seconds: self.tcp.timeout.as_secs_f64(),
            }),
        }
    }

    /// One RDMA pull: `Ok(None)` when the producer has no RDMA. The header is checked
    /// against `shape` when given, block `i` against `expected(i)`.
    async fn exchange(
        &self,
        addr: &str,
        mut hello: Vec<u8>,
        request_id: &str,
        shape: Option<&Expected>,
        expected: impl Fn(usize) -> BlockHash,
    ) -> Result<Option<Fetched>, TransferError> {
        let io = |source| TransferError::Io {
            addr: addr.to_string(),
            source,
        };
        let rdma = |e: String| TransferError::Rdma {
            addr: addr.to_string(),
            message: e,
        };
        let mut qp = self.fabric.queue_pair().map_err(|e| rdma(e.to_string()))?;
        hello.extend_from_slice(&qp.endpoint().to_wire());
        let mut s = super::connect(addr, self.tcp.secret.as_deref()).await?;
        s.write_all(&hello).await.map_err(io)?;
        let status = s.read_u8().await.map_err(io)?;
        let message = read_str(&mut s).await.map_err(io)?;
        let prompt_len = s.read_u64_le().await.map_err(io)? as usize;
        let n = s.read_u32_le().await.map_err(io)? as usize;
        if status == NO_RDMA {
            return Ok(None);
        }
        super::check_status(status, message, addr, request_id)?;
        if n > MAX_BLOCKS {
            return Err(TransferError::Protocol {
                addr: addr.to_string(),
                what: "block count".into(),
            });
        }
        if let Some(e) = shape {
            super::check_shape(addr, e, prompt_len, n)?;
        }
        let producer = read_endpoint(&mut s).await.map_err(io)?;
        let mut slices = Vec::with_capacity(n);
        for _ in 0..n {
            let mut b = [0u8; RemoteSlice::WIRE_LEN];
            s.read_exact(&mut b).await.map_err(io)?;
            slices.push(RemoteSlice::from_wire(&b));
        }
        let slot = self.landing.slot_len;
        if let Some(i) = slices.iter().position(|sl| sl.len as usize != slot) {
            let _ = s.write_all(&[0]).await;
            return Err(TransferError::Corrupt {
                addr: addr.to_string(),
                index: i,
                reason: format!(
                    "a record of {} bytes, a block here is {slot} (another model or layout?)",
                    slices[i].len
                ),
            });
        }
        let landing = self.landing.take_or_refuse(n).map_err(rdma)?;
        qp.connect(&producer).map_err(|e| rdma(e.to_string()))?;
        let check = |i: usize, landing: &Slots| {
            let record = landing.region.read(landing.offsets[i], slot);
            self.tcp.layout.open(&record, &expected(i))
        };
        let all: Vec<usize> = (0..n).collect();
        let (q, landing) = read_all(qp, landing, &slices, &all, self.tcp.timeout)
            .await
            .map_err(rdma)?;
        qp = q;
        let mut got = super::Checked::new(n);
        for i in 0..n {
            if let Err(e) = got.first(addr, "rdma", i, check(i, &landing)) {
                let _ = s.write_all(&[0]).await;
                return Err(e);
            }
        }
        let reread = got.bad.len();
        let mut landing = landing;
        if reread > 0 {
            s.write_all(&super::resend_request(&got.bad))
                .await
                .map_err(io)?;
            if s.read_u8().await.map_err(io)? != 0 {
                return Err(TransferError::Protocol {
                    addr: addr.to_string(),
                    what: "restage answer".into(),
                });
            }
            let (_, l) = read_all(qp, landing, &slices, &got.bad, self.tcp.timeout)
                .await
                .map_err(rdma)?;
            landing = l;
            for i in got.bad.clone() {
                if let Err(e) = got.again(addr, i, check(i, &landing)) {
                    let _ = s.write_all(&[0]).await;
                    return Err(e);
                }
            }
        }
        s.write_all(&[0]).await.map_err(io)?;
        drop(landing);
        Ok(Some(got.into_fetched(prompt_len, reread)))
    }
}

/// READs blocks `which` of `slices` into `landing` on a blocking thread (verbs calls poll).
async fn read_all(
    mut qp: Box<dyn QueuePair>,
    landing: Slots,
    slices: &[RemoteSlice],
    which: &[usize],
    timeout: Duration,
) -> Result<(Box<dyn QueuePair>, Slots), String> {
    let ops: Vec<ReadOp> = which
        .iter()
        .map(|&i| ReadOp {
            remote: slices[i],
            local_offset: landing.offsets[i],
        })
        .collect();
    let (qp, landing, r) = tokio::task::spawn_blocking(move || {
        let r = qp.read(&*landing.region, &ops, timeout);
        (qp, landing, r)
    })
    .await
    .map_err(|e| format!("the READ thread failed: {e}"))?;
    let results = r.map_err(|e| e.to_string())?;
    if let Some((k, Err(e))) = results.iter().enumerate().find(|(_, r)| r.is_err()) {
        return Err(format!("READ of block {}: {e}", which[k]));
    }
    Ok((qp, landing))
}

impl KvTransport for RdmaTransport {
    fn fetch<'a>(
        &'a self,
        from: &'a RemoteKv,
        expected: &'a Expected,
    ) -> BoxFuture<'a, Result<Fetched, TransferError>> {
        Box::pin(async move {
            let addr = format!("{}:{}", from.host, from.port);
            let hello = super::held_hello(RDMA_MAGIC, from);
            let got = self
                .timed(
                    addr.clone(),
                    self.exchange(&addr, hello, &from.request_id, Some(expected), |i| {
                        expected.hashes[i]
                    }),
                )
                .await?;
            match got {
                Some(f) => Ok(f),
                None => {
                    self.tcp_pulls.fetch_add(1, Relaxed);
                    self.tcp.fetch(from, expected).await
                }
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
            let hashes = &hashes[..hashes.len().min(MAX_BLOCKS)];
            let mut hello = RDMA_PREFIX_MAGIC.to_vec();
            hello.extend_from_slice(&(hashes.len() as u32).to_le_bytes());
            for h in hashes {
                hello.extend_from_slice(&h.0);
            }
            let got = self
                .timed(
                    addr.clone(),
                    self.exchange(&addr, hello, "prefix", None, |i| {
                        hashes.get(i).copied().unwrap_or(BlockHash([0; 32]))
                    }),
                )
                .await?;
            let mut f = match got {
                Some(f) => f,
                None => {
                    self.tcp_pulls.fetch_add(1, Relaxed);
                    return self.tcp.fetch_prefix(host, port, hashes).await;
                }
            };
            if f.payloads.len() > hashes.len() {
                return Err(TransferError::Protocol {
                    addr,
                    what: format!("{} blocks for {} hashes", f.payloads.len(), hashes.len()),
                });
            }
            f.prompt_len = 0;
            Ok(f)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{
        client_with, expected, hashes, layout, producer_with, remote, secret, TOKEN,
    };
    use super::super::verbs::{loopback_node, LoopbackNet};
    use super::*;

    /// A producer with RDMA on `net` (staging for `slots` records), its node and its staging.
    async fn rdma_producer(
        net: &Arc<LoopbackNet>,
        slots: usize,
    ) -> (
        Arc<super::super::tests::Fake>,
        Arc<TransferStats>,
        u16,
        u32,
        Arc<Staging>,
    ) {
        let fabric = net.fabric();
        let node = loopback_node(&*fabric).unwrap();
        let p = RdmaProducer::new(fabric, &layout(), slots * slot_len(&layout())).unwrap();
        let staging = p.staging.clone();
        // With the cluster secret: every RDMA pull also goes through the handshake.
        let (fake, stats, port) = producer_with(Some(Arc::new(p)), Some(secret("k"))).await;
        (fake, stats, port, node, staging)
    }

    fn consumer(net: &Arc<LoopbackNet>, slots: usize) -> RdmaTransport {
        let tcp = client_with(Some(secret("k")));
        RdmaTransport::new(tcp, net.fabric(), slots * slot_len(&layout())).unwrap()
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(30)).await;
    }

    #[tokio::test]
    async fn blocks_are_read_over_rdma_checked_and_everything_is_freed() {
        let net = LoopbackNet::new();
        let (fake, stats, port, _, staging) = rdma_producer(&net, 8).await;
        let c = consumer(&net, 8);
        let got = c
            .fetch(&remote(port, "engine-a@1", "req-1"), &expected())
            .await
            .unwrap();
        assert_eq!(got.prompt_len, 40);
        assert_eq!(
            got.payloads,
            (0..3u8).map(|b| vec![b; 64]).collect::<Vec<_>>()
        );
        assert_eq!(got.reread, 0);
        // One-sided READs moved the bytes, not the TCP channel.
        assert_eq!(net.reads.load(Relaxed), 3);
        assert_eq!(c.tcp_pulls.load(Relaxed), 0);
        settle().await;
        assert!(fake.held.lock().unwrap().is_empty(), "released when done");
        assert_eq!(staging.free_slots(), 8, "producer staging returned");
        assert_eq!(c.free_landing_slots(), 8, "consumer landing returned");
        assert_eq!(stats.blocks_sent.load(Relaxed), 3);
        let e = c
            .fetch(&remote(port, "engine-a@1", "req-1"), &expected())
            .await
            .unwrap_err();
        assert_eq!(e.cause(), "not_held", "{e}");
    }

    #[tokio::test]
    async fn a_producer_without_rdma_is_pulled_from_over_tcp() {
        let net = LoopbackNet::new();
        let (fake, _, port) = producer_with(None, Some(secret("k"))).await;
        let c = consumer(&net, 8);
        let got = c
            .fetch(&remote(port, "engine-a@1", "req-1"), &expected())
            .await
            .unwrap();
        assert_eq!(got.payloads.len(), 3);
        assert_eq!(got.payloads[2], vec![2u8; 64]);
        assert_eq!(c.tcp_pulls.load(Relaxed), 1);
        assert_eq!(net.reads.load(Relaxed), 0);
        settle().await;
        assert!(fake.held.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_block_damaged_once_is_staged_and_read_again_twice_is_an_error() {
        let net = LoopbackNet::new();
        let (fake, stats, port, _, staging) = rdma_producer(&net, 8).await;
        let c = consumer(&net, 8);
        *stats.corrupt.lock().unwrap() = Some((1, 1));
        let got = c
            .fetch(&remote(port, "engine-a@1", "req-1"), &expected())
            .await
            .unwrap();
        assert_eq!(got.reread, 1);
        assert_eq!(got.payloads[1], vec![1u8; 64]);
        assert_eq!(net.reads.load(Relaxed), 4, "three READs and one again");

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
        let expected_two = super::super::Expected {
            prompt_len: 20,
            hashes: hashes()[..2].to_vec(),
        };
        let e = c
            .fetch(&remote(port, "engine-a@1", "req-2"), &expected_two)
            .await
            .unwrap_err();
        assert_eq!(e.cause(), "corrupt", "{e}");
        settle().await;
        assert!(fake.held.lock().unwrap().is_empty());
        assert_eq!(staging.free_slots(), 8);
        assert_eq!(c.free_landing_slots(), 8);
    }

    #[tokio::test]
    async fn a_stale_engine_id_is_refused_before_anything_is_staged() {
        let net = LoopbackNet::new();
        let (fake, _, port, _, staging) = rdma_producer(&net, 8).await;
        let e = consumer(&net, 8)
            .fetch(&remote(port, "engine-a@0", "req-1"), &expected())
            .await
            .unwrap_err();
        assert_eq!(e.cause(), "stale_engine", "{e}");
        assert!(!e.to_string().contains("engine-a@1"), "{e}");
        assert_eq!(
            fake.held.lock().unwrap().len(),
            1,
            "kept for the right consumer"
        );
        assert_eq!(staging.free_slots(), 8);
        assert_eq!(net.reads.load(Relaxed), 0);
    }

    #[tokio::test]
    async fn a_producer_that_dies_mid_read_fails_the_pull_and_frees_its_side() {
        let net = LoopbackNet::new();
        let (fake, _, port, node, staging) = rdma_producer(&net, 8).await;
        net.die_after(node, 1);
        let c = consumer(&net, 8);
        let e = c
            .fetch(&remote(port, "engine-a@1", "req-1"), &expected())
            .await
            .unwrap_err();
        assert_eq!(e.cause(), "rdma", "{e}");
        assert!(e.to_string().contains("RETRY_EXC_ERR"), "{e}");
        settle().await;
        assert_eq!(c.free_landing_slots(), 8, "the consumer's landing is back");
        // The side channel dropped with the failed pull: the producer's process (here still
        // running) freed the blocks and the staging.
        assert!(fake.held.lock().unwrap().is_empty());
        assert_eq!(staging.free_slots(), 8);
    }

    #[tokio::test]
    async fn staging_is_capped_a_transfer_that_does_not_fit_is_refused_and_slots_are_zeroed() {
        let net = LoopbackNet::new();
        // The producer's staging holds 2 records, the transfer needs 3: refused, nothing
        // registered beyond the pool.
        let (fake, _, port, _, staging) = rdma_producer(&net, 2).await;
        let regions = net.regions();
        let e = consumer(&net, 8)
            .fetch(&remote(port, "engine-a@1", "req-1"), &expected())
            .await
            .unwrap_err();
        assert_eq!(e.cause(), "producer", "{e}");
        assert!(e.to_string().contains("RDMA staging"), "{e}");
        assert_eq!(
            net.regions(),
            regions + 1,
            "only the consumer's landing pool"
        );
        assert_eq!(staging.free_slots(), 2);
        // The consumer's landing holds 1: refused the same way.
        settle().await;
        let (_, _, port, _, _) = rdma_producer(&net, 8).await;
        let c = consumer(&net, 1);
        let e = c
            .fetch(&remote(port, "engine-a@1", "req-1"), &expected())
            .await
            .unwrap_err();
        assert_eq!(e.cause(), "rdma", "{e}");
        assert_eq!(c.free_landing_slots(), 1);
        drop(fake);
        // Slots given back hold zeros, not the last transfer's KV.
        let (_, _, port, _, staging) = rdma_producer(&net, 4).await;
        consumer(&net, 4)
            .fetch(&remote(port, "engine-a@1", "req-1"), &expected())
            .await
            .unwrap();
        settle().await;
        assert_eq!(staging.free_slots(), 4);
        let all = staging.region.read(0, staging.region.len());
        assert!(
            all.iter().all(|&b| b == 0),
            "staging zeroed when given back"
        );
    }

    #[tokio::test]
    async fn a_cached_prefix_is_read_over_rdma() {
        let net = LoopbackNet::new();
        let (_, _, port, _, _) = rdma_producer(&net, 8).await;
        let want: Vec<BlockHash> = [1u8, 2, 9].iter().map(|&i| BlockHash([i; 32])).collect();
        let got = consumer(&net, 8)
            .fetch_prefix("127.0.0.1", port, &want)
            .await
            .unwrap();
        assert_eq!(got.payloads, vec![vec![1u8; 64], vec![2; 64]]);
        assert_eq!(got.prompt_len, 0);
        assert_eq!(net.reads.load(Relaxed), 2);
    }

    #[tokio::test]
    async fn records_of_another_layout_are_refused() {
        let net = LoopbackNet::new();
        let (fake, _, port, _, _) = rdma_producer(&net, 8).await;
        let held = fake.held.lock().unwrap()["req-1"].clone();
        let other = TcpTransport {
            layout: TransferLayout {
                identity: "model=other;layers=1".into(),
                payload_len: 64,
            },
            timeout: Duration::from_secs(10),
            secret: Some(secret("k")),
        };
        let c = RdmaTransport::new(other, net.fabric(), 1 << 16).unwrap();
        let e = c
            .fetch(&remote(port, "engine-a@1", "req-1"), &expected())
            .await
            .unwrap_err();
        assert_eq!(e.cause(), "corrupt", "{e}");
        // A failed pull released the blocks; hold them again for the next consumer.
        settle().await;
        fake.held.lock().unwrap().insert("req-1".into(), held);
        let wider = TcpTransport {
            layout: TransferLayout {
                identity: layout().identity,
                payload_len: 128,
            },
            timeout: Duration::from_secs(10),
            secret: Some(secret("k")),
        };
        let c = RdmaTransport::new(wider, net.fabric(), 1 << 16).unwrap();
        let e = c
            .fetch(&remote(port, "engine-a@1", "req-1"), &expected())
            .await
            .unwrap_err();
        assert_eq!(e.cause(), "corrupt", "{e}");
        assert!(e.to_string().contains("another model or layout"), "{e}");
    }

    #[test]
    fn endpoints_and_slices_survive_the_wire() {
        let e = Endpoint {
            lid: 0x1234,
            qpn: 0xabcdef,
            psn: 0x123456,
            gid: [7; 16],
        };
        assert_eq!(Endpoint::from_wire(&e.to_wire()), e);
        let s = RemoteSlice {
            addr: 0x7f00_dead_beef,
            rkey: 42,
            len: 4096,
        };
        assert_eq!(RemoteSlice::from_wire(&s.to_wire()), s);
    }

    #[test]
    fn reads_outside_a_region_or_without_a_connection_fail_like_a_real_hca() {
        let net = LoopbackNet::new();
        let (a, b) = (net.fabric(), net.fabric());
        let remote_region = a.register(100).unwrap();
        remote_region.write(0, &[9; 100]);
        let local = b.register(100).unwrap();
        let mut qa = a.queue_pair().unwrap();
        let mut qb = b.queue_pair().unwrap();
        let op = |addr: u64, rkey: u32, len: u32| ReadOp {
            remote: RemoteSlice { addr, rkey, len },
            local_offset: 0,
        };
        let t = Duration::from_secs(1);
        let base = remote_region.addr();
        let rkey = remote_region.rkey();
        // Not connected yet.
        let r = qb.read(&*local, &[op(base, rkey, 10)], t).unwrap();
        assert!(r[0].as_ref().unwrap_err().contains("not connected"));
        qb.connect(&qa.endpoint()).unwrap();
        qa.connect(&qb.endpoint()).unwrap();
        let r = qb
            .read(
                &*local,
                &[
                    op(base, rkey, 10),
                    op(base + 95, rkey, 10),
                    op(base, rkey + 1000, 10),
                    op(base, local.rkey(), 10),
                ],
                t,
            )
            .unwrap();
        assert!(r[0].is_ok());
        assert_eq!(local.read(0, 10), vec![9; 10]);
        assert!(r[1].as_ref().unwrap_err().contains("REM_ACCESS_ERR"));
        assert!(r[2].as_ref().unwrap_err().contains("REM_ACCESS_ERR"));
        assert!(
            r[3].as_ref().unwrap_err().contains("REM_ACCESS_ERR"),
            "a region of the reader's own node is not the peer's"
        );
        drop(qa);
        let r = qb.read(&*local, &[op(base, rkey, 10)], t).unwrap();
        assert!(r[0].as_ref().unwrap_err().contains("RETRY_EXC_ERR"));
    }

    #[test]
    fn without_a_verbs_device_opening_one_is_a_clear_error() {
        let e = match super::super::verbs::open_device(&Default::default()) {
            Ok(f) => panic!(
                "this machine has a verbs device ({}): the test assumes none",
                f.name()
            ),
            Err(e) => e.to_string(),
        };
        if cfg!(feature = "rdma") {
            assert!(
                e.contains("/sys/class/infiniband") || e.contains("libibverbs"),
                "{e}"
            );
        } else {
            assert!(e.contains("--features rdma"), "{e}");
        }
    }
}
