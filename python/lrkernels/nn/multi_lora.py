"""MultiLoRALinear: one base linear layer serving L LoRA adapters at once (every token picks
its adapter), and a converter that loads a PEFT model's LoRA adapters into such layers."""

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._scales import check_adapter_options, register_scale
from ..ops.multi_lora import MultiLoraSegments, _flat_ids, multi_lora_linear, multi_lora_segments


class MultiLoRALinear(nn.Module):
    """``y_t = x_t Wᵀ + b + s[a] · ((g[a] ⊙ (drop(x_t) A[a, :r]ᵀ)) B[a, :, :r]ᵀ) ⊙ o[a]``, a = a_t;
    a_t = -1: base only.

    Holds L adapters padded to ``r_max`` (``lora_a`` (L, r_max, in), ``lora_b`` (L, out, r_max))
    with their own ranks (``ranks`` buffer) and scales (``scales`` buffer, ``alpha_l / r_l`` or
    ``alpha_l / sqrt(r_l)``). The base weight is frozen; A and B train, several adapters in one
    batch. ``forward(x, adapter_ids)``; or set the batch once for a whole model with
    :func:`set_multi_lora_batch`, which also groups the tokens once for every layer.
    Initialised like PEFT's LoRA (A Kaiming-uniform, B zero): every adapter starts at the base.
    ``adapter_dtype``: dtype of A and B (default: the base's); ``torch.float32`` on a bfloat16
    base is PEFT's default (float32 adapter path, y in the base's dtype).

    ``dropout``: inverted dropout on the adapters' input in training mode (token t's mask is
    row t of lora_linear's mask for the call's seed). ``rank_scale`` (g, ``(L, r_max)``) and
    ``out_scale`` (o, ``(L, out_features)``): None, ``"parameter"`` (trained: per-adapter
    gates, VeRA's λ_d / λ_b) or ``"buffer"`` (saved, not trained: DyLoRA truncation masks),
    initialised to ones, as in :class:`LoRALinear`.
    """

    def __init__(self, in_features, out_features, num_adapters, r_max, *, ranks=None, alphas=None, bias=True,
                 use_rslora=False, dropout=0.0, rank_scale=None, out_scale=None, adapter_dtype=None, device=None,
                 dtype=None):
        super().__init__()
        check_adapter_options("MultiLoRALinear", dropout, rank_scale=rank_scale, out_scale=out_scale)
        if not isinstance(num_adapters, int) or num_adapters < 1:
            raise ValueError(f"MultiLoRALinear: num_adapters must be a positive int, got {num_adapters!r}")
        if not isinstance(r_max, int) or r_max < 1:
            raise ValueError(f"MultiLoRALinear: r_max must be a positive int, got {r_max!r}")
        ranks = [r_max] * num_adapters if ranks is None else [int(r) for r in ranks]
        if len(ranks) != num_adapters or any(r < 1 or r > r_max for r in ranks):
            raise ValueError(f"MultiLoRALinear: ranks must be {num_adapters} ints in [1, r_max={r_max}], got {ranks}")
        alphas = [float(r) for r in ranks] if alphas is None else [float(a) for a in alphas]
        if len(alphas) != num_adapters:
            raise ValueError(f"MultiLoRALinear: alphas must have {num_adapters} entries, got {len(alphas)}")
        fk = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.num_adapters, self.r_max = num_adapters, r_max
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **fk), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **fk), requires_grad=False) if bias else None
        ak = {"device": device, "dtype": dtype if adapter_dtype is None else adapter_dtype}
        self.lora_a = nn.Parameter(torch.zeros(num_adapters, r_max, in_features, **ak))
        self.lora_b = nn.Parameter(torch.zeros(num_adapters, out_features, r_max, **ak))
        register_scale(self, "rank_scale", rank_scale, torch.ones(num_adapters, r_max, **ak))
        register_scale(self, "out_scale", out_scale, torch.ones(num_adapters, out_features, **ak))
        self.dropout = float(dropout)
        scales = [a / (math.sqrt(r) if use_rslora else r) for a, r in zip(alphas, ranks)]
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32, device=device))
        self.register_buffer("ranks", torch.tensor(ranks, dtype=torch.int32, device=device))
        self._ranks_full = all(r == r_max for r in ranks)
        self._batch: Optional[Tuple[torch.Tensor, MultiLoraSegments]] = None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        with torch.no_grad():
            for l, r in enumerate(ranks):
                nn.init.kaiming_uniform_(self.lora_a[l, :r], a=math.sqrt(5))

    @classmethod
    def from_linear(cls, base: nn.Linear, num_adapters, r_max, **kwargs):
        """Wrap an existing nn.Linear: its weight and bias are shared (not copied) and frozen."""
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MultiLoRALinear.from_linear: base must be an nn.Linear, got {type(base).__name__}")
        m = cls(base.in_features, base.out_features, num_adapters, r_max, bias=base.bias is not None,
                device=base.weight.device, dtype=base.weight.dtype, **kwargs)
        m.weight = base.weight
        m.weight.requires_grad_(False)
        if base.bias is not None:
            m.bias = base.bias
            m.bias.requires_grad_(False)
        return m

    def forward(self, x, adapter_ids=None, segments: Optional[MultiLoraSegments] = None):
        if adapter_ids is None:
            if self._batch is None:
                raise ValueError("MultiLoRALinear: pass adapter_ids, or set them with set_multi_lora_batch")
            adapter_ids, segments = self._batch
        # Full-rank adapters need no ranks tensor (decided from the constructor's list, never
        # from device data, so no host sync).
        ranks = None if self._ranks_full else self.ranks
        return multi_lora_linear(x, self.weight, self.bias, self.lora_a, self.lora_b, adapter_ids,
                                 scales=self.scales, ranks=ranks, segments=segments, rank_scale=self.rank_scale,
                                 out_scale=self.out_scale, dropout_p=self.dropout if self.training else 0.0)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_adapters={self.num_adapters}, r_max={self.r_max}, bias={self.bias is not None}, "
                f"dropout={self.dropout}"
                + "".join(f", {n}" for n in ("rank_scale", "out_scale") if getattr(self, n) is not None))


def set_multi_lora_batch(model: nn.Module, adapter_ids, num_adapters: Optional[int] = None):
    """Give every MultiLoRALinear in `model` this batch's adapter ids (one per token, with the
    leading shape of the layers' inputs, e.g. ``ids[:, None].expand(B, S)`` for one adapter per
    row of a (B, S, in) batch; -1 = base model) and group the tokens by adapter once for all
    of them. Pass ``adapter_ids=None`` to clear."""
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    if adapter_ids is None:
        for m in layers:
            m._batch = None
        return
    if not layers:
        raise ValueError("set_multi_lora_batch: the model has no MultiLoRALinear layer")
    L = layers[0].num_adapters if num_adapters is None else num_adapters
    if any(m.num_adapters != L for m in layers):
        raise ValueError("set_multi_lora_batch: the model's MultiLoRALinear layers hold different adapter counts")
    ids = adapter_ids if isinstance(adapter_ids, torch.Tensor) else torch.as_tensor(adapter_ids, dtype=torch.int64)
    ids = ids.to(layers[0].weight.device)
    segments = multi_lora_segments(ids, L)
    for m in layers:
        m._batch = (ids, segments)


def multi_lora_from_peft(peft_model: nn.Module, adapter_names: Optional[Sequence[str]] = None) -> Tuple[nn.Module, List[str]]:
    """Replace every PEFT LoRA ``Linear`` layer of `peft_model` by a MultiLoRALinear holding its
    adapters (in ``adapter_names`` order, default: the model's ``peft_config`` order), each at its
    own rank and scaling. Returns the underlying model (PEFT wrappers removed; it shares the
    base weights, which it does not copy) and the adapter names: adapter i is id i, and -1
    runs the base model (PEFT's ``"__base__"``). Adapter dropout is not carried over
    (inference-style conversion); plain LoRA only (no DoRA or other variants).
    """
    try:
        from peft.tuners.lora.layer import Linear as PeftLoraLinear
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("multi_lora_from_peft needs the peft package") from e
    model = peft_model
    if hasattr(model, "peft_config"):
        names = list(adapter_names) if adapter_names is not None else list(model.peft_config.keys())
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model.base_model.model
    else:
        if adapter_names is None:
            raise ValueError("multi_lora_from_peft: pass adapter_names for a model without peft_config")
        names, inner = list(adapter_names), model
    targets = [(n, m) for n, m in inner.named_modules() if isinstance(m, PeftLoraLinear)]
    if not targets:
        raise ValueError("multi_lora_from_peft: the model has no PEFT LoRA Linear layer")
    for qualname, layer in targets:
        if getattr(layer, "merged", False):
            raise ValueError(f"multi_lora_from_peft: {qualname} has merged adapters; unmerge them first")
        if getattr(layer, "fan_in_fan_out", False):
            raise ValueError(f"multi_lora_from_peft: {qualname} is fan_in_fan_out (Conv1D-style); not supported")
        for n in names:
            if n in getattr(layer, "use_dora", {}) and layer.use_dora[n]:
                raise ValueError(f"multi_lora_from_peft: {qualname} adapter {n!r} uses DoRA, which is not supported")
            if getattr(layer, "lora_bias", {}).get(n, False):
                raise ValueError(f"multi_lora_from_peft: {qualname} adapter {n!r} has a LoRA bias, which is not "
                                 "supported")
            if n in getattr(layer, "lora_variant", {}):
                raise ValueError(f"multi_lora_from_peft: {qualname} adapter {n!r} is a LoRA variant "
                                 f"({type(layer.lora_variant[n]).__name__}); only plain LoRA is supported")
        present = [n for n in names if n in layer.lora_A]
        ranks = [layer.r[n] if n in present else 1 for n in names]
        r_max = max(ranks)
        base = layer.get_base_layer()
        m = MultiLoRALinear.from_linear(base, len(names), r_max, ranks=ranks)
        with torch.no_grad():
            m.lora_a.zero_()
            m.lora_b.zero_()
            scales = torch.zeros(len(names), dtype=torch.float32, device=base.weight.device)
            for i, n in enumerate(names):
                if n not in present:  # adapter absent on this layer: it acts as the base layer
                    continue
                r = layer.r[n]
                m.lora_a[i, :r].copy_(layer.lora_A[n].weight)
                m.lora_b[i, :, :r].copy_(layer.lora_B[n].weight)
                scales[i] = float(layer.scaling[n])
            m.scales.copy_(scales)
        parent_name, _, child = qualname.rpartition(".")
        parent = inner.get_submodule(parent_name) if parent_name else inner
        setattr(parent, child, m)
    return inner, names
