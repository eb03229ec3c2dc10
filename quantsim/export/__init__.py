"""Export a calibrated sim for target runtimes, and load encodings back into a sim.

:func:`export` writes, into ``path``::

    <prefix>.pth               float model object (quantizers removed; torch.load, weights_only=False)
    <prefix>_state_dict.pth    its state_dict (torch.load(..., weights_only=True))
    <prefix>.onnx              float ONNX, module-derived names, embedded weights
    <prefix>.encodings         ONNX-keyed encodings (version 1.0.0; 0.6.1 / 2.0.0 selectable)
    <prefix>_torch.encodings   module-keyed encodings (reload with load_encodings)
    <prefix>_qdq.onnx          the ONNX graph with QuantizeLinear/DequantizeLinear, runs on ORT
    (export_to_torchscript=True: <prefix>.torchscript.pth instead of both .onnx files)

All files are first written to a temporary folder inside ``path`` and committed as one set
(:func:`quantsim.atomic.replace_files`): a failing export, up to the last rename, leaves the
files of an earlier export byte-identical, and other files in ``path`` are never touched. See
``docs/export.md`` for the naming rules and the decisions taken.

Example:
    >>> from quantsim.sim import QuantizationSimModel
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU())
    >>> x = torch.randn(2, 1, 8, 8)
    >>> sim = QuantizationSimModel(model, x, quant_scheme='tf')
    >>> sim.compute_encodings(lambda m, _: m(x), None)
    >>> files = export(sim, tmp_dir, 'model', x)        # doctest: +SKIP
    >>> sorted(p.name for p in files.all())              # doctest: +SKIP
    ['model.encodings', 'model.onnx', 'model.pth', 'model_qdq.onnx', ...]
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import onnx
import torch

from quantsim import encodings as enc_files
from quantsim.atomic import PartialCommitError, replace_files
from quantsim.checks import require_flag
from quantsim.encoding import Encoding
from quantsim.encodings import EncodingsFile, Int32BiasEncoding
from quantsim.errors import ExportError
from quantsim.export import onnx_export, pth, qdq
from quantsim.export.load import load_encodings, save_encodings_to_json, torch_encodings_file
from quantsim.export.onnx_export import (ExporterFallbackWarning, ExportersFailedError, TensorMap,
                                         graph_tensor_names, tensor_map)
from quantsim.export.verify import VerifyReport, verify
from quantsim.progress import progress
from quantsim.op_types import onnx_types_of, params_of
from quantsim.quantizer import QuantizerRole

__all__ = ["export", "ExportedFiles", "load_encodings", "save_encodings_to_json", "verify",
           "VerifyReport", "tensor_map", "TensorMap", "ExporterFallbackWarning",
           "ExportersFailedError"]

logger = logging.getLogger(__name__)
_ANALYTIC_BIAS_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class ExportedFiles:
    """Paths of the files one :func:`export` wrote (None: not written in this mode).

    Attributes:
        missing_quantizers: enabled quantizers whose tensor is not in the exported graph
            (their encodings are only in ``_torch.encodings``).
    """

    pth: Path
    state_dict: Path
    encodings: Path
    torch_encodings: Path
    onnx: Optional[Path] = None
    qdq_onnx: Optional[Path] = None
    torchscript: Optional[Path] = None
    missing_quantizers: List[str] = field(default_factory=list)

    def all(self) -> List[Path]:
        """Every written path."""
        return [p for p in (self.pth, self.state_dict, self.onnx, self.qdq_onnx, self.torchscript,
                            self.encodings, self.torch_encodings) if p is not None]


def export(sim: Any, path: str, filename_prefix: str, dummy_input: Any,
           onnx_export_args: Any = None, propagate_encodings: bool = False,
           export_to_torchscript: bool = False, encoding_version: str = "1.0.0") -> ExportedFiles:
    """Write the float model, its ONNX graph, the encodings and a QDQ ONNX model (module docstring).

    Args:
        sim: a calibrated :class:`~quantsim.QuantizationSimModel`.
        path: output directory (created if missing).
        filename_prefix: stem of every file name.
        dummy_input: an input the model accepts (tensor, tuple of positional inputs, or dict
            read by ``forward``'s signature: :func:`quantsim.graph.split_dummy_input`), on the
            model's device.
        onnx_export_args: dict (or object with these attributes) with ``opset_version``
            (default 20), ``input_names``, ``output_names``, ``dynamic_axes`` /
            ``dynamic_shapes``.
        propagate_encodings: also key the intermediate tensors of modules that became several
            ONNX nodes: ``{bitwidth, dtype}`` entries in 0.6.1, the module's output encoding in
            1.0.0 / 2.0.0.
        export_to_torchscript: write ``<prefix>.torchscript.pth`` (``torch.jit.trace``) instead
            of the ONNX files; encodings keyed by the traced graph's value names.
        encoding_version: ``'1.0.0'`` (default), ``'0.6.1'`` or ``'2.0.0'``.

    Returns:
        :class:`ExportedFiles`.

    Warns:
        ExporterFallbackWarning: torch.export could not capture the model (e.g. an ``if`` on
            tensor values); the ONNX files come from the TorchScript-based exporter, along the
            branches ``dummy_input`` takes.

    Raises:
        ExportError: ``sim`` is not a QuantizationSimModel, enabled quantizers without
            encodings (listed), an unwritable ``path``, a ``filename_prefix`` that is no plain
            file name, a flag that is not a bool, an unknown ``encoding_version`` or export
            argument, or a failing exporter (:class:`ExportersFailedError` when both of torch's
            ONNX exporters fail).
    """
    target = _check_arguments(sim, path, filename_prefix, propagate_encodings,
                              export_to_torchscript, encoding_version)
    _refuse_uncalibrated(sim)
    _refuse_tied_weights(sim)
    export_args = onnx_export.normalize_export_args(onnx_export_args)
    staging, created = _staging_dir(target)
    committed = False
    try:
        with progress(desc=f"export {filename_prefix}", total=4, unit="step") as bar:
            files = _write_all(sim, staging, filename_prefix, dummy_input, export_args,
                               propagate_encodings, export_to_torchscript, encoding_version,
                               bar.update)
        # files of the other mode (ONNX vs TorchScript) from an earlier export would not match
        stale = {f"{filename_prefix}{s}" for s in _MODE_SUFFIXES}
        names = [p.name for p in files.all()]
        _commit(staging, target, names, stale - set(names))
        committed = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not committed:
            with contextlib.suppress(OSError):  # only if empty: never a user's file
                target.rmdir()
    for name in ("pth", "state_dict", "onnx", "qdq_onnx", "torchscript", "encodings", "torch_encodings"):
        value = getattr(files, name)
        if value is not None:
            setattr(files, name, target / value.name)
    return files


# ----------------------------------------------------------------------------------------------
# steps
# ----------------------------------------------------------------------------------------------
#: suffixes of the files only one mode (ONNX or TorchScript) writes
_MODE_SUFFIXES = (".onnx", "_qdq.onnx", ".torchscript.pth")
#: every suffix export appends to ``filename_prefix``
_SUFFIXES = (".pth", "_state_dict.pth", ".encodings", "_torch.encodings") + _MODE_SUFFIXES


def _check_arguments(sim: Any, path: Any, prefix: Any, propagate: Any, torchscript: Any,
                     version: Any) -> Path:
    """The export folder, once every argument export reads before running is checked."""
    from quantsim.sim import QuantizationSimModel  # the sim module imports this one lazily

    if not isinstance(sim, QuantizationSimModel):
        raise ExportError(f"export: sim must be a QuantizationSimModel, got {type(sim).__name__}")
    if not isinstance(path, (str, os.PathLike)) or "\0" in os.fsdecode(path):
        raise ExportError(f"export: path must be a folder path (str or os.PathLike without NUL "
                          f"characters), got {path!r}")
    if not isinstance(prefix, str) or not prefix or prefix in (".", "..") or "\0" in prefix \
            or os.sep in prefix or (os.altsep and os.altsep in prefix):
        raise ExportError(f"export: filename_prefix {prefix!r} must be a plain file name (a "
                          "non-empty str without path separators or NUL characters)")
    require_flag(propagate, "propagate_encodings", "export", ExportError)
    require_flag(torchscript, "export_to_torchscript", "export", ExportError)
    if version not in enc_files.VERSIONS:
        raise ExportError(f"export: encoding_version {version!r}; allowed: "
                          f"{', '.join(enc_files.VERSIONS)}")
    target = Path(path)
    longest = max(len(os.fsencode(prefix + s)) for s in _SUFFIXES)
    limit = _name_max(target)
    if longest > limit:
        raise ExportError(f"export: filename_prefix {prefix[:40]!r}... is too long: its file "
                          f"names would have {longest} bytes; this file system allows {limit}")
    return target


def _name_max(target: Path) -> int:
    """The longest file name the file system of ``target`` (or its nearest existing parent)
    allows, 255 where it cannot be asked."""
    folder = target.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _refuse_uncalibrated(sim: Any) -> None:
    missing = [n for n, q in sim.named_quantizers() if q.enabled and not q.is_initialized]
    if missing:
        shown = ", ".join(missing[:12]) + (f", ... ({len(missing)} in all)" if len(missing) > 12 else "")
        raise ExportError(
            f"{len(missing)} enabled quantizer(s) have no encoding: {shown}. Run "
            "sim.compute_encodings(...) or sim.load_encodings(...) before export, or disable them")


def _refuse_tied_weights(sim: Any) -> None:
    """One tensor quantized under two names (tied weights, e.g. an LLM's ``lm_head.weight``
    and ``embed.weight``): an ONNX graph holds it once, under one of the names, so the two
    weight encodings cannot both be keyed; say so before any file is written."""
    by_tensor: Dict[int, List[str]] = {}
    for module_name, module in sim.named_qmodules():
        for param_name, q in module.param_quantizers.items():
            param = module._parameters.get(param_name)
            if q.enabled and param is not None:
                name = f"{module_name}.{param_name}" if module_name else param_name
                by_tensor.setdefault(id(param), []).append(name)
    tied = [names for names in by_tensor.values() if len(names) > 1]
    if tied:
        shown = "; ".join(" = ".join(names) for names in tied)
        first = tied[0]
        raise ExportError(
            f"export: tied parameters are quantized under two names ({shown}); ONNX stores one "
            f"tensor once, so their weight encodings cannot both be keyed. Untie them before "
            f"building the sim (e.g. model.{first[-1]} = nn.Parameter(model.{first[0]}.detach()"
            ".clone())): each copy then has its own initializer and encoding")


def _write_all(sim, staging: Path, prefix: str, dummy_input, export_args, propagate: bool,
               torchscript: bool, version: str, step=lambda: None) -> ExportedFiles:
    """Write every file into ``staging``; ``step()`` after each of the 4 steps (progress)."""
    clean = pth.clean_model(sim.model)
    files = ExportedFiles(pth=staging / f"{prefix}.pth", state_dict=staging / f"{prefix}_state_dict.pth",
                          encodings=staging / f"{prefix}.encodings",
                          torch_encodings=staging / f"{prefix}_torch.encodings")
    pth.save_pth(clean, str(files.pth), str(files.state_dict))
    step()
    param_names = [n for n, _ in clean.named_parameters()]
    if torchscript:
        traced = pth.trace_torchscript(clean, dummy_input)
        files.torchscript = staging / f"{prefix}.torchscript.pth"
        torch.jit.save(traced, str(files.torchscript))
        graph = pth.torchscript_as_onnx_graph(traced, param_names)
    else:
        graph = onnx_export.export_onnx(clean, dummy_input, export_args)
        onnx_export.check_param_names(graph, _quantized_param_names(sim))
    step()
    tmap = tensor_map(sim, graph)
    files.missing_quantizers = _report_missing(sim, tmap)
    doc_file, extra_markers = _onnx_keyed_file(sim, graph, tmap, version, propagate)
    _check_keys(doc_file, extra_markers, graph, "export_to_torchscript" if torchscript else prefix + ".onnx")
    _write_encodings(files.encodings, doc_file, extra_markers, version)
    enc_files.write_torch_encodings(files.torch_encodings, torch_encodings_file(sim),
                                    "1.0.0" if version == "2.0.0" else version)
    step()
    if not torchscript:
        onnx_export.attach_quantizer_map(graph, tmap)
        _check_onnx(graph, "the exported ONNX model")
        files.onnx = staging / f"{prefix}.onnx"
        _save_onnx(graph, files.onnx)
        plan = _qdq_plan(sim, tmap)
        base_opset = export_args.get("opset_version", onnx_export.DEFAULT_OPSET)
        qdq_model = qdq.build_qdq_model(graph, plan, qdq.qdq_opset(plan, base_opset))
        _check_onnx(qdq_model, "the QDQ ONNX model")
        files.qdq_onnx = staging / f"{prefix}_qdq.onnx"
        _save_onnx(qdq_model, files.qdq_onnx)
    step()
    return files


def _quantized_param_names(sim: Any) -> List[str]:
    return [f"{m}.{p}" if m else p for m, module in sim.named_qmodules()
            for p, q in module.param_quantizers.items() if q.enabled]


def _report_missing(sim: Any, tmap: TensorMap) -> List[str]:
    quantizers = dict(sim.named_quantizers())
    missing = [n for n in tmap.missing if quantizers[n].enabled]
    if missing:
        logger.warning("these enabled quantizers have no tensor in the exported graph (their "
                       "encodings are only in _torch.encodings): %s", ", ".join(missing))
    return missing


# ----------------------------------------------------------------------------------------------
# the ONNX-keyed encodings
# ----------------------------------------------------------------------------------------------
def active_encodings(sim: Any) -> Dict[str, Encoding]:
    """Quantizer name -> encoding, for every enabled quantizer that has one."""
    out = {}
    for name, q in sim.named_quantizers():
        if q.enabled and q.is_initialized:
            out[name] = q.encoding
    return out


def _tensor_encodings(sim: Any, tmap: TensorMap) -> Dict[str, Encoding]:
    """Tensor -> encoding: the first enabled quantizer listed for it (outputs before inputs)."""
    active = active_encodings(sim)
    out: Dict[str, Encoding] = {}
    for tensor, names in tmap.activations.items():
        chosen = [n for n in names if n in active]
        if not chosen:
            continue
        out[tensor] = active[chosen[0]]
        differing = [n for n in chosen[1:] if active[n] != out[tensor]]
        if differing:
            logger.warning("tensor %r is quantized by %s and also by %s with other encodings; "
                           "the file keeps %s's (the QDQ model keeps each)", tensor, chosen[0],
                           differing, chosen[0])
    return out


def _onnx_keyed_file(sim, graph: onnx.ModelProto, tmap: TensorMap, version: str, propagate: bool):
    active = active_encodings(sim)
    by_tensor = _tensor_encodings(sim, tmap)
    order = _graph_order(graph)
    acts = {t: by_tensor[t] for t in sorted(by_tensor, key=lambda t: order.get(t, len(order)))}
    markers: Dict[str, int] = {}
    if version == "2.0.0":
        for moved, source in tmap.propagated.items():
            if source in acts and moved not in acts:
                acts[moved] = acts[source]
    if propagate:
        for tensor, output in tmap.intermediates.items():
            if output not in acts or tensor in acts:
                continue
            if version == "0.6.1":
                markers[tensor] = acts[output].bitwidth
            else:
                acts[tensor] = acts[output]
    params = {t: active[q] for t, q in tmap.params.items() if q in active}
    doc = EncodingsFile(version=version, activation=acts, param=params,
                        excluded_layers=_excluded_layers(sim), quantizer_args=_quantizer_args(sim))
    doc.param_ranks = {i.name: len(i.dims) for i in graph.graph.initializer if i.name in params}
    if version == "2.0.0":
        doc.bias = _int32_biases(sim, tmap, acts, params)
    return doc, markers


def _graph_order(graph: onnx.ModelProto) -> Dict[str, int]:
    order: Dict[str, int] = {}
    for i in graph.graph.input:
        order.setdefault(i.name, len(order))
    for node in graph.graph.node:
        for o in node.output:
            order.setdefault(o, len(order))
    return order


def _int32_biases(sim, tmap: TensorMap, acts, params) -> Dict[str, Int32BiasEncoding]:
    """int32 bias encodings (FORMATS §2.9) for biases the sim leaves float."""
    out: Dict[str, Int32BiasEncoding] = {}
    active = active_encodings(sim)
    for name, module in sim.named_qmodules():
        bias = params_of(module).get("bias")
        weight_key = f"{name}.weight" if name else "weight"
        bias_key = f"{name}.bias" if name else "bias"
        bq = module.param_quantizers["bias"] if "bias" in module.param_quantizers else None
        if bias is None or (bq is not None and bq.enabled) or weight_key not in params:
            continue
        w_enc = params[weight_key]
        if w_enc.is_float:
            continue
        in_enc = None
        if any(t in _ANALYTIC_BIAS_TYPES for t in onnx_types_of(module)):
            inputs = tmap.module_inputs.get(name, [])
            in_enc = acts.get(inputs[0]) if inputs else None
            edge = f"{name}.input_quantizers.0"
            if edge in active:
                in_enc = module.input_quantizers[0].encoding
        # per-block weights: LPBQ's bias scales come from the per-channel float scale (as
        # aimet-torch's); plain per-block ones have no per-channel weight scale to use
        w_scale = w_enc.channel_scale if w_enc.is_lpbq else w_enc.scale
        if (in_enc is not None and not in_enc.is_float and not in_enc.per_channel
                and w_scale.dim() <= 1):
            out[bias_key] = Int32BiasEncoding.from_scales(in_enc.scale, w_scale, axis=0)
        else:
            out[bias_key] = Int32BiasEncoding.from_bias(
                bias.detach(), per_channel=w_enc.per_channel or w_enc.per_block)
    return out


def _excluded_layers(sim: Any) -> List[str]:
    for attr in ("excluded_layers", "_excluded_layers"):
        value = getattr(sim, attr, None)
        if value:
            return sorted(value)
    return []


def _quantizer_args(sim: Any) -> Dict[str, Any]:
    per_channel = any(q.axis is not None for q in sim.quantizers()
                      if q.role is QuantizerRole.PARAM and q.enabled)
    return enc_files.quantizer_args(
        sim.quant_scheme, activation_bitwidth=sim._output_bw, param_bitwidth=sim._param_bw,
        dtype=sim._data_type, param_symmetric=sim.config.defaults.params.is_symmetric,
        per_channel_quantization=per_channel)


def _check_keys(doc: EncodingsFile, markers: Dict[str, int], graph: onnx.ModelProto, where: str) -> None:
    names = graph_tensor_names(graph)
    keys = list(doc.activation) + list(doc.param) + list(doc.bias) + list(markers)
    lost = [k for k in keys if k not in names]
    if lost:
        raise ExportError(f"internal error: encodings keys {lost[:8]} are not tensors of {where}")


def _write_encodings(path: Path, doc: EncodingsFile, markers: Dict[str, int], version: str) -> None:
    if not markers:
        enc_files.write(path, doc, version)
        return
    # 0.6.1 propagate_encodings markers ({bitwidth, dtype}) have no EncodingsFile field
    data = enc_files.to_json_dict(doc, version)
    for tensor, bitwidth in markers.items():
        data["activation_encodings"][tensor] = [{"bitwidth": bitwidth, "dtype": "int"}]
    enc_files.validate(data, version, str(path))
    path.write_text(json.dumps(data, sort_keys=True, indent=4, allow_nan=False), encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# QDQ plan, ONNX checks, files
# ----------------------------------------------------------------------------------------------
def _qdq_plan(sim: Any, tmap: TensorMap) -> qdq.QdqPlan:
    active = active_encodings(sim)
    plan = qdq.QdqPlan()
    for tensor, qname in tmap.params.items():
        if qname in active:
            plan.params[tensor] = (qname, active[qname])
    for tensor, names in tmap.activations.items():
        outs = [n for n in names if ".output_quantizers." in n and n in active]
        if outs:
            plan.tensors[tensor] = (outs[0], active[outs[0]])
    for moved, source in tmap.propagated.items():
        if source in plan.tensors and moved not in plan.tensors:
            plan.tensors[moved] = (None, plan.tensors[source][1])
    for qname, edges in tmap.input_edges.items():
        if qname in active:
            plan.edges[qname] = [(tensor, nodes, active[qname]) for tensor, nodes in edges]
    return plan


def _check_onnx(model: onnx.ModelProto, what: str) -> None:
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{what} fails onnx.checker: {str(exc).splitlines()[0]}") from exc


def _save_onnx(model: onnx.ModelProto, path: Path) -> None:
    if model.ByteSize() >= 2**31 - 1:
        raise ExportError(f"{path.name}: the model is over 2 GB; protobuf cannot embed its weights")
    onnx.save_model(model, str(path))


def _staging_dir(target: Path) -> Tuple[Path, bool]:
    """A new temporary folder inside ``target`` (created if missing: True as second value),
    so that committing is renames within one file system."""
    if target.exists() and not target.is_dir():
        raise ExportError(f"cannot export to {target}: it exists and is not a directory")
    created = not target.exists()
    try:
        target.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".quantsim-export-", dir=target)), created
    except OSError as exc:
        raise ExportError(f"cannot export to {target}: {exc.strerror or exc} "
                          f"({exc.filename or target})") from exc


def _commit(staging: Path, target: Path, names: Sequence[str], stale: Set[str]) -> None:
    """Replace ``target``'s files by the staged ``names`` and remove ``stale`` ones, as one
    set (:func:`quantsim.atomic.replace_files`)."""
    try:
        replace_files(staging, target, names, sorted(stale))
    except PartialCommitError as exc:
        raise ExportError(f"export into {target} failed and was only partly undone: {exc}") from exc
    except OSError as exc:
        raise ExportError(f"cannot write into {target}: {exc.strerror or exc} "
                          f"({exc.filename or target}); its files are unchanged") from exc
