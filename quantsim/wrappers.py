"""Quantized versions of leaf modules.

A wrapped module *is* its float module: :func:`quantize_module` turns an instance of ``Cls``
into an instance of ``Quantized<Cls>(QuantizationMixin, Cls)`` that shares its parameters, so
``sim.model.conv1.weight`` is still the float weight (optimizers and state_dict keys keep
working) and the quantizers sit beside it:

* ``input_quantizers`` (``nn.ModuleList``, one per floating-point input in pytree order),
* ``output_quantizers`` (``nn.ModuleList``, one per floating-point output),
* ``param_quantizers`` (``nn.ModuleDict`` by parameter name).

Forward: inputs are fake-quantized, the float forward runs with fake-quantized parameters in
place of the real ones, outputs are fake-quantized. The substitution mutates nothing: while the
wrapper's forward runs, ``self.weight`` read *in that thread (context)* resolves to the
fake-quantized tensor (a :class:`contextvars.ContextVar` consulted by ``__getattr__``), so the
float parameters stay in ``_parameters`` for optimizers, ``state_dict`` and other threads, and
keep receiving gradients. In eval (no grad) a quantized parameter is computed once and reused
until the parameter or its encoding changes, up to a parameter size and a model size
(:func:`set_param_cache_limit`).

Under ``torch.compile`` (``torch.compile(sim.model)``) the forward takes a straight path that
dynamo traces into one graph: no context variable (dynamo cannot trace one), no caches, no
in-place output; the fake-quantized parameters reach the float forward through the instance's
``_traced_params``, which exists only in the traced program (dynamo records the assignment and
its undoing; the compiled code leaves ``None`` behind), so the float parameters stay in
``_parameters`` there too.

A module of a type registered with :func:`register_fresh_output` (its forward returns a newly
allocated tensor: conv, linear, norms, activations without ``inplace``, elementwise ops), without
children or forward hooks, outside autograd, has its output fake-quantized in place: nothing but
the float forward itself can have seen that tensor.

The registry lists the float classes quantized as one layer; one :func:`register_quantized`
call adds a type (and, where a parameter keeps its output channels on another axis than 0, that
axis, recorded in :mod:`quantsim.op_types`). Types the registry does not know still get wrapped
generically (the sim warns once).

A float class that computes a parameter in ``forward`` instead of reading it from
``_parameters`` (``quantsim.nn``'s fused conv-BN modules fold the BatchNorm into the weight)
passes the computed tensor through ``self.fake_quantize_param(name, tensor)``; the wrapper's
version applies ``param_quantizers[name]`` to it, with the same caching as for a parameter.
Which tensors those are is :func:`quantsim.op_types.params_of`.
"""
from __future__ import annotations

import contextvars
import numbers
from typing import Any, Dict, Optional, Set, Tuple, Type

import torch
from torch import nn
from torch.utils import _pytree as pytree

from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from quantsim.encoding import dequantize, quantize
from quantsim.errors import QuantizationSettingError
from quantsim.nn import elementwise as ew
from quantsim.nn.fused import ConvBn, ConvTransposeBn, LinearBn
# param_axis is imported from here by the sim and the retrain session
from quantsim.op_types import param_axis, register_param_axes  # noqa: F401
from quantsim.quantizer import Quantizer, enabled_generation

_QUANTIZED_TYPES: Set[Type[nn.Module]] = set()
_QUANTIZED_CLASSES: Dict[Type[nn.Module], Type[nn.Module]] = {}


def register_quantized(module_cls: Type[nn.Module], **param_axes: int) -> None:
    """Declare that ``module_cls`` is quantized as one layer, and the per-channel axis of each
    parameter whose output channels are not on axis 0.

    The axes go to :func:`quantsim.op_types.register_param_axes`, the one table of them
    (``ConvTranspose`` is there already). Example: ``register_quantized(MyConv, weight=1)``.
    """
    _QUANTIZED_TYPES.add(module_cls)
    if param_axes:
        register_param_axes(module_cls, **param_axes)


def is_registered(module: nn.Module) -> bool:
    """True when the module's class (or a base class) was registered."""
    return any(cls in _QUANTIZED_TYPES for cls in type(module).__mro__)


for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
             nn.ConvTranspose3d, nn.Linear, nn.Embedding, nn.EmbeddingBag, nn.BatchNorm1d,
             nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d,
             nn.InstanceNorm2d, nn.InstanceNorm3d, nn.PReLU, nn.RMSNorm):
    register_quantized(_cls)
# fused conv-BN modules are quantized as one layer (their children are not wrapped); the
# folded weight keeps the layer's output-channel axis
register_quantized(ConvBn)
register_quantized(LinearBn)
register_quantized(ConvTransposeBn, weight=1)


#: Float module types whose forward returns a newly allocated tensor: never one of its inputs,
#: a view, or a tensor the module keeps (an activation with ``inplace=True`` is excluded per
#: instance). Their outputs may be fake-quantized in place.
_FRESH_OUTPUT_TYPES: Set[Type[nn.Module]] = set()


def register_fresh_output(*module_classes: Type[nn.Module]) -> None:
    """Declare that ``forward`` of these classes always returns a newly allocated tensor, so the
    wrapper may fake-quantize it in place (see the module docstring). Register only classes
    whose forward allocates its result: never a reshape, a view, or a module returning an input.
    Applies to modules quantized after the call."""
    _FRESH_OUTPUT_TYPES.update(module_classes)


register_fresh_output(
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear, nn.Bilinear, nn.Embedding, nn.EmbeddingBag, nn.BatchNorm1d, nn.BatchNorm2d,
    nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.InstanceNorm3d, nn.RMSNorm, nn.PReLU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU,
    nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid,
    nn.Tanh, nn.Softmax, nn.LogSoftmax, nn.Softplus, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    ew.Add, ew.Sub, ew.Mul, ew.Div, ew.Pow, ew.MatMul, ew.Exp, ew.Sqrt, ew.Mean, ew.Sum,
    ew.Concat)

#: ``(module, {name: fake-quantized tensor}, outer frame)`` while a wrapper's float forward runs
#: in this thread / context; read by ``QuantizationMixin.__getattr__``
_SUBSTITUTED: contextvars.ContextVar[Optional[tuple]] = contextvars.ContextVar(
    "quantsim_substituted_parameters", default=None)


#: quantized parameters of at most this many elements are kept between eval calls (None: all)
_param_cache_limit: Optional[int] = 1 << 20
#: a sim whose model has more parameter elements than this keeps none (None: no model limit)
_model_cache_limit: Optional[int] = 1 << 25
#: above the limits, keep each weight's integer codes instead of its fake-quantized copy
_keep_codes = True
#: modules whose call reads a few rows of their weight: theirs is cached whatever its size
_LOOKUP_TABLES = (nn.Embedding, nn.EmbeddingBag)
#: a weight kept as codes is encoded, and an ``nn.Linear``'s product computed, a slice of about
#: this many elements (rows along axis 0) at a time: no weight-sized float temporary
_ROW_SLICE_ELEMENTS = 1 << 20


def _check_limit(value: Any, argument: str) -> Optional[int]:
    if value is not None and (isinstance(value, bool) or not isinstance(
            value, numbers.Integral) or value < 0):
        raise QuantizationSettingError(
            f"set_param_cache_limit: {argument} must be None or an integer >= 0, got {value!r}")
    return None if value is None else int(value)


def set_param_cache_limit(max_elements: Optional[int] = 1 << 20, *,
                          model_max_elements: Optional[int] = 1 << 25,
                          codes: bool = True) -> None:
    """Keep the fake-quantized copy of a parameter between eval calls only when it has at most
    ``max_elements`` elements (default ``2**20``, 4 MiB of float32) and its sim's model at most
    ``model_max_elements`` parameter elements (default ``2**25``, 128 MiB of float32); ``None``
    lifts a limit, ``0`` keeps none. Called without arguments, it restores the defaults.

    Outside autograd a quantized module computes the fake-quantized value of each parameter
    once and reuses it until the parameter or its encoding changes. That makes small layers
    fast (a fake-quant call costs more than a small layer's own work) but holds a second copy
    of the weights. Above the limits a parameter keeps its integer codes instead (``codes``,
    default True): ``clamp(round(w / scale) - offset, qmin, qmax)`` in the narrowest integer
    type of its grid (int8 / uint8 for grids of up to 8 bits, int4 included; int16 for
    signed 16-bit grids), a quarter (a half) of the float weight's bytes, and each eval call only dequantizes
    them (``(codes + offset) * scale``, one or two passes over the weight, per tensor, channel
    or block): the same values as fake-quantizing the weight (the sign of a zero aside:
    ``-0.0`` comes back as ``0.0``). A parameter whose grid fits no 16-bit integer or whose
    weight holds a NaN, a learnable or float quantizer, or ``codes=False`` is fake-quantized
    on every call instead: memory stays at the float model's, and each call pays a fake-quant
    pass over the weight (for a Linear layer at batch 64, about as long as its matrix
    product). Embedding tables are cached whatever their size (a call reads a few rows,
    so quantizing the whole table per call costs many times the lookup) unless the model is
    above ``model_max_elements``; an uncached ``nn.Embedding`` then quantizes only the rows a
    call looks up (per tensor: the float rows fake-quantized; per channel: the rows' codes
    dequantized; the same values). Codes are built, and an uncached ``nn.Linear`` whose weight
    has more than ``2**20`` elements (an LLM's vocabulary projection) computes its product, a
    slice of rows at a time, so no weight-sized float tensor exists beside the layer's output
    (each output element is the same dot product; BLAS may sum it in another order, which
    can move a last bit). The model limit keeps a large model (an LLM's many
    mid-sized weights) from being held twice; the sim records its model's size in each
    quantized module when it is built (modules quantized outside a sim have no model size and
    follow ``max_elements`` alone).

    The setting applies to every sim in the process; copies kept under a higher limit are
    dropped on their next use (or at once with :func:`clear_param_cache`).

    Raises:
        QuantizationSettingError: a limit is not None or an integer >= 0, or ``codes`` is not
            a bool.
    """
    global _param_cache_limit, _model_cache_limit, _keep_codes
    limit = _check_limit(max_elements, "max_elements")
    model_limit = _check_limit(model_max_elements, "model_max_elements")
    if not isinstance(codes, bool):
        raise QuantizationSettingError(
            f"set_param_cache_limit: codes must be True or False, got {codes!r}")
    _model_cache_limit, _param_cache_limit, _keep_codes = model_limit, limit, codes


def param_cache_limit() -> Optional[int]:
    """The per-parameter limit set by :func:`set_param_cache_limit` (elements; None: none)."""
    return _param_cache_limit


def model_cache_limit() -> Optional[int]:
    """The model-size limit set by :func:`set_param_cache_limit` (elements; None: none)."""
    return _model_cache_limit


def record_model_size(model: nn.Module) -> None:
    """Tell each quantized module of ``model`` how many parameter elements the model holds
    (shared parameters once), for the model limit of :func:`set_param_cache_limit`; the sim
    calls it when it builds."""
    size = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, QuantizationMixin):
            module._model_size = size


def clear_param_cache(model: nn.Module) -> None:
    """Drop the fake-quantized parameter copies and integer codes that the quantized modules
    of ``model`` keep (e.g. after an evaluation, to give the memory back); the next eval call
    recomputes them."""
    for module in model.modules():
        if isinstance(module, QuantizationMixin):
            module._qparam_cache.clear()
            module.__dict__.get("_qcodes_cache", {}).clear()  # absent in older pickles


class QuantizationMixin:
    """Adds quantizers to a float module; see the module docstring."""

    input_quantizers: nn.ModuleList
    output_quantizers: nn.ModuleList
    param_quantizers: nn.ModuleDict

    def _init_quantizers(self) -> None:
        self._fresh_output = (unwrap_class(self) in _FRESH_OUTPUT_TYPES
                              and next(self.children(), None) is None)
        nn.Module.__setattr__(self, "input_quantizers", nn.ModuleList())
        nn.Module.__setattr__(self, "output_quantizers", nn.ModuleList())
        nn.Module.__setattr__(self, "param_quantizers", nn.ModuleDict())
        self._qparam_cache: Dict[str, tuple] = {}
        self._qcodes_cache: Dict[str, tuple] = {}  # weights above the limits: integer codes
        self._model_size = 0  # the sim's model, for the cache's model limit (record_model_size)
        self._lookup = unwrap_class(self) is nn.Embedding  # uncached: quantize the rows read
        #: uncached: an output computed from the weight's codes (see _forward_from_codes)
        self._codes_forward = {nn.Linear: "linear", nn.Embedding: "embedding"}.get(
            unwrap_class(self))
        self._plan: Tuple[int, bool, bool, bool] = (-1, True, True, True)
        #: the fake-quantized parameters while a torch.compile trace runs the float forward
        self._traced_params: Optional[Dict[str, torch.Tensor]] = None

    def _active(self) -> Tuple[bool, bool, bool]:
        """Whether any input / output / parameter quantizer is enabled (cached per generation)."""
        plan = self._plan
        if plan[0] != enabled_generation():
            modules = self._modules
            plan = (enabled_generation(),
                    any(q.enabled for q in modules["input_quantizers"]),
                    any(q.enabled for q in modules["output_quantizers"]),
                    any(q.enabled for q in modules["param_quantizers"].values()))
            self._plan = plan
        return plan[1:]

    # -- forward --------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        traced = self.__dict__.get("_traced_params")
        if traced is not None:  # inside torch.compile's program (see _traced_forward)
            value = traced.get(name)
            return value if value is not None else super().__getattr__(name)
        if torch.compiler.is_compiling():  # dynamo cannot trace a context variable
            return super().__getattr__(name)
        frame = _SUBSTITUTED.get()
        while frame is not None:  # this thread's substitutions, innermost first
            if frame[0] is self:
                value = frame[1].get(name)
                if value is not None:
                    return value
                break
            frame = frame[2]
        return super().__getattr__(name)

    def forward(self, *args, **kwargs):  # noqa: D102 (documented in the module docstring)
        if torch.compiler.is_compiling():
            return self._traced_forward(args, kwargs)
        inputs_on, outputs_on, params_on = self._active()
        if inputs_on:
            args = self._quantize_inputs(args)
        out = rows = None
        if params_on and self.__dict__.get("_codes_forward"):  # absent in older pickles
            out = self._forward_from_codes(args, kwargs)
        if out is None:
            rows = self._rows_quantizer() if params_on and self.__dict__.get("_lookup") else None
            substitutes = self._quantized_params() if params_on and rows is None else None
            if substitutes:
                token = _SUBSTITUTED.set((self, substitutes, _SUBSTITUTED.get()))
                try:
                    out = super().forward(*args, **kwargs)
                finally:
                    _SUBSTITUTED.reset(token)
            else:
                out = super().forward(*args, **kwargs)
        if rows is not None:  # the looked-up rows of the float table: a fresh tensor
            out = rows.forward_owned(out)
        if outputs_on:
            out = self._quantize_outputs(out)
        return out

    def _traced_forward(self, args: tuple, kwargs: dict) -> Any:
        """The forward as torch.compile traces it: every quantizer call and parameter read
        is graph code (dynamo guards on the quantizers' settings, so changing one recompiles
        once). The fake-quantized parameters are handed to the float forward through
        ``_traced_params`` (read by ``__getattr__``), an assignment dynamo records instead of
        performing, so the compiled program mutates nothing that other threads read."""
        modules = self._modules
        args = self._quantize_inputs(args)
        quantized = {}
        for name, quantizer in modules["param_quantizers"].items():
            param = self._parameters.get(name)
            if param is not None and quantizer.enabled:
                quantized[name] = quantizer(param)
        if quantized:
            self.__dict__["_traced_params"] = quantized
            try:
                out = super().forward(*args, **kwargs)
            finally:
                self.__dict__["_traced_params"] = None
        else:
            out = super().forward(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return modules["output_quantizers"][0](out) if (
                out.is_floating_point() and len(modules["output_quantizers"])) else out
        return _map_float_leaves(out, modules["output_quantizers"])

    def _quantize_inputs(self, args: tuple) -> tuple:
        quantizers = self._modules["input_quantizers"]
        if all(isinstance(a, torch.Tensor) for a in args):  # the common case, no pytree cost
            n = len(quantizers)
            return tuple(
                quantizers[i](a) if i < n and a.is_floating_point() else a
                for i, a in enumerate(args))
        return _map_float_leaves(args, quantizers)

    def _quantize_outputs(self, out: Any) -> Any:
        quantizers = self._modules["output_quantizers"]
        if isinstance(out, torch.Tensor):
            if not out.is_floating_point():
                return out
            if self._may_overwrite(out):
                return quantizers[0].forward_owned(out)
            return quantizers[0](out)
        return _map_float_leaves(out, quantizers)

    def _may_overwrite(self, out: torch.Tensor) -> bool:
        """True when ``out`` is this call's own new tensor that nothing else can have seen: the
        module's type allocates its result (:func:`register_fresh_output`, no ``inplace``
        activation, no children whose hooks could keep it), no forward hooks, no autograd, a
        plain dense tensor. Decided from the module and the tensor's public properties only."""
        return (self._fresh_output and type(out) is torch.Tensor and not out.requires_grad
                and out.layout is torch.strided and out._base is None
                and not self.__dict__.get("inplace", False)  # a plain attribute: no __getattr__
                and not (self._forward_hooks or _global_forward_hooks)
                and not (out.is_inference() and not torch.is_inference_mode_enabled()))

    def _quantized_params(self) -> Dict[str, torch.Tensor]:
        """The fake-quantized tensor of every parameter with an enabled quantizer."""
        substitutes = {}
        for name, quantizer in self._modules["param_quantizers"].items():
            param = self._parameters.get(name)
            if param is not None and quantizer.enabled:
                substitutes[name] = self._quantized_param(name, param, quantizer)
        return substitutes

    def fake_quantize_param(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``, a parameter the float forward computes (see the module docstring),
        fake-quantized by ``param_quantizers[name]``; unchanged without an enabled one."""
        quantizers = self._modules["param_quantizers"]
        if name not in quantizers or not quantizers[name].enabled:
            return tensor
        return self._quantized_param(name, tensor, quantizers[name])

    def _quantized_param(self, name: str, param: torch.Tensor, quantizer: Quantizer) -> torch.Tensor:
        if torch.is_grad_enabled() and (param.requires_grad or quantizer.learnable):
            return quantizer(param)
        if quantizer.state != "quantize" or quantizer.rounding != "nearest":
            return quantizer(param)
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return quantizer(param)  # a trace or graph must compute it, not capture a cached copy
        if not self._may_cache(param):
            self._qparam_cache.pop(name, None)  # a copy kept before a limit was lowered
            return self._from_codes(name, param, quantizer)
        key = (param._version, id(param), quantizer.version_key())
        cached = self._qparam_cache.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        value = quantizer(param)
        # entries hold the objects whose ids are in the key, so no id can be reused
        self._qparam_cache[name] = (key, value, param, quantizer.encoding_tensors())
        return value

    def _from_codes(self, name: str, param: torch.Tensor, quantizer: Quantizer) -> torch.Tensor:
        """``quantizer(param)`` for a parameter above the cache limits (eval, nearest rounding,
        outside a trace): dequantized from integer codes kept until the parameter or the
        encoding changes, where the quantizer allows it (see :func:`set_param_cache_limit`)."""
        entry = self._codes_entry(name, param, quantizer)
        if entry is None:
            return quantizer(param)
        value = dequantize(entry[1], quantizer.scale, entry[2], quantizer.axis,
                           quantizer.block_size)
        return value.to(param.dtype)

    def _codes_entry(self, name: str, param: torch.Tensor, quantizer: Quantizer) -> Optional[tuple]:
        """``(key, codes, offset or None, param, encoding tensors)`` of a parameter kept as
        integer codes, built when missing or stale; None where it may not be kept so (no
        integer type holds the grid, ``codes=False``, no encoding yet, a NaN in the weight)."""
        codes_cache = self.__dict__.setdefault("_qcodes_cache", {})  # absent in older pickles
        dtype = _codes_dtype(quantizer) if _keep_codes else None
        if dtype is None:
            codes_cache.pop(name, None)  # codes kept before codes=False
            return None
        quantizer.check_mode()
        key = (param._version, id(param), quantizer.version_key())
        cached = codes_cache.get(name)
        if cached is not None and cached[0] == key:
            return cached
        codes = _encode_by_row_slices(param.detach(), quantizer, dtype) if (
            quantizer.is_initialized) else None
        if codes is None:  # no integer holds a NaN: the float path keeps it
            codes_cache.pop(name, None)
            return None
        # a zero offset (symmetric grids) is left out: one pass fewer per call
        offset = quantizer.offset if quantizer.offset.any() else None
        # entries hold the objects whose ids are in the key, so no id can be reused
        cached = (key, codes, offset, param, quantizer.encoding_tensors())
        codes_cache[name] = cached
        return cached

    def _uncached_weight_quantizer(self) -> Optional[Quantizer]:
        """The weight's quantizer where this eval call may compute from the weight's values
        directly instead of a cached fake-quantized copy: an enabled, fixed, nearest-rounding
        quantizer of a weight above the cache limits, outside autograd and traces."""
        quantizers = self._modules["param_quantizers"]
        q = quantizers["weight"] if "weight" in quantizers else None
        param = self._parameters.get("weight")
        if (q is None or param is None or not q.enabled or q.state != "quantize"
                or q.rounding != "nearest" or torch.jit.is_tracing()
                or (torch.is_grad_enabled() and (param.requires_grad or q.learnable))
                or self._may_cache(param)):
            return None
        self._qparam_cache.pop("weight", None)  # a copy kept before a limit was lowered
        return q

    def _forward_from_codes(self, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        """The output of an ``nn.Linear`` or ``nn.Embedding`` whose weight is kept as codes,
        computed without dequantizing the whole weight; None where the regular path applies.

        * Linear (weights above :data:`_ROW_SLICE_ELEMENTS`): the product a slice of output
          features at a time, so the dequantized weight never exists whole beside the output
          (an LLM's vocabulary projection would add a weight-sized tensor at the forward's
          peak); each output element is the dot product ``F.linear`` computes.
        * Embedding with a per-channel (per-row) encoding: the looked-up rows of the codes,
          dequantized with their rows' encodings: the same values as the whole table's.
        """
        weight = self._parameters.get("weight")
        if weight is None or self._may_cache(weight) or kwargs or len(args) != 1:
            return None  # the eval hot path's common case (a cached weight), decided first
        q = self._uncached_weight_quantizer()
        if q is None or q.data_type != "int":
            return None
        linear = self._codes_forward == "linear"
        if linear:
            if weight.numel() <= _ROW_SLICE_ELEMENTS or not _row_sliceable(q):
                return None
        elif q.axis != 0 or q.block_size is not None or self.max_norm is not None:
            return None
        entry = self._codes_entry("weight", weight, q)
        if entry is None:
            return None
        codes, offset, x = entry[1], entry[2], args[0]
        if not linear:
            def lookup(table: torch.Tensor) -> torch.Tensor:  # F.embedding's indexing errors
                return nn.functional.embedding(x, table.reshape(table.shape[0], -1))

            value = dequantize(lookup(codes), lookup(q.scale),
                               None if offset is None else lookup(offset))
            return value.to(weight.dtype)
        bias = self._parameters.get("bias")
        quantizers = self._modules["param_quantizers"]
        if bias is not None and "bias" in quantizers and quantizers["bias"].enabled:
            bias = self._quantized_param("bias", bias, quantizers["bias"])
        out = None
        for rows, scale, row_offset in _row_slices(q, codes, offset):
            w = dequantize(codes[rows], scale, row_offset, q.axis, q.block_size)
            part = nn.functional.linear(x, w.to(weight.dtype), None if bias is None else bias[rows])
            if out is None:  # the first slice's dtype: autocast's, where it is on
                out = part.new_empty(part.shape[:-1] + (weight.shape[0],))
            out[..., rows] = part
        return out

    def _rows_quantizer(self) -> Optional[Quantizer]:
        """An uncached embedding table's weight quantizer where the call may apply it to the
        rows it looks up instead of the whole table: the same values (a per-tensor encoding,
        elementwise arithmetic) for a fraction of the work. None where it may not."""
        q = self._uncached_weight_quantizer()
        if q is None or q.axis is not None or q.block_size is not None or (
                self.max_norm is not None):
            return None
        return q

    def _may_cache(self, param: torch.Tensor) -> bool:
        """The limits of :func:`set_param_cache_limit` allow keeping ``param``'s copy."""
        if _model_cache_limit is not None and self.__dict__.get(
                "_model_size", 0) > _model_cache_limit:  # 0 in modules pickled before it
            return False
        return (_param_cache_limit is None or param.numel() <= _param_cache_limit
                or isinstance(self, _LOOKUP_TABLES))

    def extra_repr(self) -> str:  # keeps the float module's own description
        return super().extra_repr()

    # -- copying and pickling -------------------------------------------------------------------
    def __getstate__(self) -> Dict[str, Any]:
        """The module's state for pickle and ``copy.deepcopy``, minus the cached quantized
        parameters (derived data as large as the weights) and with the plan of active
        quantizers marked stale (its generation counter means nothing in another process)."""
        state = super().__getstate__()
        state["_qparam_cache"] = {}
        state["_qcodes_cache"] = {}
        state["_plan"] = (-1,) + tuple(state["_plan"][1:])
        return state

    def __reduce_ex__(self, protocol: int):
        """Pickle as the float class plus a rebuild step (:func:`_rebuild_quantized`), because
        ``Quantized<Cls>`` is made at run time and cannot be looked up by name: a process that
        never built a sim can ``torch.load`` a pickled ``sim.model``."""
        reconstruct, args, *rest = super().__reduce_ex__(protocol)
        float_cls, qcls = unwrap_class(self), type(self)
        args = tuple(float_cls if a is qcls else a for a in args)
        return (_rebuild_quantized, (float_cls, reconstruct, args), *rest)


def _codes_dtype(quantizer: Quantizer) -> Optional[torch.dtype]:
    """The narrowest integer dtype that holds the codes of ``quantizer``'s grid, where its
    parameter may be kept as codes (a fixed-range integer quantizer without hooks, whose call
    is the plain fake-quant pass); None where it may not."""
    if (quantizer.data_type != "int" or quantizer.learnable or quantizer._forward_hooks or quantizer._forward_pre_hooks
            or _global_forward_hooks or _global_forward_pre_hooks):
        return None
    qmin, qmax = quantizer.qmin_qmax
    for dtype in (torch.int8, torch.uint8, torch.int16):
        info = torch.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return dtype
    return None


def _row_sliceable(quantizer: Quantizer) -> bool:
    """Whether ``quantizer``'s encoding applies to its parameter's rows (axis 0) separately:
    per tensor, per channel along axis 0, per block."""
    return quantizer.axis in (None, 0) or quantizer.block_size is not None


def _row_slices(quantizer: Quantizer, param: torch.Tensor, offset: Optional[torch.Tensor]):
    """``(rows, scale, offset)`` for consecutive slices of about :data:`_ROW_SLICE_ELEMENTS`
    elements of ``param`` along axis 0, with the encoding's rows for each slice (the whole
    parameter at once where the encoding does not follow its rows)."""
    scale = quantizer.scale
    if param.dim() == 0 or not _row_sliceable(quantizer):
        yield slice(None), scale, offset
        return
    per_row = scale.dim() > 0  # per channel (axis 0) or per block: one encoding row per row
    step = max(1, _ROW_SLICE_ELEMENTS // max(1, param[0].numel()))
    for start in range(0, param.shape[0], step):
        rows = slice(start, start + step)
        yield (rows, scale[rows] if per_row else scale,
               offset[rows] if per_row and offset is not None else offset)


def _encode_by_row_slices(param: torch.Tensor, quantizer: Quantizer,
                          dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The integer codes of ``param`` in ``dtype``, computed a row slice at a time (no
    weight-sized float temporary); None when ``param`` holds a NaN."""
    qmin, qmax = quantizer.qmin_qmax
    codes = torch.empty(param.shape, dtype=dtype, device=param.device)
    for rows, scale, offset in _row_slices(quantizer, param, quantizer.offset):
        part = quantize(param[rows], scale, offset, qmin, qmax, quantizer.axis, "nearest",
                        quantizer.block_size)
        if torch.isnan(part).any():
            return None
        codes[rows] = part
    return codes


def _map_float_leaves(tree: Any, quantizers: nn.ModuleList) -> Any:
    """Apply ``quantizers[i]`` to the i-th floating-point tensor leaf of ``tree``."""
    leaves, spec = pytree.tree_flatten(tree)
    i = 0
    for j, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            if i < len(quantizers):
                leaves[j] = quantizers[i](leaf)
            i += 1
    return pytree.tree_unflatten(leaves, spec)


def _quantized_class(float_cls: Type[nn.Module]) -> Type[nn.Module]:
    """``Quantized<Cls>(QuantizationMixin, Cls)``, created once per float class (threads that
    race here all get the class stored first)."""
    qcls = _QUANTIZED_CLASSES.get(float_cls)
    if qcls is None:
        qcls = _QUANTIZED_CLASSES.setdefault(float_cls, type(
            f"Quantized{float_cls.__name__}", (QuantizationMixin, float_cls), {
                "__module__": __name__,
                "__doc__": f"{float_cls.__name__} with quantizers (quantsim)."}))
    return qcls


def _rebuild_quantized(float_cls: Type[nn.Module], reconstruct: Any, args: tuple) -> nn.Module:
    """Unpickling step of a quantized module (see ``QuantizationMixin.__reduce_ex__``): build
    the float object as pickle would have, then give it its quantized class. Pickle files
    name this function: keep its name and signature."""
    module = reconstruct(*args)
    module.__class__ = _quantized_class(float_cls)
    return module


#: attribute names that ``_init_quantizers`` adds to a module's ``__dict__`` (besides the
#: quantizer containers), which the float copy of :func:`original_module` leaves out
_MIXIN_ATTRIBUTES: Set[str] = set()


def quantize_module(module: nn.Module) -> nn.Module:
    """Turn ``module`` into its quantized class in place (quantizer lists start empty).

    The module keeps its identity, parameters and buffers; its class becomes
    ``Quantized<Cls>``, a subclass of both :class:`QuantizationMixin` and its float class.
    A module that is already quantized is returned as it is.
    """
    if isinstance(module, QuantizationMixin):
        return module
    before = set(module.__dict__)
    module.__class__ = _quantized_class(type(module))
    module._init_quantizers()
    _MIXIN_ATTRIBUTES.update(set(module.__dict__) - before)
    return module


def original_module(module: nn.Module) -> nn.Module:
    """A float copy of a quantized module: an instance of its float class sharing its
    parameters, buffers and children (quantizers and the wrapper's own attributes dropped).

    The copy has its own ``_parameters`` / ``_buffers`` / ``_modules`` dicts, so assigning a
    parameter or child on one does not change the other. A float module is returned as is.
    """
    float_cls = unwrap_class(module)
    if float_cls is None:
        return module
    clone = float_cls.__new__(float_cls)
    clone.__dict__ = {k: v for k, v in module.__dict__.items() if k not in _MIXIN_ATTRIBUTES}
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {k: v for k, v in module._modules.items()
                      if k not in ("input_quantizers", "output_quantizers", "param_quantizers")}
    return clone


def quantizer_items(module: nn.Module):
    """``(suffix, quantizer)`` pairs of a quantized module: ``input_quantizers.0``, ..."""
    if not isinstance(module, QuantizationMixin):
        return
    for i, q in enumerate(module.input_quantizers):
        yield f"input_quantizers.{i}", q
    for i, q in enumerate(module.output_quantizers):
        yield f"output_quantizers.{i}", q
    for name, q in module.param_quantizers.items():
        yield f"param_quantizers.{name}", q


def unwrap_class(module: nn.Module) -> Optional[type]:
    """The float class a quantized module was made from (None for a float module)."""
    if not isinstance(module, QuantizationMixin):
        return None
    return next(c for c in type(module).__mro__[1:] if not issubclass(c, QuantizationMixin))
