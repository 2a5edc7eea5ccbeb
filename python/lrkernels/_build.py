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
    (``cpu_kernels``, see :func:`set_cpu_kernels`), the CUDA kernel path per family
    (``cuda_kernels``, see :func:`set_cuda_kernels`), and ``cpu_avx512`` (whether AVX-512 kernels
    can run here at all)."""
    info = dict(_C.build_info())
    info["torch_runtime_version"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    info["cpu_capability"] = get_cpu_capability()
    info["cpu_capability_detected"] = _C.cpu_capability_detected()
    info["cpu_capabilities_compiled"] = list(_C.cpu_capabilities_compiled())
    info["cpu_avx512"] = info["cpu_capability_detected"] == "avx512"
    info["cpu_kernels"] = get_cpu_kernels()
    info["cuda_kernels"] = get_cuda_kernels()
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


_CUDA_KERNEL_MODES = ("auto", "simt", "tensor_core")
CUDA_KERNEL_FAMILIES = ("lora_linear", "multi_lora")


def get_cuda_kernels() -> dict:
    """The CUDA kernel path in force per op family: ``{"lora_linear": mode, "multi_lora": mode}``
    with mode "auto", "simt" or "tensor_core" (see :func:`set_cuda_kernels`)."""
    return {f: _CUDA_KERNEL_MODES[m] for f, m in _C.get_cuda_kernels().items()}


def set_cuda_kernels(mode: str, families=None) -> dict:
    """Choose which CUDA kernels the LoRA families run, process-wide; returns the previous modes
    (a dict, which :func:`use_cuda_kernels` restores).

    "auto" (the default): the tensor-core (WMMA) shrink and expand for fp16/bf16 inputs whose
    adapters have the same dtype, when the GPU runs sm_80+ code of them and the shape fills
    their tiles (lora_linear: >= 64 tokens; multi-LoRA: >= 32 tokens per adapter on average),
    else the SIMT kernels. "simt": always the SIMT kernels. "tensor_core": the tensor-core
    kernels wherever the dtypes have them, at every shape; raises RuntimeError on a call where
    the GPU has no sm_80+ code for them (a build whose arch list does not cover the GPU).
    float32 inputs and float32 adapters on a 16-bit base always run the SIMT kernels.
    ``families``: None (all), or a name or list of names from ``CUDA_KERNEL_FAMILIES``.

    The environment variables ``LRKERNELS_LORA_SIMT_ONLY=1`` / ``LRKERNELS_MULTI_LORA_SIMT_ONLY=1``
    set "simt" for lora_linear / multi-LoRA when the library loads (they are not re-read later).
    Which path ran is counted by :func:`cuda_kernel_launches`.
    """
    if isinstance(mode, dict):  # what an earlier call returned
        previous = get_cuda_kernels()
        for family, m in mode.items():
            set_cuda_kernels(m, family)
        return {f: previous[f] for f in mode}
    if mode not in _CUDA_KERNEL_MODES:
        raise ValueError(f"lrkernels.set_cuda_kernels: mode must be one of {_CUDA_KERNEL_MODES}, got {mode!r}")
    if families is None:
        families = CUDA_KERNEL_FAMILIES
    elif isinstance(families, str):
        families = (families,)
    for f in families:
        if f not in CUDA_KERNEL_FAMILIES:
            raise ValueError(f"lrkernels.set_cuda_kernels: families must be names from {CUDA_KERNEL_FAMILIES}, "
                             f"got {f!r}")
    previous = get_cuda_kernels()
    for f in families:
        _C.set_cuda_kernels(f, _CUDA_KERNEL_MODES.index(mode))
    return {f: previous[f] for f in families}


@contextlib.contextmanager
def use_cuda_kernels(mode: str, families=None):
    """``with lrkernels.use_cuda_kernels("simt"): ...`` runs the block with that CUDA kernel path
    (see set_cuda_kernels) and restores the previous one afterwards, also on error."""
    previous = set_cuda_kernels(mode, families)
    try:
        yield
    finally:
        set_cuda_kernels(previous)


def cuda_kernel_launches(reset: bool = False) -> dict:
    """Launches of the LoRA families' two-path CUDA kernels since the last reset, counted on the
    host when each launch is made: keys ``"<family>.<shrink|expand>.<simt|tensor_core>"``, plus
    ``"<family>.tensor_core_image_arch"``: the ``__CUDA_ARCH__`` the GPU's loaded image of the
    family's tensor-core kernels was compiled for (e.g. 900; 0: none; -1: not asked yet). A
    debugging and testing aid: it shows which path a call took. ``reset=True`` zeroes the
    counters after reading them."""
    counts = dict(_C.cuda_kernel_launches())
    if reset:
        _C.reset_cuda_kernel_launches()
    return counts
