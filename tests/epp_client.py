"""Plays Envoy against `llmd route --epp-port`, with Envoy's own protos (envoy-data-plane) over
grpclib: no code of ours on this side of the wire.

Usage: python3 epp_client.py HOST:PORT < scenarios.json > results.json

Each scenario (a JSON object) is one HTTP request as Envoy's ext_proc filter in
FULL_DUPLEX_STREAMED mode sends it: the request headers (with the subset hint as filter
metadata when given), then the body split into `chunks` pieces, then — when the router answers
with endpoints — the request is forwarded over HTTP to the endpoint it was given (the first,
or the second with `"served": "second"`, as Envoy's fallback would), and the response's headers
(with `envoy.lb` `x-gateway-destination-endpoint-served`) and body go back through the stream.
Keys:
  path, method (POST), body (a JSON object) or raw (a string sent as is), chunks (4),
  subset (a list of ip:port, or absent), headers (extra request headers),
  body_first (send a body chunk before the headers), forward (true), served ("first"),
  metrics_url (the router's /metrics, read while the response is still streaming).
`{"health": [names]}` asks grpc.health.v1 Check for each name instead.

One JSON object per scenario comes out, in order: what the router answered (an immediate
response's status and body; or the destination header, the envoy.lb metadata, the prefiller
header, the body given back), then what the worker answered and what the router echoed.
The request goes to the worker with the router's prefiller, trusted-hop and trace context
(`traceparent`, `tracestate`) headers.
"""

import asyncio
import json
import sys
import urllib.request

from envoy_data_plane.envoy.config.core.v3 import HeaderMap, HeaderValue, Metadata
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
    ProcessingModeBodySendMode as Mode,
)
from envoy_data_plane.envoy.service.ext_proc.v3 import (
    ExternalProcessorAsyncStub,
    HttpBody,
    HttpHeaders,
    ProcessingRequest,
    ProtocolConfiguration,
)
from envoy_data_plane.google.protobuf import Struct
from grpclib.client import Channel
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

FULL_DUPLEX = ProtocolConfiguration(
    request_body_mode=Mode.FULL_DUPLEX_STREAMED,
    response_body_mode=Mode.FULL_DUPLEX_STREAMED,
)


def headers(pairs):
    return HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs])


def header_mutation_value(common, name):
    """The value the router set for `name`, and whether it asked to remove it."""
    hm = common.header_mutation
    if hm is None:
        return None, False
    value = None
    for o in hm.set_headers:
        if o.header.key == name:
            value = o.header.raw_value.decode() or o.header.value
    return value, name in hm.remove_headers


def split(data, n):
    n = max(1, n)
    size = max(1, -(-len(data) // n))
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


async def scenario(channel, s):
    stub = ExternalProcessorAsyncStub(channel)
    queue = asyncio.Queue()

    async def outgoing():
        while True:
            m = await queue.get()
            if m is None:
                return
            yield m

    replies = stub.process(outgoing(), timeout=60)

    async def next_reply():
        try:
            return await asyncio.wait_for(replies.__anext__(), 60)
        except StopAsyncIteration:
            return None

    path = s.get("path", "/v1/completions")
    method = s.get("method", "POST")
    if "raw" in s:
        body = s["raw"].encode()
    elif "body" in s:
        body = json.dumps(s["body"]).encode()
    else:
        body = b""
    pieces = split(body, s.get("chunks", 4)) if body else []
    req_headers = [
        (":method", method),
        (":path", path),
        (":authority", "gateway.example"),
        (":scheme", "http"),
        ("content-type", "application/json"),
    ] + [(k, v) for k, v in s.get("headers", {}).items()]
    metadata = None
    if "subset" in s:
        metadata = Metadata(
            filter_metadata={
                "envoy.lb.subset_hint": Struct.from_dict(
                    {"x-gateway-destination-endpoint-subset": s["subset"]}
                )
            }
        )
    out = {"name": s.get("name")}
    if s.get("body_first"):
        queue.put_nowait(
            ProcessingRequest(
                request_body=HttpBody(body=b'{"prompt": "x"}', end_of_stream=True),
                protocol_config=FULL_DUPLEX,
            )
        )
    queue.put_nowait(
        ProcessingRequest(
            request_headers=HttpHeaders(
                headers=headers(req_headers), end_of_stream=not pieces
            ),
            metadata_context=metadata,
            protocol_config=FULL_DUPLEX,
        )
    )
    for i, p in enumerate(pieces):
        queue.put_nowait(
            ProcessingRequest(
                request_body=HttpBody(body=p, end_of_stream=i + 1 == len(pieces))
            )
        )
    if "abandon_after" in s:
        # The client leaves while the request waits: the gateway cancels the stream.
        try:
            first = await asyncio.wait_for(replies.__anext__(), s["abandon_after"])
        except asyncio.TimeoutError:
            await replies.aclose()
            out["abandoned"] = True
            queue.put_nowait(None)
            return out
    else:
        first = await next_reply()
    if first is None:
        out["closed"] = True
        queue.put_nowait(None)
        return out
    if first.immediate_response is not None:
        ir = first.immediate_response
        out["immediate"] = {
            "status": ir.status.code if ir.status else None,
            "body": ir.body.decode(errors="replace"),
            "content_type": next(
                (o.header.raw_value.decode() or o.header.value)
                for o in (ir.headers.set_headers if ir.headers else [])
                if o.header.key == "content-type"
            ),
        }
        queue.put_nowait(None)
        return out
    hr = first.request_headers
    assert hr is not None, f"the first answer is not a headers response: {first}"
    common = hr.response
    dest, _ = header_mutation_value(common, "x-gateway-destination-endpoint")
    prefiller, prefiller_removed = header_mutation_value(common, "x-prefiller-host-port")
    hop, hop_removed = header_mutation_value(common, "x-llmd-trusted-hop")
    length, _ = header_mutation_value(common, "content-length")
    md = first.dynamic_metadata.to_dict() if first.dynamic_metadata else {}
    out.update(
        header=dest,
        metadata=md.get("envoy.lb", {}).get("x-gateway-destination-endpoint"),
        prefiller=prefiller,
        prefiller_removed=prefiller_removed,
        hop=hop,
        hop_removed=hop_removed,
        content_length=length,
        clear_route_cache=common.clear_route_cache,
    )
    # The body comes back (mutated) in streamed body responses, the last one ending it.
    back = b""
    if pieces:
        while True:
            r = await next_reply()
            assert r is not None and r.request_body is not None, f"not a body response: {r}"
            sr = r.request_body.response.body_mutation.streamed_response
            back += sr.body
            if sr.end_of_stream:
                break
    out["body_back"] = back.decode(errors="replace")
    if s.get("hold"):
        # Routed, never answered: the request stays in flight until the stand-in ends (the
        # reply stream is kept too: dropping it would cancel the call).
        HELD.append((queue, replies))
        return out
    if not s.get("forward", True):
        queue.put_nowait(None)
        return out
    endpoints = dest.split(",")
    target = endpoints[1] if s.get("served") == "second" else endpoints[0]
    out["served"] = target
    # Forward as Envoy would: the picked endpoint, the request headers as mutated.
    fwd_headers = {"content-type": "application/json"}
    if prefiller:
        fwd_headers["x-prefiller-host-port"] = prefiller
    if hop:
        fwd_headers["x-llmd-trusted-hop"] = hop
    # The trace context the router set (W3C traceparent/tracestate), as Envoy applies it.
    for name in ("traceparent", "tracestate"):
        value, _ = header_mutation_value(common, name)
        if value:
            fwd_headers[name] = value
    req = urllib.request.Request(
        f"http://{target}{path}",
        data=back if pieces else None,
        method=method,
        headers=fwd_headers,
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            status, payload = resp.status, resp.read()
            content_type = resp.headers.get("content-type", "application/json")
    except urllib.error.HTTPError as e:
        status, payload = e.code, e.read()
        content_type = e.headers.get("content-type", "application/json")
    out["status"] = status
    out["response"] = payload.decode(errors="replace")
    queue.put_nowait(
        ProcessingRequest(
            response_headers=HttpHeaders(
                headers=headers([(":status", str(status)), ("content-type", content_type)])
            ),
            metadata_context=Metadata(
                filter_metadata={
                    "envoy.lb": Struct.from_dict(
                        {"x-gateway-destination-endpoint-served": target}
                    )
                }
            ),
        )
    )
    r = await next_reply()
    assert r is not None and r.response_headers is not None, f"not a response headers answer: {r}"
    if "metrics_url" in s:
        with urllib.request.urlopen(s["metrics_url"], timeout=30) as m:
            out["metrics"] = m.read().decode()
    echoed = b""
    parts = split(payload, 2)
    for i, p in enumerate(parts):
        queue.put_nowait(
            ProcessingRequest(response_body=HttpBody(body=p, end_of_stream=i + 1 == len(parts)))
        )
        r = await next_reply()
        assert r is not None and r.response_body is not None, f"not a body answer: {r}"
        bm = r.response_body.response.body_mutation
        echoed += bm.streamed_response.body if bm else b""
    out["echoed_intact"] = echoed == payload
    queue.put_nowait(None)
    # The router ends the stream when the gateway does.
    out["closed"] = await next_reply() is None
    return out


# Streams of requests routed and held open ("hold"), ended when the stand-in ends.
HELD = []


async def health(channel, names):
    stub = HealthStub(channel)
    res = {}
    for n in names:
        try:
            r = await stub.Check(HealthCheckRequest(service=n), timeout=10)
            res[n] = HealthCheckResponse.ServingStatus.Name(r.status)
        except GRPCError as e:
            res[n] = f"error:{e.status.name}"
    return {"health": res}


async def main():
    host, port = sys.argv[1].rsplit(":", 1)
    scenarios = json.load(sys.stdin)
    results = []
    channel = Channel(host, int(port))
    try:
        for s in scenarios:
            if "health" in s:
                results.append(await health(channel, s["health"]))
            elif "metrics_url" in s and len(s) == 1:
                with urllib.request.urlopen(s["metrics_url"], timeout=30) as m:
                    results.append({"metrics": m.read().decode()})
            else:
                results.append(await scenario(channel, s))
        for q, _ in HELD:
            q.put_nowait(None)
    finally:
        channel.close()
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    asyncio.run(main())
