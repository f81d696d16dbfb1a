"""The bindings return what the Rust engine returns for the same request and seed."""

import pytest

from llmd import SamplingParams

PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben went to the park", "One day"]


def _check(ours, theirs):
    assert len(ours) == len(theirs)
    for o, r in zip(ours, theirs):
        c = o.outputs[0]
        assert c.token_ids == r["token_ids"]
        assert c.text == r["text"]
        assert c.finish_reason == r["finish_reason"]
        assert len(o.prompt_token_ids) == r["num_prompt_tokens"]
        assert o.finished


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.0, "max_tokens": 40},
        {"temperature": 0.8, "seed": 7, "max_tokens": 48},
        {"temperature": 1.0, "top_p": 0.9, "top_k": 40, "seed": 123, "max_tokens": 32},
        {"temperature": 0.7, "min_p": 0.05, "repetition_penalty": 1.3, "seed": 5,
         "max_tokens": 32},
        {"temperature": 0.9, "presence_penalty": 0.5, "frequency_penalty": 0.4, "seed": 11,
         "max_tokens": 32, "stop": ["."]},
    ],
)
def test_same_tokens_as_rust_for_the_same_seed(stories, stories_dir, reference, params):
    ours = stories.generate(PROMPTS, SamplingParams(**params), use_tqdm=False)
    for o, p in zip(ours, PROMPTS):
        assert o.prompt == p
    _check(ours, reference(stories_dir, PROMPTS, params))


def test_logprobs_match_rust(stories, stories_dir, reference):
    params = {"temperature": 0.8, "seed": 3, "max_tokens": 24, "logprobs": 3}
    ours = stories.generate(PROMPTS[:2], SamplingParams(**params), use_tqdm=False)
    theirs = reference(stories_dir, PROMPTS[:2], params)
    _check(ours, theirs)
    for o, r in zip(ours, theirs):
        c = o.outputs[0]
        assert len(c.logprobs) == len(c.token_ids)
        sampled = [pos[t].logprob for pos, t in zip(c.logprobs, c.token_ids)]
        assert sampled == pytest.approx(r["logprobs"], abs=1e-6)
        assert c.cumulative_logprob == pytest.approx(sum(r["logprobs"]), abs=1e-4)
        for pos in c.logprobs:
            ranks = sorted(lp.rank for lp in pos.values() if lp.rank is not None)
            assert ranks == [1, 2, 3]
            assert all(isinstance(lp.decoded_token, str) for lp in pos.values())


def test_token_id_prompts_match_rust(stories, stories_dir, reference):
    ids = [stories.encode(p) for p in PROMPTS]
    params = {"temperature": 0.6, "seed": 9, "max_tokens": 30}
    ours = stories.generate(ids, SamplingParams(**params), use_tqdm=False)
    for o, i in zip(ours, ids):
        assert o.prompt is None
        assert o.prompt_token_ids == i
    _check(ours, reference(stories_dir, ids, params))
    # vLLM's prompt dicts and a single token-id list are the same prompts.
    one = stories.generate(ids[0], SamplingParams(**params), use_tqdm=False)
    dicts = stories.generate([{"prompt_token_ids": i} for i in ids], SamplingParams(**params),
                             use_tqdm=False)
    assert one[0].outputs[0].token_ids == ours[0].outputs[0].token_ids
    assert [d.outputs[0].token_ids for d in dicts] == [o.outputs[0].token_ids for o in ours]


def test_batch_of_64_prompts(stories, stories_dir, reference):
    prompts = [f"{PROMPTS[i % 4]} {'and ' * (i % 7)}the {i}" for i in range(64)]
    params = {"temperature": 0.8, "seed": 42, "max_tokens": 40}
    ours = stories.generate(prompts, SamplingParams(**params), use_tqdm=False)
    assert [o.prompt for o in ours] == prompts
    assert len({o.request_id for o in ours}) == 64
    _check(ours, reference(stories_dir, prompts, params))


def test_per_prompt_params_and_n(stories):
    # One SamplingParams per prompt: each prompt gets its own.
    a = SamplingParams(temperature=0.0, max_tokens=5)
    b = SamplingParams(temperature=0.0, max_tokens=9)
    outs = stories.generate(PROMPTS[:2], [a, b], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [5, 9]
    # n choices: choice j runs with seed + j, as the HTTP server does.
    many = stories.generate(PROMPTS[0], SamplingParams(n=3, seed=20, max_tokens=20),
                            use_tqdm=False)[0]
    assert [c.index for c in many.outputs] == [0, 1, 2]
    for j, c in enumerate(many.outputs):
        single = stories.generate(PROMPTS[0], SamplingParams(seed=20 + j, max_tokens=20),
                                  use_tqdm=False)[0]
        assert c.token_ids == single.outputs[0].token_ids


def test_chat_template_matches_rust(smol, smol_dir, reference):
    question = "What is the capital of France?"
    params = {"temperature": 0.0, "max_tokens": 24}
    ours = smol.chat([{"role": "user", "content": question}], SamplingParams(**params),
                     use_tqdm=False)
    theirs = reference(smol_dir, [question], params, chat=True)
    _check(ours, theirs)
    # The prompt is the rendered template, tokenized without adding special tokens again.
    prompt = ours[0].prompt
    assert f"<|im_start|>user\n{question}<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    # A batch of conversations, and content given as OpenAI's text parts.
    batch = smol.chat(
        [
            [{"role": "user", "content": question}],
            [{"role": "user", "content": [{"type": "text", "text": question}]}],
        ],
        SamplingParams(**params),
        use_tqdm=False,
    )
    assert [b.outputs[0].token_ids for b in batch] == [theirs[0]["token_ids"]] * 2
    # Without the assistant's turn opened, the prompt ends after the user's message.
    closed = smol.chat([{"role": "user", "content": question}], SamplingParams(max_tokens=1),
                       use_tqdm=False, add_generation_prompt=False)
    assert not closed[0].prompt.endswith("<|im_start|>assistant\n")


def test_engine_options_keep_the_output(stories_dir, reference, tmp_path):
    """Block size, no prefix caching, and KV offloading to host memory and disk change where KV
    lives, never what is generated."""
    from llmd import LLM

    params = {"temperature": 0.8, "seed": 31, "max_tokens": 24}
    theirs = reference(stories_dir, PROMPTS, params)
    for kwargs in (
        {"block_size": 32, "enable_prefix_caching": False, "max_num_seqs": 2},
        {"kv_offloading_size": 0.01, "kv_offloading_backend": "native",
         "kv_disk_path": str(tmp_path / "kv"), "kv_disk_gb": 0.01},
    ):
        llm = LLM(stories_dir, device="cpu", kv_cache_memory_gb=0.05, **kwargs)
        for _ in range(2):  # the second time, prefixes may come back from the tiers
            _check(llm.generate(PROMPTS, SamplingParams(**params), use_tqdm=False), theirs)
        del llm
