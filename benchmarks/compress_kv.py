"""KV-head compression on the real models (issue 13): quality and time, printed as a table.

    python -m benchmarks.compress_kv [--quick] [--no-recovery] [--cal-windows N] [--eval-windows N]
                                     [--recover-minutes M] [--json PATH]

Not part of the default ``make bench`` suite (it is not a bench_<op>.py): it loads real models
and takes long: every variant, then a 30-minute LoRA recovery of the SmolLM2 default (and a
5-minute one of MiniLM's). ``--quick`` is a smoke run of a few minutes (smaller calibration and
evaluation sets, the baseline, the plain SVD-a and the default, recoveries of one minute);
``--no-recovery`` skips the recoveries.

- SmolLM2-135M-Instruct, 3 -> 1 KV heads (KV cache 3x smaller): perplexity on 256-token
  windows of the evaluation text (the odd-indexed pydoc topics), calibration on windows of the
  even-indexed ones; the original, mean-pooling, and svd-a with its options added one at a time;
  compression time of each; optionally a bounded LoRA recovery run of the default.
- all-MiniLM-L6-v2, 12 -> 4 KV heads: mean cosine similarity between the original's and the
  compressed model's sentence embeddings (mean pooling over tokens, as sentence-transformers
  does) over sentences of the evaluation text.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time

# mean-pooling is the plain baseline of arXiv 2305.13245: no o_proj refit, no sequential calibration
SMOL_VARIANTS = [
    ("mean-pooling", dict(method="mean", refit_output=False, sequential=False)),
    ("svd-a: key PCA per pair + value PCA", dict(key_objective="plain", value_objective="plain", grouping="contiguous",
                                                 refit_output=False, sequential=False)),
    ("+ query-weighted keys", dict(key_objective="query", value_objective="plain", grouping="contiguous",
                                   refit_output=False, sequential=False)),
    ("+ o_proj-weighted values", dict(key_objective="query", value_objective="output", grouping="contiguous",
                                      refit_output=False, sequential=False)),
    ("+ o_proj least-squares refit", dict(key_objective="query", value_objective="output", grouping="contiguous",
                                          refit_output=True, sequential=False)),
    ("+ sequential calibration (default)", dict()),
    ("attention-variance keys instead of query-weighted, no refit",
     dict(key_objective="attention", value_objective="output", grouping="contiguous", refit_output=False,
          sequential=False)),
    ("attention-variance keys + refit + sequential", dict(key_objective="attention")),
    ("default + MLP output refit against the original model's layer output", dict(refit_mlp=True)),
    ("default with ridge 1e-3 (the previous default)", dict(ridge=1e-3)),
]

MINILM_VARIANTS = [
    ("mean-pooling", dict(method="mean", refit_output=False, sequential=False)),
    ("svd-a: key PCA + value PCA, contiguous groups", dict(key_objective="plain", value_objective="plain",
                                                           grouping="contiguous", refit_output=False,
                                                           sequential=False)),
    ("+ grouping by similarity", dict(key_objective="plain", value_objective="plain", grouping="similarity",
                                      refit_output=False, sequential=False)),
    ("+ query-weighted keys, o_proj-weighted values", dict(key_objective="query", value_objective="output",
                                                           grouping="similarity", refit_output=False,
                                                           sequential=False)),
    ("+ o_proj refit, sequential", dict(refit_mlp=False)),
    ("+ MLP output refit against the original model's layer output (default)", dict()),
    ("o_proj refit against the original model's residual stream, no MLP refit",
     dict(refit_target="original", refit_mlp=False)),
    ("default with MLP ridge 1e-2", dict(mlp_ridge=1e-2)),
    ("default with MLP ridge 3e-2", dict(mlp_ridge=3e-2)),
    ("ridge 1e-3, no MLP refit (the previous default)", dict(ridge=1e-3, refit_mlp=False)),
]


# the variants --quick runs
QUICK = {"mean-pooling", "svd-a: key PCA per pair + value PCA", "svd-a: key PCA + value PCA, contiguous groups"}


def _selected(variants, args):
    only = set(args.only_variants or [])
    for name, opts in variants:
        default = name.endswith("(default)")
        if only and name not in only and not (default and "default" in only):
            continue
        if args.quick and not only and not default and name not in QUICK:
            continue
        yield name, opts


def _recovery_rows(rows, base, out, metric):
    """The recovery's evaluations (before, every --recover-eval-every steps, merged at the end)."""
    for e in out["evaluations"]:
        rows.append(dict(base, step=e["step"], seconds=e["seconds"], **{k: e[k] for k in metric}))


def _windows(tok, texts, seq_len):
    ids = tok("\n\n".join(texts), return_tensors="pt")["input_ids"][0]
    n = ids.numel() // seq_len
    return ids[: n * seq_len].reshape(n, seq_len)


def _spread(w, n):
    import torch

    if n >= len(w):
        return w
    return w[torch.linspace(0, len(w) - 1, n).round().long()]


def _sentences(texts, n):
    out = []
    for t in texts:
        for s in re.split(r"(?<=[.!?])\s+|\n\s*\n", t):
            s = " ".join(s.split())
            if len(s.split()) >= 6 and not s.startswith((">>>", "...")):
                out.append(s)
    step = max(1, len(out) // n) if n else 1
    return out[::step][:n]


def _say(*a):
    print(*a, file=sys.stderr, flush=True)


def smollm2(args, rows, rec):
    import torch

    from lrkernels.compress import compress_kv_heads, perplexity, recover
    from lrkernels.integrations import models

    model, tok = models.load_smollm2()
    cal_t, ev_t = models.pydoc_topics()
    cal = _spread(_windows(tok, cal_t, 256), args.cal_windows)
    ev = _windows(tok, ev_t, 256)
    ev = ev[: args.eval_windows] if args.eval_windows else ev
    cal_b, ev_b = list(cal.split(8)), list(ev.split(8))
    base = {"model": "SmolLM2-135M-Instruct", "kv_heads": "3 -> 1", "calibration_tokens": cal.numel(),
            "eval_tokens": ev.numel()}
    _say(f"SmolLM2: {len(cal)} calibration windows, {len(ev)} evaluation windows of 256 tokens")
    t = time.perf_counter()
    ppl0 = perplexity(model, ev_b)
    rows.append(dict(base, variant="original (3 KV heads)", perplexity=ppl0, eval_s=time.perf_counter() - t))
    _say(rows[-1])
    original = copy.deepcopy(model)
    default_model = None
    for name, opts in _selected(SMOL_VARIANTS, args):
        m = copy.deepcopy(original)
        t = time.perf_counter()
        rep = compress_kv_heads(m, cal_b, kv_heads=1, progress=args.progress, **opts)
        secs = time.perf_counter() - t
        rows.append(dict(base, variant=name, perplexity=perplexity(m, ev_b), compress_s=secs,
                         key_energy=sum(r.key_energy_kept for r in rep.layers) / len(rep.layers),
                         value_energy=sum(r.value_energy_kept for r in rep.layers) / len(rep.layers),
                         kv_bytes_per_token=f"{rep.kv_cache_bytes_per_token_before} -> "
                                            f"{rep.kv_cache_bytes_per_token_after}"))
        _say(rows[-1])
        if name.endswith("(default)"):
            default_model = m
    if args.recover_minutes and default_model is not None:
        # the training text: every calibration-side window (the evaluation text is never seen);
        # progress: perplexity on the first --recover-eval-windows evaluation windows
        data = list(_windows(tok, cal_t, 256).split(args.recover_batch))
        out = recover(default_model, data, steps=args.recover_steps, r=args.recover_r, lr=args.recover_lr,
                      teacher=original, distill=args.distill, time_limit_s=args.recover_minutes * 60,
                      evaluation=list(ev[: args.recover_eval_windows].split(8)),
                      eval_every=args.recover_eval_every, progress=args.progress)
        ppl = perplexity(default_model, ev_b)
        rows.append(dict(base, variant=f"default + recover (LoRA r{args.recover_r}, {out['steps']} steps of "
                                       f"{args.recover_batch}x256 tokens, distill {args.distill})",
                         perplexity=ppl, recover_s=out["train_seconds"], ratio_to_original=ppl / ppl0,
                         loss_first=out["loss_first"], loss_last=out["loss_last"]))
        _say(rows[-1])
        _recovery_rows(rec, {"model": base["model"]}, out, ["perplexity"])
    del original, model


def minilm(args, rows, rec):
    import torch.nn.functional as F

    from lrkernels.compress import compress_kv_heads, recover, sentence_embeddings
    from lrkernels.integrations import models

    model, tok = models.load_minilm()
    cal_t, ev_t = models.pydoc_topics()

    def batches(sents):
        return [dict(tok(sents[i:i + 32], return_tensors="pt", truncation=True, max_length=128, padding=True))
                for i in range(0, len(sents), 32)]

    cal_b, ev_b = batches(_sentences(cal_t, args.sentences)), batches(_sentences(ev_t, args.sentences))
    n_eval = sum(len(b["input_ids"]) for b in ev_b)
    ref = sentence_embeddings(model, ev_b)
    base = {"model": "all-MiniLM-L6-v2", "kv_heads": "12 -> 4", "eval_sentences": n_eval}
    default_model = None
    for name, opts in _selected(MINILM_VARIANTS, args):
        m = copy.deepcopy(model)
        t = time.perf_counter()
        rep = compress_kv_heads(m, cal_b, kv_heads=4, progress=args.progress, **opts)
        secs = time.perf_counter() - t
        cos = F.cosine_similarity(sentence_embeddings(m, ev_b), ref, dim=-1)
        rows.append(dict(base, variant=name, cosine_mean=float(cos.mean()), cosine_min=float(cos.min()),
                         compress_s=secs,
                         key_energy=sum(r.key_energy_kept for r in rep.layers) / len(rep.layers),
                         value_energy=sum(r.value_energy_kept for r in rep.layers) / len(rep.layers)))
        _say(rows[-1])
        if name.endswith("(default)"):
            default_model = m
    if args.minilm_recover_minutes and default_model is not None:
        out = recover(default_model, cal_b, steps=args.recover_steps, r=args.recover_r, lr=args.recover_lr,
                      teacher=model, time_limit_s=args.minilm_recover_minutes * 60, evaluation=ev_b,
                      eval_every=args.recover_eval_every, progress=args.progress)
        cos = F.cosine_similarity(sentence_embeddings(default_model, ev_b), ref, dim=-1)
        rows.append(dict(base, variant=f"default + recover (LoRA r{args.recover_r}, {out['steps']} steps of "
                                       f"32 sentences, token-state MSE to the original)",
                         cosine_mean=float(cos.mean()), cosine_min=float(cos.min()), recover_s=out["train_seconds"],
                         loss_first=out["loss_first"], loss_last=out["loss_last"]))
        _say(rows[-1])
        _recovery_rows(rec, {"model": base["model"]}, out,
                       ["embedding_cosine_mean", "embedding_cosine_min"])


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def table(rows, cols=("model", "kv_heads", "variant", "perplexity", "cosine_mean", "cosine_min", "compress_s",
                       "recover_s", "key_energy", "value_energy")) -> str:
    cols = [c for c in cols if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.compress_kv", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=["smollm2", "minilm"], choices=["smollm2", "minilm"])
    p.add_argument("--quick", action="store_true",
                   help="a smoke run of a few minutes: small calibration / evaluation sets, the baseline, the plain "
                        "svd-a and the default only, recoveries of one minute")
    p.add_argument("--no-recovery", action="store_true", help="skip the LoRA recoveries")
    p.add_argument("--cal-windows", type=int, help="SmolLM2 calibration windows of 256 tokens (64; quick: 24; with 8 the o_proj refit "
                        "overfits: perplexity 988 against 139 without it)")
    p.add_argument("--eval-windows", type=int, help="SmolLM2 evaluation windows (0: all; 64; quick: 8)")
    p.add_argument("--only-variants", nargs="*", help="variants by name ('default' for the default)")
    p.add_argument("--sentences", type=int, help="MiniLM sentences for calibration and evaluation (512; quick: 128)")
    p.add_argument("--recover-minutes", type=float, help="LoRA recovery of the SmolLM2 default (30; quick: 1; "
                                                         "0: skip)")
    p.add_argument("--minilm-recover-minutes", type=float, help="LoRA recovery of the MiniLM default (5; quick: 1; "
                                                                "0: skip)")
    p.add_argument("--recover-steps", type=int, default=10 ** 6,
                   help="step bound of the recoveries (the time limit ends them first; the LR schedule follows "
                        "whichever is further along)")
    p.add_argument("--recover-batch", type=int, default=4)
    p.add_argument("--recover-r", type=int, default=16)
    p.add_argument("--recover-lr", type=float, default=5e-4)
    p.add_argument("--recover-eval-every", type=int, help="steps between the recoveries' evaluations (50; quick: 10)")
    p.add_argument("--recover-eval-windows", type=int, default=8,
                   help="SmolLM2 evaluation windows of the recovery's progress figures")
    p.add_argument("--distill", type=float, default=0.5)
    p.add_argument("--progress", action="store_true", help="per-layer / per-step progress lines")
    p.add_argument("--json", help="write the rows and the environment here")
    args = p.parse_args(argv)
    q = args.quick
    for name, full, quick in (("cal_windows", 64, 24), ("eval_windows", 64, 8), ("sentences", 512, 128),
                              ("recover_minutes", 30, 1), ("minilm_recover_minutes", 5, 1),
                              ("recover_eval_every", 50, 10)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    if args.no_recovery:
        args.recover_minutes = args.minilm_recover_minutes = 0
    import torch

    from .harness import _cpu_isa, _cpu_model

    torch.manual_seed(0)
    rows, rec = [], []
    for name in args.models:
        try:
            (smollm2 if name == "smollm2" else minilm)(args, rows, rec)
        except ImportError as e:  # ModelUnavailable is an ImportError
            _say(f"{name}: skipped ({e})")
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": _cpu_model(), "cpu_isa": _cpu_isa(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": commit}
    print(f"{env['cpu']} ({env['cpu_isa']}) · {env['threads']} threads · torch {env['torch']} · commit {commit} · "
          f"{env['date']}")
    print(table(rows))
    if rec:
        print("\nrecovery progress (evaluation figures before, during, and of the merged model at the end)")
        print(table(rec, ("model", "step", "seconds", "perplexity", "embedding_cosine_mean", "embedding_cosine_min")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "args": vars(args), "rows": rows, "recovery": rec}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
