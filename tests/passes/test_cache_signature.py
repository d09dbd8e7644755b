"""CacheSignaturePass alone, on the KV-cache capture of a tiny LLaMA: the program is called positionally as
`gm(input_ids, cache_mask, position_ids, start)` and returns the logits tensor; no device is baked in; the
prefill and each one-token step equal the model's own full recompute, and the cache holds the keys and
values the model computes itself."""
import pytest
import torch
from transformers.cache_utils import DynamicCache

from fxprune.passes.cache_signature import CacheSignaturePass
from fxprune.serving.kv_capture import capture_cached
from fxprune.analysis.contracts import graphs_of
from models import llama
from oracles import rel_err
from tiny import flat, run_passes

BATCH, MAX_LEN, PROMPT, VOCAB = 2, 16, 5, 128
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def program():
    model = llama("sdpa", seed=3).eval()
    gm = run_passes(flat(capture_cached(model, BATCH, MAX_LEN).gm), [CacheSignaturePass()])
    return model, gm


def prompt(seed=0):
    ids = torch.randint(3, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # the first row left padded
    return ids, mask


def empty_cache(gm):
    for name, t in gm.named_buffers():
        if name.startswith(("key_cache_", "value_cache_")):
            t.zero_()


def prefill(gm, ids, mask):
    """The prompt at cache positions 0..PROMPT-1, as Generator runs it."""
    cache_mask = torch.zeros(BATCH, MAX_LEN, dtype=torch.long)
    cache_mask[:, :PROMPT] = mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return gm(ids, cache_mask, positions, torch.tensor(0)), cache_mask, positions


def test_the_signature_is_positional_and_returns_the_logits(program):
    _, gm = program
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["input_ids", "cache_mask", "position_ids", "start"]
    empty_cache(gm)
    logits, _, _ = prefill(gm, *prompt())
    assert isinstance(logits, torch.Tensor) and logits.shape == (BATCH, PROMPT, VOCAB)


def test_no_device_is_baked_into_the_program(program):
    # devices follow input_ids: no device constant and no export metadata assert is left, in any sub-graph
    _, gm = program
    for sub in graphs_of(gm):
        for node in sub.graph.nodes:
            values = list(node.args) + list(node.kwargs.values())
            assert not any(isinstance(v, torch.device) for v in values), (node.name, node.args, node.kwargs)
            assert node.target is not torch.ops.aten._assert_tensor_metadata.default, node.name


def test_prefill_and_decode_equal_the_models_full_recompute(program):
    model, gm = program
    ids, mask = prompt(1)
    empty_cache(gm)
    logits, cache_mask, positions = prefill(gm, ids, mask)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert rel_err(logits[real], full[real]) < 1e-5
    position = positions[:, -1:] + 1
    for t in range(3):  # one token per step, each compared with the model re-run on the whole sequence
        token = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
        cache_mask[:, PROMPT + t] = 1
        with torch.no_grad():
            logits = gm(token, cache_mask, position, torch.tensor(PROMPT + t))
            full = model(ids, attention_mask=mask).logits[:, -1]
        assert logits.shape == (BATCH, 1, VOCAB) and rel_err(logits[:, 0], full) < 1e-5
        position = position + 1


def test_the_cache_holds_the_models_own_keys_and_values(program):
    model, gm = program
    ids = torch.randint(3, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(2))
    empty_cache(gm)
    prefill(gm, ids, torch.ones_like(ids))
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=reference, use_cache=True)
    buffers = dict(gm.named_buffers())
    for i, layer in enumerate(reference.layers):
        for kind, expected in (("key", layer.keys), ("value", layer.values)):
            written = buffers[f"{kind}_cache_{i}"]
            assert rel_err(written[:, :, :PROMPT], expected) < 1e-5
            assert not written[:, :, PROMPT:].any()  # nothing beyond the prompt was written
