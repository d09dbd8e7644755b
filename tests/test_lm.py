"""fxprune.lm: the one LM loss and logits helper behind scoring, LoRA and evaluation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fxprune.util.lm import IGNORE_INDEX, lm_loss, logits_of, model_logits


def test_loss_is_the_mean_over_valid_next_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g, requires_grad=True)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    full = F.cross_entropy(logits[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(lm_loss(logits, ids), full)
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX  # a prompt: positions 1 and 2 are no targets
    mask = torch.ones_like(ids)
    mask[1, 4] = 0  # right padding
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1), reduction="none").reshape(2, 4)
    keep = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    torch.testing.assert_close(lm_loss(logits, labels, mask), ce[keep].mean())
    # the padding given as labels -100 or as attention_mask 0 is the same loss
    torch.testing.assert_close(lm_loss(logits, ids, mask), lm_loss(logits, ids.masked_fill(mask == 0, IGNORE_INDEX)))


def test_an_all_masked_batch_gives_zero_with_a_graph():
    logits = torch.randn(1, 4, 3, requires_grad=True)
    loss = lm_loss(logits, torch.full((1, 4), IGNORE_INDEX))
    assert float(loss.detach()) == 0.0
    loss.backward()  # the graph is alive: every parameter sees a (zero) gradient
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_logits_of_every_output_form():
    t = torch.randn(1, 2, 3)

    class Out:
        logits = t

    for out in (Out(), {"logits": t}, (t, None), [t], t):
        assert logits_of(out) is t
    half = lambda ids, attention_mask=None: {"logits": t.half()}
    assert model_logits(half, None).dtype == torch.float32
