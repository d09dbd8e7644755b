"""Bad input gets a clear error that says what is wrong and what to do."""
import pytest
import torch
from transformers import PretrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

import fxprune


class Tiny(torch.nn.Module):
    def __init__(self, branchy=False):
        super().__init__()
        self.config = PretrainedConfig(vocab_size=16)
        self.emb = torch.nn.Embedding(16, 16)
        self.branchy = branchy

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.emb(input_ids)
        if self.branchy and bool(h.sum() > 0):  # data-dependent Python branch: torch.export refuses
            h = h * 2
        return CausalLMOutputWithPast(logits=h)


def test_export_failure_shows_error_and_hint():
    with pytest.raises(fxprune.CaptureError, match="(?s)could not trace Tiny.*(data-dependent|Data-dependent|guard).*Hint"):
        fxprune.analyze(Tiny(branchy=True))


def test_model_without_prunable_structure():
    model = Tiny()  # the embedding's features are the logits: an output, so frozen
    dg = fxprune.analyze(model)
    assert not dg.groups
    with pytest.raises(fxprune.PlanError, match="no prunable groups"):
        fxprune.plan(model, 0.2, scores={}, dg=dg)
