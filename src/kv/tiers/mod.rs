//! The KV tiers below the device pool: host memory, local disk, and a remote key-value server
//! shared by workers. Each holds checksummed block records ([`super::block_record`]) by block
//! hash.
//!
//! A tier is a [`Storage`]; [`Tier`] names it (and its KV-event `medium`). The host and disk
//! tiers form a chain: what the host tier evicts moves to disk, what disk evicts is gone. The
//! remote tier is written through (every block stored below the device goes there too), so
//! another worker can load it.
//!
//! Invariants: a store's capacity is counted in whole records and never exceeded; `get` returns
//! the stored bytes or nothing — checking them is the reader's job (`block_record::decode`),
//! and a record that fails the check is removed by the reader.
pub mod disk;
pub mod host;
pub mod remote;

pub use disk::DiskStore;
pub use host::HostStore;
pub use remote::{redact_url, RemoteOptions, RemotePassword, RemoteStore};

use super::{BlockHash, Medium};
use std::path::PathBuf;

/// Which tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    Host,
    Disk,
    Remote,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Host, Tier::Disk, Tier::Remote];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Host => "host",
            Tier::Disk => "disk",
            Tier::Remote => "remote",
        }
    }

    /// The KV-event medium; None for the remote tier, which is shared, not this worker's.
    pub fn medium(self) -> Option<Medium> {
        match self {
            Tier::Host => Some(Medium::Cpu),
            Tier::Disk => Some(Medium::Disk),
            Tier::Remote => None,
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// What the tiers hold and where (vLLM's `--kv-offloading-size`, `--kv-offloading-backend`,
/// plus our disk and remote flags). All off by default.
#[derive(Clone, Default)]
pub struct TierConfig {
    /// Host tier capacity in bytes (0: no host tier).
    pub host_bytes: usize,
    /// Directory of the disk tier (None: no disk tier).
    pub disk_path: Option<PathBuf>,
    /// Disk tier capacity in bytes.
    pub disk_bytes: u64,
    /// `redis[s]://[user[:password]@]host:port[/db]` of the remote tier (None: no remote
    /// tier). Printed only through [`remote::redact_url`].
    pub remote_url: Option<String>,
    /// The remote tier's password, TLS trust and record authentication.
    pub remote: RemoteOptions,
    /// Blocks that may wait for the tier thread at most (0: [`DEFAULT_QUEUE_BLOCKS`]); past
    /// it, newly committed blocks are not stored (counted), so a slow tier never blocks the
    /// engine or grows memory without bound.
    pub queue_blocks: usize,
    /// Load from every tier whatever the measured costs say (tests and benchmarks that must
    /// exercise a tier; production leaves the decision to the measurement).
    pub always_load: bool,
}

/// Default of [`TierConfig::queue_blocks`].
pub const DEFAULT_QUEUE_BLOCKS: usize = 256;

impl std::fmt::Debug for TierConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TierConfig")
            .field("host_bytes", &self.host_bytes)
            .field("disk_path", &self.disk_path)
            .field("disk_bytes", &self.disk_bytes)
            .field("remote_url", &self.remote_url.as_deref().map(redact_url))
            .field("remote", &self.remote)
            .field("queue_blocks", &self.queue_blocks)
            .field("always_load", &self.always_load)
            .finish()
    }
}

impl TierConfig {
    pub fn is_enabled(&self) -> bool {
        self.host_bytes > 0 || self.disk_path.is_some() || self.remote_url.is_some()
    }

    /// [`Self::queue_blocks`], its default applied.
    pub fn queue_capacity(&self) -> usize {
        if self.queue_blocks == 0 {
            DEFAULT_QUEUE_BLOCKS
        } else {
            self.queue_blocks
        }
    }
}

/// A tier failed to store or read (I/O, network). The caller degrades to recompute.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    #[error("{tier:?} tier I/O on {what}: {source}")]
    Io {
        tier: Tier,
        what: String,
        source: std::io::Error,
    },
    #[error("remote tier {url}: {reason}")]
    Remote { url: String, reason: String },
    #[error("{0}")]
    Config(String),
}

/// One tier's store of records by block hash.
pub trait Storage: Send {
    fn tier(&self) -> Tier;
    /// Stores `record` under `hash` (replacing an equal one). Returns the records evicted to
    /// make room, least recently used first, for the next tier down.
    fn put(
        &mut self,
        hash: BlockHash,
        record: Vec<u8>,
    ) -> Result<Vec<(BlockHash, Vec<u8>)>, TierError>;
    /// The stored bytes of `hash` (unchecked), marking it recently used.
    fn get(&mut self, hash: &BlockHash) -> Result<Option<Vec<u8>>, TierError>;
    /// Drops `hash` (a record that failed its check).
    fn remove(&mut self, hash: &BlockHash);
    /// Records held now, and at most.
    fn len(&self) -> usize;
    fn capacity(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Least-recently-used order over block hashes, O(log n) per touch.
#[derive(Default)]
pub(crate) struct LruOrder {
    tick: u64,
    by_tick: std::collections::BTreeMap<u64, BlockHash>,
    tick_of: std::collections::HashMap<BlockHash, u64>,
}

impl LruOrder {
    /// Marks `h` most recently used (inserting it).
    pub fn touch(&mut self, h: BlockHash) {
        if let Some(t) = self.tick_of.insert(h, self.tick) {
            self.by_tick.remove(&t);
        }
        self.by_tick.insert(self.tick, h);
        self.tick += 1;
    }

    pub fn remove(&mut self, h: &BlockHash) {
        if let Some(t) = self.tick_of.remove(h) {
            self.by_tick.remove(&t);
        }
    }

    /// Takes the least recently used hash out.
    pub fn pop_oldest(&mut self) -> Option<BlockHash> {
        let (_, h) = self.by_tick.pop_first()?;
        self.tick_of.remove(&h);
        Some(h)
    }

    pub fn contains(&self, h: &BlockHash) -> bool {
        self.tick_of.contains_key(h)
    }

    pub fn len(&self) -> usize {
        self.tick_of.len()
    }

    /// Every hash, least recently used first.
    pub fn in_order(&self) -> Vec<BlockHash> {
        self.by_tick.values().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_pops_least_recently_touched() {
        let mut l = LruOrder::default();
        let h = |i: u8| BlockHash([i; 32]);
        for i in 0..4 {
            l.touch(h(i));
        }
        l.touch(h(0));
        l.remove(&h(2));
        assert_eq!(l.len(), 3);
        assert_eq!(l.pop_oldest(), Some(h(1)));
        assert_eq!(l.pop_oldest(), Some(h(3)));
        assert_eq!(l.pop_oldest(), Some(h(0)));
        assert_eq!(l.pop_oldest(), None);
    }
}
