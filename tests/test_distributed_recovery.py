"""Recovery of a pruned model across two CPU processes: `fxprune tune` launched by `accelerate launch` with the
repository's FSDP config (configs/accelerate_fsdp.yaml), and the pruned GraphModule sharded by torch's FSDP2.

accelerate (1.16) sets FSDP up on accelerators only: on CPU it runs the config's processes as DDP over gloo
(every rank holds the whole model) and fxprune warns. So the first test checks what accelerate runs here (the
config launches, trains, and keeps the ranks' adapters equal), the second that FSDP2 itself shards the pruned
graph with its LoRA adapters on CPU: each rank holds half of each projection, the adapters agree, and gathered
into an unsharded copy and merged (`fxprune.recovery.sharding`, what tune() does after FSDP training) they
give the sharded model's logits."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxprune
from models import llama
from test_lora import synthetic_instructions

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent
CPU_ENV = {"CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A pruned tiny llama saved with fxprune.save, and tokenised instruction data, in one directory."""
    work = tmp_path_factory.mktemp("recovery")
    fxprune.save(fxprune.compile(llama(), ratio=0.2, importance="l2", reconstruct="none"), work / "pruned")
    (work / "data.json").write_text(json.dumps(synthetic_instructions(32)))
    return work


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp_config_launches_fxprune_tune_on_two_cpu_processes(pruned):
    work = pruned
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate_fsdp.yaml"), "--main_process_port", str(free_port()),
           "-m", "fxprune.cli", "tune", str(work / "pruned"), "--data", str(work / "data.json"), "--max-steps", "8",
           "--lr", "3e-3", "--batch-size", "4", "--output-dir", str(work / "ckpt"), "--result",
           str(work / "result.json"), "--merged", str(work / "merged")]
    proc = subprocess.run(cmd, env={**os.environ, **CPU_ENV}, cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "an FSDP config was given but accelerate runs DistributedType.MULTI_CPU" in proc.stderr
    result = json.loads((work / "result.json").read_text())
    assert result["num_processes"] == 2 and result["backend"] == "gloo"
    assert result["distributed_type"].endswith("MULTI_CPU")
    assert result["replicas_in_sync"]  # the adapters of both ranks are equal after training
    losses = [h["loss"] for h in result["history"]]
    assert len(losses) == 8 and sum(losses[-3:]) < sum(losses[:3])
    assert (work / "ckpt" / "checkpoint-8" / "model.safetensors").is_file()  # the adapters, saved
    merged = fxprune.load(work / "merged")
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = fxprune.load(work / "pruned")(ids).logits
        after = merged(ids).logits
    assert not torch.allclose(before, after, atol=1e-4)


def test_fsdp2_shards_the_pruned_graph_and_its_adapters_on_cpu(pruned):
    work = pruned
    out = work / "fsdp2"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "fsdp_cases.py"), str(work / "pruned"), str(work / "data.json"), str(out)]
    proc = subprocess.run(cmd, env={**os.environ, **CPU_ENV}, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    for rank in ranks:
        assert rank["held"] == pytest.approx(0.5, abs=0.05)  # each rank holds half of every projection
        assert rank["losses"][-1] < rank["losses"][0]
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["adapters"].keys() == ranks[1]["adapters"].keys() and ranks[0]["adapters"]
    for name, value in ranks[0]["adapters"].items():
        assert torch.equal(value, ranks[1]["adapters"][name]), name
    assert any(not torch.all(v == 0) for n, v in ranks[0]["adapters"].items() if "lora_B" in n)  # they trained
    for rank in ranks:  # the trained shards, gathered into the unsharded copy and merged, give the same model
        torch.testing.assert_close(rank["merged"], rank["sharded"], rtol=1e-4, atol=1e-4)
