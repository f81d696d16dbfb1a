//! STUB (helper D implements).
pub fn matmul_nt(_x: &[f32], _w: &[f32], _out: &mut [f32], _m: usize, _k: usize, _n: usize) {
    todo!()
}
