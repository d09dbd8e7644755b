"""Tiny random-init models of every family, built locally (no downloads)."""
from __future__ import annotations

import torch
import transformers as tf


def _finish(model, seed):
    # Random norm weights and biases so a wrong slice of them changes the logits.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if "norm" in name or "ln" in name
                        else 0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def build(cls, cfg, attn, seed=0):
    torch.manual_seed(seed)
    cfg._attn_implementation = attn
    return _finish(cls(cfg), seed)


def llama(attn="sdpa", kv_heads=2, seed=0, vocab_size=128, **kw):
    cfg = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16,
                         tie_word_embeddings=True, **kw)
    return build(tf.LlamaForCausalLM, cfg, attn, seed)


def glm(attn="sdpa", seed=0, **kw):
    cfg = tf.GlmConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0, **kw)
    return build(tf.GlmForCausalLM, cfg, attn, seed)


def glm4(attn="sdpa", seed=0, **kw):
    cfg = tf.Glm4Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0, **kw)
    return build(tf.Glm4ForCausalLM, cfg, attn, seed)


def bloom(attn="eager", seed=0, **kw):
    cfg = tf.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4, **kw)
    return build(tf.BloomForCausalLM, cfg, attn, seed)


def _replica(name):
    def build(attn):
        from replicas import REPLICAS
        return REPLICAS[name](attn_implementation=attn)
    return build


FAMILIES = {"llama_mha": lambda attn: llama(attn, kv_heads=4), "llama_gqa": llama, "glm": glm, "glm4": glm4,
            "bloom": bloom, "baichuan7b": _replica("baichuan7b"), "baichuan13b": _replica("baichuan13b"),
            "chatglm": _replica("chatglm")}
