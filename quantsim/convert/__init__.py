"""Fixed-point conversion: a calibrated sim -> an integer-only model (``quantsim.convert``).

The fake-quant sim estimates accuracy; a deployed integer target computes with int8/int16
codes, int32 accumulators and bias, and requantizes by a fixed-point multiplier and shift.
:func:`convert` builds that computation as a torch module, :class:`IntegerModel`, whose
accuracy is the deployed accuracy; :func:`check_deployable` says beforehand what would not
run in integers and why; :func:`quantsim.export.integer_onnx.export_integer_onnx` writes it
as an ONNX model for ONNX Runtime. See ``docs/convert.md``.

Example:
    >>> integer_model = quantsim.convert(sim)            # float in, float out
    >>> print(integer_model.report)                      # per layer: op, multiplier, shift
    >>> integer_model.compare(sim, x)                    # max diff vs the sim in LSBs
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from quantsim.checks import require_flag
from quantsim.convert.converter import lower
from quantsim.convert.fixed_point import ROUNDING
from quantsim.convert.report import ConversionReport, LayerReport
from quantsim.encoding import Encoding
from quantsim.errors import ConversionError, UnsupportedModelError
from quantsim.graph import eval_mode

__all__ = ["IntegerModel", "ConversionReport", "LayerReport", "convert", "check_deployable",
           "ROUNDING"]


class IntegerModel(nn.Module):
    """An integer-only model converted from a sim (build it with :func:`convert`).

    Takes the float inputs the user's model takes, on the CPU (torch's integer convolutions
    are CPU ops; a sim on a GPU converts to a CPU model). Returns float outputs dequantized with the
    output encodings, or with ``return_integers=True`` the output codes (integer tensors)
    whose encodings are :attr:`output_encodings`. Between the input's quantize and the
    outputs' dequantize every tensor is an integer tensor, except in the float islands the
    :attr:`report` lists.

    Attributes:
        graph_module: the integer ops as a ``torch.fx.GraphModule`` (its submodules are
            :mod:`quantsim.convert.ops` modules).
        report: the :class:`ConversionReport`.
        output_encodings: one per model output (None for an output the sim leaves float).
        rounding: the requantization tie rule.
        return_integers: whether :meth:`forward` returns codes.
    """

    def __init__(self, graph_module: fx.GraphModule, report: ConversionReport,
                 output_encodings: List[Optional[Encoding]], rounding: str,
                 return_integers: bool) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.report = report
        self.output_encodings = output_encodings
        self.rounding = rounding
        self.return_integers = return_integers

    def forward(self, *inputs: Any) -> Any:
        """Run the integer model on float inputs."""
        return self.graph_module(*inputs)

    def export_onnx(self, path: str, dummy_input: Any) -> Any:
        """Write this model as integer ONNX for ONNX Runtime (bit-exact with this model); see
        :func:`quantsim.export.integer_onnx.export_integer_onnx`. Returns the ONNX model."""
        from quantsim.export.integer_onnx import export_integer_onnx
        return export_integer_onnx(self, path, dummy_input)

    @torch.no_grad()
    def compare(self, sim: Any, *inputs: Any) -> ConversionReport:
        """Run this model and ``sim.model`` on ``inputs`` and fill the report's agreement
        columns, in the sim's output LSBs at each quantized output:

        * ``max_diff_lsb`` / ``within_1_lsb``: each step on its own, fed the sim's codes from
          the steps before it (the layer's own integer arithmetic against the sim's);
        * ``chained_max_diff_lsb`` / ``chained_within_1_lsb``: the integer model run end to
          end (the differences of earlier layers carried along);
        * ``output_max_diff_lsb`` / ``output_within_1_lsb``: the model outputs.

        Returns :attr:`report`."""
        captured: Dict[str, tuple] = {}
        handles = []
        modules = dict(sim.model.named_modules())
        tagged = [n for n in self.graph_module.graph.nodes if "quantsim" in n.meta]
        for name in {n.meta["quantsim"]["name"] for n in tagged} & set(modules):
            def hook(module, args, out, name=name):  # the first call's inputs and output
                captured.setdefault(name, (args, out))
            handles.append(modules[name].register_forward_hook(hook))
        device = next((p.device for p in sim.model.parameters()), torch.device("cpu"))
        try:
            with eval_mode(sim.model):
                sim_out = sim.model(*pytree.tree_map(
                    lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, inputs))
        finally:
            for h in handles:
                h.remove()
        sim_codes = {}
        for node in tagged:
            tag = node.meta["quantsim"]
            args, out = captured.get(tag["name"], ((), None))
            # the sim quantizes a module's inputs inside its forward: the hook sees them raw
            where = tag["where"]
            ref = out if where == "output" else _nth_tensor(args, int(where.split()[-1]))
            if isinstance(ref, torch.Tensor):
                sim_codes[node] = tag["encoding"].quantize(ref.float().cpu())
        chained = _Recorder(self.graph_module, sim_codes, substitute=False).run(*inputs)
        isolated = _Recorder(self.graph_module, sim_codes, substitute=True).run(*inputs)
        for node, codes in sim_codes.items():
            layer = node.meta["quantsim"]["layer"]
            layer.max_diff_lsb, layer.within_1_lsb = _agreement(isolated[node], codes)
            layer.chained_max_diff_lsb, layer.chained_within_1_lsb = _agreement(chained[node],
                                                                                codes)
        ours = pytree.tree_leaves(chained["__output__"])
        theirs = [t.cpu() for t in pytree.tree_leaves(sim_out) if isinstance(t, torch.Tensor)]
        self.report.output_max_diff_lsb, self.report.output_within_1_lsb = [], []
        for mine, ref, enc in zip(ours, theirs, self.output_encodings):
            if enc is None:
                self.report.output_max_diff_lsb.append(None)
                self.report.output_within_1_lsb.append(None)
                continue
            diff = (mine.to(torch.int64) - enc.quantize(ref.float()).to(torch.int64)) \
                if self.return_integers else (mine.float() - ref.float()) / enc.scale
            diff = diff.abs()
            self.report.output_max_diff_lsb.append(float(diff.max()))
            self.report.output_within_1_lsb.append(float((diff <= 1 + 1e-3).float().mean()))
        return self.report


def _nth_tensor(args: Any, k: int) -> Optional[torch.Tensor]:
    """The ``k``-th floating-point tensor of a call's arguments (as the sim numbers them)."""
    tensors = [t for t in pytree.tree_leaves(args)
               if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return tensors[k] if k < len(tensors) else None


def _agreement(ours: torch.Tensor, sim_codes: torch.Tensor) -> Tuple[float, float]:
    """``(max |difference|, fraction within one code)`` of two code tensors."""
    diff = (ours.to(torch.int64) - sim_codes.to(torch.int64)).abs()
    return float(diff.max()), float((diff <= 1).float().mean())


class _Recorder(fx.Interpreter):
    """Runs the integer graph and keeps the values of the nodes of ``sim_codes``; with
    ``substitute`` each such node passes the sim's codes on instead of its own."""

    def __init__(self, module: fx.GraphModule, sim_codes: Dict[fx.Node, torch.Tensor],
                 substitute: bool) -> None:
        super().__init__(module)
        self.sim_codes, self.substitute = sim_codes, substitute
        self.values: Dict[Any, Any] = {}

    def run_node(self, n: fx.Node) -> Any:  # noqa: D102
        out = super().run_node(n)
        if n in self.sim_codes:
            self.values[n] = out
            if self.substitute:
                out = self.sim_codes[n].to(out.dtype)
        if n.op == "output":
            self.values["__output__"] = out
        return out

    def run(self, *args: Any) -> Dict[Any, Any]:  # noqa: D102
        super().run(*args)
        return self.values


def _require_sim(sim: Any, where: str) -> None:
    from quantsim.sim import QuantizationSimModel
    if not isinstance(sim, QuantizationSimModel):
        raise UnsupportedModelError(
            f"{where}: sim must be a quantsim.QuantizationSimModel, got {type(sim).__name__}")


def convert(sim: Any, return_integers: bool = False, rounding: str = "half_to_even",
            allow_float: bool = True) -> IntegerModel:
    """Convert a calibrated sim to an :class:`IntegerModel` (fixed point).

    Args:
        sim: a :class:`quantsim.QuantizationSimModel` with encodings (calibrated, trained with
            QAT, or loaded); not changed.
        return_integers: return the output codes (see :class:`IntegerModel`).
        rounding: the requantization tie rule, ``'half_to_even'`` (as the fake-quant sim
            rounds) or ``'half_away_from_zero'`` (TFLite / gemmlowp).
        allow_float: run ops without an integer form in float (listed in the report);
            False raises instead.

    Raises:
        ConversionError: an enabled quantizer without an encoding, quantizers still in a
            CALIBRATION / QAT phase, a model torch.fx cannot trace, or
            (``allow_float=False``) ops that would run in float, each named.
        QuantizationSettingError: an unknown ``rounding``.
    """
    _require_sim(sim, "convert")
    require_flag(return_integers, "return_integers", "convert", ConversionError)
    require_flag(allow_float, "allow_float", "convert", ConversionError)
    graph_module, report, encodings = lower(sim, rounding, return_integers)
    if not allow_float and not report.deployable:
        problems = report.float_ops + report.issues
        raise ConversionError(
            "convert(allow_float=False): these ops have no integer form here: " + "; ".join(
                f"{name}: {why}" for name, why in problems))
    return IntegerModel(graph_module, report, encodings, rounding, return_integers).eval()


def check_deployable(sim: Any) -> ConversionReport:
    """What :func:`convert` would make of ``sim``: every op that would run in float and every
    place where the sim's quantization does not map onto integer arithmetic, each named with
    the reason (``report.float_ops``, ``report.issues``, ``report.deployable``). Nothing is
    raised for such ops, and the sim is not changed.

    Raises:
        ConversionError: an enabled quantizer has no encoding, quantizers are still in a
            CALIBRATION / QAT phase, or torch.fx cannot trace the model (nothing can be
            checked then).
    """
    _require_sim(sim, "check_deployable")
    return lower(sim)[1]
