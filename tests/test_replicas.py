"""The remote-code replicas must be faithful enough to stand in for the real models:
eager == SDPA, torch.export round-trips at a new shape, and padding is handled."""
import math

import pytest
import torch

from replicas import REPLICAS, BaichuanConfig, ChatGLMConfig, alibi_slopes, tiny_baichuan13b, tiny_chatglm
from replicas.chatglm import apply_rotary_pos_emb

ATTN = ["eager", "sdpa"]


def _inputs(batch, seq, seed=0, pad_row=None, pad=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_row is not None:
        mask[pad_row, :pad] = 0
    return ids, mask


def _export(model):
    ids, mask = _inputs(2, 8)
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=128)
    dynamic_shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}, "use_cache": None}
    return torch.export.export(model, (ids,), kwargs={"attention_mask": mask, "use_cache": False},
                               strict=False, dynamic_shapes=dynamic_shapes)


@pytest.mark.parametrize("name", REPLICAS)
def test_eager_matches_sdpa(name):
    ids, mask = _inputs(3, 10, pad_row=1, pad=4)
    eager, sdpa = REPLICAS[name]("eager"), REPLICAS[name]("sdpa")
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    with torch.no_grad():
        a, b = eager(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("name", REPLICAS)
def test_export_matches_eager_at_new_shape(name, attn):
    model = REPLICAS[name](attn)
    gm = _export(model).module()
    ids, mask = _inputs(3, 11, seed=1, pad_row=0, pad=3)
    with torch.no_grad():
        # The exported module's input spec includes use_cache, so it must be passed.
        got = gm(ids, attention_mask=mask, use_cache=False).logits
        want = model(ids, attention_mask=mask).logits
    assert got.shape == (3, 11, 128)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("name", REPLICAS)
def test_left_padding_matches_unpadded(name, attn):
    model, pad = REPLICAS[name](attn), 3
    ids, mask = _inputs(2, 10, seed=2, pad_row=1, pad=pad)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits[1, pad:]
        alone = model(ids[1:, pad:], attention_mask=mask[1:, pad:]).logits[0]
        no_mask = model(ids[1:, pad:]).logits[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(no_mask, alone, atol=1e-6, rtol=0)


PUBLISHED_NAMES = {
    "baichuan7b": ["model.embed_tokens.weight", "model.layers.0.self_attn.W_pack.weight",
                   "model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                   "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
                   "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
                   "model.norm.weight", "lm_head.weight"],
    "chatglm": ["transformer.embedding.word_embeddings.weight",
                "transformer.encoder.layers.0.input_layernorm.weight",
                "transformer.encoder.layers.0.self_attention.query_key_value.weight",
                "transformer.encoder.layers.0.self_attention.query_key_value.bias",
                "transformer.encoder.layers.1.self_attention.dense.weight",
                "transformer.encoder.layers.0.post_attention_layernorm.weight",
                "transformer.encoder.layers.0.mlp.dense_h_to_4h.weight",
                "transformer.encoder.layers.0.mlp.dense_4h_to_h.weight",
                "transformer.encoder.final_layernorm.weight", "transformer.output_layer.weight"],
}
PUBLISHED_NAMES["baichuan13b"] = PUBLISHED_NAMES["baichuan7b"]


@pytest.mark.parametrize("name", REPLICAS)
def test_published_parameter_names(name):
    params = dict(REPLICAS[name]().named_parameters())
    for key in PUBLISHED_NAMES[name]:
        assert key in params, key
    assert params[PUBLISHED_NAMES[name][0]].data_ptr() != params[PUBLISHED_NAMES[name][-1]].data_ptr()  # untied
    for norm in (k for k in params if "norm" in k):  # randomised around 1, so norm slicing is visible
        assert not torch.allclose(params[norm], torch.ones_like(params[norm]))


def test_fused_shapes():
    baichuan, glm = REPLICAS["baichuan7b"](), tiny_chatglm()
    assert baichuan.model.layers[0].self_attn.W_pack.weight.shape == (3 * 64, 64)
    assert glm.transformer.encoder.layers[0].self_attention.query_key_value.weight.shape == ((4 + 2 * 2) * 16, 64)
    assert glm.transformer.encoder.layers[0].mlp.dense_h_to_4h.weight.shape == (2 * 96, 64)


def _published_slopes(n):
    # The recursive form from the ALiBi paper / Baichuan-13B, as an independent reference.
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + _published_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("n", [1, 4, 6, 8, 12, 40])
def test_alibi_slopes_match_published_formula(n):
    torch.testing.assert_close(alibi_slopes(n), torch.tensor(_published_slopes(n)), atol=0, rtol=1e-6)


def test_alibi_changes_scores_and_rope_is_absent():
    # 13B is position-aware only through ALiBi: without it, permuting earlier tokens wouldn't matter.
    model = tiny_baichuan13b()
    assert not hasattr(model.model.layers[0].self_attn, "rotary_emb")
    ids, _ = _inputs(1, 6, seed=3)
    swapped = ids[:, [1, 0, 2, 3, 4, 5]]
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits[0, -1], model(swapped).logits[0, -1], atol=1e-6)


def test_chatglm_rotary_rotates_first_half_in_pairs():
    x = torch.randn(2, 5, 3, 16)
    cache = tiny_chatglm().transformer.rotary_pos_emb(5)[None]  # [1, 5, 4, 2]: rot_dim 8 of 16
    out = apply_rotary_pos_emb(x, cache)
    torch.testing.assert_close(out[..., 8:], x[..., 8:], atol=0, rtol=0)
    angle = torch.atan2(cache[..., 1], cache[..., 0])[:, :, None]  # [1, 5, 1, 4]
    ref = torch.view_as_real(torch.view_as_complex(x[..., :8].reshape(2, 5, 3, 4, 2).contiguous())
                             * torch.polar(torch.ones_like(angle), angle)).flatten(3)
    torch.testing.assert_close(out[..., :8], ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("build,kw", [
    (tiny_baichuan13b, dict(num_attention_heads=6, hidden_size=96)),  # non-power-of-2 ALiBi heads
    (tiny_chatglm, dict(num_attention_heads=8, multi_query_group_num=1)),  # one k/v group
    (tiny_chatglm, dict(num_attention_heads=4, multi_query_group_num=4)),  # plain MHA
])
def test_other_sizes_export(build, kw):
    model = build("sdpa", **kw)
    assert isinstance(model.config, (BaichuanConfig, ChatGLMConfig))
    assert model.config.num_attention_heads == kw["num_attention_heads"]
    ids, mask = _inputs(3, 11, seed=4, pad_row=2, pad=5)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(build("eager", **kw)(ids, attention_mask=mask).logits, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(_export(model).module()(ids, attention_mask=mask, use_cache=False).logits,
                                   want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", REPLICAS)
def test_save_pretrained_round_trip(name, tmp_path):
    # Guards against state that from_pretrained would not restore (e.g. non-persistent buffers).
    model = REPLICAS[name]("sdpa")
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    ids, mask = _inputs(2, 7, seed=5, pad_row=0, pad=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                                   atol=0, rtol=0)
