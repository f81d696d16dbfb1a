//! STUB (helper A implements).
use crate::request::TokenId;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BlockHashAlgo {
    #[default]
    Xxh3_64,
    Sha256Cbor64,
}

pub fn hash_block(
    _algo: BlockHashAlgo,
    _parent: Option<BlockHash>,
    _tokens: &[TokenId],
    _extra_keys: &[String],
) -> BlockHash {
    todo!()
}
