"""Hugging Face checkpoint of a pruned model: config.json + model.safetensors (+ tokenizer files) that
plain `transformers.AutoModelForCausalLM.from_pretrained` loads, fxprune not needed.

Any transformers class: `hf_widths` finds the config fields that carry the kept widths (heads, KV
heads, head size, MLP width under the class's own name, hidden size) by building the class on the
meta device, or refuses naming the width the config cannot state. Each candidate config is then
proven before anything is written: the class built from it takes every pruned tensor at its shape,
and its logits on a probe batch equal the pruned graph's. The written directory is loaded back with
`from_pretrained` and checked the same way before it is moved into place.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fxprune.export.common import (ExportError, base_of, check_free, probe_inputs, pruned_logits, rel_err,
                                   staged_directory)
from fxprune.export.hf_widths import (KEEPERS, analyse, build, candidate_configs, meta_shapes, model_class,
                                      shape_solutions)

MAX_PROOFS = 8  # real builds of candidate configs before giving up


def tolerance(dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-2


def enable_bias_switches(cls, config: dict, extra: list[str], shapes: dict) -> tuple[dict, set]:
    """Turn on the config's False flags that give a place to biases the pruned model gained (a
    reconstruction may add one to an output projection; LLaMA's attention_bias / mlp_bias) and change
    no other tensor. Returns the config and the keys the flags added, which the pruned model fills or
    leaves zero."""
    added = set()
    for flag in [k for k, v in config.items() if v is False]:
        trial = {**config, flag: True}
        try:
            got = meta_shapes(cls, trial)
        except Exception:  # noqa: BLE001 - a flag the class rejects gives no place
            continue
        gained = set(got) - set(shapes)
        unchanged = all(got.get(k) == s for k, s in shapes.items() if s is not None)
        if gained & set(extra) and unchanged:
            config, added, shapes = trial, added | gained, {**shapes, **{k: None for k in gained}}
    return config, added


def hf_state(gm, cls, config: dict) -> tuple[dict, dict]:
    """(config, state dict) for `cls`: the pruned tensors under their original names, Conv1D weights
    back in their [in, out] layout, zero biases where a switched-on bias has no pruned counterpart."""
    from transformers.pytorch_utils import Conv1D
    pruned = gm.state_dict()
    params = {k for k, _ in gm.named_parameters()}
    shapes = meta_shapes(cls, config)
    extra = sorted(k for k in params if k not in shapes)
    added = set()
    if extra:
        config, added = enable_bias_switches(cls, config, extra, shapes)
        shapes = meta_shapes(cls, config)
        extra = sorted(k for k in params if k not in shapes)
    if extra:
        raise ExportError(f"{cls.__name__} has no place for the pruned model's parameters {extra[:6]}"
                          f"{' ...' if len(extra) > 6 else ''} (no config flag adds them); {KEEPERS}")
    modules, lifted = dict(build(cls, config).named_modules()), dict(gm.named_modules())
    state = {}
    for key, shape in shapes.items():
        if key not in pruned:
            if key in added:
                state[key] = torch.zeros(shape, dtype=next(gm.parameters()).dtype)
            continue  # tied to another tensor, or a buffer the class computes itself
        value = pruned[key].detach().cpu()
        owner = key.rpartition(".")[0]
        if value.dim() == 2 and isinstance(modules.get(owner), Conv1D) and isinstance(lifted.get(owner), torch.nn.Linear):
            value = value.t()  # the lifted nn.Linear is [out, in]; GPT-2's Conv1D stores [in, out]
        if tuple(value.shape) != shape:
            raise ExportError(f"{key} is {tuple(value.shape)} in the pruned model but {shape} in {cls.__name__} "
                              f"built with the derived config; {KEEPERS}")
        state[key] = value.contiguous()
    return config, state


def changes(base: dict, config: dict) -> str:
    return ", ".join(f"{k} {base[k]} -> {v}" for k, v in config.items() if k in base and base[k] != v) or "no change"


def proven_model(gm, cls, base: dict, candidates: list[dict]):
    """The first candidate whose class, loaded with the pruned tensors, gives the pruned logits on a
    probe batch: (model in float32, config). ExportError listing what was tried otherwise."""
    ids, mask = probe_inputs(gm)
    expected = pruned_logits(gm, ids, mask).cpu()
    limit = tolerance(next(gm.parameters()).dtype)
    tried = []
    for config in candidates[:MAX_PROOFS]:
        config, state = hf_state(gm, cls, config)
        model = build(cls, config, "cpu").float().eval()
        model.load_state_dict(state, strict=False)
        with torch.no_grad():
            err = rel_err(model(ids.cpu(), attention_mask=mask.cpu()).logits, expected)
        if err < limit:
            return model, config
        tried.append(f"{changes(base, config)}: relative logit error {err:.2e}")
    raise ExportError(f"{cls.__name__} built with every tensor at its pruned shape does not compute the pruned "
                      f"model (tolerance {limit}); tried\n  " + "\n  ".join(tried) + "\nThe class computes with a "
                      "width the tensor shapes do not show (e.g. it scales by sqrt(hidden_size), or derives the head "
                      f"size from the hidden size). {KEEPERS}.")


def export_hf(gm: torch.fx.GraphModule, directory, tokenizer=None) -> Path:
    """Write `gm` as a Hugging Face checkpoint directory (config.json, model.safetensors, generation
    config, and the tokenizer's files when `tokenizer` is given), for any transformers class whose
    config can state the kept widths. Refuses, writing nothing, when it cannot (naming the width and
    the config fields), when the class is not part of transformers, or when `directory` exists and is
    not empty."""
    base = base_of(gm)
    cls = model_class(base)
    check_free(directory)
    widths = analyse(cls, base["config"], {k: tuple(v.shape) for k, v in gm.state_dict().items()})
    model, _ = proven_model(gm, cls, widths.base, candidate_configs(widths))
    dtype = next(gm.parameters()).dtype
    with staged_directory(directory) as tmp:
        model.to(dtype).save_pretrained(tmp)
        del model
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        check_reloaded(gm, tmp, dtype)
    return Path(directory)


def check_reloaded(gm, directory: Path, dtype) -> None:
    """The written directory, loaded as users load it, must reproduce the pruned logits."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    ids, mask = probe_inputs(gm)
    with torch.no_grad():
        got = model(ids.cpu(), attention_mask=mask.cpu()).logits.float()
    err = rel_err(got, pruned_logits(gm, ids, mask).cpu())
    if not err < tolerance(dtype):
        raise ExportError(f"{type(model).__name__} loaded from the exported directory does not reproduce the pruned "
                          f"model (relative logit error {err:.2e} > {tolerance(dtype)}); {KEEPERS}")


def check_hf_expressible(base: dict, shapes: dict) -> None:
    """The width checks of export_hf from the base description and tensor shapes alone (meta builds, no
    weights: the CLI runs them on a saved directory's safetensors header before loading it)."""
    shape_solutions(analyse(model_class(base), base["config"], shapes))
