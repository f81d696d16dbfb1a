//! Mixture-of-experts MLPs on the device (`kernels/moe.cu`): the router GEMM (cuBLAS, f32
//! logits), routing, the permutation of (row, expert) pairs by expert, one grouped GEMM launch
//! per projection over every expert, and the combine.
//!
//! Nothing is read back to the host and every launch's geometry depends only on the row count,
//! so MoE layers are captured in decode graphs like the rest. Invariants:
//! - the scratch is allocated once, for `max_tokens` rows, when [`CudaBackend::reserve`] is told
//!   the MoE shape (before the KV cache is sized); it never moves after, so captured graphs
//!   stay valid (a backend used without `reserve`, as the tests do, grows it eagerly);
//! - the experts stay where they were uploaded (bf16, one weight each); the grouped GEMMs find
//!   them through a device table of their addresses, built once per set of experts (the first
//!   step of a model is always eager, so never during a capture).
use super::{CudaBackend, CudaBuffer, CudaWeight};
use crate::backend::{BackendResult, MoeLimits, MoeWeights};
use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use std::collections::HashMap;

/// Rows of a grouped-GEMM tile (`MOE_BM` in `kernels/moe.cu`).
const TILE_ROWS: usize = 64;
/// Output columns of a `moe_down_bf16` tile (`MOE_BN`); `moe_gate_up_bf16` covers half as many
/// intermediate columns (their gate and up rows).
const TILE_COLS: usize = 64;
/// Most experts the routing and permutation kernels hold (`MOE_MAX_EXPERTS`).
const MAX_EXPERTS: usize = 256;
/// Most blocks along a grid's y.
const MAX_GRID_Y: usize = 65535;

/// Routing and expert buffers for up to `rows` rows of one MoE shape.
pub(super) struct MoeScratch {
    rows: usize,
    shape: MoeLimits,
    /// `[rows, experts]` router logits.
    logits: CudaSlice<f32>,
    /// `[rows * top_k]` each row's experts, most probable first, and their weights.
    topk_ids: CudaSlice<i32>,
    topk_w: CudaSlice<f32>,
    /// `[experts + 1]` each expert's first sorted position, and its first tile.
    expert_offsets: CudaSlice<i32>,
    tile_offsets: CudaSlice<i32>,
    /// `[rows * top_k]` the pair (row * top_k + k) at each sorted position.
    sorted_pairs: CudaSlice<i32>,
    /// `[rows * top_k, intermediate]` silu(gate) * up, in sorted order.
    act: CudaSlice<u16>,
    /// `[rows * top_k, hidden]` each pair's weighted expert output, in pair order.
    y: CudaSlice<u16>,
}

impl MoeScratch {
    fn holds(&self, rows: usize, shape: MoeLimits) -> bool {
        let s = self.shape;
        rows <= self.rows
            && shape.num_experts <= s.num_experts
            && shape.top_k <= s.top_k
            && shape.hidden <= s.hidden
            && shape.intermediate <= s.intermediate
    }
}

/// Device tables of each expert's `gate_up` and `down` address (`[experts]` u64 each).
pub(super) struct ExpertTables {
    gate_up: CudaSlice<u64>,
    down: CudaSlice<u64>,
}

/// The MoE scratch and the expert tables, keyed by the experts' addresses (gate_up, then down):
/// a table's contents are its key, so a key reused by later weights still reads correctly.
#[derive(Default)]
pub(super) struct MoeState {
    scratch: Option<MoeScratch>,
    tables: HashMap<Vec<u64>, ExpertTables>,
}

/// The shape of `moe`, or why the kernels cannot run it.
fn checked_shape(moe: &MoeWeights<CudaWeight>) -> Result<MoeLimits, String> {
    let shape = MoeLimits {
        num_experts: moe.gate_up.len(),
        top_k: moe.top_k,
        hidden: moe.hidden,
        intermediate: moe.intermediate,
    };
    let (n, h, i) = (shape.num_experts, shape.hidden, shape.intermediate);
    if !(1..=MAX_EXPERTS).contains(&n) || moe.down.len() != n {
        return Err(format!(
            "{n} gate_up and {} down experts (1 to {MAX_EXPERTS}, as many of each)",
            moe.down.len()
        ));
    }
    if !(1..=n).contains(&moe.top_k) || h == 0 || i == 0 {
        return Err(format!(
            "top_k {} of {n} experts, hidden {h}, intermediate {i}",
            moe.top_k
        ));
    }
    let bad = |w: &CudaWeight, want: [usize; 2]| w.shape != want;
    if bad(&moe.router, [n, h])
        || moe.gate_up.iter().any(|w| bad(w, [2 * i, h]))
        || moe.down.iter().any(|w| bad(w, [h, i]))
    {
        return Err(format!(
            "weights of router [{n}, {h}], gate_up [{}, {h}] and down [{h}, {i}] expected",
            2 * i
        ));
    }
    Ok(shape)
}

/// Grid rows of the grouped GEMMs: every expert's tiles together, for the worst split of
/// `rows * top_k` pairs (each expert gets at most `rows`, and rounds up to one tile).
fn max_tiles(rows: usize, shape: MoeLimits) -> usize {
    let pairs = rows * shape.top_k;
    (pairs.div_ceil(TILE_ROWS) + shape.num_experts)
        .min(shape.num_experts * rows.div_ceil(TILE_ROWS))
}

impl CudaBackend {
    /// Makes the MoE scratch hold `rows` rows of `shape` (the largest of what it held and
    /// this, so that layers of different shapes share it).
    pub(super) fn grow_moe_scratch(
        &self,
        state: &mut MoeState,
        rows: usize,
        shape: MoeLimits,
    ) -> BackendResult<()> {
        if state.scratch.as_ref().is_some_and(|s| s.holds(rows, shape)) {
            return Ok(());
        }
        let (rows, shape) = match &state.scratch {
            Some(s) => (
                rows.max(s.rows),
                MoeLimits {
                    num_experts: shape.num_experts.max(s.shape.num_experts),
                    top_k: shape.top_k.max(s.shape.top_k),
                    hidden: shape.hidden.max(s.shape.hidden),
                    intermediate: shape.intermediate.max(s.shape.intermediate),
                },
            ),
            None => (rows, shape),
        };
        // Drop the old buffers first: their memory is what the new ones will reuse.
        state.scratch = None;
        let pairs = rows * shape.top_k;
        let oom = |what: &'static str, bytes: usize| crate::backend::BackendError::OutOfMemory {
            device: "cuda",
            what,
            bytes,
        };
        let s = &self.stream;
        macro_rules! alloc {
            ($t:ty, $n:expr, $what:literal) => {{
                let n: usize = ($n).max(1);
                s.alloc_zeros::<$t>(n)
                    .map_err(|_| oom($what, n * std::mem::size_of::<$t>()))?
            }};
        }
        state.scratch = Some(MoeScratch {
            rows,
            shape,
            logits: alloc!(f32, rows * shape.num_experts, "MoE router logits"),
            topk_ids: alloc!(i32, pairs, "MoE routing"),
            topk_w: alloc!(f32, pairs, "MoE routing"),
            expert_offsets: alloc!(i32, shape.num_experts + 1, "MoE routing"),
            tile_offsets: alloc!(i32, shape.num_experts + 1, "MoE routing"),
            sorted_pairs: alloc!(i32, pairs, "MoE routing"),
            act: alloc!(u16, pairs * shape.intermediate, "MoE expert activations"),
            y: alloc!(u16, pairs * shape.hidden, "MoE expert outputs"),
        });
        Ok(())
    }

    /// The device tables of `moe`'s expert addresses, uploaded the first time they are seen.
    fn expert_tables<'a>(
        &self,
        tables: &'a mut HashMap<Vec<u64>, ExpertTables>,
        moe: &MoeWeights<CudaWeight>,
    ) -> Option<&'a ExpertTables> {
        let mut key = Vec::with_capacity(2 * moe.gate_up.len());
        for w in moe.gate_up.iter().chain(&moe.down) {
            let d = self.bf16_weight(w, "moe")?;
            key.push(d.device_ptr(&self.stream).0);
        }
        if !tables.contains_key(&key) {
            let (gate_up, down) = key.split_at(moe.gate_up.len());
            let uploaded = self.htod(gate_up).and_then(|g| Ok((g, self.htod(down)?)));
            match uploaded {
                Ok((gate_up, down)) => {
                    tables.insert(key.clone(), ExpertTables { gate_up, down });
                }
                Err(e) => {
                    self.record("moe expert tables", e);
                    return None;
                }
            }
        }
        tables.get(&key)
    }

    /// [`crate::backend::Backend::moe`]: `out[r] = Σ_k w[r, k] · expert_{e[r, k]}(x[r])` for the
    /// first `rows` rows.
    pub(super) fn moe_forward(
        &self,
        x: &CudaBuffer,
        moe: &MoeWeights<CudaWeight>,
        rows: usize,
        out: &mut CudaBuffer,
    ) {
        if rows == 0 {
            return;
        }
        let shape = match checked_shape(moe) {
            Ok(s) => s,
            Err(why) => return self.record("moe", why),
        };
        let tiles = max_tiles(rows, shape);
        if tiles > MAX_GRID_Y {
            return self.record("moe", format!("{tiles} row tiles (at most {MAX_GRID_Y})"));
        }
        let Some(router) = self.bf16_weight(&moe.router, "moe router") else {
            return;
        };
        let Ok(mut state) = self.moe.lock() else {
            return self.record("moe", "scratch lock poisoned");
        };
        // Sized at `reserve` for the largest step; grown here only without it.
        let capacity = self.limits.map_or(rows, |l| l.max_tokens.max(rows));
        if let Err(e) = self.grow_moe_scratch(&mut state, capacity, shape) {
            return self.record("moe scratch", e);
        }
        let MoeState { scratch, tables } = &mut *state;
        let Some(tables) = self.expert_tables(tables, moe) else {
            return;
        };
        let Some(s) = scratch.as_mut() else {
            return;
        };
        let (n_exp, top_k) = (shape.num_experts, shape.top_k);
        let (hidden, inter) = (shape.hidden, shape.intermediate);
        {
            let (xp, _gx) = x.device_ptr(&self.stream);
            let (lp, _gl) = s.logits.device_ptr_mut(&self.stream);
            // SAFETY: x holds rows·hidden bf16 values, the router n_exp·hidden, the logits
            // scratch at least rows·n_exp f32 (grown above).
            let r = unsafe {
                self.gemm_nt(
                    router,
                    (n_exp, hidden),
                    xp,
                    lp,
                    blas_sys::cudaDataType::CUDA_R_32F,
                    rows,
                )
            };
            if let Err(e) = r {
                return self.record("moe router", e);
            }
        }
        let (rows_i, n_exp_i, top_k_i) = (rows as i32, n_exp as i32, top_k as i32);
        let (hidden_i, inter_i, pairs_i) = (hidden as i32, inter as i32, (rows * top_k) as i32);
        let renorm = i32::from(moe.renormalize);

        let mut b = self.stream.launch_builder(self.func("moe_route"));
        b.arg(&s.logits)
            .arg(&rows_i)
            .arg(&n_exp_i)
            .arg(&top_k_i)
            .arg(&renorm)
            .arg(&mut s.topk_ids)
            .arg(&mut s.topk_w);
        // SAFETY: matches `moe_route`; 4 rows (warps) per block, n_exp <= MAX_EXPERTS.
        if let Err(e) = unsafe { b.launch(Self::rows(rows.div_ceil(4), 128)) } {
            return self.record("moe_route", e);
        }

        let mut b = self.stream.launch_builder(self.func("moe_permute"));
        b.arg(&s.topk_ids)
            .arg(&pairs_i)
            .arg(&n_exp_i)
            .arg(&mut s.expert_offsets)
            .arg(&mut s.tile_offsets)
            .arg(&mut s.sorted_pairs);
        // SAFETY: matches `moe_permute`: one block of its 512 threads; ids are < n_exp.
        if let Err(e) = unsafe { b.launch(Self::rows(1, 512)) } {
            return self.record("moe_permute", e);
        }

        let gemm = |cols: usize| LaunchConfig {
            grid_dim: (cols as u32, tiles as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(self.func("moe_gate_up_bf16"));
        b.arg(x)
            .arg(&tables.gate_up)
            .arg(&s.sorted_pairs)
            .arg(&s.expert_offsets)
            .arg(&s.tile_offsets)
            .arg(&mut s.act)
            .arg(&n_exp_i)
            .arg(&top_k_i)
            .arg(&hidden_i)
            .arg(&inter_i);
        // SAFETY: matches `moe_gate_up_bf16`; the tables hold n_exp addresses of [2·inter,
        // hidden] weights (checked above), act holds rows·top_k·inter values; tiles past the
        // last expert's leave.
        if let Err(e) = unsafe { b.launch(gemm(inter.div_ceil(TILE_COLS / 2))) } {
            return self.record("moe_gate_up_bf16", e);
        }

        let mut b = self.stream.launch_builder(self.func("moe_down_bf16"));
        b.arg(&s.act)
            .arg(&tables.down)
            .arg(&s.sorted_pairs)
            .arg(&s.expert_offsets)
            .arg(&s.tile_offsets)
            .arg(&s.topk_w)
            .arg(&mut s.y)
            .arg(&n_exp_i)
            .arg(&hidden_i)
            .arg(&inter_i);
        // SAFETY: matches `moe_down_bf16`; down weights are [hidden, inter], y holds
        // rows·top_k·hidden values.
        if let Err(e) = unsafe { b.launch(gemm(hidden.div_ceil(TILE_COLS))) } {
            return self.record("moe_down_bf16", e);
        }

        let mut b = self.stream.launch_builder(self.func("moe_combine_bf16"));
        b.arg(&s.y).arg(&mut *out).arg(&top_k_i).arg(&hidden_i);
        // SAFETY: matches `moe_combine_bf16`; out holds rows·hidden values.
        if let Err(e) = unsafe { b.launch(Self::rows(rows, 256)) } {
            self.record("moe_combine_bf16", e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiles `moe_permute` hands out (each expert's pairs rounded up to whole tiles) never
    /// exceed the grid, however rows pick their distinct experts.
    #[test]
    fn the_gemm_grid_covers_every_routing() {
        let mut seed = 1u64;
        let mut next = |n: usize| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize % n
        };
        for n in [1, 2, 4, 8, 64, 128] {
            for k in [1, 2, 8].into_iter().filter(|&k| k <= n) {
                let shape = MoeLimits {
                    num_experts: n,
                    top_k: k,
                    hidden: 1,
                    intermediate: 1,
                };
                for rows in [1, 2, 7, 63, 64, 65, 300, 4096] {
                    for skew in [1, 2, n] {
                        // Rows draw from the first `skew.max(k)` experts: all pairs on few
                        // experts, or spread over all.
                        let pool = skew.max(k).min(n);
                        let mut counts = vec![0usize; n];
                        for _ in 0..rows {
                            let mut chosen = Vec::new();
                            while chosen.len() < k {
                                let e = next(pool);
                                if !chosen.contains(&e) {
                                    chosen.push(e);
                                }
                            }
                            for e in chosen {
                                counts[e] += 1;
                            }
                        }
                        let tiles: usize = counts.iter().map(|c| c.div_ceil(TILE_ROWS)).sum();
                        assert!(
                            tiles <= max_tiles(rows, shape),
                            "experts {n} top_k {k} rows {rows} skew {skew}: {tiles} tiles"
                        );
                    }
                }
            }
        }
    }
}
