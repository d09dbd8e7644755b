"""KV-cache generation of a pruned model: `Generator` and `generate`.

The pruned GraphModule (or a saved directory, read without rebuilding the model) carries its plan and the base
model's description; the base is rebuilt without weights, a program with a static KV cache that runs the prompt
and then one token per step is captured from it (`kv_capture`), the plan is replayed on it (`replay`) and
rewritten, and the pruned weights are copied in. A program is built per batch size and kept; it attends only
over the filled part of its cache, so one program serves every cache length (its buffers grow on demand).
Built programs go to a `ProgramStore` on disk (without weights), so a later Generator of the same plan, in this
process or another, copies its weights into the stored program instead of capturing again.
`generate` keeps its Generators per GraphModule and per saved directory. Families whose attention does not use
transformers' Cache raise a CaptureError naming the family; `fxprune.evaluation.generate` (recompute, no cache)
still serves them.
"""
from __future__ import annotations

import json
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from fxprune.analysis.analyze import analyze_captured
from fxprune.analysis.meta_keys import BASE_KEY, PLAN_KEY
from fxprune.passes.cache_signature import CacheSignaturePass
from fxprune.passes.drop_identity_ops import DropIdentityOpsPass
from fxprune.passes.grouped_attention import GroupedAttentionPass
from fxprune.serving.kv_capture import CACHE_PREFIXES, capture_cached
from fxprune.serving.program_store import ProgramStore, default_folder, program_key
from fxprune.serving.replay import replay_kept
from fxprune.rewrite.emit import rewrite

CACHE_LENGTH_DIM = 2  # transformers' static cache layers are [batch, KV heads, length, head_dim]
CAPTURE_LEN = 64  # the cache length traced; programs then take any length
WRAPPED = "model."  # CachedLM holds the model as `model`: the prefix of every model tensor in its programs


@dataclass
class Program:
    """The pruned KV-cache step: `step(input_ids [B, S], cache_mask [B, L], position_ids [B, S], start)`
    -> the last position's logits [B, 1, V] (all S positions' for a family whose head takes no
    `logits_to_keep`), for S = the prompt length (prefill) or 1 (decode)."""
    step: torch.fx.GraphModule
    batch: int
    max_len: int

    def cache_buffers(self) -> dict[str, torch.Tensor]:
        """The KV-cache buffers of the step program, by name."""
        return {n: t for n, t in self.step.named_buffers() if n.startswith(CACHE_PREFIXES[:2])}

    def cache_bytes(self) -> int:
        """Memory the KV cache takes, in bytes."""
        return sum(t.numel() * t.element_size() for t in self.cache_buffers().values())

    def reserve(self, max_len: int) -> None:
        """Cache buffers of at least `max_len` positions, zeroed when they grow (the graph reads only the
        filled window, never the buffers' length, so any length serves)."""
        if max_len <= self.max_len:
            return
        for name, t in self.cache_buffers().items():
            shape = list(t.shape)
            shape[CACHE_LENGTH_DIM] = max_len
            self.step.register_buffer(name, t.new_zeros(shape), persistent=False)
        self.max_len = max_len


def original_name(name: str) -> str | None:
    """The model's own tensor name for a name in the cached program, or None for the program's own buffers."""
    return name[len(WRAPPED):] if name.startswith(WRAPPED) else None


def model_tensors(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `gm` by name, tied ones under each of their names."""
    return dict(list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)))


def copy_weights(program: torch.fx.GraphModule, state: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
    """Fill the program's model tensors (uninitialised until now) from the pruned model's, by name (a tied tensor
    under its other name, `aliases`: name -> the name `state` may hold it under); a bias the reconstruction gave a
    projection is given to the program's projection first."""
    from fxprune.serialization import add_reconstruction_biases
    add_reconstruction_biases(program, {WRAPPED + k: v for k, v in state.items() if k.endswith(".bias")})
    with torch.no_grad():
        for name, t in model_tensors(program).items():
            source = original_name(name)
            if source is None:
                continue
            if source not in state:
                source = aliases.get(source, source)
            if source not in state:
                raise ValueError(f"the pruned model has no tensor {source} that the KV-cache program reads")
            if tuple(state[source].shape) != tuple(t.shape):
                raise ValueError(f"{source}: the pruned model has shape {tuple(state[source].shape)}, "
                                 f"the KV-cache program expects {tuple(t.shape)}")
            t.copy_(state[source])


_CAPTURES: dict = {}  # analysed KV-cache captures, shared by the Generators of one base model (a few kept)
KEEP_CAPTURES = 4


def analysed_capture(base: dict, dtype, batch: int):
    """The dependency analysis of the KV-cache capture of the base model `base` describes. Captured once per
    (model, dtype, batch): plans of the same model (20% and 50%, rounded or not) replay on it."""
    from fxprune.serialization import rebuild_base
    key = (base["architecture"], json.dumps(base["config"], sort_keys=True, default=str), str(dtype), batch)
    if key not in _CAPTURES:
        model = rebuild_base(base["architecture"], base["config"], dtype)
        _CAPTURES[key] = analyze_captured(capture_cached(model, batch, CAPTURE_LEN, last_logits=True), model)
        while len(_CAPTURES) > KEEP_CAPTURES:
            _CAPTURES.pop(next(iter(_CAPTURES)))
    return _CAPTURES[key]


def pruned_step(base: dict, plan, dtype, batch: int) -> tuple[torch.fx.GraphModule, dict[str, str]]:
    """The KV-cache step of `base`'s model for `batch` rows with `plan` replayed and rewritten (its model tensors
    not yet filled), and its tied tensors' aliases (the model's names: alias -> canonical)."""
    from fxprune.serving.kv_capture import family_of
    dg = analysed_capture(base, dtype, batch)
    kept = replay_kept(dg, plan, original_name, f"the KV-cache capture of {family_of(dg.model)}")
    aliases = {original_name(a): original_name(c) for a, c in dg.aliases.items()
               if original_name(a) is not None and original_name(c) is not None}
    # Every op of a step runs once per token: the last two passes leave fewer of them.
    step = rewrite(dg, kept, finish=[CacheSignaturePass(), GroupedAttentionPass(), DropIdentityOpsPass()])
    return step.eval(), aliases


def build_program(base: dict, plan, state, dtype, batch: int, device, store: ProgramStore) -> Program:
    """The pruned KV-cache program of `plan` for `batch` rows: read from `store`, else captured, rewritten and
    stored; the pruned weights copied in from `state`, the cache zeroed and moved to `device`. The cache length
    is not part of the program."""
    key = program_key(base, plan, dtype, batch, CAPTURE_LEN)
    stored = store.fetch(key, batch)
    if stored is None:
        stored = pruned_step(base, plan, dtype, batch)
        store.store(key, batch, *stored, is_weight=lambda name: original_name(name) is not None)
    step, aliases = stored
    program = Program(step.eval(), batch, CAPTURE_LEN)
    copy_weights(program.step, state, aliases)
    for t in program.cache_buffers().values():
        t.zero_()
    program.step.to(device)
    return program


def pick_next(logits, do_sample, temperature, top_k, top_p, rng) -> torch.Tensor:
    """Next token per row: argmax, or a sample after temperature, top-k and top-p (nucleus) filtering."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = logits.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the most likely token always stays
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1).cpu()
    return torch.multinomial(probs, 1, generator=rng).squeeze(-1).to(logits.device)


def check_options(input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_p):
    """Raise `ValueError` for bad generation arguments (ids shape, mask shape or right padding, token count,
    sampling settings), before any work."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be a [batch, prompt length >= 1] tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
    if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("attention_mask must be left padded (the last position of every row a real token)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
        raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")


class Generator:
    """KV-cache generation for a pruned GraphModule (from `fxprune.compile/apply/load`) or a saved directory."""

    def __init__(self, source, device=None, cache_block: int = 64, store: ProgramStore | None = None):
        if isinstance(source, (str, Path)):
            from fxprune.serialization import read_saved
            self.plan, self.base, self.dtype, self.state = read_saved(source)  # the programs need no rebuilt model
            self.device = torch.device(device or "cpu")
        else:
            if PLAN_KEY not in source.meta or BASE_KEY not in source.meta:
                raise ValueError("Generator needs a GraphModule made by fxprune.apply/compile/load "
                                 "(it carries its plan and base model)")
            self.plan, self.base = source.meta[PLAN_KEY], source.meta[BASE_KEY]
            self.state = {k: t.detach() for k, t in model_tensors(source).items()}
            first = next(source.parameters())
            self.dtype, self.device = first.dtype, torch.device(device) if device else first.device
        self.store = store if store is not None else ProgramStore(default_folder())
        self.cache_block = cache_block  # cache lengths are rounded up to it, so the buffers grow in a few steps
        self._programs: dict[int, Program] = {}

    def program(self, batch: int, max_len: int) -> Program:
        """The KV-cache program for `batch` rows (built once) with a cache of at least `max_len` positions."""
        if batch not in self._programs:
            self._programs[batch] = build_program(self.base, self.plan, self.state, self.dtype, batch, self.device,
                                                  self.store)
        self._programs[batch].reserve(max_len)
        return self._programs[batch]

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_token_id=None,
                 pad_token_id=None, seed: int = 0, return_logits: bool = False):
        """Prompt plus new tokens, [batch, prompt + n]; rows that reached `eos_token_id` are filled with
        `pad_token_id` (default: the EOS id) and generation stops once every row has. Left padding
        (`attention_mask` zeros at the start of a row) gives each row the tokens it would get alone.
        `return_logits=True` also returns the logits of every step, [batch, n, vocab]."""
        check_options(input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_p)
        batch, prompt = input_ids.shape
        length = -(-(prompt + max_new_tokens) // self.cache_block) * self.cache_block
        with torch.inference_mode(False):  # the program's tensors must be ordinary ones (torch.compile, training)
            step = self.program(batch, length).step
        with torch.inference_mode():
            return self._decode(step, input_ids, attention_mask, length, max_new_tokens, do_sample, temperature,
                                top_k, top_p, eos_token_id, pad_token_id, seed, return_logits)

    def _decode(self, step, input_ids, attention_mask, length, max_new_tokens, do_sample, temperature, top_k,
                top_p, eos_token_id, pad_token_id, seed, return_logits):
        """The prefill, then one step per token (see `generate`)."""
        ids = input_ids.to(self.device)
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(self.device)
        batch, prompt = ids.shape
        cache_mask = torch.zeros(batch, length, dtype=torch.long, device=self.device)
        cache_mask[:, :prompt] = mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = step(ids, cache_mask[:, :prompt], positions, torch.tensor(0, device=self.device))[:, -1]
        position = positions[:, -1:] + 1
        rng = torch.Generator().manual_seed(seed)
        pad = eos_token_id if pad_token_id is None else pad_token_id
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        new, steps = [], []
        for t in range(max_new_tokens):
            steps.append(logits.float())
            token = pick_next(logits, do_sample, temperature, top_k, top_p, rng)
            if eos_token_id is not None:
                token = torch.where(done, torch.full_like(token, pad if pad is not None else 0), token)
                done |= token == eos_token_id
            new.append(token)
            if t == max_new_tokens - 1 or bool(done.all()):
                break
            cache_mask[:, prompt + t] = 1
            # The filled part of the cache only: the program attends over as many positions as the mask has.
            filled = cache_mask[:, :prompt + t + 1]
            logits = step(token[:, None], filled, position, torch.tensor(prompt + t, device=self.device))[:, -1]
            position = position + 1
        out = torch.cat([ids, torch.stack(new, 1)], 1)
        return (out, torch.stack(steps, 1)) if return_logits else out


_BY_MODULE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # GraphModule -> (weights' signature, Generator)
_BY_DIRECTORY: dict = {}  # (path, files' mtimes) -> Generator, the latest few
KEEP_DIRECTORIES = 4


def weights_signature(gm: torch.nn.Module) -> tuple:
    """Changes when a tensor of `gm` is replaced or written in place (training, a merged LoRA): the programs'
    copies of the weights are then stale."""
    return tuple((name, t.data_ptr(), t._version) for name, t in model_tensors(gm).items())


def generator_for(source) -> Generator:
    """The Generator `generate` keeps for a GraphModule (while its weights are unchanged) or a saved directory
    (while its files are), so later calls reuse the captured programs."""
    if not isinstance(source, (str, Path)):
        signature = weights_signature(source)
        kept = _BY_MODULE.get(source)
        if kept is None or kept[0] != signature:
            kept = _BY_MODULE[source] = (signature, Generator(source))
        return kept[1]
    from fxprune.serialization import FILES
    path = Path(source).resolve()
    if not all((path / f).is_file() for f in FILES):
        return Generator(path)  # read_saved names what is missing
    key = (str(path), tuple(os.stat(path / f).st_mtime_ns for f in FILES))
    if key not in _BY_DIRECTORY:
        _BY_DIRECTORY[key] = Generator(path)
        while len(_BY_DIRECTORY) > KEEP_DIRECTORIES:
            _BY_DIRECTORY.pop(next(iter(_BY_DIRECTORY)))
    return _BY_DIRECTORY[key]


def generate(source, input_ids, attention_mask=None, max_new_tokens: int = 32, **options):
    """`Generator(source).generate(...)`, with the Generator kept for later calls on the same GraphModule or
    directory (`generator_for`): only the first call captures and builds programs."""
    return generator_for(source).generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, **options)
