"""Bone / MiSS (miss_linear: balance and mini; miss_bat_linear: bat): correctness against the
dense float64 oracle, gradients, opcheck, torch.compile, PEFT equivalence, bad inputs, MiSSLinear
and its converters."""

import pytest
import torch
from torch import nn

import lrkernels
from lrkernels.ops._util import seed_tensor
from lrkernels.reference import miss as ref

from conftest import abs_inputs, assert_close_to_oracle, cpu_dtypes

OP = torch.ops.lrkernels.miss_linear.default
BWD = torch.ops.lrkernels.miss_linear_backward.default
BAT = torch.ops.lrkernels.miss_bat_linear.default
BAT_BWD = torch.ops.lrkernels.miss_bat_linear_backward.default

NAMES = ["x", "weight", "bias", "miss_block"]

# (tokens, in, out, r, cols): balance (cols = out) with in % r == 0 and not, r = 1, r = in,
# mini (cols | out), empty batch
BALANCE_SHAPES = [
    (7, 16, 8, 4, 8),
    (5, 18, 12, 4, 12),     # in % r != 0: the last chunk is zero-padded
    (3, 10, 6, 10, 6),      # r = in
    (4, 7, 5, 1, 5),        # r = 1
    (6, 24, 12, 5, 3),      # mini, in % r != 0
    (9, 64, 48, 16, 16),    # mini
    (2, 13, 9, 3, 1),       # mini_r = 1
    (0, 8, 12, 4, 12),      # empty batch
]
# (tokens, in, out, r): r | in, r | out
BAT_SHAPES = [
    (7, 16, 8, 4),
    (5, 12, 18, 6),
    (3, 10, 10, 10),
    (4, 6, 9, 3),
    (6, 8, 4, 1),
    (9, 64, 32, 16),
    (2, 24, 40, 8),
    (0, 8, 12, 4),
]
# several W' chunks in both directions (the CPU chunks are 2 MiB: 256 rows of 2048 float32)
MANY_CHUNKS = (33, 2048, 640, 64)

MODES = ["aten", "blocked"]


@pytest.fixture(params=MODES)
def cpu_path(request):
    """balance/mini's two CPU paths: the composition x Wᵀ + b + S M (aten, and the one dropout
    always takes) and GEMMs over W' chunks built by the vectorised builders (blocked); auto picks
    one of the two by size."""
    with lrkernels.use_cpu_kernels(request.param):
        yield request.param


def make_inputs(T, din, dout, block_shape, dtype, *, lead=None, bias=True, requires_grad=False, block_scale=0.3):
    shape = (T, din) if lead is None else (*lead, din)
    t = lambda *s, sc=1.0: (torch.randn(*s, dtype=torch.float64) * sc).to(dtype=dtype)  # noqa: E731
    a = dict(x=t(*shape), weight=t(dout, din, sc=max(din, 1) ** -0.5), bias=t(dout) if bias else None,
             miss_block=t(*block_shape, sc=block_scale))
    if requires_grad:
        for v in a.values():
            if v is not None:
                v.requires_grad_(True)
    return a


def bat_block(dout, r):
    return (dout // r, r, r)


def run(a, variant, dropout_p=0.0, seed=None):
    if variant == "bat":
        return BAT(a["x"], a["weight"], a["bias"], a["miss_block"])
    return OP(a["x"], a["weight"], a["bias"], a["miss_block"], dropout_p, seed)[0]


def oracle_grads(a, gy, dt, names, **kw):
    leaves = {n: (a[n].detach().to(dt).requires_grad_(True) if a[n] is not None else None) for n in NAMES}
    y = ref.miss_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["miss_block"], dtype=dt, **kw)
    return (y,) + torch.autograd.grad(y, [leaves[n] for n in names], gy.to(dt))


# ---------------------------------------------------------------------------- oracle itself

def test_oracle_delta_weight_definitions():
    m = torch.randn(3, 4, dtype=torch.float64)              # mini: r = 3, mini_r = 4, out = 8
    dw = ref.delta_weight(m, 8, 7)
    for o in range(8):
        for c in range(7):
            assert dw[o, c] == m[c % 3, o % 4]
    w = torch.randn(6, 4, dtype=torch.float64)
    mb = torch.randn(3, 2, 2, dtype=torch.float64)           # bat: r = 2
    dwb = ref.delta_weight(mb, 6, 4, weight=w)
    for p in range(3):
        for q in range(2):
            wpq = w[2 * p:2 * p + 2, 2 * q:2 * q + 2]
            torch.testing.assert_close(dwb[2 * p:2 * p + 2, 2 * q:2 * q + 2], wpq @ mb[p] + mb[p])


def test_balance_is_the_chunk_sum_times_the_block():
    # the formulation: y = x Wᵀ + b + (Σ_chunks x) M, with the last chunk zero-padded
    a = make_inputs(5, 18, 12, (4, 12), torch.float64)
    xp = nn.functional.pad(a["x"], (0, 2))
    want = a["x"] @ a["weight"].T + a["bias"] + xp.reshape(5, 5, 4).sum(1) @ a["miss_block"]
    y, s = OP(a["x"], a["weight"], a["bias"], a["miss_block"], 0.0, None)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(s, xp.reshape(5, 5, 4).sum(1))


# ---------------------------------------------------------------------------- forward

@pytest.mark.parametrize("dtype", cpu_dtypes())
@pytest.mark.parametrize("T,din,dout,r,cols", BALANCE_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_balance_forward_matches_oracle(dtype, T, din, dout, r, cols, bias, cpu_path, cpu_capability):
    a = make_inputs(T, din, dout, (r, cols), dtype, bias=bias)
    y, s = OP(a["x"], a["weight"], a["bias"], a["miss_block"], 0.0, None)
    assert y.dtype == dtype and y.shape == (T, dout)
    assert s.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and s.shape == (T, r)
    args = (a["x"], a["weight"], a["bias"], a["miss_block"])
    assert_close_to_oracle(y, ref.miss_linear(*args), ref.miss_linear(*args, dtype=dtype),
                           mag=ref.miss_linear(*abs_inputs(a).values()))


@pytest.mark.parametrize("dtype", cpu_dtypes())
@pytest.mark.parametrize("T,din,dout,r", BAT_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_bat_forward_matches_oracle(dtype, T, din, dout, r, bias, cpu_capability):
    a = make_inputs(T, din, dout, bat_block(dout, r), dtype, bias=bias)
    y = BAT(a["x"], a["weight"], a["bias"], a["miss_block"])
    assert y.dtype == dtype and y.shape == (T, dout)
    args = (a["x"], a["weight"], a["bias"], a["miss_block"])
    assert_close_to_oracle(y, ref.miss_linear(*args), ref.miss_linear(*args, dtype=dtype),
                           mag=ref.miss_linear(*abs_inputs(a).values()))


def test_leading_dims_and_noncontiguous_inputs():
    base = torch.randn(2, 48, 3, dtype=torch.float64)
    x = base[:, ::2, :].transpose(1, 2)  # (2, 3, 24), non-contiguous
    wt = torch.randn(24, 16, dtype=torch.float64).T  # (16, 24), non-contiguous
    for block in (torch.randn(5, 16, dtype=torch.float64), torch.randn(2, 8, 8, dtype=torch.float64)):
        for mode in MODES:
            with lrkernels.use_cpu_kernels(mode):
                variant = "bat" if block.dim() == 3 else "balance"
                y = lrkernels.miss_linear(x, wt, None, block, variant=variant)
                assert y.shape == (2, 3, 16)
                torch.testing.assert_close(y, ref.miss_linear(x, wt, None, block))


# ---------------------------------------------------------------------------- backward

@pytest.mark.parametrize("dtype", cpu_dtypes())
@pytest.mark.parametrize("T,din,dout,r,cols", BALANCE_SHAPES)
def test_balance_backward_matches_oracle(dtype, T, din, dout, r, cols, cpu_path, cpu_capability):
    a = make_inputs(T, din, dout, (r, cols), dtype, requires_grad=True)
    y = lrkernels.miss_linear(a["x"], a["weight"], a["bias"], a["miss_block"])
    gy = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    got = torch.autograd.grad(y, [a[n] for n in NAMES], gy)
    want, low = oracle_grads(a, gy, torch.float64, NAMES), oracle_grads(a, gy, dtype, NAMES)
    for n, g, w, lo in zip(NAMES, got, want[1:], low[1:]):
        assert g.dtype == dtype
        assert_close_to_oracle(g, w, lo, name=f"grad {n}")


@pytest.mark.parametrize("dtype", cpu_dtypes())
@pytest.mark.parametrize("T,din,dout,r", BAT_SHAPES)
def test_bat_backward_matches_oracle(dtype, T, din, dout, r, cpu_capability):
    a = make_inputs(T, din, dout, bat_block(dout, r), dtype, requires_grad=True)
    y = lrkernels.miss_linear(a["x"], a["weight"], a["bias"], a["miss_block"], variant="bat")
    gy = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    got = torch.autograd.grad(y, [a[n] for n in NAMES], gy)
    want, low = oracle_grads(a, gy, torch.float64, NAMES), oracle_grads(a, gy, dtype, NAMES)
    for n, g, w, lo in zip(NAMES, got, want[1:], low[1:]):
        assert g.dtype == dtype
        assert_close_to_oracle(g, w, lo, name=f"grad {n}")


@pytest.mark.parametrize("variant", ["balance", "mini", "bat"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_chunks_match_oracle(variant, dtype, cpu_capability):
    T, din, dout, r = MANY_CHUNKS
    shape = {"balance": (r, dout), "mini": (r, 40), "bat": bat_block(dout, r)}[variant]
    a = make_inputs(T, din, dout, shape, dtype, requires_grad=True, block_scale=0.05)
    y = lrkernels.miss_linear(a["x"], a["weight"], a["bias"], a["miss_block"],
                              variant="bat" if variant == "bat" else "balance")
    gy = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    got = (y,) + torch.autograd.grad(y, [a[n] for n in NAMES], gy)
    want, low = oracle_grads(a, gy, torch.float64, NAMES), oracle_grads(a, gy, dtype, NAMES)
    for n, g, w, lo in zip(["y"] + NAMES, got, want, low):
        assert_close_to_oracle(g, w, lo, name=n)


@pytest.mark.parametrize("dtype", cpu_dtypes())
@pytest.mark.parametrize("T,din,dout,r,cols", [(7, 16, 8, 4, 8), (5, 18, 12, 4, 12), (6, 24, 12, 5, 3),
                                               (40, 300, 20, 7, 20)])
def test_dropout_matches_oracle(dtype, T, din, dout, r, cols):
    a = make_inputs(T, din, dout, (r, cols), dtype, requires_grad=True)
    seed = seed_tensor(1234, "cpu")
    y, _ = OP(a["x"], a["weight"], a["bias"], a["miss_block"], 0.3, seed)
    gy = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    got = (y,) + torch.autograd.grad(y, [a[n] for n in NAMES], gy)
    kw = dict(dropout_p=0.3, seed=1234)
    want, low = oracle_grads(a, gy, torch.float64, NAMES, **kw), oracle_grads(a, gy, dtype, NAMES, **kw)
    for n, g, w, lo in zip(["y"] + NAMES, got, want, low):
        assert_close_to_oracle(g, w, lo, name=n)
    # the mask differs from no dropout and is regenerated, not stored: same seed, same output
    y0 = OP(a["x"], a["weight"], a["bias"], a["miss_block"], 0.0, None)[0]
    assert not torch.allclose(y0, y)
    torch.testing.assert_close(OP(a["x"], a["weight"], a["bias"], a["miss_block"], 0.3, seed)[0], y, rtol=0, atol=0)


def test_dropout_wrapper_draws_from_generator():
    a = make_inputs(6, 16, 8, (4, 8), torch.float32)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    y1 = lrkernels.miss_linear(a["x"], a["weight"], a["bias"], a["miss_block"], dropout_p=0.5, generator=g1)
    y2 = lrkernels.miss_linear(a["x"], a["weight"], a["bias"], a["miss_block"], dropout_p=0.5, generator=g2)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


GRADCHECK_CASES = [
    ("balance", (4, 12, 8, 4), (4, 8)),
    ("balance", (3, 10, 6, 4), (4, 6)),      # in % r != 0
    ("mini", (3, 9, 6, 3), (3, 2)),
    ("bat", (4, 12, 8, 4), (2, 4, 4)),
    ("bat", (3, 6, 9, 3), (3, 3, 3)),
    ("bat", (2, 4, 4, 1), (4, 1, 1)),
]


@pytest.mark.parametrize("variant,shape,block", GRADCHECK_CASES)
def test_gradcheck_float64(variant, shape, block, cpu_path):
    T, din, dout, _ = shape
    a = make_inputs(T, din, dout, block, torch.float64, requires_grad=True)
    v = "bat" if variant == "bat" else "balance"
    torch.autograd.gradcheck(lambda x, w, b, m: lrkernels.miss_linear(x, w, b, m, variant=v),
                             (a["x"], a["weight"], a["bias"], a["miss_block"]))


def test_gradcheck_dropout_float64():
    a = make_inputs(5, 11, 6, (3, 6), torch.float64, requires_grad=True)
    seed = seed_tensor(99, "cpu")
    torch.autograd.gradcheck(lambda x, w, b, m: OP(x, w, b, m, 0.4, seed)[0],
                             (a["x"], a["weight"], a["bias"], a["miss_block"]))


def test_grad_only_where_needed():
    for variant, block in (("balance", (4, 8)), ("bat", (2, 4, 4))):
        a = make_inputs(5, 12, 8, block, torch.float32)
        m = a["miss_block"].requires_grad_(True)
        y = lrkernels.miss_linear(a["x"], a["weight"], a["bias"], m, variant=variant)
        y.sum().backward()
        assert m.grad is not None and a["x"].grad is None and a["weight"].grad is None


def test_backward_op_output_mask():
    a = make_inputs(5, 12, 8, (4, 8), torch.float32)
    y, s = OP(a["x"], a["weight"], a["bias"], a["miss_block"], 0.0, None)
    gy = torch.randn_like(y)
    gx, gw, gb, gm = BWD(gy, a["x"], a["weight"], a["miss_block"], s, 0.0, None, [False, True, False, True])
    assert gx is None and gb is None and gw is not None and gm is not None
    a = make_inputs(5, 12, 8, (2, 4, 4), torch.float32)
    gx, gw, gb, gm = BAT_BWD(gy, a["x"], a["weight"], a["miss_block"], [True, False, True, False])
    assert gx is not None and gb is not None and gw is None and gm is None


def test_empty_batch_backward():
    for variant, block in (("balance", (4, 12)), ("bat", (3, 4, 4))):
        a = make_inputs(0, 8, 12, block, torch.float32, lead=(0, 5), requires_grad=True)
        y = lrkernels.miss_linear(a["x"], a["weight"], a["bias"], a["miss_block"], variant=variant)
        assert y.shape == (0, 5, 12)
        y.sum().backward()
        assert a["x"].grad.shape == a["x"].shape
        assert torch.equal(a["miss_block"].grad, torch.zeros_like(a["miss_block"]))
        assert torch.equal(a["weight"].grad, torch.zeros_like(a["weight"]))


# ---------------------------------------------------------------------------- mixed precision, autocast

@pytest.mark.parametrize("variant,block", [("balance", (6, 12)), ("mini", (6, 4)), ("bat", (2, 6, 6))])
def test_float32_block_with_bfloat16_input(variant, block):
    a = make_inputs(9, 24, 12, block, torch.bfloat16, requires_grad=True)
    m32 = a["miss_block"].detach().float().requires_grad_(True)
    a["miss_block"] = m32
    v = "bat" if variant == "bat" else "balance"
    y = lrkernels.miss_linear(a["x"], a["weight"], a["bias"], m32, variant=v)
    assert y.dtype == torch.bfloat16
    gy = torch.randn(y.shape, dtype=torch.float64).to(torch.bfloat16)
    got = (y,) + torch.autograd.grad(y, [a[n] for n in NAMES], gy)
    assert got[4].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    want, low = oracle_grads(a, gy, torch.float64, NAMES), oracle_grads(a, gy, torch.bfloat16, NAMES)
    for n, g, w, lo in zip(["y"] + NAMES, got, want, low):
        assert_close_to_oracle(g, w, lo, name=n, floor=1e-2)
    if variant == "bat":
        torch.library.opcheck(BAT, (a["x"], a["weight"], a["bias"], m32))
    else:
        torch.library.opcheck(OP, (a["x"], a["weight"], a["bias"], m32, 0.0, None))
    with pytest.raises(TypeError, match=r"miss_block has dtype Double but x has dtype Float"):
        lrkernels.miss_linear(a["x"].detach().float(), a["weight"].detach().float(), None, m32.detach().double(),
                              variant=v)


@pytest.mark.parametrize("variant,block", [("balance", (8, 24)), ("bat", (3, 8, 8))])
def test_autocast_bfloat16(variant, block):
    a = make_inputs(20, 48, 24, block, torch.float32, requires_grad=True)
    f = lambda x, w, b, m: lrkernels.miss_linear(x, w, b, m, variant=variant)  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = f(a["x"], a["weight"], a["bias"], a["miss_block"])
    assert y.dtype == torch.bfloat16
    cast = {n: a[n].detach().to(torch.bfloat16).requires_grad_(True) for n in ("x", "weight", "bias")}
    m = a["miss_block"].detach().clone().requires_grad_(True)
    y_ref = f(cast["x"], cast["weight"], cast["bias"], m)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, [a[n] for n in NAMES], gy)
    want = torch.autograd.grad(y_ref, [cast["x"], cast["weight"], cast["bias"], m], gy)
    for n, g, w in zip(NAMES, got, want):
        assert g.dtype == torch.float32, n
        torch.testing.assert_close(g, w.float(), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_ops_under_inference_mode_and_no_grad(mode):
    a = make_inputs(300, 64, 32, (16, 32), torch.float32)
    b = make_inputs(300, 64, 32, (2, 16, 16), torch.float32)
    with getattr(torch, mode)():
        y, s = OP(a["x"], a["weight"], a["bias"], a["miss_block"], 0.2, seed_tensor(3, "cpu"))
        g = BWD(torch.randn_like(y), a["x"], a["weight"], a["miss_block"], s, 0.2, seed_tensor(3, "cpu"),
                [True, True, True, True])
        yb = BAT(b["x"], b["weight"], b["bias"], b["miss_block"])
        gb = BAT_BWD(torch.randn_like(yb), b["x"], b["weight"], b["miss_block"], [True, True, True, True])
    assert all(t is not None for t in g) and all(t is not None for t in gb)


# ---------------------------------------------------------------------------- opcheck / compile

@pytest.mark.parametrize("T,din,dout,r,cols", [(5, 12, 8, 4, 8), (3, 9, 6, 4, 3), (0, 4, 4, 2, 4)])
def test_opcheck_balance(T, din, dout, r, cols):
    a = make_inputs(T, din, dout, (r, cols), torch.float32, requires_grad=True)
    seed = seed_tensor(7, "cpu")
    torch.library.opcheck(OP, (a["x"], a["weight"], a["bias"], a["miss_block"], 0.0, None))
    torch.library.opcheck(OP, (a["x"], a["weight"], None, a["miss_block"], 0.25, seed))
    d = {n: (v.detach() if v is not None else None) for n, v in a.items()}
    y, s = OP(d["x"], d["weight"], d["bias"], d["miss_block"], 0.25, seed)
    gy = torch.randn_like(y)
    for mask in ([True, True, True, True], [True, False, False, True], [False, False, False, True]):
        torch.library.opcheck(BWD, (gy, d["x"], d["weight"], d["miss_block"], s, 0.25, seed, mask))


@pytest.mark.parametrize("T,din,dout,r", [(5, 12, 8, 4), (3, 9, 6, 3), (0, 4, 4, 2)])
def test_opcheck_bat(T, din, dout, r):
    a = make_inputs(T, din, dout, bat_block(dout, r), torch.float32, requires_grad=True)
    torch.library.opcheck(BAT, (a["x"], a["weight"], a["bias"], a["miss_block"]))
    torch.library.opcheck(BAT, (a["x"], a["weight"], None, a["miss_block"]))
    d = {n: v.detach() for n, v in a.items()}
    gy = torch.randn(T, dout)
    for mask in ([True, True, True, True], [True, False, False, True], [False, True, False, False]):
        torch.library.opcheck(BAT_BWD, (gy, d["x"], d["weight"], d["miss_block"], mask))


def test_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    a = make_inputs(6, 16, 12, (4, 12), torch.float32, requires_grad=True)
    mb = torch.randn(3, 4, 4, requires_grad=True)
    mini = torch.randn(4, 3, requires_grad=True)

    def f(x, w, b, m, mb, mini):
        return (lrkernels.miss_linear(x, w, b, m) + lrkernels.miss_linear(x, w, b, mb, variant="bat")
                + lrkernels.miss_linear(x, w, None, mini))

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = (a["x"], a["weight"], a["bias"], a["miss_block"], mb, mini)
    y = cf(*args)
    torch.testing.assert_close(y, f(*args))
    grads = torch.autograd.grad(y.sum(), args)
    want = torch.autograd.grad(f(*args).sum(), args)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("variant", ["balance", "bat"])
def test_compile_inductor_module(variant):
    torch._dynamo.reset()
    m = lrkernels.nn.MiSSLinear(16, 8, r=4, variant=variant)
    with torch.no_grad():
        m.miss_block.normal_()
    x = torch.randn(5, 16, requires_grad=True)
    cm = torch.compile(m, fullgraph=True)
    cm(x).sum().backward()
    assert m.miss_block.grad is not None and x.grad is not None
    torch.testing.assert_close(cm(x), m(x))


# ---------------------------------------------------------------------------- PEFT

try:
    import peft
except ImportError:  # only the tests that need it skip
    peft = None
needs_peft = pytest.mark.skipif(peft is None, reason="peft is not installed")


class _Tiny(nn.Module):
    def __init__(self, din, dout):
        super().__init__()
        self.proj = nn.Linear(din, dout)

    def forward(self, x):
        return self.proj(x)


def _peft_layer(din, dout, r, init, mini_r=None, dtype=torch.float32):
    torch.manual_seed(3)
    kw = dict(r=r, target_modules=["proj"], init_weights=init)
    if mini_r is not None:
        kw["mini_r"] = mini_r
    model = peft.get_peft_model(_Tiny(din, dout).to(dtype), peft.MissConfig(**kw))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.miss_block["default"].normal_(0, 0.2)
    return model, layer


PEFT_CASES = [
    ("balance", 24, 36, 8, True, None),
    ("balance", 26, 36, 8, True, None),   # in % r != 0
    ("mini", 24, 36, 8, "mini", 12),
    ("mini", 21, 30, 4, "mini", 5),
    ("bat", 24, 36, 6, "bat", None),
    ("bat", 32, 16, 8, "bat", None),
]


@needs_peft
@pytest.mark.parametrize("variant,din,dout,r,init,mini_r", PEFT_CASES)
def test_matches_peft_forward_and_every_gradient(variant, din, dout, r, init, mini_r):
    model, layer = _peft_layer(din, dout, r, init, mini_r)
    base = layer.base_layer
    base.weight.requires_grad_(True)
    base.bias.requires_grad_(True)
    block = layer.miss_block["default"]
    x = torch.randn(2, 5, din, requires_grad=True)
    y_peft = model(x)
    gy = torch.randn_like(y_peft)
    params = [x, base.weight, base.bias, block]
    # PEFT's bat reads the base weight through `.data` (no gradient reaches W there); ours is the
    # exact gradient through both W and ΔW(W), checked against the oracle and gradcheck above
    names = [n for n in NAMES if not (variant == "bat" and n == "weight")]
    g_peft = torch.autograd.grad(y_peft, [p for n, p in zip(NAMES, params) if n in names], gy)
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    y = lrkernels.miss_linear(*leaves, variant="bat" if variant == "bat" else "balance")
    torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(y, [p for n, p in zip(NAMES, leaves) if n in names], gy)
    for n, u, v in zip(names, g, g_peft):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {n}: {m}")


@needs_peft
@pytest.mark.parametrize("variant,din,dout,r,init,mini_r", PEFT_CASES)
def test_from_peft_converter_and_merge(variant, din, dout, r, init, mini_r):
    model, layer = _peft_layer(din, dout, r, init, mini_r)
    x = torch.randn(4, din)
    m = lrkernels.nn.MiSSLinear.from_peft(layer)
    assert m.variant == variant and m.r == r and m.mini_r == mini_r
    assert m.weight is layer.base_layer.weight
    torch.testing.assert_close(m(x), model(x), rtol=1e-5, atol=1e-5)
    # PEFT's merged weight equals ours
    w0 = layer.base_layer.weight.detach().clone()
    w_ours = (w0 + m.delta_weight()).detach()
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight.detach(), w_ours, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="PEFT MiSS layer"):
        lrkernels.nn.MiSSLinear.from_peft(nn.Linear(4, 4))


@needs_peft
def test_convert_peft_model():
    model, layer = _peft_layer(24, 36, 6, "bat")
    x = torch.randn(3, 24)
    want = model(x).detach()
    inner = model.base_model.model
    assert lrkernels.nn.convert_peft_miss(inner) == 1
    assert isinstance(inner.proj, lrkernels.nn.MiSSLinear)
    torch.testing.assert_close(inner(x), want, rtol=1e-5, atol=1e-5)


@needs_peft
def test_load_peft_miss_and_bone_checkpoints():
    from peft.utils import get_peft_model_state_dict

    model, layer = _peft_layer(24, 36, 8, True)
    x = torch.randn(3, 24)
    want = model(x).detach()
    sd = get_peft_model_state_dict(model)
    assert any(k.endswith("miss_block") for k in sd)
    # an old Bone checkpoint: the same tensors under <module>.bone_block
    bone = {k.replace("miss_block", "bone_block"): v for k, v in sd.items()}
    for state in (sd, bone):
        plain = _Tiny(24, 36)
        plain.proj.load_state_dict(layer.base_layer.state_dict())
        assert lrkernels.nn.load_bone_checkpoint(plain, state) == 1
        assert isinstance(plain.proj, lrkernels.nn.MiSSLinear) and plain.proj.variant == "balance"
        torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-5)
    bat = {"base_model.model.proj.bone_block": torch.randn(6, 6, 6) * 0.1}
    plain = _Tiny(24, 36)
    assert lrkernels.nn.load_bone_checkpoint(plain, bat) == 1
    assert plain.proj.variant == "bat"
    w = plain.proj.weight
    torch.testing.assert_close(plain(x), x @ (w + ref.delta_weight(bat["base_model.model.proj.bone_block"], 36, 24,
                                                                   weight=w).float()).T + plain.proj.bias,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not have"):
        lrkernels.nn.load_bone_checkpoint(_Tiny(24, 36), {"base_model.model.nope.bone_block": torch.zeros(8, 36)})


# ---------------------------------------------------------------------------- MiSSLinear

@pytest.mark.parametrize("variant,mini_r", [("balance", None), ("mini", 4), ("bat", None)])
def test_module_merge_unmerge(variant, mini_r):
    base = nn.Linear(16, 12)
    m = lrkernels.nn.MiSSLinear.from_linear(base, r=4, variant=variant, mini_r=mini_r)
    assert m.weight is base.weight and not m.weight.requires_grad and m.miss_block.requires_grad
    x = torch.randn(3, 16)
    torch.testing.assert_close(m(x), base(x))  # zero init: starts equal to its base
    with torch.no_grad():
        m.miss_block.normal_(0, 0.1)
    y = m(x)
    dw = m.delta_weight()
    torch.testing.assert_close(dw.double(), ref.delta_weight(m.miss_block.detach(), 12, 16, weight=base.weight.detach()),
                               rtol=1e-5, atol=1e-6)
    w0 = base.weight.detach().clone()
    m.merge()
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        m.merge()
    m.unmerge()
    # bat's unmerge solves (I + M_p) in float64: within a few float32 ulps of the original
    torch.testing.assert_close(base.weight, w0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m(x), y)
    with pytest.raises(RuntimeError, match="not merged"):
        m.unmerge()


def test_bat_unmerge_float64_exactness():
    m = lrkernels.nn.MiSSLinear(64, 32, r=16, variant="bat", dtype=torch.float64)
    with torch.no_grad():
        m.miss_block.normal_(0, 0.3)
    w0 = m.weight.detach().clone()
    m.merge()
    m.unmerge()
    assert (m.weight - w0).abs().max().item() < 1e-12


def test_module_low_precision_and_training():
    mb = lrkernels.nn.MiSSLinear.from_linear(nn.Linear(16, 12).to(torch.bfloat16), r=4, variant="bat")
    assert mb.miss_block.dtype == torch.float32 and mb.weight.dtype == torch.bfloat16
    yb = mb(torch.randn(5, 16, dtype=torch.bfloat16))
    yb.float().sum().backward()
    assert yb.dtype == torch.bfloat16 and mb.miss_block.grad.dtype == torch.float32
    torch.manual_seed(0)
    m = lrkernels.nn.MiSSLinear(8, 4, r=2, dropout=0.1)
    opt = torch.optim.SGD([m.miss_block], lr=0.05)
    x, target = torch.randn(32, 8), torch.randn(32, 4)
    first = None
    for _ in range(30):
        loss = ((m(x) - target) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    m.eval()
    torch.testing.assert_close(m(x), m(x), rtol=0, atol=0)  # no dropout in eval mode


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=5, variant="bat"), "divide in_features"),
    (dict(r=4, variant="mini", mini_r=5), "mini_r dividing out_features"),
    (dict(r=4, variant="mini"), "mini_r dividing out_features"),
    (dict(r=20), "at most in_features"),
    (dict(r=4, variant="bat", dropout=0.1), "no dropout"),
    (dict(r=4, variant="lora"), "variant must be one of"),
    (dict(r=4, mini_r=2), "mini_r is for variant 'mini'"),
])
def test_module_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lrkernels.nn.MiSSLinear(16, 12, **kwargs)


# ---------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("change,exc,match", [
    (lambda a: a.update(miss_block=torch.randn(20, 12)), ValueError,
     r"block size r = miss_block.size\(0\) = 20 must be at most in_features = x.size\(-1\) = 16"),
    (lambda a: a.update(miss_block=torch.randn(4, 5)), ValueError,
     r"miss_block must have shape \(r, out_features\) = \(4, 12\) \(balance\) or \(r, mini_r\) with mini_r dividing "
     r"out_features = weight.size\(0\) = 12 \(mini\), got \(4, 5\)"),
    (lambda a: a.update(miss_block=torch.randn(4, 24)), ValueError, r"mini_r dividing out_features"),
    (lambda a: a.update(miss_block=torch.randn(0, 12)), ValueError, r"block size r >= 1"),
    (lambda a: a.update(miss_block=torch.randn(4, 12, 1)), ValueError, r"miss_block must be 2-D"),
    (lambda a: a.update(miss_block=torch.randn(4, 12, dtype=torch.float64)), TypeError,
     r"miss_block has dtype Double but x has dtype Float"),
    (lambda a: a.update(miss_block=torch.randint(0, 3, (4, 12))), TypeError, r"miss_block must be a floating tensor"),
    (lambda a: a.update(x=torch.randint(0, 3, (6, 16))), TypeError, r"x must be float32, float64 or bfloat16"),
    (lambda a: a.update(x=torch.tensor(1.0)), ValueError, r"x must have shape \(\.\.\., in_features\)"),
    (lambda a: a.update(weight=torch.randn(12, 15)), ValueError, r"weight must have shape"),
    (lambda a: a.update(bias=torch.randn(13)), ValueError, r"bias must have shape \(out_features,\)"),
    (lambda a: a.update(weight=a["weight"].double()), TypeError, r"weight has dtype Double but x has dtype Float"),
])
def test_bad_inputs_balance(change, exc, match):
    a = make_inputs(6, 16, 12, (4, 12), torch.float32)
    change(a)
    with pytest.raises(exc, match=match):
        OP(a["x"], a["weight"], a["bias"], a["miss_block"], 0.0, None)


@pytest.mark.parametrize("change,exc,match", [
    (lambda a: a.update(miss_block=torch.randn(2, 5, 5)), ValueError,
     r"block size r = miss_block.size\(2\) = 5 must divide in_features = x.size\(-1\) = 16"),
    (lambda a: a.update(weight=torch.randn(10, 16), bias=None, miss_block=torch.randn(2, 4, 4)), ValueError,
     r"block size r = miss_block.size\(2\) = 4 must divide out_features = weight.size\(0\) = 10"),
    (lambda a: a.update(miss_block=torch.randn(2, 3, 4)), ValueError,
     r"miss_block must have shape \(out_features / r, r, r\) = \(3, 4, 4\), got \(2, 3, 4\)"),
    (lambda a: a.update(miss_block=torch.randn(4, 12)), ValueError, r"miss_block must be 3-D"),
    (lambda a: a.update(miss_block=torch.randn(1, 32, 32)), ValueError,
     r"block size r = miss_block.size\(2\) = 32 must be at most in_features = x.size\(-1\) = 16"),
])
def test_bad_inputs_bat(change, exc, match):
    a = make_inputs(6, 16, 12, (3, 4, 4), torch.float32)
    change(a)
    with pytest.raises(exc, match=match):
        BAT(a["x"], a["weight"], a["bias"], a["miss_block"])


def test_bad_inputs_wrapper_and_backward():
    a = make_inputs(6, 16, 12, (4, 12), torch.float32)
    with pytest.raises(ValueError, match="variant must be 'balance' or 'bat'"):
        lrkernels.miss_linear(a["x"], a["weight"], a["bias"], a["miss_block"], variant="lora")
    with pytest.raises(ValueError, match="'bat' has no dropout"):
        lrkernels.miss_linear(a["x"], a["weight"], a["bias"], torch.randn(3, 4, 4), variant="bat", dropout_p=0.1)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        OP(a["x"], a["weight"], a["bias"], a["miss_block"], 1.0, seed_tensor(1, "cpu"))
    with pytest.raises(ValueError, match="needs a seed"):
        OP(a["x"], a["weight"], a["bias"], a["miss_block"], 0.5, None)
    y, s = OP(a["x"], a["weight"], a["bias"], a["miss_block"], 0.0, None)
    with pytest.raises(TypeError, match=r"chunk_sum must be Float"):
        BWD(y, a["x"], a["weight"], a["miss_block"], s.double(), 0.0, None, [True] * 4)
    with pytest.raises(ValueError, match=r"chunk_sum must have shape \(\.\.\., r\) = \(6, 4\)"):
        BWD(y, a["x"], a["weight"], a["miss_block"], s[:, :3].contiguous(), 0.0, None, [True] * 4)
    with pytest.raises(ValueError, match=r"grad_out must have shape \(\.\.\., out_features\) = \(6, 12\)"):
        BWD(y[:, :8].contiguous(), a["x"], a["weight"], a["miss_block"], s, 0.0, None, [True] * 4)
    with pytest.raises(ValueError, match=r"grad_out must have shape"):
        BAT_BWD(y[:, :8].contiguous(), a["x"], a["weight"], torch.randn(3, 4, 4), [True] * 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices():
    a = make_inputs(6, 16, 12, (4, 12), torch.float32)
    with pytest.raises((ValueError, RuntimeError), match="device"):
        OP(a["x"].cuda(), a["weight"], a["bias"], a["miss_block"], 0.0, None)


# ---------------------------------------------------------------------------- CUDA

CUDA_CASES = [
    ("balance", (7, 16, 8), (4, 8)),
    ("balance", (33, 130, 96), (16, 96)),    # in % r != 0
    ("mini", (17, 64, 48), (8, 12)),
    ("bat", (9, 64, 32), (2, 16, 16)),
    ("bat", (65, 256, 192), (3, 64, 64)),
    ("bat", (0, 8, 12), (3, 4, 4)),
]


@pytest.mark.cuda
def test_cuda_kernels_registered():
    for op in ("miss_linear", "miss_linear_backward", "miss_bat_linear", "miss_bat_linear_backward"):
        assert lrkernels.has_kernel(op, "cuda"), op


def _to_cuda(a):
    return {n: (v.detach().cuda().requires_grad_(True) if v is not None else None) for n, v in a.items()}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant,shape,block", CUDA_CASES)
def test_cuda_forward_backward_matches_oracle(dtype, variant, shape, block):
    T, din, dout = shape
    a = _to_cuda(make_inputs(T, din, dout, block, dtype, block_scale=0.05))
    v = "bat" if variant == "bat" else "balance"
    y = lrkernels.miss_linear(a["x"], a["weight"], a["bias"], a["miss_block"], variant=v)
    gy = torch.randn(y.shape, dtype=torch.float64, device="cuda").to(dtype)
    got = (y,) + torch.autograd.grad(y, [a[n] for n in NAMES], gy)
    want, low = oracle_grads(a, gy, torch.float64, NAMES), oracle_grads(a, gy, dtype, NAMES)
    for n, g, w, lo in zip(["y"] + NAMES, got, want, low):
        assert g.is_cuda
        assert_close_to_oracle(g, w, lo, name=n)


@pytest.mark.cuda
@pytest.mark.parametrize("variant,shape,block", CUDA_CASES)
def test_cuda_matches_cpu_float32(variant, shape, block):
    T, din, dout = shape
    a = make_inputs(T, din, dout, block, torch.float32, requires_grad=True)
    c = _to_cuda(a)
    v = "bat" if variant == "bat" else "balance"
    y = lrkernels.miss_linear(a["x"], a["weight"], a["bias"], a["miss_block"], variant=v)
    yc = lrkernels.miss_linear(c["x"], c["weight"], c["bias"], c["miss_block"], variant=v)
    torch.testing.assert_close(yc.cpu(), y, rtol=1e-4, atol=1e-4)
    gy = torch.randn_like(y)
    g = torch.autograd.grad(y, [a[n] for n in NAMES], gy)
    gc = torch.autograd.grad(yc, [c[n] for n in NAMES], gy.cuda())
    for n, u, w in zip(NAMES, g, gc):
        torch.testing.assert_close(w.cpu(), u, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad {n}: {m}")


@pytest.mark.cuda
def test_cuda_dropout_is_the_cpu_mask():
    a = make_inputs(40, 300, 20, (7, 20), torch.float32, requires_grad=True)
    c = _to_cuda(a)
    y, _ = OP(a["x"], a["weight"], a["bias"], a["miss_block"], 0.3, seed_tensor(11, "cpu"))
    yc, _ = OP(c["x"], c["weight"], c["bias"], c["miss_block"], 0.3, seed_tensor(11, "cuda"))
    torch.testing.assert_close(yc.cpu(), y, rtol=1e-4, atol=1e-4)
    gy = torch.randn_like(y)
    g = torch.autograd.grad(y, [a[n] for n in NAMES], gy)
    gc = torch.autograd.grad(yc, [c[n] for n in NAMES], gy.cuda())
    for n, u, w in zip(NAMES, g, gc):
        torch.testing.assert_close(w.cpu(), u, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad {n}: {m}")


@pytest.mark.cuda
def test_cuda_opcheck_compile_and_graph_capture():
    a = _to_cuda(make_inputs(5, 12, 8, (4, 8), torch.float32))
    b = _to_cuda(make_inputs(5, 12, 8, (2, 4, 4), torch.float32))
    seed = seed_tensor(5, "cuda")
    torch.library.opcheck(OP, (a["x"], a["weight"], a["bias"], a["miss_block"], 0.2, seed))
    torch.library.opcheck(BAT, (b["x"], b["weight"], b["bias"], b["miss_block"]))
    d = {n: v.detach() for n, v in a.items()}
    y, s = OP(d["x"], d["weight"], d["bias"], d["miss_block"], 0.2, seed)
    torch.library.opcheck(BWD, (torch.randn_like(y), d["x"], d["weight"], d["miss_block"], s, 0.2, seed, [True] * 4))
    e = {n: v.detach() for n, v in b.items()}
    torch.library.opcheck(BAT_BWD, (torch.randn_like(y), e["x"], e["weight"], e["miss_block"], [True] * 4))
    torch._dynamo.reset()
    cf = torch.compile(lambda x, w, bi, m: lrkernels.miss_linear(x, w, bi, m, variant="bat"), fullgraph=True)
    cf(b["x"], b["weight"], b["bias"], b["miss_block"]).sum().backward()
    assert b["miss_block"].grad is not None
    f = lambda: OP(d["x"], d["weight"], d["bias"], d["miss_block"], 0.2, seed)[0]  # noqa: E731
    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        want = f()
    torch.cuda.current_stream().wait_stream(st)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=st):
        out = f()
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want)
