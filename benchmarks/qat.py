"""QAT on the digits CNN at W4A8 (per-channel weights): PTQ drop, recovery curve, step cost.

Run: ``python benchmarks/qat.py [--quick]``. Prints a table and writes
``benchmarks/results/qat.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import median

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from models import DigitsCNN, accuracy, digits_data, train  # noqa: E402

from quantsim import QuantizationSimModel  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def step_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor, runs: int) -> float:
    """Median seconds of one forward+backward+SGD step on batch (x, y)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    model.train()
    times = []
    for i in range(runs + 3):
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return median(times)


def main(argv=None) -> dict:
    """Run the benchmark; returns the result dict."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer epochs and steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    x_train, y_train, x_test, y_test = digits_data()
    torch.manual_seed(0)
    model = train(DigitsCNN(), x_train, y_train, epochs=4 if args.quick else 12)
    float_acc = accuracy(model, x_test, y_test)

    sim = QuantizationSimModel(model, x_train[:4], quant_scheme="range_learning_tf",
                               default_param_bw=4, default_output_bw=8)
    sim.compute_encodings(lambda m, _: m(x_train[:512]), None)
    ptq_acc = accuracy(sim.model, x_test, y_test)

    opt = torch.optim.Adam(sim.model.parameters(), lr=1e-3)
    curve = [(0, ptq_acc)]
    torch.manual_seed(0)
    epochs = 1 if args.quick else 4
    step = 0
    for _ in range(epochs):
        sim.model.train()
        perm = torch.randperm(len(x_train))
        for i in range(0, len(x_train), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(sim.model(x_train[idx]), y_train[idx]).backward()
            opt.step()
            step += 1
        curve.append((step, accuracy(sim.model.eval(), x_test, y_test)))

    xb, yb = x_train[:64], y_train[:64]
    runs = 10 if args.quick else 30
    t_float = step_time(model, xb, yb, runs)
    t_sim = step_time(sim.model, xb, yb, runs)
    result = {
        "float_accuracy": float_acc, "ptq_w4a8_accuracy": ptq_acc,
        "qat_curve": [{"step": s, "accuracy": a} for s, a in curve],
        "qat_final_accuracy": curve[-1][1],
        "step_ms_float": t_float * 1e3, "step_ms_sim": t_sim * 1e3,
        "step_ratio_sim_over_float": t_sim / t_float,
    }
    print(f"{'digits CNN W4A8 (per-channel)':32s} accuracy")
    print(f"{'float':32s} {float_acc:.4f}")
    print(f"{'PTQ (range-learning init, tf)':32s} {ptq_acc:.4f}  drop {100 * (float_acc - ptq_acc):.2f} pt")
    for s, a in curve[1:]:
        print(f"{'QAT step ' + str(s):32s} {a:.4f}")
    print(f"train step b64: float {t_float * 1e3:.2f} ms, sim {t_sim * 1e3:.2f} ms, "
          f"ratio {t_sim / t_float:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "qat.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
