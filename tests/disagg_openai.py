"""Disaggregated prefill/decode end to end with the official `openai` client: three real
processes on loopback — a prefiller (`llmd serve`, kv_producer), a decoder (kv_consumer) and
`llmd sidecar` in front of the decoder — against a single `llmd serve`, greedy, for completions
and chat, streamed and not. The client talks only to the sidecar and names the prefiller in
`x-prefiller-host-port`, as llm-d's scheduler does.

Run by `cargo test --test server` (test `disaggregated_serving_with_the_openai_client`), or:
    LLMD_BIN=target/debug/llmd LLMD_MODEL=../shared/models/stories260K \\
        python3 -m pytest -q tests/disagg_openai.py
"""

import os
import urllib.request
from pathlib import Path

import openai
import pytest
from llmd_process import free_port, start

ROOT = Path(__file__).resolve().parent.parent
MODEL = os.environ.get("LLMD_MODEL", str(ROOT.parent / "shared/models/stories260K"))
NAME = "m"
STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside. " * 6


# Extra `llmd serve` flags for bigger models (e.g. "--max-model-len 512 --kv-cache-memory-gb 0.1").
SERVE_ARGS = os.environ.get("LLMD_SERVE_ARGS", "--kv-cache-memory-gb 0.02").split()


def serve(*extra):
    return start(["serve", "--model", MODEL, "--served-model-name", NAME, "--host", "127.0.0.1",
                  "--port", "0", *SERVE_ARGS, *extra])


def metric(base, name):
    with urllib.request.urlopen(base + "/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    side = free_port()
    # The deployment's cluster secret: the workers believe the sidecar's kv_transfer_params
    # (it proves the secret) and the decoder and prefiller prove it to each other.
    secret = tmp_path_factory.mktemp("secret") / "cluster-secret"
    secret.write_text(os.urandom(32).hex())
    with_secret = ("--kv-transfer-secret-file", str(secret))
    procs = []
    try:
        single = serve()
        procs.append(single[0])
        prefill = serve("--kv-transfer-config", '{"kv_connector": "NixlConnector", "kv_role": "kv_producer"}',
                        "--kv-transfer-port", str(side), *with_secret)
        procs.append(prefill[0])
        decode = serve("--kv-transfer-config", '{"kv_connector": "NixlConnector", "kv_role": "kv_consumer"}',
                       *with_secret)
        procs.append(decode[0])
        decoder_port = decode[1].rsplit(":", 1)[1]
        sidecar = start(["sidecar", "--host", "127.0.0.1", "--port", "0", "--decoder-port", decoder_port,
                         "--prefiller-allowlist", "127.0.0.1:*", *with_secret])
        procs.append(sidecar[0])
        yield {
            "single": single[1],
            "prefill": prefill[1],
            "decode": decode[1],
            "sidecar": sidecar[1],
            "prefiller_host_port": prefill[1].removeprefix("http://"),
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)


def clients(c):
    single = openai.OpenAI(base_url=c["single"] + "/v1", api_key="unused", max_retries=0)
    pd = openai.OpenAI(
        base_url=c["sidecar"] + "/v1",
        api_key="unused",
        max_retries=0,
        default_headers={"x-prefiller-host-port": c["prefiller_host_port"]},
    )
    return single, pd


@pytest.mark.parametrize("stream", [False, True])
def test_completions_match_a_single_worker(cluster, stream):
    single, pd = clients(cluster)
    args = dict(model=NAME, prompt=STORY, max_tokens=24, temperature=0)
    want = single.completions.create(**args).choices[0].text
    if stream:
        got = "".join(c.choices[0].text for c in pd.completions.create(stream=True, **args) if c.choices)
    else:
        got = pd.completions.create(**args).choices[0].text
    assert got == want


@pytest.mark.parametrize("stream", [False, True])
def test_chat_matches_a_single_worker(cluster, stream):
    single, pd = clients(cluster)
    args = dict(model=NAME, messages=[{"role": "user", "content": STORY}], max_tokens=24, temperature=0)
    want = single.chat.completions.create(**args).choices[0].message.content
    if stream:
        chunks = pd.chat.completions.create(stream=True, **args)
        got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        got = pd.chat.completions.create(**args).choices[0].message.content
    assert got == want


def test_the_decoder_computed_no_prompt_token_and_received_blocks(cluster):
    # Runs after the four above (pytest keeps file order).
    assert metric(cluster["decode"], "llmd:prompt_tokens_computed_total") == 0
    assert metric(cluster["decode"], "llmd:kv_transfer_pulls_total") >= 4
    assert metric(cluster["decode"], "llmd:kv_transfer_blocks_received_total") > 0
    assert metric(cluster["prefill"], "llmd:kv_transfer_pulls_served_total") >= 4


def test_without_the_header_the_decoder_serves_alone(cluster):
    single, _ = clients(cluster)
    direct = openai.OpenAI(base_url=cluster["sidecar"] + "/v1", api_key="unused", max_retries=0)
    args = dict(model=NAME, prompt="Tom had a red kite.", max_tokens=8, temperature=0)
    assert direct.completions.create(**args).choices[0].text == single.completions.create(**args).choices[0].text


def test_a_dead_prefiller_means_decode_only(cluster):
    single = openai.OpenAI(base_url=cluster["single"] + "/v1", api_key="unused", max_retries=0)
    dead = openai.OpenAI(
        base_url=cluster["sidecar"] + "/v1",
        api_key="unused",
        max_retries=0,
        default_headers={"x-prefiller-host-port": f"127.0.0.1:{free_port()}"},
    )
    args = dict(model=NAME, prompt=STORY, max_tokens=12, temperature=0)
    assert dead.completions.create(**args).choices[0].text == single.completions.create(**args).choices[0].text


def test_a_prefiller_4xx_reaches_the_client(cluster):
    _, pd = clients(cluster)
    with pytest.raises(openai.BadRequestError):
        pd.completions.create(model=NAME, prompt=STORY, max_tokens=8, temperature=-1)
