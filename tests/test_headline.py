"""The headline call on the embedded SmolLM2, with nothing else given, keeps the quality the README promises."""
import os
from pathlib import Path

import pytest
import torch

import fxprune
from fxprune.evaluation.evaluate import perplexity
from fxprune.data.models import load_model

# The README's headline row for `fxprune.compile(model, ratio=0.2)`: WikiText-2 perplexity on the first
# 10,240 tokens (128-token windows) of the pruned model, measured as 122.37 in benchmarks/results/headline.md
# (HyWIA over element1, vector, Wanda-sp and FLAP, then the stream refit on 64 packaged windows; 135.53
# without the refit, 149.95 with the two-granularity HyWIA, rounding_quality.md); the bound leaves 7% for
# machine-to-machine differences. The dense model scores 63.3 there, and the earliest default (l2, no
# calibration, nothing protected) scored 904,244.
PROMISED_PPL = 131.0


def wikitext() -> Path:
    """The WikiText-2 test split under FXPRUNE_DATA_DIR; the test is skipped, naming the path, without it."""
    root = os.environ.get("FXPRUNE_DATA_DIR")
    if not root:
        pytest.skip("FXPRUNE_DATA_DIR is not set (the Makefile points it at ../shared/data): "
                    "the headline needs wikitext-2-raw/wiki.test.raw under it")
    path = Path(root) / "wikitext-2-raw" / "wiki.test.raw"
    if not path.is_file():
        pytest.skip(f"{path} is absent: the headline perplexity needs the WikiText-2 test split")
    return path


@pytest.mark.slow  # the real 135M model: compile and evaluate take minutes
def test_compile_with_nothing_else_keeps_its_promise():
    path = wikitext()
    model, tok = load_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fxprune.compile(model, ratio=0.2)
    plan = gm.meta[fxprune.PLAN_KEY]
    assert abs(plan.removed_fraction - 0.2) <= 0.01
    assert plan.params_after == sum(p.numel() for p in gm.parameters())
    assert plan.config.importance == "hywia"  # calibrated on the packaged sample, not the data-free fallback
    assert plan.config.reconstruct.mode == "lstsq"  # and refitted on it
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert perplexity(gm, tok, path, max_tokens=10240) <= PROMISED_PPL
