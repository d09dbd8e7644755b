"""Load exported Hugging Face directories with plain transformers in a fresh process where fxprune
cannot be imported (isolated mode, a temporary cwd), and hand back each one's logits and cached greedy generation."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

SCRIPT = textwrap.dedent('''
    import importlib.util, pathlib, sys
    # The editable install puts a finder for fxprune on sys.meta_path: drop it and any path holding it.
    sys.meta_path[:] = [f for f in sys.meta_path
                        if "fxprune" not in (getattr(f, "__module__", "") + getattr(type(f), "__module__", ""))]
    sys.path[:] = [p for p in sys.path if not (pathlib.Path(p or ".") / "fxprune").is_dir()]
    assert importlib.util.find_spec("fxprune") is None, "fxprune must not be importable here"
    import torch
    from transformers import AutoModelForCausalLM
    request = torch.load(sys.argv[1])
    out = {}
    for directory in request["directories"]:
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        model.generation_config.eos_token_id = None  # always generate max_new_tokens
        with torch.no_grad():
            logits = model(request["ids"], attention_mask=request["mask"]).logits
            tokens = model.generate(request["prompt"], attention_mask=torch.ones_like(request["prompt"]),
                                    max_new_tokens=request["new_tokens"], do_sample=False, use_cache=True,
                                    pad_token_id=0)
        out[directory] = {"logits": logits, "tokens": tokens, "class": type(model).__name__,
                          "fxprune_loaded": "fxprune" in sys.modules}
    torch.save(out, sys.argv[2])
''')


def load_in_plain_transformers(directories, ids, mask, prompt, new_tokens, workdir):
    """{directory: {"logits", "tokens", "class", "fxprune_loaded"}} from one fresh interpreter."""
    request, result = workdir / "request.pt", workdir / "result.pt"
    torch.save({"directories": [str(d) for d in directories], "ids": ids, "mask": mask, "prompt": prompt,
                "new_tokens": new_tokens}, request)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-I", "-c", SCRIPT, str(request), str(result)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(result)


def greedy(gm, prompt, new_tokens):
    """Greedy continuation by the pruned GraphModule, recomputing the whole sequence at every step."""
    ids = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = gm(ids, attention_mask=torch.ones_like(ids)).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids
