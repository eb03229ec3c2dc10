"""Fixed-point conversion: accuracy of each stage, and how the deployed forms agree.

Run: ``python benchmarks/convert.py [--threads N]``. Prints the tables and writes
``benchmarks/results/convert.json``.

Models (scikit-learn's digits, 1x8x8): the digits CNN at W8A8 and W4A8, and a residual net
(stem, two residual blocks with ``+``, a strided conv, global average pool) at W8A8, each
calibrated with ``tf`` on 512 training images (per-channel config). Columns:

* **float / fake-quant / fixed-point / ORT deploy**: top-1 test accuracy of the float model,
  the sim, :func:`quantsim.convert` 's IntegerModel, and its integer ONNX
  (:func:`~quantsim.export.integer_onnx.export_integer_onnx`) in ONNX Runtime's CPU provider;
* **int vs sim <=1 LSB**: fraction of the IntegerModel's outputs within one output step of the
  sim's; **ORT == int**: fraction of the ORT deploy model's outputs equal to the IntegerModel's
  bit for bit;
* **QLinear vs int**: the sim's QDQ ONNX run by ONNX Runtime (which fuses it into QLinearConv /
  QLinearMatMul kernels that requantize in float): fraction of outputs that differ from the
  IntegerModel and the largest difference, in output steps.

The Horizon-style flow (digits CNN: fuse conv-BN -> calibrate -> QAT W8A8 -> convert ->
integer ONNX in ORT) gets a row per stage.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from models import DigitsCNN, ResidualBlock, accuracy, digits_data, train  # noqa: E402

import quantsim  # noqa: E402
import quantsim.atomic  # noqa: E402
from quantsim import ExportError, QuantizationSimModel  # noqa: E402
from quantsim.export.integer_onnx import export_integer_onnx  # noqa: E402
from quantsim.prepare import fuse_all_conv_bn, prepare_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "convert.json"


class DigitsResNet(nn.Module):
    """A residual net for 1x8x8 digits: stem, residual block, strided conv, residual block,
    global average pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = ResidualBlock(16)
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32),
                                  nn.ReLU())
        self.block2 = ResidualBlock(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.block2(self.down(self.block1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _ort(path: str, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _top1(logits: np.ndarray, y: torch.Tensor) -> float:
    return float((torch.from_numpy(np.asarray(logits)).argmax(1) == y).float().mean())


@torch.no_grad()
def measure(sim: QuantizationSimModel, float_model: nn.Module, data, folder: str,
            name: str) -> Dict[str, Any]:
    """Every column of the accuracy table for one calibrated sim."""
    _, _, x, y = data
    int_model = quantsim.convert(sim)
    report = int_model.compare(sim, x)
    path = f"{folder}/{name}_int.onnx"
    export_integer_onnx(int_model, path, x[:2])
    deployed, ours = _ort(path, x), int_model(x).numpy()
    step = float(int_model.output_encodings[0].scale)
    try:
        sim.export(folder, name, x)  # fixed batch: the whole test split
        qlinear = _ort(f"{folder}/{name}_qdq.onnx", x)
        qdiff = np.abs(qlinear.astype(np.float64) - ours) / step
        qlinear_differs, qlinear_max = float(np.mean(qdiff > 1e-3)), float(qdiff.max())
    except ExportError as exc:  # the comparison needs the sim's own export
        qlinear_differs = qlinear_max = f"n/a ({exc})"
    return {
        "float": accuracy(float_model, x, y), "fake_quant": accuracy(sim.model, x, y),
        "fixed_point": accuracy(int_model, x, y), "ort_deploy": _top1(deployed, y),
        "int_vs_sim_within_1_lsb": report.output_within_1_lsb[0],
        "int_vs_sim_max_lsb": report.output_max_diff_lsb[0],
        "ort_equal_int": float(np.mean(deployed == ours)),
        "qlinear_differs": qlinear_differs, "qlinear_max_lsb": qlinear_max,
        "float_ops": [n for n, _ in report.float_ops],
    }


def _calibrated(model: nn.Module, data, param_bw: int = 8) -> QuantizationSimModel:
    x_train = data[0]
    sim = QuantizationSimModel(model, x_train[:2], quant_scheme="tf", default_param_bw=param_bw)
    sim.compute_encodings(lambda m, _: m(x_train[:512]), None)
    return sim


def horizon_flow(data, folder: str) -> Dict[str, float]:
    """Digits CNN: fuse conv-BN -> calibrate -> QAT (W8A8) -> convert -> integer ONNX in ORT;
    the test accuracy after each stage."""
    x_train, y_train, x, y = data
    torch.manual_seed(0)
    model = train(DigitsCNN(), x_train, y_train, epochs=6)
    stages = {"float": accuracy(model, x, y)}
    fused = copy.deepcopy(model)
    fuse_all_conv_bn(fused, dummy_input=x_train[:2])
    stages["fused (float)"] = accuracy(fused, x, y)
    sim = _calibrated(fused, data)
    stages["calibrated (fake-quant)"] = accuracy(sim.model, x, y)
    opt = torch.optim.Adam(sim.model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    sim.model.train()
    for _ in range(2):
        for idx in torch.split(torch.randperm(len(x_train), generator=gen), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(sim.model(x_train[idx]), y_train[idx]).backward()
            opt.step()
    sim.model.eval()
    stages["QAT (fake-quant)"] = accuracy(sim.model, x, y)
    int_model = quantsim.convert(sim)
    stages["converted (fixed-point)"] = accuracy(int_model, x, y)
    path = f"{folder}/flow_int.onnx"
    export_integer_onnx(int_model, path, x[:2])
    stages["integer ONNX (ORT)"] = _top1(_ort(path, x), y)
    return stages


def main() -> None:
    """Run every configuration, print the tables, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    data = digits_data()
    x_train, y_train = data[0], data[1]
    torch.manual_seed(0)
    cnn = train(DigitsCNN(), x_train, y_train, epochs=6)
    torch.manual_seed(0)
    resnet = train(prepare_model(DigitsResNet()), x_train, y_train, epochs=6)
    rows: Dict[str, Dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as folder:
        rows["DigitsCNN W8A8"] = measure(_calibrated(cnn, data), cnn, data, folder, "cnn8")
        rows["DigitsCNN W4A8"] = measure(_calibrated(cnn, data, 4), cnn, data, folder, "cnn4")
        rows["DigitsResNet W8A8"] = measure(_calibrated(resnet, data), resnet, data, folder,
                                            "res8")
        flow = horizon_flow(data, folder)
    columns = ["float", "fake_quant", "fixed_point", "ort_deploy", "int_vs_sim_within_1_lsb",
               "ort_equal_int", "qlinear_differs", "qlinear_max_lsb"]
    print("| model | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in rows.items():
        cells = [f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c])[:40]
                 for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nHorizon-style flow (digits CNN, W8A8):")
    print("| stage | accuracy |\n|---|---|")
    for stage, acc in flow.items():
        print(f"| {stage} | {acc:.4f} |")
    quantsim.atomic.atomic_write_text(RESULTS, json.dumps({  # a crash leaves the old file
        "rows": rows, "horizon_flow": flow, "test_images": len(data[3]),
        "torch": torch.__version__, "platform": platform.platform(), "threads": args.threads,
    }, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
