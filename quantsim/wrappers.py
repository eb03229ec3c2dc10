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
until the parameter or its encoding changes.

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
from typing import Any, Dict, Optional, Set, Tuple, Type

import torch
from torch import nn
from torch.utils import _pytree as pytree

from torch.nn.modules.module import _global_forward_hooks

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
    whose forward allocates its result: never a reshape, a view, or a module returning an input."""
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
        self._plan: Tuple[int, bool, bool, bool] = (-1, True, True, True)

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
        inputs_on, outputs_on, params_on = self._active()
        if inputs_on:
            args = self._quantize_inputs(args)
        substitutes = self._quantized_params() if params_on else None
        if substitutes:
            token = _SUBSTITUTED.set((self, substitutes, _SUBSTITUTED.get()))
            try:
                out = super().forward(*args, **kwargs)
            finally:
                _SUBSTITUTED.reset(token)
        else:
            out = super().forward(*args, **kwargs)
        if outputs_on:
            out = self._quantize_outputs(out)
        return out

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
                and not getattr(self, "inplace", False)
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
        key = (param._version, id(param), quantizer.version_key())
        cached = self._qparam_cache.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        value = quantizer(param)
        # entries hold the objects whose ids are in the key, so no id can be reused
        self._qparam_cache[name] = (key, value, param, quantizer.encoding_tensors())
        return value

    def extra_repr(self) -> str:  # keeps the float module's own description
        return super().extra_repr()


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


def quantize_module(module: nn.Module) -> nn.Module:
    """Turn ``module`` into its quantized class in place (quantizer lists start empty)."""
    cls = type(module)
    if isinstance(module, QuantizationMixin):
        return module
    qcls = _QUANTIZED_CLASSES.get(cls)
    if qcls is None:
        qcls = type(f"Quantized{cls.__name__}", (QuantizationMixin, cls), {
            "__module__": __name__, "__doc__": f"{cls.__name__} with quantizers (quantsim)."})
        _QUANTIZED_CLASSES[cls] = qcls
    module.__class__ = qcls
    module._init_quantizers()
    return module


def original_module(module: nn.Module) -> nn.Module:
    """A float copy of a quantized module, sharing its parameters (quantizers dropped)."""
    float_cls = unwrap_class(module)
    if float_cls is None:
        return module
    clone = float_cls.__new__(float_cls)
    clone.__dict__ = dict(module.__dict__)
    clone._modules = {k: v for k, v in module._modules.items()
                      if k not in ("input_quantizers", "output_quantizers", "param_quantizers")}
    clone.__dict__.pop("_qparam_cache", None)
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
