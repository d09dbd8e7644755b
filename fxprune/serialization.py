"""Save and load pruned GraphModules without pickle: safetensors + JSON; prune a checkpoint straight to disk.

`load` rebuilds the base architecture from its config without initialising it (built on the meta
device, then given uninitialised CPU storage that is never written, so device-dependent model code
traces its CPU path), re-applies the plan (the rewrite is deterministic), and assigns the saved
weights. The uninitialised dense storage is virtual memory only; the pruned copies the rewrite slices
from it are resident until the saved tensors replace them.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fxprune.analysis.analyze import analyze
from fxprune.api import apply, base_description, check_plan
from fxprune.analysis.meta_keys import BASE_KEY, PLAN_KEY
from fxprune.analysis.fx_util import owner_and_leaf
from fxprune.planning.plan import PrunePlan
from fxprune.rewrite.emit import unique_tensors
from fxprune.scoring.calibration import calibration_for
from fxprune.streaming.output import write_shards
from fxprune.streaming.refit import StreamedRefit
from fxprune.streaming.weights import INDEX, SINGLE, checkpoint_files
from fxprune.rewrite.verify import verify
from fxprune.util.distributed import on_rank_zero

FORMAT = 1
FILES = ("plan.json", "config.json", "fxprune.json")
WEIGHTS = (SINGLE, INDEX)  # the weights in one file, or in shards listed by an index


def missing_files(directory: Path) -> list[str]:
    """The files of `fxprune.save`'s format that `directory` lacks (its weights: one file or indexed shards)."""
    missing = [f for f in FILES if not (directory / f).is_file()]
    return missing if any((directory / w).is_file() for w in WEIGHTS) else [WEIGHTS[0], *missing]


def write_directory(directory, plan, base: dict, dtype: torch.dtype, write_weights) -> Path:
    """Write `directory` atomically (in a temporary sibling, then renamed): the weights by `write_weights(folder)`,
    then the plan, the base model's config (`base_description`) and the format with `dtype`. Under a process
    group (`fxprune.util.distributed`) every rank calls it: rank 0 writes and the others wait for it."""
    return on_rank_zero(lambda: _write_directory(Path(directory), plan, base, dtype, write_weights))


def _write_directory(directory: Path, plan, base: dict, dtype: torch.dtype, write_weights) -> Path:
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fxprune-", dir=directory.parent))
    try:
        write_weights(tmp)
        (tmp / "plan.json").write_text(plan.to_json())
        (tmp / "config.json").write_text(json.dumps(base["config"], indent=1, default=str))
        meta = {"format": FORMAT, "architecture": base["architecture"], "dtype": str(dtype).replace("torch.", "")}
        (tmp / "fxprune.json").write_text(json.dumps(meta, indent=1))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return directory


def save(gm: torch.fx.GraphModule, directory, base_model=None) -> Path:
    """Write weights, plan and base config to `directory` atomically (write, then rename); under a process group
    every rank calls it and rank 0 writes (`fxprune.util.distributed`)."""
    plan = gm.meta.get(PLAN_KEY)
    base = base_description(base_model) if base_model is not None else gm.meta.get(BASE_KEY)
    if plan is None or base is None:
        raise ValueError("save needs a GraphModule made by fxprune.apply/compile (it carries its plan and base model)")
    state = {k: t.detach().contiguous().cpu() for k, t in unique_tensors(gm).items()}
    return write_directory(directory, plan, base, next(gm.parameters()).dtype,
                           lambda folder: save_file(state, folder / WEIGHTS[0]))


def save_streamed(executor, plan: PrunePlan, directory, budget: int | None = None, progress=None, calibration=None,
                  activations: int | None = None, spill_dir=None, refit_batch: int | None = None) -> Path:
    """Write the checkpoint `executor` streams (a `fxprune.streaming.StreamedExecutor` on a meta-device analysis),
    pruned by `plan` (made on that analysis) to `directory` in `save`'s format, a shard per group of segments whose
    tensors fit `budget` bytes: the pruned model is never held whole. When the plan refits (`plan.config.reconstruct`),
    the projections are refitted on `calibration` (any form `Calibration.of` accepts) as the shards are written
    (`fxprune.streaming.refit.StreamedRefit`: the weights `fxprune.apply` would give), each stream's activations
    kept in memory up to `activations` bytes and spilled under `spill_dir` past it, in batches of `refit_batch` rows
    (all at once by default, as `fxprune.apply` runs them: the same weights to the last bit).
    `progress(segment)` is called for each segment of a written shard."""
    dg = executor.dg
    check_plan(dg, plan)
    settings = plan.config.reconstruct
    refits = settings.enabled and bool(plan.kept)
    if refits and calibration is None:
        raise ValueError(f"the plan asks for reconstruct mode {settings.mode!r}, which needs calibration: pass "
                         "calibration= (token ids) to save_streamed, or plan with reconstruct='none'")
    kept = {dg.groups[gid].atom_id: units for gid, units in plan.units.items()}

    def write(folder):
        if not refits:
            return write_shards(executor, kept, folder, budget, progress)
        rows = calibration_for(dg, calibration, "the streamed refit")
        with StreamedRefit(executor, plan.kept, settings, rows, refit_batch, activations, spill_dir) as refit:
            write_shards(executor, kept, folder, budget, progress, refit)
    return write_directory(directory, plan, base_description(dg.model), next(iter(dg.parameters.values())).dtype,
                           write)


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The saved tensors of an fxprune directory, from model.safetensors or every shard of its index."""
    files = checkpoint_files(directory)
    state = {}
    for name in dict.fromkeys(files.values()):
        state.update(load_file(directory / name))
    return state


def add_reconstruction_biases(gm: torch.fx.GraphModule, state: dict) -> None:
    """Give each nn.Linear the bias the reconstruction added to it before saving (values follow)."""
    for key, value in state.items():
        parent, _, leaf = key.rpartition(".")
        try:
            module = gm.get_submodule(parent) if leaf == "bias" and parent else None
        except AttributeError:
            continue
        if isinstance(module, torch.nn.Linear) and module.bias is None and value.shape == (module.out_features,):
            module.bias = torch.nn.Parameter(torch.empty_like(value, dtype=module.weight.dtype),
                                             module.weight.requires_grad)


def rebuild_base(architecture: str, config_dict: dict, dtype: torch.dtype) -> torch.nn.Module:
    """The base architecture built from its config, with uninitialised CPU storage (never read for values)."""
    module, _, name = architecture.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    config = cls.config_class.from_dict(config_dict)
    config._attn_implementation = config_dict.get("_attn_implementation_internal") or config_dict.get("_attn_implementation") or "sdpa"
    with torch.device("meta"):
        base = cls(config).to(dtype).eval()
    # Uninitialised CPU storage, never written (the capture reads shapes and dtypes only; the saved
    # tensors replace it below): model code that branches on the device type (Mixtral's expert
    # histogram is int on non-CPU devices, float on CPU) then traces the CPU path the saved graph came from.
    base = base.to_empty(device="cpu")
    if hasattr(base, "tie_weights"):  # to_empty gives every parameter its own storage: tie them again
        base.tie_weights()
    return base


def read_saved(directory) -> tuple[PrunePlan, dict, torch.dtype, dict[str, torch.Tensor]]:
    """The plan, the base model's description (as `base_description` gives it), the dtype and the saved tensors of
    `directory`, without rebuilding the model. Raises `FileNotFoundError` for a missing file and `ValueError`
    for another format."""
    directory = Path(directory)
    missing = missing_files(directory)
    if missing:
        raise FileNotFoundError(f"{directory} is not an fxprune directory: missing {', '.join(missing)}")
    meta = json.loads((directory / "fxprune.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory}/fxprune.json has format {meta.get('format')!r}, expected {FORMAT}")
    description = {"architecture": meta["architecture"], "config": json.loads((directory / "config.json").read_text())}
    plan = PrunePlan.from_json((directory / "plan.json").read_text())
    return plan, description, getattr(torch, meta["dtype"]), read_weights(directory)


def load(directory) -> torch.fx.GraphModule:
    """Rebuild a pruned model saved by `fxprune.save` (or streamed by `prune_checkpoint`) in `directory`: the
    architecture from config.json on the meta device, the plan replayed on it, then the saved weights (one file
    or shards), and the graph verified (`fxprune.rewrite.verify`) before it is returned. Raises
    `FileNotFoundError` for a missing file and `ValueError` when the files disagree with each other."""
    directory = Path(directory)
    plan, description, dtype, state = read_saved(directory)
    base = rebuild_base(description["architecture"], description["config"], dtype)
    dg = analyze(base, constants=state)  # constants: values the meta capture lacks
    gm = apply(base, plan, dg=dg, reconstruct=False, verify=False)  # verified below, with its weights in
    add_reconstruction_biases(gm, state)
    expected = unique_tensors(gm)
    if set(state) != set(expected):
        raise ValueError(f"the weights in {directory} do not match its plan: "
                         f"missing {sorted(set(expected) - set(state))[:5]}, unexpected {sorted(set(state) - set(expected))[:5]}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"{directory}: tensor {key} has shape {tuple(value.shape)}, plan expects {tuple(expected[key].shape)}")
    tied = {}
    for pname, t in gm.named_parameters(remove_duplicate=False):
        tied.setdefault(id(t), []).append(pname)
    for key in list(state):  # non-persistent buffers are not in the state dict: assign them directly
        if key in expected and key not in gm.state_dict():
            owner, leaf = owner_and_leaf(gm, key)
            owner.register_buffer(leaf, state.pop(key), persistent=False)
    gm.load_state_dict(state, strict=False, assign=True)
    for names in tied.values():  # assign=True replaced one name of a tied weight: point the others at it
        owner = next(n for n in names if n in state)
        for alias in names:
            if alias != owner:
                setattr(*owner_and_leaf(gm, alias), gm.get_parameter(owner))
    for pname, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        if t.is_meta:
            raise ValueError(f"{directory}: {pname} was not loaded")
    verify(gm, dg, plan)
    return gm
