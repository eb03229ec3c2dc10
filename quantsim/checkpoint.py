"""Save and resume a QuantizationSimModel without pickling code.

A checkpoint is a ``torch.save`` of plain data: tensors, numbers, strings, lists and dicts.
It holds the sim's state_dict (weights, encodings, learnable ranges), each quantizer's
settings, the sim's constructor arguments (the hardware config as JSON, the dummy input's
tensors) and, optionally, an optimizer's state. Loading uses ``torch.load(weights_only=True)``,
which refuses to run code from the file, and rebuilds the sim around the float model the
caller passes (``model=``): the file never needs to carry classes.

::

    quantsim.save_checkpoint(sim, "run.qsim", optimizer=opt)
    sim = quantsim.load_checkpoint("run.qsim", model=MyNet())
    opt = torch.optim.SGD(sim.model.parameters(), lr=0.1)
    quantsim.load_optimizer_state("run.qsim", opt)

Statistics that calibration was collecting are not saved: checkpoint after compute_encodings.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from quantsim.atomic import atomic_write
from quantsim.errors import CheckpointError, QuantizationSettingError
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
    """
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
    atomic_write(file_path, lambda f: torch.save(payload, f))


def _read(file_path: PathLike) -> Dict[str, Any]:
    path = Path(file_path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path}: not a readable quantsim checkpoint (truncated, foreign, or containing "
            f"objects other than tensors and plain data): {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a quantsim checkpoint (no '{FORMAT}' marker)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {payload.get('format_version')} is not "
            f"supported; this quantsim reads version {FORMAT_VERSION}")
    return payload


def load_checkpoint(file_path: PathLike, model: Optional[nn.Module] = None):
    """Rebuild the saved QuantizationSimModel around ``model`` (a float model instance of the
    saved architecture; its weights are overwritten by the checkpoint's).

    Raises:
        CheckpointError: missing, truncated or foreign file; no ``model`` given; a model whose
            modules or parameters differ from the saved ones (the keys are named).
    """
    from quantsim.sim import QuantizationSimModel

    payload = _read(file_path)
    if model is None:
        raise CheckpointError(
            f"{file_path}: pass model= (a float instance of the saved architecture); quantsim "
            "checkpoints carry no code, so the architecture must come from your program")
    dummy_input = payload["dummy_input"]
    if payload.get("dummy_input_keywords", False):
        dummy_input = KeywordInputs(dummy_input)
    sim = QuantizationSimModel(model, dummy_input, in_place=True, **payload["init_kwargs"])
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
        except QuantizationSettingError as exc:
            raise CheckpointError(f"{file_path}: quantizer {name}: {exc}") from exc


def load_optimizer_state(file_path: PathLike, optimizer: torch.optim.Optimizer) -> None:
    """Load the optimizer state saved with :func:`save_checkpoint` into ``optimizer``.

    Build ``optimizer`` on the loaded sim's parameters in the same order as when saving.
    """
    state = _read(file_path)["optimizer"]
    if state is None:
        raise CheckpointError(f"{file_path}: the checkpoint was saved without an optimizer")
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{file_path}: optimizer state does not fit: {exc}") from exc
