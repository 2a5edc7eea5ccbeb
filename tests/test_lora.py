"""lora_linear: correctness against the float64 oracle, gradients, dropout, opcheck,
torch.compile, PEFT equivalence, bad inputs, LoRALinear, and the CUDA kernels."""

import math

import pytest
import torch
from torch import nn

import lrkernels
from lrkernels.ops._util import seed_tensor
from lrkernels.reference import lora as ref
from lrkernels.reference.philox import dropout_mask as ref_dropout_mask, philox4x32_10

from conftest import abs_inputs, assert_close_to_oracle, cpu_dtypes, cuda_dtypes

OP = torch.ops.lrkernels.lora_linear.default
BWD = torch.ops.lrkernels.lora_linear_backward.default


def make_inputs(T, din, dout, r, dtype, device="cpu", *, bias=True, g=False, o=False, lead=None, requires_grad=False):
    shape = (T, din) if lead is None else (*lead, din)
    t = lambda *s, sc=1.0: (torch.randn(*s, dtype=torch.float64) * sc).to(dtype=dtype, device=device)  # noqa: E731
    args = dict(
        x=t(*shape),
        weight=t(dout, din, sc=1 / math.sqrt(max(din, 1))),
        bias=t(dout) if bias else None,
        lora_a=t(r, din, sc=1 / math.sqrt(max(din, 1))),
        lora_b=t(dout, r, sc=1 / math.sqrt(r)),
        rank_scale=t(r) if g else None,
        out_scale=t(dout) if o else None,
    )
    if requires_grad:
        for v in args.values():
            if v is not None:
                v.requires_grad_(True)
    return args


def run_op(a, scale, p, seed):
    seed_t = seed_tensor(seed, a["x"].device) if p > 0 else None
    y, hidden = OP(a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], scale, a["rank_scale"],
                   a["out_scale"], p, seed_t)
    return y, hidden


def oracle(a, scale, p, seed, dtype=torch.float64):
    return ref.lora_linear(a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], scale=scale,
                           rank_scale=a["rank_scale"], out_scale=a["out_scale"], dropout_p=p, seed=seed,
                           dtype=dtype)


# ---------------------------------------------------------------------------- Philox / dropout

def test_philox_known_answers():
    # Random123's published known-answer vectors for philox4x32-10.
    out = philox4x32_10(0, 0, 0, 0, 0, 0)
    assert [int(v) for v in out] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    f = 0xFFFFFFFF
    out = philox4x32_10(f, f, f, f, f, f)
    assert [int(v) for v in out] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 8), (5, 13), (17, 70), (3, 129), (2, 300)])
@pytest.mark.parametrize("seed", [0, 1234567, 2**63 + 5])
def test_dropout_mask_matches_reference(rows, cols, seed, cpu_kernels):
    # cols >= 128 covers the 16-group batches (hand-vectorised on AVX-512) and their tails
    got = lrkernels.dropout_mask(rows, cols, 0.3, seed, dtype=torch.float64)
    want = ref_dropout_mask(seed, rows, cols, 0.3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate_and_mean(p):
    m = lrkernels.dropout_mask(512, 512, p, 42, dtype=torch.float64)
    keep = (m > 0).double().mean().item()
    n = m.numel()
    assert abs(keep - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    assert abs(m.mean().item() - 1.0) < 5 * math.sqrt(p / (1 - p) / n)  # inverted dropout is unbiased


def test_dropout_mask_differs_across_seeds_and_rows():
    a = lrkernels.dropout_mask(4, 64, 0.5, 1)
    b = lrkernels.dropout_mask(4, 64, 0.5, 2)
    assert not torch.equal(a, b)
    assert not torch.equal(a[0], a[1])


# ---------------------------------------------------------------------------- forward / backward

SHAPES = [  # (T, in, out, r)
    (0, 16, 8, 4),
    (1, 1, 1, 1),
    (7, 13, 17, 3),
    (33, 64, 65, 16),
    (40, 100, 48, 19),
]


@pytest.mark.parametrize("dtype", cpu_dtypes())
@pytest.mark.parametrize("T,din,dout,r", SHAPES)
@pytest.mark.parametrize("variant", ["plain", "gates+dropout", "nobias"])
def test_forward_matches_oracle(dtype, T, din, dout, r, variant, cpu_kernels, cpu_capability):
    if cpu_kernels == "blocked" and dtype == torch.float64:
        pytest.skip("the blocked kernels take float32 and bfloat16; float64 runs the ATen path")
    g = o = variant == "gates+dropout"
    p = 0.25 if variant == "gates+dropout" else 0.0
    a = make_inputs(T, din, dout, r, dtype, bias=variant != "nobias", g=g, o=o)
    y, hidden = run_op(a, 0.7, p, seed=99)
    assert y.dtype == dtype and y.shape == (T, dout)
    assert hidden.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to_oracle(y, oracle(a, 0.7, p, 99), oracle(a, 0.7, p, 99, dtype=dtype).to(dtype))


@pytest.mark.parametrize("dtype", cpu_dtypes())
@pytest.mark.parametrize("T,din,dout,r", SHAPES[1:])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_backward_matches_oracle(dtype, T, din, dout, r, p, cpu_kernels, cpu_capability):
    if cpu_kernels == "blocked" and dtype == torch.float64:
        pytest.skip("the blocked kernels take float32 and bfloat16; float64 runs the ATen path")
    a = make_inputs(T, din, dout, r, dtype, g=True, o=True, requires_grad=True)
    y, _ = run_op(a, 1.3, p, seed=5)
    gy = torch.randn_like(y)
    names = [k for k, v in a.items() if v is not None]
    grads = torch.autograd.grad(y, [a[k] for k in names], gy)
    # float64 oracle gradients and the same formula in the low precision
    leaf64 = {k: (v.detach().double().requires_grad_(True) if v is not None else None) for k, v in a.items()}
    y64 = oracle(leaf64, 1.3, p, 5)
    g64 = torch.autograd.grad(y64, [leaf64[k] for k in names], gy.double())
    leafl = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in a.items()}
    yl = oracle(leafl, 1.3, p, 5, dtype=dtype)
    gl = torch.autograd.grad(yl, [leafl[k] for k in names], gy.to(dtype))
    for k, got, want, low in zip(names, grads, g64, gl):
        assert got.dtype == dtype and got.shape == a[k].shape, k
        assert_close_to_oracle(got, want, low, name=f"grad {k}")


def test_many_row_blocks_with_dropout_and_grad(cpu_kernels):
    """Enough rows for the CPU kernel to split the dropout pass across threads, with every
    input requiring grad (nested ATen calls on worker threads must stay below autograd)."""
    a = make_inputs(300, 40, 24, 5, torch.float32, g=True, o=True, requires_grad=True)
    with torch.enable_grad():
        y, _ = run_op(a, 0.6, 0.2, seed=13)
        names = [k for k, v in a.items() if v is not None]
        grads = torch.autograd.grad(y.sum(), [a[k] for k in names])
    leaf64 = {k: (v.detach().double().requires_grad_(True) if v is not None else None) for k, v in a.items()}
    y64 = oracle(leaf64, 0.6, 0.2, 13)
    g64 = torch.autograd.grad(y64.sum(), [leaf64[k] for k in names])
    torch.testing.assert_close(y.double(), y64, rtol=1e-4, atol=1e-4)
    for k, got, want in zip(names, grads, g64):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=f"grad {k}")


def test_leading_dims_and_noncontiguous_input(cpu_kernels):
    a = make_inputs(0, 24, 10, 4, torch.float32, lead=(3, 5))
    base = torch.randn(24, 5, 3).permute(2, 1, 0)  # (3, 5, 24), non-contiguous
    a["x"] = base
    y, hidden = run_op(a, 0.5, 0.2, seed=11)
    assert y.shape == (3, 5, 10) and hidden.shape == (3, 5, 4)
    want = oracle({**a, "x": base.contiguous()}, 0.5, 0.2, 11)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


def test_grad_only_where_needed(cpu_kernels):
    a = make_inputs(6, 8, 5, 2, torch.float32, requires_grad=True)
    a["weight"].requires_grad_(False)
    a["bias"].requires_grad_(False)
    a["x"].requires_grad_(False)
    y, _ = run_op(a, 1.0, 0.0, 0)
    y.sum().backward()
    assert a["weight"].grad is None and a["x"].grad is None and a["bias"].grad is None
    assert a["lora_a"].grad is not None and a["lora_b"].grad is not None


FUSED_CASES = [  # (T, in, out, r, p, gates, out_scale, bias): tails in every dimension, ranks 1..256
    (1, 1, 1, 1, 0.0, False, False, True),
    (37, 45, 29, 3, 0.3, True, True, True),
    (100, 64, 80, 16, 0.1, False, False, False),
    (64, 130, 17, 33, 0.5, True, False, True),
    (300, 257, 96, 16, 0.1, False, True, True),
    (9, 17, 300, 256, 0.2, True, True, False),
]


@pytest.mark.parametrize("T,din,dout,r,p,g,o,bias", FUSED_CASES)
@pytest.mark.parametrize("needs", ["all", "x only", "lora only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cpu_kernels_match_portable(T, din, dout, r, p, g, o, bias, needs, dtype, cpu_capability):
    """The blocked path (at::vec, each instruction set) against the ATen one on the same inputs and seed: outputs and every
    gradient agree to float32 rounding (bfloat16: to a few bfloat16 ulps, the two paths round
    at different points), so the dropout masks are the same, whichever subset of gradients is
    asked for."""
    def run(mode):
        with lrkernels.use_cpu_kernels(mode):
            torch.manual_seed(3)
            a = make_inputs(T, din, dout, r, dtype, bias=bias, g=g, o=o, requires_grad=True)
            a["weight"].requires_grad_(False)
            if needs == "x only":
                for k in ("lora_a", "lora_b", "rank_scale", "out_scale", "bias"):
                    if a[k] is not None:
                        a[k].requires_grad_(False)
            if needs == "lora only":
                a["x"].requires_grad_(False)
            y, hidden = run_op(a, 1.7, p, seed=21)
            names = [k for k, v in a.items() if v is not None and v.requires_grad]
            grads = torch.autograd.grad(y, [a[k] for k in names], torch.randn_like(y))
            return [y, hidden, *grads], names

    fused, names = run("blocked")
    portable, _ = run("aten")
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for name, u, v in zip(["y", "hidden", *names], fused, portable):
        assert u.dtype == v.dtype, name
        torch.testing.assert_close(u.float(), v.float(), rtol=tol, atol=tol * max(1.0, v.abs().max().item()),
                                   msg=name)


@pytest.mark.skipif(lrkernels.get_cpu_capability() == "default",
                    reason="without a vectorised instruction set auto keeps to the ATen path")
def test_auto_cpu_kernels_take_the_fused_path_at_scale():
    """At 128 rows per thread "auto" runs the blocked kernels: bitwise the same as "blocked"."""
    T = 128 * torch.get_num_threads()
    a = make_inputs(T, 64, 48, 8, torch.float32)
    outs = {}
    for mode in ("auto", "blocked", "aten"):
        with lrkernels.use_cpu_kernels(mode):
            outs[mode] = run_op(a, 0.9, 0.2, seed=4)[0]
    assert torch.equal(outs["auto"], outs["blocked"])
    torch.testing.assert_close(outs["auto"], outs["aten"], rtol=1e-5, atol=1e-5)


def test_use_cpu_kernels_restores_the_previous_mode():
    with pytest.raises(RuntimeError, match="inside"):
        with lrkernels.use_cpu_kernels("aten"):
            assert lrkernels.get_cpu_kernels() == "aten"
            raise RuntimeError("inside")
    assert lrkernels.get_cpu_kernels() == "auto"


def test_set_cpu_kernels_rejects_unknown_modes():
    with pytest.raises(ValueError, match="mode must be one of"):
        lrkernels.set_cpu_kernels("fast")
    assert lrkernels.get_cpu_kernels() == "auto"


def test_backward_op_output_mask():
    a = make_inputs(5, 6, 7, 3, torch.float64, g=True, o=True)
    y, hidden = run_op(a, 1.0, 0.0, 0)
    out = BWD(torch.ones_like(y), a["x"], a["weight"], a["lora_a"], a["lora_b"], hidden, 1.0,
              a["rank_scale"], a["out_scale"], 0.0, None, [False, True, False, False, True, False, True])
    assert [t is not None for t in out] == [False, True, False, False, True, False, True]


def test_gradcheck_float64_with_dropout():
    a = make_inputs(4, 9, 6, 3, torch.float64, g=True, o=True, requires_grad=True)
    seed = seed_tensor(77, "cpu")

    def f(x, w, b, la, lb, g, o):
        return OP(x, w, b, la, lb, 0.8, g, o, 0.3, seed)[0]

    assert torch.autograd.gradcheck(f, tuple(a[k] for k in ("x", "weight", "bias", "lora_a", "lora_b",
                                                              "rank_scale", "out_scale")))


def test_same_seed_same_output_and_backward_uses_forward_mask():
    a = make_inputs(16, 32, 8, 4, torch.float64, requires_grad=True)
    y1, _ = run_op(a, 1.0, 0.5, 3)
    y2, _ = run_op(a, 1.0, 0.5, 3)
    y3, _ = run_op(a, 1.0, 0.5, 4)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    assert not torch.allclose(y1, y3)
    # dA = s·(dy B)ᵀ drop(x): with dy = 1 the zero pattern of drop(x) shows in dA's projection.
    (ga,) = torch.autograd.grad(y1.sum(), [a["lora_a"]])
    mask = ref_dropout_mask(3, 16, 32, 0.5)
    dh = torch.ones(16, 8, dtype=torch.float64) @ a["lora_b"].detach()
    torch.testing.assert_close(ga, dh.T @ (a["x"].detach() * mask))


def test_public_wrapper_and_generator():
    a = make_inputs(8, 16, 12, 4, torch.float32)
    y = lrkernels.lora_linear(a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], scale=2.0)
    torch.testing.assert_close(y.double(), oracle(a, 2.0, 0.0, 0), rtol=1e-5, atol=1e-5)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    y1 = lrkernels.lora_linear(a["x"], a["weight"], None, a["lora_a"], a["lora_b"], dropout_p=0.5, generator=g1)
    y2 = lrkernels.lora_linear(a["x"], a["weight"], None, a["lora_a"], a["lora_b"], dropout_p=0.5, generator=g2)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


# ---------------------------------------------------------------------------- mixed precision

ADAPTER_KEYS = ("lora_a", "lora_b", "rank_scale", "out_scale")


def mixed_inputs(T, din, dout, r, dtype, *, bias=True, g=True, o=True, requires_grad=False):
    """x, weight, bias in `dtype` (bfloat16), the adapter tensors in float32: PEFT's default."""
    a = make_inputs(T, din, dout, r, torch.float32, bias=bias, g=g, o=o)
    a = {k: (None if v is None else v.to(torch.float32 if k in ADAPTER_KEYS else dtype)) for k, v in a.items()}
    if requires_grad:
        for v in a.values():
            if v is not None:
                v.requires_grad_(True)
    return a


def mixed_low_prec(a, scale, p, seed):
    """What PEFT computes on a low-precision base with float32 adapters: the base layer in x's
    dtype, the adapter path in float32 on x cast to float32, the sum rounded to x's dtype.
    Differentiable, so its gradients are the low-precision references of the gradient bounds."""
    dtype = a["x"].dtype
    base = torch.nn.functional.linear(a["x"], a["weight"], a["bias"])
    adapter = oracle({**a, "x": a["x"].float(), "weight": torch.zeros_like(a["weight"], dtype=torch.float32),
                      "bias": None}, scale, p, seed, dtype=torch.float32)
    return (base.float() + adapter).to(dtype)


@pytest.mark.parametrize("T,din,dout,r", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("variant", ["plain", "gates", "nobias"])
def test_mixed_precision_forward_matches_oracle(T, din, dout, r, p, variant, cpu_kernels, cpu_capability):
    """bf16 activations and base weight with float32 adapters: output in bf16, hidden in float32,
    within twice the error of PEFT's own mixed-precision arithmetic (per element)."""
    a = mixed_inputs(T, din, dout, r, torch.bfloat16, bias=variant != "nobias", g=variant == "gates",
                     o=variant == "gates")
    y, hidden = run_op(a, 0.7, p, seed=99)
    assert y.dtype == torch.bfloat16 and hidden.dtype == torch.float32 and y.shape == (T, dout)
    mag = oracle(abs_inputs(a), 0.7, p, 99)
    assert_close_to_oracle(y, oracle(a, 0.7, p, 99), mixed_low_prec(a, 0.7, p, 99), mag=mag)
    # hidden is float32 arithmetic on exact float32 copies of the bf16 x
    xd = a["x"].double() * (ref_dropout_mask(99, T, din, p) if p > 0 else 1.0)
    h64 = xd @ a["lora_a"].double().T
    assert_close_to_oracle(hidden, h64, (xd.float() @ a["lora_a"].T).double(), name="hidden",
                           mag=xd.abs() @ a["lora_a"].double().abs().T)


@pytest.mark.parametrize("T,din,dout,r", SHAPES[1:])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_mixed_precision_backward_matches_oracle(T, din, dout, r, p, cpu_kernels, cpu_capability):
    """Each gradient in its own parameter's dtype (x, weight, bias: bf16; A, B, g, o: float32),
    within twice the error of PEFT's mixed-precision arithmetic, element by element."""
    a = mixed_inputs(T, din, dout, r, torch.bfloat16, requires_grad=True)
    y, _ = run_op(a, 1.3, p, seed=5)
    gy = torch.randn_like(y)
    names = [k for k, v in a.items() if v is not None]
    grads = torch.autograd.grad(y, [a[k] for k in names], gy)
    leaf64 = {k: (v.detach().double().requires_grad_(True) if v is not None else None) for k, v in a.items()}
    g64 = torch.autograd.grad(oracle(leaf64, 1.3, p, 5), [leaf64[k] for k in names], gy.double())
    leafl = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in a.items()}
    gl = torch.autograd.grad(mixed_low_prec(leafl, 1.3, p, 5), [leafl[k] for k in names], gy)
    # magnitudes: the gradient formulas on absolute values (|dy|, |x|, every factor)
    leafm = {k: (v.detach().abs().double().requires_grad_(True) if v is not None else None) for k, v in a.items()}
    gm = torch.autograd.grad(oracle(leafm, 1.3, p, 5), [leafm[k] for k in names], gy.abs().double())
    for k, got, want, low, mag in zip(names, grads, g64, gl, gm):
        assert got.dtype == a[k].dtype and got.shape == a[k].shape, k
        assert_close_to_oracle(got, want, low, name=f"grad {k}", mag=mag)


@pytest.mark.parametrize("x_dtype,adapter_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float64),
                                                   (torch.float64, torch.float32)])
def test_mixed_precision_rejects_other_adapter_dtypes(x_dtype, adapter_dtype):
    a = make_inputs(6, 16, 12, 4, x_dtype, g=True, o=True)
    for k in ADAPTER_KEYS:
        b = dict(a)
        b[k] = a[k].to(adapter_dtype)
        with pytest.raises(TypeError, match=f"{k} has dtype"):
            run_op(b, 1.0, 0.0, 0)


def test_mixed_precision_opcheck():
    a = mixed_inputs(5, 12, 7, 3, torch.bfloat16, requires_grad=True)
    seed = seed_tensor(1, "cpu")
    args = (a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], 0.5, a["rank_scale"], a["out_scale"], 0.2, seed)
    torch.library.opcheck(OP, args)
    y, hidden = OP(*args)
    torch.library.opcheck(BWD, (torch.randn_like(y), a["x"].detach(), a["weight"].detach(), a["lora_a"].detach(),
                                a["lora_b"].detach(), hidden, 0.5, a["rank_scale"].detach(),
                                a["out_scale"].detach(), 0.2, seed, [True] * 7))


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_mode_and_no_grad(mode, dtype, cpu_kernels):
    """Calls under torch.inference_mode() / torch.no_grad(), with enough rows for every parallel
    region to run on worker threads, give the same output as a plain call."""
    a = make_inputs(300, 40, 24, 5, dtype, g=True, o=True)
    want = run_op(a, 0.6, 0.2, seed=13)
    ctx = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with ctx:
        got = run_op(a, 0.6, 0.2, seed=13)
        y = lrkernels.lora_linear(a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], dropout_p=0.1)
    assert y.shape == (300, 24)
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_autocast_bfloat16_computes_and_returns_bfloat16():
    """Under torch.autocast("cpu", bfloat16) x and the base layer compute in bfloat16 (as nn.Linear
    does) and y is bfloat16; the float32 adapters stay float32 and get float32 gradients: the same
    as calling the op on the bfloat16 casts by hand."""
    a = make_inputs(20, 48, 24, 4, torch.float32, g=True, o=True, requires_grad=True)
    seed = seed_tensor(3, "cpu")
    run = lambda d: OP(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], 0.5, d["rank_scale"],  # noqa: E731
                       d["out_scale"], 0.2, seed)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run(a)
    assert y.dtype == torch.bfloat16
    cast = {k: (v.detach().to(torch.bfloat16) if k in ("x", "weight", "bias") else v.detach()).requires_grad_(True)
            for k, v in a.items()}
    y_ref = run(cast)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    gy = torch.randn_like(y)
    names = list(a)
    got = torch.autograd.grad(y, [a[k] for k in names], gy)
    want = torch.autograd.grad(y_ref, [cast[k] for k in names], gy)
    for k, g, w in zip(names, got, want):
        assert g.dtype == torch.float32, k
        torch.testing.assert_close(g, w.float(), rtol=0, atol=0)
    # the module under autocast, float32 throughout outside it
    m = lrkernels.nn.LoRALinear(48, 24, r=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(a["x"].detach()).dtype == torch.bfloat16
    assert m(a["x"].detach()).dtype == torch.float32


# ---------------------------------------------------------------------------- opcheck / compile

@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck(p):
    a = make_inputs(5, 12, 7, 3, torch.float32, g=True, o=True, requires_grad=True)
    seed = seed_tensor(1, "cpu") if p > 0 else None
    args = (a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], 0.5, a["rank_scale"], a["out_scale"], p, seed)
    torch.library.opcheck(OP, args)
    y, hidden = OP(*args)
    bargs = (torch.randn_like(y), a["x"].detach(), a["weight"].detach(), a["lora_a"].detach(),
             a["lora_b"].detach(), hidden, 0.5, a["rank_scale"].detach(), a["out_scale"].detach(), p, seed,
             [True, True, True, True, True, True, True])
    torch.library.opcheck(BWD, bargs)
    torch.library.opcheck(BWD, bargs[:-1] + ([True, False, False, True, True, False, False],))


def test_opcheck_dropout_mask():
    torch.library.opcheck(torch.ops.lrkernels.dropout_mask.default, (seed_tensor(3, "cpu"), 5, 11, 0.4, torch.float32))


def test_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    a = make_inputs(10, 16, 12, 4, torch.float32, g=True, requires_grad=True)

    def f(x, w, b, la, lb, g):
        return lrkernels.lora_linear(x, w, b, la, lb, scale=0.5, rank_scale=g, dropout_p=0.1)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = cf(a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], a["rank_scale"])
    y.sum().backward()
    assert a["lora_a"].grad is not None and a["x"].grad is not None and a["rank_scale"].grad is not None

    # without dropout the compiled result equals eager exactly
    def f0(x, w, b, la, lb):
        return lrkernels.lora_linear(x, w, b, la, lb, scale=0.5)

    xs = (a["x"].detach(), a["weight"].detach(), a["bias"].detach(), a["lora_a"].detach(), a["lora_b"].detach())
    torch.testing.assert_close(torch.compile(f0, fullgraph=True, backend="aot_eager")(*xs), f0(*xs))


def test_compile_inductor_module():
    torch._dynamo.reset()
    m = lrkernels.nn.LoRALinear(16, 8, r=4, dropout=0.1)
    nn.init.normal_(m.lora_b)
    x = torch.randn(5, 16, requires_grad=True)
    cm = torch.compile(m, fullgraph=True)
    cm(x).sum().backward()
    assert m.lora_b.grad is not None and x.grad is not None
    m.eval()
    torch.testing.assert_close(cm(x), m(x))


# ---------------------------------------------------------------------------- PEFT equivalence

try:
    import peft
except ImportError:  # only the tests that need it skip; the rest of the file runs
    peft = None
needs_peft = pytest.mark.skipif(peft is None, reason="peft is not installed")


class _Tiny(nn.Module):
    def __init__(self, din=24, dout=20):
        super().__init__()
        self.proj = nn.Linear(din, dout)

    def forward(self, x):
        return self.proj(x)


@needs_peft
@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_lora(use_rslora):
    torch.manual_seed(1)
    model = peft.get_peft_model(_Tiny(), peft.LoraConfig(r=6, lora_alpha=12, target_modules=["proj"],
                                                         lora_dropout=0.0, use_rslora=use_rslora))
    layer = model.base_model.model.proj
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(9, 24, requires_grad=True)
    y_peft = model(x)
    gy = torch.randn_like(y_peft)
    gx_peft, ga_peft, gb_peft = torch.autograd.grad(y_peft, [x, layer.lora_A["default"].weight,
                                                             layer.lora_B["default"].weight], gy)
    base = layer.base_layer
    x2 = x.detach().clone().requires_grad_(True)
    la = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
    lb = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
    y = lrkernels.lora_linear(x2, base.weight, base.bias, la, lb, scale=layer.scaling["default"])
    torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=1e-5)
    gx, ga, gb = torch.autograd.grad(y, [x2, la, lb], gy)
    torch.testing.assert_close(gx, gx_peft, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga, ga_peft, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, gb_peft, rtol=1e-5, atol=1e-5)
    # the module path: LoRALinear.from_linear on the same weights
    m = lrkernels.nn.LoRALinear.from_linear(base, r=6, alpha=12, use_rslora=use_rslora)
    with torch.no_grad():
        m.lora_a.copy_(la)
        m.lora_b.copy_(lb)
    torch.testing.assert_close(m(x.detach()), y_peft.detach(), rtol=1e-5, atol=1e-5)


@needs_peft
def test_matches_peft_vera():
    torch.manual_seed(2)
    model = peft.get_peft_model(_Tiny(), peft.VeraConfig(r=8, target_modules=["proj"], vera_dropout=0.0))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.vera_lambda_b["default"].normal_()
        layer.vera_lambda_d["default"].normal_()
    a = layer.vera_A["default"][:, :24].detach()
    b = layer.vera_B["default"][:20, :].detach()
    ld = layer.vera_lambda_d["default"]
    lb = layer.vera_lambda_b["default"]
    x = torch.randn(7, 24, requires_grad=True)
    y_peft = model(x)
    gy = torch.randn_like(y_peft)
    gx_peft, gd_peft, gb_peft = torch.autograd.grad(y_peft, [x, ld, lb], gy)
    x2 = x.detach().clone().requires_grad_(True)
    ld2 = ld.detach().clone().requires_grad_(True)
    lb2 = lb.detach().clone().requires_grad_(True)
    base = layer.base_layer
    y = lrkernels.lora_linear(x2, base.weight, base.bias, a, b, scale=1.0, rank_scale=ld2, out_scale=lb2)
    torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=1e-5)
    gx, gd, gb = torch.autograd.grad(y, [x2, ld2, lb2], gy)
    torch.testing.assert_close(gx, gx_peft, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gd, gd_peft, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, gb_peft, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- LoRALinear module

def test_lora_linear_module_merge_unmerge():
    base = nn.Linear(16, 12)
    m = lrkernels.nn.LoRALinear.from_linear(base, r=4, alpha=8, dropout=0.2)
    nn.init.normal_(m.lora_b)
    assert m.weight is base.weight and not m.weight.requires_grad
    m.eval()
    x = torch.randn(3, 16)
    y = m(x)
    w0 = base.weight.detach().clone()
    m.merge()
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    m.unmerge()
    torch.testing.assert_close(base.weight, w0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m(x), y)
    with pytest.raises(RuntimeError, match="not merged"):
        m.unmerge()
    m.train()
    assert not torch.equal(m(x), y)  # dropout active in training mode
    assert m.scaling == 2.0
    assert lrkernels.nn.LoRALinear(16, 12, r=4, alpha=8, use_rslora=True).scaling == pytest.approx(4.0)


def test_lora_linear_module_trains():
    torch.manual_seed(0)
    m = lrkernels.nn.LoRALinear(8, 4, r=2)
    opt = torch.optim.SGD([m.lora_a, m.lora_b], lr=0.1)
    x, target = torch.randn(32, 8), torch.randn(32, 4)
    first = None
    for _ in range(30):
        loss = ((m(x) - target) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


@pytest.mark.parametrize("kind", ["parameter", "buffer"])
def test_lora_linear_module_rank_and_out_scales(kind):
    """rank_scale / out_scale as parameters (gates, VeRA's λ) or buffers (DyLoRA's mask): the
    forward is the op with them, parameters get gradients, buffers are saved and not trained, and
    merge folds them into ΔW."""
    torch.manual_seed(1)
    m = lrkernels.nn.LoRALinear(16, 12, r=4, alpha=8, rank_scale=kind, out_scale=kind)
    nn.init.normal_(m.lora_b)
    with torch.no_grad():
        m.rank_scale.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
        m.out_scale.uniform_(0.5, 1.5)
    names = dict(m.named_parameters()) if kind == "parameter" else dict(m.named_buffers())
    assert "rank_scale" in names and "out_scale" in names and "rank_scale" in m.state_dict()
    assert f"rank_scale={kind}" in repr(m)
    x = torch.randn(5, 16, requires_grad=True)
    y = m(x)
    want = oracle({"x": x, "weight": m.weight, "bias": m.bias, "lora_a": m.lora_a, "lora_b": m.lora_b,
                   "rank_scale": m.rank_scale, "out_scale": m.out_scale}, m.scaling, 0.0, 0)
    torch.testing.assert_close(y.double(), want.detach(), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    if kind == "parameter":
        assert m.rank_scale.grad is not None and m.out_scale.grad is not None
        assert m.rank_scale.grad.abs().sum() > 0
    m.eval()
    y0 = m(x).detach()
    m.merge()
    torch.testing.assert_close(m(x).detach(), y0, rtol=1e-5, atol=1e-5)
    m.unmerge()


def test_lora_linear_module_dylora_active_rank():
    torch.manual_seed(2)
    m = lrkernels.nn.LoRALinear(16, 12, r=4, rank_scale="buffer")
    nn.init.normal_(m.lora_b)
    x = torch.randn(3, 16)
    m.set_active_rank(2)
    assert m.rank_scale.tolist() == [1, 1, 0, 0]
    trunc = lrkernels.lora_linear(x, m.weight, m.bias, m.lora_a[:2], m.lora_b[:, :2], scale=m.scaling)
    torch.testing.assert_close(m(x), trunc, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="k must be in"):
        m.set_active_rank(5)
    with pytest.raises(RuntimeError, match="no rank_scale"):
        lrkernels.nn.LoRALinear(16, 12, r=4).set_active_rank(2)
    with pytest.raises(ValueError, match="rank_scale must be None, 'parameter' or 'buffer'"):
        lrkernels.nn.LoRALinear(16, 12, r=4, rank_scale="gate")


def test_lora_linear_module_vera_trains_only_the_scales():
    """VeRA on LoRALinear: A and B frozen (shared random projections), λ_d = rank_scale and
    λ_b = out_scale trained."""
    torch.manual_seed(3)
    m = lrkernels.nn.LoRALinear(8, 4, r=6, alpha=6, rank_scale="parameter", out_scale="parameter")
    nn.init.normal_(m.lora_b)
    m.lora_a.requires_grad_(False)
    m.lora_b.requires_grad_(False)
    opt = torch.optim.SGD([m.rank_scale, m.out_scale], lr=0.05)
    x, target = torch.randn(32, 8), torch.randn(32, 4)
    losses = []
    for _ in range(20):
        loss = ((m(x) - target) ** 2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] and m.lora_a.grad is None


def test_lora_linear_module_bf16_base_fp32_adapters():
    """A bfloat16 base with float32 adapters (PEFT's default): bf16 output, float32 adapter
    gradients, the forward within PEFT-style mixed-precision error of the float64 oracle, and it
    trains; merge folds ΔW into the bf16 weight."""
    torch.manual_seed(4)
    base = nn.Linear(32, 24).to(torch.bfloat16)
    m = lrkernels.nn.LoRALinear.from_linear(base, r=4, alpha=8, dropout=0.1, rank_scale="parameter",
                                            adapter_dtype=torch.float32)
    assert m.weight.dtype == torch.bfloat16 and m.lora_a.dtype == torch.float32
    assert m.rank_scale.dtype == torch.float32 and "adapter_dtype=torch.float32" in repr(m)
    nn.init.normal_(m.lora_b, std=0.1)
    x = torch.randn(40, 32, dtype=torch.bfloat16)
    m.eval()
    y = m(x)
    assert y.dtype == torch.bfloat16
    a = {"x": x, "weight": m.weight, "bias": m.bias, "lora_a": m.lora_a, "lora_b": m.lora_b,
         "rank_scale": m.rank_scale, "out_scale": None}
    a = {k: (v.detach() if v is not None else None) for k, v in a.items()}
    assert_close_to_oracle(y, oracle(a, m.scaling, 0.0, 0), mixed_low_prec(a, m.scaling, 0.0, 0),
                           mag=oracle(abs_inputs(a), m.scaling, 0.0, 0))
    m.train()
    target = torch.randn(40, 24)
    opt = torch.optim.SGD([m.lora_a, m.lora_b, m.rank_scale], lr=0.05)
    losses = []
    for _ in range(15):
        loss = ((m(x).float() - target) ** 2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m.lora_a.grad.dtype == torch.float32 and m.rank_scale.grad.dtype == torch.float32
    assert losses[-1] < losses[0]
    m.eval()
    y0 = m(x)
    m.merge()
    torch.testing.assert_close(m(x).float(), y0.float(), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("change,exc,match", [
    (lambda a: a.update(lora_b=a["lora_b"].T.contiguous()), ValueError, r"lora_b must have shape \(out_features, r\) = \(12, 4\), got \(4, 12\)"),
    (lambda a: a.update(lora_a=torch.randn(4, 15)), ValueError, r"lora_a must have shape \(r, in_features\)"),
    (lambda a: a.update(weight=torch.randn(12, 15)), ValueError, r"weight must have shape"),
    (lambda a: a.update(bias=torch.randn(13)), ValueError, r"bias must have shape \(out_features,\)"),
    (lambda a: a.update(rank_scale=torch.randn(5)), ValueError, r"rank_scale must have shape \(r,\)"),
    (lambda a: a.update(out_scale=torch.randn(3)), ValueError, r"out_scale must have shape"),
    (lambda a: a.update(lora_a=a["lora_a"].double()), TypeError, r"lora_a has dtype Double but x has dtype Float"),
    (lambda a: a.update(x=a["x"].long(), weight=a["weight"].long()), TypeError, r"x must be float32, float64 or bfloat16"),
    (lambda a: a.update(lora_a=torch.randn(0, 16), lora_b=torch.randn(12, 0)), ValueError, r"rank r >= 1"),
    (lambda a: a.update(x=torch.tensor(1.0)), ValueError, r"x must have shape \(\.\.\., in_features\)"),
])
def test_bad_inputs(change, exc, match):
    a = make_inputs(6, 16, 12, 4, torch.float32)
    change(a)
    with pytest.raises(exc, match=match):
        run_op(a, 1.0, 0.0, 0)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_dropout_p(p):
    a = make_inputs(6, 16, 12, 4, torch.float32)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        lrkernels.lora_linear(a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], dropout_p=p)


def test_dropout_needs_a_seed():
    a = make_inputs(6, 16, 12, 4, torch.float32)
    with pytest.raises(ValueError, match="needs a seed"):
        OP(a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], 1.0, None, None, 0.5, None)
    with pytest.raises(TypeError, match="seed must be int64"):
        OP(a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], 1.0, None, None, 0.5, torch.tensor(1.0))


@pytest.mark.cuda
def test_mixed_devices():
    a = make_inputs(6, 16, 12, 4, torch.float32)
    a["lora_a"] = a["lora_a"].cuda()
    with pytest.raises((ValueError, RuntimeError), match="device"):
        run_op(a, 1.0, 0.0, 0)


# ---------------------------------------------------------------------------- CUDA kernels

CUDA_SHAPES = SHAPES + [(257, 300, 130, 40), (64, 128, 256, 64), (5, 1000, 33, 100)]


@pytest.mark.cuda
def test_cuda_kernels_registered():
    for op in ("lora_linear", "lora_linear_backward", "dropout_mask"):
        assert lrkernels.has_kernel(op, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("rows,cols", [(1, 1), (33, 70), (300, 1000)])
def test_cuda_dropout_mask_matches_cpu(rows, cols):
    got = lrkernels.dropout_mask(rows, cols, 0.3, 2**63 + 9, device="cuda").cpu()
    want = lrkernels.dropout_mask(rows, cols, 0.3, 2**63 + 9, device="cpu")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", cuda_dtypes())
@pytest.mark.parametrize("T,din,dout,r", CUDA_SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cuda_forward_backward_matches_oracle(dtype, T, din, dout, r, p):
    a = make_inputs(T, din, dout, r, dtype, device="cuda", g=True, o=True, requires_grad=True)
    y, hidden = run_op(a, 0.9, p, seed=21)
    torch.cuda.synchronize()
    assert y.dtype == dtype and hidden.dtype == torch.float32
    cpu = {k: (v.detach().cpu() if v is not None else None) for k, v in a.items()}
    assert_close_to_oracle(y, oracle(cpu, 0.9, p, 21), oracle(cpu, 0.9, p, 21, dtype=torch.float32 if dtype == torch.float32 else dtype).to(dtype) if dtype != torch.float16 else oracle({k: (v.half().float() if v is not None else None) for k, v in cpu.items()}, 0.9, p, 21, dtype=torch.float32).half())
    # hidden = drop(x) Aᵀ accumulated in fp32 from inputs of the low dtype: the products are exact
    # in fp32 (or rounded once, for fp32 inputs), so the only error is fp32 summation, held per
    # element to the fp32 evaluation of the same product on the same data (and its magnitude).
    keep = ref_dropout_mask(21, T, din, p) if p > 0 else torch.ones(T, din, dtype=torch.float64)
    xd, a64 = cpu["x"].double() * keep, cpu["lora_a"].double()
    assert_close_to_oracle(hidden, xd @ a64.T, (xd.float() @ a64.float().T), name="hidden",
                           mag=xd.abs() @ a64.abs().T)
    if T == 0:
        return
    names = [k for k, v in a.items() if v is not None]
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [a[k] for k in names], gy)
    leaf64 = {k: (v.double().requires_grad_(True) if v is not None else None) for k, v in cpu.items()}
    g64 = torch.autograd.grad(oracle(leaf64, 0.9, p, 21), [leaf64[k] for k in names], gy.double().cpu())
    lowd = torch.float32 if dtype == torch.float32 else dtype
    leafl = {k: (v.to(lowd).requires_grad_(True) if v is not None else None) for k, v in cpu.items()}
    if dtype == torch.float16:  # CPU has no fast fp16 matmul: evaluate the fp16 formula in fp32 on fp16 data
        leafl = {k: (v.float().requires_grad_(True) if v is not None else None) for k, v in cpu.items()}
        lowd = torch.float32
    gl = torch.autograd.grad(oracle(leafl, 0.9, p, 21, dtype=lowd), [leafl[k] for k in names], gy.cpu().to(lowd))
    for k, got, want, low in zip(names, grads, g64, gl):
        assert got.dtype == dtype and got.shape == a[k].shape, k
        low = low.to(dtype)
        assert_close_to_oracle(got, want, low, name=f"cuda grad {k} ({dtype})")


@pytest.mark.cuda
def test_cuda_matches_cpu_kernel_float32():
    a = make_inputs(50, 96, 80, 8, torch.float32, g=True, o=True)
    ac = {k: (v.cuda() if v is not None else None) for k, v in a.items()}
    y_cpu, h_cpu = run_op(a, 0.5, 0.2, 8)
    y_gpu, h_gpu = run_op(ac, 0.5, 0.2, 8)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h_gpu.cpu(), h_cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_cuda_opcheck_and_compile():
    a = make_inputs(9, 40, 24, 5, torch.bfloat16, device="cuda", g=True, o=True, requires_grad=True)
    seed = seed_tensor(4, "cuda")
    args = (a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], 0.5, a["rank_scale"], a["out_scale"], 0.1, seed)
    torch.library.opcheck(OP, args)
    y, hidden = OP(*args)
    torch.library.opcheck(BWD, (torch.randn_like(y), a["x"].detach(), a["weight"].detach(), a["lora_a"].detach(),
                                a["lora_b"].detach(), hidden, 0.5, a["rank_scale"].detach(),
                                a["out_scale"].detach(), 0.1, seed, [True] * 7))
    torch._dynamo.reset()
    cf = torch.compile(lambda x, w, b, la, lb: lrkernels.lora_linear(x, w, b, la, lb, dropout_p=0.1), fullgraph=True)
    cf(a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"]).float().sum().backward()
    assert a["lora_a"].grad is not None


@pytest.mark.cuda
def test_cuda_graph_capture_with_fresh_seed():
    a = make_inputs(64, 128, 96, 16, torch.bfloat16, device="cuda")
    seed = seed_tensor(1, "cuda")
    static_x = a["x"].clone()
    OP(static_x, a["weight"], a["bias"], a["lora_a"], a["lora_b"], 1.0, None, None, 0.2, seed)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, _ = OP(static_x, a["weight"], a["bias"], a["lora_a"], a["lora_b"], 1.0, None, None, 0.2, seed)
    graph.replay()
    y1 = y.clone()
    seed.fill_(2)  # new mask on the next replay, no re-capture
    graph.replay()
    y2 = y.clone()
    want1, _ = OP(static_x, a["weight"], a["bias"], a["lora_a"], a["lora_b"], 1.0, None, None, 0.2, seed_tensor(1, "cuda"))
    torch.testing.assert_close(y1, want1)
    assert not torch.equal(y1, y2)


@pytest.mark.cuda
def test_cuda_bad_inputs():
    a = make_inputs(6, 16, 12, 4, torch.float64, device="cuda")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        run_op(a, 1.0, 0.0, 0)


# ---------------------------------------------------------------------------- CUDA tensor cores
# fp16/bf16 with >= 64 tokens take the tensor-core shrink and expand (multi_lora_tc.cuh) on sm_80+;
# set_cuda_kernels("simt") forces the SIMT kernels, "tensor_core" the tensor cores at any size.
# Each test asserts from the launch counters that the path it names is the one that ran. Shapes: odd sizes (tails of the 64-token
# tiles, the 64-column K steps and output tiles), every rank chunk (16, 32, 64, 128 and
# several chunks), and a wide, short input that splits K across blocks.
TC_SHAPES = [(64, 16, 16, 1), (65, 9, 130, 3), (130, 130, 9, 19), (200, 72, 64, 64), (97, 136, 33, 100),
             (130, 40, 70, 256), (64, 4096, 48, 16)]


def low_precision_oracle(cpu, scale, p, seed, dtype):
    if dtype == torch.float16:  # CPU has no fast fp16 matmul: the fp16 formula in fp32 on fp16 data
        data = {k: (v.half().float() if v is not None else None) for k, v in cpu.items()}
        return oracle(data, scale, p, seed, dtype=torch.float32).half()
    return oracle(cpu, scale, p, seed, dtype=dtype).to(dtype)


def run_op_on_path(a, scale, p, seed, path):
    """run_op with set_cuda_kernels(path) ("auto", "simt" or "tensor_core"); returns (y, hidden,
    tc) with tc = whether the shrink and expand ran on the tensor cores (both or neither)."""
    lrkernels.cuda_kernel_launches(reset=True)
    with lrkernels.use_cuda_kernels(path, "lora_linear"):
        y, hidden = run_op(a, scale, p, seed)
    n = lrkernels.cuda_kernel_launches()
    tc = (n["lora_linear.shrink.tensor_core"], n["lora_linear.expand.tensor_core"])
    simt = (n["lora_linear.shrink.simt"], n["lora_linear.expand.simt"])
    assert tc in ((1, 1), (0, 0)) and simt == tuple(1 - c for c in tc), n
    return y, hidden, tc == (1, 1)


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["auto", "simt"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,din,dout,r", TC_SHAPES)
@pytest.mark.parametrize("p,gates", [(0.0, False), (0.3, True), (0.3, False)])
def test_cuda_tensor_core_forward_matches_oracle(path, dtype, T, din, dout, r, p, gates):
    a = make_inputs(T, din, dout, r, dtype, device="cuda", g=gates, o=gates)
    y, hidden, tc = run_op_on_path(a, 0.9, p, 33, path)
    # every TC_SHAPES entry has >= 64 tokens: "auto" must take the tensor cores on sm_80+
    assert tc == (path == "auto" and torch.cuda.get_device_capability()[0] >= 8)
    simt_only = "0" if tc else "1"
    assert y.dtype == dtype and hidden.dtype == torch.float32
    cpu = {k: (v.cpu() if v is not None else None) for k, v in a.items()}
    assert_close_to_oracle(y, oracle(cpu, 0.9, p, 33), low_precision_oracle(cpu, 0.9, p, 33, dtype),
                           name=f"y ({'SIMT' if simt_only == '1' else 'tensor cores'})")
    xd = cpu["x"].double() * (ref_dropout_mask(33, T, din, p) if p > 0 else 1.0)
    h_want = xd @ cpu["lora_a"].double().T
    # the tensor cores take drop(x) rounded to the input dtype: compare with that formula's error
    h_low = xd.to(dtype).double() @ cpu["lora_a"].double().T
    assert_close_to_oracle(hidden, h_want, h_low, name="hidden", floor=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_tensor_core_and_simt_agree(dtype):
    a = make_inputs(257, 300, 130, 40, dtype, device="cuda", g=True, o=True)
    y_tc, h_tc, tc = run_op_on_path(a, 0.5, 0.2, 5, "tensor_core")
    y_simt, h_simt, tc_simt = run_op_on_path(a, 0.5, 0.2, 5, "simt")
    assert tc and not tc_simt
    torch.testing.assert_close(h_tc, h_simt, rtol=1e-2, atol=1e-2)
    # The tensor cores round drop(x) to the input dtype, the SIMT kernels keep it in fp32: the
    # two differ by ~1e-3 of the O(1) values (the oracle tests above bound each path's error).
    torch.testing.assert_close(y_tc.float(), y_simt.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 7, 63])
def test_cuda_forced_tensor_cores_below_the_auto_threshold(dtype, T):
    """set_cuda_kernels("tensor_core") runs the tensor cores below 64 tokens (tile tails only);
    "auto" runs SIMT there. Both match the oracle."""
    a = make_inputs(T, 40, 33, 5, dtype, device="cuda", g=True, o=True)
    cpu = {k: (v.cpu() if v is not None else None) for k, v in a.items()}
    for path, want_tc in (("tensor_core", True), ("auto", False)):
        y, hidden, tc = run_op_on_path(a, 0.9, 0.3, 7, path)
        assert tc == want_tc
        assert_close_to_oracle(y, oracle(cpu, 0.9, 0.3, 7), low_precision_oracle(cpu, 0.9, 0.3, 7, dtype),
                               name=f"y ({path})")


@pytest.mark.cuda
def test_cuda_tensor_core_image_arch_is_reported():
    """The host checks the arch the GPU's loaded tensor-core image was compiled for (a build for
    an older arch than the GPU JIT-compiles PTX without the tensor-core bodies: never used)."""
    a = make_inputs(64, 16, 16, 4, torch.bfloat16, device="cuda")
    run_op_on_path(a, 1.0, 0.0, 0, "auto")
    arch = lrkernels.cuda_kernel_launches()["lora_linear.tensor_core_image_arch"]
    major, minor = torch.cuda.get_device_capability()
    assert 0 < arch <= (major * 10 + minor) * 10


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("adapters_fp32", ["all", "lora_a", "lora_b"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cuda_fp32_adapters_on_low_precision_base(dtype, adapters_fp32, p):
    """PEFT's default: x and the base layer in fp16/bf16, adapter tensors in float32. The SIMT
    kernels read the adapters as fp32 (the tensor cores take no fp32 operand), accumulate in
    fp32 and return y in x's dtype; each gradient comes back in its tensor's own dtype and
    matches the float64 oracle of the same mixed inputs, as the CPU does."""
    T, din, dout, r = 130, 72, 40, 8
    a = make_inputs(T, din, dout, r, dtype, device="cuda", g=True, o=True)
    names = ["lora_a", "lora_b", "rank_scale", "out_scale"] if adapters_fp32 == "all" else [adapters_fp32]
    for k in names:
        a[k] = a[k].float()
    leaves = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in a.items()}
    lrkernels.cuda_kernel_launches(reset=True)
    y, _ = run_op(leaves, 0.9, p, 11)
    n = lrkernels.cuda_kernel_launches()
    assert n["lora_linear.shrink.tensor_core"] == 0 and n["lora_linear.shrink.simt"] == 1
    assert y.dtype == dtype
    cpu = {k: (v.detach().cpu() if v is not None else None) for k, v in a.items()}
    assert_close_to_oracle(y, oracle(cpu, 0.9, p, 11), low_precision_oracle(cpu, 0.9, p, 11, dtype), name="y")
    gy = torch.randn(y.shape, dtype=torch.float64).to(dtype=dtype, device="cuda")
    y.backward(gy)
    ref_leaves = {k: (v.double().requires_grad_(True) if v is not None else None) for k, v in cpu.items()}
    oracle(ref_leaves, 0.9, p, 11).backward(gy.cpu().double())
    for k, v in leaves.items():
        if v is None:
            continue
        assert v.grad is not None and v.grad.dtype == v.dtype, (k, v.grad)
        want = ref_leaves[k].grad
        err = (v.grad.cpu().double() - want).abs().max().item()
        bound = (3e-2 if dtype == torch.bfloat16 else 5e-3) * (want.abs().max().item() + 1e-3)
        assert err <= bound, f"grad {k}: max error {err:.3g} > {bound:.3g}"


@pytest.mark.cuda
def test_cuda_tensor_core_deterministic_mode_does_not_split_k():
    # 64 tokens × 4096 inputs splits K (atomics) by default; deterministic mode must not.
    a = make_inputs(64, 4096, 48, 16, torch.bfloat16, device="cuda")
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # cuBLAS needs a workspace setting otherwise
    try:
        runs = [run_op(a, 1.0, 0.3, seed=2) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(prev)
    for y, h in runs[1:]:
        assert torch.equal(h, runs[0][1]) and torch.equal(y, runs[0][0])
