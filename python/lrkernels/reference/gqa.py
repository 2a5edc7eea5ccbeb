"""Float64 oracle for gqa_attention: the KV heads repeated to the query heads, the full score
matrix materialised, masked (kv_lens, bottom-right causal, attn_mask) and soft-maxed. Rows that
see no key give 0 and lse −inf, the documented behaviour of the op."""

import math

import torch


def visible(q_len, kv_len, *, causal=False, kv_lens=None, batch=1, device=None):
    """Boolean (batch, 1, q_len, kv_len): which keys each query may see before attn_mask."""
    j = torch.arange(kv_len, device=device).view(1, 1, 1, kv_len)
    i = torch.arange(q_len, device=device).view(1, 1, q_len, 1)
    lens = (torch.full((batch,), kv_len, device=device) if kv_lens is None
            else kv_lens.to(device=device, dtype=torch.int64)).view(-1, 1, 1, 1)
    ok = j < lens
    if causal:
        ok = ok & (j <= i + lens - q_len)
    return ok.expand(batch, 1, q_len, kv_len)


def gqa_attention(q, k, v, *, causal=False, scale=None, kv_lens=None, attn_mask=None, dtype=torch.float64,
                  return_lse=False):
    """softmax(scale · q kᵀ + mask) v with KV head h // (Hq / Hkv) for query head h, every
    operand cast to `dtype`. Differentiable (plain autograd) in q, k and v."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    g = Hq // Hkv
    qq = q.to(dtype)
    kk = k.to(dtype).repeat_interleave(g, dim=1)
    vv = v.to(dtype).repeat_interleave(g, dim=1)
    s = (qq @ kk.transpose(-1, -2)) * scale
    ok = visible(Sq, Sk, causal=causal, kv_lens=kv_lens, batch=B, device=q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            ok = ok & attn_mask
        else:  # −inf entries are hidden like False ones, so no NaN gradient comes from them
            m = attn_mask.to(dtype)
            ok = ok & (m > float("-inf"))
            s = s + m.masked_fill(m == float("-inf"), 0)
    s = s.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    seen = lse > float("-inf")
    p = torch.exp(s - lse.masked_fill(~seen, 0).unsqueeze(-1)).masked_fill(~seen.unsqueeze(-1), 0)
    o = p @ vv
    return (o, lse) if return_lse else o
