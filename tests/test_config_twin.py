"""Config twin: a uniform selection (hidden channels included) equals the HF class built small."""
import pytest
import torch
import transformers as tf

import fxprune
from models import bloom, glm, llama
from oracles import inputs, rel_err


def uniform_plan(model, keep):
    """Keep, in every group of a kind, the units listed in keep[kind]; returns (plan, gm)."""
    dg = fxprune.analyze(model)
    scores = {}
    for g in dg.groups:
        s = torch.zeros(g.n_units)
        if g.kind in keep:
            s[keep[g.kind]] = 1.0
        scores[g.id] = s
    n = {k: len(v) for k, v in keep.items()}
    before = dg.num_parameters()
    counts = {g.atom_id: n[g.kind] for g in dg.groups if g.kind in keep}
    ratio = 1 - dg.count_parameters(counts) / before
    targets = tuple({"kv_groups": "heads", "heads": "heads", "mlp": "mlp", "hidden": "hidden", "experts": "experts"}[k]
                    for k in keep)
    plan = fxprune.plan(model, ratio, targets=targets, scores=scores, dg=dg)
    return plan, fxprune.apply(model, plan, dg=dg)


def twin(cls, cfg, gm, attn):
    cfg._attn_implementation = attn
    small = cls(cfg).eval()
    missing, unexpected = small.load_state_dict(gm.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing  # tied to the embedding
    return small


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llama_twin(attn):
    model = llama(attn)
    keep = {"kv_groups": [1], "mlp": list(range(0, 96, 2)), "hidden": list(range(1, 64, 2))}
    plan, gm = uniform_plan(model, keep)
    cfg = tf.LlamaConfig(**{**model.config.to_dict(), "hidden_size": 32, "intermediate_size": 48,
                            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16})
    small = twin(tf.LlamaForCausalLM, cfg, gm, attn)
    ids, mask = inputs()
    assert rel_err(gm(ids, attention_mask=mask).logits, small(ids, attention_mask=mask).logits) < 1e-5


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_glm_twin(attn):
    model = glm(attn)
    keep = {"kv_groups": [0], "mlp": list(range(10, 58)), "hidden": list(range(0, 64, 2))}
    plan, gm = uniform_plan(model, keep)
    cfg = tf.GlmConfig(**{**model.config.to_dict(), "hidden_size": 32, "intermediate_size": 48,
                          "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16})
    small = twin(tf.GlmForCausalLM, cfg, gm, attn)
    ids, mask = inputs()
    assert rel_err(gm(ids, attention_mask=mask).logits, small(ids, attention_mask=mask).logits) < 1e-5


def test_bloom_twin():
    # ALiBi slopes of heads 1 and 3 of 4 are exactly the slopes of a 2-head Bloom; Bloom ties
    # head_dim = hidden / heads and the MLP to 4 x hidden, so all three shrink together.
    model = bloom("eager")
    keep = {"heads": [1, 3], "mlp": list(range(0, 256, 2)), "hidden": list(range(0, 64, 2))}
    plan, gm = uniform_plan(model, keep)
    cfg = tf.BloomConfig(**{**model.config.to_dict(), "hidden_size": 32, "n_head": 2})
    small = twin(tf.BloomForCausalLM, cfg, gm, "eager")
    ids, mask = inputs()
    assert rel_err(gm(ids, attention_mask=mask).logits, small(ids, attention_mask=mask).logits) < 1e-5
