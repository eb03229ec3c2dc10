"""Tests for quantsim.nn: elementwise modules, quantizable attention, fused conv-BN modules."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import quantsim.nn as qnn
from models import randomize_batch_norms
from quantsim.errors import UnsupportedModelError
from quantsim.op_types import is_data_movement, onnx_types_of


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small tensors, one thread


# --- elementwise -------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 4), cols=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_binary_modules_are_the_operator(rows, cols, seed):
    """Each binary module returns exactly what its Python operator returns (with broadcast)."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(rows, cols, generator=g), torch.rand(1, cols, generator=g) + 0.5
    assert torch.equal(qnn.Add()(x, y), x + y)
    assert torch.equal(qnn.Sub()(x, y), x - y)
    assert torch.equal(qnn.Mul()(x, y), x * y)
    assert torch.equal(qnn.Div()(x, y), x / y)
    assert torch.equal(qnn.Div("floor")(x, y), x // y)
    assert torch.equal(qnn.Pow()(y, x), y ** x)
    assert torch.equal(qnn.MatMul()(x, y.T), x @ y.T)
    assert torch.equal(qnn.Add()(2.0, x), 2.0 + x)


def test_unary_reduce_and_concat_modules():
    """Exp/Sqrt/Mean/Sum/Concat reproduce their torch calls, arguments passed through."""
    x = torch.rand(2, 3, 4)
    assert torch.equal(qnn.Exp()(x), torch.exp(x))
    assert torch.equal(qnn.Sqrt()(x), torch.sqrt(x))
    assert torch.equal(qnn.Mean()(x, -1, keepdim=True), x.mean(-1, keepdim=True))
    assert torch.equal(qnn.Sum()(x, (0, 2)), x.sum((0, 2)))
    assert torch.equal(qnn.Concat(1)(x, x[:, :1]), torch.cat([x, x[:, :1]], 1))


def test_data_movement_modules_take_arguments_from_call_or_constructor():
    """Reshape/Permute/Transpose accept the shape both ways; missing ones are typed errors."""
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert torch.equal(qnn.Reshape()(x, 6, 4), x.reshape(6, 4))
    assert torch.equal(qnn.Reshape()(x, (6, -1)), x.reshape(6, 4))
    assert torch.equal(qnn.Reshape((4, 6))(x), x.reshape(4, 6))
    assert torch.equal(qnn.Permute()(x, 2, 0, 1), x.permute(2, 0, 1))
    assert torch.equal(qnn.Permute((1, 0, 2))(x), x.permute(1, 0, 2))
    assert torch.equal(qnn.Transpose(0, 2)(x), x.transpose(0, 2))
    assert torch.equal(qnn.Transpose()(x, 1, 2), x.transpose(1, 2))
    for module in (qnn.Reshape(), qnn.Permute(), qnn.Transpose()):
        with pytest.raises(UnsupportedModelError):
            module(x)
    with pytest.raises(UnsupportedModelError):
        qnn.Div("round")


def test_op_types_are_registered():
    """Importing quantsim.nn maps each module to its ONNX type; reshapes are data movement."""
    assert onnx_types_of(qnn.Add()) == ("Add",)
    assert onnx_types_of(qnn.MatMul()) == ("MatMul",)
    assert onnx_types_of(qnn.Concat()) == ("Concat",)
    assert onnx_types_of(qnn.Permute()) == ("Transpose",)
    assert is_data_movement(qnn.Reshape()) and not is_data_movement(qnn.Add())
    assert onnx_types_of(qnn.ConvBn(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))) == ("Conv",)
    assert onnx_types_of(qnn.LinearBn(nn.Linear(2, 2), nn.BatchNorm1d(2))) == ("Gemm", "MatMul")


# --- attention ---------------------------------------------------------------------------

def _pair(seed=0, **kwargs):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(**{"embed_dim": 8, "num_heads": 2, **kwargs}).eval()
    for p in mha.parameters():  # non-zero biases, bias_k/v
        nn.init.normal_(p, std=0.3)
    return mha, qnn.QuantizableMultiheadAttention.from_float(mha)


def _close(a, b):
    if a is None or b is None:
        assert a is None and b is None
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [
    {}, {"batch_first": True}, {"bias": False}, {"kdim": 5, "vdim": 3},
    {"add_bias_kv": True}, {"add_zero_attn": True},
    {"add_bias_kv": True, "add_zero_attn": True, "batch_first": True},
])
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
def test_mha_matches_torch_without_masks(kwargs, need_weights, average):
    """Outputs and attention weights equal nn.MultiheadAttention's for every option."""
    mha, qmha = _pair(**kwargs)
    n, length, source = 3, 4, 5
    first = kwargs.get("batch_first", False)
    shape = (lambda s, e: (n, s, e)) if first else (lambda s, e: (s, n, e))
    q = torch.randn(shape(length, 8))
    k = torch.randn(shape(source, kwargs.get("kdim", 8)))
    v = torch.randn(shape(source, kwargs.get("vdim", 8)))
    with torch.no_grad():
        ref = mha(q, k, v, need_weights=need_weights, average_attn_weights=average)
        got = qmha(q, k, v, need_weights=need_weights, average_attn_weights=average)
    _close(got[0], ref[0])
    _close(got[1], ref[1])


@pytest.mark.parametrize("mask_kind", ["bool2d", "float2d", "float3d", "padding", "both",
                                       "float_padding"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_matches_torch_with_masks(mask_kind, batch_first):
    """Attention and key-padding masks (bool and additive) give the same result."""
    mha, qmha = _pair(batch_first=batch_first, add_bias_kv=mask_kind == "both")
    n, length = 2, 5
    x = torch.randn((n, length, 8) if batch_first else (length, n, 8))
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    pad = torch.zeros(n, length, dtype=torch.bool)
    pad[0, -2:] = True
    kwargs = {
        "bool2d": {"attn_mask": causal},
        "float2d": {"attn_mask": torch.randn(length, length)},
        "float3d": {"attn_mask": torch.randn(n * 2, length, length)},
        "padding": {"key_padding_mask": pad},
        "both": {"attn_mask": causal, "key_padding_mask": pad},
        "float_padding": {"key_padding_mask": pad.float() * -1e4,
                          "attn_mask": torch.randn(length, length)},
    }[mask_kind]
    with torch.no_grad():
        for need in (True, False):
            ref = mha(x, x, x, need_weights=need, **kwargs)
            got = qmha(x, x, x, need_weights=need, **kwargs)
            _close(got[0], ref[0])
            _close(got[1], ref[1])


def test_mha_unbatched_and_causal_hint():
    """Unbatched inputs work; is_causal with its mask matches; alone it builds the mask."""
    mha, qmha = _pair()
    x = torch.randn(4, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    with torch.no_grad():
        _close(qmha(x, x, x)[0], mha(x, x, x)[0])
        ref = mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
        _close(qmha(x, x, x, attn_mask=causal, is_causal=True)[0], ref)
        _close(qmha(x, x, x, is_causal=True)[0], ref)


def test_mha_structure_training_and_gradients():
    """The ops are modules; from_float keeps the mode; dropout acts only in training."""
    mha, qmha = _pair(dropout=0.5)
    names = {n for n, _ in qmha.named_children()}
    assert {"q_proj", "k_proj", "v_proj", "out_proj", "qk_matmul", "av_matmul", "softmax",
            "mask_add", "scale"} <= names
    assert isinstance(qmha.qk_matmul, qnn.MatMul) and isinstance(qmha.softmax, nn.Softmax)
    assert not qmha.training
    x = torch.randn(5, 2, 8, requires_grad=True)
    qmha.train()
    out = qmha(x, x, x)[0]
    out.sum().backward()
    assert x.grad is not None and qmha.q_proj.weight.grad is not None
    bias = qmha.in_proj_bias
    assert torch.equal(bias, mha.in_proj_bias.detach()) and qmha.in_proj_weight is None


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_replace_in_transformer_encoder_layer_fast_path():
    """After replacement an eval/no-grad TransformerEncoderLayer calls our module (its fused
    fast path is off) and the output is unchanged; nested-tensor encoders too."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True).eval()
    encoder = nn.TransformerEncoder(copy.deepcopy(layer), 2, enable_nested_tensor=True).eval()
    assert encoder.use_nested_tensor
    x = torch.randn(3, 5, 8)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1, -2:] = True
    with torch.no_grad():
        ref_layer = layer(x, src_key_padding_mask=pad)
        ref_encoder = encoder(x, src_key_padding_mask=pad)
    new_layer = qnn.replace_multihead_attention(copy.deepcopy(layer))
    new_encoder = qnn.replace_multihead_attention(copy.deepcopy(encoder))
    assert isinstance(new_layer.self_attn, qnn.QuantizableMultiheadAttention)
    assert not new_encoder.use_nested_tensor
    calls = _count_calls(new_layer.self_attn)
    with torch.no_grad():
        got_layer = new_layer(x, src_key_padding_mask=pad)
        got_encoder = new_encoder(x, src_key_padding_mask=pad)
    assert calls == [1]
    keep = ~pad  # the fused path writes zeros at padded positions
    _close(got_layer[keep], ref_layer[keep])
    _close(got_encoder[keep], ref_encoder[keep])


def test_replace_in_transformer_decoder_layer():
    """Both attention modules of a decoder layer are replaced; output unchanged with masks."""
    torch.manual_seed(1)
    layer = nn.TransformerDecoderLayer(8, 2, dim_feedforward=16).eval()
    tgt, memory = torch.randn(4, 2, 8), torch.randn(6, 2, 8)
    mask = nn.Transformer.generate_square_subsequent_mask(4)
    with torch.no_grad():
        ref = layer(tgt, memory, tgt_mask=mask, tgt_is_causal=True)
    new = qnn.replace_multihead_attention(copy.deepcopy(layer))
    self_calls, cross_calls = _count_calls(new.self_attn), _count_calls(new.multihead_attn)
    with torch.no_grad():
        got = new(tgt, memory, tgt_mask=mask, tgt_is_causal=True)
    assert isinstance(new.multihead_attn, qnn.QuantizableMultiheadAttention)
    assert self_calls == [1] and cross_calls == [1]
    _close(got, ref)


def test_replace_bare_module_returns_converted():
    """A bare nn.MultiheadAttention comes back converted."""
    mha, _ = _pair()
    assert isinstance(qnn.replace_multihead_attention(mha), qnn.QuantizableMultiheadAttention)


# --- fused conv-bn -----------------------------------------------------------------------

@pytest.mark.parametrize("layer,bn,shape", [
    (nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), (2, 3, 6, 6)),
    (nn.Conv1d(3, 4, 3, groups=1), nn.BatchNorm1d(4), (2, 3, 7)),
    (nn.ConvTranspose2d(3, 4, 2, stride=2), nn.BatchNorm2d(4), (2, 3, 4, 4)),
    (nn.Linear(5, 4), nn.BatchNorm1d(4), (6, 5)),
])
def test_fused_module_trains_bn_statistics_and_folds(layer, bn, shape):
    """Train mode: same output and same running-stat updates as layer -> bn; eval mode and
    .fold() give the folded layer's numbers."""
    torch.manual_seed(0)
    bn = randomize_batch_norms(bn)
    ref_layer, ref_bn = copy.deepcopy(layer), copy.deepcopy(bn)
    fused = qnn.fuse_conv_bn(layer, bn, nn.ReLU()).train()
    x = torch.randn(*shape)
    for _ in range(3):
        got = fused(x)
        ref = torch.relu(ref_bn.train()(ref_layer(x)))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    fused.eval()
    ref = torch.relu(ref_bn.eval()(ref_layer(x)))
    torch.testing.assert_close(fused(x), ref, rtol=1e-5, atol=1e-5)
    folded = fused.fold()
    assert isinstance(folded, nn.Sequential) and type(folded[0]) is type(layer)
    torch.testing.assert_close(folded(x), ref, rtol=1e-5, atol=1e-5)


def test_fused_module_gradients_and_weight_hook():
    """Gradients reach the layer and the BN affine parameters; weight_fake_quant sees the
    folded weight."""
    conv, bn = nn.Conv2d(2, 3, 1), randomize_batch_norms(nn.BatchNorm2d(3))
    fused = qnn.ConvBn(conv, bn)
    seen = []
    fused.weight_fake_quant = lambda w: seen.append(w) or w
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(-1, 1, 1, 1)
    expected = (conv.weight * scale).detach()  # before the step updates running_var
    fused(torch.randn(4, 2, 3, 3)).square().sum().backward()
    torch.testing.assert_close(seen[0], expected)
    assert conv.weight.grad is not None and bn.weight.grad is not None


def test_fuse_refuses_unfoldable_pairs():
    """Grouped transposed convs, BN without running stats and mismatched channels raise."""
    with pytest.raises(UnsupportedModelError, match="grouped"):
        qnn.fuse_conv_bn(nn.ConvTranspose2d(4, 4, 2, groups=2), nn.BatchNorm2d(4))
    with pytest.raises(UnsupportedModelError, match="track_running_stats"):
        qnn.fuse_conv_bn(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(UnsupportedModelError, match="output channels"):
        qnn.fuse_conv_bn(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(5))
    with pytest.raises(UnsupportedModelError):
        qnn.fuse_conv_bn(nn.ReLU(), nn.BatchNorm2d(5))
