"""Autocast rules for the lrkernels ops.

Under ``torch.autocast(device, dtype)`` an op computes in the autocast dtype and returns it, as
``nn.Linear`` does: the named compute arguments (x, the base weight and bias, attention's q/k/v)
are cast to the autocast dtype, adapter tensors are left as they are (the ops take float32
adapters on a float16/bfloat16 base: the mixed-precision rule), and the op then runs with
autocast off. Gradients flow back through the casts into each tensor's own dtype.

torch.library.register_autocast casts every floating input to one fixed dtype; these rules
read the autocast dtype in force at each call and cast only the compute arguments.
"""

import torch

from ._util import schema_arg_names

_DEVICE_TYPES = ("cpu", "cuda")
_LIBS = {}


def _lib():
    lib = _LIBS.get("impl")
    if lib is None:
        lib = _LIBS["impl"] = torch.library.Library("lrkernels", "IMPL")
    return lib


def _cast(value, device_type, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.device.type == device_type \
            and value.dtype != dtype and value.dtype != torch.float64:
        return value.to(dtype)
    return value


def register_autocast(op_name: str, cast_args) -> None:
    """Register the autocast rule of ``torch.ops.lrkernels.<op_name>`` for CPU and CUDA: the
    arguments named in ``cast_args`` (schema names) are cast to the autocast dtype, float64
    tensors excepted (autocast leaves float64 alone, as it does for nn.Linear)."""
    op = getattr(torch.ops.lrkernels, op_name).default
    names = schema_arg_names(op)
    unknown = set(cast_args) - set(names)
    if unknown:
        raise ValueError(f"register_autocast({op_name!r}): no argument(s) {sorted(unknown)} in {names}")
    positions = frozenset(names.index(n) for n in cast_args)

    for device_type in _DEVICE_TYPES:
        if not torch._C._is_autocast_available(device_type):
            continue
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def rule(*args, _device_type=device_type, _key=key):
            dtype = torch.get_autocast_dtype(_device_type)
            args = tuple(_cast(a, _device_type, dtype) if i in positions else a for i, a in enumerate(args))
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*args)

        # the Python dispatcher (tracing, torch.compile) and the C++ dispatcher each need the rule
        if op.has_kernel_for_dispatch_key(key):
            op.py_kernels.pop(key, None)
        op.py_impl(key)(rule)
        _lib().impl(op_name, lambda _keyset, *args, _rule=rule: _rule(*args), key_name, with_keyset=True)
