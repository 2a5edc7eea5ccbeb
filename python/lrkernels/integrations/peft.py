"""PEFT drop-in: ``accelerate(model)`` runs PEFT's tuner layers through the lrkernels ops.

::

    model = get_peft_model(base, LoraConfig(...))       # or PeftModel.from_pretrained(...)
    report = lrkernels.integrations.peft.accelerate(model)
    print(report)                                       # which layers switched, which did not and why

Every supported layer keeps its parameters (the same tensor objects), its state-dict keys and
its whole PEFT API (``set_adapter``, ``disable_adapter()``, ``merge`` / ``unmerge``,
``save_pretrained``, ``merge_and_unload``, ``add_adapter``, ...): only the layer's ``forward`` is
replaced, on the instance, by one that reads PEFT's own state (active adapters, disabled,
merged, each adapter's tensors, scaling and dropout) on every call and computes the same result
with the fused ops. Whatever that forward does not cover at call time (a variant it does not
know, an input dtype the kernels do not take, several active adapters of a kind PEFT chains)
runs PEFT's own forward, and the layer counts why (:meth:`AccelerateReport.fallbacks`).
:func:`restore` puts PEFT's forward back.

Supported (PEFT's class, base layer an ``nn.Linear``):

* LoRA ``lora.Linear``: one or several adapters active (summed, as PEFT does), rsLoRA,
  ``lora_dropout``, ``lora_bias``, float32 adapters on a bfloat16/float16 base, autocast,
  merged / disabled state (the base layer alone), mixed batches (``adapter_names=``, also in
  ``generate()``) through the multi-LoRA kernels, and DoRA (``use_dora=True``, one active
  adapter) with the row norm ‖W + s·BA‖ computed without forming B·A; with dropout on CPU
  (float32/float64, frozen W) PEFT's second product x_d Wᵀ comes from x Wᵀ and the dropped
  entries alone (:func:`lrkernels.ops.dora.dropout_complement_linear`), not a second GEMM.
* VeRA ``vera.Linear``, C³A ``c3a.C3ALinear``, MiSS ``miss.MissLinear`` (balance, mini, bat):
  one active adapter.

Dropout: the kernels draw their masks from a Philox seed (see :func:`lrkernels.dropout_mask`),
so with ``lora_dropout > 0`` in training the masks differ from PEFT's (``torch.nn.Dropout``):
the same distribution, not the same draws. Under ``torch.utils.checkpoint`` the seed is drawn
from the global generator, whose state checkpointing restores, so the recomputation uses the
same masks. When several adapters with dropout are active at once they share one mask.

PEFT is imported lazily: importing this module does not need it; calling :func:`accelerate` does.
"""
from __future__ import annotations

import types
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["accelerate", "restore", "AccelerateReport", "is_accelerated", "dora_weight_norm"]

_STATE = "_lrkernels_peft"
_BASE_NAME = "__base__"


# ---------------------------------------------------------------------------- report

@dataclass
class AccelerateReport:
    """What :func:`accelerate` did: ``accelerated`` maps each switched layer's qualified name to
    its kind (``"lora"``, ``"vera"``, ``"c3a"``, ``"miss"``); ``skipped`` maps each PEFT layer left
    on PEFT's own forward to the reason."""
    accelerated: Dict[str, str] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)
    _model: Optional[weakref.ref] = field(default=None, repr=False, compare=False)

    def fallbacks(self) -> Dict[str, Dict[str, int]]:
        """For each accelerated layer that ran PEFT's own forward at some call (eager calls
        only; compiled graphs are not counted), how many times and why."""
        model = self._model() if self._model is not None else None
        if model is None:
            return {}
        out = {}
        for name, mod in model.named_modules():
            st = getattr(mod, _STATE, None)
            if st is not None and st.fallbacks:
                out[name] = dict(st.fallbacks)
        return out

    def __str__(self):
        lines = [f"lrkernels.integrations.peft.accelerate: {len(self.accelerated)} layer(s) on lrkernels, "
                 f"{len(self.skipped)} left on PEFT's forward"]
        kinds = {}
        for kind in self.accelerated.values():
            kinds[kind] = kinds.get(kind, 0) + 1
        if kinds:
            lines.append("  accelerated: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
        for name, why in self.skipped.items():
            lines.append(f"  kept on PEFT: {name}: {why}")
        return "\n".join(lines)


class _State:
    """Per-layer bookkeeping of an accelerated layer (not part of the state dict)."""

    def __init__(self, kind):
        self.kind = kind
        self.fallbacks: Dict[str, int] = {}
        self.weight_sq_norm = None  # DoRA: (key, ‖W‖²_row) while W is frozen and unchanged


def _fallback(layer, why, x, args, kwargs):
    """Run PEFT's own forward (the class's), counting why (eager calls only)."""
    if not torch.compiler.is_compiling():
        st = getattr(layer, _STATE)
        st.fallbacks[why] = st.fallbacks.get(why, 0) + 1
    return type(layer).forward(layer, x, *args, **kwargs)


# ---------------------------------------------------------------------------- checks

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOW = (torch.float16, torch.bfloat16)


def _autocast_on(x):
    """Whether autocast is on for x's device and applies to x (it leaves float64 alone)."""
    dev = x.device.type
    return dev in ("cpu", "cuda") and x.dtype != torch.float64 and torch.is_autocast_enabled(dev)


def _compute_dtype(x):
    """The dtype the base linear computes in: the autocast dtype under autocast, else x's."""
    return torch.get_autocast_dtype(x.device.type) if _autocast_on(x) else x.dtype


def _inputs_ok(x, base, adapter_tensors):
    """None when the kernels take this call (x, the nn.Linear base, the adapter tensors), else the
    reason they do not. Mirrors the ops' dtype rule: x and the base in one dtype the device's
    kernels take, adapter tensors in it or float32 on a float16/bfloat16 base."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        return "input is not a floating tensor"
    dev = x.device.type
    allowed = _CPU_DTYPES if dev == "cpu" else _CUDA_DTYPES if dev == "cuda" else ()
    autocast = _autocast_on(x)
    cd = torch.get_autocast_dtype(dev) if autocast else x.dtype
    if cd not in allowed:
        return f"the {dev} kernels do not take {cd}"
    w = base.weight
    if not autocast and (w.dtype != x.dtype or (base.bias is not None and base.bias.dtype != x.dtype)):
        return "input and base layer dtypes differ"
    if autocast and w.dtype not in allowed:
        return f"base weight dtype {w.dtype}"
    if w.device != x.device:
        return "base weight on another device"
    for t in adapter_tensors:
        if t is None:
            continue
        if t.device != x.device:
            return "adapter on another device"
        if t.dtype != cd and not (t.dtype == torch.float32 and cd in _LOW):
            return f"adapter dtype {t.dtype} on a {cd} computation"
    return None


def _plain_linear(base):
    return isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward


def _base_has_hooks(base):
    return bool(base._forward_hooks or base._forward_pre_hooks)


def _dropout_p(drop):
    """PEFT's dropout module for an adapter: its probability when it drops (training), else 0."""
    if isinstance(drop, nn.Dropout) and drop.training:
        return float(drop.p)
    return 0.0


def _strip_variant_kwargs(kwargs):
    """PEFT pops its variant keyword arguments (aLoRA offsets) before calling the base layer; a
    call carrying one with a value is not ours."""
    rest = dict(kwargs)
    for k in ("alora_offsets",):
        if rest.pop(k, None) is not None:
            return None
    return rest


# ---------------------------------------------------------------------------- LoRA

def _lora_forward(self, x, *args, **kwargs):
    from ..ops.lora import lora_linear

    self._check_forward_args(x, *args, **kwargs)  # PEFT's own argument checks and errors
    rest = _strip_variant_kwargs(kwargs)
    if rest is None:
        return _fallback(self, "variant keyword arguments (aLoRA)", x, args, kwargs)
    adapter_names = rest.pop("adapter_names", None)
    if args or rest:
        return _fallback(self, "extra forward arguments", x, args, kwargs)
    if self.disable_adapters or (adapter_names is None and self.merged):
        return type(self).forward(self, x, *args, **kwargs)  # the base layer alone (PEFT unmerges if disabled)
    base = self.get_base_layer()
    if _base_has_hooks(base):
        return _fallback(self, "the base layer has forward hooks", x, args, kwargs)
    if adapter_names is not None:
        return _lora_mixed_batch(self, x, base, adapter_names, args, kwargs)

    names = [n for n in self.active_adapters if n in self.lora_A]
    if not names:
        return type(self).forward(self, x, *args, **kwargs)
    variants = [self.lora_variant.get(n) for n in names]
    if any(v is not None for v in variants):
        if len(names) == 1 and _is_dora(variants[0]):
            return _dora_forward(self, x, base, names[0], args, kwargs)
        return _fallback(self, "LoRA variant" if len(names) == 1 else "several active adapters with a variant",
                         x, args, kwargs)

    a_ws = [self.lora_A[n].weight for n in names]
    b_ws = [self.lora_B[n].weight for n in names]
    b_bs = [self.lora_B[n].bias if self.lora_bias.get(n, False) else None for n in names]
    why = _inputs_ok(x, base, a_ws + b_ws + b_bs)
    if why is not None:
        return _fallback(self, why, x, args, kwargs)
    ps = {_dropout_p(self.lora_dropout[n]) for n in names}
    if len(ps) > 1:
        return _fallback(self, "active adapters with different dropout", x, args, kwargs)
    if len({t.dtype for t in a_ws + b_ws}) > 1:
        return _fallback(self, "active adapters of different dtypes", x, args, kwargs)
    p = ps.pop()
    scales = [float(self.scaling[n]) for n in names]

    bias = base.bias
    if any(bb is not None for bb in b_bs):
        # PEFT's lora_bias is lora_B's bias, scaled with the adapter: s·(B A x + b_B)
        extra = sum(s * bb for s, bb in zip(scales, b_bs) if bb is not None)
        bias = (extra if bias is None else bias + extra).to(base.weight.dtype)

    if len(names) == 1:
        a, b, scale, rank_scale = a_ws[0], b_ws[0], scales[0], None
    else:  # several active adapters: one rank-(Σ r) adapter, each block of ranks with its scaling
        a = torch.cat(a_ws, 0)
        b = torch.cat(b_ws, 1)
        scale = 1.0
        rank_scale = torch.cat([w.new_full((w.shape[0],), s) for w, s in zip(a_ws, scales)])
    return lora_linear(x, base.weight, bias, a, b, scale=scale, rank_scale=rank_scale, dropout_p=p)


def _lora_mixed_batch(self, x, base, adapter_names, args, kwargs):
    """PEFT's ``adapter_names=`` (one adapter name per row of x, ``"__base__"`` for the base
    model) on the multi-LoRA kernels."""
    from ..ops.multi_lora import multi_lora_linear

    used = []
    for n in adapter_names:
        if n != _BASE_NAME and n in self.lora_A and n not in used:
            used.append(n)
    if not used:
        return type(self).forward(self, x, *args, **kwargs)
    if any(n in self.lora_variant for n in used):
        return _fallback(self, "mixed batch with a LoRA variant", x, args, kwargs)
    a_ws = [self.lora_A[n].weight for n in used]
    b_ws = [self.lora_B[n].weight for n in used]
    b_bs = [self.lora_B[n].bias if self.lora_bias.get(n, False) else None for n in used]
    why = _inputs_ok(x, base, a_ws + b_ws + b_bs)
    if why is not None:
        return _fallback(self, why, x, args, kwargs)
    if x.dim() < 2:
        return _fallback(self, "mixed batch of a 1-d input", x, args, kwargs)
    ps = {_dropout_p(self.lora_dropout[n]) for n in used}
    if len(ps) > 1 or len({t.dtype for t in a_ws + b_ws}) > 1:
        return _fallback(self, "mixed batch of adapters with different dropout or dtypes", x, args, kwargs)
    index = {n: i for i, n in enumerate(used)}
    ids = torch.tensor([index.get(n, -1) for n in adapter_names], dtype=torch.int64, device=x.device)
    ranks = [w.shape[0] for w in a_ws]
    r_max = max(ranks)
    lora_a = torch.stack([F.pad(w, (0, 0, 0, r_max - w.shape[0])) for w in a_ws])
    lora_b = torch.stack([F.pad(w, (0, r_max - w.shape[1])) for w in b_ws])
    scales = torch.tensor([float(self.scaling[n]) for n in used], dtype=torch.float32, device=x.device)
    rank_t = None if all(r == r_max for r in ranks) else torch.tensor(ranks, dtype=torch.int32, device=x.device)
    y = multi_lora_linear(x, base.weight, base.bias, lora_a, lora_b, ids, scales=scales, ranks=rank_t,
                          dropout_p=ps.pop())
    if any(bb is not None for bb in b_bs):  # each row's own adapter bias, s·b_B
        rows = [float(self.scaling[n]) * bb if bb is not None else torch.zeros_like(b_ws[0][:, 0])
                for n, bb in zip(used, b_bs)]
        table = torch.stack(rows + [torch.zeros_like(rows[0])])  # last row: "__base__" / absent
        per_row = table[torch.where(ids < 0, len(used), ids)]
        y = (y + per_row.reshape(per_row.shape[0], *([1] * (y.dim() - 2)), -1)).to(y.dtype)
    return y


# ---------------------------------------------------------------------------- DoRA

def _is_dora(variant):
    return type(variant).__name__ == "DoraLinearVariant"


_ROW_BLOCK = 1024


def _rows_times(w, m_t):
    """w @ m_t in float32 (float64 for float64 w) without a float32 copy of the whole of a
    low-precision w: row blocks of it are converted one at a time."""
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    m_t = m_t.to(acc)
    if w.dtype == acc:
        return w @ m_t
    return torch.cat([w[i:i + _ROW_BLOCK].to(acc) @ m_t for i in range(0, w.shape[0], _ROW_BLOCK)])


def _weight_sq_norm(self, w):
    """‖W‖²_row in float32 (float64 for float64 W), cached while W is frozen and unchanged (same
    storage, same version counter); merge / unmerge drop the cache."""
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    compute = lambda: torch.linalg.vector_norm(w, dim=1, dtype=acc).square()  # noqa: E731
    if w.requires_grad or torch.compiler.is_compiling():
        return compute()
    st = getattr(self, _STATE)
    key = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
    if st.weight_sq_norm is None or st.weight_sq_norm[0] != key:
        st.weight_sq_norm = (key, compute())
    return st.weight_sq_norm[1]


def dora_weight_norm(w, lora_a, lora_b, scale, w_sq_norm=None):
    """‖W + s·B A‖ per row, without forming B A:
    ‖W‖²_row + 2s·rowsum((W Aᵀ) ⊙ B) + s²·rowsum((B (A Aᵀ)) ⊙ B), in float32 (float64 for
    float64 W), detached. ``w_sq_norm``: ‖W‖²_row if already known."""
    with torch.no_grad(), torch.autocast(w.device.type, enabled=False):
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        a = lora_a.detach().to(acc)
        b = lora_b.detach().to(acc)
        w = w.detach()
        if w_sq_norm is None:
            w_sq_norm = torch.linalg.vector_norm(w, dim=1, dtype=acc).square()
        cross = (_rows_times(w, a.T) * b).sum(1)
        quad = ((b @ (a @ a.T)) * b).sum(1)
        return (w_sq_norm + (2.0 * scale) * cross + (scale * scale) * quad).clamp_min(0).sqrt()


def _dora_forward(self, x, base, name, args, kwargs):
    """PEFT's DoRA output with the norm detached: with c = m / ‖W + s·BA‖_row,
    no dropout:   y = c ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b
    dropout p>0:  y = x Wᵀ + b + (c − 1) ⊙ (x_d Wᵀ) + c ⊙ s·x_d Aᵀ Bᵀ,  x_d = drop(x)
    (PEFT's formula in training with dropout). The scale c enters lora_linear's out_scale."""
    from ..ops.common import dropout_mask
    from ..ops.lora import lora_linear
    from ..ops._util import new_seed

    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    mag = self.lora_magnitude_vector[name].weight
    if self.lora_bias.get(name, False):
        return _fallback(self, "DoRA with lora_bias", x, args, kwargs)
    why = _inputs_ok(x, base, (a, b, mag))
    if why is not None:
        return _fallback(self, why, x, args, kwargs)
    w = base.weight
    s = float(self.scaling[name])
    norm = dora_weight_norm(w, a, b, s, _weight_sq_norm(self, w))
    c = mag / norm.to(mag.dtype)
    p = _dropout_p(self.lora_dropout[name])
    if p == 0.0:
        z = lora_linear(x, w, None, a, b, scale=s)
        y = z * c
        if base.bias is not None:
            y = y + base.bias
        return y.to(z.dtype)
    seed = new_seed(x.device)
    y = _dora_dropout_complement(x, w, base.bias, a, b, s, c, p, seed)
    if y is not None:
        return y
    # the adapter's dropout mask, drawn once: applied inside lora_linear and to x for x_d Wᵀ
    y1, _ = torch.ops.lrkernels.lora_linear.default(x, w, base.bias, a, b, s, None, c, p, seed)
    cd = y1.dtype
    mask = dropout_mask(x.shape[:-1].numel(), x.shape[-1], p, seed, device=x.device, dtype=cd)
    x_d = x.to(cd) * mask.reshape(x.shape)
    return (y1 + (c - 1) * F.linear(x_d, w.to(cd))).to(cd)


def _dora_dropout_complement(x, w, bias, a, b, s, c, p, seed):
    """DoRA with dropout without a second GEMM (CPU, float32/float64, frozen W), else None.

    PEFT's y = x Wᵀ + b + (c − 1) ⊙ x_d Wᵀ + c ⊙ s·x_d Aᵀ Bᵀ, rewritten with
    x_d Wᵀ = ks·(x Wᵀ − P), P = (x ⊙ dropped) Wᵀ (:func:`lrkernels.ops.dora.dropout_complement_linear`,
    a fraction p of a GEMM), κ = (c − 1)·ks and k = 1 + κ:
        Z = x Wᵀ + (c / k) ⊙ s·x_d Aᵀ Bᵀ   (one lora_linear, out_scale c / k)
        y = Z + κ ⊙ (Z − P) + b             (= k ⊙ x Wᵀ − κ ⊙ P + c ⊙ s·x_d Aᵀ Bᵀ + b)
    Same function, same gradients (c carries m's); one base GEMM forward and one backward, as
    LoRA. Taken only while every |k| ≥ 0.1 (c ≥ about 0.15 at p = 0.05: DoRA's c starts at 1), so
    dividing by k loses no precision; not under torch.compile (the check reads k)."""
    from ..ops.common import dropout_keep_scale
    from ..ops.dora import dropout_complement_linear

    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or w.dtype != x.dtype
            or w.requires_grad or _autocast_on(x) or torch.compiler.is_compiling()
            or any(t.dtype != x.dtype for t in (a, b))):
        return None
    c = c.to(x.dtype)
    kappa = (c - 1) * dropout_keep_scale(p)
    k = 1 + kappa
    if not bool((k.detach().abs() >= 0.1).all()):
        return None
    z, _ = torch.ops.lrkernels.lora_linear.default(x, w, None, a, b, s, None, c / k, p, seed)
    y = torch.addcmul(z, kappa, z - dropout_complement_linear(x, w, seed, p))
    return y if bias is None else y + bias


def _clear_dora_cache(self):
    st = getattr(self, _STATE, None)
    if st is not None:
        st.weight_sq_norm = None


def _merge(self, *args, **kwargs):
    _clear_dora_cache(self)
    try:
        return type(self).merge(self, *args, **kwargs)
    finally:
        _clear_dora_cache(self)


def _unmerge(self, *args, **kwargs):
    _clear_dora_cache(self)
    try:
        return type(self).unmerge(self, *args, **kwargs)
    finally:
        _clear_dora_cache(self)


# ---------------------------------------------------------------------------- VeRA, C3A, MiSS

def _active_in(self, params):
    """The active adapters that this layer holds (PEFT skips the others)."""
    return [n for n in self.active_adapters if n in params]


def _common_prelude(self, x, args, kwargs):
    """The states where PEFT runs the base layer alone, or an unsupported call: returns the
    result to give back, or None to go on."""
    if args or kwargs:
        return _fallback(self, "extra forward arguments", x, args, kwargs)
    if self.disable_adapters or self.merged:
        return type(self).forward(self, x, *args, **kwargs)
    if _base_has_hooks(self.get_base_layer()):
        return _fallback(self, "the base layer has forward hooks", x, args, kwargs)
    return None


def _vera_forward(self, x, *args, **kwargs):
    from ..ops.lora import lora_linear

    out = _common_prelude(self, x, args, kwargs)
    if out is not None:
        return out
    names = _active_in(self, self.vera_lambda_d)
    if not names:
        return type(self).forward(self, x)
    if len(names) > 1:
        return _fallback(self, "several active VeRA adapters", x, args, kwargs)
    n = names[0]
    base = self.get_base_layer()
    lam_d, lam_b = self.vera_lambda_d[n], self.vera_lambda_b[n]
    a = self.vera_A[n][:, :self.in_features]
    b = self.vera_B[n][:self.out_features, :]
    why = _inputs_ok(x, base, (a, b, lam_d, lam_b))
    if why is not None:
        return _fallback(self, why, x, args, kwargs)
    if a.dtype != lam_d.dtype or b.dtype != lam_d.dtype:
        return _fallback(self, "VeRA projections and scales of different dtypes", x, args, kwargs)
    return lora_linear(x, base.weight, base.bias, a, b, scale=1.0, rank_scale=lam_d, out_scale=lam_b,
                       dropout_p=_dropout_p(self.vera_dropout[n]))


def _c3a_forward(self, x, *args, **kwargs):
    from ..ops.c3a import c3a_linear

    out = _common_prelude(self, x, args, kwargs)
    if out is not None:
        return out
    names = _active_in(self, self.c3a_kernel)
    if not names:
        return type(self).forward(self, x)
    if len(names) > 1:  # PEFT feeds each adapter the previous one's output: kept as it is
        return _fallback(self, "several active C3A adapters", x, args, kwargs)
    base = self.get_base_layer()
    kernel = self.c3a_kernel[names[0]]
    why = _inputs_ok(x, base, (kernel,))
    if why is not None:
        return _fallback(self, why, x, args, kwargs)
    return c3a_linear(x, base.weight, base.bias, kernel, scale=1.0 / x.shape[-1])


def _miss_forward(self, x, *args, **kwargs):
    from ..ops.miss import miss_linear

    out = _common_prelude(self, x, args, kwargs)
    if out is not None:
        return out
    names = _active_in(self, self.miss_block)
    if not names:
        return type(self).forward(self, x)
    if len(names) > 1:
        return _fallback(self, "several active MiSS adapters", x, args, kwargs)
    n = names[0]
    base = self.get_base_layer()
    block = self.miss_block[n]
    why = _inputs_ok(x, base, (block,))
    if why is not None:
        return _fallback(self, why, x, args, kwargs)
    if self.miss_fn == "bat":
        return miss_linear(x, base.weight, base.bias, block, variant="bat")
    if block.dim() != 2 or self.out_features % block.shape[1] != 0:
        return _fallback(self, "MiSS block shape", x, args, kwargs)
    return miss_linear(x, base.weight, base.bias, block, variant="balance",
                       dropout_p=_dropout_p(self.miss_dropout[n]))


# ---------------------------------------------------------------------------- accelerate / restore

def _peft_classes():
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("lrkernels.integrations.peft needs the peft package (pip install peft)") from e
    table = {LoraLinear: ("lora", _lora_forward)}
    for mod, cls, kind, fn in (("peft.tuners.vera.layer", "Linear", "vera", _vera_forward),
                               ("peft.tuners.c3a.layer", "C3ALinear", "c3a", _c3a_forward),
                               ("peft.tuners.miss.layer", "MissLinear", "miss", _miss_forward)):
        try:
            table[getattr(__import__(mod, fromlist=[cls]), cls)] = (kind, fn)
        except (ImportError, AttributeError):  # pragma: no cover - older peft
            pass
    return BaseTunerLayer, table


def _why_not(layer, kind):
    """None when `layer` (of a supported class) can be accelerated, else why not."""
    base = layer.get_base_layer()
    if not _plain_linear(base):
        return f"base layer is {type(base).__name__}, not a plain nn.Linear"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out (Conv1D-style weight) is not supported"
    if getattr(layer, "quantization_backend", None) is not None:
        return "quantized base layer"
    if kind == "lora":
        for n, v in layer.lora_variant.items():
            if not _is_dora(v):
                return f"adapter {n!r} is a LoRA variant ({type(v).__name__}) lrkernels does not implement"
    return None


def is_accelerated(module: nn.Module) -> bool:
    """Whether `module` is a PEFT layer switched to lrkernels by :func:`accelerate`."""
    return getattr(module, _STATE, None) is not None


def accelerate(model: nn.Module) -> AccelerateReport:
    """Switch every supported PEFT tuner layer of `model` (a PeftModel, or any module holding
    PEFT layers) to the lrkernels ops, in place. Parameters, buffers, state-dict keys and the
    PEFT API are untouched; only the layers' ``forward`` is replaced (on the instance), and
    :func:`restore` puts PEFT's back. Calling it again is harmless (layers added since are
    switched too). Returns an :class:`AccelerateReport`."""
    BaseTunerLayer, table = _peft_classes()
    report = AccelerateReport(_model=weakref.ref(model))
    for name, mod in model.named_modules():
        if not isinstance(mod, BaseTunerLayer):
            continue
        entry = table.get(type(mod))
        if entry is None:
            report.skipped[name] = f"{type(mod).__module__}.{type(mod).__name__} is not supported by lrkernels"
            continue
        kind, fn = entry
        why = _why_not(mod, kind)
        if why is not None:
            report.skipped[name] = why
            continue
        if not is_accelerated(mod):
            object.__setattr__(mod, _STATE, _State(kind))
            mod.forward = types.MethodType(fn, mod)
            if kind == "lora":
                mod.merge = types.MethodType(_merge, mod)
                mod.unmerge = types.MethodType(_unmerge, mod)
        report.accelerated[name] = kind
    return report


def restore(model: nn.Module) -> List[str]:
    """Put PEFT's own forward back on every layer :func:`accelerate` switched; returns their
    names."""
    done = []
    for name, mod in model.named_modules():
        if not is_accelerated(mod):
            continue
        for attr in ("forward", "merge", "unmerge"):
            mod.__dict__.pop(attr, None)
        object.__delattr__(mod, _STATE)
        done.append(name)
    return done
