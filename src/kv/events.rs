//! KV cache events: which blocks each tier of this worker holds, as vLLM publishes them
//! (`vllm/distributed/kv_events.py`), so llm-d's KV-cache indexer can route by prefix.
//!
//! The engine collects the events of each step (blocks published on the device, evicted from
//! it, moved between tiers) and hands them, as one batch, to a [`KvEventSink`]; the ZMQ
//! publisher (`server::kv_events`) encodes them in vLLM's wire format.

/// The tier a block lives in, spelled as vLLM's `medium` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Medium {
    Gpu,
    Cpu,
    Disk,
}

impl Medium {
    /// vLLM's spelling (`"GPU"`, `"CPU"`); `"DISK"` for the disk tier.
    pub fn as_str(self) -> &'static str {
        match self {
            Medium::Gpu => "GPU",
            Medium::Cpu => "CPU",
            Medium::Disk => "DISK",
        }
    }
}

/// One change to the set of blocks a tier holds. Hashes are the 64-bit external form
/// ([`super::BlockHash::external`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvEvent {
    /// Consecutive blocks of one sequence became available: `block_hashes[i]` covers
    /// `token_ids[i * block_size..(i + 1) * block_size]`; the first block's parent is
    /// `parent_block_hash` (None for a sequence's first block).
    BlockStored {
        block_hashes: Vec<u64>,
        parent_block_hash: Option<u64>,
        token_ids: Vec<u32>,
        block_size: usize,
        medium: Medium,
    },
    /// The blocks are no longer held by this tier.
    BlockRemoved {
        block_hashes: Vec<u64>,
        medium: Medium,
    },
    /// Every block of every tier was dropped (prefix cache reset).
    AllBlocksCleared,
}

/// Where the engine sends each step's events. `publish` must not block the engine: a sink
/// queues the batch and sends it from its own thread.
pub trait KvEventSink: Send + Sync {
    fn publish(&self, events: Vec<KvEvent>);
}

/// A sink that keeps every batch (tests).
#[derive(Default)]
pub struct RecordingSink(pub std::sync::Mutex<Vec<Vec<KvEvent>>>);

impl KvEventSink for RecordingSink {
    fn publish(&self, events: Vec<KvEvent>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(events);
    }
}
