"""Families beyond the core ones: expected groups, zero-mask oracle, config twins with hidden
channels, projections lifted to nn.Linear, and hidden-channel pruning re-exported (Gemma-2's twin
given the original's embedding scale)."""
import copy
import functools

import pytest
import torch
import transformers as tf
from transformers.pytorch_utils import Conv1D

import fxprune
from fxprune.reconstruction.settings import Refit
from families import FAMILIES, falcon, falcon_mqa, gemma2, gpt2, gpt_neox, mistral, mixtral, opt, phi3, qwen2
from oracles import OUTPUT_PROJECTION_KINDS, inputs, module_inputs, random_scores, rel_err
from test_config_twin import uniform_plan

EAGER_ONLY = {"gemma2"}  # transformers has no sdpa path for Gemma-2
CASES = [(f, a) for f in FAMILIES for a in ("eager", "sdpa") if not (f in EAGER_ONLY and a == "sdpa")]
GQA = {"kv_groups": 2, "group_heads": 2, "mlp": 96}
MHA = {"heads": 4, "mlp": 96}
EXPECTED = {"mistral": GQA, "qwen2": GQA, "phi3": GQA, "gemma2": GQA, "falcon": GQA, "gpt2": MHA, "gpt_neox": MHA,
            "opt": MHA, "falcon_mqa": MHA, "mixtral": {**GQA, "mlp": 32}, "granite": GQA,
            "starcoder2": GQA}  # MQA: one KV head, query heads prune as heads


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@functools.lru_cache(maxsize=None)
def analysed(family, attn):
    model = FAMILIES[family](attn)
    return model, fxprune.analyze(model)


def zero_masked(model, dg, plan):
    """oracles.zero_masked, reading a Conv1D weight ([in, out]) along its first dim."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    params = dict(ref.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for gid, kept in plan.units.items():
            group = dg.groups[gid]
            assert group.kind in OUTPUT_PROJECTION_KINDS, group.kind
            keep = torch.zeros(group.n_units, dtype=torch.bool)
            keep[kept] = True
            for m in group.members:
                w = params.get(m.name)
                conv = isinstance(modules.get(m.name.rpartition(".")[0]), Conv1D)
                if w is None or w.dim() < 2 or m.dim != (0 if conv else w.dim() - 1):
                    continue
                removed = (m.unit_of >= 0) & ~keep[m.unit_of.clamp(min=0)]
                w.index_fill_(m.dim, removed.nonzero().flatten(), 0.0)
    return ref


@pytest.mark.parametrize("family,attn", CASES)
def test_expected_groups_and_nothing_frozen(family, attn):
    model, dg = analysed(family, attn)
    assert dg.frozen_ops == [], dg.summary()
    for layer in (0, 1):
        got = {g.kind: g.n_units for g in dg.groups if g.layer == layer and g.kind in EXPECTED[family]}
        assert got == EXPECTED[family], (layer, dg.summary())
    hidden = dg.by_kind("hidden")
    assert len(hidden) == 1 and hidden[0].n_units == 64


@pytest.mark.parametrize("ratio", [0.2, 0.5])
@pytest.mark.parametrize("family,attn", CASES)
def test_zero_mask(family, attn, ratio):
    model, dg = analysed(family, attn)
    plan = fxprune.plan(model, ratio, scores=random_scores(dg, int(ratio * 10)), dg=dg, allocation="global")
    gm = fxprune.apply(model, plan, dg=dg)
    assert abs(plan.removed_fraction - ratio) <= 0.01
    assert len({len(u) for u in plan.units.values()}) > 1, "selection should be non-uniform"
    ids, mask = inputs()
    with torch.no_grad():
        expected = zero_masked(model, dg, plan)(ids, attention_mask=mask).logits
        got = gm(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert rel_err(got[keep], expected[keep]) < 1e-5
    assert sum(p.numel() for p in gm.parameters()) == plan.params_after


def test_heads_are_pruned_in_every_family():
    # At 0.5 with heads scored low, every family gives up heads (or KV groups), not only MLP channels.
    for family, attn in [(f, "eager") for f in FAMILIES]:
        model, dg = analysed(family, attn)
        scores = {g.id: torch.rand(g.n_units) * (0.01 if g.kind in ("heads", "kv_groups") else 1) for g in dg.groups}
        plan = fxprune.plan(model, 0.5, scores=scores, dg=dg, allocation="global")
        assert {dg.groups[g].kind for g in plan.units} & {"heads", "kv_groups"}, family


# -- projections as nn.Linear ---------------------------------------------------------------------
@pytest.mark.parametrize("family,projections", [
    ("gpt2", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),  # Conv1D: addmm(b, x2d, W[in, out])
    ("falcon_mqa", ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                    "mlp.dense_4h_to_h"]),  # matmul(x, numpy_T(W)) + b
])
def test_projections_lifted_to_linear(family, projections):
    from peft import LoraConfig, get_peft_model
    model, dg = analysed(family, "sdpa")
    plan = fxprune.plan(model, 0.3, scores=random_scores(dg), dg=dg)
    gm = fxprune.apply(model, plan, dg=dg)
    aten = torch.ops.aten
    assert not [n for n in gm.graph.nodes if n.target in (aten.addmm.default, aten.numpy_T.default)]
    for layer in (0, 1):
        for p in projections:
            lin = gm.get_submodule(f"transformer.h.{layer}.{p}")
            assert isinstance(lin, torch.nn.Linear) and lin.bias is not None
    ids, mask = inputs()
    with torch.no_grad():
        before = gm(ids, attention_mask=mask).logits
        lora = get_peft_model(gm, LoraConfig(r=4, target_modules=[p.split(".")[-1] for p in projections]))
        assert sum("lora_A" in n for n, _ in lora.named_parameters()) == 2 * len(projections)
        assert torch.allclose(lora(ids, attention_mask=mask).logits, before, atol=1e-6)  # LoRA B starts at 0


@pytest.mark.parametrize("family", ["gpt2", "falcon_mqa", "mixtral"])
def test_save_load_round_trip(family, tmp_path):
    # load() rebuilds the architecture without weights: GPT-2's transposed Conv1D weights must come back
    # in the lifted layout, Falcon's constant index tensors take their values, and Mixtral's expert
    # histogram must trace the CPU branch (transformers uses an int histc, which CPU lacks, elsewhere).
    model, dg = analysed(family, "sdpa")
    plan = fxprune.plan(model, 0.3, targets=("heads", "mlp", "hidden"), scores=random_scores(dg), dg=dg)
    gm = fxprune.apply(model, plan, dg=dg)
    fxprune.save(gm, tmp_path / "pruned")
    loaded = fxprune.load(tmp_path / "pruned")
    ids, mask = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, gm(ids, attention_mask=mask).logits)


# -- config twins (uniform selections, hidden channels included) ------------------------------------
def twin_of(model, cls, keep, small_cfg, attn, transpose=()):
    """(plan, pruned GraphModule, `cls` built with `small_cfg` holding the pruned weights) for `keep`."""
    plan, gm = uniform_plan(model, keep)
    small_cfg._attn_implementation = attn
    small = cls(small_cfg).eval()
    state = {k: (v.t() if k.rpartition(".")[0].rsplit(".", 1)[-1] in transpose else v) for k, v in gm.state_dict().items()}
    missing, unexpected = small.load_state_dict(state, strict=False)
    assert all("lifted_tensor" in k for k in unexpected), unexpected  # graph constants (Falcon's index tensors)
    assert set(missing) <= {"lm_head.weight"}, missing  # tied to the embedding
    return plan, gm, small


def twin_error(model, cls, keep, small_cfg, attn, transpose=()):
    _, gm, small = twin_of(model, cls, keep, small_cfg, attn, transpose)
    ids, mask = inputs()
    with torch.no_grad():
        return rel_err(gm(ids, attention_mask=mask).logits, small(ids, attention_mask=mask).logits)


def smaller(model, **changes):
    return type(model.config)(**{**model.config.to_dict(), **changes})


GQA_KEEP = {"kv_groups": [1], "mlp": list(range(0, 96, 2)), "hidden": list(range(1, 64, 2))}
MHA_KEEP = {"heads": [0, 3], "mlp": list(range(0, 96, 2)), "hidden": list(range(1, 64, 2))}
TWINS = {  # family: (build, keep, config changes, Conv1D module names whose weights are stored [in, out])
    "mistral": (mistral, GQA_KEEP, dict(hidden_size=32, intermediate_size=48, num_attention_heads=2,
                                        num_key_value_heads=1), ()),
    "qwen2": (qwen2, GQA_KEEP, dict(hidden_size=32, intermediate_size=48, num_attention_heads=2,
                                    num_key_value_heads=1), ()),
    "phi3": (phi3, GQA_KEEP, dict(hidden_size=32, intermediate_size=48, num_attention_heads=2,
                                  num_key_value_heads=1), ()),
    "mixtral": (mixtral, {**GQA_KEEP, "mlp": list(range(0, 32, 2))},
                dict(hidden_size=32, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1), ()),
    "falcon": (falcon, GQA_KEEP, dict(hidden_size=32, ffn_hidden_size=48, num_attention_heads=2, num_kv_heads=1), ()),
    "falcon_mqa": (falcon_mqa, MHA_KEEP, dict(hidden_size=32, ffn_hidden_size=48, num_attention_heads=2), ()),
    "gpt_neox": (gpt_neox, MHA_KEEP, dict(hidden_size=32, intermediate_size=48, num_attention_heads=2), ()),
    "opt": (opt, MHA_KEEP, dict(hidden_size=32, ffn_dim=48, word_embed_proj_dim=32, num_attention_heads=2), ()),
    "gpt2": (gpt2, MHA_KEEP, dict(n_embd=32, n_inner=48, n_head=2), ("c_attn", "c_proj", "c_fc")),
}


@pytest.mark.parametrize("family", list(TWINS))
def test_config_twin(family):
    build, keep, changes, transpose = TWINS[family]
    model = build("sdpa")
    assert twin_error(model, type(model), keep, smaller(model, **changes), "sdpa", transpose) < 1e-5


def test_gemma2_twin_without_hidden():
    # Gemma scales embeddings by sqrt(hidden_size): a config with fewer hidden channels would scale by
    # another constant than the pruned model (which keeps the original's), so hidden is tested below.
    model = gemma2("eager")
    keep = {"kv_groups": [0], "mlp": list(range(20, 68))}
    cfg = smaller(model, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1)
    assert twin_error(model, tf.Gemma2ForCausalLM, keep, cfg, "eager") < 1e-5


HIDDEN_TWINS = {  # family: (build, attention, kept units, the smaller config)
    "gemma2": (gemma2, "eager", {"kv_groups": [0], "mlp": list(range(20, 68)), "hidden": list(range(0, 64, 2))},
               dict(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1)),
    "mixtral": (mixtral, "sdpa", {"kv_groups": [1], "mlp": list(range(0, 32, 2)), "hidden": list(range(1, 64, 2))},
                dict(hidden_size=32, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1)),
}


@pytest.mark.parametrize("family", HIDDEN_TWINS)
def test_hidden_pruning_equals_its_twin_counts_and_reexports(family):
    build, attn, keep, changes = HIDDEN_TWINS[family]
    model = build(attn)
    plan, gm, small = twin_of(model, type(model), keep, smaller(model, **changes), attn)
    if family == "gemma2":  # the pruned model keeps the original's embedding scale, sqrt(64), not sqrt(32)
        small.model.embed_tokens.embed_scale.copy_(model.model.embed_tokens.embed_scale)
    assert "hidden" in plan.config.targets
    assert sum(p.numel() for p in gm.parameters()) == plan.params_after == sum(p.numel() for p in small.parameters())
    ids, mask = inputs()
    with torch.no_grad():
        logits = gm(ids, attention_mask=mask).logits
        assert rel_err(logits, small(ids, attention_mask=mask).logits) < 1e-5
    ep = torch.export.export(gm, (ids,), {"attention_mask": mask}, strict=False)
    assert torch.allclose(ep.module()(ids, attention_mask=mask).logits, logits)


@pytest.mark.parametrize("family", ["falcon", "phi3"])
def test_zero_mask_query_heads_within_groups(family):
    # gqa="heads": query heads inside each KV group go. Falcon reaches its k/v slots through
    # constant index tensors ([-2], [-1]) after the query slots; Phi-3 slices a fused qkv_proj.
    model, dg = analysed(family, "eager")
    scores = {g.id: torch.rand(g.n_units) * (0.01 if g.kind == "group_heads" else 1) for g in dg.groups}
    plan = fxprune.plan(model, 0.3, scores=scores, dg=dg, gqa="heads")
    assert "group_heads" in {dg.groups[g].kind for g in plan.units}
    gm = fxprune.apply(model, plan, dg=dg)
    ids, mask = inputs()
    with torch.no_grad():
        expected = zero_masked(model, dg, plan)(ids, attention_mask=mask).logits
        got = gm(ids, attention_mask=mask).logits
    assert rel_err(got[mask.bool()], expected[mask.bool()]) < 1e-5


class Slots(torch.nn.Module):
    """Four query slots and a k slot read by a constant index, as Falcon's fused QKV."""

    def __init__(self, index):
        super().__init__()
        torch.manual_seed(0)
        self.config, self.index = tf.PretrainedConfig(vocab_size=128), index
        self.emb, self.up = torch.nn.Embedding(128, 64), torch.nn.Linear(64, 6 * 16)
        self.down, self.head = torch.nn.Linear(4 * 16, 64), torch.nn.Linear(64, 128)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.up(self.emb(input_ids)).view(*input_ids.shape, 6, 16)
        y = (h[:, :, :4] * h[:, :, self.index]).flatten(2)
        return self.head(self.down(y))


@pytest.mark.parametrize("index,prunable", [([-2], True), ([4], False)])
def test_constant_index_keeps_the_positions_it_counts(index, prunable):
    # [-2] counts from the end: the query slots before it may go. [4] counts from the start:
    # removing a query slot would move the slot it reads, so they stay (no group of 4).
    model = Slots(index).eval()
    dg = fxprune.analyze(model)
    slots = [g for g in dg.groups if g.n_units == 4]
    assert bool(slots) == prunable and dg.frozen_ops == []
    if prunable:
        scores = {g.id: torch.ones(g.n_units) for g in dg.groups}
        scores[slots[0].id] = torch.tensor([1.0, 0.1, 1.0, 1.0])  # slot 1 goes
        plan = fxprune.plan(model, slots[0].params_per_unit / dg.num_parameters(), targets=("mlp",),
                            scores=scores, dg=dg, allocation="global")
        assert plan.units == {slots[0].id: [0, 2, 3]}
        gm = fxprune.apply(model, plan, dg=dg)
        ids, mask = inputs()
        with torch.no_grad():
            expected = zero_masked(model, dg, plan)(ids)
            assert rel_err(gm(ids, attention_mask=mask).logits, expected) < 1e-5


CAL = torch.randint(1, 128, (8, 12), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reconstruction_refits_and_brings_every_family_closer_to_dense(family):
    """The refit finds each projection's input (GPT-2's Conv1D is addmm(bias, x, W): x is its second
    argument) and the stream it is added to, or none (parallel branches, post-norms), in every family."""
    model, dg = analysed(family, "eager" if family in EAGER_ONLY else "sdpa")
    errors = {}
    # heads scored low so that every family loses some (Mixtral's experts are 3-D parameters, which no refit reaches)
    scores = {g.id: torch.rand(g.n_units, generator=torch.Generator().manual_seed(g.id))
              * (0.01 if g.kind in ("heads", "kv_groups") else 1) for g in dg.groups}
    for mode in ("none", "lstsq"):
        plan = fxprune.plan(model, 0.25, targets=("heads", "mlp"), scores=scores, allocation="global",
                            dg=dg, reconstruct=Refit(mode=mode, ridge=0.1), calibration=CAL)
        gm = fxprune.apply(model, plan, calibration=CAL, dg=dg)
        with torch.no_grad():
            errors[mode] = rel_err(gm(CAL).logits, model(CAL).logits)
    assert errors["lstsq"] < errors["none"]


def test_conv1d_input_statistics_are_those_of_its_input_not_its_bias():
    from fxprune.scoring.activations import input_statistics
    model, dg = analysed("gpt2", "sdpa")
    x = module_inputs(model.transformer.h[1].mlp.c_proj, lambda: model(CAL))
    stats = input_statistics(dg, CAL.split(4))["transformer.h.1.mlp.c_proj.weight"]
    assert stats.tokens == x.shape[0]
    assert torch.allclose(stats.mean.double(), x.double().mean(0), atol=1e-6)


def test_conv1d_gram_is_weighted_by_the_stream_after_its_biased_output():
    """GPT-2's MLP c_proj: x is addmm's second argument, the output includes its bias, and the token weights
    are 1 / mean square of the stream after the add (ln_2's input plus the output), as the refit's."""
    from fxprune.scoring.activations import input_statistics
    model, dg = analysed("gpt2", "sdpa")
    block = model.transformer.h[1]
    x = module_inputs(block.mlp.c_proj, lambda: model(CAL)).double()
    stream = module_inputs(block.ln_2, lambda: model(CAL)).double()
    out = x @ block.mlp.c_proj.weight.detach().double() + block.mlp.c_proj.bias.detach().double()
    energy = 1.0 / (stream + out).pow(2).mean(-1)
    xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    name = "transformer.h.1.mlp.c_proj.weight"
    stats = input_statistics(dg, CAL.split(4), {name}, gram={(name, 0)})[name]
    assert stats.weight_scale == pytest.approx(float(energy.mean()), rel=1e-4)
    assert torch.allclose(stats.gram.double(), (xa * energy[:, None]).t() @ xa / energy.mean(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_obs_scores_conv1d_and_parallel_residual_families(family):
    """obs reads each projection's Gram matrix weighted by the stream it is added to, when there is one; each
    MLP group's scores are the greedy OBS errors of its down projection, the weight read as [out, in] (GPT-2's
    Conv1D stores it [in, out]), in the units of the normalised stream."""
    from fxprune.planning.plan import target_groups
    from fxprune.scoring import score
    from fxprune.scoring.activations import gram_members, input_statistics
    from fxprune.scoring.gradients import member_names
    from fxprune.scoring.obs import greedy_scores
    model, dg = analysed(family, "sdpa")
    groups = target_groups(dg, fxprune.PruneConfig(ratio=0.2))
    stats = input_statistics(dg, CAL.split(4), member_names(dg, groups), gram=gram_members(groups))
    scores = score(dg, groups, "obs", CAL.split(4), inputs=stats)
    assert all(torch.isfinite(scores[g.id]).all() for g in groups if g.kind in ("mlp", "heads"))
    mlp = [g for g in groups if g.kind == "mlp"]
    assert mlp
    for g in mlp:
        (member,) = [m for m in g.members if m.name in stats and stats[m.name].dim == m.dim]  # the down projection
        weight = dg.parameters[member.name].detach()
        weight = weight.t() if member.dim == 0 else weight
        expected = greedy_scores(weight, stats[member.name].gram, member.unit_of, g.n_units, 0.01)
        assert torch.allclose(scores[g.id], expected * stats[member.name].weight_scale, rtol=1e-5)
