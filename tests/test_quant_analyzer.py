"""quantsim.quant_analyzer: per-layer analysis (QuantAnalyzer, analyze_sim).

The acceptance model plants one bad quantizer: a 4-bit output quantizer on a wide-range tensor
(two output channels of ``fc2`` scaled by 40), the rest W8A8. The analysis must rank it first
by its own SQNR and in both sensitivity sweeps. The numbers of the one statistics pass are
checked against direct computations with forward hooks on the float model and the sim.
"""
from __future__ import annotations

import copy
import json
import math
import sys

import jsonschema
import pytest
import torch
from torch import nn

from quantsim.analysis.results import SCHEMA_PATH, AnalysisResults
from quantsim.defs import CallbackFunc
from quantsim.errors import AnalysisError, CallbackError, UnsupportedModelError
from quantsim.metrics import OutputSQNR, sqnr_db
from quantsim.quant_analyzer import QuantAnalyzer, analyze_sim
from quantsim.sim import QuantizationSimModel
from quantsim.wrappers import quantizer_items

from conftest import DEVICES, EXAMPLES

pytestmark = pytest.mark.usefixtures("one_thread")


class Planted(nn.Module):
    """An MLP whose ``fc2`` output has two outlier channels (its weight rows scaled by 40)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 64)
        self.act3 = nn.ReLU()
        self.fc4 = nn.Linear(64, 8)
        with torch.no_grad():
            self.fc2.weight[:2] *= 40

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.fc4(self.act3(self.fc3(self.fc2(self.act1(self.fc1(x))))))


def _planted_sim(model: nn.Module, batches) -> QuantizationSimModel:
    sim = QuantizationSimModel(model, batches[0], quant_scheme="tf")
    sim.model.fc2.output_quantizers[0].bitwidth = 4   # the planted bad quantizer
    sim.compute_encodings(lambda m, _: [m(b) for b in batches], None)
    return sim


@pytest.fixture(scope="module")
def planted():
    """(float model, batches, calibrated sim, analysis results), analyzed once."""
    torch.manual_seed(0)
    model = Planted().eval()
    batches = [torch.randn(32, 16) for _ in range(3)]
    sim = _planted_sim(model, batches)
    results = analyze_sim(sim, batches, OutputSQNR(model, batches))
    return model, batches, sim, results


def _flags(sim):
    return {name: q.enabled for name, q in sim.named_quantizers()}


# -- the acceptance -------------------------------------------------------------------------------
def test_planted_bad_quantizer_ranked_first(planted):
    _, _, _, results = planted
    worst = results.worst_quantizers()
    assert worst[0].name == "fc2.output_quantizers.0", str(results)
    assert worst[0].bitwidth == 4
    # at 8 bits the same range has 16x finer steps: the others are far above it (about 6 dB/bit)
    assert worst[1].quantizer_sqnr_db > worst[0].quantizer_sqnr_db + 12
    assert results.sensitivity("enabled")[0][0] == "fc2", str(results)
    assert results.sensitivity("disabled")[0][0] == "fc2", str(results)
    # the table leads with it too
    table = str(results)
    assert table.index("fc2.output_quantizers.0") < table.index("fc4.output_quantizers.0")


def test_against_float_sqnr_accumulates_downstream(planted):
    """Against the float model the noise of fc2's output reaches every later tensor: no later
    activation is cleaner than it, while every earlier one is."""
    _, _, _, results = planted
    acts = [q for q in results.quantizers if q.is_activation]
    names = [q.name for q in acts]
    k = names.index("fc2.output_quantizers.0")
    planted_sqnr = acts[k].sqnr_db
    assert all(q.sqnr_db > planted_sqnr + 12 for q in acts[:k])
    assert all(q.sqnr_db < planted_sqnr + 3 for q in acts[k + 1:])


# -- the one pass against direct computations ----------------------------------------------------
def _capture(module: nn.Module, store: list, inputs: bool = False):
    def hook(_m, args, out):
        store.append((args[0] if inputs else out).detach().clone())
    return module.register_forward_hook(hook)


def test_statistics_equal_direct_computation(planted):
    model, batches, sim, results = planted
    stats = {q.name: q for q in results.quantizers}
    # float tensors from the float model itself, quantized ones from sim.model, same batches
    float_out, quant_out, quant_in = [], [], []
    handles = [_capture(model.fc2, float_out), _capture(sim.model.fc2, quant_out),
               _capture(sim.model.fc3, quant_in, inputs=True)]
    try:
        with torch.no_grad():
            for b in batches:
                model(b)
                sim.model(b)
    finally:
        for h in handles:
            h.remove()
    f, q = torch.cat(float_out), torch.cat(quant_out)
    assert torch.equal(q, torch.cat(quant_in))   # fc2's output quantizer feeds fc3
    fc2_out = stats["fc2.output_quantizers.0"]
    # pooled float64 sums: the batches' order of summation is the only difference
    assert fc2_out.sqnr_db == pytest.approx(sqnr_db(f, q), rel=1e-12)
    # the pass takes differences in float32: 2^-23 relative on a sum of squares
    assert fc2_out.mse == pytest.approx(float((f.double() - q.double()).square().mean()),
                                        rel=2**-23)
    assert fc2_out.numel == f.numel()

    # the quantizer's own noise: its input (fc2's output in the sim, its quantizer off)
    quantizer = sim.model.fc2.output_quantizers[0]
    pre = []
    quantizer.enabled = False
    handle = _capture(sim.model.fc2, pre)
    try:
        with torch.no_grad():
            for b in batches:
                sim.model(b)
    finally:
        handle.remove()
        quantizer.enabled = True
    x = torch.cat(pre)
    enc = quantizer.encoding
    assert fc2_out.quantizer_sqnr_db == pytest.approx(sqnr_db(x, enc.fake_quantize(x)),
                                                      rel=1e-12)
    assert fc2_out.observed_min == float(x.min()) and fc2_out.observed_max == float(x.max())
    half = float(enc.scale) / 2
    outside = ((x < float(enc.min) - half) | (x > float(enc.max) + half)).double().mean()
    assert fc2_out.clipped_fraction == pytest.approx(float(outside), abs=1e-15)
    assert sum(fc2_out.histogram.counts) == pytest.approx(x.numel())
    assert fc2_out.encoding_min == [float(enc.min)] and fc2_out.encoding_max == [float(enc.max)]

    # parameters: the weight against its fake-quantized self, per channel
    w = sim.model.fc2.weight.detach()
    wq = sim.model.fc2.param_quantizers["weight"]
    w_stats = stats["fc2.param_quantizers.weight"]
    assert w_stats.per_channel and len(w_stats.encoding_min) == 64
    assert w_stats.sqnr_db == w_stats.quantizer_sqnr_db == pytest.approx(
        sqnr_db(w, wq.encoding.fake_quantize(w)), rel=1e-12)

    # the model output's SQNR against float is the OutputSQNR metric of the quantized model
    assert stats["fc4.output_quantizers.0"].sqnr_db == pytest.approx(results.quantized_score,
                                                                     rel=1e-12)
    # the per-layer MSE of the last layer is its output quantizer's
    assert results.layer_mse["fc4"] == pytest.approx(stats["fc4.output_quantizers.0"].mse)


def test_scores(planted):
    _, _, sim, results = planted
    assert results.fp32_score == math.inf       # the float model against itself
    assert results.quantized_score < results.weight_quantized_score
    assert results.per_layer_enabled and list(results.per_layer_enabled) == list(
        results.per_layer_disabled)
    # call order
    assert list(results.per_layer_enabled) == ["fc1", "act1", "fc2", "fc3", "act3", "fc4"]
    assert results.num_batches == 3


# -- the sweeps restore the sim -------------------------------------------------------------------
def test_sweeps_restore_enabled_flags(planted):
    model, batches, _, _ = planted
    sim = _planted_sim(model, batches)
    sim.model.fc3.param_quantizers["weight"].enabled = False   # a user's choice, kept
    before = _flags(sim)
    reference = [sim.model(b) for b in batches]
    analyze_sim(sim, batches, OutputSQNR(model, batches))
    assert _flags(sim) == before
    assert all(torch.equal(r, sim.model(b)) for r, b in zip(reference, batches))
    assert "forward" not in sim.model.__dict__              # the pass's forward is removed
    assert not any(m._forward_hooks for m in sim.model.modules())

    calls = []

    def failing(m):
        calls.append(1)
        if len(calls) == 7:   # in the middle of the first sweep
            raise RuntimeError("eval failed")
        return 0.0

    with pytest.raises(RuntimeError, match="eval failed"):
        analyze_sim(sim, batches, failing)
    assert _flags(sim) == before


def test_statistics_pass_restores_on_error(planted):
    model, batches, sim, _ = planted
    before = _flags(sim)

    def bad_forward(m):
        m(batches[0])
        m(torch.randn(3, 5))   # wrong width: the model raises inside the pass

    with pytest.raises(RuntimeError):
        analyze_sim(sim, bad_forward)
    assert _flags(sim) == before
    assert "forward" not in sim.model.__dict__
    assert not any(m._forward_hooks for m in sim.model.modules())


# -- results files --------------------------------------------------------------------------------
def test_results_json_round_trip_and_schema(planted, tmp_path):
    _, _, _, results = planted
    path = results.save(tmp_path / "r.json")
    doc = json.loads(path.read_text())     # strict JSON: inf is written as "inf"
    jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text()))
    assert doc["fp32_score"] == "inf"
    loaded = AnalysisResults.load(path)
    assert loaded == results
    assert str(loaded) == str(results)

    doc["quantizers"][0]["role"] = "weight"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(AnalysisError, match=r"bad.json.*quantizers/0/role"):
        AnalysisResults.load(bad)
    with pytest.raises(AnalysisError, match="missing.json"):
        AnalysisResults.load(tmp_path / "missing.json")


def test_without_matplotlib_json_only(planted, tmp_path, monkeypatch, capsys):
    _, batches, sim, _ = planted
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # an environment without it
    results = analyze_sim(sim, batches, None, tmp_path)
    assert results.files and not any(f.endswith(".png") for f in results.files)
    assert not list(tmp_path.rglob("*.png"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quantsim[plot]" in err[0]
    assert results.per_layer_enabled == {} and results.fp32_score is None


# -- QuantAnalyzer end to end (aimet-torch's API) -------------------------------------------------
@pytest.fixture(scope="module")
def digits_analyzer(trained_digits_cnn, digits):
    x_train, _, x_test, y_test = digits

    def calibrate(model, n):
        model(x_train[:n])

    def accuracy(model, data):
        x, y = data
        return float((model(x).argmax(1) == y).float().mean())

    analyzer = QuantAnalyzer(trained_digits_cnn, x_train[:1], CallbackFunc(calibrate, 128),
                             CallbackFunc(accuracy, (x_test[:120], y_test[:120])),
                             modules_to_ignore=[trained_digits_cnn.fc])
    return analyzer


def test_quant_analyzer_analyze(digits_analyzer, trained_digits_cnn, digits, tmp_path):
    state = copy.deepcopy(trained_digits_cnn.state_dict())
    digits_analyzer.enable_per_layer_mse_loss([digits[0][i:i + 32] for i in range(0, 96, 32)], 2)
    results = digits_analyzer.analyze("tf", 8, 8, None, tmp_path)
    assert results is digits_analyzer.results and digits_analyzer.sim is not None
    assert results.num_batches == 2                 # the MSE data, not the calibration callback
    assert results.fp32_score >= 0.9
    assert "fc" not in results.per_layer_enabled    # modules_to_ignore: unquantized, unanalyzed
    assert all(q.layer != "fc" for q in results.quantizers)
    fc_quantizers = [q for _, q in quantizer_items(digits_analyzer.sim.model.fc)]
    assert fc_quantizers and not any(q.enabled for q in fc_quantizers)
    # the files: aimet-torch's JSON names, the results document, PNGs (matplotlib is a test
    # dependency), one histogram per quantizer
    import matplotlib  # noqa: F401
    expected = {"quant_analyzer_results.json", "per_layer_quant_enabled.json",
                "per_layer_quant_disabled.json", "per_layer_quant_enabled.png",
                "per_layer_quant_disabled.png", "per_quantizer_sqnr.png",
                "per_layer_mse_loss.json", "per_layer_mse_loss.png",
                "min_max_ranges/weights.json", "min_max_ranges/activations.json",
                "min_max_ranges/weights.png", "min_max_ranges/activations.png",
                "activations_pdf/conv1.input_quantizers.0.png", "weights_pdf/conv1/weight.png"}
    assert expected <= set(results.files)
    for f in results.files:
        data = (tmp_path / f).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" if f.endswith(".png") else json.loads(data)
    assert len([f for f in results.files if f.endswith(".png")]) == 6 + len(results.quantizers)
    assert AnalysisResults.load(tmp_path / "quant_analyzer_results.json") == results
    # the float model is left as it was
    assert all(torch.equal(v, trained_digits_cnn.state_dict()[k]) for k, v in state.items())

    sim = digits_analyzer.sim
    fp32, w_only, a_only = digits_analyzer.check_model_sensitivity_to_quantization(sim)
    assert (fp32, w_only, a_only) == (results.fp32_score, results.weight_quantized_score,
                                      results.activation_quantized_score)
    enabled = digits_analyzer.perform_per_layer_analysis_by_enabling_quant_wrappers(
        sim, tmp_path / "parts")
    assert enabled == results.per_layer_enabled
    assert json.loads((tmp_path / "parts" / "per_layer_quant_enabled.json").read_text()) == enabled
    disabled = digits_analyzer.perform_per_layer_analysis_by_disabling_quant_wrappers(
        sim, tmp_path / "parts")
    assert disabled == results.per_layer_disabled
    weights, activations = digits_analyzer.export_per_layer_encoding_min_max_range(
        sim, tmp_path / "parts")
    assert set(weights) == {q.name for q in results.quantizers if q.role == "param"}
    assert set(activations) == {q.name for q in results.quantizers if q.is_activation}
    mse = digits_analyzer.export_per_layer_mse_loss(sim, tmp_path / "parts")
    assert mse == results.layer_mse
    files = digits_analyzer.export_per_layer_stats_histogram(sim, tmp_path / "parts")
    assert len(files) == len(results.quantizers)
    worst = digits_analyzer.export_per_layer_sqnr(sim, tmp_path / "parts")
    assert [q.name for q in worst] == [q.name for q in results.worst_quantizers()]


def test_callbackfunc_and_plain_callables_agree(trained_digits_cnn, digits):
    x_train, _, x_test, y_test = digits

    def accuracy(model):
        return (model(x_test[:100]).argmax(1) == y_test[:100]).float().mean()   # a tensor

    scores = []
    for forward, evaluate in [
            (CallbackFunc(lambda m, n: m(x_train[:n]), 64),
             CallbackFunc(lambda m, _: accuracy(m), None)),
            (lambda m: m(x_train[:64]), accuracy),                   # one argument
            (lambda m, _args: m(x_train[:64]), lambda m, _args: accuracy(m))]:   # two
        analyzer = QuantAnalyzer(trained_digits_cnn, x_train[:1], forward, evaluate)
        sim = analyzer.create_sim("tf")
        scores.append(analyzer.check_model_sensitivity_to_quantization(sim))
    assert scores[0] == scores[1] == scores[2]


# -- bad arguments --------------------------------------------------------------------------------
def test_bad_arguments(planted, tmp_path):
    model, batches, sim, _ = planted
    with pytest.raises(UnsupportedModelError, match="QuantAnalyzer"):
        QuantAnalyzer(Planted, batches[0], lambda m: None, lambda m: 0.0)
    with pytest.raises(CallbackError, match="forward_pass_callback"):
        QuantAnalyzer(model, batches[0], "calibrate", lambda m: 0.0)
    with pytest.raises(CallbackError, match="eval_callback"):
        QuantAnalyzer(model, batches[0], lambda m: None, 0.5)
    with pytest.raises(AnalysisError, match="modules_to_ignore entry"):
        QuantAnalyzer(model, batches[0], lambda m: None, lambda m: 0.0,
                      modules_to_ignore=[nn.Linear(2, 2)])
    with pytest.raises(AnalysisError, match="must be a list"):
        QuantAnalyzer(model, batches[0], lambda m: None, lambda m: 0.0, modules_to_ignore="fc1")
    analyzer = QuantAnalyzer(model, batches[0], lambda m: m(batches[0]), lambda m: 0.0)
    with pytest.raises(AnalysisError, match="num_batches"):
        analyzer.enable_per_layer_mse_loss(batches, 0)
    with pytest.raises(AnalysisError, match="cannot take 5 batches"):
        analyzer.enable_per_layer_mse_loss(batches, 5)
    with pytest.raises(AnalysisError, match="re-iterable"):
        analyzer.enable_per_layer_mse_loss(iter(batches), 1)
    with pytest.raises(AnalysisError, match="enable_per_layer_mse_loss"):
        analyzer.export_per_layer_mse_loss(sim, tmp_path)

    with pytest.raises(AnalysisError, match="QuantizationSimModel"):
        analyze_sim(model, batches)
    with pytest.raises(AnalysisError, match="not a model"):
        analyze_sim(sim, model)
    with pytest.raises(AnalysisError, match="wrap a single batch"):
        analyze_sim(sim, batches[0])
    with pytest.raises(AnalysisError, match="num_batches"):
        analyze_sim(sim, batches, num_batches=0)
    with pytest.raises(AnalysisError, match="must return a number"):
        analyze_sim(sim, batches, lambda m: "good")
    with pytest.raises(AnalysisError, match="never called the model"):
        analyze_sim(sim, [])
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(AnalysisError, match="not a folder"):
        analyze_sim(sim, batches, None, a_file)
    with pytest.raises(AnalysisError, match="key must be one of"):
        AnalysisResults("tf", 8, 8).worst_quantizers(key="snr")
    with pytest.raises(AnalysisError, match="sweep must be one of"):
        AnalysisResults("tf", 8, 8).sensitivity("both")

    fresh = QuantizationSimModel(model, batches[0], quant_scheme="tf")
    with pytest.raises(AnalysisError, match="compute_encodings"):
        analyze_sim(fresh, batches)


def test_keyword_batches_through_the_pass():
    """Dict batches reach ``forward(input_ids, attention_mask)`` as keyword arguments while the
    pass stands in for ``sim.model.forward`` (its signature is kept for the dict rule)."""
    from models import KeywordNet
    torch.manual_seed(0)
    model = KeywordNet().eval()
    batches = [{"input_ids": torch.randint(0, 50, (4, 6)),
                "attention_mask": torch.ones(4, 6, dtype=torch.long)} for _ in range(2)]
    sim = QuantizationSimModel(model, batches[0], quant_scheme="tf")
    sim.compute_encodings(lambda m, _: [m(**b) for b in batches], None)
    results = analyze_sim(sim, batches, OutputSQNR(model, batches))
    assert results.num_batches == 2
    assert all(q.numel > 0 for q in results.quantizers)
    assert math.isfinite(results.quantized_score)


def test_sweeps_equal_aimet_torch(planted):
    """aimet-torch 2.42's QuantAnalyzer sweeps on the same planted sim (its output quantizer
    replaced by a 4-bit one, tf, same batches and metric) gave these scores
    (tests/data/aimet/quant_analyzer_planted.json); the encodings are aimet-torch's bit for bit
    under tf, so the scores agree to float rounding. Tolerance: one code landing a step apart
    in one of the 768 output values moves the pooled noise by well under 1% (0.04 dB)."""
    _, _, _, results = planted
    aimet = json.loads((EXAMPLES / "quant_analyzer_planted.json").read_text())
    assert results.quantized_score == pytest.approx(aimet["quantized_score"], abs=0.04)
    for sweep in ("enabled", "disabled"):
        ours = getattr(results, f"per_layer_{sweep}")
        theirs = aimet[f"per_layer_{sweep}"]
        assert list(ours) == list(theirs)   # same layers, same call order
        for layer in theirs:
            assert ours[layer] == pytest.approx(theirs[layer], abs=0.04), (sweep, layer)


@pytest.mark.parametrize("device", DEVICES)
def test_planted_on_device(device):
    """The pass, the sweeps and the metrics keep every tensor on the model's device."""
    torch.manual_seed(0)
    model = Planted().eval().to(device)
    batches = [torch.randn(32, 16, device=device) for _ in range(3)]
    sim = _planted_sim(model, batches)
    results = analyze_sim(sim, batches, OutputSQNR(model, batches))
    assert results.worst_quantizers()[0].name == "fc2.output_quantizers.0"
    assert results.sensitivity("enabled")[0][0] == results.sensitivity("disabled")[0][0] == "fc2"
    assert all(q.numel > 0 and q.histogram is not None for q in results.quantizers)
