"""Baichuan-7B / Baichuan-13B replica, written from the published architecture.

Both are LLaMA-like (RMSNorm, SwiGLU MLP) but fuse q/k/v into one `W_pack` linear that is
split with the unflatten/transpose/squeeze idiom of the published code. 7B uses rotary
embeddings; 13B has no rotary and adds an ALiBi bias to the attention scores instead.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PretrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast


class BaichuanConfig(PretrainedConfig):
    model_type = "fxprune_baichuan"

    vocab_size: int = 64000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    position_embedding: str = "rope"  # "rope" (Baichuan-7B) or "alibi" (Baichuan-13B)
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    use_cache: bool = False


class BaichuanRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.epsilon)
        return self.weight * hidden_states


class BaichuanRotaryEmbedding(nn.Module):
    def __init__(self, dim, base=10000.0):
        super().__init__()
        self.dim, self.base = dim, base

    def forward(self, seq_len, device=None):
        # Computed per call for the (dynamic) sequence length instead of a cached table sized
        # for max_position_embeddings. No inv_freq buffer either: from_pretrained in
        # transformers 5 leaves non-persistent buffers of custom modules uninitialised.
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))
        t = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[None, None], emb.sin()[None, None]  # [1, 1, S, head_dim]


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    q_embed = (q.float() * cos) + (rotate_half(q.float()) * sin)
    k_embed = (k.float() * cos) + (rotate_half(k.float()) * sin)
    return q_embed.to(q.dtype), k_embed.to(k.dtype)


def alibi_slopes(n_head, device=None):
    """ALiBi slopes as graph ops: powers of 2**(-8/n) for the closest power of two n,
    then every other slope of the 2n sequence for the remaining heads."""
    closest = 2 ** math.floor(math.log2(n_head))
    # Python-float bases keep the graph free of lifted tensor constants (aten.pow.Scalar).
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = base ** torch.arange(1, 1 + closest, device=device, dtype=torch.float32)
    if closest != n_head:  # config-time int, not a tensor value: safe under export
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        extra_powers = torch.arange(1, 1 + 2 * (n_head - closest), 2, device=device, dtype=torch.float32)
        slopes = torch.cat([slopes, extra_base ** extra_powers])
    return slopes


class BaichuanMLP(nn.Module):
    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class BaichuanAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.W_pack = nn.Linear(self.hidden_size, 3 * self.hidden_size, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=False)
        if config.position_embedding == "rope":
            self.rotary_emb = BaichuanRotaryEmbedding(self.head_dim, base=config.rope_theta)

    def forward(self, hidden_states, attention_mask):
        bsz, q_len, _ = hidden_states.size()
        proj = self.W_pack(hidden_states)
        # The published split: [B,S,3H] -> [3,B,S,H], then index 0/1/2 for q/k/v.
        proj = proj.unflatten(-1, (3, self.hidden_size)).unsqueeze(0).transpose(0, -2).squeeze(-2)
        query_states = proj[0].view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        key_states = proj[1].view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        value_states = proj[2].view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        if self.config.position_embedding == "rope":
            cos, sin = self.rotary_emb(q_len, device=hidden_states.device)
            query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if self.config._attn_implementation == "sdpa":
            attn_output = F.scaled_dot_product_attention(query_states, key_states, value_states,
                                                         attn_mask=attention_mask)
        else:
            attn_weights = torch.matmul(query_states, key_states.transpose(2, 3)) / math.sqrt(self.head_dim)
            attn_weights = attn_weights + attention_mask
            attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_states.dtype)
            attn_output = torch.matmul(attn_weights, value_states)

        attn_output = attn_output.transpose(1, 2).reshape(bsz, q_len, self.hidden_size)
        return self.o_proj(attn_output)


class BaichuanDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = BaichuanAttention(config)
        self.mlp = BaichuanMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = BaichuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = BaichuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask):
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), attention_mask)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class BaichuanPreTrainedModel(PreTrainedModel):
    config_class = BaichuanConfig
    base_model_prefix = "model"
    _no_split_modules = ["BaichuanDecoderLayer"]
    _supports_sdpa = True


class BaichuanModel(BaichuanPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([BaichuanDecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = BaichuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def build_mask(self, input_ids, attention_mask, dtype):
        """Additive float mask [B, 1 or H, S, S]: causal and padding combined as booleans first,
        then turned into finfo.min once, so masked entries never overflow to -inf (a fully masked
        pad row then softmaxes to uniform instead of NaN, in both eager and SDPA)."""
        bsz, seq = input_ids.shape
        pos = torch.arange(seq, device=input_ids.device)
        keep = (pos[None, :] <= pos[:, None])[None, None]                     # [1, 1, S, S]
        if attention_mask is not None:
            keep = keep & attention_mask[:, None, None, :].bool()             # [B, 1, S, S]
        mask = torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)
        if self.config.position_embedding == "alibi":
            # Baichuan-13B's bias is slope * key position; the per-row offset of the textbook
            # slope * (j - i) cancels in the softmax.
            slopes = alibi_slopes(self.config.num_attention_heads, device=input_ids.device)
            alibi = slopes[:, None, None] * pos[None, None, :].to(torch.float32)  # [H, 1, S]
            mask = mask + alibi.to(dtype)[None]                               # [B, H, S, S]
        return mask

    def forward(self, input_ids, attention_mask=None):
        hidden_states = self.embed_tokens(input_ids)
        mask = self.build_mask(input_ids, attention_mask, hidden_states.dtype)
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask)
        return self.norm(hidden_states)


class BaichuanForCausalLM(BaichuanPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = BaichuanModel(config)
        # Plain linear head (Baichuan-1 style); Baichuan2's NormHead is not replicated.
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, use_cache=False, **kwargs):
        hidden_states = self.model(input_ids, attention_mask)
        return CausalLMOutputWithPast(logits=self.lm_head(hidden_states))


def _randomize(model, seed):
    """Weights ~ N(0, 0.02), biases small, norm weights around 1, all from `seed`, so a
    wrongly sliced parameter (norms included) shows up in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.float().eval()


def _tiny(position_embedding, attn_implementation, seed, **overrides):
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=256, position_embedding=position_embedding)
    kw.update(overrides)
    config = BaichuanConfig(**kw)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return _randomize(BaichuanForCausalLM(config), seed)


def tiny_baichuan7b(attn_implementation="eager", seed=0, **overrides):
    return _tiny("rope", attn_implementation, seed, **overrides)


def tiny_baichuan13b(attn_implementation="eager", seed=0, **overrides):
    return _tiny("alibi", attn_implementation, seed, **overrides)
