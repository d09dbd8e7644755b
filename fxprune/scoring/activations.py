"""Per-input-channel statistics of the dense model's projections on calibration text.

What the activation-aware estimators (FLAP's fluctuation, Wanda-sp) read: for every projection the
rewrite would lift to `nn.Linear` (see LiftLinearModulesPass), the mean, variance and squared norm
over calibration tokens of each of its input channels. One forward pass of the captured graph per
calibration batch, no backward; the logits are never computed (the run stops after the last
projection the scorer asked for).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from fxprune.analysis.fx_util import get_attr_path
from fxprune.reconstruction.projections import first_projections, inverse_energy, residual_partner, step, stream_like
from fxprune.scoring.calibration import calibration_for
from fxprune.scoring.forward import compute_device
from fxprune.util.distributed import active, all_reduce_sums, local_share


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


class Reading(NamedTuple):
    """How a projection reads its weight: canonical weight name, input dim of the weight, bias and weight nodes."""
    name: str
    dim: int
    bias: torch.fx.Node | None
    weight: torch.fx.Node


def projection_inputs(gm: torch.fx.GraphModule, aliases: dict, names=None) -> dict[torch.fx.Node, Reading]:
    """The first projection node reading each weight (of `names`, all when None), and how it reads it."""
    out, seen = {}, set()
    for node, name, weight, bias, transposed in first_projections(gm):
        name = aliases.get(name, name)
        if (names is None or name in names) and name not in seen:
            seen.add(name)
            out[node] = Reading(name, 0 if transposed else 1, bias, weight)
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


def accumulate(sums: dict, reading: Reading, x, residual, tokens, weight, bias, gram) -> None:
    """Add one batch's inputs `x` (and the residual stream `residual`, or None) of the projection `reading`
    describes to `sums`, over the `tokens` the attention mask keeps; its Gram matrix too when `gram` names it.
    `weight` and `bias` (or None) are the projection's own tensors."""
    x = x.reshape(-1, x.shape[-1])[tokens].double()
    acc = sums.setdefault(reading.name, [0, 0.0, 0.0, None])
    acc[0] += x.shape[0]
    acc[1] = acc[1] + x.sum(0)
    acc[2] = acc[2] + x.pow(2).sum(0)
    if (reading.name, reading.dim) in gram:
        acc[3] = weighted_gram(x, weight, bias, reading.dim, residual, tokens, acc[3])


def reduce_sums(sums: dict) -> dict:
    """The `accumulate`d `sums` of this rank added to every other rank's (`util.distributed`): the sums of all
    the calibration batches, by weight name; `sums` itself without a process group."""
    if not active():
        return sums
    flat = {}
    for name, (n, s, sq, xx) in sums.items():
        flat.update({(name, "count"): n, (name, "sum"): s, (name, "sq"): sq})
        if xx is not None:
            flat.update({(name, "gram"): xx[0], (name, "energy"): xx[1]})
    total = all_reduce_sums(flat)  # a rank without a batch had no entry: it gets every rank's
    names = dict.fromkeys(name for name, _ in total)
    return {name: [total[name, "count"], total[name, "sum"], total[name, "sq"],
                   (total[name, "gram"], total[name, "energy"]) if (name, "gram") in total else None]
            for name in names}


def finish(sums: dict, dims: dict) -> dict[str, InputStats]:
    """The `InputStats` of each weight from its `accumulate`d sums (added over the ranks of a process group
    first); `dims`: weight name -> input dim."""
    out = {}
    for name, (n, s, sq, xx) in reduce_sums(sums).items():
        mean = s / n
        var = (sq / n - mean.pow(2)).clamp_min(0) * n / max(n - 1, 1)
        stats = InputStats(dims[name], n, mean.float().cpu(), var.float().cpu(), sq.float().cpu())
        if xx is not None:  # normalised as the refit's token weights are: mean 1 over the tokens
            stats.weight_scale = xx[1] / n
            stats.gram = (xx[0] / stats.weight_scale).cpu()
        out[name] = stats
    return out


def token_mask(ids, mask):
    """The attention mask (ones when None) and the flat boolean mask of the tokens statistics are taken over."""
    mask = torch.ones_like(ids) if mask is None else mask
    return mask, mask.reshape(-1).bool()


@torch.no_grad()
def input_statistics(dg, calibration, names=None, batch_size: int = 8, gram=()) -> dict[str, InputStats]:
    """Statistics of the projections reading the weights `names` (all when None), keyed by canonical
    weight name; `calibration` in any form `score` accepts, run `batch_size` samples at a time. `gram`:
    (weight name, dim) pairs whose projection, when `dim` is its input dimension, also gets the weighted
    Gram matrix of its inputs (the refit-aware estimator reads it; [in, in] floats each, so only where
    asked). The token weights are the refit's, so that both weigh an output error alike."""
    found = projection_inputs(dg.gm, dg.aliases, names)
    gram = set(gram)
    partners = {n: residual_partner(n) for n, r in found.items() if (r.name, r.dim) in gram}
    biases = {r.name: None if r.bias is None else get_attr_path(dg.gm, r.bias.target) for r in found.values()}
    sums: dict[str, list] = {}
    device = compute_device(dg, None)  # the graph runs on its own weights: the tokens go where they are
    batches = calibration_for(dg, calibration, "activation statistics").batches(batch_size, device)
    for ids, mask in local_share(batches):  # this rank's batches; `finish` adds up the ranks' sums
        mask, tokens = token_mask(ids, mask)
        inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        run = step(dg.gm, inputs, found, partners)
        for reading, x, residual in run:
            accumulate(sums, reading, x, residual, tokens, dg.parameters[reading.name], biases[reading.name], gram)
            if len(sums) == len(found) and reading.name == list(found.values())[-1].name:
                break
        run.close()
    return finish(sums, {r.name: r.dim for r in found.values()})
