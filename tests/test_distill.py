"""Distillation from the dense model during recovery (fxprune.recovery.distill, fxprune.recovery.tune(teacher=...))."""
from __future__ import annotations

import json

import pytest
import torch

import fxprune
from fxprune.recovery.distill import Teacher, hidden_loss, kd_loss
from fxprune.recovery import LoraSettings, merge, tune
from tests.test_lora import batch, clone, synthetic_instructions, tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def dense():
    model = tiny_llama()
    with torch.no_grad():  # larger weights than the init's: peaked logits, so pruning moves them visibly
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    return model


@pytest.fixture(scope="module")
def pruned(dense):
    return fxprune.compile(dense, ratio=0.3)


@pytest.fixture(scope="module")
def examples():
    return synthetic_instructions()


def fixed_kd(student, teacher, examples) -> float:
    b = batch(examples, 8)
    with torch.no_grad():
        s = student(b["input_ids"], attention_mask=b["attention_mask"]).logits
        t = teacher(b["input_ids"], attention_mask=b["attention_mask"]).logits
    return kd_loss(s, t, b["attention_mask"]).item()


def test_kd_loss_is_zero_for_equal_logits_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    assert kd_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    # a constant shift per position leaves both softmaxes equal
    assert kd_loss(logits + 3.0, logits, temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 5, 11)
    direct = (other.softmax(-1) * (other.log_softmax(-1) - logits.log_softmax(-1))).sum(-1).mean()
    assert kd_loss(logits, other).item() == pytest.approx(direct.item(), rel=1e-5)
    # T^2 * KL of the softened distributions
    soft = (other.div(4).softmax(-1) * (other.div(4).log_softmax(-1) - logits.div(4).log_softmax(-1))).sum(-1).mean()
    assert kd_loss(logits, other, temperature=4.0).item() == pytest.approx(16 * soft.item(), rel=1e-5)


def test_kd_and_hidden_losses_ignore_padding():
    torch.manual_seed(1)
    s, t = torch.randn(1, 4, 7), torch.randn(1, 4, 7)
    mask = torch.tensor([[1, 1, 0, 0]])
    assert kd_loss(s, t, mask).item() == pytest.approx(kd_loss(s[:, :2], t[:, :2]).item(), rel=1e-6)
    assert hidden_loss(s, t, mask).item() == pytest.approx((s[:, :2] - t[:, :2]).pow(2).mean().item(), rel=1e-6)
    t2 = t.clone()
    t2[:, 2:] += 100.0  # differences at padded positions do not count
    assert kd_loss(s, t2, mask).item() == pytest.approx(kd_loss(s, t, mask).item(), rel=1e-6)


def test_kd_term_is_zero_when_the_student_is_the_teacher(pruned, examples):
    # LoRA's B starts at zero, so at the first step the student computes exactly the teacher's logits.
    _, history = tune(clone(pruned), examples, LoraSettings(max_steps=2, lr=1e-3, kd_alpha=0.5), teacher=clone(pruned))
    assert history[0]["kd"] == pytest.approx(0.0, abs=1e-6)
    assert history[0]["loss"] == pytest.approx(0.5 * history[0]["ce"], rel=1e-5)


@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_distillation_lowers_the_kl_to_the_dense_model(dense, pruned, examples, trainable):
    before = fixed_kd(pruned, dense, examples)
    lr = 3e-3 if trainable == "lora" else 1e-3
    model, history = tune(clone(pruned), examples, LoraSettings(max_steps=12, lr=lr, dropout=0.0, trainable=trainable),
                          teacher=dense)
    after = fixed_kd(model, dense, examples)
    assert before > 0.01 and after < 0.7 * before, (before, after)
    first, last = sum(h["kd"] for h in history[:3]) / 3, sum(h["kd"] for h in history[-3:]) / 3
    assert last < first, (first, last)
    # the teacher's flags and mode are given back after training
    assert all(p.requires_grad for p in dense.parameters()) and not dense.training


def weights(gm):
    return {n: p.detach().clone() for n, p in gm.named_parameters()}


def test_full_mode_changes_the_weights_and_lora_mode_only_adapters(dense, pruned, examples):
    original = weights(pruned)
    full, _ = tune(clone(pruned), examples, LoraSettings(max_steps=3, lr=1e-3, trainable="full"), teacher=dense)
    assert isinstance(full, torch.fx.GraphModule) and not hasattr(full, "peft_config")
    changed = [n for n, p in full.named_parameters() if not torch.equal(p, original[n])]
    projections = [n for n in original if n.endswith("proj.weight")]
    assert set(projections) <= set(changed) and any("embed" in n for n in changed)
    assert merge(full) is full  # nothing to fold

    lora, _ = tune(clone(pruned), examples, LoraSettings(max_steps=3, lr=1e-3), teacher=dense)
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
            for n, p in lora.named_parameters() if "lora_" not in n}
    assert base.keys() == original.keys()
    assert all(torch.equal(base[n], original[n]) for n in original)  # the pruned weights are untouched
    adapters = [p for n, p in lora.named_parameters() if "lora_B" in n]
    assert adapters and all(p.abs().sum() > 0 for p in adapters)  # ...and the adapters did learn


def test_hidden_state_matching_adds_its_term(dense, pruned, examples):
    _, history = tune(clone(pruned), examples,
                      LoraSettings(max_steps=2, lr=1e-3, hidden_weight=0.5, kd_alpha=1.0), teacher=dense)
    h = history[0]
    assert h["hidden"] > 0 and h["loss"] == pytest.approx(h["kd"] + 0.5 * h["hidden"], rel=1e-5)


def test_teacher_runs_without_gradients_in_the_students_dtype(pruned):
    teacher_model = tiny_llama().double()
    runner = Teacher(teacher_model, pruned, "cpu", match_hidden=True)
    assert {p.dtype for p in teacher_model.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in teacher_model.parameters())
    ids = torch.randint(0, 128, (2, 6))
    logits, hidden = runner(ids, torch.ones_like(ids))
    assert logits.dtype == torch.float32 and not logits.requires_grad and hidden.shape == (2, 6, 64)
    runner.close()
    assert all(p.requires_grad for p in teacher_model.parameters())


def test_a_teacher_with_another_vocabulary_is_refused_before_training(pruned, examples):
    from transformers import LlamaConfig, LlamaForCausalLM
    other = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    gm = clone(pruned)
    with pytest.raises(ValueError, match="100 tokens, the student's 128"):
        tune(gm, examples, LoraSettings(max_steps=1), teacher=other)
    assert not any("lora" in n for n, _ in gm.named_modules())


def test_bad_distillation_settings_are_refused():
    for bad in (dict(trainable="all"), dict(kd_alpha=1.5), dict(kd_temperature=0), dict(hidden_weight=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LoraSettings(**bad)


def test_tune_script_distils_full_weights_from_a_teacher_directory(dense, pruned, examples, tmp_path):
    from fxprune.recovery import tune_script
    fxprune.save(pruned, tmp_path / "pruned")
    dense.save_pretrained(tmp_path / "dense")
    (tmp_path / "data.json").write_text(json.dumps(examples[:16]))
    common = ["--gm", str(tmp_path / "pruned"), "--data", str(tmp_path / "data.json")]
    with pytest.raises(FileNotFoundError, match="--teacher"):  # checked before any model is read
        tune_script.main(common + ["--teacher", str(tmp_path / "missing")])
    assert tune_script.main(common + ["--teacher", str(tmp_path / "dense"), "--trainable", "full", "--max-steps", "2",
                                      "--lr", "1e-3", "--merged", str(tmp_path / "tuned"),
                                      "--result", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["trainable"] == "full" and result["steps"] == 2 and "kd" in result["history"][0]
    assert result["trainable_parameters"] == sum(p.numel() for p in pruned.parameters())
    tuned = fxprune.load(tmp_path / "tuned")
    assert any(not torch.equal(p, q) for p, q in zip(tuned.parameters(), pruned.parameters()))
