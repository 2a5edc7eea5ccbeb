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


_NOT_DIFFERENTIABLE_LIB = {}


def register_not_differentiable(op_name: str, why: str) -> None:
    """Make ``torch.ops.lrkernels.<op_name>`` raise a clear error when called with grad mode on
    and an input that requires grad, instead of returning outputs with no (or a wrong) gradient.
    `why` finishes the sentence "lrkernels.<op_name> is not differentiable: ..." (what to use
    instead). Without such inputs the op runs as usual, below autograd."""
    op = getattr(torch.ops.lrkernels, op_name).default
    lib = _NOT_DIFFERENTIABLE_LIB.get("lib")
    if lib is None:
        lib = _NOT_DIFFERENTIABLE_LIB["lib"] = torch.library.Library("lrkernels", "IMPL")

    def autograd_kernel(*args):
        if torch.is_grad_enabled():
            names = schema_arg_names(op)
            wants = [n for n, a in zip(names, args) if isinstance(a, torch.Tensor) and a.requires_grad]
            if wants:
                raise RuntimeError(
                    f"lrkernels.{op_name} is not differentiable, but its input(s) {', '.join(wants)} require grad: {why}")
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    lib.impl(op_name, autograd_kernel, "Autograd")
