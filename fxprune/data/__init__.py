"""Inputs: model loading (the embedded SmolLM2), calibration text and instruction data, data directories."""
from fxprune.data.models import load_model

__all__ = ["load_model"]
