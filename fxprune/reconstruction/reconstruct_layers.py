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

from dataclasses import dataclass

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.analysis.fx_util import get_attr_path
from fxprune.passes.lift_linear_modules import LiftLinearModulesPass
from fxprune.analysis.meta_keys import READ_AS, WEIGHT_OF

MODES = ("none", "bias", "lstsq")
AUTO = "auto"


@dataclass
class Projection:
    """One dense projection whose input dimension the plan prunes."""
    weight: str                 # the name the graph reads the weight under (the module path + ".weight")
    dense_weight: torch.Tensor  # [out, in] of the dense model
    dense_bias: torch.Tensor | None
    rows: torch.Tensor | None   # kept output positions (None: all)
    cols: torch.Tensor          # kept input positions

    def output(self, xd: torch.Tensor) -> torch.Tensor:
        """The dense projection's output (every row) for dense inputs `xd` [tokens, in], in float32."""
        y = xd.float() @ self.dense_weight.t().float()
        return y if self.dense_bias is None else y + self.dense_bias.float()

    def kept_rows(self, t: torch.Tensor) -> torch.Tensor:
        """The columns of `t` [tokens, out] at the kept output positions."""
        return t if self.rows is None else t[:, self.rows]


def first_projections(gm: torch.fx.GraphModule):
    """(node, name the weight is read under, weight node, bias node or None, weight stored [in, out]) for
    the first projection node reading each weight, in graph order (the spellings LiftLinearModulesPass lifts)."""
    seen, matcher = set(), LiftLinearModulesPass()
    for node in gm.graph.nodes:
        match = matcher.match(gm, node)
        if match is None:
            continue
        _, w, b, transposed, _ = match
        name = w.meta.get(READ_AS, w.target)
        if name not in seen:
            seen.add(name)
            yield node, name, w, b, transposed


def dense_projections(dense_gm, aliases: dict, kept: dict) -> dict[torch.fx.Node, Projection]:
    """The dense graph's projections (first read of each weight) whose input dimension is pruned.

    A weight tied to another parameter (a tied lm_head) is left alone: refitting it would change
    the embedding too.
    """
    found = {}
    for node, name, w, b, transposed in first_projections(dense_gm):
        canonical = aliases.get(name, name)
        if canonical != name or canonical in aliases.values():
            continue
        dims = kept.get(canonical, {})
        in_dim = 0 if transposed else 1
        if in_dim not in dims:
            continue
        weight = get_attr_path(dense_gm, w.target).detach()
        weight = weight.t() if transposed else weight
        bias = None if b is None else get_attr_path(dense_gm, b.target).detach()
        rows = dims.get(1 - in_dim)
        found[node] = Projection(name, weight, bias, None if rows is None else torch.as_tensor(rows),
                                 torch.as_tensor(dims[in_dim]))
    return found


def projection_input(node: torch.fx.Node) -> torch.fx.Node:
    """The input x of a projection node (addmm(bias, x, W) takes it second; linear, matmul and a lifted
    module first)."""
    return node.args[1] if node.target is torch.ops.aten.addmm.default else node.args[0]


def step(gm: torch.fx.GraphModule, inputs: dict, stops: dict, partners: dict | None = None):
    """Run `gm` node by node; before each node in `stops`, yield (stops[node], its input value, the value of
    partners[node], or None when that is not computed yet (a parallel branch the graph computes later)).
    Nothing after the last stop runs: the rest of the graph (a large vocabulary's
    logits, above all) would cost time and memory for values no refit reads."""
    interp = torch.fx.Interpreter(gm, garbage_collect_values=True)
    env, partners, remaining = interp.env, partners or {}, len(stops)
    for node in gm.graph.nodes:
        if node in stops:
            partner = partners.get(node)
            yield stops[node], env[projection_input(node)], env.get(partner)
            remaining -= 1
            if remaining == 0:
                return
        if node.op == "output":
            return
        if node.op == "placeholder":
            env[node] = inputs[node.name] if node.name in inputs else (node.args[0] if node.args else None)
        else:
            env[node] = interp.run_node(node)
        for dead in interp.user_to_last_uses.get(node, []):
            env.pop(dead, None)


_PASS_THROUGH = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
                 torch.ops.aten.clone.default, torch.ops.aten.dropout.default, torch.ops.aten.contiguous.default}


def residual_partner(node: torch.fx.Node) -> torch.fx.Node | None:
    """The residual stream a projection's output is added to (the other operand of the add its output flows
    into through views), or None when it is not added to one (a projection read by attention, say)."""
    current = node
    for _ in range(4):
        if len(current.users) != 1:
            return None
        (user,) = current.users
        if user.op != "call_function":
            return None
        if user.target == torch.ops.aten.add.Tensor:
            other = [a for a in user.args[:2] if a is not current]
            if other and isinstance(other[0], torch.fx.Node) and other[0].op == "get_attr":
                current = user  # the projection's own bias (x @ W^T + b as matmul, add): part of its output
                continue
            return other[0] if other and isinstance(other[0], torch.fx.Node) else None
        if user.target not in _PASS_THROUGH:
            return None
        current = user
    return None


def stream_like(value, n_tokens: int, width: int) -> torch.Tensor | None:
    """`value` as [n_tokens, width] when it holds a `width`-wide vector for each of the projection's
    `n_tokens` input positions, else None: an add's other operand may be a broadcast bias, not the stream."""
    ok = (isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[-1] == width
          and value.numel() == n_tokens * width)
    return value.reshape(-1, width) if ok else None


def inverse_energy(dense_out: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """Per token, 1 / mean square of the dense residual stream after this projection's output `dense_out` is
    added to it (ones when the output is not added to a residual stream): an output error's weight once the
    next norm divides the stream by its root mean square."""
    if residual is None:
        return torch.ones(dense_out.shape[0], dtype=torch.float64)
    after = residual.to(dense_out.dtype) + dense_out
    return 1.0 / after.double().pow(2).mean(-1).clamp_min(1e-12)


def token_weights(dense_out: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """Per-token weights of the fit, mean 1: `inverse_energy`. The next norm divides the stream by its root
    mean square, so an output error counts in proportion to 1/rms there; a few positions (attention sinks)
    carry a stream hundreds of times larger than the rest and would otherwise dominate the fit. Uniform
    when the output is not added to a residual stream."""
    w = inverse_energy(dense_out, residual)
    return w / w.mean()


RIDGES = (0.01, 0.1, 0.3, 1.0, 3.0)  # the strengths ridge="auto" chooses among (x the mean input energy)
WEIGHTINGS = ("residual", "uniform")
FIT_TARGETS = ("stream", "output")
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}  # the forward passes' autocast dtype (None: off)


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
    if ridge != "auto":
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
    `kept` the plan's kept positions, `calibration` (input_ids [B, L], attention_mask or None): one
    batch, all of whose unmasked tokens are fitted on. `ridge`: a strength, or "auto" to choose per
    projection on held-out calibration rows (every fourth row); `weighting`: "residual" weighs each token by
    the inverse mean square of the residual stream the output is added to, "uniform" weighs all alike;
    `target`: "stream" or "output" (see the module docstring). `choices` records, per refitted weight,
    what was kept ("keep", "bias", "lstsq:<ridge>"). `precision`: "float32", or "bfloat16" for the forward
    passes under autocast (see the module docstring).
    """

    def __init__(self, dense_gm, aliases: dict, kept: dict, calibration, mode: str = "lstsq", ridge=AUTO,
                 weighting: str = "residual", target: str = "stream", precision: str = "float32"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"reconstruct must be one of {MODES}, got {mode!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if ridge != AUTO and not (isinstance(ridge, (int, float)) and ridge >= 0):
            raise ValueError(f"ridge must be a number >= 0 or 'auto', got {ridge!r}")
        if target not in FIT_TARGETS:
            raise ValueError(f"target must be one of {FIT_TARGETS}, got {target!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
        self.dense_gm, self.aliases, self.kept = dense_gm, aliases, kept
        self.ids, self.mask = calibration
        self.mode, self.ridge, self.weighting, self.target = mode, ridge, weighting, target
        self.precision = precision
        self.refitted: list[str] = []
        self.choices: dict[str, str] = {}

    def requires(self, gm: torch.fx.GraphModule) -> None:
        if not any(WEIGHT_OF in n.meta for n in gm.graph.nodes if n.op == "call_module"):
            raise ValueError("ReconstructLayersPass runs after LiftLinearModulesPass: no lifted projection found")

    @torch.no_grad()
    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        if self.mode == "none":
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
        mask = torch.ones_like(self.ids) if self.mask is None else self.mask
        inputs = {"input_ids": self.ids, "attention_mask": mask, "use_cache": False}
        tokens = mask.reshape(-1).bool()
        rows = torch.arange(mask.shape[0]).repeat_interleave(mask.shape[1])[tokens]
        held_out = rows % 4 == 3 if mask.shape[0] >= 4 else torch.arange(rows.numel()) % 4 == 3
        partners = {n: r for n in dense if (r := residual_partner(n)) is not None}
        own = {n: r for n in pruned if (r := residual_partner(n)) is not None} if self.target == "stream" else {}
        device, dtype = self.ids.device.type, PRECISIONS[self.precision]
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
            weights = token_weights(dense_out, residual if self.weighting == "residual" else None)
            weight, bias, self.choices[name] = fit(xp, y, module.weight, module.bias, self.mode, self.ridge,
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
