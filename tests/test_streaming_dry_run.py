"""`fxprune.estimate_checkpoint` / `fxprune prune DIR --dry-run`: a streamed prune's cost from the config and a probe
of the first decoder layer, before (and without) the run: nothing written, only the probed layers' weights read."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import fxprune
from fxprune.streaming import CheckpointWeights
from fxprune.streaming.estimate import duration, size
from models import llama

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(1, 128, (6, 10), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = llama("sdpa")
    folder = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(folder, max_shard_size="20KB")
    return model, folder


def counting(monkeypatch) -> list:
    reads = []
    original = CheckpointWeights._read
    monkeypatch.setattr(CheckpointWeights, "_read", lambda self, name: reads.append(name) or original(self, name))
    return reads


def test_estimate_counts_the_plan_and_reads_only_the_probed_layers(checkpoint, monkeypatch, tmp_path):
    model, folder = checkpoint
    reads = counting(monkeypatch)
    est = fxprune.estimate_checkpoint(folder, 0.3, calibration=IDS, allocation="uniform", max_memory="200KB")
    assert {n.split(".layers.")[1].split(".")[0] for n in reads if ".layers." in n} == {"0"}
    assert est.parameters == sum(p.numel() for p in model.parameters())
    reads.clear()
    plan = fxprune.prune_checkpoint(folder, 0.3, tmp_path / "out", calibration=IDS, allocation="uniform")
    assert est.parameters_after == plan.params_after  # a uniform plan's count does not depend on the scores
    written = sum(t.numel() * t.element_size() for f in (tmp_path / "out").glob("*.safetensors")
                  for t in load_file(f).values())
    assert est.output_bytes == written
    hidden = IDS.numel() * model.config.hidden_size * 4  # float32 hidden states of every row
    assert est.probe.handed_on >= hidden and len(est.probe.seconds) == 2 and est.layers == 2
    assert est.sweeps == ("score", "write") and est.seconds > 0 and est.peak_bytes >= est.probe.before


def test_a_small_budget_spills_and_a_budget_below_one_layer_is_refused_before_any_read(checkpoint, monkeypatch):
    _, folder = checkpoint
    reads = counting(monkeypatch)
    with pytest.raises(ValueError, match=r"too small: segment \d \(.*\) needs"):
        fxprune.estimate_checkpoint(folder, 0.2, calibration=IDS, max_memory="1KB")
    assert reads == []
    budget = fxprune.estimate_checkpoint(folder, 0.2, calibration=IDS).largest_bytes + 5000
    est = fxprune.estimate_checkpoint(folder, 0.2, calibration=IDS, max_memory=budget, output=False)
    assert est.spill_bytes == est.probe.handed_on - 5000 > 0
    assert est.sweeps == ("score",)


def test_only_the_probed_layers_need_to_exist(checkpoint, tmp_path):
    """The dry run of a model larger than the disk: a config and its first layers' tensors are enough."""
    model, folder = checkpoint
    state = {k: v for k, v in model.state_dict().items() if ".layers.0." in k or "embed" in k}
    save_file(state, tmp_path / "model.safetensors")
    model.config.save_pretrained(tmp_path)
    est = fxprune.estimate_checkpoint(tmp_path, 0.2, calibration=IDS)
    assert est.parameters == sum(p.numel() for p in model.parameters()) and est.probe.layer_seconds > 0


def test_cli_dry_run_prints_the_cost_and_writes_nothing(tmp_path, capsys):
    from fxprune.cli import main
    from tiny_tokenizer import tiny_tokenizer
    tok = tiny_tokenizer()
    llama("sdpa", vocab_size=len(tok)).save_pretrained(tmp_path / "ckpt", max_shard_size="50KB")
    tok.save_pretrained(tmp_path / "ckpt")
    sample = tmp_path / "data" / "c4" / "c4_sample.json"
    sample.parent.mkdir(parents=True)
    sample.write_text(json.dumps([{"text": f"row {k}: the cat sat on a mat. " * 6} for k in range(6)]))
    assert main(["prune", str(tmp_path / "ckpt"), "--dry-run", "--max-memory", "200KB", "--output",
                 str(tmp_path / "out"), "--data-dir", str(tmp_path / "data"), "--calib-samples", "4",
                 "--calib-len", "16", "--json", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dry run"].endswith("nothing written") and "about" in report["time"]
    assert {"peak memory", "output on disk", "activations per boundary", "score sweep", "write sweep"} <= set(report)
    assert not (tmp_path / "out").exists()
    assert main(["prune", str(tmp_path / "nowhere"), "--dry-run"]) == 2
    assert "--dry-run estimates a local checkpoint directory" in capsys.readouterr().err


def test_sizes_and_durations_read_as_a_person_writes_them():
    assert size(None) == "unknown" and size(999) == "999 B" and size(1_500_000) == "1.50 MB"
    assert size(13.5e9) == "13.50 GB" and duration(59.4) == "59.4 s" and duration(600) == "10.0 min"
    assert duration(3 * 3600) == "3.0 h"


def test_the_refit_sweep_counts_its_solves(checkpoint):
    from fxprune.reconstruction.settings import Refit
    from fxprune.streaming.estimate import refit_work
    _, folder = checkpoint
    est = fxprune.estimate_checkpoint(folder, 0.3, calibration=IDS, reconstruct="lstsq")
    plain = fxprune.estimate_checkpoint(folder, 0.3, calibration=IDS)
    assert est.sweeps[-1] == "refit" and est.refit_work > 0 and plain.refit_work == 0
    assert est.sweep_seconds("refit") > est.probe.layer_seconds * 2 * (est.layers + 2)
    kept = {"w": {1: list(range(10))}, "frozen": {0: [0]}}  # only a weight whose inputs are pruned is refitted
    shapes = {"w": (4, 16), "frozen": (4, 16)}
    assert refit_work(kept, shapes, Refit(mode="lstsq", ridge=0.1), 5) == 5 * 100 + 1000 / 3 + 4 * 100
    assert refit_work(kept, shapes, Refit(mode="bias", ridge=0.1), 5) == 5 * 100
    assert refit_work(kept, shapes, Refit(mode="lstsq"), 5) > refit_work(kept, shapes, Refit(mode="bias"), 5)
