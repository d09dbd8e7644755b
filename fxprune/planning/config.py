"""The one frozen settings object behind `fxprune.plan` and `fxprune.compile`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from fxprune.reconstruction.settings import Refit, as_refit, from_old_fields
from fxprune.scoring.aggregate import AGGREGATIONS
from fxprune.scoring.methods import Method, method_from_dict, method_to_dict

TARGETS = ("heads", "mlp", "hidden", "experts")  # experts: whole experts of a routed MoE layer
GQA_MODES = ("groups", "heads")       # remove whole KV groups, or the same query heads from every group
ALLOCATIONS = ("uniform", "global", "flap", "absolute")  # same fraction per group (LLM-Pruner), one global
    # ranking of scores over their group's mean, FLAP's standardised scores against one global threshold, or one
    # global ranking of the scores as they are per parameter (for scores on one scale everywhere: obs's errors)
RENORMALISING = ("allow", "exclude")  # prune groups whose units an op takes statistics over, or leave them
AUTO = "auto"


@dataclass(frozen=True)
class PruneConfig:
    """Frozen, validated settings of `fxprune.plan` and `fxprune.compile`; a bad value raises `ValueError` naming
    the field.

    Main fields: `ratio` (fraction of parameters to remove, in (0, 1)), `importance` (an estimator name or a
    `fxprune.scoring.Method`), `targets` (of "heads", "mlp", "hidden", "experts"), `protect_layers` (indices, None
    or "auto"), `round_to` (MLP width multiple, None or "auto"), `gqa`, `allocation` (how widths are shared across
    groups), `reconstruct` ("none", "bias", "lstsq") with `ridge`, `weighting`, `refit_target`, `refit_precision`
    and `reconstruct_samples`, and the packaged calibration's `calibration_samples` x `calibration_len`. `to_dict` /
    `from_dict` round-trip it through JSON."""
    ratio: float = 0.2
    importance: str | Method = "hywia"   # settings (Taylor(order=1), HyWIA(steps=30), ...) or a shorthand name
    targets: tuple = ("heads", "mlp")
    protect_layers: tuple | None | str = AUTO   # auto: the first tenth and last fifteenth of the layers
    round_to: int | None | str = AUTO           # auto: MLP widths of 512+ channels in multiples of 64
    gqa: str = "groups"
    allocation: str = "uniform"
    aggregation: str = "sum"
    seed: int = 0
    reconstruct: Refit | str = Refit()  # refit the projections that lost inputs (fxprune/reconstruction/settings.py); a mode
                                        # name ("lstsq", "bias", "none") is Refit(mode=name)
    calibration_samples: int = 32                # size of the packaged calibration drawn when none is given
    calibration_len: int = 128
    batch_size: int = 1  # calibration rows per forward pass of the gradient methods
    renormalising: str = "allow"  # "exclude": never prune a renormalising group (see Group.renormalising)
    uniform_widths: bool = False  # same kept count per kind in every layer, so one HF config can hold the model

    def __post_init__(self):
        if not isinstance(self.ratio, (int, float)) or not 0 < self.ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        bad = [t for t in targets if t not in TARGETS]
        if bad or not targets:
            raise ValueError(f"targets {bad or targets!r} unknown; choose from {TARGETS}")
        object.__setattr__(self, "targets", targets)
        if self.protect_layers is not None and self.protect_layers != AUTO:
            if isinstance(self.protect_layers, str):
                raise ValueError(f"protect_layers must be layer indices, None or 'auto', got {self.protect_layers!r}")
            object.__setattr__(self, "protect_layers", tuple(int(i) for i in self.protect_layers))
        if self.gqa not in GQA_MODES:
            raise ValueError(f"gqa must be one of {GQA_MODES}, got {self.gqa!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.uniform_widths and self.protect_layers == AUTO:
            object.__setattr__(self, "protect_layers", None)  # the same widths everywhere: no layer is left whole
        if self.uniform_widths and self.protect_layers:
            raise ValueError(f"uniform_widths keeps the same widths in every layer, so it cannot leave layers "
                             f"{self.protect_layers} unpruned: pass protect_layers=None (CLI: --protect with no value)")
        if self.round_to not in (None, AUTO) and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise ValueError(f"round_to must be a positive int, None or 'auto', got {self.round_to!r}")
        object.__setattr__(self, "reconstruct", as_refit(self.reconstruct))
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.calibration_samples < 1 or self.calibration_len < 2:
            raise ValueError(f"calibration_samples >= 1 and calibration_len >= 2 needed, got "
                             f"{self.calibration_samples} and {self.calibration_len}")
        if not isinstance(self.importance, (str, Method)):
            raise ValueError(f"importance must be a name or a Method (Taylor(order=1), Magnitude(p=2), HyWIA(), ...), "
                             f"got {type(self.importance).__name__}")
        if self.renormalising not in RENORMALISING:
            raise ValueError(f"renormalising must be one of {RENORMALISING}, got {self.renormalising!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")

    def to_dict(self) -> dict:
        """The settings as a JSON-ready dict (the importance method as its own dict)."""
        d = asdict(self)
        d["importance"] = method_to_dict(self.importance)
        d["reconstruct"] = self.reconstruct.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PruneConfig":
        """The config of a saved plan; one written before `Refit` has its flat refit fields read into one."""
        d = from_old_fields(d)
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "importance" in d:
            d["importance"] = method_from_dict(d["importance"])
        return cls(**d)


def protected_layers(spec, n_layers: int) -> set[int]:
    """Negative indices count from the end: (0, 1, 2, -1) is LLM-Pruner's LLaMA-7B choice.

    "auto" protects the first n // 10 and the last n // 15 layers (0-2 and the last 2 of 30 or 32
    layers, as LLM-Pruner's setting; none of a model of fewer than 10 layers)."""
    if spec == AUTO:
        spec = tuple(range(n_layers // 10)) + tuple(range(-(n_layers // 15), 0))
    return {i % n_layers for i in (spec or ())} if n_layers else set()


def mlp_rounding(spec, n_units: int) -> int | None:
    """The multiple MLP widths are rounded to: `spec`, or for "auto" 64 when the layer has 512+ channels."""
    if spec == AUTO:
        return 64 if n_units >= 512 else None
    return spec
