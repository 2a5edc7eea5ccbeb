"""GaLore AdamW on the fused lrkernels step ops (Fira in fira.py).

GaLore (Zhao et al., arXiv 2403.03507) keeps Adam's moments in a rank-r subspace of each
weight's gradient: R = project(G), Adam on R, W ← W − lr·scale·project_back(N), then decoupled
weight decay. Fira (Chen et al., arXiv 2410.01623) adds the part of G outside the subspace,
scaled channel-wise by how much Adam rescaled the subspace part, with a norm-growth limiter.

Each step of a projected weight is two ops: ``galore_adam_moments`` (one pass over the r-sized
moments) and ``galore_apply_update`` (one GEMM with beta writing W once, plus, for Fira, one
elementwise pass), so no full-size temporary exists besides the gradient itself.

The seams live in their own files: the AdamW step (_adamw.py), layer-wise hooks
(_layerwise.py), capturable mode (_capturable.py), FSDP2 sharding (_sharding.py) and the
checkpoint dtype policy (_checkpoint.py); this file holds the projected step itself.
"""

import warnings
from typing import Optional

import torch
from torch.optim import Optimizer

from ..ops.galore import galore_adam_moments, galore_apply_update
from ._adamw import AdamWSteps
from ._capturable import CapturableSteps
from ._checkpoint import KeepsStateDtypes
from ._layerwise import LayerwiseSteps
from ._sharding import ShardedProjection, is_dtensor
from .projector import PROJ_METHODS, PROJ_TYPES, projects_left, randomized_projector, svd_projector

_NONFINITE = ("skip", "error", None)


class GaLoreAdamW(AdamWSteps, LayerwiseSteps, CapturableSteps, ShardedProjection, KeepsStateDtypes, Optimizer):
    """AdamW with GaLore's gradient low-rank projection, on fused kernels.

    Args:
        params: parameters or param groups. A group with ``rank`` (an int) projects each of its
            (2-D) parameters; other parameters get plain AdamW with the same formula. Groups
            may also carry ``update_proj_gap``, ``scale``, ``proj_type`` and every keyword
            below, overriding the defaults.
        lr, betas, eps, weight_decay, correct_bias: as in galore-torch's AdamW: HF-style eps
            (outside the square root), decoupled weight decay applied after the update.
        update_proj_gap: refresh each projector every this many steps (galore-torch: 200).
        scale: GaLore's α multiplying the projected-back update.
        proj_type: 'std' (project the smaller side), 'reverse_std', 'left' or 'right'.
        proj_method: 'svd' (exact, reproduces galore-torch) or 'randomized' (range finder with
            ``oversampling`` extra columns and ``power_iters`` power iterations, warm-started
            from the previous projector with ``warm_power_iters`` iterations).
        stagger: spread the refreshes of the projected weights over the ``update_proj_gap``
            steps (weight i of k refreshes at steps ≡ −⌊i·gap/k⌋ mod gap, all at step 0), so
            they do not all land on one step.
        state_dtype: dtype of the moments: float32 by default (float64 for float64 weights),
            torch.bfloat16 to halve their memory.
        nonfinite: what a non-finite gradient does (checked on the r-sized projected gradient,
            and on the full gradient only at refresh steps, by one reduction each; a sum past
            the dtype's range counts as non-finite). 'skip' (default): that weight's step is
            skipped (weights, moments and projector untouched, its step count not advanced)
            and counted in ``skipped_steps``. 'error': raise FloatingPointError. None: no check
            (saves one host synchronisation per weight and step; also what happens under
            torch.compile, where the check cannot run).
        layerwise: step each weight in its post-accumulate-grad hook during backward, then free
            its gradient (``step()`` then does nothing). Every ``accumulation_steps``-th
            backward steps; the ones in between only accumulate. Not for DDP (its all-reduce
            runs after the hooks).
        seed: seeds the randomized projector's sketches (per weight and refresh), so every
            rank of a data-parallel job computes the same projector.

        capturable: keep the step count in a tensor on the weight's device and take the
            projector refreshes out of ``step()``: call :meth:`prepare_step` eagerly before
            each step (it refreshes the projectors that are due). ``step()`` is then free of
            host synchronisation and of step-dependent Python values, so
            ``torch.compile(opt.step, fullgraph=True)`` compiles it once (and it can be
            captured in a CUDA graph). No non-finite check in this mode; plain tensors only
            (no DTensor).

    torch.compile without ``capturable``: ``torch.compile(opt.step, fullgraph=True)`` traces
    without graph breaks (the refresh's SVD included), but the step count and the refresh
    schedule are Python ints, so dynamo specialises on them and compiles one graph per step.
    Use ``capturable=True`` for a compiled step.

    A projector refresh that fails (the SVD does not converge, or returns non-finite values)
    keeps the previous projector and is counted in ``refresh_failures``; on the first refresh,
    the randomized method is tried instead, and only if that fails too does the step raise.
    """

    _scale_key = "scale"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True, *, update_proj_gap: int = 200, scale: float = 1.0, proj_type: str = "std",
                 proj_method: str = "svd", oversampling: int = 8, power_iters: int = 2, warm_power_iters: int = 1,
                 stagger: bool = False, state_dtype: Optional[torch.dtype] = None, nonfinite: Optional[str] = "skip",
                 layerwise: bool = False, accumulation_steps: int = 1, seed: int = 0, capturable: bool = False):
        if not lr >= 0.0:
            raise ValueError(f"{type(self).__name__}: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"{type(self).__name__}: betas must be in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"{type(self).__name__}: eps must be >= 0, got {eps}")
        if nonfinite not in _NONFINITE:
            raise ValueError(f"{type(self).__name__}: nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        if state_dtype not in (None, torch.float32, torch.bfloat16, torch.float64):
            raise TypeError(f"{type(self).__name__}: state_dtype must be None, torch.float32 or torch.bfloat16, "
                            f"got {state_dtype}")
        if int(accumulation_steps) < 1:
            raise ValueError(f"{type(self).__name__}: accumulation_steps must be >= 1, got {accumulation_steps}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        update_proj_gap=update_proj_gap, proj_type=proj_type, proj_method=proj_method,
                        oversampling=oversampling, power_iters=power_iters, warm_power_iters=warm_power_iters,
                        stagger=stagger, state_dtype=state_dtype)
        defaults[self._scale_key] = scale
        if capturable and layerwise:
            raise ValueError(f"{type(self).__name__}: capturable and layerwise cannot be combined")
        self.nonfinite = nonfinite
        self.capturable = bool(capturable)
        self.layerwise = bool(layerwise)
        self.accumulation_steps = int(accumulation_steps)
        self.seed = int(seed)
        super().__init__(params, defaults)
        self._install_layerwise_hooks()

    # ------------------------------------------------------------------ set-up and checks

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1], len(self.param_groups) - 1)

    def _check_group(self, group, gi):
        name = type(self).__name__
        rank = group.get("rank")
        if rank is None:
            return
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"{name}: param group {gi}: rank must be a positive int, got {rank!r}")
        if group["proj_type"] not in PROJ_TYPES:
            raise ValueError(f"{name}: param group {gi}: unknown proj_type {group['proj_type']!r}; "
                             f"expected one of {PROJ_TYPES}")
        if group["proj_method"] not in PROJ_METHODS:
            raise ValueError(f"{name}: param group {gi}: unknown proj_method {group['proj_method']!r}; "
                             f"expected one of {PROJ_METHODS}")
        gap = group["update_proj_gap"]
        if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
            raise ValueError(f"{name}: param group {gi}: update_proj_gap must be a positive int, got {gap!r}")
        for pi, p in enumerate(group["params"]):
            if p.dim() != 2:
                raise ValueError(f"{name}: param group {gi} has rank={rank}, but its parameter {pi} has shape "
                                 f"{tuple(p.shape)}; GaLore projects 2-D (out_features, in_features) weights only: "
                                 f"put other parameters in a group without 'rank'")
            if rank > min(p.shape):
                raise ValueError(f"{name}: param group {gi}: rank={rank} exceeds min(m, n) = {min(p.shape)} of its "
                                 f"parameter {pi} of shape {tuple(p.shape)}")
            if not p.is_floating_point():
                raise TypeError(f"{name}: param group {gi}: parameter {pi} has dtype {p.dtype}; GaLore needs floats")

    def _projected_order(self):
        """Index of every projected weight among all projected weights (stable: group order)."""
        params = [p for g in self.param_groups if g.get("rank") is not None for p in g["params"]]
        cached = getattr(self, "_order_cache", None)
        if cached is None or cached[0] != len(params):
            self._order_cache = (len(params), {id(p): i for i, p in enumerate(params)})
        return self._order_cache[1]

    # ------------------------------------------------------------------ counters

    def _count(self, key):
        return sum(int(s.get(key, 0)) for s in self.state.values())

    @property
    def skipped_steps(self) -> int:
        """Weight-steps skipped because of a non-finite gradient (nonfinite='skip')."""
        return self._count("skipped")

    @property
    def refresh_failures(self) -> int:
        """Projector refreshes that failed and kept the previous projector."""
        return self._count("refresh_failures")

    # ------------------------------------------------------------------ stepping

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step (does nothing but run the closure in layer-wise mode).

        With ``nonfinite`` set, the whole step costs one host synchronisation (plus one per
        refreshing weight): every weight's gradient is prepared (projected) first, one reduction
        over all of them says whether any is non-finite, and only then are states and weights
        updated (weight by weight, to find the culprit, when one is)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.layerwise:
            return loss
        work = [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]
        prepared = [w for w in (self._prepare(p, g) for p, g in work) if w is not None]
        checked = self.nonfinite is not None and not self.capturable and not torch.compiler.is_compiling()
        if checked and len({w["check"].device for w in prepared}) == 1:
            sums = torch.stack([w["check"].sum().float() for w in prepared]) if prepared else None
            checked = sums is not None and not bool(torch.isfinite(sums).all())
        # Every check before any update, so nonfinite='error' raises with nothing changed.
        ok = [not checked or self._check_finite(w["check"], w["param"], w["state"]) for w in prepared]
        for w, good in zip(prepared, ok):
            if good:
                self._finish(w)
        return loss

    def _check_finite(self, t, p, state) -> bool:
        """True to go on; False to skip this weight's step. Host sync (nonfinite != None)."""
        if self.nonfinite is None or self.capturable or torch.compiler.is_compiling():
            return True
        # One reduction and one sync: NaN and ±Inf propagate through a sum. A sum that
        # overflows counts as non-finite too, rightly: its elements' squares (Adam's v) would.
        if bool(torch.isfinite(t.sum())):
            return True
        if self.nonfinite == "error":
            raise FloatingPointError(f"{type(self).__name__}: non-finite gradient for a parameter of shape "
                                     f"{tuple(p.shape)} at step {state.get('step', 0)}")
        state["skipped"] = int(state.get("skipped", 0)) + 1
        return False

    def _step_param(self, p, group):
        w = self._prepare(p, group)
        if w is not None and self._check_finite(w["check"], p, w["state"]):
            self._finish(w)

    def _prepare(self, p, group):
        """Everything before any state changes: the projector refresh when due (which checks
        the full gradient first) and the projected gradient R. Returns the work item (with
        "check", the tensor whose finiteness decides the step), or None when skipped."""
        if p.grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device) if self.capturable else 0
        w = dict(param=p, group=group, state=state)
        if group.get("rank") is None:
            # A DTensor (FSDP2) weight is stepped shard by shard: AdamW is elementwise.
            w["weight"] = p.to_local() if is_dtensor(p) else p
            w["grad"] = p.grad.to_local() if is_dtensor(p.grad) else p.grad
            w["check"] = w["grad"]
            return w
        if is_dtensor(p):
            if self.capturable:
                raise NotImplementedError(f"{type(self).__name__}: capturable=True does not support DTensor parameters")
            return self._prepare_sharded(p, w)
        w["weight"], w["grad"], w["row_offset"], w["pg"] = p, p.grad.contiguous(), 0, None
        grad = w["grad"]
        if self.capturable:
            if "projector" not in state:
                raise RuntimeError(f"{type(self).__name__}(capturable=True): no projector for a weight of shape "
                                   f"{tuple(p.shape)}; call prepare_step() (eagerly) before each step")
        elif self._refresh_due(group, state, p):
            if not self._check_finite(grad, p, state):
                return None
            self._refresh(p, grad, group, state)
        proj = state["projector"]
        w["check"] = w["r_grad"] = proj.t() @ grad if state["project_left"] else grad @ proj.t()
        return w

    def _finish(self, w):
        if "r_grad" in w:
            self._projected_finish(w)
        else:
            self._adamw_finish(w)

    # -- projected weights

    def _refresh_due(self, group, state, p) -> bool:
        if "projector" not in state:
            return True
        gap = group["update_proj_gap"]
        offset = 0
        if group["stagger"]:
            order = self._projected_order()
            offset = (order.get(id(p), 0) * gap) // max(len(order), 1)
        step = state.get("host_step", 0) if self.capturable else state["step"]
        return (step + offset) % gap == 0

    def _refresh(self, p, grad, group, state):
        rank = group["rank"]
        left = projects_left(grad.shape, group["proj_type"])
        dtype = p.dtype
        prev = state.get("projector")
        if prev is not None and bool(state.get("project_left")) != left:
            prev = None
        refreshes = int(state.get("refreshes", 0))

        def randomized(previous):
            gen = torch.Generator(device=grad.device)
            idx = self._projected_order().get(id(p), 0)
            gen.manual_seed((self.seed * 1_000_003 + idx * 65_537 + refreshes) % (2 ** 63))
            iters = group["warm_power_iters"] if previous is not None else group["power_iters"]
            return randomized_projector(grad, rank, left, dtype, oversampling=group["oversampling"],
                                        power_iters=iters, generator=gen, previous=previous)

        new, error = None, None
        try:
            new = svd_projector(grad, rank, left, dtype) if group["proj_method"] == "svd" else randomized(prev)
            if not torch.compiler.is_compiling() and not bool(torch.isfinite(new).all()):
                error, new = "the projector has non-finite values", None
        except RuntimeError as e:  # torch.linalg.LinAlgError included: no convergence
            error = str(e)
        if new is None:
            state["refresh_failures"] = int(state.get("refresh_failures", 0)) + 1
            if prev is not None:
                warnings.warn(f"{type(self).__name__}: projector refresh failed ({error}); keeping the previous "
                              f"projector for this weight of shape {tuple(grad.shape)}")
                return
            try:
                new = randomized(None)
            except RuntimeError as e:
                raise RuntimeError(f"{type(self).__name__}: could not compute a projector for a weight of shape "
                                   f"{tuple(grad.shape)} ({error}; randomized fallback: {e})") from e
            if not bool(torch.isfinite(new).all()):
                raise RuntimeError(f"{type(self).__name__}: could not compute a finite projector for a weight of "
                                   f"shape {tuple(grad.shape)} ({error})")
        state["projector"] = new
        state["project_left"] = left
        state["refreshes"] = refreshes + 1

    def _projected_finish(self, w):
        """Adam on R and the fused update of one projected weight. w["weight"] is what gets
        written: the parameter, or its local shard, rows [row_offset, row_offset + rows) of the
        full (gradient-shaped) W."""
        group, state, r_grad = w["group"], w["state"], w["r_grad"]
        if "exp_avg" not in state:
            dt = self._moment_dtype(group, w["param"])
            state["exp_avg"] = torch.zeros(r_grad.shape, dtype=dt, device=r_grad.device)
            state["exp_avg_sq"] = torch.zeros(r_grad.shape, dtype=dt, device=r_grad.device)
        beta1, beta2 = group["betas"]
        n = galore_adam_moments(state["exp_avg"], state["exp_avg_sq"], r_grad, beta1=beta1, beta2=beta2,
                                eps=group["eps"])
        state["step"] += 1
        step_size = self._step_size(group, state["step"])
        wd = group["weight_decay"]
        beta = 1.0 - group["lr"] * wd if wd > 0.0 else 1.0
        if torch.is_tensor(step_size):  # capturable: the step size scales N on the device
            self._apply(w, n, -beta, beta, step_size.to(n.dtype))
        else:
            self._apply(w, n, -beta * step_size, beta)

    def _apply(self, w, n, alpha, beta, step_scale=None):
        """W ← β·W + α·scale·back(N) (N times step_scale, a tensor, in capturable mode),
        restricted to W's rows when W is a shard."""
        if step_scale is not None:
            n = n * step_scale
        weight, group, state = w["weight"], w["group"], w["state"]
        proj, left = state["projector"], bool(state["project_left"])
        rows = slice(w["row_offset"], w["row_offset"] + weight.shape[0])
        if left:
            galore_apply_update(weight, proj[rows], n, project_left=True, alpha=alpha * group[self._scale_key],
                                beta=beta)
        else:
            galore_apply_update(weight, proj, n[rows], project_left=False, alpha=alpha * group[self._scale_key],
                                beta=beta)
