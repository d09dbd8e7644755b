"""Property tests: random tiny LLaMA, GLM and Bloom configs, and per-head norms under any query / key-value
head counts, with random plans keep the zero-mask oracle, and planning is a function of its seed and inputs.

Export is the cost (1-3 s), so configs come from a small space and each is analysed once
(`analysed` is cached); every example then draws its own plan on that analysis.
"""
import functools

import pytest
import torch
import transformers as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import fxprune
from fxprune.planning.config import PruneConfig
from fxprune.planning.plan import target_groups
from coupling_models import HEAD_DIM, INNER, PerHeadNormGQA
from models import build
from oracles import inputs, random_scores, rel_err, zero_masked

HIDDEN = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@st.composite
def configs(draw):
    """(family, heads, kv_heads, head_dim, intermediate, layers): a hashable key for `analysed`.
    Kept to 24 configs in all, since each costs an export: MQA and GQA (MHA: Bloom), and the
    intermediate size drawn together with the layer count."""
    family = draw(st.sampled_from(["llama", "glm", "bloom"]))
    head_dim = draw(st.sampled_from([8, 16]))
    if family == "bloom":  # hidden = heads x head_dim, MLP = 4 x hidden
        heads, layers = draw(st.sampled_from([2, 4])), draw(st.sampled_from([1, 2]))
        return family, heads, heads, head_dim, 4 * heads * head_dim, layers
    heads, kv = draw(st.sampled_from([(2, 1), (4, 2)]))
    intermediate, layers = draw(st.sampled_from([(24, 2), (40, 1)]))
    return family, heads, kv, head_dim, intermediate, layers


@st.composite
def per_head_gqa_configs(draw):
    """Keys of coupling_models.PerHeadNormGQA (per-head query and key norms; its own head_dim, MLP and one
    layer) with 1-3 KV heads of 1-3 query heads each (MQA, GQA, MHA), grouped or repeated to the queries:
    8 configs in all, since each costs an export."""
    family = draw(st.sampled_from(["per_head_gqa", "per_head_repeat_kv"]))
    kv, per_group = draw(st.sampled_from([(1, 3), (2, 1), (2, 3), (3, 2)]))
    return family, kv * per_group, kv, HEAD_DIM, INNER, 1


def make(family, heads, kv, head_dim, intermediate, layers):
    if family.startswith("per_head"):
        return PerHeadNormGQA(heads, kv, repeat=family == "per_head_repeat_kv").eval()
    common = dict(vocab_size=128, num_hidden_layers=layers, num_attention_heads=heads)
    if family == "bloom":  # hidden = heads x head_dim, MLP = 4 x hidden
        return build(tf.BloomForCausalLM, tf.BloomConfig(**common, hidden_size=heads * head_dim), "eager")
    cls, cfg = (tf.LlamaForCausalLM, tf.LlamaConfig) if family == "llama" else (tf.GlmForCausalLM, tf.GlmConfig)
    return build(cls, cfg(**common, hidden_size=HIDDEN, intermediate_size=intermediate, num_key_value_heads=kv,
                          head_dim=head_dim, pad_token_id=0), "sdpa")


@functools.lru_cache(maxsize=None)
def analysed(key):
    model = make(*key)
    return model, fxprune.analyze(model)


def reachable(dg, gqa):
    """The largest fraction of parameters that heads and MLP channels can give (one unit kept each)."""
    groups = target_groups(dg, PruneConfig(targets=("heads", "mlp"), gqa=gqa))
    return 1 - dg.count_parameters({g.atom_id: 1 for g in groups}) / dg.num_parameters()


@settings(max_examples=110, deadline=None, derandomize=True)
@given(key=configs(), seed=st.integers(0, 2**16), share=st.floats(0.1, 0.8), gqa=st.sampled_from(["groups", "heads"]))
def test_random_plans_keep_the_zero_mask_oracle(key, seed, share, gqa):
    check_zero_mask(key, seed, share, gqa)


def check_zero_mask(key, seed, share, gqa):
    """A random plan of `share` of the reachable ratio keeps the zero-mask oracle and the exact count."""
    model, dg = analysed(key)
    ratio = share * reachable(dg, gqa)
    try:
        plan = fxprune.plan(model, ratio, scores=random_scores(dg, seed), dg=dg, allocation="global", gqa=gqa)
    except fxprune.PlanError as exc:
        # The planner's contract: the ratio within 1%, or PlanError saying what it reached. The greedy global
        # ranking can miss a reachable ratio on these tiny models (coarse heads of 5-10% each); no model exists
        # to check then.
        assert "cannot be met" in str(exc) and "allows" in str(exc)
        return
    assert abs(plan.removed_fraction - ratio) <= 0.01
    gm = fxprune.apply(model, plan, dg=dg)
    assert sum(p.numel() for p in gm.parameters()) == plan.params_after
    ids, mask = inputs(vocab=model.config.vocab_size, seed=seed)
    with torch.no_grad():
        expected = zero_masked(model, dg, plan)(ids, attention_mask=mask).logits
        got = gm(ids, attention_mask=mask).logits
    assert rel_err(got[mask.bool()], expected[mask.bool()]) < 1e-5


@settings(max_examples=16, deadline=None, derandomize=True)
@given(key=per_head_gqa_configs(), seed=st.integers(0, 2**16), share=st.floats(0.1, 0.8),
       gqa=st.sampled_from(["groups", "heads"]))
def test_per_head_norms_keep_the_zero_mask_oracle_for_any_head_counts(key, seed, share, gqa):
    check_zero_mask(key, seed, share, gqa)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(key=configs(), seed=st.integers(0, 2**16), share=st.floats(0.1, 0.8),
       importance=st.sampled_from(["random", "l2", "element1"]), allocation=st.sampled_from(["uniform", "global"]))
def test_same_seed_and_inputs_give_the_same_plan(key, seed, share, importance, allocation):
    model, dg = analysed(key)
    ratio = share * reachable(dg, "groups")
    ids, _ = inputs(seed=seed)

    def outcome():  # the plan, or why none meets the ratio (the greedy planner can miss a reachable one)
        try:
            return fxprune.plan(model, ratio, importance=importance, calibration=ids, seed=seed, dg=dg,
                                allocation=allocation).to_json()
        except fxprune.PlanError as exc:
            return str(exc)

    assert outcome() == outcome()


def test_a_fresh_analysis_gives_the_same_plan():
    key = ("llama", 4, 2, 16, 24, 2)
    model, dg = analysed(key)
    ids, _ = inputs()
    kw = dict(importance="element1", calibration=ids, seed=3, allocation="global")
    assert fxprune.plan(model, 0.15, dg=dg, **kw).to_json() == fxprune.plan(model, 0.15, **kw).to_json()
