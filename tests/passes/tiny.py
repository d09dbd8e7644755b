"""A few-op causal LM for the pass tests: embedding, one attention block, head. Written for these
tests (no family's code): `heads` and `slopes` are parameters of the module, so a smaller twin is
the same class built with fewer heads and the kept heads' weights."""
from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutput

import fxprune
from fxprune.util.lm import logits_of
from fxprune.rewrite.emit import run_passes  # noqa: F401  (the rewrite's PassManager and graph check)

VOCAB, HIDDEN, HEAD_DIM, TOTAL = 32, 16, 4, 4  # TOTAL: the original model's head count


class TinyLM(torch.nn.Module):
    """`view` to heads with an int head count, attention by matmul/softmax over `[B*H, S, D]` (a size
    computed from the symbolic batch), optional ALiBi-like per-head slopes computed in the graph."""

    def __init__(self, heads: int = TOTAL, head_ids=None, alibi: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=64)
        self.heads, self.alibi = heads, alibi
        self.head_ids = list(range(heads)) if head_ids is None else list(head_ids)  # whose slopes
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.q = torch.nn.Linear(HIDDEN, heads * HEAD_DIM, bias=False)
        self.k = torch.nn.Linear(HIDDEN, heads * HEAD_DIM, bias=False)
        self.v = torch.nn.Linear(HIDDEN, heads * HEAD_DIM, bias=False)
        self.o = torch.nn.Linear(heads * HEAD_DIM, HIDDEN, bias=False)
        self.head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)

    def slopes(self, device):
        """2**(-8 i / N) for head i of the N original heads; a twin keeps those of its heads."""
        every = torch.exp2(torch.arange(1, TOTAL + 1, device=device) * (-8.0 / TOTAL))
        return every if self.head_ids == list(range(TOTAL)) else every[torch.tensor(self.head_ids, device=device)]

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        B, S = input_ids.shape
        h = self.embed(input_ids)
        q, k, v = (p(h).view(B, S, self.heads, HEAD_DIM).transpose(1, 2).reshape(B * self.heads, S, HEAD_DIM)
                   for p in (self.q, self.k, self.v))
        scores = q @ k.transpose(1, 2) / HEAD_DIM ** 0.5
        if self.alibi:  # per-head slopes times the key position: [H, 1, S], broadcast over the batch
            pos = torch.arange(S, device=h.device, dtype=torch.float32)
            bias = self.slopes(h.device)[:, None, None] * pos[None, None, :]
            scores = (scores.view(B, self.heads, S, S) + bias).view(B * self.heads, S, S)
        causal = torch.ones(S, S, dtype=torch.bool, device=h.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        out = F.softmax(scores, dim=-1) @ v
        out = out.reshape(B, self.heads, S, HEAD_DIM).transpose(1, 2).reshape(B, S, self.heads * HEAD_DIM)
        return CausalLMOutput(logits=self.head(self.o(out) + h))


def twin(model: TinyLM, kept_heads) -> TinyLM:
    """`model` with only `kept_heads`: the same class with fewer heads, loaded with sliced weights."""
    kept = torch.as_tensor(kept_heads)
    rows = (kept[:, None] * HEAD_DIM + torch.arange(HEAD_DIM)).flatten()
    small = TinyLM(len(kept), head_ids=[model.head_ids[i] for i in kept.tolist()], alibi=model.alibi)
    with torch.no_grad():
        small.embed.weight.copy_(model.embed.weight)
        small.head.weight.copy_(model.head.weight)
        for name in ("q", "k", "v"):
            getattr(small, name).weight.copy_(getattr(model, name).weight[rows])
        small.o.weight.copy_(model.o.weight[:, rows])
    return small.eval()


def ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


class TinyMLP(torch.nn.Module):
    """Embedding, one MLP (up -> relu -> down) on the residual stream, head: no size literal anywhere."""

    def __init__(self, inner: int = 12, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=64)
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.up = torch.nn.Linear(HIDDEN, inner)
        self.down = torch.nn.Linear(inner, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.embed(input_ids)
        return CausalLMOutput(logits=self.head(h + self.down(torch.relu(self.up(h)))))


def mlp_twin(model: TinyMLP, kept) -> TinyMLP:
    kept = torch.as_tensor(kept)
    small = TinyMLP(len(kept))
    with torch.no_grad():
        small.embed.weight.copy_(model.embed.weight)
        small.head.weight.copy_(model.head.weight)
        small.up.weight.copy_(model.up.weight[kept])
        small.up.bias.copy_(model.up.bias[kept])
        small.down.weight.copy_(model.down.weight[:, kept])
        small.down.bias.copy_(model.down.bias)
    return small.eval()


@functools.lru_cache(maxsize=None)
def analysed(kind: str):
    """(model, DependencyGraph) for "attention", "alibi" or "mlp", analysed once per test session
    (the rewrite passes work on a copy of the analysed graph, so sharing it is safe)."""
    model = {"attention": lambda: TinyLM(), "alibi": lambda: TinyLM(alibi=True), "mlp": lambda: TinyMLP()}[kind]()
    return model.eval(), fxprune.analyze(model)


def group_of(dg, kind: str):
    found = [g for g in dg.groups if g.kind == kind]
    assert len(found) == 1, dg.summary()
    return found[0]


def flat(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule over a copy of `gm`'s graph with export's flat signature, without the pytree
    hooks of `ExportedProgram.module()` (what the rewrite starts from, see rewrite.copy_graph_module)."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return torch.fx.GraphModule(gm, graph)


def logits(gm, x: torch.Tensor) -> torch.Tensor:
    """A graph still in export's flat signature (input_ids, attention_mask, use_cache) on `x`."""
    feed = {"input_ids": x, "attention_mask": torch.ones_like(x), "use_cache": False}
    with torch.no_grad():
        return logits_of(gm(*[feed[n.name] for n in gm.graph.nodes if n.op == "placeholder"]))


def calls(gm: torch.fx.GraphModule, packet) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "overloadpacket", None) is packet]


SHAPES = ((1, 7), (3, 5), (2, 9))  # batch 1 and odd lengths: where sizes computed from symbols matter


def prune_heads(kind: str, kept, *later) -> tuple[torch.nn.Module, torch.fx.GraphModule]:
    """The analysed `kind` model's graph after slicing its head parameters to the heads `kept` and
    rewriting its size literals, then the passes `later(table, kept)` (e.g. InsertGathersPass)."""
    from fxprune.passes.rewrite_shape_literals import RewriteShapeLiteralsPass
    from fxprune.passes.slice_parameters import SliceParametersPass
    from fxprune.rewrite.emit import copy_graph_module, kept_positions
    model, dg = analysed(kind)
    heads = group_of(dg, "heads")
    keep = {heads.atom_id: torch.tensor(kept)}
    passes = [SliceParametersPass(dg.gm, dg.parameters, dg.buffers, dg.aliases, kept_positions(dg, keep)),
              RewriteShapeLiteralsPass(dg.table, {heads.atom_id: len(kept)}, keep)]
    return model, run_passes(copy_graph_module(dg), passes + [make(dg.table, keep) for make in later])
