"""The torch.fx tracers behind :func:`quantsim.prepare.tracing.trace_module`.

* :class:`PrepareTracer`: symbolic tracing with our leaf rule (torch.nn layers, quantsim
  modules and excluded modules stay calls; the composite ``nn.Transformer*`` layers are traced
  into), buffers as graph attributes, and a refusal to return containers a graph cannot
  rebuild (a HuggingFace ``ModelOutput`` would come back as a plain dict).
* :class:`ConcreteTracer`: the same, but every proxy carries its value on an example input.
  Python control flow, ``len()``, ``int()`` and ``*`` unpacking on values derived from shapes,
  ranks and dtypes are decided on the example (and noted); on values derived from tensor
  *data* they still fail. The traced forward keeps the module's signature; arguments without
  tensors are fixed to the example's values and guarded by :func:`check_fixed_argument`.
"""
from __future__ import annotations

import inspect
import operator
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from quantsim.nn.attention import graph_function
from quantsim.prepare._recording import user_location

__all__ = ["PrepareTracer", "ConcreteTracer", "ReloadTracer", "VALUE", "DATA",
           "check_fixed_argument", "guard_fixed_arguments", "FX_FILES"]

#: ``node.meta`` key under which the concrete tracer stores the value on the example
VALUE = "quantsim_value"
_MISSING = object()
_STATIC_ATTRS = frozenset({"dtype", "device", "is_cuda", "is_sparse", "is_quantized", "is_meta",
                           "layout", "is_nested", "ndim"})
#: ``node.meta`` key: whether a node's value depends on tensor *values* (not just shapes)
DATA = "quantsim_data_dependent"
_META_METHODS = frozenset({"size", "dim", "numel", "nelement", "stride", "ndimension",
                           "element_size", "is_contiguous", "is_floating_point", "get_device",
                           "is_complex", "__len__"})
_META_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout",
                         "requires_grad", "is_sparse", "is_quantized", "is_meta", "is_nested"})
_META_FUNCTIONS = frozenset({torch.is_floating_point, torch.is_complex, torch.numel,
                             torch.is_tensor})
_COMPOSITE_TORCH = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                    nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer)
#: frames from these files are not "the user's code" in error locations
FX_FILES = ("/torch/fx/", "/quantsim/prepare/tracing.py", "/quantsim/prepare/tracers.py",
            "/torch/nn/modules/module.py", "/torch/_tensor.py", "/torch/overrides.py",
            "/torch/utils/_pytree.py")


def _unrebuildable(out: Any) -> Optional[str]:
    """The type name of a container in ``out`` that a graph's output cannot rebuild, if any
    (fx returns tuples, lists, plain dicts and namedtuples; a ``ModelOutput`` would come back
    as a plain dict)."""
    if isinstance(out, (fx.Proxy, torch.Tensor)) or out is None or isinstance(
            out, (bool, int, float, str, torch.dtype, torch.device)):
        return None
    if type(out) in (tuple, list) or (isinstance(out, tuple) and hasattr(out, "_fields")):
        items: Iterable[Any] = out
    elif type(out) is dict:
        items = out.values()
    elif isinstance(out, (dict, tuple, list)) or type(out) in pytree.SUPPORTED_NODES:
        return type(out).__name__
    else:
        return None
    for item in items:
        bad = _unrebuildable(item)
        if bad:
            return bad
    return None


def _checked_output(fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        out = fn(*args)
        bad = _unrebuildable(out)
        if bad:
            raise fx.proxy.TraceError(
                f"forward returns a {bad}, which a traced graph cannot rebuild")
        return out
    run.__annotations__ = {}  # fx would copy a string annotation into the graph's globals
    return run


class ReloadTracer(fx.Tracer):
    """What an unpickled prepared GraphModule is re-traced with (it keeps all modules as
    calls); buffers are proxied so slicing them by traced lengths works."""

    proxy_buffer_attributes = True


class PrepareTracer(fx.Tracer):
    """Symbolic tracer with our leaf rule."""

    #: buffers become graph attributes (slicing a buffer by a traced length stays symbolic)
    proxy_buffer_attributes = True

    def __init__(self, leaf: Callable[[nn.Module], bool]) -> None:
        super().__init__()
        self._leaf = leaf

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        return _checked_output(fn), args

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf(m):
            return True
        if isinstance(m, _COMPOSITE_TORCH):
            return False
        return super().is_leaf_module(m, module_qualified_name)


class _ConcreteProxy(fx.Proxy):
    """A proxy that knows its value on the example input."""

    def __len__(self) -> int:
        value = self.tracer.value_of(self)
        if isinstance(value, torch.Tensor):
            self.tracer.note(f"len() of a tensor fixed to {len(value)}")
        return len(value)

    def __getattr__(self, k: str) -> Any:
        if k.startswith("__") or k in ("node", "tracer"):
            raise AttributeError(k)
        value = self.tracer.value_of(self)
        if value is not _MISSING:
            attr = getattr(value, k, _MISSING)
            if k in _STATIC_ATTRS and attr is not _MISSING:
                return attr
            if attr is not _MISSING and not callable(attr):
                return self.tracer.create_proxy("call_function", getattr, (self, k), {})
        return super().__getattr__(k)

    def _fixed(self, kind: Callable[[Any], Any]) -> Any:
        self.tracer._refuse_data(self, f"{kind.__name__}()")
        value = kind(self.tracer.value_of(self))
        self.tracer.note(f"{kind.__name__}() of a traced value fixed to {value!r}")
        return value

    def __int__(self) -> int:
        return self._fixed(int)

    def __index__(self) -> int:
        return self._fixed(operator.index)

    def __float__(self) -> float:
        return self._fixed(float)


def _data_dependent(node: fx.Node) -> bool:
    """Whether ``node``'s value depends on tensor values rather than only on shapes/dtypes."""
    if node.op == "call_method" and node.target in _META_METHODS:
        return False
    if node.op == "call_function" and (node.target in _META_FUNCTIONS or (
            node.target is getattr and node.args[1] in _META_ATTRS)):
        return False
    value = node.meta.get(VALUE)
    if any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(value)):
        return True
    found: List[bool] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n.meta.get(DATA, True)))
    return any(found)


class ConcreteTracer(PrepareTracer):
    """Traces while computing every op on the example, to decide Python control flow."""

    def __init__(self, leaf: Callable[[nn.Module], bool], args: tuple, kwargs: dict) -> None:
        super().__init__(leaf)
        self._example = (args, kwargs)
        self._evaluating = False
        self.specializations: List[str] = []
        #: placeholders whose example value (no tensor in it) was used as a constant
        self.fixed: List[Tuple[fx.Node, Any]] = []

    # --- values -------------------------------------------------------------------------
    def value_of(self, proxy: fx.Proxy) -> Any:
        return proxy.node.meta.get(VALUE, _MISSING)

    def note(self, what: str) -> None:
        self.specializations.append(f"{user_location(FX_FILES)}: {what}")

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def _evaluate(self, node: fx.Node) -> Any:
        def value(n: fx.Node) -> Any:
            v = n.meta.get(VALUE, _MISSING)
            if v is _MISSING and n.op == "get_attr":  # constants fx stored on the root
                v = n.meta[VALUE] = self._evaluate(n)
            if v is _MISSING:
                raise fx.proxy.TraceError(f"no example value for {n.format_node()}")
            return v

        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        outer, self._evaluating = self._evaluating, True
        try:
            if node.op == "get_attr":
                obj: Any = self.root
                for atom in node.target.split("."):
                    obj = getattr(obj, atom)
                return obj
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            if node.op == "call_module":
                return self.root.get_submodule(node.target)(*args, **kwargs)
        finally:
            self._evaluating = outer
        return _MISSING

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,
                     proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                     proxy_factory_fn)
        node = proxy.node
        if kind not in ("placeholder", "output"):
            node.meta[VALUE] = self._evaluate(node)
            node.meta[DATA] = _data_dependent(node)
        return proxy

    def call_module(self, m, forward, args, kwargs):
        if self._evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    # --- Python protocol on proxies -----------------------------------------------------
    def _refuse_data(self, obj: fx.Proxy, what: str) -> None:
        if obj.node.meta.get(DATA, False):
            raise fx.proxy.TraceError(
                f"{what} depends on tensor values (at {user_location(FX_FILES)}); a traced graph "
                "can only follow one branch")

    def to_bool(self, obj: fx.Proxy) -> bool:
        self._refuse_data(obj, "Python control flow")
        value = bool(self.value_of(obj))
        self.note(f"condition on a shape taken as {value}")
        return value

    def iter(self, obj: fx.Proxy):
        value = self.value_of(obj)
        if isinstance(value, dict):
            return iter(list(value))
        return iter([obj[i] for i in range(len(value))])

    def keys(self, obj: fx.Proxy):
        return list(self.value_of(obj).keys())

    # --- placeholders mirror the forward signature, filled from the example ----------------
    def _structured(self, proxy: fx.Proxy, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return proxy
        if not any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(value)):
            return value
        if isinstance(value, (tuple, list)):
            return type(value)(self._structured(proxy[i], v) for i, v in enumerate(value))
        if isinstance(value, dict):
            return {k: self._structured(proxy[k], v) for k, v in value.items()}
        return proxy

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        fn = inspect.unwrap(root_fn)
        sig = inspect.signature(fn)
        ex_args, ex_kwargs = self._example
        bound = sig.bind(self.root, *ex_args, **ex_kwargs).arguments
        call_args: List[Any] = []
        call_kwargs: Dict[str, Any] = {}
        params = list(sig.parameters.values())[1:]
        # by keyword when possible: wrappers (HF's config-default decorators) add keywords
        by_keyword = not any(p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY) for p in params)
        for param in params:
            prefix = {param.VAR_POSITIONAL: "*", param.VAR_KEYWORD: "**"}.get(param.kind, "")
            default = () if param.default is param.empty or prefix else (param.default,)
            proxy = self.create_proxy("placeholder", prefix + param.name, default, {})
            if param.name in bound:
                value = bound[param.name]
            elif prefix:
                value = () if prefix == "*" else {}
            else:
                value = param.default
            proxy.node.meta[VALUE] = value
            proxy.node.meta[DATA] = any(
                isinstance(t, torch.Tensor) for t in pytree.tree_leaves(value))
            given = self._structured(proxy, value)
            if given is value and not prefix:
                self.fixed.append((proxy.node, value))
                if param.name in bound and value is not None:
                    self.specializations.append(f"argument {param.name!r} fixed to {value!r}")
            if param.kind == param.VAR_POSITIONAL:
                call_args.extend(given)
            elif param.kind == param.VAR_KEYWORD:
                call_kwargs.update(given)
            elif param.kind == param.KEYWORD_ONLY or by_keyword:
                call_kwargs[param.name] = given
            else:
                call_args.append(given)

        def run(root: nn.Module, *_: Any) -> Any:
            return root_fn(root, *call_args, **call_kwargs)

        return _checked_output(run), [self.root]


@fx.node.has_side_effect
@graph_function
def check_fixed_argument(given: Any, expected: Any, name: str) -> None:
    """Raise if an argument the graph was specialised on differs from the traced value."""
    same = given is expected or (type(given) is type(expected) and given == expected)
    if not same:
        from quantsim.errors import UnsupportedModelError

        raise UnsupportedModelError(
            f"this prepared module was traced with {name}={expected!r} and computes only that "
            f"case; it was called with {name}={given!r}. Prepare the model with a dummy_input "
            "that passes this argument the way you call it.")


def guard_fixed_arguments(graph: fx.Graph, fixed: List[Tuple[fx.Node, Any]]) -> None:
    """Insert a check per placeholder whose simple example value was baked into the graph."""
    simple = (type(None), bool, int, float, str)
    for node, value in fixed:
        if isinstance(value, simple):
            with graph.inserting_after(node):
                graph.call_function(check_fixed_argument, (node, value, node.target))
