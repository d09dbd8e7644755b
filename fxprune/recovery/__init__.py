"""Stage 7, recovery: LoRA or full fine-tuning of a pruned GraphModule with peft and accelerate, optionally
distilled from the dense model."""
