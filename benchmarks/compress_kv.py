"""KV-head compression on the real models (issue 13): quality and time, printed as a table.

    python -m benchmarks.compress_kv [--cal-windows N] [--eval-windows N] [--recover-minutes M] [--json PATH]

Not part of the default ``make bench`` suite (it is not a bench_<op>.py): it loads real models
and takes minutes.

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

SMOL_VARIANTS = [
    ("mean-pooling", dict(method="mean")),
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
]

MINILM_VARIANTS = [
    ("mean-pooling", dict(method="mean")),
    ("svd-a: key PCA + value PCA, contiguous groups", dict(key_objective="plain", value_objective="plain",
                                                           grouping="contiguous", refit_output=False,
                                                           sequential=False)),
    ("+ grouping by similarity", dict(key_objective="plain", value_objective="plain", grouping="similarity",
                                      refit_output=False, sequential=False)),
    ("+ query-weighted keys, o_proj-weighted values", dict(key_objective="query", value_objective="output",
                                                           grouping="similarity", refit_output=False,
                                                           sequential=False)),
    ("+ o_proj refit, sequential (default)", dict()),
]


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


def smollm2(args, rows):
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
    only = set(args.only_variants or [])
    default_model = None
    for name, opts in SMOL_VARIANTS:
        if only and name not in only and not (name.endswith("(default)") and "default" in only):
            continue
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
        data = list(_spread(_windows(tok, cal_t, 256), 10 ** 9).split(args.recover_batch))
        out = recover(default_model, data, steps=args.recover_steps, r=args.recover_r, lr=args.recover_lr,
                      teacher=original, distill=args.distill, time_limit_s=args.recover_minutes * 60,
                      progress=args.progress)
        ppl = perplexity(default_model, ev_b)
        rows.append(dict(base, variant=f"default + recover (LoRA r{args.recover_r}, {out['steps']} steps of "
                                       f"{args.recover_batch}x256 tokens, distill {args.distill})",
                         perplexity=ppl, recover_s=out["seconds"], ratio_to_original=ppl / ppl0,
                         loss_first=out["loss_first"], loss_last=out["loss_last"]))
        _say(rows[-1])
    del original, model


def minilm(args, rows):
    import torch.nn.functional as F

    from lrkernels.compress import compress_kv_heads, sentence_embeddings
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
    for name, opts in MINILM_VARIANTS:
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


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def table(rows) -> str:
    cols = ["model", "kv_heads", "variant", "perplexity", "cosine_mean", "cosine_min", "compress_s", "recover_s",
            "key_energy", "value_energy"]
    cols = [c for c in cols if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.compress_kv", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=["smollm2", "minilm"], choices=["smollm2", "minilm"])
    p.add_argument("--cal-windows", type=int, default=64, help="SmolLM2 calibration windows of 256 tokens")
    p.add_argument("--eval-windows", type=int, default=64, help="SmolLM2 evaluation windows (0: all)")
    p.add_argument("--only-variants", nargs="*", help="SmolLM2 variants by name ('default' for the default)")
    p.add_argument("--sentences", type=int, default=512, help="MiniLM sentences for calibration and evaluation")
    p.add_argument("--recover-minutes", type=float, default=0, help="LoRA recovery of the SmolLM2 default "
                                                                    "(0: skip)")
    p.add_argument("--recover-steps", type=int, default=10 ** 6)
    p.add_argument("--recover-batch", type=int, default=4)
    p.add_argument("--recover-r", type=int, default=16)
    p.add_argument("--recover-lr", type=float, default=5e-4)
    p.add_argument("--distill", type=float, default=0.5)
    p.add_argument("--progress", action="store_true", help="per-layer / per-step progress lines")
    p.add_argument("--json", help="write the rows and the environment here")
    args = p.parse_args(argv)
    import torch

    from .harness import _cpu_isa, _cpu_model

    torch.manual_seed(0)
    rows = []
    for name in args.models:
        try:
            (smollm2 if name == "smollm2" else minilm)(args, rows)
        except ImportError as e:  # ModelUnavailable is an ImportError
            _say(f"{name}: skipped ({e})")
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": _cpu_model(), "cpu_isa": _cpu_isa(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": commit}
    print(f"{env['cpu']} ({env['cpu_isa']}) · {env['threads']} threads · torch {env['torch']} · commit {commit} · "
          f"{env['date']}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
