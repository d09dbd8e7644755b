"""`Refit`: the settings of the reconstruction stage (ReconstructLayersPass), frozen and validated.

`PruneConfig(reconstruct=Refit(mode="lstsq", ridge="auto", ...))`; a mode name alone ("lstsq", "bias",
"none") is shorthand for `Refit(mode=name)`. docs/reconstruction.md explains each setting.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

MODES = ("none", "bias", "lstsq")     # no refit, FLAP-style bias correction, ridge least squares
WEIGHTINGS = ("residual", "uniform")  # token weights: 1 / mean square of the residual stream, or all alike
TARGETS = ("stream", "output")        # match the dense residual stream after the add, or the dense output only
PRECISIONS = ("float32", "bfloat16")  # what the forward passes compute in (the fits stay float64)
AUTO = "auto"

# The flat PruneConfig fields of plan files written before `Refit`, and the field each became.
OLD_FIELDS = {"reconstruct": "mode", "ridge": "ridge", "weighting": "weighting", "refit_target": "target",
              "refit_precision": "precision", "reconstruct_samples": "samples"}


@dataclass(frozen=True)
class Refit:
    """How the projections that lost inputs are refitted after the rewrite.

    mode: "lstsq" (ridge regression towards the sliced weights), "bias" (bias correction only) or "none";
    ridge: a strength >= 0, or "auto" (chosen per projection on held-out calibration rows);
    weighting: "residual" or "uniform" token weights; target: "stream" or "output";
    precision: "float32" or "bfloat16" (the forward passes under autocast);
    samples: packaged calibration windows the refit reads when the caller gives none.
    """
    mode: str = "lstsq"  # on SmolLM2 with the packaged C4 it helps WikiText-2 at 20% and 50% on every draw
    ridge: float | str = AUTO
    weighting: str = "residual"
    target: str = "stream"
    precision: str = "float32"
    samples: int = 64  # enough windows for the ~1,500 inputs of the widest projection

    def __post_init__(self):
        for name, choices in (("mode", MODES), ("weighting", WEIGHTINGS), ("target", TARGETS),
                              ("precision", PRECISIONS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"Refit.{name} must be one of {choices}, got {getattr(self, name)!r}")
        ok_ridge = self.ridge == AUTO or (isinstance(self.ridge, (int, float)) and not isinstance(self.ridge, bool)
                                          and self.ridge >= 0)
        if not ok_ridge:
            raise ValueError(f"Refit.ridge must be a number >= 0 or 'auto', got {self.ridge!r}")
        if not isinstance(self.samples, int) or isinstance(self.samples, bool) or self.samples < 1:
            raise ValueError(f"Refit.samples must be an int >= 1, got {self.samples!r}")

    @property
    def enabled(self) -> bool:
        """Whether this refit changes any weight (mode other than "none")."""
        return self.mode != "none"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Refit":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"Refit has no setting(s) {unknown}; it has {[f.name for f in fields(cls)]}")
        return cls(**d)


def as_refit(value) -> Refit:
    """`value` as settings: a `Refit` as it is, a mode name as `Refit(mode=name)`, a dict (a saved plan) read back."""
    if isinstance(value, Refit):
        return value
    if isinstance(value, str):
        if value not in MODES:
            raise ValueError(f"reconstruct must be a Refit(...) or one of {MODES}, got {value!r}")
        return Refit(mode=value)
    if isinstance(value, dict):
        return Refit.from_dict(value)
    raise ValueError(f"reconstruct must be a Refit(...) or one of {MODES}, got {type(value).__name__}")


def from_old_fields(config: dict) -> dict:
    """A saved config dict of a plan written before `Refit`, with its flat refit fields folded into
    "reconstruct" (a dict of `Refit` settings); a newer one is returned as it is."""
    if not isinstance(config.get("reconstruct"), str):
        return config
    old = {k: config[k] for k in OLD_FIELDS if k in config}
    rest = {k: v for k, v in config.items() if k not in OLD_FIELDS}
    return {**rest, "reconstruct": {OLD_FIELDS[k]: v for k, v in old.items()}}
