"""The ``quantsim`` command line: exit codes, one line per problem, inspect / diff / verify on
real exports and AIMET's files, every bad file in tests/data/bad refused with one line."""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import EXAMPLES, ROOT
from quantsim import QuantizationSimModel, cli
from quantsim.encoding import Encoding
from quantsim.encodings import load

pytestmark = pytest.mark.usefixtures("one_thread")

BAD = ROOT / "tests" / "data" / "bad"
#: AIMET's hardware configs
CONFIGS = [EXAMPLES / n for n in ("default_config.json", "default_config_per_channel.json",
                                  "htp_config_example.json")]
#: aimet-torch 2.42's 1.0.0 and 2.0.0 files of one model (per-channel weights)
AIMET_ENCODINGS = [EXAMPLES / "example_encodings.json", EXAMPLES / "example_encodings_v2.0.0.json"]


def run(*argv: str) -> Tuple[int, str, str]:
    """``quantsim <argv>`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def bad_files() -> List[Path]:
    return sorted(p for p in BAD.iterdir() if p.name != "README.md")


# ----------------------------------------------------------------------------------------------
# exports shared by the tests (one sim per layout, calibrated once)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exports(tmp_path_factory, trained_digits_cnn, digits):
    """``{name: ExportedFiles}``: W8A8 per-tensor (1.0.0) and W4A8 per-channel (2.0.0) exports
    of the trained digits CNN, calibrated with tf on 256 training images."""
    x = digits[0][:256]
    out = {}
    for name, kwargs, version in (("w8a8", {}, "1.0.0"),
                                  ("w4a8", dict(default_param_bw=4, config_file="per_channel"),
                                   "2.0.0")):
        sim = QuantizationSimModel(trained_digits_cnn, x[:1], quant_scheme="tf", **kwargs)
        sim.compute_encodings(lambda m, _: m(x), None)
        out[name] = sim.export(str(tmp_path_factory.mktemp(name)), "model", x[:1],
                               encoding_version=version)
    return out


# ----------------------------------------------------------------------------------------------
# usage and help
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [[], ["nonsense"], ["inspect"], ["inspect", "/no/such/file"],
                                  ["diff", str(AIMET_ENCODINGS[0])],
                                  ["inspect", str(AIMET_ENCODINGS[0]), "--bogus"],
                                  ["diff", str(AIMET_ENCODINGS[0]), str(AIMET_ENCODINGS[0]),
                                   "--tolerance", "-1"],
                                  ["verify", str(AIMET_ENCODINGS[0])],
                                  ["validate-config", str(BAD)]])
def test_bad_usage_exits_2_with_a_reason(argv):
    code, _, err = run(*argv)
    assert code == cli.USAGE
    assert err.strip(), "a usage error says why"


@pytest.mark.parametrize("command", [None, "validate-config", "validate-encodings", "inspect",
                                     "diff", "verify", "demo"])
def test_help_everywhere(command):
    code, out, _ = run(*([command] if command else []), "--help")
    assert code == 0 and out.startswith("usage: quantsim")
    assert "exit status: 0 ok, 1 a check failed, 2 bad usage" in " ".join(out.split())


# ----------------------------------------------------------------------------------------------
# every bad file of the test data: non-zero, one line per problem, no traceback
# ----------------------------------------------------------------------------------------------
def _commands_for(path: Path) -> List[List[str]]:
    if "config" in path.name:
        return [["validate-config", str(path)]]
    if path.suffix == ".onnx":
        return [["verify", str(path), "--encodings", str(AIMET_ENCODINGS[0])]]
    return [["validate-encodings", str(path)], ["inspect", str(path)],
            ["diff", str(path), str(path)]]


@pytest.mark.parametrize("path", bad_files(), ids=lambda p: p.name)
def test_each_bad_file_is_refused_with_a_one_line_reason(path):
    for argv in _commands_for(path):
        code, out, err = run(*argv)
        assert code == cli.FAILED, (argv, out, err)
        assert "Traceback" not in out + err
        if argv[0].startswith("validate"):
            *problems, summary = out.strip().splitlines()
            assert summary == f"{len(problems)} problem(s)"
            assert problems and all(line.startswith(f"{path}: ") for line in problems), out
        else:
            assert not out and len(err.strip().splitlines()) == 1, (argv, err)
            assert err.startswith(f"quantsim {argv[0]}: error: ") and str(path) in err


def test_validate_encodings_lists_every_problem_with_its_json_path():
    """Schema problems all at once; once the schema holds, every entry's problem."""
    code, out, _ = run("validate-encodings", BAD / "encodings_schema.encodings")
    assert code == 1
    assert "activation_encodings[0].scale[0]: expected a number, got '0.1'" in out
    assert "param_encodings[0].bw: expected an integer, got 'eight'" in out
    code, out, _ = run("validate-encodings", BAD / "encodings_semantic.encodings")
    lines = out.splitlines()
    assert code == 1 and lines[-1] == "3 problem(s)"
    assert "activation_encodings[0] ('input'): scale[0] = -0.1" in lines[0]
    assert "activation_encodings[1] ('/relu1/Relu_output_0'): offset[0] = 300" in lines[1]
    assert "param_encodings[0] ('conv1.weight'): is_sym is true" in lines[2]


def test_validate_config_lists_schema_and_semantic_problems():
    code, out, _ = run("validate-config", BAD / "config_semantic.json")
    assert code == 1 and out.splitlines()[-1] == "3 problem(s)"
    assert "supergroups[0].op_list[1]: unknown op type 'Rleu' (did you mean 'Relu'?)" in out
    code, out, _ = run("validate-config", BAD / "config_schema.json")
    assert code == 1 and "(did you mean 'per_channel_quantization'?)" in out


# ----------------------------------------------------------------------------------------------
# good files
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", CONFIGS + ["default", "htp"], ids=str)
def test_aimet_and_builtin_configs_validate(path):
    code, out, _ = run("validate-config", path)
    assert code == 0 and out.strip().endswith("supergroup(s))") and ": ok (" in out


@pytest.mark.parametrize("path", AIMET_ENCODINGS, ids=lambda p: p.name)
def test_aimet_encodings_validate_and_inspect(path):
    assert run("validate-encodings", path)[0] == 0
    code, out, _ = run("inspect", path, "--json")
    assert code == 0
    doc = json.loads(out)
    file = load(path)
    names = set(file.activation) | set(file.param) | set(file.bias)
    assert {r["tensor"] for r in doc["encodings"]} == names
    assert doc["totals"]["encodings"] == len(names)
    weight = next(r for r in doc["encodings"] if r["tensor"] == "conv1.weight")
    enc = file.param["conv1.weight"]
    assert weight["granularity"] == "per-channel" and weight["scales"] == enc.scale.numel()
    assert weight["scale_min"] == pytest.approx(float(enc.scale.min()), rel=0)
    assert (weight["offset_min"], weight["offset_max"], weight["symmetric"]) == (-128, -128, True)


def test_inspect_table_and_totals(exports):
    code, out, _ = run("inspect", exports["w4a8"].encodings)
    assert code == 0
    lines = out.splitlines()
    assert lines[1].split() == ["tensor", "kind", "dtype", "symmetric", "granularity", "scale",
                                "offset"]
    conv1 = next(line for line in lines if line.startswith("conv1.weight "))
    assert " int4 " in conv1 and " per-channel (" in conv1 and conv1.rstrip().endswith("-8")
    assert next(line for line in lines if line.startswith("conv1.bias ")).split()[2] == "int32"
    assert lines[-1].startswith("12 encodings: 6 activation, 3 bias, 3 param; 3 int32, 3 int4, "
                                "6 int8; ")


def test_inspect_reads_the_module_keyed_layout(exports):
    code, out, _ = run("inspect", exports["w8a8"].torch_encodings, "--json")
    assert code == 0
    names = {r["tensor"] for r in json.loads(out)["encodings"]}
    assert "conv1.input[0]" in names and "fc.output[0]" in names and "conv1.weight" in names


# ----------------------------------------------------------------------------------------------
# diff
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["aimet-1.0.0", "aimet-2.0.0", "w8a8", "w4a8", "w8a8-torch"])
def test_diff_of_a_file_with_itself_reports_nothing(which, exports):
    path = {"aimet-1.0.0": AIMET_ENCODINGS[0], "aimet-2.0.0": AIMET_ENCODINGS[1]}.get(which)
    if path is None:
        files = exports[which.split("-")[0]]
        path = files.torch_encodings if which.endswith("torch") else files.encodings
    assert run("diff", path, path) == (0, "", "")


def _shifted_copy(src: Path, dst: Path, name: str, steps: int) -> None:
    """A 1.0.0 file with the legacy offset of activation ``name`` moved by ``steps``."""
    doc = json.loads(src.read_text())
    entry = next(e for e in doc["activation_encodings"] if e["name"] == name)
    entry["offset"] = [o + steps for o in entry["offset"]]
    dst.write_text(json.dumps(doc))


def test_diff_counts_steps_and_obeys_the_tolerance(exports, tmp_path):
    src = Path(exports["w8a8"].encodings)
    doc = json.loads(src.read_text())
    name = next(e["name"] for e in doc["activation_encodings"] if e["offset"][0] <= -3)
    shifted = tmp_path / "shifted.encodings"
    _shifted_copy(src, shifted, name, 3)
    code, out, _ = run("diff", src, shifted)
    assert code == 1 and out.splitlines()[0] == f"differs: {name}: 3 steps"
    assert run("diff", src, shifted, "--tolerance", "3")[0] == 0
    code, out, _ = run("diff", src, shifted, "--tolerance", "2.5", "--json")
    assert code == 1 and json.loads(out)["differ"] == [{"tensor": name, "steps": 3.0, "reason": ""}]


def test_diff_lists_tensors_in_one_file_only_and_other_kinds(exports):
    code, out, _ = run("diff", exports["w8a8"].encodings, exports["w4a8"].encodings, "--json")
    result = json.loads(out)
    assert code == 1
    assert {"conv1.bias", "conv2.bias", "fc.bias"} <= set(result["only_in_b"])
    weights = {d["tensor"]: d for d in result["differ"] if d["tensor"].endswith(".weight")}
    assert set(weights) == {"conv1.weight", "conv2.weight", "fc.weight"}
    assert all(d["steps"] is None and "int8" in d["reason"] and "int4" in d["reason"]
               for d in weights.values())


@settings(max_examples=60, deadline=None)
@given(bitwidth=st.sampled_from([4, 8, 16]), lo=st.floats(-100, -1e-3), hi=st.floats(1e-3, 100),
       shift=st.integers(-5, 5))
def test_compare_counts_an_offset_shift_in_steps(bitwidth, lo, hi, shift):
    """Moving the offset by k moves both grid ends by k steps exactly (k * scale / scale; the
    float64 division of a float32 product is exact to far below 1e-9 of a step)."""
    a = Encoding.from_range(torch.tensor(lo), torch.tensor(hi), bitwidth=bitwidth)
    b = Encoding(bitwidth, a.scale, a.offset + shift)
    steps, reason = cli.compare(a, b)
    assert reason == "" and math.isclose(steps, abs(shift), abs_tol=1e-9)
    assert cli.compare(a, a) == (0.0, "")


# ----------------------------------------------------------------------------------------------
# verify
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["w8a8", "w4a8"])
def test_verify_an_export_passes(exports, name):
    files = exports[name]
    code, out, _ = run("verify", files.qdq_onnx, "--encodings", files.encodings)
    assert code == 0, out
    assert out.startswith("9/9 Q/DQ pair(s) matched to an encoding, 0 problem(s); inputs: random")


def test_verify_with_given_inputs(exports, digits, tmp_path):
    files = exports["w8a8"]
    npz = tmp_path / "x.npz"
    np.savez(npz, x=digits[2][:1].numpy())  # the export's batch size is fixed at 1
    code, out, _ = run("verify", files.qdq_onnx, "--encodings", files.encodings, "--inputs", npz,
                       "--json")
    assert code == 0 and json.loads(out)["inputs"] == {"x": [1, 1, 8, 8]}
    np.savez(npz, x=digits[2][:32].numpy())
    code, out, err = run("verify", files.qdq_onnx, "--encodings", files.encodings, "--inputs", npz)
    assert code == 1 and "input 'x' has shape [32, 1, 8, 8]; the model takes shape [1, 1, 8, 8]" in err
    np.savez(npz, image=digits[2][:32].numpy())
    code, out, err = run("verify", files.qdq_onnx, "--encodings", files.encodings, "--inputs", npz)
    assert code == 1 and not out and "['image'] are not inputs of the model" in err


def test_verify_finds_an_encodings_file_that_does_not_match(exports, tmp_path):
    """A scale 1 % off, another one float32 ulp off, a zero point moved: each pair named; the
    1 % scale also puts the activation's values off the file's grid in ORT (one ulp is below
    float32 rounding at run time, so only the static check can see it)."""
    files = exports["w8a8"]
    doc = json.loads(Path(files.encodings).read_text())
    act = next(e for e in doc["activation_encodings"] if e["name"] == "/relu1/Relu_output_0")
    act["scale"] = [act["scale"][0] * 1.01]
    out_act = next(e for e in doc["activation_encodings"] if e["name"] == "/relu2/Relu_output_0")
    out_act["scale"] = [float(np.nextafter(np.float32(out_act["scale"][0]), np.float32(1)))]
    weight = doc["param_encodings"][0]
    weight["offset"] = [o + 1 for o in weight["offset"]]
    weight["is_sym"] = False
    tampered = tmp_path / "tampered.encodings"
    tampered.write_text(json.dumps(doc))
    code, out, _ = run("verify", files.qdq_onnx, "--encodings", tampered)
    assert code == 1
    relu = [line for line in out.splitlines() if "(/relu1/Relu_output_0): " in line]
    assert any("scale[0] = " in line for line in relu)
    assert any("values off the grid" in line for line in relu)
    assert any(f"({weight['name']}): zero point[0] = " in line for line in out.splitlines())
    relu2 = [line for line in out.splitlines() if "(/relu2/Relu_output_0): " in line]
    assert relu2 and all("scale[0] = " in line for line in relu2)


def test_verify_of_the_float_model_fails(exports):
    """The float ``<prefix>.onnx`` (no Q/DQ pairs) given by mistake is a failed check."""
    files = exports["w8a8"]
    code, out, _ = run("verify", files.onnx, "--encodings", files.encodings)
    assert code == 1 and "no QuantizeLinear of the model quantizes a tensor" in out


def test_verify_refuses_a_module_keyed_file(exports):
    files = exports["w8a8"]
    code, out, err = run("verify", files.qdq_onnx, "--encodings", files.torch_encodings)
    assert code == 1 and "module-keyed _torch.encodings" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# per-block and LPBQ encodings: inspect and diff stay generic over kinds
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["1.0.0", "2.0.0"])
def test_per_block_and_lpbq_files(tmp_path, version):
    from quantsim.encodings import EncodingsFile, write

    block = Encoding(4, torch.full((4, 2), 0.1), torch.zeros(4, 2), True, False, False, 0, "int",
                     16)
    lpbq = Encoding.lpbq(torch.tensor([[1.0, 4.0], [2.0, 3.0]]), torch.tensor([0.01, 0.02]), 4, 8,
                         32)
    act = Encoding.from_range(torch.tensor(-1.0), torch.tensor(1.0))
    path = tmp_path / "blocks.encodings"
    write(path, EncodingsFile(version=version, param={"fc.weight": block, "fc2.weight": lpbq},
                              activation={"x": act}), version)
    assert run("validate-encodings", path)[0] == 0
    code, out, _ = run("inspect", path, "--json")
    rows = {r["tensor"]: r for r in json.loads(out)["encodings"]}
    assert code == 0
    if version == "2.0.0":  # 1.0.0 PER_BLOCK entries record no channel count (one row of blocks)
        assert (rows["fc.weight"]["granularity"], rows["fc.weight"]["scales"]) == ("per-block", 8)
    assert rows["fc.weight"]["block_size"] == 16
    assert rows["fc2.weight"]["granularity"] == "LPBQ" and rows["fc2.weight"]["block_size"] == 32
    assert rows["fc2.weight"]["scale_max"] == pytest.approx(0.06, rel=1e-6)
    assert run("diff", path, path) == (0, "", "")
    moved = tmp_path / "moved.encodings"
    write(moved, EncodingsFile(version=version, param={"fc.weight": Encoding(
        4, torch.full((4, 2), 0.1), torch.zeros(4, 2), False, False, False, 0, "int", 16),
        "fc2.weight": lpbq}, activation={"x": act}), version)
    code, out, _ = run("diff", path, moved)
    assert code == 1 and out.startswith("differs: fc.weight: int4 symmetric per-block vs int4 "
                                        "asymmetric per-block")


def test_aimet_blockwise_and_lpbq_files():
    """aimet-torch 2.42's per-block and LPBQ files (1.0.0 and 2.0.0 of one export): valid,
    inspected with their granularity, and the two versions' weights equal (a 1.0.0 PER_BLOCK
    entry is one row of the same blocks), the LPBQ weights another kind."""
    names = ("blockwise_encodings.json", "blockwise_encodings_v2.0.0.json",
             "lpbq_encodings.json", "lpbq_encodings_v2.0.0.json")
    block_v1, block_v2, lpbq_v1, lpbq_v2 = (EXAMPLES / n for n in names)
    for path, kind in ((block_v1, "per-block"), (block_v2, "per-block"), (lpbq_v1, "LPBQ"),
                       (lpbq_v2, "LPBQ")):
        assert run("validate-encodings", path)[0] == 0
        code, out, _ = run("inspect", path, "--json")
        rows = {r["tensor"]: r for r in json.loads(out)["encodings"]}
        assert code == 0 and rows["fc1.weight"]["granularity"] == kind
        assert rows["fc1.weight"]["block_size"] == 32 and rows["fc1.weight"]["scales"] == 512
    for a, b in ((block_v1, block_v2), (lpbq_v1, lpbq_v2)):
        result = json.loads(run("diff", a, b, "--json")[1])
        assert not [d for d in result["differ"] if d["tensor"].endswith(".weight")], result
    result = json.loads(run("diff", block_v2, lpbq_v2, "--json")[1])
    kinds = {d["tensor"]: d["reason"] for d in result["differ"] if d["tensor"].endswith(".weight")}
    assert kinds == {n: "int4 symmetric per-block vs int4 symmetric LPBQ"
                     for n in ("conv.weight", "fc1.weight", "fc2.weight")}


def test_validate_config_prints_warnings_but_passes(tmp_path):
    """An op type quantsim does not know has no effect (a ConfigWarning), not an error."""
    doc = json.loads((EXAMPLES / "default_config.json").read_text())
    doc["op_type"]["Convv"] = {"is_output_quantized": "True"}
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(doc))
    code, out, _ = run("validate-config", path)
    lines = out.splitlines()
    assert code == 0 and lines[-1].startswith(f"{path}: ok (")
    assert lines[0].startswith(f"warning: {path}: op_type.Convv: unknown op type 'Convv'")
