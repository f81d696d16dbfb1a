//! STUB (helper A implements).
use super::{BlockHashAlgo, BlockId, PrefixCacheStats};
use crate::request::{RequestId, TokenId};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ComputedBlocks {
    pub blocks: Vec<BlockId>,
    pub num_computed_tokens: usize,
}

pub struct KvCacheManager {}

impl KvCacheManager {
    pub fn new(
        _num_blocks: usize,
        _block_size: usize,
        _enable_caching: bool,
        _algo: BlockHashAlgo,
    ) -> Self {
        todo!()
    }
    pub fn block_size(&self) -> usize {
        todo!()
    }
    pub fn get_computed_blocks(
        &mut self,
        _req: &RequestId,
        _tokens: &[TokenId],
        _extra_keys: &[String],
    ) -> ComputedBlocks {
        todo!()
    }
    pub fn allocate_slots(
        &mut self,
        _req: &RequestId,
        _tokens: &[TokenId],
        _num_computed_tokens: usize,
        _num_new_tokens: usize,
        _new_computed: &ComputedBlocks,
        _extra_keys: &[String],
    ) -> bool {
        todo!()
    }
    pub fn free(&mut self, _req: &RequestId) {
        todo!()
    }
    pub fn block_table(&self, _req: &RequestId) -> &[BlockId] {
        todo!()
    }
    pub fn num_free_blocks(&self) -> usize {
        todo!()
    }
    pub fn num_total_blocks(&self) -> usize {
        todo!()
    }
    pub fn usage(&self) -> f32 {
        todo!()
    }
    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        todo!()
    }
}
