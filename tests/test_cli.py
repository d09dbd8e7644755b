"""The command line on a tiny local model directory."""
import subprocess
import sys

from models import llama


def test_inspect_prints_groups_and_writes_pictures(tmp_path):
    llama("sdpa").save_pretrained(tmp_path / "m")
    out = subprocess.run([sys.executable, "-m", "fxprune.cli", "inspect", str(tmp_path / "m"),
                          "--dot", str(tmp_path / "g.dot"), "--png", str(tmp_path / "g.png")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "kv_groups: 2" in out.stdout and "mlp: 2" in out.stdout and "hidden: 1" in out.stdout
    assert (tmp_path / "g.dot").read_text().startswith("graph fxprune")
    assert (tmp_path / "g.png").stat().st_size > 10_000


def test_missing_model_path_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fxprune.cli", "inspect", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "not a local directory" in out.stderr


def test_eval_reports_perplexity_of_a_pruned_directory(tmp_path):
    import fxprune
    from tiny_tokenizer import tiny_tokenizer
    tok = tiny_tokenizer()
    model = llama("sdpa", vocab_size=len(tok))
    gm = fxprune.compile(model, 0.2, importance="l2")
    fxprune.save(gm, tmp_path / "pruned")
    tok.save_pretrained(tmp_path / "pruned")
    (tmp_path / "data" / "wikitext-2-raw").mkdir(parents=True)
    (tmp_path / "data" / "wikitext-2-raw" / "wiki.test.raw").write_text("a b c\n" * 200)
    out = subprocess.run([sys.executable, "-m", "fxprune.cli", "eval", str(tmp_path / "pruned"), "--tasks", "ppl",
                          "--data-dir", str(tmp_path / "data"), "--eval-tokens", "256", "--window", "32",
                          "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    import json
    ppl = json.loads((tmp_path / "r.json").read_text())["wikitext2_ppl"]
    assert 1 < ppl < 10_000


def test_prune_whole_experts_of_a_tiny_mixtral(tmp_path):
    import json

    import torch

    import fxprune
    from families import mixtral
    from tiny_tokenizer import tiny_tokenizer
    tok = tiny_tokenizer()
    model = mixtral("sdpa")
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "data" / "c4").mkdir(parents=True)
    (tmp_path / "data" / "c4" / "c4_sample.json").write_text(json.dumps([{"text": "a b c d e " * 40}] * 4))
    out = subprocess.run([sys.executable, "-m", "fxprune.cli", "prune", str(tmp_path / "m"), "--targets", "experts",
                          "--ratio", "0.115", "--importance", "l2", "--protect", "--calib-samples", "2",
                          "--calib-len", "16", "--eval-tokens", "0", "--data-dir", str(tmp_path / "data"),
                          "--output", str(tmp_path / "pruned"), "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["targets"] == "experts", report
    loaded = fxprune.load(tmp_path / "pruned")
    experts = [p.shape[0] for n, p in loaded.named_parameters() if n.endswith("experts.gate_up_proj")]
    assert sum(experts) == 6 and min(experts) >= 2, experts  # two of eight experts, top-2 routing kept
    # oracle: the original model whose router never picks the removed experts (their logits at -inf)
    from oracles import rel_err
    from test_experts import mask_removed_experts
    reference = mask_removed_experts(model, fxprune.analyze(model), loaded.meta[fxprune.PLAN_KEY])
    ids = torch.randint(1, len(tok), (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, reference(ids).logits) < 1e-5
        assert rel_err(loaded(ids).logits, model(ids).logits) > 1e-3  # the removed experts were routed to
