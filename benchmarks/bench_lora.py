"""lora_linear against the base linear alone (the floor), the eager PyTorch formula, and
PEFT's LoRA layer. Training step = forward + backward with the base weight frozen (LoRA's
setting): gradients for x, lora_a and lora_b."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .harness import Case


def _make(T, din, dout, r, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(dtype=dtype, device=device)  # noqa: E731
    return dict(x=t(T, din), weight=t(dout, din, sc=1 / math.sqrt(din)), bias=t(dout),
                lora_a=t(r, din, sc=1 / math.sqrt(din)), lora_b=t(dout, r, sc=1 / math.sqrt(r)), gy=t(T, dout))


def aten_path(fn):
    """fn run on lrkernels' ATen-composition CPU path (the blocked at::vec kernels off): shows
    what the blocked kernels add, whatever instruction set they run with."""
    def run():
        import lrkernels

        with lrkernels.use_cpu_kernels("aten"):
            return fn()
    return run


def _candidates(T, din, dout, r, p, dtype, device, backward):
    def build():
        import lrkernels

        d = _make(T, din, dout, r, dtype, device)
        x = d["x"].requires_grad_(backward)
        # On a 16-bit base the adapters are float32, as PEFT keeps them (autocast_adapter_dtype)
        adt = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
        la = d["lora_a"].to(adt).requires_grad_(backward)
        lb = d["lora_b"].to(adt).requires_grad_(backward)
        w, b, gy = d["weight"], d["bias"], d["gy"]
        scale = 2.0

        def step(fn, params):
            def run():
                for q in params:
                    q.grad = None
                y = fn()
                if backward:
                    torch.autograd.backward(y, gy)
                return y
            return run

        ctx = torch.enable_grad() if backward else torch.no_grad()

        def wrap(fn):
            def run():
                with ctx:
                    return fn()
            return run

        c = {
            "base_linear": wrap(step(lambda: F.linear(x, w, b), [x])),
            "eager_formula": wrap(step(lambda: F.linear(x, w, b) + (scale * F.linear(
                F.linear(F.dropout(x, p, training=p > 0).to(adt), la), lb)).to(dtype), [x, la, lb])),
            "lrkernels": wrap(step(lambda: lrkernels.lora_linear(x, w, b, la, lb, scale=scale, dropout_p=p),
                                   [x, la, lb])),
        }
        if device == "cpu":
            # the same op without its blocked kernels, for the record
            c["lrkernels_aten"] = aten_path(c["lrkernels"])
        try:
            import peft

            base = nn.Linear(din, dout, device=device, dtype=dtype)
            with torch.no_grad():
                base.weight.copy_(w)
                base.bias.copy_(b)
            holder = nn.Sequential()
            holder.add_module("proj", base)
            model = peft.get_peft_model(holder, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"],
                                                                lora_dropout=p))
            model.train(backward)
            layer = model.base_model.model.proj
            with torch.no_grad():
                layer.lora_A["default"].weight.copy_(la)
                layer.lora_B["default"].weight.copy_(lb)
            c["peft_lora"] = wrap(step(lambda: model(x), [x] + [q for q in model.parameters() if q.requires_grad]))
        except ImportError as e:
            c["peft_lora"] = f"peft not installed ({e})"
        return c

    return build


def _flops(T, din, dout, r, backward):
    base = 2 * T * din * dout * (2 if backward else 1)  # x Wᵀ (+ dy W)
    low = 2 * T * r * (din + dout) * (3 if backward else 1)
    return base + low


def _bytes(T, din, dout, r, dtype, backward):
    e = torch.tensor([], dtype=dtype).element_size()
    fwd = (T * din + din * dout + T * dout) * e
    bwd = (T * dout + din * dout + 2 * T * din) * e if backward else 0  # read dy, W, x; write dx
    return fwd + bwd


def cases(device, quick):
    out = []
    if device == "cpu":
        shapes = [("issue target", 4096, 1024, 1024, 16, 0.1, torch.float32)]
        if not quick:
            shapes.append(("rank 64", 4096, 1024, 1024, 64, 0.1, torch.float32))
            # bf16 activations and base weight, float32 adapters (PEFT's default)
            shapes.append(("bf16", 4096, 1024, 1024, 16, 0.1, torch.bfloat16))
        for label, T, din, dout, r, p, dtype in shapes:
            for backward in (True, False):
                pp = p if backward else 0.0
                dname = "fp32" if dtype == torch.float32 else "bf16"
                name = (f"{label}: {T} tok {din}->{dout} r{r} p{pp} {dname} "
                        f"{'fwd+bwd' if backward else 'fwd (inference)'}")
                targets = ({"base_linear": 1.10, "peft_lora": 0.85}
                           if (label in ("issue target", "bf16") and backward) else {})
                out.append(Case(name, _candidates(T, din, dout, r, pp, dtype, device, backward), "lrkernels",
                                ["base_linear", "eager_formula", "peft_lora", "lrkernels_aten"],
                                flops=_flops(T, din, dout, r, backward),
                                bytes=_bytes(T, din, dout, r, dtype, backward), targets=targets))
                _curve_point(out[-1], label, T, r, dname, backward)
        out += _cpu_sweep_cases(quick)
    else:
        shapes = [("issue target (LLaMA-7B q_proj)", 8192, 4096, 4096, 16, 0.1)]
        if not quick:
            shapes += [("LLaMA-7B up_proj", 8192, 4096, 11008, 16, 0.1),
                       ("LLaMA-7B down_proj", 8192, 11008, 4096, 16, 0.1),
                       ("Mistral-7B k_proj r64", 8192, 4096, 1024, 64, 0.1)]
        for label, T, din, dout, r, p in shapes:
            for backward in (True, False):
                pp = p if backward else 0.0
                name = (f"{label}: {T} tok {din}->{dout} r{r} p{pp} bf16 "
                        f"{'fwd+bwd' if backward else 'fwd (inference)'}")
                targets = {"base_linear": 1.08} if (label.startswith("issue target") and backward) else {}
                out.append(Case(name, _candidates(T, din, dout, r, pp, torch.bfloat16, device, backward),
                                "lrkernels", ["base_linear", "eager_formula", "peft_lora"],
                                flops=_flops(T, din, dout, r, backward),
                                bytes=_bytes(T, din, dout, r, torch.bfloat16, backward), targets=targets))
    return out


# ------------------------------------------------------------------ scaling curves (CPU)

def _curve_point(case, label, T, r, dname, backward):
    """Puts a named case on the tokens / rank curves of its dtype and direction."""
    case.params = {"tokens": T, "rank": r, "dtype": dname, "pass": "fwd+bwd" if backward else "fwd"}
    if dname == "fp32" and backward:
        case.sweep = "tokens,rank" if label == "issue target" else "rank"


def _cpu_sweep_cases(quick):
    """The extra points of the curves: tokens at r 16 and ranks at 4096 tokens, 1024->1024 fp32
    fwd+bwd p 0.1; the named cases above are the curves' other points."""
    din = dout = 1024
    points = [("tokens", T, 16) for T in ((1024,) if quick else (512, 1024, 2048))]
    if not quick:
        points += [("rank", 4096, 4), ("rank", 4096, 128)]
    out = []
    for sweep, T, r in points:
        c = Case(f"{sweep} curve: {T} tok {din}->{dout} r{r} p0.1 fp32 fwd+bwd",
                 _candidates(T, din, dout, r, 0.1, torch.float32, "cpu", True), "lrkernels",
                 ["base_linear", "eager_formula", "peft_lora", "lrkernels_aten"],
                 flops=_flops(T, din, dout, r, True), bytes=_bytes(T, din, dout, r, torch.float32, True),
                 headline=False)
        _curve_point(c, "", T, r, "fp32", True)
        c.sweep = sweep
        out.append(c)
    return out
