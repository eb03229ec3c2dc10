"""The ``quantsim`` command line (``quantsim ...`` or ``python -m quantsim ...``).

Subcommands (``quantsim <command> --help`` for each)::

    validate-config FILE          hardware config: schema + AIMET's rules, one line per problem
    validate-encodings FILE       encodings file: schema + what the reader checks, one line each
    inspect FILE                  table of an encodings file's encodings, totals (--json)
    diff A B                      which tensors differ and by how many steps (--tolerance)
    verify MODEL_qdq.onnx --encodings FILE [--inputs X.npz]
                                  run the QDQ model in ONNX Runtime, check it against the grids
    demo [--out DIR]              the whole path on a small CNN (quantsim.demo)

Exit status: 0 all good, 1 a check failed (or a file could not be read as what it should be),
2 bad usage (unknown option, missing file). Problems go to stdout one per line, each with the
file and the JSON path (or tensor) at fault; a file that cannot be used at all gives one line
``quantsim <command>: error: <reason>`` on stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from quantsim.errors import QuantSimError
from quantsim.tables import format_table

#: exit statuses
OK, FAILED, USAGE = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# validate-config
# ----------------------------------------------------------------------------------------------
def cmd_validate_config(args: argparse.Namespace) -> int:
    """Check a hardware config with :func:`quantsim.config.load_config`; print each problem."""
    from quantsim.config import ConfigWarning, load_config

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        try:
            config = load_config(args.file)
            problems: List[str] = []
        except QuantSimError as exc:
            config = None
            # load_config lists schema problems as "<first>\nN more problem(s):\n  <line>..."
            problems = [line.strip() for line in str(exc).splitlines()
                        if line.strip() and not re.fullmatch(r"\d+ more problem\(s\):", line.strip())]
    for w in caught:
        if issubclass(w.category, ConfigWarning):
            print(f"warning: {w.message}")
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} problem(s)")
        return FAILED
    print(f"{args.file}: ok ({len(config.op_type)} op type(s), {len(config.supergroups)} "
          f"supergroup(s))")
    return OK


# ----------------------------------------------------------------------------------------------
# validate-encodings
# ----------------------------------------------------------------------------------------------
def encodings_problems(path: str) -> List[str]:
    """Every problem of an encodings file, one line each (``<file>: <json path>: <what>``).

    Schema problems are all listed (not only the first); once the schema holds, each entry is
    read on its own with :func:`quantsim.encodings.from_entry` (scales, offsets, grids,
    supported kinds), and the whole file with :func:`quantsim.encodings.load` (names used
    twice). A file that is no JSON, or of no known layout, gives one line.
    """
    from quantsim.encodings import common, load

    try:
        load(path)
        return []
    except QuantSimError as exc:
        first = str(exc)
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh, parse_constant=_reject_constant)
        layout = common.detect_layout(doc, path)
    except (OSError, ValueError, RecursionError, QuantSimError):
        return [first]  # the reader's message already says why the file cannot be read
    problems = common.schema_problems(doc, layout)
    if problems:
        return [f"{path}: {problem}" for problem in problems]
    return _entry_problems(doc, layout, path) or [first]


def _reject_constant(constant: str) -> None:
    raise ValueError(f"{constant} is not valid JSON")


def _entry_problems(doc: Dict[str, Any], layout: str, path: str) -> List[str]:
    """Read each entry of a schema-valid document alone; one line per entry that fails."""
    from quantsim.encodings import from_entry

    entries: List[Tuple[str, Any, str, Optional[str]]] = []  # (json path, entry, version, name)
    if layout == "2.0.0":
        entries += [(f"encodings[{i}] ({e['name']!r})", e, "2.0.0", e["name"])
                    for i, e in enumerate(doc["encodings"])]
    elif layout == "1.0.0":
        for key in ("activation_encodings", "param_encodings"):
            entries += [(f"{key}[{i}] ({e['name']!r})", e, "1.0.0", e["name"])
                        for i, e in enumerate(doc[key])]
    else:
        entries += [(f"param_encodings[{n!r}]", e, "0.6.1", n)
                    for n, e in doc["param_encodings"].items()]
        for name, value in doc["activation_encodings"].items():
            if layout == "0.6.1":
                entries.append((f"activation_encodings[{name!r}]", value, "0.6.1", name))
                continue
            for slot, by_index in value.items():
                entries += [(f"activation_encodings[{name!r}].{slot}[{idx!r}]", [e], "0.6.1", name)
                            for idx, e in by_index.items()]
    problems = []
    for where, entry, version, name in entries:
        try:
            from_entry(entry, version, name=name)
        except QuantSimError as exc:
            reason = str(exc).removeprefix(f"entry {name!r}: ")
            problems.append(f"{path}: {where}: {reason}")
    return problems


def cmd_validate_encodings(args: argparse.Namespace) -> int:
    """Print every problem of an encodings file (:func:`encodings_problems`)."""
    problems = encodings_problems(args.file)
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} problem(s)")
        return FAILED
    rows = _rows(_load_encodings(args.file))
    print(f"{args.file}: ok ({_totals_line(_totals(rows))})")
    return OK


# ----------------------------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------------------------
def _load_encodings(path: str) -> Any:
    from quantsim.encodings import load
    return load(path)


def _flat(file: Any) -> Dict[str, Tuple[str, Any]]:
    """Every encoding of a file: name -> (kind, encoding). Module-keyed activations
    (``_torch.encodings``) are named ``<module>.<input|output>[<index>]``."""
    out: Dict[str, Tuple[str, Any]] = {}
    out.update((n, ("activation", e)) for n, e in file.activation.items())
    out.update((n, ("param", e)) for n, e in file.param.items())
    out.update((n, ("bias", e)) for n, e in file.bias.items())
    for module, slots in file.module_activation.items():
        for slot, by_index in slots.items():
            out.update((f"{module}.{slot}[{i}]", ("activation", e)) for i, e in by_index.items())
    return out


def _granularity(enc: Any) -> str:
    """``per-tensor``, ``per-channel``, ``per-block`` or ``LPBQ`` (per block, with a
    decompressed bitwidth), read from the encoding's shape and attributes, so every kind the
    reader returns is described."""
    if getattr(enc, "block_size", None) is not None:
        return "LPBQ" if getattr(enc, "decompressed_bw", None) is not None else "per-block"
    scale = getattr(enc, "scale", None)
    if scale is None or scale.dim() == 0:
        return "per-tensor"
    return "per-channel"


def _offsets(enc: Any) -> Any:
    """Offsets in AIMET's 0.6.1 / 1.0.0 convention (``x = (q + offset) * scale`` on the unsigned
    grid ``[0, 2^b - 1]``), the same for every file version; one per scale."""
    import torch
    legacy = getattr(enc, "legacy_offset", None)
    if legacy is None:
        legacy = enc.offset.double() + enc.qmin
    return torch.as_tensor(legacy, dtype=torch.float64).expand(enc.scale.shape)


def _rows(file: Any) -> List[Dict[str, Any]]:
    """One row per encoding (see :func:`cmd_inspect`)."""
    rows = []
    for name, (kind, enc) in _flat(file).items():
        row: Dict[str, Any] = {"tensor": name, "kind": kind, "bitwidth": int(enc.bitwidth),
                               "dtype": "float" if getattr(enc, "is_float", False) else "int",
                               "granularity": _granularity(enc)}
        if row["dtype"] == "float":
            row.update(symmetric=None, axis=None, scales=0, scale_min=None, scale_max=None,
                       offset_min=None, offset_max=None)
        else:
            scale, offset = enc.scale.double(), _offsets(enc)
            row.update(symmetric=bool(getattr(enc, "symmetric", True)),
                       axis=getattr(enc, "axis", None), scales=int(scale.numel()),
                       scale_min=float(scale.min()), scale_max=float(scale.max()),
                       offset_min=int(offset.min()), offset_max=int(offset.max()))
            if getattr(enc, "block_size", None) is not None:
                row["block_size"] = int(enc.block_size)
        rows.append(row)
    return rows


def _totals(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    def count(key: str) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for r in rows:
            k = str(r[key]) if key != "bitwidth" else f"{r['dtype']}{r['bitwidth']}"
            out[k] = out.get(k, 0) + 1
        return dict(sorted(out.items()))
    return {"encodings": len(rows), "kind": count("kind"), "dtype": count("bitwidth"),
            "granularity": count("granularity"), "scales": sum(r["scales"] for r in rows)}


def _totals_line(t: Dict[str, Any]) -> str:
    parts = [", ".join(f"{v} {k}" for k, v in t[key].items()) for key in ("kind", "dtype",
                                                                         "granularity")]
    return f"{t['encodings']} encodings: " + "; ".join(p for p in parts if p)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print one row per encoding and the totals (or JSON with ``--json``)."""
    file = _load_encodings(args.file)
    rows = _rows(file)
    totals = _totals(rows)
    if args.json:
        print(json.dumps({"file": args.file, "version": file.version, "encodings": rows,
                          "totals": totals}, indent=2))
        return OK

    def shown(r: Dict[str, Any]) -> List[str]:
        gran = r["granularity"]
        if "block_size" in r:
            gran += f" ({r['scales']}, blocks of {r['block_size']})"
        elif gran != "per-tensor":
            gran += f" ({r['scales']}, axis {r['axis']})"
        if r["dtype"] == "float":
            return [r["tensor"], r["kind"], f"float{r['bitwidth']}", "-", gran, "-", "-"]
        return [r["tensor"], r["kind"], f"int{r['bitwidth']}", "yes" if r["symmetric"] else "no",
                gran, _span(r["scale_min"], r["scale_max"], "{:.6g}"),
                _span(r["offset_min"], r["offset_max"], "{}")]
    print(f"{args.file} (version {file.version})")
    print(format_table(("tensor", "kind", "dtype", "symmetric", "granularity", "scale", "offset"),
                       [shown(r) for r in rows], rule=False))
    print(_totals_line(totals) + f"; {totals['scales']} scales")
    return OK


def _span(lo: Any, hi: Any, fmt: str) -> str:
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)} .. {fmt.format(hi)}"


# ----------------------------------------------------------------------------------------------
# diff
# ----------------------------------------------------------------------------------------------
def _grid_ends(enc: Any) -> Tuple[Any, Any, Any]:
    """``(scale, lowest, highest representable value)`` as float64 tensors, for any integer
    encoding kind (per tensor, channel or block; int32 biases)."""
    import torch
    scale = enc.scale.double()
    offset = getattr(enc, "offset", None)
    offset = torch.zeros_like(scale) if offset is None else offset.double()
    return scale, scale * (offset + enc.qmin), scale * (offset + enc.qmax)


def compare(a: Any, b: Any) -> Tuple[Optional[float], str]:
    """How far encoding ``b`` is from ``a``: ``(steps, what differs)``.

    ``steps`` is the largest move of either end of the grid (its lowest or highest value),
    in steps of ``a``'s scale, over all channels / blocks; ``None`` when the two are not
    comparable that way (other dtype, bitwidth, symmetry, granularity or shape), with the
    reason.
    """
    a_float, b_float = getattr(a, "is_float", False), getattr(b, "is_float", False)
    if a_float or b_float:
        same = a_float == b_float and a.bitwidth == b.bitwidth
        return (0.0, "") if same else (None, f"{_kind(a)} vs {_kind(b)}")
    if _kind(a) != _kind(b):
        return None, f"{_kind(a)} vs {_kind(b)}"
    sa, lo_a, hi_a = _grid_ends(a)
    sb, lo_b, hi_b = _grid_ends(b)
    block = getattr(a, "block_size", None)
    if block is not None and block == getattr(b, "block_size", None) and sa.numel() == sb.numel():
        # a 1.0.0 PER_BLOCK entry records no channel count: read as one row of the same blocks
        # in the same (row-major) order as a 2.0.0 file's (C, blocks)
        sa, lo_a, hi_a, sb, lo_b, hi_b = (t.reshape(-1) for t in (sa, lo_a, hi_a, sb, lo_b, hi_b))
    if sa.shape != sb.shape or getattr(a, "axis", None) != getattr(b, "axis", None):
        return None, (f"shape {tuple(sa.shape)} axis {getattr(a, 'axis', None)} vs "
                      f"{tuple(sb.shape)} axis {getattr(b, 'axis', None)}")
    moved = ((lo_a - lo_b).abs().maximum((hi_a - hi_b).abs()) / sa)
    return (float(moved.max()) if moved.numel() else 0.0), ""


def _kind(enc: Any) -> str:
    if getattr(enc, "is_float", False):
        return f"float{enc.bitwidth}"
    sym = "symmetric" if getattr(enc, "symmetric", True) else "asymmetric"
    return f"int{enc.bitwidth} {sym} {_granularity(enc)}"


def diff_files(path_a: str, path_b: str, tolerance: float = 0.0) -> Dict[str, Any]:
    """Compare two encodings files tensor by tensor (see :func:`compare`).

    Returns:
        ``{"differ": [{"tensor", "steps", "reason"}], "only_in_a": [...], "only_in_b": [...],
        "compared": n}``; a tensor is listed in ``differ`` when it moved more than
        ``tolerance`` steps or cannot be compared.
    """
    a, b = _flat(_load_encodings(path_a)), _flat(_load_encodings(path_b))
    differ = []
    for name in (n for n in a if n in b):
        steps, reason = compare(a[name][1], b[name][1])
        if steps is None or steps > tolerance:
            differ.append({"tensor": name, "steps": steps, "reason": reason})
    return {"compared": sum(1 for n in a if n in b), "differ": differ,
            "only_in_a": [n for n in a if n not in b], "only_in_b": [n for n in b if n not in a]}


def cmd_diff(args: argparse.Namespace) -> int:
    """Print the tensors that differ (beyond ``--tolerance`` steps) and those in one file only."""
    if not (args.tolerance >= 0 and math.isfinite(args.tolerance)):
        return _usage(args, f"--tolerance must be a finite number >= 0, got {args.tolerance}")
    result = diff_files(args.a, args.b, args.tolerance)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for d in result["differ"]:
            what = f"{d['steps']:.4g} steps" if d["steps"] is not None else d["reason"]
            print(f"differs: {d['tensor']}: {what}")
        for key, label in (("only_in_a", args.a), ("only_in_b", args.b)):
            for name in result[key]:
                print(f"only in {label}: {name}")
        n = len(result["differ"]) + len(result["only_in_a"]) + len(result["only_in_b"])
        if n:
            print(f"{len(result['differ'])} of {result['compared']} shared tensor(s) differ by more "
                  f"than {args.tolerance:g} step(s); {len(result['only_in_a'])} only in "
                  f"{args.a}, {len(result['only_in_b'])} only in {args.b}")
    failed = result["differ"] or result["only_in_a"] or result["only_in_b"]
    return FAILED if failed else OK


# ----------------------------------------------------------------------------------------------
# verify
# ----------------------------------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace) -> int:
    """Run the QDQ model in ONNX Runtime and check it against the encodings' grids."""
    from quantsim.export.grid_check import check_qdq_model

    inputs = _read_inputs(args.inputs) if args.inputs else None
    report = check_qdq_model(args.model, args.encodings, inputs, seed=args.seed)
    matched = len(report.pairs) - len(report.unmatched)
    if args.json:
        print(json.dumps({"ok": report.ok, "pairs": len(report.pairs), "matched": matched,
                          "problems": report.problems, "unmatched": report.unmatched,
                          "unused": report.unused,
                          "inputs": {k: list(v) for k, v in report.inputs.items()}}, indent=2))
        return OK if report.ok else FAILED
    for line in report.problems:
        print(line)
    source = args.inputs or f"random inputs (seed {args.seed})"
    print(f"{matched}/{len(report.pairs)} Q/DQ pair(s) matched to an encoding, "
          f"{len(report.problems)} problem(s); inputs: {source}")
    if report.unmatched:
        print(f"{len(report.unmatched)} pair(s) without an encoding in the file: "
              f"{', '.join(report.unmatched[:8])}{' ...' if len(report.unmatched) > 8 else ''}")
    if report.unused:
        print(f"{len(report.unused)} encoding(s) of the file have no Q/DQ pair: "
              f"{', '.join(report.unused[:8])}{' ...' if len(report.unused) > 8 else ''}")
    return OK if report.ok else FAILED


def _read_inputs(path: str) -> Dict[str, Any]:
    """Arrays of an ``.npz`` file, keyed by model input name."""
    import numpy as np

    from quantsim.errors import ExportError
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: cannot read the inputs (an .npz of arrays keyed by model "
                          f"input name): {exc}") from exc


# ----------------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    """Run :mod:`quantsim.demo`."""
    from quantsim import demo

    argv = ["--out", args.out] + (["--quick"] if args.quick else []) + ["--seed", str(args.seed)]
    return demo.main(argv)


# ----------------------------------------------------------------------------------------------
# parser and main
# ----------------------------------------------------------------------------------------------
def _file(path: str) -> str:
    """argparse type: an existing file (else a usage error, exit 2)."""
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(
            f"{path}: {'is a directory' if os.path.isdir(path) else 'no such file'}")
    return path


def _config_source(value: str) -> str:
    """argparse type: an existing file or a built-in config name."""
    from quantsim.config import BUILTIN_CONFIGS
    if value in BUILTIN_CONFIGS:
        return value
    try:
        return _file(value)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(
            f"{exc}; built-in configs: {', '.join(sorted(BUILTIN_CONFIGS))}") from None


def build_parser() -> argparse.ArgumentParser:
    """The ``quantsim`` argument parser (one subparser per command)."""
    parser = argparse.ArgumentParser(
        prog="quantsim", description="Check and compare quantsim / AIMET files, verify QDQ "
        "models in ONNX Runtime, run the demo.",
        epilog="exit status: 0 ok, 1 a check failed, 2 bad usage")
    from quantsim import __version__
    parser.add_argument("--version", action="version", version=f"quantsim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], text: str
            ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text,
                           epilog="exit status: 0 ok, 1 a check failed, 2 bad usage")
        p.set_defaults(func=func)
        return p

    p = add("validate-config", cmd_validate_config,
            "Check a hardware config (JSON schema and AIMET's rules); one line per problem.")
    p.add_argument("file", type=_config_source, help="config file, or a built-in name")
    p = add("validate-encodings", cmd_validate_encodings,
            "Check an encodings file (0.6.1, 1.0.0, 2.0.0 or _torch.encodings): the schema "
            "and every entry; one line per problem with its JSON path.")
    p.add_argument("file", type=_file)
    p = add("inspect", cmd_inspect,
            "Table of an encodings file: tensor, dtype/bitwidth, symmetric, granularity, "
            "scale and offset ranges (offsets in AIMET's 1.0.0 convention); totals.")
    p.add_argument("file", type=_file)
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p = add("diff", cmd_diff,
            "Compare two encodings files: tensors whose grid ends moved by more than "
            "--tolerance steps (of A's scale), other kinds, and tensors in one file only.")
    p.add_argument("a", type=_file, metavar="A")
    p.add_argument("b", type=_file, metavar="B")
    p.add_argument("--tolerance", type=float, default=0.0, metavar="STEPS",
                   help="steps a grid end may move without counting (default 0)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = add("verify", cmd_verify,
            "Run a QDQ ONNX model in ONNX Runtime (CPU) and check each Q/DQ pair's scale and "
            "zero point against the encodings file, and that its values lie on the grid.")
    p.add_argument("model", type=_file, metavar="MODEL_qdq.onnx")
    p.add_argument("--encodings", type=_file, required=True, metavar="FILE",
                   help="the ONNX-keyed encodings file (<prefix>.encodings)")
    p.add_argument("--inputs", type=_file, metavar="X.npz",
                   help="inputs keyed by model input name (default: seeded random)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = add("demo", cmd_demo,
            "Train a small CNN on the digits, calibrate with each scheme, QAT, export, verify "
            "in ONNX Runtime, convert to fixed point; an accuracy table and its PNG.")
    p.add_argument("--out", default="quantsim_demo", metavar="DIR",
                   help="folder for the demo's files (default ./quantsim_demo)")
    p.add_argument("--quick", action="store_true", help="a shorter run (fewer epochs/batches)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, init and shuffling")
    return parser


def _usage(args: argparse.Namespace, message: str) -> int:
    print(f"quantsim {args.command}: error: {message}", file=sys.stderr)
    return USAGE


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 check failed, 2 bad usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) or a usage error (2)
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return USAGE
    try:
        return args.func(args)
    except QuantSimError as exc:
        reason = " ".join(str(exc).split("\n"))
        print(f"quantsim {args.command}: error: {reason}", file=sys.stderr)
        return FAILED
