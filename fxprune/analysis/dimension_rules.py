"""One rule per ATen op family: how the dimensions of an op's inputs relate to its outputs.

A rule receives the node and a `Labels` context, reads the atoms of the input dimensions,
unites those that the op's semantics say are the same index space, and returns the atoms
of the output dimensions (a list, or a list of lists for ops returning several tensors).
Rules are looked up by op overload packet; ops tagged pointwise share the broadcasting
rule. An op with no rule freezes every dimension it touches (see propagate_dimensions).
"""
from __future__ import annotations

import operator

import sympy
import torch

from fxprune.analysis.atoms import PROD, SUM, as_expr
from fxprune.analysis.fx_util import owner_and_leaf, schema_arg
from fxprune.analysis.value_rules import COUNTS, INDEX, OFFSETS
from fxprune.analysis.meta_keys import VALUES
from fxprune.analysis.meta_keys import PIECES

aten = torch.ops.aten
RULES: dict = {}


def rule(*ops):
    """Decorator: register the decorated function as the dimension rule of each of `ops` (ATen ops, packets or
    qualified names)."""
    def register(fn):
        for op in ops:
            RULES[op] = fn
        return fn
    return register


def find_rule(target):
    """The rule for an op: by overload, by its packet, by qualified name, else the broadcast rule for pointwise ops;
    None when the op has no rule (what it touches is then frozen)."""
    if target in RULES:
        return RULES[target]
    packet = getattr(target, "overloadpacket", None)
    if packet in RULES:
        return RULES[packet]
    name = getattr(target, "_schema", None) and target._schema.name  # ops outside aten, by qualified name
    if name in RULES:
        return RULES[name]
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        return broadcast_rule
    return None


def shape(node) -> list:
    """The node's output shape as sympy expressions."""
    return [as_expr(s) for s in node.meta["val"].shape]


def norm_dim(d: int, rank: int) -> int:
    """A possibly negative dimension index `d` as its index in a tensor of `rank` dimensions."""
    return d + rank if d < 0 else d


# -- broadcasting ------------------------------------------------------------
def broadcast_into(L, out_dims, out_shape, arg) -> None:
    """Unite the dimensions of `arg` with the trailing output dimensions of equal size."""
    dims, sizes = L.dims(arg), shape(arg)
    for i in range(1, len(dims) + 1):
        if sizes[-i] == out_shape[-i]:
            L.unify(dims[-i], out_dims[-i])
        elif sizes[-i] != 1:
            raise ValueError(f"cannot broadcast {sizes} to {out_shape}")


def tensor_args(node):
    """The node's arguments (flattened one level) that are tensor-valued fx nodes."""
    flat = list(node.args) + list(node.kwargs.values())
    out = []
    for a in flat:
        for x in a if isinstance(a, (list, tuple)) else [a]:
            if isinstance(x, torch.fx.Node) and isinstance(x.meta.get("val"), torch.Tensor):
                out.append(x)
    return out


def broadcast_rule(node, L):
    """Pointwise ops: every input dimension is united with the output dimension it broadcasts to."""
    out = L.fresh(node)
    for arg in tensor_args(node):
        broadcast_into(L, out, shape(node), arg)
    return out


IDENTITY_OPS = [
    aten.alias, aten.clone, aten.contiguous, aten.detach, aten.lift_fresh_copy,
    aten._to_copy, aten.dropout, aten.masked_fill, aten.where, aten.clamp,
    aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, aten.cumsum,
    aten.zeros_like, aten.ones_like, aten.full_like, aten.empty_like, aten.copy, aten.copy_,
    aten.triu, aten.tril, aten.__and__, aten.__or__, aten.bitwise_and, aten.bitwise_or,
    aten.bitwise_not, aten.logical_and, aten.logical_or, aten.logical_not, aten.gelu, aten.silu, aten.relu, aten.tanh, aten.sigmoid,
    aten.floor_divide, aten.remainder, aten.fmod,
]
rule(*IDENTITY_OPS)(broadcast_rule)


@rule(aten.to, aten.type_as)
def cast_rule(node, L):
    """Casts and device moves: the output carries the first argument's labels."""
    # A second tensor argument only lends its dtype/device: its shape is unrelated.
    return list(L.dims(node.args[0]))


# -- contractions ------------------------------------------------------------
def batched_matmul(L, node, a, b):
    """Labels of `a @ b`: the contracted dimensions united, rows from `a`, columns from `b`, equal batch dimensions
    united."""
    out = L.fresh(node)
    da, db = L.dims(a), L.dims(b)
    if len(da) < 2 or len(db) < 2:
        raise ValueError("matmul with a 1-D operand")
    L.unify(da[-1], db[-2])
    L.unify(out[-2], da[-2])
    L.unify(out[-1], db[-1])
    oshape = shape(node)
    for arg_dims, arg in ((da, a), (db, b)):
        sizes = shape(arg)
        for i in range(3, len(arg_dims) + 1):
            if sizes[-i] == oshape[-i]:
                L.unify(arg_dims[-i], out[-i])
    return out


@rule(aten.matmul, aten.bmm, aten.mm)
def matmul_rule(node, L):
    """`matmul`, `bmm`, `mm`: as `batched_matmul`, recorded among the graph's matmuls."""
    out = batched_matmul(L, node, node.args[0], node.args[1])
    L.matmuls.append(node)
    return out


@rule(aten.baddbmm, aten.addmm, aten.addbmm)
def addmm_rule(node, L):
    """`addmm`, `baddbmm`, `addbmm`: the product's labels, with the added term broadcast into them."""
    out = batched_matmul(L, node, node.args[1], node.args[2])
    broadcast_into(L, out, shape(node), node.args[0])
    L.matmuls.append(node)
    return out


@rule(aten.einsum)
def einsum_rule(node, L):
    """Every dimension named by the same subscript letter is one index space (size-1 ones broadcast)."""
    equation, operands = node.args[0].replace(" ", ""), node.args[1]
    if "." in equation or "->" not in equation:
        raise ValueError(f"einsum {equation!r} with an ellipsis or an implicit output")
    inputs, output = equation.split("->")
    out = L.fresh(node)
    by_letter: dict = {}
    for term, dims, sizes in [(t, L.dims(x), shape(x)) for t, x in zip(inputs.split(","), operands)] + [(output, out, shape(node))]:
        for letter, atom, size in zip(term, dims, sizes):
            if size != 1:
                by_letter.setdefault(letter, []).append(atom)
    for atoms in by_letter.values():
        for atom in atoms[1:]:
            L.unify(atoms[0], atom)
    return out


@rule(aten.linear)
def linear_rule(node, L):
    """`linear(x, w, b)`: the input's last dimension is `w`'s columns; the output's last dimension is `w`'s rows and
    `b`."""
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    dx, dw = L.dims(x), L.dims(w)
    L.unify(dx[-1], dw[1])
    if isinstance(b, torch.fx.Node):
        L.unify(L.dims(b)[0], dw[0])
    return list(dx[:-1]) + [dw[0]]


@rule(aten._grouped_mm, "transformers::grouped_mm_fallback")
def grouped_mm_rule(node, L):
    """Rows of `x` [tokens, in] sorted by group, group g multiplied by `w[g]` [in, out]; `offs` [groups]
    ends each group's rows. The group dim is prunable only when `offs` is the running count of
    router indices into that same dim (value_rules): then no row is sent to a removed group."""
    x, w = node.args[0], node.args[1]
    offs = schema_arg(node, "offs") if len(node.args) < 3 else node.args[2]
    dx, dw = L.dims(x), L.dims(w)
    if len(dx) != 2 or len(dw) != 3:
        raise ValueError("grouped_mm other than [tokens, in] x [groups, in, out]")
    L.unify(dx[-1], dw[1])
    routed = L.value_label(offs, node, OFFSETS)
    if routed is None:
        L.table.freeze(dw[0], f"{node.name} sends rows to groups by offsets that are not router counts")
    else:
        L.unify(dw[0], routed)
        L.unify(dw[0], L.dims(offs)[0])
        L.experts.append(dw[0])
    return [dx[0], dw[2]]


@rule(aten.scaled_dot_product_attention)
def sdpa_rule(node, L):
    """Scaled dot-product attention: query and key share the head size and the heads (query heads a product of KV
    heads and heads per group under GQA), key and value share positions and heads; the output takes the value's head
    size. Records the attention for the head groups."""
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    dq, dk, dv = L.dims(q), L.dims(k), L.dims(v)
    sq, sk = shape(q), shape(k)
    out = list(dq[:-1]) + [dv[-1]]
    L.unify(dq[-1], dk[-1])
    L.unify(dk[-2], dv[-2])
    L.unify(dk[-3], dv[-3])
    if sq[-3] == sk[-3]:
        L.unify(dq[-3], dk[-3])
    else:  # enable_gqa: query head h reads key head h // (Hq / Hk)
        per_group = L.table.new(sq[-3] / sk[-3], f"query heads per group of {node.name}", broadcast=True)
        L.unify(dq[-3], L.table.make(PROD, [dk[-3], per_group], node.name))
    for i in range(4, len(dq) + 1):
        for other, s in ((dk, sk), (dv, shape(v))):
            if len(other) >= i and s[-i] == sq[-i]:
                L.unify(dq[-i], other[-i])
    if isinstance(mask, torch.fx.Node):
        scores = list(dq[:-1]) + [dk[-2]]
        broadcast_into(L, scores, sq[:-1] + [sk[-2]], mask)
    L.attention.append((node, dq, dk))
    return out


# -- shape ops ---------------------------------------------------------------
def reshape_dims(L, node, in_dims, in_shape, out_shape):
    """Output labels of a reshape from `in_shape` to `out_shape`: dimensions kept as they are, merged into products
    or split into factors."""
    out = [None] * len(out_shape)
    src = [(d, s) for d, s in zip(in_dims, in_shape) if s != 1]
    dst = [j for j, s in enumerate(out_shape) if s != 1]
    for j, s in enumerate(out_shape):
        if s == 1:
            out[j] = L.table.new(1, node.name)
    i = j = 0
    while i < len(src) and j < len(dst):
        block_in, block_out = [src[i]], [dst[j]]
        pin, pout = src[i][1], out_shape[dst[j]]
        i, j = i + 1, j + 1
        while pin != pout:
            ratio = sympy.simplify(pin / pout)
            if ratio == 1:
                break
            if ratio.is_number:
                grow_in = ratio < 1
            else:  # symbolic (batch * seq flattened): the side with a factor the other lacks grows
                grow_in = sympy.fraction(ratio)[1] != 1
            if not grow_in and j < len(dst):
                block_out.append(dst[j]); pout = pout * out_shape[dst[j]]; j += 1
            elif grow_in and i < len(src):
                block_in.append(src[i]); pin = pin * src[i][1]; i += 1
            else:
                raise ValueError(f"cannot group reshape {in_shape} -> {out_shape}")
        merged = L.table.make(PROD, [d for d, _ in block_in], node.name)
        if len(block_out) == 1:
            out[block_out[0]] = merged
        else:
            parts = L.table.split_prod(merged, [out_shape[k] for k in block_out])
            for k, part in zip(block_out, parts):
                out[k] = part
    if i < len(src) or j < len(dst):
        raise ValueError(f"cannot group reshape {in_shape} -> {out_shape}")
    return out


@rule(aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.view_as,
      aten.reshape_as)
def reshape_rule(node, L):
    """`view`, `reshape` and the like: see `reshape_dims`."""
    x = node.args[0]
    return reshape_dims(L, node, L.dims(x), shape(x), shape(node))


@rule(aten.transpose, aten.swapaxes)
def transpose_rule(node, L):
    """`transpose`: the two labels swapped."""
    dims = list(L.dims(node.args[0]))
    a, b = (norm_dim(d, len(dims)) for d in node.args[1:3])
    dims[a], dims[b] = dims[b], dims[a]
    return dims


@rule(aten.permute)
def permute_rule(node, L):
    """`permute`: the labels in the permuted order."""
    dims = L.dims(node.args[0])
    return [dims[norm_dim(p, len(dims))] for p in node.args[1]]


@rule(aten.t, aten.numpy_T)
def t_rule(node, L):
    """`t`: the labels reversed."""
    return list(reversed(L.dims(node.args[0])))


@rule(aten.unsqueeze)
def unsqueeze_rule(node, L):
    """`unsqueeze`: a fresh size-1 label inserted."""
    dims = list(L.dims(node.args[0]))
    d = norm_dim(node.args[1], len(dims) + 1)
    return dims[:d] + [L.table.new(1, node.name)] + dims[d:]


@rule(aten.squeeze)
def squeeze_rule(node, L):
    """`squeeze`: the size-1 labels removed (all, or the ones named)."""
    x = node.args[0]
    dims, sizes = L.dims(x), shape(x)
    which = node.args[1] if len(node.args) > 1 else None
    which = None if which is None else {norm_dim(d, len(dims)) for d in ([which] if isinstance(which, int) else which)}
    return [d for i, (d, s) in enumerate(zip(dims, sizes)) if not (s == 1 and (which is None or i in which))]


@rule(aten.expand, aten.expand_as, aten.broadcast_to)
def expand_rule(node, L):
    """`expand`, `broadcast_to`: kept dimensions keep their labels; expanded or new ones get fresh broadcast labels."""
    x = node.args[0]
    dims, sizes, out_shape = L.dims(x), shape(x), shape(node)
    lead = len(out_shape) - len(dims)
    out = [L.table.new(s, node.name, broadcast=True) for s in out_shape[:lead]]
    for d, s, o in zip(dims, sizes, out_shape[lead:]):
        out.append(d if s == o else L.table.new(o, node.name, broadcast=True))
    return out


@rule(aten.repeat)
def repeat_rule(node, L):
    """`repeat`: a tiled dimension becomes the product of its copies and the original label."""
    x = node.args[0]
    dims, reps = L.dims(x), list(node.args[1])
    lead = len(reps) - len(dims)
    out = [L.table.new(as_expr(r), node.name, broadcast=True) for r in reps[:lead]]
    for d, r in zip(dims, reps[lead:]):
        if r == 1:
            out.append(d)
        else:  # tiling: out index = copy * size + i
            copies = L.table.new(as_expr(r), node.name, broadcast=True)
            out.append(L.table.make(PROD, [copies, d], node.name))
    return out


@rule(aten.repeat_interleave)
def repeat_interleave_rule(node, L):
    """`repeat_interleave` by an int along a dim: that dimension becomes the product of the label and its copies."""
    x = node.args[0]
    repeats = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if not isinstance(repeats, int) or dim is None:
        raise ValueError("repeat_interleave with tensor repeats or no dim")
    dims = list(L.dims(x))
    d = norm_dim(dim, len(dims))
    copies = L.table.new(repeats, node.name, broadcast=True)
    dims[d] = L.table.make(PROD, [dims[d], copies], node.name)
    return dims


@rule(aten.slice)
def slice_rule(node, L):
    """`slice`: a whole-range slice keeps the label; a slice of a static dimension splits it into segments and keeps
    the sliced one; along a symbolic dimension a fresh label."""
    x = node.args[0]
    dims, sizes = list(L.dims(x)), shape(x)
    dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, len(dims))
    size = sizes[dim]
    out_size = shape(node)[dim]
    if out_size == size:
        return dims
    if not size.is_number:  # slicing along sequence or batch: nothing prunable there
        dims[dim] = L.table.new(out_size, node.name)
        return dims
    size = int(size)
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else size
    step = node.args[4] if len(node.args) > 4 else 1
    if not isinstance(start, int) or not isinstance(end, int):
        # A bound only known at run time (the filled window of a KV cache): which positions survive
        # pruning would depend on it, so the sliced dimension stays whole.
        L.table.freeze(dims[dim], f"slice {node.name} with a bound known at run time")
        dims[dim] = L.table.new(out_size, node.name)
        return dims
    start, end = (min(max(v + size if v < 0 else v, 0), size) for v in (start, end))
    if end <= start:  # an empty slice (partial rotary with nothing left to pass through) reads nothing
        dims[dim] = L.table.new(0, node.name)
        return dims
    if step == 1:
        sizes_ = [s for s in (start, end - start, size - end)]
        parts = L.table.split_sum(dims[dim], [s for s in sizes_ if s])
        dims[dim] = parts[1 if start else 0]
        return dims
    if size % step == 0 and start < step and end > size - step + start:
        # x[start::step] picks digit `start` of the inner factor of (size/step, step)
        outer, inner = L.table.split_prod(dims[dim], [size // step, step])
        L.table.freeze(inner, f"strided slice {node.name}")
        dims[dim] = outer
        return dims
    raise ValueError("irregular strided slice")


@rule(aten.narrow)
def narrow_rule(node, L):
    """`narrow`: the dimension split into segments, the narrowed one kept."""
    x, dim, start, length = node.args[:4]
    dims = list(L.dims(x))
    d = norm_dim(dim, len(dims))
    size = int(shape(x)[d])
    parts = L.table.split_sum(dims[d], [s for s in (start, length, size - start - length) if s])
    dims[d] = parts[1 if start else 0]
    return dims


@rule(aten.select)
def select_rule(node, L):
    """`select`: the selected dimension is frozen (one position is read) and dropped."""
    x, dim = node.args[0], node.args[1]
    dims = list(L.dims(x))
    d = norm_dim(dim, len(dims))
    size, index = shape(x)[d], node.args[2]
    why = f"{node.name} selects position {index} of dim {d} of {x.name}"
    if size.is_number and isinstance(index, int):  # one constant position: the same as indexing with [index]
        constant_positions(L, dims[d], int(size), torch.tensor([index]), why)
    else:
        L.table.freeze(dims[d], why)
    return dims[:d] + dims[d + 1:]


CONSTANT_READS = (aten.lift_fresh_copy, aten.clone, aten.detach, aten.alias, aten._to_copy)


def constant_value(node):
    """The values of a tensor read from a graph attribute that is neither parameter nor buffer
    (a constant that torch.export lifted), or None when the values are unknown or may change."""
    while node.op == "call_function" and getattr(node.target, "overloadpacket", None) in CONSTANT_READS:
        node = node.args[0]
    if node.op != "get_attr":
        return None
    module, leaf = owner_and_leaf(node.graph.owning_module, node.target)
    value = getattr(module, leaf, None)
    if not isinstance(value, torch.Tensor) or leaf in module._parameters or leaf in module._buffers or value.is_meta:
        return None
    return value


def constant_positions(L, atom, size, values, why):
    """Indexing `atom` at constant `values`: couple what the values mean to the atom's structure.

    Non-negative values count from the start, negative ones from the end, so the positions on
    that side of the selection must not move; a contiguous run is a segment (like a slice), and
    what lies beyond it on the other side stays prunable (Falcon's query slots before `[-2]`).
    """
    v = values.flatten().tolist()
    pos = [x + size if x < 0 else x for x in v]
    from_end = all(x < 0 for x in v)
    if not v or not (from_end or all(x >= 0 for x in v)) or pos != list(range(pos[0], pos[0] + len(pos))):
        L.table.freeze(atom, why)
        return
    start, n = pos[0], len(pos)
    sizes = [start, n, size - start - n]
    parts = iter(L.table.split_sum(atom, [s for s in sizes if s]))
    before, chosen, after = (next(parts) if s else None for s in sizes)
    for part in (chosen, after if from_end else before):
        if part is not None:
            L.table.freeze(part, why)


def indexed(L, node, x, indices):
    """Dims and shape of `x[indices]` (advanced indexing): the index tensors broadcast together into
    dims that replace the indexed ones (in place when adjacent, in front otherwise). An indexed dim
    of `x` is read at the positions the index holds: frozen, unless the index is a known constant
    (see constant_positions)."""
    dims, sizes = L.dims(x), shape(x)
    used = [i for i, t in enumerate(indices) if t is not None]
    if any(indices[i].meta["val"].dtype == torch.bool for i in used):
        raise ValueError("boolean mask indexing has a data-dependent shape")
    index_shapes = [shape(indices[i]) for i in used]
    rank = max(len(t) for t in index_shapes)
    joint = [next((t[-k] for t in index_shapes if len(t) >= k and t[-k] != 1), 1) for k in range(rank, 0, -1)]
    joint_dims = [L.table.new(s, node.name) for s in joint]
    for i in used:
        broadcast_into(L, joint_dims, joint, indices[i])
        value = constant_value(indices[i])
        why = f"{node.name} reads dim {i} of {x.name} at the positions its index holds"
        positions_of = L.value_label(indices[i], node, INDEX)
        if positions_of is not None:  # the index holds positions of a dim: read in the same (pruned) numbering
            L.unify(dims[i], positions_of)
            L.experts.append(dims[i])
        elif value is None or not sizes[i].is_number:
            L.table.freeze(dims[i], why)
        else:
            constant_positions(L, dims[i], int(sizes[i]), value, why)
    rest = [(d, s) for i, (d, s) in enumerate(zip(dims, sizes)) if i not in used]
    at = used[0] if used == list(range(used[0], used[-1] + 1)) else 0
    return ([d for d, _ in rest[:at]] + joint_dims + [d for d, _ in rest[at:]],
            [s for _, s in rest[:at]] + joint + [s for _, s in rest[at:]])


@rule(aten.index)
def index_rule(node, L):
    """`index` with tensor indices: see `indexed`."""
    return indexed(L, node, node.args[0], list(node.args[1]))[0]


@rule(aten.index_put, aten.index_put_)
def index_put_rule(node, L):
    """`x[indices] = values`: the result has the dims of `x`; `values` broadcast into `x[indices]`."""
    x, indices, values = node.args[:3]
    dims, view = indexed(L, node, x, list(indices))
    broadcast_into(L, dims, view, values)
    return list(L.dims(x))


@rule(aten.index_copy, aten.index_copy_)
def index_copy_rule(node, L):
    """`x.index_copy_(dim, index, source)` (a static KV cache's update): `source` is written into `x`
    at the positions `index` holds along `dim`, so every other dim of `source` is the same index space
    as that of `x` (a cache buffer shrinks with the heads written into it); `dim` itself is addressed
    by values, so it is frozen on `x`, and the written length of `source` stays its own."""
    x, dim, _, source = node.args[:4]
    dims, src = list(L.dims(x)), L.dims(source)
    d = norm_dim(dim, len(dims))
    if len(src) != len(dims):
        raise ValueError(f"index_copy of a rank-{len(src)} source into a rank-{len(dims)} tensor")
    for i, (a, b) in enumerate(zip(dims, src)):
        if i != d:
            L.unify(a, b)
    L.table.freeze(dims[d], f"{node.name} writes dim {d} of {x.name} at the positions its index holds")
    return dims


@rule(aten.topk, aten.kthvalue)
def top_k_rule(node, L):
    """The k largest (or the k-th) along one dim: removing positions there removes candidates, as a
    router's logit of -inf would; at least k must stay. Their indices are positions (value_rules)."""
    x = node.args[0]
    dims = L.dims(x)
    d = norm_dim(schema_arg(node, "dim", -1), len(dims))
    L.table.require(dims[d], node.args[1])
    vals = node.meta["val"]
    return [[L.table.new(v.shape[d], node.name) if i == d else a for i, a in enumerate(dims) if v.dim() == len(dims) or i != d]
            for v in vals]


@rule(aten.sort, aten.argsort)
def sort_rule(node, L):
    """Values (and indices) reordered along one dim by their data: that dim is frozen, the others pass."""
    x = node.args[0]
    dims = L.dims(x)
    d = norm_dim(schema_arg(node, "dim", -1), len(dims))
    L.table.freeze(dims[d], f"{node.name} reorders dim {d} by value")
    vals = node.meta["val"] if isinstance(node.meta["val"], (tuple, list)) else [node.meta["val"]]
    outs = [[L.table.new(v.shape[d], node.name) if i == d else a for i, a in enumerate(dims)] for v in vals]
    return outs if isinstance(node.meta["val"], (tuple, list)) else outs[0]


@rule(aten.split, aten.split_with_sizes, aten.chunk, aten.tensor_split)
def split_rule(node, L):
    """Segments of one dim. Into single positions (one head each, processed apart, e.g. by a per-head
    norm): the pieces are position i of the dim, and a cat that puts them back in order gives the dim
    back whole (cat_rule), the ops in between belonging to position i; otherwise a concatenation."""
    x = node.args[0]
    dims = L.dims(x)
    d = norm_dim(schema_arg(node, "dim", 0), len(dims))
    sizes = [as_expr(t.shape[d]) for t in node.meta["val"]]
    if len(sizes) > 1 and all(s == 1 for s in sizes):
        parts = [L.table.new(1, node.name) for _ in sizes]
        L.pending_pieces[node] = (dims[d], parts)
        return [[part if i == d else a for i, a in enumerate(dims)] for part in parts]
    parts = L.table.split_sum(dims[d], [s for s in sizes if s != 0]) if len(sizes) > 1 else [dims[d]]
    parts = iter(parts)
    outs = []
    for s in sizes:
        out = list(dims)
        out[d] = next(parts) if s != 0 else L.table.new(0, node.name)
        outs.append(out)
    return outs


@rule(aten.unbind)
def unbind_rule(node, L):
    """`unbind`: the unbound dimension is frozen and dropped from each output."""
    x = node.args[0]
    dims = L.dims(x)
    d = norm_dim(node.args[1] if len(node.args) > 1 else 0, len(dims))
    L.table.freeze(dims[d], f"unbind {node.name}")
    return [dims[:d] + dims[d + 1:] for _ in node.meta["val"]]


def reassembled(L, tensors, d):
    """The split whose single-position pieces `tensors` are, in order, along `d`; else None."""
    got = [L.table.find(L.dims(t)[d]) for t in tensors]
    for split, (atom, parts) in L.pending_pieces.items():
        if [L.table.find(p) for p in parts] == got:
            return split
    return None


@rule(aten.cat)
def cat_rule(node, L):
    """`cat`: other dimensions united; the cat dimension is the split dimension when the pieces of a split come back
    in order, else the sum of the inputs' labels."""
    tensors = [t for t in node.args[0] if shape(t) != [0]]
    out_shape = shape(node)
    d = norm_dim(schema_arg(node, "dim", 0), len(out_shape))
    out = L.fresh(node)
    for t in tensors:
        for i, a in enumerate(L.dims(t)):
            if i != d:
                L.unify(a, out[i])
    split = reassembled(L, tensors, d)
    if split is not None:  # the pieces back in order: the dim the split took apart
        atom, _ = L.pending_pieces.pop(split)
        L.unify(out[d], atom)
        split.meta[PIECES] = node.meta[PIECES] = atom
        L.pieces.append((split, node, atom))
        return out
    L.unify(out[d], L.table.make(SUM, [L.dims(t)[d] for t in tensors], node.name))
    return out


@rule(aten.stack)
def stack_rule(node, L):
    """`stack`: the inputs' labels united, the new dimension frozen."""
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out = L.fresh(node)
    d = norm_dim(dim, len(out))
    L.table.freeze(out[d], f"stack {node.name}")
    rest = out[:d] + out[d + 1:]
    for t in tensors:
        for a, b in zip(L.dims(t), rest):
            L.unify(a, b)
    return out


# -- embeddings, norms, reductions --------------------------------------------
@rule(aten.embedding)
def embedding_rule(node, L):
    """`embedding`: the table's rows (vocabulary) frozen; the output is the indices' labels plus the table's columns
    (the hidden size)."""
    w, idx = node.args[0], node.args[1]
    dw = L.dims(w)
    L.table.freeze(dw[0], f"embedding rows indexed by {idx.name}")
    L.embeddings.append(dw[1])
    return list(L.dims(idx)) + [dw[1]]


@rule(aten.layer_norm, aten.rms_norm, aten.native_layer_norm, aten._fused_rms_norm)
def norm_rule(node, L):
    """Layer and RMS norms: the weight and bias united with the normalised dimensions, which are recorded as
    renormalised."""
    x = node.args[0]
    dims = L.dims(x)
    n = len(node.args[1])
    L.renormalises(node, dims[-n:])
    for w in node.args[2:4]:
        if isinstance(w, torch.fx.Node):
            for a, b in zip(L.dims(w), dims[-n:]):
                L.unify(a, b)
    if isinstance(node.meta["val"], (tuple, list)):  # (out, statistics...): statistics reduce the normalised dims
        stats = [list(dims[:-n]) + [L.table.new(1, node.name) for _ in range(n)] for _ in node.meta["val"][1:]]
        return [list(dims)] + stats
    return list(dims)


REDUCTIONS = [aten.sum, aten.mean, aten.amax, aten.amin, aten.max, aten.min, aten.var, aten.std,
              aten.norm, aten.logsumexp, aten.any, aten.all, aten.prod, aten.argmax, aten.argmin,
              aten.var_mean]


@rule(*REDUCTIONS)
def reduction_rule(node, L):
    """Sums, means, maxima and the like: the reduced dimensions recorded as renormalised, and size 1 or dropped in
    the output."""
    x = node.args[0]
    dims = L.dims(x)
    which = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if isinstance(which, bool) or which is None or which == []:
        reduced = set(range(len(dims)))
    else:
        reduced = {norm_dim(d, len(dims)) for d in ([which] if isinstance(which, int) else which)}
    L.renormalises(node, [dims[i] for i in sorted(reduced)])
    vals = node.meta["val"] if isinstance(node.meta["val"], (tuple, list)) else [node.meta["val"]]
    outs = []
    for v in vals:
        keep = v.dim() == len(dims)
        outs.append([L.table.new(1, node.name) if i in reduced else d
                     for i, d in enumerate(dims) if keep or i not in reduced])
    return outs if isinstance(node.meta["val"], (tuple, list)) else outs[0]


@rule(aten.histc, aten.bincount)
def histogram_rule(node, L):
    """Counts over every position of the input. `histc(idx, bins=n, min=0, max=n-1)` of values that
    are positions in a dim of size n counts per position of that dim: its output is that dim."""
    x = node.args[0]
    L.freeze_all(L.dims(x), f"{node.name} counts over every position")
    out = L.fresh(node)
    if node.target.overloadpacket is aten.histc:
        n, lo, hi = (schema_arg(node, k) for k in ("bins", "min", "max"))
        source = L.value_label(x, node, INDEX)
        if source is not None and L.table.find(source).static and int(L.table.find(source).size) == n == hi + 1 and lo == 0:
            L.unify(out[0], source)
            node.meta[VALUES] = (COUNTS, source)
        elif source is not None:
            L.table.freeze(source, f"{node.name} bins do not match the range of the positions it counts")
    return out


FACTORIES = [aten.arange, aten.full, aten.zeros, aten.ones, aten.empty, aten.scalar_tensor,
             aten.new_ones, aten.new_zeros, aten.new_full, aten.new_empty, aten.rand, aten.randn,
             aten.eye, aten.linspace, aten.tensor]


@rule(*FACTORIES)
def factory_rule(node, L):
    """Tensor factories: fresh labels, tied to nothing."""
    return L.fresh(node)


@rule(operator.getitem)
def getitem_rule(node, L):
    """`getitem` on a multi-output op: the labels of that output."""
    return L.dims(node.args[0])[node.args[1]]
