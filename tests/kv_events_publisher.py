#!/usr/bin/env python3
"""Play a vLLM worker's KV-event publisher: a pyzmq PUB socket that connects to a router's bound
SUB socket (llm-d's centralized topology) and sends vLLM's batches under a topic.

    python3 tests/kv_events_publisher.py --endpoint tcp://127.0.0.1:5557 \\
        --topic kv@127.0.0.1:8000@model --tokens '[1, 2, ...]' --block-size 16

Needs `python3 -m pip install pyzmq msgpack`.

Each message is vLLM's three frames: the topic, the sequence number (8 bytes big-endian, from 0,
one more per batch), and the msgpack `[ts, [event], data_parallel_rank]` as msgspec writes
vLLM's array-like `KVEventBatch`. The event is a `BlockStored` of every full block of --tokens,
in vLLM's positional layout:
  ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
   lora_name, extra_keys, group_idx, kv_cache_spec_kind, kv_cache_spec_sliding_window]
with hashes of this script's own (a subscriber keys blocks by their tokens). The same batch is
sent every --interval seconds (a PUB drops what it sends before the subscription reaches it)
until --count batches are sent (0: until killed); `SENT <seq>` is printed for each.
"""

import argparse
import hashlib
import json
import time

import msgpack
import zmq


def block_hash(parent, tokens):
    """A 64-bit hash of a block chained on its parent's (any stable hash will do)."""
    data = (parent or 0).to_bytes(8, "big") + b"".join(t.to_bytes(4, "big") for t in tokens)
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", required=True, help="the SUB socket to connect to")
    parser.add_argument("--topic", required=True, help="e.g. kv@10.0.0.7:8000@model")
    parser.add_argument("--tokens", required=True, help="JSON list of the prompt's token ids")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--count", type=int, default=0)
    args = parser.parse_args()

    tokens = json.loads(args.tokens)
    bs = args.block_size
    full = tokens[: len(tokens) // bs * bs]
    assert full, f"fewer than {bs} tokens: no full block"
    hashes, parent = [], None
    for i in range(0, len(full), bs):
        parent = block_hash(parent, full[i : i + bs])
        hashes.append(parent)
    stored = [
        "BlockStored",
        hashes,
        None,
        full,
        bs,
        None,
        "GPU",
        None,
        [None] * len(hashes),
        0,
        "full_attention",
        None,
    ]

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(args.endpoint)
    seq = 0
    while args.count == 0 or seq < args.count:
        payload = msgpack.packb([time.time(), [stored], 0], use_bin_type=True)
        pub.send_multipart([args.topic.encode(), seq.to_bytes(8, "big"), payload])
        print(f"SENT {seq}", flush=True)
        seq += 1
        time.sleep(args.interval)
    pub.close()
    ctx.term()


if __name__ == "__main__":
    main()
