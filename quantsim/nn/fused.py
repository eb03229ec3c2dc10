"""A layer with its BatchNorm fused in, for quantization-aware training.

During QAT the BatchNorm should keep learning its statistics, yet the weights the hardware
sees are the *folded* ones (``w * gamma / sqrt(var + eps)``). The fused modules here do what
torch.ao's intrinsic QAT modules do:

* **train mode**: scale the weight by ``gamma / sqrt(running_var + eps)``, pass it through
  ``weight_fake_quant`` (identity unless a quantizer is set), run the layer, divide the scale
  back out, add the layer's bias and run the BatchNorm with *batch* statistics (which updates
  its running statistics);
* **eval mode**: run the layer with the folded weight and bias, the same numbers the folded
  export gives;
* :meth:`~_FusedBn.fold` returns the plain layer with the folded weight and bias.

An optional activation module (``nn.ReLU``, ``nn.ReLU6``...) runs after the BatchNorm.

:func:`fold_batch_norm_` holds the folding arithmetic (computed in float64) for these modules
and for :func:`quantsim.prepare.fold_all_batch_norms`: the folded weight a fused module uses
is bit for bit the one ``fold_all_batch_norms`` writes into the layer.

**Inside a QuantizationSimModel** a fused module is one quantized module, seen by the hardware
config as its layer's op (``Conv``, ``ConvTranspose``, ``Gemm``): its ``weight`` and ``bias``
parameter quantizers act on the folded weight and bias (:meth:`_FusedBn.folded_parameters`,
passed through :meth:`_FusedBn.fake_quantize_param`, which the sim's wrapper overrides; the
folded bias only in eval mode, where it is used), and its output quantizers follow the
activation's op-type rules (``Relu``, ``Clip``). At export :func:`fold_fused_modules` puts
what :func:`quantsim.prepare.fold_all_batch_norms` makes of the chain in its place: the
folded layer under the fused module's path, and the activation back in the ``nn.Identity``
that took its place when :func:`quantsim.prepare.fuse_all_conv_bn` fused it
(:attr:`_FusedBn.activation_slot`), so the files name everything as for the folded model.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from quantsim.errors import BatchNormFoldError, UnsupportedModelError

_BN = nn.modules.batchnorm._BatchNorm
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

__all__ = ["ConvBn", "ConvTransposeBn", "LinearBn", "FoldedLayer", "fuse_conv_bn",
           "fold_batch_norm_", "check_foldable", "relative_slot", "activation_destinations",
           "fold_fused_modules", "folded_params", "fused_activation", "FUSED_MODULES"]


def _out_channel_dim(layer: nn.Module) -> int:
    """The weight dimension that indexes output channels."""
    return 1 if isinstance(layer, _CONV_T) else 0


def check_foldable(layer: nn.Module, bn: nn.Module) -> None:
    """Raise if ``bn`` cannot be folded into ``layer``.

    Raises:
        UnsupportedModelError: not a conv/linear + BatchNorm pair, a grouped transposed
            convolution, a BatchNorm without running statistics, or a channel mismatch.
    """
    if not isinstance(layer, _CONV + _CONV_T + (nn.Linear,)):
        raise UnsupportedModelError(
            f"cannot fold BatchNorm into {type(layer).__name__}: only Conv1d/2d/3d, "
            "ConvTranspose1d/2d/3d and Linear layers take a folded BatchNorm")
    if not isinstance(bn, _BN):
        raise UnsupportedModelError(f"{type(bn).__name__} is not a BatchNorm module")
    if isinstance(layer, _CONV_T) and layer.groups != 1:
        raise UnsupportedModelError(
            f"cannot fold BatchNorm into a grouped {type(layer).__name__} "
            f"(groups={layer.groups}); keep the BatchNorm")
    if not bn.track_running_stats or bn.running_var is None:
        raise UnsupportedModelError(
            "cannot fold a BatchNorm built with track_running_stats=False: it always uses "
            "batch statistics")
    channels = layer.weight.shape[_out_channel_dim(layer)] * (
        layer.groups if isinstance(layer, _CONV_T) else 1)
    if channels != bn.num_features:
        raise UnsupportedModelError(
            f"{type(layer).__name__} has {channels} output channels but the BatchNorm "
            f"normalises {bn.num_features}")


def check_statistics(bn: nn.Module, name: str) -> None:
    """Raise if folding ``bn`` would give inf or NaN: ``running_var + eps`` must be a finite
    number > 0 and ``running_mean`` finite in every channel (``var = 0`` with ``eps = 0``, a
    dead channel of a BatchNorm built with ``eps=0``, divides by zero).

    Raises:
        BatchNormFoldError: naming ``name``, the channels and the values.
    """
    denominator = bn.running_var.double() + bn.eps
    bad = ~(torch.isfinite(denominator) & (denominator > 0)) | ~torch.isfinite(bn.running_mean)
    if bool(bad.any()):  # one device sync; callers run it once per fold, not per step
        channels = bad.nonzero().flatten().tolist()
        raise BatchNormFoldError(
            f"{name} ({type(bn).__name__}): cannot fold its statistics: running_var + eps = "
            f"{denominator[channels[0]].item():g} and running_mean = "
            f"{bn.running_mean[channels[0]].item():g} in channel {channels[0]} (eps = {bn.eps:g}; "
            f"{len(channels)} channel(s) affected: {channels[:8]}); the folded weight would be "
            "inf or NaN. Give the BatchNorm eps > 0 (PyTorch's default is 1e-05) or repair its "
            "running statistics")


def _bn_scale_shift(bn: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(gamma / sqrt(var + eps), beta - mean * scale)`` in float64 (differentiable in the
    affine parameters; the running statistics are buffers)."""
    var = bn.running_var.double()
    mean = bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def _view_for_weight(vec: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    shape = [1] * layer.weight.dim()
    shape[_out_channel_dim(layer)] = -1
    return vec.reshape(shape)


def _folded(layer: nn.Module, bn: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of ``layer`` with ``bn`` folded in, computed in float64 and rounded
    once to the layer's dtype (the bias to the layer bias's, or the weight's without one).
    Differentiable in the layer's and the BatchNorm's parameters."""
    scale, shift = _bn_scale_shift(bn)
    weight = layer.weight.double() * _view_for_weight(scale, layer)
    bias = shift if layer.bias is None else layer.bias.double() * scale + shift
    bias_dtype = layer.weight.dtype if layer.bias is None else layer.bias.dtype
    return weight.to(layer.weight.dtype), bias.to(bias_dtype)


def fold_batch_norm_(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` (its running statistics) into ``layer``'s weight and bias, in place.

    After this, ``layer(x)`` equals ``bn.eval()(layer_before(x))``. A missing bias is created.

    Args:
        layer: a Conv1d/2d/3d, non-grouped ConvTranspose1d/2d/3d or Linear.
        bn: the BatchNorm that followed it.

    Raises:
        UnsupportedModelError: see :func:`check_foldable`.
        BatchNormFoldError: statistics that give no finite fold (:func:`check_statistics`).
    """
    check_foldable(layer, bn)
    check_statistics(bn, "the BatchNorm given to fold_batch_norm_")
    with torch.no_grad():
        weight, bias = _folded(layer, bn)
        layer.weight.copy_(weight)
        if layer.bias is None:
            layer.bias = nn.Parameter(bias)
        else:
            layer.bias.copy_(bias)


def _run_layer(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``layer``'s op on ``x`` with the given weight and bias (its hyper-parameters)."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(layer, _CONV_T):
        return F.__dict__[f"conv_transpose{layer.weight.dim() - 2}d"](
            x, weight, bias, layer.stride, layer.padding, layer.output_padding,
            layer.groups, layer.dilation)
    return layer._conv_forward(x, weight, bias)


class _FusedBn(nn.Module):
    """A layer, its BatchNorm and an optional activation, trained as one folded layer.

    Args:
        layer: the conv / linear layer (its ``weight`` and ``bias`` stay the float ones).
        bn: the BatchNorm after it; its statistics keep updating in train mode.
        activation: an optional module applied last.

    Attributes:
        weight_fake_quant: called on the folded weight before use (identity by default);
            torch.ao-style QAT puts a fake-quant module here. Inside a QuantizationSimModel
            the sim's own weight quantizer is used instead (:meth:`fake_quantize_param`).
        activation_slot: where the activation was before it moved in, relative to this
            module's path (see :func:`relative_slot`); set by
            :func:`quantsim.prepare.fuse_all_conv_bn`, None otherwise. Export puts the
            activation back there (:func:`fold_fused_modules`).
    """

    def __init__(self, layer: nn.Module, bn: nn.Module,
                 activation: Optional[nn.Module] = None) -> None:
        super().__init__()
        check_foldable(layer, bn)
        self.layer, self.bn = layer, bn
        self.activation = activation if activation is not None else nn.Identity()
        self.weight_fake_quant: Callable[[torch.Tensor], torch.Tensor] = _identity
        self.activation_slot: Optional[Tuple[int, str]] = None

    @property
    def weight(self) -> torch.Tensor:
        """The layer's (unfolded) weight."""
        return self.layer.weight

    def folded_parameters(self) -> Dict[str, torch.Tensor]:
        """``{'weight': ..., 'bias': ...}`` with the BatchNorm's running statistics folded in,
        bit-identical to what :func:`fold_batch_norm_` would write into the layer.

        Differentiable in the layer's and the BatchNorm's parameters. Without grad mode the
        tensors are computed once and reused until a source tensor changes (in place, by
        version counter, or by identity); then they are updated in place. Like parameters,
        they keep their identity and their version counter tells a change, which the sim's
        caches (the quantized weight, calibration) key on. ``torch.jit.trace`` always records
        the fold (a reused tensor would enter the graph as a constant).

        Raises:
            BatchNormFoldError: (without grad mode, where the statistics are checked once per
                change) statistics that give no finite fold, see :func:`check_statistics`.
        """
        if torch.is_grad_enabled() or torch.jit.is_tracing():
            weight, bias = _folded(self.layer, self.bn)
            return {"weight": weight, "bias": bias}
        # BatchNorm's kernel updates the running statistics without moving their version
        # counters; the batch counter it increments alongside tells that they changed
        sources = tuple(t for t in (self.layer.weight, self.layer.bias, self.bn.weight,
                                    self.bn.bias, self.bn.running_mean, self.bn.running_var,
                                    self.bn.num_batches_tracked) if t is not None)
        key = tuple((id(t), t._version, t.data_ptr()) for t in sources) + (self.bn.eps,)
        cached = self.__dict__.get("_folded_cache")
        if cached is None or cached[0] != key:
            # plain tensors even under inference_mode, so that their version counters work
            # (leaving inference mode turns grad mode on: off again)
            with torch.inference_mode(False), torch.no_grad():
                check_statistics(self.bn, f"the BatchNorm of this {type(self).__name__}")
                folded = dict(zip(("weight", "bias"), _folded(self.layer, self.bn)))
                if cached is not None and all(_same_layout(cached[1][k], t)
                                              for k, t in folded.items()):
                    # updated in place, like a parameter: same tensor, its version moves on
                    for k, t in folded.items():
                        cached[1][k].copy_(t)
                    folded = cached[1]
            # the entry holds the sources, so no id in its key can be reused meanwhile
            cached = (key, folded, sources)
            self.__dict__["_folded_cache"] = cached
        return dict(cached[1])

    def fake_quantize_param(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The folded ``weight`` / ``bias`` as the layer uses it: ``weight_fake_quant`` applied
        to the weight, the bias unchanged. A QuantizationSimModel's wrapper replaces this with
        its parameter quantizers of the same names."""
        return self.weight_fake_quant(tensor) if name == "weight" else tensor

    def _scale(self) -> torch.Tensor:
        return _bn_scale_shift(self.bn)[0].to(self.layer.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Folded layer in eval mode; layer + batch-statistics BatchNorm in train mode."""
        folded = self.folded_parameters()
        weight = self.fake_quantize_param("weight", folded["weight"])
        if not self.training:
            bias = self.fake_quantize_param("bias", folded["bias"])
            return self.activation(_run_layer(self.layer, x, weight, bias))
        y = _run_layer(self.layer, x, weight, None)
        channel_shape = [1] * y.dim()
        channel_shape[1] = -1
        y = y / self._scale().reshape(channel_shape)
        if self.layer.bias is not None:
            y = y + self.layer.bias.reshape(channel_shape)
        return self.activation(self.bn(y))

    def folded_layer(self) -> nn.Module:
        """A copy of the layer with the BatchNorm folded in (the activation not included)."""
        layer = copy.deepcopy(self.layer)
        fold_batch_norm_(layer, self.bn)
        return layer

    def fold(self) -> nn.Module:
        """The plain layer with the BatchNorm folded in (a copy), followed by the activation
        if there is one (then an ``nn.Sequential(layer, activation)``)."""
        layer = self.folded_layer()
        if isinstance(self.activation, nn.Identity):
            return layer
        return nn.Sequential(layer, copy.deepcopy(self.activation))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_folded_cache", None)  # derived tensors: not saved, not deep-copied
        return state


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


class ConvBn(_FusedBn):
    """Conv1d/2d/3d + BatchNorm (+ activation) for QAT; see :mod:`quantsim.nn.fused`.

    Example:
        >>> conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        >>> fused = ConvBn(conv, bn, nn.ReLU())
        >>> y = fused(torch.randn(2, 3, 8, 8))        # train mode: bn statistics update
        >>> folded = fused.eval().fold()               # nn.Sequential(conv, relu)
        >>> x = torch.randn(1, 3, 8, 8)
        >>> torch.allclose(folded(x), fused(x), atol=1e-5)
        True
    """


class ConvTransposeBn(_FusedBn):
    """Non-grouped ConvTranspose1d/2d/3d + BatchNorm (+ activation) for QAT."""


class LinearBn(_FusedBn):
    """Linear + BatchNorm1d (+ activation) for QAT (the Linear output must be ``(N, C)``)."""


def fuse_conv_bn(layer: nn.Module, bn: nn.Module,
                 activation: Optional[nn.Module] = None) -> _FusedBn:
    """The fused QAT module for ``layer`` followed by ``bn`` (and ``activation``).

    Args:
        layer: Conv1d/2d/3d, non-grouped ConvTranspose1d/2d/3d or Linear.
        bn: the BatchNorm that consumes the layer's output.
        activation: e.g. ``nn.ReLU()`` or ``nn.ReLU6()``; None for none.

    Returns:
        A :class:`ConvBn`, :class:`ConvTransposeBn` or :class:`LinearBn` sharing the given
        modules (not copies) and in ``layer``'s training mode.

    Raises:
        UnsupportedModelError: the pair cannot be folded (see :func:`check_foldable`).
    """
    cls = LinearBn if isinstance(layer, nn.Linear) else (
        ConvTransposeBn if isinstance(layer, _CONV_T) else ConvBn)
    return cls(layer, bn, activation).train(layer.training)


def folded_params(module: _FusedBn) -> Dict[str, torch.Tensor]:
    """The parameters a fused module's op takes: its folded weight and bias, without autograd
    (registered as the ``params`` function of the fused classes,
    :func:`quantsim.op_types.params_of`; the forward folds with gradients itself)."""
    with torch.no_grad():
        return module.folded_parameters()


def fused_activation(module: _FusedBn) -> Optional[nn.Module]:
    """The activation that produces a fused module's output, or None without one (registered
    as the ``output_op`` function, :func:`quantsim.op_types.output_types_of`)."""
    return None if isinstance(module.activation, nn.Identity) else module.activation


#: fused class -> (ONNX op types, data movement), registered by ``quantsim.nn`` with
#: :func:`folded_params` and :func:`fused_activation`
FUSED_MODULES = {
    ConvBn: (("Conv",), False),
    ConvTransposeBn: (("ConvTranspose",), False),
    LinearBn: (("Gemm", "MatMul"), False),
}


# ----------------------------------------------------------------------------------------------
# the folded form, for export
# ----------------------------------------------------------------------------------------------
def relative_slot(layer_path: str, activation_path: str) -> Tuple[int, str]:
    """Where ``activation_path`` lies seen from ``layer_path`` (both module paths in one model):
    ``(up, rel)``, the activation being ``rel`` under the ancestor ``up`` levels above the
    layer. Stored as :attr:`_FusedBn.activation_slot`, it survives the model being nested
    in another (the sim's paths get a prefix).

    Example:
        >>> relative_slot("features.0", "features.2"), relative_slot("block.conv", "relu")
        ((1, '2'), (2, 'relu'))
    """
    layer, act = layer_path.split("."), activation_path.split(".")
    common = 0
    while common < len(layer) - 1 and common < len(act) and layer[common] == act[common]:
        common += 1
    return len(layer) - common, ".".join(act[common:])


class FoldedLayer(nn.Module):
    """A conv / linear layer with its BatchNorm folded in, then an activation: the export form
    of a fused module whose activation has no place of its own in the model (a fused module
    built by hand rather than by :func:`quantsim.prepare.fuse_all_conv_bn`).

    ``weight`` and ``bias`` are its own parameters, so they keep the fused module's path
    (``<path>.weight``); ``activation`` is a submodule.

    Args:
        layer: the folded layer; its hyper-parameters (stride, padding...) are used, its
            parameters become this module's.
        activation: the module applied to the layer's output.
    """

    def __init__(self, layer: nn.Module, activation: nn.Module) -> None:
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        self.activation = activation
        self.__dict__["_layer"] = layer  # for its hyper-parameters; not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``activation(layer(x))`` with this module's weight and bias."""
        return self.activation(_run_layer(self._layer, x, self.weight, self.bias))


def _fused_modules(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _FusedBn)]


def activation_destinations(model: nn.Module) -> Dict[str, str]:
    """Fused-module path -> the path of the ``nn.Identity`` its activation goes back to at
    export, for the fused modules of ``model`` whose :attr:`~_FusedBn.activation_slot` still
    names an ``nn.Identity`` (no other fused module claims)."""
    out: Dict[str, str] = {}
    for name, module in _fused_modules(model):
        slot = module.activation_slot
        if slot is None or fused_activation(module) is None or not name:
            continue
        parts = name.split(".")
        up, rel = slot
        if up > len(parts):
            continue
        dest = ".".join(parts[:len(parts) - up] + rel.split("."))
        try:
            target = model.get_submodule(dest)
        except AttributeError:
            continue
        if type(target) is nn.Identity and dest not in out.values():
            out[name] = dest
    return out


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)


def fold_fused_modules(model: nn.Module) -> nn.Module:
    """Replace every fused module of ``model`` by its folded form, in place: the folded layer
    under the fused module's path and the activation back in its slot
    (:func:`activation_destinations`), or a :class:`FoldedLayer` where it has none.

    Returns:
        ``model``, or its folded form when ``model`` itself is a fused module.
    """
    destinations = activation_destinations(model)
    for name, module in _fused_modules(model):
        activation = fused_activation(module)
        layer = module.folded_layer()
        if name in destinations:
            _replace(model, destinations[name], activation)
        elif activation is not None:
            layer = FoldedLayer(layer, activation)
        if not name:
            return layer
        _replace(model, name, layer)
    return model
