"""The one frozen settings object behind `fxprune.plan` and `fxprune.compile`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

TARGETS = ("heads", "mlp", "hidden", "experts")  # experts: whole experts of a routed MoE layer
GQA_MODES = ("groups", "heads")       # remove whole KV groups, or the same query heads from every group
ALLOCATIONS = ("uniform", "global")  # same fraction in every group (LLM-Pruner), or one global ranking


@dataclass(frozen=True)
class PruneConfig:
    ratio: float = 0.2
    importance: str = "l2"
    targets: tuple = ("heads", "mlp")
    protect_layers: tuple | None = None
    round_to: int | None = None
    gqa: str = "groups"
    allocation: str = "uniform"
    aggregation: str = "sum"
    seed: int = 0
    uniform_widths: bool = False  # same kept count per kind in every layer, so one HF config can hold the model

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
        if self.uniform_widths and self.protect_layers:
            raise ValueError(f"uniform_widths keeps the same widths in every layer, so it cannot leave layers "
                             f"{self.protect_layers} unpruned: pass protect_layers=None (CLI: --protect with no value)")
        if self.round_to is not None and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise ValueError(f"round_to must be a positive int, got {self.round_to!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PruneConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def protected_layers(spec, n_layers: int) -> set[int]:
    """Negative indices count from the end: (0, 1, 2, -1) is LLM-Pruner's LLaMA-7B choice."""
    return {i % n_layers for i in (spec or ())} if n_layers else set()
