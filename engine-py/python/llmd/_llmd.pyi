"""Type stubs of llmd's native module (engine-py/src). `tests/test_stubs.py` checks that every
public name and member of the module is declared here."""

from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

__version__: str

class EngineDeadError(RuntimeError):
    """The engine died (a panic, or a device error); create a new LLM."""

class SamplingParams:
    """vLLM's sampling parameters, defaults and validation: a bad value raises ValueError
    naming the field, at construction and again when used after reassignment."""

    n: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: Optional[int]
    max_tokens: Optional[int]
    min_tokens: int
    stop: List[str]
    stop_token_ids: List[int]
    ignore_eos: bool
    logprobs: Optional[int]
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    skip_special_tokens: bool
    include_stop_str_in_output: bool
    def __init__(
        self,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        seed: Optional[int] = None,
        max_tokens: Optional[int] = 16,
        min_tokens: int = 0,
        stop: Optional[Union[str, List[str]]] = None,
        stop_token_ids: Optional[List[int]] = None,
        ignore_eos: bool = False,
        logprobs: Optional[int] = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        skip_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
    ) -> None: ...
    def clone(self) -> "SamplingParams": ...
    def __copy__(self) -> "SamplingParams": ...
    def __deepcopy__(self, memo: Any) -> "SamplingParams": ...

class Logprob:
    logprob: float
    rank: Optional[int]
    decoded_token: Optional[str]

class CompletionOutput:
    index: int
    text: str
    token_ids: List[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[List[Dict[int, Logprob]]]
    finish_reason: Optional[str]
    def finished(self) -> bool: ...

class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: List[int]
    prompt_logprobs: None
    outputs: List[CompletionOutput]
    finished: bool
    num_cached_tokens: int

class CancelHandle:
    def cancel(self) -> None: ...

class RequestStream:
    request_id: str
    def __iter__(self) -> Iterator[RequestOutput]: ...
    def __next__(self) -> RequestOutput: ...
    def next_async(self, event_loop: Any, fut: Any, deliver: Callable[..., None]) -> None: ...
    def close(self) -> None: ...

class Engine:
    max_model_len: int
    def __init__(
        self,
        model: str,
        device: str = "auto",
        max_model_len: Optional[int] = None,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        kv_cache_memory_gb: Optional[float] = None,
        gpu_memory_utilization: float = 0.9,
        num_gpu_blocks_override: Optional[int] = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: Optional[int] = None,
        enforce_eager: bool = False,
        kv_offloading_size: Optional[float] = None,
        kv_disk_path: Optional[str] = None,
        kv_disk_gb: Optional[float] = None,
        kv_remote_url: Optional[str] = None,
        num_threads: Optional[int] = None,
        fault_injection: Optional[str] = None,
    ) -> None: ...
    def generate(
        self,
        prompts: Sequence[Any],
        params: Sequence[SamplingParams],
        chat: bool = False,
        add_generation_prompt: bool = True,
        progress: Optional[Callable[[int], Any]] = None,
    ) -> List[RequestOutput]: ...
    def generate_async(
        self,
        prompts: Sequence[Any],
        params: Sequence[SamplingParams],
        chat: bool,
        add_generation_prompt: bool,
        event_loop: Any,
        fut: Any,
        deliver: Callable[..., None],
    ) -> CancelHandle: ...
    def stream(
        self,
        prompt: Any,
        params: SamplingParams,
        chat: bool = False,
        add_generation_prompt: bool = True,
    ) -> RequestStream: ...
    def num_free_blocks(self) -> int: ...
    def stats(self) -> Dict[str, Any]: ...
    def encode(self, text: str) -> List[int]: ...
    def decode(self, token_ids: List[int], skip_special_tokens: bool = True) -> str: ...
    def rust_generate_seconds(self, prompts: List[str], params: SamplingParams) -> float: ...
