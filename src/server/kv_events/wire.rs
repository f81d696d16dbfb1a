//! vLLM's KV-event msgpack: what msgspec writes for `vllm/distributed/kv_events.py`'s
//! `KVEventBatch` and its `array_like=True, tag=True` event structs. msgspec ignores
//! `omit_defaults` for array-like structs, so every field is written, and each int takes its
//! shortest form. Invariant: [`encode_batch`] is byte for byte what msgspec writes for the same
//! batch (tests/kv_events_subscriber.py checks it against msgspec itself).
use crate::kv::KvEvent;

/// vLLM's `ZmqEventPublisher.END_SEQ`: the replay's end marker, -1 as 8 signed big-endian bytes.
pub const END_SEQ: [u8; 8] = (-1i64).to_be_bytes();

/// What `kv_cache_spec_kind` says of llmd's single KV cache group.
const FULL_ATTENTION: &str = "full_attention";

/// An array too long for msgpack (more than `u32::MAX` elements).
#[derive(Debug, thiserror::Error)]
#[error("{field} has {len} elements, more than msgpack's 2^32 - 1")]
pub struct TooLong {
    field: &'static str,
    len: usize,
}

/// The msgpack payload of one batch, byte for byte what msgspec writes for vLLM's
/// `KVEventBatch` (see the module docs).
pub fn encode_batch(
    ts: f64,
    events: &[KvEvent],
    data_parallel_rank: Option<u32>,
) -> Result<Vec<u8>, TooLong> {
    let mut out = rmp::encode::ByteBuf::new();
    let w = &mut out;
    array_len(w, 3, "batch")?;
    let Ok(()) = rmp::encode::write_f64(w, ts);
    array_len(w, events.len(), "events")?;
    for event in events {
        encode_event(w, event)?;
    }
    match data_parallel_rank {
        Some(rank) => uint(w, u64::from(rank)),
        None => nil(w),
    }
    Ok(out.into_vec())
}

fn encode_event(w: &mut rmp::encode::ByteBuf, event: &KvEvent) -> Result<(), TooLong> {
    match event {
        KvEvent::BlockStored {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size,
            medium,
            extra_keys,
        } => {
            array_len(w, 12, "BlockStored")?;
            string(w, "BlockStored");
            hashes(w, block_hashes)?;
            match parent_block_hash {
                Some(h) => uint(w, *h),
                None => nil(w),
            }
            array_len(w, token_ids.len(), "token_ids")?;
            for &t in token_ids {
                uint(w, u64::from(t));
            }
            uint(w, *block_size as u64);
            nil(w); // lora_id
            string(w, medium.as_str());
            nil(w); // lora_name

            // extra_keys: one entry per block, nil for a block hashed from its tokens alone,
            // else the array of its keys (a first block's cache salt).
            array_len(w, block_hashes.len(), "extra_keys")?;
            for i in 0..block_hashes.len() {
                match extra_keys.get(i).filter(|e| !e.is_empty()) {
                    None => nil(w),
                    Some(keys) => {
                        array_len(w, keys.len(), "extra_keys")?;
                        for k in keys {
                            string(w, k);
                        }
                    }
                }
            }
            uint(w, 0); // group_idx
            string(w, FULL_ATTENTION); // kv_cache_spec_kind
            nil(w); // kv_cache_spec_sliding_window
        }
        KvEvent::BlockRemoved {
            block_hashes,
            medium,
        } => {
            array_len(w, 4, "BlockRemoved")?;
            string(w, "BlockRemoved");
            hashes(w, block_hashes)?;
            string(w, medium.as_str());
            uint(w, 0); // group_idx
        }
        KvEvent::AllBlocksCleared => {
            array_len(w, 1, "AllBlocksCleared")?;
            string(w, "AllBlocksCleared");
        }
    }
    Ok(())
}

fn hashes(w: &mut rmp::encode::ByteBuf, hashes: &[u64]) -> Result<(), TooLong> {
    array_len(w, hashes.len(), "block_hashes")?;
    for &h in hashes {
        uint(w, h);
    }
    Ok(())
}

fn array_len(w: &mut rmp::encode::ByteBuf, len: usize, field: &'static str) -> Result<(), TooLong> {
    let n = u32::try_from(len).map_err(|_| TooLong { field, len })?;
    let Ok(_) = rmp::encode::write_array_len(w, n);
    Ok(())
}

fn uint(w: &mut rmp::encode::ByteBuf, v: u64) {
    let Ok(_) = rmp::encode::write_uint(w, v);
}

fn string(w: &mut rmp::encode::ByteBuf, s: &str) {
    let Ok(()) = rmp::encode::write_str(w, s);
}

fn nil(w: &mut rmp::encode::ByteBuf) {
    let Ok(()) = rmp::encode::write_nil(w);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::Medium;
    use rmpv::Value;

    fn decode(bytes: &[u8]) -> Value {
        let mut slice = bytes;
        let value = rmpv::decode::read_value(&mut slice).expect("valid msgpack");
        assert!(slice.is_empty(), "trailing bytes after the batch");
        value
    }

    fn s(v: &str) -> Value {
        Value::from(v)
    }

    fn u(v: u64) -> Value {
        Value::from(v)
    }

    fn arr(items: Vec<Value>) -> Value {
        Value::Array(items)
    }

    #[test]
    fn block_stored_is_vllms_tagged_array() {
        let event = KvEvent::BlockStored {
            block_hashes: vec![7, u64::MAX],
            parent_block_hash: Some(1 << 63),
            token_ids: vec![1, 2, 3, 4, 5, 6, 7, 200_000],
            block_size: 4,
            medium: Medium::Gpu,
            extra_keys: vec![vec!["tenant-a".into()], Vec::new()],
        };
        let payload = encode_batch(1.5, &[event], Some(3)).unwrap();
        let expected = arr(vec![
            Value::F64(1.5),
            arr(vec![arr(vec![
                s("BlockStored"),
                arr(vec![u(7), u(u64::MAX)]),
                u(1 << 63),
                arr([1, 2, 3, 4, 5, 6, 7, 200_000].map(u).to_vec()),
                u(4),
                Value::Nil, // lora_id
                s("GPU"),
                Value::Nil, // lora_name
                // extra_keys: the first block's cache salt, nil for the second.
                arr(vec![arr(vec![s("tenant-a")]), Value::Nil]),
                u(0), // group_idx
                s("full_attention"),
                Value::Nil, // kv_cache_spec_sliding_window
            ])]),
            u(3),
        ]);
        assert_eq!(decode(&payload), expected);
    }

    #[test]
    fn first_block_has_a_nil_parent() {
        let event = KvEvent::BlockStored {
            block_hashes: vec![9],
            parent_block_hash: None,
            token_ids: vec![1, 2],
            block_size: 2,
            medium: Medium::Cpu,
            extra_keys: vec![Vec::new()],
        };
        let Value::Array(batch) = decode(&encode_batch(0.0, &[event], Some(0)).unwrap()) else {
            panic!("batch is not an array");
        };
        let Value::Array(events) = &batch[1] else {
            panic!("events is not an array");
        };
        let Value::Array(stored) = &events[0] else {
            panic!("event is not an array");
        };
        assert_eq!(stored[2], Value::Nil);
        assert_eq!(stored[6], s("CPU"));
    }

    #[test]
    fn block_removed_and_all_blocks_cleared_are_vllms_tagged_arrays() {
        let events = [
            KvEvent::BlockRemoved {
                block_hashes: vec![3, 1 << 40],
                medium: Medium::Disk,
            },
            KvEvent::AllBlocksCleared,
        ];
        let expected = arr(vec![
            Value::F64(2.25),
            arr(vec![
                arr(vec![
                    s("BlockRemoved"),
                    arr(vec![u(3), u(1 << 40)]),
                    s("DISK"),
                    u(0),
                ]),
                arr(vec![s("AllBlocksCleared")]),
            ]),
            u(0),
        ]);
        assert_eq!(
            decode(&encode_batch(2.25, &events, Some(0)).unwrap()),
            expected
        );
    }

    #[test]
    fn batch_without_rank_has_a_nil_rank() {
        // msgspec writes every field of an array-like struct, defaults included.
        let payload = encode_batch(3.0, &[KvEvent::AllBlocksCleared], None).unwrap();
        assert_eq!(
            decode(&payload),
            arr(vec![
                Value::F64(3.0),
                arr(vec![arr(vec![s("AllBlocksCleared")])]),
                Value::Nil,
            ])
        );
    }

    #[test]
    fn encoding_uses_msgspecs_markers() {
        // msgspec writes a float as float64 and each int in its shortest form.
        let payload = encode_batch(1.0, &[], Some(0)).unwrap();
        let mut expected = vec![0x93, 0xcb];
        expected.extend_from_slice(&1.0f64.to_be_bytes());
        expected.extend_from_slice(&[0x90, 0x00]);
        assert_eq!(payload, expected);
        let removed = KvEvent::BlockRemoved {
            block_hashes: vec![127, 128, 1 << 16, 1 << 32],
            medium: Medium::Gpu,
        };
        let payload = encode_batch(1.0, &[removed], None).unwrap();
        let hashes_at = payload
            .windows(13)
            .position(|w| w == b"\xacBlockRemoved")
            .expect("the tag")
            + 13;
        assert_eq!(
            &payload[hashes_at..hashes_at + 19],
            b"\x94\x7f\xcc\x80\xce\x00\x01\x00\x00\xcf\x00\x00\x00\x01\x00\x00\x00\x00\xa3"
        );
    }

    #[test]
    fn end_marker_is_minus_one() {
        assert_eq!(END_SEQ, [0xff; 8]);
    }
}
