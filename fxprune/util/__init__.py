"""Helpers every stage may use: the causal LM loss, device and dtype checks. Imports nothing else of fxprune."""
