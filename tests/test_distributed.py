"""torch.distributed: calibration merges statistics across ranks; DDP fine-tuning works."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from models import DigitsCNN, digits_data
from quantsim import QuantizationSimModel

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_sim(scheme):
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    x = digits_data()[0]
    return QuantizationSimModel(model, x[:4], quant_scheme=scheme), x


def _encodings(sim):
    return {n: (q.get_scale().clone(), q.get_offset().clone())
            for n, q in sim.named_quantizers() if q.enabled and q.is_initialized}


def _worker(rank, world, port, scheme, out_dir):
    os.environ["QUANTSIM_KERNEL"] = "eager"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        sim, x = _make_sim(scheme)
        batch = x[rank * 128:(rank + 1) * 128]
        sim.compute_encodings(lambda m, _: m(batch), None)
        torch.save(_encodings(sim), os.path.join(out_dir, f"calib{rank}.pt"))
        # DDP fine-tuning: 3 steps, different data per rank
        sim.model.train()
        ddp = nn.parallel.DistributedDataParallel(sim.model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        y = digits_data()[1]
        torch.manual_seed(rank)
        for _ in range(3):
            idx = torch.randint(0, len(x), (32,))
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x[idx]), y[idx]).backward()
            opt.step()
        torch.save({k: v.detach().clone() for k, v in sim.model.named_parameters()},
                   os.path.join(out_dir, f"ddp{rank}.pt"))
        del opt, ddp  # DDP's reducer holds the group: drop it before the group goes
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Both ranks are done and their results saved. About 1 run in 8, the interpreter's exit
    # then aborts in torch's C++ teardown ("terminate called without an active exception",
    # SIGABRT, after this function returned: measured with a print here). Leave without that
    # teardown; errors above still propagate to mp.spawn.
    os._exit(0)


@pytest.mark.parametrize("scheme,rtol", [("tf", 1e-6), ("tf_enhanced", 0.05)])
def test_two_rank_calibration_and_ddp(scheme, rtol, tmp_path):
    """Both ranks get identical encodings equal to one process that saw both ranks' batches
    (exactly for tf; histogram schemes within rtol because re-binning differs); after 3 DDP
    steps both ranks hold identical parameters (BatchNorm buffers are per rank, as in DDP)."""
    mp.spawn(_worker, args=(2, _free_port(), scheme, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "calib0.pt")
    r1 = torch.load(tmp_path / "calib1.pt")
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k][0], r1[k][0]) and torch.equal(r0[k][1], r1[k][1]), k

    sim, x = _make_sim(scheme)
    sim.compute_encodings(lambda m, _: (m(x[:128]), m(x[128:256])), None)
    single = _encodings(sim)
    for k, (scale, offset) in single.items():
        torch.testing.assert_close(r0[k][0], scale, rtol=rtol, atol=0, msg=k)

    d0 = torch.load(tmp_path / "ddp0.pt")
    d1 = torch.load(tmp_path / "ddp1.pt")
    assert d0.keys() == d1.keys() and d0
    for k in d0:
        assert torch.equal(d0[k], d1[k]), k
