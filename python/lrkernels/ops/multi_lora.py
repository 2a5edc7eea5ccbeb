"""Multi-LoRA (every token with its own adapter and rank): fake kernels, autograd and the
public wrappers for multi_lora_segments, lora_shrink, lora_expand_ and multi_lora_linear."""

from typing import NamedTuple, Optional, Sequence

import torch

from ._autocast import register_autocast
from ._util import bind, fake_grads, needs_grad, new_seed, nvtx_range, register_fake, register_not_differentiable

_segments = torch.ops.lrkernels.multi_lora_segments.default
_shrink = torch.ops.lrkernels.lora_shrink.default
_expand = torch.ops.lrkernels.lora_expand_.default
_fwd = torch.ops.lrkernels.multi_lora_linear.default
_bwd = torch.ops.lrkernels.multi_lora_linear_backward.default

_GRAD_INPUTS = ("x", "weight", "bias", "lora_a", "lora_b", "scales", "rank_scale", "out_scale")


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------- fakes

@register_fake("multi_lora_segments")
def _segments_fake(adapter_ids, num_adapters):
    torch._check(num_adapters >= 0, lambda: "lrkernels.multi_lora_segments: num_adapters must be >= 0")
    order = adapter_ids.new_empty((adapter_ids.numel(),), dtype=torch.int32)
    offsets = adapter_ids.new_empty((num_adapters + 1,), dtype=torch.int32)
    return order, offsets


@register_fake("lora_shrink")
def _shrink_fake(x, lora_a, adapter_ids, token_order, adapter_offsets, ranks):
    torch._check(lora_a.dim() in (3, 4), lambda: "lrkernels.lora_shrink: lora_a must be (L, r_max, in) or "
                                                 "(S, L, r_max, in)")
    torch._check(lora_a.shape[-1] == x.shape[-1], lambda: "lrkernels.lora_shrink: lora_a's last dim must be "
                                                          "in_features")
    tokens = x.shape[:-1].numel()
    shape = (tokens, lora_a.shape[-2]) if lora_a.dim() == 3 else (lora_a.shape[0], tokens, lora_a.shape[-2])
    return x.new_empty(shape, dtype=_acc_dtype(x))


@register_fake("lora_expand_")
def _expand_fake(y, hidden, lora_b, adapter_ids, token_order, adapter_offsets, scales, ranks, slice_sizes):
    torch._check(y.dim() == 2 and lora_b.dim() == 3 and y.shape[1] == lora_b.shape[1],
                 lambda: "lrkernels.lora_expand_: y must be (T, out_total) and lora_b (L, out_total, r_max)")
    return None


@register_fake("multi_lora_linear")
def _fwd_fake(x, weight, bias, lora_a, lora_b, adapter_ids, scales, ranks, token_order, adapter_offsets,
              rank_scale=None, out_scale=None, dropout_p=0.0, seed=None):
    torch._check(x.dim() >= 1, lambda: "lrkernels.multi_lora_linear: x must have shape (..., in_features)")
    torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[-1],
                 lambda: "lrkernels.multi_lora_linear: weight must have shape (out_features, in_features)")
    torch._check(lora_a.dim() == 3 and lora_a.shape[2] == x.shape[-1],
                 lambda: "lrkernels.multi_lora_linear: lora_a must have shape (L, r_max, in_features)")
    torch._check(lora_b.dim() == 3 and lora_b.shape[0] == lora_a.shape[0] and lora_b.shape[1] == weight.shape[0]
                 and lora_b.shape[2] == lora_a.shape[1],
                 lambda: "lrkernels.multi_lora_linear: lora_b must have shape (L, out_features, r_max)")
    lead = x.shape[:-1]
    y = x.new_empty((*lead, weight.shape[0]))
    hidden = x.new_empty((*lead, lora_a.shape[1]), dtype=_acc_dtype(x))
    return y, hidden


@register_fake("multi_lora_linear_backward")
def _bwd_fake(grad_out, x, weight, lora_a, lora_b, adapter_ids, scales, ranks, hidden, token_order,
              adapter_offsets, output_mask, rank_scale=None, out_scale=None, dropout_p=0.0, seed=None):
    like = (x, weight, None, lora_a, lora_b, scales, rank_scale, out_scale)
    return fake_grads(output_mask, like, weight.shape[0], x)


# ---------------------------------------------------------------------------- autograd

def _setup_context(ctx, inputs, output):
    a = bind(_fwd, inputs)
    _, hidden = output
    ctx.mark_non_differentiable(hidden)
    ctx.save_for_backward(a["x"], a["weight"], a["lora_a"], a["lora_b"], a["adapter_ids"], a["scales"], a["ranks"],
                          hidden, a["token_order"], a["adapter_offsets"], a["rank_scale"], a["out_scale"], a["seed"])
    ctx.dropout_p = a["dropout_p"]
    ctx.output_mask = [needs_grad(ctx, _fwd, n) for n in _GRAD_INPUTS]


def _backward(ctx, grad_y, grad_hidden):
    x, weight, lora_a, lora_b, ids, scales, ranks, hidden, order, offsets, rank_scale, out_scale, seed = \
        ctx.saved_tensors
    if order is None:  # the forward grouped the tokens itself: group them again (cheap, device-side)
        order, offsets = _segments(ids, lora_a.shape[0])
    gx, gw, gbias, ga, gb, gs, gg, go = _bwd(grad_y.contiguous(), x, weight, lora_a, lora_b, ids, scales, ranks,
                                             hidden, order, offsets, ctx.output_mask, rank_scale=rank_scale,
                                             out_scale=out_scale, dropout_p=ctx.dropout_p, seed=seed)
    # schema order: x, weight, bias, lora_a, lora_b, adapter_ids, scales, ranks, token_order, adapter_offsets,
    # rank_scale, out_scale, dropout_p, seed
    return gx, gw, gbias, ga, gb, None, gs, None, None, None, gg, go, None, None


torch.library.register_autograd("lrkernels::multi_lora_linear", _backward, setup_context=_setup_context)
# under torch.autocast x and the base layer compute in the autocast dtype; adapters stay as they are
register_autocast("multi_lora_linear", ("x", "weight", "bias"))


# The serving building blocks have no backward: called on inputs that require grad they raise
# instead of returning a result with no gradient (lora_shrink would return a silently detached
# hidden, lora_expand_ would drop B's gradient).
_TRAIN_INSTEAD = "train through lrkernels.multi_lora_linear (or MultiLoRALinear), which has a backward"
register_not_differentiable("lora_shrink", _TRAIN_INSTEAD)
register_not_differentiable("lora_expand_", _TRAIN_INSTEAD)


# ---------------------------------------------------------------------------- public wrappers

class MultiLoraSegments(NamedTuple):
    """A batch's grouping by adapter, computed once and shared by every layer of a forward.

    ``token_order`` (T,) int32: the tokens sorted stably by adapter id; those of adapter ``l``
    are ``token_order[adapter_offsets[l]:adapter_offsets[l + 1]]``; base-only tokens follow
    ``adapter_offsets[L]``. ``adapter_offsets`` (L + 1,) int32. Make it with
    :func:`multi_lora_segments` from the same ``adapter_ids`` the ops get: the ops follow the
    grouping, and a hand-made one must list every token exactly once.
    """
    token_order: torch.Tensor
    adapter_offsets: torch.Tensor


def multi_lora_segments(adapter_ids: torch.Tensor, num_adapters: int) -> MultiLoraSegments:
    """Group the tokens of a batch by adapter (no host synchronisation on CUDA).

    ``adapter_ids`` holds one id per token (any shape, int32/int64), -1 for base-only tokens.
    On CPU an id outside ``[-1, num_adapters)`` raises ValueError; on CUDA (where checking
    would synchronise) such a token is treated as base-only.
    """
    with nvtx_range("lrkernels.multi_lora_segments"):
        order, offsets = _segments(adapter_ids, int(num_adapters))
    return MultiLoraSegments(order, offsets)


def _flat_ids(adapter_ids, x):
    """adapter_ids for the op: x's leading shape. A (B,) tensor for a (B, S, in) x is one id per
    row (PEFT's ``adapter_names=`` convention) and is broadcast to every token of the row."""
    if not isinstance(adapter_ids, torch.Tensor):
        adapter_ids = torch.as_tensor(adapter_ids, dtype=torch.int64, device=x.device)
    if x.dim() > 2 and adapter_ids.dim() == 1 and adapter_ids.shape[0] == x.shape[0]:
        adapter_ids = adapter_ids.reshape(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1]).contiguous()
    return adapter_ids


def multi_lora_linear(x, weight, bias, lora_a, lora_b, adapter_ids, *, scales, ranks=None,
                      segments: Optional[MultiLoraSegments] = None, rank_scale=None, out_scale=None,
                      dropout_p=0.0, generator=None):
    """Multi-LoRA linear layer: token t uses its own adapter a = a_t (and rank r_a):

    ``y_t = x_t Wᵀ + b + scales[a] · ((g[a] ⊙ (drop(x_t) A[a, :r_a]ᵀ)) B[a, :, :r_a]ᵀ) ⊙ o[a]``,
    a_t = -1: base only (g = rank_scale, o = out_scale, both optional).

    Args:
        x: ``(T, in)`` or ``(..., in)``.
        weight, bias: the base layer, ``(out, in)`` and ``(out,)`` or None.
        lora_a: ``(L, r_max, in)``, lora_b: ``(L, out, r_max)``: L adapters padded to r_max
            (entries past an adapter's rank are ignored, and get zero gradient).
        adapter_ids: one id per token, x's leading shape (int32/int64); for a ``(B, S, in)``
            x a ``(B,)`` tensor (one id per row) is broadcast over the row.
        scales: ``(L,)`` float tensor, e.g. ``alpha_l / r_l``. Differentiable.
        ranks: ``(L,)`` int tensor or None (all r_max). An adapter costs its own rank only.
        segments: the batch's :func:`multi_lora_segments` of the per-token ids (x's leading
            shape), to compute the grouping once for all layers of a forward pass; None
            groups here.
        rank_scale: ``(L, r_max)`` or None: per-adapter, per-rank scale (VeRA's λ_d, rank
            gates, DyLoRA masks), as lora_linear's ``rank_scale`` for each adapter.
        out_scale: ``(L, out)`` or None: per-adapter, per-output scale (VeRA's λ_b).
        dropout_p, generator: inverted dropout on the adapters' input, as in
            :func:`lora_linear` (token t's mask is row t of lora_linear's mask for the same
            seed); modules pass 0 in eval mode.

    x, weight and bias share one dtype; lora_a, lora_b, rank_scale and out_scale have x's dtype
    or, on a float16/bfloat16 x, float32 (float32 adapters on a low-precision base, PEFT's
    default). The
    low-rank path accumulates in float32, y has x's dtype, each gradient its own tensor's dtype.

    On CPU an adapter id outside ``[-1, L)`` or a rank outside ``[0, r_max]`` raises
    ValueError. On CUDA (no host synchronisation) such ids are treated as -1 and ranks are
    clamped to ``[0, r_max]``: nothing is read out of bounds. Differentiable in x, weight,
    bias, lora_a, lora_b, scales, rank_scale and out_scale; several adapters train in one
    batch. On CPU, dropout takes the per-adapter path (gathered rows dropped with their
    tokens' masks) rather than the blocked one.
    """
    ids = _flat_ids(adapter_ids, x)
    order, offsets = (None, None) if segments is None else (segments.token_order, segments.adapter_offsets)
    with nvtx_range("lrkernels.multi_lora_linear"):
        seed = new_seed(x.device, generator) if dropout_p > 0 else None
        y, _ = _fwd(x, weight, bias, lora_a, lora_b, ids, scales, ranks, order, offsets, rank_scale=rank_scale,
                    out_scale=out_scale, dropout_p=float(dropout_p), seed=seed)
    return y


def lora_shrink(x, lora_a, adapter_ids, segments: MultiLoraSegments, ranks=None):
    """``hidden[s, t, :r_a] = x_t A[s, a_t, :r_a]ᵀ`` in float32 (float64 for float64 x).

    x ``(T, in)`` (or ``(..., in)`` with adapter_ids of the leading shape), segments from
    :func:`multi_lora_segments` on the same ids.

    lora_a ``(L, r_max, in)`` gives hidden ``(T, r_max)``; ``(S, L, r_max, in)`` gives
    ``(S, T, r_max)`` for S output slices sharing one read of x (fused QKV, gate/up).
    Entries past an adapter's rank, and rows of base-only tokens, are zero. Inference
    building block: not differentiable.
    """
    with nvtx_range("lrkernels.lora_shrink"):
        return _shrink(x, lora_a, adapter_ids, segments.token_order, segments.adapter_offsets, ranks)


def lora_expand_(y, hidden, lora_b, adapter_ids, segments: MultiLoraSegments, *, scales, ranks=None,
                 slice_sizes: Optional[Sequence[int]] = None):
    """In place: ``y[t, slice s] += scales[a_t] · hidden[s, t, :r_a] B[a_t, slice s, :r_a]ᵀ``.

    y ``(T, out_total)`` (rows contiguous; may be a column block of a larger buffer), lora_b
    ``(L, out_total, r_max)`` with the slices' B stacked along the output dimension,
    ``slice_sizes`` their widths (None: equal). Returns y. Inference building block.
    """
    with nvtx_range("lrkernels.lora_expand_"):
        _expand(y, hidden, lora_b, adapter_ids.reshape(-1), segments.token_order, segments.adapter_offsets, scales,
                ranks, None if slice_sizes is None else [int(s) for s in slice_sizes])
    return y
