"""What the loaded native library contains."""

import torch

from . import _C


def build_info() -> dict:
    """The build: whether CUDA kernels are compiled in, the CUDA arch list and runtime version
    they were built for, the torch they were built against, and the torch running now."""
    info = dict(_C.build_info())
    info["torch_runtime_version"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
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
