"""Hugging Face export with no list of model types: every family's pruned model loads with plain
transformers in a process without fxprune, reproduces the pruned logits and generates with its own
KV cache the tokens the pruned model picks greedily; plans a config cannot hold are refused, naming
the width, the config fields and the exports that keep them."""
import json
import re

import pytest
import torch

import fxprune
from families import falcon, falcon_mqa, gemma2, gpt2, gpt_neox, granite, mistral, mixtral, opt, phi3, qwen2, starcoder2
from models import FAMILIES as CORE, bloom, glm, glm4, llama
from oracles import inputs, random_scores, rel_err
from plain_transformers import greedy, load_in_plain_transformers
from test_config_twin import uniform_plan
from test_families import GQA_KEEP, MHA_KEEP

NEW_TOKENS = 6
MLP_KEEP = {"mlp": list(range(0, 96, 2))}
KEEPERS = r"export_gguf .* or export_program \(\.pt2"
CASES = {  # name: (build, uniform selection per kind); heads only where the config states the head size
    "llama_mha": (lambda: llama(kv_heads=4), MHA_KEEP),
    "llama_gqa": (llama, GQA_KEEP),
    "mistral": (mistral, GQA_KEEP),
    "qwen2": (qwen2, GQA_KEEP),
    "phi3": (phi3, GQA_KEEP),
    "gpt2": (gpt2, MHA_KEEP),
    "gpt_neox": (gpt_neox, MHA_KEEP),
    "opt": (opt, MHA_KEEP),
    "gemma2": (lambda: gemma2("eager"), {"kv_groups": [0], "mlp": list(range(20, 68))}),  # hidden: refused below
    "bloom": (bloom, {"heads": [1, 3], "mlp": list(range(0, 256, 2)), "hidden": list(range(0, 64, 2))}),
    "glm": (glm, GQA_KEEP),
    "glm4": (glm4, GQA_KEEP),
    "falcon": (falcon, GQA_KEEP),
    "falcon_mqa": (falcon_mqa, MHA_KEEP),
    "mixtral": (mixtral, {**GQA_KEEP, "mlp": list(range(0, 32, 2)), "experts": [0, 1, 3]}),
    "granite": (granite, MLP_KEEP),  # head size = hidden / heads: MLP only
    "starcoder2": (starcoder2, MLP_KEEP),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def uniform_widths_llama():
    model = llama()
    dg = fxprune.analyze(model)
    plan = fxprune.plan(model, 0.35, targets=("heads", "mlp", "hidden"), scores=random_scores(dg, 2), dg=dg,
                        uniform_widths=True)
    return fxprune.apply(model, plan, dg=dg)


def biased_llama():
    """A reconstruction may give an output projection a bias the original lacked: LLaMA's config
    holds it (attention_bias / mlp_bias), with zero biases for the sibling projections."""
    _, gm = uniform_plan(llama(), GQA_KEEP)
    g = torch.Generator().manual_seed(5)
    for layer in (0, 1):
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            module = gm.get_submodule(f"model.layers.{layer}.{name}")
            module.bias = torch.nn.Parameter(0.1 * torch.randn(module.out_features, generator=g))
    return gm


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case exported, then loaded in one fresh process (an interpreter start costs seconds)."""
    work = tmp_path_factory.mktemp("hf")
    gms = {name: uniform_plan(build(), keep)[1] for name, (build, keep) in CASES.items()}
    gms["llama_uniform_widths"] = uniform_widths_llama()
    gms["llama_bias"] = biased_llama()
    for name, gm in gms.items():
        fxprune.export_hf(gm, work / name)
    ids, mask = inputs()
    prompt = inputs(batch=2, seq=5, seed=3, padded=False)[0]
    loaded = load_in_plain_transformers([work / n for n in gms], ids, mask, prompt, NEW_TOKENS, work)
    return gms, {name: loaded[str(work / name)] for name in gms}, (ids, mask, prompt), work


@pytest.mark.parametrize("name", [*CASES, "llama_uniform_widths", "llama_bias"])
def test_plain_transformers_reproduces_pruned_model(exported, name):
    gms, loaded, (ids, mask, prompt), _ = exported
    gm, got = gms[name], loaded[name]
    assert not got["fxprune_loaded"]
    with torch.no_grad():
        expected = gm(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert rel_err(got["logits"][keep], expected[keep]) < 1e-5
    assert torch.equal(got["tokens"], greedy(gm, prompt, NEW_TOKENS))


def config_of(work, name, *keys):
    config = json.loads((work / name / "config.json").read_text())
    return {k: config[k] for k in keys}


def test_exported_widths_and_bias_switches(exported):
    from safetensors.torch import load_file
    work = exported[3]
    assert config_of(work, "llama_gqa", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                     "head_dim") == {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 2,
                                     "num_key_value_heads": 1, "head_dim": 16}
    # the class's own names for the widths, and a head count that sets no tensor shape (head size = hidden / heads)
    assert config_of(work, "gpt2", "n_embd", "n_inner", "n_head") == {"n_embd": 32, "n_inner": 48, "n_head": 2}
    assert config_of(work, "opt", "hidden_size", "word_embed_proj_dim", "ffn_dim", "num_attention_heads") == {
        "hidden_size": 32, "word_embed_proj_dim": 32, "ffn_dim": 48, "num_attention_heads": 2}
    assert config_of(work, "falcon", "hidden_size", "num_attention_heads", "num_kv_heads", "ffn_hidden_size") == {
        "hidden_size": 32, "num_attention_heads": 2, "num_kv_heads": 1, "ffn_hidden_size": 48}
    assert config_of(work, "mixtral", "num_local_experts", "intermediate_size", "num_key_value_heads") == {
        "num_local_experts": 3, "intermediate_size": 16, "num_key_value_heads": 1}
    for name in ("granite", "starcoder2"):
        assert config_of(work, name, "hidden_size", "intermediate_size", "num_attention_heads") == {
            "hidden_size": 64, "intermediate_size": 48, "num_attention_heads": 4}
    biased = json.loads((work / "llama_bias" / "config.json").read_text())
    assert biased["attention_bias"] is True and biased["mlp_bias"] is True
    weights = load_file(work / "llama_bias" / "model.safetensors")
    assert torch.equal(weights["model.layers.1.self_attn.q_proj.bias"], torch.zeros(32))  # sibling: zero
    assert torch.equal(weights["model.layers.1.self_attn.o_proj.bias"],
                       exported[0]["llama_bias"].get_submodule("model.layers.1.self_attn.o_proj").bias.detach())


def refused(gm, tmp_path, pattern):
    with pytest.raises(fxprune.ExportError, match=pattern) as error:
        fxprune.export_hf(gm, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # nothing written
    return str(error.value)


def test_non_uniform_plan_refused_naming_layers_and_option(tmp_path):
    model = llama()
    dg = fxprune.analyze(model)
    plan = fxprune.plan(model, 0.3, scores=random_scores(dg), dg=dg, allocation="global")
    refused(fxprune.apply(model, plan, dg=dg), tmp_path,
            r"(?s)mlp\.\w+_proj\.weight dim \d \(set by intermediate_size\) per layer: \[\d+, \d+\].*uniform_widths=True")


@pytest.mark.parametrize("build", [gpt_neox, granite])
def test_heads_refused_where_head_size_is_hidden_over_heads(build, tmp_path):
    _, gm = uniform_plan(build(), {"heads": [0, 3]} if build is gpt_neox else {"kv_groups": [1]})
    message = refused(gm, tmp_path, r"cannot state the pruned width of \S+\.(weight|bias) dim \d")
    assert "hidden_size" in message and "head size = hidden / heads" in message and re.search(KEEPERS, message)
    if build is gpt_neox:  # its head count sets no tensor shape at all
        assert "num_attention_heads sets no tensor shape" in message


def test_bloom_mlp_alone_refused(tmp_path):
    # Bloom's MLP is 4 x hidden_size: the only field that sets it also sets the kept hidden size
    _, gm = uniform_plan(bloom(), {"mlp": list(range(0, 256, 2))})
    refused(gm, tmp_path, r"(?s)dense_(h_to_4h|4h_to_h)\.weight dim \d \(256 -> 128\).*\(hidden_size\).*keeping .* at 64"
                          r".*MLP = 4 x hidden.*" + KEEPERS)


def test_gemma2_hidden_refused_by_the_logits(tmp_path):
    # every tensor fits a config with hidden_size 32, but Gemma-2 scales the embeddings by sqrt(hidden_size)
    _, gm = uniform_plan(gemma2("eager"), {"mlp": list(range(48)), "hidden": list(range(0, 64, 2))})
    refused(gm, tmp_path, r"(?s)every tensor at its pruned shape does not compute the pruned model.*hidden_size 64 -> 32"
                          r".*relative logit error.*sqrt\(hidden_size\).*" + KEEPERS)


@pytest.mark.parametrize("family", ["baichuan7b", "chatglm"])
def test_replicas_refused_pointing_to_pt2(family, tmp_path):
    _, gm = uniform_plan(CORE[family]("eager"), {"mlp": list(range(0, 64, 2))})
    refused(gm, tmp_path, r"replicas\.\w+\.\w+ is not part of transformers .*AutoModelForCausalLM cannot build"
                          r".*" + KEEPERS)


def test_bias_without_config_switch_refused(tmp_path):
    _, gm = uniform_plan(qwen2(), GQA_KEEP)
    o_proj = gm.get_submodule("model.layers.0.self_attn.o_proj")
    o_proj.bias = torch.nn.Parameter(torch.ones(o_proj.out_features))
    refused(gm, tmp_path, r"model\.layers\.0\.self_attn\.o_proj\.bias.*no config flag adds them")


def test_non_empty_output_refused(tmp_path):
    _, gm = uniform_plan(llama(), GQA_KEEP)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(fxprune.ExportError, match="not empty"):
        fxprune.export_hf(gm, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("ratio,targets", [(0.2, ("heads", "mlp")), (0.35, ("heads", "mlp")),
                                           (0.35, ("heads", "mlp", "hidden"))])
def test_uniform_widths_plan_same_counts_by_importance(ratio, targets):
    model = llama()
    dg = fxprune.analyze(model)
    scores = random_scores(dg, 7)
    plan = fxprune.plan(model, ratio, targets=targets, scores=scores, dg=dg, uniform_widths=True)
    assert abs(plan.removed_fraction - ratio) <= 0.01
    per_kind = {}
    for group in dg.groups:
        if group.id not in plan.groups:  # not a target (head_dim halves, ...)
            continue
        kept = plan.units.get(group.id, list(range(group.n_units)))
        per_kind.setdefault(group.kind, set()).add(len(kept))
        top = torch.argsort(scores[group.id], descending=True, stable=True)[: len(kept)]
        if group.id in plan.units:
            assert kept == sorted(top.tolist())  # which units: the most important of each layer
    assert all(len(counts) == 1 for counts in per_kind.values()), per_kind


def test_uniform_widths_refuses_protected_layers():
    with pytest.raises(ValueError, match=r"uniform_widths .* cannot leave layers \(0,\) unpruned"):
        fxprune.PruneConfig(uniform_widths=True, protect_layers=(0,))
