"""Meta-device capture + analysis of Llama-2-7B / 13B, Llama-3-70B and Mixtral-8x7B from their published configs.

Each model runs in a fresh process so peak memory (ru_maxrss) is its own.
Usage: python -m benchmarks.meta_scale [7b 13b 70b]
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

CONFIGS = {  # published config.json values
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "mixtral-8x7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, rope_theta=1e6,
                         num_local_experts=8, num_experts_per_tok=2),
}


def run_one(name: str) -> dict:
    import torch
    import transformers
    import fxprune
    torch.set_num_threads(2)
    family = "Mixtral" if name.startswith("mixtral") else "Llama"
    cfg = getattr(transformers, f"{family}Config")(**CONFIGS[name])
    cfg._attn_implementation = "sdpa"
    t = time.time()
    with torch.device("meta"):
        model = getattr(transformers, f"{family}ForCausalLM")(cfg)
    dg = fxprune.analyze(model)
    wall = time.time() - t
    kinds = {}
    for g in dg.groups:
        kinds[g.kind] = kinds.get(g.kind, 0) + 1
    experts = {}
    if dg.by_kind("experts"):  # plan whole experts (equal scores): what the analysis allows at scale
        plan = fxprune.plan(model, 0.24, targets=("experts",), scores={g.id: torch.ones(g.n_units) for g in dg.groups},
                            dg=dg)
        experts = {"ratio": 0.24, "removed": round(plan.removed_fraction, 4), "params_after": plan.params_after,
                   "kept_per_layer": sorted({len(u) for u in plan.units.values()})}
    return {"model": name, "parameters": dg.num_parameters(), "nodes": len(dg.gm.graph.nodes),
            "groups": kinds, "wall_s": round(wall, 1), "experts_plan": experts,
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}


def main(argv):
    if argv and argv[0] == "--one":
        print(json.dumps(run_one(argv[1])))
        return
    from benchmarks.common import report_head, RESULTS, finish, header, md_table, write_json
    names = [n for n in CONFIGS if not argv or any(a in n for a in argv)]
    report = header(2)
    report["results"] = []
    for n in names:
        out = subprocess.run([sys.executable, "-m", "benchmarks.meta_scale", "--one", n], capture_output=True, text=True, check=True)
        report["results"].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(report["results"][-1], flush=True)
    finish(report)
    write_json(RESULTS / "meta_scale.json", report)
    rows = [[r["model"], f"{r['parameters']:,}", f"{r['nodes']:,}", ", ".join(f"{k} {v}" for k, v in r["groups"].items()),
             f"{r['wall_s']} s", f"{r['peak_rss_gb']} GB"] for r in report["results"]]
    (RESULTS / "meta_scale.md").write_text("\n".join([
        *report_head("Meta-device capture and dependency analysis at scale (issue 6)", report),
        "Published configs of each model built on the meta device (no weights), captured with torch.export and "
        "analysed; one fresh process per model, so the peak RSS (ru_maxrss) is that model's own.", "",
        md_table(["model (published config)", "parameters", "graph nodes", "groups", "wall time", "peak RSS"], rows),
        "", *[f"{r['model']}: plan of whole experts at ratio {r['experts_plan']['ratio']} (equal scores): removed "
              f"{r['experts_plan']['removed']:.2%}, {r['experts_plan']['params_after']:,} parameters left, experts kept "
              f"per layer {r['experts_plan']['kept_per_layer']}." for r in report["results"] if r.get("experts_plan")],
        ""]))

if __name__ == "__main__":
    main(sys.argv[1:])
