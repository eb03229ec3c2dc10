"""What the benchmarks need to run aimet-torch beside quantsim in one interpreter."""
from __future__ import annotations

import torch

#: torchvision operators that aimet-torch registers kernels for (and that torchvision's Python
#: side, imported by transformers, registers fake kernels for)
_TORCHVISION_OPS = (
    ("torchvision::nms", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"),
    ("torchvision::qnms", "(Tensor dets, Tensor scores, Tensor zero_points, Tensor scales, "
                          "float iou_threshold) -> Tensor"),
)


def declare_torchvision_ops() -> None:
    """Declare the schemas of :data:`_TORCHVISION_OPS` where torchvision's compiled library
    did not load them (torchvision missing, or built for another torch): importing aimet-torch
    or transformers then works. A no-op where they exist; call it before those imports."""
    for name, schema in _TORCHVISION_OPS:
        try:
            torch.library.define(name, schema)
        except RuntimeError:  # already declared (torchvision's library loaded)
            pass
