"""Hugging Face transformers (PyTorch, f32, CPU) as a reference, for tests/model_vs_transformers.rs.

Reads one JSON request on stdin and writes one JSON object on stdout:
- {"model": dir, "prompt": [ids], "new_tokens": n} -> {"logits": [[f32 per vocab] per prompt
  position], "greedy": [n ids]}: what candle-transformers gets wrong or lacks (Phi-3's LongRoPE);
- {"resave_config": src, "to": dst} -> {"config": the written dict}: the checkpoint's
  config.json as this transformers version writes it (transformers 5: `rope_parameters`).
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    req = json.load(sys.stdin)
    if "resave_config" in req:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(req["resave_config"]).save_pretrained(req["to"])
        with open(f"{req['to']}/config.json") as f:
            json.dump({"config": json.load(f)}, sys.stdout)
        return
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(req["model"], dtype=torch.float32)
    model.eval()
    # Exactly `new_tokens` tokens, EOS or not (the engine's `ignore_eos`), none suppressed.
    model.generation_config.eos_token_id = None
    ids = torch.tensor([req["prompt"]], dtype=torch.long)
    with torch.no_grad():
        logits = model(ids).logits[0]
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=req["new_tokens"],
            do_sample=False,
            pad_token_id=0,
        )
    json.dump(
        {
            "logits": logits.tolist(),
            "greedy": out[0, ids.shape[1] :].tolist(),
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
