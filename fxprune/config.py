"""The one frozen settings object behind `fxprune.plan` and `fxprune.compile`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from fxprune.scoring.methods import Method, method_from_dict, method_to_dict

TARGETS = ("heads", "mlp", "hidden", "experts")  # experts: whole experts of a routed MoE layer
GQA_MODES = ("groups", "heads")       # remove whole KV groups, or the same query heads from every group
ALLOCATIONS = ("uniform", "global")  # same fraction in every group (LLM-Pruner), or one global ranking
RENORMALISING = ("allow", "exclude")  # prune groups whose units an op takes statistics over, or leave them


@dataclass(frozen=True)
class PruneConfig:
    ratio: float = 0.2
    importance: str | Method = "l2"   # settings (Taylor(order=1), HyWIA(steps=30), ...) or a shorthand name
    targets: tuple = ("heads", "mlp")
    protect_layers: tuple | None = None
    round_to: int | None = None
    gqa: str = "groups"
    allocation: str = "uniform"
    aggregation: str = "sum"
    seed: int = 0
    batch_size: int = 1  # calibration rows per forward pass of the gradient methods
    renormalising: str = "allow"  # "exclude": never prune a renormalising group (see Group.renormalising)

    def __post_init__(self):
        if not isinstance(self.ratio, (int, float)) or not 0 < self.ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        bad = [t for t in targets if t not in TARGETS]
        if bad or not targets:
            raise ValueError(f"targets {bad or targets!r} unknown; choose from {TARGETS}")
        object.__setattr__(self, "targets", targets)
        if self.protect_layers is not None:
            object.__setattr__(self, "protect_layers", tuple(int(i) for i in self.protect_layers))
        if self.gqa not in GQA_MODES:
            raise ValueError(f"gqa must be one of {GQA_MODES}, got {self.gqa!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.round_to is not None and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise ValueError(f"round_to must be a positive int, got {self.round_to!r}")
        if not isinstance(self.importance, (str, Method)):
            raise ValueError(f"importance must be a name or a Method (Taylor(order=1), Magnitude(p=2), HyWIA(), ...), "
                             f"got {type(self.importance).__name__}")
        if self.renormalising not in RENORMALISING:
            raise ValueError(f"renormalising must be one of {RENORMALISING}, got {self.renormalising!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["importance"] = method_to_dict(self.importance)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PruneConfig":
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "importance" in d:
            d["importance"] = method_from_dict(d["importance"])
        return cls(**d)


def protected_layers(spec, n_layers: int) -> set[int]:
    """Negative indices count from the end: (0, 1, 2, -1) is LLM-Pruner's LLaMA-7B choice."""
    return {i % n_layers for i in (spec or ())} if n_layers else set()
