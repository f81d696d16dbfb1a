//! The environment knobs shared by the benches (each uses a subset, hence the allowance).
#![allow(dead_code)]

/// `name` parsed as a number, else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    env_or(name, default)
}

/// `name` parsed as a `T`, else `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether the model `name` is among `LLMD_BENCH_MODELS` (comma-separated name prefixes; all
/// when unset).
pub fn model_selected(name: &str) -> bool {
    match std::env::var("LLMD_BENCH_MODELS") {
        Ok(v) => v.split(',').any(|w| name.starts_with(w)),
        Err(_) => true,
    }
}
