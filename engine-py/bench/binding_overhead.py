"""Per-call overhead of the Python bindings over the Rust API, on the same engine.

    python3 -m pip install ./engine-py      # a release build, as users get it
    python3 engine-py/bench/binding_overhead.py [--model DIR] [--batch 64] [--max-tokens 32]

Each round times ``LLM.generate`` (from Python: argument conversion, tokenizing, submitting,
waiting with the GIL released, building the RequestOutput objects) and
``llmd::Engine::generate`` (timed inside Rust by ``Engine.rust_generate_seconds``) for the same
prompts and parameters on the same engine, alternating which goes first. Prints both medians
and the ratio; the target is at most 1.05 at batch 64 on stories260K.
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from llmd import LLM, SamplingParams


def default_model() -> str:
    env = os.environ.get("LLMD_SHARED_MODELS")
    root = Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "models"
    return str(root / "stories260K")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=default_model())
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()

    llm = LLM(a.model, device=a.device, kv_cache_memory_gb=0.5)
    prompts = [f"Once upon a time there was a child number {i}" for i in range(a.batch)]
    params = SamplingParams(temperature=0.8, seed=0, max_tokens=a.max_tokens, ignore_eos=True)

    def python_call() -> float:
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t
        assert len(outs) == a.batch and all(
            len(o.outputs[0].token_ids) == a.max_tokens for o in outs
        )
        return dt

    def rust_call() -> float:
        return llm._engine.rust_generate_seconds(prompts, params)

    for _ in range(3):
        python_call()
        rust_call()
    py, rs = [], []
    for r in range(a.rounds):
        if r % 2:
            py.append(python_call())
            rs.append(rust_call())
        else:
            rs.append(rust_call())
            py.append(python_call())
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, Python {sys.version.split()[0]}; "
        f"model {Path(a.model).name}, batch {a.batch} x {a.max_tokens} tokens, {a.rounds} rounds"
    )
    print(f"{'':24} {'median':>9} {'min':>9}")
    print(f"{'Python LLM.generate':24} {statistics.median(py) * 1e3:8.2f}ms {min(py) * 1e3:8.2f}ms")
    print(f"{'Rust Engine::generate':24} {statistics.median(rs) * 1e3:8.2f}ms {min(rs) * 1e3:8.2f}ms")
    # Median of the paired ratios: each round's two calls ran back to back, so a noisy
    # neighbour slows both.
    ratio = statistics.median(p / r for p, r in zip(py, rs))
    print(f"ratio (Python / Rust), median of rounds: {ratio:.3f} "
          f"(overhead {100 * (ratio - 1):+.1f} %, target <= +5 %); "
          f"of minimums: {min(py) / min(rs):.3f}")


if __name__ == "__main__":
    main()
