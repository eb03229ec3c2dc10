"""``replace_with_qat``: swap the supported layers of a model for QAT modules, in place."""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Type

from torch import nn

from quantsim.checks import require_module
from quantsim.errors import QuantizationSettingError, UnsupportedModelError
from quantsim.nn.qat.modules import QAT_MODULES, ConfigLike, qat_class_for
from quantsim.nn.qat.config import QATConfig

logger = logging.getLogger(__name__)


def _parameter_owners(model: nn.Module) -> Dict[int, List[str]]:
    """id(parameter) -> every qualified name it is registered under (reuse included)."""
    owners: Dict[int, List[str]] = defaultdict(list)
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            owners[id(p)].append(f"{mod_name}.{p_name}" if mod_name else p_name)
    return owners


def _check_types(types: Optional[Iterable[type]]) -> Tuple[type, ...]:
    if types is None:
        return tuple(QAT_MODULES)
    types = tuple(types)
    for t in types:
        qat_class_for(t)  # raises naming the supported classes
    return types


def _skipped(name: str, skip: Sequence[str]) -> Optional[str]:
    for s in skip:
        if name == s or name.startswith(s + "."):
            return s
    return None


def replace_with_qat(
    model: nn.Module,
    config: ConfigLike = None,
    types: Optional[Iterable[Type[nn.Module]]] = None,
    skip: Sequence[str] = (),
) -> Tuple[nn.Module, List[str]]:
    """Swap every supported layer of ``model`` for its QAT module, in place.

    Supported float classes (exact type; subclasses such as attention's
    ``NonDynamicallyQuantizableLinear`` are left alone): ``nn.Conv2d``, ``nn.ConvTranspose2d``,
    ``nn.Conv3d``, ``nn.Linear``. Every candidate is checked before anything is swapped, so a
    refused layer leaves the model unchanged.

    Args:
        model: the float model. If ``model`` itself is a supported layer, the new QAT module is
            returned (a module cannot replace itself in place).
        config: retrain config for every swapped layer (see :mod:`quantsim.nn.qat.config`).
        types: the float classes to swap (default: all supported).
        skip: qualified module names to leave float; a name also skips everything under it.

    Returns:
        ``(model, swapped)``: the model and the qualified names of the swapped layers.

    Raises:
        UnsupportedModelError: ``model`` is not an ``nn.Module`` instance; a layer shares its
            weight or bias with another layer (tied or reused module), or breaks a QAT
            restriction (padding_mode, Conv3d depth dilation); a type in ``types`` has no QAT
            module.
        QuantizationSettingError: a ``skip`` name matches no module; a bad config.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
        >>> net, swapped = replace_with_qat(net)
        >>> swapped
        ['0', '3']
    """
    require_module(model, "replace_with_qat(model=...)")
    config = QATConfig.coerce(config)
    types = _check_types(types)
    names = {name for name, _ in model.named_modules()}
    unmatched = [s for s in skip if s not in names]
    if unmatched:
        raise QuantizationSettingError(
            f"replace_with_qat: skip name(s) {unmatched} match no module of the model; "
            f"module names look like {sorted(n for n in names if n)[:5]}"
        )
    owners = _parameter_owners(model)
    candidates = []
    for name, module in model.named_modules():
        if type(module) not in types or _skipped(name, skip):
            continue
        label = name or "<model>"
        for p_name in ("weight", "bias"):
            p = getattr(module, p_name, None)
            if p is not None and len(owners[id(p)]) > 1:
                raise UnsupportedModelError(
                    f"replace_with_qat: layer {label!r} shares its {p_name} with "
                    f"{owners[id(p)]}; QAT modules need their own weight and bias (tied or "
                    f"reused layers are not supported). Untie it, e.g. "
                    f"`{label}.{p_name} = nn.Parameter({label}.{p_name}.detach().clone())` "
                    "(and give each use its own module), or pass "
                    f"skip=[{label!r}]"
                )
        qat_cls = qat_class_for(type(module))
        try:
            qat_cls.check_float(module, config)
        except (UnsupportedModelError, QuantizationSettingError) as exc:
            raise type(exc)(f"replace_with_qat: layer {label!r}: {exc} (or pass "
                            f"skip=[{label!r}])") from None
        candidates.append((name, module, qat_cls))

    swapped: List[str] = []
    for name, module, qat_cls in candidates:
        qat = qat_cls.from_float(module, config)
        qat.input_quantizer.name = f"{name or '<model>'}.input_quantizer"
        if not name:
            logger.info("replace_with_qat: the model itself became %s", qat_cls.__name__)
            return qat, [name]
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, qat)
        swapped.append(name)
    logger.info("replace_with_qat: swapped %d layer(s): %s", len(swapped), swapped)
    return model, swapped
