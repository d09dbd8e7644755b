"""Running the captured graph on given tensors (detached copies of the model's), optionally checkpointed.

The user's model is never modified: the graph runs through `torch.func.functional_call` (or an
Interpreter reading a dict of tensors), so gradients land on the copies, never on `.grad`.
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from fxprune.analysis.groups import DependencyGraph
from fxprune.util.lm import logits_of

class _Runner(torch.fx.Interpreter):
    """Interpreter reading parameters and buffers from a dict (for checkpointed segments)."""

    def __init__(self, dg: DependencyGraph, tensors: dict[str, torch.Tensor]):
        super().__init__(dg.gm, garbage_collect_values=False)
        self.tensors, self.aliases = tensors, dg.aliases

    def fetch_attr(self, target):
        name = self.aliases.get(target, target)
        if name in self.tensors:
            return self.tensors[name]
        return super().fetch_attr(target)

    def call_module(self, target, args, kwargs):
        module = super().fetch_attr(target)
        local = {}
        for kind in (module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)):
            for name, _ in kind:
                full = f"{target}.{name}"
                full = self.aliases.get(full, full)
                if full in self.tensors:
                    local[name] = self.tensors[full]
        return torch.func.functional_call(module, local, args, kwargs)

    def run_in(self, node, env):
        self.env = env
        return self.run_node(node)


def _forward_checkpointed(dg, tensors, ids, mask, segments=None):
    """The graph split into ~sqrt(n) contiguous segments, each under activation checkpointing."""
    graph = dg.gm.graph
    nodes = list(graph.nodes)
    inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    env = {}
    for n in nodes:
        if n.op == "placeholder":
            if n.name in inputs:
                env[n] = inputs[n.name]
            elif n.args:
                env[n] = n.args[0]
            else:
                raise ValueError(f"checkpoint=True: unknown graph input {n.name!r}")
    body = [n for n in nodes if n.op not in ("placeholder", "output")]
    output = next(n for n in nodes if n.op == "output")
    k = segments or max(1, int(math.sqrt(len(body))))
    size = max(1, math.ceil(len(body) / k))
    chunks = [body[i:i + size] for i in range(0, len(body), size)]
    where = {n: ci for ci, chunk in enumerate(chunks) for n in chunk}
    last_use = {}
    for n in body + [output]:
        user = where.get(n, len(chunks))
        for src in n.all_input_nodes:
            last_use[src] = max(last_use.get(src, -1), user)
    runner = _Runner(dg, tensors)
    for ci, chunk in enumerate(chunks):
        inside = set(chunk)
        ins = list(dict.fromkeys(s for n in chunk for s in n.all_input_nodes if s not in inside))
        outs = [n for n in chunk if last_use.get(n, -1) > ci]

        def run(*values, chunk=chunk, ins=ins, outs=outs):
            local = dict(zip(ins, values))
            for n in chunk:
                local[n] = runner.run_in(n, local)
            return tuple(local[n] for n in outs)

        results = _checkpoint(run, *[env[n] for n in ins], use_reentrant=False)
        env.update(zip(outs, results))
        for n in [n for n in env if last_use.get(n, -1) <= ci and n.op != "placeholder"]:
            del env[n]
    flat = torch.fx.node.map_arg(output.args[0], lambda n: env[n])
    return graph.process_outputs(flat)


def forward(dg, tensors, ids, mask, checkpoint=False):
    """Logits of the analysed graph on `ids` with `tensors` in place of its parameters (so gradients flow to them);
    `checkpoint` recomputes activations in the backward pass."""
    if mask is None:
        mask = torch.ones_like(ids)
    if checkpoint:
        out = _forward_checkpointed(dg, tensors, ids, mask, None if checkpoint is True else int(checkpoint))
    else:
        out = torch.func.functional_call(dg.gm, tensors, (ids,), {"attention_mask": mask, "use_cache": False})
    return logits_of(out)


def compute_device(dg, device):
    """The device scoring runs on: `device` when given, else the model's."""
    if device is not None:
        return torch.device(device)
    first = next(iter(dg.parameters.values()), None)
    return first.device if first is not None else torch.device("cpu")


def model_tensors(dg, device, dtype, trainable=()):
    """Detached copies (views where no cast is needed) of the model's tensors; `trainable` ones require grad."""
    out = {}
    for name, t in dg.parameters.items():
        if t.device.type == "meta":
            raise ValueError(f"parameter {name} is on the meta device: scoring needs the model's real weights")
        cast = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        # detach(): a new tensor object (sharing storage), so requires_grad_ never touches the model's
        out[name] = t.detach().to(device=device, dtype=cast).requires_grad_(name in trainable)
    if device != compute_device(dg, None):
        for name, b in dg.buffers.items():
            out[name] = b.detach().to(device)
    return out
