"""Forward-only importance through the streamed executor: the projections' input statistics gathered by
hooks as the calibration batches pass each segment (the same accumulation as `scoring.activations`), then
`scoring.score` on them with the weights read from the source. l1/l2, Wanda-sp, FLAP and obs give the
scores, and so the plan, of the in-memory model."""
from __future__ import annotations

import torch

from fxprune.reconstruction.projections import projection_input, residual_partner
from fxprune.scoring import ESTIMATORS, HyWIA, as_method, score
from fxprune.scoring.activations import InputStats, accumulate, finish, gram_members, projection_inputs, token_mask
from fxprune.scoring.aggregate import resolve_groups
from fxprune.scoring.calibration import calibration_for
from fxprune.scoring.gradients import member_names
from fxprune.streaming.executor import SourceTensors, StreamedExecutor
from fxprune.util.distributed import local_share


@torch.no_grad()
def streamed_input_statistics(executor: StreamedExecutor, calibration, names=None, batch_size: int = 8,
                              gram=()) -> dict[str, InputStats]:
    """`scoring.activations.input_statistics` computed segment by segment by `executor`: the same statistics
    of the projections reading the weights `names` (all when None), the same batches of `batch_size` rows.
    Under a process group each rank streams its share of the batches; `finish` adds up the ranks' sums."""
    dg = executor.dg
    found = projection_inputs(dg.gm, dg.aliases, names)
    gram = set(gram)
    partners = {n: residual_partner(n) for n, r in found.items() if (r.name, r.dim) in gram}
    rows = local_share(calibration_for(dg, calibration, "streamed statistics").batches(batch_size))
    tokens = [token_mask(ids, mask)[1].to(executor.device) for ids, mask in rows]
    sums: dict[str, list] = {}

    def observe(node, reading):
        def hook(batch, env):
            bias = None if reading.bias is None else env[reading.bias]
            accumulate(sums, reading, env[projection_input(node)], env.get(partners.get(node)), tokens[batch],
                       env[reading.weight], bias, gram)
        return hook

    if rows:  # a rank without a batch of its own still adds its (empty) sums in `finish`
        executor.run(rows, {node: observe(node, reading) for node, reading in found.items()}, logits=False)
    return finish(sums, {r.name: r.dim for r in found.values()})


def forward_only(method, seed: int = 0):
    """`method` as a scoring Method; raises ValueError naming it when it needs gradients (HyWIA, element1/2,
    vector), which streamed scoring does not compute yet."""
    given, method = method, as_method(method, ESTIMATORS, seed)
    needs = getattr(ESTIMATORS.get(method.estimator), "needs", frozenset())
    if isinstance(method, HyWIA) or needs & {"grad", "sq_grad"}:
        raise ValueError(f"importance={given!r} needs gradients, which streaming does not compute yet: use a "
                         "forward-only estimator (importance='flap', 'wanda', 'obs', 'l2' or 'l1')")
    return method


def streamed_score(executor: StreamedExecutor, groups=None, method="l2", calibration=None, aggregation: str = "sum",
                   seed: int = 0, batch_size: int = 8) -> dict[int, torch.Tensor]:
    """`fxprune.scoring.score` of a forward-only `method` (l1, l2, wanda, flap, obs, random, or one registered
    without gradient needs) for the graph `executor` streams: {group id: Tensor[n_units]}."""
    method = forward_only(method, seed)
    needs = getattr(ESTIMATORS.get(method.estimator), "needs", frozenset())
    dg = executor.dg
    groups = resolve_groups(dg, groups)
    inputs = None
    if "inputs" in needs:
        inputs = streamed_input_statistics(executor, calibration, member_names(dg, groups), batch_size,
                                           gram_members(groups) if "gram" in needs else ())
    return score(dg, groups, method, aggregation=aggregation, seed=seed, device=executor.device, inputs=inputs,
                 weights=SourceTensors(executor))
