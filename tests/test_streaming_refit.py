"""The least-squares refit streamed (fxprune.streaming.refit): a checkpoint pruned and refitted one decoder layer at
a time, the dense and the pruned activations carried side by side, loads to the weights and logits of the
in-memory `apply` (its ReconstructLayersPass) saved by `fxprune.save`, for every refit mode and target, with the
activations in memory or spilled to disk."""
import json
import re

import pytest
import torch
import transformers

import fxprune
from families import mistral
from fxprune.planning.plan import make_plan
from fxprune.reconstruction.least_squares import fit
from fxprune.reconstruction.projection_fit import ProjectionFit, held_out_tokens
from fxprune.reconstruction.projections import Projection
from fxprune.serialization import save_streamed
from fxprune.streaming import CheckpointWeights, StreamedExecutor, empty_model, partition, streamed_score
from fxprune.streaming.budget import segment_bytes
from fxprune.streaming.pruned_segments import pruned_segments
from fxprune.streaming.refit import waves
from fxprune.rewrite.emit import rewrite
from fxprune.streaming.output import real_view
from models import llama
from test_streaming import CAL, CALIB, MASK, built, logits_of_saved, saved_dtypes

pytestmark = pytest.mark.usefixtures("one_thread")

# the refit's own rows: more tokens than the widest pruned input, a left- and a right-padded row
IDS = torch.randint(1, 128, (12, 16), generator=torch.Generator().manual_seed(5))
PAD = torch.ones_like(IDS)
PAD[1, :5] = 0
PAD[9, 11:] = 0
REFIT = {"input_ids": IDS, "attention_mask": PAD}


SCORES, ANALYSES = {}, {}  # per checkpoint: the streamed flap scores, the real model's analysis


def plan_for(streamed, refit, targets=("heads", "mlp")):
    key = (streamed.dir, targets)
    if key not in SCORES:
        SCORES[key] = streamed_score(streamed.executor(), method="flap", calibration=CALIB)
    cfg = fxprune.PruneConfig(ratio=0.3, importance="flap", reconstruct=refit, targets=targets, allocation="global")
    return make_plan(streamed.dg, cfg, SCORES[key])


def in_memory(streamed, plan, **options):
    if streamed.dir not in ANALYSES:
        ANALYSES[streamed.dir] = fxprune.analyze(streamed.model)
    return fxprune.apply(streamed.model, plan, dg=ANALYSES[streamed.dir], calibration=REFIT, **options)


def check_streamed_refit(tmp_path, streamed, plan, **options):
    """The plan written streamed (a segment a shard) loads to the weights and logits of the in-memory `apply` (whose
    `fxprune.save` and `load` round trip is tested elsewhere, and end to end in the prune_checkpoint test below), and
    the refit changed the plain rewrite's weights. Returns the loaded model."""
    budget = max(segment_bytes(streamed.dg, s) for s in streamed.segments)
    save_streamed(streamed.executor(budget=1024), plan, tmp_path / "streamed", budget=budget, calibration=REFIT,
                  **options)
    assert len(list((tmp_path / "streamed").glob("model-*.safetensors"))) > 2  # layer by layer, never whole
    got, want = fxprune.load(tmp_path / "streamed"), in_memory(streamed, plan)
    got_sd, want_sd = got.state_dict(), want.state_dict()
    assert got_sd.keys() == want_sd.keys()
    for key, w in want_sd.items():
        assert got_sd[key].shape == w.shape and torch.allclose(got_sd[key], w, atol=1e-5), key
    with torch.no_grad():
        assert torch.allclose(got(CAL, attention_mask=MASK).logits, want(CAL, attention_mask=MASK).logits, atol=1e-4)
    plain = in_memory(streamed, plan, reconstruct=False, verify=False).state_dict()
    assert set(plain) < set(want_sd) or any(not torch.equal(plain[k], want_sd[k]) for k in plain)
    return got


@pytest.mark.parametrize("mode", ["lstsq", "bias"])
@pytest.mark.parametrize("name", ["llama_gqa", "bloom", "gpt2"])
def test_streamed_refit_equals_the_in_memory_save(tmp_path, tmp_path_factory, name, mode):
    streamed = built(name, tmp_path_factory)
    plan = plan_for(streamed, fxprune.Refit(mode=mode, target="stream"))
    check_streamed_refit(tmp_path, streamed, plan)


@pytest.mark.parametrize("name", ["glm", "mixtral"])  # fused gate_up; experts fused from per-expert tensors
def test_streamed_refit_of_fused_layouts_equals_the_in_memory_save(tmp_path, tmp_path_factory, name):
    streamed = built(name, tmp_path_factory)
    plan = plan_for(streamed, fxprune.Refit(mode="lstsq"), targets=("heads", "mlp", "hidden"))
    check_streamed_refit(tmp_path, streamed, plan)


class UntiedStreamed:
    """Mistral (its head untied from the embedding, so refitted when hidden channels go) saved in shards."""

    def __init__(self, directory):
        self.model, self.dir = mistral("sdpa"), directory
        self.model.save_pretrained(directory, safe_serialization=True, max_shard_size="20KB")
        self.skeleton = empty_model(directory, attn_implementation="sdpa")
        self.dg = fxprune.analyze(self.skeleton)
        self.segments = partition(self.dg)

    def executor(self, **kw):
        return StreamedExecutor(self.dg, CheckpointWeights(self.dir, self.skeleton), self.segments, **kw)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return UntiedStreamed(tmp_path_factory.mktemp("mistral"))


@pytest.mark.parametrize("target", ["stream", "output"])
def test_hidden_channels_refit_every_reader_in_waves_and_the_head(tmp_path, untied, target):
    plan = plan_for(untied, fxprune.Refit(mode="lstsq", target=target), targets=("heads", "mlp", "hidden"))
    assert "lm_head.weight" in plan.kept and not untied.dg.aliases
    got = check_streamed_refit(tmp_path, untied, plan)
    assert "lm_head.bias" in got.state_dict()  # the head was refitted: it had no bias


def test_waves_split_where_an_input_reads_an_earlier_refit(untied):
    plan = plan_for(untied, fxprune.Refit(mode="lstsq"), targets=("heads", "mlp", "hidden"))
    kept = {untied.dg.groups[g].atom_id: u for g, u in plan.units.items()}
    gm = rewrite(real_view(untied.dg, {}), kept)
    twins = pruned_segments(gm, untied.segments)
    assert [len(t.nodes) > 0 for t in twins] == [True] * len(untied.segments)
    from fxprune.reconstruction.projections import lifted_projections, projection_input
    layer = twins[1]
    stops = {n: name for n, name in lifted_projections(gm, plan.kept).items() if n in layer.nodes}
    got = [[stops[n].split(".")[-2] for n in wave]
           for wave in waves(layer.nodes, stops, {n: [projection_input(n)] for n in stops})]
    # q, k, v read the same normed input; gate and up the normed stream after o_proj's refit; down reads both
    assert got == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def test_activations_spill_to_disk_and_the_refit_is_unchanged(tmp_path, tmp_path_factory):
    streamed = built("llama_gqa", tmp_path_factory)
    plan = plan_for(streamed, fxprune.Refit(mode="lstsq"))
    spill, spilled = tmp_path / "spill", []
    spill.mkdir()
    check_streamed_refit(tmp_path, streamed, plan, activations=1024, spill_dir=spill,
                         progress=lambda segment: spilled.append(len(list(spill.rglob("*.pt")))))
    assert max(spilled) >= 2  # both streams of the calibration on disk between segments
    assert not list(spill.iterdir())  # removed once written


def test_smaller_batches_add_up_to_the_whole_calibrations_refit(tmp_path, tmp_path_factory):
    streamed = built("llama_gqa", tmp_path_factory)
    plan = plan_for(streamed, fxprune.Refit(mode="lstsq", ridge=1.0))
    check_streamed_refit(tmp_path, streamed, plan, refit_batch=5)


def test_projection_sums_added_batch_by_batch_choose_and_solve_as_one_batch():
    g = torch.Generator().manual_seed(7)
    rows, seq, d, out = 10, 12, 24, 6
    mask = torch.ones(rows, seq, dtype=torch.long)
    mask[2, :4] = 0
    xd = torch.randn(rows, seq, 16, generator=g) @ torch.randn(16, d, generator=g)
    xd = xd + 0.01 * torch.randn(rows, seq, d, generator=g)
    proj = Projection("w", torch.randn(out, d, generator=g), torch.randn(out, generator=g), None, torch.arange(16))
    xp, residual = xd[..., :16], torch.randn(rows, seq, out, generator=g)
    settings = fxprune.Refit(mode="lstsq", ridge="auto")
    whole = ProjectionFit(proj, settings)
    whole.add(xd, residual, xp, residual, mask.reshape(-1).bool(), held_out_tokens(mask))
    parts, row, token = ProjectionFit(proj, settings), 0, 0
    for cut in ((0, 3), (3, 7), (7, 10)):
        m = mask[cut[0]:cut[1]]
        parts.add(xd[cut[0]:cut[1]], residual[cut[0]:cut[1]], xp[cut[0]:cut[1]], residual[cut[0]:cut[1]],
                  m.reshape(-1).bool(), held_out_tokens(m, row, token, rows))
        row, token = row + m.shape[0], token + int(m.sum())
    w0 = proj.dense_weight[:, :16]
    (w1, b1, c1), (w2, b2, c2) = whole.result(w0, None), parts.result(w0, None)
    assert c1 == c2 and c1.startswith("lstsq")
    # the same sums, added in another order in float32
    assert rel_err(w2, w1) < 1e-5 and rel_err(b2, b1) < 1e-5
    # and one batch is `fit` on the token weights normalised to mean 1, as the pass had them
    tokens = mask.reshape(-1).bool()
    flat = xd.reshape(-1, d)[tokens]
    y = proj.output(flat)
    energy = 1 / (residual.reshape(-1, out)[tokens].double() + y.double()).pow(2).mean(-1)
    w3, b3, c3 = fit(xp.reshape(-1, 16)[tokens], y, w0, None, "lstsq", "auto", energy / energy.mean(),
                     held_out_tokens(mask))
    assert c3 == c1 and rel_err(w3, w1) < 1e-5 and rel_err(b3, b1) < 1e-5


def rel_err(got, want) -> float:
    return float((got - want).norm() / want.norm())


def test_held_out_tokens_of_batches_are_those_of_the_whole_calibration():
    mask = torch.ones(6, 5, dtype=torch.long)
    mask[4, 3:] = 0
    for whole in (mask, mask[:3]):  # every fourth row; every fourth token under four rows
        parts, row, token = [], 0, 0
        for start in range(0, whole.shape[0], 2):
            m = whole[start:start + 2]
            parts.append(held_out_tokens(m, row, token, whole.shape[0]))
            row, token = row + m.shape[0], token + int(m.sum())
        assert torch.equal(torch.cat(parts), held_out_tokens(whole))


def test_prune_checkpoint_refits_like_compile_and_keeps_bfloat16(tmp_path):
    llama("sdpa").to(torch.bfloat16).save_pretrained(tmp_path / "ckpt", safe_serialization=True, max_shard_size="20KB")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    plan = fxprune.prune_checkpoint(tmp_path / "ckpt", 0.3, tmp_path / "out", importance="wanda", calibration=REFIT,
                                    reconstruct="lstsq", max_memory="200KB")
    assert plan.config.reconstruct.mode == "lstsq"
    gm = fxprune.compile(model, 0.3, importance="wanda", calibration=REFIT, reconstruct="lstsq")
    assert gm.meta[fxprune.PLAN_KEY].units == plan.units
    fxprune.save(gm, tmp_path / "in_memory", base_model=model)
    assert json.loads((tmp_path / "out" / "fxprune.json").read_text())["dtype"] == "bfloat16"
    dtypes = {name: saved_dtypes(tmp_path / name) for name in ("out", "in_memory")}
    assert dtypes["out"] == dtypes["in_memory"]
    assert {d for k, d in dtypes["out"].items() if k.endswith((".weight", ".bias"))} == {torch.bfloat16}
    assert any(k.endswith("down_proj.bias") for k in dtypes["out"])  # the refit's biases
    got, want = fxprune.load(tmp_path / "out").state_dict(), fxprune.load(tmp_path / "in_memory").state_dict()
    assert all(torch.equal(got[k], w) for k, w in want.items())
    assert torch.equal(logits_of_saved(tmp_path / "out"), logits_of_saved(tmp_path / "in_memory"))


def test_a_refit_without_calibration_is_refused_before_any_read(tmp_path, tmp_path_factory):
    streamed = built("llama_gqa", tmp_path_factory)
    plan = plan_for(streamed, fxprune.Refit(mode="bias"))
    executor = streamed.executor()
    before = dict(executor.source.reads)
    with pytest.raises(ValueError, match=re.escape("reconstruct mode 'bias', which needs calibration")):
        save_streamed(executor, plan, tmp_path / "out")
    assert executor.source.reads == before and not (tmp_path / "out").exists()


def test_cli_prune_streams_the_refit_on_its_own_windows(tmp_path, capsys):
    from fxprune.cli import main
    from fxprune.data.loaders import calibration_samples
    from test_streaming import cli_checkpoint
    model, tok, sample = cli_checkpoint(tmp_path, 8)
    assert main(["prune", str(tmp_path / "ckpt"), "--max-memory", "200KB", "--output", str(tmp_path / "out"),
                 "--data-dir", str(tmp_path / "data"), "--calib-samples", "4", "--calib-len", "16",
                 "--reconstruct", "lstsq", "--refit-samples", "6"]) == 0
    out = capsys.readouterr()
    assert "streaming it one layer at a time" in out.err and re.search(r"reconstruct\s+lstsq", out.out)
    # the in-memory `fxprune prune`: scored on --calib-samples windows, refitted on --refit-samples of the same text
    calib, refit = (calibration_samples(sample, tok, n_samples=n, seq_len=16) for n in (4, 6))
    want = fxprune.compile(model, 0.2, importance="flap", calibration=calib, refit_calibration=refit,
                           reconstruct=fxprune.Refit(mode="lstsq", samples=6))
    got = fxprune.load(tmp_path / "out")
    assert got.meta[fxprune.PLAN_KEY].units == want.meta[fxprune.PLAN_KEY].units
    got_sd, want_sd = got.state_dict(), want.state_dict()
    assert got_sd.keys() == want_sd.keys() and any(k.endswith("down_proj.bias") for k in got_sd)
    assert all(torch.allclose(got_sd[k], w, atol=1e-5) for k, w in want_sd.items())
    ids = calib[:2]
    with torch.no_grad():
        assert torch.allclose(got(ids).logits, want(ids).logits, atol=1e-4)
