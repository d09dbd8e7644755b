"""`LoraSettings`: the frozen, validated settings of a recovery run, and accelerate's precision for them."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

# Settings that change the optimisation trajectory: a checkpoint made under other values is refused.
TRAJECTORY_FIELDS = ("r", "alpha", "dropout", "lr", "batch_size", "grad_accum", "cutoff_len", "seed", "trainable",
                     "kd_alpha", "kd_temperature", "hidden_weight")
TRAINABLE = ("lora", "full")  # LoRA adapters on the projections, or every parameter of the pruned graph


@dataclass(frozen=True)
class LoraSettings:
    """LoRA post-training settings (defaults follow LLM-Pruner's recovery stage, at micro-batch 4).

    `batch_size` is per process and per micro-step; the effective batch is
    batch_size * grad_accum * num_processes. `max_steps` (optimizer steps) overrides `epochs`.
    `dtype`: "auto" trains under bf16 autocast on CUDA and in fp32 on CPU; "bf16", "fp16" or
    "fp32" force it. Weights keep their dtype (mixed precision, fp32 master LoRA weights).
    `output_dir`: checkpoints go to `output_dir/checkpoint-<step>` every `checkpoint_every`
    optimizer steps and at the end of training.
    `trainable`: "lora" (adapters; r/alpha/dropout/target_modules apply) or "full" (the pruned
    weights themselves, every parameter of the GraphModule).
    Distillation (used only when tune() gets a `teacher`; see fxprune.recovery.distill): the loss is
    (1 - kd_alpha) * CE + kd_alpha * T^2 * KL(teacher || student) at temperature `kd_temperature`,
    plus `hidden_weight` * MSE of the final hidden states (0: no hidden-state matching).
    """
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    lr: float = 1e-4
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    cutoff_len: int = 256
    target_modules: tuple[str, ...] | list[str] | str | None = None
    seed: int = 0
    dtype: str = "auto"
    checkpoint_every: int | None = None
    output_dir: str | os.PathLike | None = None
    log_every: int = 10
    trainable: str = "lora"
    kd_alpha: float = 1.0
    kd_temperature: float = 1.0
    hidden_weight: float = 0.0

    def __post_init__(self):
        for name in ("r", "batch_size", "grad_accum", "cutoff_len", "epochs", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"LoraSettings.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"LoraSettings.{name} must be None or >= 1, got {value}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoraSettings.dropout must be in [0, 1), got {self.dropout}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"LoraSettings.trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if not 0 <= self.kd_alpha <= 1:
            raise ValueError(f"LoraSettings.kd_alpha must be in [0, 1], got {self.kd_alpha}")
        if not self.kd_temperature > 0:
            raise ValueError(f"LoraSettings.kd_temperature must be > 0, got {self.kd_temperature}")
        if not self.hidden_weight >= 0:
            raise ValueError(f"LoraSettings.hidden_weight must be >= 0, got {self.hidden_weight}")
        if self.checkpoint_every is not None and self.output_dir is None:
            raise ValueError("LoraSettings.checkpoint_every needs an output_dir")
        mixed_precision(self.dtype)  # validates the name
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["output_dir"] = None if self.output_dir is None else str(self.output_dir)
        d["target_modules"] = list(self.target_modules) if isinstance(self.target_modules, tuple) else self.target_modules
        return d


_DTYPES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16",
           "fp32": "no", "float32": "no", "no": "no"}


def mixed_precision(dtype: str) -> str:
    """accelerate's `mixed_precision` for a LoraSettings.dtype."""
    if dtype == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if dtype not in _DTYPES:
        raise ValueError(f"LoraSettings.dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]
