"""Write the SVG figures of docs/concepts.md from quantsim's own arithmetic.

Run from the repository root after changing the encoding maths:
``python docs/figures/make_figures.py``. Plain SVG, no plotting library: each file is a few kB.
"""
from pathlib import Path

import torch

from quantsim.encoding import Encoding

OUT = Path(__file__).resolve().parent
W, H, PAD = 560, 300, 40


def _xy(x: float, y: float, lo: float, hi: float) -> str:
    """Map data coordinates in [lo, hi] x [lo, hi] to SVG pixels."""
    px = PAD + (x - lo) / (hi - lo) * (W - 2 * PAD)
    py = H - PAD - (y - lo) / (hi - lo) * (H - 2 * PAD)
    return f"{px:.1f},{py:.1f}"


def qdq_staircase() -> str:
    """x against fake_quantize(x) for a 4-bit asymmetric encoding of the range (-1, 2.5)."""
    enc = Encoding.from_range(torch.tensor(-1.0), torch.tensor(2.5), bitwidth=4, symmetric=False)
    lo, hi = -2.0, 3.5
    xs = torch.linspace(lo, hi, 1101)
    ys = enc.fake_quantize(xs)
    # a flat run of equal outputs needs only its two ends
    keep = [i for i in range(len(xs))
            if i in (0, len(xs) - 1) or ys[i] != ys[i - 1] or ys[i] != ys[i + 1]]
    line = " ".join(_xy(float(xs[i]), float(ys[i]), lo, hi) for i in keep)
    ident = f"{_xy(lo, lo, lo, hi)} {_xy(hi, hi, lo, hi)}"
    mn, mx, s, o = float(enc.min), float(enc.max), float(enc.scale), int(enc.offset)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" font-family="sans-serif" '
        f'font-size="12">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#888"/>',
        f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="#888"/>',
        f'<polyline points="{ident}" fill="none" stroke="#bbb" stroke-dasharray="4 3"/>',
        f'<polyline points="{line}" fill="none" stroke="#1f77b4" stroke-width="2"/>',
    ]
    for v, label in ((mn, "min = "), (mx, "max = "), (0.0, "")):
        x0 = _xy(v, lo, lo, hi).split(",")[0]
        parts.append(f'<line x1="{x0}" y1="{PAD}" x2="{x0}" y2="{H - PAD}" stroke="#d62728" '
                     f'stroke-width="0.8" stroke-dasharray="2 2"/>')
        parts.append(f'<text x="{x0}" y="{H - PAD + 14}" text-anchor="middle">{label}{v:.3g}</text>')
    parts += [
        f'<text x="{W / 2}" y="{H - 6}" text-anchor="middle">x</text>',
        f'<text x="12" y="{H / 2}" transform="rotate(-90 12 {H / 2})" text-anchor="middle">'
        'fake_quantize(x)</text>',
        f'<text x="{PAD + 8}" y="{PAD + 4}">4-bit asymmetric: scale {s:.4g}, offset {o}, '
        f'16 levels, clamped outside [min, max]</text>',
        "</svg>",
    ]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    (OUT / "qdq_staircase.svg").write_text(qdq_staircase(), encoding="utf-8")
