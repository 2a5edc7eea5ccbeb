"""Run every benchmarks/bench_<op>.py on the chosen device, write JSON + markdown, then the
report (markdown with PNG plots, in <stem>.report/ beside the JSON).

    python -m benchmarks                      # best available device, all benchmarks
    python -m benchmarks --device cpu --only lora --quick
    python -m benchmarks --out benchmarks/results --stem 2026-11-28-h200
    python -m benchmarks --compare benchmarks/results/OLD.json   # ... and compare with an older run

Each case reports the median time of every candidate, the ratio of the subject (lrkernels) to
each baseline, peak memory, and on GPU the achieved FLOP rate and bandwidth.

Subcommands (torch-free; they read result files):
    python -m benchmarks report RESULTS.json [--compare OLD.json] [--out DIR]
    python -m benchmarks readme-table RESULTS.json [--write | --check] [--readme README.md]

Exit status: 0 done (and, with --compare, no case slower than OLD beyond the runs' spread);
1 with --compare: a case's subject is slower than in OLD by more than the spread (the larger
of the two interquartile ranges); 2 usage error, unreadable file, or no case in common.
"""

import argparse
import glob
import importlib
import os
import sys

SUBCOMMANDS = {"report": "benchmarks.report", "readme-table": "benchmarks.readme_table"}


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


def _print_results(case, results, harness):
    for r in results:
        if r.skipped:
            print(f"    {r.candidate:>28}: skipped ({r.skipped})")
        else:
            mem = "" if r.peak_mem_mb is None else f"  peak {r.peak_mem_mb:8.1f} MB"
            print(f"    {r.candidate:>28}: {r.median_ms:9.3f} ms ± {r.iqr_ms:.3f} (IQR){mem}")
    for b, v in harness.ratios(case, results).items():
        t = case.targets.get(b)
        tgt = "" if t is None else f"  (target <= {t:.2f}: {'met' if v <= t else 'NOT met'})"
        print(f"    {case.subject} / {b} = {v:.3f}x{tgt}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])

    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="where to run (default: cuda when available, else cpu)")
    ap.add_argument("--only", help="comma-separated benchmark names (e.g. lora,c3a)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and smaller shapes")
    ap.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    ap.add_argument("--no-report", action="store_true", help="write JSON + markdown table only, no report")
    ap.add_argument("--compare", metavar="OLD.json", help="compare with an older result file in the report")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    help="output folder (default: benchmarks/results)")
    ap.add_argument("--stem", help="output file name without extension (default: latest-<device>.local)")
    ap.add_argument("--budget", type=float, metavar="MIN",
                    help="minutes the whole run should take (default 25, --quick 4): each case's timing loop "
                         "stops early (after at least 5 rounds) when the cases left would overrun it")
    ap.add_argument("--list", action="store_true", help="list benchmarks and cases, then exit")
    args = ap.parse_args(argv)

    import torch

    from . import harness
    from .progress import Progress

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks: --device cuda but no CUDA device is available")

    planned = []  # (benchmark name, module, case)
    for name in discover(args.only):
        module = f"benchmarks.bench_{name}"
        cases = importlib.import_module(module).cases(device, args.quick)
        for case in cases:
            case.family = case.family or name
            planned.append((name, module, case))
        if args.list:
            print(f"{name}: " + "; ".join(c.name for c in cases))
    if args.list:
        return 0

    env = harness.environment(device)
    all_cases, all_results, wall_s = [], [], {}
    progress = Progress([case.family for _, _, case in planned])
    budget_s = 60 * (args.budget if args.budget else 4 if args.quick else 25)
    for i, (name, module, case) in enumerate(planned):
        print(f"{progress.line(f'{name}: {case.name}')}", flush=True)
        progress.start_case()
        # the timing loop's share of what is left; set-up and memory take the rest
        cap = max(3.0, 0.6 * (budget_s - progress.elapsed_s()) / (len(planned) - i))
        results = harness.run_case(module, case, device, args.quick, measure_memory=not args.no_memory,
                                   max_seconds=cap)
        wall_s[case.name] = round(progress.end_case(), 2)
        _print_results(case, results, harness)
        all_cases.append(case)
        all_results.extend(results)
    print(progress.line("all cases done"))
    env["run_wall_s"] = round(progress.elapsed_s(), 1)
    stem = args.stem or f"latest-{device}.local"
    jpath, mpath = harness.write_results(args.out, stem, env, all_cases, all_results, wall_s)
    print(f"wrote {jpath} and {mpath}")
    if args.no_report:
        return 0
    from . import report

    return report.main([jpath] + (["--compare", args.compare] if args.compare else []))


if __name__ == "__main__":
    sys.exit(main())
