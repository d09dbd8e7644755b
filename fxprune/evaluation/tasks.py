"""The seven zero-shot tasks of the pruning literature (LLM-Pruner's table), parsed from local files into
lm-evaluation-harness's requests: the same prompt (doc_to_text), choices (doc_to_choice), target
delimiter " ", gold index, and the same choice strings whose length acc_norm divides by.

Formats read (the public releases; see the data directory's README):
  boolq          dev.jsonl                        {"question", "passage", "answer": bool}
  piqa           valid.jsonl + valid-labels.lst   {"goal", "sol1", "sol2"}, label 0/1 on line i
  hellaswag      hellaswag_val_full.txt(.bz2)     llama.cpp's text form, 6 lines a task (see `_hellaswag_docs`)
  winogrande     dev.jsonl + dev-labels.lst       {"sentence" with "_", "option1", "option2"}, answer 1/2
  arc_easy       ARC-Easy-Test.jsonl              {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}
  arc_challenge  ARC-Challenge-Test.jsonl         same as arc_easy
  openbookqa     test.jsonl                       same as arc_easy (lm-eval's prompt is the bare stem)
"""
from __future__ import annotations

import bz2
import json
import re
from dataclasses import dataclass
from pathlib import Path

TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# The metric the seeds' tables (LLM-Pruner and followers) report per task: acc_norm where lm-eval's length
# normalisation matters.
REPORTED = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc", "arc_easy": "acc",
            "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
DELIMITER = " "  # lm-eval's default target_delimiter


@dataclass
class Doc:
    """One multiple-choice question as lm-eval scores it.

    requests: (context, continuation) per choice; gold: index of the right one; choices: the strings
    lm-eval's acc_norm divides each log-likelihood by the length of (doc_to_choice: the answer texts,
    or for WinoGrande's partial scoring the contexts)."""
    requests: list[tuple[str, str]]
    gold: int
    choices: list[str]


def multiple_choice(context: str, choices: list[str], gold: int) -> Doc:
    """The usual case: one context, the choice appended after the target delimiter."""
    if not 0 <= gold < len(choices):
        raise IndexError(f"gold index {gold} out of range for {len(choices)} choices")
    return Doc([(context, DELIMITER + c) for c in choices], gold, list(choices))


def _boolq(r, label):
    if not isinstance(r["answer"], bool):
        raise TypeError(f"answer must be true/false, got {r['answer']!r}")
    return multiple_choice(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], int(r["answer"]))


def _piqa(r, label):
    gold = int(label if label is not None else r["label"])
    return multiple_choice(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], gold)


def _arc_parts(r):
    q = r["question"]
    texts = [c["text"] for c in q["choices"]]
    gold = [c["label"] for c in q["choices"]].index(r["answerKey"].strip())
    return q["stem"], texts, gold


def _arc(r, label):
    stem, texts, gold = _arc_parts(r)
    return multiple_choice(f"Question: {stem}\nAnswer:", texts, gold)


def _openbookqa(r, label):
    stem, texts, gold = _arc_parts(r)
    return multiple_choice(stem, texts, gold)


def _winogrande(r, label):
    # lm-eval's partial evaluation: each option fills the blank to make a context, and the shared rest of
    # the sentence is the continuation scored under both.
    s = r["sentence"]
    cut = s.index("_")
    contexts = [s[:cut] + r["option1"], s[:cut] + r["option2"]]
    rest = s[cut + 1:].strip()
    gold = {"1": 0, "2": 1}[str(label if label is not None else r["answer"]).strip()]
    return Doc([(c, DELIMITER + rest) for c in contexts], gold, contexts)


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag text cleaning: strip, " [title]" -> ". ", drop other [markers], collapse double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def split_hellaswag_context(context: str) -> tuple[str, str]:
    """(ctx_a, ctx_b) of a joined HellaSwag context: ctx_b is the unfinished last sentence (after the last
    ". ") when it starts in lower case, as ctx_b does once the file has lost the split; else ("context", "").
    lm-eval capitalises ctx_b, so this restores its query wherever ctx_b is an unfinished lower-case clause."""
    cut = context.rfind(". ")
    if cut < 0 or not context[cut + 2:cut + 3].islower():
        return context, ""
    return context[:cut + 1], context[cut + 2:]


def hellaswag_doc(activity_label: str, ctx_a: str, ctx_b: str, endings: list[str], gold: int) -> Doc:
    """lm-eval's process_docs: query "<activity>: <ctx_a> <ctx_b capitalised>", choices the endings."""
    query = hellaswag_preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
    return multiple_choice(query, [hellaswag_preprocess(e) for e in endings], gold)


def _hellaswag_docs(path: Path) -> list[tuple[int, dict]]:
    """Records of llama.cpp's HellaSwag text: per task a line "<activity_label>: <ctx>", the gold index,
    then four endings. Returned as (line number, {"activity_label", "ctx_a", "ctx_b", "endings", "label"})."""
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines, not a multiple of 6 (context, label, four endings per task)")
    out = []
    for start in range(0, len(lines), 6):
        head, label, *endings = lines[start:start + 6]
        activity, sep, context = head.partition(": ")
        if not sep or not label.strip().isdigit():
            raise ValueError(f"{path}, line {start + 1}: expected '<activity>: <context>' then a label 0-3, "
                             f"got {head[:60]!r} / {label[:10]!r}")
        ctx_a, ctx_b = split_hellaswag_context(context)
        out.append((start + 1, {"activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "endings": endings,
                                "label": int(label)}))
    return out


def _hellaswag(r, label):
    return hellaswag_doc(r["activity_label"], r["ctx_a"], r["ctx_b"], list(r["endings"]), int(r["label"]))


@dataclass(frozen=True)
class TaskSpec:
    """Where one zero-shot task's data is and how to read it: candidate `records` files, an optional `labels` file,
    the `parse` function of a record and the expected `schema` for error messages."""
    records: tuple[str, ...]   # candidate file names, first found wins
    labels: str | None         # labels file beside the records (line i labels record i), or None
    parse: object
    schema: str                # the expected record, for error messages


ARC_SCHEMA = '{"question": {"stem": str, "choices": [{"text", "label"}]}, "answerKey": one of the labels}'
SPECS = {
    "boolq": TaskSpec(("dev.jsonl",), None, _boolq, '{"question": str, "passage": str, "answer": true/false}'),
    "piqa": TaskSpec(("valid.jsonl",), "valid-labels.lst", _piqa,
                     '{"goal": str, "sol1": str, "sol2": str} with a label 0/1 (labels file, or "label")'),
    "hellaswag": TaskSpec(("hellaswag_val_full.txt.bz2", "hellaswag_val_full.txt"), None, _hellaswag,
                          "6 lines: '<activity>: <context>', a label 0-3, four endings"),
    "winogrande": TaskSpec(("dev.jsonl",), "dev-labels.lst", _winogrande,
                           '{"sentence": str with "_", "option1": str, "option2": str} with answer "1"/"2" '
                           '(labels file, or "answer")'),
    "arc_easy": TaskSpec(("ARC-Easy-Test.jsonl",), None, _arc, ARC_SCHEMA),
    "arc_challenge": TaskSpec(("ARC-Challenge-Test.jsonl",), None, _arc, ARC_SCHEMA),
    "openbookqa": TaskSpec(("test.jsonl",), None, _openbookqa, ARC_SCHEMA),
}


def task_file(task: str, path_or_dir=None) -> Path:
    """The records file of `task`: `path_or_dir` itself if a file, else <dir>/<file> or <dir>/<task>/<file>;
    with no path, <FXPRUNE_DATA_DIR>/<task>/<file>. FileNotFoundError names the path looked for."""
    from fxprune.data.loaders import data_dir
    if task not in SPECS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    p = data_dir() / task if path_or_dir is None else Path(path_or_dir)
    if p.is_dir():
        folder = p / task if (p / task).is_dir() else p
        names = SPECS[task].records
        p = next((folder / n for n in names if (folder / n).is_file()), folder / names[0])
    if not p.is_file():
        raise FileNotFoundError(f"{task}: records file {p} not found")
    return p


def _json_lines(path: Path, labels_name) -> list[tuple[int, dict, str | None]]:
    lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    labels = None
    label_path = path.with_name(path.stem + "-labels.lst") if labels_name else None
    if label_path is not None and label_path.is_file():
        labels = [x.strip() for x in label_path.read_text(encoding="utf-8").splitlines() if x.strip()]
        if len(labels) != len(lines):
            raise ValueError(f"{label_path} has {len(labels)} labels but {path} has {len(lines)} records")
    out = []
    for k, (n, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {n}: invalid JSON ({exc.msg})") from None
        out.append((n, record, labels[k] if labels else None))
    return out


def load_task(task: str, path_or_dir=None, limit=None) -> list[Doc]:
    """Parse and validate the first `limit` records of a task; errors name the file and line."""
    path = task_file(task, path_or_dir)
    spec = SPECS[task]
    if task == "hellaswag":
        records = [(n, r, None) for n, r in _hellaswag_docs(path)]
    else:
        records = _json_lines(path, spec.labels)
    docs = []
    for n, record, label in records[:limit] if limit is not None else records:
        try:
            docs.append(spec.parse(record, label))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise ValueError(f"{path}, line {n}: expected a {task} record {spec.schema}; "
                             f"{type(exc).__name__}: {exc}") from None
    if not docs:
        raise ValueError(f"{path}: no {task} records")
    return docs


# --- scoring ------------------------------------------------------------------------------------------

def argmax_first(values) -> int:
    """Index of the largest value, the first on ties (numpy.argmax's rule, which lm-eval uses)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def mean_and_stderr(values) -> tuple[float, float]:
    """Mean and lm-eval's `mean_stderr`: the sample standard deviation (n - 1) over sqrt(n)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, (var / n) ** 0.5


def score_docs(docs: list[Doc], loglikelihoods: list[float]) -> dict:
    """acc and acc_norm as lm-eval's multiple_choice process_results computes them: acc picks the highest
    summed log-likelihood; acc_norm divides each by the character length of its choice string
    (`len(choice)` of doc_to_choice). Each with its standard error; n the number of documents."""
    lls = iter(loglikelihoods)
    acc, acc_norm = [], []
    for d in docs:
        scores = [next(lls) for _ in d.requests]
        acc.append(float(argmax_first(scores) == d.gold))
        acc_norm.append(float(argmax_first([s / len(c) for s, c in zip(scores, d.choices)]) == d.gold))
    result = {"n": len(docs)}
    for name, values in (("acc", acc), ("acc_norm", acc_norm)):
        result[name], result[name + "_stderr"] = mean_and_stderr(values)
    return result


def mean_over_tasks(results: dict) -> dict:
    """{"value", "stderr", "tasks"}: the average of each task's reported metric (REPORTED) and the standard
    error of that average, sqrt(sum of squared standard errors) / number of tasks (independent samples)."""
    tasks = [t for t in TASKS if t in results]
    if not tasks:
        raise ValueError("no task results to average")
    values = [results[t][REPORTED[t]] for t in tasks]
    errors = [results[t][REPORTED[t] + "_stderr"] for t in tasks]
    return {"value": sum(values) / len(values), "stderr": sum(e * e for e in errors) ** 0.5 / len(tasks),
            "tasks": tasks}
