//! The choice of GEMM for decode-sized matmuls: cuBLAS, or the skinny kernel of
//! `kernels/gemm.cu` that streams the weight once at the device's bandwidth for a few rows.
use super::{CudaBackend, KernelChoice};

/// Most rows the skinny kernel takes (`gemm_skinny_m16_bf16`).
pub const SKINNY_MAX_ROWS: usize = 16;
/// Threads of a skinny-GEMM block (`SK_WARPS` warps).
pub(super) const SKINNY_THREADS: u32 = 8 * 32;

/// The GEMM of matmuls of at most [`SKINNY_MAX_ROWS`] rows (larger ones are always cuBLAS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeGemm {
    /// cuBLAS `gemmEx` (bf16 in, f32 accumulate), as for every other matmul. At batch 1 on an
    /// H200 the 8B shape's decode step reached 0.64× the bandwidth roofline with it.
    Cublas = 0,
    /// `gemm_skinny_m{8,16}_bf16`: tensor cores with the weight as the A operand, 16-byte
    /// loads, split-K in a fixed order (a row's result does not depend on the batch). Written
    /// without a GPU: not yet run on hardware, so opt-in.
    Skinny = 1,
}

impl KernelChoice for DecodeGemm {
    const ALL: &'static [Self] = &[DecodeGemm::Cublas, DecodeGemm::Skinny];
    const ENV: &'static str = "LLMD_DECODE_GEMM";

    fn name(self) -> &'static str {
        match self {
            DecodeGemm::Cublas => "cublas",
            DecodeGemm::Skinny => "skinny",
        }
    }
}

/// The skinny kernel for `m` rows of a `k`-wide reduction, None when cuBLAS runs it (too many
/// rows, or rows that are not 16-byte multiples).
pub(super) fn skinny_entry(gemm: DecodeGemm, m: usize, k: usize) -> Option<&'static str> {
    if gemm != DecodeGemm::Skinny || m == 0 || !k.is_multiple_of(8) {
        return None;
    }
    match m {
        1..=8 => Some("gemm_skinny_m8_bf16"),
        9..=SKINNY_MAX_ROWS => Some("gemm_skinny_m16_bf16"),
        _ => None,
    }
}

impl CudaBackend {
    /// [`skinny_entry`] with this backend's choice.
    pub(super) fn skinny_kernel(&self, m: usize, k: usize) -> Option<&'static str> {
        skinny_entry(self.decode_gemm(), m, k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skinny_kernel_takes_few_aligned_rows_when_chosen() {
        use DecodeGemm::*;
        assert_eq!(skinny_entry(Cublas, 1, 4096), None);
        assert_eq!(skinny_entry(Skinny, 1, 4096), Some("gemm_skinny_m8_bf16"));
        assert_eq!(skinny_entry(Skinny, 8, 64), Some("gemm_skinny_m8_bf16"));
        assert_eq!(skinny_entry(Skinny, 9, 64), Some("gemm_skinny_m16_bf16"));
        assert_eq!(skinny_entry(Skinny, 16, 64), Some("gemm_skinny_m16_bf16"));
        assert_eq!(skinny_entry(Skinny, 17, 64), None);
        assert_eq!(skinny_entry(Skinny, 0, 64), None);
        assert_eq!(
            skinny_entry(Skinny, 4, 4100),
            None,
            "rows of 4100 bf16 are not 16-byte multiples"
        );
    }

    /// The variable picks a choice by name, unset is the default, and any other value is an
    /// error naming the variable and the choices.
    #[test]
    fn the_environment_picks_the_kernel() {
        std::env::remove_var(DecodeGemm::ENV);
        assert_eq!(DecodeGemm::from_env().unwrap(), DecodeGemm::Cublas);
        std::env::set_var(DecodeGemm::ENV, "skinny");
        assert_eq!(DecodeGemm::from_env().unwrap(), DecodeGemm::Skinny);
        std::env::set_var(DecodeGemm::ENV, "fast");
        let e = DecodeGemm::from_env().unwrap_err().to_string();
        std::env::remove_var(DecodeGemm::ENV);
        assert!(
            e.contains("LLMD_DECODE_GEMM=\"fast\": expected cublas or skinny"),
            "{e}"
        );
    }
}
