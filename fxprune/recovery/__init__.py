"""Stage 7, recovery: LoRA or full fine-tuning of a pruned GraphModule with peft and accelerate, optionally
distilled from the dense model (`tune(gm, examples, LoraSettings(...), teacher=dense)`, then `merge`)."""
from fxprune.recovery.checkpoints import checkpoints
from fxprune.recovery.examples import collate
from fxprune.recovery.lora import merge, tune
from fxprune.recovery.settings import LoraSettings
from fxprune.recovery.targets import linear_modules, linear_targets, output_heads, resolve_targets

__all__ = ["LoraSettings", "tune", "merge", "checkpoints", "collate", "linear_modules", "linear_targets",
           "output_heads", "resolve_targets"]
