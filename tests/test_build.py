"""The build: what it reports, and that every op has its kernels registered."""

import os
import subprocess
import sys

import pytest

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
        missing = {op for op in lrkernels.registered_ops() if not lrkernels.has_kernel(op, "cuda")}
        assert missing == CPU_ONLY_OPS, (f"ops without a CUDA kernel: {sorted(missing)}; known CPU-only: "
                                         f"{sorted(CPU_ONLY_OPS)} (shrink this list when a CUDA kernel lands)")


# Families whose CUDA kernels have not landed yet (README: "no CUDA binding yet" / "not yet"). On
# a CUDA tensor they raise the dispatcher's clear "no kernel for CUDA" error.
CPU_ONLY_OPS = {"dropout_complement_linear", "dropout_complement_linear_backward"}


def test_cpu_capability_reporting_and_cap():
    info = lrkernels.build_info()
    assert "default" in info["cpu_capabilities_compiled"]
    assert info["cpu_capability_detected"] in info["cpu_capabilities_compiled"]
    assert info["cpu_capability"] in ("default", "avx2", "avx512")
    best = info["cpu_capability_detected"]
    with lrkernels.use_cpu_capability("default"):
        assert lrkernels.get_cpu_capability() == "default"
        with lrkernels.use_cpu_capability("avx512"):  # capped at what this CPU and build run
            assert lrkernels.get_cpu_capability() == best
    assert lrkernels.get_cpu_capability() == info["cpu_capability"]
    with pytest.raises(ValueError, match="capability must be"):
        lrkernels.set_cpu_capability("sse9")


def test_cpu_capability_environment_variable_caps_at_load():
    """LRKERNELS_CPU_CAPABILITY (as ATEN_CPU_CAPABILITY for PyTorch) is read when the library loads."""
    code = "import lrkernels; print(lrkernels.get_cpu_capability())"
    env = dict(os.environ, LRKERNELS_CPU_CAPABILITY="default")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "default"
    env = dict(os.environ, LRKERNELS_CPU_CAPABILITY="", ATEN_CPU_CAPABILITY="default")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "default"


def test_old_cpu_kernel_mode_names_still_work():
    with lrkernels.use_cpu_kernels("portable"):
        assert lrkernels.get_cpu_kernels() == "aten"
    with lrkernels.use_cpu_kernels("fused"):
        assert lrkernels.get_cpu_kernels() == "blocked"
    assert lrkernels.get_cpu_kernels() == "auto"


def test_cuda_kernel_setting_round_trip_and_errors():
    """set_cuda_kernels / use_cuda_kernels work in every build (a CPU-only build keeps the setting
    and counts no launches); bad modes and families raise ValueError."""
    start = lrkernels.get_cuda_kernels()
    assert set(start) == {"lora_linear", "multi_lora"}
    assert lrkernels.build_info()["cuda_kernels"] == start
    with lrkernels.use_cuda_kernels("simt"):
        assert lrkernels.get_cuda_kernels() == {"lora_linear": "simt", "multi_lora": "simt"}
        with lrkernels.use_cuda_kernels("tensor_core", "multi_lora"):
            assert lrkernels.get_cuda_kernels() == {"lora_linear": "simt", "multi_lora": "tensor_core"}
        assert lrkernels.get_cuda_kernels()["multi_lora"] == "simt"
    assert lrkernels.get_cuda_kernels() == start
    previous = lrkernels.set_cuda_kernels("tensor_core", ["lora_linear"])
    assert previous == {"lora_linear": start["lora_linear"]}
    lrkernels.set_cuda_kernels(previous)
    assert lrkernels.get_cuda_kernels() == start
    with pytest.raises(ValueError, match="mode must be one of"):
        lrkernels.set_cuda_kernels("fast")
    with pytest.raises(ValueError, match="families must be names from"):
        lrkernels.set_cuda_kernels("simt", "c3a")
    counts = lrkernels.cuda_kernel_launches()
    for family in ("lora_linear", "multi_lora"):
        for kernel in ("shrink", "expand"):
            for path in ("simt", "tensor_core"):
                assert isinstance(counts[f"{family}.{kernel}.{path}"], int)
        assert isinstance(counts[f"{family}.tensor_core_image_arch"], int)
    lrkernels.cuda_kernel_launches(reset=True)
    assert all(v == 0 for k, v in lrkernels.cuda_kernel_launches().items() if not k.endswith("image_arch"))


def test_cuda_kernel_environment_variables_read_at_load():
    """LRKERNELS_LORA_SIMT_ONLY=1 / LRKERNELS_MULTI_LORA_SIMT_ONLY=1 of the first releases still
    choose the SIMT kernels, each for its own family, read once when the library loads."""
    code = "import lrkernels; k = lrkernels.get_cuda_kernels(); print(k['lora_linear'], k['multi_lora'])"
    for env_name, want in (("LRKERNELS_LORA_SIMT_ONLY", "simt auto"), ("LRKERNELS_MULTI_LORA_SIMT_ONLY", "auto simt")):
        env = {k: v for k, v in os.environ.items() if not k.endswith("SIMT_ONLY")}
        env[env_name] = "1"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split()[-2:] == want.split(), out.stdout + out.stderr
