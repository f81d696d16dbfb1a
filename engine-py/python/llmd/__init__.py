"""llmd from Python, shaped like vLLM's offline API.

    from llmd import LLM, SamplingParams
    llm = LLM(model="../shared/models/stories260K")
    for out in llm.generate(["Once upon a time"], SamplingParams(temperature=0.8, seed=0)):
        print(out.outputs[0].text)

The engine is Rust (``llmd._llmd``); this module turns the argument shapes vLLM accepts into
the native calls and draws the progress bar. Everything that waits on the engine releases the
GIL, and a blocking call interrupted by Ctrl-C aborts its requests before raising
``KeyboardInterrupt``.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable, Dict, Iterator, List, Optional, Sequence, Union

from ._llmd import (
    CompletionOutput,
    Engine as _Engine,
    EngineDeadError,
    Logprob,
    RequestOutput,
    RequestStream as _RequestStream,
    SamplingParams,
    __version__,
)

__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "EngineDeadError",
    "__version__",
]

TokenIds = List[int]
PromptType = Union[str, TokenIds, Dict[str, Any]]
ChatMessage = Dict[str, Any]


def _one_prompt(p: Any) -> Union[str, TokenIds]:
    """A str, a list of token ids, or vLLM's ``{"prompt": ...}`` / ``{"prompt_token_ids": ...}``."""
    if isinstance(p, dict):
        if "prompt_token_ids" in p:
            return list(p["prompt_token_ids"])
        if "prompt" in p:
            return p["prompt"]
        raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    if isinstance(p, (str, list, tuple)):
        return p if isinstance(p, str) else list(p)
    raise TypeError(f"prompt must be a str, a list of token ids or a dict, got {type(p).__name__}")


def _prompts(prompts: Any) -> List[Union[str, TokenIds]]:
    """One prompt or a batch of them, as a list."""
    if isinstance(prompts, (str, dict)):
        return [_one_prompt(prompts)]
    if isinstance(prompts, (list, tuple)):
        if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]  # one prompt of token ids
        return [_one_prompt(p) for p in prompts]
    raise TypeError(
        f"prompts must be a str, a list of str or of token-id lists, got {type(prompts).__name__}"
    )


def _content(i: int, content: Any) -> str:
    """A message's content: a str, or OpenAI's list of parts of which text is supported."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        text = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and "text" in part):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(
                    f"messages[{i}].content: content part type {kind!r} is not supported (text only)"
                )
            text.append(part["text"])
        return "".join(text)
    raise ValueError(f"messages[{i}].content must be a str or a list of parts")


def _conversation(messages: Sequence[ChatMessage]) -> List[tuple]:
    if not messages:
        raise ValueError("messages must not be empty")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'")
        turns.append((str(m["role"]), _content(i, m.get("content"))))
    return turns


def _conversations(messages: Any) -> List[List[tuple]]:
    """One conversation (a list of message dicts) or a batch of them."""
    if isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], (list, tuple)):
        return [_conversation(c) for c in messages]
    return [_conversation(messages)]


def _params(sampling_params: Any, count: int) -> List[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()]
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params]
    params = list(sampling_params)
    if len(params) != count:
        raise ValueError(
            f"sampling_params: {len(params)} given for {count} prompts (give one, or one per prompt)"
        )
    if not all(isinstance(p, SamplingParams) for p in params):
        raise TypeError("sampling_params must be SamplingParams or a list of them")
    return params


def _progress_bar(use_tqdm: Union[bool, Callable[..., Any]], total: int) -> Any:
    """A tqdm bar (vLLM's "Processed prompts"), or None when off or tqdm is not installed."""
    if not use_tqdm or total == 0:
        return None
    if callable(use_tqdm):
        make = use_tqdm
    else:
        try:
            from tqdm.auto import tqdm as make
        except ImportError:
            return None
    return make(total=total, desc="Processed prompts", dynamic_ncols=True)


def _deliver(fut: "asyncio.Future[Any]", ok: bool, value: Any) -> None:
    """Runs on the event loop: completes ``fut`` unless its awaiter went away."""
    if fut.cancelled():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class LLM:
    """An engine for offline generation, as vLLM's ``LLM``.

    ``model`` is a local Hugging Face directory (or a hub id in the local cache). ``device`` is
    ``"auto"`` (the first GPU when there is one, else the CPU), ``"cpu"`` or ``"cuda:N"``. The
    KV cache holds ``num_gpu_blocks_override`` blocks, else ``kv_cache_memory_gb`` GiB, else on
    a GPU what ``gpu_memory_utilization`` leaves and 2 GiB on the CPU. KV offloading below the
    device pool: ``kv_offloading_size`` GiB of host memory, a disk tier (``kv_disk_path``,
    ``kv_disk_gb``) and a Redis/Valkey tier (``kv_remote_url``).
    """

    def __init__(
        self,
        model: str,
        *,
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
        kv_offloading_backend: Optional[str] = None,
        kv_disk_path: Optional[str] = None,
        kv_disk_gb: Optional[float] = None,
        kv_remote_url: Optional[str] = None,
        num_threads: Optional[int] = None,
        tensor_parallel_size: int = 1,
        trust_remote_code: bool = False,
        dtype: str = "auto",
    ) -> None:
        # vLLM's knobs that llmd has one value of: refused when asked for another.
        if tensor_parallel_size != 1:
            raise ValueError(f"tensor_parallel_size must be 1, got {tensor_parallel_size}")
        if dtype != "auto":
            raise ValueError(f"dtype must be 'auto' (the checkpoint's), got {dtype!r}")
        if kv_offloading_backend not in (None, "native"):
            raise ValueError(
                f"kv_offloading_backend must be 'native', got {kv_offloading_backend!r}"
            )
        # trust_remote_code: llmd never runs a model's Python code; accepted for vLLM scripts.
        del trust_remote_code
        self._engine = _Engine(
            str(model),
            device=device,
            max_model_len=max_model_len,
            block_size=block_size,
            enable_prefix_caching=enable_prefix_caching,
            kv_cache_memory_gb=kv_cache_memory_gb,
            gpu_memory_utilization=gpu_memory_utilization,
            num_gpu_blocks_override=num_gpu_blocks_override,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enforce_eager=enforce_eager,
            kv_offloading_size=kv_offloading_size,
            kv_disk_path=kv_disk_path,
            kv_disk_gb=kv_disk_gb,
            kv_remote_url=kv_remote_url,
            num_threads=num_threads,
        )

    @classmethod
    def _with_faults(cls, model: str, faults: str, **kwargs: Any) -> "LLM":
        """An LLM whose model steps fail as ``faults`` says (``error@3,panic@5``): tests of the
        error paths only."""
        llm = cls.__new__(cls)
        llm._engine = _Engine(str(model), fault_injection=faults, **kwargs)
        return llm

    def generate(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
        use_tqdm: Union[bool, Callable[..., Any]] = True,
    ) -> List[RequestOutput]:
        """Generates for every prompt (a str, a list of str, token-id lists, or vLLM's prompt
        dicts); one ``RequestOutput`` per prompt, in order."""
        ps = _prompts(prompts)
        return self._run(ps, _params(sampling_params, len(ps)), use_tqdm, chat=False)

    def chat(
        self,
        messages: Union[Sequence[ChatMessage], Sequence[Sequence[ChatMessage]]],
        sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
        use_tqdm: Union[bool, Callable[..., Any]] = True,
        chat_template: Optional[str] = None,
        add_generation_prompt: bool = True,
    ) -> List[RequestOutput]:
        """Generates a reply to one conversation (a list of ``{"role", "content"}`` dicts) or to
        each of a list of them, rendered with the model's chat template."""
        if chat_template is not None:
            raise ValueError("chat_template: only the model's own chat template is supported")
        convs = _conversations(messages)
        return self._run(
            convs,
            _params(sampling_params, len(convs)),
            use_tqdm,
            chat=True,
            add_generation_prompt=add_generation_prompt,
        )

    def _run(
        self,
        prompts: List[Any],
        params: List[SamplingParams],
        use_tqdm: Union[bool, Callable[..., Any]],
        chat: bool,
        add_generation_prompt: bool = True,
    ) -> List[RequestOutput]:
        if not prompts:
            return []
        bar = _progress_bar(use_tqdm, len(prompts))
        try:
            return self._engine.generate(
                prompts,
                params,
                chat=chat,
                add_generation_prompt=add_generation_prompt,
                progress=None if bar is None else bar.update,
            )
        finally:
            if bar is not None:
                bar.close()

    def stream(
        self,
        prompt: PromptType,
        sampling_params: Optional[SamplingParams] = None,
    ) -> Iterator[RequestOutput]:
        """Yields one prompt's deltas as they are generated: each ``RequestOutput`` holds, for
        the choices that advanced, only their new ``token_ids`` and ``text``. Breaking out of
        the loop (or Ctrl-C) aborts the request."""
        ps = _prompts(prompt)
        if len(ps) != 1:
            raise ValueError("stream takes one prompt")
        return _Stream(self._engine.stream(ps[0], _params(sampling_params, 1)[0]))

    def stream_chat(
        self,
        messages: Sequence[ChatMessage],
        sampling_params: Optional[SamplingParams] = None,
    ) -> Iterator[RequestOutput]:
        """``stream`` for one conversation, rendered with the model's chat template."""
        return _Stream(
            self._engine.stream(
                _conversation(messages), _params(sampling_params, 1)[0], chat=True
            )
        )

    def stream_async(
        self,
        prompt: PromptType,
        sampling_params: Optional[SamplingParams] = None,
    ) -> AsyncIterator[RequestOutput]:
        """``stream`` for asyncio: ``async for delta in llm.stream_async(...)``. The event loop
        is never blocked; cancelling the task or leaving the loop aborts the request."""
        ps = _prompts(prompt)
        if len(ps) != 1:
            raise ValueError("stream_async takes one prompt")
        return _AsyncStream(self._engine.stream(ps[0], _params(sampling_params, 1)[0]))

    async def generate_async(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
    ) -> List[RequestOutput]:
        """``generate`` for asyncio: awaits the whole batch without blocking the event loop;
        cancelling the awaiting task aborts the batch."""
        ps = _prompts(prompts)
        if not ps:
            return []
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        handle = self._engine.generate_async(
            ps, _params(sampling_params, len(ps)), False, True, loop, fut, _deliver
        )
        try:
            return await fut
        except asyncio.CancelledError:
            handle.cancel()
            raise

    def num_free_blocks(self) -> int:
        """KV blocks free in the pool (cached-but-evictable included)."""
        return self._engine.num_free_blocks()

    def stats(self) -> Dict[str, Any]:
        """The engine's state after its last step: requests running and waiting, KV blocks
        free and in all, prefix-cache queries and hits, token counters."""
        return self._engine.stats()

    def encode(self, text: str) -> TokenIds:
        """Token ids of ``text`` as a prompt is tokenized (with the model's BOS)."""
        return self._engine.encode(text)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._engine.decode(list(token_ids), skip_special_tokens)

    @property
    def max_model_len(self) -> int:
        return self._engine.max_model_len


class _Stream:
    """The blocking iterator of ``LLM.stream``."""

    def __init__(self, native: _RequestStream) -> None:
        self._native = native

    def __iter__(self) -> "_Stream":
        return self

    def __next__(self) -> RequestOutput:
        return self._native.__next__()

    def close(self) -> None:
        """Aborts the request (also done when the stream is garbage collected)."""
        self._native.close()

    def __enter__(self) -> "_Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def request_id(self) -> str:
        return self._native.request_id


class _AsyncStream:
    """The async iterator of ``LLM.stream_async``."""

    def __init__(self, native: _RequestStream) -> None:
        self._native = native

    def __aiter__(self) -> "_AsyncStream":
        return self

    async def __anext__(self) -> RequestOutput:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._native.next_async(loop, fut, _deliver)
        try:
            return await fut
        except asyncio.CancelledError:
            self._native.close()
            raise

    async def aclose(self) -> None:
        """Aborts the request."""
        self._native.close()

    async def __aenter__(self) -> "_AsyncStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._native.close()

    @property
    def request_id(self) -> str:
        return self._native.request_id
