"""gqa_attention: the CPU kernel against the float64 oracle (scores materialised, masked,
soft-maxed) over group sizes, head dims, causal alignment with q_len ≠ kv_len, ragged kv_lens,
bool and additive masks (broadcast, never expanded), non-contiguous (B, S, H, D) views, empty
sizes, split-KV decode; gradients, gradcheck, opcheck, torch.compile, SDPA equivalence, bad
inputs, autocast. The CUDA kernels (marked cuda, skipped without a GPU): the same oracle for
fp32 / fp16 / bf16 forward and backward, agreement with the CPU op, split-KV decode, CUDA-graph
capture replayed with changing kv_lens, opcheck and torch.compile on CUDA tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

import lrkernels
from lrkernels.reference import gqa as ref

from conftest import assert_close_to_oracle, cpu_dtypes, cuda_dtypes

OP = torch.ops.lrkernels.gqa_attention.default
BWD = torch.ops.lrkernels.gqa_attention_backward.default
NINF = float("-inf")


def make_qkv(B, Hq, Hkv, Sq, Sk, D, dtype=torch.float32, *, layout="bhsd", requires_grad=False):
    """q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D); layout "bshd" gives transposed views of
    (B, S, H, D) tensors (non-contiguous, unit stride over D)."""
    def t(H, S):
        if layout == "bshd":
            x = torch.randn(B, S, H, D, dtype=torch.float64).to(dtype).transpose(1, 2)
        else:
            x = torch.randn(B, H, S, D, dtype=torch.float64).to(dtype)
        return x.requires_grad_(requires_grad)
    return t(Hq, Sq), t(Hkv, Sk), t(Hkv, Sk)


def check_forward(q, k, v, *, causal=False, scale=None, kv_lens=None, attn_mask=None, name="o"):
    """The op's o and lse against the oracle: the output with a per-element bound scaled by
    P|V| (what its rounding errors grow with), lse with one bound."""
    D = q.shape[-1]
    s = D ** -0.5 if scale is None else scale
    o, lse = OP(q, k, v, causal, s, kv_lens, attn_mask)
    assert o.dtype == q.dtype and o.shape == q.shape and o.is_contiguous()
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    kw = dict(causal=causal, scale=s, kv_lens=kv_lens, attn_mask=attn_mask)
    want, want_lse = ref.gqa_attention(q, k, v, return_lse=True, **kw)
    low = ref.gqa_attention(q, k, v, dtype=q.dtype, **kw)
    mag = ref.gqa_attention(q, k, v.abs(), **kw)
    assert_close_to_oracle(o, want, low, name=name, mag=mag)
    # rows that see no key: o = 0 and lse = −inf exactly
    dead = torch.isneginf(want_lse)
    assert torch.equal(torch.isneginf(lse), dead), f"{name}: lse is −inf on other rows than the oracle's"
    assert (o[dead] == 0).all()
    live = ~dead
    if live.any():
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}[q.dtype]
        err = (lse[live].double() - want_lse[live]).abs().max().item()
        assert err <= tol * max(1.0, want_lse[live].abs().max().item()), f"{name}: lse err {err:.3e}"
    return o, lse


# ---------------------------------------------------------------------------- oracle itself

def test_oracle_is_sdpa_for_plain_attention():
    q, k, v = make_qkv(2, 6, 2, 5, 7, 16, torch.float64)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(ref.gqa_attention(q, k, v), want)
    # bottom-right causal with Sq = Sk is SDPA's top-left is_causal
    q, k, v = make_qkv(1, 4, 4, 6, 6, 8, torch.float64)
    torch.testing.assert_close(ref.gqa_attention(q, k, v, causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_oracle_visible_is_bottom_right_causal():
    ok = ref.visible(2, 5, causal=True)[0, 0]
    assert ok.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    ok = ref.visible(3, 4, causal=True, kv_lens=torch.tensor([2]))[0, 0]
    assert ok.tolist() == [[False] * 4, [True, False, False, False], [True, True, False, False]]


# ---------------------------------------------------------------------------- forward grid

# (B, Hq, Hkv, Sq, Sk, D, causal): group sizes 1, 3, 4, 8; head dims 32 … 256 and odd ones;
# decode (Sq = 1), Sq < Sk, Sq > Sk (causal rows that see nothing), several key tiles
CASES = [
    (2, 2, 2, 5, 9, 32, False),
    (1, 6, 2, 7, 70, 64, True),
    (2, 8, 2, 1, 130, 80, False),
    (1, 8, 1, 3, 65, 128, True),
    (1, 4, 1, 9, 40, 256, False),
    (2, 3, 1, 17, 17, 17, True),
    (1, 8, 2, 12, 5, 64, True),
    (3, 4, 4, 2, 1, 8, False),
    (1, 16, 2, 33, 129, 48, True),
    (1, 24, 3, 4, 64, 128, True),
]


@pytest.mark.parametrize("dtype", cpu_dtypes())
@pytest.mark.parametrize("B,Hq,Hkv,Sq,Sk,D,causal", CASES)
def test_forward_matches_oracle(dtype, B, Hq, Hkv, Sq, Sk, D, causal):
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, D, dtype)
    check_forward(q, k, v, causal=causal)


@pytest.mark.parametrize("D", [32, 64, 80, 128, 256])
def test_every_isa_matches_oracle(D, cpu_capability):
    for dtype in cpu_dtypes():
        q, k, v = make_qkv(1, 8, 2, 5, 100, D, dtype)
        check_forward(q, k, v, causal=True, name=f"{cpu_capability} {dtype} D={D}")
        # decode: one query row per head, the group's four rows against each key (odd key
        # counts leave a last key of their own; 1000 keys take the split-KV merge)
        for Sk in (101, 1000):
            q, k, v = make_qkv(1, 8, 2, 1, Sk, D, dtype)
            check_forward(q, k, v, name=f"{cpu_capability} {dtype} D={D} decode Sk={Sk}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Sq,Sk,causal", [(1, 4096, False), (3, 3000, True), (1, 8192, False)])
def test_long_kv_split_decode_matches_oracle(dtype, Sq, Sk, causal):
    # B·Hkv = 2 tasks: the key range is split (flash-decoding) and merged by LSE
    q, k, v = make_qkv(1, 8, 2, Sq, Sk, 128, dtype)
    lens = None if Sk != 3000 else torch.tensor([2011])
    check_forward(q, k, v, causal=causal, kv_lens=lens)


def test_split_decode_same_result_at_any_thread_count():
    q, k, v = make_qkv(1, 4, 1, 1, 2000, 64)
    old = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 3, 8):
            torch.set_num_threads(n)
            outs.append(OP(q, k, v, False, 0.125, None, None))
    finally:
        torch.set_num_threads(old)
    for o, lse in outs[1:]:
        torch.testing.assert_close(o, outs[0][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse, outs[0][1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq", [1, 6])
def test_ragged_kv_lens(causal, Sq):
    q, k, v = make_qkv(4, 8, 2, Sq, 150, 32)
    for lens in (torch.tensor([150, 0, 3, 77]), torch.tensor([1, 64, 65, 128], dtype=torch.int32)):
        check_forward(q, k, v, causal=causal, kv_lens=lens, name=f"kv_lens {lens.tolist()}")


def test_kv_lens_equals_truncated_keys():
    q, k, v = make_qkv(1, 4, 2, 3, 50, 16)
    o, lse = OP(q, k, v, True, 0.25, torch.tensor([20]), None)
    o2, lse2 = OP(q, k[:, :, :20], v[:, :, :20], True, 0.25, None, None)
    torch.testing.assert_close(o, o2)
    torch.testing.assert_close(lse, lse2)


@pytest.mark.parametrize("dtype", cpu_dtypes())
@pytest.mark.parametrize("shape", [(2, 1, 5, 70), (5, 70), (1, 8, 1, 70), (70,), (2, 8, 5, 70), (2, 1, 1, 1)])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_masks_broadcast(dtype, shape, kind):
    B, Hq, Hkv, Sq, Sk = 2, 8, 2, 5, 70
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, 32, dtype)
    if kind == "bool":
        mask = torch.rand(shape) > 0.3
    else:
        mask = torch.randn(shape, dtype=torch.float64).to(dtype)
        mask[torch.rand(shape) < 0.2] = NINF
    check_forward(q, k, v, attn_mask=mask, causal=True, kv_lens=torch.tensor([70, 40]))


def test_expanded_mask_is_read_through_its_strides():
    q, k, v = make_qkv(2, 8, 2, 5, 70, 32)
    base = torch.rand(2, 1, 1, 70) > 0.5
    mask = base.expand(2, 8, 5, 70)
    assert mask.stride(1) == 0
    o1 = check_forward(q, k, v, attn_mask=mask)[0]
    o2 = OP(q, k, v, False, 32 ** -0.5, None, base)[0]
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    # a float mask in another dtype than q is accepted (converted at its own size)
    fmask = torch.randn(5, 70, dtype=torch.float64)
    check_forward(q, k, v, attn_mask=fmask)


def test_fully_masked_rows_are_zero_with_lse_minus_inf_like_sdpa():
    q, k, v = make_qkv(1, 4, 2, 3, 10, 16)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1] = False
    o, lse = check_forward(q, k, v, attn_mask=mask)
    assert (o[:, :, 1] == 0).all() and torch.isneginf(lse[:, :, 1]).all()
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(o, sdpa, rtol=1e-5, atol=1e-6)
    # additive −inf everywhere in a row: the same
    add = torch.zeros(3, 10)
    add[2] = NINF
    o, lse = check_forward(q, k, v, attn_mask=add)
    assert (o[:, :, 2] == 0).all() and torch.isneginf(lse[:, :, 2]).all()
    # kv_lens = 0, and causal with q_len > kv_len: rows that see no key
    o, lse = check_forward(q, k, v, kv_lens=torch.tensor([0]))
    assert (o == 0).all()
    o, lse = check_forward(q, k[:, :, :1], v[:, :, :1], causal=True)
    assert (o[:, :, :2] == 0).all() and (o[:, :, 2] != 0).any()


@pytest.mark.parametrize("dtype", cpu_dtypes())
def test_noncontiguous_bshd_views(dtype):
    q, k, v = make_qkv(2, 8, 2, 9, 75, 64, dtype, layout="bshd")
    assert not q.is_contiguous() and q.stride(-1) == 1
    o = check_forward(q, k, v, causal=True)[0]
    o2 = OP(q.contiguous(), k.contiguous(), v.contiguous(), True, 0.125, None, None)[0]
    torch.testing.assert_close(o, o2, rtol=0, atol=0)
    # a sliced head dim (stride over D still 1) and a non-unit stride over D (copied)
    big = torch.randn(2, 8, 9, 130).to(dtype)
    check_forward(big[..., 3:67], k, v)
    check_forward(big[..., ::2][..., :64], k, v)


@pytest.mark.parametrize("B,Hq,Hkv,Sq,Sk", [(2, 4, 2, 0, 5), (2, 4, 2, 3, 0), (0, 4, 2, 3, 5), (1, 0, 1, 3, 5)])
def test_empty_sizes(B, Hq, Hkv, Sq, Sk):
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, 16, requires_grad=True)
    o, lse = OP(q, k, v, True, 0.25, None, None)
    assert o.shape == (B, Hq, Sq, 16) and lse.shape == (B, Hq, Sq)
    if Sk == 0:
        assert (o == 0).all() and torch.isneginf(lse).all()
    o = lrkernels.gqa_attention(q, k, v, causal=True)
    o.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    assert (q.grad == 0).all() and (k.grad == 0).all() and (v.grad == 0).all()


def test_default_scale_and_wrapper():
    q, k, v = make_qkv(1, 4, 2, 3, 8, 36)
    o = lrkernels.gqa_attention(q, k, v)
    torch.testing.assert_close(o, OP(q, k, v, False, 1 / 6, None, None)[0])
    o = lrkernels.gqa_attention(q, k, v, scale=0.3, causal=True)
    torch.testing.assert_close(o.double(), ref.gqa_attention(q, k, v, scale=0.3, causal=True), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- SDPA equivalence

@pytest.mark.parametrize("Hq,Hkv,D", [(8, 2, 64), (32, 8, 128), (9, 3, 64), (8, 8, 80), (8, 1, 32)])
@pytest.mark.parametrize("Sq,Sk", [(1, 300), (7, 70), (40, 40)])
def test_matches_sdpa_enable_gqa(Hq, Hkv, D, Sq, Sk):
    q, k, v = make_qkv(2, Hq, Hkv, Sq, Sk, D)
    o = lrkernels.gqa_attention(q, k, v)
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v, enable_gqa=True), rtol=2e-5, atol=2e-6)
    if Sq == Sk:  # top-left and bottom-right causal agree
        o = lrkernels.gqa_attention(q, k, v, causal=True)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(o, want, rtol=2e-5, atol=2e-6)


def test_matches_repeat_kv_sdpa_with_padding_mask():
    # what transformers does with a mask: repeat_kv, then SDPA with a (B, 1, Sq, Sk) mask
    B, Hq, Hkv, Sq, Sk = 3, 8, 2, 4, 90
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, 64)
    lens = torch.tensor([90, 50, 7])
    pad = torch.arange(Sk).view(1, 1, 1, Sk) < lens.view(B, 1, 1, 1)
    mask = pad & ref.visible(Sq, Sk, causal=True, kv_lens=None, batch=B)
    kr, vr = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    want = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
    got = lrkernels.gqa_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)
    add = torch.zeros(mask.shape).masked_fill(~mask, NINF)
    torch.testing.assert_close(lrkernels.gqa_attention(q, k, v, attn_mask=add), want, rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------------------- backward

BWD_CASES = [
    (2, 2, 2, 5, 9, 32, False, None, None),
    (1, 6, 2, 7, 70, 64, True, None, None),
    (2, 8, 2, 1, 130, 80, False, "lens", None),
    (1, 8, 1, 3, 65, 128, True, None, "bool"),
    (2, 4, 1, 9, 40, 256, True, "lens", "additive"),
    (1, 3, 1, 17, 17, 17, True, None, None),
    (1, 8, 2, 12, 5, 64, True, None, None),
    (1, 16, 2, 70, 70, 48, True, None, None),
    (1, 80, 1, 3, 70, 16, True, None, "bool"),  # a group wider than a key tile (80 heads over one)
]


def _mask(kind, B, Hq, Sq, Sk, dtype):
    if kind == "bool":
        m = torch.rand(B, 1, Sq, Sk) > 0.3
        m[..., 0, :] = False  # a fully masked row
        return m
    if kind == "additive":
        m = torch.randn(1, Hq, Sq, Sk, dtype=torch.float64).to(dtype)
        m[torch.rand(m.shape) < 0.2] = NINF
        return m
    return None


@pytest.fixture(params=["one-pass", "two-pass"])
def backward_pass(request):
    """The CPU backward takes one task per (batch, KV head) group, all gradients in one pass,
    when the groups fill the threads (at least 2 per thread) and Sq > 1; else two passes (dK/dV
    per key tile, dQ per query block). One thread makes every case with two groups or more
    take the one-pass kernel; the default 2+ threads leave the small cases on the two passes."""
    before = torch.get_num_threads()
    if request.param == "one-pass":
        torch.set_num_threads(1)
    elif before < 2:
        pytest.skip("two-pass needs 2 threads to be chosen for these sizes")
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", cpu_dtypes())
@pytest.mark.parametrize("B,Hq,Hkv,Sq,Sk,D,causal,lens,mask", BWD_CASES)
def test_backward_matches_oracle(dtype, B, Hq, Hkv, Sq, Sk, D, causal, lens, mask, backward_pass):
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, D, dtype, requires_grad=True)
    kv_lens = torch.randint(0, Sk + 1, (B,)) if lens else None
    attn_mask = _mask(mask, B, Hq, Sq, Sk, dtype)
    kw = dict(causal=causal, kv_lens=kv_lens, attn_mask=attn_mask)
    o = lrkernels.gqa_attention(q, k, v, **kw)
    go = torch.randn(o.shape, dtype=torch.float64).to(dtype)
    got = torch.autograd.grad(o, [q, k, v], go)

    def oracle(dt):
        leaves = [t.detach().to(dt).requires_grad_(True) for t in (q, k, v)]
        return torch.autograd.grad(ref.gqa_attention(*leaves, dtype=dt, **kw), leaves, go.to(dt))

    for n, g, w, lo in zip("qkv", got, oracle(torch.float64), oracle(dtype)):
        assert g.dtype == dtype and g.shape == w.shape
        assert_close_to_oracle(g, w, lo, name=f"grad {n}")


def test_backward_every_isa(cpu_capability):
    for dtype in cpu_dtypes():
        q, k, v = make_qkv(1, 8, 2, 6, 100, 80, dtype, requires_grad=True)
        o = lrkernels.gqa_attention(q, k, v, causal=True)
        go = torch.randn(o.shape, dtype=torch.float64).to(dtype)
        got = torch.autograd.grad(o, [q, k, v], go)
        leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
        want = torch.autograd.grad(ref.gqa_attention(*leaves, causal=True), leaves, go.double())
        lv = [t.detach().requires_grad_(True) for t in (q, k, v)]
        low = torch.autograd.grad(ref.gqa_attention(*lv, causal=True, dtype=dtype), lv, go)
        for n, g, w, lo in zip("qkv", got, want, low):
            assert_close_to_oracle(g, w, lo, name=f"{cpu_capability} {dtype} grad {n}")


def test_backward_long_kv_and_noncontiguous():
    q, k, v = make_qkv(1, 8, 2, 3, 1500, 64, layout="bshd", requires_grad=True)
    lens = torch.tensor([1111])
    o = lrkernels.gqa_attention(q, k, v, causal=True, kv_lens=lens)
    go = torch.randn_like(o).transpose(1, 2).contiguous().transpose(1, 2)  # a strided grad_o
    got = torch.autograd.grad(o, [q, k, v], go)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    want = torch.autograd.grad(ref.gqa_attention(*leaves, causal=True, kv_lens=lens), leaves, go.double())
    lv = [t.detach().requires_grad_(True) for t in (q, k, v)]
    low = torch.autograd.grad(ref.gqa_attention(*lv, causal=True, kv_lens=lens, dtype=torch.float32), lv, go)
    for n, g, w, lo in zip("qkv", got, want, low):
        assert_close_to_oracle(g, w, lo, name=f"grad {n}")
    assert (got[1][:, :, 1111:] == 0).all() and (got[2][:, :, 1111:] == 0).all()


@pytest.mark.parametrize("causal,lens,mask", [(False, None, None), (True, None, None), (True, "lens", "bool"),
                                              (False, "lens", "additive")])
def test_gradcheck_float64(causal, lens, mask):
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 2, 3, 5, 4
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, D, torch.float64, requires_grad=True)
    kv_lens = torch.tensor([5, 2]) if lens else None
    attn_mask = _mask(mask, B, Hq, Sq, Sk, torch.float64)
    torch.autograd.gradcheck(
        lambda q, k, v: lrkernels.gqa_attention(q, k, v, causal=causal, kv_lens=kv_lens, attn_mask=attn_mask,
                                                scale=0.7), (q, k, v))


def test_grad_only_where_needed_and_output_mask():
    q, k, v = make_qkv(1, 4, 2, 3, 8, 16)
    k.requires_grad_(True)
    lrkernels.gqa_attention(q, k, v).sum().backward()
    assert k.grad is not None and q.grad is None and v.grad is None
    o, lse = OP(q, k, v, False, 0.25, None, None)
    go = torch.randn_like(o)
    dq, dk, dv = BWD(go, q, k, v, o, lse, False, 0.25, None, None, [True, False, True])
    assert dq is not None and dk is None and dv is not None
    full = BWD(go, q, k, v, o, lse, False, 0.25, None, None, [True, True, True])
    torch.testing.assert_close(dq, full[0], rtol=0, atol=0)
    torch.testing.assert_close(dv, full[2], rtol=0, atol=0)


# ---------------------------------------------------------------------------- opcheck / compile

OPCHECK_CASES = [
    dict(B=2, Hq=4, Hkv=2, Sq=3, Sk=7, D=16, causal=False, lens=None, mask=None),
    dict(B=1, Hq=6, Hkv=2, Sq=5, Sk=70, D=32, causal=True, lens=torch.tensor([40]), mask=None),
    dict(B=2, Hq=4, Hkv=1, Sq=1, Sk=300, D=8, causal=False, lens=torch.tensor([300, 3], dtype=torch.int32),
         mask=torch.rand(2, 1, 1, 300) > 0.2),
    dict(B=1, Hq=2, Hkv=2, Sq=4, Sk=4, D=8, causal=True, lens=None, mask=torch.randn(4, 4)),
    dict(B=2, Hq=4, Hkv=2, Sq=0, Sk=5, D=8, causal=False, lens=None, mask=None),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=range(len(OPCHECK_CASES)))
def test_opcheck(case):
    c = dict(case)
    q, k, v = make_qkv(c["B"], c["Hq"], c["Hkv"], c["Sq"], c["Sk"], c["D"], requires_grad=True)
    args = (q, k, v, c["causal"], 0.3, c["lens"], c["mask"])
    torch.library.opcheck(OP, args)
    o, lse = OP(q.detach(), k.detach(), v.detach(), *args[3:])
    go = torch.randn_like(o)
    for mask in ([True, True, True], [False, True, False]):
        torch.library.opcheck(BWD, (go, q.detach(), k.detach(), v.detach(), o, lse, c["causal"], 0.3, c["lens"],
                                    c["mask"], mask))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_backward(backend):
    torch._dynamo.reset()
    q, k, v = make_qkv(2, 8, 2, 5, 33, 16, requires_grad=True)
    lens = torch.tensor([33, 20])
    mask = torch.rand(2, 1, 5, 33) > 0.2

    def f(q, k, v):
        return lrkernels.gqa_attention(q, k, v, causal=True, kv_lens=lens, attn_mask=mask).square().sum()

    cf = torch.compile(f, fullgraph=True, backend=backend)
    y = cf(q, k, v)
    torch.testing.assert_close(y, f(q, k, v))
    got = torch.autograd.grad(y, [q, k, v])
    want = torch.autograd.grad(f(q, k, v), [q, k, v])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# ---------------------------------------------------------------------------- grad modes, autocast

@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_under_inference_mode_and_no_grad(mode):
    q, k, v = make_qkv(1, 8, 2, 1, 2000, 64)
    want = OP(q, k, v, False, 0.125, None, None)[0]
    with getattr(torch, mode)():
        o, lse = OP(q, k, v, False, 0.125, None, None)
        g = BWD(torch.ones_like(o), q, k, v, o, lse, False, 0.125, None, None, [True, True, True])
    torch.testing.assert_close(o, want)
    assert all(t is not None for t in g)


def test_autocast_bfloat16():
    q, k, v = make_qkv(1, 8, 2, 4, 40, 32, requires_grad=True)
    mask = torch.randn(4, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = lrkernels.gqa_attention(q, k, v, attn_mask=mask)
    assert o.dtype == torch.bfloat16
    cast = [t.detach().bfloat16().requires_grad_(True) for t in (q, k, v)]
    o_ref = lrkernels.gqa_attention(*cast, attn_mask=mask)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    go = torch.randn_like(o)
    got = torch.autograd.grad(o, [q, k, v], go)
    want = torch.autograd.grad(o_ref, cast, go)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w.float(), rtol=0, atol=0)


# ---------------------------------------------------------------------------- bad inputs

def _call(q=None, k=None, v=None, kv_lens=None, attn_mask=None, scale=0.5):
    dq, dk, dv = make_qkv(2, 4, 2, 3, 5, 8)
    return OP(dq if q is None else q, dk if k is None else k, dv if v is None else v, False, scale, kv_lens,
              attn_mask)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(q=torch.randn(2, 3, 3, 8)), ValueError, r"q's head count \(3\) must be a multiple of k's head count \(2\)"),
    (dict(k=torch.randn(2, 2, 5, 9)), ValueError, r"k must have shape .* head_dim = 8"),
    (dict(v=torch.randn(2, 2, 6, 8)), ValueError, r"v must have shape"),
    (dict(q=torch.randn(2, 4, 3)), ValueError, r"q must be 4-D"),
    (dict(q=torch.randn(2, 4, 3, 300), k=torch.randn(2, 2, 5, 300), v=torch.randn(2, 2, 5, 300)), ValueError,
     r"q's head_dim must be in \[1, 256\]"),
    (dict(kv_lens=torch.tensor([5, 6])), ValueError, r"kv_lens\[1\] = 6 is outside \[0, kv_len\]"),
    (dict(kv_lens=torch.tensor([-1, 2])), ValueError, r"kv_lens\[0\] = -1"),
    (dict(kv_lens=torch.tensor([1.0, 2.0])), TypeError, r"kv_lens must be int32 or int64"),
    (dict(kv_lens=torch.tensor([1, 2, 3])), ValueError, r"kv_lens must have shape \(batch,\)"),
    (dict(attn_mask=torch.ones(3, 4, dtype=torch.bool)), ValueError, r"attn_mask of shape \(3, 4\) does not broadcast"),
    (dict(attn_mask=torch.ones(2, 2, 3, 5, dtype=torch.bool)), ValueError, r"attn_mask .* does not broadcast"),
    (dict(attn_mask=torch.ones(1, 2, 4, 3, 5)), ValueError, r"attn_mask .* does not broadcast"),
    (dict(attn_mask=torch.ones(3, 5, dtype=torch.int64)), TypeError, r"attn_mask must be bool"),
    (dict(q=torch.ones(2, 4, 3, 8, dtype=torch.int32)), TypeError, r"q must be float32, float64 or bfloat16"),
    (dict(k=torch.ones(2, 2, 5, 8, dtype=torch.int64)), TypeError, r"k has dtype"),
    (dict(v=torch.randn(2, 2, 5, 8, dtype=torch.float64)), TypeError, r"v has dtype"),
    (dict(q=torch.randn(2, 4, 3, 8, dtype=torch.float16), k=torch.randn(2, 2, 5, 8, dtype=torch.float16),
          v=torch.randn(2, 2, 5, 8, dtype=torch.float16)), TypeError, r"q must be float32"),
    (dict(scale=math.inf), ValueError, r"scale must be finite"),
])
def test_bad_inputs_raise_naming_the_argument(kwargs, exc, match):
    with pytest.raises(exc, match=r"lrkernels\.gqa_attention: " + match):
        _call(**kwargs)


def test_bad_backward_inputs():
    q, k, v = make_qkv(1, 4, 2, 3, 5, 8)
    o, lse = OP(q, k, v, False, 0.5, None, None)
    with pytest.raises(ValueError, match=r"gqa_attention_backward: lse must have shape"):
        BWD(o, q, k, v, o, lse[:, :, :2], False, 0.5, None, None, [True, True, True])
    with pytest.raises(TypeError, match=r"gqa_attention_backward: lse must be Double|lse must be float"):
        BWD(o.double(), q.double(), k.double(), v.double(), o.double(), lse, False, 0.5, None, None,
            [True, True, True])
    with pytest.raises(ValueError, match=r"gqa_attention_backward: grad_o must have shape"):
        BWD(o[:, :, :2], q, k, v, o, lse, False, 0.5, None, None, [True, True, True])


def test_fake_rejects_bad_shapes_under_compile():
    torch._dynamo.reset()
    q, k, v = make_qkv(1, 3, 2, 3, 5, 8)
    with pytest.raises(Exception, match=r"head count \(3\) must be a multiple of k"):
        torch.compile(lambda q, k, v: lrkernels.gqa_attention(q, k, v), fullgraph=True, backend="aot_eager")(q, k, v)


@pytest.mark.parametrize("Sk", [10, 2000])
def test_nan_propagates_into_its_row(Sk):
    # a NaN score must not be dropped by the running max (std::max would keep the other operand)
    q, k, v = make_qkv(1, 4, 2, 3, Sk, 16)
    q[0, 1, 2, 5] = float("nan")
    o = OP(q, k, v, False, 0.25, None, None)[0]
    assert torch.isnan(o[0, 1, 2]).all()
    assert torch.isfinite(o[0, 1, :2]).all() and torch.isfinite(o[0, 0]).all()
    k2 = k.clone()
    k2[0, 0, Sk - 1, 0] = float("nan")
    o = OP(q.nan_to_num(), k2, v, False, 0.25, None, None)[0]
    assert torch.isnan(o[0, :2]).all() and torch.isfinite(o[0, 2:]).all()


# ---------------------------------------------------------------------------- CUDA

# (B, Hq, Hkv, Sq, Sk, D, causal, lens, mask): every head-dim bucket (32, 64, 128, 256 and D
# below a bucket), G = 1 … 8, causal with Sq < Sk and Sq > Sk, ragged kv_lens, bool / additive
# masks, and long decodes that take the split-KV path (B·Hkv·row tiles far below the SM count).
CUDA_CASES = [
    (2, 2, 2, 5, 9, 32, False, None, None),
    (1, 6, 2, 7, 70, 64, True, "lens", None),
    (2, 8, 2, 1, 130, 80, False, "lens", "bool"),
    (1, 8, 1, 3, 65, 128, True, None, "bool"),
    (2, 4, 1, 9, 40, 256, True, "lens", "additive"),
    (1, 16, 2, 33, 129, 48, True, None, "additive"),
    (1, 8, 2, 12, 5, 64, True, None, None),
    (1, 32, 8, 1, 4096, 128, False, "lens", "bool"),
    (2, 12, 4, 3, 3000, 64, True, "lens", None),
]


def _on_cuda(*ts, requires_grad=False):
    return [t.detach().cuda().requires_grad_(requires_grad) for t in ts]


def _cuda_lens(B, Sk):
    lens = torch.randint(0, Sk + 1, (B,))
    lens[0] = Sk
    return lens.cuda()


@pytest.mark.cuda
def test_cuda_kernels_registered():
    for op in ("gqa_attention", "gqa_attention_backward"):
        assert lrkernels.has_kernel(op, "cuda"), op


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", cuda_dtypes())
@pytest.mark.parametrize("B,Hq,Hkv,Sq,Sk,D,causal,lens,mask", CUDA_CASES)
def test_cuda_forward_backward_matches_oracle(dtype, B, Hq, Hkv, Sq, Sk, D, causal, lens, mask):
    q, k, v = _on_cuda(*make_qkv(B, Hq, Hkv, Sq, Sk, D, dtype), requires_grad=True)
    kv_lens = _cuda_lens(B, Sk) if lens else None
    attn_mask = _mask(mask, B, Hq, Sq, Sk, dtype)
    attn_mask = attn_mask.cuda() if attn_mask is not None else None
    kw = dict(causal=causal, kv_lens=kv_lens, attn_mask=attn_mask)
    check_forward(q.detach(), k.detach(), v.detach(), name=f"cuda {dtype} o", **kw)
    o = lrkernels.gqa_attention(q, k, v, **kw)
    go = torch.randn(o.shape, dtype=torch.float64, device="cuda").to(dtype)
    got = torch.autograd.grad(o, [q, k, v], go)

    def oracle(dt):
        leaves = [t.detach().to(dt).requires_grad_(True) for t in (q, k, v)]
        return torch.autograd.grad(ref.gqa_attention(*leaves, dtype=dt, **kw), leaves, go.to(dt))

    for n, g, w, lo in zip("qkv", got, oracle(torch.float64), oracle(dtype)):
        assert g.is_cuda and g.dtype == dtype and g.shape == w.shape
        assert_close_to_oracle(g, w, lo, name=f"cuda {dtype} grad {n}")


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_cuda_matches_cpu_float32(layout):
    B, Hq, Hkv, Sq, Sk, D = 2, 9, 3, 7, 300, 80
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, D, layout=layout)
    lens = torch.tensor([300, 123])
    mask = torch.rand(B, 1, Sq, Sk) > 0.2
    c = _on_cuda(q, k, v, requires_grad=True)
    if layout == "bshd":
        assert not c[0].is_contiguous()
    a = [t.clone().requires_grad_(True) for t in (q, k, v)]
    o = lrkernels.gqa_attention(*a, causal=True, kv_lens=lens, attn_mask=mask)
    oc = lrkernels.gqa_attention(*c, causal=True, kv_lens=lens.cuda(), attn_mask=mask.cuda())
    torch.testing.assert_close(oc.cpu(), o, rtol=1e-4, atol=1e-5)
    go = torch.randn_like(o)
    g = torch.autograd.grad(o, a, go)
    gc = torch.autograd.grad(oc, c, go.cuda())
    for n, u, w in zip("qkv", g, gc):
        torch.testing.assert_close(w.cpu(), u, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {n}: {m}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_matches_sdpa_enable_gqa(dtype):
    q, k, v = _on_cuda(*make_qkv(2, 32, 8, 1, 2048, 128, dtype))
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    got = lrkernels.gqa_attention(q, k, v)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


@pytest.mark.cuda
def test_cuda_graph_capture_with_changing_kv_lens():
    """Forward and backward captured once, replayed with new kv_lens contents: the grids depend
    on the shapes only and the kernels read kv_lens on the device."""
    B, Hq, Hkv, Sq, Sk, D = 2, 8, 2, 3, 2048, 64
    q, k, v = _on_cuda(*make_qkv(B, Hq, Hkv, Sq, Sk, D))
    go = torch.randn(B, Hq, Sq, D, device="cuda")
    lens = torch.tensor([Sk, 100], dtype=torch.int32, device="cuda")

    def step():
        o, lse = OP(q, k, v, True, 0.125, lens, None)
        return (o, lse) + tuple(BWD(go, q, k, v, o, lse, True, 0.125, lens, None, [True, True, True]))

    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(st)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for new in ([Sk, 100], [7, Sk], [0, 1500], [1, 2]):
        lens.copy_(torch.tensor(new, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        want = step()
        for n, got, w in zip(("o", "lse", "dq", "dk", "dv"), captured, want):
            torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"kv_lens {new} {n}: {m}")
        oracle = ref.gqa_attention(q, k, v, causal=True, scale=0.125, kv_lens=lens)
        torch.testing.assert_close(captured[0].double(), oracle, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=range(len(OPCHECK_CASES)))
def test_cuda_opcheck(case):
    c = dict(case)
    q, k, v = _on_cuda(*make_qkv(c["B"], c["Hq"], c["Hkv"], c["Sq"], c["Sk"], c["D"]), requires_grad=True)
    lens = c["lens"].cuda() if c["lens"] is not None else None
    mask = c["mask"].cuda() if c["mask"] is not None else None
    args = (q, k, v, c["causal"], 0.3, lens, mask)
    torch.library.opcheck(OP, args)
    o, lse = OP(q.detach(), k.detach(), v.detach(), *args[3:])
    go = torch.randn_like(o)
    for want in ([True, True, True], [False, True, False]):
        torch.library.opcheck(BWD, (go, q.detach(), k.detach(), v.detach(), o, lse, c["causal"], 0.3, lens, mask,
                                    want))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_cuda_compile_fullgraph_forward_backward(backend):
    torch._dynamo.reset()
    q, k, v = _on_cuda(*make_qkv(2, 8, 2, 5, 33, 16), requires_grad=True)
    lens = torch.tensor([33, 20], device="cuda")
    mask = (torch.rand(2, 1, 5, 33) > 0.2).cuda()

    def f(q, k, v):
        return lrkernels.gqa_attention(q, k, v, causal=True, kv_lens=lens, attn_mask=mask).square().sum()

    y = torch.compile(f, fullgraph=True, backend=backend)(q, k, v)
    torch.testing.assert_close(y, f(q, k, v))
    got = torch.autograd.grad(y, [q, k, v])
    want = torch.autograd.grad(f(q, k, v), [q, k, v])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)  # dq: atomics, order varies


@pytest.mark.cuda
def test_cuda_bad_inputs():
    q, k, v = _on_cuda(*make_qkv(2, 4, 2, 3, 5, 8))
    with pytest.raises(TypeError, match=r"gqa_attention: q must be float32, float16 or bfloat16 on cuda"):
        OP(q.double(), k.double(), v.double(), False, 0.5, None, None)
    with pytest.raises(ValueError, match=r"gqa_attention: kv_lens is on cpu but q is on cuda"):
        OP(q, k, v, False, 0.5, torch.tensor([5, 5]), None)
    with pytest.raises(ValueError, match=r"gqa_attention: k is on cpu but q is on cuda"):
        OP(q, k.cpu(), v, False, 0.5, None, None)
    with pytest.raises(ValueError, match=r"q's head count \(3\) must be a multiple"):
        OP(q[:, :3], k, v, False, 0.5, None, None)


@pytest.mark.cuda
@pytest.mark.parametrize("Sk", [10, 2000])
def test_cuda_nan_propagates_into_its_row(Sk):
    q, k, v = _on_cuda(*make_qkv(1, 4, 2, 3, Sk, 16))
    q[0, 1, 2, 5] = float("nan")
    o, lse = OP(q, k, v, False, 0.25, None, None)
    assert torch.isnan(o[0, 1, 2]).all() and torch.isnan(lse[0, 1, 2])
    assert torch.isfinite(o[0, 1, :2]).all() and torch.isfinite(o[0, 0]).all() and torch.isfinite(o[0, 2:]).all()


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(2, 1, 5, 70), (5, 70), (1, 8, 1, 70), (70,), (2, 8, 5, 70), (2, 1, 1, 1)])
@pytest.mark.parametrize("kind", ["bool", "additive", "additive_f64"])
def test_cuda_masks_broadcast(shape, kind):
    B, Hq, Hkv, Sq, Sk = 2, 8, 2, 5, 70
    q, k, v = _on_cuda(*make_qkv(B, Hq, Hkv, Sq, Sk, 32, torch.bfloat16))
    if kind == "bool":
        mask = torch.rand(shape) > 0.3
    else:  # bf16 (q's dtype) or float64: converted once to float32 at the mask's own size
        mask = torch.randn(shape, dtype=torch.float64).to(torch.bfloat16 if kind == "additive" else torch.float64)
        mask[torch.rand(shape) < 0.2] = NINF
    check_forward(q, k, v, attn_mask=mask.cuda(), causal=True, kv_lens=torch.tensor([70, 40], device="cuda"))


@pytest.mark.cuda
def test_cuda_expanded_mask_and_fully_masked_rows():
    q, k, v = _on_cuda(*make_qkv(2, 8, 2, 5, 70, 32))
    base = (torch.rand(2, 1, 1, 70) > 0.5).cuda()
    mask = base.expand(2, 8, 5, 70)
    o1 = check_forward(q, k, v, attn_mask=mask)[0]
    o2 = OP(q, k, v, False, 32 ** -0.5, None, base)[0]
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    rows = torch.ones(5, 70, dtype=torch.bool, device="cuda")
    rows[1] = False
    o, lse = check_forward(q, k, v, attn_mask=rows)
    assert (o[:, :, 1] == 0).all() and torch.isneginf(lse[:, :, 1]).all()
    o, lse = check_forward(q, k, v, kv_lens=torch.tensor([0, 70], dtype=torch.int32, device="cuda"))
    assert (o[0] == 0).all() and torch.isneginf(lse[0]).all()


@pytest.mark.cuda
def test_cuda_deterministic_backward():
    """torch.use_deterministic_algorithms(True): dQ from its own pass (no atomics), the same bits on
    every run, and the same gradients as the default (atomic) backward up to rounding."""
    q, k, v = _on_cuda(*make_qkv(2, 8, 2, 9, 300, 64), requires_grad=True)
    lens = torch.tensor([300, 77], device="cuda")

    def grads():
        o = lrkernels.gqa_attention(q, k, v, causal=True, kv_lens=lens)
        return torch.autograd.grad(o, [q, k, v], torch.ones_like(o))

    default = grads()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(before)
    for n, a, b, c in zip("qkv", first, second, default):
        assert torch.equal(a, b), f"grad {n} differs between deterministic runs"
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad {n}: {m}")


@pytest.mark.cuda
def test_cuda_kv_lens_out_of_range_are_clamped():
    """The CPU op raises on kv_lens outside [0, kv_len]; the CUDA op cannot look without a host
    sync, so its kernels clamp (documented in the wrapper)."""
    q, k, v = _on_cuda(*make_qkv(3, 4, 2, 2, 40, 16))
    got = OP(q, k, v, True, 0.25, torch.tensor([45, -3, 40], device="cuda"), None)[0]
    want = OP(q, k, v, True, 0.25, torch.tensor([40, 0, 40], device="cuda"), None)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
