"""Multi-head attention built from quantizable modules.

``nn.MultiheadAttention`` computes its projections, its two matrix products and its softmax
inside one fused call (``F.multi_head_attention_forward``), so a module-level quantizer
cannot reach them. :class:`QuantizableMultiheadAttention` computes the same thing with
``nn.Linear`` projections, :class:`~quantsim.nn.MatMul` products, a :class:`~quantsim.nn.Mul`
for the ``1/sqrt(head_dim)`` scale, an :class:`AttentionMaskAdd` for the mask and an
``nn.Softmax``, each a module a wrapper can quantize. Float outputs match
``nn.MultiheadAttention`` to float rounding (1e-5).

:func:`replace_multihead_attention` swaps every ``nn.MultiheadAttention`` of a model in place;
``nn.TransformerEncoderLayer`` / ``DecoderLayer`` then call the new module (their fused
inference fast path is turned off by ``_qkv_same_embed_dim = False``, as for any attention with
separate q/k/v projections).

The helpers :func:`attention_mask_to_bias` and :func:`causal_attention_bias` turn masks into the
additive float bias that :class:`AttentionMaskAdd` (an ``Add`` simulated as a select)
takes; ``quantsim.prepare`` uses them too when it decomposes ``F.scaled_dot_product_attention``.
"""
from __future__ import annotations

import math
import functools
import itertools
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import fx, nn

from quantsim.nn.elementwise import Add, Concat, MatMul, Mul

__all__ = [
    "QuantizableMultiheadAttention", "replace_multihead_attention", "attention_mask_to_bias",
    "causal_attention_bias", "AttentionMaskAdd", "attention_scale", "repeat_kv_heads",
    "graph_function",
]


def graph_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Make ``fn`` a single call in a torch.fx graph when it is traced with proxies (as when
    a prepared GraphModule is unpickled), instead of tracing into it."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for value in itertools.chain(args, kwargs.values()):
            if isinstance(value, fx.Proxy):
                return value.tracer.create_proxy("call_function", wrapper, args, kwargs)
        return fn(*args, **kwargs)
    return wrapper


@graph_function
def attention_mask_to_bias(mask: Optional[torch.Tensor],
                           like: Union[torch.dtype, torch.Tensor]) -> torch.Tensor:
    """An additive float bias from an attention mask.

    Args:
        mask: a bool mask (``True`` = may attend, as ``F.scaled_dot_product_attention`` reads
            it), a float mask that is already additive, or None (no mask).
        like: the float dtype of the attention scores, or a tensor of that dtype.

    Returns:
        ``mask`` itself when it is a float mask; for a bool mask 0 where it is True and
        ``-inf`` where it is False; for None a scalar 0 (adding it changes nothing).
    """
    dtype = like.dtype if isinstance(like, torch.Tensor) else like
    if mask is None:
        device = like.device if isinstance(like, torch.Tensor) else None
        return torch.zeros((), dtype=dtype, device=device)
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        mask.logical_not(), float("-inf"))


@graph_function
def attention_scale(query: torch.Tensor) -> float:
    """``1 / sqrt(E)`` for queries of feature size ``E``: the default of
    ``F.scaled_dot_product_attention``."""
    return 1.0 / math.sqrt(query.size(-1))


@graph_function
def repeat_kv_heads(x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Repeat the heads of a key/value ``(..., Hkv, S, E)`` to the query's head count
    (grouped-query attention, ``enable_gqa=True``)."""
    repeats = query.size(-3) // x.size(-3)
    return x if repeats == 1 else x.repeat_interleave(repeats, dim=-3)


@graph_function
def causal_attention_bias(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The additive bias of a causal (lower-left aligned) mask for ``query @ key^T``.

    Args:
        query: ``(..., L, E)``.
        key: ``(..., S, E)``.

    Returns:
        An ``(L, S)`` tensor, 0 where ``j <= i`` and ``-inf`` above that diagonal.
    """
    length, source = query.size(-2), key.size(-2)
    allowed = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
    return attention_mask_to_bias(allowed, query.dtype)


class AttentionMaskAdd(Add):
    """``scores + mask`` where ``mask`` is an additive attention mask (0, or ``-inf`` / a large
    negative number where a position is masked): ONNX ``Add``, simulated as the select a
    runtime applies.

    A grid cannot hold ``-inf`` (calibration leaves infinities out, so an all-0/-inf mask
    calibrates to the grid ``[0, 0]`` and ``-inf`` fake-quantizes to 0, which unmasks every
    masked position), and a large negative value takes the whole grid and rounds the real
    scores away. Runtimes keep masks in float or apply them as a select, so the placement
    rules (:mod:`quantsim.placement`) give the inputs in :attr:`mask_inputs` no quantizer and
    the output none either: it is input 0 (quantized by its producer) where the mask is 0,
    and masked where it is not, so the softmax after it gives masked positions weight 0.
    A bias that is not a mask (ALiBi passed as ``attn_mask``) is thereby added in float too.
    """

    #: inputs that are additive masks (read by :mod:`quantsim.placement`)
    mask_inputs: Tuple[int, ...] = (1,)


def _padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bias from an ``nn.MultiheadAttention``-style mask (bool ``True`` = do *not* attend)."""
    if mask.dtype == torch.bool:
        return attention_mask_to_bias(mask.logical_not(), dtype)
    return mask.to(dtype)


class QuantizableMultiheadAttention(nn.Module):
    """Drop-in ``nn.MultiheadAttention`` whose every op is a module.

    Same constructor and ``forward`` as ``nn.MultiheadAttention``. Submodules: ``q_proj``,
    ``k_proj``, ``v_proj``, ``out_proj`` (``nn.Linear``), ``scale`` (``Mul``, ``q / sqrt(d)``),
    ``qk_matmul`` and ``av_matmul`` (``MatMul``), ``mask_add`` (``AttentionMaskAdd``), ``softmax``
    (``nn.Softmax``), ``attn_dropout`` (``nn.Dropout``) and, with ``add_bias_kv`` /
    ``add_zero_attn``, ``k_concat`` / ``v_concat`` (``Concat``).

    Args:
        embed_dim: model dimension ``E``.
        num_heads: number of heads; must divide ``embed_dim``.
        dropout: dropout probability on the attention weights (training only).
        bias: add biases to the projections.
        add_bias_kv: append learned ``bias_k`` / ``bias_v`` rows to key and value.
        add_zero_attn: append a zero row to key and value.
        kdim: key feature size (default ``embed_dim``).
        vdim: value feature size (default ``embed_dim``).
        batch_first: inputs are ``(N, L, E)`` instead of ``(L, N, E)``.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Example:
        >>> mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
        >>> qmha = QuantizableMultiheadAttention.from_float(mha)
        >>> x = torch.randn(3, 5, 8)
        >>> torch.allclose(qmha(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
        True
    """

    #: q, k and v have their own projections (also keeps ``nn.Transformer*Layer`` off their
    #: fused fast path, which would bypass this module).
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False,
                 kdim: Optional[int] = None, vdim: Optional[int] = None,
                 batch_first: bool = False, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(
                f"QuantizableMultiheadAttention: embed_dim ({embed_dim}) must be a positive "
                f"multiple of num_heads ({num_heads})"
            )
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.head_dim = embed_dim // num_heads
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)
        else:
            self.bias_k = self.bias_v = None
        if add_bias_kv or add_zero_attn:
            self.k_concat, self.v_concat = Concat(dim=1), Concat(dim=1)
        self.scale = Mul()
        self.qk_matmul = MatMul()
        self.mask_add = AttentionMaskAdd()
        self.softmax = nn.Softmax(dim=-1)
        self.attn_dropout = nn.Dropout(dropout)
        self.av_matmul = MatMul()

    # ``nn.MultiheadAttention`` attributes that code around it (Transformer layers) reads.
    @property
    def in_proj_weight(self) -> None:
        """Always None: the projections are separate (``q_proj``, ``k_proj``, ``v_proj``)."""
        return None

    @property
    def in_proj_bias(self) -> Optional[torch.Tensor]:
        """The q, k and v biases concatenated (a copy), or None without biases."""
        if self.q_proj.bias is None:
            return None
        return torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]).detach()

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention) -> "QuantizableMultiheadAttention":
        """Build the equivalent module from an ``nn.MultiheadAttention`` (weights copied).

        Args:
            mha: the float module; its packed ``in_proj_weight`` is split into q, k, v.

        Returns:
            A new module on the same device, dtype and training mode.
        """
        ref = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout,
                  bias=mha.in_proj_bias is not None, add_bias_kv=mha.bias_k is not None,
                  add_zero_attn=mha.add_zero_attn, kdim=mha.kdim, vdim=mha.vdim,
                  batch_first=mha.batch_first, device=ref.device, dtype=ref.dtype)
        if mha.in_proj_weight is not None:
            weights = mha.in_proj_weight.detach().chunk(3)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(),
                       mha.v_proj_weight.detach())
        biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.detach().chunk(3)
        with torch.no_grad():
            for proj, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
                proj.weight.copy_(w)
                if b is not None:
                    proj.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
            if mha.bias_k is not None:
                new.bias_k.copy_(mha.bias_k)
                new.bias_v.copy_(mha.bias_v)
        return new.train(mha.training)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, S, E)`` -> ``(N, H, S, E/H)``."""
        return x.view(x.size(0), x.size(1), self.num_heads, self.head_dim).transpose(1, 2)

    def _extend_kv(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Append ``bias_k``/``bias_v`` and/or a zero row along the sequence (dim 1)."""
        ks, vs = [k], [v]
        if self.bias_k is not None:
            ks.append(self.bias_k.expand(k.size(0), 1, -1))
            vs.append(self.bias_v.expand(v.size(0), 1, -1))
        if self.add_zero_attn:
            ks.append(k.new_zeros(k.size(0), 1, k.size(2)))
            vs.append(v.new_zeros(v.size(0), 1, v.size(2)))
        return self.k_concat(*ks), self.v_concat(*vs)

    def _bias(self, attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
              is_causal: bool, q: torch.Tensor, k: torch.Tensor,
              extra: int) -> Optional[torch.Tensor]:
        """One additive bias broadcastable to ``(N, H, L, S)``, or None."""
        batch, source = q.size(0), k.size(2) - extra
        bias = None
        if attn_mask is not None:
            bias = _padding_bias(attn_mask, q.dtype)
            if bias.dim() == 3:
                bias = bias.view(batch, self.num_heads, bias.size(-2), bias.size(-1))
        elif is_causal:
            bias = causal_attention_bias(q, k[..., :source, :])
        if key_padding_mask is not None:
            pad = _padding_bias(key_padding_mask, q.dtype).view(batch, 1, 1, source)
            bias = pad if bias is None else bias + pad
        if bias is not None and extra:
            bias = nn.functional.pad(bias, (0, extra))
        return bias

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Attention as ``nn.MultiheadAttention.forward`` computes it.

        ``is_causal`` without ``attn_mask`` applies a causal mask (``nn.MultiheadAttention``
        refuses that combination); with ``attn_mask`` the mask is used as given.

        Returns:
            ``(attn_output, attn_weights)``; ``attn_weights`` is None unless ``need_weights``,
            averaged over heads if ``average_attn_weights``.
        """
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
            if attn_mask is not None and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        k, v = self.k_proj(key), self.v_proj(value)
        extra = int(self.bias_k is not None) + int(self.add_zero_attn)
        if extra:
            k, v = self._extend_kv(k, v)
        q = self._heads(self.scale(self.q_proj(query), math.sqrt(1.0 / self.head_dim)))
        k, v = self._heads(k), self._heads(v)
        scores = self.qk_matmul(q, k.transpose(-2, -1))
        bias = self._bias(attn_mask, key_padding_mask, is_causal, q, k, extra)
        if bias is not None:
            scores = self.mask_add(scores, bias)
        weights = self.attn_dropout(self.softmax(scores))
        out = self.av_matmul(weights, v).transpose(1, 2)
        out = self.out_proj(out.reshape(out.size(0), out.size(1), self.embed_dim))
        if not batched:
            out, weights = out.squeeze(0), weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=-3) if average_attn_weights else weights


def replace_multihead_attention(model: nn.Module) -> nn.Module:
    """Swap every ``nn.MultiheadAttention`` in ``model`` for :class:`QuantizableMultiheadAttention`.

    Works in place (the same object is returned). ``nn.TransformerEncoder`` stacks that held a
    replaced layer stop using nested tensors, which only the fused path understands.

    Args:
        model: any module; a bare ``nn.MultiheadAttention`` is returned converted.

    Returns:
        ``model`` (or the converted module when ``model`` itself is an attention module).
    """
    if type(model) is nn.MultiheadAttention:
        return QuantizableMultiheadAttention.from_float(model)
    converted: Dict[int, QuantizableMultiheadAttention] = {}  # one per module, however reached
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.MultiheadAttention:
                if id(child) not in converted:
                    converted[id(child)] = QuantizableMultiheadAttention.from_float(child)
                setattr(parent, name, converted[id(child)])
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
    return model
