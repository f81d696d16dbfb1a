//! Whole KV blocks between the device's caches and the host, many at once (the tiers' offload
//! and loads, P/D sends): a gather kernel packs every layer's K and V of the blocks into one
//! device staging buffer and one copy moves it to the caller's buffer (a scatter kernel the
//! other way), instead of two small copies per block and layer. The copy goes straight to the
//! caller's (pageable) memory, which the driver pipelines through its own page-locked buffers;
//! a page-locked slab owned by the host tier, copied into asynchronously, is the next step.
//!
//! The staging buffer is allocated on first use at [`KV_STAGING_BYTES`] (or one block, if
//! larger) and kept; more blocks than fit go in several rounds.

use super::{driver_err, CudaBackend, CudaKvCache};
use crate::backend::{kv_piece_bytes, Backend, BackendError, BackendResult};
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

/// Bytes of the device staging buffer: 64 MiB, 32 blocks of an 8B model, inside the headroom
/// the KV cache's sizing leaves (`--gpu-memory-utilization`).
pub const KV_STAGING_BYTES: usize = 64 << 20;

/// The staging buffer, allocated on first use.
#[derive(Default)]
pub(super) struct KvStaging {
    buffer: Option<CudaSlice<u8>>,
}

impl CudaBackend {
    /// [`Backend::read_kv_blocks`] on the device.
    pub(super) fn read_kv_blocks_packed(
        &self,
        caches: &[CudaKvCache],
        blocks: &[usize],
        out: &mut [u8],
    ) -> BackendResult<()> {
        self.copy_kv_blocks(caches, blocks, HostBytes::Out(out))
    }

    /// [`Backend::write_kv_blocks`] on the device.
    pub(super) fn write_kv_blocks_packed(
        &self,
        caches: &[CudaKvCache],
        blocks: &[usize],
        data: &[u8],
    ) -> BackendResult<()> {
        self.copy_kv_blocks(caches, blocks, HostBytes::In(data))
    }

    fn copy_kv_blocks(
        &self,
        caches: &[CudaKvCache],
        blocks: &[usize],
        mut host: HostBytes<'_>,
    ) -> BackendResult<()> {
        let op = match host {
            HostBytes::Out(_) => "read_kv_blocks",
            HostBytes::In(_) => "write_kv_blocks",
        };
        let Some(piece) = kv_piece_bytes(op, caches.len(), blocks, host.len())? else {
            return Ok(());
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
        let n = dims.block_numel();
        let block_bytes = caches.len() * piece;
        let per_round = (KV_STAGING_BYTES / block_bytes).max(1);
        let mut addrs = Vec::with_capacity(2 * caches.len());
        for c in caches {
            addrs.push(c.k.device_ptr(&self.stream).0);
            addrs.push(c.v.device_ptr(&self.stream).0);
        }
        let table = self.htod(&addrs)?;
        let mut staging = self
            .kv_staging
            .lock()
            .map_err(|_| driver_err(op, "staging lock poisoned"))?;
        if staging
            .buffer
            .as_ref()
            .is_none_or(|d| d.len() < per_round * block_bytes)
        {
            staging.buffer = None;
            staging.buffer = Some(
                self.stream
                    .alloc_zeros::<u8>(per_round * block_bytes)
                    .map_err(|e| driver_err("allocating the KV staging buffer", e))?,
            );
        }
        let dev = staging.buffer.as_mut().expect("allocated above");
        let layers = caches.len() as i32;
        let n_arg = n as i64;
        for (round, ids) in blocks.chunks(per_round).enumerate() {
            let bytes = ids.len() * block_bytes;
            let at = round * per_round * block_bytes;
            let ids32: Vec<i32> = ids.iter().map(|&b| b as i32).collect();
            let ids_dev = self.htod(&ids32)?;
            let cfg = LaunchConfig {
                grid_dim: ((ids.len() * caches.len() * 2) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            match &mut host {
                HostBytes::Out(out) => {
                    let mut b = self
                        .stream
                        .launch_builder(self.func("gather_kv_blocks_bf16"));
                    b.arg(&table)
                        .arg(&ids_dev)
                        .arg(&layers)
                        .arg(&n_arg)
                        .arg(&mut *dev);
                    // SAFETY: matches `gather_kv_blocks_bf16`; the table holds each layer's K and V
                    // addresses, every block was checked in range and `dev` holds `bytes`.
                    unsafe { b.launch(cfg) }.map_err(|e| driver_err("gathering KV blocks", e))?;
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
                    let mut b = self
                        .stream
                        .launch_builder(self.func("scatter_kv_blocks_bf16"));
                    b.arg(&*dev)
                        .arg(&ids_dev)
                        .arg(&layers)
                        .arg(&n_arg)
                        .arg(&table);
                    // SAFETY: matches `scatter_kv_blocks_bf16`, as the gather above.
                    unsafe { b.launch(cfg) }.map_err(|e| driver_err("scattering KV blocks", e))?;
                }
            }
        }
        self.synchronize()
    }
}

/// The host side of a batched copy.
enum HostBytes<'a> {
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
