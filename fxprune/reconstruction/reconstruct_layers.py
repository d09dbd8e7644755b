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
from fxprune.reconstruction.projections import dense_projections, residual_partner, step, stream_like, token_weights
from fxprune.reconstruction.settings import AUTO, Refit

RIDGES = (0.01, 0.1, 0.3, 1.0, 3.0)  # the strengths ridge="auto" chooses among (x the mean input energy)


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


class Stats:
    """Weighted sums over tokens of the pruned input x and the dense target y = X_d W_d^T + b_d, enough to
    solve any ridge refit and to score any (W, b) on these tokens; adding two gives the union's sums."""

    def __init__(self, xp, y, w):
        # The token-long products in float32 (they are most of the pass's time), kept and solved in float64.
        xp, y, w = xp.float(), y.float(), w.float()
        xw = xp * w[:, None]
        self.sw, self.sx, self.sy = float(w.double().sum()), xw.double().sum(0), (y * w[:, None]).double().sum(0)
        self.sxx, self.sxy = (xw.t() @ xp).double(), (xw.t() @ y).double()
        self.syy = float((y.double().pow(2) * w.double()[:, None]).sum())

    def __add__(self, other):
        total = object.__new__(Stats)
        for k in ("sw", "sx", "sy", "sxx", "sxy", "syy"):
            setattr(total, k, getattr(self, k) + getattr(other, k))
        return total

    def centred(self):
        mx, my = self.sx / self.sw, self.sy / self.sw
        return mx, my, self.sxx - self.sw * torch.outer(mx, mx), self.sxy - self.sw * torch.outer(mx, my)

    def error(self, weight, bias):
        """sum_t w_t ||x_t W^T + b - y_t||^2."""
        return float(((weight @ self.sxx) * weight).sum() - 2 * (weight * self.sxy.t()).sum() + self.syy
                     + 2 * bias @ (weight @ self.sx - self.sy) + self.sw * bias @ bias)


def solve(stats: Stats, w0: torch.Tensor, mode: str, ridge: float):
    """(weight, bias) minimising the weighted error on `stats` (+ ridge pull towards w0 for "lstsq")."""
    mx, my, gram, cross = stats.centred()
    if mode == "lstsq":
        lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
        rhs = cross + lam * w0.t()
        if lam == 0:
            w0 = torch.linalg.lstsq(gram, rhs).solution.t()
        else:
            w0 = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), rhs).t()
    return w0, my - w0 @ mx


def fit(xp, y, w0, b0, mode: str, ridge, weights=None, held_out=None):
    """(weight, bias, choice) of the refitted projection: pruned inputs `xp` [tokens, kept inputs], target `y`
    [tokens, kept outputs] (the dense projection's output); see the module docstring. ridge="auto": each
    candidate (the projection as it is, the bias alone, the ridge refit at each strength of RIDGES) is
    fitted on the tokens outside `held_out` and scored on those inside; the best is refitted on all tokens
    (keeping the projection as it is when nothing beats it)."""
    weights = torch.ones(xp.shape[0], dtype=torch.float64) if weights is None else weights.double()
    w0 = w0.double()
    b0 = torch.zeros(w0.shape[0], dtype=torch.float64) if b0 is None else b0.double()
    if ridge != AUTO:
        weight, bias = solve(Stats(xp.float(), y, weights), w0, mode, ridge)
        return weight, bias, mode
    fit_rows = ~held_out
    train = Stats(xp[fit_rows].float(), y[fit_rows], weights[fit_rows])
    test = Stats(xp[held_out].float(), y[held_out], weights[held_out])
    candidates = {"keep": (w0, b0), "bias": solve(train, w0, "bias", 0.0)}
    if mode == "lstsq":
        candidates.update({f"lstsq:{r:g}": solve(train, w0, "lstsq", r) for r in RIDGES})
    errors = {k: test.error(*c) for k, c in candidates.items()}
    choice = min(errors, key=errors.get)
    if errors[choice] >= errors["keep"] - 1e-9 * max(test.syy, 1e-30):  # no measurable gain: change nothing
        choice = "keep"
    if choice == "keep":
        return w0, b0, choice
    kind, _, strength = choice.partition(":")
    weight, bias = solve(train + test, w0, kind, float(strength or 0))
    return weight, bias, choice


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
        wanted = {p.weight for p in dense.values()}
        pruned, paths = {}, {}
        for node in gm.graph.nodes:
            name = node.meta.get(WEIGHT_OF) if node.op == "call_module" else None
            if name in wanted and name not in paths:
                pruned[node], paths[name] = name, node.target
        if not pruned:
            return PassResult(gm, False)
        by_name = {p.weight: p for p in dense.values()}
        mask = self.mask
        inputs = {"input_ids": self.ids, "attention_mask": mask, "use_cache": False}
        tokens = mask.reshape(-1).bool()
        rows = torch.arange(mask.shape[0]).repeat_interleave(mask.shape[1])[tokens]
        held_out = rows % 4 == 3 if mask.shape[0] >= 4 else torch.arange(rows.numel()) % 4 == 3
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
            module, proj = gm.get_submodule(paths[name]), by_name[name]
            residual = stream_like(residual, xd.numel() // xd.shape[-1], proj.dense_weight.shape[0])
            own_residual = stream_like(own_residual, xp.numel() // xp.shape[-1], module.out_features)
            xp, xd = xp.reshape(-1, xp.shape[-1])[tokens], xd.reshape(-1, xd.shape[-1])[tokens]
            residual = None if residual is None else residual[tokens]
            own_residual = None if own_residual is None else own_residual[tokens]
            dense_out = proj.output(xd)  # all rows: the residual stream's weights need the whole output
            y = proj.kept_rows(dense_out)
            if own_residual is not None and residual is not None:
                # "stream": the output that makes the pruned stream after the add equal the dense one, so the
                # fit also takes back what earlier layers' pruning left in the stream (as far as x predicts it)
                y = y - (own_residual.float() - proj.kept_rows(residual).float())
            weights = token_weights(dense_out, residual if cfg.weighting == "residual" else None)
            weight, bias, self.choices[name] = fit(xp, y, module.weight, module.bias, cfg.mode, cfg.ridge,
                                                   weights, held_out)
            set_weight_and_bias(module, weight, bias)
            self.refitted.append(name)
            del xp, xd, residual, dense_out, y
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
