"""The benchmark scripts turn measured JSON into Markdown tables and PNG plots; check that from synthetic
results (no model runs here), so a broken report fails CI rather than a 30-minute `make bench`."""
import json

import pytest

pytest.importorskip("matplotlib")

MACHINE = {"machine": "x86_64", "cpu": "Test CPU", "cores": 2, "torch_threads": 2, "python": "3.11",
           "torch": "2.13.0", "transformers": "5.0", "platform": "linux"}
HEADER = {"machine": MACHINE, "date": "2026-11-23 12:00 UTC", "command": "python -m benchmarks.x",
          "load_average_start": [0.1, 0.1, 0.1], "other_processes_start": [],
          "load_average_end": [1.0, 1.0, 1.0], "other_processes_end": []}


def throughput_report():
    rows = []
    for mode in ("eager", "compile"):
        for rt, speed in ((1, 1.12), (64, 1.2)):
            rows.append({"mode": mode, "batch": 4, "seq": 512, "round_to": rt, "variant": "unrounded" if rt == 1
                         else f"round_to {rt}", "dense_tok_s": 400.0, "pruned_tok_s": 400 * speed,
                         "speedup_median": speed, "dense_spread": 0.1, "pruned_spread": 0.1})
    variants = {"1": {"params": 80, "linear": 80, "ideal_params": 1.25, "ideal_linear": 1.25},
                "64": {"params": 79, "linear": 79, "ideal_params": 1.27, "ideal_linear": 1.27}}
    return {**HEADER, "settings": {"ratio": 0.2, "importance": "l2", "protect": [0, -1], "warmup": 1, "runs": 3},
            "params_dense": 100, "linear_dense": 100, "variants": variants, "ideal_params": 1.27, "rows": rows,
            "compile_s": {"dense 4x512": 40.0}}


def test_throughput_table_flags_the_bar_and_plots(tmp_path):
    from benchmarks.throughput import plot, render
    report = throughput_report()
    png = tmp_path / "t.png"
    plot(report, png)
    md = render(report, png)
    assert png.stat().st_size > 10_000
    lines = [l for l in md.splitlines() if l.startswith("| eager | 4 x 512")]
    assert len(lines) == 2 and "| no |" in lines[0] and "| yes |" in lines[1]
    assert "Test CPU" in md and "2026-11-23" in md and "![throughput and speedup](t.png)" in md


def test_torch_pruning_table_reports_cost_ratio():
    from benchmarks.torch_pruning_compare import render
    phase = {"wall_s": 1.0}
    rows = [{"target": 0.2, "tool": "fxprune", "params": 80, "removed_fraction": 0.2, "heads": "6/2",
             "mlp_width": "1024", "ppl": 100.0, "prune_wall_s": 30.0, "peak_rss_gb": 1.0, "peak_increase_gb": 0.2,
             "phases": {"capture": phase}},
            {"target": 0.2, "tool": "torch-pruning", "params": 80, "params_predicted": 80, "removed_fraction": 0.2,
             "heads": "6/3", "mlp_width": "1000", "ppl": 400.0, "prune_wall_s": 10.0, "peak_rss_gb": 1.0,
             "peak_increase_gb": 0.1, "phases": {"score + prune": phase}, "zero_mask_rel_err": 3e-6}]
    report = {**HEADER, "settings": {"round_to": 4, "protect": [0], "window": 128, "eval_tokens": 1024},
              "tp_version": "1.6.1", "dense": {"params": 100, "ppl": 50.0}, "rows": rows}
    md = render(report)
    ratio_line = next(l for l in md.splitlines() if l.startswith("| 0.2 | 30.0 | 10.0"))
    assert "**3.00**" in ratio_line and "0.25" in ratio_line
    assert "correct prunings" in md and "3.0e-06 at 0.2" in md
    rows[1]["zero_mask_rel_err"] = 0.5
    assert "Warning: Torch-Pruning's pruned models differ" in render(report)


def test_run_all_report_gathers_sections_and_quality_plot(tmp_path, monkeypatch):
    import benchmarks.run_all as run_all
    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    sweep = {**HEADER, "settings": {"methods": ["l2", "hywia"], "eval_tokens": 1024}, "dense": {"ppl": 50.0},
             "rows": [{"method": m, "ratio": r, "removed_fraction": r, "ppl": 60 + 100 * r + (m == "l2") * 10}
                      for m in ("l2", "hywia") for r in (0.1, 0.2)]}
    tp = {**HEADER, "rows": [{"tool": "torch-pruning", "removed_fraction": r, "ppl": 500.0 * r} for r in (0.1, 0.2)]}
    (tmp_path / "importance_sweep.json").write_text(json.dumps(sweep))
    (tmp_path / "importance_sweep.md").write_text("# Sweep\n\nrows\n")
    (tmp_path / "torch_pruning_quick.json").write_text(json.dumps(tp))
    run_all.write_report([{"name": "sweep", "wall_s": 60.0, "rc": 0}], ran_now=True)
    report = (tmp_path / "report.md").read_text()
    assert (tmp_path / "quality_vs_ratio.png").stat().st_size > 10_000
    assert "## Importance sweep" in report and "### Sweep" in report
    assert "`torch_pruning_quick`" not in report or "Not present" in report
    assert "| sweep | 1.0 | 0 |" in report


def test_reconstruction_check_renders_every_run_line(tmp_path):
    from benchmarks.reconstruction_check import render
    runs = tmp_path / "runs.jsonl"
    rows = [{"ratio": 0.2, "samples": 64, "seed": s, "variant": v, "held-out C4": c4, "WikiText-2": wiki,
             "refit text": 50.0, "apply_s": 61.0, "load": [4.5], "choices": {"lstsq:1": 30, "keep": 4} if s else {},
             "params": 80, "machine": HEADER} for s, v, c4, wiki in ((0, "none:0:uniform", 111.14, 121.0),
                                                                    (1, "lstsq:auto:residual", 93.84, 114.93))]
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = render(runs, tmp_path / "r.md")
    assert (tmp_path / "r.md").read_text() == md
    line = next(l for l in md.splitlines() if "lstsq:auto:residual" in l)
    assert "| 93.84 | 114.93 | 50.00 | 61 | 4.5 | keep 4, lstsq:1 30 |" in line
    assert "Test CPU" in md and "2026-11-23" in md


def test_reconstruction_table_runs_on_two_cores_fill_one_table(tmp_path):
    """Two --resume runs save into one JSON: each keeps the other's cells and command, and the cell dict
    the running draw loop holds stays the one that is saved."""
    from benchmarks.reconstruction_table import merged, write_report
    path = tmp_path / "t.json"
    cell = {"ppl": 150.0, "removed": 0.2, "params_after": 1, "score_s": 1.0, "apply_s": 2.0, "apply_peak_gb": 1.0}
    settings = {"eval_tokens": 10240, "calib_samples": 32, "calib_len": 128, "refit_samples": 64,
                "targets": ["heads", "mlp"], "calib_source": "wikitext-2-raw/wiki.valid.tokens", "c4_eval": 16}

    def report(date, cells):
        return {**HEADER, "date": date, "command": f"run at {date}", "settings": settings, "dense_ppl": 63.3,
                "dense_ppl_c4": 48.9, "protected": [0, 29], "cells": cells,
                "runs": [{"command": f"run at {date}", "date": date, "load_average_start": [0.1]}]}
    first = report("2026-12-02 10:00 UTC", {"flap/none/0.2/1": {**cell, "ppl_c4": 120.0}, "_cost": {"inputs/1": {"s": 5, "peak_gb": 1}}})
    with merged(path, first, resume=True):
        path.write_text(json.dumps(first))
    second = report("2026-12-02 10:05 UTC", {"wanda/none/0.5/1": {**cell, "ppl": 900.0}})
    held = second["cells"]
    with merged(path, second, resume=True):
        path.write_text(json.dumps(second))
    assert held is second["cells"]
    assert set(held) == {"flap/none/0.2/1", "wanda/none/0.5/1", "_cost"} and held["_cost"]["inputs/1"]["s"] == 5
    assert [r["date"] for r in second["runs"]] == ["2026-12-02 10:00 UTC", "2026-12-02 10:05 UTC"]
    write_report(second, tmp_path / "t")
    md = (tmp_path / "t.md").read_text()
    assert "`run at 2026-12-02 10:00 UTC`" in md and "`run at 2026-12-02 10:05 UTC`" in md
    assert "| flap | none | 150.0 [150.0-150.0] | - |" in md and "| wanda | none | - | 900.0 [900.0-900.0] |" in md
    # the second domain's table holds only the cells that measured it, and names the calibration source
    assert "| flap | none | 120.0 [120.0-120.0] | - |" in md and "| wanda | none | - | - |" in md
    assert "`wikitext-2-raw/wiki.valid.tokens`" in md and "dense 48.90" in md
    # modes no run measured get no rows (the cells here are all without reconstruction)
    assert "| bias |" not in md and "| lstsq |" not in md and "Modes: none." in md
