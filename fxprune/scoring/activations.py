"""Per-input-channel statistics of the dense model's projections on calibration text.

What the activation-aware estimators (FLAP's fluctuation, Wanda-sp) read: for every projection the
rewrite would lift to `nn.Linear` (see LiftLinearModulesPass), the mean, variance and squared norm
over calibration tokens of each of its input channels. One forward pass of the captured graph per
calibration batch, no backward; the logits are never computed (the run stops after the last
projection the scorer asked for).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fxprune.fx_util import get_attr_path
from fxprune.projections import first_projections, inverse_energy, residual_partner, step, stream_like
from fxprune.scoring.calibration import calibration_for
from fxprune.scoring.forward import compute_device


@dataclass
class InputStats:
    """Statistics of one projection's inputs, one entry per input channel (along `dim` of the weight)."""
    dim: int                 # the weight's input dimension (1 for [out, in], 0 for GPT-2's [in, out])
    tokens: int
    mean: torch.Tensor
    var: torch.Tensor
    sq_norm: torch.Tensor    # sum over tokens of x**2 (Wanda's ||X_j||^2)
    # When asked for: sum over tokens of w_t [x_t, 1][x_t, 1]^T, [in + 1, in + 1] float32, with w_t the
    # reconstruction pass's token weights (`projections.token_weights`: 1 / mean square of the residual
    # stream, normalised to mean 1 over all calibration tokens), and that mean before normalising: errors
    # measured with `gram` times `weight_scale` are errors of the normalised stream, comparable across layers.
    gram: torch.Tensor | None = None
    weight_scale: float = 1.0


def projection_inputs(gm: torch.fx.GraphModule, aliases: dict, names=None) -> dict[torch.fx.Node, tuple]:
    """The first projection node reading each weight: (canonical name, input dim of the weight, bias node or None)."""
    out, seen = {}, set()
    for node, name, _, bias, transposed in first_projections(gm):
        name = aliases.get(name, name)
        if (names is None or name in names) and name not in seen:
            seen.add(name)
            out[node] = (name, 0 if transposed else 1, bias)
    return out


def gram_members(groups) -> set[tuple[str, int]]:
    """The (weight name, dim) pairs of the groups' members: `input_statistics(gram=...)` for every member
    that is the input dimension of a projection."""
    return {(m.name, m.dim) for g in groups for m in g.members}


def weighted_gram(x, weight, bias, dim, residual, tokens, acc):
    """(`acc` plus sum_t e_t [x_t, 1][x_t, 1]^T, sum_t e_t) for the inputs `x` [tokens, in] of the projection
    of `weight` (and `bias` or None), e_t the token's `inverse_energy` (normalised once all batches are in)."""
    xf = x.float()
    w = weight.detach().float().to(xf.device)
    dense_out = xf @ (w.t() if dim == 1 else w)
    if bias is not None:  # the refit's weights see the whole output, bias included
        dense_out = dense_out + bias.detach().float().to(xf.device)
    residual = stream_like(residual, tokens.numel(), dense_out.shape[-1])
    if residual is not None:
        residual = residual[tokens]
    energy = inverse_energy(dense_out, residual)
    xa = torch.cat([xf, xf.new_ones(xf.shape[0], 1)], 1)
    xw = xa * energy.float().to(xf.device)[:, None]
    gram = xw.t() @ xa if acc is None else acc[0].addmm_(xw.t(), xa)
    return gram, float(energy.sum()) + (0.0 if acc is None else acc[1])


@torch.no_grad()
def input_statistics(dg, calibration, names=None, batch_size: int = 8, gram=()) -> dict[str, InputStats]:
    """Statistics of the projections reading the weights `names` (all when None), keyed by canonical
    weight name; `calibration` in any form `score` accepts, run `batch_size` samples at a time. `gram`:
    (weight name, dim) pairs whose projection, when `dim` is its input dimension, also gets the weighted
    Gram matrix of its inputs (the refit-aware estimator reads it; [in, in] floats each, so only where
    asked). The token weights are the refit's, so that both weigh an output error alike."""
    found = projection_inputs(dg.gm, dg.aliases, names)
    stops = {n: (name, dim) for n, (name, dim, _) in found.items()}
    gram = set(gram)
    partners = {n: residual_partner(n) for n, key in stops.items() if key in gram}
    biases = {name: None if b is None else get_attr_path(dg.gm, b.target) for name, _, b in found.values()}
    sums: dict[str, list] = {}
    device = compute_device(dg, None)  # the graph runs on its own weights: the tokens go where they are
    for ids, mask in calibration_for(dg, calibration, "activation statistics").batches(batch_size, device):
        tokens = mask.reshape(-1).bool()
        inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        run = step(dg.gm, inputs, stops, partners)
        for (name, dim), x, residual in run:
            x = x.reshape(-1, x.shape[-1])[tokens].double()
            acc = sums.setdefault(name, [0, 0.0, 0.0, None])
            acc[0] += x.shape[0]
            acc[1] = acc[1] + x.sum(0)
            acc[2] = acc[2] + x.pow(2).sum(0)
            if (name, dim) in gram:
                acc[3] = weighted_gram(x, dg.parameters[name], biases[name], dim, residual, tokens, acc[3])
            if len(sums) == len(stops) and name == list(stops.values())[-1][0]:
                break
        run.close()
    dims = dict(stops.values())
    out = {}
    for name, (n, s, sq, xx) in sums.items():
        mean = s / n
        var = (sq / n - mean.pow(2)).clamp_min(0) * n / max(n - 1, 1)
        stats = InputStats(dims[name], n, mean.float().cpu(), var.float().cpu(), sq.float().cpu())
        if xx is not None:  # normalised as the refit's token weights are: mean 1 over the tokens
            stats.weight_scale = xx[1] / n
            stats.gram = (xx[0] / stats.weight_scale).cpu()
        out[name] = stats
    return out
