"""The graph check the rewrite registers with its PassManager runs after every pass and names what a
broken pass left; `rewrite` really runs it (run_checks_after_each_pass means something)."""
import pytest
import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

import fxprune.rewrite.emit
from fxprune.analysis.contracts import ContractError, check_graph
from tiny import analysed, group_of, run_passes


class DropsAnAttribute(PassBase):
    """Deletes the tensor that the last get_attr reads: the graph still lints, but cannot run."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def call(self, gm):
        read = [n for n in gm.graph.nodes if n.op == "get_attr"][-1]
        owner, _, leaf = read.target.rpartition(".")
        delattr(gm.get_submodule(owner), leaf)
        return PassResult(gm, True)


class UsesBeforeDefining(PassBase):
    def call(self, gm):
        nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
        nodes[0].append(nodes[-1])  # moves the last op before its inputs
        return PassResult(gm, True)


def contract_error(exc):
    """The ContractError in the chain of causes (the PassManager wraps what a pass or check raised)."""
    while exc is not None and not isinstance(exc, ContractError):
        exc = exc.__cause__
    return exc


def test_the_check_names_the_broken_read():
    _, dg = analysed("mlp")
    with pytest.raises(Exception) as info:
        run_passes(fxprune.rewrite.emit.copy_graph_module(dg), [DropsAnAttribute()])
    assert "DropsAnAttribute" in str(info.value)
    cause = contract_error(info.value)
    assert cause is not None and "target head.weight references nonexistent attribute" in str(cause)


def test_the_check_lints():
    _, dg = analysed("mlp")
    gm = fxprune.rewrite.emit.copy_graph_module(dg)
    UsesBeforeDefining()(gm)
    with pytest.raises(ContractError, match="used before it has been defined"):
        check_graph(gm)


def test_rewrite_runs_the_check_after_each_pass(monkeypatch):
    _, dg = analysed("attention")
    heads = group_of(dg, "heads")
    assert fxprune.rewrite.emit.rewrite(dg, {heads.atom_id: [0, 1]}) is not None
    monkeypatch.setattr(fxprune.rewrite.emit, "InsertGathersPass", DropsAnAttribute)
    with pytest.raises(Exception, match="DropsAnAttribute") as info:
        fxprune.rewrite.emit.rewrite(dg, {heads.atom_id: [0, 1]})
    assert contract_error(info.value) is not None
