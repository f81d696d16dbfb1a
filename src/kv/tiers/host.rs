//! The host tier: block records in process memory, least recently used evicted first.
//!
//! On the CPU backend this is plain memory; the engine copies a block's bytes out of the
//! device cache into a record and hands it here, so on CUDA the copy out is the device-to-host
//! transfer and this tier only keeps the result.
use super::{LruOrder, Storage, Tier, TierError};
use crate::kv::BlockHash;
use std::collections::HashMap;

pub struct HostStore {
    records: HashMap<BlockHash, Vec<u8>>,
    lru: LruOrder,
    capacity: usize,
}

impl HostStore {
    /// A store of at most `capacity` records.
    pub fn new(capacity: usize) -> Self {
        Self {
            records: HashMap::new(),
            lru: LruOrder::default(),
            capacity,
        }
    }
}

impl Storage for HostStore {
    fn tier(&self) -> Tier {
        Tier::Host
    }

    fn put(
        &mut self,
        hash: BlockHash,
        record: Vec<u8>,
    ) -> Result<Vec<(BlockHash, Vec<u8>)>, TierError> {
        let mut evicted = Vec::new();
        if self.capacity == 0 {
            evicted.push((hash, record));
            return Ok(evicted);
        }
        if !self.records.contains_key(&hash) {
            while self.records.len() >= self.capacity {
                let Some(old) = self.lru.pop_oldest() else {
                    break;
                };
                if let Some(r) = self.records.remove(&old) {
                    evicted.push((old, r));
                }
            }
        }
        self.records.insert(hash, record);
        self.lru.touch(hash);
        Ok(evicted)
    }

    fn get(&mut self, hash: &BlockHash) -> Result<Option<Vec<u8>>, TierError> {
        let r = self.records.get(hash).cloned();
        if r.is_some() {
            self.lru.touch(*hash);
        }
        Ok(r)
    }

    fn remove(&mut self, hash: &BlockHash) {
        self.records.remove(hash);
        self.lru.remove(hash);
    }

    fn len(&self) -> usize {
        self.records.len()
    }

    fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_to_the_caller() {
        let h = |i: u8| BlockHash([i; 32]);
        let mut s = HostStore::new(2);
        assert!(s.put(h(1), vec![1]).unwrap().is_empty());
        assert!(s.put(h(2), vec![2]).unwrap().is_empty());
        assert_eq!(s.get(&h(1)).unwrap(), Some(vec![1]));
        // 2 is now the oldest.
        assert_eq!(s.put(h(3), vec![3]).unwrap(), vec![(h(2), vec![2])]);
        assert_eq!(s.len(), 2);
        assert_eq!(s.get(&h(2)).unwrap(), None);
        // Re-putting a held hash evicts nothing.
        assert!(s.put(h(3), vec![3]).unwrap().is_empty());
        s.remove(&h(1));
        assert_eq!(s.len(), 1);
    }
}
