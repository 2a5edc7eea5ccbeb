"""Measure one candidate's peak memory growth on CPU in a fresh process (used by harness).

    python -m benchmarks.peak <module> <case name> <candidate> [--quick]

Prints "PEAK_MB <float>": VmHWM after one iteration minus VmRSS after set-up and one warm-up
iteration, so the number is the iteration's own high-water mark above its steady state.
"""

import importlib
import sys


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_hwm():
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main():
    module, case_name, candidate = sys.argv[1:4]
    quick = "--quick" in sys.argv[4:]
    import torch  # noqa: F401

    mod = importlib.import_module(module)
    case = next(c for c in mod.cases("cpu", quick) if c.name == case_name)
    fn = case.setup()[candidate]
    fn()  # warm-up: one-time allocations (caches, lazy init) are not the iteration's cost
    import gc

    gc.collect()
    base = _status_kb("VmRSS")
    if not _reset_hwm():
        print("PEAK_MB nan")
        return
    fn()
    peak = _status_kb("VmHWM")
    print(f"PEAK_MB {(peak - base) / 1024:.2f}")


if __name__ == "__main__":
    main()
