//! The checksummed record of one KV block as it lives below the device pool: in the host tier,
//! in a disk file, in a remote key-value store, or on the wire to another worker (issues 8, 9).
//!
//! A record carries the block's bytes (K and V of every layer) and everything needed to prove
//! that those bytes are the block the reader asked for: the block hash, the identity of the
//! model and KV layout that produced them, and an xxh3-64 checksum over all of it. A reader
//! gets the payload only when every check passes, so a corrupt file, a truncated write, a
//! block from another model or layout, or a stale key never becomes wrong tokens — the caller
//! drops the record and recomputes.
//!
//! Layout (all integers little-endian):
//! ```text
//! magic "LLMDKVB1" (8) | header_len u32 | payload_len u64 | block_hash (32)
//! | identity_len u32 | identity (utf-8) | payload | checksum u64
//! ```
//! `header_len` counts the bytes before the payload; the checksum is xxh3-64 (seed 0) of every
//! byte before it. The identity is a canonical string (see [`KvIdentity::canonical`]).
use super::BlockHash;
use xxhash_rust::xxh3::xxh3_64;

const MAGIC: &[u8; 8] = b"LLMDKVB1";
/// Bytes of the fixed part of the header: magic, header length, payload length, block hash,
/// identity length.
const FIXED: usize = 8 + 4 + 8 + 32 + 4;
/// Longest identity accepted: a model name and a few numbers; more is a corrupt length.
const MAX_IDENTITY: usize = 4096;

/// What produced a block's bytes: records only match readers with the same identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvIdentity {
    /// The model (a name or a content fingerprint; workers sharing blocks must agree).
    pub model: String,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// The cached element type, e.g. `f32` (CPU) or `bf16` (CUDA).
    pub dtype: &'static str,
}

impl KvIdentity {
    /// The string written into records and compared on read.
    pub fn canonical(&self) -> String {
        format!(
            "model={};layers={};kv_heads={};head_dim={};block_size={};dtype={}",
            self.model,
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            self.block_size,
            self.dtype
        )
    }
}

/// Why a record was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("KV record truncated: {got} bytes, at least {need} needed")]
    Truncated { got: usize, need: usize },
    #[error("not a KV block record (bad magic)")]
    BadMagic,
    #[error("KV record header is inconsistent: {0}")]
    BadHeader(&'static str),
    #[error("KV record checksum mismatch: stored {stored:016x}, computed {computed:016x}")]
    Checksum { stored: u64, computed: u64 },
    #[error("KV record holds block {got:016x}, wanted {want:016x}")]
    WrongBlock { want: u64, got: u64 },
    #[error("KV record is from another model or layout: {got:?}, wanted {want:?}")]
    WrongIdentity { want: String, got: String },
    #[error("KV record payload is {got} bytes, a block here is {want}")]
    WrongSize { want: usize, got: usize },
}

/// Bytes of the record of a `payload_len`-byte block under an identity of `identity_len`.
pub fn record_len(identity_len: usize, payload_len: usize) -> usize {
    FIXED + identity_len + payload_len + 8
}

/// Writes the record of block `hash` with `payload` (its K/V bytes) made under `identity`.
pub fn encode(hash: &BlockHash, identity: &str, payload: &[u8]) -> Vec<u8> {
    let header_len = FIXED + identity.len();
    let mut out = Vec::with_capacity(header_len + payload.len() + 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(header_len as u32).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&hash.0);
    out.extend_from_slice(&(identity.len() as u32).to_le_bytes());
    out.extend_from_slice(identity.as_bytes());
    out.extend_from_slice(payload);
    let sum = xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// The payload of `record`, if it is intact and is block `hash` under `identity` with exactly
/// `payload_len` bytes. Never panics, whatever the bytes.
pub fn decode<'a>(
    record: &'a [u8],
    hash: &BlockHash,
    identity: &str,
    payload_len: usize,
) -> Result<&'a [u8], RecordError> {
    let need = FIXED + 8;
    if record.len() < need {
        return Err(RecordError::Truncated {
            got: record.len(),
            need,
        });
    }
    if &record[..8] != MAGIC {
        return Err(RecordError::BadMagic);
    }
    let u32_at =
        |i: usize| u32::from_le_bytes([record[i], record[i + 1], record[i + 2], record[i + 3]]);
    let header_len = u32_at(8) as usize;
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&record[12..20]);
    let stored_payload = u64::from_le_bytes(len8);
    let identity_len = u32_at(52) as usize;
    if identity_len > MAX_IDENTITY || header_len != FIXED + identity_len {
        return Err(RecordError::BadHeader("identity length"));
    }
    let total = usize::try_from(stored_payload)
        .ok()
        .and_then(|p| p.checked_add(header_len))
        .and_then(|n| n.checked_add(8))
        .ok_or(RecordError::BadHeader("payload length"))?;
    if record.len() < total {
        return Err(RecordError::Truncated {
            got: record.len(),
            need: total,
        });
    }
    if record.len() > total {
        return Err(RecordError::BadHeader("bytes after the checksum"));
    }
    let body = &record[..total - 8];
    len8.copy_from_slice(&record[total - 8..]);
    let stored = u64::from_le_bytes(len8);
    let computed = xxh3_64(body);
    if stored != computed {
        return Err(RecordError::Checksum { stored, computed });
    }
    let mut got_hash = [0u8; 32];
    got_hash.copy_from_slice(&record[20..52]);
    if got_hash != hash.0 {
        return Err(RecordError::WrongBlock {
            want: hash.external(),
            got: BlockHash(got_hash).external(),
        });
    }
    let got_identity = &record[FIXED..header_len];
    if got_identity != identity.as_bytes() {
        return Err(RecordError::WrongIdentity {
            want: identity.to_string(),
            got: String::from_utf8_lossy(got_identity).into_owned(),
        });
    }
    let payload = &record[header_len..total - 8];
    if payload.len() != payload_len {
        return Err(RecordError::WrongSize {
            want: payload_len,
            got: payload.len(),
        });
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(model: &str) -> String {
        KvIdentity {
            model: model.into(),
            num_layers: 5,
            num_kv_heads: 4,
            head_dim: 8,
            block_size: 16,
            dtype: "f32",
        }
        .canonical()
    }

    fn payload() -> Vec<u8> {
        (0..5 * 2 * 16 * 4 * 8 * 4)
            .map(|i| (i * 7 % 251) as u8)
            .collect()
    }

    #[test]
    fn roundtrip_and_every_refusal() {
        let h = BlockHash([3; 32]);
        let id = ident("stories260K");
        let p = payload();
        let rec = encode(&h, &id, &p);
        assert_eq!(decode(&rec, &h, &id, p.len()).unwrap(), p.as_slice());

        // Any flipped byte is caught (header, identity, payload or checksum).
        for i in [
            0,
            9,
            15,
            30,
            FIXED + 3,
            FIXED + id.len() + 100,
            rec.len() - 1,
        ] {
            let mut bad = rec.clone();
            bad[i] ^= 0x10;
            assert!(decode(&bad, &h, &id, p.len()).is_err(), "byte {i} flipped");
        }
        // Truncated anywhere (a torn write).
        for n in [0, 10, FIXED, rec.len() / 2, rec.len() - 1] {
            assert!(
                matches!(
                    decode(&rec[..n], &h, &id, p.len()),
                    Err(RecordError::Truncated { .. } | RecordError::BadHeader(_))
                ),
                "truncated to {n}"
            );
        }
        let mut long = rec.clone();
        long.push(0);
        assert!(decode(&long, &h, &id, p.len()).is_err());
        // Intact, but not what was asked for.
        assert!(matches!(
            decode(&rec, &BlockHash([4; 32]), &id, p.len()),
            Err(RecordError::WrongBlock { .. })
        ));
        assert!(matches!(
            decode(&rec, &h, &ident("smollm2"), p.len()),
            Err(RecordError::WrongIdentity { .. })
        ));
        assert!(matches!(
            decode(&rec, &h, &id, p.len() - 4),
            Err(RecordError::WrongSize { .. })
        ));
    }

    #[test]
    fn identity_names_every_part_of_the_layout() {
        let a = KvIdentity {
            model: "m".into(),
            num_layers: 30,
            num_kv_heads: 3,
            head_dim: 64,
            block_size: 16,
            dtype: "bf16",
        };
        let b = KvIdentity {
            dtype: "f32",
            ..a.clone()
        };
        let c = KvIdentity {
            block_size: 32,
            ..a.clone()
        };
        assert_ne!(a.canonical(), b.canonical());
        assert_ne!(a.canonical(), c.canonical());
        assert_eq!(
            a.canonical(),
            "model=m;layers=30;kv_heads=3;head_dim=64;block_size=16;dtype=bf16"
        );
    }
}
