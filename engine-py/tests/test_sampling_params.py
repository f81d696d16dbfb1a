"""SamplingParams: vLLM's defaults, and every bad value a ValueError naming its field."""

import copy

import pytest

from llmd import SamplingParams


def test_vllm_defaults():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.seed, p.max_tokens, p.min_tokens, p.logprobs) == (None, 16, 0, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.stop, p.stop_token_ids, p.ignore_eos) == ([], [], False)
    assert p.skip_special_tokens and not p.include_stop_str_in_output


def test_stop_takes_a_string_or_a_list():
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(stop=["a", "b"]).stop == ["a", "b"]
    p = SamplingParams()
    p.stop = "y"
    assert p.stop == ["y"]
    with pytest.raises(TypeError):
        SamplingParams(stop=3)


def test_copies_are_equal_and_independent():
    p = SamplingParams(temperature=0.5, stop=["."], seed=3)
    for q in (p.clone(), copy.copy(p), copy.deepcopy(p)):
        assert q == p
        q.temperature = 0.9
        assert q != p and p.temperature == 0.5
    assert "temperature=0.5" in repr(p)


@pytest.mark.parametrize(
    "field,value",
    [
        ("n", 0),
        ("n", 1000),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("min_tokens", -1),
        ("logprobs", -1),
        ("logprobs", 21),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.5),
        ("repetition_penalty", 0.0),
        ("stop", [""]),
        ("stop_token_ids", [-1]),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)


def test_top_k_minus_one_disables_as_in_vllm():
    SamplingParams(top_k=-1)
    SamplingParams(top_k=0)
    SamplingParams(top_k=1)


def test_bad_value_assigned_later_is_refused_when_used(stories):
    p = SamplingParams(max_tokens=4)
    p.temperature = -1.0
    with pytest.raises(ValueError, match="temperature"):
        stories.generate("Once", p, use_tqdm=False)
