//! Whole KV blocks between the device's caches and the host, many at once (the tiers' offload
//! and loads, P/D sends): a gather kernel packs every layer's K and V of the blocks into one
//! device staging buffer and one copy moves it through a page-locked host buffer (a scatter
//! kernel the other way), instead of two small pageable copies per block and layer.
//!
//! Both staging buffers are allocated on first use at [`KV_STAGING_BYTES`] (or one block, if
//! larger) and kept; more blocks than fit go in several rounds.

use super::{driver_err, CudaBackend, CudaKvCache};
use crate::backend::{kv_piece_bytes, Backend, BackendError, BackendResult};
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PinnedHostSlice, PushKernelArg};

/// Bytes of each staging buffer (device and host): 64 MiB, a few dozen blocks of an 8B model,
/// inside the headroom the KV cache's sizing leaves (`--gpu-memory-utilization`).
pub const KV_STAGING_BYTES: usize = 64 << 20;

/// The staging buffers, allocated on first use.
#[derive(Default)]
pub(super) struct KvStaging {
    buffers: Option<(CudaSlice<u16>, PinnedHostSlice<u16>)>,
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
        let block_elems = caches.len() * 2 * n;
        let per_round = (KV_STAGING_BYTES / 2 / block_elems).max(1);
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
            .buffers
            .as_ref()
            .is_none_or(|(d, _)| d.len() < per_round * block_elems)
        {
            staging.buffers = None;
            let len = per_round * block_elems;
            let dev = self
                .stream
                .alloc_zeros::<u16>(len)
                .map_err(|e| driver_err("allocating the KV staging buffer", e))?;
            // SAFETY: the buffer is only read where a copy has written it. Plain page-locked
            // memory (cached): the host reads it back, which write-combined memory makes slow.
            let pinned = unsafe { self.stream.context().alloc_pinned_with_flags::<u16>(len, 0) }
                .map_err(|e| driver_err("allocating the pinned KV staging buffer", e))?;
            staging.buffers = Some((dev, pinned));
        }
        let (dev, pinned) = staging.buffers.as_mut().expect("allocated above");
        let layers = caches.len() as i32;
        let n_arg = n as i64;
        for (round, ids) in blocks.chunks(per_round).enumerate() {
            let elems = ids.len() * block_elems;
            let bytes = 2 * elems;
            let at = round * per_round * block_elems * 2;
            let ids32: Vec<i32> = ids.iter().map(|&b| b as i32).collect();
            let ids_dev = self.htod(&ids32)?;
            let cfg = LaunchConfig {
                grid_dim: ((ids.len() * caches.len() * 2) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let host_buf = pinned
                .as_mut_slice()
                .map_err(|e| driver_err("waiting for the pinned KV buffer", e))?;
            let host_buf = &mut host_buf[..elems];
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
                    // addresses, every block was checked in range and `dev` holds `elems`.
                    unsafe { b.launch(cfg) }.map_err(|e| driver_err("gathering KV blocks", e))?;
                    self.stream
                        .memcpy_dtoh(&dev.slice(..elems), host_buf)
                        .map_err(|e| driver_err("copying KV blocks to the host", e))?;
                    self.synchronize()?;
                    out[at..at + bytes].copy_from_slice(bytemuck::cast_slice(host_buf));
                }
                HostBytes::In(data) => {
                    bytemuck::cast_slice_mut::<u16, u8>(host_buf)
                        .copy_from_slice(&data[at..at + bytes]);
                    self.stream
                        .memcpy_htod(host_buf, &mut dev.slice_mut(..elems))
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
                    // The pinned buffer is rewritten by the next round: the copy must be done.
                    self.synchronize()?;
                }
            }
        }
        Ok(())
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
