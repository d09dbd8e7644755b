"""Perplexity, zero-shot multiple choice (lm-evaluation-harness formats) and plain generation.

`model` is any callable `model(input_ids, attention_mask=None)` whose result has `.logits`: a Hugging Face
causal LM or the torch.fx GraphModule fxprune emits (which has no KV cache, so nothing here uses one).
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import torch.nn.functional as F

from fxprune.util.lm import model_logits as _logits
from fxprune.evaluation.tasks import TASKS, Doc, load_task, score_docs, task_file  # noqa: F401 (re-exported)


def _progress(items, enabled: bool, desc: str, total=None):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are a nicety, never a dependency
        return items
    return tqdm(items, desc=desc, total=total)


def _max_length(model, max_length):
    if max_length is not None:
        return int(max_length)
    return int(getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048)


# --- perplexity ----------------------------------------------------------------------------------------

def wikitext_rows(path) -> list[str]:
    """The rows Hugging Face `datasets` makes of a WikiText raw file: one per line, newline kept, blank
    lines as "". Joined with "\\n\\n" they give the text every published WikiText perplexity is measured on."""
    with open(path, encoding="utf-8", newline="") as f:
        return [line if line.strip() else "" for line in f]


def eval_text(text_or_path) -> str:
    """A file (Path, or a str naming an existing file) or a list of rows -> rows joined by "\\n\\n"; a str -> itself."""
    if isinstance(text_or_path, os.PathLike) or (
            isinstance(text_or_path, str) and "\n" not in text_or_path and len(text_or_path) < 4096
            and os.path.isfile(text_or_path)):
        return "\n\n".join(wikitext_rows(text_or_path))
    if isinstance(text_or_path, str):
        return text_or_path
    return "\n\n".join(text_or_path)


def _leading_tokens(tokenizer, text: str, max_tokens=None) -> list[int]:
    """The first `max_tokens` tokens of `text` (all without a limit), tokenising only a prefix of it: a
    prefix cut at a paragraph break whose tokens run 64 past the limit has the same leading tokens as the
    whole text (tokenisers merge within words), at a fraction of the cost for a 1.3M-character corpus."""
    chars = 16 * max_tokens if max_tokens is not None else len(text)
    while True:
        cut = len(text) if chars >= len(text) else max(text.find("\n\n", chars), chars)
        ids = tokenizer(text[:cut], verbose=False)["input_ids"]
        if cut >= len(text) or len(ids) >= max_tokens + 64:
            return ids if max_tokens is None else ids[:max_tokens]
        chars *= 2


def eval_windows(tokenizer, text_or_path, window: int = 128, max_tokens=None) -> torch.LongTensor:
    """LLM-Pruner's protocol: tokenise the whole text once, keep the first `max_tokens` tokens, cut into
    non-overlapping windows of `window` tokens and drop the incomplete last one. Returns [n, window]."""
    ids = _leading_tokens(tokenizer, eval_text(text_or_path), max_tokens)
    n = len(ids) // window
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens (after max_tokens), fewer than one window of {window}")
    return torch.tensor(ids[:n * window], dtype=torch.long).view(n, window)


@torch.inference_mode()
def window_nlls(model, windows: torch.LongTensor, batch_size: int = 8, device="cpu", progress: bool = False) -> list[float]:
    """Summed next-token NLL of each window (window - 1 predictions each), in fp64."""
    out = []
    batches = windows.split(batch_size)
    for batch in _progress(batches, progress, "perplexity", len(batches)):
        batch = batch.to(device)
        logits = _logits(model, batch, torch.ones_like(batch))
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none")
        out += nll.double().sum(-1).tolist()
    return out


def perplexity(model, tokenizer, text_or_path, window: int = 128, max_tokens=None, batch_size: int = 8,
               device="cpu", progress: bool = False) -> float:
    """exp(mean NLL) over every predicted token (window - 1 per window) of `eval_windows(...)`."""
    nlls = window_nlls(model, eval_windows(tokenizer, text_or_path, window, max_tokens), batch_size, device, progress)
    return math.exp(sum(nlls) / (len(nlls) * (window - 1)))


def perplexities(model, tokenizer, text_or_path, token_counts: Sequence[int], window: int = 128,
                 batch_size: int = 8, device="cpu", progress: bool = False) -> dict[int, float]:
    """{n: perplexity over the first n tokens} for each n, from one pass over the largest: the windows of a
    shorter prefix are the leading windows of a longer one, so each value equals `perplexity(max_tokens=n)`."""
    counts = sorted(set(int(n) for n in token_counts))
    if not counts or counts[0] < window:
        raise ValueError(f"token counts {list(token_counts)} must each hold at least one window of {window}")
    nlls = window_nlls(model, eval_windows(tokenizer, text_or_path, window, counts[-1]), batch_size, device, progress)
    result = {}
    for n in counts:
        k = min(n // window, len(nlls))
        result[n] = math.exp(sum(nlls[:k]) / (k * (window - 1)))
    return result


# --- log-likelihood of continuations --------------------------------------------------------------------

def _prefix_token(tokenizer) -> int:
    tok = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tok is None:
        raise ValueError("an empty context needs a tokenizer with a bos_token or eos_token to condition on")
    return tok


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) exactly as lm-evaluation-harness (0.4.13, HFLM) splits them: trailing
    spaces of the context move to the continuation; the pair is encoded whole with the tokenizer's own special
    tokens (a BOS where the tokenizer adds one, unless the text already starts with it) and cut at the
    context's length, so merges across the boundary are tokenised as the model would see them. An empty
    context becomes the BOS (or EOS) token, unless the continuation already starts with it."""
    if not continuation:
        raise ValueError(f"empty continuation for context {context[-60:]!r}")

    def enc(s, special=True):
        bos = tokenizer.bos_token
        if special and bos and s.startswith(bos):
            special = False
        return tokenizer(s, add_special_tokens=special, verbose=False)["input_ids"]

    if context == "":
        prefix, cont = _prefix_token(tokenizer), enc(continuation, special=False)
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, ctx = enc(context + continuation), enc(context)
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def _score_pairs(model, pairs, batch_size, device, max_length, pad_id, progress):
    """Sum of log p(continuation | context) and whether greedy decoding would produce it, per token pair."""
    results = [None] * len(pairs)
    # Longest first: similar lengths share a batch (little padding) and memory peaks at once, early.
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    for idx in _progress(batches, progress, "loglikelihood", len(batches)):
        rows = []
        for i in idx:
            ctx, cont = pairs[i]
            if len(cont) > max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens exceeds max_length {max_length}")
            rows.append((ctx + cont)[-(max_length + 1):][:-1])  # keep the latest context, as lm-eval does
        # Right padding never changes a causal model's logits at real positions; the width of at least 2
        # serves the exported graph, whose sequence dimension starts at 2.
        width = max(2, max(len(r) for r in rows))
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r)
            mask[b, :len(r)] = 1
        logits = _logits(model, ids.to(device), mask.to(device))
        for b, i in enumerate(idx):
            cont = torch.tensor(pairs[i][1], device=logits.device)
            n = len(rows[b])
            logp = logits[b, n - len(cont):n].log_softmax(-1)
            ll = logp.gather(-1, cont[:, None]).sum().item()
            results[i] = (ll, bool((logp.argmax(-1) == cont).all()))
    return results


def loglikelihood(model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 8, device="cpu",
                  max_length=None, progress: bool = False) -> list[tuple[float, bool]]:
    """lm-eval's `loglikelihood`: for each (context, continuation), (sum log-prob of the continuation, is greedy)."""
    pairs = [encode_pair(tokenizer, c, x) for c, x in requests]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return _score_pairs(model, pairs, batch_size, device, _max_length(model, max_length), pad, progress)


def loglikelihood_rolling(model, tokenizer, text: str, batch_size: int = 8, device="cpu", max_length=None) -> float:
    """lm-eval's `loglikelihood_rolling`: log-prob of the whole text, scored in disjoint windows of
    max_length predicted tokens, the first conditioned on the BOS (or EOS) token."""
    L = _max_length(model, max_length)
    toks = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    pairs = []
    for k in range(0, len(toks), L):
        end = min(k + L, len(toks))
        # Each window sees the L tokens before its last prediction (the last window overlaps its predecessor).
        ctx = toks[end - L - 1:k] if k else [_prefix_token(tokenizer)]
        pairs.append((ctx, toks[k:end]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return sum(ll for ll, _ in _score_pairs(model, pairs, batch_size, device, L, pad, False))


# --- zero-shot tasks (formats and parsers in fxprune.evaluation.tasks) ----------------------------------------------

def zero_shot(model, tokenizer, task: str, path_or_dir=None, limit=None, batch_size: int = 8, device="cpu",
              max_length=None, progress: bool = False) -> dict:
    """Accuracy on a multiple-choice task as lm-evaluation-harness computes it (fxprune.evaluation.tasks): acc, the
    choice with the highest summed continuation log-likelihood; acc_norm, the highest log-likelihood per
    character of the choice string. Ties go to the first choice. Returns {"acc", "acc_stderr", "acc_norm",
    "acc_norm_stderr", "n"} (standard errors as lm-eval's: sample standard deviation / sqrt(n))."""
    docs = load_task(task, path_or_dir, limit)
    flat = [req for d in docs for req in d.requests]
    lls = [ll for ll, _ in loglikelihood(model, tokenizer, flat, batch_size, device, max_length, progress)]
    return score_docs(docs, lls)


# --- generation -----------------------------------------------------------------------------------------

@torch.inference_mode()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (),
             device="cpu") -> str:
    """The text generated after `prompt`, re-running the whole sequence each step (no KV cache). Stops at
    EOS, after `max_new_tokens`, or at the first of the `stop` strings (which is cut off)."""
    if do_sample and temperature <= 0:
        raise ValueError(f"sampling needs temperature > 0, got {temperature}; use do_sample=False for greedy")
    gen = torch.Generator().manual_seed(seed)  # a private RNG: the same seed, the same text
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    start = ids.shape[1]
    text = ""
    for _ in range(max_new_tokens):
        logits = _logits(model, ids, torch.ones_like(ids))[0, -1]
        if do_sample:
            probs = (logits / temperature).softmax(-1).cpu()
            if top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
                drop = sorted_p.cumsum(0) - sorted_p >= top_p
                probs[order[drop]] = 0.0
            nxt = torch.multinomial(probs, 1, generator=gen).item()
        else:
            nxt = int(logits.argmax())
        if nxt == tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]], device=ids.device)], dim=1)
        text = tokenizer.decode(ids[0, start:], skip_special_tokens=True)
        hits = [text.index(s) for s in stop if s and s in text]
        if hits:
            return text[:min(hits)]
    return text


# --- lm-evaluation-harness adapter ----------------------------------------------------------------------

def _lm_eval_class():
    try:
        from lm_eval.api.model import LM
    except ImportError as exc:
        raise ImportError("lm_eval_model needs lm-evaluation-harness: pip install lm_eval") from exc

    class LMEvalWrapper(LM):
        """lm-eval's LM interface over `model` + `tokenizer`, using this module's functions."""

        def __init__(self, model, tokenizer, batch_size=8, device="cpu", max_length=None):
            super().__init__()
            self.model, self.tokenizer = model, tokenizer
            self.batch_size, self._run_device, self.max_length = batch_size, device, max_length

        @property
        def device(self):  # lm-eval's LM defines `device` as a read-only property
            return self._run_device

        def loglikelihood(self, requests, disable_tqdm=False):
            return loglikelihood(self.model, self.tokenizer, [r.args for r in requests], self.batch_size,
                                 self.device, self.max_length, progress=not disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return [loglikelihood_rolling(self.model, self.tokenizer, r.args[0], self.batch_size, self.device,
                                          self.max_length) for r in requests]

        def generate_until(self, requests, disable_tqdm=False):
            out = []
            for r in requests:
                context, kwargs = r.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                temperature = float(kwargs.get("temperature", 0.0) or 0.0)
                out.append(generate(self.model, self.tokenizer, context,
                                    max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
                                    do_sample=bool(kwargs.get("do_sample", False)) and temperature > 0,
                                    temperature=temperature or 1.0, top_p=float(kwargs.get("top_p", 1.0)),
                                    stop=until, device=self.device))
            return out

    return LMEvalWrapper


def lm_eval_model(model, tokenizer, batch_size: int = 8, device="cpu", max_length=None):
    """An `lm_eval.api.model.LM` for `lm_eval.simple_evaluate(model=...)`; ImportError if lm_eval is missing."""
    return _lm_eval_class()(model, tokenizer, batch_size=batch_size, device=device, max_length=max_length)


def __getattr__(name):
    # `from fxprune.evaluation.evaluate import LMEvalWrapper` works only where lm_eval is installed.
    if name == "LMEvalWrapper":
        return _lm_eval_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
