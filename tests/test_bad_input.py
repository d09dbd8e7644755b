"""Bad input gets a clear error that says what is wrong and what to do."""
import pytest
import torch
from transformers import PretrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

import fxprune


class Tiny(torch.nn.Module):
    def __init__(self, branchy=False):
        super().__init__()
        self.config = PretrainedConfig(vocab_size=16)
        self.emb = torch.nn.Embedding(16, 16)
        self.branchy = branchy

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.emb(input_ids)
        if self.branchy and bool(h.sum() > 0):  # data-dependent Python branch: torch.export refuses
            h = h * 2
        return CausalLMOutputWithPast(logits=h)


def test_export_failure_shows_error_and_hint():
    with pytest.raises(fxprune.CaptureError, match="(?s)could not trace Tiny.*(data-dependent|Data-dependent|guard).*Hint"):
        fxprune.analyze(Tiny(branchy=True))


def test_model_without_prunable_structure():
    model = Tiny()  # the embedding's features are the logits: an output, so frozen
    dg = fxprune.analyze(model)
    assert not dg.groups
    with pytest.raises(fxprune.PlanError, match="no prunable groups"):
        fxprune.plan(model, 0.2, scores={}, dg=dg)


# -- a dtype or device that cannot run ------------------------------------------------------------------

def test_unknown_dtype_and_device_are_named_before_loading():
    from fxprune.data.models import load_model
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_model(dtype="float8")
    with pytest.raises(ValueError, match="unknown device 'tpu9'"):
        load_model(device="tpu9")


def test_dtype_the_device_cannot_run_is_refused_with_the_fix(monkeypatch):
    from fxprune.util import devices
    from fxprune.data.models import load_model

    def refuse(dtype, device):
        raise RuntimeError(f"\"addmm_impl_cpu_\" not implemented for '{dtype}'")

    monkeypatch.setattr(devices, "probe", refuse)
    loaded = []
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: loaded.append(a))
    with pytest.raises(devices.UnsupportedDtypeError, match=r"dtype float16 cannot run on device cpu.*"
                                                            r"addmm_impl_cpu_.*use --dtype float32"):
        load_model(dtype=torch.float16, device="cpu")
    assert loaded == []  # refused before any weight was read


def test_dtype_probe_runs_the_real_ops():
    from fxprune.util.devices import check_runnable
    assert check_runnable("bf16", "cpu") == (torch.bfloat16, torch.device("cpu"))
    assert check_runnable(torch.float32, "meta") == (torch.float32, torch.device("meta"))
    with pytest.raises(ValueError, match="not a floating-point dtype"):
        check_runnable(torch.int8, "cpu")


def test_lora_refuses_a_precision_the_device_cannot_run(monkeypatch):
    from fxprune.util import devices
    from fxprune import recovery
    calls = []

    def refuse(dtype, device):
        calls.append((dtype, device))
        raise RuntimeError("bf16 autocast unsupported here")

    monkeypatch.setattr(devices, "probe", refuse)
    with pytest.raises(devices.UnsupportedDtypeError, match="dtype bfloat16 cannot run on device cpu"):
        recovery.tune(None, [], recovery.LoraSettings(dtype="bf16"))  # refused before the model is looked at
    assert calls


def test_cli_reports_an_unrunnable_dtype_without_a_traceback(monkeypatch, capsys):
    from fxprune.cli import commands as cli
    from fxprune.util import devices

    def refuse(dtype, device):
        raise RuntimeError("no kernel for this dtype")

    monkeypatch.setattr(devices, "probe", refuse)
    assert cli.main(["prune", "--dtype", "float16", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "fxprune prune: error: dtype float16 cannot run on device cpu" in err and "--dtype float32" in err
