"""Import a CPU-only build of lrkernels and check what it registered: a CPU kernel for
every op, no CUDA kernel for any, and build_info() saying so. Run by `make test-cpu-only`."""

import sys

import torch

import lrkernels

info = lrkernels.build_info()
ops = lrkernels.registered_ops()
problems = []
if info["cuda"]:
    problems.append("build_info() reports a CUDA build")
for op in ops:
    if not lrkernels.has_kernel(op, "cpu"):
        problems.append(f"{op}: no CPU kernel")
    if lrkernels.has_kernel(op, "cuda"):
        problems.append(f"{op}: has a CUDA kernel in a CPU-only build")
x = torch.randn(4, 8)
y = lrkernels.lora_linear(x, torch.randn(6, 8), None, torch.randn(2, 8), torch.randn(6, 2))
if y.shape != (4, 6):
    problems.append(f"lora_linear returned shape {tuple(y.shape)}")
print(f"CPU-only build from {lrkernels.__file__}: {len(ops)} ops: {', '.join(ops)}")
if problems:
    print("FAILED:\n  " + "\n  ".join(problems))
    sys.exit(1)
print("CPU-only build OK")
