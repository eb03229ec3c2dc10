"""Write an :class:`~quantsim.convert.IntegerModel` as an integer ONNX model for ONNX Runtime.

Each integer op of the model becomes ONNX ops that compute the same integers, so ONNX
Runtime's CPU provider reproduces the IntegerModel bit for bit (``tests/test_integer_onnx.py``):

================  ==============================================================================
IntegerModel op   ONNX
================  ==============================================================================
Quantize          ``Div`` by the scale, ``Round`` (half to even), ``Sub`` the offset, ``Clip``,
                  ``Cast`` (the float32 arithmetic of the sim's quantize, op for op)
IntConv conv      ``Pad`` with the code of real 0, then ``ConvInteger`` (int8/uint8 codes; 16-bit
                  codes as two byte planes, ``lo + 256 * hi``, each its own ``ConvInteger``)
IntConv linear    ``MatMulInteger`` (16-bit codes: two byte planes)
IntConv transp.   codes spread out with codes of real 0 (``Unsqueeze``, ``Pad``, ``Reshape``,
                  ``Slice``), then ``ConvInteger`` with the flipped kernel (ONNX has no
                  integer ConvTranspose)
SumPool           global: ``ReduceSum`` (int64); windows: depthwise ``ConvInteger`` with ones
Requantize        int64 ``Mul`` by the multiplier, floor division by ``2^shift`` from ``Div``
                  (which truncates) and a sign fix, the tie rule from the remainder, ``Max`` /
                  ``Min``, ``Cast``
LookupTable       ``Gather``
MaxPool           ``MaxPool`` (8-bit codes; wider codes through an exact float32 copy)
Dequantize        ``Cast``, ``Add`` the offset, ``Mul`` the scale
float islands     ``Softmax``, ``LayerNormalization``, ``Gelu`` formula; others are refused
================  ==============================================================================

QLinearConv / QLinearMatMul are not used: ONNX Runtime requantizes inside them in float
(``acc * (s_x s_w / s_y)`` rounded from float32), which is not the fixed-point multiply and
shift of the integer model (``docs/convert.md`` gives the measured difference).
"""
from __future__ import annotations

import io
import operator
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from quantsim.atomic import atomic_write
from quantsim.errors import ExportError

#: the ONNX opset of the written model (LayerNormalization needs 17)
OPSET = 17
_ONNX_TYPE = {torch.uint8: TensorProto.UINT8, torch.int8: TensorProto.INT8,
              torch.int16: TensorProto.INT16, torch.int32: TensorProto.INT32,
              torch.int64: TensorProto.INT64, torch.float32: TensorProto.FLOAT,
              torch.bool: TensorProto.BOOL}


class _Writer:
    """Emits ONNX nodes for the integer graph, one fx node at a time."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.nodes: List[onnx.NodeProto] = []
        self.initializers: List[onnx.TensorProto] = []
        self.names: Dict[fx.Node, str] = {}
        self.counter = 0

    # -- helpers --------------------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        self.counter += 1
        return f"{base}_{self.counter}"

    def const(self, base: str, value: Any, dtype: Optional[np.dtype] = None) -> str:
        array = np.asarray(value.detach().cpu().numpy() if isinstance(value, torch.Tensor)
                           else value)
        if dtype is not None:
            array = array.astype(dtype)
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], base: str, **attrs: Any) -> str:
        out = self.fresh(base)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def cast(self, x: str, to: int, base: str) -> str:
        return self.op("Cast", [x], base, to=to)

    # -- ops ------------------------------------------------------------------------------------
    def quantize(self, m: Any, x: str, base: str) -> str:
        v = self.op("Div", [x, self.const("scale", m.scale, np.float32)], base)
        v = self.op("Round", [v], base)
        v = self.op("Sub", [v, self.const("offset", m.offset, np.float32)], base)
        v = self.op("Clip", [v, self.const("qmin", np.float32(m.qmin)),
                             self.const("qmax", np.float32(m.qmax))], base)
        return self.cast(v, _ONNX_TYPE[m.dtype], base)

    def dequantize(self, m: Any, q: str, base: str) -> str:
        v = self.cast(q, TensorProto.FLOAT, base)
        v = self.op("Add", [v, self.const("offset", m.offset, np.float32)], base)
        return self.op("Mul", [v, self.const("scale", m.scale, np.float32)], base)

    def planes(self, q: str, dtype: torch.dtype, grid: Tuple[int, int], base: str
               ) -> List[Tuple[str, int]]:
        """``q`` as (plane, weight) pairs of 8-bit tensors: itself, or lo + 256 * hi."""
        if dtype in (torch.uint8, torch.int8):
            return [(q, 1)]
        if grid[0] >= 0 and grid[1] < 2**16:
            hi_type = TensorProto.UINT8
        elif grid[0] >= -2**15 and grid[1] < 2**15:
            hi_type = TensorProto.INT8
        else:
            raise ExportError(f"integer ONNX: {base}: codes of grid {grid} are wider than 16 "
                              "bits")
        wide = self.cast(q, TensorProto.INT32, base)
        lo = self.op("Mod", [wide, self.const("c256", np.int32(256))], base, fmod=0)
        hi = self.op("Div", [self.op("Sub", [wide, lo], base),
                             self.const("c256", np.int32(256))], base)
        return [(self.cast(lo, TensorProto.UINT8, base), 1), (self.cast(hi, hi_type, base), 256)]

    def integer_conv(self, q: str, in_dtype: torch.dtype, input_offset: int,
                     grid: Tuple[int, int], weight: torch.Tensor, kind: str,
                     options: Dict[str, Any], base: str) -> str:
        """The int64 accumulator ``conv(q + input_offset, weight)`` from ConvInteger /
        MatMulInteger on byte planes."""
        if kind != "linear":
            pads = _explicit_pads(options["padding"], list(weight.shape[2:]),
                                  list(options["dilation"]))
            if any(pads):  # pad with the code of real 0, as the torch op pads q + offset with 0
                half = len(pads) // 2
                pads = [0, 0] + pads[:half] + [0, 0] + pads[half:]
                q = self.pad_codes(q, in_dtype, input_offset, pads, base)
        w_dtype = weight.dtype
        if w_dtype not in (torch.int8, torch.uint8):
            raise ExportError(f"integer ONNX: {base}: {w_dtype} weight codes (more than 8 bits) "
                              "have no ConvInteger / MatMulInteger form")
        if kind == "linear":
            w = self.const("weight", weight.t().contiguous())
        else:
            w = self.const("weight", weight)
        total = None
        for plane, factor in self.planes(q, in_dtype, grid, base):
            if kind == "linear":
                acc = self.op("MatMulInteger", [plane, w], base)
            else:
                dims = weight.dim() - 2
                acc = self.op("ConvInteger", [plane, w], base,
                              strides=list(options["stride"]), dilations=list(options["dilation"]),
                              group=int(options["groups"]), pads=[0] * (2 * dims),
                              kernel_shape=list(weight.shape[2:]))
            acc = self.cast(acc, TensorProto.INT64, base)
            if factor != 1:
                acc = self.op("Mul", [acc, self.const("plane", np.int64(factor))], base)
            total = acc if total is None else self.op("Add", [total, acc], base)
        if input_offset:  # + offset * sum(w): the planes hold q, the value is q + offset
            axes = tuple(range(1, weight.dim())) if kind != "linear" else (1,)
            w_sum = weight.to(torch.int64).sum(dim=axes) * input_offset
            shape = [-1] + [1] * (weight.dim() - 2) if kind != "linear" else [-1]
            total = self.op("Add", [total, self.const("offset_sum", w_sum.reshape(shape))], base)
        return total

    def pad_codes(self, q: str, dtype: torch.dtype, input_offset: int, pads: List[int],
                  base: str) -> str:
        """``q`` padded with the code of real 0 (ONNX ``Pad`` pads, all dims)."""
        zero_code = np.array(-input_offset).astype(_numpy(dtype))
        return self.op("Pad", [q, self.const("pads", np.array(pads, np.int64)),
                               self.const("zero_code", zero_code)], base, mode="constant")

    def conv(self, m: Any, q: str, in_dtype: torch.dtype, in_shape: Sequence[int],
             base: str) -> str:
        if m.kind.startswith("conv_transpose"):
            return self.conv_transpose(m, q, in_dtype, in_shape, base)
        return self.integer_conv(q, in_dtype, m.input_offset, m.input_grid, m.weight, m.kind,
                                 m.options, base)

    def conv_transpose(self, m: Any, q: str, dtype: torch.dtype, in_shape: Sequence[int],
                       base: str) -> str:
        """A transposed convolution as ConvInteger: the codes spread out with ``stride - 1``
        codes of real 0 between neighbours, then a stride-1 convolution with the flipped,
        transposed kernel and padding ``dilation * (k - 1) - padding`` (plus
        ``output_padding`` at the end); ONNX has no integer ConvTranspose."""
        o = m.options
        dims = m.weight.dim() - 2
        kernel, stride = list(m.weight.shape[2:]), list(o["stride"])
        dilation, padding = list(o["dilation"]), list(o["padding"])
        begin = [d * (k - 1) - p for d, k, p in zip(dilation, kernel, padding)]
        end = [b + op for b, op in zip(begin, o["output_padding"])]
        if min(begin) < 0:
            raise ExportError(f"integer ONNX: {base}: a transposed convolution whose padding "
                              "exceeds dilation * (kernel - 1) has no ConvInteger form here")
        spatial = list(in_shape[2:])
        if any(s > 1 for s in stride):
            # (N, C, H, W) -> (N, C, H, 1, W, 1) -> pad to (N, C, H, s, W, s) -> (N, C, Hs, Ws)
            axes = [3 + 2 * i for i in range(dims)]
            q = self.op("Unsqueeze", [q, self.const("axes", np.array(axes, np.int64))], base)
            tail = []
            for s in stride:
                tail += [0, s - 1]
            pads = [0] * (2 + 2 * dims) + [0, 0] + tail
            q = self.pad_codes(q, dtype, m.input_offset, pads, base)
            shape = [0, 0] + [n * s for n, s in zip(spatial, stride)]
            q = self.op("Reshape", [q, self.const("shape", np.array(shape, np.int64))], base)
            ends = [(n - 1) * s + 1 for n, s in zip(spatial, stride)]
            q = self.op("Slice", [q, self.const("starts", np.zeros(dims, np.int64)),
                                  self.const("ends", np.array(ends, np.int64)),
                                  self.const("axes", np.arange(2, 2 + dims, dtype=np.int64))],
                        base)
        weight = m.weight.transpose(0, 1).flip(list(range(2, 2 + dims))).contiguous()
        options = dict(stride=[1] * dims, padding=begin + end, dilation=dilation,
                       groups=1)
        return self.integer_conv(q, dtype, m.input_offset, m.input_grid, weight, "conv",
                                 options, base)

    def sum_pool(self, m: Any, q: str, in_dtype: torch.dtype, channels: int,
                 base: str) -> str:
        if m.global_pool:
            x = self.op("Add", [self.cast(q, TensorProto.INT64, base),
                                self.const("offset", np.int64(m.input_offset))], base)
            axes = self.const("axes", np.arange(-m.dims, 0, dtype=np.int64))
            return self.op("ReduceSum", [x, axes], base, keepdims=1)
        ones = torch.ones((channels, 1) + tuple(m.kernel_size), dtype=torch.int8)
        options = dict(stride=m.stride, padding=m.padding, dilation=(1,) * m.dims,
                       groups=channels)
        return self.integer_conv(q, in_dtype, m.input_offset, m.input_grid, ones, "conv",
                                 options, base)

    def requantize(self, m: Any, terms: Sequence[str], base: str) -> str:
        acc = None
        for i, (t, mult) in enumerate(zip(terms, m.multipliers())):
            x = self.cast(t, TensorProto.INT64, base)
            if m.offsets[i]:
                x = self.op("Add", [x, self.const("offset", np.int64(m.offsets[i]))], base)
            if i == 0 and m.bias is not None:
                x = self.op("Add", [x, self.const("bias", m.bias)], base)
            x = self.op("Mul", [x, self.const("multiplier", mult)], base)
            acc = x if acc is None else self.op("Add", [acc, x], base)
        divisor = torch.bitwise_left_shift(torch.ones_like(m.shift), m.shift)
        d = self.const("divisor", divisor)
        # floor division: Div truncates toward zero; step down where the remainder is negative
        trunc = self.op("Div", [acc, d], base)
        rem = self.op("Sub", [acc, self.op("Mul", [trunc, d], base)], base)
        negative = self.cast(self.op("Less", [rem, self.const("zero", np.int64(0))], base),
                             TensorProto.INT64, base)
        floor = self.op("Sub", [trunc, negative], base)
        rem = self.op("Add", [rem, self.op("Mul", [negative, d], base)], base)
        half = self.const("half", torch.div(divisor, 2, rounding_mode="floor"))
        above = self.op("Greater", [rem, half], base)
        tie = self.op("And", [self.op("Equal", [rem, half], base),
                              self.op("Greater", [half, self.const("zero", np.int64(0))], base)],
                      base)
        if m.rounding == "half_to_even":
            odd = self.op("Equal", [self.op("Mod", [floor, self.const("two", np.int64(2))], base,
                                            fmod=0), self.const("one", np.int64(1))], base)
        else:
            odd = self.op("GreaterOrEqual", [acc, self.const("zero", np.int64(0))], base)
        up = self.op("Or", [above, self.op("And", [tie, odd], base)], base)
        out = self.op("Add", [floor, self.cast(up, TensorProto.INT64, base)], base)
        if m.output_offset:
            out = self.op("Sub", [out, self.const("offset", np.int64(m.output_offset))], base)
        out = self.op("Max", [out, self.const("lo", np.int64(m.lo))], base)
        out = self.op("Min", [out, self.const("hi", np.int64(m.hi))], base)
        return self.cast(out, _ONNX_TYPE[m.dtype], base)

    def clamp_codes(self, m: Any, q: str, dtype: torch.dtype, base: str) -> str:
        v = self.cast(q, TensorProto.INT32, base)
        v = self.op("Max", [v, self.const("lo", np.int32(m.lo))], base)
        v = self.op("Min", [v, self.const("hi", np.int32(m.hi))], base)
        return self.cast(v, _ONNX_TYPE[dtype], base)

    def max_pool(self, m: nn.Module, q: str, dtype: torch.dtype, base: str) -> str:
        dims = 1 if isinstance(m, nn.MaxPool1d) else 2
        kernel = _tuple(m.kernel_size, dims)
        stride = _tuple(m.stride if m.stride is not None else m.kernel_size, dims)
        padding = _tuple(m.padding, dims)
        attrs = dict(kernel_shape=list(kernel), strides=list(stride), pads=list(padding) * 2,
                     dilations=list(_tuple(m.dilation, dims)), ceil_mode=int(m.ceil_mode))
        if dtype in (torch.uint8, torch.int8):
            return self.op("MaxPool", [q], base, **attrs)
        v = self.op("MaxPool", [self.cast(q, TensorProto.FLOAT, base)], base, **attrs)
        return self.cast(v, _ONNX_TYPE[dtype], base)

    def lookup(self, m: Any, q: str, base: str) -> str:
        idx = self.op("Sub", [self.cast(q, TensorProto.INT64, base),
                              self.const("qmin", np.int64(m.qmin))], base)
        return self.op("Gather", [self.const("table", m.table), idx], base, axis=0)

    def island(self, m: nn.Module, x: str, base: str) -> str:
        if isinstance(m, nn.Softmax):
            return self.op("Softmax", [x], base, axis=int(m.dim if m.dim is not None else -1))
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            axis = -len(m.normalized_shape)
            bias = m.bias if m.bias is not None else torch.zeros_like(m.weight)
            return self.op("LayerNormalization", [x, self.const("gamma", m.weight, np.float32),
                                                  self.const("beta", bias, np.float32)],
                           base, axis=axis, epsilon=float(m.eps))
        if isinstance(m, nn.GELU) and m.approximate == "none":
            erf = self.op("Erf", [self.op("Mul", [x, self.const("c", np.float32(
                1 / np.sqrt(2)))], base)], base)
            one = self.op("Add", [erf, self.const("one", np.float32(1))], base)
            half = self.op("Mul", [x, self.const("half", np.float32(0.5))], base)
            return self.op("Mul", [half, one], base)
        raise ExportError(f"integer ONNX: {base}: the float island {type(m).__name__} has no "
                          "ONNX form here (Softmax, LayerNorm and GELU do)")


def _explicit_pads(padding: Any, kernel: List[int], dilation: List[int]) -> List[int]:
    """``(begin..., end...)`` per spatial dim from torch's padding: numbers (symmetric, or
    already begin + end), ``'valid'`` or ``'same'`` (torch puts the odd one at the end)."""
    if padding == "valid":
        return [0] * (2 * len(kernel))
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return [t // 2 for t in total] + [t - t // 2 for t in total]
    padding = list(padding)
    return padding if len(padding) == 2 * len(kernel) else padding * 2


def _tuple(v: Any, dims: int) -> Tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims


def _numpy(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype


def integer_onnx_model(model: Any, dummy_input: Any) -> onnx.ModelProto:
    """The ONNX model of an :class:`~quantsim.convert.IntegerModel` (see the module docstring).

    Args:
        model: the integer model.
        dummy_input: an input tensor (or tuple of them) the model accepts; it fixes every
            shape but the batch dimension.

    Raises:
        ExportError: an op without an ONNX form here, named.
    """
    from quantsim.convert import IntegerModel, ops
    if not isinstance(model, IntegerModel):
        raise ExportError(f"export_integer_onnx: model must be a quantsim.convert.IntegerModel "
                          f"(from quantsim.convert(sim)), got {type(model).__name__}")
    args = dummy_input if isinstance(dummy_input, tuple) else (dummy_input,)
    gm = model.graph_module
    with torch.no_grad():
        ShapeProp(gm).propagate(*args)
    w = _Writer(model)
    inputs, outputs = [], []

    def meta(n: fx.Node):
        return n.meta["tensor_meta"]

    def value_info(name: str, n: fx.Node) -> onnx.ValueInfoProto:
        m = meta(n)
        shape = ["batch"] + list(m.shape[1:])
        return helper.make_tensor_value_info(name, _ONNX_TYPE[m.dtype], shape)

    for n in gm.graph.nodes:
        base = str(n.name)
        if n.op == "placeholder":
            w.names[n] = base
            inputs.append(value_info(base, n))
            continue
        if n.op == "output":
            results = n.args[0]
            results = results if isinstance(results, (tuple, list)) else (results,)
            for k, r in enumerate(results):
                name = f"output_{k}" if len(results) > 1 else "output"
                w.nodes.append(helper.make_node("Identity", [w.names[r]], [name]))
                outputs.append(value_info(name, r))
            continue
        src = [a for a in n.args if isinstance(a, fx.Node)]
        x = w.names[src[0]] if src else None
        in_dtype = meta(src[0]).dtype if src and "tensor_meta" in src[0].meta else None
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            if isinstance(m, ops.Quantize):
                out = w.quantize(m, x, base)
            elif isinstance(m, ops.Dequantize):
                out = w.dequantize(m, x, base)
            elif isinstance(m, ops.IntConv):
                out = w.conv(m, x, in_dtype, meta(src[0]).shape, base)
            elif isinstance(m, ops.SumPool):
                out = w.sum_pool(m, x, in_dtype, meta(src[0]).shape[1], base)
            elif isinstance(m, ops.Requantize):
                out = w.requantize(m, [w.names[a] for a in src], base)
            elif isinstance(m, ops.ClampCodes):
                out = w.clamp_codes(m, x, in_dtype, base)
            elif isinstance(m, ops.LookupTable):
                out = w.lookup(m, x, base)
            elif isinstance(m, ops.FloatIsland):
                out = w.island(m.module, x, base)
            elif isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)):
                out = w.max_pool(m, x, in_dtype, base)
            elif isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
                out = w.op("Flatten", [x], base, axis=1)
            else:
                out = _reshape_like(w, n, x, base, type(m).__name__)
        elif n.target is torch.cat:
            dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
            out = w.op("Concat", [w.names[a] for a in n.args[0]], base, axis=int(dim))
        elif n.target is operator.add:
            out = w.op("Add", [w.names[a] for a in src], base)
        elif n.target in (torch.flatten, "flatten", "view", "reshape", "contiguous"):
            out = _reshape_like(w, n, x, base, str(n.target))
        else:
            raise ExportError(f"integer ONNX: {base}: {n.target} has no ONNX form here")
        w.names[n] = out
    graph = helper.make_graph(w.nodes, "quantsim_integer_model", inputs, outputs,
                              w.initializers)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                   producer_name="quantsim")
    onnx_model.ir_version = 8
    onnx.checker.check_model(onnx_model)
    return onnx_model


def _reshape_like(w: _Writer, n: fx.Node, x: str, base: str, what: str) -> str:
    """A data-movement op as a Reshape to its traced shape (the batch dimension kept)."""
    shape = list(n.meta["tensor_meta"].shape)
    src = [a for a in n.args if isinstance(a, fx.Node)][0]
    if list(src.meta["tensor_meta"].shape[:1]) != shape[:1]:
        raise ExportError(f"integer ONNX: {base}: {what} moves the batch dimension")
    return w.op("Reshape", [x, w.const("shape", np.array([0] + shape[1:], np.int64))], base)


def export_integer_onnx(model: Any, path: str, dummy_input: Any) -> onnx.ModelProto:
    """Write an :class:`~quantsim.convert.IntegerModel` to ``path`` as an integer ONNX model
    (atomically) and return it. The model takes the float input and returns what the
    integer model returns (float outputs, or codes with ``return_integers=True``); ONNX
    Runtime's CPU provider runs it bit-exactly like the integer model.

    Raises:
        ExportError: an op without an ONNX form here (named), or a model that is not an
            IntegerModel.
    """
    onnx_model = integer_onnx_model(model, dummy_input)
    buffer = io.BytesIO()
    onnx.save_model(onnx_model, buffer)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return onnx_model
