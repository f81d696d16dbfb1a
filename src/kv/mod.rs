//! The paged KV cache's bookkeeping (pure Rust, device-agnostic): block hashing for prefix
//! caching, the block pool that owns physical blocks, and the per-request cache manager.
//! The device memory holding K/V lives in the backend; this module only hands out block ids.
pub mod auth;
pub mod block_hash;
pub mod block_pool;
pub mod block_record;
pub mod connector;
pub mod events;
pub mod kv_cache_manager;
pub mod tiers;
pub mod transfer;

pub use block_hash::{BlockHash, BlockHashAlgo, BlockHasher};
pub use block_pool::{BlockPool, PrefixCacheStats};
pub use events::{KvEvent, KvEventSink, Medium};
pub use kv_cache_manager::{CommittedBlock, ComputedBlocks, KvCacheManager};

/// Index of a physical KV block: `[block_id, block_size, kv_heads, head_dim]` in each layer's
/// K and V cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("unknown block hash algorithm {0:?} (expected xxh3_64 or sha256_cbor)")]
    UnknownHashAlgo(String),
}
