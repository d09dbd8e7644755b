"""Tiny models of two coupling patterns (written for these tests, no family's code); see
test_coupling_patterns.py."""
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutput

VOCAB, HIDDEN, HEAD_DIM, INNER = 32, 16, 4, 12


class Config:
    vocab_size, max_position_embeddings = VOCAB, 64


def rms(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class Projections(torch.nn.Module):
    """The embedding and the query, key and value projections of `heads` query and `kv_heads` (default:
    as many) key/value heads, seeded."""

    def __init__(self, heads: int, seed: int, kv_heads: int | None = None):
        super().__init__()
        torch.manual_seed(seed)
        self.config, self.heads, self.kv_heads = Config(), heads, kv_heads or heads
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.q = torch.nn.Linear(HIDDEN, heads * HEAD_DIM, bias=False)
        self.k, self.v = (torch.nn.Linear(HIDDEN, self.kv_heads * HEAD_DIM, bias=False) for _ in range(2))


class AllHeadsNorm(Projections):
    """Attention whose query and key projections are RMS-normalised over all heads at once, an MLP and
    a final RMSNorm over the hidden channels."""

    def __init__(self, heads: int = 4, seed: int = 0):
        super().__init__(heads, seed)
        self.q_norm = torch.nn.Parameter(1 + 0.3 * torch.randn(heads * HEAD_DIM))
        self.k_norm = torch.nn.Parameter(1 + 0.3 * torch.randn(heads * HEAD_DIM))
        self.o = torch.nn.Linear(heads * HEAD_DIM, HIDDEN, bias=False)
        self.up, self.down = torch.nn.Linear(HIDDEN, INNER), torch.nn.Linear(INNER, HIDDEN)
        self.final_norm = torch.nn.Parameter(1 + 0.3 * torch.randn(HIDDEN))
        self.head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        B, S = input_ids.shape
        h = self.embed(input_ids)
        split = lambda t: t.view(B, S, -1, HEAD_DIM).transpose(1, 2)
        q, k = split(rms(self.q(h), self.q_norm)), split(rms(self.k(h), self.k_norm))
        a = F.scaled_dot_product_attention(q, k, split(self.v(h)), is_causal=True)
        h = h + self.o(a.transpose(1, 2).reshape(B, S, -1))
        h = h + self.down(torch.relu(self.up(h)))
        return CausalLMOutput(logits=self.head(rms(h, self.final_norm)))


def all_heads_twin(model: AllHeadsNorm, kept) -> AllHeadsNorm:
    """The same class with `len(kept)` heads, loaded with the kept heads' slices of every weight."""
    rows = (torch.as_tensor(kept)[:, None] * HEAD_DIM + torch.arange(HEAD_DIM)).flatten()
    small = AllHeadsNorm(len(kept)).eval()
    state = model.state_dict()
    for name in ("q.weight", "k.weight", "v.weight", "q_norm", "k_norm"):
        state[name] = state[name][rows]
    state["o.weight"] = state["o.weight"][:, rows]
    small.load_state_dict(state)
    return small


def per_head_norms(n: int) -> torch.nn.ModuleList:
    """`n` LayerNorms over one head each, with their own non-trivial weights."""
    norms = torch.nn.ModuleList(torch.nn.LayerNorm(HEAD_DIM) for _ in range(n))
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(1 + 0.3 * torch.randn(HEAD_DIM))
            norm.bias.copy_(0.1 * torch.randn(HEAD_DIM))
    return norms


def normalise_each_head(x, norms):
    """`x` [B, S, heads, head_dim]: split into single heads, head i normalised by norms[i], put back."""
    return torch.cat([norm(piece) for norm, piece in zip(norms, x.split(1, dim=2))], dim=2)


class PerHeadNorm(Projections):
    """Attention whose query heads each get their own LayerNorm: split into single heads, normalise
    head i with norm i, concatenate back."""

    def __init__(self, heads: int = 4, seed: int = 0):
        super().__init__(heads, seed)
        self.q_norms = per_head_norms(heads)
        self.o = torch.nn.Linear(heads * HEAD_DIM, HIDDEN, bias=False)
        self.head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        B, S = input_ids.shape
        h = self.embed(input_ids)
        q = normalise_each_head(self.q(h).view(B, S, self.heads, HEAD_DIM), self.q_norms)
        k, v = (p(h).view(B, S, self.heads, HEAD_DIM) for p in (self.k, self.v))
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return CausalLMOutput(logits=self.head(h + self.o(a.transpose(1, 2).reshape(B, S, -1))))


def per_head_twin(model: PerHeadNorm, kept) -> PerHeadNorm:
    """The same class with `len(kept)` heads: the kept heads' projection slices and their own norms."""
    rows = (torch.as_tensor(kept)[:, None] * HEAD_DIM + torch.arange(HEAD_DIM)).flatten()
    small = PerHeadNorm(len(kept)).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("q_norms.")}
    for name in ("q.weight", "k.weight", "v.weight"):
        state[name] = state[name][rows]
    state["o.weight"] = state["o.weight"][:, rows]
    for j, i in enumerate(kept):
        state.update({f"q_norms.{j}.{p}": getattr(model.q_norms[i], p) for p in ("weight", "bias")})
    small.load_state_dict(state)
    return small


class PerHeadNormGQA(Projections):
    """Grouped-query attention (`kv_heads` key/value heads, each read by `heads / kv_heads` query heads)
    whose query heads and key heads each get their own LayerNorm (split into single heads, normalised,
    put back), then an MLP. `repeat`: the key/value heads are repeated to the query heads before the
    attention (transformers' repeat_kv), else the attention reads them grouped (`enable_gqa`)."""

    def __init__(self, heads: int = 4, kv_heads: int = 2, repeat: bool = False, seed: int = 0):
        super().__init__(heads, seed, kv_heads)
        self.repeat = repeat
        self.q_norms, self.k_norms = per_head_norms(heads), per_head_norms(kv_heads)
        self.o = torch.nn.Linear(heads * HEAD_DIM, HIDDEN, bias=False)
        self.up, self.down = torch.nn.Linear(HIDDEN, INNER), torch.nn.Linear(INNER, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        B, S = input_ids.shape
        h = self.embed(input_ids)
        q = normalise_each_head(self.q(h).view(B, S, self.heads, HEAD_DIM), self.q_norms).transpose(1, 2)
        k = normalise_each_head(self.k(h).view(B, S, self.kv_heads, HEAD_DIM), self.k_norms).transpose(1, 2)
        v = self.v(h).view(B, S, self.kv_heads, HEAD_DIM).transpose(1, 2)
        per_group = self.heads // self.kv_heads
        if self.repeat:
            k, v = (t[:, :, None].expand(B, self.kv_heads, per_group, S, HEAD_DIM).reshape(B, self.heads, S, HEAD_DIM)
                    for t in (k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=not self.repeat)
        h = h + self.o(a.transpose(1, 2).reshape(B, S, -1))
        h = h + self.down(torch.relu(self.up(h)))
        return CausalLMOutput(logits=self.head(h))


def per_head_gqa_twin(model: PerHeadNormGQA, kv_kept, per_group_kept) -> PerHeadNormGQA:
    """The same class with the key/value heads `kv_kept`, each keeping its query heads `per_group_kept`
    (indices within the group): the kept heads' projection slices and their own norms."""
    per_group = model.heads // model.kv_heads
    q_kept = [g * per_group + j for g in kv_kept for j in per_group_kept]
    rows = lambda kept: (torch.as_tensor(kept)[:, None] * HEAD_DIM + torch.arange(HEAD_DIM)).flatten()
    small = PerHeadNormGQA(len(q_kept), len(kv_kept), model.repeat).eval()
    state = {k: v for k, v in model.state_dict().items() if "_norms." not in k}
    state["q.weight"], state["o.weight"] = state["q.weight"][rows(q_kept)], state["o.weight"][:, rows(q_kept)]
    for name in ("k.weight", "v.weight"):
        state[name] = state[name][rows(kv_kept)]
    for norms, kept in (("q_norms", q_kept), ("k_norms", kv_kept)):
        for j, i in enumerate(kept):
            state.update({f"{norms}.{j}.{p}": t for p, t in getattr(model, norms)[i].state_dict().items()})
    small.load_state_dict(state)
    return small
