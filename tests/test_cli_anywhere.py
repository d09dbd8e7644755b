"""The command line away from the repository: no data directory, missing files refused before any model is read."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models import llama
from tiny_tokenizer import tiny_tokenizer

from fxprune.cli import commands as cli
from fxprune.data.loaders import DATA_ENV

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny local Hugging Face directory: random LLaMA and the in-memory byte-level tokenizer."""
    path = tmp_path_factory.mktemp("tiny") / "m"
    tok = tiny_tokenizer()
    llama("sdpa", vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to load a model fails the test: the error must come first."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the data files were checked")
    monkeypatch.setattr("fxprune.data.models.load_model", refuse)
    monkeypatch.setattr(cli, "load_any", refuse)
    monkeypatch.delenv(DATA_ENV, raising=False)


def test_prune_in_an_empty_directory_without_data(model_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != DATA_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    work = tmp_path / "empty"
    work.mkdir()
    out = subprocess.run([sys.executable, "-m", "fxprune.cli", "prune", str(model_dir), "--protect",
                          "--importance", "l2", "--calib-samples", "4", "--calib-len", "64", "--eval-tokens", "512",
                          "--window", "32", "--output", "pruned"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "packaged C4 sample" in out.stdout  # calibrated on the sample shipped inside the package
    assert "perplexity skipped: no WikiText-2 data" in out.stderr  # no data, no hub: a line, not an error
    assert (work / "pruned" / "fxprune.json").is_file() and (work / "pruned" / "tokenizer.json").is_file()


@pytest.mark.parametrize("flag", ["--calib-data", "--eval-data"])
def test_prune_refuses_a_missing_named_file_before_loading(model_dir, tmp_path, capsys, no_model_loading, flag):
    missing = tmp_path / "nope.json"
    assert cli.main(["prune", str(model_dir), flag, str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and flag in err


def test_data_dir_without_the_calibration_file_is_refused_before_loading(model_dir, tmp_path, capsys,
                                                                        no_model_loading):
    assert cli.main(["prune", str(model_dir), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "c4" / "c4_sample.json") in err and "--data-dir" in err


def test_eval_refuses_a_named_task_without_its_file_before_loading(model_dir, tmp_path, capsys, no_model_loading):
    assert cli.main(["eval", str(model_dir), "--tasks", "hellaswag", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "hellaswag_val_full.txt.bz2") in err and "--data-dir" in err
    assert cli.main(["eval", str(model_dir), "--tasks", "piqa"]) == 2  # no data directory at all
    assert "--data-dir" in capsys.readouterr().err


def test_tune_refuses_missing_data_before_loading(model_dir, tmp_path, capsys, no_model_loading, monkeypatch):
    monkeypatch.setattr("fxprune.recovery.tune_script.load_graph_module", lambda *a: pytest.fail("the model was loaded"))
    assert cli.main(["tune", str(model_dir), "--data", str(tmp_path / "alpaca.json")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "alpaca.json") in err and "--data" in err


def test_hub_fallback_fails_fast_when_unreachable(monkeypatch):
    from fxprune.data import sources
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.setattr(sources, "HUB_HOST", "hub.invalid")  # a name that never resolves (RFC 2606)
    t = time.time()
    src = sources.wikitext_source()
    assert src.skip and src.value is None and "unreachable" in src.skip
    assert time.time() - t < 10


def test_a_named_hub_set_that_cannot_be_had_fails_before_loading(model_dir, capsys, no_model_loading, monkeypatch):
    from fxprune.data import sources
    monkeypatch.setattr(sources, "HUB_HOST", "hub.invalid")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")  # nothing cached either
    assert cli.main(["prune", str(model_dir), "--calib-data", "hf:allenai/c4:en:validation"]) == 2
    err = capsys.readouterr().err
    assert "hf:allenai/c4:en:validation" in err and "--calib-data" in err and "unreachable" in err


def test_prune_refits_on_the_users_own_text(model_dir, tmp_path, monkeypatch, capsys):
    """The documented in-domain recipe: `--importance obs --allocation absolute --calib-data my_text.txt
    --reconstruct lstsq` scores and refits on windows of that text (the refit on `--refit-samples` of them,
    its forward passes in `--refit-precision`), and the saved model keeps the refit."""
    import fxprune
    from fxprune.data.loaders import calibration_samples
    monkeypatch.delenv(DATA_ENV, raising=False)
    text = tmp_path / "my_text.txt"
    text.write_text(" ".join(f"line {i} of the user's own domain text, about valves and pumps." for i in range(300)))
    seen = {}
    real = fxprune.compile

    def spy(model, *a, **k):
        seen.update(k)
        return real(model, *a, **k)
    monkeypatch.setattr(fxprune, "compile", spy)
    out = tmp_path / "pruned"
    assert cli.main(["prune", str(model_dir), "--importance", "obs", "--allocation", "absolute", "--calib-data",
                     str(text), "--reconstruct", "lstsq", "--calib-samples", "4", "--calib-len", "32",
                     "--refit-samples", "6", "--refit-precision", "bfloat16",
                     "--eval-tokens", "0", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(text) in printed and "absolute" in printed   # the report names the allocation it used
    tok = tiny_tokenizer()
    cfg = seen["config"]
    assert (cfg.importance, cfg.allocation) == ("obs", "absolute")
    assert cfg.reconstruct == fxprune.Refit(mode="lstsq", samples=6, precision="bfloat16")  # one settings object
    # both draws are windows of the user's text (the refit's `samples` of them), not the packaged sample
    expected = calibration_samples(text, tok, n_samples=cfg.reconstruct.samples, seq_len=32)
    assert torch.equal(seen["refit_calibration"].ids, expected)
    assert torch.equal(seen["calibration"].ids, calibration_samples(text, tok, n_samples=4, seq_len=32))
    gm = fxprune.load(out)
    refitted = [n for n, m in gm.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
    assert refitted and all(n.endswith(("o_proj", "down_proj")) for n in refitted)  # the refit's biases came back
    assert gm.meta[fxprune.PLAN_KEY].config.reconstruct.mode == "lstsq"
