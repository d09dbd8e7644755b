"""`score`: one importance value per unit of every group, for a method given as settings or a name."""
from __future__ import annotations

import torch

from fxprune.analysis.groups import DependencyGraph
from fxprune.scoring.aggregate import AGGREGATIONS, estimate, resolve_groups
from fxprune.scoring.calibration import calibration_for
from fxprune.scoring.estimators import ESTIMATORS
from fxprune.scoring.forward import compute_device
from fxprune.scoring.activations import gram_members, input_statistics
from fxprune.scoring.gradients import GradientStats, gradients_for, member_names
from fxprune.scoring.hybrid import hywia
from fxprune.scoring.methods import HyWIA, Method, as_method
import fxprune.scoring.obs  # noqa: F401  (registers "obs")


def score(dg: DependencyGraph, groups=None, method: str | Method = "l2", calibration=None, aggregation: str = "sum",
          seed: int = 0, batch_size: int = 1, device=None, dtype=None, *, checkpoint: bool = False,
          gradients: GradientStats | None = None, ratio: float = 0.2, inputs: dict | None = None,
          weights=None) -> dict[int, torch.Tensor]:
    """Importance of every unit of `groups` (default: all groups of `dg`): {group.id: Tensor[n_units]}.

    `method`: settings (`Taylor(order=1)`, `Magnitude(p=2)`, `HyWIA(steps=30)`, ...) or a shorthand name
    ("element1", "l2", "hywia", or any name given to `register_estimator`); HyWIA's own settings (steps, lr,
    ...) are fields of `HyWIA(...)`. `calibration`: a `fxprune.data.calibration.Calibration` or what
    `Calibration.of` accepts (input_ids LongTensors [batch, seq], dicts with "input_ids" and optionally
    "attention_mask"), needed by the data-reading methods (vector, element1, ..., flap, wanda, obs, hywia).
    `aggregation` combines the members of a group: sum, mean, max, prod, or last (the member used last in graph
    order). `gradients`: reuse a `compute_gradients` result across methods. `seed` seeds "random"
    (a `Random(seed)` carries its own) and HyWIA's initialisation; `ratio` is the plan's ratio, which
    HyWIA learns for. `HyWIA(after_refit=True)` needs the plan's refit: it is refused here (use fxprune.plan).
    `weights`: the tensors to score (name -> tensor) in place of `dg.parameters` (a graph captured on the meta
    device).
    Scores are float32 on the CPU; the model is never modified.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    method = as_method(method, ESTIMATORS, seed)
    groups = resolve_groups(dg, groups)
    if isinstance(method, HyWIA):
        return hywia(dg, groups, calibration, ratio=ratio, aggregation=aggregation, seed=seed, batch_size=batch_size,
                     device=device, dtype=dtype, checkpoint=checkpoint, gradients=gradients, settings=method,
                     inputs=inputs).scores
    if method.estimator not in ESTIMATORS:
        raise ValueError(f"{method!r} names estimator {method.estimator!r}, which is not registered; "
                         f"registered: {sorted(ESTIMATORS)}")
    estimator = ESTIMATORS[method.estimator]
    needs = getattr(estimator, "needs", frozenset())
    grads = gradients_for(dg, groups, needs, method.estimator, calibration, gradients, batch_size, device, dtype,
                          checkpoint)
    seed = getattr(method, "seed", seed)
    if "inputs" not in needs:
        inputs = None
    elif inputs is None:
        calibration = calibration_for(dg, calibration, f"method {method!r} (calibration activations)")
        inputs = input_statistics(dg, calibration, member_names(dg, groups),
                                  gram=gram_members(groups) if "gram" in needs else ())
    elif "gram" in needs and not any(s.gram is not None for s in inputs.values()):
        # without it every member would fall back to l2, silently
        raise ValueError(f"method {method!r} reads the Gram matrix of the projections' inputs, which the given "
                         "inputs lack: compute them with input_statistics(..., gram=...) or pass calibration only")
    return estimate(dg, groups, estimator, aggregation, grads, seed, compute_device(dg, device), method, inputs,
                    weights)
