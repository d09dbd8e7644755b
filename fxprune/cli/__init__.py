"""The `fxprune` command line."""
from fxprune.cli.main import main

__all__ = ["main"]
