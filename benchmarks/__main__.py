"""Run every benchmarks/bench_<op>.py on the chosen device and write JSON + markdown.

    python -m benchmarks                      # best available device, all benchmarks
    python -m benchmarks --device cpu --only lora --quick
    python -m benchmarks --out benchmarks/results --stem 2026-11-28-h200

Each case reports the median time of every candidate, the ratio of the subject (lrkernels) to
each baseline, peak memory, and on GPU the achieved FLOP rate and bandwidth.
"""

import argparse
import glob
import importlib
import os
import sys
import time

import torch

from . import harness


def discover(only=None):
    here = os.path.dirname(os.path.abspath(__file__))
    names = sorted(os.path.basename(p)[len("bench_"):-3] for p in glob.glob(os.path.join(here, "bench_*.py")))
    if only:
        wanted = set(only.split(","))
        unknown = wanted - set(names)
        if unknown:
            sys.exit(f"benchmarks: unknown benchmark(s) {sorted(unknown)}; available: {names}")
        names = [n for n in names if n in wanted]
    return names


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="where to run (default: cuda when available, else cpu)")
    ap.add_argument("--only", help="comma-separated benchmark names (e.g. lora,c3a)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and smaller shapes")
    ap.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    help="output folder (default: benchmarks/results)")
    ap.add_argument("--stem", help="output file name without extension (default: latest-<device>.local)")
    ap.add_argument("--list", action="store_true", help="list benchmarks and cases, then exit")
    args = ap.parse_args(argv)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks: --device cuda but no CUDA device is available")

    names = discover(args.only)
    all_cases, all_results = [], []
    t0 = time.time()
    for name in names:
        module = f"benchmarks.bench_{name}"
        mod = importlib.import_module(module)
        cases = mod.cases(device, args.quick)
        if args.list:
            print(f"{name}: " + "; ".join(c.name for c in cases))
            continue
        for i, case in enumerate(cases, 1):
            print(f"[{name} {i}/{len(cases)}] {case.name} ...", flush=True)
            results = harness.run_case(module, case, device, args.quick, measure_memory=not args.no_memory)
            for r in results:
                if r.skipped:
                    print(f"    {r.candidate:>22}: skipped ({r.skipped})")
                else:
                    mem = "" if r.peak_mem_mb is None else f"  peak {r.peak_mem_mb:8.1f} MB"
                    print(f"    {r.candidate:>22}: {r.median_ms:9.3f} ms{mem}")
            for b, v in harness.ratios(case, results).items():
                t = case.targets.get(b)
                tgt = "" if t is None else f"  (target <= {t:.2f}: {'met' if v <= t else 'NOT met'})"
                print(f"    {case.subject} / {b} = {v:.3f}x{tgt}")
            all_cases.append(case)
            all_results.extend(results)
    if args.list:
        return 0
    env = harness.environment(device)
    stem = args.stem or f"latest-{device}.local"
    jpath, mpath = harness.write_results(args.out, stem, env, all_cases, all_results)
    print(f"\nwrote {jpath} and {mpath} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
