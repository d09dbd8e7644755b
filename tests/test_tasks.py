"""Task parsers (fxprune.evaluation.tasks) on hand-written records: lm-eval's prompt, choices and gold for each task."""
import bz2
import json

import pytest

from fxprune.evaluation import tasks
from fxprune.evaluation.tasks import Doc, load_task, mean_over_tasks, score_docs


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_boolq(tmp_path):
    (d,) = load_task("boolq", write(tmp_path / "dev.jsonl", [{"question": "is water wet", "passage": "Water is.",
                                                              "answer": True}]))
    ctx = "Water is.\nQuestion: is water wet?\nAnswer:"
    assert d.requests == [(ctx, " no"), (ctx, " yes")] and d.gold == 1 and d.choices == ["no", "yes"]


def test_piqa_labels_file(tmp_path):
    path = write(tmp_path / "valid.jsonl", [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat it"}])
    (tmp_path / "valid-labels.lst").write_text("0\n")
    (d,) = load_task("piqa", path)
    assert d.requests == [("Question: Open a jar\nAnswer:", " twist the lid"), ("Question: Open a jar\nAnswer:", " eat it")]
    assert d.gold == 0 and d.choices == ["twist the lid", "eat it"]


def arc(stem, key, labels="ABCD"):
    return {"question": {"stem": stem, "choices": [{"text": f"t{x}", "label": x} for x in labels]}, "answerKey": key}


def test_arc_easy_challenge_and_openbookqa_prompts(tmp_path):
    (e,) = load_task("arc_easy", write(tmp_path / "ARC-Easy-Test.jsonl", [arc("Why?", "C")]))
    assert e.requests[0] == ("Question: Why?\nAnswer:", " tA") and e.gold == 2 and e.choices == ["tA", "tB", "tC", "tD"]
    (c,) = load_task("arc_challenge", write(tmp_path / "ARC-Challenge-Test.jsonl", [arc("How?", "2", "1234")]))
    assert c.gold == 1 and c.requests[3] == ("Question: How?\nAnswer:", " t4")
    (o,) = load_task("openbookqa", write(tmp_path / "test.jsonl", [arc("The sun is a", "A")]))
    assert o.requests[1] == ("The sun is a", " tB") and o.gold == 0  # lm-eval's OBQA prompt is the bare stem


def test_winogrande_partial_scoring(tmp_path):
    path = write(tmp_path / "dev.jsonl", [{"sentence": "Sam gave Ann the cup because _ was thirsty.",
                                           "option1": "Sam", "option2": "Ann"}])
    (tmp_path / "dev-labels.lst").write_text("2\n")
    (d,) = load_task("winogrande", path)
    assert d.requests == [("Sam gave Ann the cup because Sam", " was thirsty."),
                          ("Sam gave Ann the cup because Ann", " was thirsty.")]
    assert d.gold == 1 and d.choices == ["Sam gave Ann the cup because Sam", "Sam gave Ann the cup because Ann"]


def test_hellaswag_text_form_and_lm_eval_preprocessing(tmp_path):
    lines = ["Roof shingle removal: A man is sitting on a roof. he", "3",
             "is using wrap.", "is ripping tiles off.", "is holding a cube.", "starts pulling up roofing.",
             "Baking: [header] How to bake bread [title] Mix the flour.", "0",
             "Knead  it.", "Eat it.", "Burn it.", "Sell it."]
    path = tmp_path / "hellaswag_val_full.txt.bz2"
    with bz2.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    first, second = load_task("hellaswag", tmp_path)
    # ctx_b ("he") is capitalised as lm-eval's process_docs does; the choices are the endings
    assert first.requests[0] == ("Roof shingle removal: A man is sitting on a roof. He", " is using wrap.")
    assert first.gold == 3 and len(first.requests) == 4
    # [markers] dropped, " [title]" -> ". ", double spaces collapsed
    assert second.requests[0] == ("Baking: How to bake bread. Mix the flour.", " Knead it.") and second.gold == 0
    # one pass of "  " -> " ", as lm-eval's: three spaces left by a dropped marker become two
    assert tasks.hellaswag_preprocess(" a [title] b  [step] c ") == "a. b  c"
    (tmp_path / "bad.txt").write_text("no colon here\n1\na\nb\nc\nd\n")
    with pytest.raises(ValueError, match=r"bad\.txt, line 1"):
        load_task("hellaswag", tmp_path / "bad.txt")


def test_score_docs_acc_acc_norm_ties_and_stderr():
    docs = [Doc([("c", " a"), ("c", " bbbb")], 1, ["a", "bbbb"]),   # acc picks 0, acc_norm picks 1
            Doc([("c", " a"), ("c", " b")], 0, ["a", "b"]),         # a tie goes to the first choice
            Doc([("c", " a"), ("c", " b")], 1, ["a", "b"])]
    r = score_docs(docs, [-1.0, -2.0, -3.0, -3.0, -1.0, -0.5])
    assert r["acc"] == pytest.approx(2 / 3) and r["acc_norm"] == pytest.approx(1.0) and r["n"] == 3
    # lm-eval's mean_stderr: sample std (n - 1) / sqrt(n); for 2 of 3 right: sqrt(1/3) / sqrt(3)
    assert r["acc_stderr"] == pytest.approx((1 / 3) ** 0.5 / 3 ** 0.5) and r["acc_norm_stderr"] == 0.0


def test_mean_over_tasks_uses_the_reported_metric_per_task():
    results = {"boolq": {"acc": 0.6, "acc_stderr": 0.03, "acc_norm": 0.0, "acc_norm_stderr": 0.0},
               "hellaswag": {"acc": 0.0, "acc_stderr": 0.0, "acc_norm": 0.4, "acc_norm_stderr": 0.04}}
    m = mean_over_tasks(results)
    assert m["value"] == pytest.approx(0.5) and m["stderr"] == pytest.approx(0.05 / 2)
    assert m["tasks"] == ["boolq", "hellaswag"]
