"""Load encodings files into a sim (aimet-torch 2.x ``load_encodings``) and save them.

Every layout :func:`quantsim.encodings.load` reads is accepted: 0.6.1, 1.0.0, 2.0.0 and the
module-keyed ``_torch.encodings``. Names are resolved to quantizers like this:

* parameters: ``<module>.<param>`` -> ``<module>.param_quantizers.<param>``;
* a module reachable under several paths has its quantizers under its first path
  (``named_modules()`` order); keys naming it by any of its paths resolve to them;
* a fused conv-BN module's output quantizer also answers to the path its activation is
  exported at (the folded model's, e.g. ``/2/Relu_output_0`` or module ``2``), so encodings
  of the folded model load into the fused one;
* module-keyed activations: ``{module: {"input"|"output": {i: ...}}}`` ->
  ``<module>.input_quantizers.<i>`` / ``output_quantizers.<i>``;
* ONNX tensor names: through the tensor -> quantizer map of the exported graph
  (:func:`quantsim.export.onnx_export.tensor_map`), taken from ``onnx_model`` or, for a file
  path, from ``<stem>.onnx`` next to it (quantsim stores the map in the model's metadata; a
  map naming quantizers this sim lacks, written by a sim of another structure, is rebuilt).
  Without a graph, names are read by rule: ``/<module path>/<Op>_output_<k>`` (quantsim's and
  the TorchScript exporter's style, ``/layer1/layer1.0/conv1/Conv_output_0`` too) is that
  module's output; ``input`` / ``output`` (or the forward's argument name) are the model's
  single input / output. Other names (``t.1``, ``44``) need the graph;
* each call of a module called more than once has its own tensor (``/relu/Relu_1_output_0``,
  the TorchScript exporter's ``/relu_1/Relu_output_0``): all of them resolve to the module's
  one quantizer, and their encodings must be equal.

Entries the runtime needs but the sim has no quantizer for are skipped, never errors: int32
bias entries, data-movement outputs (``/pool1/MaxPool_output_0``), ``propagate_encodings``
intermediates.

Per-block weights (:mod:`quantsim.config_utils`): a per-block or LPBQ entry makes a per-channel
or per-block weight quantizer per-block / LPBQ as the file says (its ``(C, blocks)`` layout from
the quantizer's channel count where a 1.0.0 ``PER_BLOCK`` entry records none); a flat 0.6.1
list of block encodings loads into a quantizer that is per-block already (LPBQ: when the scales
are an LPBQ grid). A per-tensor weight quantizer takes no per-block entry.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import onnx
import torch
from google.protobuf.message import DecodeError
from torch.utils import _pytree as pytree

from quantsim import encodings as enc_files
from quantsim.encoding import Encoding, lpbq_scale
from quantsim.encodings import EncodingsFile
from quantsim.checks import require_flag
from quantsim.errors import EncodingsError
from quantsim.export.onnx_export import (DATA_MOVEMENT_OPS, TensorMap, module_from_tensor_name,
                                         qmodules, stored_quantizer_map, tensor_map)
from quantsim.graph import forward_signature, module_aliases, split_dummy_input
from quantsim.nn.fused import activation_destinations
from quantsim.op_types import is_data_movement

logger = logging.getLogger(__name__)
PathLike = Union[str, "os.PathLike[str]"]


def load_encodings(sim: Any, encodings: Union[PathLike, Mapping[str, Any]], strict: bool = True,
                   partial: bool = True, requires_grad: Optional[bool] = None,
                   allow_overwrite: bool = True, *,
                   onnx_model: Union[PathLike, onnx.ModelProto, None] = None) -> List[str]:
    """Set the sim's encodings from a file or dict (aimet-torch 2.x semantics).

    Args:
        sim: the :class:`~quantsim.QuantizationSimModel` to load into.
        encodings: path of an encodings file, or its parsed dict (any version or layout).
        strict: an encoding without a matching quantizer, or whose bitwidth / shape / data type
            does not fit its quantizer, is an error. With ``strict=False`` such entries are
            skipped (a bitwidth is adopted) and logged.
        partial: True: quantizers without an encoding are left as they are. False: they are
            disabled.
        requires_grad: None leaves it; True / False makes the loaded ranges trainable (range
            learning) or not.
        allow_overwrite: False freezes the loaded quantizers, so a later ``compute_encodings``
            or ``load_encodings`` leaves them alone.
        onnx_model: (quantsim extension) the exported ONNX graph, path or proto, to resolve
            ONNX tensor names; defaults to ``<stem>.onnx`` next to an encodings file.

    Returns:
        The names of the quantizers that received an encoding.

    Every encoding is checked before any quantizer changes: the file's values as the writer
    checks them (:mod:`quantsim.encodings.reader`: 0 on the grid, scales finite and > 0, a
    bitwidth quantsim simulates) and their fit to the quantizers (:func:`_misfit`); with
    ``strict`` a problem raises and leaves the sim as it was.

    Raises:
        EncodingsError: the file is malformed or of an unknown version, or (strict) a name or
            shape does not match, naming the key; a flag that is not a bool (None allowed for
            ``requires_grad``).
    """
    from quantsim.sim import QuantizationSimModel  # the sim module imports this one lazily

    if not isinstance(sim, QuantizationSimModel):
        raise EncodingsError(f"load_encodings: sim must be a QuantizationSimModel, got "
                             f"{type(sim).__name__}")
    for flag, value in (("strict", strict), ("partial", partial),
                        ("allow_overwrite", allow_overwrite)):
        require_flag(value, flag, "load_encodings", EncodingsError)
    require_flag(requires_grad, "requires_grad", "load_encodings", EncodingsError, optional=True)
    param_names = [n for n, _ in sim.model.named_parameters(remove_duplicate=False)]
    # and the tensors a module computes in their place (a fused conv-BN's folded weight)
    param_names += [f"{m}.{p}" if m else p for m, module in qmodules(sim.model).items()
                    for p in module.param_quantizers]
    file = enc_files.load(encodings, param_names=param_names)
    label = _label(encodings)
    resolved, unmatched = _resolve(sim, file, encodings, onnx_model)
    if unmatched:
        message = (f"{label}: {len(unmatched)} encoding(s) match no quantizer of the sim: "
                   f"{unmatched[:10]}")
        if strict:
            raise EncodingsError(message + " (load with strict=False to skip them)")
        logger.warning("%s; skipped", message)
    quantizers = dict(sim.named_quantizers())
    accepted: List[Tuple[str, str, Encoding]] = []
    for qname, (key, enc) in resolved.items():  # check all before changing any
        if quantizers[qname].frozen:
            logger.info("%s is frozen (allow_overwrite=False earlier); %r not applied", qname, key)
            continue
        enc, problem = _fit_blocks(quantizers[qname], enc)
        problem = problem or _misfit(quantizers[qname], enc, strict)
        if problem is None:
            accepted.append((qname, key, enc))
        elif strict:
            raise EncodingsError(f"{label}: {key!r} -> {qname}: {problem} (load with "
                                 "strict=False to skip it)")
        else:
            logger.warning("%s: %r -> %s: %s; skipped", label, key, qname, problem)
    loaded: List[str] = []
    for qname, key, enc in accepted:
        q = quantizers[qname]
        _apply(q, qname, key, enc, label)
        loaded.append(qname)
        if requires_grad is not None and q.data_type == "int":
            q.set_learnable(bool(requires_grad))
        if not allow_overwrite:
            q.frozen = True
    if not partial:
        done = set(loaded)
        for qname, q in quantizers.items():
            if qname not in done and not q.frozen and q.enabled:
                q.enabled = False
                logger.info("%s has no encoding in %s: disabled (partial=False)", qname, label)
    return loaded


def _label(encodings: Any) -> str:
    """How messages name the encodings source: its path, or ``<dict>``."""
    return str(encodings) if isinstance(encodings, (str, os.PathLike)) else "<dict>"


def _misfit(q: Any, enc: Encoding, strict: bool) -> Optional[str]:
    """Why a loaded encoding cannot be set on quantizer ``q`` (None: it fits): data type, the
    number of scales (one, or one per channel of ``q``'s axis) and, when ``strict``, the
    bitwidth (otherwise it is adopted). The encoding's own values were checked on reading."""
    if enc.is_float != (q.data_type == "float"):
        return f"data type {enc.data_type} does not fit the {q.data_type} quantizer"
    if not enc.is_float and not enc.per_block and tuple(enc.scale.shape) != tuple(q.shape):
        return (f"{enc.scale.numel()} scale(s) ({'per channel' if enc.per_channel else 'per tensor'}) "
                f"do not fit the quantizer's shape {tuple(q.shape) or '(per tensor)'}")
    if enc.bitwidth != q.bitwidth and strict and not (enc.per_block and q.block_size is None):
        # (a per-block entry makes a per-channel quantizer per-block, bitwidth included)
        return f"bitwidth {enc.bitwidth} != the quantizer's {q.bitwidth}"
    return None


def _fit_blocks(q: Any, enc: Encoding) -> Tuple[Encoding, Optional[str]]:
    """``enc`` laid out for weight quantizer ``q`` where granularities meet (see the module
    docstring), or the reason it cannot be."""
    if enc.is_float or q.data_type != "int":
        return enc, None
    if enc.per_block:
        channels = q.shape[0] if q.shape else None
        n = enc.scale.numel()
        if channels is None:
            return enc, ("a per-block encoding does not fit a per-tensor quantizer; make the "
                         "weight per-block first (quantsim.config_utils."
                         "set_blockwise_quantization_for_weights)")
        if enc.scale.shape[0] == channels:
            return enc, None
        if enc.scale.shape[0] != 1 or n % channels:  # only 1.0.0's flat rows are laid out
            return enc, (f"{tuple(enc.scale.shape)} block scales do not fit the quantizer's "
                         f"{channels} channels")
        shape = (channels, n // channels)
        return dataclasses.replace(enc, scale=enc.scale.reshape(shape),
                                   offset=enc.offset.reshape(shape)), None
    if q.block_size is None or not enc.per_channel or enc.scale.numel() != q.scale.numel():
        return enc, None
    scale, offset = enc.scale.reshape(q.shape), enc.offset.reshape(q.shape)
    channel = None
    if q.decompressed_bw is not None:  # a 0.6.1 list of effective LPBQ block scales
        lpbq, channel = lpbq_scale(scale, enc.bitwidth, q.decompressed_bw)
        if not torch.equal(lpbq, scale) or not enc.symmetric:
            return enc, (f"the block scales are not an LPBQ grid of decompressed_bw "
                         f"{q.decompressed_bw}")
    return dataclasses.replace(enc, scale=scale, offset=offset, axis=0, block_size=q.block_size,
                               decompressed_bw=q.decompressed_bw, channel_scale=channel), None


def _apply(q: Any, qname: str, key: str, enc: Encoding, label: str) -> None:
    """Set ``enc``, which :func:`_misfit` accepted, on quantizer ``q``."""
    where = f"{label}: {key!r} -> {qname}"
    if not enc.is_float:
        if enc.bitwidth != q.bitwidth:
            logger.warning("%s: bitwidth %d adopted (was %d)", where, enc.bitwidth, q.bitwidth)
            q.bitwidth = enc.bitwidth
        if enc.per_block:
            if (tuple(enc.scale.shape), enc.block_size, enc.decompressed_bw) != (
                    q.shape, q.block_size, q.decompressed_bw):
                logger.info("%s: per-block (block_size %d%s) as the file says", where,
                            enc.block_size, ", LPBQ" if enc.is_lpbq else "")
                q.symmetric = enc.symmetric
                channels, blocks = enc.scale.shape
                q.set_block_size(enc.block_size, (channels, blocks * enc.block_size),
                                 enc.decompressed_bw)
        else:
            enc = dataclasses.replace(enc, axis=q.axis)
    q.set_encoding(enc)
    if not q.enabled:
        q.enabled = True
        logger.info("%s was disabled; enabled by the encoding %r", qname, key)


# ----------------------------------------------------------------------------------------------
# name resolution
# ----------------------------------------------------------------------------------------------
def _resolve(sim: Any, file: EncodingsFile, source: Any, onnx_model: Any
             ) -> Tuple[Dict[str, Tuple[str, Encoding]], List[str]]:
    """Quantizer name -> (file key, encoding), plus the keys that match nothing."""
    quantizers = dict(sim.named_quantizers())
    modules = qmodules(sim.model)
    aliases = module_aliases(sim.model)
    # a fused conv-BN's activation is exported in its own place, named as in the folded model
    aliases.update({dest: name for name, dest in activation_destinations(sim.model).items()})
    resolved: Dict[str, Tuple[str, Encoding]] = {}
    unmatched: List[str] = []

    def put(qname: str, key: str, enc: Encoding) -> None:
        # several keys for one quantizer are normal (each call of a module called more than
        # once has its own tensor); they must agree, as the sim has one encoding per quantizer
        if qname in resolved and resolved[qname][1] != enc:
            first, first_enc = resolved[qname]
            raise EncodingsError(
                f"{_label(source)}: {first!r} and {key!r} both set quantizer {qname} (one "
                f"quantizer per module, for all its calls), with different encodings: "
                f"{first_enc!r} vs {enc!r}; the entries of one quantizer must be equal")
        resolved.setdefault(qname, (key, enc))

    for key, enc in file.param.items():
        module, _, pname = key.rpartition(".")
        qname = f"{aliases.get(module, module)}.param_quantizers.{pname}"
        if qname in quantizers:
            put(qname, key, enc)
        else:
            unmatched.append(key)
    if file.bias:
        logger.info("int32 bias entries are for the runtime only; skipped: %s", sorted(file.bias))
    for module, slots in file.module_activation.items():
        for slot, by_index in slots.items():
            for idx, enc in by_index.items():
                qname = f"{aliases.get(module, module)}.{slot}_quantizers.{idx}"
                if qname in quantizers:
                    put(qname, f"{module}.{slot}.{idx}", enc)
                else:
                    unmatched.append(f"{module}.{slot}.{idx}")
    if file.activation:
        names = _name_resolver(sim, modules, aliases, source, onnx_model)
        shared: Dict[str, List[Tuple[str, Encoding]]] = {}
        for key, enc in file.activation.items():
            targets = names(key)
            if targets is None:
                unmatched.append(key)
                continue
            # a tensor can stand for several quantizers (an output and consumers' inputs); the
            # file holds the first enabled one's encoding (an output first; the first, if none
            # is enabled), the others take it only where no entry is theirs
            enabled = [t for t in targets if quantizers[t].enabled] or targets[:1]
            if enabled:
                put(enabled[0], key, enc)
            for qname in enabled[1:]:
                shared.setdefault(qname, []).append((key, enc))
        for qname, candidates in shared.items():
            if qname in resolved:
                continue
            resolved[qname] = candidates[0]
            others = [key for key, enc in candidates[1:] if enc != candidates[0][1]]
            if others:
                logger.warning("%s has no entry of its own; it takes the encoding of %r (a "
                               "tensor it quantizes after another quantizer), not the differing "
                               "ones of %s", qname, candidates[0][0], others)
    return resolved, unmatched


def _name_resolver(sim, modules, aliases, source, onnx_model):
    """A function ONNX tensor name -> quantizer names ([] for derived entries, None: unknown)."""
    tmap = _graph_map(sim, source, onnx_model)
    if tmap is not None:
        derived = set(tmap.propagated) | set(tmap.intermediates)

        def by_map(key: str) -> Optional[List[str]]:
            if key in tmap.activations:
                return list(tmap.activations[key])
            return [] if key in derived else None
        return by_map
    return _rule_resolver(sim, modules, aliases)


def _graph_map(sim, source, onnx_model) -> Optional[TensorMap]:
    if onnx_model is None and isinstance(source, (str, os.PathLike)):
        candidate = Path(source).with_suffix(".onnx")
        if Path(source).suffix == ".encodings" and candidate.is_file():
            onnx_model = candidate
    if onnx_model is None:
        return None
    if not isinstance(onnx_model, onnx.ModelProto):
        try:
            onnx_model = onnx.load(str(onnx_model), load_external_data=False)
        except (OSError, ValueError, DecodeError) as exc:
            raise EncodingsError(f"cannot read the ONNX model {onnx_model}: "
                                 f"{type(exc).__name__}: {exc}") from exc
    stored = stored_quantizer_map(onnx_model)
    known = {n for n, _ in sim.named_quantizers()}
    if stored is not None and all(q in known for names in stored.activations.values()
                                  for q in names):
        return stored
    # no map, or one written by a sim of another structure (e.g. the folded model of a fused one)
    return tensor_map(sim, onnx_model)


def _rule_resolver(sim, modules, aliases: Mapping[str, str]):
    names = list(modules) + list(aliases)
    graph = getattr(sim, "graph", None)
    single_in: List[str] = []
    single_out: List[str] = []
    if graph is not None:
        consumers = [(c.name, i) for c in graph.calls for i, s in enumerate(c.inputs)
                     if s is not None and s.kind == "model_input"]
        single_in = sorted({f"{n}.input_quantizers.{i}" for n, i in consumers
                            if i < len(modules[n].input_quantizers)}) if n_inputs(sim) == 1 else []
        if len(graph.model_outputs) == 1:
            producer, i = next(iter(graph.model_outputs))
            if producer in modules and i < len(modules[producer].output_quantizers):
                single_out = [f"{producer}.output_quantizers.{i}"]
    input_names = {"input", "input.1", "input_0"} | set(_forward_args(sim.model))

    def by_rule(key: str) -> Optional[List[str]]:
        if key in input_names and single_in:
            return single_in
        if key in ("output", "output_0") and single_out:
            return single_out
        parsed = module_from_tensor_name(key, names)
        if parsed is None:
            return None
        module, op = parsed
        module = aliases.get(module, module)
        m = modules.get(module)
        if m is not None and len(m.output_quantizers):
            return [f"{module}.output_quantizers.0"]
        if (m is not None and is_data_movement(m)) or op in DATA_MOVEMENT_OPS:
            return []  # a data-movement output: carries its producer's encoding
        return None
    return by_rule


def n_inputs(sim: Any) -> int:
    """How many tensors the model takes: those of the sim's ``dummy_input`` as ``forward``
    reads it (a dict passed as one argument can hold several), else its required arguments."""
    dummy = getattr(sim, "dummy_input", None)
    if dummy is not None:
        call = split_dummy_input(sim.model, dummy)
        return sum(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(call))
    return max(1, len(_forward_args(sim.model)))


def _forward_args(model: Any) -> List[str]:
    sig = forward_signature(model)
    if sig is None:
        return []
    return [p.name for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]


# ----------------------------------------------------------------------------------------------
# module-keyed file
# ----------------------------------------------------------------------------------------------
def torch_encodings_file(sim: Any) -> EncodingsFile:
    """The module-keyed (``_torch.encodings``) contents of the sim's enabled encodings."""
    acts: Dict[str, Dict[str, Dict[int, Encoding]]] = {}
    params: Dict[str, Encoding] = {}
    for name, module in sim.named_qmodules():
        for slot, qs in (("input", module.input_quantizers), ("output", module.output_quantizers)):
            for i, q in enumerate(qs):
                if q.enabled and q.is_initialized:
                    acts.setdefault(name, {}).setdefault(slot, {})[i] = q.encoding
        for pname, q in module.param_quantizers.items():
            if q.enabled and q.is_initialized:
                params[f"{name}.{pname}" if name else pname] = q.encoding
    from quantsim.export import _excluded_layers, _quantizer_args  # shared with export
    return EncodingsFile(module_activation=acts, param=params, excluded_layers=_excluded_layers(sim),
                         quantizer_args=_quantizer_args(sim))


def save_encodings_to_json(sim: Any, path: PathLike, filename_prefix: str) -> Path:
    """Write the sim's encodings, module-keyed (``_torch.encodings`` layout), to
    ``<path>/<filename_prefix>.json`` (atomic, schema-validated); ``path`` is created if missing.

    Returns:
        The written path.
    """
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EncodingsError(f"cannot create {directory}: {exc.strerror or exc}") from None
    target = directory / f"{filename_prefix}.json"
    enc_files.write_torch_encodings(target, torch_encodings_file(sim))
    return target
