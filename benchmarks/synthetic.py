"""Seeded random-weight checkpoints of any LLaMA shape, written one layer's shard at a time from a meta-device
model (never whole in memory): what the scale benchmark and the peak-memory test prune."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import transformers

LAYER = re.compile(r"\.layers\.(\d+)\.")
# widths of the published LLaMA-2 checkpoints (vocabulary 32000, untied head)
SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),
}


def llama_config(shape: str | dict, **overrides) -> transformers.LlamaConfig:
    """A LLaMA config of one of SHAPES (or the given widths), vocabulary 32000 unless overridden."""
    widths = SHAPES[shape] if isinstance(shape, str) else shape
    return transformers.LlamaConfig(**{"vocab_size": 32000, "max_position_embeddings": 4096, **widths, **overrides})


def write_random_checkpoint(directory, config, dtype=torch.bfloat16, seed: int = 0,
                            layers: int | None = None) -> dict[str, int]:
    """Write `config`'s model with N(0, 0.02) weights (norms at 1) to `directory` as safetensors, a shard per
    decoder layer plus one for the rest, and its config; `layers`: write only the first that many decoder layers'
    tensors (what a dry run reads). Returns the bytes of each shard by name."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    config.dtype = dtype
    config.save_pretrained(directory)
    shards: dict[str, list[str]] = {}
    for key in shapes:
        layer = LAYER.search(key)
        if layer is None or layers is None or int(layer.group(1)) < layers:
            shards.setdefault(f"layer{int(layer.group(1)):03d}" if layer else "other", []).append(key)
    generator, weight_map, sizes = torch.Generator().manual_seed(seed), {}, {}
    for shard, keys in shards.items():
        tensors = {k: (torch.ones(shapes[k]) if len(shapes[k]) == 1 else
                       torch.randn(shapes[k], generator=generator) * 0.02).to(dtype) for k in keys}
        save_file(tensors, directory / f"{shard}.safetensors")
        weight_map.update(dict.fromkeys(keys, f"{shard}.safetensors"))
        sizes[shard] = sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}))
    return sizes
