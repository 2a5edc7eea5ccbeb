"""Reading a result file written by the runner (harness.write_results): its cases grouped by
family, each candidate's result, and the environment in one line. Torch-free, so reports,
comparisons and the README check run without building anything.

Older result files (before cases carried a family) still load: their cases fall in one
family named after the file's device.
"""

import json
import math
import os
from collections import OrderedDict


def _finite(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


class ResultFile:
    def __init__(self, path):
        self.path = path
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or "cases" not in data or "results" not in data:
            raise ValueError(f"{path}: not a benchmark result file (no 'cases' / 'results')")
        self.env = data.get("environment", {})
        self.cases = data["cases"]
        self._by_case = {}
        for r in data["results"]:
            self._by_case.setdefault(r["case"], OrderedDict())[r["candidate"]] = r

    @property
    def stem(self):
        return os.path.splitext(os.path.basename(self.path))[0]

    def family(self, case):
        return case.get("family") or case.get("module") or self.env.get("device", "benchmarks")

    def families(self):
        """family -> its cases, in the order the file lists them."""
        out = OrderedDict()
        for c in self.cases:
            out.setdefault(self.family(c), []).append(c)
        return out

    def case(self, name):
        return next((c for c in self.cases if c["name"] == name), None)

    def results(self, case_name):
        """candidate -> result dict, every candidate including skipped ones."""
        return self._by_case.get(case_name, OrderedDict())

    def timed(self, case_name):
        """candidate -> result dict, only candidates with a measured (finite) median."""
        return OrderedDict((k, r) for k, r in self.results(case_name).items()
                           if not r.get("skipped") and _finite(r.get("median_ms")))

    def ratios(self, case):
        """baseline -> subject median / baseline median, from the stored results."""
        t = self.timed(case["name"])
        s = t.get(case["subject"])
        if s is None:
            return OrderedDict()
        return OrderedDict((b, s["median_ms"] / t[b]["median_ms"]) for b in case.get("baselines", [])
                           if b in t and t[b]["median_ms"] > 0)


def isa(env):
    """The instruction set the kernels ran with, as the run recorded it."""
    b = env.get("lrkernels_build")
    if isinstance(b, dict) and b.get("cpu_capability"):
        cap = b["cpu_capability"].upper().replace("AVX512", "AVX-512")
        return "NEON" if cap == "DEFAULT" and "aarch64" in env.get("machine", "") else cap
    return env.get("cpu_isa") or "ISA not recorded"


def machine(env):
    """The machine in a few words: CPU model (or GPU name) and instruction set."""
    cpu = env.get("cpu_model") or env.get("device_name") or "unknown CPU"
    if env.get("device") == "cuda":
        return f"{env.get('device_name', 'GPU')} (host {cpu}, {isa(env)})"
    return f"{cpu} ({isa(env)})"


def env_line(env):
    """Everything a figure needs to be read correctly, in one line."""
    parts = [machine(env), f"{env.get('cpu_threads', '?')} threads", f"torch {env.get('torch', '?')}",
             f"device {env.get('device', '?')}", f"commit {env.get('commit') or '?'}"]
    if env.get("date"):
        parts.append(str(env["date"])[:10])
    return " · ".join(parts)


def fmt_ms(v):
    """Three significant figures, no exponent: 0.123, 1.23, 12.3, 123, 1234."""
    if not _finite(v):
        return "–"
    a = abs(v)
    return f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 1 else f"{v:.3f}"
