"""The build: what it reports, and that every op has its kernels registered."""

import os

import torch

import lrkernels


def test_build_info_reports_versions():
    info = lrkernels.build_info()
    assert isinstance(info["cuda"], bool)
    assert info["torch_version"]
    assert info["torch_runtime_version"] == torch.__version__
    if info["cuda"]:
        assert info["cuda_runtime_version"] > 0 and info["cuda_arch_list"]


def test_every_op_has_cpu_kernel_and_fake():
    ops = lrkernels.registered_ops()
    assert "lora_linear" in ops and "lora_linear_backward" in ops and "dropout_mask" in ops
    for op in ops:
        assert lrkernels.has_kernel(op, "cpu"), f"{op}: no CPU kernel"
        assert torch._library.simple_registry.singleton.find(f"lrkernels::{op}").fake_impl.kernel is not None, \
            f"{op}: no fake kernel (register_fake in python/lrkernels/ops/)"


def test_every_op_has_cuda_kernel_in_cuda_build():
    """CI has nvcc but no GPU: the CUDA kernels must still compile, link and register."""
    info = lrkernels.build_info()
    if os.environ.get("LRKERNELS_EXPECT_CUDA_BUILD") == "1":
        assert info["cuda"], "nvcc is present but lrkernels was built without CUDA kernels"
    if info["cuda"]:
        missing = [op for op in lrkernels.registered_ops() if not lrkernels.has_kernel(op, "cuda")]
        assert not missing, f"ops without a CUDA kernel: {missing}"
