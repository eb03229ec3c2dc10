"""Per-channel scaling for activation balancing: how factors are computed and applied.

The factor formula (:func:`balance_factors`), where each layer type keeps the channels of its
weight, bias or activation (layouts, producer channels), the modules that scale a tensor
(:class:`ChannelScale`, :class:`ScaledInput`), and the in-place edits of one model, with
undo and the float check that guards them.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils import _pytree as pytree

from quantsim.errors import BalanceError
from quantsim.graph import eval_mode, run_forward
from quantsim.nn.elementwise import MatMul
from quantsim.op_types import register_op_type

__all__ = ["ChannelScale", "ScaledInput", "balance_factors", "FACTOR_RANGE"]

#: Every factor is clamped into this range.
FACTOR_RANGE: Tuple[float, float] = (1e-5, 1e5)

_NORMS = (nn.LayerNorm, nn.RMSNorm)
_CHANNEL_FIRST_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


# ----------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------
class ChannelScale(nn.Module):
    """Multiplies its input by a per-channel vector along ``dim`` (a negative axis).

    Balancing inserts it with ``inv_scale = 1 / s`` where no producer absorbs the factors,
    and with ``inv_scale = s`` to compensate a module that reads a balanced tensor. It
    exports as an ONNX ``Mul`` by a constant.

    Example:
        >>> ChannelScale(torch.tensor([1.0, 0.5]), dim=-1)(torch.ones(1, 2))
        tensor([[1.0000, 0.5000]])
    """

    def __init__(self, inv_scale: torch.Tensor, dim: int = -1) -> None:
        super().__init__()
        if dim >= 0:
            raise BalanceError(f"ChannelScale: dim must be negative (from the end), got {dim}")
        self.dim = dim
        self.register_buffer("inv_scale", torch.as_tensor(inv_scale).detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x * inv_scale`` broadcast along ``dim``."""
        shape = [1] * (-self.dim)
        shape[0] = -1
        return x * self.inv_scale.to(x.dtype).view(shape)

    def extra_repr(self) -> str:  # noqa: D102
        return f"channels={self.inv_scale.numel()}, dim={self.dim}"


class ScaledInput(nn.Module):
    """Runs ``layer`` with its ``index``-th tensor input (pytree order) passed through
    ``scale`` first; keyword arguments go to ``layer`` unchanged.

    Example:
        >>> m = ScaledInput(nn.Identity(), ChannelScale(torch.tensor([2.0])))
        >>> m(torch.ones(1, 1))
        tensor([[2.]])
    """

    def __init__(self, layer: nn.Module, scale: ChannelScale, index: int = 0) -> None:
        super().__init__()
        self.scale = scale
        self.layer = layer
        self.index = index

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Scale the chosen input, then call the wrapped layer."""
        leaves, spec = pytree.tree_flatten(args)
        seen = 0
        for j, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                if seen == self.index:
                    leaves[j] = self.scale(leaf)
                    break
                seen += 1
        return self.layer(*pytree.tree_unflatten(leaves, spec), **kwargs)


register_op_type(ChannelScale, "Mul")


# ----------------------------------------------------------------------------------------------
# the maths
# ----------------------------------------------------------------------------------------------
def balance_factors(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float = 0.5,
                    factor_range: Tuple[float, float] = FACTOR_RANGE) -> torch.Tensor:
    """``s = act_max ** alpha / weight_max ** (1 - alpha)``, per input channel.

    Channels with a zero or non-finite statistic get ``1``; the result is clamped to
    ``factor_range``. Returns float32.
    """
    a = act_max.detach().to(torch.float64)
    w = weight_max.detach().to(torch.float64)
    s = a.clamp_min(0) ** alpha / w.clamp_min(0) ** (1.0 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(a) & torch.isfinite(w) & torch.isfinite(s)
    s = torch.where(ok, s, torch.ones_like(s)).clamp(*factor_range)
    return s.to(torch.float32)


def _input_axis(module: nn.Module) -> int:
    """Channel axis (negative) of the consumer's activation input."""
    if isinstance(module, (_CONVS, nn.ConvTranspose2d)):
        return -(len(module.kernel_size) + 1)
    return -1


def _in_layout(module: nn.Module, w: torch.Tensor) -> Tuple[List[int], List[int]]:
    """(view of the weight, broadcast shape of s) such that ``w.view(v) * s.view(b)`` scales
    input channels; the input channel index is row-major over the non-1 entries of ``b``."""
    if isinstance(module, nn.Linear):
        return list(w.shape), [1, w.shape[1]]
    if isinstance(module, MatMul):
        return list(w.shape), [w.shape[0], 1]
    if isinstance(module, nn.ConvTranspose2d):
        return list(w.shape), [w.shape[0]] + [1] * (w.dim() - 1)
    g = module.groups
    k = list(w.shape[2:])
    return [g, w.shape[0] // g, w.shape[1]] + k, [g, 1, w.shape[1]] + [1] * len(k)


def _out_layout(module: nn.Module, w: torch.Tensor) -> Tuple[List[int], List[int]]:
    """As :func:`_in_layout`, for a producer's output channels (weight or bias)."""
    if w.dim() == 1 or isinstance(module, _NORMS):
        return list(w.shape), [1] * (w.dim() - 1) + [w.shape[-1]]
    if isinstance(module, _CONV_TRANSPOSES):
        g = module.groups
        k = list(w.shape[2:])
        return [g, w.shape[0] // g, w.shape[1]] + k, [g, 1, w.shape[1]] + [1] * len(k)
    return list(w.shape), [w.shape[0]] + [1] * (w.dim() - 1)


def _channel_max(w: torch.Tensor, layout: Tuple[List[int], List[int]]) -> torch.Tensor:
    view, bshape = layout
    dims = [d for d, n in enumerate(bshape) if n == 1]
    v = w.detach().abs().to(torch.float32).reshape(view)
    return (v.amax(dim=dims) if dims else v).reshape(-1)


def _rescale_(t: torch.Tensor, layout, factors: torch.Tensor) -> None:
    """``t`` *= factors along the layout's channels, in place."""
    view, bshape = layout
    f = factors.to(device=t.device, dtype=torch.float32).reshape(bshape)
    t.data.copy_((t.data.to(torch.float32).reshape(view) * f).reshape(t.shape).to(t.dtype))


# ----------------------------------------------------------------------------------------------
# producers
# ----------------------------------------------------------------------------------------------
def _producer_axis(module: nn.Module, ndim: int) -> Optional[int]:
    """Negative channel axis of the producer's output, or None if it cannot absorb factors."""
    if isinstance(module, _NORMS):
        return -1 if getattr(module, "weight", None) is not None else None
    if isinstance(module, _CHANNEL_FIRST_NORMS):
        return 1 - ndim if module.weight is not None else None
    if isinstance(module, nn.Linear):
        return -1
    if isinstance(module, _CONVS + _CONV_TRANSPOSES):
        return -(len(module.kernel_size) + 1)
    if isinstance(module, ChannelScale):
        return module.dim
    return None


def _producer_tensors(module: nn.Module) -> List[torch.Tensor]:
    if isinstance(module, ChannelScale):
        return [module.inv_scale]
    return [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]


def _producer_channels(module: nn.Module) -> int:
    if isinstance(module, ChannelScale):
        return module.inv_scale.numel()
    return int(module.weight.shape[-1] if isinstance(module, _NORMS) else
               module.weight.shape[1] * module.groups
               if isinstance(module, _CONV_TRANSPOSES) else module.weight.shape[0])


# ----------------------------------------------------------------------------------------------
# the model: names, parameters, edits with undo, float check
# ----------------------------------------------------------------------------------------------
class _Model:
    """Name lookups, in-place edits with undo, and the float check for one model."""

    def __init__(self, model: nn.Module, dummy_input: Any = None) -> None:
        self.model = model
        self.dummy_input = dummy_input
        self.undo: List[Callable[[], None]] = []
        names: Dict[int, List[str]] = {}
        for n, m in model.named_modules(remove_duplicate=False):
            names.setdefault(id(m), []).append(n)
        self.module_names = names
        params: Dict[int, List[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            params.setdefault(id(p), []).append(n)
        self.param_names = params
        self.reference = self.outputs() if dummy_input is not None else None

    def get(self, name: str) -> Optional[nn.Module]:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            return None

    def parameter(self, name: str) -> Optional[torch.Tensor]:
        owner, _, attr = name.rpartition(".")
        module = self.get(owner)
        return getattr(module, attr, None) if module is not None else None

    def scale_(self, t: torch.Tensor, layout, factors: torch.Tensor) -> None:
        saved = t.data.clone()
        self.undo.append(lambda: t.data.copy_(saved))
        _rescale_(t, layout, factors)

    def wrap(self, name: str, inv_scale: torch.Tensor, dim: int, index: int = 0) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        original = parent._modules[child]
        ref = next(iter(original.parameters()), inv_scale)
        scale = ChannelScale(inv_scale.to(torch.float32), dim).to(ref.device)
        parent._modules[child] = ScaledInput(original, scale, index)
        self.undo.append(lambda: parent._modules.__setitem__(child, original))

    def rollback(self, mark: int) -> None:
        while len(self.undo) > mark:
            self.undo.pop()()

    def outputs(self) -> List[torch.Tensor]:
        with eval_mode(self.model), torch.no_grad():
            return [t.detach().clone() for t in _tensors(run_forward(self.model,
                                                                     self.dummy_input))]

    def output_change(self) -> float:
        now = self.outputs()
        if len(now) != len(self.reference):
            return float("inf")
        worst = 0.0
        for a, b in zip(self.reference, now):
            if a.shape != b.shape:
                return float("inf")
            if not a.is_floating_point() or a.numel() == 0:
                continue
            diff = (a.double() - b.double()).abs().max().item()
            scale = max(a.double().abs().max().item(), 1e-12)
            worst = max(worst, diff / scale)
        return worst if worst == worst else float("inf")


def _tensors(obj: Any) -> List[torch.Tensor]:
    """The tensors of a model output, including mappings such as HuggingFace ModelOutput."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _check_model(model: nn.Module) -> None:
    from quantsim.wrappers import QuantizationMixin

    for name, module in model.named_modules():
        if isinstance(module, QuantizationMixin):
            raise BalanceError(
                f"{name or 'the model'} is already wrapped for quantization simulation: "
                "balance the float model first, then build QuantizationSimModel from it")
