"""Progress bars (quantsim.progress): silent off a terminal and with QUANTSIM_PROGRESS=0, drawn
with QUANTSIM_PROGRESS=1 on compute_encodings (forward passes, with the batch total when it is
known), the encodings computed at the end (tf_enhanced) and export."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import sys

import pytest
import torch
from torch import nn

from quantsim import QuantizationSimModel, progress

pytestmark = pytest.mark.usefixtures("one_thread")


class Terminal(io.StringIO):
    """A stderr that says it is a terminal (what a shell gives an interactive run)."""

    def isatty(self) -> bool:
        return True


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()


BATCHES = [torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(5)]


def run_batches(model: nn.Module, batches) -> None:
    for x in batches:
        model(x)


def calibrate(stream: io.StringIO, scheme: str = "tf_enhanced", args=BATCHES, callback=run_batches
              ) -> QuantizationSimModel:
    sim = QuantizationSimModel(small_model(), BATCHES[0][:1], quant_scheme=scheme)
    with contextlib.redirect_stderr(stream):
        sim.compute_encodings(callback, args)
    return sim


# ----------------------------------------------------------------------------------------------
# when bars are drawn
# ----------------------------------------------------------------------------------------------
def test_silent_off_a_terminal(monkeypatch):
    """pytest's captured stderr, a pipe, a CI log: no bar, no output, no hook."""
    monkeypatch.delenv("QUANTSIM_PROGRESS", raising=False)
    stream = io.StringIO()
    hooks = []
    calibrate(stream, callback=lambda m, b: (hooks.append(len(m._forward_pre_hooks)),
                                             run_batches(m, b)))
    assert stream.getvalue() == "" and hooks == [0]
    with contextlib.redirect_stderr(stream):
        assert not progress.progress_enabled()
        assert isinstance(progress.progress(range(3), desc="x"), progress._Silent)


@pytest.mark.parametrize("value", ["0", "off", "false", "no"])
def test_quantsim_progress_0_silences_a_terminal(monkeypatch, value):
    monkeypatch.setenv("QUANTSIM_PROGRESS", value)
    stream = Terminal()
    calibrate(stream)
    assert stream.getvalue() == ""


def test_a_terminal_draws_only_what_lasts_longer_than_the_delay(monkeypatch):
    """On a terminal bars are on, but a calibration this short (well under DELAY_S = 1 s of
    tqdm's delay) draws nothing."""
    monkeypatch.delenv("QUANTSIM_PROGRESS", raising=False)
    stream = Terminal()
    with contextlib.redirect_stderr(stream):
        assert progress.progress_enabled()
        bar = progress.progress(range(3), desc="quick")
        assert list(bar) == [0, 1, 2]
    assert stream.getvalue() == ""


@pytest.mark.parametrize("value", ["1", "on", "true", "yes"])
def test_quantsim_progress_1_draws_calibration_bars(monkeypatch, value):
    """Forced on (even off a terminal) and drawn at once: the forward passes against the
    batch list's length, then the quantizers whose encodings are computed."""
    monkeypatch.setenv("QUANTSIM_PROGRESS", value)
    stream = io.StringIO()
    sim = calibrate(stream)
    text = stream.getvalue().replace("\r", "\n")
    assert "compute_encodings:" in text and "/5 [" in text and "batch" in text
    observing = sum(1 for q in sim.quantizers() if q.enabled and q.role.name != "PARAM")
    # tqdm redraws at most every 0.1 s, so which counts show depends on speed; the total does not
    assert "computing encodings:" in text and f"/{observing} [" in text


def test_unknown_total_counts_forward_passes(monkeypatch):
    """A callback whose argument says nothing about its length (a count here): a spinner with
    the number of forward passes."""
    monkeypatch.setenv("QUANTSIM_PROGRESS", "1")
    stream = io.StringIO()
    calibrate(stream, args=7, callback=lambda m, n: [m(BATCHES[0]) for _ in range(n)])
    lines = [line for line in stream.getvalue().replace("\r", "\n").splitlines()
             if line.startswith("compute_encodings:")]
    assert lines and all(re.match(r"compute_encodings: \d+batch \[", line) for line in lines)


def test_a_total_that_the_passes_outgrow_is_dropped(monkeypatch):
    monkeypatch.setenv("QUANTSIM_PROGRESS", "1")
    stream = io.StringIO()
    model = small_model()
    with contextlib.redirect_stderr(stream), torch.no_grad():
        with progress.forward_passes(model, "passes", total=2) as bar:
            run_batches(model, BATCHES)
    assert not model._forward_pre_hooks  # removed on exit
    assert (bar.n, bar.total) == (5, None)
    assert "passes:   0%|          | 0/2 [" in stream.getvalue()


@pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:DeprecationWarning")
def test_export_shows_its_steps(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTSIM_PROGRESS", "1")
    sim = calibrate(io.StringIO(), scheme="tf")
    stream = io.StringIO()
    with contextlib.redirect_stderr(stream):
        # the TorchScript mode runs the same 4 steps without paying for the ONNX exporter
        sim.export(str(tmp_path), "tiny", BATCHES[0][:1], export_to_torchscript=True)
    text = stream.getvalue().replace("\r", "\n")
    assert "export tiny:" in text and "/4 [" in text


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def test_batch_total():
    data = torch.utils.data.TensorDataset(torch.zeros(10, 2))
    assert progress.batch_total(torch.utils.data.DataLoader(data, batch_size=4)) == 3
    assert progress.batch_total(BATCHES) == 5
    assert progress.batch_total(tuple(BATCHES[:2])) == 2
    for unknown in (7, None, (BATCHES, 3), [], "abc", {"x": BATCHES[0]}):
        assert progress.batch_total(unknown) is None


def test_silent_bar_accepts_the_bar_calls():
    bar = progress._Silent([1, 2])
    with bar as b:
        b.update(3)
        b.set_postfix_str("x")
    assert list(bar) == [1, 2] and list(progress._Silent()) == []


@pytest.mark.skipif(importlib.util.find_spec("ipywidgets") is not None,
                    reason="ipywidgets installed: tqdm.auto draws widgets")
def test_a_kernel_without_ipywidgets_gets_the_text_bar():
    """tqdm.auto warns (TqdmWarning) in a Jupyter kernel without ipywidgets; the text bar does
    not."""
    import ipykernel  # noqa: F401  (what a notebook's process has loaded)
    from tqdm.std import tqdm
    assert "ipykernel" in sys.modules
    assert progress._tqdm_class() is tqdm
