"""What the loaded native library contains."""

import contextlib

import torch

from . import _C


def build_info() -> dict:
    """The build: whether CUDA kernels are compiled in, the CUDA arch list and runtime version
    they were built for, the torch they were built against, and the torch running now; the CPU
    instruction sets the vectorised kernels were compiled for (``cpu_capabilities_compiled``),
    the best this CPU runs (``cpu_capability_detected``) and the one in force
    (``cpu_capability``, see :func:`set_cpu_capability`), the CPU kernel path in force
    (``cpu_kernels``, see :func:`set_cpu_kernels`), and ``cpu_avx512`` (whether AVX-512 kernels
    can run here at all)."""
    info = dict(_C.build_info())
    info["torch_runtime_version"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    info["cpu_capability"] = get_cpu_capability()
    info["cpu_capability_detected"] = _C.cpu_capability_detected()
    info["cpu_capabilities_compiled"] = list(_C.cpu_capabilities_compiled())
    info["cpu_avx512"] = info["cpu_capability_detected"] == "avx512"
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


_CPU_KERNEL_MODES = ("auto", "aten", "blocked")
# names of the first release: "portable" was the ATen path, "fused" the blocked (then AVX-512
# only) kernels
_CPU_KERNEL_ALIASES = {"portable": "aten", "fused": "blocked"}


def get_cpu_kernels() -> str:
    """The CPU kernel path in force: "auto", "aten" or "blocked" (see set_cpu_kernels)."""
    return _CPU_KERNEL_MODES[_C.get_cpu_kernels()]


def set_cpu_kernels(mode: str) -> str:
    """Choose which CPU kernels the ops run, process-wide; returns the previous mode.

    "auto" (the default): the hand-written blocked kernels (each block of rows does its rank-r
    work next to its base GEMM while in cache) where the problem is large enough for them to
    pay. "aten": never those kernels (ATen/BLAS composition only). "blocked": the blocked
    kernels at every size. The instruction set they use is :func:`set_cpu_capability`'s. All
    modes compute the same function; results differ only by float rounding, and dropout masks
    are bit-identical. The names "portable" (= "aten") and "fused" (= "blocked") of earlier
    releases are still accepted.
    """
    mode = _CPU_KERNEL_ALIASES.get(mode, mode)
    if mode not in _CPU_KERNEL_MODES:
        raise ValueError(f"lrkernels.set_cpu_kernels: mode must be one of {_CPU_KERNEL_MODES}, got {mode!r}")
    previous = get_cpu_kernels()
    _C.set_cpu_kernels(_CPU_KERNEL_MODES.index(mode))
    return previous


@contextlib.contextmanager
def use_cpu_kernels(mode: str):
    """``with lrkernels.use_cpu_kernels("aten"): ...`` runs the block with that CPU kernel
    path (see set_cpu_kernels) and restores the previous one afterwards, also on error."""
    previous = set_cpu_kernels(mode)
    try:
        yield
    finally:
        set_cpu_kernels(previous)


_CPU_CAPABILITIES = ("default", "avx2", "avx512")


def get_cpu_capability() -> str:
    """The instruction set the vectorised CPU kernels run with now: "default", "avx2" or
    "avx512" (on aarch64 "default" is NEON)."""
    return _C.cpu_capability()


def set_cpu_capability(capability: str) -> str:
    """Cap the instruction set of the vectorised CPU kernels, process-wide; returns the previous
    one. "auto" restores the best this CPU runs. A capability above what the CPU runs (or the
    build compiled) is capped at that, as ``ATEN_CPU_CAPABILITY`` is for PyTorch. The
    environment variable ``LRKERNELS_CPU_CAPABILITY`` (or, when unset, ``ATEN_CPU_CAPABILITY``)
    sets the initial cap when the library loads; this lets the AVX2 kernels be measured on an
    AVX-512 machine."""
    c = capability.lower() if isinstance(capability, str) else capability
    if c == "auto":
        c = _C.cpu_capability_detected()
    if c not in _CPU_CAPABILITIES:
        raise ValueError(f"lrkernels.set_cpu_capability: capability must be 'auto' or one of {_CPU_CAPABILITIES}, "
                         f"got {capability!r}")
    previous = get_cpu_capability()
    _C.set_cpu_capability(_CPU_CAPABILITIES.index(c))
    return previous


@contextlib.contextmanager
def use_cpu_capability(capability: str):
    """``with lrkernels.use_cpu_capability("avx2"): ...`` runs the block with that instruction
    set cap (see set_cpu_capability) and restores the previous one afterwards."""
    previous = set_cpu_capability(capability)
    try:
        yield
    finally:
        set_cpu_capability(previous)
