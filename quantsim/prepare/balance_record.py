"""The balance record: the JSON file that balances a fresh copy of a model the same way.

Writing it (one entry per balanced layer, the file replaced atomically), and reading it,
checking it against a model and re-applying its factors (:func:`apply_balance_record`). The
format is described in docs/balance.md.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from quantsim.atomic import atomic_write_text
from quantsim.errors import BalanceRecordError
from quantsim.prepare.balance_planning import _Fold, _Layer
from quantsim.prepare.balance_scaling import (_check_model, _in_layout, _input_axis, _Model,
                                              _out_layout, _producer_channels,
                                              _producer_tensors)

__all__ = ["apply_balance_record", "RECORD_FORMAT", "RECORD_VERSION"]

RECORD_FORMAT, RECORD_VERSION = "quantsim.balance", 1


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def _entry(layer: _Layer, method: str, factors: torch.Tensor, fold: Optional[_Fold] = None,
           producer: Optional[nn.Module] = None, group: Sequence[str] = ()) -> Dict[str, Any]:
    return {
        "type": type(layer.module).__name__,
        "weight": layer.weight_name,
        "weight_shape": list(layer.weight.shape),
        "axis": _input_axis(layer.module),
        "method": method,
        "producer": None if fold is None else {
            "name": fold.producer, "type": type(producer).__name__,
            "channels": _producer_channels(producer)},
        "through": [] if fold is None else list(fold.through),
        "compensate": [] if fold is None else [list(c) for c in fold.compensate],
        "group": list(group) or [layer.name],
        "factors": factors.tolist(),
    }


def _write_record(path: Union[str, os.PathLike], record: Dict[str, Any]) -> None:
    """Write ``record`` as JSON atomically."""
    atomic_write_text(path, json.dumps(record, indent=1))


# ----------------------------------------------------------------------------------------------
# reading and re-applying
# ----------------------------------------------------------------------------------------------
def apply_balance_record(model: nn.Module, record_file: Union[str, os.PathLike]) -> None:
    """Re-apply the factors of a record written by
    :func:`~quantsim.prepare.balance.balance_activations` to a fresh copy of the model (same
    architecture, not yet balanced), in place.

    Raises:
        BalanceRecordError: the file is missing or malformed, or the model does not match it
            (the mismatching layer names are listed).
    """
    record = _read_record(record_file)
    _check_model(model)
    m = _Model(model)
    problems: List[str] = []

    def expect(name: str, type_name: str, what: str) -> Optional[nn.Module]:
        module = m.get(name)
        if module is None:
            problems.append(f"{name}: no such module ({what})")
        elif type(module).__name__ != type_name:
            problems.append(f"{name}: record has {type_name}, model has "
                            f"{type(module).__name__} ({what})")
            return None
        return module

    weights: Dict[str, torch.Tensor] = {}
    for name, e in record["layers"].items():
        module = expect(name, e["type"], "balanced layer")
        if module is None:
            continue
        w = m.parameter(e["weight"])
        if w is None or list(w.shape) != list(e["weight_shape"]):
            problems.append(f"{name}: weight {e['weight']} has shape "
                            f"{None if w is None else list(w.shape)}, record "
                            f"{e['weight_shape']}")
            continue
        weights[name] = w
        if e["producer"] is not None:
            p = expect(e["producer"]["name"], e["producer"]["type"], f"producer of {name}")
            if p is not None and _producer_channels(p) != e["producer"]["channels"]:
                problems.append(f"{e['producer']['name']}: {_producer_channels(p)} channels, "
                                f"record {e['producer']['channels']}")
            for reader, _ in e["compensate"]:
                if m.get(reader) is None:
                    problems.append(f"{reader}: no such module (reads {e['producer']['name']})")
    if problems:
        raise BalanceRecordError(
            f"balance record {os.fspath(record_file)} does not match the model "
            f"({len(problems)} problem(s)): " + "; ".join(sorted(set(problems)))
            + ". Was it written for another architecture, or is the model already balanced?")
    done: set = set()
    for name, e in record["layers"].items():
        module = m.get(name)
        factors = torch.tensor(e["factors"], dtype=torch.float32)
        layout = _in_layout(module, weights[name])
        if e["method"] == "channel_scale":
            m.wrap(name, 1.0 / factors.double(), e["axis"])
        else:
            producer_name = e["producer"]["name"]
            if producer_name not in done:
                done.add(producer_name)
                producer = m.get(producer_name)
                for t in _producer_tensors(producer):
                    m.scale_(t, _out_layout(producer, t), 1.0 / factors.double())
                for reader, index in e["compensate"]:
                    m.wrap(reader, factors, e["axis"], index)
        m.scale_(weights[name], layout, factors)


def _read_record(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as exc:
        raise BalanceRecordError(f"cannot read balance record {os.fspath(path)}: {exc}") from exc
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or \
            record.get("version") != RECORD_VERSION or not isinstance(record.get("layers"), dict):
        raise BalanceRecordError(
            f"{os.fspath(path)} is not a balance record (expected format {RECORD_FORMAT!r}, "
            f"version {RECORD_VERSION}, and a 'layers' object)")
    keys = {"type", "weight", "weight_shape", "axis", "method", "producer", "through",
            "compensate", "group", "factors"}
    for name, e in record["layers"].items():
        missing = keys - set(e) if isinstance(e, dict) else keys
        if missing or e["method"] not in ("fold", "channel_scale"):
            raise BalanceRecordError(f"{os.fspath(path)}: entry {name!r} is malformed "
                                     f"(missing {sorted(missing)} or bad method)")
    return record
