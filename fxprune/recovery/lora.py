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
import dataclasses
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fxprune.util.lm import IGNORE_INDEX, lm_loss, logits_of

logger = logging.getLogger(__name__)

STATE_FILE = "fxprune_lora_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
# Settings that change the optimisation trajectory: a checkpoint made under other values is refused.
TRAJECTORY_FIELDS = ("r", "alpha", "dropout", "lr", "batch_size", "grad_accum", "cutoff_len", "seed", "trainable",
                     "kd_alpha", "kd_temperature", "hidden_weight")
TRAINABLE = ("lora", "full")  # LoRA adapters on the projections, or every parameter of the pruned graph


# ----------------------------------------------------------------------------- targets

def _linear_calls(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), torch.nn.Linear)]


def output_heads(gm: torch.fx.GraphModule) -> list[str]:
    """Names of the linear modules that produce the graph's output (the LM head), found by walking
    back from the output node through non-linear ops and stopping at the first linear on each path."""
    linear = {n for n in _linear_calls(gm)}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    heads, seen, stack = [], set(), list(output.all_input_nodes)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in linear:
            if node.target not in heads:
                heads.append(node.target)
            continue
        stack.extend(node.all_input_nodes)
    return heads


def linear_modules(gm: torch.fx.GraphModule) -> list[str]:
    """Every `nn.Linear` the graph calls, in call order, once each (head included)."""
    return list(dict.fromkeys(n.target for n in _linear_calls(gm)))


def linear_targets(gm: torch.fx.GraphModule) -> list[str]:
    """LoRA targets: the `nn.Linear` modules the graph calls, less the output head.

    Read from the graph's `call_module` nodes, not from a per-family name list, so it is
    q/k/v/o/gate/up/down on LLaMA and whatever the projections are called elsewhere.
    """
    heads = set(output_heads(gm))
    return [name for name in linear_modules(gm) if name not in heads]


def resolve_targets(gm: torch.fx.GraphModule, target_modules) -> list[str]:
    """The linear module names `target_modules` selects, with peft's matching rules (a list entry
    matches a name equal to it or ending in `.entry`; a string is a regex that must match a whole
    name; "all-linear" is `linear_targets(gm)`). Raises ValueError for a pattern that matches no
    linear module, naming it and listing the linear modules there are."""
    available = linear_modules(gm)
    if target_modules is None or target_modules == "all-linear":
        targets = linear_targets(gm)
        if not targets:
            raise ValueError("the GraphModule calls no nn.Linear module other than its output head; nothing to adapt")
        return targets
    heads = set(output_heads(gm))
    listing = ", ".join(f"{n} (output head)" if n in heads else n for n in available) or "none"
    if isinstance(target_modules, str):
        chosen = [n for n in available if re.fullmatch(target_modules, n)]
        if not chosen:
            raise ValueError(f"target_modules regex {target_modules!r} matches no linear module of the "
                             f"GraphModule; its linear modules are: {listing}")
        return chosen
    patterns = list(target_modules)
    if not patterns:
        raise ValueError(f"target_modules is empty; the GraphModule's linear modules are: {listing}")

    def hits(p):
        return [n for n in available if n == p or n.endswith("." + p)]

    unmatched = [p for p in patterns if not hits(p)]
    if unmatched:
        raise ValueError(f"target_modules {unmatched} match no linear module of the GraphModule; "
                         f"its linear modules are: {listing}")
    return [n for n in available if any(n in hits(p) for p in patterns)]


# ----------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class LoraSettings:
    """LoRA post-training settings (defaults follow LLM-Pruner's recovery stage, at micro-batch 4).

    `batch_size` is per process and per micro-step; the effective batch is
    batch_size * grad_accum * num_processes. `max_steps` (optimizer steps) overrides `epochs`.
    `dtype`: "auto" trains under bf16 autocast on CUDA and in fp32 on CPU; "bf16", "fp16" or
    "fp32" force it. Weights keep their dtype (mixed precision, fp32 master LoRA weights).
    `output_dir`: checkpoints go to `output_dir/checkpoint-<step>` every `checkpoint_every`
    optimizer steps and at the end of training.
    `trainable`: "lora" (adapters; r/alpha/dropout/target_modules apply) or "full" (the pruned
    weights themselves, every parameter of the GraphModule).
    Distillation (used only when tune() gets a `teacher`; see fxprune.recovery.distill): the loss is
    (1 - kd_alpha) * CE + kd_alpha * T^2 * KL(teacher || student) at temperature `kd_temperature`,
    plus `hidden_weight` * MSE of the final hidden states (0: no hidden-state matching).
    """
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    lr: float = 1e-4
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    cutoff_len: int = 256
    target_modules: tuple[str, ...] | list[str] | str | None = None
    seed: int = 0
    dtype: str = "auto"
    checkpoint_every: int | None = None
    output_dir: str | os.PathLike | None = None
    log_every: int = 10
    trainable: str = "lora"
    kd_alpha: float = 1.0
    kd_temperature: float = 1.0
    hidden_weight: float = 0.0

    def __post_init__(self):
        for name in ("r", "batch_size", "grad_accum", "cutoff_len", "epochs", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"LoraSettings.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"LoraSettings.{name} must be None or >= 1, got {value}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoraSettings.dropout must be in [0, 1), got {self.dropout}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"LoraSettings.trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if not 0 <= self.kd_alpha <= 1:
            raise ValueError(f"LoraSettings.kd_alpha must be in [0, 1], got {self.kd_alpha}")
        if not self.kd_temperature > 0:
            raise ValueError(f"LoraSettings.kd_temperature must be > 0, got {self.kd_temperature}")
        if not self.hidden_weight >= 0:
            raise ValueError(f"LoraSettings.hidden_weight must be >= 0, got {self.hidden_weight}")
        if self.checkpoint_every is not None and self.output_dir is None:
            raise ValueError("LoraSettings.checkpoint_every needs an output_dir")
        mixed_precision(self.dtype)  # validates the name
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["output_dir"] = None if self.output_dir is None else str(self.output_dir)
        d["target_modules"] = list(self.target_modules) if isinstance(self.target_modules, tuple) else self.target_modules
        return d


_DTYPES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16",
           "fp32": "no", "float32": "no", "no": "no"}


def mixed_precision(dtype: str) -> str:
    """accelerate's `mixed_precision` for a LoraSettings.dtype."""
    if dtype == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if dtype not in _DTYPES:
        raise ValueError(f"LoraSettings.dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


# ----------------------------------------------------------------------------- data

class _Examples(torch.utils.data.Dataset):
    def __init__(self, examples, cutoff_len: int):
        self.items = []
        for i, ex in enumerate(examples):
            if "input_ids" not in ex:
                raise ValueError(f"example {i} has no input_ids; tune() takes tokenised examples "
                                 f"(see fxprune.data.loaders.tokenize_alpaca)")
            ids = torch.as_tensor(ex["input_ids"], dtype=torch.long).flatten()[:cutoff_len]
            labels = ex.get("labels")
            labels = ids.clone() if labels is None else torch.as_tensor(labels, dtype=torch.long).flatten()[:cutoff_len]
            if labels.shape != ids.shape:
                raise ValueError(f"example {i}: labels has {labels.numel()} tokens, input_ids {ids.numel()}")
            if len(ids) == 0:
                raise ValueError(f"example {i} has no tokens")
            self.items.append((ids, labels))
        if not self.items:
            raise ValueError("tune() needs at least one example")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(batch, pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a list of (input_ids, labels) to the longest: padding gets attention 0 and label -100."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(batch):
        input_ids[row, :len(ids)] = ids
        labels[row, :len(lab)] = lab
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ----------------------------------------------------------------------------- checkpoints

def checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints under output_dir (those with their state file), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", d.name)
        if m and d.is_dir() and (d / STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def _fingerprint(settings: LoraSettings, targets, n_examples, num_processes, precision) -> dict:
    d = {k: getattr(settings, k) for k in TRAJECTORY_FIELDS}
    d.update(target_modules=list(targets), n_examples=n_examples, num_processes=num_processes,
             mixed_precision=precision)
    return d


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _register_lora_only_checkpointing(accelerator):
    """Make save_state/load_state store only the trainable (LoRA) weights, not the frozen base model."""
    from safetensors.torch import load_file

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            if i < len(weights):
                weights[i] = {n: p.detach().contiguous() for n, p in _trainable(accelerator.unwrap_model(model)).items()}

    def load_hook(models, input_dir):
        for model in list(models):
            i = accelerator._models.index(model)
            path = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            state = load_file(str(path))
            own = _trainable(accelerator.unwrap_model(model))
            if set(state) != set(own):
                raise ValueError(f"checkpoint {input_dir} holds other trainable weights than the model: "
                                 f"missing {sorted(set(own) - set(state))[:5]}, unexpected {sorted(set(state) - set(own))[:5]}")
            with torch.no_grad():
                for name, value in state.items():
                    own[name].copy_(value)
            models.remove(model)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ----------------------------------------------------------------------------- training

def _launched_on_cpu() -> bool:
    """True when several processes were launched (torchrun, `accelerate launch --multi_gpu`) on a machine
    without an accelerator: accelerate then needs cpu=True to join them into one gloo process group,
    where it would otherwise run each alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    available = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return not available


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
    from accelerate.utils import set_seed

    from fxprune.recovery.distill import HeadInput, Teacher, check_teacher, recovery_loss

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
    dataset = _Examples(examples, settings.cutoff_len)
    fingerprint = _fingerprint(settings, targets, len(dataset), accelerator.num_processes, precision)
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
    _register_lora_only_checkpointing(accelerator)

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
