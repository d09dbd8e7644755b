"""The projections' input statistics through the streamed executor: gathered by hooks as the calibration
batches pass each segment (the same accumulation as `scoring.activations`), for Wanda-sp, FLAP and obs."""
from __future__ import annotations

import torch

from fxprune.reconstruction.projections import projection_input, residual_partner
from fxprune.scoring.activations import InputStats, accumulate, finish, projection_inputs, token_mask
from fxprune.scoring.calibration import calibration_for
from fxprune.streaming.executor import StreamedExecutor
from fxprune.streaming.resume import Snapshots
from fxprune.util.distributed import local_share


@torch.no_grad()
def streamed_input_statistics(executor: StreamedExecutor, calibration, names=None, batch_size: int = 8,
                              gram=(), snapshots: Snapshots | None = None) -> dict[str, InputStats]:
    """`scoring.activations.input_statistics` computed segment by segment by `executor`: the same statistics
    of the projections reading the weights `names` (all when None), the same batches of `batch_size` rows.
    `snapshots`: resume after the last segment they hold, and record the sweep's boundaries. Under a process
    group each rank streams its share of the batches; `finish` adds up the ranks' sums."""
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
        executor.run(rows, {node: observe(node, reading) for node, reading in found.items()}, logits=False,
                     snapshots=snapshots, state=sums)
    return finish(sums, {r.name: r.dim for r in found.values()})
