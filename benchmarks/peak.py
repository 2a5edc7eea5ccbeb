"""Measure candidates' peak memory growth on CPU in a fresh process (used by harness).

    python -m benchmarks.peak <module> <case name> [<candidate> ...] [--quick]

For each candidate (default: every candidate of the case), prints "PEAK_MB <float> <candidate>":
VmHWM after one iteration minus VmRSS after one warm-up iteration of that candidate, so the
number is the iteration's own high-water mark above its steady state (which still holds what the
warm-up left alive, e.g. the gradients a training step clears at its start). glibc is told to
return every freed large block to the OS at once, so RSS follows the live allocations and the
figure repeats from run to run (without that it drifted between 0 and the temporaries' size). The case is set up once
(its set-up builds every candidate anyway), so one process serves the whole case.
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


def _release_frees_to_the_os():
    """Makes RSS follow the live allocations: glibc serves large blocks by mmap only below a
    threshold that grows after every free (up to 32 MiB), after which freed blocks stay in the
    heap and in RSS, so a steady-state baseline would already hold the iteration's temporaries
    and the difference came out anywhere between 0 and their full size. A fixed threshold of
    128 KiB (which also switches the growth off) returns every freed large block at once."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024))
    except (OSError, AttributeError):  # not glibc: the figure is as good as the allocator allows
        return False


def main():
    _release_frees_to_the_os()  # before torch allocates anything
    args = [a for a in sys.argv[1:] if a != "--quick"]
    quick = "--quick" in sys.argv[1:]
    module, case_name, wanted = args[0], args[1], args[2:]
    import gc

    import torch  # noqa: F401

    mod = importlib.import_module(module)
    case = next(c for c in mod.cases("cpu", quick) if c.name == case_name)
    fns = {k: v for k, v in case.setup().items() if not isinstance(v, str)}
    for name in wanted or list(fns):
        fn = fns[name]
        fn()  # warm-up: one-time allocations (caches, lazy init) are not the iteration's cost
        gc.collect()
        base = _status_kb("VmRSS")
        if not _reset_hwm():
            print(f"PEAK_MB nan {name}")
            continue
        fn()
        peak = _status_kb("VmHWM")
        print(f"PEAK_MB {(peak - base) / 1024:.2f} {name}", flush=True)


if __name__ == "__main__":
    main()
