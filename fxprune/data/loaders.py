"""Calibration text and instruction data: loaders that validate formats and say which file is wrong.

No location is built in: every loader takes a path, and `data_dir()` resolves the optional
FXPRUNE_DATA_DIR setting for callers that want a default data directory.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Sequence, Union

import torch

DATA_ENV = "FXPRUNE_DATA_DIR"
Source = Union[str, os.PathLike, Sequence[str]]


def data_dir(path=None) -> Path:
    """`path` if given, else the directory named by $FXPRUNE_DATA_DIR; it must exist."""
    origin = ""
    if path is None:
        path = os.environ.get(DATA_ENV)
        if not path:
            raise FileNotFoundError(f"no data directory given: pass a path or set the {DATA_ENV} environment "
                                    "variable to a directory holding the data files")
        origin = f" (from {DATA_ENV})"
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data directory {path}{origin} does not exist")
    return path


def read_text(path: Path) -> str:
    """A UTF-8 text file, gzip-compressed when its name ends in .gz."""
    if path.name.endswith(".gz"):
        import gzip
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    return path.read_text(encoding="utf-8")


def read_json_records(path) -> list:
    """A JSON array, or JSON Lines (one value per line), read from `path`; ValueError names the file and line."""
    path = Path(path)
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON array ({exc})") from None
        return records
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {lineno}: expected a JSON array or one JSON object per line "
                                 f"(JSON Lines), got invalid JSON ({exc.msg})") from None
    return records


PACKAGED_C4 = Path(__file__).parent / "resources" / "c4_calibration.jsonl.gz"  # see resources/README.md


def packaged_calibration_texts() -> list[str]:
    """The 300 C4 documents shipped inside the package: calibration when the user gives none."""
    return load_texts(PACKAGED_C4)


def load_texts(source: Source) -> list[str]:
    """Documents from a list of strings, a JSON array / JSON Lines file of {"text": ...}, or a plain text file.

    A plain text file is one document (windows are then drawn from anywhere in it).
    """
    if not isinstance(source, (str, os.PathLike)):
        texts = list(source)
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise ValueError(f"calibration texts: item {bad} is {type(texts[bad]).__name__}, expected str")
        return texts
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"calibration source {path} is not a file")
    if Path(path.name.removesuffix(".gz")).suffix.lower() not in (".json", ".jsonl"):
        return [read_text(path)]
    records = read_json_records(path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON array of {{\"text\": ...}} records, got {type(records).__name__}")
    for i, r in enumerate(records):
        if not (isinstance(r, dict) and isinstance(r.get("text"), str)):
            raise ValueError(f"{path}: record {i} is not a {{\"text\": <string>}} object "
                             f"(got {str(r)[:80]!r}); expected a JSON array or JSON Lines of such records")
    return [r["text"] for r in records]


def calibration_samples(source: Source, tokenizer, n_samples: int = 32, seq_len: int = 128,
                        seed: int = 0) -> torch.LongTensor:
    """`n_samples` random windows of exactly `seq_len` tokens, as LLM-Pruner draws them: a random document
    with at least `seq_len` tokens, then a random offset in it. Documents are drawn without replacement
    while unused long-enough ones remain, then again with replacement (e.g. one plain text file).
    The same seed gives the same windows; the global RNGs are untouched.
    """
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"n_samples and seq_len must be positive, got {n_samples} and {seq_len}")
    texts = load_texts(source)
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    cache: dict[int, list[int]] = {}
    long_enough: list[int] = []

    def ids(i):  # tokenise lazily: only as many documents as needed
        if i not in cache:
            cache[i] = tokenizer(texts[i], verbose=False)["input_ids"]
        return cache[i]

    samples = []
    for i in order:
        if len(samples) == n_samples:
            break
        if len(ids(i)) >= seq_len:
            long_enough.append(i)
            samples.append(i)
    if not long_enough:
        name = source if isinstance(source, (str, os.PathLike)) else "the given texts"
        raise ValueError(f"{name}: no document has {seq_len} tokens; use a shorter seq_len or longer texts")
    while len(samples) < n_samples:
        samples.append(rng.choice(long_enough))
    windows = []
    for i in samples:
        toks = ids(i)
        start = rng.randint(0, len(toks) - seq_len)
        windows.append(toks[start:start + seq_len])
    return torch.tensor(windows, dtype=torch.long)


# --- Alpaca instruction data -------------------------------------------------------------------------

PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def alpaca_records(path) -> list[dict]:
    """Records {"instruction", "input", "output"} (strings; "input" may be absent, read as "")."""
    path = Path(path)
    records = read_json_records(path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON array of Alpaca records, got {type(records).__name__}")
    out = []
    for i, r in enumerate(records):
        ok = (isinstance(r, dict) and isinstance(r.get("instruction"), str) and isinstance(r.get("output"), str)
              and isinstance(r.get("input", ""), str))
        if not ok:
            raise ValueError(f"{path}: record {i} is not an Alpaca record {{\"instruction\": str, "
                             f"\"input\": str (optional), \"output\": str}}; got {str(r)[:80]!r}")
        out.append({"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]})
    return out


def alpaca_prompt(record: dict) -> tuple[str, str]:
    """(prompt, prompt + output) with the standard Alpaca template; the input section only if input is set."""
    if record.get("input"):
        prompt = PROMPT_INPUT.format(instruction=record["instruction"], input=record["input"])
    else:
        prompt = PROMPT_NO_INPUT.format(instruction=record["instruction"])
    return prompt, prompt + record["output"]


def tokenize_alpaca(records, tokenizer, cutoff_len: int = 256, train_on_inputs: bool = False) -> list[dict]:
    """Tokenise as alpaca-lora / LLM-Pruner do: truncate to `cutoff_len`, append EOS when it fits, and
    (unless `train_on_inputs`) label the prompt tokens -100 so only the response is learnt."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenize_alpaca needs a tokenizer with an eos_token")

    def encode(text):
        return tokenizer(text, truncation=True, max_length=cutoff_len, verbose=False)["input_ids"]

    out = []
    for record in records:
        prompt, full = alpaca_prompt(record)
        ids = list(encode(full))
        if ids[-1:] != [eos] and len(ids) < cutoff_len:
            ids.append(eos)
        labels = list(ids)
        if not train_on_inputs:
            n_prompt = min(len(encode(prompt)), len(ids))
            labels[:n_prompt] = [-100] * n_prompt
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return out


# --- plain text for tuning ---------------------------------------------------------------------------

def pack_texts(texts, tokenizer, length: int = 256) -> list[dict]:
    """Documents tokenised, each followed by EOS, joined and cut into consecutive windows of `length` tokens
    (the last, shorter piece dropped): plain-text training data for `tune`, every token learnt. Packing
    rather than one document per example keeps every step at the same `length` tokens, whatever the
    documents' lengths; distillation from the dense model on such text is how Minitron recovers."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("pack_texts needs a tokenizer with an eos_token")
    if length < 2:
        raise ValueError(f"pack_texts: length must be >= 2, got {length}")
    stream = []
    for text in texts:
        stream += tokenizer(text, verbose=False)["input_ids"] + [eos]
    windows = [stream[i:i + length] for i in range(0, len(stream) - length + 1, length)]
    if not windows:
        raise ValueError(f"pack_texts: {len(stream)} tokens in all, fewer than one window of {length}")
    return [{"input_ids": w, "attention_mask": [1] * length, "labels": list(w)} for w in windows]

