"""DropPiecesPass alone (after slicing and literals): where the heads are split into single heads, each
normalised by its own norm and concatenated back, a removed head's piece, cat input and norm go;
values equal the smaller twin at batch 1 and odd lengths."""
import operator

import pytest
import torch

import fxprune
from coupling_models import PerHeadNorm, per_head_twin
from fxprune.passes.drop_pieces import DropPiecesPass
from fxprune.passes.rewrite_shape_literals import RewriteShapeLiteralsPass
from fxprune.passes.slice_parameters import SliceParametersPass
from fxprune.rewrite.emit import copy_graph_module, kept_positions
from tiny import SHAPES, calls, group_of, ids, logits, run_passes

KEPT = [1, 3]


@pytest.fixture(scope="module")
def dropped():
    model = PerHeadNorm().eval()
    dg = fxprune.analyze(model)
    heads = group_of(dg, "heads")
    keep = {heads.atom_id: torch.tensor(KEPT)}
    passes = [SliceParametersPass(dg.gm, dg.parameters, dg.buffers, dg.aliases, kept_positions(dg, keep)),
              RewriteShapeLiteralsPass(dg.table, {heads.atom_id: len(KEPT)}, keep),
              DropPiecesPass(dg.table, keep, dg.unit_parameters)]
    return model, run_passes(copy_graph_module(dg), passes)


def test_the_removed_heads_pieces_and_norms_go(dropped):
    _, gm = dropped
    split, = calls(gm, torch.ops.aten.split)
    assert sorted(u.args[1] for u in split.users if u.target is operator.getitem) == [0, 1]  # renumbered
    cat, = calls(gm, torch.ops.aten.cat)
    assert [n.target for n in cat.args[0]] == [torch.ops.aten.layer_norm.default] * 2
    assert [n.args[2].target for n in cat.args[0]] == [f"q_norms.{i}.weight" for i in KEPT]
    assert [n.args[0].args[1] for n in cat.args[0]] == [0, 1]  # kept head j reads piece j of the pruned split
    names = {n for n, _ in gm.named_parameters()}
    assert {f"q_norms.{i}.weight" for i in KEPT} <= names and not {"q_norms.0.weight", "q_norms.2.weight"} & names


@pytest.mark.parametrize("batch,seq", SHAPES)
def test_values_are_the_smaller_twin(dropped, batch, seq):
    model, gm = dropped
    x = ids(batch, seq)
    torch.testing.assert_close(logits(gm, x), per_head_twin(model, KEPT)(x).logits)
