"""Standard checkpoints out of a pruned GraphModule: Hugging Face, GGUF and torch.export programs."""
from fxprune.export.common import ExportError
from fxprune.export.gguf import export_gguf
from fxprune.export.hf import export_hf
from fxprune.export.program import export_program

__all__ = ["ExportError", "export_gguf", "export_hf", "export_program"]
