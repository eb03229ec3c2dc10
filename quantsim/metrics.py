"""How far a quantized model is from its float model: SQNR and cosine similarity.

Two layers:

* plain functions on tensors: :func:`squared_sums` (the float64 sums SQNR is made of, so
  batches and tensors can be pooled), :func:`sqnr_from_sums`, :func:`sqnr_db` and
  :func:`cosine_rows`;
* ready evaluation callbacks for :class:`quantsim.quant_analyzer.QuantAnalyzer` and mixed
  precision, which call them with the model and want a number where larger is better:
  :class:`OutputSQNR` (SQNR of the model's outputs against the float model's, in dB) and
  :class:`EmbeddingCosine` (mean or min cosine of per-sample embeddings against the float
  model's). Both run the float model once, when built, and keep its outputs.

Example:
    >>> import torch
    >>> float_model = torch.nn.Linear(4, 3)
    >>> batches = [torch.randn(8, 4) for _ in range(2)]
    >>> metric = OutputSQNR(float_model, batches)
    >>> metric(float_model)   # the float model against itself: no noise
    inf
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, List, Optional, Tuple

import torch
from torch import nn

from quantsim.checks import require_module
from quantsim.errors import AnalysisError
from quantsim.graph import eval_mode, float_leaves, split_dummy_input

__all__ = ["EmbeddingCosine", "OutputSQNR", "cosine_rows", "run_batch", "sqnr_db",
           "sqnr_from_sums", "squared_sums"]


# -- arithmetic ---------------------------------------------------------------------------------
def squared_sums(reference: torch.Tensor, test: torch.Tensor) -> Tuple[float, float]:
    """``(sum reference^2, sum (reference - test)^2)``, squared and summed in float64.

    The difference is taken in the tensors' dtype (float32 at least), which keeps the cost at
    one temporary: its rounding changes the noise sum by at most ``2^-23`` relative (about
    4e-7 dB of SQNR). Sums of several tensors or batches add up, so :func:`sqnr_from_sums` of
    the totals is the SQNR of everything pooled (not a mean of per-batch decibels).

    Raises:
        AnalysisError: the shapes differ.
    """
    if reference.shape != test.shape:
        raise AnalysisError(f"squared_sums: shapes differ, reference {tuple(reference.shape)} "
                            f"vs test {tuple(test.shape)}")
    ref = reference.detach()
    if ref.dtype not in (torch.float32, torch.float64):
        ref = ref.float()
    diff = ref - test.detach().to(ref.dtype)
    # vector_norm squares and sums in float64 without a float64 copy of the tensor
    return (float(torch.linalg.vector_norm(ref, dtype=torch.float64)) ** 2,
            float(torch.linalg.vector_norm(diff, dtype=torch.float64)) ** 2)


def sqnr_from_sums(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)`` in dB: ``inf`` without noise, ``-inf`` for a zero signal
    with noise."""
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``reference`` in dB:
    ``10 log10(sum reference^2 / sum (reference - test)^2)`` (:func:`squared_sums`).

    Example:
        >>> round(sqnr_db(torch.tensor([1.0, 1.0]), torch.tensor([1.1, 0.9])), 3)
        20.0
    """
    return sqnr_from_sums(*squared_sums(reference, test))


def cosine_rows(reference: torch.Tensor, test: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Cosine similarity of each sample (dimension 0; the rest flattened), float64 ``(N,)``.

    Two all-zero rows count as identical (1.0); a zero row against a non-zero one as 0.0.

    Raises:
        AnalysisError: the shapes differ or the tensors are 0-d.
    """
    if reference.shape != test.shape or reference.dim() == 0:
        raise AnalysisError(f"cosine_rows: need two tensors of one shape with a batch "
                            f"dimension, got {tuple(reference.shape)} and {tuple(test.shape)}")
    a = reference.detach().double().reshape(reference.shape[0], -1)
    b = test.detach().double().reshape(test.shape[0], -1)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    cos = (a * b).sum(dim=1) / (na * nb).clamp_min(eps)
    both_zero = (na == 0) & (nb == 0)
    return torch.where(both_zero, torch.ones_like(cos), cos.clamp(-1.0, 1.0))


# -- running a model on a batch -----------------------------------------------------------------
def run_batch(model: nn.Module, batch: Any) -> Any:
    """``model`` called on ``batch`` as the sim calls it on ``dummy_input`` (a tuple spreads
    over the positional arguments, a dict of ``forward``'s parameter names is its keyword
    arguments; :func:`quantsim.graph.split_dummy_input`)."""
    args, kwargs = split_dummy_input(model, batch)
    return model(*args, **kwargs)


def _first_float(output: Any, where: str) -> torch.Tensor:
    leaves = float_leaves(output)
    if not leaves:
        raise AnalysisError(f"{where}: the model output holds no floating-point tensor "
                            f"(got {type(output).__name__}); pass embed=... to pick one")
    return leaves[0]


def _default_embed(model: nn.Module, batch: Any) -> torch.Tensor:
    return _first_float(run_batch(model, batch), "EmbeddingCosine")


def _check_batches(batches: Any, where: str) -> list:
    """The batches as a list (they are run once per call, so a one-shot iterator is refused)."""
    if isinstance(batches, (torch.Tensor, dict, str, bytes)) or not isinstance(batches, Iterable):
        raise AnalysisError(f"{where}: batches must be a list (or other re-iterable collection) "
                            f"of model inputs, got {type(batches).__name__}; wrap a single "
                            "batch in a list")
    if iter(batches) is batches:
        raise AnalysisError(f"{where}: batches is a one-shot iterator ({type(batches).__name__})"
                            "; every evaluation runs them again, pass a list")
    batches = list(batches)
    if not batches:
        raise AnalysisError(f"{where}: batches is empty")
    return batches


# -- evaluation callbacks -----------------------------------------------------------------------
class OutputSQNR:
    """Evaluation callback: SQNR (dB) of a model's outputs against the float model's, pooled
    over every batch and every floating-point output tensor. Larger is better; ``inf`` when
    equal.

    Args:
        float_model: the reference; run once here (eval mode, no grad), outputs kept.
        batches: model inputs (a list; each passed as :func:`run_batch` does).

    Raises:
        UnsupportedModelError: ``float_model`` is not a module.
        AnalysisError: empty or one-shot ``batches``; later, an evaluated model whose outputs
            differ in number or shape from the float model's.
    """

    def __init__(self, float_model: nn.Module, batches: Iterable[Any]) -> None:
        require_module(float_model, "OutputSQNR(float_model=...)")
        self.batches = _check_batches(batches, "OutputSQNR")
        self.reference = [float_leaves(out) for out in _run_all(float_model, self.batches)]

    def __call__(self, model: nn.Module, _args: Any = None) -> float:
        """SQNR in dB of ``model``'s outputs on the batches (also callable as ``(model, args)``,
        as aimet-torch calls its callbacks)."""
        signal = noise = 0.0
        for ref, out in zip(self.reference, _run_all(model, self.batches)):
            test = float_leaves(out)
            if len(test) != len(ref):
                raise AnalysisError(f"OutputSQNR: the model returned {len(test)} float tensors, "
                                    f"the float model {len(ref)}")
            for r, t in zip(ref, test):
                s, n = squared_sums(r, t.to(r.device))
                signal, noise = signal + s, noise + n
        return sqnr_from_sums(signal, noise)


class EmbeddingCosine:
    """Evaluation callback: cosine similarity of per-sample embeddings with the float model's,
    reduced over all samples of all batches (``'mean'`` or ``'min'``). Larger is better, 1.0
    when equal.

    Args:
        float_model: the reference; run once here (eval mode, no grad), embeddings kept.
        batches: model inputs (a list).
        embed: ``embed(model, batch) -> (N, ...)`` tensor of the batch's embeddings; by default
            the first floating-point tensor of ``model``'s output. A pipeline that pools
            (sentence-transformers' mean pooling over the attention mask) passes its own.
        reduction: ``'mean'`` or ``'min'`` over samples.

    Raises:
        UnsupportedModelError: ``float_model`` is not a module.
        AnalysisError: empty or one-shot ``batches``, an unknown ``reduction``, a non-callable
            ``embed``; later, embeddings of another shape than the float model's.
    """

    REDUCTIONS = ("mean", "min")

    def __init__(self, float_model: nn.Module, batches: Iterable[Any],
                 embed: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
                 reduction: str = "mean") -> None:
        require_module(float_model, "EmbeddingCosine(float_model=...)")
        if reduction not in self.REDUCTIONS:
            raise AnalysisError(f"EmbeddingCosine: reduction must be one of {self.REDUCTIONS}, "
                                f"got {reduction!r}")
        if embed is not None and not callable(embed):
            raise AnalysisError(f"EmbeddingCosine: embed must be a callable (model, batch) -> "
                                f"tensor, got {type(embed).__name__}")
        self.batches = _check_batches(batches, "EmbeddingCosine")
        self.embed = embed or _default_embed
        self.reduction = reduction
        self.reference = self._embeddings(float_model)

    def cosines(self, model: nn.Module) -> torch.Tensor:
        """Every sample's cosine with the float embedding, float64 ``(samples,)``."""
        test = self._embeddings(model)
        return torch.cat([cosine_rows(r, t.to(r.device)) for r, t in zip(self.reference, test)])

    def __call__(self, model: nn.Module, _args: Any = None) -> float:
        """The mean (or min) cosine of ``model``'s embeddings with the float ones."""
        cos = self.cosines(model)
        return float(cos.mean() if self.reduction == "mean" else cos.min())

    def _embeddings(self, model: nn.Module) -> List[torch.Tensor]:
        with eval_mode(model), torch.no_grad():
            return [self.embed(model, batch).detach() for batch in self.batches]


def _run_all(model: nn.Module, batches: List[Any]) -> List[Any]:
    """``model``'s outputs on every batch, in eval mode without grad (modes restored)."""
    with eval_mode(model), torch.no_grad():
        return [run_batch(model, batch) for batch in batches]
