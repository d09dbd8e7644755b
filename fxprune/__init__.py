"""fxprune: structured pruning of causal LMs by compiler passes over torch.fx graphs."""
from fxprune.analysis.analyze import analyze
from fxprune.data.calibration import Calibration
from fxprune.api import PLAN_KEY, apply, compile, plan
from fxprune.analysis.capture import CaptureError, capture
from fxprune.planning.config import PruneConfig
from fxprune.serving.generation import Generator, generate
from fxprune.analysis.groups import DependencyGraph, Group, Member
from fxprune.planning.plan import PlanError, PrunePlan
from fxprune.reconstruction.settings import Refit
from fxprune.checkpoint import estimate_checkpoint, prune_checkpoint
from fxprune.serialization import load, save
from fxprune.export import ExportError, export_gguf, export_hf, export_program

__all__ = ["analyze", "apply", "compile", "plan", "capture", "CaptureError", "PruneConfig", "DependencyGraph",
           "Group", "Member", "PlanError", "PrunePlan", "PLAN_KEY", "save", "load", "prune_checkpoint", "estimate_checkpoint",
           "ExportError", "export_gguf", "export_hf", "export_program", "Generator", "generate",
           "Refit", "Calibration"]
