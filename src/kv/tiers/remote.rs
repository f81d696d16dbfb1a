//! The remote tier: block records in a Redis/Valkey server shared by workers (east/west
//! sharing, as LMCache's remote backend), so a prefix one worker computed is loaded by another.
//!
//! Keys are `llmd:kv:<layout>:<block hash hex>` where `<layout>` digests the model and KV
//! layout identity; values are the checksummed records, so a key from another model, a stale
//! value or a corrupted one is refused by the reader like a bad disk file. Capacity and
//! eviction are the server's (`maxmemory` + `allkeys-lru`).
//!
//! Failure policy: the server is an accelerator, never a dependency. Every call has a short
//! timeout; after a failure the tier stays down (calls fail at once, without the network) for
//! [`RETRY_AFTER`], then one call tries to reconnect. The caller treats a failure as a miss.
use super::{Storage, Tier, TierError};
use crate::kv::BlockHash;
use std::time::{Duration, Instant};

/// How long the tier stays down after a failure before it tries the server again.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);
/// Connect, read and write timeout of every call.
const TIMEOUT: Duration = Duration::from_millis(500);

pub struct RemoteStore {
    url: String,
    client: redis::Client,
    conn: Option<redis::Connection>,
    layout: String,
    down_until: Option<Instant>,
    /// Records this worker put (the server's own count is not ours to know).
    stored: usize,
}

impl RemoteStore {
    /// A client for `url` (`redis://host:port[/db]`); connects lazily, so a server that is not
    /// up yet only means misses until it is.
    pub fn new(url: &str, identity: &str) -> Result<Self, TierError> {
        let client = redis::Client::open(url)
            .map_err(|e| TierError::Config(format!("--kv-remote-url {url:?}: {e}")))?;
        Ok(Self {
            url: url.to_string(),
            client,
            conn: None,
            layout: format!("{:016x}", xxhash_rust::xxh3::xxh3_64(identity.as_bytes())),
            down_until: None,
            stored: 0,
        })
    }

    /// The key of `hash`'s record.
    pub fn key(&self, hash: &BlockHash) -> String {
        format!("llmd:kv:{}:{}", self.layout, hash.to_hex())
    }

    /// True while the tier is down after a failure.
    pub fn is_down(&self) -> bool {
        self.down_until.is_some_and(|t| Instant::now() < t)
    }

    fn fail(&mut self, reason: String) -> TierError {
        if !self.is_down() {
            tracing::warn!(url = %self.url, %reason, "remote KV tier unreachable; recomputing instead for {}s", RETRY_AFTER.as_secs());
        }
        self.conn = None;
        self.down_until = Some(Instant::now() + RETRY_AFTER);
        TierError::Remote {
            url: self.url.clone(),
            reason,
        }
    }

    fn with_conn<T>(
        &mut self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, TierError> {
        if self.is_down() {
            return Err(TierError::Remote {
                url: self.url.clone(),
                reason: "down (retrying later)".into(),
            });
        }
        if self.conn.is_none() {
            let conn = self
                .client
                .get_connection_with_timeout(TIMEOUT)
                .and_then(|c| {
                    c.set_read_timeout(Some(TIMEOUT))?;
                    c.set_write_timeout(Some(TIMEOUT))?;
                    Ok(c)
                });
            match conn {
                Ok(c) => {
                    if self.down_until.take().is_some() {
                        tracing::info!(url = %self.url, "remote KV tier reachable again");
                    }
                    self.conn = Some(c);
                }
                Err(e) => return Err(self.fail(e.to_string())),
            }
        }
        let conn = self.conn.as_mut().expect("connected above");
        match f(conn) {
            Ok(v) => Ok(v),
            Err(e) => Err(self.fail(e.to_string())),
        }
    }

    /// The records of `hashes`, in order (None where the server has none).
    pub fn get_many(&mut self, hashes: &[BlockHash]) -> Result<Vec<Option<Vec<u8>>>, TierError> {
        if hashes.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = hashes.iter().map(|h| self.key(h)).collect();
        self.with_conn(|c| redis::cmd("MGET").arg(&keys).query(c))
    }
}

impl Storage for RemoteStore {
    fn tier(&self) -> Tier {
        Tier::Remote
    }

    fn put(
        &mut self,
        hash: BlockHash,
        record: Vec<u8>,
    ) -> Result<Vec<(BlockHash, Vec<u8>)>, TierError> {
        let key = self.key(&hash);
        self.with_conn(|c| redis::cmd("SET").arg(&key).arg(&record).query::<()>(c))?;
        self.stored += 1;
        Ok(Vec::new())
    }

    fn get(&mut self, hash: &BlockHash) -> Result<Option<Vec<u8>>, TierError> {
        let key = self.key(hash);
        self.with_conn(|c| redis::cmd("GET").arg(&key).query(c))
    }

    fn remove(&mut self, hash: &BlockHash) {
        let key = self.key(hash);
        let _ = self.with_conn(|c| redis::cmd("DEL").arg(&key).query::<()>(c));
    }

    fn len(&self) -> usize {
        self.stored
    }

    fn capacity(&self) -> usize {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_server_is_a_fast_miss_not_a_hang() {
        // Nothing listens on port 1.
        let mut s = RemoteStore::new("redis://127.0.0.1:1", "id").unwrap();
        assert!(s.get(&BlockHash([1; 32])).is_err());
        assert!(s.is_down());
        let t = Instant::now();
        assert!(s.put(BlockHash([1; 32]), vec![1]).is_err());
        assert!(t.elapsed() < Duration::from_millis(50), "down: no network");
        assert!(RemoteStore::new("not a url", "id").is_err());
    }
}
