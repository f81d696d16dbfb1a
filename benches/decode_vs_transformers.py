"""End-to-end decode on the GPU: llmd vs Hugging Face transformers `generate`, same model, same
GPU, one run. llmd's side comes from the `gpu_decode` bench (batch-1 fraction of the bandwidth
roofline, batch-64 tokens/s); this script runs transformers with the same prompt, batch 64,
128 greedy new tokens (EOS ignored), bf16, and prints the ratio.

Usage on the GPU machine:
    cargo bench --bench gpu_decode --no-run      # here; prints the executable's path
    python3 benches/decode_vs_transformers.py target/release/deps/gpu_decode-<hash> MODEL_DIR
"""
import re
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "Once upon a time, in a small village by the sea, there lived"
GEN = 128
BATCH = 64


def transformers_tok_s(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16).cuda()
    ids = tok([PROMPT] * BATCH, return_tensors="pt").to("cuda")
    kw = dict(max_new_tokens=GEN, min_new_tokens=GEN, do_sample=False, pad_token_id=tok.eos_token_id)
    model.generate(**ids, **kw)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = model.generate(**ids, **kw)
    torch.cuda.synchronize()
    new = (out.shape[1] - ids["input_ids"].shape[1]) * BATCH
    return new / (time.perf_counter() - t)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    env = {"LLMD_BENCH_MODEL": sys.argv[2]}
    import os

    run = subprocess.run([sys.argv[1]], capture_output=True, text=True,
                         env={**os.environ, **env})
    out = run.stdout
    print(out.strip())
    if run.returncode != 0:
        print(run.stderr.strip()[-4000:], file=sys.stderr)
        sys.exit(f"the llmd bench failed with exit code {run.returncode}")
    m = re.search(r"batch64 gen=\d+ tok_s=([\d.]+)", out)
    if not m:
        sys.exit("no batch-64 figure from the llmd bench")
    ours = float(m.group(1))
    theirs = transformers_tok_s(sys.argv[2])
    print(f"GPU: {torch.cuda.get_device_name()}")
    print(f"batch {BATCH}, {GEN} tokens: llmd {ours:.1f} tok/s, transformers {theirs:.1f} tok/s, "
          f"ratio {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
