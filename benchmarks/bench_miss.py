"""Bone / MiSS against the base linear alone (the floor) and PEFT's MiSS layer, for the three
variants (balance = PEFT's default, mini, bat). Training step = forward + backward with the base
weight frozen: gradients for x and the block M.

Issue targets: CPU float32, 4096 tokens, 1024→1024, r = 64: balance and mini ≤ 1.10× the base
linear and faster than PEFT's MiSS; bat ≤ 0.8× PEFT's bat layer in time with a peak memory at
least one (out, in) weight-sized buffer below PEFT's (its floor is ~1.5× the base linear: three
GEMMs instead of two). H200 bfloat16, 8192 tokens, 4096→4096, r = 64: balance ≤ 1.05× the base
linear, bat ≤ 1.6×."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .harness import Case

MINI_R = 64


def _block_shape(variant, din, dout, r):
    return {"balance": (r, dout), "mini": (r, MINI_R), "bat": (dout // r, r, r)}[variant]


def _make(T, din, dout, r, variant, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(dtype=dtype, device=device)  # noqa: E731
    return dict(x=t(T, din), weight=t(dout, din, sc=1 / math.sqrt(din)), bias=t(dout),
                block=t(*_block_shape(variant, din, dout, r), sc=0.02), gy=t(T, dout))


def _peft_model(din, dout, r, variant, w, bias, block, device, dtype):
    import peft

    base = nn.Linear(din, dout, device=device, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(w)
        base.bias.copy_(bias)
    holder = nn.Sequential()
    holder.add_module("proj", base)
    init = {"balance": True, "mini": "mini", "bat": "bat"}[variant]
    cfg = peft.MissConfig(r=r, target_modules=["proj"], init_weights=init, mini_r=MINI_R)
    model = peft.get_peft_model(holder, cfg)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.miss_block["default"].copy_(block.float())  # PEFT keeps its block in fp32
    return model


def _candidates(T, din, dout, r, variant, dtype, device, backward):
    def build():
        import lrkernels

        d = _make(T, din, dout, r, variant, dtype, device)
        x = d["x"].requires_grad_(backward)
        m = d["block"].clone().requires_grad_(backward)
        w, bias, gy = d["weight"], d["bias"], d["gy"]

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

        kv = "bat" if variant == "bat" else "balance"
        c = {
            "base_linear": step(lambda: F.linear(x, w, bias), [x]),
            "lrkernels": step(lambda: lrkernels.miss_linear(x, w, bias, m, variant=kv), [x, m]),
        }
        if variant == "bat" and backward:
            # the floor of any bat training step with W frozen: its three GEMMs alone, bare
            # (y = x W'ᵀ, dx = dy W', G = dyᵀx; here with W for W'), nothing built or contracted
            xd = x.detach()

            def three_gemms():
                y = torch.addmm(bias, xd, w.t())
                torch.mm(gy, w)
                torch.mm(gy.t(), xd)
                return y
            c["three_gemms"] = three_gemms
        try:
            model = _peft_model(din, dout, r, variant, w, bias, m.detach(), device, dtype)
            model.train(backward)
            c["peft_miss"] = step(lambda: model(x), [x] + [q for q in model.parameters() if q.requires_grad])
        except ImportError as e:
            c["peft_miss"] = f"peft not installed ({e})"
        return c

    return build


def _floor(variant):
    """bat's fwd+bwd cases also compare with their three bare GEMMs (the floor)."""
    return ["three_gemms"] if variant == "bat" else []


def _flops(T, din, dout, r, variant, backward):
    gemm = 2.0 * T * din * dout
    if variant == "bat":
        build = 2.0 * dout * din * r                      # W_pq M_p for every block
        fwd = gemm + build
        return fwd if not backward else fwd + gemm + build + gemm + build  # dx, G, dM
    adapter = 2.0 * T * r * dout if variant == "balance" else 2.0 * T * r * MINI_R
    fwd = gemm + T * din
    return fwd if not backward else fwd + gemm + adapter  # dx with W' and dM = Sᵀ dy


def _bytes(T, din, dout, dtype, backward):
    e = torch.tensor([], dtype=dtype).element_size()
    fwd = e * (T * din + din * dout + T * dout)
    return fwd if not backward else fwd + e * (T * dout + din * dout + T * din + T * din)


def cases(device: str, quick: bool):
    out = []
    if device == "cpu":
        dtype = torch.float32
        T, din, dout, r = (512, 1024, 1024, 64) if quick else (4096, 1024, 1024, 64)
        label = f"{'quick' if quick else 'issue target (CPU)'} {T}x{din}->{dout} r{r}"
        targets = {"balance": {"base_linear": 1.10, "peft_miss": 1.0}, "mini": {"base_linear": 1.10, "peft_miss": 1.0},
                   "bat": {"peft_miss": 0.8}}
        for variant in ("balance", "mini", "bat"):
            out.append(Case(f"{label} {variant} fp32 fwd+bwd",
                            _candidates(T, din, dout, r, variant, dtype, device, True), "lrkernels",
                            ["base_linear", "peft_miss"] + _floor(variant), _flops(T, din, dout, r, variant, True),
                            _bytes(T, din, dout, dtype, True), {} if quick else targets[variant],
                            note="whole layer, base weight frozen: grads for x and the block"
                                 + (f" (mini_r = {MINI_R})" if variant == "mini" else "")
                                 + ("; three_gemms = the step's three bare GEMMs (x Wᵀ, dy W, dyᵀx), the floor"
                                    if variant == "bat" else ""),
                            family="miss", params={"tokens": T, "in": din, "out": dout, "r": r,
                                                   "variant": variant, "pass": "fwd+bwd"}))
            out[-1].sweep = "tokens"
        # the tokens curves' other points (balance and bat, fwd+bwd)
        for Tc in (() if quick else (512, 1024, 2048)):
            for variant in ("balance", "bat"):
                c = Case(f"tokens curve {Tc}x{din}->{dout} r{r} {variant} fp32 fwd+bwd",
                         _candidates(Tc, din, dout, r, variant, dtype, device, True), "lrkernels",
                         ["base_linear", "peft_miss"] + _floor(variant), _flops(Tc, din, dout, r, variant, True),
                         _bytes(Tc, din, dout, dtype, True), family="miss", headline=False,
                         params={"tokens": Tc, "in": din, "out": dout, "r": r, "variant": variant,
                                 "pass": "fwd+bwd"})
                c.sweep = "tokens"
                out.append(c)
        for variant in ("balance", "bat"):
            out.append(Case(f"{label} {variant} fp32 fwd", _candidates(T, din, dout, r, variant, dtype, device, False),
                            "lrkernels", ["base_linear", "peft_miss"], _flops(T, din, dout, r, variant, False),
                            _bytes(T, din, dout, dtype, False), family="miss",
                            params={"tokens": T, "in": din, "out": dout, "r": r, "variant": variant,
                                    "pass": "fwd"}))
    else:
        dtype = torch.bfloat16
        T = 1024 if quick else 8192
        din = dout = 4096
        r = 64
        targets = {"balance": {"base_linear": 1.05}, "mini": {}, "bat": {"base_linear": 1.6}}
        for variant in ("balance", "mini", "bat"):
            out.append(Case(f"llama7b {T}x{din}->{dout} r{r} {variant} bf16 fwd+bwd",
                            _candidates(T, din, dout, r, variant, dtype, device, True), "lrkernels",
                            ["base_linear", "peft_miss"] + _floor(variant), _flops(T, din, dout, r, variant, True),
                            _bytes(T, din, dout, dtype, True), targets[variant] if T == 8192 else {},
                            note="whole layer, base weight frozen: grads for x and the block", family="miss",
                            params={"tokens": T, "in": din, "out": dout, "r": r}))
    return out
