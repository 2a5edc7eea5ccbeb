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
    """Map an op's inputs (as register_autograd's setup_context receives them: in schema order,
    keyword-only ones included, trailing defaults possibly omitted) to their schema names."""
    args = op._schema.arguments
    assert len(inputs) <= len(args), f"{op}: expected at most {len(args)} inputs, got {len(inputs)}"
    out = dict(zip((a.name for a in args), inputs))
    for a in args[len(inputs):]:
        assert a.has_default_value(), f"{op}: input {a.name} is missing and has no default"
        out[a.name] = a.default_value
    return out


def needs_grad(ctx, op, name: str) -> bool:
    i = schema_arg_names(op).index(name)
    return i < len(ctx.needs_input_grad) and ctx.needs_input_grad[i]


def check_one_device(op_name: str, names, args) -> None:
    """Every tensor argument of ``lrkernels.<op_name>`` on one device, else ValueError naming the
    first argument that is not on the first tensor's device. The C++ kernels check this too,
    but a meta tensor among real ones dispatches to the fake kernel, which must not then
    return shapes as if the call were valid."""
    first = None
    for name, a in zip(names, args):
        tensors = a if isinstance(a, (list, tuple)) else (a,)
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            if first is None:
                first = (name, t.device)
            elif t.device != first[1]:
                raise ValueError(f"lrkernels.{op_name}: {name} is on {t.device} but {first[0]} is on {first[1]}; "
                                 f"all tensors must be on one device")


def register_fake(op_name: str):
    """``torch.library.register_fake("lrkernels::<op_name>")`` for a fake that computes shapes,
    preceded by the one-device check every op makes (:func:`check_one_device`)."""
    op = getattr(torch.ops.lrkernels, op_name).default
    names = schema_arg_names(op)

    def wrap(fake):
        def checked(*args, **kwargs):
            check_one_device(op_name, names, args + tuple(kwargs.values()))
            return fake(*args, **kwargs)

        checked.__name__ = fake.__name__
        checked.__doc__ = fake.__doc__
        torch.library.register_fake(f"lrkernels::{op_name}", checked)
        return fake

    return wrap


def fake_grads(output_mask, like, out_features: int, x):
    """The gradients a backward op's fake returns: for each input in ``like`` (schema order), None
    where ``output_mask`` says it is not wanted, else an empty contiguous tensor shaped and typed
    like that input; a None entry of ``like`` stands for the bias, one value per output feature
    in x's dtype."""
    out = []
    for want, ref in zip(output_mask, like):
        if not want:
            out.append(None)
        elif ref is None:
            out.append(x.new_empty((out_features,)))
        else:
            out.append(torch.empty_like(ref, memory_format=torch.contiguous_format))
    return tuple(out)


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
