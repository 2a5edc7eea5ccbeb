"""Sparse plus low-rank linear (SLTrain, LOST): the op against the float64 oracle (SLTrain's own
dense formula) for random and columns supports, every gradient, both forward paths, gradcheck,
opcheck on every op, torch.compile, equivalence with SLTrain's algorithm on its 60M shapes,
edge densities and ranks, bad inputs, and the SparseLowRankLinear module and converter."""

import itertools
import pytest
import torch
from torch import nn

import lrkernels
from lrkernels.reference import sparse_lowrank as ref

from conftest import assert_close_to_oracle, cpu_dtypes, cuda_dtypes

OP = torch.ops.lrkernels.sparse_lowrank_linear.default
BWD = torch.ops.lrkernels.sparse_lowrank_linear_backward.default
COMPRESS = torch.ops.lrkernels.sparse_support_compress.default

# (tokens, in, out, r, density): in ≠ out, rank 1, odd sizes, several token tiles, empty batch,
# several backward chunks of tokens with a partial last one (r = 200: 655 tokens per chunk in
# float32, 327 in float64)
SHAPES = [
    (1500, 24, 20, 200, 0.1),
    (7, 16, 8, 4, 0.2),
    (5, 12, 18, 1, 0.3),
    (33, 24, 20, 6, 0.1),
    (300, 40, 24, 3, 0.05),
    (9, 10, 10, 10, 0.5),
    (0, 8, 12, 2, 0.25),
]
KINDS = ["random", "columns"]


def make_inputs(T, din, dout, r, density, kind, dtype=torch.float32, *, bias=True, lead=None, param_dtype=None):
    pd = dtype if param_dtype is None else param_dtype
    t = lambda *s, sc=1.0, d=pd: (torch.randn(*s, dtype=torch.float64) * sc).to(d)  # noqa: E731
    shape = (T, din) if lead is None else (*lead, din)
    a = dict(x=t(*shape, d=dtype), lora_a=t(r, din, sc=max(din, 1) ** -0.5), lora_b=t(dout, r, sc=r ** -0.5),
             bias=t(dout) if bias else None)
    if kind == "random":
        nnz = int(round(density * din * dout))
        idx = torch.randperm(din * dout)[:nnz]  # any order, as SLTrain stores them
        a["sparse_values"] = t(nnz)
        sup = lrkernels.sparse_support(dout, din, indices=idx)
    else:
        n = int(round(density * din))
        cols = torch.randperm(din)[:n]
        a["sparse_values"] = t(dout, n)
        sup = lrkernels.sparse_support(dout, din, columns=cols)
    return a, sup


def oracle_kw(sup):
    return {"indices": sup.indices} if sup.kind == "random" else {"columns": sup.columns}


def run_oracle(a, sup, scale, dtype=torch.float64, absolute=False):
    f = (lambda v: v.detach().abs()) if absolute else (lambda v: v)
    return ref.sparse_lowrank_linear(f(a["x"]), f(a["lora_a"]), f(a["lora_b"]), f(a["sparse_values"]),
                                     None if a["bias"] is None else f(a["bias"]), scale=abs(scale), dtype=dtype,
                                     **oracle_kw(sup)) if absolute else \
        ref.sparse_lowrank_linear(a["x"], a["lora_a"], a["lora_b"], a["sparse_values"], a["bias"], scale=scale,
                                  dtype=dtype, **oracle_kw(sup))


def call(a, sup, scale):
    return lrkernels.sparse_lowrank_linear(a["x"], a["lora_a"], a["lora_b"], a["sparse_values"], sup, a["bias"],
                                           scale=scale)


# ---------------------------------------------------------------------------- oracle itself

def test_oracle_dense_weight_is_sltrains_formula():
    a = torch.randn(3, 5, dtype=torch.float64)
    b = torch.randn(4, 3, dtype=torch.float64)
    idx = torch.tensor([7, 0, 19, 12])
    v = torch.randn(4, dtype=torch.float64)
    w = ref.dense_weight(a, b, v, indices=idx, scale=0.5)
    expect = 0.5 * b @ a
    for k in range(4):
        expect[idx[k] // 5, idx[k] % 5] += v[k]
    torch.testing.assert_close(w, expect)
    cols = torch.tensor([4, 1])
    vc = torch.randn(4, 2, dtype=torch.float64)
    wc = ref.dense_weight(a, b, vc, columns=cols, scale=0.5)
    expect = 0.5 * b @ a
    expect[:, 4] += vc[:, 0]
    expect[:, 1] += vc[:, 1]
    torch.testing.assert_close(wc, expect)


# ---------------------------------------------------------------------------- forward

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,din,dout,r,density", SHAPES)
@pytest.mark.parametrize("dtype", cpu_dtypes())
def test_forward_matches_oracle(dtype, T, din, dout, r, density, kind, cpu_capability):
    a, sup = make_inputs(T, din, dout, r, density, kind, dtype)
    y = call(a, sup, 0.7)
    assert y.dtype == dtype and y.shape == (T, dout)
    assert_close_to_oracle(y, run_oracle(a, sup, 0.7), run_oracle(a, sup, 0.7, dtype=dtype), "y",
                           mag=run_oracle(a, sup, 0.7, absolute=True))


def test_plain_indices_and_compressed_support_agree():
    a, sup = make_inputs(20, 16, 12, 3, 0.2, "random")
    y1 = call(a, sup, 0.5)
    y2 = call(a, sup.indices, 0.5)  # flat int64 indices, compressed per call
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_densified_forward_path_matches_oracle(dtype, kind):
    # many tokens, r = the width: out·in·(r + T) < T·r·(in + out) so W is built transiently
    a, sup = make_inputs(200, 8, 6, 8, 0.3, kind, dtype)
    y = call(a, sup, 1.3)
    assert_close_to_oracle(y, run_oracle(a, sup, 1.3), run_oracle(a, sup, 1.3, dtype=dtype), "y",
                           mag=run_oracle(a, sup, 1.3, absolute=True))


def test_leading_dims_and_noncontiguous_input():
    a, sup = make_inputs(0, 16, 12, 4, 0.2, "random", lead=(3, 5))
    a["x"] = torch.randn(3, 16, 5).transpose(1, 2)  # (3, 5, 16), non-contiguous
    y = call(a, sup, 0.5)
    assert y.shape == (3, 5, 12)
    torch.testing.assert_close(y, run_oracle(a, sup, 0.5).float(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- backward

def grads_of(fn, a, gy):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in a.items() if v is not None}
    full = dict(a, **leaves)
    y = fn(full)
    y.backward(gy)
    return {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,din,dout,r,density", SHAPES)
@pytest.mark.parametrize("dtype", cpu_dtypes())
def test_backward_matches_oracle(dtype, T, din, dout, r, density, kind, cpu_capability):
    a, sup = make_inputs(T, din, dout, r, density, kind, dtype)
    gy = torch.randn(T, dout, dtype=torch.float64).to(dtype)
    got = grads_of(lambda v: call(v, sup, 0.7), a, gy)
    a64 = {k: (None if v is None else v.to(torch.float64)) for k, v in a.items()}
    want = grads_of(lambda v: run_oracle(v, sup, 0.7), a64, gy.to(torch.float64))
    low = grads_of(lambda v: run_oracle(v, sup, 0.7, dtype=dtype), a, gy)
    absd = {k: (None if v is None else v.abs()) for k, v in a64.items()}
    mag = grads_of(lambda v: run_oracle(v, sup, 0.7), absd, gy.to(torch.float64).abs())
    for k in got:
        assert got[k].dtype == a[k].dtype, k
        assert_close_to_oracle(got[k], want[k], low[k], f"grad {k}", mag=mag[k])


@pytest.mark.parametrize("kind", KINDS)
def test_grad_only_where_needed_and_output_mask(kind):
    a, sup = make_inputs(6, 10, 8, 2, 0.3, kind)
    y = OP(a["x"], a["lora_a"], a["lora_b"], a["sparse_values"], sup.tensor, a["bias"], 0.5)
    gy = torch.randn_like(y)
    full = BWD(gy, a["x"], a["lora_a"], a["lora_b"], a["sparse_values"], sup.tensor, 0.5, [True] * 5)
    # every subset: the backward shares buffers and GEMMs between gradients (h and g in one
    # chunk buffer, [dB | dV] for the columns support), so each combination takes its own path
    for mask in itertools.product([False, True], repeat=5):
        part = BWD(gy, a["x"], a["lora_a"], a["lora_b"], a["sparse_values"], sup.tensor, 0.5, list(mask))
        for j in range(5):
            if mask[j]:
                torch.testing.assert_close(part[j], full[j])
            else:
                assert part[j] is None
    x = a["x"].clone().requires_grad_(True)
    lrkernels.sparse_lowrank_linear(x, a["lora_a"], a["lora_b"], a["sparse_values"], sup).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(kind, bias):
    a, sup = make_inputs(5, 7, 6, 2, 0.3, kind, torch.float64, bias=bias)
    names = [k for k in ("x", "lora_a", "lora_b", "sparse_values", "bias") if a[k] is not None]
    leaves = [a[k].clone().requires_grad_(True) for k in names]

    def f(*ts):
        d = dict(zip(names, ts))
        return lrkernels.sparse_lowrank_linear(d["x"], d["lora_a"], d["lora_b"], d["sparse_values"], sup,
                                               d.get("bias"), scale=0.6)

    assert torch.autograd.gradcheck(f, leaves)


# ---------------------------------------------------------------------------- edge cases

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("density", [0.0, "tiny", 1.0])
def test_edge_densities(density, kind):
    T, din, dout = 11, 20, 17
    d = 1.0 / (din * dout) if density == "tiny" and kind == "random" else (1.0 / din if density == "tiny" else density)
    a, sup = make_inputs(T, din, dout, 3, d, kind, torch.float64)
    assert sup.nnz == {0.0: 0, "tiny": 1 if kind == "random" else dout, 1.0: din * dout}[density]
    gy = torch.randn(T, dout, dtype=torch.float64)
    got = grads_of(lambda v: call(v, sup, 0.8), a, gy)
    want = grads_of(lambda v: run_oracle(v, sup, 0.8), a, gy)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(call(a, sup, 0.8), run_oracle(a, sup, 0.8), rtol=1e-10, atol=1e-10)


def test_zero_features_and_empty_batch():
    for T, din, dout in [(0, 6, 4), (3, 0, 4), (3, 6, 0)]:
        a, sup = make_inputs(T, din, dout, 2, 0.5, "random", torch.float64)
        a = {k: (None if v is None else v.clone().requires_grad_(True)) for k, v in a.items()}
        y = call(a, sup, 1.0)
        assert y.shape == (T, dout)
        y.sum().backward()
        torch.testing.assert_close(y, run_oracle(a, sup, 1.0))


# ---------------------------------------------------------------------------- SLTrain's algorithm

SLTRAIN_60M = [(512, 512), (512, 1376), (1376, 512)]  # LLaMA-60M: attention, gate/up, down projections


@pytest.mark.parametrize("din,dout", SLTRAIN_60M)
def test_matches_sltrain_algorithm_on_60m_shapes(din, dout):
    # SLTrain's 60M configuration: r = 128, δ = 0.03, α = 32 (s = α / r), bias-free projections
    T, r, density, scale = 64, 128, 0.03, 32 / 128
    a, sup = make_inputs(T, din, dout, r, density, "random", torch.float32, bias=False)
    gy = torch.randn(T, dout)
    ours = grads_of(lambda v: call(v, sup, scale), a, gy)
    theirs = grads_of(lambda v: ref.sltrain_linear(v["x"], v["lora_a"], v["lora_b"], v["sparse_values"],
                                                   sup.indices, scale=scale), a, gy)
    a64 = {k: (None if v is None else v.to(torch.float64)) for k, v in a.items()}
    want = grads_of(lambda v: run_oracle(v, sup, scale), a64, gy.double())
    absd = {k: (None if v is None else v.abs()) for k, v in a64.items()}
    mag = grads_of(lambda v: run_oracle(v, sup, scale), absd, gy.double().abs())
    y_ours = call(a, sup, scale)
    y_theirs = ref.sltrain_linear(a["x"], a["lora_a"], a["lora_b"], a["sparse_values"], sup.indices, scale=scale)
    # both float32 against the float64 oracle: ours within twice SLTrain's own error
    assert_close_to_oracle(y_ours, run_oracle(a, sup, scale), y_theirs, "y", mag=run_oracle(a, sup, scale,
                                                                                             absolute=True))
    for k in ours:
        assert_close_to_oracle(ours[k], want[k], theirs[k], f"grad {k}", mag=mag[k])
    # and in float64 the two algorithms agree to rounding
    ours64 = grads_of(lambda v: call(v, sup, scale), a64, gy.double())
    theirs64 = grads_of(lambda v: ref.sltrain_linear(v["x"], v["lora_a"], v["lora_b"], v["sparse_values"],
                                                     sup.indices, scale=scale), a64, gy.double())
    for k in ours64:
        torch.testing.assert_close(ours64[k], theirs64[k], rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------- opcheck / compile

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,din,dout,r,density", [(5, 12, 18, 1, 0.3), (7, 16, 8, 4, 0.2)])
def test_opcheck(T, din, dout, r, density, kind):
    a, sup = make_inputs(T, din, dout, r, density, kind)
    for support in ([sup.tensor, sup.indices] if kind == "random" else [sup.tensor]):
        for bias in (a["bias"], None):
            torch.library.opcheck(OP, (a["x"], a["lora_a"], a["lora_b"], a["sparse_values"], support, bias, 0.5))
    y = OP(a["x"], a["lora_a"], a["lora_b"], a["sparse_values"], sup.tensor, a["bias"], 0.5)
    gy = torch.randn_like(y)
    for mask in ([True] * 5, [True, False, False, True, False], [False, True, True, False, True]):
        torch.library.opcheck(BWD, (gy, a["x"], a["lora_a"], a["lora_b"], a["sparse_values"], sup.tensor, 0.5,
                                    mask))
    if kind == "random":
        torch.library.opcheck(COMPRESS, (sup.indices, dout, din))


def test_opcheck_bfloat16_with_float32_params():
    a, sup = make_inputs(6, 12, 10, 3, 0.2, "random", torch.bfloat16, param_dtype=torch.float32)
    torch.library.opcheck(OP, (a["x"], a["lora_a"], a["lora_b"], a["sparse_values"], sup.tensor, a["bias"], 0.5))


@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph_forward_backward(kind):
    a, sup = make_inputs(9, 16, 12, 3, 0.2, kind)
    leaves = {k: v.clone().requires_grad_(True) for k, v in a.items()}
    f = lambda d: lrkernels.sparse_lowrank_linear(d["x"], d["lora_a"], d["lora_b"], d["sparse_values"],  # noqa
                                                  sup, d["bias"], scale=0.5)
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    gy = torch.randn(9, 12)
    cf(leaves).backward(gy)
    want = grads_of(f, a, gy)
    for k, v in leaves.items():
        torch.testing.assert_close(v.grad, want[k])


def test_compile_inductor_module():
    m = lrkernels.nn.SparseLowRankLinear(16, 12, 4, 0.2)
    with torch.no_grad():
        m.lora_b.normal_()
    x = torch.randn(5, 16)
    cm = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(cm(x), m(x))
    cm(x).sum().backward()
    assert m.lora_a.grad is not None and m.sparse_values.grad is not None


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_under_inference_mode_and_no_grad(mode):
    a, sup = make_inputs(40, 16, 12, 3, 0.2, "random")
    ctx = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with ctx:
        y = call(a, sup, 0.5)
    torch.testing.assert_close(y, run_oracle(a, sup, 0.5).float(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- mixed precision

def test_bfloat16_input_float32_params_and_autocast():
    a, sup = make_inputs(8, 16, 12, 3, 0.2, "random", torch.bfloat16, param_dtype=torch.float32)
    a = {k: v.requires_grad_(True) for k, v in a.items()}
    y = call(a, sup, 0.5)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    for k in ("lora_a", "lora_b", "sparse_values", "bias"):
        assert a[k].grad.dtype == torch.float32, k
    assert a["x"].grad.dtype == torch.bfloat16
    b, sup2 = make_inputs(8, 16, 12, 3, 0.2, "columns")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = call(b, sup2, 0.5)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), run_oracle(b, sup2, 0.5).float(), rtol=3e-2, atol=3e-2)


# ---------------------------------------------------------------------------- bad inputs

def _base():
    return make_inputs(4, 6, 5, 2, 0.3, "random")


def test_bad_support_construction():
    with pytest.raises(ValueError, match="indices.*duplicate"):
        lrkernels.sparse_support(5, 6, indices=torch.tensor([3, 7, 3]))
    with pytest.raises(IndexError, match=r"indices\[1\] = 30 is out of range"):
        lrkernels.sparse_support(5, 6, indices=torch.tensor([3, 30]))
    with pytest.raises(IndexError, match=r"indices\[0\] = -1"):
        lrkernels.sparse_support(5, 6, indices=torch.tensor([-1]))
    with pytest.raises(IndexError, match=r"columns\[1\] = 6 is out of range"):
        lrkernels.sparse_support(5, 6, columns=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="columns has duplicate"):
        lrkernels.sparse_support(5, 6, columns=torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="exactly one"):
        lrkernels.sparse_support(5, 6)
    with pytest.raises(ValueError, match="exactly one"):
        lrkernels.sparse_support(5, 6, indices=torch.tensor([1]), columns=torch.tensor([1]))
    with pytest.raises(TypeError, match="indices must be int64"):
        lrkernels.sparse_support(5, 6, indices=torch.tensor([1], dtype=torch.int32))


def test_bad_inputs_op():
    a, sup = _base()
    args = lambda **kw: {**a, **kw}  # noqa: E731
    with pytest.raises(ValueError, match=r"sparse_values must have shape \(nnz,\)"):
        call(args(sparse_values=torch.randn(a["sparse_values"].numel() + 1)), sup, 1.0)
    with pytest.raises(ValueError, match=r"sparse_values must have shape \(nnz,\) = sparse_support's length"):
        call(args(sparse_values=torch.randn(a["sparse_values"].numel() + 1)), sup.indices, 1.0)
    with pytest.raises(ValueError, match="sparse_support has a duplicate"):
        call(args(sparse_values=torch.randn(2)), torch.tensor([4, 4]), 1.0)
    with pytest.raises(IndexError, match="out of range"):
        call(args(sparse_values=torch.randn(2)), torch.tensor([4, 30]), 1.0)
    with pytest.raises(ValueError, match=r"lora_b must have shape \(out_features, r\)"):
        call(args(lora_b=torch.randn(5, 3)), sup, 1.0)
    with pytest.raises(ValueError, match=r"lora_a must have shape \(r, in_features\)"):
        call(args(lora_a=torch.randn(2, 7)), sup, 1.0)
    with pytest.raises(ValueError, match=r"bias must have shape"):
        call(args(bias=torch.randn(6)), sup, 1.0)
    with pytest.raises(TypeError, match="lora_a has dtype"):
        call(args(lora_a=a["lora_a"].double()), sup, 1.0)
    with pytest.raises(TypeError, match="sparse_support must be int64"):
        call(a, sup.indices.float(), 1.0)
    with pytest.raises(ValueError, match="scale must be finite"):
        call(a, sup, float("nan"))
    bad = sup.tensor.clone()
    bad[5 + 1 + 2] = 99  # a csr_col entry
    with pytest.raises(IndexError, match="not a valid compressed support"):
        call(a, bad, 1.0)
    with pytest.raises(ValueError, match="length"):
        call(a, sup.tensor[:-1], 1.0)


def test_bad_inputs_columns():
    a, sup = make_inputs(4, 6, 5, 2, 0.5, "columns")
    with pytest.raises(ValueError, match=r"sparse_values must have shape \(out_features, n\)"):
        call({**a, "sparse_values": torch.randn(5, 4)}, sup, 1.0)
    with pytest.raises(IndexError, match="columns.*out of range"):
        call(a, torch.tensor([0, 1, 9]), 1.0)
    with pytest.raises(ValueError, match="duplicate column"):
        call(a, torch.tensor([0, 1, 1]), 1.0)


def test_bad_inputs_backward():
    a, sup = _base()
    y = OP(a["x"], a["lora_a"], a["lora_b"], a["sparse_values"], sup.tensor, a["bias"], 0.5)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        BWD(torch.randn(4, 6), a["x"], a["lora_a"], a["lora_b"], a["sparse_values"], sup.tensor, 0.5,
            [True] * 5)
    with pytest.raises(TypeError, match="grad_out has dtype"):
        BWD(torch.randn_like(y).double(), a["x"], a["lora_a"], a["lora_b"], a["sparse_values"], sup.tensor, 0.5,
            [True] * 5)


def test_mixed_devices_meta():
    a, sup = _base()
    with pytest.raises((ValueError, RuntimeError), match="meta|device"):
        call({**a, "lora_a": a["lora_a"].to("meta")}, sup, 1.0)


# ---------------------------------------------------------------------------- module

@pytest.mark.parametrize("support", ["random", "columns"])
def test_module_init_forward_and_to_dense(support):
    g = torch.Generator().manual_seed(3)
    m = lrkernels.nn.SparseLowRankLinear(40, 24, 4, 0.05, support=support, alpha=8, generator=g)
    assert torch.all(m.lora_b == 0)
    assert m.scaling == 2.0
    bound = 40 ** -0.5
    assert m.sparse_values.abs().max() <= bound and m.lora_a.abs().max() <= bound
    if support == "random":
        assert m.sparse_values.shape == (48,) and m.sparse_indices.unique().numel() == 48
    else:
        assert m.sparse_values.shape == (24, 2)
    with torch.no_grad():
        m.lora_b.normal_()
    x = torch.randn(7, 40)
    torch.testing.assert_close(m(x), torch.nn.functional.linear(x, m.to_dense(), m.bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.to_linear()(x), m(x), rtol=1e-5, atol=1e-5)
    sd = m.state_dict()
    m2 = lrkernels.nn.SparseLowRankLinear(40, 24, 4, 0.05, support=support, alpha=8)
    m2.load_state_dict(sd)
    torch.testing.assert_close(m2(x), m(x))


@pytest.mark.parametrize("support", ["random", "columns"])
def test_from_linear_svd(support):
    lin = nn.Linear(20, 16).double()
    full = lrkernels.nn.SparseLowRankLinear.from_linear(lin, 16, 0.1, support=support, alpha=4)
    torch.testing.assert_close(full.to_dense(), lin.weight.detach(), rtol=1e-10, atol=1e-10)  # full rank: exact
    m = lrkernels.nn.SparseLowRankLinear.from_linear(lin, 3, 0.2, support=support)
    u, s, vh = torch.linalg.svd(lin.weight.detach())
    lowrank = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close(m.scaling * m.lora_b @ m.lora_a, lowrank, rtol=1e-9, atol=1e-9)
    resid = lin.weight.detach() - lowrank
    if support == "random":
        torch.testing.assert_close(m.sparse_values.detach(), resid.reshape(-1)[m.sparse_indices])
    else:
        n = m.sparse_columns.numel()
        assert n == 4
        assert set(m.sparse_columns.tolist()) == set(resid.norm(dim=0).topk(n).indices.tolist())
        torch.testing.assert_close(m.sparse_values.detach(), resid[:, m.sparse_columns])
    # the approximation is closer than the low-rank part alone
    assert (m.to_dense() - lin.weight).norm() < resid.norm()
    torch.testing.assert_close(m.bias, lin.bias)


def test_module_trains():
    torch.manual_seed(0)
    m = lrkernels.nn.SparseLowRankLinear(16, 8, 4, 0.1)
    target = nn.Linear(16, 8)
    opt = torch.optim.Adam(m.parameters(), lr=3e-2)
    x = torch.randn(64, 16)
    losses = []
    for _ in range(60):
        loss = (m(x) - target(x).detach()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_convert_model_reports_parameter_counts():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.ModuleDict({"q_proj": nn.Linear(32, 32, bias=False), "o_proj": nn.Linear(32, 32,
                                                                                                    bias=False)})
            self.mlp = nn.ModuleDict({"up_proj": nn.Linear(32, 64, bias=False), "down_proj": nn.Linear(64, 32,
                                                                                                       bias=False)})
            self.lm_head = nn.Linear(32, 10)

    model = Block().double()
    x = torch.randn(3, 32, dtype=torch.float64)
    before = model.attn["q_proj"](x)
    rep = lrkernels.nn.convert_to_sparse_lowrank(model, 32, 0.05)
    assert sorted(rep["replaced"]) == ["attn.o_proj", "attn.q_proj", "mlp.down_proj", "mlp.up_proj"]
    assert isinstance(model.lm_head, nn.Linear)
    assert rep["params_before"] == 32 * 32 * 2 + 32 * 64 * 2 + 32 * 10 + 10
    expect = (32 * 64 + round(0.05 * 1024)) * 2 + (32 * 96 + round(0.05 * 2048)) * 2 + 330
    assert rep["params_after"] == expect
    # r = the width: the converted layer reproduces the original weight
    torch.testing.assert_close(model.attn["q_proj"](x), before, rtol=1e-9, atol=1e-9)
    rep2 = lrkernels.nn.convert_to_sparse_lowrank(Block(), 4, 0.05, target_modules=(r"mlp\.(up|down)_proj$",))
    assert sorted(rep2["replaced"]) == ["mlp.down_proj", "mlp.up_proj"]
    assert rep2["params_after"] < rep2["params_before"]


# ---------------------------------------------------------------------------- CUDA (never run on a GPU yet)

def _cuda(a, sup):
    return {k: (None if v is None else v.cuda()) for k, v in a.items()}, sup.to("cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,din,dout,r,density", [(7, 16, 8, 4, 0.2), (300, 40, 24, 3, 0.05), (0, 8, 12, 2, 0.25),
                                                  (1500, 24, 20, 200, 0.1), (9, 10, 10, 10, 0.0)])
@pytest.mark.parametrize("dtype", cuda_dtypes())
def test_cuda_forward_backward_match_oracle(dtype, T, din, dout, r, density, kind):
    pd = torch.float32 if dtype != torch.float32 else None
    a, sup = make_inputs(T, din, dout, r, density, kind, dtype, param_dtype=pd)
    ac, supc = _cuda(a, sup)
    y = call(ac, supc, 0.7)
    assert y.is_cuda and y.dtype == dtype and y.shape == (T, dout)
    assert_close_to_oracle(y.cpu(), run_oracle(a, sup, 0.7), run_oracle(a, sup, 0.7, dtype=dtype), "y",
                           mag=run_oracle(a, sup, 0.7, absolute=True))
    gy = torch.randn(T, dout, dtype=torch.float64).to(dtype)
    got = grads_of(lambda v: call(v, supc, 0.7), ac, gy.cuda())
    a64 = {k: (None if v is None else v.to(torch.float64)) for k, v in a.items()}
    want = grads_of(lambda v: run_oracle(v, sup, 0.7), a64, gy.to(torch.float64))
    low = grads_of(lambda v: run_oracle(v, sup, 0.7, dtype=dtype), a, gy)
    absd = {k: (None if v is None else v.abs()) for k, v in a64.items()}
    mag = grads_of(lambda v: run_oracle(v, sup, 0.7), absd, gy.to(torch.float64).abs())
    for k in got:
        assert got[k].is_cuda and got[k].dtype == a[k].dtype, k
        assert_close_to_oracle(got[k].cpu(), want[k], low[k], f"grad {k}", mag=mag[k])


@pytest.mark.cuda
def test_cuda_compress_deterministic_sddmm_and_clear_errors():
    a, sup = make_inputs(600, 16, 12, 4, 0.3, "random")
    ac, supc = _cuda(a, sup)
    packed = COMPRESS(sup.indices.cuda(), 12, 16)
    assert packed.is_cuda and torch.equal(packed.cpu(), sup.tensor)
    gy = torch.randn(600, 12, device="cuda")
    g1 = BWD(gy, ac["x"], ac["lora_a"], ac["lora_b"], ac["sparse_values"], supc.tensor, 0.7, [True] * 5)
    g2 = BWD(gy, ac["x"], ac["lora_a"], ac["lora_b"], ac["sparse_values"], supc.tensor, 0.7, [True] * 5)
    assert all(torch.equal(u, v) for u, v in zip(g1, g2))  # no atomics
    assert g1[4].dtype == torch.float32
    with pytest.raises(ValueError, match="lrkernels.sparse_support"):
        OP(ac["x"], ac["lora_a"], ac["lora_b"], ac["sparse_values"], sup.indices.cuda(), ac["bias"], 0.7)
    d = {k: (None if v is None else v.double()) for k, v in ac.items()}
    with pytest.raises(TypeError, match="float64"):
        OP(d["x"], d["lora_a"], d["lora_b"], d["sparse_values"], supc.tensor, d["bias"], 0.7)
