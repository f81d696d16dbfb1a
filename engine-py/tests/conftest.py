"""Shared fixtures: the real models in ``shared/models`` and the Rust engine's own output.

As the Rust tests (tests/common/shared.rs): a missing model skips with a message on a
developer's machine and FAILS where ``CI`` is set. Expected outputs always come from the Rust
engine (``examples/reference_generate.rs``), never from stored tokens.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def shared_models_dir() -> Path:
    """``$LLMD_SHARED_MODELS``, else ``shared/models`` in the nearest ancestor of the
    repository's parent that has one (``../shared/models`` for the main checkout)."""
    env = os.environ.get("LLMD_SHARED_MODELS")
    if env:
        return Path(env)
    for ancestor in REPO.parents:
        d = ancestor / "shared" / "models"
        if d.is_dir():
            return d
    return REPO.parent / "shared" / "models"


def _missing(d: Path):
    if not (d / "config.json").is_file():
        return "no config.json"
    if (d / "model.safetensors").is_file():
        return None
    index = d / "model.safetensors.index.json"
    if not index.is_file():
        return "no model.safetensors or index"
    shards = set(json.loads(index.read_text())["weight_map"].values())
    absent = [s for s in shards if not (d / s).is_file()]
    return f"missing shards {absent}" if absent else None


def shared_model(name: str) -> str:
    d = shared_models_dir() / name
    why = _missing(d)
    if why is None:
        return str(d)
    msg = f"model {name} incomplete/absent ({why}) at {d}"
    if os.environ.get("CI"):
        pytest.fail(f"{msg}: CI must have every shared model, so this test cannot skip")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def stories_dir() -> str:
    return shared_model("stories260K")


@pytest.fixture(scope="session")
def smol_dir() -> str:
    return shared_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def stories(stories_dir):
    from llmd import LLM

    return LLM(stories_dir, device="cpu", kv_cache_memory_gb=0.25)


@pytest.fixture(scope="session")
def smol(smol_dir):
    from llmd import LLM

    return LLM(smol_dir, device="cpu", max_model_len=1024, kv_cache_memory_gb=0.25)


@pytest.fixture(scope="session")
def reference():
    """``run(model, prompts, params, chat=False)``: the Rust engine's outputs for the same
    request, from ``examples/reference_generate.rs`` (built here unless
    ``$LLMD_REFERENCE_GENERATE`` names the binary)."""
    exe = os.environ.get("LLMD_REFERENCE_GENERATE")
    if not exe:
        cargo = shutil.which("cargo")
        if cargo is None:
            if os.environ.get("CI"):
                pytest.fail("cargo is needed to build the Rust reference")
            pytest.skip("no cargo to build the Rust reference (set LLMD_REFERENCE_GENERATE)")
        subprocess.run(
            [cargo, "build", "--quiet", "--example", "reference_generate"],
            cwd=REPO,
            check=True,
        )
        target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
        exe = str(target / "debug" / "examples" / "reference_generate")

    def run(model, prompts, params, chat=False):
        req = {"model": model, "prompts": prompts, "params": params, "chat": chat}
        out = subprocess.run(
            [exe, json.dumps(req)], capture_output=True, text=True, check=True
        )
        return json.loads(out.stdout)

    return run


def wait_for_idle(llm, timeout=10.0):
    """Waits until every KV block is back in the pool (aborts are processed by the engine
    thread after the call that caused them returned); returns the last stats."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        s = llm.stats()
        if (s["num_free_blocks"] == s["num_total_blocks"] and s["num_running"] == 0
                and s["num_waiting"] == 0):
            return s
        if time.monotonic() > deadline:
            return s
        time.sleep(0.01)
