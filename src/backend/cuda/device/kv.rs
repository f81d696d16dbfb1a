//! Whole KV blocks between the device's caches and the host, many at once (the tiers' offload
//! and loads, P/D sends): a gather kernel packs every layer's K and V of the blocks into one
//! device staging buffer and one copy moves it (a scatter kernel the other way), instead of
//! two small copies per block and layer.
//!
//! - Synchronous reads and writes ([`Backend::read_kv_blocks`], [`Backend::write_kv_blocks`];
//!   P/D sends, tier loads) copy straight to or from the caller's pageable memory, which the
//!   driver pipelines through its own page-locked buffers.
//! - Asynchronous reads ([`Backend::read_kv_blocks_async`]; the tiers' offload after each step)
//!   copy on a second stream into a page-locked slot and return at once: the steps' stream goes
//!   on with the next step while the copy runs, and the tier thread waits on the copy's event.
//!   Before the staging buffer is written again the steps' stream waits for the last copy to
//!   have read it. Reads larger than one slot, or with every slot in use, are synchronous.
//!
//! The staging buffer is allocated on first use at [`KV_STAGING_BYTES`] (or one block, if
//! larger) and kept; more blocks than fit go in several rounds. Slots are made on first use,
//! at most [`KV_PINNED_SLOTS`] of [`KV_STAGING_BYTES`], and kept.

use super::{driver_err, CudaBackend, CudaKvCache};
use crate::backend::{
    kv_piece_bytes, Backend, BackendError, BackendResult, PendingKvRead, ReadyKvRead,
};
use cudarc::driver::{
    result, sys, CudaEvent, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PinnedHostSlice,
    PushKernelArg,
};
use std::sync::{Arc, Mutex, MutexGuard};

/// Bytes of the device staging buffer and of each page-locked slot: 64 MiB, 32 blocks of an
/// 8B model. The device buffer lies outside the KV cache's sizing, inside the headroom it
/// leaves (`--gpu-memory-utilization`).
pub const KV_STAGING_BYTES: usize = 64 << 20;

/// Page-locked slots asynchronous reads may hold at once.
pub const KV_PINNED_SLOTS: usize = 4;

/// The staging buffer, the copy stream and the page-locked slots, made on first use.
#[derive(Default)]
pub(super) struct KvStaging {
    buffer: Option<CudaSlice<u8>>,
    /// The stream asynchronous reads copy to the host on.
    copy_stream: Option<Arc<CudaStream>>,
    /// Recorded after the last asynchronous copy out of the staging buffer.
    copied: Option<CudaEvent>,
    /// Slots free for asynchronous reads (shared with the reads in flight, which give theirs
    /// back), and how many were made.
    slots: Arc<Mutex<Vec<PinnedHostSlice<u8>>>>,
    slots_made: usize,
}

/// What one batched copy moves, checked.
struct Plan {
    op: &'static str,
    /// Elements of one layer's K (or V) of one block.
    n: usize,
    /// Bytes of one block over all layers.
    block_bytes: usize,
    /// Blocks per round of the staging buffer.
    per_round: usize,
    /// Each layer's K and V addresses, `[layers][2]`.
    table: CudaSlice<u64>,
}

impl CudaBackend {
    /// [`Backend::read_kv_blocks_async`] on the device.
    pub(super) fn read_kv_blocks_started(
        &self,
        caches: &[CudaKvCache],
        blocks: &[usize],
        bytes: usize,
    ) -> BackendResult<Box<dyn PendingKvRead>> {
        let at_once = || -> BackendResult<Box<dyn PendingKvRead>> {
            let mut out = vec![0u8; bytes];
            self.copy_kv_blocks(caches, blocks, HostBytes::Out(&mut out))?;
            Ok(Box::new(ReadyKvRead(out)))
        };
        if bytes > KV_STAGING_BYTES {
            return at_once();
        }
        let Some(plan) = self.kv_plan("read_kv_blocks", caches, blocks, bytes)? else {
            return Ok(Box::new(ReadyKvRead(Vec::new())));
        };
        let mut staging = self.staging(&plan)?;
        let Some(mut slot) = self.free_slot(&mut staging)? else {
            drop(staging);
            return at_once();
        };
        let copy = match &staging.copy_stream {
            Some(s) => s.clone(),
            None => {
                let s = self
                    .stream
                    .context()
                    .new_stream()
                    .map_err(|e| driver_err("creating the KV copy stream", e))?;
                staging.copy_stream = Some(s.clone());
                s
            }
        };
        let dev = staging.buffer.as_mut().expect("allocated by staging()");
        self.gather(&plan, blocks, dev)?;
        let started = (|| {
            let gathered = self.stream.record_event(None)?;
            copy.wait(&gathered)?;
            let (src, _guard) = dev.device_ptr(&copy);
            let dst = slot.as_mut_slice()?;
            // SAFETY: `dst` is page-locked memory that the handle keeps (it goes back to the
            // free slots only once the copy's event is done); `src` holds `bytes` gathered
            // bytes, ordered before the copy by the event above.
            unsafe { result::memcpy_dtoh_async(&mut dst[..bytes], src, copy.cu_stream()) }?;
            let blocking = Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC);
            Ok::<_, cudarc::driver::DriverError>((
                copy.record_event(None)?,
                copy.record_event(blocking)?,
            ))
        })();
        match started {
            Ok((copied, done)) => {
                staging.copied = Some(copied);
                Ok(Box::new(CudaKvRead {
                    done,
                    slot: Some(slot),
                    bytes,
                    slots: staging.slots.clone(),
                }))
            }
            Err(e) => {
                // The slot may be in use by a copy that failed half-way: it is not reused.
                std::mem::forget(slot);
                Err(driver_err("starting a KV copy to the host", e))
            }
        }
    }

    /// Checks a batched copy of `bytes` and uploads its address table; `None` when there is
    /// nothing to copy.
    fn kv_plan(
        &self,
        op: &'static str,
        caches: &[CudaKvCache],
        blocks: &[usize],
        bytes: usize,
    ) -> BackendResult<Option<Plan>> {
        let Some(piece) = kv_piece_bytes(op, caches.len(), blocks, bytes)? else {
            return Ok(None);
        };
        // Every layer's cache has the first one's shape, and every block is in range with
        // pieces of exactly one layer's K and V.
        let dims = caches[0].dims;
        if let Some(c) = caches.iter().find(|c| c.dims != dims) {
            return Err(BackendError::Shape {
                op,
                expected: format!("every layer's cache {dims:?}"),
                got: format!("{:?}", c.dims),
            });
        }
        for &b in blocks {
            dims.check_block(op, b, piece, Self::KV_ELEMENT_BYTES)?;
        }
        self.take_error()?;
        let block_bytes = caches.len() * piece;
        let mut addrs = Vec::with_capacity(2 * caches.len());
        for c in caches {
            addrs.push(c.k.device_ptr(&self.stream).0);
            addrs.push(c.v.device_ptr(&self.stream).0);
        }
        Ok(Some(Plan {
            op,
            n: dims.block_numel(),
            block_bytes,
            per_round: (KV_STAGING_BYTES / block_bytes).max(1),
            table: self.htod(&addrs)?,
        }))
    }

    /// The staging state, its device buffer large enough for a round of `plan`, and the steps'
    /// stream ordered after the last asynchronous copy out of it.
    fn staging(&self, plan: &Plan) -> BackendResult<MutexGuard<'_, KvStaging>> {
        let mut staging = self
            .kv_staging
            .lock()
            .map_err(|_| driver_err(plan.op, "staging lock poisoned"))?;
        let len = plan.per_round * plan.block_bytes;
        if staging.buffer.as_ref().is_none_or(|d| d.len() < len) {
            staging.buffer = None;
            staging.buffer = Some(
                self.stream
                    .alloc_zeros::<u8>(len)
                    .map_err(|e| driver_err("allocating the KV staging buffer", e))?,
            );
        }
        if let Some(ev) = &staging.copied {
            self.stream
                .wait(ev)
                .map_err(|e| driver_err("ordering after a KV copy", e))?;
        }
        Ok(staging)
    }

    /// A free page-locked slot, made if fewer than [`KV_PINNED_SLOTS`] exist; `None` when all
    /// are held by reads in flight.
    fn free_slot(&self, staging: &mut KvStaging) -> BackendResult<Option<PinnedHostSlice<u8>>> {
        let free = staging.slots.lock().ok().and_then(|mut s| s.pop());
        if free.is_some() || staging.slots_made >= KV_PINNED_SLOTS {
            return Ok(free);
        }
        // SAFETY: only the bytes a copy wrote are ever read. Plain page-locked memory
        // (cached): the host reads it back, which write-combined memory makes slow.
        let slot = unsafe {
            self.stream
                .context()
                .alloc_pinned_with_flags::<u8>(KV_STAGING_BYTES, 0)
        }
        .map_err(|e| driver_err("allocating a page-locked KV slot", e))?;
        staging.slots_made += 1;
        Ok(Some(slot))
    }

    /// Packs `blocks` (one round) into `dev` on the steps' stream.
    fn gather(&self, plan: &Plan, blocks: &[usize], dev: &mut CudaSlice<u8>) -> BackendResult<()> {
        self.launch_kv_pieces("gather_kv_blocks_bf16", plan, blocks, dev)
    }

    /// `gather_kv_blocks_bf16` or `scatter_kv_blocks_bf16` over one round of `blocks`.
    fn launch_kv_pieces(
        &self,
        kernel: &str,
        plan: &Plan,
        blocks: &[usize],
        dev: &mut CudaSlice<u8>,
    ) -> BackendResult<()> {
        let layers = (plan.table.len() / 2) as i32;
        let n = plan.n as i64;
        let ids: Vec<i32> = blocks.iter().map(|&b| b as i32).collect();
        let ids = self.htod(&ids)?;
        let cfg = LaunchConfig {
            grid_dim: ((blocks.len() * 2 * layers as usize) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(self.func(kernel));
        b.arg(&plan.table).arg(&ids).arg(&layers).arg(&n).arg(dev);
        // SAFETY: matches both kernels' signature; the table holds each layer's K and V
        // addresses, every block was checked in range by `kv_plan`, and `dev` holds a round.
        unsafe { b.launch(cfg) }.map_err(|e| driver_err(kernel, e))?;
        Ok(())
    }

    /// [`Backend::read_kv_blocks`] (`host` the bytes out) or [`Backend::write_kv_blocks`]
    /// (the bytes in) on the device, synchronously.
    pub(super) fn copy_kv_blocks(
        &self,
        caches: &[CudaKvCache],
        blocks: &[usize],
        mut host: HostBytes<'_>,
    ) -> BackendResult<()> {
        let op = match host {
            HostBytes::Out(_) => "read_kv_blocks",
            HostBytes::In(_) => "write_kv_blocks",
        };
        let Some(plan) = self.kv_plan(op, caches, blocks, host.len())? else {
            return Ok(());
        };
        let mut staging = self.staging(&plan)?;
        let dev = staging.buffer.as_mut().expect("allocated by staging()");
        for (round, ids) in blocks.chunks(plan.per_round).enumerate() {
            let bytes = ids.len() * plan.block_bytes;
            let at = round * plan.per_round * plan.block_bytes;
            match &mut host {
                HostBytes::Out(out) => {
                    self.gather(&plan, ids, dev)?;
                    // To pageable memory the copy returns once it is done.
                    self.stream
                        .memcpy_dtoh(&dev.slice(..bytes), &mut out[at..at + bytes])
                        .map_err(|e| driver_err("copying KV blocks to the host", e))?;
                }
                HostBytes::In(data) => {
                    // From pageable memory the copy returns once the source is read; the
                    // scatter is ordered after it on the stream.
                    self.stream
                        .memcpy_htod(&data[at..at + bytes], &mut dev.slice_mut(..bytes))
                        .map_err(|e| driver_err("copying KV blocks to the device", e))?;
                    self.launch_kv_pieces("scatter_kv_blocks_bf16", &plan, ids, dev)?;
                }
            }
        }
        self.synchronize()
    }
}

/// An asynchronous read in flight: its slot goes back to the free ones once its copy is done.
struct CudaKvRead {
    done: CudaEvent,
    slot: Option<PinnedHostSlice<u8>>,
    bytes: usize,
    slots: Arc<Mutex<Vec<PinnedHostSlice<u8>>>>,
}

impl CudaKvRead {
    /// Waits for the copy; the slot, to give back, or the error.
    fn finish(&mut self) -> BackendResult<PinnedHostSlice<u8>> {
        let slot = self.slot.take().expect("finished once");
        match self.done.synchronize() {
            Ok(()) => Ok(slot),
            Err(e) => {
                // A failed copy may still be writing it: never reused.
                std::mem::forget(slot);
                Err(driver_err("copying KV blocks to the host", e))
            }
        }
    }

    fn give_back(&self, slot: PinnedHostSlice<u8>) {
        if let Ok(mut free) = self.slots.lock() {
            free.push(slot);
        }
    }
}

impl PendingKvRead for CudaKvRead {
    fn wait(mut self: Box<Self>) -> BackendResult<Vec<u8>> {
        let slot = self.finish()?;
        let bytes = slot
            .as_slice()
            .map(|s| s[..self.bytes].to_vec())
            .map_err(|e| driver_err("reading a page-locked KV slot", e));
        self.give_back(slot);
        bytes
    }
}

impl Drop for CudaKvRead {
    fn drop(&mut self) {
        if self.slot.is_some() {
            if let Ok(slot) = self.finish() {
                self.give_back(slot);
            }
        }
    }
}

/// The host side of a synchronous batched copy.
pub(super) enum HostBytes<'a> {
    Out(&'a mut [u8]),
    In(&'a [u8]),
}

impl HostBytes<'_> {
    fn len(&self) -> usize {
        match self {
            HostBytes::Out(b) => b.len(),
            HostBytes::In(b) => b.len(),
        }
    }
}
