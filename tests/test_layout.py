"""The stage packages depend one way: every import of fxprune code (module-level or inside a function) goes
from a stage to one listed before it (or within the stage), as docs/design.md draws it."""
import ast
from pathlib import Path

import networkx as nx

import fxprune

ROOT = Path(fxprune.__file__).parent
# Lowest first; a package may import itself and any package before it, never one after it.
LAYERS = ["util", "data", "analysis", "passes", "rewrite", "reconstruction", "scoring", "streaming", "planning",
          "api", "evaluation", "recovery", "serving", "export", "cli"]
TOP_LEVEL_API = {"api", "defaults", "serialization", "checkpoint"}  # the public verbs: plan, apply, compile, save, load
FACADE = "fxprune"  # fxprune/__init__.py re-exports the public names of every stage


def stage_of(module: str) -> str:
    first = module.split(".")[1]
    return "api" if first in TOP_LEVEL_API else first


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports():
    """(importing module, imported fxprune module) for every import statement in the package."""
    for path in sorted(ROOT.rglob("*.py")):
        here = module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fxprune"):
                if node.module == "fxprune":
                    for alias in node.names:
                        yield here, f"fxprune.{alias.name}"
                else:
                    yield here, node.module
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("fxprune."):
                        yield here, alias.name


def test_every_stage_is_a_known_layer():
    stages = {stage_of(module_name(p)) for p in ROOT.rglob("*.py") if module_name(p) != FACADE}
    assert stages <= set(LAYERS), stages - set(LAYERS)


def test_stages_import_only_earlier_stages():
    upward = [(a, b) for a, b in imports() if a != FACADE and b != FACADE
              and stage_of(b) in LAYERS and LAYERS.index(stage_of(b)) > LAYERS.index(stage_of(a))]
    assert upward == [], "imports against the stage order:\n" + "\n".join(f"{a} -> {b}" for a, b in upward)


def test_no_import_cycle_between_modules():
    graph = nx.DiGraph((a, b) for a, b in imports() if FACADE not in (a, b) and stage_of(a) == stage_of(b))
    cycles = list(nx.simple_cycles(graph))
    assert cycles == [], cycles
