"""LoRA post-training of pruned GraphModules (fxprune.recovery): targets, training, merge, resume, DDP."""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fxprune
from fxprune.recovery.sharding import unsharded_copy as clone  # a copy to train: tune() injects LoRA in place
from fxprune.recovery import LoraSettings, checkpoints, linear_targets, merge, output_heads, tune

REPO = Path(__file__).resolve().parents[1]
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def synthetic_instructions(n=48, seed=0):
    """Tiny instruction set, one token per ASCII character (vocab 128); loss on the response only."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 7)))
        verb, answer = rng.choice([("Repeat", word + " " + word), ("Reverse", word[::-1]), ("Upper", word.upper())])
        prompt = f"### Instruction:\n{verb} {word}\n### Response:\n"
        ids = [ord(c) for c in prompt + answer + "\n"]
        out.append({"input_ids": ids, "labels": [-100] * len(prompt) + ids[len(prompt):]})
    return out


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def pruned(base):
    return fxprune.compile(base, ratio=0.2)


@pytest.fixture(scope="module")
def examples():
    return synthetic_instructions()


@pytest.fixture(scope="module")
def trained(pruned, examples):
    """30 LoRA steps on a copy of the pruned model."""
    settings = LoraSettings(max_steps=30, lr=2e-3, batch_size=4, seed=0)
    return tune(clone(pruned), examples, settings)


def batch(examples, n=4):
    from fxprune.recovery import collate
    return collate([(torch.tensor(e["input_ids"]), torch.tensor(e["labels"])) for e in examples[:n]])


def lora_state(peft_model):
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}


def test_pruned_model_is_about_20_percent_smaller(base, pruned):
    removed = 1 - sum(p.numel() for p in pruned.parameters()) / sum(p.numel() for p in base.parameters())
    assert 0.1 < removed < 0.3


def test_linear_targets_are_the_projections_not_the_head(pruned):
    targets = linear_targets(pruned)
    assert targets == [f"model.layers.{i}.{p}" for i in range(2) for p in PROJECTIONS]
    assert output_heads(pruned) == ["lm_head"]
    assert "lm_head" not in targets and not any("lm_head" in t or "embed" in t for t in targets)
    assert all(isinstance(pruned.get_submodule(t), torch.nn.Linear) for t in targets)


def test_linear_targets_come_from_the_graph_not_from_names():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 8)
            self.first = torch.nn.Linear(8, 8)
            self.unused = torch.nn.Linear(8, 8)
            self.second = torch.nn.Linear(8, 8)
            self.readout = torch.nn.Linear(8, 10)

        def forward(self, ids):
            h = self.emb(ids)
            h = self.second(torch.relu(self.first(h))) + h
            return torch.tanh(self.readout(h)) * 3.0

    gm = torch.fx.symbolic_trace(Net())
    assert output_heads(gm) == ["readout"]
    assert linear_targets(gm) == ["first", "second"]  # "unused" is never called; the head is left out


@pytest.mark.parametrize("family", ["glm", "bloom"])
def test_linear_targets_other_families(family):
    from tests.models import FAMILIES
    model = FAMILIES[family]("eager" if family == "bloom" else "sdpa")
    gm = fxprune.compile(model, ratio=0.1)
    targets = linear_targets(gm)
    linears = [n for n, m in gm.named_modules() if isinstance(m, torch.nn.Linear)]
    assert output_heads(gm) == ["lm_head"]
    assert set(targets) == set(linears) - {"lm_head"}
    assert len(targets) == {"glm": 6, "bloom": 4}[family] * 2


def test_bad_target_module_raises_naming_it(pruned, examples):
    gm = clone(pruned)
    with pytest.raises(ValueError) as err:
        tune(gm, examples, LoraSettings(max_steps=1, target_modules=["q_proj", "qkv_proj_typo"]))
    message = str(err.value)
    assert "qkv_proj_typo" in message and "'q_proj'" not in message.split("its linear modules")[0]
    assert "model.layers.0.self_attn.q_proj" in message  # the available names are listed
    with pytest.raises(ValueError, match="no_such_layer"):
        tune(gm, examples, LoraSettings(max_steps=1, target_modules=r".*no_such_layer"))
    assert not any("lora" in n for n, _ in gm.named_modules())  # refused before peft touched the model


def test_loss_decreases(trained):
    _, history = trained
    losses = [h["loss"] for h in history]
    assert [h["step"] for h in history] == list(range(1, 31))
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.2, (first, last)


def test_only_lora_weights_train(trained, pruned):
    peft_model, _ = trained
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(linear_targets(pruned))
    assert not any("lm_head" in n for n in trainable)


def test_merge_matches_unmerged_and_leaves_a_plain_graph_module(pruned, examples):
    from peft.tuners.tuners_utils import BaseTunerLayer
    peft_model, _ = tune(clone(pruned), examples, LoraSettings(max_steps=5, lr=5e-3, batch_size=4), progress=True)
    b = batch(examples)
    with torch.no_grad():
        unmerged = peft_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        before = pruned(b["input_ids"], attention_mask=b["attention_mask"]).logits
    merged = merge(peft_model)
    assert isinstance(merged, torch.fx.GraphModule)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert not any("lora" in n for n, _ in merged.named_modules()) and not hasattr(merged, "peft_config")
    assert [n for n, _ in merged.named_parameters()] == [n for n, _ in pruned.named_parameters()]
    assert all(p.requires_grad for p in merged.parameters())
    with torch.no_grad():
        out = merged(b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(out, unmerged, atol=1e-5, rtol=0)
    assert not torch.allclose(out, before, atol=1e-4)  # the adapters did change the model


def test_resume_matches_uninterrupted_run(pruned, examples, tmp_path):
    # 48 examples / micro-batch 4 = 12 batches, grad_accum 2 -> 6 steps an epoch: the run crosses an
    # epoch and is cut mid-epoch; dropout makes the RNG state matter.
    common = dict(lr=2e-3, batch_size=4, grad_accum=2, dropout=0.1, seed=3)
    full_model, full_history = tune(clone(pruned), examples, LoraSettings(max_steps=9, **common))

    out = tmp_path / "ckpt"
    _, cut_history = tune(clone(pruned), examples,
                          LoraSettings(max_steps=4, checkpoint_every=2, output_dir=str(out), **common))
    assert [c.name for c in checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert len(cut_history) == 4
    # the checkpoint holds the adapters, not the frozen base weights
    saved = (out / "checkpoint-4" / "model.safetensors").stat().st_size
    assert saved < 4 * sum(p.numel() for p in full_model.parameters() if p.requires_grad) + 16_384

    resumed_model, resumed_history = tune(clone(pruned), examples,
                                          LoraSettings(max_steps=9, checkpoint_every=2, output_dir=str(out), **common),
                                          resume=True)
    assert [h["step"] for h in resumed_history] == list(range(1, 10))
    assert [h["epoch"] for h in resumed_history] == [h["epoch"] for h in full_history]
    assert [h["loss"] for h in resumed_history] == pytest.approx([h["loss"] for h in full_history], abs=1e-6)
    full, resumed = lora_state(full_model), lora_state(resumed_model)
    assert full.keys() == resumed.keys()
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], atol=1e-6, rtol=0)
    assert checkpoints(out)[-1].name == "checkpoint-9"

    gm = clone(pruned)
    with pytest.raises(ValueError, match="other settings"):  # a checkpoint is only resumed with its settings
        tune(gm, examples, LoraSettings(max_steps=9, output_dir=str(out), **{**common, "lr": 1e-3}), resume=True)
    assert not any("lora" in n for n, _ in gm.named_modules())


def test_script_reads_alpaca_or_tokenised_data(tmp_path, examples):
    from tests.tiny_tokenizer import tiny_tokenizer
    from fxprune.recovery.tune_script import load_examples
    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    records = [{"instruction": "Repeat", "input": "abc", "output": "abc abc"},
               {"instruction": "Say hi", "output": "hi"}]
    (tmp_path / "alpaca.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match="--tokenizer"):
        load_examples(tmp_path / "alpaca.json")
    tokenised = load_examples(tmp_path / "alpaca.json", str(tmp_path / "tok"), cutoff_len=256)
    assert len(tokenised) == 2
    for ex in tokenised:
        assert len(ex["input_ids"]) == len(ex["labels"]) and ex["input_ids"][-1] == tok.eos_token_id
        assert ex["labels"][0] == -100 and ex["labels"][-1] == tok.eos_token_id  # loss on the response only
    (tmp_path / "tok.json").write_text(json.dumps(examples[:3]))
    assert load_examples(tmp_path / "tok.json") == examples[:3]


def test_script_packs_text_records_into_full_windows(tmp_path):
    from tests.tiny_tokenizer import tiny_tokenizer
    from fxprune.recovery.tune_script import load_examples
    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    texts = ["the cat sat on the mat " * 7, "a dog ran " * 11, "short"]
    (tmp_path / "c4.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    with pytest.raises(ValueError, match="text records; pass --tokenizer"):
        load_examples(tmp_path / "c4.jsonl")
    packed = load_examples(tmp_path / "c4.jsonl", str(tmp_path / "tok"), cutoff_len=16)
    stream = [i for t in texts for i in tok(t)["input_ids"] + [tok.eos_token_id]]
    assert len(packed) == len(stream) // 16 >= 2
    for k, ex in enumerate(packed):  # consecutive windows of the EOS-joined documents, loss on every token
        assert ex["input_ids"] == stream[16 * k:16 * (k + 1)] == ex["labels"]
    assert any(tok.eos_token_id in ex["input_ids"] for ex in packed)  # documents end in EOS

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_cpu_processes_ddp(pruned, examples, tmp_path):
    """`accelerate launch` with 2 CPU processes: DDP over gloo around the peft-wrapped GraphModule.

    `accelerate launch --cpu --num_processes 2` starts one process (on CPU accelerate launch only fans
    out through mpirun), so the processes are started by its torchrun-based launcher (--multi_gpu) with
    the GPUs hidden; fxprune.recovery.lora.tune then joins them into a gloo group.
    """
    fxprune.save(pruned, tmp_path / "pruned")
    (tmp_path / "data.json").write_text(json.dumps(examples[:32]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           "-m", "fxprune.recovery.tune_script", "--gm", str(tmp_path / "pruned"), "--data", str(tmp_path / "data.json"),
           "--max-steps", "6", "--lr", "3e-3", "--batch-size", "4", "--checkpoint-every", "3",
           "--output-dir", str(tmp_path / "ckpt"), "--result", str(tmp_path / "result.json"),
           "--merged", str(tmp_path / "merged")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["num_processes"] == 2
    assert result["backend"] == "gloo" and result["distributed_type"].endswith("MULTI_CPU")
    assert result["steps"] == 6 and len(result["history"]) == 6
    assert result["replicas_in_sync"]  # each rank saw other batches: only DDP's all-reduce keeps them equal
    assert result["targets"] == linear_targets(pruned)
    assert [c.name for c in checkpoints(tmp_path / "ckpt")] == ["checkpoint-3", "checkpoint-6"]
    assert {p.name for p in (tmp_path / "ckpt" / "checkpoint-6").glob("random_states_*.pkl")} == {
        "random_states_0.pkl", "random_states_1.pkl"}

    merged = fxprune.load(tmp_path / "merged")
    b = batch(examples)
    with torch.no_grad():
        after = merged(b["input_ids"], attention_mask=b["attention_mask"]).logits
        before = pruned(b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert not torch.allclose(after, before, atol=1e-4)
