"""The dense model's projections and a graph stepped up to them: what the refit and the scorers share.

A projection is the first node reading a weight in one of the spellings LiftLinearModulesPass lifts
(linear, addmm, matmul on a transposed weight, a lifted module). `step` runs a graph node by node and
stops before chosen projections, handing over their inputs and the residual stream their output is
added to (`residual_partner`), so that reconstruction (fxprune/reconstruction/reconstruct_layers.py) and the
activation statistics of scoring (fxprune/scoring/activations.py) read the same values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fxprune.analysis.fx_util import get_attr_path
from fxprune.passes.lift_linear_modules import READ_AS, WEIGHT_OF, LiftLinearModulesPass

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


def dense_projections(dense_gm, aliases: dict, kept: dict, read=None) -> dict[torch.fx.Node, Projection]:
    """The dense graph's projections (first read of each weight) whose input dimension is pruned. `read(target)`:
    the tensor the graph reads at attribute `target` (the graph's own when None; the streamed refit gives the
    checkpoint's, the graph's being on the meta device).

    A weight tied to another parameter (a tied lm_head) is left alone: refitting it would change
    the embedding too.
    """
    found, read = {}, read or (lambda target: get_attr_path(dense_gm, target))
    for node, name, w, b, transposed in first_projections(dense_gm):
        canonical = aliases.get(name, name)
        if canonical != name or canonical in aliases.values():
            continue
        dims = kept.get(canonical, {})
        in_dim = 0 if transposed else 1
        if in_dim not in dims:
            continue
        weight = read(w.target).detach()
        weight = weight.t() if transposed else weight
        bias = None if b is None else read(b.target).detach()
        rows = dims.get(1 - in_dim)
        found[node] = Projection(name, weight, bias, None if rows is None else torch.as_tensor(rows),
                                 torch.as_tensor(dims[in_dim]))
    return found


def lifted_projections(gm: torch.fx.GraphModule, names) -> dict[torch.fx.Node, str]:
    """The first call of the lifted `nn.Linear` of each weight in `names` (as the rewritten graph `gm` reads it,
    `LiftLinearModulesPass`), in graph order: call node -> weight name."""
    found, names, seen = {}, set(names), set()
    for node in gm.graph.nodes:
        name = node.meta.get(WEIGHT_OF) if node.op == "call_module" else None
        if name in names and name not in seen:
            found[node] = name
            seen.add(name)
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
