"""Streaming: deltas that add up to what generate returns; closing a stream aborts it."""

from conftest import wait_for_idle
from llmd import SamplingParams

PROMPT = "Once upon a time"


def test_deltas_join_to_the_generated_output(stories):
    p = SamplingParams(temperature=0.8, seed=17, max_tokens=40, logprobs=1)
    whole = stories.generate(PROMPT, p, use_tqdm=False)[0].outputs[0]
    text, ids, n = "", [], 0
    deltas = list(stories.stream(PROMPT, p))
    for d in deltas:
        assert d.prompt == PROMPT
        assert len(d.outputs) == 1
        c = d.outputs[0]
        text += c.text
        ids += c.token_ids
        n += 1
        assert len(c.logprobs) == len(c.token_ids)
    assert n > 1
    assert ids == whole.token_ids and text == whole.text
    assert [d.finished for d in deltas] == [False] * (n - 1) + [True]
    last = deltas[-1].outputs[0]
    assert last.finish_reason == whole.finish_reason
    assert abs(last.cumulative_logprob - whole.cumulative_logprob) < 1e-4


def test_n_choices_stream_interleaved(stories):
    p = SamplingParams(n=2, seed=5, max_tokens=12)
    whole = stories.generate(PROMPT, p, use_tqdm=False)[0]
    got = {0: [], 1: []}
    for d in stories.stream(PROMPT, p):
        for c in d.outputs:
            got[c.index] += c.token_ids
    assert got == {c.index: c.token_ids for c in whole.outputs}


def test_leaving_a_stream_early_aborts_it(stories):
    p = SamplingParams(max_tokens=400, ignore_eos=True)
    with stories.stream(PROMPT, p) as s:
        first = next(s)
        assert not first.finished
        assert stories.stats()["num_free_blocks"] < stories.stats()["num_total_blocks"]
    s = wait_for_idle(stories)
    assert s["num_free_blocks"] == s["num_total_blocks"]
    # Dropping an unfinished stream does the same.
    it = stories.stream(PROMPT, p)
    next(it)
    del it
    s = wait_for_idle(stories)
    assert s["num_free_blocks"] == s["num_total_blocks"]


def test_stream_chat(smol):
    p = SamplingParams(temperature=0.0, max_tokens=10)
    msgs = [{"role": "user", "content": "Hi!"}]
    whole = smol.chat(msgs, p, use_tqdm=False)[0]
    deltas = list(smol.stream_chat(msgs, p))
    assert deltas[0].prompt == whole.prompt
    assert sum((d.outputs[0].token_ids for d in deltas), []) == whole.outputs[0].token_ids
