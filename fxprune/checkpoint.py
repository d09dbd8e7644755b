"""`prune_checkpoint`: prune a checkpoint directory larger than memory, one decoder layer at a time (the streaming
stage's executor, scores and output under the API's settings and plan)."""
from __future__ import annotations

from pathlib import Path

from fxprune.analysis.analyze import analyze
from fxprune.api import config_from
from fxprune.data.calibration import Calibration
from fxprune.defaults import default_calibration, find_tokenizer, resolve_data
from fxprune.planning.config import PruneConfig
from fxprune.planning.plan import PrunePlan, make_plan
from fxprune.serialization import save_streamed
from fxprune.streaming import CheckpointWeights, StreamedExecutor, empty_model, partition, streamed_score
from fxprune.streaming.budget import check_budget, parse_bytes
from fxprune.streaming.statistics import forward_only
from fxprune.streaming.weights import checkpoint_files


def streamed_config(ratio: float | PruneConfig = 0.2, importance=None, **options) -> PruneConfig:
    """The PruneConfig of a streamed prune (`prune_checkpoint`): flap and reconstruct="none" unless set (or
    `ratio` is a PruneConfig); raises ValueError naming a setting that does not stream yet (an importance that
    needs gradients)."""
    if not isinstance(ratio, PruneConfig):
        options = {"importance": importance or "flap", "reconstruct": "none", **options}
    elif importance is not None:
        options["importance"] = importance
    cfg = config_from(ratio, None, options)
    forward_only(cfg.importance, cfg.seed)
    return cfg


def prune_checkpoint(checkpoint, ratio: float | PruneConfig = 0.2, output=None, *, importance=None, max_memory=None,
                     calibration=None, tokenizer=None, spill_dir=None, progress=None, refit_calibration=None,
                     **options) -> PrunePlan:
    """Prune the Hugging Face checkpoint directory `checkpoint` (safetensors) without loading it whole: captured on
    the meta device, scored one decoder layer at a time with its weights read from the shards, planned, and
    (with `output`) written pruned to `output` in `fxprune.save`'s format, layer by layer. Returns the plan.

    `max_memory` ("2GB", "512MB" or bytes) bounds the weights held at once, and the activations kept in memory
    (the rest spill under `spill_dir`); a budget smaller than one segment's weights is refused before any
    weight is read. Forward-only importances only (flap, the default, wanda, obs, l2, l1): the others are refused
    at once. reconstruct="none" unless set (or `ratio` is a PruneConfig); a refit ("bias", "lstsq", any `Refit`)
    runs in the write sweep, the dense and the pruned activations carried side by side
    (`fxprune.streaming.refit`), on `refit_calibration`, else `calibration`, else the packaged sample's
    `Refit.samples` windows: the rows `fxprune.compile` refits on, and the weights it gives. Its two streams share
    the activations' part of `max_memory`; its solves hold, beside it, a few float64 matrices as large as the
    square of the widest refitted projection's kept inputs (as the in-memory refit does).
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
    scores = streamed_score(executor, method=cfg.importance, calibration=batches, aggregation=cfg.aggregation,
                            seed=cfg.seed)
    pruning = make_plan(dg, cfg, scores)
    if output is not None:
        refit = refit_rows(skeleton, pruning, calibration, refit_calibration, tokenizer)
        # writing a shard holds its dense tensors, their pruned copies and the serialised shard; the refit's two
        # streams share what scoring's activations had
        save_streamed(executor, pruning, output, None if budget is None else budget // 3, report("write"), refit,
                      None if budget is None else max(budget - weights, 0) // 2, spill_dir)
    return pruning


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
