"""Per-block and LPBQ weight quantization (issue 18, items 1-3).

The arithmetic against a direct per-block reference (hypothesis), range-learning gradients per
block, the aimet-torch 2.x ``config_utils`` calls in their three argument forms, every scheme,
the hardware config extension, checkpoints, the encodings files (export -> load_encodings ->
identical outputs; the schema; aimet-torch 2.42's own files) and the blocked QDQ model in ONNX
Runtime.
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from conftest import assert_qdq_agrees
from quantsim import QuantizationSimModel
from quantsim import encodings as enc_files
from quantsim.checkpoint import load_checkpoint, save_checkpoint
from quantsim.config import load_config, read_config_document
from quantsim.config_utils import (set_blockwise_quantization_for_weights,
                                   set_grouped_blockwise_quantization_for_weights)
from quantsim.encoding import (Encoding, amin_amax, block_rows, fake_quantize,
                               fake_quantize_range, integer_grid, lpbq_scale)
from quantsim.errors import (CalibrationError, ConfigError, EncodingsError,
                             QuantizationSettingError)
from quantsim.export import load_encodings, verify
from quantsim.quantizer import Quantizer

AIMET = Path(__file__).resolve().parent / "data" / "aimet"
pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """The model of the aimet-torch files in tests/data/aimet (Conv2d and Linear weights whose
    inputs are multiples of 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(64, 16, 3, padding=1)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.fc2(self.fc1(self.flat(self.relu(self.conv(x)))))


@pytest.fixture(scope="module")
def net():
    """The float model, its input and aimet-torch 2.42's sim outputs for it (tf scheme, int4
    weights in blocks of 32: per block, and LPBQ with decompressed_bw 8)."""
    saved = torch.load(AIMET / "blockwise_model.pt", weights_only=True)
    model = Net().eval()
    model.load_state_dict(saved["state_dict"])
    return model, saved["input"], saved["aimet_output"]


def _set(sim, kind: str, arg=(nn.Linear, nn.Conv2d), block: int = 32) -> None:
    if kind == "lpbq":
        set_grouped_blockwise_quantization_for_weights(sim, list(arg), 4, True, 8, block)
    else:
        set_blockwise_quantization_for_weights(sim, list(arg), 4, True, block)


def _calibrated(model, x, kind: str, scheme: str = "tf") -> QuantizationSimModel:
    sim = QuantizationSimModel(model, x, quant_scheme=scheme, default_param_bw=4)
    _set(sim, kind)
    sim.compute_encodings(lambda m, _: m(x))
    return sim


# ----------------------------------------------------------------------------------------------
# arithmetic: per block == per tensor on each block
# ----------------------------------------------------------------------------------------------
def _blocks(x: torch.Tensor, block: int):
    """(c, k, view of block k of channel c) for a (C, K, ...) tensor."""
    for c in range(x.shape[0]):
        for k in range(x.shape[1] // block):
            yield c, k, x[c, k * block:(k + 1) * block]


@settings(max_examples=40, deadline=None)
@given(channels=st.integers(1, 4), blocks=st.integers(1, 4), block=st.sampled_from([1, 2, 8]),
       kernel=st.sampled_from([(), (1,), (2, 3)]), bitwidth=st.integers(4, 8),
       symmetric=st.booleans(), seed=st.integers(0, 2**16))
def test_per_block_arithmetic_is_per_tensor_arithmetic_on_each_block(
        channels, blocks, block, kernel, bitwidth, symmetric, seed):
    """Encoding.from_range on per-block ranges, and quantize / fake_quantize with it, equal the
    per-tensor functions applied to every block on its own, bit for bit (same float32 ops)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(channels, blocks * block, *kernel, generator=g) * torch.rand(
        channels, blocks * block, *kernel, generator=g).mul(3)
    lo, hi = amin_amax(x, 0, block)
    enc = Encoding.from_range(lo, hi, bitwidth, symmetric, axis=0, block_size=block)
    out, codes = enc.fake_quantize(x), enc.quantize(x)
    for c, k, part in _blocks(x, block):
        ref = Encoding.from_range(part.min(), part.max(), bitwidth, symmetric)
        assert torch.equal(enc.scale[c, k], ref.scale) and torch.equal(enc.offset[c, k], ref.offset)
        assert torch.equal(out[c, k * block:(k + 1) * block], ref.fake_quantize(part))
        assert torch.equal(codes[c, k * block:(k + 1) * block], ref.quantize(part))
    assert torch.equal(enc.dequantize(codes), out)


@settings(max_examples=30, deadline=None)
@given(channels=st.integers(1, 4), blocks=st.integers(1, 6), decompressed=st.integers(0, 5),
       seed=st.integers(0, 2**16))
def test_lpbq_scales_are_integer_multiples_of_the_channel_scale(channels, blocks, decompressed,
                                                                 seed):
    """LPBQ block scales = multiplier in [1, 2^(dbw - bw)] x channel scale, the multiplier
    round(raw / channel) of aimet-torch's grouped-block rule; the largest block keeps its raw
    scale (the channel scale is the largest raw scale over 2^(dbw - bw), a power of two)."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.rand(channels, blocks, generator=g) + 1e-3
    scale, channel = lpbq_scale(raw, 4, 4 + decompressed)
    steps = 2 ** decompressed
    assert torch.equal(channel, raw.amax(dim=1) / steps)
    multiplier = torch.round(raw / channel[:, None]).clamp(1, steps)
    assert torch.equal(scale, multiplier * channel[:, None])
    assert torch.equal(scale.amax(dim=1), raw.amax(dim=1))
    enc = Encoding.lpbq(multiplier, channel, 4, 4 + decompressed, 16)
    assert torch.equal(enc.scale, scale) and torch.equal(enc.per_block_int_scale, multiplier)


def test_range_learning_gradients_are_per_block():
    """fake_quantize_range per block gives every block's min / max the gradient that the
    per-tensor function gives that block alone (sums over a block, float32 rounding)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 2, generator=g)
    lo, hi = amin_amax(x, 0, 4)
    lo, hi = (lo * 0.8).requires_grad_(), (hi * 0.8).requires_grad_()
    xg = x.clone().requires_grad_()
    upstream = torch.randn(x.shape, generator=g)
    (fake_quantize_range(xg, lo, hi, -8, 7, True, 0, block_size=4) * upstream).sum().backward()
    for c, k, part in _blocks(x, 4):
        blo, bhi = (t[c, k].detach().clone().requires_grad_() for t in (lo, hi))
        bx = part.clone().requires_grad_()
        (fake_quantize_range(bx, blo, bhi, -8, 7, True) * upstream[c, k * 4:(k + 1) * 4]).sum(
        ).backward()
        assert torch.allclose(lo.grad[c, k], blo.grad, rtol=1e-5, atol=1e-6)
        assert torch.allclose(hi.grad[c, k], bhi.grad, rtol=1e-5, atol=1e-6)
        assert torch.equal(xg.grad[c, k * 4:(k + 1) * 4], bx.grad)


def test_block_view_is_a_view_and_refuses_a_misfit():
    """block_rows reshapes without copying; a dimension 1 not divisible by the block size is a
    typed error."""
    w = torch.randn(4, 64, 3, 3)
    rows = block_rows(w, 16)
    assert rows.shape == (16, 16 * 9) and rows.data_ptr() == w.data_ptr()
    with pytest.raises(QuantizationSettingError, match="divisible into blocks of 24"):
        block_rows(w, 24)


# ----------------------------------------------------------------------------------------------
# the sim: config_utils, schemes, range learning, checkpoints, config
# ----------------------------------------------------------------------------------------------
def test_config_utils_argument_forms(net):
    """A list of types, a list of modules and a predicate pick the same weights; others keep
    their granularity; the picked quantizers drop their encoding until calibrated."""
    model, x, _ = net
    picked = {}
    for form in ([nn.Linear], "modules", lambda m: isinstance(m, nn.Linear)):
        sim = QuantizationSimModel(model, x, quant_scheme="tf")
        sim.compute_encodings(lambda m, _: m(x))
        arg = [sim.model.fc1, sim.model.fc2] if form == "modules" else form
        set_blockwise_quantization_for_weights(sim, arg, 4, True, 32)
        picked[str(form)] = sorted(n for n, q in sim.named_quantizers() if q.block_size)
        assert not sim.model.fc1.param_quantizers["weight"].is_initialized
        assert sim.model.conv.param_quantizers["weight"].block_size is None
        assert sim.model.conv.param_quantizers["weight"].is_initialized
    assert len(set(map(tuple, picked.values()))) == 1
    assert next(iter(picked.values())) == ["fc1.param_quantizers.weight",
                                           "fc2.param_quantizers.weight"]


@pytest.mark.parametrize("kind", ["blockwise", "lpbq"])
def test_tf_encodings_and_outputs_equal_aimet_torch(net, kind):
    """With tf, the per-block / LPBQ weight encodings equal aimet-torch 2.42's bit for bit
    (its 2.0.0 file), and the sim's outputs equal its sim's."""
    model, x, aimet_out = net
    sim = _calibrated(model, x, kind)
    theirs = enc_files.load(AIMET / f"{kind}_encodings_v2.0.0.json")
    for name in ("conv", "fc1", "fc2"):
        ours = getattr(sim.model, name).param_quantizers["weight"].encoding
        assert ours == theirs.param[f"{name}.weight"], name
    with torch.no_grad():
        assert torch.equal(sim.model(x), aimet_out[kind])


@pytest.mark.parametrize("scheme", ["tf_enhanced", "percentile"])
def test_histogram_schemes_run_per_block(net, scheme):
    """tf_enhanced and percentile give per-block encodings equal to the per-channel analyzer
    (same settings) on the block view; tf_enhanced clips no more than tf's full range."""
    model, x, _ = net
    sim = _calibrated(model, x, "blockwise", scheme)
    q = sim.model.fc1.param_quantizers["weight"]
    w = sim.model.fc1.weight.detach()
    per_row = Quantizer(4, True, shape=(q.scale.numel(),), axis=0, scheme=scheme)
    per_row.analyzer = q._create_analyzer(scheme)  # the block quantizer's analyzer settings
    per_row.observe(block_rows(w, 32))
    per_row.compute_encoding()
    assert torch.equal(q.encoding.scale.reshape(-1), per_row.encoding.scale)
    assert bool((q.encoding.max <= amin_amax(w, 0, 32)[1].abs().maximum(
        amin_amax(w, 0, 32)[0].abs()) * 8 / 7 * (1 + 1e-6)).all())


def test_range_learning_trains_block_ranges(net):
    """Learnable per-block and LPBQ ranges get per-block gradients in a training step."""
    model, x, _ = net
    for kind in ("blockwise", "lpbq"):
        sim = _calibrated(model, x, kind)
        q = sim.model.fc1.param_quantizers["weight"]
        q.set_learnable(True)
        assert q.min.shape == (64, 8)
        sim.model.train()
        sim.model(x).square().sum().backward()
        assert q.max.grad is not None and q.max.grad.shape == (64, 8)
        assert bool((q.max.grad != 0).any())


@pytest.mark.parametrize("kind", ["blockwise", "lpbq"])
def test_checkpoint_round_trip(net, kind, tmp_path):
    """save_checkpoint / load_checkpoint keep per-block and LPBQ quantizers (settings and
    state_dict shapes), learnable ranges included: identical outputs."""
    model, x, _ = net
    sim = _calibrated(model, x, kind)
    sim.model.fc2.param_quantizers["weight"].set_learnable(True)
    with torch.no_grad():
        y = sim.model(x)
    save_checkpoint(sim, tmp_path / "sim.qsim")
    back = load_checkpoint(tmp_path / "sim.qsim", model=model)
    for name, q in sim.named_quantizers():
        assert dict(back.named_quantizers())[name].settings() == q.settings()
    with torch.no_grad():
        assert torch.equal(back.model(x), y)


def test_hardware_config_extension(net):
    """block_size / decompressed_bw in a config's params entries make per-block (LPBQ)
    weights; a weight they do not fit keeps its granularity with a warning; decompressed_bw
    without block_size is a ConfigError naming the key."""
    model, x, _ = net
    doc = copy.deepcopy(read_config_document("per_channel"))
    doc["op_type"].setdefault("Gemm", {})["params"] = {"weight": {
        "is_quantized": "True", "is_symmetric": "True", "block_size": 32, "decompressed_bw": 8}}
    doc["op_type"].setdefault("Conv", {})["params"] = {"weight": {"block_size": 48}}
    with pytest.warns(UserWarning, match=r"conv: weight of shape \[16, 64, 3, 3\] has 64 inputs"):
        sim = QuantizationSimModel(model, x, quant_scheme="tf", config_file=doc,
                                   default_param_bw=4)
    assert sim.model.fc1.param_quantizers["weight"].decompressed_bw == 8
    assert sim.model.conv.param_quantizers["weight"].block_size is None
    sim.compute_encodings(lambda m, _: m(x))
    ref = _calibrated(model, x, "lpbq")
    assert sim.model.fc1.param_quantizers["weight"].encoding == \
        ref.model.fc1.param_quantizers["weight"].encoding
    del doc["op_type"]["Gemm"]["params"]["weight"]["block_size"]
    with pytest.raises(ConfigError, match="op_type.Gemm.params.weight.decompressed_bw"):
        load_config(doc)


# ----------------------------------------------------------------------------------------------
# files: export -> load_encodings, the schema, aimet-torch's files, ORT
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["blockwise", "lpbq"])
def exported(net, request, tmp_path_factory):
    """A calibrated per-block / LPBQ sim exported once per encodings version."""
    model, x, _ = net
    kind = request.param
    sim = _calibrated(model, x, kind)
    folder = tmp_path_factory.mktemp(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = {v: sim.export(str(folder), f"net_{v}", x, encoding_version=v)
                 for v in ("1.0.0", "2.0.0", "0.6.1")}
    return kind, sim, files


@pytest.mark.parametrize("version", ["1.0.0", "2.0.0", "0.6.1"])
def test_encodings_round_trip(net, exported, version):
    """export -> load_encodings into a fresh sim -> identical outputs. 1.0.0 and 2.0.0 entries
    make the fresh sim's per-channel weights per-block / LPBQ themselves; a 0.6.1 list of
    blocks loads into weights made per-block first. The files pass the schema (the reader
    validates) and hold the format's keys."""
    model, x, _ = net
    kind, sim, files = exported
    path = files[version].encodings
    fresh = QuantizationSimModel(model, x, quant_scheme="tf", default_param_bw=4)
    if version == "0.6.1":
        _set(fresh, kind)
    fresh.load_encodings(str(path))
    with torch.no_grad():
        assert torch.equal(fresh.model(x), sim.model(x))
    doc = json.loads(Path(path).read_text())
    if version == "1.0.0":
        entry = next(e for e in doc["param_encodings"] if e["name"] == "fc1.weight")
        assert entry["enc_type"] == ("LPBQ" if kind == "lpbq" else "PER_BLOCK")
        assert entry["block_size"] == 32
        if kind == "lpbq":
            assert (entry["bw"], entry["compressed_bw"], len(entry["scale"])) == (8, 4, 64)
            assert len(entry["per_block_int_scale"]) == 64 * 8
    if version == "2.0.0":
        entry = next(e for e in doc["encodings"] if e["name"] == "fc1.weight")
        assert (entry["axis"], entry["block_size"], entry["output_dtype"]) == (1, 32, "int4")
        key = "per_block_int_scale" if kind == "lpbq" else "y_scale"
        assert torch.tensor(entry[key]).shape == (64, 8)
        # a Conv2d weight's entry has aimet-torch's keys and nesting: (C, blocks, 1, 1)
        theirs = json.loads((AIMET / f"{kind}_encodings_v2.0.0.json").read_text())
        conv = [next(e for e in d["encodings"] if e["name"] == "conv.weight")
                for d in (doc, theirs)]
        assert set(conv[0]) == set(conv[1])
        for k in conv[1]:
            if isinstance(conv[1][k], list):
                assert torch.tensor(conv[0][k]).shape == torch.tensor(conv[1][k]).shape, k


def test_qdq_model_runs_blocked_dequantize_in_ort(exported):
    """The QDQ model holds blocked DequantizeLinear (opset 21, block_size) for the weights,
    ONNX Runtime 1.32's CPU provider runs it with default options, and it agrees with the sim
    within one output step (each weight exactly: 0 steps)."""
    import onnx

    kind, sim, files = exported
    path = files["1.0.0"].qdq_onnx
    model = onnx.load(str(path))
    assert max(i.version for i in model.opset_import if i.domain in ("", "ai.onnx")) >= 21
    blocked = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" and a.i == 32 for a in n.attribute)]
    assert len(blocked) == 3
    report = verify(sim, str(path), sim.dummy_input)
    assert_qdq_agrees(report)
    weights = [q for q in report.quantizers if ".param_quantizers.weight" in q.name]
    assert len(weights) == 3 and all(q.max_diff_lsb == 0 for q in weights), str(report)


@pytest.mark.parametrize("kind", ["blockwise", "lpbq"])
def test_aimet_torch_files_load(net, kind):
    """aimet-torch 2.42's 1.0.0 (PER_BLOCK / LPBQ) and 2.0.0 (nested y_scale, Conv's as
    (C, blocks, 1, 1); per_block_int_scale + per_channel_float_scale) files pass the schema,
    read as the same encodings, and load into a sim: its weights then equal those of a sim
    calibrated here."""
    model, x, _ = net
    v1 = enc_files.load(AIMET / f"{kind}_encodings.json")
    v2 = enc_files.load(AIMET / f"{kind}_encodings_v2.0.0.json")
    for name, enc in v2.param.items():
        if name.endswith(".weight"):
            flat = v1.param[name]
            assert torch.equal(flat.scale.reshape(-1), enc.scale.reshape(-1))
            assert flat.is_lpbq == enc.is_lpbq == (kind == "lpbq")
    sim = QuantizationSimModel(model, x, quant_scheme="tf", default_param_bw=4)
    loaded = load_encodings(sim, AIMET / f"{kind}_encodings_v2.0.0.json", strict=False)
    ref = _calibrated(model, x, kind)
    for name in ("conv", "fc1", "fc2"):
        assert f"{name}.param_quantizers.weight" in loaded
        assert getattr(sim.model, name).param_quantizers["weight"].encoding == \
            getattr(ref.model, name).param_quantizers["weight"].encoding


def test_per_block_entry_into_a_per_tensor_quantizer_is_refused(net, exported):
    """A per-tensor weight quantizer takes no per-block entry: strict load names the key and
    what to call first; the sim is unchanged."""
    model, x, _ = net
    _, _, files = exported
    doc = json.loads(Path(files["2.0.0"].encodings).read_text())
    sim = QuantizationSimModel(model, x, quant_scheme="tf", config_file="default")
    before = sim.model.fc1.param_quantizers["weight"].settings()
    with pytest.raises(EncodingsError, match=r"'conv.weight' -> conv.param_quantizers.weight: "
                                             r"a per-block encoding does not fit a per-tensor"):
        sim.load_encodings(doc)
    assert sim.model.fc1.param_quantizers["weight"].settings() == before


def test_uncalibrated_per_block_quantizer_refuses_to_run(net):
    """A sim whose weights were made per-block must be calibrated again before it runs."""
    model, x, _ = net
    sim = QuantizationSimModel(model, x, quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(x))
    set_blockwise_quantization_for_weights(sim, [nn.Linear], 4, True, 32)
    with pytest.raises(CalibrationError, match="fc1.param_quantizers.weight has no encoding"):
        sim.model(x)


def test_widened_blocked_pairs_keep_their_values(exported, tmp_path):
    """widen_4bit_pairs moves blocked int4 weight pairs into int8 containers clamped per block:
    ORT gives the same outputs as from the int4 model."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from quantsim.export.qdq import widen_4bit_pairs

    _, sim, files = exported
    model = onnx.load(str(files["1.0.0"].qdq_onnx))
    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    assert widen_4bit_pairs(wide) == 3
    feed = {model.graph.input[0].name: sim.dummy_input.numpy()}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    outs = [ort.InferenceSession(m.SerializeToString(), options,
                                 providers=["CPUExecutionProvider"]).run(None, feed)[0]
            for m in (model, wide)]
    np.testing.assert_array_equal(outs[0], outs[1])


def test_qat_state_and_fixed_ranges_per_block():
    """The QAT state's moving-average observer and config range constraints work per block
    (LPBQ included): encodings of the quantizer's (C, blocks) shape."""
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    for decompressed_bw in (None, 8):
        q = Quantizer(4, True, shape=(8, 2), axis=0, block_size=32,
                      decompressed_bw=decompressed_bw, scheme="tf")
        q.state = "qat"
        q(w)
        lo, hi = amin_amax(w, 0, 32)
        expected = Encoding.from_range(lo, hi, 4, True, axis=0, block_size=32,
                                       decompressed_bw=decompressed_bw)
        assert q.encoding == expected
        q.set_range_constraint(-1.0, 1.0)
        assert q.encoding.scale.shape == (8, 2)


def test_flat_block_list_that_is_no_lpbq_grid_is_refused(net, tmp_path):
    """A 0.6.1 list of per-block scales loads into an LPBQ weight only when the scales are an
    LPBQ grid; plain per-block scales are refused by name (strict)."""
    model, x, _ = net
    plain = _calibrated(model, x, "blockwise")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = plain.export(str(tmp_path), "plain", x, encoding_version="0.6.1")
    sim = QuantizationSimModel(model, x, quant_scheme="tf", default_param_bw=4)
    _set(sim, "lpbq")
    with pytest.raises(EncodingsError, match="not an LPBQ grid of decompressed_bw 8"):
        sim.load_encodings(str(files.encodings))
