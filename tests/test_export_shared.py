"""Export of modules called more than once in one forward.

The sim simulates such a module with one set of quantizers: every call's tensors are quantized
with one encoding (tests/test_placement.py). The export follows: every call's tensor is keyed
in the encodings file with that encoding, the QDQ model has a Q/DQ pair on every call, verify
compares each call of the sim with the same call of the QDQ model, and the file loads back. Both
of torch's exporters: the dynamo one, and the TorchScript-based fallback for a model with a
data-dependent ``if`` (tests/test_export_fallback.py).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Dict, List, Tuple

import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from models import DuplicateReLU
from quantsim import EncodingsError
from quantsim import encodings as enc_files
from quantsim.export import ExportedFiles, ExporterFallbackWarning, load_encodings, verify
from quantsim.export.onnx_export import EXPORTER_KEY, MODULE_KEY
from quantsim.sim import QuantizationSimModel

pytestmark = pytest.mark.usefixtures("one_thread")

EXPORTERS = ("dynamo", "torchscript")


class Unrolled(nn.Module):
    """One Linear cell run three times on 3-D input (MatMul + Add per call), each call followed
    by two consecutive calls of one Tanh, the second on a residual sum: that sum arrives
    unquantized, so the Tanh's one input quantizer is on, for all six calls."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.cell = nn.Linear(d, d)
        self.act = nn.Tanh()
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        h = x
        for _ in range(3):
            h = self.act(self.act(self.cell(h)) + h)
        return self.head(h)


class DataDependent(nn.Module):
    """``model`` and, while ``data_dependent``, an ``if`` on tensor values: torch.export refuses
    it and the export falls back to the TorchScript-based exporter. The branch is never taken
    on finite inputs, so both exports describe the same computation under the same names."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.data_dependent = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = self.model(x)
        if self.data_dependent and not bool(x.abs().sum() >= 0):
            return -y
        return y


@dataclass
class Case:
    """A calibrated sim of a model with shared modules, exported by both exporters."""

    model: nn.Module                      # the float model (for fresh sims)
    sim: QuantizationSimModel
    x: torch.Tensor
    shared: Dict[str, Tuple[str, str, int]]  # module -> (output node op, input node op, calls)
    exports: Dict[str, Tuple[ExportedFiles, list]]  # exporter -> (files, warnings issued)


@pytest.fixture(scope="module", params=["duplicate_relu", "unrolled"])
def case(request, tmp_path_factory) -> Case:
    torch.manual_seed(0)
    if request.param == "duplicate_relu":
        inner, x, data = DuplicateReLU(), torch.randn(4, 3, 32, 32), torch.randn(32, 3, 32, 32)
        shared = {"model.relu": ("Relu", "Relu", 3)}
    else:
        inner, x, data = Unrolled(), torch.randn(4, 5, 8), torch.randn(32, 5, 8)
        shared = {"model.cell": ("Add", "MatMul", 3), "model.act": ("Tanh", "Tanh", 6)}
    model = DataDependent(inner.eval()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # construction notes: modules called more than once
        sim = QuantizationSimModel(model, x, quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(data), None)
    exports = {}
    for exporter in EXPORTERS:
        sim.model.data_dependent = exporter == "torchscript"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            files = sim.export(tmp_path_factory.mktemp(f"{request.param}_{exporter}"), "m", x)
        exports[exporter] = (files, caught)
    sim.model.data_dependent = True
    return Case(model, sim, x, shared, exports)


def op_nodes(graph: onnx.GraphProto, module: str, op_type: str) -> List[onnx.NodeProto]:
    """The ``op_type`` nodes of ``module`` (by their ``quantsim.module`` tag), in graph order."""
    return [n for n in graph.node if n.op_type == op_type
            and {p.key: p.value for p in n.metadata_props}.get(MODULE_KEY) == module]


def call_outputs(graph: onnx.GraphProto, module: str, op_type: str) -> List[str]:
    """The output tensor of each ``op_type`` node of ``module``, in graph order."""
    return [n.output[0] for n in op_nodes(graph, module, op_type)]


def enabled(sim: QuantizationSimModel, module: str, kind: str) -> List[Tuple[str, object]]:
    """``(name, quantizer)`` of the enabled ``kind`` (input / output) quantizers of ``module``."""
    quantizers = getattr(sim.model.get_submodule(module), f"{kind}_quantizers")
    return [(f"{module}.{kind}_quantizers.{i}", q) for i, q in enumerate(quantizers) if q.enabled]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_both_exporters_write_valid_files(case, exporter):
    """The dynamo export needs no fallback; the data-dependent model falls back, with one
    warning. Both ONNX models of each pass the full checker."""
    files, caught = case.exports[exporter]
    fallbacks = [w for w in caught if issubclass(w.category, ExporterFallbackWarning)]
    assert len(fallbacks) == (exporter == "torchscript"), [str(w.message) for w in caught]
    for path in (files.onnx, files.qdq_onnx):
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        assert {p.key: p.value for p in model.metadata_props}[EXPORTER_KEY] == exporter
    assert files.missing_quantizers == []


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_every_call_is_keyed_with_the_quantizers_encoding(case, exporter):
    """Each call of a shared module has its own output tensor in the graph, and the encodings
    file keys every one of them with the module's one output encoding (several entries with
    equal values, as in AIMET's files). The tensors an input quantizer alone quantizes (the
    residual sums into the Tanh) carry its encoding too."""
    files, _ = case.exports[exporter]
    graph = onnx.load(str(files.onnx)).graph
    doc = enc_files.load(files.encodings)
    for module, (op, _, count) in case.shared.items():
        assert case.sim.graph.call_counts[module] == count
        tensors = call_outputs(graph, module, op)
        assert len(tensors) == count
        outputs = enabled(case.sim, module, "output")
        assert outputs
        for _, q in outputs:
            for tensor in tensors:
                assert doc.activation[tensor] == q.encoding, tensor
    if "model.relu" in case.shared:  # aimet's ModelWithDuplicateReLU: the names themselves
        assert call_outputs(graph, "model.relu", "Relu") == [
            "/model/relu/Relu_output_0", "/model/relu/Relu_1_output_0", "/model/relu/Relu_2_output_0"]
    if "model.act" in case.shared:
        (_, q_in), = enabled(case.sim, "model.act", "input")
        sums = call_outputs(graph, "model", "Add")
        assert len(sums) == 3
        for tensor in sums:
            assert doc.activation[tensor] == q_in.encoding, tensor


def _scale(model: onnx.ModelProto, node: onnx.NodeProto) -> float:
    inits = {i.name: i for i in model.graph.initializer}
    return float(numpy_helper.to_array(inits[node.input[1]]))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_qdq_pair_on_every_call(case, exporter):
    """The QDQ model quantizes every call's output tensor with the module's output scale, and
    the input of every call of a module with an input quantizer with that quantizer's scale
    (a pair on the edge into the call, one per call)."""
    files, _ = case.exports[exporter]
    model = onnx.load(str(files.qdq_onnx))
    float_graph = onnx.load(str(files.onnx)).graph
    producer = {o: n for n in model.graph.node for o in n.output}
    for module, (op, input_op, count) in case.shared.items():
        for _, q in enabled(case.sim, module, "output"):
            for tensor in call_outputs(float_graph, module, op):
                pairs = [n for n in model.graph.node
                         if n.op_type == "QuantizeLinear" and n.input[0] == tensor]
                assert len(pairs) == 1, tensor
                assert _scale(model, pairs[0]) == pytest.approx(float(q.get_scale()), rel=1e-7)
        for _, q in enabled(case.sim, module, "input"):
            readers = op_nodes(model.graph, module, input_op)
            assert len(readers) == count
            edges = set()
            for node in readers:
                dq = producer[node.input[0]]
                assert dq.op_type == "DequantizeLinear"
                assert _scale(model, dq) == pytest.approx(float(q.get_scale()), rel=1e-7)
                edges.add(dq.name)
            assert len(edges) == count


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_verify_compares_every_call(case, exporter):
    """verify pairs the sim's k-th call of each quantizer with the QDQ model's k-th call tensor:
    every call of every enabled quantizer is compared, each within one step of its own scale
    (float32 arithmetic between quantizers can put a value across a rounding boundary), and
    the model output within one step of its quantizer, chained and isolated."""
    files, _ = case.exports[exporter]
    report = verify(case.sim, files.qdq_onnx, case.x)
    print(f"\n{exporter}: {report}")
    assert report.uncompared == []
    assert report.output_scale is not None
    assert report.max_diff_lsb <= 1.001 and report.isolated_max_diff_lsb <= 1.001, str(report)
    assert report.default_error is None
    assert all(q.max_diff_lsb <= 1.001 for q in report.quantizers), str(report)
    calls: Dict[str, List] = {}
    for q in report.quantizers:
        calls.setdefault(q.name, []).append(q.call)
    assert set(calls) == {n for n, q in case.sim.named_quantizers() if q.enabled}
    for module, (_, _, count) in case.shared.items():
        for qname, _ in enabled(case.sim, module, "output") + enabled(case.sim, module, "input"):
            assert sorted(calls[qname]) == list(range(count)), qname
    once = [c for name, c in calls.items() if name.rsplit(".", 2)[0] not in case.shared]
    assert all(c == [None] for c in once)


def test_both_exporters_write_the_same_encodings(case):
    """The TorchScript fallback tells calls apart by its scope suffixes (``relu_1``) and
    arrives at the same keys and values as the dynamo export."""
    (dynamo, _), (fallback, _) = case.exports["dynamo"], case.exports["torchscript"]
    assert json.loads(fallback.encodings.read_text()) == json.loads(dynamo.encodings.read_text())


def _fresh(case: Case) -> QuantizationSimModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return QuantizationSimModel(case.model, case.x, quant_scheme="tf")


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_encodings_load_into_a_fresh_sim(case, exporter):
    """The ONNX-keyed file, with one quantizer's encoding under several tensors, loads into a
    fresh sim (names resolved through the exported graph): every enabled quantizer is set and
    the outputs are identical."""
    files, _ = case.exports[exporter]
    fresh = _fresh(case)
    loaded = load_encodings(fresh, files.encodings)
    assert set(loaded) == {n for n, q in case.sim.named_quantizers() if q.enabled}
    x = torch.randn_like(case.x)
    with torch.no_grad():
        assert torch.equal(fresh.model(x), case.sim.model(x))


def test_differing_entries_of_one_quantizer_are_an_error(case, tmp_path):
    """Two calls' entries of one quantizer with different encodings cannot both be loaded:
    an EncodingsError naming both tensors and the quantizer."""
    files, _ = case.exports["dynamo"]
    module, (op, _, _) = next(iter(case.shared.items()))
    first, second = call_outputs(onnx.load(str(files.onnx)).graph, module, op)[:2]
    doc = json.loads(files.encodings.read_text())
    for entry in doc["activation_encodings"]:
        if entry["name"] == second:
            entry["scale"] = [2 * entry["scale"][0]]
    changed = tmp_path / "m.encodings"
    changed.write_text(json.dumps(doc))
    (tmp_path / "m.onnx").write_bytes(files.onnx.read_bytes())
    with pytest.raises(EncodingsError) as info:
        load_encodings(_fresh(case), changed)
    message = str(info.value)
    assert first in message and second in message and f"{module}.output_quantizers.0" in message


def test_names_of_repeated_calls_load_without_a_graph(case):
    """Without a graph, names are read by rule: quantsim's ``/model/relu/Relu_2_output_0`` and
    the TorchScript exporter's (AIMET's) ``/model/relu_2/Relu_output_0`` both name a call of
    the module, so each set of entries loads into its one output quantizer."""
    files, _ = case.exports["dynamo"]
    module, (op, _, _) = next(iter(case.shared.items()))
    tensors = call_outputs(onnx.load(str(files.onnx)).graph, module, op)
    doc = json.loads(files.encodings.read_text())
    entries = [e for e in doc["activation_encodings"] if e["name"] in tensors]
    assert [e["name"] for e in entries] == tensors
    path = "/" + module.replace(".", "/")
    torchscript_names = [f"{path}/{op}_output_0"] + [f"{path}_{k}/{op}_output_0"
                                                     for k in range(1, len(tensors))]
    qname = f"{module}.output_quantizers.0"
    expected = case.sim.model.get_submodule(module).output_quantizers[0].encoding
    for names in (tensors, torchscript_names):
        renamed = [dict(e, name=n) for e, n in zip(entries, names)]
        fresh = _fresh(case)
        loaded = load_encodings(fresh, dict(doc, activation_encodings=renamed, param_encodings=[]))
        assert loaded == [qname], names
        assert fresh.model.get_submodule(module).output_quantizers[0].encoding == expected


def test_export_to_torchscript_keys_every_call(case, tmp_path):
    """export_to_torchscript keys encodings by the traced graph's value names, which carries no
    call tags: each shared module's nodes form as many runs of consecutive nodes as the sim
    traced calls, so every call is keyed there too. The entries, names aside, are the ONNX
    file's."""
    files = case.sim.export(tmp_path, "m", case.x, export_to_torchscript=True)
    onnx_keyed = json.loads(case.exports["dynamo"][0].encodings.read_text())
    traced = json.loads(files.encodings.read_text())

    def value(entry):
        return json.dumps({k: v for k, v in entry.items() if k != "name"}, sort_keys=True)
    values = sorted(value(e) for e in traced["activation_encodings"])
    assert values == sorted(value(e) for e in onnx_keyed["activation_encodings"])
    graph = onnx.load(str(case.exports["dynamo"][0].onnx)).graph
    by_name = {e["name"]: value(e) for e in onnx_keyed["activation_encodings"]}
    for module, (op, _, count) in case.shared.items():
        shared_value = by_name[call_outputs(graph, module, op)[0]]
        assert values.count(shared_value) >= count, module
