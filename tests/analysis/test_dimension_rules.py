"""Each op rule of fxprune/analysis/dimension_rules.py on a one-op graph (a few ops where the op needs a
producer), against the relation the op's semantics give: which input dims are one index space with which
output dims, which dims are products (heads x head_dim) or sums (q | k | v) of others, what is frozen.

The tensors are parameters and buffers of the module, and its outputs are summed to scalars, so that the
graph's inputs and outputs (frozen: they are the model's contract) do not hide what a rule froze."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import pytest

from fxprune.analysis.capture import drop_input_guards
from fxprune.analysis.meta_keys import DIMS
from fxprune.analysis.propagate_dimensions import PropagateDimensionsPass
from fxprune.analysis.value_rules import COUNTS, OFFSETS
from fxprune.analysis.meta_keys import VALUES

aten = torch.ops.aten
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


class Ops(torch.nn.Module):
    """`forward(*inputs)` = `op(self, *inputs)`, every floating tensor of the result summed to a scalar.
    Floating tensors become parameters, others buffers; `constants` plain attributes (lifted by export)."""

    def __init__(self, op, tensors, constants):
        super().__init__()
        self.op = op
        for name, t in tensors.items():
            if t.is_floating_point():
                self.register_parameter(name, torch.nn.Parameter(t))
            else:
                self.register_buffer(name, t)
        for name, t in constants.items():
            setattr(self, name, t)

    def forward(self, *inputs):
        out = torch.utils._pytree.tree_leaves(self.op(self, *inputs))
        return tuple(t.sum() for t in out if isinstance(t, torch.Tensor) and t.is_floating_point())


class Labelled:
    """The labels of one exported `Ops` module; atoms are returned as their union-find roots."""

    def __init__(self, op, inputs=(), dynamic=None, constants=None, **tensors):
        module = Ops(op, tensors, constants or {})
        dynamic = None if dynamic is None else (dynamic,)  # the shapes of forward's one parameter, *inputs
        self.gm = torch.export.export(module, inputs, dynamic_shapes=dynamic, strict=False).module()
        drop_input_guards(self.gm)
        propagate = PropagateDimensionsPass()
        propagate(self.gm)
        self.labels, self.table = propagate.labels, propagate.labels.table

    def node(self, packet) -> torch.fx.Node:
        """The one call of `packet` (an aten overload packet) in the graph."""
        found = [n for n in self.gm.graph.nodes if getattr(n.target, "overloadpacket", None) is packet]
        assert len(found) == 1, (packet, self.gm.graph)
        return found[0]

    def out(self, packet):
        """Atoms of the dims of `packet`'s output (a list per output for ops returning several)."""
        return self.roots(self.node(packet).meta[DIMS])

    def of(self, name):
        """Atoms of the dims of parameter or buffer `name`."""
        return self.roots(self.labels.tensor_atoms[id(getattr(self.gm, name))])

    def roots(self, dims):
        return [self.roots(d) if isinstance(d, (list, tuple)) else self.table.find(d) for d in dims]

    def factors(self, atom):
        return self.table.factors(atom)

    def segments(self, atom):
        return self.table.segments(atom)

    def frozen_by(self, atom) -> str:
        """Why `atom` is frozen; "" when it stays prunable."""
        atom = self.table.find(atom)
        return atom.frozen_by if atom.frozen else ""


def sizes(atoms):
    return [int(a.size) for a in atoms]


def fresh(atoms, *known):
    """Each of `atoms` is its own index space: no two the same, none among the dims `known`."""
    seen = [a for dims in known for a in dims]
    return len(set(map(id, atoms))) == len(atoms) and not any(a is b for a in atoms for b in seen)


# -- broadcasting and identity ----------------------------------------------------------------------
BINARY = {  # op(a [3, 4], row [4]): row broadcasts over a's rows
    "add (tagged pointwise)": lambda m: m.a + m.row,
    "maximum (tagged pointwise)": lambda m: torch.maximum(m.a, m.row),
    "where": lambda m: torch.where(m.a > 0, m.a, m.row),
    "clamp": lambda m: torch.clamp(m.a, min=m.row),
    "remainder": lambda m: torch.remainder(m.a, m.row),
    "masked_fill": lambda m: m.a.masked_fill(m.row > 0, 0.0),
}
UNARY = {
    "clone": (aten.clone, lambda m: m.a.clone()), "softmax": (aten.softmax, lambda m: m.a.softmax(-1)),
    "log_softmax": (aten.log_softmax, lambda m: m.a.log_softmax(-1)), "gelu": (aten.gelu, lambda m: F.gelu(m.a)),
    "silu": (aten.silu, lambda m: F.silu(m.a)), "tanh": (aten.tanh, lambda m: torch.tanh(m.a)),
    "cumsum": (aten.cumsum, lambda m: m.a.cumsum(1)), "tril": (aten.tril, lambda m: m.a.tril()),
    "dropout": (aten.dropout, lambda m: F.dropout(m.a, 0.1)), "zeros_like": (aten.zeros_like, lambda m: torch.zeros_like(m.a)),
}


@pytest.mark.parametrize("name", BINARY)
def test_broadcast_rule_unites_trailing_dims_of_equal_size(name):
    p = Labelled(BINARY[name], a=torch.randn(3, 4), row=torch.randn(4))
    a, (row,) = p.of("a"), p.of("row")
    final = p.node(aten.sum).args[0]
    assert p.roots(final.meta[DIMS]) == a and row is a[1]
    assert not any(p.frozen_by(d) for d in a)


def test_broadcast_rule_leaves_a_size_one_dim_apart():
    p = Labelled(lambda m: m.a * m.col, a=torch.randn(3, 4), col=torch.randn(3, 1))
    a, col = p.of("a"), p.of("col")
    assert p.out(aten.mul) == a and col[0] is a[0]
    assert col[1] is not a[1] and int(col[1].size) == 1


@pytest.mark.parametrize("name", UNARY)
def test_identity_ops_pass_every_dim_through(name):
    packet, op = UNARY[name]
    p = Labelled(op, a=torch.randn(3, 4))
    assert p.out(packet) == p.of("a")


@pytest.mark.parametrize("packet,cast", [(aten.to, lambda m: m.w.to(m.other)),  # captured as to(device, dtype)
                                         (aten.type_as, lambda m: m.w.type_as(m.other))])
def test_cast_rule_takes_nothing_from_the_tensor_that_lends_its_dtype(packet, cast):
    p = Labelled(cast, w=torch.randn(3, 4), other=torch.randn(3, 4, dtype=torch.float64))
    w, other = p.of("w"), p.of("other")
    assert p.out(packet) == w
    assert not any(x is y for x in w for y in other)


# -- contractions -------------------------------------------------------------------------------------
@pytest.mark.parametrize("packet,op,b", [
    (aten.matmul, lambda m: m.a @ m.b, (2, 4, 5)),
    (aten.matmul, lambda m: m.a @ m.b, (4, 5)),       # b broadcast over a's batch
    (aten.bmm, lambda m: torch.bmm(m.a, m.b), (2, 4, 5)),
])
def test_matmul_rule_contracts_the_inner_dims(packet, op, b):
    p = Labelled(op, a=torch.randn(2, 3, 4), b=torch.randn(*b))
    a, b, out = p.of("a"), p.of("b"), p.out(packet)
    assert a[2] is b[-2] and out[1] is a[1] and out[2] is b[-1] and out[0] is a[0]
    assert len(b) == 2 or b[0] is a[0]
    assert p.labels.matmuls == [p.node(packet)]


def test_mm_rule():
    p = Labelled(lambda m: torch.mm(m.a, m.b), a=torch.randn(3, 4), b=torch.randn(4, 5))
    a, b = p.of("a"), p.of("b")
    assert a[1] is b[0] and p.out(aten.mm) == [a[0], b[1]]


@pytest.mark.parametrize("packet,op,bias", [
    (aten.addmm, lambda m: torch.addmm(m.bias, m.a[0], m.b[0]), (5,)),
    (aten.baddbmm, lambda m: torch.baddbmm(m.bias, m.a, m.b), (2, 3, 5)),
])
def test_addmm_rule_adds_a_broadcast_bias(packet, op, bias):
    p = Labelled(op, bias=torch.randn(*bias), a=torch.randn(2, 3, 4), b=torch.randn(2, 4, 5))
    a, b, bias, out = p.of("a"), p.of("b"), p.of("bias"), p.out(packet)
    assert a[2] is b[1] and out[-1] is b[2] is bias[-1] and out[-2] is a[1]
    assert p.labels.matmuls == [p.node(packet)]


def test_einsum_rule_unites_dims_named_by_one_letter():
    p = Labelled(lambda m: torch.einsum("bhd,bkd->bhk", m.q, m.k), q=torch.randn(2, 3, 4), k=torch.randn(2, 5, 4))
    q, k, out = p.of("q"), p.of("k"), p.out(aten.einsum)
    assert q[0] is k[0] is out[0] and q[2] is k[2] and out[1] is q[1] and out[2] is k[1]
    assert q[1] is not k[1]


def test_linear_rule():
    p = Labelled(lambda m: F.linear(m.x, m.w, m.b), x=torch.randn(2, 3, 4), w=torch.randn(5, 4), b=torch.randn(5))
    x, w, (b,) = p.of("x"), p.of("w"), p.of("b")
    assert x[2] is w[1] and b is w[0] and p.out(aten.linear) == [x[0], x[1], w[0]]


def bf16(*shape):
    return torch.randn(*shape, dtype=torch.bfloat16)  # the CPU grouped matmul takes bfloat16 only, rows of 16 bytes


def routed_grouped_mm(m):
    """Rows sent to groups by a router: top-1 positions counted per group, their running sum as offsets."""
    index = (m.x @ m.gate).topk(1, dim=-1).indices
    offsets = torch.histc(index.float(), bins=3, min=0, max=2).cumsum(0).to(torch.int32)
    return torch._grouped_mm(m.x, m.w, offs=offsets)


def test_grouped_mm_rule_follows_router_offsets():
    p = Labelled(routed_grouped_mm, x=bf16(6, 8), gate=bf16(8, 3), w=bf16(3, 8, 8))
    x, gate, w = p.of("x"), p.of("gate"), p.of("w")
    assert p.out(aten._grouped_mm) == [x[0], w[2]] and x[1] is w[1]
    assert w[0] is gate[1] and not p.frozen_by(w[0])  # the groups are the router's positions
    assert [p.table.find(a) for a in p.labels.experts] == [w[0]]
    assert p.node(aten.histc).meta[VALUES][0] == COUNTS and p.out(aten.histc) == [w[0]]
    assert p.node(aten.cumsum).meta[VALUES] == (OFFSETS, p.node(aten.histc).meta[VALUES][1])


def test_grouped_mm_rule_freezes_groups_sent_by_other_offsets():
    p = Labelled(lambda m: torch._grouped_mm(m.x, m.w, offs=m.offs), x=bf16(6, 8), w=bf16(3, 8, 8),
                 offs=torch.tensor([2, 4, 6], dtype=torch.int32))
    w = p.of("w")
    assert "offsets that are not router counts" in p.frozen_by(w[0])
    assert not p.frozen_by(w[2]) and p.labels.experts == []


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_sdpa_rule_couples_heads_and_query_heads_per_group(kv_heads):
    p = Labelled(lambda m: F.scaled_dot_product_attention(m.q, m.k, m.v, m.mask, enable_gqa=kv_heads < 4),
                 q=torch.randn(1, 4, 5, 8), k=torch.randn(1, kv_heads, 5, 8), v=torch.randn(1, kv_heads, 5, 6),
                 mask=torch.randn(5, 5))
    q, k, v, mask = p.of("q"), p.of("k"), p.of("v"), p.of("mask")
    assert p.out(aten.scaled_dot_product_attention) == [q[0], q[1], q[2], v[3]]
    assert q[3] is k[3] and k[2] is v[2] and k[1] is v[1] and v[3] is not q[3]
    assert mask == [q[2], k[2]]  # the scores [.., query position, key position]
    if kv_heads == 4:
        assert q[1] is k[1]
    else:  # query head h reads key head h // 2: heads = (KV heads, query heads per group)
        groups, per_group = p.factors(q[1])
        assert groups is k[1] and per_group.broadcast and int(per_group.size) == 2
    assert len(p.labels.attention) == 1


# -- shape ops ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("packet,op", [
    (aten.reshape, lambda m: m.w.reshape(2, 4, 4)),
    (aten.view, lambda m: m.w.view(2, 4, 4)),
    (aten.unflatten, lambda m: m.w.unflatten(0, (2, 4))),
])
def test_reshape_rule_splits_a_dim_into_a_product(packet, op):
    p = Labelled(op, w=torch.randn(8, 4))
    w, out = p.of("w"), p.out(packet)
    assert p.factors(w[0]) == out[:2] and sizes(out[:2]) == [2, 4] and out[2] is w[1]


@pytest.mark.parametrize("packet,op", [(aten.flatten, lambda m: m.a.flatten(1)),
                                       (aten.view_as, lambda m: m.a.view_as(m.like))])
def test_reshape_rule_merges_dims_into_a_product(packet, op):
    p = Labelled(op, a=torch.randn(2, 3, 4), like=torch.randn(2, 12))
    a, out = p.of("a"), p.out(packet)
    assert out[0] is a[0] and p.factors(out[1]) == [a[1], a[2]]


def test_reshape_rule_with_a_symbolic_size():
    batch = torch.export.Dim("batch", min=2)  # (batch, 8) -> (batch * 2, 4): the symbolic factor stays outside
    p = Labelled(lambda m, x: (x @ m.w).reshape(-1, 4), (torch.randn(3, 4),), ({0: batch},), w=torch.randn(4, 8))
    w, (rows, cols) = p.of("w"), p.out(aten.reshape)
    outer, inner = p.factors(w[1])
    assert inner is cols and int(inner.size) == 4 and int(outer.size) == 2
    assert outer in p.factors(rows) and not p.frozen_by(outer)


@pytest.mark.parametrize("packet,op,order", [
    (aten.transpose, lambda m: m.a.transpose(0, 2), [2, 1, 0]),
    (aten.transpose, lambda m: m.a.transpose(-1, 1), [0, 2, 1]),
    (aten.permute, lambda m: m.a.permute(2, 0, 1), [2, 0, 1]),
    (aten.numpy_T, lambda m: m.a[0].T, [2, 1]),
    (aten.t, lambda m: m.a[0].t(), [2, 1]),
])
def test_dim_orders_move_the_atoms(packet, op, order):
    p = Labelled(op, a=torch.randn(2, 3, 4))
    a = p.of("a")
    assert p.out(packet) == [a[i] for i in order]


def test_unsqueeze_and_squeeze_rules():
    p = Labelled(lambda m: (m.a.unsqueeze(1), m.col.squeeze(1), m.col.squeeze()), a=torch.randn(3, 4),
                 col=torch.randn(3, 1))
    a, col = p.of("a"), p.of("col")
    new = p.out(aten.unsqueeze)
    assert [new[0], new[2]] == a and int(new[1].size) == 1 and fresh([new[1]], a)
    squeezed = [p.roots(n.meta[DIMS]) for n in p.gm.graph.nodes if getattr(n.target, "overloadpacket", None) is aten.squeeze]
    assert squeezed == [[col[0]], [col[0]]]


def test_expand_rule_makes_broadcast_dims():
    p = Labelled(lambda m: m.col.expand(2, 3, 5), col=torch.randn(3, 1))
    col, out = p.of("col"), p.out(aten.expand)
    assert out[1] is col[0] and sizes([out[0], out[2]]) == [2, 5]
    assert out[0].broadcast and out[2].broadcast and out[2] is not col[1]


def test_repeat_rule_tiles_copies_outside_the_dim():
    p = Labelled(lambda m: m.a.repeat(5, 2, 1), a=torch.randn(3, 4))
    a, out = p.of("a"), p.out(aten.repeat)
    copies, rows = p.factors(out[1])
    assert rows is a[0] and copies.broadcast and int(copies.size) == 2
    assert out[0].broadcast and int(out[0].size) == 5 and out[2] is a[1]


def test_repeat_interleave_rule_puts_copies_inside_the_dim():
    p = Labelled(lambda m: m.a.repeat_interleave(2, dim=0), a=torch.randn(3, 4))
    a, out = p.of("a"), p.out(aten.repeat_interleave)
    rows, copies = p.factors(out[0])
    assert rows is a[0] and copies.broadcast and int(copies.size) == 2 and out[1] is a[1]


@pytest.mark.parametrize("packet,op,segment_sizes,taken", [
    (aten.slice, lambda m: m.w[2:5], [2, 3, 3], 1),
    (aten.slice, lambda m: m.w[:3], [3, 5], 0),
    (aten.slice, lambda m: m.w[-2:], [6, 2], 1),
    (aten.narrow, lambda m: m.w.narrow(0, 1, 3), [1, 3, 4], 1),
])
def test_contiguous_slices_are_segments(packet, op, segment_sizes, taken):
    p = Labelled(op, w=torch.randn(8, 4))
    w, out = p.of("w"), p.out(packet)
    segments = p.segments(w[0])
    assert sizes(segments) == segment_sizes and out == [segments[taken], w[1]]
    assert not any(p.frozen_by(s) for s in segments)


def test_strided_slice_takes_the_outer_factor_and_freezes_the_inner():
    p = Labelled(lambda m: m.w[1::2], w=torch.randn(8, 4))
    w, out = p.of("w"), p.out(aten.slice)
    outer, inner = p.factors(w[0])
    assert out == [outer, w[1]] and sizes([outer, inner]) == [4, 2]
    assert not p.frozen_by(outer) and p.frozen_by(inner).startswith("strided slice")


def test_slice_along_a_symbolic_dim_is_a_new_atom():
    seq = torch.export.Dim("seq", min=3)
    p = Labelled(lambda m, x: (x @ m.w)[1:], (torch.randn(5, 4),), ({0: seq},), w=torch.randn(4, 8))
    w, out = p.of("w"), p.out(aten.slice)
    matmul = p.out(aten.matmul)
    assert out[1] is w[1] and out[0] is not matmul[0] and not out[0].static


@pytest.mark.parametrize("index,segment_sizes,prunable", [
    (1, [1, 1, 2], [False, False, True]),  # counted from the start: the slot and what lies before stay put
    (-2, [2, 1, 1], [True, False, False]),  # from the end (Falcon's key slot): the query slots stay free
])
def test_select_at_a_constant_position_is_a_segment(index, segment_sizes, prunable):
    p = Labelled(lambda m: m.w[:, index], w=torch.randn(8, 4))
    w = p.of("w")
    assert p.out(aten.select) == [w[0]]
    segments = p.segments(w[1])
    assert sizes(segments) == segment_sizes
    assert [not p.frozen_by(s) for s in segments] == prunable
    assert all(p.frozen_by(s).startswith("select") for s, free in zip(segments, prunable) if not free)


# -- indexing by values ---------------------------------------------------------------------------------
def test_index_by_unknown_positions_freezes_the_dim():
    p = Labelled(lambda m: m.w[m.idx], w=torch.randn(8, 4), idx=torch.tensor([1, 5]))
    w, out = p.of("w"), p.out(aten.index)
    assert "reads dim 0 of w at the positions its index holds" in p.frozen_by(w[0])
    assert out[1] is w[1] and out[0] is p.of("idx")[0]


@pytest.mark.parametrize("positions,segment_sizes,prunable", [
    ([2, 3], [2, 2, 4], [False, False, True]),  # counted from the start: what lies before must not move
    ([-2, -1], [6, 2], [True, False]),            # from the end (Falcon's k/v slots): the query slots stay free
])
def test_index_by_constant_positions_is_a_segment(positions, segment_sizes, prunable):
    p = Labelled(lambda m: m.w[m.idx], constants={"idx": torch.tensor(positions)}, w=torch.randn(8, 4))
    segments = p.segments(p.of("w")[0])
    assert sizes(segments) == segment_sizes
    assert [not p.frozen_by(s) for s in segments] == prunable


def test_index_by_router_positions_is_that_dim():
    p = Labelled(lambda m: m.w[(m.x @ m.gate).topk(2, dim=-1).indices], x=torch.randn(6, 4), gate=torch.randn(4, 3),
                 w=torch.randn(3, 5))
    gate, w, out = p.of("gate"), p.of("w"), p.out(aten.index)
    assert w[0] is gate[1] and not p.frozen_by(w[0]) and w[0].min_keep == 2
    assert out[2] is w[1] and [p.table.find(a) for a in p.labels.experts] == [w[0]]


def test_index_put_rule_writes_values_into_the_indexed_view():
    p = Labelled(lambda m: m.x.index_put((m.idx,), m.values), x=torch.randn(5, 4), idx=torch.tensor([0, 3]),
                 values=torch.randn(2, 4))
    x, values = p.of("x"), p.of("values")
    assert p.out(aten.index_put) == x and values[1] is x[1] and values[0] is not x[0]
    assert "reads dim 0 of x" in p.frozen_by(x[0]) and not p.frozen_by(x[1])


def test_index_copy_rule_couples_the_cache_with_what_is_written():
    # a static KV cache [batch, heads, length, head_dim] written at positions along the length
    p = Labelled(lambda m: m.cache.index_copy(2, m.pos, m.new), cache=torch.randn(1, 2, 6, 4),
                 pos=torch.tensor([0, 1, 2]), new=torch.randn(1, 2, 3, 4))
    cache, new = p.of("cache"), p.of("new")
    assert p.out(aten.index_copy) == cache
    assert [cache[i] is new[i] for i in range(4)] == [True, True, False, True]
    assert "writes dim 2 of cache" in p.frozen_by(cache[2]) and not p.frozen_by(cache[1])


@pytest.mark.parametrize("packet,op", [(aten.topk, lambda m: m.w.topk(3, dim=1)), (aten.kthvalue, lambda m: m.w.kthvalue(3, 1))])
def test_top_k_rule_keeps_k_positions(packet, op):
    p = Labelled(op, w=torch.randn(8, 4))
    w, (values, indices) = p.of("w"), p.out(packet)
    assert w[1].min_keep == 3 and not p.frozen_by(w[1])
    if packet is aten.topk:
        assert values[0] is w[0] and indices[0] is w[0] and sizes([values[1], indices[1]]) == [3, 3]
        assert fresh([values[1], indices[1]], w)
    else:
        assert values == indices == [w[0]]


@pytest.mark.parametrize("packet,op", [(aten.sort, lambda m: m.w.sort(dim=1).values),
                                       (aten.argsort, lambda m: m.w.argsort(dim=1).float())])
def test_sort_rule_freezes_the_sorted_dim(packet, op):
    p = Labelled(op, w=torch.randn(8, 4))
    w = p.of("w")
    out = p.out(packet)
    first = out[0] if packet is aten.sort else out
    assert first[0] is w[0] and fresh([first[1]], w) and "reorders dim 1 by value" in p.frozen_by(w[1])


# -- splits and concatenations ---------------------------------------------------------------------------
@pytest.mark.parametrize("packet,op,parts", [
    (aten.split_with_sizes, lambda m: m.w.split([2, 6]), [2, 6]),
    (aten.split, lambda m: m.w.split(3), [3, 3, 2]),
    (aten.chunk, lambda m: m.w.chunk(2), [4, 4]),
])
def test_split_rule_makes_segments(packet, op, parts):
    p = Labelled(op, w=torch.randn(8, 4))
    w, outs = p.of("w"), p.out(packet)
    assert p.segments(w[0]) == [o[0] for o in outs] and sizes([o[0] for o in outs]) == parts
    assert all(o[1] is w[1] for o in outs)


def test_split_into_single_positions_put_back_by_cat_is_the_dim_whole():
    # one head per piece, processed apart (a per-head scale), then concatenated back in order
    p = Labelled(lambda m: torch.cat([piece * s for piece, s in zip(m.w.split(1), m.scale)]), w=torch.randn(3, 4),
                 scale=torch.randn(3))
    w, out = p.of("w"), p.out(aten.cat)
    assert out == w and w[0].kind is None and not p.frozen_by(w[0])
    ((split, cat, atom),) = p.labels.pieces
    assert (split, cat) == (p.node(aten.split), p.node(aten.cat)) and p.table.find(atom) is w[0]


def test_split_into_single_positions_never_put_back_is_size_one_segments():
    p = Labelled(lambda m: m.w.split(1), w=torch.randn(3, 4))
    w = p.of("w")
    assert sizes(p.segments(w[0])) == [1, 1, 1] and p.labels.pieces == []


def test_unbind_rule_freezes_the_unbound_dim():
    p = Labelled(lambda m: m.w.unbind(1), w=torch.randn(8, 4))
    w = p.of("w")
    assert p.out(aten.unbind) == [[w[0]]] * 4 and p.frozen_by(w[1]).startswith("unbind")


def test_cat_rule_makes_a_sum():
    p = Labelled(lambda m: torch.cat([m.a, m.b], dim=1), a=torch.randn(3, 4), b=torch.randn(3, 2))
    a, b, out = p.of("a"), p.of("b"), p.out(aten.cat)
    assert out[0] is a[0] is b[0] and p.segments(out[1]) == [a[1], b[1]] and not p.frozen_by(out[1])


def test_stack_rule_freezes_the_new_dim():
    p = Labelled(lambda m: torch.stack([m.a, m.b], dim=1), a=torch.randn(3, 4), b=torch.randn(3, 4))
    a, b, out = p.of("a"), p.of("b"), p.out(aten.stack)
    assert [out[0], out[2]] == a == b and p.frozen_by(out[1]).startswith("stack")


# -- embeddings, norms, reductions, histograms, factories ------------------------------------------------
def test_embedding_rule_freezes_the_rows_and_passes_the_features():
    p = Labelled(lambda m: F.embedding(m.ids, m.table), table=torch.randn(10, 4), ids=torch.tensor([[1, 2, 3]]))
    table, ids = p.of("table"), p.of("ids")
    assert p.out(aten.embedding) == ids + [table[1]] and "embedding rows" in p.frozen_by(table[0])
    assert [p.table.find(a) for a in p.labels.embeddings] == [table[1]] and not p.frozen_by(table[1])


@pytest.mark.parametrize("packet,op", [
    (aten.layer_norm, lambda m: F.layer_norm(m.a, (4,), m.weight, m.bias)),
    (aten.rms_norm, lambda m: F.rms_norm(m.a, (4,), m.weight) + m.bias),
])
def test_norm_rule_couples_its_weights_and_renormalises(packet, op):
    p = Labelled(op, a=torch.randn(3, 4), weight=torch.randn(4), bias=torch.randn(4))
    a = p.of("a")
    assert p.out(packet) == a and p.of("weight") == [a[1]] == p.of("bias")
    node = p.node(packet)
    assert [(p.table.find(x), name) for x, name in p.labels.renormalising if name == node.name] == [(a[1], node.name)]


@pytest.mark.parametrize("packet,op,kept", [  # kept: the dim of `a` each output dim is, None for size 1
    (aten.sum, lambda m: m.a.sum(1) * 2, [0, 2]),
    (aten.mean, lambda m: m.a.mean(-1, keepdim=True), [0, 1, None]),
    (aten.amax, lambda m: m.a.amax(0), [1, 2]),
    (aten.max, lambda m: m.a.max(1).values, [0, 2]),
    (aten.var_mean, lambda m: torch.var_mean(m.a, [0, 2], keepdim=True)[0], [None, 1, None]),
])
def test_reduction_rule_drops_or_keeps_size_one_the_reduced_dims(packet, op, kept):
    p = Labelled(op, a=torch.randn(2, 3, 4))
    a = p.of("a")
    node = next(n for n in p.gm.graph.nodes if getattr(n.target, "overloadpacket", None) is packet)
    out = p.roots(node.meta[DIMS])
    for dims in out if isinstance(out[0], list) else [out]:  # max and var_mean return two tensors
        assert len(dims) == len(kept)
        for k, d in zip(kept, dims):
            assert d is a[k] if k is not None else (int(d.size) == 1 and fresh([d], a))
    reduced = {id(a[i]) for i in range(3) if i not in kept}
    assert reduced == {id(p.table.find(x)) for x, name in p.labels.renormalising if name == node.name}


def test_histogram_rule_counts_over_every_position():
    p = Labelled(lambda m: torch.histc(m.a, bins=5), a=torch.randn(3, 4))
    a, (out,) = p.of("a"), p.out(aten.histc)
    assert all("counts over every position" in p.frozen_by(d) for d in a)
    assert int(out.size) == 5 and fresh([out], a) and not p.frozen_by(out)


@pytest.mark.parametrize("packet,op,shape", [
    (aten.ones, lambda m: torch.ones(2, 3) * m.a.sum(), [2, 3]),
    (aten.arange, lambda m: torch.arange(4.0) + m.a[0], [4]),
    (aten.full, lambda m: torch.full((3, 4), 2.0) - m.a, [3, 4]),
])
def test_factory_rule_makes_fresh_dims(packet, op, shape):
    p = Labelled(op, a=torch.randn(3, 4))
    node = next(n for n in p.gm.graph.nodes if getattr(n.target, "overloadpacket", None) is packet)
    dims = p.roots(node.meta[DIMS])
    assert sizes(dims) == shape and len({id(d) for d in dims}) == len(dims)
    # what the factory's values are combined with decides its dims, not the factory
    consumer = next(iter(node.users))
    assert p.roots(consumer.meta[DIMS])[-len(dims):] == dims


def test_an_op_without_a_rule_freezes_what_it_touches():
    p = Labelled(lambda m: torch.flip(m.w, [0]) @ m.b, w=torch.randn(8, 4), b=torch.randn(4, 5))
    w, b = p.of("w"), p.of("b")
    assert [(op, why) for _, op, why in p.labels.frozen_ops] == [("flip.default", "no rule for this op")]
    assert all(p.frozen_by(d).startswith("flip (flip.default)") for d in w)
    assert b[0] is p.out(aten.flip)[1] and b[0].frozen and not p.frozen_by(b[1])


# The rule functions this module tests: a rule added without a test here fails the check below.
TESTED_RULES = {
    "broadcast_rule", "cast_rule", "matmul_rule", "addmm_rule", "einsum_rule", "linear_rule", "grouped_mm_rule",
    "sdpa_rule", "reshape_rule", "transpose_rule", "permute_rule", "t_rule", "unsqueeze_rule", "squeeze_rule",
    "expand_rule", "repeat_rule", "repeat_interleave_rule", "slice_rule", "narrow_rule", "select_rule", "index_rule",
    "index_put_rule", "index_copy_rule", "top_k_rule", "sort_rule", "split_rule", "unbind_rule", "cat_rule",
    "stack_rule", "embedding_rule", "norm_rule", "reduction_rule", "histogram_rule", "factory_rule", "getitem_rule",
}


def test_every_rule_has_a_test_here():
    from fxprune.analysis.dimension_rules import RULES
    assert {fn.__name__ for fn in RULES.values()} == TESTED_RULES
