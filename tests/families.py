"""Tiny random-init models of the families beyond the core ones (same style as models.py)."""
from __future__ import annotations

import transformers as tf

from models import build

SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)


def mistral(attn="sdpa", seed=0, **kw):
    cfg = tf.MistralConfig(**SMALL, intermediate_size=96, num_key_value_heads=2, head_dim=16, **kw)
    return build(tf.MistralForCausalLM, cfg, attn, seed)


def qwen2(attn="sdpa", seed=0, **kw):  # q/k/v with biases, o without
    cfg = tf.Qwen2Config(**SMALL, intermediate_size=96, num_key_value_heads=2, **kw)
    return build(tf.Qwen2ForCausalLM, cfg, attn, seed)


def phi3(attn="sdpa", seed=0, **kw):  # fused qkv_proj (slice) and gate_up_proj (chunk)
    cfg = tf.Phi3Config(**SMALL, intermediate_size=96, num_key_value_heads=2, pad_token_id=0, **kw)
    return build(tf.Phi3ForCausalLM, cfg, attn, seed)


def gpt2(attn="sdpa", seed=0, **kw):  # Conv1D: addmm(bias, x2d, W[in, out]); learned positions
    cfg = tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_inner=96, n_positions=64, **kw)
    return build(tf.GPT2LMHeadModel, cfg, attn, seed)


def gpt_neox(attn="sdpa", seed=0, **kw):  # fused qkv viewed [B, S, H, 3d], partial rotary, parallel residual
    cfg = tf.GPTNeoXConfig(**SMALL, intermediate_size=96, use_parallel_residual=True,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                            "partial_rotary_factor": 0.25}, **kw)
    return build(tf.GPTNeoXForCausalLM, cfg, attn, seed)


def opt(attn="sdpa", seed=0, **kw):  # learned positions with offset 2, ReLU, biases everywhere
    cfg = tf.OPTConfig(**SMALL, ffn_dim=96, word_embed_proj_dim=64, max_position_embeddings=64,
                       pad_token_id=0, **kw)
    return build(tf.OPTForCausalLM, cfg, attn, seed)


def gemma2(attn="sdpa", seed=0, **kw):  # soft-capping, four norms per layer, scaled tied embedding
    cfg = tf.Gemma2Config(**SMALL, intermediate_size=96, num_key_value_heads=2, head_dim=16,
                          query_pre_attn_scalar=16, sliding_window=8, pad_token_id=0, **kw)
    return build(tf.Gemma2ForCausalLM, cfg, attn, seed)


def falcon(attn="sdpa", seed=0, **kw):  # new decoder architecture: fused QKV viewed [B, S, kv, q/kv + 2, d]
    cfg = tf.FalconConfig(**SMALL, num_kv_heads=2, new_decoder_architecture=True, multi_query=False,
                          parallel_attn=True, bias=False, ffn_hidden_size=96, **kw)
    return build(tf.FalconForCausalLM, cfg, attn, seed)


def falcon_mqa(attn="sdpa", seed=0, **kw):  # Falcon-7B style: one shared k/v head, fused [q heads | k | v]
    cfg = tf.FalconConfig(**SMALL, new_decoder_architecture=False, multi_query=True, parallel_attn=True,
                          bias=True, ffn_hidden_size=96, **kw)
    return build(tf.FalconForCausalLM, cfg, attn, seed)


def mixtral(attn="sdpa", seed=0, **kw):  # experts as 3-D parameters, top-2 of 4 routing
    cfg = tf.MixtralConfig(**SMALL, intermediate_size=32, num_key_value_heads=2, head_dim=16,
                           num_local_experts=4, num_experts_per_tok=2, **kw)
    return build(tf.MixtralForCausalLM, cfg, attn, seed)


def granite(attn="sdpa", seed=0, **kw):  # LLaMA layers scaled by multipliers; head size = hidden / heads
    cfg = tf.GraniteConfig(**SMALL, intermediate_size=96, num_key_value_heads=2, embedding_multiplier=2.0,
                           residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0, **kw)
    return build(tf.GraniteForCausalLM, cfg, attn, seed)


def starcoder2(attn="sdpa", seed=0, **kw):  # LayerNorm, biases, c_fc/c_proj GELU MLP; head size = hidden / heads
    cfg = tf.Starcoder2Config(**SMALL, intermediate_size=96, num_key_value_heads=2, use_bias=True,
                              bos_token_id=1, eos_token_id=2, **kw)
    return build(tf.Starcoder2ForCausalLM, cfg, attn, seed)


FAMILIES = {"mistral": mistral, "qwen2": qwen2, "phi3": phi3, "gpt2": gpt2, "gpt_neox": gpt_neox, "opt": opt,
            "gemma2": gemma2, "falcon": falcon, "falcon_mqa": falcon_mqa, "mixtral": mixtral, "granite": granite,
            "starcoder2": starcoder2}
