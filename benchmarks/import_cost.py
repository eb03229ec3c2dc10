"""Import cost: time and resident memory of ``import quantsim`` over ``import torch`` alone,
beside aimet-torch's.

Usage::

    .venv/bin/python benchmarks/import_cost.py [--repeats 7] [--aimet-python PATH]

Each measurement is a fresh interpreter that times one import statement (``perf_counter``
around it) and reads its resident set size (``VmRSS`` in ``/proc/self/status``) before and
after; the figures are medians over ``--repeats`` processes, and the statements alternate
(torch, quantsim, torch, quantsim, ...) so that a busy machine slows both alike. What is
measured:

* ``torch``: ``import torch`` (the floor every PyTorch library starts from);
* ``quantsim``: ``import quantsim`` (torch included), and ``quantsim - torch``, the cost of
  quantsim itself;
* ``quantsim export``: ``import quantsim.export`` as well (ONNX, onnxscript: what the first
  export pays on top);
* ``aimet-torch``: ``from aimet_torch.quantsim import QuantizationSimModel`` over ``import
  torch``, both in aimet-torch's own environment (``--aimet-python``, by default the
  ``QUANTSIM_AIMET_PYTHON`` environment variable). Without it the figures recorded on
  the development machine (3 s, +197 MB over torch, aimet-torch 2.42) are reported, marked as
  recorded.

Prints a table and writes ``benchmarks/results/import_cost.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "import_cost.json"
#: aimet-torch 2.42 on the development machine, when its environment is not at hand
AIMET_RECORDED = {"import_over_torch_s": 3.0, "rss_over_torch_mb": 197.0}

#: run in a fresh interpreter: ``{"import_s", "cpu_s", "rss_mb", "rss_before_mb"}`` of one
#: statement (``cpu_s``: user + system CPU seconds of the process, which a busy machine's other
#: processes do not inflate as they do the wall-clock ``import_s``)
_PROBE = """
import json, resource, sys, time
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
def rss():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmRSS:")) / 1024
before = rss()
setup = sys.argv[2]
if setup:
    exec(setup)
start, start_cpu = time.perf_counter(), cpu()
exec(sys.argv[1])
elapsed, used = time.perf_counter() - start, cpu() - start_cpu
print(json.dumps({"import_s": elapsed, "cpu_s": used, "rss_mb": rss(), "rss_before_mb": before}))
"""

#: aimet-torch 2.42 registers torchvision ops that its environment's torch lacks without
#: torchvision; defining them first lets it import
_AIMET_SETUP = (
    "import torch; "
    "torch.library.define('torchvision::nms', '(Tensor dets, Tensor scores, float iou_threshold)"
    " -> Tensor'); "
    "torch.library.define('torchvision::qnms', '(Tensor dets, Tensor scores, Tensor zero_points,"
    " Tensor scales, float iou_threshold) -> Tensor')")

STATEMENTS = {
    "torch": ("import torch", ""),
    "quantsim": ("import quantsim", ""),
    "quantsim export": ("import quantsim, quantsim.export", ""),
}


def probe(python: str, statement: str, setup: str = "") -> Dict[str, float]:
    """One fresh process timing ``statement`` (after ``setup``, which is not timed)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([python, "-c", _PROBE, statement, setup], capture_output=True,
                         text=True, timeout=600, cwd=ROOT, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"{python} -c {statement!r} failed: {run.stderr.strip()[-400:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def measure(python: str, statements: Dict[str, tuple], repeats: int) -> Dict[str, Dict[str, float]]:
    """Medians over ``repeats`` rounds, each running every statement once (interleaved)."""
    samples: Dict[str, List[Dict[str, float]]] = {k: [] for k in statements}
    for _ in range(repeats):
        for key, (statement, setup) in statements.items():
            samples[key].append(probe(python, statement, setup))
    return {k: {f: statistics.median(s[f] for s in v) for f in ("import_s", "cpu_s", "rss_mb")}
            for k, v in samples.items()}


def aimet(python: Optional[str], repeats: int) -> Dict[str, Any]:
    """aimet-torch's import over torch's in its own environment, or the recorded figures."""
    if python is None or not Path(python).exists():
        return {**AIMET_RECORDED, "source": "recorded (aimet-torch 2.42, development machine)"}
    got = measure(python, {
        "torch": ("import torch", ""),
        "aimet": ("from aimet_torch.quantsim import QuantizationSimModel", _AIMET_SETUP),
    }, repeats)
    version = subprocess.run([python, "-c", "import importlib.metadata as m; "
                              "print(m.version('aimet-torch'))"], capture_output=True,
                             text=True, timeout=120).stdout.strip()
    # torch is imported untimed first (the setup), so the timed import is aimet-torch's own
    return {"import_over_torch_s": got["aimet"]["import_s"],
            "cpu_over_torch_s": got["aimet"]["cpu_s"],
            "rss_over_torch_mb": got["aimet"]["rss_mb"] - got["torch"]["rss_mb"],
            "torch_import_s": got["torch"]["import_s"], "torch_rss_mb": got["torch"]["rss_mb"],
            "source": f"measured ({python}, aimet-torch {version or '?'})"}


def _over(ours: Dict[str, float], torch_: Dict[str, float]) -> Dict[str, float]:
    """``ours`` plus its differences to ``import torch`` alone."""
    return {**ours, "import_over_torch_s": ours["import_s"] - torch_["import_s"],
            "cpu_over_torch_s": ours["cpu_s"] - torch_["cpu_s"],
            "rss_over_torch_mb": ours["rss_mb"] - torch_["rss_mb"]}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Measure, print the table, write the JSON; returns the result."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="processes per statement")
    parser.add_argument("--aimet-python", default=os.environ.get("QUANTSIM_AIMET_PYTHON"),
                        help="interpreter of an environment with aimet-torch "
                             "(default: $QUANTSIM_AIMET_PYTHON)")
    args = parser.parse_args(argv)
    ours = measure(sys.executable, STATEMENTS, args.repeats)
    torch_ = ours["torch"]
    result: Dict[str, Any] = {
        "repeats": args.repeats, "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": os.getloadavg(),
        "torch": torch_,
        "quantsim": _over(ours["quantsim"], torch_),
        "quantsim_export": _over(ours["quantsim export"], torch_),
        "aimet_torch": aimet(args.aimet_python, args.repeats),
    }
    q, e, a = result["quantsim"], result["quantsim_export"], result["aimet_torch"]
    print(f"median of {args.repeats} fresh processes each (load average "
          f"{result['load_average'][0]:.1f}); over torch: what the import adds to import torch")
    header = ("", "wall s", "CPU s", "RSS MB", "over torch: wall s", "CPU s", "MB")
    rows = [("import torch", torch_["import_s"], torch_["cpu_s"], torch_["rss_mb"], None, None,
             None)]
    for label, r in (("import quantsim", q), ("import quantsim + quantsim.export", e)):
        rows.append((label, r["import_s"], r["cpu_s"], r["rss_mb"], r["import_over_torch_s"],
                     r["cpu_over_torch_s"], r["rss_over_torch_mb"]))
    rows.append(("aimet_torch.quantsim", None, None, None, a["import_over_torch_s"],
                 a.get("cpu_over_torch_s"), a["rss_over_torch_mb"]))
    print(f"{header[0]:34}" + "".join(f"{h:>{w}}" for h, w in zip(header[1:], (8, 8, 8, 20, 8, 6))))
    for label, *values in rows:
        print(f"{label:34}" + "".join("".rjust(w) if v is None else f"{v:{w}.{0 if 'MB' in h else 2}f}"
                                      for v, w, h in zip(values, (8, 8, 8, 20, 8, 6), header[1:])))
    print(f"aimet-torch: {a['source']}")
    from quantsim.atomic import atomic_write_text  # a crash mid-write leaves the old file

    atomic_write_text(RESULTS, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
