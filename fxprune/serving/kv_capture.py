"""Capture a decode-capable program of a causal LM: prefill and one-token steps over a static KV cache.

`CachedLM` wraps the model with a transformers `StaticCache` whose key/value tensors are registered
as buffers and handed to the cache layers at every call, so torch.export sees them as buffers that
the graph updates in place (`index_copy_`). Dimension propagation follows those updates (the
`index_copy` rule), so the cache buffers carry the KV-head atoms and the rewrite slices them with the
same plan: the pruned cache holds only the kept KV heads. Unlike transformers' ExecuTorch recipe
(`TorchExportableModuleWithStaticCache`, which passes no attention mask), the program takes a
[batch, cache length] padding mask and position ids, so batches may be left padded.
"""
from __future__ import annotations

import torch

from fxprune.analysis.capture import CaptureError, Captured, drop_input_guards

CACHE_PREFIXES = ("key_cache_", "value_cache_", "cumulative_length_")


def family_of(model) -> str:
    """The model's transformers `model_type`, or its class name, for messages."""
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def window_layer(max_len: int):
    """A transformers `StaticLayer` whose attention reads only the first `window` cache positions (the
    filled part: the length of the step's cache mask), so a step costs what the tokens so far need."""
    from transformers.cache_utils import StaticLayer

    class WindowLayer(StaticLayer):
        window = max_len

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            return keys[:, :, :self.window], values[:, :, :self.window]

        def get_mask_sizes(self, query_length):
            return self.window, 0

    return WindowLayer(max_len)


class CachedLM(torch.nn.Module):
    """`forward(input_ids [B, S], cache_mask [B, W], position_ids [B, S], start)` -> logits [B, S, V] ([B, 1, V],
    the last position's, with `last_logits` where the model takes transformers' `logits_to_keep`); writes the
    keys/values of the S tokens at cache positions start..start+S-1 and attends over the first W positions
    (W <= the cache's length L; W = start + S reads exactly the filled part)."""

    def __init__(self, model: torch.nn.Module, batch: int, max_len: int, last_logits: bool = False):
        super().__init__()
        import inspect
        from transformers.cache_utils import StaticCache
        self.model = model
        # Generation reads the last position's logits only: the head then runs on one position per row, not on
        # the whole prompt (the head is the largest projection of a small model).
        self.keep = {"logits_to_keep": 1} if last_logits and \
            "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        # Every layer a full (windowed) static layer: sliding-window layers branch on Python values (as the
        # ExecuTorch recipe does; a sliding window is then applied by the mask only).
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.cache.layers = [window_layer(max_len) for _ in self.cache.layers]
        ids = torch.ones(batch, 1, dtype=torch.long, device=next(model.parameters()).device)
        try:
            with torch.no_grad():  # one eager step allocates each layer's cache with the shapes it writes
                model(input_ids=ids, cache=self.cache, use_cache=True)
        except Exception as exc:
            raise CaptureError(f"{family_of(model)}: the model cannot run with a transformers StaticCache "
                               f"({type(exc).__name__}: {exc}); use fxprune.evaluation.generate (recompute, "
                               "no cache) for this family") from exc
        unused = [i for i, layer in enumerate(self.cache.layers) if not layer.is_initialized]
        if unused:
            raise CaptureError(f"{family_of(model)}: the model never wrote its KV cache (layers {unused[:4]} "
                               "unused: its attention does not call Cache.update); use fxprune.evaluation.generate")
        for i, layer in enumerate(self.cache.layers):
            self.register_buffer(f"key_cache_{i}", layer.keys.zero_(), persistent=False)
            self.register_buffer(f"value_cache_{i}", layer.values.zero_(), persistent=False)
            self.register_buffer(f"cumulative_length_{i}", layer.cumulative_length.zero_(), persistent=False)

    def forward(self, input_ids, cache_mask, position_ids, start):
        """Logits of one step (prefill or decode) of `input_ids` at `position_ids`, writing their keys and values
        into the cache buffers from slot `start`; `cache_mask` marks the slots to attend."""
        for i, layer in enumerate(self.cache.layers):
            # The buffers themselves (export's stand-ins while tracing): their in-place updates are buffer mutations.
            layer.keys, layer.values = getattr(self, f"key_cache_{i}"), getattr(self, f"value_cache_{i}")
            layer.cumulative_length = getattr(self, f"cumulative_length_{i}")
            layer.cumulative_length.copy_(start)
            layer.window = cache_mask.shape[1]  # attend over the positions the mask covers, not the whole cache
        out = self.model(input_ids=input_ids, attention_mask=cache_mask, position_ids=position_ids,
                         cache=self.cache, use_cache=True, **self.keep)
        return out.logits


def example_step(batch: int, max_len: int, seq: int, window: int, device):
    """Example inputs of one prefill step of `seq` tokens attending over `window` cache slots: ids, cache mask,
    positions, start."""
    ids = torch.ones(batch, seq, dtype=torch.long, device=device)
    mask = torch.zeros(batch, window, dtype=torch.long, device=device)
    mask[:, :seq] = 1
    pos = torch.arange(seq, device=device).expand(batch, seq).contiguous()
    return ids, mask, pos, torch.tensor(0, device=device)


def capture_cached(model: torch.nn.Module, batch: int, max_len: int, last_logits: bool = False) -> Captured:
    """Export `CachedLM(model, last_logits=...)` with a dynamic step length and a dynamic attended window
    (1..max_len - 1): the same program runs the prompt (prefill) and every one-token decode step, each attending
    over the `cache_mask.shape[1]` first cache positions only."""
    wrapper = CachedLM(model, batch, max_len, last_logits)
    device = next(model.parameters()).device
    seq = torch.export.Dim("seq", min=1, max=max_len)
    # A window of the whole cache would make the slice a no-op, which export guards on: the last token
    # generated is never fed back, so a window of max_len - 1 covers a cache of max_len.
    window = torch.export.Dim("window", min=1, max=max_len - 1)
    # Example sizes distinct from each other and from max_len, so that export specialises none of them.
    example = example_step(batch, max_len, min(3, max_len), min(5, max_len), device)
    dynamic = ({1: seq}, {1: window}, {1: seq}, None)
    was_training = model.training
    model.eval()
    emit_traces = torch.fx.config.do_not_emit_stack_traces
    torch.fx.config.do_not_emit_stack_traces = True  # no pass reads a node's stack trace; recording one is slow
    try:
        ep = torch.export.export(wrapper, example, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        raise CaptureError(f"{family_of(model)}: torch.export could not trace the KV-cache step "
                           f"({type(exc).__name__}: {str(exc)[:400]}); use fxprune.evaluation.generate") from exc
    finally:
        torch.fx.config.do_not_emit_stack_traces = emit_traces
        model.train(was_training)
    gm = ep.module()
    drop_input_guards(gm)
    return Captured(gm, ep)
