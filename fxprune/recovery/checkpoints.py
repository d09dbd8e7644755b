"""Resumable recovery: checkpoint folders, the settings fingerprint they must match, LoRA-only saving."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from fxprune.recovery.settings import TRAJECTORY_FIELDS, LoraSettings

STATE_FILE = "fxprune_lora_state.json"
CHECKPOINT_PREFIX = "checkpoint-"


def checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints under output_dir (those with their state file), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", d.name)
        if m and d.is_dir() and (d / STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def run_fingerprint(settings: LoraSettings, targets, n_examples, num_processes, precision) -> dict:
    d = {k: getattr(settings, k) for k in TRAJECTORY_FIELDS}
    d.update(target_modules=list(targets), n_examples=n_examples, num_processes=num_processes,
             mixed_precision=precision)
    return d


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def register_lora_only_checkpointing(accelerator):
    """Make save_state/load_state store only the trainable (LoRA) weights, not the frozen base model. Under FSDP
    accelerate saves and loads the sharded model itself (its own files), so nothing is registered."""
    from accelerate.utils import DistributedType
    from safetensors.torch import load_file

    if accelerator.distributed_type == DistributedType.FSDP:
        return

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            if i < len(weights):
                weights[i] = {n: p.detach().contiguous() for n, p in _trainable(accelerator.unwrap_model(model)).items()}

    def load_hook(models, input_dir):
        for model in list(models):
            i = accelerator._models.index(model)
            path = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            state = load_file(str(path))
            own = _trainable(accelerator.unwrap_model(model))
            if set(state) != set(own):
                raise ValueError(f"checkpoint {input_dir} holds other trainable weights than the model: "
                                 f"missing {sorted(set(own) - set(state))[:5]}, unexpected {sorted(set(state) - set(own))[:5]}")
            with torch.no_grad():
                for name, value in state.items():
                    own[name].copy_(value)
            models.remove(model)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
