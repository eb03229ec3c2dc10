"""QuantizationSimModel: wrapping, placement, calibration, errors."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from conftest import EXAMPLES
from models import (DictInputNet, DigitsCNN, KeywordNet, ResidualNet, SharedBlockNet, accuracy,
                    randomize_batch_norms, train, transformer_block)
from quantsim import (CalibrationError, ConfigError, DummyInputError, KeywordInputs,
                      QuantizationSettingError, UnsupportedModelError)
from quantsim.encoding import Encoding
from quantsim.graph import run_forward
from quantsim.sim import QuantizationSimModel, QuantScheme
from quantsim.wrappers import quantizer_items


@pytest.fixture(scope="module")
def digits_cnn(digits):
    x_train, y_train, _, _ = digits
    torch.manual_seed(0)
    return train(DigitsCNN(), x_train, y_train, epochs=8)


def enabled(sim):
    """Names of enabled quantizers."""
    return {n for n, q in sim.named_quantizers() if q.enabled}


def calibrate(sim, x):
    sim.compute_encodings(lambda m, _: m(x), None)


# -- placement --------------------------------------------------------------------------------
def test_cnn_placement_follows_runtime(digits_cnn, digits):
    """Conv->BN->ReLU->MaxPool->Conv: only the first conv's input and the ReLUs' outputs are
    quantized activations (BN folded, Conv+Relu supergroup, no requant after MaxPool/Flatten)."""
    sim = QuantizationSimModel(digits_cnn, digits[0][:8])
    activations = {n for n in enabled(sim) if "param_quantizers" not in n}
    assert activations == {"conv1.input_quantizers.0", "relu1.output_quantizers.0",
                           "relu2.output_quantizers.0", "fc.output_quantizers.0"}
    params = {n for n in enabled(sim) if "param_quantizers" in n}
    assert params == {"conv1.param_quantizers.weight", "conv2.param_quantizers.weight",
                      "fc.param_quantizers.weight"}


def test_user_model_untouched(digits_cnn, digits):
    """in_place=False leaves the float model's modules and weights as they were."""
    before = copy.deepcopy(digits_cnn.state_dict())
    sim = QuantizationSimModel(digits_cnn, digits[0][:8], quant_scheme="tf")
    calibrate(sim, digits[0][:64])
    assert type(digits_cnn.conv1) is nn.Conv2d
    for k, v in digits_cnn.state_dict().items():
        assert torch.equal(v, before[k])
    assert sim.model.conv1.weight is not digits_cnn.conv1.weight


def test_wrapped_module_keeps_parameter_names(digits_cnn, digits):
    """sim.model's state_dict keys for parameters equal the float model's (quantizers added)."""
    sim = QuantizationSimModel(digits_cnn, digits[0][:8])
    float_keys = set(digits_cnn.state_dict())
    sim_keys = {k for k in sim.model.state_dict() if "quantizers" not in k}
    assert sim_keys == float_keys
    assert isinstance(sim.model.conv1, nn.Conv2d)


def test_supergroup_and_model_output_rules():
    """Conv+Relu leaves only the Relu output quantized; model_output False disables the last."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    x = torch.randn(2, 1, 8, 8)
    sim = QuantizationSimModel(model, x, config_file="default")
    names = enabled(sim)
    assert "0.output_quantizers.0" not in names and "1.output_quantizers.0" in names
    assert "1.input_quantizers.0" not in names
    assert "2.output_quantizers.0" in names
    from quantsim.config import BUILTIN_CONFIGS
    with open(BUILTIN_CONFIGS["default"]) as f:
        config = json.load(f)
    config["model_output"] = {"is_output_quantized": "False"}
    sim2 = QuantizationSimModel(model, x, config_file=config)
    assert "2.output_quantizers.0" not in enabled(sim2)


def test_precedence_op_type_over_defaults_and_params():
    """op_type overrides params which override defaults; model_input overrides all."""
    from quantsim.config import BUILTIN_CONFIGS
    with open(BUILTIN_CONFIGS["default"]) as f:
        config = json.load(f)
    config["params"] = {"weight": {"is_symmetric": "False"}, "bias": {"is_quantized": "True"}}
    config["op_type"] = {"Gemm": {"params": {"weight": {"is_symmetric": "True"}},
                                  "is_output_quantized": "False"},
                         "Relu": {"is_input_quantized": "True"}}
    config["supergroups"] = []
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    sim = QuantizationSimModel(model, torch.randn(2, 4), config_file=config)
    lin, relu = sim.model[0], sim.model[1]
    assert lin.param_quantizers["weight"].symmetric is True      # op_type beats params
    assert lin.param_quantizers["bias"].enabled is True          # params beats defaults
    assert lin.output_quantizers[0].enabled is False             # op_type beats defaults
    assert relu.input_quantizers[0].enabled is True               # op_type input rule
    assert lin.input_quantizers[0].enabled is True                # model_input


def test_example_configs_build_sims(digits_cnn, digits):
    """Every AIMET example config (tests/data/aimet) loads and builds a sim."""
    configs = [p for p in EXAMPLES.glob("*.json") if "config" in p.name]
    assert len(configs) == 3, "example configs not found"
    for path in configs:
        sim = QuantizationSimModel(digits_cnn, digits[0][:8], config_file=str(path))
        assert any(q.enabled for q in sim.quantizers())


def test_per_channel_default_and_conv_transpose_axis():
    """config_file=None gives per-channel weights (axis 1 for ConvTranspose)."""
    model = nn.Sequential(nn.ConvTranspose2d(3, 5, 3), nn.ReLU())
    sim = QuantizationSimModel(model, torch.randn(1, 3, 6, 6))
    q = sim.model[0].param_quantizers["weight"]
    assert q.axis == 1 and q.shape == (5,)


# -- calibration --------------------------------------------------------------------------------
def test_tf_encodings_equal_formula_on_observed_range(digits_cnn, digits):
    """Scheme tf: each activation encoding equals Encoding.from_range of the min/max its
    quantizer observed; each weight encoding that of the weight's per-channel min/max."""
    x = digits[0][:128]
    sim = QuantizationSimModel(digits_cnn, x[:8], quant_scheme="tf")
    calibrate(sim, x)
    q = sim.model.conv1.input_quantizers[0]
    expected = Encoding.from_range(x.min(), x.max(), 8)
    assert q.encoding == expected
    w = sim.model.conv2.weight.detach()
    wq = sim.model.conv2.param_quantizers["weight"]
    flat = w.reshape(w.shape[0], -1)
    expected_w = Encoding.from_range(flat.min(1).values, flat.max(1).values, 8, symmetric=True,
                                     axis=0)
    assert wq.encoding == expected_w


def test_w8a8_digits_accuracy_drop(digits_cnn, digits):
    """Digits CNN at W8A8 (tf_enhanced, per-channel weights) loses <= 0.5 pt accuracy."""
    x_train, _, x_test, y_test = digits
    float_acc = accuracy(digits_cnn, x_test, y_test)
    sim = QuantizationSimModel(digits_cnn, x_train[:8])
    calibrate(sim, x_train[:512])
    sim_acc = accuracy(sim.model, x_test, y_test)
    assert float_acc >= 0.95
    assert float_acc - sim_acc <= 0.005, (float_acc, sim_acc)


@pytest.mark.parametrize("scheme", ["tf", "tf_enhanced", "percentile",
                                    QuantScheme.training_range_learning_with_tf_init])
def test_each_scheme_calibrates(scheme, digits_cnn, digits):
    """Every scheme computes an encoding for every enabled quantizer."""
    sim = QuantizationSimModel(digits_cnn, digits[0][:8], quant_scheme=scheme)
    if scheme == "percentile":
        sim.set_percentile_value(99.9)
    calibrate(sim, digits[0][:128])
    assert all(q.is_initialized for q in sim.quantizers() if q.enabled)


def test_range_learning_makes_parameters():
    """Range-learning schemes expose min/max as parameters named '*quantizer*'."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    x = torch.randn(16, 4)
    sim = QuantizationSimModel(model, x, quant_scheme="range_learning_tf")
    calibrate(sim, x)
    names = [n for n, _ in sim.model.named_parameters() if "quantizer" in n]
    assert "0.param_quantizers.weight.min" in names
    loss = sim.model(x).square().mean()
    loss.backward()
    assert sim.model[1].output_quantizers[0].max.grad is not None


def test_per_quantizer_overrides(digits_cnn, digits):
    """Changing a quantizer's bitwidth or enabled flag takes effect at the next calibration."""
    x = digits[0][:64]
    sim = QuantizationSimModel(digits_cnn, x[:8], quant_scheme="tf")
    sim.model.relu1.output_quantizers[0].bitwidth = 16
    sim.model.fc.output_quantizers[0].enabled = False
    calibrate(sim, x)
    assert sim.model.relu1.output_quantizers[0].encoding.bitwidth == 16
    names = [n for n, _ in sim.named_quantizers()]
    assert "relu1.output_quantizers.0" in names and "conv1.param_quantizers.weight" in names
    assert "fc.output_quantizers.0" not in str(sim)
    assert "relu1.output_quantizers.0" in str(sim)


def test_modes_restored_and_callback_error(digits_cnn, digits):
    """A callback that raises gives CalibrationError; modes and quantizer states are restored
    and the sim still calibrates afterwards."""
    x = digits[0][:64]
    sim = QuantizationSimModel(digits_cnn, x[:8], quant_scheme="tf")
    sim.model.train()

    def boom(model, _):
        model(x)
        raise RuntimeError("data loader broke")

    with pytest.raises(CalibrationError, match="data loader broke"):
        sim.compute_encodings(boom, None)
    assert sim.model.training and sim.model.conv1.training
    assert all(q.state == "quantize" for q in sim.quantizers())
    sim.model.eval()
    calibrate(sim, x)
    assert sim.model(x).shape == (64, 10)


def test_unused_quantizer_error_lists_names():
    """An enabled quantizer the callback never reaches is named in the error."""
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x, use_b=True):
            return self.b(self.a(x)) if use_b else self.a(x)

    x = torch.randn(8, 4)
    sim = QuantizationSimModel(TwoHeads(), x, quant_scheme="tf")
    with pytest.raises(CalibrationError, match=r"b\.output_quantizers\.0"):
        sim.compute_encodings(lambda m, _: m(x, use_b=False), None)


# -- models ---------------------------------------------------------------------------------------
def test_residual_net_warns_about_functional_add():
    """`+` in forward stays float; a warning lists where its result is quantized."""
    model = randomize_batch_norms(ResidualNet()).eval()
    x = torch.randn(4, 3, 32, 32)
    with pytest.warns(UserWarning, match="functional ops"):
        sim = QuantizationSimModel(model, x, quant_scheme="tf")
    calibrate(sim, x)
    assert sim.model.layer1[0].relu2.input_quantizers[0].enabled
    out = sim.model(x)
    ref = model(x)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99


def test_transformer_layer_is_simulated_in_eval_no_grad():
    """TransformerEncoderLayer in eval under no_grad runs the quantized attention (the torch
    fast path would skip it): sim output differs from float, and at 16 bits is close to it."""
    layer = transformer_block()
    x = torch.randn(4, 6, 32)
    sim = QuantizationSimModel(layer, x, quant_scheme="tf", default_output_bw=4,
                               default_param_bw=4)
    calibrate(sim, x)
    assert not isinstance(sim.model.self_attn, nn.MultiheadAttention)
    with torch.no_grad():
        ref, out = layer(x), sim.model(x)
    assert (out - ref).abs().max() > 1e-3
    sim16 = QuantizationSimModel(layer, x, quant_scheme="tf", default_output_bw=16,
                                 default_param_bw=16)
    calibrate(sim16, x)
    with torch.no_grad():
        assert (sim16.model(x) - ref).abs().max() < 1e-2


# -- bad input ----------------------------------------------------------------------------------
def test_bad_bitwidths_and_scheme():
    """bitwidth 3 / 32 and unknown schemes are refused with what is allowed."""
    model, x = nn.Linear(2, 2), torch.randn(1, 2)
    with pytest.raises(QuantizationSettingError, match="4..31"):
        QuantizationSimModel(model, x, default_param_bw=3)
    with pytest.raises(QuantizationSettingError, match="4..31"):
        QuantizationSimModel(model, x, default_output_bw=32)
    with pytest.raises(QuantizationSettingError, match="allowed"):
        QuantizationSimModel(model, x, quant_scheme="tf_enhancd")


def test_dummy_input_rejected():
    """A dummy_input the model rejects: the error says so and chains the cause."""
    with pytest.raises(UnsupportedModelError, match="dummy_input") as info:
        QuantizationSimModel(nn.Linear(3, 2), torch.randn(1, 5))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_data_parallel_refused():
    """torch.nn.DataParallel is refused with a pointer to DistributedDataParallel."""
    with pytest.raises(UnsupportedModelError, match="DistributedDataParallel"):
        QuantizationSimModel(nn.DataParallel(nn.Linear(2, 2)), torch.randn(1, 2))


def test_config_errors(tmp_path):
    """Missing file, invalid JSON, schema violation and unknown key name the culprit."""
    model, x = nn.Linear(2, 2), torch.randn(1, 2)
    with pytest.raises(ConfigError, match="not found"):
        QuantizationSimModel(model, x, config_file=str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"defaults": {,}')
    with pytest.raises(ConfigError, match=r"bad\.json.*line 1"):
        QuantizationSimModel(model, x, config_file=str(bad))
    from quantsim.config import BUILTIN_CONFIGS
    with open(BUILTIN_CONFIGS["default"]) as f:
        config = json.load(f)
    config["defaults"]["params"]["is_symmetric"] = "Maybe"
    path = tmp_path / "maybe.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"defaults\.params\.is_symmetric"):
        QuantizationSimModel(model, x, config_file=str(path))
    config["defaults"]["params"]["is_symmetric"] = "True"
    config["defaults"]["ops"]["is_symetric"] = "True"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="is_symetric"):
        QuantizationSimModel(model, x, config_file=str(path))


def test_exclude_layers_from_quantization(digits_cnn, digits):
    """Excluded modules lose every quantizer and are listed; unknown names are refused."""
    sim = QuantizationSimModel(digits_cnn, digits[0][:8])
    sim.exclude_layers_from_quantization(["fc", sim.model.conv2])
    assert sim.excluded_layers == ["fc", "conv2"]
    assert not any(q.enabled for n, q in sim.named_quantizers() if n.startswith(("fc.", "conv2.")))
    with pytest.raises(UnsupportedModelError, match="not a quantized module"):
        sim.exclude_layers_from_quantization(["nope"])


def test_construction_leaves_batch_norm_statistics_and_modes(digits):
    """Building a sim from a model in train() mode neither updates BatchNorm running
    statistics nor changes any module's mode."""
    model = DigitsCNN().train()
    before = model.bn1.running_mean.clone()
    sim = QuantizationSimModel(model, digits[0][:8], in_place=True)
    assert torch.equal(model.bn1.running_mean, before)
    assert all(m.training for m in sim.model.modules())


# -- dummy_input readings ---------------------------------------------------------------------
def test_dict_dummy_input_read_as_one_argument():
    """forward(self, inputs) reading keys (aimet-torch passes the dict as the one argument):
    the sim builds, quantizes the dict's tensor at the model input and calibrates."""
    torch.manual_seed(0)
    d = {"image": torch.randn(4, 3, 8, 8), "mask": (torch.rand(4, 8, 8, 8) > 0.2).float()}
    sim = QuantizationSimModel(DictInputNet(), d, quant_scheme="tf")
    assert sim.model.conv.input_quantizers[0].enabled
    sim.compute_encodings(lambda m, _: m(d), None)
    assert all(q.is_initialized for q in sim.quantizers() if q.enabled)
    with torch.no_grad():
        assert sim.model(d).shape == (4, 5)


def test_keyword_dummy_input_and_ambiguous_forward():
    """A dict of forward's parameter names is passed as keywords; a forward that takes the
    dict both ways refuses it at construction, naming both readings."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.ones(2, 6)
    sim = QuantizationSimModel(KeywordNet(), {"input_ids": ids, "attention_mask": mask})
    assert sim.graph.call_counts["head"] == 1

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = KeywordNet()

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    d = {"input_ids": ids, "attention_mask": mask}
    with pytest.raises(DummyInputError, match=r"both as its one positional argument"):
        QuantizationSimModel(Wrapper(), d)
    sim = QuantizationSimModel(Wrapper(), KeywordInputs(d))
    assert sim.graph.call_counts["inner.head"] == 1


def test_quantized_root_reads_its_float_forward():
    """A model that is itself a leaf gets wrapped; its dict input is still read by the float
    class's signature (forward(self, inputs))."""

    class Gain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.linspace(0.5, 2.0, 4))

        def forward(self, inputs):
            return inputs["x"] * self.weight

    d = {"x": torch.randn(3, 4)}
    sim = QuantizationSimModel(Gain(), d, quant_scheme="tf")
    sim.compute_encodings(lambda m, _: run_forward(m, d), None)
    with torch.no_grad():
        assert run_forward(sim.model, d).shape == (3, 4)


# -- a module reachable under two names -------------------------------------------------------
def test_shared_module_gets_one_set_of_quantizers():
    """self.block that is also self.body[0]: one wrapper named 'block' (named_modules order),
    one set of quantizers, and calibration reaches all of them."""
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    sim = QuantizationSimModel(SharedBlockNet(), x, quant_scheme="tf")
    assert sim.model.block is sim.model.body[0]
    names = [n for n, _ in sim.named_quantizers()]
    assert not any(n.startswith("body.0.") for n in names), names
    assert len(sim.model.block.input_quantizers) == 1 and len(sim.model.block.param_quantizers) == 2
    assert [n for n, _ in sim.named_qmodules()] == ["block", "body.1", "head"]
    calibrate(sim, x)
    assert all(q.is_initialized for q in sim.quantizers() if q.enabled)


def test_shared_module_called_through_both_names():
    """Called as self.body[0] and again as self.block: one module called twice, so one set of
    quantizers whose statistics merge (the usual warning), and calibration succeeds."""
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    with pytest.warns(UserWarning, match=r"called more than once.*\['block'\]"):
        sim = QuantizationSimModel(SharedBlockNet(twice=True), x, quant_scheme="tf")
    assert sim.graph.call_counts["block"] == 2
    calibrate(sim, x)
    assert sum(1 for n, _ in sim.named_quantizers() if n.startswith("block.")) == 4


def test_exclude_shared_module_by_either_name():
    sim = QuantizationSimModel(SharedBlockNet(), torch.randn(4, 8))
    sim.exclude_layers_from_quantization(["body.0"])
    assert sim.excluded_layers == ["block"]
    assert not any(q.enabled for _, q in quantizer_items(sim.model.block))
    sim.exclude_layers_from_quantization([sim.model.body[0], "block"])
    assert sim.excluded_layers == ["block"]
