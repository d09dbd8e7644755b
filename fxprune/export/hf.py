"""Hugging Face checkpoint of a pruned model: config.json + model.safetensors (+ tokenizer files) that
plain `transformers.AutoModelForCausalLM.from_pretrained` loads, fxprune not needed.

A config holds one width per kind (hidden size, heads, KV heads, MLP channels). The widths are read
from the pruned weights' shapes; where they differ between layers, the exporter tries transformers'
`per_layer_config` (honoured in 5.24 only by a few classes such as Gemma-4, none of the families
below: their layers read the global value, which then raises) and otherwise refuses, naming the
layers and the planning option that makes the plan expressible. Every export is checked before it
is moved into place: the directory is loaded back with `from_pretrained` and must reproduce the
pruned model's logits.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from fxprune.export.common import (ExportError, base_of, probe_inputs, pruned_logits, rel_err, staged_directory,
                                   check_free)

UNIFORM_HINT = ("plan with PruneConfig(uniform_widths=True) (`fxprune prune --uniform-widths`) to get the "
                "same widths in every layer, or export to gguf (LLaMA family) or pt2, which keep per-layer widths")
BIAS_SWITCHES = ("attention_bias", "mlp_bias", "enable_bias", "bias")


@dataclass(frozen=True)
class Family:
    """Where a family's widths live. `layer_widths(w, d)` gives the per-layer config values, with
    `w(param, dim)` the pruned size of `<layer prefix><param>` along `dim` and `d` the head size."""
    embed: str                      # input embedding weight: its dim 1 is the hidden size
    hidden_keys: tuple              # config keys that equal the hidden size
    heads_key: str                  # config key of the (query) head count, for the head size
    layer: str                      # parameter prefix of layer i
    layer_widths: Callable
    scaled_by_hidden: str = ""      # why a smaller hidden size changes the function, if it does


def llama_widths(w, d):
    """LLaMA-like attention and MLP widths of one layer, read by `w(parameter, dim)`, with head size `d`."""
    return {"num_attention_heads": w("self_attn.o_proj.weight", 1) // d,
            "num_key_value_heads": w("self_attn.k_proj.weight", 0) // d,
            "intermediate_size": w("mlp.up_proj.weight", 0)}


def phi3_widths(w, d):  # fused qkv_proj = [q heads | k heads | v heads], gate_up_proj = [gate | up]
    """Phi-3 attention and MLP widths of one layer, read from its fused projections by `w(parameter, dim)`."""
    heads = w("self_attn.o_proj.weight", 1) // d
    return {"num_attention_heads": heads, "num_key_value_heads": (w("self_attn.qkv_proj.weight", 0) // d - heads) // 2,
            "intermediate_size": w("mlp.gate_up_proj.weight", 0) // 2}


LLAMA = Family("model.embed_tokens.weight", ("hidden_size",), "num_attention_heads", "model.layers.{i}.", llama_widths)
FAMILIES = {
    "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA,
    "gemma2": Family(LLAMA.embed, ("hidden_size",), "num_attention_heads", LLAMA.layer, llama_widths,
                     scaled_by_hidden="Gemma-2 multiplies the embeddings by sqrt(hidden_size), a constant the "
                                      "pruned model keeps from the original; prune without 'hidden' to export it"),
    "phi3": Family(LLAMA.embed, ("hidden_size",), "num_attention_heads", LLAMA.layer, phi3_widths),
    "gpt2": Family("transformer.wte.weight", ("n_embd",), "n_head", "transformer.h.{i}.",
                   lambda w, d: {"n_head": w("attn.c_proj.weight", 1) // d, "n_inner": w("mlp.c_fc.weight", 0)}),
    "gpt_neox": Family("gpt_neox.embed_in.weight", ("hidden_size",), "num_attention_heads", "gpt_neox.layers.{i}.",
                       lambda w, d: {"num_attention_heads": w("attention.dense.weight", 1) // d,
                                     "intermediate_size": w("mlp.dense_h_to_4h.weight", 0)}),
    "opt": Family("model.decoder.embed_tokens.weight", ("hidden_size", "word_embed_proj_dim"), "num_attention_heads",
                  "model.decoder.layers.{i}.",
                  lambda w, d: {"num_attention_heads": w("self_attn.out_proj.weight", 1) // d, "ffn_dim": w("fc1.weight", 0)}),
    # Bloom's MLP is 4 x hidden_size by construction: the shape check refuses other MLP widths.
    "bloom": Family("transformer.word_embeddings.weight", ("hidden_size",), "n_head", "transformer.h.{i}.",
                    lambda w, d: {"n_head": w("self_attention.dense.weight", 1) // d}),
}


def family_of(config: dict) -> Family:
    """The export description of `config`'s model type; raises `ExportError` for a type hf export does not handle."""
    kind = config.get("model_type")
    if kind not in FAMILIES:
        raise ExportError(f"export to hf supports model types {sorted(FAMILIES)}; this model is {kind!r} "
                          "(export to pt2 keeps any model)")
    return FAMILIES[kind]


def model_class(base: dict):
    """The transformers class named by the base description's `architecture`."""
    module, _, name = base["architecture"].rpartition(".")
    return getattr(importlib.import_module(module), name)


def head_size(config: dict, family: Family) -> int:
    """Attention head size of `config` (its `head_dim`, or hidden size over heads)."""
    return int(config.get("head_dim") or config[family.hidden_keys[0]] // config[family.heads_key])


def n_layers(config: dict) -> int:
    """Number of transformer layers in `config`."""
    return int(config.get("num_hidden_layers") or config.get("n_layer"))


def per_layer_widths(config: dict, family: Family, shapes: dict) -> list[dict]:
    """Each layer's pruned widths, read from the saved tensor `shapes`; raises `ExportError` for a missing
    parameter."""
    d = head_size(config, family)
    widths = []
    for i in range(n_layers(config)):
        prefix = family.layer.format(i=i)

        def w(param, dim):
            name = prefix + param
            if name not in shapes:
                raise ExportError(f"the pruned model has no parameter {name}; cannot read its widths")
            return shapes[name][dim]
        widths.append(family.layer_widths(w, d))
    return widths


def describe_differences(widths: list[dict]) -> str:
    """Text listing each width that differs across layers, for the error when a class needs one width for all."""
    lines = []
    for key in widths[0]:
        values = [w[key] for w in widths]
        if len(set(values)) > 1:
            differ = [i for i, v in enumerate(values) if v != values[0]]
            lines.append(f"  {key} per layer: {values} (layers {differ} differ from layer 0)")
    return "\n".join(lines)


def exported_config(base: dict, family: Family, shapes: dict) -> dict:
    """The base config with the pruned widths; per-layer widths go to `per_layer_config` when the
    class honours it (checked by building it on the meta device), else ExportError."""
    config = {k: v for k, v in base["config"].items() if not k.startswith("_")}
    if family.embed not in shapes:
        raise ExportError(f"the pruned model has no parameter {family.embed}; cannot read its hidden size")
    hidden = shapes[family.embed][1]
    if hidden != config[family.hidden_keys[0]] and family.scaled_by_hidden:
        raise ExportError(f"cannot export hidden-channel pruning of {config['model_type']} to hf: {family.scaled_by_hidden}")
    d = head_size(config, family)
    config.update({k: hidden for k in family.hidden_keys}, head_dim=d)
    widths = per_layer_widths(config, family, shapes)
    config.update(widths[0])
    differences = describe_differences(widths)
    if differences:
        cls = model_class(base)
        config["per_layer_config"] = {i: {k: v for k, v in w.items() if v != widths[0][k]} for i, w in enumerate(widths)}
        try:
            meta_state_shapes(cls, config)
        except Exception as exc:
            import transformers
            raise ExportError(
                f"the plan keeps different widths in different layers, which a {cls.__name__} config cannot hold:\n"
                f"{differences}\ntransformers {transformers.__version__}'s per_layer_config is not honoured by "
                f"{cls.__name__} ({type(exc).__name__}: {str(exc).split('. ')[0]}).\nTo export to hf, {UNIFORM_HINT}."
            ) from None
    return config


def meta_model(cls, config: dict):
    """An instance of `cls` built from `config` on the meta device (no memory for weights)."""
    with torch.device("meta"):
        return cls(cls.config_class.from_dict(dict(config)))


def meta_state_shapes(cls, config: dict) -> dict:
    """The state dict shapes `cls` would have with `config`, without allocating it."""
    return {k: tuple(v.shape) for k, v in meta_model(cls, config).state_dict().items()}


def enable_bias_switches(cls, config: dict, extra: list[str], shapes: dict) -> tuple[dict, set]:
    """Turn on the config's bias switches (LLaMA's attention_bias / mlp_bias, ...) that give a place to
    biases the pruned model gained (a reconstruction may add one to an output projection). Returns the
    config and the bias keys the switches added, which the pruned model fills or leaves zero."""
    added = set()
    for switch in BIAS_SWITCHES:
        if config.get(switch) is not False:
            continue
        trial = {**config, switch: True}
        gained = set(meta_state_shapes(cls, trial)) - set(shapes)
        if gained & set(extra):
            config, added, shapes = trial, added | gained, {**shapes, **{k: None for k in gained}}
    return config, added


def hf_state(gm, cls, config: dict) -> tuple[dict, dict]:
    """(config, state dict) for `cls`: the pruned tensors under their original names, Conv1D weights
    back in their [in, out] layout, zero biases where a switched-on bias has no pruned counterpart."""
    from transformers.pytorch_utils import Conv1D
    pruned = gm.state_dict()
    params = {k for k, _ in gm.named_parameters()}
    shapes = meta_state_shapes(cls, config)
    extra = sorted(k for k in params if k not in shapes)
    added = set()
    if extra:
        config, added = enable_bias_switches(cls, config, extra, shapes)
        shapes = meta_state_shapes(cls, config)
        extra = sorted(k for k in params if k not in shapes)
    if extra:
        raise ExportError(f"{cls.__name__} has no place for the pruned model's parameters {extra[:6]}"
                          f"{' ...' if len(extra) > 6 else ''} (no config switch adds them); export to pt2 keeps them")
    modules, lifted = dict(meta_model(cls, config).named_modules()), dict(gm.named_modules())
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
            raise ExportError(
                f"a {cls.__name__} config cannot express this plan: {key} is {tuple(value.shape)} in the pruned model but "
                f"{shape} in {cls.__name__} built with the exported widths (the class derives this width from "
                f"others, e.g. head size = hidden / heads, or Bloom's MLP = 4 x hidden); export to pt2 keeps it")
        state[key] = value.contiguous()
    return config, state


def export_hf(gm: torch.fx.GraphModule, directory, tokenizer=None) -> Path:
    """Write `gm` as a Hugging Face checkpoint directory (config.json, model.safetensors, generation
    config, and the tokenizer's files when `tokenizer` is given). Refuses, writing nothing, when the
    family's config cannot express the plan or `directory` exists and is not empty."""
    base = base_of(gm)
    family = family_of(base["config"])
    cls = model_class(base)
    check_free(directory)
    shapes = {k: tuple(v.shape) for k, v in gm.state_dict().items()}
    config = exported_config(base, family, shapes)
    config, state = hf_state(gm, cls, config)
    dtype = next(gm.parameters()).dtype
    with staged_directory(directory) as tmp:
        model = cls(cls.config_class.from_dict(config))
        model.load_state_dict(state, strict=False)
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
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    if not err < tolerance:
        raise ExportError(f"{type(model).__name__} loaded from the exported config does not reproduce the pruned "
                          f"model (relative logit error {err:.2e} > {tolerance}): its config cannot express this plan")


def check_hf_expressible(base: dict, shapes: dict) -> None:
    """The width checks of export_hf from the base description and tensor shapes alone (no model
    needed: the CLI runs them on a saved directory's safetensors header before loading it)."""
    exported_config(base, family_of(base["config"]), shapes)
