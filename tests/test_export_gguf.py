"""GGUF export for llama.cpp: keys, per-layer arrays, tensor shapes and values read back with
gguf.GGUFReader; the slow test runs the files in llama.cpp (llama-cpp-python) against fxprune."""
import numpy as np
import pytest
import torch

import fxprune
from families import gpt2
from fxprune.export.common import base_of
from fxprune.export.gguf import check_gguf_expressible, rotary_pairs
from fxprune.data.models import embedded_gguf
from models import llama
from oracles import random_scores
from test_config_twin import uniform_plan
from test_families import GQA_KEEP


def non_uniform(vocab_size=128, ratio=0.35):
    model = llama(vocab_size=vocab_size)
    dg = fxprune.analyze(model)
    plan = fxprune.plan(model, ratio, targets=("heads", "mlp", "hidden"), scores=random_scores(dg, 4), dg=dg,
                        allocation="global")
    return fxprune.apply(model, plan, dg=dg)


def read(path):
    from gguf import GGUFReader
    reader = GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def layer_widths(gm):
    sd = gm.state_dict()
    return [(sd[f"model.layers.{i}.self_attn.o_proj.weight"].shape[1] // 16,
             sd[f"model.layers.{i}.self_attn.k_proj.weight"].shape[0] // 16,
             sd[f"model.layers.{i}.mlp.up_proj.weight"].shape[0]) for i in (0, 1)]


def test_per_layer_widths_as_deci_arrays(tmp_path):
    gm = non_uniform()
    widths = layer_widths(gm)
    assert widths[0] != widths[1]
    fxprune.export_gguf(gm, tmp_path / "m.gguf", dtype="f32")
    kv, tensors = read(tmp_path / "m.gguf")
    sd = gm.state_dict()
    hidden = sd["model.embed_tokens.weight"].shape[1]
    assert kv["general.architecture"] == "deci" and kv["general.file_type"] == 0
    assert kv["deci.attention.head_count"] == [w[0] for w in widths]
    assert kv["deci.attention.head_count_kv"] == [w[1] for w in widths]
    assert kv["deci.feed_forward_length"] == [w[2] for w in widths]
    assert kv["deci.embedding_length"] == hidden and kv["deci.attention.key_length"] == 16
    assert "output.weight" not in tensors  # tied head: llama.cpp reuses token_embd
    for i, (heads, kv_heads, ff) in enumerate(widths):
        assert list(tensors[f"blk.{i}.attn_q.weight"].shape) == [hidden, heads * 16]  # GGUF lists dims reversed
        assert list(tensors[f"blk.{i}.ffn_down.weight"].shape) == [ff, hidden]
        q = torch.from_numpy(np.array(tensors[f"blk.{i}.attn_q.weight"].data)).reshape(heads * 16, hidden)
        assert torch.equal(q, rotary_pairs(sd[f"model.layers.{i}.self_attn.q_proj.weight"], heads))
        v = torch.from_numpy(np.array(tensors[f"blk.{i}.attn_v.weight"].data)).reshape(kv_heads * 16, hidden)
        assert torch.equal(v, sd[f"model.layers.{i}.self_attn.v_proj.weight"])


def test_rotary_pairs_moves_half_rotation_to_pairs():
    # One head of size 4: HF rotates (x0, x2) and (x1, x3); llama.cpp rotates consecutive pairs.
    rows = torch.arange(8.0).reshape(8, 1)  # two heads
    assert rotary_pairs(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_uniform_plan_as_llama_f16_with_tokenizer(tmp_path):
    _, gm = uniform_plan(llama(vocab_size=49152), GQA_KEEP)
    fxprune.export_gguf(gm, tmp_path / "m.gguf", dtype="f16", tokenizer_gguf=embedded_gguf())
    kv, tensors = read(tmp_path / "m.gguf")
    source, _ = read(embedded_gguf())
    assert kv["general.architecture"] == "llama" and kv["general.file_type"] == 1
    assert (kv["llama.attention.head_count"], kv["llama.attention.head_count_kv"], kv["llama.feed_forward_length"],
            kv["llama.embedding_length"]) == (2, 1, 48, 32)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert kv[key] == source[key], key
    embd = tensors["token_embd.weight"]
    assert embd.data.dtype == np.float16 and tensors["output_norm.weight"].data.dtype == np.float32
    expected = gm.state_dict()["model.embed_tokens.weight"]
    assert torch.allclose(torch.from_numpy(np.array(embd.data)).float().reshape(expected.shape), expected, atol=1e-3)


def test_refusals_write_nothing(tmp_path):
    _, gm = uniform_plan(llama(), GQA_KEEP)
    with pytest.raises(fxprune.ExportError, match="49152 tokens, the model's vocabulary 128"):
        fxprune.export_gguf(gm, tmp_path / "a.gguf", tokenizer_gguf=embedded_gguf())
    with pytest.raises(fxprune.ExportError, match="dtype must be one of"):
        fxprune.export_gguf(gm, tmp_path / "b.gguf", dtype="q4")
    _, gpt = uniform_plan(gpt2(), {"mlp": list(range(48))})
    with pytest.raises(fxprune.ExportError, match="'gpt2'"):
        fxprune.export_gguf(gpt, tmp_path / "c.gguf")
    shapes = {k: tuple(v.shape) for k, v in gm.state_dict().items()}
    shapes["model.layers.1.mlp.up_proj.weight"] = (0, shapes["model.layers.1.mlp.up_proj.weight"][1])
    with pytest.raises(fxprune.ExportError, match="layer 1 intermediate_size"):
        check_gguf_expressible(base_of(gm)["config"], shapes)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "d.gguf").write_bytes(b"mine")
    with pytest.raises(fxprune.ExportError, match="not empty"):
        fxprune.export_gguf(gm, tmp_path / "d.gguf")
    assert (tmp_path / "d.gguf").read_bytes() == b"mine"


def refitted(vocab_size=49152, ratio=0.01):
    """A per-layer heads + MLP plan with the default least-squares refit: o_proj and down_proj gain biases.
    (With llama.cpp's vocabulary the embedding is most of the tiny model: 1% is what heads and MLP allow.)"""
    model = llama(vocab_size=vocab_size)
    dg = fxprune.analyze(model)
    calibration = torch.randint(0, vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    plan = fxprune.plan(model, ratio, scores=random_scores(dg, 4), dg=dg, allocation="global", reconstruct="lstsq",
                        calibration=calibration)
    return fxprune.apply(model, plan, dg=dg, calibration=calibration)


@pytest.mark.slow
@pytest.mark.parametrize("plan_kind", ["uniform", "per_layer", "refit"])
def test_llama_cpp_reproduces_pruned_logits(tmp_path, plan_kind):
    import llama_cpp  # the optional extra: pip install -e '.[llamacpp]' (builds llama.cpp from source)
    gm = {"per_layer": lambda: non_uniform(49152, 0.3), "refit": refitted,
          "uniform": lambda: uniform_plan(llama(vocab_size=49152), GQA_KEEP)[1]}[plan_kind]()
    widths = layer_widths(gm)
    assert (widths[0] != widths[1]) == (plan_kind != "uniform")  # the per-layer cases really differ per layer
    path = fxprune.export_gguf(gm, tmp_path / "m.gguf", dtype="f32", tokenizer_gguf=embedded_gguf())
    fields, tensors = read(path)
    assert fields["general.architecture"] == ("llama" if plan_kind == "uniform" else "deci")
    if plan_kind == "refit":  # the refit's biases travel, and llama.cpp must add them for the logits below to match
        assert {"blk.0.attn_output.bias", "blk.0.ffn_down.bias"} <= set(tensors)
    tokens = [1, 523, 2001, 77, 4096, 31000, 12, 9]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(tokens)
    got = torch.from_numpy(np.array(llm.scores[: len(tokens)], dtype=np.float32))
    llm.close()  # freed now: at interpreter exit llama-cpp-python's own finaliser fails noisily
    with torch.no_grad():
        expected = gm(torch.tensor([tokens]), attention_mask=torch.ones(1, len(tokens), dtype=torch.long)).logits[0]
    err = float((got - expected).abs().max() / expected.abs().max())
    assert err < 1e-3, err
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    if plan_kind == "refit":  # and without its biases the model would be measurably another one
        with torch.no_grad():
            for name, p in gm.named_parameters():
                if name.endswith(("o_proj.bias", "down_proj.bias")):
                    p.zero_()
            unbiased = gm(torch.tensor([tokens]), attention_mask=torch.ones(1, len(tokens), dtype=torch.long)).logits[0]
        assert float((unbiased - expected).abs().max() / expected.abs().max()) > 10 * max(err, 1e-3)
