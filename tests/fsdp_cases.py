"""LoRA steps on a pruned GraphModule sharded by torch's FSDP2 (`fully_shard`) over a gloo group on CPU, run by
tests/test_distributed_recovery.py under torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/fsdp_cases.py PRUNED_DIR DATA OUT_DIR

Each projection is its own FSDP unit and the GraphModule (embedding, norms, adapters) the root one; each rank
trains on its share of the examples and writes to OUT_DIR/rank<r>.pt its step losses (averaged over the ranks),
the adapters gathered whole, the fraction of the projections' weights it holds, and the logits of the sharded
model and of the unsharded copy given the trained adapters and merged (`fxprune.recovery.sharding`).
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import fxprune
from fxprune.recovery import collate, linear_targets, merge
from fxprune.recovery.sharding import load_trained, unsharded_copy
from fxprune.util.distributed import init_from_env, local_share, rank_and_world
from fxprune.util.lm import lm_loss, logits_of

STEPS, BATCH = 6, 4


def main(pruned: Path, data: Path, out: Path) -> None:
    torch.set_num_threads(1)
    assert init_from_env(), "run under torchrun with more than one process"
    rank, world = rank_and_world()
    torch.manual_seed(0)  # the same adapters' initialisation on every rank
    gm = fxprune.load(pruned)
    plain = unsharded_copy(gm)

    def lora(graph):
        return get_peft_model(graph, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                target_modules=linear_targets(graph)))

    model = lora(gm)
    mesh = init_device_mesh("cpu", (world,))
    projections = [m.base_layer for m in model.modules() if hasattr(m, "base_layer")]
    for layer in projections:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    held = sum(p.to_local().numel() for layer in projections for p in layer.parameters())
    whole = sum(p.numel() for layer in projections for p in layer.parameters())

    examples = local_share(json.loads(data.read_text()))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(STEPS):
        chunk = [examples[(step * BATCH + i) % len(examples)] for i in range(BATCH)]
        batch = collate([(torch.tensor(e["input_ids"]), torch.tensor(e["labels"])) for e in chunk])
        loss = lm_loss(logits_of(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])),
                       batch["labels"])
        loss.backward()  # FSDP2 reduce-scatters the gradients: each rank steps its shard
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
    adapters = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # what tune() does after FSDP training: the trained weights into the unsharded copy, then peft's merge
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        sharded = logits_of(model(input_ids=ids)).clone()
        merged = logits_of(merge(load_trained(lora(plain), model))(ids))
    torch.save({"losses": losses, "adapters": adapters, "held": held / whole, "sharded": sharded, "merged": merged},
               out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
