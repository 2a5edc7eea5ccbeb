"""Multi-LoRA: grouping, shrink/expand building blocks and the fused multi_lora_linear against
the float64 per-token oracle, gradients, opcheck, torch.compile, equivalence with lora_linear
and with PEFT's mixed-batch inference, bad inputs, the MultiLoRALinear module, and the CUDA
kernels (marked, skipped without a GPU)."""

import math

import pytest
import torch
from torch import nn

import lrkernels
from lrkernels.reference import multi_lora as ref

from conftest import assert_close_to_oracle, cpu_dtypes, cuda_dtypes

SEG = torch.ops.lrkernels.multi_lora_segments.default
SHRINK = torch.ops.lrkernels.lora_shrink.default
EXPAND = torch.ops.lrkernels.lora_expand_.default
OP = torch.ops.lrkernels.multi_lora_linear.default
BWD = torch.ops.lrkernels.multi_lora_linear_backward.default

GRAD_NAMES = ("x", "weight", "bias", "lora_a", "lora_b", "scales")


def make_inputs(T, din, dout, L, r_max, dtype, device="cpu", *, ranks=None, base_frac=0.2, bias=True, lead=None,
                requires_grad=False, ids=None):
    shape = (T, din) if lead is None else (*lead, din)
    t = lambda *s, sc=1.0: (torch.randn(*s, dtype=torch.float64) * sc).to(dtype=dtype, device=device)  # noqa: E731
    ntok = math.prod(shape[:-1])
    if ids is None:
        ids = torch.randint(0, L, (ntok,))
        ids[torch.rand(ntok) < base_frac] = -1
        ids = ids.reshape(shape[:-1])
    args = dict(
        x=t(*shape),
        weight=t(dout, din, sc=1 / math.sqrt(max(din, 1))),
        bias=t(dout) if bias else None,
        lora_a=t(L, r_max, din, sc=1 / math.sqrt(max(din, 1))),
        lora_b=t(L, dout, r_max, sc=1 / math.sqrt(r_max)),
        scales=(torch.rand(L, dtype=torch.float64) + 0.5).to(torch.float32).to(device),
    )
    if requires_grad:
        for v in args.values():
            if v is not None:
                v.requires_grad_(True)
    args["adapter_ids"] = ids.to(device)
    args["ranks"] = None if ranks is None else torch.tensor(ranks, dtype=torch.int64, device=device)
    return args


def run_op(a, segments=None):
    order, offsets = (None, None) if segments is None else segments
    return OP(a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], a["adapter_ids"], a["scales"], a["ranks"],
              order, offsets)


def oracle(a, dtype=torch.float64):
    return ref.multi_lora_linear(a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], a["adapter_ids"],
                                 scales=a["scales"], ranks=a["ranks"], dtype=dtype)


def low_oracle(a, dtype):
    """The oracle formula evaluated in the input's precision (the tolerance reference)."""
    return oracle(a, dtype=dtype).to(dtype)


# ---------------------------------------------------------------------------- grouping

@pytest.mark.parametrize("T,L", [(0, 3), (1, 1), (17, 4), (200, 7)])
@pytest.mark.parametrize("idtype", [torch.int32, torch.int64])
def test_segments_group_tokens_stably(T, L, idtype):
    ids = torch.randint(-1, L, (T,), dtype=idtype)
    order, offsets = SEG(ids, L)
    assert order.dtype == torch.int32 and offsets.dtype == torch.int32
    assert order.shape == (T,) and offsets.shape == (L + 1,)
    assert sorted(order.tolist()) == list(range(T))  # a permutation
    for l in range(L):
        seg = order[offsets[l]:offsets[l + 1]].tolist()
        assert seg == [t for t in range(T) if ids[t] == l]  # this adapter's tokens, in token order
    assert order[offsets[L]:].tolist() == [t for t in range(T) if ids[t] == -1]


# ---------------------------------------------------------------------------- forward / backward

SHAPES = [  # (T, in, out, L, r_max)
    (0, 16, 8, 3, 4),
    (1, 1, 1, 1, 1),
    (7, 13, 17, 3, 5),
    (50, 64, 65, 4, 16),
    (33, 100, 48, 5, 19),
]


def mixed_ranks(L, r_max):
    return [max(1, (r_max * (l + 1)) // L) if l % 2 == 0 else r_max for l in range(L)]


@pytest.mark.parametrize("dtype", cpu_dtypes())
@pytest.mark.parametrize("T,din,dout,L,r", SHAPES)
@pytest.mark.parametrize("variant", ["full-rank", "mixed-ranks", "nobias"])
def test_forward_matches_oracle(dtype, T, din, dout, L, r, variant, cpu_kernels, cpu_capability):
    if cpu_kernels == "blocked" and dtype != torch.float32:
        pytest.skip("the blocked kernels are float32 only; other dtypes run the ATen path")
    a = make_inputs(T, din, dout, L, r, dtype, ranks=mixed_ranks(L, r) if variant == "mixed-ranks" else None,
                    bias=variant != "nobias")
    y, hidden = run_op(a)
    assert y.dtype == dtype and y.shape == (T, dout)
    assert hidden.shape == (T, r) and hidden.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to_oracle(y, oracle(a), low_oracle(a, dtype))
    want_h = ref.lora_shrink(a["x"], a["lora_a"], a["adapter_ids"], a["ranks"])
    assert_close_to_oracle(hidden, want_h, ref.lora_shrink(a["x"], a["lora_a"], a["adapter_ids"], a["ranks"],
                                                           dtype=dtype).to(dtype), name="hidden")


def _grads(a, dtype, gy):
    leaf = {k: (v.detach().to(dtype).requires_grad_(True) if (v is not None and v.is_floating_point()) else v)
            for k, v in a.items()}
    y = oracle(leaf, dtype=dtype)
    names = [k for k in GRAD_NAMES if leaf[k] is not None]
    return torch.autograd.grad(y, [leaf[k] for k in names], gy.to(dtype))


@pytest.mark.parametrize("dtype", cpu_dtypes())
@pytest.mark.parametrize("T,din,dout,L,r", SHAPES[1:])
@pytest.mark.parametrize("ranks", ["full", "mixed"])
def test_backward_matches_oracle(dtype, T, din, dout, L, r, ranks, cpu_kernels):
    if cpu_kernels == "blocked" and dtype != torch.float32:
        pytest.skip("the blocked kernels are float32 only; other dtypes run the ATen path")
    a = make_inputs(T, din, dout, L, r, dtype, ranks=mixed_ranks(L, r) if ranks == "mixed" else None,
                    requires_grad=True)
    y, _ = run_op(a)
    gy = torch.randn_like(y)
    names = [k for k in GRAD_NAMES if a[k] is not None]
    got = torch.autograd.grad(y, [a[k] for k in names], gy)
    want = _grads(a, torch.float64, gy)
    low = _grads(a, dtype, gy)
    for k, g, w, lo in zip(names, got, want, low):
        assert g.dtype == a[k].dtype and g.shape == a[k].shape, k
        assert_close_to_oracle(g, w, lo.to(g.dtype), name=f"grad {k}")


def test_gradients_zero_past_each_rank_and_for_absent_adapters():
    ids = torch.tensor([0, 0, 2, -1, 2])
    a = make_inputs(5, 6, 7, 3, 4, torch.float64, ranks=[2, 4, 3], requires_grad=True, ids=ids)
    y, _ = run_op(a)
    ga, gb, gs = torch.autograd.grad(y.sum(), [a["lora_a"], a["lora_b"], a["scales"]])
    assert torch.all(ga[0, 2:] == 0) and torch.all(gb[0, :, 2:] == 0) and torch.all(ga[2, 3:] == 0)
    assert torch.all(ga[1] == 0) and torch.all(gb[1] == 0) and gs[1] == 0  # adapter 1 unused
    assert ga[0, :2].abs().sum() > 0 and gb[2, :, :3].abs().sum() > 0


def test_gradcheck_float64():
    a = make_inputs(9, 7, 6, 3, 4, torch.float64, ranks=[2, 4, 3], requires_grad=True)
    a["scales"] = a["scales"].detach().double().requires_grad_(True)
    ids, ranks = a["adapter_ids"], a["ranks"]

    def f(x, w, b, la, lb, s):
        return OP(x, w, b, la, lb, ids, s, ranks, None, None)[0]

    assert torch.autograd.gradcheck(f, tuple(a[k] for k in GRAD_NAMES))


def test_backward_op_output_mask():
    a = make_inputs(6, 5, 4, 2, 3, torch.float64)
    y, hidden = run_op(a)
    order, offsets = SEG(a["adapter_ids"], 2)
    out = BWD(torch.ones_like(y), a["x"], a["weight"], a["lora_a"], a["lora_b"], a["adapter_ids"], a["scales"],
              None, hidden, order, offsets, [False, True, False, True, False, True, False, False])
    assert [t is not None for t in out] == [False, True, False, True, False, True, False, False]
    assert out[5].dtype == a["scales"].dtype


def test_leading_dims_noncontiguous_and_row_ids():
    a = make_inputs(0, 24, 10, 3, 4, torch.float32, lead=(3, 5))
    base = torch.randn(24, 5, 3).permute(2, 1, 0)  # (3, 5, 24), non-contiguous
    a["x"] = base
    y, hidden = run_op(a)
    assert y.shape == (3, 5, 10) and hidden.shape == (3, 5, 4)
    torch.testing.assert_close(y.double(), oracle({**a, "x": base.contiguous()}), rtol=1e-5, atol=1e-5)
    # the wrapper broadcasts one id per row over the row's tokens (PEFT's adapter_names convention)
    row_ids = torch.tensor([2, -1, 0])
    y_rows = lrkernels.multi_lora_linear(base, a["weight"], a["bias"], a["lora_a"], a["lora_b"], row_ids,
                                         scales=a["scales"])
    want = oracle({**a, "x": base.contiguous(), "adapter_ids": row_ids[:, None].expand(3, 5)})
    torch.testing.assert_close(y_rows.double(), want, rtol=1e-5, atol=1e-5)


def test_segments_reused_across_layers_give_same_result(cpu_kernels):
    a = make_inputs(40, 32, 24, 5, 8, torch.float32, ranks=[8, 2, 5, 8, 1])
    seg = lrkernels.multi_lora_segments(a["adapter_ids"], 5)
    y1, h1 = run_op(a)
    y2, h2 = run_op(a, seg)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(h1, h2, rtol=0, atol=0)
    y3 = lrkernels.multi_lora_linear(a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], a["adapter_ids"],
                                     scales=a["scales"], ranks=a["ranks"], segments=seg)
    torch.testing.assert_close(y1, y3, rtol=0, atol=0)


def test_all_base_and_single_adapter_batches(cpu_kernels):
    a = make_inputs(12, 16, 8, 3, 4, torch.float64, ids=torch.full((12,), -1))
    y, hidden = run_op(a)
    torch.testing.assert_close(y, a["x"] @ a["weight"].T + a["bias"])
    assert torch.all(hidden == 0)
    a = make_inputs(12, 16, 8, 3, 4, torch.float64, ids=torch.full((12,), 1))
    torch.testing.assert_close(run_op(a)[0], oracle(a))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_lora_linear_per_adapter(dtype, cpu_kernels):
    L, r_max, ranks = 4, 8, [8, 3, 6, 1]
    a = make_inputs(60, 48, 40, L, r_max, dtype, ranks=ranks, requires_grad=True)
    y, _ = run_op(a)
    gy = torch.randn_like(y)
    ga, gb = torch.autograd.grad(y, [a["lora_a"], a["lora_b"]], gy)
    ids = a["adapter_ids"]
    for l in range(L):
        rows = (ids == l).nonzero().flatten()
        if rows.numel() == 0:
            continue
        la = a["lora_a"][l, :ranks[l]].detach().clone().requires_grad_(True)
        lb = a["lora_b"][l, :, :ranks[l]].detach().clone().requires_grad_(True)
        y_l = lrkernels.lora_linear(a["x"][rows], a["weight"], a["bias"], la, lb, scale=float(a["scales"][l].detach()))
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(y[rows], y_l, **tol)
        ga_l, gb_l = torch.autograd.grad(y_l, [la, lb], gy[rows])
        torch.testing.assert_close(ga[l, :ranks[l]], ga_l, **tol)
        torch.testing.assert_close(gb[l, :, :ranks[l]], gb_l, **tol)
    base = (ids == -1).nonzero().flatten()
    torch.testing.assert_close(y[base], (a["x"][base] @ a["weight"].T + a["bias"]).detach())


# ---------------------------------------------------------------------------- gates, output scales, dropout

OPT_GRAD_NAMES = GRAD_NAMES + ("rank_scale", "out_scale")


def seed_of(value, device="cpu"):
    return torch.tensor([value], dtype=torch.int64, device=device)


def with_options(a, options, dtype, *, p=0.3, seed=1234, requires_grad=False):
    """a plus rank_scale (L, r_max), out_scale (L, out) and dropout, as `options` ("gates+out",
    ...) names them."""
    options = set(options.split("+")) if options else set()
    L, r_max, dout = a["lora_a"].shape[0], a["lora_a"].shape[1], a["weight"].shape[0]
    b = dict(a, rank_scale=None, out_scale=None, dropout_p=0.0, seed=None)
    pdt = torch.float32 if dtype == torch.bfloat16 else dtype  # fp32 gates on a bf16 base (mixed rule)
    if "gates" in options:
        b["rank_scale"] = (torch.rand(L, r_max, dtype=torch.float64) * 1.5 + 0.25).to(pdt)
    if "out" in options:
        b["out_scale"] = (torch.rand(L, dout, dtype=torch.float64) * 1.5 + 0.25).to(pdt)
    if "dropout" in options:
        b["dropout_p"], b["seed"] = p, seed_of(seed)
    if requires_grad:
        for k in ("rank_scale", "out_scale"):
            if b[k] is not None:
                b[k].requires_grad_(True)
    return b


def run_opt(b):
    return OP(b["x"], b["weight"], b["bias"], b["lora_a"], b["lora_b"], b["adapter_ids"], b["scales"], b["ranks"],
              None, None, b["rank_scale"], b["out_scale"], b["dropout_p"], b["seed"])


def oracle_opt(b, dtype=torch.float64):
    return ref.multi_lora_linear(b["x"], b["weight"], b["bias"], b["lora_a"], b["lora_b"], b["adapter_ids"],
                                 scales=b["scales"], ranks=b["ranks"], rank_scale=b["rank_scale"],
                                 out_scale=b["out_scale"], dropout_p=b["dropout_p"],
                                 seed=0 if b["seed"] is None else int(b["seed"]), dtype=dtype)


OPTIONS = ["gates", "out", "dropout", "gates+out+dropout"]


@pytest.mark.parametrize("dtype", cpu_dtypes())
@pytest.mark.parametrize("T,din,dout,L,r", [(7, 13, 17, 3, 5), (50, 64, 65, 4, 16), (300, 40, 24, 3, 8)])
@pytest.mark.parametrize("options", OPTIONS)
def test_options_forward_matches_oracle(dtype, T, din, dout, L, r, options, cpu_kernels):
    if cpu_kernels == "blocked" and dtype != torch.float32:
        pytest.skip("the blocked kernels are float32 only; other dtypes run the ATen path")
    b = with_options(make_inputs(T, din, dout, L, r, dtype, ranks=mixed_ranks(L, r)), options, dtype)
    y, hidden = run_opt(b)
    assert y.dtype == dtype and y.shape == (T, dout)
    assert_close_to_oracle(y, oracle_opt(b), oracle_opt(b, dtype).to(dtype))
    # hidden is drop(x) Aᵀ before any gain (what the backward reads)
    xd = b["x"].double()
    if b["dropout_p"] > 0:
        from lrkernels.reference.philox import dropout_mask
        xd = xd * dropout_mask(int(b["seed"]), T, din, b["dropout_p"], dtype=torch.float64)
    want_h = ref.lora_shrink(xd, b["lora_a"], b["adapter_ids"], b["ranks"])
    low_h = ref.lora_shrink(xd.to(dtype), b["lora_a"], b["adapter_ids"], b["ranks"], dtype=dtype).to(dtype)
    assert_close_to_oracle(hidden, want_h, low_h, name="hidden")


def _opt_grads(b, dtype, gy, names):
    leaf = {k: (v.detach().to(dtype).requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point()
                else v) for k, v in b.items()}
    y = oracle_opt(leaf, dtype=dtype)
    return torch.autograd.grad(y, [leaf[k] for k in names], gy.to(dtype))


@pytest.mark.parametrize("dtype", cpu_dtypes())
@pytest.mark.parametrize("T,din,dout,L,r", [(7, 13, 17, 3, 5), (50, 64, 65, 4, 16)])
@pytest.mark.parametrize("options", OPTIONS)
def test_options_backward_matches_oracle(dtype, T, din, dout, L, r, options, cpu_kernels):
    if cpu_kernels == "blocked" and dtype != torch.float32:
        pytest.skip("the blocked kernels are float32 only; other dtypes run the ATen path")
    b = with_options(make_inputs(T, din, dout, L, r, dtype, ranks=mixed_ranks(L, r), requires_grad=True), options,
                     dtype, requires_grad=True)
    y, _ = run_opt(b)
    gy = torch.randn_like(y)
    names = [k for k in OPT_GRAD_NAMES if b[k] is not None]
    got = torch.autograd.grad(y, [b[k] for k in names], gy)
    want = _opt_grads(b, torch.float64, gy, names)
    low = _opt_grads(b, dtype, gy, names)
    for k, g, w, lo in zip(names, got, want, low):
        assert g.dtype == b[k].dtype and g.shape == b[k].shape, k
        assert_close_to_oracle(g, w, lo.to(g.dtype), name=f"grad {k}")


def test_options_gradcheck_float64():
    a = make_inputs(9, 7, 6, 3, 4, torch.float64, ranks=[2, 4, 3], requires_grad=True)
    a["scales"] = a["scales"].detach().double().requires_grad_(True)
    b = with_options(a, "gates+out+dropout", torch.float64, requires_grad=True)
    ids, ranks, seed = b["adapter_ids"], b["ranks"], b["seed"]

    def f(x, w, bias, la, lb, s, g, o):
        return OP(x, w, bias, la, lb, ids, s, ranks, None, None, g, o, 0.3, seed)[0]

    assert torch.autograd.gradcheck(f, tuple(b[k] for k in OPT_GRAD_NAMES))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_is_lora_linears_per_token(p, cpu_kernels):
    """Token t's adapter input is row t of lora_linear's mask: a batch where every token uses
    adapter 0 equals lora_linear with the same seed, forward and backward."""
    a = make_inputs(70, 24, 20, 2, 6, torch.float32, base_frac=0.0, ids=torch.zeros(70, dtype=torch.int64),
                    requires_grad=True)
    b = with_options(a, "dropout", torch.float32, p=p, seed=77)
    y, _ = run_opt(b)
    gy = torch.randn_like(y)
    gx, ga = torch.autograd.grad(y, [a["x"], a["lora_a"]], gy)
    x2 = a["x"].detach().clone().requires_grad_(True)
    la = a["lora_a"][0].detach().clone().requires_grad_(True)
    y_l, _ = torch.ops.lrkernels.lora_linear(x2, a["weight"].detach(), a["bias"].detach(), la,
                                             a["lora_b"][0].detach(), float(a["scales"][0]), None, None, p,
                                             seed_of(77))
    gx_l, ga_l = torch.autograd.grad(y_l, [x2, la], gy)
    torch.testing.assert_close(y, y_l, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_l, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga[0], ga_l, rtol=1e-5, atol=1e-5)
    assert torch.all(ga[1] == 0)
    # a different seed gives a different result; p = 0 is no dropout
    assert not torch.allclose(run_opt(dict(b, seed=seed_of(78)))[0], y)
    torch.testing.assert_close(run_opt(dict(b, dropout_p=0.0, seed=None))[0], run_op(a)[0])


def test_options_opcheck():
    a = make_inputs(11, 12, 9, 3, 4, torch.float32, ranks=[4, 2, 3])
    b = with_options(a, "gates+out+dropout", torch.float32)
    args = (b["x"], b["weight"], b["bias"], b["lora_a"], b["lora_b"], b["adapter_ids"], b["scales"], b["ranks"],
            None, None, b["rank_scale"], b["out_scale"], b["dropout_p"], b["seed"])
    torch.library.opcheck(OP, args)
    y, hidden = OP(*args)
    seg = SEG(b["adapter_ids"], 3)
    bargs = (torch.randn_like(y), b["x"], b["weight"], b["lora_a"], b["lora_b"], b["adapter_ids"], b["scales"],
             b["ranks"], hidden, seg[0], seg[1])
    for mask in ([True] * 8, [False] * 6 + [True, True], [True, False, False, True, False, False, True, False]):
        torch.library.opcheck(BWD, bargs + (mask, b["rank_scale"], b["out_scale"], b["dropout_p"], b["seed"]))


def test_module_gates_out_scales_and_dropout():
    torch.manual_seed(0)
    m = lrkernels.nn.MultiLoRALinear(16, 12, 3, 4, ranks=[4, 2, 3], dropout=0.25, rank_scale="parameter",
                                     out_scale="buffer")
    assert isinstance(m.rank_scale, nn.Parameter) and m.rank_scale.shape == (3, 4)
    assert not isinstance(m.out_scale, nn.Parameter) and m.out_scale.shape == (3, 12)
    with torch.no_grad():
        m.lora_b.normal_()
        m.rank_scale.uniform_(0.5, 1.5)
        m.out_scale.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 16)
    ids = torch.tensor([0, 2])
    m.eval()
    y_eval = m(x, ids)
    want = ref.multi_lora_linear(x, m.weight, m.bias, m.lora_a, m.lora_b, ids[:, None].expand(2, 5),
                                 scales=m.scales, ranks=m.ranks, rank_scale=m.rank_scale, out_scale=m.out_scale,
                                 dtype=torch.float64)
    torch.testing.assert_close(y_eval.double(), want, rtol=1e-5, atol=1e-5)
    m.train()
    y1, y2 = m(x, ids), m(x, ids)
    assert not torch.allclose(y1, y_eval) and not torch.allclose(y1, y2)  # fresh masks each call
    y1.sum().backward()
    assert m.rank_scale.grad is not None and m.rank_scale.grad[1, 2:].abs().sum() == 0  # past adapter 1's rank
    assert m.lora_a.grad is not None and m.lora_a.grad[1].abs().sum() == 0  # adapter 1 unused
    with pytest.raises(ValueError, match="dropout"):
        lrkernels.nn.MultiLoRALinear(16, 12, 3, 4, dropout=1.0)


@pytest.mark.parametrize("T,din,dout,L,r_max,ranks,base_frac,zero_scale", [
    (300, 64, 80, 3, 16, None, 0.2, False),
    (300, 70, 33, 5, 40, [40, 1, 17, 33, 8], 0.3, True),
    (29, 17, 300, 2, 256, [256, 100], 0.0, False),
    (530, 32, 24, 9, 8, [8, 2, 5, 8, 1, 3, 8, 7, 6], 0.5, False),
    (64, 48, 40, 4, 8, None, 1.0, False),
])
def test_fused_cpu_forward_matches_portable(T, din, dout, L, r_max, ranks, base_frac, zero_scale, cpu_capability):
    """multi_lora_linear's blocked path (at::vec, each instruction set) against the ATen one: adapter runs crossing block
    boundaries, mixed ranks up to 256, base-only tokens (also a batch of only those), an adapter
    with scale 0, tails in every dimension."""
    torch.manual_seed(7)
    a = make_inputs(T, din, dout, L, r_max, torch.float32, ranks=ranks, base_frac=base_frac)
    if zero_scale:
        a["scales"][1] = 0.0
    outs = {}
    for mode in ("blocked", "aten"):
        with lrkernels.use_cpu_kernels(mode):
            outs[mode] = run_op(a)
    for name, u, v in zip(("y", "hidden"), outs["blocked"], outs["aten"]):
        torch.testing.assert_close(u, v, rtol=2e-5, atol=2e-5 * max(1.0, v.abs().max().item()), msg=name)


@pytest.mark.parametrize("T,din,dout,L,r_max,ranks,base_frac,zero_scale,options", [
    (300, 64, 80, 3, 16, None, 0.2, False, ""),
    (300, 70, 33, 5, 40, [40, 1, 17, 33, 8], 0.3, True, "gates+out"),
    (29, 17, 300, 2, 256, [256, 100], 0.0, False, "gates"),
    (530, 32, 24, 9, 8, [8, 2, 5, 8, 1, 3, 8, 7, 6], 0.5, False, "out"),
    (64, 48, 40, 4, 8, None, 1.0, False, ""),
])
@pytest.mark.parametrize("mask", ["all", "adapters only", "x only"])
def test_fused_cpu_backward_matches_portable(T, din, dout, L, r_max, ranks, base_frac, zero_scale, options, mask,
                                             cpu_capability):
    """The blocked backward (each instruction set) against the ATen one, every gradient, for
    several output masks: runs crossing block boundaries, mixed ranks, base-only tokens."""
    torch.manual_seed(8)
    a = make_inputs(T, din, dout, L, r_max, torch.float32, ranks=ranks, base_frac=base_frac)
    if zero_scale:
        a["scales"][1] = 0.0
    b = with_options(a, options, torch.float32)
    y, hidden = run_opt(b)
    gy = torch.randn_like(y)
    order, offsets = SEG(b["adapter_ids"], L)
    want = {"all": [True, False, False, True, True, True, True, True],
            "adapters only": [False, False, False, True, True, True, True, True],
            "x only": [True] + [False] * 7}[mask]
    outs = {}
    for mode in ("blocked", "aten"):
        with lrkernels.use_cpu_kernels(mode):
            outs[mode] = BWD(gy, b["x"], b["weight"], b["lora_a"], b["lora_b"], b["adapter_ids"], b["scales"],
                             b["ranks"], hidden, order, offsets, want, b["rank_scale"], b["out_scale"], 0.0, None)
    for name, u, v in zip(OPT_GRAD_NAMES, outs["blocked"], outs["aten"]):
        assert (u is None) == (v is None), name
        if u is not None:
            assert u.dtype == v.dtype and u.shape == v.shape, name
            torch.testing.assert_close(u, v, rtol=2e-5, atol=2e-5 * max(1.0, v.abs().max().item()), msg=name)


# ---------------------------------------------------------------------------- mixed precision

def mixed_inputs(T, din, dout, L, r_max, *, ranks=None, requires_grad=False, dtype=torch.bfloat16):
    """x, weight, bias in `dtype` (bfloat16) with lora_a, lora_b, scales in float32 (PEFT's default)."""
    a = make_inputs(T, din, dout, L, r_max, torch.float32, ranks=ranks)
    for k in ("x", "weight", "bias"):
        a[k] = a[k].to(dtype)
    if requires_grad:
        for k in GRAD_NAMES:
            a[k].requires_grad_(True)
    return a


def mixed_low_prec(a):
    """PEFT's arithmetic on a low-precision base with float32 adapters: the base layer in x's dtype,
    the adapters in float32 on x cast to float32, the sum rounded to x's dtype. Differentiable."""
    base = torch.nn.functional.linear(a["x"], a["weight"], a["bias"])
    adapter = oracle({**a, "x": a["x"].float(), "weight": torch.zeros_like(a["weight"], dtype=torch.float32),
                      "bias": None}, dtype=torch.float32)
    return (base.float() + adapter).to(a["x"].dtype)


def _abs(a):
    return {k: (v.detach().abs().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in a.items()}


@pytest.mark.parametrize("T,din,dout,L,r", SHAPES)
@pytest.mark.parametrize("ranks", ["full", "mixed"])
def test_mixed_precision_forward_matches_oracle(T, din, dout, L, r, ranks, cpu_kernels):
    a = mixed_inputs(T, din, dout, L, r, ranks=mixed_ranks(L, r) if ranks == "mixed" else None)
    y, hidden = run_op(a)
    assert y.dtype == torch.bfloat16 and hidden.dtype == torch.float32
    assert_close_to_oracle(y, oracle(a), mixed_low_prec(a), mag=oracle(_abs(a)))
    xf = a["x"].float()
    assert_close_to_oracle(hidden, ref.lora_shrink(a["x"], a["lora_a"], a["adapter_ids"], a["ranks"]),
                           ref.lora_shrink(xf, a["lora_a"], a["adapter_ids"], a["ranks"], dtype=torch.float32),
                           name="hidden", mag=ref.lora_shrink(xf.abs(), a["lora_a"].abs(), a["adapter_ids"],
                                                              a["ranks"]))


@pytest.mark.parametrize("T,din,dout,L,r", SHAPES[1:])
@pytest.mark.parametrize("ranks", ["full", "mixed"])
def test_mixed_precision_backward_matches_oracle(T, din, dout, L, r, ranks):
    """Every gradient in its own parameter's dtype (x, weight, bias: bf16; lora_a, lora_b, scales:
    float32), within twice the error of PEFT's mixed-precision arithmetic, element by element."""
    a = mixed_inputs(T, din, dout, L, r, ranks=mixed_ranks(L, r) if ranks == "mixed" else None, requires_grad=True)
    y, _ = run_op(a)
    gy = torch.randn_like(y)
    names = [k for k in GRAD_NAMES if a[k] is not None]
    got = torch.autograd.grad(y, [a[k] for k in names], gy)
    want = _grads(a, torch.float64, gy)
    leafl = {k: (v.detach().clone().requires_grad_(True) if k in names else v) for k, v in a.items()}
    low = torch.autograd.grad(mixed_low_prec(leafl), [leafl[k] for k in names], gy)
    leafm = {k: (v.detach().abs().double().requires_grad_(True) if k in names else v) for k, v in a.items()}
    mag = torch.autograd.grad(oracle(leafm), [leafm[k] for k in names], gy.abs().double())
    for k, g, w, lo, m in zip(names, got, want, low, mag):
        assert g.dtype == a[k].dtype and g.shape == a[k].shape, k
        assert_close_to_oracle(g, w, lo, name=f"grad {k}", mag=m)


def test_mixed_precision_rejects_other_adapter_dtypes():
    a = make_inputs(6, 16, 12, 3, 4, torch.float32)
    for k in ("lora_a", "lora_b"):
        with pytest.raises(TypeError, match=f"{k} has dtype"):
            run_op({**a, k: a[k].to(torch.bfloat16)})
    b = mixed_inputs(6, 16, 12, 3, 4)
    with pytest.raises(TypeError, match="lora_a has dtype"):
        run_op({**b, "lora_a": b["lora_a"].double()})


def test_mixed_precision_opcheck():
    a = mixed_inputs(9, 12, 7, 3, 4, ranks=[4, 1, 3], requires_grad=True)
    args = (a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], a["adapter_ids"], a["scales"], a["ranks"],
            None, None)
    torch.library.opcheck(OP, args)


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_mode_and_no_grad(mode, dtype, cpu_kernels):
    """Calls under torch.inference_mode() / torch.no_grad() (enough tokens for the blocked path and
    several adapters on worker threads) give the same output as a plain call."""
    a = make_inputs(300, 40, 24, 5, 8, dtype, ranks=[8, 2, 5, 8, 1])
    want = run_op(a)
    ctx = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with ctx:
        got = run_op(a)
        seg = lrkernels.multi_lora_segments(a["adapter_ids"], 5)
        y = lrkernels.multi_lora_linear(a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], a["adapter_ids"],
                                        scales=a["scales"], ranks=a["ranks"], segments=seg)
    torch.testing.assert_close(y, want[0], rtol=0, atol=0)
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_module_bf16_base_fp32_adapters():
    """MultiLoRALinear on a bfloat16 base with float32 adapters: bf16 output within PEFT-style
    mixed-precision error, float32 adapter gradients, several adapters train in one batch."""
    torch.manual_seed(5)
    base = nn.Linear(24, 16).to(torch.bfloat16)
    m = lrkernels.nn.MultiLoRALinear.from_linear(base, num_adapters=3, r_max=4, ranks=[4, 2, 3],
                                                 adapter_dtype=torch.float32)
    assert m.weight.dtype == torch.bfloat16 and m.lora_a.dtype == torch.float32 and m.lora_b.dtype == torch.float32
    with torch.no_grad():
        m.lora_b.normal_(std=0.1)
    x = torch.randn(30, 24, dtype=torch.bfloat16)
    ids = torch.arange(30) % 4 - 1
    y = m(x, ids)
    assert y.dtype == torch.bfloat16
    ranks = torch.tensor([4, 2, 3])
    a = dict(x=x, weight=m.weight.detach(), bias=m.bias.detach(), lora_a=m.lora_a.detach(), lora_b=m.lora_b.detach(),
             adapter_ids=ids, scales=m.scales, ranks=ranks)
    assert_close_to_oracle(y, oracle(a), mixed_low_prec(a), mag=oracle(_abs(a)))
    target = torch.randn(30, 16)
    opt = torch.optim.SGD([m.lora_a, m.lora_b], lr=0.05)
    losses = []
    for _ in range(15):
        loss = ((m(x, ids).float() - target) ** 2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m.lora_a.grad.dtype == torch.float32 and losses[-1] < losses[0]


def test_autocast_bfloat16_computes_and_returns_bfloat16():
    a = make_inputs(20, 24, 16, 3, 4, torch.float32, ranks=[4, 1, 3], requires_grad=True)
    run = lambda d: OP(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], a["adapter_ids"],  # noqa: E731
                       d["scales"], a["ranks"], None, None)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run(a)
    assert y.dtype == torch.bfloat16
    cast = {k: (a[k].detach().to(torch.bfloat16) if k in ("x", "weight", "bias") else a[k].detach()).requires_grad_(True)
            for k in GRAD_NAMES}
    y_ref = run(cast)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, [a[k] for k in GRAD_NAMES], gy)
    want = torch.autograd.grad(y_ref, [cast[k] for k in GRAD_NAMES], gy)
    for k, g, w in zip(GRAD_NAMES, got, want):
        assert g.dtype == torch.float32, k
        torch.testing.assert_close(g, w.float(), rtol=0, atol=0)


# ---------------------------------------------------------------------------- shrink / expand blocks

@pytest.mark.parametrize("dtype", cpu_dtypes())
@pytest.mark.parametrize("slices", [None, [40, 12, 12]])
def test_shrink_expand_compose(dtype, slices):
    T, din, L, r = 30, 36, 4, 6
    ranks = torch.tensor([6, 2, 4, 6])
    ids = torch.randint(-1, L, (T,))
    x = torch.randn(T, din, dtype=torch.float64).to(dtype)
    S = 1 if slices is None else len(slices)
    out_total = 20 if slices is None else sum(slices)
    a4 = (torch.randn(S, L, r, din, dtype=torch.float64) / 6).to(dtype)
    b = (torch.randn(L, out_total, r, dtype=torch.float64) / 2).to(dtype)
    scales = torch.tensor([0.5, 1.0, 2.0, 0.25])
    seg = lrkernels.multi_lora_segments(ids, L)
    lora_a = a4[0] if slices is None else a4
    h = lrkernels.lora_shrink(x, lora_a, ids, seg, ranks=ranks)
    assert h.shape == ((T, r) if slices is None else (S, T, r))
    assert_close_to_oracle(h, ref.lora_shrink(x, lora_a, ids, ranks),
                           ref.lora_shrink(x, lora_a, ids, ranks, dtype=dtype).to(dtype), name="hidden")
    y0 = torch.randn(T, out_total, dtype=torch.float64).to(dtype)
    y = y0.clone()
    out = lrkernels.lora_expand_(y, h, b, ids, seg, scales=scales, ranks=ranks, slice_sizes=slices)
    assert out is y
    want = ref.lora_expand(y0, h, b, ids, scales=scales, ranks=ranks, slice_sizes=slices)
    low = ref.lora_expand(y0, h, b, ids, scales=scales, ranks=ranks, slice_sizes=slices, dtype=dtype).to(dtype)
    assert_close_to_oracle(y, want, low, name="expanded y")


def test_shrink_expand_equal_fused_layer():
    a = make_inputs(25, 20, 16, 3, 5, torch.float64, ranks=[5, 1, 3])
    seg = lrkernels.multi_lora_segments(a["adapter_ids"], 3)
    y = a["x"] @ a["weight"].T + a["bias"]
    h = lrkernels.lora_shrink(a["x"], a["lora_a"], a["adapter_ids"], seg, ranks=a["ranks"])
    lrkernels.lora_expand_(y, h, a["lora_b"], a["adapter_ids"], seg, scales=a["scales"], ranks=a["ranks"])
    y_fused, h_fused = run_op(a, seg)
    torch.testing.assert_close(y, y_fused)
    torch.testing.assert_close(h, h_fused)


def test_shrink_and_expand_refuse_inputs_that_require_grad():
    # no backward: they must raise, not return a result whose gradient is silently missing
    a = make_inputs(6, 8, 5, 2, 3, torch.float32)
    seg = lrkernels.multi_lora_segments(a["adapter_ids"], 2)
    with pytest.raises(RuntimeError, match=r"lora_shrink is not differentiable, but its input\(s\) lora_a"):
        lrkernels.lora_shrink(a["x"], a["lora_a"].requires_grad_(), a["adapter_ids"], seg)
    h = lrkernels.lora_shrink(a["x"], a["lora_a"].detach(), a["adapter_ids"], seg)
    y = torch.zeros(6, 5)
    with pytest.raises(RuntimeError, match=r"lora_expand_ is not differentiable, but its input\(s\) lora_b"):
        lrkernels.lora_expand_(y, h, a["lora_b"].requires_grad_(), a["adapter_ids"], seg, scales=a["scales"])
    with torch.no_grad():  # without grad mode the same call runs
        lrkernels.lora_expand_(y, h, a["lora_b"], a["adapter_ids"], seg, scales=a["scales"])
    assert y.abs().sum() > 0


def test_expand_into_a_column_block_of_a_fused_output():
    T, L, r = 10, 2, 3
    ids = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1, 0, 1])
    h = torch.randn(T, r, dtype=torch.float64)
    b = torch.randn(L, 5, r, dtype=torch.float64)
    scales = torch.tensor([1.5, -0.5])
    seg = lrkernels.multi_lora_segments(ids, L)
    buf = torch.randn(T, 12, dtype=torch.float64)
    before = buf.clone()
    lrkernels.lora_expand_(buf[:, 4:9], h, b, ids, seg, scales=scales)
    torch.testing.assert_close(buf[:, :4], before[:, :4], rtol=0, atol=0)
    torch.testing.assert_close(buf[:, 9:], before[:, 9:], rtol=0, atol=0)
    torch.testing.assert_close(buf[:, 4:9], ref.lora_expand(before[:, 4:9], h, b, ids, scales=scales))


# ---------------------------------------------------------------------------- opcheck / compile

def test_opcheck_every_op():
    a = make_inputs(11, 12, 9, 3, 4, torch.float32, ranks=[4, 2, 3], requires_grad=True)
    seg = SEG(a["adapter_ids"], 3)
    torch.library.opcheck(SEG, (a["adapter_ids"], 3))
    torch.library.opcheck(SEG, (torch.zeros(0, dtype=torch.int64), 2))
    for order, offsets in [(None, None), seg]:
        torch.library.opcheck(OP, (a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], a["adapter_ids"],
                                   a["scales"], a["ranks"], order, offsets))
    y, hidden = run_op(a)
    d = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    bargs = (torch.randn_like(y), d["x"], d["weight"], d["lora_a"], d["lora_b"], d["adapter_ids"], d["scales"],
             d["ranks"], hidden, seg[0], seg[1])
    torch.library.opcheck(BWD, bargs + ([True] * 6 + [False] * 2,))
    torch.library.opcheck(BWD, bargs + ([True, False, False, False, True, True, False, False],))
    torch.library.opcheck(SHRINK, (d["x"], d["lora_a"], d["adapter_ids"], seg[0], seg[1], d["ranks"]))
    torch.library.opcheck(SHRINK, (d["x"], torch.stack([d["lora_a"]] * 2), d["adapter_ids"], seg[0], seg[1], None))
    h = SHRINK(d["x"], d["lora_a"], d["adapter_ids"], seg[0], seg[1], d["ranks"])
    torch.library.opcheck(EXPAND, (torch.randn(11, 9), h, d["lora_b"], d["adapter_ids"], seg[0], seg[1],
                                   d["scales"], d["ranks"], None))
    h2 = SHRINK(d["x"], torch.stack([d["lora_a"]] * 2), d["adapter_ids"], seg[0], seg[1], None)
    b2 = torch.randn(3, 13, 4)
    torch.library.opcheck(EXPAND, (torch.randn(11, 13), h2, b2, d["adapter_ids"], seg[0], seg[1], d["scales"],
                                   None, [9, 4]))


def test_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    a = make_inputs(14, 16, 12, 3, 4, torch.float32, ranks=[4, 1, 2], requires_grad=True)
    ids, ranks = a["adapter_ids"], a["ranks"]

    def f(x, w, b, la, lb, s):
        seg = lrkernels.multi_lora_segments(ids, 3)
        return lrkernels.multi_lora_linear(x, w, b, la, lb, ids, scales=s, ranks=ranks, segments=seg)

    args = tuple(a[k] for k in GRAD_NAMES)
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = cf(*args)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, args, gy)
    want = torch.autograd.grad(f(*args), args, gy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_compile_inductor_module():
    torch._dynamo.reset()
    m = lrkernels.nn.MultiLoRALinear(16, 8, num_adapters=3, r_max=4, ranks=[4, 2, 3])
    nn.init.normal_(m.lora_b)
    x = torch.randn(6, 16, requires_grad=True)
    ids = torch.tensor([0, 2, -1, 1, 1, 0])
    cm = torch.compile(m, fullgraph=True)
    cm(x, ids).sum().backward()
    assert m.lora_b.grad is not None and x.grad is not None
    torch.testing.assert_close(cm(x, ids), m(x, ids))


# ---------------------------------------------------------------------------- PEFT equivalence

try:
    import peft
except ImportError:  # only the tests that need it skip; the rest of the file runs
    peft = None
needs_peft = pytest.mark.skipif(peft is None, reason="peft is not installed")


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 32)
        self.down = nn.Linear(32, 20)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _peft_three_adapters():
    torch.manual_seed(3)
    model = peft.get_peft_model(_Tiny(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"]),
                                adapter_name="a4")
    model.add_adapter("a8", peft.LoraConfig(r=8, lora_alpha=4, target_modules=["up", "down"]))
    model.add_adapter("a2", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["up", "down"], use_rslora=True))
    for mod in model.modules():
        if hasattr(mod, "lora_B"):
            for lin in mod.lora_B.values():
                nn.init.normal_(lin.weight)
    model.eval()
    return model


@needs_peft
def test_matches_peft_mixed_batch():
    model = _peft_three_adapters()
    x = torch.randn(9, 24)
    names = ["a4", "__base__", "a8", "a2", "a8", "__base__", "a4", "a2", "a2"]
    with torch.no_grad():
        y_peft = model(x, adapter_names=names)
    inner, order = lrkernels.nn.multi_lora_from_peft(model)
    assert order == ["a4", "a8", "a2"]
    ids = torch.tensor([order.index(n) if n != "__base__" else -1 for n in names])
    lrkernels.nn.set_multi_lora_batch(inner, ids)
    with torch.no_grad():
        y = inner(x)
    torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=1e-5)
    up = inner.up
    assert isinstance(up, lrkernels.nn.MultiLoRALinear) and up.ranks.tolist() == [4, 8, 2]
    assert up.scales.tolist() == pytest.approx([2.0, 0.5, 2 / math.sqrt(2)])


@needs_peft
def test_peft_rows_of_sequences():
    model = _peft_three_adapters()
    x = torch.randn(4, 5, 24)  # (batch, seq, in): one adapter per row
    names = ["a2", "a8", "__base__", "a4"]
    with torch.no_grad():
        y_peft = model(x, adapter_names=names)
    inner, order = lrkernels.nn.multi_lora_from_peft(model)
    ids = torch.tensor([order.index(n) if n != "__base__" else -1 for n in names])
    lrkernels.nn.set_multi_lora_batch(inner, ids[:, None].expand(4, 5))
    with torch.no_grad():
        y = inner(x)
    torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=1e-5)


@needs_peft
def test_peft_converter_rejects_what_it_cannot_represent():
    torch.manual_seed(0)
    model = peft.get_peft_model(_Tiny(), peft.LoraConfig(r=4, target_modules=["up"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        lrkernels.nn.multi_lora_from_peft(model)
    with pytest.raises(ValueError, match="no PEFT LoRA Linear layer"):
        lrkernels.nn.multi_lora_from_peft(_Tiny(), adapter_names=["a"])


# ---------------------------------------------------------------------------- MultiLoRALinear

def test_module_trains_several_adapters_in_one_batch():
    torch.manual_seed(0)
    m = lrkernels.nn.MultiLoRALinear(8, 4, num_adapters=3, r_max=4, ranks=[4, 2, 1], alphas=[8, 4, 2])
    opt = torch.optim.SGD([m.lora_a, m.lora_b], lr=0.2)
    x = torch.randn(48, 8)
    ids = torch.arange(48) % 3
    targets = torch.randn(3, 4)[ids]
    past_rank = m.lora_a.detach()[1, 2:].clone()  # adapter 1 has rank 2: these entries are unused
    first = None
    for _ in range(30):
        loss = ((m(x, ids) - targets) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first
    torch.testing.assert_close(m.lora_a.detach()[1, 2:], past_rank, rtol=0, atol=0)  # zero grad past rank
    assert not torch.equal(m.lora_a.detach()[1, :2], m.lora_a.detach()[1, :2] * 0)
    assert torch.all(m.lora_b.grad[2, :, 1:] == 0)


def test_module_starts_at_base_and_requires_ids():
    base = nn.Linear(10, 6)
    m = lrkernels.nn.MultiLoRALinear.from_linear(base, num_adapters=2, r_max=3)
    assert m.weight is base.weight and not m.weight.requires_grad
    x = torch.randn(4, 10)
    torch.testing.assert_close(m(x, torch.tensor([0, 1, -1, 0])), base(x))
    with pytest.raises(ValueError, match="adapter_ids"):
        m(x)
    with pytest.raises(ValueError, match="ranks must be"):
        lrkernels.nn.MultiLoRALinear(10, 6, num_adapters=2, r_max=3, ranks=[3, 4])


# ---------------------------------------------------------------------------- bad inputs

def _bad(change):
    a = make_inputs(6, 16, 12, 3, 4, torch.float32, ranks=[4, 2, 3])
    change(a)
    return a


@pytest.mark.parametrize("change,exc,match", [
    (lambda a: a.update(adapter_ids=torch.tensor([0, 1, 3, 0, 0, 0])), ValueError,
     r"adapter_ids must be in \[-1, L\) = \[-1, 3\).*got 3"),
    (lambda a: a.update(adapter_ids=torch.tensor([0, 1, -2, 0, 0, 0])), ValueError, r"adapter_ids must be in.*got -2"),
    (lambda a: a.update(adapter_ids=torch.zeros(5, dtype=torch.int64)), ValueError,
     r"adapter_ids must have x's leading shape \(6,\)"),
    (lambda a: a.update(adapter_ids=torch.zeros(6)), TypeError, r"adapter_ids must be int32 or int64, got Float"),
    (lambda a: a.update(ranks=torch.tensor([4, 5, 1])), ValueError, r"ranks must be in \[0, r_max\] = \[0, 4\], got 5"),
    (lambda a: a.update(ranks=torch.tensor([4, 2])), ValueError, r"ranks must have shape \(L,\) = \(3,\)"),
    (lambda a: a.update(ranks=torch.tensor([4.0, 2.0, 1.0])), TypeError, r"ranks must be int32 or int64"),
    (lambda a: a.update(lora_b=torch.randn(2, 12, 4)), ValueError,
     r"lora_b must have shape \(L, out_features, r_max\) = \(3, 12, 4\), got \(2, 12, 4\)"),
    (lambda a: a.update(scales=torch.ones(4)), ValueError, r"scales must have shape \(L,\) = \(3,\)"),
    (lambda a: a.update(scales=torch.ones(3, dtype=torch.int64)), TypeError, r"scales must be a floating-point"),
    (lambda a: a.update(lora_a=torch.randn(3, 4, 15)), ValueError, r"lora_a must have shape \(L, r_max, in_features\)"),
    (lambda a: a.update(lora_a=torch.randn(4, 16)), ValueError, r"lora_a must be 3-D"),
    (lambda a: a.update(lora_a=torch.randn(0, 4, 16), lora_b=torch.randn(0, 12, 4), scales=torch.ones(0), ranks=None,
                        adapter_ids=torch.full((6,), -1)), ValueError, r"at least one adapter \(L >= 1\)"),
    (lambda a: a.update(lora_a=a["lora_a"].double()), TypeError, r"lora_a has dtype Double but x has dtype Float"),
    (lambda a: a.update(weight=torch.randn(12, 15)), ValueError, r"weight must have shape"),
    (lambda a: a.update(x=a["x"].long(), weight=a["weight"].long()), TypeError, r"x must be float32, float64"),
])
def test_bad_inputs(change, exc, match):
    a = _bad(change)
    with pytest.raises(exc, match=match):
        run_op(a)


def test_bad_segments():
    a = make_inputs(6, 16, 12, 3, 4, torch.float32)
    order, offsets = SEG(a["adapter_ids"], 3)
    with pytest.raises(ValueError, match=r"adapter_offsets must have shape \(L \+ 1,\) = \(4,\)"):
        run_op(a, (order, offsets[:3]))
    with pytest.raises(TypeError, match="token_order must be int32"):
        run_op(a, (order.long(), offsets))
    with pytest.raises(ValueError, match="token_order must hold token indices"):
        run_op(a, (order + 100, offsets))
    with pytest.raises(ValueError, match="adapter_offsets must start at 0"):
        run_op(a, (order, torch.tensor([0, 5, 2, 6], dtype=torch.int32)))
    with pytest.raises(ValueError, match="adapter_ids must be in"):
        SEG(torch.tensor([0, 5]), 3)
    with pytest.raises(ValueError, match="pass both token_order and adapter_offsets"):
        OP(a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], a["adapter_ids"], a["scales"], None, order, None)


def test_bad_expand_args():
    ids = torch.tensor([0, 1, 0])
    seg = lrkernels.multi_lora_segments(ids, 2)
    h = torch.zeros(2, 3, 4)
    b = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match="slice_sizes must sum to lora_b's out_total = 10"):
        lrkernels.lora_expand_(torch.zeros(3, 10), h, b, ids, seg, scales=torch.ones(2), slice_sizes=[5, 4])
    with pytest.raises(ValueError, match="slice_sizes has 3 entries but hidden has 2 slices"):
        lrkernels.lora_expand_(torch.zeros(3, 10), h, b, ids, seg, scales=torch.ones(2), slice_sizes=[5, 4, 1])
    with pytest.raises(TypeError, match="hidden must be Float"):
        lrkernels.lora_expand_(torch.zeros(3, 10), h.double(), b, ids, seg, scales=torch.ones(2))
    with pytest.raises(ValueError, match=r"y's rows must be contiguous"):
        lrkernels.lora_expand_(torch.zeros(10, 3).T, h, b, ids, seg, scales=torch.ones(2))


# ---------------------------------------------------------------------------- CUDA kernels

CUDA_SHAPES = SHAPES + [(257, 300, 130, 6, 40), (64, 128, 256, 64, 16), (5, 1000, 33, 3, 100), (130, 96, 80, 2, 256)]


def _to(a, device):
    return {k: (v.detach().to(device) if isinstance(v, torch.Tensor) else v) for k, v in a.items()}


@pytest.mark.cuda
def test_cuda_kernels_registered():
    for op in ("multi_lora_segments", "lora_shrink", "lora_expand_", "multi_lora_linear", "multi_lora_linear_backward"):
        assert lrkernels.has_kernel(op, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", cuda_dtypes())
@pytest.mark.parametrize("T,din,dout,L,r", CUDA_SHAPES)
def test_cuda_forward_backward_matches_oracle(dtype, T, din, dout, L, r):
    cpu = make_inputs(T, din, dout, L, r, torch.float64, ranks=mixed_ranks(L, r))
    low_dt = torch.float32 if dtype == torch.float16 else dtype  # CPU has no fp16 GEMM: fp32 on fp16 data
    cpu = {k: (v.to(dtype).double() if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "scales" else v)
           for k, v in cpu.items()}
    a = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "scales" else v)
         for k, v in _to(cpu, "cuda").items()}
    for k in GRAD_NAMES:
        if a[k] is not None:
            a[k].requires_grad_(True)
    y, hidden = run_op(a)
    torch.cuda.synchronize()
    assert y.dtype == dtype and hidden.dtype == torch.float32
    assert_close_to_oracle(y, oracle(cpu), low_oracle(cpu, low_dt).to(dtype))
    torch.testing.assert_close(hidden.double().cpu(), ref.lora_shrink(cpu["x"], cpu["lora_a"], cpu["adapter_ids"],
                                                                         cpu["ranks"]),
                               rtol=1e-4 if dtype == torch.float32 else 2e-2,
                               atol=1e-4 if dtype == torch.float32 else 2e-2)
    if T == 0:
        return
    names = [k for k in GRAD_NAMES if a[k] is not None]
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, [a[k] for k in names], gy)
    want = _grads(cpu, torch.float64, gy.cpu())
    low = _grads({k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "scales" else v)
                  for k, v in cpu.items()} if low_dt == dtype else cpu, low_dt, gy.cpu())
    for k, g, w, lo in zip(names, got, want, low):
        assert g.dtype == a[k].dtype and g.shape == a[k].shape, k
        assert_close_to_oracle(g, w, lo.to(g.dtype), name=f"cuda grad {k} ({dtype})")


@pytest.mark.cuda
def test_cuda_matches_cpu_kernel_and_blocks():
    a = make_inputs(70, 96, 80, 5, 16, torch.float32, ranks=[16, 8, 4, 16, 1])
    ac = _to(a, "cuda")
    y_cpu, h_cpu = run_op(a)
    y_gpu, h_gpu = run_op(ac)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h_gpu.cpu(), h_cpu, rtol=1e-4, atol=1e-4)
    seg_c = SEG(a["adapter_ids"], 5)
    seg_g = SEG(ac["adapter_ids"], 5)
    torch.testing.assert_close(seg_g[0].cpu(), seg_c[0], rtol=0, atol=0)
    torch.testing.assert_close(seg_g[1].cpu(), seg_c[1], rtol=0, atol=0)
    # fused QKV-style slices through the building blocks
    a4 = torch.randn(3, 5, 16, 96) / 10
    b = torch.randn(5, 80 + 24 + 24, 16) / 4
    sizes = [80, 24, 24]
    outs = []
    for dev, aa in (("cpu", a), ("cuda", ac)):
        seg = lrkernels.multi_lora_segments(aa["adapter_ids"], 5)
        h = lrkernels.lora_shrink(aa["x"], a4.to(dev), aa["adapter_ids"], seg, ranks=aa["ranks"])
        y = torch.zeros(70, 128, device=dev)
        lrkernels.lora_expand_(y, h, b.to(dev), aa["adapter_ids"], seg, scales=aa["scales"], ranks=aa["ranks"],
                               slice_sizes=sizes)
        outs.append(y.cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def _launched(kernel, want_tc):
    """Asserts from the launch counters that exactly one `kernel` launch ran, on the path named."""
    n = lrkernels.cuda_kernel_launches()
    got = (n[f"multi_lora.{kernel}.tensor_core"], n[f"multi_lora.{kernel}.simt"])
    assert got == ((1, 0) if want_tc else (0, 1)), n


def shrink_on_path(path, want_tc, *args):
    lrkernels.cuda_kernel_launches(reset=True)
    with lrkernels.use_cuda_kernels(path, "multi_lora"):
        h = SHRINK(*args)
    _launched("shrink", want_tc)
    return h


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("r_max,ranks,slices", [(16, None, 1), (64, [64, 8, 16, 40], 1), (8, [8, 3, 1, 5], 2),
                                                (100, [100, 33, 1, 64], 1)])
def test_cuda_tensor_core_shrink_matches_simt_and_oracle(dtype, r_max, ranks, slices):
    # 600 tokens over 4 adapters: >= 32 per adapter, so fp16/bf16 take the tensor-core shrink
    L = 4
    cpu = make_inputs(600, 200, 72, L, r_max, torch.float64, ranks=ranks)
    la = torch.stack([cpu["lora_a"]] * slices) if slices > 1 else cpu["lora_a"]
    x = cpu["x"].to(dtype).cuda()
    la_c = la.to(dtype).cuda()
    ids = cpu["adapter_ids"].cuda()
    rk = None if cpu["ranks"] is None else cpu["ranks"].cuda()
    seg = SEG(ids, L)
    h_tc = shrink_on_path("auto", True, x, la_c, ids, seg[0], seg[1], rk)
    h_simt = shrink_on_path("simt", False, x, la_c, ids, seg[0], seg[1], rk)
    torch.testing.assert_close(h_tc, h_simt, rtol=1e-4, atol=1e-4)
    want = ref.lora_shrink(x.cpu().double(), la_c.cpu().double(), cpu["adapter_ids"], cpu["ranks"])
    torch.testing.assert_close(h_tc.double().cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("r_max,ranks,slices", [(16, None, None), (32, [32, 8, 16, 20], None),
                                                (100, [100, 33, 1, 64], None), (8, [8, 3, 1, 5], [70, 40, 20])])
def test_cuda_tensor_core_expand_matches_simt_and_oracle(dtype, r_max, ranks, slices):
    # 600 tokens over 4 adapters: >= 32 per adapter, so fp16/bf16 take the tensor-core expand
    L, T = 4, 600
    ids = torch.randint(-1, L, (T,))
    S = 1 if slices is None else len(slices)
    out_total = 130 if slices is None else sum(slices)
    h = torch.randn(S, T, r_max, dtype=torch.float64)
    rk = None if ranks is None else torch.tensor(ranks)
    if rk is not None:  # entries past each rank are zero, as lora_shrink leaves them
        for t in range(T):
            if ids[t] >= 0:
                h[:, t, rk[ids[t]]:] = 0
    b = (torch.randn(L, out_total, r_max, dtype=torch.float64) / math.sqrt(r_max)).to(dtype)
    scales = torch.tensor([0.5, 2.0, 1.0, 1.5])
    y0 = torch.randn(T, out_total, dtype=torch.float64).to(dtype)
    hc = (h if slices is not None else h[0]).float().cuda()
    idc, seg = ids.cuda(), SEG(ids.cuda(), L)
    rkc = None if rk is None else rk.cuda()
    outs = []
    for path in ("auto", "simt"):
        y = y0.cuda()
        lrkernels.cuda_kernel_launches(reset=True)
        with lrkernels.use_cuda_kernels(path, "multi_lora"):
            EXPAND(y, hc, b.cuda(), idc, seg[0], seg[1], scales.cuda(), rkc, slices)
        _launched("expand", path == "auto")
        outs.append(y.cpu())
    torch.testing.assert_close(outs[0], outs[1])  # within one rounding of the output dtype
    want = ref.lora_expand(y0, hc.cpu(), b, ids, scales=scales, ranks=rk, slice_sizes=slices)
    low = ref.lora_expand(y0, hc.cpu(), b, ids, scales=scales, ranks=rk, slice_sizes=slices,
                          dtype=torch.float32).to(dtype)
    assert_close_to_oracle(outs[0], want, low, name="tensor-core expand")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_forced_tensor_cores_for_decode_batches(dtype):
    """set_cuda_kernels("tensor_core") takes the tensor cores below the auto threshold (few tokens
    per adapter, mostly empty tiles); "auto" takes SIMT there. Both match the oracle."""
    a = make_inputs(20, 72, 40, 6, 16, torch.float64, ranks=[16, 3, 8, 1, 16, 5])
    lo = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k != "scales" else v)
          for k, v in a.items()}
    ac = _to(lo, "cuda")
    for path, want_tc in (("tensor_core", True), ("auto", False)):
        lrkernels.cuda_kernel_launches(reset=True)
        with lrkernels.use_cuda_kernels(path, "multi_lora"):
            y, _ = run_op(ac)
        _launched("shrink", want_tc)
        _launched("expand", want_tc)
        assert_close_to_oracle(y.cpu(), oracle(lo), low_oracle(lo, dtype), name=f"y ({path})")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fp32", ["both", "lora_a", "lora_b"])
def test_cuda_fp32_adapters_on_low_precision_base(dtype, fp32):
    """x and the base layer in fp16/bf16, adapter weights in float32 (PEFT's default): SIMT kernels
    with fp32 adapter reads, y in x's dtype, each gradient in its tensor's dtype, against the
    float64 oracle of the same mixed inputs."""
    a = make_inputs(300, 72, 40, 3, 8, torch.float64, ranks=[8, 3, 5])
    lo = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k != "scales" else v)
          for k, v in a.items()}
    for k in (["lora_a", "lora_b"] if fp32 == "both" else [fp32]):
        lo[k] = a[k].float()
    ac = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in lo.items()}
    for k in GRAD_NAMES:
        if ac[k] is not None:
            ac[k].requires_grad_(True)
    lrkernels.cuda_kernel_launches(reset=True)
    y, _ = run_op(ac)
    _launched("shrink", False)
    _launched("expand", False)
    assert y.dtype == dtype
    assert_close_to_oracle(y.detach().cpu(), oracle(lo), low_oracle(lo, dtype), name="y")
    gy = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    y.backward(gy.cuda())
    leaves = {k: (v.double().requires_grad_(True) if k in GRAD_NAMES and v is not None else v) for k, v in lo.items()}
    oracle(leaves).backward(gy.double())
    for k in GRAD_NAMES:
        if ac[k] is None:
            continue
        g = ac[k].grad
        assert g is not None and g.dtype == ac[k].dtype, (k, g)
        want = leaves[k].grad
        err = (g.cpu().double() - want).abs().max().item()
        bound = (3e-2 if dtype == torch.bfloat16 else 5e-3) * (want.abs().max().item() + 1e-3)
        assert err <= bound, f"grad {k}: max error {err:.3g} > {bound:.3g}"


@pytest.mark.cuda
def test_cuda_out_of_range_ids_and_ranks_are_safe():
    a = make_inputs(40, 64, 48, 3, 8, torch.float32, ranks=[8, 3, 5])
    ac = _to(a, "cuda")
    bad = ac["adapter_ids"].clone()
    bad[::5] = 1000
    bad[1::7] = -50
    y, _ = run_op({**ac, "adapter_ids": bad})
    want_ids = bad.cpu().clone()
    want_ids[(want_ids < -1) | (want_ids >= 3)] = -1  # documented: treated as base-only
    torch.testing.assert_close(y.cpu().double(), oracle({**a, "adapter_ids": want_ids}), rtol=1e-4, atol=1e-4)
    y2, _ = run_op({**ac, "ranks": torch.tensor([100, 3, -4], device="cuda")})  # clamped to [0, r_max]
    torch.testing.assert_close(y2.cpu().double(), oracle({**a, "ranks": torch.tensor([8, 3, 0])}), rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_cuda_graph_capture_with_changing_adapter_ids():
    a = _to(make_inputs(64, 128, 96, 8, 16, torch.bfloat16, ranks=[16, 8, 4, 16, 2, 16, 8, 1]), "cuda")
    static_ids = a["adapter_ids"].clone()

    def step():
        seg = SEG(static_ids, 8)
        return OP(a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], static_ids, a["scales"], a["ranks"],
                  seg[0], seg[1])[0]

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up off the default stream, as capture requires
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    for trial in range(3):
        static_ids.copy_(torch.randint(-1, 8, (64,), device="cuda"))
        graph.replay()
        # (bf16 tolerance: split-K shrink partials are summed by fp32 atomics in any order)
        torch.testing.assert_close(y, step())
        assert not torch.equal(y, a["x"] @ a["weight"].T + a["bias"])  # adapters did apply


@pytest.mark.cuda
def test_cuda_decode_one_token_per_adapter():
    L, r = 64, 16
    a = make_inputs(64, 512, 384, L, r, torch.float32, ids=torch.randperm(64))
    ac = _to(a, "cuda")
    y, _ = run_op(ac)
    torch.testing.assert_close(y.cpu().double(), oracle(a), rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_cuda_opcheck_and_compile():
    a = _to(make_inputs(9, 40, 24, 3, 5, torch.bfloat16, ranks=[5, 2, 3]), "cuda")
    seg = SEG(a["adapter_ids"], 3)
    torch.library.opcheck(SEG, (a["adapter_ids"], 3))
    args = (a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], a["adapter_ids"], a["scales"], a["ranks"],
            seg[0], seg[1])
    torch.library.opcheck(OP, args)
    y, hidden = OP(*args)
    torch.library.opcheck(BWD, (torch.randn_like(y), a["x"], a["weight"], a["lora_a"], a["lora_b"], a["adapter_ids"],
                                a["scales"], a["ranks"], hidden, seg[0], seg[1], [True] * 6))
    torch.library.opcheck(SHRINK, (a["x"], a["lora_a"], a["adapter_ids"], seg[0], seg[1], a["ranks"]))
    h = SHRINK(a["x"], a["lora_a"], a["adapter_ids"], seg[0], seg[1], a["ranks"])
    torch.library.opcheck(EXPAND, (torch.randn(9, 24, device="cuda", dtype=torch.bfloat16), h, a["lora_b"],
                                   a["adapter_ids"], seg[0], seg[1], a["scales"], a["ranks"], None))
    torch._dynamo.reset()
    la = a["lora_a"].clone().requires_grad_(True)
    cf = torch.compile(lambda x, la_: lrkernels.multi_lora_linear(x, a["weight"], a["bias"], la_, a["lora_b"],
                                                                  a["adapter_ids"], scales=a["scales"]),
                       fullgraph=True)
    cf(a["x"], la).float().sum().backward()
    assert la.grad is not None


@pytest.mark.cuda
def test_cuda_bad_inputs():
    a = _to(make_inputs(6, 16, 12, 3, 4, torch.float64), "cuda")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        run_op(a)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["simt", "tensor_core"])
def test_cuda_gates_out_scales_dropout_match_oracle(dtype, path):
    """rank_scale, out_scale and dropout on CUDA, on both kernel paths, against the float64 oracle:
    the output, hidden (drop(x) Aᵀ before any gain, the mask being lora_linear's rows) and all
    eight gradients."""
    from lrkernels.reference.philox import dropout_mask
    T, din, dout, L, r, p, seed = 130, 96, 80, 3, 16, 0.3, 4321
    names = GRAD_NAMES + ("rank_scale", "out_scale")
    low = lambda v, k: isinstance(v, torch.Tensor) and v.is_floating_point() and k != "scales"  # noqa: E731
    cpu = make_inputs(T, din, dout, L, r, torch.float64, ranks=mixed_ranks(L, r))
    cpu["rank_scale"] = torch.rand(L, r, dtype=torch.float64) * 1.5 + 0.25
    cpu["out_scale"] = torch.rand(L, dout, dtype=torch.float64) * 1.5 + 0.25
    cpu = {k: (v.to(dtype).double() if low(v, k) else v) for k, v in cpu.items()}  # exact in dtype
    a = {k: (v.to(dtype) if low(v, k) else v) for k, v in _to(cpu, "cuda").items()}
    for k in names:
        a[k].requires_grad_(True)
    lrkernels.cuda_kernel_launches(reset=True)
    with lrkernels.use_cuda_kernels(path, "multi_lora"):
        y, hidden = OP(a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], a["adapter_ids"], a["scales"],
                       a["ranks"], None, None, a["rank_scale"], a["out_scale"], p,
                       torch.tensor([seed], dtype=torch.int64, device="cuda"))
    want_tc = path == "tensor_core" and dtype != torch.float32
    _launched("shrink", want_tc)
    leaf = {k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point()
                else v) for k, v in cpu.items()}
    want_y = ref.multi_lora_linear(leaf["x"], leaf["weight"], leaf["bias"], leaf["lora_a"], leaf["lora_b"],
                                   leaf["adapter_ids"], scales=leaf["scales"], ranks=leaf["ranks"],
                                   rank_scale=leaf["rank_scale"], out_scale=leaf["out_scale"], dropout_p=p, seed=seed)
    tol = 1e-4 if dtype == torch.float32 else 3e-2

    def close(got, want, name):
        got, want = got.detach().double().cpu(), want.detach()
        err, scale = (got - want).abs().max().item(), want.abs().max().item()
        assert err <= tol * max(scale, 1e-6), f"{name} ({dtype}, {path}): max err {err:.3g}, max |ref| {scale:.3g}"

    close(y, want_y, "y")
    xd = cpu["x"] * dropout_mask(seed, T, din, p, dtype=torch.float64)
    close(hidden, ref.lora_shrink(xd, cpu["lora_a"], cpu["adapter_ids"], cpu["ranks"]), "hidden")
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, [a[k] for k in names], gy)
    want = torch.autograd.grad(want_y, [leaf[k] for k in names], gy.double().cpu())
    for k, g, w in zip(names, got, want):
        assert g.dtype == a[k].dtype and g.shape == a[k].shape, k
        close(g, w, f"grad {k}")
