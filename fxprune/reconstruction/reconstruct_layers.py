"""Compensation pass: refit every projection that reads a pruned dimension on calibration activations.

After the rewrite, a projection whose input dimension lost units (o_proj over the kept heads,
down_proj over the kept channels, every reader of the hidden stream when hidden channels go) sees
fewer inputs than the dense one did. This pass refits its kept weights and gives it a bias so that
the residual stream its output is added to matches the dense model's stream on calibration text
(target "stream"), or its output alone matches the dense projection's output (target "output"):

    target   Y  = X_d W_d^T + b_d - (R_p - R_d)    "stream": R_d, R_p the stream the output is added to in
                                                   the dense and in the pruned model (kept rows only)
             Y  = X_d W_d^T + b_d                  "output", and for an output not added to a stream
    input    X_p                           the pruned model's own input to this projection
    weights  w_t = 1 / mean_c(h_t,c^2)     h: the dense residual stream this output is added to
    "bias"   W  = W_0 (the sliced weight),  b = mean_w(Y) - W_0 mean_w(X_p)        (FLAP-style)
    "lstsq"  W  = argmin sum_t w_t ||X_p,t W^T + b - Y_t||^2 + lam ||W - W_0||^2,  b = mean_w(Y) - W mean_w(X_p)
             with lam = ridge * mean(diag(weighted cov(X_p))): ridge regression towards the sliced
             weights, which keeps a small calibration set from over-fitting a wide layer.
    ridge="auto": per projection, the candidate (unchanged, bias, lstsq at each of RIDGES) with the
             lowest weighted error on held-out calibration rows, refitted on all rows.

With "stream", each refit also takes back the drift R_p - R_d that the layers before it left in the
stream, as far as a linear map of its own inputs predicts it: errors are corrected where they can be
instead of only not being added to. The stream is the other operand of the add the output flows into;
where there is none (a post-norm before the add, a parallel branch computed later) the target is the
output.

Layers are refitted in graph order and each is fed the pruned model's activations *after* the
earlier refits, so errors do not pile up. The dense and the pruned graph are stepped node by node in
lockstep over the whole calibration batch, so only one projection's inputs (plus each graph's live
values) are held at a time, and both stop after the last projection to refit (the logits of a large
vocabulary are never computed unless the head itself is refitted). A projection without a bias gets
a real `nn.Linear` bias parameter, so peft, save/load and export see an ordinary biased linear.

The sums and solves are `least_squares.py`'s, accumulated per projection by `projection_fit.ProjectionFit`
(the streamed refit, fxprune/streaming/refit.py, adds them batch by batch and segment by segment instead).

precision="bfloat16" runs the two graphs' forward passes under autocast (their matmuls in bfloat16, most of
the pass's time) while every sum and solve stays in float32 / float64: on a CPU with bfloat16 instructions
the same time then refits on about twice the calibration tokens.
"""
from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.data.calibration import Calibration
from fxprune.analysis.contracts import ContractError
from fxprune.passes.lift_linear_modules import WEIGHT_OF
from fxprune.reconstruction.least_squares import RIDGES, Stats, fit, solve  # noqa: F401 (their home before)
from fxprune.reconstruction.projection_fit import ProjectionFit, held_out_tokens
from fxprune.reconstruction.projections import dense_projections, lifted_projections, residual_partner, step
from fxprune.reconstruction.settings import Refit


def autocast_steps(steps, device_type: str, dtype):
    """`steps` (a `step` generator) advanced under autocast to `dtype` (None: as they are); whatever the
    caller does between two items (the fits) runs outside it, in full precision."""
    try:
        while True:
            with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
                try:
                    item = next(steps)
                except StopIteration:
                    return
            yield item
    finally:
        steps.close()


class ReconstructLayersPass(PassBase):
    """Refit (mode "lstsq") or bias-correct (mode "bias") the projections reading pruned dimensions.

    `dense_gm` is the analysed dense graph (`DependencyGraph.gm`), `aliases` its tied-weight names,
    `kept` the plan's kept positions, `calibration` a `Calibration` all of whose unmasked tokens are
    fitted on, `settings` a `Refit` (see fxprune/reconstruction/settings.py and the module docstring). ridge="auto" holds out
    every fourth calibration row to choose each projection's candidate. `choices` records, per refitted
    weight, what was kept ("keep", "bias", "lstsq:<ridge>").
    """

    def __init__(self, dense_gm, aliases: dict, kept: dict, calibration: Calibration, settings: Refit = Refit()):
        super().__init__()
        if not isinstance(settings, Refit):
            raise TypeError(f"ReconstructLayersPass: settings must be a Refit, got {type(settings).__name__}")
        if not isinstance(calibration, Calibration):
            raise TypeError(f"ReconstructLayersPass: calibration must be a Calibration (Calibration.of(ids)), got "
                            f"{type(calibration).__name__}")
        self.dense_gm, self.aliases, self.kept = dense_gm, aliases, kept
        self.ids, self.mask = calibration.ids, calibration.mask
        self.settings = settings
        self.refitted: list[str] = []
        self.choices: dict[str, str] = {}

    def requires(self, gm: torch.fx.GraphModule) -> None:
        if not any(WEIGHT_OF in n.meta for n in gm.graph.nodes if n.op == "call_module"):
            raise ContractError("ReconstructLayersPass runs after LiftLinearModulesPass: no lifted projection found "
                                "in the graph")

    @torch.no_grad()
    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        cfg = self.settings
        if not cfg.enabled:
            return PassResult(gm, False)
        dense = dense_projections(self.dense_gm, self.aliases, self.kept)
        pruned = lifted_projections(gm, {p.weight for p in dense.values()})
        paths = {name: node.target for node, name in pruned.items()}
        if not pruned:
            return PassResult(gm, False)
        by_name = {p.weight: p for p in dense.values()}
        mask = self.mask
        inputs = {"input_ids": self.ids, "attention_mask": mask, "use_cache": False}
        tokens = mask.reshape(-1).bool()
        held_out = held_out_tokens(mask)
        partners = {n: r for n in dense if (r := residual_partner(n)) is not None}
        own = {n: r for n in pruned if (r := residual_partner(n)) is not None} if cfg.target == "stream" else {}
        device, dtype = self.ids.device.type, None if cfg.precision == "float32" else getattr(torch, cfg.precision)
        dense_steps = autocast_steps(step(self.dense_gm, inputs, {n: p.weight for n, p in dense.items()}, partners),
                                     device, dtype)
        for name, xp, own_residual in autocast_steps(step(gm, inputs, pruned, own), device, dtype):
            for dense_name, xd, residual in dense_steps:
                if dense_name == name:
                    break
            else:
                raise RuntimeError(f"projection {name} was not reached in the dense graph")
            module, sums = gm.get_submodule(paths[name]), ProjectionFit(by_name[name], cfg)
            sums.add(xd, residual, xp, own_residual, tokens, held_out)
            weight, bias, self.choices[name] = sums.result(module.weight, module.bias)
            set_weight_and_bias(module, weight, bias)
            self.refitted.append(name)
            del xp, xd, residual, sums
        dense_steps.close()
        return PassResult(gm, True)


def set_weight_and_bias(module: torch.nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Set `module`'s weight and bias to the refitted values, in its own dtype and device (adding a bias when it had
    none)."""
    dtype, device = module.weight.dtype, module.weight.device
    module.weight.data = weight.to(dtype=dtype, device=device).contiguous()
    if module.bias is None:
        module.bias = torch.nn.Parameter(bias.to(dtype=dtype, device=device), module.weight.requires_grad)
    else:
        module.bias.data = bias.to(dtype=dtype, device=device)
