#!/usr/bin/env python3
"""Writes a Llama-architecture Hugging Face checkpoint as an F16 (or Q8_0) GGUF for llama.cpp.

Used by `cargo bench --bench cpu_vs_llamacpp` to give llama.cpp the same weights llmd loads.
Only numpy and the `gguf` package's writer (pip install gguf); safetensors files are read
directly (bf16 is widened bit-exactly to f32 before the f16 rounding, as llama.cpp's own
converter does). Matrices are stored f16, norms f32; q/k projections are permuted from the
Hugging Face rotate-half layout to the interleaved pairs llama.cpp's RoPE expects. The tokenizer
goes in as a byte-level BPE ("gpt2") vocabulary with its merges.

With `q8_0` every matrix (the token embedding too, as llama.cpp's own converter does for
MOSTLY_Q8_0) is quantized with the `gguf` package's Q8_0 quantizer (blocks of 32, f16 scales)
from the f32 values; norms stay f32.

usage: hf_to_gguf.py MODEL_DIR OUT.gguf [f16|q8_0]
"""
import json
import struct
import sys
from pathlib import Path

import numpy as np
import gguf


def read_safetensors(path):
    """name -> float32 array for every tensor in one .safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        raw = data[base + a : base + b]
        dt = t["dtype"]
        if dt == "BF16":
            x = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif dt == "F16":
            x = raw.view(np.float16).astype(np.float32)
        elif dt == "F32":
            x = raw.view(np.float32).copy()
        else:
            sys.exit(f"{path}: tensor {name}: dtype {dt} not handled")
        out[name] = x.reshape(t["shape"])
    return out


def permute(w, heads):
    """Hugging Face's rotate-half q/k rows -> llama.cpp's interleaved rotary pairs."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main():
    if len(sys.argv) not in (3, 4) or (len(sys.argv) == 4 and sys.argv[3] not in ("f16", "q8_0")):
        sys.exit(__doc__)
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    q8 = len(sys.argv) == 4 and sys.argv[3] == "q8_0"
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        sys.exit(f"{src}: model_type {cfg.get('model_type')!r}: only llama is handled")
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(read_safetensors(f))
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // heads

    w = gguf.GGUFWriter(str(dst), "llama")
    w.add_name(src.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8 else gguf.LlamaFileType.MOSTLY_F16)

    tok = json.loads((src / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [""] * cfg["vocab_size"]
    types = [gguf.TokenType.UNUSED] * cfg["vocab_size"]
    for t, i in vocab.items():
        if i < len(tokens):
            tokens[i], types[i] = t, gguf.TokenType.NORMAL
    for a in tok.get("added_tokens", []):
        if a["id"] < len(tokens):
            tokens[a["id"]] = a["content"]
            types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    for i, t in enumerate(tokens):
        if t == "":
            tokens[i] = f"[PAD{i}]"
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if cfg.get("bos_token_id") is not None:
        w.add_bos_token_id(cfg["bos_token_id"])
    if cfg.get("eos_token_id") is not None:
        w.add_eos_token_id(cfg["eos_token_id"])

    def put(name, x, half=True):
        if half and q8:
            qt = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(x.astype(np.float32), qt), raw_dtype=qt)
        else:
            w.add_tensor(name, x.astype(np.float16 if half else np.float32))

    put("token_embd.weight", tensors["model.embed_tokens.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        put(b + "attn_norm.weight", tensors[p + "input_layernorm.weight"], half=False)
        put(b + "attn_q.weight", permute(tensors[p + "self_attn.q_proj.weight"], heads))
        put(b + "attn_k.weight", permute(tensors[p + "self_attn.k_proj.weight"], kv_heads))
        put(b + "attn_v.weight", tensors[p + "self_attn.v_proj.weight"])
        put(b + "attn_output.weight", tensors[p + "self_attn.o_proj.weight"])
        put(b + "ffn_norm.weight", tensors[p + "post_attention_layernorm.weight"], half=False)
        put(b + "ffn_gate.weight", tensors[p + "mlp.gate_proj.weight"])
        put(b + "ffn_up.weight", tensors[p + "mlp.up_proj.weight"])
        put(b + "ffn_down.weight", tensors[p + "mlp.down_proj.weight"])
    put("output_norm.weight", tensors["model.norm.weight"], half=False)
    if not cfg.get("tie_word_embeddings", False):
        put("output.weight", tensors["lm_head.weight"])

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
