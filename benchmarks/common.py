"""Shared helpers of the benchmark scripts: machine description, peak-memory phases, data paths, output.

Peak memory is `resource.getrusage(RUSAGE_SELF).ru_maxrss`. On Linux the high-water mark can be reset
by writing "5" to /proc/self/clear_refs; `Phase` does so on entry, so each phase reports its own
peak RSS (which still counts everything already resident: the model, the analysis, ...). Where the
reset is not allowed, `Phase.reset` is False and the peak is the process peak so far.
"""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

DATA_ENV = "FXPRUNE_DATA_DIR"
RESULTS = Path(__file__).resolve().parent / "results"


def rss_gb() -> float:
    """Current resident set size in GB (from /proc/self/status; 0.0 where unavailable)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return 0.0


def maxrss_gb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1e9 if sys.platform == "darwin" else r * 1024 / 1e9  # bytes on macOS, KiB on Linux


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Phase:
    """`with Phase() as p: ...` then p.wall_s, p.peak_gb (ru_maxrss during the phase), p.rss_before_gb."""

    def __enter__(self):
        self.reset = reset_peak()
        self.rss_before_gb = rss_gb()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall_s = time.perf_counter() - self.t0
        self.peak_gb = maxrss_gb()
        self.rss_after_gb = rss_gb()
        return False

    def as_dict(self) -> dict:
        return {"wall_s": round(self.wall_s, 2), "peak_rss_gb": round(self.peak_gb, 3),
                "rss_before_gb": round(self.rss_before_gb, 3),
                "peak_increase_gb": round(self.peak_gb - self.rss_before_gb, 3),
                "peak_is_per_phase": self.reset}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def other_busy_processes(min_cpu: float = 20.0) -> list[str]:
    """Other processes using the CPU now (ps), to record whether the machine was shared."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()[1:]
    except (OSError, subprocess.SubprocessError):
        return []
    busy = []
    for line in out:
        parts = line.split(None, 2)
        if (len(parts) == 3 and int(parts[0]) not in (os.getpid(), os.getppid()) and parts[2] != "ps"
                and float(parts[1]) >= min_cpu):
            busy.append(f"{parts[2]} ({parts[1]}% cpu)")
    return busy


def machine(threads: int | None = None) -> dict:
    import torch
    import transformers
    return {"machine": platform.machine(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "torch_threads": threads if threads is not None else torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform()}


def header(threads: int | None = None) -> dict:
    """What every results file records: machine, date, exact command, and how busy the machine was."""
    return {"machine": machine(threads), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command(),
            "load_average_start": load_average(), "other_processes_start": other_busy_processes()}


def command() -> str:
    """The command line that ran this process, as typed from the repository root."""
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    env = f"{DATA_ENV}=... " if os.environ.get(DATA_ENV) else ""
    head = f"PYTHONPATH=. {env}python " + (f"-m {name}" if name else shlex.quote(sys.argv[0]))
    return " ".join([head] + [shlex.quote(a) for a in sys.argv[1:]])


def finish(report: dict) -> dict:
    report["load_average_end"] = load_average()
    report["other_processes_end"] = other_busy_processes()
    return report


def shared_note(report: dict) -> str:
    """One sentence saying whether other jobs shared the machine, from what was recorded."""
    others = sorted(set(report.get("other_processes_start", []) + report.get("other_processes_end", [])))
    la = report.get("load_average_start"), report.get("load_average_end")
    if others:
        return (f"The machine was shared: other processes were using the CPU ({'; '.join(others[:6])}); "
                f"load average at start/end {la[0]} / {la[1]}. Timings are noisy accordingly.")
    return f"No other busy process was seen at start or end (load average {la[0]} / {la[1]})."


def machine_line(report: dict) -> str:
    m = report["machine"]
    return (f"{m['cpu']} ({m['machine']}, {m['cores']} cores, torch threads {m['torch_threads']}), "
            f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}; {report['date']}")


def report_head(title: str, report: dict) -> list[str]:
    """The opening lines every results Markdown file shares: title, machine and date, command, load."""
    return [f"# {title}", "", f"Machine: {machine_line(report)}.", "", f"Command: `{report['command']}`", "",
            shared_note(report), ""]


def data_dir(arg=None) -> Path:
    from fxprune.data.loaders import data_dir as resolve
    return resolve(arg)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def md_table(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def write_outputs(report: dict, out: Path, plot, render) -> dict:
    """The JSON, the plot (`plot(report, png)`) and the Markdown (`render(report, png)`) of one results file."""
    write_json(out.with_suffix(".json"), report)
    png = out.with_suffix(".png")
    plot(report, png)
    out.with_suffix(".md").write_text(render(report, png))
    log(f"wrote {out}.json, .md and .png")
    return report


def perplexity(model, windows) -> float:
    """exp(mean next-token NLL) over token windows [n, L] (fxprune.evaluation.evaluate's per-window sums)."""
    import torch
    from fxprune.evaluation.evaluate import window_nlls
    with torch.inference_mode():
        return math.exp(sum(window_nlls(model, windows)) / windows[:, 1:].numel())
