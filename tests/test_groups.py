"""Dependency analysis finds exactly the expected groups, from op semantics alone."""
import pytest
import torch

import fxprune
from models import FAMILIES

# Per decoder layer (2 layers each): kinds and unit counts of the prunable groups, plus one hidden group.
EXPECTED = {
    "llama_mha": {"heads": 4, "mlp": 96},
    "llama_gqa": {"kv_groups": 2, "group_heads": 2, "mlp": 96},
    "glm": {"kv_groups": 2, "group_heads": 2, "mlp": 96},
    "glm4": {"kv_groups": 2, "group_heads": 2, "mlp": 96},
    "bloom": {"heads": 4, "mlp": 256},
    "baichuan7b": {"heads": 4, "mlp": 96},
    "baichuan13b": {"heads": 4, "mlp": 96},
    "chatglm": {"kv_groups": 2, "group_heads": 2, "mlp": 96},
}
CASES = [(f, a) for f in FAMILIES for a in ("eager", "sdpa") if not (f == "bloom" and a == "sdpa")]


def per_layer(dg, layer):
    return {g.kind: g.n_units for g in dg.groups if g.layer == layer and g.kind in ("heads", "kv_groups", "group_heads", "mlp")}


@pytest.mark.parametrize("family,attn", CASES)
def test_expected_groups(family, attn):
    model = FAMILIES[family](attn)
    dg = fxprune.analyze(model)
    for layer in (0, 1):
        assert per_layer(dg, layer) == EXPECTED[family], (layer, dg.summary())
    hidden = dg.by_kind("hidden")
    assert len(hidden) == 1 and hidden[0].n_units == 64
    names = {m.name for m in hidden[0].members}
    norms = {n for n, p in model.named_parameters() if p.dim() == 1 and "norm" in n and "bias" not in n}
    assert norms <= names  # the residual stream runs through every norm
    for g in dg.by_kind("heads"):
        assert g.unit_size == 16  # head_dim rows per unit in its narrowest member
    for g in dg.by_kind("kv_groups"):  # one k head (16 rows), or its query heads in a fused member
        assert g.unit_size % 16 == 0
    for g in dg.by_kind("mlp"):
        assert g.unit_size == 1
        rows = [m for m in g.members if m.dim == 0 and dg.parameters[m.name].dim() == 2]
        cols = [m for m in g.members if m.dim == 1]
        assert rows and len(cols) == 1


def test_groups_do_not_depend_on_names():
    model = FAMILIES["llama_gqa"]("sdpa")
    plain = fxprune.analyze(model)

    class Renamed(torch.nn.Module):  # same computation, every submodule under another name
        def __init__(self, m):
            super().__init__()
            self.config = m.config
            self.trunk = m.model
            self.head = m.lm_head

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            h = self.trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache).last_hidden_state
            return torch.nn.functional.linear(h, self.head.weight)

    wrapped = Renamed(model)
    renamed = fxprune.analyze(wrapped)
    shape = lambda dg: sorted((g.kind, g.n_units, g.layer, len(g.members)) for g in dg.groups)
    assert shape(renamed) == shape(plain)


def test_graph_and_dot_exports(tmp_path):
    dg = fxprune.analyze(FAMILIES["llama_gqa"]("sdpa"))
    g = dg.groups[0].graph
    assert g.number_of_nodes() > 0 and g.number_of_edges() > 0
    nx_graph = dg.to_networkx()
    assert nx_graph.number_of_nodes() == len(dg.groups) + len({(m.name, m.dim) for g in dg.groups for m in g.members})
    assert dg.to_dot().startswith("graph fxprune {")
    dg.draw(tmp_path / "layer0.png", layer=0)
    assert (tmp_path / "layer0.png").stat().st_size > 10_000
