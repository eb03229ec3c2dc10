"""The float model behind a sim, as PyTorch files: ``.pth``, ``_state_dict.pth``, TorchScript.

:func:`clean_model` rebuilds the module tree of ``sim.model`` with every quantized module
replaced by its original float class (:func:`quantsim.wrappers.original_module`). The copy
shares parameters and buffers with the sim (no weights are copied) and holds no quantizer, so
``torch.load`` of the saved ``.pth`` needs the model's own classes only, not quantsim's
wrappers. Weights are the float weights: a runtime applies the parameter encodings itself.
Fused conv-BN modules (``quantsim.nn.ConvBn``...) are exported folded, as the model
``quantsim.prepare.fold_all_batch_norms`` makes: the layer with the BatchNorm folded in under
the fused module's path, the activation back in its own place (a ``quantsim.nn.FoldedLayer``
holds it when it has none).
(Modules quantsim put into the model, such as ``QuantizableMultiheadAttention`` replacing
``nn.MultiheadAttention``, are float modules of ``quantsim.nn`` and stay; loading such a model
needs ``quantsim.nn`` importable.)

TorchScript export (``export_to_torchscript=True``) traces the clean model; its encodings are
keyed by the IR value names (``debugName()``) of ``traced.inlined_graph`` as traced at export,
e.g. ``input.5`` for ``relu1``'s output and ``x`` for the model input (AIMET's convention). These
names are renumbered when a TorchScript file is loaded again, so to reload encodings into a sim
use the module-keyed ``<prefix>_torch.encodings``.
"""
from __future__ import annotations

import contextlib
import copy
import io
import warnings
from typing import Any, Dict, Tuple

import onnx
import torch
from torch import nn

from quantsim.errors import ExportError
from quantsim.export.onnx_export import MODULE_KEY
from quantsim.graph import split_dummy_input
from quantsim.nn.fused import fold_fused_modules
from quantsim.wrappers import QuantizationMixin, original_module


def clean_model(model: nn.Module) -> nn.Module:
    """A float copy of ``model`` (a sim's model) in eval mode, sharing its tensors.

    Every quantized module becomes an instance of its float class; containers are shallow
    copies, so ``sim.model`` itself is left untouched (modes included). A module reachable
    under several paths stays one module in the copy. Fused conv-BN modules are folded, as
    ``fold_all_batch_norms`` would have folded their chain
    (:func:`quantsim.nn.fused.fold_fused_modules`; their folded weights are new tensors).

    Example:
        >>> from quantsim.sim import QuantizationSimModel
        >>> sim = QuantizationSimModel(nn.Sequential(nn.Linear(2, 2)), torch.zeros(1, 2))
        >>> type(clean_model(sim.model)[0]).__name__
        'Linear'
    """
    # id -> (module, its copy): the module is kept alive, because copying a GraphModule makes
    # new intermediate modules that the copy then replaces; freed, their ids would be reused
    # and a later module taken for an earlier one
    copies: Dict[int, Tuple[nn.Module, nn.Module]] = {}

    def rebuild(module: nn.Module) -> nn.Module:
        if id(module) in copies:
            return copies[id(module)][1]
        clone = original_module(module) if isinstance(module, QuantizationMixin) else copy.copy(module)
        copies[id(module)] = (module, clone)
        clone.__dict__ = dict(clone.__dict__)
        clone._parameters = dict(clone._parameters)
        clone._buffers = dict(clone._buffers)
        clone._non_persistent_buffers_set = set(clone._non_persistent_buffers_set)
        clone._modules = {k: (rebuild(v) if v is not None else None)
                          for k, v in clone._modules.items()}
        return clone

    return fold_fused_modules(rebuild(model)).eval()


def save_pth(model: nn.Module, pth_path: str, state_dict_path: str) -> None:
    """``torch.save`` the whole model and, separately, its ``state_dict`` (tensors only)."""
    try:
        torch.save(model, pth_path)
        torch.save(model.state_dict(), state_dict_path)
    except Exception as exc:
        raise ExportError(f"cannot save the model to {pth_path}: {type(exc).__name__}: {exc}") from exc


def trace_torchscript(model: nn.Module, dummy_input: Any) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of the clean model with ``dummy_input`` (read by
    :func:`quantsim.graph.split_dummy_input`)."""
    args, kwargs = split_dummy_input(model, dummy_input)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            if kwargs:
                return torch.jit.trace(model, example_kwarg_inputs=kwargs)
            return torch.jit.trace(model, args)
    except Exception as exc:
        raise ExportError(f"torch.jit.trace failed: {type(exc).__name__}: {exc}") from exc


def torchscript_as_onnx_graph(traced: torch.jit.ScriptModule, param_names: Dict[str, Any]) -> onnx.ModelProto:
    """Describe a traced module's inlined graph as an ONNX graph of names only.

    Nodes keep the aten kind as ``op_type`` and the module path (from ``scopeName()``) as
    ``quantsim.module``; tensors are IR debug names; parameters appear as (empty) initializers
    under their PyTorch names. This lets :func:`quantsim.export.onnx_export.tensor_map` work
    on TorchScript unchanged. The result is not a runnable ONNX model.
    """
    g = traced.inlined_graph
    nodes, value_info = [], []
    for node in g.nodes():
        kind = node.kind().split("::")[-1]
        if kind in ("Constant", "GetAttr", "ListConstruct", "TupleConstruct"):
            continue
        scope = node.scopeName().split("/")[-1]
        module = scope[len("__module."):] if scope.startswith("__module.") else ""
        outputs = [o.debugName() for o in node.outputs()]
        onode = onnx.helper.make_node(kind, [i.debugName() for i in node.inputs()], outputs,
                                      name=f"{module}:{kind}")
        onode.metadata_props.add(key=MODULE_KEY, value=module)
        nodes.append(onode)
        for out in node.outputs():
            elem = _elem_type(out)
            value_info.append(onnx.helper.make_tensor_value_info(out.debugName(), elem, None))
    inputs = [onnx.helper.make_tensor_value_info(i.debugName(), _elem_type(i), None)
              for i in list(g.inputs())[1:]]  # the first input is the module itself
    outputs = [onnx.helper.make_tensor_value_info(o.debugName(), _elem_type(o), None)
               for o in g.outputs()]
    inits = [onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT, [0], []) for name in param_names]
    graph = onnx.helper.make_graph(nodes, "torchscript", inputs, outputs, inits, value_info=value_info)
    return onnx.helper.make_model(graph)


def _elem_type(value: Any) -> int:
    t = value.type()
    if isinstance(t, torch._C.TensorType):
        dtype = t.dtype()
        if dtype is None or dtype.is_floating_point:
            return onnx.TensorProto.FLOAT
        return onnx.TensorProto.INT64
    return onnx.TensorProto.INT64  # ints, lists, None: never quantized
