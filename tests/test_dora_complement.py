"""dropout_complement_linear: (x ⊙ dropped) Wᵀ against the float64 oracle built from
dropout_mask, its x gradient, every instruction set, gradcheck, opcheck, bad inputs; and the
keep-scale helper the DoRA path relies on (the PEFT-equality of that path is in
test_peft_integration.py)."""

import pytest
import torch

import lrkernels
from lrkernels.ops.common import dropout_keep_scale
from lrkernels.ops.dora import dropout_complement_linear

from conftest import assert_close_to_oracle

OP = torch.ops.lrkernels.dropout_complement_linear.default
BWD = torch.ops.lrkernels.dropout_complement_linear_backward.default

# (leading shape, in, out, p): in not a multiple of 8 (partial keep-bit words) nor of a vector,
# out past 4 vectors with a tail, leading dims, a single token, no tokens, p = 0, high p
SHAPES = [
    ((37,), 29, 45, 0.3),
    ((3, 11), 64, 80, 0.05),
    ((1,), 7, 3, 0.5),
    ((0,), 16, 8, 0.2),
    ((20,), 40, 130, 0.0),
    ((65,), 100, 33, 0.9),
]


def _oracle(x, w, seed, p):
    t = x.shape[:-1].numel()
    dropped = lrkernels.dropout_mask(t, x.shape[-1], p, seed, dtype=torch.float64) == 0
    return (x.to(torch.float64) * dropped.reshape(x.shape)) @ w.to(torch.float64).t()


@pytest.mark.parametrize("lead, din, dout, p", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_grad_match_oracle(dtype, lead, din, dout, p, cpu_capability):
    g = torch.Generator().manual_seed(din * 1000 + dout)
    x = torch.randn(*lead, din, generator=g, dtype=torch.float64).to(dtype)
    x.view(-1)[::5] = 0  # zero inputs are skipped by the kernel: they must still come out right
    w = (torch.randn(dout, din, generator=g, dtype=torch.float64) / din ** 0.5).to(dtype)
    xr = x.clone().requires_grad_(True)
    y = dropout_complement_linear(xr, w, 1234, p)
    assert y.shape == (*lead, dout) and y.dtype == dtype
    dropped = lrkernels.dropout_mask(x.shape[:-1].numel(), din, p, 1234, dtype=torch.float64).reshape(x.shape) == 0
    want = _oracle(x, w, 1234, p)
    low = (x * dropped.to(dtype)) @ w.t()  # the formula in x's precision
    mag = _oracle(x.abs(), w.abs(), 1234, p)
    assert_close_to_oracle(y, want, low, "y", floor=1e-12, mag=mag)
    gy = torch.randn(*lead, dout, generator=g, dtype=torch.float64).to(dtype)
    (gx,) = torch.autograd.grad(y, xr, gy)
    x64 = x.to(torch.float64).requires_grad_(True)
    (gwant,) = torch.autograd.grad(_oracle(x64, w, 1234, p), x64, gy.to(torch.float64))
    gmag = (gy.abs().to(torch.float64) @ w.abs().to(torch.float64)) * dropped
    glow = ((gy @ w) * dropped.to(dtype))
    assert_close_to_oracle(gx, gwant, glow, "grad x", floor=1e-12, mag=gmag)
    assert bool((gx[~dropped] == 0).all()), "kept entries get no gradient from the complement"


def test_complement_and_mask_rebuild_x_d_times_w():
    """The identity the DoRA path uses: x_d Wᵀ = keep_scale · (x Wᵀ − complement)."""
    x = torch.randn(50, 24, dtype=torch.float64)
    w = torch.randn(18, 24, dtype=torch.float64)
    for p in (0.05, 0.3):
        mask = lrkernels.dropout_mask(50, 24, p, 9, dtype=torch.float64)
        ks = dropout_keep_scale(p)
        assert float(mask.max()) == pytest.approx(ks, rel=1e-7)
        got = ks * (x @ w.t() - dropout_complement_linear(x, w, 9, p))
        torch.testing.assert_close(got, (x * mask) @ w.t(), rtol=1e-6, atol=1e-12)


def test_dropout_keep_scale_is_the_masks_value():
    for p in (0.0, 1e-6, 0.05, 0.1, 0.25, 0.5, 0.9):
        m = lrkernels.dropout_mask(64, 64, p, 3)
        nz = m[m != 0]
        assert bool((nz == dropout_keep_scale(p)).all()), p


def test_gradcheck():
    x = torch.randn(6, 13, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 13, dtype=torch.float64)
    seed = torch.tensor(5, dtype=torch.int64)
    assert torch.autograd.gradcheck(lambda t: OP(t, w, seed, 0.4), (x,))


def test_opcheck():
    x = torch.randn(4, 3, 10)
    w = torch.randn(7, 10)
    seed = torch.tensor(17, dtype=torch.int64)
    torch.library.opcheck(OP, (x, w, seed, 0.3))
    torch.library.opcheck(BWD, (torch.randn(4, 3, 7), w, seed, 0.3))


def test_compile_fullgraph():
    x = torch.randn(8, 12, requires_grad=True)
    w = torch.randn(5, 12)
    seed = torch.tensor(3, dtype=torch.int64)
    f = torch.compile(lambda t: OP(t, w, seed, 0.25).sum(), fullgraph=True, backend="aot_eager")
    f(x).backward()
    g = x.grad.clone()
    x.grad = None
    OP(x, w, seed, 0.25).sum().backward()
    torch.testing.assert_close(g, x.grad)


def test_bad_inputs():
    x, w = torch.randn(4, 6), torch.randn(5, 6)
    seed = torch.tensor(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="weight must have shape"):
        OP(x, torch.randn(5, 7), seed, 0.1)
    with pytest.raises(TypeError, match="float32 or float64"):
        OP(x.bfloat16(), w.bfloat16(), seed, 0.1)
    with pytest.raises(TypeError, match="weight"):
        OP(x, w.double(), seed, 0.1)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        OP(x, w, seed, 1.0)
    with pytest.raises(ValueError, match="seed must have one element"):
        BWD(torch.randn(4, 5), w, torch.zeros(2, dtype=torch.int64), 0.1)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        BWD(torch.randn(4, 6), w, seed, 0.1)
    wt = w.clone().requires_grad_(True)
    y = dropout_complement_linear(x, wt, seed, 0.1)
    with pytest.raises(NotImplementedError, match="must be frozen"):
        y.sum().backward()
