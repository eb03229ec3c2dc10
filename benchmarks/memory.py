"""Benchmark the memory a sim takes: peak RSS of building, calibrating and running it.

Usage::

    .venv/bin/python benchmarks/memory.py [--quick] [--schemes tf tf_enhanced ...]
        [--layers N] [--width W] [--json PATH]

Model: a stack of ``N`` ``Linear(W, W)`` + ``ReLU`` (default 12 x 2048: 50.4M parameters,
201 MB of float32). Every phase runs in a fresh subprocess, because a process's peak RSS
never goes down; each measures the peak (``VmHWM`` of ``/proc/self/status``, else
``ru_maxrss``) above the RSS it had after its imports (interpreter, torch, quantsim), and the
RSS still held at the end:

* ``float``: the float model and one eval forward (batch 64) — the reference;
* ``build``: the float model and ``QuantizationSimModel(model, x, in_place=...)``;
* ``weights`` (only with ``--phases``): ``build`` and the weight encodings alone, the first
  step of calibration;
* ``calibrate``: ``build`` and ``compute_encodings`` over 8 batches of 64;
* ``forward``: ``calibrate`` and one eval forward of ``sim.model`` under ``no_grad``.

for ``in_place`` False and True and each scheme (default ``tf`` and ``tf_enhanced``, whose
per-channel weight search takes seconds per 2048-channel weight). Prints a table and writes
``benchmarks/results/memory.json``. Ratios are the phase's peak over the ``float`` phase's
peak (both above the imports), so a sim that keeps nothing but the model is 1.0x; the
target is <= 1.3x for ``in_place=True`` after calibration and an eval forward. The sim
caches the fake-quantized copy of small weights only and, above the limits (this model is
above the 2^25-element model limit), each weight's integer codes (``quantsim.wrappers``
``set_param_cache_limit``); ``--cache-limit`` runs the phases with another limit,
``--no-codes`` without the codes (every call fake-quantizes every weight, as before them).

Two costs that are not the sim's own data show up in RSS. The ``auto`` kernel backend
compiles fake-quant passes over tensors of 2M+ elements with ``torch.compile``, which loads
inductor into the process once (~110-140 MB, whatever the model). And glibc's allocator keeps
freed blocks of a few MB (it raises its mmap threshold after the first large free), so RSS
after many weight-sized temporaries varies from run to run by up to the model's size;
``--env MALLOC_MMAP_THRESHOLD_=65536`` (every large block mapped and returned on free)
measures the live memory instead, ``--env QUANTSIM_KERNEL=eager`` leaves inductor out, and
``--repeats`` reports the median of several processes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "memory.json")
PHASES = ("float", "build", "weights", "calibrate", "forward")
DEFAULT_PHASES = ("build", "calibrate", "forward")
TARGET = 1.3  # in_place=True, after calibration and an eval forward
BATCH, CALIBRATION_BATCHES = 64, 8
MB = 1 << 20


# --- one phase, in its own process -------------------------------------------------------------
def _status_kb(field: str) -> Optional[int]:
    """A ``kB`` field of ``/proc/self/status`` (None where there is no procfs)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """This process's resident set now (bytes)."""
    kb = _status_kb("VmRSS")
    return (kb if kb is not None else peak_bytes() // 1024) * 1024


def peak_bytes() -> int:
    """This process's peak resident set (bytes): since it started, or since the last
    :func:`reset_peak` that succeeded."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB on Linux


def reset_peak() -> bool:
    """Start a new peak at the current RSS (Linux: ``5`` written to ``/proc/self/clear_refs``),
    so one process can measure the peaks of successive phases; False where the kernel does
    not allow it (then :func:`peak_bytes` keeps the process's peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class TensorPeaks:
    """Peaks of the bytes held by live CPU tensors during marked phases, from the profiler's
    allocation events: what the program allocates, whatever the C allocator keeps mapped (the
    CPU counterpart of ``torch.cuda.max_memory_allocated``). Counts from the moment it is
    entered, so enter it before the model is built::

        with TensorPeaks() as tp:
            model = build()
            with tp.phase("forward"):
                model(x)
        tp.peaks()  # {"forward": bytes, ...}, tp.held(): bytes live at the end
    """

    def __init__(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)

    def __enter__(self) -> "TensorPeaks":
        self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._profile.__exit__(*exc)

    @staticmethod
    def phase(name: str):
        """A context marking a phase whose peak :meth:`peaks` reports."""
        from torch.profiler import record_function

        return record_function("phase:" + name)

    def _events(self):
        events = self._profile.profiler.kineto_results.events()
        memory = sorted((e.start_ns(), e.nbytes()) for e in events
                        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
        windows = {e.name()[len("phase:"):]: (e.start_ns(), e.start_ns() + e.duration_ns())
                   for e in events if e.name().startswith("phase:")}
        return memory, windows

    def peaks(self) -> Dict[str, int]:
        """The most bytes live at once during each phase (live when the phase began included)."""
        memory, windows = self._events()
        peaks = {}
        for name, (start, end) in windows.items():
            live = sum(n for t, n in memory if t < start)
            peak = live
            for t, n in memory:
                if start <= t <= end:
                    live += n
                    peak = max(peak, live)
            peaks[name] = peak
        return peaks

    def held(self) -> int:
        """Bytes live at the end."""
        return sum(n for _, n in self._events()[0])


def run_phase(phase: str, in_place: bool, scheme: str, layers: int, width: int,
              cache_limit: Optional[int], codes: bool = True) -> Dict:
    """Run ``phase`` in this process; return its memory figures (bytes)."""
    sys.path.insert(0, os.path.join(HERE, ".."))
    import warnings

    import torch
    from torch import nn

    from quantsim import wrappers
    from quantsim.calibration import Calibration
    from quantsim.sim import QuantizationSimModel

    torch.set_num_threads(2)
    wrappers.set_param_cache_limit(
        wrappers.param_cache_limit() if cache_limit is None else cache_limit, codes=codes)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, width, generator=g)
    batches = [torch.randn(BATCH, width, generator=g) for _ in range(CALIBRATION_BATCHES)]
    after_imports = rss_bytes()

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width),
                                                               nn.ReLU())]).eval()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if phase == "float":
        with torch.no_grad():
            model(x)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sim = QuantizationSimModel(model, x, quant_scheme=scheme, in_place=in_place)
        if phase == "weights":
            Calibration(sim.model, sim.graph).begin()
        elif phase in ("calibrate", "forward"):
            sim.compute_encodings(lambda m, _: [m(b) for b in batches], None)
        if phase == "forward":
            with torch.no_grad():
                sim.model.eval()(x)
    return {"phase": phase, "in_place": in_place, "scheme": scheme,
            "model_bytes": model_bytes, "after_imports_bytes": after_imports,
            "peak_bytes": peak_bytes(), "end_bytes": rss_bytes()}


# --- the driver --------------------------------------------------------------------------------
def measure(phase: str, in_place: bool, scheme: str, args) -> Dict:
    """Run one phase ``args.repeats`` times, each in a fresh interpreter; return the run with
    the median peak (the allocator makes RSS vary from run to run) and every run's peak."""
    cmd = [sys.executable, os.path.abspath(__file__), "--phase", phase, "--scheme", scheme,
           "--layers", str(args.layers), "--width", str(args.width)]
    if in_place:
        cmd.append("--in-place")
    if args.cache_limit is not None:
        cmd += ["--cache-limit", str(args.cache_limit)]
    if args.no_codes:
        cmd.append("--no-codes")
    env = dict(os.environ, **dict(e.split("=", 1) for e in args.env))
    runs = []
    for _ in range(args.repeats):
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    runs.sort(key=lambda r: r["peak_bytes"] - r["after_imports_bytes"])
    row = runs[len(runs) // 2]
    row["peaks_mb"] = [(r["peak_bytes"] - r["after_imports_bytes"]) / MB for r in runs]
    return row


def add_ratios(rows: List[Dict]) -> None:
    """Peak and held RSS above the imports, over the float phase's peak and the model bytes."""
    reference = next(r for r in rows if r["phase"] == "float")
    float_peak = reference["peak_bytes"] - reference["after_imports_bytes"]
    for r in rows:
        peak = r["peak_bytes"] - r["after_imports_bytes"]
        held = r["end_bytes"] - r["after_imports_bytes"]
        r.update(peak_mb=peak / MB, held_mb=held / MB, vs_float=peak / float_peak,
                 held_vs_float=held / float_peak, peak_vs_model=peak / r["model_bytes"])
        if r["phase"] == "forward" and r["in_place"]:
            r["target"] = TARGET
            r["meets_target"] = r["vs_float"] <= TARGET


def print_table(rows: List[Dict], args) -> None:
    model_mb = rows[0]["model_bytes"] / MB
    print(f"\nPeak RSS above the imports: {args.layers} x Linear({args.width}, {args.width}) + "
          f"ReLU, {model_mb:.0f} MB of weights, batch {BATCH}, {CALIBRATION_BATCHES} calibration "
          f"batches (target: in_place=True forward <= {TARGET}x float)")
    print(f"{'scheme':<13}{'in_place':<10}{'phase':<11}{'peak MB':>9}{'vs float':>10}"
          f"{'vs model':>10}{'held MB':>9}{'held/float':>11}  {'target':<8}peaks of the runs")
    for r in rows:
        target = ("ok" if r["meets_target"] else "MISSED") if "target" in r else ""
        scheme = "-" if r["phase"] == "float" else r["scheme"]
        in_place = "-" if r["phase"] == "float" else str(r["in_place"])
        peaks = " ".join(f"{p:.0f}" for p in r["peaks_mb"])
        print(f"{scheme:<13}{in_place:<10}{r['phase']:<11}{r['peak_mb']:9.0f}"
              f"{r['vs_float']:9.2f}x{r['peak_vs_model']:9.2f}x{r['held_mb']:9.0f}"
              f"{r['held_vs_float']:10.2f}x  {target:<8}{peaks}")
    print("vs float: peak over the float phase's peak; held: RSS at the end of the phase; "
          f"environment: {' '.join(args.env) or 'as inherited'}")


def main(argv=None) -> int:
    """Run every phase in its own process, print the table and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a 4-layer stack, tf_enhanced (the sim's default scheme) only")
    parser.add_argument("--phases", nargs="+", choices=PHASES[1:], default=DEFAULT_PHASES,
                        help="sim phases to measure (default: build calibrate forward)")
    parser.add_argument("--schemes", nargs="+", default=None,
                        help="calibration schemes (default: tf and tf_enhanced)")
    parser.add_argument("--layers", type=int, default=None, help="Linear layers (default 12)")
    parser.add_argument("--width", type=int, default=2048, help="features per layer")
    parser.add_argument("--cache-limit", type=int, default=None,
                        help="wrappers.set_param_cache_limit for the run (elements)")
    parser.add_argument("--no-codes", action="store_true",
                        help="keep no integer codes above the limits (set_param_cache_limit)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="fresh processes per phase; the median peak is reported")
    parser.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE",
                        help="environment of the measured processes (e.g. QUANTSIM_KERNEL=eager "
                             "MALLOC_MMAP_THRESHOLD_=1048576)")
    parser.add_argument("--json", default=RESULTS, help="where to write the results")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--scheme", default="tf_enhanced", help=argparse.SUPPRESS)
    parser.add_argument("--in-place", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.layers is None:
        args.layers = 4 if args.quick else 12
    if args.phase is not None:  # a child process: one phase, one JSON line
        print(json.dumps(run_phase(args.phase, args.in_place, args.scheme, args.layers,
                                   args.width, args.cache_limit, not args.no_codes)))
        return 0
    schemes = args.schemes or (["tf_enhanced"] if args.quick else ["tf", "tf_enhanced"])
    rows = [measure("float", False, schemes[0], args)]
    for scheme in schemes:
        for in_place in (False, True):
            for phase in args.phases:
                rows.append(measure(phase, in_place, scheme, args))
                print(f"  {scheme:<13}in_place={in_place!s:<6}{phase:<10} peak "
                      f"{(rows[-1]['peak_bytes'] - rows[-1]['after_imports_bytes']) / MB:7.0f} MB",
                      flush=True)
    add_ratios(rows)
    print_table(rows, args)
    meta = {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "layers": args.layers, "width": args.width,
            "batch": BATCH, "calibration_batches": CALIBRATION_BATCHES,
            "cache_limit": args.cache_limit, "codes": not args.no_codes, "repeats": args.repeats, "env": args.env,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    from quantsim.atomic import atomic_write_text  # a crash mid-write leaves the old file

    atomic_write_text(args.json, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {os.path.relpath(args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
