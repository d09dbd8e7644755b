"""InsertGathersPass alone (after slicing and literals): where the head dimension is born in a computed
tensor (per-head slopes from an arange), the kept heads' values are gathered by index_select."""
import pytest
import torch

from fxprune.passes.insert_gathers import InsertGathersPass
from tiny import SHAPES, calls, ids, logits, prune_heads, twin

aten = torch.ops.aten
KEPT = [1, 3]


def rewritten(with_gathers=True):
    return prune_heads("alibi", KEPT, *([InsertGathersPass] if with_gathers else []))


def test_the_slopes_of_the_kept_heads_are_gathered():
    _, gm = rewritten()
    gathers = calls(gm, aten.index_select)
    assert len(gathers) == 1
    source, dim, index = gathers[0].args
    assert source.target is aten.arange.start and source.args[:2] == (1, 5)  # all four heads' ids, as captured
    assert dim == 0 and index.op == "get_attr" and torch.equal(getattr(gm, index.target), torch.tensor(KEPT))
    assert [u.target for u in gathers[0].users] == [aten.mul.Tensor]  # the slopes are computed from the kept ids


@pytest.mark.parametrize("batch,seq", SHAPES)
def test_values_are_the_twin_with_the_kept_heads_slopes(batch, seq):
    model, gm = rewritten()
    x = ids(batch, seq)
    torch.testing.assert_close(logits(gm, x), twin(model, KEPT)(x).logits)
    _, no_gather = rewritten(with_gathers=False)  # without the pass the slopes keep all four heads
    with pytest.raises(RuntimeError, match="must match the size"):
        logits(no_gather, x)
