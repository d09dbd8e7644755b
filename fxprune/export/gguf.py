"""GGUF file of a pruned LLaMA-family model for llama.cpp, per-layer widths included.

llama.cpp (vendored by llama-cpp-python 0.3.36, src/llama-model.cpp `load_hparams`) reads
`feed_forward_length`, `attention.head_count` and `attention.head_count_kv` of every architecture
either as one number or as a per-layer array (`get_key_or_arr`). The `llama` architecture's tensor
creation (src/models/llama.cpp `load_arch_tensors`) sizes every layer with layer 0's counts
(`LLAMA_LOAD_LOCALS`), so it cannot load a model whose layers differ; the `deci` architecture
(src/models/deci.cpp, written for Nemotron-NAS) creates and runs each layer with `n_head(i)`,
`n_head_kv(i)` and `n_ff(i)`. Uniform plans are written as `llama`, others as `deci`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fxprune.export.common import ExportError, base_of, check_free

GGUF_FAMILIES = ("llama", "mistral")  # HF model types whose layers are LLaMA's (llama.cpp converts both to `llama`)
LAYER_TENSORS = {  # HF name inside model.layers.{i} -> GGUF name inside blk.{i}
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
FILE_TYPES = {"f32": 0, "f16": 1}  # gguf.LlamaFileType.ALL_F32, MOSTLY_F16


def head_size(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def per_layer_widths(config: dict, shapes: dict) -> list[dict]:
    """Each layer's head, KV-head and MLP counts, read from the pruned LLaMA weights' shapes."""
    d = head_size(config)

    def width(i, param, dim):
        name = f"model.layers.{i}.{param}"
        if name not in shapes:
            raise ExportError(f"the pruned model has no parameter {name}; cannot read its widths")
        return shapes[name][dim]
    return [{"num_attention_heads": width(i, "self_attn.o_proj.weight", 1) // d,
             "num_key_value_heads": width(i, "self_attn.k_proj.weight", 0) // d,
             "intermediate_size": width(i, "mlp.up_proj.weight", 0)} for i in range(int(config["num_hidden_layers"]))]


def rotary_pairs(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q/k from Hugging Face's rotary layout (the two halves of each head rotate together)
    to llama.cpp's (consecutive pairs rotate together), head by head."""
    half = t.shape[0] // n_heads // 2
    return t.reshape(n_heads, 2, half, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def gguf_tensors(gm, widths: list[dict], dtype: str) -> dict[str, np.ndarray]:
    """GGUF name -> array (f16/f32 matrices, f32 vectors), biases included where the pruned model has them."""
    state = {k: v.detach().float().cpu() for k, v in gm.state_dict().items()}
    out = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"]}
    head = gm.state_dict().get("lm_head.weight")
    if head is not None and head.data_ptr() != gm.state_dict()["model.embed_tokens.weight"].data_ptr():
        out["output.weight"] = state["lm_head.weight"]  # untied head; tied ones reuse token_embd
    for i, w in enumerate(widths):
        for hf, name in LAYER_TENSORS.items():
            for kind in ("weight", "bias"):
                t = state.get(f"model.layers.{i}.{hf}.{kind}")
                if t is None:
                    continue
                if name in ("attn_q", "attn_k"):
                    t = rotary_pairs(t, w["num_attention_heads"] if name == "attn_q" else w["num_key_value_heads"])
                out[f"blk.{i}.{name}.{kind}"] = t
    unused = [k for k in state if "." in k and k.rsplit(".", 1)[-1] in ("weight", "bias") and not mapped(k)]
    if unused:
        raise ExportError(f"GGUF llama has no tensor for {unused[:6]}")
    return {k: t.numpy().astype(np.float16 if dtype == "f16" and t.dim() > 1 else np.float32) for k, t in out.items()}


def mapped(hf_name: str) -> bool:
    """True when the Hugging Face tensor `hf_name` has a GGUF llama tensor name."""
    if hf_name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        return True
    parts = hf_name.split(".")
    return parts[:2] == ["model", "layers"] and ".".join(parts[3:-1]) in LAYER_TENSORS


def tokenizer_fields(source, vocab: int):
    """The `tokenizer.*` key/value pairs of another GGUF file (e.g. the one the model came from)."""
    from gguf import GGUFReader
    reader = GGUFReader(source)
    fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ExportError(f"{source} carries no tokenizer (no tokenizer.ggml.tokens)")
    if len(tokens.data) != vocab:
        raise ExportError(f"{source}'s tokenizer has {len(tokens.data)} tokens, the model's vocabulary {vocab}")
    return fields


def check_supported(config: dict) -> None:
    """Raise `ExportError` unless `config` is a model type and RoPE variant the GGUF llama writer handles."""
    if config.get("model_type") not in GGUF_FAMILIES:
        raise ExportError(f"export to gguf supports model types {GGUF_FAMILIES}; this model is {config.get('model_type')!r}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"export to gguf writes plain RoPE; this model uses rope_type {rope.get('rope_type')!r}")


def check_gguf_expressible(config: dict, shapes: dict, tokenizer_gguf=None):
    """(per-layer widths, tokenizer fields) or ExportError, from the config and tensor shapes alone."""
    check_supported(config)
    if "model.embed_tokens.weight" not in shapes:
        raise ExportError("the pruned model has no parameter model.embed_tokens.weight")
    vocab = shapes["model.embed_tokens.weight"][0]
    widths = per_layer_widths(config, shapes)
    empty = [f"layer {i} {k}" for i, w in enumerate(widths) for k, v in w.items() if v == 0]
    if empty:  # deci reads 0 heads as attention-free and skips a layer's residual when n_ff is 0
        raise ExportError(f"llama.cpp cannot run a layer that keeps none of a kind ({', '.join(empty)}): its "
                          "deci architecture gives n_head = 0 / n_ff = 0 other meanings (src/models/deci.cpp)")
    return widths, (tokenizer_fields(tokenizer_gguf, vocab) if tokenizer_gguf is not None else {})


def export_gguf(gm: torch.fx.GraphModule, path, dtype: str = "f16", tokenizer_gguf=None) -> Path:
    """Write a pruned LLaMA-family model as a GGUF file for llama.cpp (`llama` when every layer keeps
    the same widths, `deci` with per-layer head/KV-head/feed-forward arrays otherwise). `dtype` is
    "f16" (matrices; vectors stay f32) or "f32". `tokenizer_gguf`: a GGUF file whose tokenizer keys
    are copied (llama.cpp needs one to turn text into tokens). Writes nothing if it refuses."""
    import gguf
    if dtype not in FILE_TYPES:
        raise ExportError(f"gguf dtype must be one of {sorted(FILE_TYPES)}, got {dtype!r}")
    config = base_of(gm)["config"]
    path = check_free(path)
    shapes = {k: tuple(v.shape) for k, v in gm.state_dict().items()}
    widths, tok = check_gguf_expressible(config, shapes, tokenizer_gguf)
    uniform = all(w == widths[0] for w in widths)
    vocab, hidden = shapes["model.embed_tokens.weight"]
    tensors = gguf_tensors(gm, widths, dtype)
    d = head_size(config)
    theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        w = gguf.GGUFWriter(tmp, "llama" if uniform else "deci")
        w.add_name(f"{config.get('model_type')} pruned by fxprune")
        w.add_block_count(len(widths))
        w.add_context_length(int(config.get("max_position_embeddings", 2048)))
        w.add_embedding_length(hidden)
        per_layer = (lambda key: widths[0][key]) if uniform else (lambda key: [x[key] for x in widths])
        w.add_feed_forward_length(per_layer("intermediate_size"))
        w.add_head_count(per_layer("num_attention_heads"))
        w.add_head_count_kv(per_layer("num_key_value_heads"))
        w.add_key_length(d)  # hidden pruning: the head size is no longer hidden / heads
        w.add_value_length(d)
        w.add_rope_dimension_count(d)
        w.add_rope_freq_base(float(theta))
        w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        w.add_vocab_size(vocab)
        w.add_file_type(FILE_TYPES[dtype])
        for key, field in tok.items():
            sub = field.types[1] if len(field.types) > 1 else None
            w.add_key_value(key, field.contents(), field.types[0], sub)
        for name, array in tensors.items():
            w.add_tensor(name, array)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
