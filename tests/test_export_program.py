"""torch.export program (.pt2): loads and runs in a fresh process with torch only, at other batch
and sequence sizes than the example; the AOTInductor package runs compiled (slow test)."""
import subprocess
import sys
import textwrap

import pytest
import torch

import fxprune
from models import llama
from oracles import inputs, prune_random, rel_err

RUN = textwrap.dedent('''
    import sys, torch
    program = torch.export.load(sys.argv[1]).module()
    ids, mask = torch.load(sys.argv[2])
    with torch.no_grad():
        torch.save(program(ids, mask), sys.argv[3])
    print("fxprune" in sys.modules)
''')


@pytest.fixture(scope="module")
def pruned():
    return prune_random(llama(), 0.3, targets=("heads", "mlp", "hidden"))[2]


def test_program_runs_in_fresh_process(pruned, tmp_path):
    path = fxprune.export_program(pruned, tmp_path / "m.pt2")
    ids, mask = inputs(batch=3, seq=13)  # the example had batch 2, sequence 8
    torch.save((ids, mask), tmp_path / "in.pt")
    done = subprocess.run([sys.executable, "-c", RUN, str(path), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"  # fxprune was not imported to run it
    got = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        expected = pruned(ids, attention_mask=mask).logits
    assert rel_err(got[mask.bool()], expected[mask.bool()]) < 1e-5


def test_program_refuses_existing_file_and_other_suffix(pruned, tmp_path):
    (tmp_path / "m.pt2").write_bytes(b"mine")
    with pytest.raises(fxprune.ExportError, match="not empty"):
        fxprune.export_program(pruned, tmp_path / "m.pt2")
    with pytest.raises(fxprune.ExportError, match=r"\.pt2"):
        fxprune.export_program(pruned, tmp_path / "m.zip")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2"]


@pytest.mark.slow
def test_aoti_package_runs_compiled(pruned, tmp_path):
    path = fxprune.export_program(pruned, tmp_path / "m.pt2", aoti=True)
    runner = torch._inductor.aoti_load_package(str(path))
    ids, mask = inputs(batch=3, seq=13)
    with torch.no_grad():
        expected = pruned(ids, attention_mask=mask).logits
    assert rel_err(runner(ids, mask)[mask.bool()], expected[mask.bool()]) < 1e-4
