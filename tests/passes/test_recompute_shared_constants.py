"""RecomputeSharedConstantsPass alone: a parameter-free tensor computed once and read by two layers
(per-head scales) gets one copy per consumer, so the layers' heads are no longer one dimension; the
graph computes the same values (eager at batch 1 and odd lengths)."""
import pytest
import torch
from transformers.modeling_outputs import CausalLMOutput

from fxprune.analysis.analyze import label
from fxprune.analysis.capture import capture
from fxprune.analysis.recompute_shared_constants import RecomputeSharedConstantsPass
from tiny import HEAD_DIM, HIDDEN, SHAPES, VOCAB, calls, flat, ids, logits

aten = torch.ops.aten
HEADS = 4


class SharedScales(torch.nn.Module):
    """Two layers; each scales its query heads by 2**-(i+1) for head i, computed once for both."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        from types import SimpleNamespace
        self.config = SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=64)
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.q = torch.nn.ModuleList(torch.nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False) for _ in range(2))
        self.o = torch.nn.ModuleList(torch.nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False) for _ in range(2))
        self.head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        B, S = input_ids.shape
        h = self.embed(input_ids)
        scale = torch.exp2(-torch.arange(1, HEADS + 1, device=h.device, dtype=torch.float32))[:, None]
        for q, o in zip(self.q, self.o):
            h = h + o((q(h).view(B, S, HEADS, HEAD_DIM) * scale).reshape(B, S, HEADS * HEAD_DIM))
        return CausalLMOutput(logits=self.head(h))


def head_leaves(dg, name):
    return {leaf.id for leaf in dg.table.leaves(dg.dims_of(name)[0])}


@pytest.fixture(scope="module")
def recomputed():
    model = SharedScales().eval()
    gm = flat(capture(model).gm)
    before = label(gm)
    assert head_leaves(before, "q.0.weight") & head_leaves(before, "q.1.weight")  # heads tied by the shared scale
    scale = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.unsqueeze.default)
    shared = {leaf.id for a in scale.meta["fxprune.dims"] for leaf in before.table.leaves(a) if int(leaf.size) > 1}
    RecomputeSharedConstantsPass(before.table, shared)(gm)
    return model, gm


def test_each_consumer_gets_its_own_copy(recomputed):
    _, gm = recomputed
    aranges, exp2s, scales = (calls(gm, op) for op in (aten.arange, aten.exp2, aten.unsqueeze))
    assert len(aranges) == len(exp2s) == len(scales) == 2
    muls = [n for n in calls(gm, aten.mul) if any(a in scales for a in n.args)]
    assert len(muls) == 2 and {a for m in muls for a in m.args if a in scales} == set(scales)  # one each
    assert all(len(s.users) == 1 for s in scales)
    after = label(gm)
    a, b = head_leaves(after, "q.0.weight"), head_leaves(after, "q.1.weight")
    assert len(a) == len(b) == 2 and not a & b  # [heads, head_dim]: each layer has its own heads now


@pytest.mark.parametrize("batch,seq", SHAPES)
def test_values_are_eager(recomputed, batch, seq):
    model, gm = recomputed
    x = ids(batch, seq)
    with torch.no_grad():
        torch.testing.assert_close(logits(gm, x), model(x).logits)
