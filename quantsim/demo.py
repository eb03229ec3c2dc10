"""End-to-end quantsim demo on real data: ``python -m quantsim.demo``, ``quantsim demo``, ``make demo``.

The whole path a user takes, in about a minute on two CPU cores, on a small CNN
(Conv-BN-ReLU-MaxPool-Conv-ReLU-Flatten-Linear) trained on the scikit-learn digits:

1. **Calibration of single tensors.** The three calibration schemes (``tf``, ``tf_enhanced``,
   ``percentile`` at 99.9) pick a ``[min, max]`` for real tensors -- the digits images, the
   trained weights of the CNN's last layer and its hidden activations -- at 8 and 4 bits, and
   the table shows the noise each choice leaves (SQNR in dB) and the largest error of a value.
2. **Post-training quantization** of the whole model with each scheme, W8A8 and W4A8
   (:class:`~quantsim.sim.QuantizationSimModel`, default hardware config).
3. **Quantization-aware training**: W4A8 with range learning (tf_enhanced initialisation),
   a short fine-tuning of the weights and the quantizers' ranges.
4. **Export** of the trained sim (float ONNX, encodings, QDQ ONNX, ``.pth``) into the output
   folder, the QDQ model **run in ONNX Runtime**: :func:`quantsim.export.verify` against the
   sim (in output steps), every Q/DQ pair against the encodings file
   (:func:`quantsim.export.grid_check.check_qdq_model`, what ``quantsim verify`` runs), and
   its test accuracy.
5. **Fixed point**: :func:`quantsim.convert` turns the sim into an integer-only model; its
   test accuracy is the deployed one.

It ends with one accuracy table (float / PTQ / QAT / ONNX Runtime / fixed point), written with
the PTQ grid to ``<out>/accuracy.json`` and drawn to ``<out>/accuracy.png`` (skipped, with a
note, without matplotlib).

``--quick`` trains for fewer epochs, calibrates over fewer batches and runs one QAT epoch (used
by the tests); ``--out`` names the folder (default ``./quantsim_demo``). Every step is seeded
and torch runs on one thread, so two runs print the same numbers (on the same torch build).
Needs scikit-learn for the data (``pip install -e '.[test]'`` installs it).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from quantsim import kernels
from quantsim.analyzers import create_analyzer
from quantsim.atomic import atomic_write_text
from quantsim.encoding import Encoding, integer_grid
from quantsim.metrics import sqnr_db
from quantsim.plotting import matplotlib_available, new_figure, save_png
from quantsim.sim import QuantizationSimModel, QuantScheme
from quantsim.tables import format_table

#: Calibration schemes compared in part 1: (label, scheme, analyzer keyword arguments).
SCHEMES: Tuple[Tuple[str, str, dict], ...] = (
    ("tf", "tf", {}),
    ("tf_enhanced", "tf_enhanced", {}),
    ("percentile 99.9", "percentile", {"percentile": 99.9}),
)
#: Bitwidths compared in part 1.
BITWIDTHS: Tuple[int, ...] = (8, 4)


# ----------------------------------------------------------------------------------------------
# data and model
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Digits:
    """The scikit-learn digits (8x8 grey images, 10 classes), split 80/20, pixels in [0, 1]."""

    x_train: torch.Tensor  #: (1437, 1, 8, 8) float32
    y_train: torch.Tensor  #: (1437,) int64
    x_test: torch.Tensor   #: (360, 1, 8, 8) float32
    y_test: torch.Tensor   #: (360,) int64


def load_digits_data(seed: int = 0) -> Digits:
    """Load the digits bundled with scikit-learn (no download) as a stratified 80/20 split.

    Args:
        seed: the split's random state.

    Returns:
        A :class:`Digits` with pixels scaled from 0..16 to [0, 1].
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError("the quantsim demo loads its data with scikit-learn: "
                          "pip install scikit-learn (or pip install -e '.[test]')") from exc

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=0.2, random_state=seed, stratify=labels)
    return Digits(x_tr, y_tr, x_te, y_te)


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU-MaxPool-Conv-ReLU-Flatten-Linear for 8x8 images (about 4k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3, padding=1)
        self.relu2 = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden activations that enter ``conv2`` (after ReLU and max-pooling)."""
        return self.pool(self.relu1(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.fc(self.flatten(self.relu2(self.conv2(self.features(x)))))


def batches(x: torch.Tensor, batch_size: int, limit: Optional[int] = None) -> List[torch.Tensor]:
    """Split ``x`` along dim 0 into batches, keeping at most ``limit`` of them."""
    out = list(torch.split(x, batch_size))
    return out if limit is None else out[:limit]


def train(model: nn.Module, data: Digits, epochs: int, seed: int = 0) -> nn.Module:
    """Train ``model`` with Adam on the training split (seeded); returns it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.x_train), generator=gen)
        for idx in torch.split(order, 64):
            loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, in [0, 1]."""
    model.eval()
    return float((model(x).argmax(dim=1) == y).float().mean())


# ----------------------------------------------------------------------------------------------
# part 1: calibrating single tensors
# ----------------------------------------------------------------------------------------------
def calibrate_tensor(x: torch.Tensor, scheme: str, bitwidth: int, symmetric: bool,
                     **analyzer_kwargs) -> Encoding:
    """Calibrate one tensor with one scheme: observe, compute a range, build the encoding.

    This is what every quantizer of a :class:`QuantizationSimModel` does during
    ``compute_encodings``, written out.

    Example:
        >>> enc = calibrate_tensor(torch.linspace(-1, 2, 101), "tf", 8, symmetric=False)
        >>> enc.qmin, enc.qmax, int(enc.offset)
        (0, 255, -85)
    """
    analyzer = create_analyzer(scheme, **analyzer_kwargs)
    analyzer.observe(x)
    qmin, qmax = integer_grid(bitwidth, symmetric)
    lo, hi = analyzer.compute_range(num_steps=qmax - qmin, symmetric=symmetric)
    return Encoding.from_range(lo, hi, bitwidth=bitwidth, symmetric=symmetric)


def quantization_errors(x: torch.Tensor, encoding: Encoding) -> Tuple[float, float]:
    """``(SQNR in dB, largest absolute error)`` of fake-quantizing ``x`` with ``encoding``."""
    x_hat = encoding.fake_quantize(x)
    return sqnr_db(x, x_hat), float((x - x_hat).abs().max())


def demo_tensors(model: DigitsCNN, data: Digits) -> Dict[str, Tuple[torch.Tensor, bool]]:
    """The tensors of part 1: ``{label: (tensor, symmetric)}``.

    Data (images, activations) gets asymmetric encodings and weights symmetric ones, as the
    default hardware config does.
    """
    with torch.no_grad():
        activations = model.features(data.x_train)
    return {
        "digits pixels": (data.x_train, False),
        "fc.weight (trained)": (model.fc.weight.detach(), True),
        "conv2 input (ReLU)": (activations, False),
    }


def tensor_calibration_table(tensors: Dict[str, Tuple[torch.Tensor, bool]]) -> str:
    """Calibrate every tensor with every scheme and bitwidth; return the results as a table.

    Columns: the tensor, the bitwidth, the scheme, the grid-aligned ``[min, max]`` it chose,
    the SQNR of the whole tensor and the largest error of a single value.
    """
    header = ["tensor", "bits", "scheme", "range [min, max]", "SQNR", "max error"]
    rows = []
    for name, (x, symmetric) in tensors.items():
        for bw in BITWIDTHS:
            for k, (label, scheme, kwargs) in enumerate(SCHEMES):
                enc = calibrate_tensor(x, scheme, bw, symmetric, **kwargs)
                sqnr, max_err = quantization_errors(x, enc)
                rows.append([name if bw == BITWIDTHS[0] and k == 0 else "",
                             str(bw) if k == 0 else "", label,
                             f"[{float(enc.min):.4g}, {float(enc.max):.4g}]",
                             f"{sqnr:.1f} dB", f"{max_err:.3g}"])
    return format_table(header, rows, [False, True, False, False, True, True])


# ----------------------------------------------------------------------------------------------
# part 2: the whole path of a model
# ----------------------------------------------------------------------------------------------
#: bitwidths of the model-level runs: (param_bw, output_bw, label)
MODEL_BITS: Tuple[Tuple[int, int, str], ...] = ((8, 8, "W8A8"), (4, 8, "W4A8"))
#: the scheme whose W4A8 sim QAT starts from (range learning initialised the same way)
QAT_SCHEME = QuantScheme.training_range_learning_with_tf_enhanced_init
#: the file name stem of the exported QAT model
EXPORT_PREFIX = "digits_w4a8_qat"


def forward_pass(model: nn.Module, calibration_batches: Sequence[torch.Tensor]) -> None:
    """The ``compute_encodings`` callback: run the model over the calibration batches."""
    for x in calibration_batches:
        model(x)


def simulate(model: nn.Module, data: Digits, param_bw: int, output_bw: int,
             calibration_batches: Sequence[torch.Tensor],
             scheme: Any = QuantScheme.post_training_tf_enhanced,
             percentile: Optional[float] = None) -> Tuple[QuantizationSimModel, float]:
    """Wrap ``model`` in a sim (default config), calibrate with ``scheme``, evaluate.

    Returns:
        ``(sim, simulated test accuracy)``. ``model`` itself is left untouched (the sim
        works on a copy).
    """
    sim = QuantizationSimModel(model, dummy_input=data.x_train[:1], quant_scheme=scheme,
                               default_param_bw=param_bw, default_output_bw=output_bw)
    if percentile is not None:
        sim.set_percentile_value(percentile)
    sim.compute_encodings(forward_pass, calibration_batches)
    return sim, accuracy(sim.model, data.x_test, data.y_test)


def ptq_table(model: nn.Module, data: Digits, calibration: Sequence[torch.Tensor]
              ) -> Dict[Tuple[str, str], float]:
    """Calibrate a sim with every scheme at every :data:`MODEL_BITS`; ``{(scheme label, bits
    label): test accuracy}``."""
    results = {}
    for label, scheme, kwargs in SCHEMES:
        for param_bw, output_bw, bits in MODEL_BITS:
            _, acc = simulate(model, data, param_bw, output_bw, calibration, scheme,
                              kwargs.get("percentile"))
            results[label, bits] = acc
    return results


def quantization_aware_training(model: nn.Module, data: Digits,
                                calibration: Sequence[torch.Tensor], epochs: int,
                                seed: int = 0) -> Tuple[QuantizationSimModel, float, float]:
    """W4A8 QAT with range learning: calibrate (tf_enhanced init), then fine-tune the weights
    (Adam, lr 1e-3) and the quantizers' ranges (lr 1e-2) for ``epochs`` on the training split.

    Returns:
        ``(sim in eval mode, PTQ test accuracy before training, QAT test accuracy)``.
    """
    sim, ptq = simulate(model, data, 4, 8, calibration, QAT_SCHEME)
    params = dict(sim.model.named_parameters())
    ranges = [p for n, p in params.items() if "_quantizers." in n]
    weights = [p for n, p in params.items() if "_quantizers." not in n]
    opt = torch.optim.Adam([{"params": weights, "lr": 1e-3}, {"params": ranges, "lr": 1e-2}])
    gen = torch.Generator().manual_seed(seed)
    sim.model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(data.x_train), generator=gen).split(64):
            loss = nn.functional.cross_entropy(sim.model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    sim.model.eval()
    return sim, ptq, accuracy(sim.model, data.x_test, data.y_test)


def ort_accuracy(qdq_path: Path, data: Digits) -> float:
    """Test accuracy of the exported QDQ model in ONNX Runtime (CPU), one image per run (the
    export's input shape is the dummy input's, batch 1)."""
    import onnxruntime as ort
    session = ort.InferenceSession(str(qdq_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = data.x_test.numpy()
    predictions = [int(session.run(None, {name: x[i:i + 1]})[0].argmax()) for i in range(len(x))]
    return float((torch.tensor(predictions) == data.y_test).float().mean())


def accuracy_rows(results: Dict[str, Optional[float]], float_acc: float) -> List[List[str]]:
    """Rows of the accuracy table: model, test accuracy, difference to float (pt)."""
    rows = []
    for label, acc in results.items():
        if acc is None:
            rows.append([label, "n/a", ""])
        else:
            rows.append([label, f"{100 * acc:.2f} %",
                         "" if label == "float" else f"{100 * (acc - float_acc):+.2f} pt"])
    return rows


def write_png(results: Dict[str, Optional[float]], path: Path) -> Optional[str]:
    """Bar chart of ``results`` as a PNG (atomically); returns why not when matplotlib is
    missing, else None."""
    if not matplotlib_available():
        return "matplotlib is not installed (pip install matplotlib); the PNG was skipped"
    shown = {k: v for k, v in results.items() if v is not None}
    fig, ax = new_figure(8, 3.2)
    bars = ax.barh(list(shown)[::-1], [100 * v for v in shown.values()][::-1], color="tab:blue")
    for bar, value in zip(bars, list(shown.values())[::-1]):
        ax.text(bar.get_width() - 0.3, bar.get_y() + bar.get_height() / 2, f"{100 * value:.2f} %",
                va="center", ha="right", color="white", fontsize=9)
    low = min(shown.values())
    ax.set_xlim(max(0.0, 100 * low - 10), 100)
    ax.set_xlabel("test accuracy (%), scikit-learn digits")
    ax.set_title("Digits CNN, W4A8: simulated, ONNX Runtime, integer-only")
    fig.tight_layout()
    save_png(fig, path, dpi=100)
    return None


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 90 - len(title)))


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread, restoring the previous count afterwards.

    The demo's tensors are tiny: splitting each op over threads costs more than it saves
    (several times more on a busy machine), and a fixed thread count keeps the numbers
    reproducible from one machine to the next.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the demo; ``argv`` as on the command line (``['--quick']`` for a short run)."""
    parser = argparse.ArgumentParser(prog="python -m quantsim.demo",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="train 3 epochs instead of 8, calibrate over 2 batches instead of "
                             "6, 1 QAT epoch instead of 2")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, init and shuffling")
    parser.add_argument("--out", default="quantsim_demo", metavar="DIR",
                        help="folder for the exported model, accuracy.json and accuracy.png "
                             "(default ./quantsim_demo)")
    args = parser.parse_args(argv)
    # torch.compile's one-off start-up (tens of seconds on 2 cores) outweighs its speed-up on
    # tensors this small; QUANTSIM_KERNEL=compiled (or auto) in the environment overrides this.
    previous_backend = kernels.get_backend()
    if "QUANTSIM_KERNEL" not in os.environ:
        kernels.set_backend("eager")
    try:
        with _one_thread():
            run(quick=args.quick, seed=args.seed, out=args.out)
    finally:
        kernels.set_backend(previous_backend)
    return 0


def run(quick: bool = False, seed: int = 0, out: str = "quantsim_demo") -> Dict[str, Any]:
    """The whole path (module docstring); prints every step, writes into ``out``.

    Returns:
        What ``accuracy.json`` holds: the accuracy table, the PTQ grid, the ORT agreement and
        the files written.
    """
    epochs, num_batches, qat_epochs = (3, 2, 1) if quick else (8, 6, 2)
    out_dir = Path(out)
    start = time.perf_counter()
    _section("Train a small CNN on the scikit-learn digits")
    data = load_digits_data(seed)
    torch.manual_seed(seed)
    model = train(DigitsCNN(), data, epochs, seed)
    float_acc = accuracy(model, data.x_test, data.y_test)
    print(f"{len(data.x_train)} training / {len(data.x_test)} test images, {epochs} epochs, "
          f"{sum(p.numel() for p in model.parameters())} parameters, test accuracy "
          f"{100 * float_acc:.2f} % ({time.perf_counter() - start:.1f} s)")

    _section("1. Calibrate single tensors (per tensor; data asymmetric, weights symmetric)")
    print(tensor_calibration_table(demo_tensors(model, data)))
    print("tf keeps every value (max error = half a step) but spends steps on rare outliers;\n"
          "tf_enhanced and percentile clip those outliers to shrink the step for the bulk.")

    _section("2. Post-training quantization: QuantizationSimModel with each scheme")
    calibration = batches(data.x_train, 256, num_batches)
    ptq = ptq_table(model, data, calibration)
    print(f"calibrated over {len(calibration)} training batches of up to 256 images; "
          "test accuracy:")
    print(format_table(["scheme"] + [b for _, _, b in MODEL_BITS],
                       [[label] + [f"{100 * ptq[label, b]:.2f} %" for _, _, b in MODEL_BITS]
                        for label, _, _ in SCHEMES], [False] + [True] * len(MODEL_BITS)))

    _section(f"3. Quantization-aware training: W4A8, range learning, {qat_epochs} epoch(s)")
    torch.manual_seed(seed)
    sim, qat_ptq, qat_acc = quantization_aware_training(model, data, calibration, qat_epochs, seed)
    print(f"W4A8 (tf_enhanced init) {100 * qat_ptq:.2f} % before, {100 * qat_acc:.2f} % after "
          f"({time.perf_counter() - start:.1f} s so far)\n"
          "This CNN loses almost nothing to PTQ already, so QAT has little to win here (one test "
          "image is 0.28 pt);\nnotebooks/02_qat_range_learning.ipynb shows QAT recovering what "
          "PTQ loses on a harder model.")

    _section(f"4. Export and run the QDQ model in ONNX Runtime ({out_dir})")
    from quantsim.export import export, verify
    from quantsim.export.grid_check import check_qdq_model
    files = export(sim, str(out_dir), EXPORT_PREFIX, data.x_test[:1])
    agreement = verify(sim, str(files.qdq_onnx), data.x_test[:1])
    grid = check_qdq_model(files.qdq_onnx, files.encodings, {"x": data.x_test[:1].numpy()})
    ort_acc = ort_accuracy(files.qdq_onnx, data)
    print(agreement)
    print(f"Q/DQ pairs vs {files.encodings.name}: {len(grid.pairs) - len(grid.unmatched)}/"
          f"{len(grid.pairs)} matched, {len(grid.problems)} problem(s)  (the CLI: quantsim "
          f"verify {files.qdq_onnx} --encodings {files.encodings})")

    _section("5. Fixed point: quantsim.convert(sim) -> integer-only model")
    fixed_acc, fixed_note = _fixed_point(sim, data)
    print(fixed_note)

    _section("Accuracy (test split, 360 images)")
    results: Dict[str, Optional[float]] = {
        "float": float_acc,
        "PTQ W4A8 (tf_enhanced)": qat_ptq,
        "QAT W4A8": qat_acc,
        "ONNX Runtime (QDQ of QAT)": ort_acc,
        "fixed point (of QAT)": fixed_acc,
    }
    print(format_table(["model", "test accuracy", "vs float"], accuracy_rows(results, float_acc),
                       [False, True, True]))
    png_note = write_png(results, out_dir / "accuracy.png")
    summary = {
        "accuracy": results,
        "ptq": {f"{label} {bits}": acc for (label, bits), acc in ptq.items()},
        "ort_vs_sim_output_lsb": agreement.max_diff_lsb,
        "qdq_grid_problems": grid.problems,
        "seed": seed, "quick": quick,
        "files": [p.name for p in files.all()] + ["accuracy.json"]
                 + ([] if png_note else ["accuracy.png"]),
    }
    atomic_write_text(out_dir / "accuracy.json", json.dumps(summary, indent=2) + "\n")
    print(f"\nfiles in {out_dir}: {', '.join(summary['files'])}")
    if png_note:
        print(f"note: {png_note}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return summary


def _fixed_point(sim: QuantizationSimModel, data: Digits) -> Tuple[Optional[float], str]:
    """Accuracy of ``quantsim.convert(sim)`` and a line about it (the integer model's ops and
    float islands)."""
    from quantsim.convert import convert
    integer_model = convert(sim)
    acc = accuracy(integer_model, data.x_test, data.y_test)
    report = integer_model.report
    islands = len(report.float_ops)
    what = "integer only" if report.deployable else f"{islands} float island(s)"
    return acc, (f"integer model ({what}): test accuracy {100 * acc:.2f} %; "
                 f"{len(report.layers)} layer(s) with fixed-point requantization")


if __name__ == "__main__":
    raise SystemExit(main())
