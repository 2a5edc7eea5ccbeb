"""Sparse plus low-rank linear (SLTrain, LOST) against a dense trainable nn.Linear (F.linear
with weight and bias trained) and SLTrain's algorithm in eager PyTorch (W rebuilt in forward
and backward, the dense dW formed: lrkernels.reference.sparse_lowrank.sltrain_linear).
Training step = forward + backward with everything trainable (x, A, B, values, bias).

Issue targets: CPU float32, 4096 tokens, 1024→1024, r = 256, density 3%: random support
≤ 0.8× the dense layer and ≤ 0.7× SLTrain's algorithm; columns support (3% of columns)
≤ 0.8× the dense layer; peak memory below both (the step's own allocations: output,
gradients, temporaries; the inputs and parameters are resident before it). H200 bfloat16, 8192 tokens, 4096→4096,
r = 1024, density 5%: ≤ 0.9× the dense layer."""

import math

import torch
import torch.nn.functional as F

from .harness import Case


def _make(T, din, dout, r, density, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(dtype=dtype, device=device)  # noqa: E731
    nnz = int(round(density * din * dout))
    n = int(round(density * din))
    return dict(x=t(T, din), weight=t(dout, din, sc=1 / math.sqrt(din)), bias=t(dout),
                lora_a=t(r, din, sc=1 / math.sqrt(din)), lora_b=t(dout, r, sc=1 / math.sqrt(r)),
                values=t(nnz, sc=1 / math.sqrt(din)), col_values=t(dout, n, sc=1 / math.sqrt(din)),
                indices=torch.randperm(din * dout, generator=g)[:nnz].to(device),
                columns=torch.randperm(din, generator=g)[:n].to(device), gy=t(T, dout))


def _candidates(T, din, dout, r, density, dtype, device, backward, kind):
    def build():
        import lrkernels
        from lrkernels.reference.sparse_lowrank import sltrain_linear

        d = _make(T, din, dout, r, density, dtype, device)
        grad = lambda t: t.clone().requires_grad_(backward)  # noqa: E731
        x, w, bias, a, b = grad(d["x"]), grad(d["weight"]), grad(d["bias"]), grad(d["lora_a"]), grad(d["lora_b"])
        gy, s = d["gy"], 0.25
        if kind == "random":
            v = grad(d["values"])
            sup = lrkernels.sparse_support(dout, din, indices=d["indices"])
        else:
            v = grad(d["col_values"])
            sup = lrkernels.sparse_support(dout, din, columns=d["columns"])

        def step(fn, params):
            # The gradients are dropped at the end of the step, not at its start, so the peak
            # (benchmarks.peak: the high-water mark above the state one warm-up step leaves)
            # counts everything the step allocates: the output, the gradients and the
            # temporaries. Dropped at the start, the steady state would hold the previous
            # step's gradients and every layer would score |y| plus its temporaries, whatever
            # the size of its weight's gradient.
            def run():
                with torch.enable_grad() if backward else torch.no_grad():
                    y = fn()
                    if backward:
                        torch.autograd.backward(y, gy)
                for q in params:
                    q.grad = None
                return y
            return run

        c = {"dense_linear": step(lambda: F.linear(x, w, bias), [x, w, bias]),
             "lrkernels": step(lambda: lrkernels.sparse_lowrank_linear(x, a, b, v, sup, bias, scale=s),
                               [x, a, b, v, bias])}
        if kind == "random":
            c["sltrain_eager"] = step(lambda: sltrain_linear(x, a, b, v, d["indices"], bias, scale=s),
                                      [x, a, b, v, bias])
        return c

    return build


def _flops(T, din, dout, r, nnz, backward):
    """Through the factors: x Aᵀ, h Bᵀ (forward); dyᵀh, dy B, gᵀx, g A (backward); the sparse
    SpMM (forward), SpMM and SDDMM (backward)."""
    lowrank = 2.0 * T * r * (din + dout)
    sparse = 2.0 * T * nnz
    return lowrank + sparse if not backward else 3 * lowrank + 3 * sparse


def _bytes(T, din, dout, r, nnz, dtype, backward):
    e = torch.tensor([], dtype=dtype).element_size()
    fwd = e * (T * din + r * (din + dout) + nnz + T * dout)
    return fwd if not backward else fwd + e * (2 * T * dout + T * din + r * (din + dout) + nnz)


def cases(device: str, quick: bool):
    out = []
    if device == "cpu":
        dtype = torch.float32
        shapes = [(512 if quick else 4096, 1024, 1024, 256, 0.03, "issue target (CPU)")]
        if not quick:
            shapes.append((256, 1024, 1024, 256, 0.03, "small batch"))
            # the tokens curve's middle points (256 and 4096 are the cases above)
            shapes += [(T, 1024, 1024, 256, 0.03, "tokens curve") for T in (1024, 2048)]
    else:
        dtype = torch.bfloat16
        shapes = [(1024 if quick else 8192, 4096, 4096, 1024, 0.05, "issue target (H200)")]
    for T, din, dout, r, density, label in shapes:
        for kind in ("random", "columns"):
            nnz = int(round(density * din * dout)) if kind == "random" else dout * int(round(density * din))
            target = {}
            if device == "cpu" and (T, din, dout, r) == (4096, 1024, 1024, 256):
                target = {"dense_linear": 0.8, "sltrain_eager": 0.7} if kind == "random" else {"dense_linear": 0.8}
            elif device == "cuda" and (T, din, dout, r) == (8192, 4096, 4096, 1024):
                target = {"dense_linear": 0.9}
            baselines = ["dense_linear"] + (["sltrain_eager"] if kind == "random" else [])
            for backward in (True, False):
                if not backward and (kind == "columns" or label == "tokens curve"):
                    continue
                out.append(Case(
                    f"{label} {T}x{din}->{dout} r{r} {kind} {density:g} {str(dtype)[6:]} "
                    f"{'fwd+bwd' if backward else 'fwd'}",
                    _candidates(T, din, dout, r, density, dtype, device, backward, kind), "lrkernels", baselines,
                    _flops(T, din, dout, r, nnz, backward), _bytes(T, din, dout, r, nnz, dtype, backward),
                    target if backward else {},
                    note="everything trainable: grads for x, A, B, values, bias (dense: x, W, b)",
                    family="sparse_lowrank", params={"tokens": T, "in": din, "out": dout, "rank": r,
                                                     "density": density, "support": kind,
                                                     "pass": "fwd+bwd" if backward else "fwd"},
                    headline=label != "tokens curve"))
                if device == "cpu" and backward:
                    out[-1].sweep = "tokens"
    return out
