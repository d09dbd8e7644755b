"""The seven tasks against lm-evaluation-harness itself: its own task configs (prompts, choices, HellaSwag's
preprocessing, WinoGrande's partial scoring) and its own metrics, run by its own HFLM on a tiny model, fed
the same local documents; fxprune's built-in `zero_shot` and its `lm_eval_model` wrapper must give the same
acc, acc_norm and standard errors to the 4th decimal. lm-eval is the `eval` extra (installed by
`make install`); it cannot download here, so its tasks read our records, rewritten into the Hugging Face
datasets' schema, through datasets' local "json" builder."""
from __future__ import annotations

import bz2
import json
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_tokenizer import tiny_tokenizer  # noqa: E402

import lm_eval  # noqa: E402  (the `eval` extra: a missing install fails here, it does not skip)
import lm_eval.tasks  # noqa: E402
from lm_eval.evaluator import evaluate as lm_eval_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from fxprune.evaluation import evaluate  # noqa: E402
from fxprune.evaluation.tasks import TASKS, _hellaswag_docs  # noqa: E402

N_DOCS = 24
# lm-eval's own config of each task (under lm_eval/tasks/), read directly: indexing every task is slow.
LM_EVAL_YAML = {"boolq": "super_glue/boolq/default.yaml", "piqa": "piqa/piqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
                "winogrande": "winogrande/default.yaml", "arc_easy": "arc/arc_easy.yaml",
                "arc_challenge": "arc/arc_challenge.yaml", "openbookqa": "openbookqa/openbookqa.yaml"}
WORDS = ("the cat dog sun runs jumps over a red blue tree water hot cold big small he she went home "
         "stone is in on put pan cut bread").split()


def phrase(rng, lo=2, hi=7):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def arc_record(rng, labels="ABCD"):
    choices = [{"text": phrase(rng, 1, 4), "label": x} for x in labels]
    return {"question": {"stem": phrase(rng) + "?", "choices": choices}, "answerKey": rng.choice(labels)}


def write_local(root: Path, seed=0) -> None:
    """N_DOCS records of every task in the local formats fxprune reads (see fxprune.evaluation.tasks)."""
    rng = random.Random(seed)
    files = {}
    files["boolq/dev.jsonl"] = [{"question": phrase(rng), "passage": phrase(rng, 5, 12) + ".",
                                 "answer": rng.random() < 0.5} for _ in range(N_DOCS)]
    files["piqa/valid.jsonl"] = [{"goal": phrase(rng), "sol1": phrase(rng), "sol2": phrase(rng)} for _ in range(N_DOCS)]
    files["winogrande/dev.jsonl"] = [{"sentence": f"{phrase(rng)} _ {phrase(rng)}.", "option1": rng.choice(WORDS),
                                      "option2": rng.choice(WORDS)} for _ in range(N_DOCS)]
    files["arc_easy/ARC-Easy-Test.jsonl"] = [arc_record(rng) for _ in range(N_DOCS)]
    files["arc_challenge/ARC-Challenge-Test.jsonl"] = [arc_record(rng, "1234") for _ in range(N_DOCS)]
    files["openbookqa/test.jsonl"] = [arc_record(rng) for _ in range(N_DOCS)]
    for name, records in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "piqa/valid-labels.lst").write_text("".join(f"{rng.randint(0, 1)}\n" for _ in range(N_DOCS)))
    (root / "winogrande/dev-labels.lst").write_text("".join(f"{rng.randint(1, 2)}\n" for _ in range(N_DOCS)))
    lines = []
    for _ in range(N_DOCS):  # llama.cpp's text form; some contexts end mid-sentence in lower case (ctx_b)
        context = f"{phrase(rng)}. {phrase(rng, 1, 3)}" if rng.random() < 0.7 else phrase(rng) + "."
        lines += [f"{rng.choice(['Cooking', 'Sports'])}: {context}", str(rng.randint(0, 3))]
        lines += [phrase(rng) + "." for _ in range(4)]
    (root / "hellaswag").mkdir()
    with bz2.open(root / "hellaswag/hellaswag_val_full.txt.bz2", "wt") as f:
        f.write("\n".join(lines) + "\n")


def hf_schema(task: str, root: Path) -> list[dict]:
    """The local records in the schema of the Hugging Face dataset lm-eval's task config reads."""
    def jsonl(name):
        return [json.loads(line) for line in (root / name).read_text().splitlines()]

    def labels(name):
        return (root / name).read_text().split()

    def arc(r, stem_key):
        q = r["question"]
        return {stem_key: q["stem"], "answerKey": r["answerKey"],
                "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}}

    if task == "boolq":
        return [{"question": r["question"], "passage": r["passage"], "label": int(r["answer"])}
                for r in jsonl("boolq/dev.jsonl")]
    if task == "piqa":
        return [{**r, "label": int(x)} for r, x in zip(jsonl("piqa/valid.jsonl"), labels("piqa/valid-labels.lst"))]
    if task == "winogrande":
        return [{**r, "answer": x} for r, x in zip(jsonl("winogrande/dev.jsonl"), labels("winogrande/dev-labels.lst"))]
    if task == "hellaswag":
        return [{**r, "label": str(r["label"])} for _, r in _hellaswag_docs(root / "hellaswag/hellaswag_val_full.txt.bz2")]
    if task == "openbookqa":
        return [arc(r, "question_stem") for r in jsonl("openbookqa/test.jsonl")]
    name = {"arc_easy": "arc_easy/ARC-Easy-Test.jsonl", "arc_challenge": "arc_challenge/ARC-Challenge-Test.jsonl"}[task]
    return [arc(r, "question") for r in jsonl(name)]


def lm_eval_task(task: str, data_file: Path):
    """lm-eval's registered task config (its YAML, with its !function hooks), reading `data_file` instead of the hub."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml
    config = load_yaml(Path(lm_eval.tasks.__file__).parent / LM_EVAL_YAML[task], resolve_func=True)
    assert config["task"] == task
    config.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {"validation": str(data_file)}},
                  training_split=None, validation_split="validation", test_split=None, fewshot_split=None)
    return ConfigurableTask(config=config)


def peaked_model(vocab_size):
    from tests.models import llama
    model = llama(vocab_size=vocab_size, seed=3)
    with torch.no_grad():  # peaked predictions: no near-ties that batching noise could flip
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    return model


def run_lm_eval(lm, tasks: dict) -> dict:
    # bootstrap_iters > 0 turns standard errors on; for "mean" metrics lm-eval uses its closed-form mean_stderr
    out = lm_eval_evaluate(lm=lm, task_dict=tasks, bootstrap_iters=1, verbosity="ERROR")["results"]
    return {t: {k.split(",")[0]: v for k, v in r.items() if "," in k} for t, r in out.items()}


def test_seven_tasks_match_lm_evaluation_harness(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    write_local(root)
    tok = tiny_tokenizer()
    model = peaked_model(len(tok))
    tasks = {}
    for task in TASKS:
        data_file = tmp_path / f"{task}.jsonl"
        data_file.write_text("".join(json.dumps(r) + "\n" for r in hf_schema(task, root)))
        tasks[task] = lm_eval_task(task, data_file)
    reference = run_lm_eval(HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=256), tasks)
    through_wrapper = run_lm_eval(evaluate.lm_eval_model(model, tok, batch_size=4, max_length=256), tasks)
    assert set(reference) == set(TASKS)  # lm-eval ran every task
    for task in TASKS:
        ours = evaluate.zero_shot(model, tok, task, root, batch_size=4, max_length=256)
        ref = reference[task]
        assert ours["n"] == N_DOCS
        metrics = [m for m in ("acc", "acc_norm") if m in ref]  # boolq and winogrande report acc only
        assert "acc" in metrics and (task in ("boolq", "winogrande") or "acc_norm" in metrics)
        for m in metrics:
            for key in (m, m + "_stderr"):
                assert ours[key] == pytest.approx(ref[key], abs=5e-5), (task, key, ours[key], ref[key])
                assert through_wrapper[task][key] == pytest.approx(ref[key], abs=5e-5), (task, key)
    # the metrics are not degenerate: the tiny model is right on some documents and wrong on others
    assert 0 < sum(reference[t]["acc"] for t in TASKS) / len(TASKS) < 1
