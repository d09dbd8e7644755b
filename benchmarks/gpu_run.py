"""The GPU run behind `benchmarks/gpu.sh`: on one CUDA device, SmolLM2-135M-Instruct pruned 20% (HyWIA), then
one epoch over Alpaca-cleaned 5k of each recovery (LoRA, distillation with LoRA, distillation of the full
pruned weights) under bf16 autocast with WikiText-2 perplexity before and after, and the gradient pass of
the Taylor estimators in bf16 with its peak memory (torch.cuda.max_memory_allocated).

`--dry-run` runs the same steps on the CPU with tiny sizes (a random 2-layer LLaMA and an in-memory
tokenizer, a few examples and steps, synthetic text) so the suite can keep this script from rotting.

Usage: FXPRUNE_DATA_DIR=../shared/data python -m benchmarks.gpu_run [--dry-run] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, finish, header, md_table, report_head

RECOVERIES = {"lora": dict(trainable="lora", teacher=False), "kd_lora": dict(trainable="lora", teacher=True),
              "kd_full": dict(trainable="full", teacher=True)}


def parse(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, a few steps")
    p.add_argument("--out", default=str(RESULTS / "gpu"))
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval-tokens", type=int, default=20480)
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    def __init__(self, device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.wall_s = round(time.perf_counter() - self.t0, 2)
        self.peak_gb = (round(torch.cuda.max_memory_allocated(self.device) / 1e9, 3)
                        if self.device.type == "cuda" else None)
        return False


def setup(a):
    """(model, tokenizer, device, alpaca records, WikiText-2 text, calibration windows) for the run."""
    from fxprune.data.loaders import alpaca_records, calibration_samples, data_dir, packaged_calibration_texts
    if a.dry_run:
        from tests.models import llama
        from tests.tiny_tokenizer import tiny_tokenizer
        tok = tiny_tokenizer()
        model = llama("sdpa", vocab_size=len(tok))
        records = [{"instruction": f"Repeat {w}", "input": "", "output": f"{w} {w}"} for w in ("ab", "cd", "ef", "gh") * 4]
        wiki = "the cat sat on the mat and the dog ran after it. " * 40
        calib = calibration_samples(packaged_calibration_texts()[:8], tok, n_samples=4, seq_len=32)
        return model, tok, torch.device("cpu"), records, wiki, calib
    from fxprune.data.models import load_model
    if not torch.cuda.is_available():
        raise SystemExit("gpu_run needs a CUDA device (use --dry-run to check the steps on CPU)")
    root = data_dir()  # FXPRUNE_DATA_DIR; checked before the model is loaded
    alpaca, wiki = root / "alpaca" / "alpaca_cleaned_5k.json", root / "wikitext-2-raw" / "wiki.test.raw"
    for path in (alpaca, wiki):
        if not path.is_file():
            raise SystemExit(f"{path} not found (FXPRUNE_DATA_DIR)")
    device = torch.device("cuda")
    model, tok = load_model(None, device=device)
    calib = calibration_samples(packaged_calibration_texts(), tok, n_samples=32, seq_len=128)
    return model, tok, device, alpaca_records(alpaca), wiki, calib


def ppl(model, tok, wiki, a, device):
    from fxprune.evaluation.evaluate import perplexity
    window, tokens = (16, 256) if a.dry_run else (128, a.eval_tokens)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return perplexity(model, tok, wiki, window=window, max_tokens=tokens, device=device)


def taylor_gradient_pass(model, calib, device, dtype) -> dict:
    """One gradient pass of the first-order Taylor estimators (element1/vector) over the calibration set, on a
    copy of the model captured in `dtype` (the graph then computes in it end to end)."""
    import copy

    import fxprune
    from fxprune.scoring import compute_gradients
    dg = fxprune.analyze(copy.deepcopy(model).to(dtype))
    with Timer(device) as t:
        compute_gradients(dg, calib.split(4), device=device)
    return {"samples": int(calib.shape[0]), "seq_len": int(calib.shape[1]), "dtype": str(dtype),
            "wall_s": t.wall_s, "peak_gb": t.peak_gb}


def recover(name, pruned, dense, examples, a, device) -> tuple[dict, torch.nn.Module]:
    from fxprune.recovery import LoraSettings, merge, tune
    from tests.test_lora import clone
    spec = RECOVERIES[name]
    settings = LoraSettings(trainable=spec["trainable"], lr=a.lr, batch_size=a.batch_size, epochs=1,
                            max_steps=3 if a.dry_run else None, dtype="fp32" if a.dry_run else "bf16",
                            log_every=100)
    with Timer(device) as t:
        model, history = tune(clone(pruned), examples, settings, teacher=dense if spec["teacher"] else None)
    tuned = merge(model)
    return {"steps": len(history), "wall_s": t.wall_s, "peak_gb": t.peak_gb, "first_loss": history[0]["loss"],
            "last_loss": history[-1]["loss"], "trainable": spec["trainable"], "teacher": spec["teacher"]}, tuned


def main(argv=None):
    import fxprune
    from fxprune.data.loaders import tokenize_alpaca
    a = parse(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report = header()
    model, tok, device, records, wiki, calib = setup(a)
    report.update(dry_run=a.dry_run, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  steps={})
    steps = report["steps"]
    steps["taylor_gradient_pass_bf16"] = taylor_gradient_pass(model, calib, device, torch.bfloat16)
    with Timer(device) as t:
        pruned = fxprune.compile(model, a.ratio, importance="l2" if a.dry_run else "hywia",
                                 calibration=calib.split(4), protect_layers=None if a.dry_run else (0, 1, 2, -2, -1))
    steps["prune"] = {"ratio": a.ratio, "wall_s": t.wall_s, "peak_gb": t.peak_gb,
                      "parameters": sum(p.numel() for p in set(pruned.parameters()))}
    steps["ppl"] = {"dense": ppl(model, tok, wiki, a, device), "pruned": ppl(pruned, tok, wiki, a, device)}
    examples = tokenize_alpaca(records, tok, cutoff_len=256)
    for name in RECOVERIES:
        steps[name], tuned = recover(name, pruned, model, examples, a, device)
        steps["ppl"][name] = ppl(tuned, tok, wiki, a, device)
        write(out, finish(dict(report)), a)
    write(out, finish(report), a)
    return report


def write(out: Path, report: dict, a) -> None:
    (out / "gpu_run.json").write_text(json.dumps(report, indent=1, default=str))
    s = report["steps"]
    rows = [[name, s[name]["steps"], s[name]["wall_s"], s[name]["peak_gb"], f"{s[name]['first_loss']:.3f}",
             f"{s[name]['last_loss']:.3f}", f"{s['ppl'][name]:.2f}"] for name in RECOVERIES if name in s]
    g = s["taylor_gradient_pass_bf16"]
    lines = report_head(f"GPU run ({'DRY RUN on CPU, tiny model' if a.dry_run else report['device']})", report) + [
        f"Taylor gradient pass (bf16, {g['samples']} x {g['seq_len']} tokens): {g['wall_s']} s, peak "
        f"{g['peak_gb']} GB allocated. Prune {s['prune']['ratio']:.0%}: {s['prune']['wall_s']} s. WikiText-2 "
        f"perplexity dense {s['ppl']['dense']:.2f}, pruned {s['ppl']['pruned']:.2f}. Recovery: one epoch of "
        f"Alpaca-cleaned 5k, micro-batch {a.batch_size}, lr {a.lr:g}, bf16 autocast.", "",
        md_table(["recovery", "steps", "wall s", "peak GB", "first loss", "last loss", "ppl after"], rows), ""]
    (out / "gpu_run.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
