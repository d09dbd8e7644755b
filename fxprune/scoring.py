"""Importance of the prunable units of fxprune groups.

`score(dg, groups, method)` gives one value per unit of every group: a higher value means a more
important unit, one to keep. A method is either an *estimator* from the registry `ESTIMATORS`, or
``"hywia"`` (see `hywia`).

An estimator scores the units of ONE member (one dimension of one parameter) of a group; `score`
then aggregates the per-member values over the group's members (`aggregation`: sum, mean, max,
prod, or last: the member used last in graph order, e.g. o_proj / down_proj / lm_head). An
estimator is a callable ``(stats: UnitStats) -> Tensor[n_units]``; register your own with
`register_estimator`. The built-in ones follow LLM-Pruner (Ma et al., 2023), with W the weight,
G the gradient of the calibration loss and H the diagonal Fisher approximation of the Hessian,
``H = sum_n g_n**2 / N`` over per-sample gradients g_n:

    random    uniform [0, 1) values, seeded by (seed, group id, member index)
    l1        sum over the unit of |W|
    l2        sum over the unit of W**2
    vector    |sum over the unit of W*G|                  (LLM-Pruner "vectorize", first order)
    element1  sum over the unit of |W*G|                  (LLM-Pruner "param_first")
    element2  sum over the unit of |W*G - 0.5*W*H*W|      (the paper's element-wise 2nd order)
    mix       the same as element2: LLM-Pruner's code names this formula "param_mix"
              (salience = W*G - 0.5*W*acc_grad*W); kept under both names
    second    sum over the unit of |W*H*W|                (LLM-Pruner "param_second")

The calibration loss is the causal LM loss (next-token cross entropy, mean over the target tokens
of a chunk of `batch_size` samples), averaged over chunks weighted by their number of samples: with
equal lengths and no padding this is the mean token loss over the whole calibration set, the loss
LLM-Pruner differentiates. G is its gradient (a mean, not a sum over batches, so that the first and
second order terms of element2 keep the same scale however many batches are given). The user's
model is never modified: gradients are taken with `torch.func.functional_call` on detached
tensors and `torch.autograd.grad`, so no ``.grad`` is ever set on the model's parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from fxprune.groups import DependencyGraph, Group, Member

__all__ = ["ESTIMATORS", "AGGREGATIONS", "UnitStats", "GradientStats", "HyWIAResult", "register_estimator",
           "unit_sum", "compute_gradients", "score", "hywia", "output_projection_members"]

AGGREGATIONS = ("sum", "mean", "max", "prod", "last")
ESTIMATORS: dict[str, Callable] = {}
MASKABLE_KINDS = ("heads", "kv_groups", "group_heads", "mlp")


# -- the estimators --------------------------------------------------------------------------------

def unit_sum(x: torch.Tensor, dim: int, unit_of: torch.Tensor, n_units: int) -> torch.Tensor:
    """Per-unit sums of an elementwise tensor `x`: all positions of a unit along `dim`, all other dims.

    Positions whose `unit_of` is -1 belong to no unit and are ignored.
    """
    if x.shape[dim] != unit_of.numel():
        raise ValueError(f"unit_of has {unit_of.numel()} entries but dimension {dim} of the tensor "
                         f"has size {x.shape[dim]}")
    per_position = x.movedim(dim, 0).reshape(x.shape[dim], -1).sum(1)
    unit_of = unit_of.to(per_position.device)
    keep = unit_of >= 0
    out = per_position.new_zeros(n_units)
    return out.index_add_(0, unit_of[keep], per_position[keep])


@dataclass
class UnitStats:
    """What an estimator sees of one member of a group.

    `weight` is the member's tensor (float32, on the compute device; never modify it in place),
    `grad` the gradient of the calibration loss (or None if the estimator did not ask for it),
    `sq_grad` the mean over calibration samples of the squared per-sample gradients (or None).
    """
    group: Group
    member: Member
    index: int                       # position of the member in group.members
    weight: torch.Tensor
    grad: torch.Tensor | None = None
    sq_grad: torch.Tensor | None = None
    seed: int = 0

    @property
    def name(self) -> str:
        return self.member.name

    @property
    def dim(self) -> int:
        return self.member.dim

    @property
    def unit_of(self) -> torch.Tensor:
        return self.member.unit_of

    @property
    def n_units(self) -> int:
        return self.group.n_units

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum an elementwise tensor shaped like `weight` over each unit -> Tensor[n_units]."""
        return unit_sum(x, self.dim, self.unit_of, self.n_units)

    def need(self, what: str) -> torch.Tensor:
        value = getattr(self, what)
        if value is None:
            raise ValueError(f"this estimator needs `{what}`; declare it with register_estimator(name, needs=...)")
        return value


def register_estimator(name: str, needs: Iterable[str] = ()):
    """Decorator: register `fn(stats: UnitStats) -> Tensor[n_units]` as estimator `name`.

    `needs` lists what the estimator reads besides the weight: "grad" and/or "sq_grad" (the latter
    costs one forward and backward pass per calibration sample).
    """
    needs = frozenset(needs)
    unknown = needs - {"grad", "sq_grad"}
    if unknown:
        raise ValueError(f"unknown needs {sorted(unknown)}; known: 'grad', 'sq_grad'")

    def wrap(fn):
        fn.needs = needs
        ESTIMATORS[name] = fn
        return fn
    return wrap


@register_estimator("random")
def _random(stats: UnitStats) -> torch.Tensor:
    seed = (int(stats.seed) * 1_000_003 + stats.group.id * 1_009 + stats.index) % (2 ** 63)
    return torch.rand(stats.n_units, generator=torch.Generator().manual_seed(seed)).to(stats.weight.device)


@register_estimator("l1")
def _l1(stats: UnitStats) -> torch.Tensor:
    return stats.reduce(stats.weight.abs())


@register_estimator("l2")
def _l2(stats: UnitStats) -> torch.Tensor:
    return stats.reduce(stats.weight.pow(2))


@register_estimator("vector", needs=("grad",))
def _vector(stats: UnitStats) -> torch.Tensor:
    return stats.reduce(stats.weight * stats.need("grad")).abs()


@register_estimator("element1", needs=("grad",))
def _element1(stats: UnitStats) -> torch.Tensor:
    return stats.reduce((stats.weight * stats.need("grad")).abs())


def _second_order(stats: UnitStats) -> torch.Tensor:
    w = stats.weight
    return w * stats.need("sq_grad") * w


@register_estimator("element2", needs=("grad", "sq_grad"))
def _element2(stats: UnitStats) -> torch.Tensor:
    return stats.reduce((stats.weight * stats.need("grad") - 0.5 * _second_order(stats)).abs())


@register_estimator("mix", needs=("grad", "sq_grad"))
def _mix(stats: UnitStats) -> torch.Tensor:
    # LLM-Pruner's "param_mix": salience = W*G - 0.5 * W*acc_grad*W, then |.| summed per unit.
    return _element2(stats)


@register_estimator("second", needs=("sq_grad",))
def _second(stats: UnitStats) -> torch.Tensor:
    return stats.reduce(_second_order(stats).abs())


# -- calibration data and the LM loss --------------------------------------------------------------

def _batches(calibration, vocab_size=None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Validated (input_ids [B, L], attention_mask or None) pairs."""
    if calibration is None:
        return []
    if isinstance(calibration, (torch.Tensor, dict)):
        calibration = [calibration]
    out = []
    for i, item in enumerate(calibration):
        mask = None
        if isinstance(item, dict):
            if "input_ids" not in item:
                raise ValueError(f"calibration item {i} is a dict without 'input_ids' (keys: {sorted(item)})")
            ids, mask = item["input_ids"], item.get("attention_mask")
        else:
            ids = item
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"calibration item {i}: expected a LongTensor of input_ids [batch, seq] or a dict "
                             f"with 'input_ids', got {type(ids).__name__}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"calibration item {i}: input_ids must be an integer tensor (token ids), "
                             f"got dtype {ids.dtype} with shape {tuple(ids.shape)}")
        if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
            raise ValueError(f"calibration item {i}: input_ids must have shape [batch >= 1, seq >= 2], "
                             f"got shape {tuple(ids.shape)}")
        if vocab_size is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"calibration item {i}: token ids must lie in [0, {vocab_size}), "
                             f"got values in [{int(ids.min())}, {int(ids.max())}]")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
                got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"calibration item {i}: attention_mask must be a tensor shaped like input_ids "
                                 f"{tuple(ids.shape)}, got {got}")
        out.append((ids.long(), None if mask is None else mask.long()))
    return out


def _vocab_size(dg) -> int | None:
    """The model config's vocab_size, else the rows of the weight read by the first embedding op."""
    vocab = getattr(getattr(dg, "model_config", None), "vocab_size", None)
    if vocab is not None:
        return int(vocab)
    for node in dg.gm.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", "").split(".")[0] == "embedding":
            src = node.args[0]
            if isinstance(src, torch.fx.Node) and src.op == "get_attr":
                weight = dg.parameters.get(dg.aliases.get(src.target, src.target))
                if weight is not None and weight.dim() == 2:
                    return int(weight.shape[0])
            return None
    return None


def _chunks(batches, size):
    for ids, mask in batches:
        for start in range(0, ids.shape[0], size):
            yield ids[start:start + size], None if mask is None else mask[start:start + size]


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross entropy, mean over the target tokens whose attention_mask is 1."""
    logits = logits[:, :-1].float()
    target = ids[:, 1:].to(logits.device)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    if mask is None:
        return ce.mean()
    valid = (mask[:, 1:] != 0).to(logits.device).reshape(-1).to(ce.dtype)
    return (ce * valid).sum() / valid.sum().clamp_min(1)


def _logits(out):
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


# -- running the captured graph on given tensors -----------------------------------------------------

class _Runner(torch.fx.Interpreter):
    """Interpreter reading parameters and buffers from a dict (for checkpointed segments)."""

    def __init__(self, dg: DependencyGraph, tensors: dict[str, torch.Tensor]):
        super().__init__(dg.gm, garbage_collect_values=False)
        self.tensors, self.aliases = tensors, dg.aliases

    def fetch_attr(self, target):
        name = self.aliases.get(target, target)
        if name in self.tensors:
            return self.tensors[name]
        return super().fetch_attr(target)

    def call_module(self, target, args, kwargs):
        module = super().fetch_attr(target)
        local = {}
        for kind in (module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)):
            for name, _ in kind:
                full = f"{target}.{name}"
                full = self.aliases.get(full, full)
                if full in self.tensors:
                    local[name] = self.tensors[full]
        return torch.func.functional_call(module, local, args, kwargs)

    def run_in(self, node, env):
        self.env = env
        return self.run_node(node)


def _forward_checkpointed(dg, tensors, ids, mask, segments=None):
    """The graph split into ~sqrt(n) contiguous segments, each under activation checkpointing."""
    graph = dg.gm.graph
    nodes = list(graph.nodes)
    inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    env = {}
    for n in nodes:
        if n.op == "placeholder":
            if n.name in inputs:
                env[n] = inputs[n.name]
            elif n.args:
                env[n] = n.args[0]
            else:
                raise ValueError(f"checkpoint=True: unknown graph input {n.name!r}")
    body = [n for n in nodes if n.op not in ("placeholder", "output")]
    output = next(n for n in nodes if n.op == "output")
    k = segments or max(1, int(math.sqrt(len(body))))
    size = max(1, math.ceil(len(body) / k))
    chunks = [body[i:i + size] for i in range(0, len(body), size)]
    where = {n: ci for ci, chunk in enumerate(chunks) for n in chunk}
    last_use = {}
    for n in body + [output]:
        user = where.get(n, len(chunks))
        for src in n.all_input_nodes:
            last_use[src] = max(last_use.get(src, -1), user)
    runner = _Runner(dg, tensors)
    for ci, chunk in enumerate(chunks):
        inside = set(chunk)
        ins = list(dict.fromkeys(s for n in chunk for s in n.all_input_nodes if s not in inside))
        outs = [n for n in chunk if last_use.get(n, -1) > ci]

        def run(*values, chunk=chunk, ins=ins, outs=outs):
            local = dict(zip(ins, values))
            for n in chunk:
                local[n] = runner.run_in(n, local)
            return tuple(local[n] for n in outs)

        results = _checkpoint(run, *[env[n] for n in ins], use_reentrant=False)
        env.update(zip(outs, results))
        for n in [n for n in env if last_use.get(n, -1) <= ci and n.op != "placeholder"]:
            del env[n]
    flat = torch.fx.node.map_arg(output.args[0], lambda n: env[n])
    return graph.process_outputs(flat)


def _forward(dg, tensors, ids, mask, checkpoint=False):
    if mask is None:
        mask = torch.ones_like(ids)
    if checkpoint:
        out = _forward_checkpointed(dg, tensors, ids, mask, None if checkpoint is True else int(checkpoint))
    else:
        out = torch.func.functional_call(dg.gm, tensors, (ids,), {"attention_mask": mask, "use_cache": False})
    return _logits(out)


def _compute_device(dg, device):
    if device is not None:
        return torch.device(device)
    first = next(iter(dg.parameters.values()), None)
    return first.device if first is not None else torch.device("cpu")


def _tensors(dg, device, dtype, trainable=()):
    """Detached copies (views where no cast is needed) of the model's tensors; `trainable` ones require grad."""
    out = {}
    for name, t in dg.parameters.items():
        if t.device.type == "meta":
            raise ValueError(f"parameter {name} is on the meta device: scoring needs the model's real weights")
        cast = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        # detach(): a new tensor object (sharing storage), so requires_grad_ never touches the model's
        out[name] = t.detach().to(device=device, dtype=cast).requires_grad_(name in trainable)
    if device != _compute_device(dg, None):
        for name, b in dg.buffers.items():
            out[name] = b.detach().to(device)
    return out


# -- gradients ----------------------------------------------------------------------------------------

@dataclass
class GradientStats:
    """Gradients of the calibration loss w.r.t. some parameters (float32, on the compute device)."""
    grad: dict[str, torch.Tensor]
    sq_grad: dict[str, torch.Tensor] | None
    n_samples: int
    loss: float

    def covers(self, names, second_order: bool) -> bool:
        return all(n in self.grad for n in names) and (
            not second_order or (self.sq_grad is not None and all(n in self.sq_grad for n in names)))


def _member_names(dg, groups) -> list[str]:
    return list(dict.fromkeys(m.name for g in groups for m in g.members if m.name in dg.parameters))


def compute_gradients(dg: DependencyGraph, calibration, names=None, second_order: bool = False,
                      batch_size: int = 1, device=None, dtype=None, checkpoint: bool = False) -> GradientStats:
    """Gradients of the causal LM loss on `calibration` w.r.t. the parameters `names` (default: all
    members of all groups). Only those parameters get gradient buffers.

    With `second_order`, each sample gets its own forward and backward pass, giving the squared
    per-sample gradients summed and divided by N (the Fisher diagonal); G is then the mean of the
    per-sample gradients. Otherwise samples go in chunks of `batch_size` rows.
    `checkpoint=True` (or an int: the number of segments) recomputes activations in backward,
    keeping only segment boundaries alive: less memory for about one more forward pass.
    """
    batches = _batches(calibration, _vocab_size(dg))
    if not batches:
        raise ValueError("gradient-based scoring needs calibration data: an iterable of input_ids "
                         "LongTensors [batch, seq] or dicts with 'input_ids'")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    names = _member_names(dg, dg.groups) if names is None else [n for n in names if n in dg.parameters]
    device = _compute_device(dg, device)
    tensors = _tensors(dg, device, dtype, trainable=set(names))
    inputs = [tensors[n] for n in names]
    grad = {n: torch.zeros(tensors[n].shape, dtype=torch.float32, device=device) for n in names}
    sq = {n: torch.zeros_like(grad[n]) for n in names} if second_order else None
    n_samples, total = 0, 0.0
    for ids, mask in _chunks(batches, 1 if second_order else batch_size):
        ids = ids.to(device)
        mask = None if mask is None else mask.to(device)
        loss = lm_loss(_forward(dg, tensors, ids, mask, checkpoint), ids, mask)
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        rows = ids.shape[0]
        for n, g in zip(names, grads):
            if g is None:
                continue
            g = g.float()
            grad[n].add_(g, alpha=rows)
            if sq is not None:
                sq[n].addcmul_(g, g)
        n_samples += rows
        total += float(loss.detach()) * rows
    for n in names:
        grad[n].div_(n_samples)
        if sq is not None:
            sq[n].div_(n_samples)
    return GradientStats(grad, sq, n_samples, total / n_samples)


# -- scoring ------------------------------------------------------------------------------------------

def _first_use(dg) -> dict[str, int]:
    """Position in the graph of the first op reading each parameter."""
    pos = {}
    nodes = list(dg.gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    for i, node in enumerate(nodes):
        names = []
        if node.op == "get_attr":
            names = [node.target]
            where = min((order[u] for u in node.users), default=i)
        elif node.op == "call_module":
            module = dg.gm.get_submodule(node.target)
            names = [f"{node.target}.{p}" for p, _ in module.named_parameters(remove_duplicate=False)]
            where = i
        for name in names:
            name = dg.aliases.get(name, name)
            pos[name] = min(pos.get(name, where), where)
    return pos


def _resolve_groups(dg, groups) -> list[Group]:
    if groups is None:
        return list(dg.groups)
    if isinstance(groups, (Group, int)):
        groups = [groups]
    by_id = {g.id: g for g in dg.groups}
    out = []
    for g in groups:
        if isinstance(g, Group):
            out.append(g)
        elif isinstance(g, int) and g in by_id:
            out.append(by_id[g])
        else:
            raise ValueError(f"unknown group {g!r}: pass Group objects of this DependencyGraph or their ids")
    return out


def _aggregate(values: list[torch.Tensor], how: str, last: int) -> torch.Tensor:
    stacked = torch.stack(values)
    if how == "sum":
        return stacked.sum(0)
    if how == "mean":
        return stacked.mean(0)
    if how == "max":
        return stacked.amax(0)
    if how == "prod":
        return stacked.prod(0)
    return values[last]


def _estimate(dg, groups, estimator, aggregation, grads: GradientStats | None, seed, device):
    order = _first_use(dg) if aggregation == "last" else {}
    scores = {}
    for group in groups:
        values, uses = [], []
        for index, member in enumerate(group.members):
            if member.name not in dg.parameters:
                continue
            w = dg.parameters[member.name].detach().to(device=device, dtype=torch.float32)
            stats = UnitStats(group, member, index, w,
                              grad=None if grads is None else grads.grad.get(member.name),
                              sq_grad=None if grads is None or grads.sq_grad is None else grads.sq_grad.get(member.name),
                              seed=seed)
            v = estimator(stats)
            if not isinstance(v, torch.Tensor) or v.shape != (group.n_units,):
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"estimator returned {got} for group {group.id} ({group.kind}); "
                                 f"expected a tensor of shape ({group.n_units},)")
            values.append(v.float())
            uses.append(order.get(member.name, -1))
        if not values:
            scores[group.id] = torch.zeros(group.n_units)
            continue
        last = max(range(len(values)), key=lambda i: (uses[i], i))
        scores[group.id] = _aggregate(values, aggregation, last).detach().cpu()
    return scores


def score(dg: DependencyGraph, groups=None, method: str = "l2", calibration=None, aggregation: str = "sum",
          seed: int = 0, batch_size: int = 1, device=None, dtype=None, *, checkpoint: bool = False,
          gradients: GradientStats | None = None, ratio: float = 0.2, steps: int = 30, lr: float = 0.05,
          temperature: float = 0.25) -> dict[int, torch.Tensor]:
    """Importance of every unit of `groups` (default: all groups of `dg`): {group.id: Tensor[n_units]}.

    `method`: a name in ESTIMATORS or "hywia". `calibration`: an iterable of input_ids LongTensors
    [batch, seq] (or dicts with "input_ids" and optionally "attention_mask"), needed by the gradient
    methods (vector, element1, element2, mix, second, hywia). `aggregation` combines the members of
    a group: sum, mean, max, prod, or last (the member used last in graph order). `gradients`: reuse
    a `compute_gradients` result across methods. `ratio`, `steps`, `lr`, `temperature`: HyWIA only.
    Scores are float32 on the CPU; the model is never modified.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    groups = _resolve_groups(dg, groups)
    if method == "hywia":
        return hywia(dg, groups, calibration, ratio=ratio, aggregation=aggregation, seed=seed, steps=steps, lr=lr,
                     temperature=temperature, batch_size=batch_size, device=device, dtype=dtype,
                     checkpoint=checkpoint, gradients=gradients).scores
    if method not in ESTIMATORS:
        raise ValueError(f"unknown scoring method {method!r}; choose one of {sorted(ESTIMATORS) + ['hywia']}")
    estimator = ESTIMATORS[method]
    needs = getattr(estimator, "needs", frozenset())
    grads = _gradients_for(dg, groups, needs, method, calibration, gradients, batch_size, device, dtype, checkpoint)
    return _estimate(dg, groups, estimator, aggregation, grads, seed, _compute_device(dg, device))


def _gradients_for(dg, groups, needs, method, calibration, gradients, batch_size, device, dtype, checkpoint):
    if not needs:
        return None
    names = _member_names(dg, groups)
    second = "sq_grad" in needs
    if gradients is not None and gradients.covers(names, second):
        return gradients
    if calibration is None:
        raise ValueError(f"method {method!r} uses gradients of the LM loss: pass calibration=[input_ids, ...] "
                         "(LongTensors [batch, seq] or dicts with 'input_ids')")
    return compute_gradients(dg, calibration, names, second_order=second, batch_size=batch_size,
                             device=device, dtype=dtype, checkpoint=checkpoint)


# -- HyWIA ----------------------------------------------------------------------------------------------

def output_projection_members(dg: DependencyGraph, group: Group) -> list[Member]:
    """Members whose zeroing removes a unit's contribution exactly: the columns (last dim) of the 2-D
    weights of heads / kv_groups / group_heads / mlp groups (o_proj, down_proj)."""
    if group.kind not in MASKABLE_KINDS:
        return []
    out = []
    for m in group.members:
        t = dg.parameters.get(m.name)
        if t is not None and t.dim() == 2 and m.dim == t.dim() - 1:
            out.append(m)
    return out


@dataclass
class HyWIAResult:
    scores: dict[int, torch.Tensor]          # blended, with the learned attention
    alpha: dict[int, torch.Tensor]           # per group: [weight of fine (element1), weight of coarse (vector)]
    fine: dict[int, torch.Tensor]            # normalised element1 scores
    coarse: dict[int, torch.Tensor]          # normalised vector scores
    losses: list[float] = field(default_factory=list)  # masked LM loss at each step
    validation: dict = field(default_factory=dict)     # hard-pruned calibration loss: learned blend vs fine only


GRANULARITIES = ("fine", "coarse")


def _normalise(s: torch.Tensor) -> torch.Tensor:
    return s / s.mean().clamp_min(1e-12)


def _features(n: torch.Tensor, ratio: float) -> torch.Tensor:
    """Statistics of one group's normalised scores (mean is 1 by construction): spread and shape."""
    q = torch.quantile(n, ratio) if n.numel() > 1 else n.min()
    std = n.std() if n.numel() > 1 else n.new_zeros(())
    return torch.log1p(torch.stack([std, n.max(), n.min(), q]).clamp_min(0))


def _to(batch, device):
    return tuple(None if t is None else t.to(device) for t in batch)


def _mean_loss(dg, tensors, chunks, device, checkpoint) -> float:
    total = 0.0
    for ids, attn in (_to(c, device) for c in chunks):
        total += float(lm_loss(_forward(dg, tensors, ids, attn, checkpoint), ids, attn))
    return total / len(chunks)


def planned_fractions(dg: DependencyGraph, groups, ratio: float, scores=None) -> dict[int, float]:
    """Per group, the fraction of its units that the (uniform) planner removes for these `scores` when
    `ratio` of the parameters go. It exceeds `ratio` (embeddings, norms and protected layers stay),
    and where one fraction for all groups cannot meet the ratio, the planner's top-up by score decides
    which groups give more (so it depends on `scores`; equal scores when None)."""
    from fxprune.config import PruneConfig
    from fxprune.plan import select
    scores = scores or {g.id: torch.ones(g.n_units) for g in groups}
    counts = select(dg, groups, scores, PruneConfig(ratio=ratio))
    return {g.id: 1 - counts[g.id] / g.n_units for g in groups}


def hywia(dg: DependencyGraph, groups=None, calibration=None, ratio: float = 0.2, aggregation: str = "sum",
          seed: int = 0, steps: int = 30, lr: float = 0.05, temperature: float = 0.25, dim: int = 8,
          batch_size: int = 1, device=None, dtype=None, checkpoint: bool = False,
          gradients: GradientStats | None = None, relaxation: str = "hard", fractions: dict | None = None,
          validate: bool = True) -> HyWIAResult:
    """Hybrid-grained weight importance (HyWIA, Liu et al., arXiv 2403.10799), small and deterministic.

    Per group g and granularity k in (fine, coarse):
      fine   = element1 (per-weight Taylor |W*G|, summed per unit, aggregated over members)
      coarse = vector   (structure-level Taylor |sum W*G| per member, aggregated)
      n_k    = s_k / mean(s_k)      normalised per group: mean 1, ranks and non-negativity kept
    Attention over the two granularities, per group:
      phi_k  = log1p([std, max, min, f_g-quantile] of n_k)          (per-group statistics, fixed)
      key_k  = A phi_k + b + e_k                                     (A, b, e_k learned, shared)
      a      = softmax_k(<q[layer, kind], key_k> / sqrt(dim))        (q learned, one per layer+kind)
      s      = a_fine * n_fine + a_coarse * n_coarse                 (the returned score)
    Learning: keep mask per unit, for the fraction f_g of group g's units that the uniform planner
    removes for the current scores when `ratio` of the parameters go (`planned_fractions`, recomputed
    every step; protected layers and embeddings make f_g larger than `ratio`; `fractions` fixes it):
      soft   m_u = sigmoid((s_u - tau_g) / T_g), tau_g = the f_g-quantile of s, T_g = temperature * std(s)
      hard   (default) forward: m_u = 1 for the (1 - f_g) n_g best units by s, else 0 (the pruned model
             itself); backward: the gradient of the soft m_u (straight-through)
    m scales the output-projection columns (o_proj / down_proj) of each unit of groups of kind heads /
    kv_groups / group_heads / mlp; the parameters (q, A, b, e) minimise the LM loss of the masked
    model by Adam(lr) for `steps` steps, one calibration chunk per step in order. q starts at 0
    (equal weights); A is drawn from a generator seeded by `seed`, so the result is deterministic for
    a seed. Groups of other kinds have no output projection to mask: their scores are blended with
    the attention of their (layer, kind) query, which keeps its initial equal weights unless a
    maskable group shares it.
    Validation (`validate=True`): the learned blend and the attention's fine-only corner (alpha_fine = 1,
    i.e. element1's ranking) each prune the model (hard masks); the one with the lower mean LM loss
    over the calibration data is returned (`validation` holds both losses).
    See docs/hywia.md for the reasons behind these choices.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio (the fraction of parameters the plan removes) must be in (0, 1), got {ratio}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    if calibration is None:
        raise ValueError("hywia learns its attention on the LM loss: pass calibration=[input_ids, ...] "
                         "(LongTensors [batch, seq] or dicts with 'input_ids')")
    groups = _resolve_groups(dg, groups)
    device = _compute_device(dg, device)
    needs = frozenset({"grad"})
    grads = _gradients_for(dg, groups, needs, "hywia", calibration, gradients, batch_size, device, dtype, checkpoint)
    element1 = _estimate(dg, groups, ESTIMATORS["element1"], aggregation, grads, seed, device)
    vector = _estimate(dg, groups, ESTIMATORS["vector"], aggregation, grads, seed, device)
    fine = {g.id: _normalise(element1[g.id]) for g in groups}
    coarse = {g.id: _normalise(vector[g.id]) for g in groups}

    if relaxation not in ("soft", "hard"):
        raise ValueError(f"relaxation must be 'soft' or 'hard', got {relaxation!r}")

    def fractions_for(score_of):
        if fractions is not None:
            return fractions
        return planned_fractions(dg, groups, ratio, {g.id: score_of(g).detach().cpu() for g in groups})

    frac = fractions_for(lambda g: fine[g.id])  # for the attention's features
    gen = torch.Generator().manual_seed(int(seed))
    feats = {g.id: torch.stack([_features(fine[g.id], frac[g.id]), _features(coarse[g.id], frac[g.id])])
             for g in groups}
    n_feat = 4
    A = (torch.randn(dim, n_feat, generator=gen) / math.sqrt(n_feat)).requires_grad_(True)
    b = torch.zeros(dim, requires_grad=True)
    e = torch.zeros(len(GRANULARITIES), dim, requires_grad=True)
    slot = lambda g: f"{g.layer}:{g.kind}"
    queries = {k: torch.zeros(dim, requires_grad=True) for k in dict.fromkeys(slot(g) for g in groups)}
    learnables = [A, b, e, *queries.values()]

    def attention(g):
        keys = feats[g.id] @ A.T + b + e
        return torch.softmax(keys @ queries[slot(g)] / math.sqrt(dim), dim=0)

    def blended(g):
        a = attention(g)
        return a[0] * fine[g.id] + a[1] * coarse[g.id]

    maskable = [(g, output_projection_members(dg, g)) for g in groups]
    maskable = [(g, ms) for g, ms in maskable if ms and g.n_units > 1]
    losses = []
    batches = list(_chunks(_batches(calibration, _vocab_size(dg)), max(batch_size, 1)))
    base = _tensors(dg, device, dtype) if maskable and batches else None

    def masked(score_of, relax):
        """The model's tensors with each maskable group's units masked at their output projection, as many
        as the planner removes for these scores."""
        frac = fractions_for(score_of)
        col_masks: dict[str, torch.Tensor] = {}
        for g, members in maskable:
            s = score_of(g)
            tau = torch.quantile(s, frac[g.id])
            T = temperature * s.detach().std().clamp_min(1e-6)
            m = torch.sigmoid((s - tau) / T)
            if relax == "hard":  # forward: the pruned model itself; backward: the sigmoid's gradient
                keep = torch.zeros_like(m)
                order = s.detach().double().argsort(descending=True, stable=True)  # the planner's order
                keep[order[: g.n_units - round(frac[g.id] * g.n_units)]] = 1
                m = keep + m - m.detach()
            for mem in members:
                unit_of = mem.unit_of.to(device)
                per_col = torch.where(unit_of >= 0, m.to(device)[unit_of.clamp_min(0)], torch.ones((), device=device))
                col_masks[mem.name] = col_masks.get(mem.name, 1) * per_col
        tensors = dict(base)
        for name, cm in col_masks.items():
            tensors[name] = base[name] * cm.to(base[name].dtype)  # columns: the member dim is the last one
        return tensors

    if maskable and batches and steps > 0:
        opt = torch.optim.Adam(learnables, lr=lr)
        for step in range(steps):
            ids, attn = _to(batches[step % len(batches)], device)
            loss = lm_loss(_forward(dg, masked(blended, relaxation), ids, attn, checkpoint), ids, attn)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    with torch.no_grad():
        scores = {g.id: blended(g).detach().cpu() for g in groups}
        alpha = {g.id: attention(g).detach().cpu() for g in groups}
        validation = {}
        if validate and maskable and batches:
            # The relaxation can settle on a blend that prunes worse than the fine-grained corner of the
            # attention (alpha_fine = 1); keep whichever of the two prunes with the lower calibration loss.
            chunks = list(_chunks(_batches(calibration, _vocab_size(dg)), 8))
            for name, score_of in (("learned", lambda g: scores[g.id]), ("fine", lambda g: fine[g.id])):
                validation[name] = _mean_loss(dg, masked(score_of, "hard"), chunks, device, checkpoint)
            if validation["fine"] < validation["learned"]:
                scores = {g.id: fine[g.id].clone() for g in groups}
                alpha = {g.id: torch.tensor([1.0, 0.0]) for g in groups}
    return HyWIAResult(scores, alpha, fine, coarse, losses, validation)
