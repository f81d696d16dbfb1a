#!/usr/bin/env python3
"""Subscribe to an llmd (or vLLM) KV-cache event stream, check its wire format, and replay it.

    python3 tests/kv_events_subscriber.py --endpoint tcp://127.0.0.1:5557 \\
        --replay tcp://127.0.0.1:5558 --topic kv@pod@model --expect 10

Needs `python3 -m pip install pyzmq msgpack` (and `msgspec` for the byte-for-byte check, which
CI, with `CI` set, must run).

What it does:
1. Connects a SUB socket to --endpoint (with --bind, binds it there for the publisher to connect
   to: llm-d's centralized topology), subscribed to --topic, waits 300 ms (ZeroMQ drops what a
   PUB sends before the subscription reaches it) and prints `READY`.
2. Receives --expect batches (0: until interrupted), printing `TOPIC <topic>` then
   `JOINED <seq>` at the first (with --exact-topic every topic must be --topic itself). Each
   message must be three frames: the topic, an 8-byte big-endian sequence number, a msgpack
   `[ts, [event, ...], data_parallel_rank]`; sequence numbers must follow one another from the
   first seen; every event must have vLLM's positional layout and field types:
     ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
      lora_name, extra_keys, group_idx, kv_cache_spec_kind, kv_cache_spec_sliding_window]
     ["BlockRemoved", block_hashes, medium, group_idx]
     ["AllBlocksCleared"]
   (Older vLLM versions lack the trailing fields, so shorter arrays are valid.) With msgspec
   installed, each payload must also be exactly what msgspec writes for vLLM's event structs.
3. With --replay, asks a DEALER for every batch from sequence 0 and checks the answer: in order,
   gap-free (from 0 with --pattern; a long-running publisher keeps only its latest batches),
   reaching the last live one, each `[b"", topic, seq, payload]` with the payload sent live for
   that seq, then the end marker `[b"", b"", -1 (8 bytes), b""]`.

--pattern checks every field's value too, against the batches tests/kv_events.rs publishes
(`batch_for_seq` there; `expected_batch` here — keep the two in step).
"""

import argparse
import json
import os
import sys
import time

import msgpack
import zmq

END_SEQ = (-1).to_bytes(8, "big", signed=True)
U64_MAX = 2**64 - 1


# Field name, type check, and default (what a vLLM that predates the field means), in order.
def _uint(v):
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= U64_MAX


_HASH = ("hash", _uint)
_INT = ("int", _uint)
_OPT_INT = ("int or nil", lambda v: v is None or _uint(v))
_OPT_STR = ("str or nil", lambda v: v is None or isinstance(v, str))
_HASHES = ("list of hashes", lambda v: isinstance(v, list) and all(_HASH[1](h) for h in v))
_TOKENS = ("list of token ids", lambda v: isinstance(v, list) and all(_INT[1](t) for t in v))
_OPT_HASH = ("hash or nil", lambda v: v is None or _HASH[1](v))
_EXTRA_KEYS = (
    "list of (list or nil), or nil",
    lambda v: v is None
    or (isinstance(v, list) and all(k is None or isinstance(k, list) for k in v)),
)
REQUIRED = object()
LAYOUTS = {
    "BlockStored": [
        ("block_hashes", _HASHES, REQUIRED),
        ("parent_block_hash", _OPT_HASH, REQUIRED),
        ("token_ids", _TOKENS, REQUIRED),
        ("block_size", _INT, REQUIRED),
        ("lora_id", _OPT_INT, REQUIRED),
        ("medium", _OPT_STR, REQUIRED),
        ("lora_name", _OPT_STR, REQUIRED),
        ("extra_keys", _EXTRA_KEYS, None),
        ("group_idx", _OPT_INT, None),
        ("kv_cache_spec_kind", _OPT_STR, None),
        ("kv_cache_spec_sliding_window", _OPT_INT, None),
    ],
    "BlockRemoved": [
        ("block_hashes", _HASHES, REQUIRED),
        ("medium", _OPT_STR, REQUIRED),
        ("group_idx", _OPT_INT, None),
    ],
    "AllBlocksCleared": [],
}


def check_event(event, where):
    """Checks one event's layout and types; returns it with omitted trailing fields filled in."""
    assert isinstance(event, list) and event, f"{where}: event is not a tagged array: {event!r}"
    tag = event[0]
    assert tag in LAYOUTS, f"{where}: unknown tag {tag!r}"
    layout = LAYOUTS[tag]
    fields = event[1:]
    assert len(fields) <= len(
        layout
    ), f"{where}: {tag} has {len(fields)} fields, at most {len(layout)}"
    full = [tag]
    for i, (name, (kind, ok), default) in enumerate(layout):
        if i < len(fields):
            value = fields[i]
        else:
            assert default is not REQUIRED, f"{where}: {tag} lacks its required field {name}"
            value = default
        assert ok(value), f"{where}: {tag}.{name} should be {kind}, got {value!r}"
        full.append(value)
    if tag == "BlockStored":
        hashes, tokens, block_size, extra_keys = full[1], full[3], full[4], full[8]
        assert block_size > 0, f"{where}: block_size is 0"
        assert (
            len(tokens) == len(hashes) * block_size
        ), f"{where}: {len(tokens)} tokens for {len(hashes)} blocks of {block_size}"
        assert extra_keys is None or len(extra_keys) == len(
            hashes
        ), f"{where}: {len(extra_keys)} extra_keys entries for {len(hashes)} blocks"
    return full


def check_batch(payload, where):
    batch = msgpack.unpackb(payload, raw=False)
    assert (
        isinstance(batch, list) and 2 <= len(batch) <= 3
    ), f"{where}: batch is not [ts, events, rank]: {batch!r}"
    ts, events = batch[0], batch[1]
    rank = batch[2] if len(batch) == 3 else None
    assert isinstance(ts, float), f"{where}: ts should be a float, got {ts!r}"
    assert abs(ts - time.time()) < 3600, f"{where}: ts {ts} is not near now"
    assert isinstance(events, list), f"{where}: events should be a list, got {events!r}"
    assert rank is None or _uint(rank), f"{where}: bad data_parallel_rank {rank!r}"
    return ts, [check_event(e, f"{where} event {i}") for i, e in enumerate(events)], rank


def msgspec_check():
    """A function asserting a payload is byte for byte what msgspec writes for vLLM's structs,
    or None without msgspec."""
    try:
        import msgspec
    except ImportError:
        return None

    # vLLM's event structs while they were array_like (as llm-d's indexer decodes them).
    class Event(msgspec.Struct, array_like=True, omit_defaults=True, tag=True):
        pass

    class BlockStored(Event):
        block_hashes: list[int]
        parent_block_hash: int | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None
        lora_name: str | None
        extra_keys: list[list | None] | None = None
        group_idx: int | None = None
        kv_cache_spec_kind: str | None = None
        kv_cache_spec_sliding_window: int | None = None

    class BlockRemoved(Event):
        block_hashes: list[int]
        medium: str | None
        group_idx: int | None = None

    class AllBlocksCleared(Event):
        pass

    class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True):
        ts: float
        events: list[BlockStored | BlockRemoved | AllBlocksCleared]
        data_parallel_rank: int | None = None

    decoder = msgspec.msgpack.Decoder(KVEventBatch)
    encoder = msgspec.msgpack.Encoder()

    def check(payload, where):
        again = encoder.encode(decoder.decode(payload))
        assert again == payload, f"{where}: msgspec writes {again.hex()}, got {payload.hex()}"

    return check


def expected_batch(seq):
    """The events tests/kv_events.rs publishes as batch `seq`, in vLLM's full layout."""
    hashes = [seq * 1000 + 1, U64_MAX - seq]
    parent = None if seq % 2 == 0 else seq * 1000
    tokens = [seq + i for i in range(8)]

    def stored(medium):
        return [
            "BlockStored",
            hashes,
            parent,
            tokens,
            4,
            None,
            medium,
            None,
            [None, None],
            0,
            "full_attention",
            None,
        ]

    kind = seq % 3
    if kind == 0:
        return [stored("GPU")]
    if kind == 1:
        return [["BlockRemoved", hashes, "CPU", 0]]
    return [["AllBlocksCleared"], stored("DISK")]


def recv(sock, timeout_s, what):
    """The next message; waits forever when timeout_s is None."""
    if not sock.poll(None if timeout_s is None else int(timeout_s * 1000)):
        raise AssertionError(f"no {what} within {timeout_s} s")
    return sock.recv_multipart()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--endpoint", required=True, help="PUB endpoint to connect, e.g. tcp://127.0.0.1:5557"
    )
    parser.add_argument(
        "--replay", help="ROUTER replay endpoint to connect, e.g. tcp://127.0.0.1:5558"
    )
    parser.add_argument(
        "--bind", action="store_true", help="bind --endpoint (the publisher connects to it)"
    )
    parser.add_argument("--topic", default="", help="topic to subscribe to (a prefix)")
    parser.add_argument(
        "--exact-topic", action="store_true", help="every topic must be --topic, not a longer one"
    )
    parser.add_argument(
        "--expect", type=int, default=0, help="batches to receive before replaying (0: forever)"
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for each message"
    )
    parser.add_argument(
        "--pattern", action="store_true", help="check values against tests/kv_events.rs's batches"
    )
    parser.add_argument("--quiet", action="store_true", help="do not print the events")
    parser.add_argument(
        "--dump", help="write the replayed (else live) batches as JSON [[seq, events], ...] here"
    )
    args = parser.parse_args()
    topic = args.topic.encode()
    same_as_msgspec = msgspec_check()
    if same_as_msgspec is None:
        if os.environ.get("CI"):
            sys.exit("msgspec is not installed: CI must run the byte-for-byte check")
        print("msgspec is not installed: skipping the byte-for-byte check", file=sys.stderr)

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    if args.bind:
        sub.bind(args.endpoint)
    else:
        sub.connect(args.endpoint)
    time.sleep(0.3)
    print("READY", flush=True)

    live = {}
    last = None
    while args.expect == 0 or len(live) < args.expect:
        frames = recv(sub, args.timeout if args.expect else None, "live batch")
        assert len(frames) == 3, f"live message has {len(frames)} frames, not [topic, seq, payload]"
        got_topic, seq_bytes, payload = frames
        assert got_topic.startswith(topic), f"topic {got_topic!r} does not start with {topic!r}"
        if args.exact_topic:
            assert got_topic == topic, f"topic {got_topic!r} is not {topic!r}"
        assert len(seq_bytes) == 8, f"sequence frame is {len(seq_bytes)} bytes, not 8"
        seq = int.from_bytes(seq_bytes, "big")
        if last is None:
            print(f"TOPIC {got_topic.decode()}", flush=True)
            print(f"JOINED {seq}", flush=True)
        else:
            assert seq == last + 1, f"sequence gap: {last} then {seq}"
        last = seq
        where = f"live batch {seq}"
        ts, events, rank = check_batch(payload, where)
        if same_as_msgspec:
            same_as_msgspec(payload, where)
        if args.pattern:
            assert events == expected_batch(seq), f"{where}: {events!r} != {expected_batch(seq)!r}"
            assert rank == 0, f"{where}: data_parallel_rank {rank!r}, expected 0"
        live[seq] = payload
        if not args.quiet:
            print(f"seq {seq} ts {ts:.3f} rank {rank}: {events}", flush=True)

    replayed = []
    replayed_events = []
    if args.replay:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(args.replay)
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        while True:
            frames = recv(dealer, args.timeout, "replay message")
            assert (
                len(frames) == 4 and frames[0] == b""
            ), f"replay message is not [b'', topic, seq, payload]: {len(frames)} frames"
            _, got_topic, seq_bytes, payload = frames
            if seq_bytes == END_SEQ:
                assert got_topic == b"" and payload == b"", f"end marker carries data: {frames!r}"
                break
            assert got_topic.startswith(
                topic
            ), f"replayed topic {got_topic!r} does not start with {topic!r}"
            seq = int.from_bytes(seq_bytes, "big")
            where = f"replayed batch {seq}"
            if replayed:
                assert seq == replayed[-1] + 1, f"replay gap: {replayed[-1]} then {seq}"
            elif args.pattern:
                assert seq == 0, f"replay from 0 started at {seq}"
            _, events, _ = check_batch(payload, where)
            if same_as_msgspec:
                same_as_msgspec(payload, where)
            if args.pattern:
                assert events == expected_batch(
                    seq
                ), f"{where}: {events!r} != {expected_batch(seq)!r}"
            if seq in live:
                assert payload == live[seq], f"{where} differs from the live one"
            replayed.append(seq)
            replayed_events.append([seq, events])
        assert last is None or (
            replayed and replayed[-1] >= last
        ), f"replay ended before the last live batch, {last}"
        dealer.close()
    if args.dump:
        batches = replayed_events or [[q, check_batch(p, "dump")[1]] for q, p in sorted(live.items())]
        with open(args.dump, "w") as f:
            json.dump(batches, f)
    sub.close()
    ctx.term()
    print(f"OK: {len(live)} live batches, {len(replayed)} replayed", flush=True)


if __name__ == "__main__":
    main()
