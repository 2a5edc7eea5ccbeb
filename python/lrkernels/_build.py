"""What the loaded native library contains."""

import contextlib

import torch

from . import _C


def build_info() -> dict:
    """The build: whether CUDA kernels are compiled in, the CUDA arch list and runtime version
    they were built for, the torch they were built against, and the torch running now; whether
    this CPU runs the AVX-512 kernels (``cpu_avx512``) and the CPU kernel mode in force
    (``cpu_kernels``, see :func:`set_cpu_kernels`)."""
    info = dict(_C.build_info())
    info["torch_runtime_version"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    info["cpu_avx512"] = bool(_C.cpu_has_avx512())
    info["cpu_kernels"] = get_cpu_kernels()
    info["ops"] = registered_ops()
    return info


def registered_ops() -> list:
    """Names of every op in the torch.ops.lrkernels namespace."""
    names = {n.split("::", 1)[1].split(".", 1)[0] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("lrkernels::")}
    return sorted(names)


def has_kernel(op: str, device_type: str) -> bool:
    """Whether `torch.ops.lrkernels.<op>` has a kernel for `device_type` ("cpu" or "cuda")."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"lrkernels::{op}", key)


_CPU_KERNEL_MODES = ("auto", "portable", "fused")


def get_cpu_kernels() -> str:
    """The CPU kernel selection in force: "auto", "portable" or "fused" (see set_cpu_kernels)."""
    return _CPU_KERNEL_MODES[_C.get_cpu_kernels()]


def set_cpu_kernels(mode: str) -> str:
    """Choose which CPU kernels the ops run, process-wide; returns the previous mode.

    "auto" (the default): hand-vectorised AVX-512 kernels where the CPU has AVX-512 (F, BW, DQ,
    VL) and the problem is large enough for them to pay. "portable": never those kernels (ATen/BLAS
    and compiler-vectorised loops only). "fused": the AVX-512 kernels at every size where the CPU
    has them. All modes compute the same function; results differ only by float rounding, and
    dropout masks are bit-identical.
    """
    if mode not in _CPU_KERNEL_MODES:
        raise ValueError(f"lrkernels.set_cpu_kernels: mode must be one of {_CPU_KERNEL_MODES}, got {mode!r}")
    previous = get_cpu_kernels()
    _C.set_cpu_kernels(_CPU_KERNEL_MODES.index(mode))
    return previous


@contextlib.contextmanager
def use_cpu_kernels(mode: str):
    """``with lrkernels.use_cpu_kernels("portable"): ...`` runs the block with that CPU kernel
    mode (see set_cpu_kernels) and restores the previous one afterwards, also on error."""
    previous = set_cpu_kernels(mode)
    try:
        yield
    finally:
        set_cpu_kernels(previous)
