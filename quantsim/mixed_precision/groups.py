"""Quantizer groups: the quantizers that must change bitwidth together.

A runtime executes an op on data of one bitwidth, so a tensor's quantizers go together:

* the quantizer that carries the data entering a module (its own input quantizer, or the
  output quantizer of the module upstream, through data-movement modules such as ``Flatten``
  or ``MaxPool``: :func:`~quantsim.calibration.data_quantizer`) is grouped with that module's parameter quantizers (the
  weight multiplies that data: one kernel, one (activation, parameter) bitwidth pair);
* every consumer of a tensor sees the same carrier, so a producer's output quantizer and all
  its consumers' parameters form one group;
* the inputs of an op that adds or joins tensors (ONNX ``Add``, ``Sub``, ``Sum``, ``Concat``)
  share one grid, so their carriers are merged.

Groups are connected components of these links, found with the sim's traced graph
(:class:`quantsim.graph.ModelGraph`); no second trace. Only quantizers the search may change
are grouped: enabled, integer and not frozen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple


from quantsim.calibration import data_quantizer
from quantsim.op_types import onnx_types_of
from quantsim.quantizer import Quantizer
from quantsim.wrappers import quantizer_items

#: ONNX op types whose inputs must share a grid (an integer add or concat needs one scale).
JOINING_OPS = frozenset({"Add", "Sub", "Sum", "Concat"})


@dataclass(frozen=True)
class QuantizerGroup:
    """Quantizers that take one candidate together (names as in ``sim.named_quantizers()``).

    Attributes:
        activation_quantizers: input and output quantizers; they take the candidate's
            activation bitwidth.
        parameter_quantizers: parameter quantizers; they take its parameter bitwidth.
    """

    activation_quantizers: Tuple[str, ...] = ()
    parameter_quantizers: Tuple[str, ...] = ()

    @property
    def quantizers(self) -> Tuple[str, ...]:
        """Every quantizer of the group, activations first."""
        return self.activation_quantizers + self.parameter_quantizers

    @property
    def modules(self) -> Tuple[str, ...]:
        """The modules that own the group's quantizers (sorted, each once)."""
        return tuple(sorted({_module_of(n) for n in self.quantizers}))

    def to_list(self) -> List[Tuple[str, str]]:
        """``[(role, quantizer name), ...]``, role ``'activation'`` or ``'parameter'`` (JSON)."""
        return ([("activation", n) for n in self.activation_quantizers]
                + [("parameter", n) for n in self.parameter_quantizers])

    def __str__(self) -> str:
        names = self.quantizers
        shown = ", ".join(names[:3]) + (f", ... ({len(names)} quantizers)" if len(names) > 3
                                        else "")
        return f"QuantizerGroup({shown})"


def _module_of(quantizer_name: str) -> str:
    for marker in (".input_quantizers.", ".output_quantizers.", ".param_quantizers."):
        if marker in quantizer_name:
            return quantizer_name.split(marker)[0]
    return quantizer_name


def searchable(q: Quantizer) -> bool:
    """True for a quantizer mixed precision may change: enabled, integer, not frozen, and its
    range not pinned by the config's encoding constraints."""
    return q.enabled and q.data_type == "int" and not q.frozen and not q.has_fixed_range


class _UnionFind:
    def __init__(self) -> None:
        self.parent: Dict[str, str] = {}

    def add(self, x: str) -> None:
        self.parent.setdefault(x, x)

    def find(self, x: str) -> str:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:   # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def input_carriers(sim) -> Dict[Tuple[str, int], Optional[str]]:
    """``(module, input index) -> carrier quantizer name`` (or None) for every traced input of
    every quantized module of ``sim`` (see :func:`~quantsim.calibration.data_quantizer`)."""
    qmodules = dict(sim.named_qmodules())
    out: Dict[Tuple[str, int], Optional[str]] = {}
    for call in sim.graph.calls:
        if call.name not in qmodules:
            continue
        for i, src in enumerate(call.inputs):
            if src is not None and (call.name, i) not in out:
                out[(call.name, i)] = data_quantizer(qmodules, sim.graph, call.name, i)
    return out


def find_quantizer_groups(sim) -> List[QuantizerGroup]:
    """The quantizer groups of ``sim`` (module docstring), in the order of the model's first
    use of each group's first quantizer.

    Example:
        >>> groups = find_quantizer_groups(sim)                       # doctest: +SKIP
        >>> groups[0]                                                 # doctest: +SKIP
        QuantizerGroup(activation_quantizers=('conv1.input_quantizers.0',),
                       parameter_quantizers=('conv1.param_quantizers.weight', ...))
    """
    named = dict(sim.named_quantizers())
    eligible = {n for n, q in named.items() if searchable(q)}
    order: Dict[str, int] = {}
    for call in sim.graph.calls:
        order.setdefault(call.name, len(order))
    carriers = input_carriers(sim)
    uf = _UnionFind()
    for name in eligible:
        uf.add(name)
    for name, module in sim.named_qmodules():
        params = [f"{name}.{s}" for s, _ in quantizer_items(module)
                  if s.startswith("param_quantizers.") and f"{name}.{s}" in eligible]
        inputs = [c for (m, _), c in sorted(carriers.items()) if m == name]
        anchor = carriers.get((name, 0))
        for p in params[1:]:                    # a layer's parameters run in one kernel
            uf.union(params[0], p)
        if params and anchor in eligible:
            uf.union(anchor, params[0])
        if JOINING_OPS.intersection(onnx_types_of(module)):
            joined = [c for c in inputs if c in eligible]
            for c in joined[1:]:
                uf.union(joined[0], c)
    members: Dict[str, List[str]] = {}
    for name in named:                           # sim order inside a group
        if name in eligible:
            members.setdefault(uf.find(name), []).append(name)

    def first_use(names: List[str]) -> Tuple[int, str]:
        return min((order.get(_module_of(n), len(order)), n) for n in names)

    groups = [QuantizerGroup(
        tuple(n for n in names if ".param_quantizers." not in n),
        tuple(n for n in names if ".param_quantizers." in n))
        for names in sorted(members.values(), key=first_use)]
    return groups
