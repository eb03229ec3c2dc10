"""Hostile input to the public API: each gets a typed error that names the culprit.

One row per input: what is called, the ``QuantSimError`` subclass expected, and the text the
message must contain to name the file, JSON key, argument or module at fault. Tests after the
table check that a refused input changed nothing.
"""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import pytest
import torch
from torch import nn

from models import DigitsCNN, digits_data
from quantsim import (FakeQuantState, QuantizationSimModel, convert_qat_model, errors,
                      set_fake_quantize)
from quantsim import encodings as enc_files
from quantsim.checkpoint import load_checkpoint, save_checkpoint
from quantsim.config_utils import (set_blockwise_quantization_for_weights,
                                   set_grouped_blockwise_quantization_for_weights)
from quantsim.config import BUILTIN_CONFIGS, load_config
from quantsim.errors import (BatchNormFoldError, CheckpointError, ConfigError, EncodingsError,
                             ExportError, QuantizationSettingError, QuantSimError,
                             UnsupportedModelError)
from quantsim.export import ExportersFailedError, export, load_encodings
from quantsim.nn.qat import replace_with_qat
from quantsim.prepare import fold_all_batch_norms, fuse_all_conv_bn

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# shared objects (built once; no row changes them)
# ----------------------------------------------------------------------------------------------
@dataclass
class Ctx:
    """What a row works with: a fresh folder, a calibrated sim, its checkpoint and export."""

    tmp: Path
    sim: QuantizationSimModel
    x: torch.Tensor
    checkpoint: Path
    exported: Any


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    torch.manual_seed(0)
    x = digits_data()[0][:32]
    sim = QuantizationSimModel(DigitsCNN(), x[:4], quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(x), None)
    root = tmp_path_factory.mktemp("shared")
    save_checkpoint(sim, root / "sim.qsim")
    exported = export(sim, root / "export", "digits", x[:2])
    return sim, x, root / "sim.qsim", exported


@pytest.fixture
def ctx(shared, tmp_path):
    sim, x, checkpoint, exported = shared
    return Ctx(tmp_path, sim, x, checkpoint, exported)


# ----------------------------------------------------------------------------------------------
# building bad inputs
# ----------------------------------------------------------------------------------------------
def _file(ctx: Ctx, name: str, content: Union[str, bytes]) -> Path:
    path = ctx.tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def _truncated(ctx: Ctx, fraction: float) -> Path:
    data = ctx.checkpoint.read_bytes()
    return _file(ctx, f"truncated_{int(fraction * 100)}.qsim", data[: int(len(data) * fraction)])


def _damaged(ctx: Ctx) -> Path:
    """The pickled format marker's first byte made invalid UTF-8 (zip CRCs are not checked,
    so the unpickler sees it and fails to decode the string)."""
    data = ctx.checkpoint.read_bytes()
    assert data.count(b"quantsim-checkpoint") == 1
    return _file(ctx, "damaged.qsim", data.replace(b"quantsim-checkpoint", b"\xffuantsim-checkpoint"))


def _tampered(ctx: Ctx, change: Callable[[dict], None]) -> Path:
    payload = torch.load(ctx.checkpoint, weights_only=True)
    change(payload)
    torch.save(payload, ctx.tmp / "tampered.qsim")
    return ctx.tmp / "tampered.qsim"


def _config_text(replace: str) -> str:
    """The built-in default config with its ``hw_version`` value replaced by raw JSON text."""
    doc = json.loads(BUILTIN_CONFIGS["default"].read_text())
    doc["defaults"]["hw_version"] = "HW"
    return json.dumps(doc).replace('"HW"', replace)


def _constraint_config(max_text: str) -> str:
    doc = json.loads(BUILTIN_CONFIGS["default"].read_text())
    doc["op_type"]["Relu"] = {"encoding_constraints": {"min": 0.0, "max": "MAX"}}
    return json.dumps(doc).replace('"MAX"', max_text)


def _encodings_1_0_0(offset: Any = -128, name: str = "input") -> dict:
    return {"version": "1.0.0", "param_encodings": [],
            "activation_encodings": [{"bw": 8, "dtype": "INT", "enc_type": "PER_TENSOR",
                                      "is_sym": False, "name": name, "offset": [offset],
                                      "scale": [0.0256]}]}


def _save_with_size_limit(target: Path, limit: int) -> None:
    """save_checkpoint to ``target`` in a child process whose file-size limit (RLIMIT_FSIZE,
    which binds root too) is ``limit`` bytes; the child's error is raised here as the same
    quantsim type, with its message."""
    script = textwrap.dedent(f"""
        import resource, sys, torch
        sys.path.insert(0, {str(HERE)!r})
        from models import DigitsCNN
        from quantsim import QuantizationSimModel
        from quantsim.checkpoint import save_checkpoint
        sim = QuantizationSimModel(DigitsCNN(), torch.randn(2, 1, 8, 8), quant_scheme="tf")
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            save_checkpoint(sim, {str(target)!r})
        except Exception as exc:
            print(type(exc).__name__, "|", str(exc).replace("\\n", " "))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "QUANTSIM_KERNEL": "eager"}, timeout=300)
    name, _, message = result.stdout.strip().rpartition("\n")[2].partition(" | ")
    raise getattr(errors, name, RuntimeError)(message or f"child: {result.stderr[-500:]}")


def _with_size_limit(ctx: Ctx, limit: int) -> None:
    try:
        _save_with_size_limit(ctx.tmp / "limited.qsim", limit)
    finally:
        assert not os.listdir(ctx.tmp), "a temporary file was left behind"


def _read_only_folder(ctx: Ctx) -> None:
    folder = ctx.tmp / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        save_checkpoint(ctx.sim, folder / "sim.qsim")
    finally:
        folder.chmod(0o700)


class _Gain:
    """A plain Python object passed to forward: torch.save pickles it, weights-only loading
    refuses it."""

    value = 2.0


class _Gained(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, gain):
        return self.fc(x) * gain.value


class _SvdNet(nn.Module):
    """A linear layer, then an SVD, which neither of torch's ONNX exporters can export."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.linalg.svd(self.fc(x))[0]


def _export_svd(ctx: Ctx) -> None:
    x = torch.randn(4, 4)
    sim = QuantizationSimModel(_SvdNet(), x, quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(x), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(sim, ctx.tmp, "svd", x)


class _TiedNet(nn.Module):
    """An embedding and an output projection sharing one weight (an LLM's tied embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.lm_head = nn.Linear(16, 32, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens):
        return self.lm_head(self.embed(tokens))


def _export_tied(ctx: Ctx) -> None:
    tokens = torch.randint(0, 32, (2, 5))
    sim = QuantizationSimModel(_TiedNet(), tokens, quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(tokens), None)
    export(sim, ctx.tmp, "tied", tokens)


def _bn_model(eps: float = 0.0, var: float = 0.0) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, eps=eps), nn.ReLU()).eval()
    with torch.no_grad():
        model[1].running_var.fill_(var)
    return model


def _not_onnx(ctx: Ctx) -> Path:
    return _file(ctx, "notes.onnx", "these are notes, not a model\n" * 10)


# ----------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------
@dataclass
class Row:
    """``action(ctx)`` must raise ``error`` whose message contains ``culprit`` (a string, or
    a function of the context for paths)."""

    id: str
    action: Callable[[Ctx], Any]
    error: type
    culprit: Union[str, Callable[[Ctx], str]]


def _in_tmp(name: str) -> Callable[[Ctx], str]:
    return lambda ctx: str(ctx.tmp / name)


ROWS = [
    # -- checkpoints ---------------------------------------------------------------------------
    *[Row(f"checkpoint truncated to {int(f * 100)}%",
          lambda ctx, f=f: load_checkpoint(_truncated(ctx, f), model=DigitsCNN()),
          CheckpointError, _in_tmp(f"truncated_{int(f * 100)}.qsim")) for f in (0.3, 0.6, 0.99)],
    Row("checkpoint with damaged bytes (UnicodeDecodeError)",
        lambda ctx: load_checkpoint(_damaged(ctx), model=DigitsCNN()),
        CheckpointError, _in_tmp("damaged.qsim")),
    Row("checkpoint quantizer entry without bitwidth (KeyError)",
        lambda ctx: load_checkpoint(_tampered(ctx, lambda p: p["quantizers"][
            "conv1.param_quantizers.weight"].pop("bitwidth")), model=DigitsCNN()),
        CheckpointError, "conv1.param_quantizers.weight: settings lack ['bitwidth']"),
    Row("checkpoint init_kwargs with an unknown argument (TypeError)",
        lambda ctx: load_checkpoint(_tampered(ctx, lambda p: p["init_kwargs"].update(zzz=1)),
                                    model=DigitsCNN()),
        CheckpointError, "init_kwargs ['zzz']"),
    Row("checkpoint without its quantizers entry (KeyError)",
        lambda ctx: load_checkpoint(_tampered(ctx, lambda p: p.pop("quantizers")),
                                    model=DigitsCNN()),
        CheckpointError, "no 'quantizers' entry"),
    Row("checkpoint state_dict holding a string",
        lambda ctx: load_checkpoint(_tampered(ctx, lambda p: p["state_dict"].update(
            {"conv1.weight": "weights"})), model=DigitsCNN()),
        CheckpointError, "state_dict entries ['conv1.weight']"),
    Row("checkpoint saved under a path whose parent is a file (FileExistsError)",
        lambda ctx: save_checkpoint(ctx.sim, _file(ctx, "a_file", "x") / "sim.qsim"),
        CheckpointError, _in_tmp("a_file")),
    Row("checkpoint saved over the file-size limit (RuntimeError from torch.save)",
        lambda ctx: _with_size_limit(ctx, 4096), CheckpointError, _in_tmp("limited.qsim")),
    Row("checkpoint saved onto a folder (IsADirectoryError)",
        lambda ctx: save_checkpoint(ctx.sim, ctx.tmp), CheckpointError, "is a folder"),
    pytest.param(Row("checkpoint saved into a read-only folder (PermissionError)",
                     _read_only_folder, CheckpointError, _in_tmp("read_only")),
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root ignores chmod; the "
                                          "size-limit and parent-is-a-file rows cover writes"),
                 id="checkpoint saved into a read-only folder (PermissionError)"),
    Row("checkpoint of a dummy_input that weights-only loading cannot read (fails on load)",
        lambda ctx: save_checkpoint(QuantizationSimModel(_Gained(), (torch.randn(2, 4), _Gain())),
                                    ctx.tmp / "sim.qsim"),
        CheckpointError, "dummy_input[1] is a _Gain"),
    Row("load_checkpoint with a function as the model (AttributeError)",
        lambda ctx: load_checkpoint(ctx.checkpoint, model=lambda x: x),
        UnsupportedModelError, "load_checkpoint(model=...)"),
    # -- hardware configs ----------------------------------------------------------------------
    Row("config nested 100k deep (RecursionError)",
        lambda ctx: load_config(_file(ctx, "deep.json", "[" * 100_000 + "]" * 100_000)),
        ConfigError, _in_tmp("deep.json")),
    Row("config with a 5,000-digit integer (ValueError from int parsing)",
        lambda ctx: load_config(_file(ctx, "digits.json", _config_text("9" * 5000))),
        ConfigError, _in_tmp("digits.json")),
    Row("config constraint beyond float range (OverflowError)",
        lambda ctx: load_config(_file(ctx, "huge.json", _constraint_config("9" * 400))),
        ConfigError, "op_type.Relu.encoding_constraints"),
    Row("config dict nested 5,000 deep (RecursionError)",
        lambda ctx: load_config(_nested_dict(5000)), ConfigError, "<dict>: nested too deeply"),
    Row("config path longer than the file system allows (OSError)",
        lambda ctx: load_config(str(ctx.tmp / ("c" * 300 + ".json"))),
        ConfigError, "File name too long"),
    # -- encodings -----------------------------------------------------------------------------
    Row("encodings file in Latin-1 (UnicodeDecodeError)",
        lambda ctx: enc_files.load(_file(ctx, "latin1.encodings", json.dumps(
            _encodings_1_0_0(name="eing\u00e4nge"), ensure_ascii=False).encode("latin-1"))),
        EncodingsError, _in_tmp("latin1.encodings")),
    Row("encodings file nested 100k deep (RecursionError)",
        lambda ctx: enc_files.load(_file(ctx, "deep.encodings", "[" * 100_000 + "]" * 100_000)),
        EncodingsError, _in_tmp("deep.encodings")),
    Row("encodings offset of 5,000 digits (ValueError from int parsing)",
        lambda ctx: enc_files.load(_file(ctx, "digits.encodings", json.dumps(
            _encodings_1_0_0(offset="OFF")).replace('"OFF"', "-" + "1" * 5000))),
        EncodingsError, _in_tmp("digits.encodings")),
    Row("encodings path with a NUL character (ValueError)",
        lambda ctx: enc_files.load(str(ctx.tmp / "a\0b.encodings")), EncodingsError, "NUL"),
    Row("encodings offset +500 at 8 bits: a grid without 0 (accepted: every value 12.8+)",
        lambda ctx: load_encodings(ctx.sim, _encodings_1_0_0(offset=500)),
        EncodingsError, "activation_encodings[0] ('input'): offset[0] = 500"),
    Row("encodings offset -1e30 (accepted: a grid far below 0)",
        lambda ctx: enc_files.load(_encodings_1_0_0(offset=-10**30)),
        EncodingsError, "offset[0] = -1000000000000000000000000000000"),
    *[Row(f"load_encodings {flag}={value!r} (acted as {bool(value)})",
          lambda ctx, flag=flag, value=value: load_encodings(
              ctx.sim, ctx.exported.torch_encodings, **{flag: value}),
          EncodingsError, f"{flag} must be")
      for flag, value in (("strict", "False"), ("requires_grad", "no"), ("partial", 0),
                          ("allow_overwrite", "yes"))],
    Row("load_encodings into a float model instead of a sim (AttributeError)",
        lambda ctx: load_encodings(DigitsCNN(), ctx.exported.torch_encodings),
        EncodingsError, "sim must be a QuantizationSimModel, got DigitsCNN"),
    # -- export --------------------------------------------------------------------------------
    Row("export of tied weights (ONNX keeps one of the two names)", _export_tied, ExportError,
        "embed.weight = lm_head.weight"),
    Row("export prefix with a NUL character (ValueError)",
        lambda ctx: export(ctx.sim, ctx.tmp, "a\0b", ctx.x[:2]), ExportError, "filename_prefix"),
    Row("export prefix that is an int (TypeError)",
        lambda ctx: export(ctx.sim, ctx.tmp, 5, ctx.x[:2]), ExportError, "filename_prefix 5"),
    Row("export prefix too long for file names (OSError in a temporary path)",
        lambda ctx: export(ctx.sim, ctx.tmp, "p" * 250, ctx.x[:2]),
        ExportError, "filename_prefix 'pppp"),
    Row("export path None (TypeError)",
        lambda ctx: export(ctx.sim, None, "m", ctx.x[:2]), ExportError, "path must be"),
    Row("export path with a NUL character (ValueError)",
        lambda ctx: export(ctx.sim, str(ctx.tmp) + "\0x", "m", ctx.x[:2]),
        ExportError, "path must be"),
    Row("export_to_torchscript='False' (acted as True)",
        lambda ctx: export(ctx.sim, ctx.tmp, "m", ctx.x[:2], export_to_torchscript="False"),
        ExportError, "export_to_torchscript must be True or False"),
    Row("propagate_encodings='no' (acted as True)",
        lambda ctx: export(ctx.sim, ctx.tmp, "m", ctx.x[:2], propagate_encodings="no"),
        ExportError, "propagate_encodings must be True or False"),
    Row("export of a float model instead of a sim (AttributeError)",
        lambda ctx: export(DigitsCNN(), ctx.tmp, "m", ctx.x[:2]),
        ExportError, "sim must be a QuantizationSimModel, got DigitsCNN"),
    Row("export whose exporters both fail: the cause, not '...Next steps:'",
        _export_svd, ExportersFailedError, "linalg_svd"),
    Row("convert_qat_model on a text file (protobuf DecodeError)",
        lambda ctx: convert_qat_model(str(_not_onnx(ctx)), str(ctx.tmp / "out")),
        ExportError, _in_tmp("notes.onnx")),
    Row("convert_qat_model on an empty file (read as an empty model)",
        lambda ctx: convert_qat_model(str(_file(ctx, "empty.onnx", b"")), str(ctx.tmp / "o")),
        ExportError, "empty.onnx is not an ONNX model"),
    # -- models and arguments ------------------------------------------------------------------
    Row("QuantizationSimModel of a function (AttributeError)",
        lambda ctx: QuantizationSimModel(lambda x: x, ctx.x[:2]),
        UnsupportedModelError, "QuantizationSimModel(model=...): expected a torch.nn.Module"),
    Row("QuantizationSimModel of a class, not an instance (TypeError)",
        lambda ctx: QuantizationSimModel(DigitsCNN, ctx.x[:2]),
        UnsupportedModelError, "the class DigitsCNN itself"),
    Row("QuantizationSimModel in_place='no' (acted as True)",
        lambda ctx: QuantizationSimModel(DigitsCNN(), ctx.x[:2], in_place="no"),
        QuantizationSettingError, "in_place must be True or False"),
    Row("exclude_layers_from_quantization('conv1') (read letter by letter)",
        lambda ctx: ctx.sim.exclude_layers_from_quantization("conv1"),
        UnsupportedModelError, "layers must be a list"),
    Row("exclude_layers_from_quantization(None) (TypeError)",
        lambda ctx: ctx.sim.exclude_layers_from_quantization(None),
        UnsupportedModelError, "layers must be a list"),
    Row("set_fake_quantize with an unknown state (ValueError)",
        lambda ctx: set_fake_quantize(ctx.sim, "training"),
        QuantizationSettingError, "state 'training' is not a FakeQuantState"),
    Row("set_fake_quantize of a function (AttributeError)",
        lambda ctx: set_fake_quantize(lambda x: x, FakeQuantState.QAT),
        UnsupportedModelError, "set_fake_quantize: expected a torch.nn.Module"),
    Row("replace_with_qat of a function (AttributeError)",
        lambda ctx: replace_with_qat(lambda x: x),
        UnsupportedModelError, "replace_with_qat(model=...): expected a torch.nn.Module"),
    # -- BatchNorm folding ---------------------------------------------------------------------
    Row("fold_all_batch_norms with var = 0 and eps = 0 (silent inf weights)",
        lambda ctx: fold_all_batch_norms(_bn_model(eps=0.0, var=0.0), (1, 1, 8, 8)),
        BatchNormFoldError, "module '1' (BatchNorm2d)"),
    Row("fuse_all_conv_bn with a negative running_var (silent NaN weights)",
        lambda ctx: fuse_all_conv_bn(_bn_model(eps=1e-5, var=-1.0), (1, 1, 8, 8)),
        BatchNormFoldError, "module '1' (BatchNorm2d)"),
    Row("fold_all_batch_norms of a function (AttributeError)",
        lambda ctx: fold_all_batch_norms(lambda x: x, (1, 1, 8, 8)),
        UnsupportedModelError, "expected a torch.nn.Module"),
    Row("fold_all_batch_norms with input_shapes 'abc' (TypeError from torch.randn)",
        lambda ctx: fold_all_batch_norms(_bn_model(eps=1e-5, var=1.0), "abc"),
        UnsupportedModelError, "input_shapes must be"),
    Row("fold_all_batch_norms with shapes the model does not take (RuntimeError)",
        lambda ctx: fold_all_batch_norms(_bn_model(eps=1e-5, var=1.0), (1, 3, 8, 8)),
        UnsupportedModelError, "forward failed with the input_shapes (1, 3, 8, 8)"),
    # -- per-block weights (quantsim.config_utils; every check runs before anything changes) ---
    Row("blockwise block_size that does not divide a picked weight's inputs",
        lambda ctx: set_blockwise_quantization_for_weights(ctx.sim, [nn.Conv2d], 4, True, 8),
        QuantizationSettingError,
        "conv1: weight of shape [16, 1, 3, 3] has 1 inputs (dimension 1), not a multiple of "
        "block_size 8"),
    Row("blockwise on a module listed by name that has no weight",
        lambda ctx: set_blockwise_quantization_for_weights(ctx.sim, [ctx.sim.model.relu1], 4,
                                                           True, 8),
        QuantizationSettingError, "relu1 has no weight quantizer"),
    Row("blockwise bitwidth 3",
        lambda ctx: set_blockwise_quantization_for_weights(ctx.sim, [nn.Linear], 3, True, 32),
        QuantizationSettingError,
        "set_blockwise_quantization_for_weights: integer bitwidth 3 is not supported"),
    Row("blockwise block_size given as a string",
        lambda ctx: set_blockwise_quantization_for_weights(ctx.sim, [nn.Linear], 4, True, "32"),
        QuantizationSettingError, "block_size must be a positive integer"),
    Row("blockwise arg that is a module name string",
        lambda ctx: set_blockwise_quantization_for_weights(ctx.sim, "fc", 4, True, 32),
        QuantizationSettingError, "arg must be a list of module types"),
    Row("blockwise arg holding a module of another model",
        lambda ctx: set_blockwise_quantization_for_weights(ctx.sim, [nn.Linear(2, 2)], 4, True,
                                                           2),
        QuantizationSettingError, "not quantized modules of sim.model: ['Linear']"),
    Row("LPBQ with symmetric=False",
        lambda ctx: set_grouped_blockwise_quantization_for_weights(ctx.sim, [nn.Linear], 4,
                                                                   False, 8, 32),
        QuantizationSettingError, "LPBQ needs symmetric=True"),
    Row("LPBQ decompressed_bw below the bitwidth",
        lambda ctx: set_grouped_blockwise_quantization_for_weights(ctx.sim, [nn.Linear], 4,
                                                                   True, 2, 32),
        QuantizationSettingError, "decompressed_bw must be an integer in 4..31"),
    Row("LPBQ block_grouping other than -1 or the blocks per channel",
        lambda ctx: set_grouped_blockwise_quantization_for_weights(ctx.sim, [nn.Linear], 4,
                                                                   True, 8, 32, 4),
        QuantizationSettingError, "fc: block_grouping 4 is not supported; allowed: -1 or 16"),
]


def _nested_dict(depth: int) -> dict:
    root: dict = {}
    node = root
    for _ in range(depth):
        node["a"] = {}
        node = node["a"]
    return root


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_gets_a_typed_error_naming_the_culprit(row: Row, ctx: Ctx):
    """The error is the row's QuantSimError subclass and its message names the culprit."""
    culprit = row.culprit(ctx) if callable(row.culprit) else row.culprit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sims of odd models warn about what they skip
        with pytest.raises(row.error, match=re.escape(culprit)) as info:
            row.action(ctx)
    assert isinstance(info.value, QuantSimError)


# ----------------------------------------------------------------------------------------------
# a refused input changes nothing
# ----------------------------------------------------------------------------------------------
def test_refused_encodings_change_no_quantizer(ctx: Ctx):
    """load_encodings checks every entry against its quantizer before setting any: a file
    whose last entry does not fit (strict) leaves the quantizers of the earlier, valid entries
    as they were."""
    sim = copy.deepcopy(ctx.sim)
    before = _encodings(sim)
    doc = json.loads(Path(ctx.exported.torch_encodings).read_text())
    for entries in doc["param_encodings"].values():
        for entry in entries:
            entry["scale"] *= 2
    last = list(doc["activation_encodings"])[-1]
    slot = next(iter(doc["activation_encodings"][last].values()))
    next(iter(slot.values()))["bitwidth"] = 16
    with pytest.raises(EncodingsError, match=f"{re.escape(last)}.*bitwidth 16 != the quantizer's 8"):
        load_encodings(sim, doc)
    assert _encodings(sim) == before
    load_encodings(sim, doc, strict=False)  # the same file loads when the bitwidth may change
    after = _encodings(sim)
    assert {n for n in before if after[n] != before[n]} == {
        n for n in before if ".param_quantizers." in n} | {f"{last}.output_quantizers.0"}


def _encodings(sim: QuantizationSimModel) -> dict:
    """Each quantizer's encoding as plain data (an Encoding from ``q.encoding`` may share its
    tensors with the quantizer)."""
    return {n: q.encoding.to_dict() for n, q in sim.named_quantizers() if q.is_initialized}


def test_integral_float_bitwidth_reads_as_an_int(ctx: Ctx):
    """``"bw": 8.0`` (valid JSON for an integer) is read as 8 and written back as 8."""
    doc = _encodings_1_0_0()
    doc["activation_encodings"][0]["bw"] = 8.0
    enc = enc_files.load(doc).activation["input"]
    assert type(enc.bitwidth) is int and enc.bitwidth == 8
    written = enc_files.to_json_dict(enc_files.load(doc), "1.0.0")
    assert written["activation_encodings"][0]["bw"] == 8
    assert type(written["activation_encodings"][0]["bw"]) is int


def test_refused_fold_changes_no_module():
    """A BatchNorm that cannot fold, found after a foldable one, leaves both pairs as they
    were: the statistics are checked before any module changes."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, eps=0.0)).eval()
    with torch.no_grad():
        model[4].running_var[2] = 0.0
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(BatchNormFoldError, match=r"module '4'.*channel 2 .*\[2\]"):
        fold_all_batch_norms(model, (1, 1, 10, 10))
    assert [type(m) for m in model] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d,
                                        nn.BatchNorm2d]
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_failed_save_keeps_the_old_checkpoint(ctx: Ctx):
    """A save that hits the file-size limit leaves the checkpoint it would have replaced
    byte-identical, and no temporary file beside it."""
    target = ctx.tmp / "sim.qsim"
    target.write_bytes(ctx.checkpoint.read_bytes())
    with pytest.raises(CheckpointError, match=re.escape(str(target))):
        _save_with_size_limit(target, 4096)
    assert target.read_bytes() == ctx.checkpoint.read_bytes()
    assert os.listdir(ctx.tmp) == ["sim.qsim"]


def test_failed_export_keeps_the_cause(ctx: Ctx):
    """Both exporters' errors are kept: the TorchScript one chained as the cause, the dynamo
    one as an attribute, and each one's essence (the op that failed) in the message."""
    with pytest.raises(ExportersFailedError) as info:
        _export_svd(ctx)
    message = str(info.value)
    assert not message.rstrip().endswith("Next steps:")
    assert "torch.export (dynamo):" in message and "TorchScript exporter:" in message
    assert info.value.__cause__ is info.value.torchscript_error
    assert "linalg_svd" in str(info.value.torchscript_error)
    assert info.value.dynamo_error is not None
    assert not list(ctx.tmp.iterdir())  # nothing was written
