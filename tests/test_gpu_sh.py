"""benchmarks/gpu.sh --dry-run: the GPU run's steps on CPU with tiny sizes, so the script cannot rot."""
import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_sh_dry_run(tmp_path):
    env = {**os.environ, "GPU_SH_OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--dry-run"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_run.json").read_text())
    steps = report["steps"]
    assert report["dry_run"] and steps["taylor_gradient_pass_bf16"]["dtype"] == "torch.bfloat16"
    for name in ("lora", "kd_lora", "kd_full"):
        assert steps[name]["steps"] == 3 and steps[name]["last_loss"] >= 0
        assert 1 < steps["ppl"][name] < 10_000
    assert steps["kd_full"]["trainable"] == "full" and steps["kd_lora"]["teacher"]
    assert "| kd_full | 3 |" in (tmp_path / "gpu_run.md").read_text()
    assert "test_cuda.py::" in (tmp_path / "cuda_tests.txt").read_text()  # the CUDA tests are collected
    assert "decode throughput" in (tmp_path / "gpu_sh.log").read_text()
