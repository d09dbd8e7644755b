"""CUDA-only checks, run by `pytest -m cuda` (benchmarks/gpu.sh); deselected by default (see pyproject.toml)."""
import copy

import pytest
import torch

import fxprune
from fxprune.recovery import LoraSettings, tune
from tests.models import llama
from tests.test_lora import clone, synthetic_instructions

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def dense():
    assert torch.cuda.is_available(), "the cuda tests need a CUDA device"
    return llama("sdpa")


def test_pruned_graph_on_cuda_bf16_matches_cpu(dense):
    gm = fxprune.compile(dense, 0.3)
    ids = torch.randint(0, 128, (2, 12))
    want = gm(ids).logits
    got = gm.to("cuda", torch.bfloat16)(ids.cuda()).logits.float().cpu()
    assert got.shape == want.shape
    assert (got - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize("trainable,teacher", [("lora", False), ("lora", True), ("full", True)])
def test_bf16_recovery_on_cuda_lowers_the_loss(dense, trainable, teacher):
    pruned = fxprune.compile(dense, 0.3)
    settings = LoraSettings(max_steps=20, lr=3e-3 if trainable == "lora" else 1e-3, dtype="bf16", trainable=trainable)
    model, history = tune(clone(pruned), synthetic_instructions(), settings, teacher=dense if teacher else None)
    key = "kd" if teacher else "loss"
    first, last = sum(h[key] for h in history[:3]) / 3, sum(h[key] for h in history[-3:]) / 3
    assert next(model.parameters()).device.type == "cuda" and last < first, (first, last)


def test_gradient_pass_on_cuda_matches_cpu(dense):
    from fxprune.scoring import compute_gradients
    dg = fxprune.analyze(dense)
    calib = torch.randint(0, 128, (4, 16))
    cpu = compute_gradients(dg, [calib], device="cpu")
    gpu = compute_gradients(dg, [calib], device="cuda")
    for name, g in cpu.grad.items():
        torch.testing.assert_close(gpu.grad[name].cpu(), g, rtol=1e-3, atol=1e-5)


def test_activation_statistics_of_a_cuda_model_match_cpu(dense):
    # HyWIA (the default importance) reads activation statistics: the CPU calibration tokens must reach a
    # graph whose weights are on the GPU, and the statistics come back on the CPU.
    from fxprune.scoring.activations import input_statistics
    calib = torch.randint(0, 128, (4, 16))
    cpu = input_statistics(fxprune.analyze(dense), [calib])
    gpu = input_statistics(fxprune.analyze(copy.deepcopy(dense).cuda()), [calib])
    assert cpu.keys() == gpu.keys()
    for name, st in cpu.items():
        assert gpu[name].var.device.type == "cpu"
        torch.testing.assert_close(gpu[name].var, st.var, rtol=1e-3, atol=1e-5)
