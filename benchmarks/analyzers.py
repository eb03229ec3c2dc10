"""Benchmark the encoding analyzers and the fake-quant kernel.

Usage::

    .venv/bin/python benchmarks/analyzers.py [--quick]

Prints a table and writes ``benchmarks/results/analyzers.json``:

* ``observe`` + ``compute_range`` time of every analyzer, per tensor and per channel (64
  channels), on 1M and 16M float32 elements (target: tf_enhanced on 16M per tensor < 1 s);
* fake-quant throughput in GB/s (bytes read + written over the median time; the ratio to clone
  uses medians too) of
  ``quantsim.encoding.fake_quantize`` with the ``eager`` and ``compiled`` kernels, per tensor
  and per channel, next to ``x.clone()`` (the bandwidth reference; target: >= 50 % of it) and
  torch's own ``fake_quantize_per_{tensor,channel}_affine``.

CPU rows use two threads; CUDA rows are added when a GPU is present. Every timed function is
called once before timing (the compiled kernel compiles on its first call).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from quantsim import kernels  # noqa: E402
from quantsim.analyzers import create_analyzer  # noqa: E402
from quantsim.encoding import Encoding, fake_quantize  # noqa: E402

CHANNELS = 64
SIZES = (1 << 20, 1 << 24)
ANALYZER_TARGET_S = 1.0
FAKE_QUANT_TARGET = 0.5
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "analyzers.json")


def median_time(fn: Callable[[], object], repeats: int,
                device: torch.device) -> Tuple[float, float]:
    """Median and best wall time of ``fn`` in seconds over ``repeats`` calls, after a warm-up.

    The best time is printed too: on a shared machine it is the one closest to an idle CPU.
    """
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def analyzer_rows(device: torch.device, repeats: int) -> List[Dict]:
    """observe + compute_range time of each scheme, per tensor and per channel."""
    rows = []
    for numel in SIZES:
        x = torch.randn(CHANNELS, numel // CHANNELS, device=device)
        for scheme in ("tf", "tf_enhanced", "percentile"):
            for axis in (None, 0):
                def run():
                    a = create_analyzer(scheme, axis=axis)
                    a.observe(x)
                    return a.compute_range(255, symmetric=False)

                seconds, best = median_time(run, repeats, device)
                target = ANALYZER_TARGET_S if scheme == "tf_enhanced" and axis is None \
                    and numel == SIZES[-1] else None
                rows.append({"kind": "analyzer", "what": scheme, "device": device.type,
                             "elements": numel, "layout": _layout(axis), "seconds": seconds,
                             "best_seconds": best, "target_seconds": target,
                             "meets_target": None if target is None else seconds < target})
    return rows


def fake_quant_rows(device: torch.device, repeats: int) -> List[Dict]:
    """GB/s of quantsim's fake-quant (both backends), torch's, and clone, per layout."""
    rows = []
    for numel in SIZES:
        x = torch.randn(CHANNELS, numel // CHANNELS, device=device)
        for axis in (None, 0):
            rows += _fake_quant_layout(x, axis, repeats, device)
    return rows


def _fake_quant_layout(x: torch.Tensor, axis, repeats: int, device: torch.device) -> List[Dict]:
    lo = torch.full((CHANNELS,), -3.0) if axis == 0 else torch.tensor(-3.0)
    enc = Encoding.from_range(lo, -lo, bitwidth=8, axis=axis)
    scale, offset = enc.scale.to(device), enc.offset.to(device)
    zero_point = (-offset).to(torch.int32)
    candidates = {"clone": x.clone}
    for backend in ("eager", "compiled"):
        candidates[f"quantsim {backend}"] = _with_backend(
            backend, lambda: fake_quantize(x, scale, offset, enc.qmin, enc.qmax, axis))
    if axis is None:
        candidates["torch fake_quantize_per_tensor_affine"] = lambda: \
            torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), 0, 255)
    else:
        candidates["torch fake_quantize_per_channel_affine"] = lambda: \
            torch.fake_quantize_per_channel_affine(x, scale, zero_point, 0, 0, 255)
    rows = []
    with torch.no_grad():
        for what, fn in candidates.items():
            seconds, best = median_time(fn, repeats, device)
            rows.append({"kind": "fake_quant", "what": what, "device": device.type,
                         "elements": x.numel(), "layout": _layout(axis), "seconds": seconds,
                         "best_seconds": best,
                         "gb_per_s": 2 * x.numel() * x.element_size() / seconds / 1e9})
    clone = rows[0]["gb_per_s"]
    for row in rows:
        row["vs_clone"] = row["gb_per_s"] / clone
        if row["what"].startswith("quantsim"):
            row["target_vs_clone"] = FAKE_QUANT_TARGET
            row["meets_target"] = row["vs_clone"] >= FAKE_QUANT_TARGET
    return rows


def _with_backend(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        previous = kernels.get_backend()
        kernels.set_backend(backend)
        try:
            return fn()
        finally:
            kernels.set_backend(previous)
    return run


def _load():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _layout(axis) -> str:
    return "per tensor" if axis is None else f"per channel ({CHANNELS})"


def print_table(rows: List[Dict]) -> None:
    """One line per measurement, with the target where there is one."""
    print(f"{'kind':<11}{'what':<40}{'dev':<5}{'elements':>10}  {'layout':<18}"
          f"{'median ms':>10}{'best ms':>9}{'GB/s':>8}{'vs clone':>10}  target")
    for r in rows:
        gbs = f"{r['gb_per_s']:8.2f}" if "gb_per_s" in r else " " * 8
        ratio = f"{r['vs_clone']:10.2f}" if "vs_clone" in r else " " * 10
        verdict = "ok" if r.get("meets_target") else "MISSED"
        if r.get("target_seconds"):
            target = f"< {r['target_seconds']:.0f} s: {verdict}"
        elif "target_vs_clone" in r:
            target = f">= {r['target_vs_clone']:.0%} of clone: {verdict}"
        else:
            target = ""
        print(f"{r['kind']:<11}{r['what']:<40}{r['device']:<5}{r['elements']:>10}  "
              f"{r['layout']:<18}{r['seconds'] * 1e3:10.2f}{r['best_seconds'] * 1e3:9.2f}"
              f"{gbs}{ratio}  {target}")


def main(argv=None) -> int:
    """Run the benchmark, print the table and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (for CI)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    load_before = _load()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    analyzer_repeats, kernel_repeats = (1, 3) if args.quick else (5, 20)
    rows = []
    for device in devices:
        rows += analyzer_rows(device, analyzer_repeats)
        rows += fake_quant_rows(device, kernel_repeats)
    print_table(rows)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick,
            "machine": platform.processor() or platform.machine(),
            "load_average_before_after": [load_before, _load()],
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    from quantsim.atomic import atomic_write_text  # a crash mid-write leaves the old file

    atomic_write_text(RESULTS, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\nload average (1 min) before/after: {meta['load_average_before_after']} on "
          f"{os.cpu_count()} CPUs\nwrote {os.path.relpath(RESULTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
