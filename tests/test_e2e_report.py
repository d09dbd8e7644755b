"""benchmarks/e2e_smollm2.py's report from synthetic state (no model runs): rows, seven tasks with standard errors."""
from benchmarks import e2e_smollm2 as e2e
from tests.test_benchmark_reports import HEADER


def test_e2e_report_rows_tasks_and_partial_state(tmp_path, monkeypatch):
    monkeypatch.setattr(e2e, "OUT", tmp_path)
    a = e2e.parse(["--work", str(tmp_path / "w"), "--name", "t"])
    zs = {t: {"acc": 0.5, "acc_stderr": 0.05, "acc_norm": 0.25, "acc_norm_stderr": 0.04, "n": 100} for t in e2e.TASKS}
    zs.update(mean={"value": 0.39, "stderr": 0.02}, parameters=134)
    state = {"models": {"dense": {"ppl": {"wikitext2_ppl_by_tokens": {"10240": 50.1, "20480": 53.75}}, "zeroshot": zs},
                        "r50/pruned": {}, "r20/kd_full_c4": {}, "r20/lora": {},
                        "r20/kd_full": {"tune": {"wall_s": 600, "load_start": [3.0], "load_end": [4.0]}}, "r20/pruned": {}}}
    e2e.write_report(a, dict(HEADER), state)
    md = (tmp_path / "t.md").read_text()
    dense = next(l for l in md.splitlines() if l.startswith("| dense |"))
    assert "| 50.10 | 53.75 |" in dense and "0.250 ± 0.040" in dense  # hellaswag reports acc_norm
    assert dense.count("0.500 ± 0.050") == 4 and dense.endswith("| 0.390 ± 0.020 |")
    tuned = next(l for l in md.splitlines() if l.startswith("| pruned 20% + distil, full weights |"))
    assert "| 10.0 (load 3.0→4.0) |" in tuned and tuned.count("| - ") >= 8  # not evaluated yet: dashes
    assert (tmp_path / "t.json").is_file()
    labels = [l.split(" | ")[0][2:] for l in md.splitlines() if l.startswith("| dense |") or l.startswith("| pruned")]
    assert labels == ["dense", "pruned 20%", "pruned 20% + LoRA", "pruned 20% + distil, full weights",
                      "pruned 20% + distil, full weights, C4 text", "pruned 50%"]  # dense, then ratio, recovery


def test_checkpoint_minutes_count_from_the_last_training_start(tmp_path):
    from benchmarks.checkpoint_ppl import step_times
    log = tmp_path / "run.log"
    log.write_text("\n".join([
        "2026-12-02 13:00:00,001 fxprune.lora: all weights, 9 trainable parameters, distilling the teacher",
        "2026-12-02 13:05:00,002 fxprune.lora: step 10/150 epoch 0 loss 1.0",  # an earlier, restarted run
        "loglikelihood: 10%|#   | 2/25",
        "2026-12-02 14:00:00,001 fxprune.lora: LoRA r=8 on 210 modules, 2068568 trainable parameters",
        "2026-12-02 14:12:30,500 fxprune.lora: step 50/150 epoch 0 loss 0.5",
        "2026-12-02 14:27:00,000 fxprune.lora: step 100/150 epoch 0 loss 0.4"]))
    assert step_times(log) == {50: 12.5, 100: 27.0}
