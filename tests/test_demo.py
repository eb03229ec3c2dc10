"""``quantsim demo --quick`` runs the whole path end to end and its numbers make sense.

The quick mode trains 3 epochs (instead of 8), calibrates over 2 batches (instead of 6) and
runs 1 QAT epoch (instead of 2). That is still enough for the small CNN to pass 90 % test
accuracy on the digits, so the checks are those of the full demo: float >= 90 %; every PTQ
scheme at W8A8 within 0.5 percentage points of float (at most one of the 360 test images
changes its prediction) and at W4A8 within 5 points; QAT W4A8 within 5 points; the QDQ model in
ONNX Runtime within two images of the QAT sim it was exported from (the export agrees with the
sim to within one output step, which can flip a prediction only where the two best logits are
that close); the integer-only model within 1 point of the sim (its requantization rounds once
where the sim rounds twice: a step here and there).
"""
import contextlib
import io
import json
import re
import sys

import pytest
import torch

from quantsim import cli, demo

ROW = re.compile(r"^(?P<label>\S.*?)\s+(?P<acc>\d+\.\d+) %(?:\s+(?P<delta>[-+]\d+\.\d+) pt)?$",
                 re.MULTILINE)
IMAGE = 100 / 360  # one test image, in percentage points


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """(stdout, output folder) of one ``quantsim demo --quick --out DIR`` run."""
    out = tmp_path_factory.mktemp("demo") / "quantsim_demo"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["demo", "--quick", "--out", str(out)])
    assert rc == 0
    return buf.getvalue(), out


@pytest.fixture(scope="module")
def quick_output(quick_run):
    return quick_run[0]


def _final_table(text: str) -> dict:
    table = text.split("== Accuracy (test split, 360 images)")[1]
    return {m["label"].strip(): float(m["acc"]) for m in ROW.finditer(table)}


@pytest.mark.slow  # the whole demo path (one run shared by the file)
def test_quick_demo_accuracies(quick_output):
    acc = _final_table(quick_output)
    assert list(acc) == ["float", "PTQ W4A8 (tf_enhanced)", "QAT W4A8", "ONNX Runtime (QDQ of QAT)",
                         "fixed point (of QAT)"], quick_output
    assert acc["float"] >= 90.0
    assert acc["float"] - acc["PTQ W4A8 (tf_enhanced)"] <= 5.0
    assert acc["float"] - acc["QAT W4A8"] <= 5.0
    assert abs(acc["ONNX Runtime (QDQ of QAT)"] - acc["QAT W4A8"]) <= 2 * IMAGE + 1e-9
    assert abs(acc["fixed point (of QAT)"] - acc["QAT W4A8"]) <= 1.0


@pytest.mark.slow  # the whole demo path (one run shared by the file)
def test_quick_demo_ptq_grid(quick_output):
    """Each scheme at W8A8 (within 0.5 pt of float) and W4A8 (within 5 pt)."""
    acc = _final_table(quick_output)
    grid = quick_output.split("== 2. ")[1].split("== 3. ")[0]
    rows = re.findall(r"^(tf|tf_enhanced|percentile 99\.9)\s+(\d+\.\d+) %\s+(\d+\.\d+) %$", grid,
                      re.MULTILINE)
    assert [r[0] for r in rows] == [label for label, _, _ in demo.SCHEMES]
    for _, w8a8, w4a8 in rows:
        assert acc["float"] - float(w8a8) <= 0.5 and acc["float"] - float(w4a8) <= 5.0


@pytest.mark.slow  # the whole demo path (one run shared by the file)
def test_quick_demo_writes_its_folder(quick_run):
    """The export set, accuracy.json (the table's numbers) and a PNG of it; the QDQ model
    passes ``quantsim verify`` against the exported encodings."""
    text, out = quick_run
    summary = json.loads((out / "accuracy.json").read_text())
    table = _final_table(text)
    assert {k: round(100 * v, 2) for k, v in summary["accuracy"].items()} == table
    assert summary["qdq_grid_problems"] == [] and summary["ort_vs_sim_output_lsb"] <= 1.001
    assert sorted(p.name for p in out.iterdir()) == sorted(summary["files"])
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    prefix = out / demo.EXPORT_PREFIX
    code = cli.main(["verify", f"{prefix}_qdq.onnx", "--encodings", f"{prefix}.encodings"])
    assert code == 0


@pytest.mark.slow  # the whole demo path (one run shared by the file)
def test_quick_demo_prints_the_tensor_table(quick_output):
    """The calibration table lists 3 tensors x 2 bitwidths x 3 schemes."""
    assert re.search(r"^tensor\s+bits\s+scheme\s+range \[min, max\]\s+SQNR\s+max error$",
                     quick_output, re.MULTILINE)
    sqnr_rows = re.findall(r"\s(-?\d+\.\d) dB\s", quick_output)
    assert len(sqnr_rows) == 3 * len(demo.BITWIDTHS) * len(demo.SCHEMES)


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


def test_png_is_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch):
    results = {"float": 0.97, "QAT W4A8": 0.96}
    assert demo.write_png(results, tmp_path / "a.png") is None
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an environment without it
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    note = demo.write_png(results, tmp_path / "b.png")
    assert "matplotlib is not installed" in note and not (tmp_path / "b.png").exists()
