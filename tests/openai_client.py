"""`llmd serve` driven by the official `openai` Python client.

Run by `cargo test --test server` (test `openai_python_client`), or by hand:
    LLMD_BIN=target/debug/llmd python3 -m pytest -q tests/openai_client.py
The server is started here on a free loopback port with the stories260K model.
"""

import os
from pathlib import Path

import openai
import pytest
from llmd_process import start

ROOT = Path(__file__).resolve().parent.parent
MODEL = os.environ.get("LLMD_MODEL", str(ROOT.parent / "shared/models/stories260K"))
NAME = "stories"
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def server():
    proc, base = start(["serve", "--model", MODEL, "--served-model-name", NAME,
                        "--host", "127.0.0.1", "--port", "0", "--kv-cache-memory-gb", "0.02"])
    yield base
    proc.terminate()
    assert proc.wait(30) == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def greedy_completion(client, **kw):
    args = dict(model=NAME, prompt=PROMPT, max_tokens=32, temperature=0)
    args.update(kw)
    return client.completions.create(**args)


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == [NAME]


def test_completion(client):
    r = greedy_completion(client)
    assert r.object == "text_completion"
    assert r.model == NAME
    c = r.choices[0]
    assert c.text
    assert c.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 32
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # Greedy is deterministic.
    assert greedy_completion(client).choices[0].text == c.text


def test_streaming_completion_matches(client):
    want = greedy_completion(client).choices[0].text
    stream = greedy_completion(client, stream=True)
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == want


def test_chat(client):
    r = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=24, temperature=0
    )
    assert r.object == "chat.completion"
    m = r.choices[0].message
    assert m.role == "assistant" and m.content
    assert r.usage.completion_tokens > 0


def test_streaming_chat(client):
    msgs = [{"role": "user", "content": PROMPT}]
    full = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=24, temperature=0)
    stream = client.chat.completions.create(
        model=NAME, messages=msgs, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    text, roles, finish, usage = "", [], None, None
    for ch in stream:
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert roles == ["assistant"]
    assert text == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens


def test_n2(client):
    r = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=16, n=2,
        temperature=1.0, seed=5,
    )
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.message.content for c in r.choices)


def test_stop_strings(client):
    free = greedy_completion(client, max_tokens=40).choices[0].text
    stop = free[8:12]
    r = greedy_completion(client, max_tokens=40, stop=[stop, "never-appears"])
    cut = r.choices[0].text
    assert r.choices[0].finish_reason == "stop"
    assert free.startswith(cut) and stop not in cut


def test_seeded_sampling_reproducible(client):
    kw = dict(temperature=1.0, top_p=0.95, max_tokens=32, extra_body={"ignore_eos": True})
    a = greedy_completion(client, seed=1234, **kw).choices[0].text
    b = greedy_completion(client, seed=1234, **kw).choices[0].text
    assert a == b
    others = {greedy_completion(client, seed=s, **kw).choices[0].text for s in range(1, 5)}
    assert len(others | {a}) > 1


def test_completion_logprobs(client):
    r = greedy_completion(client, max_tokens=6, logprobs=2, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    # Greedy: the chosen token is the most likely one.
    for tok, l, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert abs(max(top.values()) - l) < 1e-4


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=6,
        temperature=0, logprobs=True, top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0
        assert len(t.top_logprobs) == 3
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4


def test_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="no-such-model", prompt=PROMPT)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt=PROMPT, top_p=3)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt=PROMPT, max_tokens=100000)
