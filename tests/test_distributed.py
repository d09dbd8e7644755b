"""Two gloo processes started by torchrun equal one process (fxprune.util.distributed): each rank runs its share
of the calibration batches, the sums are all-reduced, so the statistics agree to 1e-6 and the plans keep the
same units, in memory (l2, wanda, flap, element1) and streamed from a checkpoint (l2, wanda, flap); only rank 0
writes the pruned directories, which hold what one process writes."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distributed_cases as cases
from fxprune.serialization import read_weights
from fxprune.util.distributed import all_reduce_sums, local_share, on_rank_zero, rank_and_world
from models import llama

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 240


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one process's results, [rank 0's, rank 1's], the work directory): the two ranks run while this process
    computes its own."""
    work = tmp_path_factory.mktemp("distributed")
    llama().save_pretrained(work / "checkpoint", safe_serialization=True, max_shard_size="20KB")
    torch.save(cases.calibration(), work / "calibration.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    launch = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               "2", str(ROOT / "tests" / "distributed_cases.py"), str(work)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        single = cases.run_cases(work, work / "single")
        log, _ = launch.communicate(timeout=TIMEOUT)
    finally:
        launch.kill()
    assert launch.returncode == 0, log[-4000:]
    return single, [torch.load(work / f"rank{r}.pt", weights_only=False) for r in range(2)], work


def assert_stats_equal(one, other):
    assert one.keys() == other.keys()
    for name in one:
        a, b = one[name], other[name]
        assert a["tokens"] == b["tokens"], name
        for key in ("mean", "var", "sq_norm", "gram"):
            if a[key] is None:
                assert b[key] is None, (name, key)
            else:
                torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-6, msg=f"{name} {key}")
        assert b["weight_scale"] == pytest.approx(a["weight_scale"], rel=1e-6, abs=1e-6)


def assert_grads_equal(one, other):
    assert one["n_samples"] == other["n_samples"]
    assert other["loss"] == pytest.approx(one["loss"], rel=1e-6)
    for key in ("grad", "sq_grad"):
        if one[key] is None:
            assert other[key] is None
            continue
        assert one[key].keys() == other[key].keys()
        for name in one[key]:
            torch.testing.assert_close(other[key][name], one[key][name], rtol=1e-5, atol=1e-6, msg=f"{key} {name}")


@pytest.mark.parametrize("key", ["stats", "streamed_stats"])
def test_two_ranks_give_the_statistics_of_one_process(runs, key):
    single, ranks, _ = runs
    assert any(s["gram"] is not None for s in single[key].values())  # the refit-aware Gram is compared too
    for result in ranks:
        assert_stats_equal(single[key], result[key])


@pytest.mark.parametrize("key", ["grads", "fisher", "streamed_grads"])
def test_two_ranks_give_the_gradients_of_one_process(runs, key):
    single, ranks, _ = runs
    assert single[key]["n_samples"] == cases.ROWS
    for result in ranks:
        assert_grads_equal(single[key], result[key])
    # the all-reduce hands every rank the same values
    for name, g in ranks[0][key]["grad"].items():
        assert torch.equal(g, ranks[1][key]["grad"][name])


@pytest.mark.parametrize("key,methods", [("plans", cases.IN_MEMORY), ("streamed_plans", cases.STREAMED)])
def test_two_ranks_keep_the_units_one_process_keeps(runs, key, methods):
    single, ranks, _ = runs
    assert set(single[key]) == set(methods)
    for method in methods:
        assert single[key][method]["removed"] > 0.2
        for result in ranks:
            assert result[key][method] == single[key][method], method


def test_only_rank_zero_writes_and_writes_what_one_process_writes(runs):
    _, ranks, work = runs
    names = ["in_memory"] + [f"streamed_{m}" for m in cases.STREAMED]
    assert ranks[0]["writes"] == names
    assert ranks[1]["writes"] == []
    for name in names:
        mine, theirs = read_weights(work / "single" / name), read_weights(work / "out" / name)
        assert mine.keys() == theirs.keys()
        for key in mine:
            torch.testing.assert_close(theirs[key], mine[key], rtol=1e-6, atol=1e-6, msg=f"{name} {key}")


def test_without_a_process_group_the_helpers_are_the_identity(tmp_path):
    assert rank_and_world() == (0, 1)
    assert local_share(range(5)) == [0, 1, 2, 3, 4]
    sums = {("a", ""): torch.ones(3), ("n", ""): 4, ("loss", ""): 2.5}
    reduced = all_reduce_sums(sums)
    assert reduced.keys() == sums.keys() and all(reduced[k] is sums[k] for k in sums)
    assert on_rank_zero(lambda: (tmp_path / "x").write_text("1")) == 1
