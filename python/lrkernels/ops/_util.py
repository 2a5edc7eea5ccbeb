"""Helpers shared by the op modules."""

import contextlib

import torch

try:  # nvtx ranges around public ops are optional
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - depends on the environment
    _nvtx = None


def nvtx_range(name: str):
    """An NVTX range when the nvtx package is installed and we are not being traced."""
    if _nvtx is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _nvtx.annotate(name, domain="lrkernels")


def schema_arg_names(op) -> tuple:
    """Argument names of an OpOverload, in schema order."""
    return tuple(a.name for a in op._schema.arguments)


def bind(op, inputs) -> dict:
    """Map an op's positional inputs (as register_autograd's setup_context receives them)
    to their schema names."""
    names = schema_arg_names(op)
    assert len(names) == len(inputs), f"{op}: expected {len(names)} inputs, got {len(inputs)}"
    return dict(zip(names, inputs))


def needs_grad(ctx, op, name: str) -> bool:
    return ctx.needs_input_grad[schema_arg_names(op).index(name)]


def new_seed(device, generator=None) -> torch.Tensor:
    """A fresh 64-bit dropout seed as a one-element int64 tensor on `device`: drawn on the
    device itself, so no host synchronisation, and graph-safe under CUDA graph capture."""
    return torch.randint(-(2 ** 63), 2 ** 63 - 1, (), dtype=torch.int64, device=device, generator=generator)


def seed_tensor(seed: int, device) -> torch.Tensor:
    """An int seed (any 64-bit pattern) as the one-element int64 tensor the ops take."""
    seed = int(seed) & ((1 << 64) - 1)
    if seed >= 1 << 63:
        seed -= 1 << 64
    return torch.tensor(seed, dtype=torch.int64, device=device)
