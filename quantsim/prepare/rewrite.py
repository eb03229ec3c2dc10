"""Graph rewrites that make every op of a traced module a module.

Applied by :func:`quantsim.prepare.prepare_model` to each traced GraphModule, in order:

1. :func:`decompose_attention`: ``F.scaled_dot_product_attention`` becomes
   ``MatMul(q, k^T) -> Mul(scale) -> AttentionMaskAdd(mask bias) -> nn.Softmax ->
   [nn.Dropout] -> MatMul(., v)`` (the mask bias stays float: :mod:`quantsim.placement`);
2. :func:`functionals_to_modules`: the ops of :mod:`quantsim.prepare.functional` become their
   modules;
3. :func:`unshare_modules`: a module called more than once gets a deep copy per extra call.

New modules sit at the GraphModule's root, named after the module path the op ran in and
the op (``layer1_0_add``, ``attention_self_qk_matmul``); unshared copies sit beside the
original with a suffix (``layer1.0.relu_1``).
"""
from __future__ import annotations

import copy
import inspect
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from quantsim.nn import attention as qattn
from quantsim.nn.elementwise import Add, MatMul, Mul
from quantsim.prepare.functional import spec_for
from quantsim.prepare.tracing import KIND

__all__ = ["RewriteStats", "rewrite_graph_module", "decompose_attention",
           "functionals_to_modules", "unshare_modules", "tensor_kind"]

_NON_TENSOR_METHODS = frozenset({
    "size", "dim", "numel", "nelement", "item", "tolist", "stride", "element_size",
    "is_contiguous", "is_floating_point", "data_ptr", "get_device", "ndimension", "__len__",
})
_NON_TENSOR_ATTRS = frozenset({
    "shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad", "is_sparse",
    "names", "is_quantized", "is_meta", "nbytes", "itemsize",
})


@dataclass
class RewriteStats:
    """What a rewrite changed."""

    converted: Counter = field(default_factory=Counter)
    decomposed_attention: int = 0
    unshared: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    #: ids of the module objects the rewritten graph calls
    module_ids: set = field(default_factory=set)

    @property
    def changed(self) -> bool:
        """Whether anything was rewritten."""
        return bool(self.converted or self.decomposed_attention or self.unshared)


def tensor_kind(node: Any, root: nn.Module, memo: Optional[Dict[fx.Node, str]] = None) -> str:
    """'float', 'tensor' or 'other' for a node's value; 'tensor' means "a tensor of unknown
    dtype". Uses the recorded example value when tracing had one, else static rules."""
    if not isinstance(node, fx.Node):
        if isinstance(node, torch.Tensor):
            return "float" if node.is_floating_point() else "tensor"
        return "other"
    if KIND in node.meta:
        return node.meta[KIND]
    memo = {} if memo is None else memo
    if node not in memo:
        memo[node] = _static_kind(node, root, memo)
    return memo[node]


def _static_kind(node: fx.Node, root: nn.Module, memo: Dict[fx.Node, str]) -> str:
    def any_tensor(args: Iterable[Any]) -> bool:
        found: List[bool] = []
        fx.node.map_aggregate(tuple(args), lambda a: found.append(
            isinstance(a, fx.Node) and tensor_kind(a, root, memo) != "other") or a)
        return any(found)

    if node.op in ("placeholder", "call_module"):
        return "tensor"
    if node.op == "get_attr":
        try:
            value = _fetch(root, node.target)
        except AttributeError:
            return "tensor"
        return tensor_kind(value, root, memo)
    if node.op == "call_method":
        if node.target in _NON_TENSOR_METHODS:
            return "other"
        return tensor_kind(node.args[0], root, memo) if node.args else "other"
    if node.op == "call_function":
        if node.target is getattr:
            return "other" if node.args[1] in _NON_TENSOR_ATTRS else \
                tensor_kind(node.args[0], root, memo)
        module = getattr(node.target, "__module__", "") or ""
        if module.startswith("torch") and "fx" not in module:
            return "tensor"
        return "tensor" if any_tensor(node.args) or any_tensor(node.kwargs.values()) else "other"
    return "other"


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _scope(node: fx.Node) -> str:
    """The module path (relative to the traced root) whose forward created ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


class _Namer:
    """Unique attribute names on a GraphModule."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.used = {name for name, _ in gm.named_modules()} | set(dir(gm))

    def add(self, base: str, module: nn.Module) -> str:
        base = base.replace(".", "_")
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        self.gm.add_submodule(name, module)
        return name

    def add_beside(self, target: str, module: nn.Module) -> str:
        i = 1
        while f"{target}_{i}" in self.used:
            i += 1
        name = f"{target}_{i}"
        self.used.add(name)
        self.gm.add_submodule(name, module)
        return name


def _call(graph: fx.Graph, namer: _Namer, scope: str, op: str, module: nn.Module,
          args: tuple, meta_from: fx.Node) -> fx.Node:
    name = namer.add(f"{scope}_{op}" if scope else op, module)
    node = graph.call_module(name, args)
    node.meta.update({k: v for k, v in meta_from.meta.items() if k != KIND})
    return node


def _sdpa_signature(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                    scale=None, enable_gqa=False):  # pragma: no cover - signature only
    """Mirror of ``F.scaled_dot_product_attention``'s parameters."""


def decompose_attention(gm: fx.GraphModule, namer: _Namer, stats: RewriteStats) -> None:
    """Replace each ``F.scaled_dot_product_attention`` by modules (see module docstring)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
            continue
        bound = inspect.signature(_sdpa_signature).bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        a = bound.arguments
        constant = (a["dropout_p"], a["is_causal"], a["enable_gqa"])
        if any(isinstance(c, fx.Node) for c in constant) or isinstance(a["scale"], fx.Node):
            stats.skipped.append(f"{node.name}: scaled_dot_product_attention with traced "
                                 "dropout_p/is_causal/scale/enable_gqa is kept fused")
            continue
        scope = _scope(node)
        q, k, v = a["query"], a["key"], a["value"]
        with graph.inserting_before(node):
            if a["enable_gqa"]:
                k = graph.call_function(qattn.repeat_kv_heads, (k, q))
                v = graph.call_function(qattn.repeat_kv_heads, (v, q))
            kt = graph.call_method("transpose", (k, -2, -1))
            out = _call(graph, namer, scope, "qk_matmul", MatMul(), (q, kt), node)
            scale = a["scale"]
            if scale is None:
                scale = graph.call_function(qattn.attention_scale, (q,))
            out = _call(graph, namer, scope, "scale", Mul(), (out, scale), node)
            if a["attn_mask"] is not None:
                bias = graph.call_function(qattn.attention_mask_to_bias, (a["attn_mask"], q))
                out = _call(graph, namer, scope, "mask_add", qattn.AttentionMaskAdd(), (out, bias),
                            node)
            if a["is_causal"]:
                bias = graph.call_function(qattn.causal_attention_bias, (q, k))
                out = _call(graph, namer, scope, "causal_add", qattn.AttentionMaskAdd(),
                            (out, bias), node)
            out = _call(graph, namer, scope, "softmax", nn.Softmax(dim=-1), (out,), node)
            if a["dropout_p"] > 0:
                out = _call(graph, namer, scope, "attn_dropout", nn.Dropout(a["dropout_p"]),
                            (out,), node)
            out = _call(graph, namer, scope, "av_matmul", MatMul(), (out, v), node)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        stats.decomposed_attention += 1


def _convertible(node: fx.Node, operands: int, root: nn.Module, memo: Dict) -> bool:
    """Whether the node computes on a float tensor (or, without example values, a tensor)."""
    if KIND in node.meta:
        return node.meta[KIND] == "float"
    heads: List[fx.Node] = []
    fx.node.map_arg(tuple(node.args[:operands]), heads.append)
    return any(tensor_kind(h, root, memo) != "other" for h in heads)


def functionals_to_modules(gm: fx.GraphModule, namer: _Namer, stats: RewriteStats,
                           data_movement: bool = False) -> None:
    """Replace functional ops (per :mod:`quantsim.prepare.functional`) by modules."""
    graph, memo = gm.graph, {}
    for node in list(graph.nodes):
        spec = spec_for(node.op, node.target)
        if spec is None or (spec.data_movement and not data_movement):
            continue
        if not _convertible(node, spec.operands, gm, memo):
            continue
        built = spec.build(tuple(node.args), dict(node.kwargs))
        if built is None:
            stats.skipped.append(f"{node.format_node()}: arguments not expressible as a module")
            continue
        module, args, kwargs = built
        scope = _scope(node)
        name = namer.add(f"{scope}_{spec.name}" if scope else spec.name, module)
        with graph.inserting_before(node):
            new = graph.call_module(name, args, kwargs)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        stats.converted[spec.name] += 1


def unshare_modules(gm: fx.GraphModule, namer: _Namer, stats: RewriteStats,
                    taken: Optional[set] = None) -> None:
    """Give every extra call of a module its own deep copy.

    Args:
        gm: the graph module.
        namer: name allocator of ``gm``.
        stats: collects the new names and, in ``module_ids``, the modules the graph calls.
        taken: ids of module objects already used by other prepared graphs; their calls here
            get copies too.
    """
    taken = set() if taken is None else taken
    seen: set = set()
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if id(module) in seen or id(module) in taken:
            node.target = namer.add_beside(node.target, copy.deepcopy(module))
            stats.unshared.append(node.target)
            module = gm.get_submodule(node.target)
        seen.add(id(module))
    stats.module_ids = seen


def _drop_dead_shape_nodes(gm: fx.GraphModule) -> None:
    """Remove unused shape arithmetic left over by tracing (``x.shape``, ``s[0]``, ``s > 1``)."""
    memo: Dict[fx.Node, str] = {}
    for node in reversed(list(gm.graph.nodes)):
        if node.users or tensor_kind(node, gm, memo) != "other":
            continue
        pure_method = node.op == "call_method" and node.target in _NON_TENSOR_METHODS
        pure_function = node.op == "call_function" and (
            node.target is getattr or getattr(node.target, "__module__", "") in (
                "_operator", "operator"))
        if pure_method or pure_function:
            gm.graph.erase_node(node)


def rewrite_graph_module(gm: fx.GraphModule, data_movement: bool = False,
                         taken: Optional[set] = None) -> RewriteStats:
    """Apply all rewrites to ``gm`` in place and recompile it."""
    stats = RewriteStats()
    namer = _Namer(gm)
    decompose_attention(gm, namer, stats)
    functionals_to_modules(gm, namer, stats, data_movement)
    unshare_modules(gm, namer, stats, taken)
    _drop_dead_shape_nodes(gm)
    gm.graph.lint()
    gm.recompile()
    return stats
