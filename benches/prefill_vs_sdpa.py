"""Prefill attention: llmd's tensor-core kernel vs PyTorch's flash SDPA, same shapes, same GPU,
one run. Prints TFLOP/s of both and the ratio (target >= 1.0).

Usage on the GPU machine (no Rust there: build the bench here and carry it over):
    cargo bench --bench cuda_prefill --no-run    # prints the executable's path
    python3 benches/prefill_vs_sdpa.py target/release/deps/cuda_prefill-<hash>
"""
import re
import subprocess
import sys

import torch
import torch.nn.functional as F


def sdpa_tflops(batch, n, heads, kv_heads, d, repeat=10):
    q = torch.randn(batch, heads, n, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, n, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, kv_heads, n, d, device="cuda", dtype=torch.bfloat16)
    # The flash backend wants equal head counts: expand K/V as GQA does (not timed).
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
    flops = 4.0 * batch * heads * d * (n * (n + 1) / 2)
    return flops / best / 1e12


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    run = subprocess.run([sys.argv[1]], capture_output=True, text=True)
    out = run.stdout
    if run.returncode != 0:
        print(out.strip(), run.stderr.strip()[-4000:], sep="\n", file=sys.stderr)
        sys.exit(f"the llmd bench failed with exit code {run.returncode}")
    pat = re.compile(
        r"prefill kernel=(\w+) batch=(\d+) seq=(\d+) heads=(\d+) kv_heads=(\d+) head_dim=(\d+) ms=[\d.]+ tflops=([\d.]+)"
    )
    rows = [m.groups() for m in map(pat.search, out.splitlines()) if m]
    if not rows:
        sys.exit(f"no results from the llmd bench:\n{out}")
    print(f"GPU: {torch.cuda.get_device_name()}")
    print(f"{'kernel':>9} {'batch':>5} {'seq':>6} {'heads':>6} {'d':>4} {'llmd TF/s':>10} {'SDPA TF/s':>10} {'ratio':>6}")
    sdpa = {}
    for kernel, b, n, h, kvh, d, ours in rows:
        b, n, h, kvh, d, ours = int(b), int(n), int(h), int(kvh), int(d), float(ours)
        if (b, n, h, kvh, d) not in sdpa:
            sdpa[(b, n, h, kvh, d)] = sdpa_tflops(b, n, h, kvh, d)
        theirs = sdpa[(b, n, h, kvh, d)]
        print(f"{kernel:>9} {b:>5} {n:>6} {h:>3}/{kvh:<2} {d:>4} {ours:>10.1f} {theirs:>10.1f} {ours / theirs:>5.2f}x")


if __name__ == "__main__":
    main()
