"""`fxprune prune CHECKPOINT_DIR --max-memory 2GB`: a checkpoint whose weights exceed the budget is pruned
streamed (`fxprune.prune_checkpoint`), one decoder layer at a time, with a progress bar per sweep."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fxprune.streaming.budget import parse_bytes
from fxprune.streaming.weights import checkpoint_files


def streamed_size(model, max_memory) -> int | None:
    """Bytes of the safetensors of checkpoint directory `model` when `max_memory` is given and they exceed it
    (the prune then streams); None otherwise."""
    if max_memory is None:
        return None
    budget = parse_bytes(max_memory)
    if not model or not Path(model).is_dir():
        raise ValueError(f"--max-memory prunes a local checkpoint directory of safetensors; got {model or 'none'}")
    files = set(checkpoint_files(Path(model)).values())
    size = sum((Path(model) / f).stat().st_size for f in files)
    if size <= budget:
        print(f"fxprune prune: the checkpoint ({size:,} bytes) fits --max-memory {max_memory}: pruning in memory",
              file=sys.stderr)
        return None
    return size


def streaming_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with the streamed run's defaults where a flag was left out: FLAP importance, no refit (`--reconstruct
    lstsq` or `bias` refits as the layers are written)."""
    importance = "flap" if args.importance is None else args.importance
    reconstruct = "none" if args.reconstruct is None else args.reconstruct
    return argparse.Namespace(**{**vars(args), "importance": importance, "reconstruct": reconstruct})


def progress_bars():
    """A `prune_checkpoint` progress callback drawing one tqdm bar (with its ETA) per sweep over the layers."""
    from tqdm import tqdm
    bars = {}

    def update(stage, segment, count):
        if stage not in bars:
            bars[stage] = tqdm(total=count, desc=f"{stage}", unit="layer", file=sys.stderr)
        bar = bars[stage]
        bar.set_postfix_str(f"segment {segment.index}")
        bar.update(1)
        if bar.n == count:
            bar.close()
    return update


def checkpoint_calibration(args):
    """(tokenizer, calibration rows, where they came from) for a streamed run on checkpoint `args.model`."""
    from transformers import AutoTokenizer
    from fxprune.data.loaders import calibration_samples
    from fxprune.data.sources import calibration_source
    calib_src = calibration_source(args.calib_data, args.data_dir)
    try:
        tok = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"{args.model} has no tokenizer to draw the calibration with: {exc}") from exc
    return tok, calibration_samples(calib_src.value, tok, n_samples=args.calib_samples, seq_len=args.calib_len), \
        calib_src.origin


def dry_run(args, cfg) -> list[tuple[str, str]]:
    """The report of `fxprune prune CHECKPOINT_DIR --dry-run`: what pruning it streamed under `cfg` will cost
    (`fxprune.estimate_checkpoint`), measured on its first decoder layer."""
    from fxprune.checkpoint import estimate_checkpoint, streamed_config
    if not args.model or not Path(args.model).is_dir():
        raise ValueError(f"--dry-run estimates a local checkpoint directory of safetensors; got {args.model or 'none'}")
    cfg = streamed_config(cfg)
    _, calib, origin = checkpoint_calibration(args)
    estimate = estimate_checkpoint(args.model, cfg, output=bool(args.output), calibration=calib,
                                   max_memory=args.max_memory)
    return [("dry run", f"{args.model}: nothing written"), ("calibration", origin), *estimate.lines()]


def prune_streamed(args, cfg, size: int) -> list[tuple[str, str]]:
    """Prune checkpoint `args.model` under `cfg` streamed into `args.output` (with the checkpoint's tokenizer);
    returns the report's rows."""
    import fxprune
    from fxprune.checkpoint import streamed_config
    from fxprune.data.loaders import calibration_samples
    from fxprune.data.sources import calibration_source
    from fxprune.util.distributed import on_rank_zero
    cfg = streamed_config(cfg)  # what cannot stream is refused before any data is read
    print(f"fxprune prune: the checkpoint ({size:,} bytes) exceeds --max-memory {args.max_memory}: streaming it "
          "one layer at a time (perplexity is skipped: it needs the whole model)", file=sys.stderr)
    tok, calib, origin = checkpoint_calibration(args)
    # the refit reads its own number of windows of the same text, as the in-memory prune's does
    refit = calibration_samples(calibration_source(args.calib_data, args.data_dir).value, tok,
                                n_samples=cfg.reconstruct.samples, seq_len=args.calib_len) \
        if cfg.reconstruct.enabled else None
    t0 = time.time()
    plan = fxprune.prune_checkpoint(args.model, cfg, args.output, calibration=calib, max_memory=args.max_memory,
                                    progress=progress_bars(), refit_calibration=refit)
    # so `fxprune tune/eval DIR` find the tokenizer beside the weights; rank 0 only under torchrun
    on_rank_zero(lambda: tok.save_pretrained(args.output))
    return [("calibration", origin), ("model", args.model), ("streamed", f"max memory {args.max_memory}"),
            ("importance", str(plan.config.importance)), ("allocation", plan.config.allocation),
            ("reconstruct", plan.config.reconstruct.mode), ("targets", " ".join(args.targets)),
            ("parameters before", f"{plan.params_before:,}"),
            ("parameters after", f"{plan.params_after:,} (-{plan.removed_fraction:.2%})"),
            ("pruning time", f"{time.time() - t0:.1f} s"), ("saved to", args.output)]
