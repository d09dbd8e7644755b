"""Importance methods as frozen, validated settings: what `score(dg, groups, method)` accepts.

Each settings class names the registry entry that computes it (`estimator`, an `ESTIMATORS` key);
strings are shorthands (`as_method`): "l1" is `Magnitude(p=1)`, "element1" is `Taylor(order=1)`,
"hywia" is `HyWIA()`, and any other registered name is `Registered(name)`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields


def _check(ok: bool, what: str, value) -> None:
    if not ok:
        raise ValueError(f"{what}, got {value!r}")


@dataclass(frozen=True)
class Method:
    """Base of the importance settings. `estimator`: the `ESTIMATORS` entry that scores one member."""

    @property
    def estimator(self) -> str:
        """Name of the registered estimator these settings run."""
        raise NotImplementedError(f"{type(self).__name__} names no estimator")


@dataclass(frozen=True)
class Magnitude(Method):
    """Data-free: per unit, the sum of |W| (p=1, "l1") or of W**2 (p=2, "l2")."""
    p: int = 2

    def __post_init__(self):
        _check(self.p in (1, 2) and not isinstance(self.p, bool), "Magnitude.p must be 1 or 2", self.p)

    @property
    def estimator(self) -> str:
        return f"l{self.p}"


@dataclass(frozen=True)
class Taylor(Method):
    """Element-wise Taylor expansion of the calibration loss (LLM-Pruner): order 1 is sum |W*G|
    ("element1"), order 2 adds the diagonal Fisher term: sum |W*G - 0.5*W*H*W| ("element2", "mix")."""
    order: int = 1

    def __post_init__(self):
        _check(self.order in (1, 2) and not isinstance(self.order, bool), "Taylor.order must be 1 or 2", self.order)

    @property
    def estimator(self) -> str:
        return f"element{self.order}"


@dataclass(frozen=True)
class Vector(Method):
    """Structure-level first-order Taylor: |sum over the unit of W*G| ("vector")."""

    @property
    def estimator(self) -> str:
        return "vector"


@dataclass(frozen=True)
class Fisher(Method):
    """The second-order term alone: sum |W*H*W| ("second", LLM-Pruner's param_second)."""

    @property
    def estimator(self) -> str:
        return "second"


@dataclass(frozen=True)
class Random(Method):
    """Uniform [0, 1) values, seeded by (seed, group id, member index) ("random")."""
    seed: int = 0

    def __post_init__(self):
        _check(isinstance(self.seed, int) and not isinstance(self.seed, bool), "Random.seed must be an int",
               self.seed)

    @property
    def estimator(self) -> str:
        return "random"


@dataclass(frozen=True)
class Registered(Method):
    """An estimator registered by name with `register_estimator` and no settings class of its own."""
    name: str

    def __post_init__(self):
        _check(isinstance(self.name, str) and bool(self.name), "Registered.name must be a non-empty str", self.name)

    @property
    def estimator(self) -> str:
        return self.name


@dataclass(frozen=True)
class Fluctuation(Method):
    """FLAP's fluctuation metric: variance of each input channel of the consuming projection times the
    squared norm of its weight column ("flap"); activations only, no backward pass."""

    @property
    def estimator(self) -> str:
        return "flap"


@dataclass(frozen=True)
class Wanda(Method):
    """Structured Wanda (Wanda-sp): sum over the unit of |W| times the input channel's norm ("wanda")."""

    @property
    def estimator(self) -> str:
        return "wanda"


@dataclass(frozen=True)
class OBS(Method):
    """Refit-aware importance ("obs", `fxprune.scoring.obs`): the output error a unit's removal leaves once
    the projection's other inputs are refitted by least squares, removed greedily (structured optimal brain
    surgeon, as ZipLM / SlimGPT); `damp` regularises the inputs' Gram matrix by that fraction of its mean
    diagonal. The ranking the `reconstruct="lstsq"` refit is made for; activations only, no backward pass."""
    damp: float = 0.01

    def __post_init__(self):
        _check(isinstance(self.damp, (int, float)) and not isinstance(self.damp, bool) and self.damp > 0,
               "OBS.damp must be > 0", self.damp)

    @property
    def estimator(self) -> str:
        return "obs"


RELAXATIONS = ("soft", "hard")


# HyWIA's granularities and their estimators: the paper's Taylor pair, plus an activation-aware pair that
# ranks better at some ratios (reconstruction_table.md), so the validation can pick it.
HYWIA_GRANULARITIES = {"fine": "element1", "coarse": "vector", "wanda": "wanda", "flap": "flap"}


@dataclass(frozen=True)
class HyWIA(Method):
    """Hybrid-grained weight importance (see `fxprune.scoring.hywia`): the `granularities` (element1, vector,
    Wanda-sp, FLAP by default) blended by an attention learned on the masked model's LM loss for `steps`
    Adam(`lr`) steps, validated against each granularity alone on held-out calibration rows (by the masked
    model's loss, or, in `fxprune.plan` when the plan refits and `after_refit`, by the refitted model's).
    `granularities=("fine", "coarse")` is the paper's pair."""
    steps: int = 30
    lr: float = 0.05
    temperature: float = 0.25
    dim: int = 8
    relaxation: str = "hard"
    validate: bool = True
    holdout: float = 0.25   # fraction of calibration rows kept out of training, for the validation
    # True: when the plan refits, judge the candidates after that refit (fxprune.planning.refit_choice).
    # Off by default: the extra refits cost more than they gained (docs/hywia.md).
    after_refit: bool = False
    granularities: tuple = tuple(HYWIA_GRANULARITIES)

    def __post_init__(self):
        _check(isinstance(self.steps, int) and self.steps >= 0, "HyWIA.steps must be an int >= 0", self.steps)
        _check(isinstance(self.dim, int) and self.dim >= 1, "HyWIA.dim must be an int >= 1", self.dim)
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and value > 0, f"HyWIA.{name} must be > 0", value)
        _check(isinstance(self.holdout, (int, float)) and 0 <= self.holdout < 1, "HyWIA.holdout must be in [0, 1)",
               self.holdout)
        for name in ("validate", "after_refit"):
            _check(isinstance(getattr(self, name), bool), f"HyWIA.{name} must be True or False", getattr(self, name))
        _check(self.relaxation in RELAXATIONS, f"HyWIA.relaxation must be one of {RELAXATIONS}", self.relaxation)
        kinds = tuple(self.granularities) if isinstance(self.granularities, (list, tuple)) else ()
        _check(len(kinds) >= 1 and len(set(kinds)) == len(kinds) and set(kinds) <= set(HYWIA_GRANULARITIES),
               f"HyWIA.granularities must be distinct names among {tuple(HYWIA_GRANULARITIES)}", self.granularities)
        object.__setattr__(self, "granularities", kinds)  # a JSON list (a saved config) back to a tuple

    @property
    def estimator(self) -> str:
        return "hywia"


SHORTHANDS = {"l1": Magnitude(1), "l2": Magnitude(2), "vector": Vector(), "element1": Taylor(1),
              "element2": Taylor(2), "mix": Taylor(2), "second": Fisher(), "random": Random(), "hywia": HyWIA(),
              "flap": Fluctuation(), "wanda": Wanda(), "obs": OBS()}


def as_method(method, known=(), seed: int = 0) -> Method:
    """Settings for `method`: a `Method` as it is, or a shorthand string. `known`: the registered names.

    The "random" shorthand takes `seed`; other settings are given as settings (`HyWIA(steps=10)`).
    """
    if isinstance(method, Method):
        return method
    if not isinstance(method, str):
        raise ValueError(f"importance must be a name or a Method (Taylor(order=1), Magnitude(p=2), HyWIA(), ...), "
                         f"got {type(method).__name__}")
    if method in SHORTHANDS:
        base = SHORTHANDS[method]
        if isinstance(base, Random):
            return Random(seed)
        return base
    if method in known:
        return Registered(method)
    raise ValueError(f"unknown scoring method {method!r}; choose one of {sorted(set(known) | set(SHORTHANDS))}")


def _subclasses(cls) -> dict[str, type]:
    out = {}
    for sub in cls.__subclasses__():
        out[sub.__name__] = sub
        out.update(_subclasses(sub))
    return out


def method_to_dict(method):
    """JSON form of an importance: a name stays a name; settings become {"method": class, "estimator", fields}."""
    if isinstance(method, str):
        return method
    return {"method": type(method).__name__, "estimator": method.estimator,
            **{f.name: getattr(method, f.name) for f in fields(method)}}


def method_from_dict(d):
    """Inverse of `method_to_dict`. Settings of a class not defined in this process (a user's own,
    not imported) come back as `Registered(estimator)`, which selects the same registry entry."""
    if isinstance(d, str):
        return d
    d = dict(d)
    cls, estimator = _subclasses(Method).get(d.pop("method")), d.pop("estimator")
    if cls is None:
        return Registered(estimator)
    return cls(**d)
