"""NormalizeSignaturePass alone: export's flat signature (input_ids, attention_mask, use_cache) becomes
`gm(input_ids, attention_mask=None)` returning `.logits`; eager values at batch 1 and odd lengths."""
import pytest
import torch

from fxprune.analysis.capture import capture
from fxprune.passes.normalize_signature import NormalizeSignaturePass
from tiny import TinyMLP, flat, ids, run_passes


@pytest.fixture(scope="module")
def normalized():
    model = TinyMLP().eval()
    gm = flat(capture(model).gm)
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["input_ids", "attention_mask", "use_cache"]
    return model, run_passes(gm, [NormalizeSignaturePass()])


def test_the_signature_is_a_causal_lms(normalized):
    _, gm = normalized
    nodes = list(gm.graph.nodes)
    assert [n.name for n in nodes if n.op == "placeholder"] == ["input_ids", "attention_mask"]
    mask = next(n for n in nodes if n.name == "attention_mask")
    assert mask.args == (None,)  # attention_mask=None by default
    default = next(n for n in nodes if n.op == "call_module" and n.target == "_fxprune_default_mask")
    assert default.args == (nodes[[n.name for n in nodes].index("input_ids")], mask)
    assert list(mask.users) == [default]
    output = nodes[-1].args[0]
    assert output.op == "call_module" and output.target == "_fxprune_output"


@pytest.mark.parametrize("batch,seq", [(1, 7), (3, 5)])
def test_values_are_eager_with_and_without_a_mask(normalized, batch, seq):
    model, gm = normalized
    x = ids(batch, seq)
    with torch.no_grad():
        expected = model(x).logits
        torch.testing.assert_close(gm(x).logits, expected)
        torch.testing.assert_close(gm(x, attention_mask=torch.ones_like(x)).logits, expected)


def test_an_input_the_graph_uses_is_named():
    class Uses(torch.nn.Module):
        def forward(self, input_ids, attention_mask, position_ids):
            return (input_ids + position_ids,)

    gm = torch.fx.symbolic_trace(Uses())
    with pytest.raises(ValueError, match="input 'position_ids' is used by the graph"):
        NormalizeSignaturePass()(gm)
