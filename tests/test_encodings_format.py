"""Encodings files: schema, golden vectors from AIMET's files, round trips and error messages.

Golden vectors are FORMATS §2.3/§2.4/§2.9 (checked against aimet-torch 2.42 files); the two
example files are AIMET's own exports and must validate and load unchanged.
"""
import copy
import doctest
import json
import os

import jsonschema
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import EXAMPLES
import quantsim.encodings as encodings_module
from quantsim.encoding import Encoding
from quantsim.encodings import (
    EncodingsFile,
    Int32BiasEncoding,
    bias_entry,
    bias_entry_from_values,
    detect_layout,
    from_entry,
    load,
    quantizer_args,
    schema,
    to_entry,
    to_json_dict,
    write,
    write_torch_encodings,
)
from quantsim.errors import EncodingsError

V1_FILE = EXAMPLES / "example_encodings.json"
V2_FILE = EXAMPLES / "example_encodings_v2.0.0.json"

# Peer vectors (FORMATS §2.3, §2.4, §2.9)
CONV1_IN_SCALE = 0.030594557523727417
FC_OUT_SCALE = 0.0031666315626353025
CONV1_W_SCALE0 = 0.0014564350713044405

MODES = ("asym", "sym", "strict", "unsigned")


def _enc(bitwidth, scale, offset=0.0, mode="asym", axis=None):
    return Encoding(bitwidth, torch.tensor(scale, dtype=torch.float32),
                    torch.tensor(offset, dtype=torch.float32), symmetric=mode != "asym",
                    strict=mode == "strict", unsigned=mode == "unsigned", axis=axis)


def _assert_same(back, enc):
    """Same value: flags, axis, grid, bit-identical float32 scales, identical offsets."""
    assert back == enc
    assert (back.qmin, back.qmax) == (enc.qmin, enc.qmax)
    assert torch.equal(back.scale.view(torch.int32), enc.scale.view(torch.int32))
    assert torch.equal(back.offset, enc.offset)


def _legacy(enc):
    """Legacy offsets o + qmin as exact ints."""
    return [int(o) + enc.qmin for o in enc.offset.reshape(-1).tolist()]


def _through_json(obj):
    return json.loads(json.dumps(obj))


def _as_float32(value: int) -> float:
    return float(torch.tensor(float(value), dtype=torch.float32))


@st.composite
def encodings(draw, bitwidths=st.integers(4, 31), min_channels=1, modes=MODES):
    """Integer encodings of every mode, per tensor or per channel along axis 0..3."""
    b = draw(bitwidths)
    mode = draw(st.sampled_from(modes))
    per_channel = draw(st.booleans())
    n = draw(st.integers(min_channels, 6)) if per_channel else 1
    scales = draw(st.lists(st.floats(2.0**-100, 2.0**90, width=32, allow_subnormal=False),
                           min_size=n, max_size=n))
    if mode == "asym":
        # offsets float32 holds without leaving the grid (beyond 2^24 it rounds -(2^b - 1) to
        # -2^b, which would put 0 off the grid; calibration rounds toward zero instead)
        on_grid = st.integers(-(2**b - 1), 0).filter(lambda o: _as_float32(o) >= -(2**b - 1))
        offsets = draw(st.lists(on_grid, min_size=n, max_size=n))
    else:
        offsets = [0] * n
    if not per_channel:
        return _enc(b, scales[0], float(offsets[0]), mode)
    return _enc(b, scales, [float(o) for o in offsets], mode, axis=draw(st.integers(0, 3)))


# ----------------------------------------------------------------------------------------------
# schema
# ----------------------------------------------------------------------------------------------
def test_schema_is_valid_2020_12_and_every_property_is_described():
    """The schema is a valid 2020-12 schema and every declared property has a description."""
    sch = schema()
    jsonschema.Draft202012Validator.check_schema(sch)
    defs = sch["$defs"]

    def walk(node, where):
        if isinstance(node, dict):
            for name, prop in node.get("properties", {}).items():
                target = defs[prop["$ref"].split("/")[-1]] if "$ref" in prop else prop
                assert "description" in prop or "description" in target, f"{where}.{name}"
            for key, value in node.items():
                if key != "if":  # conditions, not declarations
                    walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    walk(sch, "schema")


@pytest.mark.parametrize("path", [V1_FILE, V2_FILE], ids=["1.0.0", "2.0.0"])
def test_example_files_validate_against_the_full_schema(path):
    """AIMET's 1.0.0 and 2.0.0 exports validate unchanged against the whole schema."""
    jsonschema.Draft202012Validator(schema()).validate(json.loads(path.read_text()))


def test_schema_dispatches_on_version_and_shape():
    """A 1.0.0-shaped document labelled 0.6.1 fails the full schema; a torch-layout 1.0.0 passes."""
    full = jsonschema.Draft202012Validator(schema())
    lists = {"version": "0.6.1", "activation_encodings": [], "param_encodings": []}
    assert not full.is_valid(lists)
    torch_doc = {"version": "1.0.0", "param_encodings": {},
                 "activation_encodings": {
                     "conv1": {"output": {"0": {"bitwidth": 16, "dtype": "float"}}}}}
    assert full.is_valid(torch_doc)
    assert not full.is_valid({"version": "3.0.0", "encodings": []})


# ----------------------------------------------------------------------------------------------
# the example files
# ----------------------------------------------------------------------------------------------
def test_example_1_0_0_loads_and_rewrites_byte_identically(tmp_path):
    """Loading AIMET's 1.0.0 file and writing it again gives the same bytes."""
    loaded = load(V1_FILE)
    assert loaded.version == "1.0.0" and not loaded.torch_layout
    assert list(loaded.activation) == ["t.1", "/relu1/Relu_output_0", "/relu2/Relu_output_0", "44"]
    assert list(loaded.param) == ["conv1.weight", "conv2.weight", "fc.weight"]
    conv1 = loaded.param["conv1.weight"]
    assert conv1.symmetric and conv1.per_channel and conv1.axis == 0
    assert (conv1.qmin, conv1.qmax) == (-128, 127)
    assert float(conv1.scale[0]) == CONV1_W_SCALE0
    out = tmp_path / "model.encodings"
    write(out, loaded)
    assert out.read_text() == V1_FILE.read_text()


def test_example_2_0_0_loads_and_matches_the_1_0_0_file():
    """Where the 2.0.0 and 1.0.0 exports name the same tensor, they load to the same Encoding.

    2.0.0 zero points: uint8 'input' zp 128 == 1.0.0 offset -128; int8 weights without zp ==
    is_sym with offset -128; ReLU outputs without zp == offset 0. Model input/output are named
    't.1'/'44' in the 1.0.0 export and 'input'/'output' in the 2.0.0 one.
    """
    v1, v2 = load(V1_FILE), load(V2_FILE)
    assert v2.version == "2.0.0"
    assert set(v2.param) == set(v1.param)
    assert set(v2.bias) == {"conv1.bias", "conv2.bias", "fc.bias"}
    for name, enc in v1.param.items():
        _assert_same(v2.param[name], enc)
    renamed = {"t.1": "input", "44": "output"}
    for name, enc in v1.activation.items():
        _assert_same(v2.activation[renamed.get(name, name)], enc)
    # data-movement ops repeat the producer's encoding
    assert v2.activation["/pool1/MaxPool_output_0"] == v1.activation["/relu1/Relu_output_0"]


def test_example_2_0_0_rewrites_entry_for_entry():
    """Writing the loaded 2.0.0 file reproduces every entry (order aside) and the producer."""
    src = json.loads(V2_FILE.read_text())
    doc = to_json_dict(load(src), "2.0.0")
    assert doc["producer"] == src["producer"] and doc["version"] == "2.0.0"
    assert {e["name"]: e for e in doc["encodings"]} == {e["name"]: e for e in src["encodings"]}


def test_example_int32_bias_follows_the_analytic_rule():
    """conv1.bias y_scale = input scale * conv1.weight scale, in float32, bit for bit."""
    src = {e["name"]: e for e in json.loads(V2_FILE.read_text())["encodings"]}
    entry = bias_entry("conv1.bias", CONV1_IN_SCALE, torch.tensor(src["conv1.weight"]["y_scale"]))
    assert entry == src["conv1.bias"]


# ----------------------------------------------------------------------------------------------
# peer vectors (no files needed)
# ----------------------------------------------------------------------------------------------
def test_conv1_input_vector_in_every_version():
    """tf_enhanced conv1 input s=0.030594557523727417, o=-128: min'=-3.9161033630371094, zp 128."""
    enc = _enc(8, CONV1_IN_SCALE, -128.0)
    (legacy,) = to_entry(enc, "t.1", "0.6.1")
    assert legacy == {"bitwidth": 8, "dtype": "int", "is_symmetric": "False",
                      "min": -3.9161033630371094, "max": 3.8855087757110596,
                      "offset": -128, "scale": CONV1_IN_SCALE}
    assert to_entry(enc, "t.1", "1.0.0") == {
        "bw": 8, "dtype": "INT", "enc_type": "PER_TENSOR", "is_sym": False, "name": "t.1",
        "offset": [-128], "scale": [CONV1_IN_SCALE]}
    assert to_entry(enc, "input", "2.0.0") == {
        "name": "input", "output_dtype": "uint8", "y_scale": CONV1_IN_SCALE, "y_zero_point": 128}


def test_fc_output_vector():
    """fc output s=0.0031666315626353025, o=-98: min' ~ -0.3103299, max' ~ 0.4971612, zp 98."""
    (legacy,) = to_entry(_enc(8, FC_OUT_SCALE, -98.0), "44", "0.6.1")
    assert legacy["min"] == pytest.approx(-0.3103299, abs=1e-7)
    assert legacy["max"] == pytest.approx(0.4971612, abs=1e-7)
    assert to_entry(_enc(8, FC_OUT_SCALE, -98.0), "output", "2.0.0")["y_zero_point"] == 98


def test_symmetric_weight_vector():
    """conv1.weight channel 0: s=0.0014564350713044405, offset -128, min'=-128 s, max'=127 s."""
    enc = _enc(8, [CONV1_W_SCALE0, 0.001500556943938136], [0.0, 0.0], "sym", axis=0)
    first = to_entry(enc, "conv1.weight", "0.6.1")[0]
    assert first["offset"] == -128 and first["is_symmetric"] == "True"
    assert first["min"] == -0.18642368912696838 and first["max"] == 0.1849672496318817
    v2 = to_entry(enc, "conv1.weight", "2.0.0")
    assert v2 == {"name": "conv1.weight", "output_dtype": "int8",
                  "y_scale": [CONV1_W_SCALE0, 0.001500556943938136], "axis": 0}


def test_int32_bias_analytic_and_statistical():
    """Analytic: s_in * s_w[c] in float32 (4.4558987e-05 for conv1); fallback |b|/2^31, floored."""
    weight_scales = torch.tensor([CONV1_W_SCALE0, 0.001500556943938136])
    entry = bias_entry("conv1.bias", CONV1_IN_SCALE, weight_scales)
    assert entry["output_dtype"] == "int32" and entry["axis"] == 0 and "y_zero_point" not in entry
    assert entry["y_scale"][0] == 4.455898670130409e-05
    assert entry["y_scale"][0] == pytest.approx(CONV1_IN_SCALE * CONV1_W_SCALE0, rel=1e-7)
    per_tensor = bias_entry("fc.bias", _enc(8, CONV1_IN_SCALE, -128.0), _enc(8, 0.5, 0.0, "sym"))
    assert per_tensor == {"name": "fc.bias", "output_dtype": "int32",
                          "y_scale": CONV1_IN_SCALE * 0.5}
    stat = bias_entry_from_values("conv2.bias", torch.tensor([0.5, -2.0, 0.0]))
    assert stat["y_scale"] == [0.5 / 2**31, 2.0 / 2**31, encodings_module.BIAS_SCALE_FLOOR]
    per_tensor_stat = bias_entry_from_values("b", torch.tensor([0.5, -2.0]), per_channel=False)
    assert per_tensor_stat["y_scale"] == 2.0 / 2**31


def test_float16_entries():
    """fp16: 0.6.1 {bitwidth 16, dtype float}; 1.0.0 {FLOAT, 16, PER_TENSOR}; 2.0.0 has none."""
    fp16 = Encoding.float16()
    assert to_entry(fp16, "x", "0.6.1") == [{"bitwidth": 16, "dtype": "float"}]
    assert to_entry(fp16, "x", "1.0.0") == {"bw": 16, "dtype": "FLOAT", "enc_type": "PER_TENSOR",
                                            "name": "x"}
    for version in ("0.6.1", "1.0.0"):
        assert from_entry(to_entry(fp16, "x", version), version) == fp16
    with pytest.raises(EncodingsError, match="fp16 encodings have no 2.0.0 entry"):
        to_entry(fp16, "x", "2.0.0")


def test_quantizer_args_matches_the_peer_file():
    """tf_enhanced, per-channel, params symmetric by default: AIMET 2.42's quantizer_args."""
    assert quantizer_args("tf_enhanced", per_channel_quantization=True) == {
        "activation_bitwidth": 8, "dtype": "int", "is_symmetric": True, "param_bitwidth": 8,
        "per_channel_quantization": True, "quant_scheme": "post_training_tf_enhanced"}
    learned = quantizer_args("training_range_learning_with_tf_init")
    assert learned["quant_scheme"] == "post_training_tf"
    with pytest.raises(ValueError, match="unknown quant_scheme 'minmax'"):
        quantizer_args("minmax")


# ----------------------------------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(enc=encodings(min_channels=2))
def test_round_trip_0_6_1(enc):
    """Encoding -> 0.6.1 entry -> JSON -> Encoding is the identity (every mode, 4..31 bits)."""
    entries = _through_json(to_entry(enc, "t", "0.6.1"))
    assert [e["offset"] for e in entries] == _legacy(enc)
    _assert_same(from_entry(entries, "0.6.1", axis=enc.axis), enc)


@settings(max_examples=80, deadline=None)
@given(enc=encodings())
def test_round_trip_1_0_0(enc):
    """Encoding -> 1.0.0 entry -> JSON -> Encoding is the identity (1-channel PER_CHANNEL too)."""
    entry = _through_json(to_entry(enc, "t", "1.0.0"))
    assert list(entry) == sorted(entry)
    assert entry["offset"] == _legacy(enc)
    _assert_same(from_entry(entry, "1.0.0", axis=enc.axis), enc)


@settings(max_examples=80, deadline=None)
@given(enc=encodings(bitwidths=st.sampled_from([4, 8, 16])))
def test_round_trip_2_0_0(enc):
    """Encoding -> 2.0.0 entry -> Encoding: exact for asym and sym; the two modes 2.0.0 cannot
    name come back as the encoding that quantizes the same on the runtime's grid: strict
    symmetric -> signed symmetric (zero point 0), unsigned symmetric -> asymmetric offset 0."""
    entry = _through_json(to_entry(enc, "t", "2.0.0"))
    legacy = _legacy(enc)
    signed = enc.symmetric and not enc.unsigned
    assert entry["output_dtype"] == f"{'' if signed else 'u'}int{enc.bitwidth}"
    zps = entry.get("y_zero_point", 0)
    zps = zps if isinstance(zps, list) else [zps] * len(legacy)
    assert zps == ([0] * len(legacy) if signed else [-o for o in legacy])
    expected = enc
    if enc.strict or enc.unsigned:
        expected = Encoding(enc.bitwidth, enc.scale, enc.offset, symmetric=enc.strict,
                            axis=enc.axis)
    _assert_same(from_entry(entry, "2.0.0"), expected)


@pytest.mark.parametrize("mode, legacy", [("strict", -(2**30 - 1)), ("sym", -(2**30)),
                                          ("unsigned", 0)])
def test_31_bit_legacy_offsets_are_exact_integers(mode, legacy):
    """At 31 bits the legacy offset is written exactly (float32 would round -(2^30-1) to -2^30)
    and the mode reads back from it."""
    enc = _enc(31, 1e-9, 0.0, mode)
    entry = _through_json(to_entry(enc, "w", "1.0.0"))
    assert entry["offset"] == [legacy]
    _assert_same(from_entry(entry, "1.0.0"), enc)


@pytest.mark.parametrize("bitwidth", [b for b in range(4, 32) if b not in (4, 8, 16)])
def test_2_0_0_rejects_bitwidths_without_an_output_dtype(bitwidth):
    """Only int4/8/16 (and int32 biases) have 2.0.0 dtypes; other bitwidths name the way out."""
    match = f"bitwidth {bitwidth} has no 2.0.0 output_dtype.*1.0.0"
    with pytest.raises(EncodingsError, match=match):
        to_entry(_enc(bitwidth, 0.1, -3.0), "x", "2.0.0")


@pytest.mark.parametrize("version", ["0.6.1", "1.0.0"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_int32_bias_round_trips_through_legacy_versions(version, per_channel):
    """An int32 bias written as a 32-bit symmetric param (offset -2^31) reads back as a bias."""
    scale = torch.tensor([1e-5, 2e-5]) if per_channel else torch.tensor(3e-5)
    bias = Int32BiasEncoding(scale, 0 if per_channel else None)
    entry = _through_json(to_entry(bias, "fc.bias", version))
    assert from_entry(entry, version) == bias


def _sample_file():
    return EncodingsFile(
        activation={"input": _enc(8, CONV1_IN_SCALE, -128.0),
                    "/relu/Relu_output_0": _enc(8, 0.01, 0.0),
                    "/Cast_output_0": Encoding.float16()},
        param={"conv.weight": _enc(8, [0.5, 0.25, 0.125], [0.0] * 3, "sym", axis=0),
               "fc.weight": _enc(4, 0.75, 0.0, "strict"),
               "ln.weight": _enc(16, 0.5, 0.0, "unsigned")},
        bias={"conv.bias": Int32BiasEncoding(torch.tensor([1e-5, 2e-5, 3e-5]), 0)},
        excluded_layers=["head"], quantizer_args=quantizer_args("tf"),
    )


@pytest.mark.parametrize("version", ["0.6.1", "1.0.0"])
def test_file_round_trip_legacy_versions(tmp_path, version):
    """write -> load keeps every encoding, excluded_layers and quantizer_args (0.6.1, 1.0.0)."""
    f = _sample_file()
    path = tmp_path / "model.encodings"
    write(path, f, version)
    back = load(path)
    assert back.version == version
    assert back.activation == f.activation and back.param == f.param and back.bias == f.bias
    assert back.excluded_layers == ["head"] and back.quantizer_args == f.quantizer_args
    assert list(tmp_path.iterdir()) == [path]


def test_file_round_trip_2_0_0(tmp_path):
    """2.0.0 keeps integer encodings and biases, leaves fp16 out and sorts params by param_names."""
    f = _sample_file()
    path = tmp_path / "model.encodings"
    write(path, f, "2.0.0")
    doc = json.loads(path.read_text())
    assert list(doc) == ["producer", "version", "encodings"]
    assert doc["producer"]["package"] == "quantsim"
    back = load(path, param_names=f.param)
    assert "/Cast_output_0" not in back.activation and back.bias == f.bias
    assert back.activation == {k: v for k, v in f.activation.items() if not v.is_float}
    assert back.param["conv.weight"] == f.param["conv.weight"]
    assert back.param["fc.weight"] == _enc(4, 0.75, 0.0, "sym")  # strict is not expressible


def test_torch_layout_round_trip(tmp_path):
    """_torch.encodings: module -> input/output -> index, 0.6.1 entries with string booleans."""
    f = EncodingsFile(param={"conv1.weight": _enc(8, [0.5, 0.25], [0.0, 0.0], "sym", axis=0)},
                      module_activation={"conv1": {"input": {0: _enc(8, CONV1_IN_SCALE, -128.0)},
                                                   "output": {0: _enc(8, 0.01, 0.0)}},
                                         "cat": {"output": {10: Encoding.float16(),
                                                            2: _enc(8, 0.02, -5.0)}}},
                      excluded_layers=[], quantizer_args=quantizer_args())
    path = tmp_path / "model_torch.encodings"
    write_torch_encodings(path, f)
    doc = json.loads(path.read_text())
    assert doc["version"] == "1.0.0"
    assert list(doc["activation_encodings"]["cat"]["output"]) == ["2", "10"]
    assert doc["activation_encodings"]["conv1"]["input"]["0"]["is_symmetric"] == "False"
    assert detect_layout(doc) == "torch"
    back = load(path)
    assert back.torch_layout
    assert back.module_activation == f.module_activation and back.param == f.param


def test_files_without_version_are_detected_by_shape():
    """No 'version': dicts -> 0.6.1 (0.4 float offsets and missing dtype accepted), lists ->
    1.0.0, 'encodings' -> 2.0.0; propagate_encodings markers (bitwidth/dtype only) are skipped."""
    old = {"activation_encodings": {"a": [{"bitwidth": 8, "dtype": "int"}],
                                    "b": [{"bitwidth": 8, "is_symmetric": "False", "max": 1.0,
                                           "min": -1.0, "offset": -114.0, "scale": 0.5}]},
           "param_encodings": {}}
    f = load(old)
    assert f.version == "0.6.1" and list(f.activation) == ["b"]
    assert int(f.activation["b"].offset) == -114
    assert detect_layout({"activation_encodings": [], "param_encodings": []}) == "1.0.0"
    v2 = load({"encodings": [{"name": "x", "output_dtype": "int16", "y_scale": 0.5}]})
    assert v2.activation["x"] == _enc(16, 0.5, 0.0, "sym")
    assert load({"version": "0.6.1", "activation_encodings": {},
                 "param_encodings": {"w": [{"bitwidth": 8, "dtype": "int", "is_symmetric": True,
                                            "offset": -128, "scale": 0.5}]}}).param["w"].symmetric


def test_signed_2_0_0_with_zero_point_is_asymmetric():
    """Asymmetric written as intB (aimet-onnx 'signed') keeps its grid: L = -zp - 2^(b-1)."""
    entry = {"name": "a", "output_dtype": "int8", "y_scale": 0.1, "y_zero_point": -28}
    enc = from_entry(entry, "2.0.0")
    assert enc == _enc(8, 0.1, -100.0)


def test_mixed_signed_and_unsigned_symmetric_channels_keep_their_grid():
    """is_sym channels with offsets -2^(b-1) and 0 (AIMET v1 unsigned symmetric per channel)
    read as asymmetric with those offsets, which quantizes every channel identically."""
    entry = {"name": "w", "enc_type": "PER_CHANNEL", "dtype": "INT", "bw": 8, "is_sym": True,
             "scale": [0.5, 0.25], "offset": [-128, 0]}
    assert from_entry(entry, "1.0.0") == _enc(8, [0.5, 0.25], [-128.0, 0.0], axis=0)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
def test_wrong_type_names_file_and_json_path(tmp_path):
    """A wrong type is reported with the file, the JSON path, what was expected and the value."""
    doc = json.loads(V1_FILE.read_text())
    doc["param_encodings"][2]["scale"] = "abc"
    path = tmp_path / "model.encodings"
    path.write_text(json.dumps(doc))
    with pytest.raises(EncodingsError) as info:
        load(path)
    expected = f"{path}: param_encodings[2].scale: expected a list of numbers, got 'abc'"
    assert str(info.value) == expected


def _v1_doc():
    act = to_entry(_enc(8, 0.5, -3.0), "x", "1.0.0")
    param = to_entry(_enc(8, [0.5, 0.25], [0.0, 0.0], "sym", 0), "w", "1.0.0")
    return {"version": "1.0.0", "activation_encodings": [act], "param_encodings": [param]}


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["param_encodings"][0].pop("offset"),
     "<dict>: param_encodings[0]: missing required key 'offset'"),
    (lambda d: d.pop("param_encodings"),
     "<dict>: (top level): missing required key 'param_encodings'"),
    (lambda d: d["param_encodings"][0]["scale"].__setitem__(1, "x"),
     "<dict>: param_encodings[0].scale[1]: expected a number, got 'x'"),
    (lambda d: d["activation_encodings"][0].__setitem__("is_sym", "yes"),
     "<dict>: activation_encodings[0].is_sym: expected a boolean (or \"True\"/\"False\"), "
     "got 'yes'"),
    (lambda d: d["activation_encodings"][0].__setitem__("dtype", "int"),
     "<dict>: activation_encodings[0].dtype: expected one of 'INT', 'FLOAT', got 'int'"),
    (lambda d: d["activation_encodings"][0].__setitem__("colour", 1),
     "<dict>: activation_encodings[0]: unknown key 'colour'; allowed: name, enc_type"),
    (lambda d: d.__setitem__("version", "9.9.9"),
     "<dict>: version: unknown encodings version '9.9.9'; allowed: 0.6.1, 1.0.0, 2.0.0"),
    (lambda d: d.__setitem__("version", "0.6.1"),
     "<dict>: version says 0.6.1 but the layout is that of 1.0.0"),
    (lambda d: d["param_encodings"][0]["offset"].__setitem__(1, -127),
     "<dict>: param_encodings[0] ('w'): is_sym is true but the offsets [-128, -127] are not "
     "symmetric"),
    (lambda d: d["param_encodings"][0].update(enc_type="LPBQ", block_size=64, compressed_bw=4,
                                              per_block_int_scale=[1, 2, 3]),
     "<dict>: param_encodings[0] ('w'): LPBQ needs one offset per scale (channel) and a "
     "multiple of 2 per_block_int_scale values, got 2 and 3"),
    (lambda d: d["param_encodings"][0].update(enc_type="LPBQ", block_size=64, compressed_bw=4,
                                              per_block_int_scale=[1, 17]),
     "<dict>: param_encodings[0] ('w'): Encoding: LPBQ per_block_int_scale must be (channels, "
     "blocks) integers in 1..16"),
    (lambda d: d["param_encodings"][0].update(enc_type="LPBQ", block_size=64, compressed_bw=4,
                                              per_block_int_scale=[1, 2], is_sym=False),
     "<dict>: param_encodings[0] ('w'): LPBQ entries are symmetric with every offset"),
    (lambda d: d["param_encodings"][0].update(enc_type="PER_BLOCK", dtype="FLOAT",
                                              block_size=64),
     "<dict>: param_encodings[0] ('w'): PER_BLOCK entries must have dtype INT"),
    (lambda d: d["activation_encodings"].append(copy.deepcopy(d["activation_encodings"][0])),
     "<dict>: activation_encodings[1] ('x'): 'x' appears twice"),
])
def test_bad_1_0_0_documents(mutate, message):
    """Each malformed 1.0.0 document raises EncodingsError with a message naming the fault."""
    doc = _v1_doc()
    mutate(doc)
    with pytest.raises(EncodingsError) as info:
        load(doc)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("entry, message", [
    ({"name": "w", "output_dtype": "int4", "y_scale": {"x": [[3, 5]], "x_scale": [0.1], "axis": 0},
      "axis": 1, "block_size": 32}, "encodings[0] ('w'): y_scale is a 2.1.0 meta encoding"),
    ({"name": "w", "output_dtype": "int4", "per_block_int_scale": [[1, 2]],
      "per_channel_float_scale": [0.1], "block_size": 32},
     "encodings[0]: missing key 'axis' (required with 'block_size')"),
    ({"name": "w", "output_dtype": "int4", "per_block_int_scale": [[1, 2]],
      "per_channel_float_scale": [0.1, 0.2], "axis": 1, "block_size": 32},
     "encodings[0] ('w'): LPBQ needs 1 per-channel scales"),
    ({"name": "w", "output_dtype": "uint4", "per_block_int_scale": [[1, 2]],
      "per_channel_float_scale": [0.1], "axis": 1, "block_size": 32},
     "encodings[0] ('w'): LPBQ entries are signed symmetric"),
    ({"name": "w", "output_dtype": "int4", "y_scale": [[0.1, 0.2]], "axis": 0, "block_size": 32},
     "encodings[0] ('w'): per-block entries need axis 1"),
    ({"name": "w", "output_dtype": "int4", "y_scale": [[0.1, 0.2], [0.3]], "axis": 1,
      "block_size": 32}, "encodings[0] ('w'): y_scale is not a rectangular nested list"),
    ({"name": "w", "output_dtype": "uint4", "y_scale": [[0.1, 0.2]], "y_zero_point": [[1]],
      "axis": 1, "block_size": 32},
     "encodings[0] ('w'): y_zero_point must be integers shaped as y_scale"),
    ({"name": "w", "output_dtype": "float8e4m3fn", "y_scale": 0.1},
     "encodings[0] ('w'): output_dtype 'float8e4m3fn' is not supported"),
    ({"name": "w", "output_dtype": "int2", "y_scale": 0.1}, "integer bitwidth 2 is not supported"),
    ({"name": "w", "output_dtype": "uint8", "y_scale": [0.1, 0.2]}, "needs 'axis'"),
    ({"name": "w", "output_dtype": "uint8", "y_scale": 0.1, "y_zero_point": 256},
     "y_zero_point [256] out of the uint8 range [0, 255]"),
    ({"name": "w", "output_dtype": "int8", "y_scale": "abc"},
     "encodings[0].y_scale: expected a number, a list of numbers or a 2.1.0 meta-encoding "
     "object, got 'abc'"),
    ({"name": "w", "y_scale": 0.1}, "encodings[0]: missing required key 'output_dtype'"),
])
def test_bad_2_0_0_entries(entry, message):
    """2.1.0 meta scales, float8, int2 and malformed entries (per-block and LPBQ ones
    included) are rejected."""
    with pytest.raises(EncodingsError) as info:
        load({"version": "2.0.0", "encodings": [entry]})
    assert message in str(info.value)


def test_unreadable_files(tmp_path):
    """Missing file, invalid JSON, NaN and a non-object top level each name the file."""
    with pytest.raises(EncodingsError, match="cannot read"):
        load(tmp_path / "absent.encodings")
    for text, message in [("{", "not valid JSON"), ('{"version": NaN}', "NaN is not valid JSON"),
                          ("[1]", "expected a JSON object at the top level")]:
        path = tmp_path / "bad.encodings"
        path.write_text(text)
        with pytest.raises(EncodingsError, match=message) as info:
            load(path)
        assert str(info.value).startswith(str(path))


def test_write_rejects_inexpressible_encodings():
    """Unknown versions, symmetric encodings with an offset and name clashes are refused."""
    with pytest.raises(EncodingsError, match="unknown encodings version '2.1.0'"):
        to_json_dict(EncodingsFile(), "2.1.0")
    with pytest.raises(EncodingsError, match="symmetric encoding must have internal offset 0"):
        to_entry(_enc(8, 0.1, -3.0, "sym"), "w", "1.0.0")
    clash = EncodingsFile(activation={"x": _enc(8, 0.1)}, param={"x": _enc(8, 0.1)})
    with pytest.raises(EncodingsError, match="'x' appears twice"):
        to_json_dict(clash, "2.0.0")


# ----------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------
def test_failed_validation_leaves_the_old_file_intact(tmp_path):
    """Writing an invalid EncodingsFile over a good file raises and changes nothing on disk."""
    path = tmp_path / "model.encodings"
    write(path, _sample_file())
    before = path.read_bytes()
    with pytest.raises(EncodingsError, match=r"excluded_layers\[0\]: expected a string, got 5"):
        write(path, EncodingsFile(activation={"x": _enc(8, 0.1)}, excluded_layers=[5]))
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_failed_replace_removes_the_temp_file(tmp_path, monkeypatch):
    """If the final rename fails, the temp file is removed and the old file is untouched."""
    path = tmp_path / "model.encodings"
    write(path, _sample_file())
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(EncodingsError, match="cannot write"):
        write(path, EncodingsFile(activation={"y": _enc(8, 0.2)}))
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_docstring_examples_run():
    """The examples in the docstrings of quantsim.encodings and its submodules run."""
    from quantsim.encodings import common, reader, writer

    attempted = 0
    for module in (encodings_module, common, reader, writer):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__
        attempted += result.attempted
    assert attempted >= 12  # 5 in the package docstring, 5 in common, 2 in writer
