"""The command line on a tiny local model directory."""
import subprocess
import sys

from models import llama


def test_inspect_prints_groups_and_writes_pictures(tmp_path):
    llama("sdpa").save_pretrained(tmp_path / "m")
    out = subprocess.run([sys.executable, "-m", "fxprune.cli", "inspect", str(tmp_path / "m"),
                          "--dot", str(tmp_path / "g.dot"), "--png", str(tmp_path / "g.png")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "kv_groups: 2" in out.stdout and "mlp: 2" in out.stdout and "hidden: 1" in out.stdout
    assert (tmp_path / "g.dot").read_text().startswith("graph fxprune")
    assert (tmp_path / "g.png").stat().st_size > 10_000


def test_missing_model_path_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fxprune.cli", "inspect", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "not a local directory" in out.stderr
