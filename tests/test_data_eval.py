"""fxprune.data and fxprune.evaluate against hand-computed values, on synthetic files in tmp_path."""
from __future__ import annotations

import json
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

sys.path.insert(0, str(Path(__file__).parent))
from tiny_tokenizer import tiny_tokenizer  # noqa: E402

from fxprune.data import loaders as data
from fxprune.evaluation import evaluate  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama(tok):
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(cfg).eval()


class Bigram(torch.nn.Module):
    """logits[t] = table[input_ids[t]]: log p(next | previous) is readable straight off the table."""

    def __init__(self, vocab, table=None):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(vocab, vocab) if table is None else table)

    def forward(self, input_ids, attention_mask=None):
        return types.SimpleNamespace(logits=self.table[input_ids])


def tid(tok, piece):
    return tok.convert_tokens_to_ids(piece)


def prefer(tok, chars, strength=10.0):
    """A model that puts `strength` on the byte tokens of `chars` after any token."""
    m = Bigram(len(tok))
    with torch.no_grad():
        for c in chars:
            m.table[:, tid(tok, c)] = strength
    return m


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


TEXT = "the quick brown fox jumps over the lazy dog. " * 30


# --- data ------------------------------------------------------------------------------------------------

def test_data_dir(tmp_path, monkeypatch):
    assert data.data_dir(tmp_path) == tmp_path
    monkeypatch.delenv("FXPRUNE_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="FXPRUNE_DATA_DIR"):
        data.data_dir()
    monkeypatch.setenv("FXPRUNE_DATA_DIR", str(tmp_path))
    assert data.data_dir() == tmp_path
    monkeypatch.setenv("FXPRUNE_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="FXPRUNE_DATA_DIR"):
        data.data_dir()


def _docs():
    # Three long documents over disjoint letters, and one too short to hold a window.
    return ["a b " * 60, "c d " * 60, "e f " * 60, "q"]


@pytest.mark.parametrize("kind", ["list", "json", "jsonl"])
def test_calibration_samples_shape_determinism_and_sources(tok, tmp_path, kind):
    docs = _docs()
    if kind == "list":
        source = docs
    elif kind == "json":
        source = tmp_path / "c.json"
        source.write_text(json.dumps([{"text": t} for t in docs]), encoding="utf-8")
    else:
        source = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in docs])
    x = data.calibration_samples(source, tok, n_samples=3, seq_len=16, seed=0)
    assert x.shape == (3, 16) and x.dtype == torch.long
    assert torch.equal(x, data.calibration_samples(source, tok, n_samples=3, seq_len=16, seed=0))
    assert tid(tok, "q") not in x  # the short document is never used
    # Drawn without replacement while long documents remain: each window comes from a different one.
    letters = sorted("".join(sorted(set(tok.decode(row, skip_special_tokens=True)) - {" "})) for row in x)
    assert letters == ["ab", "cd", "ef"]
    # Every window is a contiguous slice of its document's tokens.
    for row in x.tolist():
        assert any(row == ids[s:s + 16] for ids in (tok(d)["input_ids"] for d in docs)
                   for s in range(len(ids) - 15))


def test_calibration_seeds_differ_and_plain_text_reuses_its_one_document(tok, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    a = data.calibration_samples(path, tok, n_samples=8, seq_len=32, seed=0)
    b = data.calibration_samples(path, tok, n_samples=8, seq_len=32, seed=1)
    assert a.shape == b.shape == (8, 32)
    assert not torch.equal(a, b)


def test_calibration_bad_sources(tok, tmp_path):
    bad = tmp_path / "records.json"
    bad.write_text(json.dumps([{"text": "ok"}, {"body": "no text key"}]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"records\.json.*record 1"):
        data.calibration_samples(bad, tok)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl, line 2"):
        data.calibration_samples(broken, tok)
    short = write_jsonl(tmp_path / "short.jsonl", [{"text": "tiny"}])
    with pytest.raises(ValueError, match=r"short\.jsonl.*128 tokens"):
        data.calibration_samples(short, tok, seq_len=128)


def test_alpaca_records_and_prompts(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Add.", "input": "1 2", "output": "3"},
                                {"instruction": "Greet.", "output": "Hi"}]), encoding="utf-8")
    recs = data.alpaca_records(path)
    assert recs[1] == {"instruction": "Greet.", "input": "", "output": "Hi"}
    prompt, full = data.alpaca_prompt(recs[0])
    assert prompt.endswith("### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:\n")
    assert prompt.startswith("Below is an instruction that describes a task, paired with an input")
    assert full == prompt + "3"
    prompt, full = data.alpaca_prompt(recs[1])
    assert prompt == ("Below is an instruction that describes a task. Write a response that appropriately "
                      "completes the request.\n\n### Instruction:\nGreet.\n\n### Response:\n")
    assert full == prompt + "Hi"

    bad = tmp_path / "bad_alpaca.json"
    bad.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "input": 5,
                                                                     "output": "d"}]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad_alpaca\.json.*record 1"):
        data.alpaca_records(bad)


def test_tokenize_alpaca_masks_prompt_and_appends_eos(tok):
    rec = {"instruction": "Say hi.", "input": "", "output": "hi there"}
    prompt, full = data.alpaca_prompt(rec)
    (ex,) = data.tokenize_alpaca([rec], tok, cutoff_len=256)
    n_prompt = len(tok(prompt)["input_ids"])
    assert ex["input_ids"] == tok(full)["input_ids"] + [tok.eos_token_id]
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])
    (ex,) = data.tokenize_alpaca([rec], tok, train_on_inputs=True)
    assert ex["labels"] == ex["input_ids"]
    (ex,) = data.tokenize_alpaca([rec], tok, cutoff_len=20)  # truncated: no room for EOS
    assert len(ex["input_ids"]) == 20 and ex["input_ids"][-1] != tok.eos_token_id
    assert ex["labels"] == [-100] * 20


# --- perplexity ---------------------------------------------------------------------------------------

def test_eval_windows_counts_and_truncation(tok):
    n = len(tok(TEXT)["input_ids"])
    w = evaluate.eval_windows(tok, TEXT, window=64)
    assert w.shape == (n // 64, 64)
    assert w.flatten().tolist() == tok(TEXT)["input_ids"][:(n // 64) * 64]
    assert evaluate.eval_windows(tok, TEXT, window=64, max_tokens=300).shape == (4, 64)
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluate.eval_windows(tok, TEXT, window=64, max_tokens=63)


def test_wikitext_file_rows_joined_as_in_datasets(tmp_path):
    path = tmp_path / "wiki.test.raw"
    path.write_text(" \n = Title = \n \n Body .\n", encoding="utf-8")
    assert evaluate.wikitext_rows(path) == ["", " = Title = \n", "", " Body .\n"]
    expected = "\n\n = Title = \n" + "\n\n" + "\n\n" + " Body .\n"  # the blank row "" sits between
    assert evaluate.eval_text(path) == evaluate.eval_text(str(path)) == expected
    assert evaluate.eval_text(["x", "y"]) == "x\n\ny"


def test_perplexity_of_uniform_model_is_vocab_size(tok):
    assert evaluate.perplexity(Bigram(len(tok)), tok, TEXT, window=32) == pytest.approx(len(tok), rel=1e-5)


def test_perplexity_equals_direct_cross_entropy(tok, llama):
    ids = torch.tensor(tok(TEXT)["input_ids"][:200]).view(-1, 50)[:4]  # max_tokens=200, window=50
    with torch.no_grad():
        logits = llama(ids).logits
    direct = math.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item())
    for bs in (1, 3):
        got = evaluate.perplexity(llama, tok, TEXT, window=50, max_tokens=200, batch_size=bs)
        assert got == pytest.approx(direct, rel=1e-5)


def test_emitted_graph_module_evaluates_like_the_model(tok, llama):
    from fxprune.analysis.analyze import analyze
    from fxprune.rewrite.emit import rewrite
    gm = rewrite(analyze(llama), {})  # keeps every unit: same function, as a GraphModule
    assert isinstance(gm, torch.fx.GraphModule)
    assert evaluate.perplexity(gm, tok, TEXT, window=32) == pytest.approx(
        evaluate.perplexity(llama, tok, TEXT, window=32), rel=1e-5)
    assert evaluate.generate(gm, tok, "the fox", 6) == evaluate.generate(llama, tok, "the fox", 6)


# --- log-likelihood ---------------------------------------------------------------------------------------

def test_encode_pair_moves_trailing_space_and_keeps_merges(tok):
    assert evaluate.encode_pair(tok, "Answer: ", "the") == evaluate.encode_pair(tok, "Answer:", " the")
    ctx, cont = evaluate.encode_pair(tok, "Answer:", " the")
    # lm-eval 0.4.13 encodes with the tokenizer's special tokens: the tiny tokenizer's BOS opens the context
    assert cont == [tid(tok, "Ġthe")] and ctx[0] == tok.bos_token_id and ctx.count(tok.bos_token_id) == 1
    assert evaluate.encode_pair(tok, "", "ab") == ([tok.bos_token_id], [tid(tok, "a"), tid(tok, "b")])


def test_loglikelihood_matches_hand_sum_with_padding(tok):
    torch.manual_seed(1)
    m = Bigram(len(tok), torch.randn(len(tok), len(tok)))
    logp = m.table.detach().log_softmax(-1)
    reqs = [("the cat", " sat"), ("a", " b c d e f"), ("Question: x\nAnswer:", " yes"), ("", "hello")]
    got = evaluate.loglikelihood(m, tok, reqs, batch_size=3)
    for (ctx, cont), (ll, greedy) in zip(reqs, got):
        c, x = evaluate.encode_pair(tok, ctx, cont)
        seq = c + x
        want = sum(logp[seq[i - 1], seq[i]].item() for i in range(len(c), len(seq)))
        assert ll == pytest.approx(want, abs=1e-4)
        assert greedy == all(logp[seq[i - 1]].argmax().item() == seq[i] for i in range(len(c), len(seq)))


def test_loglikelihood_of_real_model_does_not_depend_on_batching(tok, llama):
    reqs = [("the quick", " brown fox"), ("a", " b"), ("jumps over the lazy", " dog."), ("x y", " z")]
    one = evaluate.loglikelihood(llama, tok, reqs, batch_size=1)
    four = evaluate.loglikelihood(llama, tok, reqs, batch_size=4)
    assert [a for a, _ in one] == pytest.approx([b for b, _ in four], abs=1e-4)
    ctx, cont = evaluate.encode_pair(tok, *reqs[0])
    with torch.no_grad():
        lp = llama(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
    want = sum(lp[len(ctx) + i - 1, t].item() for i, t in enumerate(cont))
    assert one[0][0] == pytest.approx(want, abs=1e-4)


def test_loglikelihood_rolling_is_the_full_text_log_prob(tok):
    torch.manual_seed(2)
    m = Bigram(len(tok), torch.randn(len(tok), len(tok)))
    logp = m.table.detach().log_softmax(-1)
    ids = [tok.bos_token_id] + tok("the lazy dog sleeps", add_special_tokens=False)["input_ids"]
    want = sum(logp[ids[i - 1], ids[i]].item() for i in range(1, len(ids)))
    for L in (3, 5, 64):  # several windows, a partial last window, and a single window
        assert evaluate.loglikelihood_rolling(m, tok, "the lazy dog sleeps", max_length=L) == pytest.approx(want,
                                                                                                         abs=1e-4)


# --- zero-shot ----------------------------------------------------------------------------------------

def core(result):
    return {k: result[k] for k in ("acc", "acc_norm", "n")}


def piqa_files(tmp_path, label, sols=("xxxx", "yyyy")):
    d = tmp_path / "piqa"
    d.mkdir(exist_ok=True)
    write_jsonl(d / "valid.jsonl", [{"goal": "g", "sol1": sols[0], "sol2": sols[1]}] * 2)
    (d / "valid-labels.lst").write_text(f"{label}\n{label}\n")
    return d


@pytest.mark.parametrize("label,acc", [(0, 1.0), (1, 0.0)])
def test_zero_shot_piqa_forced(tok, tmp_path, label, acc):
    piqa_files(tmp_path, label)
    r = evaluate.zero_shot(prefer(tok, "x"), tok, "piqa", tmp_path)  # finds <dir>/piqa/valid.jsonl
    assert core(r) == {"acc": acc, "acc_norm": acc, "n": 2}
    assert r["acc_stderr"] == 0.0 and r["acc_norm_stderr"] == 0.0  # every answer alike: no spread


def test_zero_shot_acc_norm_divides_by_characters(tok, tmp_path):
    # Uniform model: ll = -n_tokens * log V. " xy" is 3 tokens (2 chars), " the the the the" is 4 (15 chars):
    # acc picks the first, acc_norm (per character) the second.
    d = piqa_files(tmp_path, 0, sols=("xy", "the the the the"))
    r = evaluate.zero_shot(Bigram(len(tok)), tok, "piqa", d / "valid.jsonl")
    assert core(r) == {"acc": 1.0, "acc_norm": 0.0, "n": 2}


@pytest.mark.parametrize("key,acc", [("A", 1.0), ("C", 0.0)])
def test_zero_shot_arc_forced(tok, tmp_path, key, acc):
    choices = [{"text": "xxx", "label": "A"}, {"text": "yy", "label": "B"}, {"text": "zzzz", "label": "C"}]
    path = write_jsonl(tmp_path / "ARC-Easy-Test.jsonl",
                       [{"question": {"stem": "s", "choices": choices}, "answerKey": key}] * 3)
    r = evaluate.zero_shot(prefer(tok, "x"), tok, "arc_easy", path, limit=2)
    assert core(r) == {"acc": acc, "acc_norm": acc, "n": 2}


@pytest.mark.parametrize("answer,acc", [(True, 1.0), (False, 0.0)])
def test_zero_shot_boolq_forced(tok, tmp_path, answer, acc):
    path = write_jsonl(tmp_path / "dev.jsonl", [{"question": "is it", "passage": "p", "answer": answer}])
    r = evaluate.zero_shot(prefer(tok, "yes"), tok, "boolq", path)
    assert r["acc"] == acc and r["n"] == 1


@pytest.mark.parametrize("answer,acc", [("1", 1.0), ("2", 0.0)])
def test_zero_shot_winogrande_scores_continuation_after_option(tok, tmp_path, answer, acc):
    # Only the shared continuation is scored; after "x" a space is near certain, so option1 "xx" wins.
    m = Bigram(len(tok))
    with torch.no_grad():
        m.table[tid(tok, "x"), tid(tok, "Ġ")] = 10.0
    path = write_jsonl(tmp_path / "dev.jsonl",
                       [{"sentence": "Then _ went home.", "option1": "xx", "option2": "qq", "answer": answer}])
    assert core(evaluate.zero_shot(m, tok, "winogrande", path)) == {"acc": acc, "acc_norm": acc, "n": 1}
    (doc,) = evaluate.load_task("winogrande", path)
    assert doc.requests == [("Then xx", " went home."), ("Then qq", " went home.")]


def test_task_loaders_report_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0},
                                                  {"goal": "g", "sol1": "a", "label": 1}])
    with pytest.raises(ValueError, match=r"valid\.jsonl, line 2.*sol2"):
        evaluate.load_task("piqa", path)
    (tmp_path / "valid-labels.lst").write_text("0\n")
    with pytest.raises(ValueError, match=r"valid-labels\.lst has 1 labels"):
        evaluate.load_task("piqa", path)
    bq = write_jsonl(tmp_path / "dev.jsonl", [{"question": "q", "passage": "p", "answer": "yes"}])
    with pytest.raises(ValueError, match=r"dev\.jsonl, line 1.*true/false"):
        evaluate.load_task("boolq", bq)
    write_jsonl(bq, [{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}])
    with pytest.raises(ValueError, match=r"dev\.jsonl, line 1"):
        evaluate.load_task("winogrande", bq)
    with pytest.raises(ValueError, match="unknown task"):
        evaluate.load_task("lambada", bq)
    with pytest.raises(FileNotFoundError, match="ARC-Easy-Test.jsonl"):
        evaluate.load_task("arc_easy", tmp_path)


def test_task_default_location_is_the_data_dir(tok, tmp_path, monkeypatch):
    piqa_files(tmp_path, 0)
    monkeypatch.setenv("FXPRUNE_DATA_DIR", str(tmp_path))
    assert len(evaluate.load_task("piqa")) == 2


# --- generation ---------------------------------------------------------------------------------------

def chain(tok, text):
    """A model that, after each character of `text`, predicts the next one (and EOS after the last)."""
    m = Bigram(len(tok))
    with torch.no_grad():
        for a, b in zip(text, text[1:]):
            m.table[tid(tok, a), tid(tok, b)] = 10.0
        m.table[tid(tok, text[-1]), tok.eos_token_id] = 10.0
    return m


def test_generate_greedy_stop_and_eos(tok):
    m = chain(tok, "abcdef")
    assert evaluate.generate(m, tok, "ab", max_new_tokens=3) == "cde"
    assert evaluate.generate(m, tok, "ab", max_new_tokens=50) == "cdef"  # stops at EOS
    assert evaluate.generate(m, tok, "ab", max_new_tokens=50, stop=["e"]) == "cd"


def test_generate_sampling_is_seeded(tok, llama):
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.5)
    a = evaluate.generate(llama, tok, "the", seed=3, **kw)
    assert a == evaluate.generate(llama, tok, "the", seed=3, **kw)
    assert a != evaluate.generate(llama, tok, "the", seed=4, **kw)
    # top_p tiny keeps only the most likely token: sampling becomes greedy.
    assert evaluate.generate(llama, tok, "the", 10, do_sample=True, top_p=1e-9) == evaluate.generate(llama, tok,
                                                                                                     "the", 10)
    with pytest.raises(ValueError, match="temperature"):
        evaluate.generate(llama, tok, "the", do_sample=True, temperature=0)


def test_generate_matches_hf_greedy(tok, llama):
    ids = tok("the quick", return_tensors="pt")["input_ids"]
    out = llama.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert evaluate.generate(llama, tok, "the quick", 8) == tok.decode(out[0, ids.shape[1]:],
                                                                       skip_special_tokens=True)


# --- lm-evaluation-harness adapter ------------------------------------------------------------------------

def test_lm_eval_missing_gives_install_hint(tok, monkeypatch):
    for name in ("lm_eval", "lm_eval.api", "lm_eval.api.model"):  # `import lm_eval...` then raises ImportError,
        monkeypatch.setitem(sys.modules, name, None)               # even after another test imported it
    with pytest.raises(ImportError, match="pip install lm_eval"):
        evaluate.lm_eval_model(Bigram(len(tok)), tok)
    with pytest.raises(ImportError, match="pip install lm_eval"):
        evaluate.LMEvalWrapper  # noqa: B018


def test_lm_eval_wrapper_with_stub_base_class(tok, monkeypatch):
    mod = types.ModuleType("lm_eval.api.model")
    mod.LM = type("LM", (), {"__init__": lambda self: None})
    for name, m in [("lm_eval", types.ModuleType("lm_eval")), ("lm_eval.api", types.ModuleType("lm_eval.api")),
                    ("lm_eval.api.model", mod)]:
        monkeypatch.setitem(sys.modules, name, m)
    model = chain(tok, "abcdef")
    lm = evaluate.lm_eval_model(model, tok, batch_size=2, max_length=16)
    assert isinstance(lm, mod.LM)
    req = [types.SimpleNamespace(args=("ab", "cd")), types.SimpleNamespace(args=("x", " y"))]
    assert lm.loglikelihood(req, disable_tqdm=True) == evaluate.loglikelihood(model, tok, [r.args for r in req])
    assert lm.loglikelihood_rolling([types.SimpleNamespace(args=("abc",))]) == [
        evaluate.loglikelihood_rolling(model, tok, "abc", max_length=16)]
    gen = [types.SimpleNamespace(args=("ab", {"until": ["e"], "max_gen_toks": 10, "do_sample": False}))]
    assert lm.generate_until(gen) == ["cd"]


# --- the real files, when a data directory is configured -------------------------------------------------

@pytest.mark.skipif(not os.environ.get("FXPRUNE_DATA_DIR"), reason="FXPRUNE_DATA_DIR not set")
def test_real_data_files_parse(tok):
    root = data.data_dir()
    for task in evaluate.TASKS:
        docs = evaluate.load_task(task, root, limit=20)
        assert len(docs) == 20
        assert all(0 <= d.gold < len(d.requests) and all(c and x for c, x in d.requests) for d in docs)
    assert len(data.alpaca_records(root / "alpaca" / "alpaca_cleaned_5k.json")[:20]) == 20
    texts = data.load_texts(root / "c4" / "c4_sample.json")[:20]
    assert data.calibration_samples(texts, tok, n_samples=4, seq_len=64).shape == (4, 64)
    assert evaluate.eval_windows(tok, root / "wikitext-2-raw" / "wiki.test.raw", 128, max_tokens=128 * 20).shape == (
        20, 128)
