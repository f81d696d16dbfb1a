//! The RDMA verbs the KV transport uses, behind [`Fabric`]: registered memory regions, RC
//! queue pairs connected by exchanging [`Endpoint`]s over the TCP side channel, and one-sided
//! RDMA READs.
//!
//! Two implementations:
//! - [`open_device`] (cargo feature `rdma`): the host's HCA through `sideway`, which loads
//!   libibverbs at run time. Where there is no verbs device (or no libibverbs) it fails with a
//!   clear [`RdmaError::NoDevice`]. **Unverified on RDMA hardware**: no machine this project has
//!   run on has an HCA; it compiles and is exercised up to `ibv_get_device_list`.
//! - [`LoopbackNet`]: an in-process model of an RC fabric with the semantics the protocol
//!   relies on (a READ needs a connected pair, a live region, a valid rkey and in-bounds
//!   addresses; a dead peer fails the READ), so everything above the verbs is tested here.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// Why a verbs operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    #[error("RDMA: {0}")]
    NoDevice(String),
    #[error("RDMA: {what}: {source}")]
    Verbs {
        what: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("RDMA: {0}")]
    Failed(String),
}

/// What the other side needs to connect an RC queue pair to this one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub lid: u16,
    pub qpn: u32,
    pub psn: u32,
    /// All zero on InfiniBand without a GRH; RoCE needs it.
    pub gid: [u8; 16],
}

impl Endpoint {
    pub const WIRE_LEN: usize = 2 + 4 + 4 + 16;

    pub fn to_wire(&self) -> [u8; Self::WIRE_LEN] {
        let mut b = [0u8; Self::WIRE_LEN];
        b[..2].copy_from_slice(&self.lid.to_le_bytes());
        b[2..6].copy_from_slice(&self.qpn.to_le_bytes());
        b[6..10].copy_from_slice(&self.psn.to_le_bytes());
        b[10..].copy_from_slice(&self.gid);
        b
    }

    pub fn from_wire(b: &[u8; Self::WIRE_LEN]) -> Self {
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[10..]);
        Self {
            lid: u16::from_le_bytes([b[0], b[1]]),
            qpn: u32::from_le_bytes([b[2], b[3], b[4], b[5]]),
            psn: u32::from_le_bytes([b[6], b[7], b[8], b[9]]),
            gid,
        }
    }
}

/// Bytes the other side may READ: an address in the producer's registered region, its rkey
/// and the length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteSlice {
    pub addr: u64,
    pub rkey: u32,
    pub len: u32,
}

impl RemoteSlice {
    pub const WIRE_LEN: usize = 16;

    pub fn to_wire(&self) -> [u8; Self::WIRE_LEN] {
        let mut b = [0u8; Self::WIRE_LEN];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.rkey.to_le_bytes());
        b[12..].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub fn from_wire(b: &[u8; Self::WIRE_LEN]) -> Self {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        Self {
            addr: u64::from_le_bytes(a),
            rkey: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            len: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }
}

/// One READ: `remote` into the local region at `local_offset`.
#[derive(Clone, Copy, Debug)]
pub struct ReadOp {
    pub remote: RemoteSlice,
    pub local_offset: usize,
}

/// A memory region registered with the device (pinned), readable by peers holding its rkey.
#[allow(clippy::len_without_is_empty)] // never empty: a region is registered for bytes
pub trait Region: Send + Sync {
    /// The address peers use for byte 0 of the region.
    fn addr(&self) -> u64;
    fn rkey(&self) -> u32;
    /// The key this side's own work requests name the region by.
    fn lkey(&self) -> u32;
    fn len(&self) -> usize;
    /// Copies `data` into the region at `offset` (the producer staging a block).
    fn write(&self, offset: usize, data: &[u8]);
    /// Copies `len` bytes out of the region at `offset` (the consumer taking a landed block).
    fn read(&self, offset: usize, len: usize) -> Vec<u8>;
}

/// An RC queue pair: created in INIT, connected to one peer, then used for READs.
pub trait QueuePair: Send {
    fn endpoint(&self) -> Endpoint;
    /// Moves the pair to RTR then RTS towards `remote`.
    fn connect(&mut self, remote: &Endpoint) -> Result<(), RdmaError>;
    /// Posts every READ of `ops` into `local` and waits for all of them (at most `timeout`):
    /// one result per op (a failed op names the work completion's status).
    fn read(
        &mut self,
        local: &dyn Region,
        ops: &[ReadOp],
        timeout: std::time::Duration,
    ) -> Result<Vec<Result<(), String>>, RdmaError>;
}

/// A verbs device (or a model of one).
pub trait Fabric: Send + Sync {
    /// For logs: the device's name.
    fn name(&self) -> String;
    /// A zeroed region of `len` bytes registered for local writes and remote reads.
    fn register(&self, len: usize) -> Result<Arc<dyn Region>, RdmaError>;
    /// A new RC queue pair (INIT).
    fn queue_pair(&self) -> Result<Box<dyn QueuePair>, RdmaError>;
}

// ----------------------------------------------------------------------------------------
// The in-process model.

/// An in-process model of an RC fabric shared by every [`LoopbackFabric`] made from it.
/// Nodes can be killed ([`LoopbackNet::kill`]) or set to die after a number of READs they
/// serve, to test a producer that disappears mid-transfer.
#[derive(Default)]
pub struct LoopbackNet {
    next: AtomicU32,
    regions: Mutex<HashMap<u32, (u32, Arc<LoopRegion>)>>,
    /// qpn → (node, connected peer qpn).
    qps: Mutex<HashMap<u32, (u32, Option<u32>)>>,
    dead: Mutex<Vec<u32>>,
    /// node → READs it serves before it dies.
    die_after: Mutex<HashMap<u32, usize>>,
    /// READs served, in total.
    pub reads: std::sync::atomic::AtomicU64,
}

impl LoopbackNet {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            next: AtomicU32::new(1),
            ..Default::default()
        })
    }

    /// A device attached to this net: a node of its own.
    pub fn fabric(self: &Arc<Self>) -> Arc<dyn Fabric> {
        Arc::new(LoopbackFabric {
            net: self.clone(),
            node: self.next.fetch_add(1, Relaxed),
        })
    }

    /// The node of `fabric` (made by [`LoopbackNet::fabric`]) stops answering: its regions
    /// and pairs are gone, as when its process dies.
    pub fn kill(&self, node: u32) {
        self.dead.lock().unwrap().push(node);
    }

    /// Regions registered on this net so far.
    pub fn regions(&self) -> usize {
        self.regions.lock().unwrap().len()
    }

    /// Node `node` dies after serving `reads` more READs.
    pub fn die_after(&self, node: u32, reads: usize) {
        self.die_after.lock().unwrap().insert(node, reads);
    }

    /// The node numbers in creation order: the first fabric made is node 1.
    fn alive(&self, node: u32) -> bool {
        !self.dead.lock().unwrap().contains(&node)
    }

    fn read_one(&self, qpn: u32, op: &ReadOp, local: &dyn Region) -> Result<(), String> {
        let (node, peer) = *self.qps.lock().unwrap().get(&qpn).ok_or("QP destroyed")?;
        let peer = peer.ok_or("QP not connected (INIT)")?;
        let (peer_node, peer_back) = *self
            .qps
            .lock()
            .unwrap()
            .get(&peer)
            .ok_or("RETRY_EXC_ERR: the peer's QP is gone")?;
        if !self.alive(peer_node) || !self.alive(node) {
            return Err("RETRY_EXC_ERR: the peer does not answer".into());
        }
        if peer_back != Some(qpn) {
            return Err("RETRY_EXC_ERR: the peer's QP is not connected to this one".into());
        }
        let region = self
            .regions
            .lock()
            .unwrap()
            .get(&op.remote.rkey)
            .filter(|(n, _)| *n == peer_node)
            .map(|(_, r)| r.clone())
            .ok_or("REM_ACCESS_ERR: no region under that rkey on the peer")?;
        let start = op
            .remote
            .addr
            .checked_sub(region.addr())
            .ok_or("REM_ACCESS_ERR: address below the region")? as usize;
        let len = op.remote.len as usize;
        if start.checked_add(len).is_none_or(|e| e > region.len()) {
            return Err("REM_ACCESS_ERR: read past the end of the region".into());
        }
        if op
            .local_offset
            .checked_add(len)
            .is_none_or(|e| e > local.len())
        {
            return Err("LOC_LEN_ERR: the local region is too small".into());
        }
        {
            let mut die = self.die_after.lock().unwrap();
            if let Some(n) = die.get_mut(&peer_node) {
                if *n == 0 {
                    self.dead.lock().unwrap().push(peer_node);
                    return Err("RETRY_EXC_ERR: the peer does not answer".into());
                }
                *n -= 1;
            }
        }
        local.write(op.local_offset, &region.read(start, len));
        self.reads.fetch_add(1, Relaxed);
        Ok(())
    }
}

struct LoopbackFabric {
    net: Arc<LoopbackNet>,
    node: u32,
}

impl Fabric for LoopbackFabric {
    fn name(&self) -> String {
        format!("loopback node {}", self.node)
    }

    fn register(&self, len: usize) -> Result<Arc<dyn Region>, RdmaError> {
        let rkey = self.net.next.fetch_add(1, Relaxed);
        let r = Arc::new(LoopRegion {
            // Distinct, nonzero base addresses per region, as a real device's would be.
            addr: (rkey as u64) << 32,
            rkey,
            bytes: Mutex::new(vec![0; len]),
        });
        self.net
            .regions
            .lock()
            .unwrap()
            .insert(rkey, (self.node, r.clone()));
        Ok(r)
    }

    fn queue_pair(&self) -> Result<Box<dyn QueuePair>, RdmaError> {
        let qpn = self.net.next.fetch_add(1, Relaxed);
        self.net.qps.lock().unwrap().insert(qpn, (self.node, None));
        Ok(Box::new(LoopQp {
            net: self.net.clone(),
            qpn,
            node: self.node,
        }))
    }
}

/// The node number of a fabric made by [`LoopbackNet::fabric`] (from its name).
pub fn loopback_node(fabric: &dyn Fabric) -> Option<u32> {
    fabric.name().strip_prefix("loopback node ")?.parse().ok()
}

struct LoopRegion {
    addr: u64,
    rkey: u32,
    bytes: Mutex<Vec<u8>>,
}

impl Region for LoopRegion {
    fn addr(&self) -> u64 {
        self.addr
    }
    fn rkey(&self) -> u32 {
        self.rkey
    }
    fn lkey(&self) -> u32 {
        self.rkey
    }
    fn len(&self) -> usize {
        self.bytes.lock().unwrap().len()
    }
    fn write(&self, offset: usize, data: &[u8]) {
        self.bytes.lock().unwrap()[offset..offset + data.len()].copy_from_slice(data);
    }
    fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        self.bytes.lock().unwrap()[offset..offset + len].to_vec()
    }
}

struct LoopQp {
    net: Arc<LoopbackNet>,
    qpn: u32,
    node: u32,
}

impl Drop for LoopQp {
    fn drop(&mut self) {
        self.net.qps.lock().unwrap().remove(&self.qpn);
    }
}

impl QueuePair for LoopQp {
    fn endpoint(&self) -> Endpoint {
        Endpoint {
            lid: self.node as u16,
            qpn: self.qpn,
            psn: self.qpn & 0xff_ffff,
            gid: [0; 16],
        }
    }

    fn connect(&mut self, remote: &Endpoint) -> Result<(), RdmaError> {
        let mut qps = self.net.qps.lock().unwrap();
        let me = qps
            .get_mut(&self.qpn)
            .ok_or_else(|| RdmaError::Failed("QP destroyed".into()))?;
        me.1 = Some(remote.qpn);
        Ok(())
    }

    fn read(
        &mut self,
        local: &dyn Region,
        ops: &[ReadOp],
        _timeout: std::time::Duration,
    ) -> Result<Vec<Result<(), String>>, RdmaError> {
        Ok(ops
            .iter()
            .map(|op| self.net.read_one(self.qpn, op, local))
            .collect())
    }
}

// ----------------------------------------------------------------------------------------
// The host's HCA.

/// Which verbs device and port to use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceChoice {
    /// `mlx5_0` and the like; the first device when `None`.
    pub device: Option<String>,
    /// The HCA port (1 when `None`).
    pub port: Option<u8>,
    /// The GID index (0 when `None`; RoCE v2 deployments usually need 3).
    pub gid_index: Option<u8>,
}

/// Opens the verbs device `choice` names. Without the `rdma` cargo feature this is always an
/// error saying so.
#[cfg(not(feature = "rdma"))]
pub fn open_device(choice: &DeviceChoice) -> Result<Arc<dyn Fabric>, RdmaError> {
    let _ = choice;
    Err(RdmaError::NoDevice(
        "this llmd was built without RDMA support: rebuild with `cargo build --features rdma`"
            .into(),
    ))
}

#[cfg(feature = "rdma")]
pub use hca::open_device;

#[cfg(feature = "rdma")]
mod hca {
    use super::*;
    use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
    use sideway::ibverbs::completion::{GenericCompletionQueue, WorkCompletionStatus};
    use sideway::ibverbs::device::{DeviceInfo, DeviceList};
    use sideway::ibverbs::device_context::{DeviceContext, Mtu};
    use sideway::ibverbs::memory_region::MemoryRegion;
    use sideway::ibverbs::protection_domain::ProtectionDomain;
    use sideway::ibverbs::queue_pair::{
        ExtendedQueuePair, PostSendGuard, QueuePair as _, QueuePairAttribute, QueuePairState,
        SetScatterGatherEntry, WorkRequestFlags,
    };
    use sideway::ibverbs::AccessFlags;
    use std::time::{Duration, Instant};

    /// Most READs in flight on one pair (the responder's usual `max_qp_rd_atom` is 16).
    const READS_IN_FLIGHT: u32 = 16;
    const SEND_DEPTH: u32 = 256;

    fn verbs<E: std::error::Error + Send + Sync + 'static>(
        what: &'static str,
    ) -> impl FnOnce(E) -> RdmaError {
        move |e| RdmaError::Verbs {
            what,
            source: Box::new(e),
        }
    }

    pub fn open_device(choice: &DeviceChoice) -> Result<Arc<dyn Fabric>, RdmaError> {
        let list = DeviceList::new().map_err(|e| {
            RdmaError::NoDevice(format!(
                "libibverbs gave no device list ({e}): is rdma-core installed and is there an \
                 InfiniBand/RoCE device under /sys/class/infiniband?"
            ))
        })?;
        let names: Vec<String> = list.iter().map(|d| d.name()).collect();
        let device = match &choice.device {
            Some(want) => list.iter().find(|d| &d.name() == want).ok_or_else(|| {
                RdmaError::NoDevice(format!("no verbs device {want:?} (found {names:?})"))
            })?,
            None => list.iter().next().ok_or_else(|| {
                RdmaError::NoDevice(
                    "no verbs device on this machine (/sys/class/infiniband is empty)".into(),
                )
            })?,
        };
        let name = device.name();
        let context = device.open().map_err(verbs("opening the device"))?;
        let pd = context.alloc_pd().map_err(verbs("allocating a PD"))?;
        let port = choice.port.unwrap_or(1);
        let gid_index = choice.gid_index.unwrap_or(0);
        let port_attr = context
            .query_port(port)
            .map_err(verbs("querying the port"))?;
        let gid = context
            .query_gid(port, gid_index.into())
            .map_err(verbs("querying the GID"))?;
        Ok(Arc::new(Hca {
            name,
            context,
            pd,
            port,
            gid_index,
            lid: port_attr.lid(),
            mtu: port_attr.active_mtu(),
            gid,
        }))
    }

    struct Hca {
        name: String,
        context: Arc<DeviceContext>,
        pd: Arc<ProtectionDomain>,
        port: u8,
        gid_index: u8,
        lid: u16,
        mtu: Mtu,
        gid: Gid,
    }

    /// Host memory registered with the HCA (so pinned), page-aligned.
    struct HostRegion {
        ptr: *mut u8,
        len: usize,
        layout: std::alloc::Layout,
        /// Taken in `drop`: deregistered before the memory is freed.
        mr: Option<Arc<MemoryRegion>>,
    }

    // The buffer is owned by the region and only touched through bounds-checked copies.
    unsafe impl Send for HostRegion {}
    unsafe impl Sync for HostRegion {}

    impl Drop for HostRegion {
        fn drop(&mut self) {
            drop(self.mr.take());
            unsafe { std::alloc::dealloc(self.ptr, self.layout) };
        }
    }

    impl Region for HostRegion {
        fn addr(&self) -> u64 {
            self.ptr as u64
        }
        fn rkey(&self) -> u32 {
            self.mr.as_ref().map_or(0, |m| m.rkey())
        }
        fn lkey(&self) -> u32 {
            self.mr.as_ref().map_or(0, |m| m.lkey())
        }
        fn len(&self) -> usize {
            self.len
        }
        fn write(&self, offset: usize, data: &[u8]) {
            assert!(offset + data.len() <= self.len, "write past the region");
            unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(offset), data.len())
            }
        }
        fn read(&self, offset: usize, len: usize) -> Vec<u8> {
            assert!(offset + len <= self.len, "read past the region");
            let mut out = vec![0u8; len];
            unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), out.as_mut_ptr(), len) };
            out
        }
    }

    impl Fabric for Hca {
        fn name(&self) -> String {
            format!("{} port {}", self.name, self.port)
        }

        fn register(&self, len: usize) -> Result<Arc<dyn Region>, RdmaError> {
            let layout = std::alloc::Layout::from_size_align(len.max(1), 4096)
                .map_err(|e| RdmaError::Failed(format!("a region of {len} bytes: {e}")))?;
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
            if ptr.is_null() {
                return Err(RdmaError::Failed(format!("out of memory for {len} bytes")));
            }
            let mr = unsafe {
                self.pd.reg_mr(
                    ptr as usize,
                    len.max(1),
                    AccessFlags::LocalWrite | AccessFlags::RemoteRead,
                )
            };
            let mr = match mr {
                Ok(mr) => mr,
                Err(e) => {
                    unsafe { std::alloc::dealloc(ptr, layout) };
                    return Err(verbs("registering memory")(e));
                }
            };
            Ok(Arc::new(HostRegion {
                ptr,
                len,
                layout,
                mr: Some(mr),
            }))
        }

        fn queue_pair(&self) -> Result<Box<dyn QueuePair>, RdmaError> {
            let cq = self
                .context
                .create_cq_builder()
                .setup_cqe(SEND_DEPTH)
                .build_ex()
                .map_err(verbs("creating a CQ"))?;
            let handle = GenericCompletionQueue::from(Arc::clone(&cq));
            let mut qp = self
                .pd
                .create_qp_builder()
                .setup_send_cq(handle.clone())
                .setup_recv_cq(handle.clone())
                .setup_max_send_wr(SEND_DEPTH)
                .setup_max_recv_wr(1)
                .setup_max_send_sge(1)
                .build_ex()
                .map_err(verbs("creating a QP"))?;
            let mut attr = QueuePairAttribute::new();
            attr.setup_state(QueuePairState::Init)
                .setup_pkey_index(0)
                .setup_port(self.port)
                .setup_access_flags(AccessFlags::LocalWrite | AccessFlags::RemoteRead);
            qp.modify(&attr).map_err(verbs("moving the QP to INIT"))?;
            let psn = rand_psn(qp.qp_number());
            let mut gid = [0u8; 16];
            gid.copy_from_slice(&std::net::Ipv6Addr::from(self.gid).octets());
            Ok(Box::new(HcaQp {
                qp,
                cq: handle,
                endpoint: Endpoint {
                    lid: self.lid,
                    qpn: 0,
                    psn,
                    gid,
                },
                port: self.port,
                gid_index: self.gid_index,
                mtu: self.mtu,
            }))
        }
    }

    fn rand_psn(qpn: u32) -> u32 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        (t ^ qpn.rotate_left(8)) & 0xff_ffff
    }

    struct HcaQp {
        qp: ExtendedQueuePair,
        cq: GenericCompletionQueue,
        endpoint: Endpoint,
        port: u8,
        gid_index: u8,
        mtu: Mtu,
    }

    impl QueuePair for HcaQp {
        fn endpoint(&self) -> Endpoint {
            Endpoint {
                qpn: self.qp.qp_number(),
                ..self.endpoint
            }
        }

        fn connect(&mut self, remote: &Endpoint) -> Result<(), RdmaError> {
            let mut attr = QueuePairAttribute::new();
            attr.setup_state(QueuePairState::ReadyToReceive)
                .setup_path_mtu(self.mtu)
                .setup_dest_qp_num(remote.qpn)
                .setup_rq_psn(remote.psn)
                .setup_max_dest_read_atomic(READS_IN_FLIGHT as u8)
                .setup_min_rnr_timer(12);
            let mut ah = AddressHandleAttribute::new();
            ah.setup_dest_lid(remote.lid)
                .setup_port(self.port)
                .setup_service_level(0);
            if remote.gid != [0; 16] {
                let gid = Gid::from(std::net::Ipv6Addr::from(remote.gid));
                ah.setup_grh_src_gid_index(self.gid_index)
                    .setup_grh_dest_gid(&gid)
                    .setup_grh_hop_limit(1);
            }
            attr.setup_address_vector(&ah);
            self.qp
                .modify(&attr)
                .map_err(verbs("moving the QP to RTR"))?;
            let mut attr = QueuePairAttribute::new();
            attr.setup_state(QueuePairState::ReadyToSend)
                .setup_sq_psn(self.endpoint.psn)
                .setup_timeout(14)
                .setup_retry_cnt(7)
                .setup_rnr_retry(7)
                .setup_max_read_atomic(READS_IN_FLIGHT as u8);
            self.qp
                .modify(&attr)
                .map_err(verbs("moving the QP to RTS"))?;
            Ok(())
        }

        fn read(
            &mut self,
            local: &dyn Region,
            ops: &[ReadOp],
            timeout: Duration,
        ) -> Result<Vec<Result<(), String>>, RdmaError> {
            let lkey = local.lkey();
            let mut results: Vec<Option<Result<(), String>>> = vec![None; ops.len()];
            let (mut posted, mut done) = (0usize, 0usize);
            let deadline = Instant::now() + timeout;
            while done < ops.len() {
                while posted < ops.len() && posted - done < READS_IN_FLIGHT as usize {
                    let op = ops[posted];
                    if op.local_offset + op.remote.len as usize > local.len() {
                        results[posted] = Some(Err("LOC_LEN_ERR: landing region too small".into()));
                        posted += 1;
                        done += 1;
                        continue;
                    }
                    let mut guard = self.qp.start_post_send();
                    let wr = guard
                        .construct_wr(posted as u64, WorkRequestFlags::Signaled)
                        .setup_read(op.remote.rkey, op.remote.addr);
                    unsafe {
                        wr.setup_sge(lkey, local.addr() + op.local_offset as u64, op.remote.len)
                    };
                    guard.post().map_err(verbs("posting a READ"))?;
                    posted += 1;
                }
                let before = done;
                if let Ok(mut poller) = self.cq.start_poll() {
                    for wc in poller.by_ref() {
                        let i = wc.wr_id() as usize;
                        let status = wc.status();
                        let r = if status == WorkCompletionStatus::Success as u32 {
                            Ok(())
                        } else {
                            Err(format!(
                                "work completion {:?}",
                                WorkCompletionStatus::from(status)
                            ))
                        };
                        if let Some(slot) = results.get_mut(i) {
                            if slot.is_none() {
                                *slot = Some(r);
                                done += 1;
                            }
                        }
                    }
                }
                if done == before {
                    std::thread::yield_now();
                }
                if Instant::now() > deadline {
                    return Err(RdmaError::Failed(format!(
                        "{} of {} READs still pending after {timeout:?}",
                        ops.len() - done,
                        ops.len()
                    )));
                }
            }
            Ok(results
                .into_iter()
                .map(|r| r.unwrap_or_else(|| Err("never completed".into())))
                .collect())
        }
    }
}
