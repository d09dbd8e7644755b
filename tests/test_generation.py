"""KV-cache generation of pruned models (fxprune.serving.generation): oracles against Hugging Face's own cached
`generate` and against the recompute path (the pruned GraphModule re-run on the whole sequence)."""
import pytest
import torch

import fxprune
from fxprune.analysis.analyze import analyze
from fxprune.serving.generation import Generator  # also fxprune.Generator
from fxprune.planning.plan import PrunePlan
from models import llama
from oracles import prune_random, rel_err


def keep_everything(model):
    """A plan that removes nothing: the KV-cache program is then the dense model's."""
    dg = analyze(model)
    return fxprune.apply(model, PrunePlan.keep_all(dg), dg=dg)


def prompt(batch, seq, seed=0, vocab=128):
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def recompute(gm, ids, n):
    """Greedy tokens and per-step logits re-running the whole sequence (fxprune.evaluation.generate's method)."""
    logits = []
    for _ in range(n):
        step = gm(ids).logits[:, -1].detach()
        logits.append(step)
        ids = torch.cat([ids, step.argmax(-1, keepdim=True)], 1)
    return ids, torch.stack(logits, 1)


def kv_heads_times_head_dim(gm):
    """Rows of every layer's key projection in the pruned model: kept KV heads x head_dim, per layer."""
    return [p.shape[0] for n, p in gm.named_parameters() if n.endswith("k_proj.weight")]


def assert_kv_matches_recompute(gm, generator, ids, n):
    out, logits = generator.generate(ids, max_new_tokens=n, return_logits=True)
    ref_ids, ref_logits = recompute(gm, ids, n)
    assert torch.equal(out, ref_ids)
    assert rel_err(logits, ref_logits) < 1e-4


@pytest.fixture(scope="module")
def dense():
    model = llama("sdpa", seed=3)
    gm = keep_everything(model)
    return model, gm, Generator(gm)


def test_saved_pruned_model_generates_with_a_cache_of_only_the_kept_heads(tmp_path):
    """KV-cache tokens and logits equal the recompute path's; the cache holds the kept KV heads only.
    Generation runs from the saved directory, so save/load keep what it needs."""
    model = llama("sdpa", seed=1)
    _, plan, gm = prune_random(model, 0.5, seed=2)
    fxprune.save(gm, tmp_path / "p")
    gen = Generator(tmp_path / "p")
    ids = prompt(2, 9)
    assert_kv_matches_recompute(gm, gen, ids, 12)
    program = gen.program(2, 64)
    rows = kv_heads_times_head_dim(gm)
    assert sum(rows) < 2 * 16 * 2  # this plan removed KV groups: the cache must be smaller than dense
    # bytes = kept KV heads x head_dim, summed over layers, x length x batch x 2 (K and V) x dtype size
    assert program.cache_bytes() == sum(rows) * 64 * 2 * 2 * 4
    assert sorted(tuple(t.shape) for t in program.cache_buffers().values()) == \
        sorted((2, r // 16, 64, 16) for r in rows for _ in "kv")


def test_no_removal_equals_hugging_face_generate_with_its_cache(dense):
    model, _, gen = dense
    ids = prompt(1, 7, seed=4)
    model.generation_config.eos_token_id = None  # 64 tokens whatever comes; EOS is left to the model's logits
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,
                          pad_token_id=0)
    assert want.shape[1] == 7 + 64
    got = gen.generate(ids, max_new_tokens=64)
    assert torch.equal(got, want)


def test_left_padding_gives_each_row_its_tokens_alone(dense):
    _, _, gen = dense
    rows = [prompt(1, n, seed=10 + n)[0] for n in (5, 9, 2)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    batch = gen.generate(ids, mask, max_new_tokens=10)
    for i, r in enumerate(rows):
        alone = gen.generate(r[None], max_new_tokens=10)
        assert torch.equal(batch[i, width:], alone[0, len(r):]), i


def test_sampling_is_seeded_and_top_k_one_is_greedy(dense):
    _, _, gen = dense
    ids = prompt(3, 6, seed=5)  # batch 3, as the padding test: the same program
    a = gen.generate(ids, max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, seed=7)
    b = gen.generate(ids, max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, seed=7)
    c = gen.generate(ids, max_new_tokens=8, do_sample=True, temperature=5.0, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = gen.generate(ids, max_new_tokens=8)
    assert torch.equal(gen.generate(ids, max_new_tokens=8, do_sample=True, top_k=1, seed=9), greedy)


def test_stops_at_eos_and_pads_finished_rows(dense):
    _, _, gen = dense
    ids = prompt(3, 6, seed=6)
    greedy = gen.generate(ids, max_new_tokens=8)
    eos = int(greedy[0, 6 + 2])  # row 0's third new token
    out = gen.generate(ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    first = (greedy[0, 6:] == eos).nonzero()[0, 0]
    assert torch.equal(out[0, 6:6 + first + 1], greedy[0, 6:6 + first + 1])
    assert (out[0, 6 + first + 1:] == 0).all()
    hits = [(greedy[i, 6:] == eos).nonzero() for i in range(3)]
    assert out.shape[1] == 6 + max(int(h[0, 0]) + 1 if len(h) else 8 for h in hits)


def test_bad_options_fail_before_any_capture(dense):
    _, gm, _ = dense
    gen = Generator(gm)
    with pytest.raises(ValueError, match="left padded"):
        gen.generate(prompt(2, 4), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="temperature"):
        gen.generate(prompt(1, 4), do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="input_ids"):
        gen.generate(torch.ones(4, dtype=torch.long))
    assert gen._programs == {}
    with pytest.raises(ValueError, match="plan"):
        Generator(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)))




def count_calls(monkeypatch, module, name) -> list:
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, counted)
    return calls


def test_generate_reuses_its_programs_on_the_same_module_and_directory(monkeypatch, tmp_path):
    """The one-line form captures and builds once per GraphModule or saved directory; its tokens equal a new
    Generator's; weights written in place, or a directory saved again, give new programs."""
    from fxprune.serving import generation
    model = llama("sdpa", seed=5)
    _, _, gm = prune_random(model, 0.5, seed=6)
    monkeypatch.setattr(generation, "_CAPTURES", {})
    captures = count_calls(monkeypatch, generation, "capture_cached")
    builds = count_calls(monkeypatch, generation, "build_program")
    ids = prompt(1, 5, seed=7)
    first = fxprune.generate(gm, ids, max_new_tokens=6)
    assert torch.equal(fxprune.generate(gm, ids, max_new_tokens=9)[:, :11], first)
    assert (len(captures), len(builds)) == (1, 1)
    assert torch.equal(first, Generator(gm).generate(ids, max_new_tokens=6))
    with torch.no_grad():
        gm.get_parameter("lm_head.weight").mul_(-1)  # in place: the kept programs' weights are stale
    flipped = fxprune.generate(gm, ids, max_new_tokens=6)
    assert len(builds) == 3 and torch.equal(flipped, recompute(gm, ids, 6)[0])
    fxprune.save(gm, tmp_path / "p")
    for _ in range(2):
        assert torch.equal(fxprune.generate(str(tmp_path / "p"), ids, max_new_tokens=6), flipped)
    assert len(builds) == 4
    fxprune.save(gm, tmp_path / "p")  # new files: the directory's programs are built again
    fxprune.generate(tmp_path / "p", ids, max_new_tokens=6)
    assert (len(captures), len(builds)) == (1, 5)


def test_stored_programs_skip_the_capture_and_stale_ones_are_not_used(monkeypatch, tmp_path):
    """A Generator of a plan another Generator built copies its weights into the stored program: no capture, no
    rewrite, no rebuilt model (a directory is read, not loaded), the same tokens as the pruned GraphModule's own
    greedy loop. A program stored by other code, under another key's name or unreadable is not used."""
    import fxprune.serialization as serialization
    from fxprune.serving import generation, program_store
    from fxprune.serving.program_store import ProgramStore
    model = llama("sdpa", seed=8)
    _, _, gm = prune_random(model, 0.5, seed=9)
    fxprune.save(gm, tmp_path / "p")
    store = ProgramStore(tmp_path / "store")
    monkeypatch.setattr(generation, "_CAPTURES", {})
    captures = count_calls(monkeypatch, generation, "capture_cached")
    rewrites = count_calls(monkeypatch, generation, "pruned_step")
    loads = count_calls(monkeypatch, serialization, "load")
    ids = prompt(2, 6, seed=3)
    want = recompute(gm, ids, 7)[0]
    assert torch.equal(Generator(gm, store=store).generate(ids, max_new_tokens=7), want)
    stored = list(store.folder.glob("*.pt"))
    assert (len(captures), len(rewrites), len(stored)) == (1, 1, 1)
    generation._CAPTURES.clear()  # as in a new process
    for source in (gm, tmp_path / "p"):
        assert torch.equal(Generator(source, store=store).generate(ids, max_new_tokens=7), want)
    assert (len(captures), len(rewrites), len(loads)) == (1, 1, 0)

    monkeypatch.setattr(program_store, "_SOURCES_HASH", ["other fxprune code"])
    assert torch.equal(Generator(gm, store=store).generate(ids, max_new_tokens=7), want)
    assert (len(captures), len(rewrites), len(list(store.folder.glob("*.pt")))) == (2, 2, 2)
    other_code = next(p for p in store.folder.glob("*.pt") if p != stored[0])
    monkeypatch.setattr(program_store, "_SOURCES_HASH", [])  # this code again
    other_code.replace(stored[0])  # the other code's program under this code's name: its own key differs
    assert torch.equal(Generator(gm, store=store).generate(ids, max_new_tokens=7), want)
    assert len(rewrites) == 3
    stored[0].write_bytes(b"not a program")
    with pytest.warns(UserWarning, match="unreadable stored program"):
        assert torch.equal(Generator(gm, store=store).generate(ids, max_new_tokens=7), want)
    assert len(rewrites) == 4
    other = prune_random(model, 0.2, seed=9)[2]  # another plan of the same model: its own program
    assert torch.equal(Generator(other, store=store).generate(ids, max_new_tokens=7), recompute(other, ids, 7)[0])
    assert len(rewrites) == 5


def test_one_program_serves_caches_longer_than_the_captured_one(dense):
    """Tokens past the traced cache length (CAPTURE_LEN) still equal Hugging Face's: the buffers grew."""
    from fxprune.serving.generation import CAPTURE_LEN
    model, gm, _ = dense
    gen = Generator(gm, cache_block=16)
    ids = prompt(1, 40, seed=8)
    short = gen.generate(ids, max_new_tokens=4)
    program = gen.program(1, 1)
    assert program.max_len == CAPTURE_LEN == 64  # 44 tokens fit the traced length
    model.generation_config.eos_token_id = None
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=60, do_sample=False, pad_token_id=0)
    assert torch.equal(gen.generate(ids, max_new_tokens=60), want)
    assert gen.program(1, 1) is program and program.max_len == 112 > CAPTURE_LEN
    assert torch.equal(want[:, :44], short)


def test_a_plan_the_cache_capture_cannot_express_is_a_clear_error(dense):
    import copy
    _, gm, _ = dense
    gen = Generator(gm)
    gen.plan = copy.deepcopy(gen.plan)
    gen.plan.kept = {"model.layers.0.self_attn.q_proj.weight": {0: [0, 1, 2]}}  # 3 rows: not whole heads
    with pytest.raises(fxprune.PlanError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight keeps positions"):
        gen.generate(prompt(1, 4), max_new_tokens=2)


def test_family_without_cache_support_names_itself_and_the_fallback():
    from replicas import REPLICAS
    model = REPLICAS["chatglm"](attn_implementation="sdpa")
    _, _, gm = prune_random(model, 0.2)
    with pytest.raises(fxprune.CaptureError, match=r"fxprune_chatglm.*Cache\.update.*fxprune\.evaluation\.generate"):
        Generator(gm).generate(prompt(1, 4), max_new_tokens=2)


CACHED_FAMILIES = ["llama_mha", "llama_gqa", "glm", "glm4", "bloom", "mistral", "qwen2", "phi3", "gpt2", "gpt_neox",
                   "opt", "gemma2", "falcon", "falcon_mqa", "mixtral"]


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [0.2, 0.5])
@pytest.mark.parametrize("family", CACHED_FAMILIES)
def test_every_cached_family_equals_recompute(family, ratio):
    import families
    import models
    build = {**models.FAMILIES, **families.FAMILIES}[family]
    model = build("eager" if family in ("bloom", "gemma2") else "sdpa")
    _, plan, gm = prune_random(model, ratio, seed=4)
    assert_kv_matches_recompute(gm, Generator(gm), prompt(2, 7, seed=1), 10)


@pytest.mark.slow
def test_smollm2_dense_equals_hf_generate_and_pruned_equals_recompute():
    from fxprune.data.models import load_model
    model, tok = load_model()
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    model.generation_config.eos_token_id = None
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,
                          pad_token_id=tok.pad_token_id or 0)
    assert torch.equal(Generator(keep_everything(model)).generate(ids, max_new_tokens=64), want)
    gm = fxprune.compile(model, 0.5, importance="l2", round_to=64)
    gen = Generator(gm)
    # The 1e-4: measured 6.4e-6 here (7.4e-6 at 2 threads), the same with a cache of the exact length
    # or 256 slots, 1.4e-6 with nothing removed (benchmarks/results/kv_precision.md).
    assert_kv_matches_recompute(gm, gen, ids, 32)
    rows = kv_heads_times_head_dim(gm)  # SmolLM2: head_dim 64, 30 layers
    program = gen.program(1, 64)
    assert len(rows) == 30 and sum(rows) < 30 * 3 * 64
    assert program.cache_bytes() == sum(rows) * 64 * 1 * 2 * 4


def test_decode_report_renders_measured_rows(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.decode import plot, render
    timing = {"ttft_s": 0.5, "total_s": 10.0, "gen_tok_s": 12.8, "decode_tok_s": 13.3}
    fast = {"ttft_s": 0.4, "total_s": 8.0, "gen_tok_s": 16.0, "decode_tok_s": 16.6}
    report = {"machine": {"machine": "x86_64", "cpu": "Test CPU", "cores": 2, "torch_threads": 1, "python": "3.11",
                          "torch": "2.13.0", "transformers": "5.24"}, "date": "2026-12-02 07:00 UTC",
              "command": "python -m benchmarks.decode", "load_average_start": [9.0], "load_average_end": [9.0],
              "other_processes_start": ["python (30% cpu)"], "other_processes_end": [],
              "settings": {"dtype": "float32", "device": "cpu", "prompt": 128, "new": 128, "runs": 2,
                           "importance": "l2", "protect": [0, -1]}, "params_dense": 100,
              "variants": {"20% round_to 64": {"params": 80, "removed_fraction": 0.2}},
              "rows": [{"mode": "eager", "batch": 1, "variant": "20% round_to 64", "dense": timing, "pruned": fast,
                        "decode_speedup": 1.25, "ttft_speedup": 1.25}], "setup_s": {"eager batch 1": 30.0}}
    png = tmp_path / "d.png"
    plot(report, png)
    md = render(report, png)
    assert png.stat().st_size > 10_000
    row = next(l for l in md.splitlines() if l.startswith("| eager | 1 | 20% round_to 64"))
    assert "| 13.3 | 16.6 | **1.25** |" in row
    assert "Test CPU" in md and "machine was shared" in md and "2026-12-02" in md


def test_decode_append_keeps_the_earlier_rows_of_other_modes_only():
    from benchmarks.decode import merge_earlier
    row = {"mode": "eager", "batch": 1, "variant": "20% unrounded"}
    old = {"date": "2026-12-02 10:00 UTC", "command": "python -m benchmarks.decode --modes eager",
           "load_average_start": [1.0], "load_average_end": [2.0], "settings": {"modes": ["eager"], "batches": [1, 8]},
           "rows": [row, {**row, "batch": 8}, {**row, "mode": "compile"}],
           "setup_s": {"eager batch 1": 5.0, "eager batch 8": 9.0, "compile batch 1": 50.0}}
    report = {"settings": {"modes": ["compile"], "batches": [1]}, "rows": [], "setup_s": {}}
    merge_earlier(report, old)
    assert report["rows"] == old["rows"][:2]  # the compile batch-1 row is measured again, not kept
    assert report["setup_s"] == {"eager batch 1": 5.0, "eager batch 8": 9.0}
    assert report["settings"] == {"modes": ["eager", "compile"], "batches": [1, 8]}
    assert report["earlier_runs"][0]["rows"] == ["eager batch 1", "eager batch 8"]


@pytest.mark.slow
def test_cli_generate_prints_the_kv_cache_text_and_the_recompute_text_matches(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from tiny_tokenizer import tiny_tokenizer
    tok = tiny_tokenizer()
    model = llama("sdpa", vocab_size=len(tok))
    fxprune.save(fxprune.compile(model, 0.2, importance="l2"), tmp_path / "p")
    tok.save_pretrained(tmp_path / "p")
    repo = Path(__file__).resolve().parent.parent
    texts = []
    for extra in ([], ["--recompute"]):
        out = subprocess.run([sys.executable, "-m", "fxprune.cli", "generate", str(tmp_path / "p"), "--prompt",
                              "the cat", "--max-new-tokens", "12", *extra], capture_output=True, text=True,
                             timeout=600, cwd=repo)
        assert out.returncode == 0, out.stderr
        texts.append(out.stdout)
    assert texts[0] == texts[1] and len(texts[0].strip()) > 0
