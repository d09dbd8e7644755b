"""Streamed execution (fxprune.streaming): tiny checkpoints saved in several safetensors shards, captured on
the meta device, run one decoder layer at a time; logits, statistics, scores and plans equal the in-memory
model's, and every weight is read once per sweep and dropped after its last segment."""
import re

import pytest
import torch

import fxprune
from families import gpt2, mixtral
from fxprune.planning.plan import make_plan
from fxprune.scoring import score
from fxprune.scoring.activations import input_statistics
from fxprune.streaming import (CheckpointWeights, ModelWeights, StreamedExecutor, StreamError, empty_model, partition,
                               streamed_input_statistics, streamed_score)
from models import bloom, glm, llama

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = {"llama_gqa": (llama, "sdpa"), "bloom": (bloom, "eager"), "glm": (glm, "sdpa"), "gpt2": (gpt2, "sdpa"),
            "mixtral": (mixtral, "sdpa")}
CAL = torch.randint(1, 128, (6, 10), generator=torch.Generator().manual_seed(3))
MASK = torch.ones_like(CAL)
MASK[0, :3] = 0  # a left-padded row: masked tokens count in no statistic
ROWS = [(CAL[:4], MASK[:4]), (CAL[4:], MASK[4:])]  # what the executor runs
CALIB = [{"input_ids": ids, "attention_mask": mask} for ids, mask in ROWS]  # what scoring takes
LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")


class Streamed:
    def __init__(self, name, tmp_path_factory):
        build, self.attn = FAMILIES[name]
        self.model = build(self.attn)
        self.dir = tmp_path_factory.mktemp(name)
        self.model.save_pretrained(self.dir, safe_serialization=True, max_shard_size="20KB")
        self.skeleton = empty_model(self.dir, attn_implementation=self.attn)
        self.dg = fxprune.analyze(self.skeleton)
        self.segments = partition(self.dg)
        with torch.no_grad():
            self.logits = self.model(CAL, attention_mask=MASK).logits

    def executor(self, **kw):
        return StreamedExecutor(self.dg, CheckpointWeights(self.dir, self.skeleton), self.segments, **kw)


BUILT = {}  # one checkpoint and meta analysis per family for the whole module


def built(name, tmp_path_factory) -> Streamed:
    if name not in BUILT:
        BUILT[name] = Streamed(name, tmp_path_factory)
    return BUILT[name]


@pytest.fixture(scope="module", params=list(FAMILIES))
def streamed(request, tmp_path_factory):
    return built(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llama_env(tmp_path_factory):
    s = built("llama_gqa", tmp_path_factory)
    return s, fxprune.analyze(s.model)


def test_checkpoint_is_sharded_and_the_skeleton_holds_no_weight(streamed):
    assert len(list(streamed.dir.glob("*.safetensors"))) > 3
    assert all(p.is_meta for p in streamed.skeleton.parameters())


def test_one_segment_per_decoder_layer_and_embedding_and_head(streamed):
    segments, params = streamed.segments, streamed.dg.parameters
    n_layers = streamed.model.config.num_hidden_layers
    assert len(segments) == n_layers + 2
    for segment in segments[1:-1]:  # the names are the oracle here; partition never reads them
        layers = {LAYER.search(n).group(1) for n in segment.tensors if n in params}
        assert layers == {str(segment.index - 1)}, (segment.index, segment.tensors)
        assert len(segment.hands_on) >= 1 and segment.takes
    layered = {n for n in params if LAYER.search(n)}
    for end in (segments[0], segments[-1]):
        assert not set(end.tensors) & layered
    read = {n for s in segments for n in s.tensors}
    assert set(params) <= read
    # the head hands on the logits alone, all the output node reads
    output = list(streamed.dg.gm.graph.nodes)[-1]
    assert segments[-1].hands_on == output.all_input_nodes


def test_tied_embedding_is_read_by_the_first_and_the_last_segment(llama_env):
    streamed, _ = llama_env
    assert streamed.dg.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    segments = streamed.segments
    holders = [s.index for s in segments if "model.embed_tokens.weight" in s.tensors]
    assert holders == [0, len(segments) - 1]


def test_streamed_logits_equal_the_in_memory_forward(streamed):
    executor = streamed.executor()
    logits = torch.cat(executor.run(ROWS))
    assert executor.store.spilled == 0
    assert torch.allclose(logits, streamed.logits, atol=1e-5, rtol=0)
    tiny = streamed.executor(budget=1024)  # a few rows' hidden states: the rest goes to disk
    spilled = torch.cat(tiny.run(ROWS))
    assert tiny.store.spilled > 0
    assert torch.equal(spilled, logits)


def test_each_weight_is_read_once_per_sweep_and_dropped_after_its_last_segment(streamed):
    executor = streamed.executor()
    executor.run(ROWS)
    reads = executor.source.reads
    assert set(reads) == set(executor.stored_as.values()) and set(reads.values()) == {1}
    users = {}
    for s in streamed.segments:
        for name in s.tensors:
            users.setdefault(name, []).append(s.index)
    for name in executor.stored_as:
        resident = [k for k, held in enumerate(executor.resident) if name in held]
        assert resident == list(range(users[name][0], users[name][-1] + 1)), name
    assert max(len(h) for h in executor.resident) < len(executor.stored_as)  # never the whole model


def test_in_memory_weights_stream_the_same_and_leave_the_model_unchanged(llama_env):
    streamed, dg = llama_env
    before = {k: v.clone() for k, v in streamed.model.state_dict().items()}
    logits = torch.cat(StreamedExecutor(dg, ModelWeights(streamed.model)).run(ROWS))
    assert torch.allclose(logits, streamed.logits, atol=1e-5, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in streamed.model.state_dict().items())


def test_single_file_checkpoint(tmp_path):
    model = gpt2()
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert not list(tmp_path.glob("*.index.json"))
    source = CheckpointWeights(tmp_path, empty_model(tmp_path))
    assert source.names() == set(model.state_dict()) - {"lm_head.weight"}  # tied to the embedding, not saved
    assert torch.equal(source.read("transformer.h.1.mlp.c_fc.weight"), model.transformer.h[1].mlp.c_fc.weight)


def test_streamed_statistics_equal_the_in_memory_ones(llama_env):
    streamed, dg = llama_env
    got = streamed_input_statistics(streamed.executor(budget=1024), CALIB, batch_size=2)
    want = input_statistics(dg, CALIB, batch_size=2)
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert g.tokens == w.tokens == int(MASK.sum())
        assert torch.allclose(g.var, w.var, rtol=1e-6, atol=0) and torch.allclose(g.sq_norm, w.sq_norm, rtol=1e-6)


@pytest.mark.parametrize("method", ["l2", "wanda", "flap"])
def test_streamed_scores_and_plan_equal_the_in_memory_ones(llama_env, method):
    streamed, dg = llama_env
    got = streamed_score(streamed.executor(budget=1024), method=method, calibration=CALIB)
    want = score(dg, method=method, calibration=CALIB, batch_size=8)
    assert set(got) == set(want)
    for gid, w in want.items():
        assert torch.allclose(got[gid], w, rtol=1e-5, atol=0), (method, gid)
    cfg = fxprune.PruneConfig(ratio=0.2, importance=method)
    streamed_plan, plan = make_plan(streamed.dg, cfg, got), make_plan(dg, cfg, want)
    assert streamed_plan.units == plan.units and streamed_plan.kept == plan.kept
    assert streamed_plan.params_after == plan.params_after


def test_conv1d_scores_stream_too(tmp_path_factory):
    streamed = built("gpt2", tmp_path_factory)
    dg = fxprune.analyze(streamed.model)
    got = streamed_score(streamed.executor(), method="wanda", calibration=CALIB)
    want = score(dg, method="wanda", calibration=CALIB)
    assert all(torch.allclose(got[g], want[g], rtol=1e-5, atol=0) for g in want)


class Hiding(CheckpointWeights):
    """A checkpoint that lacks one tensor."""

    def __init__(self, directory, model, hidden):
        super().__init__(directory, model)
        self.hidden = hidden

    def names(self):
        return super().names() - {self.hidden}


def test_missing_weight_and_gradient_methods_are_refused_before_any_work(llama_env):
    streamed, _ = llama_env
    name = "model.layers.1.mlp.down_proj.weight"
    with pytest.raises(StreamError, match=re.escape(name) + r".*segment 2"):
        StreamedExecutor(streamed.dg, Hiding(streamed.dir, streamed.skeleton, name))
    executor = streamed.executor()
    with pytest.raises(ValueError, match="needs gradients"):
        streamed_score(executor, method="element1", calibration=CALIB)
    with pytest.raises(ValueError, match="need calibration"):
        streamed_score(executor, method="flap")
    assert not executor.source.reads
