"""Inputs: model loading (the embedded SmolLM2), calibration text and instruction data, data directories."""
