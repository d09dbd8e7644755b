"""The least-squares refit, streamed: the dense and the pruned stream carried side by side in one forward sweep.

`fxprune.reconstruction.reconstruct_layers.ReconstructLayersPass` refits the projections that lost inputs on the
whole model: the dense and the pruned graph stepped in lockstep, each projection fitted on the pruned model's
own activations after the refits before it. Streamed, the same happens one group of segments at a time, as
`write_shards` rewrites them: with a group's dense tensors read and rewritten (`rewrite`, the group's tensors
real), each of its segments runs on every calibration batch twice over, the dense segment on the dense stream
and its pruned twin (`pruned_segments`) on the pruned stream, and

1. the projections of the segment are fitted in waves: a wave is a run of them none of whose inputs (or
   residual stream) depends on another's output, so that one pass over the batches, stopping before the last,
   gives every one of them the activations the in-memory pass gives it; their sums (`ProjectionFit`) are
   solved and the refitted weights set in the rewritten graph, then the next wave runs;
2. both segments then run whole, so the next segment takes the pruned stream after the refit.

The sums, the solve and the token weights are the in-memory pass's; only their order of addition differs.
Each stream's hand-on values are kept per batch in an `ActivationStore` (spilled to disk past its budget).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.fx import Node

from fxprune.analysis.fx_util import get_attr_path
from fxprune.data.calibration import Calibration
from fxprune.reconstruction.projection_fit import ProjectionFit, held_out_tokens
from fxprune.reconstruction.projections import (dense_projections, lifted_projections, projection_input,
                                                residual_partner)
from fxprune.reconstruction.reconstruct_layers import set_weight_and_bias
from fxprune.reconstruction.settings import Refit
from fxprune.streaming.executor import StreamedExecutor, _OnDevice
from fxprune.streaming.partition import Segment, last_uses
from fxprune.streaming.pruned_segments import pruned_segments
from fxprune.streaming.store import ActivationStore

# capture(env): called before a stop runs, with every live value
Capture = Callable[[dict], None]


def run_ops(interp, ops: list[Node], env: dict, last: dict, position: dict,
            stops: dict[Node, Capture] | None = None) -> None:
    """Run `ops` in order on `env` (node -> value), dropping each value once no later op reads it; before each op in
    `stops`, call its capture. With `stops`, return before the first op after the last of them."""
    interp.env = env
    remaining = len(stops or ())
    try:
        for node in ops:
            if stops and node in stops:
                stops[node](env)
                remaining -= 1
                if remaining == 0:
                    return
            env[node] = interp.run_node(node)
            for src in node.all_input_nodes:
                if last[src] <= position[node]:
                    env.pop(src, None)
    finally:
        interp.env = {}  # the interpreter outlives the run: it must not keep the segment's weights alive


def waves(ops: list[Node], stops: dict[Node, str], reads: dict[Node, list[Node]]) -> list[list[Node]]:
    """`stops` in graph order, cut into runs none of whose `reads` (a stop's input and residual stream) depends on
    an earlier stop of the same run, nor on another call of its module (a module called twice is refitted once)."""
    out, current, changed, modules = [], [], set(), set()
    for node in ops:
        if node in stops:
            if any(r in changed for r in reads[node]):
                out.append(current)
                current, changed, modules = [], set(), set()
            current.append(node)
            changed.add(node)
            modules.add(node.target)
        elif (node.op == "call_module" and node.target in modules) or any(s in changed for s in node.all_input_nodes):
            changed.add(node)
    return out + [current] if current else out


class _Graph:
    """One graph as the sweep runs it: its interpreter on the executor's device, and where each value dies."""

    def __init__(self, gm, device):
        nodes = list(gm.graph.nodes)
        self.gm, self.interp = gm, _OnDevice(gm, device)
        self.by_name = {n.name: n for n in nodes}
        self.position = {n: i for i, n in enumerate(nodes)}
        self.last = last_uses(nodes)


class StreamedRefit:
    """The refit of `plan_kept` (a plan's kept positions) under `settings` (a `Refit`) for the graph `executor`
    streams, on `calibration` (a `Calibration`) in batches of `batch_size` rows: by default all rows at once, as the
    in-memory pass runs them, so that every forward op sees the shapes it sees there and the refit is that pass's
    to the last bit; smaller batches hold less but differ by float32 rounding, which an ill-conditioned fit (a
    small ridge on few tokens) magnifies. `budget`: bytes of each stream's hand-on values kept in memory (None:
    all), the rest spilled under `spill_dir`. `fit_group` refits a group of consecutive segments in their
    rewritten graph; the groups must come in order, each once. `choices` records, per refitted weight, what
    ridge="auto" kept. Close it (or use it as a context manager) to free the streams and their spill files."""

    def __init__(self, executor: StreamedExecutor, plan_kept: dict, settings: Refit, calibration: Calibration,
                 batch_size: int | None = None, budget: int | None = None, spill_dir=None):
        if not isinstance(settings, Refit) or not settings.enabled:
            raise ValueError(f"StreamedRefit: settings must be a Refit with a mode other than 'none', got {settings!r}")
        if not isinstance(calibration, Calibration):
            raise TypeError(f"StreamedRefit: calibration must be a Calibration, got {type(calibration).__name__}")
        self.executor, self.kept, self.settings = executor, plan_kept, settings
        dg, device = executor.dg, executor.device
        self.dense = _Graph(dg.gm, device)
        self.segment_of = {n: s.index for s in executor.segments for n in s.nodes}
        self.stops = {n: p.weight for n, p in dense_projections(dg.gm, dg.aliases, plan_kept).items()}
        self.last_segment = max((self.segment_of[n] for n in self.stops), default=-1)
        self.batches = list(calibration.batches(batch_size or len(calibration)))
        self.tokens, self.held_out, row, token = [], [], 0, 0
        for ids, mask in self.batches:
            self.tokens.append(mask.reshape(-1).bool().to(device))
            self.held_out.append(held_out_tokens(mask, row, token, len(calibration)).to(device))
            row, token = row + ids.shape[0], token + int(mask.bool().sum())
        self.dense_store = ActivationStore(budget, spill_dir, device)
        self.pruned_store = ActivationStore(budget, spill_dir, device)
        placeholders = [n for n in dg.gm.graph.nodes if n.op == "placeholder"]
        for b, (ids, mask) in enumerate(self.batches):
            inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False}
            self.dense_store.put(b, {n.name: inputs.get(n.name, n.args[0] if n.args else None) for n in placeholders})
            self.pruned_store.put(b, {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]})
        self.next_segment = 0
        self.refitted: list[str] = []
        self.choices: dict[str, str] = {}

    @torch.no_grad()
    def fit_group(self, group: list[Segment], dense: dict[str, torch.Tensor], gm: torch.fx.GraphModule) -> None:
        """Refit the projections of the consecutive segments `group` in `gm`, the graph rewritten with their tensors
        real, and carry both streams past them. `dense`: their dense tensors by canonical name."""
        if group[0].index != self.next_segment:
            raise ValueError(f"StreamedRefit.fit_group: segment {self.next_segment} comes next, got "
                             f"{[s.index for s in group]}")
        self.next_segment = group[-1].index + 1
        if group[0].index > self.last_segment:
            return  # no refit left: the streams are not needed any more
        dg = self.executor.dg
        projections = dense_projections(dg.gm, dg.aliases, self.kept, lambda target: self._dense_tensor(dense, target))
        pruned = _Graph(gm, self.executor.device)
        twins = pruned_segments(gm, self.executor.segments)
        lifted = {name: node for node, name in lifted_projections(gm, set(self.stops.values())).items()}
        for segment in group:
            if segment.index > self.last_segment:
                break
            twin = twins[segment.index]
            for node in twin.nodes:  # the rewrite made them on the CPU; the others in `gm` are on the meta device
                if node.op == "call_module":
                    gm.get_submodule(node.target).to(self.executor.device)
            stops = self._twin_stops(segment, twin, lifted)
            attrs = self.executor._attr_values(dense, segment, segment.nodes), self._pruned_attrs(gm, twin)
            reads = {n: [r for r in (projection_input(n), residual_partner(n) if self.settings.target == "stream"
                                     else None) if r is not None] for n in stops}
            for wave in waves(twin.nodes, {n: name for n, (_, name) in stops.items()}, reads):
                self._fit_wave(segment, twin, pruned, attrs, {n: stops[n] for n in wave}, projections)
            self._advance(segment, attrs[0], self.dense, self.dense_store)
            self._advance(twin, attrs[1], pruned, self.pruned_store)

    def _twin_stops(self, segment: Segment, twin: Segment, lifted: dict) -> dict[Node, tuple[Node, str]]:
        """{lifted projection in `twin`: (its dense projection in `segment`, weight name)} for the targets there."""
        out = {}
        for node in segment.nodes:
            name = self.stops.get(node)
            if name is None:
                continue
            if lifted.get(name) not in twin.nodes:
                raise RuntimeError(f"projection {name} of segment {segment.index} has no lifted twin in the "
                                   "rewritten segment")
            out[lifted[name]] = (node, name)
        return out

    def _fit_wave(self, segment: Segment, twin: Segment, pruned: _Graph, attrs: tuple, wave: dict, projections: dict):
        """Fit the projections of `wave` ({lifted node: (dense node, name)}) on every batch and set them in the
        rewritten graph: one run of each segment per batch, stopping before the wave's last projection."""
        fits = {lifted: ProjectionFit(projections[node], self.settings) for lifted, (node, _) in wave.items()}
        stream = self.settings.target == "stream"
        for b in range(len(self.batches)):
            seen = self._capture(self.dense, self.dense_store, segment, attrs[0], [node for node, _ in wave.values()],
                                 b)
            own = self._capture(pruned, self.pruned_store, twin, attrs[1], list(wave), b)
            for lifted, (node, _) in wave.items():
                (xd, residual), (xp, own_residual) = seen[node], own[lifted]
                fits[lifted].add(xd, residual, xp, own_residual if stream else None, self.tokens[b], self.held_out[b])
            del seen, own
        for lifted, (_, name) in wave.items():
            module = pruned.gm.get_submodule(lifted.target)
            weight, bias, self.choices[name] = fits.pop(lifted).result(module.weight, module.bias)
            set_weight_and_bias(module, weight, bias)
            self.refitted.append(name)

    def _dense_tensor(self, dense: dict, target: str) -> torch.Tensor:
        name = self.executor.dg.aliases.get(target, target)
        return dense[name] if name in dense else get_attr_path(self.executor.dg.gm, target)

    def _pruned_attrs(self, gm, twin: Segment) -> dict:
        device = self.executor.device
        return {a: get_attr_path(gm, a.target).to(device) for a in twin.attrs}

    def _autocast(self):
        dtype = None if self.settings.precision == "float32" else getattr(torch, self.settings.precision)
        return torch.autocast(self.executor.device.type, dtype=dtype, enabled=dtype is not None)

    def _capture(self, graph: _Graph, store: ActivationStore, segment: Segment, attrs: dict, stops: list[Node],
                 batch: int) -> dict:
        """{stop: (its input, the residual stream its output is added to, or None)} for each of `stops` (nodes of
        `graph`) as `segment` runs on batch `batch` of the stream `store` holds."""
        seen = {}

        def capture(node):
            def hook(env):
                partner = residual_partner(node)
                seen[node] = (env[projection_input(node)], None if partner is None else env.get(partner))
            return hook
        env = {graph.by_name[k]: v for k, v in store.peek(batch).items()}
        env.update(attrs)
        with self._autocast():
            run_ops(graph.interp, segment.nodes, env, graph.last, graph.position, {n: capture(n) for n in stops})
        return seen

    def _advance(self, segment: Segment, attrs: dict, graph: _Graph, store: ActivationStore) -> None:
        for b in range(len(self.batches)):
            env = {graph.by_name[k]: v for k, v in store.take(b).items()}
            env.update(attrs)
            with self._autocast():
                run_ops(graph.interp, segment.nodes, env, graph.last, graph.position)
            store.put(b, {n.name: env[n] for n in segment.hands_on})

    @property
    def spilled(self) -> int:
        """Batches of either stream written to disk so far."""
        return self.dense_store.spilled + self.pruned_store.spilled

    def close(self) -> None:
        """Forget both streams and remove their spill files."""
        self.dense_store.close()
        self.pruned_store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
