"""Check an exported QDQ model against the sim: same input, ONNX Runtime vs simulated forward.

:func:`verify` runs ``<prefix>_qdq.onnx`` on ONNX Runtime's CPU provider three ways:

* **chained, optimizations disabled**: the model as a runtime would run it, with every
  quantizer's dequantized tensor added as an extra output. ORT's QuantizeLinear rounds half to
  even like the sim, so the only differences come from float arithmetic between quantizers
  (summation order in MatMul / Conv, ``addmm`` vs MatMul + Add): a value within a rounding
  error of a rounding boundary lands one step away. Downstream layers carry such a step on,
  and LayerNorm can amplify it (a 1-step change of one input shifts the whole row);
* **isolated, optimizations disabled**: every quantized tensor's consumers read the *sim's*
  value instead of ORT's (the dequantized tensors become extra graph inputs), so each
  quantizer is checked on exactly the sim's inputs. This is the per-quantizer agreement: an
  exact export differs by at most 1 step, on few elements;
* **chained, default session options** (what a user gets): ORT fuses QDQ groups into integer
  kernels (QLinearConv, QGemm, QLinearMatMul, QLinearAdd, QLinearSoftmax, ...) whose
  requantization rounds once instead of twice, and at BASIC level fuses MatMul + Add into Gemm,
  so differences of a few steps are expected (reported, not a defect of the export).

Differences are reported in steps (LSBs) of each model output's own output quantizer (a model
returning a dict or nested tuples has several, compared leaf by leaf in the exporter's order),
and per quantizer in steps of its own scale. A quantizer of a module called more than once is
compared in every call: the sim's value of its ``k``-th call against the QDQ model's tensor of
the ``k``-th call (both in call order); where the two counts differ it is listed as not
compared.

Example:
    >>> report = verify(sim, "out/model_qdq.onnx", x)      # doctest: +SKIP
    >>> print(report)                                      # doctest: +SKIP
    QDQ model vs sim (ORT CPU, output scale 0.1406): ...
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import onnx
import torch
from torch.utils import _pytree as pytree

from quantsim.errors import ExportError
from quantsim.export.onnx_export import stored_quantizer_map
from quantsim.export.qdq import QDQ_MAP_KEY
from quantsim.graph import eval_mode, run_forward, split_dummy_input
from quantsim.op_types import params_of
from quantsim.quantizer import QuantizerRole


@dataclass
class QuantizerAgreement:
    """How one quantizer's dequantized tensor compares (ORT, optimizations disabled, vs sim).

    ``call`` is which call of its module (0-based) for a module called more than once, else
    None.
    """

    name: str
    tensor: str
    max_diff_lsb: float
    differing: int
    total: int
    call: Optional[int] = None

    def __str__(self) -> str:
        call = f"call {self.call}: " if self.call is not None else ""
        return (f"{self.name} ({call}{self.tensor}): max {self.max_diff_lsb:.3g} LSB, "
                f"{self.differing}/{self.total} elements differ")


@dataclass
class VerifyReport:
    """Result of :func:`verify` (module docstring for the three runs).

    Attributes:
        output_scale: scale of the first output's quantizer (None: not quantized, or per
            channel).
        max_diff: max |ORT - sim| over the outputs, chained, optimizations disabled.
        max_diff_lsb: the largest difference of an output in steps of its own scale (None
            when some output has no scale: then only ``max_diff`` applies).
        differing: output elements more than half a step apart (chained, disabled).
        isolated_max_diff: max |ORT - sim| of the outputs when every quantized tensor comes
            from the sim (isolated run).
        isolated_max_diff_lsb: the same in output steps.
        max_diff_default: max |ORT - sim| with default session options (None if it failed).
        max_diff_lsb_default: the same in output steps.
        differing_default: output elements more than half a step apart (default options).
        default_error: why the default session could not run, if it could not.
        total: number of output elements.
        quantizers: per-quantizer agreement in the isolated run (one per call of a module
            called more than once), worst first.
        first_divergence: the first quantizer (graph order) that differs in the chained run.
        output_scales: the scale of each output (graph order; None: not quantized).
        uncompared: enabled quantizers of the QDQ model that could not be compared, each with
            the reason (the sim ran it another number of times than the graph has tensors for
            it: a call the exporter removed, or an input taking other branches).
    """

    output_scale: Optional[float]
    max_diff: float
    max_diff_lsb: Optional[float]
    differing: int = 0
    isolated_max_diff: Optional[float] = None
    isolated_max_diff_lsb: Optional[float] = None
    max_diff_default: Optional[float] = None
    max_diff_lsb_default: Optional[float] = None
    differing_default: int = 0
    default_error: Optional[str] = None
    total: int = 0
    quantizers: List[QuantizerAgreement] = field(default_factory=list)
    first_divergence: Optional[QuantizerAgreement] = None
    output_scales: List[Optional[float]] = field(default_factory=list)
    uncompared: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the chained output (optimizations disabled) is within 1 step (exact
        without an output scale)."""
        if self.max_diff_lsb is not None:
            return self.max_diff_lsb <= 1.001  # float32 fuzz of a 1-step difference
        return self.max_diff <= 1e-5

    def __str__(self) -> str:
        def fmt(diff, lsb):
            if diff is None:
                return "not run"
            return f"{lsb:.3g} LSB" if lsb is not None else f"{diff:.3g} (absolute)"
        scale = f", output scale {self.output_scale:.6g}" if self.output_scale is not None else ""
        if len(self.output_scales) > 1:
            shown = ", ".join("-" if v is None else f"{v:.6g}" for v in self.output_scales)
            scale = f", output scales {shown}; each output in its own steps"
        lines = [f"QDQ model vs sim (ORT CPU{scale}), max |diff| of the outputs:",
                 f"  optimizations disabled: {fmt(self.max_diff, self.max_diff_lsb)} "
                 f"({self.differing}/{self.total} elements differ); isolated (each quantizer "
                 f"fed the sim's inputs): {fmt(self.isolated_max_diff, self.isolated_max_diff_lsb)}",
                 f"  default options:        {fmt(self.max_diff_default, self.max_diff_lsb_default)} "
                 f"({self.differing_default}/{self.total} elements differ)"]
        if self.default_error:
            lines.append(f"  default options failed: {self.default_error}")
        bad = [q for q in self.quantizers if q.differing]
        what = "quantizers" if all(q.call is None for q in self.quantizers) else "quantizer calls"
        lines.append(f"  {what} (isolated): {len(self.quantizers) - len(bad)}/"
                     f"{len(self.quantizers)} agree exactly")
        lines.extend(f"    {q}" for q in bad[:10])
        if self.first_divergence is not None:
            lines.append(f"  first divergence (chained): {self.first_divergence}")
        if self.uncompared:
            lines.append(f"  not compared: {len(self.uncompared)} quantizer(s)")
            lines.extend(f"    {reason}" for reason in self.uncompared[:10])
        return "\n".join(lines)


def verify(sim: Any, qdq_onnx_path: str, dummy_input: Any) -> VerifyReport:
    """Run the QDQ model in ONNX Runtime and the sim on ``dummy_input``; compare (module docstring).

    Args:
        sim: the sim that was exported.
        qdq_onnx_path: its ``<prefix>_qdq.onnx``.
        dummy_input: input as the sim takes it (shapes the ONNX model accepts).

    Raises:
        ExportError: onnxruntime is missing, or the model is not a quantsim QDQ export.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError("verify needs onnxruntime: pip install onnxruntime") from exc
    model = onnx.load(str(qdq_onnx_path))
    meta = {p.key: p.value for p in model.metadata_props}
    if QDQ_MAP_KEY not in meta:
        raise ExportError(f"{qdq_onnx_path} has no {QDQ_MAP_KEY!r} metadata: not a quantsim QDQ export")
    quantizers = dict(sim.named_quantizers())
    # one dequantized tensor per call (a single name in QDQ models quantsim wrote before)
    dq_of = {q: [t] if isinstance(t, str) else list(t)
             for q, t in json.loads(meta[QDQ_MAP_KEY]).items()
             if q in quantizers and quantizers[q].enabled}
    sim_outputs, captured = _run_sim(sim, dummy_input, dq_of)
    checks, uncompared = _pair_calls(dq_of, captured)
    feeds = _feeds(model, split_dummy_input(sim.model, dummy_input))
    output_names = [o.name for o in model.graph.output]
    scales = _output_scales(model, quantizers, output_names)
    disabled = ort.SessionOptions()
    disabled.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    dq_tensors = [c.tensor for c in checks]

    chained = run_onnx(ort, with_outputs(model, dq_tensors), feeds, disabled)
    max_diff, max_lsb, differing = _compare([chained[n] for n in output_names], sim_outputs, scales)
    report = VerifyReport(scales[0] if scales else None, max_diff, max_lsb, differing,
                          output_scales=scales, uncompared=uncompared)
    report.total = int(sum(np.asarray(o).size for o in sim_outputs))
    order = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    chained_q = [_agreement(c, chained[c.tensor], quantizers[c.qname]) for c in checks]
    diverging = sorted((q for q in chained_q if q.differing), key=lambda q: order.get(q.tensor, -1))
    report.first_divergence = diverging[0] if diverging else None

    # every activation quantizer's consumers read the sim's value of the same call
    forced = {c.tensor: c.value for c in checks
              if quantizers[c.qname].role is not QuantizerRole.PARAM}
    iso_feeds = dict(feeds, **{f"{t}{_SIM_SUFFIX}": v for t, v in forced.items()})
    isolated = run_onnx(ort, with_outputs(_isolated(model, forced), dq_tensors), iso_feeds,
                        disabled)
    report.isolated_max_diff, report.isolated_max_diff_lsb, _ = _compare(
        [isolated[n] for n in output_names], sim_outputs, scales)
    report.quantizers = sorted((_agreement(c, isolated[c.tensor], quantizers[c.qname]) for c in checks),
                               key=lambda q: -q.max_diff_lsb)
    try:
        default = run_onnx(ort, model, feeds, None)
        report.max_diff_default, report.max_diff_lsb_default, report.differing_default = _compare(
            [default[n] for n in output_names], sim_outputs, scales)
    except Exception as exc:  # ORT raises its own exception types
        report.default_error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return report


_SIM_SUFFIX = "__from_sim"


def run_onnx(ort, model: onnx.ModelProto, feeds: Dict[str, np.ndarray],
             options: Any) -> Dict[str, np.ndarray]:
    """Run ``model`` once on ONNX Runtime's CPU provider: graph output name -> value.

    ``ort`` is the imported ``onnxruntime`` module (imported by the caller, which reports
    its absence); ``options`` its ``SessionOptions`` or None; feeds the model does not take
    are left out.
    """
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in model.graph.output]
    wanted = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted})))


@dataclass
class _Check:
    """One dequantized tensor of the QDQ model and the sim's value for it."""

    qname: str
    call: Optional[int]  # None: the quantizer has one tensor
    tensor: str
    value: np.ndarray


def _pair_calls(dq_of: Dict[str, List[str]], captured: Dict[str, List[np.ndarray]]
                ) -> Tuple[List[_Check], List[str]]:
    """The ``k``-th captured value of each quantizer with its ``k``-th dequantized tensor (both
    in call order), and why the others cannot be paired."""
    checks: List[_Check] = []
    uncompared: List[str] = []
    for qname, tensors in dq_of.items():
        values = captured.get(qname, [])
        if len(values) != len(tensors):
            uncompared.append(f"{qname}: the sim ran it {len(values)} time(s), the QDQ model has "
                              f"{len(tensors)} tensor(s) for it ({', '.join(tensors)})")
            continue
        several = len(tensors) > 1
        checks.extend(_Check(qname, k if several else None, t, v)
                      for k, (t, v) in enumerate(zip(tensors, values)))
    return checks, uncompared


def _isolated(model: onnx.ModelProto, forced: Dict[str, np.ndarray]) -> onnx.ModelProto:
    """Consumers of each forced tensor read a new graph input ``<tensor>__from_sim`` instead."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    replace = {t: f"{t}{_SIM_SUFFIX}" for t in forced}
    for node in out.graph.node:
        for i, name in enumerate(node.input):
            if name in replace:
                node.input[i] = replace[name]
    for name in replace.values():
        out.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return out


def _run_sim(sim, dummy_input, dq_of) -> Tuple[List[np.ndarray], Dict[str, List[np.ndarray]]]:
    """The sim's outputs, and each quantizer's output in every call (call order)."""
    quantizers = dict(sim.named_quantizers())
    modules = dict(sim.model.named_modules())
    captured: Dict[str, List[np.ndarray]] = {}
    handles = []
    for qname in dq_of:
        if quantizers[qname].role is QuantizerRole.PARAM:
            continue

        def hook(_module, _args, output, qname=qname):
            # a copy: a later in-place op (ReLU(inplace=True)) must not change what was seen
            captured.setdefault(qname, []).append(output.detach().float().cpu().numpy().copy())
        handles.append(quantizers[qname].register_forward_hook(hook))
    try:
        with eval_mode(sim.model), torch.no_grad():
            out = run_forward(sim.model, dummy_input)
            for qname in dq_of:
                if quantizers[qname].role is QuantizerRole.PARAM:
                    module_name, pname = qname.split(".param_quantizers.")
                    param = params_of(modules[module_name])[pname]
                    captured[qname] = [quantizers[qname](param).detach().float().cpu().numpy()]
    finally:
        for h in handles:
            h.remove()
    leaves = [t.detach().float().cpu().numpy() for t in pytree.tree_leaves(out)
              if isinstance(t, torch.Tensor)]
    return leaves, captured


def _feeds(model: onnx.ModelProto, call: Tuple[tuple, Dict[str, Any]]) -> Dict[str, np.ndarray]:
    """The graph inputs fed from the tensors of a call's ``(args, kwargs)``, in the exporter's
    (pytree) order."""
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    leaves = [t for t in pytree.tree_leaves(call) if isinstance(t, torch.Tensor)]
    if len(leaves) != len(names):
        raise ExportError(f"dummy_input has {len(leaves)} tensor(s) but the model takes {names}")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, leaves)}


def with_outputs(model: onnx.ModelProto, tensors: List[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``tensors`` (float; each once, graph outputs kept)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    for name in dict.fromkeys(t for t in tensors if t not in present):
        out.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return out


def _output_scales(model: onnx.ModelProto, quantizers, output_names: List[str]
                   ) -> List[Optional[float]]:
    """The per-tensor scale of each output's enabled output quantizer (None: none, or per
    channel)."""
    tmap = stored_quantizer_map(model)
    scales: List[Optional[float]] = []
    for name in output_names:
        scale = None
        for qname in tmap.activations.get(name, []) if tmap is not None else []:
            q = quantizers.get(qname)
            if q is not None and q.enabled and ".output_quantizers." in qname:
                enc = q.encoding
                if enc is not None and not enc.is_float and not enc.per_channel:
                    scale = float(enc.scale)
                    break
        scales.append(scale)
    return scales


def _compare(ort_outputs, sim_outputs, scales: List[Optional[float]]
             ) -> Tuple[float, Optional[float], int]:
    """``(max |diff|, max |diff| in each output's own steps or None, elements over half a
    step)``; outputs without a scale count as differing beyond 1e-6."""
    if len(ort_outputs) != len(sim_outputs):
        raise ExportError(f"the QDQ model has {len(ort_outputs)} outputs, the sim {len(sim_outputs)}")
    worst, worst_lsb, differing = 0.0, 0.0, 0
    for a, b, scale in zip(ort_outputs, sim_outputs, scales):
        diff = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
        if not diff.size:
            continue
        worst = max(worst, float(diff.max()))
        if scale and worst_lsb is not None:
            worst_lsb = max(worst_lsb, float(diff.max()) / scale)
        else:
            worst_lsb = None
        differing += int((diff > (0.5 * scale if scale else 1e-6)).sum())
    return worst, worst_lsb, differing


def _agreement(check: _Check, ort_value, q) -> QuantizerAgreement:
    a = np.asarray(ort_value, dtype=np.float64)
    b = np.asarray(check.value, dtype=np.float64)
    if a.shape != b.shape:
        return QuantizerAgreement(check.qname, check.tensor, float("inf"), a.size, a.size, check.call)
    enc = q.encoding
    if enc.is_float:
        steps = np.abs(a - b) / np.maximum(np.abs(b), 1e-30) * 1024  # fp16: 10-bit mantissa
    else:
        s = enc.scale.numpy().astype(np.float64)
        if enc.per_block:  # (C, blocks) -> one scale per input of dimension 1
            s = np.repeat(s, enc.block_size, axis=1).reshape(s.shape[0], -1,
                                                             *[1] * (a.ndim - 2))
        elif enc.per_channel:
            shape = [1] * a.ndim
            shape[enc.axis] = -1
            s = s.reshape(shape)
        steps = np.abs(a - b) / s
    worst = float(steps.max()) if steps.size else 0.0
    return QuantizerAgreement(check.qname, check.tensor, worst, int((steps > 0.5).sum()),
                              int(steps.size), check.call)
