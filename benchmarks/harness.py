"""Benchmark harness: device timers, interleaved CPU timing, peak memory, result files.

A benchmark module (bench_<op>.py) exposes ``cases(device, quick) -> list[Case]``. A Case
names its shape (from a real model), its candidates (callables that run one iteration) and
which of them are baselines, plus the FLOPs and the fewest bytes one iteration must move, so
the report can state achieved rates. Timing rules (DESIGN.md):
  * CUDA: events around each run, after warm-up, with the L2 flushed before each run;
  * CPU: candidates interleaved (A B A B ...) and medians taken, so drift hits all alike.
"""

import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch


@dataclasses.dataclass
class Case:
    name: str                      # e.g. "llama7b-q 8192x4096->4096 r16 p0.1 bf16 fwd+bwd"
    setup: Callable[[], Dict[str, Callable[[], object]]]  # candidates, built fresh
    subject: str                   # the candidate under test ("lrkernels")
    baselines: List[str]           # names of the candidates it is compared with
    flops: float = 0.0             # per iteration, of the subject
    bytes: float = 0.0             # fewest bytes one iteration must move
    targets: Dict[str, float] = dataclasses.field(default_factory=dict)  # baseline -> max ratio
    note: str = ""
    # For the report: the op family ("lora", "miss", ...; the runner fills in the benchmark's
    # name when empty), the case's natural sizes ({"tokens": 4096, "rank": 16, ...}), and the
    # scaling curve(s) it belongs to: cases of one family with the same `sweep` name and
    # different values of params[sweep] form a curve (one line per set of the other params);
    # "tokens,rank" puts a case on two curves. `headline`: a row of the README table; the
    # extra points of a curve set it False.
    family: str = ""
    params: Dict[str, float] = dataclasses.field(default_factory=dict)
    sweep: str = ""
    headline: bool = True
    # CPU timing of a case whose one iteration takes seconds (a whole model's generate()):
    # fewer warm-up iterations and fewer rounds before the time cap may stop it.
    warmup: Optional[int] = None
    min_rounds: int = 5


@dataclasses.dataclass
class Result:
    case: str
    candidate: str
    median_ms: float
    iqr_ms: float
    runs: int
    peak_mem_mb: Optional[float] = None
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    skipped: str = ""


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


_L2_FLUSH = {}


def _flush_l2():
    buf = _L2_FLUSH.get("buf")
    if buf is None:
        buf = _L2_FLUSH["buf"] = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.float32, device="cuda")
    buf.zero_()


def time_cuda(fn, warmup=5, reps=30):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        _flush_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def time_cpu_interleaved(fns: Dict[str, Callable], warmup=2, rounds=15, max_seconds=60.0, min_rounds=5):
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    t_start = time.perf_counter()
    for i in range(rounds):
        order = list(fns.items()) if i % 2 == 0 else list(reversed(fns.items()))
        for name, fn in order:
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - t_start > max_seconds and i >= min_rounds - 1:
            break
    return times


def _quartiles(xs):
    xs = sorted(xs)
    if len(xs) < 4:
        return statistics.median(xs), 0.0
    q = statistics.quantiles(xs, n=4)
    return statistics.median(xs), q[2] - q[0]


def cuda_peak_memory(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def cpu_peak_memories(module: str, case: str, candidates: List[str], quick: bool) -> Dict[str, float]:
    """Peak resident-memory growth of one iteration of each candidate, measured in one fresh
    process for the case (VmHWM minus VmRSS after the candidate's warm-up iteration), so every
    allocation counts, including the ops' internal ones. Missing candidates: not measured."""
    cmd = [sys.executable, "-m", "benchmarks.peak", module, case] + list(candidates) + (["--quick"] if quick else [])
    try:
        # A fixed mmap threshold keeps glibc from caching large freed blocks in its heap, so
        # resident memory follows the live allocations (large tensors are mmapped and unmapped).
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    except subprocess.TimeoutExpired:
        return {}
    peaks = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "PEAK_MB":
            peaks[parts[2]] = float(parts[1])
    return peaks


def cpu_peak_memory(module: str, case: str, candidate: str, quick: bool) -> Optional[float]:
    return cpu_peak_memories(module, case, [candidate], quick).get(candidate)


def run_case(module: str, case: Case, device: str, quick: bool, measure_memory=True,
             max_seconds: Optional[float] = None) -> List[Result]:
    """Times every candidate of the case (CPU: interleaved rounds, stopped after at least 5
    once `max_seconds` is spent, which the runner sets to keep a whole run in its budget)."""
    try:
        fns = case.setup()
    except ImportError as e:  # a peer package is missing: say so, skip the candidate
        return [Result(case.name, "*", float("nan"), 0.0, 0, skipped=f"set-up failed: {e}")]
    results = []
    skipped = {k: v for k, v in fns.items() if isinstance(v, str)}
    fns = {k: v for k, v in fns.items() if not isinstance(v, str)}
    if device == "cuda":
        times = {k: time_cuda(fn, warmup=3 if quick else 10, reps=10 if quick else 50) for k, fn in fns.items()}
    else:
        cap = 20 if quick else 90
        warmup = case.warmup if case.warmup is not None else 1 if quick else 2
        times = time_cpu_interleaved(fns, warmup=warmup, rounds=5 if quick else 15,
                                     max_seconds=cap if max_seconds is None else min(cap, max_seconds),
                                     min_rounds=min(case.min_rounds, 5))
    peaks = cpu_peak_memories(module, case.name, list(times), quick) if measure_memory and device != "cuda" else {}
    for name, ts in times.items():
        med, iqr = _quartiles(ts)
        r = Result(case.name, name, med, iqr, len(ts))
        if name == case.subject and med > 0:
            if case.flops:
                r.tflops = case.flops / (med * 1e-3) / 1e12
            if case.bytes:
                r.gbps = case.bytes / (med * 1e-3) / 1e9
        if measure_memory:
            r.peak_mem_mb = cuda_peak_memory(fns[name]) if device == "cuda" else peaks.get(name)
        results.append(r)
    for name, why in skipped.items():
        results.append(Result(case.name, name, float("nan"), 0.0, 0, skipped=why))
    return results


def measure_cuda_ceilings() -> dict:
    """This device's ceilings, measured (not datasheet): device-to-device copy bandwidth (bytes
    read + written) and a large bf16 and float32 matrix product's rate."""
    n = 512 * 2**20 // 2  # 512 MiB of bf16
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = statistics.median(time_cuda(lambda: dst.copy_(src), warmup=3, reps=10))
    bw = 2 * src.numel() * 2 / (ms * 1e-3) / 1e9
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms = statistics.median(time_cuda(lambda: a @ b, warmup=3, reps=10))
    tf = 2 * m**3 / (ms * 1e-3) / 1e12
    a32, b32 = a.float(), b.float()  # torch's default: no TF32 for float32 matmuls
    ms = statistics.median(time_cuda(lambda: a32 @ b32, warmup=2, reps=5))
    tf32 = 2 * m**3 / (ms * 1e-3) / 1e12
    del src, dst, a, b, a32, b32
    torch.cuda.empty_cache()
    return {"copy_GBps": round(bw, 1), "bf16_matmul_TFLOPs": round(tf, 1), "fp32_matmul_TFLOPs": round(tf32, 1)}


def measure_cpu_ceilings() -> dict:
    """This CPU's ceilings, measured: copy bandwidth of a buffer far larger than the caches
    (bytes read + written) and the rate of a float32 and of a bfloat16 matrix product, on
    torch's threads (the bf16 one is slow where the CPU has no bf16 dot product: it is what
    torch's own bf16 GEMM reaches here, the ceiling a bf16 case is measured against)."""
    src = torch.randn(64 * 2**20)  # 256 MiB
    dst = torch.empty_like(src)
    ms = statistics.median(time_cpu_interleaved({"copy": lambda: dst.copy_(src)}, warmup=1, rounds=5)["copy"])
    out = {"copy_GBps": round(2 * src.numel() * 4 / (ms * 1e-3) / 1e9, 1)}
    del src, dst
    # The fastest of several runs: a ceiling is the best this machine reached, and on a shared
    # VM the median of a short run is often below what the benchmarks' longer GEMMs then reach.
    # bf16 at 1024 only: without bf16 dot products a 2048 bf16 product takes seconds.
    for name, dtype, m, rounds in (("fp32", torch.float32, 2048, 7), ("bf16", torch.bfloat16, 1024, 3)):
        a, b = torch.randn(m, m).to(dtype), torch.randn(m, m).to(dtype)
        ms = min(time_cpu_interleaved({"mm": lambda: a @ b}, warmup=1, rounds=rounds, max_seconds=20)["mm"])
        out[f"{name}_matmul_TFLOPs"] = round(2 * m**3 / (ms * 1e-3) / 1e12, 3)
    return out


def _cpu_model() -> str:
    """/proc/cpuinfo's model name; with its family / model numbers when the name alone (as
    under some hypervisors: "AMD EPYC") does not say which generation it is."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                info.setdefault(k.strip().lower(), v.strip())
    except OSError:
        pass
    name = info.get("model name") or info.get("hardware") or platform.processor() or platform.machine()
    if not any(ch.isdigit() for ch in name) and "cpu family" in info:
        name += f" (family {info['cpu family']}, model {info.get('model', '?')})"
    return name


def _cpu_isa() -> str:
    """The best vector instruction set this CPU offers (what lrkernels could use)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = " ".join(l for l in f if l.startswith(("flags", "Features")))
    except OSError:
        pass
    words = set(flags.split())
    for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("sve", "SVE"), ("asimd", "NEON")):
        if flag in words:
            return name
    return "NEON" if platform.machine() in ("aarch64", "arm64") else "baseline"


def environment(device: str) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_isa": _cpu_isa(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    env["ceilings"] = measure_cuda_ceilings() if device == "cuda" else measure_cpu_ceilings()
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=here).stdout.strip()  # noqa
        env["commit"] = git("rev-parse", "--short", "HEAD") or None
        if env["commit"] and git("status", "--porcelain", "--untracked-files=no"):
            env["commit"] += "+uncommitted changes"
    except OSError:
        env["commit"] = None
    try:
        import lrkernels
        env["lrkernels_build"] = {k: v for k, v in lrkernels.build_info().items() if k != "ops"}
    except Exception as e:  # pragma: no cover
        env["lrkernels_build"] = f"unavailable: {e}"
    return env


def ratios(case: Case, results: List[Result]) -> Dict[str, float]:
    by = {r.candidate: r for r in results if not r.skipped}
    if case.subject not in by:
        return {}
    out = {}
    for b in case.baselines:
        if b in by and by[b].median_ms > 0:
            out[b] = by[case.subject].median_ms / by[b].median_ms
    return out


def _kernel_isa(env):
    b = env.get("lrkernels_build")
    return b.get("cpu_capability") if isinstance(b, dict) else None


def markdown(env: dict, cases: List[Case], results: List[Result]) -> str:
    lines = [f"# lrkernels benchmarks — {env['device_name']} ({env['device']})", "",
             f"{env['date']}, {env.get('cpu_model')}, kernels' ISA {_kernel_isa(env)}, "
             f"torch {env['torch']}, CUDA {env['cuda']}, commit {env.get('commit')}, "
             f"{env['cpu_threads']} CPU threads", ""]
    ceil = env.get("ceilings")
    if ceil:
        lines += ["Measured ceilings: " + ", ".join(f"{k} {v}" for k, v in ceil.items()) +
                  " (the TFLOP/s and GB/s columns are the subject's achieved rates)", ""]
    for case in cases:
        rs = [r for r in results if r.case == case.name]
        lines += [f"## {case.name}", ""]
        if case.note:
            lines += [case.note, ""]
        lines += ["| candidate | median ms | IQR ms | peak mem MB | TFLOP/s | GB/s |", "|---|---:|---:|---:|---:|---:|"]
        for r in rs:
            if r.skipped:
                lines.append(f"| {r.candidate} | skipped: {r.skipped} | | | | |")
                continue
            f = lambda v, p=2: "" if v is None else f"{v:.{p}f}"  # noqa: E731
            lines.append(f"| {r.candidate} | {r.median_ms:.3f} | {r.iqr_ms:.3f} | {f(r.peak_mem_mb, 1)} | "
                         f"{f(r.tflops)} | {f(r.gbps, 0)} |")
        rat = ratios(case, rs)
        if rat:
            lines.append("")
            parts = []
            for b, v in rat.items():
                t = case.targets.get(b)
                verdict = "" if t is None else (f" (target ≤ {t:.2f}: {'met' if v <= t else 'NOT met'})")
                parts.append(f"{case.subject} / {b} = **{v:.3f}×**{verdict}")
            lines.append("; ".join(parts))
        lines.append("")
    return "\n".join(lines)


def write_results(outdir: str, stem: str, env: dict, cases: List[Case], results: List[Result],
                  wall_s: Optional[Dict[str, float]] = None):
    """wall_s: seconds each case took in the run (set-up, timing and memory), by case name."""
    os.makedirs(outdir, exist_ok=True)
    wall_s = wall_s or {}
    payload = {
        "environment": env,
        "cases": [{"name": c.name, "subject": c.subject, "baselines": c.baselines, "targets": c.targets,
                   "flops": c.flops, "bytes": c.bytes, "family": c.family, "params": c.params, "sweep": c.sweep,
                   "headline": c.headline, "note": c.note, "wall_s": wall_s.get(c.name),
                   "ratios": ratios(c, [r for r in results if r.case == c.name])}
                  for c in cases],
        "results": [dataclasses.asdict(r) for r in results],
    }
    jpath = os.path.join(outdir, stem + ".json")
    mpath = os.path.join(outdir, stem + ".md")
    with open(jpath, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    with open(mpath, "w") as f:
        f.write(markdown(env, cases, results))
    return jpath, mpath
