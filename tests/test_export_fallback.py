"""Export of models torch.export refuses (Python control flow on tensor values): the
TorchScript-based fallback, its names, its QDQ model against the sim, and its errors."""
from __future__ import annotations

import doctest
import json
import warnings

import onnx
import pytest
import torch
from torch import nn

from conftest import assert_qdq_agrees
from quantsim import ExportError
from quantsim.export import ExporterFallbackWarning, ExportersFailedError, load_encodings, verify
from quantsim.export import torchscript_onnx
from quantsim.export.onnx_export import EXPORTER_KEY, MODULE_KEY, error_essence
from quantsim.export.torchscript_onnx import dynamo_input_names
from quantsim.sim import QuantizationSimModel

pytestmark = pytest.mark.usefixtures("one_thread")


class BranchyCNN(nn.Module):
    """conv-bn-relu-pool, then block ``a`` or ``b`` depending on the input's mean, then fc.

    ``bn1`` and ``a.1`` keep their default, equal-valued parameters, which the TorchScript
    exporter would merge into one initializer. With ``data_dependent = False`` the forward
    always takes ``a`` and torch.export captures it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.data_dependent = True
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = self.pool(self.relu1(self.bn1(self.conv1(x))))
        if (x.mean() > 0) if self.data_dependent else True:
            y = self.a(y)
        else:
            y = self.b(y)
        return self.fc(self.flatten(y))


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d, d), nn.Linear(d, d)])
        self.ln1 = nn.LayerNorm(d)
        self.ln2 = nn.LayerNorm(d)  # equal-valued to ln1: merged by the raw TorchScript export

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        for layer in self.layers:
            x = x + torch.relu(layer(x))
        return self.ln2(self.ln1(x))


class BranchyNested(nn.Module):
    """Scopes that the TorchScript exporter names lossily: a ModuleList and a ModuleDict (never
    called themselves), Sequentials in a Sequential, a module reachable under two paths
    (``act`` = ``body.0``) and a module called twice (``shared``); 3-D Linear layers."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.data_dependent = True
        self.enc = nn.Sequential(_Block(d), nn.Sequential(nn.Linear(d, d), nn.GELU()))
        self.heads = nn.ModuleDict({"pos": _Block(d), "neg": nn.Linear(d, d)})
        self.act = nn.ReLU()
        self.body = nn.Sequential(self.act, nn.Linear(d, d))
        self.shared = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.enc(x)
        if (x.sum() > 0) if self.data_dependent else True:
            x = self.heads["pos"](x)
        else:
            x = self.heads["neg"](x)
        x = self.shared(self.act(self.shared(self.body(x))))
        return self.out(x)


def _calibrated(model: nn.Module, x: torch.Tensor, data: torch.Tensor) -> QuantizationSimModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # construction notes (unused branch, shared modules)
        sim = QuantizationSimModel(model, x, quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(data), None)
    return sim


def _export(sim, path, x, **kwargs):
    """sim.export, with every warning it issues."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        files = sim.export(path, "m", x, **kwargs)
    return files, caught


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 8, 8)  # mean > 0: branch a
    model = BranchyCNN().eval()
    return _calibrated(model, x, torch.rand(32, 1, 8, 8)), x, model


@pytest.fixture(scope="module")
def cnn_files(cnn, tmp_path_factory):
    sim, x, _ = cnn
    return _export(sim, tmp_path_factory.mktemp("branchy"), x)


def test_fallback_writes_valid_files_and_one_warning(cnn, cnn_files):
    """A data-dependent `if`: .onnx, .encodings and _qdq.onnx are written by the TorchScript
    exporter, pass the full checker, and exactly one warning names torch.export's reason,
    the user's line, and points at the caller."""
    files, caught = cnn_files
    for path in (files.onnx, files.encodings, files.qdq_onnx):
        assert path.is_file()
    for path in (files.onnx, files.qdq_onnx):
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        assert {p.key: p.value for p in model.metadata_props}[EXPORTER_KEY] == "torchscript"
    assert len(caught) == 1, [str(w.message) for w in caught]
    warning = caught[0]
    assert issubclass(warning.category, ExporterFallbackWarning)
    message = str(warning.message)
    assert "data-dependent" in message and "x.mean() > 0" in message, message
    assert f"{__file__}:" in message and "only the branches" in message, message
    assert warning.filename == __file__  # the sim.export(...) line, not quantsim's code


def test_fallback_names_like_the_dynamo_export(cnn, cnn_files, tmp_path):
    """The model with the branch fixed is exported by torch.export without any warning; both
    exports key exactly the same encodings (names and values), every quantizer has its tensor,
    and every parameter of the branch taken, equal-valued ones included, is an initializer
    under its PyTorch name."""
    sim, x, _ = cnn
    files, _ = cnn_files
    sim.model.data_dependent = False
    try:
        straight, caught = _export(sim, tmp_path, x)
    finally:
        sim.model.data_dependent = True
    assert caught == []
    meta = {p.key: p.value for p in onnx.load(str(straight.onnx)).metadata_props}
    assert meta[EXPORTER_KEY] == "dynamo"
    assert json.loads(files.encodings.read_text()) == json.loads(straight.encodings.read_text())
    assert files.missing_quantizers == straight.missing_quantizers == []
    graph = onnx.load(str(files.onnx)).graph
    taken = {n for n, _ in sim.model.named_parameters() if not n.startswith("b.")}
    assert taken <= {i.name for i in graph.initializer}
    assert [i.name for i in graph.input] == ["x"] and [o.name for o in graph.output] == ["output"]
    assert {"/conv1/Conv", "/bn1/BatchNormalization", "/a/0/Conv", "/a/1/BatchNormalization",
            "/fc/Gemm"} <= {n.name for n in graph.node}


def test_fallback_round_trip(cnn, cnn_files):
    """The fallback's ONNX-keyed encodings load into a fresh sim (names resolved through the
    exported graph) and reproduce the sim's outputs exactly."""
    sim, x, model = cnn
    files, _ = cnn_files
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = QuantizationSimModel(model, x, quant_scheme="tf")
    loaded = load_encodings(fresh, files.encodings)
    assert set(loaded) == {n for n, q in sim.named_quantizers() if q.enabled}
    with torch.no_grad():
        assert torch.equal(fresh.model(x), sim.model(x))


def test_fallback_qdq_matches_sim(cnn, cnn_files):
    """ORT runs the fallback's QDQ model within 1 LSB of the sim (the tolerance of the dynamo
    exports in test_export.py), per quantizer too; the default session loads it."""
    sim, x, _ = cnn
    files, _ = cnn_files
    report = verify(sim, files.qdq_onnx, x)
    print(f"\nBranchyCNN (TorchScript export): {report}")
    assert_qdq_agrees(report)


def test_fallback_records_the_branch_dummy_input_takes(cnn, tmp_path):
    """A dummy_input that takes the other branch exports block b: the enabled quantizers of a
    have no tensor and are reported missing (their encodings stay in _torch.encodings)."""
    sim, _, _ = cnn
    files, caught = _export(sim, tmp_path, -torch.rand(2, 1, 8, 8))
    assert len(caught) == 1
    modules = {p.value for n in onnx.load(str(files.onnx)).graph.node for p in n.metadata_props
               if p.key == MODULE_KEY}
    assert {"b.0", "b.1"} <= modules and not any(m.startswith("a.") for m in modules)
    enabled_a = {n for n, q in sim.named_quantizers() if n.startswith("a.") and q.enabled}
    assert enabled_a and set(files.missing_quantizers) == enabled_a


@pytest.mark.parametrize("args", [{"dynamic_axes": {"x": {0: "batch"}}},
                                  {"dynamic_shapes": {"x": {0: torch.export.Dim("batch")}}}],
                         ids=["dynamic_axes", "dynamic_shapes"])
def test_fallback_dynamic_batch(cnn, tmp_path, args):
    """dynamic_axes, and torch.export's dynamic_shapes (translated), give the fallback's
    graphs a symbolic batch; the QDQ model runs another batch size within 1 LSB."""
    sim, x, _ = cnn
    files, _ = _export(sim, tmp_path, x, onnx_export_args=args)
    for path in (files.onnx, files.qdq_onnx):
        dim = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
        assert dim.dim_param == "batch"
    report = verify(sim, files.qdq_onnx, torch.rand(7, 1, 8, 8))
    assert report.max_diff_lsb <= 1.001, str(report)


def test_fallback_resolves_lossy_scopes(tmp_path):
    """Nested containers, a ModuleDict entry, a module under two paths and one called twice:
    the fallback maps every node to the module the dynamo export does, its encodings equal
    the dynamo export's of the same model with the branch fixed (2.0.0 with data movement),
    both equal-valued LayerNorms of each block keep their parameters, and the QDQ model
    agrees with the sim within 1 LSB."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    model = BranchyNested().eval()
    with torch.no_grad():  # make the sum positive: the "pos" head
        model.enc[1][0].bias.add_(2.0)
    sim = _calibrated(model, x, torch.randn(8, 5, 16))
    files, caught = _export(sim, tmp_path / "fallback", x, encoding_version="2.0.0")
    assert [w.category for w in caught] == [ExporterFallbackWarning]
    sim.model.data_dependent = False
    straight, caught = _export(sim, tmp_path / "dynamo", x, encoding_version="2.0.0")
    assert caught == []
    assert json.loads(files.encodings.read_text()) == json.loads(straight.encodings.read_text())
    fallback_graph, dynamo_graph = (onnx.load(str(f.onnx)).graph for f in (files, straight))
    names = {n for n, _ in sim.model.named_parameters() if not n.startswith("heads.neg")}
    assert names <= {i.name for i in fallback_graph.initializer}
    modules = [{p.value for n in g.node for p in n.metadata_props if p.key == MODULE_KEY}
               for g in (fallback_graph, dynamo_graph)]
    assert modules[0] == modules[1]
    report = verify(sim, files.qdq_onnx, x)
    assert report.max_diff_lsb <= 1.001 and report.isolated_max_diff_lsb <= 1.001, str(report)
    # each call of the modules called twice is compared with its own tensor
    repeated = {m for m, count in sim.graph.call_counts.items() if count > 1}
    assert repeated == {"act", "shared"} and not report.uncompared, str(report)
    assert {(q.name, q.call) for q in report.quantizers if q.call is not None} == {
        (f"{m}.output_quantizers.0", k) for m in repeated for k in (0, 1)}
    assert len(report.quantizers) >= 29
    assert all(q.max_diff_lsb <= 1.001 for q in report.quantizers), str(report)


class _Unexportable(nn.Module):
    """A data-dependent branch (torch.export) around cummax (no TorchScript ONNX symbolic)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = self.conv(x)
        if y.mean() > 0:
            y = -y
        return torch.cummax(y, dim=1)[0]


def test_both_exporters_fail(tmp_path):
    """Both exporters failing is one ExportersFailedError (an ExportError) whose message gives
    both reasons and which keeps both exceptions; nothing is written, no warning issued."""
    torch.manual_seed(0)
    x = torch.rand(2, 1, 6, 6)
    sim = _calibrated(_Unexportable().eval(), x, x)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ExportersFailedError) as info:
        warnings.simplefilter("always")
        sim.export(tmp_path / "out", "m", x)
    err = info.value
    assert isinstance(err, ExportError)
    message = str(err)
    assert "torch.export (dynamo):" in message and "data-dependent" in message, message
    assert "TorchScript exporter:" in message and "aten::cummax" in message, message
    assert err.dynamo_error is not None and err.torchscript_error is not None
    assert err.__cause__ is err.torchscript_error
    assert caught == [] and not (tmp_path / "out").exists()


def test_input_names_match_torch_export():
    """The fallback names graph inputs as torch.export does, nested and keyword ones included."""

    class Inputs(nn.Module):
        def forward(self, x, pair, mask=None, scale=None):  # noqa: D102
            return x * pair[0] + pair[1] * mask

    t = torch.randn(2, 3)
    args, kwargs = (t, (t, t)), {"mask": t}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(Inputs(), args, kwargs=kwargs, dynamo=True, verbose=False)
    expected = [i.name for i in program.model_proto.graph.input]
    assert dynamo_input_names(Inputs(), args, kwargs) == expected == ["x", "pair_0", "pair_1", "mask"]


def test_doctests():
    """The examples in the fallback's docstrings run."""
    runner = doctest.DocTestRunner()
    for obj in (torchscript_onnx, error_essence):
        for test in doctest.DocTestFinder().find(obj):
            runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0 and result.attempted >= 4
