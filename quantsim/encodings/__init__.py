"""Encodings files: AIMET 0.6.1, 1.0.0, 2.0.0 and the module-keyed ``_torch.encodings`` layout.

Pure format code: :class:`~quantsim.encoding.Encoding` values in, JSON out, and back. Nothing
here knows about ``nn.Module``; the simulation maps names to quantizers.

* :mod:`quantsim.encodings.common`: versions, :class:`EncodingsFile`, :class:`Int32BiasEncoding`,
  :func:`detect_layout` and schema validation (:func:`schema`, :func:`validate`);
* :mod:`quantsim.encodings.writer`: :func:`to_entry`, :func:`bias_entry`, :func:`to_json_dict`,
  :func:`write`, :func:`write_torch_encodings`, :func:`quantizer_args`;
* :mod:`quantsim.encodings.reader`: :func:`from_entry`, :func:`load`.

Offsets (see ``docs/encodings.md``). ``o`` is the *internal* offset of an :class:`Encoding`
(``x = (q + o) * scale`` on its grid ``[qmin, qmax]``)::

    legacy offset  L  = o + qmin                0.6.1, 1.0.0, _torch.encodings (unsigned view)
    zero point     zp = -o                      2.0.0 (ONNX QuantizeLinear), omitted when 0
                      = -L             uintB    (asymmetric, unsigned symmetric)
                      = -L - 2^(b-1)   intB     (full signed grid: 0 for symmetric)

Example:
    >>> import torch
    >>> from quantsim.encoding import Encoding
    >>> enc = Encoding(8, torch.tensor(0.5), torch.tensor(-128.0))
    >>> to_entry(enc, "input", "2.0.0")
    {'name': 'input', 'output_dtype': 'uint8', 'y_scale': 0.5, 'y_zero_point': 128}
    >>> from_entry(to_entry(enc, "input", "1.0.0"), "1.0.0") == enc
    True
"""
from __future__ import annotations

from quantsim.encodings.common import (
    BIAS_SCALE_FLOOR,
    DEFAULT_VERSION,
    ONNX_BITWIDTHS,
    SCHEMA_PATH,
    TORCH_LAYOUT,
    VERSIONS,
    AnyEncoding,
    EncodingsFile,
    Int32BiasEncoding,
    PathLike,
    detect_layout,
    schema,
    validate,
)
from quantsim.encodings.reader import from_entry, load
from quantsim.encodings.writer import (
    bias_entry,
    bias_entry_from_values,
    quantizer_args,
    to_entry,
    to_json_dict,
    torch_json_dict,
    write,
    write_torch_encodings,
)

__all__ = [
    "VERSIONS", "DEFAULT_VERSION", "TORCH_LAYOUT", "ONNX_BITWIDTHS", "BIAS_SCALE_FLOOR",
    "SCHEMA_PATH", "PathLike", "AnyEncoding", "Int32BiasEncoding", "EncodingsFile", "to_entry",
    "from_entry", "bias_entry", "bias_entry_from_values", "to_json_dict", "torch_json_dict",
    "write", "write_torch_encodings", "load", "detect_layout", "schema", "validate",
    "quantizer_args",
]
