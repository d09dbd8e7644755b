"""What tests/test_distributed.py compares: statistics, gradients and plans of a tiny llama and its checkpoint,
computed by one process, or (run as a script under torchrun) by each rank of a gloo group.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_cases.py WORK_DIR

WORK_DIR holds `checkpoint/` (the tiny llama's safetensors) and `calibration.pt`; each rank writes its results
to `rank<r>.pt` and the pruned directories under `out/` (written by rank 0 alone), and records which of its
calls wrote a directory.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ (models.py) when run as a script

import fxprune  # noqa: E402
import fxprune.serialization as serialization  # noqa: E402
from fxprune.scoring.activations import gram_members, input_statistics  # noqa: E402
from fxprune.scoring.gradients import compute_gradients  # noqa: E402
from fxprune.streaming import (CheckpointWeights, StreamedExecutor, empty_model, streamed_gradients,  # noqa: E402
                               streamed_input_statistics)
from fxprune.util.distributed import init_from_env, rank_and_world  # noqa: E402
from models import llama  # noqa: E402

IN_MEMORY = ("l2", "wanda", "flap", "element1")
STREAMED = ("l2", "wanda", "flap", "element1")
RATIO = 0.3
# 8 rows of 12 tokens, two right-padded ones and one left-padded: 3 batches of 3 rows (ranks get 2 and 1)
ROWS, BATCH = 8, 3


def calibration() -> dict:
    ids = torch.randint(1, 128, (ROWS, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[4, 6:] = 0
    mask[6, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def stats_dict(stats) -> dict:
    return {name: {"tokens": s.tokens, "mean": s.mean, "var": s.var, "sq_norm": s.sq_norm, "gram": s.gram,
                   "weight_scale": s.weight_scale} for name, s in stats.items()}


def grads_dict(g) -> dict:
    return {"grad": g.grad, "sq_grad": g.sq_grad, "n_samples": g.n_samples, "loss": g.loss}


def kept(plan) -> dict:
    return {"units": plan.units, "removed": plan.removed_fraction}


def run_cases(work: Path, out: Path) -> dict:
    """Every case's result (tensors on the CPU, plans as their kept units) for `work`'s checkpoint and
    calibration; the pruned directories go under `out`."""
    calib = torch.load(work / "calibration.pt")
    model = llama()
    dg = fxprune.analyze(model)
    gram = gram_members(dg.groups)
    results = {
        "stats": stats_dict(input_statistics(dg, calib, batch_size=BATCH, gram=gram)),
        "grads": grads_dict(compute_gradients(dg, calib, batch_size=BATCH)),
        "fisher": grads_dict(compute_gradients(dg, calib, second_order=True)),
        "plans": {m: kept(fxprune.plan(model, RATIO, importance=m, calibration=calib, dg=dg, batch_size=BATCH))
                  for m in IN_MEMORY},
    }
    fxprune.save(fxprune.compile(model, RATIO, importance="flap", calibration=calib, dg=dg), out / "in_memory")
    skeleton = empty_model(work / "checkpoint")
    executor = StreamedExecutor(fxprune.analyze(skeleton), CheckpointWeights(work / "checkpoint", skeleton))
    results["streamed_stats"] = stats_dict(streamed_input_statistics(executor, calib, batch_size=BATCH,
                                                                     gram=gram_members(executor.dg.groups)))
    results["streamed_grads"] = grads_dict(streamed_gradients(executor, calib, batch_size=BATCH))
    results["streamed_plans"] = {m: kept(fxprune.prune_checkpoint(work / "checkpoint", RATIO, out / f"streamed_{m}",
                                                                  importance=m, calibration=calib))
                                 for m in STREAMED}
    return results


def main(work: Path) -> None:
    torch.set_num_threads(1)
    assert init_from_env(), "run under torchrun with more than one process"
    rank, _ = rank_and_world()
    writes = []
    write = serialization._write_directory

    def recorded(directory, *args):
        writes.append(Path(directory).name)
        return write(directory, *args)

    serialization._write_directory = recorded
    results = run_cases(work, work / "out")
    results["writes"] = writes
    torch.save(results, work / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
