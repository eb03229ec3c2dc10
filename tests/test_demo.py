"""``python -m quantsim.demo --quick`` runs end to end and its numbers make sense.

The quick mode trains 3 epochs (instead of 8) and calibrates over 2 batches (instead of 6).
That is still enough for the small CNN to pass 90 % test accuracy on the digits, so the
checks are the same as for the full demo: float accuracy >= 90 %, W8A8 within 0.5 percentage
points of float (at most one of the 360 test images changes its prediction), W4A8 within
5 points.
"""
import contextlib
import io
import re

import pytest
import torch

from quantsim import demo

ACCURACY = re.compile(r"^(?P<label>.+?)\s+test accuracy\s+(?P<acc>\d+\.\d+) %", re.MULTILINE)


@pytest.fixture(scope="module")
def quick_output():
    """Stdout of one ``main(['--quick'])`` run, shared by the tests of this file."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = demo.main(["--quick"])
    assert rc == 0
    return buf.getvalue()


def _accuracies(text: str) -> dict:
    return {m["label"].strip(): float(m["acc"]) for m in ACCURACY.finditer(text)}


def test_quick_demo_accuracies(quick_output):
    """Float accuracy >= 90 %; W8A8 loses at most 0.5 pt and W4A8 at most 5 pt."""
    acc = _accuracies(quick_output)
    assert set(acc) == {"float model", "W8A8 (tf_enhanced)", "W4A8 (tf_enhanced)"}, quick_output
    assert acc["float model"] >= 90.0
    assert acc["float model"] - acc["W8A8 (tf_enhanced)"] <= 0.5
    assert acc["float model"] - acc["W4A8 (tf_enhanced)"] <= 5.0


def test_quick_demo_prints_both_tables(quick_output):
    """The calibration table lists 3 tensors x 2 bitwidths x 3 schemes; the sim table follows."""
    assert re.search(r"^tensor\s+bits\s+scheme\s+range \[min, max\]\s+SQNR\s+max error$",
                     quick_output, re.MULTILINE)
    sqnr_rows = re.findall(r"\s(-?\d+\.\d) dB\s", quick_output)
    assert len(sqnr_rows) == 3 * len(demo.BITWIDTHS) * len(demo.SCHEMES)
    assert "QuantizationSimModel (post_training_tf_enhanced" in quick_output
    assert re.search(r"^conv1\.param_quantizers\.weight\s+8\s+True\s+yes", quick_output,
                     re.MULTILINE)


def test_calibrate_tensor_tf_keeps_every_value():
    """With tf, the 8-bit range covers the data, so no error exceeds half a step."""
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    enc = demo.calibrate_tensor(x, "tf", 8, symmetric=False)
    sqnr, max_err = demo.quantization_errors(x, enc)
    assert max_err <= float(enc.scale) / 2 + 1e-7
    assert sqnr > 40.0


def test_calibrate_tensor_tf_enhanced_clips_an_outlier():
    """tf_enhanced clips a lone outlier and so has a higher SQNR on the bulk than tf."""
    x = torch.cat([torch.randn(10000, generator=torch.Generator().manual_seed(0)),
                   torch.tensor([60.0])])
    tf = demo.calibrate_tensor(x, "tf", 4, symmetric=False)
    tfe = demo.calibrate_tensor(x, "tf_enhanced", 4, symmetric=False)
    assert float(tfe.max) < 60.0 <= float(tf.max) + float(tf.scale)
    bulk = x[:-1]
    assert demo.sqnr_db(bulk, tfe.fake_quantize(bulk)) > demo.sqnr_db(bulk, tf.fake_quantize(bulk))


def test_sqnr_of_exact_copy_is_infinite():
    """No noise means an infinite SQNR, not a division error."""
    x = torch.tensor([1.0, -2.0])
    assert demo.sqnr_db(x, x.clone()) == float("inf")
