"""``import quantsim`` and a calibration load no ONNX / onnxscript / ONNX Runtime / scipy: those
come in when export, verify or an analyzer that needs them is used (README, Import cost)."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

#: modules only export, verify and some analyzers need
HEAVY = ("onnx", "onnxscript", "onnxruntime", "scipy")

_SCRIPT = f"""
import json, sys
heavy = {HEAVY!r}
loaded = lambda: sorted(m for m in heavy if m in sys.modules)
import quantsim
seen = {{"import": loaded()}}
import torch
from torch import nn
from quantsim import QuantizationSimModel
model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()
x = torch.randn(4, 1, 8, 8)
sim = QuantizationSimModel(model, x[:1], quant_scheme="tf")
sim.compute_encodings(lambda m, _: m(x), None)
sim.model(x)
seen["calibrate"] = loaded()
names = dir(quantsim)
seen["lazy_listed"] = all(n in names for n in quantsim._LAZY)
verify = quantsim.verify
seen["verify"] = loaded()
seen["same"] = verify is __import__("quantsim.export.verify", fromlist=["verify"]).verify
print(json.dumps(seen))
"""


def test_import_and_calibration_load_no_onnx_or_scipy():
    run = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["import"] == [] and seen["calibrate"] == [], seen
    # the lazy names are listed, resolve on first use, and are the real objects
    assert seen["lazy_listed"] and seen["same"]
    assert "onnx" in seen["verify"], seen
