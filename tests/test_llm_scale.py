"""The Llama-shaped decoder (tests/llm_model.py, its ``tiny`` size) through the sim (issue 18):
a 2-rank gloo calibration with per-block and LPBQ weights gives one process's encodings;
W8A16 per-channel, W4A16 per-block and LPBQ sims export and agree with ONNX Runtime; on CUDA
the same sims calibrate to the CPU's weight encodings; a sim over a model above the cache's
model limit holds one float copy of each weight plus its integer codes (int8: a quarter of its
bytes). ``benchmarks/llm.py`` measures the 50M-parameter
size.
"""
from __future__ import annotations

import os
import warnings
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import DEVICES
from llm_model import build_decoder, random_tokens
from quantsim import QuantizationSimModel, wrappers
from quantsim.config_utils import (set_blockwise_quantization_for_weights,
                                   set_grouped_blockwise_quantization_for_weights)
from quantsim.wrappers import QuantizationMixin, model_cache_limit, set_param_cache_limit
from test_distributed import _free_port

#: the tiny decoder's Linear layers have 64 or 128 inputs
BLOCK = 32
SETTINGS = ("w8a16", "w4a16", "lpbq")


def _sim(model: nn.Module, tokens: torch.Tensor, setting: str,
         in_place: bool = False) -> QuantizationSimModel:
    """int16 activations, int8 per-channel weights; every Linear int4 per block / LPBQ."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notice about the blocks' functional ops
        sim = QuantizationSimModel(model, tokens, quant_scheme="tf", default_output_bw=16,
                                   default_param_bw=8, in_place=in_place)
    if setting == "w4a16":
        set_blockwise_quantization_for_weights(sim, [nn.Linear], 4, True, BLOCK)
    elif setting == "lpbq":
        set_grouped_blockwise_quantization_for_weights(sim, [nn.Linear], 4, True, 8, BLOCK)
    return sim


def _batches(n: int, device: str = "cpu"):
    cfg = build_decoder("tiny").cfg
    return [random_tokens(cfg, 2, 16, seed=1 + i, device=device) for i in range(n)]


def _encodings(sim: QuantizationSimModel):
    return {n: (q.get_scale().detach().cpu().clone(), q.get_offset().detach().cpu().clone())
            for n, q in sim.named_quantizers() if q.enabled and q.is_initialized}


# -- 2 ranks ---------------------------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["QUANTSIM_KERNEL"] = "eager"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        batches = _batches(4)[2 * rank:2 * rank + 2]
        for setting in ("w4a16", "lpbq"):
            sim = _sim(build_decoder("tiny"), batches[0], setting)
            sim.compute_encodings(lambda m, _: [m(b) for b in batches], None)
            torch.save(_encodings(sim), os.path.join(out_dir, f"{setting}{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Each setting's encodings from rank 0 and rank 1 (two batches each, gloo)."""
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return {(s, r): torch.load(out / f"{s}{r}.pt") for s in ("w4a16", "lpbq") for r in (0, 1)}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")
@pytest.mark.parametrize("setting", ["w4a16", "lpbq"])
def test_two_rank_calibration_gives_one_process_per_block_encodings(two_ranks, setting):
    """Both ranks hold exactly the encodings of one process that saw all four batches (tf:
    min / max merge exactly); the Linear weights are per block (out_features x in/32 scales)."""
    r0, r1 = two_ranks[setting, 0], two_ranks[setting, 1]
    batches = _batches(4)
    sim = _sim(build_decoder("tiny"), batches[0], setting)
    sim.compute_encodings(lambda m, _: [m(b) for b in batches], None)
    single = _encodings(sim)
    assert r0.keys() == r1.keys() == single.keys()
    for name, (scale, offset) in single.items():
        for rank in (r0, r1):
            assert torch.equal(rank[name][0], scale) and torch.equal(rank[name][1], offset), name
    q = sim.model.blocks[0].mlp.down_proj.param_quantizers["weight"]
    assert q.get_scale().shape == (64, 128 // BLOCK)
    assert (q.decompressed_bw == 8) == (setting == "lpbq")


# -- one process: simulate, export, ORT; CUDA ----------------------------------------------------
@pytest.fixture(scope="module", params=SETTINGS)
def calibrated(request):
    """(setting, float decoder, its calibrated sim, held-out tokens)."""
    model = build_decoder("tiny")
    batches = _batches(3)
    sim = _sim(model, batches[0], request.param)
    sim.compute_encodings(lambda m, _: [m(b) for b in batches], None)
    return request.param, model, sim, random_tokens(model.cfg, 2, 16, seed=99)


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()))


def test_decoder_simulates_close_to_float(calibrated):
    """The sim's logits differ from the float model's, by less with 8-bit weights than with
    4-bit ones (W8A16 per-channel > 30 dB SQNR on random tokens; per block > 15 dB); with tied
    embeddings the shared table is quantized by both of its modules, each its own way."""
    setting, model, sim, tokens = calibrated
    with torch.no_grad():
        ref, out = model(tokens), sim.model(tokens)
    assert not torch.equal(ref, out)
    assert _sqnr(ref, out) > (30 if setting == "w8a16" else 15)
    tied = build_decoder("tiny", tie_embeddings=True)
    tied_sim = _sim(tied, tokens, setting)
    tied_sim.compute_encodings(lambda m, _: m(tokens), None)
    assert tied_sim.model.lm_head.weight is tied_sim.model.embed.weight
    with torch.no_grad():
        assert _sqnr(tied(tokens), tied_sim.model(tokens)) > (30 if setting == "w8a16" else 15)


def test_decoder_exports_and_agrees_with_onnx_runtime(calibrated, tmp_path):
    """export -> QDQ ONNX (blocked DequantizeLinear for the per-block weights) -> ONNX Runtime:
    every quantizer fed the sim's inputs, and the outputs with every quantizer fed them,
    within one 16-bit step. Two dequantized values k steps apart differ by k steps +- a
    float32 rounding of each (2^-23 of the range: 2^(16 - 23) steps). Chained through the
    layers a one-step difference early is amplified by the later layers' gains, which the
    16-bit steps make visible (the report's chained figure); the default ORT session runs it."""
    from quantsim.export import verify

    setting, _, sim, tokens = calibrated
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = sim.export(str(tmp_path), "decoder", tokens)
    report = verify(sim, str(files.qdq_onnx), tokens)
    tol = 1 + 2.0 ** (16 - 22)
    assert report.default_error is None
    assert report.isolated_max_diff_lsb <= tol, str(report)
    assert report.quantizers and all(q.max_diff_lsb <= tol for q in report.quantizers), \
        str(report)
    if setting != "w8a16":  # blocked DequantizeLinear (opset 21) carries the int4 weights
        import onnx

        graph = onnx.load(str(files.qdq_onnx)).graph
        assert any(a.name == "block_size" and a.i == BLOCK for n in graph.node
                   if n.op_type == "DequantizeLinear" for a in n.attribute)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("setting", ["w4a16", "lpbq"])
def test_decoder_calibrates_on_device(device, setting):
    """On ``device`` the sim calibrates to the CPU's weight encodings exactly (the same IEEE
    operations on the same values) and runs its per-block weights there."""
    batches = _batches(2)
    cpu = _sim(build_decoder("tiny"), batches[0], setting)
    cpu.compute_encodings(lambda m, _: [m(b) for b in batches], None)
    on_device = [b.to(device) for b in batches]
    sim = _sim(build_decoder("tiny", device=device), on_device[0], setting)
    sim.compute_encodings(lambda m, _: [m(b) for b in on_device], None)
    expected, got = _encodings(cpu), _encodings(sim)
    weights = [n for n in expected if n.endswith("param_quantizers.weight")]
    assert weights and all(torch.equal(got[n][0], expected[n][0]) for n in weights)
    with torch.no_grad():
        out = sim.model(on_device[0])
    assert out.device.type == device and torch.isfinite(out).all()


# -- memory ---------------------------------------------------------------------------------------
def _cached(model: nn.Module):
    return {name for name, m in model.named_modules()
            if isinstance(m, QuantizationMixin) and m._qparam_cache}


def test_model_above_the_cache_limit_holds_one_float_copy_and_int8_codes_of_each_weight():
    """Under the default limits the tiny decoder (0.1M parameters) caches its fake-quantized
    weights, the embedding table included; with the model limit below its size an in-place
    sim keeps no float copy: its parameters are the float model's tensors, the other tensors
    it holds are the quantizers' encodings and each weight's integer codes (int8 for the int4
    and int8 grids: at most a quarter of the float32 weights' bytes), and the outputs are the
    same (the embedding then fake-quantizes the rows it looks up, not its table)."""
    assert model_cache_limit() == 1 << 25  # the documented default
    batches = _batches(2)
    model = build_decoder("tiny")
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sim = _sim(model, batches[0], "w4a16", in_place=True)
    sim.compute_encodings(lambda m, _: [m(b) for b in batches], None)
    with torch.no_grad():
        cached = sim.model(batches[0])
    assert "embed" in _cached(sim.model) and "blocks.0.mlp.up_proj" in _cached(sim.model)
    try:
        set_param_cache_limit(model_max_elements=sum(p.numel() for p in model.parameters()) - 1)
        with torch.no_grad():
            assert torch.equal(sim.model(batches[0]), cached)
        assert _cached(sim.model) == set()
        # weights above the row-slice size (patched down to the tiny model's): built and
        # multiplied by row slices; the dot products may be summed in another order, so a
        # logit may land one step of the 16-bit output grid away
        step = float(sim.model.lm_head.output_quantizers[0].scale)
        with mock.patch.object(wrappers, "_ROW_SLICE_ELEMENTS", 256), torch.no_grad():
            sliced = sim.model(batches[0])
        assert float((sliced - cached).abs().max()) <= step * 1.0001
        codes = {f"{name}.{p}": entry[1] for name, m in sim.model.named_modules()
                 if isinstance(m, QuantizationMixin) for p, entry in m._qcodes_cache.items()}
    finally:
        set_param_cache_limit()
    assert {p.untyped_storage().data_ptr() for p in sim.model.parameters()} == storages
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert "blocks.0.mlp.up_proj.weight" in codes and "embed.weight" not in codes
    assert {c.dtype for c in codes.values()} == {torch.int8}
    assert sum(c.numel() * c.element_size() for c in codes.values()) <= weight_bytes / 4
    quantizer_bytes = sum(t.numel() * t.element_size() for n, t in sim.model.state_dict().items()
                          if "_quantizers." in n)
    # per block of 32 int4 weights: a float32 scale and offset, min and max (4 / 32 of the
    # weight's bytes), plus the small per-tensor and per-channel quantizers
    assert quantizer_bytes < weight_bytes * (4 / 32 + 0.02)
