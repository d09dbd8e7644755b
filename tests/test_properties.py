"""Property tests: random tiny LLaMA, GLM and Bloom configs with random plans keep the zero-mask
oracle, and planning is a function of its seed and inputs.

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
from models import build
from oracles import inputs, random_scores, rel_err, zero_masked

HIDDEN = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@st.composite
def configs(draw):
    """(family, heads, kv_heads, head_dim, intermediate, layers): a hashable key for `analysed`."""
    family = draw(st.sampled_from(["llama", "glm", "bloom"]))
    heads = draw(st.sampled_from([2, 4]))
    kv = heads if family == "bloom" else draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0]))
    head_dim = draw(st.sampled_from([8, 16]))
    intermediate = 4 * heads * head_dim if family == "bloom" else draw(st.sampled_from([24, 40]))
    return family, heads, kv, head_dim, intermediate, draw(st.sampled_from([1, 2]))


def make(family, heads, kv, head_dim, intermediate, layers):
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


@settings(max_examples=160, deadline=None, derandomize=True)
@given(key=configs(), seed=st.integers(0, 2**16), ratio=st.floats(0.05, 0.3), gqa=st.sampled_from(["groups", "heads"]))
def test_random_plans_keep_the_zero_mask_oracle(key, seed, ratio, gqa):
    model, dg = analysed(key)
    plan = fxprune.plan(model, ratio, scores=random_scores(dg, seed), dg=dg, allocation="global", gqa=gqa)
    assert abs(plan.removed_fraction - ratio) <= 0.01
    gm = fxprune.apply(model, plan, dg=dg)
    assert sum(p.numel() for p in gm.parameters()) == plan.params_after
    ids, mask = inputs(seed=seed)
    with torch.no_grad():
        expected = zero_masked(model, dg, plan)(ids, attention_mask=mask).logits
        got = gm(ids, attention_mask=mask).logits
    assert rel_err(got[mask.bool()], expected[mask.bool()]) < 1e-5


@settings(max_examples=60, deadline=None, derandomize=True)
@given(key=configs(), seed=st.integers(0, 2**16), ratio=st.floats(0.05, 0.3),
       importance=st.sampled_from(["random", "l2", "element1"]), allocation=st.sampled_from(["uniform", "global"]))
def test_same_seed_and_inputs_give_the_same_plan(key, seed, ratio, importance, allocation):
    model, dg = analysed(key)
    ids, _ = inputs(seed=seed)

    def plan():
        return fxprune.plan(model, ratio, importance=importance, calibration=ids, seed=seed, dg=dg,
                            allocation=allocation).to_json()

    assert plan() == plan()
