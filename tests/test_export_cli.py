"""`fxprune export DIR --format hf|gguf|pt2 --output OUT`: each format from a saved directory, and
bad input refused with a clear error before the model is loaded, writing nothing."""
import pytest
import torch

import fxprune
from fxprune.cli import main
from models import llama
from oracles import prune_random
from test_config_twin import uniform_plan
from test_families import GQA_KEEP


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    _, uniform = uniform_plan(llama(), GQA_KEEP)
    _, _, per_layer = prune_random(llama(), 0.3)
    fxprune.save(uniform, root / "uniform")
    fxprune.save(per_layer, root / "per_layer")
    return root, uniform, per_layer


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*_):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(fxprune, "load", refuse)


def test_each_format(saved, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM
    root, uniform, per_layer = saved
    assert main(["export", str(root / "uniform"), "--format", "hf", "--output", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(1, 128, (2, 9))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, uniform(ids, attention_mask=torch.ones_like(ids)).logits, atol=1e-5)
    assert main(["export", str(root / "per_layer"), "--format", "gguf", "--dtype", "f32",
                 "--output", str(tmp_path / "m.gguf")]) == 0
    kv = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "m.gguf").fields.items()}
    assert kv["general.architecture"] == "deci" and "tokenizer.ggml.tokens" not in kv  # 128 tokens: not SmolLM2's
    assert main(["export", str(root / "per_layer"), "--format", "pt2", "--output", str(tmp_path / "m.pt2")]) == 0
    program = torch.export.load(tmp_path / "m.pt2").module()
    with torch.no_grad():
        assert torch.allclose(program(ids, torch.ones_like(ids)), per_layer(ids, attention_mask=torch.ones_like(ids)).logits,
                              atol=1e-5)


def test_plan_hf_cannot_hold_refused_before_loading(saved, tmp_path, capsys, no_loading):
    root = saved[0]
    assert main(["export", str(root / "per_layer"), "--format", "hf", "--output", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "fxprune export: error:" in err and "layers [1] differ from layer 0" in err and "--uniform-widths" in err
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_refused(saved, tmp_path, capsys, no_loading):
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(saved[0] / "uniform"), "--format", "onnx", "--output", str(tmp_path / "x")])
    assert exit_.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_non_empty_output_refused(saved, tmp_path, capsys, no_loading):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(["export", str(saved[0] / "uniform"), "--format", "hf", "--output", str(tmp_path / "out")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_not_an_fxprune_directory_refused(tmp_path, capsys, no_loading):
    assert main(["export", str(tmp_path), "--format", "pt2", "--output", str(tmp_path / "m.pt2")]) == 2
    assert "is not an fxprune directory: missing model.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "m.pt2").exists()
