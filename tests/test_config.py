"""Tests of quantsim.config (hardware config loading) and quantsim.op_types (module -> op type)."""
from __future__ import annotations

import copy
import json
import pickle
import re
import warnings
from pathlib import Path

import jsonschema
import pytest
from torch import nn

from conftest import EXAMPLES, ROOT
from quantsim import op_types
from quantsim.config import (
    BUILTIN_CONFIGS,
    DEFAULT_CONFIG,
    ConfigWarning,
    EncodingConstraints,
    HardwareConfig,
    KernelSpec,
    ParamConfig,
    SupportedKernel,
    config_schema,
    load_config,
)
from quantsim.errors import ConfigError

EXAMPLE_FILES = {
    "default": EXAMPLES / "default_config.json",
    "per_channel": EXAMPLES / "default_config_per_channel.json",
    "htp": EXAMPLES / "htp_config_example.json",
}


def _builtin_dict(name: str) -> dict:
    return json.loads(BUILTIN_CONFIGS[name].read_text())


def _to_json_bools(value):
    """The same config with every "True"/"False" string replaced by a JSON boolean."""
    if isinstance(value, dict):
        return {k: _to_json_bools(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_json_bools(v) for v in value]
    return {"True": True, "False": False}.get(value, value) if isinstance(value, str) else value


def _write(tmp_path: Path, data, name: str = "my.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2))
    return path


def _error(source) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(source)
    return str(info.value)


@pytest.fixture
def minimal() -> dict:
    """The smallest valid config."""
    return {
        "defaults": {"ops": {}, "params": {}},
        "params": {},
        "op_type": {},
        "supergroups": [],
        "model_input": {},
        "model_output": {},
    }


@pytest.fixture
def restore_registry():
    """Undo register_op_type calls made by a test."""
    saved = (dict(op_types.TORCH_TO_ONNX), dict(op_types._DATA_MOVEMENT),
             set(op_types.KNOWN_ONNX_TYPES))
    yield
    op_types.TORCH_TO_ONNX.clear()
    op_types.TORCH_TO_ONNX.update(saved[0])
    op_types._DATA_MOVEMENT.clear()
    op_types._DATA_MOVEMENT.update(saved[1])
    op_types.KNOWN_ONNX_TYPES.clear()
    op_types.KNOWN_ONNX_TYPES.update(saved[2])


# ----------------------------------------------------------------------------------------------
# schema
# ----------------------------------------------------------------------------------------------
def test_schema_is_valid_2020_12():
    """The shipped schema is itself a valid draft 2020-12 schema."""
    schema = config_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    assert (ROOT / "schemas" / "quantsim_config.schema.json").is_file()


def _walk_objects(node, where="schema"):
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            yield where, node
        for key, value in node.items():
            yield from _walk_objects(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk_objects(value, f"{where}[{i}]")


def test_schema_objects_closed_and_described():
    """Every object schema is closed (or a name-keyed map of a closed schema) and every
    property has a description."""
    for where, node in _walk_objects(config_schema()):
        extra = node.get("additionalProperties")
        assert extra is False or (isinstance(extra, dict) and "$ref" in extra), where
        for name, prop in node.get("properties", {}).items():
            assert prop.get("description"), f"{where}.{name} has no description"


# ----------------------------------------------------------------------------------------------
# the example files and built-ins
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(EXAMPLE_FILES))
def test_example_files_validate_unchanged(name):
    """AIMET's example configs validate against the raw schema and load without warnings."""
    path = EXAMPLE_FILES[name]
    jsonschema.validate(json.loads(path.read_text()), config_schema())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config(path)
    assert cfg.source == str(path)


def test_default_example_typed_values():
    """default_config.json gives real bools with absent keys as None."""
    cfg = load_config(EXAMPLE_FILES["default"])
    assert cfg.defaults.ops.is_output_quantized is True
    assert cfg.defaults.ops.is_symmetric is None
    assert cfg.defaults.params == ParamConfig(is_quantized=True, is_symmetric=True)
    assert cfg.defaults.strict_symmetric is False
    assert cfg.defaults.unsigned_symmetric is None
    assert cfg.defaults.per_channel_quantization is False
    assert cfg.params == {"bias": ParamConfig(is_quantized=False, is_symmetric=None)}
    bn = cfg.op_type["BatchNormalization"]
    assert bn.params["running_mean"].is_quantized is False
    assert bn.is_output_quantized is None
    assert cfg.op_type["Cast"].is_output_quantized is False
    assert cfg.supergroups == [
        ("Conv", "Relu"), ("ConvTranspose", "Relu"), ("Conv", "Clip"), ("Add", "Relu"),
        ("Gemm", "Relu"),
    ]
    assert cfg.supergroup_pass_list == ["MatmulAdd"]
    assert cfg.model_input is True and cfg.model_output is None


def test_per_channel_example_typed_values():
    """default_config_per_channel.json turns per-channel on for exactly five op types."""
    cfg = load_config(EXAMPLE_FILES["per_channel"])
    per_channel = {k for k, v in cfg.op_type.items() if v.per_channel_quantization is True}
    assert per_channel == {"Conv", "ConvTranspose", "Gemm", "MatMul", "PRelu"}
    assert cfg.defaults.per_channel_quantization is False
    assert cfg.params["bias"].is_quantized is False


def test_htp_example_typed_values():
    """htp_config_example.json: hw_version, constraints (min-only allowed), norm weights."""
    cfg = load_config(EXAMPLE_FILES["htp"])
    assert cfg.defaults.hw_version == "V73"
    assert cfg.defaults.unsigned_symmetric is False
    assert cfg.op_type["Relu"].encoding_constraints == EncodingConstraints(0.0, None)
    assert cfg.op_type["Sigmoid"].encoding_constraints == EncodingConstraints(0.0, 1.0)
    assert cfg.op_type["Tanh"].encoding_constraints == EncodingConstraints(-1.0, 1.0)
    assert cfg.op_type["LayerNormalization"].params["weight"].is_symmetric is False
    assert cfg.op_type["GroupNormalization"].params["bias"].is_quantized is True
    assert cfg.op_type["Gather"].is_output_quantized is False
    assert ("Conv", "BatchNormalization", "Relu") in cfg.supergroups
    assert cfg.supergroup_pass_list == ["LayerNormalization", "RMSNormalization", "MatmulAdd"]


@pytest.mark.parametrize("name", ["default", "per_channel"])
def test_builtins_equal_aimet_files(name):
    """The 'default' and 'per_channel' built-ins are AIMET's files, byte for byte in content."""
    assert _builtin_dict(name) == json.loads(EXAMPLE_FILES[name].read_text())
    assert load_config(name) == load_config(EXAMPLE_FILES[name])


def test_htp_builtin_is_example_plus_kernels():
    """'htp' is the HTP V73 example plus supported_kernels with int16 activations; W8A8 first."""
    ours, theirs = _builtin_dict("htp"), json.loads(EXAMPLE_FILES["htp"].read_text())
    kernels = ours["defaults"].pop("supported_kernels")
    assert ours == theirs
    cfg = load_config("htp")
    int8, int16 = KernelSpec(8, "int"), KernelSpec(16, "int")
    assert cfg.defaults.supported_kernels[0] == SupportedKernel(int8, int8)
    assert SupportedKernel(int16, int8) in cfg.defaults.supported_kernels
    assert len(cfg.defaults.supported_kernels) == len(kernels)


@pytest.mark.parametrize("name", sorted(BUILTIN_CONFIGS))
def test_builtins_load_by_name(name):
    """Every built-in loads by name, without warnings, and records where it came from."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config(name)
    assert isinstance(cfg, HardwareConfig) and cfg.source == f"builtin:{name}"


def test_default_is_per_channel():
    """load_config(None) is the documented default, per-channel weights."""
    assert DEFAULT_CONFIG == "per_channel"
    assert load_config(None) == load_config("per_channel")
    assert load_config().op_type["Conv"].per_channel_quantization is True


# ----------------------------------------------------------------------------------------------
# booleans, dicts, absent keys
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BUILTIN_CONFIGS))
def test_string_and_json_booleans_same_config(name, tmp_path):
    """Replacing every "True"/"False" by true/false gives the same typed config (file and dict)."""
    data = _builtin_dict(name)
    converted = _to_json_bools(data)
    assert converted != data
    expected = load_config(name)
    assert load_config(converted) == expected
    assert load_config(_write(tmp_path, converted)) == expected


def _all_values(obj):
    if hasattr(obj, "__dataclass_fields__"):
        for f in obj.__dataclass_fields__:
            yield from _all_values(getattr(obj, f))
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _all_values(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _all_values(v)
    else:
        yield obj


@pytest.mark.parametrize("name", sorted(BUILTIN_CONFIGS))
def test_no_boolean_strings_survive(name):
    """No "True"/"False" string is left anywhere in the typed config."""
    assert not {"True", "False"} & {v for v in _all_values(load_config(name)) if isinstance(v, str)}


def test_absent_is_none_not_false(minimal):
    """A key left out is None (keeps the lower level), distinct from an explicit False."""
    minimal["op_type"] = {"Cast": {"is_output_quantized": False}, "Relu": {}}
    cfg = load_config(minimal)
    assert cfg.op_type["Cast"].is_output_quantized is False
    assert cfg.op_type["Relu"].is_output_quantized is None
    assert cfg.defaults.per_channel_quantization is None
    assert cfg.model_input is False and cfg.model_output is None
    assert cfg.supergroup_pass_list == [] and cfg.source == "<dict>"


def test_dict_input_not_mutated_and_passthrough(minimal):
    """A dict loads without being changed; a loaded HardwareConfig is returned as is and
    survives pickling (objects holding it can be saved)."""
    minimal["op_type"] = {"Conv": {"per_channel_quantization": "True"}}
    before = copy.deepcopy(minimal)
    cfg = load_config(minimal)
    assert minimal == before
    assert cfg.op_type["Conv"].per_channel_quantization is True
    assert load_config(cfg) is cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_bitwidth_range(minimal):
    """Kernel bitwidths 4..32 load; 3 and 33 are schema errors naming the path."""
    kernel = lambda b: [{"activation": {"bitwidth": b, "dtype": "int"},  # noqa: E731
                         "param": {"bitwidth": 8, "dtype": "int"}}]
    for bits in (4, 8, 12, 16, 32):
        minimal["defaults"]["supported_kernels"] = kernel(bits)
        assert load_config(minimal).defaults.supported_kernels[0].activation.bitwidth == bits
    for bits in (3, 33):
        minimal["defaults"]["supported_kernels"] = kernel(bits)
        assert "defaults.supported_kernels[0].activation.bitwidth" in _error(minimal)


def test_op_level_kernel_param_optional(minimal):
    """An op-level supported_kernels entry may omit 'param'; the defaults one may not."""
    entry = [{"activation": {"bitwidth": 16, "dtype": "float"}}]
    minimal["op_type"] = {"Softmax": {"supported_kernels": entry}}
    assert load_config(minimal).op_type["Softmax"].supported_kernels[0].param is None
    minimal["defaults"]["supported_kernels"] = entry
    assert "'param' is a required property" in _error(minimal)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
def test_missing_file_names_path_and_builtins(tmp_path):
    """A missing file names the path and lists the built-in names (with a near-miss hint)."""
    message = _error(tmp_path / "nope.json")
    assert f"config file not found: {tmp_path / 'nope.json'}" in message
    assert "default, htp, per_channel" in message
    assert "did you mean 'per_channel'" in _error("per-channel")


def test_invalid_json_names_file_line_column(tmp_path):
    """Broken JSON names the file, the line and the column."""
    path = _write(tmp_path, '{\n  "defaults": {\n    "ops": {}\n    "params": {}\n}')
    message = _error(path)
    assert message.startswith(f"{path}: invalid JSON at line 4, column 5:")


def test_non_json_dict_and_bad_source_type():
    """A dict that is not JSON data, or a source of the wrong type, is a ConfigError."""
    assert "<dict>: not JSON-serialisable" in _error({"defaults": object()})
    assert "config source must be a path" in _error(42)


def test_bad_boolean_message(tmp_path):
    """A bad boolean names file and JSON path and lists both spellings allowed."""
    data = _builtin_dict("default")
    data["defaults"]["params"]["is_symmetric"] = "Maybe"
    path = _write(tmp_path, data)
    assert _error(path) == (
        f"{path}: defaults.params.is_symmetric: 'Maybe' is not one of "
        "['True', 'False', true, false]"
    )


@pytest.mark.parametrize("value", ["true", "TRUE", 1, 0, None, "yes"])
def test_only_two_boolean_spellings(value, minimal):
    """Only "True"/"False" and true/false are booleans; 'true', 1, null... are rejected."""
    minimal["params"] = {"weight": {"is_quantized": value}}
    assert "params.weight.is_quantized:" in _error(minimal)


def test_unknown_key_typo(tmp_path):
    """A typo'd key fails, naming the key, where it is, the allowed keys and the likely fix."""
    data = _builtin_dict("default")
    data["defaults"]["ops"]["is_symetric"] = "True"
    message = _error(_write(tmp_path, data))
    assert "my.json: defaults.ops.is_symetric: unknown key 'is_symetric' at defaults.ops" in message
    assert "allowed: is_input_quantized, is_output_quantized, is_symmetric" in message
    assert "did you mean 'is_symmetric'" in message


@pytest.mark.parametrize("where", [
    ("op_type", "Conv"), ("params", "bias"), ("model_output",), ("supergroups", 0), ("top",),
])
def test_unknown_keys_everywhere(where, tmp_path):
    """Every nested object is closed: an unknown key is rejected at any depth."""
    data = _builtin_dict("per_channel")
    target = data
    for key in where[:-1] if where != ("top",) else ():
        target = target[key]
    if where != ("top",):
        target = target[where[-1]]
    target["bogus"] = "True"
    assert "unknown key 'bogus'" in _error(_write(tmp_path, data))


def test_all_schema_violations_listed(tmp_path):
    """Several violations are all reported, one line each, each naming the file and path."""
    data = _builtin_dict("default")
    data["defaults"]["params"]["is_symmetric"] = "Maybe"
    data["supergroups"][0]["op_list"] = ["Conv"]
    del data["model_output"]
    lines = _error(_write(tmp_path, data)).splitlines()
    problems = [line.strip() for line in lines if line.strip().startswith(f"{tmp_path}")]
    assert len(problems) == 3
    assert any("top level: 'model_output' is a required property" in p for p in problems)
    assert any('supergroups[0].op_list: ["Conv"] has 1 item(s); at least 2' in p
               for p in problems)
    assert any("defaults.params.is_symmetric: 'Maybe'" in p for p in problems)
    assert "2 more problem(s):" in lines[1]


@pytest.mark.parametrize("mutate, path, allowed", [
    (lambda d: d["defaults"]["ops"].update(is_input_quantized="True"),
     "defaults.ops.is_input_quantized", "op_type.<name>.is_input_quantized"),
    (lambda d: d["defaults"]["ops"].update(is_output_quantized="False"),
     "defaults.ops.is_output_quantized", "only True is supported"),
    (lambda d: d["op_type"].update(Conv={"is_input_quantized": "False"}),
     "op_type.Conv.is_input_quantized", "only True is supported"),
    (lambda d: d["model_input"].update(is_input_quantized=False),
     "model_input.is_input_quantized", "only True is supported"),
    (lambda d: d["op_type"].update(Sigmoid={"encoding_constraints": {"min": 1.0, "max": 1.0}}),
     "op_type.Sigmoid.encoding_constraints", "min (1.0) must be less than max (1.0)"),
    (lambda d: d["defaults"].update(supported_kernels=[
        {"activation": {"bitwidth": 8, "dtype": "float"},
         "param": {"bitwidth": 8, "dtype": "int"}}]),
     "defaults.supported_kernels[0].activation.bitwidth", "bitwidth 16 or 32"),
])
def test_aimet_semantic_rules(mutate, path, allowed, tmp_path):
    """Each rule AIMET adds beyond the schema fails with the file, JSON path and what is allowed."""
    data = _builtin_dict("default")
    mutate(data)
    message = _error(_write(tmp_path, data))
    assert message.startswith(f"{tmp_path / 'my.json'}: {path}: ")
    assert allowed in message


def test_semantic_problems_reported_together(minimal):
    """All semantic problems are reported in one error."""
    minimal["model_input"] = {"is_input_quantized": "False"}
    minimal["op_type"] = {"Conv": {"is_input_quantized": "False"}}
    assert len(_error(minimal).splitlines()) == 2


def test_model_output_false_disables(minimal):
    """model_output.is_output_quantized False is accepted (quantsim extension) and typed False."""
    minimal["model_output"] = {"is_output_quantized": "False"}
    assert load_config(minimal).model_output is False


def test_encoding_constraints_shape(minimal):
    """encoding_constraints needs min, accepts max, rejects other keys."""
    minimal["op_type"] = {"Relu": {"encoding_constraints": {"max": 6.0}}}
    assert "op_type.Relu.encoding_constraints: 'min' is a required property" in _error(minimal)
    minimal["op_type"] = {"Relu": {"encoding_constraints": {"min": 0, "mx": 6.0}}}
    assert "unknown key 'mx'" in _error(minimal)
    minimal["op_type"] = {"Relu": {"encoding_constraints": {"min": 0, "max": 6}}}
    constraints = load_config(minimal).op_type["Relu"].encoding_constraints
    assert constraints == EncodingConstraints(0.0, 6.0)
    minimal["op_type"] = {"Relu": {"encoding_constraints": {"min": float("nan")}}}
    assert "op_type.Relu.encoding_constraints: min and max must be finite" in _error(minimal)


def test_supergroup_unknown_op_is_error(minimal):
    """An unknown op inside a supergroup is an error naming its position and a suggestion."""
    minimal["supergroups"] = [{"op_list": ["Conv", "Rleu"]}]
    message = _error(minimal)
    assert message.startswith("<dict>: supergroups[0].op_list[1]: unknown op type 'Rleu'")
    assert "did you mean 'Relu'" in message and "register_op_type" in message


def test_unknown_op_type_and_pass_warn(minimal):
    """Unknown op_type keys and pass names warn (with hints) but still load."""
    minimal["op_type"] = {"Conv2d": {"is_output_quantized": "False"}}
    minimal["supergroup_pass_list"] = ["MatMulAdd"]
    with pytest.warns(ConfigWarning) as record:
        cfg = load_config(minimal)
    messages = [str(w.message) for w in record]
    assert any("op_type.Conv2d: unknown op type 'Conv2d'" in m and "'Conv'" in m for m in messages)
    assert any("supergroup_pass_list[0]: unknown pass 'MatMulAdd'" in m
               and "did you mean 'MatmulAdd'" in m for m in messages)
    assert cfg.op_type["Conv2d"].is_output_quantized is False


def test_duplicate_key_warns(tmp_path):
    """A key repeated in one JSON object warns; the last value wins, as with json.load."""
    text = BUILTIN_CONFIGS["default"].read_text().replace(
        '"Cast":', '"Cast": {"is_output_quantized": "True"},\n    "Cast":')
    with pytest.warns(ConfigWarning, match="key 'Cast' appears twice"):
        cfg = load_config(_write(tmp_path, text))
    assert cfg.op_type["Cast"].is_output_quantized is False


# ----------------------------------------------------------------------------------------------
# op_types
# ----------------------------------------------------------------------------------------------
def test_module_to_onnx_table():
    """The documented mappings, including both spellings of the norms."""
    assert op_types.onnx_types_of(nn.Linear(2, 2)) == ("Gemm", "MatMul")
    assert set(op_types.onnx_types_of(nn.LayerNorm(4))) == {"LayerNormalization", "LayerNorm"}
    assert set(op_types.onnx_types_of(nn.GroupNorm(2, 4))) == {"GroupNormalization", "GroupNorm"}
    assert op_types.onnx_types_of(nn.Conv2d(1, 1, 1)) == ("Conv",)
    assert op_types.onnx_types_of(nn.ReLU6()) == ("Clip",)
    assert op_types.onnx_types_of(nn.BatchNorm2d(3)) == ("BatchNormalization",)
    assert op_types.onnx_types_of(nn.Embedding(3, 2)) == ("Gather",)
    assert op_types.onnx_types_of(nn.Sequential()) == ()


def test_subclasses_match_via_mro():
    """A subclass (user or lazy module) gets its nearest registered ancestor's op types."""
    class MyConv(nn.Conv2d):
        pass

    assert op_types.onnx_types_of(MyConv) == ("Conv",)
    assert op_types.onnx_types_of(nn.LazyLinear(3)) == ("Gemm", "MatMul")


def test_register_op_type(restore_registry):
    """register_op_type adds the class and its names, which configs may then use."""
    class Fancy(nn.Module):
        pass

    assert op_types.onnx_types_of(Fancy()) == () and not op_types.is_data_movement(Fancy())
    op_types.register_op_type(Fancy, "FancyOp", data_movement=True)
    assert op_types.onnx_types_of(Fancy()) == ("FancyOp",)
    assert op_types.is_data_movement(Fancy()) and "FancyOp" in op_types.KNOWN_ONNX_TYPES
    cfg = load_config({"defaults": {"ops": {}, "params": {}}, "params": {}, "op_type": {},
                       "supergroups": [{"op_list": ["Conv", "FancyOp"]}],
                       "model_input": {}, "model_output": {}})
    assert cfg.supergroups == [("Conv", "FancyOp")]


def test_register_op_type_rejects_bad_input():
    """Non-module classes, no names and non-string names are refused with a hint."""
    with pytest.raises(TypeError, match="nn.Module subclass"):
        op_types.register_op_type(int, "Add")
    with pytest.raises(ValueError, match="at least one ONNX op type"):
        op_types.register_op_type(nn.ReLU)
    with pytest.raises(TypeError, match="non-empty strings"):
        op_types.register_op_type(nn.ReLU, "")


def test_data_movement_classification():
    """Value-moving modules are data movement; value-changing ones are not."""
    moving = [nn.MaxPool2d(2), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Unflatten(1, (2, 2)),
              nn.Dropout(), nn.Dropout2d(), nn.Identity(), nn.PixelShuffle(2),
              nn.Upsample(scale_factor=2)]
    changing = [nn.ReLU(), nn.Conv2d(1, 1, 1), nn.AvgPool2d(2), nn.Linear(1, 1),
                nn.Upsample(scale_factor=2, mode="bilinear"), nn.ZeroPad2d(1), nn.Sequential()]
    assert all(op_types.is_data_movement(m) for m in moving)
    assert not any(op_types.is_data_movement(m) for m in changing)
    assert op_types.is_data_movement(nn.MaxPool2d) and not op_types.is_data_movement(nn.Upsample)


def test_example_names_all_known():
    """Every op type named in AIMET's example configs (op_type and supergroups) is known."""
    for path in EXAMPLE_FILES.values():
        data = json.loads(path.read_text())
        names = set(data["op_type"]) | {n for g in data["supergroups"] for n in g["op_list"]}
        assert names <= op_types.KNOWN_ONNX_TYPES, names - op_types.KNOWN_ONNX_TYPES


def test_elementwise_names_known():
    """The ONNX names of AIMET's elementwise modules (FORMATS §1.9) are known before any
    elementwise module is registered."""
    for name in ("Add", "Mul", "Sub", "Div", "MatMul", "Concat", "Cast", "Reshape", "Transpose",
                 "Slice", "Split", "Pad", "GatherND", "ReduceMean", "NonMaxSuppression",
                 "Softmax", "MaxRoiPool", "ChannelShuffle"):
        assert name in op_types.KNOWN_ONNX_TYPES


def test_doc_table_matches_code():
    """docs/config.md shows exactly op_type_table_markdown() between its markers."""
    doc = (ROOT / "docs" / "config.md").read_text()
    found = re.search(r"<!-- op-type-table:start -->\n(.*?)<!-- op-type-table:end -->", doc, re.S)
    assert found, "docs/config.md lost its op-type-table markers"
    assert found.group(1) == op_types.op_type_table_markdown(), (
        "docs/config.md is stale: paste the output of `python -m quantsim.op_types`"
    )


def test_doc_table_ignores_later_registrations(restore_registry):
    """The documented table lists built-ins only, whatever was registered since."""
    before = op_types.op_type_table_markdown()
    op_types.register_op_type(nn.Linear, "Other")
    assert op_types.op_type_table_markdown() == before
    assert op_types.onnx_types_of(nn.Linear(1, 1)) == ("Other",)


def test_doctests():
    """The examples in the module docstrings run."""
    import doctest

    from quantsim import config

    for module in (config, op_types):
        assert doctest.testmod(module).failed == 0
