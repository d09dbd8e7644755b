"""This process's resident memory: its high-water mark (Linux VmHWM), which can be reset to measure one step."""
from __future__ import annotations

from pathlib import Path

STATUS = Path("/proc/self/status")


def resident_peak() -> int | None:
    """Bytes of the highest resident memory this process has had (since start or the last reset); None where the
    system does not report it."""
    try:
        line = next(l for l in STATUS.read_text().splitlines() if l.startswith("VmHWM"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


def reset_resident_peak() -> bool:
    """Restart the high-water mark at the present resident size (Linux: "5" to /proc/self/clear_refs); whether
    it could."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
