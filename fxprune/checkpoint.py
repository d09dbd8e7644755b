"""`prune_checkpoint`: prune a checkpoint directory larger than memory, one decoder layer at a time (the streaming
stage's executor, scores and output under the API's settings and plan)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from fxprune.analysis.analyze import analyze
from fxprune.api import config_from
from fxprune.data.calibration import Calibration
from fxprune.defaults import default_calibration, find_tokenizer, resolve_data
from fxprune.planning.config import PruneConfig
from fxprune.scoring import ESTIMATORS, HyWIA, as_method
from fxprune.scoring.calibration import calibration_for
from fxprune.planning.plan import PrunePlan, make_plan, target_groups
from fxprune.serialization import save_streamed
from fxprune.streaming import CheckpointWeights, StreamedExecutor, empty_model, partition, streamed_score
from fxprune.streaming.budget import check_budget, largest_segment, parse_bytes
from fxprune.streaming.estimate import CostEstimate, refit_work
from fxprune.streaming.probe import probe
from fxprune.streaming.resume import WorkFolder, checkpoint_key
from fxprune.streaming.scores import streamable
from fxprune.streaming.weights import checkpoint_files
from fxprune.util import distributed


def streamed_config(ratio: float | PruneConfig = 0.2, importance=None, **options) -> PruneConfig:
    """The PruneConfig of a streamed prune (`prune_checkpoint`): flap and reconstruct="none" unless set (or
    `ratio` is a PruneConfig); raises ValueError naming a setting that does not stream yet (an importance that
    needs gradients)."""
    if not isinstance(ratio, PruneConfig):
        options = {"importance": importance or "flap", "reconstruct": "none", **options}
    elif importance is not None:
        options["importance"] = importance
    cfg = config_from(ratio, None, options)
    as_method(cfg.importance, ESTIMATORS, cfg.seed)  # an unknown name fails here
    return cfg


def prune_checkpoint(checkpoint, ratio: float | PruneConfig = 0.2, output=None, *, importance=None, max_memory=None,
                     calibration=None, tokenizer=None, spill_dir=None, progress=None, refit_calibration=None,
                     snapshot_every: float = 60.0,
                     **options) -> PrunePlan:
    """Prune the Hugging Face checkpoint directory `checkpoint` (safetensors) without loading it whole: captured on
    the meta device, scored one decoder layer at a time with its weights read from the shards, planned, and
    (with `output`) written pruned to `output` in `fxprune.save`'s format, layer by layer. Returns the plan.

    `max_memory` ("2GB", "512MB" or bytes) bounds the weights held at once, and the activations kept in memory
    (the rest spill under `spill_dir`); a budget smaller than one segment's weights is refused before any
    weight is read. Every importance streams (flap, the default, wanda, obs, l2, l1; element1, element2, vector
    and HyWIA by backward sweeps, HyWIA with its masked validation). reconstruct="none" unless set (or `ratio` is
    a PruneConfig); a refit ("bias", "lstsq", any `Refit`) runs in the write sweep, the dense and the pruned
    activations carried side by side (`fxprune.streaming.refit`), on `refit_calibration`, else `calibration`,
    else the packaged sample's `Refit.samples` windows: the rows `fxprune.compile` refits on, and the weights it
    gives. Its two streams share the activations' part of `max_memory`; its solves hold, beside it, a few float64
    matrices as large as the square of the widest refitted projection's kept inputs (as the in-memory refit does).
    `progress(stage, segment, count)` is called after each of the `count` segments of each sweep ("score", then
    "write"). With `output`, a run interrupted (killed, or stopped by an exception) and started again with the
    same arguments resumes: after the last layer whose boundary was recorded (every `snapshot_every` seconds)
    while scoring, after the plan while writing; it writes the same bytes (one process: ranks of a process group
    start again from the first layer). Other keywords are `PruneConfig`
    fields."""
    cfg = streamed_config(ratio, importance, **options)
    budget = parse_bytes(max_memory)
    checkpoint_files(Path(checkpoint))  # no safetensors: fails here
    skeleton = empty_model(checkpoint)
    dg = analyze(skeleton)
    segments = partition(dg)
    weights = check_budget(dg, segments, budget)
    cfg, batches = resolve_data(skeleton, cfg, calibration, tokenizer, scored=False)
    reported: dict[str, set] = {"score": set(), "write": set()}

    def report(stage):  # each segment once per stage (HyWIA sweeps many times), None without a callback
        def update(segment):
            if segment.index not in reported[stage]:
                reported[stage].add(segment.index)
                progress(stage, segment, len(segments))
        return update if progress else None
    executor = StreamedExecutor(dg, CheckpointWeights(checkpoint, skeleton), segments, spill_dir=spill_dir,
                                budget=None if budget is None else max(budget - weights, 0),
                                progress=report("score"))
    work = None
    if output is not None and not distributed.active():  # an interrupted run starts again where this one stopped
        rows = None if batches is None else calibration_for(dg, batches, "the streamed prune")
        given = None if refit_calibration is None else Calibration.of(refit_calibration)
        work = WorkFolder(output, checkpoint_key(checkpoint, config=cfg.to_dict(), ids=getattr(rows, "ids", None),
                                                 mask=getattr(rows, "mask", None), refit_ids=getattr(given, "ids", None),
                                                 refit_mask=getattr(given, "mask", None)))
    if work is not None and work.plan_file.is_file():
        pruning = PrunePlan.from_json(work.plan_file.read_text())
    else:
        # the groups the plan reads, as fxprune.plan scores them: a gradient sweep then stops at the lowest
        # layer they reach and differentiates neither the embedding nor the head
        method, groups = streamable(cfg.importance, cfg.seed), target_groups(dg, cfg)
        if isinstance(method, HyWIA):  # no refit to judge after, so it keeps its masked validation
            method = dataclasses.replace(method, after_refit=False)
        snapshots = None if work is None else work.snapshots("score", snapshot_every)
        scores = streamed_score(executor, groups, method, batches, cfg.aggregation, cfg.seed, cfg.batch_size,
                                cfg.ratio, snapshots)
        pruning = make_plan(dg, cfg, scores)
    for segment in segments if progress else ():  # those no statistic needed: resumed past, or above the last
        report("score")(segment)
    if work is not None:
        work.plan_file.write_text(pruning.to_json())
    if output is not None:
        refit = refit_rows(skeleton, pruning, calibration, refit_calibration, tokenizer)
        # writing a shard holds its dense tensors, their pruned copies and the serialised shard; the refit's two
        # streams share what scoring's activations had
        save_streamed(executor, pruning, output, None if budget is None else budget // 3, report("write"), refit,
                      None if budget is None else max(budget - weights, 0) // 2, spill_dir)
    if work is not None:
        work.clear()
    return pruning


def sweeps(cfg: PruneConfig, output: bool) -> tuple[str, ...]:
    """The sweeps over the layers a streamed prune under `cfg` makes: scoring (forward, and backward for the
    gradient estimators, once per HyWIA step besides), then the write (with the refit when it is asked for)."""
    method = as_method(cfg.importance, ESTIMATORS, cfg.seed)
    needs = getattr(ESTIMATORS.get(getattr(method, "estimator", None)), "needs", frozenset())
    passes = ("score", "backward") if isinstance(method, HyWIA) or needs & {"grad", "sq_grad"} else ("score",)
    if isinstance(method, HyWIA):
        passes += ("score", "backward") * method.steps
    if output:
        passes += ("refit",) if cfg.reconstruct.enabled else ("write",)
    return passes


def estimate_checkpoint(checkpoint, ratio: float | PruneConfig = 0.2, output: bool = True, *, importance=None,
                        max_memory=None, calibration=None, tokenizer=None, **options) -> CostEstimate:
    """The cost of `prune_checkpoint` with the same arguments, before any of it runs (`fxprune prune --dry-run`):
    sizes from the config captured on the meta device, time and memory from running the embedding and the first
    decoder layer on the calibration, multiplied out over the layers and sweeps. Reads only those two segments'
    weights; refuses what `prune_checkpoint` would refuse, before reading any."""
    cfg = streamed_config(ratio, importance, **options)
    budget = parse_bytes(max_memory)
    files = checkpoint_files(Path(checkpoint))
    start = time.perf_counter()
    skeleton = empty_model(checkpoint)
    dg = analyze(skeleton)
    segments = partition(dg)
    setup = time.perf_counter() - start
    check_budget(dg, segments, budget)
    largest, largest_bytes = largest_segment(dg, segments)
    cfg, batches = resolve_data(skeleton, cfg, calibration, tokenizer, scored=False)
    zero = {g.id: torch.zeros(g.n_units) for g in dg.groups}
    plan = make_plan(dg, cfg, zero)  # the ratio fixes the counts; which units, the scores
    after = plan.params_after
    dtype = next(iter(dg.parameters.values())).dtype
    source = CheckpointWeights(checkpoint, skeleton)
    buffers = sum(t.numel() * t.element_size() for n, t in dg.buffers.items() if n in source.names() or not t.is_meta)
    executor = StreamedExecutor(dg, source, segments[:2])
    rows = list(calibration_for(dg, batches, "the dry run's probe").batches(8)) if batches is not None else \
        [(torch.ones(1, cfg.calibration_len, dtype=torch.long), None)]
    measured = probe(executor, rows, count=min(2, len(segments)))
    size = sum((Path(checkpoint) / f).stat().st_size for f in set(files.values()))
    tokens = sum(int(mask.sum()) for _, mask in rows if mask is not None) or rows[0][0].numel()
    work = refit_work(plan.kept, {n: tuple(t.shape) for n, t in dg.parameters.items()}, cfg.reconstruct, tokens) \
        if output else 0.0
    return CostEstimate(sum(t.numel() for t in dg.parameters.values()), after, size,
                        after * (torch.finfo(dtype).bits // 8) + buffers, len(segments) - 2, largest, largest_bytes,
                        sweeps(cfg, output), budget, measured, setup, work)


def refit_rows(model, plan: PrunePlan, calibration, refit_calibration, tokenizer) -> Calibration | None:
    """The rows `plan`'s refit reads, as `fxprune.compile` chooses them: `refit_calibration`, else `calibration`,
    else `Refit.samples` windows of the packaged sample (None when the plan does not refit)."""
    settings = plan.config.reconstruct
    if not (settings.enabled and plan.kept):
        return None
    given = refit_calibration if refit_calibration is not None else calibration
    if given is not None:
        return Calibration.of(given)
    tok = find_tokenizer(model, tokenizer)
    if tok is None:
        raise ValueError(f"reconstruct={settings.mode!r} needs calibration: pass calibration= or tokenizer= to "
                         "prune_checkpoint")
    return default_calibration(tok, plan.config, settings.samples)
