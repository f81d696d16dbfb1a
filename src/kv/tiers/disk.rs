//! The disk tier: one file per block record under `<root>/<layout>/`, where `<layout>` is a
//! digest of the model and KV layout identity, so workers of different models can share a
//! volume and never see each other's blocks.
//!
//! A record is written to `<hash>.tmp` and renamed to `<hash>.kvb` before any older record is
//! evicted to make room, so a full disk costs only the new block: on any write error the
//! `.tmp` is removed, the block is not indexed and the caller publishes no `BlockStored`. A
//! crash leaves at worst a `.tmp` file (removed on start) or, without an fsync, a renamed file
//! with missing bytes — which the record's length and checksum catch when it is read. On start
//! the directory is the index: every `.kvb` file of the right size is taken, oldest
//! modification first in the LRU order, and the rest (wrong size, stray names) are removed.
//! Plain buffered I/O: the page cache keeps recently written blocks hot, which is what a
//! reload shortly after eviction wants.
use super::{LruOrder, Storage, Tier, TierError};
use crate::kv::BlockHash;
use std::path::{Path, PathBuf};

pub struct DiskStore {
    dir: PathBuf,
    lru: LruOrder,
    capacity: usize,
    /// Bytes of every record of this layout.
    record_len: usize,
}

impl DiskStore {
    /// Opens (creating) the tier for `identity` under `root`, holding at most `capacity`
    /// records of `record_len` bytes, and indexes what an earlier run left there.
    pub fn open(
        root: &Path,
        identity: &str,
        capacity: usize,
        record_len: usize,
    ) -> Result<Self, TierError> {
        let layout = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(identity.as_bytes()));
        let dir = root.join(layout);
        let io = |what: &Path, source| TierError::Io {
            tier: Tier::Disk,
            what: what.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| io(&dir, e))? {
            let entry = entry.map_err(|e| io(&dir, e))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let meta = entry.metadata().map_err(|e| io(&path, e))?;
            let hash = name.strip_suffix(".kvb").and_then(BlockHash::from_hex);
            match hash {
                Some(h) if meta.is_file() && meta.len() == record_len as u64 => {
                    let mtime = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                    found.push((mtime, h));
                }
                _ => {
                    // A crash's .tmp, a truncated record, or something that is not ours.
                    tracing::warn!(path = %path.display(), "disk KV tier: removing an incomplete or foreign file");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        found.sort();
        let mut store = Self {
            dir,
            lru: LruOrder::default(),
            capacity,
            record_len,
        };
        for (_, h) in found {
            store.lru.touch(h);
        }
        // A smaller capacity than last run's: drop the oldest.
        while store.lru.len() > capacity {
            if let Some(h) = store.lru.pop_oldest() {
                let _ = std::fs::remove_file(store.path(&h));
            }
        }
        Ok(store)
    }

    /// The file of `h`'s record.
    pub fn path(&self, h: &BlockHash) -> PathBuf {
        self.dir.join(format!("{}.kvb", h.to_hex()))
    }

    /// The directory holding this layout's records.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The hashes held, least recently used first.
    pub fn hashes(&self) -> Vec<BlockHash> {
        self.lru.in_order()
    }

    fn io(&self, what: &Path, source: std::io::Error) -> TierError {
        TierError::Io {
            tier: Tier::Disk,
            what: what.display().to_string(),
            source,
        }
    }
}

impl Storage for DiskStore {
    fn tier(&self) -> Tier {
        Tier::Disk
    }

    fn put(
        &mut self,
        hash: BlockHash,
        record: Vec<u8>,
    ) -> Result<Vec<(BlockHash, Vec<u8>)>, TierError> {
        if self.capacity == 0 || record.len() != self.record_len {
            return Ok(vec![(hash, record)]);
        }
        // Write first: the new record is whole under its name before anything is evicted, so
        // a full disk (or any write error) costs the new block only — the old ones and the
        // index stay as they were, and no partial file is left.
        let path = self.path(&hash);
        let tmp = path.with_extension("tmp");
        let written = std::fs::write(&tmp, &record)
            .map_err(|e| self.io(&tmp, e))
            .and_then(|()| std::fs::rename(&tmp, &path).map_err(|e| self.io(&path, e)));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        // Then make room: the least recently used records other than this one.
        let mut evicted = Vec::new();
        if !self.lru.contains(&hash) {
            while self.lru.len() >= self.capacity {
                let Some(old) = self.lru.pop_oldest() else {
                    break;
                };
                // The last tier: what it evicts is gone, so the bytes are not read back.
                let _ = std::fs::remove_file(self.path(&old));
                evicted.push((old, Vec::new()));
            }
        }
        self.lru.touch(hash);
        Ok(evicted)
    }

    fn get(&mut self, hash: &BlockHash) -> Result<Option<Vec<u8>>, TierError> {
        if !self.lru.contains(hash) {
            return Ok(None);
        }
        let path = self.path(hash);
        match std::fs::read(&path) {
            Ok(bytes) => {
                self.lru.touch(*hash);
                Ok(Some(bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.lru.remove(hash);
                Ok(None)
            }
            Err(e) => Err(self.io(&path, e)),
        }
    }

    fn remove(&mut self, hash: &BlockHash) {
        self.lru.remove(hash);
        let _ = std::fs::remove_file(self.path(hash));
    }

    fn len(&self) -> usize {
        self.lru.len()
    }

    fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_and_drops_partial_files() {
        let root = tempfile::tempdir().unwrap();
        let h = |i: u8| BlockHash([i; 32]);
        {
            let mut s = DiskStore::open(root.path(), "id-a", 2, 4).unwrap();
            assert!(s.put(h(1), vec![1; 4]).unwrap().is_empty());
            assert!(s.put(h(2), vec![2; 4]).unwrap().is_empty());
            // Full: the oldest goes (no bytes: nothing below disk).
            let ev = s.put(h(3), vec![3; 4]).unwrap();
            assert_eq!(ev.len(), 1);
            assert_eq!(ev[0].0, h(1));
            assert_eq!(s.get(&h(1)).unwrap(), None);
            // A crash left a tmp file and a short record.
            std::fs::write(s.dir().join("junk.tmp"), b"x").unwrap();
            std::fs::write(s.path(&h(9)), b"short").unwrap();
        }
        let mut s = DiskStore::open(root.path(), "id-a", 2, 4).unwrap();
        assert_eq!(s.len(), 2, "the two whole records are found again");
        assert_eq!(s.get(&h(3)).unwrap(), Some(vec![3; 4]));
        assert_eq!(s.get(&h(9)).unwrap(), None);
        assert!(!s.dir().join("junk.tmp").exists());
        // Another layout under the same root sees nothing.
        let other = DiskStore::open(root.path(), "id-b", 2, 4).unwrap();
        assert_eq!(other.len(), 0);
        // A smaller capacity drops the oldest.
        drop(s);
        let s = DiskStore::open(root.path(), "id-a", 1, 4).unwrap();
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn a_failed_write_evicts_nothing_and_leaves_no_file() {
        let root = tempfile::tempdir().unwrap();
        let h = |i: u8| BlockHash([i; 32]);
        let mut s = DiskStore::open(root.path(), "id", 2, 4).unwrap();
        s.put(h(1), vec![1; 4]).unwrap();
        s.put(h(2), vec![2; 4]).unwrap();
        // The store is full, and writing h(3) fails (its .tmp name is taken by a directory):
        // the records held stay held, on disk and in the index, and nothing is evicted.
        let tmp = s.path(&h(3)).with_extension("tmp");
        std::fs::create_dir(&tmp).unwrap();
        assert!(s.put(h(3), vec![3; 4]).is_err());
        assert_eq!(s.len(), 2);
        assert_eq!(s.get(&h(1)).unwrap(), Some(vec![1; 4]));
        assert_eq!(s.get(&h(2)).unwrap(), Some(vec![2; 4]));
        assert_eq!(s.get(&h(3)).unwrap(), None);
        assert!(!s.path(&h(3)).exists());
        // Once it can be written, the least recently used (h(1) was read first) goes.
        std::fs::remove_dir(&tmp).unwrap();
        let ev = s.put(h(3), vec![3; 4]).unwrap();
        assert_eq!(ev.iter().map(|e| e.0).collect::<Vec<_>>(), vec![h(1)]);
        assert!(!tmp.exists() && !s.path(&h(1)).exists() && s.path(&h(3)).exists());
    }
}
