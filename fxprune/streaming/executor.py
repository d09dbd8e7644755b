"""Run a captured graph segment by segment (`partition`), its weights streamed from a `WeightSource`.

Every calibration batch passes through segment k before segment k+1 starts, so only segment k's tensors
are in memory (plus a tied weight a later segment reads again): each is read when the first segment that
reads it starts and dropped after the last one. Between segments only the values a segment hands on are
kept, per batch (`ActivationStore`: in memory up to a budget, then on disk). Hooks observe the values
before chosen nodes run (the statistics of `fxprune.streaming.statistics`).

The loop is ordered segment-major so that later sweeps fit it: a backward sweep recomputing each segment
from its stored inputs in reverse order, a refit or a rewrite of segment k between its statistics and
segment k+1, and resuming after the last finished segment all act at the boundaries `run` walks.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import torch
from torch.fx import Node

from fxprune.analysis.fx_util import get_attr_path
from fxprune.streaming.budget import return_freed_memory
from fxprune.streaming.partition import Segment, last_uses, partition, tensor_attr
from fxprune.streaming.resume import Snapshots
from fxprune.streaming.store import ActivationStore
from fxprune.streaming.weights import WeightSource
from fxprune.util.lm import logits_of

# hook(batch index, env): called before its node runs; env maps every live node to its value
Hook = Callable[[int, dict], None]
# transform(canonical name, tensor read from the source) -> the tensor the graph reads in its place
Transform = Callable[[str, torch.Tensor], torch.Tensor]


class SourceTensors(Mapping):
    """The graph's parameters by canonical name, each read from the executor's source when looked up (nothing
    kept): what `fxprune.scoring.score(weights=...)` reads in place of a meta-device graph's parameters."""

    def __init__(self, executor: "StreamedExecutor"):
        self.executor = executor

    def __getitem__(self, name):
        return_freed_memory()  # the tensor read before this one is freed by now (scoring keeps none)
        return self.executor.read(name)

    def __iter__(self):
        return iter(self.executor.stored_as)

    def __len__(self):
        return len(self.executor.stored_as)


class StreamError(ValueError):
    """Raised before any computation when a tensor the graph reads is neither in the weight source nor real in
    the captured graph; the message names it and the segment that reads it."""


class _OnDevice(torch.fx.Interpreter):
    """Runs nodes with every device argument (a graph captured on the meta device makes its masks and position
    ids there) replaced by the device the executor computes on."""

    def __init__(self, gm, device):
        super().__init__(gm, garbage_collect_values=False)
        self.device = device

    def call_function(self, target, args, kwargs):
        args, kwargs = torch.utils._pytree.tree_map(self._device, (args, kwargs))
        if target is torch.ops.aten.histc.default and not args[0].is_floating_point() and self.device.type == "cpu":
            # transformers' MoE counts tokens per expert with an integer histc off the CPU (the meta device
            # included); the CPU has it for floats only, and the counts are the same
            return super().call_function(target, (args[0].float(), *args[1:]), kwargs).to(args[0].dtype)
        return super().call_function(target, args, kwargs)

    def _device(self, value):
        return self.device if isinstance(value, torch.device) else value


class StreamedExecutor:
    """Runs `dg.gm` (captured from a meta-device or a real model) over calibration batches segment by
    segment, reading parameters (and the buffers the source holds) from `source`. `budget`: bytes of hand-on
    values kept in memory (None: all), the rest spilled under `spill_dir`; `device`: where it computes;
    `progress(segment)`: called after each segment a run finishes (a progress bar's update)."""

    def __init__(self, dg, source: WeightSource, segments: list[Segment] | None = None, budget: int | None = None,
                 spill_dir=None, device=None, progress: Callable[[Segment], None] | None = None):
        self.dg, self.source, self.progress = dg, source, progress
        self.segments = partition(dg) if segments is None else segments
        self.budget, self.spill_dir = budget, spill_dir
        self.device = torch.device(device or "cpu")
        self.nodes = list(dg.gm.graph.nodes)
        self.position = {n: i for i, n in enumerate(self.nodes)}
        self.last = last_uses(self.nodes)
        self.stored_as = self._resolve()
        self.last_segment = {name: s.index for s in self.segments for name in s.tensors}
        self.resident: list[set[str]] = []  # per segment of the last run: the tensors in memory while it ran
        self.store: ActivationStore | None = None

    def _resolve(self) -> dict[str, str]:
        """The source's name of each tensor read from it; checks that every other tensor is real."""
        spellings: dict[str, list[str]] = {}
        for alias, canonical in self.dg.aliases.items():
            spellings.setdefault(canonical, []).append(alias)
        names, found = self.source.names(), {}
        for segment in self.segments:
            for name in segment.tensors:
                stored = next((s for s in [name] + spellings.get(name, []) if s in names), None)
                if stored is not None:
                    found[name] = stored
                elif name in self.dg.parameters:
                    raise StreamError(f"parameter {name!r} (read by segment {segment.index}) is not in the weight "
                                      f"source {type(self.source).__name__}")
            for attr in segment.attrs:
                name = self.dg.aliases.get(attr.target, attr.target)
                if name not in found and get_attr_path(self.dg.gm, attr.target).is_meta:
                    raise StreamError(f"tensor {attr.target!r} (read by segment {segment.index}) has no value: it is "
                                      "on the meta device and not in the weight source")
        return found

    def read(self, name: str) -> torch.Tensor:
        """The tensor of canonical name `name` read from the source, in the graph's dtype, on the device."""
        like = self.dg.parameters.get(name, self.dg.buffers.get(name))
        return self.source.read(self.stored_as[name]).to(self.device, like.dtype)

    def _load(self, loaded: dict, segment: Segment, transform: Transform | None = None) -> None:
        for name in segment.tensors:
            if name in self.stored_as and name not in loaded:
                loaded[name] = self.read(name) if transform is None else transform(name, self.read(name))

    def _attr_values(self, loaded: dict, segment: Segment, ops) -> dict[Node, object]:
        out = {}
        for src in dict.fromkeys(s for n in ops for s in n.all_input_nodes):
            if src.op != "get_attr":
                continue
            name = self.dg.aliases.get(src.target, src.target)
            out[src] = loaded[name] if name in loaded else get_attr_path(self.dg.gm, src.target)
            if isinstance(out[src], torch.Tensor) and tensor_attr(self.dg.gm, src):
                out[src] = out[src].to(self.device)
        return out

    @torch.no_grad()
    def run(self, batches, hooks: dict[Node, Hook] | None = None, logits: bool = True,
            transform: Transform | None = None, segments: int | None = None, snapshots: Snapshots | None = None,
            state: dict | None = None):
        """Run the graph on `batches` ((input_ids, attention_mask or None) pairs); `hooks`: node -> hook, called
        for every batch before that node runs; `transform(name, tensor)`: what the graph reads in place of each
        tensor read from the source (a masked weight). Returns each batch's logits when `logits`; otherwise the
        run stops after the segment of the last hooked node (or after the first `segments`) and returns None.
        `snapshots`: the run resumes after the last segment they hold and records its own boundaries, each with
        `state` (what the hooks accumulate, updated in place when resuming)."""
        hooks = hooks or {}
        batches = list(batches)
        todo = self.segments
        if not logits:
            hooked = [s.index for s in self.segments for n in s.nodes if n in hooks]
            todo = self.segments[:max(hooked, default=-1) + 1 if segments is None else segments]
        self.store = ActivationStore(self.budget, self.spill_dir, self.device)
        by_name = {n.name: n for n in self.nodes}
        try:
            for b, (ids, mask) in enumerate(batches):
                mask = torch.ones_like(ids) if mask is None else mask
                inputs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device), "use_cache": False}
                self.store.put(b, {n.name: inputs.get(n.name, n.args[0] if n.args else None)
                                   for n in self.nodes if n.op == "placeholder"})
            loaded: dict[str, torch.Tensor] = {}
            self.resident = []
            interp = _OnDevice(self.dg.gm, self.device)
            done = self._resume(snapshots, state, len(batches))
            for segment in todo[:done + 1] if self.progress is not None else ():
                self.progress(segment)
            for segment in todo[done + 1:]:
                self._load(loaded, segment, transform)
                self.resident.append(set(loaded))
                attrs = self._attr_values(loaded, segment, segment.nodes)
                for b in range(len(batches)):
                    env = {by_name[k]: v for k, v in self.store.take(b).items()}
                    env.update(attrs)
                    self._run_segment(interp, segment, env, b, hooks)
                    self.store.put(b, {n.name: env[n] for n in segment.hands_on})
                for name in [n for n in loaded if self.last_segment[n] == segment.index]:
                    del loaded[name]
                return_freed_memory()
                if snapshots is not None and (snapshots.due() or segment is todo[-1]):
                    snapshots.save(segment.index, self._values(len(batches)), state)
                if self.progress is not None:
                    self.progress(segment)
            if not logits:
                return None
            output = self.nodes[-1]
            out = []
            for b in range(len(batches)):
                env = {by_name[k]: v for k, v in self.store.take(b).items()}
                flat = torch.fx.node.map_arg(output.args[0], lambda n: env[n])
                out.append(logits_of(self.dg.gm.graph.process_outputs(flat)))
            return out
        finally:
            self.store.close()

    def _resume(self, snapshots: Snapshots | None, state: dict | None, count: int) -> int:
        """The last segment the snapshots say was finished (-1: none), its hand-on values put in the store and
        its state into `state`."""
        saved = None if snapshots is None else snapshots.load(self.device)
        if saved is None:
            return -1
        done, values, kept = saved
        if len(values) != count:
            raise StreamError(f"the snapshot {snapshots.path} holds {len(values)} batches, this run has {count}: "
                              "remove it to start again")
        for b, v in enumerate(values):
            self.store.take(b)
            self.store.put(b, v)
        if state is not None:
            state.clear()
            state.update(kept)
        return done

    def _values(self, count: int) -> list[dict]:
        """Every batch's hand-on values (taken from the store and put back)."""
        out = []
        for b in range(count):
            out.append(self.store.take(b))
            self.store.put(b, out[-1])
        return out

    def _run_segment(self, interp, segment: Segment, env: dict, batch: int, hooks: dict) -> None:
        interp.env = env
        for node in segment.nodes:
            if node in hooks:
                hooks[node](batch, env)
            env[node] = interp.run_node(node)
            for src in node.all_input_nodes:  # free what no later op reads
                if self.last[src] <= self.position[node]:
                    env.pop(src, None)
