"""The backward sweep: gradients of the causal LM loss through the streamed executor, one segment at a time.

A forward sweep (`StreamedExecutor.run`) keeps each segment's inputs per batch (an `ActivationStore`: in
memory up to the executor's budget, then on disk). Then the segments run in reverse order: each one's tensors
are read again, the segment is recomputed from its stored inputs with autograd on (activation checkpointing
at the layer level) and differentiated with the gradient its handed-on values received from the segment
after it; the gradients of its inputs go to the segment before, and its tensors are dropped. The head's
segment takes the loss, `lm_loss` of each batch's logits, as `scoring.gradients.compute_gradients` does.

Only the values that depend on the weights and are floating point (the residual stream) get a gradient;
masks, rotary tables and integer values do not. A tensor read by several segments (a tied embedding) is read
once per sweep in each direction and gets the sum of its segments' gradients.

Three stores beside the executor's own keep up to its budget each in memory (the rest on disk): the segments'
inputs, the gradients at the current boundary, and the partial gradients of tensors read by several segments.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.fx import Node

from fxprune.streaming.budget import return_freed_memory
from fxprune.streaming.executor import StreamedExecutor, Transform, _OnDevice
from fxprune.streaming.partition import Segment, weight_dependent
from fxprune.streaming.store import ActivationStore
from fxprune.util.lm import lm_loss, logits_of

# on_grad(name, batch index, gradient of that batch's loss w.r.t. the tensor `name`, whole over its segments)
GradSink = Callable[[str, int, torch.Tensor], None]
# on_done(name, tensor as read): every batch's gradient of `name` has been handed on; called before it is dropped
DoneSink = Callable[[str, torch.Tensor], None]


def backward_sweep(executor: StreamedExecutor, batches, names: Iterable[str] = (), on_grad: GradSink | None = None,
                   transform: Transform | None = None, through: Iterable[str] = (),
                   on_done: DoneSink | None = None) -> list[float]:
    """Forward and backward through `executor` on `batches` ((input_ids, attention_mask) pairs); returns each
    batch's loss. `names`: canonical names of the tensors whose gradient of each batch's loss is handed to
    `on_grad`. `transform(name, tensor)`: what the graph reads in place of each tensor (both sweeps); the
    tensors it makes differentiable (a mask's leaves) accumulate `.grad` over all batches, and `through` names
    the tensors whose transform carries such a gradient, so the sweep reaches back to their segments.
    `on_done(name, tensor)`: each of `names` once its gradients are complete (its lowest segment done), with the
    tensor as read, so a caller can reduce them to scores and free them layer by layer."""
    batches = [(ids, torch.ones_like(ids) if mask is None else mask) for ids, mask in batches]
    names = [n for n in dict.fromkeys(names) if n in executor.stored_as]
    unknown = [n for n in through if n not in executor.stored_as]
    if unknown:
        raise ValueError(f"through names {unknown[:3]}, which no segment reads from the weight source")
    readers = _readers(executor.segments)
    reached = [readers[n][0] for n in [*names, *through]]
    lowest = min(reached, default=len(executor.segments) - 1)
    saved = ActivationStore(executor.budget, executor.spill_dir, executor.device)
    try:
        hooks = {s.nodes[0]: _keep_inputs(executor, s, saved) for s in executor.segments[lowest:]}
        executor.run(batches, hooks, logits=False, transform=transform)
        return _Reverse(executor, batches, names, on_grad, transform, readers, saved).run(lowest, on_done)
    finally:
        saved.close()


def _readers(segments: list[Segment]) -> dict[str, list[int]]:
    """The indices of the segments reading each tensor, in order."""
    out: dict[str, list[int]] = {}
    for s in segments:
        for name in s.tensors:
            out.setdefault(name, []).append(s.index)
    return out


def _keep_inputs(executor: StreamedExecutor, segment: Segment, saved: ActivationStore):
    """A hook for the segment's first op: stores the values the segment takes (and, for the head, the earlier
    values the output reads), per batch, for its recomputation."""
    wanted = list(segment.takes)
    if segment is executor.segments[-1]:
        inside = set(segment.nodes)
        wanted += [n for n in executor.nodes[-1].all_input_nodes if n not in inside and n not in wanted]

    def hook(batch, env):
        saved.put((segment.index, batch), {n.name: env[n] for n in wanted})
    return hook


class _Reverse:
    """The reverse half of `backward_sweep`: segments from the head down to the lowest one a gradient needs."""

    def __init__(self, executor, batches, names, on_grad, transform, readers, saved):
        self.executor, self.batches, self.on_grad, self.transform = executor, batches, on_grad, transform
        self.wanted, self.readers, self.saved = set(names), readers, saved
        dg = executor.dg
        self.dependent = weight_dependent(executor.nodes, set(dg.parameters), dg.aliases)
        self.by_name = {n.name: n for n in executor.nodes}
        self.interp = _OnDevice(dg.gm, executor.device)
        store = (executor.budget, executor.spill_dir, executor.device)
        self.upstream = ActivationStore(*store)  # gradients of one boundary's values, per batch
        self.pending = ActivationStore(*store)   # partial gradients of tensors read by several segments
        self.losses = [0.0] * len(batches)

    def run(self, lowest: int, on_done: DoneSink | None = None) -> list[float]:
        loaded: dict[str, torch.Tensor] = {}
        try:
            for segment in reversed(self.executor.segments[lowest:]):
                for name in segment.tensors:
                    if name in self.executor.stored_as and name not in loaded:
                        loaded[name] = self.executor.read(name)
                for b in range(len(self.batches)):
                    self._segment(segment, b, loaded)
                for name in [n for n in loaded if self.readers[n][0] == segment.index]:
                    if on_done is not None and name in self.wanted:
                        on_done(name, loaded[name])
                    del loaded[name]
                return_freed_memory()
            return self.losses
        finally:
            self.upstream.close()
            self.pending.close()

    def _segment(self, segment: Segment, b: int, loaded: dict) -> None:
        """Recompute `segment` on batch `b` with autograd, backward, and hand on the gradients."""
        executor, head = self.executor, segment is self.executor.segments[-1]
        leaves, env = {}, {}
        for key, value in self.saved.take((segment.index, b)).items():
            node = self.by_name[key]
            if node in self.dependent and isinstance(value, torch.Tensor) and value.is_floating_point():
                value = leaves[node] = value.detach().requires_grad_(True)
            env[node] = value
        params = {n: loaded[n].detach().requires_grad_(True) for n in segment.tensors if n in self.wanted}
        with torch.enable_grad():
            values = {n: params.get(n, loaded[n]) for n in segment.tensors if n in loaded}
            if self.transform is not None:
                values = {n: self.transform(n, v) for n, v in values.items()}
            env.update(executor._attr_values(values, segment, segment.nodes))
            executor._run_segment(self.interp, segment, env, b, {})
            up = {} if head else self.upstream.take(b)
            if head:
                ids, mask = self.batches[b]
                output = executor.nodes[-1]
                flat = torch.fx.node.map_arg(output.args[0], lambda n: env[n])
                loss = lm_loss(logits_of(executor.dg.gm.graph.process_outputs(flat)), ids.to(executor.device),
                               mask.to(executor.device))
                self.losses[b] = float(loss.detach())
                roots = [(loss, None)] if loss.requires_grad else []
            else:
                inside = set(segment.nodes)
                roots = [(env[n], up[n.name]) for n in segment.hands_on
                         if n in inside and up.get(n.name) is not None and env[n].requires_grad]
            if roots:
                torch.autograd.backward([r for r, _ in roots], [g for _, g in roots])
        self.upstream.put(b, self._handed_back(segment, up, leaves))
        for name, p in params.items():
            self._deliver(name, b, segment.index, torch.zeros_like(p) if p.grad is None else p.grad)

    def _handed_back(self, segment: Segment, up: dict, leaves: dict[Node, torch.Tensor]) -> dict:
        """The gradients of the values live before `segment`: its inputs' plus those it only passed on."""
        inside = set(segment.nodes)
        back = {k: g for k, g in up.items() if self.by_name[k] not in inside}
        for node, leaf in leaves.items():
            if leaf.grad is not None:
                back[node.name] = leaf.grad if node.name not in back else back[node.name] + leaf.grad
        return back

    def _deliver(self, name: str, b: int, index: int, grad: torch.Tensor) -> None:
        """Hand `grad` on once every segment reading `name` has added its part (the lowest one comes last)."""
        readers = self.readers[name]
        grad = grad.detach()
        if len(readers) > 1 and index != readers[-1]:
            grad = grad + self.pending.take((name, b))["grad"]
        if index != readers[0]:
            self.pending.put((name, b), {"grad": grad})
        elif self.on_grad is not None:
            self.on_grad(name, b, grad)
