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
    /// `token_ids[i * block_size..(i + 1) * block_size]` and was hashed with `extra_keys[i]`
    /// (a first block's cache salt; empty, nil on the wire, for the others); the first block's
    /// parent is `parent_block_hash` (None for a sequence's first block).
    BlockStored {
        block_hashes: Vec<u64>,
        parent_block_hash: Option<u64>,
        token_ids: Vec<u32>,
        block_size: usize,
        medium: Medium,
        extra_keys: Vec<Vec<String>>,
    },
    /// The blocks are no longer held by this tier.
    BlockRemoved {
        block_hashes: Vec<u64>,
        medium: Medium,
    },
    /// Every block of every tier was dropped (prefix cache reset).
    AllBlocksCleared,
}

/// One block for [`stored_in_runs`]: its hash, its parent's (None for a sequence's first
/// block), its tokens and its extra keys.
pub type StoredBlock<'a> = (
    super::BlockHash,
    Option<super::BlockHash>,
    &'a [u32],
    &'a [String],
);

/// `BlockStored` events for `blocks` in `medium`: one per run of consecutive blocks that chain
/// (each the parent of the next), as vLLM sends a sequence's new blocks, with the run's
/// first parent and all its tokens.
pub fn stored_in_runs(
    blocks: &[StoredBlock<'_>],
    block_size: usize,
    medium: Medium,
) -> Vec<KvEvent> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < blocks.len() {
        let mut j = i + 1;
        while j < blocks.len() && blocks[j].1 == Some(blocks[j - 1].0) {
            j += 1;
        }
        let run = &blocks[i..j];
        out.push(KvEvent::BlockStored {
            block_hashes: run.iter().map(|b| b.0.external()).collect(),
            parent_block_hash: run[0].1.map(|p| p.external()),
            token_ids: run.iter().flat_map(|b| b.2.iter().copied()).collect(),
            block_size,
            medium,
            extra_keys: run.iter().map(|b| b.3.to_vec()).collect(),
        });
        i = j;
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::BlockHash;

    #[test]
    fn stored_blocks_are_grouped_by_chain() {
        let h = |i: u8| BlockHash([i; 32]);
        let (t1, t2, t3) = ([1u32, 2], [3u32, 4], [5u32, 6]);
        // 1 → 2 chain, then 3 from another sequence (its parent is 9, not 2).
        let salt = ["s".to_string()];
        let blocks = [
            (h(1), None, &t1[..], &salt[..]),
            (h(2), Some(h(1)), &t2[..], &[][..]),
            (h(3), Some(h(9)), &t3[..], &[][..]),
        ];
        let ev = stored_in_runs(&blocks, 2, Medium::Cpu);
        assert_eq!(
            ev,
            vec![
                KvEvent::BlockStored {
                    block_hashes: vec![h(1).external(), h(2).external()],
                    parent_block_hash: None,
                    token_ids: vec![1, 2, 3, 4],
                    block_size: 2,
                    medium: Medium::Cpu,
                    extra_keys: vec![salt.to_vec(), Vec::new()],
                },
                KvEvent::BlockStored {
                    block_hashes: vec![h(3).external()],
                    parent_block_hash: Some(h(9).external()),
                    token_ids: vec![5, 6],
                    block_size: 2,
                    medium: Medium::Cpu,
                    extra_keys: vec![Vec::new()],
                },
            ]
        );
        assert!(stored_in_runs(&[], 2, Medium::Gpu).is_empty());
    }
}
