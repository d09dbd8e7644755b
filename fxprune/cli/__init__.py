"""The `fxprune` command line."""
from fxprune.cli.commands import main

__all__ = ["main"]
