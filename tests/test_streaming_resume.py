"""A streamed prune killed at a layer boundary and started again with the same arguments resumes after the last
recorded layer (or after the plan while writing) and writes byte-identical output."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxprune
from fxprune.streaming import CheckpointWeights, StreamedExecutor, StreamError, empty_model
from fxprune.streaming.resume import Snapshots, WorkFolder
from models import llama

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(1, 128, (6, 10), generator=torch.Generator().manual_seed(3))
KILLED = """
import os, sys, torch
import fxprune
ids = torch.randint(1, 128, (6, 10), generator=torch.Generator().manual_seed(3))
def die(stage, segment, count):
    if stage == sys.argv[3] and segment.index == int(sys.argv[4]):
        os._exit(9)  # no clean-up runs, as when the process is killed
fxprune.prune_checkpoint(sys.argv[1], 0.3, sys.argv[2], importance="wanda", calibration=ids, max_memory="130KB",
                         progress=die, snapshot_every=0)
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    llama("sdpa").save_pretrained(folder, max_shard_size="20KB")
    return folder


def prune(checkpoint, out, progress=None):
    return fxprune.prune_checkpoint(checkpoint, 0.3, out, importance="wanda", calibration=IDS, max_memory="130KB",
                                    progress=progress, snapshot_every=0)


def files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    prune(checkpoint, out)
    return files(out)


def test_killed_while_scoring_resumes_after_the_last_layer_and_writes_the_same_bytes(checkpoint, reference, tmp_path):
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILLED, str(checkpoint), str(out), "score", "1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert not out.exists() and (tmp_path / ".out.fxprune-resume" / "score.pt").is_file()
    ran = []
    original = fxprune.streaming.executor.StreamedExecutor._run_segment

    def counting(self, interp, segment, *args):
        ran.append(segment.index)
        return original(self, interp, segment, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fxprune.streaming.executor.StreamedExecutor, "_run_segment", counting)
        prune(checkpoint, out)
    assert min(ran) == 2  # segments 0 and 1 were not run again
    assert files(out) == reference and not (tmp_path / ".out.fxprune-resume").exists()


def test_stopped_while_writing_resumes_after_the_plan(checkpoint, reference, tmp_path):
    out = tmp_path / "out"

    def stop(stage, segment, count):
        if stage == "write" and segment.index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prune(checkpoint, out, stop)
    assert (tmp_path / ".out.fxprune-resume" / "plan.json").is_file()
    ran = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fxprune.streaming.executor.StreamedExecutor, "run", lambda *a, **k: ran.append(a))
        prune(checkpoint, out)
    assert ran == [] and files(out) == reference  # no segment was run again: the plan was read back


def test_another_command_does_not_resume_from_a_stale_folder(checkpoint, reference, tmp_path):
    out = tmp_path / "out"
    WorkFolder(out, {"another": "run"}).plan_file.write_text("not a plan")
    prune(checkpoint, out)
    assert files(out) == reference


def test_snapshots_are_written_atomically_and_refuse_another_batch_count(checkpoint, tmp_path):
    snaps = Snapshots(tmp_path / "s.pt", every=0)
    assert snaps.load() is None and snaps.due()
    snaps.save(4, [{"x": torch.ones(2)}], {"n": 1})
    segment, batches, state = snaps.load()
    assert segment == 4 and torch.equal(batches[0]["x"], torch.ones(2)) and state == {"n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["s.pt"]
    skeleton = empty_model(checkpoint)
    executor = StreamedExecutor(fxprune.analyze(skeleton), CheckpointWeights(checkpoint, skeleton))
    rows = [(IDS[:3], None), (IDS[3:], None)]  # two batches; the snapshot holds one
    with pytest.raises(StreamError, match=r"holds 1 batches, this run has 2"):
        executor.run(rows, logits=False, segments=2, snapshots=snaps, state={})
