"""LoRA post-training of a pruned GraphModule (LLM-Pruner's recovery stage), with peft and accelerate.

The emitted GraphModule calls its projections as real `nn.Linear` submodules (`call_module` nodes
whose code looks the module up by name at every call), so peft can swap them for LoRA layers in
place and the graph picks them up without being retraced. It is an ordinary `nn.Module`, so
`accelerate` wraps it in `DistributedDataParallel` like any model (`accelerate launch` with
several processes, gloo on CPU, nccl on GPU): see `fxprune/recovery/tune_script.py`.

    gm = fxprune.compile(model, ratio=0.2)
    peft_model, history = tune(gm, examples, LoraSettings(max_steps=200, output_dir="ckpt", checkpoint_every=50))
    pruned = merge(peft_model)        # plain GraphModule again, LoRA folded into the projections

`examples` are tokenised: dicts with `input_ids` and `labels` (-100 where no loss is taken), as
made by `fxprune.data.loaders.tokenize_alpaca`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path

import torch

from fxprune.recovery.checkpoints import (CHECKPOINT_PREFIX, STATE_FILE, checkpoints, run_fingerprint,
                                          register_lora_only_checkpointing)
from fxprune.recovery.distill import HeadInput, Teacher, check_teacher, recovery_loss
from fxprune.recovery.examples import Examples, collate
from fxprune.recovery.settings import LoraSettings, mixed_precision
from fxprune.recovery.sharding import load_trained, unsharded_copy
from fxprune.recovery.targets import resolve_targets
from fxprune.util.lm import lm_loss, logits_of

logger = logging.getLogger(__name__)


def _launched_on_cpu() -> bool:
    """True when several processes were launched (torchrun, `accelerate launch --multi_gpu`) on a machine
    without an accelerator: accelerate then needs cpu=True to join them into one gloo process group,
    where it would otherwise run each alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    available = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return not available


def _warn_unless_sharded(accelerator) -> None:
    """Warn when `accelerate launch` was given an FSDP config but accelerate did not set FSDP up: accelerate
    shards only on accelerators (GPUs, ...); on CPU it runs the processes as DDP, each holding the whole model."""
    from accelerate.utils import DistributedType
    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and accelerator.distributed_type != DistributedType.FSDP:
        logger.warning("an FSDP config was given but accelerate runs %s (it shards only on accelerators, not on "
                       "CPU): every process holds the whole model", accelerator.distributed_type)


def _trainable_model(gm, settings: LoraSettings, targets):
    """peft's LoRA model around `gm` (settings.trainable == "lora"), or `gm` itself with every parameter
    trainable ("full": the pruned weights are fine-tuned)."""
    if settings.trainable == "full":
        return gm.requires_grad_(True)
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, bias="none")
    return get_peft_model(gm, config)


def tune(gm: torch.fx.GraphModule, examples, settings: LoraSettings | None = None, resume: bool = False,
         progress: bool = False, teacher: torch.nn.Module | None = None):
    """LoRA-train (or, with settings.trainable="full", fine-tune) `gm` on tokenised `examples`;
    returns (model, history).

    `gm` is modified in place (peft injects its LoRA layers into it, as `get_peft_model` does).
    With a `teacher` (the dense model `gm` was pruned from) the loss distils its logits
    (fxprune.recovery.distill); the teacher is moved to the student's device and dtype and runs without
    gradients. history: one dict per optimizer step, {"step", "epoch", "loss", "lr"} (+ "ce", "kd"
    and "hidden" when distilling), averaged over the step's micro-batches and processes. The
    returned model (a PeftModel for LoRA, `gm` for "full") is unwrapped (no DDP) and in eval
    mode. With `resume=True` training continues from the newest complete checkpoint in
    `settings.output_dir` (parameters, optimizer, RNG states and data position), or starts afresh
    if there is none; the run then ends where an uninterrupted one would, with the same weights.
    Under `accelerate launch` every process calls tune() on its own copy of `gm` (DDP).

    Why one long function: the set-up, the loop and the checkpointing share accelerate's prepared
    objects (model, optimizer, loader, scheduler) and the resume position, and exact resumption
    depends on their order; split into pieces they would pass the same eight objects around.
    """
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import DistributedType, set_seed


    settings = settings or LoraSettings()
    if resume and settings.output_dir is None:
        raise ValueError("resume=True needs LoraSettings.output_dir")
    precision = mixed_precision(settings.dtype)
    if precision != "no":
        # Probe autocast's dtype where accelerate will put the model, before Accelerator() sets up its
        # process-wide state (which a refused run must not leave behind).
        from fxprune.util.devices import check_runnable
        on_cuda = torch.cuda.is_available() and not _launched_on_cpu()
        check_runnable(precision, f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if on_cuda else "cpu")
    targets = resolve_targets(gm, settings.target_modules) if settings.trainable == "lora" else []
    match_hidden = teacher is not None and settings.hidden_weight > 0
    if teacher is not None:
        check_teacher(gm, teacher, match_hidden)
    accelerator = Accelerator(cpu=_launched_on_cpu(), mixed_precision=precision,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                                        data_seed=settings.seed))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(f"{launched} processes were launched but accelerate set up {accelerator.num_processes}: "
                           f"each would train alone and overwrite the others' checkpoints. On CPU, launch with "
                           f"ACCELERATE_USE_CPU=1 (e.g. `accelerate launch --multi_gpu --num_processes N`, or torchrun)")
    _warn_unless_sharded(accelerator)
    dataset = Examples(examples, settings.cutoff_len)
    fingerprint = run_fingerprint(settings, targets, len(dataset), accelerator.num_processes, precision)
    fingerprint["teacher"] = teacher is not None
    found = checkpoints(settings.output_dir) if resume else []
    state = None
    if found:  # checked before peft touches gm, so a refused resume leaves it as it was
        state = json.loads((found[-1] / STATE_FILE).read_text())
        if state["fingerprint"] != fingerprint:
            diff = {k: (state["fingerprint"].get(k), v) for k, v in fingerprint.items() if state["fingerprint"].get(k) != v}
            raise ValueError(f"cannot resume from {found[-1]}: it was made with other settings "
                             f"(checkpoint vs now: {diff})")

    set_seed(settings.seed)
    # FSDP turns the parameters into shards: the trained weights go back into this copy (recovery/sharding.py)
    plain = unsharded_copy(gm) if accelerator.distributed_type == DistributedType.FSDP else None
    student_hidden = HeadInput(gm) if match_hidden else None
    peft_model = _trainable_model(gm, settings, targets)
    peft_model.train()
    loader = torch.utils.data.DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(settings.seed))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    model, optimizer, loader = accelerator.prepare(peft_model, optimizer, loader)
    logger.info("%s, %d trainable parameters%s; %s on %d process(es), %s",
                f"LoRA r={settings.r} on {len(targets)} modules" if targets else "all weights",
                sum(p.numel() for p in params), ", distilling the teacher" if teacher is not None else "",
                type(model).__name__, accelerator.num_processes, accelerator.distributed_type)
    runner = Teacher(teacher, gm, accelerator.device, match_hidden) if teacher is not None else None

    def micro_batch_loss(batch):
        logits = logits_of(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
        ce = lm_loss(logits, batch["labels"])
        if runner is None:
            return ce, {}
        with accelerator.autocast():
            teacher_out = runner(batch["input_ids"], batch["attention_mask"])
        return recovery_loss(logits, batch, ce, teacher_out, settings.kd_alpha, settings.kd_temperature,
                             settings.hidden_weight, student_hidden.pop() if student_hidden else None)
    register_lora_only_checkpointing(accelerator)

    batches_per_epoch = len(loader)
    if batches_per_epoch == 0:
        raise ValueError(f"the data loader yields no batch ({len(dataset)} examples, {accelerator.num_processes} processes)")
    steps_per_epoch = math.ceil(batches_per_epoch / settings.grad_accum)
    total_steps = settings.max_steps or settings.epochs * steps_per_epoch

    step, epoch, batch_in_epoch, history = 0, 0, 0, []
    if state is not None:
        accelerator.load_state(str(found[-1]))
        step, epoch, batch_in_epoch, history = state["step"], state["epoch"], state["batch_in_epoch"], state["history"]
        logger.info("resumed from %s at step %d", found[-1], step)

    def save_checkpoint():
        directory = Path(settings.output_dir) / f"{CHECKPOINT_PREFIX}{step}"
        accelerator.wait_for_everyone()
        accelerator.save_state(str(directory))
        accelerator.wait_for_everyone()  # every process has written its RNG state
        if accelerator.is_main_process:
            record = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "history": history,
                     "fingerprint": fingerprint, "settings": settings.to_dict()}
            tmp = directory / (STATE_FILE + ".tmp")
            tmp.write_text(json.dumps(record, indent=1))
            tmp.replace(directory / STATE_FILE)  # written last: marks the checkpoint complete
        accelerator.wait_for_everyone()

    bar = None
    if progress and accelerator.is_main_process:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, initial=step, desc="lora")
    last_saved = step if found else None
    model.train()
    while step < total_steps:
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, batch_in_epoch) if batch_in_epoch else loader
        losses, part_sums = [], []
        for batch in batches:
            group_start = batch_in_epoch - batch_in_epoch % settings.grad_accum
            group = min(settings.grad_accum, batches_per_epoch - group_start)
            batch_in_epoch += 1
            boundary = batch_in_epoch - group_start == group
            sync = contextlib.nullcontext() if boundary else accelerator.no_sync(model)
            with sync:
                loss, parts = micro_batch_loss(batch)
                accelerator.backward(loss / group)
            losses.append(loss.detach())
            part_sums.append(parts)
            if not boundary:
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            mean = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
            record = {"step": step, "epoch": epoch, "loss": mean, "lr": optimizer.param_groups[0]["lr"]}
            for key in part_sums[0]:
                record[key] = accelerator.reduce(torch.stack([p[key] for p in part_sums]).mean(), reduction="mean").item()
            losses, part_sums = [], []
            history.append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{mean:.4f}")
            if accelerator.is_main_process and (step % settings.log_every == 0 or step == total_steps):
                logger.info("step %d/%d epoch %d loss %.4f", step, total_steps, epoch, mean)
            if batch_in_epoch == batches_per_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
            if settings.checkpoint_every and step % settings.checkpoint_every == 0:
                save_checkpoint()
                last_saved = step
            if step >= total_steps:
                break
        else:
            epoch, batch_in_epoch = (epoch + 1, 0) if batch_in_epoch else (epoch, batch_in_epoch)
    if settings.output_dir is not None and last_saved != step:
        save_checkpoint()
    if bar is not None:
        bar.close()

    accelerator.wait_for_everyone()
    if runner is not None:
        runner.close()
    if student_hidden is not None:
        student_hidden.remove()
    peft_model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if plain is not None:  # every rank gathers the shards; each gets the whole trained model
        peft_model = load_trained(_trainable_model(plain, settings, targets), peft_model)
    peft_model.eval()
    return peft_model, history


def merge(peft_model) -> torch.fx.GraphModule:
    """Fold the LoRA weights into their projections (`merge_and_unload`) and return the plain
    GraphModule: same graph and module names, no peft module or attribute left, every parameter
    trainable again as in a freshly emitted GraphModule."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(peft_model, torch.fx.GraphModule) and not hasattr(peft_model, "peft_config"):
        gm = peft_model  # trained with trainable="full": the weights are already the graph's own
    else:
        gm = peft_model.merge_and_unload()
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"merge() expects a peft model around a torch.fx.GraphModule, got {type(gm).__name__}")
    left = [name for name, mod in gm.named_modules() if isinstance(mod, BaseTunerLayer)]
    if left:
        raise RuntimeError(f"peft modules left after merge_and_unload: {left}")
    if hasattr(gm, "peft_config"):
        del gm.peft_config
    for p in gm.parameters():
        p.requires_grad_(True)
    gm.eval()
    return gm
