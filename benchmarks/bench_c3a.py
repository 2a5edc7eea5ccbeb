"""C³A (block-circulant adapter through FFTs) against the base linear alone (the floor), PEFT's
C3A layer, and the eager dense formula (ΔW built, then a GEMM). Training step = forward +
backward with the base weight frozen (C³A's setting): gradients for x and the kernel.

Issue targets: CPU float32, 4096 tokens, 1024→1024, b = 256, whole layer ≤ 1.3× the base
linear; H200 bfloat16, 8192 tokens, 4096→4096, b = 256, whole layer ≤ 1.15× the base linear
and the adapter term alone ≥ 5× faster than PEFT's."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .harness import Case


def _make(T, din, dout, b, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(dtype=dtype, device=device)  # noqa: E731
    return dict(x=t(T, din), weight=t(dout, din, sc=1 / math.sqrt(din)), bias=t(dout),
                kernel=t(dout // b, din // b, b, sc=math.sqrt(2.0 / (din + dout))), gy=t(T, dout))


def _dense_delta(kernel):
    n_out, n_in, b = kernel.shape
    i = torch.arange(b, device=kernel.device)
    idx = (i.view(1, b) - i.view(b, 1)) % b
    return kernel[:, :, idx].permute(0, 2, 1, 3).reshape(n_out * b, n_in * b)


def _peft_layer(din, dout, b, w, bias, kernel, device, dtype):
    import peft

    base = nn.Linear(din, dout, device=device, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(w)
        base.bias.copy_(bias)
    holder = nn.Sequential()
    holder.add_module("proj", base)
    model = peft.get_peft_model(holder, peft.C3AConfig(block_size=b, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.c3a_kernel["default"].copy_(kernel.float())  # PEFT keeps its kernel in fp32
    return model, layer


def _candidates(T, din, dout, b, dtype, device, backward, adapter_only=False):
    def build():
        import lrkernels

        d = _make(T, din, dout, b, dtype, device)
        x = d["x"].requires_grad_(backward)
        k = d["kernel"].clone().requires_grad_(backward)
        w, bias, gy = d["weight"], d["bias"], d["gy"]
        s = 1.0 / din

        def step(fn, params):
            def run():
                for q in params:
                    q.grad = None
                with torch.enable_grad() if backward else torch.no_grad():
                    y = fn()
                    if backward:
                        torch.autograd.backward(y, gy)
                return y
            return run

        if adapter_only:
            c = {"lrkernels": step(lambda: lrkernels.c3a(x, k, scale=s), [x, k])}
            try:
                from peft.tuners.c3a.utils import BlockCircularConvolution

                k32 = k.detach().float().requires_grad_(backward)
                # PEFT's adapter path as its layer runs it: x in fp32, its own autograd Function.
                c["peft_c3a"] = step(lambda: (BlockCircularConvolution.apply(x.float(), k32) / din).to(dtype),
                                     [x, k32])
            except ImportError as e:
                c["peft_c3a"] = f"peft not installed ({e})"
            return c

        c = {
            "base_linear": step(lambda: F.linear(x, w, bias), [x]),
            "eager_dense": step(lambda: F.linear(x, w + s * _dense_delta(k), bias), [x, k]),
            "lrkernels": step(lambda: lrkernels.c3a_linear(x, w, bias, k, scale=s), [x, k]),
        }
        try:
            model, layer = _peft_layer(din, dout, b, w, bias, k.detach(), device, dtype)
            model.train(backward)
            c["peft_c3a"] = step(lambda: model(x), [x] + [q for q in model.parameters() if q.requires_grad])
        except ImportError as e:
            c["peft_c3a"] = f"peft not installed ({e})"
        return c

    return build


def _flops(T, din, dout, b, backward, base=True):
    """Base GEMMs plus the adapter's FFTs (~2.5·n·log2 n per real transform of length n) and its
    block contraction (8 flops per complex MAC)."""
    F_ = b // 2 + 1
    gemm = 2.0 * T * din * dout if base else 0.0
    fft = lambda rows: 2.5 * rows * b * max(math.log2(b), 1.0)  # noqa: E731
    contract = 8.0 * T * (din // b) * (dout // b) * F_
    fwd = gemm + fft(T * din // b) + contract + fft(T * dout // b)
    if not backward:
        return fwd
    # dx: GEMM + rfft(dy) + contraction + irfft; dK: rfft(x) + reduction
    bwd = gemm + fft(T * dout // b) + contract + fft(T * din // b) + fft(T * din // b) + contract
    return fwd + bwd


def _bytes(T, din, dout, dtype, backward):
    e = torch.tensor([], dtype=dtype).element_size()
    fwd = e * (T * din + din * dout + T * dout)
    return fwd if not backward else fwd + e * (T * dout + din * dout + T * din + T * din)


def cases(device: str, quick: bool):
    out = []
    if device == "cpu":
        dtype = torch.float32
        shapes = [(4096, 1024, 1024, 256, "issue target (CPU) 4096x1024->1024 b256")]
        if quick:
            shapes = [(512, 1024, 1024, 256, "quick 512x1024->1024 b256")]
        else:
            shapes.append((1024, 4096, 4096, 256, "llama7b-q 1024x4096->4096 b256"))
            shapes.append((4096, 1024, 1024, 64, "4096x1024->1024 b64"))
        for T, din, dout, b, label in shapes:
            targets = {"base_linear": 1.3} if (T, din, dout, b) == (4096, 1024, 1024, 256) else {}
            out.append(Case(f"{label} fp32 fwd+bwd", _candidates(T, din, dout, b, dtype, device, True),
                            "lrkernels", ["base_linear", "peft_c3a", "eager_dense"], _flops(T, din, dout, b, True),
                            _bytes(T, din, dout, dtype, True), targets,
                            note="whole layer, base weight frozen: grads for x and the kernel"))
        for c, (T, din, dout, b, _) in zip(out, shapes):  # block-size curve at 4096 tok 1024->1024
            c.params = {"tokens": T, "in": din, "out": dout, "block size": b}
            c.sweep = "block size" if (T, din, dout) == (4096, 1024, 1024) else ""
        if not quick:
            c = Case("block size curve: 4096x1024->1024 b128 fp32 fwd+bwd",
                     _candidates(4096, 1024, 1024, 128, dtype, device, True), "lrkernels",
                     ["base_linear", "peft_c3a", "eager_dense"], _flops(4096, 1024, 1024, 128, True),
                     _bytes(4096, 1024, 1024, dtype, True), {}, note="whole layer, base weight frozen",
                     params={"tokens": 4096, "in": 1024, "out": 1024, "block size": 128}, sweep="block size",
                     headline=False)
            out.append(c)
        T, din, dout, b = shapes[0][:4]
        out.append(Case(f"{shapes[0][4]} fp32 fwd", _candidates(T, din, dout, b, dtype, device, False),
                        "lrkernels", ["base_linear", "peft_c3a", "eager_dense"], _flops(T, din, dout, b, False),
                        _bytes(T, din, dout, dtype, False)))
    else:
        dtype = torch.bfloat16
        T = 1024 if quick else 8192
        for din, dout, b, label in [(4096, 4096, 256, "llama7b 4096->4096 b256"), (4096, 11008, 64, "llama7b-up 4096->11008 b64")]:
            if quick and din != dout:
                continue
            target = {"base_linear": 1.15} if (din, dout, b) == (4096, 4096, 256) and T == 8192 else {}
            out.append(Case(f"{label} {T} tok bf16 fwd+bwd", _candidates(T, din, dout, b, dtype, device, True),
                            "lrkernels", ["base_linear", "peft_c3a", "eager_dense"], _flops(T, din, dout, b, True),
                            _bytes(T, din, dout, dtype, True), target,
                            note="whole layer, base weight frozen: grads for x and the kernel"))
        din, dout, b = 4096, 4096, 256
        for backward in (False, True):
            out.append(Case(f"adapter term alone {T}x{din}->{dout} b{b} bf16 {'fwd+bwd' if backward else 'fwd'}",
                            _candidates(T, din, dout, b, dtype, device, backward, adapter_only=True),
                            "lrkernels", ["peft_c3a"], _flops(T, din, dout, b, backward, base=False),
                            _bytes(T, din, dout, dtype, backward), {"peft_c3a": 0.2} if T == 8192 else {},
                            note="s · x ΔWᵀ only; target: ≥ 5× faster than PEFT's (ratio ≤ 0.2)"))
    return out
