"""MiSSLinear: a base linear layer plus a trainable Bone / MiSS block (balance, mini or bat), on
lrkernels.miss_linear; converters from PEFT MiSS layers and old PEFT Bone checkpoints."""

import math
import re

import torch
from torch import nn

from ..ops.miss import miss_linear

_VARIANTS = ("balance", "mini", "bat")


def _block_shape(variant, in_features, out_features, r, mini_r):
    if variant == "bat":
        return (out_features // r, r, r)
    if variant == "mini":
        return (r, mini_r)
    return (r, out_features)


class MiSSLinear(nn.Module):
    """``y = x (W + ΔW)ᵀ + b`` with the base W frozen and the MiSS block M trained.

    * ``variant="balance"`` (PEFT's default MiSS): M ``(r, out_features)``, ``ΔW[o, c] = M[c mod r, o]``
      (the input's chunks of r summed, then multiplied by M; dropout on the adapter's input).
    * ``"mini"``: M ``(r, mini_r)``, mini_r dividing out_features, repeated along the output.
    * ``"bat"``: M ``(out_features / r, r, r)``, ``ΔW_pq = W_pq M_p + M_p`` for the r×r blocks of W
      (r dividing both feature counts; no dropout, as in PEFT).

    M starts at zero (PEFT's initialisation), so the layer starts equal to its base. For a
    float16/bfloat16 layer M is kept in float32 (as PEFT does). ΔW is never built except by
    :meth:`delta_weight` and :meth:`merge`.
    """

    def __init__(self, in_features, out_features, r=64, *, variant="balance", mini_r=None, dropout=0.0, bias=True,
                 device=None, dtype=None):
        super().__init__()
        if variant not in _VARIANTS:
            raise ValueError(f"MiSSLinear: variant must be one of {_VARIANTS}, got {variant!r}")
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"MiSSLinear: r must be a positive int, got {r!r}")
        if r > in_features:
            raise ValueError(f"MiSSLinear: r = {r} must be at most in_features = {in_features}")
        if variant == "bat":
            for name, n in (("in_features", in_features), ("out_features", out_features)):
                if n % r != 0:
                    raise ValueError(f"MiSSLinear: variant 'bat' needs r = {r} to divide {name} = {n}")
            if dropout:
                raise ValueError(f"MiSSLinear: variant 'bat' has no dropout (as in PEFT), got dropout = {dropout}")
        if variant == "mini":
            if not isinstance(mini_r, int) or mini_r < 1 or out_features % mini_r != 0:
                raise ValueError(f"MiSSLinear: variant 'mini' needs a mini_r dividing out_features = {out_features}, "
                                 f"got mini_r = {mini_r!r}")
        elif mini_r is not None:
            raise ValueError(f"MiSSLinear: mini_r is for variant 'mini' only (variant is {variant!r})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MiSSLinear: dropout must be in [0, 1), got {dropout}")
        fk = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.variant, self.mini_r, self.dropout = variant, mini_r, float(dropout)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **fk), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **fk), requires_grad=False) if bias else None
        low_prec = dtype in (torch.float16, torch.bfloat16)
        self.miss_block = nn.Parameter(torch.zeros(_block_shape(variant, in_features, out_features, r, mini_r),
                                                   device=device, dtype=torch.float32 if low_prec else dtype))
        self.merged = False
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, base: nn.Linear, r=64, variant="balance", mini_r=None, dropout=0.0):
        """Wrap an existing nn.Linear: its weight and bias are shared (not copied) and frozen."""
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MiSSLinear.from_linear: base must be an nn.Linear, got {type(base).__name__}")
        m = cls(base.in_features, base.out_features, r, variant=variant, mini_r=mini_r, dropout=dropout,
                bias=base.bias is not None, device=base.weight.device, dtype=base.weight.dtype)
        m.weight = base.weight
        m.weight.requires_grad_(False)
        if base.bias is not None:
            m.bias = base.bias
            m.bias.requires_grad_(False)
        return m

    @classmethod
    def from_peft(cls, layer, adapter_name="default"):
        """Convert a PEFT MiSS layer (``peft.tuners.miss.MissLinear``, unmerged): the base weight and
        bias are shared, the block is copied (exactly: a float32 block stays float32), and the
        variant, r, mini_r and dropout are PEFT's."""
        blocks = getattr(layer, "miss_block", None)
        if blocks is None or adapter_name not in blocks:
            raise ValueError(f"MiSSLinear.from_peft: expected a PEFT MiSS layer with adapter {adapter_name!r}, "
                             f"got {type(layer).__name__}")
        if getattr(layer, "merged", False):
            raise ValueError("MiSSLinear.from_peft: the PEFT layer is merged; unmerge it first")
        fn = getattr(layer, "miss_fn", True)
        variant = "bat" if fn == "bat" else "mini" if fn == "mini" else "balance"
        block = blocks[adapter_name]
        r = int(block.shape[-1]) if variant == "bat" else int(block.shape[0])
        drop = layer.miss_dropout[adapter_name]
        p = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
        mini_r = int(layer.miss_mini_r[adapter_name]) if variant == "mini" else None
        m = cls.from_linear(layer.get_base_layer(), r, variant=variant, mini_r=mini_r,
                            dropout=0.0 if variant == "bat" else p)
        m.load_block(block.detach())
        return m

    @torch.no_grad()
    def load_block(self, block):
        """Copy a trained block (a PEFT MiSS ``miss_block`` or Bone ``bone_block``) into this layer."""
        if tuple(block.shape) != tuple(self.miss_block.shape):
            raise ValueError(f"MiSSLinear.load_block: block must have shape {tuple(self.miss_block.shape)} "
                             f"(variant {self.variant!r}), got {tuple(block.shape)}")
        self.miss_block.copy_(block.to(self.miss_block.dtype))

    def _kernel_variant(self):
        return "bat" if self.variant == "bat" else "balance"

    @torch.no_grad()
    def delta_weight(self, weight=None) -> torch.Tensor:
        """The dense ΔW (out_features, in_features) in the weight's dtype, computed in float32
        (float64 for a float64 weight); for bat it depends on W (the unmerged weight by default)."""
        w = self.weight if weight is None else weight
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        m = self.miss_block.detach().to(acc)
        if self.variant == "bat":
            r, n_in = self.r, self.in_features // self.r
            blocks = w.detach().to(acc).reshape(self.out_features // r, r, n_in, r).permute(0, 2, 1, 3)
            mp = m.unsqueeze(1)
            return (blocks @ mp + mp).permute(0, 2, 1, 3).reshape(self.out_features, self.in_features).to(w.dtype)
        r, cols = m.shape
        c = torch.arange(self.in_features, device=m.device) % r
        o = torch.arange(self.out_features, device=m.device) % cols
        return m[c.view(1, -1), o.view(-1, 1)].to(w.dtype)

    @torch.no_grad()
    def merge(self):
        """Fold ΔW into the base weight; forward then runs the base linear alone."""
        if self.merged:
            raise RuntimeError("MiSSLinear.merge: already merged")
        self.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Recover the base weight. balance/mini: W = W' − ΔW. bat: W' = W (I + M_p) + M_p per
        block, so W_pq = (W'_pq − M_p)(I + M_p)⁻¹, solved in float64 (exact up to the condition
        number of I + M_p times float64 rounding, then rounded to the weight's dtype: for float32
        and ‖M_p‖ ≪ 1 the recovered W is within a few float32 ulps of the original)."""
        if not self.merged:
            raise RuntimeError("MiSSLinear.unmerge: not merged")
        if self.variant == "bat":
            r, n_in, n_out = self.r, self.in_features // self.r, self.out_features // self.r
            m = self.miss_block.detach().to(torch.float64)
            eye = torch.eye(r, dtype=torch.float64, device=m.device)
            blocks = self.weight.detach().to(torch.float64).reshape(n_out, r, n_in, r).permute(0, 2, 1, 3)
            # X (I + M_p) = B  ⇔  (I + M_p)ᵀ Xᵀ = Bᵀ
            a = (eye + m).transpose(1, 2).unsqueeze(1)                     # (n_out, 1, r, r)
            rhs = (blocks - m.unsqueeze(1)).transpose(2, 3)                # (n_out, n_in, r, r)
            w = torch.linalg.solve(a.expand(n_out, n_in, r, r), rhs).transpose(2, 3)
            self.weight.copy_(w.permute(0, 2, 1, 3).reshape(self.out_features, self.in_features))
        else:
            self.weight.sub_(self.delta_weight())
        self.merged = False

    def forward(self, x):
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        p = self.dropout if self.training else 0.0
        return miss_linear(x, self.weight, self.bias, self.miss_block, variant=self._kernel_variant(), dropout_p=p)

    def extra_repr(self):
        extra = f", mini_r={self.mini_r}" if self.variant == "mini" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"variant={self.variant}{extra}, dropout={self.dropout}, merged={self.merged}")


def _replace(model, name, new):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def convert_peft_miss(model: nn.Module, adapter_name="default") -> int:
    """Replace, in place, every PEFT MiSS layer of `model` (one adapter, unmerged) by the
    equivalent :class:`MiSSLinear` (see :meth:`MiSSLinear.from_peft`). Returns how many were
    replaced. The base weights are shared, not copied."""
    targets = [(name, mod) for name, mod in model.named_modules()
               if hasattr(mod, "miss_block") and not isinstance(mod, MiSSLinear)
               and adapter_name in getattr(mod, "miss_block", {})]
    for name, mod in targets:
        _replace(model, name, MiSSLinear.from_peft(mod, adapter_name))
    return len(targets)


_BLOCK_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?:bone_block|miss_block)(?:\.(?P<adapter>[^.]+))?$")


def load_bone_checkpoint(model: nn.Module, state_dict, *, adapter_name="default", dropout=0.0) -> int:
    """Load an adapter checkpoint of PEFT's Bone tuner (keys ``<module>.bone_block``, as PEFT ≤ 0.18
    saved them; PEFT MiSS's ``<module>.miss_block`` keys load the same way) into `model`: every
    targeted nn.Linear is replaced by a :class:`MiSSLinear` sharing its weights (a MiSSLinear
    already there gets the block). The variant follows the block's shape: 3-D (out/r, r, r) is bat,
    (r, out_features) balance, (r, mini_r) mini. Keys naming another adapter are skipped. Returns
    how many layers were loaded."""
    loaded = 0
    for key, block in state_dict.items():
        m = _BLOCK_KEY.match(key)
        if m is None or (m.group("adapter") not in (None, adapter_name)):
            continue
        name = m.group("module")
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"load_bone_checkpoint: {key!r} names module {name!r}, which the model does not have")
        if isinstance(mod, MiSSLinear):
            mod.load_block(block)
        elif isinstance(mod, nn.Linear):
            if block.dim() == 3:
                variant, r, mini_r = "bat", int(block.shape[-1]), None
            elif block.dim() == 2:
                r = int(block.shape[0])
                variant, mini_r = ("balance", None) if block.shape[1] == mod.out_features else ("mini", int(block.shape[1]))
            else:
                raise ValueError(f"load_bone_checkpoint: {key!r} has shape {tuple(block.shape)}; a Bone/MiSS block "
                                 f"is 2-D (r, out_features) or 3-D (out_features / r, r, r)")
            new = MiSSLinear.from_linear(mod, r, variant=variant, mini_r=mini_r,
                                         dropout=0.0 if variant == "bat" else dropout)
            new.load_block(block)
            _replace(model, name, new)
        else:
            raise ValueError(f"load_bone_checkpoint: {key!r} targets a {type(mod).__name__}, not an nn.Linear")
        loaded += 1
    return loaded
