"""Every error path raises the Python exception vLLM users expect, and leaves the engine's KV
pool whole."""

import pytest

from conftest import wait_for_idle
from llmd import LLM, EngineDeadError, SamplingParams


def test_missing_model_is_an_os_error(tmp_path):
    with pytest.raises(OSError, match="no-such-model"):
        LLM(str(tmp_path / "no-such-model"), device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError):
        LLM(str(empty), device="cpu")


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"device": "tpu"}, "device"),
        ({"block_size": 3}, "block_size"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"kv_cache_memory_gb": -1.0}, "kv_cache_memory_gb"),
        ({"num_gpu_blocks_override": 1}, "num_blocks"),
        ({"tensor_parallel_size": 2}, "tensor_parallel_size"),
        ({"dtype": "float16"}, "dtype"),
        ({"kv_offloading_backend": "lmcache"}, "kv_offloading_backend"),
        ({"kv_offloading_size": 1.0, "enable_prefix_caching": False}, "prefix caching"),
    ],
)
def test_bad_engine_options_are_value_errors(stories_dir, kwargs, field):
    with pytest.raises(ValueError, match=field):
        LLM(stories_dir, **kwargs)


def test_unknown_option_is_a_type_error(stories_dir):
    with pytest.raises(TypeError):
        LLM(stories_dir, no_such_option=1)


def test_bad_prompts(stories):
    p = SamplingParams(max_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        stories.generate([[]], p, use_tqdm=False)
    with pytest.raises(ValueError, match="vocabulary"):
        stories.generate([[1, 100000]], p, use_tqdm=False)
    with pytest.raises(ValueError, match="-3"):
        stories.generate([[1, -3]], p, use_tqdm=False)
    with pytest.raises(TypeError):
        stories.generate(42, p, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt"):
        stories.generate([{"text": "x"}], p, use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params"):
        stories.generate(["a", "b"], [p, p, p], use_tqdm=False)
    assert stories.generate([], p, use_tqdm=False) == []


def test_prompt_longer_than_the_context(stories):
    long = "Once upon a time " * 200
    with pytest.raises(ValueError, match="max_model_len"):
        stories.generate(["short", long], SamplingParams(max_tokens=8), use_tqdm=False)
    # The batch's other request was aborted with it.
    s = wait_for_idle(stories)
    assert s["num_free_blocks"] == s["num_total_blocks"]


def test_chat_errors(stories, smol):
    with pytest.raises(ValueError, match="chat template"):
        stories.chat([{"role": "user", "content": "hi"}], use_tqdm=False)
    with pytest.raises(ValueError, match="chat_template"):
        smol.chat([{"role": "user", "content": "hi"}], use_tqdm=False, chat_template="{{x}}")
    with pytest.raises(ValueError, match="messages"):
        smol.chat([], use_tqdm=False)
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        smol.chat([{"content": "no role"}], use_tqdm=False)
    with pytest.raises(ValueError, match=r"messages\[0\].content"):
        smol.chat([{"role": "user", "content": [{"type": "image_url"}]}], use_tqdm=False)


def test_failed_step_is_a_runtime_error_and_the_engine_carries_on(stories_dir):
    llm = LLM._with_faults(stories_dir, "error@2", device="cpu", kv_cache_memory_gb=0.05)
    p = SamplingParams(temperature=0.0, max_tokens=8)
    with pytest.raises(RuntimeError, match="failed"):
        llm.generate(["Once upon a time", "The dog"], p, use_tqdm=False)
    s = wait_for_idle(llm)
    assert s["num_free_blocks"] == s["num_total_blocks"]
    out = llm.generate(["Once upon a time"], p, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8


def test_dead_engine_raises_engine_dead_error(stories_dir):
    llm = LLM._with_faults(stories_dir, "panic@2", device="cpu", kv_cache_memory_gb=0.05)
    p = SamplingParams(temperature=0.0, max_tokens=8)
    with pytest.raises(EngineDeadError):
        llm.generate(["Once upon a time"], p, use_tqdm=False)
    assert issubclass(EngineDeadError, RuntimeError)
    # Every later call too, streams included.
    with pytest.raises(EngineDeadError):
        llm.generate(["Once upon a time"], p, use_tqdm=False)
    with pytest.raises(EngineDeadError):
        list(llm.stream("Once upon a time", p))
