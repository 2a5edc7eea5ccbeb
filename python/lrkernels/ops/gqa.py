"""GQA attention (grouped-query attention on compressed KV heads): fake kernels, autograd and
the public wrapper."""

import math

import torch

from ._autocast import register_autocast
from ._util import bind, needs_grad, nvtx_range, register_fake

_fwd = torch.ops.lrkernels.gqa_attention.default
_bwd = torch.ops.lrkernels.gqa_attention_backward.default

MAX_HEAD_DIM = 256


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _check_shapes(op, q, k, v, attn_mask):
    torch._check(q.dim() == 4, lambda: f"lrkernels.{op}: q must be 4-D (batch, q_heads, q_len, head_dim), "
                                       f"got shape {tuple(q.shape)}")
    torch._check(k.dim() == 4 and v.dim() == 4,
                 lambda: f"lrkernels.{op}: k and v must be 4-D (batch, kv_heads, kv_len, head_dim), "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    B, Hq, Sq, D = q.shape
    torch._check(1 <= D <= MAX_HEAD_DIM,
                 lambda: f"lrkernels.{op}: q's head_dim must be in [1, {MAX_HEAD_DIM}], got q of shape {tuple(q.shape)}")
    torch._check(k.shape[0] == B and k.shape[3] == D,
                 lambda: f"lrkernels.{op}: k must have shape (batch, kv_heads, kv_len, head_dim) with q's batch = "
                         f"{B} and head_dim = {D}, got {tuple(k.shape)}")
    torch._check(k.shape[1] >= 1, lambda: f"lrkernels.{op}: k must have at least one head")
    torch._check(Hq % k.shape[1] == 0, lambda: f"lrkernels.{op}: q's head count ({Hq}) must be a multiple of "
                                               f"k's head count ({k.shape[1]})")
    torch._check(tuple(v.shape) == tuple(k.shape),
                 lambda: f"lrkernels.{op}: v must have shape k's shape = {tuple(k.shape)}, got {tuple(v.shape)}")
    if attn_mask is not None:
        full = (B, Hq, Sq, k.shape[2])
        torch._check(attn_mask.dim() <= 4 and all(s == 1 or s == f for s, f in zip(reversed(attn_mask.shape),
                                                                                    reversed(full))),
                     lambda: f"lrkernels.{op}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"(batch, q_heads, q_len, kv_len) = {full}")


@register_fake("gqa_attention")
def _gqa_attention_fake(q, k, v, causal, scale, kv_lens, attn_mask):
    _check_shapes("gqa_attention", q, k, v, attn_mask)
    B, Hq, Sq, D = q.shape
    return q.new_empty((B, Hq, Sq, D)), q.new_empty((B, Hq, Sq), dtype=_lse_dtype(q))


@register_fake("gqa_attention_backward")
def _gqa_attention_backward_fake(grad_o, q, k, v, o, lse, causal, scale, kv_lens, attn_mask, output_mask):
    _check_shapes("gqa_attention_backward", q, k, v, attn_mask)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) if want else None
                 for want, t in zip(output_mask, (q, k, v)))


# ---------------------------------------------------------------------------- autograd

def _setup_context(ctx, inputs, output):
    a = bind(_fwd, inputs)
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(a["q"], a["k"], a["v"], o, lse, a["kv_lens"], a["attn_mask"])
    ctx.causal = a["causal"]
    ctx.scale = a["scale"]
    ctx.output_mask = [needs_grad(ctx, _fwd, n) for n in ("q", "k", "v")]


def _backward(ctx, grad_o, grad_lse):
    q, k, v, o, lse, kv_lens, attn_mask = ctx.saved_tensors
    dq, dk, dv = _bwd(grad_o, q, k, v, o, lse, ctx.causal, ctx.scale, kv_lens, attn_mask, ctx.output_mask)
    return dq, dk, dv, None, None, None, None  # q, k, v, causal, scale, kv_lens, attn_mask


torch.library.register_autograd("lrkernels::gqa_attention", _backward, setup_context=_setup_context)
# under torch.autocast q, k and v compute in the autocast dtype; the mask is left as it is
register_autocast("gqa_attention", ("q", "k", "v"))


# ---------------------------------------------------------------------------- public wrapper

def gqa_attention(q, k, v, *, causal=False, scale=None, kv_lens=None, attn_mask=None):
    """Grouped-query attention: ``softmax(scale · q kᵀ + mask) v`` with fewer KV heads than query
    heads, computed flash-style (the (q_len, kv_len) scores are never stored).

    Args:
        q: ``(batch, q_heads, q_len, head_dim)``.
        k, v: ``(batch, kv_heads, kv_len, head_dim)``, q_heads a multiple of kv_heads; query head h
            uses KV head ``h // (q_heads // kv_heads)`` (SDPA's ``enable_gqa`` and FlashAttention's
            convention). Any strides with a unit stride over head_dim (≤ 256), so (batch, len,
            heads, head_dim) tensors passed as ``.transpose(1, 2)`` views are read in place.
        causal: query i sees keys ``j ≤ i + kv_len − q_len``: aligned at the bottom right, the
            convention for decode and chunked prefill (FlashAttention's). Note that SDPA's
            ``is_causal`` is aligned at the top left (``j ≤ i``); the two agree only when
            q_len = kv_len.
        scale: the score scale; default ``1 / sqrt(head_dim)``.
        kv_lens: optional ``(batch,)`` int32/int64: sequence b uses only its first ``kv_lens[b]``
            keys (a padded KV cache); with ``causal`` the alignment is relative to ``kv_lens[b]``.
            Values must be in ``[0, kv_len]`` (checked on CPU; the CUDA kernels read kv_lens on
            the device, where a check would need a host sync, and clamp values outside it).
        attn_mask: optional boolean (True = attend) or additive float mask broadcastable to
            ``(batch, q_heads, q_len, kv_len)``; read through broadcast strides, never expanded.
            It gets no gradient.

    A query row that sees no key at all (everything masked, kv_lens[b] = 0, or causal with
    kv_len < q_len) returns zeros — as SDPA on CPU does for a fully masked row — and its gradient
    is zero. q, k and v share a dtype (float32, float64 or bfloat16 on CPU; float32, float16 or
    bfloat16 on CUDA); the softmax runs in float32 (float64 for float64). On CUDA the q gradient
    is summed with atomics (its last bits vary run to run) unless
    ``torch.use_deterministic_algorithms(True)``, which takes a deterministic pass instead. Under ``torch.autocast`` q, k and v are cast to the autocast
    dtype. Differentiable in q, k and v. Returns o, ``(batch, q_heads, q_len, head_dim)`` in q's
    dtype.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    with nvtx_range("lrkernels.gqa_attention"):
        o, _ = _fwd(q, k, v, bool(causal), float(scale), kv_lens, attn_mask)
    return o
