"""prepare_model -> QuantizationSimModel: every functional op becomes a quantized op."""
from __future__ import annotations

import warnings

import torch
from torch import nn

import quantsim.nn as qnn
from models import ResidualNet, randomize_batch_norms
from quantsim import QuantizationSimModel
from quantsim.prepare import prepare_model
from quantsim.wrappers import unwrap_class
from test_prepare import SdpaNet, TransformerBlock


def _count_quantized(sim, classes):
    """Quantized modules of the given float classes whose output quantizer is enabled."""
    counts = {c: 0 for c in classes}
    for _, module in sim.named_qmodules():
        cls = unwrap_class(module)
        if cls in counts and module.output_quantizers and module.output_quantizers[0].enabled:
            counts[cls] += 1
    return counts


def test_prepared_transformer_block_quantizes_every_matmul_add_softmax():
    """After prepare, the sim quantizes all 4 matmuls, 2 softmaxes, 2 adds and the concat,
    warns about no functional op, and stays close to float at 16 bits."""
    torch.manual_seed(0)
    block = TransformerBlock().eval()
    x = torch.randn(4, 5, 16)
    prepared = prepare_model(block)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 'functional ops are not simulated' warning
        sim = QuantizationSimModel(prepared, x, quant_scheme="tf", default_output_bw=16,
                                   default_param_bw=16)
    counts = _count_quantized(sim, [qnn.MatMul, nn.Softmax, qnn.Add, qnn.Concat])
    assert counts == {qnn.MatMul: 4, nn.Softmax: 2, qnn.Add: 2, qnn.Concat: 1}
    sim.compute_encodings(lambda m, _: m(x), None)
    with torch.no_grad():
        torch.testing.assert_close(sim.model(x), block(x), rtol=0, atol=5e-3)


def test_prepared_residual_net_quantizes_every_add():
    """Each residual `+` becomes an Add module whose output is quantized (Add+Relu supergroup
    leaves the quantizer on the ReLU after it)."""
    model = randomize_batch_norms(ResidualNet()).eval()
    x = torch.randn(2, 3, 32, 32)
    sim = QuantizationSimModel(prepare_model(model), x, quant_scheme="tf")
    adds = [m for _, m in sim.named_qmodules() if unwrap_class(m) is qnn.Add]
    assert len(adds) == 3
    assert not sim.placement.unquantized_arrivals
    for add in adds:
        fused_into_relu = not add.output_quantizers[0].enabled
        assert fused_into_relu, "Add -> ReLU is a supergroup in the default config"


def test_prepared_attention_keeps_the_additive_mask_float():
    """The decomposed SDPA's mask_add (an AttentionMaskAdd) has no quantizer on the mask (it
    arrives from a functional op, which otherwise gets one) nor on its output: a grid cannot
    hold -inf (one calibrated on 0/-inf is [0, 0], which unmasked the padding) and a large
    negative mask stretches any grid it enters. The add then acts as the select a runtime
    applies: padded keys get softmax weight 0, so with padding the 8-bit sim's error stays
    that of the same model without padding, in output steps (one step per rounding, a few
    roundings chained: measured 1.4-2.8; with the mask's or the sum's grid, 17-36)."""
    torch.manual_seed(0)
    net = SdpaNet().eval()
    x = torch.randn(4, 6, 8)
    mask = torch.zeros(4, 1, 1, 6)
    mask[0, ..., 4:] = float("-inf")  # padding, as bool masks become
    mask[2, ..., 3:] = torch.finfo(torch.float32).min  # transformers' large negative variant
    sim = QuantizationSimModel(prepare_model(net, dummy_input=(x, mask)), (x, mask),
                               quant_scheme="tf")
    add = sim.model.mask_add
    assert unwrap_class(add) is qnn.AttentionMaskAdd
    assert not add.input_quantizers[1].enabled and not add.output_quantizers[0].enabled
    assert add.input_quantizers[0].enabled is False  # the scale Mul quantizes the scores
    assert ("mask_add", 1) not in sim.placement.unquantized_arrivals
    sim.compute_encodings(lambda m, _: m(x, mask), None)
    seen = {}
    handle = sim.model.softmax.register_forward_hook(lambda m, i, o: seen.update(p=o))
    with torch.no_grad():
        got, want = sim.model(x, mask), net(x, mask)
    handle.remove()
    masked = (mask != 0).expand_as(seen["p"])
    assert (seen["p"][masked] == 0).all()
    step = float(sim.model.av_matmul.output_quantizers[0].get_scale())
    assert (got - want).abs().max() <= 4 * step
