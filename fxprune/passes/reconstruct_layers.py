"""Compensation pass: refit every projection that reads a pruned dimension on calibration activations.

After the rewrite, a projection whose input dimension lost units (o_proj over the kept heads,
down_proj over the kept channels, every reader of the hidden stream when hidden channels go) sees
fewer inputs than the dense one did. This pass refits its kept weights and gives it a bias so that
its output matches the dense projection's output on calibration text:

    target   Y  = X_d W_d^T + b_d          dense input X_d, dense weight (kept output rows only)
    input    X_p                           the pruned model's own input to this projection
    "bias"   W  = W_0 (the sliced weight),  b = mean(Y) - W_0 mean(X_p)        (FLAP-style)
    "lstsq"  W  = argmin ||X_p W^T + b - Y||^2 + lam ||W - W_0||^2,  b = mean(Y) - W mean(X_p)
             with lam = ridge * mean(diag(cov(X_p))): ridge regression towards the sliced weights,
             which keeps a small calibration set from over-fitting a wide layer.

Layers are refitted in graph order and each is fed the pruned model's activations *after* the
earlier refits, so errors do not pile up. The dense and the pruned graph are stepped node by node in
lockstep over the whole calibration batch, so only one projection's inputs (plus each graph's live
values) are held at a time, and both stop after the last projection to refit (the logits of a large
vocabulary are never computed unless the head itself is refitted). A projection without a bias gets
a real `nn.Linear` bias parameter, so peft, save/load and export see an ordinary biased linear.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.fx_util import get_attr_path
from fxprune.passes.lift_linear_modules import READ_AS, WEIGHT_OF, LiftLinearModulesPass

MODES = ("none", "bias", "lstsq")


@dataclass
class Projection:
    """One dense projection whose input dimension the plan prunes."""
    weight: str                 # the name the graph reads the weight under (the module path + ".weight")
    dense_weight: torch.Tensor  # [out, in] of the dense model
    dense_bias: torch.Tensor | None
    rows: torch.Tensor | None   # kept output positions (None: all)
    cols: torch.Tensor          # kept input positions


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


def step(gm: torch.fx.GraphModule, inputs: dict, stops: dict):
    """Run `gm` node by node; before each node in `stops`, yield (stops[node], its input value)."""
    interp = torch.fx.Interpreter(gm, garbage_collect_values=True)
    env = interp.env
    for node in gm.graph.nodes:
        if node in stops:
            yield stops[node], env[node.args[0]]
        if node.op == "output":
            return
        if node.op == "placeholder":
            env[node] = inputs[node.name] if node.name in inputs else (node.args[0] if node.args else None)
        else:
            env[node] = interp.run_node(node)
        for dead in interp.user_to_last_uses.get(node, []):
            env.pop(dead, None)


def fit(xp: torch.Tensor, xd: torch.Tensor, proj: Projection, w0: torch.Tensor, mode: str, ridge: float):
    """(weight, bias) of the refitted projection; inputs are [tokens, features]; see the module docstring."""
    wd = proj.dense_weight.double() if proj.rows is None else proj.dense_weight[proj.rows].double()
    bd = None if proj.dense_bias is None else (proj.dense_bias if proj.rows is None else proj.dense_bias[proj.rows])
    xp, xd = xp.float(), xd.float()
    n = xp.shape[0]
    mp, md = xp.double().mean(0), xd.double().mean(0)
    y_mean = wd @ md + (0 if bd is None else bd.double())
    w0 = w0.double()
    if mode == "lstsq":
        # Centred normal equations; the grams in float32 (the n-long sums), the solve in float64.
        gram = (xp.t() @ xp).double() - n * torch.outer(mp, mp)
        cross = (xp.t() @ xd).double() - n * torch.outer(mp, md)
        lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
        rhs = cross @ wd.t() + lam * w0.t()
        eye = torch.eye(gram.shape[0], dtype=gram.dtype)
        w0 = torch.linalg.lstsq(gram + lam * eye, rhs).solution.t() if lam == 0 else \
            torch.linalg.solve(gram + lam * eye, rhs).t()
    bias = y_mean - w0 @ mp
    return w0, bias


class ReconstructLayersPass(PassBase):
    """Refit (mode "lstsq") or bias-correct (mode "bias") the projections reading pruned dimensions.

    `dense_gm` is the analysed dense graph (`DependencyGraph.gm`), `aliases` its tied-weight names,
    `kept` the plan's kept positions, `calibration` (input_ids [B, L], attention_mask or None): one
    batch, all of whose unmasked tokens are fitted on.
    """

    def __init__(self, dense_gm, aliases: dict, kept: dict, calibration, mode: str = "lstsq", ridge: float = 0.05):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"reconstruct must be one of {MODES}, got {mode!r}")
        self.dense_gm, self.aliases, self.kept = dense_gm, aliases, kept
        self.ids, self.mask = calibration
        self.mode, self.ridge = mode, ridge
        self.refitted: list[str] = []

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
        dense_steps = step(self.dense_gm, inputs, {n: p.weight for n, p in dense.items()})
        for name, xp in step(gm, inputs, pruned):
            for dense_name, xd in dense_steps:
                if dense_name == name:
                    break
            else:
                raise RuntimeError(f"projection {name} was not reached in the dense graph")
            module = gm.get_submodule(paths[name])
            xp = xp.reshape(-1, xp.shape[-1])[tokens]
            xd = xd.reshape(-1, xd.shape[-1])[tokens]
            weight, bias = fit(xp, xd, by_name[name], module.weight, self.mode, self.ridge)
            set_weight_and_bias(module, weight, bias)
            self.refitted.append(name)
            del xp, xd
        dense_steps.close()
        return PassResult(gm, True)


def set_weight_and_bias(module: torch.nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    dtype, device = module.weight.dtype, module.weight.device
    module.weight.data = weight.to(dtype=dtype, device=device).contiguous()
    if module.bias is None:
        module.bias = torch.nn.Parameter(bias.to(dtype=dtype, device=device), module.weight.requires_grad)
    else:
        module.bias.data = bias.to(dtype=dtype, device=device)
