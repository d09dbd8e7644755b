"""LiftLinearModulesPass alone: the three spellings of a projection on parameters (aten.linear,
matmul with a transposed weight plus a bias, GPT-2-style addmm on a weight stored [in, out]) become
nn.Linear submodules at the weights' owner paths, with eager values at batch 1 and odd lengths."""
import pytest
import torch

from fxprune.passes.lift_linear_modules import LiftLinearModulesPass
from tiny import calls, run_passes

aten = torch.ops.aten


class Holder(torch.nn.Module):
    """Parameters without a forward of their own, read by the parent's functional calls."""

    def __init__(self, *shape, bias: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(*shape))
        self.bias = torch.nn.Parameter(torch.randn(bias))


class ThreeSpellings(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.fc, self.conv = Holder(6, 4, bias=6), Holder(5, 6, bias=5), Holder(5, 3, bias=3)

    def forward(self, x):
        h = torch.nn.functional.linear(x, self.inp.weight, self.inp.bias)
        h = h @ self.fc.weight.T + self.fc.bias
        B, S, _ = h.shape
        return torch.addmm(self.conv.bias, h.reshape(-1, 5), self.conv.weight).view(B, S, 3)


@pytest.fixture(scope="module")
def lifted():
    model = ThreeSpellings().eval()
    batch, seq = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=2, max=16)
    ep = torch.export.export(model, (torch.randn(2, 5, 4),), dynamic_shapes={"x": {0: batch, 1: seq}}, strict=False)
    return model, run_passes(ep.module(), [LiftLinearModulesPass()])


def test_projections_become_linear_modules_at_their_owner_paths(lifted):
    model, gm = lifted
    modules = [n for n in gm.graph.nodes if n.op == "call_module" and n.target != "_guards_fn"]
    assert [n.target for n in modules] == ["inp", "fc", "conv"]
    assert all(type(gm.get_submodule(n.target)) is torch.nn.Linear for n in modules)
    assert not calls(gm, aten.linear) + calls(gm, aten.matmul) + calls(gm, aten.addmm) + calls(gm, aten.numpy_T)
    assert calls(gm, aten.add) == []  # the bias add after the matmul is folded into the module
    assert gm.inp.weight is model.inp.weight  # stored [out, in] already: the same tensor
    assert torch.equal(gm.conv.weight, model.conv.weight.T)  # stored [in, out]: transposed once
    assert (gm.fc.in_features, gm.fc.out_features, gm.conv.in_features, gm.conv.out_features) == (6, 5, 5, 3)


@pytest.mark.parametrize("batch,seq", [(1, 7), (3, 5), (2, 9)])
def test_values_are_eager(lifted, batch, seq):
    model, gm = lifted
    x = torch.randn(batch, seq, 4, generator=torch.Generator().manual_seed(batch * seq))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
