"""Where the streamed graph's tensors come from: a checkpoint's safetensors shards, read on demand, or an
in-memory model. Each read is counted (`reads`), so a caller can check that a sweep reads each tensor once.

Names are the model's state-dict names. A checkpoint written in another layout (Mixtral's per-expert
`w1`/`w3` tensors, fused into one `gate_up_proj` by transformers) is read through transformers' own
conversion mapping: the tensors one state-dict entry is made of are read and converted when it is asked for.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class WeightSource:
    """Tensors by state-dict name, read when asked for; `reads` counts the reads of each name."""

    def __init__(self):
        self.reads: Counter = Counter()

    def names(self) -> set[str]:
        """The state-dict names this source can serve."""
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def read(self, name: str) -> torch.Tensor:
        """The tensor stored under `name` (a new read each call)."""
        if name not in self:
            raise KeyError(f"{type(self).__name__} has no tensor {name!r}")
        self.reads[name] += 1
        return self._read(name)

    def _read(self, name: str) -> torch.Tensor:
        raise NotImplementedError


class ModelWeights(WeightSource):
    """The parameters and persistent buffers of an in-memory module (detached, never copied)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self._tensors = {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()}

    def names(self) -> set[str]:
        return set(self._tensors)

    def _read(self, name):
        return self._tensors[name]


class CheckpointWeights(WeightSource):
    """The tensors of a Hugging Face checkpoint directory's safetensors (sharded with an index json, or one
    file), read one state-dict entry at a time, each from its file memory-mapped for that read only.
    `model`: the model (a meta-device skeleton is enough) whose state-dict names to serve, when the checkpoint's layout differs from its own."""

    def __init__(self, directory, model: torch.nn.Module | None = None):
        super().__init__()
        self.directory = Path(directory)
        self._file_of = checkpoint_files(self.directory)
        self._recipes = recipes(list(self._file_of), model)

    def names(self) -> set[str]:
        return set(self._recipes)

    def _load(self, key: str) -> torch.Tensor:
        from safetensors import safe_open
        # opened per read: closing unmaps the file, whose pages would otherwise stay in this process's resident
        # memory until the whole checkpoint had been read
        with safe_open(str(self.directory / self._file_of[key]), framework="pt") as f:
            return f.get_tensor(key)

    def _read(self, name):
        converter, sources = self._recipes[name]
        if converter is None:
            return self._load(sources)
        collected = {pattern: [self._load(k) for k in keys] for pattern, keys in sources.items()}
        for op in converter.operations:
            collected = op.convert(collected, source_patterns=converter.source_patterns,
                                   target_patterns=converter.target_patterns, full_layer_name=name)
        (tensor,) = collected.values()
        return tensor


def checkpoint_files(directory: Path) -> dict[str, str]:
    """{tensor key: safetensors file name} of a checkpoint directory."""
    if (directory / INDEX).is_file():
        return dict(json.loads((directory / INDEX).read_text())["weight_map"])
    if (directory / SINGLE).is_file():
        from safetensors import safe_open
        with safe_open(str(directory / SINGLE), framework="pt") as f:
            return {k: SINGLE for k in f.keys()}
    raise FileNotFoundError(f"{directory} holds no {INDEX} or {SINGLE}: streaming reads safetensors checkpoints")


def recipes(keys: list[str], model) -> dict[str, tuple]:
    """{state-dict name: (None, checkpoint key) or (converter, {source pattern: [checkpoint keys]})}, with
    transformers' conversion mapping of `model` (keys kept as they are without a model)."""
    if model is None:
        return {k: (None, k) for k in keys}
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names = dict.fromkeys(model.state_dict(keep_vars=True))
    out: dict[str, tuple] = {}
    for key in sorted(keys, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, names)
        if pattern is None:
            out[target] = (None, key)
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        out.setdefault(target, (converter, {p: [] for p in converter.source_patterns}))[1][pattern].append(key)
    return out


def empty_model(directory, dtype: torch.dtype | None = None, attn_implementation: str | None = None):
    """The Hugging Face causal LM of checkpoint `directory`, built from its config with its parameters on the
    meta device (no weight is read) and its computed buffers (rotary frequencies) real, in eval mode."""
    import transformers
    from accelerate import init_empty_weights
    config = transformers.AutoConfig.from_pretrained(directory)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype or config.dtype, **kwargs)
    model.tie_weights()  # init_empty_weights re-creates each parameter it registers, which unties them
    return model.eval()
