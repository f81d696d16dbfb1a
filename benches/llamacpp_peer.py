#!/usr/bin/env python3
"""llama.cpp's side of `cargo bench --bench cpu_vs_llamacpp` (through llama-cpp-python).

Reads one JSON object from stdin: {"gguf", "threads", "n_ctx", "decode_prompt": [ids], "gen",
"prefill_prompt": [ids], "repeat"}, and prints one: decode tokens/s at batch 1 (greedy, argmax
of each step's logits, best of `repeat`), prefill tokens/s of the prefill prompt (one eval, best
of `repeat`), the greedy ids, and the process's resident memory (kB, from /proc/self/status)
before loading the model and after the runs.
"""
import ctypes
import json
import sys
import time

import numpy as np


def rss_kb(field="VmRSS"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def main():
    job = json.load(sys.stdin)
    before = rss_kb()
    import llama_cpp

    t = job["threads"]
    llm = llama_cpp.Llama(
        model_path=job["gguf"],
        n_ctx=job["n_ctx"],
        n_batch=512,  # llama.cpp's default logical batch; longer prompts go in 512-token passes
        n_ubatch=512,
        n_threads=t,
        n_threads_batch=t,
        verbose=False,
    )
    n_vocab = llm.n_vocab()

    def last_argmax():
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))
        return int(np.argmax(logits))

    def decode_once():
        llm.reset()
        llm.eval(job["decode_prompt"])
        ids = [last_argmax()]
        start = time.perf_counter()
        for _ in range(job["gen"] - 1):
            llm.eval([ids[-1]])
            ids.append(last_argmax())
        return (job["gen"] - 1) / (time.perf_counter() - start), ids

    def prefill_once():
        llm.reset()
        start = time.perf_counter()
        llm.eval(job["prefill_prompt"])
        last_argmax()
        return len(job["prefill_prompt"]) / (time.perf_counter() - start)

    decode = [decode_once() for _ in range(job["repeat"])] if job["gen"] > 0 else [(0.0, [])]
    prefill = [prefill_once() for _ in range(job["repeat"])]
    print(
        json.dumps(
            {
                "decode_tok_s": max(d[0] for d in decode),
                "prefill_tok_s": max(prefill),
                "greedy": decode[0][1],
                "rss_before_kb": before,
                "rss_after_kb": rss_kb(),
                "rss_peak_kb": rss_kb("VmHWM"),
                "llama_cpp_python": llama_cpp.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
