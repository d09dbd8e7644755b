"""LoRA post-training of a saved pruned GraphModule, single- or multi-process.

    accelerate launch --num_processes 2 -m fxprune.recovery.tune_script \\
        --gm pruned.pt --data alpaca.json --tokenizer path/to/tokenizer \\
        --output-dir ckpt --checkpoint-every 100 --merged tuned.pt --result result.json

(`--cpu` after `launch` trains on CPU with the gloo backend.) Every process loads the GraphModule
and calls `fxprune.recovery.lora.tune`, whose `accelerate.Accelerator` wraps the peft model in
DistributedDataParallel; the main process writes the merged GraphModule and a JSON summary.
`--data` is either an Alpaca JSON array ({"instruction","input","output"}; needs `--tokenizer`)
or a JSON array of tokenised examples ({"input_ids", "labels"}).

Distillation: `--teacher [MODEL]` (the dense model the GraphModule was pruned from: a local Hugging
Face directory or .gguf file; alone, the embedded SmolLM2) adds a KL loss on its logits
(`--kd-alpha`, `--kd-temperature`, `--hidden-weight`); `--trainable full` fine-tunes the pruned
weights themselves instead of LoRA adapters.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from fxprune.recovery import LoraSettings, linear_targets, merge, tune


def parse_args(argv=None):
    """The recovery script's options (LoRA, distillation, data, steps, output) from `argv`."""
    d = LoraSettings()
    p = argparse.ArgumentParser(prog="python -m fxprune.recovery.tune_script", description=__doc__.split("\n\n")[0])
    p.add_argument("--gm", required=True, help="a pruned GraphModule: a directory written by fxprune.save, "
                   "or a file written by torch.save")
    p.add_argument("--data", required=True, help="Alpaca JSON, {\"text\": ...} records (packed into --cutoff-len windows) or tokenised JSON (input_ids/labels)")
    p.add_argument("--tokenizer", help="tokenizer name or path (for Alpaca data)")
    p.add_argument("--train-on-inputs", action="store_true", help="take loss on the prompt too (Alpaca data)")
    p.add_argument("--output-dir", help="checkpoint directory")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    p.add_argument("--result", help="JSON summary written by the main process")
    p.add_argument("--merged", help="where the main process saves the merged GraphModule: a directory "
                   "(fxprune.save) for a GraphModule made by fxprune.compile/apply, else a torch.save file")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--r", type=int, default=d.r)
    p.add_argument("--alpha", type=int, default=d.alpha)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--max-steps", type=int, default=d.max_steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--cutoff-len", type=int, default=d.cutoff_len)
    p.add_argument("--target-modules", nargs="+", help="default: every linear the graph calls but the head")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dtype", default=d.dtype)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--trainable", choices=["lora", "full"], default=d.trainable,
                   help="LoRA adapters, or every weight of the pruned graph")
    p.add_argument("--teacher", nargs="?", const="smollm2", default=None,
                   help="distil this dense model's logits: a local HF directory or .gguf file "
                        "(without a value: the embedded SmolLM2)")
    p.add_argument("--kd-alpha", type=float, default=d.kd_alpha,
                   help="weight of the distillation term; (1 - alpha) goes to cross-entropy on the labels")
    p.add_argument("--kd-temperature", type=float, default=d.kd_temperature)
    p.add_argument("--hidden-weight", type=float, default=d.hidden_weight,
                   help="weight of the MSE between final hidden states (0: logits only)")
    return p.parse_args(argv)


def check_inputs(args) -> None:
    """Every file the run reads exists, checked before any model is loaded; the error names the flag."""
    from fxprune.data.models import DEFAULT_MODEL
    needed = [("--gm", args.gm), ("--data", args.data)]
    if args.teacher and args.teacher != DEFAULT_MODEL:
        needed.append(("--teacher", args.teacher))
    for flag, path in needed:
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} not found (set by {flag})")


def load_teacher(name) -> torch.nn.Module:
    """The dense teacher: a saved fxprune directory / GraphModule file, or a model for fxprune.data.models.load_model."""
    from fxprune.data.models import DEFAULT_MODEL, load_model
    if name != DEFAULT_MODEL and ((Path(name) / "fxprune.json").is_file() or Path(name).suffix in (".pt", ".pth")):
        return load_graph_module(name)
    return load_model(name, tokenizer=False)[0]


def load_examples(path, tokenizer=None, cutoff_len=256, train_on_inputs=False):
    """Tokenised records (input_ids, labels) as they are; Alpaca records through the Alpaca template;
    {"text": ...} records (e.g. a C4 sample) packed into `cutoff_len`-token windows. JSON array or JSON Lines."""
    from fxprune.data.loaders import read_json_records
    records = read_json_records(path)
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty JSON array or JSON Lines")
    if all("input_ids" in r for r in records):
        return records
    plain = all(isinstance(r, dict) and isinstance(r.get("text"), str) and "instruction" not in r for r in records)
    if tokenizer is None:
        kind = "text" if plain else "Alpaca"
        raise ValueError(f"{path} holds {kind} records; pass --tokenizer to tokenise them")
    from transformers import AutoTokenizer

    from fxprune.data.loaders import alpaca_records, pack_texts, tokenize_alpaca
    tok = AutoTokenizer.from_pretrained(tokenizer)
    if plain:
        return pack_texts([r["text"] for r in records], tok, cutoff_len)
    return tokenize_alpaca(alpaca_records(path), tok, cutoff_len=cutoff_len, train_on_inputs=train_on_inputs)


def load_graph_module(path) -> torch.fx.GraphModule:
    """A pruned GraphModule from a `fxprune.save` directory or a `torch.save` file; exits with a message for
    anything else."""
    path = Path(path)
    if path.is_dir():
        from fxprune.serialization import load
        gm = load(path)
    else:
        gm = torch.load(path, weights_only=False)
    if not isinstance(gm, torch.fx.GraphModule):
        raise SystemExit(f"{path} holds a {type(gm).__name__}, not a torch.fx.GraphModule")
    return gm


def save_graph_module(gm: torch.fx.GraphModule, path) -> None:
    """Save `gm` with `fxprune.save` when it carries a plan, else with `torch.save`. Under a process group every
    rank calls it and rank 0 writes."""
    from fxprune.analysis.meta_keys import PLAN_KEY
    from fxprune.util.distributed import on_rank_zero
    if PLAN_KEY in gm.meta and "fxprune.base" in gm.meta:
        from fxprune.serialization import save
        save(gm, path)
    else:
        on_rank_zero(lambda: torch.save(gm, path))


def main(argv=None) -> int:
    """Run recovery training on a pruned model (LoRA or full weights, cross-entropy or distillation) and save it.
    Returns the exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from accelerate import PartialState
    from accelerate.utils import gather

    check_inputs(args)
    examples = load_examples(args.data, args.tokenizer, args.cutoff_len, args.train_on_inputs)
    gm = load_graph_module(args.gm)
    teacher = load_teacher(args.teacher) if args.teacher else None
    settings = LoraSettings(r=args.r, alpha=args.alpha, dropout=args.dropout, lr=args.lr, epochs=args.epochs,
                            max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                            cutoff_len=args.cutoff_len, target_modules=args.target_modules, seed=args.seed,
                            dtype=args.dtype, checkpoint_every=args.checkpoint_every, output_dir=args.output_dir,
                            log_every=args.log_every, trainable=args.trainable, kd_alpha=args.kd_alpha,
                            kd_temperature=args.kd_temperature, hidden_weight=args.hidden_weight)
    if args.trainable == "full":
        targets = []
    else:
        targets = linear_targets(gm) if args.target_modules is None else list(args.target_modules)
    peft_model, history = tune(gm, examples, settings, resume=args.resume, progress=args.progress, teacher=teacher)
    state = PartialState()  # only now: tune()'s Accelerator sets it up (cpu flag, backend)

    # DDP keeps the replicas identical; every process trained on its own shard, so they would drift apart
    # without the gradient all-reduce.
    flat = torch.cat([p.detach().float().flatten() for n, p in sorted(peft_model.named_parameters())
                      if p.requires_grad]).to(state.device)
    replicas = gather(flat[None]).cpu()
    in_sync = bool((replicas == replicas[0]).all())

    merged = merge(peft_model)
    if args.merged:  # on every process: the main one writes, the others wait (fxprune.util.distributed)
        save_graph_module(merged, args.merged)
    if state.is_main_process:
        if args.result:
            backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
            Path(args.result).write_text(json.dumps({
                "num_processes": state.num_processes, "distributed_type": str(state.distributed_type),
                "backend": backend, "targets": targets, "steps": len(history), "history": history,
                "final_loss": history[-1]["loss"] if history else None, "replicas_in_sync": in_sync,
                "trainable": args.trainable, "teacher": args.teacher, "kd_alpha": args.kd_alpha,
                "kd_temperature": args.kd_temperature, "hidden_weight": args.hidden_weight,
                "trainable_parameters": int(flat.numel()),
            }, indent=1))
    state.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0 if in_sync else 1


if __name__ == "__main__":
    sys.exit(main())
