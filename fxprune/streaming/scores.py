"""`streamed_score`: `fxprune.scoring.score` for a graph the streamed executor runs, with every statistic a
method needs computed by streamed sweeps: input statistics (l1/l2, Wanda-sp, FLAP, obs), gradients
(element1, element2, vector) and HyWIA, each equal to the in-memory model's scores."""
from __future__ import annotations

import torch

from fxprune.scoring import ESTIMATORS, HyWIA, as_method, score
from fxprune.scoring.activations import gram_members
from fxprune.scoring.aggregate import resolve_groups
from fxprune.scoring.calibration import calibration_for
from fxprune.scoring.gradients import member_names
from fxprune.streaming.executor import SourceTensors, StreamedExecutor
from fxprune.streaming.gradients import streamed_gradient_scores, streamed_gradients
from fxprune.streaming.hywia import streamed_hywia
from fxprune.streaming.resume import Snapshots
from fxprune.streaming.statistics import streamed_input_statistics


def streamable(method, seed: int = 0):
    """`method` as a scoring Method; raises ValueError naming it when it cannot stream: HyWIA judging its
    candidates after a refit (`after_refit=True`), which streaming does not make."""
    given, method = method, as_method(method, ESTIMATORS, seed)
    if isinstance(method, HyWIA) and method.after_refit and method.validate:
        raise ValueError(f"importance={given!r} judges its candidates after the plan's refit, which streaming does "
                         "not make: use HyWIA(after_refit=False)")
    return method


def streamed_score(executor: StreamedExecutor, groups=None, method="l2", calibration=None, aggregation: str = "sum",
                   seed: int = 0, batch_size: int = 1, ratio: float = 0.2,
                   snapshots: Snapshots | None = None) -> dict[int, torch.Tensor]:
    """`fxprune.scoring.score` of `method` for the graph `executor` streams: {group id: Tensor[n_units]}.
    `batch_size`: rows per pass of the gradient methods (the statistics go 8 rows a pass, as in memory);
    `ratio`: the plan's ratio, which HyWIA learns for; `snapshots`: the input-statistics sweep resumes after the
    last segment they hold (the backward sweeps start again from the first)."""
    method = streamable(method, seed)
    dg = executor.dg
    groups = resolve_groups(dg, groups)
    if isinstance(method, HyWIA):
        return streamed_hywia(executor, groups, calibration, ratio, aggregation, seed, batch_size, method).scores
    needs = getattr(ESTIMATORS.get(method.estimator), "needs", frozenset())
    inputs = grads = None
    if needs & {"inputs", "grad", "sq_grad"}:
        calibration = calibration_for(dg, calibration, f"method {method!r} (streamed statistics)")
    if "inputs" in needs:
        inputs = streamed_input_statistics(executor, calibration, member_names(dg, groups),
                                           gram=gram_members(groups) if "gram" in needs else (), snapshots=snapshots)
    if needs & {"grad", "sq_grad"} and "inputs" not in needs:  # scored layer by layer, the gradients let go
        return streamed_gradient_scores(executor, groups, ESTIMATORS[method.estimator], calibration,
                                        "sq_grad" in needs, batch_size, aggregation, getattr(method, "seed", seed),
                                        method)
    if needs & {"grad", "sq_grad"}:
        grads = streamed_gradients(executor, calibration, member_names(dg, groups), "sq_grad" in needs, batch_size)
    return score(dg, groups, method, aggregation=aggregation, seed=seed, device=executor.device, inputs=inputs,
                 gradients=grads, weights=SourceTensors(executor))
