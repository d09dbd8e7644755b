"""Which config fields of a transformers class carry the pruned widths, learned from the class itself.

No table of model types: every integer field of the base config is changed once and the class is
built on the meta device, which shows the tensor dimensions that field sets (its influence). The
fields whose influence meets a pruned dimension are solved together with the fields they share
dimensions with: each candidate value (the base value scaled by a pruned dimension's ratio) is built
on the meta device until every dimension they set has its pruned size. Fields that set no tensor
shape (a head count when the class derives head size = hidden / heads) are varied only after the
shapes are met, since only the logits can tell them (`fxprune/export/hf.py` runs that proof).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import itertools
import re
from dataclasses import dataclass

import torch

from fxprune.export.common import ExportError

KEEPERS = ("export_gguf (LLaMA family, per-layer widths) or export_program (.pt2, any model and plan) keeps "
           "this plan")
UNIFORM_HINT = ("plan with PruneConfig(uniform_widths=True) (`fxprune prune --uniform-widths`) to get the same "
                "widths in every layer, or " + KEEPERS)
LAYER_INDEX = re.compile(r"\.(\d+)\.")
MAX_COMBINATIONS = 256  # meta builds for one set of fields that share dimensions


@dataclass(frozen=True)
class Widths:
    """What the solver knows: the class, its base config, the pruned tensor shapes in the class's layout,
    the shapes the base config gives, and each probed field's influence ({(name, dim)})."""
    cls: type
    base: dict
    target: dict
    original: dict
    influence: dict

    @functools.cached_property
    def changed(self) -> dict:
        """{(name, dim): (original size, pruned size)} over the tensors the class and the pruned model share."""
        out = {}
        for name, shape in self.target.items():
            before = self.original.get(name)
            if before is not None:
                out.update({(name, d): (a, b) for d, (a, b) in enumerate(zip(before, shape)) if a != b})
        return out

    def width_fields(self) -> dict:
        changed = self.changed
        return {f: dims for f, dims in self.influence.items() if dims & changed.keys()}

    def unshaped_candidates(self) -> dict:
        """{field: candidate values} of the fields that set no tensor shape but divide a pruned width
        (a head count the class only divides the hidden size by), scaled by the pruned ratios."""
        out = {f: sorted(self.scaled(self.base[f]) - {self.base[f]}, reverse=True) for f in self.unshaped_counts()}
        return {f: v for f, v in out.items() if v}

    def unshaped_counts(self) -> list[str]:
        """Fields that set no tensor shape and divide a pruned dimension's size; token ids index the
        vocabulary, they never count units."""
        return [f for f, dims in self.influence.items() if not dims and self.base[f] > 1 and not f.endswith("_token_id")
                and any(a % self.base[f] == 0 for a, _ in self.changed.values())]

    def scaled(self, value: int) -> set:
        """`value` times each pruned ratio, where that gives a whole number."""
        return {value * b // a for a, b in self.changed.values() if value * b % a == 0 and value * b >= a}


def model_class(base: dict) -> type:
    """The base model's transformers class, or ExportError when transformers cannot build it from a config."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    module, _, name = base["architecture"].rpartition(".")
    if not module.startswith("transformers."):
        raise ExportError(f"export to hf needs a class transformers builds from a config; {base['architecture']} "
                          f"is not part of transformers (local or remote code, which AutoModelForCausalLM cannot "
                          f"build from config.json); {KEEPERS}")
    cls = getattr(importlib.import_module(module), name)
    if cls.config_class not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ExportError(f"AutoModelForCausalLM has no class for model type {base['config'].get('model_type')!r} "
                          f"({cls.__name__}), so the checkpoint would not load; {KEEPERS}")
    return cls


@contextlib.contextmanager
def quiet():
    """Silence transformers' config warnings while probing configs nobody will use."""
    import transformers
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)


def build(cls, config: dict, device: str = "meta"):
    """`cls` built from `config` without initialising weights (on the meta device: shapes only)."""
    from transformers.initialization import no_init_weights
    with quiet(), no_init_weights(), torch.device(device):
        return cls(cls.config_class.from_dict(dict(config)))


def meta_shapes(cls, config: dict) -> dict:
    return {k: tuple(v.shape) for k, v in build(cls, config).state_dict().items()}


def try_shapes(cls, config: dict):
    try:
        return meta_shapes(cls, config)
    except Exception:  # noqa: BLE001 - a config the class rejects is a probe that tells nothing
        return None


def public_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def class_layout(cls, config: dict, shapes: dict) -> dict:
    """Pruned shapes in the class's layout: fxprune lifts every projection to an nn.Linear ([out, in]),
    GPT-2's Conv1D stores [in, out]."""
    from transformers.pytorch_utils import Conv1D
    conv = {n for n, m in build(cls, config).named_modules() if isinstance(m, Conv1D)}
    return {k: (s[::-1] if len(s) == 2 and k.rpartition(".")[0] in conv else s) for k, s in shapes.items()}


def influence(cls, config: dict, original: dict) -> dict:
    """{int field: {(name, dim)} its change changes}; fields the class rejects every change of are left out."""
    out = {}
    for field, value in config.items():
        if type(value) is not int or value < 1:
            continue
        for trial in (2 * value, value // 2, value + 1):
            shapes = try_shapes(cls, {**config, field: trial}) if 0 < trial != value else None
            if shapes is not None:
                out[field] = {(k, d) for k, s in shapes.items() for d in range(len(s))
                              if k not in original or len(original[k]) != len(s) or original[k][d] != s[d]}
                out[field] |= {(k, 0) for k in original if k not in shapes}
                break
    return out


def analyse(cls, base_config: dict, shapes: dict) -> Widths:
    config = public_config(base_config)
    original = meta_shapes(cls, config)
    target = {k: s for k, s in class_layout(cls, config, shapes).items() if k in original}
    ranks = [k for k, s in target.items() if len(s) != len(original[k])]
    if ranks:
        raise ExportError(f"the pruned tensors {ranks[:4]} have other ranks than in {cls.__name__}; {KEEPERS}")
    return Widths(cls, config, target, original, influence(cls, config, original))


def describe(dim, changed: dict | None = None) -> str:
    name, d = dim
    text = f"{name} dim {d}"
    return text + (f" ({changed[dim][0]} -> {changed[dim][1]})" if changed and dim in changed else "")


def check_uniform(w: Widths) -> None:
    """Per-layer widths: one config value per field cannot hold them; name the layers and the fields."""
    by_pattern = {}
    for name, shape in w.target.items():
        match = LAYER_INDEX.search(name)
        if match and name in w.original:
            pattern = name[:match.start()] + ".{i}." + name[match.end():]
            for d, size in enumerate(shape):
                by_pattern.setdefault((pattern, d), {})[int(match.group(1))] = (w.original[name][d], size)
    lines, seen = [], set()
    for (pattern, d), per_layer in by_pattern.items():
        layers = sorted(per_layer)
        sizes = [per_layer[i][1] for i in layers]
        if len({per_layer[i][0] for i in layers}) > 1 or len(set(sizes)) == 1:
            continue
        name0 = pattern.replace("{i}", str(layers[0]))
        fields = tuple(sorted(f for f, dims in w.influence.items() if (name0, d) in dims)) or ("no config field",)
        if fields not in seen:
            seen.add(fields)
            differ = [i for i, s in zip(layers, sizes) if s != sizes[0]]
            lines.append(f"  {pattern} dim {d} (set by {', '.join(fields)}) per layer: {sizes} "
                         f"(layers {differ} differ from layer {layers[0]})")
    if lines:
        raise ExportError(f"the plan keeps different widths in different layers, which a {w.cls.__name__} config "
                          "cannot hold (one value per field):\n" + "\n".join(lines) + f"\nTo export to hf, {UNIFORM_HINT}.")


def components(fields: dict) -> list[list[str]]:
    """Fields grouped so that no two groups set the same tensor dimension."""
    groups: list[tuple[list, set]] = []
    for field, dims in fields.items():
        joined = [g for g in groups if g[1] & dims]
        merged = ([field] + [f for g in joined for f in g[0]], set(dims).union(*(g[1] for g in joined)))
        groups = [g for g in groups if g not in joined] + [merged]
    return [sorted(g[0], key=list(fields).index) for g in groups]


def solve_component(w: Widths, fields: list[str]) -> list[dict]:
    """Every assignment of `fields` (values from the pruned ratios) whose meta build gives the pruned size
    of every dimension they set."""
    dims = set().union(*(w.influence[f] for f in fields))
    # any pruned ratio, not only those of the field's own dims: a fused [q heads | k | v] dim scales by
    # neither the head count's ratio nor the hidden size's
    options = [sorted(w.scaled(w.base[f]) | {w.base[f]}) for f in fields]
    combos = [c for c in itertools.product(*options) if any(v != w.base[f] for f, v in zip(fields, c))]
    if len(combos) > MAX_COMBINATIONS:
        raise ExportError(f"{len(combos)} value combinations of {fields} to try; too many to derive the "
                          f"{w.cls.__name__} config. {KEEPERS}")
    solutions = []
    for combo in combos:
        shapes = try_shapes(w.cls, {**w.base, **dict(zip(fields, combo))})
        if shapes is not None and shapes.keys() == w.original.keys() and all(
                w.target[k][d] == shapes[k][d] for k, d in dims if k in w.target):
            solutions.append({f: v for f, v in zip(fields, combo) if v != w.base[f]})
    return solutions


def refuse_component(w: Widths, fields: list[str]) -> ExportError:
    changed = w.changed
    dims = set().union(*(w.influence[f] for f in fields))
    pruned = sorted(dims & changed.keys())
    kept = sorted(d for d in dims - changed.keys() if d[0] in w.target)
    derived = w.unshaped_counts()
    text = (f"a {w.cls.__name__} config cannot state the pruned width of {describe(pruned[0], changed)}"
            f"{f' (and {len(pruned) - 1} more tensor dimensions)' if len(pruned) > 1 else ''}: the config fields "
            f"that set it ({', '.join(fields)}) cannot take values that give the pruned sizes")
    if kept:
        text += f" while keeping {describe(kept[0])} at {w.target[kept[0][0]][kept[0][1]]}, which they also set"
    text += " (the class derives these widths from one another, e.g. head size = hidden / heads, MLP = 4 x hidden)"
    if derived:
        text += (f"; {', '.join(derived)} set{'s' if len(derived) == 1 else ''} no tensor shape (a count the "
                 "class divides other widths by)")
    return ExportError(f"{text}. {KEEPERS}.")


def shape_solutions(w: Widths) -> list[dict]:
    """Config changes that give every shared tensor its pruned shape, those changing more fields first
    (removing whole units changes counts, which a change of one size field can mimic); ExportError if none."""
    check_uniform(w)
    changed, fields = w.changed, w.width_fields()
    unset = sorted(set(changed) - set().union(set(), *fields.values()))
    if unset:
        raise ExportError(f"no {w.cls.__name__} config field sets {describe(unset[0], changed)}, which the plan "
                          f"changes; {KEEPERS}")
    per_component = []
    for group in components(fields):
        solutions = solve_component(w, group)
        if not solutions:
            raise refuse_component(w, group)
        per_component.append(solutions)
    merged = [{k: v for part in parts for k, v in part.items()} for parts in itertools.product(*per_component)]
    return sorted(merged, key=len, reverse=True)


def candidate_configs(w: Widths) -> list[dict]:
    """Full configs to prove by the logits, in order: each shape solution as it is, then with one or two
    shape-free count fields scaled (a field that cannot change the logits cannot fix a failed proof)."""
    counts = w.unshaped_candidates()
    variants = [{}] + [{f: v} for f, values in counts.items() for v in values]
    variants += [{f: a, g: b} for f, g in itertools.combinations(counts, 2) for a in counts[f] for b in counts[g]]
    solutions = shape_solutions(w)
    return [{**w.base, **solution, **variant} for variant in variants for solution in solutions]
