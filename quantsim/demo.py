"""End-to-end quantsim demo on real data: ``python -m quantsim.demo`` (what ``make demo`` runs).

It takes well under a minute on two CPU cores and prints two things:

1. **Calibration of single tensors.** The three calibration schemes (``tf``, ``tf_enhanced``,
   ``percentile`` at 99.9) pick a ``[min, max]`` for real tensors -- the scikit-learn digits
   images, the trained weights of a small CNN's last layer and that CNN's hidden activations
   -- at 8 and 4 bits, and the table shows how much noise each choice leaves (SQNR in dB,
   higher is better) and the largest error of any single value. This is the low-level API:
   an analyzer observes a tensor, returns a range, and :meth:`Encoding.from_range` turns the
   range into a scale and an offset.
2. **A whole model.** The CNN (Conv-BN-ReLU-MaxPool-Conv-ReLU-Flatten-Linear) trained on the
   digits for a few seconds is wrapped in :class:`~quantsim.sim.QuantizationSimModel`
   (W8A8 and W4A8, ``tf_enhanced``, default hardware config), calibrated over training
   batches, and its simulated test accuracy is compared with the float one.

``--quick`` trains for fewer epochs and calibrates over fewer batches (used by the tests).
Every step is seeded and torch runs on one thread, so two runs print the same numbers (on the
same torch build). Needs scikit-learn for the data (``pip install -e '.[test]'`` installs it).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from quantsim import kernels
from quantsim.analyzers import create_analyzer
from quantsim.encoding import Encoding, integer_grid
from quantsim.sim import QuantizationSimModel, QuantScheme

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


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - x_hat)^2)`` in dB."""
    signal = float(x.double().square().sum())
    noise = float((x.double() - x_hat.double()).square().sum())
    return math.inf if noise == 0 else 10.0 * math.log10(signal / noise)


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


def format_table(header: Sequence[str], rows: Iterable[Sequence[str]],
                 right: Sequence[bool]) -> str:
    """Align ``rows`` under ``header`` (a dashed rule between); ``right`` per column."""
    rows = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for k, row in enumerate(rows):
        cells = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


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
# part 2: a whole model
# ----------------------------------------------------------------------------------------------
def forward_pass(model: nn.Module, calibration_batches: Sequence[torch.Tensor]) -> None:
    """The ``compute_encodings`` callback: run the model over the calibration batches."""
    for x in calibration_batches:
        model(x)


def simulate(model: nn.Module, data: Digits, param_bw: int, output_bw: int,
             calibration_batches: Sequence[torch.Tensor]) -> Tuple[QuantizationSimModel, float]:
    """Wrap ``model`` in a sim (``tf_enhanced``, default config), calibrate, evaluate.

    Returns:
        ``(sim, simulated test accuracy)``. ``model`` itself is left untouched (the sim
        works on a copy).
    """
    sim = QuantizationSimModel(model, dummy_input=data.x_train[:1],
                               quant_scheme=QuantScheme.post_training_tf_enhanced,
                               default_param_bw=param_bw, default_output_bw=output_bw)
    sim.compute_encodings(forward_pass, calibration_batches)
    return sim, accuracy(sim.model, data.x_test, data.y_test)


def accuracy_line(label: str, acc: float, reference: Optional[float] = None) -> str:
    """One line of the accuracy report, e.g. ``W8A8 ... accuracy 98.61 %  (-0.28 pt)``."""
    line = f"{label:<26} test accuracy {100 * acc:6.2f} %"
    if reference is not None:
        line += f"   ({100 * (acc - reference):+.2f} pt vs float)"
    return line


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
                        help="train 3 epochs instead of 8, calibrate over 2 batches instead of 6")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, init and shuffling")
    args = parser.parse_args(argv)
    # torch.compile's one-off start-up (tens of seconds on 2 cores) outweighs its speed-up on
    # tensors this small; QUANTSIM_KERNEL=compiled (or auto) in the environment overrides this.
    previous_backend = kernels.get_backend()
    if "QUANTSIM_KERNEL" not in os.environ:
        kernels.set_backend("eager")
    try:
        with _one_thread():
            run(quick=args.quick, seed=args.seed)
    finally:
        kernels.set_backend(previous_backend)
    return 0


def run(quick: bool = False, seed: int = 0) -> None:
    """Train, calibrate single tensors, simulate the model; print everything (see module doc)."""
    epochs, num_batches = (3, 2) if quick else (8, 6)
    start = time.perf_counter()
    _section("Train a small CNN on the scikit-learn digits")
    data = load_digits_data(seed)
    torch.manual_seed(seed)
    model = train(DigitsCNN(), data, epochs, seed)
    float_acc = accuracy(model, data.x_test, data.y_test)
    print(f"{len(data.x_train)} training / {len(data.x_test)} test images, {epochs} epochs, "
          f"{sum(p.numel() for p in model.parameters())} parameters "
          f"({time.perf_counter() - start:.1f} s)")
    print(accuracy_line("float model", float_acc))

    _section("1. Calibrate single tensors (per tensor; data asymmetric, weights symmetric)")
    print(tensor_calibration_table(demo_tensors(model, data)))
    print("tf keeps every value (max error = half a step) but spends steps on rare outliers;\n"
          "tf_enhanced and percentile clip those outliers to shrink the step for the bulk.")

    _section("2. QuantizationSimModel (tf_enhanced, default config)")
    calibration = batches(data.x_train, 256, num_batches)
    print(f"calibrating over {len(calibration)} training batches of up to 256 images")
    sim, w8a8 = simulate(model, data, 8, 8, calibration)
    print(accuracy_line("float model", float_acc))
    print(accuracy_line("W8A8 (tf_enhanced)", w8a8, float_acc))
    _, w4a8 = simulate(model, data, 4, 8, calibration)
    print(accuracy_line("W4A8 (tf_enhanced)", w4a8, float_acc))
    print("\nW8A8 encodings:")
    print(sim)
    print(f"\ndone in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    raise SystemExit(main())
