"""Where the command line's data comes from, decided before any model is loaded.

Order for each need: a file named by a flag (must exist: otherwise an error naming the path and the
flag), then the data directory (--data-dir or FXPRUNE_DATA_DIR), then a fallback: the C4 sample packaged
inside fxprune for calibration, the Hugging Face hub through `datasets` for WikiText-2 when `datasets`
is installed and the hub answers (or the set is in its cache). Evaluation that finds no data is
skipped with a line saying why; nothing waits on an unreachable network for more than a few seconds.
"""
from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from fxprune.data.loaders import DATA_ENV, PACKAGED_C4, data_dir, packaged_calibration_texts

C4_FILE = Path("c4") / "c4_sample.json"
WIKITEXT_FILE = Path("wikitext-2-raw") / "wiki.test.raw"
# (dataset, config, split) on the Hugging Face hub; rows joined by "\n\n" as the local raw file is.
HF_WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
HUB_HOST = "huggingface.co"


@dataclass
class Source:
    """Data for one need: `value` (a path, or a list of texts) and where it came from, or `skip` with the reason."""
    value: object = None
    origin: str = ""
    skip: str = ""


def data_root(flag_value):
    """(root or None, the flag that names it). A given directory must exist (FileNotFoundError names it)."""
    if flag_value is None and not os.environ.get(DATA_ENV):
        return None, ""
    flag = "--data-dir" if flag_value is not None else DATA_ENV
    return data_dir(flag_value), flag


def _named_file(path, flag) -> Source:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found (set by {flag})")
    return Source(p, f"{p} ({flag})")


def calibration_source(calib_data=None, data_dir_flag=None) -> Source:
    """Calibration texts: --calib-data FILE, else <data dir>/c4/c4_sample.json, else the packaged C4 sample."""
    if calib_data == "packaged":
        return Source(packaged_calibration_texts(), f"packaged C4 sample ({PACKAGED_C4.name})")
    if calib_data is not None and calib_data.startswith("hf:"):
        return hub_texts(calib_data, "--calib-data")
    if calib_data is not None:
        return _named_file(calib_data, "--calib-data")
    root, flag = data_root(data_dir_flag)
    if root is None:
        return Source(packaged_calibration_texts(), f"packaged C4 sample ({PACKAGED_C4.name}; no --data-dir or {DATA_ENV})")
    return _named_file(root / C4_FILE, f"{flag}, which holds c4/c4_sample.json")


def wikitext_source(eval_data=None, data_dir_flag=None, hub_timeout: float = 3.0) -> Source:
    """WikiText-2 test text: --eval-data FILE, else <data dir>/wikitext-2-raw/wiki.test.raw, else the hub via
    `datasets`, else a skip with the reason."""
    if eval_data is not None:
        return _named_file(eval_data, "--eval-data")
    root, flag = data_root(data_dir_flag)
    if root is not None:
        path = root / WIKITEXT_FILE
        if path.is_file():
            return Source(path, f"{path} ({flag})")
        return Source(skip=f"no WikiText-2 file at {path} (the data directory from {flag}); pass --eval-data FILE")
    rows, why = hf_rows(*HF_WIKITEXT, timeout=hub_timeout)
    if rows is not None:
        return Source(rows, f"Hugging Face datasets {HF_WIKITEXT[0]} {HF_WIKITEXT[1]} {HF_WIKITEXT[2]}")
    return Source(skip=f"no WikiText-2 data: no --eval-data, --data-dir or {DATA_ENV}, and {why}")


def hub_texts(spec: str, flag: str) -> Source:
    """Texts of a Hugging Face dataset named "hf:NAME[:CONFIG[:SPLIT[:FIELD]]]" (split "train", field "text" by
    default); FileNotFoundError naming the flag when `datasets` or the data cannot be had."""
    parts = spec[3:].split(":")
    if not parts[0]:
        raise ValueError(f"{flag} {spec!r}: expected hf:NAME[:CONFIG[:SPLIT[:FIELD]]]")
    name, config, split, field = (parts + [None, "train", "text"][len(parts) - 1:])[:4]
    rows, why = hf_rows(name, config or None, split, field)
    if rows is None:
        raise FileNotFoundError(f"{spec} (set by {flag}) cannot be read: {why}")
    return Source([r for r in rows if r.strip()], f"Hugging Face datasets {name} {config or ''} {split}")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers a TCP connection within `timeout` seconds (name lookup included:
    it runs in a daemon thread, so a lookup that hangs cannot hold the caller)."""
    ok = []

    def probe():
        try:
            socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def _maybe_cached(name: str) -> bool:
    """Whether `datasets` may have `name` cached (its own cache or the hub's): a cheap check that spares
    importing `datasets` (seconds) when offline with nothing to read."""
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    candidates = [Path(os.environ.get("HF_DATASETS_CACHE", hf_home / "datasets")) / name.replace("/", "___"),
                  Path(os.environ.get("HF_HUB_CACHE", hf_home / "hub")) / ("datasets--" + name.replace("/", "--"))]
    return any(p.exists() for p in candidates)


def hf_rows(name: str, config: str, split: str, field: str = "text", timeout: float = 3.0):
    """(rows, "") from Hugging Face `datasets`, or (None, reason) when it is not installed or the set cannot be
    had: offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, or the hub unreachable) it reads the local cache only."""
    import importlib.util
    if importlib.util.find_spec("datasets") is None:
        return None, "Hugging Face `datasets` is not installed"
    offline = any(os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline and not hub_reachable(timeout):
        offline = True
    if offline and not _maybe_cached(name):
        return None, f"{name} ({config}, {split}): the hub is unreachable and the set is not in the datasets cache"
    if offline:  # the cache only, without touching the network (read at import, and patched if imported already)
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets
    if offline:
        datasets.config.HF_DATASETS_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        rows = datasets.load_dataset(name, config, split=split)[field]
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError...)
        where = "the hub is unreachable and the set is not in the datasets cache" if offline else "loading failed"
        return None, f"{name} ({config}, {split}): {where} ({type(exc).__name__})"
    return list(rows), ""
