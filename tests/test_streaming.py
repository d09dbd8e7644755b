"""Streamed execution (fxprune.streaming): tiny checkpoints saved in several safetensors shards, captured on
the meta device, run one decoder layer at a time; logits, statistics, scores and plans equal the in-memory
model's, and every weight is read once per sweep and dropped after its last segment."""
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import fxprune
from benchmarks.synthetic import llama_config, write_random_checkpoint
from families import gpt2, mixtral
from fxprune.planning.plan import make_plan
from fxprune.scoring import HyWIA, score
from fxprune.scoring.activations import input_statistics
from fxprune.serialization import save_streamed
from fxprune.streaming import (CheckpointWeights, ModelWeights, StreamedExecutor, StreamError, empty_model, partition,
                               streamed_input_statistics, streamed_score)
from fxprune.streaming.budget import parse_bytes, segment_bytes
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


@pytest.mark.parametrize("method", ["l2", "wanda", "flap", "obs"])
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


def test_missing_weight_and_what_cannot_stream_are_refused_before_any_work(llama_env):
    streamed, _ = llama_env
    name = "model.layers.1.mlp.down_proj.weight"
    with pytest.raises(StreamError, match=re.escape(name) + r".*segment 2"):
        StreamedExecutor(streamed.dg, Hiding(streamed.dir, streamed.skeleton, name))
    executor = streamed.executor()
    with pytest.raises(ValueError, match="after the plan's refit, which streaming does not make"):
        streamed_score(executor, method=HyWIA(after_refit=True), calibration=CALIB)
    with pytest.raises(ValueError, match="reads calibration text"):
        streamed_score(executor, method="element2")
    with pytest.raises(ValueError, match="reads calibration text"):
        streamed_score(executor, method="flap")
    assert not executor.source.reads


def logits_of_saved(directory):
    with torch.no_grad():
        return fxprune.load(directory)(CAL, attention_mask=MASK).logits


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("method", ["l2", "wanda", "flap"])
@pytest.mark.parametrize("name", ["llama_gqa", "bloom", "gpt2"])
def test_streamed_output_equals_the_in_memory_save(tmp_path, tmp_path_factory, name, method, allocation):
    check_streamed_output(tmp_path, built(name, tmp_path_factory), method, allocation)


@pytest.mark.parametrize("name", ["glm", "mixtral"])  # fused gate_up; experts fused from per-expert tensors
def test_streamed_output_of_fused_layouts_equals_the_in_memory_save(tmp_path, tmp_path_factory, name):
    check_streamed_output(tmp_path, built(name, tmp_path_factory), "flap", "global")


def check_streamed_output(tmp_path, streamed, method, allocation):
    """The streamed output of `streamed`'s checkpoint, written a segment a shard, loads to the weights and logits
    of the in-memory rewrite saved by fxprune.save, and reads every tensor of the checkpoint once."""
    executor = streamed.executor(budget=1024)
    scores = streamed_score(executor, method=method, calibration=CALIB)
    cfg = fxprune.PruneConfig(ratio=0.3, importance=method, allocation=allocation, reconstruct="none")
    plan = make_plan(streamed.dg, cfg, scores)
    before = dict(executor.source.reads)
    budget = max(segment_bytes(streamed.dg, s) for s in streamed.segments)
    save_streamed(executor, plan, tmp_path / "streamed", budget=budget)
    assert len(list((tmp_path / "streamed").glob("model-*.safetensors"))) > 2  # layer by layer, never whole
    assert executor.source.reads - Counter(before) == Counter(executor.stored_as.values())  # each tensor read once
    fxprune.save(fxprune.apply(streamed.model, plan, reconstruct=False), tmp_path / "in_memory", base_model=streamed.model)
    got, want = fxprune.load(tmp_path / "streamed"), fxprune.load(tmp_path / "in_memory")
    assert got.state_dict().keys() == want.state_dict().keys()
    for key, w in want.state_dict().items():
        assert got.state_dict()[key].shape == w.shape and torch.allclose(got.state_dict()[key], w, atol=1e-5), key
    assert torch.allclose(logits_of_saved(tmp_path / "streamed"), logits_of_saved(tmp_path / "in_memory"), atol=1e-4)


def test_prune_checkpoint_keeps_bfloat16_and_equals_plan_then_apply(tmp_path):
    llama("sdpa").to(torch.bfloat16).save_pretrained(tmp_path / "ckpt", safe_serialization=True, max_shard_size="20KB")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()  # as a user loads it
    assert model.dtype == torch.bfloat16
    seen = []
    plan = fxprune.prune_checkpoint(tmp_path / "ckpt", 0.3, tmp_path / "out", importance="wanda", calibration=CAL,
                                    max_memory="200KB", progress=lambda stage, s, n: seen.append((stage, s.index, n)))
    segments = len(partition(fxprune.analyze(model)))
    assert seen == [(stage, k, segments) for stage in ("score", "write") for k in range(segments)]
    want = fxprune.plan(model, 0.3, importance="wanda", calibration=CAL, reconstruct="none")
    assert plan.units == want.units and plan.kept == want.kept
    assert json.loads((tmp_path / "out" / "fxprune.json").read_text())["dtype"] == "bfloat16"
    fxprune.save(fxprune.apply(model, plan, reconstruct=False), tmp_path / "in_memory", base_model=model)
    dtypes = {name: saved_dtypes(tmp_path / name) for name in ("out", "in_memory")}
    assert dtypes["out"] == dtypes["in_memory"]
    assert {d for k, d in dtypes["out"].items() if k.endswith(".weight")} == {torch.bfloat16}
    assert torch.equal(logits_of_saved(tmp_path / "out"), logits_of_saved(tmp_path / "in_memory"))


def saved_dtypes(directory) -> dict:
    out = {}
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k).dtype for k in f.keys()})
    return out


class Unread(CheckpointWeights):
    """A checkpoint whose tensors must not be read."""

    def _read(self, name):
        raise AssertionError(f"{name} was read")


@pytest.mark.parametrize("setting, message", [
    ({"importance": "taylor"}, r"unknown scoring method 'taylor'"),
    ({"reconstruct": "ridge"}, r"reconstruct must be a Refit\(\.\.\.\) or one of \('none', 'bias', 'lstsq'\)"),
    ({"max_memory": "lots"}, r"max_memory 'lots' is not a size"),
])
def test_prune_checkpoint_refuses_what_it_cannot_stream_before_reading(tmp_path_factory, monkeypatch, setting,
                                                                       message):
    streamed = built("llama_gqa", tmp_path_factory)
    monkeypatch.setattr("fxprune.checkpoint.CheckpointWeights", Unread)
    monkeypatch.setattr("fxprune.checkpoint.empty_model", lambda *a: pytest.fail("the model was built"))
    with pytest.raises(ValueError, match=message):
        fxprune.prune_checkpoint(streamed.dir, 0.3, **{"importance": "flap", "calibration": CAL, **setting})


def test_a_budget_below_one_segment_is_refused_naming_it(tmp_path_factory, monkeypatch):
    streamed = built("llama_gqa", tmp_path_factory)
    monkeypatch.setattr("fxprune.checkpoint.CheckpointWeights", Unread)
    need = max(segment_bytes(streamed.dg, s) for s in streamed.segments)
    largest = next(s for s in streamed.segments if segment_bytes(streamed.dg, s) == need)
    with pytest.raises(ValueError, match=rf"segment {largest.index} \(decoder layer {largest.index - 1}, reading "
                                         rf"model\.layers\.{largest.index - 1}\..* needs {need:,} bytes"):
        fxprune.prune_checkpoint(streamed.dir, 0.3, max_memory=need - 1, calibration=CAL)


def test_memory_sizes_parse():
    assert parse_bytes("2GB") == 2 * 10**9 and parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("1.5GiB") == 3 * 2**29 and parse_bytes(4096) == 4096 and parse_bytes(None) is None
    with pytest.raises(ValueError, match="'2 parsecs' is not a size"):
        parse_bytes("2 parsecs")


def cli_checkpoint(tmp_path, rows: int):
    """(model, tokenizer, C4-style sample file) of a tiny llama checkpoint with its tokenizer under tmp_path/ckpt and
    `rows` rows of text under tmp_path/data, as `fxprune prune CKPT --data-dir` reads them."""
    from tiny_tokenizer import tiny_tokenizer
    tok = tiny_tokenizer()
    model = llama("sdpa", vocab_size=len(tok))
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="50KB")
    tok.save_pretrained(tmp_path / "ckpt")
    sample = tmp_path / "data" / "c4" / "c4_sample.json"
    sample.parent.mkdir(parents=True)
    sample.write_text(json.dumps([{"text": f"row {k}: the cat sat on a mat, then a hat. " * 6} for k in range(rows)]))
    return model, tok, sample


def test_cli_prune_streams_a_checkpoint_larger_than_max_memory(tmp_path, capsys):
    from fxprune.cli import main
    from fxprune.data.loaders import calibration_samples
    model, tok, sample = cli_checkpoint(tmp_path, 6)
    assert main(["prune", str(tmp_path / "ckpt"), "--max-memory", "200KB", "--output", str(tmp_path / "out"),
                 "--data-dir", str(tmp_path / "data"), "--calib-samples", "4", "--calib-len", "16"]) == 0
    out = capsys.readouterr()
    assert "exceeds --max-memory 200KB: streaming it one layer at a time" in out.err
    assert re.search(r"write: 100%.*4/4", out.err) and "saved to" in out.out
    calib = calibration_samples(sample, tok, n_samples=4, seq_len=16)
    want = fxprune.plan(model, 0.2, importance="flap", calibration=calib, reconstruct="none")
    got = fxprune.load(tmp_path / "out")
    assert got.meta[fxprune.PLAN_KEY].units == want.units
    fxprune.save(fxprune.apply(model, want, reconstruct=False), tmp_path / "in_memory", base_model=model)
    assert torch.allclose(logits_of_saved(tmp_path / "out"), logits_of_saved(tmp_path / "in_memory"), atol=1e-4)
    assert main(["prune", str(tmp_path / "ckpt"), "--max-memory", "lots", "--output", str(tmp_path / "no")]) == 2
    assert "max_memory 'lots' is not a size" in capsys.readouterr().err and not (tmp_path / "no").exists()


# ru_maxrss keeps the high-water mark of the process that forked the child (pytest); VmHWM is the child's own
PEAK = """
import sys, torch
import fxprune
def peak():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
torch.set_num_threads(1)
before = peak()
ids = torch.randint(1, 512, (4, 32), generator=torch.Generator().manual_seed(0))
fxprune.prune_checkpoint(sys.argv[1], 0.3, sys.argv[2], importance="wanda", calibration=ids, max_memory=int(sys.argv[3]))
print(before, peak())
"""
# what the streamed run holds beside the weights: the meta-device capture and analysis of the graph
FIXED = 300 * 10**6


def test_streamed_peak_memory_is_bounded_by_one_layer_not_the_model(tmp_path):
    widths = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=8,
                  num_key_value_heads=4)
    sizes = write_random_checkpoint(tmp_path / "ckpt", llama_config(widths, vocab_size=512, tie_word_embeddings=True),
                                    dtype=torch.float32)
    layer = sizes["layer000"]
    bound = FIXED + 3 * layer  # a layer's dense tensors, their pruned copies and the shard being written
    assert sum(sizes.values()) > bound  # loading the model whole would exceed it
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "ckpt"), str(tmp_path / "out"), str(2 * layer)], cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    before, peak = map(int, out.stdout.split()[-2:])
    assert peak - before < bound, (peak - before, bound, layer)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
