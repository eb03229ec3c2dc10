"""Lower a calibrated sim to an integer graph (:func:`convert`, :func:`check_deployable`).

The sim's model is traced with ``torch.fx`` (its quantized modules as leaves), which gives the
op order, functional ops (``x + y``, ``torch.flatten``) included. Walking that graph, every
value is one of:

* ``_Codes``: integer codes on a per-tensor grid (an enabled quantizer's encoding);
* ``_Pending``: integer terms whose real value ``sum_i (t_i + o_i) * s_i (+ bias)`` the sim
  holds in float and quantizes later (a conv accumulator before its output quantizer, an
  ``Add`` of two encodings); it becomes codes at the next enabled quantizer by one
  :class:`~quantsim.convert.ops.Requantize`, which also folds a BatchNorm (scale and bias) and
  ReLU / ReLU6 / clamp (the clamp bounds) met on the way;
* ``_Float``: a float tensor (the model input, or the output of a float island).

Where the sim's quantization does not map onto integer arithmetic, the op runs in float
(dequantize -> float op -> quantize at the sim's next quantizer) and the report says why.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from quantsim.convert import ops
from quantsim.convert.fixed_point import (dtype_for_grid, quantize_multipliers,
                                          validate_rounding)
from quantsim.convert.report import ConversionReport, LayerReport
from quantsim.encoding import Encoding
from quantsim.errors import ConversionError
from quantsim.graph import eval_mode, split_dummy_input
from quantsim.nn import elementwise
from quantsim.nn.fused import ConvBn, ConvTransposeBn, LinearBn, fused_activation
from quantsim.wrappers import QuantizationMixin, original_module, unwrap_class

_CONV = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.ConvTranspose1d: "conv_transpose1d",
         nn.ConvTranspose2d: "conv_transpose2d", nn.Linear: "linear"}
_FUSED = (ConvBn, ConvTransposeBn, LinearBn)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_MOVE_MODULES = (nn.Flatten, nn.Unflatten, elementwise.Reshape, elementwise.Permute,
                 elementwise.Transpose, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
_MOVE_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
                   torch.unsqueeze, operator.getitem}
_MOVE_METHODS = {"flatten", "view", "reshape", "permute", "transpose", "contiguous", "squeeze",
                 "unsqueeze", "__getitem__"}
_ADD = {operator.add, operator.iadd, torch.add, "add", "__add__"}
_SUB = {operator.sub, operator.isub, torch.sub, "sub", "__sub__"}
#: elementwise activations given a lookup table between two grids of at most 16 bits
_LUT_ACTIVATIONS = (nn.GELU, nn.Sigmoid, nn.Tanh, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
                    nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Mish, nn.Softsign, nn.Tanhshrink)
LUT_MAX_BITS = 16
_CLAMP_FUNCTIONS = {torch.relu, F.relu, "relu", F.relu6, torch.clamp, torch.clip, "clamp",
                    "clip", F.hardtanh}


@dataclass
class _Codes:
    node: fx.Node
    encoding: Encoding


@dataclass
class _Term:
    node: fx.Node
    offset: int
    scale: torch.Tensor  # float64, 0-d or one per channel along the pending value's axis


@dataclass
class _Pending:
    terms: List[_Term]
    axis: Optional[int]           # channel dim of per-channel scales / bias, None: per tensor
    ndim: int
    source: str
    ops: List[str]
    bias: Optional[torch.Tensor] = None  # real, added to the first term (scale of term 0)
    lo: Optional[float] = None           # real clamp bounds still to apply (ReLU, ReLU6...)
    hi: Optional[float] = None
    warnings: List[str] = field(default_factory=list)

    @property
    def clamped(self) -> bool:
        return self.lo is not None or self.hi is not None


@dataclass
class _Float:
    node: fx.Node


_Value = Union[_Codes, _Pending, _Float]


class _Tracer(fx.Tracer):
    """Quantized modules and childless modules are leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:  # noqa: D102
        return isinstance(m, QuantizationMixin) or next(m.children(), None) is None \
            or super().is_leaf_module(m, qualname)


def _same_encoding(a: Encoding, b: Encoding) -> bool:
    return (a.qmin, a.qmax) == (b.qmin, b.qmax) and bool(torch.equal(a.scale, b.scale)) \
        and bool(torch.equal(a.offset, b.offset))


def _range(t: torch.Tensor) -> Tuple[int, int]:
    return int(t.min()), int(t.max())


class _Converter:
    """One conversion: walks the sim's fx graph and emits the integer graph."""

    def __init__(self, sim: Any, rounding: str, return_integers: bool) -> None:
        self.sim, self.rounding, self.return_integers = sim, rounding, return_integers
        self.report = ConversionReport()
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.env: Dict[fx.Node, Any] = {}
        self.output_encodings: List[Optional[Encoding]] = []
        self.modules = dict(sim.model.named_modules())
        following = [n for n, q in sim.named_quantizers()
                     if q.enabled and str(getattr(q.state, "value", q.state)) in ("observe", "qat")]
        if following:
            raise ConversionError(
                f"convert: quantizers still follow the data (a CALIBRATION or QAT phase): "
                f"{following[:8]}{' ...' if len(following) > 8 else ''}; finish the phase "
                "first: sim.model.eval(); quantsim.set_fake_quantize(sim, "
                "FakeQuantState.VALIDATION) (encodes the final weights)")
        missing = [n for n, q in sim.named_quantizers() if q.enabled and q.encoding is None]
        if missing:
            raise ConversionError(
                f"convert: enabled quantizers without an encoding: {missing}; calibrate the "
                "sim (compute_encodings), load encodings, or disable them")
        try:
            self.source = fx.GraphModule(sim.model, _Tracer().trace(sim.model))
        except Exception as exc:  # noqa: BLE001 (any tracing failure is the same user error)
            raise ConversionError(
                f"convert: torch.fx cannot trace {type(sim.model).__name__} "
                f"({type(exc).__name__}: {exc}); quantsim.prepare.prepare_model gives a "
                "traceable model (build the sim from it)") from exc
        args, kwargs = split_dummy_input(sim.model, sim.dummy_input)
        if kwargs:
            raise ConversionError("convert: a sim built with keyword dummy inputs is not "
                                  "supported; build it with positional inputs")
        with eval_mode(sim.model), torch.no_grad():
            ShapeProp(self.source).propagate(*args)

    # -- emitting -------------------------------------------------------------------------------
    def _module_node(self, base: str, module: nn.Module, *args: Any,
                     tag: Optional[dict] = None) -> fx.Node:
        name = base.replace(".", "_") or "op"
        unique, k = name, 1
        while hasattr(self.root, unique):
            unique, k = f"{name}_{k}", k + 1
        self.root.add_module(unique, module)
        node = self.graph.call_module(unique, tuple(args))
        if tag is not None:
            node.meta["quantsim"] = tag
        return node

    # -- value conversions ----------------------------------------------------------------------
    def to_codes(self, value: _Value, enc: Encoding, name: str, where: str) -> _Value:
        """The value on ``enc``'s grid (the sim's quantizer ``name``.``where``)."""
        if enc.is_float or enc.per_channel:
            kind = "fp16" if enc.is_float else "per-channel"
            self.report.issues.append((name, f"{where} has a {kind} activation encoding, which "
                                             "has no integer grid; the value stays float"))
            return _Float(self.to_float(value, name))
        tag = {"name": name, "where": where, "encoding": enc}
        dtype = dtype_for_grid(enc.qmin, enc.qmax)
        if isinstance(value, _Float):
            node = self._module_node(f"{name}.quantize", ops.Quantize(enc, dtype), value.node,
                                     tag=tag)
            label = name if where == "output" else f"{name} ({where})"
            tag["layer"] = LayerReport(label, f"quantize float -> int{enc.bitwidth}",
                                       bitwidth=enc.bitwidth)
            self.report.layers.append(tag["layer"])
            return _Codes(node, enc)
        if isinstance(value, _Codes):
            if _same_encoding(value.encoding, enc):
                return value
            value = self.pending_of(value, name, "rescale")
        return _Codes(self.requantize(value, enc, name, where, tag), enc)

    def pending_of(self, value: _Codes, source: str, op: str) -> _Pending:
        enc = value.encoding
        return _Pending([_Term(value.node, int(enc.offset), enc.scale.to(torch.float64))],
                        None, -1, source, [op])

    def requantize(self, p: _Pending, enc: Encoding, name: str, where: str, tag: dict
                   ) -> fx.Node:
        s_out = enc.scale.to(torch.float64)
        channels = [t.scale.numel() for t in p.terms if t.scale.dim()]
        if p.bias is not None and p.bias.dim():
            channels.append(p.bias.numel())
        shape = (max(channels),) if channels else ()
        factors = [(t.scale / s_out).expand(shape) for t in p.terms]
        multipliers, shift = quantize_multipliers(factors)
        bias = bias_step = None
        if p.bias is not None:
            bias = torch.round(p.bias.expand(shape) / p.terms[0].scale.expand(shape))
            if bool((bias.abs() >= 2**31).any()):
                p.warnings.append("the int32 bias overflows int32 (widen the weight scale)")
            step = bias_step = float(factors[0].abs().max())
            if step > 2:  # one accumulator step spans several output steps
                p.warnings.append(
                    f"one accumulator step is {step:.3g} output steps, so the int32 bias "
                    f"(rounded to an accumulator step) can move outputs by up to {step / 2:.3g} "
                    "steps from the sim's float bias")
        lo, hi = enc.qmin, enc.qmax
        scale32 = enc.scale
        if p.lo is not None:  # quantize(max(x, lo)) == max(quantize(x), quantize(lo))
            lo = max(lo, int(torch.round(torch.tensor(p.lo, dtype=torch.float32) / scale32))
                     - int(enc.offset))
        if p.hi is not None:
            hi = min(hi, int(torch.round(torch.tensor(p.hi, dtype=torch.float32) / scale32))
                     - int(enc.offset))
        channel_shape = [1] * p.ndim
        if shape and p.axis is not None:
            channel_shape[p.axis] = -1
        else:
            channel_shape = [-1] if shape else []
        module = ops.Requantize([t.offset for t in p.terms], multipliers, shift, bias,
                                int(enc.offset), lo, hi, dtype_for_grid(enc.qmin, enc.qmax),
                                self.rounding, channel_shape)
        node = self._module_node(f"{name}.requantize", module, *[t.node for t in p.terms],
                                 tag=tag)
        all_m = torch.stack(multipliers)
        label = name if where == "output" else f"{name} ({where})"
        tag["layer"] = LayerReport(label, " + ".join(p.ops) + f" -> requantize int{enc.bitwidth}",
                                   _range(all_m), _range(shift), enc.bitwidth,
                                   note="; ".join(p.warnings), bias_step=bias_step)
        self.report.layers.append(tag["layer"])
        for w in p.warnings:
            self.report.warnings.append((name, w))
        return node

    def to_float(self, value: _Value, name: str) -> fx.Node:
        """A float node for ``value`` (dequantized; a pending sum in float)."""
        if isinstance(value, _Float):
            return value.node
        if isinstance(value, _Codes):
            enc = value.encoding
            return self._module_node(f"{name}.dequantize",
                                     ops.Dequantize(enc.scale, enc.offset), value.node)
        out = None
        for i, t in enumerate(value.terms):
            offset = torch.tensor(float(t.offset))
            if i == 0 and value.bias is not None:  # the bias in the first term's units
                offset = offset + value.bias / t.scale
            scale, offset = self._channel(t.scale, value), self._channel(offset, value)
            term = self._module_node(f"{name}.dequantize", ops.Dequantize(scale, offset), t.node)
            out = term if out is None else self.graph.call_function(operator.add, (out, term))
        if value.clamped:
            out = self.graph.call_function(torch.clamp, (out, value.lo, value.hi))
        return out

    @staticmethod
    def _channel(v: torch.Tensor, p: _Pending) -> torch.Tensor:
        if v.dim() == 0 or p.axis is None:
            return v
        shape = [1] * p.ndim
        shape[p.axis] = -1
        return v.reshape(shape)

    def island(self, name: str, fn: Union[nn.Module, Callable], args: tuple, kwargs: dict,
               reason: str, node: fx.Node) -> _Float:
        """Run ``fn`` in float on dequantized arguments."""
        mapped = pytree.tree_map(lambda a: self.to_float(a, name)
                                 if isinstance(a, (_Codes, _Pending, _Float)) else a,
                                 (args, kwargs))
        if isinstance(fn, nn.Module):
            module = ops.FloatIsland(fn, reason)
            out = self._module_node(f"{name}.float", module, *mapped[0])
        elif node.op == "call_method":
            out = self.graph.call_method(node.target, mapped[0], mapped[1])
        else:
            out = self.graph.call_function(fn, mapped[0], mapped[1])
        self.report.float_ops.append((name, reason))
        self.report.layers.append(LayerReport(name, f"{_describe(fn)} in float", integer=False,
                                              note=reason))
        return _Float(out)

    # -- the walk -------------------------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        for node in self.source.graph.nodes:
            if node.op == "placeholder":
                self.env[node] = _Float(self.graph.placeholder(node.target))
            elif node.op == "get_attr":
                value = _fetch_attr(self.source, node.target)
                attr = node.target.replace(".", "_")
                setattr(self.root, attr, value)
                self.env[node] = _Float(self.graph.get_attr(attr)) \
                    if isinstance(value, torch.Tensor) and value.is_floating_point() \
                    else self.graph.get_attr(attr)
            elif node.op == "output":
                self.graph.output(self.outputs(node.args[0]))
            elif node.op == "call_module":
                self.env[node] = self.call_module(node)
            else:
                self.env[node] = self.call_function(node)
        return fx.GraphModule(self.root, self.graph, class_name="IntegerGraph")

    def outputs(self, tree: Any) -> Any:
        def convert(a: Any) -> Any:
            if not isinstance(a, fx.Node):
                return a
            value = self.env[a]
            if isinstance(value, _Codes):
                self.output_encodings.append(value.encoding)
                if self.return_integers:
                    return value.node
                return self.to_float(value, str(a.name))
            if isinstance(value, _Pending):
                self.report.issues.append((value.source, "a model output the sim leaves "
                                           "unquantized: returned in float"))
            if isinstance(value, (_Pending, _Float)):
                self.output_encodings.append(None)
                return self.to_float(value, str(a.name))
            return value
        return pytree.tree_map(convert, tree)

    def _args(self, node: fx.Node) -> Tuple[tuple, dict]:
        return pytree.tree_map(lambda a: self.env[a] if isinstance(a, fx.Node) else a,
                               (node.args, node.kwargs))

    def call_function(self, node: fx.Node) -> Any:
        args, kwargs = self._args(node)
        target = node.target
        name = str(node.name)
        if "tensor_meta" not in node.meta:  # shapes, sizes...: copied, on the codes' nodes
            plain = pytree.tree_map(lambda a: self._plain(a), (args, kwargs))
            if node.op == "call_method":
                return self.graph.call_method(target, plain[0], plain[1])
            return self.graph.call_function(target, plain[0], plain[1])
        ndim = len(node.meta["tensor_meta"].shape)
        key = target if node.op == "call_function" else str(target)
        fn = target
        if key in _ADD or key in _SUB:
            if len(args) == 2 and not kwargs:
                return self.add(name, args[0], args[1], key in _SUB, ndim, node, fn)
        elif key in _CLAMP_FUNCTIONS:
            bounds = _clamp_bounds(key, args, kwargs)
            if bounds is not None:
                return self.clamp(name, args[0], bounds, node, fn, args, kwargs)
        elif key in _MOVE_FUNCTIONS or key in _MOVE_METHODS:
            return self.move(name, args, kwargs, node, fn)
        elif key is torch.cat:
            return self.cat(name, list(args[0]), None, node, fn, args, kwargs)
        return self.island(name, fn, args, kwargs, f"{_describe(fn)} has no integer form",
                           node)

    def _plain(self, a: Any) -> Any:
        if isinstance(a, _Codes) or isinstance(a, _Float):
            return a.node
        if isinstance(a, _Pending):
            return a.terms[0].node
        return a

    def call_module(self, node: fx.Node) -> Any:
        name = str(node.target)
        module = self.modules[name]
        args, kwargs = self._args(node)
        if not isinstance(module, QuantizationMixin):
            if isinstance(module, _MOVE_MODULES):
                return self.move(name, args, kwargs, node, module)
            return self.island(name, _frozen(module), args, kwargs,
                               f"{type(module).__name__} is not quantized by the sim", node)
        quantizers = module.input_quantizers
        converted = []
        k = 0
        for a in args:
            if isinstance(a, (_Codes, _Pending, _Float)):
                if k < len(quantizers) and quantizers[k].enabled:
                    a = self.to_codes(a, self._encoding(quantizers[k], name), name,
                                      f"input {k}")
                k += 1
            converted.append(a)
        out = self.lower(name, module, unwrap_class(module), converted, kwargs, node)
        outs = module.output_quantizers
        if outs and outs[0].enabled and isinstance(out, (_Codes, _Pending, _Float)):
            out = self.to_codes(out, self._encoding(outs[0], name), name, "output")
        return out

    def _encoding(self, q: Any, name: str) -> Encoding:
        enc = q.encoding
        if enc is None:
            raise ConversionError(f"convert: {name}: an enabled quantizer has no encoding; "
                                  "calibrate the sim (compute_encodings) or load encodings")
        return enc

    # -- ops ------------------------------------------------------------------------------------
    def lower(self, name: str, module: nn.Module, cls: type, args: list, kwargs: dict,
              node: fx.Node) -> Any:
        float_module = _frozen(module)
        tensors = [a for a in args if isinstance(a, (_Codes, _Pending, _Float))]
        if cls in _CONV or cls in _FUSED:
            return self.conv(name, module, cls, args, kwargs, node, float_module)
        if cls in _BN and len(tensors) == 1 and not kwargs:
            return self.batch_norm(name, module, args[0], node, float_module)
        if cls in (nn.ReLU, nn.ReLU6, nn.Hardtanh) and len(args) == 1:
            lo, hi = (0.0, None) if cls is nn.ReLU else (
                float(float_module.min_val), float(float_module.max_val))
            return self.clamp(name, args[0], (lo, hi), node, float_module, args, kwargs)
        if cls in (nn.MaxPool1d, nn.MaxPool2d) and isinstance(args[0], _Codes) \
                and not float_module.return_indices:
            out = self._module_node(f"{name}.maxpool", float_module, args[0].node)
            return _Codes(out, args[0].encoding)
        if cls in (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d):
            return self.avg_pool(name, cls, float_module, args, kwargs, node)
        if cls in _MOVE_MODULES:
            return self.move(name, args, kwargs, node, float_module)
        if cls in _LUT_ACTIVATIONS and len(args) == 1 and isinstance(args[0], _Codes):
            table = self.lookup_table(name, module, float_module, args[0])
            if table is not None:
                return table
        if cls in (elementwise.Add, elementwise.Sub) and len(args) == 2:
            ndim = len(node.meta["tensor_meta"].shape)
            return self.add(name, args[0], args[1], cls is elementwise.Sub, ndim, node,
                            float_module)
        if cls is elementwise.Concat:
            outs = module.output_quantizers
            enc = self._encoding(outs[0], name) if outs and outs[0].enabled else None
            return self.cat(name, list(args), enc, node, float_module, args, kwargs,
                            dim=float_module.dim)
        reason = f"{cls.__name__} has no integer form"
        if cls in (nn.MaxPool1d, nn.MaxPool2d):
            reason = f"{cls.__name__}'s input is not on a grid (the sim leaves it unquantized)"
        return self.island(name, float_module, args, kwargs, reason, node)

    def conv(self, name: str, module: nn.Module, cls: type, args: list, kwargs: dict,
             node: fx.Node, float_module: nn.Module) -> Any:
        x = args[0] if len(args) == 1 and not kwargs else None
        layer = module.layer if cls in _FUSED else float_module
        kind = _CONV.get(type(layer))
        wq = module.param_quantizers["weight"] if "weight" in module.param_quantizers else None
        reason = None
        if kind is None:
            reason = f"{type(layer).__name__} inside {cls.__name__} has no integer form"
        elif not isinstance(x, _Codes):
            reason = ("its input is not on a grid (the sim leaves it unquantized: enable an "
                      "input quantizer or the producer's output quantizer)")
        elif wq is None or not wq.enabled or wq.encoding is None or wq.encoding.is_float:
            reason = "its weight is not quantized to integers"
        elif getattr(layer, "padding_mode", "zeros") != "zeros":
            reason = f"padding_mode={layer.padding_mode!r} (only 'zeros' has an integer form)"
        elif kind.startswith("conv_transpose") and layer.groups != 1:
            reason = "grouped transposed convolution"
        elif wq.encoding.per_block and (not wq.encoding.is_lpbq or kind.startswith("conv_t")):
            # one accumulator needs one weight scale per output channel: plain per-block
            # scales differ within a channel's dot product (LPBQ's do not, see below)
            reason = ("its weight has per-block scales (an integer accumulator needs one scale "
                      "per output channel; LPBQ weights of Conv / Linear convert)")
        if reason is not None:
            return self.island(name, float_module, args, kwargs, reason, node)
        with torch.no_grad():
            params = module.folded_parameters() if cls in _FUSED else {
                "weight": layer.weight, "bias": layer.bias}
            # the integer model lives on the CPU (torch's integer convolutions are CPU ops)
            weight, bias = params["weight"].detach().cpu(), params["bias"]
            bias = None if bias is None else bias.detach().cpu()
            bq = module.param_quantizers["bias"] if "bias" in module.param_quantizers else None
            if bias is not None and bq is not None and bq.enabled and bq.encoding is not None:
                bias = bq.encoding.fake_quantize(bias)
        w_enc = wq.encoding
        codes = w_enc.quantize(weight)
        axis = 1 if kind.startswith("conv_transpose") else 0
        if w_enc.is_lpbq:
            # LPBQ: block scale = integer multiplier x channel scale, so code x multiplier is an
            # exact integer weight on the channel's grid (aimet's reason for the format)
            multiplier = w_enc.per_block_int_scale.repeat_interleave(w_enc.block_size, dim=1)
            codes = codes * multiplier.reshape(multiplier.shape + (1,) * (weight.dim() - 2))
            w_enc = Encoding(scale=w_enc.channel_scale, offset=torch.zeros_like(
                w_enc.channel_scale), bitwidth=w_enc.decompressed_bw, symmetric=True, axis=0)
        offset = w_enc.offset
        if bool((offset != 0).any()):  # asymmetric weights: codes measured from real 0
            shape = [1] * weight.dim()
            shape[w_enc.axis if w_enc.per_channel else 0] = -1
            codes = codes + (offset.reshape(shape) if offset.dim() else offset)
        w_dtype = dtype_for_grid(int(codes.min()), int(codes.max()))
        options = {}
        if kind != "linear":
            options = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                           groups=layer.groups)
            if kind.startswith("conv_transpose"):
                options = dict(stride=layer.stride, padding=layer.padding,
                               output_padding=layer.output_padding, groups=layer.groups,
                               dilation=layer.dilation)
        if w_enc.per_channel and w_enc.axis != axis:
            return self.island(name, float_module, args, kwargs,
                               "its weight is per-channel along an input axis", node)
        in_enc = x.encoding
        int_op = ops.IntConv(kind, codes.to(w_dtype), int(in_enc.offset),
                             (in_enc.qmin, in_enc.qmax), **options)
        acc = self._module_node(f"{name}.{kind}", int_op, x.node)
        w_scale = w_enc.scale.to(torch.float64)
        scale = in_enc.scale.to(torch.float64) * w_scale
        ndim = len(node.meta["tensor_meta"].shape)
        channel_axis = ndim - 1 if kind == "linear" else 1
        pending = _Pending([_Term(acc, 0, scale)], channel_axis, ndim, name,
                           [f"{_OP_NAMES[kind]}"],
                           bias=None if bias is None else bias.detach().to(torch.float64))
        self._check_accumulator(name, codes, in_enc, pending, axis)
        if cls in _FUSED:
            act = fused_activation(module)
            if act is not None:
                bounds = _module_bounds(act)
                if bounds is None:
                    return self.island(name, float_module, args, kwargs,
                                       f"fused activation {type(act).__name__} has no "
                                       "integer form", node)
                pending.lo, pending.hi = bounds
                pending.ops.append(type(act).__name__)
            pending.ops.insert(1, "folded BatchNorm")
        return pending

    def _check_accumulator(self, name: str, codes: torch.Tensor, in_enc: Encoding,
                           pending: _Pending, axis: int) -> None:
        """Warn where the worst-case accumulator exceeds int32 (it is exact here in int64)."""
        reduce = [d for d in range(codes.dim()) if d != axis]
        w_sum = codes.abs().to(torch.float64).sum(dim=reduce) if reduce else codes.abs()
        x_max = max(abs(in_enc.qmin + int(in_enc.offset)), abs(in_enc.qmax + int(in_enc.offset)))
        worst = float((w_sum * x_max).max())
        if worst >= 2**31:
            pending.warnings.append(
                f"worst-case accumulator {worst:.3g} exceeds int32 (exact here in int64; an "
                "int32 target could overflow)")

    def batch_norm(self, name: str, module: nn.Module, x: Any, node: fx.Node,
                   float_module: nn.Module) -> Any:
        if isinstance(x, _Codes):
            x = self.pending_of(x, name, "rescale")
            x.ndim = len(node.meta["tensor_meta"].shape)
        enabled_params = [n for n, q in module.param_quantizers.items() if q.enabled]
        if not isinstance(x, _Pending) or x.clamped or len(x.terms) != 1 or enabled_params \
                or (x.axis not in (None, 1)):
            return self.island(name, float_module, [x], {},
                               "BatchNorm not directly after a conv / linear / quantized input "
                               "(cannot fold into the requantization)", node)
        bn = float_module
        with torch.no_grad():
            var = bn.running_var.to(torch.float64)
            gain = torch.rsqrt(var + bn.eps)
            if bn.weight is not None:
                gain = gain * bn.weight.detach().to(torch.float64)
            shift = -bn.running_mean.to(torch.float64) * gain
            if bn.bias is not None:
                shift = shift + bn.bias.detach().to(torch.float64)
        if bool((gain == 0).any()):
            return self.island(name, float_module, [x], {},
                               "a channel's BatchNorm gain is 0 (its int32 bias would have no "
                               "scale)", node)
        term = x.terms[0]
        bias = x.bias if x.bias is not None else torch.zeros((), dtype=torch.float64)
        return replace(x, terms=[replace(term, scale=term.scale * gain)], axis=1,
                       bias=bias * gain + shift, ops=x.ops + ["BatchNorm"],
                       ndim=len(node.meta["tensor_meta"].shape))

    def clamp(self, name: str, x: Any, bounds: Tuple[Optional[float], Optional[float]],
              node: fx.Node, fn: Any, args: Sequence, kwargs: dict) -> Any:
        lo, hi = bounds
        if isinstance(x, _Pending):
            new_lo = lo if x.lo is None else (x.lo if lo is None else max(lo, x.lo))
            new_hi = hi if x.hi is None else (x.hi if hi is None else min(hi, x.hi))
            return replace(x, lo=new_lo, hi=new_hi, ops=x.ops + [_describe(fn)])
        if isinstance(x, _Codes):
            enc = x.encoding
            code_lo = enc.qmin if lo is None else max(enc.qmin, int(torch.round(
                torch.tensor(lo, dtype=torch.float32) / enc.scale)) - int(enc.offset))
            code_hi = enc.qmax if hi is None else min(enc.qmax, int(torch.round(
                torch.tensor(hi, dtype=torch.float32) / enc.scale)) - int(enc.offset))
            out = self._module_node(f"{name}.clamp", ops.ClampCodes(code_lo, code_hi), x.node)
            return _Codes(out, enc)
        return self.island(name, fn, args, kwargs, "input is float", node)

    def avg_pool(self, name: str, cls: type, pool: nn.Module, args: list, kwargs: dict,
                 node: fx.Node) -> Any:
        x = args[0]
        in_shape = None
        src = node.args[0] if node.args else None
        if isinstance(src, fx.Node) and "tensor_meta" in src.meta:
            in_shape = tuple(src.meta["tensor_meta"].shape)
        dims = 1 if cls in (nn.AvgPool1d, nn.AdaptiveAvgPool1d) else 2
        plan = _pool_plan(cls, pool, in_shape, dims)
        if not isinstance(x, _Codes) or plan is None or len(args) != 1:
            why = ("its input is not on a grid" if not isinstance(x, _Codes) else
                   "its windows differ in size (ceil_mode, count_include_pad=False, a divisor "
                   "override or a non-dividing adaptive size)")
            return self.island(name, pool, args, kwargs, why, node)
        kernel, stride, padding, global_pool, count = plan
        enc = x.encoding
        op = ops.SumPool(int(enc.offset), (enc.qmin, enc.qmax), kernel, stride, padding, dims,
                         global_pool)
        out = self._module_node(f"{name}.sumpool", op, x.node)
        ndim = len(node.meta["tensor_meta"].shape)
        return _Pending([_Term(out, 0, enc.scale.to(torch.float64) / count)], None, ndim, name,
                        [f"sum-pool / {count}"])

    def lookup_table(self, name: str, module: nn.Module, fn: nn.Module, x: _Codes
                     ) -> Optional[_Codes]:
        """An activation between two integer grids as a table of output codes (None where
        the output is not quantized to integers or a grid is wider than 16 bits)."""
        outs = module.output_quantizers
        if not outs or not outs[0].enabled:
            return None
        out_enc, in_enc = self._encoding(outs[0], name), x.encoding
        if out_enc.is_float or out_enc.per_channel or \
                max(in_enc.bitwidth, out_enc.bitwidth) > LUT_MAX_BITS:
            return None
        with torch.no_grad():
            codes = torch.arange(in_enc.qmin, in_enc.qmax + 1, dtype=torch.float32)
            table = out_enc.quantize(fn(in_enc.dequantize(codes)))
        dtype = dtype_for_grid(out_enc.qmin, out_enc.qmax)
        tag = {"name": name, "where": "output", "encoding": out_enc}
        node = self._module_node(f"{name}.lut", ops.LookupTable(table.to(dtype), in_enc.qmin),
                                 x.node, tag=tag)
        tag["layer"] = LayerReport(name, f"{type(fn).__name__} lookup table "
                                         f"({in_enc.qmax - in_enc.qmin + 1} entries) -> "
                                         f"int{out_enc.bitwidth}", bitwidth=out_enc.bitwidth)
        self.report.layers.append(tag["layer"])
        return _Codes(node, out_enc)

    def move(self, name: str, args: Sequence, kwargs: dict, node: fx.Node, fn: Any) -> Any:
        x = args[0] if args else None
        rest = pytree.tree_map(self._plain, (tuple(args[1:]), kwargs))

        def apply(n: fx.Node) -> fx.Node:
            if isinstance(fn, nn.Module):
                if isinstance(fn, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)):
                    return n
                return self._module_node(f"{name}.move", fn, n, *rest[0])
            if node.op == "call_method":
                return self.graph.call_method(node.target, (n,) + rest[0], rest[1])
            return self.graph.call_function(fn, (n,) + rest[0], rest[1])

        if isinstance(x, _Codes):
            return _Codes(apply(x.node), x.encoding)
        if isinstance(x, _Pending) and x.axis is None and (x.bias is None or x.bias.dim() == 0):
            ndim = len(node.meta["tensor_meta"].shape)
            return replace(x, terms=[replace(t, node=apply(t.node)) for t in x.terms],
                           ndim=ndim)
        if isinstance(x, _Float):
            return _Float(apply(x.node))
        return self.island(name, fn, args, kwargs,
                           "reshapes a per-channel accumulator the sim leaves unquantized",
                           node)

    def add(self, name: str, a: Any, b: Any, subtract: bool, ndim: int, node: fx.Node,
            fn: Any) -> Any:
        values = [a, b]
        if not all(isinstance(v, (_Codes, _Pending)) for v in values):
            return self.island(name, fn, (a, b), {},
                               "an operand is not on a grid (float, or a constant)", node)
        parts = [self.pending_of(v, name, "") if isinstance(v, _Codes) else v for v in values]
        if any(p.clamped for p in parts) or len({p.axis for p in parts} - {None}) > 1 or any(
                p.axis is not None and p.ndim != ndim for p in parts):
            return self.island(name, fn, (a, b), {},
                               "an operand carries a clamp or per-channel scales that do not "
                               "line up", node)
        second = parts[1]
        sign = -1.0 if subtract else 1.0
        terms = parts[0].terms + [replace(t, scale=t.scale * sign) for t in second.terms]
        bias = parts[0].bias
        if second.bias is not None:
            # the second bias rides on the first term: in that term's units
            extra = second.bias * sign
            bias = extra if bias is None else bias + extra
        axis = parts[0].axis if parts[0].axis is not None else second.axis
        ops_ = [o for p in parts for o in p.ops if o] + ["Sub" if subtract else "Add"]
        return _Pending(terms, axis, ndim, name, [" ".join(ops_)], bias,
                        warnings=parts[0].warnings + second.warnings)

    def cat(self, name: str, values: list, enc: Optional[Encoding], node: fx.Node, fn: Any,
            args: Sequence, kwargs: dict, dim: Optional[int] = None) -> Any:
        if dim is None:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        if enc is not None and all(isinstance(v, (_Codes, _Pending, _Float)) for v in values):
            codes = [self.to_codes(v, enc, name, f"input {i}") for i, v in enumerate(values)]
            if all(isinstance(c, _Codes) for c in codes):
                out = self.graph.call_function(torch.cat, ([c.node for c in codes],),
                                               {"dim": dim})
                return _Codes(out, enc)
        if values and all(isinstance(v, _Codes) for v in values) and all(
                _same_encoding(v.encoding, values[0].encoding) for v in values):
            out = self.graph.call_function(torch.cat, ([v.node for v in values],), {"dim": dim})
            return _Codes(out, values[0].encoding)
        return self.island(name, fn, args, kwargs,
                           "concatenates tensors of different encodings and the sim does not "
                           "quantize the result", node)


_OP_NAMES = {"conv1d": "ConvInteger1d", "conv2d": "ConvInteger2d",
             "conv_transpose1d": "ConvTransposeInteger1d",
             "conv_transpose2d": "ConvTransposeInteger2d", "linear": "MatMulInteger"}


def _frozen(module: nn.Module) -> nn.Module:
    """A float copy of a (quantized) module in eval mode without gradients, its parameters
    fake-quantized as the sim uses them: a float island computes what the sim computes there,
    and training the sim further does not change the integer model."""
    clone = copy.deepcopy(original_module(module)).cpu().eval().requires_grad_(False)
    if isinstance(module, QuantizationMixin) and not isinstance(module, _FUSED):
        for pname, q in module.param_quantizers.items():
            param = clone._parameters.get(pname)
            if param is not None and q.enabled and q.encoding is not None:
                with torch.no_grad():
                    value = q.encoding.fake_quantize(param.detach())
                clone._parameters[pname] = nn.Parameter(value, requires_grad=False)
    return clone


def _describe(fn: Any) -> str:
    if isinstance(fn, nn.Module):
        return type(unwrap_class(fn) or fn).__name__ if isinstance(fn, QuantizationMixin) \
            else type(fn).__name__
    return getattr(fn, "__name__", str(fn))


def _module_bounds(act: nn.Module) -> Optional[Tuple[Optional[float], Optional[float]]]:
    if isinstance(act, nn.ReLU):
        return 0.0, None
    if isinstance(act, (nn.ReLU6, nn.Hardtanh)):
        return float(act.min_val), float(act.max_val)
    return None


def _clamp_bounds(key: Any, args: Sequence, kwargs: dict
                  ) -> Optional[Tuple[Optional[float], Optional[float]]]:
    if key in (torch.relu, F.relu, "relu"):
        return 0.0, None
    if key is F.relu6:
        return 0.0, 6.0
    rest = list(args[1:])
    lo = kwargs.get("min", rest[0] if rest else None)
    hi = kwargs.get("max", rest[1] if len(rest) > 1 else None)
    if key is F.hardtanh:
        lo = kwargs.get("min_val", rest[0] if rest else -1.0)
        hi = kwargs.get("max_val", rest[1] if len(rest) > 1 else 1.0)
    if not all(v is None or isinstance(v, (int, float)) for v in (lo, hi)):
        return None
    return (None if lo is None else float(lo)), (None if hi is None else float(hi))


def _pair(v: Any, dims: int) -> Tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims


def _pool_plan(cls: type, pool: nn.Module, in_shape: Optional[tuple], dims: int):
    """``(kernel, stride, padding, global, count)`` of an average pool whose windows all hold
    ``count`` elements (padding counted as zeros), else None."""
    if cls in (nn.AvgPool1d, nn.AvgPool2d):
        if pool.ceil_mode or not pool.count_include_pad or \
                getattr(pool, "divisor_override", None):
            return None
        kernel = _pair(pool.kernel_size, dims)
        stride = _pair(pool.stride if pool.stride is not None else pool.kernel_size, dims)
        padding = _pair(pool.padding, dims)
        count = 1
        for k in kernel:
            count *= k
        return kernel, stride, padding, False, count
    if in_shape is None:
        return None
    spatial = in_shape[-dims:]
    out = _pair(pool.output_size, dims)
    out = tuple(s if o is None else o for o, s in zip(out, spatial))
    if any(s % o for s, o in zip(spatial, out)):
        return None
    kernel = tuple(s // o for s, o in zip(spatial, out))
    count = 1
    for k in kernel:
        count *= k
    return kernel, kernel, (0,) * dims, all(o == 1 for o in out), count


def _fetch_attr(module: nn.Module, target: str) -> Any:
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def lower(sim: Any, rounding: str = "half_to_even", return_integers: bool = False
          ) -> Tuple[fx.GraphModule, ConversionReport, List[Optional[Encoding]]]:
    """Build the integer graph of ``sim``: ``(graph module, report, output encodings)``."""
    validate_rounding(rounding)
    converter = _Converter(sim, rounding, return_integers)
    graph_module = converter.run()
    return graph_module, converter.report, converter.output_encodings
