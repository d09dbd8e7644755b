"""Memory budgets of a streamed run: "2GB" / "512MB" parsed to bytes, and the bytes each segment's tensors need."""
from __future__ import annotations

import ctypes
import re

from fxprune.streaming.partition import Segment

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value) -> int | None:
    """Bytes of a budget: an int, or a string such as "2GB", "512MB", "1.5GiB" (None stays None)."""
    if value is None or isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if match is None or match.group(2).upper() not in UNITS:
        raise ValueError(f"max_memory {value!r} is not a size: write e.g. '2GB', '512MB' or a number of bytes")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def segment_bytes(dg, segment: Segment) -> int:
    """Bytes of the parameters and buffers `segment` reads, at the graph's dtypes."""
    tensors = {**dg.parameters, **dg.buffers}
    return sum(tensors[n].numel() * tensors[n].element_size() for n in segment.tensors if n in tensors)


def describe(segment: Segment, count: int) -> str:
    """'segment 2 (decoder layer 1, reading model.layers.1.self_attn.q_proj.weight, ...)' for messages."""
    kind = "the embedding" if segment.index == 0 else "the head" if segment.index == count - 1 else \
        f"decoder layer {segment.index - 1}"
    first = f", reading {segment.tensors[0]}, ..." if segment.tensors else ""
    return f"segment {segment.index} ({kind}{first})"


def largest_segment(dg, segments: list[Segment]) -> tuple[str, int]:
    """(description, bytes) of the segment whose tensors take the most bytes."""
    largest = max(segments, key=lambda s: segment_bytes(dg, s))
    return describe(largest, len(segments)), segment_bytes(dg, largest)


def check_budget(dg, segments: list[Segment], budget: int | None) -> int:
    """The bytes the largest segment's tensors need; raises ValueError naming that segment when they exceed
    `budget` (None: no limit)."""
    largest, need = largest_segment(dg, segments)
    if budget is not None and need > budget:
        raise ValueError(f"max_memory of {budget:,} bytes is too small: {largest} needs "
                         f"{need:,} bytes of weights; give at least that plus room for the activations")
    return need


def return_freed_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc's malloc_trim; nothing elsewhere). A layer's
    tensors freed in the heap would otherwise stay resident, fragmented, and the peak would grow with the
    number of layers instead of with one layer."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
