"""Write the pruned tensors of a streamed checkpoint as safetensors shards, a few segments at a time.

The rewrite (`fxprune.rewrite.emit.rewrite`) runs on the meta-device analysis with the tensors of a few
consecutive segments made real (read from the weight source): whatever it does to a tensor (slice it at the
kept positions, transpose GPT-2's Conv1D weight into an nn.Linear) is done for real to those tensors only,
and the real ones it returns make one shard. So the pruned model is never whole in memory, and its tensors
are exactly the in-memory rewrite's. With a refit (`fxprune.streaming.refit.StreamedRefit`), each group is refitted
in its rewritten graph before its shard is taken. `fxprune.serialization.save_streamed` adds the plan and config.
"""
from __future__ import annotations

import copy
import gc
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from fxprune.rewrite.emit import rewrite, unique_tensors
from fxprune.streaming.budget import return_freed_memory, segment_bytes
from fxprune.streaming.executor import StreamedExecutor
from fxprune.streaming.partition import Segment
from fxprune.streaming.refit import StreamedRefit
from fxprune.streaming.weights import INDEX

SHARD = "model-{:05d}.safetensors"


def groups_within(dg, segments: list[Segment], budget: int | None) -> list[list[Segment]]:
    """Consecutive segments grouped so that each group's tensors fit `budget` bytes (one segment a group
    when None); a segment larger than the budget makes a group of its own."""
    groups, size = [], 0
    for segment in segments:
        need = segment_bytes(dg, segment)
        if groups and budget is not None and size + need <= budget:
            groups[-1].append(segment)
            size += need
        else:
            groups.append([segment])
            size = need
    return groups


def real_view(dg, values: dict[str, torch.Tensor]):
    """A shallow copy of `dg` whose parameters and buffers named in `values` are those tensors (the rest as
    they are: meta for a meta-device capture)."""
    view = copy.copy(dg)
    view.parameters = {n: values.get(n, t) for n, t in dg.parameters.items()}
    view.buffers = {n: values.get(n, t) for n, t in dg.buffers.items()}
    view.dims_of = dg.dims_of  # the labels are keyed by the captured tensors' identity
    return view


def write_shards(executor: StreamedExecutor, kept: dict, folder: Path, budget: int | None = None,
                 progress: Callable[[Segment], None] | None = None, refit: StreamedRefit | None = None) -> None:
    """Write to `folder` the tensors of `rewrite(executor.dg, kept)` (`kept`: atom id -> kept units), their
    values read from `executor`'s source, as one shard per group of segments fitting `budget` bytes, and the
    index json naming each tensor's shard. `refit`: refits each group's projections before its shard is
    written (`StreamedRefit.fit_group`). `progress(segment)` is called for each segment of a written shard."""
    dg, weight_map, total, names, done = executor.dg, {}, 0, None, set()
    for k, group in enumerate(groups_within(dg, executor.segments, budget)):
        # each output tensor comes from one input tensor: a tied one, read again by the head, is written already
        # (but the refit runs the head, so it reads it again)
        reads = dict.fromkeys(n for s in group for n in s.tensors if n in executor.stored_as and
                              (refit is not None or n not in done))
        done.update(reads)
        dense = {n: executor.read(n) for n in reads}
        gm = rewrite(real_view(dg, dense), kept)
        if refit is not None:
            refit.fit_group(group, dense, gm)
        del dense
        tensors = unique_tensors(gm)
        del gm
        names = names or set(tensors)
        shard = {n: t.detach().contiguous().cpu() for n, t in tensors.items() if not t.is_meta and n not in weight_map}
        del tensors
        gc.collect()  # the rewritten GraphModule is cyclic garbage: collected now, it frees the real tensors it holds
        file = SHARD.format(k + 1)
        save_file(shard, folder / file)
        weight_map.update(dict.fromkeys(shard, file))
        total += sum(t.numel() * t.element_size() for t in shard.values())
        del shard
        return_freed_memory()
        for segment in group if progress is not None else ():
            progress(segment)
    missing = sorted(names - set(weight_map))
    if missing:  # the executor checked every tensor a segment reads: these are read by none
        raise ValueError(f"no value for {missing[:5]}: neither in the weight source nor read by any segment")
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
