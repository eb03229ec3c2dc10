"""The notebooks under ``notebooks/`` execute without errors and print what they promise.

They run in a ``python3`` kernel started with this interpreter: ipykernel installs that
kernelspec into the virtualenv (``<venv>/share/jupyter/kernels/python3``), and jupyter_client
falls back to ipykernel's own spec if it is missing, so a fresh ``make test`` venv needs no
manual ``ipykernel install``. The notebook is executed in memory; the file is not rewritten.
"""
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _execute(path: Path):
    """Run every cell of ``path`` (cwd = its folder) and return the executed notebook."""
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=300,
        resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    return nb


def _tagged(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")


@pytest.mark.slow
def test_quick_start_notebook():
    """01_quick_start runs (errors raise CellExecutionError), prints its calibration table
    with one row per tensor and scheme, the sim's encoding table, and draws its two figures."""
    nb = _execute(NOTEBOOKS / "01_quick_start.ipynb")

    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors

    table = _stdout(_tagged(nb, "calibration-table"))
    header = r"^tensor\s+bits\s+scheme\s+range \[min, max\]\s+scale\s+offset\s+SQNR\s+max error$"
    assert re.search(header, table, re.MULTILINE), table
    assert len(re.findall(r" dB ", table)) == 18, table  # 3 tensors x 2 bitwidths x 3 schemes

    sim_out = _stdout(_tagged(nb, "sim-table"))
    assert "QuantizationSimModel (post_training_tf_enhanced" in sim_out, sim_out
    assert re.search(r"W8A8 simulated \d+\.\d\d%", sim_out), sim_out

    accuracy = _stdout(_tagged(nb, "scheme-accuracy"))
    assert re.search(r"^quant_scheme\s+W8A8\s+W4A8\s+W4A4$", accuracy, re.MULTILINE), accuracy

    images = [o for c in nb.cells for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 2


def _no_errors(nb) -> None:
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


def _table_rows(text: str) -> dict:
    """The rows of a ``demo.format_table`` table: first column -> the other cells (columns are
    separated by two or more spaces)."""
    lines = text.strip().splitlines()
    dashes = next(i for i, line in enumerate(lines) if set(line.replace(" ", "")) == {"-"})
    rows = {}
    for line in lines[dashes + 1:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return rows


def _percent(cell: str) -> float:
    return float(re.match(r"\s*(\d+\.\d+)%", cell).group(1))


def _assert_verified(text: str) -> None:
    """A ``quantsim.verify`` report: the QDQ model within one output step of the sim and every
    quantizer, fed the sim's inputs, agreeing exactly (ORT may round ties the other way in
    its fused default session only)."""
    lsbs = [int(n) for n in re.findall(r"(\d+) LSB", text)]
    assert lsbs and max(lsbs) <= 1, text
    agree = re.search(r"quantizers \(isolated\): (\d+)/(\d+) agree", text)
    assert agree and agree.group(1) == agree.group(2), text


@pytest.mark.slow
def test_qat_range_learning_notebook():
    """02_qat_range_learning: the accuracy table (float, PTQ, QAT with fixed and learned
    ranges at W4A8 and W4A4) shows QAT winning back what PTQ lost on the rescaled CNN, the
    range table lists the 7 quantizers, the loss curves are drawn and ORT agrees with the
    exported QAT sim."""
    nb = _execute(NOTEBOOKS / "02_qat_range_learning.ipynb")
    _no_errors(nb)

    rows = _table_rows(_stdout(_tagged(nb, "qat-table")))
    assert list(rows) == ["float", "PTQ (tf_enhanced)", "QAT, fixed ranges", "QAT, range learning"]
    for column in (0, 1):  # W4A8, W4A4
        ptq = _percent(rows["PTQ (tf_enhanced)"][column])
        assert ptq < _percent(rows["float"][column]) - 20  # the rescaled CNN is hard to quantize
        for qat in ("QAT, fixed ranges", "QAT, range learning"):
            assert _percent(rows[qat][column]) > ptq + 20, rows
    assert _percent(rows["QAT, range learning"][0]) > 85, rows  # W4A8 close to float again

    ranges = _table_rows(_stdout(_tagged(nb, "ranges")))
    assert len(ranges) == 7 and all(len(v) == 2 for v in ranges.values()), ranges
    _assert_verified(_stdout(_tagged(nb, "verify")))
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1


@pytest.mark.slow
def test_qat_modules_amct_notebook():
    """04_qat_modules_amct: replace_with_qat swaps the 4 layers, the fine-tuned models export
    and convert, the fake-quant and deploy ONNX files reproduce the QAT model's accuracy in
    ORT (unoptimized: the Q/DQ arithmetic exactly, so at most one test image may flip on a
    near-tie), and the INT4 deploy model holds weight codes in [-8, 7]."""
    nb = _execute(NOTEBOOKS / "04_qat_modules_amct.ipynb")
    _no_errors(nb)
    assert "swapped: ['0', '3', '7', '9']" in _stdout(_tagged(nb, "swapped"))

    rows = _table_rows(_stdout(_tagged(nb, "amct-table")))
    assert list(rows) == ["weights INT8", "weights INT4"]
    one_image = 100 / 360 + 1e-6
    for name, (float_acc, qat, fake_quant, deploy) in rows.items():
        assert _percent(qat) > 90 and _percent(float_acc) > 90, rows
        assert abs(_percent(fake_quant) - _percent(qat)) <= one_image, rows
        assert abs(_percent(deploy) - _percent(qat)) <= one_image, rows

    weights = _stdout(_tagged(nb, "deploy-weights"))
    codes = re.search(r"4 weight tensors, codes in \[(-?\d+), (-?\d+)\]", weights)
    assert codes and -8 <= int(codes.group(1)) < 0 < int(codes.group(2)) <= 7, weights
    assert "'INT32': " in weights, weights  # int32 bias codes


@pytest.mark.slow
def test_from_aimet_notebook():
    """05_from_aimet: the AIMET script differs from the run one in import lines only, runs
    (calibrates, keeps the accuracy, exports AIMET's file set), and aimet-torch's own 2.0.0
    and 1.0.0 encodings files load (the 1.0.0 one with strict=False, leaving the quantizers of
    its two TorchScript-named tensors uncalibrated)."""
    nb = _execute(NOTEBOOKS / "05_from_aimet.ipynb")
    _no_errors(nb)

    diff = _stdout(_tagged(nb, "diff")).splitlines()
    changed = [line for line in diff
               if line.startswith(("+", "-")) and not line.startswith(("+++", "---"))]
    assert len(changed) == 8, diff
    assert all(re.match(r"[+-]from (aimet_\w+|quantsim)[\w.]* import \w+$", line) for line in changed)

    run = _stdout(_tagged(nb, "script-run"))
    accs = re.search(r"float (\d+\.\d+)%, W8A8 simulated (\d+\.\d+)%", run)
    assert accs and float(accs.group(2)) > float(accs.group(1)) - 2, run
    assert "7 enabled quantizers" in run, run
    exported = _stdout(_tagged(nb, "exported"))
    for name in ("digits.encodings", "digits.onnx", "digits.pth", "digits_torch.encodings"):
        assert f"'{name}'" in exported, exported
    assert "version 1.0.0" in exported, exported

    v2 = _stdout(_tagged(nb, "aimet-v2"))
    assert re.search(r"2\.0\.0 file: \d+ quantizers set", v2), v2
    assert re.search(r"^conv1\.input_quantizers\.0 .* 0\.03059 +-128$", v2, re.MULTILINE), v2
    v1 = _stdout(_tagged(nb, "aimet-v1"))
    assert "strict=True:" in v1 and "'t.1', '44'" in v1, v1
    assert "left to calibrate: ['conv1.input_quantizers.0', 'fc.output_quantizers.0']" in v1, v1


@pytest.mark.slow
def test_transformer_minilm_notebook():
    """03_transformer_minilm: prepare_model gives each BERT layer its attention and residual
    modules, balancing runs, the W8A16 sim keeps the embeddings (cosine >= 0.99 with the float
    ones, as tests/test_minilm.py asks) while W8A8 does not, and every quantizer of the
    exported QDQ model agrees with the sim within one step when fed the sim's inputs."""
    nb = _execute(NOTEBOOKS / "03_transformer_minilm.ipynb")
    _no_errors(nb)
    prepared = _stdout(_tagged(nb, "prepare"))
    for name in ("attention_self_qk_matmul", "attention_self_softmax", "attention_output_add"):
        assert name in prepared, prepared

    cosines = _stdout(_tagged(nb, "cosines"))
    assert re.search(r"balanced \d+ layers", cosines), cosines
    rows = {k: [float(v) for v in cells] for k, cells in _table_rows(cosines.split("\n\n", 1)[1]).items()}
    assert list(rows) == ["W8A8", "W8A8, balanced", "W8A16"], rows
    assert rows["W8A16"][0] >= 0.99, rows
    assert rows["W8A8"][1] < rows["W8A16"][1] - 0.05, rows

    report = _stdout(_tagged(nb, "verify"))
    isolated = re.search(r"isolated \(each quantizer fed the sim's inputs\): (\d+) LSB", report)
    assert isolated and int(isolated.group(1)) <= 1, report
    assert all(int(n) <= 1 for n in re.findall(r": max (\d+) LSB", report)), report


@pytest.mark.slow
def test_horizon_flow_notebook():
    """06_horizon_flow: conv-BN-ReLU fuses without changing the eval outputs, the three phases
    run in their modes, the integer model is deployable and within one step of the sim at
    every requantization, and its accuracy in torch and in ONNX Runtime is the QAT sim's up to
    a near-tie image."""
    nb = _execute(NOTEBOOKS / "06_horizon_flow.ipynb")
    _no_errors(nb)
    fuse = _stdout(_tagged(nb, "fuse"))
    assert "fused 1 conv-BN pair(s): conv1 is now ConvBn" in fuse, fuse
    accs = re.findall(r"accuracy (\d+\.\d+)%", fuse)
    assert len(accs) == 2 and accs[0] == accs[1], fuse  # fusing keeps the eval function
    assert re.search(r"QAT: \d+ steps, .* validation accuracy", _stdout(_tagged(nb, "qat")))

    report = _stdout(_tagged(nb, "convert"))
    assert "deployable" in report and "not deployable" not in report, report
    outputs = re.search(r"model outputs vs sim \(LSB\): max ([\d.]+), ([\d.]+)% <= 1", report)
    assert outputs and float(outputs.group(1)) <= 1.001, report  # one step, float rounding

    rows = {k: _percent(v[0]) for k, v in _table_rows(_stdout(_tagged(nb, "horizon-table"))).items()}
    assert list(rows) == ["float", "calibrated (fake-quant)", "QAT, validation phase",
                          "fixed point (torch)", "fixed point (ONNX Runtime)"], rows
    one_image = 100 / 360 + 1e-6
    assert abs(rows["fixed point (torch)"] - rows["QAT, validation phase"]) <= one_image, rows
    assert abs(rows["fixed point (ONNX Runtime)"] - rows["fixed point (torch)"]) <= one_image, rows
    assert rows["QAT, validation phase"] > 90, rows


#: the workflow notebooks kept in git without outputs (a diff shows code, not PNG bytes)
STRIPPED = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))   # every notebook, new ones too


@pytest.mark.parametrize("name", STRIPPED)
def test_notebook_is_stored_without_outputs(name):
    """Each workflow notebook is valid nbformat 4 and stored stripped: no outputs, no
    execution counts."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_transformer_mixed_precision_notebook():
    """transformer_mixed_precision runs: W8A8 cosine, the analysis' worst quantizers and SQNR
    plot, the mixed-precision summary meeting its target with two plots, export + ORT."""
    nb = _execute(NOTEBOOKS / "transformer_mixed_precision.ipynb")
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors

    assert re.search(r"W8A8 embedding cosine: min 0\.\d+", _stdout(_tagged(nb, "w8a8")))
    analysis = _stdout(_tagged(nb, "analysis"))
    assert len(re.findall(r" dB  ", analysis)) == 6, analysis
    summary = _stdout(_tagged(nb, "amp-summary"))
    assert "Mixed precision over W8A8 / W8A16" in summary, summary
    final = float(re.search(r"chosen: final score ([\d.]+)", summary).group(1))
    assert final >= 0.99, summary
    export = _stdout(_tagged(nb, "export-check"))
    own, isolated = (float(v) for v in re.search(
        r"max ([\d.]+) LSB of its own step, model output ([\d.]+) output LSB", export).groups())
    # one step, plus float32 rounding of each value: 2^(16 - 22) steps on a 16-bit grid
    assert own <= 1 + 2.0 ** -6 and isolated <= 1 + 2.0 ** -6, export
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 3
