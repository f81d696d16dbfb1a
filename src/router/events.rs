//! The router's side of the workers' KV events: a ZMQ SUB per worker, vLLM's msgpack batches
//! decoded into [`KvEvent`]s, sequence gaps filled from the worker's replay socket; or one SUB
//! bound for every worker, told apart by topic ([`central`], llm-d's centralized topology).
//!
//! A batch is `[topic, seq (8 bytes BE), payload]`; the payload is vLLM's `KVEventBatch`
//! (`[ts, [events…], data_parallel_rank]`, each event an array tagged by its kind; see
//! `server::kv_events`). The subscriber keeps the next sequence number it expects: a later
//! one means batches were lost (the SUB joined late, or the publisher dropped them), and it
//! asks the replay socket (a DEALER sending `[b"", start (8 bytes BE)]`) for everything from
//! there; an earlier one means the worker restarted, and what the index held for it is
//! dropped before the new stream is applied.
//!
//! The publisher is a network peer: a batch over [`MAX_BATCH_BYTES`] is dropped and counted
//! without being decoded, a malformed one is counted, and neither ends the subscription.
//! (The frame is still received whole by the ZeroMQ library first: zeromq 0.7 has no limit on
//! message size, so the cap bounds the decoding, not the receive buffer.)
pub mod central;

use crate::kv::{KvEvent, Medium};
use rmpv::Value;
use std::time::Duration;
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

/// The largest batch payload decoded. One engine step's batch holds at most the step's new
/// blocks — a few bytes per token id and per hash, under 1 MiB even at 100k tokens per step —
/// so a bigger frame is not a batch; decoding it into msgpack values would take tens of times
/// its size in memory. 16 MiB leaves room for the largest steps and the longest prefixes.
pub const MAX_BATCH_BYTES: usize = 16 << 20;

/// The events of one payload; Err says what is malformed (or that it is over
/// [`MAX_BATCH_BYTES`], checked before anything is decoded).
pub fn decode_batch(payload: &[u8]) -> Result<Vec<KvEvent>, String> {
    if payload.len() > MAX_BATCH_BYTES {
        return Err(format!(
            "{} bytes, more than the {MAX_BATCH_BYTES} a batch may have",
            payload.len()
        ));
    }
    let mut slice = payload;
    let v = rmpv::decode::read_value(&mut slice).map_err(|e| format!("msgpack: {e}"))?;
    if !slice.is_empty() {
        return Err(format!("{} bytes after the batch", slice.len()));
    }
    let batch = v.as_array().ok_or("a batch is not an array")?;
    let events = batch
        .get(1)
        .and_then(Value::as_array)
        .ok_or("the batch has no event list")?;
    events.iter().map(decode_event).collect()
}

fn uint(v: &Value, what: &str) -> Result<u64, String> {
    v.as_u64()
        .ok_or_else(|| format!("{what} is not an unsigned int"))
}

fn hashes(v: &Value) -> Result<Vec<u64>, String> {
    v.as_array()
        .ok_or("block_hashes is not an array")?
        .iter()
        .map(|h| uint(h, "a block hash"))
        .collect()
}

fn medium(v: &Value) -> Result<Medium, String> {
    match v.as_str() {
        Some("GPU") | None => Ok(Medium::Gpu),
        Some("CPU") => Ok(Medium::Cpu),
        Some("DISK") => Ok(Medium::Disk),
        Some(other) => Err(format!("unknown medium {other:?}")),
    }
}

/// A `BlockStored`'s `extra_keys` for `blocks` blocks: nil (none for every block), or one
/// entry per block — nil, or an array of keys (strings; vLLM's integers as their decimals).
fn extra_keys(v: &Value, blocks: usize) -> Result<Vec<Vec<String>>, String> {
    let per_block = match v {
        Value::Nil => return Ok(vec![Vec::new(); blocks]),
        Value::Array(a) if a.len() == blocks => a,
        Value::Array(a) => {
            return Err(format!(
                "{} extra_keys entries for {blocks} blocks",
                a.len()
            ))
        }
        _ => return Err("extra_keys is not an array".into()),
    };
    per_block
        .iter()
        .map(|e| match e {
            Value::Nil => Ok(Vec::new()),
            Value::Array(keys) => keys
                .iter()
                .map(|k| match k {
                    Value::String(s) => s
                        .as_str()
                        .map(str::to_string)
                        .ok_or_else(|| "an extra key is not UTF-8".to_string()),
                    Value::Integer(i) => Ok(i.to_string()),
                    _ => Err("an extra key is neither a string nor an integer".to_string()),
                })
                .collect(),
            _ => Err("an extra_keys entry is neither nil nor an array".into()),
        })
        .collect()
}

fn decode_event(v: &Value) -> Result<KvEvent, String> {
    let a = v.as_array().ok_or("an event is not an array")?;
    let field = |i: usize| a.get(i).unwrap_or(&Value::Nil);
    match field(0).as_str() {
        Some("BlockStored") => {
            let token_ids = field(3)
                .as_array()
                .ok_or("token_ids is not an array")?
                .iter()
                .map(|t| {
                    let t = uint(t, "a token id")?;
                    u32::try_from(t).map_err(|_| format!("token id {t} is past 32 bits"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let block_size = uint(field(4), "block_size")?;
            let block_hashes = hashes(field(1))?;
            let extra_keys = extra_keys(field(8), block_hashes.len())?;
            Ok(KvEvent::BlockStored {
                block_hashes,
                extra_keys,
                parent_block_hash: match field(2) {
                    Value::Nil => None,
                    p => Some(uint(p, "parent_block_hash")?),
                },
                token_ids,
                block_size: usize::try_from(block_size)
                    .map_err(|_| format!("block_size {block_size} is too large"))?,
                medium: medium(field(6))?,
            })
        }
        Some("BlockRemoved") => Ok(KvEvent::BlockRemoved {
            block_hashes: hashes(field(1))?,
            medium: medium(field(2))?,
        }),
        Some("AllBlocksCleared") => Ok(KvEvent::AllBlocksCleared),
        other => Err(format!("unknown event kind {other:?}")),
    }
}

/// What the subscriber hands its owner.
#[derive(Debug)]
pub enum Update {
    /// Events of one batch, in order.
    Events(Vec<KvEvent>),
    /// The worker restarted (its sequence went back): forget what it held.
    Reset,
}

/// Counters of one subscription.
#[derive(Debug, Default)]
pub struct SubStats {
    pub batches: std::sync::atomic::AtomicU64,
    pub gaps: std::sync::atomic::AtomicU64,
    pub replayed: std::sync::atomic::AtomicU64,
    pub malformed: std::sync::atomic::AtomicU64,
    /// Batches over [`MAX_BATCH_BYTES`], dropped undecoded (live and replayed).
    pub oversized: std::sync::atomic::AtomicU64,
}

/// What became of one received batch payload.
fn decode_counted(
    payload: &[u8],
    endpoint: &str,
    seq: u64,
    stats: &SubStats,
) -> Option<Vec<KvEvent>> {
    use std::sync::atomic::Ordering::Relaxed;
    if payload.len() > MAX_BATCH_BYTES {
        let n = stats.oversized.fetch_add(1, Relaxed) + 1;
        // Once per power of two: a hostile publisher cannot flood the log.
        if n.is_power_of_two() {
            tracing::warn!(
                %endpoint,
                seq,
                bytes = payload.len(),
                oversized_batches = n,
                "KV events: a batch over {MAX_BATCH_BYTES} bytes dropped undecoded"
            );
        }
        return None;
    }
    match decode_batch(payload) {
        Ok(events) => Some(events),
        Err(e) => {
            let n = stats.malformed.fetch_add(1, Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(%endpoint, seq, error = %e, malformed_batches = n, "KV events: a malformed batch");
            }
            None
        }
    }
}

/// Subscribes to `endpoint` (and replays from `replay`) until the task is dropped, calling
/// `apply` for every update in order.
pub async fn subscribe(
    endpoint: String,
    replay: Option<String>,
    stats: std::sync::Arc<SubStats>,
    mut apply: impl FnMut(Update) + Send,
) {
    use std::sync::atomic::Ordering::Relaxed;
    loop {
        let mut sub = SubSocket::new();
        let connected = async {
            sub.connect(&endpoint).await?;
            sub.subscribe("").await
        };
        if let Err(e) = connected.await {
            tracing::warn!(%endpoint, error = %e, "KV events: cannot subscribe; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        tracing::info!(%endpoint, "KV events: subscribed");
        // What the worker published before this subscription (the router started after it,
        // or reconnected): everything its replay socket kept.
        let mut next: Option<u64> = match &replay {
            Some(r) => replay_from(r, 0, &stats, &mut apply).await,
            None => None,
        };
        loop {
            let msg = match sub.recv().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(%endpoint, error = %e, "KV events: receive failed; resubscribing");
                    break;
                }
            };
            let Some((seq, payload)) = frames(&msg) else {
                stats.malformed.fetch_add(1, Relaxed);
                continue;
            };
            match next {
                Some(n) if seq < n => {
                    if n - seq > 1 << 20 || (seq == 0 && n > 1) {
                        // Numbering started again: a restarted worker.
                        apply(Update::Reset);
                    } else {
                        continue; // already applied (a replay overlapped the live stream)
                    }
                }
                Some(n) if seq > n => {
                    stats.gaps.fetch_add(1, Relaxed);
                    if let Some(r) = &replay {
                        next = Some(replay_from(r, n, &stats, &mut apply).await.unwrap_or(n));
                        if seq < next.unwrap_or(0) {
                            continue;
                        }
                    }
                }
                None if seq > 0 => {
                    // Joined late: what came before is on the replay socket, if kept.
                    if let Some(r) = &replay {
                        stats.gaps.fetch_add(1, Relaxed);
                        let got = replay_from(r, 0, &stats, &mut apply).await.unwrap_or(0);
                        if seq < got {
                            next = Some(got);
                            continue;
                        }
                    }
                }
                _ => {}
            }
            if let Some(events) = decode_counted(&payload, &endpoint, seq, &stats) {
                apply(Update::Events(events));
            }
            stats.batches.fetch_add(1, Relaxed);
            next = Some(seq + 1);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `(seq, payload)` of a live `[topic, seq, payload]` message.
fn frames(msg: &ZmqMessage) -> Option<(u64, bytes::Bytes)> {
    if msg.len() != 3 {
        return None;
    }
    let seq = u64::from_be_bytes(msg.get(1)?.as_ref().try_into().ok()?);
    Some((seq, msg.get(2)?.clone()))
}

/// Replays every kept batch from `start`: applies them and returns the sequence after the
/// last one.
async fn replay_from(
    endpoint: &str,
    start: u64,
    stats: &SubStats,
    apply: &mut (impl FnMut(Update) + Send),
) -> Option<u64> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut dealer = DealerSocket::new();
    tokio::time::timeout(Duration::from_secs(2), dealer.connect(endpoint))
        .await
        .ok()?
        .ok()?;
    let request = vec![
        bytes::Bytes::new(),
        bytes::Bytes::from(start.to_be_bytes().to_vec()),
    ];
    dealer
        .send(ZmqMessage::try_from(request).ok()?)
        .await
        .ok()?;
    let mut next = start;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), dealer.recv())
            .await
            .ok()?
            .ok()?;
        if m.len() != 4 {
            return Some(next);
        }
        let seq_bytes = m.get(2)?;
        if seq_bytes.as_ref() == crate::server::kv_events::END_SEQ {
            return Some(next);
        }
        let seq = u64::from_be_bytes(seq_bytes.as_ref().try_into().ok()?);
        if seq < next {
            continue;
        }
        if let Some(events) = decode_counted(m.get(3)?, endpoint, seq, stats) {
            apply(Update::Events(events));
        }
        stats.replayed.fetch_add(1, Relaxed);
        next = seq + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_the_publisher_encodes() {
        let events = vec![
            KvEvent::BlockStored {
                block_hashes: vec![1, u64::MAX],
                parent_block_hash: Some(7),
                token_ids: (0..32).collect(),
                block_size: 16,
                medium: Medium::Cpu,
                extra_keys: vec![vec!["tenant-a".into()], Vec::new()],
            },
            KvEvent::BlockStored {
                block_hashes: vec![3],
                parent_block_hash: None,
                token_ids: (0..16).collect(),
                block_size: 16,
                medium: Medium::Gpu,
                extra_keys: vec![Vec::new()],
            },
            KvEvent::BlockRemoved {
                block_hashes: vec![1],
                medium: Medium::Disk,
            },
            KvEvent::AllBlocksCleared,
        ];
        let payload = crate::server::kv_events::encode_batch(1.5, &events, Some(0)).unwrap();
        assert_eq!(decode_batch(&payload).unwrap(), events);
    }

    #[test]
    fn malformed_payloads_are_errors_not_panics() {
        for bad in [
            &b""[..],
            &[0x93, 0xcb][..],
            &[0x93, 0x00, 0x91, 0x91, 0xa3, b'B', b'a', b'd', 0xc0][..],
            &[0x92, 0x00, 0x91, 0x92, 0xab][..],
        ] {
            assert!(decode_batch(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn trailing_bytes_and_out_of_range_fields_are_errors() {
        let good = crate::server::kv_events::encode_batch(1.0, &[KvEvent::AllBlocksCleared], None)
            .unwrap();
        assert!(decode_batch(&good).is_ok());
        let mut trailing = good.clone();
        trailing.push(0xc0);
        let e = decode_batch(&trailing).unwrap_err();
        assert!(e.contains("after the batch"), "{e}");
        // ["BlockStored", [1], nil, [2^32], 16]: a token id past u32 was silently truncated.
        let mut stored = vec![0x93, 0x00, 0x91, 0x95, 0xab];
        stored.extend_from_slice(b"BlockStored");
        stored.extend_from_slice(&[
            0x91, 0x01, 0xc0, 0x91, 0xcf, 0, 0, 0, 1, 0, 0, 0, 0, 0x10, 0xc0,
        ]);
        let e = decode_batch(&stored).unwrap_err();
        assert!(e.contains("past 32 bits"), "{e}");
        let huge = vec![0x90; MAX_BATCH_BYTES + 1];
        let e = decode_batch(&huge).unwrap_err();
        assert!(e.contains("more than"), "{e}");
    }
}
