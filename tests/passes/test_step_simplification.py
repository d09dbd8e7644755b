"""GroupedAttentionPass and DropIdentityOpsPass, the passes that cut a KV-cache step's ops: on the KV-cache capture
of a tiny GQA LLaMA (attention reads the unrepeated cache, logits unchanged at every step) and on a hand-built
graph (identities go, real casts and repeated reads of a tensor written in place stay)."""
import pytest
import torch

from fxprune.passes.cache_signature import CacheSignaturePass
from fxprune.passes.drop_identity_ops import DropIdentityOpsPass
from fxprune.passes.grouped_attention import GroupedAttentionPass
from fxprune.serving.kv_capture import capture_cached
from models import llama
from tiny import calls, flat, run_passes

aten = torch.ops.aten
BATCH, MAX_LEN, PROMPT = 2, 16, 5
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def steps(gm, seed=0):
    """Logits of a left-padded prefill and three one-token steps, from an empty cache."""
    for name, t in gm.named_buffers():
        if name.startswith(("key_cache_", "value_cache_")):
            t.zero_()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (BATCH, PROMPT), generator=g)
    mask = torch.zeros(BATCH, MAX_LEN, dtype=torch.long)
    mask[:, :PROMPT] = 1
    mask[0, :2] = 0
    positions = (mask[:, :PROMPT].cumsum(-1) - 1).clamp(min=0)
    out = []
    with torch.no_grad():
        out.append(gm(ids, mask[:, :PROMPT], positions, torch.tensor(0)))
        for t in range(3):
            mask[:, PROMPT + t] = 1
            positions = positions[:, -1:] + 1
            token = out[-1][:, -1].argmax(-1, keepdim=True)
            out.append(gm(token, mask[:, :PROMPT + t + 1], positions, torch.tensor(PROMPT + t)))
    return out


@pytest.mark.parametrize("kv_heads", [2, 4])  # 2 query heads per KV head; one (transformers repeats nothing)
def test_attention_reads_the_kv_heads_unrepeated_and_the_logits_do_not_change(kv_heads):
    model = llama("sdpa", kv_heads=kv_heads, seed=4).eval()
    captured = capture_cached(model, BATCH, MAX_LEN).gm
    before = run_passes(flat(captured), [CacheSignaturePass()])
    after = run_passes(flat(captured), [CacheSignaturePass(), GroupedAttentionPass()])
    attention = calls(after, aten.scaled_dot_product_attention)
    grouped = kv_heads < 4
    assert len(attention) == 2 and all(bool(n.kwargs.get("enable_gqa")) == grouped for n in attention)
    # K and V repeats, 2 layers
    assert len(calls(before, aten.expand)) - len(calls(after, aten.expand)) == (2 * 2 if grouped else 0)
    caches = {n.target for n in after.graph.nodes if n.op == "get_attr" and n.target.startswith("key_cache_")}
    for node in attention:  # the keys attended are a slice of a cache buffer itself
        assert node.args[1].target is aten.slice.Tensor and node.args[1].args[0].args[0].target in caches
    for a, b in zip(steps(before), steps(after)):
        assert torch.equal(a, b)


def hand_built():
    """x.to(float32) * 1.0, unsqueezed, plus x unsqueezed again; buf + 1 read before and after buf.add_(1);
    int ids * 1.0 (a float result: not an identity); x.to(float16) (a real cast)."""
    g = torch.fx.Graph()
    root = torch.nn.Module()
    root.register_buffer("buf", torch.zeros(3))
    x, ids, buf = g.placeholder("x"), g.placeholder("ids"), g.get_attr("buf")
    values = {}

    def op(target, *args, like):
        node = g.call_function(target, args)
        node.meta["val"] = like
        values[node] = like
        return node

    x.meta["val"], ids.meta["val"], buf.meta["val"] = torch.empty(3), torch.empty(3, dtype=torch.long), torch.empty(3)
    to = op(aten.to.dtype, x, torch.float32, like=torch.empty(3))
    one = op(aten.mul.Tensor, to, 1.0, like=torch.empty(3))
    first = op(aten.unsqueeze.default, one, 0, like=torch.empty(1, 3))
    again = op(aten.unsqueeze.default, x, 0, like=torch.empty(1, 3))
    summed = op(aten.add.Tensor, first, again, like=torch.empty(1, 3))
    before = op(aten.add.Tensor, buf, 1, like=torch.empty(3))
    op(aten.add_.Tensor, buf, 1, like=torch.empty(3))
    after = op(aten.add.Tensor, buf, 1, like=torch.empty(3))
    floats = op(aten.mul.Tensor, ids, 1.0, like=torch.empty(3))
    half = op(aten.to.dtype, x, torch.float16, like=torch.empty(3, dtype=torch.float16))
    g.output((summed, before, after, floats, half))
    return torch.fx.GraphModule(root, g)


def test_identities_go_and_values_written_in_place_are_not_merged():
    x, ids = torch.randn(3), torch.arange(3)
    want = hand_built()(x, ids)
    gm = DropIdentityOpsPass()(hand_built()).graph_module
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(aten.unsqueeze.default) == 1  # x unsqueezed once: the cast and the * 1.0 were identities
    assert targets.count(aten.to.dtype) == 1  # the float16 cast stays
    assert targets.count(aten.mul.Tensor) == 1  # ids * 1.0 makes floats: it stays
    assert targets.count(aten.add.Tensor) == 3  # buf + 1 before and after its in-place add are different values
    got = gm(x, ids)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got, want))
    assert torch.equal(got[2], got[1] + 1)
