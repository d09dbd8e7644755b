"""Gradients through the streamed executor (fxprune.streaming.backward): a forward sweep keeping each segment's
inputs, then the segments recomputed in reverse order. The gradients, the Fisher diagonal, element1/element2/
vector scores and HyWIA equal the in-memory model's on the tiny checkpoints of test_streaming, with the
activations spilled to disk, and each tensor is read once per direction of a sweep."""
import pytest
import torch

import fxprune
from fxprune.planning.plan import make_plan
from fxprune.scoring import HyWIA, compute_gradients, hywia, score
from fxprune.scoring.gradients import member_names
from fxprune.streaming import (ModelWeights, StreamedExecutor, backward_sweep, streamed_gradients, streamed_hywia,
                               streamed_score)
from models import llama
from test_streaming import CAL, CALIB, built

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["llama_gqa", "bloom", "gpt2", "mixtral"]  # GQA + tied embedding, ALiBi, Conv1D, 3-D experts
SPILL = 1024  # bytes of activations kept in memory: a few rows' hidden states, the rest on disk
CACHE = {}


@pytest.fixture(scope="module", params=NAMES)
def pair(request, tmp_path_factory):
    """(the streamed checkpoint, the in-memory analysis of its model)."""
    if request.param not in CACHE:
        streamed = built(request.param, tmp_path_factory)
        CACHE[request.param] = streamed, fxprune.analyze(streamed.model)
    return CACHE[request.param]


def close(got: torch.Tensor, want: torch.Tensor, rel: float) -> bool:
    return got.shape == want.shape and bool((got - want).abs().max() <= rel * want.abs().max().clamp_min(1e-30))


def assert_read_twice(executor, names):
    """Every tensor read at most once per direction, the differentiated ones exactly once each way."""
    reads = executor.source.reads
    assert max(reads.values()) <= 2
    assert {reads[executor.stored_as[n]] for n in names} == {2}


@pytest.mark.parametrize("second_order, batch_size", [(False, 2), (True, 1)])
def test_streamed_gradients_equal_compute_gradients(pair, second_order, batch_size):
    streamed, dg = pair
    executor = streamed.executor(budget=SPILL)
    got = streamed_gradients(executor, CALIB, second_order=second_order, batch_size=batch_size)
    want = compute_gradients(dg, CALIB, second_order=second_order, batch_size=batch_size)
    assert executor.store.spilled > 0
    assert got.n_samples == want.n_samples == CAL.shape[0] and got.loss == pytest.approx(want.loss, rel=1e-6)
    assert set(got.grad) == set(want.grad) and want.grad
    assert any(g.abs().max() > 0 for g in want.grad.values())
    for name, w in want.grad.items():
        assert close(got.grad[name], w, 1e-5), name
        if second_order:
            assert close(got.sq_grad[name], want.sq_grad[name], 1e-5), name
    assert (got.sq_grad is None) == (not second_order)
    assert_read_twice(executor, want.grad)


def test_tied_embedding_gets_both_segments_gradients_read_once_each_way(tmp_path_factory):
    streamed = built("llama_gqa", tmp_path_factory)
    dg = fxprune.analyze(streamed.model)
    name = "model.embed_tokens.weight"  # read by the embedding and (as lm_head) by the head
    executor = streamed.executor(budget=SPILL)
    got = streamed_gradients(executor, CALIB, [name], second_order=True)
    want = compute_gradients(dg, CALIB, [name], second_order=True)
    assert close(got.grad[name], want.grad[name], 1e-5) and close(got.sq_grad[name], want.sq_grad[name], 1e-5)
    assert executor.source.reads[name] == 2


def test_only_the_segments_a_gradient_needs_are_recomputed(tmp_path_factory):
    streamed = built("llama_gqa", tmp_path_factory)
    executor = streamed.executor()
    name = "model.layers.1.mlp.down_proj.weight"
    seen = []
    losses = backward_sweep(executor, [(CAL[:2], None), (CAL[2:4], None)], [name],
                            lambda n, b, g: seen.append((n, b, g.shape)))
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    assert [(n, b) for n, b, _ in seen] == [(name, 0), (name, 1)]
    reads = executor.source.reads
    assert reads[name] == 2 and reads["model.layers.0.mlp.down_proj.weight"] == 1  # layer 0 needs no backward


@pytest.mark.parametrize("method", ["element1", "element2", "vector"])
def test_streamed_gradient_scores_and_plan_equal_the_in_memory_ones(pair, method):
    streamed, dg = pair
    got = streamed_score(streamed.executor(budget=SPILL), method=method, calibration=CALIB, batch_size=2)
    want = score(dg, method=method, calibration=CALIB, batch_size=2)
    assert set(got) == set(want)
    for gid, w in want.items():
        assert close(got[gid], w, 1e-5), (method, gid)
    cfg = fxprune.PruneConfig(ratio=0.3, importance=method)
    streamed_plan, plan = make_plan(streamed.dg, cfg, got), make_plan(dg, cfg, want)
    assert streamed_plan.units == plan.units and streamed_plan.kept == plan.kept


def test_fused_gate_up_gradient_scores_stream_too(tmp_path_factory):
    streamed = built("glm", tmp_path_factory)
    dg = fxprune.analyze(streamed.model)
    got = streamed_score(streamed.executor(budget=SPILL), method="element1", calibration=CALIB, batch_size=2)
    want = score(dg, method="element1", calibration=CALIB, batch_size=2)
    assert set(got) == set(want) and all(close(got[g], want[g], 1e-5) for g in want)


def test_streamed_hywia_equals_the_in_memory_one(pair):
    streamed, dg = pair
    settings = HyWIA(steps=4)
    executor = streamed.executor(budget=SPILL)
    got = streamed_hywia(executor, None, CALIB, ratio=0.3, batch_size=2, settings=settings)
    want = hywia(dg, None, CALIB, ratio=0.3, batch_size=2, settings=settings)
    assert got.choice == want.choice and set(got.validation) == set(want.validation) == {"learned", *settings.granularities}
    assert got.validation == pytest.approx(want.validation, rel=1e-4)
    assert got.losses == pytest.approx(want.losses, rel=1e-4) and len(got.losses) == settings.steps
    for kind in ("scores", "learned", "alpha"):
        mine, theirs = getattr(got, kind), getattr(want, kind)
        assert set(mine) == set(theirs) and all(close(mine[g], theirs[g], 1e-4) for g in theirs), kind
    cfg = fxprune.PruneConfig(ratio=0.3, importance=settings)
    assert make_plan(streamed.dg, cfg, got.scores).units == make_plan(dg, cfg, want.scores).units


def test_hywia_step_reaches_the_learnables_through_the_masks(tmp_path_factory):
    """A streamed training step leaves the same gradient on the masks' inputs as the in-memory step."""
    from fxprune.scoring.hybrid import InMemoryObjective
    from fxprune.streaming import StreamedObjective
    streamed = built("llama_gqa", tmp_path_factory)
    dg = fxprune.analyze(streamed.model)
    name = "model.layers.0.self_attn.o_proj.weight"
    grads = []
    for objective in (InMemoryObjective(dg, torch.device("cpu"), None, False), StreamedObjective(streamed.executor())):
        learnable = torch.full((64,), 0.5, requires_grad=True)
        loss = objective.step({name: learnable * 2}, CAL[:2], torch.ones_like(CAL[:2]))
        grads.append((loss, learnable.grad))
    (loss, want), (got_loss, got) = grads
    assert got_loss == pytest.approx(loss, rel=1e-6) and want.abs().max() > 0 and close(got, want, 1e-5)


def test_in_memory_weights_stream_gradients_and_leave_the_model_unchanged():
    model = llama("sdpa")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dg = fxprune.analyze(model)
    names = member_names(dg, dg.groups)
    got = streamed_gradients(StreamedExecutor(dg, ModelWeights(model)), CALIB, names, batch_size=3)
    want = compute_gradients(dg, CALIB, names, batch_size=3)
    assert all(close(got.grad[n], want.grad[n], 1e-5) for n in names)
    assert all(p.grad is None and not p.grad_fn for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_arguments_are_refused_before_any_read(tmp_path_factory):
    streamed = built("llama_gqa", tmp_path_factory)
    executor = streamed.executor()
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        streamed_gradients(executor, CALIB, batch_size=0)
    with pytest.raises(ValueError, match="gradient-based scoring reads calibration text"):
        streamed_gradients(executor, None)
    with pytest.raises(ValueError, match=r"through names \['nope'\]"):
        backward_sweep(executor, [(CAL, None)], through=["nope"])
    with pytest.raises(ValueError, match=r"ratio .* must be in \(0, 1\), got 1.5"):
        streamed_hywia(executor, calibration=CALIB, ratio=1.5)
    assert not executor.source.reads


@pytest.mark.parametrize("importance", ["element1", HyWIA(steps=2)])
def test_prune_checkpoint_with_gradients_equals_plan(tmp_path_factory, importance):
    streamed = built("llama_gqa", tmp_path_factory)
    plan = fxprune.prune_checkpoint(streamed.dir, 0.3, importance=importance, calibration=CAL, max_memory="200KB")
    want = fxprune.plan(streamed.model, 0.3, importance=importance, calibration=CAL, reconstruct="none")
    assert plan.units == want.units and plan.kept == want.kept


@pytest.mark.parametrize("method", ["element1", "element2"])
def test_gradient_scores_are_finished_and_released_layer_by_layer(tmp_path_factory, method, monkeypatch):
    """Each tensor's gradients are reduced to its members' scores before the reverse sweep reads the layer below:
    a sweep holds one layer's gradients, never the model's."""
    import fxprune.streaming.gradients as streamed
    streamed_model = built("llama_gqa", tmp_path_factory)
    executor = streamed_model.executor()
    events = []
    read = executor.read
    monkeypatch.setattr(executor, "read", lambda name: events.append(("read", name)) or read(name))
    value = streamed.member_value
    monkeypatch.setattr(streamed, "member_value", lambda group, index, *a, **k: events.append(
        ("scored", group.members[index].name)) or value(group, index, *a, **k))
    streamed_score(executor, method=method, calibration=CALIB)
    layer = lambda name: int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else None
    backward = events[[k for k, e in enumerate(events) if e[0] == "scored"][0]:]
    scored_layers = [layer(n) for kind, n in backward if kind == "scored" and layer(n) is not None]
    assert scored_layers == sorted(scored_layers, reverse=True) and set(scored_layers) == {0, 1}
    assert any(kind == "read" and layer(n) == 0 for kind, n in backward)  # layer 0 read after layer 1 is scored
    for k, (kind, name) in enumerate(backward):
        if kind == "read" and layer(name) == 0:  # by then every tensor of layer 1 is scored
            assert {layer(n) for e, n in backward[:k] if e == "scored"} >= {1}
            assert not any(e == "scored" and layer(n) == 1 for e, n in backward[k:])
