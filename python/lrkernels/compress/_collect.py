"""Calibration batches, the inputs of the first layer, and per-layer second moments collected
with hooks (float64 sums; nothing of size tokens × tokens is kept)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Optional

import torch


class _Stop(Exception):
    """Raised from a hook to end a forward pass early (the rest of the model is not needed)."""


def as_batches(calibration, who: str = "compress_kv_heads", arg: str = "calibration"):
    """A list of ``{"input_ids": (B, S) long, "attention_mask": optional (B, S)}`` dicts from a
    tensor of token ids, a mapping of model inputs, or an iterable of either."""
    if calibration is None:
        raise ValueError(f"{who}: {arg} is None; pass token ids (B, S), a dict of model inputs, or an "
                         f"iterable of them")
    if isinstance(calibration, (torch.Tensor, Mapping)):
        items = [calibration]
    elif isinstance(calibration, Iterable) and not isinstance(calibration, (str, bytes)):
        items = list(calibration)
    else:
        raise TypeError(f"{who}: {arg} must be a tensor of token ids, a dict of model inputs or an iterable of "
                        f"them, got {type(calibration).__name__}")
    out = []
    for i, it in enumerate(items):
        if isinstance(it, torch.Tensor):
            it = {"input_ids": it}
        elif isinstance(it, Mapping):
            it = dict(it)
        else:
            raise TypeError(f"{who}: {arg}[{i}] must be a tensor of token ids or a dict of model inputs, "
                            f"got {type(it).__name__}")
        ids = it.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{who}: {arg}[{i}] needs integer input_ids, got "
                            f"{type(ids).__name__ if not isinstance(ids, torch.Tensor) else ids.dtype}")
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2:
            raise ValueError(f"{who}: {arg}[{i}] input_ids must be (batch, seq), got shape {tuple(ids.shape)}")
        it["input_ids"] = ids
        mask = it.get("attention_mask")
        if mask is not None and tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"{who}: {arg}[{i}] attention_mask must have input_ids' shape {tuple(ids.shape)}, "
                             f"got {tuple(mask.shape)}")
        if ids.numel() == 0 or (mask is not None and not bool(mask.bool().any())):
            continue
        out.append(it)
    if not out:
        raise ValueError(f"{who}: {arg} is empty (no tokens); give at least one non-empty batch of token ids")
    return out


def token_count(batches) -> int:
    n = 0
    for b in batches:
        m = b.get("attention_mask")
        n += int(m.bool().sum()) if m is not None else b["input_ids"].numel()
    return n


def first_layer_inputs(model, layer0, batches, forward_kwargs, device):
    """[(args, kwargs, token_mask)] of ``layer0``'s forward for every batch (the model stopped there)."""
    captured = []

    def hook(mod, args, kwargs):
        captured.append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                         {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}))
        raise _Stop

    h = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    out = []
    try:
        with torch.no_grad():
            for b in batches:
                inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
                try:
                    model(**inputs, **forward_kwargs)
                except _Stop:
                    pass
                args, kwargs = captured.pop()
                mask = b.get("attention_mask")
                out.append([args, kwargs, None if mask is None else mask.to(device).bool()])
    finally:
        h.remove()
    return out


def hidden_of(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(args, kwargs, hidden):
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    kw = dict(kwargs)
    kw["hidden_states"] = hidden
    return args, kw


class LayerMoments:
    """Second moments of one attention layer's keys, values (stacked heads) and queries (per
    head; its diagonal only when ``full_query`` is False), over the valid tokens."""

    def __init__(self, parts, num_heads, num_kv, head_dim, *, full_query: bool, keep_o_inputs: bool,
                 stop_at_o: bool, attention_keys=None, attention_values=None):
        self.H, self.Hkv, self.d = num_heads, num_kv, head_dim
        D = num_kv * head_dim
        f64 = torch.float64
        self.Sk = torch.zeros(D, D, dtype=f64)
        self.Sv = torch.zeros(D, D, dtype=f64)
        self.mk = torch.zeros(D, dtype=f64)
        self.mv = torch.zeros(D, dtype=f64)
        self.Sq = torch.zeros((num_heads, head_dim, head_dim) if full_query else (num_heads, head_dim), dtype=f64)
        self.full_query = full_query
        self.n = 0
        self.o_inputs = [] if keep_o_inputs else None
        self.mask = None
        self._handles = [parts.q.register_forward_hook(self._on_q), parts.k.register_forward_hook(self._on_k),
                         parts.v.register_forward_hook(self._on_v)]
        self.stop_at_o = stop_at_o
        self.attention = None
        self.attention_values = None
        self.q = self.k = self.cos_sin = None
        if attention_keys is not None:
            # key objective "attention": per query head the moments of what the softmax sees
            self.attention = RopeAttentionMoments(num_heads, num_kv, head_dim, scale=attention_keys["scale"],
                                                  causal=attention_keys["causal"])
        if attention_values is not None:
            # value objective "attention": the values as each query head's attention averages them
            self.attention_values = AttendedValueMoments(num_heads, num_kv, head_dim, **attention_values)
        if self.attention is not None or (attention_values is not None and attention_values.get("rope")):
            self._handles.append(parts.module.register_forward_pre_hook(self._on_attn, with_kwargs=True))
        if keep_o_inputs or stop_at_o:
            self._handles.append(parts.o.register_forward_pre_hook(self._on_o))

    def _rows(self, t):
        t = t.reshape(-1, t.shape[-1]) if self.mask is None else t[self.mask]
        return t.detach().to("cpu", torch.float64)

    def _on_attn(self, mod, args, kwargs):
        pe = kwargs.get("position_embeddings")
        if pe is None:
            raise ValueError("compress_kv_heads: the 'attention' objectives need the layer's position_embeddings "
                             "(cos, sin)")
        self.cos_sin = pe
        if self.attention is not None:
            self.attention.cos_sin = pe

    def _on_q(self, mod, inp, out):
        if self.attention_values is not None:  # kept only until this layer's v_proj has run
            self.q = out.detach()
        if self.attention is not None:
            self.attention.q = out.detach()
        q = self._rows(out).reshape(-1, self.H, self.d)
        if self.full_query:
            self.Sq += torch.einsum("nhd,nhe->hde", q, q)
        else:
            self.Sq += (q * q).sum(0)

    def _on_k(self, mod, inp, out):
        if self.attention_values is not None:
            self.k = out.detach()
        if self.attention is not None:
            self.attention.add(self.attention.q, out.detach(), self.mask)
        k = self._rows(out)
        self.Sk += k.T @ k
        self.mk += k.sum(0)
        self.n += k.shape[0]

    def _on_v(self, mod, inp, out):
        if self.attention_values is not None:
            self.attention_values.add(self.q, self.k, out.detach(), self.mask, self.cos_sin)
        self.q = self.k = None
        v = self._rows(out)
        self.Sv += v.T @ v
        self.mv += v.sum(0)

    def _on_o(self, mod, args):
        if self.o_inputs is not None:
            x = args[0]
            self.o_inputs.append((x.reshape(-1, x.shape[-1]) if self.mask is None else x[self.mask]).detach().cpu())
        if self.stop_at_o:
            raise _Stop

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def normalized(self):
        """LayerStats over the tokens seen."""
        n = max(self.n, 1)
        N = None if self.attention is None else self.attention.per_kv_head() / n
        Pv = mu = None
        if self.attention_values is not None:
            Pv, mu = self.attention_values.normalized()
        return LayerStats(self.Sk / n, self.mk / n, self.Sv / n, self.mv / n, self.Sq / n, N, Pv, mu)


@dataclass
class LayerStats:
    """Per-layer calibration moments (float64, means over the valid tokens).

    Sk, mk / Sv, mv: E[kkᵀ], E[k] / E[vvᵀ], E[v] of the stacked KV heads (Hkv·d); Sq: per query head
    E[qqᵀ] (H, d, d) or E[q²] (H, d); Natt: the key-attention moments (RopeAttentionMoments) or None;
    Pv, pv: AttendedValueMoments' per-KV-head E[ṽṽᵀ] (Hkv, Hkv·d, Hkv·d) and E[ṽ] (Hkv, Hkv·d) or None.
    """
    Sk: torch.Tensor
    mk: torch.Tensor
    Sv: torch.Tensor
    mv: torch.Tensor
    Sq: torch.Tensor
    Natt: Optional[torch.Tensor] = None
    Pv: Optional[torch.Tensor] = None
    pv: Optional[torch.Tensor] = None


def attention_weights(q, k, *, num_heads, num_kv, head_dim, scale, causal, mask, cos_sin=None, window=None):
    """(B, H, S, S) float64 softmax weights of one layer from its q_proj / k_proj outputs (B, S, ·):
    rotate-half RoPE with ``cos_sin`` when given, query head h on KV head h // (H / Hkv), keys
    limited to the valid tokens ``mask`` (B, S) bool or None, causal and a sliding ``window`` when
    given."""
    B, S = q.shape[:2]
    H, Hkv, d = num_heads, num_kv, head_dim
    q = q.to("cpu", torch.float64).reshape(B, S, H, d)
    k = k.to("cpu", torch.float64).reshape(B, S, Hkv, d)
    if cos_sin is not None:
        cos, sin = (t.to("cpu", torch.float64).expand(B, S, d) for t in cos_sin)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    scores = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(H // Hkv, dim=2)) * scale
    allowed = torch.ones(B, 1, S, S, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(S, S, dtype=torch.bool).tril()
    if window:
        allowed = allowed & torch.ones(S, S, dtype=torch.bool).triu(-(int(window) - 1))
    valid = torch.ones(B, S, dtype=torch.bool) if mask is None else mask.cpu()
    allowed = allowed & valid[:, None, None, :]
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)


class AttendedValueMoments:
    """For the value objective "attention": what o_proj receives is, per query head h, the values
    averaged by h's attention weights, ṽ_{h,t} = Σ_s a_{h,ts} v_s. A merge of a group's values is
    read back by query head h from the group's stacked values averaged with h's weights, so the
    error it makes is measured on those: per KV head j, P_j = Σ_{h on j} Σ_t ṽ_{h,t} ṽ_{h,t}ᵀ over
    all Hkv·d stacked value dims (any group can be read off), and the mean of ṽ."""

    def __init__(self, num_heads, num_kv, head_dim, *, scale, causal, rope=False, window=None):
        self.H, self.Hkv, self.d = num_heads, num_kv, head_dim
        self.scale, self.causal, self.rope, self.window = scale, causal, rope, window
        D = num_kv * head_dim
        self.P = torch.zeros(num_kv, D, D, dtype=torch.float64)
        self.mu = torch.zeros(num_kv, D, dtype=torch.float64)
        self.n = 0

    def add(self, q, k, v, mask, cos_sin):
        a = attention_weights(q, k, num_heads=self.H, num_kv=self.Hkv, head_dim=self.d, scale=self.scale,
                              causal=self.causal, mask=mask, cos_sin=cos_sin if self.rope else None,
                              window=self.window)
        B, S = v.shape[:2]
        vt = torch.einsum("bhts,bsD->bthD", a, v.to("cpu", torch.float64).reshape(B, S, -1))
        vt = vt.reshape(B * S, self.H, -1) if mask is None else vt[mask.cpu()]        # valid queries
        n = self.H // self.Hkv
        vt = vt.reshape(vt.shape[0], self.Hkv, n, -1)
        self.P += torch.einsum("tjnD,tjnE->jDE", vt, vt)
        self.mu += vt.sum((0, 2))
        self.n += vt.shape[0] * n

    def normalized(self):
        n = max(self.n, 1)  # tokens × query heads per KV head
        return self.P / n, self.mu / n


def _rotate(x, cos, sin):
    """Rotate-half RoPE of x (B, S, heads, d) with cos/sin (B, S, d)."""
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * cos[:, :, None] + rot * sin[:, :, None]


class RopeAttentionMoments:
    """For the key objective "attention" under RoPE, per query head h and frequency pair i:

        N_h = Σ_t |q_{h,t,i}|² ( Σ_s a_{h,ts} z_s z_sᴴ − ζ_t ζ_tᴴ ),  ζ_t = Σ_s a_{h,ts} e^{iθ_i s} z_s,

    z_s ∈ C^{Hkv} the pair-i keys of all KV heads before RoPE, a the layer's attention weights.
    A key error e_s shifts query t's score at pair i by δ_s = Re(conj(q_t) e_s e^{iθ(s−t)}); what
    the softmax feels is the variance of δ under a_t (a shift common to all keys cancels), whose
    mean over q's phase is ½|q_t|² (Σ_s a_ts |e_s|² − |Σ_s a_ts e^{iθ s} e_s|²); with e = R z that
    is ½ r N rᴴ. So keys the queries attend to count, and a key offset that barely rotates within
    the attended span (low frequencies) counts little.
    """

    def __init__(self, num_heads, num_kv, head_dim, *, scale, causal):
        self.H, self.Hkv, self.d = num_heads, num_kv, head_dim
        self.scale, self.causal = scale, causal
        self.N = torch.zeros(num_heads, head_dim // 2, num_kv, num_kv, dtype=torch.complex128)
        self.q = self.cos_sin = None

    def add(self, q, k, mask):
        B, S = q.shape[:2]
        H, Hkv, d, h = self.H, self.Hkv, self.d, self.d // 2
        q = q.to("cpu", torch.float64).reshape(B, S, H, d)
        k = k.to("cpu", torch.float64).reshape(B, S, Hkv, d)
        cos, sin = (t.to("cpu", torch.float64).expand(B, S, d) for t in self.cos_sin)
        qr, kr = _rotate(q, cos, sin), _rotate(k, cos, sin)
        valid = torch.ones(B, S, dtype=torch.bool) if mask is None else mask.cpu()
        a = attention_weights(qr, kr, num_heads=H, num_kv=Hkv, head_dim=d, scale=self.scale, causal=self.causal,
                              mask=mask)
        zq = torch.complex(q[..., :h], q[..., h:])                             # (B, S, H, h)
        wq = (zq.real ** 2 + zq.imag ** 2) * valid[:, :, None, None]          # |q_t|², valid queries only
        zk = torch.complex(k[..., :h], k[..., h:])                             # (B, S, Hkv, h)
        zr = torch.complex(kr[..., :h], kr[..., h:])
        w1 = torch.einsum("bthi,bhts->bhsi", wq, a).to(torch.complex128)
        self.N += torch.einsum("bhsi,bsai,bsci->hiac", w1, zk, zk.conj())
        zeta = torch.einsum("bhts,bsai->bhtia", a.to(torch.complex128), zr)
        self.N -= torch.einsum("bthi,bhtia,bhtic->hiac", wq.to(torch.complex128), zeta, zeta.conj())

    def per_kv_head(self):
        """(Hkv, d/2, Hkv, Hkv): N summed over the query heads of each KV head."""
        n = self.H // self.Hkv
        return self.N.reshape(self.Hkv, n, *self.N.shape[1:]).sum(1)


class OutputMoments:
    """Sums for the least-squares refit of o_proj: Σ h̃ h̃ᵀ and Σ [h_orig; 1] h̃ᵀ, h̃ = [h_comp; 1];
    with ``offsets`` (per batch, rows of the target added to ``W_orig h_orig``: the original
    model's residual minus the compressed one's) also Σ δ h̃ᵀ, Σ h_orig δᵀ and Σ ||δ||²."""

    def __init__(self, o: torch.nn.Linear, originals, bias: bool, offsets=None):
        D = o.in_features + (1 if bias else 0)
        self.bias = bias
        self.Ccc = torch.zeros(D, D, dtype=torch.float64)
        self.Coc = torch.zeros(D, D, dtype=torch.float64)
        self.originals = originals
        self.offsets = offsets
        if offsets is not None:
            self.Cdc = torch.zeros(o.out_features, D, dtype=torch.float64)
            self.Cod = torch.zeros(D, o.out_features, dtype=torch.float64)
            self.dd = 0.0
        self.i = 0
        self.mask = None
        self._h = o.register_forward_pre_hook(self._on_o)

    def _aug(self, x):
        x = x.to(torch.float64)
        return torch.cat([x, x.new_ones(x.shape[0], 1)], 1) if self.bias else x

    def _on_o(self, mod, args):
        x = args[0]
        hc = self._aug((x.reshape(-1, x.shape[-1]) if self.mask is None else x[self.mask]).detach().cpu())
        ho = self._aug(self.originals[self.i])
        if self.offsets is not None:
            d = self.offsets[self.i].to(torch.float64)
            self.Cdc += d.T @ hc
            self.Cod += ho.T @ d
            self.dd += float((d * d).sum())
        self.i += 1
        self.Ccc += hc.T @ hc
        self.Coc += ho.T @ hc
        raise _Stop

    def remove(self):
        self._h.remove()


class InputsOf:
    """The rows (valid tokens) of a module's positional input ``arg`` at every forward, kept on the
    CPU; with ``stop`` the forward ends there."""

    def __init__(self, mod: torch.nn.Module, arg: int = 0, stop: bool = False):
        self.rows = []
        self.mask = None
        self.arg, self.stop = arg, stop
        self._h = mod.register_forward_pre_hook(self._on)

    def _on(self, mod, args):
        x = args[self.arg]
        self.rows.append((x.reshape(-1, x.shape[-1]) if self.mask is None else x[self.mask]).detach().cpu())
        if self.stop:
            raise _Stop

    def remove(self):
        self._h.remove()


def hidden_rows(args, kwargs, mask):
    """A layer input's hidden states at the valid tokens, (tokens, hidden), on the CPU."""
    x = hidden_of(args, kwargs)
    return (x.reshape(-1, x.shape[-1]) if mask is None else x[mask]).detach().cpu()
