"""ChatGLM2/3-6B replica, written from the published architecture, batch-first [B, S, ...].

Distinctive parts: one fused `query_key_value` (with bias) split into q and multi-query k/v;
rotary on only the first half of each head, as interleaved (even, odd) pairs; k/v group
expansion by unsqueeze/expand/view; a fused `dense_h_to_4h` chunked into SwiGLU halves.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PretrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from .baichuan import _randomize


class ChatGLMConfig(PretrainedConfig):
    model_type = "fxprune_chatglm"
    # Published names kept; generic code (and fxprune's capture) looks for these aliases.
    attribute_map = {"num_hidden_layers": "num_layers", "vocab_size": "padded_vocab_size"}

    num_layers: int = 28
    padded_vocab_size: int = 65024
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    kv_channels: int = 128
    num_attention_heads: int = 32
    multi_query_group_num: int = 2
    seq_length: int = 8192
    layernorm_epsilon: float = 1e-5
    add_bias_linear: bool = False
    add_qkv_bias: bool = True
    rope_ratio: float = 1.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    use_cache: bool = False


class RMSNorm(nn.Module):
    def __init__(self, normalized_shape, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.eps = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        return (self.weight * hidden_states).to(input_dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, dim, rope_ratio=1.0):
        super().__init__()
        self.dim, self.base = dim, 10000 * rope_ratio

    def forward(self, seq_len, device=None):
        # As published, theta is recomputed per call (no buffer, which from_pretrained would leave
        # uninitialised); built for the dynamic current length, not a seq_length-sized table.
        theta = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float, device=device) / self.dim))
        seq_idx = torch.arange(seq_len, dtype=torch.float, device=device)
        idx_theta = torch.outer(seq_idx, theta).float()
        return torch.stack([torch.cos(idx_theta), torch.sin(idx_theta)], dim=-1)  # [S, rot_dim//2, 2]


def apply_rotary_pos_emb(x, rope_cache):
    """x: [b, sq, np, hn]; rope_cache: [1, sq, rot_dim//2, 2]. Rotates the (even, odd) pairs
    of the first rot_dim channels and passes the rest through."""
    b, sq, np_, hn = x.size(0), x.size(1), x.size(2), x.size(3)
    rot_dim = rope_cache.shape[-2] * 2
    x, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    rope_cache = rope_cache[:, :sq]
    xshaped = x.reshape(b, sq, np_, rot_dim // 2, 2)
    rope_cache = rope_cache.view(-1, sq, 1, xshaped.size(3), 2)
    x_out2 = torch.stack(
        [
            xshaped[..., 0] * rope_cache[..., 0] - xshaped[..., 1] * rope_cache[..., 1],
            xshaped[..., 1] * rope_cache[..., 0] + xshaped[..., 0] * rope_cache[..., 1],
        ],
        -1,
    )
    x_out2 = x_out2.flatten(3)
    return torch.cat((x_out2, x_pass), dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.num_groups = config.multi_query_group_num
        self.projection_size = self.num_heads * self.head_dim
        qkv_size = self.projection_size + 2 * self.head_dim * self.num_groups
        self.query_key_value = nn.Linear(config.hidden_size, qkv_size,
                                         bias=config.add_bias_linear or config.add_qkv_bias)
        self.dense = nn.Linear(self.projection_size, config.hidden_size, bias=config.add_bias_linear)

    def _expand_groups(self, x):
        # [b, sq, g, hn] -> [b, sq, np, hn]: each k/v group serves np // g query heads.
        x = x.unsqueeze(-2)
        x = x.expand(-1, -1, -1, self.num_heads // self.num_groups, -1)
        return x.contiguous().view(x.size()[:2] + (self.num_heads, self.head_dim))

    def forward(self, hidden_states, attention_mask, rotary_pos_emb):
        mixed_x_layer = self.query_key_value(hidden_states)
        query_layer, key_layer, value_layer = mixed_x_layer.split(
            [self.projection_size, self.num_groups * self.head_dim, self.num_groups * self.head_dim], dim=-1)
        query_layer = query_layer.view(query_layer.size()[:-1] + (self.num_heads, self.head_dim))
        key_layer = key_layer.view(key_layer.size()[:-1] + (self.num_groups, self.head_dim))
        value_layer = value_layer.view(value_layer.size()[:-1] + (self.num_groups, self.head_dim))

        query_layer = apply_rotary_pos_emb(query_layer, rotary_pos_emb)
        key_layer = apply_rotary_pos_emb(key_layer, rotary_pos_emb)
        key_layer = self._expand_groups(key_layer)
        value_layer = self._expand_groups(value_layer)

        # [b, sq, np, hn] -> [b, np, sq, hn]
        query_layer, key_layer, value_layer = [t.transpose(1, 2) for t in (query_layer, key_layer, value_layer)]
        if self.config._attn_implementation == "sdpa":
            # attention_mask is True where masked; SDPA's bool mask is True where kept.
            context = F.scaled_dot_product_attention(query_layer, key_layer, value_layer, ~attention_mask)
        else:
            scores = torch.matmul(query_layer, key_layer.transpose(2, 3)) / math.sqrt(self.head_dim)
            scores = scores.masked_fill(attention_mask, float("-inf"))
            probs = F.softmax(scores.float(), dim=-1).type_as(value_layer)
            context = torch.matmul(probs, value_layer)
        context = context.transpose(1, 2).contiguous()
        context = context.reshape(context.size()[:-2] + (self.projection_size,))
        return self.dense(context)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_hidden_size * 2, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, hidden_states):
        x = torch.chunk(self.dense_h_to_4h(hidden_states), 2, dim=-1)
        return self.dense_4h_to_h(F.silu(x[0]) * x[1])


class GLMBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.self_attention = SelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, hidden_states, attention_mask, rotary_pos_emb):
        attention_output = self.self_attention(self.input_layernorm(hidden_states), attention_mask, rotary_pos_emb)
        layernorm_input = hidden_states + attention_output
        return layernorm_input + self.mlp(self.post_attention_layernorm(layernorm_input))


class GLMTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([GLMBlock(config) for _ in range(config.num_layers)])
        self.final_layernorm = RMSNorm(config.hidden_size, eps=config.layernorm_epsilon)

    def forward(self, hidden_states, attention_mask, rotary_pos_emb):
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask, rotary_pos_emb)
        return self.final_layernorm(hidden_states)


class Embedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids):
        return self.word_embeddings(input_ids)


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["GLMBlock"]
    _supports_sdpa = True


class ChatGLMModel(ChatGLMPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embedding = Embedding(config)
        self.rotary_pos_emb = RotaryEmbedding(config.kv_channels // 2, rope_ratio=config.rope_ratio)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_masks(self, input_ids, padding_mask):
        """Bool [B, 1, S, S], True = masked. As published, a pad query row is fully *unmasked*
        (the `- (padding_mask - 1)` step), so no softmax row is all -inf. The published model
        skips the mask when attention_mask is all ones (`.all()`, a data-dependent branch);
        here it is always built, which gives the same result."""
        batch_size, seq_length = input_ids.shape
        full_attention_mask = torch.ones(batch_size, seq_length, seq_length, device=input_ids.device).tril()
        if padding_mask is not None:
            padding_mask = padding_mask.to(full_attention_mask.dtype)
            full_attention_mask = full_attention_mask * padding_mask.unsqueeze(1)
            full_attention_mask = full_attention_mask - (padding_mask.unsqueeze(-1) - 1)
        return (full_attention_mask < 0.5).unsqueeze(1)

    def forward(self, input_ids, attention_mask=None):
        seq_length = input_ids.shape[1]
        inputs_embeds = self.embedding(input_ids)
        full_attention_mask = self.get_masks(input_ids, attention_mask)
        rotary_pos_emb = self.rotary_pos_emb(seq_length, device=input_ids.device)[None, :seq_length]
        hidden_states = self.encoder(inputs_embeds, full_attention_mask, rotary_pos_emb)
        return self.output_layer(hidden_states)


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.embedding.word_embeddings

    def get_output_embeddings(self):
        return self.transformer.output_layer

    def forward(self, input_ids, attention_mask=None, use_cache=False, **kwargs):
        return CausalLMOutputWithPast(logits=self.transformer(input_ids, attention_mask))


def tiny_chatglm(attn_implementation="eager", seed=0, **overrides):
    kw = dict(num_layers=2, padded_vocab_size=128, hidden_size=64, ffn_hidden_size=96, kv_channels=16,
              num_attention_heads=4, multi_query_group_num=2, seq_length=256)
    kw.update(overrides)
    config = ChatGLMConfig(**kw)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return _randomize(ChatGLMForConditionalGeneration(config), seed)
