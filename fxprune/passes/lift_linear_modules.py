"""Rewrite pass: turn projections on parameters into `nn.Linear` submodules.

Three spellings of `y = x W^T + b` are recognised (W stored [out, in] unless noted):
`aten.linear(x, W, b)`; `aten.matmul(x, numpy_T(W))` optionally followed by `+ b` (Falcon);
`aten.addmm(b, x2d, V)` with V stored [in, out] (GPT-2's Conv1D), whose module then holds
V transposed (a new tensor, so only when the graph reads V nowhere else).

The module is placed at the weight's owner path (`...q_proj.weight` -> `...q_proj`) so that
peft's `target_modules` and state-dict names match the original model. A weight read by
several projections shares one module.
"""
from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.analysis.fx_util import get_attr_path, owner_and_leaf, set_attr_path
from fxprune.analysis.contracts import ContractError
from fxprune.analysis.meta_keys import READ_AS, WEIGHT_OF

aten = torch.ops.aten
TRANSPOSES = (aten.numpy_T.default, aten.t.default)


def is_attr(gm, node, rank=None) -> bool:
    """`node` reads a tensor attribute of `gm` (of `rank` dims when given)."""
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return False
    value = get_attr_path(gm, node.target)
    return isinstance(value, torch.Tensor) and (rank is None or value.dim() == rank)


class LiftLinearModulesPass(PassBase):
    """Turns each projection on a parameter (`linear`, `matmul` on a transposed weight, GPT-2's `addmm`) into a call
    of an `nn.Linear` submodule at the weight's owner path, so peft, the refit and the exports find it."""
    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        changed = False
        modules = {}
        for node in list(gm.graph.nodes):
            match = self.match(gm, node)
            if match is None:
                continue
            x, w, b, transposed, replaced = match
            key = (w.target, None if b is None else b.target)
            if key not in modules:
                modules[key] = self.make_module(gm, w, b, transposed)
            with gm.graph.inserting_before(replaced):
                call = gm.graph.call_module(modules[key], (x,))
            call.meta = dict(replaced.meta)
            call.meta[WEIGHT_OF] = w.meta.get(READ_AS, w.target)
            replaced.replace_all_uses_with(call)
            gm.graph.erase_node(replaced)
            if replaced is not node:
                gm.graph.erase_node(node)
            changed = True
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return PassResult(gm, changed)

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        """Nothing the pass recognises as a projection on parameters is left unlifted."""
        for node in gm.graph.nodes:
            if self.match(gm, node) is not None:
                raise ContractError(f"{node.name} ({node.target}) is a projection on parameters left unlifted")

    def match(self, gm, node):
        """(x, weight node, bias node or None, weight stored [in, out], node computing y) or None."""
        if node.op != "call_function":
            return None
        if node.target is aten.linear.default:
            x, w = node.args[0], node.args[1]
            b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if is_attr(gm, w) and (b is None or is_attr(gm, b)):
                return x, w, b, False, node
        elif node.target is aten.addmm.default:  # beta * b + alpha * (x @ V)
            b, x, v = node.args[:3]
            if is_attr(gm, v, 2) and is_attr(gm, b, 1) and node.kwargs.get("beta", 1) == 1 and \
                    node.kwargs.get("alpha", 1) == 1 and self.only_read_as(gm, v, node, 2):
                return x, v, b, True, node
        elif node.target is aten.matmul.default:
            x, t = node.args
            if isinstance(t, torch.fx.Node) and t.target in TRANSPOSES and is_attr(gm, t.args[0], 2) \
                    and len(t.users) == 1:
                w = t.args[0]
                b, replaced = self.bias_add(gm, node, get_attr_path(gm, w.target).shape[0])
                return x, w, b, False, replaced
        return None

    @staticmethod
    def only_read_as(gm, w, user, position) -> bool:
        """Every read of `w`'s tensor feeds argument `position` of an op like `user`."""
        for n in gm.graph.nodes:
            if n.op == "get_attr" and n.target == w.target:
                for u in n.users:
                    if u.target is not user.target or u.args.index(n) != position or u.args.count(n) != 1:
                        return False
        return True

    @staticmethod
    def bias_add(gm, mm, out_features):
        """`mm + b` with `b` a 1-D parameter of the output size, the matmul's only use: folded in."""
        users = list(mm.users)
        if len(users) == 1 and users[0].target is aten.add.Tensor and not users[0].kwargs:
            add = users[0]
            other = add.args[1] if add.args[0] is mm else add.args[0]
            if is_attr(gm, other, 1) and get_attr_path(gm, other.target).shape[0] == out_features:
                return other, add
        return None, mm

    @staticmethod
    def make_module(gm, w, b, transposed) -> str:
        read_as = w.meta.get(READ_AS, w.target)
        path = read_as[: -len(".weight")] if read_as.endswith(".weight") else f"{read_as}_linear"
        stored = get_attr_path(gm, w.target)
        weight = torch.nn.Parameter(stored.detach().t().contiguous(), stored.requires_grad) if transposed else stored
        lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None, device="meta")
        lin.weight = weight
        if b is not None:
            lin.bias = get_attr_path(gm, b.target)
        owner, leaf = owner_and_leaf(gm, path)
        existing = getattr(owner, leaf, None)
        if existing is not None:
            members = dict(existing.named_parameters(recurse=False))
            ours = {"weight": stored, "bias": lin.bias}
            if set(members) <= {"weight", "bias"} and not list(existing.children()) and \
                    all(members[k] is ours[k] for k in members):
                delattr(owner, leaf)  # a plain holder of exactly these tensors: the Linear takes its place
            else:
                path, leaf = f"{path}_linear", f"{leaf}_linear"
                if transposed:  # the [in, out] tensor is read nowhere else: the module's copy replaces it
                    delattr(*owner_and_leaf(gm, w.target))
        set_attr_path(gm, path, lin)
        return path
