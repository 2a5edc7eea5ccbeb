"""compress_kv_heads: a trained MHA/GQA model into one with fewer KV heads, in place."""
from __future__ import annotations

import contextlib
import itertools
import math
import sys
import time
from typing import List, Optional, Sequence

import torch
from torch import nn

from . import _solve
from ._arch import family_of
from ._collect import (InputsOf, LayerMoments, OutputMoments, _Stop, as_batches, first_layer_inputs,
                       hidden_rows, token_count, with_hidden)
from ._report import CompressionReport, LayerReport

METHODS = ("mean", "svd-a")
KEY_OBJECTIVES = ("plain", "query", "attention")
VALUE_OBJECTIVES = ("plain", "output", "attention")
GROUPINGS = ("contiguous", "similarity")
REFIT_TARGETS = ("layer", "original")
_EXHAUSTIVE_GROUPINGS = 5000


def _check_options(method, key_objective, value_objective, grouping, refit_target):
    for name, val, allowed in (("method", method, METHODS), ("key_objective", key_objective, KEY_OBJECTIVES),
                               ("value_objective", value_objective, VALUE_OBJECTIVES),
                               ("grouping", grouping, GROUPINGS), ("refit_target", refit_target, REFIT_TARGETS)):
        if val not in allowed:
            raise ValueError(f"compress_kv_heads: {name} must be one of {', '.join(map(repr, allowed))}, got {val!r}")


class _Progress:
    def __init__(self, enabled, total):
        self.enabled, self.total, self.t0 = enabled, total, time.perf_counter()

    def __call__(self, i, msg):
        if self.enabled:
            print(f"compress_kv_heads: layer {i + 1}/{self.total} {msg} [{time.perf_counter() - self.t0:.1f} s]",
                  file=sys.stderr, flush=True)


@contextlib.contextmanager
def _one_thread():
    """The decompositions are many small (≤ a few hundred wide) eigh / matmul calls, which run
    several times faster on one thread than split over the pool (and far faster on a busy
    machine, where every parallel region waits for its threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ---------------------------------------------------------------------------- the merges of one layer

class _LayerPlan:
    def __init__(self, groups, kmerges, vmerges):
        self.groups, self.kmerges, self.vmerges = groups, kmerges, vmerges


def _idx(heads: Sequence[int], d: int) -> torch.Tensor:
    return torch.cat([torch.arange(j * d, (j + 1) * d) for j in heads])


def _group_merges(group, stats, fam, method, key_objective, value_objective, o_weight, center_values):
    """(key merge, value merge) of one group of old KV heads."""
    Sk, mk, Sv, mv, Sq, Natt = stats.Sk, stats.mk, stats.Sv, stats.mv, stats.Sq, stats.Natt
    d, m = fam.head_dim, len(group)
    n = fam.num_heads // fam.num_kv_heads
    if method == "mean":
        return _solve.mean_merge(m, d), _solve.mean_merge(m, d)
    ix = _idx(group, d)
    # query heads h of old KV head j: h in [j·n, (j+1)·n)
    qsum = torch.stack([Sq[j * n:(j + 1) * n].sum(0) for j in group])  # (m, d) or (m, d, d)
    if fam.rope:
        w = None
        if key_objective in ("query", "attention"):
            h = d // 2
            w = qsum[:, :h] + qsum[:, h:]
        km = _solve.rope_key_merge(Sk[ix][:, ix], m, d, pair_weight=w)
        if key_objective == "attention" and m > 1:
            g = list(group)
            km = _solve.rope_key_merge_attention(Natt[g][:, :, g][:, :, :, g], km)
    else:
        km = _solve.pca_merge(Sk[ix][:, ix], m, d, mean=mk[ix], keep_offset=False,
                              weight=qsum if key_objective != "plain" else None)
    vw = o_weight[list(group)] if value_objective in ("output", "attention") else None
    if value_objective == "attention":
        # the group's stacked values as its query heads' attention averages them
        Sv_g = stats.Pv[list(group)][:, ix][:, :, ix].mean(0)
        mv_g = stats.pv[list(group)][:, ix].mean(0)
    else:
        Sv_g, mv_g = Sv[ix][:, ix], mv[ix]
    vm = _solve.pca_merge(Sv_g, m, d, mean=mv_g if center_values else None, weight=vw)
    return km, vm


def _choose_groups(stats, fam, kv_heads, grouping, cost):
    Hkv = fam.num_kv_heads
    m = Hkv // kv_heads
    if grouping == "contiguous" or m == 1 or kv_heads == 1:
        return [list(range(g * m, (g + 1) * m)) for g in range(kv_heads)]
    if math.comb(Hkv, m) <= _EXHAUSTIVE_GROUPINGS:
        # every candidate group's cost, then the cheapest disjoint ones first (the last group left
        # over is always a candidate, so this covers every head)
        scored = sorted((cost(c), c) for c in itertools.combinations(range(Hkv), m))
        used, groups = set(), []
        for _, c in scored:
            if used.isdisjoint(c):
                groups.append(list(c))
                used.update(c)
    else:
        # grow each group from the lowest free head by the head that adds the least cost
        free, groups = list(range(Hkv)), []
        while free:
            g = [free.pop(0)]
            while len(g) < m:
                best = min(free, key=lambda j: cost(tuple(g + [j])))
                free.remove(best)
                g.append(best)
            groups.append(sorted(g))
    return sorted(groups)


def _plan_layer(stats, fam, parts, kv_heads, method, key_objective, value_objective, grouping):
    d, Hkv = fam.head_dim, fam.num_kv_heads
    n = fam.num_heads // Hkv
    center_values = parts.o.bias is not None
    o_weight = None
    if value_objective in ("output", "attention") and method != "mean":
        Wo = parts.o.weight.detach().to("cpu", torch.float64)
        # Σ over the query heads of KV head j of W_o[:, h]ᵀ W_o[:, h]: the value error as o_proj sees it
        blocks = Wo.reshape(Wo.shape[0], fam.num_heads, d)
        G = torch.einsum("ohd,ohe->hde", blocks, blocks)
        o_weight = G.reshape(Hkv, n, d, d).sum(1)
    cache = {}

    def merges(group):
        key = tuple(group)
        if key not in cache:
            cache[key] = _group_merges(group, stats, fam, method, key_objective, value_objective, o_weight,
                                       center_values)
        return cache[key]

    def cost(group):
        km, vm = merges(group)
        return _solve.energy_lost(km) + _solve.energy_lost(vm)

    groups = _choose_groups(stats, fam, kv_heads, grouping if method != "mean" else "contiguous", cost)
    km, vm = zip(*(merges(g) for g in groups))
    return _LayerPlan(groups, list(km), list(vm))


def _set_linear(lin: nn.Linear, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    dt, dev = lin.weight.dtype, lin.weight.device
    rg = lin.weight.requires_grad
    lin.weight = nn.Parameter(weight.to(dev, dt), requires_grad=rg)
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(dev, dt), requires_grad=lin.bias.requires_grad if lin.bias is not None else rg)
    lin.out_features, lin.in_features = weight.shape


@torch.no_grad()
def _apply_plan(parts, plan, fam):
    d, Hkv = fam.head_dim, fam.num_kv_heads
    n = fam.num_heads // Hkv
    f64 = torch.float64

    def w_b(lin):
        return lin.weight.detach().to("cpu", f64), (None if lin.bias is None else lin.bias.detach().to("cpu", f64))

    Wq, bq = w_b(parts.q)
    Wk, bk = w_b(parts.k)
    Wv, bv = w_b(parts.v)
    Wo, bo = w_b(parts.o)
    new_k, new_v, new_bk, new_bv = [], [], [], []
    q_rows, q_bias, o_cols = [], [], []
    bo_new = None if bo is None else bo.clone()
    for group, km, vm in zip(plan.groups, plan.kmerges, plan.vmerges):
        ix = _idx(group, d)
        new_k.append(km.A @ Wk[ix])
        new_v.append(vm.A @ Wv[ix])
        if bk is not None:
            new_bk.append(km.A @ bk[ix])
        if bv is not None:
            new_bv.append(vm.A @ bv[ix])
        for gi, j in enumerate(group):
            for h in range(j * n, (j + 1) * n):
                hs = slice(h * d, (h + 1) * d)
                T = km.B[gi].T
                q_rows.append(T @ Wq[hs])
                if bq is not None:
                    q_bias.append(T @ bq[hs])
                o_cols.append(Wo[:, hs] @ vm.B[gi])
                if vm.c is not None and bo_new is not None:
                    bo_new += Wo[:, hs] @ vm.c[gi]
    _set_linear(parts.k, torch.cat(new_k), torch.cat(new_bk) if new_bk else None)
    _set_linear(parts.v, torch.cat(new_v), torch.cat(new_bv) if new_bv else None)
    _set_linear(parts.q, torch.cat(q_rows), torch.cat(q_bias) if q_bias else None)
    _set_linear(parts.o, torch.cat(o_cols, dim=1), bo_new)


@torch.no_grad()
def _refit_output(o: nn.Linear, moments: OutputMoments, ridge: float):
    """``o`` (o_proj, or the MLP's output linear) by least squares onto the moments' target, ridge-
    pulled towards its current weights. Returns error after / before on calibration."""
    W0 = o.weight.detach().to("cpu", torch.float64)
    b0 = None if o.bias is None else o.bias.detach().to("cpu", torch.float64)
    Wf = torch.cat([W0, b0[:, None]], 1) if moments.bias else W0
    # the target y = W_orig h_orig (+ b) was recorded through o_proj's original weights
    Worig = moments.W_orig
    Ccc, Coc = moments.Ccc, moments.Coc
    lam = ridge * float(Ccc.diagonal().mean())
    T = Worig @ Coc  # Σ y h_cᵀ for the target y = W_orig h_o (+ δ, the residual streams' difference)
    yy = float((Worig @ moments.Coo * Worig).sum())
    if moments.offsets is not None:
        T = T + moments.Cdc
        yy += 2 * float((Worig * moments.Cod.T).sum()) + moments.dd
    rhs = T + lam * Wf
    Wn = torch.linalg.solve(Ccc + lam * torch.eye(Ccc.shape[0], dtype=Ccc.dtype), rhs.T).T

    def err(W):  # Σ ||y − W h_c||² up to the constant Σ ||y||²
        return float(-2 * (W * T).sum() + (W @ Ccc * W).sum())

    before, after = yy + err(Wf), yy + err(Wn)
    if after > before:  # never make it worse
        return 1.0
    if moments.bias:
        _set_linear(o, Wn[:, :-1].contiguous(), Wn[:, -1].contiguous())
    else:
        _set_linear(o, Wn.contiguous(), None)
    return after / before if before > 0 else 1.0


@torch.no_grad()
def _refit_mlp(layer, fam, inputs, orig_f, orig_r, ridge):
    """The MLP's output linear by least squares: its output plus the compressed model's residual
    onto the original model's (orig_f: the linear's inputs there, orig_r: the residual)."""
    down, rmod, rarg = fam.mlp_output(layer)
    grab = InputsOf(rmod, rarg, stop=True)
    try:
        _run_layer(layer, inputs, [grab])
    finally:
        grab.remove()
    offsets = [ro.to(torch.float64) - rc.to(torch.float64) for ro, rc in zip(orig_r, grab.rows)]
    del grab
    om = OutputMoments(down, orig_f, bias=down.bias is not None, offsets=offsets)
    W = down.weight.detach().to("cpu", torch.float64)
    om.W_orig = W if down.bias is None else torch.cat([W, down.bias.detach().to("cpu", torch.float64)[:, None]], 1)
    om.Coo = sum(om._aug(x).T @ om._aug(x) for x in orig_f)
    try:
        _run_layer(layer, inputs, [om])
    finally:
        om.remove()
    return _refit_output(down, om, ridge)


def _run_layer(layer, inputs, hooks=()):
    """Run ``layer`` on every batch's captured inputs; the list of outputs (None where a hook
    stopped the pass)."""
    outs = []
    for args, kwargs, mask in inputs:
        for h in hooks:
            h.mask = mask
        try:
            y = layer(*args, **kwargs)
        except _Stop:
            outs.append(None)
            continue
        outs.append(y[0] if isinstance(y, tuple) else y)
    return outs


# ---------------------------------------------------------------------------- public entry

def compress_kv_heads(model: nn.Module, calibration, *, kv_heads: int, method: str = "svd-a",
                      key_objective: str = "query", value_objective: str = "output",
                      grouping: str = "similarity", refit_output: bool = True, refit_target: str = "layer",
                      refit_mlp: Optional[bool] = None, sequential: bool = True, ridge: float = 1e-2,
                      mlp_ridge: float = 1e-1,
                      evaluation=None, progress: bool = True) -> CompressionReport:
    """Turn ``model`` (a transformers Llama / Mistral / Qwen2 decoder or a BERT encoder) into one
    with ``kv_heads`` key/value heads per layer, in place, and report what was kept.

    Args:
        model: the model, changed in place: k_proj / v_proj get ``kv_heads · head_dim`` rows, q_proj
            and o_proj absorb the merges, ``config.num_key_value_heads = kv_heads``. Decoders stay
            standard transformers GQA models (``save_pretrained`` → ``from_pretrained``); BERT's
            self-attention becomes :class:`GQABertSelfAttention` (load with
            :func:`lrkernels.compress.load_compressed`).
        calibration: token ids ``(B, S)``, a dict of model inputs (``input_ids``, optional
            ``attention_mask``; padded tokens are left out of the statistics), or an iterable of
            either. Statistics are float64 second moments; the hidden states of all calibration
            tokens at one layer boundary are held at a time (tokens × hidden in the model's dtype).
        kv_heads: the new KV-head count; must divide the current one.
        method: ``"mean"`` (mean-pooling each group, arXiv 2305.13245) or ``"svd-a"`` (PCA of the
            calibration activations, arXiv 2406.07056: values by a PCA folded into o_proj; keys
            under RoPE by a complex-scalar combination per frequency pair, which commutes with
            the rotation and folds into q_proj; keys without RoPE by a PCA folded into q_proj).
        key_objective: ``"plain"`` (key reconstruction error), ``"query"`` (the error weighted by
            the queries' second moment: the error of the attention scores) or ``"attention"``
            (under RoPE: the variance of the score error under the layer's attention weights,
            which is what the softmax feels; see _collect.RopeAttentionMoments. Without RoPE it is
            ``"query"``, whose centred keys already drop the offset the softmax ignores).
        value_objective: ``"plain"``, ``"output"`` (the error as o_proj maps it) or
            ``"attention"`` (the values as each query head's attention weights average them, then
            as o_proj maps them; slower to collect; MiniLM 12→4: 0.936 mean cosine against the
            default's 0.932, but a lower minimum, so not the default).
        grouping: ``"contiguous"`` (heads ``g·m … g·m+m−1`` merge) or ``"similarity"`` (the
            partition losing the least energy; query heads and o_proj columns are permuted to
            match, which changes nothing in the outputs).
        refit_output: after the merge, refit o_proj by least squares on the calibration tokens so
            the compressed attention's output matches the original layer's (ridge ``ridge``).
        refit_target: what the refit matches. ``"layer"``: the original layer's attention output
            on the same inputs as the compressed layer. ``"original"`` (with ``sequential``): the
            original *model's* residual stream after the attention block, ``W_o h_o + x_o``,
            through the compressed model's ``W h_c + x_c``, so each o_proj also makes up for the
            drift of the layers before it (x: the layer's input; h: o_proj's input; o / c: the
            original / compressed model; one more pass of the original layer per layer).
            MiniLM 12→4 (512 sentences): 0.9436 mean / 0.758 min cosine against the default's
            0.9453 / 0.746, so not the default.
        refit_mlp: (needs ``sequential``) also refit the MLP's output linear (``down_proj``;
            BERT's ``output.dense``) by least squares so the layer's output matches the original
            model's at that layer (before BERT's LayerNorm), ridge ``mlp_ridge``. None (the
            default): on for encoders, off for decoders, as measured (benchmarks.compress_kv):
            MiniLM 12→4 (512 sentences) 0.9510 mean cosine with it against 0.9458 without;
            SmolLM2 3→1 (32 windows) perplexity 41.97 with it (ridge 3e-2) against 39.91 without,
            at ~4x the time (the refit is ``intermediate_size`` wide).
        ridge: the o_proj refit's ridge, relative to the mean diagonal of its input's second
            moment. 1e-2 measured best of 1e-3 / 1e-2 / 3e-2 on both models (SmolLM2 39.32
            against 39.91 at 1e-3; MiniLM 0.9458 against 0.9453).
        mlp_ridge: the MLP refit's ridge, relative in the same way. The MLP's input is
            ``intermediate_size`` wide and wants more: MiniLM 0.9498 / 0.9506 / 0.9510 at
            1e-2 / 3e-2 / 1e-1.
        sequential: calibrate layer l on the outputs of the already compressed layers < l (True),
            or on the original model's (False).
        evaluation: optional data (as ``calibration``) for the quality figures of the report:
            perplexity before / after for decoders, mean cosine similarity of mean-pooled
            embeddings for encoders.
        progress: print one line per layer to stderr.
    """
    _check_options(method, key_objective, value_objective, grouping, refit_target)
    fam = family_of(model)
    if refit_mlp is None:
        refit_mlp = sequential and not fam.causal
    if refit_mlp and not sequential:
        raise ValueError("compress_kv_heads: refit_mlp needs sequential=True (it matches the original model's "
                         "stream at each layer's output)")
    Hkv, H, d = fam.num_kv_heads, fam.num_heads, fam.head_dim
    if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1 or Hkv % kv_heads:
        raise ValueError(f"compress_kv_heads: kv_heads must be a positive divisor of the model's KV-head count "
                         f"({Hkv}), got {kv_heads!r}")
    batches = as_batches(calibration)
    t0 = time.perf_counter()
    quality = {}
    reference = None
    if evaluation is not None:
        from . import quality as _quality

        eval_batches = as_batches(evaluation, arg="evaluation")
        reference = _quality.evaluate(model, fam, eval_batches)
    layers = fam.layers()
    param = next(model.parameters())
    dev = param.device
    elem = param.element_size()
    was_training = model.training
    model.eval()
    prog = _Progress(progress, len(layers))
    reports = []
    with torch.no_grad():
        inputs = first_layer_inputs(model, layers[0], batches, fam.forward_kwargs(), dev)
        # the original model's stream, run alongside the compressed one
        orig_target = refit_output and refit_target == "original" and sequential
        track = orig_target or refit_mlp
        orig_inputs = [[a, k, m] for a, k, m in inputs] if track else None
        for li, layer in enumerate(layers):
            parts = fam.attention(layer)
            offsets = orig_o = orig_f = orig_r = None
            if track:
                # the original layer on the original stream: o_proj's inputs and the residual's gap
                grabs = [InputsOf(parts.o)]
                if refit_mlp:
                    down, rmod, rarg = fam.mlp_output(layer)
                    grabs += [InputsOf(down), InputsOf(rmod, rarg)]
                try:
                    orig_outs = _run_layer(layer, orig_inputs, grabs)
                finally:
                    for g in grabs:
                        g.remove()
                if orig_target:
                    orig_o = grabs[0].rows
                    offsets = [hidden_rows(a, k, m).to(torch.float64) - hidden_rows(ac, kc, m).to(torch.float64)
                               for (a, k, m), (ac, kc, _) in zip(orig_inputs, inputs)]
                if refit_mlp:
                    orig_f, orig_r = grabs[1].rows, grabs[2].rows
                for slot, y in zip(orig_inputs, orig_outs):
                    slot[0], slot[1] = with_hidden(slot[0], slot[1], y)
                del grabs, orig_outs
            attn_keys = None
            if fam.rope and key_objective == "attention" and method != "mean":
                attn_keys = {"scale": float(getattr(parts.module, "scaling", d ** -0.5)), "causal": fam.causal}
            attn_values = None
            if value_objective == "attention" and method != "mean":
                attn_values = {"scale": float(getattr(parts.module, "scaling", d ** -0.5)), "causal": fam.causal,
                               "rope": fam.rope, "window": fam.attention_window(li)}
            mom = LayerMoments(parts, H, Hkv, d, full_query=not fam.rope, keep_o_inputs=refit_output and not orig_target,
                               stop_at_o=sequential, attention_keys=attn_keys, attention_values=attn_values)
            try:
                outs = _run_layer(layer, inputs, [mom])
            finally:
                mom.remove()
            stats = mom.normalized()
            with _one_thread():
                plan = _plan_layer(stats, fam, parts, kv_heads, method, key_objective, value_objective, grouping)
            W_orig = parts.o.weight.detach().to("cpu", torch.float64)
            if parts.o.bias is not None:
                W_orig = torch.cat([W_orig, parts.o.bias.detach().to("cpu", torch.float64)[:, None]], 1)
            _apply_plan(parts, plan, fam)
            fam.set_kv_heads(layer, kv_heads)
            parts = fam.attention(layer)
            gain = None
            if refit_output:
                # the original inputs of o_proj, in the order of the new query heads
                perm = torch.cat([_idx(range(j * (H // Hkv), (j + 1) * (H // Hkv)), d)
                                  for g in plan.groups for j in g])
                originals = [x[:, perm] for x in (mom.o_inputs if orig_o is None else orig_o)]
                om = OutputMoments(parts.o, originals, bias=parts.o.bias is not None, offsets=offsets)
                if parts.o.bias is None:
                    om.W_orig = W_orig[:, perm]
                else:
                    om.W_orig = torch.cat([W_orig[:, :-1][:, perm], W_orig[:, -1:]], 1)
                om.Coo = sum(om._aug(x).T @ om._aug(x) for x in originals)
                try:
                    _run_layer(layer, inputs, [om])
                finally:
                    om.remove()
                gain = _refit_output(parts.o, om, ridge)
                del originals, om, offsets, orig_o
            mlp_gain = None
            if refit_mlp:
                mlp_gain = _refit_mlp(layer, fam, inputs, orig_f, orig_r, mlp_ridge)
                del orig_f, orig_r
            if sequential:
                outs = _run_layer(layer, inputs)
            for slot, y in zip(inputs, outs):
                slot[0], slot[1] = with_hidden(slot[0], slot[1], y)
            ke = [km.kept for km in plan.kmerges]
            ve = [vm.kept for vm in plan.vmerges]
            rep = LayerReport(index=li, groups=plan.groups, key_energy_kept=float(sum(ke) / len(ke)),
                              value_energy_kept=float(sum(ve) / len(ve)), output_refit_gain=gain,
                              mlp_refit_gain=mlp_gain)
            reports.append(rep)
            prog(li, f"energy kept keys {rep.key_energy_kept:.3f} values {rep.value_energy_kept:.3f}"
                     + (f", o_proj refit error x{gain:.3f}" if gain is not None else "")
                     + (f", MLP output refit error x{mlp_gain:.3f}" if mlp_gain is not None else ""))
        del inputs, orig_inputs
    fam.set_config_kv_heads(kv_heads)
    model.train(was_training)
    seconds = time.perf_counter() - t0
    if reference is not None:
        quality = _quality.compare(model, fam, eval_batches, reference)
    return CompressionReport(
        architecture=type(model).__name__, method=method,
        options=dict(key_objective=key_objective, value_objective=value_objective, grouping=grouping,
                     refit_output=refit_output, refit_target=refit_target, refit_mlp=refit_mlp,
                     sequential=sequential, ridge=ridge, mlp_ridge=mlp_ridge),
        kv_heads_before=Hkv, kv_heads_after=kv_heads, num_layers=len(layers), head_dim=d,
        kv_cache_bytes_per_token_before=2 * len(layers) * Hkv * d * elem,
        kv_cache_bytes_per_token_after=2 * len(layers) * kv_heads * d * elem,
        calibration_tokens=token_count(batches), seconds=seconds, layers=reports, quality=quality)
