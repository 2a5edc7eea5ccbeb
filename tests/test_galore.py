"""GaLore / Fira: the fused step ops against the float64 oracle (opcheck, compile, bad inputs),
the optimizers against galore-torch and fira, projectors, refresh staggering, non-finite
gradients and failed refreshes, checkpoints, layer-wise mode, DDP / FSDP2, and the CUDA
kernels (cuda-marked)."""

import importlib
import importlib.util
import io
import sys
import types
import warnings

import pytest
import torch
from torch import nn

import lrkernels
from lrkernels.optim import FiraAdamW, GaLoreAdamW
from lrkernels.optim import galore as galore_mod
from lrkernels.optim.projector import captured_energy, projects_left, randomized_projector, svd_projector
from lrkernels.reference import galore as ref

from conftest import assert_close_to_oracle
from dist_common import run_worker

MOMENTS = torch.ops.lrkernels.galore_adam_moments.default
APPLY = torch.ops.lrkernels.galore_apply_update.default


def galore_torch_module(name):
    """galore_torch.<name>, or skip. The package's __init__ also imports its 8-bit optimizer and
    with it bitsandbytes (about 10 s of import here, and not needed by these tests), so only the
    modules used are loaded, under a bare package."""
    if "galore_torch" not in sys.modules:
        spec = importlib.util.find_spec("galore_torch")
        if spec is None:
            pytest.skip("galore-torch is not installed")
        pkg = types.ModuleType("galore_torch")
        pkg.__spec__ = spec
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["galore_torch"] = pkg
    return importlib.import_module(f"galore_torch.{name}")


def rnd(*shape, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


# ---------------------------------------------------------------------------- galore_adam_moments

@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (33, 128), (0, 5)])
@pytest.mark.parametrize("mdtype,gdtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                           (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                           (torch.bfloat16, torch.bfloat16)])
def test_moments_match_oracle(shape, mdtype, gdtype):
    m = rnd(*shape, dtype=mdtype, scale=0.1)
    v = rnd(*shape, dtype=mdtype, scale=0.1).abs()
    m0, v0 = m.clone(), v.clone()
    g = rnd(*shape, dtype=gdtype)
    n = lrkernels.ops.galore.galore_adam_moments(m, v, g, beta1=0.8, beta2=0.95, eps=1e-6)
    assert n.dtype == (torch.float64 if mdtype == torch.float64 else torch.float32)
    m64, v64, n64 = ref.galore_adam_moments(m0, v0, g, 0.8, 0.95, 1e-6)
    low = torch.float64 if mdtype == torch.float64 else mdtype
    m_lo, v_lo, n_lo = ref.galore_adam_moments(m0, v0, g, 0.8, 0.95, 1e-6, dtype=low)
    assert_close_to_oracle(m, m64, m_lo, "exp_avg")
    assert_close_to_oracle(v, v64, v_lo, "exp_avg_sq")
    assert_close_to_oracle(n, *stored_update(m, v, 1e-6, n.dtype), "update")


def stored_update(m, v, eps, dtype):
    """N's contract: computed from the moments as stored (rounded to bfloat16 when they are),
    so the step uses exactly the state the next step reads. Oracle and low-precision twin."""
    n64 = m.double() / (v.double().sqrt() + eps)
    lo = m.to(dtype) / (v.to(dtype).sqrt() + eps)
    return n64, lo


def test_moments_noncontiguous_grad_and_repeated_steps():
    m = torch.zeros(6, 9)
    v = torch.zeros(6, 9)
    m64, v64 = m.double(), v.double()
    for _ in range(5):
        g = rnd(9, 6).t()  # non-contiguous R
        n = lrkernels.ops.galore.galore_adam_moments(m, v, g, beta1=0.9, beta2=0.999, eps=1e-8)
        m64, v64, n64 = ref.galore_adam_moments(m64, v64, g, 0.9, 0.999, 1e-8)
    torch.testing.assert_close(m.double(), m64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(n.double(), n64, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- galore_apply_update

def update_args(m, n, r, left, dtype, residual=None):
    w = rnd(m, n, dtype=dtype)
    proj = rnd(m, r, dtype=dtype) if left else rnd(r, n, dtype=dtype)
    upd = rnd(r, n, dtype=torch.float32) if left else rnd(m, r, dtype=torch.float32)
    kw = {}
    if residual is not None:
        kw["residual_grad"] = rnd(m, n, dtype=dtype)
        s_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        kw["residual_scale"] = rnd(m, 1, dtype=s_dtype) if residual == "rows" else rnd(1, n, dtype=s_dtype)
        kw["residual_alpha"] = -0.3
    return w, proj, upd, kw


@pytest.mark.parametrize("m,n,r", [(1, 1, 1), (17, 9, 3), (40, 64, 8)])
@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("residual", [None, "rows", "cols"])
def test_apply_update_matches_oracle(m, n, r, left, dtype, residual):
    w, proj, upd, kw = update_args(m, n, r, left, dtype, residual)
    w0 = w.clone()
    lrkernels.ops.galore.galore_apply_update(w, proj, upd, project_left=left, alpha=-0.05, beta=0.99, **kw)
    want = ref.galore_apply_update(w0, proj, upd, left, -0.05, 0.99, **kw)
    low = ref.galore_apply_update(w0, proj, upd, left, -0.05, 0.99, **kw, dtype=dtype)
    assert_close_to_oracle(w, want, low, "weight")


def test_apply_update_noncontiguous_weight():
    base = rnd(12, 20)
    w = base.t()  # (20, 12), non-contiguous
    proj, upd = rnd(20, 4), rnd(4, 12)
    want = ref.galore_apply_update(w.clone(), proj, upd, True, -0.1, 0.9)
    lrkernels.ops.galore.galore_apply_update(w, proj, upd, project_left=True, alpha=-0.1, beta=0.9)
    torch.testing.assert_close(w.double(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- opcheck / compile

@pytest.mark.parametrize("mdtype", [torch.float32, torch.bfloat16])
def test_opcheck_moments(mdtype):
    args = (torch.zeros(5, 7, dtype=mdtype), torch.zeros(5, 7, dtype=mdtype), torch.randn(5, 7), 0.9, 0.999, 1e-6)
    torch.library.opcheck(MOMENTS, args)


@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("residual", [None, "rows", "cols"])
def test_opcheck_apply_update(left, residual):
    w, proj, upd, kw = update_args(9, 6, 2, left, torch.float32, residual)
    args = (w, proj, upd, left, -0.1, 0.98, kw.get("residual_grad"), kw.get("residual_scale"),
            kw.get("residual_alpha", 0.0))
    torch.library.opcheck(APPLY, args)


def test_compile_fullgraph_ops():
    torch._dynamo.reset()

    def f(w, proj, m, v, g):
        r = proj.t() @ g
        n = lrkernels.ops.galore.galore_adam_moments(m, v, r, beta1=0.9, beta2=0.99, eps=1e-6)
        lrkernels.ops.galore.galore_apply_update(w, proj, n, project_left=True, alpha=-0.01, beta=0.999)
        return n

    def inputs():
        torch.manual_seed(3)
        return rnd(10, 8), torch.linalg.qr(rnd(10, 3)).Q, torch.zeros(3, 8), torch.zeros(3, 8), rnd(10, 8)

    a, b = inputs(), inputs()
    n_eager = f(*a)
    n_comp = torch.compile(f, fullgraph=True, backend="aot_eager")(*b)
    torch.testing.assert_close(n_comp, n_eager)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


# ---------------------------------------------------------------------------- op bad inputs

def test_moments_bad_inputs():
    z = torch.zeros(4, 5)
    with pytest.raises(ValueError, match="exp_avg must have shape grad.shape"):
        MOMENTS(torch.zeros(5, 4), z.clone(), z, 0.9, 0.99, 1e-6)
    with pytest.raises(TypeError, match="exp_avg must be float32, bfloat16 or float64"):
        MOMENTS(torch.zeros(4, 5, dtype=torch.float16), z.clone(), z, 0.9, 0.99, 1e-6)
    with pytest.raises(TypeError, match="exp_avg_sq has dtype"):
        MOMENTS(z.clone(), torch.zeros(4, 5, dtype=torch.bfloat16), z, 0.9, 0.99, 1e-6)
    with pytest.raises(TypeError, match="grad must be"):
        MOMENTS(z.clone(), z.clone(), torch.zeros(4, 5, dtype=torch.int32), 0.9, 0.99, 1e-6)
    # float64 is one of GaLore's dtypes on every device; the message lists this device's set
    with pytest.raises(TypeError, match="grad must be float32, float64 or bfloat16 on cpu"):
        MOMENTS(z.clone(), z.clone(), torch.zeros(4, 5, dtype=torch.float16), 0.9, 0.99, 1e-6)
    with pytest.raises(ValueError, match="beta1 must be in"):
        MOMENTS(z.clone(), z.clone(), z, 1.0, 0.99, 1e-6)
    with pytest.raises(ValueError, match="eps must be finite"):
        MOMENTS(z.clone(), z.clone(), z, 0.9, 0.99, float("nan"))
    with pytest.raises(ValueError, match="must be contiguous"):
        MOMENTS(torch.zeros(5, 4).t(), z.clone(), z, 0.9, 0.99, 1e-6)


def test_apply_update_bad_inputs():
    w, proj, upd = torch.zeros(6, 8), torch.zeros(6, 2), torch.zeros(2, 8)
    with pytest.raises(ValueError, match=r"projector must have shape \(m, r\) for a left projection"):
        APPLY(w, torch.zeros(5, 2), upd, True, -1.0, 1.0, None, None, 0.0)
    with pytest.raises(ValueError, match=r"projector must have shape \(r, n\) for a right projection"):
        APPLY(w, torch.zeros(2, 7), torch.zeros(6, 2), False, -1.0, 1.0, None, None, 0.0)
    with pytest.raises(ValueError, match=r"update must have shape \(r, n\)"):
        APPLY(w, proj, torch.zeros(3, 8), True, -1.0, 1.0, None, None, 0.0)
    with pytest.raises(TypeError, match="projector has dtype"):
        APPLY(w, proj.double(), upd, True, -1.0, 1.0, None, None, 0.0)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        APPLY(torch.zeros(6), proj, upd, True, -1.0, 1.0, None, None, 0.0)
    with pytest.raises(ValueError, match="must be given together"):
        APPLY(w, proj, upd, True, -1.0, 1.0, torch.zeros(6, 8), None, 0.0)
    with pytest.raises(ValueError, match=r"residual_scale must have shape \(m, 1\)"):
        APPLY(w, proj, upd, True, -1.0, 1.0, torch.zeros(6, 8), torch.zeros(6), 0.0)
    with pytest.raises(ValueError, match="alpha must be finite"):
        APPLY(w, proj, upd, True, float("inf"), 1.0, None, None, 0.0)


def test_step_ops_refuse_inputs_that_require_grad():
    """Not differentiable: with grad mode on and an input requiring grad they raise, instead of
    returning a result that silently has no gradient; under no_grad / on detached inputs they run."""
    m, v, g = torch.zeros(4, 6), torch.zeros(4, 6), torch.randn(4, 6, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"galore_adam_moments is not differentiable, but its input\(s\) grad"):
        MOMENTS(m, v, g, 0.9, 0.99, 1e-8)
    w, proj, upd = torch.zeros(6, 8, requires_grad=True), torch.randn(6, 2), torch.randn(2, 8)
    with pytest.raises(RuntimeError, match=r"galore_apply_update is not differentiable, but its input\(s\) weight"):
        APPLY(w, proj, upd, True, -1.0, 1.0, None, None, 0.0)
    with torch.no_grad():
        n = MOMENTS(m, v, g, 0.9, 0.99, 1e-8)
        APPLY(w, proj, upd, True, -1.0, 1.0, None, None, 0.0)
    assert not n.requires_grad and torch.count_nonzero(w) > 0
    MOMENTS(m, v, g.detach(), 0.9, 0.99, 1e-8)


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_step_ops_under_inference_mode_and_no_grad(mode):
    m, v, g = torch.zeros(30, 64), torch.zeros(30, 64), torch.randn(30, 64)
    w, proj = torch.randn(40, 64), torch.randn(40, 30)
    with getattr(torch, mode)():
        n = MOMENTS(m, v, g, 0.9, 0.99, 1e-8)
        APPLY(w, proj, n, True, -1e-3, 1.0, None, None, 0.0)
    m2, v2 = torch.zeros(30, 64), torch.zeros(30, 64)
    torch.testing.assert_close(n, MOMENTS(m2, v2, g, 0.9, 0.99, 1e-8))


# ---------------------------------------------------------------------------- projectors

@pytest.mark.parametrize("shape,proj_type,left", [((8, 5), "std", False), ((5, 8), "std", True),
                                                  ((8, 5), "reverse_std", True), ((5, 8), "reverse_std", False),
                                                  ((8, 5), "left", True), ((5, 8), "right", False)])
def test_projects_left(shape, proj_type, left):
    assert projects_left(shape, proj_type) is left


def low_rank_plus_noise(m, n, r, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
    s = torch.linspace(10.0, 1.0, r)
    return (u * s) @ v.t() + noise * torch.randn(m, n, generator=g)


@pytest.mark.parametrize("left", [True, False])
def test_randomized_projector_energy(left):
    grad = low_rank_plus_noise(300, 200, 16)
    gen = torch.Generator().manual_seed(0)
    p = randomized_projector(grad, 16, left, torch.float32, oversampling=8, power_iters=2, generator=gen)
    assert p.shape == ((300, 16) if left else (16, 200))
    assert captured_energy(grad, p, left) >= 0.99
    # orthonormal
    gram = p.t() @ p if left else p @ p.t()
    torch.testing.assert_close(gram, torch.eye(16), atol=1e-4, rtol=0)
    # warm start from the previous subspace, after the gradient drifted, one power iteration
    grad2 = grad + 0.3 * low_rank_plus_noise(300, 200, 4, seed=1)
    p2 = randomized_projector(grad2, 16, left, torch.float32, power_iters=1, generator=gen, previous=p)
    assert captured_energy(grad2, p2, left) >= 0.99
    # signs aligned with the previous projector
    overlap = (p2 * p).sum(dim=0 if left else 1)
    assert (overlap[overlap.abs() > 0.5] > 0).all()


@pytest.mark.parametrize("true_rank", [0, 2])
def test_randomized_projector_rank_deficient_gradient(true_rank):
    """A gradient of rank below r (all zeros included): CholeskyQR's Gram matrix is singular,
    the Householder fallback still gives a finite orthonormal projector."""
    grad = low_rank_plus_noise(40, 30, true_rank, noise=0.0) if true_rank else torch.zeros(40, 30)
    p = randomized_projector(grad, 4, True, torch.float32, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.t() @ p, torch.eye(4), atol=1e-4, rtol=0)
    if true_rank:
        assert captured_energy(grad, p, True) > 0.999


def test_svd_projector_matches_galore_torch():
    gp = galore_torch_module("galore_projector")
    grad = rnd(20, 12)
    for proj_type in ("std", "reverse_std", "left", "right"):
        theirs = gp.GaLoreProjector(4, proj_type=proj_type)
        theirs.project(grad, 0)
        left = projects_left(grad.shape, proj_type)
        torch.testing.assert_close(svd_projector(grad, 4, left, torch.float32), theirs.ortho_matrix, rtol=0, atol=0)


# ---------------------------------------------------------------------------- optimizer vs peers

class MLP(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 16), nn.GELU(), nn.Linear(16, 8))
        self.to(dtype)

    def forward(self, x):
        return self.net(x)

    def projected(self):
        return [self.net[0].weight, self.net[2].weight]


def galore_groups(model, rank=4, gap=5, proj_type="std", key="scale", scale=0.5, **extra):
    w = model.projected()
    other = [p for p in model.parameters() if all(p is not q for q in w)]
    return [{"params": other},
            {"params": w, "rank": rank, "update_proj_gap": gap, key: scale, "proj_type": proj_type, **extra}]


def batches(steps, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 24, generator=g).to(dtype), torch.randn(32, 8, generator=g).to(dtype))
            for _ in range(steps)]


def train(model, opt, data, sched=None):
    losses = []
    for x, y in data:
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def max_param_diff(a, b):
    return max((p.double() - q.double()).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_trajectory_matches_galore_torch(dtype, tol, proj_type):
    peer_adamw = galore_torch_module("adamw").AdamW
    data = batches(24, dtype)
    ours, theirs = MLP(dtype), MLP(dtype)
    opt_a = GaLoreAdamW(galore_groups(ours, proj_type=proj_type), lr=1e-2, weight_decay=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt_b = peer_adamw(galore_groups(theirs, proj_type=proj_type), lr=1e-2, weight_decay=0.01,
                                         no_deprecation_warning=True)
    la, lb = train(ours, opt_a, data), train(theirs, opt_b, data)
    assert max_param_diff(ours, theirs) < tol
    assert max(abs(a - b) for a, b in zip(la, lb)) < tol * 10
    assert la[-1] < la[0]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-6)])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_trajectory_matches_fira(dtype, tol, proj_type):
    fira = pytest.importorskip("fira")
    data = batches(24, dtype)
    ours, theirs = MLP(dtype), MLP(dtype)
    opt_a = FiraAdamW(galore_groups(ours, proj_type=proj_type, key="alpha", scale=0.25), lr=1e-2, weight_decay=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt_b = fira.FiraAdamW(galore_groups(theirs, proj_type=proj_type, key="alpha", scale=0.25), lr=1e-2,
                               weight_decay=0.01, no_deprecation_warning=True)
    la, lb = train(ours, opt_a, data), train(theirs, opt_b, data)
    # float64 differs only by the closed-form residual norm (the float32 SVD projector is
    # orthonormal to ~1e-7), float32 by rounding.
    assert max_param_diff(ours, theirs) < tol
    assert la[-1] < la[0]


def test_fira_differs_from_galore():
    data = batches(6)
    a, b = MLP(), MLP()
    train(a, GaLoreAdamW(galore_groups(a), lr=1e-2), data)
    train(b, FiraAdamW(galore_groups(b, key="alpha"), lr=1e-2), data)
    assert max_param_diff(a, b) > 1e-4


def test_plain_adamw_groups_match_galore_torch_without_rank():
    peer_adamw = galore_torch_module("adamw").AdamW
    data = batches(10)
    a, b = MLP(), MLP()
    train(a, GaLoreAdamW(a.parameters(), lr=1e-2, weight_decay=0.1), data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(b, peer_adamw(b.parameters(), lr=1e-2, weight_decay=0.1, no_deprecation_warning=True),
              data)
    assert max_param_diff(a, b) < 2e-5


def test_randomized_trains_and_is_deterministic():
    data = batches(15)
    runs = []
    for _ in range(2):
        m = MLP()
        losses = train(m, GaLoreAdamW(galore_groups(m, gap=4, proj_method="randomized"), lr=1e-2, seed=7), data)
        runs.append((m, losses))
    assert max_param_diff(runs[0][0], runs[1][0]) == 0
    assert runs[0][1][-1] < runs[0][1][0]


# ---------------------------------------------------------------------------- state dtype

def test_moments_float32_for_bf16_weights_and_bf16_option():
    m = MLP(torch.bfloat16)
    opt = GaLoreAdamW(galore_groups(m), lr=1e-2)
    train(m, opt, batches(2, torch.bfloat16))
    st = opt.state[m.net[0].weight]
    assert st["exp_avg"].dtype == torch.float32 and st["projector"].dtype == torch.bfloat16
    assert st["exp_avg"].shape == (40, 4)  # (40, 24) is tall: 'std' projects the right side, R is (m, r)
    m2 = MLP(torch.bfloat16)
    opt2 = GaLoreAdamW(galore_groups(m2), lr=1e-2, state_dtype=torch.bfloat16)
    train(m2, opt2, batches(2, torch.bfloat16))
    assert opt2.state[m2.net[0].weight]["exp_avg"].dtype == torch.bfloat16
    assert all(torch.isfinite(p).all() for p in m2.parameters())


# ---------------------------------------------------------------------------- refresh schedule

@pytest.mark.parametrize("stagger", [False, True])
def test_refresh_schedule_and_stagger(stagger):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
    ws = [l.weight for l in model]
    opt = GaLoreAdamW([{"params": ws, "rank": 2, "update_proj_gap": 4}], lr=1e-3, stagger=stagger)
    log = []
    for s in range(12):
        before = [opt.state[p].get("refreshes", 0) for p in ws]
        opt.zero_grad()
        model(torch.randn(8, 16)).square().mean().backward()
        opt.step()
        log.append([opt.state[p]["refreshes"] - b for p, b in zip(ws, before)])
    assert log[0] == [1, 1, 1, 1]  # every weight needs a projector on its first step
    per_step = [sum(r) for r in log[1:]]
    per_weight = [sum(col) for col in zip(*log[1:])]
    if stagger:
        assert per_weight == [2, 3, 3, 3]  # weight i refreshes when (step + i) % 4 == 0
        assert max(per_step) == 1  # one weight at a time after the first step
        assert sum(per_step) == 11  # all 4 weights keep refreshing every 4 steps
    else:
        assert per_step == [0, 0, 0, 4, 0, 0, 0, 4, 0, 0, 0]  # galore-torch: all at steps 4, 8


# ---------------------------------------------------------------------------- failures

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_is_skipped_and_counted(bad):
    model = MLP()
    opt = GaLoreAdamW(galore_groups(model), lr=1e-2)
    train(model, opt, batches(3))
    w = model.net[0].weight
    before = {k: v.clone() for k, v in opt.state[w].items() if torch.is_tensor(v)}
    w_before, step_before = w.detach().clone(), opt.state[w]["step"]
    x, y = batches(1, seed=9)[0]
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    w.grad[3, 5] = bad
    other = model.net[2].weight.detach().clone()
    opt.step()
    assert torch.equal(w, w_before) and opt.state[w]["step"] == step_before
    for k, v in before.items():
        assert torch.equal(opt.state[w][k], v), k
    assert opt.skipped_steps == 1
    assert not torch.equal(model.net[2].weight, other)  # the others still step
    train(model, opt, batches(2, seed=4))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_gradient_of_unprojected_parameter_is_skipped():
    model = MLP()
    opt = GaLoreAdamW(galore_groups(model), lr=1e-2)
    x, y = batches(1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    bias = model.net[4].bias
    bias.grad[0] = float("nan")
    before = bias.detach().clone()
    opt.step()
    assert torch.equal(bias, before) and opt.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_gradient_error_mode():
    model = MLP()
    opt = GaLoreAdamW(galore_groups(model), lr=1e-2, nonfinite="error")
    x, y = batches(1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    model.net[2].weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step()
    for p, b in zip(model.parameters(), before):  # nothing was updated, not even the finite ones
        assert torch.equal(p, b)


def test_failed_svd_keeps_previous_projector(monkeypatch):
    model = MLP()
    opt = GaLoreAdamW(galore_groups(model, gap=2), lr=1e-2)
    train(model, opt, batches(2))
    w = model.net[0].weight
    proj = opt.state[w]["projector"].clone()

    def boom(*a, **k):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(galore_mod, "svd_projector", boom)
    with pytest.warns(UserWarning, match="projector refresh failed"):
        train(model, opt, batches(1, seed=3))  # step 2: refresh due
    assert torch.equal(opt.state[w]["projector"], proj)
    assert opt.refresh_failures == 2  # both projected weights
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_failed_first_svd_falls_back_to_randomized(monkeypatch):
    monkeypatch.setattr(galore_mod, "svd_projector",
                        lambda *a, **k: (_ for _ in ()).throw(torch.linalg.LinAlgError("no convergence")))
    model = MLP()
    opt = GaLoreAdamW(galore_groups(model), lr=1e-2)
    losses = train(model, opt, batches(4))
    assert opt.refresh_failures == 2 and losses[-1] < losses[0]


def test_zero_gradient_is_harmless():
    model = MLP()
    opt = GaLoreAdamW(galore_groups(model), lr=1e-2)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


# ---------------------------------------------------------------------------- optimizer bad inputs

def test_optimizer_bad_inputs():
    model = MLP()
    w = model.projected()
    with pytest.raises(ValueError, match=r"rank=50 exceeds min\(m, n\) = 24"):
        GaLoreAdamW([{"params": w, "rank": 50}])
    with pytest.raises(ValueError, match="unknown proj_type 'diagonal'"):
        GaLoreAdamW([{"params": w, "rank": 2, "proj_type": "diagonal"}])
    with pytest.raises(ValueError, match="unknown proj_method"):
        GaLoreAdamW([{"params": w, "rank": 2, "proj_method": "qr"}])
    with pytest.raises(ValueError, match=r"parameter 0 has shape \(40,\); GaLore projects 2-D"):
        GaLoreAdamW([{"params": [model.net[0].bias], "rank": 2}])
    with pytest.raises(ValueError, match="rank must be a positive int"):
        GaLoreAdamW([{"params": w, "rank": 0}])
    with pytest.raises(ValueError, match="update_proj_gap must be a positive int"):
        GaLoreAdamW([{"params": w, "rank": 2, "update_proj_gap": 0}])
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        GaLoreAdamW(w, nonfinite="ignore")
    with pytest.raises(ValueError, match="betas"):
        GaLoreAdamW(w, betas=(1.0, 0.9))
    opt = GaLoreAdamW([{"params": [model.net[4].weight]}])
    with pytest.raises(ValueError, match="GaLore projects 2-D"):
        opt.add_param_group({"params": [model.net[4].bias], "rank": 1})
    with pytest.raises(TypeError, match="called 'alpha'"):
        FiraAdamW(w, scale=0.5)
    with pytest.raises(TypeError, match="state_dtype"):
        GaLoreAdamW(w, state_dtype=torch.float16)


# ---------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("cls,key", [(GaLoreAdamW, "scale"), (FiraAdamW, "alpha")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["svd", "randomized"])
def test_checkpoint_resume_matches_uninterrupted(cls, key, dtype, method):
    data = batches(14, dtype)
    full = MLP(dtype)
    opt_full = cls(galore_groups(full, gap=4, key=key, proj_method=method), lr=1e-2, weight_decay=0.01)
    train(full, opt_full, data)

    first = MLP(dtype)
    opt_first = cls(galore_groups(first, gap=4, key=key, proj_method=method), lr=1e-2, weight_decay=0.01)
    train(first, opt_first, data[:6])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt_first.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = MLP(dtype)
    resumed.load_state_dict(ckpt["model"])
    opt_resumed = cls(galore_groups(resumed, gap=4, key=key, proj_method=method), lr=1e-2, weight_decay=0.01)
    opt_resumed.load_state_dict(ckpt["optim"])
    st = opt_resumed.state[resumed.net[0].weight]
    assert st["exp_avg"].dtype == torch.float32 and "projector" in st
    train(resumed, opt_resumed, data[6:])
    assert max_param_diff(full, resumed) == 0


# ---------------------------------------------------------------------------- layer-wise mode

@pytest.mark.parametrize("cls,key", [(GaLoreAdamW, "scale"), (FiraAdamW, "alpha")])
def test_layerwise_with_accumulation_and_schedule(cls, key):
    accum, steps = 3, 5
    data = batches(accum * steps)
    ref_model, lw_model = MLP(), MLP()
    opt_ref = cls(galore_groups(ref_model, gap=2, key=key), lr=1e-2, weight_decay=0.01)
    opt_lw = cls(galore_groups(lw_model, gap=2, key=key), lr=1e-2, weight_decay=0.01, layerwise=True,
                 accumulation_steps=accum)
    sched_ref = torch.optim.lr_scheduler.LambdaLR(opt_ref, lambda s: 1.0 / (1 + s))
    sched_lw = torch.optim.lr_scheduler.LambdaLR(opt_lw, lambda s: 1.0 / (1 + s))
    for s in range(steps):
        for k in range(accum):
            x, y = data[s * accum + k]
            (nn.functional.mse_loss(ref_model(x), y) / accum).backward()
            (nn.functional.mse_loss(lw_model(x), y) / accum).backward()
            if k < accum - 1:  # mid-accumulation: the layer-wise optimizer has not stepped
                assert all(p.grad is not None for p in lw_model.parameters())
        assert all(p.grad is None for p in lw_model.parameters())  # stepped and freed in the hooks
        opt_ref.step()
        opt_ref.zero_grad()
        opt_lw.step()  # no-op
        sched_ref.step()
        sched_lw.step()
        assert max_param_diff(ref_model, lw_model) < 1e-6
    assert opt_lw.param_groups[0]["lr"] == opt_ref.param_groups[0]["lr"] < 1e-2


# ---------------------------------------------------------------------------- torch.compile

@torch._dynamo.config.patch(recompile_limit=32)
def test_compile_optimizer_step_fullgraph():
    """fullgraph=True: no graph break anywhere in the step, refreshes (SVD) included. The step
    count is a Python int, so each step is its own graph (see GaLoreAdamW's docstring)."""
    torch._dynamo.reset()
    data = batches(5)
    eager, comp = MLP(), MLP()
    opt_e = GaLoreAdamW(galore_groups(eager, gap=2), lr=1e-2, weight_decay=0.01, nonfinite=None)
    opt_c = GaLoreAdamW(galore_groups(comp, gap=2), lr=1e-2, weight_decay=0.01, nonfinite=None)
    step = torch.compile(opt_c.step, fullgraph=True, backend="aot_eager")
    for x, y in data:
        for model, opt, st in ((eager, opt_e, opt_e.step), (comp, opt_c, step)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            st()
    assert max_param_diff(eager, comp) < 1e-6


def train_capturable(model, opt, data, step):
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.prepare_step()
        step()


@pytest.mark.parametrize("cls,key", [(GaLoreAdamW, "scale"), (FiraAdamW, "alpha")])
def test_capturable_matches_default(cls, key):
    data = batches(9)
    ref_model, cap = MLP(), MLP()
    train(ref_model, cls(galore_groups(ref_model, gap=3, key=key), lr=1e-2, weight_decay=0.01), data)
    opt = cls(galore_groups(cap, gap=3, key=key), lr=1e-2, weight_decay=0.01, capturable=True)
    train_capturable(cap, opt, data, opt.step)
    assert torch.is_tensor(opt.state[cap.net[0].weight]["step"])
    assert opt.state[cap.net[0].weight]["refreshes"] == 3
    assert max_param_diff(ref_model, cap) < 1e-5


def test_capturable_step_compiles_once():
    """capturable=True: the compiled step has no step-dependent Python value, so 10 steps
    with 3 projector refreshes (done eagerly in prepare_step) need two graphs: the first step,
    which creates the moments, and every later one."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    data = batches(10)
    eager, comp = MLP(), MLP()
    opt_e = GaLoreAdamW(galore_groups(eager, gap=4), lr=1e-2, weight_decay=0.01, capturable=True)
    opt_c = GaLoreAdamW(galore_groups(comp, gap=4), lr=1e-2, weight_decay=0.01, capturable=True)
    train_capturable(eager, opt_e, data, opt_e.step)
    train_capturable(comp, opt_c, data, torch.compile(opt_c.step, fullgraph=True, backend="aot_eager"))
    assert counters["stats"]["unique_graphs"] == 2
    assert max_param_diff(eager, comp) < 1e-6


def test_capturable_checkpoint_resume():
    data = batches(10)
    full, first, resumed = MLP(), MLP(), MLP()
    opt_full = FiraAdamW(galore_groups(full, gap=3, key="alpha"), lr=1e-2, capturable=True)
    train_capturable(full, opt_full, data, opt_full.step)
    opt_first = FiraAdamW(galore_groups(first, gap=3, key="alpha"), lr=1e-2, capturable=True)
    train_capturable(first, opt_first, data[:4], opt_first.step)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt_first.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt_resumed = FiraAdamW(galore_groups(resumed, gap=3, key="alpha"), lr=1e-2, capturable=True)
    opt_resumed.load_state_dict(ckpt["optim"])
    train_capturable(resumed, opt_resumed, data[4:], opt_resumed.step)
    assert max_param_diff(full, resumed) == 0
    assert opt_resumed.state[resumed.net[0].weight]["refreshes"] == 4  # steps 0, 3 saved; 6, 9 after resuming


def test_capturable_needs_prepare_step():
    model = MLP()
    opt = GaLoreAdamW(galore_groups(model), lr=1e-2, capturable=True)
    x, y = batches(1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="call prepare_step"):
        opt.step()
    with pytest.raises(ValueError, match="capturable and layerwise"):
        GaLoreAdamW(galore_groups(model), capturable=True, layerwise=True)


# ---------------------------------------------------------------------------- distributed

def test_distributed_matches_single_process(tmp_path):
    """DDP and FSDP2 fully_shard (DTensor parameters) on 2 gloo ranks on CPU, each rank on half
    the batch, against one process on the whole batch:
    GaLore with the exact SVD and Fira with the randomized projector (seeded per weight and
    refresh, so both ranks draw the same sketch)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    proc = run_worker("galore_dist_worker.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for config in ("GaLoreAdamW-svd.ddp", "FiraAdamW-randomized.ddp", "GaLoreAdamW-svd.fsdp",
                   "FiraAdamW-randomized.fsdp"):
        single = torch.load(tmp_path / f"{config.split('.')[0]}.single.pt", weights_only=True)
        ranks = [torch.load(tmp_path / f"{config}.rank{r}.pt", weights_only=True) for r in (0, 1)]
        for a, b in zip(*ranks):
            assert torch.equal(a, b), config  # the same weights on every rank
        for a, b in zip(single, ranks[0]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=config)


# ---------------------------------------------------------------------------- CUDA

@pytest.mark.cuda
def test_cuda_kernels_registered():
    for op in ("galore_adam_moments", "galore_apply_update"):
        assert lrkernels.has_kernel(op, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("mdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gdtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (128, 1000), (4096, 128)])
def test_cuda_moments_match_oracle(mdtype, gdtype, shape):
    m = rnd(*shape, dtype=mdtype, scale=0.1)
    v = rnd(*shape, dtype=mdtype, scale=0.1).abs()
    g = rnd(*shape, dtype=gdtype)
    m_c, v_c = m.cuda(), v.cuda()
    n = lrkernels.ops.galore.galore_adam_moments(m_c, v_c, g.cuda(), beta1=0.9, beta2=0.99, eps=1e-6)
    m64, v64, n64 = ref.galore_adam_moments(m, v, g, 0.9, 0.99, 1e-6)
    m_lo, v_lo, n_lo = ref.galore_adam_moments(m, v, g, 0.9, 0.99, 1e-6, dtype=mdtype)
    assert n.dtype == torch.float32 and n.is_cuda
    assert_close_to_oracle(m_c, m64, m_lo, "exp_avg")
    assert_close_to_oracle(v_c, v64, v_lo, "exp_avg_sq")
    assert_close_to_oracle(n, *stored_update(m_c.cpu(), v_c.cpu(), 1e-6, n.dtype), "update")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("residual", [None, "rows", "cols"])
def test_cuda_apply_update_matches_oracle(dtype, left, residual):
    w, proj, upd, kw = update_args(300, 257, 16, left, dtype if dtype != torch.float16 else torch.float32, residual)
    w, proj = w.to(dtype), proj.to(dtype)
    if residual:
        kw["residual_grad"] = kw["residual_grad"].to(dtype)
    want = ref.galore_apply_update(w, proj, upd, left, -0.05, 0.99, **kw)
    low = ref.galore_apply_update(w, proj, upd, left, -0.05, 0.99, **kw, dtype=dtype)
    w_c = w.cuda()
    kw_c = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in kw.items()}
    lrkernels.ops.galore.galore_apply_update(w_c, proj.cuda(), upd.cuda(), project_left=left, alpha=-0.05, beta=0.99,
                                             **kw_c)
    assert_close_to_oracle(w_c, want, low, "weight")


@pytest.mark.cuda
def test_cuda_opcheck():
    args = (torch.zeros(5, 7, device="cuda"), torch.zeros(5, 7, device="cuda"), torch.randn(5, 7, device="cuda"),
            0.9, 0.999, 1e-6)
    torch.library.opcheck(MOMENTS, args)
    w, proj, upd, kw = update_args(9, 6, 2, True, torch.float32, "cols")
    torch.library.opcheck(APPLY, (w.cuda(), proj.cuda(), upd.cuda(), True, -0.1, 0.98, kw["residual_grad"].cuda(),
                                  kw["residual_scale"].cuda(), -0.3))


@pytest.mark.cuda
@pytest.mark.parametrize("cls,key", [(GaLoreAdamW, "scale"), (FiraAdamW, "alpha")])
def test_cuda_optimizer_matches_cpu(cls, key):
    data = batches(12)
    cpu, gpu = MLP(), MLP().cuda()
    # One refresh only (gap > steps): cuSOLVER and LAPACK may pick different signs for the
    # singular vectors, which changes nothing on the first refresh (the moments start at zero)
    # but would on later ones, where moments carry over.
    opt_c = cls(galore_groups(cpu, gap=100, key=key), lr=1e-2, weight_decay=0.01)
    opt_g = cls(galore_groups(gpu, gap=100, key=key), lr=1e-2, weight_decay=0.01)
    train(cpu, opt_c, data)
    train(gpu, opt_g, [(x.cuda(), y.cuda()) for x, y in data])
    assert max_param_diff(cpu, gpu.cpu()) < 1e-3


@pytest.mark.cuda
@pytest.mark.parametrize("cls,key", [(GaLoreAdamW, "scale"), (FiraAdamW, "alpha")])
def test_cuda_float64_optimizer_matches_cpu(cls, key):
    """float64 weights keep float64 moments on CUDA too (double kernels), matching the CPU."""
    data = batches(8, torch.float64)
    cpu, gpu = MLP(torch.float64), MLP(torch.float64).cuda()
    opt_c = cls(galore_groups(cpu, gap=100, key=key), lr=1e-2, weight_decay=0.01)
    opt_g = cls(galore_groups(gpu, gap=100, key=key), lr=1e-2, weight_decay=0.01)
    train(cpu, opt_c, data)
    train(gpu, opt_g, [(x.cuda(), y.cuda()) for x, y in data])
    assert opt_g.state[gpu.net[0].weight]["exp_avg"].dtype == torch.float64
    assert max_param_diff(cpu, gpu.cpu()) < 1e-8


@pytest.mark.cuda
def test_cuda_moments_float64_match_oracle():
    m = rnd(33, 70, dtype=torch.float64, scale=0.1)
    v = rnd(33, 70, dtype=torch.float64, scale=0.1).abs()
    g = rnd(33, 70, dtype=torch.float64)
    m64, v64, n64 = ref.galore_adam_moments(m, v, g, 0.9, 0.99, 1e-6)
    m_c, v_c = m.cuda(), v.cuda()
    n = lrkernels.ops.galore.galore_adam_moments(m_c, v_c, g.cuda(), beta1=0.9, beta2=0.99, eps=1e-6)
    assert n.dtype == torch.float64 and n.is_cuda
    for got, want in ((m_c, m64), (v_c, v64), (n, n64)):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("residual", [None, "rows", "cols"])
def test_cuda_apply_update_float64_matches_cpu(left, residual):
    """float64 weights are accepted on CUDA as on CPU (the entry check and the double kernels
    agree), and the step equals the CPU one to float64 rounding."""
    w, proj, upd, kw = update_args(70, 33, 5, left, torch.float64, residual)
    upd = upd.double()
    w_cpu = w.clone()
    lrkernels.ops.galore.galore_apply_update(w_cpu, proj, upd, project_left=left, alpha=-0.05, beta=0.99, **kw)
    w_c = w.cuda()
    kw_c = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in kw.items()}
    lrkernels.ops.galore.galore_apply_update(w_c, proj.cuda(), upd.cuda(), project_left=left, alpha=-0.05, beta=0.99,
                                             **kw_c)
    assert w_c.dtype == torch.float64
    torch.testing.assert_close(w_c.cpu(), w_cpu, rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.parametrize("mdtype", [torch.float32, torch.bfloat16])
def test_cuda_moments_float64_grad_with_float32_moments(mdtype):
    """A float64 gradient with float32/bfloat16 moments is rounded to float32, as on CPU."""
    m, v, g = rnd(9, 20, dtype=mdtype, scale=0.1), rnd(9, 20, dtype=mdtype, scale=0.1).abs(), rnd(9, 20,
                                                                                                  dtype=torch.float64)
    m_cpu, v_cpu = m.clone(), v.clone()
    n_cpu = MOMENTS(m_cpu, v_cpu, g, 0.9, 0.99, 1e-6)
    m_c, v_c = m.cuda(), v.cuda()
    n = MOMENTS(m_c, v_c, g.cuda(), 0.9, 0.99, 1e-6)
    assert n.dtype == torch.float32
    torch.testing.assert_close(n.cpu(), n_cpu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m_c.cpu(), m_cpu, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_cuda_bf16_training_is_finite_and_learns():
    data = [(x.cuda().bfloat16(), y.cuda().bfloat16()) for x, y in batches(20)]
    model = MLP(torch.bfloat16).cuda()
    opt = GaLoreAdamW(galore_groups(model, gap=5, proj_method="randomized"), lr=1e-2)
    losses = train(model, opt, data)
    assert opt.state[model.net[0].weight]["exp_avg"].dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters()) and losses[-1] < losses[0]
