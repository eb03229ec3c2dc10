"""Save and resume a QuantizationSimModel without pickling code.

A checkpoint is a ``torch.save`` of plain data: tensors, numbers, strings, lists and dicts.
It holds the sim's state_dict (weights, encodings, learnable ranges), each quantizer's
settings, the sim's constructor arguments (the hardware config as JSON, the dummy input's
tensors) and, optionally, an optimizer's state. Loading uses ``torch.load(weights_only=True)``,
which refuses to run code from the file, and rebuilds the sim around the float model the
caller passes (``model=``): the file never needs to carry classes. The rebuilt sim wraps a
copy of that model, so a checkpoint that does not fit leaves the caller's model as it was.

::

    quantsim.save_checkpoint(sim, "run.qsim", optimizer=opt)
    sim = quantsim.load_checkpoint("run.qsim", model=MyNet())
    opt = torch.optim.SGD(sim.model.parameters(), lr=0.1)
    quantsim.load_optimizer_state("run.qsim", opt)

Statistics that calibration was collecting are not saved: checkpoint after compute_encodings.
"""
from __future__ import annotations

import collections
import inspect
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import nn

from quantsim.atomic import atomic_write
from quantsim.checks import require_module
from quantsim.errors import CheckpointError, QuantizationSettingError, QuantSimError
from quantsim.graph import KeywordInputs

FORMAT = "quantsim-checkpoint"
FORMAT_VERSION = 1
PathLike = Union[str, os.PathLike]

def _quantizer_settings(sim) -> Dict[str, Dict[str, Any]]:
    return {name: q.settings() for name, q in sim.named_quantizers()}


def save_checkpoint(sim, file_path: PathLike, optimizer: Optional[torch.optim.Optimizer] = None
                    ) -> None:
    """Write ``sim`` (and ``optimizer``'s state) to ``file_path`` atomically.

    Args:
        sim: the QuantizationSimModel.
        file_path: destination; an existing file is replaced only once writing succeeded.
        optimizer: optional optimizer whose state resumes with the sim.

    Raises:
        CheckpointError: ``sim`` or ``optimizer`` of another type, a ``dummy_input`` holding
            objects weights-only loading cannot read back (custom classes), or the file cannot
            be written (a folder, a file where a folder should be, no space, a file-size
            limit, no permission), naming it; an existing file is then left as it was.
    """
    from quantsim.sim import QuantizationSimModel  # the sim module imports much; load late

    if not isinstance(sim, QuantizationSimModel):
        raise CheckpointError(f"save_checkpoint: sim must be a QuantizationSimModel, got "
                              f"{type(sim).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise CheckpointError(f"save_checkpoint: optimizer must be a torch.optim.Optimizer or "
                              f"None, got {type(optimizer).__name__}")
    keywords = isinstance(sim.dummy_input, KeywordInputs)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "init_kwargs": dict(sim.init_kwargs),
        # a KeywordInputs is saved as a plain dict and a flag: weights_only loading takes
        # plain containers only
        "dummy_input": dict(sim.dummy_input) if keywords else sim.dummy_input,
        "dummy_input_keywords": keywords,
        "quantizers": _quantizer_settings(sim),
        "state_dict": sim.model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
    }
    path = _path(file_path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; save_checkpoint needs a file path such as "
                              f"{path / 'sim.qsim'}")
    problem = _not_plain(payload["dummy_input"], "dummy_input")
    if problem:
        raise CheckpointError(f"{path}: cannot checkpoint this sim: {problem}; a checkpoint "
                              "holds tensors and plain data only, so that it loads with "
                              "torch.load(weights_only=True)")
    try:
        atomic_write(path, lambda f: torch.save(payload, f))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write the checkpoint: {exc.strerror or exc}"
                              f"{_culprit(exc, path)}") from exc
    except RuntimeError as exc:  # how torch.save reports a failed write (no space, size limit)
        raise CheckpointError(f"{path}: cannot write the checkpoint: torch.save failed "
                              f"({_first_line(exc)}){_space_hint(path)}; the file is "
                              "unchanged") from exc


_PLAIN = (torch.Tensor, str, int, float, bool, complex, bytes, type(None), torch.dtype,
          torch.device)


def _not_plain(obj: Any, where: str) -> Optional[str]:
    """Why ``obj`` is not plain data that weights-only loading reads back (None if it is)."""
    if isinstance(obj, _PLAIN):
        return None
    if type(obj) in (tuple, list, torch.Size):
        return next((p for i, v in enumerate(obj) if (p := _not_plain(v, f"{where}[{i}]"))), None)
    if type(obj) in (dict, collections.OrderedDict):
        return next((p for k, v in obj.items()
                     if (p := _not_plain(k, f"{where} key {k!r}") or _not_plain(v, f"{where}[{k!r}]"))),
                    None)
    return f"{where} is a {type(obj).__name__}"


def _space_hint(path: Path) -> str:
    """What commonly makes a write fail: the process's file-size limit, a full device."""
    hints = []
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft != resource.RLIM_INFINITY:
            hints.append(f"this process may write files of at most {soft} bytes (ulimit -f)")
    except (ImportError, OSError, ValueError):
        pass
    try:
        hints.append(f"{shutil.disk_usage(path.parent).free} bytes free on its device")
    except OSError:
        pass
    return f"; {', '.join(hints)}" if hints else ""


def _path(file_path: Any) -> Path:
    if not isinstance(file_path, (str, os.PathLike)) or "\0" in os.fsdecode(file_path):
        raise CheckpointError(f"checkpoint path must be a str or os.PathLike without NUL "
                              f"characters, got {file_path!r}")
    return Path(file_path)


def _culprit(exc: OSError, path: Path) -> str:
    """`` (at <folder>)`` when the OS error is about a folder above ``path`` (one that is a
    file, or not writable)."""
    named = exc.filename
    if named and Path(os.fsdecode(named)).absolute() in path.absolute().parents:
        return f" (at {os.fsdecode(named)})"
    return ""


def _read(file_path: PathLike) -> Dict[str, Any]:
    path = _path(file_path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint: {exc.strerror or exc}") from exc
    except Exception as exc:  # noqa: BLE001 - damaged bytes fail the reader in many types
        # (an OSError "Invalid argument" from seeking in a truncated archive among them)
        raise CheckpointError(
            f"{path}: not a readable quantsim checkpoint (truncated, damaged, foreign, or "
            f"holding objects other than tensors and plain data): {type(exc).__name__}: "
            f"{_first_line(exc)}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a quantsim checkpoint (no '{FORMAT}' marker)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {payload.get('format_version')!r} is not "
            f"supported; this quantsim reads version {FORMAT_VERSION}")
    _check_payload(payload, path)
    return payload


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else ""


#: What each entry of a checkpoint holds: (accepted types, description).
_ENTRIES = {
    "init_kwargs": (dict, "a dict of QuantizationSimModel arguments"),
    "dummy_input_keywords": (bool, "a bool"),
    "quantizers": (dict, "a dict quantizer name -> settings dict"),
    "state_dict": (dict, "a dict name -> tensor"),
    "optimizer": ((dict, type(None)), "an optimizer state dict or None"),
}


def _check_payload(payload: Dict[str, Any], path: Path) -> None:
    """Every entry :func:`load_checkpoint` reads is there and of its type (a damaged or
    hand-edited file fails here, naming the entry, not deep inside the rebuild)."""
    for key, (kind, what) in list(_ENTRIES.items()) + [("dummy_input", (object, "the input"))]:
        if key not in payload:
            raise CheckpointError(f"{path}: the checkpoint has no {key!r} entry (damaged, or "
                                  "not written by save_checkpoint)")
        if not isinstance(payload[key], kind):
            raise CheckpointError(f"{path}: {key!r} holds a {type(payload[key]).__name__}; "
                                  f"expected {what}")
    unknown = sorted(set(payload["init_kwargs"]) - _init_arguments())
    if unknown:
        raise CheckpointError(f"{path}: init_kwargs {unknown} are not QuantizationSimModel "
                              f"arguments; allowed: {sorted(_init_arguments())}")
    if payload["dummy_input_keywords"] and not isinstance(payload["dummy_input"], Mapping):
        raise CheckpointError(f"{path}: 'dummy_input_keywords' is set but 'dummy_input' holds "
                              f"a {type(payload['dummy_input']).__name__}, not a dict")
    for name, entry in payload["quantizers"].items():
        if not isinstance(entry, dict):
            raise CheckpointError(f"{path}: quantizers[{name!r}] holds a "
                                  f"{type(entry).__name__}; expected a settings dict")
    bad = [k for k, v in payload["state_dict"].items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state_dict entries {bad[:5]} are not tensors")


def _init_arguments() -> set:
    """The QuantizationSimModel arguments a checkpoint may record (all but the model, the
    dummy input and ``in_place``, which loading decides)."""
    from quantsim.sim import QuantizationSimModel

    names = set(inspect.signature(QuantizationSimModel.__init__).parameters)
    return names - {"self", "model", "dummy_input", "in_place"}


def load_checkpoint(file_path: PathLike, model: Optional[nn.Module] = None):
    """Rebuild the saved QuantizationSimModel around a copy of ``model`` (a float model
    instance of the saved architecture), with the checkpoint's weights, encodings and
    quantizer settings.

    ``model`` itself is never changed, whether loading succeeds or fails: the sim wraps a deep
    copy (as ``QuantizationSimModel`` does by default), so a checkpoint that does not fit
    cannot leave it half loaded. Use ``sim.model`` afterwards.

    Raises:
        CheckpointError: missing, truncated, damaged or foreign file; an entry of the wrong
            type (named); no ``model`` given; a model whose modules, quantizers or parameters
            differ from the saved ones (the keys are named), or that the saved sim cannot be
            rebuilt around (its forward fails with the saved dummy input, a saved setting is
            not allowed).
        UnsupportedModelError: ``model`` is not an ``nn.Module`` instance.
    """
    from quantsim.sim import QuantizationSimModel

    payload = _read(file_path)
    if model is None:
        raise CheckpointError(
            f"{file_path}: pass model= (a float instance of the saved architecture); quantsim "
            "checkpoints carry no code, so the architecture must come from your program")
    require_module(model, "load_checkpoint(model=...)")
    dummy_input = payload["dummy_input"]
    if payload["dummy_input_keywords"]:
        dummy_input = KeywordInputs(dummy_input)
    try:
        sim = QuantizationSimModel(model, dummy_input, in_place=False, **payload["init_kwargs"])
    except QuantSimError as exc:
        raise CheckpointError(f"{file_path}: the saved sim cannot be rebuilt around this "
                              f"{type(model).__name__}: {type(exc).__name__}: {exc}") from exc
    _apply_settings(sim, payload["quantizers"], file_path)
    try:
        sim.model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{file_path}: the checkpoint does not fit this model: {exc}") from exc
    return sim


def _apply_settings(sim, saved: Dict[str, Dict[str, Any]], file_path: PathLike) -> None:
    quantizers = dict(sim.named_quantizers())
    missing = sorted(set(saved) - set(quantizers))
    unexpected = sorted(set(quantizers) - set(saved))
    if missing or unexpected:
        raise CheckpointError(
            f"{file_path}: the model's quantizers differ from the checkpoint's (another "
            f"architecture?); in the checkpoint only: {missing[:10]}; in the model only: "
            f"{unexpected[:10]}")
    for name, entry in saved.items():
        q = quantizers[name]
        entry = dict(entry)
        if "_unsigned" in entry:  # checkpoints written before settings() named it
            entry["grid_unsigned"] = entry.pop("_unsigned")
        entry.setdefault("role", None if q.role is None else q.role.value)
        try:
            q.apply_settings(entry)
        except QuantizationSettingError as exc:  # it names the quantizer and the key
            raise CheckpointError(f"{file_path}: {exc}") from exc


def load_optimizer_state(file_path: PathLike, optimizer: torch.optim.Optimizer) -> None:
    """Load the optimizer state saved with :func:`save_checkpoint` into ``optimizer``.

    Build ``optimizer`` on the loaded sim's parameters in the same order as when saving.
    """
    state = _read(file_path)["optimizer"]
    if state is None:
        raise CheckpointError(f"{file_path}: the checkpoint was saved without an optimizer")
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"{file_path}: optimizer state does not fit: {exc}") from exc
