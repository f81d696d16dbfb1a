"""Random-weight models in Hugging Face layout, of the shapes the GPU figures in BENCHMARKS.md
use, so that every figure can be re-run where real weights cannot travel (the GPU machine).

Usage: python3 benches/mk_models.py OUT_DIR NAME[,NAME...] [TOKENIZER_DIR]
Names: smollm2-135m-shape, smol-1.7b-shape, llama3-8b-shape. TOKENIZER_DIR (default
../shared/models/smollm2-135m-instruct, or $SMOL_CFG) gives config.json's base values and the
tokenizer files. Needs torch and transformers; writes bf16 safetensors with a GPU when there is
one (an 8B body takes ~20 s on an H200).
"""
import json
import os
import shutil
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

SHAPES = {
    "smollm2-135m-shape": {},
    "smol-1.7b-shape": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                            num_attention_heads=32, num_key_value_heads=32, head_dim=64,
                            rope_theta=130000.0),
    "llama3-8b-shape": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                            rope_theta=500000.0, tie_word_embeddings=False),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    root, names = sys.argv[1], sys.argv[2].split(",")
    here = os.path.dirname(os.path.abspath(__file__))
    default = os.path.join(here, "..", "..", "shared", "models", "smollm2-135m-instruct")
    cfgdir = sys.argv[3] if len(sys.argv) > 3 else os.environ.get("SMOL_CFG", default)
    base = json.load(open(os.path.join(cfgdir, "config.json")))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    for name in names:
        if name not in SHAPES:
            sys.exit(f"unknown shape {name!r}: one of {', '.join(SHAPES)}")
        t = time.time()
        d = os.path.join(root, name)
        os.makedirs(d, exist_ok=True)
        c = dict(base)
        c.update(SHAPES[name])
        skip = ("architectures", "transformers_version", "torch_dtype", "dtype")
        cfg = LlamaConfig(**{k: v for k, v in c.items() if k not in skip})
        with torch.device(device):
            m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        m.save_pretrained(d, safe_serialization=True)
        # The transformers-4 layout (rope_theta, torch_dtype) most hub checkpoints ship.
        json.dump(c, open(os.path.join(d, "config.json"), "w"), indent=1)
        for f in TOKENIZER_FILES:
            if os.path.exists(os.path.join(cfgdir, f)):
                shutil.copy(os.path.join(cfgdir, f), d)
        del m
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"made {name} in {time.time() - t:.1f}s", flush=True)


if __name__ == "__main__":
    main()
