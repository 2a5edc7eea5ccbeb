"""Property-based tests (hypothesis): every op against its float64 oracle on random shapes
(0 and 1 included, odd sizes), non-contiguous and broadcast (stride-0) leading dims, and every
supported dtype combination, forward and gradients.

Each example is compared with assert_close_to_oracle's per-element bound, `mag` being the
oracle evaluated on the inputs' absolute values (the scale rounding errors grow with).
Examples are derandomized (the same on every run and machine) so CI failures reproduce; a
failure prints the falsifying example.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lrkernels
from lrkernels.ops._util import seed_tensor
from lrkernels.reference import c3a as ref_c3a
from lrkernels.reference import galore as ref_galore
from lrkernels.reference import gqa as ref_gqa
from lrkernels.reference import lora as ref_lora
from lrkernels.reference import miss as ref_miss
from lrkernels.reference import multi_lora as ref_multi
from lrkernels.reference.philox import dropout_mask as ref_dropout_mask

from conftest import assert_close_to_oracle

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
# (compute dtype of x / base layer, dtype of the adapter tensors)
SAME_DTYPES = [(F32, F32), (F64, F64), (BF16, BF16)]
MIXED_DTYPES = SAME_DTYPES + [(BF16, F32)]

lead_shapes = st.lists(st.integers(0, 4), min_size=1, max_size=3)
layouts = st.sampled_from(["contiguous", "strided", "broadcast"])


def _rand(shape, dtype, scale=1.0, gen=None):
    return (torch.randn(*shape, dtype=torch.float64, generator=gen) * scale).to(dtype)


def _with_layout(t, layout):
    """The same values as t (..., n), laid out contiguous, with a strided last-but-one dims view,
    or as a stride-0 broadcast over a new leading dim (then the values repeat along it)."""
    if layout == "strided":
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype)
        big[..., 1::2] = t
        return big[..., 1::2]
    if layout == "broadcast":
        return t.unsqueeze(0).expand(2, *t.shape)
    return t


def _leaf(t):
    return t.detach().clone().requires_grad_(True) if t is not None else None


def _check_forward_and_grads(run, oracle, inputs, grad_names, dtype, name):
    """run(**inputs) and oracle(**inputs, dtype=...) on leaves; compares the output and the
    gradients of grad_names (each in its own tensor's dtype) against the float64 oracle."""
    leaves = {k: (_leaf(v) if k in grad_names else v) for k, v in inputs.items()}
    y = run(**leaves)
    y64 = oracle(**{k: (v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                    for k, v in inputs.items()}, dtype=torch.float64)
    low = oracle(**inputs, dtype=dtype)
    mag = oracle(**{k: (v.detach().double().abs() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                    for k, v in inputs.items()}, dtype=torch.float64)
    assert y.dtype == dtype, f"{name}: output dtype {y.dtype}, want {dtype}"
    assert_close_to_oracle(y, y64, low, name=f"{name} output", mag=mag)
    if y.numel() == 0 or not grad_names:
        return
    gy = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    wanted = [k for k in grad_names if leaves[k] is not None]
    got = torch.autograd.grad(y, [leaves[k] for k in wanted], gy, allow_unused=True)

    def oracle_grads(dt):
        lv = {k: (v.detach().to(dt).requires_grad_(True) if k in wanted else v) for k, v in inputs.items()}
        out = oracle(**lv, dtype=dt)
        return torch.autograd.grad(out, [lv[k] for k in wanted], gy.to(dt), allow_unused=True)

    want64 = oracle_grads(torch.float64)
    low_g = oracle_grads(dtype)
    for k, g, w, lo in zip(wanted, got, want64, low_g):
        w = torch.zeros_like(leaves[k], dtype=torch.float64) if w is None else w
        lo = torch.zeros_like(w) if lo is None else lo
        assert g is not None, f"{name}: no gradient for {k}"
        assert g.dtype == leaves[k].dtype, f"{name}: grad {k} has dtype {g.dtype}, want {leaves[k].dtype}"
        assert g.shape == leaves[k].shape
        # gradients are sums over tokens of products: one bound over each gradient, as the
        # oracle's own gradient magnitudes are not available elementwise without a second pass
        assert_close_to_oracle(g, w, lo, name=f"{name} grad {k}")


# ---------------------------------------------------------------------------- dropout mask

@SETTINGS
@given(rows=st.integers(0, 40), cols=st.integers(0, 300), p=st.sampled_from([0.0, 0.1, 0.5, 0.95]),
       seed=st.integers(0, 2**64 - 1))
def test_dropout_mask_matches_reference(rows, cols, p, seed):
    got = lrkernels.dropout_mask(rows, cols, p, seed, dtype=torch.float64)
    torch.testing.assert_close(got, ref_dropout_mask(seed, rows, cols, p), rtol=0, atol=0)


# ---------------------------------------------------------------------------- lora_linear

@SETTINGS
@given(lead=lead_shapes, din=st.integers(1, 40), dout=st.integers(1, 40), r=st.integers(1, 17),
       dtypes=st.sampled_from(SAME_DTYPES), bias=st.booleans(), g=st.booleans(), o=st.booleans(),
       p=st.sampled_from([0.0, 0.3]), layout=layouts, seed=st.integers(0, 2**32))
def test_lora_linear(lead, din, dout, r, dtypes, bias, g, o, p, layout, seed):
    dt, at = dtypes
    x = _with_layout(_rand((*lead, din), dt), layout)
    inputs = dict(x=x, weight=_rand((dout, din), dt, din ** -0.5), bias=_rand((dout,), dt) if bias else None,
                  lora_a=_rand((r, din), at, din ** -0.5), lora_b=_rand((dout, r), at, r ** -0.5),
                  rank_scale=_rand((r,), at) if g else None, out_scale=_rand((dout,), at) if o else None)

    def run(x, weight, bias, lora_a, lora_b, rank_scale, out_scale):
        y, _ = torch.ops.lrkernels.lora_linear(x, weight, bias, lora_a, lora_b, 0.7, rank_scale, out_scale, p,
                                               seed_tensor(seed, "cpu") if p > 0 else None)
        return y

    def oracle(x, weight, bias, lora_a, lora_b, rank_scale, out_scale, dtype):
        return ref_lora.lora_linear(x.reshape(-1, din), weight, bias, lora_a, lora_b, scale=0.7, rank_scale=rank_scale,
                                    out_scale=out_scale, dropout_p=p, seed=seed, dtype=dtype).reshape(
                                        *x.shape[:-1], dout)

    _check_forward_and_grads(run, oracle, inputs, ["x", "weight", "bias", "lora_a", "lora_b", "rank_scale",
                                                   "out_scale"], dt, "lora_linear")


# ---------------------------------------------------------------------------- multi-LoRA

@SETTINGS
@given(lead=lead_shapes, din=st.integers(1, 33), dout=st.integers(1, 33), L=st.integers(1, 4),
       r_max=st.integers(1, 9), dtypes=st.sampled_from(SAME_DTYPES), bias=st.booleans(), layout=layouts,
       data=st.data())
def test_multi_lora_linear(lead, din, dout, L, r_max, dtypes, bias, layout, data):
    dt, at = dtypes
    x = _with_layout(_rand((*lead, din), dt), layout)
    ntok = math.prod(x.shape[:-1])
    ids = torch.tensor(data.draw(st.lists(st.integers(-1, L - 1), min_size=ntok, max_size=ntok)),
                       dtype=torch.int64).reshape(x.shape[:-1])
    ranks = torch.tensor(data.draw(st.lists(st.integers(0, r_max), min_size=L, max_size=L)), dtype=torch.int64)
    inputs = dict(x=x, weight=_rand((dout, din), dt, din ** -0.5), bias=_rand((dout,), dt) if bias else None,
                  lora_a=_rand((L, r_max, din), at, din ** -0.5), lora_b=_rand((L, dout, r_max), at),
                  scales=(torch.rand(L, dtype=torch.float64) + 0.5).float())

    def run(x, weight, bias, lora_a, lora_b, scales):
        return lrkernels.multi_lora_linear(x, weight, bias, lora_a, lora_b, ids, scales=scales, ranks=ranks)

    def oracle(x, weight, bias, lora_a, lora_b, scales, dtype):
        return ref_multi.multi_lora_linear(x.reshape(-1, din), weight, bias, lora_a, lora_b, ids.reshape(-1),
                                           scales=scales, ranks=ranks, dtype=dtype).reshape(*x.shape[:-1], dout)

    _check_forward_and_grads(run, oracle, inputs, ["x", "weight", "bias", "lora_a", "lora_b", "scales"], dt,
                             "multi_lora_linear")


# ---------------------------------------------------------------------------- C3A

@SETTINGS
@given(lead=lead_shapes, b=st.integers(1, 9), n_in=st.integers(1, 4), n_out=st.integers(1, 4),
       dtypes=st.sampled_from(MIXED_DTYPES), bias=st.booleans(), layout=layouts, linear=st.booleans())
def test_c3a(lead, b, n_in, n_out, dtypes, bias, layout, linear):
    dt, kt = dtypes
    din, dout = n_in * b, n_out * b
    x = _with_layout(_rand((*lead, din), dt), layout)
    inputs = dict(x=x, weight=_rand((dout, din), dt, din ** -0.5), bias=_rand((dout,), dt) if bias else None,
                  kernel=_rand((n_out, n_in, b), kt, 1 / din))
    if linear:
        def run(x, weight, bias, kernel):
            return lrkernels.c3a_linear(x, weight, bias, kernel, scale=0.5)

        def oracle(x, weight, bias, kernel, dtype):
            return ref_c3a.c3a_linear(x, weight, bias, kernel, scale=0.5, dtype=dtype)
        names = ["x", "weight", "bias", "kernel"]
    else:
        inputs = dict(x=x, kernel=inputs["kernel"])

        def run(x, kernel):
            return lrkernels.c3a(x, kernel, scale=0.5)

        def oracle(x, kernel, dtype):
            return ref_c3a.c3a(x, kernel, scale=0.5, dtype=dtype)
        names = ["x", "kernel"]
    _check_forward_and_grads(run, oracle, inputs, names, dt, "c3a_linear" if linear else "c3a")


# ---------------------------------------------------------------------------- Bone / MiSS

@SETTINGS
@given(lead=lead_shapes, r=st.integers(1, 9), din_extra=st.integers(0, 30), n_out=st.integers(1, 5),
       variant=st.sampled_from(["balance", "mini", "bat"]), dtypes=st.sampled_from(MIXED_DTYPES),
       bias=st.booleans(), layout=layouts, path=st.sampled_from(["auto", "blocked"]),
       p=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 2**32))
def test_miss_linear(lead, r, din_extra, n_out, variant, dtypes, bias, layout, path, p, seed):
    dt, mt = dtypes
    if variant == "bat":
        din, dout, block, p = r * (1 + din_extra % 4), r * n_out, (n_out, r, r), 0.0
    else:
        din, dout = r + din_extra, 2 * n_out
        block = (r, dout) if variant == "balance" else (r, n_out)
    x = _with_layout(_rand((*lead, din), dt), layout)
    inputs = dict(x=x, weight=_rand((dout, din), dt, din ** -0.5), bias=_rand((dout,), dt) if bias else None,
                  miss_block=_rand(block, mt, 0.3))

    def run(x, weight, bias, miss_block):
        with lrkernels.use_cpu_kernels(path):
            if variant == "bat":
                return torch.ops.lrkernels.miss_bat_linear(x, weight, bias, miss_block)
            return torch.ops.lrkernels.miss_linear(x, weight, bias, miss_block, p,
                                                   seed_tensor(seed, "cpu") if p > 0 else None)[0]

    def oracle(x, weight, bias, miss_block, dtype):
        return ref_miss.miss_linear(x.reshape(-1, din), weight, bias, miss_block, dropout_p=p, seed=seed,
                                    dtype=dtype).reshape(*x.shape[:-1], dout)

    _check_forward_and_grads(run, oracle, inputs, ["x", "weight", "bias", "miss_block"], dt, f"miss {variant}")


# ---------------------------------------------------------------------------- GaLore step ops

@SETTINGS
@given(m=st.integers(0, 24), n=st.integers(0, 24), mdt=st.sampled_from([F32, BF16, F64]),
       gdt=st.sampled_from([F32, BF16, F64]), strided=st.booleans())
def test_galore_adam_moments(m, n, mdt, gdt, strided):
    if (mdt == F64) != (gdt == F64):
        gdt = mdt if mdt == F64 else gdt if gdt != F64 else F32
    ea, es = _rand((m, n), mdt, 0.1), _rand((m, n), mdt, 0.1).abs()
    grad = _rand((m, n), gdt)
    if strided:
        grad = _with_layout(grad, "strided")
    e1, e2 = ea.clone(), es.clone()
    out = lrkernels.galore_adam_moments(e1, e2, grad, beta1=0.9, beta2=0.99, eps=1e-6)
    m64, v64, n64 = ref_galore.galore_adam_moments(ea, es, grad, 0.9, 0.99, 1e-6)
    m_lo, v_lo, n_lo = ref_galore.galore_adam_moments(ea, es, grad, 0.9, 0.99, 1e-6, dtype=out.dtype)
    # the moments are stored in their own dtype: the reference rounds there too
    m_lo, v_lo = m_lo.to(mdt), v_lo.to(mdt)
    assert_close_to_oracle(e1, m64, m_lo, name="exp_avg", mag=ea.double().abs() * 0.9 + grad.double().abs() * 0.1)
    assert_close_to_oracle(e2, v64, v_lo, name="exp_avg_sq",
                           mag=es.double().abs() * 0.99 + grad.double().square() * 0.01)
    # N is computed from the moments as stored (rounded to their dtype), as the kernels do
    n64 = e1.double() / (e2.double().sqrt() + 1e-6)
    n_lo = (e1.to(out.dtype) / (e2.to(out.dtype).sqrt() + 1e-6))
    assert_close_to_oracle(out, n64, n_lo, name="N", mag=n64.abs())


@SETTINGS
@given(m=st.integers(1, 20), n=st.integers(1, 20), r=st.integers(1, 6), left=st.booleans(),
       dt=st.sampled_from([F32, BF16, F64]), residual=st.booleans())
def test_galore_apply_update(m, n, r, left, dt, residual):
    w = _rand((m, n), dt)
    proj = _rand((m, r) if left else (r, n), dt)
    upd = _rand((r, n) if left else (m, r), torch.float64 if dt == F64 else F32)
    res_g = _rand((m, n), dt) if residual else None
    res_s = (_rand((1, n) if left else (m, 1), upd.dtype)) if residual else None
    w1 = w.clone()
    lrkernels.galore_apply_update(w1, proj, upd, project_left=left, alpha=-0.3, beta=0.99, residual_grad=res_g,
                                  residual_scale=res_s, residual_alpha=-0.1)
    args = (proj, upd, left, -0.3, 0.99, res_g, res_s, -0.1)
    want = ref_galore.galore_apply_update(w, *args)
    low = ref_galore.galore_apply_update(w, *args, dtype=dt)
    mag = ref_galore.galore_apply_update(w.abs(), proj.abs(), upd.abs(), left, 0.3, 0.99,
                                         None if res_g is None else res_g.abs(),
                                         None if res_s is None else res_s.abs(), 0.1)
    assert_close_to_oracle(w1, want, low, name="weight", mag=mag)


# ---------------------------------------------------------------------------- GQA attention

@SETTINGS
@given(B=st.integers(0, 3), Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 4, 8]), Sq=st.integers(0, 9),
       Sk=st.integers(0, 150), D=st.integers(1, 40), dt=st.sampled_from([F32, F64, BF16]), causal=st.booleans(),
       lens=st.booleans(), mask=st.sampled_from([None, "bool", "additive"]), bshd=st.booleans(),
       seed=st.integers(0, 2**31), data=st.data())
def test_gqa_attention(B, Hkv, G, Sq, Sk, D, dt, causal, lens, mask, bshd, seed, data):
    Hq = Hkv * G
    gen = torch.Generator().manual_seed(seed)

    def t(H, S):
        x = _rand((B, S, H, D), dt, gen=gen).transpose(1, 2) if bshd else _rand((B, H, S, D), dt, gen=gen)
        return x

    q, k, v = t(Hq, Sq), t(Hkv, Sk), t(Hkv, Sk)
    kv_lens = torch.tensor(data.draw(st.lists(st.integers(0, Sk), min_size=B, max_size=B)),
                           dtype=torch.int64) if lens else None
    # a mask broadcast over some dims: each of (B, Hq, Sq, Sk) kept or made 1
    keep = data.draw(st.lists(st.booleans(), min_size=4, max_size=4))
    shape = [n if kp else 1 for n, kp in zip((B, Hq, Sq, Sk), keep)]
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.rand(shape, generator=gen) > 0.3
    elif mask == "additive":
        attn_mask = _rand(shape, dt, gen=gen).masked_fill(torch.rand(shape, generator=gen) < 0.2, float("-inf"))
    kw = dict(causal=causal, scale=0.4, kv_lens=kv_lens, attn_mask=attn_mask)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    o = lrkernels.gqa_attention(*leaves, **kw)
    assert o.dtype == dt and o.shape == (B, Hq, Sq, D)
    want = ref_gqa.gqa_attention(q, k, v, **kw)
    low = ref_gqa.gqa_attention(q, k, v, dtype=dt, **kw)
    # the output's rounding errors scale with P|V|
    assert_close_to_oracle(o, want, low, name="gqa_attention output", mag=ref_gqa.gqa_attention(q, k, v.abs(), **kw))
    if o.numel() == 0:
        return
    go = _rand(o.shape, dt, gen=gen)
    got = torch.autograd.grad(o, leaves, go)

    def oracle_grads(d):
        lv = [x.detach().to(d).requires_grad_(True) for x in (q, k, v)]
        return torch.autograd.grad(ref_gqa.gqa_attention(*lv, dtype=d, **kw), lv, go.to(d))

    # dS = P ⊙ (dO·v − Di) cancels (exactly, with one visible key): the kernel's rounding there is
    # eps·D·|dO|·(|v| + |o|) per score, which the plain softmax reference does not make (it can be
    # exact), so dq and dk also get that absolute floor: ·scale·|k| (dq, Σ_j P = 1) and
    # ·scale·|q|·(rows sharing a key) (dk).
    eps = torch.finfo(torch.float64 if dt == F64 else torch.float32).eps
    amax = lambda x: x.detach().double().abs().max().item() if x.numel() else 0.0  # noqa: E731
    cancel = 4 * eps * D * amax(go) * (amax(v) + amax(o))
    abs_floor = {"q": cancel * 0.4 * amax(k), "k": cancel * 0.4 * amax(q) * G * Sq, "v": 0.0}
    default = {F64: 1e-12, F32: 1e-6, BF16: 1e-3}[dt]
    for n, g, w, lo in zip("qkv", got, oracle_grads(torch.float64), oracle_grads(dt)):
        assert g.dtype == dt and g.shape == w.shape
        floor = max(default, abs_floor[n] / max(amax(w), 1.0))
        assert_close_to_oracle(g, w, lo, name=f"gqa_attention grad {n}", floor=floor)
