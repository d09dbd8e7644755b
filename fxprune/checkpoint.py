"""`prune_checkpoint`: prune a checkpoint directory larger than memory, one decoder layer at a time (the streaming
stage's executor, scores and output under the API's settings and plan)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from fxprune.analysis.analyze import analyze
from fxprune.api import config_from
from fxprune.defaults import resolve_data
from fxprune.planning.config import PruneConfig
from fxprune.scoring import ESTIMATORS, HyWIA, as_method
from fxprune.planning.plan import PrunePlan, make_plan, target_groups
from fxprune.serialization import save_streamed
from fxprune.streaming import CheckpointWeights, StreamedExecutor, empty_model, partition, streamed_score
from fxprune.streaming.budget import check_budget, parse_bytes
from fxprune.streaming.scores import streamable
from fxprune.streaming.weights import checkpoint_files


def streamed_config(ratio: float | PruneConfig = 0.2, importance=None, **options) -> PruneConfig:
    """The PruneConfig of a streamed prune (`prune_checkpoint`): flap and reconstruct="none" unless set (or
    `ratio` is a PruneConfig); raises ValueError naming a setting that does not stream yet."""
    if not isinstance(ratio, PruneConfig):
        options = {"importance": importance or "flap", "reconstruct": "none", **options}
    elif importance is not None:
        options["importance"] = importance
    cfg = config_from(ratio, None, options)
    if cfg.reconstruct.enabled:
        raise ValueError(f"reconstruct={cfg.reconstruct.mode!r} does not stream yet: pass reconstruct='none' to "
                         "prune_checkpoint, or load the model and use fxprune.compile for the refit")
    as_method(cfg.importance, ESTIMATORS, cfg.seed)  # an unknown name fails here
    return cfg


def prune_checkpoint(checkpoint, ratio: float | PruneConfig = 0.2, output=None, *, importance=None, max_memory=None,
                     calibration=None, tokenizer=None, spill_dir=None, progress=None, **options) -> PrunePlan:
    """Prune the Hugging Face checkpoint directory `checkpoint` (safetensors) without loading it whole: captured on
    the meta device, scored one decoder layer at a time with its weights read from the shards, planned, and
    (with `output`) written pruned to `output` in `fxprune.save`'s format, layer by layer. Returns the plan.

    `max_memory` ("2GB", "512MB" or bytes) bounds the weights held at once, and the activations kept in memory
    (the rest spill under `spill_dir`); a budget smaller than one segment's weights is refused before any
    weight is read. Every importance streams (flap, the default, wanda, obs, l2, l1; element1, element2, vector
    and HyWIA by backward sweeps, HyWIA with its masked validation since no refit follows); reconstruct="none"
    only (the default unless `ratio` is a PruneConfig): the others are refused at once.
    `progress(stage, segment, count)` is called after each of the `count` segments of each sweep ("score", then
    "write"). Other keywords are `PruneConfig` fields."""
    cfg = streamed_config(ratio, importance, **options)
    budget = parse_bytes(max_memory)
    checkpoint_files(Path(checkpoint))  # no safetensors: fails here
    skeleton = empty_model(checkpoint)
    dg = analyze(skeleton)
    segments = partition(dg)
    weights = check_budget(dg, segments, budget)
    cfg, batches = resolve_data(skeleton, cfg, calibration, tokenizer, scored=False)
    report = (lambda stage: lambda segment: progress(stage, segment, len(segments))) if progress else \
        (lambda stage: None)
    executor = StreamedExecutor(dg, CheckpointWeights(checkpoint, skeleton), segments, spill_dir=spill_dir,
                                budget=None if budget is None else max(budget - weights, 0),
                                progress=report("score"))
    method, groups = streamable(cfg.importance, cfg.seed), None  # None: all groups, a full sweep
    if isinstance(method, HyWIA):
        # its blend depends on the groups it learns over, as in fxprune.plan; no refit to judge after, so it
        # keeps its masked validation
        method, groups = dataclasses.replace(method, after_refit=False), target_groups(dg, cfg)
    scores = streamed_score(executor, groups, method, batches, cfg.aggregation, cfg.seed, cfg.batch_size, cfg.ratio)
    pruning = make_plan(dg, cfg, scores)
    if output is not None:
        # writing a shard holds its dense tensors, their pruned copies and the serialised shard
        save_streamed(executor, pruning, output, None if budget is None else budget // 3, report("write"))
    return pruning
