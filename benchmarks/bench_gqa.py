"""GQA attention (Hq query heads over Hkv < Hq KV heads) against PyTorch's SDPA.

Baselines: SDPA with ``enable_gqa=True`` (PyTorch's CPU flash path takes Hq ≠ Hkv, but decode
gets B·Hq tasks with no split over the sequence); and what HF transformers does whenever there
is an attention mask: ``repeat_kv`` (Hq / Hkv copies of the cache) then SDPA with the mask.

Issue #12 targets, CPU float32, B = 1, Hq = 32, Hkv = 8, D = 128 (LLaMA-3-8B's attention):
  decode, Sq = 1 over 4096 cached tokens: ≤ 0.25× SDPA enable_gqa, and the KV cache read at
    ≥ 50% of the measured memory bandwidth (the report's "of bandwidth" column: bytes = K + V);
  the same decode with a padding mask: ≤ 0.125× repeat_kv + SDPA;
  prefill Sq = Sk = 2048, causal, forward + backward: ≤ 1× SDPA (its CPU flash path).
CUDA, bfloat16, B = 8, Hq = 32, Hkv = 8, D = 128 (the issue's H200 shape):
  decode over 8192 cached tokens: ≥ 80% of HBM bandwidth (the GB/s column; bytes = K + V), with
    SDPA enable_gqa (its fused kernel for bf16 without a mask) alongside;
  prefill 4096 causal, forward: ≥ 60% of FlashAttention-2's throughput, i.e. ≤ 1/0.6 × SDPA's
    time (PyTorch's flash backend is FlashAttention-2).
The CUDA cases run only with --device cuda."""

import math

import torch
import torch.nn.functional as F

from .harness import Case


def _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g).to(dtype=dtype, device=device)  # noqa: E731
    return t(B, Hq, Sq, D), t(B, Hkv, Sk, D), t(B, Hkv, Sk, D)


def _padding_mask(B, Sq, Sk, pad):
    """(B, 1, Sq, Sk) bool, the first `pad` keys of every sequence padding (left padding, as
    batched generation sends it)."""
    m = torch.ones(B, 1, Sq, Sk, dtype=torch.bool)
    m[..., :pad] = False
    return m


def _decode(B, Hq, Hkv, Sk, D, dtype, masked):
    def build():
        import lrkernels

        q, k, v = _qkv(B, Hq, Hkv, 1, Sk, D, dtype)
        g = Hq // Hkv
        if not masked:
            return {"lrkernels": lambda: lrkernels.gqa_attention(q, k, v),
                    "sdpa_enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)}
        mask = _padding_mask(B, 1, Sk, pad=Sk // 16)

        def transformers_today():  # repeat_kv, then SDPA with the mask (no enable_gqa with a mask)
            kr = k[:, :, None].expand(B, Hkv, g, Sk, D).reshape(B, Hq, Sk, D)
            vr = v[:, :, None].expand(B, Hkv, g, Sk, D).reshape(B, Hq, Sk, D)
            return F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)

        def transformers_pack_gqa():  # transformers >= 5.2x at decode: a group's heads as query rows
            qp = q.reshape(B, Hkv, g, D)
            return F.scaled_dot_product_attention(qp, k, v, attn_mask=mask).reshape(B, Hq, 1, D)

        return {"lrkernels": lambda: lrkernels.gqa_attention(q, k, v, attn_mask=mask),
                "repeat_kv_sdpa": transformers_today,
                "pack_gqa_sdpa": transformers_pack_gqa,
                "sdpa_enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)}

    return build


def _prefill(B, Hq, Hkv, S, D, dtype, backward, device="cpu"):
    def build():
        import lrkernels

        q0, k0, v0 = _qkv(B, Hq, Hkv, S, S, D, dtype, device=device)
        q, k, v = (t.clone().requires_grad_(backward) for t in (q0, k0, v0))
        go = torch.randn(B, Hq, S, D).to(dtype=dtype, device=device)

        def step(fn):
            def run():
                for t in (q, k, v):
                    t.grad = None
                with torch.enable_grad() if backward else torch.no_grad():
                    o = fn()
                    if backward:
                        o.backward(go)
                return o
            return run

        return {"lrkernels": step(lambda: lrkernels.gqa_attention(q, k, v, causal=True)),
                "sdpa_enable_gqa": step(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                               enable_gqa=True))}

    return build


def _smollm2_generate(B, prompt, new):
    """Greedy generation with the whole SmolLM2-135M model (9 query heads over 3 KV heads): a
    left-padded batch of B real-text prompts (`prompt` tokens for the longest, 1/16 less for
    each next row, so the attention mask is there as in any batched generation), then `new`
    tokens each. Candidates: attn_implementation="lrkernels" and "sdpa" (transformers' default)."""
    def build():
        import lrkernels.integrations.transformers  # noqa: F401  (registers "lrkernels")
        from lrkernels.integrations import models

        sdpa, tok = models.load_smollm2(attn_implementation="sdpa")
        lrk, _ = models.load_smollm2(attn_implementation="lrkernels")
        texts, _ = models.pydoc_topics()
        rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts if len(t) > 8 * prompt][:B]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.full((B, prompt), pad, dtype=torch.long)
        mask = torch.zeros(B, prompt, dtype=torch.long)
        for b, r in enumerate(rows):
            n = prompt - b * (prompt // 16)
            ids[b, prompt - n:] = torch.tensor(r[:n])
            mask[b, prompt - n:] = 1
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                  pad_token_id=pad)

        def gen(model):
            return lambda: model.generate(**kw)

        return {"lrkernels": gen(lrk), "sdpa": gen(sdpa)}

    return build


def _cuda_decode(B, Hq, Hkv, Sk, D, dtype):
    def build():
        import lrkernels

        q, k, v = _qkv(B, Hq, Hkv, 1, Sk, D, dtype, device="cuda")
        return {"lrkernels": lambda: lrkernels.gqa_attention(q, k, v),
                "sdpa_enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)}

    return build


def cuda_cases(quick: bool):
    """The issue's H200 shape in bfloat16 (CUDA only)."""
    dtype, e = torch.bfloat16, 2
    B, Hq, Hkv, D = 8, 32, 8, 128
    Sk = 2048 if quick else 8192
    params = {"batch": B, "q_heads": Hq, "kv_heads": Hkv, "head_dim": D, "q_len": 1, "kv_len": Sk}
    out = [Case(f"cuda decode B{B} Hq{Hq} Hkv{Hkv} D{D} Sk{Sk} bf16", _cuda_decode(B, Hq, Hkv, Sk, D, dtype),
                "lrkernels", ["sdpa_enable_gqa"], 4.0 * B * Hq * Sk * D,
                2 * B * Hkv * Sk * D * e + 2 * B * Hq * D * e,
                note="GB/s = K + V read; target: ≥ 80% of HBM bandwidth (H200: 4.8 TB/s)",
                family="gqa", params=params)]
    S = 1024 if quick else 4096
    out.append(Case(f"cuda prefill B{B} Hq{Hq} Hkv{Hkv} D{D} S{S} causal bf16 fwd",
                    _prefill(B, Hq, Hkv, S, D, dtype, False, device="cuda"), "lrkernels", ["sdpa_enable_gqa"],
                    4.0 * B * Hq * S * S * D / 2, e * (2 * B * Hq * S * D + 2 * B * Hkv * S * D),
                    {} if quick else {"sdpa_enable_gqa": 1 / 0.6},
                    note="SDPA's flash backend is FlashAttention-2: target ≥ 60% of its throughput",
                    family="gqa", params={"batch": B, "q_heads": Hq, "kv_heads": Hkv, "head_dim": D, "q_len": S,
                                          "kv_len": S}))
    return out


def cases(device: str, quick: bool):
    if device == "cuda":
        return cuda_cases(quick)
    if device != "cpu":
        return []
    dtype = torch.float32
    e = 4
    B, Hq, Hkv, D = 1, 32, 8, 128
    out = []
    Sk = 1024 if quick else 4096
    issue = not quick
    kv_bytes = 2 * B * Hkv * Sk * D * e + 2 * B * Hq * D * e
    flops = 4.0 * B * Hq * Sk * D
    params = {"batch": B, "q_heads": Hq, "kv_heads": Hkv, "head_dim": D, "q_len": 1, "kv_len": Sk}
    out.append(Case(f"decode B{B} Hq{Hq} Hkv{Hkv} D{D} Sk{Sk} fp32", _decode(B, Hq, Hkv, Sk, D, dtype, False),
                    "lrkernels", ["sdpa_enable_gqa"], flops, kv_bytes,
                    {"sdpa_enable_gqa": 0.25} if issue else {},
                    note="GB/s = K + V read; target also: ≥ 50% of the measured copy bandwidth",
                    family="gqa", params=params, sweep="kv_len"))
    # the context-length curve: decode time and the KV read rate against the measured bandwidth
    for sk in (512, 2048) if quick else (1024, 2048, 8192, 16384):
        out.append(Case(f"context curve: decode B{B} Hq{Hq} Hkv{Hkv} D{D} Sk{sk} fp32",
                        _decode(B, Hq, Hkv, sk, D, dtype, False), "lrkernels", ["sdpa_enable_gqa"],
                        4.0 * B * Hq * sk * D, 2 * B * Hkv * sk * D * e + 2 * B * Hq * D * e,
                        family="gqa", params=dict(params, kv_len=sk), sweep="kv_len", headline=False))
    out.append(Case(f"decode B{B} Hq{Hq} Hkv{Hkv} D{D} Sk{Sk} fp32 padding mask",
                    _decode(B, Hq, Hkv, Sk, D, dtype, True), "lrkernels",
                    ["repeat_kv_sdpa", "pack_gqa_sdpa", "sdpa_enable_gqa"],
                    flops, kv_bytes, {"repeat_kv_sdpa": 0.125} if issue else {},
                    note="mask (B, 1, 1, Sk) bool, 1/16 of the keys left padding (as transformers sends it)",
                    family="gqa", params=dict(params, masked=1)))
    S = 512 if quick else 2048
    for backward in (True, False):
        fwd_flops = 4.0 * B * Hq * S * S * D / 2  # causal: half the score matrix
        out.append(Case(f"prefill B{B} Hq{Hq} Hkv{Hkv} D{D} S{S} causal fp32 {'fwd+bwd' if backward else 'fwd'}",
                        _prefill(B, Hq, Hkv, S, D, dtype, backward), "lrkernels", ["sdpa_enable_gqa"],
                        fwd_flops * (3.5 if backward else 1.0),
                        e * (2 * B * Hq * S * D + 2 * B * Hkv * S * D) * (2.5 if backward else 1.0),
                        {"sdpa_enable_gqa": 1.0} if issue and backward else {},
                        family="gqa", params={"batch": B, "q_heads": Hq, "kv_heads": Hkv, "head_dim": D,
                                              "q_len": S, "kv_len": S}))
    if quick:  # loading and converting the model alone takes longer than the rest of the quick pass
        return out
    Bm, prompt, new = 4, 512, 128
    out.append(Case(f"SmolLM2-135M generate B{Bm} prompt{prompt} new{new} fp32",
                    _smollm2_generate(Bm, prompt, new), "lrkernels", ["sdpa"],
                    note=f"the whole model, attn_implementation lrkernels vs sdpa; left-padded real text; "
                         f"tokens/s = {Bm * new} / time (prefill included)",
                    family="gqa", params={"batch": Bm, "prompt": prompt, "new_tokens": new},
                    warmup=1, min_rounds=3))
    return out


def _check_shapes():  # pragma: no cover - a quick manual sanity check: python -m benchmarks.bench_gqa
    for c in cases("cpu", True):
        if "sdpa_enable_gqa" not in c.baselines:
            continue  # (the whole-model case compares generated tokens, not attention outputs)
        fns = c.setup()
        outs = {k: f() for k, f in fns.items()}
        ref = outs["sdpa_enable_gqa"]
        for k, o in outs.items():
            err = (o.float() - ref.float()).abs().max().item()
            print(f"{c.name}: {k} max |diff| vs SDPA {err:.2e}")
            assert math.isfinite(err) and err < 1e-3


if __name__ == "__main__":  # pragma: no cover
    _check_shapes()
