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
    """The embedding and the query, key and value projections of `heads` heads, seeded."""

    def __init__(self, heads: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.config, self.heads = Config(), heads
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.q, self.k, self.v = (torch.nn.Linear(HIDDEN, heads * HEAD_DIM, bias=False) for _ in range(3))


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


class PerHeadNorm(Projections):
    """Attention whose query heads each get their own LayerNorm: split into single heads, normalise
    head i with norm i, concatenate back."""

    def __init__(self, heads: int = 4, seed: int = 0):
        super().__init__(heads, seed)
        self.q_norms = torch.nn.ModuleList(torch.nn.LayerNorm(HEAD_DIM) for _ in range(heads))
        with torch.no_grad():
            for norm in self.q_norms:  # each head's own, non-trivial weights
                norm.weight.copy_(1 + 0.3 * torch.randn(HEAD_DIM))
                norm.bias.copy_(0.1 * torch.randn(HEAD_DIM))
        self.o = torch.nn.Linear(heads * HEAD_DIM, HIDDEN, bias=False)
        self.head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        B, S = input_ids.shape
        h = self.embed(input_ids)
        q = self.q(h).view(B, S, self.heads, HEAD_DIM)
        q = torch.cat([norm(piece) for norm, piece in zip(self.q_norms, q.split(1, dim=2))], dim=2)
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
