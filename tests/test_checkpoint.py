"""save_checkpoint / load_checkpoint: equal sims, safe loading, clear errors."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from models import DictInputNet, DigitsCNN, SharedBlockNet, digits_data
from quantsim import CheckpointError, KeywordInputs, QuantizationSimModel
from quantsim.checkpoint import load_checkpoint, load_optimizer_state, save_checkpoint
from quantsim.graph import run_forward

HERE = os.path.dirname(os.path.abspath(__file__))


def _sim(scheme="range_learning_tf", seed=0):
    torch.manual_seed(seed)
    x = digits_data()[0][:64]
    sim = QuantizationSimModel(DigitsCNN(), x[:4], quant_scheme=scheme, default_param_bw=4)
    sim.compute_encodings(lambda m, _: m(x), None)
    return sim, x


def _train_steps(sim, opt, x, y, steps, seed=None):
    """SGD steps on random batches; ``seed=None`` continues the current RNG stream."""
    if seed is not None:
        torch.manual_seed(seed)
    losses = []
    sim.model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(sim.model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_round_trip_equal_outputs_and_settings(tmp_path):
    """A loaded sim has the same weights, encodings, learnable ranges and flags: same output."""
    sim, x = _sim()
    sim.model.fc.output_quantizers[0].enabled = False
    sim.model.relu1.output_quantizers[0].averaging_constant = 0.2
    path = tmp_path / "ckpt.qsim"
    save_checkpoint(sim, path)
    loaded = load_checkpoint(path, model=DigitsCNN())
    assert dict(loaded.named_quantizers()).keys() == dict(sim.named_quantizers()).keys()
    for (name, a), (_, b) in zip(sim.named_quantizers(), loaded.named_quantizers()):
        assert a.enabled == b.enabled and a.learnable == b.learnable, name
        assert a.averaging_constant == b.averaging_constant, name
        if a.enabled and a.is_initialized:
            assert a.encoding == b.encoding, name
    with torch.no_grad():
        assert torch.equal(sim.model.eval()(x), loaded.model.eval()(x))
    assert any("quantizer" in n for n, _ in loaded.model.named_parameters())


def test_resume_equals_uninterrupted_run(tmp_path):
    """Train 6 steps in one go == 3 steps, checkpoint, load in a new sim, 3 more steps."""
    x_train, y_train = digits_data()[:2]
    sim, _ = _sim()
    opt = torch.optim.SGD(sim.model.parameters(), lr=0.05, momentum=0.9)
    full = _train_steps(sim, opt, x_train, y_train, 6, seed=1)

    sim2, _ = _sim()
    opt2 = torch.optim.SGD(sim2.model.parameters(), lr=0.05, momentum=0.9)
    first = _train_steps(sim2, opt2, x_train, y_train, 3, seed=1)
    rng = torch.get_rng_state()
    save_checkpoint(sim2, tmp_path / "mid.qsim", optimizer=opt2)
    resumed = load_checkpoint(tmp_path / "mid.qsim", model=DigitsCNN())
    opt3 = torch.optim.SGD(resumed.model.parameters(), lr=0.05, momentum=0.9)
    load_optimizer_state(tmp_path / "mid.qsim", opt3)
    torch.set_rng_state(rng)
    second = _train_steps(resumed, opt3, x_train, y_train, 3)
    assert first + second == full


def test_resume_in_fresh_process(tmp_path):
    """A checkpoint written here loads in another Python process and gives the same output."""
    sim, x = _sim(scheme="tf")
    save_checkpoint(sim, tmp_path / "c.qsim")
    with torch.no_grad():
        torch.save(sim.model.eval()(x), tmp_path / "expected.pt")
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {HERE!r})
        from models import DigitsCNN
        from quantsim.checkpoint import load_checkpoint
        sim = load_checkpoint({str(tmp_path / 'c.qsim')!r}, model=DigitsCNN())
        x = torch.load({str(tmp_path / 'x.pt')!r})
        with torch.no_grad():
            out = sim.model.eval()(x)
        assert torch.equal(out, torch.load({str(tmp_path / 'expected.pt')!r}))
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "QUANTSIM_KERNEL": "eager"}, timeout=120)
    assert result.stdout.strip().endswith("ok"), result.stderr


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_crafted_pickle_does_not_execute(tmp_path):
    """A checkpoint whose pickle would create a file is refused and creates nothing."""
    target = tmp_path / "pwned"
    evil = _Evil()
    evil.target = target
    path = tmp_path / "evil.qsim"
    torch.save({"format": "quantsim-checkpoint", "payload": evil}, path)
    with pytest.raises(CheckpointError, match="not a readable quantsim checkpoint"):
        load_checkpoint(path, model=DigitsCNN())
    assert not target.exists()
    with open(tmp_path / "raw.pkl", "wb") as f:
        pickle.dump(evil, f)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "raw.pkl", model=DigitsCNN())
    assert not target.exists()


def test_bad_files_and_architectures(tmp_path):
    """Truncated, foreign, missing files and another architecture give clear errors."""
    sim, _ = _sim(scheme="tf")
    path = tmp_path / "c.qsim"
    save_checkpoint(sim, path)
    data = path.read_bytes()
    (tmp_path / "trunc.qsim").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "trunc.qsim", model=DigitsCNN())
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="marker"):
        load_checkpoint(tmp_path / "foreign.pt", model=DigitsCNN())
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.qsim", model=DigitsCNN())
    with pytest.raises(CheckpointError, match="model="):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="extra"):
        load_checkpoint(path, model=_Wider())


class _Wider(DigitsCNN):
    """DigitsCNN with a wider conv2 (its state_dict differs) and one more module."""

    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.extra = nn.ReLU()

    def forward(self, x):
        return self.extra(super().forward(x))


class _Slim(DigitsCNN):
    """DigitsCNN with one more parameterless module: same state_dict, one more quantizer."""

    def __init__(self):
        super().__init__()
        self.extra = nn.ReLU()

    def forward(self, x):
        return self.extra(super().forward(x))


def _fingerprint(model: nn.Module):
    """Every module's class and a copy of the state_dict."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


def _assert_unchanged(model: nn.Module, fingerprint) -> None:
    classes, state = fingerprint
    assert [(n, type(m)) for n, m in model.named_modules()] == classes
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state), "weights were loaded"


def _tamper(path, change) -> None:
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


@pytest.mark.parametrize("case", ["other architecture", "parameterless module added",
                                  "state_dict does not fit", "setting not allowed"])
def test_failed_load_leaves_the_model_unchanged(case, tmp_path):
    """load_checkpoint(path, model=m) that fails leaves m as it was: same module classes (no
    quantized wrappers), same weights (none of the matching tensors loaded)."""
    sim, _ = _sim(scheme="tf")
    path = tmp_path / "c.qsim"
    save_checkpoint(sim, path)
    if case == "state_dict does not fit":  # every tensor fits but the last one
        _tamper(path, lambda p: p["state_dict"].update({"fc.bias": torch.zeros(3)}))
    if case == "setting not allowed":  # the last quantizer's: the others were applied first
        last = list(sim.named_quantizers())[-1][0]
        _tamper(path, lambda p: p["quantizers"][last].update(rounding="sideways"))
    torch.manual_seed(1)
    model = {"other architecture": _Wider, "parameterless module added": _Slim}.get(
        case, DigitsCNN)()
    before = _fingerprint(model)
    with pytest.raises(CheckpointError):
        load_checkpoint(path, model=model)
    _assert_unchanged(model, before)


def test_loaded_sim_wraps_a_copy(tmp_path):
    """A successful load leaves the model passed in untouched too: the sim wraps a copy."""
    sim, x = _sim(scheme="tf")
    save_checkpoint(sim, tmp_path / "c.qsim")
    model = DigitsCNN()
    before = _fingerprint(model)
    loaded = load_checkpoint(tmp_path / "c.qsim", model=model)
    _assert_unchanged(model, before)
    assert loaded.model is not model
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(x), sim.model.eval()(x))


def _same_sims(a, b, x) -> None:
    """Same quantizer names, settings and encodings, and bit-identical outputs on ``x``."""
    assert [n for n, _ in a.named_quantizers()] == [n for n, _ in b.named_quantizers()]
    for (name, qa), (_, qb) in zip(a.named_quantizers(), b.named_quantizers()):
        assert qa.enabled == qb.enabled, name
        if qa.enabled and qa.is_initialized:
            assert qa.encoding == qb.encoding, name
    with torch.no_grad():
        assert torch.equal(run_forward(a.model.eval(), x), run_forward(b.model.eval(), x))


def test_shared_module_round_trip(tmp_path):
    """A module reachable as self.block and self.body[0] (one set of quantizers, under
    'block'): the checkpoint holds both state_dict paths and loads back into a fresh model."""
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    sim = QuantizationSimModel(SharedBlockNet(), x[:4], quant_scheme="range_learning_tf")
    sim.compute_encodings(lambda m, _: m(x), None)
    state = sim.model.state_dict()
    assert torch.equal(state["block.weight"], state["body.0.weight"])
    save_checkpoint(sim, tmp_path / "shared.qsim")
    loaded = load_checkpoint(tmp_path / "shared.qsim", model=SharedBlockNet())
    assert loaded.model.block is loaded.model.body[0]
    _same_sims(sim, loaded, x)


class _ImageMask(nn.Module):
    """DictInputNet called with keywords: forward(image, mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = DictInputNet()

    def forward(self, image, mask):
        return self.net({"image": image, "mask": mask})


class _PassOn(nn.Module):
    """forward(*args, **kwargs): a plain dict is ambiguous for it, KeywordInputs decides."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _ImageMask()

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("keywords", [False, True], ids=["dict", "KeywordInputs"])
def test_dict_dummy_input_round_trip(keywords, tmp_path):
    """A dict dummy_input comes back with its reading: a plain dict read as the one argument
    of forward(self, inputs) stays a dict; a KeywordInputs, which a forward(*args, **kwargs)
    needs, stays one (weights_only loading takes no class: it is saved as a dict and a flag,
    without which rebuilding the sim would refuse the ambiguous dict)."""
    torch.manual_seed(0)
    d = {"image": torch.randn(4, 3, 8, 8), "mask": torch.ones(4, 8, 8, 8)}
    make, dummy = (_PassOn, KeywordInputs(d)) if keywords else (DictInputNet, d)
    sim = QuantizationSimModel(make(), dummy, quant_scheme="tf")
    sim.compute_encodings(lambda m, _: run_forward(m, dummy), None)
    save_checkpoint(sim, tmp_path / "dict.qsim")
    loaded = load_checkpoint(tmp_path / "dict.qsim", model=make())
    assert type(loaded.dummy_input) is type(dummy)
    _same_sims(sim, loaded, dummy)
