"""Rewrite pass: turn `aten.linear(x, W, b)` on parameters into `nn.Linear` submodules.

The module is placed at the weight's owner path (`...q_proj.weight` -> `...q_proj`) so that
peft's `target_modules` and state-dict names match the original model. A weight read by
several linear ops shares one module.
"""
from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.passes.slice_parameters import set_attr_path

aten = torch.ops.aten
READ_AS = "fxprune.read_as"


def get_attr_path(gm, path):
    value = gm
    for part in path.split("."):
        value = getattr(value, part)
    return value


class LiftLinearModulesPass(PassBase):
    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        changed = False
        modules = {}
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not aten.linear.default:
                continue
            x, w = node.args[0], node.args[1]
            b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if w.op != "get_attr" or (b is not None and getattr(b, "op", None) != "get_attr"):
                continue
            read_as = w.meta.get(READ_AS, w.target)
            path = read_as[: -len(".weight")] if read_as.endswith(".weight") else f"{read_as}_linear"
            key = (w.target, None if b is None else b.target)
            if key not in modules:
                weight = get_attr_path(gm, w.target)
                lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None, device="meta")
                lin.weight = weight
                if b is not None:
                    lin.bias = get_attr_path(gm, b.target)
                parent, _, leaf = path.rpartition(".")
                owner = get_attr_path(gm, parent) if parent else gm
                existing = getattr(owner, leaf, None)
                if existing is not None:
                    members = dict(existing.named_parameters(recurse=False))
                    if set(members) <= {"weight", "bias"} and not list(existing.children()) and \
                            all(members[k] is getattr(lin, k) for k in members):
                        delattr(owner, leaf)  # a plain holder of exactly these tensors: the Linear takes its place
                    else:
                        path, leaf = f"{path}_linear", f"{leaf}_linear"
                set_attr_path(gm, path, lin)
                modules[key] = path
            with gm.graph.inserting_before(node):
                call = gm.graph.call_module(modules[key], (x,))
            call.meta = dict(node.meta)
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)
            changed = True
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return PassResult(gm, changed)
