"""fxprune: structured pruning of causal LMs by compiler passes over torch.fx graphs."""
from fxprune.analyze import analyze
from fxprune.calibration import Calibration
from fxprune.api import PLAN_KEY, apply, compile, plan
from fxprune.capture import CaptureError, capture
from fxprune.config import PruneConfig
from fxprune.generation import Generator, generate
from fxprune.groups import DependencyGraph, Group, Member
from fxprune.plan import PlanError, PrunePlan
from fxprune.refit import Refit
from fxprune.serialization import load, save
from fxprune.export import ExportError, export_gguf, export_hf, export_program

__all__ = ["analyze", "apply", "compile", "plan", "capture", "CaptureError", "PruneConfig", "DependencyGraph",
           "Group", "Member", "PlanError", "PrunePlan", "PLAN_KEY", "save", "load",
           "ExportError", "export_gguf", "export_hf", "export_program", "Generator", "generate",
           "Refit", "Calibration"]
